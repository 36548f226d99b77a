//! `bench-floor`: the least a server of our device protocol must do, to measure the
//! gateway against.
//!
//! ```text
//!  device-sim ══mutual TLS══► accept ─► handshake (the gateway's own rustls config)
//!                                        └─► identify (CN, CRL, expiry), as the gateway
//!             ◄── Welcome ── Hello                           one task per connection
//!             ◄── Ack{highest seq of the read} ── Telemetry... (nothing stored)
//!             ◄── Pong{nonce} ── Ping
//! ```
//!
//! What it is: TLS with client certificates on exactly the gateway's configuration
//! (`gateway::testing::TlsMaterial`, so a handshake costs what the gateway's does),
//! framing and decoding with the protocol's own codec (`device_client::proto`), and one
//! cumulative `Ack` per read that brought telemetry, as the gateway acks per batch. A
//! benchmark runs the same devices against it and against the gateway, both pinned to
//! one core (`taskset -c 0`), and reports the gateway's cost as a ratio to this floor.
//!
//! What it is not: a gateway. It stores nothing and acks records it has not stored
//! (`Welcome.last_acked` is always none, so a device replays whatever it holds); it
//! sends no commands and ignores command results; it has no budgets, no idle or hello
//! timeout, no takeover of a device's older session, no CRL reload, no `Goodbye`: a
//! device that breaks the protocol is simply disconnected. Never point real devices at
//! it.
//!
//! ```text
//! bench-floor --listen 127.0.0.1:0 --ca ca.pem --cert gateway.pem --key gateway.key.pem
//! ```
//!
//! Prints `bench-floor: listening on ADDR` to stderr once bound, and a line of counters
//! on SIGINT or SIGTERM before it exits (and every `--stats-every-s` seconds if asked).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use device_client::proto::{
    self, Ack, Downlink, MIN_MAX_FRAME, PROTOCOL_VERSION, Pong, Seq, Uplink, Welcome,
};
use gateway::testing::{TlsMaterial, TlsSettings, identify};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A bare mutual-TLS server speaking just enough of the device protocol for
/// `device-sim` to run against it: the floor a benchmark compares the gateway to.
///
/// It does the TLS handshake with the gateway's own rustls configuration and identity
/// check, answers Hello with Welcome, acknowledges telemetry (one cumulative Ack per
/// read that brought any) and answers Ping with Pong. It stores nothing, sends no
/// commands, has no connection budgets or timeouts beyond the handshake's, and closes
/// a connection on any bad frame. It is a measuring stick, not a gateway.
#[derive(Parser)]
#[command(
    name = "bench-floor",
    after_help = "\
Example:
  certs init --dir pki && certs devices --dir pki --prefix sim- --count 100
  taskset -c 0 bench-floor --listen 127.0.0.1:7443 --ca pki/ca.pem \\
      --cert pki/gateway.pem --key pki/gateway.key.pem &
  device-sim --gateway 127.0.0.1:7443 --certs pki --devices 100 --rate 100 --duration 5

Prints `bench-floor: listening on ADDR` to stderr once bound (with port 0, the real
port), and a line of counters on SIGINT or SIGTERM, then exits with status 0."
)]
struct Cli {
    /// Where to listen for devices (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// PEM bundle of the CA that issues device certificates.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// PEM certificate (chain) of the server, as the gateway uses it.
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// PEM private key of that certificate.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// PEM CRL from the CA: revoked devices are refused, as by the gateway.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// Heartbeat interval announced in Welcome (devices ping after this much silence).
    #[arg(long, value_name = "S", default_value_t = gateway_defaults().heartbeat_s)]
    heartbeat_s: u16,
    /// Largest TLS record sent, header included (the gateway's max_fragment_size).
    #[arg(long, value_name = "N")]
    max_fragment_size: Option<usize>,
    /// Print the counters to stderr every N seconds.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    stats_every_s: Option<u64>,
}

/// What the gateway does by default, taken from its own `Config::default()` so the two
/// cannot drift apart.
#[derive(Clone, Copy)]
struct Defaults {
    heartbeat_s: u16,
    /// `Welcome.max_frame`: the largest frame accepted, header included.
    max_frame: u16,
    handshake_timeout: Duration,
}

fn gateway_defaults() -> Defaults {
    let c = gateway::Config::default();
    Defaults {
        heartbeat_s: u16::try_from(c.heartbeat.as_secs()).unwrap_or(u16::MAX),
        max_frame: c.max_frame,
        handshake_timeout: c.handshake_timeout,
    }
}

/// Counters across all connections.
static ACCEPTED: AtomicU64 = AtomicU64::new(0);
static HANDSHAKES_OK: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static OPEN: AtomicU64 = AtomicU64::new(0);
static RECORDS: AtomicU64 = AtomicU64::new(0);
static ACKS: AtomicU64 = AtomicU64::new(0);

fn counters() -> String {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "accepted={} handshakes_ok={} refused={} open={} records={} acks={}",
        get(&ACCEPTED),
        get(&HANDSHAKES_OK),
        get(&REFUSED),
        get(&OPEN),
        get(&RECORDS),
        get(&ACKS)
    )
}

/// A session past `Hello`, counted in `open` until it ends.
struct Open;

