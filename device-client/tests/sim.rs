//! The simulator (`device_client::sim`) against small TLS servers on 127.0.0.1: how it
//! ends its connections, how its summary counts refusals, and how a device installs an
//! offered firmware image and restarts into it. (Against the real gateway:
//! `tests/tests/simulator.rs`.)
#![cfg(feature = "sim")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_client::firmware::{MAX_MANIFEST_LEN, Manifest, RELEASE_KEY_LEN};
use device_client::proto::{
    self, Ack, Blob, Downlink, FirmwareChunk, FirmwareOffer, FirmwareOutcome, Fixed,
    PROTOCOL_VERSION, Text, Uplink, Welcome,
};
use device_client::sim::{
    DeviceIdentity, Devices, FIRMWARE, SimConfig, SimError, Simulator, Summary, client_config,
    load_release_key,
};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA, a server certificate for `localhost` and one device, `sim-0000`.
struct Pki {
    ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server: (CertificateDer<'static>, PrivateKeyDer<'static>),
    device: (CertificateDer<'static>, PrivateKeyDer<'static>),
    device_serial: SerialNumber,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::try_from(key.serialize_der()).unwrap()
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("Test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(params, ca_key);

        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("gateway");
        params.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = params.signed_by(&server_key, &issuer).unwrap();

        let device_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("sim-0000");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let device_serial = SerialNumber::from_slice(&[0x42, 1, 2, 3]);
        params.serial_number = Some(device_serial.clone());
        let device = params.signed_by(&device_key, &issuer).unwrap();

        Self {
            ca,
            issuer,
            server: (server.der().clone(), key_der(&server_key)),
            device: (device.der().clone(), key_der(&device_key)),
            device_serial,
        }
    }

    /// A CRL that revokes the device.
    fn crl(&self) -> CertificateRevocationListDer<'static> {
        let crl = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: self.device_serial.clone(),
                revocation_time: rcgen::date_time_ymd(2020, 1, 1),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        };
        crl.signed_by(&self.issuer).unwrap().der().clone()
    }

    /// Mutual TLS as the gateway does it; with `revoked`, the device is on the CRL.
    fn server_config(&self, revoked: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if revoked {
            verifier = verifier.with_crls(vec![self.crl()]);
        }
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier.build().unwrap())
            .with_single_cert(vec![self.server.0.clone()], self.server.1.clone_key())
            .unwrap();
        Arc::new(config)
    }

    fn devices(&self) -> Devices {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let tls = client_config(
            Arc::new(roots),
            vec![self.device.0.clone()],
            self.device.1.clone_key(),
        )
        .unwrap();
        Devices::Loaded(vec![DeviceIdentity {
            id: "sim-0000".into(),
            tls,
        }])
    }
}

/// Quick reconnects, one thread, a run of `run`.
fn config(addr: SocketAddr, devices: Devices, rate: f64, run: Duration) -> SimConfig {
    let mut c = SimConfig::new(addr.to_string(), devices);
    c.rate = rate;
    c.threads = Some(1);
    c.duration = Some(run);
    c.drain_timeout = Duration::from_secs(5);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(200);
    c
}

/// How a connection ended, as the server saw it.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// The handshake failed (e.g. the certificate is revoked).
    Refused,
    /// TLS close_notify, then EOF.
    CloseNotify,
    /// Anything else: EOF without close_notify, a reset, ...
    Unclean(String),
}

/// A firmware image the minimal gateway offers after `Welcome` to a device that runs
/// another version, and what it saw of the transfer.
struct Rollout {
    image: Vec<u8>,
    version: &'static str,
    sha256: [u8; 32],
    signature: [u8; 64],
    /// (boot id, firmware) of every `Hello`.
    hellos: Mutex<Vec<(u64, String)>>,
    statuses: Mutex<Vec<FirmwareOutcome>>,
}

impl Rollout {
    fn new(image: Vec<u8>, version: &'static str, key: &SigningKey) -> Self {
        let sha256: [u8; 32] = Sha256::digest(&image).into();
        let manifest = Manifest {
            version,
            size: image.len() as u32,
            sha256,
        };
        let mut buf = [0u8; MAX_MANIFEST_LEN];
        let signature: Signature = key.sign(manifest.signed_bytes(&mut buf).unwrap());
        Self {
            image,
            version,
            sha256,
            signature: signature.to_bytes().into(),
            hellos: Mutex::default(),
            statuses: Mutex::default(),
        }
    }
}

