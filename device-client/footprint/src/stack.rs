//! Stack high-water marks by painting: fill the memory below the stack pointer with a
//! pattern, run the code, find the lowest word that changed.
//!
//! Writing below the stack pointer is safe here because nothing else uses that memory:
//! the images enable no interrupt, and the window is checked against the end of the
//! statics (`_stack_end`, from cortex-m-rt's `link.x`).

use core::hint::black_box;
use core::ptr::{read_volatile, write_volatile};

const PAINT: u32 = 0xCCCC_CCCC;

/// How far below the caller's stack pointer is painted; a call must use less.
pub const WINDOW: usize = 32 * 1024;

unsafe extern "C" {
    // The lowest address the stack may reach: the end of .bss and .uninit.
    static _stack_end: u32;
}

/// Runs `f` and returns the most stack it used, in bytes. The figure includes the call
/// itself (the closure's frame and return address: a few dozen bytes), so it is a
/// slight overestimate of what a direct call costs.
#[inline(never)]
pub fn measure(f: &mut dyn FnMut()) -> usize {
    // Opaque, so that `f` cannot be inlined into this frame (its use would be missed).
    let f = black_box(f);
    let sp = cortex_m::register::msp::read() as usize & !3;
    let bottom = sp - WINDOW;
    assert!(
        bottom >= &raw const _stack_end as usize,
        "stack window too large"
    );
    // This loop runs in registers: nothing of this frame lies below `sp`.
    let mut p = bottom;
    while p < sp {
        // SAFETY: [bottom, sp) is unused RAM below the stack pointer (module doc).
        unsafe { write_volatile(p as *mut u32, PAINT) };
        p += 4;
    }
    f();
    let mut p = bottom;
    // SAFETY: as above; reading RAM below the stack pointer.
    while p < sp && unsafe { read_volatile(p as *const u32) } == PAINT {
        p += 4;
    }
    assert!(p > bottom, "a call used the whole stack window");
    sp - p
}
