//! Rollouts of a firmware image to devices, without I/O: who is offered the image
//! when, what each device's progress is, when a rollout stops itself. The caller
//! ([`super::Service`]) persists the writes, publishes the events and wakes the
//! sessions each call returns in [`Effects`].
//!
//! ```text
//!            create ─► pending ──(slot free, device online)──► offered
//!                                                                 │ first chunk sent
//!                                                                 ▼
//!   FirmwareStatus{Verified} ◄──────────────────────────────── downloading
//!            │                      FirmwareStatus{failure} ──► failed ─► threshold?
//!            ▼                                                              │ yes
//!         verified ─► next Hello with the version ─► installed     stopped: offered and
//!                   └► next Hello with another one ─► failed        pending ─► cancelled
//! ```
//!
//! At most `max_in_flight` devices are offered, downloading or verified (waiting for
//! their restart) at once; a device is in one unfinished rollout at a time. A rollout
//! stops itself when more than `failure_threshold` (a share) of its devices failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use device_client::proto::FirmwareOutcome;
use serde::Serialize;

use super::Image;
use crate::events::Event;
use crate::store::{RolloutRow, RolloutWrite};

/// A rollout's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Offering the image as slots free up.
    Running,
    /// No new offers; transfers under way go on.
    Paused,
    /// Cancelled by the operator: transfers under way were withdrawn.
    Cancelled,
    /// Stopped itself: too many devices failed.
    Stopped,
    /// Every device installed the image or failed.
    Completed,
}

impl RolloutState {
    /// Its name in the API and the store.
    pub const fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Cancelled => "cancelled",
            RolloutState::Stopped => "stopped",
            RolloutState::Completed => "completed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RolloutState::Running,
            "paused" => RolloutState::Paused,
            "cancelled" => RolloutState::Cancelled,
            "stopped" => RolloutState::Stopped,
            "completed" => RolloutState::Completed,
            _ => return None,
        })
    }

    /// Whether nothing more will be offered.
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Cancelled | RolloutState::Stopped | RolloutState::Completed
        )
    }
}

/// A device's state in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Waiting for a slot (and for the device to be online).
    Pending,
    /// The offer was made (or will be at its next session).
    Offered,
    /// Chunks are going out.
    Downloading,
    /// The device verified the image and restarts into it.
    Verified,
    /// The device came back running the image.
    Installed,
    /// The transfer or the restart failed (see the reason).
    Failed,
    /// Withdrawn before the device verified it.
    Cancelled,
}

impl DeviceState {
    /// Its name in the API and the store.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Offered => "offered",
            DeviceState::Downloading => "downloading",
            DeviceState::Verified => "verified",
            DeviceState::Installed => "installed",
            DeviceState::Failed => "failed",
            DeviceState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => DeviceState::Pending,
            "offered" => DeviceState::Offered,
            "downloading" => DeviceState::Downloading,
            "verified" => DeviceState::Verified,
            "installed" => DeviceState::Installed,
            "failed" => DeviceState::Failed,
            "cancelled" => DeviceState::Cancelled,
            _ => return None,
        })
    }

    /// Whether the device is done with the rollout.
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            DeviceState::Installed | DeviceState::Failed | DeviceState::Cancelled
        )
    }

    /// Whether the device holds one of the rollout's slots.
    const fn in_flight(self) -> bool {
        matches!(
            self,
            DeviceState::Offered | DeviceState::Downloading | DeviceState::Verified
        )
    }
}

/// The image a rollout sends, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// The store's id.
    pub id: i64,
    /// Its firmware version.
    pub version: String,
    /// Bytes.
    pub size: u32,
    /// SHA-256, hex.
    pub sha256: String,
}

impl ImageInfo {
    /// What the API shows of `image`.
    pub fn of(image: &Image) -> Self {
        Self {
            id: image.id,
            version: image.version.clone(),
            size: image.size(),
            sha256: hex::encode(image.sha256),
        }
    }
}

/// How a rollout proceeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// It stops when more than this share of its devices failed.
    pub failure_threshold: f64,
    /// Devices offered, downloading or verified (restarting) at once.
    pub max_in_flight: usize,
    /// A device that makes no progress for this long (no chunk asked for, no status,
    /// no restart with the image) counts as failed, and frees its slot.
    pub device_timeout_s: u32,
}

impl Settings {
    /// The default deadline of a device: an hour without progress.
    pub const DEFAULT_DEVICE_TIMEOUT_S: u32 = 3600;

    /// A threshold and a number at once, with the default deadline.
    pub fn new(failure_threshold: f64, max_in_flight: usize) -> Self {
        Self {
            failure_threshold,
            max_in_flight,
            device_timeout_s: Self::DEFAULT_DEVICE_TIMEOUT_S,
        }
    }

