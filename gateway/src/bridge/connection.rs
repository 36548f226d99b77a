//! One connection to the broker: telemetry relayed after the store's cursor (a window
//! of QoS 1 publishes, the cursor moved past what the broker acknowledged), presence and
//! command states as notes, command requests taken in, Home Assistant discovery.

use super::*;

/// What the bridge keeps from one connection to the next.
pub(super) struct Relay {
    pub(super) gw: Gateway,
    /// Presence and command events.
    pub(super) control: broadcast::Receiver<Arc<GatewayEvent>>,
    /// Commands requested over MQTT 5 with a Response Topic: where their state
    /// changes go, until the final one.
    pub(super) replies: HashMap<i64, Reply>,
    /// (device, reading) pairs announced to Home Assistant.
    pub(super) announced: HashSet<(String, String)>,
}

/// Where a command's state changes go.
pub(super) struct Reply {
    pub(super) topic: String,
    pub(super) correlation: Option<Bytes>,
}

/// A message that is not a record: status, presence, a command's state, an
/// announcement. Not kept in the store: after an outage the current state is sent.
pub(super) struct Note {
    pub(super) topic: String,
    pub(super) payload: Vec<u8>,
    pub(super) retain: bool,
    pub(super) correlation: Option<Bytes>,
}

/// A command request's payload (docs/MQTT.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Request {
    pub(super) name: String,
    #[serde(default)]
    pub(super) args: Json,
    pub(super) ttl_s: Option<f64>,
}

/// One connection to the broker.
pub(super) struct Connection<'a> {
    pub(super) bridge: &'a Bridge,
    pub(super) relay: &'a mut Relay,
    /// Notes waiting for room in the client's channel.
    pub(super) outbox: VecDeque<Note>,
    pub(super) client: Client,
    pub(super) events: Events,
    /// Every record up to this row was delivered.
    pub(super) cursor: i64,
    /// The cursor as last committed.
    pub(super) saved: i64,
    /// The last row handed to the client.
    pub(super) next: i64,
    /// Rows published and not yet delivered, in order, with whether their PUBACK came.
    pub(super) in_flight: VecDeque<(i64, bool)>,
    /// Publishes handed to the client that have no packet id yet (`None`: the status
    /// message, not a record). The client sends them in this order.
    pub(super) unassigned: VecDeque<Option<i64>>,
    pub(super) by_pkid: HashMap<u16, i64>,
}

