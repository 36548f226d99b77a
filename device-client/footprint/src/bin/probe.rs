//! Not measured itself: run under QEMU (`cargo run --release --bin probe`), it prints the
//! sizes of the client's types on this target and the peak stack of each client call,
//! of a whole hand-driven session, and of `driver::run`.
#![no_std]
#![no_main]

use core::hint::black_box;
use core::mem::{MaybeUninit, size_of};

use cortex_m_rt::entry;
use cortex_m_semihosting::hprintln;
use device_client::machine::{self, Config, Event, Input};
use device_client::proto::{self, MAX_READINGS, Reading};
use device_client_footprint::driver::Setup;
use device_client_footprint::stack::measure;
use device_client_footprint::{Client, FRAME_BUF, OUTBOX, RING, finish, frames, scenario};

fn size<T>(name: &str) {
    hprintln!("size_of {:<28} {:>5} B", name, size_of::<T>());
}

fn stack(name: &str, f: &mut dyn FnMut()) {
    let used = measure(f);
    hprintln!("stack   {:<28} {:>5} B", name, used);
}

#[entry]
fn main() -> ! {
    static mut CLIENT: MaybeUninit<Client> = MaybeUninit::uninit();
    static mut RX: [u8; FRAME_BUF] = [0; FRAME_BUF];
    static mut TX: [u8; FRAME_BUF] = [0; FRAME_BUF];

    hprintln!(
        "ring {} B, outbox {} B, frame buffers {} B",
        RING,
        OUTBOX,
        FRAME_BUF
    );
    size::<Client>("Client<RING, OUTBOX>");
    size::<machine::Client<0, 0>>("Client<0, 0> (state only)");
    size::<Config>("Config");
    size::<Event>("Event");
    size::<Input<'_>>("Input");
    size::<proto::Downlink<'_>>("proto::Downlink");
    size::<proto::Uplink<'_>>("proto::Uplink");
    size::<proto::Readings<'_>>("proto::Readings");

    let inputs = scenario::inputs();
    let cfg = scenario::config(&inputs);
    let client: &mut Client = CLIENT.write(Client::new(cfg));
    let (rx, tx) = (RX, TX);
    let mut ok = true;
    let mut now = black_box(1_000);

    stack("Client::new (into a static)", &mut || {
        *client = Client::new(cfg);
    });
    stack("send_telemetry (5 readings)", &mut || {
        ok &= client
            .send_telemetry(Some(inputs.time_ms), &scenario::readings(&inputs, 0))
            .is_ok();
    });
    let full = [scenario::readings(&inputs, 1)[0]; MAX_READINGS];
    stack("send_telemetry (16 readings)", &mut || {
        ok &= client.send_telemetry(None, black_box(&full[..])).is_ok();
    });
    client.handle_connected(now);
    stack("poll_transmit (Hello)", &mut || {
        ok &= client.poll_transmit(now, tx).is_some();
    });
    rx[..frames::WELCOME.len()].copy_from_slice(frames::WELCOME);
    stack("handle_input (Welcome)", &mut || {
        ok &= client
            .handle_input(now, &rx[..frames::WELCOME.len()])
            .is_ok();
    });
    stack("poll_event", &mut || {
        ok &= matches!(client.poll_event(), Some(Event::Connected { .. }));
    });
    stack("poll_transmit (Telemetry 5)", &mut || {
        ok &= client.poll_transmit(now, tx).is_some();
    });
    stack("poll_transmit (Telemetry 16)", &mut || {
        ok &= client.poll_transmit(now, tx).is_some();
    });
    rx[..frames::ACK.len()].copy_from_slice(frames::ACK);
    stack("handle_input (Ack)", &mut || {
        ok &= client.handle_input(now, &rx[..frames::ACK.len()]).is_ok();
    });
    rx[..frames::COMMAND.len()].copy_from_slice(frames::COMMAND);
    let mut id = None;
    stack("handle_input (Command)", &mut || {
        if let Ok(Input::Frame {
            command: Some(cmd), ..
        }) = client.handle_input(now, &rx[..frames::COMMAND.len()])
        {
            id = Some(cmd.id);
        }
    });
    const INTERVAL_S: proto::Name<'static> = proto::Name::from_static("interval_s");
    let result = [Reading::new(INTERVAL_S, proto::Value::U64(5))];
    stack("complete_command (1 value)", &mut || {
        ok &= id.is_some_and(|id| {
            client
                .complete_command(id, proto::CommandStatus::Succeeded, &result)
                .is_ok()
        });
    });
    stack("poll_transmit (CommandResult)", &mut || {
        ok &= client.poll_transmit(now, tx).is_some();
    });
    now += 30_000;
    stack("handle_timeout", &mut || {
        ok &= client.handle_timeout(now).is_ok();
    });
    stack("poll_transmit (Ping)", &mut || {
        ok &= client.poll_transmit(now, tx).is_some();
    });
    rx[..frames::GOODBYE_REVOKED.len()].copy_from_slice(frames::GOODBYE_REVOKED);
    stack("handle_input (Goodbye)", &mut || {
        ok &= client
            .handle_input(now, &rx[..frames::GOODBYE_REVOKED.len()])
            .is_err();
    });

    *client = Client::new(cfg);
    stack("scenario::session (client)", &mut || {
        ok &= scenario::session(client, rx, tx, &inputs);
    });

    *client = Client::new(cfg);
    let mut setup = Setup::new(&inputs);
    let fut = setup.run_future_size(client, rx, tx);
    hprintln!("size_of {:<28} {:>5} B", "driver::run future", fut);
    stack("driver::run (whole session)", &mut || {
        ok &= setup.run(client, rx, tx);
    });

    hprintln!(
        "{}",
        if ok {
            "all calls as expected"
        } else {
            "UNEXPECTED RESULT"
        }
    );
    finish(ok)
}
