//! The fleet-wide device registry: device → (gateway, online, since) in a replicated
//! JetStream key-value bucket that every gateway of the fleet shares (docs/FLEET.md).
//!
//! ```text
//!  session opens here ── Presence(online) ──► claim: KV update(device, me, revision)
//!                                             (compare-and-set: the last claim wins)
//!  KV watch (every key, current values first) ──► mirror (device → holder, revision)
//!       └─ a newer claim by another gateway for a device with a session here
//!              ──► that session ends with Goodbye{Replaced}
//!  session ends here ── Presence(offline) ──► KV update(online: false), only if our
//!                                             claim is still the newest
//! ```
//!
//! Which session survives when a device connects to two gateways at once is decided by
//! the bucket's revisions, not by timing: each gateway's claim is a compare-and-set, so
//! the claims are ordered, and every gateway whose claim is older ends its session.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, kv, stream};
use device_client::proto::GoodbyeReason;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::Gateway;
use crate::bridge::stopped;
use crate::config::FleetSettings;
use crate::events::Event;
use crate::store::now_ms;

/// Attempts at a claim before giving up on it (each one lost to a concurrent claim).
const CLAIM_TRIES: usize = 10;

/// Who holds a device, as the bucket says (the value of its key, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The gateway that claimed it last.
    pub gateway: String,
    /// Whether its session there is open.
    pub online: bool,
    /// When that gateway claimed or released it, ms since the epoch.
    pub since_ms: i64,
    /// The device's address as that gateway saw it.
    #[serde(default)]
    pub peer: Option<String>,
}

/// The fleet registry as this gateway sees it.
pub struct FleetRegistry {
    settings: FleetSettings,
    /// Every device of the fleet: its holder and the key's revision.
    mirror: Mutex<HashMap<String, (Holder, u64)>>,
    /// Devices with a session here: the revision of our claim.
    claims: Mutex<HashMap<String, u64>>,
    /// Connected, the mirror loaded.
    pub ready: AtomicBool,
}

impl FleetRegistry {
    /// Nothing connects yet.
    pub fn new(settings: FleetSettings) -> Self {
        Self {
            settings,
            mirror: Mutex::new(HashMap::new()),
            claims: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
        }
    }

    /// This gateway's id in the fleet.
    pub fn me(&self) -> &str {
        &self.settings.gateway_id
    }

    /// Who holds `device`, if the fleet knows it.
    pub fn holder(&self, device: &str) -> Option<Holder> {
        lock(&self.mirror).get(device).map(|(h, _)| h.clone())
    }

    /// Up to `limit` devices of the fleet with ids after `after`, by id.
    pub fn page(&self, after: Option<&str>, limit: usize) -> Vec<(String, Holder)> {
        let mirror = lock(&self.mirror);
        let mut sorted: BTreeMap<&str, &Holder> = BTreeMap::new();
        for (id, (h, _)) in mirror.iter() {
            if after.is_none_or(|a| id.as_str() > a) {
                sorted.insert(id, h);
                if sorted.len() > limit {
                    sorted.pop_last();
                }
            }
        }
        sorted
            .into_iter()
            .map(|(id, h)| (id.to_owned(), h.clone()))
            .collect()
    }

    /// Keeps the registry until `stop`: claims the devices whose sessions open here,
    /// releases them when they end, and ends a session here when another gateway
    /// claimed its device later.
    pub async fn run(self: Arc<Self>, gw: Gateway, mut stop: watch::Receiver<bool>) {
        let mut control = gw.shared().subscribe_control();
        let mut backoff = super::Backoff::new();
        while let Err(why) = self.session(&gw, &mut control, &mut stop).await {
            let pause = backoff.failed(self.ready.swap(false, Ordering::Relaxed));
            warn!(error = %why, retry_in = ?pause, "fleet registry: no connection to the bucket");
            if !super::Backoff::wait(pause, &mut stop).await {
                return;
            }
        }
    }

