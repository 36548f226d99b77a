//! The fleet sink: relays committed telemetry into a replicated NATS JetStream stream
//! that every gateway of the fleet shares, store-and-forward, exactly once per record
//! (docs/FLEET.md).
//!
//! ```text
//!  store writer ─ commit ─► telemetry (rowid = commit order)
//!                                 │ rows after the "fleet" cursor, 1,024 in flight
//!                                 ▼
//!  fleet sink ── PUB {prefix}.telemetry.{device}, Nats-Msg-Id = device:boot:seq ──► JetStream
//!             ◄── PubAck (duplicate: true if the id was seen) ─────────────────┘  (R3)
//!  sinks.cursor ◄─ every 250 ms: the last row acked, with every row before it
//! ```
//!
//! The same mechanism as the MQTT bridge, with its own cursor: devices are acked on the
//! local commit (edge-durable first); the cursor moves only past records the stream
//! acknowledged. A record published twice — by this gateway after a crash or a lost
//! ack, or by two gateways after a device moved between them — carries the same
//! message id, and the stream keeps one copy if the second comes within its
//! `duplicate_window`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::bridge::{json_payload, open_cursor, stopped};

pub mod commands;
pub mod registry;
use crate::config::FleetSettings;
use crate::store::{Store, body_to_json};

/// The sink's name in the store.
pub const SINK: &str = "fleet";
/// Publishes awaiting their ack, at most (acks pipeline: one at a time is ~2,400/s on
/// an R3 stream, 1,000 outstanding ~58,000/s).
const WINDOW: usize = 1024;
/// How often the cursor is committed while it moves.
const CURSOR_EVERY: Duration = Duration::from_millis(250);
/// Time allowed for a connection, and for each ack.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between connection attempts: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));

/// The pause between a fleet task's connection attempts: from 0.5 s, doubling up to
/// 5 s, and from the start again after a connection that had worked.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(BACKOFF.0)
    }

    /// A connection failed (`worked`: it had been up): the pause to take now.
    pub(crate) fn failed(&mut self, worked: bool) -> Duration {
        if worked {
            self.0 = BACKOFF.0;
        }
        let now = self.0;
        self.0 = (self.0 * 2).min(BACKOFF.1);
        now
    }

    /// Waits `pause`; `false` if told to stop meanwhile.
    pub(crate) async fn wait(pause: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            () = stopped(stop) => false,
        }
    }
}

/// What the sink is doing, for `/metrics`.
#[derive(Debug, Default)]
pub struct FleetStatus {
    /// Connected to NATS, the stream in place.
    pub connected: AtomicBool,
    /// Records the stream acknowledged (new or duplicate).
    pub published: AtomicU64,
    /// Of those, records the stream already had (it kept one copy).
    pub duplicates: AtomicU64,
    /// Connections lost or refused, and publishes that failed.
    pub failures: AtomicU64,
    /// The last record delivered (its row).
    pub cursor: AtomicI64,
    /// Why the last attempt failed.
    pub last_error: Mutex<Option<String>>,
}

