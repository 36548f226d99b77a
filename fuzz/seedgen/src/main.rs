//! Writes the seed corpora of the fuzz targets into `fuzz/seeds/<target>/`:
//!
//! - `frame`: every golden vector (`device-client/tests/vectors/*.hex`) as a whole frame
//!   and as a bare body, and all uplink / all downlink frames back to back;
//! - `client_machine`: downlink vectors back to back behind the script prefix of that
//!   target (default configuration, no operations; see its module doc), a version-3
//!   session with a firmware offer, chunks and a cancel, and scripts with a
//!   configuration and operations spelled in `arbitrary`'s format (a version-2 session
//!   with desired state; a firmware transfer across sessions of versions 3, 2 and 3);
//! - `x509`: certificates minted by the `certs` library (CA, gateway, device, expired,
//!   another CA and its gateway) and the handshake signature the target checks;
//! - `gateway_inbound` (in `gateway/fuzz/seeds/`): uplink vectors back to back, `Hello`
//!   first, behind that target's header (`max_frame`, `Welcome.last_acked`, where to
//!   cut; see its module doc).
//!
//! Run from `fuzz/`: `cargo run -p seedgen [TARGET...]` (no target: all of them). The
//! certificates are random each time, so commit the output rather than re-running it
//! for `x509` (the target reads `ca.der`, `gateway.der` from here, whatever their keys).

use std::fs;
use std::path::{Path, PathBuf};

use certs::{Ca, Validity};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

/// The key and transcript hash of the handshake signature (must match the `x509` target).
const HANDSHAKE_KEY: [u8; 32] = [0x42; 32];
const TRANSCRIPT_HASH: [u8; 32] = [0x17; 32];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let vectors = read_vectors(&fuzz.join("../device-client/tests/vectors"))?;
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |t: &str| only.is_empty() || only.iter().any(|o| o == t);
    if wanted("frame") {
        frame_seeds(&fuzz.join("seeds/frame"), &vectors)?;
    }
    if wanted("client_machine") {
        client_seeds(&fuzz.join("seeds/client_machine"), &vectors)?;
    }
    if wanted("x509") {
        x509_seeds(&fuzz.join("seeds/x509"))?;
    }
    if wanted("gateway_inbound") {
        inbound_seeds(
            &fuzz.join("../gateway/fuzz/seeds/gateway_inbound"),
            &vectors,
        )?;
    }
    Ok(())
}

/// The `gateway_inbound` header: `max_frame`, `Welcome.last_acked`, the cut mask.
fn inbound_header(max_frame: u16, last_acked: Option<u32>, cuts: u64) -> Vec<u8> {
    let mut h = max_frame.to_be_bytes().to_vec();
    h.push(u8::from(last_acked.is_some()));
    h.extend_from_slice(&last_acked.unwrap_or(0).to_be_bytes());
    h.extend_from_slice(&cuts.to_be_bytes());
    h
}

fn inbound_seeds(dir: &Path, vectors: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let v = |name| vector(vectors, name);
    let mut session = v("up-hello").to_vec();
    for (name, frame) in vectors {
        if name.starts_with("up-") && !name.starts_with("up-hello") {
            session.extend_from_slice(frame);
        }
    }
    let seeds: [(&str, u16, Option<u32>, u64); 4] = [
        ("session-whole", 4096, None, 0),
        ("session-replay", 4096, Some(41), 0),
        ("session-cut-often", 4096, None, 0x8421_0842_1084_2108),
        ("session-small-frames", 128, Some(1), 1 << 20),
    ];
    for (name, max_frame, acked, cuts) in seeds {
        let mut seed = inbound_header(max_frame, acked, cuts);
        seed.extend_from_slice(&session);
        write(dir, name, &seed)?;
    }
    // A version 3 session (header bits 1-2: the gateway's highest version, 2 = v3):
    // every uplink vector behind a version 3 Hello.
    let mut v3 = v("up-hello-v3").to_vec();
    for (name, frame) in vectors {
        if name.starts_with("up-") && !name.starts_with("up-hello") {
            v3.extend_from_slice(frame);
        }
    }
    let mut seed = inbound_header(4096, None, 0x0404_0404_0404_0404);
    seed[2] |= 2 << 1;
    seed.extend_from_slice(&v3);
    write(dir, "session-v3", &seed)?;
    let mut hello_only = inbound_header(4096, None, 1);
    hello_only.extend_from_slice(v("up-hello-minimal"));
    write(dir, "hello-minimal", &hello_only)
}

