//! `bench-mqtt-load` against a real Mosquitto that takes only mutual TLS 1.3 with the
//! certificates `certs init` + `certs devices` make: every PUBLISH is acked, nothing
//! fails to connect, and the summary has device-sim's keys.
//!
//! Needs Debian's `mosquitto`; skipped without it unless `REQUIRE_MOSQUITTO` is set (as
//! in CI), which makes its absence a failure (see `e2e::mqtt`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};

use certs::Validity;
use certs::dir::{Existing, InitOptions, PkiDir};
use e2e::mqtt::Mosquitto;
use serde_json::Value;

/// A `mosquitto` on 127.0.0.1 that accepts only TLS 1.3 clients with a certificate of
/// the directory's CA, each named by its certificate's CN; killed when dropped.
struct MtlsBroker {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl MtlsBroker {
    /// Starts it with the directory's gateway certificate and waits until it says it
    /// is running (its listeners are open by then).
    fn start(pki: &PkiDir) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("a temp dir");
        let conf = dir.path().join("mosquitto.conf");
        let path = |p: &Path| p.display().to_string();
        // As root, mosquitto would drop to the user `mosquitto`: stay root instead.
        let root = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
        };
        let lines = [
            format!("listener {port} 127.0.0.1"),
            format!("cafile {}", path(&pki.ca_cert_path())),
            format!("certfile {}", path(&pki.gateway_cert_path())),
            format!("keyfile {}", path(&pki.gateway_key_path())),
            "require_certificate true".into(),
            "use_identity_as_username true".into(),
            "tls_version tlsv1.3".into(),
            "allow_anonymous false".into(),
            "persistence false".into(),
            "log_dest stderr".into(),
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information".into(),
            if root { "user root" } else { "" }.into(),
        ];
        std::fs::write(&conf, lines.join("\n") + "\n").expect("writing mosquitto.conf");
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is installed");
        let mut child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mosquitto");
        let stderr = child.stderr.take().expect("piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready, running) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let up = line.contains(" running");
                    let mut all = log.lock().unwrap_or_else(|p| p.into_inner());
                    all.push_str(&line);
                    all.push('\n');
                    if up {
                        let _ = ready.send(());
                    }
                }
            });
        }
        let broker = MtlsBroker {
            child,
            addr: format!("127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        // "mosquitto version X running"; an exit ends the wait at once (the sender is
        // dropped with the pipe).
        let up = running.recv_timeout(e2e::WAIT).is_ok();
        assert!(up, "mosquitto did not start:\n{}", broker.log());
        broker
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for MtlsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn five_devices_publish_over_mutual_tls_and_every_publish_is_acked() {
    if !Mosquitto::available() {
        return;
    }
    // What `certs init --dir D && certs devices --dir D --prefix sim- --count 5` writes.
    let tmp = tempfile::tempdir().unwrap();
    let pki = PkiDir::new(tmp.path().join("certs"));
    let init = pki.init(&InitOptions::default()).unwrap();
    let ids = device_client::sim::sequential_ids("sim-", 0, 5);
    pki.issue_devices(
        &init.ca,
        &ids,
        Validity::days(1),
        Existing::Refuse,
        &|_, _| {},
    )
    .unwrap();
    let broker = MtlsBroker::start(&pki);

    let out = Command::new(env!("CARGO_BIN_EXE_bench-mqtt-load"))
        .args(["--broker", &broker.addr, "--certs"])
        .arg(pki.root())
        .args([
            "--devices",
            "5",
            "--rate",
            "20",
            "--duration",
            "2",
            "--json",
        ])
        .output()
        .expect("running bench-mqtt-load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || format!("stderr:\n{stderr}\nmosquitto:\n{}", broker.log());
    assert!(out.status.success(), "{:?}\n{}", out.status, context());
    assert!(
        stderr.contains("bench-mqtt-load: all 5 devices connected after "),
        "{}",
        context()
    );
    let s: Value = serde_json::from_slice(&out.stdout).expect("a JSON summary on stdout");

    // device-sim's keys.
    for key in [
        "devices",
        "rate_per_device",
        "run_ms",
        "drain_ms",
        "drained",
        "sent",
        "acked",
        "unacked",
        "ring_full",
        "connects",
        "reconnects",
        "connect_failures",
        "all_connected_after_ms",
        "ack_latency",
        "per_device",
    ] {
        assert!(s.get(key).is_some(), "no {key} in {s:#}");
    }
    let n = |key: &str| s[key].as_u64().unwrap_or_else(|| panic!("{key} in {s:#}"));
    assert_eq!(n("devices"), 5);
    assert!(n("sent") > 0, "{s:#}");
    assert_eq!(n("acked"), n("sent"), "{s:#}");
    assert_eq!(n("unacked"), 0, "{s:#}");
    assert_eq!(n("connect_failures"), 0, "{}", context());
    assert_eq!(n("connects"), 5, "{s:#}");
    assert!(s["all_connected_after_ms"].is_u64(), "{s:#}");
    // 20 a second for at most 2 s each: never more than the rate allows.
    assert!(n("sent") <= 5 * 41, "{s:#}");
    let latency = &s["ack_latency"];
    assert!(latency["count"].as_u64().unwrap() > 0, "{s:#}");
    for q in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
        assert!(latency[q].as_f64().unwrap() > 0.0, "{s:#}");
    }
    assert_eq!(s["per_device"].as_array().unwrap().len(), 5);
    // The broker named each client by its certificate (use_identity_as_username).
    assert!(broker.log().contains("u'sim-0000'"), "{}", broker.log());
}