    fn timeout_ms(&self) -> i64 {
        i64::from(self.device_timeout_s) * 1000
    }
}

#[derive(Debug, Clone)]
struct Entry {
    state: DeviceState,
    /// Bytes sent to it (in memory only).
    received: u32,
    reason: Option<String>,
    updated_ms: i64,
    /// Its last sign of life in this rollout: a state change or a chunk sent.
    progress_ms: i64,
}

#[derive(Debug)]
struct Rollout {
    id: i64,
    info: ImageInfo,
    /// The bytes, while devices may still ask for them.
    image: Option<Arc<Image>>,
    state: RolloutState,
    settings: Settings,
    created_ms: i64,
    updated_ms: i64,
    reason: Option<String>,
    devices: BTreeMap<Arc<str>, Entry>,
}

impl Rollout {
    fn count(&self, s: DeviceState) -> usize {
        self.devices.values().filter(|e| e.state == s).count()
    }

    fn in_flight(&self) -> usize {
        self.devices
            .values()
            .filter(|e| e.state.in_flight())
            .count()
    }

    /// Whether more than the threshold's share of its devices failed (0: any failure
    /// stops it; 1: none does).
    fn over_threshold(&self, failed: usize) -> bool {
        failed as f64 > self.settings.failure_threshold * self.devices.len() as f64
    }

    /// The transfer id devices see: the rollout's id (ids stay far below 2³²).
    fn wire_id(&self) -> u32 {
        u32::try_from(self.id).unwrap_or(u32::MAX)
    }
}

/// Why a device of an older protocol version fails a rollout.
fn too_old(version: u8) -> String {
    format!("the device speaks protocol version {version}: firmware transfer needs 3")
}

/// What a call asks the caller to do.
#[derive(Debug, Default)]
pub struct Effects {
    /// To persist, in order.
    pub writes: Vec<RolloutWrite>,
    /// To publish.
    pub events: Vec<Event>,
    /// Devices whose sessions should look at [`Rollouts::wanted`] again.
    pub wake: Vec<Arc<str>>,
}

/// Why a rollout could not be made or changed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RolloutError {
    /// No rollout with that id.
    #[error("no rollout with id {0}")]
    NoSuchRollout(i64),
    /// These devices are in another unfinished rollout.
    #[error("devices already in an unfinished rollout: {}", .0.join(", "))]
    Busy(Vec<String>),
    /// The rollout is over; it cannot change any more.
    #[error("rollout {id} is {state} and cannot change any more")]
    Finished {
        /// Its id.
        id: i64,
        /// Its state.
        state: &'static str,
    },
}

/// A rollout as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    /// Its id.
    pub id: i64,
    /// The image.
    pub firmware: ImageInfo,
    /// Its state.
    pub state: RolloutState,
    /// Why it stopped or was cancelled, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Share of devices that may fail before it stops itself.
    pub failure_threshold: f64,
    /// Devices taking the image at once.
    pub max_in_flight: usize,
    /// Seconds a device may go without progress before it counts as failed.
    pub device_timeout_s: u32,
    /// When it was made, ms since the epoch.
    pub created_ms: i64,
    /// When its state last changed.
    pub updated_ms: i64,
    /// Devices per state.
    pub counts: BTreeMap<&'static str, usize>,
    /// Each device's progress (left out of lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceProgress>>,
}

/// One device's progress in a rollout.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeviceProgress {
    /// Device id.
    pub device: String,
    /// Its state.
    pub state: DeviceState,
    /// Image bytes sent to it (since the gateway started).
    pub received: u32,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When its state last changed.
    pub updated_ms: i64,
}

/// Every rollout, and which unfinished one each device is in.
#[derive(Debug, Default)]
pub struct Rollouts {
    rollouts: BTreeMap<i64, Rollout>,
    active: HashMap<Arc<str>, i64>,
}

