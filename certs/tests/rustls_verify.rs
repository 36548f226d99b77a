//! Certificates minted in memory, checked by rustls the way the gateway and the device
//! simulator will use them: WebPkiClientVerifier with the CRL, WebPkiServerVerifier, and
//! a full TLS 1.3 mutual-TLS handshake between in-memory connections.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use certs::{Ca, CertInfo, Issued, RevokedEntry, Validity};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivateSec1KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{
    CertificateError, ClientConfig, ClientConnection, ConnectionCommon, Error, RootCertStore,
    ServerConfig, ServerConnection,
};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Ca) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.certificate_der()).unwrap();
    Arc::new(roots)
}

fn client_verifier(ca: &Ca, revoked: &[&Issued]) -> Arc<dyn ClientCertVerifier> {
    let entries: Vec<RevokedEntry> = revoked
        .iter()
        .map(|i| RevokedEntry::now(i.serial.clone()))
        .collect();
    let crl = ca.crl(&entries, 1, Validity::days(1)).unwrap();
    WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
        .with_crls([crl.crl_der()])
        .build()
        .unwrap()
}

fn cert_error(result: Result<impl Sized, Error>) -> CertificateError {
    match result {
        Err(Error::InvalidCertificate(e)) => e,
        Err(other) => panic!("expected a certificate error, got {other:?}"),
        Ok(_) => panic!("expected a certificate error, got success"),
    }
}

#[test]
fn client_verifier_with_crl() {
    let ca = Ca::generate("CA", Validity::days(30)).unwrap();
    let good = ca.issue_device("good", Validity::days(1)).unwrap();
    let revoked = ca.issue_device("revoked", Validity::days(1)).unwrap();
    let expired = ca.issue_device("expired", Validity::expired()).unwrap();
    let future = ca
        .issue_device("future", Validity::not_yet_valid())
        .unwrap();
    let gateway = ca.issue_gateway(&["gw".into()], Validity::days(1)).unwrap();
    let stranger = Ca::generate("other CA", Validity::days(30))
        .unwrap()
        .issue_device("good", Validity::days(1))
        .unwrap();
    let verifier = client_verifier(&ca, &[&revoked]);
    let now = UnixTime::now();
    let verify = |i: &Issued| verifier.verify_client_cert(&i.certificate_der(), &[], now);

    verify(&good).unwrap();
    assert_eq!(cert_error(verify(&revoked)), CertificateError::Revoked);
    assert!(matches!(
        cert_error(verify(&expired)),
        CertificateError::Expired | CertificateError::ExpiredContext { .. }
    ));
    assert!(matches!(
        cert_error(verify(&future)),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
    ));
    // A server certificate is not a client certificate (EKU).
    assert!(matches!(
        cert_error(verify(&gateway)),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
    ));
    assert_eq!(
        cert_error(verify(&stranger)),
        CertificateError::UnknownIssuer
    );

    // The chain check does not look at the CN: the gateway must apply the identity rule
    // itself. This is what the escape hatch is for.
    let raw = ca
        .danger_issue_client_cert_with_raw_cn("bad id/with slash", Validity::days(1))
        .unwrap();
    verify(&raw).unwrap();
}

#[test]
fn server_verifier_names() {
    let ca = Ca::generate("CA", Validity::days(30)).unwrap();
    let gateway = ca
        .issue_gateway(
            &["gw.example.com".into(), "10.0.0.7".into()],
            Validity::days(1),
        )
        .unwrap();
    let device = ca.issue_device("dev", Validity::days(1)).unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(&ca), provider())
        .build()
        .unwrap();
    let now = UnixTime::now();
    let verify = |i: &Issued, name: &str| {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier.verify_server_cert(&i.certificate_der(), &[], &name, &[], now)
    };
    for name in [
        "localhost",
        "127.0.0.1",
        "::1",
        "gw.example.com",
        "10.0.0.7",
    ] {
        verify(&gateway, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(matches!(
        cert_error(verify(&gateway, "other.example.com")),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
    ));
    // A device certificate is not a server certificate.
    assert!(verify(&device, "localhost").is_err());
}

/// Drives a handshake between two in-memory connections; returns the first error.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), Error> {
    for _ in 0..20 {
        deliver(client, server)?;
        deliver(server, client)?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

/// Hands everything `from` has to send to `to`, which processes it.
fn deliver<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
) -> Result<(), Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    if !buf.is_empty() {
        to.read_tls(&mut buf.as_slice()).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

fn connect(
    ca: &Ca,
    gateway: &Issued,
    device: &Issued,
    device_key: PrivateKeyDer<'static>,
    revoked: &[&Issued],
) -> Result<ServerConnection, Error> {
    let tls13 = &[&rustls::version::TLS13];
    let server_config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(tls13)
        .unwrap()
        .with_client_cert_verifier(client_verifier(ca, revoked))
        .with_single_cert(vec![gateway.certificate_der()], gateway.private_key_der())
        .unwrap();
    let client_config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(tls13)
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_client_auth_cert(vec![device.certificate_der()], device_key)
        .unwrap();
    let mut server = ServerConnection::new(Arc::new(server_config)).unwrap();
    let mut client = ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    handshake(&mut client, &mut server)?;
    Ok(server)
}

#[test]
fn mutual_tls_handshake() {
    let ca = Ca::generate("CA", Validity::days(30)).unwrap();
    let gateway = ca.issue_gateway(&[], Validity::days(1)).unwrap();
    let device = ca.issue_device("sensor-01", Validity::days(1)).unwrap();
    let revoked = ca.issue_device("revoked", Validity::days(1)).unwrap();

    // PKCS#8 key (what rustls users load from key.pem).
    let server = connect(
        &ca,
        &gateway,
        &device,
        device.private_key_der(),
        &[&revoked],
    )
    .unwrap();
    let peer = &server.peer_certificates().unwrap()[0];
    let info = CertInfo::from_der(peer).unwrap();
    assert_eq!(info.common_name.as_deref(), Some("sensor-01"));
    assert_eq!(info.serial, device.serial);

    // SEC1 key (what embedded-tls loads from key.der) is the same key.
    let sec1 = PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(device.key_sec1_der.clone()));
    connect(&ca, &gateway, &device, sec1, &[&revoked]).unwrap();

    // A revoked device is refused during the handshake.
    let err = connect(
        &ca,
        &gateway,
        &revoked,
        revoked.private_key_der(),
        &[&revoked],
    )
    .unwrap_err();
    assert_eq!(err, Error::InvalidCertificate(CertificateError::Revoked));
}
