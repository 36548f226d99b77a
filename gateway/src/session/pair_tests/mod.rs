//! The pair harness: the real device client (`device_client::machine::Client`) against
//! the real gateway state machine ([`Machine`]) and the real store (a temporary SQLite
//! file), in memory, on one manual clock. No sockets, no TLS, no sleeps.
//!
//! The harness plays the driver's part as `session/mod.rs` does: it opens sessions in
//! the store, submits batches and hands their outcome back, takes commands, records
//! results, and on a takeover ends the old session (committing what it holds) before
//! opening the new one. Commits complete when a test says so, or at once
//! (`auto_commit`), so that what a device sees before and after a commit can be checked.
//! The link can lose bytes in either direction, silently, as a broken network does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod cases;
mod driver;
mod firmware;
mod state;

use std::sync::Arc;
use std::time::{Duration, Instant};

use device_client::machine::{
    Client, CompleteError, Config, Disconnect, Event, FirmwareMsg, Input, Millis, SendError,
    Unacked,
};
use device_client::proto::{
    self, Change, CommandStatus, Downlink, GoodbyeReason, Name, Reading, Seq, Uplink, Value,
};
use tokio::sync::oneshot;

use super::machine::{End, Fed, Machine, Now, Rules};
use crate::inbound::HelloFields;
use crate::store::{
    BatchDone, CommandState, Route, SessionInfo, Store, StoreOptions, WriterThread,
};

const DEVICE: &str = "dev-1";
const HEARTBEAT_S: u64 = 10;
const HB: Millis = HEARTBEAT_S * 1000;

type Dev = Client<1024, 256>;

/// One connection: the gateway's machine for it and the state of the wire.
struct Link {
    gw: Machine,
    /// Device → gateway bytes arrive.
    up: bool,
    /// Gateway → device bytes arrive.
    down: bool,
    /// The batch at the store.
    commit: Option<oneshot::Receiver<BatchDone>>,
    /// Device bytes the gateway has not read yet (it pauses while a full batch waits).
    held: Vec<u8>,
}

struct Pair {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Store,
    _writer: WriterThread,
    rules: Arc<Rules>,
    dev: Dev,
    link: Option<Link>,
    /// A connection the device gave up on while the gateway still holds it.
    stale: Option<Link>,
    /// The manual clock, ms.
    t: Millis,
    base: Instant,
    /// Commits complete as soon as they are submitted.
    auto_commit: bool,
    /// The device's events.
    events: Vec<Event>,
    /// Command ids the device handed to its application.
    commands: Vec<u32>,
    /// Telemetry seqs the device put on the wire, per connection.
    sent: Vec<Vec<Seq>>,
    /// Why gateway sessions ended, in order, with the frames they sent last.
    ended: Vec<(End, Vec<u8>)>,
    /// `Desired` messages the device applied: (version, base, changes as text).
    desired: Vec<(u32, u32, Vec<String>)>,
    /// Firmware messages the device got (version 3), as `Debug` text.
    firmware: Vec<String>,
    /// The gateway's rollouts (the driver's part: `firmware::Service`).
    rollouts: crate::firmware::Rollouts,
    /// The device application's firmware download.
    fw: FwApp,
    /// Kinds of the downlink messages the device read, in order.
    downlink_log: Vec<&'static str>,
    /// Reports the device put on the wire: (desired version, number of values).
    reports: Vec<(u32, usize)>,
}

impl Pair {
    fn new() -> Self {
        Self::with(Config::new(0xb007, "test-fw"))
    }

    fn with(mut cfg: Config) -> Self {
        cfg.jitter_seed = 42;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pair.sqlite");
        let (store, writer) = Store::open(StoreOptions {
            path: path.clone(),
            danger_ack_before_fsync: true,
            max_commit_records: 1000,
            max_queued_commands: 100,
            sinks: Vec::new(),
        })
        .unwrap();
        Self {
            rt,
            _dir: dir,
            path,
            store,
            _writer: writer,
            rules: Arc::new(Rules {
                max_frame: 4096,
                hello_timeout: Duration::from_secs(10),
                heartbeat: Duration::from_secs(HEARTBEAT_S),
                max_pending_records: 1024,
                retry_after_s: 5,
                max_version: proto::PROTOCOL_VERSION,
            }),
            dev: Client::new(cfg),
            link: None,
            stale: None,
            t: 0,
            base: Instant::now(),
            auto_commit: true,
            events: Vec::new(),
            commands: Vec::new(),
            sent: Vec::new(),
            ended: Vec::new(),
            desired: Vec::new(),
            firmware: Vec::new(),
            rollouts: crate::firmware::Rollouts::default(),
            fw: FwApp::default(),
            downlink_log: Vec::new(),
            reports: Vec::new(),
        }
    }

