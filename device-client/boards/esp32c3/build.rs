//! Bakes the device's identity and its network settings into the firmware.
//!
//! Reads, from the directory the `certs` tool writes (`DEVICE_CERTS_DIR`) and the device
//! named by `DEVICE_ID` (as the QEMU board's build.rs):
//!
//! ```text
//!   $DEVICE_CERTS_DIR/ca.pem                        the CA: trust anchor for the gateway
//!   $DEVICE_CERTS_DIR/devices/$DEVICE_ID/cert.der   the device certificate
//!   $DEVICE_CERTS_DIR/devices/$DEVICE_ID/key.der    its P-256 key, SEC1 DER
//!   $DEVICE_CERTS_DIR/release.pub.bin              the firmware release key (public,
//!                                                   65 bytes; `certs release-key`)
//! ```
//!
//! and writes `ca.der`, `cert.der`, `key.der` and `release.pub.bin` to `OUT_DIR`, where
//! `src/identity.rs` includes them. The network comes from the environment, with
//! placeholders so that CI builds without them (a warning says so):
//!
//! ```text
//!   WIFI_SSID, WIFI_PASSWORD   the access point (WPA2-Personal; an empty password: open)
//!   GATEWAY_ADDR               the gateway's IPv4 address and port, e.g. 192.168.1.10:7443
//!   GATEWAY_NAME               the name its certificate must carry (a DNS name or an IP
//!                              address; default: the address of GATEWAY_ADDR)
//!   FIRMWARE_VERSION           what the device reports (Hello) and the app descriptor
//!                              holds; sign an update with the same `--version`
//! ```
//!
//! into `OUT_DIR/network.rs`.
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::{env, fs, process};

const PLACEHOLDER_SSID: &str = "CHANGE-ME";
const PLACEHOLDER_GATEWAY: &str = "192.168.1.10:7443";
const DEFAULT_VERSION: &str = "esp32c3-0.1.0";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "DEVICE_CERTS_DIR",
        "DEVICE_ID",
        "WIFI_SSID",
        "WIFI_PASSWORD",
        "GATEWAY_ADDR",
        "GATEWAY_NAME",
        "FIRMWARE_VERSION",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let (Some(dir), Some(id)) = (env::var_os("DEVICE_CERTS_DIR"), env::var_os("DEVICE_ID")) else {
        fail(
            "set DEVICE_CERTS_DIR to a directory made by the certs tool and DEVICE_ID to a \
             device in it, e.g.\n  cargo run -p certs -- init --dir certs --gateway-name 192.168.1.10\n  \
             cargo run -p certs -- device --dir certs c3-01\n  \
             cargo run -p certs -- release-key --dir certs\n  \
             DEVICE_CERTS_DIR=$PWD/certs DEVICE_ID=c3-01 cargo build --release",
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

    // The network.
    let ssid = env_or("WIFI_SSID", PLACEHOLDER_SSID);
    let password = env_or("WIFI_PASSWORD", "");
    let addr = env_or("GATEWAY_ADDR", PLACEHOLDER_GATEWAY);
    if ssid.len() > 32 {
        fail("WIFI_SSID: longer than 32 bytes");
    }
    if !password.is_empty() && !(8..=64).contains(&password.len()) {
        fail("WIFI_PASSWORD: a WPA2 passphrase has 8 to 63 characters (64: hex key)");
    }
    let gateway: SocketAddrV4 = addr.parse().unwrap_or_else(|_| {
        fail(&format!(
            "GATEWAY_ADDR={addr}: not an IPv4 address and port (e.g. 192.168.1.10:7443)"
        ))
    });
    let name = env_or("GATEWAY_NAME", &gateway.ip().to_string());
    if name.is_empty() || name.len() > 128 {
        fail("GATEWAY_NAME: empty or too long");
    }
    let version = env_or("FIRMWARE_VERSION", DEFAULT_VERSION);
    if version.is_empty() || version.len() > 31 {
        // 32 bytes in the app descriptor, with its terminating zero; the protocol allows 32.
        fail("FIRMWARE_VERSION: 1 to 31 bytes");
    }
    if env::var_os("WIFI_SSID").is_none() || env::var_os("GATEWAY_ADDR").is_none() {
        println!(
            "cargo:warning=WIFI_SSID or GATEWAY_ADDR unset: placeholders baked in \
             ({PLACEHOLDER_SSID}, {PLACEHOLDER_GATEWAY}); the firmware will not reach a gateway"
        );
    }
    let ip = gateway.ip().octets();
    let network = format!(
        "/// The access point's SSID.\n\
         pub const WIFI_SSID: &str = {ssid:?};\n\
         /// Its WPA2 passphrase (empty: an open network).\n\
         pub const WIFI_PASSWORD: &str = {password:?};\n\
         /// The gateway's IPv4 address.\n\
         pub const GATEWAY_IP: [u8; 4] = {ip:?};\n\
         /// The gateway's TLS port.\n\
         pub const GATEWAY_PORT: u16 = {port};\n\
         /// The name the gateway's certificate must carry.\n\
         pub const GATEWAY_NAME: &str = {name:?};\n",
        port = gateway.port(),
    );
    fs::write(out.join("network.rs"), network).expect("write network.rs");
    // For env!() in the app descriptor macro, which takes literals.
    println!("cargo:rustc-env=FIRMWARE_VERSION={version}");
}

fn env_or(var: &str, default: &str) -> String {
    match env::var(var) {
        Ok(v) => v,
        Err(env::VarError::NotPresent) => default.to_owned(),
        Err(env::VarError::NotUnicode(_)) => fail(&format!("{var} is not UTF-8")),
    }
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
