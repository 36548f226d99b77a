//! [`Updater`]: one firmware transfer (protocol version 3, PROTOCOL.md §5.4) from the
//! offer to the verified image in the update partition, for an application to call
//! from [`App::on_firmware`](crate::driver::App::on_firmware). No std, no alloc, no
//! image-sized buffer: bytes go from the receive buffer to flash and through SHA-256.
//!
//! ```text
//!  gateway                      Updater::handle(client, partition, msg)
//!  FirmwareOffer{id, version, size, sha256, signature}
//!   ─────────────────────────►  running version, or size > room ─► Declined
//!                               same id + sha256 as held ─► resume at `received`
//!                               else start at 0
//!   ◄───────────────────────── FirmwareRequest{id, offset, len}   (one outstanding)
//!  FirmwareChunk{id, offset, data}
//!   ─────────────────────────►  not the one asked for ─► ignored (Nothing)
//!                               erase each block as writing enters it, write whole
//!                               WRITE_SIZE units (the tail waits in `pad`), hash
//!   ◄───────────────────────── next FirmwareRequest ... ─► Progress
//!                               last byte: pad the tail with 0xFF, write it,
//!                               Manifest::check(size, SHA-256, release signature)
//!   ◄───────────────────────── FirmwareStatus{Verified | SizeMismatch | HashMismatch
//!                                             | BadSignature | StorageError}
//!                               ─► Verified{version} / Failed{outcome}
//!  FirmwareCancel{id} ───────►  forget it ─► Cancelled
//! ```
//!
//! # With embassy-boot
//!
//! [embassy-boot](https://docs.embassy.dev/embassy-boot) splits the flash into
//! `BOOTLOADER`, `ACTIVE` (the running application), `DFU` (at least one erase page
//! larger than `ACTIVE`, for its swap) and `BOOTLOADER STATE`. The `DFU` partition is
//! the [`NorFlash`] you hand the `Updater`; embassy-boot's state partition says what
//! the bootloader does at the next reset:
//!
//! ```text
//!  one flash, shared (embassy-embedded-hal BlockingPartition over a Mutex<RefCell<_>>)
//!  ┌────────────┬────────────────┬──────────────────────┬──────────────────┐
//!  │ BOOTLOADER │ ACTIVE         │ DFU                  │ BOOTLOADER STATE │
//!  └────────────┴────────────────┴──────────────────────┴──────────────────┘
//!                                  ▲ Updater::handle        ▲ BlockingFirmwareState
//!                                  │ erases and writes      │ mark_booted(), mark_updated()
//!  boot ─► self-test ─► mark_booted() ─► session ─► offers ─► Update::Verified
//!                                                   ─► mark_updated() ─► Verified sent
//!                                                   ─► reset ─► bootloader swaps
//!                                                      DFU ⇄ ACTIVE ─► boot ─► ...
//!  (no mark_booted() after the swap: the next reset rolls back to the old image)
//! ```
//!
//! ```ignore
//! // embassy-boot's FirmwareUpdaterConfig has the two partitions as public fields.
//! let config = FirmwareUpdaterConfig::from_linkerfile_blocking(&flash, &flash);
//! let mut dfu = config.dfu;
//! let mut aligned = [0u8; STATE_WRITE_SIZE];
//! let mut state = BlockingFirmwareState::new(config.state, &mut aligned);
//! // The image runs (after a swap: it passed its self-test): keep it. Before this the
//! // DFU partition holds the previous image for a rollback, so do not hand the Updater
//! // anything until it is done.
//! state.mark_booted()?;
//! // The image must fit ACTIVE, which is one page smaller than DFU.
//! let mut updater: Updater<'_, 8> = Updater::new(&RELEASE_KEY).with_max_size(ACTIVE_LEN);
//!
//! // In App::on_firmware(now, client, msg):
//! match updater.handle(client, &mut dfu, msg) {
//!     Update::Verified { .. } => {
//!         state.mark_updated()?;
//!         // Restart once the status has left (client.pending_results() == 0) or after
//!         // a few seconds: the gateway counts the update installed when the next
//!         // Hello carries the new version either way.
//!         restart_when_sent = true;
//!     }
//!     _ => {}
//! }
//! ```
//!
//! embassy-boot's `BlockingFirmwareUpdater` (or the async `FirmwareUpdater`) does the
//! same marking with `mark_updated()` / `mark_booted()`; do not use its
//! `write_firmware` or `prepare_update` next to the `Updater`: they erase the DFU
//! partition on their own. A verifying bootloader (embassy-boot's `ed25519-*`
//! features) is a second, independent check and needs its own signature; the
//! `Updater`'s check is the release key's ECDSA P-256 signature over the manifest
//! ([`Manifest`]).
//!
//! # Resuming
//!
//! A reconnect loses nothing: the gateway offers the image again at the start of every
//! session until it hears a status, and the `Updater` asks from what it holds. To
//! survive a reboot too, keep [`Updater::checkpoint`] in flash of your own (every few
//! blocks), and after the reboot call [`Updater::resume`]: it reads back and hashes
//! what the partition holds, and the next offer of that image goes on from there.

