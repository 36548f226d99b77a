//! Devices: sessions opening and closing, registration, groups, and the refused
//! handshakes kept across restarts.

use device_client::proto::Seq;
use rusqlite::{OptionalExtension, params};

use super::directory::Mark;
use super::writer::{Op, OpOutcome, Pending, Writer, after};
use super::{RefusalRecord, Store, StoreError, now_ms};

/// What opening a session returns.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    /// The device's key in the store.
    pub device_key: i64,
    /// Highest stored seq for this boot id (never more than the store holds; less
    /// only if the device comes back with a boot it had before its latest one).
    pub last_acked: Option<Seq>,
}

/// What the writer found when it recorded a session's opening, once that committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenRecorded {
    /// Recorded; no command waits for the device.
    Done,
    /// Recorded; commands are queued for the device or were sent to an earlier
    /// session: the session hands them all out (those sent before included). One
    /// queued later reaches the session through its registry entry, which exists
    /// before the session opens.
    CommandsWaiting,
    /// The store could not record it (its health says why).
    Failed,
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
    ///
    /// Nothing waits for the writer: the key and `last_acked` come from memory
    /// ([`directory`](super::directory)), and the device's row is written with the next
    /// group commit, many opens to one commit in a connect storm. `then` runs on the
    /// writer thread once that commit is done. Reads of devices wait for the opens sent
    /// before them ([`opens_settled`](Self::opens_settled)), so a device that has its
    /// `Welcome` is in the API.
    pub async fn open_session(
        &self,
        info: SessionInfo,
        then: impl FnOnce(OpenRecorded) + Send + 'static,
    ) -> Result<Opened, StoreError> {
        let (device_key, mark) = self.directory.open(&info.device, info.boot_id);
        let last_acked = match mark {
            Mark::Known(seq) => seq,
            // A boot other than the device's last one (it rebooted): read once.
            Mark::Lookup => {
                let boot = info.boot_id;
                let seq = self
                    .read(move |c| {
                        let seq: Option<i64> = c
                            .prepare_cached(
                                "SELECT last_seq FROM boots WHERE device = ?1 AND boot_id = ?2",
                            )?
                            .query_row(params![device_key, boot as i64], |r| r.get(0))
                            .optional()?;
                        Ok(seq.and_then(|s| Seq::try_from(s).ok()))
                    })
                    .await?;
                self.directory.raise(device_key, boot, seq);
                seq
            }
        };
        let now = now_ms();
        let opens = self.opens.clone();
        opens.sent.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let done = move |recorded: OpenRecorded| {
            opens.done.send_modify(|n| *n += 1);
            then(recorded);
        };
        // No fsync of its own: the device's row is metadata, and what the session is
        // told (`last_acked`) comes from telemetry commits, which are always synced.
        // A crash can lose the row only together with everything committed after it.
        let sent = self.send(Op::Open(Box::new(move |w| {
            let Some(w) = w else {
                return (
                    Pending::Reply(Box::new(move |_| done(OpenRecorded::Failed))),
                    OpOutcome::Refused,
                );
            };
            let r = record_open(w, device_key, &info, now);
            let found = r.as_ref().ok().copied();
            let pending = Pending::Reply(Box::new(move |committed| {
                done(match (committed, found) {
                    (Ok(()), Some(true)) => OpenRecorded::CommandsWaiting,
                    (Ok(()), Some(false)) => OpenRecorded::Done,
                    (Err(_), _) | (_, None) => OpenRecorded::Failed,
                })
            }));
            (pending, OpOutcome::of(&r))
        })));
        if let Err(e) = sent.await {
            // The op is gone unrun: count it done, or every read would wait for it.
            self.opens.done.send_modify(|n| *n += 1);
            return Err(e);
        }
        Ok(Opened {
            device_key,
            last_acked,
        })
    }

    /// Waits (at most 5 s) until the session opens sent before this call are applied,
    /// so that a read of devices shows every session whose `Welcome` went out.
    pub(super) async fn opens_settled(&self) {
        let target = self.opens.sent.load(std::sync::atomic::Ordering::Acquire);
        if *self.opens.done.borrow() >= target {
            return;
        }
        let mut rx = self.opens.done.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            rx.wait_for(|&n| n >= target),
        )
        .await;
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
        self.write_with(move |w| {
            let key = w.directory.key(&id);
            Ok(w.conn.execute(
                "INSERT INTO devices(key, id) VALUES (?1, ?2) ON CONFLICT(id) DO NOTHING",
                params![key, id],
            )? > 0)
        })
        .await
    }

    /// Forgets a device: its row, telemetry, commands and group memberships. `false`
    /// if it was unknown. (The caller checks it is offline.)
    pub async fn delete_device(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Op::Write {
            fsync: true,
            f: Box::new(move |w| {
                let Some(w) = w else {
                    return after(reply, Err(StoreError::Closed));
                };
                let r = delete_device_rows(&w.conn, &id);
                // Forgotten in memory with the rows, and back if the commit fails.
                let removed = match &r {
                    Ok(Some(key)) => w.directory.remove(&id, *key),
                    _ => None,
                };
                let directory = w.directory.clone();
                let outcome = OpOutcome::of(&r);
                let value = r;
                let pending = Pending::Reply(Box::new(move |committed| {
                    let out = match committed {
                        Ok(()) => value,
                        Err(e) => {
                            if let Some(removed) = removed {
                                directory.restore(removed);
                            }
                            Err(StoreError::CommitFailed(e))
                        }
                    };
                    let _ = reply.send(out);
                }));
                (pending, outcome)
            }),
        })
        .await?;
        let key = rx.await.map_err(|_| StoreError::Closed)??;
        if let Some(key) = key {
            // Its state document's versions go with its rows.
            self.forget_state_versions(key);
        }
        Ok(key.is_some())
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

