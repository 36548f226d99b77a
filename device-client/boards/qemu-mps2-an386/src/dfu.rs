//! The update (DFU) partition, emulated: QEMU's mps2-an386 has no flash controller to
//! program, so the top megabyte of its RAM (outside the linker's `RAM` region, see
//! `memory.x`) stands in for a NOR flash partition, with NOR's rules: erase sets a whole
//! 4 KiB block to `0xFF`, a write only clears bits, in 4-byte units, at aligned
//! offsets. On a real board this is the DFU partition of the chip's flash (embassy-boot's
//! `dfu`), and `device_client::firmware::Updater` writes it the same way.

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash, check_erase, check_read,
    check_write,
};

/// Where the emulated partition starts (the last MiB of RAM, see `memory.x`).
const BASE: usize = 0x2030_0000;
/// Its size: room for an image of up to 64 KiB.
pub const CAPACITY: usize = 64 * 1024;

/// The emulated partition.
pub struct Dfu {
    _private: (),
}

/// An out-of-range or misaligned access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DfuError(NorFlashErrorKind);

impl NorFlashError for DfuError {
    fn kind(&self) -> NorFlashErrorKind {
        self.0
    }
}

impl Dfu {
    /// The partition, erased (RAM starts with whatever was there).
    pub fn take() -> Self {
        let mut dfu = Self { _private: () };
        dfu.bytes().fill(0xFF);
        dfu
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: BASE..BASE + CAPACITY is RAM that QEMU's mps2-an386 maps and that the
        // linker never places anything in (memory.x ends `RAM` before it); only this one
        // value (made once, in `main`) touches it, through `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(BASE as *mut u8, CAPACITY) }
    }
}

impl ErrorType for Dfu {
    type Error = DfuError;
}

impl ReadNorFlash for Dfu {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, out: &mut [u8]) -> Result<(), DfuError> {
        check_read(self, offset, out.len()).map_err(DfuError)?;
        let at = offset as usize;
        out.copy_from_slice(&self.bytes()[at..at + out.len()]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        CAPACITY
    }
}

impl NorFlash for Dfu {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 4096;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), DfuError> {
        check_erase(self, from, to).map_err(DfuError)?;
        self.bytes()[from as usize..to as usize].fill(0xFF);
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), DfuError> {
        check_write(self, offset, data.len()).map_err(DfuError)?;
        let at = offset as usize;
        // NOR: programming only clears bits; an unerased byte keeps its zeros.
        for (cell, b) in self.bytes()[at..at + data.len()].iter_mut().zip(data) {
            *cell &= *b;
        }
        Ok(())
    }
}
