//! The async driver's checks before it connects. Sessions through the driver are
//! tested against the real gateway's state machine and store, in the gateway crate
//! (`gateway/src/session/pair_tests.rs`, `driver::a_dropped_run_resumes_with_a_new_connection`).
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use device_client::driver::tokio::{Halves, TokioClock};
use device_client::driver::{App, Connector, LinkError, run};
use device_client::machine::{Client, Config, Disconnect, Millis};
use device_client::proto::Command;
use embedded_io_adapters::tokio_1::FromTokio;
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

type Pipe = Halves<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

/// Buffers smaller than the client's frame limits: `run` says so at once instead of
/// connecting, failing on the first large frame, and reconnecting forever.
#[tokio::test]
async fn buffers_smaller_than_the_frame_limits_end_run_at_once() {
    let mut connector = Flaky::default();
    let mut client: Client<1024> = Client::new(Config::new(1, "test"));
    let clock = TokioClock::new();
    let (mut rx, mut tx) = ([0u8; 256], [0u8; 512]);
    let end = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        run(
            &mut client,
            &mut connector,
            &clock,
            &mut Errors::default(),
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
    assert_eq!(connector.attempts, 0, "never connected");
}

/// Refuses the first two connects, then hands out connections whose far end is gone.
#[derive(Default)]
struct Flaky {
    attempts: u32,
}

impl Connector for Flaky {
    type Error = std::io::Error;
    type Connection<'c> = Pipe;

    async fn connect(&mut self) -> Result<Pipe, std::io::Error> {
        self.attempts += 1;
        if self.attempts <= 2 {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        let (device, gateway) = tokio::io::duplex(64);
        drop(gateway);
        let (r, w) = tokio::io::split(device);
        Ok(Halves::new(FromTokio::new(r), FromTokio::new(w)))
    }
}

/// Records what `on_link_error` was told.
#[derive(Default)]
struct Errors {
    seen: Vec<String>,
}

impl App for Errors {
    fn next_wake(&self) -> Option<Millis> {
        None
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, _: Millis, _: &mut Client<R, O>) {}

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        _: Millis,
        _: &mut Client<R, O>,
        _: &Command<'_>,
    ) {
    }

    fn on_link_error(&mut self, _: Millis, error: LinkError<'_>) {
        self.seen.push(format!("{error:?}"));
    }
}

/// A failed connect and a broken connection reach the application with the transport's
/// own error, not only as a closed connection.
#[tokio::test(start_paused = true)]
async fn the_transports_errors_reach_the_application() {
    let mut connector = Flaky::default();
    let mut app = Errors::default();
    let mut client: Client<1024> = Client::new(Config::new(1, "test"));
    let clock = TokioClock::new();
    let (mut rx, mut tx) = ([0u8; 512], [0u8; 512]);
    // Virtual time: the backoff waits pass at once; the run is cut after 30 s of it.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        run(
            &mut client,
            &mut connector,
            &clock,
            &mut app,
            &mut rx,
            &mut tx,
        ),
    )
    .await;
    assert!(connector.attempts >= 3, "{} attempts", connector.attempts);
    assert_eq!(
        &app.seen[..2],
        [
            "Connect(Kind(ConnectionRefused))",
            "Connect(Kind(ConnectionRefused))"
        ]
    );
    let broken = &app.seen[2];
    assert!(
        broken == "Closed" || broken.starts_with("Write("),
        "the far end is gone: {broken}"
    );
}
