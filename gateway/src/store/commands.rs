//! Commands: queued for a device, handed out to its session, ended by its result or
//! its time to live (PROTOCOL.md §8.3).

use std::time::Duration;

use device_client::proto::CommandStatus;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::oneshot;

use super::writer::{Op, OpOutcome, Pending, Writer};
use super::{Route, Store, StoreError, now_ms};
use crate::values::{self, OwnedReadings};

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

    /// The state stored as `s`; `None` for a name no version of the gateway wrote.
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Reads a state column; a name that is not a state is an error of the row (a
    /// damaged store), not a guess.
    fn from_column(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Self> {
        let name: String = r.get(at)?;
        Self::parse(&name).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                at,
                rusqlite::types::Type::Text,
                format!("{name:?} is not a command state").into(),
            )
        })
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
    /// The row's id in this store (the device is sent its low 32 bits; a copy of
    /// another gateway's command has an id of its own here, its record the owner's).
    pub id: i64,
    /// The command's name, as the device matches it.
    pub name: String,
    /// Arguments, bounded and valid.
    pub args: OwnedReadings,
    /// When its time to live ends, ms since the epoch.
    pub expires_ms: i64,
    /// The command as the API shows it, now `sent` (for the event stream).
    pub record: Option<CommandRecord>,
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

impl Store {
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
        let (device, name, now) = (device.to_owned(), name.to_owned(), now_ms());
        self.write_with(move |w| enqueue(w, &device, &name, &args, ttl_ms, now, &route))
            .await
    }

    /// Marks up to `limit` deliverable commands of a device `sent` and returns them,
    /// oldest first, never expired ones: the queued ones, and with `include_sent` also
    /// those sent without a result yet (a previous session may have lost them).
    ///
    /// Answered before the commit, unlike every other operation, and committed without
    /// an fsync when nothing else shares its commit: the device gets its commands one
    /// fsync sooner (a command's round trip has three commits otherwise). Safe because
    /// delivery is at least once: if this transaction is lost, the commands are still
    /// queued (or sent) and go out again; devices ignore a command id they have run
    /// (PROTOCOL.md).
    pub async fn take_commands(
        &self,
        device_key: i64,
        limit: usize,
        include_sent: bool,
    ) -> Result<Vec<OutgoingCommand>, StoreError> {
        let (reply, rx) = oneshot::channel();
        let now = now_ms();
        self.send(Op::Write {
            fsync: false,
            f: Box::new(move |w| {
                let taken = match w {
                    Some(w) => take_commands(w, device_key, now, limit, include_sent),
                    None => Err(StoreError::Closed),
                };
                let outcome = OpOutcome::of(&taken);
                let _ = reply.send(taken);
                (Pending::nothing(), outcome)
            }),
        })
        .await?;
        rx.await.map_err(|_| StoreError::Closed)?
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
        let end = CommandEnd {
            state,
            status,
            result,
            error,
        };
        let now = now_ms();
        self.write_with(move |w| finish(w, device_key, id, &end, now))
            .await
    }

    /// Marks every command whose time to live has run out `expired`; returns them.
    pub async fn expire_commands(&self) -> Result<Vec<CommandRecord>, StoreError> {
        let now = now_ms();
        self.write_with(move |w| expire(w, now)).await
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

    /// Number of commands in each state.
    pub async fn command_counts(&self) -> Result<Vec<(CommandState, u64)>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT state, count(*) FROM commands GROUP BY state")?;
            let rows = stmt.query_map([], |r| {
                Ok((CommandState::from_column(r, 0)?, r.get::<_, i64>(1)? as u64))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
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
        state: CommandState::from_column(r, 4)?,
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

pub(super) fn command_by_id(c: &Connection, id: i64) -> Result<Option<CommandRecord>, StoreError> {
    let mut stmt = c.prepare_cached(&format!("{COMMAND_SELECT} WHERE c.id = ?1"))?;
    Ok(stmt.query_row([id], command_from_row).optional()?)
}

fn enqueue(
    w: &Writer,
    device: &str,
    name: &str,
    args: &OwnedReadings,
    ttl_ms: i64,
    now_ms: i64,
    route: &Route,
) -> Result<CommandRecord, StoreError> {
    let c = &w.conn;
    let key = device_key(w, device)?;
    let queued: i64 = c
        .prepare_cached(
            "SELECT count(*) FROM commands WHERE device = ?1 AND state IN ('queued', 'sent')",
        )?
        .query_row([key], |r| r.get(0))?;
    if queued as usize >= w.max_queued_commands {
        return Err(StoreError::QueueFull {
            device: device.to_owned(),
            queued: queued as usize,
            limit: w.max_queued_commands,
        });
    }
    let (fleet, held_by) = match route {
        Route::Local => (None, None),
        Route::Publish => (Some("publish"), None),
        Route::HeldBy(g) => (Some("held"), Some(g.as_str())),
    };
    let id = insert_queued(
        c,
        &Queued {
            device_key: key,
            name,
            args: &values::owned_to_json(args),
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl_ms),
            fleet,
            held_by,
            owner: None,
        },
    )?;
    command_by_id(c, id)?.ok_or(StoreError::NoSuchCommand(id))
}

/// The key of device `id`, made if the device has never connected yet (a command may
/// be queued for it before its first session).
pub(super) fn device_key(w: &Writer, id: &str) -> Result<i64, StoreError> {
    let key = w.directory.key(id);
    let stored = w.conn.query_row(
        "INSERT INTO devices(key, id) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET id = id RETURNING key",
        params![key, id],
        |r| r.get(0),
    )?;
    super::devices::same_key(id, key, stored)?;
    Ok(key)
}

/// A command to queue: its row in `commands`, with the fleet columns that say where
/// it may be delivered (`fleet`, `held_by`) or whose copy it is (`owner`).
pub(super) struct Queued<'a> {
    pub(super) device_key: i64,
    pub(super) name: &'a str,
    pub(super) args: &'a Json,
    pub(super) created_ms: i64,
    pub(super) expires_ms: i64,
    pub(super) fleet: Option<&'a str>,
    pub(super) held_by: Option<&'a str>,
    /// The owning gateway and the command's id there.
    pub(super) owner: Option<(&'a str, i64)>,
}

/// Inserts `q` as a queued command; returns its id here.
pub(super) fn insert_queued(c: &Connection, q: &Queued<'_>) -> rusqlite::Result<i64> {
    c.execute(
        "INSERT INTO commands(device, name, args, state, created_ms, expires_ms, fleet,
                              held_by, owner, owner_id)
         VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            q.device_key,
            q.name,
            q.args.to_string(),
            q.created_ms,
            q.expires_ms,
            q.fleet,
            q.held_by,
            q.owner.map(|(g, _)| g),
            q.owner.map(|(_, id)| id)
        ],
    )?;
    Ok(c.last_insert_rowid())
}

pub(super) fn take_commands(
    w: &Writer,
    device_key: i64,
    now_ms: i64,
    limit: usize,
    include_sent: bool,
) -> Result<Vec<OutgoingCommand>, StoreError> {
    let c = &w.conn;
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
    w: &Writer,
    device_key: i64,
    id: i64,
    end: &CommandEnd,
    now_ms: i64,
) -> Result<Option<CommandRecord>, StoreError> {
    let c = &w.conn;
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

fn expire(w: &Writer, now_ms: i64) -> Result<Vec<CommandRecord>, StoreError> {
    let c = &w.conn;
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
