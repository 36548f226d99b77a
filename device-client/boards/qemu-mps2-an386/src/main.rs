//! The device client as firmware on QEMU's mps2-an386 (Cortex-M4): mutual TLS with
//! embedded-tls over UART0, whose byte stream QEMU connects to the gateway.
//!
//! ```text
//!  main ─► paint stack, SysTick 1 kHz, UART0, EmulatorOnlyRng
//!       ─► DeviceProvider (cert + SoftwareKey from key.der, CA: gateway verification)
//!       ─► TlsConnector over UartLink ─► TlsConnector::run(client, clock, app, rx, tx)
//!                                        (device_client::driver::run, unchanged)
//!  app: a reading every `interval` ms; commands `echo`, `set_interval {ms}`, `exit`;
//!       the desired `interval_ms`; firmware updates (protocol version 3) through
//!       firmware::Updater into an emulated flash partition (dfu.rs), checked against
//!       the release key baked in by build.rs
//! ```
//!
//! It reports through semihosting (QEMU's standard output) and ends QEMU with status 0
//! when the `exit` command finds that everything worked (records acked, `echo` and
//! `set_interval` run, a reconnection after the gateway dropped it), and 1 otherwise:
//! the gateway's certificate did not verify, three attempts in a row ended before the
//! gateway's `Welcome` (e.g. the gateway refused this device's certificate), or the
//! gateway refused the device for good.
#![no_std]
#![no_main]

mod clock;
mod dfu;
mod identity;
mod log;
mod rng;
mod stack;
mod uart;

use core::panic::PanicInfo;

use cortex_m_rt::entry;
use cortex_m_semihosting::debug;
use device_client::driver::embedded_tls::{
    ConnectError, DeviceProvider, SoftwareKey, TlsConnector, embedded_tls::TlsClock,
};
use device_client::driver::{App, Clock};
use device_client::firmware::{Update, Updater};
use device_client::machine::{
    Client, CompleteError, Config, Event, FirmwareMsg, Millis, SendError,
};
use device_client::proto::{Change, Command, CommandStatus, Desired, Name, Reading, Value, find};

use clock::SysTickClock;
use log::say;
use rng::EmulatorOnlyRng;
use uart::{Uart, UartLink};

/// Bytes of unacknowledged telemetry the device keeps (a record here is ~30 bytes).
const RING: usize = 1024;
/// Bytes of pending command results.
const OUTBOX: usize = 256;
/// The protocol's frame buffers: what `Config::new` announces (512).
const FRAME_BUF: usize = 512;
/// The TLS receive buffer: one record of the gateway's `max_fragment_size` = 1024
/// (header included) plus 12 (PROTOCOL.md §6.2). Without that setting: 16,640.
const TLS_RX: usize = 1024 + 12;
/// The TLS send buffer: the device's Certificate message (~450 bytes), and frames.
const TLS_TX: usize = 1024;
/// Attempts in a row that may end before `Welcome` before the firmware gives up.
const MAX_FAILED_ATTEMPTS: u32 = 3;
/// The first telemetry interval.
const DEFAULT_INTERVAL_MS: Millis = 1_000;

/// The verifier's clock: the host's, through semihosting. QEMU has no real-time clock;
/// a board with one (or with the gateway's `Welcome.server_time_ms` kept across a
/// reboot) uses that, and a board without any uses `NoClock` (validity not checked).
struct HostTime;

impl TlsClock for HostTime {
    fn now() -> Option<u64> {
        Some(rng::host_time_s())
    }
}

