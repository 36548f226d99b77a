//! End-to-end: an outside TLS scan of a real gateway. `sslyze` (an OpenSSL-based
//! scanner, a separate process that shares no code with rustls) probes the device
//! listener on 127.0.0.1 and the test checks what it found against the TLS profile of
//! PROTOCOL.md §2.2: only TLS 1.2 and 1.3, only AEAD cipher suites with forward
//! secrecy, a client certificate required, no compression, no renegotiation, no 0-RTT,
//! and none of the classic implementation bugs (Heartbleed, CCS injection, ROBOT).
//!
//! Two scans per gateway, because they see different things:
//! - *without* a certificate, as an attacker on the network: sslyze reports that a
//!   client certificate is REQUIRED (it only reports this when it has none), and
//!   enumerates versions and cipher suites (a suite counts as accepted once the server
//!   chose it and asked for a certificate);
//! - *with* a device certificate from the gateway's CA, as a device: renegotiation and
//!   early data can only be tried over a completed handshake (without a certificate
//!   sslyze answers CLIENT_CERTIFICATE_NEEDED for them). It enumerates TLS 1.2 and 1.3
//!   again, which must give the same suites as the scan without.
//!
//! Needs `sslyze` on the PATH (`.ci/run` installs the pinned version with pip). Without
//! it the test says so and passes, so that a laptop without it can still run the suite;
//! set `REQUIRE_SSLYZE=1` (as CI does) to make its absence a failure. Each scan's JSON
//! is kept in `target/tmp/tls_scan-*.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{RawDevice, TestGateway, WAIT};
use rustls::HandshakeKind;
use rustls::pki_types::ServerName;
use serde_json::Value;

/// The version `.ci/run` installs; the JSON fields read here are those of this release.
const PINNED: &str = "6.3.1";

/// A whole scan takes seconds; this only stops a hung scanner from hanging CI.
const SCAN_TIMEOUT: Duration = Duration::from_secs(300);

/// sslyze's command-line flag for each scan command, and the key of its result in the
/// JSON (`server_scan_results[].scan_result.<key>`).
const COMMANDS: &[(&str, &str)] = &[
    ("--sslv2", "ssl_2_0_cipher_suites"),
    ("--sslv3", "ssl_3_0_cipher_suites"),
    ("--tlsv1", "tls_1_0_cipher_suites"),
    ("--tlsv1_1", "tls_1_1_cipher_suites"),
    ("--tlsv1_2", "tls_1_2_cipher_suites"),
    ("--tlsv1_3", "tls_1_3_cipher_suites"),
    ("--compression", "tls_compression"),
    ("--reneg", "session_renegotiation"),
    ("--early_data", "tls_1_3_early_data"),
    ("--heartbleed", "heartbleed"),
    ("--openssl_ccs", "openssl_ccs_injection"),
    ("--robot", "robot"),
    ("--fallback", "tls_fallback_scsv"),
    ("--ems", "tls_extended_master_secret"),
    ("--elliptic_curves", "elliptic_curves"),
];

/// Versions that must be refused outright.
const LEGACY_VERSIONS: [&str; 4] = [
    "ssl_2_0_cipher_suites",
    "ssl_3_0_cipher_suites",
    "tls_1_0_cipher_suites",
    "tls_1_1_cipher_suites",
];

/// The TLS 1.3 suites that are AEAD with AES-GCM or ChaCha20-Poly1305 (RFC 8446 §B.4;
/// the CCM suites are left out on purpose). Every TLS 1.3 key exchange is ephemeral.
const TLS13_AEAD: [&str; 3] = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// The AEAD bulk ciphers (with their PRF hash) a TLS 1.2 suite may use.
const TLS12_AEAD: [&str; 3] = [
    "AES_128_GCM_SHA256",
    "AES_256_GCM_SHA384",
    "CHACHA20_POLY1305_SHA256",
];

/// Groups a scan may find accepted: none below 256 bits, no binary or Koblitz curves.
const STRONG_GROUPS: [&str; 5] = ["X25519", "X448", "secp256r1", "secp384r1", "secp521r1"];

/// The `sslyze` executable on the PATH, if any.
fn find_sslyze() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("sslyze"))
        .find(|p| p.is_file())
}

