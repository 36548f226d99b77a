//! Release keys and firmware signatures: the key a vendor signs firmware images with,
//! and the manifest signature a device checks before it runs an image
//! (`device_client::firmware`, which defines what is signed).
//!
//! ```text
//!  ReleaseKey::generate ─► release/release.key.pem (PKCS#8, 0600: keep it offline)
//!                      └─► release.pub.pem, release.pub.bin (65 B SEC1: into firmware)
//!  ReleaseKey::sign_image(version, image) ─► Signed { version, size, sha256, signature }
//!                                            (IMAGE.sig.json, uploaded with the image)
//! ```

use device_client::firmware::{MAX_MANIFEST_LEN, Manifest, RELEASE_KEY_LEN, SIGNATURE_LEN};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// A release signing key (ECDSA P-256).
pub struct ReleaseKey(SigningKey);

/// What a release says about an image: the manifest's fields and the signature over
/// them, as `certs sign-firmware` writes it (`IMAGE.sig.json`) and the gateway takes
/// it with the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The image's version.
    pub version: String,
    /// Its length in bytes.
    pub size: u32,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// ECDSA P-256 / SHA-256 over the manifest, `r ‖ s`, hex.
    pub signature: String,
}

impl ReleaseKey {
    /// A new random key.
    pub fn generate() -> Result<Self, Error> {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| Error::Parse {
                what: "random bytes for a release key",
                detail: e.to_string(),
            })?;
            // A scalar of zero or above the group order is refused: draw again.
            if let Ok(k) = SigningKey::from_bytes(&bytes.into()) {
                return Ok(Self(k));
            }
        }
    }

    /// A key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| Error::Parse {
                what: "release key (PKCS#8 PEM, P-256)",
                detail: e.to_string(),
            })
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String, Error> {
        self.0
            .to_pkcs8_pem(LineEnding::LF)
            .map(|p| p.to_string())
            .map_err(|e| Error::Parse {
                what: "release key",
                detail: e.to_string(),
            })
    }

    /// The public key, SEC1 uncompressed (`04 ‖ x ‖ y`): what a firmware includes.
    pub fn public_sec1(&self) -> [u8; RELEASE_KEY_LEN] {
        let point = self.0.verifying_key().to_encoded_point(false);
        let mut out = [0u8; RELEASE_KEY_LEN];
        out.copy_from_slice(point.as_bytes());
        out
    }

    /// The public key as SubjectPublicKeyInfo PEM.
    pub fn public_pem(&self) -> Result<String, Error> {
        self.0
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| Error::Parse {
                what: "release public key",
                detail: e.to_string(),
            })
    }

    /// Signs `image` as `version`.
    pub fn sign_image(&self, version: &str, image: &[u8]) -> Result<Signed, Error> {
        let size = u32::try_from(image.len()).map_err(|_| Error::Parse {
            what: "firmware image",
            detail: format!("{} bytes is over 4 GiB", image.len()),
        })?;
        let sha256: [u8; 32] = Sha256::digest(image).into();
        let manifest = Manifest {
            version,
            size,
            sha256,
        };
        let mut buf = [0u8; MAX_MANIFEST_LEN];
        let bytes = manifest.signed_bytes(&mut buf).map_err(|e| Error::Parse {
            what: "firmware version",
            detail: e.to_string(),
        })?;
        let signature: Signature = self.0.sign(bytes);
        let raw: [u8; SIGNATURE_LEN] = signature.to_bytes().into();
        Ok(Signed {
            version: version.to_owned(),
            size,
            sha256: hex::encode(sha256),
            signature: hex::encode(raw),
        })
    }
}

impl Signed {
    /// The manifest and signature as a device takes them; `None` if the hex fields
    /// are malformed.
    pub fn parts(&self) -> Option<(Manifest<'_>, [u8; SIGNATURE_LEN])> {
        let sha256 = hex::decode(&self.sha256).ok()?.try_into().ok()?;
        let signature = hex::decode(&self.signature).ok()?.try_into().ok()?;
        Some((
            Manifest {
                version: &self.version,
                size: self.size,
                sha256,
            },
            signature,
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use device_client::firmware::{FirmwareError, ImageHasher};

    fn image() -> Vec<u8> {
        (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// What a device does with a downloaded image: hash it in chunks, then check.
    fn device_check(
        key: &[u8; RELEASE_KEY_LEN],
        signed: &Signed,
        image: &[u8],
    ) -> Result<(), FirmwareError> {
        let (manifest, signature) = signed.parts().unwrap();
        let mut h = ImageHasher::new();
        for chunk in image.chunks(1000) {
            h.update(chunk);
        }
        manifest.check(key, &signature, &h.finish())
    }

    #[test]
    fn a_signed_image_checks_out_on_the_device_and_a_changed_one_does_not() {
        let key = ReleaseKey::generate().unwrap();
        let public = key.public_sec1();
        let img = image();
        let signed = key.sign_image("1.2.0", &img).unwrap();
        assert_eq!(signed.size, 40_000);
        assert_eq!(device_check(&public, &signed, &img), Ok(()));

        // One byte changed: the hash no longer matches.
        let mut tampered = img.clone();
        tampered[12_345] ^= 1;
        assert_eq!(
            device_check(&public, &signed, &tampered),
            Err(FirmwareError::HashMismatch)
        );
        // Cut short.
        assert!(matches!(
            device_check(&public, &signed, &img[..39_999]),
            Err(FirmwareError::SizeMismatch {
                expected: 40_000,
                got: 39_999
            })
        ));
        // The same image under another version's name: the signature is not for it.
        let mut renamed = signed.clone();
        renamed.version = "9.9.9".into();
        assert_eq!(
            device_check(&public, &renamed, &img),
            Err(FirmwareError::BadSignature)
        );
        // A tampered image with a manifest to match, signed by another key.
        let other = ReleaseKey::generate().unwrap();
        let forged = other.sign_image("1.2.0", &tampered).unwrap();
        assert_eq!(
            device_check(&public, &forged, &tampered),
            Err(FirmwareError::BadSignature)
        );
        // Not a key at all.
        assert_eq!(
            device_check(&[4u8; RELEASE_KEY_LEN], &signed, &img),
            Err(FirmwareError::BadKey)
        );
    }

    #[test]
    fn the_key_survives_pem_and_versions_are_bounded() {
        let key = ReleaseKey::generate().unwrap();
        let back = ReleaseKey::from_pem(&key.to_pem().unwrap()).unwrap();
        assert_eq!(back.public_sec1(), key.public_sec1());
        assert!(
            key.public_pem()
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert!(key.sign_image(&"v".repeat(33), b"x").is_err());
        assert!(key.sign_image(&"v".repeat(32), b"x").is_ok());
        assert!(ReleaseKey::from_pem("not a key").is_err());
    }
}
