//! Live sessions by device id: one per device, takeover on reconnect, control messages.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use device_client::proto::GoodbyeReason;
use std::sync::Arc;

use tokio::sync::{Notify, oneshot};

/// What others tell a live session, in one small allocation: close (with a reason) and
/// "commands are waiting". A tokio watch channel for the close request and a `Notify`
/// for commands cost ~400 bytes per connection; this is ~80.
///
/// Nothing is lost: a request is stored first and then `wake` is notified, and
/// `Notify::notify_one` keeps a permit when the session is not waiting, so its next
/// `woken()` returns at once and it finds the request.
#[derive(Default)]
pub struct Signals {
    close: Mutex<Option<GoodbyeReason>>,
    commands: AtomicBool,
    /// With `commands`: hand out those sent to an earlier session too.
    resend: AtomicBool,
    /// The desired state changed (or the device asked for it).
    desired: AtomicBool,
    /// The device's firmware rollout changed (offer, withdraw).
    firmware: AtomicBool,
    /// State reports waiting to be recorded, merged; `Some` while a task records them
    /// (one at a time per session, however fast the device reports).
    reports: Mutex<Option<Box<PendingReports>>>,
    wake: Notify,
    /// When the device last sent anything, ms since the epoch (0: not yet).
    last_seen_ms: AtomicI64,
}

/// A device's state reports not yet recorded: the desired version it last said it
/// holds, and its values merged (a later value of a name wins).
#[derive(Debug, Default)]
pub struct PendingReports {
    /// The reports since the recording task last took them, if any.
    pub next: Option<(u32, serde_json::Map<String, serde_json::Value>)>,
}

impl Signals {
    /// Adds a report to record; `true` if no task records this session's reports now
    /// (the caller starts one, which calls [`take_reports`](Self::take_reports) until
    /// it says there are none left).
    pub fn add_report(
        &self,
        version: u32,
        values: serde_json::Map<String, serde_json::Value>,
    ) -> bool {
        let mut slot = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let start = slot.is_none();
        let pending = slot.get_or_insert_default();
        let (v, merged) = pending.next.get_or_insert_default();
        *v = version;
        merged.extend(values);
        start
    }

    /// The reports to record next; `None` (and the recording task ends) if there are
    /// none.
    pub fn take_reports(&self) -> Option<(u32, serde_json::Map<String, serde_json::Value>)> {
        let mut slot = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        let next = slot.as_mut().and_then(|p| p.next.take());
        if next.is_none() {
            *slot = None;
        }
        next
    }

    /// Asks the session to send `Goodbye` with `reason` and close (the latest reason
    /// wins).
    pub fn close(&self, reason: GoodbyeReason) {
        *self.close.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.wake.notify_one();
    }

