//! Device identities: TLS client configurations loaded once per device from the layout
//! the `certs` tool writes (`DIR/ca.pem`, `DIR/devices/ID/{cert,key}.pem`).

extern crate std;

use crate::layout::{CA_CERT_FILE, DEVICE_CERT_PEM, DEVICE_KEY_PEM, DEVICES_DIR};
use std::format;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::sync::{Arc, OnceLock};
use std::vec::Vec;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::SimError;

/// One simulated device: its id (the CN of its certificate) and its TLS settings.
#[derive(Clone)]
pub struct DeviceIdentity {
    /// The device id.
    pub id: String,
    /// Trusts the gateway's CA and presents the device's certificate.
    pub tls: Arc<ClientConfig>,
}

impl core::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// TLS 1.3 tickets of one gateway per device (8 tickets = one server in rustls' cache):
/// reconnects resume cheaply, and 10,000 devices do not each carry rustls' default
/// cache for 32 servers.
const TICKETS_PER_DEVICE: usize = 8;

/// One crypto provider (ring) for every device of the process.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A client configuration for one simulated device: trusts `roots` (share one store
/// among devices), presents `chain` with `key`, and keeps the TLS 1.3 tickets of one
/// gateway for cheap reconnects.
pub fn client_config(
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.resumption = Resumption::in_memory_sessions(TICKETS_PER_DEVICE);
    Ok(Arc::new(config))
}

/// The ids `certs devices --prefix PREFIX --start FIRST --count COUNT` issues: the
/// prefix and a decimal counter zero-padded to at least 4 digits (more if the last
/// needs them).
pub fn sequential_ids(prefix: &str, first: u64, count: usize) -> Vec<String> {
    let width = crate::layout::sequential_id_width(first, count as u64);
    ids_with_width(prefix, first, count, width)
}

fn ids_with_width(prefix: &str, first: u64, count: usize, width: usize) -> Vec<String> {
    (0..count as u64)
        .map(|i| format!("{prefix}{:0width$}", first.saturating_add(i)))
        .collect()
}

/// Loads `count` devices `PREFIX{FIRST..}` from a `certs` directory, on every core.
///
/// The padding of the ids is the one `certs devices` used: if the directory was made
/// for more devices than are simulated (`--count 20000` pads to 5 digits), the ids
/// found on disk win.
pub fn load_dir(
    dir: &Path,
    prefix: &str,
    first: u64,
    count: usize,
) -> Result<Vec<DeviceIdentity>, SimError> {
    let ca_path = dir.join(CA_CERT_FILE);
    if !ca_path.is_file() {
        return Err(SimError::NoCa {
            path: ca_path,
            dir: dir.to_path_buf(),
            prefix: prefix.into(),
            count,
        });
    }
    let mut roots = RootCertStore::empty();
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| SimError::Pem {
            path: path.clone(),
            reason: e.to_string(),
        }
    };
    for cert in CertificateDer::pem_file_iter(&ca_path).map_err(pem_err(&ca_path))? {
        roots
            .add(cert.map_err(pem_err(&ca_path))?)
            .map_err(|e| SimError::Pem {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
    }
    let roots = Arc::new(roots);

    let devices = dir.join(DEVICES_DIR);
    let mut ids = sequential_ids(prefix, first, count);
    if let Some(id) = ids.first()
        && !devices.join(id).is_dir()
    {
        // Made for a larger fleet: try wider padding.
        let wider = (5..=20).find(|w| {
            devices
                .join(format!("{prefix}{first:0w$}", w = *w))
                .is_dir()
        });
        if let Some(width) = wider {
            ids = ids_with_width(prefix, first, count, width);
        }
    }

    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(ids.len().max(1));
    let chunk = ids.len().div_ceil(threads).max(1);
    let missing = |id: &str, path: PathBuf| SimError::MissingDevice {
        id: id.into(),
        path,
        dir: dir.to_path_buf(),
        prefix: prefix.into(),
        first,
        count,
    };
    let results: Vec<Result<Vec<DeviceIdentity>, SimError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                let roots = roots.clone();
                let devices = &devices;
                let missing = &missing;
                s.spawn(move || {
                    part.iter()
                        .map(|id| {
                            let cert = devices.join(id).join(DEVICE_CERT_PEM);
                            let key = devices.join(id).join(DEVICE_KEY_PEM);
                            for p in [&cert, &key] {
                                if !p.is_file() {
                                    return Err(missing(id, p.clone()));
                                }
                            }
                            load_one(id, roots.clone(), &cert, &key)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(SimError::WorkerPanicked)))
            .collect()
    });
    let mut out = Vec::with_capacity(count);
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

fn load_one(
    id: &str,
    roots: Arc<RootCertStore>,
    cert: &Path,
    key: &Path,
) -> Result<DeviceIdentity, SimError> {
    let pem = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| SimError::Pem {
            path,
            reason: e.to_string(),
        }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(cert))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
    let tls = client_config(roots, chain, key_der).map_err(|e| SimError::Pem {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(DeviceIdentity { id: id.into(), tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_the_certs_tool() {
        assert_eq!(sequential_ids("sim-", 0, 2), ["sim-0000", "sim-0001"]);
        let ids = sequential_ids("sim-", 0, 20_000);
        assert_eq!(ids.first().map(String::as_str), Some("sim-00000"));
        assert_eq!(ids.last().map(String::as_str), Some("sim-19999"));
        assert_eq!(
            sequential_ids("d", 9_998, 3),
            ["d09998", "d09999", "d10000"]
        );
        assert!(sequential_ids("x", 0, 0).is_empty());
    }

    #[test]
    fn a_missing_directory_says_what_to_run() {
        let dir = std::env::temp_dir().join("device-sim-no-such-dir-for-this-test");
        let err = load_dir(&dir, "sim-", 0, 10).unwrap_err();
        assert!(err.to_string().contains("certs init"), "{err}");
    }
}
