//! End-to-end: a real gateway (in this process) on 127.0.0.1 port 0, real TLS with
//! certificates minted by the certs library, devices speaking the protocol over
//! tokio-rustls, the real SQLite file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use certs::{Ca, Validity};
use device_client::proto::{
    self, CommandStatus, GoodbyeReason, Hello, MAX_DOWNLINK_FRAME, Reading, Text, Uplink, Value,
};
use e2e::logs::LogCapture;
use e2e::{Down, RawDevice, TestGateway, eventually};
use gateway::{CommandState, Event};
use serde_json::json;

#[tokio::test]
async fn telemetry_is_acked_and_stored() {
    let tg = TestGateway::start().await;
    let (mut dev, welcome) = tg.device("sensor-1", 7).await;
    assert_eq!(welcome.last_acked, None, "nothing stored for a new boot id");
    assert_eq!(welcome.max_frame, 4096);

    for seq in 1..=50 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(50).await;

    // Acked means committed: the rows are in the file, each once.
    let rows = tg.stored("sensor-1");
    assert_eq!(rows, (1..=50).map(|s| (7, s)).collect::<Vec<_>>());

    // The same boot id again: Welcome says what is stored.
    drop(dev);
    let (_dev, welcome) = tg.device("sensor-1", 7).await;
    assert_eq!(welcome.last_acked, Some(50));

    // The library handle reads it back as JSON.
    let recs = tg
        .gw
        .telemetry("sensor-1", gateway::TelemetryQuery::default())
        .await
        .unwrap();
    assert_eq!(recs.len(), 50);
    assert!(
        recs.iter()
            .any(|r| r.seq == 50 && r.values["temp"] == json!(50.0))
    );
    let dev = tg.gw.device("sensor-1").await.unwrap().unwrap();
    assert_eq!(dev.firmware.as_deref(), Some("test-1.0"));
    assert_eq!(dev.boot_id, Some(7));
}

#[tokio::test]
async fn ping_gets_pong_and_replays_are_stored_once() {
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("sensor-2", 1).await;
    dev.ping(42).await.unwrap();
    assert_eq!(dev.recv().await.unwrap(), Some(Down::Pong(42)));
    for seq in 1..=10 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(10).await;
    drop(dev);

    // A device that lost the ack replays 5..=10 and continues: nothing is doubled.
    let (mut dev, welcome) = tg.device("sensor-2", 1).await;
    assert_eq!(welcome.last_acked, Some(10));
    for seq in 5..=12 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(12).await;
    assert_eq!(
        tg.stored("sensor-2"),
        (1..=12).map(|s| (1, s)).collect::<Vec<_>>()
    );

    // A new boot id starts a new sequence.
    drop(dev);
    let (mut dev, welcome) = tg.device("sensor-2", 2).await;
    assert_eq!(welcome.last_acked, None);
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;
    assert_eq!(tg.stored("sensor-2").len(), 13);
}

/// Each refusal: the handshake fails for that device, a log line names the reason, and
/// a device connected all along keeps working.
#[tokio::test]
async fn bad_certificates_are_refused_with_a_reason() {
    let (logs, _guard) = LogCapture::start();
    let mut tg = TestGateway::start().await;
    let mut events = tg.gw.subscribe();
    let (mut good, _) = tg.device("good-1", 1).await;
    let mut seq = 0;

    let other_ca = Ca::generate("someone else's CA", Validity::days(1)).unwrap();
    let revoked = tg.pki.device("revoked-1");
    tg.pki.revoke(&revoked);
    tg.gw.reload_tls().unwrap();

    let cases: Vec<(&str, Option<certs::Issued>)> = vec![
        ("no_client_cert", None),
        (
            "unknown_issuer",
            Some(
                other_ca
                    .issue_device("stranger", Validity::days(1))
                    .unwrap(),
            ),
        ),
        (
            "expired",
            Some(
                tg.pki
                    .ca
                    .issue_device("old-1", Validity::expired())
                    .unwrap(),
            ),
        ),
        ("revoked", Some(revoked)),
        (
            "invalid_common_name",
            Some(
                tg.pki
                    .ca
                    .danger_issue_client_cert_with_raw_cn("bad name/with spaces", Validity::days(1))
                    .unwrap(),
            ),
        ),
    ];
    for (reason, cert) in cases {
        // TLS 1.3: the client may think it is connected; the refusal shows on read.
        match RawDevice::connect(tg.addr(), &tg.pki.ca, cert.as_ref()).await {
            Err(_) => {}
            Ok(mut dev) => {
                let _ = dev
                    .send(&Uplink::Hello(Hello {
                        version: 1,
                        boot_id: 1,
                        firmware: Text::new("x").unwrap(),
                        max_frame: 512,
                    }))
                    .await;
                let got = dev.recv().await;
                assert!(
                    !matches!(got, Ok(Some(Down::Welcome(_)))),
                    "{reason}: session opened"
                );
            }
        }
        let line = logs
            .wait_for(&["handshake refused", &format!("reason={reason}")])
            .await;
        assert!(line.contains("WARN"), "{line}");
        loop {
            let ev = tokio::time::timeout(e2e::WAIT, events.recv())
                .await
                .unwrap()
                .unwrap();
            if let Event::HandshakeRefused { reason: r, .. } = &*ev {
                assert_eq!(*r, reason);
                break;
            }
        }
        // The good device never noticed.
        seq += 1;
        good.telemetry(seq).await.unwrap();
        good.wait_ack(seq).await;
    }
    assert!(!tg.gw.is_online("stranger"));
    assert_eq!(
        tg.gw.devices().await.unwrap().len(),
        1,
        "only good-1 ever got a session"
    );
}

