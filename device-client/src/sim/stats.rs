//! Live counters: one shard per worker thread (written by that thread only, read by
//! anyone), summed into a [`Stats`] snapshot; and a log-linear latency histogram.

extern crate std;

use std::collections::BTreeMap;
use std::string::String;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use std::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::machine::Disconnect;
use crate::proto::GoodbyeReason;

/// Sub-buckets per power of two: latencies are kept to within about 6 %.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Buckets for every `u64` microsecond value.
const BUCKETS: usize = SUB + (64 - SUB_BITS as usize) * SUB;

/// The bucket of a value (microseconds).
fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
    SUB + (e - SUB_BITS) as usize * SUB + sub
}

/// The smallest value and the width of a bucket.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, 1);
    }
    let e = (i - SUB) / SUB + SUB_BITS as usize;
    let sub = ((i - SUB) % SUB) as u64;
    let width = 1u64 << (e - SUB_BITS as usize);
    ((SUB as u64 + sub) << (e - SUB_BITS as usize), width)
}

/// A histogram of durations that many threads may add to without locks.
pub(crate) struct AtomicHistogram {
    counts: Vec<AtomicU64>,
}

impl AtomicHistogram {
    pub(crate) fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(c) = self.counts.get(bucket(us)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn add_to(&self, out: &mut Histogram) {
        for (o, c) in out.counts.iter_mut().zip(&self.counts) {
            *o += c.load(Ordering::Relaxed);
        }
    }
}

/// A snapshot of a latency histogram (microsecond buckets, about 6 % wide).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::vec![0; BUCKETS],
        }
    }
}

impl Histogram {
    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value below which a fraction `q` (0 to 1) of the values lie, to within a
    /// bucket; `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the value asked for, 1-based: q = 0.5 of 10 values is the 5th.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_range(i);
                // The middle of the bucket: the error is at most half its width.
                return Some(Duration::from_micros(low + width / 2));
            }
        }
        None
    }

    /// The largest value, to within a bucket; `None` if empty.
    pub fn max(&self) -> Option<Duration> {
        let i = self.counts.iter().rposition(|c| *c > 0)?;
        let (low, width) = bucket_range(i);
        Some(Duration::from_micros(low + width.saturating_sub(1)))
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// The usual quantiles, in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        // Microseconds / 1000: prints as a short decimal (1.12, not 1.1199999999999999).
        let ms = |d: Option<Duration>| d.map(|d| d.as_micros() as f64 / 1000.0);
        LatencySummary {
            count: self.count(),
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            max_ms: ms(self.max()),
        }
    }
}

/// Quantiles of a latency, in milliseconds (`None`: nothing measured).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct LatencySummary {
    /// Values measured.
    pub count: u64,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Largest.
    pub max_ms: Option<f64>,
}

/// Why sessions ended, for [`Counts::disconnects_by_reason`].
const REASONS: [&str; 17] = [
    "closed",
    "welcome_timeout",
    "dead_peer",
    "bad_frame",
    "bad_message",
    "unexpected",
    "unsupported_version",
    "goodbye_shutdown",
    "goodbye_overload",
    "goodbye_replaced",
    "goodbye_idle_timeout",
    "goodbye_protocol_violation",
    "goodbye_revoked",
    "goodbye_server_error",
    "goodbye_other",
    "max_frame_too_small",
    "buffers_too_small",
];

fn reason_index(d: &Disconnect) -> usize {
    match d {
        Disconnect::Closed => 0,
        Disconnect::WelcomeTimeout => 1,
        Disconnect::DeadPeer => 2,
        Disconnect::BadFrame(_) => 3,
        Disconnect::BadMessage(_) => 4,
        Disconnect::Unexpected => 5,
        Disconnect::UnsupportedVersion(_) => 6,
        Disconnect::MaxFrameTooSmall(_) => 15,
        Disconnect::BuffersTooSmall { .. } => 16,
        Disconnect::Goodbye { reason, .. } => match reason {
            GoodbyeReason::Shutdown => 7,
            GoodbyeReason::Overload => 8,
            GoodbyeReason::Replaced => 9,
            GoodbyeReason::IdleTimeout => 10,
            GoodbyeReason::ProtocolViolation => 11,
            GoodbyeReason::Revoked => 12,
            GoodbyeReason::ServerError => 13,
            GoodbyeReason::UnsupportedVersion => 14,
        },
    }
}

/// Why a connection attempt failed, for [`Counts::connect_failures_by_reason`].
/// `revoked`: the gateway refused the certificate in the handshake as revoked.
const FAILURES: [&str; 7] = [
    "refused",
    "timed_out",
    "reset",
    "tls",
    "too_many_open_files",
    "other",
    "revoked",
];

