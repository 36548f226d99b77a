//! Simulated devices: thousands of [`Client`](crate::machine::Client)s in one process,
//! each with its own certificate, TLS connection, telemetry and commands (feature
//! `sim`). The `device-sim` command line and the gateway's quick start use it.
//!
//! ```text
//!  Simulator::start(SimConfig)
//!   ├─ worker thread 0: current-thread tokio + LocalSet ─► device 0, T, 2T ... ─┐
//!   ├─ worker thread 1: ...                             ─► device 1, T+1 ...   ─┤─ TLS ─► gateway
//!   │     each device: run(client, SimConnector, clock, SimApp) ; reboot = new Client
//!   │     SimConnector: a shared semaphore bounds concurrent connects+handshakes;
//!   │     a dropped connection is closed with close_notify (the worker waits for it)
//!   └─ control thread: run for `duration` or until stop() ─► drain (wait for acks,
//!        bounded) ─► stop devices ─► Summary
//!  Monitor::stats() ◄── per-thread atomic counters (no locks on the devices' path)
//! ```
//!
//! Each device samples a plausible drifting reading set (temperature, humidity, battery,
//! uptime, signal strength) at `rate` records per second and answers the commands
//! `echo` (returns its arguments), `set_interval` (`interval_ms` or `interval_s`),
//! `reboot` (answers, waits up to 5 s for its ring to drain, then starts a new client
//! with a new random boot id) and `UnknownCommand` for anything else. Reconnects are the
//! client's own (backoff with jitter).
//!
//! Devices speak protocol version 3 and install the firmware a gateway's rollout offers
//! through the real [`Updater`](crate::firmware::Updater), into an in-memory update
//! partition of [`PARTITION_BYTES`] (held only while a transfer runs): after `Verified`
//! a device restarts (a new boot id, after a last record `event: "firmware_update"`)
//! and says the offered version in its next `Hello`; its desired settings are kept, as
//! across a `reboot`. With [`SimConfig::release_key`] the updater checks the release
//! signature as a firmware does; without, size and SHA-256 only (a simulator
//! convenience, never a firmware's behaviour). [`SimConfig::firmware_failure_rate`]
//! makes that share of devices (chosen by a hash of the device id and the offer id, the
//! same in every run) fail the last write of an image and report `StorageError` after
//! downloading it. A `reboot` in the middle of a transfer resumes it from the partition
//! in the next boot.
//!
//! The [`Summary`] holds, per device and boot id, how many records were queued (their
//! seqs are exactly `1..=sent`) and the highest seq acked: after a drained run, the
//! store must hold exactly `1..=sent` for every (device, boot id), each once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), device_client::sim::SimError> {
//! use device_client::sim::{Devices, SimConfig, Simulator};
//! let devices = Devices::Dir { dir: "certs".into(), prefix: "sim-".into(), first: 0, count: 100 };
//! let mut config = SimConfig::new("127.0.0.1:7443", devices);
//! config.rate = 0.5;
//! config.duration = Some(std::time::Duration::from_secs(30));
//! let sim = Simulator::start(config)?;
//! let summary = sim.wait().await?;
//! println!("{} sent, {} acked", summary.counts.sent, summary.counts.acked);
//! # Ok(()) }
//! ```

extern crate std;

mod conn;
mod device;
mod firmware;
mod identity;
mod stats;

use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::vec::Vec;

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, oneshot, watch};

pub use firmware::PARTITION_BYTES;
pub use identity::{DeviceIdentity, client_config, load_dir, sequential_ids};
pub use stats::{Counts, Histogram, LatencySummary, Phase, Stats};

use crate::firmware::RELEASE_KEY_LEN;
use crate::machine::Millis;
use stats::Global;

/// The ring sizes a simulated device can have, in bytes.
pub const RING_SIZES: [usize; 7] = [1024, 2048, 4096, 8192, 16384, 32768, 65536];

/// The firmware version simulated devices announce.
pub const FIRMWARE: &str = concat!("device-sim/", env!("CARGO_PKG_VERSION"));

/// Which devices to simulate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Devices {
    /// Load `count` devices `PREFIX{first..}` from a `certs` directory (`DIR/ca.pem`,
    /// `DIR/devices/ID/{cert,key}.pem`), as `certs devices --prefix PREFIX --start FIRST
    /// --count COUNT` wrote them.
    Dir {
        /// The `certs` directory.
        dir: PathBuf,
        /// Id prefix, e.g. `sim-`.
        prefix: String,
        /// First counter value (`certs devices --start`).
        first: u64,
        /// How many devices.
        count: usize,
    },
    /// Devices whose TLS settings are already loaded (e.g. minted in memory).
    Loaded(Vec<DeviceIdentity>),
}

