//! End-to-end with the gateway as a process, under faults only a process can have: an
//! open-file limit that an API flood would exhaust, a disk that refuses every write
//! (`RLIMIT_FSIZE`), settings that cannot work.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Stdio};

use device_client::proto::GoodbyeReason;
use e2e::process::GatewayProcess;
use e2e::{Down, Pki, RawDevice, WAIT, eventually, http_get, stored_rows, try_http_get};
use tokio::net::TcpStream;

/// `gateway/src/main.rs`, built by this package.
const BIN: &str = env!("CARGO_BIN_EXE_e2e-gateway");

/// Appends settings to the config file written by `Pki::gateway_args`.
fn add_settings(data: &Path, extra: &str) {
    let file = data.join("gateway.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(extra);
    std::fs::write(&file, text).unwrap();
}

/// Defect 3: with 256 open files, 400 idle connections to the operator API do not take
/// the descriptors devices need: the API has its own cap, the device port its reserve.
#[tokio::test]
async fn an_api_flood_cannot_starve_the_device_port() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let args = pki.gateway_args(data.path(), "127.0.0.1:0");
    add_settings(
        data.path(),
        "max_connections = 64\nmax_handshakes = 32\nmax_handshakes_per_source = 16\n\
         api_max_connections = 16\n",
    );
    let (gw, addr) =
        GatewayProcess::start_under(&["prlimit", "--nofile=256:256", "--"], BIN.as_ref(), &args)
            .await;
    let api = gw.api_addr().await;
    let mut flood = Vec::new();
    for _ in 0..400 {
        // Past the open-file limit the gateway cannot accept, its backlog fills and a
        // connect would wait for minutes: the attacker does not care, nor do we.
        let connect = TcpStream::connect(api);
        if let Ok(Ok(c)) = tokio::time::timeout(std::time::Duration::from_secs(1), connect).await {
            flood.push(c);
        }
    }
    for i in 0..5 {
        let cert = pki.device(&format!("steady-{i}"));
        let mut dev = RawDevice::connect(addr, &pki.ca, Some(&cert))
            .await
            .expect("a device connects while the API is flooded");
        dev.hello(1).await;
        dev.telemetry(1).await.unwrap();
        dev.wait_ack(1).await;
    }
    drop(flood);
    gw.wait_for(&["API connection refused"]).await;
    // The flood is gone: the API answers again once the gateway has seen the
    // connections close.
    eventually("/healthz to answer again", || async {
        matches!(try_http_get(api, "/healthz", None).await, Ok((200, _))).then_some(())
    })
    .await;
}

/// Defect 5 (and 6 under a real fault): when the disk refuses writes, nothing more is
/// acked, everything acked is stored, and `/healthz` says 503 with the reason.
#[tokio::test]
async fn healthz_fails_while_the_store_cannot_commit() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let args = pki.gateway_args(data.path(), "127.0.0.1:0");
    // A file-size limit is a disk that fills up: writes past it fail with EFBIG (the
    // signal that would otherwise kill the process is ignored, and stays ignored
    // across exec).
    let (gw, addr) = GatewayProcess::start_under(
        &[
            "sh",
            "-c",
            "trap '' XFSZ; exec prlimit --fsize=262144 -- \"$@\"",
            "sh",
        ],
        BIN.as_ref(),
        &args,
    )
    .await;
    let api = gw.api_addr().await;
    assert_eq!(http_get(api, "/healthz", None).await.0, 200);
    let mut dev = pki.session(addr, "filler-1", 1).await;
    let mut acked = 0;
    let mut bye = None;
    'fill: for seq in 1..=5_000 {
        dev.telemetry(seq).await.unwrap();
        loop {
            match dev.recv().await {
                Ok(Some(Down::Ack(a))) if a >= seq => {
                    acked = a;
                    break;
                }
                Ok(Some(Down::Goodbye(g))) => {
                    bye = Some(g.reason);
                    break 'fill;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break 'fill,
            }
        }
    }
    assert_eq!(bye, Some(GoodbyeReason::ServerError), "acked up to {acked}");
    let (status, body) = http_get(api, "/healthz", None).await;
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["code"], "store_failing", "{body}");
    let stored: Vec<_> = stored_rows(&data.path().join("db/gateway.sqlite"), "filler-1")
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert!(
        stored.len() >= acked as usize && stored.iter().take(acked as usize).copied().eq(1..=acked),
        "every acked record is stored: acked {acked}, stored {}",
        stored.len()
    );
}

/// Defect 9: settings that cannot work stop the gateway at start, naming the setting.
#[tokio::test]
async fn nonsensical_settings_are_refused_at_start() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let args = pki.gateway_args(data.path(), "127.0.0.1:0");
    for (flag, value, name) in [
        ("--handshake-timeout", "0s", "handshake_timeout"),
        ("--hello-timeout", "0s", "hello_timeout"),
        ("--write-timeout", "0s", "write_timeout"),
        ("--retention", "0s", "retention"),
        ("--max-queued-commands", "0", "max_queued_commands"),
        ("--max-commit-records", "0", "max_commit_records"),
    ] {
        let mut child = Command::new(BIN)
            .arg("run")
            .args(&args)
            .args([flag, value])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{flag} {value} was accepted: the gateway is running");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{flag} {value}: exit status {status}");
        assert!(err.contains(name), "{flag} {value}: {err}");
    }
}
