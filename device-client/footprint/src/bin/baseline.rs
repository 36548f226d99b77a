//! The start-up, inputs, frames and buffers of the other images, and no call
//! into device-client: what they are measured against.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use device_client_footprint::{FRAME_BUF, finish, scenario};

#[entry]
fn main() -> ! {
    // cortex-m-rt turns these into `&'static mut`; they live in .bss.
    static mut RX: [u8; FRAME_BUF] = [0; FRAME_BUF];
    static mut TX: [u8; FRAME_BUF] = [0; FRAME_BUF];

    let inputs = scenario::inputs();
    finish(scenario::baseline(RX, TX, &inputs))
}
