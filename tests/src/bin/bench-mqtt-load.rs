//! `bench-mqtt-load`: drives an MQTT broker (Mosquitto 2.0) the way `device-sim` drives
//! the gateway, so that a benchmark (`scripts/bench-compare`) puts both under the same
//! load shapes and reads the same summary.
//!
//! ```text
//! certs init --dir certs && certs devices --dir certs --prefix sim- --count 1000
//! mosquitto -c mtls.conf     # listener PORT, cafile certs/ca.pem, certfile certs/gateway.pem,
//!                            # keyfile certs/gateway.key.pem, require_certificate true,
//!                            # use_identity_as_username true, tls_version tlsv1.3
//! bench-mqtt-load --broker 127.0.0.1:PORT --certs certs --devices 1000 --rate 50 --duration 10 --json
//! ```
//!
//! Each device is one TCP connection with TLS 1.3 and its own P-256 client certificate,
//! loaded by the simulator's own loader (`device_client::sim::load_dir`: the `certs`
//! layout, the ids `PREFIX` + zero-padded counter, the same rustls settings), then
//! MQTT 3.1.1: CONNECT (client id = device id, clean session, keepalive 60 s), and
//! PUBLISH at QoS 1 to `iot/<id>/telemetry` at `--rate` messages a second with a payload
//! of `--payload-bytes` (48 by default: about one telemetry record of our protocol).
//!
//! ```text
//!  one thread: current-thread tokio + LocalSet (run it under `taskset -c 1`)
//!   ├─ device 0..N: connect (at most --max-handshakes at once) ─ TLS ─ CONNECT/CONNACK
//!   │    └─ loop: tick → PUBLISH (unless --inflight are unacked: `ring_full`) ─► broker
//!   │             read → PUBACK by packet id → ack latency   ◄── broker
//!   └─ control: progress a second on stderr; after --duration (or Ctrl-C) producing
//!        stops, then up to --drain-timeout for the last PUBACKs; DISCONNECT; summary
//! ```
//!
//! Measured as `device-sim` measures: `sent` counts PUBLISHes produced, `acked` their
//! PUBACKs; a tick that finds --inflight PUBLISHes unacked (Mosquitto's default
//! `max_inflight_messages` is 20) is skipped and counted in `ring_full`, as device-sim
//! counts a full ring. Ack latency runs from the PUBLISH written to the socket to its
//! PUBACK read; PUBLISHes resent after a reconnect (DUP, as at-least-once requires) are
//! not timed. Devices produce only while connected; a lost session is reopened with
//! backoff (about 1 s, doubling per failed connect up to 60 s). The JSON summary is
//! `device_client::sim::Summary` itself, so the keys are device-sim's (`devices`,
//! `rate_per_device`, `run_ms`, `sent`, `acked`, `unacked`, `connects`,
//! `connect_failures`, `all_connected_after_ms`, `ack_latency` ...; `per_device` with
//! one boot, id 0). `device_client::sim::Histogram` cannot be recorded into from
//! outside its crate, so latencies are kept exact instead: a count per microsecond.
//!
//! Why a hand-written MQTT client rather than rumqttc (the gateway's): the load runs
//! on one core against a broker on another and must cost less than the broker.
//! rumqttc gives each connection an `AsyncClient` and an `EventLoop` joined by a request
//! channel, allocates a `Publish` (topic and payload) per message and assigns packet ids
//! inside its event loop, reporting one only when it reaches its write buffer: the time
//! between "asked to publish" and "written" would be its queueing, not the broker's.
//! Here one task per device encodes each PUBLISH into a reused buffer, stamps it when
//! the write returns, and parses the 4-byte PUBACKs in place (no allocation per
//! message); MQTT 3.1.1 at QoS 1 without subscriptions needs only CONNECT/CONNACK,
//! PUBLISH/PUBACK, PINGREQ/PINGRESP and DISCONNECT. (And the `e2e` package, which
//! already has tokio-rustls, needs no new dependency.)

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::hash::BuildHasher as _;
use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use device_client::sim::{
    BootSummary, Counts, DeviceIdentity, DeviceSummary, LatencySummary, Summary, load_dir,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::{Interval, MissedTickBehavior, interval_at, sleep, sleep_until, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Simulated devices against an MQTT broker, measured like `device-sim` measures the
/// gateway: each device has its own certificate and TLS 1.3 connection, connects with
/// MQTT 3.1.1 (client id = device id, clean session) and publishes at QoS 1 to
/// `iot/<id>/telemetry` at --rate messages a second, with at most --inflight unacked.
///
/// A progress line goes to stderr once a second, and `all N devices connected after
/// X.XX s` once they are. After --duration (or on Ctrl-C) the devices stop publishing
/// and wait up to --drain-timeout for their last PUBACKs; then a summary is printed (to
/// stdout, or to stderr with --json, which puts device-sim's JSON summary on stdout).
#[derive(Parser)]
#[command(
    name = "bench-mqtt-load",
    version,
    after_help = "\
Examples:
  certs init --dir certs
  certs devices --dir certs --prefix sim- --count 1000
  cat > mtls.conf <<EOF
  listener 8883 127.0.0.1
  cafile certs/ca.pem
  certfile certs/gateway.pem
  keyfile certs/gateway.key.pem
  require_certificate true
  use_identity_as_username true
  tls_version tlsv1.3
  EOF
  taskset -c 0 mosquitto -c mtls.conf &
  taskset -c 1 bench-mqtt-load --broker 127.0.0.1:8883 --certs certs --devices 1000 --rate 50 --duration 10 --json

Each device uses one socket: raise the open-file limit (ulimit -n) above --devices.
Exit status: 0 when every PUBLISH was acked, 2 when some were still unacked at the
end, 1 on errors."
)]
struct Cli {
    /// The broker's TLS listener.
    #[arg(long, value_name = "HOST:PORT")]
    broker: String,
    /// The certs directory (ca.pem and devices/ID/{cert,key}.pem, as `certs` writes it).
    #[arg(long, value_name = "DIR")]
    certs: PathBuf,
    /// How many devices: PREFIX + a zero-padded counter from --first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    devices: u64,
    /// PUBLISHes per second per device (0: connect and stay idle; `max`: as fast as
    /// PUBACKs return, keeping --inflight unacked).
    #[arg(long, value_name = "MSGS_PER_S|max", default_value = "1", value_parser = parse_rate)]
    rate: Rate,
    /// Seconds to publish; without it, until Ctrl-C.
    #[arg(long, value_name = "S", value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Device id prefix (as given to `certs devices --prefix`).
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// First counter value (as given to `certs devices --start`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    first: u64,
    /// The name the broker's certificate must carry.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    server_name: String,
    /// Print the summary as JSON on stdout (device-sim's keys).
    #[arg(long)]
    json: bool,
    /// Bytes of each PUBLISH's payload.
    #[arg(long, value_name = "BYTES", default_value_t = 48,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    payload_bytes: u32,
    /// Unacked PUBLISHes per device at most (a tick beyond it is skipped: `ring_full`).
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u16).range(1..=10_000))]
    inflight: u16,
    /// Seconds to wait for the last PUBACKs after publishing stops.
    #[arg(long, value_name = "S", default_value = "10", value_parser = parse_seconds)]
    drain_timeout: Duration,
    /// TCP connects + TLS handshakes + CONNECTs in progress at once (the connect ramp).
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_handshakes: usize,
    /// MQTT keepalive in seconds (a PINGREQ goes out when nothing else did).
    #[arg(long, value_name = "S", default_value_t = 60,
          value_parser = clap::value_parser!(u16).range(2..))]
    keepalive: u16,
}

