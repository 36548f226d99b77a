//! End-to-end: gateways of one fleet relay telemetry into a replicated JetStream stream
//! on a real 3-node `nats-server` cluster; the test reads the stream itself, with the
//! NATS client crate (not through a gateway), and finds every acked record exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use e2e::nats::NatsCluster;
use e2e::{TestGateway, eventually, metric, stream_records};
use futures_util::StreamExt;
use gateway::config::FleetSettings;

const STREAM: &str = "IOT_TELEMETRY";
/// `gateway/src/main.rs`, built by this package.
const BIN: &str = env!("CARGO_BIN_EXE_e2e-gateway");

/// The command line of a gateway process of the fleet on `cluster`, named `id`.
fn process_args(
    pki: &e2e::Pki,
    cluster: &NatsCluster,
    data: &std::path::Path,
    id: &str,
) -> Vec<String> {
    let mut args = pki.gateway_args(data, "127.0.0.1:0");
    args.extend([
        "--fleet".into(),
        cluster.urls().join(","),
        "--fleet-gateway-id".into(),
        id.into(),
    ]);
    args
}

/// A gateway of the fleet on `cluster`, named `id` (its servers listed from `first`).
async fn fleet_gateway(cluster: &NatsCluster, id: &str, first: usize) -> TestGateway {
    let mut urls = cluster.urls();
    urls.rotate_left(first);
    let id = id.to_owned();
    TestGateway::start_with(move |c| {
        c.fleet = Some(FleetSettings {
            urls,
            gateway_id: id,
            ..Default::default()
        })
    })
    .await
}

