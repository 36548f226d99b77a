//! Shared helpers for the end-to-end tests: an in-memory PKI written to a temp dir, a
//! real gateway on 127.0.0.1 port 0 (in this process or as a child process), and a
//! device that speaks the protocol frame by frame over tokio-rustls.
//!
//! Nothing here mocks a component of ours: the gateway, TLS, the store and the codec
//! are the real ones.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed unwrap is a failed test

pub mod logs;
pub mod mqtt;
pub mod nats;
pub mod process;
pub mod sim;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certs::{Ca, Issued, RevokedEntry, Validity};
use device_client::proto::{
    self, CommandStatus, Downlink, Goodbye, Hello, MAX_DOWNLINK_FRAME, MAX_UPLINK_FRAME,
    PROTOCOL_VERSION, Ping, Reading, Readings, Seq, Telemetry, Text, Uplink, Value, Welcome,
};
use gateway::{Config, Gateway};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(15);

/// A CA with its gateway certificate, written to a temp dir as the gateway reads it.
pub struct Pki {
    /// The CA.
    pub ca: Ca,
    /// The gateway's certificate.
    pub gateway: Issued,
    /// Where the PEM files are.
    pub dir: tempfile::TempDir,
    revoked: Vec<RevokedEntry>,
    crl_number: u64,
}

impl Pki {
    /// A fresh CA and gateway certificate; an empty CRL.
    pub fn new() -> Self {
        let ca = Ca::generate("e2e test CA", Validity::days(2)).unwrap();
        let gateway = ca
            .issue_gateway(&["localhost".to_string()], Validity::days(1))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("gateway.pem"), &gateway.cert_pem).unwrap();
        std::fs::write(dir.path().join("gateway.key.pem"), &gateway.key_pem).unwrap();
        let mut pki = Pki {
            ca,
            gateway,
            dir,
            revoked: Vec::new(),
            crl_number: 0,
        };
        pki.write_crl();
        pki
    }

    /// A device certificate valid for a day.
    pub fn device(&self, id: &str) -> Issued {
        self.ca.issue_device(id, Validity::days(1)).unwrap()
    }

    /// Adds a certificate to the CRL file (the gateway sees it after a reload).
    pub fn revoke(&mut self, cert: &Issued) {
        self.revoked.push(RevokedEntry::now(cert.serial.clone()));
        self.write_crl();
    }

    /// Rewrites the CRL with a next-update date in the past (a CA that stopped
    /// refreshing it), keeping its revocations.
    pub fn write_stale_crl(&self) {
        let crl = self
            .ca
            .crl(&self.revoked, self.crl_number + 1, Validity::expired())
            .unwrap();
        std::fs::write(self.dir.path().join("crl.pem"), &crl.pem).unwrap();
    }

    fn write_crl(&mut self) {
        self.crl_number += 1;
        let crl = self
            .ca
            .crl(&self.revoked, self.crl_number, Validity::days(1))
            .unwrap();
        std::fs::write(self.dir.path().join("crl.pem"), &crl.pem).unwrap();
    }

    /// Gateway settings for a test: port 0 on loopback, this PKI, a data dir.
    pub fn config(&self, data_dir: &Path) -> Config {
        let p = self.dir.path();
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ca: p.join("ca.pem"),
            cert: p.join("gateway.pem"),
            key: p.join("gateway.key.pem"),
            crl: Some(p.join("crl.pem")),
            data_dir: data_dir.to_owned(),
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ..Config::default()
        }
    }

    /// Connects a device `id` (a fresh certificate) to the gateway at `addr` and opens
    /// its session with boot id `boot`.
    pub async fn session(&self, addr: SocketAddr, id: &str, boot: u64) -> RawDevice {
        let cert = self.device(id);
        let mut dev = RawDevice::connect(addr, &self.ca, Some(&cert))
            .await
            .unwrap();
        dev.hello(boot).await;
        dev
    }

    /// Paths of the PEM files.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Arguments for `gateway run`: a config file in `data` naming this PKI, the store
    /// in `data/db`, the operator API on a free port, devices on `listen`.
    pub fn gateway_args(&self, data: &Path, listen: &str) -> Vec<String> {
        let file = data.join("gateway.toml");
        let text = format!(
            "listen = {listen:?}\napi_listen = \"127.0.0.1:0\"\nca = {:?}\ncert = {:?}\n\
             key = {:?}\ncrl = {:?}\ndata_dir = {:?}\n",
            self.path("ca.pem"),
            self.path("gateway.pem"),
            self.path("gateway.key.pem"),
            self.path("crl.pem"),
            data.join("db"),
        );
        std::fs::write(&file, text).unwrap();
        vec!["--config".into(), file.display().to_string()]
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A gateway in this process with its own PKI and temp data dir.
pub struct TestGateway {
    /// The gateway.
    pub gw: Gateway,
    /// Its PKI.
    pub pki: Pki,
    /// Its data dir.
    pub data: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a gateway with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a gateway after `tweak` adjusts its settings.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let pki = Pki::new();
        let data = tempfile::tempdir().unwrap();
        let mut config = pki.config(data.path());
        tweak(&mut config);
        let gw = Gateway::start(config).await.unwrap();
        Self { gw, pki, data }
    }

    /// The device listener.
    pub fn addr(&self) -> SocketAddr {
        self.gw.local_addr()
    }

    /// Connects a device with a fresh certificate for `id` and opens a session.
    pub async fn device(&self, id: &str, boot_id: u64) -> (RawDevice, Welcome) {
        let cert = self.pki.device(id);
        let mut dev = RawDevice::connect(self.addr(), &self.pki.ca, Some(&cert))
            .await
            .unwrap();
        let welcome = dev.hello(boot_id).await;
        (dev, welcome)
    }

    /// Rows in the store for a device, as (boot id, seq), in seq order.
    pub fn stored(&self, device: &str) -> Vec<(u64, Seq)> {
        stored_rows(&self.data.path().join("gateway.sqlite"), device)
    }
}

