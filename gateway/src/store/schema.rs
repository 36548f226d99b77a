//! The store's schema, the migrations of older stores, and the files' permissions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use super::StoreError;

pub(super) const SCHEMA: &str = r#"
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
-- Telemetry, a chunk of one device boot's records per row (store/chunk.rs,
-- docs/STORE.md): records `last_row - n + 1 ..= last_row`, in arrival order, spanning
-- at most 250 ms of device time (`min_time ..= max_time`). AUTOINCREMENT: a row
-- number is never given twice, so sink cursors never skip one.
CREATE TABLE IF NOT EXISTS chunks(
    last_row     INTEGER PRIMARY KEY AUTOINCREMENT,
    n            INTEGER NOT NULL,
    device       INTEGER NOT NULL,
    boot_id      INTEGER NOT NULL,
    min_time     INTEGER NOT NULL,
    max_time     INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL,
    records      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_time ON chunks(device, min_time);
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
-- The device state document (protocol version 2, gateway/src/state.rs): the desired
-- settings as a versioned JSON document, and what the device last reported.
CREATE TABLE IF NOT EXISTS device_state(
    device            INTEGER PRIMARY KEY,
    desired           TEXT,
    reported          TEXT,
    reported_version  INTEGER,
    reported_ms       INTEGER
);
-- Where each northbound sink (the MQTT bridge, the fleet) is in the telemetry: the
-- row of the last record it delivered. Rows grow in commit order (one writer) and are
-- never given twice, so `row > cursor` is exactly what is left to send.
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
-- Firmware images uploaded for updates (protocol version 3, gateway/src/firmware):
-- the bytes, and the manifest the release key signed.
CREATE TABLE IF NOT EXISTS firmware(
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    version     TEXT NOT NULL UNIQUE,
    sha256      BLOB NOT NULL,
    signature   BLOB NOT NULL,
    image       BLOB NOT NULL,
    created_ms  INTEGER NOT NULL
);
-- Rollouts of an image to devices, and each device's progress in one. The transfer
-- offset is kept in memory only: a device resumes from what it holds, not from this.
CREATE TABLE IF NOT EXISTS rollouts(
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    firmware           INTEGER NOT NULL,
    state              TEXT NOT NULL,
    failure_threshold  REAL NOT NULL,
    max_in_flight      INTEGER NOT NULL,
    device_timeout_s   INTEGER NOT NULL DEFAULT 3600,
    created_ms         INTEGER NOT NULL,
    updated_ms         INTEGER NOT NULL,
    reason             TEXT
);
CREATE TABLE IF NOT EXISTS rollout_devices(
    rollout     INTEGER NOT NULL,
    device      TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (rollout, device)
) WITHOUT ROWID;
"#;

/// Prepared statements each connection keeps (more than the store has).
pub(super) const STATEMENT_CACHE: usize = 64;

/// The writer's connection: WAL, the schema (migrated), nobody online.
pub(super) fn open_writer_connection(
    path: &Path,
    danger_ack_before_fsync: bool,
) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // The writer runs some 30 distinct cached statements; rusqlite keeps 16 by default,
    // and an evicted one is parsed again on its next use.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = if danger_ack_before_fsync {
        "NORMAL"
    } else {
        "FULL"
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.execute_batch(SCHEMA)?;
    migrate_unique_key(&conn)?;
    migrate_to_chunks(&conn)?;
    migrate_fleet_columns(&conn)?;
    migrate_rollout_timeout(&conn)?;
    // A previous run may have died with sessions open: nobody is online at start.
    conn.execute("UPDATE devices SET online = 0 WHERE online = 1", [])?;
    Ok(conn)
}