pub(crate) fn failure_index(e: &std::io::Error) -> usize {
    use std::io::ErrorKind::*;
    if super::conn::refusal_alert(e) == Some(rustls::AlertDescription::CertificateRevoked) {
        return 6;
    }
    match e.kind() {
        ConnectionRefused => 0,
        TimedOut => 1,
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => 2,
        InvalidData => 3,
        // EMFILE / ENFILE: the open-file cap, the usual limit of a large simulation.
        _ if matches!(e.raw_os_error(), Some(23 | 24)) => 4,
        _ => 5,
    }
}

/// The counters of one worker thread.
pub(crate) struct Shard {
    pub(crate) sent: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) lost_on_reboot: AtomicU64,
    pub(crate) ring_full: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) open: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) reasons: [AtomicU64; REASONS.len()],
    pub(crate) failures: [AtomicU64; FAILURES.len()],
    pub(crate) commands: AtomicU64,
    pub(crate) reboots: AtomicU64,
    pub(crate) fatal: AtomicU64,
    pub(crate) firmware_installed: AtomicU64,
    pub(crate) firmware_failed: AtomicU64,
    pub(crate) firmware_declined: AtomicU64,
    pub(crate) latency: AtomicHistogram,
    /// This thread saw the drain start (see `device::watch_drain`).
    pub(crate) drain_seen: AtomicBool,
}

