//! The IoT device gateway: mutual-TLS device sessions, durable telemetry with acks,
//! and a command relay, behind one library handle, [`Gateway`].
//!
//! ```text
//!  devices ══TLS══► server (accept, handshake budget, handshake, identity = cert CN,
//!                     │        connection cap)           one task per connection
//!                     ▼
//!                   session ── Batch ──► store writer ── group commit ──► SQLite (WAL)
//!                     ▲  │  ◄── BatchDone (then Ack) ──┘                      ▲
//!                     │  └── live events ──► Gateway::subscribe()             │
//!   Gateway::send_command ──► command queue (store) ── notify ──► session     │
//!   Gateway::devices / telemetry / command ───────── read-only connections ───┤
//!   bridge (MQTT): committed rows after its cursor ──► broker; presence,      │
//!     command states ──► broker; command requests ◄── broker ── send_command ─┘
//! ```
//!
//! Guarantees (PROTOCOL.md §8): a record is acked only after the commit that holds it;
//! it is stored once however often it is replayed; commands are delivered at least once
//! and expire by their time to live. Every input from a device is bounded and checked:
//! a bad device is closed with a typed reason and no other device notices. Devices,
//! handshakes in progress and API clients have budgets of their own that fit the
//! open-file limit together (`budget`); docs/SECURITY.md has the threat model.

pub mod api;
pub(crate) mod bridge;
pub(crate) mod budget;
pub mod config;
pub mod events;
pub(crate) mod fleet;
pub mod inbound;
mod loglimit;
pub(crate) mod registry;
pub(crate) mod server;
pub(crate) mod session;
pub mod store;
pub mod tail;
pub mod tls;
pub mod values;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_client::proto::{self, DeviceId};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::{Config, LogFormat};
pub use events::{Event, Metrics};
use registry::Registry;
pub use store::{
    CommandRecord, CommandState, DeviceRecord, Store, StoreError, TelemetryQuery, TelemetryRecord,
};
use tls::{TlsSettings, TlsState};

/// State shared by the listener, the sessions and the handle.
pub(crate) struct Shared {
    /// Settings.
    pub config: Config,
    /// The settings every session obeys (from `config`).
    pub session_rules: Arc<session::machine::Rules>,
    /// The store.
    pub store: Store,
    /// TLS material, reloadable.
    pub tls: TlsState,
    /// Live sessions.
    pub registry: Registry,
    /// Counters.
    pub metrics: Metrics,
    events: broadcast::Sender<Arc<Event>>,
    /// Presence and command events only, for the bridge: a few per device, where
    /// `events` carries every record too.
    control: broadcast::Sender<Arc<Event>>,
    /// Set once to make every task wind down.
    pub shutting_down: watch::Sender<bool>,
    /// Device connections past the handshake at once (`max_connections`, or what the
    /// open-file limit leaves: [`budget::plan`]).
    pub max_connections: usize,
    waiters: Mutex<HashMap<i64, Vec<oneshot::Sender<CommandRecord>>>>,
    refusals: Mutex<std::collections::VecDeque<events::Refused>>,
    /// Whether `refusals` changed since it was last saved.
    refusals_changed: std::sync::atomic::AtomicBool,
    log_gates: loglimit::LogGates,
    /// What the last look found the CRL to be (0 fine, 1 due within a week, 2 stale),
    /// to warn once per change.
    crl_state: std::sync::atomic::AtomicU8,
    /// Whether the gateway certificate's coming expiry was warned about.
    gateway_cert_warned: std::sync::atomic::AtomicBool,
    /// The MQTT bridge's state, if it runs.
    pub bridge: Option<Arc<bridge::BridgeStatus>>,
    /// The fleet sink's state, if it runs.
    pub fleet: Option<Arc<fleet::FleetStatus>>,
    /// The fleet's device registry, if this gateway is in a fleet.
    pub fleet_registry: Option<Arc<fleet::registry::FleetRegistry>>,
    /// Commands across the fleet, if this gateway is in one.
    pub fleet_commands: Option<Arc<fleet::commands::FleetCommands>>,
}

/// Refused handshakes kept for `recent_refusals` (and saved in the store).
const KEEP_REFUSALS: usize = 200;

