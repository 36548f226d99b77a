//! The on-disk layout the `certs` CLI maintains (the tree is in the crate docs).
//!
//! Writes are all-or-nothing per file and per device:
//! - a single file is written to `.<name>~tmp~<random>` in the same directory, synced,
//!   then linked (no overwrite) or renamed (overwrite) into place;
//! - a device's four files are written into `devices/.<id>~tmp~<random>/`, synced, and
//!   that directory is renamed to `devices/<id>` in one step.
//!
//! `~` is not allowed in a device id, so a leftover temporary entry (after a crash)
//! never looks like a device; [`PkiDir::list_devices`] skips it and it can be deleted.
//!
//! Not safe against two processes changing the same directory at once (two concurrent
//! `revoke`s may lose one revocation): run one `certs` command at a time per directory.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use device_client::proto::DeviceId;
use time::OffsetDateTime;

use crate::inspect::{verify_crl_signed_by, verify_signed_by};
use crate::{Ca, CertInfo, Crl, Error, Issued, RevokedEntry, Serial, Validity};

/// Default validity of a new CA, in days (about 10 years).
pub const DEFAULT_CA_DAYS: u16 = 3650;
/// Default validity of gateway and device certificates, in days (about 27 months, the
/// longest the CA/Browser Forum allowed for server certificates until 2020).
pub const DEFAULT_LEAF_DAYS: u16 = 825;
/// Default time from a CRL's `thisUpdate` to its `nextUpdate`, in days. Every change
/// re-signs the CRL with a fresh period; `certs crl` re-signs it without a change.
pub const DEFAULT_CRL_DAYS: u16 = 365;
/// Default subject CN of a new CA.
pub const DEFAULT_CA_NAME: &str = "IoT Gateway CA";

// The layout's names are spelled once, in the device client (its readers use them too).
pub use device_client::layout::{
    CA_CERT_FILE, CA_KEY_FILE, CA_PRIVATE_DIR, CRL_FILE, DEVICE_CERT_DER, DEVICE_CERT_PEM,
    DEVICE_KEY_DER, DEVICE_KEY_PEM, DEVICES_DIR, GATEWAY_CERT_FILE, GATEWAY_KEY_FILE,
};
/// `DIR/ca.key.pem`: where the CA key was kept before `DIR/ca/`, still read.
pub const LEGACY_CA_KEY_FILE: &str = "ca.key.pem";

/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of `DIR/ca/`.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of certificate and CRL files.
pub const PUBLIC_MODE: u32 = 0o644;

/// Why an operation on a PKI directory failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirError {
    /// The directory does not exist.
    #[error("directory {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The directory holds no CA.
    #[error("{} holds no CA: {} is missing", dir.display(), missing.display())]
    NoCa {
        /// The PKI directory.
        dir: PathBuf,
        /// The CA file that is missing.
        missing: PathBuf,
    },
    /// The directory holds a CA certificate but not its private key (moved offline?).
    #[error("{} holds no CA private key: {} is missing", dir.display(), missing.display())]
    NoCaKey {
        /// The PKI directory.
        dir: PathBuf,
        /// Where the key belongs.
        missing: PathBuf,
    },
    /// The directory already holds (part of) a CA.
    #[error("{} already holds a CA: {} exists", dir.display(), existing.display())]
    CaExists {
        /// The PKI directory.
        dir: PathBuf,
        /// The first CA file found.
        existing: PathBuf,
    },
    /// A file or device directory that would be created already exists.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// Some of the devices of a bulk request already exist.
    #[error("{count} of the requested devices already exist, the first is {}", first.display())]
    DevicesExist {
        /// The first existing device directory.
        first: PathBuf,
        /// How many of the requested devices exist.
        count: usize,
    },
    /// A device id appears twice in one request.
    #[error("device id {0:?} appears twice")]
    DuplicateId(String),
    /// No device with that id exists in the directory.
    #[error("no device {id:?}: {} does not exist", path.display())]
    NoSuchDevice {
        /// The requested id.
        id: String,
        /// Where its directory would be.
        path: PathBuf,
    },
    /// A file in the directory holds something invalid, or something another CA signed.
    #[error("{}: {source}", path.display())]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Error,
    },
    /// Minting or signing failed, or an argument (id, name, validity) was invalid.
    #[error(transparent)]
    Pki(#[from] Error),
    /// A file system operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "create".
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A bulk issue stopped partway; the devices issued before the error are complete.
    #[error("stopped after issuing {issued} of {total} device certificates: {source}")]
    Partial {
        /// Devices fully written.
        issued: usize,
        /// Devices requested (not counting skipped ones).
        total: usize,
        /// The first error.
        #[source]
        source: Box<DirError>,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DirError + 'a {
    move |source| DirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What to do when a device to be issued already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Fail without writing anything.
    Refuse,
    /// Leave the existing device alone and issue the others.
    Skip,
    /// Issue a new certificate and key and replace the old ones. The old certificate
    /// stays valid until it expires unless it is revoked (by serial).
    Replace,
}

/// Settings for [`PkiDir::init`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Subject CN of the CA.
    pub ca_common_name: String,
    /// Extra names for the gateway certificate (see [`Ca::issue_gateway`]).
    pub gateway_names: Vec<String>,
    /// Validity of the CA certificate.
    pub ca_validity: Validity,
    /// Validity of the gateway certificate (cut to the CA's).
    pub gateway_validity: Validity,
    /// Validity of the initial, empty CRL.
    pub crl_validity: Validity,
    /// Replace an existing CA (every certificate it issued stops being trusted).
    pub force: bool,
}

impl Default for InitOptions {
    /// The CLI's defaults, counted from now.
    fn default() -> Self {
        Self {
            ca_common_name: DEFAULT_CA_NAME.to_owned(),
            gateway_names: Vec::new(),
            ca_validity: Validity::days(DEFAULT_CA_DAYS),
            gateway_validity: Validity::days(DEFAULT_LEAF_DAYS),
            crl_validity: Validity::days(DEFAULT_CRL_DAYS),
            force: false,
        }
    }
}

/// What [`PkiDir::init`] made.
#[derive(Debug)]
#[non_exhaustive]
pub struct Initialized {
    /// The new CA.
    pub ca: Ca,
    /// Serial of the gateway certificate.
    pub gateway_serial: Serial,
    /// Validity of the gateway certificate.
    pub gateway_validity: Validity,
    /// Device directories left from a previous CA (only with `force`): their
    /// certificates are no longer trusted.
    pub stale_devices: usize,
}

/// What [`PkiDir::issue_device`] wrote (no key material).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeviceIssued {
    /// The device id.
    pub id: String,
    /// The device's directory.
    pub path: PathBuf,
    /// Serial of the new certificate.
    pub serial: Serial,
    /// Validity of the new certificate.
    pub validity: Validity,
    /// Serial of the certificate it replaced, if any; that one stays valid until it
    /// expires unless revoked.
    pub replaced: Option<Serial>,
}

/// What [`PkiDir::renew_device`] / [`PkiDir::renew_gateway`] wrote (no key material).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Renewed {
    /// The subject CN, the same as before (the device id, or the gateway's first name).
    pub common_name: String,
    /// The device's directory, or `gateway.pem`.
    pub path: PathBuf,
    /// Serial of the new certificate.
    pub serial: Serial,
    /// Validity of the new certificate.
    pub validity: Validity,
    /// Serial of the certificate it replaced. Not revoked: it stays valid until
    /// `old_validity` ends unless revoked.
    pub old_serial: Serial,
    /// Validity of the certificate it replaced.
    pub old_validity: Validity,
    /// Whether the private key was kept (only the certificate changed).
    pub kept_key: bool,
}

/// What [`PkiDir::list`] read: the devices and the CRL.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Listing {
    /// Every device, sorted by id (see [`PkiDir::list_devices`]).
    pub devices: Vec<DeviceRecord>,
    /// The CRL in `crl.pem`, checked against `ca.pem`; `None` if there is none.
    pub crl: Option<Crl>,
}

