//! The sans-IO client state machine (PROTOCOL.md §8), in the style of quinn-proto's
//! `Connection`: it does no I/O, reads no clock and allocates nothing.
//!
//! ```text
//!            send_telemetry ─► ring (unacked records) ─┐
//!        complete_command ─► outbox (results) ─────────┤
//!                                                       ▼
//!  handle_connected(now) ─►  ┌────────────────┐ ─► poll_transmit(now, buf) ─► transport
//!  handle_input(now, bytes) ►│     Client      │ ─► poll_timeout()  ─► timer
//!  handle_timeout(now) ─────►│ (Disconnected → │ ─► poll_event()    ─► application
//!  handle_closed(now) ──────►│  Hello → Open)  │ ─► poll_connect(now) ─► connector
//!                            └────────────────┘
//! ```
//!
//! Time is milliseconds on any monotonic clock the caller likes ([`Millis`]); the wall
//! clock only appears in telemetry timestamps the application chooses.
//!
//! Memory: `RING` bytes of records (each costs 4 + its frame), `OUTBOX` bytes of pending
//! command results, and about 200 bytes of state. A record of `n` `f32` readings with
//! names of `k` bytes takes about `14 + n·(k + 6)` bytes.

mod ring;

use heapless::{Deque, Vec};

use crate::proto::{
    self, CommandId, CommandResult, CommandStatus, DecodeError, Desired, Downlink,
    FIRMWARE_CHUNK_OVERHEAD, FirmwareChunk, FirmwareId, FirmwareOffer, FirmwareOutcome,
    FirmwareRequest, FirmwareStatus, FrameError, GoodbyeReason, HEADER_LEN, Hello, MAX_CHUNK_LEN,
    MIN_MAX_FRAME, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Ping, Reading, Readings, Reported, Seq,
    Telemetry, Text, Uplink,
};
use ring::{PushError, Ring};

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

/// How many recently seen command ids the client remembers (PROTOCOL.md §8.3).
pub const RECENT_COMMANDS: usize = 8;

/// Records kept until the gateway acks them ([`Client::unacked`]).
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Unacked {
    /// How many.
    pub records: usize,
    /// The bytes they take in the ring.
    pub bytes: usize,
}

/// Settings of a [`Client`]: [`Config::new`], then the `with_*` methods (usable in a
/// `const`, so a firmware's settings can live in flash) or the public fields.
/// `#[non_exhaustive]`: a new setting (with a default) is not a breaking change.
///
/// ```
/// use device_client::machine::Config;
/// const CONFIG: Config = Config::new(0x1234, "fw-1.0")
///     .with_frames(1024, 512)
///     .with_backoff_ms(500, 5_000);
/// assert_eq!(CONFIG.max_frame_in, 1024);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// This boot's id: random per boot (PROTOCOL.md §5.1).
    pub boot_id: u64,
    /// Firmware version for `Hello` (cut to 32 bytes).
    pub firmware: &'static str,
    /// The largest frame the device can receive (its receive buffer); sent in `Hello`.
    pub max_frame_in: u16,
    /// The largest frame the device will send (its transmit buffer); a record that
    /// encodes larger is refused by [`Client::send_telemetry`].
    pub max_frame_out: u16,
    /// First reconnect delay; doubles per failed attempt.
    pub backoff_min_ms: Millis,
    /// Longest reconnect delay.
    pub backoff_max_ms: Millis,
    /// Time allowed from connect to `Welcome`.
    pub welcome_timeout_ms: Millis,
    /// Seeds the reconnect jitter; use a different value per device (e.g. from the
    /// hardware RNG) so that a fleet does not reconnect in lockstep.
    pub jitter_seed: u64,
    /// The lowest protocol version the device accepts in `Welcome` (1 to 3). A device
    /// that cannot work without version 2's messages (its settings come only as a
    /// desired state, say) sets 2: a gateway that answers with version 1 is then
    /// refused with [`Disconnect::UnsupportedVersion`], which is fatal.
    pub min_version: u8,
}

impl Config {
    /// Defaults: receive and transmit up to 512-byte frames, reconnect after 1 s
    /// doubling to 60 s, 10 s for `Welcome`.
    pub const fn new(boot_id: u64, firmware: &'static str) -> Self {
        Self {
            boot_id,
            firmware,
            max_frame_in: 512,
            max_frame_out: 512,
            backoff_min_ms: 1_000,
            backoff_max_ms: 60_000,
            welcome_timeout_ms: 10_000,
            jitter_seed: boot_id,
            min_version: MIN_PROTOCOL_VERSION,
        }
    }

    /// The lowest protocol version accepted in `Welcome` (default 1).
    #[must_use]
    pub const fn with_min_version(mut self, version: u8) -> Self {
        self.min_version = version;
        self
    }

    /// The largest frames received (`max_frame_in`, the receive buffer) and sent
    /// (`max_frame_out`, the transmit buffer).
    #[must_use]
    pub const fn with_frames(mut self, max_frame_in: u16, max_frame_out: u16) -> Self {
        self.max_frame_in = max_frame_in;
        self.max_frame_out = max_frame_out;
        self
    }

