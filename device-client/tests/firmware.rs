//! `firmware::Updater` against the real client state machine, with a scripted gateway
//! that answers `FirmwareRequest`s from an image (encoded downlink frames, fed through
//! `Client::handle_input`) and a RAM NOR flash that refuses what real flash refuses:
//! misaligned writes and erases, and writing a byte twice without an erase.
#![cfg(feature = "firmware")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use device_client::firmware::{
    Checkpoint, Decline, MAX_MANIFEST_LEN, Manifest, RELEASE_KEY_LEN, ReadError, Update, Updater,
    hash_flash,
};
use device_client::machine::{Client, Config, Input, Millis};
use device_client::proto::{
    self, Blob, Downlink, FirmwareCancel, FirmwareChunk, FirmwareId, FirmwareOffer,
    FirmwareOutcome, Fixed, MAX_DOWNLINK_FRAME, Text, Uplink, Welcome,
};
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash, check_erase, check_read, check_write,
};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use sha2::{Digest, Sha256};

const RUNNING: &str = "app-1.0.0";
const NEW: &str = "app-1.1.0";

type Dev = Client<1024, 256>;

// ---------------------------------------------------------------------------------
// A RAM NOR flash.

/// `WS`-byte write units, `ES`-byte erase blocks. Starts out programmed (zeros), so a
/// write before an erase shows.
struct RamFlash<const WS: usize, const ES: usize> {
    bytes: Vec<u8>,
    erased: Vec<bool>,
    erases: usize,
    /// Fails every write that reaches this offset (a worn-out block).
    fail_from: Option<u32>,
}

impl<const WS: usize, const ES: usize> RamFlash<WS, ES> {
    fn new(capacity: usize) -> Self {
        Self {
            bytes: vec![0; capacity],
            erased: vec![false; capacity],
            erases: 0,
            fail_from: None,
        }
    }
}

impl<const WS: usize, const ES: usize> ErrorType for RamFlash<WS, ES> {
    type Error = NorFlashErrorKind;
}

impl<const WS: usize, const ES: usize> ReadNorFlash for RamFlash<WS, ES> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        check_read(self, offset, bytes.len())?;
        let at = offset as usize;
        bytes.copy_from_slice(&self.bytes[at..at + bytes.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.bytes.len()
    }
}

impl<const WS: usize, const ES: usize> NorFlash for RamFlash<WS, ES> {
    const WRITE_SIZE: usize = WS;
    const ERASE_SIZE: usize = ES;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        let (from, to) = (from as usize, to as usize);
        self.bytes[from..to].fill(0xff);
        self.erased[from..to].fill(true);
        self.erases += (to - from) / ES;
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, bytes.len())?;
        let at = offset as usize;
        let end = at + bytes.len();
        if self.fail_from.is_some_and(|f| end > f as usize) {
            return Err(NorFlashErrorKind::Other);
        }
        assert!(
            self.erased[at..end].iter().all(|e| *e),
            "write of {at}..{end}: bytes written twice without an erase"
        );
        self.bytes[at..end].copy_from_slice(bytes);
        self.erased[at..end].fill(false);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// The release key and signed offers.

fn release_key() -> SigningKey {
    SigningKey::from_bytes(&[0x5e; 32].into()).unwrap()
}

fn public(key: &SigningKey) -> [u8; RELEASE_KEY_LEN] {
    key.verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .try_into()
        .unwrap()
}

fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// An offer of `image` as `version`, its manifest signed by `key`.
struct Offer {
    id: FirmwareId,
    version: &'static str,
    size: u32,
    sha256: [u8; 32],
    signature: [u8; 64],
}

impl Offer {
    fn signed(id: FirmwareId, version: &'static str, image: &[u8], key: &SigningKey) -> Self {
        let sha256: [u8; 32] = Sha256::digest(image).into();
        let size = image.len() as u32;
        let manifest = Manifest {
            version,
            size,
            sha256,
        };
        let mut buf = [0u8; MAX_MANIFEST_LEN];
        let signature: Signature = key.sign(manifest.signed_bytes(&mut buf).unwrap());
        Self {
            id,
            version,
            size,
            sha256,
            signature: signature.to_bytes().into(),
        }
    }

