//! The handle's everyday operations: commands (queue, wait, look up, cancel) and the
//! devices and telemetry the API shows, in a fleet merged with the fleet's registry.

use super::*;

/// Why a command could not be queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The device id breaks the identity rule.
    #[error("invalid device id: {0}")]
    InvalidDevice(#[from] proto::InvalidDeviceId),
    /// The command name breaks the name rule.
    #[error("invalid command name: {0}")]
    InvalidName(proto::TextError),
    /// The arguments cannot be sent.
    #[error(transparent)]
    InvalidArgs(#[from] values::ArgsError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The command did not end within the wait.
    #[error("no result within the wait")]
    Timeout,
    /// The fleet could not be asked.
    #[error(transparent)]
    Fleet(#[from] fleet::commands::FleetError),
}

/// A command's time to live from a number of seconds, if it is one the gateway takes:
/// positive and at most a year (a float out of `Duration`'s range panics there, so it is
/// checked first).
pub fn ttl_from_secs(t: f64) -> Option<Duration> {
    (t.is_finite() && t > 0.0 && t <= 365.0 * 86_400.0).then(|| Duration::from_secs_f64(t))
}

/// A page of devices in a fleet: this gateway's page merged with the fleet registry's
/// (devices held elsewhere, by id), each saying which gateway holds it.
fn fleet_page(
    fleet: &fleet::registry::FleetRegistry,
    local: Vec<DeviceRecord>,
    after: Option<&str>,
    limit: u32,
) -> Vec<DeviceRecord> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut merged: std::collections::BTreeMap<String, DeviceRecord> = local
        .into_iter()
        .map(|mut d| {
            let holder = fleet.holder(&d.id);
            with_holder(fleet, &mut d, holder);
            (d.id.clone(), d)
        })
        .collect();
    for (id, h) in fleet.page(after, limit) {
        merged
            .entry(id.clone())
            .or_insert_with(|| remote_device(id, h));
    }
    merged.into_values().take(limit).collect()
}

/// A device this gateway knows, as the fleet sees it: its holder, and online if it is
/// online there.
fn with_holder(
    fleet: &fleet::registry::FleetRegistry,
    d: &mut DeviceRecord,
    holder: Option<fleet::registry::Holder>,
) {
    match holder {
        Some(h) if h.gateway != fleet.me() => {
            d.online = h.online;
            d.last_seen_ms = Some(d.last_seen_ms.map_or(h.since_ms, |s| s.max(h.since_ms)));
            d.gateway = Some(h.gateway);
        }
        _ => d.gateway = Some(fleet.me().to_owned()),
    }
}

/// A device only another gateway of the fleet knows.
fn remote_device(id: String, h: fleet::registry::Holder) -> DeviceRecord {
    DeviceRecord {
        id,
        online: h.online,
        first_seen_ms: None,
        last_seen_ms: Some(h.since_ms),
        cert_serial: None,
        cert_not_after: None,
        firmware: None,
        peer_addr: h.peer,
        boot_id: None,
        connects: 0,
        latest: None,
        gateway: Some(h.gateway),
    }
}

impl Gateway {
    /// Whether a device has a session open now.
    pub fn is_online(&self, device: &str) -> bool {
        self.shared.registry.is_online(device)
    }

    /// Queues a command for a device (online or not) and returns its record. `args` is
    /// a JSON object of name: value; `ttl` defaults to the configured `command_ttl`.
    pub async fn send_command(
        &self,
        device: &str,
        name: &str,
        args: &serde_json::Value,
        ttl: Option<Duration>,
    ) -> Result<CommandRecord, CommandError> {
        DeviceId::new(device)?;
        proto::Name::new(name).map_err(CommandError::InvalidName)?;
        let args = values::args_from_json(args)?;
        let ttl = ttl.unwrap_or(self.shared.config.command_ttl);
        let fleet = self.shared.fleet_commands.as_ref();
        let route = fleet.map_or(store::Route::Local, |f| f.route(self, device));
        let rec = self
            .shared
            .store
            .enqueue_command(device, name, args, ttl, route.clone())
            .await?;
        self.shared.publish_control(Event::Command(rec.clone()));
        self.shared.registry.notify_commands(device);
        // In a fleet: to the gateway holding the device, or into the pending stream,
        // before answering (so the command is replicated when the caller hears of it).
        if let Some(f) = fleet {
            f.dispatch(self, &rec, &route).await;
        }
        Ok(rec)
    }

    /// Merges `patch` (a JSON object of setting → value, `null` unsets) into a
    /// device's desired state, if its version is `expect` (when given); a device online
    /// with protocol version 2 gets the change at once, others when they next report.
    pub async fn put_desired(
        &self,
        device: &str,
        patch: serde_json::Value,
        expect: Option<u32>,
    ) -> Result<store::PutDesired, StoreError> {
        let out = self.shared.store.put_desired(device, patch, expect).await?;
        if let store::PutDesired::Done {
            changed: true, doc, ..
        } = &out
        {
            self.shared.publish(|| Event::Desired {
                device: device.into(),
                version: doc.version,
                desired: doc.values(),
            });
            self.shared.registry.notify_desired(device);
        }
        Ok(out)
    }

    /// A device's desired and reported state; `None` if the device is unknown.
    pub async fn device_state(&self, device: &str) -> Result<Option<store::StateView>, StoreError> {
        self.shared.store.device_state(device).await
    }

    /// A command's record, from whichever gateway of the fleet keeps it.
    pub async fn command_record(&self, id: i64) -> Result<Option<CommandRecord>, CommandError> {
        if let Some(f) = &self.shared.fleet_commands
            && let Some(remote) = f.remote_command(id).await?
        {
            return Ok(remote);
        }
        Ok(self.shared.store.command(id).await?)
    }

    /// Cancels a queued command, wherever in the fleet it is kept.
    pub async fn cancel_command(&self, id: i64) -> Result<store::Cancel, CommandError> {
        if let Some(f) = &self.shared.fleet_commands {
            if let Some(c) = f.remote_cancel(id).await? {
                return Ok(c);
            }
            // Waiting in the pending stream: whoever deletes its message first decides.
            if f.cancel_pending(self, id).await? == Some(false)
                && let Some(rec) = self.shared.store.command(id).await?
            {
                return Ok(store::Cancel::TooLate(rec));
            }
        }
        let out = self.shared.store.cancel_command(id).await?;
        if let store::Cancel::Canceled(rec) = &out {
            self.shared.command_changed(rec.clone());
        }
        Ok(out)
    }

    /// Waits up to `wait` for a command to end (succeeded, failed or expired) and
    /// returns its record; `Err(Timeout)` if it has not ended by then.
    pub async fn wait_command(
        &self,
        id: i64,
        wait: Duration,
    ) -> Result<CommandRecord, CommandError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .push(tx);
        // It may have ended before the waiter was registered.
        match self.shared.store.command(id).await? {
            Some(rec) if rec.state.is_final() => return Ok(rec),
            Some(_) => {}
            None => return Err(StoreError::NoSuchCommand(id).into()),
        }
        let out = tokio::time::timeout(wait, rx).await;
        {
            // Forget this waiter (and any other of this command that gave up).
            let mut waiters = self
                .shared
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(list) = waiters.get_mut(&id) {
                list.retain(|tx| !tx.is_closed());
                if list.is_empty() {
                    waiters.remove(&id);
                }
            }
        }
        match out {
            Ok(Ok(rec)) => Ok(rec),
            _ => Err(CommandError::Timeout),
        }
    }

    /// Sends a command and waits for its end: [`send_command`](Self::send_command) then
    /// [`wait_command`](Self::wait_command).
    pub async fn command(
        &self,
        device: &str,
        name: &str,
        args: &serde_json::Value,
        ttl: Option<Duration>,
        wait: Duration,
    ) -> Result<CommandRecord, CommandError> {
        let rec = self.send_command(device, name, args, ttl).await?;
        self.wait_command(rec.id, wait).await
    }

    /// Every device the store knows.
    pub async fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices_page(None, u32::MAX).await
    }

    /// Up to `limit` devices with ids after `after`, by id.
    pub async fn devices_page(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut page = self.shared.store.devices_page(after.clone(), limit).await?;
        for d in &mut page {
            self.live_last_seen(d);
        }
        if let Some(fleet) = &self.shared.fleet_registry {
            page = fleet_page(fleet, page, after.as_deref(), limit);
        }
        Ok(page)
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let mut d = self.shared.store.device(id).await?;
        if let Some(d) = &mut d {
            self.live_last_seen(d);
        }
        if let Some(fleet) = &self.shared.fleet_registry {
            let holder = fleet.holder(id);
            d = match (d, holder) {
                (Some(mut d), h) => {
                    with_holder(fleet, &mut d, h);
                    Some(d)
                }
                (None, Some(h)) => Some(remote_device(id.to_owned(), h)),
                (None, None) => None,
            };
        }
        Ok(d)
    }

    /// A device online now was last seen at its last frame, which its session keeps
    /// in memory (the store has its connect time until the session ends).
    fn live_last_seen(&self, d: &mut DeviceRecord) {
        if d.online
            && let Some(ms) = self.shared.registry.last_seen(&d.id)
        {
            d.last_seen_ms = Some(d.last_seen_ms.map_or(ms, |s| s.max(ms)));
        }
    }

    /// A device's telemetry, newest first.
    pub async fn telemetry(
        &self,
        device: &str,
        q: TelemetryQuery,
    ) -> Result<Vec<TelemetryRecord>, StoreError> {
        self.shared.store.telemetry(device, q).await
    }
}
