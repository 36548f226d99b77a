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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PubAckReason, PublishProperties};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, Transport};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{MqttSettings, PayloadFormat};
use crate::store::{SinkRecord, Store, StoreError, body_to_json, now_ms};

/// The sink's name in the store.
pub const SINK: &str = "mqtt";
/// Publishes awaiting their PUBACK, at most.
const WINDOW: usize = 256;
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
    /// Records the broker refused in its PUBACK (not authorized, quota ...): logged and
    /// passed over, never retried forever.
    pub refused: AtomicU64,
    /// The last record delivered (its row).
    pub cursor: AtomicI64,
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
    options: MqttOptions,
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
        let mut options = MqttOptions::new(&settings.client_id, &broker.host, broker.port);
        options.set_keep_alive(settings.keep_alive);
        // A persistent session: the broker keeps what it acknowledged for subscribers
        // while the bridge reconnects.
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(u32::MAX));
        options.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        options.set_max_packet_size(Some(1 << 20));
        let status_topic = format!(
            "{}/gateways/{}/status",
            settings.topic_prefix, settings.gateway_id
        );
        options.set_last_will(LastWill::new(
            status_topic,
            json!({"state": "offline", "gateway": settings.gateway_id}).to_string(),
            QoS::AtLeastOnce,
            true,
            None,
        ));
        if broker.tls {
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(client_tls(&settings)?)),
            ));
        }
        Ok(Self {
            settings,
            options,
            store,
            status,
        })
    }

    /// Relays until `stop` turns true: connects, publishes from the cursor, reconnects
    /// with a growing pause after a failure (each logged with its reason).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut cursor = loop {
            match self.store.open_sink(SINK).await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(error = %e, "MQTT bridge: the store cannot open its cursor; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(BACKOFF.1) => {}
                        () = stopped(&mut stop) => return,
                    }
                }
            }
        };
        self.status.cursor.store(cursor, Ordering::Relaxed);
        let mut backoff = BACKOFF.0;
        loop {
            let (client, events) = AsyncClient::new(self.options.clone(), WINDOW * 2);
            let mut conn = Connection {
                bridge: &self,
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

    fn qos(&self) -> QoS {
        if self.settings.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
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

/// One connection to the broker.
struct Connection<'a> {
    bridge: &'a Bridge,
    client: AsyncClient,
    events: EventLoop,
    /// Every record up to this row was delivered.
    cursor: i64,
    /// The cursor as last committed.
    saved: i64,
    /// The last row handed to the client.
    next: i64,
    /// Rows published and not yet delivered, in order, with whether their PUBACK came.
    in_flight: VecDeque<(i64, bool)>,
    /// Publishes handed to the client that have no packet id yet (`None`: the status
    /// message, not a record). The client sends them in this order.
    unassigned: VecDeque<Option<i64>>,
    by_pkid: HashMap<u16, i64>,
}

impl Connection<'_> {
    /// Until `stop` (then `Ok`) or a connection error (its reason).
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), String> {
        let status = &self.bridge.status;
        // CONNACK first.
        loop {
            let ev = tokio::select! {
                ev = tokio::time::timeout(CONNECT_TIMEOUT * 2, self.events.poll()) => ev,
                () = stopped(stop) => return Ok(()),
            };
            match ev {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(describe(&e)),
                Err(_) => return Err("no CONNACK in time".into()),
            }
        }
        status.connected.store(true, Ordering::Relaxed);
        info!(broker = %self.bridge.settings.url, cursor = self.cursor, "MQTT bridge connected");
        let s = &self.bridge.settings;
        let online = json!({"state": "online", "gateway": s.gateway_id, "time_ms": now_ms()});
        self.unassigned.push_back(None);
        self.client
            .publish(
                format!("{}/gateways/{}/status", s.topic_prefix, s.gateway_id),
                QoS::AtLeastOnce,
                true,
                online.to_string(),
            )
            .await
            .map_err(|e| e.to_string())?;

        let mut commits = self.bridge.store.watch_commits();
        let mut tick = tokio::time::interval(CURSOR_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut more = true;
        loop {
            if more && self.in_flight.len() < WINDOW {
                more = self.publish_more().await?;
            }
            tokio::select! {
                ev = self.events.poll() => match ev {
                    Ok(ev) => self.on_event(ev),
                    Err(e) => {
                        self.save_cursor().await;
                        return Err(describe(&e));
                    }
                },
                changed = commits.changed(), if !more => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    more = true;
                }
                _ = tick.tick() => {
                    self.save_cursor().await;
                    // A commit seen before `commits` was read is not lost: look again.
                    more = true;
                }
                () = stopped(stop) => {
                    self.drain_acks().await;
                    self.save_cursor().await;
                    let _ = self.client.disconnect().await;
                    return Ok(());
                }
            }
        }
    }

    /// Hands the next records to the client, up to the window; `false` once there is
    /// nothing more to send now.
    async fn publish_more(&mut self) -> Result<bool, String> {
        let room = WINDOW - self.in_flight.len();
        let rows = self
            .bridge
            .store
            .telemetry_after(self.next, room)
            .await
            .map_err(|e| format!("reading the store: {e}"))?;
        let more = rows.len() == room;
        for rec in rows {
            let (payload, content_type) = match self.bridge.settings.payload {
                PayloadFormat::Json => (json_payload(&rec), "application/json"),
                PayloadFormat::Postcard => (rec.body.clone(), "application/x-postcard"),
            };
            let properties = PublishProperties {
                content_type: Some(content_type.into()),
                user_properties: vec![
                    ("boot".into(), rec.boot_id.to_string()),
                    ("seq".into(), rec.seq.to_string()),
                ],
                ..Default::default()
            };
            let qos = self.bridge.qos();
            self.unassigned.push_back(Some(rec.row));
            self.in_flight.push_back((rec.row, false));
            self.next = rec.row;
            self.client
                .publish_with_properties(
                    self.bridge.topic(&rec.device, "telemetry"),
                    qos,
                    false,
                    payload,
                    properties,
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(more)
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some(row) = self.unassigned.pop_front() else {
                    return;
                };
                match (row, self.bridge.qos()) {
                    // QoS 0: sent is all there will be.
                    (Some(row), QoS::AtMostOnce) => self.delivered(row),
                    (Some(row), _) => {
                        self.by_pkid.insert(pkid, row);
                    }
                    (None, _) => {}
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(row) = self.by_pkid.remove(&ack.pkid) else {
                    return;
                };
                if !matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    self.bridge.status.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(reason = ?ack.reason, row, "MQTT bridge: the broker refused a record");
                }
                self.delivered(row);
            }
            _ => {}
        }
    }

    /// Marks `row` delivered and moves the cursor past every delivered row at the front.
    fn delivered(&mut self, row: i64) {
        if let Some(slot) = self.in_flight.iter_mut().find(|(r, _)| *r == row) {
            slot.1 = true;
        }
        while let Some(&(r, true)) = self.in_flight.front() {
            self.in_flight.pop_front();
            self.cursor = r;
            self.bridge.status.published.fetch_add(1, Ordering::Relaxed);
        }
        self.bridge
            .status
            .cursor
            .store(self.cursor, Ordering::Relaxed);
    }

    /// At a clean stop: collects the PUBACKs still coming, for up to 2 s.
    async fn drain_acks(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Ok(Ok(ev)) => self.on_event(ev),
                _ => return,
            }
        }
    }

    async fn save_cursor(&mut self) {
        if self.cursor == self.saved {
            return;
        }
        match self.bridge.store.set_sink_cursor(SINK, self.cursor).await {
            Ok(()) => self.saved = self.cursor,
            // Kept in memory and tried again: the worst case is records sent twice.
            Err(e) => warn!(error = %e, "MQTT bridge: could not save its cursor"),
        }
    }
}

/// Resolves once `stop` is true (the guard `wait_for` returns is not `Send`: dropped
/// here, before any arm's body awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The JSON payload of a record: as the HTTP API shows it (`boot_id` as a string).
fn json_payload(rec: &SinkRecord) -> Vec<u8> {
    json!({
        "device": rec.device,
        "boot_id": rec.boot_id.to_string(),
        "seq": rec.seq,
        "time_ms": rec.time_ms,
        "received_ms": rec.received_ms,
        "values": body_to_json(&rec.body),
    })
    .to_string()
    .into_bytes()
}

/// A connection error in words an operator can act on.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Tls(t) => format!(
            "TLS with the broker failed: {t} (is mqtt.ca the CA of the broker's certificate, \
             and does the certificate name the host in mqtt.url?)"
        ),
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
