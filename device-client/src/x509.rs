//! The gateway's certificate, checked against the deployment's CA on the device: no
//! std, no allocator, a few kilobytes of flash and well under a kilobyte of stack
//! (feature `x509`, part of `embedded-tls`).
//!
//! ```text
//!  ca.der ──TrustAnchor::from_der──► CA subject name + P-256 key     (once, at start)
//!
//!  TLS Certificate message: the gateway's certificate (DER)
//!    └─ ServerCert::parse ──► signed bytes, issuer, validity, names, key usage, key
//!         └─ verify(anchor, name dialled, now) ──► the gateway's P-256 key
//!  TLS CertificateVerify: ECDSA over the transcript hash
//!    └─ verify_handshake_signature(key, hash, signature) ──► the gateway holds the key
//! ```
//!
//! Why not a general X.509 library: embedded-tls's `rustpki` verifier (the `der` crate)
//! cost 32.5 KB of flash and 19 KB of stack in the firmware, a third of the whole flash
//! budget (DESIGN.md: firmware with mTLS ≤ 100 KB). A device only ever checks one kind
//! of certificate — the one `certs init` / `certs gateway` issues — so this checks that
//! profile strictly and refuses everything else:
//!
//! - the certificate is DER (definite, minimal lengths; nothing left over), X.509 v3;
//! - it is signed with ECDSA P-256 / SHA-256 **directly by the trust anchor**: the issuer
//!   name equals the CA's subject and the CA's key verifies the signature (no
//!   intermediates: the `certs` PKI has none);
//! - its key is an EC P-256 key;
//! - if the caller knows the time, `notBefore ≤ now ≤ notAfter`;
//! - the name dialled matches a subjectAltName: a DNS name (ASCII case-insensitive,
//!   `*.` wildcard for one leftmost label, RFC 6125 §6.4.3) or an IP address. The CN is
//!   ignored (RFC 6125 §6.4.4); a certificate without subjectAltName matches nothing;
//! - it may be used by a TLS server: basicConstraints (if present) says not a CA, key
//!   usage (if present) allows digitalSignature, extended key usage (if present)
//!   includes serverAuth;
//! - it has no critical extension besides those four (RFC 5280 §4.2).
//!
//! Revocation of the gateway's certificate is not checked (the CRL is for devices).

use core::fmt;
use core::net::IpAddr;

use p256::ecdsa::VerifyingKey;
use p256::ecdsa::signature::Verifier;

use crate::der::{
    BIT_STRING, BOOLEAN, Der, INTEGER, Malformed, OCTET_STRING, OID, PRIME256V1, SEQUENCE, Tlv,
    bit_string_bytes, ecdsa_signature,
};

/// Why a certificate or a handshake signature was refused.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertError {
    /// Not a DER-encoded X.509 certificate (or a field of it is malformed).
    Malformed,
    /// Not what the `certs` PKI issues: not X.509 v3, or a signature algorithm or key
    /// other than ECDSA P-256 with SHA-256.
    Unsupported,
    /// Issued by another CA than the trust anchor (the issuer name differs).
    UnknownIssuer,
    /// The CA's signature over the certificate does not verify.
    BadSignature,
    /// The certificate's validity period has not begun.
    NotYetValid,
    /// The certificate's validity period has ended.
    Expired,
    /// None of the certificate's subjectAltNames is the name dialled.
    NameMismatch,
    /// The certificate is not for a TLS server (a CA certificate, or its key usage or
    /// extended key usage excludes it).
    NotForServer,
    /// The certificate has a critical extension this verifier does not know.
    UnknownCriticalExtension,
    /// The name to dial is neither a DNS name nor an IP address.
    InvalidName,
    /// The peer's handshake signature (TLS CertificateVerify) does not verify with the
    /// certificate's key: it does not hold the certificate's private key.
    BadHandshakeSignature,
    /// The peer finished a handshake without sending a certificate and a handshake
    /// signature: it proved nothing.
    NoProof,
}

impl CertError {
    /// A short description, for logs without `core::fmt` (it costs a firmware flash).
    pub const fn as_str(&self) -> &'static str {
        match self {
            CertError::Malformed => "not a DER X.509 certificate",
            CertError::Unsupported => "not X.509 v3 with ECDSA P-256 / SHA-256",
            CertError::UnknownIssuer => "issued by another CA",
            CertError::BadSignature => "the CA's signature does not verify",
            CertError::NotYetValid => "not valid yet",
            CertError::Expired => "expired",
            CertError::NameMismatch => "not issued for the name dialled",
            CertError::NotForServer => "not a TLS server certificate",
            CertError::UnknownCriticalExtension => "unknown critical extension",
            CertError::InvalidName => "the name to dial is not a DNS name or IP address",
            CertError::BadHandshakeSignature => "the handshake signature does not verify",
            CertError::NoProof => "no certificate or no handshake signature",
        }
    }
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(feature = "std")]
impl std::error::Error for CertError {}

