//! TLS for the device listener: mutual TLS with rustls, identity from the client
//! certificate, reloadable trust material (PROTOCOL.md §2).
//!
//! ```text
//!  ca.pem ─┐
//!  crl.pem ─┼─► WebPkiClientVerifier ─┐
//!           │                        ├─► ServerConfig ─► TlsMaterial (swapped on reload)
//!  gateway.pem + key ────────────────┘         │
//!                                               └─► revoked serials (checked again after
//!                                                   every handshake, and against live
//!                                                   sessions after a reload)
//! ```

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use device_client::proto::DeviceId;
use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::FromDer;

/// Where the trust material lives, and how to build the TLS configuration.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM bundle of the CA(s) that issue device certificates.
    pub ca: PathBuf,
    /// PEM chain of the gateway's own certificate.
    pub cert: PathBuf,
    /// PEM private key of the gateway's certificate.
    pub key: PathBuf,
    /// PEM CRL(s) from the CA; optional.
    pub crl: Option<PathBuf>,
    /// Refuse TLS 1.2.
    pub tls13_only: bool,
    /// Refuse every device while the CRL is past its next-update date.
    pub refuse_stale_crl: bool,
    /// Largest TLS record the gateway sends, header included (rustls
    /// `max_fragment_size`), so small devices can use a small TLS receive buffer.
    pub max_fragment_size: Option<usize>,
}

/// Why the TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsLoadError {
    /// A file could not be read or parsed as PEM.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// A file held no item of the expected kind.
    #[error("{path}: no {what} found in this PEM file")]
    Empty {
        /// The file.
        path: PathBuf,
        /// What was expected.
        what: &'static str,
    },
    /// The CA bundle or CRL was refused by the verifier.
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The certificate and key were refused by rustls.
    #[error("gateway certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
    /// A CRL could not be parsed.
    #[error("{path}: not a valid CRL: {reason}")]
    Crl {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
}

/// One generation of TLS configuration: what a handshake uses, and the revoked serials.
pub struct TlsMaterial {
    /// The rustls configuration for new connections.
    pub config: Arc<ServerConfig>,
    /// Serial numbers (big-endian bytes, as in the certificate) revoked by the CRL.
    pub revoked: HashSet<Vec<u8>>,
    /// The earliest next-update date of the CRLs, seconds since the Unix epoch (`None`:
    /// no CRL, or none that names one).
    pub crl_next_update: Option<i64>,
    /// Expiry of the gateway's own certificate, seconds since the Unix epoch.
    pub gateway_not_after: Option<i64>,
    /// Whether a stale CRL refuses every device (`refuse_stale_crl`).
    refuse_stale_crl: bool,
}

impl TlsMaterial {
    /// Loads everything from the files named in `settings`.
    pub fn load(settings: &TlsSettings) -> Result<Self, TlsLoadError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let mut roots = RootCertStore::empty();
        let cas = read_all::<CertificateDer<'static>>(&settings.ca, "CERTIFICATE")?;
        for ca in cas {
            roots.add(ca)?;
        }

        let (crls, revoked, crl_next_update) = match &settings.crl {
            Some(path) => {
                let crls = read_all::<CertificateRevocationListDer<'static>>(path, "X509 CRL")?;
                let (revoked, next_update) = read_crls(path, &crls)?;
                (crls, revoked, next_update)
            }
            None => (Vec::new(), HashSet::new(), None),
        };

        let mut builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                // A device certificate is a leaf issued directly by the CA.
                .only_check_end_entity_revocation();
        if settings.refuse_stale_crl {
            builder = builder.enforce_revocation_expiration();
        }
        let webpki = builder.build()?;
        let verifier = Arc::new(IdentityVerifier { inner: webpki });

        let chain = read_all::<CertificateDer<'static>>(&settings.cert, "CERTIFICATE")?;
        let gateway_not_after = chain.first().and_then(|c| {
            let (_, parsed) = x509_parser::parse_x509_certificate(c).ok()?;
            Some(parsed.validity().not_after.timestamp())
        });
        let key =
            PrivateKeyDer::from_pem_file(&settings.key).map_err(|source| TlsLoadError::Pem {
                path: settings.key.clone(),
                source,
            })?;

