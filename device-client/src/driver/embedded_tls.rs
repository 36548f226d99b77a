//! Mutual TLS on a microcontroller with [`embedded-tls`](embedded_tls) 0.19: no std, no
//! allocator (feature `embedded-tls`).
//!
//! ```text
//!  DeviceProvider ─ CryptoProvider for embedded-tls
//!    ├─ client_cert(): the device certificate (DER, from `certs device`)
//!    ├─ signer():      a DeviceKey (SoftwareKey from key.der, or a secure element)
//!    ├─ verifier():    rustpki CertVerifier: the gateway's chain to the CA, its name
//!    └─ rng():         the board's CryptoRng
//!
//!  TlsConnector::run(client, clock, app, rx, tx)
//!    = driver::run(client, connector.with_clock(clock), ...)   (the driver, unchanged)
//!        Dialer::connect ─► Transport::open ─► TlsConnection::open (handshake, timeout)
//!        session on TlsConnection::split() (reader and writer side by side)
//! ```
//!
//! embedded-tls keeps its record buffers as `&'b mut [u8]` for the life of a connection:
//! each connection borrows the connector's buffers ([`Connector::Connection`] may borrow
//! from its connector) and gives them back when the driver drops it.
//!
//! Buffer sizes (PROTOCOL.md §6.2): the receive buffer holds one TLS record — 16,640
//! bytes, or `F + 12` when the gateway sets `max_fragment_size = F` (1,036 for 1024);
//! the send buffer holds the device's Certificate message (about 450 bytes with one
//! P-256 certificate; 1024 is safe).
//!
//! What the verifier checks (embedded-tls `rustpki`): every signature from the CA down
//! to the gateway's certificate, the name dialled against the certificate's DNS names
//! (the first three) or CN, and — only if the provider has a [`TlsClock`] that knows the
//! time — the validity period. It does not check key usage or CA constraints: the trust
//! anchor is the deployment's own CA.

use core::fmt;
use core::future::Future;

use embassy_futures::select::{Either, select};
use embedded_io_async::{Read, Write};
use embedded_tls::pki::CertVerifier;
use embedded_tls::{
    Aes128GcmSha256, Certificate, CryptoProvider, CryptoRngCore, NoClock, SignatureScheme,
    TlsCipherSuite, TlsClock, TlsConfig, TlsConnection, TlsContext, TlsError, TlsReader,
    TlsVerifier, TlsWriter,
};
use p256::ecdsa::DerSignature;

use super::{App, Clock, Connection, Connector};
use crate::machine::{Client, Disconnect, Millis};

pub use embedded_tls;
pub use rand_core;

/// The cipher suite this provider negotiates: TLS_AES_128_GCM_SHA256, the one every
/// gateway must accept (PROTOCOL.md §2.2).
pub type CipherSuite = Aes128GcmSha256;

/// Room for the gateway's Certificate message kept by the verifier between the
/// Certificate and CertificateVerify messages: one P-256 certificate is about 550 bytes.
pub const GATEWAY_CERT_BUF: usize = 1024;

/// The device's private key: signs the TLS 1.3 CertificateVerify with ECDSA P-256 and
/// SHA-256 (`ecdsa_secp256r1_sha256`). [`SoftwareKey`] holds the key in memory; a
/// secure element implements this trait and keeps the key to itself.
pub trait DeviceKey {
    /// Signs `message` (hashing it with SHA-256) and returns the DER-encoded signature.
    /// An `Err` aborts the handshake (embedded-tls turns it into a panic of the signer:
    /// return `Err` only for a fault of the key store).
    fn sign(&mut self, message: &[u8]) -> Result<DerSignature, signature::Error>;
}

/// A P-256 private key held in memory.
pub struct SoftwareKey {
    key: p256::ecdsa::SigningKey,
}

/// The private key is not a SEC1 DER P-256 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidKey;

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a SEC1 DER P-256 private key")
    }
}

#[cfg(feature = "std")]
impl std::error::Error for InvalidKey {}

impl SoftwareKey {
    /// Loads a SEC1 `ECPrivateKey` in DER, as `certs device` writes `key.der`.
    pub fn from_sec1_der(der: &[u8]) -> Result<Self, InvalidKey> {
        let secret = p256::SecretKey::from_sec1_der(der).map_err(|_| InvalidKey)?;
        Ok(Self {
            key: p256::ecdsa::SigningKey::from(&secret),
        })
    }
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SoftwareKey([elided])")
    }
}

impl DeviceKey for SoftwareKey {
    fn sign(&mut self, message: &[u8]) -> Result<DerSignature, signature::Error> {
        signature::Signer::try_sign(&self.key, message)
    }
}

