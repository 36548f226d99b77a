//! Errors of the in-memory PKI operations ([`crate::Ca`], [`crate::Crl`], ...).
//!
//! The on-disk layout has its own error type, [`crate::dir::DirError`], which wraps this
//! one. No message here ever contains private key material.

use device_client::proto::InvalidDeviceId;
use time::OffsetDateTime;

/// Why minting, loading or parsing a certificate, key or CRL failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device id breaks the identity rule `[A-Za-z0-9._-]{1,64}` (PROTOCOL.md §2.4).
    #[error("invalid device id {id:?}: {source}")]
    InvalidDeviceId {
        /// The rejected id.
        id: String,
        /// Which part of the rule it breaks.
        #[source]
        source: InvalidDeviceId,
    },
    /// A gateway name is neither an IP address nor a valid DNS name.
    #[error("invalid gateway name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A CA common name is empty.
    #[error("the CA common name is empty")]
    EmptyCommonName,
    /// A validity period ends before or when it starts.
    #[error("validity period ends ({not_after}) no later than it starts ({not_before})")]
    InvalidValidity {
        /// Start of the rejected period.
        not_before: OffsetDateTime,
        /// End of the rejected period.
        not_after: OffsetDateTime,
    },
    /// A serial number given as text is not hexadecimal.
    #[error(
        "invalid serial number {input:?}: expected hexadecimal digits, optionally separated by ':'"
    )]
    InvalidSerial {
        /// The rejected text.
        input: String,
    },
    /// A PEM or DER input (certificate, key or CRL) could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// What was being parsed, e.g. "CA certificate".
        what: &'static str,
        /// The parser's complaint (never contains key material).
        detail: String,
    },
    /// The certificate given as a CA lacks `basicConstraints CA:TRUE`.
    #[error("the certificate is not a CA certificate (basicConstraints CA:TRUE is missing)")]
    NotACa,
    /// The private key is not an ECDSA P-256 key in PKCS#8 form.
    #[error("{what} is not an ECDSA P-256 private key in PKCS#8 PEM form (\"BEGIN PRIVATE KEY\")")]
    UnsupportedKey {
        /// Which key, e.g. "CA key".
        what: &'static str,
    },
    /// The CA private key does not belong to the CA certificate.
    #[error("the CA private key does not match the CA certificate's public key")]
    KeyMismatch,
    /// A certificate or CRL was not signed by this CA's key.
    #[error("{what} was not signed by this CA")]
    NotSignedByCa {
        /// What failed to verify, e.g. "CRL".
        what: &'static str,
    },
    /// A CRL number does not fit in 64 bits.
    #[error("the CRL number does not fit in 64 bits")]
    CrlNumberTooLarge,
    /// The certificate library refused the parameters or failed to sign.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Converting a private key between encodings failed.
    #[error("private key encoding failed: {0}")]
    KeyEncoding(String),
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(getrandom::Error),
}
