//! The gateway's side of one device session as a deterministic state machine: no
//! sockets, no TLS, no runtime, no store. Its driver (`session/mod.rs`) does the I/O
//! and the store work it asks for; the pair tests (`session/pair_tests.rs`) drive it
//! against the real device client on a manual clock.
//!
//! ```text
//!   handle_bytes(now, bytes) ───►┌─────────────────────────┐──► transmit: frames for the device
//!   opened(now, Opened) ────────►│ Machine                 │──► poll_batch: records to commit
//!   handle_committed(now, done) ►│  Inbound (rules)        │──► poll_timeout: hello / idle deadline
//!   send_command(now, cmd) ─────►│  acks, commands in      │──► Fed.hello: open the session (store)
//!   handle_timeout(now) ────────►│  flight, goodbye        │──► Fed.results: record command results
//!   close(reason) ──────────────►└─────────────────────────┘──► Err(End): the session is over
//! ```
//!
//! The rules it owns (PROTOCOL.md §8): a record is acknowledged only after the commit
//! that holds it, and only up to the last record of that commit; replays at or below
//! `Welcome.last_acked` are acknowledged at once (they are stored); a `Ping` gets a
//! `Pong`; nothing but `Hello` within the hello timeout, then nothing at all for three
//! heartbeats, ends the session; one batch at the store at a time while the next fills,
//! and reading pauses when that one is full; at most [`MAX_COMMANDS_IN_FLIGHT`] commands
//! unanswered, and only the result of a command sent on this session is recorded.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use device_client::proto::{
    self, Ack, Blob, Command, CommandResult, Downlink, FIRMWARE_CHUNK_OVERHEAD, FirmwareCancel,
    FirmwareChunk, FirmwareId, FirmwareOutcome, FirmwareRequest, Goodbye, GoodbyeReason,
    MAX_CHUNK_LEN, MAX_DOWNLINK_FRAME, MIN_MAX_FRAME, Name, Pong, Seq, Welcome,
};

use crate::firmware::Image;
use crate::inbound::{Frame, HelloFields, Inbound, Stop, Violation};
use crate::state::Delta;
use crate::store::{Batch, BatchDone, CommandState, Opened, OutgoingCommand, StoreError};
use crate::values;

/// Commands in flight to one device at a time.
pub(crate) const MAX_COMMANDS_IN_FLIGHT: usize = 16;

/// Bytes queued for a device above which reading pauses until it reads: a device
/// asking for firmware chunks faster than it takes them (it should keep one request
/// outstanding) fills its own socket, not the gateway's memory.
const OUT_HIGH_WATER: usize = 2 * MAX_DOWNLINK_FRAME;

/// The settings a session obeys, shared by every session (one copy per gateway).
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// Largest frame accepted from a device, header included (`Welcome.max_frame`).
    pub max_frame: u16,
    /// Time for `Hello` after the handshake.
    pub hello_timeout: Duration,
    /// `Welcome.heartbeat_s`; three of them without a frame end the session.
    pub heartbeat: Duration,
    /// Records waiting for a commit before reading pauses.
    pub max_pending_records: usize,
    /// `Goodbye.retry_after_s` for ordinary closes.
    pub retry_after_s: u16,
    /// The highest protocol version this gateway speaks (`Welcome.version` is the
    /// lower of it and `Hello.version`).
    pub max_version: u8,
}

impl Rules {
    /// The rules of a gateway's configuration.
    pub(crate) fn of(c: &crate::Config) -> Self {
        Self {
            max_frame: c.max_frame,
            hello_timeout: c.hello_timeout,
            heartbeat: c.heartbeat,
            max_pending_records: c.max_pending_records,
            retry_after_s: c.retry_after_s,
            max_version: c.max_protocol_version,
        }
    }