/// What [`PkiDir::issue_devices`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BulkReport {
    /// Devices issued (including replaced ones).
    pub issued: usize,
    /// Existing devices left alone ([`Existing::Skip`]).
    pub skipped: usize,
    /// `(id, old serial)` of replaced certificates ([`Existing::Replace`]); they stay
    /// valid until they expire unless revoked.
    pub replaced: Vec<(String, Serial)>,
}

/// What [`PkiDir::revoke_device`] / [`PkiDir::revoke_serial`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Revocation {
    /// The revoked serial.
    pub serial: Serial,
    /// False if the CRL already listed it (nothing was written).
    pub newly_revoked: bool,
    /// Number of the CRL now in `crl.pem`.
    pub crl_number: u64,
    /// How many serials that CRL lists.
    pub revoked_count: usize,
}

/// One device as [`PkiDir::list_devices`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceRecord {
    /// The device id (its directory name).
    pub id: String,
    /// The certificate's subject CN (equal to `id` unless someone edited the files).
    pub common_name: Option<String>,
    /// The certificate's serial.
    pub serial: Serial,
    /// The certificate's validity period.
    pub validity: Validity,
    /// Whether `crl.pem` lists the serial.
    pub revoked: bool,
    /// Whether the certificate has expired.
    pub expired: bool,
    /// Whether the directory's current CA signed it (false after `init --force`).
    pub signed_by_ca: bool,
}

/// Device ids for bulk issuing: `prefix` followed by a zero-padded decimal counter from
/// `start`, padded to at least 4 digits (more if `start + count - 1` needs them), so the
/// ids sort in numeric order: prefix `sim-`, start 0, count 1000 gives `sim-0000` ...
/// `sim-0999`; count 20000 gives `sim-00000` ... `sim-19999`.
///
/// Fails if the ids break the identity rule (e.g. a prefix with a space, or too long).
pub fn sequential_ids(prefix: &str, start: u64, count: u64) -> Result<Vec<String>, Error> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let last = start
        .checked_add(count - 1)
        .ok_or_else(|| Error::InvalidDeviceId {
            id: format!("{prefix}{start}+{count}"),
            source: device_client::proto::InvalidDeviceId::TooLong { len: usize::MAX },
        })?;
    let width = device_client::layout::sequential_id_width(start, count);
    // Digits are always allowed and the last id is the longest, so checking the first
    // and the last id checks them all.
    for n in [start, last] {
        let id = format!("{prefix}{n:0width$}");
        DeviceId::new(&id).map_err(|source| Error::InvalidDeviceId {
            id: id.clone(),
            source,
        })?;
    }
    Ok((start..=last)
        .map(|n| format!("{prefix}{n:0width$}"))
        .collect())
}

/// A PKI directory (see the crate docs for its layout).
#[derive(Debug, Clone)]
pub struct PkiDir {
    root: PathBuf,
}

