//! The device's check of the gateway's certificate (`device_client::x509`) against
//! certificates made by rcgen, the library the `certs` tool issues with: what our PKI
//! issues is accepted, and each way a certificate can be wrong is refused with its own
//! reason. The embedded-tls verifier built on it is checked for a handshake that leaves
//! out the gateway's proof.
// Not with `defmt`: embedded-tls then logs through defmt, and a host test binary has no
// defmt logger to link (the firmware brings its own; CI builds that feature for it).
#![cfg(all(feature = "embedded-tls", not(feature = "defmt")))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use device_client::driver::embedded_tls::embedded_tls::{
    CertificateEntryRef, CertificateRef, CertificateVerifyRef, NoClock, SignatureScheme,
    TlsVerifier,
};
use device_client::driver::embedded_tls::{GatewayCheck, GatewayVerifier};
use device_client::x509::{
    CertError, ServerCert, ServerName, TrustAnchor, verify_handshake_signature,
};
use p256::ecdsa::signature::Signer;
use p256::pkcs8::DecodePrivateKey;
use proptest::prelude::*;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType, SignatureAlgorithm,
};
use sha2::{Digest, Sha256};

struct Ca {
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_with(cn: &str, alg: &'static SignatureAlgorithm) -> Ca {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    let der = cert.der().to_vec();
    Ca {
        issuer: Issuer::new(params, key),
        der,
    }
}

fn ca(cn: &str) -> Ca {
    ca_with(cn, &PKCS_ECDSA_P256_SHA256)
}

/// A gateway certificate as `certs init` makes it: CN=gateway, SANs localhost,
/// 127.0.0.1, ::1 and a wildcard, CA:FALSE, digitalSignature, serverAuth, valid from a
/// day ago for a day.
fn gateway_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn("gateway");
    params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
        SanType::IpAddress("::1".parse().unwrap()),
        SanType::DnsName("*.site.example".try_into().unwrap()),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (SystemTime::now() - Duration::from_secs(86_400)).into();
    params.not_after = (SystemTime::now() + Duration::from_secs(86_400)).into();
    params
}

fn issue_with(ca: &Ca, params: CertificateParams, alg: &'static SignatureAlgorithm) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    params.signed_by(&key, &ca.issuer).unwrap().der().to_vec()
}

fn issue(ca: &Ca, params: CertificateParams) -> Vec<u8> {
    issue_with(ca, params, &PKCS_ECDSA_P256_SHA256)
}

