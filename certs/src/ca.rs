//! The certificate authority and the certificates it issues.

use std::fmt;
use std::net::IpAddr;

use device_client::proto::DeviceId;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::elliptic_curve::zeroize::Zeroizing;
use p256::pkcs8::{AssociatedOid, DecodePrivateKey};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sec1::der::Encode;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::X509Certificate;

use crate::crl::{Crl, RevokedEntry};
use crate::inspect::{parse_cert, verify_crl_signed_by, verify_signed_by};
use crate::{Error, Serial, Validity};

/// Names every gateway certificate carries, so a gateway on the same box or in a test
/// is reachable as `localhost`, `127.0.0.1` and `::1` without extra flags.
pub const GATEWAY_DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Subject CN of a gateway certificate minted without explicit names.
pub const GATEWAY_DEFAULT_CN: &str = "gateway";

/// A certificate authority: its certificate and private key (ECDSA P-256).
///
/// It signs the gateway's server certificate, device client certificates and the CRL.
/// The CA certificate has `basicConstraints CA:TRUE, pathlen:0` (it signs end-entity
/// certificates only), key usage `keyCertSign, cRLSign` and a subject key identifier that
/// every issued certificate and CRL names in its authority key identifier.
///
/// `Debug` never prints the private key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    common_name: String,
    validity: Validity,
    key_id_method: KeyIdMethod,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("common_name", &self.common_name)
            .field("validity", &self.validity)
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

/// A freshly issued certificate with its new private key, in every form a user of this
/// project needs: PEM for files and rustls, DER for embedded-tls and rustls.
///
/// `Debug` never prints the private key.
#[non_exhaustive]
#[derive(Clone)]
pub struct Issued {
    /// The certificate, PEM (`BEGIN CERTIFICATE`).
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 PEM (`BEGIN PRIVATE KEY`). Secret.
    pub key_pem: String,
    /// The private key, PKCS#8 DER. Secret.
    pub key_pkcs8_der: Vec<u8>,
    /// The private key, SEC1 `ECPrivateKey` DER with the named-curve parameters
    /// (prime256v1) and the public key, as embedded-tls loads it and
    /// `openssl ec -inform DER` reads it. Secret.
    pub key_sec1_der: Vec<u8>,
    /// The certificate's serial number; revocation keys on it.
    pub serial: Serial,
    /// The certificate's validity period.
    pub validity: Validity,
}

