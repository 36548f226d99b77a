//! The client state machine against an in-memory fake gateway with a manual clock:
//! deterministic, no I/O, no sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;

use device_client::machine::{
    Client, CompleteError, Config, Disconnect, Event, Input, Millis, SendError, Unacked,
};
use device_client::proto::{
    self, Ack, Command, CommandStatus, Downlink, Goodbye, GoodbyeReason, MAX_DOWNLINK_FRAME,
    MAX_UPLINK_FRAME, Name, Pong, Reading, Readings, Seq, Uplink, Value, Welcome,
};

const H: u16 = 10; // heartbeat, seconds

/// What the fake gateway does with each uplink message.
#[derive(Default)]
struct FakeGateway {
    /// (boot id, seq) stored, like the real store's unique key.
    stored: BTreeSet<(u64, Seq)>,
    /// Every telemetry frame received, duplicates included.
    received: Vec<Seq>,
    results: Vec<(u32, CommandStatus, usize)>,
    boot: u64,
    ack: bool,
    pong: bool,
    /// Frames for the device.
    out: Vec<u8>,
    hellos: usize,
}

impl FakeGateway {
    fn new() -> Self {
        Self {
            ack: true,
            pong: true,
            ..Self::default()
        }
    }

    fn send(&mut self, msg: &Downlink<'_>) {
        let mut buf = [0u8; MAX_DOWNLINK_FRAME];
        let n = proto::encode(msg, &mut buf).unwrap();
        self.out.extend_from_slice(&buf[..n]);
    }

    /// Handles every complete frame in `bytes`.
    fn ingest(&mut self, mut bytes: &[u8]) {
        while let Some(f) = proto::split_frame(bytes, MAX_UPLINK_FRAME).unwrap() {
            match proto::decode_uplink(f.body).unwrap() {
                Uplink::Hello(h) => {
                    self.hellos += 1;
                    self.boot = h.boot_id;
                    let last = self
                        .stored
                        .iter()
                        .filter(|(b, _)| *b == h.boot_id)
                        .map(|(_, s)| *s)
                        .max();
                    self.send(&Downlink::Welcome(Welcome {
                        version: 1,
                        heartbeat_s: H,
                        last_acked: last,
                        server_time_ms: 1_764_100_000_000,
                        max_frame: 4096,
                    }));
                }
                Uplink::Telemetry(t) => {
                    self.received.push(t.seq);
                    self.stored.insert((self.boot, t.seq));
                    if self.ack {
                        self.send(&Downlink::Ack(Ack { seq: t.seq }));
                    }
                }
                Uplink::CommandResult(r) => self.results.push((r.id, r.status, r.values.len())),
                Uplink::Ping(p) => {
                    if self.pong {
                        self.send(&Downlink::Pong(Pong { nonce: p.nonce }));
                    }
                }
            }
            bytes = &bytes[f.len..];
        }
    }

    fn command(&mut self, id: u32, name: &str) {
        self.send(&Downlink::Command(Command {
            id,
            name: Name::new(name).unwrap(),
            args: Readings::new(),
            ttl_ms: 0,
        }));
    }
}

type Dev = Client<1024, 256>;

struct Harness {
    dev: Dev,
    gw: FakeGateway,
    now: Millis,
    events: Vec<Event>,
    /// Commands the application received.
    commands: Vec<u32>,
}

impl Harness {
    fn new() -> Self {
        let mut cfg = Config::new(0xb007, "test-fw");
        cfg.jitter_seed = 42;
        Self {
            dev: Client::new(cfg),
            gw: FakeGateway::new(),
            now: 0,
            events: Vec::new(),
            commands: Vec::new(),
        }
    }

    /// Connects and runs until quiet.
    fn connect(&mut self) {
        assert!(self.dev.poll_connect().is_some_and(|t| t <= self.now));
        self.dev.handle_connected(self.now);
        self.gw.out.clear();
        self.pump();
        assert!(self.dev.is_open());
    }

    /// Moves frames both ways until neither side has anything to say.
    fn pump(&mut self) {
        self.pump_limited(usize::MAX);
    }

    /// Like `pump`, but the wire breaks after `budget` device→gateway bytes.
    fn pump_limited(&mut self, mut budget: usize) {
        loop {
            let mut moved = false;
            let mut buf = [0u8; 512];
            while let Some(n) = self.dev.poll_transmit(self.now, &mut buf) {
                let take = n.min(budget);
                budget -= take;
                self.gw.ingest(&buf[..take]);
                moved = true;
                if budget == 0 {
                    self.dev.handle_closed(self.now);
                    self.drain();
                    return;
                }
            }
            let input = std::mem::take(&mut self.gw.out);
            let mut rest = &input[..];
            while !rest.is_empty() {
                match self.dev.handle_input(self.now, rest) {
                    Ok(Input::NeedMore) => panic!("fake gateway sends whole frames"),
                    Ok(Input::Frame { len, command }) => {
                        if let Some(c) = command {
                            self.commands.push(c.id);
                        }
                        rest = &rest[len..];
                        moved = true;
                    }
                    Err(_) => {
                        self.drain();
                        return;
                    }
                }
            }
            self.drain();
            if !moved {
                return;
            }
        }
    }

