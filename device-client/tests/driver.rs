//! The async driver over in-memory pipes with a fake gateway: a session, and resuming
//! after the `run` future was dropped mid-session.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::cell::Cell;
use std::rc::Rc;

use device_client::driver::tokio::{Halves, TokioClock};
use device_client::driver::{App, Connector, run};
use device_client::machine::{Client, Config, Event, Millis};
use device_client::proto::{self, Ack, Command, Downlink, Uplink, Welcome};
use embedded_io_adapters::tokio_1::FromTokio;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Notify;

type Pipe = Halves<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

/// Hands out in-memory connections; the other ends go to a fake gateway task.
struct Pipes {
    connects: Rc<Cell<u32>>,
}

impl Connector for Pipes {
    type Error = std::io::Error;
    type Connection<'c> = Pipe;

    async fn connect(&mut self) -> Result<Pipe, std::io::Error> {
        self.connects.set(self.connects.get() + 1);
        let (device, gateway) = tokio::io::duplex(4096);
        tokio::task::spawn_local(fake_gateway(gateway));
        let (r, w) = tokio::io::split(device);
        Ok(Halves::new(FromTokio::new(r), FromTokio::new(w)))
    }
}

/// Answers Hello with Welcome and acks every record.
async fn fake_gateway(mut io: DuplexStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let Ok(n) = io.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Ok(Some(f)) = proto::split_frame(&buf, 4096) {
            let reply = match proto::decode_uplink(f.body).unwrap() {
                Uplink::Hello(_) => Downlink::Welcome(Welcome {
                    version: 1,
                    heartbeat_s: 30,
                    last_acked: None,
                    server_time_ms: 0,
                    max_frame: 4096,
                }),
                Uplink::Telemetry(t) => Downlink::Ack(Ack { seq: t.seq }),
                _ => continue,
            };
            let mut out = [0u8; 64];
            let len = proto::encode(&reply, &mut out).unwrap();
            io.write_all(&out[..len]).await.unwrap();
            let used = f.len;
            buf.drain(..used);
        }
    }
}

/// Sends one record when connected; reports connections and acks to the test.
struct Recorder {
    wake_at: Option<Millis>,
    connected: Rc<Cell<u32>>,
    acked: Rc<Cell<u32>>,
    changed: Rc<Notify>,
}

impl App for Recorder {
    fn next_wake(&self) -> Option<Millis> {
        self.wake_at
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, _now: Millis, c: &mut Client<R, O>) {
        self.wake_at = None;
        c.send_telemetry(None, &[]).unwrap();
    }

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        _: Millis,
        _: &mut Client<R, O>,
        _: &Command<'_>,
    ) {
    }

    fn on_event<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        _: &mut Client<R, O>,
        event: Event,
    ) {
        match event {
            Event::Connected { .. } => {
                self.connected.set(self.connected.get() + 1);
                self.wake_at = Some(now);
            }
            Event::Acked { .. } => self.acked.set(self.acked.get() + 1),
            _ => return,
        }
        self.changed.notify_one();
    }
}

/// A connector to fake gateways and a recording application, sharing their counters
/// with the test.
fn rig() -> (Pipes, Recorder) {
    let pipes = Pipes {
        connects: Rc::new(Cell::new(0)),
    };
    let app = Recorder {
        wake_at: None,
        connected: Rc::new(Cell::new(0)),
        acked: Rc::new(Cell::new(0)),
        changed: Rc::new(Notify::new()),
    };
    (pipes, app)
}

async fn until(changed: &Notify, check: impl Fn() -> bool) {
    while !check() {
        changed.notified().await;
    }
}

#[tokio::test]
async fn a_dropped_run_resumes_with_a_new_connection() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (mut connector, mut app) = rig();
            let connects = connector.connects.clone();
            let (connected, acked, changed) = (
                app.connected.clone(),
                app.acked.clone(),
                app.changed.clone(),
            );
            let mut client: Client<1024> = Client::new(Config::new(1, "test"));
            let clock = TokioClock::new();
            let (mut rx, mut tx) = ([0u8; 512], [0u8; 512]);

            for round in 1..=2 {
                // Run until this round's record is acked, then drop `run` mid-session.
                let session = run(
                    &mut client,
                    &mut connector,
                    &clock,
                    &mut app,
                    &mut rx,
                    &mut tx,
                );
                let acked_now = acked.clone();
                let done = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    until(&changed, move || acked_now.get() >= round),
                );
                tokio::select! {
                    reason = session => panic!("run ended in round {round}: {reason:?}"),
                    waited = done => waited.expect("no ack within 10 s"),
                }
                assert!(client.is_connected(), "dropped in the middle of a session");
                assert_eq!((connects.get(), connected.get()), (round, round));
            }
        })
        .await;
}

/// Buffers smaller than the client's frame limits: `run` says so at once instead of
/// connecting, failing on the first large frame, and reconnecting forever.
#[tokio::test]
async fn buffers_smaller_than_the_frame_limits_end_run_at_once() {
    use device_client::machine::Disconnect;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (mut connector, mut app) = rig();
            let connects = connector.connects.clone();
            let mut client: Client<1024> = Client::new(Config::new(1, "test"));
            let clock = TokioClock::new();
            let (mut rx, mut tx) = ([0u8; 256], [0u8; 512]);
            let end = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                run(
                    &mut client,
                    &mut connector,
                    &clock,
                    &mut app,
                    &mut rx,
                    &mut tx,
                ),
            )
            .await
            .expect("run returned");
            assert_eq!(
                end,
                Disconnect::BuffersTooSmall {
                    rx_needed: 512,
                    tx_needed: 512
                }
            );
            assert!(end.is_fatal());
            assert_eq!(connects.get(), 0, "never connected");
        })
        .await;
}