impl Rollouts {
    /// The rollouts the store holds; `image` loads the bytes of those still running.
    pub fn load(rows: Vec<RolloutRow>, mut image: impl FnMut(i64) -> Option<Arc<Image>>) -> Self {
        let mut me = Self::default();
        for row in rows {
            let Some(state) = RolloutState::parse(&row.state) else {
                continue;
            };
            let img = image(row.firmware);
            let Some(info) = img.as_deref().map(ImageInfo::of) else {
                // The image is gone (never, short of editing the store).
                continue;
            };
            let devices: BTreeMap<Arc<str>, Entry> = row
                .devices
                .into_iter()
                .filter_map(|(d, s, reason, updated_ms)| {
                    Some((
                        Arc::from(d),
                        Entry {
                            state: DeviceState::parse(&s)?,
                            received: 0,
                            reason,
                            updated_ms,
                            progress_ms: updated_ms,
                        },
                    ))
                })
                .collect();
            for (d, e) in &devices {
                if !e.state.is_final() {
                    me.active.insert(d.clone(), row.id);
                }
            }
            let keep_image = devices.values().any(|e| !e.state.is_final());
            me.rollouts.insert(
                row.id,
                Rollout {
                    id: row.id,
                    info,
                    image: if keep_image { img } else { None },
                    state,
                    settings: Settings {
                        failure_threshold: row.failure_threshold,
                        max_in_flight: row.max_in_flight as usize,
                        device_timeout_s: row.device_timeout_s,
                    },
                    created_ms: row.created_ms,
                    updated_ms: row.updated_ms,
                    reason: row.reason,
                    devices,
                },
            );
        }
        me
    }

    /// Devices of `devices` already in an unfinished rollout.
    pub fn busy(&self, devices: &[String]) -> Vec<String> {
        devices
            .iter()
            .filter(|d| self.active.contains_key(d.as_str()))
            .cloned()
            .collect()
    }

    /// Adds a rollout the store recorded (every device pending), and offers the image
    /// to the first online devices.
    pub fn create(
        &mut self,
        id: i64,
        image: Arc<Image>,
        devices: &[String],
        settings: Settings,
        now_ms: i64,
        online: impl Fn(&str) -> bool,
    ) -> Effects {
        let devices: BTreeMap<Arc<str>, Entry> = devices
            .iter()
            .map(|d| {
                (
                    Arc::from(d.as_str()),
                    Entry {
                        state: DeviceState::Pending,
                        received: 0,
                        reason: None,
                        updated_ms: now_ms,
                        progress_ms: now_ms,
                    },
                )
            })
            .collect();
        for d in devices.keys() {
            self.active.insert(d.clone(), id);
        }
        self.rollouts.insert(
            id,
            Rollout {
                id,
                info: ImageInfo::of(&image),
                image: Some(image),
                state: RolloutState::Running,
                settings: Settings {
                    max_in_flight: settings.max_in_flight.max(1),
                    ..settings
                },
                created_ms: now_ms,
                updated_ms: now_ms,
                reason: None,
                devices,
            },
        );
        let mut fx = Effects::default();
        fx.events.push(Event::Rollout {
            rollout: id,
            state: RolloutState::Running.as_str(),
            reason: None,
        });
        self.fill(id, now_ms, &online, &mut fx);
        fx
    }

    /// A device said `Hello` with `firmware` in a session of protocol `version`: its
    /// update is installed if it runs the image; a restart into the image that brought
    /// another version back failed (its bootloader rolled back); a device below
    /// version 3 cannot take the image. A pending device is offered the image if its
    /// rollout has a free slot.
    pub fn hello(
        &mut self,
        device: &str,
        firmware: &str,
        version: u8,
        now_ms: i64,
        online: impl Fn(&str) -> bool,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some(&id) = self.active.get(device) else {
            return fx;
        };
        let Some(r) = self.rollouts.get_mut(&id) else {
            return fx;
        };
        let Some(e) = r.devices.get(device) else {
            return fx;
        };
        let runs_it = firmware == r.info.version;
        let next = match e.state {
            _ if runs_it => Some((DeviceState::Installed, None)),
            DeviceState::Verified => Some((
                DeviceState::Failed,
                Some(format!(
                    "restarted into firmware {firmware}, not {}",
                    r.info.version
                )),
            )),
            _ if version < 3 => Some((DeviceState::Failed, Some(too_old(version)))),
            DeviceState::Pending
                if r.state == RolloutState::Running && r.in_flight() < r.settings.max_in_flight =>
            {
                Some((DeviceState::Offered, None))
            }
            _ => None,
        };
        if let Some((state, reason)) = next {
            self.set(id, device, state, reason, now_ms, &mut fx);
            self.settle(id, now_ms, &online, &mut fx);
        }
        fx
    }

    /// `device` was offered the image while online in a session below version 3 (the
    /// rollout started then): it cannot take it; it fails with the reason.
    pub fn cannot_transfer(
        &mut self,
        device: &str,
        version: u8,
        now_ms: i64,
        online: impl Fn(&str) -> bool,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some(&id) = self.active.get(device) else {
            return fx;
        };
        let state = self
            .rollouts
            .get(&id)
            .and_then(|r| r.devices.get(device))
            .map(|e| e.state);
        if matches!(state, Some(DeviceState::Offered | DeviceState::Downloading)) {
            self.set(
                id,
                device,
                DeviceState::Failed,
                Some(too_old(version)),
                now_ms,
                &mut fx,
            );
            self.settle(id, now_ms, &online, &mut fx);
        }
        fx
    }