    /// The first and the longest reconnect delay.
    #[must_use]
    pub const fn with_backoff_ms(mut self, min: Millis, max: Millis) -> Self {
        self.backoff_min_ms = min;
        self.backoff_max_ms = max;
        self
    }

    /// Time allowed from connect to `Welcome`.
    #[must_use]
    pub const fn with_welcome_timeout_ms(mut self, ms: Millis) -> Self {
        self.welcome_timeout_ms = ms;
        self
    }

    /// Seeds the reconnect jitter (default: the boot id).
    #[must_use]
    pub const fn with_jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = seed;
        self
    }

    /// The window `(earliest, latest)` in which the reconnect after `failures`
    /// consecutive failed attempts falls (0 for the first reconnect): the delay doubles
    /// from `backoff_min_ms` up to `backoff_max_ms`, and half of it is random ("equal
    /// jitter"), so a fleet that went down together does not come back together. A
    /// `Goodbye` with retry-after or `Replaced` moves the window (PROTOCOL.md §8.5).
    ///
    /// ```
    /// use device_client::machine::Config;
    /// let cfg = Config::new(7, "fw-1").with_backoff_ms(1_000, 60_000);
    /// assert_eq!(cfg.backoff_window(0), (500, 1_000));
    /// assert_eq!(cfg.backoff_window(3), (4_000, 8_000));
    /// assert_eq!(cfg.backoff_window(40), (30_000, 60_000));
    /// ```
    #[must_use]
    pub const fn backoff_window(&self, failures: u32) -> (Millis, Millis) {
        let exp = if failures < 20 { failures } else { 20 };
        let doubled = self.backoff_min_ms.saturating_mul(1 << exp);
        let capped = if doubled < self.backoff_max_ms {
            doubled
        } else {
            self.backoff_max_ms
        };
        let latest = if capped > 1 { capped } else { 1 };
        (latest / 2, latest)
    }
}

/// Why the client will not (or no longer) use a connection.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disconnect {
    /// The gateway sent `Goodbye`.
    Goodbye {
        /// Its reason.
        reason: GoodbyeReason,
        /// Seconds it asked us to wait.
        retry_after_s: u16,
    },
    /// The transport closed or failed.
    Closed,
    /// No `Welcome` within `welcome_timeout_ms`.
    WelcomeTimeout,
    /// Nothing arrived for a heartbeat interval after a `Ping`.
    DeadPeer,
    /// The gateway broke the framing.
    BadFrame(FrameError),
    /// The gateway sent an undecodable message.
    BadMessage(DecodeError),
    /// A message that makes no sense now (e.g. `Ack` before `Welcome`).
    Unexpected,
    /// The gateway chose a protocol version this client does not speak, or one below
    /// its `Config::min_version`.
    UnsupportedVersion(u8),
    /// The gateway announced a `max_frame` below the protocol's minimum
    /// ([`MIN_MAX_FRAME`]): nothing could be sent to it.
    MaxFrameTooSmall(u16),
    /// The driver was given receive or transmit buffers smaller than the client's
    /// `max_frame_in` / `max_frame_out` (what they must hold): a frame would not fit,
    /// and reconnecting would not help.
    BuffersTooSmall {
        /// Bytes the receive buffer must hold (`max_frame_in`).
        rx_needed: u16,
        /// Bytes the transmit buffer must hold (`max_frame_out`).
        tx_needed: u16,
    },
}

impl Disconnect {
    /// A short lowercase name for logs without `core::fmt`: the `Goodbye` reason's
    /// ([`GoodbyeReason::as_str`]), or `closed`, `welcome_timeout`, `dead_peer`,
    /// `bad_frame`, `bad_message`, `unexpected_message`, `unsupported_version`,
    /// `max_frame_too_small`, `buffers_too_small`.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Disconnect::Goodbye { reason, .. } => reason.as_str(),
            Disconnect::Closed => "closed",
            Disconnect::WelcomeTimeout => "welcome_timeout",
            Disconnect::DeadPeer => "dead_peer",
            Disconnect::BadFrame(_) => "bad_frame",
            Disconnect::BadMessage(_) => "bad_message",
            Disconnect::Unexpected => "unexpected_message",
            Disconnect::UnsupportedVersion(_) => "unsupported_version",
            Disconnect::MaxFrameTooSmall(_) => "max_frame_too_small",
            Disconnect::BuffersTooSmall { .. } => "buffers_too_small",
        }
    }

    /// Whether reconnecting is pointless (revoked, wrong version, buffers too small).
    #[must_use]
    pub const fn is_fatal(&self) -> bool {
        matches!(
            self,
            Disconnect::Goodbye {
                reason: GoodbyeReason::Revoked | GoodbyeReason::UnsupportedVersion,
                ..
            } | Disconnect::UnsupportedVersion(_)
                | Disconnect::BuffersTooSmall { .. }
        )
    }
}