/// Accepts mutual TLS connections and plays a minimal gateway (Welcome, Ack, and a
/// firmware offer with `rollout`) with the real codec; records how each connection
/// ended.
async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    ends: Arc<Mutex<Vec<End>>>,
    rollout: Option<Arc<Rollout>>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let ends = ends.clone();
        let rollout = rollout.clone();
        tokio::spawn(async move {
            let end = match acceptor.accept(tcp).await {
                Err(_) => End::Refused,
                Ok(mut tls) => match session(&mut tls, rollout.as_deref()).await {
                    Ok(()) => End::CloseNotify,
                    Err(e) => End::Unclean(format!("{:?}: {e}", e.kind())),
                },
            };
            ends.lock().unwrap().push(end);
        });
    }
}

/// `Ok` when the peer ended with close_notify (rustls reads 0 bytes only then; a bare
/// EOF is an `UnexpectedEof` error).
async fn session(
    io: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    rollout: Option<&Rollout>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Ok(Some(f)) = proto::split_frame(&buf, 4096) {
            let mut replies = Vec::new();
            match proto::decode_uplink(f.body).unwrap() {
                Uplink::Hello(h) => {
                    replies.push(Downlink::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        heartbeat_s: 30,
                        last_acked: None,
                        server_time_ms: 0,
                        max_frame: 4096,
                    }));
                    if let Some(r) = rollout {
                        r.hellos
                            .lock()
                            .unwrap()
                            .push((h.boot_id, h.firmware.as_str().into()));
                        // Offered at every session start until the device runs it.
                        if h.firmware.as_str() != r.version
                            && !r
                                .statuses
                                .lock()
                                .unwrap()
                                .contains(&FirmwareOutcome::StorageError)
                        {
                            replies.push(Downlink::FirmwareOffer(FirmwareOffer {
                                id: 1,
                                version: Text::new(r.version).unwrap(),
                                size: r.image.len() as u32,
                                sha256: Fixed(r.sha256),
                                signature: Fixed(r.signature),
                            }));
                        }
                    }
                }
                Uplink::Telemetry(t) => replies.push(Downlink::Ack(Ack { seq: t.seq })),
                Uplink::FirmwareRequest(q) => {
                    let image = rollout.map(|r| r.image.as_slice()).unwrap_or_default();
                    let from = (q.offset as usize).min(image.len());
                    let to = (from + usize::from(q.len)).min(image.len());
                    replies.push(Downlink::FirmwareChunk(FirmwareChunk {
                        id: q.id,
                        offset: q.offset,
                        data: Blob::new(&image[from..to]).unwrap(),
                    }));
                }
                Uplink::FirmwareStatus(s) => {
                    if let Some(r) = rollout {
                        r.statuses.lock().unwrap().push(s.outcome);
                    }
                }
                Uplink::Reported(_) => {}
                _ => replies.push(Downlink::Ack(Ack { seq: 0 })),
            }
            for reply in replies {
                let mut out = [0u8; 4200];
                let len = proto::encode(&reply, &mut out).unwrap();
                io.write_all(&out[..len]).await?;
            }
            let used = f.len;
            buf.drain(..used);
        }
    }
}

async fn server(pki: &Pki, revoked: bool) -> (SocketAddr, Arc<Mutex<Vec<End>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ends = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(serve(
        listener,
        pki.server_config(revoked),
        ends.clone(),
        None,
    ));
    (addr, ends)
}

async fn rollout_server(pki: &Pki, rollout: Arc<Rollout>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ends = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(serve(
        listener,
        pki.server_config(false),
        ends,
        Some(rollout),
    ));
    addr
}

