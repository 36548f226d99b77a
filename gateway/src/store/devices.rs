//! Devices: sessions opening and closing, registration, groups, and the refused
//! handshakes kept across restarts.

use device_client::proto::Seq;
use rusqlite::{OptionalExtension, params};

use super::writer::{Op, OpOutcome, Pending, Writer};
use super::{RefusalRecord, Store, StoreError, now_ms};

/// What opening a session returns.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    /// The device's key in the store.
    pub device_key: i64,
    /// Highest stored seq for this boot id.
    pub last_acked: Option<Seq>,
    /// Commands are queued or sent for the device: the session hands them out at
    /// once. Without any, it skips that round trip through the writer (a connect storm
    /// pays one writer op per connect instead of two); one queued later reaches the
    /// session through its registry entry, which exists before the session opens.
    pub commands_waiting: bool,
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

impl Store {
    /// Records a new session in the registry and returns what `Welcome` needs. Ops are
    /// applied in order, so every batch a previous session of the device submitted
    /// before this call is counted in `last_acked`.
    pub async fn open_session(&self, info: SessionInfo) -> Result<Opened, StoreError> {
        let now = now_ms();
        // No fsync of its own: the device's row is metadata, and what the session is
        // told (`last_acked`) comes from telemetry commits, which are always synced.
        // A crash can lose the row only together with everything committed after it.
        self.write_op(false, move |w| open_session(w, &info, now))
            .await
    }

    /// Marks a device offline (committed with the next group; nobody waits for it).
    pub async fn close_session(&self, device_key: i64) -> Result<(), StoreError> {
        self.send(close_session_op(device_key, now_ms())).await
    }

    /// Sets the members of a group (replacing them; an empty list deletes the group).
    pub async fn put_group(&self, name: &str, devices: Vec<String>) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.write(move |c| {
            c.execute("DELETE FROM groups WHERE name = ?1", [&name])?;
            let mut stmt =
                c.prepare_cached("INSERT OR IGNORE INTO groups(name, device) VALUES (?1, ?2)")?;
            for d in &devices {
                stmt.execute(params![name, d])?;
            }
            Ok(())
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
            c.execute("DELETE FROM chunks WHERE device = ?1", [key])?;
            c.execute("DELETE FROM boots WHERE device = ?1", [key])?;
            c.execute("DELETE FROM commands WHERE device = ?1", [key])?;
            c.execute("DELETE FROM groups WHERE device = ?1", [&id])?;
            c.execute("DELETE FROM devices WHERE key = ?1", [key])?;
            Ok(true)
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
}

/// The op that marks a device offline.
pub(super) fn close_session_op(device_key: i64, now_ms: i64) -> Op {
    Op::Write {
        fsync: true,
        f: Box::new(move |w| match w {
            Some(w) => {
                let r = w
                    .conn
                    .prepare_cached(
                        "UPDATE devices SET online = 0, last_seen_ms = ?2 WHERE key = ?1",
                    )
                    .and_then(|mut s| s.execute(params![device_key, now_ms]));
                (
                    Pending::nothing(),
                    OpOutcome::of(&r.map_err(StoreError::from)),
                )
            }
            None => (Pending::nothing(), OpOutcome::Done),
        }),
    }
}

pub(super) fn open_session(
    w: &Writer,
    info: &SessionInfo,
    now_ms: i64,
) -> Result<Opened, StoreError> {
    let c = &w.conn;
    // Cached: a connect storm runs this thousands of times a second, and parsing the
    // SQL each time cost more than running it.
    let key: i64 = c
        .prepare_cached(
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
        )?
        .query_row(
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
    // Broader than what `take_commands` hands out (expired or fleet-held commands
    // count here): a false yes costs one empty hand-out, a false no a lost command.
    let commands_waiting: bool = c
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM commands
                            WHERE device = ?1 AND state IN ('queued', 'sent'))",
        )?
        .query_row([key], |r| r.get(0))?;
    Ok(Opened {
        device_key: key,
        last_acked: last.and_then(|s| Seq::try_from(s).ok()),
        commands_waiting,
    })
}
