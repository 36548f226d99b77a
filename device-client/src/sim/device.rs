//! One simulated device: the application on top of [`Client`] and [`run`], its
//! telemetry model, its commands, and its reboots.

extern crate std;

use std::collections::{BTreeMap, VecDeque};
use std::format;
use std::rc::Rc;
use std::string::String;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use std::vec::Vec;

use tokio::sync::{Notify, Semaphore, watch};

use super::conn::{Closer, Link, SimConnector};
use super::firmware::{Done, FirmwareState, SimFirmware};
use super::identity::DeviceIdentity;
use super::stats::{Global, Phase, Shard};
use super::{BootSummary, DeviceSummary, Settings};
use crate::driver::tokio::TokioClock;
use crate::driver::{App, Clock, run};
use crate::machine::{Client, CompleteError, Config, Event, FirmwareMsg, Millis, SendError};
use crate::proto::owned::{OwnedReadings, OwnedValue, borrow_readings, to_owned_readings};
use crate::proto::{
    Change, Command, CommandId, CommandStatus, Desired, Name, Reading, Seq, Value, find,
};

/// Frames a simulated device receives and sends, at most (its rx and tx buffers).
const FRAME: usize = 512;
/// The send buffer: four frames, so a backlog leaves in one write (one TLS record)
/// of up to this size instead of a record per frame.
const TX: usize = 4 * FRAME;
/// Command results waiting to be sent, in bytes.
const OUTBOX: usize = FRAME;
/// Command ids remembered across reboots, so a command re-sent after a reboot (its
/// result was lost with the connection) is answered, not run again.
const EXECUTED: usize = 16;
/// How long a rebooting device waits for its ring to empty.
const REBOOT_WAIT_MS: Millis = 5_000;
/// How often a rebooting device looks at its ring.
const REBOOT_POLL_MS: Millis = 20;
/// How soon a result that did not fit the outbox is tried again.
const RESULT_RETRY_MS: Millis = 10;
/// Samples one wake-up may catch up on (after the thread was busy, or a slow
/// connect); further missed samples are skipped.
const MAX_CATCH_UP: u32 = 1_000;
/// Longest interval `set_interval` accepts: a week.
const MAX_INTERVAL_MS: f64 = 7.0 * 24.0 * 3600.0 * 1000.0;

const TEMP: Name<'static> = Name::from_static("temp_c");
const HUMIDITY: Name<'static> = Name::from_static("humidity_pct");
const BATTERY: Name<'static> = Name::from_static("battery_pct");
const UPTIME: Name<'static> = Name::from_static("uptime_s");
const RSSI: Name<'static> = Name::from_static("rssi_dbm");
const EVENT: Name<'static> = Name::from_static("event");
const ERROR: Name<'static> = Name::from_static("error");
const INTERVAL_MS: Name<'static> = Name::from_static("interval_ms");

/// What one worker thread's devices share.
pub(crate) struct ThreadCtx {
    pub(crate) global: Arc<Global>,
    pub(crate) shard: Arc<Shard>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) ramp: Arc<Semaphore>,
    pub(crate) clock: TokioClock,
    /// The devices' connections being closed.
    pub(crate) closer: Closer,
}

impl ThreadCtx {
    pub(crate) fn shard(&self) -> &Shard {
        &self.shard
    }
}

/// xorshift64*: noise for the telemetry model and boot ids; not for cryptography.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that neighbouring seeds start far apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f32 {
        (self.unit() * 2.0 - 1.0) as f32
    }
}

/// Plausible drifting readings: a temperature random walk pulled back to its set
/// point, humidity likewise, a battery that drains slowly (and is swapped when empty),
/// a noisy signal strength.
struct Model {
    temp: f32,
    set_point: f32,
    humidity: f32,
    battery: f32,
}

impl Model {
    fn new(rng: &mut Rng) -> Self {
        let set_point = 18.0 + 8.0 * rng.unit() as f32;
        Self {
            temp: set_point + rng.signed(),
            set_point,
            humidity: 35.0 + 25.0 * rng.unit() as f32,
            battery: 50.0 + 50.0 * rng.unit() as f32,
        }
    }

