//! Signed firmware images (feature `firmware`): what a device checks before it marks a
//! downloaded image for its bootloader. No std, no alloc; the image is hashed as it
//! arrives, a chunk at a time, so it never has to be in RAM.
//!
//! ```text
//!  release key (certs release-key) ── signs ──► manifest: "iot-gateway firmware\0"
//!                                                 version (≤ 32 B), size (u32 BE),
//!                                                 SHA-256 of the image
//!  device: ImageHasher::update(chunk) ... finish() ─┐
//!          Manifest::check(release key, signature, hashed) ─► Ok: mark for the bootloader
//!                                                      Err(SizeMismatch | HashMismatch |
//!                                                          BadSignature): refuse, report
//! ```
//!
//! The signature is ECDSA P-256 with SHA-256 over the manifest's bytes
//! ([`Manifest::signed_bytes`]), as 64 bytes `r ‖ s`. Signing the manifest rather than
//! the image lets the device verify once, at the end, with a hash it computed on the
//! way; the version is inside what is signed, so an old image cannot be offered under a
//! new version's name. The `certs` tool makes the key and signs (`certs sign-firmware`).
//!
//! [`Updater`] does a whole transfer of protocol version 3 with these: it answers the
//! gateway's offers and chunks through the [`Client`](crate::machine::Client), writes
//! the image into an `embedded-storage` [`NorFlash`](embedded_storage::nor_flash::NorFlash)
//! update partition (embassy-boot's DFU partition, say) and checks it at the end; its
//! module doc shows how it plugs into embassy-boot.

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::proto::MAX_FIRMWARE_LEN;

pub mod updater;

pub use updater::{Checkpoint, Decline, ReadError, Update, Updater, Version, hash_flash};

/// A release public key file that is not one (feature `release-key-file`).
#[cfg(feature = "release-key-file")]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseKeyError {
    /// PEM, but not of a P-256 public key.
    #[error("not a P-256 public key in PEM")]
    BadPem,
    /// Not PEM, and not the 65 bytes of an uncompressed P-256 point.
    #[error(
        "not a P-256 public key: expected 65 bytes of SEC1 (release.pub.bin) or PEM \
         (release.pub.pem), got {0} bytes"
    )]
    BadBytes(usize),
}

/// Parses a release public key as `certs release-key` writes it: `release.pub.pem`
/// (SPKI PEM) or `release.pub.bin` (65 bytes, uncompressed SEC1). The one reader of
/// both the simulator and the gateway.
#[cfg(feature = "release-key-file")]
pub fn parse_release_key(bytes: &[u8]) -> Result<[u8; RELEASE_KEY_LEN], ReleaseKeyError> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::DecodePublicKey;
    let key = if bytes.starts_with(b"-----BEGIN") {
        let pem = core::str::from_utf8(bytes).map_err(|_| ReleaseKeyError::BadPem)?;
        p256::PublicKey::from_public_key_pem(pem).map_err(|_| ReleaseKeyError::BadPem)?
    } else {
        p256::PublicKey::from_sec1_bytes(bytes)
            .map_err(|_| ReleaseKeyError::BadBytes(bytes.len()))?
    };
    key.to_encoded_point(false)
        .as_bytes()
        .try_into()
        .map_err(|_| ReleaseKeyError::BadBytes(bytes.len()))
}

/// Domain separation: these bytes start every signed manifest, so a release key's
/// signature over a manifest can never be taken for one over anything else.
pub const MANIFEST_MAGIC: &[u8] = b"iot-gateway firmware\0";

/// Longest manifest: the magic, a length byte, the longest version, size, hash.
pub const MAX_MANIFEST_LEN: usize = MANIFEST_MAGIC.len() + 1 + MAX_FIRMWARE_LEN + 4 + 32;

/// A release public key: SEC1 uncompressed, `04 ‖ x ‖ y` (`certs` writes it as
/// `release.pub.bin`, for a firmware to include).
pub const RELEASE_KEY_LEN: usize = 65;

/// A signature: `r ‖ s`, 32 bytes each.
pub const SIGNATURE_LEN: usize = 64;

/// Why an image was refused.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FirmwareError {
    /// The version is longer than `MAX_FIRMWARE_LEN` bytes.
    #[error("the version is longer than {MAX_FIRMWARE_LEN} bytes")]
    VersionTooLong,
    /// The release key is not a P-256 point.
    #[error("the release key is not a P-256 public key")]
    BadKey,
    /// The image has another length than its manifest says.
    #[error("the image is {got} bytes, its manifest says {expected}")]
    SizeMismatch {
        /// What the manifest says.
        expected: u32,
        /// What arrived.
        got: u64,
    },
    /// The image's SHA-256 is not its manifest's: it was damaged or changed.
    #[error("the image's SHA-256 does not match its manifest")]
    HashMismatch,
    /// The manifest is not signed by the release key.
    #[error("the manifest's signature does not verify with the release key")]
    BadSignature,
}