impl Shared {
    /// Remembers a refused handshake (the newest [`KEEP_REFUSALS`]) and publishes it.
    pub fn refused(&self, r: events::Refused) {
        {
            let mut q = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() == KEEP_REFUSALS {
                q.pop_front();
            }
            q.push_back(r.clone());
        }
        self.refusals_changed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.publish(|| Event::HandshakeRefused {
            peer: r.peer,
            reason: r.reason,
            time_ms: r.time_ms,
            subject: r.subject,
            serial: r.serial,
        });
    }

    /// Whether anyone listens to live events (events are only built if so).
    pub fn has_subscribers(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Publishes an event built by `make`, if anyone listens.
    pub fn publish(&self, make: impl FnOnce() -> Event) {
        if self.has_subscribers() {
            let _ = self.events.send(Arc::new(make()));
        }
    }

    /// Publishes a presence or command event: to live subscribers, and to the bridge.
    pub fn publish_control(&self, event: Event) {
        let event = Arc::new(event);
        if self.control.receiver_count() > 0 {
            let _ = self.control.send(event.clone());
        }
        if self.has_subscribers() {
            let _ = self.events.send(event);
        }
    }

    /// Presence and command events from now on (what the bridge relays).
    pub fn subscribe_control(&self) -> broadcast::Receiver<Arc<Event>> {
        self.control.subscribe()
    }

    /// A command changed state: publish it, and wake whoever waits for its end.
    pub fn command_changed(&self, rec: CommandRecord) {
        let rec_id = rec.id;
        if rec.state.is_final() {
            let waiting = self
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&rec.id);
            for tx in waiting.into_iter().flatten() {
                let _ = tx.send(rec.clone());
            }
        }
        self.publish_control(Event::Command(rec));
        // A copy of another gateway's command (shown with its owner's id, in another
        // slot): its new state goes to the owner now, not at the next retry tick.
        if let Some(fc) = &self.fleet_commands
            && store::slot_of(rec_id) != fc.slot()
        {
            fc.poke();
        }
    }

    /// Why the gateway cannot keep what it acknowledges right now, if it cannot: what
    /// `/healthz` reports.
    pub fn unhealthy(&self) -> Option<store::Failing> {
        self.store.failing()
    }

    /// Saves the refused handshakes kept in memory, if they changed since the last
    /// save (so they survive a restart; a crash loses at most the last few seconds).
    pub async fn save_refusals(&self) {
        use std::sync::atomic::Ordering;
        if !self.refusals_changed.swap(false, Ordering::Relaxed) {
            return;
        }
        let list: Vec<_> = {
            let q = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            q.iter().cloned().collect()
        };
        if let Err(e) = self.store.save_refusals(list).await {
            warn!(error = %e, "could not save the refused handshakes");
        }
    }

