//! The device state document in the store (protocol version 2): one row per device in
//! `device_state` with the desired document (`crate::state::DesiredDoc` as JSON) and
//! what the device last reported.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::{Map, Value as Json};

use super::commands::device_key;
use super::{Store, StoreError, now_ms};
use crate::state::{Delta, DesiredDoc, StateError};

/// Most reported values kept per device: a device that reports ever new names keeps
/// the first ones (their values still change); the rest are dropped.
pub const MAX_REPORTED: usize = 64;

/// The outcome of a change of the desired state.
#[derive(Debug)]
pub enum PutDesired {
    /// Applied (or nothing changed): the document now.
    Done {
        /// The device's key.
        device_key: i64,
        /// Whether the version grew.
        changed: bool,
        /// The document after the change.
        doc: DesiredDoc,
    },
    /// The caller expected another version: nothing changed.
    Conflict {
        /// The version now.
        version: u32,
    },
    /// The change breaks the protocol's bounds: nothing changed.
    Invalid(StateError),
}

/// A device's state as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StateView {
    /// Device id.
    pub device: String,
    /// Desired settings.
    pub desired: Map<String, Json>,
    /// Version of the desired settings (0: never set).
    pub desired_version: u32,
    /// Values the device reported.
    pub reported: Map<String, Json>,
    /// The desired version the device last said it applied (`None`: it never reported).
    pub reported_version: Option<u32>,
    /// When it last reported, ms since the epoch.
    pub reported_ms: Option<i64>,
    /// How long ago that was, in milliseconds.
    pub reported_age_ms: Option<i64>,
    /// Whether the device reported applying the current desired version.
    pub in_sync: bool,
}

/// What a device's row says, kept in memory: the desired version, and the desired
/// version it last reported (`None`: it never reported).
#[derive(Debug, Default)]
pub(super) struct Versions(Mutex<HashMap<i64, (u32, Option<u32>)>>);