fn now() -> Option<u64> {
    Some(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
}

/// The whole check, as the embedded-tls verifier runs it.
fn check(ca: &[u8], cert: &[u8], name: &str) -> Result<(), CertError> {
    let anchor = TrustAnchor::from_der(ca)?;
    ServerCert::parse(cert)?
        .verify(&anchor, ServerName::parse(name)?, now())
        .map(drop)
}

#[test]
fn accepts_what_our_pki_issues_for_each_of_its_names() {
    let ca = ca("IoT gateway CA");
    let cert = issue(&ca, gateway_params());
    for name in [
        "localhost",
        "LocalHost",
        "127.0.0.1",
        "::1",
        "gw-7.site.example",
    ] {
        assert_eq!(check(&ca.der, &cert, name), Ok(()), "{name}");
    }
}

#[test]
fn refuses_names_the_certificate_does_not_carry() {
    let ca = ca("IoT gateway CA");
    let cert = issue(&ca, gateway_params());
    for name in [
        "gateway",
        "gateway.invalid",
        "127.0.0.2",
        "::2",
        "site.example",
        "a.b.site.example",
    ] {
        assert_eq!(
            check(&ca.der, &cert, name),
            Err(CertError::NameMismatch),
            "{name}"
        );
    }
    // The CN is not a name to match (RFC 6125 §6.4.4): a certificate without
    // subjectAltName matches nothing.
    let mut params = gateway_params();
    params.subject_alt_names.clear();
    params.distinguished_name = dn("localhost");
    let cert = issue(&ca, params);
    assert_eq!(
        check(&ca.der, &cert, "localhost"),
        Err(CertError::NameMismatch)
    );
    assert_eq!(
        check(&ca.der, &cert, "bad name!"),
        Err(CertError::InvalidName)
    );
}

#[test]
fn refuses_certificates_from_another_ca() {
    let ours = ca("IoT gateway CA");
    let theirs = ca("another CA");
    let cert = issue(&theirs, gateway_params());
    assert_eq!(
        check(&ours.der, &cert, "localhost"),
        Err(CertError::UnknownIssuer)
    );
    // Another CA that took our CA's name: its signature gives it away.
    let impostor = ca("IoT gateway CA");
    let cert = issue(&impostor, gateway_params());
    assert_eq!(
        check(&ours.der, &cert, "localhost"),
        Err(CertError::BadSignature)
    );
}

#[test]
fn refuses_certificates_outside_their_validity_unless_there_is_no_clock() {
    let ca = ca("IoT gateway CA");
    let anchor = TrustAnchor::from_der(&ca.der).unwrap();
    let name = ServerName::parse("localhost").unwrap();
    let day = Duration::from_secs(86_400);

    let mut expired = gateway_params();
    expired.not_before = (SystemTime::now() - 3 * day).into();
    expired.not_after = (SystemTime::now() - day).into();
    let expired = issue(&ca, expired);
    let expired = ServerCert::parse(&expired).unwrap();
    assert_eq!(
        expired.verify(&anchor, name, now()).map(drop),
        Err(CertError::Expired)
    );
    assert!(expired.verify(&anchor, name, None).is_ok());

    let mut early = gateway_params();
    early.not_before = (SystemTime::now() + day).into();
    early.not_after = (SystemTime::now() + 2 * day).into();
    let early = issue(&ca, early);
    let early = ServerCert::parse(&early).unwrap();
    assert_eq!(
        early.verify(&anchor, name, now()).map(drop),
        Err(CertError::NotYetValid)
    );

    // GeneralizedTime (years from 2050 on) reads as well as UTCTime.
    let mut far = gateway_params();
    far.not_after = rcgen::date_time_ymd(2070, 1, 1);
    let far = issue(&ca, far);
    assert_eq!(check(&ca.der, &far, "localhost"), Ok(()));
    let far = ServerCert::parse(&far).unwrap();
    let after_2070 = 3_155_760_001; // 2070-01-01T00:00:00Z is 3,155,760,000.
    assert_eq!(
        far.verify(&anchor, name, Some(after_2070)).map(drop),
        Err(CertError::Expired)
    );
}

#[test]
fn refuses_certificates_not_meant_for_a_server() {
    let ca = ca("IoT gateway CA");
    let mut client = gateway_params();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let mut no_signing = gateway_params();
    no_signing.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    let mut a_ca = gateway_params();
    a_ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    for params in [client, no_signing, a_ca] {
        let cert = issue(&ca, params);
        assert_eq!(
            check(&ca.der, &cert, "localhost"),
            Err(CertError::NotForServer)
        );
    }
    // Without key usage extensions at all, nothing forbids it.
    let mut plain = gateway_params();
    plain.key_usages.clear();
    plain.extended_key_usages.clear();
    plain.is_ca = IsCa::NoCa;
    assert_eq!(check(&ca.der, &issue(&ca, plain), "localhost"), Ok(()));
}

#[test]
fn refuses_unknown_critical_extensions_only() {
    let ca = ca("IoT gateway CA");
    let mut critical = gateway_params();
    let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
    ext.set_criticality(true);
    critical.custom_extensions = vec![ext];
    assert_eq!(
        check(&ca.der, &issue(&ca, critical), "localhost"),
        Err(CertError::UnknownCriticalExtension)
    );
    let mut optional = gateway_params();
    optional.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![5, 0],
    )];
    assert_eq!(check(&ca.der, &issue(&ca, optional), "localhost"), Ok(()));
}

