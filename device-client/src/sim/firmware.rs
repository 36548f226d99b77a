//! Firmware updates of simulated devices (protocol version 3): the real
//! [`Updater`](crate::firmware::Updater) over an in-memory NOR flash partition.
//!
//! ```text
//!  offer/chunk/cancel ─► SimFirmware::handle ─► Updater::handle(client, MemFlash, msg)
//!                              │  MemFlash: held while a transfer runs, grows with the
//!                              │  image, freed when it ends; fails the last write of
//!                              │  an image for `firmware_failure_rate` of the devices
//!                              ▼
//!  Verified ─► the device runs the offered version (its next Hello says so) ─► restart
//!  a simulated reboot mid-transfer: the checkpoint is kept, the next boot's updater
//!  resumes from the partition (Updater::resume), as a device with a persisted
//!  checkpoint does
//! ```
//!
//! Without a release key (`SimConfig::release_key` unset) the updater checks size and
//! SHA-256 only: a simulator convenience, so that rollouts can be tried without
//! provisioning a key; a firmware always checks the release signature.

extern crate std;

use std::boxed::Box;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::vec::Vec;

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash, check_erase, check_read, check_write,
};

use crate::firmware::{Checkpoint, RELEASE_KEY_LEN, Update, Updater};
use crate::machine::{Client, FirmwareMsg};
use crate::proto::{FirmwareId, FirmwareOutcome};

/// The update partition of a simulated device: images up to this size are taken
/// (larger ones declined). Memory is only what an image takes, while it transfers.
pub const PARTITION_BYTES: usize = 16 * 1024 * 1024;

/// Write unit and erase block of the simulated flash (as an nRF52's).
const WRITE_SIZE: usize = 4;
const ERASE_SIZE: usize = 4096;

/// The read buffer for [`Updater::resume`] after a simulated reboot.
const RESUME_BUF: usize = 4096;

/// An in-memory NOR flash of [`PARTITION_BYTES`] that holds only what was erased or
/// written (reads beyond read as erased).
pub(crate) struct MemFlash {
    bytes: Vec<u8>,
    /// A write that reaches past this offset fails (`firmware_failure_rate`).
    fail_from: Option<u32>,
}

impl MemFlash {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            fail_from: None,
        }
    }

    fn grow(&mut self, to: usize) {
        if self.bytes.len() < to {
            self.bytes.resize(to, 0xff);
        }
    }
}

impl ErrorType for MemFlash {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for MemFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, out: &mut [u8]) -> Result<(), Self::Error> {
        check_read(self, offset, out.len())?;
        let at = offset as usize;
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.bytes.get(at + i).copied().unwrap_or(0xff);
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        PARTITION_BYTES
    }
}

impl NorFlash for MemFlash {
    const WRITE_SIZE: usize = WRITE_SIZE;
    const ERASE_SIZE: usize = ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        self.grow(to as usize);
        if let Some(span) = self.bytes.get_mut(from as usize..to as usize) {
            span.fill(0xff);
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, data.len())?;
        let at = offset as usize;
        let end = at + data.len();
        if self.fail_from.is_some_and(|f| end > f as usize) {
            return Err(NorFlashErrorKind::Other);
        }
        self.grow(end);
        if let Some(span) = self.bytes.get_mut(at..end) {
            span.copy_from_slice(data);
        }
        Ok(())
    }
}

/// A device's firmware state that outlives its boots: the version it runs, the
/// partition while a transfer holds it, the checkpoint a reboot resumes from.
pub(crate) struct FirmwareState {
    /// What the device says in `Hello`.
    pub(crate) running: &'static str,
    flash: Option<MemFlash>,
    checkpoint: Option<Checkpoint>,
    /// The transfer whose end was counted last (a repeated offer is answered again,
    /// and not counted again).
    counted: Option<FirmwareId>,
}

impl FirmwareState {
    pub(crate) fn new(running: &'static str) -> Self {
        Self {
            running,
            flash: None,
            checkpoint: None,
            counted: None,
        }
    }
}

/// What a firmware message did, for the device to count and act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Done {
    /// Nothing to count.
    Nothing,
    /// Installed: the device now runs this version and must restart.
    Installed(&'static str),
    /// A transfer failed with this outcome.
    Failed(FirmwareOutcome),
    /// An offer was declined.
    Declined,
}

/// One boot's firmware updater.
pub(crate) struct SimFirmware<'k> {
    updater: Updater<'k, WRITE_SIZE>,
    failure_rate: f64,
}