    fn step(&mut self, rng: &mut Rng) -> (f32, f32, f32, i64) {
        self.temp += 0.1 * rng.signed() + 0.02 * (self.set_point - self.temp);
        self.humidity =
            (self.humidity + 0.3 * rng.signed() + 0.01 * (45.0 - self.humidity)).clamp(5.0, 95.0);
        self.battery -= 0.002 + 0.002 * rng.unit() as f32;
        if self.battery < 3.0 {
            self.battery = 100.0;
        }
        let rssi = -65 + (12.0 * rng.signed()) as i64;
        (
            round2(self.temp),
            round2(self.humidity),
            round2(self.battery),
            rssi,
        )
    }
}

fn round2(x: f32) -> f32 {
    (x * 100.0).round() / 100.0
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A command result not yet accepted by the client.
struct PendingResult {
    id: CommandId,
    status: CommandStatus,
    values: OwnedReadings,
}

impl PendingResult {
    fn new(id: CommandId, status: CommandStatus, values: &[Reading<'_>]) -> Self {
        Self {
            id,
            status,
            values: to_owned_readings(values),
        }
    }

    /// Hands the result to the client. `Err(true)`: try again later (outbox full).
    fn complete<const R: usize, const O: usize>(
        &self,
        client: &mut Client<R, O>,
    ) -> Result<(), bool> {
        // The values came from a decoded command, so they are within every bound.
        let readings = borrow_readings(&self.values).unwrap_or_default();
        match client.complete_command(self.id, self.status, &readings) {
            Ok(()) => Ok(()),
            Err(CompleteError::OutboxFull) => Err(true),
            Err(CompleteError::TooLarge) => {
                let why = Value::Str(crate::proto::Text::truncating("result too large to send"));
                let failed = [Reading::new(ERROR, why)];
                match client.complete_command(self.id, CommandStatus::Failed, &failed) {
                    Err(CompleteError::OutboxFull) => Err(true),
                    _ => Ok(()),
                }
            }
            // Not running any more: nothing to answer.
            Err(_) => Ok(()),
        }
    }
}

/// The state of a device that outlives its boots.
struct Device {
    id: String,
    rng: Rng,
    /// Milliseconds between samples; `None`: no telemetry.
    interval_ms: Option<f64>,
    model: Model,
    /// Commands run, with how they ended, across reboots (newest last).
    executed: VecDeque<(CommandId, CommandStatus)>,
    /// The desired settings applied (protocol version 2) and their version, kept
    /// across reboots as a real device keeps them in flash.
    settings: BTreeMap<String, OwnedValue>,
    desired_version: u32,
    /// The firmware it runs, and a transfer in progress (protocol version 3).
    firmware: FirmwareState,
    firmware_installs: u64,
    connected_once: bool,
    connects: u64,
    commands: u64,
    ring_full: u64,
    boots: Vec<BootSummary>,
    fatal: Option<String>,
    /// Shared with its connector and connections.
    link: Rc<Link>,
}

/// A reboot in progress: the result is queued, the ring drains.
#[derive(Clone, Copy)]
struct Rebooting {
    deadline: Millis,
    check_at: Millis,
    /// Checks done so far.
    checks: u32,
}

/// The application of one boot.
struct SimApp<'a> {
    ctx: &'a ThreadCtx,
    dev: &'a mut Device,
    /// This boot's firmware updater.
    fw: SimFirmware<'a>,
    reboot_now: &'a Notify,
    boot_id: u64,
    booted_at: Millis,
    sent: u32,
    /// Time of the next sample on the device clock, fractional milliseconds.
    next_sample: f64,
    /// Whether a session is open, as last counted in the shard.
    open: bool,
    /// Highest seq acked, as last counted in the shard.
    acked: Seq,
    /// Records queued on an open session, awaiting their ack (for the latency).
    in_flight: VecDeque<(Seq, Instant)>,
    results: VecDeque<PendingResult>,
    retry_at: Millis,
    rebooting: Option<Rebooting>,
    reboot_signalled: bool,
}

impl SimApp<'_> {
    fn producing(&self) -> bool {
        self.rebooting.is_none() && self.ctx.global.phase() == Phase::Running
    }

    /// Counts what changed in the client: the session gauge and acks.
    fn sync<const R: usize, const O: usize>(&mut self, client: &Client<R, O>) {
        let shard = self.ctx.shard();
        let open = client.is_open();
        if open != self.open {
            Shard::add(if open { &shard.open } else { &shard.closed }, 1);
            self.open = open;
        }
        let acked = client.acked().unwrap_or(0);
        if acked > self.acked {
            Shard::add(&shard.acked, u64::from(acked - self.acked));
            self.acked = acked;
            let now = Instant::now();
            while let Some(&(seq, queued)) = self.in_flight.front() {
                if seq > acked {
                    break;
                }
                shard.latency.record(now.saturating_duration_since(queued));
                self.in_flight.pop_front();
            }
        }
    }

    fn send<const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        time_ms: u64,
        readings: &[Reading<'_>],
        queued: Instant,
    ) -> Result<Seq, SendError> {
        let shard = self.ctx.shard();
        match client.send_telemetry(Some(time_ms), readings) {
            Ok(seq) => {
                self.sent = seq;
                Shard::add(&shard.sent, 1);
                if client.is_open() {
                    self.in_flight.push_back((seq, queued));
                }
                Ok(seq)
            }
            Err(e) => {
                if e == SendError::RingFull {
                    Shard::add(&shard.ring_full, 1);
                    self.dev.ring_full += 1;
                }
                Err(e)
            }
        }
    }

    /// Takes every sample due by `now` (catching up after a busy spell).
    fn produce<const R: usize, const O: usize>(&mut self, now: Millis, client: &mut Client<R, O>) {
        let Some(interval) = self.dev.interval_ms else {
            return;
        };
        let wall = wall_ms();
        let queued = Instant::now();
        let mut taken = 0;
        while self.next_sample <= now as f64 {
            taken += 1;
            if taken > MAX_CATCH_UP {
                self.next_sample = now as f64 + interval;
                break;
            }
            let age = now.saturating_sub(self.next_sample as u64);
            self.next_sample += interval;
            let (temp, humidity, battery, rssi) = self.dev.model.step(&mut self.dev.rng);
            let uptime_s = now.saturating_sub(self.booted_at) / 1000;
            let readings = [
                Reading::new(TEMP, Value::F32(temp)),
                Reading::new(HUMIDITY, Value::F32(humidity)),
                Reading::new(BATTERY, Value::F32(battery)),
                Reading::new(UPTIME, Value::U64(uptime_s)),
                Reading::new(RSSI, Value::I64(rssi)),
            ];
            // A full ring drops the sample (counted); nothing is overwritten.
            let _ = self.send(client, wall.saturating_sub(age), &readings, queued);
        }
    }

    fn retry_results<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
    ) {
        while let Some(r) = self.results.front() {
            match r.complete(client) {
                Ok(()) => {
                    self.results.pop_front();
                }
                Err(_) => {
                    self.retry_at = now + RESULT_RETRY_MS;
                    return;
                }
            }
        }
    }

    fn answer<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        result: PendingResult,
    ) {
        if self.results.is_empty() && result.complete(client).is_ok() {
            return;
        }
        self.results.push_back(result);
        self.retry_at = now + RESULT_RETRY_MS;
    }

    fn remember(&mut self, id: CommandId, status: CommandStatus) {
        if self.dev.executed.len() == EXECUTED {
            self.dev.executed.pop_front();
        }
        self.dev.executed.push_back((id, status));
    }

    /// The boot is over: what outlives it goes back to the device.
    fn end(self) {
        self.fw.shut_down(&mut self.dev.firmware);
    }

    /// Starts a reboot: one last record (`event` says why), then wait for the ring to
    /// drain.
    fn start_reboot<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        event: &'static str,
    ) {
        // Its ack also proves the gateway read the result (or firmware status) queued
        // before it (a session handles frames in order), so the new boot is not asked
        // to reboot again.
        let uptime_s = now.saturating_sub(self.booted_at) / 1000;
        let readings = [
            Reading::new(EVENT, Value::Str(crate::proto::Text::truncating(event))),
            Reading::new(UPTIME, Value::U64(uptime_s)),
        ];
        let _ = self.send(client, wall_ms(), &readings, Instant::now());
        self.rebooting = Some(Rebooting {
            deadline: now + REBOOT_WAIT_MS,
            check_at: now,
            checks: 0,
        });
    }

    fn check_reboot<const R: usize, const O: usize>(&mut self, now: Millis, client: &Client<R, O>) {
        let Some(r) = self.rebooting.as_mut() else {
            return;
        };
        // The first check runs in the driver's control loop before it transmits the
        // result and the last record; a later check comes after that transmit.
        let drained = client.unacked().records == 0 && self.results.is_empty() && r.checks > 0;
        r.checks += 1;
        r.check_at = now + REBOOT_POLL_MS;
        if (drained || now >= r.deadline) && !self.reboot_signalled {
            self.reboot_signalled = true;
            self.reboot_now.notify_one();
        }
    }
}