#[test]
fn refuses_other_algorithms() {
    let ca256 = ca("IoT gateway CA");
    // A P-384 or Ed25519 gateway key, under our CA.
    for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
        let cert = issue_with(&ca256, gateway_params(), alg);
        assert_eq!(
            check(&ca256.der, &cert, "localhost"),
            Err(CertError::Unsupported)
        );
    }
    // Signed by a P-384 CA (ecdsa-with-SHA384), and that CA as a trust anchor.
    let ca384 = ca_with("IoT gateway CA", &PKCS_ECDSA_P384_SHA384);
    let cert = issue(&ca384, gateway_params());
    assert_eq!(
        ServerCert::parse(&cert).map(drop),
        Err(CertError::Unsupported)
    );
    assert_eq!(
        TrustAnchor::from_der(&ca384.der).map(drop),
        Err(CertError::Unsupported)
    );
}

#[test]
fn refuses_what_is_not_der() {
    let ca = ca("IoT gateway CA");
    let cert = issue(&ca, gateway_params());
    let mut trailing = cert.clone();
    trailing.push(0);
    for bad in [
        &[][..],
        &cert[..cert.len() - 1],
        &trailing,
        &cert[4..],
        b"-----BEGIN CERTIFICATE-----",
    ] {
        assert_eq!(
            ServerCert::parse(bad).map(drop),
            Err(CertError::Malformed),
            "{} bytes",
            bad.len()
        );
    }
    assert_eq!(
        TrustAnchor::from_der(b"not a CA").map(drop),
        Err(CertError::Malformed)
    );
}

/// The TLS 1.3 CertificateVerify input (RFC 8446 §4.4.3).
fn signed_content(hash: &[u8; 32]) -> Vec<u8> {
    let mut m = vec![b' '; 64];
    m.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    m.extend_from_slice(hash);
    m
}

/// A gateway certificate and its key as p256 reads it.
fn gateway_with_key(ca: &Ca) -> (Vec<u8>, p256::ecdsa::SigningKey) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = gateway_params().signed_by(&key, &ca.issuer).unwrap();
    let signing = p256::ecdsa::SigningKey::from_pkcs8_der(&key.serialize_der()).unwrap();
    (cert.der().to_vec(), signing)
}

#[test]
fn handshake_signatures_verify_only_with_the_certificate_key_and_hash() {
    let ca = ca("IoT gateway CA");
    let (cert, key) = gateway_with_key(&ca);
    let anchor = TrustAnchor::from_der(&ca.der).unwrap();
    let verifying = ServerCert::parse(&cert)
        .unwrap()
        .verify(&anchor, ServerName::parse("localhost").unwrap(), now())
        .unwrap();
    let hash = [7u8; 32];
    let sig: p256::ecdsa::DerSignature = key.sign(&signed_content(&hash));
    assert_eq!(
        verify_handshake_signature(&verifying, &hash, sig.as_bytes()),
        Ok(())
    );
    assert_eq!(
        verify_handshake_signature(&verifying, &[8u8; 32], sig.as_bytes()),
        Err(CertError::BadHandshakeSignature)
    );
    let other = p256::ecdsa::SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
    let forged: p256::ecdsa::DerSignature = other.sign(&signed_content(&hash));
    assert_eq!(
        verify_handshake_signature(&verifying, &hash, forged.as_bytes()),
        Err(CertError::BadHandshakeSignature)
    );
    assert_eq!(
        verify_handshake_signature(&verifying, &hash, &[0x30, 0x00]),
        Err(CertError::BadHandshakeSignature)
    );
}

fn certificate_message(cert: &[u8]) -> CertificateRef<'_> {
    let mut msg = CertificateRef::with_context(&[]);
    msg.add(CertificateEntryRef::X509(cert)).unwrap();
    msg
}