    /// The close reason asked for, if any.
    pub fn close_reason(&self) -> Option<GoodbyeReason> {
        *self.close.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the session that commands are queued for its device (requests coalesce).
    pub fn commands_waiting(&self) {
        self.commands.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Tells the session that commands wait for its device, some perhaps sent to an
    /// earlier session that may have lost them: it hands them all out again.
    pub fn commands_waiting_resend(&self) {
        self.resend.store(true, Ordering::Release);
        self.commands_waiting();
    }

    /// Tells the session that its device's desired state changed (requests coalesce).
    pub fn desired_changed(&self) {
        self.desired.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether the desired state changed since the last call.
    pub fn take_desired(&self) -> bool {
        self.desired.swap(false, Ordering::AcqRel)
    }

    /// Tells the session that its device's firmware rollout changed.
    pub fn firmware_changed(&self) {
        self.firmware.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether the firmware rollout changed since the last call.
    pub fn take_firmware(&self) -> bool {
        self.firmware.swap(false, Ordering::AcqRel)
    }

    /// Notes that the device sent something at `now_ms`.
    pub fn seen(&self, now_ms: i64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Whether commands were signalled since the last call, and whether those sent
    /// before are to be sent again: `None`, or `Some(resend)`.
    pub fn take_commands(&self) -> Option<bool> {
        self.commands
            .swap(false, Ordering::AcqRel)
            .then(|| self.resend.swap(false, Ordering::AcqRel))
    }

    /// Resolves when something was signalled (or a permit was left by an earlier
    /// signal): check `close_reason` and `take_commands` then.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

/// A live session as others see it.
pub struct Entry {
    /// Unique per session, so a finished session only removes itself.
    pub session: u64,
    /// Close requests and command notifications for the session.
    pub signals: Arc<Signals>,
    /// Serial of the certificate the session authenticated with.
    pub serial: Vec<u8>,
    /// Resolves (with an error) when the session has ended and committed everything.
    pub ended: oneshot::Receiver<()>,
}

/// A connection past its TLS handshake that has not sent `Hello` yet.
struct Unopened {
    serial: Vec<u8>,
    signals: Arc<Signals>,
}

/// Every live session, and every authenticated connection that has not opened one yet.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Entry>>,
    /// By session number. Kept so that a reload can cut a connection between its
    /// handshake and its `Hello` as well: a certificate revoked meanwhile must never
    /// get a session (SECURITY.md, "Revocation").
    unopened: Mutex<HashMap<u64, Unopened>>,
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

    fn lock_unopened(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Unopened>> {
        // As `lock`: every update is one insert or remove.
        self.unopened.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a connection that finished its handshake and has no session yet.
    pub fn add_unopened(&self, session: u64, serial: Vec<u8>, signals: Arc<Signals>) {
        self.lock_unopened()
            .insert(session, Unopened { serial, signals });
    }

    /// Forgets a connection recorded by `add_unopened` (it opened a session, or ended).
    pub fn remove_unopened(&self, session: u64) {
        self.lock_unopened().remove(&session);
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
        self.signal(device, Signals::commands_waiting)
    }

    /// Calls `f` on a device's session's signals; false if it is offline.
    fn signal(&self, device: &str, f: impl FnOnce(&Signals)) -> bool {
        match self.lock().get(device) {
            Some(e) => {
                f(&e.signals);
                true
            }
            None => false,
        }
    }

    /// Tells a device's session that its desired state changed; false if it is offline.
    pub fn notify_desired(&self, device: &str) -> bool {
        self.signal(device, Signals::desired_changed)
    }

    /// Tells a device's session that its firmware rollout changed; false if offline.
    pub fn notify_firmware(&self, device: &str) -> bool {
        self.signal(device, Signals::firmware_changed)
    }

    /// Asks a device's session to close; false if it is offline.
    pub fn close(&self, device: &str, reason: GoodbyeReason) -> bool {
        self.signal(device, |s| s.close(reason))
    }

    /// When a device with a live session last sent a frame, ms since the epoch.
    pub fn last_seen(&self, device: &str) -> Option<i64> {
        let ms = self
            .lock()
            .get(device)?
            .signals
            .last_seen_ms
            .load(Ordering::Relaxed);
        (ms > 0).then_some(ms)
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
            e.signals.close(reason);
        }
    }

    /// Closes the sessions, and the connections not yet past `Hello`, whose certificate
    /// serial `revoked` says is revoked; returns the device ids of the sessions.
    ///
    /// A session registers itself, then checks the TLS material in force; a reload swaps
    /// the material, then calls this. So a session starting during a reload is either
    /// seen here or sees the new material itself (`session::open_session`).
    pub fn close_revoked(&self, revoked: impl Fn(&[u8]) -> bool) -> Vec<String> {
        let mut closed = Vec::new();
        for (device, e) in self.lock().iter() {
            if revoked(&e.serial) {
                e.signals.close(GoodbyeReason::Revoked);
                closed.push(device.clone());
            }
        }
        for u in self.lock_unopened().values() {
            if revoked(&u.serial) {
                u.signals.close(GoodbyeReason::Revoked);
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_signal_sent_while_the_session_is_busy_is_not_lost() {
        let s = Signals::default();
        // Nobody waits yet: the request is stored and a permit kept.
        s.close(GoodbyeReason::Revoked);
        tokio::time::timeout(Duration::from_secs(5), s.woken())
            .await
            .expect("the kept permit wakes the next wait");
        assert_eq!(s.close_reason(), Some(GoodbyeReason::Revoked));

        // Command notifications coalesce into one flag, taken once.
        s.commands_waiting();
        s.commands_waiting();
        tokio::time::timeout(Duration::from_secs(5), s.woken())
            .await
            .expect("woken by the commands");
        assert_eq!(s.take_commands(), Some(false));
        assert_eq!(s.take_commands(), None);

        // A resend request rides on the same flag, and a plain one does not clear it.
        s.commands_waiting_resend();
        s.commands_waiting();
        assert_eq!(s.take_commands(), Some(true));
        assert_eq!(s.take_commands(), None);
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken() {
        let s = Arc::new(Signals::default());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move {
                s.woken().await;
                s.take_commands()
            }
        });
        // Whether the waiter is already waiting or not, it wakes and sees the flag.
        s.commands_waiting();
        let saw = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(saw, Some(false));
    }
}