use embedded_storage::nor_flash::{NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash};

use super::{FirmwareError, Hashed, ImageHasher, Manifest, RELEASE_KEY_LEN, SIGNATURE_LEN};
use crate::machine::{Client, FirmwareMsg};
use crate::proto::{FirmwareChunk, FirmwareId, FirmwareOffer, FirmwareOutcome, MAX_FIRMWARE_LEN};
use crate::proto::{MAX_CHUNK_LEN, Text};

/// A firmware version, as the offer named it.
pub type Version = heapless::String<MAX_FIRMWARE_LEN>;

/// What one message did; what the application may act on.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Update {
    /// Nothing to act on: a chunk that was not asked for, the withdrawal of an offer
    /// this device does not hold.
    Nothing,
    /// The offer was declined (and `Declined` reported to the gateway).
    Declined {
        /// The offer's id.
        id: FirmwareId,
        /// Why.
        why: Decline,
    },
    /// A transfer started, resumed or moved on.
    Progress {
        /// The offer's id.
        id: FirmwareId,
        /// Bytes of the image received so far.
        received: u32,
        /// The image's size.
        size: u32,
    },
    /// The whole image is in the partition and its size, SHA-256 and release
    /// signature check out; `Verified` is queued for the gateway. Mark it for the
    /// bootloader and restart into it (the module doc says how with embassy-boot).
    /// Until the restart (a new `Updater`) this one takes no other offer, so nothing
    /// overwrites the image.
    Verified {
        /// The offer's id.
        id: FirmwareId,
        /// The version the device will say in `Hello` once it runs the image.
        version: Version,
    },
    /// The transfer failed; `outcome` is reported to the gateway. The partition holds
    /// nothing to run.
    Failed {
        /// The offer's id.
        id: FirmwareId,
        /// Why: `SizeMismatch`, `HashMismatch`, `BadSignature` or `StorageError`.
        outcome: FirmwareOutcome,
    },
    /// The offer being transferred was withdrawn; what was received of it is
    /// forgotten (the partition may be reused).
    Cancelled {
        /// The offer's id.
        id: FirmwareId,
    },
}

/// Why an offer was declined.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decline {
    /// The device already runs this version (`Config::firmware`, as sent in `Hello`).
    AlreadyRunning,
    /// The image is larger than the partition (or [`Updater::with_max_size`]).
    TooLarge,
}

/// Where a transfer stands in flash: what to keep across a reboot for
/// [`Updater::resume`].
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The offer's id.
    pub id: FirmwareId,
    /// The image's SHA-256, as offered (a new image under the same id starts over).
    pub sha256: [u8; 32],
    /// Bytes of the image written to the partition, from offset 0.
    pub written: u32,
}

/// The partition could not be read back.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The buffer is smaller than the flash's `READ_SIZE`.
    #[error("the read buffer is smaller than the flash's read size")]
    BufferTooSmall,
    /// The flash refused: out of bounds, misaligned, or its own failure.
    #[error("reading the partition failed: {0:?}")]
    Storage(NorFlashErrorKind),
}

/// How the end of a transfer is checked.
#[derive(Debug, Clone, Copy)]
enum Trust<'k> {
    /// Size, SHA-256 and the release key's signature: what a device does.
    ReleaseKey(&'k [u8; RELEASE_KEY_LEN]),
    /// Size and SHA-256 only: the simulator without a release key (`SimConfig`).
    #[cfg(feature = "sim")]
    DangerHashOnly,
}

