//! Firmware images that measure what the device client costs on a Cortex-M4
//! (thumbv7em-none-eabihf), for DESIGN.md's budget "protocol + state machine: ≤ 12 KB
//! flash, ≤ 2 KB RAM besides the caller's buffers".
//!
//! ```text
//!  bin/baseline ── the same start-up, inputs and buffers, no device-client call
//!  bin/client   ── baseline + Client<1024, 256> driven through a whole session by hand
//!                  (proto + machine)     client − baseline = what the budget covers
//!  bin/driver   ── baseline + the same session through driver::run with a dummy
//!                  connector, connection, clock and app      driver − client = driver
//!  bin/probe    ── not measured: runs under QEMU and prints size_of, stack peaks
//! ```
//!
//! Every image checks what the client answered and ends through semihosting with exit
//! status 0 (all as expected) or 1, so `scripts/footprint` can run them under QEMU.
//! The semihosting exit is a breakpoint instruction; it is in every image alike, so it
//! cancels out of the differences. Only `probe` prints (and so links `core::fmt`).
#![no_std]

pub mod driver;
pub mod frames;
pub mod scenario;
pub mod stack;

use core::panic::PanicInfo;

use cortex_m_semihosting::debug;

/// The ring of unacknowledged telemetry measured here: a realistic size for a sensor.
pub const RING: usize = 1024;
/// The outbox of command results (the client's default).
pub const OUTBOX: usize = 256;
/// The client as measured.
pub type Client = device_client::machine::Client<RING, OUTBOX>;

/// The caller's transmit and receive buffers: `Config::new`'s default frame limit.
pub const FRAME_BUF: usize = 512;

/// Ends the program: exit status 0 under QEMU if `ok`, else 1.
pub fn finish(ok: bool) -> ! {
    debug::exit(if ok {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    // Only reached without a debugger or emulator attached.
    loop {
        cortex_m::asm::wfi();
    }
}

// No message formatting: keeps `core::fmt` out of the measured images.
#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    finish(false)
}
