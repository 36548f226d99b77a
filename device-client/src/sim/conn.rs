//! A simulated device's connections: opened through the shared ramp, closed with TLS
//! close_notify, and read through a wrapper that tells a refused handshake from a
//! session that ended.
//!
//! ```text
//!  SimConnector::connect ─► ramp permit ─► TCP + TLS ─► SimConnection ─► driver::run
//!        │ Err: one connect failure                          │ SimReader: a TLS alert
//!        ▼                                                   │ before Welcome = refused
//!  Link (per device): attempt_failed, welcomed, fatal ◄──────┘ (revoked: fatal)
//!  SimConnection dropped (session over, or `run` dropped) ─► Closer: close_notify,
//!        FIN, read to EOF (bounded) on a task the worker waits for before it ends
//! ```
//!
//! The driver's own tokio connector hands out halves it keeps to itself; the simulator
//! opens its connections here so that it still holds the TLS stream when the driver
//! lets go of one, and can end it as PROTOCOL.md §8.5 says a device does.

extern crate std;

use std::cell::{Cell, RefCell};
use std::format;
use std::io;
use std::rc::Rc;
use std::string::String;
use std::sync::Arc;
use std::time::Duration;
use std::vec::Vec;

use embedded_io_adapters::tokio_1::FromTokio;
use rustls::AlertDescription;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use super::device::ThreadCtx;
use crate::driver::tokio::GatewayAddrs;
use crate::driver::{Connection, Connector};

/// The TLS stream of one connection.
type Stream = tokio_rustls::client::TlsStream<TcpStream>;
/// Its halves, as the driver reads and writes them.
type Reader = FromTokio<ReadHalf<Stream>>;
type Writer = FromTokio<WriteHalf<Stream>>;

/// How long closing one connection may take: close_notify and FIN out, then reading
/// until the gateway has closed its side too.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one device's connector, connections and application tell each other.
#[derive(Default)]
pub(crate) struct Link {
    /// The last connect attempt failed and was counted once, as a connect failure; the
    /// `Disconnected` the client reports for it ends no session.
    attempt_failed: Cell<bool>,
    /// The current connection got `Welcome`.
    welcomed: Cell<bool>,
    /// Why the gateway refused this device for good, if it did in the handshake.
    fatal: RefCell<Option<String>>,
    fatal_set: Notify,
}

impl Link {
    /// The session opened (`Event::Connected`).
    pub(crate) fn welcomed(&self) {
        self.welcomed.set(true);
    }

    /// Whether a `Disconnected` event ends a session (else it reports a failed connect,
    /// already counted as one). Call once per event.
    pub(crate) fn ended_a_session(&self) -> bool {
        !self.attempt_failed.replace(false)
    }

    /// Resolves when the gateway refused the device for good; returns why.
    pub(crate) async fn refused_for_good(&self) -> String {
        loop {
            if let Some(why) = self.fatal.borrow_mut().take() {
                return why;
            }
            self.fatal_set.notified().await;
        }
    }

    /// A connect attempt (TCP, TLS handshake, or the first read after a TLS 1.3
    /// handshake) failed with `e`: count it once, and remember a revocation.
    fn refused(&self, ctx: &ThreadCtx, e: &io::Error) {
        ctx.shard().connect_failed(e);
        self.attempt_failed.set(true);
        if refusal_alert(e) == Some(AlertDescription::CertificateRevoked) {
            // PROTOCOL.md §8.5: no reconnect after a revocation, as after
            // Goodbye{Revoked}.
            *self.fatal.borrow_mut() = Some(String::from(
                "revoked: the gateway refused the certificate in the TLS handshake (alert certificate_revoked)",
            ));
            self.fatal_set.notify_one();
        }
    }
}

