//! The reading half of a device session without I/O: bytes in, the protocol's rules
//! applied, frames out (PROTOCOL.md §3, §8, §9). The session feeds it what TLS gives
//! it, in whatever pieces; the fuzz target `gateway_inbound` feeds it anything.
//!
//! ```text
//!  bytes (any split) ─► frames (len ≤ max_frame) ─► decode ─► rules ─┬─► Hello (stop: open the session)
//!                         partial frame kept                        ├─► Telemetry / CommandResult / Ping
//!                                                                    ├─► replay of a stored record (noted)
//!                                                                    └─► Stop: violation | old version
//! ```
//!
//! Rules: `Hello` first and once; `Hello.max_frame` at least 128; a device speaking an
//! older version is told so; telemetry seqs are above 0 and grow within the session,
//! except replays at or below `Welcome.last_acked` before any new record, which are
//! already stored and only noted (the session acknowledges them).

use device_client::proto::{
    self, CommandResult, DecodeError, FirmwareRequest, FirmwareStatus, FrameError, Hello,
    MIN_MAX_FRAME, MIN_PROTOCOL_VERSION, Reported, Seq, Uplink,
};

/// A device broke the protocol (PROTOCOL.md §9).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// Bad frame header.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    /// Undecodable body.
    #[error("message: {0}")]
    Decode(#[from] DecodeError),
    /// A message other than `Hello` came first.
    #[error("{0} before Hello")]
    BeforeHello(&'static str),
    /// `Hello` came twice.
    #[error("second Hello")]
    SecondHello,
    /// `Hello.max_frame` is below the protocol minimum.
    #[error("Hello.max_frame {0} is below {MIN_MAX_FRAME}")]
    MaxFrameTooSmall(u16),
    /// `Telemetry.seq` is 0.
    #[error("telemetry seq 0")]
    SeqZero,
    /// A message the session's protocol version does not have.
    #[error("{message} in a session of protocol version {version}")]
    NotInVersion {
        /// The message.
        message: &'static str,
        /// The session's version.
        version: u8,
    },
    /// `Telemetry.seq` did not grow.
    #[error("telemetry seq {got} after {prev}")]
    SeqNotIncreasing {
        /// The previous seq.
        prev: Seq,
        /// The offending one.
        got: Seq,
    },
}

/// Why the session must stop reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Stop {
    /// The device broke the protocol: `Goodbye{ProtocolViolation}`.
    #[error("protocol violation: {0}")]
    Violation(#[from] Violation),
    /// Its `Hello` is of an older version: `Goodbye{UnsupportedVersion}` (§10).
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Reading stopped at an earlier error; nothing more is handled.
    #[error("reading stopped at an earlier error")]
    Stopped,
}

/// The fields of `Hello` a session keeps (the message borrows the read buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloFields {
    /// The highest protocol version the device speaks.
    pub version: u8,
    /// Boot id.
    pub boot_id: u64,
    /// Firmware version.
    pub firmware: String,
    /// Largest frame the device accepts.
    pub max_frame: u16,
}

impl HelloFields {
    fn from(h: &Hello<'_>) -> Result<Self, Violation> {
        if h.max_frame < MIN_MAX_FRAME {
            return Err(Violation::MaxFrameTooSmall(h.max_frame));
        }
        Ok(Self {
            version: h.version,
            boot_id: h.boot_id,
            firmware: h.firmware.as_str().to_owned(),
            max_frame: h.max_frame,
        })
    }
}