impl Issued {
    /// The certificate as rustls takes it.
    pub fn certificate_der(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    /// The private key (PKCS#8) as rustls takes it.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("serial", &self.serial)
            .field("validity", &self.validity)
            .field("cert_der", &format_args!("[{} bytes]", self.cert_der.len()))
            .field("key", &"[elided]")
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Mints a new self-signed CA with subject `CN=common_name`.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, Error> {
        if common_name.is_empty() {
            return Err(Error::EmptyCommonName);
        }
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.not_before = validity.not_before();
        params.not_after = validity.not_after();
        params.serial_number = Some(Serial::random()?.to_rcgen());
        params.distinguished_name = common_name_dn(common_name);
        // pathlen 0: this CA signs end-entity certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        let cert = params.self_signed(&key)?;
        Self::from_parts(cert.der().clone(), key)
    }

    /// Loads a CA from its certificate (PEM) and private key (PKCS#8 PEM, ECDSA P-256),
    /// e.g. the `ca.pem` and `ca.key.pem` that `certs init` wrote.
    ///
    /// Checks that the certificate is a CA and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| Error::Parse {
                what: "CA certificate PEM",
                detail: e.to_string(),
            })?;
        let key = KeyPair::from_pkcs8_pem_and_sign_algo(key_pem, &PKCS_ECDSA_P256_SHA256)
            .map_err(|_| Error::UnsupportedKey { what: "CA key" })?;
        Self::from_parts(cert_der, key)
    }

    fn from_parts(cert_der: CertificateDer<'static>, key: KeyPair) -> Result<Self, Error> {
        let cert = parse_cert(&cert_der, "CA certificate")?;
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(Error::NotACa);
        }
        // rcgen's Issuer re-reads the subject and panics on an empty RDN (and refuses a
        // multi-valued one): refuse both here with an error instead.
        if cert.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            return Err(Error::Parse {
                what: "CA certificate",
                detail: "its subject has an empty or multi-valued RDN".to_owned(),
            });
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::KeyMismatch);
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let validity = Validity::new(
            cert.validity().not_before.to_datetime(),
            cert.validity().not_after.to_datetime(),
        )?;
        let key_id_method = subject_key_id(&cert)
            .map(KeyIdMethod::PreSpecified)
            .unwrap_or(KeyIdMethod::Sha256);
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        // Issuer re-reads the subject name, key usages and key identifier from the
        // certificate itself, so issued certificates name the issuer byte for byte as the
        // CA certificate does (webpki compares names as bytes).
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            issuer,
            cert_der,
            cert_pem,
            common_name,
            validity,
            key_id_method,
        })
    }

    /// The CA certificate, PEM. This is the trust anchor the gateway and devices load.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate as rustls takes it (e.g. for a `RootCertStore`).
    pub fn certificate_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The CA private key, PKCS#8 PEM. Secret: write it with mode 0600, never log it.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA's subject common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The CA certificate's validity period.
    pub fn validity(&self) -> Validity {
        self.validity
    }

    /// Issues the gateway's TLS server certificate.
    ///
    /// Subject alternative names: `localhost`, `127.0.0.1`, `::1`, then each of `names`
    /// (a name that parses as an IP address becomes an IP SAN, anything else must be a
    /// DNS name, optionally with a leading `*.`); duplicates are dropped. Subject CN: the
    /// first of `names`, or `gateway`. Extended key usage: serverAuth.
    pub fn issue_gateway(&self, names: &[String], validity: Validity) -> Result<Issued, Error> {
        self.issue(gateway_params(names, validity)?, validity, new_key()?)
    }

    /// Like [`Ca::issue_gateway`], for an existing private key (PKCS#8 PEM, ECDSA
    /// P-256): renews the certificate and keeps the key.
    pub fn issue_gateway_with_key(
        &self,
        names: &[String],
        key_pem: &str,
        validity: Validity,
    ) -> Result<Issued, Error> {
        let params = gateway_params(names, validity)?;
        self.issue(params, validity, leaf_key(key_pem, "gateway key")?)
    }

    /// Issues a device's TLS client certificate with subject `CN=id`.
    ///
    /// `id` must satisfy the identity rule `[A-Za-z0-9._-]{1,64}` (PROTOCOL.md §2.4, see
    /// [`DeviceId::new`]): the gateway takes the CN as the device's identity.
    /// Extended key usage: clientAuth.
    pub fn issue_device(&self, id: &str, validity: Validity) -> Result<Issued, Error> {
        check_device_id(id)?;
        self.danger_issue_client_cert_with_raw_cn(id, validity)
    }

    /// Like [`Ca::issue_device`], for an existing private key (PKCS#8 PEM, ECDSA P-256):
    /// renews the certificate and keeps the key (for a device that cannot take a new
    /// one).
    pub fn issue_device_with_key(
        &self,
        id: &str,
        key_pem: &str,
        validity: Validity,
    ) -> Result<Issued, Error> {
        check_device_id(id)?;
        let params = leaf_params(id, validity, ExtendedKeyUsagePurpose::ClientAuth);
        self.issue(params, validity, leaf_key(key_pem, "device key")?)
    }

    /// **For tests only.** Issues a client certificate with subject `CN=cn` *without*
    /// checking the device identity rule, so tests can prove the gateway refuses a
    /// certificate whose CN is not a valid device id. Never use it to mint certificates
    /// for real devices: use [`Ca::issue_device`].
    pub fn danger_issue_client_cert_with_raw_cn(
        &self,
        cn: &str,
        validity: Validity,
    ) -> Result<Issued, Error> {
        let params = leaf_params(cn, validity, ExtendedKeyUsagePurpose::ClientAuth);
        self.issue(params, validity, new_key()?)
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        validity: Validity,
        key: KeyPair,
    ) -> Result<Issued, Error> {
        let serial = Serial::random()?;
        params.serial_number = Some(serial.to_rcgen());
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_pkcs8_der = key.serialize_der();
        let key_sec1_der = pkcs8_to_sec1(&key_pkcs8_der)?;
        Ok(Issued {
            cert_pem: pem_encode("CERTIFICATE", cert.der()),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_pkcs8_der,
            key_sec1_der,
            serial,
            validity,
        })
    }

    /// Signs a CRL listing `revoked`, with CRL number `crl_number` (RFC 5280 §5.2.3: it
    /// must grow with every CRL this CA issues), `thisUpdate = validity.not_before()` and
    /// `nextUpdate = validity.not_after()`.
    ///
    /// To add a revocation to an existing CRL, parse it with [`Crl::from_pem`], check it
    /// with [`Ca::verify_crl`], and sign its entries plus the new one with its number + 1.
    pub fn crl(
        &self,
        revoked: &[RevokedEntry],
        crl_number: u64,
        validity: Validity,
    ) -> Result<Crl, Error> {
        let params = CertificateRevocationListParams {
            this_update: validity.not_before(),
            next_update: validity.not_after(),
            crl_number: Serial::from_be_bytes(&crl_number.to_be_bytes()).to_rcgen(),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|entry| RevokedCertParams {
                    serial_number: entry.serial.to_rcgen(),
                    revocation_time: entry.revoked_at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: self.key_id_method.clone(),
        };
        let crl = params.signed_by(&self.issuer)?;
        Crl::from_der(crl.der())
    }

    /// Checks that `crl` was signed by this CA.
    pub fn verify_crl(&self, crl: &Crl) -> Result<(), Error> {
        verify_crl_signed_by(&crl.der, &self.cert_der)
    }

    /// Checks that the certificate `cert_der` was signed by this CA.
    pub fn verify_issued(&self, cert_der: &[u8]) -> Result<(), Error> {
        verify_signed_by(cert_der, &self.cert_der)
    }
}

