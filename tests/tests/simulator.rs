//! End-to-end with the device simulator (`device_client::sim`): hundreds of real
//! clients (state machine, driver, tokio-rustls, one certificate each) against a real
//! gateway, then the SQLite file is read to check exactly-once storage.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use device_client::sim::{Devices, SimConfig, Simulator, Summary};
use e2e::process::GatewayProcess;
use e2e::sim::{SIM_WAIT, loaded, mint, until};
use e2e::{Pki, TestGateway};
use gateway::CommandState;
use serde_json::json;

/// `gateway/src/main.rs`, built by this package.
const BIN: &str = env!("CARGO_BIN_EXE_e2e-gateway");

/// `n` devices written to `pki`'s directory as `certs devices` lays them out.
fn on_disk(pki: &Pki, n: usize) -> Devices {
    for (id, cert) in mint(pki, n) {
        let dir = pki.dir.path().join("devices").join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), &cert.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
    }
    Devices::Dir {
        dir: pki.dir.path().to_owned(),
        prefix: "sim-".into(),
        first: 0,
        count: n,
    }
}

/// Test settings: quick reconnects, two worker threads, a long enough drain.
fn config(addr: impl ToString, devices: Devices, rate: f64) -> SimConfig {
    let mut c = SimConfig::new(addr.to_string(), devices);
    c.rate = rate;
    c.threads = Some(2);
    c.ring_bytes = 16 * 1024;
    c.backoff_min = Duration::from_millis(100);
    c.backoff_max = Duration::from_secs(1);
    c.drain_timeout = SIM_WAIT;
    c
}

/// (count, min seq, max seq) per (device, boot id), straight from the SQLite file;
/// panics on a seq stored twice.
fn stored(db: &Path) -> HashMap<(String, u64), (u64, u32, u32)> {
    let mut seen = std::collections::HashSet::new();
    let mut out: HashMap<(String, u64), (u64, u32, u32)> = HashMap::new();
    for r in e2e::stored_records(db) {
        assert!(
            seen.insert((r.device.clone(), r.boot_id, r.seq)),
            "{} boot {} seq {} stored twice",
            r.device,
            r.boot_id,
            r.seq
        );
        let e = out.entry((r.device, r.boot_id)).or_insert((0, u32::MAX, 0));
        *e = (e.0 + 1, e.1.min(r.seq), e.2.max(r.seq));
    }
    out
}