    fn idle_timeout(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// The two clocks a session reads: a monotonic one for its deadlines, the wall clock
/// for what it stores and tells the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    /// Monotonic time.
    pub mono: Instant,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: i64,
}

impl Now {
    /// The clocks now.
    pub(crate) fn real() -> Self {
        Self {
            mono: Instant::now(),
            wall_ms: crate::store::now_ms(),
        }
    }
}

/// Why a command cannot go to this device; the driver fails it in the store with this
/// as its error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unsendable {
    /// No session is open (the device has not sent `Hello`, or has gone).
    #[error("the session is not open")]
    NotOpen,
    /// Its name or arguments break the protocol's bounds (checked when it was asked;
    /// a store edited by hand could still hold one).
    #[error("invalid name or arguments: {0}")]
    Invalid(#[from] proto::TextError),
    /// It does not fit the frame limit the device announced.
    #[error("{source} (the device accepts frames of up to {limit} bytes)")]
    TooLarge {
        /// The encoder's error.
        source: proto::EncodeError,
        /// The device's `max_frame`.
        limit: usize,
    },
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum End {
    /// The device closed the connection.
    #[error("closed by the device")]
    PeerClosed,
    /// The gateway sent `Goodbye`.
    #[error("goodbye: {}", .0.as_str())]
    Goodbye(GoodbyeReason),
    /// The device broke the protocol.
    #[error("protocol violation: {0}")]
    Violation(#[from] Violation),
    /// No `Hello` in time.
    #[error("no Hello within the hello timeout")]
    HelloTimeout,
    /// A write did not finish in time.
    #[error("write timed out")]
    WriteTimeout,
    /// The connection failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[source] Arc<StoreError>),
}

impl From<StoreError> for End {
    fn from(e: StoreError) -> Self {
        End::Store(Arc::new(e))
    }
}

impl From<Stop> for End {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Violation(v) => End::Violation(v),
            Stop::UnsupportedVersion(_) => End::Goodbye(GoodbyeReason::UnsupportedVersion),
            // Never after the first stop: the session ends at it.
            Stop::Stopped => End::PeerClosed,
        }
    }
}

impl End {
    /// The reason as the API and the metrics name it.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            End::PeerClosed => "closed",
            End::Goodbye(r) => r.as_str(),
            End::Violation(_) => "protocol_violation",
            End::HelloTimeout => "hello_timeout",
            End::WriteTimeout => "write_timeout",
            End::Io(_) => "io_error",
            End::Store(_) => "server_error",
        }
    }
}

/// What one [`Machine::handle_bytes`] found, for the driver to act on.
#[derive(Debug, Default)]
pub(crate) struct Fed {
    /// A `Hello`: the driver opens the session ([`Machine::opened`]) or refuses it.
    /// Nothing behind it is read until then.
    pub hello: Option<HelloFields>,
    /// New telemetry records (replays not counted).
    pub records: usize,
    /// Results of commands not in flight on this session: ignored, costing nothing.
    pub ignored_results: usize,
    /// Results of commands in flight, to record in the store.
    pub results: Vec<ResultToRecord>,
    /// The device's reports (version 2), merged: its values and the desired version it
    /// holds, to record in the store.
    pub reported: Option<(u32, serde_json::Map<String, serde_json::Value>)>,
    /// The device asked for the desired state ([`Machine::desired_base`]).
    pub wants_desired: bool,
    /// Firmware sent (version 3): the transfer's id and the end of the last chunk.
    pub firmware_sent: Option<(FirmwareId, u32)>,
    /// Image bytes those chunks carried.
    pub firmware_bytes: usize,
    /// How firmware transfers ended on the device, as it said.
    pub firmware_status: Vec<(FirmwareId, FirmwareOutcome)>,
}

/// A command's result to record.
#[derive(Debug)]
pub(crate) struct ResultToRecord {
    /// The command's id in the store.
    pub id: i64,
    /// Its final state.
    pub state: CommandState,
    /// The device's status word.
    pub status: &'static str,
    /// The device's values.
    pub values: serde_json::Value,
}

