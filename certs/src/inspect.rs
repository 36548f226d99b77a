//! Reading back what a certificate says: CN, serial, validity.

use std::net::IpAddr;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use crate::{Error, Serial, Validity};

/// The facts about a certificate that the CLI and tests look at.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The first subject common name, if any (the device id for a device certificate).
    pub common_name: Option<String>,
    /// The serial number.
    pub serial: Serial,
    /// The validity period.
    pub validity: Validity,
    /// Whether `basicConstraints` says CA:TRUE.
    pub is_ca: bool,
    /// The DNS names and IP addresses of the subject alternative name extension, in
    /// its order (IP addresses as `127.0.0.1`, `::1`); other kinds of names are left out.
    pub subject_alt_names: Vec<String>,
}

impl CertInfo {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let cert = parse_cert(der, "certificate")?;
        Ok(Self {
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            serial: Serial::from_be_bytes(cert.raw_serial()),
            validity: Validity::new(
                cert.validity().not_before.to_datetime(),
                cert.validity().not_after.to_datetime(),
            )?,
            is_ca: cert
                .basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|bc| bc.value.ca),
            subject_alt_names: subject_alt_names(&cert),
        })
    }

    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        Self::from_der(&cert_der_from_pem(pem)?)
    }
}

fn subject_alt_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The DER of the first `CERTIFICATE` block in `pem`.
pub fn cert_der_from_pem(pem: &str) -> Result<CertificateDer<'static>, Error> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Parse {
        what: "certificate PEM",
        detail: e.to_string(),
    })
}

/// Checks that the certificate `cert_der` was signed by the key of the CA certificate
/// `ca_cert_der` (signature only: no validity or chain checks).
pub fn verify_signed_by(cert_der: &[u8], ca_cert_der: &[u8]) -> Result<(), Error> {
    let ca = parse_cert(ca_cert_der, "CA certificate")?;
    let cert = parse_cert(cert_der, "certificate")?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| Error::NotSignedByCa {
            what: "the certificate",
        })
}

/// Checks that the CRL `crl_der` was signed by the key of the CA certificate
/// `ca_cert_der`.
pub fn verify_crl_signed_by(crl_der: &[u8], ca_cert_der: &[u8]) -> Result<(), Error> {
    let ca = parse_cert(ca_cert_der, "CA certificate")?;
    let (_, crl) = x509_parser::parse_x509_crl(crl_der).map_err(|e| Error::Parse {
        what: "CRL",
        detail: e.to_string(),
    })?;
    crl.verify_signature(ca.public_key())
        .map_err(|_| Error::NotSignedByCa { what: "the CRL" })
}

/// Parses a DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert<'a>(
    der: &'a [u8],
    what: &'static str,
) -> Result<X509Certificate<'a>, Error> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Error::Parse {
            what,
            detail: "trailing bytes after the certificate".to_owned(),
        }),
        Err(e) => Err(Error::Parse {
            what,
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;

    #[test]
    fn reads_back_what_was_issued() {
        let ca = Ca::generate("CA", Validity::days(10)).unwrap();
        let dev = ca.issue_device("dev-1", Validity::days(3)).unwrap();
        let info = CertInfo::from_pem(&dev.cert_pem).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("dev-1"));
        assert_eq!(info.serial, dev.serial);
        assert!(!info.is_ca);
        assert_eq!(info.validity, dev.validity);
        assert_eq!(CertInfo::from_der(&dev.cert_der).unwrap(), info);
        assert!(CertInfo::from_pem(ca.cert_pem()).unwrap().is_ca);
        assert!(info.subject_alt_names.is_empty());
        let gw = ca
            .issue_gateway(&["gw.example".into(), "10.0.0.7".into()], Validity::days(3))
            .unwrap();
        let gw = CertInfo::from_der(&gw.cert_der).unwrap();
        assert_eq!(
            gw.subject_alt_names,
            ["localhost", "127.0.0.1", "::1", "gw.example", "10.0.0.7"]
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(CertInfo::from_pem("nope").is_err());
        assert!(CertInfo::from_der(b"nope").is_err());
    }
}
