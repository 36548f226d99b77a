//! End-to-end: trust under attack and faults (issue "Trust under attack and faults").
//! Each test is one hole an outside test found, shown closed against a real gateway in
//! this process: revocation racing a session's start, half-open connections, the
//! operator API's limits, a commit that fails part-way, replays that got no ack,
//! unbounded work from one input, the data files' modes and the CRL's age, and the
//! refusal log under a flood.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use device_client::proto::{self, CommandStatus, GoodbyeReason, Hello, Text, Uplink};
use e2e::logs::LogCapture;
use e2e::{
    Down, RawDevice, TestGateway, WAIT, eventually, hold_half_open, http_get, http_post_json,
    metric,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn hello_msg() -> Uplink<'static> {
    Uplink::Hello(Hello {
        version: proto::PROTOCOL_VERSION,
        boot_id: 1,
        firmware: Text::new("x").unwrap(),
        max_frame: proto::MAX_DOWNLINK_FRAME as u16,
    })
}

/// Defect 1: a connection whose handshake finished before a revocation, and which has
/// not sent `Hello` yet, is cut by the reload; one that sends `Hello` after it gets no
/// session.
#[tokio::test]
async fn a_connection_revoked_before_its_hello_gets_no_session() {
    let mut tg = TestGateway::start().await;
    let cert = tg.pki.device("stolen-1");
    let mut silent = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    let mut late = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    // Both handshakes are done on the gateway's side before the revocation.
    eventually("both handshakes to finish", || async {
        (tg.gw.metrics().handshakes_ok.load(Ordering::Relaxed) == 2).then_some(())
    })
    .await;
    tg.pki.revoke(&cert);
    tg.gw.reload_tls().unwrap();

    // The one that waits is told at once, not left until its hello timeout.
    let bye = silent.goodbye().await;
    assert_eq!(
        bye.map(|b| b.reason),
        Some(GoodbyeReason::Revoked),
        "the reload cuts a connection that has not sent Hello"
    );
    // The one that speaks after the reload gets no Welcome.
    let _ = late.send(&hello_msg()).await;
    loop {
        match late.recv().await {
            Ok(Some(Down::Welcome(_))) => panic!("a revoked certificate got a session"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    assert!(!tg.gw.is_online("stolen-1"));
    assert!(
        tg.gw.device("stolen-1").await.unwrap().is_none(),
        "the revoked device never had a session"
    );
}

/// Defect 2: thousands of half-open connections from one address leave room for
/// devices. The attacker (127.0.0.2) outnumbers the connection cap; devices come from
/// 127.0.0.1.
#[tokio::test]
async fn half_open_connections_from_one_address_do_not_lock_devices_out() {
    let tg = TestGateway::start_with(|c| c.max_connections = Some(1_000)).await;
    let held = hold_half_open([127, 0, 0, 2], tg.addr(), 2_500).await;
    // Connections are accepted in order: by the time these devices are, every one of
    // the attacker's has been.
    for i in 0..20 {
        let (mut dev, _) = tg.device(&format!("legit-{i}"), 1).await;
        dev.telemetry(1).await.unwrap();
        dev.wait_ack(1).await;
    }
    let per_source = metric(
        &tg.gw,
        "gateway_preauth_refusals_total{reason=\"per_source\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(
        per_source >= 2_000.0,
        "the attacker's connections over the per-source budget are counted: {per_source}"
    );
    drop(held);
    budget_is_given_back(&tg).await;
}

/// Defect 2, from many addresses: half-open connections from more sources than the
/// per-source limit can stop fill the whole pre-authentication budget; a device that
/// connects then takes the place of the one that has waited longest, instead of being
/// turned away until the attackers' handshakes time out.
#[tokio::test]
async fn half_open_connections_from_many_addresses_make_room_for_devices() {
    let tg = TestGateway::start_with(|c| {
        c.max_handshakes = 50;
        c.max_handshakes_per_source = 10;
    })
    .await;
    let mut held = Vec::new();
    for source in 2..12u8 {
        held.extend(hold_half_open([127, 0, 0, source], tg.addr(), 10).await);
    }
    for i in 0..10 {
        let (mut dev, _) = tg.device(&format!("crowded-{i}"), 1).await;
        dev.telemetry(1).await.unwrap();
        dev.wait_ack(1).await;
    }
    let evicted = metric(&tg.gw, "gateway_preauth_refusals_total{reason=\"evicted\"}")
        .await
        .unwrap_or(0.0);
    assert!(evicted >= 10.0, "evicted {evicted}");
    drop(held);
    budget_is_given_back(&tg).await;
}

/// Once the attacker is gone, every place in the pre-authentication budget is free
/// again: nothing leaked through evictions and refusals.
async fn budget_is_given_back(tg: &TestGateway) {
    eventually("the handshake budget to be free again", || async {
        (tg.gw
            .metrics()
            .handshakes_in_progress
            .load(Ordering::Relaxed)
            == 0)
            .then_some(())
    })
    .await;
}

/// The listen backlog of a socket bound to `port`, as the kernel reports it (`ss`:
/// Send-Q of a listening socket).
fn backlog(port: u16) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("running ss (Debian: iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .next()
        .unwrap_or_else(|| panic!("ss: {text:?}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Defect 2: a reconnect burst fits the listen backlog (1024 by default, settable).
#[tokio::test]
async fn the_listen_backlog_is_deep_and_configurable() {
    let tg = TestGateway::start().await;
    assert_eq!(backlog(tg.addr().port()), 1024);
    let tg = TestGateway::start_with(|c| c.listen_backlog = 300).await;
    assert_eq!(backlog(tg.addr().port()), 300);
    assert_eq!(backlog(tg.gw.api().unwrap().addr.port()), 300);
}

/// Defect 3: a half-sent request, and a connection that sends nothing, are closed by
/// the API's header timeout instead of being held forever.
#[tokio::test]
async fn api_connections_that_do_not_finish_a_request_are_closed() {
    let tg = TestGateway::start_with(|c| c.api_header_timeout = Duration::from_secs(1)).await;
    let api = tg.gw.api().unwrap().addr;
    let mut half = TcpStream::connect(api).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut silent = TcpStream::connect(api).await.unwrap();
    // Headers complete, then a body that stops after 10 of the 100 bytes it announced.
    let mut stalled = TcpStream::connect(api).await.unwrap();
    let token = &tg.gw.api().unwrap().token;
    stalled
        .write_all(
            format!(
                "PUT /api/v1/groups/g HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"devices\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    for (what, conn) in [
        ("half a request", &mut half),
        ("nothing", &mut silent),
        ("a tenth of a body", &mut stalled),
    ] {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(WAIT, conn.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a connection that sent {what} is still open after {WAIT:?}"
        );
    }
    // Served connections are unaffected.
    assert_eq!(http_get(api, "/healthz", None).await.0, 200);
}

/// Defect 3: API connections over the cap are refused (and counted); devices and the
/// API's own budget are unaffected.
#[tokio::test]
async fn api_connections_over_the_cap_are_refused() {
    let tg = TestGateway::start_with(|c| c.api_max_connections = 8).await;
    let api = tg.gw.api().unwrap().addr;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(api).await.unwrap());
    }
    // Wait until the gateway holds all eight, then one more is refused.
    eventually("the eight connections to be held", || async {
        (tg.gw.metrics().api_connections.load(Ordering::Relaxed) == 8).then_some(())
    })
    .await;
    let mut extra = TcpStream::connect(api).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, extra.read_to_end(&mut buf))
        .await
        .expect("the connection over the cap is closed")
        .ok();
    assert!(buf.is_empty());
    assert_eq!(
        tg.gw
            .metrics()
            .api_connections_refused
            .load(Ordering::Relaxed),
        1
    );
    let (mut dev, _) = tg.device("unbothered-1", 1).await;
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;
    drop(idle);
    eventually("a freed slot to serve again", || async {
        (tg.gw.metrics().api_connections.load(Ordering::Relaxed) == 0).then_some(())
    })
    .await;
    assert_eq!(http_get(api, "/healthz", None).await.0, 200);
}

/// POSTs JSON to the gateway's API with its token.
async fn post_json(tg: &TestGateway, path: &str, body: &serde_json::Value) -> (u16, String) {
    let info = tg.gw.api().unwrap();
    http_post_json(info.addr, path, Some(&info.token), body).await
}

/// Defect 4: a huge `wait_s` gets 400 with the JSON error object (it made the handler
/// panic: no response at all), for one device and for a group.
#[tokio::test]
async fn a_huge_wait_is_refused_with_a_json_error() {
    let tg = TestGateway::start().await;
    let (_dev, _) = tg.device("patient-1", 1).await;
    tg.gw
        .store()
        .put_group("patients", vec!["patient-1".into()])
        .await
        .unwrap();
    for path in [
        "/api/v1/devices/patient-1/commands",
        "/api/v1/groups/patients/commands",
    ] {
        for wait in [1e20, -1.0, 61.0] {
            let (status, body) = post_json(
                &tg,
                path,
                &serde_json::json!({"name": "echo", "wait_s": wait}),
            )
            .await;
            assert_eq!(status, 400, "{path} wait_s={wait}: {body}");
            let err: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(err["code"], "bad_wait", "{body}");
        }
    }
    // Nothing was queued by the refused requests.
    assert!(
        tg.gw
            .store()
            .commands_of("patient-1", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Defect 6: an insert that fails part-way through a batch (a trigger makes the chunk
/// holding seq 7 fail) is never acknowledged; what was acked is stored, and a replay
/// after the fault stores every record once.
#[tokio::test]
async fn a_commit_that_fails_part_way_never_acks() {
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("faulty-1", 5).await;
    for seq in 1..=4 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(4).await;
    let db = tg.data.path().join("gateway.sqlite");
    let fault = rusqlite::Connection::open(&db).unwrap();
    fault.busy_timeout(Duration::from_secs(10)).unwrap();
    fault
        .execute_batch(
            // This device's records are the store's only ones: seq 7 is row 7
            // (docs/STORE.md: a chunk holds rows last_row - n + 1 ..= last_row).
            "CREATE TRIGGER inject_fault BEFORE INSERT ON chunks
              WHEN NEW.last_row - NEW.n + 1 <= 7 AND NEW.last_row >= 7
             BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
        )
        .unwrap();
    for seq in 5..=10 {
        dev.telemetry(seq).await.unwrap();
    }
    let mut acked = 4;
    let mut bye = None;
    loop {
        match dev.recv().await {
            Ok(Some(Down::Ack(a))) => acked = acked.max(a),
            Ok(Some(Down::Goodbye(g))) => bye = Some(g.reason),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    assert!(acked < 7, "seq 7 was never stored, yet Ack {acked} came");
    assert_eq!(bye, Some(GoodbyeReason::ServerError));
    let stored: Vec<_> = tg.stored("faulty-1").into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        stored,
        (1..=acked).collect::<Vec<_>>(),
        "exactly what was acked is stored"
    );

    // The fault is gone: the device replays from Welcome and nothing is doubled.
    fault.execute_batch("DROP TRIGGER inject_fault").unwrap();
    let cert = tg.pki.device("faulty-1");
    let mut dev = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    let welcome = dev.hello(5).await;
    assert_eq!(welcome.last_acked, Some(acked));
    for seq in acked + 1..=10 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(10).await;
    let stored: Vec<_> = tg.stored("faulty-1").into_iter().map(|(_, s)| s).collect();
    assert_eq!(stored, (1..=10).collect::<Vec<_>>());
}

/// Defect 7: a device that replays only records already stored is acknowledged
/// (PROTOCOL.md §8.2), so it can drop them from its ring.
#[tokio::test]
async fn a_replay_of_stored_records_is_acknowledged() {
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("replayer-1", 3).await;
    for seq in 1..=10 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(10).await;
    drop(dev);
    // It lost the ack and replays 5..=10 although Welcome says 10 is stored.
    let (mut dev, welcome) = tg.device("replayer-1", 3).await;
    assert_eq!(welcome.last_acked, Some(10));
    for seq in 5..=10 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(10).await;
    assert_eq!(tg.stored("replayer-1").len(), 10, "stored once");
    // And it goes on as usual.
    dev.telemetry(11).await.unwrap();
    dev.wait_ack(11).await;
}

/// Defect 8: results for commands that are not in flight cost no work each: no task,
/// no store operation.
#[tokio::test]
async fn results_for_unknown_commands_spawn_nothing() {
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("chatty-1", 1).await;
    let before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    for id in 0..5_000u32 {
        dev.result(1_000_000 + id, CommandStatus::Succeeded, &[])
            .await
            .unwrap();
    }
    // The pong comes after the gateway has handled every result before it.
    dev.ping(9).await.unwrap();
    loop {
        if dev.recv().await.unwrap() == Some(Down::Pong(9)) {
            break;
        }
    }
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        alive < before + 50,
        "{} tasks alive after 5,000 stray results (before: {before})",
        alive
    );
    assert_eq!(
        metric(&tg.gw, "gateway_command_results_ignored_total").await,
        Some(5_000.0)
    );
}

/// Defect 8: a group command does not spawn a task per member.
#[tokio::test]
async fn a_group_command_runs_in_bounded_tasks() {
    let tg = TestGateway::start().await;
    let members: Vec<String> = (0..3_000).map(|i| format!("member-{i:04}")).collect();
    tg.gw
        .store()
        .put_group("crowd", members.clone())
        .await
        .unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let body = serde_json::json!({"name": "echo", "wait_s": 0});
    let request = post_json(&tg, "/api/v1/groups/crowd/commands", &body);
    tokio::pin!(request);
    let mut most = 0;
    let (status, body) = loop {
        tokio::select! {
            out = &mut request => break out,
            () = tokio::task::yield_now() => most = most.max(metrics.num_alive_tasks()),
        }
    };
    assert_eq!(status, 200, "{body}");
    let out: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(out["receipts"].as_array().unwrap().len(), 3_000);
    assert!(
        most < before + 200,
        "{most} tasks alive at once for a group of 3,000 (before: {before})"
    );
}

/// Defect 9: the store and the token are readable by the gateway's user only.
#[tokio::test]
async fn data_files_are_private() {
    let tg = TestGateway::start_with(|c| {
        c.data_dir = c.data_dir.join("fresh");
    })
    .await;
    let (mut dev, _) = tg.device("private-1", 1).await;
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;
    let dir = tg.data.path().join("fresh");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "data dir");
    for f in [
        "gateway.sqlite",
        "gateway.sqlite-wal",
        "gateway.sqlite-shm",
        "api-token",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
}

/// Defect 9: a CRL past its next-update date is reported (log line, metric).
#[tokio::test]
async fn a_stale_crl_is_reported() {
    let (logs, _guard) = LogCapture::start();
    let tg = TestGateway::start_with(|_| {}).await;
    tg.pki.write_stale_crl();
    tg.gw.reload_tls().unwrap();
    logs.wait_for(&["WARN", "CRL", "next update"]).await;
    assert_eq!(metric(&tg.gw, "gateway_crl_stale").await, Some(1.0));
    // Warned, not refused (the default policy): devices still connect.
    let (mut dev, _) = tg.device("tolerated-1", 1).await;
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;
}

/// Defect 9: a flood of bad handshakes is counted exactly but logged at a bounded
/// rate, with a line saying how many were not logged.
#[tokio::test]
async fn refusal_logging_is_rate_limited_and_counts_stay_exact() {
    let (logs, _guard) = LogCapture::start();
    let tg = TestGateway::start().await;
    for _ in 0..200 {
        if let Ok(mut anon) = RawDevice::connect(tg.addr(), &tg.pki.ca, None).await {
            let _ = anon.recv().await;
        }
    }
    eventually("200 refusals to be counted", || async {
        (tg.gw
            .metrics()
            .refused_count(gateway::Refusal::NoClientCert)
            == 200)
            .then_some(())
    })
    .await;
    logs.wait_for(&["handshake refused", "not logged"]).await;
    let lines = logs
        .text()
        .lines()
        .filter(|l| l.contains("handshake refused") && !l.contains("not logged"))
        .count();
    assert!(lines <= 25, "{lines} refusal lines for 200 refusals");
    let _ = proto::MIN_MAX_FRAME;
}
