//! The gateway's PKI: a CA, the gateway's server certificate, device client
//! certificates and a CRL, all ECDSA P-256 (what embedded-tls and the protocol require,
//! PROTOCOL.md §1), minted with rcgen.
//!
//! ```text
//!                        ┌──────────────────────────────┐
//!                        │ CA  (self-signed, CA:TRUE,   │  ca.pem         trust anchor for
//!                        │      pathlen:0, keyCertSign, │                 gateway and devices
//!                        │      cRLSign)                │  ca/ca.key.pem  0600, goes offline
//!                        └──────┬───────────┬──────────┬┘
//!              signs            │           │          │          signs
//!        ┌──────────────────────┘           │          └────────────────────────┐
//!        ▼                                  ▼                                   ▼
//!  gateway cert                       device certs                             CRL
//!  EKU serverAuth                     EKU clientAuth                  serials of revoked
//!  SAN localhost, 127.0.0.1,          CN = device id                  device certs,
//!      ::1, --gateway-name...         ([A-Za-z0-9._-]{1,64})          CRL number +1 per
//!  gateway.pem, gateway.key.pem       devices/<id>/...                change; crl.pem
//! ```
//!
//! Every certificate is X.509 v3 with a random 16-byte serial, subject and authority key
//! identifiers, and key usage; end-entity certificates say `CA:FALSE`. That is the
//! profile rustls' `WebPkiClientVerifier` (with the CRL) and `WebPkiServerVerifier`
//! accept, and what `openssl verify` accepts.
//!
//! # In memory (for tests)
//!
//! ```
//! use certs::{Ca, Validity, RevokedEntry};
//!
//! let ca = Ca::generate("Test CA", Validity::days(1))?;
//! let gateway = ca.issue_gateway(&["gw.example".into()], Validity::days(1))?;
//! let device = ca.issue_device("sensor-01", Validity::days(1))?;
//! let expired = ca.issue_device("old-sensor", Validity::expired())?;
//! let crl = ca.crl(&[RevokedEntry::now(device.serial.clone())], 1, Validity::days(1))?;
//! assert!(crl.contains(&device.serial));
//! # let _ = (gateway, expired);
//! # Ok::<(), certs::Error>(())
//! ```
//!
//! # On disk (the `certs` CLI, module [`dir`])
//!
//! ```text
//! DIR/
//!   ca/                  what only the CA needs: move it offline 0700
//!     ca.key.pem         CA private key, PKCS#8 PEM              0600
//!   ca.pem               CA certificate                          0644
//!   gateway.pem          gateway certificate                     0644
//!   gateway.key.pem      gateway private key, PKCS#8 PEM         0600
//!   crl.pem              CRL signed by the CA (empty at init)    0644
//!   devices/
//!     <id>/
//!       cert.pem         device certificate, PEM                 0644
//!       cert.der         device certificate, DER                 0644
//!       key.pem          device private key, PKCS#8 PEM          0600
//!       key.der          device private key, SEC1 DER            0600
//! ```
//!
//! The gateway reads `ca.pem`, `crl.pem`, `gateway.pem` and `gateway.key.pem`; a device
//! needs `ca.pem` and its `devices/<id>/`. Nothing but signing (issuing, renewing,
//! revoking, re-signing the CRL) needs the CA key, so `DIR/ca/` can live offline and be
//! brought back (or named with `--ca-key`) to sign. Directories made before `DIR/ca/`
//! keep their key at `DIR/ca.key.pem`, which is still read.
//!
//! Files are written to a temporary name and renamed into place, and a device's
//! directory is assembled under a temporary name and renamed as a whole, so a reader
//! never sees half a device or half a file. Private keys are created with mode 0600
//! and never printed.

pub mod ca;
pub mod crl;
pub mod dir;
pub mod error;
pub mod inspect;
pub mod release;
pub mod serial;
pub mod validity;

pub use ca::{Ca, GATEWAY_DEFAULT_CN, GATEWAY_DEFAULT_NAMES, Issued};
pub use crl::{Crl, RevokedEntry};
pub use error::Error;
pub use inspect::CertInfo;
pub use release::{ReleaseKey, Signed};
pub use serial::Serial;
pub use validity::{CLOCK_SKEW, Validity};
