//! This gateway's side of the fleet's command traffic: devices arriving (their pending
//! commands taken from the stream) and leaving (their commands handed back), requests
//! from other gateways (deliver, update, get, cancel), and the claim of an id slot.

use super::*;

impl FleetCommands {
    /// Reads the pending commands of every device online here, and hands back to the
    /// fleet the commands of devices no longer here (a restart or a lost connection
    /// hid their session's end).
    pub(super) async fn catch_up(&self, gw: &Gateway) {
        match gw.store().hand_off_offline().await {
            Ok(0) => {}
            Ok(n) => {
                info!(
                    commands = n,
                    "commands of devices not here go back to the fleet"
                );
                self.publish_pending(gw).await;
            }
            Err(e) => warn!(error = %e, "handing commands back to the fleet failed"),
        }
        let online: Vec<String> = match gw.devices().await {
            Ok(d) => d
                .into_iter()
                .filter(|d| gw.is_online(&d.id))
                .map(|d| d.id)
                .collect(),
            Err(_) => return,
        };
        futures_util::stream::iter(online)
            .for_each_concurrent(16, |d| async move { self.take_pending(gw, &d).await })
            .await;
    }

    /// A device's session opened or ended here.
    pub(super) async fn presence(&self, gw: &Gateway, device: &str, online: bool) {
        if online {
            self.take_pending(gw, device).await;
        } else if !gw.is_online(device) {
            match gw.store().hand_off(device).await {
                Ok(0) => {}
                Ok(n) => {
                    debug!(
                        device,
                        commands = n,
                        "commands not delivered here go back to the fleet"
                    );
                    self.publish_pending(gw).await;
                }
                Err(e) => warn!(device, error = %e, "handing commands back to the fleet failed"),
            }
        }
    }

