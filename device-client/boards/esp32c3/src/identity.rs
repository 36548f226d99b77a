//! The device's identity and network, baked in by build.rs from `DEVICE_CERTS_DIR`,
//! `DEVICE_ID`, `WIFI_*` and `GATEWAY_*`.

/// The device id: the CN of its certificate.
pub const DEVICE_ID: &str = env!("DEVICE_ID");
/// What the device reports as its firmware version (`FIRMWARE_VERSION`).
pub const FIRMWARE_VERSION: &str = env!("FIRMWARE_VERSION");
/// The device certificate, DER.
pub static CERT_DER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cert.der"));
/// Its P-256 private key, SEC1 DER (`key.der` of the certs tool).
pub static KEY_DER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/key.der"));
/// The CA certificate, DER: the gateway's certificate must chain to it.
pub static CA_DER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ca.der"));
/// The firmware release key (65 bytes, SEC1): an update must be signed by it.
pub static RELEASE_KEY: &[u8; 65] = include_bytes!(concat!(env!("OUT_DIR"), "/release.pub.bin"));

// WIFI_SSID, WIFI_PASSWORD, GATEWAY_IP, GATEWAY_PORT, GATEWAY_NAME.
include!(concat!(env!("OUT_DIR"), "/network.rs"));
