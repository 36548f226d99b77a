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
//!
//! One concept per file:
//!
//! ```text
//!  mod.rs        the handle (Store), opening, the calls into the writer and the readers
//!  writer.rs     the writer thread: group commit, savepoints, answers after the commit
//!  batch.rs      telemetry batches (the hot path) and their insert
//!  chunk.rs      a chunk of records: its layout and cut rules (docs/STORE.md)
//!  directory.rs  devices in memory: id → key, the current boot's mark (opens skip the writer)
//!  records.rs    devices and telemetry as read back, and their queries
//!  devices.rs    sessions opening and closing, registration, groups, refusals
//!  commands.rs   the command queue and its lifecycle
//!  sinks.rs      cursors of the northbound sinks
//!  retention.rs  deleting old telemetry
//!  fleet.rs      commands across a fleet
//!  schema.rs     schema, migrations, file permissions
//!  error.rs      errors and health
//! ```
//!
//! Adding an operation: a method on [`Store`] in its concept's file that calls
//! `write` (a closure on the writer's connection, answered after the commit) or `read`
//! (a closure on a read-only connection).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

mod batch;
pub(crate) mod chunk;
mod commands;
mod devices;
mod directory;
mod error;
mod firmware;
mod fleet;
mod records;
mod retention;
mod schema;
mod sinks;
mod state;
#[cfg(test)]
mod tests;
mod writer;

pub use batch::{Batch, BatchDone, TrySubmit};
pub use commands::{Cancel, CommandRecord, CommandState, OutgoingCommand, state_for};
pub use devices::{OpenRecorded, Opened, SessionInfo};
pub use error::{Failing, StoreError, StoreHealth};
pub use firmware::{FirmwareKey, RolloutRow, RolloutWrite};
pub use fleet::{Handoff, Route, slot_of};
pub use records::{
    DeviceRecord, RefusalRecord, SinkRecord, TelemetryCursor, TelemetryQuery, TelemetryRecord,
    body_to_json,
};
pub use retention::Pruned;
use schema::{open_writer_connection, private_dir, private_files};
pub use state::{PutDesired, StateView};
use writer::{Op, OpOutcome, Pending, Writer, after};

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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

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
    /// Devices and their current boots, for opening sessions without the writer.
    directory: Arc<directory::Directory>,
    /// Session opens sent to the writer and done: reads of devices wait for the ones
    /// sent before them ([`Store::opens_settled`]).
    opens: Arc<Opens>,
    /// Desired and reported state versions per device, so that a session opening
    /// costs no store work for the state document when nothing changed (state.rs).
    state_versions: Arc<state::Versions>,
}

/// Session opens the writer has been sent, and has applied (committed or failed).
#[derive(Debug, Default)]
pub(super) struct Opens {
    pub(super) sent: std::sync::atomic::AtomicU64,
    pub(super) done: tokio::sync::watch::Sender<u64>,
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
        let directory = Arc::new(directory::Directory::load(&conn)?);
        let state_versions = Arc::new(state::Versions::load(&conn)?);
        let opens = Arc::new(Opens::default());
        let writer = Writer {
            commits: commits.clone(),
            directory: directory.clone(),
            conn,
            synchronous_full: !opts.danger_ack_before_fsync,
            synchronous_now: !opts.danger_ack_before_fsync,
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
                directory,
                opens,
                state_versions,
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

    /// Queues an op for the writer.
    async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::Closed)
    }

    /// Runs `f` on the writer's connection in the next group commit (in a savepoint of
    /// its own) and answers once that commits.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_with(move |w| f(&w.conn)).await
    }

    /// [`write`](Self::write) with the writer's settings too.
    async fn write_with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Writer) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_op(true, f).await
    }

    /// [`write_with`](Self::write_with); with `fsync` false, a group made only of such
    /// writes commits without an fsync: it becomes durable with the next commit that
    /// has one (WAL order), which is all that metadata nobody was promised needs.
    async fn write_op<T: Send + 'static>(
        &self,
        fsync: bool,
        f: impl FnOnce(&Writer) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Write {
            fsync,
            f: Box::new(move |w| match w {
                Some(w) => after(reply, f(w)),
                None => after(reply, Err(StoreError::Closed)),
            }),
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Waits until everything queued before this call is committed (or its commit
    /// failed).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Write {
            fsync: true,
            f: Box::new(move |_| {
                let done = Pending::Reply(Box::new(move |_| {
                    let _ = reply.send(());
                }));
                (done, OpOutcome::Done)
            }),
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        // Every read sees the devices whose sessions opened before it (their rows are
        // written after their `Welcome`, see `open_session`).
        self.opens_settled().await;
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
                    c.set_prepared_statement_cache_capacity(schema::STATEMENT_CACHE);
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