/// The scanner, or `None` when the test should pass without it (never in CI).
fn sslyze_or_skip() -> Option<PathBuf> {
    let found = find_sslyze();
    if found.is_none() {
        let how = format!("pipx install sslyze=={PINNED}, or pip install it in a venv");
        assert!(
            !std::env::var("REQUIRE_SSLYZE").is_ok_and(|v| v == "1"),
            "REQUIRE_SSLYZE=1 but sslyze is not on the PATH; install it with `{how}`"
        );
        eprintln!("SKIPPED: sslyze is not on the PATH (install it with `{how}`)");
    }
    found
}

/// One finished scan of one server: `server_scan_results[0]` of sslyze's JSON.
struct Scan {
    label: &'static str,
    server: Value,
}

/// A device certificate and key as PEM files, for `--cert` and `--key`.
struct ClientCert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl ClientCert {
    fn issue(tg: &TestGateway, id: &str) -> Self {
        let issued = tg.pki.device(id);
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("scanner.pem");
        let key = dir.path().join("scanner.key.pem");
        std::fs::write(&cert, &issued.cert_pem).unwrap();
        std::fs::write(&key, &issued.key_pem).unwrap();
        Self {
            _dir: dir,
            cert,
            key,
        }
    }
}

/// Runs `sslyze` against `addr` with the given scan commands (JSON keys of
/// [`COMMANDS`]) and checks that the scan ran: exit status 0, the server reached, and
/// every requested command COMPLETED (not ERROR), with a result.
async fn scan(
    bin: &Path,
    label: &'static str,
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    commands: &[&str],
) -> Scan {
    let json_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls_scan-{label}.json"));
    let _ = std::fs::remove_file(&json_path);
    let mut cmd = tokio::process::Command::new(bin);
    // Mozilla's profile checks are for web servers; this test states its own profile.
    cmd.args(["--quiet", "--mozilla_config=disable"]);
    cmd.arg(format!("--json_out={}", json_path.display()));
    for key in commands {
        let flag = COMMANDS
            .iter()
            .find(|(_, k)| k == key)
            .unwrap_or_else(|| panic!("no sslyze flag for {key}"))
            .0;
        cmd.arg(flag);
    }
    if let Some(c) = cert {
        cmd.arg(format!("--cert={}", c.cert.display()));
        cmd.arg(format!("--key={}", c.key.display()));
        cmd.arg("--keyform=PEM");
    }
    // host:port{ip}: connect to the listener's address, send SNI `localhost` as a
    // device dialling the gateway by name would (PROTOCOL.md §2.2).
    cmd.arg(format!("localhost:{}{{{}}}", addr.port(), addr.ip()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);

    let started = Instant::now();
    let child = cmd.spawn().expect("starting sslyze");
    let out = tokio::time::timeout(SCAN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("sslyze ({label}) did not finish within {SCAN_TIMEOUT:?}"))
        .expect("waiting for sslyze");
    eprintln!("sslyze scan {label}: {:.1?}", started.elapsed());
    assert!(
        out.status.success(),
        "sslyze ({label}) failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json_path)
        .unwrap_or_else(|e| panic!("sslyze ({label}) wrote no JSON to {json_path:?}: {e}"));
    let doc: Value = serde_json::from_str(&text).expect("sslyze's JSON output");
    eprintln!(
        "sslyze {} ({label}), JSON in {}",
        str_at(&doc, "/sslyze_version"),
        json_path.display()
    );

    assert_eq!(
        at(&doc, "/invalid_server_strings"),
        &Value::Array(vec![]),
        "sslyze ({label}) could not parse its target"
    );
    let servers = at(&doc, "/server_scan_results")
        .as_array()
        .expect("server_scan_results is a list");
    assert_eq!(servers.len(), 1, "one target, one result ({label})");
    let server = servers[0].clone();
    assert_eq!(
        str_at(&server, "/connectivity_status"),
        "COMPLETED",
        "sslyze ({label}) could not connect: {}",
        at(&server, "/connectivity_error_trace")
    );
    assert_eq!(str_at(&server, "/scan_status"), "COMPLETED", "({label})");
    let scan = Scan { label, server };
    for key in commands {
        scan.result(key);
    }
    scan
}

impl Scan {
    /// The result of one scan command; fails unless the command COMPLETED.
    fn result(&self, key: &str) -> &Value {
        let attempt = at(&self.server, &format!("/scan_result/{key}"));
        assert_eq!(
            str_at(attempt, "/status"),
            "COMPLETED",
            "sslyze ({}) {key} did not complete: {} {}",
            self.label,
            at(attempt, "/error_reason"),
            at(attempt, "/error_trace").as_str().unwrap_or(""),
        );
        let result = at(attempt, "/result");
        assert!(!result.is_null(), "({}) {key} has no result", self.label);
        result
    }

    /// `connectivity_result.client_auth_requirement`: DISABLED, OPTIONAL or REQUIRED.
    fn client_auth_requirement(&self) -> &str {
        str_at(&self.server, "/connectivity_result/client_auth_requirement")
    }

    /// One protocol version's cipher-suite scan: whether sslyze found the version
    /// supported, and the accepted suites as (IANA name, ephemeral key type or None).
    /// Fails if a handshake timed out instead of being answered, since a timed-out
    /// suite is listed as rejected and could hide an accepted one.
    fn suites(&self, key: &str) -> (bool, Vec<(String, Option<String>)>) {
        let r = self.result(key);
        let rejected = at(r, "/rejected_cipher_suites").as_array().unwrap();
        let accepted = at(r, "/accepted_cipher_suites").as_array().unwrap();
        assert!(
            !rejected.is_empty() || !accepted.is_empty(),
            "({}) {key}: sslyze tried no cipher suite at all",
            self.label
        );
        for s in rejected {
            let why = str_at(s, "/error_message");
            assert!(
                !why.contains("timed out"),
                "({}) {key}: {} was not answered ({why}); the scan is inconclusive",
                self.label,
                str_at(s, "/cipher_suite/name")
            );
        }
        let accepted = accepted
            .iter()
            .map(|s| {
                assert!(
                    !bool_at(s, "/cipher_suite/is_anonymous"),
                    "({}) {key}: anonymous suite {s}",
                    self.label
                );
                (
                    str_at(s, "/cipher_suite/name").to_owned(),
                    s.pointer("/ephemeral_key/type_name")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                )
            })
            .collect();
        (bool_at(r, "/is_tls_version_supported"), accepted)
    }

    /// Asserts that `key`'s version is refused: no suite accepted.
    fn assert_refused(&self, key: &str) {
        let (supported, accepted) = self.suites(key);
        assert!(
            !supported && accepted.is_empty(),
            "({}) {key}: must be refused, but the gateway accepted {accepted:?}",
            self.label
        );
    }

    /// Asserts that `key` (TLS 1.2 or 1.3) is accepted with at least one suite, and only
    /// with AEAD suites (AES-GCM or ChaCha20-Poly1305) with an ephemeral ECDH key
    /// exchange. Returns the accepted suites' names, sorted.
    fn assert_aead_forward_secret(&self, key: &str) -> Vec<String> {
        let (supported, accepted) = self.suites(key);
        assert!(
            supported && !accepted.is_empty(),
            "({}) {key}: must be accepted, but no suite was",
            self.label
        );
        for (name, ephemeral) in &accepted {
            let aead = if key == "tls_1_3_cipher_suites" {
                TLS13_AEAD.contains(&name.as_str())
            } else {
                // TLS 1.2: TLS_ECDHE_<signature>_WITH_<AEAD>_<hash>.
                name.strip_prefix("TLS_ECDHE_")
                    .and_then(|rest| rest.split_once("_WITH_"))
                    .is_some_and(|(sig, bulk)| {
                        ["ECDSA", "RSA"].contains(&sig) && TLS12_AEAD.contains(&bulk)
                    })
            };
            assert!(
                aead,
                "({}) {key}: {name} is not an AEAD suite with ECDHE",
                self.label
            );
            // The key the handshake actually used: an ephemeral elliptic-curve key.
            assert_eq!(
                ephemeral.as_deref(),
                Some("ECDH"),
                "({}) {key}: {name} negotiated no ephemeral ECDH key",
                self.label
            );
        }
        let mut names: Vec<String> = accepted.into_iter().map(|(n, _)| n).collect();
        names.sort();
        names
    }

    fn bool(&self, key: &str, field: &str) -> bool {
        bool_at(self.result(key), field)
    }
}

fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("sslyze's JSON has no {pointer} (sslyze {PINNED} has)"))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    at(v, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string in {v}"))
}

fn bool_at(v: &Value, pointer: &str) -> bool {
    at(v, pointer)
        .as_bool()
        .unwrap_or_else(|| panic!("{pointer} is not a boolean in {v}"))
}

/// The scan commands of the scan without a certificate: everything that does not need
/// a completed handshake.
const WITHOUT_CERT: [&str; 13] = [
    "ssl_2_0_cipher_suites",
    "ssl_3_0_cipher_suites",
    "tls_1_0_cipher_suites",
    "tls_1_1_cipher_suites",
    "tls_1_2_cipher_suites",
    "tls_1_3_cipher_suites",
    "tls_compression",
    "heartbleed",
    "openssl_ccs_injection",
    "robot",
    "tls_fallback_scsv",
    "tls_extended_master_secret",
    "elliptic_curves",
];

/// The scan commands of the scan with a device certificate.
const WITH_CERT: [&str; 4] = [
    "tls_1_2_cipher_suites",
    "tls_1_3_cipher_suites",
    "session_renegotiation",
    "tls_1_3_early_data",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslyze_finds_only_the_tls_profile_of_the_protocol() {
    let Some(bin) = sslyze_or_skip() else {
        return;
    };
    let tg = TestGateway::start().await;

    // --- As an attacker: no certificate. ---
    let anon = scan(&bin, "default-anonymous", tg.addr(), None, &WITHOUT_CERT).await;

    // Mutual TLS: sslyze completes a handshake without a certificate, then finds the
    // connection refused (REQUIRED), not served (OPTIONAL).
    assert_eq!(
        anon.client_auth_requirement(),
        "REQUIRED",
        "the gateway must require a client certificate"
    );

    // Versions: nothing below TLS 1.2; TLS 1.2 and 1.3 each with AEAD + ECDHE only.
    for key in LEGACY_VERSIONS {
        anon.assert_refused(key);
    }
    let tls12 = anon.assert_aead_forward_secret("tls_1_2_cipher_suites");
    let tls13 = anon.assert_aead_forward_secret("tls_1_3_cipher_suites");
    // PROTOCOL.md §2.2: the suite every microcontroller offers.
    assert!(
        tls13.iter().any(|s| s == "TLS_AES_128_GCM_SHA256"),
        "TLS_AES_128_GCM_SHA256 must be accepted: {tls13:?}"
    );

    // No compression (CRIME), no known implementation bugs.
    assert!(!anon.bool("tls_compression", "/supports_compression"));
    assert!(!anon.bool("heartbleed", "/is_vulnerable_to_heartbleed"));
    assert!(!anon.bool("openssl_ccs_injection", "/is_vulnerable_to_ccs_injection"));
    let robot = str_at(anon.result("robot"), "/robot_result");
    assert!(robot.starts_with("NOT_VULNERABLE"), "ROBOT: {robot}");
    // Downgrade protection and the TLS 1.2 extended master secret (RFC 7627).
    assert!(anon.bool("tls_fallback_scsv", "/supports_fallback_scsv"));
    assert!(anon.bool("tls_extended_master_secret", "/supports_ems_extension"));

    // Key-exchange groups: secp256r1 (PROTOCOL.md §2.2 MUST), nothing weak.
    let groups: Vec<&str> = at(anon.result("elliptic_curves"), "/supported_curves")
        .as_array()
        .unwrap()
        .iter()
        .map(|c| str_at(c, "/name"))
        .collect();
    assert!(groups.contains(&"secp256r1"), "groups: {groups:?}");
    for g in &groups {
        assert!(STRONG_GROUPS.contains(g), "weak group accepted: {g}");
    }

    // --- As a device: a certificate from the gateway's CA. ---
    let cert = ClientCert::issue(&tg, "scanner-1");
    let device = scan(&bin, "default-device", tg.addr(), Some(&cert), &WITH_CERT).await;
    assert!(
        !at(
            &device.server,
            "/network_configuration/tls_client_auth_credentials"
        )
        .is_null(),
        "sslyze did not use the certificate"
    );
    // The certificate opens no other suite than the anonymous scan saw.
    assert_eq!(
        device.assert_aead_forward_secret("tls_1_2_cipher_suites"),
        tls12
    );
    assert_eq!(
        device.assert_aead_forward_secret("tls_1_3_cipher_suites"),
        tls13
    );

    // Renegotiation: over a completed TLS 1.2 handshake sslyze asks to renegotiate (up
    // to ten times); the gateway must not complete a single one. That handshake
    // negotiated RFC 5746 `renegotiation_info`, so the refused request is a *secure*
    // renegotiation: neither kind is accepted. `supports_secure_renegotiation` only
    // says that the extension was in the ServerHello (rustls answers it whenever a
    // client offers it); sslyze rates that OK, since without it a server that did
    // renegotiate would be open to CVE-2009-3555.
    let r = device.result("session_renegotiation");
    assert!(
        !bool_at(r, "/is_vulnerable_to_client_renegotiation_dos"),
        "renegotiation accepted: {r}"
    );
    assert_eq!(at(r, "/client_renegotiations_success_count"), 0, "{r}");
    assert!(bool_at(r, "/supports_secure_renegotiation"), "{r}");

    // 0-RTT: sslyze resumes with the gateway's TLS 1.3 ticket and tries early data.
    assert!(
        !device.bool("tls_1_3_early_data", "/supports_early_data"),
        "the gateway accepts TLS 1.3 early data"
    );
    // sslyze's JSON does not say whether it got a ticket at all (without one, "no early
    // data" would be vacuous). rustls tells: resume with the gateway's ticket and look
    // at what the ticket allows.
    assert_ticket_allows_no_early_data(&tg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslyze_finds_only_tls13_when_tls13_only() {
    let Some(bin) = sslyze_or_skip() else {
        return;
    };
    let tg = TestGateway::start_with(|config| config.tls13_only = true).await;
    let versions = &WITHOUT_CERT[..6];
    let anon = scan(&bin, "tls13-only-anonymous", tg.addr(), None, versions).await;
    assert_eq!(anon.client_auth_requirement(), "REQUIRED");
    for key in LEGACY_VERSIONS {
        anon.assert_refused(key);
    }
    anon.assert_refused("tls_1_2_cipher_suites");
    let tls13 = anon.assert_aead_forward_secret("tls_1_3_cipher_suites");
    assert!(tls13.iter().any(|s| s == "TLS_AES_128_GCM_SHA256"));
}

/// A device that resumes a session with the gateway's TLS 1.3 ticket may not send early
/// data: the ticket's `max_early_data_size` is 0. Proven on a resumption that happened,
/// so the check cannot pass for want of a ticket.
async fn assert_ticket_allows_no_early_data(tg: &TestGateway) {
    let cert = tg.pki.device("scanner-2");
    let mut config = (*e2e::client_config(&tg.pki.ca, Some(&cert))).clone();
    config.enable_early_data = true;
    let config = Arc::new(config);

    // A full session: the gateway sends its ticket right after the handshake, so the
    // client has processed it by the time `Welcome` arrives.
    let mut dev = RawDevice::connect_with(tg.addr(), config.clone())
        .await
        .unwrap();
    dev.hello(1).await;
    drop(dev);

    let addr = tg.addr();
    let (early_data_allowed, kind) = tokio::task::spawn_blocking(move || {
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        // Some only if the stored ticket allows early data (and the client wants it).
        let early_data_allowed = conn.early_data().is_some();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.set_write_timeout(Some(WAIT)).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        (early_data_allowed, conn.handshake_kind())
    })
    .await
    .unwrap();
    assert_eq!(
        kind,
        Some(HandshakeKind::Resumed),
        "the second connection did not resume with the gateway's ticket"
    );
    assert!(
        !early_data_allowed,
        "the gateway's TLS 1.3 ticket allows early data (0-RTT)"
    );
}
