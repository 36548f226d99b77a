//! Randomness for TLS **under the emulator only**.
//!
//! QEMU's mps2-an386 has no hardware RNG. `EmulatorOnlyRng` is SHA-256 in counter mode
//! (block i = SHA-256(seed ‖ i)) over a per-build random seed (build.rs) mixed with the
//! host's clock (semihosting `SYS_TIME`, seconds), so two boots of one image in the same second draw the same numbers, and
//! anyone holding the image can predict them. That is acceptable for a test under
//! QEMU and never for a device: a board seeds from its hardware RNG (nRF52 `RNG`, STM32
//! `RNG`, RP2040 ROSC, ESP32-C3 `RNG`) and keeps no seed in flash.
//!
//! SHA-256 rather than ChaCha20 because TLS already links SHA-256: ChaCha20 cost 2.4 KB
//! of flash that a board, drawing from its hardware RNG, would not have.

use cortex_m_semihosting::syscall;
use device_client::driver::embedded_tls::rand_core::{CryptoRng, Error, RngCore, impls};
use sha2::{Digest, Sha256};

/// The per-build seed written by build.rs.
static BUILD_SEED: &[u8; 32] = include_bytes!(concat!(env!("OUT_DIR"), "/seed.bin"));

/// A cryptographic RNG for the emulator only (module doc): never use it on hardware.
pub struct EmulatorOnlyRng {
    seed: [u8; 32],
    counter: u64,
}

impl EmulatorOnlyRng {
    /// Seeds from the build seed and the host's clock.
    pub fn seed() -> Self {
        let mut seed = *BUILD_SEED;
        let now = host_time_s();
        for (s, t) in seed.iter_mut().zip(now.to_le_bytes()) {
            *s ^= t;
        }
        Self { seed, counter: 0 }
    }
}

/// Seconds since the Unix epoch, from the host (semihosting `SYS_TIME`).
pub fn host_time_s() -> u64 {
    // SAFETY: SYS_TIME takes no argument block; QEMU runs with semihosting enabled.
    unsafe { syscall!(TIME) as u64 }
}

impl RngCore for EmulatorOnlyRng {
    fn next_u32(&mut self) -> u32 {
        impls::next_u32_via_fill(self)
    }

    fn next_u64(&mut self) -> u64 {
        impls::next_u64_via_fill(self)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(32) {
            let block = Sha256::new()
                .chain_update(self.seed)
                .chain_update(self.counter.to_le_bytes())
                .finalize();
            self.counter += 1;
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

// Only so that embedded-tls accepts it under the emulator (module doc).
impl CryptoRng for EmulatorOnlyRng {}
