//! End-to-end: the MQTT bridge against a real Mosquitto, checked by `mosquitto_sub` (an
//! independent client): every stored record reaches the broker once, in per-device
//! order, and a broker outage loses nothing while devices keep being acked.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};

use e2e::mqtt::{Mosquitto, Subscriber};
use e2e::{TestGateway, eventually, metric, stream_records};
use gateway::config::MqttSettings;
use serde_json::Value as Json;

/// (device, boot, seq) of every message `mosquitto_sub -v` printed, in arrival order
/// per device; panics on a payload that is not the bridge's JSON.
fn received(out: &str) -> BTreeMap<String, Vec<(String, u64)>> {
    let mut per_device: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for line in out.lines() {
        let (topic, payload) = line.split_once(' ').expect("topic and payload");
        let j: Json = serde_json::from_str(payload).expect("a JSON payload");
        let device = j["device"].as_str().unwrap().to_owned();
        assert_eq!(topic, format!("iot/devices/{device}/telemetry"));
        assert!(j["values"]["temp"].is_number(), "{payload}");
        per_device.entry(device).or_default().push((
            j["boot_id"].as_str().unwrap().to_owned(),
            j["seq"].as_u64().unwrap(),
        ));
    }
    per_device
}

/// Waits until `sub` has seen every (device, seq) of `devices` × `seqs` (for up to a
/// minute: a deadline for a hang, not a speed limit); returns what it received.
async fn until_all(
    sub: &Subscriber,
    devices: usize,
    seqs: u64,
) -> BTreeMap<String, Vec<(String, u64)>> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let got = received(&sub.lines().join("\n"));
        let complete = got.len() == devices
            && got
                .values()
                .all(|r| r.iter().map(|(_, s)| *s).collect::<BTreeSet<_>>().len() as u64 == seqs);
        if complete {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscriber has {} of {} records",
            got.values().map(Vec::len).sum::<usize>(),
            devices as u64 * seqs
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn with_bridge(broker: &Mosquitto) -> impl FnOnce(&mut gateway::Config) + use<> {
    bridged(broker, |_| {})
}

/// A bridge to `broker` with its settings changed by `tweak`.
fn bridged<T: FnOnce(&mut MqttSettings)>(
    broker: &Mosquitto,
    tweak: T,
) -> impl FnOnce(&mut gateway::Config) + use<T> {
    let mut m = MqttSettings {
        url: broker.url(),
        client_id: format!("gw-{}", std::process::id()),
        ..Default::default()
    };
    tweak(&mut m);
    move |c| c.mqtt = Some(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_record_reaches_the_broker_once_in_order() {
    if !Mosquitto::available() {
        return;
    }
    let broker = Mosquitto::start();
    let (n, per) = (200usize, 10u32);
    let sub = Subscriber::start(&broker, "check-1", "iot/devices/+/telemetry");
    let tg = TestGateway::start_with(with_bridge(&broker)).await;
    let mut devices = Vec::new();
    for i in 0..n {
        devices.push(tg.device(&format!("m-{i:03}"), 7).await.0);
    }
    stream_records(&mut devices, 1, per).await;

    let got = until_all(&sub, n, u64::from(per)).await;
    assert_eq!(got.len(), n, "every device");
    for (device, records) in &got {
        let seqs: Vec<u64> = records.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            seqs,
            (1..=u64::from(per)).collect::<Vec<_>>(),
            "{device}: once, in order"
        );
        assert!(records.iter().all(|(b, _)| b == "7"));
    }
    eventually("the bridge to count them", || async {
        let p = metric(&tg.gw, "gateway_mqtt_published_total").await?;
        (p == (n * per as usize) as f64).then_some(())
    })
    .await;
    assert_eq!(
        metric(&tg.gw, "gateway_mqtt_backlog_records").await,
        Some(0.0)
    );
    assert_eq!(metric(&tg.gw, "gateway_mqtt_connected").await, Some(1.0));
}

/// The broker stopped for 20 s mid-run, then restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_devices_never_notice() {
    if !Mosquitto::available() {
        return;
    }
    let mut broker = Mosquitto::start();
    let (n, per) = (20usize, 50u32);
    // A persistent session (QoS 1): the broker keeps messages for it while it is away.
    let sub = Subscriber::start(&broker, "check-2", "iot/devices/+/telemetry");
    let tg = TestGateway::start_with(with_bridge(&broker)).await;
    let mut devices = Vec::new();
    for i in 0..n {
        devices.push(tg.device(&format!("o-{i:02}"), 1).await.0);
    }
    stream_records(&mut devices, 1, per).await;
    eventually("the first records relayed", || async {
        let b = metric(&tg.gw, "gateway_mqtt_backlog_records").await?;
        (b == 0.0).then_some(())
    })
    .await;

    // The broker goes away for 20 s; devices keep sending and keep being acked.
    broker.stop();
    let outage = std::time::Instant::now();
    eventually("the bridge to notice", || async {
        let c = metric(&tg.gw, "gateway_mqtt_connected").await?;
        (c == 0.0).then_some(())
    })
    .await;
    let mut next = per + 1;
    while outage.elapsed() < std::time::Duration::from_secs(20) {
        stream_records(&mut devices, next, 10).await;
        next += 10;
        // Paces the load (a round of 10 records a device every ~0.2 s), no more.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let during = next - per - 1;
    let backlog = metric(&tg.gw, "gateway_mqtt_backlog_records")
        .await
        .unwrap();
    assert_eq!(
        backlog,
        (n * during as usize) as f64,
        "the store holds the backlog"
    );
    let api = tg.gw.api().unwrap();
    let (status, body) = e2e::http_get(api.addr, "/api/v1/bridge", Some(&api.token)).await;
    assert_eq!(status, 200);
    let state: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(state["connected"], false, "{state}");
    assert!(state["last_error"].is_string(), "{state}");

    // Back: the backlog drains, and new records follow.
    broker.restart();
    stream_records(&mut devices, next, per).await;
    let total = next - 1 + per;
    let got = until_all(&sub, n, u64::from(total)).await;
    assert_eq!(got.len(), n);
    for (device, records) in &got {
        let distinct: BTreeSet<u64> = records.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            distinct,
            (1..=u64::from(total)).collect::<BTreeSet<_>>(),
            "{device}: every record"
        );
        // Duplicates only where a PUBACK was lost, and then detectable: same (boot, seq).
        assert!(records.len() >= distinct.len());
    }
    eventually("the backlog drained", || async {
        let b = metric(&tg.gw, "gateway_mqtt_backlog_records").await?;
        (b == 0.0).then_some(())
    })
    .await;
}

/// `mqtts://`: with the broker's CA the bridge relays; with another CA it is refused,
/// and says why (a log line, the API, a metric), retrying with a growing pause.
/// (One thread: the log capture sees what the runtime's tasks log.)
#[tokio::test]
async fn a_tls_broker_works_and_a_wrong_ca_is_refused_clearly() {
    if !Mosquitto::available() {
        return;
    }
    let (logs, _guard) = e2e::logs::LogCapture::start();
    // The broker's certificate: issued for "localhost" by a CA of its own.
    let broker_pki = e2e::Pki::new();
    let broker = Mosquitto::start_tls(
        &broker_pki.path("gateway.pem"),
        &broker_pki.path("gateway.key.pem"),
    );
    let tls = |ca: std::path::PathBuf, id: &'static str| {
        let url = format!("mqtts://localhost:{}", broker.port);
        move |c: &mut gateway::Config| {
            c.mqtt = Some(MqttSettings {
                url,
                client_id: id.into(),
                ca: Some(ca),
                ..Default::default()
            })
        }
    };
    let good = TestGateway::start_with(tls(broker_pki.path("ca.pem"), "tls-good")).await;
    let (mut dev, _) = good.device("t-1", 1).await;
    for seq in 1..=5 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(5).await;
    eventually("five records relayed over TLS", || async {
        let p = metric(&good.gw, "gateway_mqtt_published_total").await?;
        (p == 5.0).then_some(())
    })
    .await;

    // Another CA: refused, and said so.
    let stranger = e2e::Pki::new();
    let bad = TestGateway::start_with(tls(stranger.path("ca.pem"), "tls-bad")).await;
    eventually("the refusal counted", || async {
        let f = metric(&bad.gw, "gateway_mqtt_connect_failures_total").await?;
        (f >= 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(&bad.gw, "gateway_mqtt_connected").await, Some(0.0));
    let api = bad.gw.api().unwrap();
    let (_, body) = e2e::http_get(api.addr, "/api/v1/bridge", Some(&api.token)).await;
    let state: Json = serde_json::from_str(&body).unwrap();
    let why = state["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("TLS") && why.contains("mqtt.ca"), "{state}");
    logs.wait_for(&["MQTT bridge", "TLS with the broker failed", "retry_in"])
        .await;
}

/// SIGKILL of the gateway while the broker is down and a backlog waits: after both
/// restart, every record that was acked to a device reaches the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_an_outage_loses_nothing() {
    use e2e::process::GatewayProcess;
    if !Mosquitto::available() {
        return;
    }
    const BIN: &str = env!("CARGO_BIN_EXE_e2e-gateway");
    let mut broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "check-4", "iot/devices/+/telemetry");
    let pki = e2e::Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut args = pki.gateway_args(data.path(), "127.0.0.1:0");
    args.extend(["--mqtt".into(), broker.url()]);
    let (gw, addr) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let api = gw.api_addr().await;
    let token = std::fs::read_to_string(data.path().join("db/api-token")).unwrap();
    let backlog = || async {
        let (_, body) = e2e::http_get(api, "/api/v1/bridge", Some(token.trim())).await;
        let state: Json = serde_json::from_str(&body).unwrap();
        state["backlog_records"].as_u64()
    };
    let mut dev = pki.session(addr, "k-1", 3).await;
    stream_records(std::slice::from_mut(&mut dev), 1, 50).await;
    eventually("the first 50 relayed", || async {
        (backlog().await? == 0).then_some(())
    })
    .await;

    broker.stop();
    stream_records(std::slice::from_mut(&mut dev), 51, 50).await;
    eventually("50 records waiting", || async {
        (backlog().await? == 50).then_some(())
    })
    .await;
    gw.kill();
    drop(dev);

    broker.restart();
    let (gw, _) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let got = until_all(&sub, 1, 100).await;
    assert_eq!(
        got["k-1"].iter().filter(|(b, _)| b == "3").count(),
        got["k-1"].len()
    );
    drop(gw);
}

/// The JSON payloads `sub` (started with [`Subscriber::start_v5`]) received on `topic`
/// with this correlation data, in order.
fn replies(sub: &Subscriber, topic: &str, correlation: &str) -> Vec<Json> {
    sub.lines()
        .iter()
        .filter_map(|l| {
            let mut parts = l.splitn(3, '|');
            let (t, c, p) = (parts.next()?, parts.next()?, parts.next()?);
            (t == topic && c == correlation).then(|| serde_json::from_str(p).expect("JSON"))
        })
        .collect()
}

/// A command published on MQTT (MQTT 5, with a Response Topic and Correlation Data)
/// reaches the device; every state change and the result come back there with the
/// correlation data; the HTTP API shows the same command. A bad request gets an error
/// on the device's response topic. Presence is retained online, then offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_mqtt_and_presence() {
    use e2e::mqtt::publish;
    if !Mosquitto::available() {
        return;
    }
    let broker = Mosquitto::start();
    let tg = TestGateway::start_with(with_bridge(&broker)).await;
    let (dev, _) = tg.device("c-1", 1).await;
    let responder = e2e::answer_commands(dev);
    eventually("the bridge connected", || async {
        (metric(&tg.gw, "gateway_mqtt_connected").await? == 1.0).then_some(())
    })
    .await;
    let presence = Subscriber::start(&broker, "check-5p", "iot/devices/+/presence");
    eventually("c-1 online, retained", || async {
        presence
            .lines()
            .iter()
            .any(|l| l.starts_with("iot/devices/c-1/presence ") && l.contains("\"online\""))
            .then_some(())
    })
    .await;

    let sub = Subscriber::start_v5(&broker, "check-5", "replies/#");
    let other = Subscriber::start_v5(&broker, "check-5e", "iot/devices/+/commands/response");
    publish(
        &broker,
        "iot/devices/c-1/commands/request",
        r#"{"name": "echo", "args": {"text": "hi"}, "ttl_s": 30}"#,
        &[
            ("response-topic", "replies/flow-1"),
            ("correlation-data", "req-42"),
        ],
    );
    let states = eventually("the result on the response topic", || async {
        let r = replies(&sub, "replies/flow-1", "req-42");
        r.iter()
            .any(|j| j["state"] == "succeeded")
            .then_some(r.clone())
    })
    .await;
    let names: Vec<&str> = states
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["queued", "sent", "succeeded"], "{states:?}");
    let done = states.last().unwrap();
    assert_eq!(done["result"]["text"], "hi", "{done}");
    assert_eq!(done["device"], "c-1");

    // The same command in the HTTP API.
    let api = e2e::ApiClient::new(&tg.gw);
    let (status, rec) = api.get(&format!("/api/v1/commands/{}", done["id"])).await;
    assert_eq!(status, 200);
    assert_eq!(rec["state"], "succeeded");
    assert_eq!(rec["name"], "echo");

    // Not a device the gateway knows, and not a command: errors, not silence.
    publish(
        &broker,
        "iot/devices/nobody/commands/request",
        r#"{"name": "echo"}"#,
        &[],
    );
    publish(
        &broker,
        "iot/devices/c-1/commands/request",
        r#"{"nme": "echo"}"#,
        &[
            ("response-topic", "replies/flow-2"),
            ("correlation-data", "req-43"),
        ],
    );
    eventually("both errors", || async {
        let unknown = replies(&other, "iot/devices/nobody/commands/response", "");
        let bad = replies(&sub, "replies/flow-2", "req-43");
        (unknown.iter().any(|j| j["code"] == "no_device")
            && bad.iter().any(|j| j["code"] == "bad_body"))
        .then_some(())
    })
    .await;
    assert_eq!(
        metric(&tg.gw, "gateway_mqtt_commands_total").await,
        Some(3.0)
    );

    // Offline when the session ends.
    responder.abort();
    let _ = responder.await;
    eventually("c-1 offline", || async {
        presence
            .lines()
            .iter()
            .any(|l| l.starts_with("iot/devices/c-1/presence ") && l.contains("\"offline\""))
            .then_some(())
    })
    .await;
}