    /// Looks at the CRL's next-update date and the gateway certificate's expiry: warns
    /// from [`WARN_AHEAD_S`] before either (once per change of state, until fresh ones
    /// are loaded), and again once the CRL has passed; returns whether it has.
    pub fn check_crl(&self) -> bool {
        use std::sync::atomic::Ordering;
        let material = self.tls.current();
        let now = tls::unix_now();
        let stale = material.crl_stale(now);
        let soon = |t: Option<i64>| t.is_some_and(|t| t - now < WARN_AHEAD_S);
        // 0: fine, 1: within the warning period, 2: past it.
        let state = if stale {
            2
        } else {
            u8::from(soon(material.crl_next_update))
        };
        let was = self.crl_state.swap(state, Ordering::Relaxed);
        let next_update = material.crl_next_update.unwrap_or_default();
        match (was, state) {
            (w, 2) if w != 2 => {
                let policy = if self.config.refuse_stale_crl {
                    "every device is refused until it is (refuse_stale_crl)"
                } else {
                    "its revocations still apply; set refuse_stale_crl to refuse devices instead"
                };
                warn!(
                    next_update,
                    "the CRL is past its next update: re-sign it (certs crl --dir DIR \
                     --refresh) and reload (SIGHUP); {policy}"
                );
            }
            (w, 1) if w != 1 => warn!(
                next_update,
                days_left = (next_update - now) / 86_400,
                "the CRL's next update is less than 7 days away: re-sign it (certs crl \
                 --dir DIR --refresh) and reload (SIGHUP) before then"
            ),
            (w, 0) if w != 0 => info!("the CRL is fresh again"),
            _ => {}
        }
        let gw_soon = soon(material.gateway_not_after);
        if gw_soon && !self.gateway_cert_warned.swap(true, Ordering::Relaxed) {
            warn!(
                not_after = material.gateway_not_after.unwrap_or_default(),
                "the gateway's certificate expires in less than 7 days: renew it (certs \
                 renew) and reload (SIGHUP)"
            );
        } else if !gw_soon {
            self.gateway_cert_warned.store(false, Ordering::Relaxed);
        }
        stale
    }
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

/// How long before the CRL's next update, or the gateway certificate's expiry, the
/// gateway starts warning.
pub const WARN_AHEAD_S: i64 = 7 * 86_400;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The TLS files could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsLoadError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The API token could not be read or made.
    #[error(transparent)]
    Token(#[from] api::TokenError),
    /// Another gateway holds the data directory.
    #[error(
        "the data directory {} is in use by another gateway{}: stop it, or give this one \
         another --data-dir",
        dir.display(),
        pid.map(|p| format!(" (process {p})")).unwrap_or_default()
    )]
    DataDirInUse {
        /// The directory.
        dir: std::path::PathBuf,
        /// The process holding it, as it wrote in the lock file.
        pid: Option<u32>,
    },
    /// The data directory's lock file could not be made or locked.
    #[error("locking the data directory ({}): {source}", path.display())]
    Lock {
        /// The lock file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The MQTT bridge's settings or TLS files are wrong.
    #[error(transparent)]
    Bridge(#[from] bridge::BridgeError),
    /// The listener could not bind.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

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

/// A running gateway. Cheap to clone; every clone is the same gateway.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    api: Option<ApiInfo>,
    tasks: Arc<Mutex<Option<Tasks>>>,
}

/// Where the operator API listens, and its token.
#[derive(Clone, Debug)]
pub struct ApiInfo {
    /// Listener address.
    pub addr: SocketAddr,
    /// Bearer token.
    pub token: Arc<str>,
    /// Whether the token was made by this start (so it should be shown once).
    pub token_created: bool,
}

struct Tasks {
    /// Held until the store is closed.
    _lock: std::fs::File,
    stop: watch::Sender<bool>,
    bridge: Option<JoinHandle<()>>,
    fleet: Option<JoinHandle<()>>,
    fleet_registry: Option<JoinHandle<()>>,
    fleet_commands: Option<JoinHandle<()>>,
    server: JoinHandle<()>,
    api: Option<JoinHandle<()>>,
    housekeeping: JoinHandle<()>,
    writer: store::WriterThread,
}

impl Gateway {
    /// Checks the settings, loads TLS, opens the store, binds the device listener and
    /// starts serving. Returns once devices can connect.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        config.validate()?;
        let budgets = budget::plan(&config, budget::raise_open_file_limit())?;
        // Before anything touches the store: two gateways on one store would each mark
        // the other's devices offline and answer for sessions they do not hold.
        let lock = lock_data_dir(&config.data_dir)?;
        let tls = TlsState::new(TlsSettings {
            ca: config.ca.clone(),
            cert: config.cert.clone(),
            key: config.key.clone(),
            crl: config.crl.clone(),
            tls13_only: config.tls13_only,
            refuse_stale_crl: config.refuse_stale_crl,
            max_fragment_size: config.max_fragment_size,
        })?;
        let (store, writer) = Store::open(store::StoreOptions {
            path: config.database_path(),
            danger_ack_before_fsync: config.danger_ack_before_fsync,
            max_commit_records: config.max_commit_records,
            max_queued_commands: config.max_queued_commands,
            sinks: config
                .mqtt
                .iter()
                .map(|m| store::SinkSpec {
                    name: bridge::SINK,
                    drop_undelivered: m.drop_undelivered,
                })
                .chain(config.fleet.iter().map(|_| store::SinkSpec {
                    name: fleet::SINK,
                    drop_undelivered: false,
                }))
                .collect(),
        })?;
        let saved_refusals = store.refusals().await.unwrap_or_else(|e| {
            warn!(error = %e, "could not read the saved refused handshakes");
            Vec::new()
        });
        let listener = server::bind(config.listen, config.listen_backlog).map_err(|source| {
            StartError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (bridge_status, bridge) = match &config.mqtt {
            Some(m) => {
                let status = Arc::new(bridge::BridgeStatus::default());
                let b = bridge::Bridge::new(m.clone(), store.clone(), status.clone())?;
                (Some(status), Some(b))
            }
            None => (None, None),
        };
        let (fleet_status, fleet) = match &config.fleet {
            Some(f) => {
                let status = Arc::new(fleet::FleetStatus::default());
                let sink = fleet::FleetSink::new(f.clone(), store.clone(), status.clone());
                (Some(status), Some(sink))
            }
            None => (None, None),
        };
        let fleet_registry = config
            .fleet
            .clone()
            .map(|f| Arc::new(fleet::registry::FleetRegistry::new(f)));
        let fleet_commands = config
            .fleet
            .clone()
            .map(|f| Arc::new(fleet::commands::FleetCommands::new(f)));
        let (events, _) = broadcast::channel(4096);
        let (control, _) = broadcast::channel(4096);
        let (shutting_down, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            session_rules: Arc::new(session::machine::Rules::of(&config)),
            config,
            store,
            tls,
            registry: Registry::default(),
            metrics: Metrics::default(),
            events,
            control,
            shutting_down,
            max_connections: budgets.max_connections,
            waiters: Mutex::new(HashMap::new()),
            refusals: Mutex::new(saved_refusals.into()),
            refusals_changed: std::sync::atomic::AtomicBool::new(false),
            log_gates: loglimit::LogGates::default(),
            crl_state: std::sync::atomic::AtomicU8::new(0),
            gateway_cert_warned: std::sync::atomic::AtomicBool::new(false),
            bridge: bridge_status.clone(),
            fleet: fleet_status,
            fleet_registry,
            fleet_commands,
        });
        info!(
            max_connections = budgets.max_connections,
            max_handshakes = shared.config.max_handshakes,
            api_max_connections = shared.config.api_max_connections,
            open_files = budgets.open_files,
            "connection budgets"
        );
        shared.check_crl();
        let (stop_tx, stop_rx) = watch::channel(false);
        let api_listener = match shared.config.api_listen {
            Some(addr) => {
                let (token, token_created) =
                    api::load_or_create_token(&shared.config.token_path())?;
                let l = server::bind(addr, shared.config.listen_backlog)
                    .map_err(|source| StartError::Bind { addr, source })?;
                let bound = l
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                Some((
                    l,
                    ApiInfo {
                        addr: bound,
                        token: Arc::from(token),
                        token_created,
                    },
                ))
            }
            None => None,
        };
        let server = tokio::spawn(server::run(listener, shared.clone(), stop_rx.clone()));
        let housekeeping = tokio::spawn(housekeeping(shared.clone()));
        info!(%local_addr, "gateway listening for devices");
        let mut gw = Gateway {
            shared,
            local_addr,
            api: None,
            tasks: Arc::new(Mutex::new(None)),
        };
        let api_task = api_listener.map(|(l, info)| {
            info!(addr = %info.addr, "operator API and dashboard listening");
            let router = api::router(gw.clone(), &info.token);
            gw.api = Some(info);
            tokio::spawn(api::serve(l, router, gw.shared.clone(), stop_rx.clone()))
        });
        let bridge = bridge.map(|b| tokio::spawn(b.run(gw.clone(), stop_rx.clone())));
        let fleet = fleet.map(|f| tokio::spawn(f.run(stop_rx.clone())));
        let fleet_registry = gw
            .shared
            .fleet_registry
            .clone()
            .map(|r| tokio::spawn(r.run(gw.clone(), stop_rx.clone())));
        let fleet_commands = gw
            .shared
            .fleet_commands
            .clone()
            .map(|c| tokio::spawn(c.run(gw.clone(), stop_rx.clone())));
        // The router and the bridge hold clones made before `api` was set; they need
        // only the shared state, never the API address.
        gw.tasks = Arc::new(Mutex::new(Some(Tasks {
            stop: stop_tx,
            api: api_task,
            server,
            housekeeping,
            bridge,
            fleet,
            fleet_registry,
            fleet_commands,
            writer,
            _lock: lock,
        })));
        Ok(gw)
    }

    /// The device listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The operator API's address and token, if it runs.
    pub fn api(&self) -> Option<&ApiInfo> {
        self.api.as_ref()
    }

    /// The most recent refused handshakes, oldest first.
    /// The newest refused handshakes, newest first.
    pub fn recent_refusals(&self) -> Vec<events::Refused> {
        self.shared
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    /// The shared state (settings, store, metrics).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The settings it runs with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The store, for queries.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Live events from now on. A subscriber that falls more than 4,096 events behind
    /// misses the oldest (and is told so by `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.shared.events.subscribe()
    }

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

    /// Reads the CA bundle, CRL and gateway certificate again. New handshakes use them
    /// at once; live sessions whose certificate is now revoked are closed with
    /// `Goodbye{Revoked}`. Returns the ids of the devices closed. On error, the old
    /// material stays in force.
    pub fn reload_tls(&self) -> Result<Vec<String>, tls::TlsLoadError> {
        let material = self.shared.tls.reload()?;
        self.shared.check_crl();
        let closed = self
            .shared
            .registry
            .close_revoked(|serial| material.revoked.contains(serial));
        if closed.is_empty() {
            info!(revoked = material.revoked.len(), "TLS material reloaded");
        } else {
            warn!(devices = ?closed, "TLS material reloaded: closing revoked devices");
        }
        Ok(closed)
    }

    /// Stops accepting, says `Goodbye{Shutdown}` to every device, commits what they
    /// sent, and closes the store. Idempotent.
    pub async fn shutdown(&self) {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(tasks) = tasks else {
            return;
        };
        tasks.stop.send_replace(true);
        let _ = tasks.server.await;
        if let Some(api) = tasks.api {
            let _ = api.await;
        }
        tracing::debug!("listener and sessions done");
        // After the sessions' last commits, before the store closes: the bridge
        // collects the PUBACKs in flight and saves its cursor.
        if let Some(b) = tasks.bridge {
            let _ = b.await;
        }
        if let Some(f) = tasks.fleet {
            let _ = f.await;
        }
        if let Some(r) = tasks.fleet_registry {
            let _ = r.await;
        }
        if let Some(c) = tasks.fleet_commands {
            let _ = c.await;
        }
        tasks.housekeeping.abort();
        self.shared.save_refusals().await;
        tasks.writer.stop(&self.shared.store).await;
        info!("gateway stopped");
    }
}

/// Takes `DIR/gateway.lock` (an advisory `flock`, released by the kernel when the
/// process ends, however it ends) and writes this process's id into it; the error
/// names the process holding it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path = dir.join("gateway.lock");
    let io = |source| StartError::Lock {
        path: path.clone(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StartError::DataDirInUse {
                dir: dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// Background chores: expire commands and summarise rate-limited log lines every
/// second; look at the CRL's age and apply retention every minute.
async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        shared.log_gates.summarize(Instant::now());
        match shared.store.expire_commands().await {
            Ok(expired) => {
                for rec in expired {
                    info!(command = rec.id, device = %rec.device, "command expired");
                    shared.command_changed(rec);
                }
            }
            Err(StoreError::Closed) => return,
            Err(e) => warn!(error = %e, "expiring commands failed"),
        }
        if n.is_multiple_of(5) {
            shared.save_refusals().await;
        }
        if n.is_multiple_of(60) {
            shared.check_crl();
            let cfg = &shared.config;
            if cfg.retention.is_some() || cfg.retention_max_rows.is_some() {
                match shared
                    .store
                    .apply_retention(cfg.retention, cfg.retention_max_rows)
                    .await
                {
                    Ok(store::Pruned { deleted: 0, .. }) => {}
                    Ok(store::Pruned {
                        deleted,
                        undelivered: 0,
                    }) => info!(deleted, "telemetry retention applied"),
                    Ok(store::Pruned {
                        deleted,
                        undelivered,
                    }) => {
                        if let Some(b) = &shared.bridge {
                            b.dropped
                                .fetch_add(undelivered, std::sync::atomic::Ordering::Relaxed);
                        }
                        warn!(
                            deleted,
                            undelivered,
                            "telemetry retention deleted records the MQTT bridge had not \
                             delivered (mqtt.drop_undelivered): they never reach the broker"
                        );
                    }
                    Err(e) => warn!(error = %e, "telemetry retention failed"),
                }
            }
        }
        n = n.wrapping_add(1);
    }
}
