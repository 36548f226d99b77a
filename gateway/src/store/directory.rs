//! The devices the store knows, in memory: id → key, and each device's current boot
//! with its highest stored seq. It lets a session open without a round trip through
//! the writer:
//!
//! ```text
//!  Hello ─► Directory::open (a lookup, or a new key) ─► Welcome{last_acked}
//!               │
//!               └─► writer: upsert the device row ─┐  (fire and forget, many per commit)
//!  telemetry commit ─► Directory::stored ◄─────────┘  (the writer, after each commit)
//! ```
//!
//! Only the current boot's mark is held: a session with another boot (a device that
//! rebooted) has its mark read from the file ([`Mark::Lookup`]), once, and that boot
//! becomes the current one.
//!
//! Two rules keep it safe:
//! - **`last_acked` never exceeds what is stored.** The writer raises a boot's mark only
//!   after the commit that stored it; the map starts from the file. It may lag (a commit
//!   lands just after a lookup): then the device replays records the store already has,
//!   and the writer drops them as duplicates. A mark that ran ahead would make a device
//!   drop records never stored.
//! - **A key belongs to one id, forever.** Keys are handed out here, never by SQLite,
//!   and never twice in a run (a device row whose insert was rolled back leaves its key
//!   unused). Every insert into `devices` names its key; the writer checks that the row
//!   holds the key the directory gave.

use std::collections::HashMap;
use std::sync::Mutex;

use device_client::proto::Seq;
use rusqlite::Connection;

use super::StoreError;

/// A device's current boot: the one its latest session announced.
#[derive(Debug, Clone, Copy, Default)]
struct Known {
    /// `None` until a session opens (a device known from a queued command).
    boot_id: Option<u64>,
    /// Highest seq of that boot the store holds (committed).
    last_seq: Option<Seq>,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<Box<str>, i64>,
    known: HashMap<i64, Known>,
    next_key: i64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Directory {
    inner: Mutex<Inner>,
}

/// What is known of a boot's mark when its session opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    /// The highest seq stored (none: nothing stored).
    Known(Option<Seq>),
    /// Not held in memory: read it from the file, then [`raise`](Directory::raise).
    Lookup,
}

/// A device the writer took out of the directory ([`Directory::remove`]), to put back
/// if that transaction fails.
#[derive(Debug)]
pub(super) struct Removed {
    id: String,
    key: i64,
    known: Known,
}

