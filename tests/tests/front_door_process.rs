//! End-to-end, the gateway as a process (issue "The front door"): the API token never
//! reaches structured logs, start errors are printed once with a hint that names the
//! right command, `gateway backup` copies a running store, `gateway events` tails the
//! live stream, `--log-level` sets the logs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::process::GatewayProcess;
use e2e::{Pki, http_get, stored_rows};

const BIN: &str = env!("CARGO_BIN_EXE_e2e-gateway");

fn gateway(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running the gateway")
}

#[tokio::test]
async fn the_api_token_never_reaches_json_logs() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut args = pki.gateway_args(data.path(), "127.0.0.1:0");
    args.extend(["--log-format".into(), "json".into()]);
    let (gw, _) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let api = gw.api_addr().await;
    let token = std::fs::read_to_string(data.path().join("db/api-token")).unwrap();
    let token = token.trim();
    assert!(token.len() >= 32);
    // Some traffic: a refused request, an accepted one.
    assert_eq!(http_get(api, "/api/v1/devices", Some("wrong")).await.0, 401);
    assert_eq!(http_get(api, "/api/v1/devices", Some(token)).await.0, 200);
    gw.signal("TERM");
    let logs = gw.logs.clone();
    assert!(gw.wait_exit().await);
    let logs = logs.lock().unwrap().clone();
    assert!(!logs.contains(token), "the token is in the logs:\n{logs}");
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
    }
    // It says where the token is instead.
    assert!(
        logs.lines()
            .any(|l| l.contains("dashboard") && l.contains("token_file")),
        "{logs}"
    );
}