    /// The gateway speaks at most protocol `version`.
    fn gateway_version(mut self, version: u8) -> Self {
        let mut rules = (*self.rules).clone();
        rules.max_version = version;
        self.rules = Arc::new(rules);
        self
    }

    /// The gateway's clocks at the manual time.
    fn now(&self) -> Now {
        Now {
            mono: self.base + Duration::from_millis(self.t),
            wall_ms: 1_764_100_000_000 + self.t as i64,
        }
    }

    /// Connects when the device allows (the clock jumps there) and runs until quiet.
    fn connect(&mut self) {
        let at = self.dev.poll_connect().expect("the device may reconnect");
        self.t = self.t.max(at);
        self.dev.handle_connected(self.t);
        self.link = Some(Link {
            gw: Machine::new(self.rules.clone(), self.now()),
            up: true,
            down: true,
            commit: None,
            held: Vec::new(),
        });
        self.sent.push(Vec::new());
        self.pump();
    }

    /// Moves bytes both ways, and batches through the store, until nothing moves.
    fn pump(&mut self) {
        self.pump_limited(usize::MAX);
    }

    /// Like `pump`, but the connection breaks after `budget` more device→gateway bytes
    /// (the gateway sees it closed).
    fn pump_limited(&mut self, mut budget: usize) {
        loop {
            let mut moved = false;
            let mut buf = [0u8; 512];
            while let Some(n) = self.dev.poll_transmit(self.t, &mut buf) {
                moved = true;
                match proto::decode_uplink(&buf[2..n]) {
                    Ok(Uplink::Telemetry(r)) => self.sent.last_mut().unwrap().push(r.seq),
                    Ok(Uplink::Reported(r)) => {
                        self.reports.push((r.desired_version, r.values.len()));
                    }
                    _ => {}
                }
                let take = n.min(budget);
                budget -= take;
                self.carry_up(&buf[..take]);
                if budget == 0 {
                    self.dev.handle_closed(self.t);
                    self.device_closed();
                    self.drain_events();
                    return;
                }
            }
            moved |= self.gateway_work();
            moved |= self.carry_down();
            self.drain_events();
            if !moved {
                return;
            }
        }
    }

    fn carry_up(&mut self, bytes: &[u8]) {
        let Some(link) = self.link.as_mut().filter(|l| l.up) else {
            return;
        };
        link.held.extend_from_slice(bytes);
        self.read_held();
    }

    /// The gateway reads what the device sent, unless it pauses reading.
    fn read_held(&mut self) -> bool {
        let now = self.now();
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        if link.held.is_empty() || !link.gw.wants_input() {
            return false;
        }
        let bytes = std::mem::take(&mut link.held);
        match link.gw.handle_bytes(now, &bytes) {
            Ok(fed) => self.fed(fed),
            Err(end) => self.gateway_ended(end),
        }
        true
    }

    /// What the driver does with what the machine found.
    fn fed(&mut self, fed: Fed) {
        let key = self.link.as_ref().and_then(|l| l.gw.device_key());
        if let (Some((version, values)), Some(key)) = (fed.reported, key)
            && self
                .store
                .report_changes_state(key, version, !values.is_empty())
        {
            self.rt
                .block_on(self.store.record_reported(key, version, values))
                .unwrap();
        }
        if fed.wants_desired {
            self.send_desired();
        }
        let wall = self.now().wall_ms;
        if let Some((id, end)) = fed.firmware_sent {
            let fx = self.rollouts.sent(DEVICE, id, end, wall);
            self.firmware_effects(fx);
        }
        for (id, outcome) in fed.firmware_status {
            let fx = self.rollouts.status(DEVICE, id, outcome, wall, |_| true);
            self.firmware_effects(fx);
        }
        for r in fed.results {
            let key = self.link.as_ref().unwrap().gw.device_key().unwrap();
            let rec = self
                .rt
                .block_on(self.store.finish_command(
                    key,
                    r.id,
                    r.state,
                    Some(r.status.to_owned()),
                    Some(r.values),
                    None,
                ))
                .unwrap();
            assert!(rec.is_some(), "a result the machine passed on is recorded");
        }
        if let Some(h) = fed.hello {
            self.open(h);
        }
    }

