//! The update (DFU) partition in the Pico W's flash, as the `NorFlash` that
//! `device_client::firmware::Updater` writes: embassy-rp's blocking flash driver,
//! confined to the `DFU` region of `memory.x` (offsets 0x10_0000 to 0x1F_F000 of the
//! 2 MiB flash). Offsets are relative to the partition; anything outside it is refused
//! with `OutOfBounds`, so an update can never overwrite the running firmware.
//!
//! embassy-rp runs the erase and program routines from RAM with interrupts masked, as
//! the RP2040 executes in place from this same flash: an erase of a 4 KiB block stalls
//! the firmware for tens of milliseconds (the CYW43439 and embassy-net catch up
//! afterwards; TCP retransmits whatever was missed).

use embassy_rp::flash::{Blocking, ERASE_SIZE, Flash};
use embassy_rp::peripherals::FLASH;
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash, check_erase, check_read,
    check_write,
};

/// The Pico W's flash: 2 MiB.
pub const FLASH_SIZE: usize = 2 * 1024 * 1024;
/// Where the partition starts, from the start of flash (`memory.x`: DFU).
const START: u32 = 0x10_0000;
/// Its size (`memory.x`: DFU, 1020 KiB).
pub const CAPACITY: usize = 1020 * 1024;
/// The largest image accepted: the running firmware's region (`memory.x`: FLASH), which
/// is what an image must fit once a bootloader copies it there.
pub const MAX_IMAGE: u32 = 1024 * 1024 - 0x100;

const _: () =
    assert!((START as usize).is_multiple_of(ERASE_SIZE) && CAPACITY.is_multiple_of(ERASE_SIZE));
const _: () = assert!(START as usize + CAPACITY <= FLASH_SIZE);

/// The update partition.
pub struct Dfu<'d> {
    flash: Flash<'d, FLASH, Blocking, FLASH_SIZE>,
}

impl<'d> Dfu<'d> {
    /// The partition of `flash`.
    pub fn new(flash: Flash<'d, FLASH, Blocking, FLASH_SIZE>) -> Self {
        Self { flash }
    }
}

/// An out-of-range or misaligned access, or the flash driver's own failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DfuError(NorFlashErrorKind);

impl NorFlashError for DfuError {
    fn kind(&self) -> NorFlashErrorKind {
        self.0
    }
}

fn flash_error(e: embassy_rp::flash::Error) -> DfuError {
    DfuError(e.kind())
}

impl ErrorType for Dfu<'_> {
    type Error = DfuError;
}

impl ReadNorFlash for Dfu<'_> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, out: &mut [u8]) -> Result<(), DfuError> {
        check_read(self, offset, out.len()).map_err(DfuError)?;
        self.flash
            .blocking_read(START + offset, out)
            .map_err(flash_error)
    }

    fn capacity(&self) -> usize {
        CAPACITY
    }
}

impl NorFlash for Dfu<'_> {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), DfuError> {
        check_erase(self, from, to).map_err(DfuError)?;
        self.flash
            .blocking_erase(START + from, START + to)
            .map_err(flash_error)
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), DfuError> {
        check_write(self, offset, data.len()).map_err(DfuError)?;
        self.flash
            .blocking_write(START + offset, data)
            .map_err(flash_error)
    }
}
