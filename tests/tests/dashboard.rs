//! End-to-end: the dashboard page in headless Chromium against a real gateway with real
//! devices: live values appear; the selected device's command history shows each
//! command with its final state; a time range draws a device's pauses as gaps in its
//! charts. Saves screenshots to `target/tmp/dashboard.png` and `dashboard-range.png`.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it). Without it the test says so and
//! passes, so that a laptop without Chromium can still run the suite; set
//! `REQUIRE_CHROMIUM=1` (as CI does) to make its absence a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use device_client::proto::{self, Reading, Readings, Telemetry, Uplink, Value};
use e2e::{RawDevice, TestGateway, answer_commands};
use serde_json::{Value as Json, json};

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("which").arg(name).output().ok()?;
            out.status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
}

/// Chromium, or `None` (the test then passes, saying so) unless `REQUIRE_CHROMIUM` is set.
fn chromium_or_skip() -> Option<PathBuf> {
    let bin = chromium();
    if bin.is_none() {
        assert!(
            std::env::var_os("REQUIRE_CHROMIUM").is_none(),
            "REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)"
        );
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
    }
    bin
}

/// Runs headless Chromium on `url` with `extra` arguments; returns stdout.
fn run_chromium(bin: &Path, url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The page's count of live telemetry events (`data-total` of the rate widget).
fn live_events(dom: &str) -> u64 {
    dom.split(r#"data-testid="rate""#)
        .nth(1)
        .and_then(|rest| rest.split("data-total=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The page's DOM once `done` says it is complete, or the last one after a minute.
/// Chromium's virtual time may end a run before the page's requests are answered: such a
/// run proves nothing either way, and Chromium runs again.
async fn dump_dom_until(bin: &Path, url: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (url, bin) = (url.to_owned(), bin.to_owned());
        let dom = tokio::task::spawn_blocking(move || {
            run_chromium(&bin, &url, &["--virtual-time-budget=6000", "--dump-dom"])
        })
        .await
        .unwrap();
        if done(&dom) || Instant::now() > deadline {
            return dom;
        }
    }
}

/// Takes a screenshot of `url` into `target/tmp/NAME` and checks it is a picture.
async fn screenshot(bin: &Path, url: &str, name: &str) {
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let (url, bin) = (url.to_owned(), bin.to_owned());
    tokio::task::spawn_blocking(move || {
        run_chromium(&bin, &url, &["--virtual-time-budget=4000", &arg]);
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real picture"
    );
    println!("screenshot: {}", shot.display());
}

/// The attributes of each element whose tag has `data-testid="ID"`, in document order.
/// (Chromium writes attribute values in double quotes, with `"`, `<` and `>` escaped.)
fn elements(dom: &str, testid: &str) -> Vec<BTreeMap<String, String>> {
    let needle = format!(r#"data-testid="{testid}""#);
    let mut found = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find(&needle) {
        let start = rest[..at].rfind('<').unwrap();
        let end = at + rest[at..].find('>').unwrap();
        let mut attrs = BTreeMap::new();
        let mut tag = &rest[start..end];
        while let Some(eq) = tag.find("=\"") {
            let name = tag[..eq].rsplit(char::is_whitespace).next().unwrap();
            let value = &tag[eq + 2..];
            let close = value.find('"').unwrap();
            attrs.insert(name.to_owned(), value[..close].to_owned());
            tag = &value[close + 1..];
        }
        found.push(attrs);
        rest = &rest[end..];
    }
    found
}

/// The text of the first element with `data-testid="ID"` up to its first child tag.
fn text_of<'a>(dom: &'a str, testid: &str) -> Option<&'a str> {
    let at = dom.find(&format!(r#"data-testid="{testid}""#))?;
    let text = &dom[at + dom[at..].find('>')? + 1..];
    Some(&text[..text.find('<')?])
}

/// The page's address: the token, then `view` (e.g. `device=x&range=15m`).
fn page_url(tg: &TestGateway, view: &str) -> String {
    let api = tg.gw.api().unwrap();
    format!("http://{}/#token={}&{view}", api.addr, api.token)
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_values_appear_in_headless_chromium() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let tg = TestGateway::start().await;
    // Three devices streaming a reading every 100 ms for as long as the test runs.
    let mut streams = Vec::new();
    for i in 0..3 {
        let (mut dev, _) = tg.device(&format!("dash-{i}"), 1).await;
        streams.push(tokio::spawn(async move {
            let mut seq = 0;
            loop {
                seq += 1;
                if dev.telemetry(seq).await.is_err() {
                    return;
                }
                dev.wait_ack(seq).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // A device that sent one record before the page loads and nothing since: its value
    // can only come from the device list (`latest`), not from live events.
    let (mut quiet, _) = tg.device("dash-quiet", 1).await;
    quiet.telemetry(1).await.unwrap();
    quiet.wait_ack(1).await;
    // Something is stored before the page loads (the table fills from the API)...
    e2e::eventually("first records", || async {
        (tg.gw.store().telemetry_count(None).await.ok()? >= 4).then_some(())
    })
    .await;
    let api = tg.gw.api().unwrap();
    let url = format!("http://{}/#token={}", api.addr, api.token);

    // ...and the page keeps receiving live events while Chromium runs its scripts.
    // Chromium's virtual time runs ahead of the network while the page waits on nothing
    // but its WebSocket, so one run may end before the first live event arrives: that
    // run proves nothing either way, and Chromium runs again, up to a deadline.
    let dom = dump_dom_until(&bin, &url, |dom| live_events(dom) > 0).await;
    assert!(
        dom.contains(r#"data-testid="ws-status""#) && dom.contains(">connected<"),
        "the WebSocket connected:\n{dom}"
    );
    for i in 0..3 {
        let row = format!(r#"data-testid="device-row" data-device="dash-{i}""#);
        assert!(dom.contains(&row), "row for dash-{i}");
    }
    assert!(
        dom.contains(r#"data-device="dash-0" data-name="temp""#),
        "a value of dash-0 is shown:\n{dom}"
    );
    assert!(
        dom.contains(r#"data-device="dash-quiet" data-name="temp""#),
        "the stored value of the quiet device is shown:\n{dom}"
    );
    // No broker configured: no bridge in the header.
    let bridge = elements(&dom, "bridge");
    assert!(
        bridge.len() == 1 && bridge[0].contains_key("hidden"),
        "{bridge:?}"
    );
    // Nor a fleet.
    assert!(elements(&dom, "fleet")[0].contains_key("hidden"));
    // Live events (not only the initial fetch) reached the page.
    assert!(
        live_events(&dom) > 0,
        "no live telemetry event reached the page"
    );

    screenshot(&bin, &url, "dashboard.png").await;
    for s in streams {
        s.abort();
    }
}

/// With a broker configured the header shows the bridge: connected with nothing
/// waiting, then, with the broker gone, disconnected with the backlog the store holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_shows_the_mqtt_bridge_and_its_backlog() {
    use e2e::mqtt::Mosquitto;
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    if !Mosquitto::available() {
        return;
    }
    let mut broker = Mosquitto::start();
    let url = broker.url();
    let tg = TestGateway::start_with(move |c| {
        c.mqtt = Some(gateway::config::MqttSettings {
            url,
            client_id: "dash-gw".into(),
            ..Default::default()
        })
    })
    .await;
    let bridge_metric = |name: &'static str, want: f64| {
        let gw = tg.gw.clone();
        e2e::eventually(name, move || {
            let gw = gw.clone();
            async move { (e2e::metric(&gw, name).await? == want).then_some(()) }
        })
    };
    bridge_metric("gateway_mqtt_connected", 1.0).await;
    let page = page_url(&tg, "");
    let shown = |dom: &str, state: &str, backlog: &str| {
        elements(dom, "bridge").first().is_some_and(|b| {
            !b.contains_key("hidden")
                && b.get("data-state").map(String::as_str) == Some(state)
                && b.get("data-backlog").map(String::as_str) == Some(backlog)
        })
    };
    let dom = dump_dom_until(&bin, &page, |d| shown(d, "connected", "0")).await;
    assert!(shown(&dom, "connected", "0"), "{dom}");

    broker.stop();
    bridge_metric("gateway_mqtt_connected", 0.0).await;
    let (mut dev, _) = tg.device("dash-b", 1).await;
    for seq in 1..=5 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(5).await;
    let dom = dump_dom_until(&bin, &page, |d| shown(d, "disconnected", "5")).await;
    assert!(shown(&dom, "disconnected", "5"), "{dom}");
    let bridge = &elements(&dom, "bridge")[0];
    let title = &bridge["title"];
    assert!(
        title.starts_with("mqtt://127.0.0.1:") && title.contains("last error"),
        "the broker and why: {title}"
    );
    assert_eq!(
        bridge["data-rate"], "0",
        "nothing published while the broker is away"
    );
}

/// Sends a command through the API, waiting up to `wait_s` for it to end.
async fn command(tg: &TestGateway, device: &str, body: Json) -> (u16, Json) {
    let api = tg.gw.api().unwrap();
    let path = format!("/api/v1/devices/{device}/commands");
    let (status, text) = e2e::http_post_json(api.addr, &path, Some(&api.token), &body).await;
    (status, serde_json::from_str(&text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_history_shows_each_command_with_its_final_state() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let tg = TestGateway::start().await;
    // Another device first by id: the page must show the one the link names.
    let (_other, _) = tg.device("cmd-a-other", 1).await;
    let (dev, _) = tg.device("cmd-dev", 1).await;
    let answering = answer_commands(dev);

    let (status, ok) = command(
        &tg,
        "cmd-dev",
        json!({"name": "echo", "args": {"text": "hello"}, "wait_s": 10}),
    )
    .await;
    assert_eq!((status, &ok["state"]), (200, &json!("succeeded")), "{ok}");
    let (status, unknown) = command(
        &tg,
        "cmd-dev",
        json!({"name": "reboot", "args": {"delay_s": 3}, "wait_s": 10}),
    )
    .await;
    assert_eq!(
        (status, &unknown["state"]),
        (200, &json!("failed")),
        "{unknown}"
    );
    // One the device never answers: it stays `sent`.
    let (status, pending) = command(&tg, "cmd-dev", json!({"name": "ignore", "wait_s": 0})).await;
    assert_eq!(status, 202, "{pending}");
    let api = tg.gw.api().unwrap();
    let pending_path = format!("/api/v1/commands/{}", pending["id"]);
    e2e::eventually("the ignored command is sent", || async {
        let (_, text) = e2e::http_get(api.addr, &pending_path, Some(&api.token)).await;
        let rec: Json = serde_json::from_str(&text).ok()?;
        (rec["state"] == "sent").then_some(())
    })
    .await;

    let url = page_url(&tg, "device=cmd-dev");
    let dom = dump_dom_until(&bin, &url, |dom| elements(dom, "command-row").len() >= 3).await;
    assert_eq!(text_of(&dom, "selected-device"), Some("cmd-dev"), "{dom}");
    let history = elements(&dom, "command-history");
    assert_eq!(history.len(), 1, "one history panel:\n{dom}");
    assert_eq!(history[0]["data-device"], "cmd-dev");
    // Newest first, each in the state the API reports.
    let rows: Vec<(String, String)> = elements(&dom, "command-row")
        .into_iter()
        .map(|r| (r["data-command-id"].clone(), r["data-state"].clone()))
        .collect();
    let want: Vec<(String, String)> =
        [(&pending, "sent"), (&unknown, "failed"), (&ok, "succeeded")]
            .iter()
            .map(|(c, state)| (c["id"].to_string(), (*state).to_owned()))
            .collect();
    assert_eq!(rows, want, "the command rows:\n{dom}");
    // Their arguments and outcomes are summarized on the row.
    for text in [r#"text="hello""#, "delay_s=3", "unknown_command"] {
        assert!(dom.contains(text), "{text:?} is shown:\n{dom}");
    }
    answering.abort();
}

/// Sends one record with a `temp` reading, stamped by the device at `time_ms`.
async fn telemetry_at(dev: &mut RawDevice, seq: u32, time_ms: u64, temp: f64) {
    let mut readings = Readings::new();
    let name = proto::Name::new("temp").unwrap();
    readings.push(Reading::new(name, Value::F64(temp))).unwrap();
    dev.send(&Uplink::Telemetry(Telemetry {
        seq,
        time_ms: Some(time_ms),
        readings,
    }))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_draws_pauses_as_gaps() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("gap-dev", 1).await;
    // The device stamps its records: one 20 minutes ago (outside a 15-minute range), a
    // burst of 5 (one a second) 10 minutes ago, and another 2 minutes ago.
    let now = now_ms();
    let mut seq = 1;
    telemetry_at(&mut dev, seq, now - 20 * 60_000, 0.0).await;
    for start in [now - 10 * 60_000, now - 2 * 60_000] {
        for i in 0..5 {
            seq += 1;
            telemetry_at(&mut dev, seq, start + i * 1000, f64::from(seq % 3)).await;
        }
    }
    dev.wait_ack(seq).await;

    // The last 15 minutes: the two bursts, each a piece of line.
    let url = page_url(&tg, "device=gap-dev&range=15m");
    let temp_chart = |dom: &str| {
        elements(dom, "chart")
            .into_iter()
            .find(|c| c["data-device"] == "gap-dev" && c["data-name"] == "temp")
    };
    let dom = dump_dom_until(&bin, &url, |dom| {
        let loaded = elements(dom, "range")
            .first()
            .is_some_and(|r| r["data-state"] == "loaded");
        loaded && temp_chart(dom).is_some_and(|c| c["data-points"] != "0")
    })
    .await;
    let range = elements(&dom, "range");
    let range = range.first().expect("a range picker");
    assert_eq!(
        (range["data-range"].as_str(), range["data-state"].as_str()),
        ("15m", "loaded"),
        "{dom}"
    );
    assert!(
        text_of(&dom, "range-note").is_some_and(|t| t.starts_with("10 records from")),
        "{dom}"
    );
    let chart = temp_chart(&dom).expect("a chart of temp");
    assert_eq!(chart["data-points"], "10", "{dom}");
    assert_eq!(
        chart["data-segments"], "2",
        "a gap between the bursts:\n{dom}"
    );
    screenshot(&bin, &url, "dashboard-range.png").await;

    // Live (the last 60 records): all 11, and the line breaks twice.
    let url = page_url(&tg, "device=gap-dev");
    let dom = dump_dom_until(&bin, &url, |dom| {
        temp_chart(dom).is_some_and(|c| c["data-points"] == "11")
    })
    .await;
    let range = elements(&dom, "range");
    assert_eq!(
        range.first().map(|r| r["data-range"].as_str()),
        Some("live"),
        "{dom}"
    );
    let chart = temp_chart(&dom).expect("a chart of temp");
    assert_eq!(
        (
            chart["data-points"].as_str(),
            chart["data-segments"].as_str()
        ),
        ("11", "3"),
        "{dom}"
    );
}

/// In a fleet the header counts the gateways and each device row says which gateway
/// holds the device, including devices only another gateway has seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_where_each_device_is() {
    use e2e::nats::NatsCluster;
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    if !NatsCluster::available() {
        return;
    }
    let cluster = NatsCluster::start();
    let fleet = |id: &'static str| {
        let urls = cluster.urls();
        move |c: &mut gateway::Config| {
            c.fleet = Some(gateway::config::FleetSettings {
                urls,
                gateway_id: id.into(),
                ..Default::default()
            })
        }
    };
    let here = TestGateway::start_with(fleet("east")).await;
    let there = TestGateway::start_with(fleet("west")).await;
    let (_a, _) = here.device("dash-east", 1).await;
    let (_b, _) = there.device("dash-west", 1).await;
    let page = page_url(&here, "");
    let shown = |dom: &str| {
        let rows = elements(dom, "device-row");
        let on = |id: &str, gw: &str| {
            rows.iter().any(|r| {
                r.get("data-device").map(String::as_str) == Some(id)
                    && r.get("data-gateway").map(String::as_str) == Some(gw)
            })
        };
        on("dash-east", "east") && on("dash-west", "west")
    };
    let dom = dump_dom_until(&bin, &page, shown).await;
    assert!(shown(&dom), "{dom}");
    let header = &elements(&dom, "fleet")[0];
    assert!(!header.contains_key("hidden"), "{header:?}");
    assert_eq!(header["data-gateways"], "east west");
}

/// The selected device's settings (protocol version 2): each desired setting beside the
/// value the device reported, and whether the device holds the desired version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_settings_panel_shows_desired_beside_reported() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let tg = TestGateway::start().await;
    let api = e2e::ApiClient::new(&tg.gw);
    let (status, body) = api
        .send(
            reqwest::Method::PUT,
            "/api/v1/devices/set-dev/state",
            json!({"desired": {"interval_s": 10, "mode": "eco"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // A version 2 device that reports one of the two settings and has applied nothing.
    let (mut dev, welcome) = tg.device("set-dev", 1).await;
    assert_eq!(welcome.version, proto::PROTOCOL_VERSION);
    let name = proto::Name::new("interval_s").unwrap();
    dev.send(&Uplink::Reported(proto::Reported {
        desired_version: 0,
        values: Readings::from_slice(&[Reading::new(name, Value::U64(10))]).unwrap(),
    }))
    .await
    .unwrap();
    e2e::eventually("the report recorded", || async {
        let s = tg.gw.device_state("set-dev").await.unwrap()?;
        (s.reported_version == Some(0)).then_some(())
    })
    .await;

    let url = page_url(&tg, "device=set-dev");
    let dom = dump_dom_until(&bin, &url, |dom| elements(dom, "state-row").len() >= 2).await;
    let panel = elements(&dom, "device-state");
    assert_eq!(panel.len(), 1, "one settings panel:\n{dom}");
    assert_eq!(panel[0]["data-device"], "set-dev");
    assert_eq!(
        panel[0]["data-in-sync"], "false",
        "the device holds version 0"
    );
    let rows: Vec<(String, String, String, String)> = elements(&dom, "state-row")
        .into_iter()
        .map(|r| {
            (
                r["data-name"].clone(),
                r["data-desired"].clone(),
                r["data-reported"].clone(),
                r["data-match"].clone(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("interval_s".into(), "10".into(), "10".into(), "true".into()),
            (
                "mode".into(),
                "&quot;eco&quot;".into(),
                String::new(),
                "false".into()
            ),
        ],
        "{dom}"
    );
    assert!(dom.contains("version 1; the device holds 0"), "{dom}");
}

/// Firmware rollouts (protocol version 3): each with its state and how many of its
/// devices installed the image, and buttons to pause or cancel it while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollouts_panel_shows_each_rollout_and_its_progress() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let key = certs::release::ReleaseKey::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pub_pem = dir.path().join("release.pub.pem");
    std::fs::write(&pub_pem, key.public_pem().unwrap()).unwrap();
    let tg = TestGateway::start_with(|c| c.release_key = Some(pub_pem)).await;
    let api = e2e::ApiClient::new(&tg.gw);
    let image = vec![7u8; 1000];
    let sig = serde_json::to_string(&key.sign_image("fw-9", &image).unwrap()).unwrap();
    assert_eq!(api.upload_firmware(&image, &sig).await.0, 201);
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            json!({"firmware": "fw-9", "devices": ["a-1", "a-2"]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // One device already runs the image: installed at its Hello.
    let cert = tg.pki.device("a-1");
    let mut dev = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
        .await
        .unwrap();
    dev.hello_as(1, 3, "fw-9", 1024).await;
    e2e::eventually("a-1 installed", || async {
        let (_, r) = api.get("/api/v1/rollouts/1").await;
        (r["counts"]["installed"] == json!(1)).then_some(())
    })
    .await;

    let url = page_url(&tg, "");
    let dom = dump_dom_until(&bin, &url, |dom| !elements(dom, "rollout-row").is_empty()).await;
    let rows = elements(&dom, "rollout-row");
    assert_eq!(rows.len(), 1, "{dom}");
    assert_eq!(rows[0]["data-rollout"], "1");
    assert_eq!(rows[0]["data-state"], "running");
    assert_eq!(
        (
            rows[0]["data-installed"].as_str(),
            rows[0]["data-total"].as_str()
        ),
        ("1", "2")
    );
    assert!(dom.contains(r#"data-action="cancel""#), "{dom}");
    assert!(dom.contains(">fw-9<"), "{dom}");
}
