//! One whole session driven by hand through proto + machine (the `client` image), and
//! the baseline that touches the same inputs and buffers without the client.
//!
//! Inputs go through `black_box` so that nothing is computed at compile time, and every
//! transmitted frame goes through it so that no encoding is optimized away.
//!
//! The session calls the client through [`call`]: one out-of-line function per client
//! method, so that the image's symbols tell the library's bytes (`call::*` and what
//! they call) from this scenario's own (`scenario::session` and its helpers).

use core::hint::black_box;

use device_client::machine::{Config, Event, Input, Millis};
use device_client::proto::{Command, CommandStatus, Name, Reading, Value, find};

use crate::{Client, frames};

/// What a sensor would read from its peripherals.
#[derive(Clone, Copy)]
pub struct Inputs {
    /// This boot's id (a hardware RNG on a board).
    pub boot_id: u64,
    /// Wall clock, ms since the Unix epoch.
    pub time_ms: u64,
    /// A temperature.
    pub temp_c: f32,
    /// A humidity.
    pub humidity: u64,
    /// A signal strength.
    pub rssi: i64,
    /// A switch.
    pub door_open: bool,
}

/// The inputs, opaque to the optimizer.
pub fn inputs() -> Inputs {
    Inputs {
        boot_id: black_box(0x91d1_acf8_cdaf_9bef),
        time_ms: black_box(1_764_100_000_000),
        temp_c: black_box(21.5),
        humidity: black_box(40),
        rssi: black_box(-67),
        door_open: black_box(false),
    }
}

/// The firmware version sent in `Hello`.
pub const FIRMWARE: &str = "footprint-1.0.0";

// Names are checked once, at compile time (`Name::from_static` in a const).
const TEMP_C: Name<'static> = Name::from_static("temp_c");
const HUMIDITY: Name<'static> = Name::from_static("humidity");
const RSSI: Name<'static> = Name::from_static("rssi");
const DOOR_OPEN: Name<'static> = Name::from_static("door_open");
const STATE: Name<'static> = Name::from_static("state");
const INTERVAL_S: Name<'static> = Name::from_static("interval_s");

const STATE_OK: Value<'static> = match Value::str("ok") {
    Ok(v) => v,
    Err(_) => panic!("a valid text literal"),
};

/// The client's settings: `Config::new`'s defaults (512-byte frames both ways).
pub fn config(inputs: &Inputs) -> Config {
    Config::new(inputs.boot_id, FIRMWARE)
}

/// Record `i` of a sensor: four readings of four value types plus a string.
pub fn readings(inputs: &Inputs, i: u32) -> [Reading<'static>; 5] {
    [
        Reading::new(TEMP_C, Value::F32(inputs.temp_c + i as f32)),
        Reading::new(HUMIDITY, Value::U64(inputs.humidity)),
        Reading::new(RSSI, Value::I64(inputs.rssi)),
        Reading::new(DOOR_OPEN, Value::Bool(inputs.door_open)),
        Reading::new(STATE, STATE_OK),
    ]
}

/// What the application does with a command: `set_interval` with a `u64` argument
/// succeeds, anything else is refused. Returns the status and the result's values for
/// `complete_command`.
pub fn answer(cmd: &Command<'_>) -> (CommandStatus, [Reading<'static>; 1]) {
    let interval = find(&cmd.args, "interval_s").and_then(Value::as_u64);
    let status = match (cmd.name.as_str(), interval) {
        ("set_interval", Some(_)) => CommandStatus::Succeeded,
        ("set_interval", None) => CommandStatus::InvalidArguments,
        _ => CommandStatus::UnknownCommand,
    };
    let values = [Reading::new(INTERVAL_S, Value::U64(interval.unwrap_or(0)))];
    (status, values)
}

/// Every client method the session uses, each kept out of line (see the module doc).
pub mod call {
    use device_client::machine::{CompleteError, Disconnect, Event, Input, Millis, SendError};
    use device_client::proto::{CommandId, CommandStatus, Reading, Seq};

    use crate::Client;

    /// [`Client::send_telemetry`](device_client::machine::Client::send_telemetry).
    #[inline(never)]
    pub fn send_telemetry(
        c: &mut Client,
        time_ms: Option<u64>,
        readings: &[Reading<'_>],
    ) -> Result<Seq, SendError> {
        c.send_telemetry(time_ms, readings)
    }

    /// [`Client::complete_command`](device_client::machine::Client::complete_command).
    #[inline(never)]
    pub fn complete_command(
        c: &mut Client,
        id: CommandId,
        status: CommandStatus,
        values: &[Reading<'_>],
    ) -> Result<(), CompleteError> {
        c.complete_command(id, status, values)
    }

    /// [`Client::poll_connect`](device_client::machine::Client::poll_connect).
    #[inline(never)]
    pub fn poll_connect(c: &mut Client) -> Option<Millis> {
        c.poll_connect()
    }

    /// [`Client::handle_connected`](device_client::machine::Client::handle_connected).
    #[inline(never)]
    pub fn handle_connected(c: &mut Client, now: Millis) {
        c.handle_connected(now)
    }

    /// [`Client::handle_input`](device_client::machine::Client::handle_input).
    #[inline(never)]
    pub fn handle_input<'b>(
        c: &mut Client,
        now: Millis,
        bytes: &'b [u8],
    ) -> Result<Input<'b>, Disconnect> {
        c.handle_input(now, bytes)
    }