/// Every message in the stream as (device, boot, seq) → copies, read with a pull
/// consumer of our own once the stream holds `expected` messages (or the wait ends).
async fn read_stream(cluster: &NatsCluster, expected: u64) -> BTreeMap<(String, u64, u64), u32> {
    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let js = jetstream::new(client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        if let Ok(s) = js.get_stream(STREAM).await {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no stream {STREAM}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        let n = stream.info().await.unwrap().state.messages;
        if n >= expected || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut seen = BTreeMap::new();
    let mut read = 0;
    while read < total {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let h = m.headers.as_ref().expect("headers");
            let get = |k: &str| h.get(k).expect(k).as_str().to_owned();
            let key = (
                get("Iot-Device"),
                get("Iot-Boot").parse().unwrap(),
                get("Iot-Seq").parse().unwrap(),
            );
            // The payload says the same.
            let j: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(j["device"], key.0.as_str());
            assert_eq!(j["seq"], key.2);
            *seen.entry(key).or_insert(0) += 1;
            read += 1;
            m.ack().await.unwrap();
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_put_every_acked_record_into_the_stream_once() {
    if !NatsCluster::available() {
        return;
    }
    let cluster = NatsCluster::start();
    let (n, per) = (100usize, 10u32);
    let mut gateways = Vec::new();
    for g in 0..3 {
        gateways.push(fleet_gateway(&cluster, &format!("g{g}"), g).await);
    }
    let mut devices = Vec::new();
    for (g, tg) in gateways.iter().enumerate() {
        for i in 0..n {
            devices.push(tg.device(&format!("f{g}-{i:03}"), 9).await.0);
        }
    }
    stream_records(&mut devices, 1, per).await;

    let want = (3 * n) as u64 * u64::from(per);
    let seen = read_stream(&cluster, want).await;
    assert_eq!(seen.len() as u64, want, "every acked record");
    assert!(seen.values().all(|&c| c == 1), "once each");
    for g in 0..3 {
        for i in 0..n {
            let d = format!("f{g}-{i:03}");
            for s in 1..=u64::from(per) {
                assert!(seen.contains_key(&(d.clone(), 9, s)), "{d} {s}");
            }
        }
    }
    // What the registry costs per device: its bucket's backing stream, one message per
    // key — one per device, and one command-id slot per gateway (a measurement,
    // printed).
    let js = jetstream::new(async_nats::connect(cluster.urls()).await.unwrap());
    let state = eventually("every device claimed", || async {
        let mut kv = js.get_stream("KV_IOT_DEVICES").await.ok()?;
        let st = kv.info().await.ok()?.state.clone();
        (st.messages == 3 * n as u64 + 3).then_some(st)
    })
    .await;
    println!(
        "registry: {} keys, {} bytes per key per replica",
        state.messages,
        state.bytes / state.messages
    );
    // Replicated: a leader and two followers.
    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let mut stream = jetstream::new(client).get_stream(STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let replicas = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
    assert_eq!(replicas, 2, "{:?}", info.cluster);
    for tg in &gateways {
        assert_eq!(
            metric(&tg.gw, "gateway_fleet_backlog_records").await,
            Some(0.0)
        );
        assert_eq!(metric(&tg.gw, "gateway_fleet_connected").await, Some(1.0));
    }
}

/// A device that moved: it sent records 1–5 to gateway A, then (its acks lost, say)
/// sends 1–10 to gateway B. Both gateways relay what they stored; the stream keeps
/// each record once, and B counts the five it already had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_relayed_by_two_gateways_is_kept_once() {
    if !NatsCluster::available() {
        return;
    }
    let cluster = NatsCluster::start();
    let a = fleet_gateway(&cluster, "a", 0).await;
    let b = fleet_gateway(&cluster, "b", 1).await;
    let (mut dev, _) = a.device("mover", 4).await;
    stream_records(std::slice::from_mut(&mut dev), 1, 5).await;
    eventually("A relayed its five", || async {
        (metric(&a.gw, "gateway_fleet_published_total").await? == 5.0).then_some(())
    })
    .await;
    drop(dev);
    let (mut dev, _) = b.device("mover", 4).await;
    stream_records(std::slice::from_mut(&mut dev), 1, 10).await;
    eventually("B relayed its ten", || async {
        (metric(&b.gw, "gateway_fleet_published_total").await? == 10.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(&b.gw, "gateway_fleet_duplicates_total").await,
        Some(5.0)
    );
    let seen = read_stream(&cluster, 10).await;
    assert_eq!(seen.len(), 10);
    assert!(seen.values().all(|&c| c == 1), "{seen:?}");
}

/// The stream's leader node stops mid-run and comes back: devices are acked
/// throughout, no acked record is lost or doubled, and the node rejoins. The longest
/// pause in a gateway's relaying is printed (a measurement, not a limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_stopping_mid_run_loses_nothing() {
    if !NatsCluster::available() {
        return;
    }
    let mut cluster = NatsCluster::start();
    let mut gateways = Vec::new();
    for g in 0..3 {
        gateways.push(fleet_gateway(&cluster, &format!("n{g}"), g).await);
    }
    let mut devices = Vec::new();
    for (g, tg) in gateways.iter().enumerate() {
        for i in 0..10 {
            devices.push(tg.device(&format!("s{g}-{i}"), 2).await.0);
        }
    }
    stream_records(&mut devices, 1, 5).await;
    let _ = read_stream(&cluster, 150).await;

    // Stop the node that leads the stream.
    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let mut stream = jetstream::new(client).get_stream(STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap();
    let node: usize = leader.trim_start_matches('n').parse::<usize>().unwrap() - 1;
    cluster.stop(node);

    // Devices keep streaming; watch how long each gateway's relaying stands still.
    let mut next = 6;
    let mut last: Vec<(f64, std::time::Instant)> = Vec::new();
    for tg in &gateways {
        let p = metric(&tg.gw, "gateway_fleet_published_total")
            .await
            .unwrap();
        last.push((p, std::time::Instant::now()));
    }
    let mut longest = Duration::ZERO;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        stream_records(&mut devices, next, 2).await;
        next += 2;
        for (tg, (p0, t0)) in gateways.iter().zip(last.iter_mut()) {
            let p = metric(&tg.gw, "gateway_fleet_published_total")
                .await
                .unwrap();
            if p > *p0 {
                longest = longest.max(t0.elapsed());
                *p0 = p;
                *t0 = std::time::Instant::now();
            }
        }
        // Paces the load, no more.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.restart(node);
    let total = u64::from(next - 1);
    let seen = read_stream(&cluster, 30 * total).await;
    assert_eq!(seen.len() as u64, 30 * total, "every acked record");
    assert!(seen.values().all(|&c| c == 1), "once each");
    println!("longest pause in a gateway's relaying with the stream leader stopped: {longest:?}");
    for tg in &gateways {
        eventually("the backlog drained", || async {
            (metric(&tg.gw, "gateway_fleet_backlog_records").await? == 0.0).then_some(())
        })
        .await;
    }
}

/// SIGKILL of a gateway process right after its devices were acked, with records not yet
/// relayed (or relayed with the cursor not yet saved): after a restart it relays from
/// its cursor, and the stream ends with every acked record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_run_relays_the_rest_once_after_restart() {
    use e2e::process::GatewayProcess;
    if !NatsCluster::available() {
        return;
    }
    let cluster = NatsCluster::start();
    let pki = e2e::Pki::new();
    let data = tempfile::tempdir().unwrap();
    let args = process_args(&pki, &cluster, data.path(), "k1");
    let (gw, addr) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let mut devices = Vec::new();
    for i in 0..20 {
        devices.push(pki.session(addr, &format!("k-{i:02}"), 6).await);
    }
    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let js = jetstream::new(client);
    stream_records(&mut devices, 1, 100).await;
    gw.kill();
    drop(devices);
    if let Ok(mut s) = js.get_stream(STREAM).await {
        let at_kill = s.info().await.map(|i| i.state.messages).unwrap_or(0);
        println!("records in the stream when the gateway was killed: {at_kill} of 2000");
    }

    let (gw, _) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let seen = read_stream(&cluster, 2000).await;
    assert_eq!(seen.len(), 2000, "every acked record");
    assert!(seen.values().all(|&c| c == 1), "once each");
    drop(gw);
}

/// Simulated devices given the three gateways' addresses spread over them; SIGKILL of
/// one gateway process: its devices reconnect to the other two within their backoff and
/// keep streaming. Once it restarts it relays what it had not, and the stream holds
/// every acked record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_move_to_the_other_gateways_when_one_is_killed() {
    use device_client::sim::{SimConfig, Simulator};
    use e2e::process::GatewayProcess;
    use e2e::sim::{SIM_WAIT, loaded, until};
    if !NatsCluster::available() {
        return;
    }
    let cluster = NatsCluster::start();
    let pki = e2e::Pki::new();
    let mut gateways = Vec::new();
    for g in 0..3 {
        let data = tempfile::tempdir().unwrap();
        let args = process_args(&pki, &cluster, data.path(), &format!("p{g}"));
        let (process, addr) = GatewayProcess::start(BIN.as_ref(), &args).await;
        gateways.push((process, addr, args, data));
    }
    let n = 30;
    let addrs: Vec<String> = gateways.iter().map(|g| g.1.to_string()).collect();
    let mut config = SimConfig::new(addrs.join(","), loaded(&pki, n));
    config.rate = 20.0;
    config.threads = Some(1);
    config.ring_bytes = 16 * 1024;
    config.backoff_min = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(1);
    config.drain_timeout = SIM_WAIT;
    let sim = Simulator::start(config).unwrap();
    let mon = sim.monitor();
    until(&mon, "every device connected", |s| s.ever_connected == n).await;
    until(&mon, "records acked", |s| s.counts.acked >= 300).await;

    let (killed, _, args, _data) = gateways.remove(0);
    let before = mon.stats();
    let killed_at = std::time::Instant::now();
    killed.kill();
    // A third of the devices lose their gateway and find another.
    until(&mon, "its devices back on the others", |s| {
        s.connected == n as u64 && s.counts.connects >= before.counts.connects + (n / 3) as u64
    })
    .await;
    println!(
        "every device reachable again {:?} after its gateway was killed (backoff 0.1–1 s)",
        killed_at.elapsed()
    );
    let moved = mon.stats().counts.acked;
    until(&mon, "streaming on", |s| s.counts.acked >= moved + 300).await;
    mon.stop();
    let summary = sim.wait().await.unwrap();

    // The killed gateway comes back (on another port: no device needs it) and relays
    // what it stored and had not relayed.
    let (_again, _) = GatewayProcess::start(BIN.as_ref(), &args).await;
    let acked: u64 = summary
        .per_device
        .iter()
        .flat_map(|d| d.boots.iter().map(|b| u64::from(b.acked)))
        .sum();
    let seen = read_stream(&cluster, acked).await;
    assert!(seen.values().all(|&c| c == 1), "once each");
    for d in &summary.per_device {
        for b in &d.boots {
            for seq in 1..=u64::from(b.acked) {
                assert!(
                    seen.contains_key(&(d.id.clone(), b.boot_id, seq)),
                    "{} boot {} seq {seq} was acked and is not in the stream",
                    d.id,
                    b.boot_id
                );
            }
        }
    }
    println!(
        "acked {acked}; in the stream {}; reconnects {}",
        seen.len(),
        summary.counts.reconnects
    );
}

/// One device connecting to gateway 2 while gateway 1 holds its session: gateway 1's
/// session ends with `Goodbye{Replaced}` (decided by the registry's compare-and-set),
/// and either gateway's device list says where each device of the fleet is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_per_device_fleet_wide_and_one_device_list() {
    use device_client::proto::GoodbyeReason;
    use e2e::process::GatewayProcess;
    if !NatsCluster::available() {
        return;
    }
    let cluster = NatsCluster::start();
    let pki = e2e::Pki::new();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (g1, a1) =
        GatewayProcess::start(BIN.as_ref(), &process_args(&pki, &cluster, d1.path(), "r1")).await;
    let (g2, a2) =
        GatewayProcess::start(BIN.as_ref(), &process_args(&pki, &cluster, d2.path(), "r2")).await;
    let api1 = g1.api_addr().await;
    let token1 = std::fs::read_to_string(d1.path().join("db/api-token")).unwrap();
    let devices_on_1 = || async {
        let (status, body) = e2e::http_get(api1, "/api/v1/devices", Some(token1.trim())).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Vec<serde_json::Value>>(&body).unwrap()
    };
    let find = |list: &[serde_json::Value], id: &str| list.iter().find(|d| d["id"] == id).cloned();

    let mut first = pki.session(a1, "dup", 1).await;
    let _only2 = pki.session(a2, "only-on-2", 1).await;
    eventually("gateway 1 lists both, with their gateways", || async {
        let list = devices_on_1().await;
        let dup = find(&list, "dup")?;
        let other = find(&list, "only-on-2")?;
        (dup["gateway"] == "r1" && other["gateway"] == "r2" && other["online"] == true)
            .then_some(())
    })
    .await;

    // The same device on gateway 2: gateway 1's session ends, replaced.
    let mut second = pki.session(a2, "dup", 2).await;
    let bye = tokio::time::timeout(Duration::from_secs(15), first.goodbye())
        .await
        .expect("gateway 1 ended its session");
    assert_eq!(bye.map(|g| g.reason), Some(GoodbyeReason::Replaced));
    eventually("gateway 1 says dup is on r2", || async {
        let dup = find(&devices_on_1().await, "dup")?;
        (dup["gateway"] == "r2" && dup["online"] == true).then_some(())
    })
    .await;
    // The survivor is still served.
    second.telemetry(1).await.unwrap();
    second.wait_ack(1).await;

    // Both at once: exactly one survives, whichever claim came last.
    let (mut x, mut y) = tokio::join!(pki.session(a1, "race", 1), pki.session(a2, "race", 2));
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        tokio::select! {
            bye = x.goodbye() => (bye, &mut y),
            bye = y.goodbye() => (bye, &mut x),
        }
    });
    let (bye, survivor) = ended.await.expect("one of the two sessions ended");
    assert_eq!(bye.map(|g| g.reason), Some(GoodbyeReason::Replaced));
    survivor.telemetry(1).await.unwrap();
    survivor.wait_ack(1).await;
    drop((g1, g2));
}

/// A device that answers `echo` with its `text` and notes each text it was sent.
fn echo_and_note(
    mut dev: e2e::RawDevice,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use device_client::proto::{self, CommandStatus, Reading, Value};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(msg)) = dev.recv().await {
            let e2e::Down::Command { id, args, .. } = msg else {
                continue;
            };
            let text = args["text"].as_str().unwrap_or_default().to_owned();
            noted.lock().unwrap().push(text.clone());
            let n = proto::Name::new("text").unwrap();
            let v = Value::str(&text).unwrap();
            dev.result(id, CommandStatus::Succeeded, &[Reading::new(n, v)])
                .await
                .unwrap();
        }
    });
    (task, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_their_device_on_any_gateway_and_answer_on_every_gateway() {
    use e2e::process::GatewayProcess;
    if !NatsCluster::available() {
        return;
    }
    let cluster = NatsCluster::start();
    let pki = e2e::Pki::new();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut procs = Vec::new();
    let (mut devs, mut apis, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    for (g, d) in dirs.iter().enumerate() {
        let args = process_args(&pki, &cluster, d.path(), &format!("c{}", g + 1));
        let (p, addr) = GatewayProcess::start(BIN.as_ref(), &args).await;
        apis.push(p.api_addr().await);
        devs.push(addr);
        tokens.push(std::fs::read_to_string(d.path().join("db/api-token")).unwrap());
        procs.push(p);
    }
    let get = |g: usize, path: String| {
        let (api, token) = (apis[g], tokens[g].trim().to_owned());
        async move {
            let (s, body) = e2e::http_get(api, &path, Some(&token)).await;
            (
                s,
                serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
            )
        }
    };
    let post = |g: usize, path: String, body: serde_json::Value| {
        let (api, token) = (apis[g], tokens[g].trim().to_owned());
        async move {
            let (s, text) = e2e::http_post_json(api, &path, Some(&token), &body).await;
            (
                s,
                serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default(),
            )
        }
    };
    let holder_on_1 = |device: &'static str, online: bool| {
        let get = &get;
        async move {
            eventually(
                &format!("gateway 1 sees {device} online={online}"),
                || async {
                    let (s, d) = get(0, format!("/api/v1/devices/{device}")).await;
                    (s == 200 && d["online"] == online).then_some(d["gateway"].clone())
                },
            )
            .await
        }
    };

    // Each gateway has claimed its command-id slot (before, it numbers commands
    // locally: they answer only on it).
    for g in 0..3 {
        let (api, token) = (apis[g], tokens[g].trim().to_owned());
        eventually("a command-id slot", || async {
            let (_, text) = e2e::http_get(api, "/metrics", Some(&token)).await;
            let slot = text
                .lines()
                .find_map(|l| l.strip_prefix("gateway_fleet_command_slot "))?;
            (slot != "0").then_some(())
        })
        .await;
    }

    // On gateway 3, asked through gateway 1: the result comes back synchronously.
    let _on3 = e2e::answer_commands(pki.session(devs[2], "on-3", 1).await);
    assert_eq!(holder_on_1("on-3", true).await, "c3");
    let (s, rec) = post(
        0,
        "/api/v1/devices/on-3/commands".into(),
        serde_json::json!({"name": "echo", "args": {"text": "hi"}, "wait_s": 10}),
    )
    .await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["state"], "succeeded", "{rec}");
    assert_eq!(rec["result"]["text"], "hi", "{rec}");
    let id = rec["id"].as_i64().unwrap();
    for g in 0..3 {
        let (s, r) = get(g, format!("/api/v1/commands/{id}")).await;
        assert_eq!(
            (s, &r["state"]),
            (200, &"succeeded".into()),
            "gateway {g}: {r}"
        );
    }

    // A device that was on gateway 3 and left: online nowhere.
    drop(pki.session(devs[2], "away", 1).await);
    assert_eq!(holder_on_1("away", false).await, "c3");
    let ask = |g: usize, text: &str, ttl_s: u64| {
        let body = serde_json::json!({"name": "echo", "args": {"text": text}, "ttl_s": ttl_s});
        let post = &post;
        async move {
            let (s, r) = post(g, "/api/v1/devices/away/commands".into(), body).await;
            assert_eq!((s, &r["state"]), (202, &"queued".into()), "{r}");
            r["id"].as_i64().unwrap()
        }
    };
    let queued = ask(0, "later", 60).await;
    let expiring = ask(0, "too-late", 1).await;
    let canceled = ask(1, "canceled", 60).await;
    // Ids are fleet-unique: each gateway numbers in a slot of its own.
    assert!(id >> 32 > 0 && canceled >> 32 > 0, "{id} {canceled}");
    assert_ne!(id >> 32, canceled >> 32, "gateways 1 and 2 share a slot");
    // Cancelled through gateway 3; it was gateway 2's, waiting in the pending stream.
    let (s, r) = post(
        2,
        format!("/api/v1/commands/{canceled}/cancel"),
        serde_json::json!({}),
    )
    .await;
    assert_eq!((s, &r["state"]), (200, &"canceled".into()), "{r}");
    eventually("the short-lived command expires", || async {
        let (_, r) = get(1, format!("/api/v1/commands/{expiring}")).await;
        (r["state"] == "expired").then_some(())
    })
    .await;

    // The device comes back on gateway 2: it gets the queued command, and only that.
    let (_task, seen) = echo_and_note(pki.session(devs[1], "away", 2).await);
    eventually(
        "the queued command succeeds, seen from gateway 3",
        || async {
            let (_, r) = get(2, format!("/api/v1/commands/{queued}")).await;
            (r["state"] == "succeeded" && r["result"]["text"] == "later").then_some(())
        },
    )
    .await;
    let (s, r) = post(
        1,
        "/api/v1/devices/away/commands".into(),
        serde_json::json!({"name": "echo", "args": {"text": "fresh"}, "wait_s": 10}),
    )
    .await;
    assert_eq!((s, &r["state"]), (200, &"succeeded".into()), "{r}");
    assert_eq!(*seen.lock().unwrap(), ["later", "fresh"]);
    let (_, r) = get(0, format!("/api/v1/commands/{expiring}")).await;
    assert_eq!(r["attempts"], 0, "{r}");

    // Sent on gateway 3 to a device that leaves without answering: it is handed back
    // to the fleet and sent again where the device goes next (at least once).
    let silent = pki.session(devs[2], "mover", 1).await;
    assert_eq!(holder_on_1("mover", true).await, "c3");
    let (s, r) = post(
        0,
        "/api/v1/devices/mover/commands".into(),
        serde_json::json!({"name": "echo", "args": {"text": "again"}}),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    let moved = r["id"].as_i64().unwrap();
    eventually("gateway 1 hears it was sent", || async {
        let (_, r) = get(0, format!("/api/v1/commands/{moved}")).await;
        (r["state"] == "sent").then_some(())
    })
    .await;
    drop(silent);
    assert_eq!(holder_on_1("mover", false).await, "c3");
    let (_task, seen) = echo_and_note(pki.session(devs[0], "mover", 2).await);
    eventually("the moved command succeeds", || async {
        let (_, r) = get(1, format!("/api/v1/commands/{moved}")).await;
        (r["state"] == "succeeded" && r["result"]["text"] == "again").then_some(())
    })
    .await;
    assert_eq!(*seen.lock().unwrap(), ["again"]);
    drop(procs);
}
