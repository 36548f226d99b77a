//! Retention: deletes old telemetry by age and by count, never what a sink still
//! needs (unless it lets it go), and forgets the high-water marks of past boots.
//!
//! The store has one writer thread, and every telemetry commit, session open and
//! command goes through it. Retention may have millions of rows to delete: run as one
//! op it would hold the writer for the whole deletion (minutes on a big store), and
//! every device's acks would stall behind it. So it deletes in chunks of at most
//! [`CHUNK`] rows, each chunk an op of its own (its own savepoint in a group commit),
//! and sends the next chunk only once the last one has committed: whatever queued
//! meanwhile commits between two chunks, and waits for one chunk at most.

use std::time::Duration;

use rusqlite::{Connection, params};

use super::writer::Writer;
use super::{Store, StoreError, now_ms};

/// Rows deleted per writer op: small enough that one chunk costs a few ms to tens of
/// ms (what telemetry queued behind it waits at most), large enough that the commits
/// between chunks cost little next to the deletion.
pub(super) const CHUNK: usize = 5000;

/// What one pass of retention deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Records deleted.
    pub deleted: u64,
    /// Of those, records a sink had not delivered (`drop_undelivered`).
    pub undelivered: u64,
}

/// Which rows one chunk deletes.
#[derive(Clone, Copy)]
enum Chunk {
    /// From the front, in rowid order: rows received before this time (ms).
    Older(i64),
    /// From the front, in rowid order: rows up to this rowid.
    UpTo(i64),
}

/// What one chunk deleted.
struct Deleted {
    rows: u64,
    /// Per sink with `drop_undelivered` (in the order of `Writer::sinks`): of those
    /// rows, the ones after its cursor.
    undelivered: Vec<u64>,
}

impl Store {
    /// Deletes telemetry older than `max_age` and beyond `max_rows`; returns what it
    /// deleted.
    ///
    /// It deletes in chunks, one writer op each (see the module's documentation), so
    /// telemetry keeps committing meanwhile. Each chunk commits on its own: after an
    /// error (or if this future is dropped) the chunks before it stay deleted.
    pub async fn apply_retention(
        &self,
        max_age: Option<Duration>,
        max_rows: Option<u64>,
    ) -> Result<Pruned, StoreError> {
        let older_than_ms =
            max_age.map(|a| now_ms() - i64::try_from(a.as_millis()).unwrap_or(i64::MAX / 2));
        let mut deleted = 0u64;
        // Per lossy sink, summed over the chunks.
        let mut undelivered: Vec<u64> = Vec::new();
        let mut add = |d: &Deleted| {
            deleted += d.rows;
            undelivered.resize(d.undelivered.len(), 0);
            for (sum, n) in undelivered.iter_mut().zip(&d.undelivered) {
                *sum += n;
            }
        };
        if let Some(cutoff) = older_than_ms {
            // Rowids follow arrival order: delete from the front, and stop at the first
            // chunk that is not entirely old enough. Records that arrive meanwhile are
            // new, so this ends.
            loop {
                let d = self
                    .write_with(move |w| delete_chunk(w, Chunk::Older(cutoff)))
                    .await?;
                add(&d);
                if d.rows < CHUNK as u64 {
                    break;
                }
            }
        }
        if let Some(max) = max_rows {
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            // The rows beyond the newest `max` when the first chunk runs: fixed then, so
            // records arriving meanwhile neither move it nor keep this going.
            let mut limit: Option<i64> = None;
            loop {
                let (d, l) = self
                    .write_with(move |w| {
                        let l = match limit {
                            Some(l) => l,
                            None => newest_row(&w.conn)?.saturating_sub(max),
                        };
                        Ok((delete_chunk(w, Chunk::UpTo(l))?, l))
                    })
                    .await?;
                limit = Some(l);
                add(&d);
                if d.rows < CHUNK as u64 {
                    break;
                }
            }
        }
        if deleted > 0 {
            self.write(forget_past_boots).await?;
        }
        Ok(Pruned {
            deleted,
            undelivered: undelivered.into_iter().max().unwrap_or(0),
        })
    }
}

/// The newest rowid, 0 if there is no telemetry.
fn newest_row(c: &Connection) -> Result<i64, rusqlite::Error> {
    c.query_row(
        "SELECT coalesce((SELECT max(rowid) FROM telemetry), 0)",
        [],
        |r| r.get(0),
    )
}

/// Deletes one chunk (at most [`CHUNK`] rows from the front), keeping what the sinks
/// need as things are now: the running sinks may have moved and telemetry may have
/// arrived since the last chunk.
fn delete_chunk(w: &Writer, chunk: Chunk) -> Result<Deleted, StoreError> {
    let c = &w.conn;
    let newest = newest_row(c)?;
    // With a sink running (the MQTT bridge): never a record it has not delivered
    // (unless it lets them go), and never the newest record, since rowids must keep
    // growing or its cursor would skip the next ones.
    let mut keep_from = i64::MAX;
    // Cursors of the sinks that let undelivered records go, to count those.
    let mut lossy = Vec::new();
    for sink in &w.sinks {
        let cursor: i64 = c.query_row(
            "SELECT coalesce((SELECT cursor FROM sinks WHERE name = ?1), 0)",
            [sink.name],
            |r| r.get(0),
        )?;
        let k = if sink.drop_undelivered {
            lossy.push(cursor);
            newest - 1
        } else {
            cursor.min(newest - 1)
        };
        keep_from = keep_from.min(k);
    }
    let (sql, bound) = match chunk {
        Chunk::Older(cutoff) => (
            "DELETE FROM telemetry WHERE rowid IN
              (SELECT rowid FROM telemetry ORDER BY rowid LIMIT ?3)
              AND received_ms < ?1 AND rowid <= ?2
             RETURNING rowid",
            cutoff,
        ),
        Chunk::UpTo(limit) => (
            "DELETE FROM telemetry WHERE rowid IN
              (SELECT rowid FROM telemetry WHERE rowid <= ?1 AND rowid <= ?2
                ORDER BY rowid LIMIT ?3)
             RETURNING rowid",
            limit,
        ),
    };
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(params![bound, keep_from, CHUNK as i64], |r| {
        r.get::<_, i64>(0)
    })?;
    // Counted on the rows this chunk deletes, against the cursors as they are now:
    // exact however the cursors move and telemetry arrives between chunks.
    let mut deleted = Deleted {
        rows: 0,
        undelivered: vec![0; lossy.len()],
    };
    for row in rows {
        let row = row?;
        deleted.rows += 1;
        for (n, &cursor) in deleted.undelivered.iter_mut().zip(&lossy) {
            if row > cursor {
                *n += 1;
            }
        }
    }
    Ok(deleted)
}

/// Forgets the high-water marks of past boots whose records are all gone (older than
/// the oldest record left). A device's current boot keeps its mark.
fn forget_past_boots(c: &Connection) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM boots
          WHERE last_ms < coalesce(
                  (SELECT received_ms FROM telemetry ORDER BY rowid LIMIT 1),
                  9223372036854775807)
            AND boot_id IS NOT (SELECT boot_id FROM devices WHERE key = boots.device)",
        [],
    )?;
    Ok(())
}
