//! Golden byte vectors (PROTOCOL.md §7): the encoding of an example of every message.
//!
//! Each vector is `tests/vectors/<name>.hex`: `#` comment lines describing the message,
//! then the whole frame (header + body) in hex. The test checks both ways: encoding the
//! value gives the bytes, and decoding the bytes gives the value.
//!
//! To write the files after a deliberate change of the wire format (which needs a new
//! protocol version), run with `UPDATE_VECTORS=1` and review the diff.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::PathBuf;

use device_client::proto::*;

fn name(s: &'static str) -> Name<'static> {
    Name::new(s).unwrap()
}

fn readings<'a>(list: &[Reading<'a>]) -> Readings<'a> {
    Readings::from_slice(list).unwrap()
}

fn r<'a>(n: &'static str, value: Value<'a>) -> Reading<'a> {
    Reading::new(name(n), value)
}

const LONG_NAME: &str = "abcdefghijklmnopqrstuvwxyz_01234"; // 32 bytes, the maximum
const LONG_TEXT: &str = concat!(
    "The quick brown fox jumps over the lazy dog. ",
    "The quick brown fox jumps over the lazy dog. ",
    "Pack my box with five dozen liquor jug"
); // 128 bytes, the maximum
const BYTES: [u8; 4] = [0xde, 0xad, 0xbe, 0xef];
const NAMES16: [&str; 16] = [
    "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

enum Msg {
    Up(Uplink<'static>),
    Down(Downlink<'static>),
}

fn vectors() -> Vec<(&'static str, Msg)> {
    use Msg::{Down, Up};
    assert_eq!(LONG_NAME.len(), MAX_NAME_LEN);
    assert_eq!(LONG_TEXT.len(), MAX_TEXT_LEN);
    vec![
        (
            "up-hello",
            Up(Uplink::Hello(Hello {
                version: 1,
                boot_id: 0x0123_4567_89ab_cdef,
                firmware: Text::new("1.4.2").unwrap(),
                max_frame: 1024,
            })),
        ),
        (
            "up-hello-minimal",
            Up(Uplink::Hello(Hello {
                version: 1,
                boot_id: 0,
                firmware: Text::new("").unwrap(),
                max_frame: MIN_MAX_FRAME,
            })),
        ),
        (
            "up-telemetry-empty",
            Up(Uplink::Telemetry(Telemetry {
                seq: 1,
                time_ms: None,
                readings: Readings::new(),
            })),
        ),
        (
            "up-telemetry",
            Up(Uplink::Telemetry(Telemetry {
                seq: 300,
                time_ms: Some(1_764_100_000_000),
                readings: readings(&[r("temp_c", Value::F32(21.5)), r("humidity", Value::U64(40))]),
            })),
        ),
        (
            "up-telemetry-every-type",
            Up(Uplink::Telemetry(Telemetry {
                seq: 2,
                time_ms: None,
                readings: readings(&[
                    r("ok", Value::Bool(true)),
                    r("delta", Value::I64(-3)),
                    r("count", Value::U64(1_000)),
                    r("volts", Value::F32(3.3)),
                    r("lat", Value::F64(48.858_844)),
                    r("state", Value::str("idle").unwrap()),
                    r("raw", Value::bytes(&BYTES).unwrap()),
                ]),
            })),
        ),
        (
            "up-telemetry-integer-extremes",
            Up(Uplink::Telemetry(Telemetry {
                seq: u32::MAX,
                time_ms: Some(u64::MAX),
                readings: readings(&[
                    r("min", Value::I64(i64::MIN)),
                    r("max", Value::I64(i64::MAX)),
                    r("umax", Value::U64(u64::MAX)),
                    r("off", Value::Bool(false)),
                ]),
            })),
        ),
        (
            "up-telemetry-longest-string",
            Up(Uplink::Telemetry(Telemetry {
                seq: 3,
                time_ms: None,
                readings: readings(&[r(LONG_NAME, Value::str(LONG_TEXT).unwrap())]),
            })),
        ),
        (
            "up-telemetry-most-readings",
            Up(Uplink::Telemetry(Telemetry {
                seq: 4,
                time_ms: None,
                readings: NAMES16
                    .iter()
                    .enumerate()
                    .map(|(i, n)| r(n, Value::U64(i as u64)))
                    .collect(),
            })),
        ),
        (
            "up-command-result",
            Up(Uplink::CommandResult(CommandResult {
                id: 7,
                status: CommandStatus::Succeeded,
                values: readings(&[r("echo", Value::str("hi").unwrap())]),
            })),
        ),
        (
            "up-command-result-unknown",
            Up(Uplink::CommandResult(CommandResult {
                id: u32::MAX,
                status: CommandStatus::UnknownCommand,
                values: Readings::new(),
            })),
        ),
        ("up-ping", Up(Uplink::Ping(Ping { nonce: 0xdead_beef }))),
        // Version 2.
        (
            "up-hello-v2",
            Up(Uplink::Hello(Hello {
                version: 2,
                boot_id: 0x0123_4567_89ab_cdef,
                firmware: Text::new("2.0.0").unwrap(),
                max_frame: 1024,
            })),
        ),
        (
            "up-reported-sync",
            Up(Uplink::Reported(Reported {
                desired_version: 0,
                values: Readings::new(),
            })),
        ),
        (
            "up-reported",
            Up(Uplink::Reported(Reported {
                desired_version: 3,
                values: readings(&[
                    r("interval_s", Value::U64(10)),
                    r("mode", Value::str("eco").unwrap()),
                ]),
            })),
        ),
        (
            "down-welcome-v2",
            Down(Downlink::Welcome(Welcome {
                version: 2,
                heartbeat_s: 30,
                last_acked: Some(41),
                server_time_ms: 1_764_100_000_000,
                max_frame: 4096,
            })),
        ),
        (
            "down-desired",
            Down(Downlink::Desired(Desired {
                version: 3,
                base: 1,
                changes: Changes::from_slice(&[
                    Change::Set(r("interval_s", Value::U64(10))),
                    Change::Unset(name("led")),
                ])
                .unwrap(),
            })),
        ),
        (
            "down-desired-whole",
            Down(Downlink::Desired(Desired {
                version: 3,
                base: 0,
                changes: Changes::from_slice(&[
                    Change::Set(r("interval_s", Value::U64(10))),
                    Change::Set(r("mode", Value::str("eco").unwrap())),
                ])
                .unwrap(),
            })),
        ),
        // Version 3.
        (
            "up-hello-v3",
            Up(Uplink::Hello(Hello {
                version: 3,
                boot_id: 0x0123_4567_89ab_cdef,
                firmware: Text::new("3.0.0").unwrap(),
                max_frame: 1024,
            })),
        ),
        (
            "down-welcome-v3",
            Down(Downlink::Welcome(Welcome {
                version: 3,
                heartbeat_s: 30,
                last_acked: None,
                server_time_ms: 1_764_100_000_000,
                max_frame: 4096,
            })),
        ),
        (
            "down-firmware-offer",
            Down(Downlink::FirmwareOffer(FirmwareOffer {
                id: 7,
                version: Text::new("3.1.0").unwrap(),
                size: 40_000,
                sha256: Fixed(core::array::from_fn(|i| i as u8)),
                signature: Fixed(core::array::from_fn(|i| 0xc0 | (i as u8 & 0x3f))),
            })),
        ),
        (
            "up-firmware-request",
            Up(Uplink::FirmwareRequest(FirmwareRequest {
                id: 7,
                offset: 1_009,
                len: 1_009,
            })),
        ),
        (
            "down-firmware-chunk",
            Down(Downlink::FirmwareChunk(FirmwareChunk {
                id: 7,
                offset: 1_009,
                data: Blob::new(&BYTES).unwrap(),
            })),
        ),
        (
            "down-firmware-chunk-end",
            Down(Downlink::FirmwareChunk(FirmwareChunk {
                id: 7,
                offset: 40_000,
                data: Blob::new(&[]).unwrap(),
            })),
        ),
        (
            "down-firmware-cancel",
            Down(Downlink::FirmwareCancel(FirmwareCancel { id: 7 })),
        ),
        (
            "up-firmware-status",
            Up(Uplink::FirmwareStatus(FirmwareStatus {
                id: 7,
                outcome: FirmwareOutcome::Verified,
            })),
        ),
        (
            "up-firmware-status-tampered",
            Up(Uplink::FirmwareStatus(FirmwareStatus {
                id: 7,
                outcome: FirmwareOutcome::BadSignature,
            })),
        ),
        (
            "down-welcome",
            Down(Downlink::Welcome(Welcome {
                version: 1,
                heartbeat_s: 30,
                last_acked: Some(41),
                server_time_ms: 1_764_100_000_000,
                max_frame: 4096,
            })),
        ),
        (
            "down-welcome-fresh-boot",
            Down(Downlink::Welcome(Welcome {
                version: 1,
                heartbeat_s: 30,
                last_acked: None,
                server_time_ms: 1_764_100_000_000,
                max_frame: 4096,
            })),
        ),
        ("down-ack", Down(Downlink::Ack(Ack { seq: 42 }))),
        (
            "down-command",
            Down(Downlink::Command(Command {
                id: 12,
                name: name("set_interval"),
                args: readings(&[r("interval_s", Value::U64(5))]),
                ttl_ms: 60_000,
            })),
        ),
        (
            "down-command-no-args",
            Down(Downlink::Command(Command {
                id: 1,
                name: name("reboot"),
                args: Readings::new(),
                ttl_ms: 0,
            })),
        ),
        (
            "down-pong",
            Down(Downlink::Pong(Pong { nonce: 0xdead_beef })),
        ),
        (
            "down-goodbye",
            Down(Downlink::Goodbye(Goodbye {
                reason: GoodbyeReason::Overload,
                retry_after_s: 30,
            })),
        ),
        (
            "down-goodbye-revoked",
            Down(Downlink::Goodbye(Goodbye {
                reason: GoodbyeReason::Revoked,
                retry_after_s: 0,
            })),
        ),
    ]
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn parse_hex(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    hex::decode(digits).expect("vector file holds hex")
}

fn render(debug: &str, frame: &[u8]) -> String {
    let mut out = String::new();
    for line in debug.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    for chunk in frame.chunks(16) {
        let line: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&line.join(" "));
        out.push('\n');
    }
    out
}

#[test]
fn golden_vectors_both_ways() {
    let update = std::env::var_os("UPDATE_VECTORS").is_some();
    let mut buf = [0u8; MAX_DOWNLINK_FRAME];
    for (name, msg) in vectors() {
        let (len, debug) = match &msg {
            Msg::Up(m) => (encode(m, &mut buf).unwrap(), format!("{m:#?}")),
            Msg::Down(m) => (encode(m, &mut buf).unwrap(), format!("{m:#?}")),
        };
        let encoded = &buf[..len];
        let path = dir().join(format!("{name}.hex"));
        if update {
            std::fs::write(&path, render(&debug, encoded)).unwrap();
        }
        let golden = parse_hex(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        );
        assert_eq!(
            hex::encode(encoded),
            hex::encode(&golden),
            "encoding of {name}"
        );

        // And back: split the golden frame, decode its body, compare with the value.
        let frame = split_frame(&golden, MAX_FRAME_ON_WIRE).unwrap().unwrap();
        assert_eq!(frame.len, golden.len(), "{name}: one whole frame");
        match &msg {
            Msg::Up(m) => assert_eq!(&decode_uplink(frame.body).unwrap(), m, "{name}"),
            Msg::Down(m) => assert_eq!(&decode_downlink(frame.body).unwrap(), m, "{name}"),
        }
    }
}

#[test]
fn every_vector_file_is_checked() {
    let known: BTreeSet<String> = vectors().iter().map(|(n, _)| format!("{n}.hex")).collect();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if file.ends_with(".hex") {
            assert!(known.contains(&file), "{file} has no test");
        }
    }
}

#[test]
fn hello_and_welcome_carry_the_version_in_byte_two() {
    let hello = parse_hex(&std::fs::read_to_string(dir().join("up-hello.hex")).unwrap());
    let welcome = parse_hex(&std::fs::read_to_string(dir().join("down-welcome.hex")).unwrap());
    assert_eq!(peek_version(&hello[HEADER_LEN..]), Some(1));
    assert_eq!(peek_version(&welcome[HEADER_LEN..]), Some(1));
    let hello = parse_hex(&std::fs::read_to_string(dir().join("up-hello-v2.hex")).unwrap());
    let welcome = parse_hex(&std::fs::read_to_string(dir().join("down-welcome-v2.hex")).unwrap());
    assert_eq!(peek_version(&hello[HEADER_LEN..]), Some(2));
    assert_eq!(peek_version(&welcome[HEADER_LEN..]), Some(2));
    let hello = parse_hex(&std::fs::read_to_string(dir().join("up-hello-v3.hex")).unwrap());
    let welcome = parse_hex(&std::fs::read_to_string(dir().join("down-welcome-v3.hex")).unwrap());
    assert_eq!(peek_version(&hello[HEADER_LEN..]), Some(PROTOCOL_VERSION));
    assert_eq!(peek_version(&welcome[HEADER_LEN..]), Some(PROTOCOL_VERSION));
    // Not a Hello: no version to peek.
    let ping = parse_hex(&std::fs::read_to_string(dir().join("up-ping.hex")).unwrap());
    assert_eq!(peek_version(&ping[HEADER_LEN..]), None);
}

#[test]
fn peek_version_reads_a_long_variant_index_as_the_decoder_does() {
    // Found by fuzzing (fuzz/, target `frame`): variant index 0 spelled `80 00`, a
    // longer varint that decoders accept (PROTOCOL.md §4). The body decodes as a Hello
    // of version 0, so `peek_version` must say 0 too: a gateway that read no version
    // here would skip its Goodbye{UnsupportedVersion} and open a session for a version
    // it does not speak.
    let hello = [0x80, 0x00, 0x00, 0x00, 0x00, 0x00];
    let Ok(Uplink::Hello(h)) = decode_uplink(&hello) else {
        panic!("a Hello with a two-byte variant index")
    };
    assert_eq!(h.version, 0);
    assert_eq!(peek_version(&hello), Some(0));
    // The longest varint a u32 variant index may take (5 bytes), in a Welcome.
    let welcome = [0x80, 0x80, 0x80, 0x80, 0x00, 7, 30, 0, 0, 0x80, 0x01];
    let Ok(Downlink::Welcome(w)) = decode_downlink(&welcome) else {
        panic!("a Welcome with a five-byte variant index")
    };
    assert_eq!(peek_version(&welcome), Some(w.version));
    // One byte longer is not a varint the decoder reads: no version either.
    let too_long = [0x80, 0x80, 0x80, 0x80, 0x80, 0x00, 7, 30, 0, 0, 0x80, 0x01];
    assert!(decode_downlink(&too_long).is_err());
    assert_eq!(peek_version(&too_long), None);
}

#[test]
fn largest_messages_fit_the_type_derived_buffers() {
    // A firmware chunk of the most data at the largest id and offset is the largest
    // downlink message (version 3); it must fit MAX_DOWNLINK_FRAME exactly, and take
    // exactly FIRMWARE_CHUNK_OVERHEAD bytes besides its data.
    let data = [0xa5u8; MAX_CHUNK_LEN];
    let chunk = Downlink::FirmwareChunk(FirmwareChunk {
        id: u32::MAX,
        offset: u32::MAX,
        data: Blob::new(&data).unwrap(),
    });
    let mut buf = [0u8; MAX_DOWNLINK_FRAME];
    assert_eq!(encode(&chunk, &mut buf), Ok(MAX_DOWNLINK_FRAME));
    assert_eq!(MAX_DOWNLINK_FRAME, MAX_CHUNK_LEN + FIRMWARE_CHUNK_OVERHEAD);
    // One byte less does not fit, and says so instead of panicking.
    assert_eq!(
        encode(&chunk, &mut buf[..MAX_DOWNLINK_FRAME - 1]),
        Err(EncodeError::TooLarge {
            available: MAX_DOWNLINK_FRAME - 1
        })
    );
    // A command with the most arguments, each with the longest name and string, is the
    // largest of versions 1 and 2.
    let long = Value::str(LONG_TEXT).unwrap();
    let args: Readings = (0..MAX_READINGS).map(|_| r(LONG_NAME, long)).collect();
    let cmd = Downlink::Command(Command {
        id: u32::MAX,
        name: name(LONG_NAME),
        args,
        ttl_ms: u32::MAX,
    });
    assert_eq!(encode(&cmd, &mut buf), Ok(2671));

    let readings: Readings = (0..MAX_READINGS).map(|_| r(LONG_NAME, long)).collect();
    let tel = Uplink::Telemetry(Telemetry {
        seq: u32::MAX,
        time_ms: Some(u64::MAX),
        readings,
    });
    let mut buf = [0u8; MAX_UPLINK_FRAME];
    assert_eq!(encode(&tel, &mut buf), Ok(MAX_UPLINK_FRAME));
}