    /// Devices that made no progress within their rollout's deadline fail: one offered
    /// or downloading that stopped asking, one verified that never came back with the
    /// image. Their slots go to the next devices.
    pub fn expire(&mut self, now_ms: i64, online: impl Fn(&str) -> bool) -> Effects {
        let mut fx = Effects::default();
        let late: Vec<(i64, Arc<str>, DeviceState, u32)> = self
            .rollouts
            .values()
            .flat_map(|r| {
                r.devices
                    .iter()
                    .filter(|(_, e)| {
                        e.state.in_flight()
                            && now_ms.saturating_sub(e.progress_ms) > r.settings.timeout_ms()
                    })
                    .map(|(d, e)| (r.id, d.clone(), e.state, r.settings.device_timeout_s))
            })
            .collect();
        for (id, device, state, timeout_s) in &late {
            let reason = if *state == DeviceState::Verified {
                format!("did not come back with the image within {timeout_s} s")
            } else {
                format!("no progress for {timeout_s} s")
            };
            self.set(
                *id,
                device,
                DeviceState::Failed,
                Some(reason),
                now_ms,
                &mut fx,
            );
        }
        let mut ids: Vec<i64> = late.iter().map(|(id, ..)| *id).collect();
        ids.dedup();
        for id in ids {
            self.settle(id, now_ms, &online, &mut fx);
        }
        fx
    }

    /// What a device's session should be serving now: transfer id and image, if any.
    pub fn wanted(&self, device: &str) -> Option<(u32, Arc<Image>)> {
        let id = self.active.get(device)?;
        let r = self.rollouts.get(id)?;
        let e = r.devices.get(device)?;
        if !matches!(e.state, DeviceState::Offered | DeviceState::Downloading) {
            return None;
        }
        Some((r.wire_id(), r.image.clone()?))
    }

    /// Chunks of transfer `wire_id` up to byte `end` went to `device`.
    pub fn sent(&mut self, device: &str, wire_id: u32, end: u32, now_ms: i64) -> Effects {
        let mut fx = Effects::default();
        let Some(id) = self.transfer(device, wire_id) else {
            return fx;
        };
        let Some(e) = self
            .rollouts
            .get_mut(&id)
            .and_then(|r| r.devices.get_mut(device))
        else {
            return fx;
        };
        e.received = e.received.max(end);
        e.progress_ms = now_ms;
        if e.state == DeviceState::Offered {
            self.set(id, device, DeviceState::Downloading, None, now_ms, &mut fx);
        }
        fx
    }

    /// `device` said how transfer `wire_id` ended.
    pub fn status(
        &mut self,
        device: &str,
        wire_id: u32,
        outcome: FirmwareOutcome,
        now_ms: i64,
        online: impl Fn(&str) -> bool,
    ) -> Effects {
        let mut fx = Effects::default();
        let id = i64::from(wire_id);
        let state = self
            .rollouts
            .get(&id)
            .and_then(|r| r.devices.get(device))
            .map(|e| e.state);
        match state {
            Some(DeviceState::Offered | DeviceState::Downloading)
                if self.active.get(device) == Some(&id) => {}
            // Withdrawn while the device finished (the cancel and its status crossed):
            // what the device did is what counts. A verified image is what it restarts
            // into, so the device is followed to its `Hello` again, unless another
            // rollout took it meanwhile.
            Some(DeviceState::Cancelled) if !self.active.contains_key(device) => {
                if outcome == FirmwareOutcome::Verified
                    && let Some((key, _)) = self
                        .rollouts
                        .get(&id)
                        .and_then(|r| r.devices.get_key_value(device))
                {
                    self.active.insert(key.clone(), id);
                }
            }
            _ => return fx,
        }
        match outcome {
            FirmwareOutcome::Verified => {
                self.set(id, device, DeviceState::Verified, None, now_ms, &mut fx);
            }
            other => self.set(
                id,
                device,
                DeviceState::Failed,
                Some(other.as_str().to_owned()),
                now_ms,
                &mut fx,
            ),
        }
        self.settle(id, now_ms, &online, &mut fx);
        fx
    }