impl<'k> SimFirmware<'k> {
    /// The updater of a boot; takes up a transfer the last boot left unfinished.
    pub(crate) fn boot(
        release_key: Option<&'k [u8; RELEASE_KEY_LEN]>,
        failure_rate: f64,
        state: &mut FirmwareState,
    ) -> Self {
        let mut updater = match release_key {
            Some(key) => Updater::new(key),
            None => Updater::danger_hash_only(),
        };
        if let (Some(at), Some(flash)) = (state.checkpoint.take(), state.flash.as_mut()) {
            let mut buf = std::vec![0u8; RESUME_BUF];
            // Unreadable (it cannot be, in memory): start over at the next offer.
            if updater.resume(flash, &at, &mut buf).is_err() {
                state.flash = None;
            }
        } else {
            state.flash = None;
        }
        Self {
            updater,
            failure_rate,
        }
    }

    /// The boot ends (a reboot): keep where the transfer stands.
    pub(crate) fn shut_down(self, state: &mut FirmwareState) {
        state.checkpoint = self.updater.checkpoint();
        if state.checkpoint.is_none() {
            state.flash = None;
        }
    }

    /// Hands one firmware message to the updater.
    pub(crate) fn handle<const R: usize, const O: usize>(
        &mut self,
        state: &mut FirmwareState,
        device_id: &str,
        client: &mut Client<R, O>,
        msg: &FirmwareMsg<'_>,
    ) -> Done {
        let flash = state.flash.get_or_insert_with(MemFlash::new);
        let update = self.updater.handle(client, flash, msg);
        let ended = |state: &mut FirmwareState, id: FirmwareId| {
            state.flash = None;
            state.counted.replace(id) != Some(id)
        };
        match update {
            Update::Progress { id, size, .. } if matches!(msg, FirmwareMsg::Offer(_)) => {
                // A transfer started or resumed: does this device's flash give out?
                flash.fail_from =
                    fails(device_id, id, self.failure_rate).then_some(size.saturating_sub(1));
                Done::Nothing
            }
            Update::Verified { id, version } => {
                let counted = ended(state, id);
                state.running = intern(version.as_str());
                if counted {
                    Done::Installed(state.running)
                } else {
                    Done::Nothing
                }
            }
            Update::Failed { id, outcome } => {
                if ended(state, id) {
                    Done::Failed(outcome)
                } else {
                    Done::Nothing
                }
            }
            Update::Cancelled { .. } => {
                state.flash = None;
                Done::Nothing
            }
            Update::Declined { .. } => {
                if self.updater.progress().is_none() {
                    state.flash = None;
                }
                Done::Declined
            }
            _ => Done::Nothing,
        }
    }
}

/// Whether the flash of `device` gives out on offer `id`: a hash of both below `rate`,
/// so the same devices fail the same offer in every run.
pub(crate) fn fails(device: &str, id: FirmwareId, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    // FNV-1a over the id's bytes and the offer's, then splitmix64's finalizer.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes().chain(id.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    ((h >> 11) as f64 / (1u64 << 53) as f64) < rate
}

/// `Config::firmware` is `&'static str` (a firmware's version is a constant): the
/// versions simulated devices install are kept once each for the process.
fn intern(version: &str) -> &'static str {
    static VERSIONS: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut set = VERSIONS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = set.get(version) {
        return v;
    }
    let v: &'static str = Box::leak(Box::from(version));
    set.insert(v);
    v
}

#[cfg(test)]
mod tests {
    use std::string::String;

    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::{Signature, SigningKey};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::firmware::{MAX_MANIFEST_LEN, Manifest};
    use crate::machine::{Config, Input};
    use crate::proto::{
        self, Blob, Downlink, FirmwareChunk, FirmwareOffer, Fixed, MAX_DOWNLINK_FRAME, Text,
        Uplink, Welcome,
    };

    type Dev = Client<1024, 512>;