/// Settings of a simulation. [`SimConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SimConfig {
    /// The gateway's device listener, `host:port`; or several, comma-separated (a
    /// fleet): each device starts at one of them (devices spread evenly) and moves to
    /// the next after a failed connect.
    pub gateway: String,
    /// The name the gateway's certificate must carry.
    pub server_name: String,
    /// The devices.
    pub devices: Devices,
    /// Telemetry records per second per device (0: none; 0.2 is one every 5 s).
    pub rate: f64,
    /// How long to produce telemetry; `None`: until [`Monitor::stop`].
    pub duration: Option<Duration>,
    /// After producing stops, how long to wait for the last acks.
    pub drain_timeout: Duration,
    /// Each device's ring of unacked records, in bytes: rounded up to one of
    /// [`RING_SIZES`]. A record takes about 90 bytes.
    pub ring_bytes: usize,
    /// Worker threads; `None`: one per core.
    pub threads: Option<usize>,
    /// Connects and TLS handshakes in progress at once, across all devices.
    pub max_handshakes: usize,
    /// Time allowed for one TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// First reconnect delay (it doubles per failed attempt, with jitter).
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Firmware version in `Hello`, until a device installs another.
    pub firmware: &'static str,
    /// The lowest protocol version devices accept in `Welcome` (1: any gateway; 2:
    /// refuse a version 1 gateway, as a device that needs the state document would).
    pub min_version: u8,
    /// The firmware release key (65 bytes SEC1, `certs release-key`'s
    /// `release.pub.bin`; [`load_release_key`] reads it or the PEM): offered images
    /// must carry its signature, as on a real device. `None`: devices check an image's
    /// size and SHA-256 only, a simulator convenience for trying rollouts without a
    /// key, never what a firmware does.
    pub release_key: Option<[u8; RELEASE_KEY_LEN]>,
    /// The share of devices (0 to 1) whose flash fails the last write of an offered
    /// image: they download it and report `StorageError` instead of installing it.
    /// Chosen by a hash of the device id and the offer id, so the same devices fail the
    /// same offer in every run.
    pub firmware_failure_rate: f64,
}

impl SimConfig {
    /// One record per second per device, until stopped; 4 KiB rings; 64 handshakes at
    /// once; reconnect backoff from 1 s to 60 s; 10 s to drain.
    pub fn new(gateway: impl Into<String>, devices: Devices) -> Self {
        Self {
            gateway: gateway.into(),
            server_name: "localhost".into(),
            devices,
            rate: 1.0,
            duration: None,
            drain_timeout: Duration::from_secs(10),
            ring_bytes: 4096,
            threads: None,
            max_handshakes: 64,
            connect_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            firmware: FIRMWARE,
            min_version: crate::proto::MIN_PROTOCOL_VERSION,
            release_key: None,
            firmware_failure_rate: 0.0,
        }
    }
}

/// A simulation could not start, or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The certs directory has no CA certificate.
    #[error(
        "{} not found: run: certs init --dir {dir} && certs devices --dir {dir} --prefix {prefix} --count {count}",
        path.display(),
        dir = dir.display()
    )]
    NoCa {
        /// The missing file.
        path: PathBuf,
        /// The certs directory.
        dir: PathBuf,
        /// The id prefix.
        prefix: String,
        /// How many devices were asked for.
        count: usize,
    },
    /// A device's certificate or key is missing.
    #[error(
        "no certificate for device {id} ({}): run: certs devices --dir {} --prefix {prefix}{} --count {count} --skip-existing",
        path.display(),
        dir.display(),
        if *first > 0 { std::format!(" --start {first}") } else { String::new() }
    )]
    MissingDevice {
        /// The device id.
        id: String,
        /// The missing file.
        path: PathBuf,
        /// The certs directory.
        dir: PathBuf,
        /// The id prefix.
        prefix: String,
        /// The first counter value.
        first: u64,
        /// How many devices were asked for.
        count: usize,
    },
    /// A PEM file could not be read or used.
    #[error("{}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A setting cannot work.
    #[error("invalid setting: {0}")]
    Config(String),
    /// A worker thread or its runtime could not be started.
    #[error("starting worker threads: {0}")]
    Threads(#[from] std::io::Error),
    /// A worker thread panicked.
    #[error("a simulator thread panicked")]
    WorkerPanicked,
}