        let versions: &[&'static rustls::SupportedProtocolVersion] = if settings.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.max_fragment_size = settings.max_fragment_size;
        // Stateless TLS 1.3 tickets make a reconnect cheap and cost the gateway no
        // memory (TLS 1.2 devices resume by session id instead, from rustls's cache of
        // 256 sessions per configuration). A resumed session skips the verifier, so
        // `identify` checks expiry and the revoked set again; and a reload builds a new
        // configuration (a new ticketer, an empty cache), so no session resumed before
        // a revocation outlives it.
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        config.send_tls13_tickets = 1;
        Ok(Self {
            config: Arc::new(config),
            revoked,
            crl_next_update,
            gateway_not_after,
            refuse_stale_crl: settings.refuse_stale_crl,
        })
    }

    /// Whether the CRL is past its next-update date at `now` (seconds since the epoch):
    /// the CA should have published a newer one (`certs crl` re-signs it).
    pub fn crl_stale(&self, now: i64) -> bool {
        self.crl_next_update.is_some_and(|t| t < now)
    }
}

/// The WebPKI verifier plus the identity rule: a certificate whose CN is not a valid
/// device id fails the handshake itself, so the device gets a TLS alert
/// (`access_denied`) instead of a silent close.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let checked = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|verified| {
                common_name(end_entity).map_err(|_| {
                    rustls::Error::InvalidCertificate(
                        CertificateError::ApplicationVerificationFailure,
                    )
                })?;
                Ok(verified)
            });
        if checked.is_err() {
            // For the refusal record: which certificate was refused (`Observed`).
            let summary = CertSummary::of(end_entity);
            REFUSED_CERT.with_borrow_mut(|slot| *slot = summary);
        }
        checked
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who a refused certificate claimed to be, for the operator's list of refusals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject, as a distinguished name (at most 256 characters).
    pub subject: String,
    /// The serial number, hex.
    pub serial: String,
}

impl CertSummary {
    /// Reads the subject and serial; `None` if the certificate does not parse.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
        // The peer chose these bytes: bounded, and without control characters (a
        // newline would forge a log line), before they reach logs and the API.
        let subject: String = parsed
            .subject()
            .to_string()
            .chars()
            .take(256)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        Some(Self {
            subject,
            serial: hex::encode(normalize_serial(parsed.raw_serial())),
        })
    }
}

thread_local! {
    /// The certificate the verifier refused during the current poll of a handshake on
    /// this thread (the verifier is shared by every connection and cannot know which
    /// one it serves; the handshake's future reads this in the same poll: `Observed`).
    static REFUSED_CERT: std::cell::RefCell<Option<CertSummary>> =
        const { std::cell::RefCell::new(None) };
}

/// A TLS accept that, when it fails, also says which certificate the verifier refused
/// (if that is why it failed). The verifier runs inside the poll that fails, on the
/// same thread, so a thread-local cleared before each poll and read right after it
/// belongs to this connection alone.
pub struct Observed<F>(pub F);

impl<F, T> std::future::Future for Observed<F>
where
    F: std::future::Future<Output = io::Result<T>> + Unpin,
{
    type Output = (io::Result<T>, Option<CertSummary>);

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        REFUSED_CERT.with_borrow_mut(|slot| *slot = None);
        let polled = std::pin::Pin::new(&mut self.0).poll(cx);
        let refused = REFUSED_CERT.with_borrow_mut(Option::take);
        polled.map(|r| {
            let refused = if r.is_err() { refused } else { None };
            (r, refused)
        })
    }
}