/// The transfer in progress.
#[derive(Clone)]
struct Transfer {
    id: FirmwareId,
    sha256: [u8; 32],
    /// Filled by the offer; empty after [`Updater::resume`] until the offer comes again.
    signature: [u8; SIGNATURE_LEN],
    version: Version,
    size: u32,
    hasher: ImageHasher,
    /// Bytes in the partition (a multiple of `WRITE_SIZE`).
    written: u32,
    /// Bytes received after `written`, waiting in `pad` for a whole write unit.
    pending: usize,
    /// Everything below is erased (or written); a multiple of `ERASE_SIZE`.
    erased_end: u32,
    /// The request outstanding: (offset, len).
    asked: Option<(u32, usize)>,
}

impl Transfer {
    fn received(&self) -> u32 {
        // `pending` < W, and `written + pending` never passes `size` (a u32).
        self.written.saturating_add(self.pending as u32)
    }
}

/// How a transfer ended, remembered so that an offer repeated after the status was
/// lost gets the same answer.
#[derive(Clone)]
struct Ended {
    id: FirmwareId,
    sha256: [u8; 32],
    outcome: FirmwareOutcome,
    version: Version,
}

impl Ended {
    fn update(&self) -> Update {
        match self.outcome {
            FirmwareOutcome::Verified => Update::Verified {
                id: self.id,
                version: self.version.clone(),
            },
            outcome => Update::Failed {
                id: self.id,
                outcome,
            },
        }
    }
}

/// Drives firmware transfers into an update partition: see the [module](self) doc.
///
/// `W` is the size of the one buffer it keeps for a partial write unit; it must be at
/// least the flash's `NorFlash::WRITE_SIZE` (checked when [`handle`](Self::handle) is
/// compiled for a flash type). RAM: about 370 bytes plus `W` whatever the image size
/// (`Updater<4>` is 376 bytes on thumbv7em), most of it the SHA-256 state, the offer's
/// signature and hash, and the outcome of the last transfer.
pub struct Updater<'k, const W: usize = 32> {
    trust: Trust<'k>,
    max_size: u32,
    transfer: Option<Transfer>,
    ended: Option<Ended>,
    pad: [u8; W],
}

impl<'k, const W: usize> Updater<'k, W> {
    /// An updater that accepts images signed by `release_key` (65 bytes SEC1, as
    /// `certs release-key` writes `release.pub.bin`).
    pub fn new(release_key: &'k [u8; RELEASE_KEY_LEN]) -> Self {
        Self::with_trust(Trust::ReleaseKey(release_key))
    }

    /// Checks size and SHA-256 but no signature: for simulated devices without a
    /// release key only. A firmware never does this (anyone who can reach the gateway's
    /// rollout could install anything), hence crate-private.
    #[cfg(feature = "sim")]
    pub(crate) fn danger_hash_only() -> Self {
        Self::with_trust(Trust::DangerHashOnly)
    }

    fn with_trust(trust: Trust<'k>) -> Self {
        Self {
            trust,
            max_size: u32::MAX,
            transfer: None,
            ended: None,
            pad: [0xff; W],
        }
    }

    /// Declines images larger than `max` bytes even if the partition has room: with
    /// embassy-boot, the size of `ACTIVE` (one page less than `DFU`).
    #[must_use]
    pub fn with_max_size(mut self, max: u32) -> Self {
        self.max_size = max;
        self
    }

    /// The transfer in progress: `(id, received, size)`. After [`resume`](Self::resume)
    /// `size` is 0 until the offer comes again.
    #[must_use]
    pub fn progress(&self) -> Option<(FirmwareId, u32, u32)> {
        self.transfer.as_ref().map(|t| (t.id, t.received(), t.size))
    }

