//! What the store gives back: devices, telemetry records (decoded from the postcard
//! bytes only when read), and the queries that read them.

use device_client::proto::{self, Seq, Uplink};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value as Json;

use super::{Store, StoreError};
use crate::values;

/// A device as the store knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRecord {
    /// Device id (certificate CN).
    pub id: String,
    /// Whether a session is open now.
    pub online: bool,
    /// First connection, ms since the epoch.
    pub first_seen_ms: Option<i64>,
    /// Last connection or disconnection, ms since the epoch.
    pub last_seen_ms: Option<i64>,
    /// Serial of the certificate it last connected with (hex).
    pub cert_serial: Option<String>,
    /// Expiry of that certificate, seconds since the epoch.
    pub cert_not_after: Option<i64>,
    /// Firmware version from its last `Hello`.
    pub firmware: Option<String>,
    /// Peer address of its last connection.
    pub peer_addr: Option<String>,
    /// Boot id of its last session (a string in JSON: JavaScript numbers lose precision
    /// above 2^53).
    #[serde(serialize_with = "crate::values::opt_u64_as_string")]
    pub boot_id: Option<u64>,
    /// Number of sessions so far.
    pub connects: i64,
    /// Its newest stored record (by device time; of equal times the last to arrive),
    /// if any.
    pub latest: Option<TelemetryRecord>,
    /// In a fleet: the gateway that holds it (its last session).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// One stored telemetry record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryRecord {
    /// Device id.
    pub device: String,
    /// Boot id (a string in JSON).
    #[serde(serialize_with = "crate::values::u64_as_string")]
    pub boot_id: u64,
    /// Sequence number.
    pub seq: Seq,
    /// Device time (or arrival time), ms since the epoch.
    pub time_ms: i64,
    /// Arrival time, ms since the epoch.
    pub received_ms: i64,
    /// The readings as a JSON object.
    pub values: serde_json::Map<String, Json>,
}

/// Filter for a telemetry query.
#[derive(Debug, Clone, Default)]
pub struct TelemetryQuery {
    /// Only records at or after this time (ms).
    pub since_ms: Option<i64>,
    /// Only records before this time (ms).
    pub until_ms: Option<i64>,
    /// At most this many; default 100, capped at 10,000.
    pub limit: Option<u32>,
    /// Continue after this record (the last one of the previous page).
    pub after: Option<TelemetryCursor>,
    /// Oldest first instead of newest first.
    pub oldest_first: bool,
}

/// Where a page of telemetry ends: a record's device time and its row (arrival order
/// among equal times). Shown to API clients as the opaque string `TIME_ROW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryCursor {
    /// The record's `time_ms`.
    pub time_ms: i64,
    /// Its row id.
    pub row: i64,
}

impl TelemetryCursor {
    /// Parses the API's form, `TIME_ROW`.
    pub fn parse(s: &str) -> Option<Self> {
        let (t, r) = s.split_once('_')?;
        Some(Self {
            time_ms: t.parse().ok()?,
            row: r.parse().ok()?,
        })
    }
}

impl std::fmt::Display for TelemetryCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.time_ms, self.row)
    }
}

/// A stored record as a sink relays it: the raw body and where it is in commit order.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRecord {
    /// Its row (commit order).
    pub row: i64,
    /// Device id.
    pub device: String,
    /// Boot id.
    pub boot_id: u64,
    /// Sequence number.
    pub seq: Seq,
    /// Device time (or arrival time), ms since the epoch.
    pub time_ms: i64,
    /// Arrival time, ms since the epoch.
    pub received_ms: i64,
    /// The `Telemetry` message as the device sent it (postcard).
    pub body: Vec<u8>,
}

/// A refused TLS handshake, as kept across restarts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusalRecord {
    /// When, ms since the epoch.
    pub time_ms: i64,
    /// Peer address.
    pub peer: String,
    /// Why (a `Refusal` name).
    pub reason: String,
    /// The subject of the certificate the peer presented, if it presented one.
    pub subject: Option<String>,
    /// Its serial (hex).
    pub serial: Option<String>,
}

impl Store {
    /// Up to `limit` devices with ids after `after`, by id.
    pub async fn devices_page(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "{DEVICE_SELECT} WHERE d.id > ?1 ORDER BY d.id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(
                params![after.unwrap_or_default(), i64::from(limit)],
                device_from_row,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!("{DEVICE_SELECT} WHERE d.id = ?1"))?;
            Ok(stmt.query_row([id], device_from_row).optional()?)
        })
        .await
    }

    /// A device's telemetry, newest first (or oldest first), a page at a time.
    pub async fn telemetry(
        &self,
        device: &str,
        q: TelemetryQuery,
    ) -> Result<Vec<TelemetryRecord>, StoreError> {
        Ok(self
            .telemetry_page(device, q)
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// [`telemetry`](Self::telemetry) with each record's cursor.
    pub async fn telemetry_page(
        &self,
        device: &str,
        q: TelemetryQuery,
    ) -> Result<Vec<(TelemetryCursor, TelemetryRecord)>, StoreError> {
        let device = device.to_owned();
        self.read(move |c| telemetry_page(c, &device, &q)).await
    }

    /// Number of telemetry rows of a device (all of them if `device` is `None`).
    pub async fn telemetry_count(&self, device: Option<&str>) -> Result<u64, StoreError> {
        let device = device.map(str::to_owned);
        self.read(move |c| {
            let n: i64 = match device {
                Some(d) => c.query_row(
                    "SELECT count(*) FROM telemetry t JOIN devices d ON d.key = t.device
                      WHERE d.id = ?1",
                    [d],
                    |r| r.get(0),
                )?,
                None => c.query_row("SELECT count(*) FROM telemetry", [], |r| r.get(0))?,
            };
            Ok(n as u64)
        })
        .await
    }

    /// Devices whose last certificate expires before each of `deadlines` (seconds
    /// since the epoch), in the same order.
    pub async fn certs_expiring_before(&self, deadlines: Vec<i64>) -> Result<Vec<u64>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT count(*) FROM devices WHERE cert_not_after IS NOT NULL AND cert_not_after < ?1",
            )?;
            deadlines
                .iter()
                .map(|d| Ok(stmt.query_row([d], |r| r.get::<_, i64>(0))? as u64))
                .collect()
        })
        .await
    }
}

