//! Mutual TLS on a microcontroller with [`embedded-tls`](embedded_tls) 0.19: no std, no
//! allocator (feature `embedded-tls`).
//!
//! ```text
//!  DeviceProvider ─ CryptoProvider for embedded-tls
//!    ├─ client_cert(): the device certificate (DER, from `certs device`)
//!    ├─ signer():      a DeviceKey (SoftwareKey from key.der, or a secure element)
//!    ├─ verifier():    GatewayVerifier (crate::x509): gateway cert signed by the CA,
//!    │                 its name, its handshake signature
//!    ├─ gateway_check(): did the gateway prove all that? (asked after every handshake)
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
//! What the verifier checks: [`crate::x509`] — the gateway's certificate is signed by
//! the CA directly, carries the name dialled, allows a TLS server, and (only if the
//! provider has a [`TlsClock`] that knows the time) is within its validity period; then
//! that the gateway signed the handshake with that certificate's key. After every
//! handshake the connector also asks the provider whether all of that happened
//! ([`GatewayCheck`]): embedded-tls 0.19 completes a handshake in which the server sent
//! no Certificate or no CertificateVerify at all, which would let anyone who can
//! intercept the line pose as the gateway.

use core::fmt;
use core::future::Future;
use core::marker::PhantomData;

use embassy_futures::select::{Either, select};
use embedded_io_async::{Read, Write};
use embedded_tls::{
    Aes128GcmSha256, Certificate, CertificateEntryRef, CertificateRef, CertificateVerifyRef,
    CryptoProvider, CryptoRngCore, NoClock, SignatureScheme, TlsCipherSuite, TlsClock, TlsConfig,
    TlsConnection, TlsContext, TlsError, TlsReader, TlsVerifier, TlsWriter,
};
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::Digest;

use super::{App, Clock, Connection, Connector};
use crate::machine::{Client, Disconnect, Millis};
use crate::x509::{CertError, ServerCert, ServerName, TrustAnchor};

pub use crate::der::DerEcdsaSignature;
pub use embedded_tls;
pub use rand_core;

/// The cipher suite this provider negotiates: TLS_AES_128_GCM_SHA256, the one every
/// gateway must accept (PROTOCOL.md §2.2).
pub type CipherSuite = Aes128GcmSha256;

/// The longest name the device may dial (a DNS name or an IP address).
pub const MAX_SERVER_NAME: usize = 128;

/// The device's private key: signs the TLS 1.3 CertificateVerify with ECDSA P-256 and
/// SHA-256 (`ecdsa_secp256r1_sha256`). [`SoftwareKey`] holds the key in memory; a
/// secure element implements this trait and keeps the key to itself.
pub trait DeviceKey {
    /// Signs `message` (hashing it with SHA-256) and returns the signature (r ‖ s).
    /// An `Err` aborts the handshake (embedded-tls turns it into a panic of the signer:
    /// return `Err` only for a fault of the key store).
    fn sign(&mut self, message: &[u8]) -> Result<Signature, signature::Error>;
}

/// A P-256 private key held in memory.
pub struct SoftwareKey {
    key: p256::ecdsa::SigningKey,
}

/// The private key is not a SEC1 DER P-256 key.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
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
        let secret = crate::der::sec1_p256_private_key(der).map_err(|_| InvalidKey)?;
        let key = p256::ecdsa::SigningKey::from_bytes(&secret.into()).map_err(|_| InvalidKey)?;
        Ok(Self { key })
    }
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SoftwareKey([elided])")
    }
}

impl DeviceKey for SoftwareKey {
    fn sign(&mut self, message: &[u8]) -> Result<Signature, signature::Error> {
        signature::Signer::try_sign(&self.key, message)
    }
}

/// A [`DeviceKey`] as embedded-tls wants a signer: DER-encoded signatures.
struct KeySigner<'k, K>(&'k mut K);

impl<K: DeviceKey> signature::SignerMut<DerEcdsaSignature> for KeySigner<'_, K> {
    fn try_sign(&mut self, message: &[u8]) -> Result<DerEcdsaSignature, signature::Error> {
        self.0.sign(message).map(|s| DerEcdsaSignature::new(&s))
    }
}

/// Whether the gateway proved who it is in the last handshake: its certificate verified
/// and it signed the handshake with that certificate's key. The connector asks after
/// every handshake, and refuses a connection unless the answer is `Ok`.
pub trait GatewayCheck {
    /// Forgets the last handshake's outcome: the connector calls it before each one, so
    /// no earlier success can stand in for a handshake without proof.
    fn forget_gateway(&mut self);
    /// `Ok` once the gateway's certificate and handshake signature verified in the
    /// handshake last begun; else why not ([`CertError::NoProof`] if the gateway never
    /// sent them).
    fn gateway_check(&self) -> Result<(), CertError>;
}