    /// Pauses a running rollout, or resumes a paused one.
    pub fn set_paused(
        &mut self,
        id: i64,
        paused: bool,
        now_ms: i64,
        online: impl Fn(&str) -> bool,
    ) -> Result<Effects, RolloutError> {
        let r = self.unfinished(id)?;
        let mut fx = Effects::default();
        let to = if paused {
            RolloutState::Paused
        } else {
            RolloutState::Running
        };
        if r.state != to {
            Self::set_rollout(r, to, None, now_ms, &mut fx);
            if !paused {
                self.fill(id, now_ms, &online, &mut fx);
            }
        }
        Ok(fx)
    }

    /// Cancels a rollout: transfers under way are withdrawn, pending devices are never
    /// offered the image. Devices that verified it already restart into it anyway.
    pub fn cancel(&mut self, id: i64, now_ms: i64) -> Result<Effects, RolloutError> {
        self.unfinished(id)?;
        let mut fx = Effects::default();
        self.end(
            id,
            RolloutState::Cancelled,
            Some("cancelled by the operator".into()),
            now_ms,
            &mut fx,
        );
        Ok(fx)
    }

    /// One rollout, with its devices' progress if `devices`.
    pub fn view(&self, id: i64, devices: bool) -> Option<RolloutView> {
        let r = self.rollouts.get(&id)?;
        let mut counts = BTreeMap::new();
        for s in [
            DeviceState::Pending,
            DeviceState::Offered,
            DeviceState::Downloading,
            DeviceState::Verified,
            DeviceState::Installed,
            DeviceState::Failed,
            DeviceState::Cancelled,
        ] {
            counts.insert(s.as_str(), r.count(s));
        }
        counts.insert("total", r.devices.len());
        Some(RolloutView {
            id: r.id,
            firmware: r.info.clone(),
            state: r.state,
            reason: r.reason.clone(),
            failure_threshold: r.settings.failure_threshold,
            max_in_flight: r.settings.max_in_flight,
            device_timeout_s: r.settings.device_timeout_s,
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
            counts,
            devices: devices.then(|| {
                r.devices
                    .iter()
                    .map(|(d, e)| DeviceProgress {
                        device: d.to_string(),
                        state: e.state,
                        received: e.received,
                        reason: e.reason.clone(),
                        updated_ms: e.updated_ms,
                    })
                    .collect()
            }),
        })
    }

    /// Every rollout, newest first, without devices.
    pub fn list(&self) -> Vec<RolloutView> {
        self.rollouts
            .keys()
            .rev()
            .filter_map(|id| self.view(*id, false))
            .collect()
    }

    // ------------------------------------------------------------------------------

    /// Rollout `id`, if it may still change.
    fn unfinished(&mut self, id: i64) -> Result<&mut Rollout, RolloutError> {
        let r = self
            .rollouts
            .get_mut(&id)
            .ok_or(RolloutError::NoSuchRollout(id))?;
        if r.state.is_final() {
            return Err(RolloutError::Finished {
                id,
                state: r.state.as_str(),
            });
        }
        Ok(r)
    }

    /// The device's progress in its unfinished rollout, if it is in one: the rollout's
    /// id and the progress.
    pub fn device(&self, device: &str) -> Option<(i64, DeviceProgress)> {
        let id = *self.active.get(device)?;
        let e = self.rollouts.get(&id)?.devices.get(device)?;
        Some((
            id,
            DeviceProgress {
                device: device.to_owned(),
                state: e.state,
                received: e.received,
                reason: e.reason.clone(),
                updated_ms: e.updated_ms,
            },
        ))
    }

    /// The rollout of `device`'s transfer `wire_id`, if that is its unfinished one.
    fn transfer(&self, device: &str, wire_id: u32) -> Option<i64> {
        let id = *self.active.get(device)?;
        (self.rollouts.get(&id)?.wire_id() == wire_id).then_some(id)
    }

    /// Sets a device's state; a final one takes it out of `active`.
    fn set(
        &mut self,
        id: i64,
        device: &str,
        state: DeviceState,
        reason: Option<String>,
        now_ms: i64,
        fx: &mut Effects,
    ) {
        let Some(r) = self.rollouts.get_mut(&id) else {
            return;
        };
        let Some((key, e)) = r.devices.get_key_value(device) else {
            return;
        };
        let key = key.clone();
        if e.state == state {
            return;
        }
        if let Some(e) = r.devices.get_mut(device) {
            e.state = state;
            e.reason.clone_from(&reason);
            e.updated_ms = now_ms;
            e.progress_ms = now_ms;
        }
        if state.is_final() {
            self.active.remove(device);
        }
        fx.writes.push(RolloutWrite::Device {
            rollout: id,
            device: key.clone(),
            state: state.as_str(),
            reason: reason.clone(),
            at_ms: now_ms,
        });
        fx.events.push(Event::Firmware {
            device: key.clone(),
            rollout: id,
            state: state.as_str(),
            reason,
        });
        // Its session offers, serves or withdraws accordingly.
        if matches!(
            state,
            DeviceState::Offered | DeviceState::Cancelled | DeviceState::Failed
        ) {
            fx.wake.push(key);
        }
    }