/// Something the application may want to know.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The gateway accepted the session.
    Connected {
        /// What it already had of this boot.
        last_acked: Option<Seq>,
        /// Its clock, ms since the Unix epoch: set the device clock from it if needed.
        server_time_ms: u64,
        /// The session's protocol version: 1 means no state document, below 3 no
        /// firmware transfer.
        version: u8,
    },
    /// Records up to `seq` are durable; their ring space is free.
    Acked {
        /// Highest acked seq.
        seq: Seq,
    },
    /// A record is larger than this gateway accepts: it is skipped, and leaves the ring
    /// when a later record is acked.
    Skipped {
        /// Its seq.
        seq: Seq,
    },
    /// The session ended; the client will reconnect at `reconnect_at` unless `fatal`.
    Disconnected {
        /// Why.
        reason: Disconnect,
        /// When the next attempt is due (`None`: never).
        reconnect_at: Option<Millis>,
    },
    /// Round trip of a heartbeat.
    Pong {
        /// Milliseconds from `Ping` to `Pong`.
        rtt_ms: Millis,
    },
}

/// What a chunk of input held.
// The command lives on the stack for one call; boxing would need an allocator.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Input<'b> {
    /// No complete frame at the front: read more, keep these bytes.
    NeedMore,
    /// One frame of `len` bytes was handled; drop it from the buffer. A new command is
    /// handed over here, borrowing the buffer, for the application to run and then
    /// answer with [`Client::complete_command`].
    Frame {
        /// Bytes consumed.
        len: usize,
        /// A command to run, if the frame was a new one.
        command: Option<proto::Command<'b>>,
    },
    /// One frame of `len` bytes held changes to the desired state (version 2) that
    /// apply to what the device holds: apply them (`base` 0: the whole document,
    /// unlisted settings go back to their defaults). The client counts them applied and
    /// reports the new version on its own; call [`Client::report_state`] to report the
    /// values as well.
    Desired {
        /// Bytes consumed.
        len: usize,
        /// The changes.
        desired: Desired<'b>,
    },
    /// One frame of `len` bytes was about a firmware transfer (version 3): an offer, a
    /// chunk answering [`Client::request_firmware`], or a withdrawn offer. The
    /// [`firmware`](crate::firmware) module's `Updater` handles all three.
    Firmware {
        /// Bytes consumed.
        len: usize,
        /// The message.
        firmware: FirmwareMsg<'b>,
    },
}

/// A firmware transfer message from the gateway (version 3, PROTOCOL.md §5.4).
#[derive(Debug, Clone, PartialEq)]
pub enum FirmwareMsg<'b> {
    /// An image to fetch: answer with [`Client::request_firmware`] (from 0, or from
    /// what is held of the same id) or decline with [`Client::firmware_status`]. The
    /// gateway offers again at every session until the transfer ends, so a transfer cut
    /// by a reconnect resumes from here.
    Offer(FirmwareOffer<'b>),
    /// The bytes asked for (fewer at the end of the image; none past it).
    Chunk(FirmwareChunk<'b>),
    /// The offer with this id is withdrawn: drop what was received of it.
    Cancel(FirmwareId),
}

/// Telemetry could not be queued.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The ring of unacknowledged records is full: wait for acks, or drop data in the
    /// application. Nothing was overwritten.
    #[error("the ring of unacknowledged telemetry is full")]
    RingFull,
    /// The record would be larger than `max_frame_out`.
    #[error("the record is larger than the largest frame this device sends")]
    TooLarge,
    /// Sequence numbers of this boot are used up (2³²−1 records): reboot with a new
    /// boot id.
    #[error("sequence numbers exhausted: start a new boot id")]
    SeqExhausted,
}

/// A command result could not be queued.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompleteError {
    /// The outbox of results is full; try again after the next transmit.
    #[error("the outbox of command results is full")]
    OutboxFull,
    /// The result does not fit a frame (`max_frame_out` or the outbox).
    #[error("the result is too large to send")]
    TooLarge,
    /// The id is not a command this client is running.
    #[error("no such command is running")]
    NotRunning,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recent {
    Running(CommandId),
    Done(CommandId, CommandStatus),
}

