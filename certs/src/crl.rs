//! Certificate revocation lists.

use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::ca::pem_encode;
use crate::{Error, Serial};

/// One revoked certificate in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Serial number of the revoked certificate.
    pub serial: Serial,
    /// When the CA revoked it.
    pub revoked_at: OffsetDateTime,
}

impl RevokedEntry {
    /// An entry revoking `serial` as of now.
    pub fn now(serial: Serial) -> Self {
        Self {
            serial,
            revoked_at: OffsetDateTime::now_utc(),
        }
    }
}

/// A CRL (X.509 v2, RFC 5280 §5): minted by [`crate::Ca::crl`] or parsed from PEM/DER.
///
/// Parsing does not check the signature; [`crate::Ca::verify_crl`] does.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// The CRL, PEM (`BEGIN X509 CRL`).
    pub pem: String,
    /// The CRL, DER.
    pub der: Vec<u8>,
    /// The CRL number (0 if the CRL has none).
    pub number: u64,
    /// The revoked certificates, in the CRL's order.
    pub revoked: Vec<RevokedEntry>,
    /// When this CRL was issued.
    pub this_update: OffsetDateTime,
    /// When the next CRL is due, if the CRL says (ours always do). Past it, OpenSSL
    /// refuses the CRL as expired.
    pub next_update: Option<OffsetDateTime>,
}

impl Crl {
    /// Parses a DER CRL.
    pub fn from_der(der: &[u8]) -> Result<Self, Error> {
        let parse_error = |detail: String| Error::Parse {
            what: "CRL",
            detail,
        };
        let (rest, crl) =
            x509_parser::parse_x509_crl(der).map_err(|e| parse_error(e.to_string()))?;
        if !rest.is_empty() {
            return Err(parse_error("trailing bytes after the CRL".to_owned()));
        }
        let number = match crl.crl_number() {
            None => 0,
            Some(n) => {
                let bytes = n.to_bytes_be();
                let bytes = Serial::from_be_bytes(&bytes);
                let bytes = bytes.as_bytes();
                if bytes.len() > 8 {
                    return Err(Error::CrlNumberTooLarge);
                }
                bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
            }
        };
        let revoked = crl
            .iter_revoked_certificates()
            .map(|r| RevokedEntry {
                serial: Serial::from_be_bytes(r.raw_serial()),
                revoked_at: r.revocation_date.to_datetime(),
            })
            .collect();
        Ok(Self {
            pem: pem_encode("X509 CRL", der),
            der: der.to_vec(),
            number,
            revoked,
            this_update: crl.last_update().to_datetime(),
            next_update: crl.next_update().map(|t| t.to_datetime()),
        })
    }

    /// Parses the first `X509 CRL` block of a PEM text.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            Error::Parse {
                what: "CRL PEM",
                detail: e.to_string(),
            }
        })?;
        Self::from_der(&der)
    }

    /// The CRL as rustls takes it (e.g. `WebPkiClientVerifier::builder(..).with_crls(..)`).
    pub fn crl_der(&self) -> CertificateRevocationListDer<'static> {
        CertificateRevocationListDer::from(self.der.clone())
    }

    /// Whether the CRL lists `serial`.
    pub fn contains(&self, serial: &Serial) -> bool {
        self.revoked.iter().any(|entry| &entry.serial == serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, Validity};

    #[test]
    fn round_trip_and_signature() {
        let ca = Ca::generate("CA", Validity::days(10)).unwrap();
        let a = ca.issue_device("a", Validity::days(1)).unwrap();
        let b = ca.issue_device("b", Validity::days(1)).unwrap();

        let empty = ca.crl(&[], 1, Validity::days(7)).unwrap();
        assert_eq!(empty.number, 1);
        assert!(empty.revoked.is_empty());
        assert!(empty.pem.starts_with("-----BEGIN X509 CRL-----\n"));
        ca.verify_crl(&empty).unwrap();

        let entries = [RevokedEntry::now(a.serial.clone())];
        let one = ca.crl(&entries, 2, Validity::days(7)).unwrap();
        let parsed = Crl::from_pem(&one.pem).unwrap();
        assert_eq!(parsed, one);
        assert_eq!(parsed.number, 2);
        assert!(parsed.contains(&a.serial));
        assert!(!parsed.contains(&b.serial));
        assert!(parsed.next_update.unwrap() > parsed.this_update);

        let mut more = parsed.revoked.clone();
        more.push(RevokedEntry::now(b.serial.clone()));
        let two = ca.crl(&more, parsed.number + 1, Validity::days(7)).unwrap();
        assert!(two.contains(&a.serial) && two.contains(&b.serial));
        assert_eq!(two.number, 3);

        let other = Ca::generate("other", Validity::days(10)).unwrap();
        assert!(matches!(
            other.verify_crl(&two),
            Err(Error::NotSignedByCa { .. })
        ));
    }

    #[test]
    fn large_crl_numbers() {
        let ca = Ca::generate("CA", Validity::days(10)).unwrap();
        let crl = ca.crl(&[], u64::MAX, Validity::days(1)).unwrap();
        assert_eq!(crl.number, u64::MAX);
        let crl = ca.crl(&[], 0, Validity::days(1)).unwrap();
        assert_eq!(crl.number, 0);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Crl::from_pem("nope").is_err());
        assert!(Crl::from_der(b"nope").is_err());
    }
}
