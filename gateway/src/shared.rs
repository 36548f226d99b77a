//! What the listener, the sessions, the API and the sinks share: settings, the store,
//! TLS material, the registry of sessions, metrics and the event channels.

use super::*;

/// State shared by the listener, the sessions and the handle.
pub(crate) struct Shared {
    /// Settings.
    pub config: Config,
    /// The settings every session obeys (from `config`).
    pub session_rules: Arc<session::machine::Rules>,
    /// The store.
    pub store: Store,
    /// TLS material, reloadable.
    pub tls: TlsState,
    /// Live sessions.
    pub registry: Registry,
    /// Counters.
    pub metrics: Metrics,
    pub(crate) events: broadcast::Sender<Arc<Event>>,
    /// Presence and command events only, for the bridge: a few per device, where
    /// `events` carries every record too.
    pub(crate) control: broadcast::Sender<Arc<Event>>,
    /// Set once to make every task wind down.
    pub shutting_down: watch::Sender<bool>,
    /// Device connections past the handshake at once (`max_connections`, or what the
    /// open-file limit leaves: [`budget::plan`]).
    pub max_connections: usize,
    pub(crate) waiters: Mutex<HashMap<i64, Vec<oneshot::Sender<CommandRecord>>>>,
    pub(crate) refusals: Mutex<std::collections::VecDeque<events::Refused>>,
    /// Whether `refusals` changed since it was last saved.
    pub(crate) refusals_changed: std::sync::atomic::AtomicBool,
    pub(crate) log_gates: loglimit::LogGates,
    /// What the last look found the CRL to be (0 fine, 1 due within a week, 2 stale),
    /// to warn once per change.
    pub(crate) crl_state: std::sync::atomic::AtomicU8,
    /// Whether the gateway certificate's coming expiry was warned about.
    pub(crate) gateway_cert_warned: std::sync::atomic::AtomicBool,
    /// The MQTT bridge's state, if it runs.
    pub bridge: Option<Arc<bridge::BridgeStatus>>,
    /// The fleet sink's state, if it runs.
    pub fleet: Option<Arc<fleet::FleetStatus>>,
    /// The fleet's device registry, if this gateway is in a fleet.
    pub fleet_registry: Option<Arc<fleet::registry::FleetRegistry>>,
    /// Commands across the fleet, if this gateway is in one.
    pub fleet_commands: Option<Arc<fleet::commands::FleetCommands>>,
    /// Firmware rollouts.
    pub firmware: firmware::Service,
}

/// Refused handshakes kept for `recent_refusals` (and saved in the store).
const KEEP_REFUSALS: usize = 200;

impl Shared {
    /// Remembers a refused handshake (the newest [`KEEP_REFUSALS`]) and publishes it.
    pub fn refused(&self, r: events::Refused) {
        {
            let mut q = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() == KEEP_REFUSALS {
                q.pop_front();
            }
            q.push_back(r.clone());
        }
        self.refusals_changed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.publish(|| Event::HandshakeRefused {
            peer: r.peer,
            reason: r.reason,
            time_ms: r.time_ms,
            subject: r.subject,
            serial: r.serial,
        });
    }

    /// Whether anyone listens to live events (events are only built if so).
    pub fn has_subscribers(&self) -> bool {
        self.events.receiver_count() > 0
    }

    /// Publishes an event built by `make`, if anyone listens.
    pub fn publish(&self, make: impl FnOnce() -> Event) {
        if self.has_subscribers() {
            let _ = self.events.send(Arc::new(make()));
        }
    }

    /// Publishes a presence or command event: to live subscribers, and to the bridge.
    pub fn publish_control(&self, event: Event) {
        let event = Arc::new(event);
        if self.control.receiver_count() > 0 {
            let _ = self.control.send(event.clone());
        }
        if self.has_subscribers() {
            let _ = self.events.send(event);
        }
    }

    /// Presence and command events from now on (what the bridge relays).
    pub fn subscribe_control(&self) -> broadcast::Receiver<Arc<Event>> {
        self.control.subscribe()
    }

    /// A command changed state: publish it, and wake whoever waits for its end.
    pub fn command_changed(&self, rec: CommandRecord) {
        let rec_id = rec.id;
        if rec.state.is_final() {
            let waiting = self
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&rec.id);
            for tx in waiting.into_iter().flatten() {
                let _ = tx.send(rec.clone());
            }
        }
        self.publish_control(Event::Command(rec));
        // A copy of another gateway's command (shown with its owner's id, in another
        // slot): its new state goes to the owner now, not at the next retry tick.
        if let Some(fc) = &self.fleet_commands
            && store::slot_of(rec_id) != fc.slot()
        {
            fc.poke();
        }
    }

    /// Why the gateway cannot keep what it acknowledges right now, if it cannot: what
    /// `/healthz` reports.
    pub fn unhealthy(&self) -> Option<store::Failing> {
        self.store.failing()
    }

    /// Saves the refused handshakes kept in memory, if they changed since the last
    /// save (so they survive a restart; a crash loses at most the last few seconds).
    pub async fn save_refusals(&self) {
        use std::sync::atomic::Ordering;
        if !self.refusals_changed.swap(false, Ordering::Relaxed) {
            return;
        }
        let list: Vec<_> = {
            let q = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            q.iter().cloned().collect()
        };
        if let Err(e) = self.store.save_refusals(list).await {
            warn!(error = %e, "could not save the refused handshakes");
        }
    }

    /// Looks at the CRL's next-update date and the gateway certificate's expiry: warns
    /// from [`WARN_AHEAD_S`] before either (once per change of state, until fresh ones
    /// are loaded), and again once the CRL has passed; returns whether it has.
    pub fn check_crl(&self) -> bool {
        use std::sync::atomic::Ordering;
        let material = self.tls.current();
        let now = tls::unix_now();
        let stale = material.crl_stale(now);
        let soon = |t: Option<i64>| t.is_some_and(|t| t - now < WARN_AHEAD_S);
        // 0: fine, 1: within the warning period, 2: past it.
        let state = if stale {
            2
        } else {
            u8::from(soon(material.crl_next_update))
        };
        let was = self.crl_state.swap(state, Ordering::Relaxed);
        let next_update = material.crl_next_update.unwrap_or_default();
        match (was, state) {
            (w, 2) if w != 2 => {
                let policy = if self.config.refuse_stale_crl {
                    "every device is refused until it is (refuse_stale_crl)"
                } else {
                    "its revocations still apply; set refuse_stale_crl to refuse devices instead"
                };
                warn!(
                    next_update,
                    "the CRL is past its next update: re-sign it (certs crl --dir DIR \
                     --refresh) and reload (SIGHUP); {policy}"
                );
            }
            (w, 1) if w != 1 => warn!(
                next_update,
                days_left = (next_update - now) / 86_400,
                "the CRL's next update is less than 7 days away: re-sign it (certs crl \
                 --dir DIR --refresh) and reload (SIGHUP) before then"
            ),
            (w, 0) if w != 0 => info!("the CRL is fresh again"),
            _ => {}
        }
        let gw_soon = soon(material.gateway_not_after);
        if gw_soon && !self.gateway_cert_warned.swap(true, Ordering::Relaxed) {
            warn!(
                not_after = material.gateway_not_after.unwrap_or_default(),
                "the gateway's certificate expires in less than 7 days: renew it (certs \
                 renew) and reload (SIGHUP)"
            );
        } else if !gw_soon {
            self.gateway_cert_warned.store(false, Ordering::Relaxed);
        }
        stale
    }
}
