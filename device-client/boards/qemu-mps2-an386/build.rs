//! Bakes the device's identity into the firmware and puts `memory.x` on the linker's
//! search path for cortex-m-rt's `link.x`.
//!
//! Reads, from the directory the `certs` tool writes (`DEVICE_CERTS_DIR`) and the device
//! named by `DEVICE_ID`:
//!
//! ```text
//!   $DEVICE_CERTS_DIR/ca.pem                        the CA: trust anchor for the gateway
//!   $DEVICE_CERTS_DIR/devices/$DEVICE_ID/cert.der   the device certificate
//!   $DEVICE_CERTS_DIR/devices/$DEVICE_ID/key.der    its P-256 key, SEC1 DER
//!   $DEVICE_CERTS_DIR/release.pub.bin              the firmware release key (public,
//!                                                   65 bytes; `certs release-key`)
//! ```
//!
//! and writes `ca.der`, `cert.der`, `key.der`, `release.pub.bin` and a per-build random
//! `seed.bin` (for the emulator-only RNG) to `OUT_DIR`, where `src/identity.rs` includes
//! them.
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::{env, fs, process};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).expect("write memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEVICE_CERTS_DIR");
    println!("cargo:rerun-if-env-changed=DEVICE_ID");

    let (Some(dir), Some(id)) = (env::var_os("DEVICE_CERTS_DIR"), env::var_os("DEVICE_ID")) else {
        fail(
            "set DEVICE_CERTS_DIR to a directory made by the certs tool and DEVICE_ID to a \
             device in it, e.g.\n  cargo run -p certs -- init --dir certs\n  \
             cargo run -p certs -- device --dir certs sensor-01\n  \
             cargo run -p certs -- release-key --dir certs\n  \
             DEVICE_CERTS_DIR=$PWD/certs DEVICE_ID=sensor-01 cargo build --release",
        );
    };
    let dir = PathBuf::from(dir);
    let Some(id) = id.to_str().map(str::to_owned) else {
        fail("DEVICE_ID is not UTF-8");
    };
    use device_client::layout::{
        CA_CERT_FILE, DEVICE_CERT_DER, DEVICE_KEY_DER, DEVICES_DIR, RELEASE_PUB_BIN,
    };
    let device = dir.join(DEVICES_DIR).join(&id);

    let ca_pem = read(&dir.join(CA_CERT_FILE));
    let Some(ca_der) = pem_certificate(&ca_pem) else {
        fail(&format!(
            "{}: no CERTIFICATE block",
            dir.join(CA_CERT_FILE).display()
        ));
    };
    fs::write(out.join("ca.der"), ca_der).expect("write ca.der");
    fs::write(out.join("cert.der"), read(&device.join(DEVICE_CERT_DER))).expect("write cert.der");
    fs::write(out.join("key.der"), read(&device.join(DEVICE_KEY_DER))).expect("write key.der");
    let release = read(&dir.join(RELEASE_PUB_BIN));
    if release.len() != 65 {
        fail(&format!(
            "{}: {} bytes, not the 65 of a release public key (certs release-key --dir DIR)",
            dir.join(RELEASE_PUB_BIN).display(),
            release.len()
        ));
    }
    fs::write(out.join("release.pub.bin"), release).expect("write release.pub.bin");
    println!("cargo:rustc-env=DEVICE_ID={id}");

    // A fresh seed per build, for the emulator-only RNG (src/rng.rs).
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .unwrap_or_else(|e| fail(&format!("reading /dev/urandom for the RNG seed: {e}")));
    fs::write(out.join("seed.bin"), seed).expect("write seed.bin");
}

fn read(path: &Path) -> Vec<u8> {
    println!("cargo:rerun-if-changed={}", path.display());
    fs::read(path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())))
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    process::exit(1);
}

/// The DER bytes of the first `CERTIFICATE` block of a PEM file.
fn pem_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let start = text.find(begin)? + begin.len();
    let end = start + text[start..].find("-----END CERTIFICATE-----")?;
    base64_decode(&text[start..end])
}

/// Standard base64 with padding; whitespace is skipped.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
