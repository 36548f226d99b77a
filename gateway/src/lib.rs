//! The IoT device gateway: mutual-TLS device sessions, durable telemetry with acks,
//! and a command relay, behind one library handle, [`Gateway`].
//!
//! ```text
//!  devices ══TLS══► server (accept, handshake budget, handshake, identity = cert CN,
//!                     │        connection cap)           one task per connection;
//!                     │        TLS: tls_stream (rustls unbuffered, no buffer while idle)
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

pub(crate) mod api;
pub(crate) mod bridge;
pub(crate) mod budget;
pub mod config;
pub(crate) mod events;
pub(crate) mod firmware;
pub(crate) mod fleet;
mod handle;
pub(crate) mod inbound;
mod loglimit;
pub(crate) mod registry;
pub(crate) mod server;
pub(crate) mod session;
mod shared;
pub(crate) mod state;
pub(crate) mod store;
pub(crate) mod tls;
pub(crate) mod tls_stream;
pub(crate) mod values;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_client::proto::{self, DeviceId};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use config::{Config, LogFormat};
pub use events::{Event, Histogram, Metrics};
use registry::Registry;
pub use state::{Delta, DesiredDoc, StateError};
pub use store::{
    CommandRecord, CommandState, DeviceRecord, PutDesired, RefusalRecord, StateView, Store,
    StoreError, TelemetryQuery, TelemetryRecord,
};
pub use tls::{Refusal, TlsLoadError};
use tls::{TlsSettings, TlsState};

pub use handle::{CommandError, ttl_from_secs};
pub use store::backup_file;

/// What the end-to-end tests use beyond the handle: not an API for anyone else.
#[doc(hidden)]
pub mod testing {
    pub use crate::api::routes as api_routes;
    pub use crate::store::now_ms;
    pub use crate::tls::{TlsMaterial, TlsSettings, identify};
    pub use crate::values::readings_to_json;
}
pub(crate) use shared::Shared;

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
    /// The release key (`release_key`) could not be read.
    #[error("release_key: {0} (give the release.pub.pem that `certs release-key` wrote)")]
    ReleaseKey(String),
    /// The listener could not bind.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
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
        let release_key = config
            .release_key
            .as_deref()
            .map(firmware::upload::read_release_key)
            .transpose()
            .map_err(StartError::ReleaseKey)?;
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
        let firmware = firmware::Service::load(&store, release_key).await?;
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
            firmware,
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
    pub fn recent_refusals(&self) -> Vec<RefusalRecord> {
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
        // Rollout progress the sessions reported last.
        self.shared.firmware.flush().await;
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
            // Rollout devices past their deadline fail and free their slots.
            let now = store::now_ms();
            shared
                .firmware
                .change(&shared, |r| r.expire(now, |d| shared.registry.is_online(d)));
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
