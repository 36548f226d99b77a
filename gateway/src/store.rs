//! The durable store: one SQLite file (WAL), one writer thread with group commit, and
//! read-only connections for queries.
//!
//! ```text
//!  session ─┐  Batch (records + bodies, recycled)      ┌─► BatchDone to each session
//!  session ─┼──► bounded channel ──► writer thread ────┤   (then it sends Ack)
//!  API    ──┘  other ops (presence, commands)   BEGIN; all queued ops; COMMIT
//!                                                └─ one fsync for everything queued
//!  queries ──► read-only connections (WAL: never block the writer)
//! ```
//!
//! Group commit: the writer takes the first op, then everything that queued up behind
//! it (up to `max_commit_records`), and commits once. While a commit's fsync runs,
//! new ops queue, so the batch size grows with load and commit latency stays bounded by
//! one fsync plus the work queued.
//!
//! Telemetry is deduplicated by a high-water mark per device boot (`boots`: the highest
//! seq stored): a record at or below it is a duplicate and not inserted, so a record is
//! stored exactly once however often it is replayed (PROTOCOL.md §8.2). One small row
//! per boot costs less than a unique index over every record (which stores before
//! 2026-11-26 had; it is converted once at open).
//! The telemetry body is stored as the postcard bytes the device sent and turned into
//! JSON only when read.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};

use crate::values::{self, OwnedReadings};

mod fleet;
use device_client::proto::{self, CommandStatus, Seq, Uplink};
pub use fleet::{Handoff, Route, slot_of};

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
    CommitFailed(String),
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
    fn set_failing(&self, reason: String, telemetry: bool) {
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
    fn committed(&self, stored_telemetry: bool, wrote: bool) {
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
    fn failing(&self) -> Option<Failing> {
        self.lock().as_ref().map(|(f, _)| f.clone())
    }

    /// Commits or operations that failed since the start.
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Most read-only connections open at once (each holds three files in WAL mode); more
/// readers wait for one.
pub(crate) const MAX_READERS: usize = 8;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// SQLite file.
    pub path: PathBuf,
    /// `synchronous=NORMAL` instead of `FULL` (see `danger_ack_before_fsync`).
    pub danger_ack_before_fsync: bool,
    /// Most telemetry records in one commit.
    pub max_commit_records: usize,
    /// Most commands queued per device.
    pub max_queued_commands: usize,
    /// The sinks that run (`"mqtt"`): retention keeps what they have not delivered,
    /// unless told otherwise. A sink no longer configured holds nothing back.
    pub sinks: Vec<SinkSpec>,
}

/// A sink that runs, as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkSpec {
    /// Its name (`"mqtt"`).
    pub name: &'static str,
    /// Retention may delete records it has not delivered (they are counted: the
    /// operator chose a bounded store over a complete relay).
    pub drop_undelivered: bool,
}

/// What one pass of retention deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Records deleted.
    pub deleted: u64,
    /// Of those, records a sink had not delivered (`drop_undelivered`).
    pub undelivered: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// ----------------------------------------------------------------------------------------
// Telemetry batches: the hot path.

/// One record inside a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub struct BatchRecord {
    /// Sequence number.
    pub seq: Seq,
    /// Device time, or arrival time if the device gave none.
    pub time_ms: i64,
    /// Where the body sits in [`Batch::bodies`].
    pub start: u32,
    /// Body length.
    pub len: u32,
    /// Set by the writer: this record was new (not a duplicate).
    pub inserted: bool,
}

/// Telemetry of one session waiting for a commit. Sessions reuse batches (the writer
/// hands them back emptied of nothing; the session clears them), so the hot path does
/// not allocate per message.
#[derive(Debug)]
pub struct Batch {
    /// The device's key in the store.
    pub device_key: i64,
    /// Boot id of the session (stored bit-for-bit as a signed 64-bit integer).
    pub boot_id: u64,
    /// Arrival time of the batch's first record.
    pub received_ms: i64,
    /// When the batch went to the store (for the commit latency metric).
    pub submitted: Option<std::time::Instant>,
    /// Records, in arrival order.
    pub records: Vec<BatchRecord>,
    /// Concatenated message bodies.
    pub bodies: Vec<u8>,
}

impl Batch {
    /// An empty batch for a session. Boxed: batches move between the session and the
    /// writer, and a session's future keeps room for what it moves.
    pub fn new(device_key: i64, boot_id: u64) -> Box<Self> {
        Box::new(Self {
            device_key,
            boot_id,
            received_ms: 0,
            submitted: None,
            records: Vec::new(),
            bodies: Vec::new(),
        })
    }

    /// Appends a record; `body` is the frame body of the `Telemetry` message.
    pub fn push(&mut self, seq: Seq, time_ms: i64, body: &[u8]) {
        let start = self.bodies.len() as u32;
        self.bodies.extend_from_slice(body);
        self.records.push(BatchRecord {
            seq,
            time_ms,
            start,
            len: body.len() as u32,
            inserted: false,
        });
    }

    /// The body of a record.
    pub fn body(&self, r: &BatchRecord) -> &[u8] {
        let start = r.start as usize;
        self.bodies
            .get(start..start + r.len as usize)
            .unwrap_or_default()
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.records.clear();
        self.bodies.clear();
    }

    /// Whether there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Why [`Store::try_submit`] did not take a batch.
#[derive(Debug)]
pub enum TrySubmit {
    /// The queue to the writer is full; here is the batch back.
    Full(Box<Batch>),
    /// The store is closed.
    Closed,
}

/// The outcome of a batch.
#[derive(Debug)]
pub struct BatchDone {
    /// The batch, with `inserted` set on each record.
    pub batch: Box<Batch>,
    /// `Ok(new rows)` once committed; the error otherwise (nothing was acked).
    pub result: Result<usize, Arc<StoreError>>,
}

// ----------------------------------------------------------------------------------------
// Records returned to callers.

/// A device as the store knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRecord {
    /// Device id (certificate CN).
    pub id: String,
    /// Whether a session is open now.
    pub online: bool,
    /// First connection, ms since the epoch.
    pub first_seen_ms: Option<i64>,
    /// Last connection or disconnection, ms since the epoch.
    pub last_seen_ms: Option<i64>,
    /// Serial of the certificate it last connected with (hex).
    pub cert_serial: Option<String>,
    /// Expiry of that certificate, seconds since the epoch.
    pub cert_not_after: Option<i64>,
    /// Firmware version from its last `Hello`.
    pub firmware: Option<String>,
    /// Peer address of its last connection.
    pub peer_addr: Option<String>,
    /// Boot id of its last session (a string in JSON: JavaScript numbers lose precision
    /// above 2^53).
    #[serde(serialize_with = "crate::values::opt_u64_as_string")]
    pub boot_id: Option<u64>,
    /// Number of sessions so far.
    pub connects: i64,
    /// Its newest stored record (by device time; of equal times the last to arrive),
    /// if any.
    pub latest: Option<TelemetryRecord>,
    /// In a fleet: the gateway that holds it (its last session).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// One stored telemetry record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TelemetryRecord {
    /// Device id.
    pub device: String,
    /// Boot id (a string in JSON).
    #[serde(serialize_with = "crate::values::u64_as_string")]
    pub boot_id: u64,
    /// Sequence number.
    pub seq: Seq,
    /// Device time (or arrival time), ms since the epoch.
    pub time_ms: i64,
    /// Arrival time, ms since the epoch.
    pub received_ms: i64,
    /// The readings as a JSON object.
    pub values: serde_json::Map<String, Json>,
}

/// A command's state (PROTOCOL.md §8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandState {
    /// Waiting for the device.
    Queued,
    /// Sent to the device, no result yet.
    Sent,
    /// The device reported success.
    Succeeded,
    /// The device reported failure (or could not run it).
    Failed,
    /// Its time to live ran out first.
    Expired,
    /// An operator cancelled it before it was sent.
    Canceled,
}

impl CommandState {
    /// The name stored in the database and shown by the API.
    pub const fn as_str(&self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
            CommandState::Canceled => "canceled",
        }
    }

    /// Every state, for metrics.
    pub const ALL: [CommandState; 6] = [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Expired,
        CommandState::Canceled,
    ];

    fn parse(s: &str) -> Self {
        match s {
            "queued" => CommandState::Queued,
            "sent" => CommandState::Sent,
            "succeeded" => CommandState::Succeeded,
            "expired" => CommandState::Expired,
            "canceled" => CommandState::Canceled,
            _ => CommandState::Failed,
        }
    }

    /// Whether the command is over.
    pub const fn is_final(&self) -> bool {
        matches!(
            self,
            CommandState::Succeeded
                | CommandState::Failed
                | CommandState::Expired
                | CommandState::Canceled
        )
    }
}

/// A command and, once it ended, its result.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct CommandRecord {
    /// Command id: unique in this gateway, in a fleet unique in the fleet (the device
    /// gets its low 32 bits).
    pub id: i64,
    /// Target device.
    pub device: String,
    /// Command name.
    pub name: String,
    /// Arguments as JSON.
    pub args: Json,
    /// Lifecycle state.
    pub state: CommandState,
    /// When it was queued, ms since the epoch.
    pub created_ms: i64,
    /// When its time to live ends.
    pub expires_ms: i64,
    /// When it was last sent.
    pub sent_ms: Option<i64>,
    /// When it reached its final state.
    pub finished_ms: Option<i64>,
    /// Times it was sent.
    pub attempts: i64,
    /// The device's status (`succeeded`, `unknown_command` ...), once it answered.
    pub status: Option<String>,
    /// Result values as JSON, once it answered.
    pub result: Option<Json>,
    /// Why it failed without an answer (e.g. too large for the device).
    pub error: Option<String>,
}

/// A command ready to go to a device.
#[derive(Debug, Clone)]
pub struct OutgoingCommand {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Arguments, bounded and valid.
    pub args: OwnedReadings,
    /// When its time to live ends, ms since the epoch.
    pub expires_ms: i64,
    /// The command as the API shows it, now `sent` (for the event stream).
    pub record: Option<CommandRecord>,
}

/// What opening a session returns.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    /// The device's key in the store.
    pub device_key: i64,
    /// Highest stored seq for this boot id.
    pub last_acked: Option<Seq>,
}

