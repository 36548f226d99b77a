//! The sans-IO client (`device_client::machine::Client`) driven by a script: connect,
//! gateway bytes in chunks of any size, timers, telemetry, command results, transmits
//! and events, in any order the fuzzer chooses, on a monotonic manual clock.
//!
//! Input layout (the `arbitrary` crate): an optional configuration (a `0` byte: the
//! defaults of `Config::new`), a list of operations (a `0` byte: none), then the bytes
//! the gateway sends, across all connections, as the rest. After the operations a
//! driver-like epilogue (connect, queue a record, transmit, read everything) runs the
//! rest of the bytes, so `00 00` followed by downlink frames is a useful seed.
//!
//! Every call is checked against a reference model written from PROTOCOL.md §8 and the
//! client's documented behaviour: the model predicts each result, each transmitted frame
//! byte for byte, each event, and the client's observable state (`unacked`, `acked`,
//! `pending_results`, `poll_connect`, `poll_timeout`, `session_version`,
//! `desired_version`, `firmware_chunk_len`). The model speaks protocol version 3 (a
//! compile-time assertion makes a new version revisit it). Independently of the model:
//! - every transmitted frame is one valid uplink frame, within the buffer, and, once a
//!   session is open, within the gateway's `Welcome.max_frame` (if that is at least
//!   the protocol's minimum, 128);
//! - `Hello` is the first frame of every connection, is sent once and offers
//!   `PROTOCOL_VERSION`; nothing else goes before `Welcome`, nothing at all while
//!   disconnected;
//! - telemetry, results and reports with values are never larger than `max_frame_out`;
//! - `Reported` goes only to a session of version 2; in such a session one is sent
//!   after `Welcome` and after every `Desired` before any telemetry or `Ping` (until
//!   the gateway has one it sends no `Desired`);
//! - a `Desired` handed to the application applies to what it holds: the whole
//!   document (`base` 0), or changes on top of the version it last got (or set) to a
//!   later one;
//! - within a connection, telemetry seqs strictly increase, and a record the gateway
//!   acknowledged is never sent again (§8.2). (A record queued when the gateway's
//!   `last_acked` was already at or above its seq, which happens only if a boot id is
//!   reused, is sent, and the gateway drops it as a duplicate: PROTOCOL.md §5.1.);
//! - the ring of unacknowledged records never holds more than its `RING` bytes;
//! - `acked()` never goes backwards, and `Acked` events strictly increase;
//! - a command id is handed to the application again only after it left the window
//!   of recent commands (§8.3);
//! - a fatal disconnect (revoked, unsupported version) never schedules a reconnect, a
//!   non-fatal one always does, no sooner than `Goodbye.retry_after_s`;
//! - firmware transfer (version 3): a `FirmwareRequest` or `FirmwareStatus` goes only to
//!   a session of version 3; every `FirmwareRequest` sent stands for its own call of
//!   `request_firmware` (at most one outstanding: a second call before the first is
//!   sent replaces it, and none is sent twice), asks for 1 to `firmware_chunk_len()`
//!   bytes (at most `MAX_CHUNK_LEN`), and waits behind an owed `Reported`;
//!   `firmware_chunk_len()` is what fits `max_frame_in` after the chunk's overhead.
//!
//! Version rules the model holds the client to: a `Welcome` version outside
//! `max(min_version, 1)..=3` is a fatal `UnsupportedVersion`; a message of a later
//! version than the session's (`Desired` before `Welcome` or in a version-1 session;
//! `FirmwareOffer`, `FirmwareChunk`, `FirmwareCancel` below version 3) ends the
//! connection as unexpected; a `Reported` queued for a version-1 session, or a
//! `FirmwareStatus` for a session below version 3, is dropped when its turn comes; a
//! `FirmwareRequest` waits for a version-3 session (and a `FirmwareCancel` of its id, or
//! a status for its id, withdraws it). In the epilogue the application answers an offer
//! by asking from 0, a chunk by asking for what follows, and an empty chunk with
//! `Verified`, as an updater does.

#![no_main]

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use device_client::machine::{
    Client, CompleteError, Config, Disconnect, Event, FirmwareMsg, Input, Millis, RECENT_COMMANDS,
    SendError,
};
use device_client::proto::{
    self, CommandResult, CommandStatus, Downlink, FirmwareOutcome, FirmwareRequest, FirmwareStatus,
    GoodbyeReason, HEADER_LEN, Hello, MAX_CHUNK_LEN, MAX_READINGS, MAX_UPLINK_FRAME, MIN_MAX_FRAME,
    Name, PROTOCOL_VERSION, Ping, Reading, Readings, Reported, Seq, Telemetry, Text, Uplink, Value,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Script<'a> {
    /// `None`: the defaults of `Config::new`.
    config: Option<FuzzConfig>,
    ops: Vec<Op>,
    /// The gateway's bytes, read by `Op::Read` and then by the epilogue.
    wire: &'a [u8],
}

#[derive(Arbitrary, Debug)]
struct FuzzConfig {
    /// `Client<100, 40>` (wraps and fills quickly) instead of `Client<1024, 256>`.
    small: bool,
    boot_id: u64,
    /// Characters of [`FIRMWARE`] to use.
    firmware_chars: u8,
    max_frame_in: u16,
    max_frame_out: u16,
    backoff_min_ms: u32,
    backoff_max_ms: u32,
    welcome_timeout_ms: u32,
    jitter_seed: u64,
    /// The transmit buffer; `None`: `max_frame_out` bytes (as the README sizes it).
    tx_len: Option<u16>,
    /// `Config::min_version` 2 (a device that needs the desired state) instead of 1.
    min_version_2: bool,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    /// Connect when `poll_connect` allows it (the clock jumps there if needed).
    Connect,
    /// The connection attempt failed.
    ConnectFailed,
    /// Up to this many more gateway bytes arrive; complete frames are handled.
    Read(u16),
    /// The transport closed.
    Closed,
    /// The clock moves on; timers run.
    Advance(u32),
    /// The clock moves to `poll_timeout`; timers run.
    AdvanceToTimeout,
    /// The application queues a record.
    Send {
        readings: u8,
        kind: u8,
        value: u64,
        time_ms: Option<u64>,
    },
    /// The application answers a command it was handed (or an unknown id).
    Complete { which: u8, status: u8, values: u8 },
    /// One `poll_transmit` with a buffer of `tx_len`, or of this many bytes.
    Transmit(Option<u16>),
    /// `poll_transmit` until it has nothing.
    TransmitAll,
    /// `poll_event` until it has nothing.
    Events,
    /// The application reports state values (`report_state`).
    Report { values: u8, kind: u8, value: u64 },
    /// The application sets the desired version it holds (`set_desired_version`), as
    /// a device that keeps its settings across reboots does at boot.
    SetDesiredVersion(u32),
    /// The application asks for a piece of an image (`request_firmware`): of an offer
    /// it was handed (`which` < 200, if there was one) or of id `which`.
    RequestFirmware { which: u8, offset: u32, len: u16 },
    /// The application reports how a transfer ended (`firmware_status`), for an offer
    /// as above.
    FirmwareStatus { which: u8, outcome: u8 },
}