#[entry]
fn main() -> ! {
    stack::paint();
    let Some(core) = cortex_m::Peripherals::take() else {
        fail("core peripherals taken twice");
    };
    let clock = SysTickClock::start(core.SYST);
    let uart = Uart::init();
    say!("firmware: device ", identity::DEVICE_ID, " booting");

    let mut rng = EmulatorOnlyRng::seed();
    let boot_id = rand_u64(&mut rng);
    let Ok(key) = SoftwareKey::from_sec1_der(identity::KEY_DER) else {
        fail("key.der is not a SEC1 DER P-256 key");
    };
    let provider: DeviceProvider<'_, _, _, HostTime> =
        match DeviceProvider::new(rng, key, identity::CERT_DER, identity::CA_DER) {
            Ok(provider) => provider,
            Err(_) => fail("ca.der is not an X.509 v3 certificate with a P-256 key"),
        };

    let Some(tls_rx) = cortex_m::singleton!(: [u8; TLS_RX] = [0; TLS_RX]) else {
        fail("buffers taken twice");
    };
    let Some(tls_tx) = cortex_m::singleton!(: [u8; TLS_TX] = [0; TLS_TX]) else {
        fail("buffers taken twice");
    };
    let Some(frames) = cortex_m::singleton!(: [[u8; FRAME_BUF]; 2] = [[0; FRAME_BUF]; 2]) else {
        fail("buffers taken twice");
    };
    let [rx, tx] = frames;
    let mut config = Config::new(boot_id, "qemu-mps2-an386-0.1");
    config.backoff_min_ms = 500;
    config.backoff_max_ms = 5_000;
    let Some(client) = cortex_m::singleton!(: Client<RING, OUTBOX> = Client::new(config)) else {
        fail("client taken twice");
    };

    let hook = |e: &ConnectError<core::convert::Infallible>| {
        if e.is_gateway_rejected() {
            say!(
                "firmware: gateway certificate verification failed: ",
                e.as_str()
            );
            say!("firmware: FAIL");
            exit(false);
        }
        say!("firmware: connection attempt failed: ", e.as_str());
    };
    let mut connector = TlsConnector::new(
        UartLink::new(uart, &clock),
        provider,
        "localhost",
        tls_rx,
        tls_tx,
    )
    .with_handshake_timeout(5_000)
    .on_error(&hook);
    let mut app = Firmware::new(dfu::Dfu::take());
    say!("firmware: stack before run ", stack::peak(), " B");
    // The first handshake's time: from here to "connected (session 1) at".
    say!("firmware: dialling at ", clock.now(), " ms");
    let fut = connector.run(client, &clock, &mut app, rx, tx);
    say!("firmware: run future ", core::mem::size_of_val(&fut), " B");
    // One task, polled in a busy loop: the UART and the clock are polled, not woken
    // (an interrupt-driven board would use an executor that sleeps, e.g. embassy's).
    let reason = embassy_futures::block_on(fut);
    say!(
        "firmware: the gateway refused this device for good: ",
        reason.as_str()
    );
    say!("firmware: FAIL");
    exit(false)
}

/// The device's application: a thermometer that also answers commands.
struct Firmware {
    interval_ms: Millis,
    next: Millis,
    sent: u32,
    connects: u32,
    /// Attempts since the last `Welcome` that ended without one.
    failed_in_a_row: u32,
    /// Whether the current attempt got a `Welcome`.
    welcomed: bool,
    echoed: bool,
    interval_set: bool,
    /// The desired state's version last applied (protocol version 2; 0: none).
    desired_applied: u32,
    /// Firmware updates (protocol version 3) into the emulated update partition.
    updater: Updater<'static, 4>,
    dfu: dfu::Dfu,
    /// An image was verified (and would be marked for the bootloader), and one was
    /// refused.
    image_verified: bool,
    image_refused: bool,
    stack_reported: bool,
    /// The `exit` command arrived: leave once its result is sent, with this outcome.
    exit: Option<bool>,
}

impl Firmware {
    fn new(dfu: dfu::Dfu) -> Self {
        Self {
            updater: Updater::new(identity::RELEASE_KEY).with_max_size(dfu::CAPACITY as u32),
            dfu,
            image_verified: false,
            image_refused: false,
            interval_ms: DEFAULT_INTERVAL_MS,
            next: 0,
            sent: 0,
            connects: 0,
            failed_in_a_row: 0,
            welcomed: false,
            echoed: false,
            interval_set: false,
            desired_applied: 0,
            stack_reported: false,
            exit: None,
        }
    }

    /// Whether everything this firmware is meant to show has happened.
    fn all_done<const R: usize, const O: usize>(&self, client: &Client<R, O>) -> bool {
        self.echoed
            && self.interval_set
            && self.desired_applied > 0
            && self.connects >= 2
            && client.acked().is_some()
    }
}

