//! `bench-floor` (tests/src/bin/bench-floor.rs), the benchmark's bare mutual-TLS server,
//! as a process: real devices (the simulator and a frame-by-frame client) get every
//! record acked, a device without a certificate is refused, a bad frame ends the
//! connection, and SIGTERM ends the process with its counters.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::process::Stdio;

use device_client::proto::{Hello, PROTOCOL_VERSION, Text, Uplink};
use device_client::sim::{SimConfig, Simulator};
use e2e::sim::{SIM_WAIT, loaded, until};
use e2e::{Down, Pki, RawDevice, WAIT};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

const BIN: &str = env!("CARGO_BIN_EXE_bench-floor");

/// A running `bench-floor` and its stderr, line by line.
struct Floor {
    child: Child,
    stderr: Lines<BufReader<ChildStderr>>,
    addr: SocketAddr,
}

impl Floor {
    /// Starts it on port 0 with `pki`'s files and `extra` arguments; returns once it
    /// says where it listens.
    async fn start(pki: &Pki, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--ca"])
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path("gateway.pem"))
            .arg("--key")
            .arg(pki.path("gateway.key.pem"))
            .arg("--crl")
            .arg(pki.path("crl.pem"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning bench-floor");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = Self::line(&mut stderr, "bench-floor: listening on ").await;
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Self {
            child,
            stderr,
            addr,
        }
    }

    /// The next stderr line starting with `prefix` (others are skipped).
    async fn line(stderr: &mut Lines<BufReader<ChildStderr>>, prefix: &str) -> String {
        let find = async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                if line.starts_with(prefix) {
                    return line;
                }
            }
            panic!("bench-floor closed stderr before a line {prefix:?}");
        };
        tokio::time::timeout(WAIT, find)
            .await
            .unwrap_or_else(|_| panic!("no line {prefix:?} from bench-floor"))
    }

    /// Waits for a `--stats-every-s` line whose counters satisfy `cond`.
    async fn stats_until(&mut self, cond: impl Fn(&[(String, u64)]) -> bool) {
        loop {
            let line = Self::line(&mut self.stderr, "bench-floor: stats ").await;
            if cond(&parse(&line)) {
                return;
            }
        }
    }

    /// SIGTERM; waits for the exit and returns its counters (`name=value` pairs).
    async fn terminate(mut self) -> Vec<(String, u64)> {
        let pid = self.child.id().unwrap().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let summary = Self::line(&mut self.stderr, "bench-floor: summary ").await;
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("bench-floor exits on SIGTERM")
            .unwrap();
        assert!(exit.success(), "{exit}");
        parse(&summary)
    }
}

/// The counters of a stats or summary line.
fn parse(line: &str) -> Vec<(String, u64)> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// Reads until the server closes the connection, which must happen without an answer
/// (and before [`WAIT`]).
async fn closed_unanswered(dev: &mut RawDevice) {
    match dev.recv().await {
        Ok(None) => {}
        Err(e) if e.kind() != std::io::ErrorKind::TimedOut => {}
        other => panic!("expected the connection to close, got {other:?}"),
    }
}

fn counter(counters: &[(String, u64)], name: &str) -> u64 {
    counters
        .iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in {counters:?}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_devices_get_every_record_acked() {
    let pki = Pki::new();
    let mut floor = Floor::start(&pki, &["--heartbeat-s", "7", "--stats-every-s", "1"]).await;

    // Frame by frame: the Welcome of a server that stores nothing, Pong, acks.
    let (mut dev, welcome) = {
        let cert = pki.device("raw-1");
        let mut dev = RawDevice::connect(floor.addr, &pki.ca, Some(&cert))
            .await
            .unwrap();
        let welcome = dev.hello(0x5eed).await;
        (dev, welcome)
    };
    assert_eq!(welcome.version, PROTOCOL_VERSION);
    assert_eq!(welcome.heartbeat_s, 7);
    assert_eq!(welcome.last_acked, None);
    assert_eq!(welcome.max_frame, gateway::Config::default().max_frame);
    assert!(welcome.server_time_ms > 0);
    dev.ping(42).await.unwrap();
    assert_eq!(dev.recv().await.unwrap(), Some(Down::Pong(42)));
    for seq in 1..=50 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(50).await;
    // A second Hello is a violation: the connection ends.
    dev.send(&Uplink::Hello(Hello {
        version: PROTOCOL_VERSION,
        boot_id: 1,
        firmware: Text::new("again").unwrap(),
        max_frame: 1024,
    }))
    .await
    .unwrap();
    closed_unanswered(&mut dev).await;

    // The real client: its state machine, driver and tokio-rustls.
    let n = 5;
    let mut config = SimConfig::new(floor.addr.to_string(), loaded(&pki, n));
    config.rate = 50.0;
    config.threads = Some(1);
    config.drain_timeout = SIM_WAIT;
    let sim = Simulator::start(config).unwrap();
    let mon = sim.monitor();
    until(&mon, "every device connected, 50 records acked", |s| {
        s.ever_connected == n && s.counts.acked >= 50
    })
    .await;
    mon.stop();
    let summary = sim.wait().await.unwrap();
    assert!(summary.drained, "{summary:#?}");
    assert_eq!(summary.counts.sent, summary.counts.acked);
    assert_eq!(summary.counts.unacked, 0);
    assert_eq!(summary.counts.fatal, 0);
    assert!(summary.per_device.iter().all(|d| d.connects >= 1));

    // The devices are gone: so are their sessions.
    floor.stats_until(|c| counter(c, "open") == 0).await;
    let counters = floor.terminate().await;
    assert_eq!(counter(&counters, "handshakes_ok"), 1 + n as u64);
    assert_eq!(counter(&counters, "refused"), 0);
    // Every record it received, once each unless a device reconnected and replayed.
    assert!(counter(&counters, "records") >= 50 + summary.counts.sent);
    assert!(counter(&counters, "acks") >= 2);
}

#[tokio::test]
async fn a_device_without_a_certificate_or_with_bad_frames_gets_no_session() {
    let pki = Pki::new();
    let floor = Floor::start(&pki, &[]).await;

    // No client certificate: TLS 1.3 lets the client finish its side; the refusal shows
    // on its first read at the latest.
    if let Ok(mut anon) = RawDevice::connect(floor.addr, &pki.ca, None).await {
        let hello = Uplink::Hello(Hello {
            version: PROTOCOL_VERSION,
            boot_id: 1,
            firmware: Text::new("anon").unwrap(),
            max_frame: 1024,
        });
        let _ = anon.send(&hello).await;
        closed_unanswered(&mut anon).await;
    }

    // Telemetry before Hello, and an empty frame: closed without an answer.
    let cert = pki.device("rude-1");
    let mut early = RawDevice::connect(floor.addr, &pki.ca, Some(&cert))
        .await
        .unwrap();
    early.telemetry(1).await.unwrap();
    closed_unanswered(&mut early).await;
    let mut empty = RawDevice::connect(floor.addr, &pki.ca, Some(&cert))
        .await
        .unwrap();
    empty.send_raw(&[0, 0]).await.unwrap();
    closed_unanswered(&mut empty).await;

    let counters = floor.terminate().await;
    assert_eq!(counter(&counters, "refused"), 1);
    assert_eq!(counter(&counters, "handshakes_ok"), 2);
    assert_eq!(counter(&counters, "records"), 0);
    assert_eq!(counter(&counters, "acks"), 0);
}