    /// Takes a device's commands out of the pending stream: those not expired are
    /// kept here (a copy, or this gateway's own marked local) for its session.
    pub(super) async fn take_pending(&self, gw: &Gateway, device: &str) {
        let Some(link) = self.link() else {
            return;
        };
        let subject = self.subject("pending", device);
        let mut from = 1;
        let mut any = false;
        loop {
            let msg = match link
                .pending
                .get_first_raw_message_by_subject(&subject, from)
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    warn!(device, error = %e, "reading a device's pending commands failed");
                    break;
                }
            };
            // A sequence from the server: saturating, so a bogus one ends the loop, not the task.
            from = msg.sequence.saturating_add(1);
            if from == u64::MAX {
                break;
            }
            match serde_json::from_slice::<Handoff>(&msg.payload) {
                Ok(h) if h.device != device => {}
                Ok(h) if h.expires_ms <= now_ms() => {
                    self.counts.expired.fetch_add(1, Ordering::Relaxed);
                    debug!(command = h.id, device, "pending command expired: dropped");
                }
                Ok(h) if h.owner == self.me() => {
                    let _ = gw.store().mark_local(h.id).await;
                    any = true;
                }
                Ok(h) => match gw.store().insert_copy(h).await {
                    Ok(Some(rec)) => {
                        self.counts.taken.fetch_add(1, Ordering::Relaxed);
                        gw.shared().publish_control(Event::Command(rec));
                        any = true;
                    }
                    Ok(None) => any = true,
                    Err(e) => {
                        // Left in the stream for the next session.
                        warn!(device, error = %e, "keeping a pending command failed");
                        continue;
                    }
                },
                Err(e) => {
                    warn!(device, error = %e, "a pending command that does not parse: dropped")
                }
            }
            if let Err(e) = link.pending.delete_message(msg.sequence).await {
                debug!(device, error = %e, "deleting a pending command failed");
            }
        }
        if any {
            gw.shared().registry.notify_commands(device);
        }
    }

    /// Answers another gateway's request.
    pub(super) async fn answer(&self, gw: &Gateway, msg: async_nats::Message) {
        let Some(reply_to) = msg.reply.clone() else {
            return;
        };
        let op = msg
            .subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let reply = match op.as_str() {
            "deliver" => match serde_json::from_slice::<Handoff>(&msg.payload) {
                Ok(h) if gw.is_online(&h.device) => {
                    let device = h.device.clone();
                    match gw.store().insert_copy(h).await {
                        Ok(rec) => {
                            if let Some(rec) = rec {
                                self.counts.taken.fetch_add(1, Ordering::Relaxed);
                                gw.shared().publish_control(Event::Command(rec));
                            }
                            gw.shared().registry.notify_commands(&device);
                            Reply {
                                ok: true,
                                ..Reply::default()
                            }
                        }
                        Err(e) => failed(e.to_string()),
                    }
                }
                Ok(_) => Reply::default(),
                Err(e) => failed(e.to_string()),
            },
            "update" => match serde_json::from_slice::<CommandRecord>(&msg.payload) {
                Ok(u) => match gw.store().apply_update(u).await {
                    Ok(rec) => {
                        if let Some(rec) = rec {
                            gw.shared().command_changed(rec);
                        }
                        Reply {
                            ok: true,
                            ..Reply::default()
                        }
                    }
                    Err(e) => failed(e.to_string()),
                },
                Err(e) => failed(e.to_string()),
            },
            "get" => match serde_json::from_slice::<ById>(&msg.payload) {
                Ok(ById { id }) => match gw.store().command(id).await {
                    Ok(command) => Reply {
                        ok: true,
                        command,
                        ..Reply::default()
                    },
                    Err(e) => failed(e.to_string()),
                },
                Err(e) => failed(e.to_string()),
            },
            "cancel" => match serde_json::from_slice::<ById>(&msg.payload) {
                Ok(ById { id }) => match gw.cancel_command(id).await {
                    Ok(c) => cancel_to_reply(c),
                    Err(e) => failed(e.to_string()),
                },
                Err(e) => failed(e.to_string()),
            },
            _ => failed(format!("unknown request {op:?}")),
        };
        if let (Some(link), Ok(body)) = (self.link(), serde_json::to_vec(&reply)) {
            let _ = link.client.publish(reply_to, body.into()).await;
        }
    }

    /// Finds this gateway's slot (the one the store numbers in, if it is still ours
    /// in the bucket) or claims a free one, and numbers new commands in it.
    pub(super) async fn claim_slot(&self, gw: &Gateway, kv: &kv::Store) -> Result<(), String> {
        let had = gw.store().id_slot().await.map_err(|e| e.to_string())?;
        let me = Bytes::from(self.me().to_owned());
        let mine = |v: &Option<Bytes>| v.as_ref() == Some(&me);
        let mut slot = None;
        if had > 0 {
            let v = kv.get(slot_key(had)).await.map_err(|e| e.to_string())?;
            if mine(&v) || (v.is_none() && kv.create(slot_key(had), me.clone()).await.is_ok()) {
                slot = Some(had);
            }
        }
        if slot.is_none() {
            for n in 1..=MAX_SLOTS {
                let v = kv.get(slot_key(n)).await.map_err(|e| e.to_string())?;
                if mine(&v) || (v.is_none() && kv.create(slot_key(n), me.clone()).await.is_ok()) {
                    slot = Some(n);
                    break;
                }
            }
        }
        let slot = slot.ok_or("no free command-id slot in the registry bucket")?;
        if slot != had {
            if had > 0 {
                warn!(
                    had,
                    slot,
                    "this gateway's command-id slot was taken by another: commands made before answer only here"
                );
            }
            gw.store()
                .set_id_slot(slot)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.slot.store(slot, Ordering::Relaxed);
        lock(&self.slots).insert(slot, self.me().to_owned());
        Ok(())
    }
}

/// The registry bucket's key for a command-id slot (`=` is not in the device-id
/// alphabet, so it never names a device).
pub(super) fn slot_key(slot: u32) -> String {
    format!("=slot.{slot}")
}

pub(super) fn failed(why: String) -> Reply {
    Reply {
        error: Some(why),
        ..Reply::default()
    }
}

pub(super) fn cancel_to_reply(c: Cancel) -> Reply {
    let (outcome, command) = match c {
        Cancel::NotFound => ("not_found", None),
        Cancel::Canceled(r) => ("canceled", Some(r)),
        Cancel::TooLate(r) => ("too_late", Some(r)),
    };
    Reply {
        ok: true,
        command,
        outcome: Some(outcome.into()),
        error: None,
    }
}

pub(super) fn reply_to_cancel(r: Reply) -> Cancel {
    match (r.outcome.as_deref(), r.command) {
        (Some("canceled"), Some(c)) => Cancel::Canceled(c),
        (Some("too_late"), Some(c)) => Cancel::TooLate(c),
        _ => Cancel::NotFound,
    }
}