/// Waits (a little) for the server to have seen `n` connections end.
async fn ended(ends: &Mutex<Vec<End>>, n: usize) -> Vec<End> {
    for _ in 0..200 {
        let seen = ends.lock().unwrap().clone();
        if seen.len() >= n {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ends.lock().unwrap().clone()
}

fn show(s: &Summary) -> String {
    format!(
        "connects {}, disconnects {} {:?}, connect failures {} {:?}, fatal {}, per device {:?}",
        s.counts.connects,
        s.counts.disconnects,
        s.counts.disconnects_by_reason,
        s.counts.connect_failures,
        s.counts.connect_failures_by_reason,
        s.counts.fatal,
        s.per_device
    )
}

/// At the end of the run a device closes its TLS connection with close_notify
/// (PROTOCOL.md §8.5), so the gateway sees a clean end, not a dropped socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_end_each_connection_is_closed_with_close_notify() {
    let pki = Pki::new();
    let (addr, ends) = server(&pki, false).await;
    let sim = Simulator::start(config(
        addr,
        pki.devices(),
        20.0,
        Duration::from_millis(1500),
    ))
    .unwrap();
    let summary = sim.wait().await.unwrap();
    assert_eq!(summary.counts.connects, 1, "{}", show(&summary));
    assert!(
        summary.drained && summary.counts.acked > 0,
        "{}",
        show(&summary)
    );
    assert_eq!(ended(&ends, 1).await, [End::CloseNotify]);
}

/// A connect that fails is one connect failure, not also a disconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_is_counted_once() {
    let pki = Pki::new();
    // A port nobody listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sim =
        Simulator::start(config(addr, pki.devices(), 0.0, Duration::from_millis(700))).unwrap();
    let s = sim.wait().await.unwrap();
    assert!(s.counts.connect_failures >= 2, "{}", show(&s));
    assert_eq!(
        s.counts.connect_failures_by_reason.get("refused"),
        Some(&s.counts.connect_failures),
        "{}",
        show(&s)
    );
    assert_eq!(
        s.counts.disconnects,
        0,
        "no session ever opened: {}",
        show(&s)
    );
    assert!(s.counts.disconnects_by_reason.is_empty(), "{}", show(&s));
    assert_eq!((s.counts.connects, s.counts.fatal), (0, 0), "{}", show(&s));
}

/// A revoked certificate is refused by the handshake (TLS 1.3: an alert on the first
/// read after it). That is a refused connect, for good (PROTOCOL.md §8.5: no reconnect
/// after revocation), not a session that closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_handshake_is_a_refusal_not_a_disconnect() {
    let pki = Pki::new();
    let (addr, ends) = server(&pki, true).await;
    let sim = Simulator::start(config(
        addr,
        pki.devices(),
        1.0,
        Duration::from_millis(1500),
    ))
    .unwrap();
    let s = sim.wait().await.unwrap();
    assert_eq!(s.counts.connect_failures, 1, "{}", show(&s));
    assert_eq!(
        s.counts.connect_failures_by_reason.get("revoked"),
        Some(&1),
        "{}",
        show(&s)
    );
    assert_eq!(s.counts.disconnects, 0, "{}", show(&s));
    assert_eq!(s.counts.connects, 0, "{}", show(&s));
    assert_eq!(s.counts.fatal, 1, "{}", show(&s));
    let why = s.per_device[0].fatal.as_deref().unwrap_or_default();
    assert!(why.contains("revoked"), "{why}");
    // One attempt only: a revoked device does not knock again.
    assert_eq!(ended(&ends, 1).await, [End::Refused]);
}

