//! Commands across the fleet (docs/FLEET.md): a command asked of any gateway reaches
//! its device wherever it connects, and its record answers on any gateway.
//!
//! ```text
//!  POST …/devices/D/commands on gateway A (A keeps the record, id in A's slot)
//!   ├─ D has a session on A ─────────────► A's session sends it (as without a fleet)
//!   ├─ the registry says B holds D ─ request {prefix}.gw.B.deliver ─► B keeps a copy,
//!   │                                        sends it, reports each state ─► {prefix}.gw.A.update
//!   └─ D online nowhere ─► PUB {prefix}.pending.D (stream IOT_COMMANDS, R3)
//!          D connects to C ─► C reads {prefix}.pending.D, keeps a copy, deletes the
//!          message, sends it, reports ─► {prefix}.gw.A.update
//!  GET …/commands/ID on any gateway ─► the slot in ID names A ─► {prefix}.gw.A.get
//! ```
//!
//! A gateway's slot is a key `=slot.N` in the registry bucket (created once: the
//! compare-and-set makes it this gateway's alone); its command ids are `N × 2³² + n`.
//! A command not yet sent when its device's session ends goes back to the pending
//! stream. Delivery is at least once, as within one gateway; a command past its time to
//! live is dropped wherever it is found.

mod serve;

use serve::{reply_to_cancel, slot_key};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tracing::{debug, info, warn};

use crate::Gateway;
use crate::bridge::stopped;
use crate::config::FleetSettings;
use crate::events::Event;
use crate::store::{Cancel, CommandRecord, Handoff, Route, now_ms, slot_of};

/// Time allowed for a request to another gateway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests and presence changes handled at once.
const AT_ONCE: usize = 64;
/// How often unpublished commands and unreported states are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Slots tried when claiming one (gateways a fleet may have had).
const MAX_SLOTS: u32 = 4096;

/// What a gateway answers another's request with (JSON).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    /// The request was carried out (`deliver`: the device is here and has the command).
    ok: bool,
    /// The command's record (`get`, `cancel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    command: Option<CommandRecord>,
    /// `canceled`, `too_late` or `not_found` (`cancel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<String>,
    /// Why not, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ById {
    id: i64,
}

/// The connection while it is up.
#[derive(Clone)]
struct Link {
    client: async_nats::Client,
    pending: stream::Stream,
    kv: kv::Store,
}

/// A gateway's part in routing commands across the fleet.
pub struct FleetCommands {
    settings: FleetSettings,
    link: Mutex<Option<Link>>,
    /// This gateway's slot (0 until claimed).
    slot: AtomicU32,
    /// Which gateway holds each slot, as last read.
    slots: Mutex<HashMap<u32, String>>,
    /// Something may be waiting to be published or reported.
    wake: Notify,
    /// One publisher at a time (the API's and the loop's).
    publishing: tokio::sync::Mutex<()>,
    /// Connected and the slot claimed.
    pub ready: AtomicBool,
    /// Counters for `/metrics`.
    pub counts: CommandCounts,
}

/// What the fleet's command routing did, for `/metrics`.
#[derive(Debug, Default)]
pub struct CommandCounts {
    /// Commands asked here, handed to the gateway holding their device.
    pub handed: AtomicU64,
    /// Commands (and copies whose device left) put into the pending stream.
    pub published: AtomicU64,
    /// Commands of other gateways taken here for delivery (handed or pending).
    pub taken: AtomicU64,
    /// Pending commands found expired and dropped.
    pub expired: AtomicU64,
}

impl FleetCommands {
    /// This gateway's command-id slot (0 until it reached the fleet once).
    pub fn slot(&self) -> u32 {
        self.slot.load(Ordering::Relaxed)
    }
}

/// Why a command could not be routed through the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// No connection to NATS now.
    #[error("the fleet's NATS cluster is unreachable now")]
    Unreachable,
    /// The gateway that keeps the command did not answer.
    #[error("gateway {0} (which keeps this command) did not answer: {1}")]
    Owner(String, String),
}