/// What a commit did, for the driver's metrics.
#[derive(Debug, Default)]
pub(crate) struct Committed {
    /// Records stored.
    pub inserted: usize,
    /// Records that were stored already.
    pub duplicates: usize,
    /// From the arrival of the oldest record acked to its ack.
    pub ack_latency: Option<Duration>,
    /// The seq acknowledged.
    pub acked: Option<Seq>,
}

/// State of an open session.
#[derive(Debug)]
struct Open {
    /// The session's protocol version.
    version: u8,
    /// The desired version the device holds, or will once what was sent arrives;
    /// `None` until its first `Reported` (version 2).
    desired: Option<u32>,
    device_key: i64,
    peer_max_frame: usize,
    /// Highest seq acked.
    acked: Option<Seq>,
    /// Commands sent and not answered.
    commands_in_flight: Vec<i64>,
    /// Records being filled while the other batch commits.
    filling: Box<Batch>,
    /// A batch at the store, if any.
    committing: bool,
    /// The other batch, back from the store (made at the first submit).
    spare: Option<Box<Batch>>,
    /// Arrival of the oldest record not yet acked, for the ack latency metric.
    oldest_unacked: Option<Instant>,
    /// The firmware image offered on this session, served chunk by chunk.
    firmware: Option<(FirmwareId, Arc<Image>)>,
}

/// The gateway's side of one session.
#[derive(Debug)]
pub(crate) struct Machine {
    rules: Arc<Rules>,
    /// The reading half: frames and the protocol's rules.
    inbound: Inbound,
    /// Frames for the device, not yet taken by the driver.
    out: Vec<u8>,
    open: Option<Open>,
    /// The hello deadline, then the idle one.
    deadline: Instant,
}

impl Machine {
    /// A connection whose handshake just finished.
    pub(crate) fn new(rules: Arc<Rules>, now: Now) -> Self {
        Self {
            inbound: Inbound::new(rules.max_frame),
            deadline: now.mono + rules.hello_timeout,
            rules,
            out: Vec::new(),
            open: None,
        }
    }

    /// Whether `Hello` was answered with `Welcome`.
    pub(crate) fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// The device's key in the store, once open.
    pub(crate) fn device_key(&self) -> Option<i64> {
        self.open.as_ref().map(|o| o.device_key)
    }

