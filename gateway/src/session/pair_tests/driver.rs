//! The device client's async driver (`device_client::driver::run`) over in-memory
//! pipes, each served by the gateway's machine and the real store: a session, then
//! resuming after the `run` future was dropped mid-session, and a backlog packed into
//! as few writes as the send buffer allows.

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use device_client::driver::tokio::{Halves, TokioClock};
use device_client::driver::{App, Connector, run};
use device_client::machine::{Client, Config, Disconnect, Event, Millis};
use device_client::proto::Command;
use embedded_io_adapters::tokio_1::FromTokio;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Notify;

use super::*;

type Pipe = Halves<ReadHalf<DuplexStream>, Counted<WriteHalf<DuplexStream>>>;

/// Hands out in-memory connections; the other ends go to `serve`.
struct Pipes {
    connects: Rc<Cell<u32>>,
    /// Write calls the device made, over all connections.
    writes: Rc<Cell<u32>>,
    store: Store,
    rules: Arc<Rules>,
}

impl Pipes {
    fn new(p: &Pair) -> Self {
        Self {
            connects: Rc::new(Cell::new(0)),
            writes: Rc::new(Cell::new(0)),
            store: p.store.clone(),
            rules: p.rules.clone(),
        }
    }
}

/// The device's write half, counting the writes that took bytes (over rustls, each
/// would be a TLS record and a system call).
struct Counted<W> {
    inner: W,
    writes: Rc<Cell<u32>>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.writes.set(self.writes.get() + 1);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connector for Pipes {
    type Error = std::io::Error;
    type Connection<'c> = Pipe;

    async fn connect(&mut self) -> Result<Pipe, std::io::Error> {
        self.connects.set(self.connects.get() + 1);
        let (device, gateway) = tokio::io::duplex(4096);
        tokio::task::spawn_local(serve(gateway, self.store.clone(), self.rules.clone()));
        let (r, w) = tokio::io::split(device);
        let w = Counted {
            inner: w,
            writes: self.writes.clone(),
        };
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
            let opened = store.open_session(info, |_| {}).await.unwrap();
            gw.opened(Now::real(), &h, opened).unwrap();
        }
        while let Some(batch) = gw.poll_batch(Now::real()) {
            let done = store.submit(batch).await.unwrap().await.unwrap();
            gw.handle_committed(Now::real(), done).unwrap();
        }
    }
}

/// Sends one record when connected (if `send_on_connect`); reports connections and the
/// highest seq acked to the test.
struct Recorder {
    send_on_connect: bool,
    wake_at: Option<Millis>,
    connected: Rc<Cell<u32>>,
    acked: Rc<Cell<Seq>>,
    changed: Rc<Notify>,
}

impl Recorder {
    fn new(send_on_connect: bool) -> Self {
        Self {
            send_on_connect,
            wake_at: None,
            connected: Rc::new(Cell::new(0)),
            acked: Rc::new(Cell::new(0)),
            changed: Rc::new(Notify::new()),
        }
    }
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
                self.wake_at = self.send_on_connect.then_some(now);
            }
            Event::Acked { seq } => self.acked.set(seq),
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

/// Polls `session` (a `driver::run`) until `seq` is acked, then drops it mid-session;
/// fails if the run ends first or no such ack comes within 10 s.
async fn run_until_acked(
    session: impl Future<Output = Disconnect>,
    changed: &Notify,
    acked: &Cell<Seq>,
    seq: Seq,
) {
    let done = tokio::time::timeout(
        Duration::from_secs(10),
        until(changed, || acked.get() >= seq),
    );
    tokio::select! {
        reason = session => panic!("run ended before seq {seq} was acked: {reason:?}"),
        waited = done => waited.expect("an ack within 10 s"),
    }
}

#[test]
fn a_dropped_run_resumes_with_a_new_connection() {
    let p = Pair::new();
    let local = tokio::task::LocalSet::new();
    p.rt.block_on(local.run_until(async {
        let mut connector = Pipes::new(&p);
        let connects = connector.connects.clone();
        let mut app = Recorder::new(true);
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
            run_until_acked(session, &changed, &acked, round).await;
            assert!(client.is_connected(), "dropped in the middle of a session");
            assert_eq!((connects.get(), connected.get()), (round, round));
        }
    }));
    assert_eq!(p.stored(), vec![1, 2], "each round's record stored once");
}

/// Sends a backlog of 30 records queued before the connection, with a send buffer of
/// `tx` bytes (the client's frames are at most 512); returns the device's write calls,
/// the Hello's included.
fn writes_for_a_backlog(tx: &mut [u8]) -> u32 {
    const BACKLOG: Seq = 30;
    let p = Pair::new();
    let local = tokio::task::LocalSet::new();
    let writes = p.rt.block_on(local.run_until(async {
        let mut connector = Pipes::new(&p);
        let mut app = Recorder::new(false);
        let (acked, changed) = (app.acked.clone(), app.changed.clone());
        let mut client: Client<1024> = Client::new(Config::new(1, "test").with_frames(512, 512));
        for _ in 0..BACKLOG {
            client.send_telemetry(None, &[]).unwrap();
        }
        let clock = TokioClock::new();
        let mut rx = [0u8; 512];
        let session = run(&mut client, &mut connector, &clock, &mut app, &mut rx, tx);
        run_until_acked(session, &changed, &acked, BACKLOG).await;
        connector.writes.get()
    }));
    assert_eq!(p.stored(), (1..=BACKLOG).collect::<Vec<_>>());
    writes
}

/// A send buffer one frame long: one frame per write, as before packing. Four frames
/// long: the whole backlog (30 small records) in one write after the Hello.
#[test]
fn a_backlog_leaves_in_as_few_writes_as_the_send_buffer_allows() {
    let one_frame = writes_for_a_backlog(&mut [0u8; 512]);
    assert!(
        one_frame > 30,
        "{one_frame} writes for a Hello and 30 records"
    );
    assert_eq!(
        writes_for_a_backlog(&mut [0u8; 4 * 512]),
        2,
        "the Hello, then the backlog"
    );
}
