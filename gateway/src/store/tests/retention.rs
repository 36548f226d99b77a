//! Retention: what sinks have not delivered, past boots, age and row limits, whole
//! chunks only, and telemetry committing between retention's steps.

use super::*;
use crate::store::retention::STEP;

/// [`insert`], each record a chunk of its own (device times further apart than a
/// chunk spans): retention deletes whole chunks, and these tests count records.
async fn insert_apart(
    store: &Store,
    o: Opened,
    boot: u64,
    seqs: std::ops::RangeInclusive<Seq>,
    received_ms: i64,
) -> usize {
    insert_spaced(store, o, boot, seqs, received_ms, chunk::SPAN_MS + 1).await
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
    insert_apart(&store, o, 1, 1..=10, now_ms() - 3 * 86_400_000).await;
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
    // All delivered: all but the newest record.
    let rest = store.telemetry_after(rows[3].row, 100).await.unwrap();
    assert_eq!(rest.len(), 6);
    store.set_sink_cursor("mqtt", rest[5].row).await.unwrap();
    assert_eq!(prune_by_age(&store, day).await, 5);
    assert_eq!(store.telemetry_count(None).await.unwrap(), 1);
    // The next record gets a row after the cursor.
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
    insert_apart(&store, o, 1, 1..=10, now_ms() - 3 * 86_400_000).await;
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
    insert_apart(&store, o, 1, 1..=100, now_ms() - 3 * day).await;
    insert_apart(&store, o, 1, 101..=150, now_ms()).await;
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

/// Holds the writer thread inside an op until the returned sender sends or drops: what
/// is queued meanwhile waits, then goes in the next group commits, in queue order.
async fn hold_writer(store: &Store) -> std::sync::mpsc::Sender<()> {
    let (release, held) = std::sync::mpsc::channel::<()>();
    store
        .tx
        .send(Op::Write {
            fsync: true,
            f: Box::new(move |_| {
                let _ = held.recv();
                (Pending::nothing(), OpOutcome::Done)
            }),
        })
        .await
        .unwrap();
    release
}

/// Runs retention over `old` rows, three days old and undelivered by a lossy sink,
/// while a device sends one fresh record: the retention future is polled once (its
/// first op queued behind a held writer), the record is queued behind it, and once the
/// record is committed the rows retention has not reached yet must still be there.
/// Retention must not hold the writer for the whole deletion: each step is an op of
/// its own, so telemetry queued meanwhile commits between steps.
/// Returns what retention pruned and the rows left.
async fn retention_while_telemetry_arrives(
    max_age: Option<Duration>,
    max_rows: Option<u64>,
    old: Seq,
) -> (Pruned, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open_with_sink(dir.path(), true);
    let o = session(&store, "d6", 1).await;
    assert_eq!(store.open_sink("mqtt").await.unwrap(), 0);
    let day = 86_400_000;
    insert_apart(&store, o, 1, 1..=old, now_ms() - 3 * day).await;

    let release = hold_writer(&store).await;
    let mut prune = std::pin::pin!(store.apply_retention(max_age, max_rows));
    let first = std::future::poll_fn(|cx| Poll::Ready(prune.as_mut().poll(cx))).await;
    assert!(
        first.is_pending(),
        "the writer is held, retention must wait"
    );
    let mut batch = Batch::new(o.device_key, 1);
    batch.received_ms = now_ms();
    batch.push(old + 1, batch.received_ms, &body(old + 1));
    let done = store.submit(batch).await.unwrap();
    release.send(()).unwrap();
    // The fresh record commits without waiting for the whole deletion.
    assert_eq!(done.await.unwrap().result.unwrap(), 1);
    let left = store.telemetry_count(Some("d6")).await.unwrap();
    let step = STEP as u64;
    assert!(
        left > u64::from(old) - step,
        "at most one step of retention may run before a batch queued behind it \
         commits: {left} of {} rows left",
        u64::from(old) + 1
    );

    let pruned = prune.await.unwrap();
    let left = store.telemetry_count(Some("d6")).await.unwrap();
    writer.stop(&store).await;
    (pruned, left)
}

#[tokio::test]
async fn retention_by_age_lets_telemetry_commit_between_steps() {
    let old = 3 * STEP as Seq + 10;
    let (pruned, left) =
        retention_while_telemetry_arrives(Some(Duration::from_secs(86_400)), None, old).await;
    // Every old row goes: once the fresh record is in, the newest old row is no longer
    // the newest.
    assert_eq!(
        pruned,
        Pruned {
            deleted: old.into(),
            undelivered: old.into()
        }
    );
    assert_eq!(left, 1, "the fresh record stays");
}

#[tokio::test]
async fn retention_by_rows_lets_telemetry_commit_between_steps() {
    let old = 3 * STEP as Seq + 10;
    let (pruned, left) = retention_while_telemetry_arrives(None, Some(1), old).await;
    // The limit is the newest row when retention starts: that one and the fresh record
    // stay.
    assert_eq!(
        pruned,
        Pruned {
            deleted: (old - 1).into(),
            undelivered: (old - 1).into()
        }
    );
    assert_eq!(left, 2);
}

/// Retention deletes whole chunks: a chunk goes only once every record in it may (by
/// age, and delivered by the sink), and the records counted are the chunk's.
#[tokio::test]
async fn retention_deletes_a_chunk_only_when_all_of_it_may_go() {
    let dir = tempfile::tempdir().unwrap();
    let (store, writer) = open_with_sink(dir.path(), false);
    let o = session(&store, "r3", 1).await;
    let start = store.open_sink("mqtt").await.unwrap();
    let old = now_ms() - 3 * 86_400_000;
    // Two chunks of five (one batch each), then a fresh one.
    insert(&store, o, 1, 1..=5, old).await;
    insert(&store, o, 1, 6..=10, old).await;
    insert(&store, o, 1, 11..=11, now_ms()).await;
    let rows = store.telemetry_after(start, 7).await.unwrap();
    // Delivered up to seq 7: the first chunk and part of the second.
    store.set_sink_cursor("mqtt", rows[6].row).await.unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(prune_by_age(&store, day).await, 5, "the first chunk only");
    let left = store.telemetry_after(start, 100).await.unwrap();
    assert_eq!(
        left.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10, 11]
    );
    writer.stop(&store).await;
}