/// `--rate`.
#[derive(Debug, Clone, Copy)]
enum Rate {
    PerSecond(f64),
    Max,
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    match s {
        "max" => Ok(Rate::Max),
        _ => match s.parse::<f64>() {
            Ok(r) if r.is_finite() && r >= 0.0 => Ok(Rate::PerSecond(r)),
            _ => Err("a number of messages per second >= 0, or `max`".into()),
        },
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| "a number of seconds >= 0".into())
}

/// One line on stderr; a stderr that is gone is not worth a panic.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The summary: for a person on stdout; or with `json`, for a person on stderr and as
/// JSON on stdout. A stdout reader that went away is not an error of the run.
fn emit(summary: &Summary, json: bool) -> std::io::Result<()> {
    let human = human_summary(summary);
    let mut out = std::io::stdout().lock();
    let written = if json {
        say(format_args!("{}", human.trim_end()));
        serde_json::to_writer_pretty(&mut out, summary)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
    } else {
        out.write_all(human.as_bytes())
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            say(format_args!("bench-mqtt-load: error: {e:#}"));
            ExitCode::from(1)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let addr = cli
        .broker
        .to_socket_addrs()
        .with_context(|| format!("--broker {}", cli.broker))?
        .next()
        .with_context(|| format!("--broker {}: no address", cli.broker))?;
    let server_name = ServerName::try_from(cli.server_name.clone())
        .with_context(|| format!("--server-name {}", cli.server_name))?;
    let count = usize::try_from(cli.devices).context("--devices is too large")?;
    let (period, rate_per_device) = match cli.rate {
        Rate::PerSecond(r) if r > 0.0 => {
            let period = Duration::try_from_secs_f64(1.0 / r).context("--rate is too low")?;
            (Some(period), r)
        }
        Rate::PerSecond(r) => (None, r),
        // Serialized as null: no fixed rate.
        Rate::Max => (None, f64::INFINITY),
    };

    say(format_args!(
        "bench-mqtt-load: loading {count} device certificates from {}",
        cli.certs.display()
    ));
    let identities = load_dir(&cli.certs, &cli.prefix, cli.first, count)?;
    let settings = Rc::new(Settings {
        addr,
        server_name,
        period,
        flat_out: matches!(cli.rate, Rate::Max),
        inflight: usize::from(cli.inflight),
        payload: cli.payload_bytes as usize,
        keepalive: cli.keepalive,
        connect_timeout: Duration::from_secs(10),
        rate_per_device,
    });
    say(format_args!(
        "bench-mqtt-load: {count} devices -> {} ({} PUBLISHes/s each, QoS 1); Ctrl-C stops",
        cli.broker,
        match cli.rate {
            Rate::Max => "max".to_string(),
            Rate::PerSecond(r) => r.to_string(),
        }
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let shared = Rc::new(Shared::new(count, cli.max_handshakes.max(1)));
    let summary = tokio::task::LocalSet::new().block_on(
        &runtime,
        drive(
            shared,
            settings,
            identities,
            cli.duration,
            cli.drain_timeout,
        ),
    )?;
    emit(&summary, cli.json)?;
    Ok(if summary.drained {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// What every device uses, fixed at the start.
struct Settings {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    /// Time between PUBLISHes; `None`: idle, or flat out.
    period: Option<Duration>,
    flat_out: bool,
    inflight: usize,
    payload: usize,
    keepalive: u16,
    connect_timeout: Duration,
    rate_per_device: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining,
    Stopped,
}

/// Whether a device is done: stopped, or draining with nothing left to deliver.
fn finished(phase: Phase, nothing_unacked: bool) -> bool {
    phase == Phase::Stopped || (phase == Phase::Draining && nothing_unacked)
}

/// The counters of the run: one thread, so cells, no atomics.
struct Shared {
    started: Instant,
    devices: usize,
    phase: watch::Sender<Phase>,
    handshakes: Semaphore,
    /// Wakes the control task: every device connected, or the last PUBACK of a drain.
    wake: Notify,
    sent: Cell<u64>,
    acked: Cell<u64>,
    ring_full: Cell<u64>,
    connects: Cell<u64>,
    open: Cell<u64>,
    ever_connected: Cell<usize>,
    all_connected: Cell<Option<Duration>>,
    failures: RefCell<BTreeMap<String, u64>>,
    disconnects: RefCell<BTreeMap<String, u64>>,
    latency: RefCell<Latencies>,
}

fn inc(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

fn count(map: &RefCell<BTreeMap<String, u64>>, why: &str) {
    *map.borrow_mut().entry(why.to_owned()).or_default() += 1;
}

impl Shared {
    fn new(devices: usize, handshakes: usize) -> Self {
        Self {
            started: Instant::now(),
            devices,
            phase: watch::Sender::new(Phase::Running),
            handshakes: Semaphore::new(handshakes),
            wake: Notify::new(),
            sent: Cell::new(0),
            acked: Cell::new(0),
            ring_full: Cell::new(0),
            connects: Cell::new(0),
            open: Cell::new(0),
            ever_connected: Cell::new(0),
            all_connected: Cell::new(None),
            failures: RefCell::default(),
            disconnects: RefCell::default(),
            latency: RefCell::default(),
        }
    }

    fn unacked(&self) -> u64 {
        self.sent.get().saturating_sub(self.acked.get())
    }

    fn session_opened(&self, dev: &mut Device) {
        dev.connects += 1;
        inc(&self.connects);
        inc(&self.open);
        if dev.connects == 1 {
            let n = self.ever_connected.get() + 1;
            self.ever_connected.set(n);
            if n == self.devices {
                self.all_connected.set(Some(self.started.elapsed()));
                self.wake.notify_one();
            }
        }
    }
}

/// Ack latencies in microseconds, exact: those since the last progress line, and all
/// of them as a count per distinct value (as many entries as the latencies have
/// distinct microseconds, however many acks there were).
#[derive(Default)]
struct Latencies {
    recent: Vec<u32>,
    all: BTreeMap<u32, u64>,
}

/// The 1-based rank of quantile `q` among `n` values (device-sim's rule).
fn rank(n: u64, q: f64) -> u64 {
    ((q * n as f64).ceil() as u64).clamp(1, n.max(1))
}

impl Latencies {
    fn record(&mut self, d: Duration) {
        self.recent
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// p50 and p99 of the values since the last call; moves them into `all`.
    fn roll(&mut self) -> (Option<u32>, Option<u32>) {
        self.recent.sort_unstable();
        let n = self.recent.len() as u64;
        let at = |q| {
            let i = usize::try_from(rank(n, q) - 1).ok()?;
            self.recent.get(i).copied()
        };
        let quantiles = (at(0.5), at(0.99));
        for run in self.recent.chunk_by(|a, b| a == b) {
            if let Some(v) = run.first() {
                *self.all.entry(*v).or_default() += run.len() as u64;
            }
        }
        self.recent.clear();
        quantiles
    }

    fn summary(&mut self) -> LatencySummary {
        self.roll();
        let n: u64 = self.all.values().sum();
        let at = |q| {
            let want = rank(n, q);
            let mut seen = 0;
            self.all.iter().find_map(|(v, c)| {
                seen += c;
                (seen >= want).then_some(f64::from(*v) / 1000.0)
            })
        };
        LatencySummary {
            count: n,
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            p99_ms: at(0.99),
            max_ms: self.all.keys().next_back().map(|v| f64::from(*v) / 1000.0),
        }
    }
}

/// A PUBLISH not acked yet.
struct Unacked {
    pkid: u16,
    seq: u64,
    /// When it was written; `None`: not yet, or a resend (not timed).
    written: Option<Instant>,
}

/// One device's state across its sessions.
struct Device {
    id: String,
    topic: Vec<u8>,
    /// The last PUBLISH's number (1-based; its payload starts with it).
    seq: u64,
    next_pkid: u16,
    /// Oldest first.
    unacked: VecDeque<Unacked>,
    connects: u64,
    acked: u64,
    ring_full: u64,
}

impl Device {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            topic: format!("iot/{id}/telemetry").into_bytes(),
            seq: 0,
            next_pkid: 0,
            unacked: VecDeque::new(),
            connects: 0,
            acked: 0,
            ring_full: 0,
        }
    }

    /// A new PUBLISH into `out` (a tick, or a slot freed when flat out).
    fn produce(&mut self, sh: &Shared, set: &Settings, out: &mut Vec<u8>) {
        self.seq += 1;
        self.next_pkid = self.next_pkid % u16::MAX + 1;
        encode_publish(
            out,
            &self.topic,
            self.next_pkid,
            self.seq,
            set.payload,
            false,
        );
        self.unacked.push_back(Unacked {
            pkid: self.next_pkid,
            seq: self.seq,
            written: None,
        });
        inc(&sh.sent);
    }

    /// Handles every complete packet in `input` and removes it.
    fn on_input(&mut self, sh: &Shared, input: &mut Vec<u8>) -> Result<(), &'static str> {
        let mut used = 0;
        while let Some((kind, body, len)) = packet(input.get(used..).unwrap_or_default())? {
            match (kind, body) {
                (PUBACK, [hi, lo]) => self.puback(sh, u16::from_be_bytes([*hi, *lo])),
                (PINGRESP, []) => {}
                _ => return Err("unexpected_packet"),
            }
            used += len;
        }
        input.drain(..used);
        Ok(())
    }

    fn puback(&mut self, sh: &Shared, pkid: u16) {
        // Mosquitto acks in order: the first is nearly always the one.
        let Some(i) = self.unacked.iter().position(|u| u.pkid == pkid) else {
            return;
        };
        let Some(done) = self.unacked.remove(i) else {
            return;
        };
        self.acked += 1;
        inc(&sh.acked);
        if let Some(t) = done.written {
            sh.latency.borrow_mut().record(t.elapsed());
        }
        if sh.unacked() == 0 && *sh.phase.borrow() == Phase::Draining {
            sh.wake.notify_one();
        }
    }

    fn summary(self) -> DeviceSummary {
        // Everything below the oldest unacked PUBLISH was acked.
        let acked_through = self.unacked.front().map_or(self.seq, |u| u.seq - 1);
        let narrow = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        DeviceSummary {
            id: self.id,
            boots: vec![BootSummary {
                boot_id: 0,
                sent: narrow(self.seq),
                acked: narrow(acked_through),
                lost: 0,
            }],
            connects: self.connects,
            commands: 0,
            ring_full: self.ring_full,
            fatal: None,
            firmware: String::new(),
            firmware_installs: 0,
        }
    }
}

// MQTT 3.1.1 packet types (first byte).
const CONNACK: u8 = 0x20;
const PUBACK: u8 = 0x40;
const PINGRESP: u8 = 0xD0;
const PINGREQ: [u8; 2] = [0xC0, 0];
const DISCONNECT: [u8; 2] = [0xE0, 0];

fn remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let digit = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { digit | 0x80 } else { digit });
        if n == 0 {
            return;
        }
    }
}

/// CONNECT: MQTT 3.1.1, clean session, no username (the broker takes the certificate's).
fn encode_connect(out: &mut Vec<u8>, client_id: &str, keepalive: u16) {
    out.push(0x10);
    remaining_length(out, 10 + 2 + client_id.len());
    out.extend_from_slice(b"\x00\x04MQTT\x04\x02");
    out.extend_from_slice(&keepalive.to_be_bytes());
    out.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    out.extend_from_slice(client_id.as_bytes());
}

/// PUBLISH at QoS 1: the payload is `seq` (big-endian, as many low bytes as fit), then
/// filler.
fn encode_publish(out: &mut Vec<u8>, topic: &[u8], pkid: u16, seq: u64, len: usize, dup: bool) {
    out.push(if dup { 0x3A } else { 0x32 });
    remaining_length(out, 2 + topic.len() + 2 + len);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&pkid.to_be_bytes());
    let stamp = seq.to_be_bytes();
    let head = len.min(stamp.len());
    out.extend_from_slice(stamp.get(stamp.len() - head..).unwrap_or_default());
    out.resize(out.len() + (len - head), b'.');
}

/// The largest packet taken from the broker, body only.
const MAX_PACKET: usize = 1024;

/// (first byte, body, length with header).
type Packet<'a> = (u8, &'a [u8], usize);

