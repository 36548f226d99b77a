//! The store's tests: group commit and its failures, migration, commands, paging; retention
//! in `retention.rs`.

mod retention;

use std::path::Path;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use device_client::proto::{self, Reading, Readings, Seq, Telemetry, Uplink, Value};
use rusqlite::{OptionalExtension, params};
use tokio::sync::oneshot;

use super::devices::{close_session_op, record_open};
use super::schema::open_writer_connection;
use super::writer::{Op, OpOutcome, Pending, Writer};
use super::*;
use crate::values;

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

/// Opens a session; the receiver gets what the writer's commit of it found.
async fn session_told(
    store: &Store,
    device: &str,
    boot: u64,
) -> (Opened, oneshot::Receiver<OpenRecorded>) {
    let (tx, rx) = oneshot::channel();
    let info = SessionInfo {
        device: device.into(),
        cert_serial: "01".into(),
        cert_not_after: 0,
        firmware: "fw".into(),
        peer_addr: "127.0.0.1:1".into(),
        boot_id: boot,
    };
    let o = store
        .open_session(info, move |r| {
            let _ = tx.send(r);
        })
        .await
        .unwrap();
    (o, rx)
}

async fn session(store: &Store, device: &str, boot: u64) -> Opened {
    session_told(store, device, boot).await.0
}

async fn insert(
    store: &Store,
    o: Opened,
    boot: u64,
    seqs: std::ops::RangeInclusive<Seq>,
    received_ms: i64,
) -> usize {
    insert_spaced(store, o, boot, seqs, received_ms, 0).await
}

/// [`insert`] with record `s` at device time `received_ms + s * spacing_ms`.
async fn insert_spaced(
    store: &Store,
    o: Opened,
    boot: u64,
    seqs: std::ops::RangeInclusive<Seq>,
    received_ms: i64,
    spacing_ms: i64,
) -> usize {
    let mut batch = Batch::new(o.device_key, boot);
    batch.received_ms = received_ms;
    for s in seqs {
        batch.push(s, received_ms + i64::from(s) * spacing_ms, &body(s));
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

/// A session opens from memory; the device's row is written later. A read of devices
/// still shows it at once (it waits for the opens sent before it), and the commit
/// that records it says whether commands wait.
#[tokio::test]
async fn a_session_opens_from_memory_and_reads_see_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    for i in 0..50 {
        let (o, rx) = session_told(&store, &format!("d{i}"), 1).await;
        let d = store.device(&format!("d{i}")).await.unwrap();
        let d = d.expect("a device whose session opened is in the store");
        assert!(d.online);
        assert_eq!(d.boot_id, Some(1));
        assert_eq!(rx.await.unwrap(), OpenRecorded::Done);
        if i == 0 {
            // A command queued while offline is announced by the next open.
            store.close_session(o.device_key).await.unwrap();
            store
                .enqueue_command(
                    "d0",
                    "c",
                    values::OwnedReadings::default(),
                    Duration::from_secs(60),
                    Route::Local,
                )
                .await
                .unwrap();
            let (o2, rx) = session_told(&store, "d0", 2).await;
            assert_eq!(o2.device_key, o.device_key);
            assert_eq!(rx.await.unwrap(), OpenRecorded::CommandsWaiting);
        }
    }
    writer.stop(&store).await;
    // An open the stopped writer never gets is counted done, so reads (which do not
    // need the writer) do not wait for it.
    let info = SessionInfo {
        device: "late".into(),
        cert_serial: "01".into(),
        cert_not_after: 0,
        firmware: "fw".into(),
        peer_addr: "127.0.0.1:1".into(),
        boot_id: 1,
    };
    let late = store.open_session(info, |_| {}).await;
    assert!(matches!(late, Err(StoreError::Closed)), "{late:?}");
    assert_eq!(
        *store.opens.done.borrow(),
        store.opens.sent.load(std::sync::atomic::Ordering::Acquire)
    );
}

/// `last_acked` comes from memory: it follows commits, starts again with a new boot,
/// is read from the file for a boot that is not the last one and after a restart, and
/// a deleted device comes back under a new key with nothing claimed.
#[tokio::test]
async fn last_acked_from_memory_follows_commits_boots_restarts_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let o = session(&store, "d1", 7).await;
    assert_eq!(insert(&store, o, 7, 1..=10, now_ms()).await, 10);
    assert_eq!(session(&store, "d1", 7).await.last_acked, Some(10));
    assert_eq!(session(&store, "d1", 8).await.last_acked, None);
    let o8 = session(&store, "d1", 8).await;
    assert_eq!(insert(&store, o8, 8, 1..=3, now_ms()).await, 3);
    // Back to boot 7 (a device should not, but may): its mark is read from the file.
    let back = session(&store, "d1", 7).await;
    assert_eq!(back.last_acked, Some(10));
    assert_eq!(insert(&store, back, 7, 1..=11, now_ms()).await, 1);
    assert_eq!(session(&store, "d1", 7).await.last_acked, Some(11));
    writer.stop(&store).await;

    let (store, writer) = open(dir.path());
    let o = session(&store, "d1", 7).await;
    assert_eq!(o.last_acked, Some(11), "read back from the file");
    store.close_session(o.device_key).await.unwrap();
    assert!(store.delete_device("d1").await.unwrap());
    let fresh = session(&store, "d1", 7).await;
    assert_ne!(fresh.device_key, o.device_key);
    assert_eq!(fresh.last_acked, None);
    assert_eq!(insert(&store, fresh, 7, 1..=2, now_ms()).await, 2);
    let recs = store
        .telemetry("d1", TelemetryQuery::default())
        .await
        .unwrap();
    assert_eq!(recs.len(), 2);
    writer.stop(&store).await;
}

