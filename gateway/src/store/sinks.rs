//! Northbound sinks (the MQTT bridge, the fleet): each has a cursor in the telemetry,
//! the row of the last record it delivered, and reads what comes after it.

use rusqlite::{OptionalExtension, params};

use super::chunk;
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
                 VALUES (?1, (SELECT coalesce(max(last_row), 0) FROM chunks))",
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
            // The chunks that end after the cursor: the first may start before it.
            let mut stmt = c.prepare_cached(
                "SELECT c.last_row, c.n, d.id, c.boot_id, c.min_time, c.received_ms, c.records
                   FROM chunks c JOIN devices d ON d.key = c.device
                  WHERE c.last_row > ?1 ORDER BY c.last_row",
            )?;
            let mut rows = stmt.query([cursor])?;
            let mut out = Vec::new();
            while out.len() < limit
                && let Some(r) = rows.next()?
            {
                let (last_row, n, device, boot): (i64, i64, String, i64) =
                    (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
                let (min_time, received_ms): (i64, i64) = (r.get(4)?, r.get(5)?);
                let blob = r.get_ref(6)?.as_blob().map_err(rusqlite::Error::from)?;
                let room = limit - out.len();
                out.extend(
                    chunk::decode(last_row, n, min_time, blob)
                        .filter(|rec| rec.row > cursor)
                        .take(room)
                        .map(|rec| SinkRecord {
                            row: rec.row,
                            device: device.clone(),
                            boot_id: boot as u64,
                            seq: rec.seq,
                            time_ms: rec.time_ms,
                            received_ms,
                            body: rec.body.to_vec(),
                        }),
                );
            }
            Ok(out)
        })
        .await
    }

    /// Records after `cursor` (a sink's backlog), and the arrival time of the oldest.
    ///
    /// Counted as the span of rows from the first one after the cursor to the newest:
    /// two steps down the chunks' B-tree, not a scan of the backlog (which `/metrics`
    /// would pay on every scrape). Rows are given in commit order, and retention deletes
    /// from the front, so the span is the count (a device deleted with its records
    /// leaves a gap: then it counts more than there is, until the gap is delivered).
    pub async fn backlog(&self, cursor: i64) -> Result<(u64, Option<i64>), StoreError> {
        self.read(move |c| {
            let first: Option<(i64, i64)> = c
                .query_row(
                    "SELECT last_row - n + 1, received_ms FROM chunks WHERE last_row > ?1
                      ORDER BY last_row LIMIT 1",
                    [cursor],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((first, oldest)) = first else {
                return Ok((0, None));
            };
            let first = first.max(cursor + 1);
            let last: i64 = c.query_row("SELECT max(last_row) FROM chunks", [], |r| r.get(0))?;
            Ok((u64::try_from(last - first + 1).unwrap_or(0), Some(oldest)))
        })
        .await
    }
}
