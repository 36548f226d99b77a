//! Framing and the message codec (PROTOCOL.md §3, §4, §5) on arbitrary bytes.
//!
//! The input is raw bytes, read both as a stream of frames and as one body, so the
//! golden vectors (whole frames and bare bodies) are good seeds as they are.
//!
//! Invariants, besides "never panics":
//! - `split_frame` answers exactly what §3 says for every limit: more bytes needed,
//!   an empty body, a frame over the limit (from the header alone), or the frame;
//!   and a frame found under one limit is found, the same, under every larger one.
//! - Whatever decodes is a valid message (names, bounds: a firmware offer's version
//!   within `MAX_FIRMWARE_LEN`, a chunk's data within `MAX_CHUNK_LEN`, a hash and a
//!   signature of exactly 32 and 64 bytes) and encodes again within the protocol's
//!   largest frame (`MAX_UPLINK_FRAME`, `MAX_DOWNLINK_FRAME`).
//! - Re-encoding gives back exactly the body, except where the body spelled a varint
//!   longer than needed: §4 lets decoders accept that (and encoders must not write
//!   it), so there the canonical encoding is shorter, and it is a fixed point:
//!   decode(encode(msg)) encodes to the same bytes. Messages are compared as bytes,
//!   because `Value::F32(NaN) != Value::F32(NaN)` although the codec keeps its bits.
//! - `encode` fits a buffer exactly when the buffer holds the frame.
//! - `peek_version` reads the byte after a variant index of 0 (a varint, so `00` or
//!   0 spelled longer), and agrees with the version of a decoded `Hello` / `Welcome`:
//!   a gateway refuses versions with it before decoding (§10).

#![no_main]

use device_client::proto::{
    Change, DecodeError, Downlink, FrameError, HEADER_LEN, MAX_BYTES_LEN, MAX_CHUNK_LEN,
    MAX_DOWNLINK_FRAME, MAX_FIRMWARE_LEN, MAX_FRAME_ON_WIRE, MAX_NAME_LEN, MAX_READINGS,
    MAX_TEXT_LEN, MAX_UPLINK_FRAME, Message, Name, Reading, Uplink, Value, decode_downlink,
    decode_uplink, encode, frame_header, peek_version, split_frame,
};
use libfuzzer_sys::fuzz_target;

/// Limits every input is framed with: the edges of the header, the protocol's sizes and
/// the device's defaults.
const LIMITS: [usize; 10] = [
    0,
    1,
    HEADER_LEN,
    HEADER_LEN + 1,
    128,
    512,
    MAX_UPLINK_FRAME,
    MAX_DOWNLINK_FRAME,
    4096,
    MAX_FRAME_ON_WIRE,
];

fuzz_target!(|data: &[u8]| {
    check_framing(data);
    // The input as one body.
    check_body(data);
    // The input as a stream, as a receiver reads it.
    let mut rest = data;
    while let Ok(Some(frame)) = split_frame(rest, MAX_FRAME_ON_WIRE) {
        check_body(frame.body);
        rest = &rest[frame.len..];
    }
});

/// `split_frame` against §3 for every limit, plus one the input chooses (its last two
/// bytes) so that every limit gets tried.
fn check_framing(data: &[u8]) {
    let chosen = match data {
        [.., hi, lo] => usize::from(u16::from_be_bytes([*hi, *lo])),
        _ => 0,
    };
    let mut found: Option<(usize, &[u8])> = None;
    let mut limits = [0; LIMITS.len() + 2];
    limits[..LIMITS.len()].copy_from_slice(&LIMITS);
    limits[LIMITS.len()..].copy_from_slice(&[chosen, chosen + HEADER_LEN]);
    limits.sort_unstable();
    for max in limits {
        let got = split_frame(data, max);
        let expected = match data {
            [hi, lo, rest @ ..] => {
                let body_len = usize::from(u16::from_be_bytes([*hi, *lo]));
                let len = HEADER_LEN + body_len;
                if body_len == 0 {
                    Err(FrameError::EmptyBody)
                } else if len > max {
                    Err(FrameError::TooLarge { len, max })
                } else if rest.len() < body_len {
                    Ok(None)
                } else {
                    Ok(Some((len, &rest[..body_len])))
                }
            }
            _ => Ok(None),
        };
        let got_plain = got.map(|f| f.map(|f| (f.len, f.body)));
        assert_eq!(
            got_plain,
            expected,
            "split_frame(len {}, max {max})",
            data.len()
        );
        if let Ok(Some(frame)) = got {
            assert!(frame.len <= max && frame.len <= data.len());
            assert_eq!(frame_header(frame.body.len()), Some([data[0], data[1]]));
            // A larger limit finds the same frame.
            if let Some(before) = found {
                assert_eq!(before, (frame.len, frame.body));
            }
            found = Some((frame.len, frame.body));
        } else {
            assert!(
                found.is_none(),
                "a frame under a smaller limit is lost under {max}"
            );
        }
    }
}