impl Versions {
    /// The versions of every row.
    pub(super) fn load(conn: &Connection) -> Result<Self, StoreError> {
        let mut stmt =
            conn.prepare("SELECT device, desired, reported_version FROM device_state")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<u32>>(2)?,
            ))
        })?;
        let mut map = HashMap::new();
        for row in rows {
            let (key, desired, reported) = row?;
            map.insert(
                key,
                (
                    DesiredDoc::from_stored(desired.as_deref()).version,
                    reported,
                ),
            );
        }
        Ok(Self(Mutex::new(map)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (u32, Option<u32>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    /// Forgets what memory holds of a deleted device's state document.
    pub(super) fn forget_state_versions(&self, device_key: i64) {
        self.state_versions.lock().remove(&device_key);
    }

    /// The desired version of a device, from memory (0: none).
    pub fn desired_version(&self, device_key: i64) -> u32 {
        self.state_versions
            .lock()
            .get(&device_key)
            .map_or(0, |v| v.0)
    }

    /// Whether a report is worth recording: it has values, or says the device holds
    /// another desired version than it last said (a device that never reported holds
    /// 0). Counts it as recorded when it is.
    pub fn report_changes_state(
        &self,
        device_key: i64,
        desired_version: u32,
        has_values: bool,
    ) -> bool {
        let mut map = self.state_versions.lock();
        let known = map.get(&device_key).and_then(|v| v.1).unwrap_or(0);
        if !has_values && known == desired_version {
            // Nothing to record, and no entry made: a fleet of devices that never had
            // a desired state costs no memory here.
            return false;
        }
        map.entry(device_key).or_default().1 = Some(desired_version);
        true
    }

    /// Merges `patch` into a device's desired settings (making the device known if it
    /// was not), if its version is `expect` (when given).
    pub async fn put_desired(
        &self,
        device: &str,
        patch: Json,
        expect: Option<u32>,
    ) -> Result<PutDesired, StoreError> {
        let device = device.to_owned();
        let out = self
            .write_with(move |w| {
                let key = device_key(w, &device)?;
                let stored: Option<String> = w
                    .conn
                    .query_row(
                        "SELECT desired FROM device_state WHERE device = ?1",
                        [key],
                        |r| r.get(0),
                    )
                    .optional()?
                    .flatten();
                let mut doc = DesiredDoc::from_stored(stored.as_deref());
                if let Some(v) = expect
                    && v != doc.version
                {
                    return Ok(PutDesired::Conflict {
                        version: doc.version,
                    });
                }
                let changed = match doc.apply(&patch) {
                    Ok(c) => c,
                    Err(e) => return Ok(PutDesired::Invalid(e)),
                };
                if changed {
                    w.conn
                        .prepare_cached(
                            "INSERT INTO device_state(device, desired) VALUES (?1, ?2)
                         ON CONFLICT(device) DO UPDATE SET desired = excluded.desired",
                        )?
                        .execute(params![key, doc.to_json()])?;
                }
                Ok(PutDesired::Done {
                    device_key: key,
                    changed,
                    doc,
                })
            })
            .await?;
        if let PutDesired::Done {
            device_key, doc, ..
        } = &out
        {
            self.state_versions.lock().entry(*device_key).or_default().0 = doc.version;
        }
        Ok(out)
    }

    /// What a device holding desired version `base` needs, if anything.
    pub async fn desired_since(
        &self,
        device_key: i64,
        base: u32,
    ) -> Result<Option<Delta>, StoreError> {
        self.read(move |c| {
            let stored: Option<String> = c
                .prepare_cached("SELECT desired FROM device_state WHERE device = ?1")?
                .query_row([device_key], |r| r.get(0))
                .optional()?
                .flatten();
            Ok(DesiredDoc::from_stored(stored.as_deref()).changes_since(base))
        })
        .await
    }

    /// Records a device's report: its values merged into the reported ones, and the
    /// desired version it holds. Committed with the next group, without an fsync of its
    /// own: a report lost in a crash is sent again on the device's next session.
    pub async fn record_reported(
        &self,
        device_key: i64,
        desired_version: u32,
        values: Map<String, Json>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        self.write_op(false, move |w| {
            let stored: Option<String> = w
                .conn
                .prepare_cached("SELECT reported FROM device_state WHERE device = ?1")?
                .query_row([device_key], |r| r.get(0))
                .optional()?
                .flatten();
            let mut reported: Map<String, Json> = stored
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            let mut dropped = 0usize;
            for (name, value) in values {
                if reported.len() < MAX_REPORTED || reported.contains_key(&name) {
                    reported.insert(name, value);
                } else {
                    dropped += 1;
                }
            }
            if dropped > 0 {
                // Debug, not warn: a device could cause one at every report.
                tracing::debug!(
                    device_key,
                    dropped,
                    "reported values over {MAX_REPORTED} names: the new names are not kept"
                );
            }
            w.conn
                .prepare_cached(
                    "INSERT INTO device_state(device, reported, reported_version, reported_ms)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(device) DO UPDATE SET reported = excluded.reported,
                        reported_version = excluded.reported_version,
                        reported_ms = excluded.reported_ms",
                )?
                .execute(params![
                    device_key,
                    Json::Object(reported).to_string(),
                    desired_version,
                    now
                ])?;
            Ok(())
        })
        .await
    }

    /// A device's state; `None` if the device is unknown.
    pub async fn device_state(&self, device: &str) -> Result<Option<StateView>, StoreError> {
        let device = device.to_owned();
        self.read(move |c| {
            let row = c
                .prepare_cached(
                    "SELECT s.desired, s.reported, s.reported_version, s.reported_ms
                     FROM devices d LEFT JOIN device_state s ON s.device = d.key
                     WHERE d.id = ?1",
                )?
                .query_row([&device], |r| {
                    Ok((
                        r.get::<_, Option<String>>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<u32>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                })
                .optional()?;
            Ok(
                row.map(|(desired, reported, reported_version, reported_ms)| {
                    let doc = DesiredDoc::from_stored(desired.as_deref());
                    StateView {
                        desired: doc.values(),
                        desired_version: doc.version,
                        reported: reported
                            .and_then(|t| serde_json::from_str(&t).ok())
                            .unwrap_or_default(),
                        reported_version,
                        reported_ms,
                        reported_age_ms: reported_ms.map(|t| (now_ms() - t).max(0)),
                        in_sync: reported_version.unwrap_or(0) == doc.version,
                        device,
                    }
                }),
            )
        })
        .await
    }
}