/// Creates the data directory readable by this user only (0700). An existing one is
/// left as the operator made it, with a warning if others can read it.
pub(super) fn private_dir(dir: &Path) -> Result<(), StoreError> {
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
pub(super) fn private_files(db: &Path) -> Result<(), StoreError> {
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

/// Rollouts made before devices had a deadline get the default one.
fn migrate_rollout_timeout(conn: &Connection) -> Result<(), StoreError> {
    let has: bool = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('rollouts') WHERE name = 'device_timeout_s'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        conn.execute(
            "ALTER TABLE rollouts ADD COLUMN device_timeout_s INTEGER NOT NULL DEFAULT 3600",
            [],
        )?;
    }
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

/// Stores made before `boots` deduplicated telemetry with a unique index on
/// `(device, boot_id, seq)`: fill `boots` from it and drop it (once, at open).
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

/// Rows of the old `telemetry` table (one row per record) moved per transaction.
const MIGRATE_STEP: usize = 50_000;

/// Stores made before chunks kept one row per record in `telemetry`: move them into
/// chunks (once, at open), keeping each record's row number, so that sink cursors stay
/// where they were. A step at a time, each its own transaction that also deletes what
/// it moved: an interrupted migration goes on where it stopped at the next start.
fn migrate_to_chunks(conn: &Connection) -> Result<(), StoreError> {
    let old: bool = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'telemetry'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !old {
        return Ok(());
    }
    let total: i64 = conn.query_row("SELECT count(*) FROM telemetry", [], |r| r.get(0))?;
    tracing::info!(
        records = total,
        "store: moving telemetry into chunks (once)"
    );
    let started = std::time::Instant::now();
    let mut moved = 0i64;
    loop {
        let n = migrate_step(conn)?;
        moved += n as i64;
        if n < MIGRATE_STEP {
            break;
        }
        tracing::info!(moved, of = total, "store: moving telemetry into chunks");
    }
    // Rows never go back below a sink's cursor, even if the newest records were gone.
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         INSERT INTO sqlite_sequence(name, seq)
           SELECT 'chunks', 0 WHERE NOT EXISTS
             (SELECT 1 FROM sqlite_sequence WHERE name = 'chunks');
         UPDATE sqlite_sequence
            SET seq = max(seq, (SELECT coalesce(max(cursor), 0) FROM sinks))
          WHERE name = 'chunks';
         DROP TABLE telemetry;
         COMMIT;",
    )?;
    tracing::info!(
        moved,
        seconds = started.elapsed().as_secs(),
        "store: telemetry moved into chunks"
    );
    Ok(())
}

/// Moves the oldest [`MIGRATE_STEP`] rows of `telemetry` into chunks, in one
/// transaction; returns how many it moved. Rows that committed together (one device
/// boot, one arrival time, consecutive rowids) go into one chunk, within its bounds.
fn migrate_step(conn: &Connection) -> Result<usize, StoreError> {
    use super::batch::{Batch, insert_chunk};
    use super::chunk::ChunkBuf;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let step = (|| {
        let mut stmt = conn.prepare(
            "SELECT rowid, device, boot_id, seq, time_ms, received_ms, body FROM telemetry
              ORDER BY rowid LIMIT ?1",
        )?;
        let mut rows = stmt.query([MIGRATE_STEP as i64])?;
        let mut batch = Batch::new(0, 0);
        let mut chunk = ChunkBuf::default();
        let mut encoded = Vec::new();
        let (mut moved, mut last_row) = (0usize, 0i64);
        while let Some(r) = rows.next()? {
            let (row, device, boot): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let (seq, time_ms, received_ms): (u32, i64, i64) = (r.get(3)?, r.get(4)?, r.get(5)?);
            let body: Vec<u8> = r.get(6)?;
            let same = !chunk.records.is_empty()
                && batch.device_key == device
                && batch.boot_id == boot as u64
                && batch.received_ms == received_ms
                && row == last_row + 1;
            if !same {
                if !chunk.records.is_empty() {
                    insert_chunk(conn, &batch, &chunk, Some(last_row), &mut encoded)?;
                }
                chunk.clear();
                batch.clear();
                (batch.device_key, batch.boot_id, batch.received_ms) =
                    (device, boot as u64, received_ms);
            }
            batch.push(seq, time_ms, &body);
            let index = batch.records.len() - 1;
            let rec = batch.records[index];
            if !chunk.fits(&rec) {
                insert_chunk(conn, &batch, &chunk, Some(last_row), &mut encoded)?;
                chunk.clear();
            }
            chunk.push(index, &rec);
            last_row = row;
            moved += 1;
        }
        if !chunk.records.is_empty() {
            insert_chunk(conn, &batch, &chunk, Some(last_row), &mut encoded)?;
        }
        conn.execute("DELETE FROM telemetry WHERE rowid <= ?1", [last_row])?;
        Ok::<_, rusqlite::Error>(moved)
    })();
    match step {
        Ok(moved) => {
            conn.execute_batch("COMMIT")?;
            Ok(moved)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod migration_tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use super::*;

    /// A store whose rollouts were made before devices had a deadline opens, and its
    /// rollouts get the default one.
    #[test]
    fn rollouts_without_a_device_deadline_get_the_default() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE rollouts(id INTEGER PRIMARY KEY AUTOINCREMENT, firmware INTEGER NOT NULL,
                 state TEXT NOT NULL, failure_threshold REAL NOT NULL,
                 max_in_flight INTEGER NOT NULL, created_ms INTEGER NOT NULL,
                 updated_ms INTEGER NOT NULL, reason TEXT);
             INSERT INTO rollouts VALUES (1, 1, 'running', 0.1, 50, 0, 0, NULL);",
        )
        .unwrap();
        migrate_rollout_timeout(&conn).unwrap();
        migrate_rollout_timeout(&conn).unwrap(); // twice: nothing more to do
        let t: i64 = conn
            .query_row("SELECT device_timeout_s FROM rollouts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(t, 3600);
    }
}