impl App for Firmware {
    fn next_wake(&self) -> Option<Millis> {
        Some(self.next)
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, now: Millis, client: &mut Client<R, O>) {
        if let Some(ok) = self.exit
            && client.pending_results() == 0
        {
            say!("firmware: stack peak ", stack::peak(), " B");
            say!("firmware: ", if ok { "PASS" } else { "FAIL" });
            exit(ok);
        }
        // A made-up temperature and the uptime.
        let temp = 21.0 + (self.sent % 10) as f32 * 0.1;
        let readings = [
            Reading::new(Name::from_static("temp_c"), Value::F32(temp)),
            Reading::new(Name::from_static("uptime_ms"), Value::U64(now)),
        ];
        match client.send_telemetry(None, &readings) {
            Ok(_) => self.sent += 1,
            Err(e) => say!("firmware: record not queued: ", send_error_str(e)),
        }
        self.next = now
            + if self.exit.is_some() {
                50
            } else {
                self.interval_ms
            };
    }

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        cmd: &Command<'_>,
    ) {
        say!("firmware: command ", cmd.id, " `", cmd.name.as_str(), "`");
        let answered = match cmd.name.as_str() {
            "echo" => {
                self.echoed = true;
                client.complete_command(cmd.id, CommandStatus::Succeeded, &cmd.args)
            }
            "set_interval" => match find(&cmd.args, "ms").and_then(Value::as_u64) {
                Some(ms @ 100..=60_000) => {
                    self.interval_ms = ms;
                    self.next = now + ms;
                    self.interval_set = true;
                    let value = Reading::new(Name::from_static("interval_ms"), Value::U64(ms));
                    client.complete_command(cmd.id, CommandStatus::Succeeded, &[value])
                }
                _ => client.complete_command(cmd.id, CommandStatus::InvalidArguments, &[]),
            },
            "exit" => {
                let ok = self.all_done(client);
                let acked = client.acked().map_or(0, u64::from);
                let values = [
                    Reading::new(Name::from_static("ok"), Value::Bool(ok)),
                    Reading::new(
                        Name::from_static("connects"),
                        Value::U64(self.connects.into()),
                    ),
                    Reading::new(Name::from_static("acked"), Value::U64(acked)),
                    Reading::new(
                        Name::from_static("desired_version"),
                        Value::U64(self.desired_applied.into()),
                    ),
                    Reading::new(
                        Name::from_static("image_verified"),
                        Value::Bool(self.image_verified),
                    ),
                    Reading::new(
                        Name::from_static("image_refused"),
                        Value::Bool(self.image_refused),
                    ),
                ];
                say!(
                    "firmware: exit asked: connects ",
                    self.connects,
                    ", acked up to ",
                    acked,
                    ", echo ",
                    self.echoed,
                    ", set_interval ",
                    self.interval_set,
                    ", desired version ",
                    self.desired_applied
                );
                self.exit = Some(ok);
                // Leave soon, once the result is on its way (`on_wake`).
                self.next = now + 50;
                client.complete_command(cmd.id, CommandStatus::Succeeded, &values)
            }
            _ => client.complete_command(cmd.id, CommandStatus::UnknownCommand, &[]),
        };
        if let Err(e) = answered {
            say!("firmware: result not queued: ", complete_error_str(e));
        }
    }

    /// The one setting this firmware has: `interval_ms` (100 to 60,000), back to the
    /// default when unset. It reports the interval it uses.
    fn on_desired<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        desired: &Desired<'_>,
    ) {
        let mut interval = if desired.base == 0 {
            DEFAULT_INTERVAL_MS
        } else {
            self.interval_ms
        };
        for change in &desired.changes {
            match change {
                Change::Set(r) if r.name.as_str() == "interval_ms" => {
                    if let Some(ms @ 100..=60_000) = r.value.as_u64() {
                        interval = ms;
                    }
                }
                Change::Unset(n) if n.as_str() == "interval_ms" => interval = DEFAULT_INTERVAL_MS,
                _ => {}
            }
        }
        if interval != self.interval_ms {
            self.interval_ms = interval;
            self.next = now + interval;
        }
        self.desired_applied = desired.version;
        say!(
            "firmware: desired version ",
            desired.version,
            " applied (base ",
            desired.base,
            "): interval ",
            interval,
            " ms"
        );
        let value = Reading::new(Name::from_static("interval_ms"), Value::U64(interval));
        if let Err(e) = client.report_state(&[value]) {
            say!("firmware: report not queued: ", complete_error_str(e));
        }
    }

    /// A firmware update: the updater writes it to the partition and checks it; a
    /// verified image would be marked for the bootloader and booted into (here the
    /// test ends the emulator instead).
    fn on_firmware<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        client: &mut Client<R, O>,
        msg: &FirmwareMsg<'_>,
    ) {
        if let FirmwareMsg::Offer(o) = msg
            && let Some((id, received, _)) = self.updater.progress()
            && id == o.id
            && received > 0
        {
            say!("firmware: image resumed at ", received, " B");
        }
        match self.updater.handle(client, &mut self.dfu, msg) {
            // One line per 8 KiB.
            Update::Progress { received, size, .. }
                if received % 8192 < 512 || received == size =>
            {
                say!("firmware: image ", received, " of ", size, " B");
            }
            Update::Verified { version, .. } => {
                self.image_verified = true;
                say!("firmware: image ", version.as_str(), " verified");
            }
            Update::Failed { outcome, .. } => {
                self.image_refused = true;
                say!("firmware: image refused: ", outcome.as_str());
            }
            Update::Declined { .. } => say!("firmware: image declined"),
            Update::Cancelled { .. } => say!("firmware: image withdrawn"),
            _ => {}
        }
    }

    fn on_event<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        _client: &mut Client<R, O>,
        event: Event,
    ) {
        match event {
            Event::Connected { last_acked, .. } => {
                self.connects += 1;
                self.welcomed = true;
                self.failed_in_a_row = 0;
                say!(
                    "firmware: connected (session ",
                    self.connects,
                    ") at ",
                    now,
                    " ms, gateway had up to ",
                    last_acked
                );
                if !self.stack_reported {
                    self.stack_reported = true;
                    say!(
                        "firmware: stack peak after the first handshake ",
                        stack::peak(),
                        " B"
                    );
                }
            }
            // Not every ack: one line per ten records.
            Event::Acked { seq } if seq % 10 == 1 => {
                say!("firmware: acked up to ", seq);
            }
            Event::Disconnected {
                reason,
                reconnect_at,
            } => {
                say!(
                    "firmware: disconnected: ",
                    reason.as_str(),
                    ", next attempt at ",
                    reconnect_at,
                    " ms"
                );
                if !core::mem::replace(&mut self.welcomed, false) {
                    self.failed_in_a_row += 1;
                    if self.failed_in_a_row >= MAX_FAILED_ATTEMPTS {
                        say!(
                            "firmware: ",
                            self.failed_in_a_row,
                            " attempts in a row ended before Welcome (refused by the gateway?)"
                        );
                        say!("firmware: FAIL");
                        exit(false);
                    }
                }
            }
            _ => {}
        }
    }
}