    fn drain(&mut self) {
        while let Some(e) = self.dev.poll_event() {
            self.events.push(e);
        }
    }

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

    /// Advances the manual clock to `t`, firing the client's timers on the way.
    fn advance_to(&mut self, t: Millis) -> Result<(), Disconnect> {
        self.now = t;
        let r = self.dev.handle_timeout(t);
        self.drain();
        r
    }

    fn stored(&self) -> Vec<Seq> {
        self.gw.stored.iter().map(|(_, s)| *s).collect()
    }
}

#[test]
fn records_are_acked_and_leave_the_ring() {
    let mut h = Harness::new();
    h.connect();
    assert!(matches!(
        h.events[0],
        Event::Connected {
            last_acked: None,
            ..
        }
    ));
    let seqs = h.send(20);
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    h.pump();
    assert_eq!(h.stored(), seqs);
    assert_eq!(h.dev.unacked(), Unacked::default());
    assert_eq!(h.dev.acked(), Some(20));
}

#[test]
fn lost_acks_are_settled_by_welcome_last_acked() {
    let mut h = Harness::new();
    h.connect();
    h.gw.ack = false; // the gateway stores but its acks are lost
    h.send(5);
    h.pump();
    assert_eq!(h.dev.unacked().records, 5, "nothing acked: all kept");
    h.dev.handle_closed(h.now);
    h.gw.ack = true;
    h.now = h.dev.poll_connect().unwrap();
    h.connect();
    assert_eq!(
        h.dev.unacked().records,
        0,
        "Welcome.last_acked = 5 frees them"
    );
    assert_eq!(
        h.gw.received,
        vec![1, 2, 3, 4, 5],
        "no replay of stored records"
    );
    h.send(1);
    h.pump();
    assert_eq!(h.stored(), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn reconnect_mid_batch_replays_the_rest_once() {
    let mut h = Harness::new();
    h.connect();
    h.gw.ack = false;
    h.send(10);
    // The link breaks in the middle of record 5 (each record frame is 10 bytes here).
    h.pump_limited(10 * 4 + 3);
    assert!(!h.dev.is_connected());
    assert_eq!(h.gw.received, vec![1, 2, 3, 4]);
    h.gw.ack = true;
    h.now = h.dev.poll_connect().unwrap();
    h.connect();
    assert_eq!(
        h.gw.received,
        (1..=10).collect::<Vec<_>>(),
        "5..=10 replayed once"
    );
    assert_eq!(h.stored(), (1..=10).collect::<Vec<_>>());
    assert_eq!(h.dev.unacked().records, 0);
}

#[test]
fn duplicate_commands_run_once_and_get_the_result_again() {
    let mut h = Harness::new();
    h.connect();
    h.gw.command(7, "echo");
    h.gw.command(7, "echo"); // while running: ignored
    h.pump();
    assert_eq!(h.commands, vec![7]);
    let v = Reading::new(Name::new("echo").unwrap(), Value::str("hi").unwrap());
    h.dev
        .complete_command(7, CommandStatus::Succeeded, &[v])
        .unwrap();
    assert_eq!(
        h.dev.complete_command(7, CommandStatus::Failed, &[]),
        Err(CompleteError::NotRunning),
        "a result is given once"
    );
    h.pump();
    assert_eq!(h.gw.results, vec![(7, CommandStatus::Succeeded, 1)]);

    // The gateway did not record it (say) and sends it again after a reconnect.
    h.dev.handle_closed(h.now);
    h.now = h.dev.poll_connect().unwrap();
    h.connect();
    h.gw.command(7, "echo");
    h.pump();
    assert_eq!(h.commands, vec![7], "not run again");
    assert_eq!(
        h.gw.results.last(),
        Some(&(7, CommandStatus::Succeeded, 0)),
        "the status again, without the values"
    );
}

#[test]
fn a_full_ring_is_an_error_never_an_overwrite() {
    let mut h = Harness::new();
    let mut sent = 0;
    loop {
        match h.send_one() {
            Ok(_) => sent += 1,
            Err(SendError::RingFull) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // 28 bytes a record (4 of seq, 24 of frame) in 1024 bytes.
    assert_eq!(sent, 1024 / 28);
    assert_eq!(h.dev.unacked().records, sent);
    // Connecting delivers all of them, in order, then there is room again.
    h.connect();
    assert_eq!(h.stored(), (1..=sent as Seq).collect::<Vec<_>>());
    assert!(h.send_one().is_ok());
}

impl Harness {
    fn send_one(&mut self) -> Result<Seq, SendError> {
        let name = Name::new("temperature").unwrap();
        self.dev
            .send_telemetry(Some(1), &[Reading::new(name, Value::F32(21.5))])
    }
}

#[test]
fn heartbeats_and_dead_peer_detection() {
    let mut h = Harness::new();
    h.connect();
    let hb = Millis::from(H) * 1000;
    assert_eq!(
        h.dev.poll_timeout(),
        Some(hb),
        "first ping due after a quiet interval"
    );
    h.advance_to(hb).unwrap();
    h.pump();
    assert!(h.events.iter().any(|e| matches!(e, Event::Pong { .. })));
    // Now the gateway goes silent.
    h.gw.pong = false;
    h.advance_to(2 * hb).unwrap();
    h.pump(); // the ping goes out, nothing comes back
    let t = h.dev.poll_timeout().unwrap();
    assert_eq!(t, 3 * hb);
    assert_eq!(h.advance_to(t), Err(Disconnect::DeadPeer));
    assert!(!h.dev.is_connected());
    let at = h.dev.poll_connect().unwrap();
    assert!(
        at > h.now && at <= h.now + 1000,
        "first backoff is within 1 s"
    );
}

#[test]
fn goodbye_retry_after_and_backoff() {
    let mut h = Harness::new();
    h.connect();
    h.gw.send(&Downlink::Goodbye(Goodbye {
        reason: GoodbyeReason::Overload,
        retry_after_s: 30,
    }));
    h.pump();
    let at = h.dev.poll_connect().unwrap();
    assert!(at >= h.now + 30_000, "retry-after is obeyed");
    assert!(h.events.iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reason: Disconnect::Goodbye {
                reason: GoodbyeReason::Overload,
                retry_after_s: 30
            },
            ..
        }
    )));

    // Failed attempts back off exponentially with jitter, capped at 60 s.
    let mut waits = Vec::new();
    for _ in 0..10 {
        h.now = h.dev.poll_connect().unwrap();
        h.dev.handle_connect_failed(h.now);
        waits.push(h.dev.poll_connect().unwrap() - h.now);
    }
    for (i, w) in waits.iter().enumerate() {
        let base = (1000u64 << (i + 1)).min(60_000);
        assert!(
            *w >= base / 2 && *w <= base,
            "attempt {i}: {w} ms for base {base}"
        );
    }
    // Success resets the backoff.
    h.now = h.dev.poll_connect().unwrap();
    h.connect();
    h.dev.handle_closed(h.now);
    assert!(h.dev.poll_connect().unwrap() - h.now <= 1000);
}

#[test]
fn revoked_is_final() {
    let mut h = Harness::new();
    h.connect();
    h.gw.send(&Downlink::Goodbye(Goodbye {
        reason: GoodbyeReason::Revoked,
        retry_after_s: 0,
    }));
    h.pump();
    assert_eq!(h.dev.poll_connect(), None, "never reconnects");
    assert!(h.events.iter().any(|e| matches!(
        e,
        Event::Disconnected {
            reconnect_at: None,
            ..
        }
    )));
    // Telemetry still queues (the application may hold on to it).
    assert!(h.send_one().is_ok());
}

#[test]
fn welcome_timeout() {
    let mut h = Harness::new();
    h.dev.handle_connected(0);
    let mut buf = [0u8; 512];
    assert!(h.dev.poll_transmit(0, &mut buf).is_some(), "Hello");
    assert_eq!(h.dev.poll_timeout(), Some(10_000));
    assert_eq!(h.advance_to(10_000), Err(Disconnect::WelcomeTimeout));
}

/// PROTOCOL.md §6: no peer may announce a `max_frame` below 128. A `Welcome` that does
/// ends the connection (nothing could be sent to such a gateway) instead of opening a
/// session in which every record waits forever.
#[test]
fn a_welcome_with_a_max_frame_below_the_minimum_is_refused() {
    let mut h = Harness::new();
    h.dev.handle_connected(0);
    let mut buf = [0u8; 512];
    assert!(h.dev.poll_transmit(0, &mut buf).is_some(), "Hello");
    let mut frame = [0u8; MAX_DOWNLINK_FRAME];
    let n = proto::encode(
        &Downlink::Welcome(Welcome {
            version: 1,
            heartbeat_s: H,
            last_acked: None,
            server_time_ms: 1_764_100_000_000,
            max_frame: 64,
        }),
        &mut frame,
    )
    .unwrap();
    let r = h.dev.handle_input(0, &frame[..n]);
    assert_eq!(r, Err(Disconnect::MaxFrameTooSmall(64)));
    assert!(!h.dev.is_connected());
}

#[test]
fn garbage_from_the_gateway_drops_the_connection() {
    let mut h = Harness::new();
    h.connect();
    let r = h.dev.handle_input(h.now, &[0, 2, 99, 0]);
    assert!(matches!(r, Err(Disconnect::BadMessage(_))));
    assert!(!h.dev.is_connected());
    // A frame larger than the device's buffer is refused from its header alone.
    h.now = h.dev.poll_connect().unwrap();
    h.connect();
    let r = h.dev.handle_input(h.now, &[0x10, 0x00]);
    assert!(matches!(r, Err(Disconnect::BadFrame(_))));
}

#[test]
fn records_wait_while_disconnected_and_go_in_order() {
    let mut h = Harness::new();
    h.send(3);
    h.connect();
    h.send(2);
    h.pump();
    assert_eq!(h.gw.received, vec![1, 2, 3, 4, 5]);
    assert_eq!(h.gw.hellos, 1);
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
    let _ = Readings::new();
}