/// Firmware text with multi-byte characters, longer than the 32 bytes `Hello` takes.
const FIRMWARE: &str = "1.4.2-rc.1+ünïcödé.build.20251125.0123456789abcdef";

/// Names for readings, up to the 32-byte maximum.
const NAMES: [&str; 5] = [
    "t",
    "temp_c",
    "humidity",
    "a.b-c_9",
    "abcdefghijklmnopqrstuvwxyz_01234",
];

/// Text and bytes for values, cut to any length up to the 128-byte maximum.
const TEXT: &str = concat!(
    "The quick brown fox jumps over the lazy dog. ",
    "The quick brown fox jumps over the lazy dog. ",
    "Pack my box with five dozen liquor jug"
);

fuzz_target!(|script: Script<'_>| {
    let small = script.config.as_ref().is_some_and(|c| c.small);
    if small {
        run::<100, 40>(&script);
    } else {
        run::<1024, 256>(&script);
    }
});

fn config(c: &Option<FuzzConfig>) -> (Config, usize) {
    let Some(c) = c else {
        let cfg = Config::new(0x0123_4567_89ab_cdef, "1.4.2");
        return (cfg, usize::from(cfg.max_frame_out));
    };
    let mut cfg = Config::new(c.boot_id, firmware(c.firmware_chars));
    cfg.max_frame_in = c.max_frame_in;
    cfg.max_frame_out = c.max_frame_out;
    cfg.backoff_min_ms = Millis::from(c.backoff_min_ms);
    cfg.backoff_max_ms = Millis::from(c.backoff_max_ms);
    cfg.welcome_timeout_ms = Millis::from(c.welcome_timeout_ms);
    cfg.jitter_seed = c.jitter_seed;
    cfg.min_version = if c.min_version_2 { 2 } else { 1 };
    let tx_len = c.tx_len.map_or(usize::from(c.max_frame_out), usize::from);
    (cfg, tx_len)
}

fn firmware(chars: u8) -> &'static str {
    let end = FIRMWARE
        .char_indices()
        .nth(usize::from(chars))
        .map_or(FIRMWARE.len(), |(i, _)| i);
    &FIRMWARE[..end]
}

/// Readings for `Op::Send` / `Op::Complete` / `Op::Report`, from static storage (they
/// borrow).
fn readings(count: u8, kind: u8, value: u64) -> Vec<Reading<'static>> {
    (0..usize::from(count) % (MAX_READINGS + 2))
        .map(|i| {
            let name = Name::new(NAMES[(i + usize::from(kind)) % NAMES.len()]).unwrap();
            let v = value.rotate_left(i as u32 * 7);
            let cut = (v % 129) as usize;
            let value = match (usize::from(kind) + i) % 7 {
                0 => Value::Bool(v & 1 == 1),
                1 => Value::I64(v as i64),
                2 => Value::U64(v),
                3 => Value::F32(f32::from_bits(v as u32)),
                4 => Value::F64(f64::from_bits(v)),
                5 => Value::str(&TEXT[..cut]).unwrap(),
                _ => Value::bytes(&TEXT.as_bytes()[..cut]).unwrap(),
            };
            Reading::new(name, value)
        })
        .collect()
}

/// A frame as `proto::encode` makes it, in a buffer larger than any frame.
fn frame_of(msg: &Uplink<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_UPLINK_FRAME + 64];
    let n = proto::encode(msg, &mut buf).expect("a valid message encodes");
    buf[..n].to_vec()
}

// ----------------------------------------------------------------------------------
// The reference model.

// The model below is of protocol version 3 (version 2: `Desired` down, `Reported` up;
// version 3: `FirmwareOffer`, `FirmwareChunk`, `FirmwareCancel` down, `FirmwareRequest`,
// `FirmwareStatus` up): a new version must revisit it.
const _: () = assert!(PROTOCOL_VERSION == 3);

/// The first version that has a downlink message, written out here rather than taken
/// from `Downlink::since_version`, which is part of what is under test.
fn since_version(msg: &Downlink<'_>) -> u8 {
    match msg {
        Downlink::Desired(_) => 2,
        Downlink::FirmwareOffer(_) | Downlink::FirmwareChunk(_) | Downlink::FirmwareCancel(_) => 3,
        _ => 1,
    }
}

/// Bytes of a `FirmwareChunk` frame besides its data, at most (PROTOCOL.md §5.4):
/// header 2, variant 1, id and offset up to 5 each, data length up to 2.
const CHUNK_OVERHEAD: usize = 15;

/// The most image bytes one chunk can bring to a device that receives `max_frame_in`.
fn chunk_len(max_frame_in: u16) -> usize {
    usize::from(max_frame_in.max(MIN_MAX_FRAME))
        .saturating_sub(CHUNK_OVERHEAD)
        .min(MAX_CHUNK_LEN)
}

