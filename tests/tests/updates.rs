//! End to end, firmware updates (protocol version 3): images signed with a release key
//! made by `certs`, uploaded through the HTTP API, rolled out to devices over real TLS.
//! A device written frame by frame from PROTOCOL.md §5.4 and §8.7 fetches an image
//! across a reconnect; simulated devices take a rollout that stops itself at its
//! failure threshold.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

use certs::release::ReleaseKey;
use device_client::firmware::{ImageHasher, Manifest};
use device_client::proto::{FirmwareOutcome, FirmwareRequest, FirmwareStatus, Uplink};
use e2e::{ApiClient, Down, RawDevice, TestGateway, eventually};
use reqwest::Method;
use serde_json::{Value, json};

/// A release key, its public PEM written where a gateway's config can name it.
struct Release {
    key: ReleaseKey,
    _dir: tempfile::TempDir,
    pub_pem: PathBuf,
}

impl Release {
    fn new() -> Self {
        let key = ReleaseKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pub_pem = dir.path().join("release.pub.pem");
        std::fs::write(&pub_pem, key.public_pem().unwrap()).unwrap();
        Self {
            key,
            _dir: dir,
            pub_pem,
        }
    }

    /// An image of `len` bytes and its signature file for `version`.
    fn image(&self, version: &str, len: usize) -> (Vec<u8>, String) {
        let image: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
        let signed = self.key.sign_image(version, &image).unwrap();
        (image, serde_json::to_string(&signed).unwrap())
    }
}

async fn gateway_with(release: &Release) -> TestGateway {
    let key = release.pub_pem.clone();
    TestGateway::start_with(|c| c.release_key = Some(key)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_must_carry_the_release_signature() {
    let release = Release::new();
    let tg = gateway_with(&release).await;
    let api = ApiClient::new(&tg.gw);
    let (image, sig) = release.image("fw-2.0", 10_000);

    let (status, body) = api.upload_firmware(&image, &sig).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], json!("fw-2.0"));
    assert_eq!(body["size"], json!(10_000));
    let mut h = ImageHasher::new();
    h.update(&image);
    assert_eq!(body["sha256"], json!(hex::encode(h.finish().sha256)));
    let (status, list) = api.get("/api/v1/firmware").await;
    assert_eq!(status, 200);
    assert_eq!(list["firmware"][0]["version"], json!("fw-2.0"));

    // The same version again.
    let (status, body) = api.upload_firmware(&image, &sig).await;
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("firmware_exists"))
    );
    // One byte changed.
    let (mut tampered, sig3) = release.image("fw-3.0", 10_000);
    tampered[5_000] ^= 0x01;
    let (status, body) = api.upload_firmware(&tampered, &sig3).await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("invalid_firmware")),
        "{body}"
    );
    assert!(body["error"].as_str().unwrap().contains("SHA-256"));
    // Signed by another key.
    let (image4, sig4) = Release::new().image("fw-4.0", 1_000);
    let (status, body) = api.upload_firmware(&image4, &sig4).await;
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("bad_signature"))
    );
    // No signature part.
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(image4.clone()).file_name("fw.bin"),
    );
    let info = tg.gw.api().unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/v1/firmware", info.addr))
        .bearer_auth(&*info.token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Nothing of the refused ones was stored.
    let (_, list) = api.get("/api/v1/firmware").await;
    assert_eq!(list["firmware"].as_array().unwrap().len(), 1);

    // Over the size limit, and a gateway without a release key.
    let small = {
        let key = release.pub_pem.clone();
        TestGateway::start_with(|c| {
            c.release_key = Some(key);
            c.max_firmware_size = 4_096;
        })
        .await
    };
    let (status, body) = ApiClient::new(&small.gw)
        .upload_firmware(&image, &sig)
        .await;
    assert_eq!((status, body["code"].clone()), (413, json!("too_large")));
    let keyless = TestGateway::start().await;
    let (status, body) = ApiClient::new(&keyless.gw)
        .upload_firmware(&image, &sig)
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("no_release_key"))
    );
    assert!(body["error"].as_str().unwrap().contains("release_key"));
}

/// Reads the next firmware message, skipping others.
async fn next_firmware(dev: &mut RawDevice) -> Down {
    loop {
        match dev.recv().await.unwrap() {
            Some(d @ (Down::FirmwareOffer { .. } | Down::FirmwareChunk { .. })) => return d,
            Some(d @ Down::FirmwareCancel(_)) => return d,
            Some(_) => {}
            None => panic!("the gateway closed the connection"),
        }
    }
}