    /// What to keep across a reboot to resume the transfer in progress (`None`: none
    /// is). `written` only counts bytes in flash, so it may trail `received`.
    #[must_use]
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.transfer.as_ref().map(|t| Checkpoint {
            id: t.id,
            sha256: t.sha256,
            written: t.written,
        })
    }

    /// After a reboot: takes up the transfer of `at` from what `flash` holds, hashing
    /// it again with `buf` as the read buffer (any size from the flash's `READ_SIZE`;
    /// larger is faster). The erase block the checkpoint ends in is given up (it is
    /// fetched and erased again), because the flash may hold bytes past `written`
    /// there that were written after the checkpoint was kept, and NOR flash must not be
    /// written twice without an erase. The next offer of the same id and SHA-256 goes on
    /// from there; another offer starts over.
    pub fn resume<F: NorFlash>(
        &mut self,
        flash: &mut F,
        at: &Checkpoint,
        buf: &mut [u8],
    ) -> Result<(), ReadError> {
        let erase = F::ERASE_SIZE.max(1) as u32;
        let written = at.written - at.written % erase;
        let hashed = hash_flash_into(flash, written, buf)?;
        self.transfer = Some(Transfer {
            id: at.id,
            sha256: at.sha256,
            signature: [0; SIGNATURE_LEN],
            version: Version::new(),
            size: 0,
            hasher: hashed,
            written,
            pending: 0,
            erased_end: written,
            asked: None,
        });
        Ok(())
    }

    /// Handles one firmware message from [`Input::Firmware`](crate::machine::Input)
    /// (or [`App::on_firmware`](crate::driver::App::on_firmware)): answers the gateway
    /// through `client` and writes to `flash`, the update partition (offsets from 0).
    #[must_use = "Verified asks the application to mark the image and restart"]
    pub fn handle<F: NorFlash, const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        flash: &mut F,
        msg: &FirmwareMsg<'_>,
    ) -> Update {
        const {
            assert!(
                F::WRITE_SIZE >= 1 && F::WRITE_SIZE <= W,
                "Updater<W>: W must be at least the flash's NorFlash::WRITE_SIZE"
            );
        }
        match msg {
            FirmwareMsg::Offer(o) => self.offer(client, flash, o),
            FirmwareMsg::Chunk(c) => self.chunk(client, flash, c),
            FirmwareMsg::Cancel(id) => self.cancel(*id),
        }
    }

    fn offer<F: NorFlash, const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        flash: &mut F,
        o: &FirmwareOffer<'_>,
    ) -> Update {
        // Offered again after it ended: the status was lost (a reconnect, a full
        // outbox). The same answer again, as for a repeated command.
        if let Some(e) = &self.ended
            && e.id == o.id
            && e.sha256 == o.sha256.0
        {
            // Best effort: a full outbox leaves the answer to the next offer.
            let _ = client.firmware_status(e.id, e.outcome);
            return e.update();
        }
        // A verified image waits in the partition for the restart: nothing may
        // overwrite it. No answer, so the gateway offers again after the restart.
        if self
            .ended
            .as_ref()
            .is_some_and(|e| e.outcome == FirmwareOutcome::Verified)
        {
            return Update::Nothing;
        }
        // What the device says in `Hello` (cut to the same 32 bytes).
        let running = Text::<MAX_FIRMWARE_LEN>::truncating(client.config().firmware);
        let why = if o.version.as_str() == running.as_str() {
            Some(Decline::AlreadyRunning)
        } else if u64::from(o.size) > (flash.capacity() as u64).min(u64::from(self.max_size)) {
            Some(Decline::TooLarge)
        } else {
            None
        };
        if let Some(why) = why {
            // Best effort, as above: the gateway offers again next session.
            let _ = client.firmware_status(o.id, FirmwareOutcome::Declined);
            return Update::Declined { id: o.id, why };
        }
        let mut version = Version::new();
        // Cannot fail: both are bounded by MAX_FIRMWARE_LEN.
        let _ = version.push_str(o.version.as_str());
        match &mut self.transfer {
            // The same image: go on from what is held.
            Some(t) if t.id == o.id && t.sha256 == o.sha256.0 && t.received() <= o.size => {
                t.size = o.size;
                t.signature = o.signature.0;
                t.version = version;
            }
            _ => {
                self.transfer = Some(Transfer {
                    id: o.id,
                    sha256: o.sha256.0,
                    signature: o.signature.0,
                    version,
                    size: o.size,
                    hasher: ImageHasher::new(),
                    written: 0,
                    pending: 0,
                    erased_end: 0,
                    asked: None,
                });
            }
        }
        self.next(client, flash)
    }

    fn chunk<F: NorFlash, const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        flash: &mut F,
        c: &FirmwareChunk<'_>,
    ) -> Update {
        let Some(t) = self.transfer.as_mut() else {
            return Update::Nothing;
        };
        // Only the answer to the request outstanding: a duplicate (a request repeated
        // across a reconnect is answered twice) or a stray chunk is dropped.
        let Some((offset, len)) = t.asked else {
            return Update::Nothing;
        };
        if c.id != t.id || c.offset != offset {
            return Update::Nothing;
        }
        t.asked = None;
        // More than asked for is cut off (the hash decides about the rest anyway).
        let data = c.data.as_bytes();
        let data = data.get(..len).unwrap_or(data);
        if data.is_empty() {
            // Nothing past `offset`: the gateway's image ends before `size`. Check what
            // arrived, which reports the size mismatch.
            return self.finish(client, flash);
        }
        if write(t, &mut self.pad, flash, data).is_err() {
            return self.end(client, FirmwareOutcome::StorageError);
        }
        t.hasher.update(data);
        self.next(client, flash)
    }

    fn cancel(&mut self, id: FirmwareId) -> Update {
        // A verified image stays: it may be marked for the bootloader already.
        if self
            .ended
            .as_ref()
            .is_some_and(|e| e.id == id && e.outcome != FirmwareOutcome::Verified)
        {
            self.ended = None;
        }
        match &self.transfer {
            Some(t) if t.id == id => {
                self.transfer = None;
                Update::Cancelled { id }
            }
            _ => Update::Nothing,
        }
    }

    /// Asks for the next piece, or finishes when all has arrived.
    fn next<F: NorFlash, const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        flash: &mut F,
    ) -> Update {
        let Some(t) = self.transfer.as_mut() else {
            return Update::Nothing;
        };
        let received = t.received();
        if received >= t.size {
            return self.finish(client, flash);
        }
        // Whole write units per chunk, so that only the image's last bytes wait in
        // `pad` (a receive buffer smaller than one unit asks for what fits).
        let most = client.firmware_chunk_len().min(MAX_CHUNK_LEN);
        let unit = F::WRITE_SIZE.max(1);
        let whole = most - most % unit;
        let len = if whole > 0 { whole } else { most };
        let len = len.min((t.size - received) as usize);
        // `len` <= MAX_CHUNK_LEN (4096) fits a u16.
        client.request_firmware(t.id, received, len as u16);
        t.asked = Some((received, len));
        Update::Progress {
            id: t.id,
            received,
            size: t.size,
        }
    }

    /// All bytes arrived (or the gateway has no more): writes the tail, checks, ends.
    fn finish<F: NorFlash, const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        flash: &mut F,
    ) -> Update {
        let Some(t) = self.transfer.as_mut() else {
            return Update::Nothing;
        };
        if flush(t, &mut self.pad, flash).is_err() {
            return self.end(client, FirmwareOutcome::StorageError);
        }
        let hashed = core::mem::take(&mut t.hasher).finish();
        let manifest = Manifest {
            version: t.version.as_str(),
            size: t.size,
            sha256: t.sha256,
        };
        let checked = match self.trust {
            Trust::ReleaseKey(key) => manifest.check(key, &t.signature, &hashed),
            #[cfg(feature = "sim")]
            Trust::DangerHashOnly => manifest.check_image(&hashed),
        };
        let outcome = match checked {
            Ok(()) => FirmwareOutcome::Verified,
            Err(FirmwareError::SizeMismatch { .. }) => FirmwareOutcome::SizeMismatch,
            Err(FirmwareError::HashMismatch) => FirmwareOutcome::HashMismatch,
            // A signature that does not verify, and also a release key that is not a
            // P-256 point (the firmware's own mistake): nothing vouches for the image.
            Err(_) => FirmwareOutcome::BadSignature,
        };
        self.end(client, outcome)
    }

    /// Ends the transfer with `outcome`, reports it, remembers it.
    fn end<const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        outcome: FirmwareOutcome,
    ) -> Update {
        let Some(t) = self.transfer.take() else {
            return Update::Nothing;
        };
        // Best effort: if the outbox is full, the gateway offers again next session and
        // hears the same outcome then.
        let _ = client.firmware_status(t.id, outcome);
        let ended = Ended {
            id: t.id,
            sha256: t.sha256,
            outcome,
            version: t.version,
        };
        let update = ended.update();
        self.ended = Some(ended);
        update
    }
}

