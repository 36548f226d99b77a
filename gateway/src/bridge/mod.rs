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
use client::{Client, Events, Happened, Incoming, Message, Options, Setup};

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

/// What the bridge keeps from one connection to the next.
struct Relay {
    gw: Gateway,
    /// Presence and command events.
    control: broadcast::Receiver<Arc<GatewayEvent>>,
    /// Commands requested over MQTT 5 with a Response Topic: where their state
    /// changes go, until the final one.
    replies: HashMap<i64, Reply>,
    /// (device, reading) pairs announced to Home Assistant.
    announced: HashSet<(String, String)>,
}

/// Where a command's state changes go.
struct Reply {
    topic: String,
    correlation: Option<Bytes>,
}

/// A message that is not a record: status, presence, a command's state, an
/// announcement. Not kept in the store: after an outage the current state is sent.
struct Note {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    correlation: Option<Bytes>,
}

/// A command request's payload (docs/MQTT.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    name: String,
    #[serde(default)]
    args: Json,
    ttl_s: Option<f64>,
}

/// One connection to the broker.
struct Connection<'a> {
    bridge: &'a Bridge,
    relay: &'a mut Relay,
    /// Notes waiting for room in the client's channel.
    outbox: VecDeque<Note>,
    client: Client,
    events: Events,
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
                Ok(Ok(Happened::ConnAck)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("no CONNACK in time".into()),
            }
        }
        status.connected.store(true, Ordering::Relaxed);
        status.connects.fetch_add(1, Ordering::Relaxed);
        info!(broker = %self.bridge.settings.url, cursor = self.cursor, "MQTT bridge connected");
        let s = &self.bridge.settings;
        let online = json!({"state": "online", "gateway": s.gateway_id, "time_ms": now_ms()});
        self.outbox.push_back(Note {
            topic: format!("{}/gateways/{}/status", s.topic_prefix, s.gateway_id),
            payload: online.to_string().into_bytes(),
            retain: true,
            correlation: None,
        });
        if s.accept_commands {
            self.client
                .subscribe(format!("{}/devices/+/commands/request", s.topic_prefix))
                .await?;
        }
        self.resync().await;

        let mut commits = self.bridge.store.watch_commits();
        let mut tick = tokio::time::interval(CURSOR_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut more = true;
        loop {
            self.flush_outbox().await?;
            // Refilled by half a window at a time: one read of the store per 128
            // records, not one per PUBACK.
            if more && self.in_flight.len() <= WINDOW / 2 && self.unassigned.len() < UNSENT {
                more = self.publish_more().await?;
            }
            let room = self.outbox.len() < OUTBOX;
            tokio::select! {
                ev = self.events.poll() => match ev {
                    Ok(ev) => {
                        if let Some(request) = self.on_event(ev) {
                            self.command_request(request).await?;
                        }
                    }
                    Err(e) => {
                        self.save_cursor().await;
                        return Err(e);
                    }
                },
                ev = self.relay.control.recv(), if room => match ev {
                    Ok(ev) => self.on_control(&ev),
                    // Fell behind: what is current is read from the store instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.resync().await,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
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
                    self.client.disconnect().await;
                    return Ok(());
                }
            }
        }
    }

    /// After a (re)connect or falling behind the events: every device's presence as
    /// the store has it, and the state of every command whose replies are awaited.
    async fn resync(&mut self) {
        self.relay.control = self.relay.control.resubscribe();
        self.outbox.clear();
        match self.relay.gw.devices().await {
            Ok(devices) => {
                for d in devices {
                    let note = self.presence(&d.id, d.online, None);
                    self.outbox.push_back(note);
                }
            }
            Err(e) => warn!(error = %e, "MQTT bridge: could not read the devices' presence"),
        }
        let ids: Vec<i64> = self.relay.replies.keys().copied().collect();
        for id in ids {
            match self.relay.gw.store().command(id).await {
                Ok(Some(rec)) => self.command_changed(&rec),
                Ok(None) => {
                    self.relay.replies.remove(&id);
                }
                Err(e) => warn!(error = %e, id, "MQTT bridge: could not read a command"),
            }
        }
    }

    fn on_control(&mut self, ev: &GatewayEvent) {
        match ev {
            GatewayEvent::Presence {
                device,
                online,
                reason,
                ..
            } => {
                let note = self.presence(device, *online, reason.as_deref());
                self.outbox.push_back(note);
            }
            GatewayEvent::Command(rec) => self.command_changed(rec),
            _ => {}
        }
    }

    fn presence(&self, device: &str, online: bool, reason: Option<&str>) -> Note {
        let mut payload = json!({
            "state": if online { "online" } else { "offline" },
            "gateway": self.bridge.settings.gateway_id,
            "time_ms": now_ms(),
        });
        if let Some(r) = reason {
            payload["reason"] = r.into();
        }
        Note {
            topic: self.bridge.topic(device, "presence"),
            payload: payload.to_string().into_bytes(),
            retain: true,
            correlation: None,
        }
    }

    /// A command's new state, to its requester's Response Topic or to the device's
    /// `commands/response`.
    fn command_changed(&mut self, rec: &CommandRecord) {
        let (topic, correlation) = match self.relay.replies.get(&rec.id) {
            Some(r) => (r.topic.clone(), r.correlation.clone()),
            None => (self.bridge.topic(&rec.device, "commands/response"), None),
        };
        if rec.state.is_final() {
            self.relay.replies.remove(&rec.id);
        }
        match serde_json::to_vec(rec) {
            Ok(payload) => self.outbox.push_back(Note {
                topic,
                payload,
                retain: false,
                correlation,
            }),
            Err(e) => warn!(error = %e, id = rec.id, "MQTT bridge: a command did not serialize"),
        }
    }

    /// A command request from the broker: queued exactly as the HTTP API queues one,
    /// or answered with an error; acknowledged to the broker after either. A retained
    /// request is acknowledged and ignored: a command runs when it is asked for, not
    /// each time the bridge subscribes.
    async fn command_request(&mut self, p: Incoming) -> Result<(), String> {
        let topic = p.topic();
        let device = self.bridge.request_device(&topic).map(str::to_owned);
        if let (Some(device), false) = (device, p.retained()) {
            self.bridge.status.commands.fetch_add(1, Ordering::Relaxed);
            let (response_topic, correlation) = p.reply_to();
            let response_topic =
                response_topic.filter(|t| !t.is_empty() && !t.contains(['+', '#', '\0']));
            let outcome = queue_command(&self.relay.gw, &device, p.payload()).await;
            let topic = response_topic
                .clone()
                .unwrap_or_else(|| self.bridge.topic(&device, "commands/response"));
            match outcome {
                Ok(rec) => {
                    debug!(device, id = rec.id, "MQTT bridge: command queued");
                    if response_topic.is_some() {
                        // Its `queued` event is still in the channel: it goes here.
                        self.relay
                            .replies
                            .insert(rec.id, Reply { topic, correlation });
                    }
                }
                Err((code, message)) => {
                    info!(device, code, error = %message, "MQTT bridge: command request refused");
                    if self.outbox.len() >= OUTBOX {
                        // A flood of bad requests while the broker takes nothing: the
                        // answers are what gives way, not memory.
                        return self.client.ack(&p).await;
                    }
                    self.outbox.push_back(Note {
                        topic,
                        payload: json!({"error": message, "code": code, "device": device})
                            .to_string()
                            .into_bytes(),
                        retain: false,
                        correlation,
                    });
                }
            }
        }
        self.client.ack(&p).await
    }

    /// Hands waiting notes to the client while there is room.
    async fn flush_outbox(&mut self) -> Result<(), String> {
        while self.unassigned.len() < UNSENT {
            let Some(note) = self.outbox.pop_front() else {
                break;
            };
            self.send_note(note).await?;
        }
        Ok(())
    }

    async fn send_note(&mut self, note: Note) -> Result<(), String> {
        self.unassigned.push_back(None);
        self.client
            .publish(Message {
                topic: note.topic,
                payload: note.payload,
                retain: note.retain,
                at_least_once: self.bridge.at_least_once(),
                content_type: "application/json",
                user_properties: Vec::new(),
                correlation: note.correlation,
            })
            .await
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
        let mut more = rows.len() == room;
        for rec in rows {
            let values = body_to_json(&rec.body);
            let announce = self.announcements(&rec.device, &values);
            if self.unassigned.len() + announce.len() >= UNSENT {
                // The rest is read again once there is room.
                more = true;
                break;
            }
            for note in announce {
                self.send_note(note).await?;
            }
            let (payload, content_type) = match self.bridge.settings.payload {
                PayloadFormat::Json => (json_payload(&rec, values), "application/json"),
                PayloadFormat::Postcard => (rec.body.clone(), "application/x-postcard"),
            };
            self.unassigned.push_back(Some(rec.row));
            self.in_flight.push_back((rec.row, false));
            self.next = rec.row;
            self.client
                .publish(Message {
                    topic: self.bridge.topic(&rec.device, "telemetry"),
                    payload,
                    retain: false,
                    at_least_once: self.bridge.at_least_once(),
                    content_type,
                    user_properties: vec![
                        ("boot".into(), rec.boot_id.to_string()),
                        ("seq".into(), rec.seq.to_string()),
                    ],
                    correlation: None,
                })
                .await?;
        }
        Ok(more)
    }

    /// Home Assistant discovery configs for readings of `device` not announced yet
    /// (none unless `mqtt.home_assistant`).
    fn announcements(&mut self, device: &str, values: &Map<String, Json>) -> Vec<Note> {
        let s = &self.bridge.settings;
        if !s.home_assistant {
            return Vec::new();
        }
        let mut notes = Vec::new();
        for (key, value) in values {
            let pair = (device.to_owned(), key.clone());
            if self.relay.announced.contains(&pair) {
                continue;
            }
            if self.relay.announced.len() >= ANNOUNCED {
                self.relay.announced.clear();
            }
            self.relay.announced.insert(pair);
            notes.push(home_assistant_config(s, device, key, value));
        }
        notes
    }

    /// Notes what happened; returns a command request to be handled.
    fn on_event(&mut self, ev: Happened) -> Option<Incoming> {
        match ev {
            Happened::Request(p) => return Some(p),
            Happened::Sent(pkid) => {
                let row = self.unassigned.pop_front()?;
                match (row, self.bridge.at_least_once()) {
                    // QoS 0: sent is all there will be.
                    (Some(row), false) => self.delivered(row),
                    (Some(row), true) => {
                        self.by_pkid.insert(pkid, row);
                    }
                    (None, _) => {}
                }
            }
            Happened::Acked { pkid, refused } => {
                let row = self.by_pkid.remove(&pkid)?;
                if let Some(reason) = refused {
                    self.bridge.status.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(reason, row, "MQTT bridge: the broker refused a record");
                }
                self.delivered(row);
            }
            Happened::ConnAck | Happened::Other => {}
        }
        None
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

    /// At a clean stop: collects the PUBACKs still coming, for up to 2 s. Command
    /// requests arriving now are left unacknowledged: the broker delivers them again.
    async fn drain_acks(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Ok(Ok(ev)) => {
                    self.on_event(ev);
                }
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

/// Checks and queues one request: the command, or an error code and message (the
/// HTTP API's codes).
async fn queue_command(
    gw: &Gateway,
    device: &str,
    body: &[u8],
) -> Result<CommandRecord, (&'static str, String)> {
    let req: Request = serde_json::from_slice(body).map_err(|e| {
        (
            "bad_body",
            format!("{e}: send {{\"name\": ..., \"args\": {{...}}, \"ttl_s\": ...}}"),
        )
    })?;
    let ttl = match req.ttl_s {
        None => None,
        Some(t) => Some(crate::ttl_from_secs(t).ok_or((
            "bad_ttl",
            "ttl_s must be a positive number of seconds (at most a year)".to_owned(),
        ))?),
    };
    match gw.device(device).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(("no_device", format!("no device {device:?}"))),
        Err(e) => return Err(("store", e.to_string())),
    }
    let args = if req.args.is_null() {
        Json::Object(Map::new())
    } else {
        req.args
    };
    gw.send_command(device, &req.name, &args, ttl)
        .await
        .map_err(|e| {
            let code = match &e {
                CommandError::Store(StoreError::QueueFull { .. }) => "queue_full",
                CommandError::Store(_) => "store",
                CommandError::InvalidDevice(_) => "bad_device_id",
                _ => "bad_command",
            };
            (code, e.to_string())
        })
}

/// A Home Assistant MQTT discovery config: one sensor for one reading of one device,
/// reading the telemetry topic, available while the device's presence says online.
fn home_assistant_config(s: &MqttSettings, device: &str, key: &str, value: &Json) -> Note {
    // Discovery ids allow [a-zA-Z0-9_-]; device ids and names also allow '.'.
    let id = |t: &str| t.replace('.', "_");
    let topic = |what: &str| format!("{}/devices/{device}/{what}", s.topic_prefix);
    let mut config = json!({
        "name": key,
        "unique_id": format!("{}_{}_{}", id(&s.gateway_id), id(device), id(key)),
        "object_id": format!("{}_{}", id(device), id(key)),
        "state_topic": topic("telemetry"),
        "value_template": format!("{{{{ value_json['values']['{key}'] }}}}"),
        "availability_topic": topic("presence"),
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [format!("{}_{}", id(&s.gateway_id), id(device))],
            "name": device,
            "via_device": id(&s.gateway_id),
        },
    });
    if value.is_number() {
        // Numbers become a history graph in Home Assistant.
        config["state_class"] = "measurement".into();
    }
    Note {
        topic: format!(
            "{}/sensor/{}/{}/config",
            s.discovery_prefix,
            id(device),
            id(key)
        ),
        payload: config.to_string().into_bytes(),
        retain: true,
        correlation: None,
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