/// A device row written behind the gateway's back under the key it would give next:
/// that device's open fails (and says so); the next device is not hurt.
#[tokio::test]
async fn a_key_taken_behind_the_gateways_back_fails_only_that_open() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let first = session(&store, "d1", 1).await;
    {
        let c = rusqlite::Connection::open(dir.path().join("t.sqlite")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c.execute(
            "INSERT INTO devices(key, id) VALUES (?1, 'intruder')",
            [first.device_key + 1],
        )
        .unwrap();
    }
    let (_, rx) = session_told(&store, "d2", 1).await;
    assert_eq!(rx.await.unwrap(), OpenRecorded::Failed);
    let d3 = session(&store, "d3", 1).await;
    assert!(store.device("d3").await.unwrap().unwrap().online);
    assert_eq!(insert(&store, d3, 1, 1..=3, now_ms()).await, 3);
    assert_eq!(
        store.device("intruder").await.unwrap().unwrap().connects,
        0,
        "the other row is left as it was"
    );
    writer.stop(&store).await;
}

/// A writer on a fresh file, with sessions open for `devices` (their keys).
fn writer_with(devices: &[&str]) -> (tempfile::TempDir, Writer, Vec<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let conn = open_writer_connection(&dir.path().join("t.sqlite"), false).unwrap();
    let w = Writer {
        conn,
        synchronous_full: true,
        synchronous_now: true,
        max_commit_records: 1000,
        max_queued_commands: 10,
        sinks: Vec::new(),
        health: Arc::new(StoreHealth::default()),
        commits: Arc::new(tokio::sync::watch::Sender::new(0)),
        directory: Arc::new(super::directory::Directory::default()),
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
            let (key, _) = w.directory.open(d, 1);
            record_open(&w, key, &info, 0).unwrap();
            key
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
            "SELECT coalesce(sum(n), 0) FROM chunks WHERE device = ?1",
            [key],
            |r| r.get(0),
        )
        .unwrap()
}