    /// Opens the session the way the driver does: an older session of the device
    /// ends first and commits what it holds; then the store says what it has.
    fn open(&mut self, h: HelloFields) {
        if let Some(mut old) = self.stale.take() {
            let end = old.gw.close(GoodbyeReason::Replaced);
            self.finish(old, end);
        }
        let opened = self
            .rt
            .block_on(self.store.open_session(
                SessionInfo {
                    device: DEVICE.into(),
                    cert_serial: "01".into(),
                    cert_not_after: 0,
                    firmware: h.firmware.clone(),
                    peer_addr: "pair".into(),
                    boot_id: h.boot_id,
                },
                |_| {},
            ))
            .unwrap();
        let now = self.now();
        let link = self.link.as_mut().unwrap();
        match link.gw.opened(now, &h, opened) {
            Ok(fed) => self.fed(fed),
            Err(end) => return self.gateway_ended(end),
        }
        let version = self.link.as_ref().and_then(|l| l.gw.version()).unwrap_or(0);
        let fx = self
            .rollouts
            .hello(DEVICE, &h.firmware, version, now.wall_ms, |_| true);
        self.firmware_effects(fx);
        self.sync_firmware();
        self.send_commands(true);
    }

    /// What the driver does with what the rollouts ask: the device's session looks
    /// again at what it should serve (writes and events are the service's business).
    fn firmware_effects(&mut self, fx: crate::firmware::Effects) {
        if fx.wake.iter().any(|d| &**d == DEVICE) {
            self.sync_firmware();
        }
    }

    /// As `Session::sync_firmware`: offer what the rollout wants, withdraw the rest.
    fn sync_firmware(&mut self) {
        let wanted = self.rollouts.wanted(DEVICE);
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if !link.gw.speaks_firmware() {
            return;
        }
        match (wanted, link.gw.firmware_offered()) {
            (Some((id, _)), Some(cur)) if id == cur => {}
            (Some((id, image)), _) => link.gw.offer_firmware(id, image).unwrap(),
            (None, Some(cur)) => link.gw.cancel_firmware(cur),
            (None, None) => {}
        }
    }

    /// Sends the device what it lacks of its desired state, as the driver does when
    /// signalled (the fetch is skipped when memory says the device is up to date).
    fn send_desired(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let (Some(key), Some(base)) = (link.gw.device_key(), link.gw.desired_base()) else {
            return;
        };
        if self.store.desired_version(key) == base {
            return;
        }
        if let Some(delta) = self
            .rt
            .block_on(self.store.desired_since(key, base))
            .unwrap()
        {
            assert!(link.gw.send_desired(&delta).unwrap());
        }
    }

    /// An operator changes the desired state; an open session sends it at once.
    fn put_desired(&mut self, patch: serde_json::Value) -> u32 {
        let out = self
            .rt
            .block_on(self.store.put_desired(DEVICE, patch, None))
            .unwrap();
        let crate::store::PutDesired::Done { doc, .. } = out else {
            panic!("refused: {out:?}");
        };
        self.send_desired();
        self.pump();
        doc.version
    }

    /// The device's state as the API shows it.
    fn state(&self) -> crate::store::StateView {
        self.rt.block_on(self.store.flush()).unwrap();
        self.rt
            .block_on(self.store.device_state(DEVICE))
            .unwrap()
            .unwrap()
    }

    /// Takes the device's commands from the store, as many as the machine has room for.
    fn send_commands(&mut self, include_sent: bool) {
        let now = self.now();
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let (Some(key), room) = (link.gw.device_key(), link.gw.command_room()) else {
            return;
        };
        let cmds = self
            .rt
            .block_on(self.store.take_commands(key, room, include_sent))
            .unwrap();
        for c in cmds {
            // As the driver does: a command the device cannot take fails in the store.
            if let Err(why) = link.gw.send_command(now, &c) {
                self.rt
                    .block_on(self.store.finish_command(
                        key,
                        c.id,
                        CommandState::Failed,
                        None,
                        None,
                        Some(why.to_string()),
                    ))
                    .unwrap();
            }
        }
    }

    /// Submits the machine's batch; completes it at once with `auto_commit`.
    fn gateway_work(&mut self) -> bool {
        let mut moved = self.read_held();
        let now = self.now();
        let Some(link) = self.link.as_mut() else {
            return moved;
        };
        if link.commit.is_none()
            && let Some(batch) = link.gw.poll_batch(now)
        {
            link.commit = Some(self.store.try_submit(batch).unwrap());
            moved = true;
        }
        if self.auto_commit && link.commit.is_some() {
            self.commit();
            moved = true;
        }
        moved
    }

    /// The batch at the store commits and its outcome goes back to the machine.
    fn commit(&mut self) {
        let now = self.now();
        let link = self.link.as_mut().expect("a connection");
        let rx = link.commit.take().expect("a batch at the store");
        let done = self.rt.block_on(rx).unwrap();
        if let Err(end) = link.gw.handle_committed(now, done) {
            self.gateway_ended(end);
        }
    }

