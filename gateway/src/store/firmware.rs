//! Firmware images and rollouts in the store (protocol version 3). The rollout logic
//! lives in memory (`crate::firmware::rollout`); this keeps what must survive a
//! restart: the images, each rollout's settings and state, each device's state in it.

use std::sync::Arc;

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, now_ms};
use crate::firmware::Image;

/// An image as listed (without its bytes).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FirmwareInfo {
    /// The store's id.
    pub id: i64,
    /// Its firmware version.
    pub version: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// When it was uploaded, ms since the epoch.
    pub created_ms: i64,
}

/// A rollout's row.
#[derive(Debug, Clone)]
pub struct RolloutRow {
    /// Its id (also the transfer id devices see).
    pub id: i64,
    /// The image's id.
    pub firmware: i64,
    /// `running`, `paused`, `cancelled`, `stopped`, `completed`.
    pub state: String,
    /// Share of devices that may fail before the rollout stops itself.
    pub failure_threshold: f64,
    /// Devices taking the image at once.
    pub max_in_flight: u32,
    /// Seconds a device may go without progress before it counts as failed.
    pub device_timeout_s: u32,
    /// When it was made.
    pub created_ms: i64,
    /// When its state last changed.
    pub updated_ms: i64,
    /// Why it stopped, if it did.
    pub reason: Option<String>,
    /// Its devices: (device, state, reason, updated).
    pub devices: Vec<(String, String, Option<String>, i64)>,
}

/// A change to persist, in the order it happened.
#[derive(Debug)]
pub enum RolloutWrite {
    /// A rollout's state.
    Rollout {
        /// Its id.
        id: i64,
        /// Its state.
        state: &'static str,
        /// Why, if it stopped.
        reason: Option<String>,
        /// When.
        at_ms: i64,
    },
    /// A device's state in a rollout.
    Device {
        /// The rollout.
        rollout: i64,
        /// The device.
        device: Arc<str>,
        /// Its state.
        state: &'static str,
        /// Why, if it failed.
        reason: Option<String>,
        /// When.
        at_ms: i64,
    },
}

impl Store {
    /// Stores an image; `Ok(None)` if an image of that version exists already.
    pub async fn add_firmware(
        &self,
        version: String,
        sha256: [u8; 32],
        signature: [u8; 64],
        bytes: Arc<[u8]>,
    ) -> Result<Option<Image>, StoreError> {
        let created_ms = now_ms();
        self.write(move |c| {
            let exists: Option<i64> = c
                .query_row(
                    "SELECT id FROM firmware WHERE version = ?1",
                    [&version],
                    |r| r.get(0),
                )
                .optional()?;
            if exists.is_some() {
                return Ok(None);
            }
            c.execute(
                "INSERT INTO firmware(version, sha256, signature, image, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![version, &sha256[..], &signature[..], &bytes[..], created_ms],
            )?;
            Ok(Some(Image {
                id: c.last_insert_rowid(),
                version,
                sha256,
                signature,
                bytes,
            }))
        })
        .await
    }

