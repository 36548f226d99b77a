//! Rate limits for log lines that a remote party can cause at will (refused handshakes,
//! connections over a budget). A flood must not become a flood of log lines (disk,
//! log shippers), but nothing is lost: the metrics count every event, and a summary
//! line says how many lines were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets through at most `burst` lines per `window`, and counts the rest.
#[derive(Debug)]
pub(crate) struct LogGate {
    window: Duration,
    burst: u32,
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    /// Start of the current window (`None` before the first line).
    start: Option<Instant>,
    /// Lines let through in the current window.
    passed: u32,
    /// Lines left out since the last summary.
    suppressed: u64,
}

impl LogGate {
    /// A gate for `burst` lines per `window`.
    pub(crate) const fn new(burst: u32, window: Duration) -> Self {
        Self {
            window,
            burst,
            state: Mutex::new(GateState {
                start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // Plain counters: consistent whatever a panicking holder left.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether to write this line (`false`: it is counted as left out).
    pub(crate) fn admit(&self, now: Instant) -> bool {
        let mut s = self.lock();
        if s.start.is_none_or(|t| now.duration_since(t) >= self.window) {
            s.start = Some(now);
            s.passed = 0;
        }
        if s.passed < self.burst {
            s.passed += 1;
            true
        } else {
            s.suppressed += 1;
            false
        }
    }

    /// Lines left out since the last call, once their window is over (so a summary
    /// follows the burst it summarises, and at most one per window).
    pub(crate) fn take_suppressed(&self, now: Instant) -> Option<u64> {
        let mut s = self.lock();
        let over = s.start.is_none_or(|t| now.duration_since(t) >= self.window);
        if over && s.suppressed > 0 {
            Some(std::mem::take(&mut s.suppressed))
        } else {
            None
        }
    }
}

/// The gates of the gateway's noisy log lines, with their summaries.
#[derive(Debug)]
pub(crate) struct LogGates {
    /// "handshake refused".
    pub(crate) refused: LogGate,
    /// Connections closed because a pre-authentication budget is full.
    pub(crate) preauth: LogGate,
    /// Devices told `Goodbye{Overload}`.
    pub(crate) overload: LogGate,
    /// API connections over `api_max_connections`.
    pub(crate) api: LogGate,
}

/// Lines per window and the window of every gate.
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);

impl Default for LogGates {
    fn default() -> Self {
        Self {
            refused: LogGate::new(BURST, WINDOW),
            preauth: LogGate::new(BURST, WINDOW),
            overload: LogGate::new(BURST, WINDOW),
            api: LogGate::new(BURST, WINDOW),
        }
    }
}

impl LogGates {
    /// Writes a summary line for every gate that left lines out (called every second).
    pub(crate) fn summarize(&self, now: Instant) {
        let gates = [
            (
                &self.refused,
                "handshake refused",
                "gateway_handshakes_refused_total",
            ),
            (
                &self.preauth,
                "connection closed before its handshake",
                "gateway_preauth_refusals_total",
            ),
            (
                &self.overload,
                "connection refused: at max_connections",
                "gateway_overload_refusals_total",
            ),
            (
                &self.api,
                "API connection refused: at api_max_connections",
                "gateway_api_connections_refused_total",
            ),
        ];
        for (gate, what, metric) in gates {
            if let Some(n) = gate.take_suppressed(now) {
                tracing::warn!(
                    "{what}: {n} more not logged (at most {BURST} lines per {}s; {metric} \
                     counts every one)",
                    WINDOW.as_secs()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_counted_until_the_window_ends() {
        let gate = LogGate::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let passed = (0..100).filter(|_| gate.admit(t0)).count();
        assert_eq!(passed, 3);
        // Not summarised while the window lasts: the burst may go on.
        assert_eq!(gate.take_suppressed(t0 + Duration::from_secs(5)), None);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(gate.take_suppressed(later), Some(97));
        assert_eq!(gate.take_suppressed(later), None, "told once");
        assert!(gate.admit(later), "a new window lets lines through again");
    }
}