impl PkiDir {
    /// A handle on `root`; touches nothing on disk.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `DIR/ca.pem`.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.root.join(CA_CERT_FILE)
    }

    /// `DIR/release/release.key.pem`: the firmware release key (in a 0700 directory of
    /// its own, to move offline as the CA's).
    pub fn release_key_path(&self) -> PathBuf {
        self.root
            .join(device_client::layout::RELEASE_PRIVATE_DIR)
            .join(device_client::layout::RELEASE_KEY_FILE)
    }

    /// `DIR/release.pub.pem` and `DIR/release.pub.bin` (65 bytes, SEC1): the release
    /// public key for the gateway and for firmware.
    pub fn release_public_paths(&self) -> (PathBuf, PathBuf) {
        (
            self.root.join(device_client::layout::RELEASE_PUB_PEM),
            self.root.join(device_client::layout::RELEASE_PUB_BIN),
        )
    }

    /// Makes a new firmware release key (refuses to replace one).
    pub fn create_release_key(&self) -> Result<crate::ReleaseKey, DirError> {
        let key_path = self.release_key_path();
        if key_path.exists() {
            return Err(DirError::Exists(key_path));
        }
        fs::create_dir_all(&self.root).map_err(io_err("create directory", &self.root))?;
        if let Some(dir) = key_path.parent() {
            create_private_dir(dir)?;
        }
        let key = crate::ReleaseKey::generate()?;
        let (pub_pem, pub_bin) = self.release_public_paths();
        Staged::new(&pub_pem, key.public_pem()?.as_bytes(), PUBLIC_MODE)?.commit(true)?;
        Staged::new(&pub_bin, &key.public_sec1(), PUBLIC_MODE)?.commit(true)?;
        Staged::new(&key_path, key.to_pem()?.as_bytes(), KEY_MODE)?.commit(false)?;
        Ok(key)
    }

    /// The firmware release key (`path`, or [`release_key_path`](Self::release_key_path)).
    pub fn load_release_key(&self, path: Option<&Path>) -> Result<crate::ReleaseKey, DirError> {
        let path = path.map_or_else(|| self.release_key_path(), Path::to_path_buf);
        let pem = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Ok(crate::ReleaseKey::from_pem(&pem)?)
    }

    /// `DIR/ca/`, the CA's private directory.
    pub fn ca_private_dir(&self) -> PathBuf {
        self.root.join(CA_PRIVATE_DIR)
    }

    /// `DIR/ca/ca.key.pem`: where `init` writes the CA key. (A directory made by an
    /// earlier version has it at [`PkiDir::legacy_ca_key_path`];
    /// [`PkiDir::find_ca_key`] says which one is there.)
    pub fn ca_key_path(&self) -> PathBuf {
        self.ca_private_dir().join(CA_KEY_FILE)
    }

    /// `DIR/ca.key.pem`, where earlier versions kept the CA key.
    pub fn legacy_ca_key_path(&self) -> PathBuf {
        self.root.join(LEGACY_CA_KEY_FILE)
    }

    /// The CA key file this directory has: `DIR/ca/ca.key.pem`, else the legacy
    /// `DIR/ca.key.pem`; `None` if neither exists (e.g. `DIR/ca/` was moved offline).
    pub fn find_ca_key(&self) -> Option<PathBuf> {
        [self.ca_key_path(), self.legacy_ca_key_path()]
            .into_iter()
            .find(|p| exists(p))
    }

    /// `DIR/gateway.pem`.
    pub fn gateway_cert_path(&self) -> PathBuf {
        self.root.join(GATEWAY_CERT_FILE)
    }

    /// `DIR/gateway.key.pem`.
    pub fn gateway_key_path(&self) -> PathBuf {
        self.root.join(GATEWAY_KEY_FILE)
    }

    /// `DIR/crl.pem`.
    pub fn crl_path(&self) -> PathBuf {
        self.root.join(CRL_FILE)
    }

    /// `DIR/devices`.
    pub fn devices_path(&self) -> PathBuf {
        self.root.join(DEVICES_DIR)
    }

    /// `DIR/devices/<id>`, after checking `id` (identity rule, and not `.` or `..`).
    pub fn device_path(&self, id: &str) -> Result<PathBuf, DirError> {
        check_id(id)?;
        Ok(self.devices_path().join(id))
    }

    /// Creates the directory if needed, a CA, the gateway certificate and an empty CRL.
    ///
    /// The CA key goes to `DIR/ca/ca.key.pem` (`DIR/ca/` mode 0700), apart from what
    /// the gateway reads, so that `DIR/ca/` can be moved offline as a whole.
    ///
    /// Refuses if any of the five files exists (or a CA key at the legacy place),
    /// unless `options.force`; then it replaces them (each file atomically, keys
    /// first), removes a legacy `DIR/ca.key.pem` (the replaced CA's key) and reports
    /// how many device directories the old CA left behind. Without `force`, a failure
    /// midway removes the files this call already placed.
    pub fn init(&self, options: &InitOptions) -> Result<Initialized, DirError> {
        let files = [
            self.ca_key_path(),
            self.ca_cert_path(),
            self.gateway_key_path(),
            self.gateway_cert_path(),
            self.crl_path(),
        ];
        let legacy_key = self.legacy_ca_key_path();
        if !options.force {
            // Report ca.pem first: it is the file people know.
            let check_order = [
                &files[1],
                &files[0],
                &legacy_key,
                &files[3],
                &files[2],
                &files[4],
            ];
            if let Some(existing) = check_order.into_iter().find(|p| exists(p)) {
                return Err(DirError::CaExists {
                    dir: self.root.clone(),
                    existing: existing.clone(),
                });
            }
        }
        // Mint everything before touching the disk, so a bad argument (e.g. a gateway
        // name) leaves nothing behind, not even the directory.
        let ca = Ca::generate(&options.ca_common_name, options.ca_validity)?;
        let gateway_validity = options.gateway_validity.clamped_to(&ca.validity())?;
        let gateway = ca.issue_gateway(&options.gateway_names, gateway_validity)?;
        let crl = ca.crl(&[], 1, options.crl_validity)?;
        fs::create_dir_all(&self.root).map_err(io_err("create directory", &self.root))?;
        let private_dir = self.ca_private_dir();
        let made_private_dir = create_private_dir(&private_dir)?;

        let ca_key = ca.key_pem();
        let contents: [(&[u8], u32); 5] = [
            (ca_key.as_bytes(), KEY_MODE),
            (ca.cert_pem().as_bytes(), PUBLIC_MODE),
            (gateway.key_pem.as_bytes(), KEY_MODE),
            (gateway.cert_pem.as_bytes(), PUBLIC_MODE),
            (crl.pem.as_bytes(), PUBLIC_MODE),
        ];
        // On failure: how many files were placed, and why it failed.
        let placed: Result<(), (usize, DirError)> = (|| {
            let mut staged = Vec::with_capacity(files.len());
            for (path, (bytes, mode)) in files.iter().zip(contents) {
                staged.push(Staged::new(path, bytes, mode).map_err(|e| (0, e))?);
            }
            for (i, file) in staged.into_iter().enumerate() {
                file.commit(options.force).map_err(|e| (i, e))?;
            }
            Ok(())
        })();
        if let Err((i, e)) = placed {
            if !options.force {
                // These did not exist before this call: take them back out.
                for placed in files.iter().take(i) {
                    let _ = fs::remove_file(placed);
                }
                if made_private_dir {
                    let _ = fs::remove_dir(&private_dir);
                }
            }
            return Err(e);
        }
        sync_dir(&private_dir)?;
        if options.force && exists(&legacy_key) {
            // The replaced CA's key: left there it would be a second, stale CA key.
            fs::remove_file(&legacy_key)
                .map_err(io_err("remove the replaced CA key", &legacy_key))?;
        }
        sync_dir(&self.root)?;
        let stale_devices = if options.force {
            self.device_dirs()?.len()
        } else {
            0
        };
        Ok(Initialized {
            ca,
            gateway_serial: gateway.serial,
            gateway_validity,
            stale_devices,
        })
    }

    /// Loads the CA from `ca.pem` and its key in `DIR/ca/ca.key.pem` (or, in a
    /// directory made by an earlier version, `DIR/ca.key.pem`).
    pub fn load_ca(&self) -> Result<Ca, DirError> {
        self.check_ca_cert()?;
        let key = self.find_ca_key().ok_or_else(|| DirError::NoCaKey {
            dir: self.root.clone(),
            missing: self.ca_key_path(),
        })?;
        self.load_ca_with_key(&key)
    }

    /// Loads the CA from `ca.pem` and the key at `key_path`: for a CA key kept
    /// elsewhere (offline, on removable media).
    pub fn load_ca_with_key(&self, key_path: &Path) -> Result<Ca, DirError> {
        self.check_ca_cert()?;
        let cert_path = self.ca_cert_path();
        let cert = read_to_string(&cert_path)?;
        let key = read_to_string(key_path)?;
        Ca::from_pem(&cert, &key).map_err(|source| DirError::BadFile {
            path: match source {
                Error::UnsupportedKey { .. } | Error::KeyMismatch => key_path.to_path_buf(),
                _ => cert_path,
            },
            source,
        })
    }

    /// The directory exists and holds `ca.pem` (all that reading needs; signing also
    /// needs the key, which [`PkiDir::load_ca`] looks for).
    fn check_ca_cert(&self) -> Result<(), DirError> {
        if !self.root.is_dir() {
            return Err(DirError::Missing(self.root.clone()));
        }
        let path = self.ca_cert_path();
        if !exists(&path) {
            return Err(DirError::NoCa {
                dir: self.root.clone(),
                missing: path,
            });
        }
        Ok(())
    }

    /// Issues a new gateway certificate (e.g. to renew it or add names) into
    /// `gateway.pem` / `gateway.key.pem`. Refuses to replace existing files unless
    /// `replace`. The validity is cut to the CA's.
    pub fn issue_gateway(
        &self,
        ca: &Ca,
        names: &[String],
        validity: Validity,
        replace: bool,
    ) -> Result<(Serial, Validity), DirError> {
        let (key_path, cert_path) = (self.gateway_key_path(), self.gateway_cert_path());
        let existing = [&key_path, &cert_path].into_iter().find(|p| exists(p));
        if let (false, Some(existing)) = (replace, existing) {
            return Err(DirError::Exists(existing.clone()));
        }
        let validity = validity.clamped_to(&ca.validity())?;
        let gateway = ca.issue_gateway(names, validity)?;
        self.place_gateway(&gateway, true, replace)?;
        Ok((gateway.serial, validity))
    }

    /// Writes `gateway.key.pem` (if `with_key`), then `gateway.pem`.
    fn place_gateway(
        &self,
        gateway: &Issued,
        with_key: bool,
        replace: bool,
    ) -> Result<(), DirError> {
        let (key_path, cert_path) = (self.gateway_key_path(), self.gateway_cert_path());
        let cert = Staged::new(&cert_path, gateway.cert_pem.as_bytes(), PUBLIC_MODE)?;
        if with_key {
            Staged::new(&key_path, gateway.key_pem.as_bytes(), KEY_MODE)?.commit(replace)?;
        }
        if let Err(e) = cert.commit(replace) {
            if with_key && !replace {
                let _ = fs::remove_file(&key_path);
            }
            return Err(e);
        }
        sync_dir(&self.root)
    }

    /// Renews the gateway certificate: a new one with the same subject CN and names
    /// (read from `gateway.pem`), a new serial, `validity` (cut to the CA's), and a new
    /// key unless `keep_key` (then only `gateway.pem` is rewritten, signed for the key
    /// in `gateway.key.pem`).
    ///
    /// The old certificate is not revoked: the CRL lists device certificates only, so
    /// it stays valid until it expires.
    pub fn renew_gateway(
        &self,
        ca: &Ca,
        validity: Validity,
        keep_key: bool,
    ) -> Result<Renewed, DirError> {
        self.check_ca_cert()?;
        let cert_path = self.gateway_cert_path();
        let old = read_cert_info(&cert_path)?;
        let names = gateway_names_of(&old);
        let validity = validity.clamped_to(&ca.validity())?;
        let issued = if keep_key {
            let key_path = self.gateway_key_path();
            let key_pem = read_to_string(&key_path)?;
            ca.issue_gateway_with_key(&names, &key_pem, validity)
                .map_err(|source| bad_key(source, &key_path))?
        } else {
            ca.issue_gateway(&names, validity)?
        };
        self.place_gateway(&issued, !keep_key, true)?;
        Ok(Renewed {
            common_name: names
                .first()
                .map_or(crate::GATEWAY_DEFAULT_CN, String::as_str)
                .to_owned(),
            path: cert_path,
            serial: issued.serial,
            validity,
            old_serial: old.serial,
            old_validity: old.validity,
            kept_key: keep_key,
        })
    }

    /// Renews a device's certificate: a new one for the same id (CN), with a new
    /// serial, `validity` (cut to the CA's), and a new key unless `keep_key` (then it is
    /// signed for the key in `devices/<id>/key.pem`). The device's four files are
    /// replaced at once, as [`Existing::Replace`] does.
    ///
    /// The old certificate is not revoked: it stays valid until it expires, so the
    /// device keeps connecting until it has the new one; revoke it by serial then.
    pub fn renew_device(
        &self,
        ca: &Ca,
        id: &str,
        validity: Validity,
        keep_key: bool,
    ) -> Result<Renewed, DirError> {
        let path = self.device_path(id)?;
        if !exists(&path) {
            return Err(DirError::NoSuchDevice {
                id: id.to_owned(),
                path,
            });
        }
        let old = read_cert_info(&path.join(DEVICE_CERT_PEM))?;
        let validity = validity.clamped_to(&ca.validity())?;
        let issued = if keep_key {
            let key_path = path.join(DEVICE_KEY_PEM);
            let key_pem = read_to_string(&key_path)?;
            ca.issue_device_with_key(id, &key_pem, validity)
                .map_err(|source| bad_key(source, &key_path))?
        } else {
            ca.issue_device(id, validity)?
        };
        let placed = self.place_device(id, &issued, true)?;
        sync_dir(&self.devices_path())?;
        Ok(Renewed {
            common_name: id.to_owned(),
            path: placed.path,
            serial: placed.serial,
            validity,
            old_serial: old.serial,
            old_validity: old.validity,
            kept_key: keep_key,
        })
    }

    /// Issues one device certificate into `devices/<id>/`. The validity is cut to the
    /// CA's. Returns `None` if the device exists and `existing` is [`Existing::Skip`].
    pub fn issue_device(
        &self,
        ca: &Ca,
        id: &str,
        validity: Validity,
        existing: Existing,
    ) -> Result<Option<DeviceIssued>, DirError> {
        let path = self.device_path(id)?;
        if exists(&path) {
            match existing {
                Existing::Refuse => return Err(DirError::Exists(path)),
                Existing::Skip => return Ok(None),
                Existing::Replace => {}
            }
        }
        let validity = validity.clamped_to(&ca.validity())?;
        let devices = self.devices_path();
        fs::create_dir_all(&devices).map_err(io_err("create directory", &devices))?;
        let issued = self.mint_device(ca, id, validity, existing == Existing::Replace)?;
        sync_dir(&devices)?;
        Ok(Some(issued))
    }

    /// Issues a device certificate for each of `ids`, on all cores.
    ///
    /// Everything is checked before anything is minted: every id (identity rule, no
    /// duplicates) and, with [`Existing::Refuse`], that none of the devices exists.
    /// Each device is written atomically; if one fails, the others stop and the error
    /// ([`DirError::Partial`]) says how many were complete: rerun with
    /// [`Existing::Skip`] to finish. `progress(done, total)` is called after each
    /// device, from the worker threads.
    pub fn issue_devices(
        &self,
        ca: &Ca,
        ids: &[String],
        validity: Validity,
        existing: Existing,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<BulkReport, DirError> {
        let mut seen = HashSet::with_capacity(ids.len());
        for id in ids {
            check_id(id)?;
            if !seen.insert(id.as_str()) {
                return Err(DirError::DuplicateId(id.clone()));
            }
        }
        let devices = self.devices_path();
        let present: Vec<&String> = ids.iter().filter(|id| exists(&devices.join(id))).collect();
        let mut report = BulkReport::default();
        let work: Vec<&String> = match (existing, present.first()) {
            (Existing::Refuse, Some(first)) => {
                return Err(DirError::DevicesExist {
                    first: devices.join(first),
                    count: present.len(),
                });
            }
            (Existing::Skip, _) => {
                report.skipped = present.len();
                let present: HashSet<&String> = present.into_iter().collect();
                ids.iter().filter(|id| !present.contains(id)).collect()
            }
            _ => ids.iter().collect(),
        };
        if work.is_empty() {
            return Ok(report);
        }
        let validity = validity.clamped_to(&ca.validity())?;
        fs::create_dir_all(&devices).map_err(io_err("create directory", &devices))?;

        let total = work.len();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(total);
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let first_error: Mutex<Option<DirError>> = Mutex::new(None);
        let replaced: Mutex<Vec<(String, Serial)>> = Mutex::new(Vec::new());
        let replace = existing == Existing::Replace;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let Some(id) = work.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            break;
                        };
                        match self.mint_device(ca, id, validity, replace) {
                            Ok(issued) => {
                                if let Some(old) = issued.replaced {
                                    lock(&replaced).push((issued.id, old));
                                }
                                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                                progress(n, total);
                            }
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                lock(&first_error).get_or_insert(e);
                                break;
                            }
                        }
                    }
                });
            }
        });
        sync_dir(&devices)?;
        let issued = done.load(Ordering::Relaxed);
        if let Some(source) = lock(&first_error).take() {
            return Err(DirError::Partial {
                issued,
                total,
                source: Box::new(source),
            });
        }
        report.issued = issued;
        report.replaced = std::mem::take(&mut *lock(&replaced));
        report.replaced.sort();
        Ok(report)
    }

    /// Mints one device and moves its directory into place (see the module docs).
    fn mint_device(
        &self,
        ca: &Ca,
        id: &str,
        validity: Validity,
        replace: bool,
    ) -> Result<DeviceIssued, DirError> {
        let issued = ca.issue_device(id, validity)?;
        self.place_device(id, &issued, replace)
    }

    /// Writes a device's four files and moves its directory into place (see the
    /// module docs); `replace` swaps out an existing directory.
    fn place_device(
        &self,
        id: &str,
        issued: &Issued,
        replace: bool,
    ) -> Result<DeviceIssued, DirError> {
        let validity = issued.validity;
        let devices = self.devices_path();
        let dest = devices.join(id);
        let tmp = devices.join(temp_name(id, "tmp")?);
        let result = (|| {
            fs::create_dir(&tmp).map_err(io_err("create directory", &tmp))?;
            let files: [(&str, &[u8], u32); 4] = [
                (DEVICE_CERT_PEM, issued.cert_pem.as_bytes(), PUBLIC_MODE),
                (DEVICE_CERT_DER, &issued.cert_der, PUBLIC_MODE),
                (DEVICE_KEY_PEM, issued.key_pem.as_bytes(), KEY_MODE),
                (DEVICE_KEY_DER, &issued.key_sec1_der, KEY_MODE),
            ];
            for (name, bytes, mode) in files {
                write_new_file(&tmp.join(name), bytes, mode)?;
            }
            sync_dir(&tmp)?;
            let replaced = if replace && exists(&dest) {
                Some(swap_dir(&tmp, &dest)?)
            } else {
                place_dir(&tmp, &dest)?;
                None
            };
            Ok(replaced)
        })();
        match result {
            Ok(replaced) => Ok(DeviceIssued {
                id: id.to_owned(),
                path: dest,
                serial: issued.serial.clone(),
                validity,
                replaced: replaced.flatten(),
            }),
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// The CRL in `crl.pem`, checked to be signed by `ca`; `None` if there is none.
    pub fn read_crl(&self, ca: &Ca) -> Result<Option<Crl>, DirError> {
        let path = self.crl_path();
        if !exists(&path) {
            return Ok(None);
        }
        let crl = Crl::from_pem(&read_to_string(&path)?)
            .and_then(|crl| ca.verify_crl(&crl).map(|()| crl))
            .map_err(|source| DirError::BadFile {
                path: path.clone(),
                source,
            })?;
        Ok(Some(crl))
    }

    /// Revokes the certificate in `devices/<id>/cert.pem`: adds its serial to
    /// `crl.pem` (see [`PkiDir::revoke_serial`]).
    pub fn revoke_device(
        &self,
        ca: &Ca,
        id: &str,
        crl_validity: Validity,
    ) -> Result<Revocation, DirError> {
        let path = self.device_path(id)?;
        if !exists(&path) {
            return Err(DirError::NoSuchDevice {
                id: id.to_owned(),
                path,
            });
        }
        let cert_path = path.join(DEVICE_CERT_PEM);
        let pem = read_to_string(&cert_path)?;
        let bad = |source| DirError::BadFile {
            path: cert_path.clone(),
            source,
        };
        let der = crate::inspect::cert_der_from_pem(&pem).map_err(bad)?;
        ca.verify_issued(&der).map_err(bad)?;
        let info = CertInfo::from_der(&der).map_err(bad)?;
        self.revoke_serial(ca, info.serial, crl_validity)
    }

    /// Adds `serial` to the CA-signed `crl.pem`, keeping every earlier revocation and
    /// incrementing the CRL number (a missing `crl.pem` counts as number 0, empty).
    /// Revoking a listed serial again changes nothing.
    pub fn revoke_serial(
        &self,
        ca: &Ca,
        serial: Serial,
        crl_validity: Validity,
    ) -> Result<Revocation, DirError> {
        self.check_ca_cert()?;
        let current = self.read_crl(ca)?;
        if let Some(crl) = current.as_ref().filter(|crl| crl.contains(&serial)) {
            return Ok(Revocation {
                serial,
                newly_revoked: false,
                crl_number: crl.number,
                revoked_count: crl.revoked.len(),
            });
        }
        let (mut entries, number) = current.map_or((Vec::new(), 0), |c| (c.revoked, c.number));
        entries.push(RevokedEntry::now(serial.clone()));
        let crl = self.write_crl(ca, &entries, number, crl_validity)?;
        Ok(Revocation {
            serial,
            newly_revoked: true,
            crl_number: crl.number,
            revoked_count: crl.revoked.len(),
        })
    }

    /// Re-signs `crl.pem` with a fresh validity period and the next CRL number, keeping
    /// its revocations (or writes an empty one if there is none).
    pub fn refresh_crl(&self, ca: &Ca, crl_validity: Validity) -> Result<Crl, DirError> {
        self.check_ca_cert()?;
        let (entries, number) = self
            .read_crl(ca)?
            .map_or((Vec::new(), 0), |c| (c.revoked, c.number));
        self.write_crl(ca, &entries, number, crl_validity)
    }

    fn write_crl(
        &self,
        ca: &Ca,
        entries: &[RevokedEntry],
        previous_number: u64,
        validity: Validity,
    ) -> Result<Crl, DirError> {
        let number = previous_number
            .checked_add(1)
            .ok_or(Error::CrlNumberTooLarge)?;
        let crl = ca.crl(entries, number, validity)?;
        let path = self.crl_path();
        Staged::new(&path, crl.pem.as_bytes(), PUBLIC_MODE)?.commit(true)?;
        sync_dir(&self.root)?;
        Ok(crl)
    }

    /// Every device in `devices/`, sorted by id, with its revocation and expiry status.
    ///
    /// Needs only `ca.pem` (not the CA key). Entries of `devices/` that are not device
    /// ids (e.g. leftover temporary directories) are skipped.
    pub fn list_devices(&self) -> Result<Vec<DeviceRecord>, DirError> {
        Ok(self.list()?.devices)
    }

    /// [`PkiDir::list_devices`], and the CRL they were checked against (its next
    /// update is when the gateway needs a fresh one). Needs only `ca.pem`.
    pub fn list(&self) -> Result<Listing, DirError> {
        self.check_ca_cert()?;
        let ca_path = self.ca_cert_path();
        let ca_der =
            crate::inspect::cert_der_from_pem(&read_to_string(&ca_path)?).map_err(|source| {
                DirError::BadFile {
                    path: ca_path.clone(),
                    source,
                }
            })?;
        let crl_path = self.crl_path();
        let crl = if exists(&crl_path) {
            let crl = Crl::from_pem(&read_to_string(&crl_path)?)
                .and_then(|crl| verify_crl_signed_by(&crl.der, &ca_der).map(|()| crl))
                .map_err(|source| DirError::BadFile {
                    path: crl_path.clone(),
                    source,
                })?;
            Some(crl)
        } else {
            None
        };
        let revoked: HashSet<&Serial> = crl
            .iter()
            .flat_map(|crl| crl.revoked.iter().map(|e| &e.serial))
            .collect();
        let now = OffsetDateTime::now_utc();
        let mut records = Vec::new();
        for id in self.device_dirs()? {
            let path = self.devices_path().join(&id).join(DEVICE_CERT_PEM);
            let bad = |source| DirError::BadFile {
                path: path.clone(),
                source,
            };
            let der = crate::inspect::cert_der_from_pem(&read_to_string(&path)?).map_err(bad)?;
            let info = CertInfo::from_der(&der).map_err(bad)?;
            records.push(DeviceRecord {
                revoked: revoked.contains(&info.serial),
                expired: info.validity.not_after() < now,
                signed_by_ca: verify_signed_by(&der, &ca_der).is_ok(),
                common_name: info.common_name,
                serial: info.serial,
                validity: info.validity,
                id,
            });
        }
        Ok(Listing {
            devices: records,
            crl,
        })
    }

    /// Names of the device directories, sorted; skips anything that is not a device id.
    fn device_dirs(&self) -> Result<Vec<String>, DirError> {
        let devices = self.devices_path();
        let entries = match fs::read_dir(&devices) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read directory", &devices)(e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("read directory", &devices))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && check_id(&name).is_ok() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }
}

fn check_id(id: &str) -> Result<(), DirError> {
    // The identity rule refuses "." and ".." too, so an id is always one path
    // component naming a device directory.
    Ok(crate::ca::check_device_id(id)?)
}

/// The certificate in the PEM file at `path`.
fn read_cert_info(path: &Path) -> Result<CertInfo, DirError> {
    CertInfo::from_pem(&read_to_string(path)?).map_err(|source| DirError::BadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// A key file that would not do is the file's fault; anything else is the request's.
fn bad_key(source: Error, key_path: &Path) -> DirError {
    match source {
        Error::UnsupportedKey { .. } => DirError::BadFile {
            path: key_path.to_path_buf(),
            source,
        },
        other => DirError::Pki(other),
    }
}

/// The `names` that make [`Ca::issue_gateway`] issue a certificate with `old`'s subject
/// CN and names: the CN first (it becomes the CN again) unless it is the default one,
/// then the names beyond the defaults every gateway certificate carries.
fn gateway_names_of(old: &CertInfo) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut add = |name: &str| {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.to_owned());
        }
    };
    if let Some(cn) = old
        .common_name
        .as_deref()
        .filter(|cn| *cn != crate::GATEWAY_DEFAULT_CN)
    {
        add(cn);
    }
    for san in &old.subject_alt_names {
        if !crate::GATEWAY_DEFAULT_NAMES
            .iter()
            .any(|d| d.eq_ignore_ascii_case(san))
        {
            add(san);
        }
    }
    names
}

/// Creates `path` with mode 0700 if it does not exist (and says whether it did);
/// an existing one is set to 0700, as it holds the CA key.
fn create_private_dir(path: &Path) -> Result<bool, DirError> {
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(PRIVATE_DIR_MODE);
    }
    match builder.create(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                    .map_err(io_err("set the mode of", path))?;
            }
            Ok(false)
        }
        Err(e) => Err(io_err("create directory", path)(e)),
    }
}