impl Connection<'_> {
    /// Until `stop` (then `Ok`) or a connection error (its reason).
    pub(super) async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), String> {
        let status = &self.bridge.status;
        // CONNACK first.
        loop {
            let ev = tokio::select! {
                ev = tokio::time::timeout(CONNECT_TIMEOUT * 2, self.events.poll()) => ev,
                () = stopped(stop) => return Ok(()),
            };
            match ev {
                Ok(Ok(Happened::ConnAck)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("no CONNACK in time".into()),
            }
        }
        status.connected.store(true, Ordering::Relaxed);
        status.connects.fetch_add(1, Ordering::Relaxed);
        info!(broker = %self.bridge.settings.url, cursor = self.cursor, "MQTT bridge connected");
        let s = &self.bridge.settings;
        let online = json!({"state": "online", "gateway": s.gateway_id, "time_ms": now_ms()});
        self.outbox.push_back(Note {
            topic: format!("{}/gateways/{}/status", s.topic_prefix, s.gateway_id),
            payload: online.to_string().into_bytes(),
            retain: true,
            correlation: None,
        });
        if s.accept_commands {
            self.client
                .subscribe(format!("{}/devices/+/commands/request", s.topic_prefix))
                .await?;
        }
        self.resync().await;

        let mut commits = self.bridge.store.watch_commits();
        let mut tick = tokio::time::interval(CURSOR_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut more = true;
        loop {
            self.flush_outbox().await?;
            // Refilled by half a window at a time: one read of the store per 128
            // records, not one per PUBACK.
            if more && self.in_flight.len() <= WINDOW / 2 && self.unassigned.len() < UNSENT {
                more = self.publish_more().await?;
            }
            let room = self.outbox.len() < OUTBOX;
            tokio::select! {
                ev = self.events.poll() => match ev {
                    Ok(ev) => {
                        if let Some(request) = self.on_event(ev) {
                            self.command_request(request).await?;
                        }
                    }
                    Err(e) => {
                        self.save_cursor().await;
                        return Err(e);
                    }
                },
                ev = self.relay.control.recv(), if room => match ev {
                    Ok(ev) => self.on_control(&ev),
                    // Fell behind: what is current is read from the store instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.resync().await,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                changed = commits.changed(), if !more => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    more = true;
                }
                _ = tick.tick() => {
                    self.save_cursor().await;
                    // A commit seen before `commits` was read is not lost: look again.
                    more = true;
                }
                () = stopped(stop) => {
                    self.drain_acks().await;
                    self.save_cursor().await;
                    self.client.disconnect().await;
                    return Ok(());
                }
            }
        }
    }

    /// After a (re)connect or falling behind the events: every device's presence as
    /// the store has it, and the state of every command whose replies are awaited.
    pub(super) async fn resync(&mut self) {
        self.relay.control = self.relay.control.resubscribe();
        self.outbox.clear();
        match self.relay.gw.devices().await {
            Ok(devices) => {
                for d in devices {
                    let note = self.presence(&d.id, d.online, None);
                    self.outbox.push_back(note);
                }
            }
            Err(e) => warn!(error = %e, "MQTT bridge: could not read the devices' presence"),
        }
        let ids: Vec<i64> = self.relay.replies.keys().copied().collect();
        for id in ids {
            match self.relay.gw.store().command(id).await {
                Ok(Some(rec)) => self.command_changed(&rec),
                Ok(None) => {
                    self.relay.replies.remove(&id);
                }
                Err(e) => warn!(error = %e, id, "MQTT bridge: could not read a command"),
            }
        }
    }

    pub(super) fn on_control(&mut self, ev: &GatewayEvent) {
        match ev {
            GatewayEvent::Presence {
                device,
                online,
                reason,
                ..
            } => {
                let note = self.presence(device, *online, reason.as_deref());
                self.outbox.push_back(note);
            }
            GatewayEvent::Command(rec) => self.command_changed(rec),
            _ => {}
        }
    }

    pub(super) fn presence(&self, device: &str, online: bool, reason: Option<&str>) -> Note {
        let mut payload = json!({
            "state": if online { "online" } else { "offline" },
            "gateway": self.bridge.settings.gateway_id,
            "time_ms": now_ms(),
        });
        if let Some(r) = reason {
            payload["reason"] = r.into();
        }
        Note {
            topic: self.bridge.topic(device, "presence"),
            payload: payload.to_string().into_bytes(),
            retain: true,
            correlation: None,
        }
    }

    /// A command's new state, to its requester's Response Topic or to the device's
    /// `commands/response`.
    pub(super) fn command_changed(&mut self, rec: &CommandRecord) {
        let (topic, correlation) = match self.relay.replies.get(&rec.id) {
            Some(r) => (r.topic.clone(), r.correlation.clone()),
            None => (self.bridge.topic(&rec.device, "commands/response"), None),
        };
        if rec.state.is_final() {
            self.relay.replies.remove(&rec.id);
        }
        match serde_json::to_vec(rec) {
            Ok(payload) => self.outbox.push_back(Note {
                topic,
                payload,
                retain: false,
                correlation,
            }),
            Err(e) => warn!(error = %e, id = rec.id, "MQTT bridge: a command did not serialize"),
        }
    }

    /// A command request from the broker: queued exactly as the HTTP API queues one,
    /// or answered with an error; acknowledged to the broker after either. A retained
    /// request is acknowledged and ignored: a command runs when it is asked for, not
    /// each time the bridge subscribes.
    pub(super) async fn command_request(&mut self, p: Incoming) -> Result<(), String> {
        let topic = p.topic();
        let device = self.bridge.request_device(&topic).map(str::to_owned);
        if let (Some(device), false) = (device, p.retained()) {
            self.bridge.status.commands.fetch_add(1, Ordering::Relaxed);
            let (response_topic, correlation) = p.reply_to();
            let response_topic =
                response_topic.filter(|t| !t.is_empty() && !t.contains(['+', '#', '\0']));
            let outcome = queue_command(&self.relay.gw, &device, p.payload()).await;
            let topic = response_topic
                .clone()
                .unwrap_or_else(|| self.bridge.topic(&device, "commands/response"));
            match outcome {
                Ok(rec) => {
                    debug!(device, id = rec.id, "MQTT bridge: command queued");
                    if response_topic.is_some() {
                        // Its `queued` event is still in the channel: it goes here.
                        self.relay
                            .replies
                            .insert(rec.id, Reply { topic, correlation });
                    }
                }
                Err((code, message)) => {
                    info!(device, code, error = %message, "MQTT bridge: command request refused");
                    if self.outbox.len() >= OUTBOX {
                        // A flood of bad requests while the broker takes nothing: the
                        // answers are what gives way, not memory.
                        return self.client.ack(&p).await;
                    }
                    self.outbox.push_back(Note {
                        topic,
                        payload: json!({"error": message, "code": code, "device": device})
                            .to_string()
                            .into_bytes(),
                        retain: false,
                        correlation,
                    });
                }
            }
        }
        self.client.ack(&p).await
    }

    /// Hands waiting notes to the client while there is room.
    pub(super) async fn flush_outbox(&mut self) -> Result<(), String> {
        while self.unassigned.len() < UNSENT {
            let Some(note) = self.outbox.pop_front() else {
                break;
            };
            self.send_note(note).await?;
        }
        Ok(())
    }

    pub(super) async fn send_note(&mut self, note: Note) -> Result<(), String> {
        self.unassigned.push_back(None);
        self.client
            .publish(Message {
                topic: note.topic,
                payload: note.payload,
                retain: note.retain,
                at_least_once: self.bridge.at_least_once(),
                content_type: "application/json",
                user_properties: Vec::new(),
                correlation: note.correlation,
            })
            .await
    }

    /// Hands the next records to the client, up to the window; `false` once there is
    /// nothing more to send now.
    pub(super) async fn publish_more(&mut self) -> Result<bool, String> {
        let room = WINDOW - self.in_flight.len();
        let rows = self
            .bridge
            .store
            .telemetry_after(self.next, room)
            .await
            .map_err(|e| format!("reading the store: {e}"))?;
        let mut more = rows.len() == room;
        for rec in rows {
            let values = body_to_json(&rec.body);
            let announce = self.announcements(&rec.device, &values);
            if self.unassigned.len() + announce.len() >= UNSENT {
                // The rest is read again once there is room.
                more = true;
                break;
            }
            for note in announce {
                self.send_note(note).await?;
            }
            let (payload, content_type) = match self.bridge.settings.payload {
                PayloadFormat::Json => (json_payload(&rec, values), "application/json"),
                PayloadFormat::Postcard => (rec.body.clone(), "application/x-postcard"),
            };
            self.unassigned.push_back(Some(rec.row));
            self.in_flight.push_back((rec.row, false));
            self.next = rec.row;
            self.client
                .publish(Message {
                    topic: self.bridge.topic(&rec.device, "telemetry"),
                    payload,
                    retain: false,
                    at_least_once: self.bridge.at_least_once(),
                    content_type,
                    user_properties: vec![
                        ("boot".into(), rec.boot_id.to_string()),
                        ("seq".into(), rec.seq.to_string()),
                    ],
                    correlation: None,
                })
                .await?;
        }
        Ok(more)
    }

    /// Home Assistant discovery configs for readings of `device` not announced yet
    /// (none unless `mqtt.home_assistant`).
    pub(super) fn announcements(&mut self, device: &str, values: &Map<String, Json>) -> Vec<Note> {
        let s = &self.bridge.settings;
        if !s.home_assistant {
            return Vec::new();
        }
        let mut notes = Vec::new();
        for (key, value) in values {
            let pair = (device.to_owned(), key.clone());
            if self.relay.announced.contains(&pair) {
                continue;
            }
            if self.relay.announced.len() >= ANNOUNCED {
                self.relay.announced.clear();
            }
            self.relay.announced.insert(pair);
            notes.push(home_assistant_config(s, device, key, value));
        }
        notes
    }

    /// Notes what happened; returns a command request to be handled.
    pub(super) fn on_event(&mut self, ev: Happened) -> Option<Incoming> {
        match ev {
            Happened::Request(p) => return Some(p),
            Happened::Sent(pkid) => {
                let row = self.unassigned.pop_front()?;
                match (row, self.bridge.at_least_once()) {
                    // QoS 0: sent is all there will be.
                    (Some(row), false) => self.delivered(row),
                    (Some(row), true) => {
                        self.by_pkid.insert(pkid, row);
                    }
                    (None, _) => {}
                }
            }
            Happened::Acked { pkid, refused } => {
                let row = self.by_pkid.remove(&pkid)?;
                if let Some(reason) = refused {
                    self.bridge.status.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(reason, row, "MQTT bridge: the broker refused a record");
                }
                self.delivered(row);
            }
            Happened::ConnAck | Happened::Other => {}
        }
        None
    }

    /// Marks `row` delivered and moves the cursor past every delivered row at the front.
    pub(super) fn delivered(&mut self, row: i64) {
        if let Some(slot) = self.in_flight.iter_mut().find(|(r, _)| *r == row) {
            slot.1 = true;
        }
        while let Some(&(r, true)) = self.in_flight.front() {
            self.in_flight.pop_front();
            self.cursor = r;
            self.bridge.status.published.fetch_add(1, Ordering::Relaxed);
        }
        self.bridge
            .status
            .cursor
            .store(self.cursor, Ordering::Relaxed);
    }

    /// At a clean stop: collects the PUBACKs still coming, for up to 2 s. Command
    /// requests arriving now are left unacknowledged: the broker delivers them again.
    pub(super) async fn drain_acks(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Ok(Ok(ev)) => {
                    self.on_event(ev);
                }
                _ => return,
            }
        }
    }

    pub(super) async fn save_cursor(&mut self) {
        if self.cursor == self.saved {
            return;
        }
        match self.bridge.store.set_sink_cursor(SINK, self.cursor).await {
            Ok(()) => self.saved = self.cursor,
            // Kept in memory and tried again: the worst case is records sent twice.
            Err(e) => warn!(error = %e, "MQTT bridge: could not save its cursor"),
        }
    }
}