/// Checks the gateway during a handshake (module doc): an embedded-tls [`TlsVerifier`]
/// on [`crate::x509`]. `C` tells it the time.
pub struct GatewayVerifier<'a, C> {
    anchor: TrustAnchor<'a>,
    name: heapless::String<MAX_SERVER_NAME>,
    /// Between the Certificate and CertificateVerify messages: the certificate's key and
    /// the transcript hash its signature must cover.
    pending: Option<(VerifyingKey, [u8; 32])>,
    outcome: Result<(), CertError>,
    _clock: PhantomData<C>,
}

impl<'a, C: TlsClock> GatewayVerifier<'a, C> {
    /// A verifier trusting `anchor`.
    pub fn new(anchor: TrustAnchor<'a>) -> Self {
        Self {
            anchor,
            name: heapless::String::new(),
            pending: None,
            outcome: Err(CertError::NoProof),
            _clock: PhantomData,
        }
    }

    fn check_certificate(&self, cert: &CertificateRef<'_>) -> Result<VerifyingKey, CertError> {
        // The gateway's own certificate comes first (RFC 8446 §4.4.2); anything after it
        // is not needed, as the CA signs gateway certificates directly.
        let Some(CertificateEntryRef::X509(der)) = cert.entries.first() else {
            return Err(CertError::Malformed);
        };
        let name = ServerName::parse(&self.name)?;
        ServerCert::parse(der)?.verify(&self.anchor, name, C::now())
    }
}

impl<C: TlsClock> TlsVerifier<CipherSuite> for GatewayVerifier<'_, C> {
    fn set_hostname_verification(&mut self, hostname: &str) -> Result<(), TlsError> {
        // Called as every handshake begins: forget the last one.
        self.forget_gateway();
        self.name.clear();
        self.name.push_str(hostname).map_err(|_| {
            self.outcome = Err(CertError::InvalidName);
            TlsError::InsufficientSpace
        })
    }

    fn verify_certificate(
        &mut self,
        transcript: &sha2::Sha256,
        cert: CertificateRef<'_>,
    ) -> Result<(), TlsError> {
        match self.check_certificate(&cert) {
            Ok(key) => {
                // The hash up to the Certificate message: what CertificateVerify signs.
                self.pending = Some((key, transcript.clone().finalize().into()));
                Ok(())
            }
            Err(e) => {
                self.outcome = Err(e);
                Err(TlsError::InvalidCertificate)
            }
        }
    }

    fn verify_signature(&mut self, verify: CertificateVerifyRef<'_>) -> Result<(), TlsError> {
        // A CertificateVerify without a verified Certificate before it proves nothing.
        let Some((key, hash)) = self.pending.take() else {
            self.outcome = Err(CertError::NoProof);
            return Err(TlsError::InvalidSignature);
        };
        let checked = if verify.signature_scheme == SignatureScheme::EcdsaSecp256r1Sha256 {
            crate::x509::verify_handshake_signature(&key, &hash, verify.signature)
        } else {
            Err(CertError::Unsupported)
        };
        self.outcome = checked;
        checked.map_err(|_| TlsError::InvalidSignature)
    }
}

impl<C> GatewayCheck for GatewayVerifier<'_, C> {
    fn forget_gateway(&mut self) {
        self.pending = None;
        self.outcome = Err(CertError::NoProof);
    }

    fn gateway_check(&self) -> Result<(), CertError> {
        self.outcome
    }
}

/// The embedded-tls [`CryptoProvider`] of a device: presents `cert` (DER), signs with
/// `key`, verifies the gateway's certificate against the CA (a [`GatewayVerifier`]),
/// draws randomness from `rng`. `C` tells the verifier the time ([`NoClock`]: validity
/// periods are not checked, for a board without a trustworthy clock).
pub struct DeviceProvider<'a, R, K, C = NoClock> {
    rng: R,
    key: K,
    cert: &'a [u8],
    verifier: GatewayVerifier<'a, C>,
}

impl<'a, R, K, C> DeviceProvider<'a, R, K, C>
where
    R: CryptoRngCore,
    K: DeviceKey,
    C: TlsClock,
{
    /// A provider for the device certificate `cert` (DER) with its `key`, trusting the
    /// CA certificate `ca` (DER). Fails if `ca` is not a P-256 CA certificate.
    pub fn new(rng: R, key: K, cert: &'a [u8], ca: &'a [u8]) -> Result<Self, CertError> {
        Ok(Self {
            rng,
            key,
            cert,
            verifier: GatewayVerifier::new(TrustAnchor::from_der(ca)?),
        })
    }
}

impl<R, K, C> CryptoProvider for DeviceProvider<'_, R, K, C>
where
    R: CryptoRngCore,
    K: DeviceKey,
    C: TlsClock,
{
    type CipherSuite = CipherSuite;
    type Signature = DerEcdsaSignature;

    fn rng(&mut self) -> impl CryptoRngCore {
        &mut self.rng
    }

    fn verifier(&mut self) -> Result<&mut impl TlsVerifier<CipherSuite>, TlsError> {
        Ok(&mut self.verifier)
    }

    fn signer(
        &mut self,
    ) -> Result<
        (
            impl signature::SignerMut<DerEcdsaSignature>,
            SignatureScheme,
        ),
        TlsError,
    > {
        Ok((
            KeySigner(&mut self.key),
            SignatureScheme::EcdsaSecp256r1Sha256,
        ))
    }

    fn client_cert(&mut self) -> Option<Certificate<impl AsRef<[u8]>>> {
        Some(Certificate::X509(self.cert))
    }
}