/// The certificate's single subject CN, if it is a valid device id.
fn common_name(cert: &CertificateDer<'_>) -> Result<(String, Vec<u8>, i64), Refusal> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| Refusal::BadCertificate)?;
    let mut cns = parsed.subject().iter_common_name();
    let cn = cns.next().ok_or(Refusal::InvalidCommonName)?;
    if cns.next().is_some() {
        return Err(Refusal::InvalidCommonName);
    }
    let cn = cn.as_str().map_err(|_| Refusal::InvalidCommonName)?;
    let device = DeviceId::new(cn).map_err(|_| Refusal::InvalidCommonName)?;
    Ok((
        device.as_str().to_owned(),
        normalize_serial(parsed.raw_serial()),
        parsed.validity().not_after.timestamp(),
    ))
}

fn read_all<T: PemObject>(path: &Path, what: &'static str) -> Result<Vec<T>, TlsLoadError> {
    let pem_err = |source| TlsLoadError::Pem {
        path: path.to_owned(),
        source,
    };
    let items = T::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if items.is_empty() {
        return Err(TlsLoadError::Empty {
            path: path.to_owned(),
            what,
        });
    }
    Ok(items)
}

/// The serials the CRLs revoke, and their earliest next-update date.
fn read_crls(
    path: &Path,
    crls: &[CertificateRevocationListDer<'_>],
) -> Result<(HashSet<Vec<u8>>, Option<i64>), TlsLoadError> {
    let mut out = HashSet::new();
    let mut next_update: Option<i64> = None;
    for crl in crls {
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl)
            .map_err(|e| TlsLoadError::Crl {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        for entry in parsed.iter_revoked_certificates() {
            out.insert(normalize_serial(entry.raw_serial()));
        }
        if let Some(t) = parsed.next_update() {
            let t = t.timestamp();
            next_update = Some(next_update.map_or(t, |n| n.min(t)));
        }
    }
    Ok((out, next_update))
}

/// Serial numbers are DER INTEGERs: a leading zero byte keeps a high bit positive. Strip
/// it so that a certificate's and a CRL entry's encodings of one number compare equal.
fn normalize_serial(raw: &[u8]) -> Vec<u8> {
    let mut s = raw;
    while let [0, rest @ ..] = s {
        if rest.is_empty() {
            break;
        }
        s = rest;
    }
    s.to_vec()
}

/// The current TLS material, swapped as a whole on reload.
#[derive(Clone)]
pub struct TlsState {
    settings: Arc<TlsSettings>,
    current: Arc<RwLock<Arc<TlsMaterial>>>,
}

impl TlsState {
    /// Loads the material for the first time.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsLoadError> {
        let material = TlsMaterial::load(&settings)?;
        Ok(Self {
            settings: Arc::new(settings),
            current: Arc::new(RwLock::new(Arc::new(material))),
        })
    }

    /// The material new handshakes use.
    pub fn current(&self) -> Arc<TlsMaterial> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the Arc
        // inside is still whole, so keep serving it.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reads the files again; on success new handshakes use the new material. On error
    /// the old material stays in force.
    pub fn reload(&self) -> Result<Arc<TlsMaterial>, TlsLoadError> {
        let material = Arc::new(TlsMaterial::load(&self.settings)?);
        match self.current.write() {
            Ok(mut g) => *g = material.clone(),
            Err(p) => *p.into_inner() = material.clone(),
        }
        Ok(material)
    }
}

/// Who a device is, from its verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The device id (certificate subject CN, validated).
    pub device: String,
    /// Certificate serial number (big-endian, no leading zeros).
    pub serial: Vec<u8>,
    /// Certificate expiry, seconds since the Unix epoch.
    pub not_after: i64,
}

impl PeerIdentity {
    /// The serial as lowercase hex, for logs and the registry.
    pub fn serial_hex(&self) -> String {
        hex::encode(&self.serial)
    }
}

