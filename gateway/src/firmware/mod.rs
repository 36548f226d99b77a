//! Firmware updates (protocol version 3): uploaded images and their rollouts.
//!
//! ```text
//!  POST /api/v1/firmware ─► store (image + signed manifest)
//!  POST /api/v1/rollouts ─► store ─► Rollouts (memory) ─► wake sessions
//!  session: Hello ─► Rollouts::hello ─► offer? ─► chunks ◄─► device
//!           FirmwareStatus / chunk sent ─► Rollouts ─► writes (one task, in order),
//!                                                      events, sessions to wake
//! ```

mod image;
pub mod rollout;
pub mod upload;

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::warn;

pub use image::Image;
pub use rollout::{Effects, Rollouts, Settings};

use crate::Shared;
use crate::store::{RolloutWrite, Store};

/// The rollouts of a gateway, and the queue that persists their changes in order.
pub struct Service {
    /// The key uploads must be signed by (`release_key`); `None`: uploads refused.
    pub release_key: Option<upload::ReleaseKey>,
    rollouts: Mutex<Rollouts>,
    persist: mpsc::UnboundedSender<Persist>,
}

/// What the writing task does next.
enum Persist {
    /// Store these changes.
    Writes(Vec<RolloutWrite>),
    /// Say when everything before this is stored.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl Service {
    /// The rollouts the store holds, and a task writing their changes to it.
    pub async fn load(
        store: &Store,
        release_key: Option<upload::ReleaseKey>,
    ) -> Result<Self, crate::store::StoreError> {
        let rows = store.load_rollouts().await?;
        let mut images = std::collections::HashMap::new();
        for row in &rows {
            if let std::collections::hash_map::Entry::Vacant(slot) = images.entry(row.firmware) {
                let img = store
                    .load_firmware(crate::store::FirmwareKey::Id(row.firmware))
                    .await?;
                slot.insert(img.map(Arc::new));
            }
        }
        let rollouts = Rollouts::load(rows, |id| images.get(&id).cloned().flatten());
        let (tx, mut rx) = mpsc::unbounded_channel::<Persist>();
        let store = store.clone();
        tokio::spawn(async move {
            // One writer: changes reach the store in the order they happened, those
            // that queue up meanwhile in one commit.
            let mut flushed = Vec::new();
            while let Some(first) = rx.recv().await {
                let mut writes = Vec::new();
                let mut next = Some(first);
                while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
                    match msg {
                        Persist::Writes(w) => writes.extend(w),
                        Persist::Flush(done) => flushed.push(done),
                    }
                }
                if !writes.is_empty()
                    && let Err(e) = store.save_rollout_changes(writes).await
                {
                    warn!(error = %e, "storing rollout progress failed");
                }
                for done in flushed.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        Ok(Self {
            release_key,
            rollouts: Mutex::new(rollouts),
            persist: tx,
        })
    }

    /// Runs `f` on the rollouts.
    pub fn with<T>(&self, f: impl FnOnce(&mut Rollouts) -> T) -> T {
        f(&mut self.rollouts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `f`, then does what it asks: persist, publish, wake sessions.
    pub fn change(&self, shared: &Shared, f: impl FnOnce(&mut Rollouts) -> Effects) {
        let fx = self.with(f);
        self.apply(shared, fx);
    }

    /// Waits until every change made so far is stored (the gateway's shutdown, before
    /// the store closes).
    pub async fn flush(&self) {
        let (done, stored) = tokio::sync::oneshot::channel();
        if self.persist.send(Persist::Flush(done)).is_ok() {
            let _ = stored.await;
        }
    }

    /// Persists, publishes and wakes what `fx` says.
    pub fn apply(&self, shared: &Shared, fx: Effects) {
        if !fx.writes.is_empty() {
            // The receiver lives as long as the runtime: a send fails only at exit.
            let _ = self.persist.send(Persist::Writes(fx.writes));
        }
        for e in fx.events {
            shared.publish(|| e);
        }
        for d in fx.wake {
            shared.registry.notify_firmware(&d);
        }
    }
}
