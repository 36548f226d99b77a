//! Telemetry is stored in chunks: one row holds a run of one device boot's records
//! that committed together, instead of one row (and one index entry) per record.
//!
//! ```text
//!  a batch (one session, one commit)      chunks: one row per chunk
//!                                         last_row n dev boot min_time max_time records
//!  seq 41 t=+0    ┐
//!  seq 42 t=+10   ├ within SPAN_MS ─────► 1042     3 7   9    +0       +20      41,0,b 42,10,b 43,20,b
//!  seq 43 t=+20   ┘
//!  seq 44 t=+1900 ─ beyond it ──────────► 1043     1 7   9    +1900    +1900    44,0,b
//! ```
//!
//! Each record keeps a row number of its own, `last_row - n + 1 + i` for the chunk's
//! `i`-th record: row numbers grow in commit order without gaps, as rowids did when
//! each record was a row, so sink cursors, API cursors and the backlog count keep
//! their meaning. `last_row` is an `AUTOINCREMENT` key: a number is never given twice,
//! even after the newest chunk is deleted.
//!
//! A chunk's records span at most [`SPAN_MS`] of device time. That bound is what a
//! time query relies on: the chunks that can hold a record at or after `t` are those
//! with `min_time >= t - SPAN_MS`, a range of the `(device, min_time)` index.
//!
//! `records` is the records in arrival order, each the postcard encoding of
//! `(seq: u32, time_ms - min_time: u32, body: bytes)` (varints, then the length-prefixed
//! body: the `Telemetry` message as the device sent it). docs/STORE.md has the layout.

use device_client::proto::Seq;

use super::batch::{Batch, BatchRecord};

/// Most device time one chunk spans (ms): what a time query scans beyond its bounds.
///
/// Small, because a query that starts at a time reads this much of a device's chunks
/// before it, and a newest-first one this much beyond its last record (with 1 s,
/// listing 100 devices with their newest record took 7–10 ms at 400 × 1,000/s; with
/// 250 ms, 3 ms). A batch spans about one commit interval (tens of milliseconds), so
/// at the rates where chunks pay this rarely cuts one.
pub const SPAN_MS: i64 = 250;
/// Most records in one chunk: reading one record decodes its whole chunk.
pub(super) const MAX_RECORDS: usize = 512;
/// Most encoded bytes in one chunk (one record may exceed it alone).
pub(super) const MAX_BYTES: usize = 32 * 1024;

/// One record as a chunk holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord<'a> {
    /// Its row number (commit order).
    pub row: i64,
    /// Sequence number.
    pub seq: Seq,
    /// Device time (or arrival time), ms since the epoch.
    pub time_ms: i64,
    /// The `Telemetry` message as the device sent it (postcard).
    pub body: &'a [u8],
}

/// A chunk being built: the records of one batch, cut where the next would break a
/// bound.
#[derive(Debug, Default)]
pub(super) struct ChunkBuf {
    /// Indexes into the batch's records.
    pub(super) records: Vec<usize>,
    pub(super) min_time: i64,
    pub(super) max_time: i64,
    bytes: usize,
}

impl ChunkBuf {
    /// Whether `rec` fits, by time span, count and size.
    pub(super) fn fits(&self, rec: &BatchRecord) -> bool {
        if self.records.is_empty() {
            return true;
        }
        let (lo, hi) = (
            self.min_time.min(rec.time_ms),
            self.max_time.max(rec.time_ms),
        );
        hi.saturating_sub(lo) <= SPAN_MS
            && self.records.len() < MAX_RECORDS
            && self.bytes + rec.len as usize <= MAX_BYTES
    }

    pub(super) fn push(&mut self, index: usize, rec: &BatchRecord) {
        if self.records.is_empty() {
            (self.min_time, self.max_time) = (rec.time_ms, rec.time_ms);
        } else {
            self.min_time = self.min_time.min(rec.time_ms);
            self.max_time = self.max_time.max(rec.time_ms);
        }
        self.records.push(index);
        self.bytes += rec.len as usize;
    }

    pub(super) fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    /// Encodes the records into `out` (cleared first).
    pub(super) fn encode(&self, batch: &Batch, out: &mut Vec<u8>) {
        out.clear();
        for &i in &self.records {
            let Some(rec) = batch.records.get(i) else {
                continue;
            };
            // Within the span, so it fits a u32 (checked by `fits`).
            let dt = u32::try_from(rec.time_ms - self.min_time).unwrap_or(u32::MAX);
            encode_record(rec.seq, dt, batch.body(rec), out);
        }
    }
}