/// Deletes device `id`'s rows everywhere; its key, or `None` if there was no such device.
fn delete_device_rows(c: &rusqlite::Connection, id: &str) -> Result<Option<i64>, StoreError> {
    let Some(key) = c
        .query_row("SELECT key FROM devices WHERE id = ?1", [id], |r| {
            r.get::<_, i64>(0)
        })
        .optional()?
    else {
        return Ok(None);
    };
    c.execute("DELETE FROM chunks WHERE device = ?1", [key])?;
    c.execute("DELETE FROM boots WHERE device = ?1", [key])?;
    c.execute("DELETE FROM commands WHERE device = ?1", [key])?;
    c.execute("DELETE FROM device_state WHERE device = ?1", [key])?;
    c.execute("DELETE FROM groups WHERE device = ?1", [id])?;
    c.execute("DELETE FROM devices WHERE key = ?1", [key])?;
    Ok(Some(key))
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

/// Writes a session's opening into the device's row (made if new, with the key the
/// directory gave); `true` if commands wait for the device.
pub(super) fn record_open(
    w: &Writer,
    key: i64,
    info: &SessionInfo,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let c = &w.conn;
    // Cached: a connect storm runs this thousands of times a second, and parsing the
    // SQL each time cost more than running it.
    let stored: i64 = c
        .prepare_cached(
            "INSERT INTO devices(id, first_seen_ms, last_seen_ms, online, cert_serial,
            cert_not_after, firmware, peer_addr, boot_id, connects, key)
         VALUES (?1, ?2, ?2, 1, ?3, ?4, ?5, ?6, ?7, 1, ?8)
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
                info.boot_id as i64,
                key
            ],
            |r| r.get(0),
        )?;
    same_key(&info.device, key, stored)?;
    // Broader than what `take_commands` hands out (expired or fleet-held commands
    // count here): a false yes costs one empty hand-out, a false no a lost command.
    let commands_waiting: bool = c
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM commands
                            WHERE device = ?1 AND state IN ('queued', 'sent'))",
        )?
        .query_row([key], |r| r.get(0))?;
    Ok(commands_waiting)
}

/// The row of `device` must hold the key the directory gave it.
pub(super) fn same_key(device: &str, expected: i64, stored: i64) -> Result<(), StoreError> {
    if stored == expected {
        Ok(())
    } else {
        Err(StoreError::KeyMismatch {
            device: device.to_owned(),
            stored,
            expected,
        })
    }
}