/// A frame of an open session, for the session to act on.
// Lives on the stack of one synchronous call and is never stored: boxing the large
// variant would only add an allocation per command result.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Frame<'a> {
    /// A new telemetry record (its seq checked); `body` is the frame body as sent.
    Telemetry {
        /// Its seq: above every earlier one of this session.
        seq: Seq,
        /// Device time, if the device gave one.
        time_ms: Option<u64>,
        /// The `Telemetry` message's encoding.
        body: &'a [u8],
    },
    /// A command's result.
    CommandResult(CommandResult<'a>),
    /// A ping, to answer with this nonce.
    Ping(u32),
    /// The device's reported state (version 2).
    Reported(Reported<'a>),
    /// A firmware chunk asked for (version 3).
    FirmwareRequest(FirmwareRequest),
    /// How a firmware transfer ended on the device (version 3).
    FirmwareStatus(FirmwareStatus),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Until `Hello`.
    AwaitHello,
    /// `Hello` handed out; nothing more is read until `opened`.
    Opening,
    /// The session is open.
    Open {
        /// The session's protocol version (`Welcome.version`).
        version: u8,
        /// `Welcome.last_acked`.
        welcome_acked: Option<Seq>,
        /// The last new record of this session.
        last_seq: Option<Seq>,
    },
    /// A rule was broken: nothing more is read.
    Stopped,
}

/// The reading half of one session.
#[derive(Debug)]
pub struct Inbound {
    max_frame: usize,
    /// A partial frame left over (usually empty), or frames behind a `Hello`.
    rbuf: Vec<u8>,
    state: State,
    /// Highest replayed record at or below `Welcome.last_acked` not yet taken.
    replayed: Option<Seq>,
}

impl Inbound {
    /// A session that accepts frames of up to `max_frame` bytes, header included.
    pub fn new(max_frame: u16) -> Self {
        Self {
            max_frame: usize::from(max_frame),
            rbuf: Vec::new(),
            state: State::AwaitHello,
            replayed: None,
        }
    }

    /// Bytes held for later: a partial frame, or what came behind a `Hello`. Never more
    /// than one frame plus what one read brought.
    #[allow(dead_code, reason = "the fuzz target (gateway/fuzz) checks this bound")]
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// Whether the session is open (`Hello` handled and [`opened`](Self::opened)).
    #[allow(dead_code, reason = "the fuzz target (gateway/fuzz) checks this state")]
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open { .. })
    }

    /// Handles the complete frames in `fresh` (after whatever was held back), handing
    /// each frame of an open session to `on`. Returns a `Hello` as soon as one arrives:
    /// nothing behind it is handled until [`opened`](Self::opened), because the
    /// session must first look up what is stored. After a `Stop` nothing more is read.
    pub fn feed<E: From<Stop>>(
        &mut self,
        fresh: &[u8],
        mut on: impl FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<Option<HelloFields>, E> {
        if matches!(self.state, State::Stopped) {
            return Err(Stop::Stopped.into());
        }
        if matches!(self.state, State::Opening) {
            // Held until the session is open.
            self.rbuf.extend_from_slice(fresh);
            return Ok(None);
        }
        // Work straight from `fresh` if nothing is held; else append it to what is
        // held and work from there. Only what is left over is kept (moved to the front),
        // so a device sending a frame a byte at a time costs one append per byte, not a
        // copy of the whole partial frame.
        let mut held = std::mem::take(&mut self.rbuf);
        let from_held = !held.is_empty();
        if from_held {
            held.extend_from_slice(fresh);
        }
        let data: &[u8] = if from_held { &held } else { fresh };
        let mut rest = data;
        let mut hello = None;
        let outcome = loop {
            let frame = match proto::split_frame(rest, self.max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(e) => break Err(Stop::Violation(e.into()).into()),
            };
            rest = rest.get(frame.len..).unwrap_or_default();
            match self.frame(frame.body) {
                Ok(Step::Hello(h)) => {
                    hello = Some(h);
                    break Ok(());
                }
                Ok(Step::Frame(f)) => {
                    if let Err(e) = on(f) {
                        break Err(e);
                    }
                }
                Ok(Step::Nothing) => {}
                Err(stop) => break Err(stop.into()),
            }
        };
        if let Err(e) = outcome {
            self.state = State::Stopped;
            return Err(e);
        }
        let consumed = data.len() - rest.len();
        if from_held {
            held.drain(..consumed);
        } else {
            held.extend_from_slice(fresh.get(consumed..).unwrap_or_default());
        }
        if held.is_empty() && held.capacity() > 4096 {
            // A large frame passed; do not keep its buffer for an idle session.
            held = Vec::new();
        }
        self.rbuf = held;
        Ok(hello)
    }

    /// The session is open with protocol `version`, and `Welcome` said `welcome_acked`
    /// is stored: frames held behind the `Hello` are handled next ([`feed`](Self::feed)
    /// with no new bytes).
    pub fn opened(&mut self, version: u8, welcome_acked: Option<Seq>) {
        if matches!(self.state, State::Opening) {
            self.state = State::Open {
                version,
                welcome_acked,
                last_seq: None,
            };
        }
    }

    /// The highest replayed record (at or below `Welcome.last_acked`) seen since the
    /// last call: stored already, to be acknowledged (§8.2).
    pub fn take_replayed(&mut self) -> Option<Seq> {
        self.replayed.take()
    }

    /// One frame body: the rules.
    fn frame<'b>(&mut self, body: &'b [u8]) -> Result<Step<'b>, Stop> {
        if matches!(self.state, State::AwaitHello)
            && let Some(v) = proto::peek_version(body)
            && v < MIN_PROTOCOL_VERSION
        {
            return Err(Stop::UnsupportedVersion(v));
        }
        let msg = proto::decode_uplink(body).map_err(Violation::from)?;
        let (welcome_acked, last_seq) = match &mut self.state {
            State::Open {
                version,
                welcome_acked,
                last_seq,
            } => {
                if msg.since_version() > *version {
                    let message = match msg {
                        Uplink::Reported(_) => "Reported",
                        Uplink::FirmwareRequest(_) => "FirmwareRequest",
                        Uplink::FirmwareStatus(_) => "FirmwareStatus",
                        _ => "a message",
                    };
                    return Err(Violation::NotInVersion {
                        message,
                        version: *version,
                    }
                    .into());
                }
                (*welcome_acked, last_seq)
            }
            _ => {
                return match msg {
                    Uplink::Hello(h) => {
                        let fields = HelloFields::from(&h)?;
                        self.state = State::Opening;
                        Ok(Step::Hello(fields))
                    }
                    Uplink::Telemetry(_) => Err(Violation::BeforeHello("Telemetry").into()),
                    Uplink::CommandResult(_) => Err(Violation::BeforeHello("CommandResult").into()),
                    Uplink::Ping(_) => Err(Violation::BeforeHello("Ping").into()),
                    Uplink::Reported(_) => Err(Violation::BeforeHello("Reported").into()),
                    Uplink::FirmwareRequest(_) => {
                        Err(Violation::BeforeHello("FirmwareRequest").into())
                    }
                    Uplink::FirmwareStatus(_) => {
                        Err(Violation::BeforeHello("FirmwareStatus").into())
                    }
                };
            }
        };
        match msg {
            Uplink::Hello(_) => Err(Violation::SecondHello.into()),
            Uplink::Telemetry(t) => {
                if t.seq == 0 {
                    return Err(Violation::SeqZero.into());
                }
                if last_seq.is_none() && welcome_acked.is_some_and(|a| t.seq <= a) {
                    // A replay of what `Welcome` said is stored already: not stored
                    // again, but acknowledged so the device can drop it (§8.2).
                    self.replayed = Some(self.replayed.map_or(t.seq, |r| r.max(t.seq)));
                    return Ok(Step::Nothing);
                }
                if let Some(prev) = *last_seq
                    && t.seq <= prev
                {
                    return Err(Violation::SeqNotIncreasing { prev, got: t.seq }.into());
                }
                *last_seq = Some(t.seq);
                Ok(Step::Frame(Frame::Telemetry {
                    seq: t.seq,
                    time_ms: t.time_ms,
                    body,
                }))
            }
            Uplink::CommandResult(r) => Ok(Step::Frame(Frame::CommandResult(r))),
            Uplink::Ping(p) => Ok(Step::Frame(Frame::Ping(p.nonce))),
            Uplink::Reported(r) => Ok(Step::Frame(Frame::Reported(r))),
            Uplink::FirmwareRequest(r) => Ok(Step::Frame(Frame::FirmwareRequest(r))),
            Uplink::FirmwareStatus(s) => Ok(Step::Frame(Frame::FirmwareStatus(s))),
        }
    }
}