impl FleetCommands {
    /// Nothing connects yet.
    pub fn new(settings: FleetSettings) -> Self {
        Self {
            settings,
            link: Mutex::new(None),
            slot: AtomicU32::new(0),
            slots: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            publishing: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            counts: CommandCounts::default(),
        }
    }

    fn me(&self) -> &str {
        &self.settings.gateway_id
    }

    fn subject(&self, what: &str, rest: &str) -> String {
        format!("{}.{what}.{rest}", self.settings.subject_prefix)
    }

    fn link(&self) -> Option<Link> {
        lock(&self.link).clone()
    }

    /// Something changed that may need publishing or reporting.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Who delivers a command for `device` asked of this gateway: this gateway if the
    /// device is here, the gateway holding its session if the registry names one, the
    /// pending stream otherwise.
    pub fn route(&self, gw: &Gateway, device: &str) -> Route {
        if gw.is_online(device) {
            return Route::Local;
        }
        let holder = gw
            .shared()
            .fleet_registry
            .as_ref()
            .and_then(|r| r.holder(device));
        match holder {
            Some(h) if h.online && h.gateway != self.me() && self.link().is_some() => {
                Route::HeldBy(h.gateway)
            }
            _ => Route::Publish,
        }
    }

    /// After a command was queued with `route`: hands it to the holder (or, if the
    /// holder will not take it, to the pending stream), or publishes it.
    pub async fn dispatch(&self, gw: &Gateway, rec: &CommandRecord, route: &Route) {
        match route {
            Route::Local => {}
            Route::HeldBy(holder) => {
                let handed = self.hand_to(holder, rec).await;
                if !handed {
                    let _ = gw.store().reroute_to_pending(rec.id).await;
                    self.publish_pending(gw).await;
                }
            }
            Route::Publish => self.publish_pending(gw).await,
        }
    }