/// (name, frame) of every vector, sorted by name.
fn read_vectors(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "hex") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let hex: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.split_whitespace())
            .collect();
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("vector name")?
            .to_owned();
        out.push((name, bytes));
    }
    out.sort();
    Ok(out)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let path: PathBuf = dir.join(name);
    fs::write(&path, bytes)?;
    println!("{} ({} bytes)", path.display(), bytes.len());
    Ok(())
}

fn frame_seeds(dir: &Path, vectors: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let mut up = Vec::new();
    let mut down = Vec::new();
    for (name, frame) in vectors {
        write(dir, &format!("{name}.frame"), frame)?;
        write(dir, &format!("{name}.body"), &frame[2..])?;
        if name.starts_with("up-") {
            up.extend_from_slice(frame);
        } else {
            down.extend_from_slice(frame);
        }
    }
    write(dir, "all-uplink.stream", &up)?;
    write(dir, "all-downlink.stream", &down)
}

fn vector<'v>(vectors: &'v [(String, Vec<u8>)], name: &str) -> &'v [u8] {
    vectors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, f)| f.as_slice())
        .unwrap_or_else(|| panic!("no vector {name}"))
}

// `arbitrary`'s format, for the client_machine script (its `Script`, `FuzzConfig` and
// `Op` types): integers little-endian, `bool` and `Option` tags one byte, a `Vec` one
// `1` byte before each element and a `0` after the last, an enum variant a u32 `x`
// with `(x * variants) >> 32` = its index. OPS is the number of `Op` variants: every
// script seed changes meaning when it does, so regenerate them all then.
const OPS: u64 = 15;

// `Op` variant indexes.
const CONNECT: u64 = 0;
const READ: u64 = 2;
const CLOSED: u64 = 3;
const TRANSMIT_ALL: u64 = 9;
const EVENTS: u64 = 10;
const REPORT: u64 = 11;
const SET_DESIRED_VERSION: u64 = 12;
const REQUEST_FIRMWARE: u64 = 13;
const FIRMWARE_STATUS: u64 = 14;

fn variant(index: u64) -> [u8; 4] {
    let x = ((index << 32) + OPS - 1) / OPS;
    u32::try_from(x).expect("a variant index").to_le_bytes()
}

fn op(out: &mut Vec<u8>, index: u64, fields: &[u8]) {
    out.push(1);
    out.extend_from_slice(&variant(index));
    out.extend_from_slice(fields);
}

