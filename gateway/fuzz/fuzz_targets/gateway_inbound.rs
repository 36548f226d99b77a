//! The gateway's handling of a session's byte stream: `Inbound` (gateway/src/inbound.rs), the
//! reading half of every device session, fed any bytes, split any way.
//!
//! Input: a 15-byte header, then the stream the device sends.
//!
//! ```text
//!  0..2   max_frame (big-endian; at least 128 is used)
//!  2      bit 0: Welcome.last_acked is given; bits 1-2: the gateway speaks up to version
//!         1 (0), 2 (1) or 3 (2, 3); the session's version is the lower of it and
//!         Hello.version
//!  3..7   Welcome.last_acked (big-endian)
//!  7..15  where to cut the stream: a cut after byte i when bit i % 64 is set
//!  15..   the bytes
//! ```
//!
//! Checks, besides "never panics":
//! - the frames handed out and the stop (if any) are the same whether the stream comes
//!   whole or in the cut pieces; replays noted are the same at the end;
//! - `Hello` comes out at most once and first, with `max_frame` ≥ 128; nothing else
//!   comes out before the session is open;
//! - telemetry seqs are above 0, grow, and are above `last_acked` for the first one;
//!   each body decodes as that `Telemetry`; every frame fits `max_frame`;
//! - replays noted are at or below `last_acked`;
//! - after each piece, at most one partial frame is held (memory is bounded);
//! - a `Reported` comes out only in a session of version 2;
//! - after a stop, nothing more is read.
//!
//! The module is compiled here from its source file in the gateway crate, so that
//! this build needs only what the module uses (the device client's codec): with the
//! whole gateway (SQLite, TLS, HTTP) under the sanitizer it took over ten minutes.
#![no_main]

#[path = "../../src/inbound.rs"]
#[allow(dead_code)]
mod inbound;

use device_client::proto::{self, Seq, Uplink};
use inbound::{Frame, Inbound, Stop};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = 15;

/// What came out of the reading half, in order.
#[derive(Debug, PartialEq)]
enum Out {
    Hello(u64),
    Telemetry(Seq),
    Result(u32),
    Ping(u32),
    Reported(u32),
    FirmwareRequest(u32, u32),
    FirmwareStatus(u32),
}

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Out>,
    stop: Option<Stop>,
    /// The highest replay noted.
    replayed: Option<Seq>,
}

fn run(max_frame: u16, welcome_acked: Option<Seq>, max_version: u8, pieces: &[&[u8]]) -> Outcome {
    let mut inb = Inbound::new(max_frame);
    let limit = usize::from(max_frame);
    let mut out = Outcome {
        frames: Vec::new(),
        stop: None,
        replayed: None,
    };
    let mut last_seq: Option<Seq> = None;
    let mut version = 0;
    for piece in pieces {
        let mut next = Some(*piece);
        while let Some(p) = next.take() {
            let open = inb.is_open();
            let result = inb.feed(p, |frame| {
                assert!(open, "a frame before the session is open");
                out.frames.push(match frame {
                    Frame::Telemetry { seq, time_ms, body } => {
                        assert!(seq > 0);
                        match last_seq {
                            Some(prev) => assert!(seq > prev, "seq {seq} after {prev}"),
                            None => {
                                assert!(welcome_acked.is_none_or(|a| seq > a), "a replay")
                            }
                        }
                        last_seq = Some(seq);
                        assert!(body.len() + 2 <= limit, "a frame over max_frame");
                        let Ok(Uplink::Telemetry(t)) = proto::decode_uplink(body) else {
                            panic!("the body is not the Telemetry handed out");
                        };
                        assert_eq!((t.seq, t.time_ms), (seq, time_ms));
                        Out::Telemetry(seq)
                    }
                    Frame::CommandResult(r) => Out::Result(r.id),
                    Frame::Ping(nonce) => Out::Ping(nonce),
                    Frame::Reported(r) => {
                        assert!(version >= 2, "Reported in a version {version} session");
                        Out::Reported(r.desired_version)
                    }
                    Frame::FirmwareRequest(r) => {
                        assert!(version >= 3, "FirmwareRequest in a version {version} session");
                        Out::FirmwareRequest(r.id, r.offset)
                    }
                    Frame::FirmwareStatus(st) => {
                        assert!(version >= 3, "FirmwareStatus in a version {version} session");
                        Out::FirmwareStatus(st.id)
                    }
                });
                Ok::<(), Stop>(())
            });
            match result {
                Ok(Some(hello)) => {
                    assert!(!open, "a second Hello handed out");
                    assert!(out.frames.is_empty(), "Hello after other frames");
                    assert!(hello.max_frame >= proto::MIN_MAX_FRAME);
                    out.frames.push(Out::Hello(hello.boot_id));
                    version = hello.version.min(max_version);
                    inb.opened(version, welcome_acked);
                    assert!(inb.is_open());
                    // What came behind the Hello, now that the session is open.
                    next = Some(&[]);
                }
                Ok(None) => {}
                Err(stop) => {
                    assert!(matches!(
                        inb.feed(b"\x00\x01\x03", |_| Ok::<(), Stop>(())),
                        Err(Stop::Stopped)
                    ));
                    assert_eq!(inb.buffered(), 0, "a stopped session keeps nothing");
                    out.stop = Some(stop);
                    note_replayed(&mut inb, welcome_acked, &mut out);
                    return out;
                }
            }
        }
        note_replayed(&mut inb, welcome_acked, &mut out);
        assert!(inb.buffered() < limit, "more than one partial frame held");
    }
    out
}

/// Takes the replays noted so far (the session acknowledges them after each read).
fn note_replayed(inb: &mut Inbound, welcome_acked: Option<Seq>, out: &mut Outcome) {
    if let Some(r) = inb.take_replayed() {
        assert!(
            welcome_acked.is_some_and(|a| r <= a),
            "replay {r} above {welcome_acked:?}"
        );
        out.replayed = Some(out.replayed.map_or(r, |m| m.max(r)));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((header, bytes)) = data.split_at_checked(HEADER) else {
        return;
    };
    let max_frame = u16::from_be_bytes([header[0], header[1]]).max(proto::MIN_MAX_FRAME);
    let welcome_acked = (header[2] & 1 == 1)
        .then(|| u32::from_be_bytes([header[3], header[4], header[5], header[6]]));
    let mut mask = [0u8; 8];
    mask.copy_from_slice(&header[7..15]);
    let mask = u64::from_be_bytes(mask);
    // Bits 1-2: the gateway's highest version (0: 1, 1: 2, else 3).
    let max_version = match (header[2] >> 1) & 3 {
        0 => 1,
        1 => 2,
        _ => 3,
    };

    let whole = run(max_frame, welcome_acked, max_version, &[bytes]);
    let mut pieces = Vec::new();
    let mut start = 0;
    for i in 0..bytes.len() {
        if mask & (1 << (i % 64)) != 0 {
            pieces.push(&bytes[start..=i]);
            start = i + 1;
        }
    }
    pieces.push(&bytes[start..]);
    let split = run(max_frame, welcome_acked, max_version, &pieces);
    assert_eq!(
        whole,
        split,
        "the same stream, cut into {} pieces",
        pieces.len()
    );
});