/// Reads (boot id, seq) of a device's telemetry straight from the SQLite file, as an
/// operator would, in (boot id, seq) order.
pub fn stored_rows(db: &Path, device: &str) -> Vec<(u64, Seq)> {
    let mut rows: Vec<(u64, Seq)> = stored_records(db)
        .into_iter()
        .filter(|r| r.device == device)
        .map(|r| (r.boot_id, r.seq))
        .collect();
    rows.sort_unstable();
    rows
}

/// One telemetry record as the SQLite file holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Its row (commit order).
    pub row: i64,
    /// Device id.
    pub device: String,
    /// Boot id.
    pub boot_id: u64,
    /// Sequence number.
    pub seq: Seq,
    /// Device time (or arrival time), ms since the epoch.
    pub time_ms: i64,
    /// The `Telemetry` message body as the device sent it.
    pub body: Vec<u8>,
}

/// Every telemetry record in the SQLite file, in row order, decoded from the chunks
/// as docs/STORE.md lays them out (written from that page, not from the gateway's
/// code: each record is postcard `(seq: u32, time_ms - min_time: u32, body: bytes)`,
/// rows `last_row - n + 1 ..= last_row`).
pub fn stored_records(db: &Path) -> Vec<StoredRecord> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut stmt = c
        .prepare(
            "SELECT c.last_row, c.n, d.id, c.boot_id, c.min_time, c.records
               FROM chunks c JOIN devices d ON d.key = c.device ORDER BY c.last_row",
        )
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    let mut out = Vec::new();
    while let Some(r) = rows.next().unwrap() {
        let (last_row, n, device): (i64, i64, String) =
            (r.get(0).unwrap(), r.get(1).unwrap(), r.get(2).unwrap());
        let (boot_id, min_time): (i64, i64) = (r.get(3).unwrap(), r.get(4).unwrap());
        let mut rest: &[u8] = r.get_ref(5).unwrap().as_blob().unwrap();
        for row in last_row - n + 1..=last_row {
            let ((seq, dt, body), tail) =
                postcard::take_from_bytes::<(Seq, u32, &[u8])>(rest).expect("a record decodes");
            rest = tail;
            out.push(StoredRecord {
                row,
                device: device.clone(),
                boot_id: boot_id as u64,
                seq,
                time_ms: min_time + i64::from(dt),
                body: body.to_vec(),
            });
        }
        assert!(
            rest.is_empty(),
            "chunk {last_row} holds more than its n records"
        );
    }
    out
}