#[allow(clippy::large_enum_variant)] // as `Frame`
enum Step<'a> {
    Hello(HelloFields),
    Frame(Frame<'a>),
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;
    use device_client::proto::{Ping, Readings, Telemetry, Text};

    fn frame(msg: &Uplink<'_>) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let n = proto::encode(msg, &mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn hello(version: u8) -> Vec<u8> {
        frame(&Uplink::Hello(Hello {
            version,
            boot_id: 7,
            firmware: Text::new("fw").unwrap(),
            max_frame: 512,
        }))
    }

    fn telemetry(seq: Seq) -> Vec<u8> {
        frame(&Uplink::Telemetry(Telemetry {
            seq,
            time_ms: None,
            readings: Readings::new(),
        }))
    }

    fn reported(desired_version: u32) -> Vec<u8> {
        frame(&Uplink::Reported(proto::Reported {
            desired_version,
            values: Readings::new(),
        }))
    }

    /// A version-0 `Hello` whose variant index is `80 00` instead of `00`.
    fn long_index_hello() -> Vec<u8> {
        let body = [&[0x80][..], &hello(0)[2..]].concat();
        let Ok(Uplink::Hello(h)) = proto::decode_uplink(&body) else {
            panic!("the decoder takes the longer index");
        };
        assert_eq!(h.version, 0);
        let len = u16::try_from(body.len()).unwrap().to_be_bytes();
        [&len[..], &body].concat()
    }

    /// Feeds `bytes` in pieces of `step` bytes, opening the session at `Hello`;
    /// returns what came out, or the stop.
    fn run(bytes: &[u8], step: usize, welcome_acked: Option<Seq>) -> (Vec<String>, Option<Stop>) {
        let mut inb = Inbound::new(4096);
        let mut out = Vec::new();
        for piece in bytes.chunks(step.max(1)).chain([&[][..]]) {
            let mut next = Some(piece);
            while let Some(p) = next.take() {
                let r = inb.feed(p, |f| {
                    out.push(match f {
                        Frame::Telemetry { seq, .. } => format!("t{seq}"),
                        Frame::CommandResult(r) => format!("r{}", r.id),
                        Frame::Ping(n) => format!("p{n}"),
                        Frame::Reported(r) => format!("s{}", r.desired_version),
                        Frame::FirmwareRequest(r) => format!("fr{}@{}", r.id, r.offset),
                        Frame::FirmwareStatus(s) => format!("fs{}:{}", s.id, s.outcome.as_str()),
                    });
                    Ok::<_, Stop>(())
                });
                match r {
                    Ok(Some(h)) => {
                        out.push(format!("hello{}", h.boot_id));
                        // The session speaks the version the device offered.
                        inb.opened(h.version, welcome_acked);
                        next = Some(&[][..]);
                    }
                    Ok(None) => {}
                    Err(e) => return (out, Some(e)),
                }
                if let Some(r) = inb.take_replayed() {
                    out.push(format!("replayed{r}"));
                }
            }
        }
        (out, None)
    }

    #[test]
    fn frames_come_out_the_same_however_the_bytes_are_split() {
        let mut bytes = hello(proto::PROTOCOL_VERSION);
        for seq in [2, 3, 5, 6] {
            bytes.extend(telemetry(seq));
        }
        bytes.extend(frame(&Uplink::Ping(Ping { nonce: 9 })));
        bytes.extend(reported(4));
        let whole = run(&bytes, bytes.len(), Some(3));
        assert_eq!(
            whole,
            (
                vec![
                    "hello7".into(),
                    "t5".into(),
                    "t6".into(),
                    "p9".into(),
                    "s4".into(),
                    "replayed3".into(),
                ],
                None
            )
        );
        for step in 1..bytes.len() {
            let (out, stop) = run(&bytes, step, Some(3));
            assert_eq!(stop, None, "step {step}");
            // Replays are noted per piece; the frames are the same in any split.
            let frames: Vec<_> = out.iter().filter(|s| !s.starts_with("replayed")).collect();
            assert_eq!(frames, ["hello7", "t5", "t6", "p9", "s4"], "step {step}");
        }
    }

    #[test]
    fn the_rules_stop_reading() {
        let cases: Vec<(Vec<u8>, Stop)> = vec![
            (telemetry(1), Violation::BeforeHello("Telemetry").into()),
            (hello(0), Stop::UnsupportedVersion(0)),
            // The same old Hello with its variant index spelled as a longer varint,
            // which the decoder accepts: the version check must not be skipped.
            (long_index_hello(), Stop::UnsupportedVersion(0)),
            ([hello(1), hello(1)].concat(), Violation::SecondHello.into()),
            // Version 2's message in a version 1 session.
            (
                [hello(1), reported(0)].concat(),
                Violation::NotInVersion {
                    message: "Reported",
                    version: 1,
                }
                .into(),
            ),
            (reported(0), Violation::BeforeHello("Reported").into()),
            ([hello(1), telemetry(0)].concat(), Violation::SeqZero.into()),
            (
                [hello(1), telemetry(5), telemetry(5)].concat(),
                Violation::SeqNotIncreasing { prev: 5, got: 5 }.into(),
            ),
            (
                [hello(1), vec![0xff, 0xff]].concat(),
                Violation::Frame(FrameError::TooLarge {
                    len: 0xffff + 2,
                    max: 4096,
                })
                .into(),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                run(&bytes, bytes.len(), None).1,
                Some(want.clone()),
                "{want}"
            );
            assert_eq!(
                run(&bytes, 1, None).1,
                Some(want.clone()),
                "{want} byte by byte"
            );
        }
    }
}