    /// Whether the driver should read: false while a full batch waits for its commit,
    /// or while the device leaves much unread.
    pub(crate) fn wants_input(&self) -> bool {
        self.out.len() < OUT_HIGH_WATER
            && self
                .open
                .as_ref()
                .is_none_or(|o| o.filling.records.len() < self.rules.max_pending_records)
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due.
    pub(crate) fn poll_timeout(&self) -> Instant {
        self.deadline
    }

    /// Bytes for the device, not yet written.
    pub(crate) fn transmit(&self) -> &[u8] {
        &self.out
    }

    /// The driver wrote the first `n` bytes of [`transmit`](Self::transmit).
    pub(crate) fn transmitted(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
        if self.out.is_empty() && self.out.capacity() > 512 {
            // A burst of commands passed; an idle session keeps no big buffer.
            self.out = Vec::new();
        }
    }

    /// Bytes from the device, in any pieces. On `Err` the session is over; a
    /// `Goodbye` is queued when the reason calls for one.
    pub(crate) fn handle_bytes(&mut self, now: Now, bytes: &[u8]) -> Result<Fed, End> {
        let mut fed = Fed::default();
        if !bytes.is_empty() {
            self.touch(now);
        }
        self.ingest(now, bytes, &mut fed)?;
        self.ack_replayed();
        Ok(fed)
    }

    /// The driver opened the session `fed.hello` asked for: `Welcome`, then the frames
    /// that came behind `Hello`. The driver next sends the device's commands
    /// ([`command_room`](Self::command_room), [`send_command`](Self::send_command)),
    /// those sent before included.
    pub(crate) fn opened(&mut self, now: Now, hello: &HelloFields, o: Opened) -> Result<Fed, End> {
        let version = hello.version.min(self.rules.max_version);
        let welcome = Welcome {
            version,
            heartbeat_s: u16::try_from(self.rules.heartbeat.as_secs()).unwrap_or(u16::MAX),
            last_acked: o.last_acked,
            server_time_ms: u64::try_from(now.wall_ms).unwrap_or(0),
            max_frame: self.rules.max_frame,
        };
        self.open = Some(Open {
            version,
            desired: None,
            device_key: o.device_key,
            peer_max_frame: usize::from(hello.max_frame),
            acked: o.last_acked,
            commands_in_flight: Vec::new(),
            filling: Batch::new(o.device_key, hello.boot_id),
            committing: false,
            spare: None,
            oldest_unacked: None,
            firmware: None,
        });
        self.queue(&Downlink::Welcome(welcome));
        self.touch(now);
        self.inbound.opened(version, o.last_acked);
        // Frames that came in the same read as Hello.
        self.handle_bytes(now, &[])
    }

    /// The session ends before it opened (or is told to end): `Goodbye{reason}` is
    /// queued. Returns the end to report.
    pub(crate) fn close(&mut self, reason: GoodbyeReason) -> End {
        self.goodbye(reason);
        End::Goodbye(reason)
    }

    /// The session ended for `end`: a protocol violation is answered with its
    /// `Goodbye`; a revoked device's records waiting for a commit are dropped (they are
    /// not acked, and a revoked certificate's data is not kept). What is left to
    /// commit comes out of [`poll_batch`](Self::poll_batch) as usual.
    pub(crate) fn ended(&mut self, end: &End) {
        if matches!(end, End::Violation(_)) {
            self.goodbye(GoodbyeReason::ProtocolViolation);
        }
        if matches!(end, End::Goodbye(GoodbyeReason::Revoked)) {
            self.discard_uncommitted();
        }
    }

    /// Drops the records waiting for a commit (not acked): the device's certificate
    /// was revoked, and its data from now on is not kept.
    pub(crate) fn discard_uncommitted(&mut self) {
        if let Some(open) = self.open.as_mut() {
            open.filling.clear();
        }
    }

    /// The deadline passed: the session is over (idle, or no `Hello`).
    pub(crate) fn handle_timeout(&mut self, now: Now) -> Result<(), End> {
        if now.mono < self.deadline {
            return Ok(());
        }
        if self.open.is_some() {
            Err(self.close(GoodbyeReason::IdleTimeout))
        } else {
            Err(End::HelloTimeout)
        }
    }

    /// Records to commit, if there are some and no other batch is at the store. The
    /// batch comes back through [`handle_committed`](Self::handle_committed).
    pub(crate) fn poll_batch(&mut self, now: Now) -> Option<Box<Batch>> {
        let open = self.open.as_mut()?;
        if open.committing || open.filling.is_empty() {
            return None;
        }
        // The second batch is made on the first submit: an idle session keeps one.
        let mut next = open
            .spare
            .take()
            .unwrap_or_else(|| Batch::new(open.device_key, open.filling.boot_id));
        next.clear();
        let mut batch = std::mem::replace(&mut open.filling, next);
        batch.received_ms = now.wall_ms;
        batch.submitted = Some(now.mono);
        open.committing = true;
        Some(batch)
    }

    /// Whether a batch is at the store.
    pub(crate) fn committing(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.committing)
    }