/// With `home_assistant` on, each reading of each device is announced once, retained,
/// as a Home Assistant sensor whose template reads the bridge's own telemetry JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_announces_each_reading_once() {
    if !Mosquitto::available() {
        return;
    }
    let broker = Mosquitto::start();
    let tg = TestGateway::start_with(bridged(&broker, |m| {
        m.gateway_id = "edge.1".into();
        m.home_assistant = true;
    }))
    .await;
    let (mut dev, _) = tg.device("h.1", 1).await;
    stream_records(std::slice::from_mut(&mut dev), 1, 3).await;
    let telemetry = Subscriber::start(&broker, "check-6t", "iot/devices/+/telemetry");
    stream_records(std::slice::from_mut(&mut dev), 4, 1).await;
    // Subscribed after the announcement: it is retained.
    let sub = Subscriber::start(&broker, "check-6", "homeassistant/#");
    let line = eventually("the announcement", || async {
        sub.lines().first().cloned()
    })
    .await;
    let (topic, payload) = line.split_once(' ').unwrap();
    assert_eq!(topic, "homeassistant/sensor/h_1/temp/config");
    let config: Json = serde_json::from_str(payload).unwrap();
    assert_eq!(config["state_topic"], "iot/devices/h.1/telemetry");
    assert_eq!(config["availability_topic"], "iot/devices/h.1/presence");
    assert_eq!(config["unique_id"], "edge_1_h_1_temp");
    assert_eq!(config["state_class"], "measurement");
    assert_eq!(
        config["value_template"],
        "{{ value_json['values']['temp'] }}"
    );
    // The template's path exists in what the telemetry topic carries.
    let record = eventually("a record", || async { telemetry.lines().first().cloned() }).await;
    let (_, record) = record.split_once(' ').unwrap();
    let record: Json = serde_json::from_str(record).unwrap();
    assert!(record["values"]["temp"].is_number(), "{record}");
    assert_eq!(sub.lines().len(), 1, "announced once: {:?}", sub.lines());
}

