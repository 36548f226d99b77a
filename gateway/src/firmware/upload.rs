//! Checking an uploaded image before it is stored: its signed manifest
//! (`IMAGE.sig.json` from `certs sign-firmware`) must match the bytes and carry a valid
//! signature by the release key the gateway is configured with.

use std::path::Path;

use device_client::firmware::{ImageHasher, Manifest, RELEASE_KEY_LEN, SIGNATURE_LEN};
use device_client::proto::{MAX_FIRMWARE_LEN, Text};
use serde::Deserialize;

/// A release public key: 65 bytes, uncompressed SEC1.
pub type ReleaseKey = [u8; RELEASE_KEY_LEN];

/// Reads a release public key: `release.pub.pem` (SPKI PEM) or `release.pub.bin`.
pub fn read_release_key(path: &Path) -> Result<ReleaseKey, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse_release_key(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a release public key: SPKI PEM, or the 65 raw bytes.
pub fn parse_release_key(bytes: &[u8]) -> Result<ReleaseKey, String> {
    device_client::firmware::parse_release_key(bytes).map_err(|e| e.to_string())
}

/// What `certs sign-firmware` writes beside an image.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigFile {
    version: String,
    size: u32,
    sha256: String,
    signature: String,
}

/// An image that passed every check.
#[derive(Debug)]
pub struct Checked {
    /// Its version.
    pub version: String,
    /// Its SHA-256.
    pub sha256: [u8; 32],
    /// The release signature.
    pub signature: [u8; SIGNATURE_LEN],
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UploadError {
    /// The signature file is not what `certs sign-firmware` writes.
    #[error("the signature file is not valid: {0}")]
    BadSigFile(String),
    /// The version is not a valid firmware version.
    #[error("version {0:?} is not 1 to {MAX_FIRMWARE_LEN} bytes")]
    BadVersion(String),
    /// The image is not as long as the signature file says.
    #[error("the image is {got} bytes; its signature file says {expected}")]
    SizeMismatch {
        /// What the file says.
        expected: u32,
        /// The upload's length.
        got: usize,
    },
    /// The image's SHA-256 is not the signed one.
    #[error("the image's SHA-256 is not the one in its signature file")]
    HashMismatch,
    /// The signature is not the release key's.
    #[error("the signature does not verify with the gateway's release key")]
    BadSignature,
}

/// Checks `image` against its signature file and the release key.
pub fn check(key: &ReleaseKey, image: &[u8], sig_file: &[u8]) -> Result<Checked, UploadError> {
    let f: SigFile =
        serde_json::from_slice(sig_file).map_err(|e| UploadError::BadSigFile(e.to_string()))?;
    if f.version.is_empty() || Text::<MAX_FIRMWARE_LEN>::new(&f.version).is_err() {
        return Err(UploadError::BadVersion(f.version));
    }
    let sha256: [u8; 32] = hex::decode(&f.sha256)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| UploadError::BadSigFile("sha256 is not 64 hex digits".into()))?;
    let signature: [u8; SIGNATURE_LEN] = hex::decode(&f.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| UploadError::BadSigFile("signature is not 128 hex digits".into()))?;
    if usize::try_from(f.size).ok() != Some(image.len()) {
        return Err(UploadError::SizeMismatch {
            expected: f.size,
            got: image.len(),
        });
    }
    let manifest = Manifest {
        version: &f.version,
        size: f.size,
        sha256,
    };
    let mut hasher = ImageHasher::new();
    hasher.update(image);
    manifest
        .check(key, &signature, &hasher.finish())
        .map_err(|e| match e {
            device_client::firmware::FirmwareError::HashMismatch => UploadError::HashMismatch,
            _ => UploadError::BadSignature,
        })?;
    Ok(Checked {
        version: f.version,
        sha256,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(image: &[u8], version: &str) -> (certs::release::ReleaseKey, Vec<u8>) {
        let key = certs::release::ReleaseKey::generate().unwrap();
        let s = key.sign_image(version, image).unwrap();
        (key, serde_json::to_vec(&s).unwrap())
    }

    #[test]
    fn a_signed_image_passes_and_every_tampering_is_named() {
        let image = vec![0x5a; 3000];
        let (key, sig) = signed(&image, "fw-2.0");
        let pubkey = key.public_sec1();
        let ok = check(&pubkey, &image, &sig).unwrap();
        assert_eq!(ok.version, "fw-2.0");

        let mut flipped = image.clone();
        flipped[1234] ^= 1;
        assert_eq!(
            check(&pubkey, &flipped, &sig).unwrap_err(),
            UploadError::HashMismatch
        );
        assert!(matches!(
            check(&pubkey, &image[..2999], &sig),
            Err(UploadError::SizeMismatch {
                expected: 3000,
                got: 2999
            })
        ));
        let other = certs::release::ReleaseKey::generate()
            .unwrap()
            .public_sec1();
        assert_eq!(
            check(&other, &image, &sig).unwrap_err(),
            UploadError::BadSignature
        );
        // Another version's name over the same bytes: the signature does not cover it.
        let mut f: serde_json::Value = serde_json::from_slice(&sig).unwrap();
        f["version"] = "fw-9.9".into();
        let renamed = serde_json::to_vec(&f).unwrap();
        assert_eq!(
            check(&pubkey, &image, &renamed).unwrap_err(),
            UploadError::BadSignature
        );
        assert!(matches!(
            check(&pubkey, &image, b"{}"),
            Err(UploadError::BadSigFile(_))
        ));
    }

    #[test]
    fn release_keys_are_read_as_pem_or_raw_bytes() {
        let key = certs::release::ReleaseKey::generate().unwrap();
        let pem = key.public_pem().unwrap();
        assert_eq!(
            parse_release_key(pem.as_bytes()).unwrap(),
            key.public_sec1()
        );
        assert_eq!(
            parse_release_key(&key.public_sec1()).unwrap(),
            key.public_sec1()
        );
        assert!(parse_release_key(b"not a key").is_err());
        // A private key is not a release public key.
        assert!(parse_release_key(key.to_pem().unwrap().as_bytes()).is_err());
    }
}
