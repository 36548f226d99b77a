//! The store's side of commands across a fleet (docs/FLEET.md, "Commands across the
//! fleet"): fleet-unique ids, commands handed to another gateway or to the fleet's
//! pending stream, and copies of other gateways' commands delivered here.
//!
//! ```text
//!  asked here ─► own row (id = slot·2³² + n) ─┬─ fleet NULL:    this gateway's session sends it
//!                                             ├─ fleet held:    the holder has a copy, reports back
//!                                             └─ fleet publish ─► pending stream ─► fleet pending
//!  from another gateway ─► copy (owner, owner_id) ─ sent here ─ its record ─► reported to the owner
//! ```
//!
//! Ids: SQLite's `AUTOINCREMENT` counter for `commands` starts at the gateway's slot
//! times 2³², so every row this gateway makes — its own commands and copies — has an id
//! unique in the fleet, and the low 32 bits (what goes to the device) are unique in
//! this store.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::commands::{Queued, command_by_id, device_key, insert_queued};
use super::{CommandRecord, CommandState, Store, StoreError};

/// Who delivers a command queued on this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This gateway's session with the device (no fleet, or the device is here).
    Local,
    /// The fleet's pending stream: the device is online nowhere.
    Publish,
    /// The gateway named, which holds the device's session and has a copy.
    HeldBy(String),
}

/// A command as it travels between gateways: to the holder of its device, or through
/// the pending stream (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handoff {
    /// The gateway that was asked: it keeps the command's record.
    pub owner: String,
    /// The command's id there (fleet-unique).
    pub id: i64,
    /// The device.
    pub device: String,
    /// Command name.
    pub name: String,
    /// Arguments (a JSON object of name: value, checked when it was asked).
    pub args: Json,
    /// When it was asked, ms since the epoch.
    pub created_ms: i64,
    /// When its time to live ends.
    pub expires_ms: i64,
}

/// Ids below 2³² are a gateway's before it had a slot: they answer only there.
pub const SLOT_SHIFT: u32 = 32;

/// The slot of a command id (0: made before this gateway joined a fleet).
pub fn slot_of(id: i64) -> u32 {
    u32::try_from(id >> SLOT_SHIFT).unwrap_or(0)
}

/// Where a state stands in a command's life: a remote update only moves forward.
fn rank(s: CommandState) -> u8 {
    match s {
        CommandState::Queued => 0,
        CommandState::Sent => 1,
        _ => 2,
    }
}

impl Store {
    /// The slot this store numbers its commands in (0 if it has none).
    pub async fn id_slot(&self) -> Result<u32, StoreError> {
        self.read(|c| {
            let seq: Option<i64> = c
                .query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'commands'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(seq.map_or(0, slot_of))
        })
        .await
    }

