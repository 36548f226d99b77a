//! The MQTT bridge: relays committed telemetry to an MQTT broker, store-and-forward,
//! from the store itself (docs/MQTT.md).
//!
//! ```text
//!  sessions ─► store writer ─ commit ─► telemetry (rowid = commit order)
//!                                  │             │ rows after the cursor, a window at a time
//!                         commits watch          ▼
//!                                  └──────► bridge ─ PUBLISH (QoS 1) ─► broker
//!                                                 ◄─ PUBACK ──────────┘
//!              sinks.cursor ◄─ every 250 ms: the last row whose PUBACK came, and every
//!                                             row before it
//! ```
//!
//! The store is the buffer: devices are acked when their records are committed, as
//! before, whatever the broker does. The cursor moves only past records the broker
//! acknowledged, in the same SQLite file, so a broker outage, a slow broker or a crash
//! of the gateway loses nothing: after a reconnect or a restart the bridge publishes
//! again from the cursor. A record can reach the broker twice only if its PUBACK, or
//! the cursor's commit, was lost; its `boot` and `seq` (MQTT 5 user properties, and in
//! the JSON) let a consumer drop the copy.
//!
//! Every connection is a fresh client: nothing the MQTT client kept from a broken one
//! is re-sent behind the bridge's back; what is unacknowledged is read again from the
//! store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Transport;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use crate::config::{MqttSettings, PayloadFormat};
use crate::events::Event as GatewayEvent;
use crate::store::{CommandRecord, SinkRecord, Store, StoreError, body_to_json, now_ms};
use crate::{CommandError, Gateway};

mod client;
mod connection;
use client::{Client, Events, Happened, Incoming, Message, Options, Setup};
use connection::*;

/// The sink's name in the store.
pub const SINK: &str = "mqtt";
/// Telemetry publishes awaiting their PUBACK, at most.
const WINDOW: usize = 256;
/// Publishes of any kind handed to the client and not yet sent, at most: with the
/// acks the broker can make us owe ([`RECEIVE_MAXIMUM`]) this stays below the client's
/// request channel ([`CHANNEL`]), so handing one over never waits on the task that
/// would make room.
const UNSENT: usize = 3 * WINDOW;
/// The client's request channel.
const CHANNEL: usize = 4 * WINDOW;
/// Command requests the broker may send before we acknowledge them.
const RECEIVE_MAXIMUM: u16 = 32;
/// Presence and command messages waiting for room, at most; past it, events are left
/// in their channel and, if that overflows, everything is read again from the store.
const OUTBOX: usize = 4096;
/// (device, reading) pairs announced to Home Assistant that are remembered; past it
/// the set starts again (announcing twice is harmless: the config is retained).
const ANNOUNCED: usize = 100_000;
/// How often the cursor is committed while it moves.
const CURSOR_EVERY: Duration = Duration::from_millis(250);
/// Time allowed to connect (TCP, TLS, CONNACK).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Waits between connection attempts: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));

/// Where the broker is, from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

