//! End to end, the device state document (protocol version 2): desired settings set
//! through the HTTP API reach real simulated devices (the device client over TLS),
//! come back reported, and show in the API; version 1 devices keep working unchanged;
//! a device that needs version 2 refuses a gateway pinned to version 1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use device_client::proto::{self, GoodbyeReason, Readings, Reported, Uplink};
use device_client::sim::{SimConfig, Simulator};
use e2e::sim::{SIM_WAIT, loaded, until};
use e2e::{ApiClient, Down, TestGateway, eventually};
use reqwest::Method;
use serde_json::{Value, json};

fn sim_config(tg: &TestGateway, n: usize) -> SimConfig {
    let mut c = SimConfig::new(tg.addr().to_string(), loaded(&tg.pki, n));
    c.rate = 0.0;
    c.threads = Some(1);
    c.backoff_min = Duration::from_millis(100);
    c.backoff_max = Duration::from_secs(1);
    c.drain_timeout = SIM_WAIT;
    c
}

/// Waits until the API shows `device` in sync at `version`; returns its state.
async fn in_sync(api: &ApiClient, device: &str, version: u64) -> Value {
    eventually(&format!("{device} in sync at {version}"), || async {
        let (status, s) = api.get(&format!("/api/v1/devices/{device}/state")).await;
        assert_eq!(status, 200, "{s}");
        (s["in_sync"] == json!(true) && s["desired_version"] == json!(version)).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_reaches_simulated_devices_and_comes_back_reported() {
    let tg = TestGateway::start().await;
    let api = ApiClient::new(&tg.gw);
    let sim = Simulator::start(sim_config(&tg, 3)).unwrap();
    let mon = sim.monitor();
    until(&mon, "every device connected", |s| s.connected == 3).await;

    // One device: a sampling interval (the simulator applies it) and a mode.
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/devices/sim-0000/state",
            json!({"desired": {"interval_ms": 50, "mode": "eco"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["desired_version"], json!(1));
    assert_eq!(body["desired"], json!({"interval_ms": 50, "mode": "eco"}));
    let s = in_sync(&api, "sim-0000", 1).await;
    assert_eq!(s["reported"], json!({"interval_ms": 50, "mode": "eco"}));
    assert_eq!(s["reported_version"], json!(1));
    assert!(s["reported_age_ms"].as_i64().unwrap() >= 0);
    // The interval took effect: the device samples now.
    let store = tg.gw.store();
    eventually("telemetry from sim-0000", || async {
        (store.telemetry_count(Some("sim-0000")).await.unwrap() >= 5).then_some(())
    })
    .await;

    // A version precondition that no longer holds changes nothing.
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/devices/sim-0000/state",
            json!({"desired": {"mode": "max"}, "version": 0}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("version_conflict"))
    );
    // Bounds are the protocol's: a bad name is refused with the reason.
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/devices/sim-0000/state",
            json!({"desired": {"bad name": 1}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("invalid_state"))
    );

    // A group: every member gets the change; unsetting removes a setting.
    let (status, _) = api
        .send(
            Method::PUT,
            "/api/v1/groups/all",
            json!({"devices": ["sim-0000", "sim-0001", "sim-0002"]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/groups/all/state",
            json!({"desired": {"led": true, "mode": null}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let receipts = body["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 3);
    assert!(receipts.iter().all(|r| r["status"] == json!(200)), "{body}");

    let s = in_sync(&api, "sim-0000", 2).await;
    assert_eq!(s["desired"], json!({"interval_ms": 50, "led": true}));
    // Reported values merge: the device reports what it holds after the change.
    assert_eq!(s["reported"]["led"], json!(true));
    for d in ["sim-0001", "sim-0002"] {
        let s = in_sync(&api, d, 1).await;
        assert_eq!(s["reported"], json!({"led": true}));
    }
    // A change wrong for any member is refused for the request, changing nothing.
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/groups/all/state",
            json!({"desired": {"ok": 1, "bad name": 2}}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("invalid_state"))
    );
    // One wrong for one member only (sim-0000 holds 2 settings, the others 1): 15
    // more fit the others, not it.
    let fifteen: serde_json::Map<String, Value> =
        (0..15).map(|i| (format!("k{i}"), json!(i))).collect();
    let (status, body) = api
        .send(
            Method::PUT,
            "/api/v1/groups/all/state",
            json!({"desired": fifteen}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let by_device: Vec<(String, Value)> = body["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_owned(),
                r["status"].clone(),
            )
        })
        .collect();
    assert_eq!(
        by_device,
        vec![
            ("sim-0000".into(), json!(400)),
            ("sim-0001".into(), json!(200)),
            ("sim-0002".into(), json!(200)),
        ],
        "{body}"
    );
    // The others took all 16 settings; the refused one is unchanged.
    let s = in_sync(&api, "sim-0001", 2).await;
    assert_eq!(s["reported"]["k14"], json!(14));
    in_sync(&api, "sim-0000", 2).await;
    // An unknown device has no state.
    let (status, _) = api.get("/api/v1/devices/nobody/state").await;
    assert_eq!(status, 404);

    mon.stop();
    let summary = sim.wait().await.unwrap();
    assert_eq!(summary.counts.fatal, 0);
}

/// A device of version 1 (the golden vectors' `Hello`) gets a version 1 session and
/// works as before: no state messages reach it, and a version 2 message from it is a
/// protocol violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_devices_work_unchanged() {
    let tg = TestGateway::start().await;
    let api = ApiClient::new(&tg.gw);
    let (status, _) = api
        .send(
            Method::PUT,
            "/api/v1/devices/old-1/state",
            json!({"desired": {"interval_s": 5}}),
        )
        .await;
    assert_eq!(
        status, 200,
        "a device can be given settings before it connects"
    );
    let cert = tg.pki.device("old-1");
    let mut dev = e2e::RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    let welcome = dev.hello_version(7, 1).await;
    assert_eq!(welcome.version, 1);
    for seq in 1..=3 {
        dev.telemetry(seq).await.unwrap();
    }
    let others = dev.wait_ack(3).await;
    assert!(others.is_empty(), "nothing but acks: {others:?}");
    assert_eq!(tg.stored("old-1").len(), 3);
    // `Reported` does not exist in version 1.
    dev.send(&Uplink::Reported(Reported {
        desired_version: 0,
        values: Readings::new(),
    }))
    .await
    .unwrap();
    let bye = dev.goodbye().await.expect("a Goodbye");
    assert_eq!(bye.reason, GoodbyeReason::ProtocolViolation);

    // The same device speaking version 2 asks for its state and gets all of it.
    let mut dev = e2e::RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    let welcome = dev.hello_version(7, 2).await;
    assert_eq!(welcome.version, 2);
    dev.send(&Uplink::Reported(Reported {
        desired_version: 0,
        values: Readings::new(),
    }))
    .await
    .unwrap();
    match dev.recv().await.unwrap() {
        Some(Down::Desired {
            version,
            base,
            set,
            unset,
        }) => {
            assert_eq!((version, base), (1, 0));
            assert_eq!(set, json!({"interval_s": 5}));
            assert!(unset.is_empty());
        }
        other => panic!("expected Desired, got {other:?}"),
    }
}

/// A gateway pinned to version 1 (`max_protocol_version = 1`): ordinary devices work
/// with it at version 1; devices that need version 2 refuse it for good, with the
/// reason `UnsupportedVersion(1)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_pinned_to_version_1() {
    let tg = TestGateway::start_with(|c| c.max_protocol_version = 1).await;
    let (_dev, welcome) = tg.device("raw-2", 1).await;
    assert_eq!(
        welcome.version, 1,
        "a version 2 Hello gets a version 1 session"
    );

    let sim = Simulator::start(sim_config(&tg, 2)).unwrap();
    let mon = sim.monitor();
    until(&mon, "both devices connected", |s| s.connected == 2).await;
    mon.stop();
    let summary = sim.wait().await.unwrap();
    assert_eq!(summary.counts.fatal, 0);

    let mut strict = sim_config(&tg, 2);
    strict.min_version = 2;
    let sim = Simulator::start(strict).unwrap();
    let mon = sim.monitor();
    until(&mon, "both devices refused", |s| s.counts.fatal == 2).await;
    mon.stop();
    let summary = sim.wait().await.unwrap();
    for d in &summary.per_device {
        assert_eq!(
            d.fatal.as_deref(),
            Some("UnsupportedVersion(1)"),
            "{}",
            d.id
        );
        assert_eq!(d.connects, 0, "{}: never a session", d.id);
    }
}

/// A wake-up that finds both a desired-state change and a command handles both: a
/// session once handled the desired state and left the command waiting for another
/// signal, which an idle device never gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_signalled_with_a_desired_change_is_not_left_waiting() {
    let tg = TestGateway::start().await;
    let api = ApiClient::new(&tg.gw);
    let (mut dev, welcome) = tg.device("both-1", 1).await;
    assert_eq!(welcome.version, proto::PROTOCOL_VERSION);
    // Set while the device has not said what it holds: nothing can be sent yet, and
    // the session keeps the signal.
    let (status, _) = api
        .send(
            Method::PUT,
            "/api/v1/devices/both-1/state",
            json!({"desired": {"a": 1}}),
        )
        .await;
    assert_eq!(status, 200);
    // The device holds that version already (say, from flash): nothing to send.
    dev.send(&Uplink::Reported(Reported {
        desired_version: 1,
        values: Readings::new(),
    }))
    .await
    .unwrap();
    e2e::eventually("the report recorded", || async {
        let s = tg.gw.device_state("both-1").await.unwrap()?;
        (s.reported_version == Some(1)).then_some(())
    })
    .await;
    // One signal for the command; the desired flag is still set from before.
    let (status, body) = api
        .send(
            Method::POST,
            "/api/v1/devices/both-1/commands",
            json!({"name": "ping_me"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    match dev.recv().await.unwrap() {
        Some(Down::Command { name, .. }) => assert_eq!(name, "ping_me"),
        other => panic!("expected the command, got {other:?}"),
    }
}