/// The first complete packet of `buf`; `None` until it is all there.
fn packet(buf: &[u8]) -> Result<Option<Packet<'_>>, &'static str> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            // The broker only ever sends a few bytes (CONNACK, PUBACK, PINGRESP): a
            // larger packet is not waited for, so nothing it says makes us buffer more.
            if len > MAX_PACKET {
                return Err("bad_frame");
            }
            let start = 2 + i;
            return Ok(buf
                .get(start..start + len)
                .map(|body| (first, body, start + len)));
        }
    }
    Err("bad_frame")
}

type Tls = TlsStream<TcpStream>;

/// device-sim's names for why a connect or a session failed.
const IO_REASONS: [(ErrorKind, &str); 7] = [
    (ErrorKind::ConnectionRefused, "refused"),
    (ErrorKind::TimedOut, "timed_out"),
    (ErrorKind::ConnectionReset, "reset"),
    (ErrorKind::ConnectionAborted, "reset"),
    (ErrorKind::BrokenPipe, "reset"),
    (ErrorKind::UnexpectedEof, "reset"),
    (ErrorKind::InvalidData, "tls"),
];

fn io_reason(e: &std::io::Error) -> &'static str {
    // EMFILE / ENFILE: the open-file cap, the usual limit of a large run.
    if matches!(e.raw_os_error(), Some(23 | 24)) {
        return "too_many_open_files";
    }
    IO_REASONS
        .iter()
        .find(|(kind, _)| *kind == e.kind())
        .map_or("other", |(_, why)| why)
}

