//! Property tests: decoding arbitrary or mutated bytes returns an error and never
//! panics; every valid message survives an encode/decode round trip.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use device_client::proto::owned::{OwnedReadings, OwnedValue, borrow_readings};
use device_client::proto::*;
use proptest::prelude::*;

/// Feeds `bytes` through the receive path of both sides, as a gateway and a device
/// would: split frames off the front, decode each body, drop it, repeat.
fn receive_all(bytes: &[u8], max_frame: usize) {
    let mut rest = bytes;
    loop {
        match split_frame(rest, max_frame) {
            Ok(Some(frame)) => {
                assert!(frame.len <= max_frame && frame.len <= rest.len());
                assert_eq!(frame.body.len() + HEADER_LEN, frame.len);
                if let Ok(Uplink::Hello(h)) = decode_uplink(frame.body) {
                    // A decoded message is valid: bounds hold.
                    assert!(h.firmware.len() <= MAX_FIRMWARE_LEN);
                }
                if let Ok(Downlink::Command(c)) = decode_downlink(frame.body) {
                    assert!(Name::new(c.name.as_str()).is_ok());
                    assert!(c.args.len() <= MAX_READINGS);
                }
                let _ = peek_version(frame.body);
                rest = &rest[frame.len..];
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fn arb_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,32}"
}

fn arb_value() -> impl Strategy<Value = OwnedValue> {
    prop_oneof![
        any::<bool>().prop_map(OwnedValue::Bool),
        any::<i64>().prop_map(OwnedValue::I64),
        any::<u64>().prop_map(OwnedValue::U64),
        // NaN != NaN would fail the equality check, not the codec; keep to numbers.
        any::<f32>()
            .prop_filter("not NaN", |v| !v.is_nan())
            .prop_map(OwnedValue::F32),
        any::<f64>()
            .prop_filter("not NaN", |v| !v.is_nan())
            .prop_map(OwnedValue::F64),
        // Any Unicode, cut to the byte bound on a character boundary.
        any::<String>().prop_map(|s| OwnedValue::Str(
            Text::<MAX_TEXT_LEN>::truncating(&s).as_str().to_owned()
        )),
        proptest::collection::vec(any::<u8>(), 0..=MAX_BYTES_LEN).prop_map(OwnedValue::Bytes),
    ]
}

fn arb_readings() -> impl Strategy<Value = OwnedReadings> {
    proptest::collection::vec((arb_name(), arb_value()), 0..=MAX_READINGS)
}

fn to_readings(list: &OwnedReadings) -> Readings<'_> {
    borrow_readings(list).unwrap()
}

/// A valid frame of either direction, as bytes.
fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<u32>(),
        any::<u64>(),
        arb_name(),
        arb_readings(),
        0u8..9,
    )
        .prop_map(|(v8, v32, v64, name, list, kind)| {
            let readings = to_readings(&list);
            let mut buf = vec![0u8; MAX_DOWNLINK_FRAME];
            let up = |m: Uplink<'_>, buf: &mut [u8]| encode(&m, buf).unwrap();
            let down = |m: Downlink<'_>, buf: &mut [u8]| encode(&m, buf).unwrap();
            let len = match kind {
                0 => up(
                    Uplink::Hello(Hello {
                        version: v8,
                        boot_id: v64,
                        firmware: Text::truncating(&name),
                        max_frame: v32 as u16,
                    }),
                    &mut buf,
                ),
                1 => up(
                    Uplink::Telemetry(Telemetry {
                        seq: v32,
                        time_ms: Some(v64),
                        readings,
                    }),
                    &mut buf,
                ),
                2 => up(
                    Uplink::CommandResult(CommandResult {
                        id: v32,
                        status: CommandStatus::Failed,
                        values: readings,
                    }),
                    &mut buf,
                ),
                3 => up(Uplink::Ping(Ping { nonce: v32 }), &mut buf),
                4 => down(
                    Downlink::Welcome(Welcome {
                        version: v8,
                        heartbeat_s: v32 as u16,
                        last_acked: Some(v32),
                        server_time_ms: v64,
                        max_frame: 512,
                    }),
                    &mut buf,
                ),
                5 => down(Downlink::Ack(Ack { seq: v32 }), &mut buf),
                6 => down(
                    Downlink::Command(Command {
                        id: v32,
                        name: Name::new(&name).unwrap(),
                        args: readings,
                        ttl_ms: v32,
                    }),
                    &mut buf,
                ),
                7 => down(Downlink::Pong(Pong { nonce: v32 }), &mut buf),
                _ => down(
                    Downlink::Goodbye(Goodbye {
                        reason: GoodbyeReason::Overload,
                        retry_after_s: v32 as u16,
                    }),
                    &mut buf,
                ),
            };
            buf.truncate(len);
            buf
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                max in 0usize..5000) {
        receive_all(&bytes, max);
        // And straight into the body decoders, no framing.
        let _ = decode_uplink(&bytes);
        let _ = decode_downlink(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(frame in arb_frame(),
                                  flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                                  cut in any::<usize>()) {
        let mut bytes = frame;
        for (at, xor) in flips {
            let i = at % bytes.len();
            bytes[i] ^= xor;
        }
        let keep = cut % (bytes.len() + 1);
        receive_all(&bytes[..keep], MAX_FRAME_ON_WIRE);
        receive_all(&bytes, MAX_FRAME_ON_WIRE);
        // Inside the frame: the body alone, shifted, doubled.
        let _ = decode_uplink(&bytes[HEADER_LEN.min(bytes.len())..]);
        let _ = decode_downlink(&bytes[HEADER_LEN.min(bytes.len())..]);
        let doubled = [bytes.clone(), bytes].concat();
        receive_all(&doubled, 1024);
    }

    #[test]
    fn valid_frames_round_trip(frame in arb_frame()) {
        let f = split_frame(&frame, MAX_FRAME_ON_WIRE).unwrap().unwrap();
        prop_assert_eq!(f.len, frame.len());
        let mut again = vec![0u8; MAX_DOWNLINK_FRAME];
        let n = match decode_uplink(f.body) {
            Ok(m) => encode(&m, &mut again).unwrap(),
            Err(_) => encode(&decode_downlink(f.body).unwrap(), &mut again).unwrap(),
        };
        prop_assert_eq!(&again[..n], &frame[..]);
    }

    #[test]
    fn readings_round_trip(list in arb_readings(), seq in any::<u32>()) {
        let msg = Uplink::Telemetry(Telemetry { seq, time_ms: None, readings: to_readings(&list) });
        let mut buf = [0u8; MAX_UPLINK_FRAME];
        let n = encode(&msg, &mut buf).unwrap();
        let f = split_frame(&buf[..n], MAX_UPLINK_FRAME).unwrap().unwrap();
        prop_assert_eq!(decode_uplink(f.body).unwrap(), msg);
    }
}

#[test]
fn framing_rejects_before_reading_the_body() {
    // Header says 3000 bytes; the limit is 1024: refused with only the header present.
    assert_eq!(
        split_frame(&[0x0b, 0xb8], 1024),
        Err(FrameError::TooLarge {
            len: 3002,
            max: 1024
        })
    );
    assert_eq!(split_frame(&[0x00, 0x00], 1024), Err(FrameError::EmptyBody));
    assert_eq!(split_frame(&[0x00], 1024), Ok(None));
    assert_eq!(split_frame(&[0x00, 0x05, 1, 2], 1024), Ok(None));
}

#[test]
fn decoding_is_strict() {
    // Ping{nonce: 1} plus one stray byte.
    assert_eq!(
        decode_uplink(&[3, 1, 0]),
        Err(DecodeError::TrailingBytes { extra: 1 })
    );
    // Unknown variant.
    assert!(matches!(
        decode_uplink(&[9]),
        Err(DecodeError::Malformed(_))
    ));
    // A downlink message is not an uplink one: Pong is variant 3 downlink, which as an
    // uplink is Ping; but FirmwareCancel (8) is not an uplink variant at all.
    assert!(decode_uplink(&[8, 1]).is_err());
    assert!(decode_downlink(&[8, 1]).is_ok(), "control");
    // A name with a space inside a Command.
    let bad = [2, 1, 3, b'a', b' ', b'b', 0, 0];
    assert!(matches!(
        decode_downlink(&bad),
        Err(DecodeError::Malformed(_))
    ));
    assert!(
        decode_downlink(&[2, 1, 3, b'a', b'_', b'b', 0, 0]).is_ok(),
        "control"
    );
    // Seventeen readings are one too many.
    let readings = |n: u8| {
        let mut body = vec![1, 1, 0, n];
        for _ in 0..n {
            body.extend_from_slice(&[1, b'x', 0, 1]);
        }
        body
    };
    assert!(matches!(
        decode_uplink(&readings(17)),
        Err(DecodeError::Malformed(_))
    ));
    assert!(decode_uplink(&readings(16)).is_ok(), "control");
    // A string over its bound: firmware of 33 bytes in a Hello.
    let hello = |n: u8| {
        let mut body = vec![0, 1, 0, n];
        body.extend(std::iter::repeat_n(b'v', n.into()));
        body.extend_from_slice(&[0x80, 0x01]);
        body
    };
    assert!(matches!(
        decode_uplink(&hello(33)),
        Err(DecodeError::Malformed(_))
    ));
    assert!(decode_uplink(&hello(32)).is_ok(), "control");
    // Invalid UTF-8 in a string value.
    let bad_utf8 = [1, 1, 0, 1, 1, b'x', 5, 1, 0xff];
    assert!(matches!(
        decode_uplink(&bad_utf8),
        Err(DecodeError::Malformed(_))
    ));
    assert!(
        decode_uplink(&[1, 1, 0, 1, 1, b'x', 5, 1, b'a']).is_ok(),
        "control"
    );
}