/// Appends one record's encoding to `out`.
pub(super) fn encode_record(seq: Seq, dt: u32, body: &[u8], out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = postcard::to_extend(&(seq, dt, Bytes(body)), std::mem::take(out)).map(|v| *out = v);
}

/// `&[u8]` serialized as postcard bytes (a length, then the bytes).
struct Bytes<'a>(&'a [u8]);

impl serde::Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// The records of a stored chunk, in row order. A chunk that does not decode (a
/// damaged file) ends where it stops decoding, with a warning.
pub fn decode<'a>(
    last_row: i64,
    n: i64,
    min_time: i64,
    records: &'a [u8],
) -> impl Iterator<Item = ChunkRecord<'a>> + 'a {
    let mut rest = records;
    let mut row = last_row - n + 1;
    std::iter::from_fn(move || {
        if rest.is_empty() || row > last_row {
            return None;
        }
        match postcard::take_from_bytes::<(Seq, u32, &[u8])>(rest) {
            Ok(((seq, dt, body), tail)) => {
                rest = tail;
                row += 1;
                Some(ChunkRecord {
                    row: row - 1,
                    seq,
                    time_ms: min_time.saturating_add(i64::from(dt)),
                    body,
                })
            }
            Err(e) => {
                tracing::warn!(last_row, error = %e, "a stored telemetry chunk does not decode");
                rest = &[];
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_their_rows() {
        let mut b = Batch::new(1, 1);
        b.push(5, 1_000, b"abc");
        b.push(6, 1_200, b"");
        b.push(9, 990, &[0xff; 300]);
        let mut c = ChunkBuf::default();
        for (i, r) in b.records.iter().enumerate() {
            assert!(c.fits(r));
            c.push(i, r);
        }
        let mut out = Vec::new();
        c.encode(&b, &mut out);
        let got: Vec<_> = decode(102, 3, c.min_time, &out).collect();
        assert_eq!(c.min_time, 990);
        assert_eq!(
            got.iter()
                .map(|r| (r.row, r.seq, r.time_ms))
                .collect::<Vec<_>>(),
            [(100, 5, 1_000), (101, 6, 1_200), (102, 9, 990)]
        );
        assert_eq!(got[0].body, b"abc");
        assert_eq!(got[2].body, &[0xff; 300]);
    }

    /// The worked example of docs/STORE.md.
    #[test]
    fn a_record_is_laid_out_as_docs_store_md_says() {
        let mut out = Vec::new();
        encode_record(41, 10, &[1, 2, 3], &mut out);
        assert_eq!(out, [0x29, 0x0a, 0x03, 0x01, 0x02, 0x03]);
        encode_record(300, 0, &[], &mut out);
        assert_eq!(out[6..], [0xac, 0x02, 0x00, 0x00]);
    }

    #[test]
    fn a_chunk_is_cut_at_its_span_count_and_size() {
        let rec = |time_ms, len| BatchRecord {
            seq: 1,
            time_ms,
            start: 0,
            len,
            inserted: false,
        };
        let mut c = ChunkBuf::default();
        c.push(0, &rec(50_000, 10));
        assert!(c.fits(&rec(50_000 + SPAN_MS, 10)));
        assert!(c.fits(&rec(50_000 - SPAN_MS, 10)));
        assert!(!c.fits(&rec(50_000 + SPAN_MS + 1, 10)));
        assert!(!c.fits(&rec(i64::MIN, 10)), "no overflow on wild times");
        assert!(!c.fits(&rec(50_000, MAX_BYTES as u32)));
        for i in 1..MAX_RECORDS {
            c.push(i, &rec(50_000, 0));
        }
        assert!(!c.fits(&rec(50_000, 0)));
    }

    #[test]
    fn a_damaged_chunk_ends_where_it_stops_decoding() {
        let mut out = Vec::new();
        encode_record(1, 0, b"ok", &mut out);
        out.extend_from_slice(&[0x01, 0x00, 0x7f]); // a body longer than what is left
        let got: Vec<_> = decode(10, 2, 0, &out).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, b"ok");
    }
}