/// A [`DeviceKey`] as embedded-tls wants a signer.
struct KeySigner<'k, K>(&'k mut K);

impl<K: DeviceKey> signature::SignerMut<DerSignature> for KeySigner<'_, K> {
    fn try_sign(&mut self, message: &[u8]) -> Result<DerSignature, signature::Error> {
        self.0.sign(message)
    }
}

/// The embedded-tls [`CryptoProvider`] of a device: presents `cert` (DER), signs with
/// `key`, verifies the gateway's certificate against `ca` (DER), draws randomness from
/// `rng`. `C` tells the verifier the time ([`NoClock`]: validity periods are not
/// checked, for a board without a trustworthy clock).
pub struct DeviceProvider<'a, R, K, C = NoClock, const CERT_BUF: usize = GATEWAY_CERT_BUF>
where
    C: TlsClock,
{
    rng: R,
    key: K,
    cert: &'a [u8],
    verifier: CertVerifier<'a, CipherSuite, C, CERT_BUF>,
}

impl<'a, R, K, C, const CERT_BUF: usize> DeviceProvider<'a, R, K, C, CERT_BUF>
where
    R: CryptoRngCore,
    K: DeviceKey,
    C: TlsClock,
{
    /// A provider for the device certificate `cert` (DER) with its `key`, trusting the
    /// CA certificate `ca` (DER).
    pub fn new(rng: R, key: K, cert: &'a [u8], ca: &'a [u8]) -> Self {
        Self {
            rng,
            key,
            cert,
            verifier: CertVerifier::new(Certificate::X509(ca)),
        }
    }
}

impl<R, K, C, const CERT_BUF: usize> CryptoProvider for DeviceProvider<'_, R, K, C, CERT_BUF>
where
    R: CryptoRngCore,
    K: DeviceKey,
    C: TlsClock,
{
    type CipherSuite = CipherSuite;
    type Signature = DerSignature;

    fn rng(&mut self) -> impl CryptoRngCore {
        &mut self.rng
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<CipherSuite>, TlsError> {
        Ok(&mut self.verifier)
    }

    fn signer(
        &mut self,
    ) -> Result<(impl signature::SignerMut<DerSignature>, SignatureScheme), TlsError> {
        Ok((
            KeySigner(&mut self.key),
            SignatureScheme::EcdsaSecp256r1Sha256,
        ))
    }

    fn client_cert(&mut self) -> Option<Certificate<impl AsRef<[u8]>>> {
        Some(Certificate::X509(self.cert))
    }
}

/// The byte stream under TLS, opened afresh for every connection attempt.
pub trait Transport {
    /// Why the stream could not be opened.
    type Error: fmt::Debug;
    /// An open stream. TLS reads and writes at the same time through two clones of it,
    /// so a clone must be a handle to the same stream (a UART's registers, a socket
    /// handle).
    type Stream: Read + Write + Clone;
    /// Opens a stream to the gateway: a TCP connection; on a serial line, the line
    /// cleared of whatever an earlier connection left in it.
    fn open(&mut self) -> impl Future<Output = Result<Self::Stream, Self::Error>>;
}

/// Why a connection attempt failed.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ConnectError<E> {
    /// The transport could not be opened.
    Transport(E),
    /// The TLS handshake failed: `InvalidCertificate` or `InvalidSignature` mean the
    /// gateway's certificate did not verify against the CA (or its name did not match).
    Tls(TlsError),
    /// The handshake did not finish in time (a lost byte on a serial line, a silent peer).
    Timeout,
}

impl<E> ConnectError<E> {
    /// Whether the gateway's certificate was refused by this device.
    pub fn is_gateway_rejected(&self) -> bool {
        matches!(
            self,
            ConnectError::Tls(TlsError::InvalidCertificate | TlsError::InvalidSignature)
        )
    }
}

/// An open TLS connection to the gateway, split for the driver's reader and writer.
pub struct TlsStream<'b, S, CS = CipherSuite>
where
    S: Read + Write + 'b,
    CS: TlsCipherSuite + 'static,
{
    tls: TlsConnection<'b, S, CS>,
}

impl<'b, S, CS> Connection for TlsStream<'b, S, CS>
where
    S: Read + Write + Clone + 'b,
    CS: TlsCipherSuite + 'static,
{
    type Error = TlsError;
    type Reader<'a>
        = TlsReader<'a, S, CS>
    where
        Self: 'a;
    type Writer<'a>
        = TlsWriter<'a, S, CS>
    where
        Self: 'a;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.tls.split()
    }
}

