//! Measures the gateway's CPU per TLS handshake, full and resumed: the gateway's own
//! rustls configuration (`gateway::testing::TlsMaterial`: mutual TLS, the CRL, the identity
//! verifier, TLS 1.3 tickets) and its identity check after the handshake, against a
//! rustls device client with an ECDSA P-256 certificate from the `certs` library.
//!
//! ```text
//!  device (rustls client) ──bytes in memory──► gateway ServerConnection
//!                          ◄─────────────────   (only these calls are timed)
//! ```
//!
//! Client and server run in one thread over in-memory buffers: no sockets, no
//! scheduler, so the time counted is the gateway's TLS work alone (DESIGN.md budgets:
//! full ≤ 550 µs, resumed ≤ 150 µs).
//!
//! Usage: `cargo run --release -p e2e --bin bench-handshake [-- N]` (N handshakes of
//! each kind, default 500). Prints one JSON line with µs per handshake.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::testing::{TlsMaterial, TlsSettings, identify};
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConnection};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N: a number of handshakes"))
        .unwrap_or(500);
    let pki = e2e::Pki::new();
    let material = TlsMaterial::load(&TlsSettings {
        ca: pki.path("ca.pem"),
        cert: pki.path("gateway.pem"),
        key: pki.path("gateway.key.pem"),
        crl: Some(pki.path("crl.pem")),
        tls13_only: false,
        refuse_stale_crl: false,
        max_fragment_size: None,
    })
    .expect("load the gateway's TLS material");
    let device = pki.device("bench-device");

    let mut full = (*e2e::client_config(&pki.ca, Some(&device))).clone();
    full.resumption = Resumption::disabled();
    let full = Arc::new(full);
    let resuming = e2e::client_config(&pki.ca, Some(&device));

    // Warm-up, and the first ticket for the resuming client.
    for _ in 0..20 {
        handshake(&material, &full);
    }
    let (_, first) = handshake(&material, &resuming);
    assert_eq!(first, HandshakeKind::Full);

    let full_us: Vec<f64> = (0..n)
        .map(|_| micros(handshake(&material, &full), HandshakeKind::Full))
        .collect();
    let resumed_us: Vec<f64> = (0..n)
        .map(|_| micros(handshake(&material, &resuming), HandshakeKind::Resumed))
        .collect();
    println!(
        "{{\"handshakes\": {n}, \"full_us\": {}, \"resumed_us\": {}}}",
        summary(full_us),
        summary(resumed_us)
    );
}

fn micros((time, kind): (Duration, HandshakeKind), expected: HandshakeKind) -> f64 {
    assert_eq!(kind, expected, "the handshake was not of the kind measured");
    time.as_secs_f64() * 1e6
}

fn summary(mut us: Vec<f64>) -> String {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    format!(
        "{{\"mean\": {mean:.1}, \"p50\": {:.1}, \"p90\": {:.1}, \"p99\": {:.1}}}",
        at(0.5),
        at(0.9),
        at(0.99)
    )
}

/// One handshake, to the end of the gateway's identity check. Returns the time the
/// gateway spent and the kind of handshake it was.
fn handshake(material: &TlsMaterial, client: &Arc<ClientConfig>) -> (Duration, HandshakeKind) {
    let mut client =
        ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut server = ServerConnection::new(material.config.clone()).unwrap();
    let mut spent = Duration::ZERO;
    loop {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut to_server).unwrap();
        }
        let start = Instant::now();
        let mut input = &to_server[..];
        while !input.is_empty() {
            server.read_tls(&mut input).unwrap();
            server
                .process_new_packets()
                .expect("the gateway accepts the device");
        }
        let mut to_client = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut to_client).unwrap();
        }
        spent += start.elapsed();
        let mut input = &to_client[..];
        while !input.is_empty() {
            client.read_tls(&mut input).unwrap();
            client
                .process_new_packets()
                .expect("the device accepts the gateway");
        }
        let settled = !client.is_handshaking() && !server.is_handshaking();
        if settled && to_server.is_empty() && to_client.is_empty() && !client.wants_write() {
            break;
        }
    }
    // What the gateway does next (server.rs): who is it?
    let start = Instant::now();
    let cert = server
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .expect("a client certificate");
    identify(&cert, material).expect("a valid device identity");
    spent += start.elapsed();
    (
        spent,
        client.handshake_kind().expect("a finished handshake"),
    )
}
