//! A device's TLS connection on rustls's unbuffered API: this stream owns every buffer,
//! and frees each one while it is empty, so an idle connection holds none.
//!
//! ```text
//!   TCP ──► incoming (TLS bytes) ──process_tls_records──► plain ──► poll_read
//!   TCP ◄── outgoing (TLS bytes) ◄──encrypt / encode─────────────── poll_write
//!            all three: Vec::new() again once drained (no allocation while idle)
//! ```
//!
//! rustls's buffered connection (what tokio-rustls wraps) keeps a 4 KiB receive buffer
//! for the connection's whole life: 3.5 of the 11.35 KiB an idle connection cost
//! (docs/BENCHMARKS.md). Here the receive buffer exists only while a record is
//! being read.
//!
//! The handshake ([`accept`]) ends only when rustls has verified the client's
//! certificate: a TLS 1.3 server may send data before that (0.5-RTT), so "may write" is
//! not "done".

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What one read from the socket asks room for.
const READ_SIZE: usize = 4096;
/// Most TLS bytes held while the handshake runs (rustls's own bound on a handshake
/// message, and a record's header).
const MAX_HANDSHAKE_BYTES: usize = 0xffff + 5;
/// Most TLS bytes held afterwards: one whole record (16 KiB of data, its header and
/// the most a cipher adds).
const MAX_RECORD_BYTES: usize = 16_384 + 5 + 256;
/// Encrypted bytes that `poll_write` queues before it waits for the socket.
const MAX_QUEUED: usize = 64 * 1024;

/// A server-side TLS connection over TCP; see the module docs.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// `incoming[..received]`: TLS bytes read, not yet processed.
    incoming: Vec<u8>,
    received: usize,
    /// `plain[plain_at..]`: application data decrypted, not yet read.
    plain: Vec<u8>,
    plain_at: usize,
    /// `outgoing[sent..]`: TLS bytes to send.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer has closed (close_notify, or the TCP stream ended).
    eof: bool,
    /// Our close_notify is queued.
    closing: bool,
}

/// What the caller may do after one call into rustls.
enum Step {
    /// Something changed (data decrypted, bytes queued): ask again.
    Again,
    /// rustls needs more bytes from the peer.
    NeedBytes,
    /// The handshake is far enough to send application data (maybe not finished).
    MayWrite,
    /// `n` bytes of the caller's data (or the close_notify) were encrypted.
    Wrote(usize),
    /// Both sides have closed.
    Closed,
}