fn rand_u64(rng: &mut EmulatorOnlyRng) -> u64 {
    use device_client::driver::embedded_tls::rand_core::RngCore;
    rng.next_u64()
}

/// Ends QEMU with status 0 (`ok`) or 1.
fn exit(ok: bool) -> ! {
    debug::exit(if ok {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    // Only reached without an emulator or debugger attached.
    loop {
        cortex_m::asm::wfi();
    }
}

fn fail(msg: &str) -> ! {
    say!("firmware: ", msg);
    say!("firmware: FAIL");
    exit(false)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // Where, and the message if it is a plain string (formatting it would need
    // core::fmt: see log.rs).
    match info.location() {
        Some(at) => say!("firmware: panic at ", at.file(), ":", at.line()),
        None => say!("firmware: panic"),
    }
    if let Some(msg) = info.message().as_str() {
        say!("firmware: panic: ", msg);
    }
    say!("firmware: FAIL");
    exit(false)
}

fn send_error_str(e: SendError) -> &'static str {
    match e {
        SendError::RingFull => "ring full",
        SendError::TooLarge => "too large",
        _ => "sequence numbers exhausted",
    }
}

fn complete_error_str(e: CompleteError) -> &'static str {
    match e {
        CompleteError::OutboxFull => "outbox full",
        CompleteError::TooLarge => "too large",
        _ => "unknown command id",
    }
}
