//! The certificates directory the `certs` tool writes, and every reader uses: the
//! gateway's settings, the tokio driver, the simulator and a board's build script. One
//! spelling of each name, here (a `no_std` crate, so firmware build scripts can use it).
//!
//! ```text
//!  DIR/ca.pem                    the CA certificate (the devices' trust anchor)
//!  DIR/ca/ca.key.pem             the CA key (only `certs` reads it)
//!  DIR/gateway.pem, gateway.key.pem
//!  DIR/crl.pem
//!  DIR/devices/ID/cert.pem, key.pem     PEM, for std devices (simulator, tokio driver)
//!  DIR/devices/ID/cert.der, key.der     DER (SEC1 key), for firmware
//! ```

/// `DIR/ca.pem`.
pub const CA_CERT_FILE: &str = "ca.pem";
/// `DIR/ca/`: what only the CA needs (its private key).
pub const CA_PRIVATE_DIR: &str = "ca";
/// `DIR/ca/ca.key.pem`.
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// `DIR/gateway.pem`.
pub const GATEWAY_CERT_FILE: &str = "gateway.pem";
/// `DIR/gateway.key.pem`.
pub const GATEWAY_KEY_FILE: &str = "gateway.key.pem";
/// `DIR/crl.pem`.
pub const CRL_FILE: &str = "crl.pem";
/// `DIR/devices/`.
pub const DEVICES_DIR: &str = "devices";
/// `DIR/devices/<id>/cert.pem`.
pub const DEVICE_CERT_PEM: &str = "cert.pem";
/// `DIR/devices/<id>/cert.der`.
pub const DEVICE_CERT_DER: &str = "cert.der";
/// `DIR/devices/<id>/key.pem` (PKCS#8).
pub const DEVICE_KEY_PEM: &str = "key.pem";
/// `DIR/devices/<id>/key.der` (SEC1).
pub const DEVICE_KEY_DER: &str = "key.der";