    /// Numbers new commands in `slot` from now on (`slot × 2³²` + a counter that goes
    /// on from the old one, so the low 32 bits stay unique in this store).
    pub async fn set_id_slot(&self, slot: u32) -> Result<(), StoreError> {
        self.write(move |c| {
            let seq: Option<i64> = c
                .query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'commands'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let low = seq.unwrap_or(0) & 0xFFFF_FFFF;
            let next = (i64::from(slot) << SLOT_SHIFT) | low;
            if seq.is_some() {
                c.execute(
                    "UPDATE sqlite_sequence SET seq = ?1 WHERE name = 'commands'",
                    [next],
                )?;
            } else {
                c.execute(
                    "INSERT INTO sqlite_sequence(name, seq) VALUES ('commands', ?1)",
                    [next],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// A command the holder would not take after all: to the pending stream instead.
    pub async fn reroute_to_pending(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "UPDATE commands SET fleet = 'publish', held_by = NULL
                  WHERE id = ?1 AND fleet = 'held' AND state = 'queued'",
                [id],
            )?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` commands waiting to go into the pending stream: (row here,
    /// the handoff). A command of this gateway has `owner` empty (the caller fills
    /// in its own name); a copy carries its owner.
    pub async fn to_publish(&self, limit: u32) -> Result<Vec<(i64, Handoff)>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.id, coalesce(c.owner, ''), coalesce(c.owner_id, c.id), d.id, c.name,
                        c.args, c.created_ms, c.expires_ms
                   FROM commands c JOIN devices d ON d.key = c.device
                  WHERE c.fleet = 'publish' AND c.state IN ('queued', 'sent')
                  ORDER BY c.id LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit], |r| {
                Ok((
                    r.get(0)?,
                    Handoff {
                        owner: r.get(1)?,
                        id: r.get(2)?,
                        device: r.get(3)?,
                        name: r.get(4)?,
                        args: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or(Json::Null),
                        created_ms: r.get(6)?,
                        expires_ms: r.get(7)?,
                    },
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// A row went into the pending stream at `seq`: a command of this gateway now
    /// waits there (unless this gateway's session took it meanwhile); a copy is gone
    /// from here (the stream has it for whichever gateway the device reaches next).
    pub async fn mark_published(&self, row: i64, seq: u64) -> Result<(), StoreError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.write(move |c| {
            c.execute(
                "UPDATE commands SET fleet = 'pending', pending_seq = ?2
                  WHERE id = ?1 AND fleet = 'publish' AND owner IS NULL",
                params![row, seq],
            )?;
            c.execute(
                "DELETE FROM commands WHERE id = ?1 AND fleet = 'publish' AND owner IS NOT NULL",
                [row],
            )?;
            Ok(())
        })
        .await
    }

    /// A command of this gateway taken out of the pending stream by this gateway (its
    /// device connected here): its session delivers it, as any local one, sending it
    /// again if another gateway sent it before the device left there.
    pub async fn mark_local(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "UPDATE commands SET fleet = NULL, pending_seq = NULL, held_by = NULL,
                        state = CASE state WHEN 'sent' THEN 'queued' ELSE state END
                  WHERE id = ?1 AND owner IS NULL AND state IN ('queued', 'sent')",
                [id],
            )?;
            Ok(())
        })
        .await
    }

    /// Where in the pending stream a queued command of this gateway waits, if it does.
    pub async fn pending_seq(&self, id: i64) -> Result<Option<u64>, StoreError> {
        self.read(move |c| {
            let seq: Option<Option<i64>> = c
                .query_row(
                    "SELECT pending_seq FROM commands
                      WHERE id = ?1 AND fleet = 'pending' AND state = 'queued'",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(seq.flatten().and_then(|s| u64::try_from(s).ok()))
        })
        .await
    }

    /// Keeps a copy of another gateway's command, to deliver here. `None` if this
    /// store has one already (the same handoff seen twice); else the copy's record.
    pub async fn insert_copy(&self, h: Handoff) -> Result<Option<CommandRecord>, StoreError> {
        self.write_with(move |w| {
            let c = &w.conn;
            let known: bool = c
                .query_row(
                    "SELECT 1 FROM commands WHERE owner = ?1 AND owner_id = ?2",
                    params![h.owner, h.id],
                    |_| Ok(true),
                )
                .optional()?
                .is_some();
            if known {
                return Ok(None);
            }
            let id = insert_queued(
                c,
                &Queued {
                    device_key: device_key(w, &h.device)?,
                    name: &h.name,
                    args: &h.args,
                    created_ms: h.created_ms,
                    expires_ms: h.expires_ms,
                    fleet: None,
                    held_by: None,
                    owner: Some((&h.owner, h.id)),
                },
            )?;
            command_by_id(c, id)
        })
        .await
    }

    /// Up to `limit` copies whose state their owner has not acknowledged: (owner,
    /// row here, the copy's record, which carries the owner's id).
    pub async fn unreported(
        &self,
        limit: u32,
    ) -> Result<Vec<(String, i64, CommandRecord)>, StoreError> {
        self.read(move |c| {
            let ids = c
                .prepare_cached(
                    "SELECT id, owner FROM commands
                      WHERE owner IS NOT NULL AND state != 'queued' AND reported IS NOT state
                      LIMIT ?1",
                )?
                .query_map([limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::with_capacity(ids.len());
            for (row, owner) in ids {
                if let Some(rec) = command_by_id(c, row)? {
                    out.push((owner, row, rec));
                }
            }
            Ok(out)
        })
        .await
    }

    /// The owner has a copy's `state`.
    pub async fn mark_reported(&self, row: i64, state: CommandState) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "UPDATE commands SET reported = ?2 WHERE id = ?1",
                params![row, state.as_str()],
            )?;
            Ok(())
        })
        .await
    }

    /// Applies what the gateway delivering one of this gateway's commands reports, if
    /// it moves the command forward (queued → sent → an end; an ended one stays as it
    /// is). Returns the record if it changed.
    pub async fn apply_update(
        &self,
        u: CommandRecord,
    ) -> Result<Option<CommandRecord>, StoreError> {
        self.write(move |c| {
            let Some(now) = command_by_id(c, u.id)? else {
                return Ok(None);
            };
            let forward = rank(u.state) > rank(now.state)
                || (u.state == CommandState::Sent && now.state == CommandState::Sent);
            if !forward || now.state.is_final() {
                return Ok(None);
            }
            let n = c.execute(
                "UPDATE commands SET state = ?2, sent_ms = coalesce(?3, sent_ms),
                        finished_ms = ?4, attempts = max(attempts, ?5), status = ?6,
                        result = ?7, error = ?8
                  WHERE id = ?1 AND owner IS NULL",
                params![
                    u.id,
                    u.state.as_str(),
                    u.sent_ms,
                    u.finished_ms,
                    u.attempts,
                    u.status,
                    u.result.as_ref().map(Json::to_string),
                    u.error
                ],
            )?;
            if n == 0 {
                return Ok(None);
            }
            command_by_id(c, u.id)
        })
        .await
    }

    /// A device's session here ended: its commands still waiting here go back to the
    /// fleet (marked `publish`: the pending stream gets them, and whichever gateway
    /// the device reaches next delivers them). Returns how many.
    pub async fn hand_off(&self, device: &str) -> Result<usize, StoreError> {
        let device = device.to_owned();
        self.write(move |c| {
            Ok(c.execute(
                "UPDATE commands SET fleet = 'publish'
                  WHERE device = (SELECT key FROM devices WHERE id = ?1)
                    AND state IN ('queued', 'sent') AND fleet IS NULL",
                [device],
            )?)
        })
        .await
    }
}

impl Store {
    /// [`hand_off`](Self::hand_off) for every device with no session here: after a
    /// restart (a crash ends sessions without their events) or a reconnect to NATS,
    /// commands left with devices that went away go back to the fleet.
    pub async fn hand_off_offline(&self) -> Result<usize, StoreError> {
        self.write(|c| {
            Ok(c.execute(
                "UPDATE commands SET fleet = 'publish'
                  WHERE state IN ('queued', 'sent') AND fleet IS NULL
                    AND device IN (SELECT key FROM devices WHERE online = 0)",
                [],
            )?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreOptions, WriterThread};
    use std::time::Duration;

    fn open(dir: &std::path::Path) -> (Store, WriterThread) {
        Store::open(StoreOptions {
            path: dir.join("t.sqlite"),
            danger_ack_before_fsync: false,
            max_commit_records: 1000,
            max_queued_commands: 10,
            sinks: Vec::new(),
        })
        .unwrap()
    }

    async fn ask(store: &Store, device: &str, route: Route) -> CommandRecord {
        store
            .enqueue_command(device, "go", Vec::new(), Duration::from_secs(60), route)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn ids_move_into_the_slot_and_keep_their_low_bits_unique_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let before = ask(&store, "d", Route::Local).await.id;
        assert_eq!(store.id_slot().await.unwrap(), 0);
        store.set_id_slot(7).await.unwrap();
        let after = ask(&store, "d", Route::Local).await.id;
        assert_eq!(slot_of(after), 7);
        assert_eq!(after & 0xFFFF_FFFF, before + 1, "the counter goes on");
        writer.stop(&store).await;
        let (store, writer) = open(dir.path());
        assert_eq!(store.id_slot().await.unwrap(), 7, "kept across a restart");
        // Another slot later (the old one was taken): the low bits still go on.
        store.set_id_slot(9).await.unwrap();
        let third = ask(&store, "d", Route::Local).await.id;
        assert_eq!((slot_of(third), third & 0xFFFF_FFFF), (9, before + 2));
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn a_copy_shows_its_owners_id_is_kept_once_and_reports_each_state_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        store.set_id_slot(2).await.unwrap();
        let h = Handoff {
            owner: "gw-1".into(),
            id: (1 << 32) + 5,
            device: "d".into(),
            name: "go".into(),
            args: serde_json::json!({}),
            created_ms: 1,
            expires_ms: i64::MAX / 2,
        };
        let copy = store.insert_copy(h.clone()).await.unwrap().unwrap();
        assert_eq!(copy.id, h.id, "a copy is shown with its owner's id");
        assert_eq!(
            store.insert_copy(h.clone()).await.unwrap(),
            None,
            "kept once"
        );
        assert!(
            store.unreported(10).await.unwrap().is_empty(),
            "queued: nothing to say"
        );
        let taken = store.take_commands(1, 10, false).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            slot_of(taken[0].id),
            2,
            "the row here has an id of this store"
        );
        // A hand-out is answered before its commit; readers see it after.
        store.flush().await.unwrap();
        let todo = store.unreported(10).await.unwrap();
        assert_eq!(todo.len(), 1);
        assert_eq!((todo[0].0.as_str(), todo[0].2.id), ("gw-1", h.id));
        assert_eq!(todo[0].2.state, CommandState::Sent);
        store
            .mark_reported(todo[0].1, CommandState::Sent)
            .await
            .unwrap();
        assert!(store.unreported(10).await.unwrap().is_empty());
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn updates_only_move_a_command_forward() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let rec = ask(&store, "d", Route::HeldBy("gw-2".into())).await;
        let update = |state| CommandRecord {
            state,
            sent_ms: Some(5),
            attempts: 1,
            ..rec.clone()
        };
        let sent = store
            .apply_update(update(CommandState::Sent))
            .await
            .unwrap();
        assert_eq!(sent.map(|r| r.state), Some(CommandState::Sent));
        let done = store
            .apply_update(CommandRecord {
                status: Some("succeeded".into()),
                ..update(CommandState::Succeeded)
            })
            .await
            .unwrap();
        assert_eq!(done.map(|r| r.state), Some(CommandState::Succeeded));
        // A late "sent" (or anything) after the end changes nothing.
        assert_eq!(
            store
                .apply_update(update(CommandState::Sent))
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store.command(rec.id).await.unwrap().map(|r| r.state),
            Some(CommandState::Succeeded)
        );
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn a_held_command_is_not_sent_here_nor_cancelled_and_a_left_device_hands_back() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let held = ask(&store, "d", Route::HeldBy("gw-2".into())).await;
        let local = ask(&store, "d", Route::Local).await;
        assert!(matches!(
            store.cancel_command(held.id).await.unwrap(),
            crate::store::Cancel::TooLate(_)
        ));
        let taken = store.take_commands(1, 10, false).await.unwrap();
        assert_eq!(
            taken.iter().map(|c| c.id).collect::<Vec<_>>(),
            [local.id],
            "only the local one is sent here"
        );
        // The device left with the local one unanswered: it goes to the fleet.
        assert_eq!(store.hand_off("d").await.unwrap(), 1);
        let out = store.to_publish(10).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0, out[0].1.id), (local.id, local.id));
        store.mark_published(local.id, 42).await.unwrap();
        assert!(store.to_publish(10).await.unwrap().is_empty());
        writer.stop(&store).await;
    }

    #[tokio::test]
    async fn after_a_restart_commands_of_devices_not_here_go_back_to_the_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = open(dir.path());
        let h = Handoff {
            owner: "gw-1".into(),
            id: (1 << 32) + 9,
            device: "gone".into(),
            name: "go".into(),
            args: serde_json::json!({}),
            created_ms: 1,
            expires_ms: i64::MAX / 2,
        };
        store.insert_copy(h.clone()).await.unwrap().unwrap();
        let own = ask(&store, "gone", Route::Local).await;
        // (The process died here: no session event said the device left.)
        writer.stop(&store).await;
        let (store, writer) = open(dir.path());
        assert_eq!(store.hand_off_offline().await.unwrap(), 2);
        let mut ids: Vec<i64> = store
            .to_publish(10)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, h)| h.id)
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, [own.id, h.id]);
        writer.stop(&store).await;
    }
}