fn connack_reason(code: u8) -> &'static str {
    match code {
        1 => "connack_protocol_version",
        2 => "connack_client_id",
        3 => "connack_unavailable",
        4 => "connack_credentials",
        5 => "connack_not_authorized",
        _ => "connack_other",
    }
}

/// TCP, TLS, CONNECT and its CONNACK, within the connect timeout, with at most
/// --max-handshakes devices at it at once. Whatever followed the CONNACK stays in
/// `input`.
async fn connect(
    sh: &Shared,
    set: &Settings,
    ident: &DeviceIdentity,
    input: &mut Vec<u8>,
) -> Result<Tls, &'static str> {
    let _permit = sh.handshakes.acquire().await.map_err(|_| "other")?;
    timeout(set.connect_timeout, handshake(set, ident, input))
        .await
        .unwrap_or(Err("timed_out"))
}

async fn handshake(
    set: &Settings,
    ident: &DeviceIdentity,
    input: &mut Vec<u8>,
) -> Result<Tls, &'static str> {
    let io = |e: std::io::Error| io_reason(&e);
    let tcp = TcpStream::connect(set.addr).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    let mut tls = TlsConnector::from(ident.tls.clone())
        .connect(set.server_name.clone(), tcp)
        .await
        .map_err(io)?;
    let mut hello = Vec::with_capacity(32 + ident.id.len());
    encode_connect(&mut hello, &ident.id, set.keepalive);
    tls.write_all(&hello).await.map_err(io)?;
    tls.flush().await.map_err(io)?;
    input.clear();
    loop {
        // A certificate the broker refuses shows here, in TLS 1.3: an alert on the
        // first read.
        input.reserve(64);
        if tls.read_buf(input).await.map_err(io)? == 0 {
            return Err("closed");
        }
        if let Some((kind, body, len)) = packet(input)? {
            let code = match (kind, body) {
                (CONNACK, [_, code]) => *code,
                _ => return Err("bad_frame"),
            };
            input.drain(..len);
            return if code == 0 {
                Ok(tls)
            } else {
                Err(connack_reason(code))
            };
        }
    }
}