/// What to encrypt, if rustls lets us write.
#[derive(Clone, Copy)]
enum Write<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Performs the server's side of a TLS handshake on `tcp`. A rustls error comes back
/// inside the `io::Error` (as with tokio-rustls), after the alert rustls made for it
/// was sent, if the socket took it at once.
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        tcp,
        conn,
        incoming: Vec::new(),
        received: 0,
        plain: Vec::new(),
        plain_at: 0,
        outgoing: Vec::new(),
        sent: 0,
        eof: false,
        closing: false,
    };
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl TlsStream {
    /// The TCP stream (to wait for readability; never read or write it directly).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The client's certificate chain, once the handshake is done.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let step = match self.step(Write::Nothing) {
                Ok(step) => step,
                Err(e) => {
                    self.send_alert(cx);
                    return Poll::Ready(Err(tls_error(e)));
                }
            };
            match step {
                Step::Again | Step::Wrote(_) => {}
                Step::MayWrite if !self.conn.is_handshaking() => {
                    // The server's last flight (and session tickets) go out now.
                    ready!(self.poll_send(cx))?;
                    return Poll::Ready(Ok(()));
                }
                Step::MayWrite | Step::NeedBytes => {
                    ready!(self.poll_send(cx))?;
                    if ready!(self.poll_fill(cx, MAX_HANDSHAKE_BYTES))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            }
        }
    }

    /// After a fatal error rustls queues an alert: encode it and send it if the socket
    /// takes it now (a refused device then learns why); never waits.
    fn send_alert(&mut self, cx: &mut Context<'_>) {
        // Encode, transmit, then the error again: a few steps at most.
        for _ in 0..4 {
            if self.step(Write::Nothing).is_err() {
                break;
            }
        }
        let _ = self.poll_send(cx);
    }

    /// One call into rustls: handles what needs no I/O, and says what else is needed.
    fn step(&mut self, write: Write<'_>) -> Result<Step, rustls::Error> {
        let UnbufferedStatus { mut discard, state } = self
            .conn
            .process_tls_records(&mut self.incoming[..self.received]);
        let step = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                let mut result = Ok(Step::Again);
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(r) => {
                            discard += r.discard;
                            if self.plain_at == self.plain.len() {
                                self.plain.clear();
                                self.plain_at = 0;
                            }
                            self.plain.extend_from_slice(r.payload);
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                append(&mut self.outgoing, 512, |out| Ok(encode.encode(out)?)).map(|()| Step::Again)
            }
            // The bytes wait in `outgoing`, sent in order before anything later.
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                Ok(Step::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedBytes),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match write {
                Write::Nothing | Write::Data([]) => Ok(Step::MayWrite),
                Write::Data(data) => {
                    // A record adds at most 22 bytes (TLS 1.3, AES-GCM or ChaCha20).
                    let room = data.len() + (data.len() / 16_384 + 1) * 64;
                    append(&mut self.outgoing, room, |out| {
                        Ok(traffic.encrypt(data, out)?)
                    })
                    .map(|()| Step::Wrote(data.len()))
                }
                Write::CloseNotify => {
                    append(&mut self.outgoing, 64, |out| {
                        Ok(traffic.queue_close_notify(out)?)
                    })?;
                    self.closing = true;
                    Ok(Step::Wrote(0))
                }
            },
            Ok(ConnectionState::PeerClosed) => {
                self.eof = true;
                Ok(Step::Again)
            }
            Ok(ConnectionState::Closed) => {
                self.eof = true;
                Ok(Step::Closed)
            }
            // Early data is not enabled (`max_early_data_size` 0), and later states
            // are not known to this code: refuse rather than guess.
            Ok(_) => Err(rustls::Error::General(
                "unexpected TLS connection state".into(),
            )),
        };
        self.discard(discard);
        step
    }

    /// Drops `n` processed bytes from the front of `incoming`.
    fn discard(&mut self, n: usize) {
        let n = n.min(self.received);
        if n == 0 {
            return;
        }
        self.incoming.copy_within(n..self.received, 0);
        self.received -= n;
    }

    /// Reads from the socket into `incoming` (at most `max` held): `Ready(0)` at the
    /// end of the TCP stream. While it waits with nothing held, the buffer is freed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<usize>> {
        if self.received >= max {
            return Poll::Ready(Err(tls_error(rustls::Error::General(
                "a TLS record larger than allowed".into(),
            ))));
        }
        let want = (self.received + READ_SIZE).min(max);
        if self.incoming.len() < want {
            self.incoming.resize(want, 0);
        }
        let mut buf = ReadBuf::new(&mut self.incoming[self.received..]);
        match Pin::new(&mut self.tcp).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                self.received += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.received == 0 {
                    self.incoming = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    /// Sends everything in `outgoing`; frees it once sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

/// Why rustls wrote nothing into the room it was given.
enum Grow {
    /// It needs this much.
    To(usize),
    Fail(String),
}

impl From<EncodeError> for Grow {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Grow::To(required_size)
            }
            e => Grow::Fail(e.to_string()),
        }
    }
}

impl From<EncryptError> for Grow {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Grow::To(required_size)
            }
            e => Grow::Fail(e.to_string()),
        }
    }
}