/// A downlink message, owned, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub enum Down {
    /// `Welcome`.
    Welcome(Welcome),
    /// `Ack`.
    Ack(Seq),
    /// `Command`.
    Command {
        /// Id.
        id: u32,
        /// Name.
        name: String,
        /// Arguments as JSON.
        args: serde_json::Value,
        /// Time to live.
        ttl_ms: u32,
    },
    /// `Pong`.
    Pong(u32),
    /// `Goodbye`.
    Goodbye(Goodbye),
    /// `Desired` (version 2).
    Desired {
        /// Version reached.
        version: u32,
        /// Base version (0: the whole document).
        base: u32,
        /// Settings set, as JSON.
        set: serde_json::Value,
        /// Settings unset.
        unset: Vec<String>,
    },
    /// `FirmwareOffer` (version 3).
    FirmwareOffer {
        /// Transfer id.
        id: u32,
        /// Image version.
        version: String,
        /// Image length.
        size: u32,
        /// Image SHA-256.
        sha256: [u8; 32],
        /// Release signature.
        signature: [u8; 64],
    },
    /// `FirmwareChunk` (version 3).
    FirmwareChunk {
        /// Transfer id.
        id: u32,
        /// Where the data starts.
        offset: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `FirmwareCancel` (version 3).
    FirmwareCancel(u32),
}

impl Down {
    fn from(msg: &Downlink<'_>) -> Self {
        match msg {
            Downlink::Welcome(w) => Down::Welcome(*w),
            Downlink::Ack(a) => Down::Ack(a.seq),
            Downlink::Command(c) => Down::Command {
                id: c.id,
                name: c.name.to_string(),
                args: serde_json::Value::Object(gateway::testing::readings_to_json(&c.args)),
                ttl_ms: c.ttl_ms,
            },
            Downlink::Pong(p) => Down::Pong(p.nonce),
            Downlink::Goodbye(g) => Down::Goodbye(*g),
            Downlink::Desired(d) => {
                let mut set = Vec::new();
                let mut unset = Vec::new();
                for c in &d.changes {
                    match c {
                        device_client::proto::Change::Set(r) => set.push(*r),
                        device_client::proto::Change::Unset(n) => unset.push(n.to_string()),
                    }
                }
                Down::Desired {
                    version: d.version,
                    base: d.base,
                    set: serde_json::Value::Object(gateway::testing::readings_to_json(&set)),
                    unset,
                }
            }
            Downlink::FirmwareOffer(o) => Down::FirmwareOffer {
                id: o.id,
                version: o.version.as_str().to_owned(),
                size: o.size,
                sha256: o.sha256.0,
                signature: o.signature.0,
            },
            Downlink::FirmwareChunk(c) => Down::FirmwareChunk {
                id: c.id,
                offset: c.offset,
                data: c.data.to_vec(),
            },
            Downlink::FirmwareCancel(c) => Down::FirmwareCancel(c.id),
        }
    }
}

/// A device speaking the protocol frame by frame: the tests decide every byte.
pub struct RawDevice {
    stream: TlsStream<TcpStream>,
    rbuf: Vec<u8>,
    /// Frames decoded but not yet returned.
    queue: std::collections::VecDeque<Down>,
}