/// One device, from its first connect until the run stops.
async fn run_device(
    sh: Rc<Shared>,
    set: Rc<Settings>,
    ident: DeviceIdentity,
    index: usize,
) -> DeviceSummary {
    let mut dev = Device::new(&ident.id);
    let mut phase = sh.phase.subscribe();
    let mut input = Vec::with_capacity(256);
    let mut failed = 0u32;
    loop {
        let idle = dev.unacked.is_empty();
        let done = move |p: &Phase| finished(*p, idle);
        let attempt = tokio::select! {
            biased;
            _ = phase.wait_for(done) => break,
            r = connect(&sh, &set, &ident, &mut input) => r,
        };
        match attempt {
            Ok(tls) => {
                failed = 0;
                sh.session_opened(&mut dev);
                let lost = session(&sh, &set, &mut dev, tls, &mut input, &mut phase, index).await;
                sh.open.set(sh.open.get().saturating_sub(1));
                match lost {
                    Some(why) => count(&sh.disconnects, why),
                    None => break,
                }
            }
            Err(why) => {
                count(&sh.failures, why);
                failed += 1;
            }
        }
        // About 1 s after a lost session, doubling per failed connect up to 60 s; the
        // jitter keeps a fleet from coming back in step.
        let jitter = unit(std::hash::RandomState::new().hash_one((index, failed)));
        let backoff = Duration::from_secs(1 << failed.min(6)).min(Duration::from_secs(60));
        let idle = dev.unacked.is_empty();
        tokio::select! {
            _ = phase.wait_for(move |p| finished(*p, idle)) => break,
            () = sleep(backoff.mul_f64(0.5 + 0.5 * jitter)) => {}
        }
    }
    dev.summary()
}