impl From<Malformed> for CertError {
    fn from(_: Malformed) -> Self {
        CertError::Malformed
    }
}

type Result<T> = core::result::Result<T, CertError>;

// DER tags (X.690) and object identifiers (contents only) of the profile, besides
// those in `der`.
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version`, `[1]`/`[2] IMPLICIT UniqueIdentifier`, `[3] EXPLICIT
/// Extensions` of TBSCertificate (RFC 5280 §4.1).
const VERSION: u8 = 0xa0;
const ISSUER_UID: u8 = 0x81;
const SUBJECT_UID: u8 = 0x82;
const EXTENSIONS: u8 = 0xa3;
/// GeneralName `dNSName [2] IA5String` and `iPAddress [7] OCTET STRING`, implicit.
const SAN_DNS: u8 = 0x82;
const SAN_IP: u8 = 0x87;

/// 1.2.840.10045.4.3.2 ecdsa-with-SHA256.
const ECDSA_WITH_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
/// 1.2.840.10045.2.1 id-ecPublicKey.
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// 2.5.29.15 keyUsage, 2.5.29.17 subjectAltName, 2.5.29.19 basicConstraints,
/// 2.5.29.37 extKeyUsage.
const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
const EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
/// 1.3.6.1.5.5.7.3.1 id-kp-serverAuth.
const SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];

/// `AlgorithmIdentifier` must be ecdsa-with-SHA256, without parameters (RFC 5758 §3.2).
fn expect_ecdsa_sha256(alg: Tlv<'_>) -> Result<()> {
    if alg.tag != SEQUENCE {
        return Err(CertError::Malformed);
    }
    let mut alg = Der(alg.value);
    let oid = alg.expect(OID)?;
    if oid.value != ECDSA_WITH_SHA256 || !alg.is_empty() {
        return Err(CertError::Unsupported);
    }
    Ok(())
}

/// A `SubjectPublicKeyInfo` that must hold an EC P-256 key.
fn p256_key(spki: Tlv<'_>) -> Result<VerifyingKey> {
    let mut spki = Der(spki.value);
    let mut alg = spki.sequence()?;
    let key = bit_string_bytes(spki.expect(BIT_STRING)?)?;
    spki.end()?;
    if alg.expect(OID)?.value != EC_PUBLIC_KEY || alg.expect(OID)?.value != PRIME256V1 {
        return Err(CertError::Unsupported);
    }
    alg.end()?;
    VerifyingKey::from_sec1_bytes(key).map_err(|_| CertError::Malformed)
}

/// The fields of a certificate both the trust anchor and the gateway's certificate need.
struct Parsed<'a> {
    /// The DER of `tbsCertificate`: what the issuer signed.
    tbs: &'a [u8],
    signature: &'a [u8],
    issuer: &'a [u8],
    not_before: i64,
    not_after: i64,
    subject: &'a [u8],
    key: VerifyingKey,
    /// The contents of `[3] Extensions`: a SEQUENCE OF Extension.
    extensions: Option<&'a [u8]>,
}

impl<'a> Parsed<'a> {
    fn from_der(der: &'a [u8]) -> Result<Self> {
        let mut outer = Der(der);
        let mut cert = outer.sequence()?;
        outer.end()?;
        let tbs = cert.expect(SEQUENCE)?;
        expect_ecdsa_sha256(cert.next()?)?;
        let signature = bit_string_bytes(cert.expect(BIT_STRING)?)?;
        cert.end()?;

        let mut fields = Der(tbs.value);
        // Version: v3 (2); extensions exist from v3 on, and subjectAltName is one.
        let mut version = Der(fields.expect(VERSION)?.value);
        if version.expect(INTEGER)?.value != [2] {
            return Err(CertError::Unsupported);
        }
        version.end()?;
        fields.expect(INTEGER)?; // serialNumber
        expect_ecdsa_sha256(fields.next()?)?; // must be the outer algorithm (§4.1.1.2)
        let issuer = fields.expect(SEQUENCE)?.whole;
        let mut validity = fields.sequence()?;
        let not_before = time(validity.next()?)?;
        let not_after = time(validity.next()?)?;
        validity.end()?;
        let subject = fields.expect(SEQUENCE)?.whole;
        let key = p256_key(fields.expect(SEQUENCE)?)?;
        fields.optional(ISSUER_UID)?;
        fields.optional(SUBJECT_UID)?;
        let extensions = match fields.optional(EXTENSIONS)? {
            Some(ext) => {
                let mut wrapper = Der(ext.value);
                let list = wrapper.expect(SEQUENCE)?.value;
                wrapper.end()?;
                Some(list)
            }
            None => None,
        };
        fields.end()?;
        Ok(Self {
            tbs: tbs.whole,
            signature,
            issuer,
            not_before,
            not_after,
            subject,
            key,
            extensions,
        })
    }
}

