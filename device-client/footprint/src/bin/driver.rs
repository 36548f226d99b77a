//! The same session through `driver::run` with a dummy connector, connection, clock and
//! application (no TLS): minus `client`, what the async driver adds.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use cortex_m_rt::entry;
use device_client_footprint::driver::Setup;
use device_client_footprint::{Client, FRAME_BUF, finish, scenario};

#[entry]
fn main() -> ! {
    // cortex-m-rt turns these into `&'static mut`; they live in .bss.
    static mut CLIENT: MaybeUninit<Client> = MaybeUninit::uninit();
    static mut RX: [u8; FRAME_BUF] = [0; FRAME_BUF];
    static mut TX: [u8; FRAME_BUF] = [0; FRAME_BUF];

    let inputs = scenario::inputs();
    let client = CLIENT.write(Client::new(scenario::config(&inputs)));
    finish(Setup::new(&inputs).run(client, RX, TX))
}
