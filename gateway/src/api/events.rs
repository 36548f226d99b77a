//! The live side: the MQTT bridge's state, refused handshakes, and the WebSocket of
//! events with its filters.

use super::*;

/// The MQTT bridge: configured, connected, backlog, counters (404 `no_bridge` when
/// no broker is configured).
pub(super) async fn bridge_state(
    State(ApiState(api)): State<ApiState>,
) -> Result<Response, ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let shared = api.gw.shared();
    let (Some(b), Some(m)) = (&shared.bridge, &shared.config.mqtt) else {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "no_bridge",
            "no MQTT broker is configured ([mqtt] url, or --mqtt URL)",
        ));
    };
    let cursor = b.cursor.load(Relaxed);
    let (backlog, oldest) = api.gw.store().backlog(cursor).await.map_err(store_error)?;
    Ok(axum::Json(json!({
        "broker": m.url,
        "connected": b.connected.load(Relaxed),
        "published": b.published.load(Relaxed),
        "connect_failures": b.connect_failures.load(Relaxed),
        "connects": b.connects.load(Relaxed),
        "refused": b.refused.load(Relaxed),
        "dropped": b.dropped.load(Relaxed),
        "commands": b.commands.load(Relaxed),
        "backlog_records": backlog,
        "oldest_unpublished_ms": oldest,
        "last_error": b.last_error(),
    }))
    .into_response())
}

pub(super) async fn list_refusals(State(ApiState(api)): State<ApiState>) -> Response {
    axum::Json(api.gw.recent_refusals()).into_response()
}

/// `?device=a&device=b&group=g&type=telemetry&type=presence` (all optional).
pub(super) async fn events(
    State(ApiState(api)): State<ApiState>,
    req_query: axum::extract::RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let pairs: Vec<(String, String)> =
        match serde_urlencoded::from_str(req_query.0.as_deref().unwrap_or("")) {
            Ok(p) => p,
            Err(e) => return bad_query(format!("query string: {e}")).into_response(),
        };
    let mut devices: HashSet<String> = HashSet::new();
    let mut types: HashSet<String> = HashSet::new();
    for (k, v) in &pairs {
        match k.as_str() {
            "device" => {
                if let Err(e) = DeviceId::new(v) {
                    return bad_query(format!("device: {e}")).into_response();
                }
                devices.insert(v.clone());
            }
            "group" => match api.gw.store().group(v).await {
                Ok(Some(members)) => devices.extend(members),
                Ok(None) => {
                    return error(StatusCode::NOT_FOUND, "no_group", format!("no group {v:?}"));
                }
                Err(e) => return store_error(e).into_response(),
            },
            "type" => {
                if !EVENT_TYPES.contains(&v.as_str()) {
                    return bad_query(format!(
                        "type {v:?} is not an event type ({})",
                        EVENT_TYPES.join(", ")
                    ))
                    .into_response();
                }
                types.insert(v.clone());
            }
            "token" => {}
            other => {
                return bad_query(format!(
                    "unknown parameter {other:?} (device, group, type, token)"
                ))
                .into_response();
            }
        }
    }
    let filter = Filter { devices, types };
    ws.on_upgrade(move |socket| stream_events(api, socket, filter))
}

/// The `type` of each event, as the stream's filter names it.
pub(super) const EVENT_TYPES: [&str; 8] = [
    "telemetry",
    "presence",
    "command",
    "handshake_refused",
    "desired",
    "reported",
    "firmware",
    "rollout",
];

pub(super) struct Filter {
    devices: HashSet<String>,
    types: HashSet<String>,
}

impl Filter {
    fn wants(&self, ev: &Event) -> bool {
        let ty = match ev {
            Event::Telemetry { .. } => "telemetry",
            Event::Presence { .. } => "presence",
            Event::Command(_) => "command",
            Event::HandshakeRefused { .. } => "handshake_refused",
            Event::Desired { .. } => "desired",
            Event::Reported { .. } => "reported",
            Event::Firmware { .. } => "firmware",
            Event::Rollout { .. } => "rollout",
        };
        if !self.types.is_empty() && !self.types.contains(ty) {
            return false;
        }
        match ev.device() {
            Some(d) => self.devices.is_empty() || self.devices.contains(d),
            // Refused handshakes have no device; they pass a device filter only if
            // asked for by type.
            None => self.devices.is_empty() || self.types.contains(ty),
        }
    }
}

pub(super) async fn stream_events(api: Api, mut socket: WebSocket, filter: Filter) {
    enum Next {
        Event(Result<Arc<Event>, RecvError>),
        Closed,
        Other,
        Stop,
    }
    let mut rx = api.gw.subscribe();
    let mut stop = api.gw.shared().shutting_down.subscribe();
    loop {
        // Decide first, then act: nothing borrowed by `select!` lives across the send.
        let next = tokio::select! {
            ev = rx.recv() => Next::Event(ev),
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => Next::Closed,
                Some(Ok(_)) => Next::Other,
            },
            _ = stop.wait_for(|s| *s) => Next::Stop,
        };
        let text = match next {
            Next::Event(Ok(ev)) if filter.wants(&ev) => match serde_json::to_string(&*ev) {
                Ok(t) => t,
                Err(_) => continue,
            },
            Next::Event(Ok(_)) | Next::Other => continue,
            Next::Event(Err(RecvError::Lagged(n))) => {
                json!({"type": "lagged", "missed": n}).to_string()
            }
            Next::Event(Err(RecvError::Closed)) | Next::Closed => return,
            Next::Stop => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        };
        let sent = tokio::time::timeout(WS_SEND_TIMEOUT, socket.send(Message::Text(text.into())));
        if !matches!(sent.await, Ok(Ok(()))) {
            return;
        }
    }
}
