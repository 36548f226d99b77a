//! The device's certificate checks (`device_client::x509`, on its DER reader) on
//! arbitrary bytes: the gateway certificate parser and verifier, the trust anchor
//! reader, server-name parsing and the TLS 1.3 handshake signature check.
//!
//! The input is raw bytes, so DER certificates are seeds as they are
//! (`fuzz/seeds/x509/`, minted by the `certs` library). The CA and gateway certificate
//! among them are the fixed trust anchor and genuine certificate here; their facts
//! (validity, names, keys) come from an independent parser (x509-parser).
//!
//! Invariants, besides "never panics":
//! - A certificate `verify` accepts against the fixed CA is the genuine gateway
//!   certificate as far as any fact goes: its key is the gateway's, the time is inside
//!   its validity, and the name is one of its subjectAltNames (RFC 6125 matching). A
//!   forgery would need the CA's signature over a different `tbsCertificate`.
//! - Whatever `ServerCert::parse` accepts, `TrustAnchor::from_der` accepts too (the
//!   anchor checks a subset).
//! - A trust anchor read from the input under which the genuine certificate verifies
//!   holds the CA's subject and key.
//! - `ServerName::parse` says exactly what its rule says: an IP address as std reads
//!   it, else a DNS name of labels of 1 to 63 letters, digits and `-`, 253 bytes at most.
//! - `verify_handshake_signature` with a fixed key and transcript hash accepts exactly
//!   the DER signatures that p256's own DER reader and verifier accept.
//! - At start-up, for the genuine certificate, every (name, time) gives exactly the
//!   answer the facts call for, so the facts above are the ones the verifier sees.

#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use device_client::x509::{
    CertError, ServerCert, ServerName, TrustAnchor, verify_handshake_signature,
};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const CA: &[u8] = include_bytes!("../seeds/x509/ca.der");
const GATEWAY: &[u8] = include_bytes!("../seeds/x509/gateway.der");

/// The handshake key and transcript hash (the seed generator signs with the same).
const HANDSHAKE_KEY: [u8; 32] = [0x42; 32];
const TRANSCRIPT_HASH: [u8; 32] = [0x17; 32];

/// Names dialled: the gateway's own names in other cases, near misses, wildcards.
const NAMES: [&str; 16] = [
    "localhost",
    "LocalHost",
    "127.0.0.1",
    "::1",
    "0:0:0:0:0:0:0:1",
    "10.0.0.7",
    "10.0.0.8",
    "gw.example.com",
    "GW.Example.COM",
    "gw.example.co",
    "a.site.example",
    "b.a.site.example",
    "site.example",
    "gateway",
    "127.0.0.1.nip.example",
    "example.com",
];

struct Facts {
    anchor: TrustAnchor<'static>,
    gateway: ServerCert<'static>,
    ca_key: Vec<u8>,
    ca_subject: Vec<u8>,
    gateway_key: Vec<u8>,
    not_before: i64,
    not_after: i64,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    times: Vec<Option<u64>>,
    handshake_key: VerifyingKey,
    handshake_message: Vec<u8>,
}

fn facts() -> &'static Facts {
    static FACTS: OnceLock<Facts> = OnceLock::new();
    FACTS.get_or_init(|| {
        let (_, ca) = X509Certificate::from_der(CA).expect("ca.der");
        let (_, gw) = X509Certificate::from_der(GATEWAY).expect("gateway.der");
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        let san = gw
            .subject_alternative_name()
            .expect("one subjectAltName")
            .expect("a subjectAltName");
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(match *b {
                    [a, b, c, d] => IpAddr::from([*a, *b, *c, *d]),
                    _ => IpAddr::from(<[u8; 16]>::try_from(*b).expect("an IPv6 address")),
                }),
                other => panic!("unexpected subjectAltName {other:?}"),
            }
        }
        let not_before = gw.validity().not_before.timestamp();
        let not_after = gw.validity().not_after.timestamp();
        let secs = |t: i64| u64::try_from(t).expect("after 1970");
        let times = vec![
            None,
            Some(0),
            Some(secs(not_before) - 1),
            Some(secs(not_before)),
            Some(secs(not_before) / 2 + secs(not_after) / 2),
            Some(secs(not_after)),
            Some(secs(not_after) + 1),
            Some(u64::MAX),
        ];
        let signing = SigningKey::from_bytes(&HANDSHAKE_KEY.into()).expect("a key");
        let mut handshake_message = vec![b' '; 64];
        handshake_message.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
        handshake_message.extend_from_slice(&TRANSCRIPT_HASH);
        let seed_sig: Signature = signing.sign(&handshake_message);
        let facts = Facts {
            anchor: TrustAnchor::from_der(CA).expect("the CA is a trust anchor"),
            gateway: ServerCert::parse(GATEWAY).expect("the gateway certificate parses"),
            ca_key: ca.public_key().subject_public_key.data.to_vec(),
            ca_subject: ca.subject().as_raw().to_vec(),
            gateway_key: gw.public_key().subject_public_key.data.to_vec(),
            not_before,
            not_after,
            dns,
            ips,
            times,
            handshake_key: *signing.verifying_key(),
            handshake_message,
        };
        // The genuine certificate: exactly the expected answer for every name and time.
        for name in NAMES {
            for now in &facts.times {
                let got = facts
                    .gateway
                    .verify(
                        &facts.anchor,
                        ServerName::parse(name).expect("a name"),
                        *now,
                    )
                    .map(|k| sec1(&k));
                assert_eq!(got, expected(&facts, name, *now), "{name} at {now:?}");
            }
        }
        // The seed signature verifies (the seed generator signed the same message).
        assert_eq!(
            verify_handshake_signature(
                &facts.handshake_key,
                &TRANSCRIPT_HASH,
                seed_sig.to_der().as_bytes()
            ),
            Ok(())
        );
        facts
    })
}

