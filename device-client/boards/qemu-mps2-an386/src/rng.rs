//! Randomness for TLS **under the emulator only**.
//!
//! QEMU's mps2-an386 has no hardware RNG. `EmulatorOnlyRng` is ChaCha20 seeded from a
//! per-build random seed (build.rs) mixed with the host's clock (semihosting `SYS_TIME`,
//! seconds), so two boots of one image in the same second draw the same numbers, and
//! anyone holding the image can predict them. That is acceptable for a test under
//! QEMU and never for a device: a board seeds from its hardware RNG (nRF52 `RNG`, STM32
//! `RNG`, RP2040 ROSC, ESP32-C3 `RNG`) and keeps no seed in flash.

use cortex_m_semihosting::syscall;
use device_client::driver::embedded_tls::rand_core::{CryptoRng, Error, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The per-build seed written by build.rs.
static BUILD_SEED: &[u8; 32] = include_bytes!(concat!(env!("OUT_DIR"), "/seed.bin"));

/// A cryptographic RNG for the emulator only (module doc): never use it on hardware.
pub struct EmulatorOnlyRng(ChaCha20Rng);

impl EmulatorOnlyRng {
    /// Seeds from the build seed and the host's clock.
    pub fn seed() -> Self {
        let mut seed = *BUILD_SEED;
        let now = host_time_s();
        for (s, t) in seed.iter_mut().zip(now.to_le_bytes()) {
            *s ^= t;
        }
        Self(ChaCha20Rng::from_seed(seed))
    }
}

/// Seconds since the Unix epoch, from the host (semihosting `SYS_TIME`).
pub fn host_time_s() -> u64 {
    // SAFETY: SYS_TIME takes no argument block; QEMU runs with semihosting enabled.
    unsafe { syscall!(TIME) as u64 }
}

impl RngCore for EmulatorOnlyRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.0.try_fill_bytes(dest)
    }
}

// Only so that embedded-tls accepts it under the emulator (module doc).
impl CryptoRng for EmulatorOnlyRng {}