impl App for SimApp<'_> {
    fn next_wake(&self) -> Option<Millis> {
        let mut at: Option<Millis> = None;
        let mut take = |t: Millis| at = Some(at.map_or(t, |a| a.min(t)));
        if let Some(r) = self.rebooting
            && !self.reboot_signalled
        {
            take(r.check_at);
        }
        if !self.results.is_empty() {
            take(self.retry_at);
        }
        if self.producing() && self.dev.interval_ms.is_some() {
            take(self.next_sample.ceil() as Millis);
        }
        at
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, now: Millis, client: &mut Client<R, O>) {
        self.sync(client);
        if !self.results.is_empty() && now >= self.retry_at {
            self.retry_results(now, client);
        }
        if self.rebooting.is_some() {
            self.check_reboot(now, client);
        } else if self.producing() {
            self.produce(now, client);
        }
    }

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        cmd: &Command<'_>,
    ) {
        self.sync(client);
        // Run before this boot? (The client only remembers this boot's commands.)
        if let Some(&(_, status)) = self.dev.executed.iter().find(|(id, _)| *id == cmd.id) {
            self.answer(now, client, PendingResult::new(cmd.id, status, &[]));
            return;
        }
        Shard::add(&self.ctx.shard().commands, 1);
        self.dev.commands += 1;
        let (status, values): (CommandStatus, Vec<Reading<'_>>) = match cmd.name.as_str() {
            "echo" => (CommandStatus::Succeeded, cmd.args.iter().copied().collect()),
            "set_interval" => match interval_arg(&cmd.args) {
                Ok(ms) => {
                    self.dev.interval_ms = Some(ms);
                    // The new rhythm starts now.
                    self.next_sample = now as f64 + ms;
                    let applied = Value::U64(ms.round() as u64);
                    (
                        CommandStatus::Succeeded,
                        std::vec![Reading::new(INTERVAL_MS, applied)],
                    )
                }
                Err(why) => (
                    CommandStatus::InvalidArguments,
                    std::vec![Reading::new(
                        ERROR,
                        Value::Str(crate::proto::Text::truncating(why))
                    )],
                ),
            },
            "reboot" => (CommandStatus::Succeeded, Vec::new()),
            _ => (CommandStatus::UnknownCommand, Vec::new()),
        };
        self.remember(cmd.id, status);
        self.answer(now, client, PendingResult::new(cmd.id, status, &values));
        if cmd.name.as_str() == "reboot" && self.rebooting.is_none() {
            Shard::add(&self.ctx.shard().reboots, 1);
            self.start_reboot(now, client, "reboot");
        }
    }

    /// Applies desired settings (an `interval_ms` or `interval_s` setting sets the
    /// sampling interval, as `set_interval` does) and reports every setting it holds.
    fn on_desired<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        desired: &Desired<'_>,
    ) {
        let settings = &mut self.dev.settings;
        if desired.base == 0 {
            settings.clear();
        }
        for change in &desired.changes {
            match change {
                Change::Set(r) => {
                    settings.insert(r.name.as_str().into(), OwnedValue::from_value(&r.value));
                }
                Change::Unset(n) => {
                    settings.remove(n.as_str());
                }
            }
        }
        self.dev.desired_version = desired.version;
        let applied: OwnedReadings = settings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Ok(readings) = borrow_readings(&applied)
            && let Ok(ms) = interval_arg(&readings)
            && self.dev.interval_ms != Some(ms)
        {
            self.dev.interval_ms = Some(ms);
            self.next_sample = now as f64 + ms;
        }
        // A full outbox leaves the version report to the client (it is still due).
        if let Ok(readings) = borrow_readings(&applied) {
            let _ = client.report_state(&readings);
        }
    }

    /// Firmware transfers (protocol version 3) through the updater; an installed image
    /// restarts the device into its version.
    fn on_firmware<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        firmware: &FirmwareMsg<'_>,
    ) {
        self.sync(client);
        // Restarting already: the gateway offers again to the next boot.
        if self.rebooting.is_some() {
            return;
        }
        let shard = self.ctx.shard();
        match self
            .fw
            .handle(&mut self.dev.firmware, &self.dev.id, client, firmware)
        {
            Done::Installed(_) => {
                Shard::add(&shard.firmware_installed, 1);
                self.dev.firmware_installs += 1;
                self.start_reboot(now, client, "firmware_update");
            }
            Done::Failed(_) => Shard::add(&shard.firmware_failed, 1),
            Done::Declined => Shard::add(&shard.firmware_declined, 1),
            Done::Nothing => {}
        }
    }

    fn on_event<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        client: &mut Client<R, O>,
        event: Event,
    ) {
        let shard = self.ctx.shard();
        match &event {
            Event::Connected { .. } => {
                self.dev.link.welcomed();
                Shard::add(&shard.connects, 1);
                self.dev.connects += 1;
                if !self.dev.connected_once {
                    self.dev.connected_once = true;
                    self.ctx.global.first_connect();
                }
            }
            // The client reports a failed connect as a disconnect too; it was counted
            // once already, as a connect failure.
            Event::Disconnected { reason, .. } if self.dev.link.ended_a_session() => {
                shard.disconnected(reason)
            }
            _ => {}
        }
        self.sync(client);
    }
}