impl Shard {
    pub(crate) fn new() -> Self {
        Self {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            lost_on_reboot: AtomicU64::new(0),
            ring_full: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            open: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            reasons: Default::default(),
            failures: Default::default(),
            commands: AtomicU64::new(0),
            reboots: AtomicU64::new(0),
            fatal: AtomicU64::new(0),
            firmware_installed: AtomicU64::new(0),
            firmware_failed: AtomicU64::new(0),
            firmware_declined: AtomicU64::new(0),
            latency: AtomicHistogram::new(),
            drain_seen: AtomicBool::new(false),
        }
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn disconnected(&self, reason: &Disconnect) {
        if let Some(c) = self.reasons.get(reason_index(reason)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn connect_failed(&self, e: &std::io::Error) {
        if let Some(c) = self.failures.get(failure_index(e)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records that are neither acked nor lost yet. Acks and losses are read before
    /// sends, so a record sent and acked while this runs cannot make it look drained
    /// early: every record counted as acked was counted as sent first.
    pub(crate) fn unacked(&self) -> u64 {
        let done = self.acked.load(Ordering::Acquire) + self.lost_on_reboot.load(Ordering::Acquire);
        self.sent.load(Ordering::Acquire).saturating_sub(done)
    }
}

/// What every thread shares.
pub(crate) struct Global {
    pub(crate) started: Instant,
    pub(crate) devices: usize,
    pub(crate) shards: Vec<Arc<Shard>>,
    /// Devices that opened at least one session.
    pub(crate) ever_connected: AtomicUsize,
    /// Milliseconds from the start until every device had opened a session once.
    pub(crate) all_connected_ms: AtomicU64,
    /// 0 running, 1 draining, 2 stopped.
    pub(crate) phase: std::sync::atomic::AtomicU8,
}

impl Global {
    pub(crate) fn new(devices: usize, threads: usize) -> Self {
        Self {
            started: Instant::now(),
            devices,
            shards: (0..threads).map(|_| Arc::new(Shard::new())).collect(),
            ever_connected: AtomicUsize::new(0),
            all_connected_ms: AtomicU64::new(u64::MAX),
            phase: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// A device opened its first session.
    pub(crate) fn first_connect(&self) {
        let before = self.ever_connected.fetch_add(1, Ordering::AcqRel);
        if before + 1 == self.devices {
            let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.all_connected_ms.store(ms, Ordering::Release);
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Stopped,
        }
    }

    /// Whether every worker thread has seen the drain start.
    pub(crate) fn drain_seen(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.drain_seen.load(Ordering::Acquire))
    }

    pub(crate) fn unacked(&self) -> u64 {
        self.shards.iter().map(|s| s.unacked()).sum()
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let mut s = Stats {
            elapsed: self.started.elapsed(),
            phase: self.phase(),
            devices: self.devices,
            ever_connected: self.ever_connected.load(Ordering::Acquire),
            all_connected_after: match self.all_connected_ms.load(Ordering::Acquire) {
                u64::MAX => None,
                ms => Some(Duration::from_millis(ms)),
            },
            ..Stats::default()
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut reasons = [0u64; REASONS.len()];
        let mut failures = [0u64; FAILURES.len()];
        let counts = &mut s.counts;
        for sh in &self.shards {
            counts.unacked += sh.unacked();
            counts.sent += load(&sh.sent);
            counts.acked += load(&sh.acked);
            counts.lost_on_reboot += load(&sh.lost_on_reboot);
            counts.ring_full += load(&sh.ring_full);
            counts.connects += load(&sh.connects);
            s.connected += load(&sh.open).saturating_sub(load(&sh.closed));
            counts.commands += load(&sh.commands);
            counts.reboots += load(&sh.reboots);
            counts.fatal += load(&sh.fatal);
            counts.firmware_installed += load(&sh.firmware_installed);
            counts.firmware_failed += load(&sh.firmware_failed);
            counts.firmware_declined += load(&sh.firmware_declined);
            for (r, c) in reasons.iter_mut().zip(&sh.reasons) {
                *r += load(c);
            }
            for (f, c) in failures.iter_mut().zip(&sh.failures) {
                *f += load(c);
            }
            sh.latency.add_to(&mut s.ack_latency);
        }
        counts.reconnects = counts.connects.saturating_sub(s.ever_connected as u64);
        counts.disconnects = reasons.iter().sum();
        counts.connect_failures = failures.iter().sum();
        counts.disconnects_by_reason = named(&REASONS, &reasons);
        counts.connect_failures_by_reason = named(&FAILURES, &failures);
        s
    }
}

fn named(names: &[&str], counts: &[u64]) -> BTreeMap<String, u64> {
    names
        .iter()
        .zip(counts)
        .filter(|(_, c)| **c > 0)
        .map(|(n, c)| (String::from(*n), *c))
        .collect()
}

/// Where a simulation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Devices connect and produce telemetry.
    #[default]
    Running,
    /// Devices no longer produce; waiting for the last acks.
    Draining,
    /// Devices are stopping or stopped.
    Stopped,
}

/// The counters of a simulation (all since the start): live in [`Stats`], final in
/// [`Summary`](super::Summary).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Telemetry records queued (each got a seq).
    pub sent: u64,
    /// Records the gateway acknowledged as durable.
    pub acked: u64,
    /// Records queued and neither acked nor lost.
    pub unacked: u64,
    /// Samples dropped because a device's ring of unacked records was full.
    pub ring_full: u64,
    /// Sessions opened.
    pub connects: u64,
    /// Sessions opened beyond each device's first (after a disconnect or a reboot).
    pub reconnects: u64,
    /// Connections that ended after TCP and TLS were up (any reason, including before
    /// `Welcome`). A failed connect is not one: it is in `connect_failures` only.
    pub disconnects: u64,
    /// `disconnects` by reason (`closed`, `goodbye_shutdown`, ...), zero counts left out.
    pub disconnects_by_reason: BTreeMap<String, u64>,
    /// TCP connects or TLS handshakes that failed, each counted once. A certificate the
    /// gateway refuses is one too, also when TLS 1.3 reports it only on the first read.
    pub connect_failures: u64,
    /// `connect_failures` by reason (`refused`, `timed_out`, `tls`, `revoked`, ...).
    pub connect_failures_by_reason: BTreeMap<String, u64>,
    /// Commands run (repeats the device recognised are not counted).
    pub commands: u64,
    /// Reboots (by the `reboot` command).
    pub reboots: u64,
    /// Records given up by a reboot that waited 5 s for their ack in vain.
    pub lost_on_reboot: u64,
    /// Devices the gateway refused for good (revoked, unsupported version).
    pub fatal: u64,
    /// Firmware images installed (`Verified`, then a restart into the new version).
    pub firmware_installed: u64,
    /// Firmware transfers that failed on the device (size or hash mismatch, bad
    /// signature, storage error), each counted once.
    pub firmware_failed: u64,
    /// Firmware offers declined (the running version, or too large).
    pub firmware_declined: u64,
}

/// A snapshot of a running simulation's counters (all since the start).
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Time since the start.
    pub elapsed: Duration,
    /// Running, draining or stopped.
    pub phase: Phase,
    /// Simulated devices.
    pub devices: usize,
    /// Sessions open now (after `Welcome`).
    pub connected: u64,
    /// Devices that opened a session at least once.
    pub ever_connected: usize,
    /// Time from the start until every device had opened a session once.
    pub all_connected_after: Option<Duration>,
    /// What happened, counted.
    pub counts: Counts,
    /// Ack latency: from queueing a record on an open session to its ack. Records
    /// queued while disconnected are not measured, so reconnect gaps do not hide the
    /// gateway's own latency.
    pub ack_latency: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for v in (0..5000u64).chain([u64::MAX / 2, u64::MAX]) {
            let b = bucket(v);
            assert!(b < BUCKETS, "{v}");
            assert!(b >= last, "{v}");
            last = b;
            let (low, width) = bucket_range(b);
            assert!(low <= v && v - low < width, "{v} in [{low}, +{width})");
        }
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = AtomicHistogram::new();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let mut snap = Histogram::default();
        h.add_to(&mut snap);
        assert_eq!(snap.count(), 100);
        let p50 = snap.quantile(0.5).unwrap().as_secs_f64() * 1000.0;
        let p99 = snap.quantile(0.99).unwrap().as_secs_f64() * 1000.0;
        assert!((47.0..=53.0).contains(&p50), "{p50}");
        assert!((94.0..=104.0).contains(&p99), "{p99}");
        assert!(snap.max().unwrap() >= Duration::from_millis(100));
        assert_eq!(snap.since(&snap).count(), 0);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
