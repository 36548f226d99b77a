//! Protocol + state machine: a `Client<1024, 256>` driven through a whole session by
//! hand (`scenario::session`). Flash and RAM minus `baseline` are what DESIGN.md's
//! device-client budget is about.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use cortex_m_rt::entry;
use device_client_footprint::{Client, FRAME_BUF, finish, scenario};

#[entry]
fn main() -> ! {
    // cortex-m-rt turns these into `&'static mut`; they live in .bss.
    static mut CLIENT: MaybeUninit<Client> = MaybeUninit::uninit();
    static mut RX: [u8; FRAME_BUF] = [0; FRAME_BUF];
    static mut TX: [u8; FRAME_BUF] = [0; FRAME_BUF];

    let inputs = scenario::inputs();
    let client = CLIENT.write(Client::new(scenario::config(&inputs)));
    finish(scenario::session(client, RX, TX, &inputs))
}