impl<R, K, C> GatewayCheck for DeviceProvider<'_, R, K, C> {
    fn forget_gateway(&mut self) {
        self.verifier.forget_gateway();
    }

    fn gateway_check(&self) -> Result<(), CertError> {
        self.verifier.gateway_check()
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
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum ConnectError<E> {
    /// The transport could not be opened.
    Transport(E),
    /// The TLS handshake failed.
    Tls(TlsError),
    /// The gateway did not prove who it is: its certificate did not verify against the
    /// CA, was not for the name dialled, or it did not sign the handshake with its key.
    Gateway(CertError),
    /// The handshake did not finish in time (a lost byte on a serial line, a silent peer).
    Timeout,
}

impl<E> ConnectError<E> {
    /// A short description, for logs without `core::fmt` (its machinery and the derived
    /// `Debug` tables cost a firmware about 20 KB of flash).
    pub const fn as_str(&self) -> &'static str {
        match self {
            ConnectError::Transport(_) => "the transport could not be opened",
            ConnectError::Tls(e) => tls_error_str(e),
            ConnectError::Timeout => "the handshake timed out",
            ConnectError::Gateway(e) => e.as_str(),
        }
    }

    /// Whether the gateway's certificate was refused by this device.
    pub fn is_gateway_rejected(&self) -> bool {
        matches!(
            self,
            ConnectError::Gateway(_)
                | ConnectError::Tls(TlsError::InvalidCertificate | TlsError::InvalidSignature)
        )
    }
}

/// What an embedded-tls error means, in a few words.
pub const fn tls_error_str(e: &TlsError) -> &'static str {
    match e {
        TlsError::ConnectionClosed => "tls: connection closed",
        TlsError::Unimplemented => "tls: unimplemented",
        TlsError::MissingHandshake => "tls: missing handshake",
        TlsError::HandshakeAborted(..) | TlsError::AbortHandshake(..) => {
            "tls: the peer aborted the handshake"
        }
        TlsError::IoError | TlsError::Io(_) => "tls: i/o error",
        // embedded-tls reports most alerts from the gateway (e.g. a refused device
        // certificate) as an internal error.
        TlsError::InternalError => "tls: internal error (or an alert from the gateway)",
        TlsError::InvalidRecord => "tls: invalid record",
        TlsError::UnknownContentType => "tls: unknown content type",
        TlsError::InvalidNonceLength => "tls: invalid nonce length",
        TlsError::InvalidTicketLength => "tls: invalid ticket length",
        TlsError::UnknownExtensionType => "tls: unknown extension type",
        TlsError::InsufficientSpace => "tls: a buffer is too small",
        TlsError::InvalidHandshake => "tls: invalid handshake",
        TlsError::InvalidCipherSuite => "tls: invalid cipher suite",
        TlsError::InvalidSignatureScheme => "tls: invalid signature scheme",
        TlsError::InvalidSignature => "tls: invalid signature",
        TlsError::InvalidExtensionsLength => "tls: invalid extensions length",
        TlsError::InvalidSessionIdLength => "tls: invalid session id length",
        TlsError::InvalidSupportedVersions => "tls: invalid supported versions",
        TlsError::InvalidApplicationData => "tls: invalid application data",
        TlsError::InvalidKeyShare => "tls: invalid key share",
        TlsError::InvalidCertificate => "tls: invalid certificate",
        TlsError::InvalidCertificateEntry => "tls: invalid certificate entry",
        TlsError::InvalidCertificateRequest => "tls: invalid certificate request",
        TlsError::InvalidPrivateKey => "tls: invalid private key",
        TlsError::UnableToInitializeCryptoEngine => "tls: crypto engine failed",
        TlsError::ParseError(_) => "tls: parse error",
        TlsError::OutOfMemory => "tls: out of memory",
        TlsError::CryptoError => "tls: crypto error",
        TlsError::EncodeError => "tls: encode error",
        TlsError::DecodeError => "tls: decode error",
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
    P: CryptoProvider<CipherSuite = CipherSuite> + GatewayCheck,
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
    P: CryptoProvider<CipherSuite = CipherSuite> + GatewayCheck,
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
            provider.forget_gateway();
            let opened = tls.open(TlsContext::new(config, &mut *provider)).await;
            // Whatever embedded-tls concluded, the connection stands only if the
            // gateway proved who it is (module doc).
            match (opened, provider.gateway_check()) {
                (Ok(()), Ok(())) => Ok(TlsStream { tls }),
                // Failed before the gateway's certificate was judged, or after.
                (Err(e), Ok(()) | Err(CertError::NoProof)) => Err(ConnectError::Tls(e)),
                (_, Err(e)) => Err(ConnectError::Gateway(e)),
            }
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