fn new_key() -> Result<KeyPair, Error> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

/// An end-entity key to sign a renewed certificate for. Only P-256, the one curve the
/// protocol allows (PROTOCOL.md §1), whatever else the PEM might hold.
fn leaf_key(key_pem: &str, what: &'static str) -> Result<KeyPair, Error> {
    KeyPair::from_pkcs8_pem_and_sign_algo(key_pem, &PKCS_ECDSA_P256_SHA256)
        .map_err(|_| Error::UnsupportedKey { what })
}

pub(crate) fn check_device_id(id: &str) -> Result<(), Error> {
    DeviceId::new(id).map_err(|source| Error::InvalidDeviceId {
        id: id.to_owned(),
        source,
    })?;
    Ok(())
}

/// The gateway certificate's profile (see [`Ca::issue_gateway`]).
fn gateway_params(names: &[String], validity: Validity) -> Result<CertificateParams, Error> {
    let mut sans: Vec<SanType> = Vec::new();
    let all = GATEWAY_DEFAULT_NAMES
        .iter()
        .copied()
        .chain(names.iter().map(String::as_str));
    for name in all {
        let san = gateway_san(name)?;
        if !sans.iter().any(|s| same_san(s, &san)) {
            sans.push(san);
        }
    }
    let cn = names.first().map_or(GATEWAY_DEFAULT_CN, String::as_str);
    let mut params = leaf_params(cn, validity, ExtendedKeyUsagePurpose::ServerAuth);
    params.subject_alt_names = sans;
    Ok(params)
}

fn common_name_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Parameters shared by gateway and device certificates: an X.509 v3 end-entity
/// certificate (`basicConstraints CA:FALSE`, which also makes rcgen write the subject key
/// identifier), with an authority key identifier, key usage digitalSignature (ECDSA
/// signs the TLS handshake) and one extended key usage.
fn leaf_params(cn: &str, validity: Validity, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = validity.not_before();
    params.not_after = validity.not_after();
    params.distinguished_name = common_name_dn(cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params
}

fn gateway_san(name: &str) -> Result<SanType, Error> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = |reason| Error::InvalidName {
        name: name.to_owned(),
        reason,
    };
    check_dns_name(name).map_err(invalid)?;
    let ia5 = Ia5String::try_from(name).map_err(|_| invalid("not ASCII"))?;
    Ok(SanType::DnsName(ia5))
}

fn same_san(a: &SanType, b: &SanType) -> bool {
    match (a, b) {
        (SanType::DnsName(a), SanType::DnsName(b)) => a.as_str().eq_ignore_ascii_case(b.as_str()),
        _ => a == b,
    }
}

/// A DNS name as TLS clients accept it in a certificate (RFC 1123 host name, optional
/// leading wildcard label): letters, digits and hyphens in dot-separated labels of 1 to
/// 63 bytes that neither start nor end with a hyphen, at most 253 bytes in all.
fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 253 {
        return Err("longer than 253 bytes");
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    for label in host.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading or trailing dot)");
        }
        if label.len() > 63 {
            return Err("has a label longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("a DNS name may hold only letters, digits, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("has a label that starts or ends with '-'");
        }
    }
    Ok(())
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

