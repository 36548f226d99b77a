//! The update partition: the ESP-IDF OTA slot the firmware is not running from.
//!
//! ```text
//!  flash (partitions.csv)
//!  ┌──────┬─────┬─────────┬──────────┬─────────────────┬─────────────────┐
//!  │ boot │ pt  │ otadata │ phy_init │ ota_0           │ ota_1           │
//!  └──────┴─────┴─────────┴──────────┴─────────────────┴─────────────────┘
//!                  ▲ which slot boots,   running ◄──┘     ▲ Updater::handle writes
//!                  │ and its state                        │ here (NorFlash, 4-byte
//!                  │                                      │ writes, 4 KiB erases)
//!  Update::Verified ─► activate(): otadata selects ota_1, state New ─► reset
//!  ─► ESP-IDF bootloader boots ota_1 ─► first Welcome ─► mark_booted(): state Valid
//! ```
//!
//! The slot is found from the partition table and the partition the MMU maps (not from
//! otadata: after `espflash flash --erase-parts otadata` it names no slot). Writing goes
//! through esp-storage's `FlashStorage`, which the partition's `NorFlashRegion` view of
//! esp-bootloader-esp-idf offsets into the slot.
//!
//! Rollback: the state `New` asks a bootloader built with
//! `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE` to boot the image once and fall back to the
//! other slot unless the image marks itself `Valid`, which this firmware does after its
//! first `Welcome` (it reached the gateway over TLS with the new code). espflash's
//! bundled bootloader has no rollback: it boots whatever otadata selects.

use esp_bootloader_esp_idf::ota::OtaImageState;
use esp_bootloader_esp_idf::ota_updater::OtaUpdater;
use esp_bootloader_esp_idf::partitions::{
    self, AppPartitionSubType, Error, FlashStorage, NorFlashRegion, PARTITION_TABLE_MAX_LEN,
    PartitionEntry, PartitionType,
};
use esp_hal::peripherals::FLASH;
use static_cell::StaticCell;

/// The update slot and the flash it is on.
pub struct Ota {
    flash: FlashStorage<'static>,
    /// Room to read the partition table into (3 KiB, kept off the stack).
    table: &'static mut [u8; PARTITION_TABLE_MAX_LEN],
    /// The slot updates go to: its partition and its OTA number.
    target: (PartitionEntry, AppPartitionSubType),
}

impl Ota {
    /// Finds the OTA slot other than the running one. Fails if the partition table has
    /// no `otadata` or fewer than two OTA slots (flashed without `partitions.csv`).
    pub fn take(flash: FLASH<'static>) -> Result<Self, Error> {
        static TABLE: StaticCell<[u8; PARTITION_TABLE_MAX_LEN]> = StaticCell::new();
        let table = TABLE.init([0; PARTITION_TABLE_MAX_LEN]);
        let mut flash = FlashStorage::new(flash);
        // Checks for otadata and two slots.
        OtaUpdater::new(&mut flash, table)?;
        let pt = partitions::read_partition_table(&mut flash, table)?;
        let booted = pt.booted_partition()?.map(|p| p.offset());
        let target = pt
            .iter()
            .find_map(|p| match p.partition_type() {
                PartitionType::App(
                    slot @ (AppPartitionSubType::Ota0 | AppPartitionSubType::Ota1),
                ) if Some(p.offset()) != booted => Some((p, slot)),
                _ => None,
            })
            .ok_or(Error::Invalid)?;
        Ok(Self {
            flash,
            table,
            target,
        })
    }

    /// The slot's size: the largest image it takes.
    pub fn capacity(&self) -> u32 {
        self.target.0.len()
    }

    /// The slot's label (`ota_0`, `ota_1`).
    pub fn label(&self) -> &str {
        self.target.0.label_as_str()
    }

    /// Runs `f` on the slot as a `NorFlash` (offsets from the start of the slot).
    pub fn with_slot<R>(
        &mut self,
        f: impl FnOnce(&mut NorFlashRegion<'_, '_, '_>) -> R,
    ) -> Result<R, Error> {
        let mut region = self.target.0.as_flash_region(&mut self.flash);
        let mut nor = region.as_nor_flash()?;
        Ok(f(&mut nor))
    }

    /// After a verified image: the bootloader boots the slot at the next reset.
    pub fn activate(&mut self) -> Result<(), Error> {
        let mut updater = OtaUpdater::new(&mut self.flash, self.table)?;
        let mut ota = updater.ota_data()?;
        ota.set_current_app_partition(self.target.1)?;
        ota.set_current_ota_state(OtaImageState::New)
    }

    /// The running image works (it reached the gateway): keep it. Returns whether the
    /// state changed; `Ok(false)` also when otadata selects no slot (freshly flashed).
    pub fn mark_booted(&mut self) -> Result<bool, Error> {
        let mut updater = OtaUpdater::new(&mut self.flash, self.table)?;
        match updater.current_ota_state() {
            Ok(OtaImageState::New | OtaImageState::PendingVerify) => {
                updater.set_current_ota_state(OtaImageState::Valid)?;
                Ok(true)
            }
            Ok(_) | Err(Error::InvalidState) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
