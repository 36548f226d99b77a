//! The only code that awaits: one run loop over `embedded-io-async`, so the same loop
//! runs on embassy (a microcontroller) and on tokio (the simulator).
//!
//! ```text
//!  run(client, connector, clock, app, rx, tx)
//!   loop ──► wait for poll_connect / app wake-ups ──► connector.connect() ──► session
//!   session = select(reader, control):
//!     reader : read(rx) ─► client.handle_input ─► app.on_command ─► wake control
//!     control: poll_transmit ─► write(tx) ; handle_timeout ; app.on_wake ; sleep until
//!              min(client.poll_timeout, app.next_wake) or woken by the reader
//! ```
//!
//! A read is never cancelled while the session lives: TLS readers (embedded-tls) lose
//! bytes if a read is dropped half-way. Reading and writing therefore run side by side
//! on the two halves of a [`Connection`], sharing the client through a `RefCell` that is
//! never borrowed across an `await`.
//!
//! **Cancellation.** Dropping the future returned by [`run`] at any point is safe: the
//! client stays consistent (records stay in the ring, results in the outbox) and the
//! connection is dropped; call [`run`] again to carry on.

use core::cell::{Cell, RefCell};
use core::future::{Future, poll_fn};
use core::task::{Poll, Waker};

use embassy_futures::select::{Either, select};
use embedded_io_async::{Error as _, ErrorKind, Read, Write};

use crate::machine::{Client, Disconnect, Event, FirmwareMsg, Input, Millis};
use crate::proto::{Command, Desired};

#[cfg(feature = "embedded-tls")]
pub mod embedded_tls;
#[cfg(feature = "tokio")]
pub mod tokio;

/// A monotonic clock in milliseconds, and a way to sleep on it.
pub trait Clock {
    /// Now.
    fn now(&self) -> Millis;
    /// Resolves at or after `at`. Must be cancel-safe (a timer is).
    fn sleep_until(&self, at: Millis) -> impl Future<Output = ()>;
}

/// An open, secured connection that can be read and written at the same time.
pub trait Connection {
    /// Transport error.
    type Error: embedded_io_async::Error;
    /// The reading half.
    type Reader<'a>: Read<Error = Self::Error>
    where
        Self: 'a;
    /// The writing half.
    type Writer<'a>: Write<Error = Self::Error>
    where
        Self: 'a;
    /// Both halves, borrowed for one session.
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
}

/// Opens a fresh secured connection to the gateway, once per (re)connect.
///
/// A connection may borrow from its connector (`Connection<'c>`): embedded-tls keeps
/// its record buffers for a connection's whole life, so a connector that owns them
/// lends them to one connection at a time.
pub trait Connector {
    /// Why a connection could not be opened.
    type Error: core::fmt::Debug;
    /// The connection, possibly borrowing from the connector.
    type Connection<'c>: Connection
    where
        Self: 'c;
    /// Opens TCP (or a UART, or ...) and completes the TLS handshake.
    fn connect(&mut self) -> impl Future<Output = Result<Self::Connection<'_>, Self::Error>>;
}

/// The device's application, called by [`run`]. Every method is synchronous and short:
/// the loop handles I/O while the application is not running.
pub trait App {
    /// When [`on_wake`](Self::on_wake) is next due (e.g. the next sample), if ever.
    fn next_wake(&self) -> Option<Millis>;

    /// The wake-up time passed: take readings and queue them with
    /// [`Client::send_telemetry`]. Called whether or not a session is open.
    fn on_wake<const R: usize, const O: usize>(&mut self, now: Millis, client: &mut Client<R, O>);

    /// A new command: run it and answer with [`Client::complete_command`] (now or at a
    /// later wake-up). A repeated command never reaches this method.
    fn on_command<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        command: &Command<'_>,
    );

    /// Changes to the desired state arrived (protocol version 2): apply them, and
    /// report the values with [`Client::report_state`] if the gateway should show
    /// them. The client reports the new desired version on its own. Optional: a device
    /// without settings ignores them.
    fn on_desired<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        desired: &Desired<'_>,
    ) {
        let _ = (now, client, desired);
    }

    /// A firmware transfer message arrived (protocol version 3): an offer, a chunk or
    /// a withdrawn offer. Answer with [`Client::request_firmware`] and
    /// [`Client::firmware_status`]; the [`firmware`](crate::firmware) module's
    /// `Updater` does the bookkeeping. Optional: a device that never updates ignores
    /// them, and the gateway's rollout sees no progress from it.
    fn on_firmware<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        firmware: &FirmwareMsg<'_>,
    ) {
        let _ = (now, client, firmware);
    }

    /// Something happened (connected, acked, disconnected ...). Optional.
    fn on_event<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        event: Event,
    ) {
        let _ = (now, client, event);
    }

    /// The link failed, and this is what the transport said (the client only sees a
    /// closed connection: `Disconnect::Closed`, or a failed connect). Optional: for a
    /// log line or a status LED. [`run`] retries on its own either way.
    fn on_link_error(&mut self, now: Millis, error: LinkError<'_>) {
        let _ = (now, error);
    }
}

