//! The driver's clock: embassy-time, which esp-rtos drives from a hardware timer.

use core::future::Future;

use device_client::driver::Clock;
use device_client::machine::Millis;
use embassy_time::{Instant, Timer};

/// Milliseconds since boot; sleeps are embassy timers (cancel-safe, woken by the
/// scheduler's timer interrupt).
#[derive(Debug, Clone, Copy)]
pub struct EmbassyClock;

impl Clock for EmbassyClock {
    fn now(&self) -> Millis {
        Instant::now().as_millis()
    }

    fn sleep_until(&self, at: Millis) -> impl Future<Output = ()> {
        Timer::at(Instant::from_millis(at))
    }
}