/// Checks and queues one request: the command, or an error code and message (the
/// HTTP API's codes).
pub(super) async fn queue_command(
    gw: &Gateway,
    device: &str,
    body: &[u8],
) -> Result<CommandRecord, (&'static str, String)> {
    let req: Request = serde_json::from_slice(body).map_err(|e| {
        (
            "bad_body",
            format!("{e}: send {{\"name\": ..., \"args\": {{...}}, \"ttl_s\": ...}}"),
        )
    })?;
    let ttl = match req.ttl_s {
        None => None,
        Some(t) => Some(crate::ttl_from_secs(t).ok_or((
            "bad_ttl",
            "ttl_s must be a positive number of seconds (at most a year)".to_owned(),
        ))?),
    };
    match gw.device(device).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(("no_device", format!("no device {device:?}"))),
        Err(e) => return Err(("store", e.to_string())),
    }
    let args = if req.args.is_null() {
        Json::Object(Map::new())
    } else {
        req.args
    };
    gw.send_command(device, &req.name, &args, ttl)
        .await
        .map_err(|e| {
            let code = match &e {
                CommandError::Store(StoreError::QueueFull { .. }) => "queue_full",
                CommandError::Store(_) => "store",
                CommandError::InvalidDevice(_) => "bad_device_id",
                _ => "bad_command",
            };
            (code, e.to_string())
        })
}