fn sec1(key: &VerifyingKey) -> Vec<u8> {
    key.to_encoded_point(false).as_bytes().to_vec()
}

/// What verifying the genuine gateway certificate for `name` at `now` must answer.
fn expected(f: &Facts, name: &str, now: Option<u64>) -> Result<Vec<u8>, CertError> {
    if let Some(now) = now {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        if now < f.not_before {
            return Err(CertError::NotYetValid);
        }
        if now > f.not_after {
            return Err(CertError::Expired);
        }
    }
    if !name_matches(f, name) {
        return Err(CertError::NameMismatch);
    }
    Ok(f.gateway_key.clone())
}

/// RFC 6125 matching of `name` against the gateway's subjectAltNames: IP addresses
/// by value, DNS names ignoring ASCII case, `*.` for exactly one leftmost label of a
/// name with at least two labels after it.
fn name_matches(f: &Facts, name: &str) -> bool {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return f.ips.contains(&ip);
    }
    f.dns
        .iter()
        .any(|pattern| match pattern.strip_prefix("*.") {
            Some(rest) => {
                rest.contains('.')
                    && name.split_once('.').is_some_and(|(first, tail)| {
                        !first.is_empty() && tail.eq_ignore_ascii_case(rest)
                    })
            }
            None => pattern.eq_ignore_ascii_case(name),
        })
}

/// FNV-1a: picks a name and a time from the input without taking bytes from it.
fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let f = facts();
    let h = hash(data);
    let name = NAMES[(h % NAMES.len() as u64) as usize];
    let now = f.times[((h >> 8) % f.times.len() as u64) as usize];

    // The gateway's certificate.
    let parsed = ServerCert::parse(data);
    if let Ok(cert) = &parsed {
        assert!(
            TrustAnchor::from_der(data).is_ok(),
            "a server certificate that is no trust anchor"
        );
        let server_name = ServerName::parse(name).expect("a valid name");
        if let Ok(key) = cert.verify(&f.anchor, server_name, now) {
            assert_eq!(sec1(&key), f.gateway_key, "accepted with another key");
            assert_eq!(expected(f, name, now), Ok(sec1(&key)), "{name} at {now:?}");
        }
    }

    // The input as the CA.
    if let Ok(anchor) = TrustAnchor::from_der(data) {
        let server_name = ServerName::Dns("localhost");
        if f.gateway.verify(&anchor, server_name, None).is_ok() {
            assert!(
                contains(data, &f.ca_subject),
                "anchor without the CA's subject"
            );
            // The key's x coordinate: the anchor may spell the point compressed.
            assert!(
                contains(data, &f.ca_key[1..33]),
                "anchor without the CA's key"
            );
        }
    }

    // The input as a name to dial.
    if let Ok(text) = std::str::from_utf8(data) {
        check_server_name(text);
    }

    // The input as a handshake signature.
    let got = verify_handshake_signature(&f.handshake_key, &TRANSCRIPT_HASH, data);
    let reference = Signature::from_der(data)
        .is_ok_and(|sig| f.handshake_key.verify(&f.handshake_message, &sig).is_ok());
    match got {
        Ok(()) => assert!(reference, "accepted a signature p256 refuses"),
        Err(e) => {
            assert_eq!(e, CertError::BadHandshakeSignature);
            assert!(!reference, "refused a signature p256 accepts: {data:02x?}");
        }
    }
});

fn check_server_name(text: &str) {
    let got = ServerName::parse(text);
    if let Ok(ip) = text.parse::<IpAddr>() {
        assert_eq!(got, Ok(ServerName::Ip(ip)));
        return;
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if text.len() <= 253 && text.split('.').all(label_ok) {
        assert_eq!(got, Ok(ServerName::Dns(text)));
    } else {
        assert_eq!(got, Err(CertError::InvalidName), "{text:?}");
    }
}