impl FleetStatus {
    fn failed(&self, why: String) {
        self.connected.store(false, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// A JetStream context on the fleet's NATS servers (credentials and TLS as set).
pub(crate) async fn connect(s: &FleetSettings) -> Result<jetstream::Context, String> {
    let mut options = match &s.creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| format!("fleet.creds {}: {e}", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    options = options
        .name(format!("iot-gateway {}", s.gateway_id))
        .connection_timeout(TIMEOUT);
    if let Some(ca) = &s.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let client = options
        .connect(s.urls.as_slice())
        .await
        .map_err(|e| format!("connecting to {}: {e}", s.urls.join(",")))?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(TIMEOUT)
        .max_ack_inflight(WINDOW)
        .build(client))
}

/// The fleet telemetry sink.
pub struct FleetSink {
    settings: FleetSettings,
    store: Store,
    status: Arc<FleetStatus>,
}

type InFlight =
    FuturesOrdered<std::pin::Pin<Box<dyn Future<Output = (i64, Result<bool, String>)> + Send>>>;

impl FleetSink {
    /// Nothing connects yet.
    pub fn new(settings: FleetSettings, store: Store, status: Arc<FleetStatus>) -> Self {
        Self {
            settings,
            store,
            status,
        }
    }

    /// Relays until `stop` turns true, reconnecting with a growing pause after a
    /// failure (each logged with its reason).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Some(mut cursor) = open_cursor(&self.store, SINK, &mut stop).await else {
            return;
        };
        self.status.cursor.store(cursor, Ordering::Relaxed);
        let mut backoff = Backoff::new();
        loop {
            let mut saved = cursor;
            let end = self.session(&mut cursor, &mut saved, &mut stop).await;
            self.save(cursor, &mut saved).await;
            let Err(why) = end else { return };
            let pause = backoff.failed(self.status.connected.load(Ordering::Relaxed));
            self.status.failed(why.clone());
            warn!(
                error = %why,
                retry_in = ?pause,
                "fleet: cannot relay to NATS JetStream; telemetry is kept in the store and \
                 relayed when it is back"
            );
            if !Backoff::wait(pause, &mut stop).await {
                return;
            }
        }
    }

    async fn connect(&self) -> Result<jetstream::Context, String> {
        let s = &self.settings;
        let js = connect(s).await?;
        js.get_or_create_stream(stream::Config {
            name: s.stream.clone(),
            subjects: vec![format!("{}.telemetry.>", s.subject_prefix)],
            num_replicas: s.replicas,
            duplicate_window: s.duplicate_window,
            max_age: s.max_age,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", s.stream))?;
        Ok(js)
    }

    /// One connection: publishes from the cursor until `stop` (then `Ok`) or a failure.
    async fn session(
        &self,
        cursor: &mut i64,
        saved: &mut i64,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let js = tokio::select! {
            js = self.connect() => js?,
            () = stopped(stop) => return Ok(()),
        };
        self.status.connected.store(true, Ordering::Relaxed);
        info!(stream = %self.settings.stream, cursor = *cursor, "fleet: relaying to NATS JetStream");
        let mut in_flight: InFlight = FuturesOrdered::new();
        let mut next = *cursor;
        let mut more = true;
        let mut commits = self.store.watch_commits();
        let mut tick = tokio::time::interval(CURSOR_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if more && in_flight.len() <= WINDOW / 2 {
                let room = WINDOW - in_flight.len();
                let rows = self
                    .store
                    .telemetry_after(next, room)
                    .await
                    .map_err(|e| format!("reading the store: {e}"))?;
                more = rows.len() == room;
                for rec in rows {
                    let id = format!("{}:{}:{}", rec.device, rec.boot_id, rec.seq);
                    let payload = json_payload(&rec, body_to_json(&rec.body));
                    let message = PublishMessage::build()
                        .payload(payload.into())
                        .message_id(id)
                        .header("Iot-Device", rec.device.as_str())
                        .header("Iot-Boot", rec.boot_id.to_string().as_str())
                        .header("Iot-Seq", rec.seq.to_string().as_str())
                        .header("Iot-Gateway", self.settings.gateway_id.as_str());
                    let subject =
                        format!("{}.telemetry.{}", self.settings.subject_prefix, rec.device);
                    let ack: PublishAckFuture = js
                        .send_publish(subject, message)
                        .await
                        .map_err(|e| format!("publishing: {e}"))?;
                    let row = rec.row;
                    in_flight.push_back(Box::pin(async move {
                        (
                            row,
                            ack.await.map(|a| a.duplicate).map_err(|e| e.to_string()),
                        )
                    }));
                    next = row;
                }
            }
            tokio::select! {
                Some((row, acked)) = in_flight.next(), if !in_flight.is_empty() => {
                    let duplicate = acked.map_err(|e| format!("waiting for the stream's ack: {e}"))?;
                    *cursor = row;
                    self.status.cursor.store(row, Ordering::Relaxed);
                    self.status.published.fetch_add(1, Ordering::Relaxed);
                    if duplicate {
                        self.status.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                changed = commits.changed(), if !more => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    more = true;
                }
                _ = tick.tick() => {
                    self.save(*cursor, saved).await;
                    more = true;
                }
                () = stopped(stop) => {
                    // The acks still coming, for up to 2 s; the rest is sent again
                    // (same ids) after the restart.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                    while let Ok(Some((row, Ok(_)))) =
                        tokio::time::timeout_at(deadline, in_flight.next()).await
                    {
                        *cursor = row;
                    }
                    return Ok(());
                }
            }
        }
    }

    async fn save(&self, cursor: i64, saved: &mut i64) {
        if cursor == *saved {
            return;
        }
        match self.store.set_sink_cursor(SINK, cursor).await {
            Ok(()) => *saved = cursor,
            Err(e) => warn!(error = %e, "fleet: could not save its cursor"),
        }
    }
}