/// Session facts recorded in the device registry.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Device id.
    pub device: String,
    /// Certificate serial (hex).
    pub cert_serial: String,
    /// Certificate expiry, seconds since the epoch.
    pub cert_not_after: i64,
    /// Firmware version.
    pub firmware: String,
    /// Peer address.
    pub peer_addr: String,
    /// Boot id.
    pub boot_id: u64,
}

/// Filter for a telemetry query.
#[derive(Debug, Clone, Default)]
pub struct TelemetryQuery {
    /// Only records at or after this time (ms).
    pub since_ms: Option<i64>,
    /// Only records before this time (ms).
    pub until_ms: Option<i64>,
    /// At most this many; default 100, capped at 10,000.
    pub limit: Option<u32>,
    /// Continue after this record (the last one of the previous page).
    pub after: Option<TelemetryCursor>,
    /// Oldest first instead of newest first.
    pub oldest_first: bool,
}

/// Where a page of telemetry ends: a record's device time and its row (arrival order
/// among equal times). Shown to API clients as the opaque string `TIME_ROW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryCursor {
    /// The record's `time_ms`.
    pub time_ms: i64,
    /// Its row id.
    pub row: i64,
}

impl TelemetryCursor {
    /// Parses the API's form, `TIME_ROW`.
    pub fn parse(s: &str) -> Option<Self> {
        let (t, r) = s.split_once('_')?;
        Some(Self {
            time_ms: t.parse().ok()?,
            row: r.parse().ok()?,
        })
    }
}

impl std::fmt::Display for TelemetryCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.time_ms, self.row)
    }
}

/// What cancelling a command did.
#[derive(Debug)]
pub enum Cancel {
    /// No such command.
    NotFound,
    /// Cancelled (it was queued); the record as it is now.
    Canceled(CommandRecord),
    /// Too late: sent to the device or already over; the record as it is.
    TooLate(CommandRecord),
}

/// A stored record as a sink relays it: the raw body and where it is in commit order.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkRecord {
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
    /// Arrival time, ms since the epoch.
    pub received_ms: i64,
    /// The `Telemetry` message as the device sent it (postcard).
    pub body: Vec<u8>,
}

/// A refused TLS handshake, as kept across restarts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusalRecord {
    /// When, ms since the epoch.
    pub time_ms: i64,
    /// Peer address.
    pub peer: String,
    /// Why (a `Refusal` name).
    pub reason: String,
    /// The subject of the certificate the peer presented, if it presented one.
    pub subject: Option<String>,
    /// Its serial (hex).
    pub serial: Option<String>,
}

// ----------------------------------------------------------------------------------------
// Writer operations.