fn client_seeds(dir: &Path, vectors: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    let v = |name| vector(vectors, name);
    // Default configuration, no operations: the epilogue reads the frames.
    let prefix = [0u8, 0u8];
    let downs: Vec<&str> = vectors
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("down-") && !n.starts_with("down-welcome"))
        .collect();
    let mut session = prefix.to_vec();
    session.extend_from_slice(v("down-welcome-fresh-boot"));
    for name in &downs {
        session.extend_from_slice(v(name));
    }
    write(dir, "session-all-downlink", &session)?;
    for name in &downs {
        let mut seed = prefix.to_vec();
        seed.extend_from_slice(v("down-welcome"));
        seed.extend_from_slice(v(name));
        write(
            dir,
            &format!("welcome-then-{}", &name["down-".len()..]),
            &seed,
        )?;
    }
    let mut seed = prefix.to_vec();
    seed.extend_from_slice(v("down-welcome-fresh-boot"));
    seed.extend_from_slice(v("down-command"));
    seed.extend_from_slice(v("down-command"));
    seed.extend_from_slice(v("down-ack"));
    write(dir, "repeated-command", &seed)?;

    // A small client (Client<100, 40>) with 256/128-byte frame limits, and a script.
    let mut cfg = vec![1u8, 1u8]; // Some(FuzzConfig { small: true, ..
    cfg.extend_from_slice(&0xb007u64.to_le_bytes()); // boot_id
    cfg.push(5); // firmware_chars
    cfg.extend_from_slice(&256u16.to_le_bytes()); // max_frame_in
    cfg.extend_from_slice(&128u16.to_le_bytes()); // max_frame_out
    cfg.extend_from_slice(&1_000u32.to_le_bytes()); // backoff_min_ms
    cfg.extend_from_slice(&60_000u32.to_le_bytes()); // backoff_max_ms
    cfg.extend_from_slice(&10_000u32.to_le_bytes()); // welcome_timeout_ms
    cfg.extend_from_slice(&42u64.to_le_bytes()); // jitter_seed
    cfg.push(0); // tx_len: None
    cfg.push(0); // min_version_2: false
    let mut ops = cfg.clone();
    let send = |ops: &mut Vec<u8>, n: u8| {
        let mut fields = vec![n, 2];
        fields.extend_from_slice(&7u64.to_le_bytes());
        fields.push(0); // time_ms: None
        op(ops, 6, &fields);
    };
    for _ in 0..4 {
        send(&mut ops, 1);
    }
    op(&mut ops, 0, &[]); // Connect
    op(&mut ops, 9, &[]); // TransmitAll
    op(&mut ops, 2, &40u16.to_le_bytes()); // Read 40 bytes
    op(&mut ops, 9, &[]);
    op(&mut ops, 10, &[]); // Events
    op(&mut ops, 7, &[0, 0, 1]); // Complete the first command, one value
    op(&mut ops, 4, &30_000u32.to_le_bytes()); // Advance 30 s
    op(&mut ops, 9, &[]);
    op(&mut ops, 5, &[]); // AdvanceToTimeout
    op(&mut ops, 3, &[]); // Closed
    op(&mut ops, 0, &[]);
    op(&mut ops, 9, &[]);
    ops.push(0); // end of the list
    ops.extend_from_slice(v("down-welcome-fresh-boot"));
    ops.extend_from_slice(v("down-command"));
    ops.extend_from_slice(v("down-ack"));
    ops.extend_from_slice(v("down-welcome"));
    ops.extend_from_slice(v("down-pong"));
    write(dir, "small-client-script", &ops)?;
    let mut seed = cfg;
    seed.push(0);
    seed.extend_from_slice(&session[2..]);
    write(dir, "small-client-session", &seed)?;

    // A version-3 session with a firmware transfer: the epilogue's application asks
    // after the offer and after each chunk.
    let mut seed = prefix.to_vec();
    for name in [
        "down-welcome-v3",
        "down-firmware-offer",
        "down-firmware-chunk",
        "down-firmware-chunk-end",
        "down-firmware-cancel",
    ] {
        seed.extend_from_slice(v(name));
    }
    write(dir, "welcome-v3-then-firmware", &seed)?;

    // Default-sized client, 512-byte frames.
    let mut cfg = vec![1u8, 0u8]; // Some(FuzzConfig { small: false, ..
    cfg.extend_from_slice(&0xb007u64.to_le_bytes()); // boot_id
    cfg.push(5); // firmware_chars
    cfg.extend_from_slice(&512u16.to_le_bytes()); // max_frame_in
    cfg.extend_from_slice(&512u16.to_le_bytes()); // max_frame_out
    cfg.extend_from_slice(&1_000u32.to_le_bytes()); // backoff_min_ms
    cfg.extend_from_slice(&60_000u32.to_le_bytes()); // backoff_max_ms
    cfg.extend_from_slice(&10_000u32.to_le_bytes()); // welcome_timeout_ms
    cfg.extend_from_slice(&42u64.to_le_bytes()); // jitter_seed
    cfg.push(0); // tx_len: None
    cfg.push(0); // min_version_2: false
    let read = |ops: &mut Vec<u8>, names: &[&str]| {
        let n: usize = names.iter().map(|n| vector(vectors, n).len()).sum();
        op(
            ops,
            READ,
            &u16::try_from(n).expect("a short read").to_le_bytes(),
        );
    };
    let report = |ops: &mut Vec<u8>, values: u8, kind: u8, value: u64| {
        let mut fields = vec![values, kind];
        fields.extend_from_slice(&value.to_le_bytes());
        op(ops, REPORT, &fields);
    };

    // Version 2: desired state applied and reported, across a version-1 session.
    let mut ops = cfg.clone();
    op(&mut ops, SET_DESIRED_VERSION, &1u32.to_le_bytes());
    op(&mut ops, CONNECT, &[]);
    op(&mut ops, TRANSMIT_ALL, &[]);
    op(&mut ops, READ, &40u16.to_le_bytes());
    op(&mut ops, EVENTS, &[]);
    report(&mut ops, 2, 1, 7);
    op(&mut ops, TRANSMIT_ALL, &[]);
    op(&mut ops, CLOSED, &[]);
    report(&mut ops, 1, 3, 9);
    op(&mut ops, CONNECT, &[]);
    op(&mut ops, TRANSMIT_ALL, &[]);
    op(&mut ops, READ, &15u16.to_le_bytes());
    op(&mut ops, TRANSMIT_ALL, &[]);
    op(&mut ops, EVENTS, &[]);
    ops.push(0);
    for name in [
        "down-welcome-v2",
        "down-desired",
        "down-welcome",
        "down-desired-whole",
    ] {
        ops.extend_from_slice(v(name));
    }
    write(dir, "v2-script", &ops)?;

    // Version 3: an offer, requests (one replacing another), a chunk, a status; then a
    // version-2 session (the status is dropped, the request waits), then version 3
    // again (the request goes), and a cancel.
    let request = |ops: &mut Vec<u8>, which: u8, offset: u32, len: u16| {
        let mut fields = vec![which];
        fields.extend_from_slice(&offset.to_le_bytes());
        fields.extend_from_slice(&len.to_le_bytes());
        op(ops, REQUEST_FIRMWARE, &fields);
    };
    let mut ops = cfg;
    op(&mut ops, CONNECT, &[]);
    op(&mut ops, TRANSMIT_ALL, &[]);
    read(&mut ops, &["down-welcome-v3"]);
    op(&mut ops, EVENTS, &[]);
    read(&mut ops, &["down-firmware-offer"]);
    request(&mut ops, 0, 0, 4096);
    request(&mut ops, 0, 0, 497);
    op(&mut ops, TRANSMIT_ALL, &[]);
    read(&mut ops, &["down-firmware-chunk"]);
    request(&mut ops, 0, 1013, 1009);
    op(&mut ops, FIRMWARE_STATUS, &[0, 3]); // HashMismatch
    op(&mut ops, TRANSMIT_ALL, &[]);
    op(&mut ops, CLOSED, &[]);
    op(&mut ops, CONNECT, &[]);
    op(&mut ops, TRANSMIT_ALL, &[]);
    read(&mut ops, &["down-welcome-v2"]);
    op(&mut ops, FIRMWARE_STATUS, &[0, 5]); // StorageError: dropped in version 2
    op(&mut ops, FIRMWARE_STATUS, &[210, 0]); // Verified, of id 210: dropped too
    request(&mut ops, 0, 5, 100); // waits for a version-3 session
    op(&mut ops, TRANSMIT_ALL, &[]);
    op(&mut ops, EVENTS, &[]);
    op(&mut ops, CLOSED, &[]);
    op(&mut ops, CONNECT, &[]);
    op(&mut ops, TRANSMIT_ALL, &[]);
    read(&mut ops, &["down-welcome-v3"]);
    op(&mut ops, TRANSMIT_ALL, &[]); // the request waiting goes
    request(&mut ops, 0, 9, 9);
    read(&mut ops, &["down-firmware-cancel"]); // withdraws it
    op(&mut ops, TRANSMIT_ALL, &[]);
    op(&mut ops, EVENTS, &[]);
    ops.push(0);
    for name in [
        "down-welcome-v3",
        "down-firmware-offer",
        "down-firmware-chunk",
        "down-welcome-v2",
        "down-welcome-v3",
        "down-firmware-cancel",
        "down-firmware-chunk-end",
    ] {
        ops.extend_from_slice(v(name));
    }
    write(dir, "v3-firmware-script", &ops)
}