/// A Home Assistant MQTT discovery config: one sensor for one reading of one device,
/// reading the telemetry topic, available while the device's presence says online.
pub(super) fn home_assistant_config(
    s: &MqttSettings,
    device: &str,
    key: &str,
    value: &Json,
) -> Note {
    // Discovery ids allow [a-zA-Z0-9_-]; device ids and names also allow '.'.
    let id = |t: &str| t.replace('.', "_");
    let topic = |what: &str| format!("{}/devices/{device}/{what}", s.topic_prefix);
    let mut config = json!({
        "name": key,
        "unique_id": format!("{}_{}_{}", id(&s.gateway_id), id(device), id(key)),
        "object_id": format!("{}_{}", id(device), id(key)),
        "state_topic": topic("telemetry"),
        "value_template": format!("{{{{ value_json['values']['{key}'] }}}}"),
        "availability_topic": topic("presence"),
        "availability_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [format!("{}_{}", id(&s.gateway_id), id(device))],
            "name": device,
            "via_device": id(&s.gateway_id),
        },
    });
    if value.is_number() {
        // Numbers become a history graph in Home Assistant.
        config["state_class"] = "measurement".into();
    }
    Note {
        topic: format!(
            "{}/sensor/{}/{}/config",
            s.discovery_prefix,
            id(device),
            id(key)
        ),
        payload: config.to_string().into_bytes(),
        retain: true,
        correlation: None,
    }
}