    /// [`Client::handle_timeout`](device_client::machine::Client::handle_timeout).
    #[inline(never)]
    pub fn handle_timeout(c: &mut Client, now: Millis) -> Result<(), Disconnect> {
        c.handle_timeout(now)
    }

    /// [`Client::handle_closed`](device_client::machine::Client::handle_closed).
    #[inline(never)]
    pub fn handle_closed(c: &mut Client, now: Millis) {
        c.handle_closed(now)
    }

    /// [`Client::poll_transmit`](device_client::machine::Client::poll_transmit).
    #[inline(never)]
    pub fn poll_transmit(c: &mut Client, now: Millis, buf: &mut [u8]) -> Option<usize> {
        c.poll_transmit(now, buf)
    }

    /// [`Client::poll_timeout`](device_client::machine::Client::poll_timeout).
    #[inline(never)]
    pub fn poll_timeout(c: &mut Client) -> Option<Millis> {
        c.poll_timeout()
    }

    /// [`Client::poll_event`](device_client::machine::Client::poll_event).
    #[inline(never)]
    pub fn poll_event(c: &mut Client) -> Option<Event> {
        c.poll_event()
    }

    /// [`Client::unacked`](device_client::machine::Client::unacked).
    #[inline(never)]
    pub fn unacked(c: &mut Client) -> device_client::machine::Unacked {
        c.unacked()
    }
}

/// Sends every frame the client has; returns how many.
pub fn transmit_all(client: &mut Client, now: Millis, tx: &mut [u8]) -> usize {
    let mut frames = 0;
    while let Some(n) = call::poll_transmit(client, now, tx) {
        // The "transport": the bytes must be observable.
        black_box(tx.get(..n));
        frames += 1;
    }
    frames
}

/// What a transport does with a received frame: it lands in the receive buffer.
fn receive<'r>(rx: &'r mut [u8], frame: &[u8]) -> &'r [u8] {
    let n = frame.len().min(rx.len());
    let (Some(dst), Some(src)) = (rx.get_mut(..n), frame.get(..n)) else {
        return &[];
    };
    dst.copy_from_slice(src);
    black_box(dst)
}

/// Three records queued offline, connect, `Hello`, `Welcome`, replay, `Ack`, a command
/// and its result, a `Pong`, a heartbeat `Ping`, and a fatal `Goodbye`. Returns whether
/// the client answered everything as expected.
pub fn session(client: &mut Client, rx: &mut [u8], tx: &mut [u8], inputs: &Inputs) -> bool {
    let mut ok = true;
    let mut now: Millis = black_box(1_000);

    for i in 0..3 {
        let time = Some(inputs.time_ms + u64::from(i) * 1_000);
        ok &= call::send_telemetry(client, time, &readings(inputs, i)).is_ok();
    }

    ok &= call::poll_connect(client).is_some_and(|at| at <= now);
    call::handle_connected(client, now);
    ok &= transmit_all(client, now, tx) == 1; // Hello; records wait for Welcome

    ok &= matches!(
        call::handle_input(client, now, receive(rx, frames::WELCOME)),
        Ok(Input::Frame { len, command: None }) if len == frames::WELCOME.len()
    );
    ok &= matches!(
        call::poll_event(client),
        Some(Event::Connected {
            last_acked: None,
            ..
        })
    );
    ok &= transmit_all(client, now, tx) == 3; // the replayed records

    ok &= matches!(
        call::handle_input(client, now, receive(rx, frames::ACK)),
        Ok(Input::Frame { command: None, .. })
    );
    ok &= matches!(call::poll_event(client), Some(Event::Acked { seq: 42 }));
    ok &= call::unacked(client).records == 0;

    match call::handle_input(client, now, receive(rx, frames::COMMAND)) {
        Ok(Input::Frame {
            command: Some(cmd), ..
        }) => {
            let (status, values) = answer(&cmd);
            ok &= call::complete_command(client, cmd.id, status, &values).is_ok();
        }
        _ => ok = false,
    }
    ok &= transmit_all(client, now, tx) == 1; // the command's result

    // A pong for a ping never sent: decoded, then ignored.
    ok &= matches!(
        call::handle_input(client, now, receive(rx, frames::PONG)),
        Ok(Input::Frame { command: None, .. })
    );

    // A quiet heartbeat interval later: a Ping.
    now += black_box(30_000);
    ok &= call::poll_timeout(client).is_some_and(|at| at <= now);
    ok &= call::handle_timeout(client, now).is_ok();
    ok &= transmit_all(client, now, tx) == 1;

    ok &= matches!(
        call::handle_input(client, now, receive(rx, frames::GOODBYE_REVOKED)),
        Err(reason) if reason.is_fatal()
    );
    ok &= matches!(
        call::poll_event(client),
        Some(Event::Disconnected {
            reconnect_at: None,
            ..
        })
    );
    call::handle_closed(client, now);
    ok &= call::poll_connect(client).is_none() && call::poll_event(client).is_none();
    ok
}

/// The same start-up, inputs, frames and buffers as the other images, without the
/// client: what `client` and `driver` are measured against.
pub fn baseline(rx: &mut [u8], tx: &mut [u8], inputs: &Inputs) -> bool {
    black_box(inputs);
    black_box(FIRMWARE);
    for frame in frames::ALL {
        black_box(frame);
    }
    black_box(&mut *rx);
    black_box(&mut *tx);
    black_box(true)
}