/// A hash as a number in [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Writes `out` and flushes it, unless the run stops first.
async fn send(
    tls: &mut Tls,
    out: &[u8],
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), Option<&'static str>> {
    let write = async {
        tls.write_all(out).await?;
        tls.flush().await
    };
    tokio::select! {
        biased;
        r = write => r.map_err(|e| Some(io_reason(&e))),
        _ = phase.wait_for(|p| *p == Phase::Stopped) => Err(None),
    }
}

async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One session; returns why it was lost, or `None` when the device is done (and has
/// sent DISCONNECT).
async fn session(
    sh: &Shared,
    set: &Settings,
    dev: &mut Device,
    mut tls: Tls,
    input: &mut Vec<u8>,
    phase: &mut watch::Receiver<Phase>,
    index: usize,
) -> Option<&'static str> {
    let mut out = Vec::with_capacity(256);
    // At least once: what the last session left unacked goes again, as DUP.
    for u in dev.unacked.iter_mut() {
        u.written = None;
        encode_publish(&mut out, &dev.topic, u.pkid, u.seq, set.payload, true);
    }
    // New PUBLISHes in `out`: the newest `fresh` of `dev.unacked`, stamped once written.
    let mut fresh = 0;
    let now = tokio::time::Instant::now();
    let mut ticker = set.period.map(|p| {
        // Devices that connect together do not publish in step.
        let phase_shift = unit(std::hash::RandomState::new().hash_one(index));
        let mut t = interval_at(now + p.mul_f64(phase_shift), p);
        t.set_missed_tick_behavior(MissedTickBehavior::Burst);
        t
    });
    let half = Duration::from_secs(u64::from(set.keepalive)) / 2;
    let mut ping = interval_at(now + half, half);
    let mut quiet = true;
    loop {
        let p = *phase.borrow_and_update();
        if finished(p, dev.unacked.is_empty()) {
            let bye = async {
                tls.write_all(&DISCONNECT).await?;
                tls.shutdown().await
            };
            let _ = timeout(Duration::from_secs(2), bye).await;
            return None;
        }
        if p == Phase::Running && set.flat_out {
            while dev.unacked.len() < set.inflight {
                dev.produce(sh, set, &mut out);
                fresh += 1;
            }
        }
        if !out.is_empty() {
            if let Err(why) = send(&mut tls, &out, phase).await {
                return why;
            }
            out.clear();
            quiet = false;
            let written = Instant::now();
            let from = dev.unacked.len().saturating_sub(fresh);
            for u in dev.unacked.range_mut(from..) {
                u.written = Some(written);
            }
            fresh = 0;
        }
        input.reserve(64);
        tokio::select! {
            biased;
            r = tls.read_buf(input) => match r {
                Ok(0) => return Some("closed"),
                Ok(_) => {
                    if let Err(why) = dev.on_input(sh, input) {
                        return Some(why);
                    }
                }
                Err(e) => return Some(io_reason(&e)),
            },
            _ = phase.changed() => {}
            () = tick(&mut ticker), if p == Phase::Running => {
                if dev.unacked.len() < set.inflight {
                    dev.produce(sh, set, &mut out);
                    fresh += 1;
                } else {
                    dev.ring_full += 1;
                    inc(&sh.ring_full);
                }
            }
            _ = ping.tick() => {
                if quiet {
                    out.extend_from_slice(&PINGREQ);
                }
                quiet = true;
            }
        }
    }
}