impl FirmwareError {
    /// A short lowercase name for logs and reports without `core::fmt`.
    pub const fn as_str(&self) -> &'static str {
        match self {
            FirmwareError::VersionTooLong => "version_too_long",
            FirmwareError::BadKey => "bad_release_key",
            FirmwareError::SizeMismatch { .. } => "size_mismatch",
            FirmwareError::HashMismatch => "hash_mismatch",
            FirmwareError::BadSignature => "bad_signature",
        }
    }
}

/// What a release signs about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest<'a> {
    /// The image's version (what the device reports in `Hello.firmware` once it runs).
    pub version: &'a str,
    /// Its length in bytes.
    pub size: u32,
    /// Its SHA-256.
    pub sha256: [u8; 32],
}

impl Manifest<'_> {
    /// The bytes the release key signs, written to `out`.
    pub fn signed_bytes<'o>(
        &self,
        out: &'o mut [u8; MAX_MANIFEST_LEN],
    ) -> Result<&'o [u8], FirmwareError> {
        let version = self.version.as_bytes();
        let version_len = u8::try_from(version.len())
            .ok()
            .filter(|n| usize::from(*n) <= MAX_FIRMWARE_LEN)
            .ok_or(FirmwareError::VersionTooLong)?;
        let mut at = 0;
        for part in [
            MANIFEST_MAGIC,
            &[version_len],
            version,
            &self.size.to_be_bytes(),
            &self.sha256,
        ] {
            let end = at + part.len();
            out.get_mut(at..end)
                .ok_or(FirmwareError::VersionTooLong)?
                .copy_from_slice(part);
            at = end;
        }
        Ok(out.get(..at).unwrap_or_default())
    }

    /// Whether `signature` is the release key's over this manifest.
    pub fn verify(
        &self,
        release_key: &[u8; RELEASE_KEY_LEN],
        signature: &[u8; SIGNATURE_LEN],
    ) -> Result<(), FirmwareError> {
        let key = VerifyingKey::from_sec1_bytes(release_key).map_err(|_| FirmwareError::BadKey)?;
        let signature =
            Signature::from_slice(signature).map_err(|_| FirmwareError::BadSignature)?;
        let mut buf = [0u8; MAX_MANIFEST_LEN];
        let bytes = self.signed_bytes(&mut buf)?;
        key.verify(bytes, &signature)
            .map_err(|_| FirmwareError::BadSignature)
    }

    /// The whole check of an image that arrived: its length and hash are the
    /// manifest's, and the manifest is the release's. Only then may it run.
    pub fn check(
        &self,
        release_key: &[u8; RELEASE_KEY_LEN],
        signature: &[u8; SIGNATURE_LEN],
        hashed: &Hashed,
    ) -> Result<(), FirmwareError> {
        self.check_image(hashed)?;
        self.verify(release_key, signature)
    }

    /// The first half of [`check`](Self::check): the image's length and hash are the
    /// manifest's. Says nothing about who made the manifest.
    pub(crate) fn check_image(&self, hashed: &Hashed) -> Result<(), FirmwareError> {
        if hashed.len != u64::from(self.size) {
            return Err(FirmwareError::SizeMismatch {
                expected: self.size,
                got: hashed.len,
            });
        }
        // Not secret: a plain comparison is fine (the signature is what protects).
        if hashed.sha256 != self.sha256 {
            return Err(FirmwareError::HashMismatch);
        }
        Ok(())
    }
}

/// The SHA-256 of an image, computed a chunk at a time as it arrives.
#[derive(Clone, Default)]
pub struct ImageHasher {
    sha: Sha256,
    len: u64,
}

/// What [`ImageHasher::finish`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashed {
    /// Bytes hashed.
    pub len: u64,
    /// Their SHA-256.
    pub sha256: [u8; 32],
}

impl ImageHasher {
    /// Nothing hashed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next bytes of the image, in order.
    pub fn update(&mut self, chunk: &[u8]) {
        self.sha.update(chunk);
        self.len += chunk.len() as u64;
    }

    /// Bytes hashed so far (where a resumed transfer goes on).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The length and hash of everything given.
    pub fn finish(self) -> Hashed {
        Hashed {
            len: self.len,
            sha256: self.sha.finalize().into(),
        }
    }
}
