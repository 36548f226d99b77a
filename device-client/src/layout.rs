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
//!  DIR/release/release.key.pem   the firmware release key (only `certs` reads it)
//!  DIR/release.pub.pem, release.pub.bin  its public half: PEM for the gateway,
//!                                65 bytes SEC1 for firmware
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
/// `DIR/release/`: the firmware release key's private half.
pub const RELEASE_PRIVATE_DIR: &str = "release";
/// `DIR/release/release.key.pem`.
pub const RELEASE_KEY_FILE: &str = "release.key.pem";
/// `DIR/release.pub.pem`: the release public key, PEM (the gateway's `release_key`).
pub const RELEASE_PUB_PEM: &str = "release.pub.pem";
/// `DIR/release.pub.bin`: the release public key, 65 bytes of SEC1 (for firmware).
pub const RELEASE_PUB_BIN: &str = "release.pub.bin";

/// How wide the counter of bulk-issued device ids is (`certs devices --prefix P
/// --start FIRST --count COUNT` issues `P` + the counter zero-padded to this many
/// digits; the simulator finds them by the same rule): at least 4 digits, more if the
/// last id needs them, so the ids sort in numeric order.
pub const fn sequential_id_width(first: u64, count: u64) -> usize {
    let mut last = first.saturating_add(count.saturating_sub(1));
    let mut digits = 1;
    while last >= 10 {
        last /= 10;
        digits += 1;
    }
    if digits < 4 { 4 } else { digits }
}

#[cfg(test)]
mod tests {
    use super::sequential_id_width;

    #[test]
    fn ids_are_padded_to_four_digits_or_what_the_last_needs() {
        assert_eq!(sequential_id_width(0, 1), 4);
        assert_eq!(sequential_id_width(0, 10_000), 4);
        assert_eq!(sequential_id_width(0, 10_001), 5);
        assert_eq!(sequential_id_width(9_998, 3), 5);
        assert_eq!(sequential_id_width(0, 0), 4);
        assert_eq!(sequential_id_width(u64::MAX, 2), 20);
    }
}
