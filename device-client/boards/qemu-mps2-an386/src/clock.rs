//! Milliseconds from a 1 kHz SysTick interrupt.
//!
//! The interrupt also keeps QEMU 7.2's main loop awake: its CMSDK UART model does not
//! wake the loop when the socket has data, and input then stalls about a second per read
//! burst (`shared/notes`: with the tick a full mTLS handshake takes 110–180 ms).

use core::cell::Cell;
use core::future::{Future, poll_fn};
use core::task::Poll;

use cortex_m::interrupt::{self, Mutex};
use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use device_client::driver::Clock;
use device_client::machine::Millis;

/// The core clock of QEMU's mps2-an386: 25 MHz.
const CORE_HZ: u32 = 25_000_000;

static MILLIS: Mutex<Cell<u64>> = Mutex::new(Cell::new(0));

/// The [`Clock`] of the driver: milliseconds since [`SysTickClock::start`].
#[derive(Debug)]
pub struct SysTickClock(());

impl SysTickClock {
    /// Starts the 1 kHz tick.
    pub fn start(mut syst: SYST) -> Self {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(CORE_HZ / 1_000 - 1);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        SysTickClock(())
    }
}

impl Clock for SysTickClock {
    fn now(&self) -> Millis {
        interrupt::free(|cs| MILLIS.borrow(cs).get())
    }

    fn sleep_until(&self, at: Millis) -> impl Future<Output = ()> {
        // The executor polls again without a wake-up (main.rs), so no waker is kept.
        poll_fn(move |_| {
            if self.now() >= at {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

#[exception]
fn SysTick() {
    interrupt::free(|cs| {
        let ms = MILLIS.borrow(cs);
        ms.set(ms.get() + 1);
    });
}