/// Whether anything (file, directory, dangling symlink) is at `path`.
fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A worker that panicked mid-push leaves a usable Vec/Option: ignore the poison.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_to_string(path: &Path) -> Result<String, DirError> {
    fs::read_to_string(path).map_err(io_err("read", path))
}

/// `.<name>~<what>~<random hex>`: hidden, and never a device id (`~` is not allowed).
fn temp_name(name: &str, what: &str) -> Result<String, DirError> {
    let mut random = [0u8; 6];
    getrandom::fill(&mut random).map_err(Error::Random)?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(".{name}~{what}~{hex}"))
}

/// Creates `path` (which must not exist) with `mode`, writes `bytes` and syncs it.
fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DirError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Set at creation: the file is never readable by others, not even briefly.
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io_err("create", path))?;
    file.write_all(bytes).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

fn sync_dir(path: &Path) -> Result<(), DirError> {
    #[cfg(unix)]
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err("sync", path))?;
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Renames the directory `tmp` to `dest`, which must not exist (or be an empty
/// directory, which rename(2) replaces).
fn place_dir(tmp: &Path, dest: &Path) -> Result<(), DirError> {
    fs::rename(tmp, dest).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => {
            DirError::Exists(dest.to_path_buf())
        }
        _ => io_err("rename into place", dest)(e),
    })
}