    fn set_rollout(
        r: &mut Rollout,
        state: RolloutState,
        reason: Option<String>,
        now_ms: i64,
        fx: &mut Effects,
    ) {
        r.state = state;
        r.reason.clone_from(&reason);
        r.updated_ms = now_ms;
        fx.writes.push(RolloutWrite::Rollout {
            id: r.id,
            state: state.as_str(),
            reason: reason.clone(),
            at_ms: now_ms,
        });
        fx.events.push(Event::Rollout {
            rollout: r.id,
            state: state.as_str(),
            reason,
        });
    }

    /// After a device changed: stop at the failure threshold, finish when every device
    /// is done, else offer freed slots.
    fn settle(&mut self, id: i64, now_ms: i64, online: &impl Fn(&str) -> bool, fx: &mut Effects) {
        let Some(r) = self.rollouts.get(&id) else {
            return;
        };
        let failed = r.count(DeviceState::Failed);
        if !r.state.is_final() && r.over_threshold(failed) {
            let reason = format!(
                "{failed} of {} devices failed, more than the threshold of {}%",
                r.devices.len(),
                r.settings.failure_threshold * 100.0
            );
            self.end(id, RolloutState::Stopped, Some(reason), now_ms, fx);
            return;
        }
        if r.devices.values().all(|e| e.state.is_final()) {
            if let Some(r) = self.rollouts.get_mut(&id) {
                r.image = None;
                if !r.state.is_final() {
                    Self::set_rollout(r, RolloutState::Completed, None, now_ms, fx);
                }
            }
            return;
        }
        self.fill(id, now_ms, online, fx);
    }

