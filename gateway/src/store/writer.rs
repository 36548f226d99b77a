//! The writer thread: takes every queued operation, applies each in a savepoint of its
//! own inside one transaction, commits once (one fsync for everything queued), then
//! answers each. One kind of operation is typed, telemetry (the hot path); every
//! other one is a closure on the writer ([`Op::Write`]), so adding an operation
//! touches one place: the file of its concept.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::batch::insert_batch;
use super::{Batch, BatchDone, SinkSpec, StoreError, StoreHealth};

/// What the writer is asked to do.
pub(super) enum Op {
    /// A session's telemetry.
    Telemetry(Box<Batch>, oneshot::Sender<BatchDone>),
    /// Anything else: run in its own savepoint in the next group commit, its answer
    /// (in the [`Pending`] it returns) held until that commits. Called with `None`
    /// when the writer refuses it. `fsync: false`: a group made only of such
    /// operations commits without an fsync (see `Store::take_commands`).
    Write { f: WriteFn, fsync: bool },
    /// A session's opening, recorded in the device's row: an fsync-free write that
    /// nobody waits for (the session runs on from memory, see `Store::open_session`).
    /// A group of nothing else lingers for more ([`OPEN_LINGER`]).
    Open(WriteFn),
    /// Commit what is queued before it, then stop the writer.
    Stop,
}

/// How long a group of nothing but session opens waits for more before it commits.
/// Nobody waits for these; without it a connect storm woke the writer and committed
/// every few connects, at a fifth of the CPU a connect cost (docs/BENCHMARKS.md).
/// Telemetry that comes meanwhile waits as long, at most.
const OPEN_LINGER: Duration = Duration::from_millis(2);

pub(super) type WriteFn = Box<dyn FnOnce(Option<&Writer>) -> (Pending, OpOutcome) + Send>;

pub(super) struct Writer {
    pub(super) conn: Connection,
    /// `synchronous=FULL` (not `danger_ack_before_fsync`).
    pub(super) synchronous_full: bool,
    /// The mode the connection is in now: FULL, or NORMAL since the last group of
    /// fsync-free operations (switched back only when a group needs FULL, so that a
    /// run of such groups, e.g. a connect storm's session opens, parses no `PRAGMA`).
    pub(super) synchronous_now: bool,
    pub(super) max_commit_records: usize,
    pub(super) max_queued_commands: usize,
    /// Sinks that run: retention keeps what they have not delivered, unless told not to.
    pub(super) sinks: Vec<SinkSpec>,
    pub(super) health: Arc<StoreHealth>,
    pub(super) commits: Arc<tokio::sync::watch::Sender<u64>>,
    pub(super) directory: Arc<super::directory::Directory>,
}

/// What to do once the transaction holding an op has committed (or failed).
pub(super) enum Pending {
    /// A telemetry batch and what inserting it gave (its own error, if it failed).
    Batch(
        Box<Batch>,
        Result<usize, Arc<StoreError>>,
        oneshot::Sender<BatchDone>,
    ),
    Reply(Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>),
}

/// How one op went inside its savepoint.
pub(super) enum OpOutcome {
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
    pub(super) fn of<T>(r: &Result<T, StoreError>) -> Self {
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
/// checkpoints only); returns whether it did. A failure leaves the previous mode,
/// which is only slower or, for NORMAL, as durable as the next FULL commit. (Not a
/// cached statement: SQLite applies this pragma when it compiles it, not when it runs.)
fn set_synchronous(conn: &Connection, full: bool) -> bool {
    let mode = if full { "FULL" } else { "NORMAL" };
    match conn.pragma_update(None, "synchronous", mode) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, mode, "store could not set synchronous");
            false
        }
    }
}

/// Runs one of the transaction's fixed statements (`BEGIN IMMEDIATE`, `COMMIT`,
/// `ROLLBACK`) from the statement cache: `execute_batch` would parse it again at every
/// group commit, a cost paid per connect in a connect storm.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// An op's answer, held back until its transaction commits: an answer must never claim
/// something that a failed commit then lost.
pub(super) fn after<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, StoreError>>,
    value: Result<T, StoreError>,
) -> (Pending, OpOutcome) {
    let outcome = OpOutcome::of(&value);
    let pending = Pending::Reply(Box::new(move |committed| {
        let out = match committed {
            Ok(()) => value,
            Err(e) => Err(StoreError::CommitFailed(e)),
        };
        let _ = reply.send(out);
    }));
    (pending, outcome)
}

