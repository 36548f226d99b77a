//! Northbound sinks (the MQTT bridge, the fleet): each has a cursor in the telemetry
//! table, the rowid of the last record it delivered, and reads what comes after it.

use rusqlite::{OptionalExtension, params};

use super::{SinkRecord, Store, StoreError};

impl Store {
    /// Changes after every commit that stored telemetry.
    pub fn watch_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// A sink's cursor; a new sink starts at the newest record (it relays what arrives
    /// from now on, not the history).
    pub async fn open_sink(&self, name: &str) -> Result<i64, StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO sinks(name, cursor)
                 VALUES (?1, (SELECT coalesce(max(rowid), 0) FROM telemetry))",
                [&name],
            )?;
            Ok(
                c.query_row("SELECT cursor FROM sinks WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
    }

    /// Moves a sink's cursor (committed with the next group).
    pub async fn set_sink_cursor(&self, name: &str, cursor: i64) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
                params![name, cursor],
            )?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` records after `cursor`, in commit order.
    pub async fn telemetry_after(
        &self,
        cursor: i64,
        limit: usize,
    ) -> Result<Vec<SinkRecord>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT t.rowid, d.id, t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
                   FROM telemetry t JOIN devices d ON d.key = t.device
                  WHERE t.rowid > ?1 ORDER BY t.rowid LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cursor, limit as i64], |r| {
                Ok(SinkRecord {
                    row: r.get(0)?,
                    device: r.get(1)?,
                    boot_id: r.get::<_, i64>(2)? as u64,
                    seq: r.get(3)?,
                    time_ms: r.get(4)?,
                    received_ms: r.get(5)?,
                    body: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Records after `cursor` (a sink's backlog), and the arrival time of the oldest.
    ///
    /// Counted as the span of rowids from the first row after the cursor to the last:
    /// two steps down the rowid B-tree, not a scan of the backlog (which `/metrics` would
    /// pay on every scrape). Rowids are given in commit order without gaps, and retention
    /// deletes from the front, so the span is the count.
    pub async fn backlog(&self, cursor: i64) -> Result<(u64, Option<i64>), StoreError> {
        self.read(move |c| {
            let first: Option<(i64, i64)> = c
                .query_row(
                    "SELECT rowid, received_ms FROM telemetry WHERE rowid > ?1
                      ORDER BY rowid LIMIT 1",
                    [cursor],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((first, oldest)) = first else {
                return Ok((0, None));
            };
            let last: i64 = c.query_row("SELECT max(rowid) FROM telemetry", [], |r| r.get(0))?;
            Ok((u64::try_from(last - first + 1).unwrap_or(0), Some(oldest)))
        })
        .await
    }
}
