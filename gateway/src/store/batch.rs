//! Telemetry batches: the hot path. A session fills a batch, the writer inserts it in
//! the next group commit and hands it back with what it stored.

use std::sync::Arc;

use device_client::proto::Seq;
use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use super::chunk::ChunkBuf;

/// One record inside a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchRecord {
    /// Sequence number.
    pub seq: Seq,
    /// Device time, or arrival time if the device gave none.
    pub time_ms: i64,
    /// Where the body sits in [`Batch::bodies`].
    pub start: u32,
    /// Body length.
    pub len: u32,
    /// Set by the writer: this record was new (not a duplicate).
    pub inserted: bool,
}

/// Telemetry of one session waiting for a commit. Sessions reuse batches (the writer
/// hands them back emptied of nothing; the session clears them), so the hot path does
/// not allocate per message.
#[derive(Debug)]
pub struct Batch {
    /// The device's key in the store.
    pub device_key: i64,
    /// Boot id of the session (stored bit-for-bit as a signed 64-bit integer).
    pub boot_id: u64,
    /// Arrival time of the batch's first record.
    pub received_ms: i64,
    /// When the batch went to the store (for the commit latency metric).
    pub submitted: Option<std::time::Instant>,
    /// Records, in arrival order.
    pub records: Vec<BatchRecord>,
    /// Concatenated message bodies.
    pub bodies: Vec<u8>,
}

impl Batch {
    /// An empty batch for a session. Boxed: batches move between the session and the
    /// writer, and a session's future keeps room for what it moves.
    pub fn new(device_key: i64, boot_id: u64) -> Box<Self> {
        Box::new(Self {
            device_key,
            boot_id,
            received_ms: 0,
            submitted: None,
            records: Vec::new(),
            bodies: Vec::new(),
        })
    }

    /// Appends a record; `body` is the frame body of the `Telemetry` message.
    pub fn push(&mut self, seq: Seq, time_ms: i64, body: &[u8]) {
        let start = self.bodies.len() as u32;
        self.bodies.extend_from_slice(body);
        self.records.push(BatchRecord {
            seq,
            time_ms,
            start,
            len: body.len() as u32,
            inserted: false,
        });
    }

    /// The body of a record.
    pub fn body(&self, r: &BatchRecord) -> &[u8] {
        let start = r.start as usize;
        self.bodies
            .get(start..start + r.len as usize)
            .unwrap_or_default()
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.records.clear();
        self.bodies.clear();
    }

    /// Whether there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Why [`Store::try_submit`] did not take a batch.
#[derive(Debug)]
pub enum TrySubmit {
    /// The queue to the writer is full; here is the batch back.
    Full(Box<Batch>),
    /// The store is closed.
    Closed,
}

/// The outcome of a batch.
#[derive(Debug)]
pub struct BatchDone {
    /// The batch, with `inserted` set on each record.
    pub batch: Box<Batch>,
    /// `Ok(new rows)` once committed; the error otherwise (nothing was acked).
    pub result: Result<usize, Arc<StoreError>>,
}

/// Inserts the records above the boot's high-water mark, in chunks (see
/// [`chunk`](super::chunk)), and raises the mark; the others are duplicates (already
/// stored: a session replays from `Welcome.last_acked`, and seqs grow within a boot).
pub(super) fn insert_batch(conn: &Connection, batch: &mut Batch) -> Result<usize, rusqlite::Error> {
    // Stored bit for bit: SQLite integers are signed 64-bit.
    let boot = batch.boot_id as i64;
    let mut high: Option<i64> = conn
        .prepare_cached("SELECT last_seq FROM boots WHERE device = ?1 AND boot_id = ?2")?
        .query_row(params![batch.device_key, boot], |r| r.get(0))
        .optional()?;
    let mut chunk = ChunkBuf::default();
    let mut encoded = Vec::new();
    let mut inserted = 0;
    for i in 0..batch.records.len() {
        let Some(rec) = batch.records.get_mut(i) else {
            break;
        };
        let seq = i64::from(rec.seq);
        rec.inserted = high.is_none_or(|h| seq > h);
        if !rec.inserted {
            continue;
        }
        high = Some(seq);
        inserted += 1;
        let rec = *rec;
        if !chunk.fits(&rec) {
            insert_chunk(conn, batch, &chunk, None, &mut encoded)?;
            chunk.clear();
        }
        chunk.push(i, &rec);
    }
    if !chunk.records.is_empty() {
        insert_chunk(conn, batch, &chunk, None, &mut encoded)?;
    }
    if inserted > 0
        && let Some(high) = high
    {
        conn.prepare_cached(
            "INSERT INTO boots(device, boot_id, last_seq, last_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(device, boot_id) DO UPDATE SET
                    last_seq = max(last_seq, excluded.last_seq), last_ms = excluded.last_ms",
        )?
        .execute(params![batch.device_key, boot, high, batch.received_ms])?;
    }
    Ok(inserted)
}

/// Inserts one chunk of `batch`: its rows follow the last ever given, or end at
/// `last_row` (a migration keeping the rows records had).
pub(super) fn insert_chunk(
    conn: &Connection,
    batch: &Batch,
    chunk: &ChunkBuf,
    last_row: Option<i64>,
    encoded: &mut Vec<u8>,
) -> Result<(), rusqlite::Error> {
    chunk.encode(batch, encoded);
    let n = chunk.records.len() as i64;
    conn.prepare_cached(
        "INSERT INTO chunks(last_row, n, device, boot_id, min_time, max_time, received_ms,
                            records)
         VALUES (coalesce(?1, coalesce((SELECT seq FROM sqlite_sequence
                                         WHERE name = 'chunks'), 0) + ?2),
                 ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        last_row,
        n,
        batch.device_key,
        batch.boot_id as i64,
        chunk.min_time,
        chunk.max_time,
        batch.received_ms,
        &encoded[..]
    ])?;
    Ok(())
}