/// The TLS alert a peer ended the connection with, if `e` is one.
pub(crate) fn refusal_alert(e: &io::Error) -> Option<AlertDescription> {
    // tokio-rustls wraps rustls' error in an `InvalidData` io::Error.
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// Connects through the shared ramp: at most `max_handshakes` connects and handshakes
/// at once across all devices, so thousands of devices starting (or coming back after
/// a gateway restart) do not overflow the gateway's accept backlog.
pub(crate) struct SimConnector {
    /// The gateways, this device's own first (devices spread over them).
    addrs: GatewayAddrs,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    /// Time allowed for TCP connect plus the TLS handshake.
    timeout: Duration,
    ramp: Arc<Semaphore>,
    ctx: Rc<ThreadCtx>,
    link: Rc<Link>,
}

impl SimConnector {
    /// Fails if `server_name` is neither a DNS name nor an IP address.
    /// `spread` picks the device's first gateway among several.
    pub(crate) fn new(
        ctx: Rc<ThreadCtx>,
        link: Rc<Link>,
        tls: Arc<rustls::ClientConfig>,
        spread: usize,
    ) -> Result<Self, String> {
        let settings = &ctx.settings;
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|_| format!("invalid server name {:?}", settings.server_name))?;
        Ok(Self {
            addrs: GatewayAddrs::parse(&settings.gateway).starting_at(spread),
            server_name,
            tls: tokio_rustls::TlsConnector::from(tls),
            timeout: settings.connect_timeout,
            ramp: ctx.ramp.clone(),
            link,
            ctx,
        })
    }

    async fn open(&self) -> io::Result<Stream> {
        let attempt = async {
            let tcp = TcpStream::connect(self.addrs.current()).await?;
            tcp.set_nodelay(true)?;
            self.tls.connect(self.server_name.clone(), tcp).await
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

impl Connector for SimConnector {
    type Error = io::Error;
    type Connection<'c> = SimConnection;

    async fn connect(&mut self) -> Result<SimConnection, io::Error> {
        self.link.attempt_failed.set(false);
        self.link.welcomed.set(false);
        let opened = match self.ramp.acquire().await {
            Ok(_permit) => self.open().await,
            Err(_) => Err(io::Error::other("the simulator is stopping")),
        };
        match opened {
            Ok(stream) => {
                let (r, w) = tokio::io::split(stream);
                Ok(SimConnection {
                    halves: Some((FromTokio::new(r), FromTokio::new(w))),
                    link: self.link.clone(),
                    ctx: self.ctx.clone(),
                })
            }
            Err(e) => {
                self.link.refused(&self.ctx, &e);
                // The next attempt, after the backoff, goes to the next gateway.
                self.addrs.failed();
                Err(e)
            }
        }
    }
}

/// One connection, split for the driver. Dropping it closes it with close_notify.
pub(crate) struct SimConnection {
    /// `Some` until dropped.
    halves: Option<(Reader, Writer)>,
    link: Rc<Link>,
    ctx: Rc<ThreadCtx>,
}

impl Connection for SimConnection {
    type Error = io::Error;
    type Reader<'a> = SimReader<'a>;
    type Writer<'a> = SimWriter<'a>;

    fn split(&mut self) -> (SimReader<'_>, SimWriter<'_>) {
        let (r, w) = match self.halves.as_mut() {
            Some((r, w)) => (Some(r), Some(w)),
            None => (None, None),
        };
        (
            SimReader {
                inner: r,
                link: &self.link,
                ctx: &self.ctx,
            },
            SimWriter { inner: w },
        )
    }
}

impl Drop for SimConnection {
    fn drop(&mut self) {
        if let Some((r, w)) = self.halves.take() {
            self.ctx.closer.close(r.into_inner(), w.into_inner());
        }
    }
}

/// The reading half. A TLS alert before `Welcome` is the gateway refusing the
/// certificate (TLS 1.3 reports it on the first read after the handshake, PROTOCOL.md
/// §8.1): a failed connect, not a session that ended.
pub(crate) struct SimReader<'a> {
    inner: Option<&'a mut Reader>,
    link: &'a Link,
    ctx: &'a ThreadCtx,
}

impl embedded_io_async::ErrorType for SimReader<'_> {
    type Error = io::Error;
}

impl embedded_io_async::Read for SimReader<'_> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, io::Error> {
        let Some(inner) = self.inner.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let read = embedded_io_async::Read::read(*inner, buf).await;
        if let Err(e) = &read
            && !self.link.welcomed.get()
            && refusal_alert(e).is_some()
        {
            self.link.refused(self.ctx, e);
        }
        read
    }
}

/// The writing half.
pub(crate) struct SimWriter<'a> {
    inner: Option<&'a mut Writer>,
}

impl embedded_io_async::ErrorType for SimWriter<'_> {
    type Error = io::Error;
}

impl embedded_io_async::Write for SimWriter<'_> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, io::Error> {
        match self.inner.as_mut() {
            Some(inner) => embedded_io_async::Write::write(*inner, buf).await,
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn flush(&mut self) -> Result<(), io::Error> {
        match self.inner.as_mut() {
            Some(inner) => embedded_io_async::Write::flush(*inner).await,
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

/// The connections of one worker thread being closed; the worker waits for them
/// before it ends, so the last ones (at the end of the run) are closed too.
#[derive(Default)]
pub(crate) struct Closer {
    tasks: RefCell<Vec<JoinHandle<()>>>,
}

impl Closer {
    /// Closes a dropped connection in the background.
    fn close(&self, reader: ReadHalf<Stream>, writer: WriteHalf<Stream>) {
        // Outside a runtime (cannot happen: connections live in device tasks) the
        // halves are simply dropped, which closes the socket without close_notify.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = runtime.spawn(close(reader, writer));
        let mut tasks = self.tasks.borrow_mut();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Waits until every connection handed over so far is closed (or gave up).
    pub(crate) async fn finish(&self) {
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Ends a connection as a device does (PROTOCOL.md §8.5): close_notify, then FIN;
/// then reads until the gateway closes too, so that closing the socket with unread
/// bytes does not send a reset that could overtake the close_notify. Bounded by
/// [`CLOSE_TIMEOUT`]; errors mean the connection was already gone.
async fn close(mut reader: ReadHalf<Stream>, mut writer: WriteHalf<Stream>) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        writer.shutdown().await?;
        let mut sink = [0u8; 512];
        while reader.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}