/// Erases the blocks from `t.erased_end` up to the one holding byte `end - 1`.
fn erase_to<F: NorFlash>(t: &mut Transfer, flash: &mut F, end: u32) -> Result<(), F::Error> {
    let block = F::ERASE_SIZE.max(1) as u32;
    while t.erased_end < end {
        let next = t.erased_end.saturating_add(block);
        flash.erase(t.erased_end, next)?;
        t.erased_end = next;
    }
    Ok(())
}

/// Writes received bytes: whole write units straight from `data`, a tail into `pad`.
fn write<F: NorFlash, const W: usize>(
    t: &mut Transfer,
    pad: &mut [u8; W],
    flash: &mut F,
    mut data: &[u8],
) -> Result<(), F::Error> {
    let unit = F::WRITE_SIZE.max(1);
    if t.pending > 0 {
        let take = (unit - t.pending).min(data.len());
        let (head, rest) = data.split_at(take);
        if let Some(dst) = pad.get_mut(t.pending..t.pending + take) {
            dst.copy_from_slice(head);
        }
        t.pending += take;
        data = rest;
        if t.pending < unit {
            return Ok(());
        }
        write_unit(t, pad, flash, unit)?;
    }
    let whole = data.len() - data.len() % unit;
    let (body, tail) = data.split_at(whole);
    if !body.is_empty() {
        let end = t.written.saturating_add(whole as u32);
        erase_to(t, flash, end)?;
        flash.write(t.written, body)?;
        t.written = end;
    }
    if let Some(dst) = pad.get_mut(..tail.len()) {
        dst.copy_from_slice(tail);
    }
    t.pending = tail.len();
    Ok(())
}