/// One boot of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSummary {
    /// The boot id (random).
    pub boot_id: u64,
    /// Records queued in this boot: their seqs are exactly `1..=sent`.
    pub sent: u32,
    /// The highest seq the gateway acknowledged (0: none). Everything up to it is
    /// durable.
    pub acked: u32,
    /// Records above `acked` given up by a reboot that waited 5 s in vain (the gateway
    /// may or may not hold them: it holds a prefix `1..=n` with `acked <= n <= sent`).
    pub lost: u32,
}

/// One device's run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// The device id.
    pub id: String,
    /// Every boot, oldest first (more than one after `reboot` commands).
    pub boots: Vec<BootSummary>,
    /// Sessions opened.
    pub connects: u64,
    /// Commands run.
    pub commands: u64,
    /// Samples dropped because the ring was full.
    pub ring_full: u64,
    /// Why the gateway refused this device for good, if it did.
    pub fatal: Option<String>,
    /// The firmware version it ran at the end.
    pub firmware: String,
    /// Firmware images it installed (each followed by a restart).
    pub firmware_installs: u64,
}

impl DeviceSummary {
    /// Records queued over all boots.
    pub fn sent(&self) -> u64 {
        self.boots.iter().map(|b| u64::from(b.sent)).sum()
    }
}

/// The result of a simulation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Simulated devices.
    pub devices: usize,
    /// Records per second per device asked for.
    pub rate_per_device: f64,
    /// Milliseconds from the start until producing stopped.
    pub run_ms: u64,
    /// Milliseconds spent draining.
    pub drain_ms: u64,
    /// Whether every record queued was acked (or lost to a reboot) before the drain
    /// timeout.
    pub drained: bool,
    /// Milliseconds from the start until every device had opened a session once.
    pub all_connected_after_ms: Option<u64>,
    /// What happened, counted (flattened: its fields are keys of the summary's JSON).
    #[serde(flatten)]
    pub counts: Counts,
    /// Ack latency of records queued on an open session.
    pub ack_latency: LatencySummary,
    /// Every device, in the order of [`SimConfig::devices`].
    pub per_device: Vec<DeviceSummary>,
}

/// What the devices share, fixed at the start.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) gateway: String,
    pub(crate) server_name: String,
    pub(crate) interval_ms: Option<f64>,
    pub(crate) backoff_min_ms: Millis,
    pub(crate) backoff_max_ms: Millis,
    pub(crate) connect_timeout: Duration,
    pub(crate) firmware: &'static str,
    pub(crate) min_version: u8,
    pub(crate) release_key: Option<[u8; RELEASE_KEY_LEN]>,
    pub(crate) firmware_failure_rate: f64,
}

/// 0: run, 1: stop (then drain), 2: abort (no drain).
#[derive(Default)]
struct StopSignal {
    level: Mutex<u8>,
    changed: Condvar,
}

impl StopSignal {
    fn raise(&self, to: u8) {
        let mut level = self.level.lock().unwrap_or_else(|p| p.into_inner());
        *level = (*level).max(to);
        self.changed.notify_all();
    }

    /// Waits until the level reaches `at_least` or `timeout` passes (`None`: forever);
    /// returns the level.
    fn wait(&self, at_least: u8, timeout: Option<Duration>) -> u8 {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut level = self.level.lock().unwrap_or_else(|p| p.into_inner());
        while *level < at_least {
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(w) if !w.is_zero() => w,
                    _ => break,
                },
                None => Duration::from_secs(3600),
            };
            level = self
                .changed
                .wait_timeout(level, wait)
                .map(|(l, _)| l)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *level
    }
}

/// Watches and stops a running simulation; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Monitor {
    global: Arc<Global>,
    stop: Arc<StopSignal>,
}

impl Monitor {
    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.global.snapshot()
    }

    /// Stops producing telemetry, then drains: waits up to `drain_timeout` for every
    /// unacked record to be acked, then stops the devices. Returns at once.
    pub fn stop(&self) {
        self.stop.raise(1);
    }

    /// Stops at once, without waiting for acks.
    pub fn abort(&self) {
        self.stop.raise(2);
    }
}

/// A running simulation. Dropping it (or the future of [`wait`](Self::wait)) stops
/// the simulation as [`Monitor::abort`] does.
pub struct Simulator {
    monitor: Monitor,
    done: Option<oneshot::Receiver<Result<Summary, SimError>>>,
}