/// Replaces the directory `dest` with `tmp`; returns the old certificate's serial.
///
/// `dest` is moved aside first, so for a moment neither exists; if placing `tmp` fails,
/// the old directory is moved back.
fn swap_dir(tmp: &Path, dest: &Path) -> Result<Option<Serial>, DirError> {
    let old_serial = fs::read_to_string(dest.join(DEVICE_CERT_PEM))
        .ok()
        .and_then(|pem| CertInfo::from_pem(&pem).ok())
        .map(|info| info.serial);
    let parent = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("device");
    let aside = parent.join(temp_name(name, "old")?);
    fs::rename(dest, &aside).map_err(io_err("move aside", dest))?;
    if let Err(e) = place_dir(tmp, dest) {
        let _ = fs::rename(&aside, dest);
        return Err(e);
    }
    fs::remove_dir_all(&aside).map_err(io_err("remove", &aside))?;
    Ok(old_serial)
}

/// A file written under a temporary name next to its destination, waiting to be put
/// in place. Dropping it removes the temporary file.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
}

impl Staged {
    fn new(dest: &Path, bytes: &[u8], mode: u32) -> Result<Self, DirError> {
        let parent = dest.parent().unwrap_or(Path::new("."));
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = parent.join(temp_name(name, "tmp")?);
        let staged = Self {
            tmp,
            dest: dest.to_path_buf(),
        };
        write_new_file(&staged.tmp, bytes, mode)?;
        Ok(staged)
    }

