//! The client state machine on its own, on a manual clock: what it does with no gateway
//! at all, or with bytes no real gateway sends. Everything a gateway takes part in is
//! tested against the real gateway's state machine and store, in the gateway crate
//! (`gateway/src/session/pair_tests.rs`): acks after commits, replays, takeover,
//! heartbeats on both sides, retry-after, command de-duplication.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use device_client::machine::{Client, Config, Disconnect, Input, Millis, SendError, Unacked};
use device_client::proto::{
    self, Downlink, MAX_DOWNLINK_FRAME, Name, Reading, Uplink, Value, Welcome,
};

type Dev = Client<1024, 256>;

fn device() -> Dev {
    let mut cfg = Config::new(0xb007, "test-fw");
    cfg.jitter_seed = 42;
    Client::new(cfg)
}

/// Connects at `now` and takes the `Hello` off the wire.
fn hello_sent(dev: &mut Dev, now: Millis) {
    dev.handle_connected(now);
    let mut buf = [0u8; 512];
    assert!(dev.poll_transmit(now, &mut buf).is_some(), "Hello");
}

/// A `Welcome` frame as the bytes a gateway would send.
fn welcome(max_frame: u16) -> Vec<u8> {
    welcome_v(1, max_frame)
}

/// [`welcome`] of protocol `version`.
fn welcome_v(version: u8, max_frame: u16) -> Vec<u8> {
    let mut frame = [0u8; MAX_DOWNLINK_FRAME];
    let n = proto::encode(
        &Downlink::Welcome(Welcome {
            version,
            heartbeat_s: 10,
            last_acked: None,
            server_time_ms: 1_764_100_000_000,
            max_frame,
        }),
        &mut frame,
    )
    .unwrap();
    frame[..n].to_vec()
}

fn send_one(dev: &mut Dev) -> Result<u32, SendError> {
    let name = Name::new("temperature").unwrap();
    dev.send_telemetry(Some(1), &[Reading::new(name, Value::F32(21.5))])
}