/// Re-encodes a P-256 PKCS#8 key as a SEC1 `ECPrivateKey` (RFC 5915) that carries the
/// named-curve parameters and the public key.
///
/// `p256::SecretKey::to_sec1_der` leaves the `[0] parameters` field out (PKCS#8 carries
/// the curve in its algorithm identifier), but a bare SEC1 key needs it: OpenSSL cannot
/// tell the curve without it. So the structure is built with the `sec1` crate's type.
fn pkcs8_to_sec1(pkcs8_der: &[u8]) -> Result<Vec<u8>, Error> {
    let secret = p256::SecretKey::from_pkcs8_der(pkcs8_der)
        .map_err(|e| Error::KeyEncoding(e.to_string()))?;
    let scalar = Zeroizing::new(secret.to_bytes());
    let public = secret.public_key().to_encoded_point(false);
    sec1::EcPrivateKey {
        private_key: &scalar,
        parameters: Some(sec1::EcParameters::NamedCurve(p256::NistP256::OID)),
        public_key: Some(public.as_bytes()),
    }
    .to_der()
    .map_err(|e| Error::KeyEncoding(e.to_string()))
}

/// PEM with `\n` line endings (the pem crate's default is `\r\n`).
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn ca() -> Ca {
        Ca::generate("Test CA", Validity::days(30)).unwrap()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        parse_cert(der, "test").unwrap()
    }

    fn cn(cert: &X509Certificate<'_>) -> String {
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn authority_key_id(cert: &X509Certificate<'_>) -> Vec<u8> {
        cert.iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    Some(aki.key_identifier.as_ref().unwrap().0.to_vec())
                }
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn ca_certificate_profile() {
        let ca = ca();
        let cert = parse(ca.cert_der());
        assert_eq!(cert.version(), x509_parser::x509::X509Version::V3);
        assert_eq!(cn(&cert), "Test CA");
        assert_eq!(ca.common_name(), "Test CA");
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign());
        assert!(ku.value.crl_sign());
        let ski = subject_key_id(&cert).unwrap();
        assert_eq!(authority_key_id(&cert), ski);
        assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw());
        cert.verify_signature(None).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(!ca.cert_pem().contains('\r'));
    }

    #[test]
    fn device_certificate_profile() {
        let ca = ca();
        let dev = ca.issue_device("sensor-01", Validity::days(10)).unwrap();
        let cert = parse(&dev.cert_der);
        assert_eq!(cert.version(), x509_parser::x509::X509Version::V3);
        assert_eq!(cn(&cert), "sensor-01");
        // Issuer name is byte-identical to the CA's subject (webpki compares bytes).
        let ca_cert = parse(ca.cert_der());
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        assert_eq!(authority_key_id(&cert), subject_key_id(&ca_cert).unwrap());
        assert!(subject_key_id(&cert).is_some());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth);
        assert!(!eku.server_auth);
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        assert_eq!(
            Serial::from_be_bytes(cert.raw_serial()),
            dev.serial,
            "serial in the certificate"
        );
        ca.verify_issued(&dev.cert_der).unwrap();
        assert!(format!("{dev:?}").contains("elided"));
        assert!(!format!("{dev:?}").contains("PRIVATE"));
    }

    #[test]
    fn gateway_certificate_profile() {
        let ca = ca();
        let names = ["gw.example.com", "10.0.0.7", "LOCALHOST", "*.edge.example"].map(String::from);
        let gw = ca.issue_gateway(&names, Validity::days(10)).unwrap();
        let cert = parse(&gw.cert_der);
        assert_eq!(cn(&cert), "gw.example.com");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        assert!(!eku.client_auth);
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let got: Vec<String> = san
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                "localhost".to_owned(),
                format!("ip:{:?}", [127u8, 0, 0, 1].as_slice()),
                format!(
                    "ip:{:?}",
                    [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1].as_slice()
                ),
                "gw.example.com".to_owned(),
                format!("ip:{:?}", [10u8, 0, 0, 7].as_slice()),
                "*.edge.example".to_owned(),
            ]
        );
        let default = ca.issue_gateway(&[], Validity::days(1)).unwrap();
        assert_eq!(cn(&parse(&default.cert_der)), "gateway");
    }

    #[test]
    fn bad_gateway_names_refused() {
        let ca = ca();
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "-a.b",
            "a_b",
            "a b",
            "é.com",
            &"x".repeat(64),
        ] {
            assert!(
                matches!(
                    ca.issue_gateway(&[bad.to_owned()], Validity::days(1)),
                    Err(Error::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn device_id_rule_enforced_and_escape_hatch() {
        let ca = ca();
        for bad in ["", "a b", "a/b", &"x".repeat(65), "é"] {
            assert!(
                matches!(
                    ca.issue_device(bad, Validity::days(1)),
                    Err(Error::InvalidDeviceId { .. })
                ),
                "{bad:?}"
            );
        }
        let raw = ca
            .danger_issue_client_cert_with_raw_cn("not a valid/id", Validity::days(1))
            .unwrap();
        assert_eq!(cn(&parse(&raw.cert_der)), "not a valid/id");
    }

    #[test]
    fn key_encodings_agree() {
        use p256::pkcs8::DecodePrivateKey;
        let dev = ca().issue_device("d", Validity::days(1)).unwrap();
        let from_pkcs8 = p256::SecretKey::from_pkcs8_der(&dev.key_pkcs8_der).unwrap();
        let from_pem = p256::SecretKey::from_pkcs8_pem(&dev.key_pem).unwrap();
        let from_sec1 = p256::SecretKey::from_sec1_der(&dev.key_sec1_der).unwrap();
        assert_eq!(from_pkcs8.to_bytes(), from_pem.to_bytes());
        assert_eq!(from_pkcs8.to_bytes(), from_sec1.to_bytes());
        // The SEC1 form names the curve (prime256v1) explicitly.
        use sec1::der::Decode;
        let parsed = sec1::EcPrivateKey::from_der(&dev.key_sec1_der).unwrap();
        assert_eq!(
            parsed.parameters.and_then(|p| p.named_curve()),
            Some(p256::NistP256::OID)
        );
        assert!(parsed.public_key.is_some());
        // The certificate carries the same public key.
        let cert = parse(&dev.cert_der);
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            from_sec1.public_key().to_encoded_point(false).as_bytes()
        );
        assert!(dev.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn reload_from_pem_issues_the_same_chain() {
        let ca = ca();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        assert_eq!(again.validity(), ca.validity());
        let dev = again.issue_device("x", Validity::days(1)).unwrap();
        ca.verify_issued(&dev.cert_der).unwrap();
        let ca_cert = parse(ca.cert_der());
        let cert = parse(&dev.cert_der);
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        assert_eq!(authority_key_id(&cert), subject_key_id(&ca_cert).unwrap());
    }

    #[test]
    fn from_pem_refuses_mismatches() {
        let a = ca();
        let b = ca();
        assert!(matches!(
            Ca::from_pem(a.cert_pem(), &b.key_pem()),
            Err(Error::KeyMismatch)
        ));
        let leaf = a.issue_device("leaf", Validity::days(1)).unwrap();
        assert!(matches!(
            Ca::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(Error::NotACa)
        ));
        assert!(matches!(
            Ca::from_pem("garbage", &a.key_pem()),
            Err(Error::Parse { .. })
        ));
        assert!(matches!(
            Ca::from_pem(a.cert_pem(), "garbage"),
            Err(Error::UnsupportedKey { .. })
        ));
        assert!(b.verify_issued(&leaf.cert_der).is_err());
    }

    #[test]
    fn expired_certificates_can_be_minted() {
        let ca = ca();
        let dev = ca.issue_device("old", Validity::expired()).unwrap();
        let cert = parse(&dev.cert_der);
        assert!(!cert.validity().is_valid());
    }

    #[test]
    fn serials_are_unique() {
        let ca = ca();
        let a = ca.issue_device("a", Validity::days(1)).unwrap();
        let b = ca.issue_device("a", Validity::days(1)).unwrap();
        assert_ne!(a.serial, b.serial);
    }

    #[test]
    fn renewing_with_the_same_key() {
        let ca = ca();
        let old = ca.issue_device("a", Validity::days(1)).unwrap();
        let new = ca
            .issue_device_with_key("a", &old.key_pem, Validity::days(2))
            .unwrap();
        assert_ne!(new.serial, old.serial);
        assert_eq!(new.key_sec1_der, old.key_sec1_der);
        let (old_cert, new_cert) = (parse(&old.cert_der), parse(&new.cert_der));
        assert_eq!(new_cert.public_key().raw, old_cert.public_key().raw);
        assert_eq!(new_cert.subject().as_raw(), old_cert.subject().as_raw());
        ca.verify_issued(&new.cert_der).unwrap();

        let gw = ca
            .issue_gateway(&["gw.example".into()], Validity::days(1))
            .unwrap();
        let again = ca
            .issue_gateway_with_key(&["gw.example".into()], &gw.key_pem, Validity::days(1))
            .unwrap();
        assert_eq!(
            parse(&again.cert_der).public_key().raw,
            parse(&gw.cert_der).public_key().raw
        );
        assert!(matches!(
            ca.issue_device_with_key("a", "not a key", Validity::days(1)),
            Err(Error::UnsupportedKey { .. })
        ));
        assert!(matches!(
            ca.issue_device_with_key("bad id", &old.key_pem, Validity::days(1)),
            Err(Error::InvalidDeviceId { .. })
        ));
    }

    #[test]
    fn empty_ca_name_refused() {
        assert!(matches!(
            Ca::generate("", Validity::days(1)),
            Err(Error::EmptyCommonName)
        ));
    }
}