/// Decodes a stored telemetry body into a JSON object of readings. Bodies were
/// validated when they arrived; an undecodable one (a corrupted file) reads as empty.
pub fn body_to_json(body: &[u8]) -> serde_json::Map<String, Json> {
    match proto::decode_uplink(body) {
        Ok(Uplink::Telemetry(t)) => values::readings_to_json(&t.readings),
        _ => serde_json::Map::new(),
    }
}

/// Devices with their newest record: one step down the `(device, time_ms)` index per
/// device (the last entry; equal times are in arrival order).
/// Keyset paging on (time_ms, rowid), which the (device, time_ms) index serves in
/// either direction. One bound a side: SQLite ranges an index scan by one lower and one
/// upper bound of a column, so `since`/`until` and the cursor are folded into one bound
/// before the query. Given both, it seeks to `since` and filters its way to the cursor,
/// and every page costs what all the pages before it did (an hour's export at 100 M
/// records took a minute).
pub(super) const PAGE_OLDEST_FIRST: &str =
    "SELECT t.rowid, t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
       FROM telemetry t JOIN devices d ON d.key = t.device
      WHERE d.id = ?1 AND t.time_ms >= ?2 AND t.time_ms < ?3
        AND (t.time_ms > ?4 OR t.rowid > ?5)
      ORDER BY t.time_ms, t.rowid LIMIT ?6";
/// Newest first: `?3` is an inclusive upper bound here (see [`PAGE_OLDEST_FIRST`]).
pub(super) const PAGE_NEWEST_FIRST: &str =
    "SELECT t.rowid, t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
       FROM telemetry t JOIN devices d ON d.key = t.device
      WHERE d.id = ?1 AND t.time_ms >= ?2 AND t.time_ms <= ?3
        AND (t.time_ms < ?4 OR t.rowid < ?5)
      ORDER BY t.time_ms DESC, t.rowid DESC LIMIT ?6";

/// One page of a device's telemetry (see [`Store::telemetry_page`]).
pub(super) fn telemetry_page(
    c: &Connection,
    device: &str,
    q: &TelemetryQuery,
) -> Result<Vec<(TelemetryCursor, TelemetryRecord)>, StoreError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let (since, until) = (
        q.since_ms.unwrap_or(i64::MIN),
        q.until_ms.unwrap_or(i64::MAX),
    );
    let (sql, low, high, after) = if q.oldest_first {
        let after = q.after.unwrap_or(TelemetryCursor {
            time_ms: i64::MIN,
            row: i64::MIN,
        });
        // Records at the cursor's time may still follow it (a larger rowid).
        (PAGE_OLDEST_FIRST, since.max(after.time_ms), until, after)
    } else {
        let after = q.after.unwrap_or(TelemetryCursor {
            time_ms: i64::MAX,
            row: i64::MAX,
        });
        // `until` is exclusive; nothing is before i64::MIN.
        let Some(last) = until.checked_sub(1) else {
            return Ok(Vec::new());
        };
        (PAGE_NEWEST_FIRST, since, last.min(after.time_ms), after)
    };
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(
        params![device, low, high, after.time_ms, after.row, limit],
        |row| {
            let rec = telemetry_from_row(row, 1, device.to_owned())?;
            let cursor = TelemetryCursor {
                time_ms: rec.time_ms,
                row: row.get(0)?,
            };
            Ok((cursor, rec))
        },
    )?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

const DEVICE_SELECT: &str = "SELECT d.id, d.online, d.first_seen_ms, d.last_seen_ms,
    d.cert_serial, d.cert_not_after, d.firmware, d.peer_addr, d.boot_id, d.connects,
    t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
    FROM devices d LEFT JOIN telemetry t ON t.rowid =
      (SELECT rowid FROM telemetry WHERE device = d.key ORDER BY time_ms DESC LIMIT 1)";

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: r.get(0)?,
        online: r.get::<_, i64>(1)? != 0,
        first_seen_ms: r.get(2)?,
        last_seen_ms: r.get(3)?,
        cert_serial: r.get(4)?,
        cert_not_after: r.get(5)?,
        firmware: r.get(6)?,
        peer_addr: r.get(7)?,
        boot_id: r.get::<_, Option<i64>>(8)?.map(|b| b as u64),
        connects: r.get(9)?,
        // The LEFT JOIN gives NULLs for a device without telemetry.
        latest: match r.get_ref(14)? {
            rusqlite::types::ValueRef::Null => None,
            _ => Some(telemetry_from_row(r, 10, r.get(0)?)?),
        },
        gateway: None,
    })
}

/// A telemetry record from the columns `boot_id, seq, time_ms, received_ms, body`
/// starting at `at`.
fn telemetry_from_row(
    r: &rusqlite::Row<'_>,
    at: usize,
    device: String,
) -> rusqlite::Result<TelemetryRecord> {
    let body: Vec<u8> = r.get(at + 4)?;
    Ok(TelemetryRecord {
        device,
        boot_id: r.get::<_, i64>(at)? as u64,
        seq: r.get(at + 1)?,
        time_ms: r.get(at + 2)?,
        received_ms: r.get(at + 3)?,
        values: body_to_json(&body),
    })
}