impl Simulator {
    /// Loads the devices' certificates (blocking: about a second for 10,000 devices),
    /// starts the worker threads and returns; devices connect in the background, at
    /// most `max_handshakes` at a time.
    pub fn start(config: SimConfig) -> Result<Simulator, SimError> {
        let settings = check(&config)?;
        let ring = RING_SIZES
            .iter()
            .copied()
            .find(|r| *r >= config.ring_bytes)
            .ok_or_else(|| {
                SimError::Config(std::format!(
                    "ring_bytes {} is above the largest ring, 65536",
                    config.ring_bytes
                ))
            })?;
        let identities = match config.devices {
            Devices::Dir {
                ref dir,
                ref prefix,
                first,
                count,
            } => load_dir(dir, prefix, first, count)?,
            Devices::Loaded(ref list) => list.clone(),
        };
        if identities.is_empty() {
            return Err(SimError::Config("no devices to simulate".into()));
        }
        let n = identities.len();
        let threads = config
            .threads
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .clamp(1, n);
        let global = Arc::new(Global::new(n, threads));
        let ramp = Arc::new(Semaphore::new(config.max_handshakes.max(1)));
        let settings = Arc::new(settings);
        let (phase_tx, phase_rx) = watch::channel(Phase::Running);
        // One seed per run from the OS (std's hasher keys), so boot ids differ between
        // runs against the same store.
        let seed = {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one((std::process::id(), Instant::now()))
        };

        let mut per_thread: Vec<Vec<(usize, DeviceIdentity)>> =
            (0..threads).map(|_| Vec::new()).collect();
        for (i, ident) in identities.into_iter().enumerate() {
            if let Some(list) = per_thread.get_mut(i % threads) {
                list.push((i, ident));
            }
        }
        let mut workers = Vec::with_capacity(threads);
        // Each thread builds its own runtime (a runtime must not be dropped in an async
        // context, which the caller may be) and reports whether it could.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let mut started = Ok(());
        for (t, devices) in per_thread.into_iter().enumerate() {
            let Some(shard) = global.shards.get(t).cloned() else {
                break;
            };
            let work = Worker {
                global: global.clone(),
                shard,
                settings: settings.clone(),
                ramp: ramp.clone(),
                phase: phase_rx.clone(),
                ring,
                seed,
                devices,
            };
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(std::format!("device-sim-{t}"))
                .spawn(move || work.run(ready));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    started = Err(e);
                    break;
                }
            }
        }
        drop(ready_tx);
        for _ in 0..workers.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => started = Err(e),
                Err(_) => started = Err(std::io::Error::other("a worker thread died")),
            }
        }
        if let Err(e) = started {
            // Whatever started stops at once.
            global.phase.store(2, Ordering::Release);
            phase_tx.send_replace(Phase::Stopped);
            for w in workers {
                let _ = w.join();
            }
            return Err(SimError::Threads(e));
        }

        let stop = Arc::new(StopSignal::default());
        let (done_tx, done_rx) = oneshot::channel();
        let control = Control {
            global: global.clone(),
            stop: stop.clone(),
            phase: phase_tx,
            duration: config.duration,
            drain_timeout: config.drain_timeout,
            rate: config.rate,
            workers,
        };
        std::thread::Builder::new()
            .name("device-sim-control".into())
            .spawn(move || {
                let _ = done_tx.send(control.run());
            })?;
        Ok(Simulator {
            monitor: Monitor { global, stop },
            done: Some(done_rx),
        })
    }

    /// A handle for stats and stopping that outlives [`wait`](Self::wait).
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.monitor.stats()
    }

    /// See [`Monitor::stop`].
    pub fn stop(&self) {
        self.monitor.stop();
    }

    /// Waits for the end (the duration passed or [`Monitor::stop`], then the drain) and
    /// returns the summary. Works on any async runtime.
    pub async fn wait(mut self) -> Result<Summary, SimError> {
        match self.done.take() {
            Some(rx) => rx.await.unwrap_or(Err(SimError::WorkerPanicked)),
            None => Err(SimError::WorkerPanicked),
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if self.done.is_some() {
            self.monitor.abort();
        }
    }
}

