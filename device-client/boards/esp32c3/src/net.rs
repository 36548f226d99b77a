//! The TLS transport: one embassy-net TCP socket, reused for every connection.
//!
//! embassy-net 0.9's `TcpSocket` implements embedded-io-async 0.7, the version of the
//! client's driver, but it is not `Clone`, and the connector reads and writes TLS at the
//! same time through two clones of its stream (`Transport::Stream: Clone`). So the
//! socket lives in a `RefCell` for the life of the firmware and [`SocketStream`] is a
//! copyable handle to it whose `read`, `write` and `flush` borrow the socket only for
//! one poll of embassy-net's own future, never across an `await`. That is correct
//! because those futures keep no state between polls (each poll retries the socket
//! and registers the waker), and safe because the reader and the writer are polled
//! one after the other on one task.
//!
//! [`TcpLink::open`] (the [`Transport`]) aborts what an earlier connection left, waits
//! briefly for its RST to leave, and connects again. The connector drops the previous
//! connection, and with it every stream handle, before it opens the next.

use core::cell::RefCell;
use core::fmt;
use core::future::poll_fn;
use core::pin::pin;

use device_client::driver::embedded_tls::Transport;
use embassy_net::tcp::{ConnectError, Error, TcpSocket};
use embassy_net::{IpEndpoint, Ipv4Address, Stack};
use embassy_time::{Duration, with_timeout};
use embedded_io_async::{ErrorType, Read, Write};

/// A connection makes no progress (unacknowledged data, no reply) for this long: the
/// socket gives up, the driver sees an error and reconnects.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `open` waits for the RST of an aborted connection to go out.
const ABORT_FLUSH: Duration = Duration::from_millis(500);

/// Why the stream to the gateway could not be opened.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// No IPv4 address yet (Wi-Fi down, or DHCP not done).
    NoAddress,
    /// TCP refused or reset, or no route.
    Connect(ConnectError),
}

impl fmt::Debug for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::NoAddress => f.write_str("no IPv4 address (Wi-Fi or DHCP down)"),
            OpenError::Connect(ConnectError::ConnectionReset) => {
                f.write_str("TCP connection refused or reset")
            }
            OpenError::Connect(ConnectError::NoRoute) => f.write_str("no route to the gateway"),
            OpenError::Connect(e) => write!(f, "TCP connect: {e:?}"),
        }
    }
}

/// The socket, shared by the transport and the stream handles.
pub type SharedSocket = RefCell<TcpSocket<'static>>;

/// The [`Transport`] to the gateway at `gateway` over `socket`.
pub struct TcpLink {
    stack: Stack<'static>,
    socket: &'static SharedSocket,
    gateway: IpEndpoint,
}

impl TcpLink {
    /// A transport that connects `socket` (made on `stack`) to `ip:port`.
    pub fn new(
        stack: Stack<'static>,
        socket: &'static SharedSocket,
        ip: [u8; 4],
        port: u16,
    ) -> Self {
        let [a, b, c, d] = ip;
        Self {
            stack,
            socket,
            gateway: IpEndpoint::new(Ipv4Address::new(a, b, c, d).into(), port),
        }
    }
}

impl Transport for TcpLink {
    type Error = OpenError;
    type Stream = SocketStream;

    #[expect(
        clippy::await_holding_refcell_ref,
        reason = "no stream handle is alive while the connector opens the next stream"
    )]
    async fn open(&mut self) -> Result<SocketStream, OpenError> {
        if !self.stack.is_config_up() {
            return Err(OpenError::NoAddress);
        }
        // No stream handle is alive here (module doc): holding the borrow across the
        // awaits below cannot collide with a read or a write. (embassy-net's `connect`
        // keeps state between polls, so it cannot be borrowed per poll like `read`.)
        let mut socket = self.socket.borrow_mut();
        socket.abort();
        // Tell the gateway the old connection is gone (an RST), unless the link is down.
        let _ = with_timeout(ABORT_FLUSH, socket.flush()).await;
        socket.set_timeout(Some(SOCKET_TIMEOUT));
        // TLS writes whole records: send them at once.
        socket.set_nagle_enabled(false);
        socket
            .connect(self.gateway)
            .await
            .map_err(OpenError::Connect)?;
        Ok(SocketStream {
            socket: self.socket,
        })
    }
}

/// A handle to the connected socket: `Copy`, so TLS's reader and writer each hold one.
#[derive(Clone, Copy)]
pub struct SocketStream {
    socket: &'static SharedSocket,
}

impl ErrorType for SocketStream {
    type Error = Error;
}

impl Read for SocketStream {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        let socket = self.socket;
        poll_fn(|cx| {
            let mut socket = socket.borrow_mut();
            let op = pin!(socket.read(buf));
            op.poll(cx)
        })
        .await
    }
}

impl Write for SocketStream {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Error> {
        let socket = self.socket;
        poll_fn(|cx| {
            let mut socket = socket.borrow_mut();
            let op = pin!(socket.write(buf));
            op.poll(cx)
        })
        .await
    }

    async fn flush(&mut self) -> Result<(), Error> {
        let socket = self.socket;
        poll_fn(|cx| {
            let mut socket = socket.borrow_mut();
            let op = pin!(socket.flush());
            op.poll(cx)
        })
        .await
    }
}