/// Reports every failed connection attempt (e.g. to a log).
pub type ErrorHook<'a, E> = &'a dyn Fn(&ConnectError<E>);

/// Opens mutual-TLS connections to the gateway over a [`Transport`], again and again,
/// with one pair of record buffers. Run the device with [`run`](Self::run).
pub struct TlsConnector<'a, T, P>
where
    T: Transport,
{
    transport: T,
    provider: P,
    config: TlsConfig<'a>,
    record_rx: &'a mut [u8],
    record_tx: &'a mut [u8],
    handshake_timeout_ms: Millis,
    on_error: Option<ErrorHook<'a, T::Error>>,
}

impl<'a, T, P> TlsConnector<'a, T, P>
where
    T: Transport,
    P: CryptoProvider<CipherSuite = CipherSuite>,
{
    /// Connects over `transport` with `provider`, checking the gateway's certificate
    /// for `server_name` (a DNS name in its subjectAltName, e.g. `localhost`).
    /// `record_rx` holds one incoming TLS record and `record_tx` one outgoing (module
    /// doc). Opening the transport and the handshake may take 10 s together.
    pub fn new(
        transport: T,
        provider: P,
        server_name: &'a str,
        record_rx: &'a mut [u8],
        record_tx: &'a mut [u8],
    ) -> Self {
        Self {
            transport,
            provider,
            config: TlsConfig::new().with_server_name(server_name),
            record_rx,
            record_tx,
            handshake_timeout_ms: 10_000,
            on_error: None,
        }
    }

    /// Time allowed for opening the transport plus the TLS handshake.
    pub fn with_handshake_timeout(mut self, ms: Millis) -> Self {
        self.handshake_timeout_ms = ms;
        self
    }

    /// Calls `hook` with the reason of every failed connection attempt.
    pub fn on_error(mut self, hook: ErrorHook<'a, T::Error>) -> Self {
        self.on_error = Some(hook);
        self
    }

    /// The provider (e.g. to reach the RNG between connections).
    pub fn provider_mut(&mut self) -> &mut P {
        &mut self.provider
    }

    /// The [`Connector`] for [`driver::run`](super::run): this connector with the
    /// clock that times its handshakes. Each connection borrows the record buffers
    /// until it is dropped.
    pub fn with_clock<'c, K: Clock>(&'c mut self, clock: &'c K) -> Dialer<'c, 'a, T, P, K> {
        Dialer {
            connector: self,
            clock,
        }
    }

    /// Runs the device like [`driver::run`](super::run) (same arguments, same end: the
    /// gateway refused the device for good), over mutual TLS from this connector.
    pub async fn run<K, A, const R: usize, const O: usize>(
        &mut self,
        client: &mut Client<R, O>,
        clock: &K,
        app: &mut A,
        rx: &mut [u8],
        tx: &mut [u8],
    ) -> Disconnect
    where
        K: Clock,
        A: App,
    {
        let mut dialer = self.with_clock(clock);
        super::run(client, &mut dialer, clock, app, rx, tx).await
    }
}

/// A [`TlsConnector`] with a clock: the [`Connector`] the driver uses.
pub struct Dialer<'c, 'a, T, P, K>
where
    T: Transport,
{
    connector: &'c mut TlsConnector<'a, T, P>,
    clock: &'c K,
}

impl<T, P, K> Connector for Dialer<'_, '_, T, P, K>
where
    T: Transport,
    P: CryptoProvider<CipherSuite = CipherSuite>,
    K: Clock,
{
    type Error = ConnectError<T::Error>;
    type Connection<'x>
        = TlsStream<'x, T::Stream>
    where
        Self: 'x;

    async fn connect(&mut self) -> Result<TlsStream<'_, T::Stream>, Self::Error> {
        let deadline = self
            .clock
            .now()
            .saturating_add(self.connector.handshake_timeout_ms);
        let clock = self.clock;
        let c = &mut *self.connector;
        let hook = c.on_error;
        let TlsConnector {
            transport,
            provider,
            config,
            record_rx,
            record_tx,
            ..
        } = c;
        let attempt = async {
            let stream = transport.open().await.map_err(ConnectError::Transport)?;
            let mut tls = TlsConnection::new(stream, record_rx, record_tx);
            tls.open(TlsContext::new(config, &mut *provider))
                .await
                .map_err(ConnectError::Tls)?;
            Ok(TlsStream { tls })
        };
        let result = match select(attempt, clock.sleep_until(deadline)).await {
            Either::First(result) => result,
            Either::Second(()) => Err(ConnectError::Timeout),
        };
        result.inspect_err(|e| {
            if let Some(hook) = hook {
                hook(e);
            }
        })
    }
}