fn check(c: &SimConfig) -> Result<Settings, SimError> {
    let bad = |s: &str| Err(SimError::Config(s.into()));
    if !(c.rate.is_finite() && (0.0..=1000.0).contains(&c.rate)) {
        return bad("rate must be a number of records per second from 0 to 1000");
    }
    if rustls::pki_types::ServerName::try_from(c.server_name.as_str()).is_err() {
        return bad("server_name must be a DNS name or an IP address");
    }
    if c.gateway.is_empty() {
        return bad("gateway must be host:port");
    }
    if !(c.firmware_failure_rate.is_finite() && (0.0..=1.0).contains(&c.firmware_failure_rate)) {
        return bad("firmware_failure_rate must be a share from 0 to 1");
    }
    if let Some(key) = &c.release_key
        && p256::ecdsa::VerifyingKey::from_sec1_bytes(key).is_err()
    {
        return bad("release_key is not a P-256 public key (65 bytes SEC1, 04 || x || y)");
    }
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok(Settings {
        gateway: c.gateway.clone(),
        server_name: c.server_name.clone(),
        interval_ms: (c.rate > 0.0).then(|| 1000.0 / c.rate),
        backoff_min_ms: ms(c.backoff_min).max(1),
        backoff_max_ms: ms(c.backoff_max).max(ms(c.backoff_min)).max(1),
        connect_timeout: c.connect_timeout,
        firmware: c.firmware,
        min_version: c.min_version,
        release_key: c.release_key,
        firmware_failure_rate: c.firmware_failure_rate,
    })
}

/// One worker thread's share of the devices.
struct Worker {
    global: Arc<Global>,
    shard: Arc<stats::Shard>,
    settings: Arc<Settings>,
    ramp: Arc<Semaphore>,
    phase: watch::Receiver<Phase>,
    ring: usize,
    seed: u64,
    devices: Vec<(usize, DeviceIdentity)>,
}

impl Worker {
    fn run(
        self,
        ready: std::sync::mpsc::Sender<std::io::Result<()>>,
    ) -> Vec<(usize, DeviceSummary)> {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let _ = ready.send(Ok(()));
                rt
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return Vec::new();
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let ctx = std::rc::Rc::new(device::ThreadCtx {
                global: self.global.clone(),
                shard: self.shard.clone(),
                settings: self.settings.clone(),
                ramp: self.ramp.clone(),
                clock: crate::driver::tokio::TokioClock::new(),
                closer: conn::Closer::default(),
            });
            tokio::task::spawn_local(device::watch_drain(self.shard.clone(), self.phase.clone()));
            let mut tasks = Vec::with_capacity(self.devices.len());
            for (i, ident) in self.devices {
                let id = ident.id.clone();
                let seed = self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let handle =
                    spawn_device(self.ring, ctx.clone(), ident, i, seed, self.phase.clone());
                tasks.push((i, id, handle));
            }
            let mut out = Vec::with_capacity(tasks.len());
            for (i, id, handle) in tasks {
                let summary = handle.await.unwrap_or_else(|e| DeviceSummary {
                    id,
                    boots: Vec::new(),
                    connects: 0,
                    commands: 0,
                    ring_full: 0,
                    fatal: Some(std::format!("device task failed: {e}")),
                    firmware: String::new(),
                    firmware_installs: 0,
                });
                out.push((i, summary));
            }
            // The devices have let go of their connections; end them properly.
            ctx.closer.finish().await;
            out
        })
    }
}

/// The device task for a ring size from [`RING_SIZES`] (the ring is a const generic).
fn spawn_device(
    ring: usize,
    ctx: std::rc::Rc<device::ThreadCtx>,
    ident: DeviceIdentity,
    index: usize,
    seed: u64,
    phase: watch::Receiver<Phase>,
) -> tokio::task::JoinHandle<DeviceSummary> {
    use tokio::task::spawn_local;
    match ring {
        1024 => spawn_local(device::device::<1024>(ctx, ident, index, seed, phase)),
        2048 => spawn_local(device::device::<2048>(ctx, ident, index, seed, phase)),
        4096 => spawn_local(device::device::<4096>(ctx, ident, index, seed, phase)),
        8192 => spawn_local(device::device::<8192>(ctx, ident, index, seed, phase)),
        16384 => spawn_local(device::device::<16384>(ctx, ident, index, seed, phase)),
        32768 => spawn_local(device::device::<32768>(ctx, ident, index, seed, phase)),
        _ => spawn_local(device::device::<65536>(ctx, ident, index, seed, phase)),
    }
}

/// The control thread: run, drain, stop, collect.
struct Control {
    global: Arc<Global>,
    stop: Arc<StopSignal>,
    phase: watch::Sender<Phase>,
    duration: Option<Duration>,
    drain_timeout: Duration,
    rate: f64,
    workers: Vec<JoinHandle<Vec<(usize, DeviceSummary)>>>,
}