impl Recent {
    fn id(&self) -> CommandId {
        match *self {
            Recent::Running(id) | Recent::Done(id, _) => id,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// No connection; connect at `at` (or never if `None`).
    Down { at: Option<Millis> },
    /// Connected, `Hello` pending or sent, waiting for `Welcome` until `deadline`.
    Hello { sent: bool, deadline: Millis },
    /// Session open.
    Open(Session),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Session {
    /// The protocol version of the session.
    version: u8,
    peer_max_frame: usize,
    heartbeat_ms: Millis,
    last_tx: Millis,
    last_rx: Millis,
    /// Nonce and send time of an unanswered `Ping`.
    ping: Option<(u32, Millis)>,
}

/// The device client: protocol state, the ring of unacknowledged telemetry
/// (`RING` bytes) and the outbox of command results (`OUTBOX` bytes).
pub struct Client<const RING: usize, const OUTBOX: usize = 256> {
    cfg: Config,
    link: Link,
    ring: Ring<RING>,
    outbox: Vec<u8, OUTBOX>,
    recent: Deque<Recent, RECENT_COMMANDS>,
    events: Deque<Event, 8>,
    next_seq: Seq,
    nonce: u32,
    attempts: u32,
    retry_after_ms: Millis,
    rng: u64,
    acked: Option<Seq>,
    /// The desired document version applied (0: none).
    desired_version: u32,
    /// A `Reported` with `desired_version` is owed to the gateway (version 2).
    report_due: bool,
    /// The firmware chunk to ask for next (version 3); one at a time.
    fw_request: Option<FirmwareRequest>,
}

impl<const RING: usize, const OUTBOX: usize> Client<RING, OUTBOX> {
    /// A client that may connect at once.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            link: Link::Down { at: Some(0) },
            ring: Ring::new(),
            outbox: Vec::new(),
            recent: Deque::new(),
            events: Deque::new(),
            next_seq: 1,
            nonce: 0,
            attempts: 0,
            retry_after_ms: 0,
            // xorshift must not start at 0.
            rng: cfg.jitter_seed | 1,
            acked: None,
            desired_version: 0,
            report_due: false,
            fw_request: None,
        }
    }

    /// The settings.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Whether a connection is in use (from `handle_connected` until it goes down).
    #[must_use]
    pub fn is_connected(&self) -> bool {
        !matches!(self.link, Link::Down { .. })
    }

    /// Whether a session is open (after `Welcome`).
    #[must_use]
    pub fn is_open(&self) -> bool {
        matches!(self.link, Link::Open(_))
    }

    /// Records waiting for an ack, and the bytes they take.
    #[must_use]
    pub fn unacked(&self) -> Unacked {
        Unacked {
            records: self.ring.len(),
            bytes: self.ring.used_bytes(),
        }
    }

    /// Command results queued and not yet sent (e.g. to send a `reboot` result before
    /// rebooting).
    #[must_use]
    pub fn pending_results(&self) -> usize {
        let mut n = 0;
        let mut rest = self.outbox.as_slice();
        while let [hi, lo, ..] = rest {
            n += 1;
            let len = HEADER_LEN + usize::from(u16::from_be_bytes([*hi, *lo]));
            rest = rest.get(len..).unwrap_or_default();
        }
        n
    }

    /// The highest seq the gateway acknowledged in this boot.
    #[must_use]
    pub fn acked(&self) -> Option<Seq> {
        self.acked
    }

    /// The protocol version of the open session, if one is open.
    #[must_use]
    pub fn session_version(&self) -> Option<u8> {
        match self.link {
            Link::Open(s) => Some(s.version),
            _ => None,
        }
    }

    /// The version of the desired state document the device holds (0: none).
    #[must_use]
    pub fn desired_version(&self) -> u32 {
        self.desired_version
    }

    /// Sets the desired document version the device holds: for a device that keeps
    /// its settings across reboots together with their version (so the gateway sends
    /// only what changed since). Without it a device starts at 0 and gets the whole
    /// document on its first session.
    pub fn set_desired_version(&mut self, version: u32) {
        self.desired_version = version;
    }

    // ------------------------------------------------------------------------------
    // The application's side.

    /// Queues one telemetry record and returns its seq. It is sent when a session is
    /// open and kept until acked; a full ring is an error, never an overwrite.
    pub fn send_telemetry(
        &mut self,
        time_ms: Option<u64>,
        readings: &[Reading<'_>],
    ) -> Result<Seq, SendError> {
        let seq = self.next_seq;
        if seq == Seq::MAX {
            return Err(SendError::SeqExhausted);
        }
        let readings = Readings::from_slice(readings).map_err(|_| SendError::TooLarge)?;
        let msg = Uplink::Telemetry(Telemetry {
            seq,
            time_ms,
            readings,
        });
        match self
            .ring
            .push(seq, &msg, usize::from(self.cfg.max_frame_out))
        {
            Ok(()) => {
                self.next_seq += 1;
                Ok(seq)
            }
            Err(PushError::Full) => Err(SendError::RingFull),
            Err(PushError::TooLarge) => Err(SendError::TooLarge),
        }
    }

    /// Answers a command the client handed over in [`Input::Frame`]. The result is sent
    /// as soon as a session is open, and remembered (its status) so that a repeated
    /// command is answered again without running twice.
    pub fn complete_command(
        &mut self,
        id: CommandId,
        status: CommandStatus,
        values: &[Reading<'_>],
    ) -> Result<(), CompleteError> {
        let Some(slot) = self
            .recent
            .iter_mut()
            .find(|r| matches!(r, Recent::Running(x) if *x == id))
        else {
            return Err(CompleteError::NotRunning);
        };
        let values = Readings::from_slice(values).map_err(|_| CompleteError::TooLarge)?;
        let msg = Uplink::CommandResult(CommandResult { id, status, values });
        push_frame(&mut self.outbox, &msg, usize::from(self.cfg.max_frame_out))?;
        *slot = Recent::Done(id, status);
        Ok(())
    }

    /// Reports state values (version 2): sent when a session of version 2 is open,
    /// with the desired version the device holds; each value replaces the reported
    /// one of the same name at the gateway. A gateway of version 1 never gets them
    /// (they are dropped when their turn comes).
    pub fn report_state(&mut self, values: &[Reading<'_>]) -> Result<(), CompleteError> {
        let values = Readings::from_slice(values).map_err(|_| CompleteError::TooLarge)?;
        let msg = Uplink::Reported(Reported {
            desired_version: self.desired_version,
            values,
        });
        push_frame(&mut self.outbox, &msg, usize::from(self.cfg.max_frame_out))?;
        // This report carries the version too.
        self.report_due = false;
        Ok(())
    }

    /// Asks for the next piece of firmware image `id` (version 3): up to `len` bytes
    /// from `offset`, cut to [`firmware_chunk_len`](Self::firmware_chunk_len). The
    /// answer arrives as [`FirmwareMsg::Chunk`]. One request is outstanding at a time
    /// (that is the transfer's flow control): a second call before the first is sent
    /// replaces it. A request cut off by a reconnect, sent or not, is not repeated: the
    /// gateway offers the image again and the application asks from what it holds.
    pub fn request_firmware(&mut self, id: FirmwareId, offset: u32, len: u16) {
        let max = u16::try_from(self.firmware_chunk_len()).unwrap_or(u16::MAX);
        self.fw_request = Some(FirmwareRequest {
            id,
            offset,
            len: len.clamp(1, max.max(1)),
        });
    }

    /// The most image bytes one chunk can bring: [`MAX_CHUNK_LEN`], or less if the
    /// receive buffer (`max_frame_in`) is smaller.
    #[must_use]
    pub fn firmware_chunk_len(&self) -> usize {
        usize::from(self.cfg.max_frame_in.max(MIN_MAX_FRAME))
            .saturating_sub(FIRMWARE_CHUNK_OVERHEAD)
            .min(MAX_CHUNK_LEN)
    }

    /// Tells the gateway how firmware transfer `id` ended (version 3): `Verified` once
    /// the image is written, checked and marked for the bootloader (then restart into
    /// it), or why it failed or was declined. Queued like a command result; a session
    /// below version 3 never gets it.
    pub fn firmware_status(
        &mut self,
        id: FirmwareId,
        outcome: FirmwareOutcome,
    ) -> Result<(), CompleteError> {
        if self.fw_request.is_some_and(|r| r.id == id) {
            self.fw_request = None;
        }
        let msg = Uplink::FirmwareStatus(FirmwareStatus { id, outcome });
        push_frame(&mut self.outbox, &msg, usize::from(self.cfg.max_frame_out))
    }

    // ------------------------------------------------------------------------------
    // The driver's side.

    /// When to open a connection: `Some(t)` once `now >= t` (at once if `t <= now`),
    /// `None` while connected or after a fatal disconnect.
    #[must_use]
    pub fn poll_connect(&self) -> Option<Millis> {
        match self.link {
            Link::Down { at } => at,
            _ => None,
        }
    }

    /// A fresh secured connection is up: the client will say `Hello`.
    pub fn handle_connected(&mut self, now: Millis) {
        self.link = Link::Hello {
            sent: false,
            deadline: now.saturating_add(self.cfg.welcome_timeout_ms),
        };
        self.ring.rewind();
        // A firmware request of the last connection is not carried over: the gateway
        // offers the image again, and the application asks from what it holds then.
        self.fw_request = None;
    }

    /// A connection attempt failed: the next one waits longer.
    pub fn handle_connect_failed(&mut self, now: Millis) {
        if matches!(self.link, Link::Down { at: Some(_) }) {
            self.down(now, Disconnect::Closed);
        }
    }

    /// The transport closed or failed during a session. Nothing to do if the client
    /// already went down itself (an `Err` from `handle_input` or `handle_timeout`).
    pub fn handle_closed(&mut self, now: Millis) {
        if !matches!(self.link, Link::Down { .. }) {
            self.down(now, Disconnect::Closed);
        }
    }

    /// Handles received bytes: at most one frame from the front of `bytes`. Call again
    /// with the rest until it says [`Input::NeedMore`]. `Err` means the connection must
    /// be dropped (the client is already down and has scheduled a reconnect).
    pub fn handle_input<'b>(
        &mut self,
        now: Millis,
        bytes: &'b [u8],
    ) -> Result<Input<'b>, Disconnect> {
        if matches!(self.link, Link::Down { .. }) {
            return Err(Disconnect::Closed);
        }
        let frame = match proto::split_frame(bytes, usize::from(self.cfg.max_frame_in)) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(Input::NeedMore),
            Err(e) => return Err(self.down(now, Disconnect::BadFrame(e))),
        };
        let msg = match proto::decode_downlink(frame.body) {
            Ok(m) => m,
            Err(e) => return Err(self.down(now, Disconnect::BadMessage(e))),
        };
        let version = match &mut self.link {
            Link::Open(s) => {
                s.last_rx = now;
                s.version
            }
            _ => MIN_PROTOCOL_VERSION,
        };
        if msg.since_version() > version {
            // A message of a later version than the session's.
            return Err(self.down(now, Disconnect::Unexpected));
        }
        let command = match msg {
            Downlink::Welcome(w) => {
                if !matches!(self.link, Link::Hello { sent: true, .. }) {
                    return Err(self.down(now, Disconnect::Unexpected));
                }
                let lowest = self.cfg.min_version.max(MIN_PROTOCOL_VERSION);
                if !(lowest..=PROTOCOL_VERSION).contains(&w.version) {
                    return Err(self.down(now, Disconnect::UnsupportedVersion(w.version)));
                }
                if w.max_frame < MIN_MAX_FRAME {
                    return Err(self.down(now, Disconnect::MaxFrameTooSmall(w.max_frame)));
                }
                self.link = Link::Open(Session {
                    version: w.version,
                    peer_max_frame: usize::from(w.max_frame),
                    heartbeat_ms: Millis::from(w.heartbeat_s.max(1)) * 1000,
                    last_tx: now,
                    last_rx: now,
                    ping: None,
                });
                self.attempts = 0;
                self.retry_after_ms = 0;
                if let Some(last) = w.last_acked {
                    self.acknowledge(last);
                }
                self.ring.rewind();
                // Version 2: say which desired version we hold, so the gateway sends
                // what changed since.
                self.report_due = w.version >= 2;
                self.event(Event::Connected {
                    last_acked: w.last_acked,
                    server_time_ms: w.server_time_ms,
                    version: w.version,
                });
                None
            }
            Downlink::Desired(d) => {
                if !self.is_open() {
                    return Err(self.down(now, Disconnect::Unexpected));
                }
                self.report_due = true;
                if d.base == 0 || (d.base == self.desired_version && d.version > d.base) {
                    self.desired_version = d.version;
                    return Ok(Input::Desired {
                        len: frame.len,
                        desired: d,
                    });
                }
                // Changes to a version we do not hold (we lost ours): ask for the whole
                // document by reporting version 0.
                self.desired_version = 0;
                None
            }
            Downlink::Ack(a) => {
                if !self.is_open() {
                    return Err(self.down(now, Disconnect::Unexpected));
                }
                self.acknowledge(a.seq);
                None
            }
            Downlink::Pong(p) => {
                if let Link::Open(s) = &mut self.link
                    && let Some((nonce, sent)) = s.ping
                    && nonce == p.nonce
                {
                    s.ping = None;
                    let rtt_ms = now.saturating_sub(sent);
                    self.event(Event::Pong { rtt_ms });
                }
                None
            }
            Downlink::Goodbye(g) => {
                let reason = Disconnect::Goodbye {
                    reason: g.reason,
                    retry_after_s: g.retry_after_s,
                };
                self.retry_after_ms = Millis::from(g.retry_after_s) * 1000;
                return Err(self.down(now, reason));
            }
            Downlink::Command(c) => {
                if !self.is_open() {
                    return Err(self.down(now, Disconnect::Unexpected));
                }
                self.new_command(c)
            }
            Downlink::FirmwareOffer(_)
            | Downlink::FirmwareChunk(_)
            | Downlink::FirmwareCancel(_)
                if !self.is_open() =>
            {
                return Err(self.down(now, Disconnect::Unexpected));
            }
            Downlink::FirmwareOffer(o) => {
                return Ok(Input::Firmware {
                    len: frame.len,
                    firmware: FirmwareMsg::Offer(o),
                });
            }
            Downlink::FirmwareChunk(c) => {
                return Ok(Input::Firmware {
                    len: frame.len,
                    firmware: FirmwareMsg::Chunk(c),
                });
            }
            Downlink::FirmwareCancel(c) => {
                if self.fw_request.is_some_and(|r| r.id == c.id) {
                    self.fw_request = None;
                }
                return Ok(Input::Firmware {
                    len: frame.len,
                    firmware: FirmwareMsg::Cancel(c.id),
                });
            }
        };
        Ok(Input::Frame {
            len: frame.len,
            command,
        })
    }

    /// A command arrived: hand it over if new, answer again if done, ignore if running.
    fn new_command<'b>(&mut self, c: proto::Command<'b>) -> Option<proto::Command<'b>> {
        match self.recent.iter().find(|r| r.id() == c.id).copied() {
            Some(Recent::Running(_)) => None,
            Some(Recent::Done(id, status)) => {
                let msg = Uplink::CommandResult(CommandResult {
                    id,
                    status,
                    values: Readings::new(),
                });
                // Best effort: if the outbox is full the gateway asks again next session.
                let _ = push_frame(&mut self.outbox, &msg, usize::from(self.cfg.max_frame_out));
                None
            }
            None => {
                if self.recent.is_full() {
                    // Forget the oldest finished id first; a running one only if all
                    // are running.
                    let oldest_done = self
                        .recent
                        .iter()
                        .position(|r| matches!(r, Recent::Done(..)));
                    match oldest_done {
                        Some(i) => remove_at(&mut self.recent, i),
                        None => {
                            self.recent.pop_front();
                        }
                    }
                }
                let _ = self.recent.push_back(Recent::Running(c.id));
                Some(c)
            }
        }
    }

    fn acknowledge(&mut self, seq: Seq) {
        self.ring.ack(seq);
        if self.acked.is_none_or(|a| seq > a) {
            self.acked = Some(seq);
            self.event(Event::Acked { seq });
        }
    }

    /// Timers: the `Welcome` deadline, heartbeats, dead-peer detection. `Err` means the
    /// connection must be dropped.
    pub fn handle_timeout(&mut self, now: Millis) -> Result<(), Disconnect> {
        match self.link {
            Link::Hello { deadline, .. } if now >= deadline => {
                Err(self.down(now, Disconnect::WelcomeTimeout))
            }
            Link::Open(s) => match s.ping {
                // Nothing for a heartbeat interval since the ping (or since the last
                // frame that came after it): the peer is gone.
                Some((_, sent)) if now >= sent.max(s.last_rx).saturating_add(s.heartbeat_ms) => {
                    Err(self.down(now, Disconnect::DeadPeer))
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The next frame to send, written to `buf`; returns its length. Call until `None`
    /// after every input, timeout and application call.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Millis, buf: &mut [u8]) -> Option<usize> {
        let cfg = self.cfg;
        match &mut self.link {
            Link::Down { .. } => None,
            Link::Hello { sent: true, .. } => None,
            Link::Hello { sent, .. } => {
                let hello = Uplink::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    boot_id: cfg.boot_id,
                    firmware: Text::truncating(cfg.firmware),
                    max_frame: cfg.max_frame_in.max(MIN_MAX_FRAME),
                });
                let n = proto::encode(&hello, buf).ok()?;
                *sent = true;
                Some(n)
            }
            Link::Open(s) => {
                let limit = s.peer_max_frame.min(buf.len());
                // Command results (and reports) first: they are small and someone waits
                // for them.
                let out = buf.get_mut(..limit)?;
                if let Some(n) = pop_frame(&mut self.outbox, out, s.version, &mut self.report_due) {
                    s.last_tx = now;
                    return Some(n);
                }
                if self.report_due && s.version >= 2 {
                    let msg = Uplink::Reported(Reported {
                        desired_version: self.desired_version,
                        values: Readings::new(),
                    });
                    let n = proto::encode(&msg, buf.get_mut(..limit)?).ok()?;
                    self.report_due = false;
                    s.last_tx = now;
                    return Some(n);
                }
                // Then the next firmware chunk asked for (version 3): one at a time, after
                // results and reports, before telemetry so that a transfer keeps moving
                // while a backlog drains.
                if let Some(req) = self.fw_request
                    && s.version >= 3
                {
                    let n =
                        proto::encode(&Uplink::FirmwareRequest(req), buf.get_mut(..limit)?).ok()?;
                    self.fw_request = None;
                    s.last_tx = now;
                    return Some(n);
                }
                // Then the ring: replay and new records, in seq order.
                loop {
                    match self.ring.next_unsent(buf, s.peer_max_frame) {
                        Some(Ok(n)) => {
                            s.last_tx = now;
                            return Some(n);
                        }
                        Some(Err(seq)) => {
                            // Larger than this gateway accepts: it can never go there.
                            let _ = self.events.push_back(Event::Skipped { seq });
                        }
                        None => break,
                    }
                }
                // Then a heartbeat if the line was quiet either way: nothing sent (the
                // gateway must hear from us) or nothing received (a device that sends
                // steadily must still find out that nobody answers any more).
                if s.ping.is_none() && now >= ping_due(s) {
                    self.nonce = self.nonce.wrapping_add(1);
                    let n = proto::encode(&Uplink::Ping(Ping { nonce: self.nonce }), buf).ok()?;
                    s.ping = Some((self.nonce, now));
                    s.last_tx = now;
                    return Some(n);
                }
                None
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) or
    /// [`poll_transmit`](Self::poll_transmit) next has something to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Millis> {
        match self.link {
            Link::Down { at } => at,
            Link::Hello { deadline, .. } => Some(deadline),
            Link::Open(s) => Some(match s.ping {
                Some((_, sent)) => sent.max(s.last_rx).saturating_add(s.heartbeat_ms),
                None => ping_due(&s),
            }),
        }
    }

    /// The next event for the application.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn event(&mut self, e: Event) {
        if self.events.is_full() {
            // Acks coalesce: keep the newest events, the oldest are the least useful.
            self.events.pop_front();
        }
        let _ = self.events.push_back(e);
    }

    /// Goes down for `reason`, schedules the next attempt, reports it; returns `reason`.
    fn down(&mut self, now: Millis, reason: Disconnect) -> Disconnect {
        let at = if reason.is_fatal() {
            None
        } else {
            let backoff = self.next_backoff();
            let wait = if matches!(
                reason,
                Disconnect::Goodbye {
                    reason: GoodbyeReason::Replaced,
                    ..
                }
            ) {
                // Another connection speaks for this device; do not fight it.
                self.cfg.backoff_max_ms
            } else {
                // A retry-after applies to the next attempt only.
                backoff.max(core::mem::take(&mut self.retry_after_ms))
            };
            Some(now.saturating_add(wait))
        };
        self.link = Link::Down { at };
        self.event(Event::Disconnected {
            reason: reason.clone(),
            reconnect_at: at,
        });
        reason
    }

    /// Exponential backoff with "equal jitter": half the delay fixed, half random.
    fn next_backoff(&mut self) -> Millis {
        let (half, base) = self.cfg.backoff_window(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        // xorshift64: plenty for jitter, and no RNG dependency.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        // A 32-bit remainder: one `udiv` on a Cortex-M, where a 64-bit one pulls in a
        // kilobyte of software division. Delays fit easily (backoff_max_ms is ~minutes).
        let span = u32::try_from(base - half).unwrap_or(u32::MAX - 1) + 1;
        half + Millis::from((x as u32) % span)
    }
}

/// When a session's next `Ping` is due: a heartbeat after the last frame sent or the
/// last received, whichever is older (PROTOCOL.md §8.4).
fn ping_due(s: &Session) -> Millis {
    s.last_tx.min(s.last_rx).saturating_add(s.heartbeat_ms)
}

/// The variant index of `Uplink::Reported`, the first byte of its body.
const REPORTED_VARIANT: u8 = 4;

/// The protocol version that brought the `Uplink` variant whose index is `variant`.
const fn uplink_since(variant: u8) -> u8 {
    match variant {
        0..=3 => 1,
        REPORTED_VARIANT => 2,
        _ => 3,
    }
}

/// Appends an encoded frame to the outbox.
fn push_frame<const N: usize>(
    outbox: &mut Vec<u8, N>,
    msg: &Uplink<'_>,
    max_frame: usize,
) -> Result<(), CompleteError> {
    // Encode in place into the free space (no size pass: that would link a third copy
    // of the readings serializer), then keep what was written.
    let start = outbox.len();
    let room = (N - start).min(max_frame);
    outbox
        .resize(start + room, 0)
        .map_err(|_| CompleteError::OutboxFull)?;
    let encoded = outbox.get_mut(start..).map(|out| proto::encode(msg, out));
    match encoded {
        Some(Ok(n)) => {
            outbox.truncate(start + n);
            Ok(())
        }
        _ => {
            outbox.truncate(start);
            // Out of room because the outbox holds other results: try again later.
            // Out of room with the whole frame limit available: it will never fit.
            if room < max_frame.min(N) {
                Err(CompleteError::OutboxFull)
            } else {
                Err(CompleteError::TooLarge)
            }
        }
    }
}

/// Moves the first frame of the outbox into `out`. A frame larger than `out` (the
/// gateway's limit) is discarded: the gateway sends the command again next session and
/// gets the status alone. So is a message the session's version does not have (a
/// `Reported` in version 1, a `FirmwareStatus` below version 3). A `Reported` dropped in a version 2 session sets `report_due`: the
/// version it carried is still owed to the gateway (in a plain report, which fits).
fn pop_frame<const N: usize>(
    outbox: &mut Vec<u8, N>,
    out: &mut [u8],
    version: u8,
    report_due: &mut bool,
) -> Option<usize> {
    loop {
        let &[hi, lo, ..] = outbox.as_slice() else {
            return None;
        };
        let len = HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
        // The body's first byte is the variant.
        let variant = outbox.get(HEADER_LEN).copied().unwrap_or(0);
        let is_report = variant == REPORTED_VARIANT;
        let too_new = version < uplink_since(variant);
        let copied = match (out.get_mut(..len), outbox.get(..len)) {
            (Some(dst), Some(src)) if !too_new => {
                dst.copy_from_slice(src);
                true
            }
            _ => false,
        };
        let len = len.min(outbox.len());
        outbox.copy_within(len.., 0);
        outbox.truncate(outbox.len() - len);
        if copied {
            return Some(len);
        }
        if is_report && !too_new {
            *report_due = true;
        }
    }
}

fn remove_at<T: Copy, const N: usize>(d: &mut Deque<T, N>, i: usize) {
    let mut kept: Deque<T, N> = Deque::new();
    for (j, x) in d.iter().enumerate() {
        if j != i {
            let _ = kept.push_back(*x);
        }
    }
    *d = kept;
}