    /// Gateway → device, if the wire carries it.
    fn carry_down(&mut self) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        let bytes = link.gw.transmit().to_vec();
        link.gw.transmitted(bytes.len());
        if bytes.is_empty() || !link.down {
            return false;
        }
        self.device_reads(&bytes);
        true
    }

    fn device_reads(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() && self.dev.is_connected() {
            match self.dev.handle_input(self.t, rest) {
                Ok(Input::NeedMore) => panic!("the gateway sends whole frames"),
                Ok(Input::Frame { len, command }) => {
                    if let Some(c) = command {
                        self.downlink_log.push("command");
                        self.commands.push(c.id);
                    }
                    rest = &rest[len..];
                }
                Ok(Input::Desired { len, desired }) => {
                    // The application applies the settings and reports them back.
                    let mut set = Vec::new();
                    let mut text = Vec::new();
                    for c in &desired.changes {
                        match c {
                            Change::Set(r) => {
                                set.push(*r);
                                text.push(format!("set {}={:?}", r.name, r.value));
                            }
                            Change::Unset(n) => text.push(format!("unset {n}")),
                        }
                    }
                    self.desired.push((desired.version, desired.base, text));
                    self.dev.report_state(&set).unwrap();
                    rest = &rest[len..];
                }
                Ok(Input::Firmware { len, firmware }) => {
                    self.downlink_log.push(match firmware {
                        FirmwareMsg::Offer(_) => "offer",
                        FirmwareMsg::Chunk(_) => "chunk",
                        FirmwareMsg::Cancel(_) => "cancel",
                    });
                    self.firmware.push(format!("{firmware:?}"));
                    self.fw.handle(&mut self.dev, &firmware);
                    rest = &rest[len..];
                }
                Err(_) => {
                    // The device dropped the connection.
                    self.device_closed();
                    break;
                }
            }
        }
        self.drain_events();
    }

    /// The device closed its connection: the gateway reads the end if the wire
    /// carries it.
    fn device_closed(&mut self) {
        if let Some(link) = self.link.as_ref()
            && link.up
        {
            self.gateway_ended(End::PeerClosed);
        }
    }

    /// The gateway's session ended: the driver commits what it holds, sends what is
    /// queued (a `Goodbye`), and closes.
    fn gateway_ended(&mut self, end: End) {
        if let Some(link) = self.link.take() {
            self.finish(link, end);
        }
    }

    fn finish(&mut self, mut link: Link, end: End) {
        let now = self.now();
        link.gw.ended(&end);
        for _ in 0..3 {
            if let Some(rx) = link.commit.take() {
                let done = self.rt.block_on(rx).unwrap();
                if link.gw.handle_committed(now, done).is_err() {
                    break;
                }
            } else if let Some(batch) = link.gw.poll_batch(now) {
                link.commit = Some(self.store.try_submit(batch).unwrap());
            } else {
                break;
            }
        }
        if let Some(key) = link.gw.device_key() {
            self.rt.block_on(self.store.close_session(key)).unwrap();
        }
        let last = link.gw.transmit().to_vec();
        if self.dev.is_connected() && link.down {
            self.device_reads(&last);
            if self.dev.is_connected() {
                self.dev.handle_closed(self.t);
            }
        }
        self.ended.push((end, last));
        self.drain_events();
    }

    fn drain_events(&mut self) {
        while let Some(e) = self.dev.poll_event() {
            self.events.push(e);
        }
    }

    /// Advances the clock to `t`, firing both sides' timers on the way (each second).
    fn advance_to(&mut self, t: Millis) {
        while self.t < t {
            self.t = (self.t + 1000).min(t);
            let now = self.now();
            if self.dev.handle_timeout(self.t).is_err() {
                self.drain_events();
                self.device_closed();
            }
            if let Some(link) = self.link.as_mut()
                && let Err(end) = link.gw.handle_timeout(now)
            {
                self.gateway_ended(end);
            }
            self.pump();
        }
    }

    /// The device sends `n` small records.
    fn send(&mut self, n: u32) -> Vec<Seq> {
        let name = Name::new("t").unwrap();
        (0..n)
            .map(|i| {
                self.dev
                    .send_telemetry(None, &[Reading::new(name, Value::U64(u64::from(i)))])
                    .unwrap()
            })
            .collect()
    }

    fn send_one(&mut self) -> Result<Seq, SendError> {
        let name = Name::new("temperature").unwrap();
        self.dev
            .send_telemetry(Some(1), &[Reading::new(name, Value::F32(21.5))])
    }

    /// Seqs in the store, in the order stored.
    fn stored(&self) -> Vec<Seq> {
        let conn = rusqlite::Connection::open(&self.path).unwrap();
        let mut stmt = conn
            .prepare("SELECT last_row, n, min_time, records FROM chunks ORDER BY last_row")
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        let mut seqs = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            let blob = r.get_ref(3).unwrap().as_blob().unwrap();
            let chunk = crate::store::chunk::decode(
                r.get(0).unwrap(),
                r.get(1).unwrap(),
                r.get(2).unwrap(),
                blob,
            );
            seqs.extend(chunk.map(|rec| rec.seq));
        }
        seqs
    }

    /// An operator queues a command; an open session sends it at once.
    fn enqueue(&mut self, name: &str) -> i64 {
        self.enqueue_with(name, crate::values::OwnedReadings::default())
    }

    /// [`enqueue`](Self::enqueue) with arguments.
    fn enqueue_with(&mut self, name: &str, args: crate::values::OwnedReadings) -> i64 {
        let rec = self
            .rt
            .block_on(self.store.enqueue_command(
                DEVICE,
                name,
                args,
                Duration::from_secs(600),
                Route::Local,
            ))
            .unwrap();
        self.send_commands(false);
        self.pump();
        rec.id
    }

    /// The command as the store has it, once what was handed out is committed (the
    /// store answers a hand-out before its commit).
    fn command(&self, id: i64) -> crate::store::CommandRecord {
        self.rt.block_on(self.store.flush()).unwrap();
        self.rt.block_on(self.store.command(id)).unwrap().unwrap()
    }

    fn gateway_end(&self) -> Option<&End> {
        self.ended.last().map(|(e, _)| e)
    }

    fn disconnects(&self) -> Vec<Disconnect> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Disconnected { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The downlink frames in `bytes`.
fn downlinks(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Ok(Some(f)) = proto::split_frame(rest, usize::MAX) {
        let msg = proto::decode_downlink(f.body).unwrap();
        out.push(match msg {
            Downlink::Goodbye(g) => format!("Goodbye({}, {})", g.reason.as_str(), g.retry_after_s),
            other => format!("{other:?}"),
        });
        rest = &rest[f.len..];
    }
    out
}

/// A device application that downloads an offered image into memory, one request at
/// a time, resuming a transfer of the same id from what it holds; it checks the
/// SHA-256 at the end (the signature is the `firmware` module's job, tested there).
#[derive(Debug, Default)]
struct FwApp {
    /// The transfer held: id, size, SHA-256.
    offer: Option<(u32, u32, [u8; 32])>,
    data: Vec<u8>,
    /// Offsets of the chunks received, in order.
    chunks: Vec<u32>,
    /// Statuses sent.
    outcomes: Vec<(u32, proto::FirmwareOutcome)>,
    /// Bytes asked for per request.
    request_len: u16,
    /// Stop asking after this many chunks (a device busy with something else).
    stop_after: Option<usize>,
}

impl FwApp {
    fn handle(&mut self, dev: &mut Dev, msg: &FirmwareMsg<'_>) {
        let len = if self.request_len == 0 {
            u16::MAX
        } else {
            self.request_len
        };
        match msg {
            FirmwareMsg::Offer(o) => {
                if self.offer.is_none_or(|(id, ..)| id != o.id) {
                    self.offer = Some((o.id, o.size, o.sha256.0));
                    self.data.clear();
                }
                dev.request_firmware(o.id, self.data.len() as u32, len);
            }
            FirmwareMsg::Chunk(c) => {
                let Some((id, size, sha)) = self.offer else {
                    return;
                };
                if c.id != id || c.offset as usize != self.data.len() {
                    return;
                }
                self.chunks.push(c.offset);
                self.data.extend_from_slice(&c.data);
                if self.data.len() < size as usize {
                    if self.stop_after != Some(self.chunks.len()) {
                        dev.request_firmware(id, self.data.len() as u32, len);
                    }
                    return;
                }
                let mut h = device_client::firmware::ImageHasher::new();
                h.update(&self.data);
                let outcome = if h.finish().sha256 == sha {
                    proto::FirmwareOutcome::Verified
                } else {
                    proto::FirmwareOutcome::HashMismatch
                };
                dev.firmware_status(id, outcome).unwrap();
                self.outcomes.push((id, outcome));
                self.offer = None;
            }
            FirmwareMsg::Cancel(id) => {
                if self.offer.is_some_and(|(o, ..)| o == *id) {
                    self.offer = None;
                    self.data.clear();
                }
            }
        }
    }
}
