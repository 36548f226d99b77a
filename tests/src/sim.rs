//! The device simulator (`device_client::sim`) in tests: certificates minted in
//! memory for many devices, and waiting on the simulator's live counters.

use std::sync::Arc;
use std::time::Duration;

use device_client::sim::{DeviceIdentity, Devices, Monitor, Stats, client_config};

use crate::Pki;

/// How long a test waits for a condition of the simulation (hundreds of debug-build
/// handshakes on a 2-core CI box take a while).
pub const SIM_WAIT: Duration = Duration::from_secs(90);

/// Certificates for `n` devices `sim-0000`... minted in memory, issued on every core.
pub fn mint(pki: &Pki, n: usize) -> Vec<(String, certs::Issued)> {
    let ids = device_client::sim::sequential_ids("sim-", 0, n);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|id| (id.clone(), pki.device(id)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().expect("minting"))
            .collect()
    })
}

/// `n` devices as TLS settings in memory.
pub fn loaded(pki: &Pki, n: usize) -> Devices {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.certificate_der()).expect("minting");
    let roots = Arc::new(roots);
    Devices::Loaded(
        mint(pki, n)
            .into_iter()
            .map(|(id, cert)| DeviceIdentity {
                id,
                tls: client_config(
                    roots.clone(),
                    vec![cert.certificate_der()],
                    cert.private_key_der(),
                )
                .expect("minting"),
            })
            .collect(),
    )
}

/// Waits until the simulation's counters satisfy `cond`; panics after [`SIM_WAIT`].
pub async fn until(mon: &Monitor, what: &str, cond: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = tokio::time::Instant::now() + SIM_WAIT;
    loop {
        let s = mon.stats();
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