enum Op {
    Telemetry(Box<Batch>, oneshot::Sender<BatchDone>),
    OpenSession {
        info: SessionInfo,
        now_ms: i64,
        reply: oneshot::Sender<Result<Opened, StoreError>>,
    },
    CloseSession {
        device_key: i64,
        now_ms: i64,
    },
    Enqueue {
        device: String,
        name: String,
        args: OwnedReadings,
        ttl_ms: i64,
        now_ms: i64,
        route: Route,
        reply: oneshot::Sender<Result<CommandRecord, StoreError>>,
    },
    TakeCommands {
        device_key: i64,
        now_ms: i64,
        limit: usize,
        include_sent: bool,
        reply: oneshot::Sender<Result<Vec<OutgoingCommand>, StoreError>>,
    },
    Finish {
        device_key: i64,
        id: i64,
        state: CommandState,
        status: Option<String>,
        result: Option<Json>,
        error: Option<String>,
        now_ms: i64,
        reply: oneshot::Sender<Result<Option<CommandRecord>, StoreError>>,
    },
    Expire {
        now_ms: i64,
        reply: oneshot::Sender<Result<Vec<CommandRecord>, StoreError>>,
    },
    Retention {
        older_than_ms: Option<i64>,
        max_rows: Option<u64>,
        reply: oneshot::Sender<Result<Pruned, StoreError>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    PutGroup {
        name: String,
        devices: Vec<String>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A one-off write (the operator API's: register or delete a device, cancel a
    /// command ...): run in its own savepoint in the next group commit, its reply held
    /// until that commits. Called with `None` when the writer refuses it.
    Write(WriteFn),
    /// Commit what is queued before it, then stop the writer.
    Stop,
}

type WriteFn = Box<dyn FnOnce(Option<&Connection>) -> (Pending, OpOutcome) + Send>;

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    path: Arc<PathBuf>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// At most [`MAX_READERS`] reads at once.
    reading: Arc<tokio::sync::Semaphore>,
    health: Arc<StoreHealth>,
    /// Counts commits that stored telemetry: sinks wait on it instead of polling.
    commits: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The writer thread, to stop and join at shutdown.
pub struct WriterThread(Option<thread::JoinHandle<()>>);

impl WriterThread {
    /// Commits everything queued so far, stops the writer and waits for it. Later
    /// operations on any [`Store`] handle fail with [`StoreError::Closed`].
    pub async fn stop(mut self, store: &Store) {
        let _ = store.tx.send(Op::Stop).await;
        if let Some(h) = self.0.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS devices(
    key             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    first_seen_ms   INTEGER,
    last_seen_ms    INTEGER,
    online          INTEGER NOT NULL DEFAULT 0,
    cert_serial     TEXT,
    cert_not_after  INTEGER,
    firmware        TEXT,
    peer_addr       TEXT,
    boot_id         INTEGER,
    connects        INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS telemetry(
    device       INTEGER NOT NULL,
    boot_id      INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    time_ms      INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL,
    body         BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS telemetry_time ON telemetry(device, time_ms);
-- The highest seq stored per device boot: what deduplicates records (PROTOCOL.md §8.2)
-- and answers Welcome.last_acked. One small row per boot instead of a unique index
-- over every record; `last_ms` (arrival of that record) lets retention prune it.
CREATE TABLE IF NOT EXISTS boots(
    device    INTEGER NOT NULL,
    boot_id   INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL,
    PRIMARY KEY (device, boot_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commands(
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    device       INTEGER NOT NULL,
    name         TEXT NOT NULL,
    args         TEXT NOT NULL,
    state        TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    sent_ms      INTEGER,
    finished_ms  INTEGER,
    attempts     INTEGER NOT NULL DEFAULT 0,
    status       TEXT,
    result       TEXT,
    error        TEXT
);
CREATE INDEX IF NOT EXISTS commands_open ON commands(device, state) WHERE state IN ('queued', 'sent');
CREATE INDEX IF NOT EXISTS commands_expiry ON commands(expires_ms) WHERE state IN ('queued', 'sent');
-- Where each northbound sink (the MQTT bridge) is in the telemetry table: the rowid
-- of the last record it delivered. Rowids grow in commit order (one writer), and
-- retention keeps the newest row, so `rowid > cursor` is exactly what is left to send.
CREATE TABLE IF NOT EXISTS sinks(
    name    TEXT PRIMARY KEY,
    cursor  INTEGER NOT NULL
) WITHOUT ROWID;
-- The newest refused handshakes, kept across restarts (a bounded copy of the
-- in-memory list, saved every few seconds).
CREATE TABLE IF NOT EXISTS refusals(
    time_ms  INTEGER NOT NULL,
    peer     TEXT NOT NULL,
    reason   TEXT NOT NULL,
    subject  TEXT,
    serial   TEXT
);
CREATE TABLE IF NOT EXISTS groups(
    name    TEXT NOT NULL,
    device  TEXT NOT NULL,
    PRIMARY KEY (name, device)
) WITHOUT ROWID;
"#;

impl Store {
    /// Opens (or creates) the store and starts its writer thread.
    pub fn open(opts: StoreOptions) -> Result<(Store, WriterThread), StoreError> {
        if let Some(dir) = opts.path.parent()
            && !dir.as_os_str().is_empty()
        {
            private_dir(dir)?;
        }
        private_files(&opts.path)?;
        let conn = open_writer_connection(&opts.path, opts.danger_ack_before_fsync)?;

        // Room for a burst from every session without making them wait on the channel.
        let (tx, rx) = mpsc::channel(4096);
        let health = Arc::new(StoreHealth::default());
        let commits = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let writer = Writer {
            commits: commits.clone(),
            conn,
            synchronous_full: !opts.danger_ack_before_fsync,
            max_commit_records: opts.max_commit_records,
            max_queued_commands: opts.max_queued_commands,
            sinks: opts.sinks.clone(),
            health: health.clone(),
        };
        let handle = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StoreError::Io {
                path: opts.path.clone(),
                source,
            })?;
        Ok((
            Store {
                tx,
                path: Arc::new(opts.path),
                readers: Arc::new(Mutex::new(Vec::new())),
                reading: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
                health,
                commits,
            },
            WriterThread(Some(handle)),
        ))
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the store is not keeping what it is given, if it is not: its last commit
    /// failed (a full disk, an I/O error), or its writer stopped.
    pub fn failing(&self) -> Option<Failing> {
        if self.tx.is_closed() {
            return Some(Failing {
                reason: "the store is closed".into(),
                since_ms: now_ms(),
            });
        }
        self.health.failing()
    }

    /// Commits or operations that failed since the start.
    pub fn failures(&self) -> u64 {
        self.health.failures()
    }

    /// [`submit`](Self::submit) without waiting: gives the batch back if the queue to
    /// the writer is full.
    pub fn try_submit(&self, batch: Box<Batch>) -> Result<oneshot::Receiver<BatchDone>, TrySubmit> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Op::Telemetry(batch, reply)) {
            Ok(()) => Ok(rx),
            Err(mpsc::error::TrySendError::Full(Op::Telemetry(batch, _))) => {
                Err(TrySubmit::Full(batch))
            }
            Err(_) => Err(TrySubmit::Closed),
        }
    }

    /// Queues a batch for the next commit; the outcome (and the batch, for reuse)
    /// arrives on the returned receiver. A oneshot per batch, not a channel per
    /// session: an idle session then holds no channel buffer.
    pub async fn submit(
        &self,
        batch: Box<Batch>,
    ) -> Result<oneshot::Receiver<BatchDone>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Telemetry(batch, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a new session in the registry and returns what `Welcome` needs. Ops are
    /// applied in order, so every batch a previous session of the device submitted
    /// before this call is counted in `last_acked`.
    pub async fn open_session(&self, info: SessionInfo) -> Result<Opened, StoreError> {
        self.call(|reply| Op::OpenSession {
            info,
            now_ms: now_ms(),
            reply,
        })
        .await
    }

    /// Marks a device offline.
    pub async fn close_session(&self, device_key: i64) -> Result<(), StoreError> {
        self.tx
            .send(Op::CloseSession {
                device_key,
                now_ms: now_ms(),
            })
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Queues a command; its arguments must already be valid. `route` says who
    /// delivers it (in a fleet, maybe another gateway).
    pub async fn enqueue_command(
        &self,
        device: &str,
        name: &str,
        args: OwnedReadings,
        ttl: Duration,
        route: Route,
    ) -> Result<CommandRecord, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.call(|reply| Op::Enqueue {
            device: device.to_owned(),
            name: name.to_owned(),
            args,
            ttl_ms,
            now_ms: now_ms(),
            route,
            reply,
        })
        .await
    }

    /// Marks up to `limit` deliverable commands of a device `sent` and returns them,
    /// oldest first, never expired ones: the queued ones, and with `include_sent` also
    /// those sent without a result yet (a previous session may have lost them).
    pub async fn take_commands(
        &self,
        device_key: i64,
        limit: usize,
        include_sent: bool,
    ) -> Result<Vec<OutgoingCommand>, StoreError> {
        self.call(|reply| Op::TakeCommands {
            device_key,
            now_ms: now_ms(),
            limit,
            include_sent,
            reply,
        })
        .await
    }

    /// Records the end of a command. Returns the updated record, or `None` if the
    /// command is not this device's or already ended (a re-sent result).
    pub async fn finish_command(
        &self,
        device_key: i64,
        id: i64,
        state: CommandState,
        status: Option<String>,
        result: Option<Json>,
        error: Option<String>,
    ) -> Result<Option<CommandRecord>, StoreError> {
        self.call(|reply| Op::Finish {
            device_key,
            id,
            state,
            status,
            result,
            error,
            now_ms: now_ms(),
            reply,
        })
        .await
    }

    /// Marks every command whose time to live has run out `expired`; returns them.
    pub async fn expire_commands(&self) -> Result<Vec<CommandRecord>, StoreError> {
        self.call(|reply| Op::Expire {
            now_ms: now_ms(),
            reply,
        })
        .await
    }

    /// Deletes telemetry older than `max_age` and beyond `max_rows`; returns what it
    /// deleted.
    pub async fn apply_retention(
        &self,
        max_age: Option<Duration>,
        max_rows: Option<u64>,
    ) -> Result<Pruned, StoreError> {
        let older_than_ms =
            max_age.map(|a| now_ms() - i64::try_from(a.as_millis()).unwrap_or(i64::MAX / 2));
        self.call(|reply| Op::Retention {
            older_than_ms,
            max_rows,
            reply,
        })
        .await
    }

    /// Sets the members of a group (replacing them; an empty list deletes the group).
    pub async fn put_group(&self, name: &str, devices: Vec<String>) -> Result<(), StoreError> {
        self.call(|reply| Op::PutGroup {
            name: name.to_owned(),
            devices,
            reply,
        })
        .await
    }

    /// Runs `f` on the writer's connection in the next group commit (in a savepoint of
    /// its own) and answers once that commits.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(move |reply| {
            Op::Write(Box::new(move |conn| match conn {
                Some(c) => after(reply, f(c)),
                None => after(reply, Err(StoreError::Closed)),
            }))
        })
        .await
    }

    /// Deletes a group; `false` if there was none.
    pub async fn delete_group(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.write(move |c| Ok(c.execute("DELETE FROM groups WHERE name = ?1", [name])? > 0))
            .await
    }

    /// Makes a device known before it first connects (commands can then be queued
    /// for it); `false` if it was known already.
    pub async fn register_device(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(move |c| {
            Ok(c.execute(
                "INSERT INTO devices(id) VALUES (?1) ON CONFLICT(id) DO NOTHING",
                [id],
            )? > 0)
        })
        .await
    }

    /// Forgets a device: its row, telemetry, commands and group memberships. `false`
    /// if it was unknown. (The caller checks it is offline.)
    pub async fn delete_device(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(move |c| {
            let Some(key) = c
                .query_row("SELECT key FROM devices WHERE id = ?1", [&id], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
            else {
                return Ok(false);
            };
            c.execute("DELETE FROM telemetry WHERE device = ?1", [key])?;
            c.execute("DELETE FROM boots WHERE device = ?1", [key])?;
            c.execute("DELETE FROM commands WHERE device = ?1", [key])?;
            c.execute("DELETE FROM groups WHERE device = ?1", [&id])?;
            c.execute("DELETE FROM devices WHERE key = ?1", [key])?;
            Ok(true)
        })
        .await
    }

    /// Cancels a command that is still queued. One that was sent cannot be called
    /// back from the device, nor one handed to the gateway holding its device (which
    /// sends it at once): [`Cancel::TooLate`].
    pub async fn cancel_command(&self, id: i64) -> Result<Cancel, StoreError> {
        let now = now_ms();
        self.write(move |c| {
            let n = c.execute(
                "UPDATE commands SET state = 'canceled', finished_ms = ?2
                  WHERE id = ?1 AND state = 'queued' AND fleet IS NOT 'held'",
                params![id, now],
            )?;
            Ok(match command_by_id(c, id)? {
                None => Cancel::NotFound,
                Some(rec) if n > 0 => Cancel::Canceled(rec),
                Some(rec) => Cancel::TooLate(rec),
            })
        })
        .await
    }

    /// Replaces the saved refusals with `list` (the newest last).
    pub async fn save_refusals(&self, list: Vec<RefusalRecord>) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute("DELETE FROM refusals", [])?;
            let mut stmt = c.prepare_cached(
                "INSERT INTO refusals(time_ms, peer, reason, subject, serial)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for r in &list {
                stmt.execute(params![r.time_ms, r.peer, r.reason, r.subject, r.serial])?;
            }
            Ok(())
        })
        .await
    }

    /// The saved refusals, oldest first.
    pub async fn refusals(&self) -> Result<Vec<RefusalRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT time_ms, peer, reason, subject, serial FROM refusals ORDER BY rowid",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(RefusalRecord {
                    time_ms: r.get(0)?,
                    peer: r.get(1)?,
                    reason: r.get(2)?,
                    subject: r.get(3)?,
                    serial: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Changes after every commit that stored telemetry.
    pub fn watch_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// A sink's cursor; a new sink starts at the newest record (it relays what arrives
    /// from now on, not the history).
    pub async fn open_sink(&self, name: &str) -> Result<i64, StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO sinks(name, cursor)
                 VALUES (?1, (SELECT coalesce(max(rowid), 0) FROM telemetry))",
                [&name],
            )?;
            Ok(
                c.query_row("SELECT cursor FROM sinks WHERE name = ?1", [&name], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
    }

    /// Moves a sink's cursor (committed with the next group).
    pub async fn set_sink_cursor(&self, name: &str, cursor: i64) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            c.execute(
                "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
                params![name, cursor],
            )?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` records after `cursor`, in commit order.
    pub async fn telemetry_after(
        &self,
        cursor: i64,
        limit: usize,
    ) -> Result<Vec<SinkRecord>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT t.rowid, d.id, t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
                   FROM telemetry t JOIN devices d ON d.key = t.device
                  WHERE t.rowid > ?1 ORDER BY t.rowid LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cursor, limit as i64], |r| {
                Ok(SinkRecord {
                    row: r.get(0)?,
                    device: r.get(1)?,
                    boot_id: r.get::<_, i64>(2)? as u64,
                    seq: r.get(3)?,
                    time_ms: r.get(4)?,
                    received_ms: r.get(5)?,
                    body: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Records after `cursor` (a sink's backlog), and the arrival time of the oldest.
    ///
    /// Counted as the span of rowids from the first row after the cursor to the last:
    /// two steps down the rowid B-tree, not a scan of the backlog (which `/metrics` would
    /// pay on every scrape). Rowids are given in commit order without gaps, and retention
    /// deletes from the front, so the span is the count.
    pub async fn backlog(&self, cursor: i64) -> Result<(u64, Option<i64>), StoreError> {
        self.read(move |c| {
            let first: Option<(i64, i64)> = c
                .query_row(
                    "SELECT rowid, received_ms FROM telemetry WHERE rowid > ?1
                      ORDER BY rowid LIMIT 1",
                    [cursor],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((first, oldest)) = first else {
                return Ok((0, None));
            };
            let last: i64 = c.query_row("SELECT max(rowid) FROM telemetry", [], |r| r.get(0))?;
            Ok((u64::try_from(last - first + 1).unwrap_or(0), Some(oldest)))
        })
        .await
    }

    /// The members of a group, sorted; `None` if there is no such group.
    pub async fn group(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        let name = name.to_owned();
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT device FROM groups WHERE name = ?1 ORDER BY device")?;
            let members = stmt
                .query_map([name], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok((!members.is_empty()).then_some(members))
        })
        .await
    }

    /// Every group with its members.
    pub async fn groups(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT name, device FROM groups ORDER BY name, device")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out: Vec<(String, Vec<String>)> = Vec::new();
            for (name, device) in rows {
                match out.last_mut() {
                    Some((n, members)) if *n == name => members.push(device),
                    _ => out.push((name, vec![device])),
                }
            }
            Ok(out)
        })
        .await
    }

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Flush { reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    // ------------------------------------------------------------------------------------
    // Reads, on read-only connections in the blocking pool.

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        // Bounded: each reader holds three files and a blocking thread.
        let permit = self
            .reading
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let pooled = readers.lock().ok().and_then(|mut p| p.pop());
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let c = Connection::open_with_flags(
                        path.as_path(),
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    c.busy_timeout(Duration::from_secs(10))?;
                    c
                }
            };
            let out = f(&conn);
            if let Ok(mut p) = readers.lock()
                && p.len() < MAX_READERS
            {
                p.push(conn);
            }
            out
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Up to `limit` devices with ids after `after`, by id.
    pub async fn devices_page(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "{DEVICE_SELECT} WHERE d.id > ?1 ORDER BY d.id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(
                params![after.unwrap_or_default(), i64::from(limit)],
                device_from_row,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!("{DEVICE_SELECT} WHERE d.id = ?1"))?;
            Ok(stmt.query_row([id], device_from_row).optional()?)
        })
        .await
    }

    /// A device's telemetry, newest first (or oldest first), a page at a time.
    pub async fn telemetry(
        &self,
        device: &str,
        q: TelemetryQuery,
    ) -> Result<Vec<TelemetryRecord>, StoreError> {
        Ok(self
            .telemetry_page(device, q)
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// [`telemetry`](Self::telemetry) with each record's cursor.
    pub async fn telemetry_page(
        &self,
        device: &str,
        q: TelemetryQuery,
    ) -> Result<Vec<(TelemetryCursor, TelemetryRecord)>, StoreError> {
        let device = device.to_owned();
        self.read(move |c| {
            let limit = q.limit.unwrap_or(100).min(10_000);
            // Keyset paging on (time_ms, rowid), which the (device, time_ms) index
            // serves in either direction.
            let sql = if q.oldest_first {
                "SELECT t.rowid, t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
                   FROM telemetry t JOIN devices d ON d.key = t.device
                  WHERE d.id = ?1 AND t.time_ms >= ?2 AND t.time_ms < ?3
                    AND t.time_ms >= ?4 AND (t.time_ms > ?4 OR t.rowid > ?5)
                  ORDER BY t.time_ms, t.rowid LIMIT ?6"
            } else {
                "SELECT t.rowid, t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
                   FROM telemetry t JOIN devices d ON d.key = t.device
                  WHERE d.id = ?1 AND t.time_ms >= ?2 AND t.time_ms < ?3
                    AND t.time_ms <= ?4 AND (t.time_ms < ?4 OR t.rowid < ?5)
                  ORDER BY t.time_ms DESC, t.rowid DESC LIMIT ?6"
            };
            let after = q.after.unwrap_or(if q.oldest_first {
                TelemetryCursor {
                    time_ms: i64::MIN,
                    row: i64::MIN,
                }
            } else {
                TelemetryCursor {
                    time_ms: i64::MAX,
                    row: i64::MAX,
                }
            });
            let mut stmt = c.prepare_cached(sql)?;
            let rows = stmt.query_map(
                params![
                    device,
                    q.since_ms.unwrap_or(i64::MIN),
                    q.until_ms.unwrap_or(i64::MAX),
                    after.time_ms,
                    after.row,
                    limit
                ],
                |row| {
                    let rec = telemetry_from_row(row, 1, device.clone())?;
                    let cursor = TelemetryCursor {
                        time_ms: rec.time_ms,
                        row: row.get(0)?,
                    };
                    Ok((cursor, rec))
                },
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Number of telemetry rows of a device (all of them if `device` is `None`).
    pub async fn telemetry_count(&self, device: Option<&str>) -> Result<u64, StoreError> {
        let device = device.map(str::to_owned);
        self.read(move |c| {
            let n: i64 = match device {
                Some(d) => c.query_row(
                    "SELECT count(*) FROM telemetry t JOIN devices d ON d.key = t.device
                      WHERE d.id = ?1",
                    [d],
                    |r| r.get(0),
                )?,
                None => c.query_row("SELECT count(*) FROM telemetry", [], |r| r.get(0))?,
            };
            Ok(n as u64)
        })
        .await
    }

    /// One command.
    pub async fn command(&self, id: i64) -> Result<Option<CommandRecord>, StoreError> {
        self.read(move |c| command_by_id(c, id)).await
    }

    /// Commands of a device, newest first.
    pub async fn commands_of(
        &self,
        device: &str,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let device = device.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "{COMMAND_SELECT} WHERE d.id = ?1 ORDER BY c.id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![device, limit.min(10_000)], command_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Devices whose last certificate expires before each of `deadlines` (seconds
    /// since the epoch), in the same order.
    pub async fn certs_expiring_before(&self, deadlines: Vec<i64>) -> Result<Vec<u64>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT count(*) FROM devices WHERE cert_not_after IS NOT NULL AND cert_not_after < ?1",
            )?;
            deadlines
                .iter()
                .map(|d| Ok(stmt.query_row([d], |r| r.get::<_, i64>(0))? as u64))
                .collect()
        })
        .await
    }

    /// Number of commands in each state.
    pub async fn command_counts(&self) -> Result<Vec<(CommandState, u64)>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT state, count(*) FROM commands GROUP BY state")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    CommandState::parse(&r.get::<_, String>(0)?),
                    r.get::<_, i64>(1)? as u64,
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}

/// Decodes a stored telemetry body into a JSON object of readings. Bodies were
/// validated when they arrived; an undecodable one (a corrupted file) reads as empty.
pub fn body_to_json(body: &[u8]) -> serde_json::Map<String, Json> {
    match proto::decode_uplink(body) {
        Ok(Uplink::Telemetry(t)) => values::readings_to_json(&t.readings),
        _ => serde_json::Map::new(),
    }
}

/// Devices with their newest record: one step down the `(device, time_ms)` index per
/// device (the last entry; equal times are in arrival order).
const DEVICE_SELECT: &str = "SELECT d.id, d.online, d.first_seen_ms, d.last_seen_ms,
    d.cert_serial, d.cert_not_after, d.firmware, d.peer_addr, d.boot_id, d.connects,
    t.boot_id, t.seq, t.time_ms, t.received_ms, t.body
    FROM devices d LEFT JOIN telemetry t ON t.rowid =
      (SELECT rowid FROM telemetry WHERE device = d.key ORDER BY time_ms DESC LIMIT 1)";

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: r.get(0)?,
        online: r.get::<_, i64>(1)? != 0,
        first_seen_ms: r.get(2)?,
        last_seen_ms: r.get(3)?,
        cert_serial: r.get(4)?,
        cert_not_after: r.get(5)?,
        firmware: r.get(6)?,
        peer_addr: r.get(7)?,
        boot_id: r.get::<_, Option<i64>>(8)?.map(|b| b as u64),
        connects: r.get(9)?,
        // The LEFT JOIN gives NULLs for a device without telemetry.
        latest: match r.get_ref(14)? {
            rusqlite::types::ValueRef::Null => None,
            _ => Some(telemetry_from_row(r, 10, r.get(0)?)?),
        },
        gateway: None,
    })
}

/// A telemetry record from the columns `boot_id, seq, time_ms, received_ms, body`
/// starting at `at`.
fn telemetry_from_row(
    r: &rusqlite::Row<'_>,
    at: usize,
    device: String,
) -> rusqlite::Result<TelemetryRecord> {
    let body: Vec<u8> = r.get(at + 4)?;
    Ok(TelemetryRecord {
        device,
        boot_id: r.get::<_, i64>(at)? as u64,
        seq: r.get(at + 1)?,
        time_ms: r.get(at + 2)?,
        received_ms: r.get(at + 3)?,
        values: body_to_json(&body),
    })
}

const COMMAND_SELECT: &str =
    "SELECT coalesce(c.owner_id, c.id), d.id, c.name, c.args, c.state, c.created_ms,
    c.expires_ms, c.sent_ms, c.finished_ms, c.attempts, c.status, c.result, c.error
    FROM commands c JOIN devices d ON d.key = c.device";

fn command_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CommandRecord> {
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Ok(CommandRecord {
        id: r.get(0)?,
        device: r.get(1)?,
        name: r.get(2)?,
        args: json(r.get(3)?).unwrap_or(Json::Null),
        state: CommandState::parse(&r.get::<_, String>(4)?),
        created_ms: r.get(5)?,
        expires_ms: r.get(6)?,
        sent_ms: r.get(7)?,
        finished_ms: r.get(8)?,
        attempts: r.get(9)?,
        status: r.get(10)?,
        result: json(r.get(11)?),
        error: r.get(12)?,
    })
}

/// Copies the SQLite file `from` into a new file `to` with SQLite's online backup, in
/// one step under one read transaction: a consistent snapshot of what was committed,
/// safe while a gateway writes to `from` (WAL readers do not block the writer). `to`
/// must not exist; it is made 0600 like the store.
pub fn backup_file(from: &Path, to: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    if !from.exists() {
        return Err(io(from)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no store here (is --data-dir right?)",
        )));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io(to))?;
    let src = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.busy_timeout(Duration::from_secs(10))?;
    let mut dst = Connection::open(to)?;
    {
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
        // -1: every page in one step, so no writer can make it start over.
        backup.step(-1)?;
    }
    // A backup is one self-contained file: no WAL beside it.
    dst.pragma_update(None, "journal_mode", "DELETE")?;
    Ok(())
}

fn command_by_id(c: &Connection, id: i64) -> Result<Option<CommandRecord>, StoreError> {
    let mut stmt = c.prepare_cached(&format!("{COMMAND_SELECT} WHERE c.id = ?1"))?;
    Ok(stmt.query_row([id], command_from_row).optional()?)
}

// ----------------------------------------------------------------------------------------
// The writer thread.

/// Stores made before `boots` deduplicated telemetry with a unique index on
/// `(device, boot_id, seq)`: fill `boots` from it and drop it (once, at open).
/// The writer's connection: WAL, the schema (migrated), nobody online.
fn open_writer_connection(
    path: &Path,
    danger_ack_before_fsync: bool,
) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = if danger_ack_before_fsync {
        "NORMAL"
    } else {
        "FULL"
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.execute_batch(SCHEMA)?;
    migrate_unique_key(&conn)?;
    migrate_fleet_columns(&conn)?;
    // A previous run may have died with sessions open: nobody is online at start.
    conn.execute("UPDATE devices SET online = 0 WHERE online = 1", [])?;
    Ok(conn)
}

/// Creates the data directory readable by this user only (0700). An existing one is
/// left as the operator made it, with a warning if others can read it.
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    if dir.is_dir() {
        let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", mode & 0o777),
                "the data directory is open to other users; chmod 700 it"
            );
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)
}

/// Makes the store's files readable by this user only (0600): the database is created
/// so before SQLite opens it, and SQLite gives its `-wal` and `-shm` files the
/// database's mode. Files of an older, laxer version are tightened.
fn private_files(db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io { path, source }
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db)
        .map_err(io(db))?;
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    for f in [db.to_owned(), PathBuf::from(wal), PathBuf::from(shm)] {
        match std::fs::metadata(&f) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))
                    .map_err(io(&f))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&f)(e)),
        }
    }
    Ok(())
}

/// Commands of stores made before fleets had no fleet columns: add them (once, at
/// open). `ADD COLUMN` with no default rewrites nothing.
fn migrate_fleet_columns(conn: &Connection) -> Result<(), StoreError> {
    let mut have = Vec::new();
    {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('commands')")?;
        for name in stmt.query_map([], |r| r.get::<_, String>(0))? {
            have.push(name?);
        }
    }
    for (column, ty) in FLEET_COLUMNS {
        if !have.iter().any(|h| h == column) {
            conn.execute(
                &format!("ALTER TABLE commands ADD COLUMN {column} {ty}"),
                [],
            )?;
        }
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS commands_copies ON commands(owner, owner_id)
           WHERE owner IS NOT NULL;
         CREATE INDEX IF NOT EXISTS commands_fleet ON commands(fleet) WHERE fleet IS NOT NULL;",
    )?;
    Ok(())
}

/// The commands table's fleet columns (docs/FLEET.md, "Commands across the fleet").
/// A command asked of this gateway: `fleet` is NULL (delivered here), `publish` (to
/// go into the fleet's pending stream), `pending` (in it, at `pending_seq`) or `held`
/// (handed to the gateway `held_by`, which holds the device's session). A copy of a
/// command asked of another gateway, delivered here: `owner`, `owner_id` (its id
/// there) and `reported` (the last state that gateway acknowledged).
const FLEET_COLUMNS: [(&str, &str); 6] = [
    ("fleet", "TEXT"),
    ("held_by", "TEXT"),
    ("pending_seq", "INTEGER"),
    ("owner", "TEXT"),
    ("owner_id", "INTEGER"),
    ("reported", "TEXT"),
];

fn migrate_unique_key(conn: &Connection) -> Result<(), StoreError> {
    let old: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'telemetry_key'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !old {
        return Ok(());
    }
    tracing::info!("store: moving deduplication to per-boot high-water marks (once)");
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         INSERT OR REPLACE INTO boots(device, boot_id, last_seq, last_ms)
           SELECT device, boot_id, max(seq), max(received_ms) FROM telemetry
            GROUP BY device, boot_id;
         DROP INDEX telemetry_key;
         COMMIT;",
    )?;
    Ok(())
}

struct Writer {
    conn: Connection,
    /// `synchronous=FULL` (not `danger_ack_before_fsync`).
    synchronous_full: bool,
    max_commit_records: usize,
    max_queued_commands: usize,
    /// Sinks that run: retention keeps what they have not delivered, unless told not to.
    sinks: Vec<SinkSpec>,
    health: Arc<StoreHealth>,
    commits: Arc<tokio::sync::watch::Sender<u64>>,
}

/// What to do once the transaction holding an op has committed (or failed).
enum Pending {
    /// A telemetry batch and what inserting it gave (its own error, if it failed).
    Batch(
        Box<Batch>,
        Result<usize, Arc<StoreError>>,
        oneshot::Sender<BatchDone>,
    ),
    Reply(Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>),
}

/// How one op went inside its savepoint.
enum OpOutcome {
    /// Done; kept if the transaction commits.
    Done,
    /// Refused for a reason of its own (a full queue, an unknown id): undone, and the
    /// store is fine.
    Refused,
    /// SQLite failed (disk full, I/O error, a constraint): undone, and the store is not
    /// keeping what it is given.
    Failed(String),
}

impl OpOutcome {
    fn of<T>(r: &Result<T, StoreError>) -> Self {
        match r {
            Ok(_) => OpOutcome::Done,
            Err(e @ (StoreError::Sqlite(_) | StoreError::Io { .. })) => {
                OpOutcome::Failed(e.to_string())
            }
            Err(_) => OpOutcome::Refused,
        }
    }
}

/// Sets `PRAGMA synchronous` to FULL (fsync at every commit) or NORMAL (fsync at
/// checkpoints only). A failure leaves the previous mode, which is only slower or, for
/// NORMAL, as durable as the next FULL commit.
fn set_synchronous(conn: &Connection, full: bool) {
    let mode = if full { "FULL" } else { "NORMAL" };
    if let Err(e) = conn.pragma_update(None, "synchronous", mode) {
        tracing::warn!(error = %e, mode, "store could not set synchronous");
    }
}

/// An op's answer, held back until its transaction commits: an answer must never claim
/// something that a failed commit then lost.
fn after<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    value: Result<T, StoreError>,
) -> (Pending, OpOutcome) {
    let outcome = OpOutcome::of(&value);
    let pending = Pending::Reply(Box::new(move |committed| {
        let out = match committed {
            Ok(()) => value,
            Err(e) => Err(StoreError::CommitFailed(e.to_string())),
        };
        let _ = reply.send(out);
    }));
    (pending, outcome)
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut ops: Vec<Op> = Vec::new();
        let mut stop = false;
        while !stop {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut records = match &first {
                Op::Telemetry(b, _) => b.records.len(),
                _ => 0,
            };
            ops.push(first);
            // Everything that queued while the last commit ran goes into this one.
            while records < self.max_commit_records && !matches!(ops.last(), Some(Op::Stop)) {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Telemetry(b, _) = &op {
                            records += b.records.len();
                        }
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            stop = matches!(ops.last(), Some(Op::Stop));
            self.commit_group(&mut ops);
        }
        self.health
            .set_failing("the store's writer has stopped".into(), true);
    }

    /// Applies `ops` in one transaction, each inside a savepoint of its own, commits
    /// once, then answers each. An op that fails is undone alone and answers its error;
    /// the others keep their work. If SQLite gives up the whole transaction, or the
    /// commit fails, every op answers the failure: nothing is ever answered as done
    /// that a failure then lost.
    fn commit_group(&mut self, ops: &mut Vec<Op>) {
        // A group of nothing but command hand-outs needs no fsync (at-least-once
        // delivery, see `apply`): in WAL mode a commit without one becomes durable
        // with the next commit that has one. It keeps the fsync off a command's
        // round trip, where the result's commit would otherwise queue behind it.
        let relaxed =
            self.synchronous_full && ops.iter().all(|op| matches!(op, Op::TakeCommands { .. }));
        if relaxed {
            set_synchronous(&self.conn, false);
        }
        let changes_before = self.conn.total_changes();
        let has_telemetry = ops.iter().any(|op| matches!(op, Op::Telemetry(..)));
        let mut pending: Vec<Pending> = Vec::with_capacity(ops.len());
        // The first failed op, and whether a telemetry op failed / succeeded.
        let mut op_failure: Option<String> = None;
        let (mut telemetry_failed, mut telemetry_done) = (false, false);
        let committed = match self.conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => {
                let mut lost: Option<Arc<StoreError>> = None;
                for op in ops.drain(..) {
                    if lost.is_some() {
                        pending.push(Self::refuse(op));
                        continue;
                    }
                    let is_telemetry = matches!(op, Op::Telemetry(..));
                    let (p, outcome) = self.apply_in_savepoint(op, &mut lost);
                    pending.push(p);
                    match outcome {
                        OpOutcome::Failed(why) => {
                            tracing::error!(error = %why, "store operation failed; undone alone");
                            op_failure.get_or_insert(why);
                            telemetry_failed |= is_telemetry;
                        }
                        OpOutcome::Done => telemetry_done |= is_telemetry,
                        OpOutcome::Refused => {}
                    }
                }
                match lost {
                    Some(e) => {
                        tracing::error!(error = %e, "store transaction lost");
                        let _ = self.conn.execute_batch("ROLLBACK");
                        Err(e)
                    }
                    None => self.conn.execute_batch("COMMIT").map_err(|e| {
                        tracing::error!(error = %e, "store commit failed");
                        let _ = self.conn.execute_batch("ROLLBACK");
                        Arc::new(StoreError::from(e))
                    }),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store could not begin a transaction");
                pending.extend(ops.drain(..).map(Self::refuse));
                Err(Arc::new(StoreError::from(e)))
            }
        };
        if relaxed {
            set_synchronous(&self.conn, true);
        }
        match (&committed, op_failure) {
            (Err(e), _) => self
                .health
                .set_failing(format!("commit failed: {e}"), has_telemetry),
            (Ok(()), Some(why)) => self.health.set_failing(why, telemetry_failed),
            (Ok(()), None) => self
                .health
                .committed(telemetry_done, self.conn.total_changes() > changes_before),
        }
        if committed.is_ok() && telemetry_done {
            self.commits.send_modify(|n| *n = n.wrapping_add(1));
        }
        for p in pending.drain(..) {
            match p {
                Pending::Batch(batch, inserted, reply) => {
                    let result = match &committed {
                        Ok(()) => inserted,
                        Err(e) => Err(e.clone()),
                    };
                    // The session may be gone; then nobody needs the ack.
                    let _ = reply.send(BatchDone { batch, result });
                }
                Pending::Reply(f) => f(committed.clone()),
            }
        }
    }

    /// Applies one op inside a savepoint: on failure it is rolled back to it, so the
    /// transaction holds either all of the op or none of it. Sets `lost` if SQLite
    /// dropped the whole transaction (it may, after a full disk or an I/O error).
    fn apply_in_savepoint(
        &mut self,
        op: Op,
        lost: &mut Option<Arc<StoreError>>,
    ) -> (Pending, OpOutcome) {
        if let Err(e) = self
            .conn
            .prepare_cached("SAVEPOINT op")
            .and_then(|mut s| s.execute([]))
        {
            let e = Arc::new(StoreError::from(e));
            *lost = Some(e.clone());
            return (Self::refuse(op), OpOutcome::Failed(e.to_string()));
        }
        let (pending, outcome) = self.apply(op);
        let undo = !matches!(outcome, OpOutcome::Done);
        let end = if undo {
            self.conn
                .prepare_cached("ROLLBACK TO op")
                .and_then(|mut s| s.execute([]))
                .and_then(|_| self.conn.prepare_cached("RELEASE op"))
                .and_then(|mut s| s.execute([]))
        } else {
            self.conn
                .prepare_cached("RELEASE op")
                .and_then(|mut s| s.execute([]))
        };
        if let Err(e) = end {
            *lost = Some(Arc::new(StoreError::from(e)));
        } else if self.conn.is_autocommit() {
            // No transaction any more: SQLite rolled it back as a whole.
            *lost = Some(Arc::new(StoreError::CommitFailed(
                "SQLite rolled back the transaction after an error".into(),
            )));
        }
        (pending, outcome)
    }

    /// An op that was not applied: its reply carries the failure of its group.
    fn refuse(op: Op) -> Pending {
        match op {
            Op::OpenSession { reply, .. } => after(reply, Err(StoreError::Closed)).0,
            Op::Enqueue { reply, .. } => after(reply, Err(StoreError::Closed)).0,
            Op::TakeCommands { reply, .. } => after(reply, Err(StoreError::Closed)).0,
            Op::Finish { reply, .. } => after(reply, Err(StoreError::Closed)).0,
            Op::Expire { reply, .. } => after(reply, Err(StoreError::Closed)).0,
            Op::Retention { reply, .. } => after(reply, Err(StoreError::Closed)).0,
            Op::PutGroup { reply, .. } => after(reply, Err(StoreError::Closed)).0,
            Op::Flush { reply } => Pending::Reply(Box::new(move |_| {
                let _ = reply.send(());
            })),
            Op::Telemetry(b, reply) => Pending::Batch(b, Ok(0), reply),
            Op::Write(f) => f(None).0,
            Op::CloseSession { .. } | Op::Stop => Pending::Reply(Box::new(|_| {})),
        }
    }

    /// Applies one op inside the open transaction; its reply waits for the commit.
    fn apply(&mut self, op: Op) -> (Pending, OpOutcome) {
        let nothing = || Pending::Reply(Box::new(|_| {}));
        match op {
            Op::Telemetry(mut batch, reply) => match self.insert_batch(&mut batch) {
                Ok(n) => (Pending::Batch(batch, Ok(n), reply), OpOutcome::Done),
                Err(e) => {
                    let why = e.to_string();
                    let err = Arc::new(StoreError::from(e));
                    (
                        Pending::Batch(batch, Err(err), reply),
                        OpOutcome::Failed(why),
                    )
                }
            },
            Op::OpenSession {
                info,
                now_ms,
                reply,
            } => after(reply, self.open_session(&info, now_ms)),
            Op::CloseSession { device_key, now_ms } => {
                let r = self.conn.execute(
                    "UPDATE devices SET online = 0, last_seen_ms = ?2 WHERE key = ?1",
                    params![device_key, now_ms],
                );
                let outcome = OpOutcome::of(&r.map_err(StoreError::from));
                (nothing(), outcome)
            }
            Op::Enqueue {
                device,
                name,
                args,
                ttl_ms,
                now_ms,
                route,
                reply,
            } => after(
                reply,
                self.enqueue(&device, &name, &args, ttl_ms, now_ms, &route),
            ),
            Op::TakeCommands {
                device_key,
                now_ms,
                limit,
                include_sent,
                reply,
            } => {
                // Answered before the commit, unlike every other op: the device gets
                // its commands one fsync sooner (a command's round trip has three
                // commits otherwise). Safe because delivery is at least once: if this
                // transaction is lost, the commands are still queued (or sent) and go
                // out again; devices ignore a command id they have run (PROTOCOL.md).
                let taken = self.take_commands(device_key, now_ms, limit, include_sent);
                let outcome = OpOutcome::of(&taken);
                let _ = reply.send(taken);
                (nothing(), outcome)
            }
            Op::Finish {
                device_key,
                id,
                state,
                status,
                result,
                error,
                now_ms,
                reply,
            } => {
                let end = CommandEnd {
                    state,
                    status,
                    result,
                    error,
                };
                after(reply, self.finish(device_key, id, &end, now_ms))
            }
            Op::Expire { now_ms, reply } => after(reply, self.expire(now_ms)),
            Op::Retention {
                older_than_ms,
                max_rows,
                reply,
            } => after(reply, self.retention(older_than_ms, max_rows)),
            Op::Flush { reply } => (
                Pending::Reply(Box::new(move |_| {
                    let _ = reply.send(());
                })),
                OpOutcome::Done,
            ),
            Op::PutGroup {
                name,
                devices,
                reply,
            } => after(reply, self.put_group(&name, &devices)),
            Op::Write(f) => f(Some(&self.conn)),
            Op::Stop => (nothing(), OpOutcome::Done),
        }
    }

    fn put_group(&mut self, name: &str, devices: &[String]) -> Result<(), StoreError> {
        let c = &self.conn;
        c.execute("DELETE FROM groups WHERE name = ?1", [name])?;
        let mut stmt =
            c.prepare_cached("INSERT OR IGNORE INTO groups(name, device) VALUES (?1, ?2)")?;
        for d in devices {
            stmt.execute(params![name, d])?;
        }
        Ok(())
    }

    /// Inserts the records above the boot's high-water mark and raises it; the others
    /// are duplicates (already stored: a session replays from `Welcome.last_acked`, and
    /// seqs grow within a boot).
    fn insert_batch(&mut self, batch: &mut Batch) -> Result<usize, rusqlite::Error> {
        // Stored bit for bit: SQLite integers are signed 64-bit.
        let boot = batch.boot_id as i64;
        let mut high: Option<i64> = self
            .conn
            .prepare_cached("SELECT last_seq FROM boots WHERE device = ?1 AND boot_id = ?2")?
            .query_row(params![batch.device_key, boot], |r| r.get(0))
            .optional()?;
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO telemetry(device, boot_id, seq, time_ms, received_ms, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut inserted = 0;
        let (records, bodies) = (&mut batch.records, &batch.bodies);
        for rec in records.iter_mut() {
            let seq = i64::from(rec.seq);
            rec.inserted = high.is_none_or(|h| seq > h);
            if !rec.inserted {
                continue;
            }
            let start = rec.start as usize;
            let body = bodies
                .get(start..start + rec.len as usize)
                .unwrap_or_default();
            stmt.execute(params![
                batch.device_key,
                boot,
                rec.seq,
                rec.time_ms,
                batch.received_ms,
                body
            ])?;
            high = Some(seq);
            inserted += 1;
        }
        if inserted > 0
            && let Some(high) = high
        {
            self.conn
                .prepare_cached(
                    "INSERT INTO boots(device, boot_id, last_seq, last_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(device, boot_id) DO UPDATE SET
                        last_seq = max(last_seq, excluded.last_seq), last_ms = excluded.last_ms",
                )?
                .execute(params![batch.device_key, boot, high, batch.received_ms])?;
        }
        Ok(inserted)
    }

    fn open_session(&mut self, info: &SessionInfo, now_ms: i64) -> Result<Opened, StoreError> {
        let c = &self.conn;
        let key: i64 = c.query_row(
            "INSERT INTO devices(id, first_seen_ms, last_seen_ms, online, cert_serial,
                cert_not_after, firmware, peer_addr, boot_id, connects)
             VALUES (?1, ?2, ?2, 1, ?3, ?4, ?5, ?6, ?7, 1)
             ON CONFLICT(id) DO UPDATE SET
                first_seen_ms = coalesce(first_seen_ms, excluded.first_seen_ms),
                last_seen_ms = excluded.last_seen_ms, online = 1,
                cert_serial = excluded.cert_serial, cert_not_after = excluded.cert_not_after,
                firmware = excluded.firmware, peer_addr = excluded.peer_addr,
                boot_id = excluded.boot_id, connects = connects + 1
             RETURNING key",
            params![
                info.device,
                now_ms,
                info.cert_serial,
                info.cert_not_after,
                info.firmware,
                info.peer_addr,
                info.boot_id as i64
            ],
            |r| r.get(0),
        )?;
        let last: Option<i64> = c
            .prepare_cached("SELECT last_seq FROM boots WHERE device = ?1 AND boot_id = ?2")?
            .query_row(params![key, info.boot_id as i64], |r| r.get(0))
            .optional()?;
        Ok(Opened {
            device_key: key,
            last_acked: last.and_then(|s| Seq::try_from(s).ok()),
        })
    }

    fn enqueue(
        &mut self,
        device: &str,
        name: &str,
        args: &OwnedReadings,
        ttl_ms: i64,
        now_ms: i64,
        route: &Route,
    ) -> Result<CommandRecord, StoreError> {
        let c = &self.conn;
        // A command may target a device that has never connected yet.
        let key: i64 = c.query_row(
            "INSERT INTO devices(id) VALUES (?1)
             ON CONFLICT(id) DO UPDATE SET id = id RETURNING key",
            [device],
            |r| r.get(0),
        )?;
        let queued: i64 = c
            .prepare_cached(
                "SELECT count(*) FROM commands WHERE device = ?1 AND state IN ('queued', 'sent')",
            )?
            .query_row([key], |r| r.get(0))?;
        if queued as usize >= self.max_queued_commands {
            return Err(StoreError::QueueFull {
                device: device.to_owned(),
                queued: queued as usize,
                limit: self.max_queued_commands,
            });
        }
        let (fleet, held_by) = match route {
            Route::Local => (None, None),
            Route::Publish => (Some("publish"), None),
            Route::HeldBy(g) => (Some("held"), Some(g.as_str())),
        };
        c.execute(
            "INSERT INTO commands(device, name, args, state, created_ms, expires_ms, fleet,
                                  held_by)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7)",
            params![
                key,
                name,
                values::owned_to_json(args).to_string(),
                now_ms,
                now_ms.saturating_add(ttl_ms),
                fleet,
                held_by
            ],
        )?;
        let id = c.last_insert_rowid();
        command_by_id(c, id)?.ok_or(StoreError::NoSuchCommand(id))
    }

    fn take_commands(
        &mut self,
        device_key: i64,
        now_ms: i64,
        limit: usize,
        include_sent: bool,
    ) -> Result<Vec<OutgoingCommand>, StoreError> {
        let c = &self.conn;
        let states = if include_sent {
            "'queued', 'sent'"
        } else {
            "'queued'"
        };
        let rows = c
            .prepare_cached(&format!(
                "UPDATE commands SET state = 'sent', sent_ms = ?2, attempts = attempts + 1,
                        fleet = CASE fleet WHEN 'publish' THEN NULL ELSE fleet END
                  WHERE id IN (SELECT id FROM commands
                                WHERE device = ?1 AND state IN ({states})
                                  AND expires_ms > ?2 AND fleet IS NOT 'held'
                                ORDER BY id LIMIT ?3)
                  RETURNING id, name, args, expires_ms"
            ))?
            .query_map(
                params![device_key, now_ms, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out: Vec<OutgoingCommand> = rows
            .into_iter()
            .map(|(id, name, args, expires_ms)| {
                // Arguments were validated when queued; the stored JSON parses back.
                let json: Json = serde_json::from_str(&args).unwrap_or(Json::Null);
                OutgoingCommand {
                    id,
                    name,
                    args: values::args_from_json(&json).unwrap_or_default(),
                    expires_ms,
                    // Read inside this transaction: it sees the `sent` state.
                    record: command_by_id(c, id).ok().flatten(),
                }
            })
            .collect();
        out.sort_by_key(|c| c.id);
        Ok(out)
    }

    fn finish(
        &mut self,
        device_key: i64,
        id: i64,
        end: &CommandEnd,
        now_ms: i64,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let c = &self.conn;
        let n = c.execute(
            "UPDATE commands SET state = ?3, status = ?4, result = ?5, error = ?6,
                finished_ms = ?7
              WHERE id = ?1 AND device = ?2 AND state IN ('queued', 'sent')",
            params![
                id,
                device_key,
                end.state.as_str(),
                end.status,
                end.result.as_ref().map(Json::to_string),
                end.error,
                now_ms
            ],
        )?;
        if n == 0 {
            return Ok(None);
        }
        command_by_id(c, id)
    }

    fn expire(&mut self, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError> {
        let c = &self.conn;
        let ids = c
            .prepare_cached(
                "UPDATE commands SET state = 'expired', finished_ms = ?1
                  WHERE state IN ('queued', 'sent') AND expires_ms <= ?1
                  RETURNING id",
            )?
            .query_map([now_ms], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(command_by_id(c, id)?);
        }
        Ok(out)
    }

    fn retention(
        &mut self,
        older_than_ms: Option<i64>,
        max_rows: Option<u64>,
    ) -> Result<Pruned, StoreError> {
        const CHUNK: usize = 5000;
        let c = &self.conn;
        let mut deleted = 0u64;
        // With a sink running (the MQTT bridge): never a record it has not delivered
        // (unless it lets them go), and never the newest record, since rowids must keep
        // growing or its cursor would skip the next ones.
        let mut keep_from = i64::MAX;
        let undelivered = |c: &Connection, sink: &str| -> Result<u64, rusqlite::Error> {
            c.query_row(
                "SELECT count(*) FROM telemetry
                  WHERE rowid > coalesce((SELECT cursor FROM sinks WHERE name = ?1), 0)",
                [sink],
                |r| r.get(0),
            )
        };
        let mut lossy = Vec::new();
        for sink in &self.sinks {
            let k: i64 = if sink.drop_undelivered {
                lossy.push((sink.name, undelivered(c, sink.name)?));
                c.query_row(
                    "SELECT coalesce((SELECT max(rowid) FROM telemetry), 0) - 1",
                    [],
                    |r| r.get(0),
                )?
            } else {
                c.query_row(
                    "SELECT min(coalesce((SELECT cursor FROM sinks WHERE name = ?1), 0),
                                coalesce((SELECT max(rowid) FROM telemetry), 0) - 1)",
                    [sink.name],
                    |r| r.get(0),
                )?
            };
            keep_from = keep_from.min(k);
        }
        if let Some(cutoff) = older_than_ms {
            // Rowids follow arrival order: delete from the front in chunks, and stop at
            // the first chunk that is not entirely old enough.
            loop {
                let n = c.execute(
                    "DELETE FROM telemetry WHERE rowid IN
                      (SELECT rowid FROM telemetry ORDER BY rowid LIMIT 5000)
                      AND received_ms < ?1 AND rowid <= ?2",
                    [cutoff, keep_from],
                )?;
                deleted += n as u64;
                if n < CHUNK {
                    break;
                }
            }
        }
        if let Some(max) = max_rows {
            let n = c.execute(
                "DELETE FROM telemetry
                  WHERE rowid <= (SELECT max(rowid) FROM telemetry) - ?1 AND rowid <= ?2",
                [i64::try_from(max).unwrap_or(i64::MAX), keep_from],
            )?;
            deleted += n as u64;
        }
        if deleted > 0 {
            // High-water marks of past boots whose records are all gone (older than the
            // oldest record left). A device's current boot keeps its mark.
            c.execute(
                "DELETE FROM boots
                  WHERE last_ms < coalesce(
                          (SELECT received_ms FROM telemetry ORDER BY rowid LIMIT 1),
                          9223372036854775807)
                    AND boot_id IS NOT (SELECT boot_id FROM devices WHERE key = boots.device)",
                [],
            )?;
        }
        let mut pruned = Pruned {
            deleted,
            undelivered: 0,
        };
        for (sink, before) in lossy {
            let after = undelivered(c, sink)?;
            pruned.undelivered = pruned.undelivered.max(before.saturating_sub(after));
        }
        Ok(pruned)
    }
}

struct CommandEnd {
    state: CommandState,
    status: Option<String>,
    result: Option<Json>,
    error: Option<String>,
}

/// The protocol status of a command result as a lifecycle state.
pub fn state_for(status: CommandStatus) -> CommandState {
    match status {
        CommandStatus::Succeeded => CommandState::Succeeded,
        CommandStatus::Expired => CommandState::Expired,
        _ => CommandState::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use device_client::proto::{Reading, Readings, Telemetry, Value};

    fn open(dir: &Path) -> (Store, WriterThread) {
        Store::open(StoreOptions {
            path: dir.join("t.sqlite"),
            danger_ack_before_fsync: false,
            max_commit_records: 1000,
            max_queued_commands: 2,
            sinks: Vec::new(),
        })
        .unwrap()
    }

    fn body(seq: Seq) -> Vec<u8> {
        let mut readings = Readings::new();
        let name = proto::Name::new("v").unwrap();
        readings
            .push(Reading::new(name, Value::U64(u64::from(seq))))
            .unwrap();
        let msg = Uplink::Telemetry(Telemetry {
            seq,
            time_ms: None,
            readings,
        });
        let mut buf = [0u8; 64];
        let n = proto::encode(&msg, &mut buf).unwrap();
        buf[2..n].to_vec()
    }

    async fn session(store: &Store, device: &str, boot: u64) -> Opened {
        store
            .open_session(SessionInfo {
                device: device.into(),
                cert_serial: "01".into(),
                cert_not_after: 0,
                firmware: "fw".into(),
                peer_addr: "127.0.0.1:1".into(),
                boot_id: boot,
            })
            .await
            .unwrap()
    }

    async fn insert(
        store: &Store,
        o: Opened,
        boot: u64,
        seqs: std::ops::RangeInclusive<Seq>,
        received_ms: i64,
    ) -> usize {
        let mut batch = Batch::new(o.device_key, boot);
        batch.received_ms = received_ms;
        for s in seqs {
            batch.push(s, received_ms, &body(s));
        }
        let done = store.submit(batch).await.unwrap().await.unwrap();
        done.result.unwrap()
    }

    #[tokio::test]
    async fn duplicates_are_ignored_and_last_acked_follows() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let o = session(&store, "d1", u64::MAX).await;
        assert_eq!(o.last_acked, None);
        assert_eq!(insert(&store, o, u64::MAX, 1..=10, now_ms()).await, 10);
        assert_eq!(insert(&store, o, u64::MAX, 5..=12, now_ms()).await, 2);
        let o2 = session(&store, "d1", u64::MAX).await;
        assert_eq!(o2.last_acked, Some(12));
        assert_eq!(o2.device_key, o.device_key);
        let recs = store
            .telemetry("d1", TelemetryQuery::default())
            .await
            .unwrap();
        assert_eq!(recs.len(), 12);
        assert_eq!(recs[0].boot_id, u64::MAX, "boot ids survive the i64 column");
        assert_eq!(recs.iter().find(|r| r.seq == 7).unwrap().values["v"], 7);
        writer.stop(&store).await;
        assert!(matches!(store.flush().await, Err(StoreError::Closed)));
    }

    /// A writer on a fresh file, with sessions open for `devices` (their keys).
    fn writer_with(devices: &[&str]) -> (tempfile::TempDir, Writer, Vec<i64>) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer_connection(&dir.path().join("t.sqlite"), false).unwrap();
        let mut w = Writer {
            conn,
            synchronous_full: true,
            max_commit_records: 1000,
            max_queued_commands: 10,
            sinks: Vec::new(),
            health: Arc::new(StoreHealth::default()),
            commits: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let keys = devices
            .iter()
            .map(|d| {
                let info = SessionInfo {
                    device: (*d).into(),
                    cert_serial: "01".into(),
                    cert_not_after: 0,
                    firmware: "fw".into(),
                    peer_addr: "127.0.0.1:1".into(),
                    boot_id: 1,
                };
                w.open_session(&info, 0).unwrap().device_key
            })
            .collect();
        (dir, w, keys)
    }

    fn batch_of(key: i64, n: Seq, size: usize) -> Box<Batch> {
        let mut b = Batch::new(key, 1);
        for seq in 1..=n {
            b.push(seq, 0, &vec![0u8; size]);
        }
        b
    }

    fn rows_of(w: &Writer, key: i64) -> i64 {
        w.conn
            .query_row(
                "SELECT count(*) FROM telemetry WHERE device = ?1",
                [key],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// Commits three batches as one group; returns their results.
    fn commit_three(
        w: &mut Writer,
        batches: [Box<Batch>; 3],
    ) -> Vec<Result<usize, Arc<StoreError>>> {
        let mut rxs = Vec::new();
        let mut ops = Vec::new();
        for b in batches {
            let (tx, rx) = oneshot::channel();
            ops.push(Op::Telemetry(b, tx));
            rxs.push(rx);
        }
        w.commit_group(&mut ops);
        rxs.into_iter()
            .map(|mut rx| rx.try_recv().unwrap().result)
            .collect()
    }

    /// One op of a group fails part-way (a trigger refuses its 100th record): it is
    /// undone alone and answers its error; the ops before and after it in the same
    /// transaction are kept and answer success.
    #[test]
    fn an_op_that_fails_part_way_is_undone_alone() {
        let (_dir, mut w, keys) = writer_with(&["a", "b", "c"]);
        w.conn
            .execute_batch(&format!(
                "CREATE TRIGGER inject BEFORE INSERT ON telemetry
                  WHEN NEW.device = {} AND NEW.seq = 100
                  BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
                keys[1]
            ))
            .unwrap();
        let out = commit_three(
            &mut w,
            [
                batch_of(keys[0], 1, 10),
                batch_of(keys[1], 200, 10),
                batch_of(keys[2], 1, 10),
            ],
        );
        assert_eq!(*out[0].as_ref().unwrap(), 1);
        assert!(out[1].is_err(), "a batch not stored is never answered done");
        assert_eq!(*out[2].as_ref().unwrap(), 1);
        let rows: Vec<i64> = keys.iter().map(|k| rows_of(&w, *k)).collect();
        assert_eq!(
            rows,
            [1, 0, 1],
            "none of the failed batch, all of the others"
        );
        let mark: Option<i64> = w
            .conn
            .query_row(
                "SELECT last_seq FROM boots WHERE device = ?1",
                [keys[1]],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        assert_eq!(mark, None, "the failed batch raised no high-water mark");
        assert!(
            w.health.failing().is_some(),
            "the store reports it is failing"
        );
    }

    /// The file reaches its size limit in the middle of a group: SQLite gives up the
    /// whole transaction, so every op of the group answers the failure (none is acked,
    /// none is stored), and the store reports it until a commit succeeds again.
    #[test]
    fn a_full_disk_fails_the_whole_group_and_acks_nothing() {
        let (_dir, mut w, keys) = writer_with(&["a", "b", "c"]);
        let pages: i64 = w
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        w.conn
            .pragma_update(None, "max_page_count", pages + 2)
            .unwrap();
        let out = commit_three(
            &mut w,
            [
                batch_of(keys[0], 1, 10),
                // ~200 KB: far past two free pages.
                batch_of(keys[1], 200, 1000),
                batch_of(keys[2], 1, 10),
            ],
        );
        assert!(out.iter().all(Result::is_err), "{out:?}");
        let rows: Vec<i64> = keys.iter().map(|k| rows_of(&w, *k)).collect();
        assert_eq!(rows, [0, 0, 0]);
        assert!(w.health.failing().is_some());

        // Room again. A one-page update does not show that telemetry can be stored
        // again; the next commit of telemetry does.
        w.conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        w.commit_group(&mut vec![Op::CloseSession {
            device_key: keys[0],
            now_ms: 1,
        }]);
        assert!(w.health.failing().is_some(), "still failing for telemetry");
        let out = commit_three(
            &mut w,
            [
                batch_of(keys[0], 1, 10),
                batch_of(keys[1], 200, 1000),
                batch_of(keys[2], 1, 10),
            ],
        );
        assert_eq!(
            out.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            [1, 200, 1]
        );
        assert!(w.health.failing().is_none());
    }

    #[tokio::test]
    async fn a_store_from_before_boots_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sqlite");
        {
            // The old layout: deduplication by a unique index over every record.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE devices(key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
                    first_seen_ms INTEGER, last_seen_ms INTEGER,
                    online INTEGER NOT NULL DEFAULT 0, cert_serial TEXT, cert_not_after INTEGER,
                    firmware TEXT, peer_addr TEXT, boot_id INTEGER,
                    connects INTEGER NOT NULL DEFAULT 0);
                 CREATE TABLE telemetry(device INTEGER NOT NULL, boot_id INTEGER NOT NULL,
                    seq INTEGER NOT NULL, time_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
                    body BLOB NOT NULL);
                 CREATE UNIQUE INDEX telemetry_key ON telemetry(device, boot_id, seq);
                 INSERT INTO devices(key, id, boot_id) VALUES (1, 'old', 7);",
            )
            .unwrap();
            for seq in 1..=5 {
                c.execute(
                    "INSERT INTO telemetry VALUES (1, 7, ?1, 0, 0, ?2)",
                    params![seq, body(seq)],
                )
                .unwrap();
            }
        }
        // Opened twice: the migration runs once and the marks keep moving.
        for (acked, new) in [(5, 1), (6, 0)] {
            let (store, writer) = open(dir.path());
            let o = session(&store, "old", 7).await;
            assert_eq!(o.last_acked, Some(acked), "the high-water mark came over");
            assert_eq!(insert(&store, o, 7, 4..=6, now_ms()).await, new);
            writer.stop(&store).await;
        }
        let c = Connection::open(&path).unwrap();
        let index: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'telemetry_key'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 0, "the unique index is gone");
        let rows: i64 = c
            .query_row("SELECT count(*) FROM telemetry", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 6);
    }

    async fn prune_by_age(store: &Store, age: Duration) -> u64 {
        store
            .apply_retention(Some(age), None)
            .await
            .unwrap()
            .deleted
    }

    /// A store with the `mqtt` sink running.
    fn open_with_sink(dir: &Path, drop_undelivered: bool) -> (Store, WriterThread) {
        Store::open(StoreOptions {
            path: dir.join("t.sqlite"),
            danger_ack_before_fsync: false,
            max_commit_records: 1000,
            max_queued_commands: 2,
            sinks: vec![SinkSpec {
                name: "mqtt",
                drop_undelivered,
            }],
        })
        .unwrap()
    }

    #[tokio::test]
    async fn retention_keeps_what_a_sink_has_not_delivered_and_the_newest_row() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open_with_sink(dir.path(), false);
        let day = Duration::from_secs(86_400);
        let o = session(&store, "r1", 1).await;
        let start = store.open_sink("mqtt").await.unwrap();
        insert(&store, o, 1, 1..=10, now_ms() - 3 * 86_400_000).await;
        // All old, none delivered: none deleted.
        assert_eq!(prune_by_age(&store, day).await, 0);
        assert_eq!(
            store.apply_retention(None, Some(1)).await.unwrap().deleted,
            0
        );
        // Four delivered: those four may go.
        let rows = store.telemetry_after(start, 4).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        store.set_sink_cursor("mqtt", rows[3].row).await.unwrap();
        assert_eq!(prune_by_age(&store, day).await, 4);
        // All delivered: all but the newest row, which keeps rowids growing.
        let rest = store.telemetry_after(rows[3].row, 100).await.unwrap();
        assert_eq!(rest.len(), 6);
        store.set_sink_cursor("mqtt", rest[5].row).await.unwrap();
        assert_eq!(prune_by_age(&store, day).await, 5);
        assert_eq!(store.telemetry_count(None).await.unwrap(), 1);
        // The next record gets a rowid after the cursor.
        insert(&store, o, 1, 11..=11, now_ms()).await;
        let next = store.telemetry_after(rest[5].row, 10).await.unwrap();
        assert_eq!(next.iter().map(|r| r.seq).collect::<Vec<_>>(), [11]);
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn retention_may_drop_what_a_sink_has_not_delivered_when_told_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open_with_sink(dir.path(), true);
        let o = session(&store, "r2", 1).await;
        let start = store.open_sink("mqtt").await.unwrap();
        insert(&store, o, 1, 1..=10, now_ms() - 3 * 86_400_000).await;
        let rows = store.telemetry_after(start, 3).await.unwrap();
        store.set_sink_cursor("mqtt", rows[2].row).await.unwrap();
        // Three delivered, seven not: all but the newest go, six of them undelivered.
        let pruned = store
            .apply_retention(Some(Duration::from_secs(86_400)), None)
            .await
            .unwrap();
        assert_eq!(
            pruned,
            Pruned {
                deleted: 9,
                undelivered: 6
            }
        );
        let left = store.telemetry_after(rows[2].row, 100).await.unwrap();
        assert_eq!(left.iter().map(|r| r.seq).collect::<Vec<_>>(), [10]);
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn retention_forgets_past_boots_but_not_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let day = 86_400_000;
        let old = session(&store, "d4", 1).await;
        insert(&store, old, 1, 1..=3, now_ms() - 3 * day).await;
        let cur = session(&store, "d4", 2).await;
        insert(&store, cur, 2, 1..=3, now_ms() - 3 * day).await;
        store
            .apply_retention(Some(Duration::from_secs(86_400)), None)
            .await
            .unwrap();
        assert_eq!(store.telemetry_count(Some("d4")).await.unwrap(), 0);
        // The current boot still knows what it stored; the past one starts afresh.
        assert_eq!(session(&store, "d4", 2).await.last_acked, Some(3));
        assert_eq!(session(&store, "d4", 1).await.last_acked, None);
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn retention_by_age_and_by_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let o = session(&store, "d2", 1).await;
        let day = 86_400_000;
        insert(&store, o, 1, 1..=100, now_ms() - 3 * day).await;
        insert(&store, o, 1, 101..=150, now_ms()).await;
        let deleted = store
            .apply_retention(Some(Duration::from_secs(86_400)), None)
            .await
            .unwrap()
            .deleted;
        assert_eq!(deleted, 100);
        assert_eq!(store.telemetry_count(Some("d2")).await.unwrap(), 50);
        let deleted = store.apply_retention(None, Some(20)).await.unwrap().deleted;
        assert_eq!(deleted, 30);
        let left = store
            .telemetry("d2", TelemetryQuery::default())
            .await
            .unwrap();
        let mut seqs: Vec<_> = left.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (131..=150).collect::<Vec<_>>(),
            "the newest rows stay"
        );
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn command_queue_lifecycle_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let args = vec![("x".to_string(), values::OwnedValue::U64(1))];
        let a = store
            .enqueue_command(
                "d3",
                "a",
                args.clone(),
                Duration::from_secs(60),
                Route::Local,
            )
            .await
            .unwrap();
        let b = store
            .enqueue_command("d3", "b", vec![], Duration::ZERO, Route::Local)
            .await
            .unwrap();
        // The per-device limit is 2.
        assert!(matches!(
            store
                .enqueue_command("d3", "c", vec![], Duration::from_secs(60), Route::Local)
                .await,
            Err(StoreError::QueueFull { .. })
        ));
        let expired = store.expire_commands().await.unwrap();
        assert_eq!(expired.iter().map(|c| c.id).collect::<Vec<_>>(), vec![b.id]);
        let o = session(&store, "d3", 1).await;
        let out = store.take_commands(o.device_key, 10, true).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, a.id);
        assert_eq!(out[0].args, args);
        // Sent and unanswered: only a new session (include_sent) takes it again.
        assert!(
            store
                .take_commands(o.device_key, 10, false)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store
                .take_commands(o.device_key, 10, true)
                .await
                .unwrap()
                .len(),
            1
        );
        let done = store
            .finish_command(
                o.device_key,
                a.id,
                CommandState::Succeeded,
                Some("succeeded".into()),
                Some(serde_json::json!({"ok": true})),
                None,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.state, CommandState::Succeeded);
        assert_eq!(done.attempts, 2);
        // A second result for a finished command changes nothing.
        let again = store
            .finish_command(o.device_key, a.id, CommandState::Failed, None, None, None)
            .await
            .unwrap();
        assert!(again.is_none());
        writer.stop(&store).await;
    }
}
