//! The transport under TLS: an embassy-net TCP socket to the gateway.
//!
//! embedded-tls reads and writes at the same time through two clones of the stream
//! (`Transport::Stream: Clone`), but an embassy-net `TcpSocket` is one value whose
//! `read` and `write` take `&mut self`, and its `split()` halves borrow it and are
//! neither clones of each other nor both `Read + Write`. [`TcpStream`] is the handle
//! the connector needs: a shared reference to the socket in a `RefCell`, borrowed only
//! for the length of one poll. That is sound for embassy-net's socket because its
//! `read`, `write` and `flush` futures hold no state between polls (each poll tries
//! again and registers the socket's receive or send waker), so a future may be made
//! afresh for every poll; the reader and the writer wait on different wakers.
//!
//! embassy-net 0.9 implements embedded-io-async 0.7, the version device-client's driver
//! uses; [`TcpStream`] implements the same traits (with embassy-net 0.7, which
//! implements embedded-io-async 0.6, this is where the 0.6 -> 0.7 adaptation would go).

use core::cell::RefCell;
use core::future::poll_fn;
use core::pin::pin;
use core::task::Poll;

use device_client::driver::embedded_tls::Transport;
use embassy_net::IpEndpoint;
use embassy_net::tcp::{ConnectError, Error, TcpSocket};
use embedded_io_async::{ErrorType, Read, Write};

/// One TCP connection at a time to the gateway, on one socket.
pub struct TcpLink<'s, 'b> {
    socket: &'s RefCell<TcpSocket<'b>>,
    gateway: IpEndpoint,
}

impl<'s, 'b> TcpLink<'s, 'b> {
    /// Connects `socket` to `gateway` whenever the connector opens the transport.
    pub fn new(socket: &'s RefCell<TcpSocket<'b>>, gateway: IpEndpoint) -> Self {
        Self { socket, gateway }
    }
}

/// Why the TCP connection could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// The stream of an earlier connection is still in use (a bug: the driver drops a
    /// connection before it opens the next one).
    Busy,
    /// The gateway refused or did not answer, or the network is down.
    Connect(ConnectError),
}

impl<'s, 'b> Transport for TcpLink<'s, 'b> {
    type Error = LinkError;
    type Stream = TcpStream<'s, 'b>;

    // The socket stays borrowed while it connects: no stream of an earlier connection
    // is polled meanwhile (the driver drops a connection before it dials again), and
    // one that were would fail its borrow and report a reset (`TcpStream`).
    #[expect(clippy::await_holding_refcell_ref, reason = "see above")]
    async fn open(&mut self) -> Result<TcpStream<'s, 'b>, LinkError> {
        let mut socket = self.socket.try_borrow_mut().map_err(|_| LinkError::Busy)?;
        // Whatever the last connection left (a half-closed socket after the gateway's
        // Goodbye, or one still open after a read error): reset it, so the socket is
        // closed and may connect again.
        socket.abort();
        let _ = socket.flush().await;
        socket
            .connect(self.gateway)
            .await
            .map_err(LinkError::Connect)?;
        drop(socket);
        Ok(TcpStream {
            socket: self.socket,
        })
    }
}

/// An open connection: a handle to the socket that may be cloned (module doc). Each
/// read, write or flush borrows the socket for one poll; a handle polled while the
/// socket is connecting again (a stale one) gets `ConnectionReset`.
#[derive(Clone, Copy)]
pub struct TcpStream<'s, 'b> {
    socket: &'s RefCell<TcpSocket<'b>>,
}

impl ErrorType for TcpStream<'_, '_> {
    type Error = Error;
}

impl Read for TcpStream<'_, '_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        poll_fn(|cx| {
            let Ok(mut socket) = self.socket.try_borrow_mut() else {
                return Poll::Ready(Err(Error::ConnectionReset));
            };
            pin!(socket.read(buf)).poll(cx)
        })
        .await
    }
}

impl Write for TcpStream<'_, '_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Error> {
        poll_fn(|cx| {
            let Ok(mut socket) = self.socket.try_borrow_mut() else {
                return Poll::Ready(Err(Error::ConnectionReset));
            };
            pin!(socket.write(buf)).poll(cx)
        })
        .await
    }

    async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| {
            let Ok(mut socket) = self.socket.try_borrow_mut() else {
                return Poll::Ready(Err(Error::ConnectionReset));
            };
            pin!(socket.flush()).poll(cx)
        })
        .await
    }
}