/// Appends to `out` what `write` puts into the room it is given (`room` bytes, more if
/// rustls asks for more).
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Grow>,
) -> Result<(), rustls::Error> {
    let at = out.len();
    loop {
        out.resize(at + room, 0);
        match write(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n.min(room));
                return Ok(());
            }
            Err(Grow::To(needed)) if needed > room => room = needed,
            Err(Grow::To(_)) => {
                out.truncate(at);
                return Err(rustls::Error::General("TLS output did not fit".into()));
            }
            Err(Grow::Fail(why)) => {
                out.truncate(at);
                return Err(rustls::Error::General(why));
            }
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match this.step(Write::Nothing).map_err(tls_error)? {
                Step::Again | Step::Wrote(_) => {}
                Step::Closed => return Poll::Ready(Ok(())),
                Step::NeedBytes | Step::MayWrite => {
                    // What rustls made meanwhile (a key update, an alert) goes out when
                    // the socket takes it; reading does not wait for it.
                    if this.sent < this.outgoing.len() {
                        let _ = this.poll_send(cx)?;
                    }
                    if ready!(this.poll_fill(cx, MAX_RECORD_BYTES))? == 0 {
                        // The TCP stream ended (without close_notify): the end.
                        this.eof = true;
                    }
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() - this.sent >= MAX_QUEUED {
            ready!(this.poll_send(cx))?;
        }
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        loop {
            match this.step(Write::Data(data)).map_err(tls_error)? {
                Step::Wrote(n) => {
                    // Sent now if the socket takes it; `poll_flush` finishes.
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(n));
                }
                Step::Again => {}
                Step::MayWrite => return Poll::Ready(Ok(0)),
                Step::NeedBytes | Step::Closed => {
                    return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.closing {
            match this.step(Write::CloseNotify).map_err(tls_error)? {
                Step::Again => {}
                // Closed already, or no way to say so: just end the TCP stream.
                _ => this.closing = true,
            }
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::RootCertStore;
    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A CA, a server config that wants a client certificate from it, and a client
    /// config with (or without) one.
    fn configs(client_cert: bool) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![name.to_owned()])
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (vec![cert.der().clone()], key)
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .unwrap();
        let (chain, key) = leaf("gateway.test");
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let client = if client_cert {
            let (chain, key) = leaf("device-1");
            client.with_client_auth_cert(chain, key).unwrap()
        } else {
            client.with_no_client_auth()
        };
        (Arc::new(server), Arc::new(client))
    }

    /// Connects a tokio-rustls client to a server `accept` on loopback.
    async fn pair(
        client_cert: bool,
    ) -> (
        io::Result<TlsStream>,
        io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
    ) {
        let (server, client) = configs(client_cert);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("gateway.test").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await?;
            // A TLS 1.3 client learns that its certificate was refused only from
            // the next read.
            tls.write_all(b"hello").await?;
            Ok(tls)
        };
        let accept = async {
            let (tcp, _) = listener.accept().await?;
            accept(tcp, server).await
        };
        tokio::join!(accept, connect)
    }

    /// Polls a read once without waiting.
    fn read_now(stream: &mut TlsStream, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut rb = ReadBuf::new(buf);
        Pin::new(stream)
            .poll_read(&mut cx, &mut rb)
            .map_ok(|()| rb.filled().len())
    }

    #[tokio::test]
    async fn data_flows_both_ways_and_an_idle_connection_holds_no_buffer() {
        let (server, client) = pair(true).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        assert!(server.peer_certificates().is_some_and(|c| c.len() == 1));

        // More than one TLS record's worth, read in small pieces.
        let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        client.write_all(&big).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; 5 + big.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], b"hello");
        assert_eq!(&got[5..], &big[..]);

        server.write_all(b"ack").await.unwrap();
        server.flush().await.unwrap();
        let mut ack = [0; 3];
        client.read_exact(&mut ack).await.unwrap();
        assert_eq!(&ack, b"ack");

        // Nothing more: the read waits, and the connection holds no buffer meanwhile
        // (rustls's buffered connection keeps 4 KiB here).
        let mut buf = [0; 64];
        assert!(read_now(&mut server, &mut buf).is_pending());
        assert_eq!(
            (
                server.incoming.capacity(),
                server.plain.capacity(),
                server.outgoing.capacity()
            ),
            (0, 0, 0)
        );

        // A clean close from the client reads as the end.
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused_and_told_so() {
        let (server, client) = pair(false).await;
        let err = server.err().expect("refused");
        let tls = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(tls, Some(rustls::Error::NoCertificatesPresented)),
            "{err:?}"
        );
        // The client heard the alert, not just a closed socket.
        let mut client = match client {
            Ok(c) => c,
            Err(e) => panic!("the client's handshake itself failed: {e}"),
        };
        let mut buf = [0; 8];
        let e = client.read(&mut buf).await.expect_err("refused");
        assert!(e.to_string().contains("CertificateRequired"), "{e}");
    }
}