fn x509_seeds(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let days = Validity::days(3650);
    let ca = Ca::generate("IoT gateway CA", days)?;
    write(dir, "ca.der", ca.cert_der())?;
    let names = ["gw.example.com", "*.site.example", "10.0.0.7"].map(String::from);
    let gateway = ca.issue_gateway(&names, days)?;
    write(dir, "gateway.der", &gateway.cert_der)?;
    let device = ca.issue_device("sensor-01", days)?;
    write(dir, "device.der", &device.cert_der)?;
    let expired = ca.issue_gateway(&[], Validity::expired())?;
    write(dir, "gateway-expired.der", &expired.cert_der)?;
    let other = Ca::generate("Another CA", days)?;
    write(dir, "other-ca.der", other.cert_der())?;
    let foreign = other.issue_gateway(&[], days)?;
    write(dir, "gateway-other-ca.der", &foreign.cert_der)?;
    let key = SigningKey::from_bytes(&HANDSHAKE_KEY.into())?;
    let signature: Signature = key.sign(&handshake_message(&TRANSCRIPT_HASH));
    write(
        dir,
        "handshake-signature.der",
        signature.to_der().as_bytes(),
    )?;
    Ok(())
}

/// What a TLS 1.3 server's CertificateVerify signs (RFC 8446 §4.4.3).
fn handshake_message(hash: &[u8; 32]) -> Vec<u8> {
    let mut m = vec![b' '; 64];
    m.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    m.extend_from_slice(hash);
    m
}