impl Broker {
    /// Parses `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!(
                "{url:?}: use mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let default = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 address without a port is bracketed: [::1].
            Some((h, p)) if !h.is_empty() && !p.contains(']') => (
                h,
                p.parse()
                    .map_err(|_| format!("{url:?}: {p:?} is not a port"))?,
            ),
            _ => (rest, default),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(format!("{url:?}: no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

/// What the bridge is doing, for `/metrics` and `GET /api/v1/bridge`.
#[derive(Debug, Default)]
pub struct BridgeStatus {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// Records the broker acknowledged (QoS 1) or that were sent (QoS 0).
    pub published: AtomicU64,
    /// Connections lost or refused.
    pub connect_failures: AtomicU64,
    /// Connections the broker accepted (the first, then each reconnect).
    pub connects: AtomicU64,
    /// Records the broker refused in its PUBACK (not authorized, quota ...): logged and
    /// passed over, never retried forever.
    pub refused: AtomicU64,
    /// The last record delivered (its row).
    pub cursor: AtomicI64,
    /// Records retention deleted before the bridge delivered them
    /// (`mqtt.drop_undelivered`).
    pub dropped: AtomicU64,
    /// Command requests taken from the broker (queued or answered with an error).
    pub commands: AtomicU64,
    /// Why the last connection failed.
    pub last_error: Mutex<Option<String>>,
}

impl BridgeStatus {
    fn failed(&self, why: String) {
        self.connected.store(false, Ordering::Relaxed);
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// The last connection error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// `mqtt.url` does not parse.
    #[error("mqtt.url: {0}")]
    Url(String),
    /// The TLS files for the broker could not be loaded.
    #[error("mqtt TLS: {0}")]
    Tls(String),
    /// The store could not open the sink.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything a connection needs, made once.
pub struct Bridge {
    settings: MqttSettings,
    options: Options,
    store: Store,
    status: Arc<BridgeStatus>,
}

impl Bridge {
    /// Checks the settings and loads the TLS material; nothing connects yet.
    pub fn new(
        settings: MqttSettings,
        store: Store,
        status: Arc<BridgeStatus>,
    ) -> Result<Self, BridgeError> {
        let broker = Broker::parse(&settings.url).map_err(BridgeError::Url)?;
        let transport = if broker.tls {
            Some(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(client_tls(&settings)?)),
            ))
        } else {
            None
        };
        let options = Options::new(
            settings.protocol,
            Setup {
                client_id: settings.client_id.clone(),
                host: broker.host,
                port: broker.port,
                keep_alive: settings.keep_alive,
                connect_timeout: CONNECT_TIMEOUT,
                will_topic: format!(
                    "{}/gateways/{}/status",
                    settings.topic_prefix, settings.gateway_id
                ),
                will_payload: json!({"state": "offline", "gateway": settings.gateway_id})
                    .to_string()
                    .into_bytes(),
                transport,
                receive_maximum: RECEIVE_MAXIMUM,
            },
        );
        Ok(Self {
            settings,
            options,
            store,
            status,
        })
    }

    /// Relays until `stop` turns true: connects, publishes from the cursor, reconnects
    /// with a growing pause after a failure (each logged with its reason). `gw` is the
    /// gateway whose presence and commands it relays.
    pub async fn run(self, gw: Gateway, mut stop: watch::Receiver<bool>) {
        let mut relay = Relay {
            control: gw.shared().subscribe_control(),
            gw,
            replies: HashMap::new(),
            announced: HashSet::new(),
        };
        let Some(mut cursor) = open_cursor(&self.store, SINK, &mut stop).await else {
            return;
        };
        self.status.cursor.store(cursor, Ordering::Relaxed);
        let mut backoff = BACKOFF.0;
        loop {
            let (client, events) = self.options.connect(CHANNEL);
            let mut conn = Connection {
                bridge: &self,
                relay: &mut relay,
                outbox: VecDeque::new(),
                client,
                events,
                cursor,
                saved: cursor,
                next: cursor,
                in_flight: VecDeque::new(),
                unassigned: VecDeque::new(),
                by_pkid: HashMap::new(),
            };
            let end = conn.run(&mut stop).await;
            cursor = conn.cursor;
            match end {
                Ok(()) => return,
                Err(why) => {
                    let was_connected = self.status.connected.load(Ordering::Relaxed);
                    self.status.failed(why.clone());
                    if was_connected {
                        backoff = BACKOFF.0;
                    }
                    warn!(
                        error = %why,
                        broker = %self.settings.url,
                        retry_in = ?backoff,
                        "MQTT bridge: no connection to the broker; telemetry is kept in the \
                         store and relayed when it is back"
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stopped(&mut stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }

    fn topic(&self, device: &str, what: &str) -> String {
        format!("{}/devices/{device}/{what}", self.settings.topic_prefix)
    }

    /// The device a command request's topic names (`{prefix}/devices/{id}/commands/request`).
    fn request_device<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let id = topic
            .strip_prefix(self.settings.topic_prefix.as_str())?
            .strip_prefix("/devices/")?
            .strip_suffix("/commands/request")?;
        (!id.is_empty() && !id.contains('/')).then_some(id)
    }

    fn at_least_once(&self) -> bool {
        self.settings.qos >= 1
    }
}

/// The rustls configuration for `mqtts://`: the broker verified against `mqtt.ca`,
/// a client certificate if `mqtt.cert` names one.
fn client_tls(s: &MqttSettings) -> Result<rustls::ClientConfig, BridgeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |what: &str, e: &dyn std::fmt::Display| BridgeError::Tls(format!("{what}: {e}"));
    let ca = s.ca.as_ref().ok_or_else(|| {
        BridgeError::Tls(
            "mqtts:// needs mqtt.ca, the CA that signs the broker's certificate".into(),
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| tls(&ca.display().to_string(), &e))? {
        let cert = cert.map_err(|e| tls(&ca.display().to_string(), &e))?;
        roots
            .add(cert)
            .map_err(|e| tls(&ca.display().to_string(), &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls("protocol versions", &e))?
        .with_root_certificates(roots);
    match (&s.cert, &s.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| tls(&cert.display().to_string(), &e))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls(&key.display().to_string(), &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls("mqtt.cert and mqtt.key", &e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not `Send`: dropped
/// here, before any arm's body awaits).
/// A sink's cursor, once the store can give it (retried every few seconds, logged);
/// `None` if `stop` came first.
pub(crate) async fn open_cursor(
    store: &Store,
    sink: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<i64> {
    loop {
        match store.open_sink(sink).await {
            Ok(c) => return Some(c),
            Err(e) => {
                warn!(error = %e, sink, "the store cannot open a sink's cursor; retrying");
                tokio::select! {
                    () = tokio::time::sleep(BACKOFF.1) => {}
                    () = stopped(stop) => return None,
                }
            }
        }
    }
}

pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The JSON payload of a record: as the HTTP API shows it (`boot_id` as a string).
pub(crate) fn json_payload(rec: &SinkRecord, values: Map<String, Json>) -> Vec<u8> {
    json!({
        "device": rec.device,
        "boot_id": rec.boot_id.to_string(),
        "seq": rec.seq,
        "time_ms": rec.time_ms,
        "received_ms": rec.received_ms,
        "values": values,
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_name_one_device() {
        let (store, _writer, _dir) = {
            let dir = tempfile::tempdir().unwrap();
            let (store, writer) = Store::open(crate::store::StoreOptions {
                path: dir.path().join("t.sqlite"),
                danger_ack_before_fsync: false,
                max_commit_records: 10,
                max_queued_commands: 1,
                sinks: Vec::new(),
            })
            .unwrap();
            (store, writer, dir)
        };
        let b = Bridge::new(
            MqttSettings::default(),
            store,
            Arc::new(BridgeStatus::default()),
        )
        .unwrap();
        let d = |t| b.request_device(t);
        assert_eq!(d("iot/devices/s-1/commands/request"), Some("s-1"));
        assert_eq!(d("iot/devices//commands/request"), None);
        assert_eq!(d("iot/devices/a/b/commands/request"), None);
        assert_eq!(d("iotx/devices/s-1/commands/request"), None);
        assert_eq!(d("iot/devices/s-1/commands/response"), None);
    }

    #[test]
    fn broker_urls() {
        let b = |u| Broker::parse(u);
        assert_eq!(
            b("mqtt://localhost"),
            Ok(Broker {
                host: "localhost".into(),
                port: 1883,
                tls: false
            })
        );
        assert_eq!(
            b("mqtts://10.0.0.1:9000").map(|b| (b.port, b.tls)),
            Ok((9000, true))
        );
        assert_eq!(b("mqtts://broker/").map(|b| b.port), Ok(8883));
        assert_eq!(
            b("mqtt://[::1]:1884").map(|b| (b.host, b.port)),
            Ok(("::1".into(), 1884))
        );
        assert_eq!(
            b("mqtt://[::1]").map(|b| (b.host, b.port)),
            Ok(("::1".into(), 1883))
        );
        assert!(b("http://x").is_err());
        assert!(b("mqtt://").is_err());
        assert!(b("mqtt://x:port").is_err());
    }
}