#[test]
fn a_full_ring_is_an_error_never_an_overwrite() {
    let mut dev = device();
    let mut sent = 0;
    loop {
        match send_one(&mut dev) {
            Ok(_) => sent += 1,
            Err(SendError::RingFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // 28 bytes a record (4 of seq, 24 of frame) in 1024 bytes.
    assert_eq!(sent, 1024 / 28);
    assert_eq!(dev.unacked().records, sent);
}

#[test]
fn failed_connects_back_off_exponentially_with_jitter() {
    let mut dev = device();
    let mut now = dev.poll_connect().unwrap();
    let mut waits = Vec::new();
    for _ in 0..10 {
        dev.handle_connect_failed(now);
        waits.push(dev.poll_connect().unwrap() - now);
        now = dev.poll_connect().unwrap();
    }
    for (i, w) in waits.iter().enumerate() {
        let base = (1000u64 << i).min(60_000);
        assert!(
            *w >= base / 2 && *w <= base,
            "attempt {i}: {w} ms for base {base}"
        );
    }
    // Success resets the backoff.
    hello_sent(&mut dev, now);
    assert!(matches!(
        dev.handle_input(now, &welcome(4096)),
        Ok(Input::Frame { .. })
    ));
    assert!(dev.is_open());
    dev.handle_closed(now);
    assert!(dev.poll_connect().unwrap() - now <= 1000);
}

#[test]
fn welcome_timeout() {
    let mut dev = device();
    hello_sent(&mut dev, 0);
    assert_eq!(dev.poll_timeout(), Some(10_000));
    assert_eq!(dev.handle_timeout(10_000), Err(Disconnect::WelcomeTimeout));
}

/// PROTOCOL.md §6: no peer may announce a `max_frame` below 128. A `Welcome` that does
/// ends the connection (nothing could be sent to such a gateway) instead of opening a
/// session in which every record waits forever.
#[test]
fn a_welcome_with_a_max_frame_below_the_minimum_is_refused() {
    let mut dev = device();
    hello_sent(&mut dev, 0);
    let w = welcome(64);
    assert_eq!(
        dev.handle_input(0, &w),
        Err(Disconnect::MaxFrameTooSmall(64))
    );
    assert!(!dev.is_connected());
}

#[test]
fn garbage_from_the_gateway_drops_the_connection() {
    let mut dev = device();
    hello_sent(&mut dev, 0);
    dev.handle_input(0, &welcome(4096)).unwrap();
    let r = dev.handle_input(0, &[0, 2, 99, 0]);
    assert!(matches!(r, Err(Disconnect::BadMessage(_))));
    assert!(!dev.is_connected());
    // A frame larger than the device's buffer is refused from its header alone.
    let at = dev.poll_connect().unwrap();
    hello_sent(&mut dev, at);
    dev.handle_input(at, &welcome(4096)).unwrap();
    let r = dev.handle_input(at, &[0x10, 0x00]);
    assert!(matches!(r, Err(Disconnect::BadFrame(_))));
}

#[test]
fn telemetry_over_the_frame_limit_is_refused() {
    let mut cfg = Config::new(1, "fw");
    cfg.max_frame_out = 64;
    let mut dev: Dev = Client::new(cfg);
    let text = "x".repeat(100);
    let long = Value::str(&text).unwrap();
    let r = dev.send_telemetry(None, &[Reading::new(Name::new("s").unwrap(), long)]);
    assert_eq!(r, Err(SendError::TooLarge));
    assert_eq!(dev.unacked(), Unacked::default());
}

/// The report a version 2 session owes right after `Welcome` is not lost when the
/// report the application queued is too large for this gateway and is dropped: the
/// client sends the plain one instead, before any telemetry. (Found by the
/// `client_machine` fuzz target: the dropped report had cleared the debt.)
#[test]
fn a_dropped_report_still_leaves_the_owed_report_to_send() {
    let mut dev = device();
    hello_sent(&mut dev, 0);
    assert!(dev.handle_input(0, &welcome_v(2, 128)).is_ok());
    // 138 bytes: over the gateway's 128, within the device's own 512.
    let long = "x".repeat(128);
    let value = Value::str(&long).unwrap();
    dev.report_state(&[Reading::new(Name::new("note").unwrap(), value)])
        .unwrap();
    send_one(&mut dev).unwrap();
    let mut buf = [0u8; 512];
    let n = dev.poll_transmit(0, &mut buf).expect("a frame");
    match proto::decode_uplink(&buf[2..n]).unwrap() {
        proto::Uplink::Reported(r) => {
            assert_eq!(r.desired_version, 0);
            assert!(r.values.is_empty());
        }
        other => panic!("expected the owed Reported first, got {other:?}"),
    }
    let n = dev.poll_transmit(0, &mut buf).expect("the record");
    assert!(matches!(
        proto::decode_uplink(&buf[2..n]).unwrap(),
        proto::Uplink::Telemetry(_)
    ));
}

/// PROTOCOL.md §8.4: a device that keeps sending but hears nothing back (no ack, no
/// pong: the link died without a close, or the gateway's bytes were lost to a reset)
/// pings and, still hearing nothing, gives the connection up. A ping only when
/// nothing was *sent* for a heartbeat would never go out from a device that sends
/// every second, and it would wait on a dead link forever.
#[test]
fn a_device_that_sends_steadily_but_hears_nothing_finds_the_link_dead() {
    let mut dev = device();
    hello_sent(&mut dev, 0);
    let w = welcome(1024);
    assert!(dev.handle_input(0, &w).is_ok());
    let mut buf = [0u8; 512];
    let mut pinged = false;
    let mut dead_at = None;
    // A record a second, for up to 30 s (three heartbeats of 10 s; the ring holds
    // them all); the gateway says nothing after `Welcome`.
    for t in (1_000..=30_000).step_by(1_000) {
        if let Err(reason) = dev.handle_timeout(t) {
            dead_at = Some((t, reason));
            break;
        }
        send_one(&mut dev).unwrap();
        while let Some(n) = dev.poll_transmit(t, &mut buf) {
            if let Ok(Uplink::Ping(_)) = proto::decode_uplink(&buf[2..n]) {
                pinged = true;
            }
        }
    }
    assert!(pinged, "a ping went out");
    let (t, reason) = dead_at.expect("the link was found dead");
    assert_eq!(reason, Disconnect::DeadPeer);
    assert!(
        t <= 20_000,
        "within two heartbeats of the last frame received: {t}"
    );
}