/// embedded-tls 0.19 finishes a handshake in which the server sent no Certificate or no
/// CertificateVerify; the verifier must then say the gateway proved nothing.
#[test]
fn verifier_reports_no_proof_unless_certificate_and_signature_both_verified() {
    let ca = ca("IoT gateway CA");
    let (cert, key) = gateway_with_key(&ca);
    let anchor = TrustAnchor::from_der(&ca.der).unwrap();
    let mut transcript = Sha256::new();
    transcript.update(b"ClientHello ... Certificate");
    let hash: [u8; 32] = transcript.clone().finalize().into();
    let good: p256::ecdsa::DerSignature = key.sign(&signed_content(&hash));
    let scheme = SignatureScheme::EcdsaSecp256r1Sha256;

    let mut v: GatewayVerifier<'_, NoClock> = GatewayVerifier::new(anchor.clone());
    // Nothing at all.
    v.set_hostname_verification("localhost").unwrap();
    assert_eq!(v.gateway_check(), Err(CertError::NoProof));
    // A (public, replayable) certificate but no signature.
    v.verify_certificate(&transcript, certificate_message(&cert))
        .unwrap();
    assert_eq!(v.gateway_check(), Err(CertError::NoProof));
    // Both: proved. A new handshake forgets it.
    let verify = CertificateVerifyRef {
        signature_scheme: scheme,
        signature: good.as_bytes(),
    };
    v.verify_signature(verify).unwrap();
    assert_eq!(v.gateway_check(), Ok(()));
    v.set_hostname_verification("localhost").unwrap();
    assert_eq!(v.gateway_check(), Err(CertError::NoProof));
    // A signature without a certificate before it.
    let verify = CertificateVerifyRef {
        signature_scheme: scheme,
        signature: good.as_bytes(),
    };
    assert!(v.verify_signature(verify).is_err());
    assert_eq!(v.gateway_check(), Err(CertError::NoProof));
    // A signature over another transcript.
    v.set_hostname_verification("localhost").unwrap();
    let mut other = Sha256::new();
    other.update(b"another handshake");
    v.verify_certificate(&other, certificate_message(&cert))
        .unwrap();
    let verify = CertificateVerifyRef {
        signature_scheme: scheme,
        signature: good.as_bytes(),
    };
    assert!(v.verify_signature(verify).is_err());
    assert_eq!(v.gateway_check(), Err(CertError::BadHandshakeSignature));
    // A certificate for another name: the reason is kept.
    v.set_hostname_verification("gateway.invalid").unwrap();
    assert!(
        v.verify_certificate(&transcript, certificate_message(&cert))
            .is_err()
    );
    assert_eq!(v.gateway_check(), Err(CertError::NameMismatch));
    // A name longer than the verifier keeps.
    let long = "a".repeat(63) + "." + &"b".repeat(63) + ".example";
    assert!(v.set_hostname_verification(&long).is_err());
    assert_eq!(v.gateway_check(), Err(CertError::InvalidName));
    // A success is forgotten when the connector begins the next handshake, even one
    // that never sets a name.
    v.set_hostname_verification("localhost").unwrap();
    v.verify_certificate(&transcript, certificate_message(&cert))
        .unwrap();
    let verify = CertificateVerifyRef {
        signature_scheme: scheme,
        signature: good.as_bytes(),
    };
    v.verify_signature(verify).unwrap();
    assert_eq!(v.gateway_check(), Ok(()));
    v.forget_gateway();
    assert_eq!(v.gateway_check(), Err(CertError::NoProof));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any bytes: an answer, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let _ = ServerCert::parse(&bytes);
        let _ = TrustAnchor::from_der(&bytes);
    }
}

/// Every single-byte change to a valid certificate is refused: DER has one encoding
/// per value and the signature covers the rest.
#[test]
fn every_single_byte_change_is_refused() {
    let ca = ca("IoT gateway CA");
    let cert = issue(&ca, gateway_params());
    assert_eq!(check(&ca.der, &cert, "localhost"), Ok(()));
    let mut changed = cert.clone();
    for i in 0..cert.len() {
        for flip in [0x01, 0x80] {
            changed[i] ^= flip;
            let verdict = check(&ca.der, &changed, "localhost");
            assert!(verdict.is_err(), "byte {i} ^ {flip:#x} accepted");
            changed[i] ^= flip;
        }
    }
}

// ----------------------------------------------------------------------------------------
// A second opinion: rustls's own verifier (webpki) on the same certificates. Whatever
// this verifier accepts, webpki must accept too; and within our profile, what webpki
// accepts this one accepts, except where this one is stricter on purpose (a key usage
// without digitalSignature).