    fn frame(&self) -> Vec<u8> {
        frame(&Downlink::FirmwareOffer(FirmwareOffer {
            id: self.id,
            version: Text::new(self.version).unwrap(),
            size: self.size,
            sha256: Fixed(self.sha256),
            signature: Fixed(self.signature),
        }))
    }
}

fn frame(msg: &Downlink<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_DOWNLINK_FRAME];
    let n = proto::encode(msg, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

// ---------------------------------------------------------------------------------
// The scripted gateway.

/// Serves one image; records what the device asked for and said.
struct Gateway {
    image: Vec<u8>,
    /// (offset, len) of every request.
    requests: Vec<(u32, u16)>,
    statuses: Vec<(FirmwareId, FirmwareOutcome)>,
    /// Answer this many requests, then stop answering (a connection about to drop).
    budget: Option<usize>,
}

impl Gateway {
    fn new(image: Vec<u8>) -> Self {
        Self {
            image,
            requests: Vec::new(),
            statuses: Vec::new(),
            budget: None,
        }
    }
}

/// A device: its client, updater and update partition.
struct Device<'k, const WS: usize, const ES: usize, const W: usize> {
    client: Dev,
    updater: Updater<'k, W>,
    flash: RamFlash<WS, ES>,
    now: Millis,
    updates: Vec<Update>,
}

impl<'k, const WS: usize, const ES: usize, const W: usize> Device<'k, WS, ES, W> {
    fn new(key: &'k [u8; RELEASE_KEY_LEN], capacity: usize, max_frame_in: u16) -> Self {
        let cfg = Config::new(0xb007, RUNNING).with_frames(max_frame_in, 512);
        let mut dev = Self {
            client: Client::new(cfg),
            updater: Updater::new(key),
            flash: RamFlash::new(capacity),
            now: 0,
            updates: Vec::new(),
        };
        dev.open();
        dev
    }

    /// Connects, says `Hello`, takes a version-3 `Welcome`.
    fn open(&mut self) {
        self.now += 1_000;
        self.client.handle_connected(self.now);
        let mut buf = [0u8; 512];
        assert!(self.client.poll_transmit(self.now, &mut buf).is_some());
        let welcome = frame(&Downlink::Welcome(Welcome {
            version: 3,
            heartbeat_s: 30,
            last_acked: None,
            server_time_ms: 0,
            max_frame: 4096,
        }));
        assert!(matches!(
            self.client.handle_input(self.now, &welcome),
            Ok(Input::Frame { .. })
        ));
        assert_eq!(self.client.session_version(), Some(3));
    }

    /// Feeds one downlink frame; a firmware message goes to the updater.
    fn input(&mut self, bytes: &[u8]) -> Option<Update> {
        match self.client.handle_input(self.now, bytes).unwrap() {
            Input::Firmware { len, firmware } => {
                assert_eq!(len, bytes.len());
                let u = self
                    .updater
                    .handle(&mut self.client, &mut self.flash, &firmware);
                self.updates.push(u.clone());
                Some(u)
            }
            other => panic!("not a firmware message: {other:?}"),
        }
    }