/// A UTCTime or GeneralizedTime in the form RFC 5280 §4.1.2.5 requires (UTC, with
/// seconds, `Z`), as seconds since the Unix epoch.
fn time(tlv: Tlv<'_>) -> Result<i64> {
    let (year, rest) = match (tlv.tag, tlv.value) {
        (UTC_TIME, [y @ .., b'Z']) if y.len() == 12 => {
            let (yy, rest) = y.split_at(2);
            let yy = digits(yy)?;
            // RFC 5280: YY ≥ 50 is 19YY, else 20YY.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, rest)
        }
        (GENERALIZED_TIME, [y @ .., b'Z']) if y.len() == 14 => {
            let (yyyy, rest) = y.split_at(4);
            (digits(yyyy)?, rest)
        }
        _ => return Err(CertError::Malformed),
    };
    let [mo, d, h, mi, s] = [0, 2, 4, 6, 8].map(|i| rest.get(i..i + 2).map(digits));
    let (Some(Ok(mo)), Some(Ok(d)), Some(Ok(h)), Some(Ok(mi)), Some(Ok(s))) = (mo, d, h, mi, s)
    else {
        return Err(CertError::Malformed);
    };
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(year, mo)
        || h > 23
        || mi > 59
        || s > 59
    {
        return Err(CertError::Malformed);
    }
    let days = days_from_civil(year, mo, d);
    Ok(days * 86_400 + h * 3_600 + mi * 60 + s)
}

/// ASCII decimal digits as a number.
fn digits(ascii: &[u8]) -> Result<i64> {
    ascii.iter().try_fold(0i64, |n, b| match b {
        b'0'..=b'9' => Ok(n * 10 + i64::from(b - b'0')),
        _ => Err(CertError::Malformed),
    })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (the well-known
/// era-based algorithm: 400-year eras of 146,097 days, years starting in March).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The CA the device trusts: its subject name and key, read once from its certificate.
#[derive(Clone)]
pub struct TrustAnchor<'a> {
    subject: &'a [u8],
    key: VerifyingKey,
}

impl fmt::Debug for TrustAnchor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrustAnchor")
    }
}

impl<'a> TrustAnchor<'a> {
    /// Reads the CA's certificate (DER, as in `ca.pem`): it must be X.509 v3 with a
    /// P-256 key. Its own signature and validity are not checked: the device trusts it
    /// because it was put there, not because of what it says.
    pub fn from_der(ca: &'a [u8]) -> Result<Self> {
        let parsed = Parsed::from_der(ca)?;
        Ok(Self {
            subject: parsed.subject,
            key: parsed.key,
        })
    }
}

/// The name the device dials, which the gateway's certificate must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerName<'a> {
    /// A DNS name, e.g. `gateway.example.com` or `localhost`.
    Dns(&'a str),
    /// An IP address, e.g. `192.168.1.10`.
    Ip(IpAddr),
}

impl<'a> ServerName<'a> {
    /// An IP address if `name` reads as one, else a DNS name: letters, digits, `-` and
    /// `.`, labels of 1 to 63, at most 253 in all.
    pub fn parse(name: &'a str) -> Result<Self> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(ServerName::Ip(ip));
        }
        let valid_label = |label: &str| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if name.len() <= 253 && name.split('.').all(valid_label) {
            Ok(ServerName::Dns(name))
        } else {
            Err(CertError::InvalidName)
        }
    }
}

/// The gateway's certificate, read and checked against this verifier's profile
/// (module doc); [`verify`](Self::verify) checks it against a trust anchor.
pub struct ServerCert<'a> {
    parsed: Parsed<'a>,
    /// The contents of subjectAltName: a SEQUENCE OF GeneralName.
    alt_names: Option<&'a [u8]>,
}