const OUTCOMES: [FirmwareOutcome; 6] = [
    FirmwareOutcome::Verified,
    FirmwareOutcome::Declined,
    FirmwareOutcome::SizeMismatch,
    FirmwareOutcome::HashMismatch,
    FirmwareOutcome::BadSignature,
    FirmwareOutcome::StorageError,
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum MLink {
    Down { at: Option<Millis> },
    Hello { sent: bool, deadline: Millis },
    Open(MSession),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct MSession {
    /// The version `Welcome` chose.
    version: u8,
    peer_max: usize,
    heartbeat_ms: Millis,
    last_tx: Millis,
    last_rx: Millis,
    ping: Option<(u32, Millis)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Recent {
    Running(u32),
    Done(u32, CommandStatus),
}

impl Recent {
    fn id(self) -> u32 {
        match self {
            Recent::Running(id) | Recent::Done(id, _) => id,
        }
    }
}

struct Model<const RING: usize, const OUTBOX: usize> {
    cfg: Config,
    now: Millis,
    link: MLink,
    /// Queued and not acknowledged: (seq, frame), in seq order.
    ring: VecDeque<(Seq, Vec<u8>)>,
    /// Highest seq sent or skipped on this connection (the ring's replay cursor).
    cursor: Option<Seq>,
    next_seq: Seq,
    acked: Option<Seq>,
    outbox: VecDeque<Queued>,
    recent: VecDeque<Recent>,
    events: VecDeque<Event>,
    nonce: u32,
    attempts: u32,
    retry_after_ms: Millis,
    /// The desired document version the client holds (0: none).
    desired_version: u32,
    /// A `Reported` is due (set by a version-2 `Welcome` and by every `Desired`).
    report_due: bool,
    // Protocol checks, independent of the model.
    /// Frames transmitted on this connection.
    sent_on_connection: usize,
    /// Highest telemetry seq transmitted on this connection.
    last_sent_seq: Option<Seq>,
    /// The newest `Acked` event seen.
    last_acked_event: Option<Seq>,
    /// Seqs the application queued at or below `acked` (the gateway's `last_acked` ran
    /// ahead of this boot's numbering, e.g. a reused boot id, PROTOCOL.md §5.1): the
    /// client sends them, and the gateway takes them for duplicates.
    queued_below_acked: Vec<Seq>,
    /// The gateway waits for a `Reported` (since a version-2 `Welcome` or a `Desired`):
    /// it sends no `Desired` until it has one, so the client must not go on to
    /// telemetry or heartbeats first.
    report_owed: bool,
    /// The desired version the application holds: the last `Desired` handed over, or
    /// what it set.
    app_desired: u32,
    /// The firmware request waiting to be sent (version 3), as the client keeps it.
    fw_request: Option<FirmwareRequest>,
    /// `request_firmware` was called since the last `FirmwareRequest` went out (a
    /// request is never sent twice).
    fw_called: bool,
}

/// A frame in the outbox.
#[derive(Debug, Clone)]
struct Queued {
    /// A `Reported`, not a command result or firmware status.
    report: bool,
    /// The first version that has it: a session below it drops it.
    since: u8,
    frame: Vec<u8>,
}

impl<const RING: usize, const OUTBOX: usize> Model<RING, OUTBOX> {
    fn new(cfg: Config) -> Self {
        Self {
            cfg,
            now: 0,
            link: MLink::Down { at: Some(0) },
            ring: VecDeque::new(),
            cursor: None,
            next_seq: 1,
            acked: None,
            outbox: VecDeque::new(),
            recent: VecDeque::new(),
            events: VecDeque::new(),
            nonce: 0,
            attempts: 0,
            retry_after_ms: 0,
            desired_version: 0,
            report_due: false,
            sent_on_connection: 0,
            last_sent_seq: None,
            last_acked_event: None,
            queued_below_acked: Vec::new(),
            report_owed: false,
            app_desired: 0,
            fw_request: None,
            fw_called: false,
        }
    }

    fn ring_bytes(&self) -> usize {
        self.ring.iter().map(|(_, f)| 4 + f.len()).sum()
    }

    fn outbox_bytes(&self) -> usize {
        self.outbox.iter().map(|q| q.frame.len()).sum()
    }

    fn is_open(&self) -> bool {
        matches!(self.link, MLink::Open(_))
    }

    fn event(&mut self, e: Event) {
        if self.events.len() == 8 {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn send_telemetry(
        &mut self,
        time_ms: Option<u64>,
        readings: &[Reading<'_>],
    ) -> Result<Seq, SendError> {
        let seq = self.next_seq;
        if seq == Seq::MAX {
            return Err(SendError::SeqExhausted);
        }
        let Ok(readings) = Readings::from_slice(readings) else {
            return Err(SendError::TooLarge);
        };
        let frame = frame_of(&Uplink::Telemetry(Telemetry {
            seq,
            time_ms,
            readings,
        }));
        let body = frame.len() - HEADER_LEN;
        let free = RING - self.ring_bytes();
        if free < 4 + HEADER_LEN + 1 {
            return Err(SendError::RingFull);
        }
        let room = (free - 4 - HEADER_LEN)
            .min(usize::from(self.cfg.max_frame_out).saturating_sub(HEADER_LEN));
        if body > room {
            return Err(if room < free - 4 - HEADER_LEN {
                SendError::TooLarge
            } else {
                SendError::RingFull
            });
        }
        if self.acked.is_some_and(|a| seq <= a) {
            self.queued_below_acked.push(seq);
        }
        self.ring.push_back((seq, frame));
        self.next_seq += 1;
        Ok(seq)
    }

    /// Appends a result (or report) frame to the outbox, as the client's `push_frame`
    /// does.
    fn push_result(&mut self, msg: &Uplink<'_>) -> Result<(), CompleteError> {
        let frame = frame_of(msg);
        let max_frame = usize::from(self.cfg.max_frame_out);
        let room = (OUTBOX - self.outbox_bytes()).min(max_frame);
        if frame.len() <= room {
            let (report, since) = match msg {
                Uplink::Reported(_) => (true, 2),
                Uplink::FirmwareStatus(_) => (false, 3),
                _ => (false, 1),
            };
            self.outbox.push_back(Queued {
                report,
                since,
                frame,
            });
            Ok(())
        } else if room < max_frame.min(OUTBOX) {
            Err(CompleteError::OutboxFull)
        } else {
            Err(CompleteError::TooLarge)
        }
    }

    fn complete(
        &mut self,
        id: u32,
        status: CommandStatus,
        values: &[Reading<'_>],
    ) -> Result<(), CompleteError> {
        let Some(i) = self.recent.iter().position(|r| *r == Recent::Running(id)) else {
            return Err(CompleteError::NotRunning);
        };
        let Ok(values) = Readings::from_slice(values) else {
            return Err(CompleteError::TooLarge);
        };
        self.push_result(&Uplink::CommandResult(CommandResult { id, status, values }))?;
        self.recent[i] = Recent::Done(id, status);
        Ok(())
    }

    /// `report_state`: queued like a result, with the desired version held now; it
    /// stands for the report that is due.
    fn report_state(&mut self, values: &[Reading<'_>]) -> Result<(), CompleteError> {
        let Ok(values) = Readings::from_slice(values) else {
            return Err(CompleteError::TooLarge);
        };
        self.push_result(&Uplink::Reported(Reported {
            desired_version: self.desired_version,
            values,
        }))?;
        self.report_due = false;
        Ok(())
    }

    /// `request_firmware`: replaces the request waiting, its length cut to what one
    /// chunk can bring (at least 1).
    fn request_firmware(&mut self, id: u32, offset: u32, len: u16) {
        let most = u16::try_from(chunk_len(self.cfg.max_frame_in)).unwrap_or(u16::MAX);
        self.fw_request = Some(FirmwareRequest {
            id,
            offset,
            len: len.clamp(1, most.max(1)),
        });
        self.fw_called = true;
    }

    /// `firmware_status`: withdraws a request for the same id, queues the status like
    /// a result.
    fn firmware_status(&mut self, id: u32, outcome: FirmwareOutcome) -> Result<(), CompleteError> {
        if self.fw_request.is_some_and(|r| r.id == id) {
            self.fw_request = None;
        }
        self.push_result(&Uplink::FirmwareStatus(FirmwareStatus { id, outcome }))
    }

    fn acknowledge(&mut self, seq: Seq) {
        while self.ring.front().is_some_and(|(s, _)| *s <= seq) {
            self.ring.pop_front();
        }
        if self.acked.is_none_or(|a| seq > a) {
            self.acked = Some(seq);
            self.event(Event::Acked { seq });
        }
    }

    /// The bounds of the reconnect time after going down for `reason` now; `None`:
    /// never. Updates the backoff state as the client does.
    fn down_bounds(&mut self, reason: &Disconnect) -> Option<(Millis, Millis)> {
        if reason.is_fatal() {
            return None;
        }
        let (half, base) = self.cfg.backoff_window(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        let replaced = matches!(
            reason,
            Disconnect::Goodbye {
                reason: GoodbyeReason::Replaced,
                ..
            }
        );
        let (lo, hi) = if replaced {
            (self.cfg.backoff_max_ms, self.cfg.backoff_max_ms)
        } else {
            let ra = std::mem::take(&mut self.retry_after_ms);
            (half.max(ra), base.max(ra))
        };
        Some((self.now.saturating_add(lo), self.now.saturating_add(hi)))
    }
}

// ----------------------------------------------------------------------------------
// The harness: the client and the model side by side.

struct Harness<'w, const RING: usize, const OUTBOX: usize> {
    client: Client<RING, OUTBOX>,
    m: Model<RING, OUTBOX>,
    tx_len: usize,
    wire: &'w [u8],
    rx: Vec<u8>,
    /// The transmit buffer, grown to the largest `Op::Transmit` asks for.
    tx: Vec<u8>,
    /// Commands handed to the application and not answered yet.
    commands: Vec<u32>,
    /// Firmware offers handed to the application (their ids, newest last).
    offers: Vec<u32>,
    /// The epilogue's application answers firmware messages as an updater does.
    auto_firmware: bool,
}

fn run<const RING: usize, const OUTBOX: usize>(script: &Script<'_>) {
    let (cfg, tx_len) = config(&script.config);
    let mut h = Harness::<RING, OUTBOX> {
        client: Client::new(cfg),
        m: Model::new(cfg),
        tx_len,
        wire: script.wire,
        rx: Vec::new(),
        tx: Vec::new(),
        commands: Vec::new(),
        offers: Vec::new(),
        auto_firmware: false,
    };
    h.check_state();
    for op in &script.ops {
        h.op(*op);
        h.check_state();
    }
    // The epilogue: a driver with an application that queues a record per round and
    // fetches offered firmware.
    h.auto_firmware = true;
    for round in 0..32u64 {
        if !h.client.is_connected() {
            if h.client.poll_connect().is_none() {
                break;
            }
            h.op(Op::Connect);
        }
        h.op(Op::Send {
            readings: 1,
            kind: 2,
            value: round,
            time_ms: None,
        });
        h.op(Op::TransmitAll);
        h.op(Op::Read(u16::MAX));
        h.op(Op::TransmitAll);
        h.op(Op::Events);
        h.check_state();
        if h.wire.is_empty() {
            break;
        }
    }
    h.op(Op::Events);
    h.check_state();
}

impl<const RING: usize, const OUTBOX: usize> Harness<'_, RING, OUTBOX> {
    fn op(&mut self, op: Op) {
        match op {
            Op::Connect => {
                if let MLink::Down { at: Some(at) } = self.m.link {
                    self.m.now = self.m.now.max(at);
                    self.connected();
                }
            }
            Op::ConnectFailed => {
                self.client.handle_connect_failed(self.m.now);
                if let MLink::Down { at: Some(_) } = self.m.link {
                    self.down(Disconnect::Closed);
                }
            }
            Op::Read(n) => self.read(usize::from(n)),
            Op::Closed => self.closed(),
            Op::Advance(ms) => {
                self.m.now = self.m.now.saturating_add(Millis::from(ms));
                self.timeout();
            }
            Op::AdvanceToTimeout => {
                if let Some(t) = self.client.poll_timeout() {
                    self.m.now = self.m.now.max(t);
                }
                self.timeout();
            }
            Op::Send {
                readings: count,
                kind,
                value,
                time_ms,
            } => {
                let list = readings(count, kind, value);
                let expected = self.m.send_telemetry(time_ms, &list);
                let got = self.client.send_telemetry(time_ms, &list);
                assert_eq!(got, expected, "send_telemetry");
            }
            Op::Complete {
                which,
                status,
                values,
            } => {
                let id = if self.commands.is_empty() || which >= 200 {
                    u32::from(which)
                } else {
                    self.commands[usize::from(which) % self.commands.len()]
                };
                let status = [
                    CommandStatus::Succeeded,
                    CommandStatus::Failed,
                    CommandStatus::UnknownCommand,
                    CommandStatus::InvalidArguments,
                    CommandStatus::Expired,
                ][usize::from(status) % 5];
                let list = readings(values, status as u8, u64::from(id));
                let expected = self.m.complete(id, status, &list);
                let got = self.client.complete_command(id, status, &list);
                assert_eq!(got, expected, "complete_command({id})");
                if got.is_ok() {
                    self.commands.retain(|c| *c != id);
                }
            }
            Op::Transmit(len) => {
                let len = len.map_or(self.tx_len, usize::from);
                self.transmit(len);
            }
            Op::TransmitAll => {
                // Each call either sends or returns None; a bound for safety.
                for _ in 0..10_000 {
                    if !self.transmit(self.tx_len) {
                        break;
                    }
                }
            }
            Op::Events => {
                while let Some(e) = self.client.poll_event() {
                    let expected = self.m.events.pop_front();
                    assert_eq!(Some(&e), expected.as_ref(), "poll_event");
                    if let Event::Acked { seq } = e {
                        assert!(
                            self.m.last_acked_event.is_none_or(|a| seq > a),
                            "Acked events go backwards"
                        );
                        self.m.last_acked_event = Some(seq);
                    }
                }
                assert!(self.m.events.is_empty(), "events lost: {:?}", self.m.events);
            }
            Op::Report {
                values,
                kind,
                value,
            } => {
                let list = readings(values, kind, value);
                let expected = self.m.report_state(&list);
                let got = self.client.report_state(&list);
                assert_eq!(got, expected, "report_state");
            }
            Op::SetDesiredVersion(v) => {
                self.client.set_desired_version(v);
                self.m.desired_version = v;
                self.m.app_desired = v;
            }
            Op::RequestFirmware { which, offset, len } => {
                let id = self.offer_id(which);
                self.request_firmware(id, offset, len);
            }
            Op::FirmwareStatus { which, outcome } => {
                let id = self.offer_id(which);
                self.firmware_status(id, OUTCOMES[usize::from(outcome) % OUTCOMES.len()]);
            }
        }
    }

    /// An offer the application was handed, or `which` itself.
    fn offer_id(&self, which: u8) -> u32 {
        if self.offers.is_empty() || which >= 200 {
            u32::from(which)
        } else {
            self.offers[usize::from(which) % self.offers.len()]
        }
    }

    fn request_firmware(&mut self, id: u32, offset: u32, len: u16) {
        self.m.request_firmware(id, offset, len);
        self.client.request_firmware(id, offset, len);
    }

    fn firmware_status(&mut self, id: u32, outcome: FirmwareOutcome) {
        let expected = self.m.firmware_status(id, outcome);
        let got = self.client.firmware_status(id, outcome);
        assert_eq!(got, expected, "firmware_status({id}, {outcome:?})");
    }

    fn connected(&mut self) {
        self.client.handle_connected(self.m.now);
        self.m.link = MLink::Hello {
            sent: false,
            deadline: self.m.now.saturating_add(self.m.cfg.welcome_timeout_ms),
        };
        // A request of the last connection is not carried over (the offer comes again).
        self.m.fw_request = None;
        self.m.cursor = None;
        self.m.sent_on_connection = 0;
        self.m.last_sent_seq = None;
        self.m.report_owed = false;
        self.rx.clear();
    }

    fn closed(&mut self) {
        self.client.handle_closed(self.m.now);
        if !matches!(self.m.link, MLink::Down { .. }) {
            self.down(Disconnect::Closed);
        }
    }

    /// The client went down (or should have) for `reason`: checks when it reconnects.
    fn down(&mut self, reason: Disconnect) {
        let bounds = self.m.down_bounds(&reason);
        let at = self.client.poll_connect();
        match (bounds, at) {
            (None, None) => {}
            (Some((lo, hi)), Some(at)) => assert!(
                (lo..=hi).contains(&at),
                "reconnect at {at}, expected {lo}..={hi} after {reason:?}"
            ),
            _ => panic!("reconnect {at:?}, expected {bounds:?} after {reason:?}"),
        }
        assert!(!self.client.is_connected());
        self.m.link = MLink::Down { at };
        self.m.event(Event::Disconnected {
            reason,
            reconnect_at: at,
        });
        self.rx.clear();
    }

    fn timeout(&mut self) {
        let now = self.m.now;
        let expected = match self.m.link {
            MLink::Hello { deadline, .. } if now >= deadline => Err(Disconnect::WelcomeTimeout),
            MLink::Open(s) => match s.ping {
                Some((_, sent)) if now >= sent.max(s.last_rx).saturating_add(s.heartbeat_ms) => {
                    Err(Disconnect::DeadPeer)
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        };
        let got = self.client.handle_timeout(now);
        assert_eq!(got, expected, "handle_timeout({now})");
        if let Err(reason) = got {
            self.down(reason);
        }
    }

    /// Reads up to `n` more bytes into the receive buffer (`max_frame_in` bytes, as the
    /// driver's) and handles every complete frame, as the driver's read loop does.
    fn read(&mut self, n: usize) {
        if !self.client.is_connected() {
            let got = self.client.handle_input(self.m.now, self.wire);
            assert_eq!(got, Err(Disconnect::Closed), "input while disconnected");
            return;
        }
        let cap = usize::from(self.m.cfg.max_frame_in);
        let take = n.min(self.wire.len()).min(cap - self.rx.len());
        let (chunk, rest) = self.wire.split_at(take);
        self.wire = rest;
        self.rx.extend_from_slice(chunk);
        let rx = std::mem::take(&mut self.rx);
        let mut start = 0;
        while start < rx.len() {
            match self.input(&rx[start..]) {
                Some(len) => start += len,
                None => break,
            }
        }
        if self.client.is_connected() {
            self.rx = rx[start..].to_vec();
            if self.rx.len() == cap {
                // A full buffer without a whole frame: the driver ends the session.
                self.closed();
            }
        }
    }

    /// One `handle_input`; `Some(len)` if a frame was consumed.
    fn input(&mut self, bytes: &[u8]) -> Option<usize> {
        let now = self.m.now;
        let got = self.client.handle_input(now, bytes);
        let frame = match proto::split_frame(bytes, usize::from(self.m.cfg.max_frame_in)) {
            Ok(None) => {
                assert_eq!(got, Ok(Input::NeedMore));
                return None;
            }
            Err(e) => {
                assert_eq!(got, Err(Disconnect::BadFrame(e)));
                self.down(Disconnect::BadFrame(e));
                return None;
            }
            Ok(Some(f)) => f,
        };
        let msg = match proto::decode_downlink(frame.body) {
            Ok(msg) => msg,
            Err(e) => {
                assert_eq!(got, Err(Disconnect::BadMessage(e.clone())));
                self.down(Disconnect::BadMessage(e));
                return None;
            }
        };
        // Before `Welcome` a connection counts as version 1.
        let version = match &mut self.m.link {
            MLink::Open(s) => {
                s.last_rx = now;
                s.version
            }
            _ => 1,
        };
        if since_version(&msg) > version {
            self.expect_down(got, Disconnect::Unexpected);
            return None;
        }
        let mut command = None;
        let mut desired = None;
        let mut firmware = None;
        match &msg {
            Downlink::Welcome(w) => {
                if !matches!(self.m.link, MLink::Hello { sent: true, .. }) {
                    self.expect_down(got, Disconnect::Unexpected);
                    return None;
                }
                // min_version 0 means 1: there is no version 0.
                let lowest = self.m.cfg.min_version.max(1);
                if w.version < lowest || w.version > PROTOCOL_VERSION {
                    self.expect_down(got, Disconnect::UnsupportedVersion(w.version));
                    return None;
                }
                if w.max_frame < MIN_MAX_FRAME {
                    self.expect_down(got, Disconnect::MaxFrameTooSmall(w.max_frame));
                    return None;
                }
                self.m.link = MLink::Open(MSession {
                    version: w.version,
                    peer_max: usize::from(w.max_frame),
                    heartbeat_ms: Millis::from(w.heartbeat_s.max(1)) * 1000,
                    last_tx: now,
                    last_rx: now,
                    ping: None,
                });
                self.m.attempts = 0;
                self.m.retry_after_ms = 0;
                if let Some(last) = w.last_acked {
                    self.m.acknowledge(last);
                }
                self.m.cursor = None;
                // Version 2: the gateway learns the desired version held from a report.
                self.m.report_due = w.version >= 2;
                self.m.report_owed = w.version >= 2;
                self.m.event(Event::Connected {
                    last_acked: w.last_acked,
                    server_time_ms: w.server_time_ms,
                    version: w.version,
                });
            }
            Downlink::Desired(d) => {
                // Unreachable after the version check (a connection without a session
                // counts as version 1), but the rule of its own.
                if !self.m.is_open() {
                    self.expect_down(got, Disconnect::Unexpected);
                    return None;
                }
                // Applied or not, the gateway hears which version the device holds.
                self.m.report_due = true;
                self.m.report_owed = true;
                if d.base == 0 || (d.base == self.m.desired_version && d.version > d.base) {
                    self.m.desired_version = d.version;
                    desired = Some(d.clone());
                } else {
                    // Changes to a version the device does not hold: reporting 0 asks
                    // for the whole document.
                    self.m.desired_version = 0;
                }
            }
            Downlink::Ack(a) => {
                if !self.m.is_open() {
                    self.expect_down(got, Disconnect::Unexpected);
                    return None;
                }
                self.m.acknowledge(a.seq);
            }
            Downlink::Pong(p) => {
                if let MLink::Open(s) = &mut self.m.link
                    && let Some((nonce, sent)) = s.ping
                    && nonce == p.nonce
                {
                    s.ping = None;
                    let rtt_ms = now.saturating_sub(sent);
                    self.m.event(Event::Pong { rtt_ms });
                }
            }
            Downlink::Goodbye(g) => {
                self.m.retry_after_ms = Millis::from(g.retry_after_s) * 1000;
                let reason = Disconnect::Goodbye {
                    reason: g.reason,
                    retry_after_s: g.retry_after_s,
                };
                self.expect_down(got, reason);
                return None;
            }
            Downlink::FirmwareOffer(_)
            | Downlink::FirmwareChunk(_)
            | Downlink::FirmwareCancel(_)
                if !self.m.is_open() =>
            {
                // Unreachable after the version check, as for `Desired`.
                self.expect_down(got, Disconnect::Unexpected);
                return None;
            }
            Downlink::FirmwareOffer(o) => firmware = Some(FirmwareMsg::Offer(o.clone())),
            Downlink::FirmwareChunk(c) => firmware = Some(FirmwareMsg::Chunk(c.clone())),
            Downlink::FirmwareCancel(c) => {
                // The request for a withdrawn offer is withdrawn too.
                if self.m.fw_request.is_some_and(|r| r.id == c.id) {
                    self.m.fw_request = None;
                }
                firmware = Some(FirmwareMsg::Cancel(c.id));
            }
            Downlink::Command(c) => {
                if !self.m.is_open() {
                    self.expect_down(got, Disconnect::Unexpected);
                    return None;
                }
                match self.m.recent.iter().find(|r| r.id() == c.id).copied() {
                    Some(Recent::Running(_)) => {}
                    Some(Recent::Done(id, status)) => {
                        let _ = self.m.push_result(&Uplink::CommandResult(CommandResult {
                            id,
                            status,
                            values: Readings::new(),
                        }));
                    }
                    None => {
                        if self.m.recent.len() == RECENT_COMMANDS {
                            match self
                                .m
                                .recent
                                .iter()
                                .position(|r| matches!(r, Recent::Done(..)))
                            {
                                Some(i) => {
                                    self.m.recent.remove(i);
                                }
                                None => {
                                    let evicted = self.m.recent.pop_front();
                                    // The application may still answer it: it is no
                                    // longer running as far as the client knows.
                                    if let Some(Recent::Running(id)) = evicted {
                                        self.commands.retain(|c| *c != id);
                                    }
                                }
                            }
                        }
                        self.m.recent.push_back(Recent::Running(c.id));
                        command = Some(c.clone());
                    }
                }
            }
        }
        match (got, desired, firmware) {
            (Ok(Input::Frame { len, command: got }), None, None) => {
                assert_eq!(len, frame.len);
                assert_eq!(got, command, "command handed over");
                if let Some(c) = got {
                    // §8.3: never handed over while it is still a recent command.
                    assert!(!self.commands.contains(&c.id), "command {} twice", c.id);
                    self.commands.push(c.id);
                }
                Some(len)
            }
            (Ok(Input::Desired { len, desired: got }), Some(expected), None) => {
                assert_eq!(len, frame.len);
                assert_eq!(got, expected, "desired handed over");
                // Changes are only useful on top of what the application holds.
                assert!(
                    got.base == 0 || (got.base == self.m.app_desired && got.version > got.base),
                    "desired {} on base {} handed over, the application holds {}",
                    got.version,
                    got.base,
                    self.m.app_desired
                );
                self.m.app_desired = got.version;
                Some(len)
            }
            (Ok(Input::Firmware { len, firmware: got }), None, Some(expected)) => {
                assert_eq!(len, frame.len);
                assert_eq!(got, expected, "firmware message handed over");
                self.firmware(&got);
                Some(len)
            }
            (other, desired, firmware) => panic!(
                "handle_input: {other:?}, expected a frame of {msg:?} (desired handed over: {}, \
                 firmware handed over: {})",
                desired.is_some(),
                firmware.is_some()
            ),
        }
    }

    /// The application gets a firmware message; in the epilogue it answers as an
    /// updater does: from 0 after an offer, the next piece after a chunk, `Verified`
    /// after an empty one.
    fn firmware(&mut self, msg: &FirmwareMsg<'_>) {
        if let FirmwareMsg::Offer(o) = msg {
            if self.offers.len() == 8 {
                self.offers.remove(0);
            }
            self.offers.push(o.id);
        }
        if !self.auto_firmware {
            return;
        }
        match msg {
            FirmwareMsg::Offer(o) => self.request_firmware(o.id, 0, u16::MAX),
            FirmwareMsg::Chunk(c) if c.data.is_empty() => {
                self.firmware_status(c.id, FirmwareOutcome::Verified);
            }
            FirmwareMsg::Chunk(c) => {
                let next = c.offset.saturating_add(c.data.len() as u32);
                self.request_firmware(c.id, next, u16::MAX);
            }
            FirmwareMsg::Cancel(_) => {}
        }
    }

    /// `handle_input` said `got`; the model says the client went down for `reason`.
    fn expect_down(&mut self, got: Result<Input<'_>, Disconnect>, reason: Disconnect) {
        assert_eq!(got, Err(reason.clone()), "handle_input");
        self.down(reason);
    }

    /// One `poll_transmit` with a `len`-byte buffer; whether it sent a frame.
    fn transmit(&mut self, len: usize) -> bool {
        let now = self.m.now;
        // Garbage in the buffer must not leak into a frame (no frame is longer than
        // MAX_UPLINK_FRAME, so the rest of the buffer is never read).
        if self.tx.len() < len {
            self.tx.resize(len, 0);
        }
        let buf = &mut self.tx[..len];
        buf[..len.min(MAX_UPLINK_FRAME + 64)].fill(0xa5);
        let got = self.client.poll_transmit(now, buf);
        let got_frame = got.map(|n| {
            assert!(n <= len, "{n}-byte frame in a {len}-byte buffer");
            buf[..n].to_vec()
        });
        let expected = self.expected_transmit(len);
        assert_eq!(got_frame, expected, "poll_transmit({now}, {len} bytes)");
        let Some(frame) = got_frame else {
            return false;
        };
        self.check_sent(&frame);
        true
    }

    /// The frame the model sends next, updating the model.
    fn expected_transmit(&mut self, len: usize) -> Option<Vec<u8>> {
        let now = self.m.now;
        let cfg = self.m.cfg;
        match &mut self.m.link {
            MLink::Down { .. } | MLink::Hello { sent: true, .. } => None,
            MLink::Hello { sent, .. } => {
                let frame = frame_of(&Uplink::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    boot_id: cfg.boot_id,
                    firmware: Text::truncating(cfg.firmware),
                    max_frame: cfg.max_frame_in.max(MIN_MAX_FRAME),
                }));
                if frame.len() > len {
                    return None;
                }
                *sent = true;
                Some(frame)
            }
            MLink::Open(s) => {
                let limit = s.peer_max.min(len);
                while let Some(q) = self.m.outbox.pop_front() {
                    // A version-1 gateway has no `Reported`, one below version 3 no
                    // `FirmwareStatus`; a frame over its limit or the buffer could
                    // never go: all are dropped.
                    if s.version < q.since {
                        continue;
                    }
                    if q.frame.len() <= limit {
                        s.last_tx = now;
                        return Some(q.frame);
                    }
                    // A dropped report leaves the version it carried owed: the
                    // plain report below goes instead.
                    if q.report {
                        self.m.report_due = true;
                    }
                }
                if self.m.report_due && s.version >= 2 {
                    let frame = frame_of(&Uplink::Reported(Reported {
                        desired_version: self.m.desired_version,
                        values: Readings::new(),
                    }));
                    // Too small a buffer: nothing this time, not even telemetry, so
                    // the report still comes first.
                    if frame.len() > limit {
                        return None;
                    }
                    self.m.report_due = false;
                    s.last_tx = now;
                    return Some(frame);
                }
                // Then the firmware request, in a version-3 session only (it waits for
                // one), before telemetry; a buffer too small for it stalls, as for the
                // report.
                if let Some(req) = self.m.fw_request
                    && s.version >= 3
                {
                    let frame = frame_of(&Uplink::FirmwareRequest(req));
                    if frame.len() > limit {
                        return None;
                    }
                    self.m.fw_request = None;
                    s.last_tx = now;
                    return Some(frame);
                }
                let mut skipped = Vec::new();
                let mut sent = None;
                for (seq, frame) in &self.m.ring {
                    if self.m.cursor.is_some_and(|c| *seq <= c) {
                        continue;
                    }
                    self.m.cursor = Some(*seq);
                    if frame.len() > s.peer_max || frame.len() > len {
                        skipped.push(*seq);
                        continue;
                    }
                    s.last_tx = now;
                    sent = Some(frame.clone());
                    break;
                }
                let mut ping = None;
                if sent.is_none()
                    && s.ping.is_none()
                    && now >= s.last_tx.min(s.last_rx).saturating_add(s.heartbeat_ms)
                {
                    self.m.nonce = self.m.nonce.wrapping_add(1);
                    let frame = frame_of(&Uplink::Ping(Ping {
                        nonce: self.m.nonce,
                    }));
                    if frame.len() <= len {
                        s.ping = Some((self.m.nonce, now));
                        s.last_tx = now;
                        ping = Some(frame);
                    }
                }
                for seq in skipped {
                    // Pushed without making room, unlike other events.
                    if self.m.events.len() < 8 {
                        self.m.events.push_back(Event::Skipped { seq });
                    }
                }
                sent.or(ping)
            }
        }
    }

    /// Protocol rules for a frame the client sent, independent of the model.
    fn check_sent(&mut self, frame: &[u8]) {
        let f = proto::split_frame(frame, MAX_UPLINK_FRAME)
            .expect("a valid frame header")
            .expect("a whole frame");
        assert_eq!(f.len, frame.len(), "exactly one frame");
        let msg = proto::decode_uplink(f.body).expect("a valid uplink message");
        let first = self.m.sent_on_connection == 0;
        self.m.sent_on_connection += 1;
        let max_out = usize::from(self.m.cfg.max_frame_out);
        // Within the gateway's limit, if the gateway announced a valid one: the client
        // takes a `Welcome.max_frame` below the protocol's minimum of 128 (§6.1) as it
        // comes, and its 7-byte `Ping` may then be over it.
        if let MLink::Open(s) = self.m.link
            && s.peer_max >= usize::from(MIN_MAX_FRAME)
        {
            assert!(
                frame.len() <= s.peer_max,
                "{} bytes over Welcome.max_frame {}",
                frame.len(),
                s.peer_max
            );
        }
        match msg {
            Uplink::Hello(h) => {
                assert!(first, "Hello is the first frame and is sent once");
                // The highest version: the gateway picks one it speaks too.
                assert_eq!(h.version, PROTOCOL_VERSION);
                assert!(h.max_frame >= MIN_MAX_FRAME);
                assert!(!self.m.is_open());
            }
            Uplink::Telemetry(t) => {
                assert!(self.m.is_open() && !first, "telemetry before Welcome");
                assert!(frame.len() <= max_out, "telemetry over max_frame_out");
                assert!(t.seq > 0);
                assert!(
                    !self.m.report_owed,
                    "telemetry before the Reported that is owed"
                );
                assert!(
                    self.m.last_sent_seq.is_none_or(|s| t.seq > s),
                    "seq {} after {:?} on one connection",
                    t.seq,
                    self.m.last_sent_seq
                );
                assert!(
                    self.m.acked.is_none_or(|a| t.seq > a)
                        || self.m.queued_below_acked.contains(&t.seq),
                    "seq {} was acked ({:?})",
                    t.seq,
                    self.m.acked
                );
                self.m.last_sent_seq = Some(t.seq);
            }
            Uplink::CommandResult(_) => {
                assert!(self.m.is_open() && !first, "result before Welcome");
                assert!(frame.len() <= max_out, "result over max_frame_out");
            }
            Uplink::Ping(_) => {
                assert!(self.m.is_open() && !first, "ping before Welcome");
                assert!(!self.m.report_owed, "ping before the Reported that is owed");
            }
            Uplink::Reported(r) => {
                assert!(self.m.is_open() && !first, "report before Welcome");
                assert!(
                    matches!(self.m.link, MLink::Open(s) if s.version >= 2),
                    "Reported in a version-1 session"
                );
                // Values come only through `report_state`, which keeps to
                // max_frame_out; the empty report the client sends on its own is, like
                // `Ping`, a few bytes that only the buffer bounds.
                assert!(
                    r.values.is_empty() || frame.len() <= max_out,
                    "report over max_frame_out"
                );
                self.m.report_owed = false;
            }
            Uplink::FirmwareRequest(r) => {
                assert!(
                    self.m.is_open() && !first,
                    "firmware request before Welcome"
                );
                assert!(
                    matches!(self.m.link, MLink::Open(s) if s.version >= 3),
                    "FirmwareRequest in a session below version 3"
                );
                assert!(
                    !self.m.report_owed,
                    "firmware request before the Reported that is owed"
                );
                assert!(
                    self.m.fw_called,
                    "a FirmwareRequest sent twice (one call, one request)"
                );
                self.m.fw_called = false;
                let most = chunk_len(self.m.cfg.max_frame_in);
                assert!(
                    r.len >= 1 && usize::from(r.len) <= most && usize::from(r.len) <= MAX_CHUNK_LEN,
                    "request of {} bytes, a chunk holds at most {most}",
                    r.len
                );
            }
            Uplink::FirmwareStatus(_) => {
                assert!(self.m.is_open() && !first, "firmware status before Welcome");
                assert!(
                    matches!(self.m.link, MLink::Open(s) if s.version >= 3),
                    "FirmwareStatus in a session below version 3"
                );
                assert!(frame.len() <= max_out, "status over max_frame_out");
            }
        }
    }

    /// The client's observable state against the model.
    fn check_state(&self) {
        let c = &self.client;
        let m = &self.m;
        assert_eq!(c.is_connected(), !matches!(m.link, MLink::Down { .. }));
        assert_eq!(c.is_open(), m.is_open());
        let u = c.unacked();
        assert_eq!(
            (u.records, u.bytes),
            (m.ring.len(), m.ring_bytes()),
            "unacked"
        );
        assert!(u.bytes <= RING, "the ring holds more than {RING} bytes");
        assert_eq!(c.acked(), m.acked, "acked");
        assert_eq!(c.desired_version(), m.desired_version, "desired_version");
        let version = match m.link {
            MLink::Open(s) => Some(s.version),
            _ => None,
        };
        assert_eq!(c.session_version(), version, "session_version");
        assert_eq!(
            c.firmware_chunk_len(),
            chunk_len(m.cfg.max_frame_in),
            "firmware_chunk_len"
        );
        assert_eq!(c.pending_results(), m.outbox.len(), "pending results");
        assert!(m.outbox_bytes() <= OUTBOX);
        let connect = match m.link {
            MLink::Down { at } => at,
            _ => None,
        };
        assert_eq!(c.poll_connect(), connect, "poll_connect");
        let timeout = match m.link {
            MLink::Down { at } => at,
            MLink::Hello { deadline, .. } => Some(deadline),
            MLink::Open(s) => Some(match s.ping {
                Some((_, sent)) => sent.max(s.last_rx).saturating_add(s.heartbeat_ms),
                None => s.last_tx.min(s.last_rx).saturating_add(s.heartbeat_ms),
            }),
        };
        assert_eq!(c.poll_timeout(), timeout, "poll_timeout");
    }
}