/// Why a connection could not be opened or ended, as the transport reported it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum LinkError<'e> {
    /// [`Connector::connect`] failed: its own error (TCP refused, a TLS alert, the
    /// gateway's certificate refused, a timeout ...).
    Connect(&'e dyn core::fmt::Debug),
    /// A read from the connection failed.
    Read(ErrorKind),
    /// A write to the connection failed.
    Write(ErrorKind),
    /// The gateway (or the network) closed the connection: end of stream.
    Closed,
}

/// Runs the device until the gateway refuses it for good (revoked certificate,
/// unsupported protocol version) and returns that reason. Connection failures are
/// retried with the client's backoff. (If the client is down for good and the
/// application never wants to wake up again, there is nothing left to do: `run`
/// returns the last disconnect reason, or `Disconnect::Closed`.) `rx` must hold
/// `client.config().max_frame_in` bytes and `tx` `client.config().max_frame_out` bytes;
/// smaller ones return [`Disconnect::BuffersTooSmall`] at once. A `tx` several frames
/// long lets `run` pack a backlog into one write (one TLS record over rustls) while it
/// has room for one more frame of the largest size.
pub async fn run<C, K, A, const R: usize, const O: usize>(
    client: &mut Client<R, O>,
    connector: &mut C,
    clock: &K,
    app: &mut A,
    rx: &mut [u8],
    tx: &mut [u8],
) -> Disconnect
where
    C: Connector,
    K: Clock,
    A: App,
{
    // Checked before anything: a frame that does not fit would end every session
    // the same way, and reconnecting forever would hide why.
    let cfg = client.config();
    if rx.len() < usize::from(cfg.max_frame_in) || tx.len() < usize::from(cfg.max_frame_out) {
        return Disconnect::BuffersTooSmall {
            rx_needed: cfg.max_frame_in,
            tx_needed: cfg.max_frame_out,
        };
    }
    // A previous `run` may have been dropped in the middle of a session: that
    // connection is gone, so the client must schedule a new one.
    if client.is_connected() {
        client.handle_closed(clock.now());
    }
    let shared = Shared {
        client: RefCell::new(client),
        app: RefCell::new(app),
        wake: WakeSignal::new(),
        fatal: RefCell::new(None),
    };
    loop {
        shared.drain_events(clock.now());
        if let Some(reason) = shared.fatal.borrow_mut().take() {
            return reason;
        }
        let now = clock.now();
        shared.app_wake_if_due(now);
        let connect_at = shared.client.borrow().poll_connect();
        match connect_at {
            Some(at) if at <= now => {
                match connector.connect().await {
                    Ok(mut conn) => {
                        shared.client.borrow_mut().handle_connected(clock.now());
                        session(&shared, &mut conn, clock, rx, tx).await;
                        shared.client.borrow_mut().handle_closed(clock.now());
                    }
                    Err(e) => {
                        let now = clock.now();
                        shared
                            .app
                            .borrow_mut()
                            .on_link_error(now, LinkError::Connect(&e));
                        shared.client.borrow_mut().handle_connect_failed(now);
                    }
                }
                continue;
            }
            _ => {}
        }
        let app_at = shared.app.borrow().next_wake();
        match earliest(connect_at, app_at) {
            Some(at) => clock.sleep_until(at).await,
            // Nothing will ever happen: down for good, and an idle application.
            None => {
                shared.drain_events(clock.now());
                return shared
                    .fatal
                    .borrow_mut()
                    .take()
                    .unwrap_or(Disconnect::Closed);
            }
        }
    }
}

struct Shared<'c, 'a, A, const R: usize, const O: usize> {
    client: RefCell<&'c mut Client<R, O>>,
    app: RefCell<&'a mut A>,
    wake: WakeSignal,
    fatal: RefCell<Option<Disconnect>>,
}

impl<A: App, const R: usize, const O: usize> Shared<'_, '_, A, R, O> {
    /// Hands every pending event to the application; remembers a fatal disconnect.
    fn drain_events(&self, now: Millis) {
        let mut client = self.client.borrow_mut();
        let mut app = self.app.borrow_mut();
        while let Some(ev) = client.poll_event() {
            if let Event::Disconnected {
                reason,
                reconnect_at: None,
            } = &ev
            {
                *self.fatal.borrow_mut() = Some(reason.clone());
            }
            app.on_event(now, &mut **client, ev);
        }
    }

    /// Tells the application what the transport said, unless the client had already
    /// closed the connection itself (a `Goodbye`, a protocol error: the end it
    /// expected).
    fn link_error(&self, now: Millis, error: LinkError<'_>) {
        if self.client.borrow().is_connected() {
            self.app.borrow_mut().on_link_error(now, error);
        }
    }

    fn app_wake_if_due(&self, now: Millis) {
        let due = self.app.borrow().next_wake().is_some_and(|t| t <= now);
        if due {
            let mut client = self.client.borrow_mut();
            self.app.borrow_mut().on_wake(now, &mut **client);
        }
    }
}

