//! What can go wrong in the store, and whether it is keeping what it is given.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::now_ms;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("creating {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The writer thread has stopped (shutdown, or a fatal error).
    #[error("the store is closed")]
    Closed,
    /// A device has too many commands queued.
    #[error("device {device} already has {queued} commands queued (limit {limit})")]
    QueueFull {
        /// The device.
        device: String,
        /// Commands queued.
        queued: usize,
        /// The limit.
        limit: usize,
    },
    /// No such command.
    #[error("no command with id {0}")]
    NoSuchCommand(i64),
    /// The transaction holding this operation failed to commit; nothing of it was kept.
    #[error("commit failed: {0}")]
    CommitFailed(#[source] Arc<StoreError>),
    /// SQLite rolled the whole transaction back after an error inside it.
    #[error("SQLite rolled back the transaction after an error")]
    RolledBack,
    /// The file has device `device` under another key than the one the gateway gave it
    /// (something else wrote to `devices` while the gateway ran).
    #[error("device {device} has key {stored} in the store, {expected} in memory")]
    KeyMismatch {
        /// The device.
        device: String,
        /// The key in the file.
        stored: i64,
        /// The key in memory.
        expected: i64,
    },
}

/// Whether the store keeps what it is given, as its writer last found out: failing
/// from a commit (or an operation) that SQLite refused until a commit of the same kind
/// succeeds — after telemetry failed, one that stores telemetry (a disk with room for
/// a one-page update may still have none for a batch); otherwise any that writes.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// The failure, and whether telemetry failed.
    failing: Mutex<Option<(Failing, bool)>>,
    failures: std::sync::atomic::AtomicU64,
}

/// Why the store is failing, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failing {
    /// The last error.
    pub reason: String,
    /// When the failures began, ms since the epoch.
    pub since_ms: i64,
}

impl StoreHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Failing, bool)>> {
        // One Option, replaced whole: consistent after a panic elsewhere.
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A commit or an operation failed; `telemetry`: telemetry was among what failed.
    pub(super) fn set_failing(&self, reason: String, telemetry: bool) {
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut f = self.lock();
        let (since_ms, was_telemetry) = f
            .as_ref()
            .map_or_else(|| (now_ms(), false), |(f, t)| (f.since_ms, *t));
        *f = Some((Failing { reason, since_ms }, telemetry || was_telemetry));
    }

    /// A commit succeeded: `stored_telemetry` if it held telemetry, `wrote` if it
    /// changed anything.
    pub(super) fn committed(&self, stored_telemetry: bool, wrote: bool) {
        let mut f = self.lock();
        let recovered = match &*f {
            Some((_, true)) => stored_telemetry,
            Some((_, false)) => wrote,
            None => false,
        };
        if recovered {
            *f = None;
        }
    }

    /// Why the store is failing, if it is.
    pub(super) fn failing(&self) -> Option<Failing> {
        self.lock().as_ref().map(|(f, _)| f.clone())
    }

    /// Commits or operations that failed since the start.
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }
}