    /// Asks `holder` to deliver a command of this gateway; whether it took it.
    async fn hand_to(&self, holder: &str, rec: &CommandRecord) -> bool {
        let Some(link) = self.link() else {
            return false;
        };
        let h = Handoff {
            owner: self.me().to_owned(),
            id: rec.id,
            device: rec.device.clone(),
            name: rec.name.clone(),
            args: rec.args.clone(),
            created_ms: rec.created_ms,
            expires_ms: rec.expires_ms,
        };
        match request::<_, Reply>(
            &link.client,
            self.subject("gw", &format!("{holder}.deliver")),
            &h,
        )
        .await
        {
            Ok(r) if r.ok => {
                self.counts.handed.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(_) => {
                debug!(
                    command = rec.id,
                    holder, "the holder no longer has the device"
                );
                false
            }
            Err(e) => {
                warn!(command = rec.id, holder, error = %e, "handing a command to its device's gateway failed");
                false
            }
        }
    }

    /// Publishes what waits to go into the pending stream (commands of this gateway
    /// for devices online nowhere, and copies whose device left).
    pub async fn publish_pending(&self, gw: &Gateway) {
        let _one = self.publishing.lock().await;
        let Some(link) = self.link() else {
            return;
        };
        let js = jetstream::new(link.client.clone());
        loop {
            let rows = match gw.store().to_publish(256).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "reading commands to publish failed");
                    return;
                }
            };
            let n = rows.len();
            for (row, mut h) in rows {
                if h.owner.is_empty() {
                    h.owner = self.me().to_owned();
                }
                let Ok(payload) = serde_json::to_vec(&h) else {
                    continue;
                };
                let ack = match js
                    .publish(self.subject("pending", &h.device), payload.into())
                    .await
                {
                    Ok(f) => f.await,
                    Err(e) => Err(e),
                };
                match ack {
                    Ok(ack) => {
                        self.counts.published.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = gw.store().mark_published(row, ack.sequence).await {
                            warn!(error = %e, "recording a published command failed");
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(command = h.id, error = %e, "publishing a command for the fleet failed (tried again)");
                        return;
                    }
                }
            }
            if n < 256 {
                return;
            }
        }
    }

    /// Sends owners the states of the copies delivered here.
    async fn report(&self, gw: &Gateway) {
        let Some(link) = self.link() else {
            return;
        };
        let updates = match gw.store().unreported(256).await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "reading command states to report failed");
                return;
            }
        };
        futures_util::stream::iter(updates)
            .for_each_concurrent(16, |(owner, row, u)| {
                let link = link.clone();
                async move {
                    let subject = self.subject("gw", &format!("{owner}.update"));
                    match request::<_, Reply>(&link.client, subject, &u).await {
                        Ok(_) => {
                            let _ = gw.store().mark_reported(row, u.state).await;
                        }
                        Err(e) => debug!(owner, command = u.id, error = %e, "reporting a state failed (tried again)"),
                    }
                }
            })
            .await;
    }

    /// A command's record from the gateway that keeps it, if that is another one.
    /// `Ok(None)`: it is this gateway's (or from before any fleet): read it here.
    pub async fn remote_command(
        &self,
        id: i64,
    ) -> Result<Option<Option<CommandRecord>>, FleetError> {
        Ok(self.ask_owner(id, "get").await?.map(|r| r.command))
    }

    /// Cancels a command kept by another gateway there. `Ok(None)`: it is this
    /// gateway's.
    pub async fn remote_cancel(&self, id: i64) -> Result<Option<Cancel>, FleetError> {
        Ok(self.ask_owner(id, "cancel").await?.map(reply_to_cancel))
    }

    /// Sends `op` about command `id` to the gateway that keeps it; `Ok(None)` if that
    /// is this one.
    async fn ask_owner(&self, id: i64, op: &str) -> Result<Option<Reply>, FleetError> {
        let Some(owner) = self.owner_of(id).await? else {
            return Ok(None);
        };
        let link = self.link().ok_or(FleetError::Unreachable)?;
        let subject = self.subject("gw", &format!("{owner}.{op}"));
        let r = request(&link.client, subject, &ById { id })
            .await
            .map_err(|e| FleetError::Owner(owner, e))?;
        Ok(Some(r))
    }

    /// Cancels a command of this gateway waiting in the pending stream: deleting its
    /// message decides (a gateway that read it first is delivering it).
    /// `Ok(None)`: it is not in the stream.
    pub async fn cancel_pending(&self, gw: &Gateway, id: i64) -> Result<Option<bool>, FleetError> {
        let Ok(Some(seq)) = gw.store().pending_seq(id).await else {
            return Ok(None);
        };
        let link = self.link().ok_or(FleetError::Unreachable)?;
        match link.pending.delete_message(seq).await {
            Ok(deleted) => Ok(Some(deleted)),
            // "no message found": another gateway took it.
            Err(e) if e.to_string().contains("no message") => Ok(Some(false)),
            Err(e) => Err(FleetError::Owner(self.me().to_owned(), e.to_string())),
        }
    }

    /// The gateway keeping command `id`, if not this one.
    async fn owner_of(&self, id: i64) -> Result<Option<String>, FleetError> {
        let slot = slot_of(id);
        if slot == 0 || slot == self.slot.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if let Some(g) = lock(&self.slots).get(&slot) {
            return Ok(Some(g.clone()));
        }
        let link = self.link().ok_or(FleetError::Unreachable)?;
        match link.kv.get(slot_key(slot)).await {
            Ok(Some(v)) => {
                let g = String::from_utf8_lossy(&v).into_owned();
                lock(&self.slots).insert(slot, g.clone());
                Ok(Some(g))
            }
            // No gateway ever had the slot: no such command anywhere.
            Ok(None) => Ok(None),
            Err(e) => Err(FleetError::Owner(format!("slot {slot}"), e.to_string())),
        }
    }

    /// Keeps routing until `stop`, reconnecting after a failure.
    pub async fn run(self: Arc<Self>, gw: Gateway, mut stop: watch::Receiver<bool>) {
        let mut control = gw.shared().subscribe_control();
        let mut backoff = super::Backoff::new();
        while let Err(why) = self.session(&gw, &mut control, &mut stop).await {
            *lock(&self.link) = None;
            let pause = backoff.failed(self.ready.swap(false, Ordering::Relaxed));
            warn!(error = %why, retry_in = ?pause, "fleet commands: no connection");
            if !super::Backoff::wait(pause, &mut stop).await {
                return;
            }
        }
    }

    async fn session(
        self: &Arc<Self>,
        gw: &Gateway,
        control: &mut broadcast::Receiver<Arc<Event>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let s = &self.settings;
        let js = super::connect(s).await?;
        let kv = super::registry::open_bucket(&js, s).await?;
        let pending = js
            .get_or_create_stream(stream::Config {
                name: s.commands_stream.clone(),
                subjects: vec![format!("{}.pending.>", s.subject_prefix)],
                num_replicas: s.replicas,
                storage: stream::StorageType::File,
                // The longest time to live a command may have.
                max_age: Duration::from_secs(366 * 86_400),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("stream {}: {e}", s.commands_stream))?;
        self.claim_slot(gw, &kv).await?;
        let client = js.client();
        let mut requests = client
            .subscribe(self.subject("gw", &format!("{}.*", self.me())))
            .await
            .map_err(|e| format!("subscribing: {e}"))?;
        *lock(&self.link) = Some(Link {
            client,
            pending,
            kv,
        });
        *control = control.resubscribe();
        self.ready.store(true, Ordering::Relaxed);
        info!(
            slot = self.slot.load(Ordering::Relaxed),
            "fleet commands ready"
        );
        let limit = Arc::new(Semaphore::new(AT_ONCE));
        // Devices here whose pending commands came while this gateway was away.
        self.catch_up(gw).await;
        let mut tick = tokio::time::interval(RETRY_EVERY);
        loop {
            tokio::select! {
                msg = requests.next() => match msg {
                    Some(msg) => {
                        let (me, gw) = (self.clone(), gw.clone());
                        let permit = limit.clone().acquire_owned().await.map_err(|e| e.to_string())?;
                        tokio::spawn(async move {
                            me.answer(&gw, msg).await;
                            drop(permit);
                        });
                    }
                    None => return Err("the subscription ended".into()),
                },
                ev = control.recv() => match ev {
                    Ok(ev) => {
                        if let Event::Presence { device, online, .. } = &*ev {
                            let (me, gw, device, online) = (self.clone(), gw.clone(), device.clone(), *online);
                            let permit = limit.clone().acquire_owned().await.map_err(|e| e.to_string())?;
                            tokio::spawn(async move {
                                me.presence(&gw, &device, online).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        *control = control.resubscribe();
                        self.catch_up(gw).await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                () = self.wake.notified() => {
                    self.publish_pending(gw).await;
                    self.report(gw).await;
                }
                _ = tick.tick() => {
                    self.publish_pending(gw).await;
                    self.report(gw).await;
                }
                () = stopped(stop) => return Ok(()),
            }
        }
    }
}

/// A request to another gateway with a JSON body and a JSON answer.
async fn request<T: Serialize, R: for<'de> Deserialize<'de>>(
    client: &async_nats::Client,
    subject: String,
    body: &T,
) -> Result<R, String> {
    let payload = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    let req = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(REQUEST_TIMEOUT));
    let msg = client
        .send_request(subject, req)
        .await
        .map_err(|e| e.to_string())?;
    let r: Reply = serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())?;
    if let Some(e) = &r.error {
        return Err(e.clone());
    }
    serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