/// How often the drain looks at the counters.
const DRAIN_POLL: Duration = Duration::from_millis(10);

impl Control {
    fn run(self) -> Result<Summary, SimError> {
        let g = &self.global;
        let level = self.stop.wait(1, self.duration);
        let run_ms = ms(g.started.elapsed());
        g.phase.store(1, Ordering::Release);
        self.phase.send_replace(Phase::Draining);
        let drain_start = Instant::now();
        let mut drained = false;
        if level < 2 {
            let deadline = drain_start + self.drain_timeout;
            loop {
                // Only once every thread saw the drain start is the count final.
                if g.drain_seen() && g.unacked() == 0 {
                    drained = true;
                    break;
                }
                let now = Instant::now();
                if now >= deadline || self.stop.wait(2, Some(DRAIN_POLL.min(deadline - now))) >= 2 {
                    break;
                }
            }
        }
        let drain_ms = ms(drain_start.elapsed());
        g.phase.store(2, Ordering::Release);
        self.phase.send_replace(Phase::Stopped);
        let mut per_device = Vec::with_capacity(g.devices);
        let mut panicked = false;
        for w in self.workers {
            match w.join() {
                Ok(list) => per_device.extend(list),
                Err(_) => panicked = true,
            }
        }
        if panicked {
            return Err(SimError::WorkerPanicked);
        }
        per_device.sort_by_key(|(i, _)| *i);
        let s = g.snapshot();
        Ok(Summary {
            devices: g.devices,
            rate_per_device: self.rate,
            run_ms,
            drain_ms,
            drained,
            all_connected_after_ms: s.all_connected_after.map(ms),
            counts: s.counts,
            ack_latency: s.ack_latency.summary(),
            per_device: per_device.into_iter().map(|(_, d)| d).collect(),
        })
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads a firmware release public key for [`SimConfig::release_key`]: the 65 bytes of
/// `release.pub.bin` or the PEM of `release.pub.pem`, as `certs release-key` writes
/// them.
pub fn load_release_key(path: &Path) -> Result<[u8; RELEASE_KEY_LEN], SimError> {
    let fail = |reason: String| SimError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    crate::firmware::parse_release_key(&bytes).map_err(|e| fail(e.to_string()))
}

impl core::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Simulator").finish_non_exhaustive()
    }
}

impl core::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Monitor")
            .field("phase", &self.global.phase())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// `device-sim --json` prints a [`Summary`]: scripts read these keys, in this order.
    #[test]
    fn summary_json_keys_stay_put() {
        let summary = Summary {
            devices: 2,
            rate_per_device: 1.5,
            run_ms: 3,
            drain_ms: 4,
            drained: true,
            all_connected_after_ms: Some(5),
            counts: Counts {
                sent: 6,
                acked: 7,
                unacked: 8,
                ring_full: 9,
                connects: 10,
                reconnects: 11,
                disconnects: 12,
                disconnects_by_reason: BTreeMap::from([(String::from("closed"), 12)]),
                connect_failures: 13,
                connect_failures_by_reason: BTreeMap::from([(String::from("tls"), 13)]),
                commands: 14,
                reboots: 15,
                lost_on_reboot: 16,
                fatal: 17,
                firmware_installed: 18,
                firmware_failed: 19,
                firmware_declined: 20,
            },
            ack_latency: LatencySummary::default(),
            per_device: Vec::new(),
        };
        let text = serde_json::to_string(&summary).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"devices":2,"rate_per_device":1.5,"run_ms":3,"drain_ms":4,"drained":true,"#,
                r#""all_connected_after_ms":5,"sent":6,"acked":7,"unacked":8,"ring_full":9,"#,
                r#""connects":10,"reconnects":11,"disconnects":12,"#,
                r#""disconnects_by_reason":{"closed":12},"connect_failures":13,"#,
                r#""connect_failures_by_reason":{"tls":13},"commands":14,"reboots":15,"#,
                r#""lost_on_reboot":16,"fatal":17,"firmware_installed":18,"firmware_failed":19,"#,
                r#""firmware_declined":20,"#,
                r#""ack_latency":{"count":0,"p50_ms":null,"p90_ms":null,"p99_ms":null,"max_ms":null},"#,
                r#""per_device":[]}"#
            )
        );
        let back: Summary = serde_json::from_str(&text).unwrap();
        assert_eq!(back, summary);
    }
}