impl fmt::Debug for ServerCert<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("not_before", &self.parsed.not_before)
            .field("not_after", &self.parsed.not_after)
            .finish_non_exhaustive()
    }
}

impl<'a> ServerCert<'a> {
    /// Reads a certificate (DER) and checks what it says about itself: the profile, and
    /// that it is for a TLS server.
    pub fn parse(der: &'a [u8]) -> Result<Self> {
        let parsed = Parsed::from_der(der)?;
        let mut alt_names = None;
        // Each known extension at most once (RFC 5280 §4.2).
        let mut seen = [false; 4];
        let mut list = Der(parsed.extensions.unwrap_or_default());
        while !list.is_empty() {
            let mut ext = list.sequence()?;
            let id = ext.expect(OID)?.value;
            let critical = match ext.optional(BOOLEAN)? {
                Some(b) if b.value == [0xff] => true,
                // DER leaves out a FALSE default (X.690 §11.5), so FALSE is malformed.
                Some(_) => return Err(CertError::Malformed),
                None => false,
            };
            let value = ext.expect(OCTET_STRING)?.value;
            ext.end()?;
            let known = [
                KEY_USAGE,
                SUBJECT_ALT_NAME,
                BASIC_CONSTRAINTS,
                EXT_KEY_USAGE,
            ]
            .iter()
            .position(|known| *known == id);
            let Some(index) = known else {
                if critical {
                    return Err(CertError::UnknownCriticalExtension);
                }
                continue;
            };
            if let Some(seen) = seen.get_mut(index) {
                if *seen {
                    return Err(CertError::Malformed);
                }
                *seen = true;
            }
            match index {
                0 => key_usage_allows_signing(value)?,
                1 => {
                    let mut outer = Der(value);
                    alt_names = Some(outer.expect(SEQUENCE)?.value);
                    outer.end()?;
                }
                2 => not_a_ca(value)?,
                _ => ext_key_usage_allows_server(value)?,
            }
        }
        Ok(Self { parsed, alt_names })
    }

    /// Checks that `anchor` issued this certificate, that it is valid at `now` (seconds
    /// since the Unix epoch; `None` skips the check, for a device without a clock) and
    /// that it was issued for `name`. Returns the key the gateway must prove it holds.
    pub fn verify(
        &self,
        anchor: &TrustAnchor<'_>,
        name: ServerName<'_>,
        now: Option<u64>,
    ) -> Result<VerifyingKey> {
        let p = &self.parsed;
        if p.issuer != anchor.subject {
            return Err(CertError::UnknownIssuer);
        }
        let signature = ecdsa_signature(p.signature)?;
        anchor
            .key
            .verify(p.tbs, &signature)
            .map_err(|_| CertError::BadSignature)?;
        if let Some(now) = now {
            let now = i64::try_from(now).unwrap_or(i64::MAX);
            if now < p.not_before {
                return Err(CertError::NotYetValid);
            }
            if now > p.not_after {
                return Err(CertError::Expired);
            }
        }
        if !self.has_name(name)? {
            return Err(CertError::NameMismatch);
        }
        Ok(p.key)
    }