/// After a drained run: for every device and boot id, the store holds exactly the seqs
/// `1..=sent`, each once (`stored` rules out duplicates; count = max = sent and
/// min = 1 rule out gaps), every seq the simulator saw acked among them, and nothing
/// else; the total equals the simulator's sent count.
fn assert_exactly_once(db: &Path, summary: &Summary) {
    println!(
        "{} devices: sent {}, acked {}, connects {}, reconnects {}, disconnects {:?}, \
         connect failures {:?}, ack latency {:?}, run {} ms, drain {} ms",
        summary.devices,
        summary.counts.sent,
        summary.counts.acked,
        summary.counts.connects,
        summary.counts.reconnects,
        summary.counts.disconnects_by_reason,
        summary.counts.connect_failures_by_reason,
        summary.ack_latency,
        summary.run_ms,
        summary.drain_ms
    );
    assert!(summary.drained, "every record acked before the end");
    assert_eq!(summary.counts.unacked, 0);
    assert_eq!(summary.counts.lost_on_reboot, 0);
    assert_eq!(summary.counts.sent, summary.counts.acked);
    let rows = stored(db);
    let mut boots = 0;
    let mut total = 0;
    for dev in &summary.per_device {
        for boot in &dev.boots {
            assert_eq!(boot.lost, 0, "{} boot {:x}", dev.id, boot.boot_id);
            assert_eq!(boot.acked, boot.sent, "{} boot {:x}", dev.id, boot.boot_id);
            if boot.sent == 0 {
                assert!(!rows.contains_key(&(dev.id.clone(), boot.boot_id)));
                continue;
            }
            boots += 1;
            total += u64::from(boot.sent);
            let got = rows.get(&(dev.id.clone(), boot.boot_id)).copied();
            assert_eq!(
                got,
                Some((u64::from(boot.sent), 1, boot.sent)),
                "{} boot {:x}: (count, min, max) stored",
                dev.id,
                boot.boot_id
            );
        }
    }
    assert_eq!(rows.len(), boots, "no rows of other devices or boots");
    assert_eq!(total, summary.counts.sent);
    assert_eq!(rows.values().map(|r| r.0).sum::<u64>(), summary.counts.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_store_every_acked_record_exactly_once() {
    let tg = TestGateway::start().await;
    let n = 200;
    let devices = on_disk(&tg.pki, n);
    let sim = Simulator::start(config(tg.addr(), devices, 5.0)).unwrap();
    let mon = sim.monitor();
    let s = until(&mon, "every device connected", |s| s.ever_connected == n).await;
    assert!(s.all_connected_after.is_some());
    // A few records from every device, acked.
    until(&mon, "3 acked records per device", |s| {
        s.counts.acked >= 3 * n as u64
    })
    .await;
    mon.stop();
    let summary = sim.wait().await.unwrap();

    assert_eq!(summary.devices, n);
    assert_eq!(summary.per_device.len(), n);
    assert_eq!(summary.counts.fatal, 0);
    assert!(summary.all_connected_after_ms.is_some());
    assert!(summary.ack_latency.count > 0);
    assert!(summary.per_device.iter().all(|d| d.boots.len() == 1));
    assert_exactly_once(&tg.data.path().join("gateway.sqlite"), &summary);
    assert_eq!(
        tg.gw.store().telemetry_count(None).await.unwrap(),
        summary.counts.sent
    );
    // The summary is what `device-sim --json` prints.
    let text = serde_json::to_string(&summary).unwrap();
    let back: Summary = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (back.counts.sent, &back.per_device),
        (summary.counts.sent, &summary.per_device)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_ride_out_a_gateway_sigkill_and_lose_nothing() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let (gw, addr) =
        GatewayProcess::start(BIN.as_ref(), &pki.gateway_args(data.path(), "127.0.0.1:0")).await;
    let n = 100;
    let sim = Simulator::start(config(addr, loaded(&pki, n), 20.0)).unwrap();
    let mon = sim.monitor();
    until(&mon, "every device connected", |s| s.ever_connected == n).await;
    until(&mon, "5 acked records per device", |s| {
        s.counts.acked >= 5 * n as u64
    })
    .await;

    // Killed mid-stream: whatever was received and not committed is not acked.
    gw.kill();
    until(&mon, "every device to notice", |s| s.connected == 0).await;
    // Devices keep sampling while the gateway is away: their rings fill.
    let down = until(&mon, "records queued during the outage", |s| {
        s.counts.unacked >= n as u64
    })
    .await;

    // Same data dir, same port.
    let (gw, again) = GatewayProcess::start(
        BIN.as_ref(),
        &pki.gateway_args(data.path(), &addr.to_string()),
    )
    .await;
    assert_eq!(again, addr);
    until(&mon, "every device back", |s| {
        s.connected == n as u64 && s.counts.reconnects >= n as u64
    })
    .await;
    // Everything queued before the restart is acked (replayed from the rings).
    until(&mon, "the outage's records acked", |s| {
        s.counts.acked >= down.counts.sent
    })
    .await;
    mon.stop();
    let summary = sim.wait().await.unwrap();

    assert!(summary.counts.reconnects >= n as u64, "{summary:#?}");
    assert!(summary.counts.disconnects >= n as u64);
    assert_eq!(summary.counts.fatal, 0);
    assert_eq!(summary.counts.ring_full, 0, "16 KiB rings hold the outage");
    assert!(summary.per_device.iter().all(|d| d.connects >= 2));
    assert_exactly_once(&data.path().join("db/gateway.sqlite"), &summary);
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_round_trip_through_the_gateway_to_simulated_devices() {
    let tg = TestGateway::start().await;
    let gw = &tg.gw;
    // No telemetry unless a command asks for it.
    let sim = Simulator::start(config(tg.addr(), loaded(&tg.pki, 3), 0.0)).unwrap();
    let mon = sim.monitor();
    until(&mon, "every device connected", |s| s.ever_connected == 3).await;
    let wait = e2e::WAIT;

    // echo returns its arguments.
    let args = json!({"text": "hello", "n": 42, "on": true});
    let done = gw
        .command("sim-0000", "echo", &args, None, wait)
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.result, Some(args));

    // set_interval is acked with the interval applied, and the device starts sending.
    let done = gw
        .command(
            "sim-0001",
            "set_interval",
            &json!({"interval_ms": 20}),
            None,
            wait,
        )
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.result, Some(json!({"interval_ms": 20})));
    let store = gw.store();
    e2e::eventually("telemetry from sim-0001", || async {
        (store.telemetry_count(Some("sim-0001")).await.unwrap() >= 10).then_some(())
    })
    .await;
    let done = gw
        .command(
            "sim-0001",
            "set_interval",
            &json!({"interval_s": 0.5}),
            None,
            wait,
        )
        .await
        .unwrap();
    assert_eq!(done.result, Some(json!({"interval_ms": 500})));

    // Bad arguments and unknown commands are answered, not run.
    let done = gw
        .command(
            "sim-0000",
            "set_interval",
            &json!({"interval_s": "soon"}),
            None,
            wait,
        )
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Failed);
    assert_eq!(done.status.as_deref(), Some("invalid_arguments"));
    let done = gw
        .command("sim-0000", "self_destruct", &json!({}), None, wait)
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Failed);
    assert_eq!(done.status.as_deref(), Some("unknown_command"));

    // reboot: answered, then the device comes back with a new boot id.
    let before = gw.device("sim-0002").await.unwrap().unwrap().boot_id;
    let done = gw
        .command("sim-0002", "reboot", &json!({}), None, wait)
        .await
        .unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    e2e::eventually("sim-0002 back with a new boot id", || async {
        let d = gw.device("sim-0002").await.unwrap().unwrap();
        (d.online && d.boot_id != before).then_some(())
    })
    .await;

    mon.stop();
    let summary = sim.wait().await.unwrap();
    assert_eq!(summary.counts.commands, 6);
    assert_eq!(summary.counts.reboots, 1);
    let rebooted = &summary.per_device[2];
    assert_eq!(rebooted.boots.len(), 2);
    assert_eq!(Some(rebooted.boots[0].boot_id), before);
    // Its last words: one record before the reboot, acked before it went.
    assert_eq!((rebooted.boots[0].sent, rebooted.boots[0].acked), (1, 1));
    assert_eq!(summary.per_device[0].sent(), 0, "sim-0000 never sampled");
    assert_exactly_once(&tg.data.path().join("gateway.sqlite"), &summary);
    // The reboot was not repeated: the gateway has no open command for it.
    let open = gw
        .store()
        .command_counts()
        .await
        .unwrap()
        .into_iter()
        .filter(|(state, n)| !state.is_final() && *n > 0)
        .count();
    assert_eq!(open, 0);
}