    fn frame(msg: &Downlink<'_>) -> Vec<u8> {
        let mut buf = std::vec![0u8; MAX_DOWNLINK_FRAME];
        let n = proto::encode(msg, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// A simulated device's client (512-byte frames) in a version-3 session.
    fn session(running: &'static str) -> Dev {
        let mut c = Client::new(Config::new(7, running).with_frames(512, 512));
        c.handle_connected(0);
        let mut buf = [0u8; 512];
        assert!(c.poll_transmit(0, &mut buf).is_some());
        let welcome = frame(&Downlink::Welcome(Welcome {
            version: 3,
            heartbeat_s: 30,
            last_acked: None,
            server_time_ms: 0,
            max_frame: 4096,
        }));
        assert!(c.handle_input(0, &welcome).is_ok());
        c
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[0x31; 32].into()).unwrap()
    }

    fn public(key: &SigningKey) -> [u8; RELEASE_KEY_LEN] {
        key.verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .try_into()
            .unwrap()
    }

    fn offer(id: u32, version: &str, image: &[u8], key: &SigningKey) -> Vec<u8> {
        let sha256: [u8; 32] = Sha256::digest(image).into();
        let manifest = Manifest {
            version,
            size: image.len() as u32,
            sha256,
        };
        let mut buf = [0u8; MAX_MANIFEST_LEN];
        let sig: Signature = key.sign(manifest.signed_bytes(&mut buf).unwrap());
        frame(&Downlink::FirmwareOffer(FirmwareOffer {
            id,
            version: Text::new(version).unwrap(),
            size: manifest.size,
            sha256: Fixed(sha256),
            signature: Fixed(sig.to_bytes().into()),
        }))
    }

    /// The gateway's side: serves `image` for up to `budget` requests; returns what
    /// the device did and the statuses it sent.
    fn serve(
        fw: &mut SimFirmware<'_>,
        state: &mut FirmwareState,
        client: &mut Dev,
        image: &[u8],
        first: &[u8],
        budget: usize,
    ) -> (Vec<Done>, Vec<FirmwareOutcome>, u64) {
        let mut done = Vec::new();
        let mut statuses = Vec::new();
        let mut fetched = 0u64;
        let mut feed = |client: &mut Dev, bytes: &[u8], done: &mut Vec<Done>| {
            let Ok(Input::Firmware { firmware, .. }) = client.handle_input(0, bytes) else {
                panic!("a firmware message");
            };
            done.push(fw.handle(state, "sim-0001", client, &firmware));
        };
        feed(client, first, &mut done);
        let mut answered = 0;
        let mut buf = [0u8; 512];
        while let Some(n) = client.poll_transmit(0, &mut buf) {
            let body = proto::split_frame(&buf[..n], 512).unwrap().unwrap().body;
            match proto::decode_uplink(body).unwrap() {
                Uplink::FirmwareRequest(r) => {
                    if answered == budget {
                        continue;
                    }
                    answered += 1;
                    let from = (r.offset as usize).min(image.len());
                    let to = (from + usize::from(r.len)).min(image.len());
                    fetched += (to - from) as u64;
                    let chunk = frame(&Downlink::FirmwareChunk(FirmwareChunk {
                        id: r.id,
                        offset: r.offset,
                        data: Blob::new(&image[from..to]).unwrap(),
                    }));
                    feed(client, &chunk, &mut done);
                }
                Uplink::FirmwareStatus(s) => statuses.push(s.outcome),
                _ => {}
            }
        }
        (done, statuses, fetched)
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 256) as u8).collect()
    }

    #[test]
    fn without_a_release_key_an_image_is_installed_on_size_and_hash() {
        let img = image(3_001);
        let mut state = FirmwareState::new("sim-1.0");
        let mut fw = SimFirmware::boot(None, 0.0, &mut state);
        let mut client = session(state.running);
        // Signed by a key nobody checks.
        let o = offer(1, "sim-2.0", &img, &key());
        let (done, statuses, fetched) = serve(&mut fw, &mut state, &mut client, &img, &o, 99);
        assert_eq!(done.last(), Some(&Done::Installed("sim-2.0")));
        assert_eq!(statuses, [FirmwareOutcome::Verified]);
        assert_eq!(fetched, 3_001);
        assert_eq!(state.running, "sim-2.0");
        assert!(state.flash.is_none(), "the partition is freed");
        // A damaged image is still refused.
        let mut state = FirmwareState::new("sim-1.0");
        let mut fw = SimFirmware::boot(None, 0.0, &mut state);
        let mut client = session(state.running);
        let mut bad = img.clone();
        bad[7] ^= 1;
        let (done, statuses, _) = serve(&mut fw, &mut state, &mut client, &bad, &o, 99);
        assert_eq!(
            done.last(),
            Some(&Done::Failed(FirmwareOutcome::HashMismatch))
        );
        assert_eq!(statuses, [FirmwareOutcome::HashMismatch]);
        assert_eq!(state.running, "sim-1.0");
    }

    #[test]
    fn with_a_release_key_the_signature_is_checked() {
        let img = image(2_000);
        let k = key();
        let public = public(&k);
        let other = SigningKey::from_bytes(&[0x32; 32].into()).unwrap();
        for (signer, expected) in [
            (&k, Done::Installed("sim-3.0")),
            (&other, Done::Failed(FirmwareOutcome::BadSignature)),
        ] {
            let mut state = FirmwareState::new("sim-1.0");
            let mut fw = SimFirmware::boot(Some(&public), 0.0, &mut state);
            let mut client = session(state.running);
            let o = offer(2, "sim-3.0", &img, signer);
            let (done, _, _) = serve(&mut fw, &mut state, &mut client, &img, &o, 99);
            assert_eq!(done.last(), Some(&expected));
        }
    }

    #[test]
    fn a_failing_device_downloads_everything_then_reports_a_storage_error() {
        let img = image(5_000);
        let mut state = FirmwareState::new("sim-1.0");
        let mut fw = SimFirmware::boot(None, 1.0, &mut state);
        let mut client = session(state.running);
        let o = offer(3, "sim-2.0", &img, &key());
        let (done, statuses, fetched) = serve(&mut fw, &mut state, &mut client, &img, &o, 99);
        assert_eq!(fetched, 5_000);
        assert_eq!(
            done.last(),
            Some(&Done::Failed(FirmwareOutcome::StorageError))
        );
        assert_eq!(statuses, [FirmwareOutcome::StorageError]);
        assert_eq!(state.running, "sim-1.0");
        assert!(state.flash.is_none());
        // Offered again: the same answer, not counted twice, nothing fetched.
        let (done, statuses, fetched) = serve(&mut fw, &mut state, &mut client, &img, &o, 99);
        assert_eq!((done, fetched), (std::vec![Done::Nothing], 0));
        assert_eq!(statuses, [FirmwareOutcome::StorageError]);
    }

    #[test]
    fn the_failing_share_is_chosen_by_device_and_offer() {
        let ids: Vec<String> = (0..2_000).map(|i| std::format!("sim-{i:04}")).collect();
        let count = |rate: f64, offer: u32| ids.iter().filter(|d| fails(d, offer, rate)).count();
        assert_eq!(count(0.0, 1), 0);
        assert_eq!(count(1.0, 1), 2_000);
        let quarter = count(0.25, 1);
        assert!((400..600).contains(&quarter), "{quarter}");
        // The same in every run; another offer picks other devices.
        assert_eq!(count(0.25, 1), quarter);
        let a: Vec<bool> = ids.iter().map(|d| fails(d, 1, 0.25)).collect();
        let b: Vec<bool> = ids.iter().map(|d| fails(d, 2, 0.25)).collect();
        assert_ne!(a, b);
        // A larger share keeps the devices a smaller one picked.
        assert!(ids.iter().all(|d| !fails(d, 1, 0.25) || fails(d, 1, 0.5)));
    }

    #[test]
    fn a_reboot_mid_transfer_resumes_from_the_partition() {
        let img = image(20_000);
        let mut state = FirmwareState::new("sim-1.0");
        let mut fw = SimFirmware::boot(None, 0.0, &mut state);
        let mut client = session(state.running);
        let o = offer(4, "sim-2.0", &img, &key());
        // 496 bytes a chunk (512 − 15, in whole write units): 20 chunks = 9,920 bytes.
        let (_, _, fetched) = serve(&mut fw, &mut state, &mut client, &img, &o, 20);
        assert_eq!(fetched, 9_920);
        fw.shut_down(&mut state);
        assert!(state.checkpoint.is_some() && state.flash.is_some());
        // The next boot takes up from the start of the erase block it was in (8,192).
        let mut fw = SimFirmware::boot(None, 0.0, &mut state);
        let mut client = session(state.running);
        let (done, _, fetched) = serve(&mut fw, &mut state, &mut client, &img, &o, 99);
        assert_eq!(fetched, 20_000 - 8_192);
        assert_eq!(done.last(), Some(&Done::Installed("sim-2.0")));
    }

    #[test]
    fn the_running_version_and_oversized_images_are_declined() {
        let mut state = FirmwareState::new("sim-1.0");
        let mut fw = SimFirmware::boot(None, 0.0, &mut state);
        let mut client = session(state.running);
        let o = offer(5, "sim-1.0", &image(10), &key());
        let (done, statuses, _) = serve(&mut fw, &mut state, &mut client, &[], &o, 99);
        assert_eq!(done, [Done::Declined]);
        assert_eq!(statuses, [FirmwareOutcome::Declined]);
        assert!(state.flash.is_none());
        // Larger than the partition: an offer only, no image needed.
        let big = frame(&Downlink::FirmwareOffer(FirmwareOffer {
            id: 6,
            version: Text::new("sim-9").unwrap(),
            size: PARTITION_BYTES as u32 + 1,
            sha256: Fixed([0; 32]),
            signature: Fixed([0; 64]),
        }));
        let (done, _, _) = serve(&mut fw, &mut state, &mut client, &[], &big, 99);
        assert_eq!(done, [Done::Declined]);
    }

    #[test]
    fn installed_versions_are_kept_once() {
        let a = intern(&String::from("sim-7.7"));
        let b = intern("sim-7.7");
        assert!(core::ptr::eq(a, b));
    }
}
