//! Retention: deletes old telemetry by age and by count, never what a sink still
//! needs (unless it lets it go), and forgets the high-water marks of past boots.
//!
//! The store has one writer thread, and every telemetry commit, session open and
//! command goes through it. Retention may have millions of records to delete: run as
//! one op it would hold the writer for the whole deletion (minutes on a big store), and
//! every device's acks would stall behind it. So it deletes in steps of at most
//! [`STEP`] chunks (see [`chunk`](super::chunk)), each step an op of its own (its own
//! savepoint in a group commit), and sends the next step only once the last one has
//! committed: whatever queued meanwhile commits between two steps, and waits for one
//! step at most. It deletes whole chunks: a chunk goes when all of its records may.

use std::time::Duration;

use rusqlite::{Connection, params};

use super::writer::Writer;
use super::{Store, StoreError, now_ms};

/// Chunks deleted per writer op: small enough that one step costs a few ms to tens of
/// ms (what telemetry queued behind it waits at most), large enough that the commits
/// between steps cost little next to the deletion.
pub(super) const STEP: usize = 2000;

/// What one pass of retention deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Records deleted.
    pub deleted: u64,
    /// Of those, records a sink had not delivered (`drop_undelivered`).
    pub undelivered: u64,
}

/// Which chunks one step deletes.
#[derive(Clone, Copy)]
enum Step {
    /// From the front, in row order: chunks received before this time (ms).
    Older(i64),
    /// From the front, in row order: chunks whose records are all at or before this row.
    UpTo(i64),
}

/// What one step deleted.
struct Deleted {
    /// Chunks.
    chunks: u64,
    /// Records.
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
        // Per lossy sink, summed over the steps.
        let mut undelivered: Vec<u64> = Vec::new();
        let mut add = |d: &Deleted| {
            deleted += d.rows;
            undelivered.resize(d.undelivered.len(), 0);
            for (sum, n) in undelivered.iter_mut().zip(&d.undelivered) {
                *sum += n;
            }
        };
        if let Some(cutoff) = older_than_ms {
            // Rows follow arrival order: delete from the front, and stop at the first
            // step that is not entirely old enough. Records that arrive meanwhile are
            // new, so this ends.
            loop {
                let d = self
                    .write_with(move |w| delete_step(w, Step::Older(cutoff)))
                    .await?;
                add(&d);
                if d.chunks < STEP as u64 {
                    break;
                }
            }
        }
        if let Some(max) = max_rows {
            let max = i64::try_from(max).unwrap_or(i64::MAX);
            // The rows beyond the newest `max` when the first step runs: fixed then, so
            // records arriving meanwhile neither move it nor keep this going.
            let mut limit: Option<i64> = None;
            loop {
                let (d, l) = self
                    .write_with(move |w| {
                        let l = match limit {
                            Some(l) => l,
                            None => newest_row(&w.conn)?.saturating_sub(max),
                        };
                        Ok((delete_step(w, Step::UpTo(l))?, l))
                    })
                    .await?;
                limit = Some(l);
                add(&d);
                if d.chunks < STEP as u64 {
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

/// The newest row, 0 if there is no telemetry.
fn newest_row(c: &Connection) -> Result<i64, rusqlite::Error> {
    c.query_row(
        "SELECT coalesce((SELECT max(last_row) FROM chunks), 0)",
        [],
        |r| r.get(0),
    )
}

/// Deletes one step (at most [`STEP`] chunks from the front), keeping what the sinks
/// need as things are now: the running sinks may have moved and telemetry may have
/// arrived since the last step.
fn delete_step(w: &Writer, step: Step) -> Result<Deleted, StoreError> {
    let c = &w.conn;
    let newest = newest_row(c)?;
    // With a sink running (the MQTT bridge): never a record it has not delivered
    // (unless it lets them go), and never the newest chunk: the relayed stream keeps
    // a record to start from.
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
    let (sql, bound) = match step {
        Step::Older(cutoff) => (
            "DELETE FROM chunks WHERE last_row IN
              (SELECT last_row FROM chunks ORDER BY last_row LIMIT ?3)
              AND received_ms < ?1 AND last_row <= ?2
             RETURNING last_row, n",
            cutoff,
        ),
        Step::UpTo(limit) => (
            "DELETE FROM chunks WHERE last_row IN
              (SELECT last_row FROM chunks WHERE last_row <= ?1 AND last_row <= ?2
                ORDER BY last_row LIMIT ?3)
             RETURNING last_row, n",
            limit,
        ),
    };
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(params![bound, keep_from, STEP as i64], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
    })?;
    // Counted on the records this step deletes, against the cursors as they are now:
    // exact however the cursors move and telemetry arrives between steps.
    let mut deleted = Deleted {
        chunks: 0,
        rows: 0,
        undelivered: vec![0; lossy.len()],
    };
    for row in rows {
        let (last, n) = row?;
        let first = last - n + 1;
        deleted.chunks += 1;
        deleted.rows += n as u64;
        for (u, &cursor) in deleted.undelivered.iter_mut().zip(&lossy) {
            // Its records after the cursor.
            *u += (last - first.max(cursor + 1) + 1).max(0) as u64;
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
                  (SELECT received_ms FROM chunks ORDER BY last_row LIMIT 1),
                  9223372036854775807)
            AND boot_id IS NOT (SELECT boot_id FROM devices WHERE key = boots.device)",
        [],
    )?;
    Ok(())
}
