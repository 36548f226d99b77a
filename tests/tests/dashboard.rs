//! End-to-end: the dashboard page in headless Chromium against a real gateway with
//! devices streaming telemetry; live values must appear. Saves a screenshot to
//! `target/tmp/dashboard.png`.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it). Without it the test says so and
//! passes, so that a laptop without Chromium can still run the suite; set
//! `REQUIRE_CHROMIUM=1` (as CI does) to make its absence a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::TestGateway;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_values_appear_in_headless_chromium() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("REQUIRE_CHROMIUM").is_none(),
            "REQUIRE_CHROMIUM is set but chromium is not installed (apt-get install chromium)"
        );
        eprintln!("SKIPPED: chromium is not installed (apt-get install chromium)");
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
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let dom = loop {
        let (url2, bin2) = (url.clone(), bin.clone());
        let dom = tokio::task::spawn_blocking(move || {
            run_chromium(&bin2, &url2, &["--virtual-time-budget=6000", "--dump-dom"])
        })
        .await
        .unwrap();
        if live_events(&dom) > 0 || std::time::Instant::now() > deadline {
            break dom;
        }
    };
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
    // Live events (not only the initial fetch) reached the page.
    assert!(
        live_events(&dom) > 0,
        "no live telemetry event reached the page"
    );

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
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
    for s in streams {
        s.abort();
    }
}