/// One way to make a gateway certificate, and the name dialled.
#[derive(Debug, Clone)]
struct Case {
    sans: u8,
    dialled: &'static str,
    /// 0 valid, 1 expired, 2 not yet valid.
    validity: u8,
    /// 0 none, 1 serverAuth, 2 clientAuth, 3 both.
    eku: u8,
    /// 0 none, 1 digitalSignature, 2 keyEncipherment.
    ku: u8,
    /// 0 CA:FALSE, 1 no basicConstraints, 2 CA:TRUE.
    ca: u8,
    critical_unknown: bool,
    /// 0 our CA, 1 another CA, 2 another CA with our CA's name.
    issuer: u8,
}

const SANS: [&str; 5] = [
    "localhost",
    "*.site.example",
    "127.0.0.1",
    "::1",
    "gw.example",
];
const DIALLED: [&str; 8] = [
    "localhost",
    "gw.example",
    "x.site.example",
    "site.example",
    "a.x.site.example",
    "127.0.0.1",
    "::1",
    "10.0.0.1",
];

fn case() -> impl Strategy<Value = Case> {
    (
        0u8..32,
        0usize..DIALLED.len(),
        0u8..3,
        0u8..4,
        0u8..3,
        0u8..3,
        any::<bool>(),
        0u8..3,
    )
        .prop_map(
            |(sans, d, validity, eku, ku, ca, critical_unknown, issuer)| Case {
                sans,
                dialled: DIALLED[d],
                validity,
                eku,
                ku,
                ca,
                critical_unknown,
                issuer,
            },
        )
}

fn params_for(case: &Case) -> CertificateParams {
    let mut p = gateway_params();
    p.subject_alt_names = SANS
        .iter()
        .enumerate()
        .filter(|(i, _)| case.sans & (1 << i) != 0)
        .map(|(_, name)| match name.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*name).try_into().unwrap()),
        })
        .collect();
    let day = Duration::from_secs(86_400);
    match case.validity {
        1 => {
            p.not_before = (SystemTime::now() - 3 * day).into();
            p.not_after = (SystemTime::now() - day).into();
        }
        2 => {
            p.not_before = (SystemTime::now() + day).into();
            p.not_after = (SystemTime::now() + 2 * day).into();
        }
        _ => {}
    }
    p.extended_key_usages = match case.eku {
        0 => vec![],
        1 => vec![ExtendedKeyUsagePurpose::ServerAuth],
        2 => vec![ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ],
    };
    p.key_usages = match case.ku {
        0 => vec![],
        1 => vec![KeyUsagePurpose::DigitalSignature],
        _ => vec![KeyUsagePurpose::KeyEncipherment],
    };
    p.is_ca = match case.ca {
        0 => IsCa::ExplicitNoCa,
        1 => IsCa::NoCa,
        _ => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    if case.critical_unknown {
        let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
        ext.set_criticality(true);
        p.custom_extensions = vec![ext];
    }
    p
}

fn webpki_verdict(ca: &[u8], cert: &[u8], name: &str) -> Result<(), webpki::Error> {
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    let ca = CertificateDer::from(ca);
    let anchor = webpki::anchor_from_trusted_cert(&ca)?;
    let cert = CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&cert)?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )?;
    let name = ServerName::try_from(name).map_err(|_| webpki::Error::BadDer)?;
    ee.verify_is_valid_for_subject_name(&name)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn agrees_with_webpki(case in case()) {
        let ours_ca = ca("IoT gateway CA");
        let issuer = match case.issuer {
            0 => None,
            1 => Some(ca("another CA")),
            _ => Some(ca("IoT gateway CA")),
        };
        let cert = issue(issuer.as_ref().unwrap_or(&ours_ca), params_for(&case));
        let ours = check(&ours_ca.der, &cert, case.dialled);
        let theirs = webpki_verdict(&ours_ca.der, &cert, case.dialled);
        // Never more lenient than webpki.
        prop_assert!(ours.is_err() || theirs.is_ok(), "{case:?}: ours {ours:?}, webpki {theirs:?}");
        // Within the profile, never stricter, but for key usage on purpose.
        if case.ku != 2 {
            prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{:?}: ours {:?}, webpki {:?}", case, ours, theirs);
        }
    }
}
