//! The device's application: a thermometer (the RP2040's own temperature sensor) that
//! answers commands, applies its desired `interval_ms`, and takes firmware updates
//! into the flash's DFU partition.

use device_client::driver::App;
use device_client::firmware::{Update, Updater};
use device_client::machine::{Client, Event, FirmwareMsg, Millis};
use device_client::proto::{Change, Command, CommandStatus, Desired, Name, Reading, Value};
use embassy_rp::adc::{self, Adc};

use crate::dfu::{self, Dfu};
use crate::identity;

/// Bytes of unacknowledged telemetry the device keeps (a record here is ~40 bytes).
pub const RING: usize = 1024;
/// Bytes of pending command results.
pub const OUTBOX: usize = 256;
/// The protocol's frame buffers: what `Config::new` announces (512).
pub const FRAME_BUF: usize = 512;
/// The first telemetry interval, and the one when the desired `interval_ms` is unset.
const DEFAULT_INTERVAL_MS: Millis = 5_000;
/// The range of `interval_ms` the device accepts.
const INTERVAL_RANGE: core::ops::RangeInclusive<u64> = 1_000..=3_600_000;
/// After `reboot` (or a verified update handed to a bootloader): how long the result
/// may take to leave before the device restarts anyway.
const RESTART_GRACE_MS: Millis = 3_000;

/// The application's state.
pub struct Firmware {
    adc: Adc<'static, adc::Blocking>,
    temp: adc::Channel<'static>,
    interval_ms: Millis,
    next: Millis,
    sent: u32,
    connects: u32,
    /// Firmware updates (protocol version 3) into the DFU partition.
    updater: Updater<'static, 4>,
    dfu: Dfu<'static>,
    /// A verified image waits in the DFU partition (see README.md: without a bootloader
    /// nothing boots it).
    image_ready: bool,
    /// `reboot` asked: restart once its result has left, or at this time.
    restart_at: Option<Millis>,
}

impl Firmware {
    /// The application, reading `temp` through `adc`, updating into `dfu`.
    pub fn new(
        adc: Adc<'static, adc::Blocking>,
        temp: adc::Channel<'static>,
        dfu: Dfu<'static>,
    ) -> Self {
        Self {
            adc,
            temp,
            interval_ms: DEFAULT_INTERVAL_MS,
            next: 0,
            sent: 0,
            connects: 0,
            updater: Updater::new(identity::RELEASE_KEY).with_max_size(dfu::MAX_IMAGE),
            dfu,
            image_ready: false,
            restart_at: None,
        }
    }

    /// The die temperature in °C (RP2040 datasheet §4.9.5: 27 °C at 0.706 V, -1.721 mV
    /// per °C), or `None` if the conversion failed.
    fn temperature(&mut self) -> Option<f32> {
        let raw = self.adc.blocking_read(&mut self.temp).ok()?;
        let volts = f32::from(raw) * 3.3 / 4096.0;
        Some(27.0 - (volts - 0.706) / 0.001_721)
    }
}

impl App for Firmware {
    fn next_wake(&self) -> Option<Millis> {
        Some(self.next)
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, now: Millis, client: &mut Client<R, O>) {
        if let Some(at) = self.restart_at {
            if client.pending_results() == 0 || now >= at {
                cortex_m::peripheral::SCB::sys_reset();
            }
            self.next = now + 50;
            return;
        }
        let uptime = Reading::new(Name::from_static("uptime_ms"), Value::U64(now));
        let sent = match self.temperature() {
            Some(t) => {
                let temp = Reading::new(Name::from_static("temp_c"), Value::F32(t));
                client.send_telemetry(None, &[temp, uptime])
            }
            None => client.send_telemetry(None, &[uptime]),
        };
        // A full ring (the gateway away for long) drops this reading; the oldest
        // unacknowledged ones are kept.
        if sent.is_ok() {
            self.sent = self.sent.wrapping_add(1);
        }
        self.next = now + self.interval_ms;
    }

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        cmd: &Command<'_>,
    ) {
        // A result that does not fit the outbox is lost; the gateway times the command out.
        let _ = match cmd.name.as_str() {
            "echo" => client.complete_command(cmd.id, CommandStatus::Succeeded, &cmd.args),
            "reboot" => {
                self.restart_at = Some(now + RESTART_GRACE_MS);
                self.next = now + 50;
                let values = [
                    Reading::new(Name::from_static("uptime_ms"), Value::U64(now)),
                    Reading::new(
                        Name::from_static("connects"),
                        Value::U64(self.connects.into()),
                    ),
                    Reading::new(
                        Name::from_static("image_ready"),
                        Value::Bool(self.image_ready),
                    ),
                ];
                client.complete_command(cmd.id, CommandStatus::Succeeded, &values)
            }
            _ => client.complete_command(cmd.id, CommandStatus::UnknownCommand, &[]),
        };
    }

    /// The one setting: `interval_ms` (1 s to 1 h), back to 5 s when unset. It reports
    /// the interval it uses.
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
                    if let Some(ms) = r.value.as_u64().filter(|ms| INTERVAL_RANGE.contains(ms)) {
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
        let value = Reading::new(Name::from_static("interval_ms"), Value::U64(interval));
        let _ = client.report_state(&[value]);
    }

    /// A firmware update: the updater erases and writes the DFU partition and checks
    /// the image (size, SHA-256, release signature). With embassy-boot, a verified
    /// image is marked for the bootloader and the device restarts into it (README.md);
    /// this firmware ships no bootloader, so the image waits in the partition.
    fn on_firmware<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        client: &mut Client<R, O>,
        msg: &FirmwareMsg<'_>,
    ) {
        match self.updater.handle(client, &mut self.dfu, msg) {
            Update::Verified { .. } => self.image_ready = true,
            Update::Failed { .. } | Update::Cancelled { .. } => self.image_ready = false,
            _ => {}
        }
    }

    fn on_event<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        _client: &mut Client<R, O>,
        event: Event,
    ) {
        if let Event::Connected { .. } = event {
            self.connects = self.connects.wrapping_add(1);
        }
    }
}