    /// Moves the file into place: `replace` renames over an existing file; otherwise
    /// a hard link refuses atomically if the destination exists (on file systems
    /// without hard links: check, then rename).
    fn commit(self, replace: bool) -> Result<(), DirError> {
        if replace {
            return fs::rename(&self.tmp, &self.dest)
                .map_err(io_err("rename into place", &self.dest));
        }
        match fs::hard_link(&self.tmp, &self.dest) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(DirError::Exists(self.dest.clone()))
            }
            Err(_) if exists(&self.dest) => Err(DirError::Exists(self.dest.clone())),
            Err(_) => {
                fs::rename(&self.tmp, &self.dest).map_err(io_err("rename into place", &self.dest))
            }
        }
        // Drop removes the temporary name (a no-op after a rename).
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (tempfile::TempDir, PkiDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PkiDir::new(tmp.path().join("pki"));
        (tmp, dir)
    }

    fn init(dir: &PkiDir) -> Ca {
        dir.init(&InitOptions::default()).unwrap().ca
    }

    /// Every entry under `path`, relative, sorted.
    fn tree(path: &Path) -> Vec<String> {
        fn walk(base: &Path, path: &Path, out: &mut Vec<String>) {
            for entry in fs::read_dir(path).unwrap() {
                let p = entry.unwrap().path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if p.is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        if path.exists() {
            walk(path, path, &mut out);
        }
        out.sort();
        out
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_the_layout() {
        let (_tmp, dir) = fresh();
        let made = dir
            .init(&InitOptions {
                gateway_names: vec!["gw.local".into()],
                ..InitOptions::default()
            })
            .unwrap();
        assert_eq!(
            tree(dir.root()),
            [
                "ca",
                "ca.pem",
                "ca/ca.key.pem",
                "crl.pem",
                "gateway.key.pem",
                "gateway.pem"
            ]
        );
        assert_eq!(made.stale_devices, 0);
        let ca = dir.load_ca().unwrap();
        assert_eq!(ca.cert_der(), made.ca.cert_der());
        let crl = dir.read_crl(&ca).unwrap().unwrap();
        assert_eq!(crl.number, 1);
        assert!(crl.revoked.is_empty());
        let gw = CertInfo::from_pem(&fs::read_to_string(dir.gateway_cert_path()).unwrap()).unwrap();
        assert_eq!(gw.common_name.as_deref(), Some("gw.local"));
        assert_eq!(gw.serial, made.gateway_serial);
        #[cfg(unix)]
        {
            assert_eq!(mode(&dir.ca_key_path()), 0o600);
            assert_eq!(mode(&dir.ca_private_dir()), 0o700);
            assert_eq!(mode(&dir.gateway_key_path()), 0o600);
        }
    }

    #[test]
    fn init_refuses_an_existing_ca_and_leaves_it_alone() {
        let (_tmp, dir) = fresh();
        init(&dir);
        let before = fs::read(dir.ca_key_path()).unwrap();
        let err = dir.init(&InitOptions::default()).unwrap_err();
        assert!(matches!(err, DirError::CaExists { .. }), "{err}");
        assert_eq!(fs::read(dir.ca_key_path()).unwrap(), before);
        assert_eq!(tree(dir.root()).len(), 6, "no temporary files left");

        let made = dir
            .init(&InitOptions {
                force: true,
                ..InitOptions::default()
            })
            .unwrap();
        assert_ne!(fs::read(dir.ca_key_path()).unwrap(), before);
        assert_eq!(made.stale_devices, 0);
        assert_eq!(tree(dir.root()).len(), 6);
    }

    /// A directory made before `DIR/ca/` existed keeps working where it is.
    #[test]
    fn the_legacy_ca_key_place_is_still_read() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        fs::rename(dir.ca_key_path(), dir.legacy_ca_key_path()).unwrap();
        fs::remove_dir(dir.ca_private_dir()).unwrap();
        assert_eq!(dir.find_ca_key(), Some(dir.legacy_ca_key_path()));
        let loaded = dir.load_ca().unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        dir.issue_device(&loaded, "a", Validity::days(1), Existing::Refuse)
            .unwrap();
        // It is a CA: init refuses, and --force leaves one key, in the new place.
        assert!(matches!(
            dir.init(&InitOptions::default()),
            Err(DirError::CaExists { .. })
        ));
        let ca_pem = fs::read(dir.ca_cert_path()).unwrap();
        fs::remove_file(dir.ca_cert_path()).unwrap();
        let err = dir.init(&InitOptions::default()).unwrap_err();
        assert!(
            matches!(&err, DirError::CaExists { existing, .. } if existing == &dir.legacy_ca_key_path()),
            "{err}"
        );
        fs::write(dir.ca_cert_path(), ca_pem).unwrap();
        dir.init(&InitOptions {
            force: true,
            ..InitOptions::default()
        })
        .unwrap();
        assert!(!dir.legacy_ca_key_path().exists());
        assert_eq!(dir.find_ca_key(), Some(dir.ca_key_path()));
        dir.load_ca().unwrap();
    }

    /// With `DIR/ca/` moved offline, reading works; signing needs the key's new place.
    #[test]
    fn the_ca_key_can_live_elsewhere() {
        let (tmp, dir) = fresh();
        let ca = init(&dir);
        dir.issue_device(&ca, "a", Validity::days(1), Existing::Refuse)
            .unwrap();
        let offline = tmp.path().join("usb-stick");
        fs::rename(dir.ca_private_dir(), &offline).unwrap();

        assert_eq!(dir.list_devices().unwrap().len(), 1);
        let err = dir.load_ca().unwrap_err();
        assert!(
            matches!(&err, DirError::NoCaKey { missing, .. } if missing == &dir.ca_key_path()),
            "{err}"
        );
        let loaded = dir.load_ca_with_key(&offline.join(CA_KEY_FILE)).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        dir.revoke_device(&loaded, "a", Validity::days(1)).unwrap();
        assert!(dir.list_devices().unwrap()[0].revoked);

        // Another CA's key is refused, naming the key file.
        let (_tmp2, other) = fresh();
        init(&other);
        let err = dir.load_ca_with_key(&other.ca_key_path()).unwrap_err();
        assert!(
            matches!(&err, DirError::BadFile { path, source: Error::KeyMismatch } if path == &other.ca_key_path()),
            "{err}"
        );
    }

    #[test]
    fn renew_device_keeps_the_id_and_changes_serial_and_key() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        let first = dir
            .issue_device(&ca, "a", Validity::days(10), Existing::Refuse)
            .unwrap()
            .unwrap();
        let key_before = fs::read(dir.devices_path().join("a/key.der")).unwrap();

        let renewed = dir
            .renew_device(&ca, "a", Validity::days(20), false)
            .unwrap();
        assert_eq!(renewed.common_name, "a");
        assert_eq!(renewed.old_serial, first.serial);
        assert_eq!(renewed.old_validity, first.validity);
        assert_ne!(renewed.serial, first.serial);
        assert!(!renewed.kept_key);
        let key_after = fs::read(dir.devices_path().join("a/key.der")).unwrap();
        assert_ne!(key_after, key_before, "a new key");
        let records = dir.list_devices().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].serial, renewed.serial);
        assert_eq!(records[0].common_name.as_deref(), Some("a"));
        assert!(records[0].signed_by_ca && !records[0].revoked);
        assert_eq!(tree(&dir.devices_path()).len(), 5, "no leftovers");

        let kept = dir
            .renew_device(&ca, "a", Validity::days(20), true)
            .unwrap();
        assert!(kept.kept_key);
        assert_ne!(kept.serial, renewed.serial);
        assert_eq!(
            fs::read(dir.devices_path().join("a/key.der")).unwrap(),
            key_after
        );
        let cert = fs::read(dir.devices_path().join("a/cert.der")).unwrap();
        ca.verify_issued(&cert).unwrap();

        assert!(matches!(
            dir.renew_device(&ca, "nobody", Validity::days(1), false),
            Err(DirError::NoSuchDevice { .. })
        ));
        fs::write(dir.devices_path().join("a/key.pem"), "garbage").unwrap();
        assert!(matches!(
            dir.renew_device(&ca, "a", Validity::days(1), true),
            Err(DirError::BadFile {
                source: Error::UnsupportedKey { .. },
                ..
            })
        ));
    }

    #[test]
    fn renew_gateway_keeps_its_names() {
        let (_tmp, dir) = fresh();
        let made = dir
            .init(&InitOptions {
                gateway_names: vec!["gw.example".into(), "10.0.0.7".into()],
                ..InitOptions::default()
            })
            .unwrap();
        let info = |dir: &PkiDir| {
            CertInfo::from_pem(&fs::read_to_string(dir.gateway_cert_path()).unwrap()).unwrap()
        };
        let before = info(&dir);
        let key_before = fs::read(dir.gateway_key_path()).unwrap();
        let renewed = dir
            .renew_gateway(&made.ca, Validity::days(30), false)
            .unwrap();
        let after = info(&dir);
        assert_eq!(renewed.common_name, "gw.example");
        assert_eq!(renewed.old_serial, made.gateway_serial);
        assert_eq!(after.serial, renewed.serial);
        assert_ne!(after.serial, before.serial);
        assert_eq!(after.common_name, before.common_name);
        assert_eq!(after.subject_alt_names, before.subject_alt_names);
        assert_ne!(fs::read(dir.gateway_key_path()).unwrap(), key_before);

        let key_now = fs::read(dir.gateway_key_path()).unwrap();
        dir.renew_gateway(&made.ca, Validity::days(30), true)
            .unwrap();
        assert_eq!(fs::read(dir.gateway_key_path()).unwrap(), key_now);
        assert_eq!(info(&dir).subject_alt_names, before.subject_alt_names);

        // The default gateway (no names) stays the default one.
        let (_tmp2, plain) = fresh();
        let ca = init(&plain);
        plain.renew_gateway(&ca, Validity::days(1), false).unwrap();
        let plain_info = info(&plain);
        assert_eq!(plain_info.common_name.as_deref(), Some("gateway"));
        assert_eq!(
            plain_info.subject_alt_names,
            ["localhost", "127.0.0.1", "::1"]
        );
    }

    #[test]
    fn refresh_moves_the_next_update_and_keeps_the_revocations() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        for id in ["a", "b"] {
            dir.issue_device(&ca, id, Validity::days(1), Existing::Refuse)
                .unwrap();
            dir.revoke_device(&ca, id, Validity::days(1)).unwrap();
        }
        let before = dir.list().unwrap().crl.unwrap();
        let refreshed = dir.refresh_crl(&ca, Validity::days(30)).unwrap();
        let after = dir.list().unwrap().crl.unwrap();
        assert_eq!(after, refreshed);
        assert_eq!(after.number, before.number + 1);
        assert_eq!(after.revoked, before.revoked, "same serials and dates");
        let (b, a) = (before.next_update.unwrap(), after.next_update.unwrap());
        assert!(a - b >= time::Duration::days(29), "{b} -> {a}");
    }

    #[test]
    fn init_with_a_bad_gateway_name_writes_nothing() {
        let (_tmp, dir) = fresh();
        let err = dir
            .init(&InitOptions {
                gateway_names: vec!["bad_name".into()],
                ..InitOptions::default()
            })
            .unwrap_err();
        assert!(
            matches!(err, DirError::Pki(Error::InvalidName { .. })),
            "{err}"
        );
        assert!(!dir.root().exists());
    }

    #[test]
    fn init_refuses_when_only_one_file_exists() {
        let (_tmp, dir) = fresh();
        fs::create_dir_all(dir.root()).unwrap();
        fs::write(dir.crl_path(), "x").unwrap();
        assert!(matches!(
            dir.init(&InitOptions::default()),
            Err(DirError::CaExists { .. })
        ));
        assert_eq!(tree(dir.root()), ["crl.pem"]);
    }

    #[test]
    fn commands_need_an_initialized_dir() {
        let (_tmp, dir) = fresh();
        assert!(matches!(dir.load_ca(), Err(DirError::Missing(_))));
        assert!(matches!(dir.list_devices(), Err(DirError::Missing(_))));
        assert!(!dir.root().exists());
        fs::create_dir_all(dir.root()).unwrap();
        assert!(matches!(dir.load_ca(), Err(DirError::NoCa { .. })));
    }

    #[test]
    fn device_layout_and_modes() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        let issued = dir
            .issue_device(&ca, "sensor-01", Validity::days(10), Existing::Refuse)
            .unwrap()
            .unwrap();
        assert_eq!(issued.replaced, None);
        let dev = dir.device_path("sensor-01").unwrap();
        assert_eq!(issued.path, dev);
        assert_eq!(
            tree(&dir.devices_path()),
            [
                "sensor-01",
                "sensor-01/cert.der",
                "sensor-01/cert.pem",
                "sensor-01/key.der",
                "sensor-01/key.pem"
            ]
        );
        let info = CertInfo::from_pem(&fs::read_to_string(dev.join("cert.pem")).unwrap()).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("sensor-01"));
        assert_eq!(info.serial, issued.serial);
        assert_eq!(
            CertInfo::from_der(&fs::read(dev.join("cert.der")).unwrap()).unwrap(),
            info
        );
        #[cfg(unix)]
        {
            assert_eq!(mode(&dev.join("key.pem")), 0o600);
            assert_eq!(mode(&dev.join("key.der")), 0o600);
        }
    }

    #[test]
    fn device_refuses_existing_and_bad_ids() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        dir.issue_device(&ca, "a", Validity::days(1), Existing::Refuse)
            .unwrap();
        let before = fs::read(dir.devices_path().join("a/key.der")).unwrap();
        assert!(matches!(
            dir.issue_device(&ca, "a", Validity::days(1), Existing::Refuse),
            Err(DirError::Exists(_))
        ));
        assert!(
            dir.issue_device(&ca, "a", Validity::days(1), Existing::Skip)
                .unwrap()
                .is_none()
        );
        assert_eq!(
            fs::read(dir.devices_path().join("a/key.der")).unwrap(),
            before
        );
        for bad in ["", "a b", "../x", "x/y", ".", ".."] {
            let err = dir
                .issue_device(&ca, bad, Validity::days(1), Existing::Refuse)
                .unwrap_err();
            assert!(
                matches!(err, DirError::Pki(Error::InvalidDeviceId { .. })),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(tree(&dir.devices_path()).len(), 5, "only device a");
    }

    #[test]
    fn device_replace_reports_the_old_serial() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        let first = dir
            .issue_device(&ca, "a", Validity::days(1), Existing::Refuse)
            .unwrap()
            .unwrap();
        let second = dir
            .issue_device(&ca, "a", Validity::days(1), Existing::Replace)
            .unwrap()
            .unwrap();
        assert_eq!(second.replaced, Some(first.serial));
        assert_eq!(tree(&dir.devices_path()).len(), 5, "old directory removed");
        let records = dir.list_devices().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].serial, second.serial);
    }

    #[test]
    fn bulk_issue_skip_refuse_replace() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        let ids = sequential_ids("sim-", 0, 12).unwrap();
        let calls = AtomicUsize::new(0);
        let progress = |done: usize, total: usize| {
            assert!(done <= total);
            calls.fetch_add(1, Ordering::Relaxed);
        };
        let report = dir
            .issue_devices(
                &ca,
                &ids[..5],
                Validity::days(1),
                Existing::Refuse,
                &progress,
            )
            .unwrap();
        assert_eq!((report.issued, report.skipped), (5, 0));
        assert_eq!(calls.load(Ordering::Relaxed), 5);

        let err = dir
            .issue_devices(&ca, &ids, Validity::days(1), Existing::Refuse, &progress)
            .unwrap_err();
        assert!(
            matches!(err, DirError::DevicesExist { count: 5, .. }),
            "{err}"
        );
        assert_eq!(dir.list_devices().unwrap().len(), 5, "nothing written");

        let report = dir
            .issue_devices(&ca, &ids, Validity::days(1), Existing::Skip, &progress)
            .unwrap();
        assert_eq!((report.issued, report.skipped), (7, 5));

        let report = dir
            .issue_devices(
                &ca,
                &ids[..2],
                Validity::days(1),
                Existing::Replace,
                &progress,
            )
            .unwrap();
        assert_eq!(report.issued, 2);
        assert_eq!(report.replaced.len(), 2);

        let records = dir.list_devices().unwrap();
        let listed: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            records
                .iter()
                .all(|r| r.signed_by_ca && !r.revoked && !r.expired)
        );
        assert_eq!(
            tree(&dir.devices_path()).len(),
            12 * 5,
            "no temporary entries"
        );
    }

    #[test]
    fn bulk_refuses_bad_and_duplicate_ids_before_writing() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        let ids = vec!["ok".to_owned(), "bad id".to_owned()];
        assert!(
            dir.issue_devices(&ca, &ids, Validity::days(1), Existing::Refuse, &|_, _| {})
                .is_err()
        );
        let ids = vec!["ok".to_owned(), "ok".to_owned()];
        assert!(matches!(
            dir.issue_devices(&ca, &ids, Validity::days(1), Existing::Refuse, &|_, _| {}),
            Err(DirError::DuplicateId(_))
        ));
        assert!(!dir.devices_path().exists());
    }

    #[test]
    fn sequential_id_naming() {
        assert_eq!(
            sequential_ids("sim-", 0, 3).unwrap(),
            ["sim-0000", "sim-0001", "sim-0002"]
        );
        let many = sequential_ids("d", 0, 1000).unwrap();
        assert_eq!(many.first().unwrap(), "d0000");
        assert_eq!(many.last().unwrap(), "d0999");
        let wide = sequential_ids("", 9990, 20).unwrap();
        assert_eq!(wide.first().unwrap(), "09990");
        assert_eq!(wide.last().unwrap(), "10009");
        assert!(sequential_ids("", 0, 0).unwrap().is_empty());
        assert!(sequential_ids("bad prefix", 0, 1).is_err());
        // 60 + 4 digits = 64 bytes, the limit; a fifth digit is one too many.
        assert!(sequential_ids(&"x".repeat(60), 0, 10_000).is_ok());
        assert!(sequential_ids(&"x".repeat(60), 0, 10_001).is_err());
        assert!(sequential_ids("x", u64::MAX, 2).is_err());
    }

    #[test]
    fn revoke_keeps_earlier_revocations() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        let a = dir
            .issue_device(&ca, "a", Validity::days(1), Existing::Refuse)
            .unwrap()
            .unwrap();
        let b = dir
            .issue_device(&ca, "b", Validity::days(1), Existing::Refuse)
            .unwrap()
            .unwrap();
        let r = dir.revoke_device(&ca, "a", Validity::days(7)).unwrap();
        assert!(r.newly_revoked);
        assert_eq!((r.crl_number, r.revoked_count), (2, 1));
        let again = dir.revoke_device(&ca, "a", Validity::days(7)).unwrap();
        assert!(!again.newly_revoked);
        assert_eq!(again.crl_number, 2);
        let r = dir.revoke_device(&ca, "b", Validity::days(7)).unwrap();
        assert_eq!((r.crl_number, r.revoked_count), (3, 2));
        let crl = dir.read_crl(&ca).unwrap().unwrap();
        assert!(crl.contains(&a.serial) && crl.contains(&b.serial));
        let records = dir.list_devices().unwrap();
        assert!(records.iter().all(|r| r.revoked));

        let refreshed = dir.refresh_crl(&ca, Validity::days(7)).unwrap();
        assert_eq!(refreshed.number, 4);
        assert_eq!(refreshed.revoked.len(), 2);

        assert!(matches!(
            dir.revoke_device(&ca, "nobody", Validity::days(1)),
            Err(DirError::NoSuchDevice { .. })
        ));
    }

    #[test]
    fn revoke_without_a_crl_starts_one() {
        let (_tmp, dir) = fresh();
        let ca = init(&dir);
        fs::remove_file(dir.crl_path()).unwrap();
        let serial = Serial::from_hex("0102").unwrap();
        let r = dir.revoke_serial(&ca, serial, Validity::days(1)).unwrap();
        assert_eq!((r.crl_number, r.revoked_count), (1, 1));
    }

    #[test]
    fn foreign_crl_and_certificates_are_refused_after_a_new_ca() {
        let (_tmp, dir) = fresh();
        let old = init(&dir);
        dir.issue_device(&old, "a", Validity::days(1), Existing::Refuse)
            .unwrap();
        let old_crl = fs::read(dir.crl_path()).unwrap();
        let made = dir
            .init(&InitOptions {
                force: true,
                ..InitOptions::default()
            })
            .unwrap();
        assert_eq!(made.stale_devices, 1);
        let new = dir.load_ca().unwrap();
        let records = dir.list_devices().unwrap();
        assert!(!records[0].signed_by_ca);
        // Revoking a certificate another CA signed is refused.
        assert!(matches!(
            dir.revoke_device(&new, "a", Validity::days(1)),
            Err(DirError::BadFile {
                source: Error::NotSignedByCa { .. },
                ..
            })
        ));
        // So is extending a CRL another CA signed.
        fs::write(dir.crl_path(), old_crl).unwrap();
        assert!(matches!(
            dir.read_crl(&new),
            Err(DirError::BadFile {
                source: Error::NotSignedByCa { .. },
                ..
            })
        ));
    }

    #[test]
    fn validity_is_cut_to_the_ca() {
        let (_tmp, dir) = fresh();
        let ca = dir
            .init(&InitOptions {
                ca_validity: Validity::days(10),
                ..InitOptions::default()
            })
            .unwrap()
            .ca;
        let d = dir
            .issue_device(&ca, "a", Validity::days(100), Existing::Refuse)
            .unwrap()
            .unwrap();
        assert_eq!(d.validity.not_after(), ca.validity().not_after());
    }
}