    /// Whether a subjectAltName of this certificate is `name`.
    fn has_name(&self, name: ServerName<'_>) -> Result<bool> {
        let mut names = Der(self.alt_names.unwrap_or_default());
        while !names.is_empty() {
            let general = names.next()?;
            let found = match (general.tag, name) {
                (SAN_DNS, ServerName::Dns(dialled)) => dns_matches(general.value, dialled),
                (SAN_IP, ServerName::Ip(IpAddr::V4(ip))) => general.value == ip.octets(),
                (SAN_IP, ServerName::Ip(IpAddr::V6(ip))) => general.value == ip.octets(),
                _ => false,
            };
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// keyUsage (RFC 5280 §4.2.1.3) must include digitalSignature (bit 0), which a TLS 1.3
/// server uses to sign its handshake.
fn key_usage_allows_signing(value: &[u8]) -> Result<()> {
    let mut outer = Der(value);
    let bits = outer.expect(BIT_STRING)?.value;
    outer.end()?;
    match bits {
        [_unused, first, ..] if first & 0x80 != 0 => Ok(()),
        [_unused, ..] => Err(CertError::NotForServer),
        [] => Err(CertError::Malformed),
    }
}

/// basicConstraints (RFC 5280 §4.2.1.9): a CA certificate is not a server's.
fn not_a_ca(value: &[u8]) -> Result<()> {
    let mut outer = Der(value);
    let mut bc = outer.sequence()?;
    outer.end()?;
    match bc.optional(BOOLEAN)? {
        Some(ca) if ca.value == [0xff] => Err(CertError::NotForServer),
        Some(_) => Err(CertError::Malformed),
        None => Ok(()),
    }
}

/// extKeyUsage (RFC 5280 §4.2.1.12) must list serverAuth.
fn ext_key_usage_allows_server(value: &[u8]) -> Result<()> {
    let mut outer = Der(value);
    let mut purposes = outer.sequence()?;
    outer.end()?;
    while !purposes.is_empty() {
        if purposes.expect(OID)?.value == SERVER_AUTH {
            return Ok(());
        }
    }
    Err(CertError::NotForServer)
}

/// A dNSName against the name dialled: equal ignoring ASCII case, or `*.rest` where the
/// dialled name is one more label followed by `rest` (RFC 6125 §6.4.3; the wildcard is
/// a whole leftmost label and `rest` has at least two labels, so `*.com` matches
/// nothing).
fn dns_matches(pattern: &[u8], dialled: &str) -> bool {
    let dialled = dialled.as_bytes();
    if let Some(rest) = pattern.strip_prefix(b"*.") {
        let Some(dot) = dialled.iter().position(|b| *b == b'.') else {
            return false;
        };
        let tail = dialled.get(dot + 1..).unwrap_or_default();
        return dot > 0 && rest.contains(&b'.') && rest.eq_ignore_ascii_case(tail);
    }
    pattern.eq_ignore_ascii_case(dialled)
}

/// Checks a TLS 1.3 server's CertificateVerify (RFC 8446 §4.4.3): an ECDSA P-256 /
/// SHA-256 signature (DER) by `key` over 64 spaces, the context string, a zero byte and
/// `transcript_hash` (the handshake up to and including the Certificate message).
pub fn verify_handshake_signature(
    key: &VerifyingKey,
    transcript_hash: &[u8; 32],
    signature: &[u8],
) -> Result<()> {
    const CONTEXT: &[u8] = b"TLS 1.3, server CertificateVerify\0";
    let mut message = [b' '; 64 + CONTEXT.len() + 32];
    let (_spaces, rest) = message.split_at_mut(64);
    let (context, hash) = rest.split_at_mut(CONTEXT.len());
    context.copy_from_slice(CONTEXT);
    hash.copy_from_slice(transcript_hash);
    let signature = ecdsa_signature(signature).map_err(|_| CertError::BadHandshakeSignature)?;
    key.verify(&message, &signature)
        .map_err(|_| CertError::BadHandshakeSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_from_civil_matches_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 26), 20_783);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn times_read_both_forms() {
        let utc = Tlv {
            tag: UTC_TIME,
            value: b"261126000000Z",
            whole: &[],
        };
        assert_eq!(time(utc), Ok(20_783 * 86_400));
        let gen_time = Tlv {
            tag: GENERALIZED_TIME,
            value: b"20261126013005Z",
            whole: &[],
        };
        assert_eq!(time(gen_time), Ok(20_783 * 86_400 + 3_600 + 30 * 60 + 5));
        for bad in [
            &b"261326000000Z"[..],
            b"260230000000Z",
            b"261126240000Z",
            b"2611260000Z",
            b"261126000000",
            b"26112600000+Z",
        ] {
            let tlv = Tlv {
                tag: UTC_TIME,
                value: bad,
                whole: &[],
            };
            assert_eq!(time(tlv), Err(CertError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn dns_names_and_wildcards() {
        assert!(dns_matches(b"localhost", "LocalHost"));
        assert!(dns_matches(b"*.example.com", "gw.example.com"));
        assert!(!dns_matches(b"*.example.com", "a.gw.example.com"));
        assert!(!dns_matches(b"*.example.com", "example.com"));
        assert!(!dns_matches(b"*.example.com", ".example.com"));
        assert!(!dns_matches(b"*.com", "example.com"));
        assert!(!dns_matches(b"gw*.example.com", "gw1.example.com"));
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            ServerName::parse("10.0.0.1"),
            Ok(ServerName::Ip(_))
        ));
        assert!(matches!(ServerName::parse("::1"), Ok(ServerName::Ip(_))));
        assert_eq!(
            ServerName::parse("gw-1.local"),
            Ok(ServerName::Dns("gw-1.local"))
        );
        for bad in ["", "a..b", "bad name", "*.example.com", "ü.example"] {
            assert_eq!(ServerName::parse(bad), Err(CertError::InvalidName), "{bad}");
        }
    }
}