impl Pending {
    /// Nothing to answer.
    pub(super) fn nothing() -> Self {
        Pending::Reply(Box::new(|_| {}))
    }
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
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
            self.take_queued(&mut rx, &mut ops, &mut records);
            if ops.iter().all(|op| matches!(op, Op::Open(_))) {
                thread::sleep(OPEN_LINGER);
                self.take_queued(&mut rx, &mut ops, &mut records);
            }
            stop = matches!(ops.last(), Some(Op::Stop));
            self.commit_group(&mut ops);
        }
        self.health
            .set_failing("the store's writer has stopped".into(), true);
    }

    /// Moves what is queued into `ops`, up to the group's record limit or a `Stop`.
    fn take_queued(&self, rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>, records: &mut usize) {
        while *records < self.max_commit_records && !matches!(ops.last(), Some(Op::Stop)) {
            match rx.try_recv() {
                Ok(op) => {
                    if let Op::Telemetry(b, _) = &op {
                        *records += b.records.len();
                    }
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
    }

    /// Applies `ops` in one transaction, each inside a savepoint of its own, commits
    /// once, then answers each. An op that fails is undone alone and answers its error;
    /// the others keep their work. If SQLite gives up the whole transaction, or the
    /// commit fails, every op answers the failure: nothing is ever answered as done
    /// that a failure then lost.
    pub(super) fn commit_group(&mut self, ops: &mut Vec<Op>) {
        // A group of nothing but command hand-outs needs no fsync (at-least-once
        // delivery, see `apply`): in WAL mode a commit without one becomes durable
        // with the next commit that has one. It keeps the fsync off a command's
        // round trip, where the result's commit would otherwise queue behind it.
        let relaxed = self.synchronous_full
            && ops
                .iter()
                .all(|op| matches!(op, Op::Write { fsync: false, .. } | Op::Open(_)));
        // Switch only when the mode must change: a NORMAL left behind by the last
        // relaxed group stays until a group that needs its fsync comes.
        let want_full = self.synchronous_full && !relaxed;
        if want_full != self.synchronous_now && set_synchronous(&self.conn, want_full) {
            self.synchronous_now = want_full;
        }
        let changes_before = self.conn.total_changes();
        let has_telemetry = ops.iter().any(|op| matches!(op, Op::Telemetry(..)));
        let mut pending: Vec<Pending> = Vec::with_capacity(ops.len());
        // The first failed op, and whether a telemetry op failed / succeeded.
        let mut op_failure: Option<String> = None;
        let (mut telemetry_failed, mut telemetry_done) = (false, false);
        let committed = match run_cached(&self.conn, "BEGIN IMMEDIATE") {
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
                        let _ = run_cached(&self.conn, "ROLLBACK");
                        Err(e)
                    }
                    None => run_cached(&self.conn, "COMMIT").map_err(|e| {
                        tracing::error!(error = %e, "store commit failed");
                        let _ = run_cached(&self.conn, "ROLLBACK");
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
                    // Every record of a stored batch is in the file now (new, or a
                    // duplicate of one stored before): the boot's mark may rise.
                    if result.is_ok()
                        && let Some(high) = batch.records.iter().map(|r| r.seq).max()
                    {
                        self.directory.stored(batch.device_key, batch.boot_id, high);
                    }
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
            *lost = Some(Arc::new(StoreError::RolledBack));
        }
        (pending, outcome)
    }

    /// An op that was not applied: its reply carries the failure of its group.
    fn refuse(op: Op) -> Pending {
        match op {
            Op::Telemetry(b, reply) => Pending::Batch(b, Ok(0), reply),
            Op::Write { f, .. } | Op::Open(f) => f(None).0,
            Op::Stop => Pending::nothing(),
        }
    }

    /// Applies one op inside the open transaction; its reply waits for the commit.
    fn apply(&mut self, op: Op) -> (Pending, OpOutcome) {
        match op {
            Op::Telemetry(mut batch, reply) => match insert_batch(&self.conn, &mut batch) {
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
            Op::Write { f, .. } | Op::Open(f) => f(Some(self)),
            Op::Stop => (Pending::nothing(), OpOutcome::Done),
        }
    }
}