fn check_body(body: &[u8]) {
    // The variant index is a u32 varint: 0 is `00`, or up to four `80` bytes before it.
    let version = peek_version(body);
    let continued = body.iter().take(4).take_while(|b| **b == 0x80).count();
    match &body[continued..] {
        [0, v, ..] => assert_eq!(version, Some(*v)),
        _ => assert_eq!(version, None),
    }
    match decode_uplink(body) {
        Ok(msg) => {
            check_uplink(&msg);
            if let Uplink::Hello(h) = &msg {
                assert_eq!(version, Some(h.version));
            }
            let frame = encode_checked(&msg, MAX_UPLINK_FRAME);
            check_round_trip(body, &frame, reencode_uplink);
        }
        Err(e) => check_error(&e, body),
    }
    match decode_downlink(body) {
        Ok(msg) => {
            check_downlink(&msg);
            if let Downlink::Welcome(w) = &msg {
                assert_eq!(version, Some(w.version));
            }
            let frame = encode_checked(&msg, MAX_DOWNLINK_FRAME);
            check_round_trip(body, &frame, reencode_downlink);
        }
        Err(e) => check_error(&e, body),
    }
}

fn check_error(e: &DecodeError, body: &[u8]) {
    if let DecodeError::TrailingBytes { extra } = e {
        assert!(*extra > 0 && *extra < body.len());
    }
}

/// The canonical frame of `msg`, checked: it fits the protocol's largest frame for its
/// direction, and `encode` fits a buffer exactly when the buffer holds it.
fn encode_checked<'a, M: Message<'a>>(msg: &M, max_frame: usize) -> Vec<u8> {
    // Room for more than the protocol's largest frame, so an oversized encoding shows.
    let mut buf = [0u8; MAX_DOWNLINK_FRAME + MAX_UPLINK_FRAME];
    let n = encode(msg, &mut buf).expect("a decoded message encodes");
    assert!(
        n <= max_frame,
        "{n}-byte frame over the protocol's {max_frame}"
    );
    assert_eq!(frame_header(n - HEADER_LEN), Some([buf[0], buf[1]]));
    for cut in [0, 1, HEADER_LEN, n - 1] {
        assert!(
            encode(msg, &mut buf[..cut]).is_err(),
            "fits {cut} < {n} bytes"
        );
    }
    assert_eq!(encode(msg, &mut buf[..n]).ok(), Some(n));
    buf[..n].to_vec()
}

/// `body` decoded to a message whose canonical frame is `frame`; `reencode` decodes a
/// body and gives its canonical frame.
fn check_round_trip(body: &[u8], frame: &[u8], reencode: fn(&[u8]) -> Vec<u8>) {
    let canonical = &frame[HEADER_LEN..];
    if canonical == body {
        return;
    }
    // Only a longer varint somewhere in `body` may explain a difference (§4).
    assert!(
        canonical.len() < body.len(),
        "re-encoding changed the body without shortening a varint:\n \
         body      {body:02x?}\n canonical {canonical:02x?}"
    );
    // The canonical bytes are a fixed point: decode(encode(msg)) == msg.
    assert_eq!(reencode(canonical), frame, "decode(encode(msg)) != msg");
}

fn reencode_uplink(body: &[u8]) -> Vec<u8> {
    let msg = decode_uplink(body).expect("a canonical uplink body decodes");
    encode_checked(&msg, MAX_UPLINK_FRAME)
}

fn reencode_downlink(body: &[u8]) -> Vec<u8> {
    let msg = decode_downlink(body).expect("a canonical downlink body decodes");
    encode_checked(&msg, MAX_DOWNLINK_FRAME)
}

fn check_readings(readings: &[Reading<'_>]) {
    assert!(readings.len() <= MAX_READINGS);
    for r in readings {
        assert!(r.name.len() <= MAX_NAME_LEN);
        assert!(
            Name::new(r.name.as_str()).is_ok(),
            "invalid name {:?}",
            r.name
        );
        match r.value {
            Value::Str(t) => assert!(t.len() <= MAX_TEXT_LEN),
            Value::Bytes(b) => assert!(b.len() <= MAX_BYTES_LEN),
            _ => {}
        }
    }
}

fn check_uplink(msg: &Uplink<'_>) {
    match msg {
        Uplink::Hello(h) => assert!(h.firmware.len() <= MAX_FIRMWARE_LEN),
        Uplink::Telemetry(t) => check_readings(&t.readings),
        Uplink::CommandResult(r) => check_readings(&r.values),
        Uplink::Ping(_) => {}
        Uplink::Reported(r) => check_readings(&r.values),
        // Any offset and length decode: what a gateway serves is its business.
        Uplink::FirmwareRequest(_) | Uplink::FirmwareStatus(_) => {}
    }
}

fn check_downlink(msg: &Downlink<'_>) {
    match msg {
        Downlink::FirmwareOffer(o) => {
            assert!(o.version.len() <= MAX_FIRMWARE_LEN);
            assert_eq!((o.sha256.0.len(), o.signature.0.len()), (32, 64));
        }
        Downlink::FirmwareChunk(c) => assert!(c.data.len() <= MAX_CHUNK_LEN),
        _ => {}
    }
    if let Downlink::Desired(d) = msg {
        assert!(d.changes.len() <= MAX_READINGS);
        for c in &d.changes {
            assert!(Name::new(c.name().as_str()).is_ok(), "invalid name");
            if let Change::Set(r) = c {
                check_readings(core::slice::from_ref(r));
            }
        }
    }
    if let Downlink::Command(c) = msg {
        assert!(
            Name::new(c.name.as_str()).is_ok(),
            "invalid name {:?}",
            c.name
        );
        check_readings(&c.args);
    }
}