/// One session: reader and control side by side until either ends.
async fn session<C, K, A, const R: usize, const O: usize>(
    shared: &Shared<'_, '_, A, R, O>,
    conn: &mut C,
    clock: &K,
    rx: &mut [u8],
    tx: &mut [u8],
) where
    C: Connection,
    K: Clock,
    A: App,
{
    let (mut reader, mut writer) = conn.split();
    let read_side = read_loop(shared, &mut reader, clock, rx);
    let control_side = control_loop(shared, &mut writer, clock, tx);
    match select(read_side, control_side).await {
        Either::First(()) | Either::Second(()) => {}
    }
}

async fn read_loop<Rd: Read, K: Clock, A: App, const R: usize, const O: usize>(
    shared: &Shared<'_, '_, A, R, O>,
    reader: &mut Rd,
    clock: &K,
    rx: &mut [u8],
) {
    let mut filled = 0;
    loop {
        let Some(free) = rx.get_mut(filled..).filter(|f| !f.is_empty()) else {
            // A frame larger than the buffer: the client refuses those before this.
            return;
        };
        match reader.read(free).await {
            Ok(0) => return shared.link_error(clock.now(), LinkError::Closed),
            Err(e) => return shared.link_error(clock.now(), LinkError::Read(e.kind())),
            Ok(n) => filled += n,
        }
        let mut start = 0;
        let mut ended = false;
        while start < filled {
            let now = clock.now();
            let mut client = shared.client.borrow_mut();
            let Some(bytes) = rx.get(start..filled) else {
                break;
            };
            match client.handle_input(now, bytes) {
                Ok(Input::NeedMore) => break,
                Ok(Input::Frame { len, command }) => {
                    start += len;
                    if let Some(cmd) = command {
                        shared.app.borrow_mut().on_command(now, &mut **client, &cmd);
                    }
                }
                Ok(Input::Desired { len, desired }) => {
                    start += len;
                    shared
                        .app
                        .borrow_mut()
                        .on_desired(now, &mut **client, &desired);
                }
                Ok(Input::Firmware { len, firmware }) => {
                    start += len;
                    shared
                        .app
                        .borrow_mut()
                        .on_firmware(now, &mut **client, &firmware);
                }
                Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        shared.drain_events(clock.now());
        shared.wake.signal();
        if ended {
            return;
        }
        rx.copy_within(start..filled, 0);
        filled -= start;
    }
}

async fn control_loop<Wr: Write, K: Clock, A: App, const R: usize, const O: usize>(
    shared: &Shared<'_, '_, A, R, O>,
    writer: &mut Wr,
    clock: &K,
    tx: &mut [u8],
) {
    loop {
        let now = clock.now();
        shared.app_wake_if_due(now);
        let timed_out = shared.client.borrow_mut().handle_timeout(now).is_err();
        shared.drain_events(now);
        if timed_out {
            return;
        }
        // Send everything the client has: frames packed into `tx` while it has room
        // for one more of the largest, then one write. Over rustls a write is a TLS
        // record (and a system call), so a backlog goes in a few records instead of
        // one per frame. With `tx` just one frame long, this is one frame per write.
        let frame_max = usize::from(shared.client.borrow().config().max_frame_out);
        let (mut packed, mut wrote) = (0, false);
        loop {
            let room = tx.get_mut(packed..).unwrap_or_default();
            let n = if room.len() >= frame_max {
                shared.client.borrow_mut().poll_transmit(clock.now(), room)
            } else {
                None
            };
            if let Some(n) = n {
                packed += n;
                continue;
            }
            // Full, or nothing more to send: write what is packed.
            let Some(frames) = tx.get(..packed).filter(|f| !f.is_empty()) else {
                break;
            };
            if let Err(e) = writer.write_all(frames).await {
                return shared.link_error(clock.now(), LinkError::Write(e.kind()));
            }
            (packed, wrote) = (0, true);
        }
        if wrote && let Err(e) = writer.flush().await {
            return shared.link_error(clock.now(), LinkError::Write(e.kind()));
        }
        shared.drain_events(clock.now());
        if !shared.client.borrow().is_connected() {
            // Went down (a Goodbye, say): end the session.
            return;
        }
        let deadline = earliest(
            shared.client.borrow().poll_timeout(),
            shared.app.borrow().next_wake(),
        );
        match deadline {
            Some(at) => match select(shared.wake.wait(), clock.sleep_until(at)).await {
                Either::First(()) | Either::Second(()) => {}
            },
            None => shared.wake.wait().await,
        }
    }
}

fn earliest(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Wakes the control side when the reader handled input. Single-task use only: both
/// sides are polled by the same task, so `Cell`s suffice.
struct WakeSignal {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl WakeSignal {
    const fn new() -> Self {
        Self {
            set: Cell::new(false),
            waker: Cell::new(None),
        }
    }

    fn signal(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn wait(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}