#[test]
fn start_errors_are_printed_once_with_a_hint() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    let p = |f: &str| pki.path(f).display().to_string();

    // A CA file that does not exist: make one with certs init, in the right directory.
    let out = gateway(&[
        "run",
        "--ca",
        "nope.pem",
        "--data-dir",
        &data_dir,
        "--no-api",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.pem"), "{err}");
    assert!(err.contains("certs init --dir . "), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        for later in &lines[i + 1..] {
            assert!(
                !l.contains(later.trim_start_matches("  because: ")),
                "repeated: {err}"
            );
        }
    }

    // A key that is not the certificate's: say so, not "certs init".
    let other = pki.device("someone");
    let key = data.path().join("other.key.pem");
    std::fs::write(&key, &other.key_pem).unwrap();
    let out = gateway(&[
        "run",
        "--ca",
        &p("ca.pem"),
        "--cert",
        &p("gateway.pem"),
        "--key",
        &key.display().to_string(),
        "--data-dir",
        &data_dir,
        "--no-api",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the private key of"), "{err}");
    assert!(!err.contains("certs init --dir"), "{err}");
}

#[test]
fn log_level_and_boolean_flags_read_as_a_person_writes_them() {
    let out = gateway(&["print-config", "--log-level", "debug", "--tls13-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("log_level = \"debug\""), "{text}");
    assert!(text.contains("tls13_only = true"), "{text}");
    let help = String::from_utf8_lossy(&gateway(&["run", "--help"]).stdout).into_owned();
    for flag in [
        "--handshake-timeout",
        "--heartbeat",
        "--command-ttl",
        "--log-level",
    ] {
        let line = help.lines().position(|l| l.contains(flag)).unwrap();
        let text: String = help.lines().skip(line).take(4).collect();
        assert!(
            text.contains("[default"),
            "{flag} shows no default:\n{text}"
        );
    }
}

#[tokio::test]
async fn backup_copies_a_running_store() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let args = pki.gateway_args(data.path(), "127.0.0.1:0");
    let (gw, addr) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let mut dev = pki.session(addr, "b-1", 1).await;
    for seq in 1..=10 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(10).await;

    let copy = data.path().join("backup.sqlite");
    let copy_s = copy.display().to_string();
    let out = gateway(&["backup", "--config", &args[1], "--to", &copy_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway runs on, and the copy holds every acked record.
    dev.telemetry(11).await.unwrap();
    dev.wait_ack(11).await;
    let rows = stored_rows(&copy, "b-1");
    assert_eq!(rows, (1..=10).map(|s| (1, s)).collect::<Vec<_>>());
    assert!(!Path::new(&format!("{copy_s}-wal")).exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // An existing file is never overwritten.
    let out = gateway(&["backup", "--config", &args[1], "--to", &copy_s]);
    assert!(!out.status.success());
    drop(gw);
}

#[tokio::test]
async fn the_events_command_tails_the_live_stream() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let args = pki.gateway_args(data.path(), "127.0.0.1:0");
    let (gw, addr) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let api = gw.api_addr().await;
    let token_file = data.path().join("db/api-token").display().to_string();
    let child = tokio::process::Command::new(BIN)
        .args(["events", "--api", &format!("http://{api}"), "--token-file"])
        .arg(&token_file)
        .args(["--device", "e-1", "--type", "telemetry", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut dev = pki.session(addr, "e-1", 1).await;
    // Records until the command has printed two (it may subscribe after the first).
    let sender = tokio::spawn(async move {
        for seq in 1.. {
            if dev.telemetry(seq).await.is_err() {
                break;
            }
            dev.wait_ack(seq).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let out = tokio::time::timeout(e2e::WAIT, child.wait_with_output())
        .await
        .expect("gateway events did not stop after --count 2")
        .unwrap();
    sender.abort();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(
        events
            .iter()
            .all(|e| e["type"] == "telemetry" && e["device"] == "e-1")
    );

    // A bad filter is refused with the gateway's reason.
    let out = gateway(&[
        "events",
        "--api",
        &format!("http://{api}"),
        "--token-file",
        &token_file,
        "--type",
        "bogus",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("400") && err.contains("bad_query"), "{err}");
    drop(gw);
}

/// A CRL due within a week and a gateway certificate expiring within a week are
/// warned about at start (the test PKI's are valid for a day), and `/metrics` shows
/// the seconds left, certificate expiries and the process's own figures.
#[tokio::test]
async fn expiry_of_the_crl_and_certificates_is_watched() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let args = pki.gateway_args(data.path(), "127.0.0.1:0");
    let (gw, addr) = GatewayProcess::start(BIN.as_ref(), &args).await;
    gw.wait_for(&[
        "WARN",
        "CRL's next update is less than 7 days away",
        "certs crl",
    ])
    .await;
    gw.wait_for(&["WARN", "gateway's certificate expires in less than 7 days"])
        .await;
    let _dev = pki.session(addr, "x-1", 1).await;

    let api = gw.api_addr().await;
    let token = std::fs::read_to_string(data.path().join("db/api-token")).unwrap();
    let (status, text) = http_get(api, "/metrics", Some(token.trim())).await;
    assert_eq!(status, 200);
    let value = |sample: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
    };
    let left = value("gateway_crl_next_update_seconds");
    assert!(left > 0.0 && left <= 86_400.0, "{left}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let gw_expiry = value("gateway_certificate_expiry_timestamp_seconds");
    assert!(
        gw_expiry > now && gw_expiry <= now + 86_400.0,
        "{gw_expiry}"
    );
    assert_eq!(
        value("gateway_device_certificates_expiring{within=\"expired\"}"),
        0.0
    );
    assert_eq!(
        value("gateway_device_certificates_expiring{within=\"7d\"}"),
        1.0
    );
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    let started = value("process_start_time_seconds");
    assert!(started <= now + 1.0 && started > now - 300.0, "{started}");
    // Counted in clock ticks (10 ms): a gateway that has done little yet may show 0.
    let cpu = value("process_cpu_seconds_total");
    assert!(cpu.is_finite() && cpu >= 0.0, "{cpu}");
    assert!(text.contains("gateway_build_info{version=\""));
    drop(gw);
}
