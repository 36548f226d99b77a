//! Live events (telemetry, presence, commands, refused handshakes) and counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::store::CommandRecord;
use crate::tls::Refusal;

/// Something that happened, as subscribers see it. Serialized with a `type` tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A telemetry record was stored (sent once, even if the device replays it).
    Telemetry {
        /// Device id.
        device: Arc<str>,
        /// Boot id (a string in JSON).
        #[serde(serialize_with = "crate::values::u64_as_string")]
        boot_id: u64,
        /// Sequence number.
        seq: u32,
        /// Device time or arrival time, ms since the epoch.
        time_ms: i64,
        /// Readings.
        values: Map<String, Json>,
    },
    /// A device came online or went offline.
    Presence {
        /// Device id.
        device: Arc<str>,
        /// Online now?
        online: bool,
        /// Peer address.
        peer: String,
        /// Why it went offline (a `Goodbye` reason or `closed`, `error` ...).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A command changed state.
    Command(CommandRecord),
    /// An operator changed a device's desired state (protocol version 2).
    Desired {
        /// Device id.
        device: Arc<str>,
        /// The desired document's version now.
        version: u32,
        /// The desired settings now.
        desired: Map<String, Json>,
    },
    /// A device reported its state (protocol version 2).
    Reported {
        /// Device id.
        device: Arc<str>,
        /// The desired version it holds.
        desired_version: u32,
        /// The values it reported (merged into what it reported before).
        values: Map<String, Json>,
    },
    /// A device's progress in a firmware rollout changed (protocol version 3).
    Firmware {
        /// Device id.
        device: Arc<str>,
        /// The rollout.
        rollout: i64,
        /// The device's state in it: `offered`, `downloading`, `verified`,
        /// `installed`, `failed`, `cancelled`.
        state: &'static str,
        /// Why it failed, if it did.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A firmware rollout changed state: `running`, `paused`, `cancelled`, `stopped`
    /// (its failure threshold was reached), `completed`.
    Rollout {
        /// The rollout.
        rollout: i64,
        /// Its state.
        state: &'static str,
        /// Why, if it stopped.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A TLS connection was refused.
    HandshakeRefused {
        /// Peer address.
        peer: String,
        /// Why.
        reason: String,
        /// When, ms since the epoch.
        time_ms: i64,
        /// Subject of the certificate presented, if one was.
        subject: Option<String>,
        /// Its serial (hex).
        serial: Option<String>,
    },
}

impl Event {
    /// The device the event is about, if any.
    pub fn device(&self) -> Option<&str> {
        match self {
            Event::Telemetry { device, .. }
            | Event::Presence { device, .. }
            | Event::Desired { device, .. }
            | Event::Reported { device, .. }
            | Event::Firmware { device, .. } => Some(device),
            Event::Command(c) => Some(&c.device),
            Event::HandshakeRefused { .. } | Event::Rollout { .. } => None,
        }
    }
}

/// A refused handshake, kept for the API and the dashboard (and across restarts).
pub use crate::store::RefusalRecord as Refused;

/// A histogram with fixed buckets (upper bounds in seconds), Prometheus-style.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with these bucket upper bounds, in seconds, ascending.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b)
            && let Some(c) = self.counts.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative bucket counts, sum in seconds, count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut acc = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| {
                acc += c.load(Ordering::Relaxed);
                (*b, acc)
            })
            .collect();
        (
            buckets,
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed),
        )
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// Counters of the gateway; all lock-free.
#[derive(Debug)]
pub struct Metrics {
    /// Device connections open now (TLS done).
    pub connections: AtomicI64,
    /// Sessions past `Hello`.
    pub sessions: AtomicI64,
    /// Handshakes completed.
    pub handshakes_ok: AtomicU64,
    /// Handshakes refused, by [`Refusal::ALL`] index.
    pub handshakes_refused: Vec<AtomicU64>,
    /// Telemetry records received.
    pub telemetry_received: AtomicU64,
    /// Telemetry records newly stored.
    pub telemetry_stored: AtomicU64,
    /// Telemetry records that were duplicates.
    pub telemetry_duplicates: AtomicU64,
    /// Sessions closed for a protocol violation.
    pub protocol_violations: AtomicU64,
    /// Connections refused for overload.
    pub overload_refusals: AtomicU64,
    /// Connections in their TLS handshake now (not yet authenticated).
    pub handshakes_in_progress: AtomicI64,
    /// Connections closed in their handshake to make room for a new one, because
    /// `max_handshakes` were in progress and they had waited longest.
    pub preauth_evicted: AtomicU64,
    /// Connections closed before their handshake because their source address was at
    /// `max_handshakes_per_source`.
    pub preauth_refused_per_source: AtomicU64,
    /// Operator API connections open now.
    pub api_connections: AtomicI64,
    /// Operator API connections closed at once because `api_max_connections` was
    /// reached.
    pub api_connections_refused: AtomicU64,
    /// `CommandResult`s for commands not in flight on their session (ignored).
    pub command_results_ignored: AtomicU64,
    /// Firmware image bytes sent in chunks (protocol version 3).
    pub firmware_bytes_sent: AtomicU64,
    /// Time from a record's arrival to its ack being queued.
    pub ack_latency: Histogram,
    /// Time from a batch's submission to its commit.
    pub commit_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections: AtomicI64::new(0),
            sessions: AtomicI64::new(0),
            handshakes_ok: AtomicU64::new(0),
            handshakes_refused: Refusal::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            telemetry_received: AtomicU64::new(0),
            telemetry_stored: AtomicU64::new(0),
            telemetry_duplicates: AtomicU64::new(0),
            protocol_violations: AtomicU64::new(0),
            overload_refusals: AtomicU64::new(0),
            handshakes_in_progress: AtomicI64::new(0),
            preauth_evicted: AtomicU64::new(0),
            preauth_refused_per_source: AtomicU64::new(0),
            api_connections: AtomicI64::new(0),
            api_connections_refused: AtomicU64::new(0),
            command_results_ignored: AtomicU64::new(0),
            firmware_bytes_sent: AtomicU64::new(0),
            ack_latency: Histogram::new(LATENCY_BUCKETS),
            commit_latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts a refused handshake.
    pub fn refused(&self, r: Refusal) {
        if let Some(i) = Refusal::ALL.iter().position(|x| *x == r)
            && let Some(c) = self.handshakes_refused.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refused handshakes of one reason.
    pub fn refused_count(&self, r: Refusal) -> u64 {
        Refusal::ALL
            .iter()
            .position(|x| *x == r)
            .and_then(|i| self.handshakes_refused.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}