async fn request(dev: &mut RawDevice, id: u32, offset: u32, len: u16) -> (u32, Vec<u8>) {
    dev.send(&Uplink::FirmwareRequest(FirmwareRequest {
        id,
        offset,
        len,
    }))
    .await
    .unwrap();
    match next_firmware(dev).await {
        Down::FirmwareChunk {
            id: got,
            offset,
            data,
        } => {
            assert_eq!(got, id);
            (offset, data)
        }
        other => panic!("expected a chunk, got {other:?}"),
    }
}

async fn rollout_device(api: &ApiClient, id: i64, device: &str) -> Value {
    let (status, r) = api.get(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(status, 200, "{r}");
    r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == json!(device))
        .cloned()
        .unwrap()
}

/// A device written from the spec alone takes an image: the offer comes after
/// `Welcome`, chunks come one per request within its frame limit, the transfer resumes
/// from the device's offset after a reconnect, the image checks out against the
/// release key, and the restart with the new version counts as installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_device_fetches_an_image_across_a_reconnect_and_installs_it() {
    let release = Release::new();
    let tg = gateway_with(&release).await;
    let api = ApiClient::new(&tg.gw);
    let (image, sig) = release.image("fw-2.0", 40_000);
    assert_eq!(api.upload_firmware(&image, &sig).await.0, 201);
    let cert = tg.pki.device("dev-fw");
    let mut dev = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    let w = dev.hello_as(1, 3, "fw-1.0", 1024).await;
    assert_eq!(w.version, 3);

    let (status, r) = api
        .send(
            Method::POST,
            "/api/v1/rollouts",
            json!({"firmware": "fw-2.0", "devices": ["dev-fw"]}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    assert_eq!(r["state"], json!("running"));
    // Online: the offer comes at once.
    let Down::FirmwareOffer {
        id,
        version,
        size,
        sha256,
        signature,
    } = next_firmware(&mut dev).await
    else {
        panic!("expected an offer")
    };
    assert_eq!((version.as_str(), size), ("fw-2.0", 40_000));
    assert_eq!(id as i64, rid);

    // A 1,024-byte receive buffer: 1,009 bytes a chunk. Ask for more: the gateway
    // keeps to the frame limit.
    let mut got = Vec::new();
    for _ in 0..10 {
        let (offset, data) = request(&mut dev, id, got.len() as u32, 4096).await;
        assert_eq!(offset as usize, got.len());
        assert_eq!(data.len(), 1_009);
        got.extend_from_slice(&data);
    }
    assert_eq!(
        rollout_device(&api, rid, "dev-fw").await["state"],
        json!("downloading")
    );
    // The device's own record says so too.
    let (_, d) = api.get("/api/v1/devices/dev-fw").await;
    assert_eq!(d["firmware_update"]["rollout"], json!(rid), "{d}");
    assert_eq!(d["firmware_update"]["state"], json!("downloading"));
    assert_eq!(d["firmware_update"]["received"], json!(10_090));
    // The link breaks; the device comes back (same boot) and is offered the same
    // transfer again; it asks from what it holds.
    drop(dev);
    let mut dev = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    dev.hello_as(1, 3, "fw-1.0", 1024).await;
    let Down::FirmwareOffer { id: again, .. } = next_firmware(&mut dev).await else {
        panic!("expected the offer again")
    };
    assert_eq!(again, id);
    while got.len() < 40_000 {
        let (offset, data) = request(&mut dev, id, got.len() as u32, 1_009).await;
        assert_eq!(offset as usize, got.len());
        got.extend_from_slice(&data);
    }
    // Past the end: an empty chunk.
    let (_, tail) = request(&mut dev, id, 40_000, 100).await;
    assert!(tail.is_empty());
    assert_eq!(got, image);
    // The device's own checks: size, SHA-256, and the release signature.
    let mut h = ImageHasher::new();
    h.update(&got);
    let manifest = Manifest {
        version: &version,
        size,
        sha256,
    };
    manifest
        .check(&release.key.public_sec1(), &signature, &h.finish())
        .unwrap();
    dev.send(&Uplink::FirmwareStatus(FirmwareStatus {
        id,
        outcome: FirmwareOutcome::Verified,
    }))
    .await
    .unwrap();
    eventually("the device verified", || async {
        (rollout_device(&api, rid, "dev-fw").await["state"] == json!("verified")).then_some(())
    })
    .await;
    // /metrics: the bytes served (the whole image, the resumed part once), and the
    // rollout's devices by state.
    let sent = e2e::metric(&tg.gw, "gateway_firmware_bytes_sent_total").await;
    assert_eq!(sent, Some(40_000.0));
    let verified = e2e::metric(&tg.gw, "gateway_rollout_devices{state=\"verified\"}").await;
    assert_eq!(verified, Some(1.0));
    // A request for a transfer the gateway does not offer this device: a cancel.
    dev.send(&Uplink::FirmwareRequest(FirmwareRequest {
        id: 999,
        offset: 0,
        len: 10,
    }))
    .await
    .unwrap();
    assert!(matches!(
        next_firmware(&mut dev).await,
        Down::FirmwareCancel(999)
    ));

    // The restart: a new boot running fw-2.0.
    drop(dev);
    let mut dev = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    dev.hello_as(2, 3, "fw-2.0", 1024).await;
    let r = eventually("the rollout completed", || async {
        let (_, r) = api.get(&format!("/api/v1/rollouts/{rid}")).await;
        (r["state"] == json!("completed")).then_some(r)
    })
    .await;
    assert_eq!(r["devices"][0]["state"], json!("installed"));
    assert_eq!(r["counts"]["installed"], json!(1));
    let (_, d) = api.get("/api/v1/devices/dev-fw").await;
    assert_eq!(d["firmware"], json!("fw-2.0"));
}

/// A tampered image is refused by the device and reported; the rollout shows why and,
/// at a threshold of 0, stops itself at once. A device of protocol version 2 in the
/// rollout is never offered anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_image_is_reported_and_stops_the_rollout_at_its_threshold() {
    let release = Release::new();
    let tg = gateway_with(&release).await;
    let api = ApiClient::new(&tg.gw);
    let (image, sig) = release.image("fw-2.0", 2_000);
    assert_eq!(api.upload_firmware(&image, &sig).await.0, 201);
    let (mut dev, _) = tg.device("dev-a", 1).await;
    let (status, r) = api
        .send(
            Method::POST,
            "/api/v1/rollouts",
            json!({"firmware": "fw-2.0", "devices": ["dev-a", "dev-b", "dev-c"],
                   "failure_threshold": 0.0, "max_in_flight": 1, "device_timeout_s": 600}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["device_timeout_s"], json!(600));
    let rid = r["id"].as_i64().unwrap();
    // Settings out of range are refused with the reason.
    for bad in [
        json!({"firmware": "fw-2.0", "devices": ["x"], "device_timeout_s": 0}),
        json!({"firmware": "fw-2.0", "devices": ["x"], "max_in_flight": 0}),
        json!({"firmware": "fw-2.0", "devices": ["x"], "failure_threshold": 1.5}),
        json!({"firmware": "fw-2.0"}),
    ] {
        let (status, body) = api.send(Method::POST, "/api/v1/rollouts", bad).await;
        assert_eq!(
            (status, body["code"].clone()),
            (400, json!("invalid_rollout"))
        );
    }
    // A device in an unfinished rollout cannot join another.
    let (status, body) = api
        .send(
            Method::POST,
            "/api/v1/rollouts",
            json!({"firmware": "fw-2.0", "devices": ["dev-b"]}),
        )
        .await;
    assert_eq!((status, body["code"].clone()), (409, json!("devices_busy")));

    let Down::FirmwareOffer { id, .. } = next_firmware(&mut dev).await else {
        panic!("expected an offer")
    };
    let (_, data) = request(&mut dev, id, 0, 2_000).await;
    assert_eq!(data.len(), 2_000);
    // The device finds the signature wrong (as a tampered image would make it).
    dev.send(&Uplink::FirmwareStatus(FirmwareStatus {
        id,
        outcome: FirmwareOutcome::BadSignature,
    }))
    .await
    .unwrap();
    let r = eventually("the rollout stopped", || async {
        let (_, r) = api.get(&format!("/api/v1/rollouts/{rid}")).await;
        (r["state"] == json!("stopped")).then_some(r)
    })
    .await;
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("1 of 3 devices failed, more than the threshold of 0%"),
        "{r}"
    );
    assert_eq!(
        rollout_device(&api, rid, "dev-a").await["reason"],
        json!("bad_signature")
    );
    assert_eq!(r["counts"]["cancelled"], json!(2), "{r}");
    let (status, body) = api
        .send(
            Method::POST,
            &format!("/api/v1/rollouts/{rid}/resume"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (409, json!("rollout_finished"))
    );

    // Version 2 devices in a new rollout, one online before it starts, one connecting
    // after: each fails with the reason, and is never offered anything.
    let cert = tg.pki.device("dev-v2-early");
    let mut early = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    assert_eq!(early.hello_version(1, 2).await.version, 2);
    let (status, r) = api
        .send(
            Method::POST,
            "/api/v1/rollouts",
            json!({"firmware": "fw-2.0", "devices": ["dev-v2", "dev-v2-early"],
                   "failure_threshold": 1.0}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    let cert = tg.pki.device("dev-v2");
    let mut v2 = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    assert_eq!(v2.hello_version(1, 2).await.version, 2);
    let d = eventually("the version 2 device failed", || async {
        let d = rollout_device(&api, rid, "dev-v2").await;
        (d["state"] == json!("failed")).then_some(d)
    })
    .await;
    assert!(d["reason"].as_str().unwrap().contains("version 2"), "{d}");
    let d = eventually("the early version 2 device failed", || async {
        let d = rollout_device(&api, rid, "dev-v2-early").await;
        (d["state"] == json!("failed")).then_some(d)
    })
    .await;
    assert!(d["reason"].as_str().unwrap().contains("version 2"), "{d}");
    let (_, r) = api.get(&format!("/api/v1/rollouts/{rid}")).await;
    assert_eq!(r["state"], json!("completed"), "{r}");
}

/// Polls `GET path` until `done` says yes, within the simulator's wait.
async fn poll_api(api: &ApiClient, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + e2e::sim::SIM_WAIT;
    loop {
        let (status, body) = api.get(path).await;
        assert_eq!(status, 200, "{body}");
        if done(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Issue 16's acceptance: 1,000 simulated devices (the real device client over TLS,
/// each installing through the real `Updater`) take a rollout in which 5 % of them
/// fail; the rollout stops itself once more than its 2 % threshold failed; and what the
/// API shows of each device matches what the device itself ran and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_take_a_rollout_that_stops_itself_at_its_threshold() {
    use device_client::sim::{SimConfig, Simulator};
    const N: usize = 1_000;
    let release = Release::new();
    let tg = gateway_with(&release).await;
    let api = ApiClient::new(&tg.gw);
    let (image, sig) = release.image("sim-2.0", 12_000);
    assert_eq!(api.upload_firmware(&image, &sig).await.0, 201);

    let mut c = SimConfig::new(tg.addr().to_string(), e2e::sim::loaded(&tg.pki, N));
    c.rate = 0.0;
    c.threads = Some(1);
    c.backoff_min = std::time::Duration::from_millis(100);
    c.backoff_max = std::time::Duration::from_secs(1);
    c.drain_timeout = e2e::sim::SIM_WAIT;
    c.release_key = Some(release.key.public_sec1());
    c.firmware_failure_rate = 0.05;
    let old_version = c.firmware;
    let sim = Simulator::start(c).unwrap();
    let mon = sim.monitor();
    e2e::sim::until(&mon, "every device connected", |s| s.connected == N as u64).await;

    let devices: Vec<String> = device_client::sim::sequential_ids("sim-", 0, N);
    let (status, r) = api
        .send(
            Method::POST,
            "/api/v1/rollouts",
            json!({"firmware": "sim-2.0", "devices": devices,
                   "failure_threshold": 0.02, "max_in_flight": 100}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    let path = format!("/api/v1/rollouts/{rid}");
    let r = poll_api(&api, &path, "the rollout to stop", |r| {
        r["state"] == json!("stopped")
    })
    .await;
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("devices failed, more than the threshold of 2%"),
        "{r}"
    );
    // Devices verified before the stop restart into the image; the rest were
    // withdrawn. Wait for the counts to settle, on both sides.
    let in_flight = |r: &Value| {
        ["offered", "downloading", "verified"]
            .iter()
            .map(|k| r["counts"][k].as_u64().unwrap())
            .sum::<u64>()
    };
    let r = poll_api(&api, &path, "every device settled", |r| {
        let s = mon.stats();
        in_flight(r) == 0
            && r["counts"]["installed"].as_u64() == Some(s.counts.firmware_installed)
            && r["counts"]["failed"].as_u64() == Some(s.counts.firmware_failed)
    })
    .await;
    let count = |k: &str| r["counts"][k].as_u64().unwrap();
    let (installed, failed, cancelled) = (count("installed"), count("failed"), count("cancelled"));
    println!("rollout of 1,000: installed {installed}, failed {failed}, cancelled {cancelled}");
    assert!(failed > 20, "stopped only past 2 % of 1,000: {r}");
    assert!(
        installed > 100,
        "slots freed and refilled before the stop: {r}"
    );
    assert_eq!(
        count("pending"),
        0,
        "the stop cancelled those never offered"
    );
    assert_eq!(installed + failed + cancelled, N as u64, "{r}");
    assert!(cancelled > 0, "the stop came before the end: {r}");

    sim.stop();
    let summary = sim.wait().await.unwrap();
    let by_id: std::collections::HashMap<&str, &device_client::sim::DeviceSummary> = summary
        .per_device
        .iter()
        .map(|d| (d.id.as_str(), d))
        .collect();
    for d in r["devices"].as_array().unwrap() {
        let id = d["device"].as_str().unwrap();
        let sim_dev = by_id[id];
        match d["state"].as_str().unwrap() {
            "installed" => {
                assert_eq!(sim_dev.firmware, "sim-2.0", "{d}");
                assert_eq!(sim_dev.firmware_installs, 1, "{d}");
            }
            "failed" => {
                assert_eq!(d["reason"], json!("storage_error"), "{d}");
                assert_eq!(sim_dev.firmware, old_version, "{d}");
            }
            "cancelled" => assert_eq!(sim_dev.firmware, old_version, "{d}"),
            other => panic!("{id} is {other}"),
        }
    }
    // The API's list of devices shows each one's firmware as its Hello said.
    let (_, dev) = api.get("/api/v1/devices/sim-0000").await;
    assert_eq!(dev["firmware"], json!(by_id["sim-0000"].firmware), "{dev}");
}

/// Rollouts survive a restart of the gateway: the store keeps each rollout and each
/// device's state, and the restarted gateway offers the image again, serves it, and
/// counts the device installed when it comes back with the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_a_restart_of_the_gateway() {
    let release = Release::new();
    let pki = e2e::Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut config = pki.config(data.path());
    config.release_key = Some(release.pub_pem.clone());
    let gw = gateway::Gateway::start(config.clone()).await.unwrap();
    let api = ApiClient::new(&gw);
    let (image, sig) = release.image("fw-2.0", 3_000);
    assert_eq!(api.upload_firmware(&image, &sig).await.0, 201);
    let (status, r) = api
        .send(
            Method::POST,
            "/api/v1/rollouts",
            json!({"firmware": "fw-2.0", "devices": ["keep-1", "keep-2"], "max_in_flight": 1}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    // keep-1 takes part of the image; then the gateway stops.
    let cert = pki.device("keep-1");
    let mut dev = RawDevice::connect(gw.local_addr(), &pki.ca, Some(&cert))
        .await
        .unwrap();
    dev.hello_as(1, 3, "fw-1.0", 1024).await;
    let Down::FirmwareOffer { id, .. } = next_firmware(&mut dev).await else {
        panic!("expected an offer")
    };
    let (_, first) = request(&mut dev, id, 0, 1_000).await;
    eventually("keep-1 downloading", || async {
        (rollout_device(&api, rid, "keep-1").await["state"] == json!("downloading")).then_some(())
    })
    .await;
    gw.shutdown().await;
    drop(dev);

    let gw = gateway::Gateway::start(config).await.unwrap();
    let api = ApiClient::new(&gw);
    let (_, r) = api.get(&format!("/api/v1/rollouts/{rid}")).await;
    assert_eq!(r["state"], json!("running"), "{r}");
    assert_eq!(r["firmware"]["version"], json!("fw-2.0"));
    assert_eq!(
        rollout_device(&api, rid, "keep-1").await["state"],
        json!("downloading")
    );
    assert_eq!(
        rollout_device(&api, rid, "keep-2").await["state"],
        json!("pending")
    );
    // keep-1 comes back: offered again under the same id, it resumes and finishes.
    let mut dev = RawDevice::connect(gw.local_addr(), &pki.ca, Some(&cert))
        .await
        .unwrap();
    dev.hello_as(1, 3, "fw-1.0", 1024).await;
    let Down::FirmwareOffer { id: again, .. } = next_firmware(&mut dev).await else {
        panic!("expected the offer again")
    };
    assert_eq!(again, id);
    let mut got = first;
    while got.len() < image.len() {
        let (_, data) = request(&mut dev, id, got.len() as u32, 1_000).await;
        got.extend_from_slice(&data);
    }
    assert_eq!(got, image);
    dev.send(&Uplink::FirmwareStatus(FirmwareStatus {
        id,
        outcome: FirmwareOutcome::Verified,
    }))
    .await
    .unwrap();
    drop(dev);
    let mut dev = RawDevice::connect(gw.local_addr(), &pki.ca, Some(&cert))
        .await
        .unwrap();
    dev.hello_as(2, 3, "fw-2.0", 1024).await;
    eventually("keep-1 installed", || async {
        (rollout_device(&api, rid, "keep-1").await["state"] == json!("installed")).then_some(())
    })
    .await;
}