/// `protocol = "3.1.1"`: the same telemetry, presence and commands over MQTT 3.1.1
/// (command states on the device's `commands/response`, as 3.1.1 has no Response Topic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_relays_telemetry_and_takes_commands() {
    if !Mosquitto::available() {
        return;
    }
    let broker = Mosquitto::start();
    let tg = TestGateway::start_with(bridged(&broker, |m| {
        m.client_id = "v311-gw".into();
        m.protocol = gateway::config::MqttVersion::V311;
    }))
    .await;
    let sub = Subscriber::start(&broker, "check-7", "iot/devices/+/telemetry");
    let responses = Subscriber::start(&broker, "check-7r", "iot/devices/+/commands/response");
    let (mut dev, _) = tg.device("v-1", 5).await;
    stream_records(std::slice::from_mut(&mut dev), 1, 5).await;
    let got = until_all(&sub, 1, 5).await;
    assert_eq!(got["v-1"].len(), 5);
    // Mosquitto logs the protocol of each client: p2 is MQTT 3.1.1.
    assert!(broker.log().contains("as v311-gw (p2"), "{}", broker.log());

    let responder = e2e::answer_commands(dev);
    e2e::mqtt::publish(
        &broker,
        "iot/devices/v-1/commands/request",
        r#"{"name": "echo", "args": {"text": "old"}}"#,
        &[],
    );
    let done = eventually("the result on commands/response", || async {
        responses.lines().iter().find_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            let j: Json = serde_json::from_str(payload).ok()?;
            (topic == "iot/devices/v-1/commands/response" && j["state"] == "succeeded").then_some(j)
        })
    })
    .await;
    assert_eq!(done["result"]["text"], "old");
    responder.abort();
}