impl Directory {
    /// Reads every device, its current boot and that boot's mark.
    pub(super) fn load(c: &Connection) -> Result<Self, StoreError> {
        let mut inner = Inner::default();
        let mut stmt = c.prepare(
            "SELECT d.id, d.key, d.boot_id, b.last_seq FROM devices d
               LEFT JOIN boots b ON b.device = d.key AND b.boot_id = d.boot_id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let key: i64 = r.get(1)?;
            let known = Known {
                boot_id: r.get::<_, Option<i64>>(2)?.map(|b| b as u64),
                last_seq: r
                    .get::<_, Option<i64>>(3)?
                    .and_then(|s| Seq::try_from(s).ok()),
            };
            inner.next_key = inner.next_key.max(key);
            inner.keys.insert(id.into_boxed_str(), key);
            inner.known.insert(key, known);
        }
        inner.next_key += 1;
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session of `id` with `boot_id` opens: its key (a new one for a new device)
    /// and the highest seq of that boot stored, if held (see the module docs: never
    /// more than stored). The boot becomes the device's current one.
    pub(super) fn open(&self, id: &str, boot_id: u64) -> (i64, Mark) {
        let mut inner = self.lock();
        let new = !inner.keys.contains_key(id);
        let key = inner.key_for(id);
        let known = inner.known.entry(key).or_default();
        if known.boot_id == Some(boot_id) {
            return (key, Mark::Known(known.last_seq));
        }
        *known = Known {
            boot_id: Some(boot_id),
            last_seq: None,
        };
        // A device new to the store has no marks at all.
        (key, if new { Mark::Known(None) } else { Mark::Lookup })
    }

    /// The mark of `key`'s boot `boot_id` read from the file (a [`Mark::Lookup`]): held
    /// from now on, if that boot is still the current one.
    pub(super) fn raise(&self, key: i64, boot_id: u64, seq: Option<Seq>) {
        if let Some(seq) = seq {
            self.stored(key, boot_id, seq);
        }
    }

    /// The key of `id`, a new one if it has none (for a device known before it ever
    /// connects: a command queued for it, or the API registering it).
    pub(super) fn key(&self, id: &str) -> i64 {
        self.lock().key_for(id)
    }

    /// The writer committed records of `key`'s boot `boot_id` up to `seq`.
    pub(super) fn stored(&self, key: i64, boot_id: u64, seq: Seq) {
        if let Some(known) = self.lock().known.get_mut(&key)
            && known.boot_id == Some(boot_id)
            && known.last_seq.is_none_or(|s| seq > s)
        {
            known.last_seq = Some(seq);
        }
    }

    /// The writer deletes device `id` (row `key`): it is forgotten, unless the id has
    /// another key by now. Put it back with [`restore`](Self::restore) if the
    /// transaction fails.
    pub(super) fn remove(&self, id: &str, key: i64) -> Option<Removed> {
        let mut inner = self.lock();
        if inner.keys.get(id) != Some(&key) {
            return None;
        }
        inner.keys.remove(id);
        let known = inner.known.remove(&key).unwrap_or_default();
        Some(Removed {
            id: id.to_owned(),
            key,
            known,
        })
    }

    /// Undoes a [`remove`](Self::remove) whose transaction failed (unless the id got a
    /// new key since).
    pub(super) fn restore(&self, r: Removed) {
        let mut inner = self.lock();
        if !inner.keys.contains_key(r.id.as_str()) {
            inner.keys.insert(r.id.into_boxed_str(), r.key);
            inner.known.insert(r.key, r.known);
        }
    }
}

impl Inner {
    fn key_for(&mut self, id: &str) -> i64 {
        if let Some(&key) = self.keys.get(id) {
            return key;
        }
        let key = self.next_key;
        self.next_key += 1;
        self.keys.insert(id.into(), key);
        self.known.insert(key, Known::default());
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Directory {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(super::super::schema::SCHEMA).unwrap();
        Directory::load(&c).unwrap()
    }

    #[test]
    fn a_mark_is_held_only_for_the_current_boot() {
        let d = empty();
        let (k, last) = d.open("a", 7);
        assert_eq!(
            (k, last),
            (1, Mark::Known(None)),
            "a new device has no marks"
        );
        d.stored(k, 7, 5);
        d.stored(k, 7, 3); // a late, lower commit never lowers the mark
        assert_eq!(d.open("a", 7), (1, Mark::Known(Some(5))));
        // Another boot is looked up; commits of the old boot no longer count.
        assert_eq!(d.open("a", 8), (1, Mark::Lookup));
        d.stored(k, 7, 9);
        d.raise(k, 8, Some(2));
        assert_eq!(d.open("a", 8), (1, Mark::Known(Some(2))));
        // A lookup that found nothing, then a commit: the commit's mark.
        assert_eq!(d.open("a", 9), (1, Mark::Lookup));
        d.raise(k, 9, None);
        assert_eq!(d.open("a", 9), (1, Mark::Known(None)));
        d.stored(k, 9, 4);
        d.raise(k, 9, Some(1)); // a lookup older than a commit never lowers it
        assert_eq!(d.open("a", 9), (1, Mark::Known(Some(4))));
        // A device known from a command only: its first boot is looked up.
        assert_eq!(d.key("b"), 2);
        assert_eq!(d.open("b", 1), (2, Mark::Lookup));
    }

    #[test]
    fn keys_are_never_given_twice() {
        let d = empty();
        assert_eq!(d.open("a", 1).0, 1);
        assert_eq!(d.key("b"), 2);
        assert_eq!(d.open("b", 1).0, 2);
        let removed = d.remove("a", 1).unwrap();
        assert!(d.remove("a", 1).is_none());
        assert_eq!(d.key("a"), 3, "a deleted device comes back with a new key");
        d.restore(removed); // the id has a key again: the old one stays gone
        assert_eq!(d.key("a"), 3);
        let removed = d.remove("b", 2).unwrap();
        d.restore(removed);
        assert_eq!(d.key("b"), 2);
    }
}
