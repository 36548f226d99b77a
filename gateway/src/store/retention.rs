//! Retention: deletes old telemetry by age and by count, never what a sink still
//! needs (unless it lets it go), and forgets the high-water marks of past boots.

use std::time::Duration;

use rusqlite::Connection;

use super::writer::Writer;
use super::{Store, StoreError, now_ms};

/// What one pass of retention deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Records deleted.
    pub deleted: u64,
    /// Of those, records a sink had not delivered (`drop_undelivered`).
    pub undelivered: u64,
}

impl Store {
    /// Deletes telemetry older than `max_age` and beyond `max_rows`; returns what it
    /// deleted.
    pub async fn apply_retention(
        &self,
        max_age: Option<Duration>,
        max_rows: Option<u64>,
    ) -> Result<Pruned, StoreError> {
        let older_than_ms =
            max_age.map(|a| now_ms() - i64::try_from(a.as_millis()).unwrap_or(i64::MAX / 2));
        self.write_with(move |w| retention(w, older_than_ms, max_rows))
            .await
    }
}

fn retention(
    w: &Writer,
    older_than_ms: Option<i64>,
    max_rows: Option<u64>,
) -> Result<Pruned, StoreError> {
    const CHUNK: usize = 5000;
    let c = &w.conn;
    let mut deleted = 0u64;
    // With a sink running (the MQTT bridge): never a record it has not delivered
    // (unless it lets them go), and never the newest record, since rowids must keep
    // growing or its cursor would skip the next ones.
    let mut keep_from = i64::MAX;
    let undelivered = |c: &Connection, sink: &str| -> Result<u64, rusqlite::Error> {
        c.query_row(
            "SELECT count(*) FROM telemetry
              WHERE rowid > coalesce((SELECT cursor FROM sinks WHERE name = ?1), 0)",
            [sink],
            |r| r.get(0),
        )
    };
    let mut lossy = Vec::new();
    for sink in &w.sinks {
        let k: i64 = if sink.drop_undelivered {
            lossy.push((sink.name, undelivered(c, sink.name)?));
            c.query_row(
                "SELECT coalesce((SELECT max(rowid) FROM telemetry), 0) - 1",
                [],
                |r| r.get(0),
            )?
        } else {
            c.query_row(
                "SELECT min(coalesce((SELECT cursor FROM sinks WHERE name = ?1), 0),
                            coalesce((SELECT max(rowid) FROM telemetry), 0) - 1)",
                [sink.name],
                |r| r.get(0),
            )?
        };
        keep_from = keep_from.min(k);
    }
    if let Some(cutoff) = older_than_ms {
        // Rowids follow arrival order: delete from the front in chunks, and stop at
        // the first chunk that is not entirely old enough.
        loop {
            let n = c.execute(
                "DELETE FROM telemetry WHERE rowid IN
                  (SELECT rowid FROM telemetry ORDER BY rowid LIMIT 5000)
                  AND received_ms < ?1 AND rowid <= ?2",
                [cutoff, keep_from],
            )?;
            deleted += n as u64;
            if n < CHUNK {
                break;
            }
        }
    }
    if let Some(max) = max_rows {
        let n = c.execute(
            "DELETE FROM telemetry
              WHERE rowid <= (SELECT max(rowid) FROM telemetry) - ?1 AND rowid <= ?2",
            [i64::try_from(max).unwrap_or(i64::MAX), keep_from],
        )?;
        deleted += n as u64;
    }
    if deleted > 0 {
        // High-water marks of past boots whose records are all gone (older than the
        // oldest record left). A device's current boot keeps its mark.
        c.execute(
            "DELETE FROM boots
              WHERE last_ms < coalesce(
                      (SELECT received_ms FROM telemetry ORDER BY rowid LIMIT 1),
                      9223372036854775807)
                AND boot_id IS NOT (SELECT boot_id FROM devices WHERE key = boots.device)",
            [],
        )?;
    }
    let mut pruned = Pruned {
        deleted,
        undelivered: 0,
    };
    for (sink, before) in lossy {
        let after = undelivered(c, sink)?;
        pruned.undelivered = pruned.undelivered.max(before.saturating_sub(after));
    }
    Ok(pruned)
}