#[tokio::test]
async fn commands_wait_for_offline_devices_and_expired_ones_never_go() {
    let tg = TestGateway::start().await;
    let gw = &tg.gw;
    let mut events = gw.subscribe();

    // Queued while the device has never connected.
    let expired = gw
        .send_command(
            "valve-1",
            "open",
            &json!({}),
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let live = gw
        .send_command("valve-1", "set_interval", &json!({"interval_s": 5}), None)
        .await
        .unwrap();
    assert_eq!(live.state, CommandState::Queued);

    // The short one expires before the device shows up (the sweep runs every second).
    let rec = gw
        .wait_command(expired.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(rec.state, CommandState::Expired);
    loop {
        let ev = tokio::time::timeout(e2e::WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
        if let Event::Command(c) = &*ev
            && c.id == expired.id
            && c.state == CommandState::Expired
        {
            break;
        }
    }

    let (mut dev, _) = tg.device("valve-1", 1).await;
    let cmd = dev.recv().await.unwrap().unwrap();
    let Down::Command {
        id,
        name,
        args,
        ttl_ms,
    } = cmd
    else {
        panic!("expected a command, got {cmd:?}");
    };
    assert_eq!(i64::from(id), live.id, "only the live command is delivered");
    assert_eq!(name, "set_interval");
    assert_eq!(args, json!({"interval_s": 5}));
    assert!(ttl_ms > 0 && ttl_ms <= 3_600_000);
    // The device gets a command before the commit that marks it sent (one fsync
    // sooner, store/commands.rs `Store::take_commands`): the state follows within that commit.
    eventually("the command marked sent", || async {
        let sent = gw.store().command(live.id).await.unwrap().unwrap();
        (sent.state == CommandState::Sent).then_some(())
    })
    .await;

    let ok = proto::Name::new("ok").unwrap();
    dev.result(
        id,
        CommandStatus::Succeeded,
        &[Reading::new(ok, Value::Bool(true))],
    )
    .await
    .unwrap();
    let done = gw.wait_command(live.id, e2e::WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.status.as_deref(), Some("succeeded"));
    assert_eq!(done.result, Some(json!({"ok": true})));

    // Nothing else arrives: the expired command was never sent.
    dev.ping(1).await.unwrap();
    assert_eq!(dev.recv().await.unwrap(), Some(Down::Pong(1)));
    let never = gw.store().command(expired.id).await.unwrap().unwrap();
    assert_eq!(never.sent_ms, None);
    assert_eq!(never.attempts, 0);

    // An online device gets a new command at once; a repeated result changes nothing.
    let rec = gw
        .send_command("valve-1", "echo", &json!({"text": "hi"}), None)
        .await
        .unwrap();
    let Some(Down::Command { id, .. }) = dev.recv().await.unwrap() else {
        panic!("expected a command")
    };
    assert_eq!(i64::from(id), rec.id);
    dev.result(id, CommandStatus::Failed, &[]).await.unwrap();
    dev.result(id, CommandStatus::Succeeded, &[]).await.unwrap();
    let done = gw.wait_command(rec.id, e2e::WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Failed);
    dev.ping(2).await.unwrap();
    assert_eq!(dev.recv().await.unwrap(), Some(Down::Pong(2)));
    assert_eq!(
        gw.store().command(rec.id).await.unwrap().unwrap().state,
        CommandState::Failed,
        "the second result is ignored"
    );
}

#[tokio::test]
async fn a_command_lost_with_its_session_is_sent_again() {
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("lamp-1", 1).await;
    let rec = tg
        .gw
        .send_command("lamp-1", "blink", &json!({"times": 3}), None)
        .await
        .unwrap();
    let Some(Down::Command { id, .. }) = dev.recv().await.unwrap() else {
        panic!("expected a command")
    };
    drop(dev); // gone before answering
    let (mut dev, _) = tg.device("lamp-1", 1).await;
    let Some(Down::Command { id: again, .. }) = dev.recv().await.unwrap() else {
        panic!("expected the command again")
    };
    assert_eq!(again, id);
    dev.result(id, CommandStatus::Succeeded, &[]).await.unwrap();
    let done = tg.gw.wait_command(rec.id, e2e::WAIT).await.unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.attempts, 2);
}

/// Protocol violations close that one connection with a typed reason.
#[tokio::test]
async fn protocol_violations_close_only_that_connection() {
    let (logs, _guard) = LogCapture::start();
    let tg = TestGateway::start().await;
    let (mut good, _) = tg.device("good-2", 1).await;
    let mut seq = 0;

    struct Case {
        name: &'static str,
        hello_first: bool,
        bytes: Vec<u8>,
        reason: GoodbyeReason,
        log: &'static str,
    }
    let mut telemetry = [0u8; 64];
    let n = proto::encode(
        &Uplink::Telemetry(proto::Telemetry {
            seq: 1,
            time_ms: None,
            readings: Default::default(),
        }),
        &mut telemetry,
    )
    .unwrap();
    let mut v2_hello = [0u8; 64];
    let m = proto::encode(
        &Uplink::Hello(Hello {
            version: 0, // a version this gateway does not speak
            boot_id: 1,
            firmware: Text::new("x").unwrap(),
            max_frame: MAX_DOWNLINK_FRAME as u16,
        }),
        &mut v2_hello,
    )
    .unwrap();
    let cases = vec![
        Case {
            name: "malformed frame",
            hello_first: true,
            bytes: vec![0, 3, 9, 9, 9], // unknown variant 9
            reason: GoodbyeReason::ProtocolViolation,
            log: "reason=message: malformed message",
        },
        Case {
            name: "oversized frame",
            hello_first: true,
            bytes: vec![0xff, 0xf0, 1, 1, 1], // announces 65,520 bytes
            reason: GoodbyeReason::ProtocolViolation,
            log: "reason=frame: frame of 65522 bytes is over the limit of 4096",
        },
        Case {
            name: "unsupported version",
            hello_first: false,
            bytes: v2_hello[..m].to_vec(),
            reason: GoodbyeReason::UnsupportedVersion,
            log: "reason=goodbye: unsupported_version",
        },
        Case {
            name: "telemetry before hello",
            hello_first: false,
            bytes: telemetry[..n].to_vec(),
            reason: GoodbyeReason::ProtocolViolation,
            log: "reason=Telemetry before Hello",
        },
        Case {
            name: "empty frame",
            hello_first: true,
            bytes: vec![0, 0],
            reason: GoodbyeReason::ProtocolViolation,
            log: "reason=frame: frame with an empty body",
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let id = format!("bad-{i}");
        let cert = tg.pki.device(&id);
        let mut dev = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
            .await
            .unwrap();
        if case.hello_first {
            dev.hello(1).await;
        }
        dev.send_raw(&case.bytes).await.unwrap();
        let bye = dev.goodbye().await;
        assert_eq!(
            bye.map(|b| b.reason),
            Some(case.reason),
            "{}: the connection ends with a Goodbye naming the reason",
            case.name
        );
        let line = logs.wait_for(&[&format!("device={id}"), case.log]).await;
        assert!(line.contains("session closed"), "{}: {line}", case.name);
        seq += 1;
        good.telemetry(seq).await.unwrap();
        good.wait_ack(seq).await;
    }
    assert_eq!(
        tg.gw
            .metrics()
            .protocol_violations
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[tokio::test]
async fn takeover_closes_the_old_session_and_loses_nothing() {
    let tg = TestGateway::start().await;
    let (mut old, _) = tg.device("twin-1", 9).await;
    for seq in 1..=20 {
        old.telemetry(seq).await.unwrap();
    }
    // No wait for the ack: the new session must still see all 20 as stored.
    let (_new, welcome) = tg.device("twin-1", 9).await;
    assert_eq!(welcome.last_acked, Some(20));
    let bye = old.goodbye().await.unwrap();
    assert_eq!(bye.reason, GoodbyeReason::Replaced);
    assert!(tg.gw.is_online("twin-1"));
    let dev = tg.gw.device("twin-1").await.unwrap().unwrap();
    assert!(dev.online);
    assert_eq!(dev.connects, 2);
}

#[tokio::test]
async fn idle_sessions_time_out_and_shutdown_says_goodbye() {
    let (_logs, _guard) = LogCapture::start();
    let tg = TestGateway::start_with(|c| c.heartbeat = Duration::from_secs(1)).await;
    let (mut idle, welcome) = tg.device("sleepy-1", 1).await;
    assert_eq!(welcome.heartbeat_s, 1);
    // Silent for 3 heartbeats: closed.
    let bye = idle.goodbye().await.unwrap();
    assert_eq!(bye.reason, GoodbyeReason::IdleTimeout);

    let (mut dev, _) = tg.device("awake-1", 1).await;
    for seq in 1..=5 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(5).await;
    tokio::time::timeout(Duration::from_secs(20), tg.gw.shutdown())
        .await
        .expect("shutdown hung");
    let bye = dev.goodbye().await.unwrap();
    assert_eq!(bye.reason, GoodbyeReason::Shutdown);
    assert_eq!(bye.retry_after_s, 5);
    assert_eq!(tg.stored("awake-1").len(), 5);
}

#[tokio::test]
async fn overload_gets_goodbye_with_retry_after() {
    let tg = TestGateway::start_with(|c| c.max_connections = Some(1)).await;
    let (_first, _) = tg.device("first-1", 1).await;
    let cert = tg.pki.device("second-1");
    let mut second = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    let bye = second.goodbye().await.unwrap();
    assert_eq!(bye.reason, GoodbyeReason::Overload);
    assert_eq!(bye.retry_after_s, 5);
}

#[tokio::test]
async fn presence_and_telemetry_events_reach_subscribers() {
    let tg = TestGateway::start().await;
    let mut events = tg.gw.subscribe();
    let (mut dev, _) = tg.device("watched-1", 3).await;
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;
    let mut saw_online = false;
    let mut saw_telemetry = false;
    while !(saw_online && saw_telemetry) {
        let ev = tokio::time::timeout(e2e::WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
        match &*ev {
            Event::Presence {
                device,
                online: true,
                ..
            } => {
                assert_eq!(&**device, "watched-1");
                saw_online = true;
            }
            Event::Telemetry {
                device,
                seq,
                values,
                boot_id,
                ..
            } => {
                assert_eq!((&**device, *seq, *boot_id), ("watched-1", 1, 3));
                assert_eq!(values["temp"], json!(1.0));
                saw_telemetry = true;
            }
            _ => {}
        }
    }
    drop(dev);
    let offline = eventually("offline presence", || {
        let ev = events.try_recv().ok();
        async move { ev.filter(|e| matches!(&**e, Event::Presence { online: false, .. })) }
    })
    .await;
    assert_eq!(offline.device(), Some("watched-1"));
}

fn tls12_only_client(tg: &TestGateway, id: &str) -> std::sync::Arc<rustls::ClientConfig> {
    let cert = tg.pki.device(id);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tg.pki.ca.certificate_der()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(vec![cert.certificate_der()], cert.private_key_der())
    .unwrap();
    std::sync::Arc::new(config)
}

#[tokio::test]
async fn tls12_devices_work_unless_tls13_only() {
    let tg = TestGateway::start().await;
    let mut dev = RawDevice::connect_with(tg.addr(), tls12_only_client(&tg, "old-stack-1"))
        .await
        .unwrap();
    dev.hello(1).await;
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;

    let (logs, _guard) = LogCapture::start();
    let strict = TestGateway::start_with(|c| c.tls13_only = true).await;
    let refused =
        RawDevice::connect_with(strict.addr(), tls12_only_client(&strict, "old-stack-2")).await;
    assert!(
        refused.is_err(),
        "a TLS 1.2-only client cannot complete the handshake"
    );
    logs.wait_for(&["handshake refused", "reason=incompatible"])
        .await;
}

/// A session the gateway ends while bytes of the device wait unread in its socket is
/// closed with a FIN, not a reset: the gateway reads and drops what is left for a
/// moment before it closes. A reset makes the device's network stack drop what it had
/// received and not yet read (the `Goodbye`, the last acks): under QEMU a firmware
/// update cut this way left the device waiting for the rest of a TLS record forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_session_is_not_reset_under_the_devices_unread_bytes() {
    let tg = TestGateway::start_with(|c| c.write_timeout = Duration::from_secs(1)).await;
    let (mut a, _) = tg.device("linger-1", 1).await;
    // Pings without reading the pongs: the gateway's writes stall, then its reads.
    let sent = a.flood_pings(Duration::from_millis(300)).await;
    assert!(sent > 100, "{sent} pings");
    // The session ends (its write times out; another connection of the device takes
    // over). Everything it had sent reaches the device, then the end of the stream:
    // never a reset.
    let (_b, _) = tg.device("linger-1", 2).await;
    let mut pongs = 0u32;
    loop {
        match a.recv().await {
            Ok(Some(Down::Pong(_))) => pongs += 1,
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => panic!("the connection was reset after {pongs} pongs: {e}"),
        }
    }
    assert!(pongs > 0);
}
