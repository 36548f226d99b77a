//! `gateway quickstart`: a development CA, the gateway on built-in defaults, and N
//! simulated devices in the same process, in one command.
//!
//! ```text
//!  ./quickstart/
//!    certs/   ca.pem, gateway.pem, crl.pem, devices/sim-0000 …,
//!             release.pub.pem + release/ (the firmware release key)  (made if absent)
//!    data/    gateway.sqlite, api-token
//!  gateway  devices on 127.0.0.1:7443, API + dashboard on 127.0.0.1:8080
//!  device_client::sim  N devices, one record per device per second
//! ```

use std::path::PathBuf;
use std::time::Duration;

use certs::Validity;
use certs::dir::{Existing, InitOptions, PkiDir};
use device_client::sim::{Devices, SimConfig, Simulator};

use gateway::Config;

/// Where the quickstart keeps its files, and how many devices it runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory for certificates and data.
    pub dir: PathBuf,
    /// Simulated devices.
    pub devices: usize,
    /// Telemetry records per device per second.
    pub rate: f64,
}

/// The quickstart could not set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuickstartError {
    /// Making the certificates failed.
    #[error("certificates in {dir}: {source}")]
    Certs {
        /// The certs directory.
        dir: PathBuf,
        /// Why.
        source: certs::dir::DirError,
    },
    /// The device ids could not be made.
    #[error("device ids: {0}")]
    Ids(#[from] certs::Error),
}

/// Prefix of the simulated devices' ids.
pub const PREFIX: &str = "sim-";

/// Makes `DIR/certs` (CA, gateway, CRL) if absent and a certificate for each of the
/// devices that does not have one yet; returns the gateway settings to use.
pub fn prepare(
    opts: &Options,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Config, QuickstartError> {
    let certs_dir = opts.dir.join("certs");
    let pki = PkiDir::new(&certs_dir);
    let err = |source| QuickstartError::Certs {
        dir: certs_dir.clone(),
        source,
    };
    if !pki.ca_cert_path().exists() {
        pki.init(&InitOptions {
            ca_common_name: "quickstart development CA".into(),
            ..InitOptions::default()
        })
        .map_err(err)?;
    }
    if !pki.release_key_path().exists() {
        pki.create_release_key().map_err(err)?;
    }
    let ca = pki.load_ca().map_err(err)?;
    let ids = certs::dir::sequential_ids(PREFIX, 0, opts.devices as u64)?;
    pki.issue_devices(&ca, &ids, Validity::days(825), Existing::Skip, progress)
        .map_err(err)?;
    Ok(Config {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7443)),
        ca: pki.ca_cert_path(),
        cert: pki.gateway_cert_path(),
        key: pki.gateway_key_path(),
        crl: Some(pki.crl_path()),
        data_dir: opts.dir.join("data"),
        // Firmware images signed with the quickstart's release key are taken
        // (`certs sign-firmware --dir quickstart/certs ...`).
        release_key: Some(pki.release_public_paths().0),
        ..Config::default()
    })
}

/// Settings for the simulated devices of a quickstart against `gateway`.
pub fn simulation(opts: &Options, gateway: std::net::SocketAddr) -> SimConfig {
    let mut sim = SimConfig::new(
        gateway.to_string(),
        Devices::Dir {
            dir: opts.dir.join("certs"),
            prefix: PREFIX.into(),
            first: 0,
            count: opts.devices,
        },
    );
    sim.rate = opts.rate;
    sim.duration = None;
    // The devices check offered images against the release key, as firmware does.
    sim.release_key = std::fs::read(PkiDir::new(opts.dir.join("certs")).release_public_paths().1)
        .ok()
        .and_then(|b| b.try_into().ok());
    sim.drain_timeout = Duration::from_secs(5);
    sim
}

/// Starts the simulated devices (their certificates must exist: see [`prepare`]).
pub fn start_devices(
    opts: &Options,
    gateway: std::net::SocketAddr,
) -> Result<Simulator, device_client::sim::SimError> {
    Simulator::start(simulation(opts, gateway))
}
