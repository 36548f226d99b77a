//! A firmware image as the gateway keeps and serves it (protocol version 3).

use std::sync::Arc;

use device_client::firmware::Manifest;
use device_client::proto::{Fixed, Text};

/// An uploaded image: its manifest (what the release key signed) and its bytes, shared
/// by every session serving it.
#[derive(Debug)]
pub struct Image {
    /// The store's id.
    pub id: i64,
    /// The firmware version the image reports in `Hello`.
    pub version: String,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
    /// The release key's signature of the manifest (`r‖s`).
    pub signature: [u8; 64],
    /// The image.
    pub bytes: Arc<[u8]>,
}

impl Image {
    /// The image's length, which fits `u32` (uploads are bounded far below).
    pub fn size(&self) -> u32 {
        u32::try_from(self.bytes.len()).unwrap_or(u32::MAX)
    }

    /// The manifest the release key signed.
    pub fn manifest(&self) -> Manifest<'_> {
        Manifest {
            version: &self.version,
            size: self.size(),
            sha256: self.sha256,
        }
    }

    /// The `FirmwareOffer` for transfer `id`; `None` if the version is over the
    /// protocol's bound (refused at upload, so never).
    pub fn offer(&self, id: u32) -> Option<device_client::proto::FirmwareOffer<'_>> {
        Some(device_client::proto::FirmwareOffer {
            id,
            version: Text::new(&self.version).ok()?,
            size: self.size(),
            sha256: Fixed(self.sha256),
            signature: Fixed(self.signature),
        })
    }

    /// Bytes `offset..offset + len` of the image, cut at its end (empty past it).
    pub fn chunk(&self, offset: u32, len: usize) -> &[u8] {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let end = start.saturating_add(len).min(self.bytes.len());
        self.bytes.get(start..end).unwrap_or_default()
    }
}