    /// Transmits and answers until the device has nothing more to say (or the
    /// gateway's budget is spent).
    fn pump(&mut self, gw: &mut Gateway) {
        let mut buf = vec![0u8; 512];
        while let Some(n) = self.client.poll_transmit(self.now, &mut buf) {
            let body = proto::split_frame(&buf[..n], 512).unwrap().unwrap().body;
            match proto::decode_uplink(body).unwrap() {
                Uplink::FirmwareRequest(r) => {
                    gw.requests.push((r.offset, r.len));
                    if let Some(b) = gw.budget.as_mut() {
                        if *b == 0 {
                            continue;
                        }
                        *b -= 1;
                    }
                    let from = (r.offset as usize).min(gw.image.len());
                    let to = (from + usize::from(r.len)).min(gw.image.len());
                    let chunk = frame(&Downlink::FirmwareChunk(FirmwareChunk {
                        id: r.id,
                        offset: r.offset,
                        data: Blob::new(&gw.image[from..to]).unwrap(),
                    }));
                    self.input(&chunk);
                }
                Uplink::FirmwareStatus(s) => gw.statuses.push((s.id, s.outcome)),
                // The state report after `Welcome` (version 2 and up).
                Uplink::Reported(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Offers `offer` and serves `gw` to the end.
    fn transfer(&mut self, offer: &Offer, gw: &mut Gateway) -> Update {
        self.input(&offer.frame());
        self.pump(gw);
        self.updates.last().cloned().unwrap()
    }
}

fn verified(id: FirmwareId, version: &str) -> Update {
    Update::Verified {
        id,
        version: version.try_into().unwrap(),
    }
}

fn failed(id: FirmwareId, outcome: FirmwareOutcome) -> Update {
    Update::Failed { id, outcome }
}

/// The partition holds `image`, then 0xFF up to the end of its last write unit.
fn assert_holds<const WS: usize, const ES: usize>(flash: &RamFlash<WS, ES>, image: &[u8]) {
    assert_eq!(&flash.bytes[..image.len()], image);
    let padded = image.len().div_ceil(WS) * WS;
    assert!(flash.bytes[image.len()..padded].iter().all(|b| *b == 0xff));
}

// ---------------------------------------------------------------------------------

#[test]
fn a_whole_image_is_written_checked_and_verified() {
    let key = release_key();
    let public = public(&key);
    let img = image(10_001);
    let offer = Offer::signed(7, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 64 * 1024, 4111);
    let mut gw = Gateway::new(img.clone());
    assert_eq!(dev.transfer(&offer, &mut gw), verified(7, NEW));
    assert_eq!(gw.statuses, [(7, FirmwareOutcome::Verified)]);
    assert_holds(&dev.flash, &img);
    // Whole 4 KiB chunks (the receive buffer allows them), one request at a time, in
    // order; erase blocks only as the image reaches them.
    assert_eq!(gw.requests, [(0, 4096), (4096, 4096), (8192, 1809)]);
    assert_eq!(dev.flash.erases, 10);
    assert!(matches!(
        dev.updates[0],
        Update::Progress {
            id: 7,
            received: 0,
            size: 10_001
        }
    ));
    assert_eq!(dev.updater.progress(), None);
    assert_eq!(dev.updater.checkpoint(), None);
}

/// Write units of 4 and erase blocks of 1024 against sizes around every boundary, with
/// chunks cut by a small receive buffer (128 − 15 = 113 bytes, asked for as 112).
#[test]
fn odd_sizes_with_small_write_units_and_small_chunks() {
    let key = release_key();
    let public = public(&key);
    for size in [
        1, 3, 4, 5, 111, 112, 113, 1023, 1024, 1025, 2047, 4099, 5003,
    ] {
        let img = image(size);
        let offer = Offer::signed(size as u32, NEW, &img, &key);
        let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 128);
        let mut gw = Gateway::new(img.clone());
        assert_eq!(
            dev.transfer(&offer, &mut gw),
            verified(size as u32, NEW),
            "{size}"
        );
        assert_holds(&dev.flash, &img);
        assert!(gw.requests.iter().all(|(o, _)| o % 4 == 0), "{size}");
        assert!(gw.requests.iter().all(|(_, l)| *l <= 112), "{size}");
        assert_eq!(dev.flash.erases, size.div_ceil(1024), "{size}");
    }
}

/// Write units larger than the receive buffer's chunk: the tail of every chunk waits
/// in the pad buffer for the next one.
#[test]
fn write_units_larger_than_a_chunk() {
    let key = release_key();
    let public = public(&key);
    let img = image(3_000);
    let offer = Offer::signed(1, NEW, &img, &key);
    let mut dev: Device<'_, 256, 4096, 256> = Device::new(&public, 8 * 1024, 128);
    let mut gw = Gateway::new(img.clone());
    assert_eq!(dev.transfer(&offer, &mut gw), verified(1, NEW));
    assert_holds(&dev.flash, &img);
    assert!(gw.requests.iter().all(|(_, l)| *l <= 113));
}

#[test]
fn a_reconnect_mid_transfer_resumes_from_the_offset_held() {
    let key = release_key();
    let public = public(&key);
    let img = image(20_000);
    let offer = Offer::signed(9, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 32 * 1024, 1024);
    let mut gw = Gateway::new(img.clone());
    gw.budget = Some(7);
    dev.input(&offer.frame());
    dev.pump(&mut gw);
    // 7 chunks of 1008 bytes arrived; the 8th request went unanswered.
    assert_eq!(dev.updater.progress(), Some((9, 7 * 1008, 20_000)));
    dev.client.handle_closed(dev.now);
    dev.open();
    // The gateway offers again at the start of the session.
    gw.budget = None;
    assert_eq!(dev.transfer(&offer, &mut gw), verified(9, NEW));
    assert_holds(&dev.flash, &img);
    // Nothing fetched twice except the request the connection cut off.
    let offsets: Vec<u32> = gw.requests.iter().map(|r| r.0).collect();
    assert_eq!(offsets[7], 7 * 1008);
    assert_eq!(offsets[8], 7 * 1008, "resumed where it stood");
    assert_eq!(
        gw.requests.iter().map(|r| u32::from(r.1)).sum::<u32>(),
        20_000 + 1008
    );
    assert_eq!(gw.statuses, [(9, FirmwareOutcome::Verified)]);
}

/// An offer repeated within a session (the request it answers is still outstanding,
/// or was answered twice) costs a duplicate chunk at most, which is ignored.
#[test]
fn a_repeated_offer_in_a_session_asks_again_and_ignores_the_duplicate() {
    let key = release_key();
    let public = public(&key);
    let img = image(5_000);
    let offer = Offer::signed(3, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut gw = Gateway::new(img.clone());
    dev.input(&offer.frame());
    let mut buf = [0u8; 512];
    // The request leaves, the offer comes again before its answer.
    assert!(dev.client.poll_transmit(dev.now, &mut buf).is_some());
    dev.input(&offer.frame());
    let chunk = |from: usize, to: usize| {
        frame(&Downlink::FirmwareChunk(FirmwareChunk {
            id: 3,
            offset: from as u32,
            data: Blob::new(&img[from..to]).unwrap(),
        }))
    };
    assert!(matches!(
        dev.input(&chunk(0, 1008)),
        Some(Update::Progress { received: 1008, .. })
    ));
    // The answer to the second request: the same bytes again.
    assert_eq!(dev.input(&chunk(0, 1008)), Some(Update::Nothing));
    // Not asked for: another offset, another id.
    assert_eq!(dev.input(&chunk(2016, 3024)), Some(Update::Nothing));
    let other_id = frame(&Downlink::FirmwareChunk(FirmwareChunk {
        id: 4,
        offset: 1008,
        data: Blob::new(&img[1008..2016]).unwrap(),
    }));
    assert_eq!(dev.input(&other_id), Some(Update::Nothing));
    dev.pump(&mut gw);
    assert_eq!(dev.updates.last(), Some(&verified(3, NEW)));
    assert_holds(&dev.flash, &img);
}

#[test]
fn a_tampered_image_is_a_hash_mismatch() {
    let key = release_key();
    let public = public(&key);
    let img = image(3_333);
    let offer = Offer::signed(5, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut bad = img.clone();
    bad[2_000] ^= 1;
    let mut gw = Gateway::new(bad);
    assert_eq!(
        dev.transfer(&offer, &mut gw),
        failed(5, FirmwareOutcome::HashMismatch)
    );
    assert_eq!(gw.statuses, [(5, FirmwareOutcome::HashMismatch)]);
}

/// The offer's hash matches the image served, but the release key signed another one.
#[test]
fn a_tampered_offer_is_a_bad_signature() {
    let key = release_key();
    let public = public(&key);
    let img = image(3_333);
    let mut bad = img.clone();
    bad[10] ^= 0x80;
    let genuine = Offer::signed(5, NEW, &img, &key);
    let forged = Offer {
        sha256: Sha256::digest(&bad).into(),
        ..genuine
    };
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut gw = Gateway::new(bad);
    assert_eq!(
        dev.transfer(&forged, &mut gw),
        failed(5, FirmwareOutcome::BadSignature)
    );
    // Another version under the genuine signature fails too: the version is signed.
    let relabelled = Offer {
        id: 6,
        version: "app-9.9.9",
        ..Offer::signed(6, NEW, &img, &key)
    };
    let mut gw = Gateway::new(img);
    assert_eq!(
        dev.transfer(&relabelled, &mut gw),
        failed(6, FirmwareOutcome::BadSignature)
    );
}

#[test]
fn an_image_signed_by_another_key_is_a_bad_signature() {
    let key = release_key();
    let img = image(2_000);
    let offer = Offer::signed(1, NEW, &img, &key);
    let other = public(&SigningKey::from_bytes(&[0x77; 32].into()).unwrap());
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&other, 8 * 1024, 1024);
    let mut gw = Gateway::new(img.clone());
    assert_eq!(
        dev.transfer(&offer, &mut gw),
        failed(1, FirmwareOutcome::BadSignature)
    );
    // A release key that is not a P-256 point vouches for nothing either.
    let broken = [4u8; RELEASE_KEY_LEN];
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&broken, 8 * 1024, 1024);
    let mut gw = Gateway::new(img);
    assert_eq!(
        dev.transfer(&offer, &mut gw),
        failed(1, FirmwareOutcome::BadSignature)
    );
}

/// The gateway's image is shorter than the offer says: it answers the request past
/// its end with no bytes.
#[test]
fn an_image_shorter_than_offered_is_a_size_mismatch() {
    let key = release_key();
    let public = public(&key);
    let img = image(3_000);
    let mut offer = Offer::signed(2, NEW, &img, &key);
    offer.size = 4_000;
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut gw = Gateway::new(img);
    assert_eq!(
        dev.transfer(&offer, &mut gw),
        failed(2, FirmwareOutcome::SizeMismatch)
    );
    assert_eq!(gw.statuses, [(2, FirmwareOutcome::SizeMismatch)]);
}

#[test]
fn offers_of_the_running_version_or_too_large_are_declined() {
    let key = release_key();
    let public = public(&key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 4096, 1024);
    let mut gw = Gateway::new(Vec::new());
    let running = Offer::signed(1, RUNNING, &image(100), &key);
    assert_eq!(
        dev.transfer(&running, &mut gw),
        Update::Declined {
            id: 1,
            why: Decline::AlreadyRunning
        }
    );
    let fits = Offer::signed(2, NEW, &image(4096), &key);
    let too_large = Offer::signed(3, NEW, &image(4097), &key);
    assert_eq!(
        dev.transfer(&too_large, &mut gw),
        Update::Declined {
            id: 3,
            why: Decline::TooLarge
        }
    );
    assert_eq!(
        gw.statuses,
        [
            (1, FirmwareOutcome::Declined),
            (3, FirmwareOutcome::Declined)
        ]
    );
    assert!(gw.requests.is_empty());
    // The partition has room, but the image must fit another one (embassy-boot's
    // ACTIVE is a page smaller than DFU).
    dev.updater = Updater::new(&public).with_max_size(4095);
    assert_eq!(
        dev.transfer(&fits, &mut gw),
        Update::Declined {
            id: 2,
            why: Decline::TooLarge
        }
    );
    dev.updater = Updater::new(&public);
    let mut gw = Gateway::new(image(4096));
    assert_eq!(dev.transfer(&fits, &mut gw), verified(2, NEW));
}

#[test]
fn a_cancel_forgets_the_transfer_and_the_next_offer_starts_over() {
    let key = release_key();
    let public = public(&key);
    let img = image(6_000);
    let offer = Offer::signed(8, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut gw = Gateway::new(img.clone());
    gw.budget = Some(2);
    dev.input(&offer.frame());
    dev.pump(&mut gw);
    assert_eq!(dev.updater.progress(), Some((8, 2016, 6_000)));
    let cancel_other = frame(&Downlink::FirmwareCancel(FirmwareCancel { id: 99 }));
    assert_eq!(dev.input(&cancel_other), Some(Update::Nothing));
    let cancel = frame(&Downlink::FirmwareCancel(FirmwareCancel { id: 8 }));
    assert_eq!(dev.input(&cancel), Some(Update::Cancelled { id: 8 }));
    assert_eq!(dev.updater.progress(), None);
    // The request outstanding was withdrawn with it; a late chunk is ignored.
    let late = frame(&Downlink::FirmwareChunk(FirmwareChunk {
        id: 8,
        offset: 2016,
        data: Blob::new(&img[2016..3024]).unwrap(),
    }));
    assert_eq!(dev.input(&late), Some(Update::Nothing));
    gw.budget = None;
    gw.requests.clear();
    assert_eq!(dev.transfer(&offer, &mut gw), verified(8, NEW));
    assert_eq!(gw.requests[0], (0, 1008), "from the start");
    assert_holds(&dev.flash, &img);
}

#[test]
fn a_failing_write_is_a_storage_error() {
    let key = release_key();
    let public = public(&key);
    let img = image(5_000);
    let offer = Offer::signed(4, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    dev.flash.fail_from = Some(3_000);
    let mut gw = Gateway::new(img);
    assert_eq!(
        dev.transfer(&offer, &mut gw),
        failed(4, FirmwareOutcome::StorageError)
    );
    assert_eq!(gw.statuses, [(4, FirmwareOutcome::StorageError)]);
    // No more requests after the failure.
    assert_eq!(gw.requests.last().unwrap().0, 2016);
}

/// The final partial unit is written when the last chunk arrives: a failure there is a
/// storage error after the whole download.
#[test]
fn a_failing_last_write_is_a_storage_error() {
    let key = release_key();
    let public = public(&key);
    let img = image(5_001);
    let offer = Offer::signed(4, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    dev.flash.fail_from = Some(5_001);
    let mut gw = Gateway::new(img);
    assert_eq!(
        dev.transfer(&offer, &mut gw),
        failed(4, FirmwareOutcome::StorageError)
    );
    assert_eq!(
        gw.requests.iter().map(|r| u32::from(r.1)).sum::<u32>(),
        5_001
    );
}

#[test]
fn an_offer_after_the_end_gets_the_same_answer() {
    let key = release_key();
    let public = public(&key);
    let img = image(1_500);
    let offer = Offer::signed(12, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut gw = Gateway::new(img);
    assert_eq!(dev.transfer(&offer, &mut gw), verified(12, NEW));
    let erases = dev.flash.erases;
    // The status was lost (say the device did not restart in time): asked again, the
    // same answer, without fetching anything.
    dev.client.handle_closed(dev.now);
    dev.open();
    gw.requests.clear();
    assert_eq!(dev.transfer(&offer, &mut gw), verified(12, NEW));
    assert!(gw.requests.is_empty());
    assert_eq!(dev.flash.erases, erases);
    assert_eq!(gw.statuses.len(), 2);
}

/// After `Verified` the partition holds the image marked for the bootloader: no other
/// offer may overwrite it before the restart, and a cancel does not undo it.
#[test]
fn after_verified_no_other_offer_is_taken_until_the_restart() {
    let key = release_key();
    let public = public(&key);
    let img = image(1_500);
    let offer = Offer::signed(12, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut gw = Gateway::new(img.clone());
    assert_eq!(dev.transfer(&offer, &mut gw), verified(12, NEW));
    let cancel = frame(&Downlink::FirmwareCancel(FirmwareCancel { id: 12 }));
    assert_eq!(dev.input(&cancel), Some(Update::Nothing));
    let newer = Offer::signed(13, "app-1.2.0", &image(900), &key);
    let mut gw2 = Gateway::new(image(900));
    assert_eq!(dev.transfer(&newer, &mut gw2), Update::Nothing);
    assert!(gw2.requests.is_empty() && gw2.statuses.is_empty());
    assert_holds(&dev.flash, &img);
    // The verified one is still answered.
    assert_eq!(dev.transfer(&offer, &mut gw), verified(12, NEW));
}

#[test]
fn a_checkpoint_resumes_after_a_reboot_from_the_block_it_was_in() {
    let key = release_key();
    let public = public(&key);
    let img = image(9_000);
    let offer = Offer::signed(21, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 16 * 1024, 1024);
    let mut gw = Gateway::new(img.clone());
    gw.budget = Some(3);
    dev.input(&offer.frame());
    dev.pump(&mut gw);
    let kept = dev.updater.checkpoint().unwrap();
    assert_eq!(
        kept,
        Checkpoint {
            id: 21,
            sha256: offer.sha256,
            written: 3 * 1008
        }
    );
    // Two more chunks reach flash after the checkpoint was kept; then the reboot.
    gw.budget = Some(2);
    dev.client.handle_closed(dev.now);
    dev.open();
    dev.input(&offer.frame());
    dev.pump(&mut gw);
    assert_eq!(dev.updater.progress(), Some((21, 5 * 1008, 9_000)));

    let flash = std::mem::replace(&mut dev.flash, RamFlash::new(0));
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 0, 1024);
    dev.flash = flash;
    let mut buf = [0u8; 100];
    dev.updater.resume(&mut dev.flash, &kept, &mut buf).unwrap();
    // From the start of the block the checkpoint ended in: 3024 → 2048.
    assert_eq!(dev.updater.progress(), Some((21, 2048, 0)));
    // A chunk before the offer is not asked for.
    let early = frame(&Downlink::FirmwareChunk(FirmwareChunk {
        id: 21,
        offset: 2048,
        data: Blob::new(&img[2048..3056]).unwrap(),
    }));
    assert_eq!(dev.input(&early), Some(Update::Nothing));
    gw.budget = None;
    gw.requests.clear();
    assert_eq!(dev.transfer(&offer, &mut gw), verified(21, NEW));
    assert_eq!(gw.requests[0].0, 2048);
    assert_holds(&dev.flash, &img);

    // Another image under a checkpoint's id starts over.
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 16 * 1024, 1024);
    let stale = Checkpoint {
        sha256: [0; 32],
        ..kept
    };
    dev.updater
        .resume(
            &mut dev.flash,
            &Checkpoint {
                written: 0,
                ..stale
            },
            &mut buf,
        )
        .unwrap();
    let mut gw = Gateway::new(img.clone());
    assert_eq!(dev.transfer(&offer, &mut gw), verified(21, NEW));
    assert_eq!(gw.requests[0].0, 0);
}

#[test]
fn resume_refuses_what_it_cannot_read() {
    let key = release_key();
    let public = public(&key);
    let mut updater: Updater<'_, 4> = Updater::new(&public);
    let mut flash: RamFlash<4, 1024> = RamFlash::new(2048);
    let at = Checkpoint {
        id: 1,
        sha256: [0; 32],
        written: 4096,
    };
    assert_eq!(
        updater.resume(&mut flash, &at, &mut [0u8; 16]),
        Err(ReadError::Storage(NorFlashErrorKind::OutOfBounds))
    );
    assert_eq!(
        updater.resume(
            &mut flash,
            &Checkpoint {
                written: 1024,
                ..at
            },
            &mut []
        ),
        Err(ReadError::BufferTooSmall)
    );
    assert_eq!(updater.progress(), None);
}

#[test]
fn hash_flash_reads_back_what_a_transfer_wrote() {
    let key = release_key();
    let public = public(&key);
    let img = image(7_777);
    let offer = Offer::signed(1, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 8 * 1024, 1024);
    let mut gw = Gateway::new(img.clone());
    assert_eq!(dev.transfer(&offer, &mut gw), verified(1, NEW));
    for buf_len in [1, 7, 64, 8192] {
        let mut buf = vec![0u8; buf_len];
        let hashed = hash_flash(&mut dev.flash, 7_777, &mut buf).unwrap();
        assert_eq!(hashed.len, 7_777);
        assert_eq!(hashed.sha256, offer.sha256, "{buf_len}");
    }
}

/// An empty image has nothing to fetch: it is checked at once.
#[test]
fn an_empty_image_is_checked_without_a_request() {
    let key = release_key();
    let public = public(&key);
    let offer = Offer::signed(30, NEW, &[], &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 4096, 1024);
    let mut gw = Gateway::new(Vec::new());
    assert_eq!(dev.transfer(&offer, &mut gw), verified(30, NEW));
    assert!(gw.requests.is_empty());
    assert_eq!(dev.flash.erases, 0);
}

/// A chunk with more bytes than asked for: the surplus is dropped, the transfer goes on.
#[test]
fn a_chunk_longer_than_asked_is_cut() {
    let key = release_key();
    let public = public(&key);
    let img = image(2_000);
    let offer = Offer::signed(40, NEW, &img, &key);
    let mut dev: Device<'_, 4, 1024, 4> = Device::new(&public, 4096, 128);
    dev.input(&offer.frame());
    let mut buf = [0u8; 512];
    assert!(dev.client.poll_transmit(dev.now, &mut buf).is_some());
    // 112 bytes were asked for; 113 (what fits 128 bytes) arrive.
    let chunk = frame(&Downlink::FirmwareChunk(FirmwareChunk {
        id: 40,
        offset: 0,
        data: Blob::new(&img[..113]).unwrap(),
    }));
    assert!(matches!(
        dev.input(&chunk),
        Some(Update::Progress { received: 112, .. })
    ));
    let mut gw = Gateway::new(img.clone());
    dev.pump(&mut gw);
    assert_eq!(dev.updates.last(), Some(&verified(40, NEW)));
    assert_eq!(gw.requests[0].0, 112);
}

/// No image-sized buffer: the updater's RAM stays the same whatever the image size.
#[test]
fn the_updater_is_small() {
    let size = std::mem::size_of::<Updater<'static, 4>>();
    eprintln!(
        "size_of Updater<4>: {size} B; Updater<256>: {} B",
        std::mem::size_of::<Updater<'static, 256>>()
    );
    assert!(size <= 512, "{size}");
}

/// Firmware messages come only in a version-3 session; the updater is not involved
/// before (the client refuses them as unexpected).
#[test]
fn an_offer_in_a_version_2_session_is_unexpected() {
    let key = release_key();
    let offer = Offer::signed(1, NEW, &image(10), &key);
    let mut client: Dev = Client::new(Config::new(1, RUNNING));
    client.handle_connected(0);
    let mut buf = [0u8; 512];
    assert!(client.poll_transmit(0, &mut buf).is_some());
    let welcome = frame(&Downlink::Welcome(Welcome {
        version: 2,
        heartbeat_s: 30,
        last_acked: None,
        server_time_ms: 0,
        max_frame: 4096,
    }));
    assert!(client.handle_input(0, &welcome).is_ok());
    assert!(client.handle_input(0, &offer.frame()).is_err());
}
