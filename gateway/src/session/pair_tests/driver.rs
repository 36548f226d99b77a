//! The device client's async driver (`device_client::driver::run`) over in-memory
//! pipes, each served by the gateway's machine and the real store: a session, then
//! resuming after the `run` future was dropped mid-session.

use std::cell::Cell;
use std::rc::Rc;

use device_client::driver::tokio::{Halves, TokioClock};
use device_client::driver::{App, Connector, run};
use device_client::machine::{Client, Config, Event, Millis};
use device_client::proto::Command;
use embedded_io_adapters::tokio_1::FromTokio;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Notify;

use super::*;

type Pipe = Halves<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

/// Hands out in-memory connections; the other ends go to `serve`.
struct Pipes {
    connects: Rc<Cell<u32>>,
    store: Store,
    rules: Arc<Rules>,
}

impl Connector for Pipes {
    type Error = std::io::Error;
    type Connection<'c> = Pipe;

    async fn connect(&mut self) -> Result<Pipe, std::io::Error> {
        self.connects.set(self.connects.get() + 1);
        let (device, gateway) = tokio::io::duplex(4096);
        tokio::task::spawn_local(serve(gateway, self.store.clone(), self.rules.clone()));
        let (r, w) = tokio::io::split(device);
        Ok(Halves::new(FromTokio::new(r), FromTokio::new(w)))
    }
}

/// The gateway's side of one pipe: the machine, the store, commits in line.
async fn serve(io: DuplexStream, store: Store, rules: Arc<Rules>) {
    let mut gw = Machine::new(rules, Now::real());
    let (mut r, mut w) = tokio::io::split(io);
    let mut buf = [0u8; 1024];
    loop {
        let out = gw.transmit().to_vec();
        if !out.is_empty() {
            if w.write_all(&out).await.is_err() {
                return;
            }
            gw.transmitted(out.len());
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let Ok(fed) = gw.handle_bytes(Now::real(), &buf[..n]) else {
            return;
        };
        if let Some(h) = fed.hello {
            let info = SessionInfo {
                device: DEVICE.into(),
                cert_serial: "01".into(),
                cert_not_after: 0,
                firmware: h.firmware.clone(),
                peer_addr: "pipe".into(),
                boot_id: h.boot_id,
            };
            let opened = store.open_session(info).await.unwrap();
            gw.opened(Now::real(), &h, opened).unwrap();
        }
        while let Some(batch) = gw.poll_batch(Now::real()) {
            let done = store.submit(batch).await.unwrap().await.unwrap();
            gw.handle_committed(Now::real(), done).unwrap();
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

async fn until(changed: &Notify, check: impl Fn() -> bool) {
    while !check() {
        changed.notified().await;
    }
}

#[test]
fn a_dropped_run_resumes_with_a_new_connection() {
    let p = Pair::new();
    let local = tokio::task::LocalSet::new();
    p.rt.block_on(local.run_until(async {
        let mut connector = Pipes {
            connects: Rc::new(Cell::new(0)),
            store: p.store.clone(),
            rules: p.rules.clone(),
        };
        let connects = connector.connects.clone();
        let mut app = Recorder {
            wake_at: None,
            connected: Rc::new(Cell::new(0)),
            acked: Rc::new(Cell::new(0)),
            changed: Rc::new(Notify::new()),
        };
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
                Duration::from_secs(10),
                until(&changed, move || acked_now.get() >= round),
            );
            tokio::select! {
                reason = session => panic!("run ended in round {round}: {reason:?}"),
                waited = done => waited.expect("no ack within 10 s"),
            }
            assert!(client.is_connected(), "dropped in the middle of a session");
            assert_eq!((connects.get(), connected.get()), (round, round));
        }
    }));
    assert_eq!(p.stored(), vec![1, 2], "each round's record stored once");
}
