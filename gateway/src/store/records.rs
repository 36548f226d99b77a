//! What the store gives back: devices, telemetry records (decoded from the postcard
//! bytes only when read), and the queries that read them.

use device_client::proto::{self, Seq, Uplink};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value as Json;

use super::chunk::{self, SPAN_MS};
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
            let rows = rows.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(|r| with_latest(c, r)).collect()
        })
        .await
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!("{DEVICE_SELECT} WHERE d.id = ?1"))?;
            let row = stmt.query_row([id], device_from_row).optional()?;
            row.map(|r| with_latest(c, r)).transpose()
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

    /// Number of telemetry records of a device (all of them if `device` is `None`).
    pub async fn telemetry_count(&self, device: Option<&str>) -> Result<u64, StoreError> {
        let device = device.map(str::to_owned);
        self.read(move |c| {
            let n: i64 = match device {
                Some(d) => c.query_row(
                    "SELECT coalesce(sum(c.n), 0) FROM chunks c JOIN devices d ON d.key = c.device
                      WHERE d.id = ?1",
                    [d],
                    |r| r.get(0),
                )?,
                None => c.query_row("SELECT coalesce(sum(n), 0) FROM chunks", [], |r| r.get(0))?,
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

/// A device's chunks that may hold records from `?2 + SPAN_MS` to `?3` (inclusive),
/// by their first record's time: a range of the `(device, min_time)` index.
pub(super) const PAGE_OLDEST_FIRST: &str =
    "SELECT last_row, n, boot_id, min_time, max_time, received_ms, records FROM chunks
      WHERE device = ?1 AND min_time >= ?2 AND min_time <= ?3 ORDER BY min_time";
/// [`PAGE_OLDEST_FIRST`], newest first.
pub(super) const PAGE_NEWEST_FIRST: &str =
    "SELECT last_row, n, boot_id, min_time, max_time, received_ms, records FROM chunks
      WHERE device = ?1 AND min_time >= ?2 AND min_time <= ?3 ORDER BY min_time DESC";

/// One page of a device's telemetry (see [`Store::telemetry_page`]).
pub(super) fn telemetry_page(
    c: &Connection,
    device: &str,
    q: &TelemetryQuery,
) -> Result<Vec<(TelemetryCursor, TelemetryRecord)>, StoreError> {
    let key: Option<i64> = c
        .prepare_cached("SELECT key FROM devices WHERE id = ?1")?
        .query_row([device], |r| r.get(0))
        .optional()?;
    match key {
        Some(key) => page_of(c, key, device, q),
        None => Ok(Vec::new()),
    }
}

/// A record found by a page query, before the page is cut.
struct Found {
    cursor: TelemetryCursor,
    boot_id: u64,
    seq: Seq,
    received_ms: i64,
    body: Vec<u8>,
}

/// One page of the telemetry of the device with store key `key`, in (time, row)
/// order or its reverse.
///
/// Chunks are read in `min_time` order from the page's start (less [`SPAN_MS`]: a
/// chunk that starts that much earlier may reach into the page), each decoded and its
/// records in the page's bounds kept; the best `limit` are kept. Reading stops at the
/// first chunk that cannot hold a better one: oldest first, one that starts after the
/// page's last record; newest first, one that ends (at most [`SPAN_MS`] after its
/// start) before it. A deep page costs what the first does: it seeks to its cursor.
fn page_of(
    c: &Connection,
    key: i64,
    device: &str,
    q: &TelemetryQuery,
) -> Result<Vec<(TelemetryCursor, TelemetryRecord)>, StoreError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000) as usize;
    let since = q.since_ms.unwrap_or(i64::MIN);
    // `until` is exclusive; nothing is before i64::MIN.
    let Some(last) = q.until_ms.unwrap_or(i64::MAX).checked_sub(1) else {
        return Ok(Vec::new());
    };
    let oldest_first = q.oldest_first;
    // Records wanted: time in [low, high], and past the cursor.
    let (low, high, after) = if oldest_first {
        let after = q.after.unwrap_or(TelemetryCursor {
            time_ms: i64::MIN,
            row: i64::MIN,
        });
        (since.max(after.time_ms), last, after)
    } else {
        let after = q.after.unwrap_or(TelemetryCursor {
            time_ms: i64::MAX,
            row: i64::MAX,
        });
        (since, last.min(after.time_ms), after)
    };
    if low > high {
        return Ok(Vec::new());
    }
    let past_cursor = |cur: TelemetryCursor| {
        if oldest_first {
            (cur.time_ms, cur.row) > (after.time_ms, after.row)
        } else {
            (cur.time_ms, cur.row) < (after.time_ms, after.row)
        }
    };
    // The page's order: oldest first ascending, else descending (`!x` reverses the
    // order of i64s: it is `-x - 1`).
    let order = |f: &Found| {
        let (t, r) = (f.cursor.time_ms, f.cursor.row);
        if oldest_first { (t, r) } else { (!t, !r) }
    };
    let sql = if oldest_first {
        PAGE_OLDEST_FIRST
    } else {
        PAGE_NEWEST_FIRST
    };
    let mut stmt = c.prepare_cached(sql)?;
    let mut rows = stmt.query(params![key, low.saturating_sub(SPAN_MS), high])?;
    let mut found: Vec<Found> = Vec::new();
    while let Some(r) = rows.next()? {
        let (last_row, n, boot, min_time, max_time, received_ms): (i64, i64, i64, i64, i64, i64) = (
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        );
        // `found` is sorted and cut to `limit` once it reaches it.
        if let Some(edge) = found.get(limit - 1).map(|f| f.cursor.time_ms) {
            let done = if oldest_first {
                min_time > edge
            } else {
                min_time.saturating_add(SPAN_MS) < edge
            };
            if done {
                break;
            }
        }
        // A chunk wholly outside the page, or (the page being full) wholly beyond its
        // last record, is not decoded: a newest-first page reads up to 250 ms of
        // chunks before it may stop, and most of them end before its edge.
        let beyond = found
            .get(limit - 1)
            .is_some_and(|f| !oldest_first && max_time < f.cursor.time_ms);
        if max_time < low || beyond {
            continue;
        }
        let blob = r.get_ref(6)?.as_blob().map_err(rusqlite::Error::from)?;
        for rec in chunk::decode(last_row, n, min_time, blob) {
            let cursor = TelemetryCursor {
                time_ms: rec.time_ms,
                row: rec.row,
            };
            if rec.time_ms < low || rec.time_ms > high || !past_cursor(cursor) {
                continue;
            }
            found.push(Found {
                cursor,
                boot_id: boot as u64,
                seq: rec.seq,
                received_ms,
                body: rec.body.to_vec(),
            });
        }
        if found.len() >= limit {
            found.sort_by_key(order);
            found.truncate(limit);
        }
    }
    found.sort_by_key(order);
    found.truncate(limit);
    Ok(found
        .into_iter()
        .map(|f| {
            let rec = TelemetryRecord {
                device: device.to_owned(),
                boot_id: f.boot_id,
                seq: f.seq,
                time_ms: f.cursor.time_ms,
                received_ms: f.received_ms,
                values: body_to_json(&f.body),
            };
            (f.cursor, rec)
        })
        .collect())
}

/// A device row with its newest record (by device time; of equal times the last to
/// arrive): the first entry of a newest-first page.
fn with_latest(
    c: &Connection,
    (key, mut d): (i64, DeviceRecord),
) -> Result<DeviceRecord, StoreError> {
    let q = TelemetryQuery {
        limit: Some(1),
        ..TelemetryQuery::default()
    };
    d.latest = page_of(c, key, &d.id, &q)?.pop().map(|(_, r)| r);
    Ok(d)
}

const DEVICE_SELECT: &str = "SELECT d.id, d.online, d.first_seen_ms, d.last_seen_ms,
    d.cert_serial, d.cert_not_after, d.firmware, d.peer_addr, d.boot_id, d.connects, d.key
    FROM devices d";

/// A device row and its store key; `latest` is filled by [`with_latest`].
fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, DeviceRecord)> {
    Ok((
        r.get(10)?,
        DeviceRecord {
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
            latest: None,
            gateway: None,
        },
    ))
}