/// `interval_ms` or `interval_s`, a positive number up to a week, in milliseconds.
fn interval_arg(args: &[Reading<'_>]) -> Result<f64, &'static str> {
    let ms = match (find(args, "interval_ms"), find(args, "interval_s")) {
        (Some(v), _) => v.as_f64().ok_or("interval_ms must be a number")?,
        (None, Some(v)) => v.as_f64().ok_or("interval_s must be a number")? * 1000.0,
        (None, None) => return Err("missing interval_ms or interval_s"),
    };
    if ms.is_finite() && (1.0..=MAX_INTERVAL_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err("the interval must be from 1 ms to 7 days")
    }
}

/// Why a boot ended.
enum BootEnd {
    Stop,
    Reboot,
    Fatal(String),
}

/// Runs one device until the simulation stops; reboots make new clients. `index`
/// (the device's place in the run) picks its first gateway when there are several.
pub(crate) async fn device<const RING: usize>(
    ctx: Rc<ThreadCtx>,
    ident: DeviceIdentity,
    index: usize,
    seed: u64,
    mut phase: watch::Receiver<Phase>,
) -> DeviceSummary {
    let settings = ctx.settings.clone();
    let mut rng = Rng::new(seed);
    let model = Model::new(&mut rng);
    let mut dev = Device {
        id: ident.id.clone(),
        rng,
        interval_ms: settings.interval_ms,
        model,
        executed: VecDeque::new(),
        settings: BTreeMap::new(),
        desired_version: 0,
        firmware: FirmwareState::new(settings.firmware),
        firmware_installs: 0,
        connected_once: false,
        connects: 0,
        commands: 0,
        ring_full: 0,
        boots: Vec::new(),
        fatal: None,
        link: Rc::new(Link::default()),
    };
    let mut connector = match SimConnector::new(ctx.clone(), dev.link.clone(), ident.tls, index) {
        Ok(c) => c,
        Err(why) => {
            dev.fatal = Some(why);
            return dev.summary();
        }
    };
    let link = dev.link.clone();
    let reboot_now = Notify::new();
    loop {
        let boot_id = dev.rng.next_u64();
        // The version it runs: the configured one, or the last it installed.
        let mut config = Config::new(boot_id, dev.firmware.running);
        config.max_frame_in = FRAME as u16;
        config.max_frame_out = FRAME as u16;
        config.backoff_min_ms = settings.backoff_min_ms;
        config.backoff_max_ms = settings.backoff_max_ms;
        config.jitter_seed = dev.rng.next_u64();
        config.min_version = settings.min_version;
        let mut client: Client<RING, OUTBOX> = Client::new(config);
        // Its settings survived the reboot: the gateway sends only what changed.
        client.set_desired_version(dev.desired_version);
        let now = ctx.clock.now();
        let first_sample = match dev.interval_ms {
            // Devices start out of step: the first sample at a random point of the
            // first interval.
            Some(ms) => now as f64 + dev.rng.unit() * ms,
            None => f64::INFINITY,
        };
        let fw = SimFirmware::boot(
            settings.release_key.as_ref(),
            settings.firmware_failure_rate,
            &mut dev.firmware,
        );
        let mut app = SimApp {
            ctx: &ctx,
            dev: &mut dev,
            fw,
            reboot_now: &reboot_now,
            boot_id,
            booted_at: now,
            sent: 0,
            next_sample: first_sample,
            open: false,
            acked: 0,
            in_flight: VecDeque::new(),
            results: VecDeque::new(),
            retry_at: 0,
            rebooting: None,
            reboot_signalled: false,
        };
        let (mut rx, mut tx) = ([0u8; FRAME], [0u8; TX]);
        let end = {
            let running = run(
                &mut client,
                &mut connector,
                &ctx.clock,
                &mut app,
                &mut rx,
                &mut tx,
            );
            tokio::select! {
                biased;
                _ = phase.wait_for(|p| *p == Phase::Stopped) => BootEnd::Stop,
                () = reboot_now.notified() => BootEnd::Reboot,
                // The driver does not know a handshake refused for revocation is final.
                why = link.refused_for_good() => BootEnd::Fatal(why),
                reason = running => BootEnd::Fatal(format!("{reason:?}")),
            }
        };
        // The run future is gone: count what it left behind.
        app.sync(&client);
        let shard = ctx.shard();
        if app.open {
            Shard::add(&shard.closed, 1);
        }
        let lost = match end {
            BootEnd::Reboot => client.unacked().records as u32,
            _ => 0,
        };
        Shard::add(&shard.lost_on_reboot, u64::from(lost));
        let boot = BootSummary {
            boot_id: app.boot_id,
            sent: app.sent,
            acked: app.acked,
            lost,
        };
        app.end();
        dev.boots.push(boot);
        match end {
            BootEnd::Reboot => continue,
            BootEnd::Stop => break,
            BootEnd::Fatal(reason) => {
                Shard::add(&shard.fatal, 1);
                dev.fatal = Some(reason);
                let _ = phase.wait_for(|p| *p == Phase::Stopped).await;
                break;
            }
        }
    }
    dev.summary()
}

impl Device {
    fn summary(self) -> DeviceSummary {
        DeviceSummary {
            id: self.id,
            boots: self.boots,
            connects: self.connects,
            commands: self.commands,
            ring_full: self.ring_full,
            fatal: self.fatal,
            firmware: self.firmware.running.into(),
            firmware_installs: self.firmware_installs,
        }
    }
}

/// Tells the simulator that this thread has seen the drain start: no device of this
/// thread will queue another record after this runs (devices read the phase when they
/// sample, and a thread runs one thing at a time).
pub(crate) async fn watch_drain(shard: Arc<Shard>, mut phase: watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p != Phase::Running).await;
    shard
        .drain_seen
        .store(true, std::sync::atomic::Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading<'a>(name: &'a str, v: Value<'a>) -> Reading<'a> {
        Reading::new(Name::new(name).unwrap(), v)
    }

    #[test]
    fn set_interval_takes_ms_or_seconds() {
        assert_eq!(
            interval_arg(&[reading("interval_ms", Value::U64(250))]),
            Ok(250.0)
        );
        assert_eq!(
            interval_arg(&[reading("interval_s", Value::F64(0.5))]),
            Ok(500.0)
        );
        assert_eq!(
            interval_arg(&[reading("interval_s", Value::I64(2))]),
            Ok(2000.0)
        );
        assert!(interval_arg(&[]).is_err());
        assert!(interval_arg(&[reading("interval_ms", Value::I64(0))]).is_err());
        assert!(interval_arg(&[reading("interval_ms", Value::str("5").unwrap())]).is_err());
        assert!(interval_arg(&[reading("interval_s", Value::F64(f64::NAN))]).is_err());
    }

    #[test]
    fn the_model_drifts_within_bounds() {
        let mut rng = Rng::new(7);
        let mut m = Model::new(&mut rng);
        for _ in 0..100_000 {
            let (t, h, b, r) = m.step(&mut rng);
            assert!((5.0..=40.0).contains(&t), "temp {t}");
            assert!((5.0..=95.0).contains(&h), "humidity {h}");
            assert!((0.0..=100.0).contains(&b), "battery {b}");
            assert!((-80..=-50).contains(&r), "rssi {r}");
        }
    }
}