/// `device-sim --version` names the program, not the crate.
#[test]
fn version_names_device_sim() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("device-sim {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// Progress and errors go to stderr for a person; stderr gone (a pipe whose reader
/// quit, `device-sim ... 2>&1 | head -1`) must not turn an error exit into a panic.
#[test]
fn a_closed_stderr_is_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_device-sim"))
        .args([
            "--gateway",
            "127.0.0.1:9",
            "--certs",
            "/nonexistent",
            "--devices",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "an error exit, not a panic (101)");
}

fn release_key() -> SigningKey {
    SigningKey::from_bytes(&[0x6b; 32].into()).unwrap()
}

fn release_public(key: &SigningKey) -> [u8; RELEASE_KEY_LEN] {
    key.verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .unwrap()
}

fn firmware_image() -> Vec<u8> {
    (0..30_000u32).map(|i| (i * 7 % 253) as u8).collect()
}

/// A device takes the offered image (checked with the release key), says `Verified`,
/// restarts with a new boot id and says the new version in its next `Hello`; the
/// gateway then offers nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_installs_an_offered_image_and_restarts_into_it() {
    let pki = Pki::new();
    let key = release_key();
    let rollout = Arc::new(Rollout::new(firmware_image(), "sim-fw-2.0", &key));
    let addr = rollout_server(&pki, rollout.clone()).await;
    let mut c = config(addr, pki.devices(), 5.0, Duration::from_millis(2500));
    c.release_key = Some(release_public(&key));
    let s = Simulator::start(c).unwrap().wait().await.unwrap();
    assert_eq!(
        *rollout.statuses.lock().unwrap(),
        [FirmwareOutcome::Verified]
    );
    let hellos = rollout.hellos.lock().unwrap().clone();
    assert_eq!(hellos.len(), 2, "{hellos:?}");
    assert_eq!(hellos[0].1, FIRMWARE);
    assert_eq!(hellos[1].1, "sim-fw-2.0");
    assert_ne!(hellos[0].0, hellos[1].0, "a new boot id");
    assert_eq!(
        (s.counts.firmware_installed, s.counts.firmware_failed),
        (1, 0),
        "{}",
        show(&s)
    );
    let d = &s.per_device[0];
    assert_eq!(
        (d.firmware.as_str(), d.firmware_installs),
        ("sim-fw-2.0", 1)
    );
    assert_eq!(
        d.boots.iter().map(|b| b.boot_id).collect::<Vec<_>>(),
        hellos.iter().map(|h| h.0).collect::<Vec<_>>()
    );
    assert!(s.drained, "{}", show(&s));
}

/// With `firmware_failure_rate` 1 every device downloads the image and reports a
/// storage error; it keeps running its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_device_reports_a_storage_error_and_keeps_its_version() {
    let pki = Pki::new();
    let key = release_key();
    let rollout = Arc::new(Rollout::new(firmware_image(), "sim-fw-2.0", &key));
    let addr = rollout_server(&pki, rollout.clone()).await;
    let mut c = config(addr, pki.devices(), 5.0, Duration::from_millis(1500));
    c.release_key = Some(release_public(&key));
    c.firmware_failure_rate = 1.0;
    let s = Simulator::start(c).unwrap().wait().await.unwrap();
    assert_eq!(
        *rollout.statuses.lock().unwrap(),
        [FirmwareOutcome::StorageError]
    );
    assert_eq!(
        (s.counts.firmware_installed, s.counts.firmware_failed),
        (0, 1),
        "{}",
        show(&s)
    );
    let d = &s.per_device[0];
    assert_eq!((d.firmware.as_str(), d.boots.len()), (FIRMWARE, 1));
}

/// `--release-key` takes `certs release-key`'s `release.pub.bin` or `release.pub.pem`.
#[test]
fn a_release_key_loads_from_its_bin_or_pem_file() {
    use p256::pkcs8::{EncodePublicKey, LineEnding};
    let key = release_key();
    let public = release_public(&key);
    let dir = std::env::temp_dir().join(format!("device-sim-release-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("release.pub.bin");
    let pem = dir.join("release.pub.pem");
    std::fs::write(&bin, public).unwrap();
    let pem_text = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    std::fs::write(&pem, pem_text).unwrap();
    assert_eq!(load_release_key(&bin).unwrap(), public);
    assert_eq!(load_release_key(&pem).unwrap(), public);
    let short = dir.join("short.bin");
    std::fs::write(&short, &public[..64]).unwrap();
    let err = load_release_key(&short).unwrap_err();
    assert!(matches!(err, SimError::Pem { .. }), "{err}");
    assert!(err.to_string().contains("64 bytes"), "{err}");
    let garbage = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    assert!(load_release_key(&garbage).is_err());
    assert!(load_release_key(&dir.join("missing")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
    // A key that is no P-256 point is refused before anything starts.
    let mut c = SimConfig::new("127.0.0.1:9", Devices::Loaded(Vec::new()));
    c.release_key = Some([4; RELEASE_KEY_LEN]);
    assert!(matches!(Simulator::start(c), Err(SimError::Config(_))));
    let mut c = SimConfig::new("127.0.0.1:9", Devices::Loaded(Vec::new()));
    c.firmware_failure_rate = 1.5;
    assert!(matches!(Simulator::start(c), Err(SimError::Config(_))));
}
