//! Peak stack by painting: fill the unused stack with a pattern at boot, later find the
//! lowest word that changed. The figure counts from the top of the stack, so it holds
//! `main`'s frame, the future of the whole device (on `main`'s stack) and the interrupt
//! frames.

use core::ptr::{read_volatile, write_volatile};

const PAINT: u32 = 0xCCCC_CCCC;

/// How far below the stack pointer at boot is painted: more than the firmware uses.
const WINDOW: usize = 64 * 1024;

unsafe extern "C" {
    // From cortex-m-rt's link.x: the initial stack pointer (top of RAM) and the lowest
    // address the stack may reach (the end of .bss and .uninit).
    static _stack_start: u32;
    static _stack_end: u32;
}

fn top() -> usize {
    &raw const _stack_start as usize
}

fn bottom() -> usize {
    (top() - WINDOW).max(&raw const _stack_end as usize)
}

/// Paints the stack below the current stack pointer. Call once, first thing in `main`
/// with interrupts not yet enabled.
pub fn paint() {
    let sp = cortex_m::register::msp::read() as usize & !3;
    // Leave the words just below the stack pointer alone: this function's own calls.
    let end = sp - 256;
    let mut p = bottom();
    while p < end {
        // SAFETY: [bottom, end) is RAM below the stack pointer that nothing uses yet.
        unsafe { write_volatile(p as *mut u32, PAINT) };
        p += 4;
    }
}

/// The most stack used since [`paint`], in bytes.
pub fn peak() -> usize {
    let mut p = bottom();
    // SAFETY: reading RAM within the stack region.
    while p < top() && unsafe { read_volatile(p as *const u32) } == PAINT {
        p += 4;
    }
    top() - p
}