    /// Ends a rollout: devices not yet verified are cancelled.
    fn end(
        &mut self,
        id: i64,
        state: RolloutState,
        reason: Option<String>,
        now_ms: i64,
        fx: &mut Effects,
    ) {
        let Some(r) = self.rollouts.get_mut(&id) else {
            return;
        };
        Self::set_rollout(r, state, reason, now_ms, fx);
        let undone: Vec<Arc<str>> = r
            .devices
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e.state,
                    DeviceState::Pending | DeviceState::Offered | DeviceState::Downloading
                )
            })
            .map(|(d, _)| d.clone())
            .collect();
        for d in undone {
            self.set(id, &d, DeviceState::Cancelled, None, now_ms, fx);
        }
        if let Some(r) = self.rollouts.get_mut(&id)
            && r.devices.values().all(|e| e.state.is_final())
        {
            r.image = None;
        }
    }

    /// Offers the image to pending online devices while the rollout has free slots.
    fn fill(&mut self, id: i64, now_ms: i64, online: &impl Fn(&str) -> bool, fx: &mut Effects) {
        let Some(r) = self.rollouts.get(&id) else {
            return;
        };
        if r.state != RolloutState::Running {
            return;
        }
        let room = r.settings.max_in_flight.saturating_sub(r.in_flight());
        if room == 0 {
            return;
        }
        let next: Vec<Arc<str>> = r
            .devices
            .iter()
            .filter(|(d, e)| e.state == DeviceState::Pending && online(d))
            .take(room)
            .map(|(d, _)| d.clone())
            .collect();
        for d in next {
            self.set(id, &d, DeviceState::Offered, None, now_ms, fx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Arc<Image> {
        Arc::new(Image {
            id: 1,
            version: "fw-2".into(),
            sha256: [7; 32],
            signature: [9; 64],
            bytes: Arc::from(&b"image bytes"[..]),
        })
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i:03}")).collect()
    }

    fn state(r: &Rollouts, d: &str) -> DeviceState {
        r.view(5, true)
            .unwrap()
            .devices
            .unwrap()
            .into_iter()
            .find(|p| p.device == d)
            .unwrap()
            .state
    }

    #[test]
    fn slots_limit_offers_and_free_up_as_devices_finish() {
        let mut r = Rollouts::default();
        let fx = r.create(5, image(), &names(5), Settings::new(0.5, 2), 0, |_| true);
        assert_eq!(fx.wake.len(), 2, "two slots: two offers");
        assert!(r.wanted("d000").is_some() && r.wanted("d002").is_none());
        assert!(r.busy(&names(1)) == vec!["d000".to_string()]);
        // Progress, then verification: the slot stays taken until the restart.
        r.sent("d000", 5, 4, 1);
        assert_eq!(state(&r, "d000"), DeviceState::Downloading);
        let fx = r.status("d000", 5, FirmwareOutcome::Verified, 2, |_| true);
        assert!(fx.wake.is_empty(), "a verified device still holds its slot");
        assert!(r.wanted("d000").is_none());
        // The restart with the new version frees it for the next device.
        let fx = r.hello("d000", "fw-2", 3, 3, |_| true);
        assert_eq!(state(&r, "d000"), DeviceState::Installed);
        assert_eq!(fx.wake, vec![Arc::<str>::from("d002")]);
        assert!(r.busy(&names(1)).is_empty(), "done with its rollout");
    }

    #[test]
    fn a_restart_with_the_old_version_fails_and_the_threshold_stops_the_rollout() {
        let mut r = Rollouts::default();
        // 4 devices, 25 %: the second failure stops it.
        r.create(5, image(), &names(4), Settings::new(0.25, 2), 0, |_| true);
        r.status("d000", 5, FirmwareOutcome::Verified, 1, |_| true);
        r.hello("d000", "fw-1", 3, 2, |_| true);
        assert_eq!(state(&r, "d000"), DeviceState::Failed);
        assert_eq!(r.view(5, false).unwrap().state, RolloutState::Running);
        // A status for another transfer id changes nothing.
        r.status("d001", 6, FirmwareOutcome::HashMismatch, 3, |_| true);
        assert_eq!(state(&r, "d001"), DeviceState::Offered);
        let fx = r.status("d001", 5, FirmwareOutcome::HashMismatch, 3, |_| true);
        let v = r.view(5, true).unwrap();
        assert_eq!(v.state, RolloutState::Stopped);
        assert!(v.reason.unwrap().contains("2 of 4 devices failed"));
        assert_eq!(v.counts["cancelled"], 2, "the rest are never offered");
        assert_eq!(v.counts["failed"], 2);
        assert!(fx.wake.iter().any(|d| &**d == "d002"));
        assert!(r.wanted("d002").is_none());
        assert!(matches!(r.cancel(5, 4), Err(RolloutError::Finished { .. })));
    }

    #[test]
    fn offline_devices_wait_and_old_protocol_versions_fail() {
        let mut r = Rollouts::default();
        let fx = r.create(5, image(), &names(3), Settings::new(1.0, 10), 0, |d| {
            d == "d001"
        });
        assert_eq!(fx.wake, vec![Arc::<str>::from("d001")]);
        // d000 connects: it gets the offer at its Hello.
        r.hello("d000", "fw-1", 3, 1, |d| d != "d002");
        assert!(r.wanted("d000").is_some());
        // d002 is offline: never offered, so nothing for its version 2 to fail yet.
        r.cannot_transfer("d002", 2, 1, |_| true);
        let p = r.view(5, true).unwrap().devices.unwrap();
        assert_eq!(
            p[2].state,
            DeviceState::Pending,
            "not offered: it was offline"
        );
        r.hello("d002", "fw-1", 2, 1, |_| true);
        let p = r.view(5, true).unwrap().devices.unwrap();
        assert_eq!(p[2].state, DeviceState::Failed);
        assert!(p[2].reason.as_deref().unwrap().contains("version 2"));
        // Online in a version 2 session when the rollout began: offered, and its
        // session cannot send the offer.
        let mut r2 = Rollouts::default();
        r2.create(6, image(), &names(1), Settings::new(1.0, 1), 0, |_| true);
        r2.cannot_transfer("d000", 2, 1, |_| true);
        assert_eq!(r2.view(6, false).unwrap().counts["failed"], 1);
        // One already running the image is installed at once.
        r.hello("d001", "fw-2", 3, 2, |_| true);
        assert_eq!(state(&r, "d001"), DeviceState::Installed);
    }

    #[test]
    fn a_device_without_progress_fails_at_its_deadline_and_frees_its_slot() {
        let mut r = Rollouts::default();
        let settings = Settings {
            device_timeout_s: 10,
            ..Settings::new(1.0, 1)
        };
        r.create(5, image(), &names(3), settings, 0, |_| true);
        assert_eq!(state(&r, "d000"), DeviceState::Offered);
        // Chunks keep it alive.
        r.sent("d000", 5, 100, 8_000);
        assert!(r.expire(15_000, |_| true).wake.is_empty());
        // Then nothing for more than 10 s: failed, and d001 gets the slot.
        let fx = r.expire(18_001, |_| true);
        assert_eq!(state(&r, "d000"), DeviceState::Failed);
        assert_eq!(fx.wake.last().map(|d| &**d), Some("d001"));
        let p = r.view(5, true).unwrap().devices.unwrap();
        assert_eq!(p[0].reason.as_deref(), Some("no progress for 10 s"));
        // A verified device that never comes back with the image fails too.
        r.status("d001", 5, FirmwareOutcome::Verified, 19_000, |_| true);
        r.expire(29_001, |_| true);
        let p = r.view(5, true).unwrap().devices.unwrap();
        assert_eq!(p[1].state, DeviceState::Failed);
        assert!(
            p[1].reason
                .as_deref()
                .unwrap()
                .contains("did not come back")
        );
        assert_eq!(state(&r, "d002"), DeviceState::Offered);
        assert_eq!(r.view(5, false).unwrap().device_timeout_s, 10);
    }

    #[test]
    fn a_status_that_crossed_the_cancel_still_counts() {
        let mut r = Rollouts::default();
        r.create(5, image(), &names(3), Settings::new(1.0, 3), 0, |_| true);
        r.cancel(5, 1).unwrap();
        // d000 had verified, d001 had failed, before the cancel reached them.
        r.status("d000", 5, FirmwareOutcome::Verified, 2, |_| true);
        r.status("d001", 5, FirmwareOutcome::StorageError, 2, |_| true);
        assert_eq!(state(&r, "d000"), DeviceState::Verified);
        assert_eq!(state(&r, "d001"), DeviceState::Failed);
        assert_eq!(state(&r, "d002"), DeviceState::Cancelled);
        // d000 restarts into the image: installed.
        r.hello("d000", "fw-2", 3, 3, |_| true);
        assert_eq!(state(&r, "d000"), DeviceState::Installed);
        assert_eq!(r.view(5, false).unwrap().state, RolloutState::Cancelled);
        // A status for a transfer the device is not in changes nothing.
        r.status("d002", 9, FirmwareOutcome::Verified, 4, |_| true);
        assert_eq!(state(&r, "d002"), DeviceState::Cancelled);
    }

    #[test]
    fn pause_stops_new_offers_and_cancel_withdraws_transfers() {
        let mut r = Rollouts::default();
        r.create(5, image(), &names(3), Settings::new(1.0, 1), 0, |_| true);
        r.set_paused(5, true, 1, |_| true).unwrap();
        r.status("d000", 5, FirmwareOutcome::Declined, 2, |_| true);
        assert_eq!(r.view(5, false).unwrap().counts["offered"], 0, "paused");
        let fx = r.set_paused(5, false, 3, |_| true).unwrap();
        assert_eq!(fx.wake, vec![Arc::<str>::from("d001")]);
        let fx = r.cancel(5, 4).unwrap();
        assert!(fx.wake.iter().any(|d| &**d == "d001"));
        let v = r.view(5, false).unwrap();
        assert_eq!(v.state, RolloutState::Cancelled);
        assert_eq!((v.counts["cancelled"], v.counts["failed"]), (2, 1));
        assert!(r.busy(&names(3)).is_empty());
    }

    #[test]
    fn completes_when_every_device_is_done_and_reloads_from_rows() {
        let mut r = Rollouts::default();
        let fx = r.create(5, image(), &names(2), Settings::new(1.0, 5), 0, |_| true);
        let mut writes = fx.writes;
        for d in ["d000", "d001"] {
            writes.extend(
                r.status(d, 5, FirmwareOutcome::Verified, 1, |_| true)
                    .writes,
            );
        }
        writes.extend(r.hello("d000", "fw-2", 3, 2, |_| true).writes);
        assert_eq!(r.view(5, false).unwrap().state, RolloutState::Running);
        assert!(r.rollouts[&5].image.is_some());
        writes.extend(r.hello("d001", "fw-2", 3, 2, |_| true).writes);
        assert_eq!(r.view(5, false).unwrap().state, RolloutState::Completed);
        assert!(r.rollouts[&5].image.is_none(), "the bytes are let go");
        assert!(writes.iter().any(|w| matches!(
            w,
            RolloutWrite::Rollout {
                state: "completed",
                ..
            }
        )));
        // The same rows, loaded: the same view.
        let row = RolloutRow {
            id: 5,
            firmware: 1,
            state: "running".into(),
            failure_threshold: 0.5,
            max_in_flight: 2,
            device_timeout_s: 60,
            created_ms: 0,
            updated_ms: 0,
            reason: None,
            devices: vec![
                ("a".into(), "downloading".into(), None, 0),
                ("b".into(), "installed".into(), None, 0),
            ],
        };
        let loaded = Rollouts::load(vec![row], |_| Some(image()));
        assert!(
            loaded.wanted("a").is_some(),
            "an unfinished transfer goes on"
        );
        assert!(loaded.busy(&["b".into()]).is_empty());
    }
}