/// Commits three batches as one group; returns their results.
fn commit_three(w: &mut Writer, batches: [Box<Batch>; 3]) -> Vec<Result<usize, Arc<StoreError>>> {
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

/// An op that reads the writer connection's `PRAGMA synchronous` (1 NORMAL, 2 FULL)
/// inside its group and sends it on `modes`.
fn read_mode(fsync: bool, modes: &std::sync::mpsc::Sender<i64>) -> Op {
    let modes = modes.clone();
    Op::Write {
        f: Box::new(move |w| {
            let w = w.expect("the writer runs the op");
            let mode = w
                .conn
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap();
            modes.send(mode).unwrap();
            (Pending::nothing(), OpOutcome::Done)
        }),
        fsync,
    }
}

/// Groups of fsync-free ops (session opens, command hand-outs) commit with
/// `synchronous=NORMAL`, and the mode stays NORMAL across a run of them (no `PRAGMA`
/// per group); the first group that holds telemetry or an op that needs its fsync
/// commits with FULL again.
#[test]
fn only_fsync_free_groups_commit_without_fsync() {
    let (_dir, mut w, keys) = writer_with(&["a"]);
    let (tx, modes) = std::sync::mpsc::channel();
    let group = |w: &mut Writer, ops: Vec<Op>| {
        let mut ops = ops;
        w.commit_group(&mut ops);
        modes.try_iter().collect::<Vec<i64>>()
    };
    assert_eq!(group(&mut w, vec![read_mode(false, &tx)]), [1]);
    assert_eq!(
        group(&mut w, vec![read_mode(false, &tx), read_mode(false, &tx)]),
        [1, 1]
    );
    assert_eq!(
        group(&mut w, vec![read_mode(false, &tx), read_mode(true, &tx)]),
        [2, 2]
    );
    assert_eq!(group(&mut w, vec![read_mode(false, &tx)]), [1]);
    let (reply, _done) = oneshot::channel();
    let telemetry = Op::Telemetry(batch_of(keys[0], 3, 8), reply);
    assert_eq!(group(&mut w, vec![read_mode(false, &tx), telemetry]), [2]);
    assert_eq!(rows_of(&w, keys[0]), 3);
}

/// One op of a group fails part-way (a trigger refuses its second chunk): it is
/// undone alone and answers its error; the ops before and after it in the same
/// transaction are kept and answer success.
#[test]
fn an_op_that_fails_part_way_is_undone_alone() {
    let (_dir, mut w, keys) = writer_with(&["a", "b", "c"]);
    w.conn
        .execute_batch(&format!(
            "CREATE TRIGGER inject BEFORE INSERT ON chunks
              WHEN NEW.device = {} AND NEW.n < {}
              BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
            keys[1],
            chunk::MAX_RECORDS
        ))
        .unwrap();
    let out = commit_three(
        &mut w,
        [
            batch_of(keys[0], 1, 10),
            // Two chunks: a full one, then one of 88 records that the trigger refuses.
            batch_of(keys[1], chunk::MAX_RECORDS as Seq + 88, 10),
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
    w.commit_group(&mut vec![close_session_op(keys[0], 1)]);
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

/// The devices and telemetry tables as the store made them before chunks.
const OLD_TABLES: &str = "CREATE TABLE devices(key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
        first_seen_ms INTEGER, last_seen_ms INTEGER,
        online INTEGER NOT NULL DEFAULT 0, cert_serial TEXT, cert_not_after INTEGER,
        firmware TEXT, peer_addr TEXT, boot_id INTEGER,
        connects INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE telemetry(device INTEGER NOT NULL, boot_id INTEGER NOT NULL,
        seq INTEGER NOT NULL, time_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
        body BLOB NOT NULL);";

#[tokio::test]
async fn a_store_from_before_boots_is_migrated_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite");
    {
        // The old layout: deduplication by a unique index over every record.
        let c = Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "{OLD_TABLES}
             CREATE UNIQUE INDEX telemetry_key ON telemetry(device, boot_id, seq);
             INSERT INTO devices(key, id, boot_id) VALUES (1, 'old', 7);"
        ))
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
        .query_row("SELECT sum(n) FROM chunks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 6);
}

/// A store from before chunks (one row per record) is moved into chunks at open: every
/// record keeps its row number, so a sink goes on from its cursor without a gap or a
/// repeat, and the API reads the same records in the same order.
#[tokio::test]
async fn a_store_from_before_chunks_is_migrated_keeping_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite");
    // (rowid, device key, boot, seq, time, received): two devices interleaved, two
    // boots, a gap in the rowids (a deleted device), and a record time far apart.
    let old: Vec<(i64, i64, i64, Seq, i64, i64)> = vec![
        (1, 1, 7, 1, 1_000, 5_000),
        (2, 1, 7, 2, 1_010, 5_000),
        (3, 2, 9, 1, 1_005, 5_000),
        (4, 1, 7, 3, 1_020, 5_000),
        (5, 1, 7, 4, 1_030, 6_000),
        (6, 1, 7, 5, 90_000, 6_000),
        (9, 1, 8, 1, 2_000, 7_000),
        (10, 1, 8, 2, 2_001, 7_000),
    ];
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "{OLD_TABLES}
             CREATE INDEX telemetry_time ON telemetry(device, time_ms);
             CREATE TABLE sinks(name TEXT PRIMARY KEY, cursor INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO sinks VALUES ('mqtt', 3), ('far', 12);
             INSERT INTO devices(key, id, boot_id) VALUES (1, 'a', 8), (2, 'b', 9);"
        ))
        .unwrap();
        for (row, dev, boot, seq, time, recv) in &old {
            c.execute(
                "INSERT INTO telemetry(rowid, device, boot_id, seq, time_ms, received_ms, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row, dev, boot, seq, time, recv, body(*seq)],
            )
            .unwrap();
        }
    }
    let (store, writer) = open(dir.path());
    let after = store.telemetry_after(3, 100).await.unwrap();
    assert_eq!(
        after
            .iter()
            .map(|r| (
                r.row,
                r.device.as_str(),
                r.boot_id,
                r.seq,
                r.time_ms,
                r.received_ms
            ))
            .collect::<Vec<_>>(),
        old.iter()
            .filter(|o| o.0 > 3)
            .map(|o| (
                o.0,
                if o.1 == 1 { "a" } else { "b" },
                o.2 as u64,
                o.3,
                o.4,
                o.5
            ))
            .collect::<Vec<_>>(),
        "the rows after the sink's cursor, as they were"
    );
    assert_eq!(after[0].body, body(3));
    assert_eq!(store.telemetry_count(None).await.unwrap(), 8);
    let a: Vec<Seq> = store
        .telemetry(
            "a",
            TelemetryQuery {
                oldest_first: true,
                ..TelemetryQuery::default()
            },
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    // By device time: boot 7's 1..4, boot 8's two, boot 7's late one.
    assert_eq!(a, [1, 2, 3, 4, 1, 2, 5]);
    // New records follow the furthest sink's cursor: no sink skips them.
    let o = session(&store, "a", 8).await;
    assert_eq!(o.last_acked, None, "this layout kept no marks");
    insert(&store, o, 8, 3..=3, now_ms()).await;
    let next = store.telemetry_after(12, 10).await.unwrap();
    assert_eq!(
        next.iter().map(|r| (r.row, r.seq)).collect::<Vec<_>>(),
        [(13, 3)]
    );
    writer.stop(&store).await;
    let c = Connection::open(&path).unwrap();
    let tables: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'telemetry'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0, "the old table is gone");
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

/// A state no version of the gateway wrote (a damaged store) is an error of the read,
/// not a command that silently "failed".
#[tokio::test]
async fn an_unknown_command_state_is_an_error_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let rec = store
        .enqueue_command("d", "go", Vec::new(), Duration::from_secs(60), Route::Local)
        .await
        .unwrap();
    store
        .write(move |c| {
            c.execute(
                "UPDATE commands SET state = 'bogus' WHERE id = ?1",
                [rec.id],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let read = store.command(rec.id).await;
    assert!(read.is_err(), "{read:?}");
    writer.stop(&store).await;
}

/// Paging through a device's telemetry costs the same per page however deep the page:
/// each page seeks to its cursor in the (device, time_ms) index. Measured in SQLite
/// VM steps (no timing): a page that scanned from `since` to its cursor instead would
/// cost as much as all the pages before it (an hour's export at 100 M records took a
/// minute that way).
#[tokio::test]
async fn a_deep_page_of_telemetry_costs_what_the_first_one_does() {
    use rusqlite::StatementStatus::VmStep;
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let o = session(&store, "d7", 1).await;
    let (n, page) = (20_000i64, 100u32);
    let mut batch = Batch::new(o.device_key, 1);
    batch.received_ms = 1_000_000;
    for s in 1..=n {
        // One record per ms, so that time order is seq order.
        batch.push(s as Seq, 1_000_000 + s, &body(s as Seq));
    }
    store
        .submit(batch)
        .await
        .unwrap()
        .await
        .unwrap()
        .result
        .unwrap();

    for oldest_first in [true, false] {
        let (steps, seqs) = store
            .read(move |c| {
                let sql = if oldest_first {
                    records::PAGE_OLDEST_FIRST
                } else {
                    records::PAGE_NEWEST_FIRST
                };
                let (mut steps, mut seqs, mut after) = (Vec::new(), Vec::new(), None);
                loop {
                    let q = TelemetryQuery {
                        // The whole range, as an export asks for it.
                        since_ms: Some(0),
                        until_ms: Some(i64::MAX - 1),
                        limit: Some(page),
                        after,
                        oldest_first,
                    };
                    c.prepare_cached(sql)?.reset_status(VmStep);
                    let rows = records::telemetry_page(c, "d7", &q)?;
                    steps.push(c.prepare_cached(sql)?.get_status(VmStep));
                    let Some((cursor, _)) = rows.last() else {
                        break;
                    };
                    after = Some(*cursor);
                    seqs.extend(rows.iter().map(|(_, r)| r.seq));
                }
                Ok((steps, seqs))
            })
            .await
            .unwrap();
        // Every record once, in order.
        let mut want: Vec<Seq> = (1..=n as Seq).collect();
        if !oldest_first {
            want.reverse();
        }
        assert_eq!(seqs, want, "oldest_first: {oldest_first}");
        let (first, last) = (steps[0], steps[steps.len() - 2]);
        assert!(
            last < 2 * first,
            "oldest_first: {oldest_first}: the last full page took {last} VM steps, \
             the first {first}: {steps:?}"
        );
    }
    writer.stop(&store).await;
}

/// The state document's versions in memory: loaded at start, kept with each change and
/// report, and forgotten with a deleted device.
#[tokio::test]
async fn state_versions_in_memory_follow_the_store() {
    use crate::store::PutDesired;
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let PutDesired::Done { device_key, .. } = store
        .put_desired("s1", serde_json::json!({"a": 1}), None)
        .await
        .unwrap()
    else {
        panic!("refused");
    };
    assert_eq!(store.desired_version(device_key), 1);
    // A report with nothing new is not worth a write; one with values is.
    assert!(!store.report_changes_state(device_key, 0, false));
    assert!(store.report_changes_state(device_key, 1, false));
    assert!(!store.report_changes_state(device_key, 1, false));
    store
        .record_reported(device_key, 1, serde_json::Map::new())
        .await
        .unwrap();
    writer.stop(&store).await;

    let (store, writer) = open(dir.path());
    assert_eq!(store.desired_version(device_key), 1, "loaded from the file");
    assert!(
        !store.report_changes_state(device_key, 1, false),
        "its report too"
    );
    assert!(store.delete_device("s1").await.unwrap());
    assert_eq!(
        store.desired_version(device_key),
        0,
        "forgotten with the device"
    );
    assert!(store.device_state("s1").await.unwrap().is_none());
    writer.stop(&store).await;
}

/// What a device reports is bounded: it merges into at most `MAX_REPORTED` values, so
/// a device reporting ever new names cannot grow its row (read and rewritten at every
/// report) without end. Values already there still change.
#[tokio::test]
async fn reported_values_are_bounded() {
    use crate::store::PutDesired;
    use crate::store::state::MAX_REPORTED;
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open(dir.path());
    let PutDesired::Done { device_key, .. } = store
        .put_desired("r1", serde_json::json!({"a": 1}), None)
        .await
        .unwrap()
    else {
        panic!("refused");
    };
    for round in 0..10 {
        let values: serde_json::Map<String, serde_json::Value> = (0..16)
            .map(|i| (format!("n{round}_{i}"), serde_json::json!(i)))
            .collect();
        store.record_reported(device_key, 1, values).await.unwrap();
    }
    let first = serde_json::Map::from_iter([("n0_0".to_owned(), serde_json::json!("changed"))]);
    store.record_reported(device_key, 1, first).await.unwrap();
    let s = store.device_state("r1").await.unwrap().unwrap();
    assert_eq!(s.reported.len(), MAX_REPORTED);
    assert_eq!(s.reported["n0_0"], serde_json::json!("changed"));
    assert!(
        !s.reported.contains_key("n9_0"),
        "new names past the bound are not kept"
    );
    writer.stop(&store).await;
}
