//! The same session through `device_client::driver::run`, with a dummy connector,
//! connection, clock and application (no TLS, no hardware), on embassy-futures'
//! `block_on`.
//!
//! The dummy connection plays the gateway from a script: each frame is delivered once
//! the client has written a given number of frames, so the order is the protocol's
//! (`Welcome` only after `Hello`, the `Ack` after the records ...). The clock is
//! virtual: a sleep yields once (so the reader gets polled) and then jumps to its
//! deadline.

use core::cell::Cell;
use core::convert::Infallible;
use core::future::{Future, poll_fn};
use core::hint::black_box;
use core::task::Poll;

use device_client::driver::{App, Clock, Connection, Connector, run};
use device_client::machine::{Client as AnyClient, Disconnect, Event, Millis};
use device_client::proto::{Command, GoodbyeReason};
use embedded_io_async::{ErrorType, Read, Write};

use crate::scenario::{Inputs, answer, readings};
use crate::{Client, frames};

/// (frames the client must have written, gateway frame to deliver then), in order.
const SCRIPT: [(usize, &[u8]); 5] = [
    (1, frames::WELCOME),         // after Hello
    (4, frames::ACK),             // after the three records
    (4, frames::COMMAND),         // delivered in the same read as the Ack
    (5, frames::PONG),            // after the command's result
    (5, frames::GOODBYE_REVOKED), // fatal: `run` returns
];

/// Records the application takes, one a second.
const SAMPLES: u32 = 3;

/// Virtual time after which the scenario has gone wrong (it needs about 2 s).
const GIVE_UP_MS: Millis = 600_000;

/// A connection whose peer is [`SCRIPT`].
pub struct ScriptedConnection {
    written: Cell<usize>,
    next: Cell<usize>,
}

/// The reading half of a [`ScriptedConnection`].
pub struct ScriptReader<'a>(&'a ScriptedConnection);
/// The writing half of a [`ScriptedConnection`].
pub struct ScriptWriter<'a>(&'a ScriptedConnection);

impl ErrorType for ScriptReader<'_> {
    type Error = Infallible;
}

impl ErrorType for ScriptWriter<'_> {
    type Error = Infallible;
}

impl Read for ScriptReader<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        let conn = self.0;
        poll_fn(|_| {
            // Every frame that is due and fits, back to back in one read.
            let mut filled = 0;
            while let Some(&(after, frame)) = SCRIPT.get(conn.next.get()) {
                let frame = black_box(frame);
                let Some(dst) = buf.get_mut(filled..filled + frame.len()) else {
                    break;
                };
                if conn.written.get() < after {
                    break;
                }
                dst.copy_from_slice(frame);
                filled += frame.len();
                conn.next.set(conn.next.get() + 1);
            }
            if filled > 0 || conn.next.get() >= SCRIPT.len() {
                // End of the script: the peer closes (0 bytes).
                Poll::Ready(Ok(filled))
            } else {
                // `block_on` polls again without a wake-up.
                Poll::Pending
            }
        })
        .await
    }
}

impl Write for ScriptWriter<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        // Each frame arrives in one `write_all`, hence one `write`.
        black_box(buf);
        self.0.written.set(self.0.written.get() + 1);
        Ok(buf.len())
    }

    async fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

impl Connection for ScriptedConnection {
    type Error = Infallible;
    type Reader<'a> = ScriptReader<'a>;
    type Writer<'a> = ScriptWriter<'a>;

    fn split(&mut self) -> (ScriptReader<'_>, ScriptWriter<'_>) {
        (ScriptReader(self), ScriptWriter(self))
    }
}

/// Connects once; later attempts fail.
pub struct OnceConnector {
    connected: bool,
}

impl Connector for OnceConnector {
    type Error = ();
    type Connection<'c> = ScriptedConnection;

    async fn connect(&mut self) -> Result<ScriptedConnection, ()> {
        if core::mem::replace(&mut self.connected, true) {
            return Err(());
        }
        Ok(ScriptedConnection {
            written: Cell::new(0),
            next: Cell::new(0),
        })
    }
}

/// A virtual clock: sleeping yields once, then jumps to the deadline.
pub struct VirtualClock {
    now: Cell<Millis>,
}

impl Clock for VirtualClock {
    fn now(&self) -> Millis {
        self.now.get()
    }

    fn sleep_until(&self, at: Millis) -> impl Future<Output = ()> {
        let mut yielded = false;
        poll_fn(move |_| {
            if !yielded {
                yielded = true;
                return Poll::Pending;
            }
            // A session that never ends would otherwise run forever.
            assert!(at < GIVE_UP_MS, "the scripted session did not end");
            self.now.set(self.now.get().max(at));
            Poll::Ready(())
        })
    }
}

/// A sensor: [`SAMPLES`] records a second apart, answers commands, counts events.
pub struct Sensor<'i> {
    inputs: &'i Inputs,
    next: Option<Millis>,
    samples: u32,
    commands: u32,
    connected: u32,
    acked: u32,
}

impl App for Sensor<'_> {
    fn next_wake(&self) -> Option<Millis> {
        self.next
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, now: Millis, c: &mut AnyClient<R, O>) {
        let time = Some(self.inputs.time_ms + now);
        if c.send_telemetry(time, &readings(self.inputs, self.samples))
            .is_ok()
        {
            self.samples += 1;
        }
        self.next = (self.samples < SAMPLES).then_some(now + 1_000);
    }

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        c: &mut AnyClient<R, O>,
        cmd: &Command<'_>,
    ) {
        let (status, values) = answer(cmd);
        if c.complete_command(cmd.id, status, &values).is_ok() {
            self.commands += 1;
        }
    }

    fn on_event<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        _c: &mut AnyClient<R, O>,
        event: Event,
    ) {
        match event {
            Event::Connected { .. } => self.connected += 1,
            Event::Acked { .. } => self.acked += 1,
            _ => {}
        }
    }
}

/// Everything `run` borrows, set up as a board would.
pub struct Setup<'i> {
    connector: OnceConnector,
    clock: VirtualClock,
    app: Sensor<'i>,
}

impl<'i> Setup<'i> {
    /// A fresh connector, clock and application.
    pub fn new(inputs: &'i Inputs) -> Self {
        Self {
            connector: OnceConnector { connected: false },
            clock: VirtualClock {
                now: Cell::new(black_box(0)),
            },
            app: Sensor {
                inputs,
                next: Some(0),
                samples: 0,
                commands: 0,
                connected: 0,
                acked: 0,
            },
        }
    }

    /// The size of `run`'s future: it lives on the caller's stack (or in a task).
    pub fn run_future_size(&mut self, client: &mut Client, rx: &mut [u8], tx: &mut [u8]) -> usize {
        let fut = run(
            client,
            &mut self.connector,
            &self.clock,
            &mut self.app,
            rx,
            tx,
        );
        core::mem::size_of_val(&fut)
    }

    /// Runs the session to its fatal `Goodbye`; returns whether everything happened as
    /// scripted.
    pub fn run(&mut self, client: &mut Client, rx: &mut [u8], tx: &mut [u8]) -> bool {
        let reason = embassy_futures::block_on(run(
            client,
            &mut self.connector,
            &self.clock,
            &mut self.app,
            rx,
            tx,
        ));
        let app = &self.app;
        matches!(
            reason,
            Disconnect::Goodbye {
                reason: GoodbyeReason::Revoked,
                ..
            }
        ) && app.samples == SAMPLES
            && app.commands == 1
            && app.connected == 1
            && app.acked == 1
            && client.unacked().records == 0
    }
}
