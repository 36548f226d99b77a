//! Measures how devices fare while unauthenticated connections hold the gateway's
//! pre-authentication budget (SECURITY.md, "Limits"): a device connecting means TCP,
//! the mutual-TLS handshake, `Hello` and `Welcome`.
//!
//! ```text
//!  attacker (127.0.0.2, or 127.0.0.2..N) ── half-open: 6 bytes of a ClientHello, held
//!  devices  (127.0.0.1) ──────────────────── connect, handshake, Hello ─► Welcome (timed)
//! ```
//!
//! Scenarios, each on a fresh gateway with default budgets (max_handshakes 1024,
//! max_handshakes_per_source 64, handshake_timeout 10 s):
//! 1. no attack;
//! 2. 5,000 half-open connections from one address;
//! 3. 2,048 half-open connections from 64 addresses (32 each): the global budget, not
//!    the per-source one, is what they fill.
//!
//! Usage: `cargo run --release -p e2e --bin bench-preauth [-- DEVICES]` (devices per
//! scenario, default 100). Prints one JSON line per scenario: devices connected, and
//! the time to `Welcome` (median, p99, max) of those that did within 15 s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use e2e::{RawDevice, TestGateway};

async fn scenario(name: &str, sources: u8, per_source: usize, devices: usize) {
    let tg = TestGateway::start().await;
    let mut held = Vec::new();
    for i in 0..sources {
        held.extend(e2e::hold_half_open([127, 0, 0, 2 + i], tg.addr(), per_source).await);
    }
    let mut times = Vec::new();
    for i in 0..devices {
        let cert = tg.pki.device(&format!("dev-{i}"));
        let start = Instant::now();
        let ok = tokio::time::timeout(Duration::from_secs(15), async {
            let mut dev = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert))
                .await
                .ok()?;
            let _welcome = dev.hello(1).await;
            Some(())
        })
        .await;
        if let Ok(Some(())) = ok {
            times.push(start.elapsed());
        }
    }
    times.sort();
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let closed = e2e::metric(
        &tg.gw,
        "gateway_preauth_refusals_total{reason=\"per_source\"}",
    )
    .await
    .unwrap_or(0.0)
        + e2e::metric(&tg.gw, "gateway_preauth_refusals_total{reason=\"evicted\"}")
            .await
            .unwrap_or(0.0);
    println!(
        "{{\"scenario\":\"{name}\",\"half_open_opened\":{},\"attacker_closed\":{closed},\
         \"devices\":{devices},\"connected\":{},\"welcome_ms_p50\":{:.2},\
         \"welcome_ms_p99\":{:.2},\"welcome_ms_max\":{:.2}}}",
        held.len(),
        times.len(),
        pct(0.5),
        pct(0.99),
        times.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    drop(held);
    tg.gw.shutdown().await;
}

#[tokio::main]
async fn main() {
    let devices: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("DEVICES: a number"))
        .unwrap_or(100);
    scenario("no attack", 0, 0, devices).await;
    scenario("5000 half-open from one address", 1, 5_000, devices).await;
    scenario("2048 half-open from 64 addresses", 64, 32, devices).await;
}