    /// The store answered for the batch: on success its records are acknowledged (one
    /// `Ack` for the last); on failure nothing is, and the session ends with
    /// `Goodbye{ServerError}` (the device replays).
    pub(crate) fn handle_committed(&mut self, now: Now, done: BatchDone) -> Result<Committed, End> {
        let Some(open) = self.open.as_mut() else {
            return Ok(Committed::default());
        };
        open.committing = false;
        let BatchDone { mut batch, result } = done;
        let inserted = match result {
            Ok(n) => n,
            Err(e) => {
                open.spare = Some(batch);
                self.goodbye(GoodbyeReason::ServerError);
                return Err(End::Store(e));
            }
        };
        let mut c = Committed {
            inserted,
            duplicates: batch.records.len().saturating_sub(inserted),
            ..Committed::default()
        };
        if let Some(last) = batch.records.last() {
            let seq = last.seq;
            if open.acked.is_none_or(|a| seq > a) {
                open.acked = Some(seq);
            }
            c.ack_latency = open
                .oldest_unacked
                .take()
                .map(|t| now.mono.saturating_duration_since(t));
            if !open.filling.is_empty() {
                open.oldest_unacked = Some(now.mono);
            }
            c.acked = Some(seq);
            self.queue(&Downlink::Ack(Ack { seq }));
        }
        batch.clear();
        if let Some(open) = self.open.as_mut() {
            open.spare = Some(batch);
        }
        Ok(c)
    }

    /// How many more commands may be sent now.
    pub(crate) fn command_room(&self) -> usize {
        self.open.as_ref().map_or(0, |o| {
            MAX_COMMANDS_IN_FLIGHT.saturating_sub(o.commands_in_flight.len())
        })
    }

    /// Sends a command taken from the store. `Err` says why it cannot go to this device
    /// (it does not fit the device's frame limit): the driver fails it in the store.
    pub(crate) fn send_command(
        &mut self,
        now: Now,
        cmd: &OutgoingCommand,
    ) -> Result<(), Unsendable> {
        if self.open.is_none() {
            return Err(Unsendable::NotOpen);
        }
        // A time to live over 49 days is sent as the longest the field holds.
        let ttl_ms = u32::try_from((cmd.expires_ms - now.wall_ms).max(1)).unwrap_or(u32::MAX);
        let name = Name::new(&cmd.name)?;
        let args = values::borrow_readings(&cmd.args)?;
        self.queue_checked(&Downlink::Command(Command {
            id: wire_id(cmd.id),
            name,
            args,
            ttl_ms,
        }))?;
        if let Some(open) = self.open.as_mut() {
            open.commands_in_flight.push(cmd.id);
        }
        Ok(())
    }

    /// The desired version to send changes from, once the device has said what it
    /// holds (its first `Reported`); `None` before that or in a version 1 session.
    pub(crate) fn desired_base(&self) -> Option<u32> {
        self.open
            .as_ref()
            .filter(|o| o.version >= 2)
            .and_then(|o| o.desired)
    }

    /// Sends changes of the desired state fetched for [`desired_base`](Self::desired_base).
    /// Changes fetched for another base than the device's now (it asked again
    /// meanwhile) are dropped: the driver fetches again for that one. Returns whether
    /// the changes were queued.
    pub(crate) fn send_desired(&mut self, delta: &Delta) -> Result<bool, Unsendable> {
        let Some(base) = self.desired_base() else {
            return Err(Unsendable::NotOpen);
        };
        if delta.base != 0 && delta.base != base {
            return Ok(false);
        }
        let msg = delta.message()?;
        self.queue_checked(&Downlink::Desired(msg))?;
        if let Some(open) = self.open.as_mut() {
            open.desired = Some(delta.version);
        }
        Ok(true)
    }

    /// The session's protocol version, once open.
    pub(crate) fn version(&self) -> Option<u8> {
        self.open.as_ref().map(|o| o.version)
    }