    /// Every image, newest first, without the bytes.
    pub async fn list_firmware(&self) -> Result<Vec<FirmwareInfo>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT id, version, length(image), sha256, created_ms FROM firmware
                 ORDER BY id DESC",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(FirmwareInfo {
                    id: r.get(0)?,
                    version: r.get(1)?,
                    size: r.get(2)?,
                    sha256: hex::encode(r.get::<_, Vec<u8>>(3)?),
                    created_ms: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// An image with its bytes, by id or version.
    pub async fn load_firmware(&self, key: FirmwareKey) -> Result<Option<Image>, StoreError> {
        self.read(move |c| {
            let (sql, arg) = match key {
                FirmwareKey::Id(id) => (
                    "SELECT id, version, sha256, signature, image FROM firmware WHERE id = ?1",
                    rusqlite::types::Value::Integer(id),
                ),
                FirmwareKey::Version(v) => (
                    "SELECT id, version, sha256, signature, image FROM firmware WHERE version = ?1",
                    rusqlite::types::Value::Text(v),
                ),
            };
            let row = c
                .query_row(sql, [arg], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                    ))
                })
                .optional()?;
            Ok(row.and_then(|(id, version, sha, sig, image)| {
                Some(Image {
                    id,
                    version,
                    sha256: sha.try_into().ok()?,
                    signature: sig.try_into().ok()?,
                    bytes: image.into(),
                })
            }))
        })
        .await
    }

    /// Records a new rollout of image `firmware` to `devices` (all `pending`); its id.
    pub async fn create_rollout(
        &self,
        firmware: i64,
        devices: Vec<String>,
        failure_threshold: f64,
        max_in_flight: u32,
        device_timeout_s: u32,
    ) -> Result<(i64, i64), StoreError> {
        let now = now_ms();
        self.write(move |c| {
            c.execute(
                "INSERT INTO rollouts(firmware, state, failure_threshold, max_in_flight,
                     device_timeout_s, created_ms, updated_ms)
                 VALUES (?1, 'running', ?2, ?3, ?4, ?5, ?5)",
                params![
                    firmware,
                    failure_threshold,
                    max_in_flight,
                    device_timeout_s,
                    now
                ],
            )?;
            let id = c.last_insert_rowid();
            let mut stmt = c.prepare_cached(
                "INSERT OR IGNORE INTO rollout_devices(rollout, device, state, updated_ms)
                 VALUES (?1, ?2, 'pending', ?3)",
            )?;
            for d in &devices {
                stmt.execute(params![id, d, now])?;
            }
            Ok((id, now))
        })
        .await
    }

    /// Persists rollout changes, in order, in one commit.
    pub async fn save_rollout_changes(&self, writes: Vec<RolloutWrite>) -> Result<(), StoreError> {
        self.write(move |c| {
            for w in writes {
                match w {
                    RolloutWrite::Rollout {
                        id,
                        state,
                        reason,
                        at_ms,
                    } => {
                        c.prepare_cached(
                            "UPDATE rollouts SET state = ?2, reason = ?3, updated_ms = ?4
                             WHERE id = ?1",
                        )?
                        .execute(params![id, state, reason, at_ms])?;
                    }
                    RolloutWrite::Device {
                        rollout,
                        device,
                        state,
                        reason,
                        at_ms,
                    } => {
                        c.prepare_cached(
                            "UPDATE rollout_devices SET state = ?3, reason = ?4, updated_ms = ?5
                             WHERE rollout = ?1 AND device = ?2",
                        )?
                        .execute(params![rollout, &*device, state, reason, at_ms])?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// Every rollout with its devices, oldest first (loaded at start).
    pub async fn load_rollouts(&self) -> Result<Vec<RolloutRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT id, firmware, state, failure_threshold, max_in_flight, created_ms,
                        updated_ms, reason, device_timeout_s FROM rollouts ORDER BY id",
            )?;
            let mut rows = stmt
                .query_map([], |r| {
                    Ok(RolloutRow {
                        id: r.get(0)?,
                        firmware: r.get(1)?,
                        state: r.get(2)?,
                        failure_threshold: r.get(3)?,
                        max_in_flight: r.get(4)?,
                        created_ms: r.get(5)?,
                        updated_ms: r.get(6)?,
                        reason: r.get(7)?,
                        device_timeout_s: r.get(8)?,
                        devices: Vec::new(),
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut dev = c.prepare(
                "SELECT device, state, reason, updated_ms FROM rollout_devices
                 WHERE rollout = ?1 ORDER BY device",
            )?;
            for row in &mut rows {
                row.devices = dev
                    .query_map([row.id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
            }
            Ok(rows)
        })
        .await
    }
}

/// How an image is named: by id or by version.
#[derive(Debug, Clone)]
pub enum FirmwareKey {
    /// The store's id.
    Id(i64),
    /// The firmware version.
    Version(String),
}