/// Writes the `unit` bytes of `pad` (all pending) and empties it.
fn write_unit<F: NorFlash, const W: usize>(
    t: &mut Transfer,
    pad: &mut [u8; W],
    flash: &mut F,
    unit: usize,
) -> Result<(), F::Error> {
    let end = t.written.saturating_add(unit as u32);
    erase_to(t, flash, end)?;
    flash.write(t.written, pad.get(..unit).unwrap_or_default())?;
    t.written = end;
    t.pending = 0;
    Ok(())
}

/// Writes the image's last partial unit, padded with 0xFF (the erased value, so the
/// padding reads as untouched flash).
fn flush<F: NorFlash, const W: usize>(
    t: &mut Transfer,
    pad: &mut [u8; W],
    flash: &mut F,
) -> Result<(), F::Error> {
    if t.pending == 0 {
        return Ok(());
    }
    let unit = F::WRITE_SIZE.max(1);
    if let Some(rest) = pad.get_mut(t.pending..unit) {
        rest.fill(0xff);
    }
    write_unit(t, pad, flash, unit)
}

/// The SHA-256 of the first `len` bytes of `flash`, read with `buf` (any size from the
/// flash's `READ_SIZE`): to check what a partition holds before marking it, or to take
/// up a transfer after a reboot ([`Updater::resume`]).
pub fn hash_flash<F: ReadNorFlash>(
    flash: &mut F,
    len: u32,
    buf: &mut [u8],
) -> Result<Hashed, ReadError> {
    hash_flash_into(flash, len, buf).map(ImageHasher::finish)
}

fn hash_flash_into<F: ReadNorFlash>(
    flash: &mut F,
    len: u32,
    buf: &mut [u8],
) -> Result<ImageHasher, ReadError> {
    let unit = F::READ_SIZE.max(1);
    let step = buf.len() - buf.len() % unit;
    if step == 0 {
        return Err(ReadError::BufferTooSmall);
    }
    if len as usize > flash.capacity() {
        return Err(ReadError::Storage(NorFlashErrorKind::OutOfBounds));
    }
    let mut hasher = ImageHasher::new();
    let mut at = 0u32;
    while at < len {
        let want = step.min((len - at) as usize);
        // Reads are whole units; the last one may reach past `len` (not past the
        // partition when its size is a multiple of the unit, as flash sizes are).
        let read = want.div_ceil(unit) * unit;
        let piece = buf.get_mut(..read).unwrap_or_default();
        flash
            .read(at, piece)
            .map_err(|e| ReadError::Storage(e.kind()))?;
        hasher.update(piece.get(..want).unwrap_or_default());
        at += want as u32;
    }
    Ok(hasher)
}