    /// Whether the session speaks the firmware transfer (version 3).
    pub(crate) fn speaks_firmware(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.version >= 3)
    }

    /// The firmware transfer this session serves, if any.
    pub(crate) fn firmware_offered(&self) -> Option<FirmwareId> {
        self.open.as_ref()?.firmware.as_ref().map(|(id, _)| *id)
    }

    /// Offers `image` as transfer `id` and serves the device's requests for it from
    /// then on (replacing an earlier offer of this session).
    pub(crate) fn offer_firmware(
        &mut self,
        id: FirmwareId,
        image: Arc<Image>,
    ) -> Result<(), Unsendable> {
        if !self.speaks_firmware() {
            return Err(Unsendable::NotOpen);
        }
        let offer = image.offer(id).ok_or(Unsendable::NotOpen)?;
        self.queue_checked(&Downlink::FirmwareOffer(offer))?;
        if let Some(open) = self.open.as_mut() {
            open.firmware = Some((id, image));
        }
        Ok(())
    }

    /// Withdraws transfer `id`: the device is told to drop it.
    pub(crate) fn cancel_firmware(&mut self, id: FirmwareId) {
        if !self.speaks_firmware() {
            return;
        }
        if let Some(open) = self.open.as_mut()
            && open.firmware.as_ref().is_some_and(|(f, _)| *f == id)
        {
            open.firmware = None;
        }
        self.queue(&Downlink::FirmwareCancel(FirmwareCancel { id }));
    }

    /// Answers a chunk request: the bytes of the image offered on this session, as
    /// many as asked, fit the device's frame limit and the protocol's bound; a request
    /// for an image not offered here is answered with `FirmwareCancel`.
    fn serve_firmware(&mut self, r: FirmwareRequest, fed: &mut Fed) {
        let Some(open) = self.open.as_ref() else {
            return;
        };
        let image = match &open.firmware {
            Some((id, image)) if *id == r.id => image.clone(),
            _ => {
                self.queue(&Downlink::FirmwareCancel(FirmwareCancel { id: r.id }));
                return;
            }
        };
        let room = open
            .peer_max_frame
            .saturating_sub(FIRMWARE_CHUNK_OVERHEAD)
            .min(MAX_CHUNK_LEN);
        let data = image.chunk(r.offset, usize::from(r.len).min(room));
        let Ok(data) = Blob::new(data) else {
            return;
        };
        self.queue(&Downlink::FirmwareChunk(FirmwareChunk {
            id: r.id,
            offset: r.offset,
            data,
        }));
        let end = r
            .offset
            .saturating_add(u32::try_from(data.len()).unwrap_or(0));
        fed.firmware_sent = Some((r.id, end));
        fed.firmware_bytes += data.len();
    }

    /// Resets the idle deadline: something arrived.
    fn touch(&mut self, now: Now) {
        if self.open.is_some() {
            self.deadline = now.mono + self.rules.idle_timeout();
        }
    }

    /// Handles the frames in `fresh` (after any leftover partial frame).
    fn ingest(&mut self, now: Now, fresh: &[u8], fed: &mut Fed) -> Result<(), End> {
        // Taken out for the call, so that handling a frame can use the rest of the
        // machine; `Inbound::new` allocates nothing.
        let mut inbound = std::mem::replace(&mut self.inbound, Inbound::new(0));
        let out = inbound.feed(fresh, |frame| {
            self.on_frame(now, frame, fed);
            Ok::<(), End>(())
        });
        self.inbound = inbound;
        match out {
            Ok(hello) => {
                fed.hello = hello;
                Ok(())
            }
            Err(End::Goodbye(GoodbyeReason::UnsupportedVersion)) => {
                Err(self.close(GoodbyeReason::UnsupportedVersion))
            }
            Err(e) => Err(e),
        }
    }

    /// A frame of the open session, its rules already checked (`Inbound`).
    fn on_frame(&mut self, now: Now, frame: Frame<'_>, fed: &mut Fed) {
        match frame {
            Frame::Telemetry { seq, time_ms, body } => {
                // `Inbound` hands out frames of open sessions only.
                let Some(open) = self.open.as_mut() else {
                    return;
                };
                let time_ms = time_ms
                    .and_then(|t| i64::try_from(t).ok())
                    .unwrap_or(now.wall_ms);
                if open.filling.is_empty() && open.oldest_unacked.is_none() {
                    open.oldest_unacked = Some(now.mono);
                }
                open.filling.push(seq, time_ms, body);
                fed.records += 1;
            }
            Frame::CommandResult(r) => match self.command_result(&r) {
                Some(rec) => fed.results.push(rec),
                None => fed.ignored_results += 1,
            },
            Frame::Ping(nonce) => self.queue(&Downlink::Pong(Pong { nonce })),
            Frame::Reported(r) => {
                let Some(open) = self.open.as_mut() else {
                    return;
                };
                // The first report says what the device holds; a later one with
                // version 0 says it lost it. Either asks for the desired state.
                if open.desired.is_none() || (r.desired_version == 0 && open.desired != Some(0)) {
                    fed.wants_desired = true;
                    open.desired = Some(r.desired_version);
                }
                let (version, values) = fed.reported.get_or_insert_default();
                *version = r.desired_version;
                values.extend(values::readings_to_json(&r.values));
            }
            Frame::FirmwareRequest(r) => self.serve_firmware(r, fed),
            Frame::FirmwareStatus(st) => {
                if let Some(open) = self.open.as_mut()
                    && open.firmware.as_ref().is_some_and(|(id, _)| *id == st.id)
                {
                    open.firmware = None;
                }
                fed.firmware_status.push((st.id, st.outcome));
            }
        }
    }

    /// Only a command sent on this session has a result to record (a re-sent one
    /// included: a new session sends every unanswered command again). Anything else
    /// costs no store work, however many the device sends.
    fn command_result(&mut self, r: &CommandResult<'_>) -> Option<ResultToRecord> {
        let open = self.open.as_mut()?;
        let at = open
            .commands_in_flight
            .iter()
            .position(|c| wire_id(*c) == r.id)?;
        let id = open.commands_in_flight.swap_remove(at);
        Some(ResultToRecord {
            id,
            state: crate::store::state_for(r.status),
            status: r.status.as_str(),
            values: serde_json::Value::Object(values::readings_to_json(&r.values)),
        })
    }

    /// Acknowledges replayed records that were stored before this session: one `Ack`
    /// for all of them, whatever the number. They come before any new record of the
    /// session, so this never acks past a record waiting for its commit.
    fn ack_replayed(&mut self) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let Some(seq) = self.inbound.take_replayed() else {
            return;
        };
        if open.acked.is_none_or(|a| seq > a) {
            open.acked = Some(seq);
        }
        self.queue(&Downlink::Ack(Ack { seq }));
    }

    /// Queues a frame for the device; frames that do not fit its limit are dropped
    /// with a log line (control messages always fit: PROTOCOL.md §6.1).
    fn queue(&mut self, msg: &Downlink<'_>) {
        if let Err(why) = self.queue_checked(msg) {
            tracing::warn!(%why, "frame dropped");
        }
    }

    fn queue_checked(&mut self, msg: &Downlink<'_>) -> Result<(), Unsendable> {
        let limit = self
            .open
            .as_ref()
            .map_or(usize::from(MIN_MAX_FRAME), |o| o.peer_max_frame);
        // Encoded on the stack, so the transmit buffer only ever grows to the frames
        // really queued: an ack is 5 bytes.
        let mut frame = [0u8; MAX_DOWNLINK_FRAME];
        let room = frame.len().min(limit);
        match proto::encode(msg, frame.get_mut(..room).unwrap_or_default()) {
            Ok(n) => {
                self.out
                    .extend_from_slice(frame.get(..n).unwrap_or_default());
                Ok(())
            }
            Err(source) => Err(Unsendable::TooLarge { source, limit }),
        }
    }

    fn goodbye(&mut self, reason: GoodbyeReason) {
        let retry_after_s = match reason {
            GoodbyeReason::Revoked | GoodbyeReason::UnsupportedVersion => 0,
            GoodbyeReason::ProtocolViolation => 60,
            _ => self.rules.retry_after_s,
        };
        self.queue(&Downlink::Goodbye(Goodbye {
            reason,
            retry_after_s,
        }));
    }
}

/// A command's id as the device sees it: the low 32 bits of the store's id. In a
/// fleet the store numbers commands from `slot × 2³²`; the low 32 bits of its rows are
/// still unique (store/fleet.rs), so a result maps back to one command.
pub(crate) fn wire_id(id: i64) -> u32 {
    (id & 0xFFFF_FFFF) as u32
}