/// TLS client settings for a device: trust `ca`, present `cert` if given.
pub fn client_config(ca: &Ca, cert: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.certificate_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some(c) => builder
            .with_client_auth_cert(vec![c.certificate_der()], c.private_key_der())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

impl RawDevice {
    /// Opens TCP + TLS to the gateway. A refused certificate may only show on the first
    /// read (TLS 1.3 sends the client's certificate after the server's Finished).
    pub async fn connect(addr: SocketAddr, ca: &Ca, cert: Option<&Issued>) -> io::Result<Self> {
        Self::connect_with(addr, client_config(ca, cert)).await
    }

    /// Opens TCP + TLS with a given client configuration.
    pub async fn connect_with(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").unwrap();
        let stream = tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
        Ok(Self {
            stream,
            rbuf: Vec::new(),
            queue: Default::default(),
        })
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Uplink<'_>) -> io::Result<()> {
        let mut buf = [0u8; MAX_UPLINK_FRAME];
        let n = proto::encode(msg, &mut buf).unwrap();
        self.send_raw(&buf[..n]).await
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Sends `Ping`s without reading until a write takes longer than `stall` (the
    /// gateway stopped reading: its buffers and ours are full); how many went out.
    pub async fn flood_pings(&mut self, stall: Duration) -> u32 {
        let mut buf = [0u8; 16];
        let mut sent = 0;
        loop {
            let n = proto::encode(&Uplink::Ping(proto::Ping { nonce: sent }), &mut buf).unwrap();
            let frame = buf.get(..n).unwrap();
            match tokio::time::timeout(stall, self.send_raw(frame)).await {
                Ok(Ok(())) => sent += 1,
                Ok(Err(_)) | Err(_) => return sent,
            }
        }
    }

    /// Sends `Hello` and returns the `Welcome` (panics on anything else).
    pub async fn hello(&mut self, boot_id: u64) -> Welcome {
        self.hello_version(boot_id, PROTOCOL_VERSION).await
    }

    /// [`hello`](Self::hello) offering protocol `version`.
    pub async fn hello_version(&mut self, boot_id: u64, version: u8) -> Welcome {
        self.hello_as(boot_id, version, "test-1.0", MAX_DOWNLINK_FRAME as u16)
            .await
    }

    /// [`hello`](Self::hello) with every field chosen.
    pub async fn hello_as(
        &mut self,
        boot_id: u64,
        version: u8,
        firmware: &str,
        max_frame: u16,
    ) -> Welcome {
        self.send(&Uplink::Hello(Hello {
            version,
            boot_id,
            firmware: Text::new(firmware).unwrap(),
            max_frame,
        }))
        .await
        .unwrap();
        match self.recv().await.unwrap() {
            Some(Down::Welcome(w)) => w,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends one telemetry record with a `temp` reading equal to its seq.
    pub async fn telemetry(&mut self, seq: Seq) -> io::Result<()> {
        let mut readings = Readings::new();
        let name = proto::Name::new("temp").unwrap();
        readings
            .push(Reading::new(name, proto::Value::F64(f64::from(seq))))
            .unwrap();
        self.send(&Uplink::Telemetry(Telemetry {
            seq,
            time_ms: None,
            readings,
        }))
        .await
    }

    /// Sends a ping.
    pub async fn ping(&mut self, nonce: u32) -> io::Result<()> {
        self.send(&Uplink::Ping(Ping { nonce })).await
    }

    /// Answers a command.
    pub async fn result(
        &mut self,
        id: u32,
        status: CommandStatus,
        values: &[Reading<'_>],
    ) -> io::Result<()> {
        self.send(&Uplink::CommandResult(proto::CommandResult {
            id,
            status,
            values: Readings::from_slice(values).unwrap(),
        }))
        .await
    }

    /// The next message; `Ok(None)` when the gateway closed the connection. Fails after
    /// [`WAIT`].
    pub async fn recv(&mut self) -> io::Result<Option<Down>> {
        tokio::time::timeout(WAIT, self.recv_inner())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nothing from the gateway"))?
    }

    async fn recv_inner(&mut self) -> io::Result<Option<Down>> {
        loop {
            if let Some(d) = self.queue.pop_front() {
                return Ok(Some(d));
            }
            while let Some(frame) = proto::split_frame(&self.rbuf, MAX_DOWNLINK_FRAME)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                let msg = proto::decode_downlink(frame.body)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                let down = Down::from(&msg);
                drop(msg);
                let len = frame.len;
                self.queue.push_back(down);
                self.rbuf.drain(..len);
            }
            if !self.queue.is_empty() {
                continue;
            }
            let mut buf = [0u8; 4096];
            let n = match self.stream.read(&mut buf).await {
                Ok(n) => n,
                // A close without close_notify is still a close.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            self.rbuf.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits for an `Ack` covering `seq`, skipping other messages (returned in order).
    pub async fn wait_ack(&mut self, seq: Seq) -> Vec<Down> {
        let mut others = Vec::new();
        loop {
            match self.recv().await.unwrap() {
                Some(Down::Ack(a)) if a >= seq => return others,
                Some(Down::Ack(_)) => {}
                Some(d) => others.push(d),
                None => panic!("connection closed while waiting for ack {seq}"),
            }
        }
    }

    /// Reads until the gateway closes; returns the `Goodbye` it sent, if any.
    pub async fn goodbye(&mut self) -> Option<Goodbye> {
        let mut bye = None;
        loop {
            match self.recv().await {
                Ok(Some(Down::Goodbye(g))) => bye = Some(g),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return bye,
            }
        }
    }
}

/// An HTTP client of a gateway's operator API with its token (reqwest).
pub struct ApiClient {
    /// `http://ADDR`.
    pub base: String,
    /// The bearer token.
    pub token: String,
    /// The client.
    pub http: reqwest::Client,
}

impl ApiClient {
    /// A client of `gw`'s API.
    pub fn new(gw: &Gateway) -> Self {
        let info = gw.api().expect("the API runs");
        Self {
            base: format!("http://{}", info.addr),
            token: info.token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// Status, `Link` header, body as JSON (`Null` if it is not JSON). `body`: its
    /// content type and text.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> (u16, Option<String>, serde_json::Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some((content_type, body)) = body {
            req = req.header("content-type", content_type).body(body);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let link = r
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = r.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        (status, link, json)
    }

    /// `GET path`: status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (s, _, j) = self.call(reqwest::Method::GET, path, None).await;
        (s, j)
    }

    /// `METHOD path` with a JSON body: status and JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let body = Some(("application/json", body.to_string()));
        let (s, _, j) = self.call(method, path, body).await;
        (s, j)
    }

    /// `POST /api/v1/firmware`: the image and its signature file as a multipart form;
    /// status and JSON body.
    pub async fn upload_firmware(&self, image: &[u8], sig_json: &str) -> (u16, serde_json::Value) {
        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(image.to_vec()).file_name("fw.bin"),
            )
            .part(
                "signature",
                reqwest::multipart::Part::text(sig_json.to_owned()).file_name("fw.bin.sig.json"),
            );
        let r = self
            .http
            .post(format!("{}/api/v1/firmware", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// `GET path`: status and body text.
    pub async fn text(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }
}

/// Waits until `check` returns `Some`, polling every 20 ms, for at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP/1.1 GET over a fresh connection (`Connection: close`), for tests that
/// need no HTTP client crate: returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    try_http_get(addr, path, token)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// [`http_get`] that says what went wrong instead of panicking (a refused or closed
/// connection, no answer within [`WAIT`]).
pub async fn try_http_get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    try_http(addr, "GET", path, token, None).await
}

/// `POST path` with a JSON body, as [`http_get`] does a GET.
pub async fn http_post_json(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> (u16, String) {
    try_http(addr, "POST", path, token, Some(&body.to_string()))
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    json: Option<&str>,
) -> Result<(u16, String), String> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = json.map_or(String::new(), |j| {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{j}",
            j.len()
        )
    });
    let end = if json.is_some() { "" } else { "\r\n" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n{body}{end}"
    );
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .map_err(|_| "no HTTP response in time".to_owned())??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// The value of one Prometheus sample (`name` with its labels, as written), read from
/// the gateway's `/metrics`; `None` if it is not there.
pub async fn metric(gw: &Gateway, sample: &str) -> Option<f64> {
    let api = gw.api().expect("the API runs");
    let (status, text) = http_get(api.addr, "/metrics", Some(&api.token)).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// The first bytes of a TLS record that announces a 512-byte ClientHello and never
/// delivers it: the cheapest way to hold a connection in its handshake.
pub const PARTIAL_CLIENT_HELLO: [u8; 6] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];

/// Opens `n` connections to `to` from the loopback address `from`, each left in its
/// handshake after [`PARTIAL_CLIENT_HELLO`]; returns those that connected within a
/// second each. (The gateway may close some at once, or its backlog may be full: an
/// attacker does not care, nor does a test of what devices see meanwhile.)
pub async fn hold_half_open(from: [u8; 4], to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let connect = async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::from((from, 0)))?;
            s.connect(to).await
        };
        if let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            let _ = tcp.write_all(&PARTIAL_CLIENT_HELLO).await;
            held.push(tcp);
        }
    }
    held
}

/// A device that answers `echo` with its `text`, ignores `ignore` (the command stays
/// `sent`), and answers anything else `UnknownCommand`.
pub fn answer_commands(mut dev: RawDevice) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Some(msg)) = dev.recv().await {
            let Down::Command { id, name, args, .. } = msg else {
                continue;
            };
            match name.as_str() {
                "echo" => {
                    let text = args["text"].as_str().unwrap_or_default().to_owned();
                    let n = proto::Name::new("text").expect("a valid name");
                    let v = Value::str(&text).expect("a short text");
                    dev.result(id, CommandStatus::Succeeded, &[Reading::new(n, v)])
                        .await
                        .expect("sending the result");
                }
                "ignore" => {}
                _ => dev
                    .result(id, CommandStatus::UnknownCommand, &[])
                    .await
                    .expect("sending the result"),
            }
        }
    })
}

/// Devices send `per_device` records each, seqs `from..from+per_device` (round-robin),
/// and wait for their acks.
pub async fn stream_records(devices: &mut [RawDevice], from: Seq, per_device: Seq) {
    for seq in from..from + per_device {
        for d in devices.iter_mut() {
            d.telemetry(seq).await.expect("sending a record");
        }
    }
    for d in devices.iter_mut() {
        d.wait_ack(from + per_device - 1).await;
    }
}
