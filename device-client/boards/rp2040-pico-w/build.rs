//! Bakes the device's identity, the network settings and the CYW43439's firmware into
//! the firmware, and puts `memory.x` on the linker's search path for cortex-m-rt's
//! `link.x`.
//!
//! The identity, as for the QEMU board (`../qemu-mps2-an386/build.rs`): from the
//! directory the `certs` tool writes (`DEVICE_CERTS_DIR`) and the device named by
//! `DEVICE_ID` (both required):
//!
//! ```text
//!   $DEVICE_CERTS_DIR/ca.pem                        the CA: trust anchor for the gateway
//!   $DEVICE_CERTS_DIR/devices/$DEVICE_ID/cert.der   the device certificate
//!   $DEVICE_CERTS_DIR/devices/$DEVICE_ID/key.der    its P-256 key, SEC1 DER
//!   $DEVICE_CERTS_DIR/release.pub.bin              the firmware release key (public,
//!                                                   65 bytes; `certs release-key`)
//! ```
//!
//! The network (optional: placeholders, with a warning, so CI builds without them):
//!
//! ```text
//!   WIFI_SSID, WIFI_PASSWORD   the access point (an empty password: an open network)
//!   GATEWAY_ADDR               the gateway's IPv4 address and port, e.g. 192.168.1.10:7443
//!   GATEWAY_NAME               the name its certificate must carry (default: the
//!                              address, which `certs init --gateway-name IP` adds)
//! ```
//!
//! The CYW43439's firmware (optional: empty placeholders, with a warning: the firmware
//! builds but cannot bring Wi-Fi up): `CYW43_FIRMWARE_DIR` holding `43439A0.bin`,
//! `43439A0_clm.bin` and `nvram_rp2040.bin` (the embassy repository's `cyw43-firmware`
//! directory).
//!
//! Everything goes to `OUT_DIR`, where `src/identity.rs` and `src/main.rs` include it.
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::{env, fs, process};

/// The CYW43439's blobs `CYW43_FIRMWARE_DIR` must hold.
const CYW43_BLOBS: [&str; 3] = ["43439A0.bin", "43439A0_clm.bin", "nvram_rp2040.bin"];
/// Placeholders for a build without network settings.
const DEFAULT_SSID: &str = "pico-w-ssid";
const DEFAULT_GATEWAY_ADDR: &str = "192.168.1.10:7443";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).expect("write memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "DEVICE_CERTS_DIR",
        "DEVICE_ID",
        "WIFI_SSID",
        "WIFI_PASSWORD",
        "GATEWAY_ADDR",
        "GATEWAY_NAME",
        "CYW43_FIRMWARE_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    identity(&out);
    network(&out);
    cyw43_firmware(&out);
}

/// The certificates, key and release key (as the QEMU board's build.rs).
fn identity(out: &Path) {
    let (Some(dir), Some(id)) = (env::var_os("DEVICE_CERTS_DIR"), env::var_os("DEVICE_ID")) else {
        fail(
            "set DEVICE_CERTS_DIR to a directory made by the certs tool and DEVICE_ID to a \
             device in it, e.g.\n  cargo run -p certs -- init --dir certs --gateway-name 192.168.1.10\n  \
             cargo run -p certs -- device --dir certs pico-01\n  \
             cargo run -p certs -- release-key --dir certs\n  \
             DEVICE_CERTS_DIR=$PWD/certs DEVICE_ID=pico-01 cargo build --release",
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
}

/// `net.rs` in OUT_DIR: the access point and the gateway, as constants.
fn network(out: &Path) {
    let ssid = var("WIFI_SSID").unwrap_or_else(|| {
        warn("WIFI_SSID is not set: the firmware joins a network named `pico-w-ssid`");
        DEFAULT_SSID.to_owned()
    });
    if ssid.is_empty() || ssid.len() > 32 {
        fail("WIFI_SSID must be 1 to 32 bytes");
    }
    let password = var("WIFI_PASSWORD").unwrap_or_default();
    if !password.is_empty() && !(8..=63).contains(&password.len()) {
        fail("WIFI_PASSWORD must be empty (an open network) or 8 to 63 characters (WPA2)");
    }
    let addr = var("GATEWAY_ADDR").unwrap_or_else(|| {
        warn(&format!(
            "GATEWAY_ADDR is not set: the firmware dials {DEFAULT_GATEWAY_ADDR}"
        ));
        DEFAULT_GATEWAY_ADDR.to_owned()
    });
    let Ok(addr) = addr.parse::<SocketAddrV4>() else {
        fail(&format!(
            "GATEWAY_ADDR={addr}: not an IPv4 address and port such as 192.168.1.10:7443"
        ));
    };
    // The device dials the address; by default it checks that the gateway's
    // certificate carries that address (certs init --gateway-name IP).
    let name = var("GATEWAY_NAME").unwrap_or_else(|| addr.ip().to_string());
    if name.is_empty() || name.len() > 128 {
        fail("GATEWAY_NAME must be 1 to 128 bytes");
    }

    let mut src = String::new();
    let _ = writeln!(src, "/// The access point to join.");
    let _ = writeln!(src, "pub const WIFI_SSID: &str = {ssid:?};");
    let _ = writeln!(src, "/// Its WPA2 passphrase; empty: an open network.");
    let _ = writeln!(src, "pub const WIFI_PASSWORD: &str = {password:?};");
    let _ = writeln!(src, "/// The gateway's IPv4 address.");
    let _ = writeln!(
        src,
        "pub const GATEWAY_IP: [u8; 4] = {:?};",
        addr.ip().octets()
    );
    let _ = writeln!(src, "/// The gateway's TCP port.");
    let _ = writeln!(src, "pub const GATEWAY_PORT: u16 = {};", addr.port());
    let _ = writeln!(src, "/// The name the gateway's certificate must carry.");
    let _ = writeln!(src, "pub const GATEWAY_NAME: &str = {name:?};");
    fs::write(out.join("net.rs"), src).expect("write net.rs");
}

/// The CYW43439's firmware, CLM and NVRAM, or empty placeholders.
fn cyw43_firmware(out: &Path) {
    let Some(dir) = env::var_os("CYW43_FIRMWARE_DIR").map(PathBuf::from) else {
        warn(
            "CYW43_FIRMWARE_DIR is not set: the firmware builds with empty placeholders for \
             the CYW43439's firmware and cannot bring Wi-Fi up (README.md says where to get \
             43439A0.bin, 43439A0_clm.bin and nvram_rp2040.bin)",
        );
        for blob in CYW43_BLOBS {
            fs::write(out.join(blob), []).expect("write a placeholder blob");
        }
        return;
    };
    for blob in CYW43_BLOBS {
        let bytes = read(&dir.join(blob));
        if bytes.is_empty() {
            fail(&format!("{}: empty", dir.join(blob).display()));
        }
        fs::write(out.join(blob), bytes).expect("write a CYW43439 blob");
    }
}

/// A set, non-empty, UTF-8 environment variable.
fn var(name: &str) -> Option<String> {
    match env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        Ok(_) | Err(env::VarError::NotPresent) => None,
        Err(env::VarError::NotUnicode(_)) => fail(&format!("{name} is not UTF-8")),
    }
}

fn read(path: &Path) -> Vec<u8> {
    println!("cargo:rerun-if-changed={}", path.display());
    fs::read(path).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())))
}

fn warn(msg: &str) {
    println!("cargo:warning={msg}");
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