    async fn session(
        &self,
        gw: &Gateway,
        control: &mut broadcast::Receiver<Arc<Event>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let js = super::connect(&self.settings).await?;
        let kv = open_bucket(&js, &self.settings).await?;
        let mut entries = kv
            .watch_with_history(">")
            .await
            .map_err(|e| format!("watching the bucket: {e}"))?;
        // The devices with a session here now, claimed again: a claim made while the
        // bucket was away is missing, and one made by another gateway meanwhile is
        // newer than ours and shows up in the watch.
        *control = control.resubscribe();
        self.catch_up(gw, &kv).await?;
        self.ready.store(true, Ordering::Relaxed);
        info!(bucket = %self.settings.bucket, "fleet registry ready");
        loop {
            tokio::select! {
                entry = entries.next() => match entry {
                    Some(Ok(e)) => self.seen(gw, e),
                    Some(Err(e)) => return Err(format!("watching the bucket: {e}")),
                    None => return Err("the bucket's watch ended".into()),
                },
                ev = control.recv() => match ev {
                    Ok(ev) => {
                        if let Event::Presence { device, online, peer, .. } = &*ev {
                            if *online {
                                self.claim(&kv, device, Some(peer.clone())).await;
                            } else if !gw.is_online(device) {
                                self.release(&kv, device).await;
                            }
                        }
                    }
                    // Fell behind (thousands of devices connecting at once): what the
                    // events would have said is read from the sessions instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        *control = control.resubscribe();
                        self.catch_up(gw, &kv).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                () = stopped(stop) => return Ok(()),
            }
        }
    }

    /// Claims every device with a session here that has no claim of ours, and
    /// releases those whose sessions ended, many at a time (after a connect, or after
    /// falling behind the events: a claim is a round trip to the cluster).
    async fn catch_up(&self, gw: &Gateway, kv: &kv::Store) -> Result<(), String> {
        const AT_ONCE: usize = 64;
        let ended: Vec<String> = lock(&self.claims)
            .keys()
            .filter(|d| !gw.is_online(d))
            .cloned()
            .collect();
        futures_util::stream::iter(ended)
            .for_each_concurrent(AT_ONCE, |d| async move { self.release(kv, &d).await })
            .await;
        let online: Vec<String> = gw
            .devices()
            .await
            .map_err(|e| format!("reading the devices: {e}"))?
            .into_iter()
            .filter(|d| gw.is_online(&d.id) && !lock(&self.claims).contains_key(&d.id))
            .map(|d| d.id)
            .collect();
        futures_util::stream::iter(online)
            .for_each_concurrent(AT_ONCE, |d| async move { self.claim(kv, &d, None).await })
            .await;
        Ok(())
    }

    /// Writes "held here, online" over whatever the key holds (compare-and-set on its
    /// revision, again if another gateway wrote in between).
    async fn claim(&self, kv: &kv::Store, device: &str, peer: Option<String>) {
        let value = Holder {
            gateway: self.settings.gateway_id.clone(),
            online: true,
            since_ms: now_ms(),
            peer,
        };
        let Ok(bytes) = serde_json::to_vec(&value) else {
            return;
        };
        for _ in 0..CLAIM_TRIES {
            let written = match kv.entry(device).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => kv
                    .update(device, bytes.clone().into(), e.revision)
                    .await
                    .map_err(|e| e.to_string()),
                Ok(_) => kv
                    .create(device, bytes.clone().into())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match written {
                Ok(revision) => {
                    lock(&self.claims).insert(device.to_owned(), revision);
                    return;
                }
                // Another gateway wrote between our read and our write: read again.
                Err(_) => continue,
            }
        }
        warn!(
            device,
            "fleet registry: could not claim a device (too many concurrent claims)"
        );
    }

    /// Writes "offline" if our claim is still the newest.
    async fn release(&self, kv: &kv::Store, device: &str) {
        let Some(revision) = lock(&self.claims).remove(device) else {
            return;
        };
        let value = Holder {
            gateway: self.settings.gateway_id.clone(),
            online: false,
            since_ms: now_ms(),
            peer: None,
        };
        if let Ok(bytes) = serde_json::to_vec(&value) {
            // Fails if another gateway claimed it since: then it is not ours to release.
            let _ = kv.update(device, bytes.into(), revision).await;
        }
    }

    /// A key changed (or is reported at the start of the watch).
    fn seen(&self, gw: &Gateway, e: kv::Entry) {
        // `=slot.N`: a gateway's command-id slot (fleet/commands.rs), not a device.
        if e.key.starts_with('=') {
            return;
        }
        if e.operation != kv::Operation::Put {
            lock(&self.mirror).remove(&e.key);
            return;
        }
        let Ok(holder) = serde_json::from_slice::<Holder>(&e.value) else {
            warn!(key = %e.key, "fleet registry: a value that is not a holder");
            return;
        };
        let newer_elsewhere = holder.gateway != self.settings.gateway_id
            && lock(&self.claims)
                .get(&e.key)
                .is_some_and(|ours| e.revision > *ours);
        if newer_elsewhere {
            lock(&self.claims).remove(&e.key);
            if gw.shared().registry.close(&e.key, GoodbyeReason::Replaced) {
                info!(device = %e.key, by = %holder.gateway, "session replaced by another gateway of the fleet");
            }
        }
        lock(&self.mirror).insert(e.key, (holder, e.revision));
    }
}

/// The bucket, made if missing. Made as its backing stream (`KV_<bucket>`): the
/// client's bucket creation fails against nats-server 2.9.
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    s: &FleetSettings,
) -> Result<kv::Store, String> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{}", s.bucket),
        subjects: vec![format!("$KV.{}.>", s.bucket)],
        max_messages_per_subject: 1,
        num_replicas: s.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("bucket {}: {e}", s.bucket))?;
    js.get_key_value(s.bucket.clone())
        .await
        .map_err(|e| format!("bucket {}: {e}", s.bucket))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
