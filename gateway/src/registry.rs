//! Live sessions by device id: one per device, takeover on reconnect, control messages.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use device_client::proto::GoodbyeReason;
use std::sync::Arc;

use tokio::sync::{Notify, oneshot, watch};

/// A live session as others see it.
pub struct Entry {
    /// Unique per session, so a finished session only removes itself.
    pub session: u64,
    /// Set to ask the session to send `Goodbye` with this reason and close. A watch
    /// cannot be full, so a close request is never lost.
    pub close: watch::Sender<Option<GoodbyeReason>>,
    /// Notified when new commands are queued for the device (notifications coalesce).
    pub commands: Arc<Notify>,
    /// Serial of the certificate the session authenticated with.
    pub serial: Vec<u8>,
    /// Resolves (with an error) when the session has ended and committed everything.
    pub ended: oneshot::Receiver<()>,
}

/// Every live session.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Entry>>,
    next: AtomicU64,
}

impl Registry {
    /// A fresh session number.
    pub fn next_session(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map stays consistent even if a holder panicked: every update is one insert
        // or remove.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session for `device`, returning the session it replaces, if any.
    pub fn insert(&self, device: &str, entry: Entry) -> Option<Entry> {
        self.lock().insert(device.to_owned(), entry)
    }

    /// Removes `device`'s entry if it still belongs to `session`.
    pub fn remove(&self, device: &str, session: u64) {
        let mut map = self.lock();
        if map.get(device).is_some_and(|e| e.session == session) {
            map.remove(device);
        }
    }

    /// Tells a device's session that commands are waiting; false if it is offline.
    pub fn notify_commands(&self, device: &str) -> bool {
        match self.lock().get(device) {
            Some(e) => {
                e.commands.notify_one();
                true
            }
            None => false,
        }
    }

    /// Asks a device's session to close; false if it is offline.
    pub fn close(&self, device: &str, reason: GoodbyeReason) -> bool {
        match self.lock().get(device) {
            Some(e) => {
                e.close.send_replace(Some(reason));
                true
            }
            None => false,
        }
    }

    /// Whether a device has a live session.
    pub fn is_online(&self, device: &str) -> bool {
        self.lock().contains_key(device)
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Asks every session to close.
    pub fn close_all(&self, reason: GoodbyeReason) {
        for e in self.lock().values() {
            e.close.send_replace(Some(reason));
        }
    }

    /// Closes the sessions whose certificate serial `revoked` says is revoked; returns
    /// their device ids.
    pub fn close_revoked(&self, revoked: impl Fn(&[u8]) -> bool) -> Vec<String> {
        let mut closed = Vec::new();
        for (device, e) in self.lock().iter() {
            if revoked(&e.serial) {
                e.close.send_replace(Some(GoodbyeReason::Revoked));
                closed.push(device.clone());
            }
        }
        closed
    }
}
