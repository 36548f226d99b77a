//! The driver on tokio: a clock, and a connector that opens TCP + mutual TLS with
//! tokio-rustls, presenting the device certificate the `certs` tool wrote.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use device_client::driver::tokio::{TlsConnector, TokioClock, client_config_from_dir};
//! let tls = client_config_from_dir("certs".as_ref(), "sensor-01")?;
//! let mut connector = TlsConnector::new("127.0.0.1:7443", "localhost", tls)?;
//! let clock = TokioClock::new();
//! # let _ = (&mut connector, clock); Ok(()) }
//! ```

extern crate std;

use std::io;
use std::path::{Path, PathBuf};
use std::string::String;
use std::sync::Arc;
use std::time::Duration;
use std::vec::Vec;

use embedded_io_adapters::tokio_1::FromTokio;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{Clock, Connection, Connector};
use crate::machine::Millis;

/// Milliseconds since the clock was made, on tokio's timer.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock starting at 0 now.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Millis {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn sleep_until(&self, at: Millis) -> impl core::future::Future<Output = ()> {
        tokio::time::sleep_until(self.start + Duration::from_millis(at))
    }
}

/// The two halves of a stream, as `embedded-io-async` reader and writer.
pub struct Halves<R, W> {
    reader: FromTokio<R>,
    writer: FromTokio<W>,
}

impl<R, W> Halves<R, W> {
    /// Two halves of a stream (e.g. from `tokio::io::split`).
    pub fn new(reader: FromTokio<R>, writer: FromTokio<W>) -> Self {
        Self { reader, writer }
    }
}

impl<R, W> Connection for Halves<R, W>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    type Error = io::Error;
    type Reader<'a>
        = &'a mut FromTokio<R>
    where
        Self: 'a;
    type Writer<'a>
        = &'a mut FromTokio<W>
    where
        Self: 'a;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        (&mut self.reader, &mut self.writer)
    }
}

/// A TLS connection to the gateway, split for reading and writing at once.
pub type TlsConnection = Halves<ReadHalf<TlsStream<TcpStream>>, WriteHalf<TlsStream<TcpStream>>>;

/// One or more gateway addresses (`host:port`; in text, comma-separated): a device
/// connects to the current one and moves on to the next after a failed attempt, so a
/// gateway that dies sends its devices to the others within their reconnect backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAddrs {
    addrs: Vec<String>,
    current: usize,
}

impl GatewayAddrs {
    /// `a:7443` or `a:7443,b:7443,c:7443` (spaces around commas are ignored).
    pub fn parse(list: &str) -> Self {
        let mut addrs: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        if addrs.is_empty() {
            addrs.push(String::from(list));
        }
        Self { addrs, current: 0 }
    }

    /// Starts at the `i`-th address (modulo their number): many devices with different
    /// `i` spread over the gateways.
    pub fn starting_at(mut self, i: usize) -> Self {
        self.current = i % self.addrs.len();
        self
    }

    /// The address to try now.
    pub fn current(&self) -> &str {
        &self.addrs[self.current]
    }

    /// The attempt on the current address failed: the next one is tried next.
    pub fn failed(&mut self) {
        self.current = (self.current + 1) % self.addrs.len();
    }

    /// How many addresses.
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Never true: there is always at least one address.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// Opens TCP + mutual TLS to a gateway: the current one of [`GatewayAddrs`].
#[derive(Clone)]
pub struct TlsConnector {
    addrs: GatewayAddrs,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    /// Time allowed for TCP connect plus the TLS handshake.
    pub timeout: Duration,
}

impl TlsConnector {
    /// Connects to `addr` (`host:port`, or several comma-separated: see
    /// [`GatewayAddrs`]) and checks the gateway's certificate for `server_name`
    /// against the CA in `config`.
    pub fn new(
        addr: impl Into<String>,
        server_name: &str,
        config: Arc<ClientConfig>,
    ) -> Result<Self, LoadError> {
        let server_name = ServerName::try_from(String::from(server_name))
            .map_err(|_| LoadError::ServerName(server_name.into()))?;
        Ok(Self {
            addrs: GatewayAddrs::parse(&addr.into()),
            server_name,
            connector: tokio_rustls::TlsConnector::from(config),
            timeout: Duration::from_secs(10),
        })
    }
}

impl Connector for TlsConnector {
    type Error = io::Error;
    type Connection<'c> = TlsConnection;

    async fn connect(&mut self) -> Result<TlsConnection, io::Error> {
        let attempt = async {
            let tcp = TcpStream::connect(self.addrs.current()).await?;
            tcp.set_nodelay(true)?;
            self.connector.connect(self.server_name.clone(), tcp).await
        };
        let failure = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(tls)) => {
                let (r, w) = tokio::io::split(tls);
                return Ok(Halves {
                    reader: FromTokio::new(r),
                    writer: FromTokio::new(w),
                });
            }
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        };
        self.addrs.failed();
        Err(failure)
    }
}

/// The device's TLS identity could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file could not be read or parsed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The server name is not a DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// A client configuration that trusts the CA in `ca` (PEM) and presents the certificate
/// `cert` (PEM) with its key `key` (PEM, PKCS#8 or SEC1).
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, LoadError> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Pem { path, source }
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(pem_err(ca))? {
        roots.add(cert.map_err(pem_err(ca))?)?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(pem_err(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// [`client_config`] for the layout the `certs` tool writes: `DIR/ca.pem` and
/// `DIR/devices/ID/{cert,key}.pem`.
pub fn client_config_from_dir(dir: &Path, id: &str) -> Result<Arc<ClientConfig>, LoadError> {
    use crate::layout::{CA_CERT_FILE, DEVICE_CERT_PEM, DEVICE_KEY_PEM, DEVICES_DIR};
    let device = dir.join(DEVICES_DIR).join(id);
    client_config(
        &dir.join(CA_CERT_FILE),
        &device.join(DEVICE_CERT_PEM),
        &device.join(DEVICE_KEY_PEM),
    )
}

#[cfg(test)]
mod tests {
    use super::GatewayAddrs;

    #[test]
    fn gateway_addresses_rotate_after_failures() {
        let mut a = GatewayAddrs::parse("a:1, b:2,c:3");
        assert_eq!(a.len(), 3);
        assert_eq!(a.current(), "a:1");
        a.failed();
        assert_eq!(a.current(), "b:2");
        a.failed();
        a.failed();
        assert_eq!(a.current(), "a:1");
        assert_eq!(GatewayAddrs::parse("x:9").starting_at(7).current(), "x:9");
        assert_eq!(
            GatewayAddrs::parse("a:1,b:2").starting_at(3).current(),
            "b:2"
        );
    }
}