/// Runs the devices, prints progress, stops, drains and sums up.
async fn drive(
    sh: Rc<Shared>,
    set: Rc<Settings>,
    identities: Vec<DeviceIdentity>,
    duration: Option<Duration>,
    drain_timeout: Duration,
) -> anyhow::Result<Summary> {
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let devices: Vec<_> = identities
        .into_iter()
        .enumerate()
        .map(|(i, ident)| tokio::task::spawn_local(run_device(sh.clone(), set.clone(), ident, i)))
        .collect();
    let mut meter = Progress {
        sh: sh.clone(),
        tick: tokio::time::interval(Duration::from_secs(1)),
        announced: false,
    };
    meter
        .tick
        .set_missed_tick_behavior(MissedTickBehavior::Skip);
    let end = duration.map(|d| tokio::time::Instant::from_std(sh.started + d));
    loop {
        tokio::select! {
            () = sleep_until(end.unwrap_or_else(tokio::time::Instant::now)), if end.is_some() => break,
            _ = sigint.recv() => {
                say(format_args!(
                    "bench-mqtt-load: stopping: waiting for the last PUBACKs (Ctrl-C again to quit now)"
                ));
                break;
            }
            _ = meter.tick.tick() => meter.progress(),
            () = sh.wake.notified() => {}
        }
        meter.announce();
    }
    let run_ms = millis(sh.started.elapsed());
    sh.phase.send_replace(Phase::Draining);
    let drain_start = Instant::now();
    let drain_end = tokio::time::Instant::now() + drain_timeout;
    let drained = loop {
        if sh.unacked() == 0 {
            break true;
        }
        tokio::select! {
            () = sleep_until(drain_end) => break false,
            _ = sigint.recv() => break false,
            _ = meter.tick.tick() => meter.progress(),
            () = sh.wake.notified() => {}
        }
        meter.announce();
    };
    let drain_ms = millis(drain_start.elapsed());
    sh.phase.send_replace(Phase::Stopped);
    let mut per_device = Vec::with_capacity(devices.len());
    for d in devices {
        per_device.push(d.await.context("a device task panicked")?);
    }
    meter.announce();

    let sum = |m: &RefCell<BTreeMap<String, u64>>| m.borrow().values().sum();
    let connects = sh.connects.get();
    let counts = Counts {
        sent: sh.sent.get(),
        acked: sh.acked.get(),
        unacked: sh.unacked(),
        ring_full: sh.ring_full.get(),
        connects,
        reconnects: connects.saturating_sub(sh.ever_connected.get() as u64),
        disconnects: sum(&sh.disconnects),
        disconnects_by_reason: sh.disconnects.borrow().clone(),
        connect_failures: sum(&sh.failures),
        connect_failures_by_reason: sh.failures.borrow().clone(),
        ..Counts::default()
    };
    Ok(Summary {
        devices: sh.devices,
        rate_per_device: set.rate_per_device,
        run_ms,
        drain_ms,
        drained,
        all_connected_after_ms: sh.all_connected.get().map(millis),
        counts,
        ack_latency: sh.latency.borrow_mut().summary(),
        per_device,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The progress lines on stderr.
struct Progress {
    sh: Rc<Shared>,
    tick: Interval,
    announced: bool,
}

impl Progress {
    /// Says once that every device has connected (scripts wait for this line).
    fn announce(&mut self) {
        if let (false, Some(after)) = (self.announced, self.sh.all_connected.get()) {
            self.announced = true;
            say(format_args!(
                "bench-mqtt-load: all {} devices connected after {:.2} s",
                self.sh.devices,
                after.as_secs_f64()
            ));
        }
    }

    /// One line: connected, sent, acked, the last second's ack latency, trouble.
    fn progress(&mut self) {
        let sh = &self.sh;
        let (p50, p99) = sh.latency.borrow_mut().roll();
        let ms = |us: Option<u32>| {
            us.map_or("-".into(), |us| format!("{:.1} ms", f64::from(us) / 1000.0))
        };
        let mut line = format!(
            "[{:>5.0}s] connected {}/{}  sent {}  acked {}  unacked {}  ack p50 {} p99 {}",
            sh.started.elapsed().as_secs_f64(),
            sh.open.get(),
            sh.devices,
            sh.sent.get(),
            sh.acked.get(),
            sh.unacked(),
            ms(p50),
            ms(p99),
        );
        let reconnects = sh
            .connects
            .get()
            .saturating_sub(sh.ever_connected.get() as u64);
        for (what, n) in [
            ("reconnects", reconnects),
            ("ring full", sh.ring_full.get()),
        ] {
            if n > 0 {
                line.push_str(&format!("  {what} {n}"));
            }
        }
        for (what, map) in [
            ("connect failures", &sh.failures),
            ("disconnects", &sh.disconnects),
        ] {
            if !map.borrow().is_empty() {
                line.push_str(&format!("  {what} {:?}", map.borrow()));
            }
        }
        match *sh.phase.borrow() {
            Phase::Running => {}
            Phase::Draining => line.push_str("  (draining)"),
            Phase::Stopped => line.push_str("  (stopped)"),
        }
        say(format_args!("{line}"));
    }
}

fn human_summary(s: &Summary) -> String {
    let c = &s.counts;
    let l = &s.ack_latency;
    let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    let connected = s.all_connected_after_ms.map_or_else(
        || "never (see connect failures)".to_string(),
        |ms| format!("{:.2} s", ms as f64 / 1000.0),
    );
    let drain = if s.drained {
        "all acked"
    } else {
        "drain timed out"
    };
    format!(
        "bench-mqtt-load: {} devices at {} PUBLISHes/s each, ran {:.1} s, drained in {:.1} s\n\
         \x20 all connected after  {connected}\n\
         \x20 publishes            sent {}, acked {}, unacked {} ({drain}), ring full {}\n\
         \x20 ack latency          p50 {}, p90 {}, p99 {}, max {} ({} timed)\n\
         \x20 sessions             connects {}, reconnects {}, disconnects {:?}, connect failures {:?}\n",
        s.devices,
        s.rate_per_device,
        s.run_ms as f64 / 1000.0,
        s.drain_ms as f64 / 1000.0,
        c.sent,
        c.acked,
        c.unacked,
        c.ring_full,
        ms(l.p50_ms),
        ms(l.p90_ms),
        ms(l.p99_ms),
        ms(l.max_ms),
        l.count,
        c.connects,
        c.reconnects,
        c.disconnects_by_reason,
        c.connect_failures_by_reason,
    )
}