impl Open {
    fn new() -> Self {
        OPEN.fetch_add(1, Ordering::Relaxed);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

// One thread: the benchmark pins this process to one core (`taskset -c 0`), where a
// multi-thread runtime, even with one worker, would only add a second thread (the one
// in `block_on`) competing for that core, and cross-thread wake-ups. Handshakes run
// inline on this thread, as they would on a gateway worker.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-floor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let material = TlsMaterial::load(&TlsSettings {
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
        crl: cli.crl,
        tls13_only: false,
        refuse_stale_crl: false,
        max_fragment_size: cli.max_fragment_size,
    })
    .context("loading the TLS files")?;
    let material = Arc::new(material);
    let acceptor = TlsAcceptor::from(material.config.clone());
    let defaults = Defaults {
        heartbeat_s: cli.heartbeat_s,
        ..gateway_defaults()
    };
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    eprintln!("bench-floor: listening on {}", listener.local_addr()?);
    if let Some(every) = cli.stats_every_s {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(every));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("bench-floor: stats {}", counters());
            }
        });
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    ACCEPTED.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(tcp, acceptor.clone(), material.clone(), defaults));
                }
                // Out of file descriptors, say: pause rather than spin, as the gateway.
                Err(e) => {
                    eprintln!("bench-floor: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    eprintln!("bench-floor: summary {}", counters());
    Ok(())
}

/// One connection: handshake, identity, then the session until either side ends it.
async fn connection(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    material: Arc<TlsMaterial>,
    defaults: Defaults,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(defaults.handshake_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) | Err(_) => {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    // Who is it: the gateway's check after every handshake (the verifier already
    // refused a missing or invalid certificate).
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|cert| identify(cert, &material));
    let Some(Ok(_identity)) = identity else {
        REFUSED.fetch_add(1, Ordering::Relaxed);
        return;
    };
    HANDSHAKES_OK.fetch_add(1, Ordering::Relaxed);
    // Any error ends the connection: there is nothing to report it to.
    let _ = session(stream, defaults).await;
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What one read brought: replies to write, and the highest telemetry seq.
#[derive(Default)]
struct Handled {
    replies: Vec<u8>,
    records: u64,
    highest: Option<Seq>,
}

/// The protocol after the handshake. It reads straight from rustls's own plaintext
/// buffer (`fill_buf`), so an idle connection holds no read buffer of its own, as in
/// the gateway (which reads into one scratch buffer per thread); only a frame split
/// across reads is copied aside. Every complete frame of a read is handled, then the
/// replies and at most one `Ack` are written out together.
async fn session(mut stream: TlsStream<TcpStream>, defaults: Defaults) -> io::Result<()> {
    let max_frame = usize::from(defaults.max_frame);
    let mut carry: Vec<u8> = Vec::new();
    let mut open: Option<Open> = None;
    loop {
        let mut done = Handled::default();
        let chunk = stream.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(());
        }
        let n = chunk.len();
        if carry.is_empty() {
            let used = handle(chunk, max_frame, &mut open, defaults, &mut done)?;
            carry.extend_from_slice(chunk.get(used..).unwrap_or_default());
        } else {
            carry.extend_from_slice(chunk);
            let used = handle(&carry, max_frame, &mut open, defaults, &mut done)?;
            carry.drain(..used);
        }
        stream.consume(n);
        if carry.is_empty() {
            // Give the memory back: an idle connection keeps nothing.
            carry = Vec::new();
        }
        if let Some(seq) = done.highest {
            let mut ack = [0u8; 16];
            let len = proto::encode(&Downlink::Ack(Ack { seq }), &mut ack).map_err(invalid)?;
            done.replies
                .extend_from_slice(ack.get(..len).unwrap_or_default());
            RECORDS.fetch_add(done.records, Ordering::Relaxed);
            ACKS.fetch_add(1, Ordering::Relaxed);
        }
        if !done.replies.is_empty() {
            stream.write_all(&done.replies).await?;
            stream.flush().await?;
        }
    }
}

/// Handles the complete frames at the front of `bytes`; returns how many bytes they
/// took (the rest is a partial frame).
fn handle(
    bytes: &[u8],
    max_frame: usize,
    open: &mut Option<Open>,
    defaults: Defaults,
    done: &mut Handled,
) -> io::Result<usize> {
    let mut start = 0;
    while let Some(frame) =
        proto::split_frame(bytes.get(start..).unwrap_or_default(), max_frame).map_err(invalid)?
    {
        let reply = match proto::decode_uplink(frame.body).map_err(invalid)? {
            Uplink::Hello(hello) => {
                if open.is_some() || hello.version < 1 || hello.max_frame < MIN_MAX_FRAME {
                    return Err(violation("a second or unusable Hello"));
                }
                *open = Some(Open::new());
                Some(Downlink::Welcome(Welcome {
                    version: hello.version.min(PROTOCOL_VERSION),
                    heartbeat_s: defaults.heartbeat_s,
                    last_acked: None,
                    server_time_ms: now_ms(),
                    max_frame: defaults.max_frame,
                }))
            }
            _ if open.is_none() => return Err(violation("a message before Hello")),
            Uplink::Telemetry(t) => {
                done.records += 1;
                done.highest = done.highest.max(Some(t.seq));
                None
            }
            Uplink::Ping(p) => Some(Downlink::Pong(Pong { nonce: p.nonce })),
            Uplink::CommandResult(_)
            | Uplink::Reported(_)
            | Uplink::FirmwareRequest(_)
            | Uplink::FirmwareStatus(_) => None,
        };
        start += frame.len;
        if let Some(reply) = reply {
            // Control replies are small (a `Welcome` is at most 26 bytes).
            let mut out = [0u8; 32];
            let len = proto::encode(&reply, &mut out).map_err(invalid)?;
            done.replies
                .extend_from_slice(out.get(..len).unwrap_or_default());
        }
    }
    Ok(start)
}

/// A device that broke the protocol: its connection is dropped, without a `Goodbye`.
fn violation(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn now_ms() -> u64 {
    u64::try_from(gateway::testing::now_ms()).unwrap_or(0)
}
