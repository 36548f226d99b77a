//! The driver's [`Clock`] on embassy-time (the RP2040's 1 MHz timer, embassy-rp's
//! `time-driver`): milliseconds since boot, and a timer that wakes the task.

use core::future::Future;

use device_client::driver::Clock;
use device_client::machine::Millis;
use embassy_time::{Instant, TICK_HZ, Timer};

/// Milliseconds since boot.
#[derive(Debug, Clone, Copy)]
pub struct EmbassyClock;

impl Clock for EmbassyClock {
    fn now(&self) -> Millis {
        Instant::now().as_millis()
    }

    fn sleep_until(&self, at: Millis) -> impl Future<Output = ()> {
        // Cancel-safe: dropping the timer forgets it. A time too far off to count in
        // ticks is never.
        let at = at
            .checked_mul(TICK_HZ / 1_000)
            .map_or(Instant::MAX, Instant::from_ticks);
        Timer::at(at)
    }
}