/// Why a TLS connection was refused. Each has a stable name for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The device sent no client certificate.
    NoClientCert,
    /// The certificate was not issued by the gateway's CA.
    UnknownIssuer,
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotValidYet,
    /// The certificate is listed in the CRL.
    Revoked,
    /// The certificate is not for client authentication, or otherwise unusable.
    BadCertificate,
    /// The certificate's subject has no CN, several, or one outside `[A-Za-z0-9._-]{1,64}`.
    InvalidCommonName,
    /// The device offered nothing the gateway accepts (TLS version, cipher, group).
    Incompatible,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
    /// The connection failed at the TCP or TLS level (reset, garbage, alert).
    Transport,
    /// The CRL is past its next-update date and `refuse_stale_crl` is on.
    StaleCrl,
}

impl Refusal {
    /// Every reason, for metrics.
    pub const ALL: [Refusal; 11] = [
        Refusal::NoClientCert,
        Refusal::UnknownIssuer,
        Refusal::Expired,
        Refusal::NotValidYet,
        Refusal::Revoked,
        Refusal::BadCertificate,
        Refusal::InvalidCommonName,
        Refusal::Incompatible,
        Refusal::Timeout,
        Refusal::Transport,
        Refusal::StaleCrl,
    ];

    /// Stable lowercase name.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Refusal::NoClientCert => "no_client_cert",
            Refusal::UnknownIssuer => "unknown_issuer",
            Refusal::Expired => "expired",
            Refusal::NotValidYet => "not_valid_yet",
            Refusal::Revoked => "revoked",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::InvalidCommonName => "invalid_common_name",
            Refusal::Incompatible => "incompatible",
            Refusal::Timeout => "timeout",
            Refusal::Transport => "transport",
            Refusal::StaleCrl => "stale_crl",
        }
    }

    /// Classifies the error a failed handshake returned.
    pub fn from_handshake_error(err: &io::Error) -> Self {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return Refusal::Transport;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Refusal::NoClientCert,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Refusal::UnknownIssuer,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Refusal::NotValidYet
                }
                CertificateError::Revoked => Refusal::Revoked,
                CertificateError::ExpiredRevocationList
                | CertificateError::ExpiredRevocationListContext { .. } => Refusal::StaleCrl,
                CertificateError::ApplicationVerificationFailure => Refusal::InvalidCommonName,
                _ => Refusal::BadCertificate,
            },
            rustls::Error::PeerIncompatible(_) => Refusal::Incompatible,
            _ => Refusal::Transport,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads the identity from a verified peer certificate; refuses a certificate whose
/// subject does not hold exactly one valid CN (PROTOCOL.md §2.4).
pub fn identify(
    cert: &CertificateDer<'_>,
    material: &TlsMaterial,
) -> Result<PeerIdentity, Refusal> {
    let (device, serial, not_after) = common_name(cert)?;
    // The verifier already checked the CRL; this catches a session resumed or a
    // handshake that raced a reload.
    if material.revoked.contains(&serial) {
        return Err(Refusal::Revoked);
    }
    let now = unix_now();
    if not_after < now {
        return Err(Refusal::Expired);
    }
    if material.refuse_stale_crl && material.crl_stale(now) {
        return Err(Refusal::StaleCrl);
    }
    Ok(PeerIdentity {
        device,
        serial,
        not_after,
    })
}

/// Seconds since the Unix epoch (the store's clock, [`crate::store::now_ms`]).
pub fn unix_now() -> i64 {
    crate::store::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_subject_is_bounded_and_printable() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let cn = format!("evil\n2026-01-01 INFO forged line\u{7}{}", "x".repeat(400));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let summary = CertSummary::of(cert.der()).unwrap();
        assert!(summary.subject.chars().count() <= 256);
        assert!(
            !summary.subject.chars().any(char::is_control),
            "{:?}",
            summary.subject
        );
        assert!(
            summary.subject.starts_with("CN=evil?2026"),
            "{:?}",
            summary.subject
        );
    }

    #[test]
    fn serials_compare_without_sign_padding() {
        assert_eq!(normalize_serial(&[0, 0x80, 1]), vec![0x80, 1]);
        assert_eq!(normalize_serial(&[0x12]), vec![0x12]);
        assert_eq!(normalize_serial(&[0]), vec![0]);
    }
}
