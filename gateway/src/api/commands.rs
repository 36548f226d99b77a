//! Commands and groups: queue, wait, look up, cancel; a group's members and a command
//! sent to all of them.

use super::*;

pub(super) async fn list_commands(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = known_device(&api, &id).await {
        return r.into_response();
    }
    match api.gw.store().commands_of(&id, 100).await {
        Ok(c) => axum::Json(c).into_response(),
        Err(e) => store_error(e).into_response(),
    }
}

/// Body of a command request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandBody {
    name: String,
    #[serde(default)]
    args: Json,
    ttl_s: Option<f64>,
    #[serde(default)]
    wait_s: f64,
}

impl CommandBody {
    fn ttl(&self) -> Result<Option<Duration>, ApiError> {
        match self.ttl_s.map(crate::ttl_from_secs) {
            None => Ok(None),
            Some(Some(ttl)) => Ok(Some(ttl)),
            Some(None) => Err(api_error(
                StatusCode::BAD_REQUEST,
                "bad_ttl",
                "ttl_s must be a positive number of seconds (at most a year)",
            )),
        }
    }

    fn wait(&self) -> Result<Duration, ApiError> {
        // Checked before converting: a float out of `Duration`'s range panics there.
        if self.wait_s.is_finite() && (0.0..=MAX_WAIT_S).contains(&self.wait_s) {
            Ok(Duration::from_secs_f64(self.wait_s))
        } else {
            Err(api_error(
                StatusCode::BAD_REQUEST,
                "bad_wait",
                "wait_s must be a number of seconds from 0 to 60",
            ))
        }
    }
}

pub(super) fn command_error(e: CommandError) -> ApiError {
    match e {
        CommandError::Store(StoreError::QueueFull { .. }) => {
            api_error(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
        }
        CommandError::Store(s) => store_error(s),
        CommandError::Fleet(_) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "fleet_unavailable",
            e.to_string(),
        ),
        CommandError::InvalidDevice(_) => {
            api_error(StatusCode::BAD_REQUEST, "bad_device_id", e.to_string())
        }
        _ => api_error(StatusCode::BAD_REQUEST, "bad_command", e.to_string()),
    }
}

/// Checks the device is known, queues, then waits up to `wait`: 200 with the final
/// record, or 202 with the record as it stands.
pub(super) async fn send_and_wait(
    api: &Api,
    device: &str,
    body: &CommandBody,
) -> Result<(StatusCode, CommandRecord), ApiError> {
    let ttl = body.ttl()?;
    let wait = body.wait()?;
    let rec = send(api, device, body, ttl).await?;
    Ok(wait_for(api, rec, tokio::time::Instant::now() + wait).await)
}

/// Checks the device is known and queues the command.
pub(super) async fn send(
    api: &Api,
    device: &str,
    body: &CommandBody,
    ttl: Option<Duration>,
) -> Result<CommandRecord, ApiError> {
    known_device(api, device).await?;
    api.gw
        .send_command(device, &body.name, &body.args, ttl)
        .await
        .map_err(command_error)
}

/// Waits until `deadline` for a queued command to end: 200 with its final record, or
/// 202 with the record as it stands.
pub(super) async fn wait_for(
    api: &Api,
    rec: CommandRecord,
    deadline: tokio::time::Instant,
) -> (StatusCode, CommandRecord) {
    let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
    if wait.is_zero() {
        return (StatusCode::ACCEPTED, rec);
    }
    match api.gw.wait_command(rec.id, wait).await {
        Ok(done) => (StatusCode::OK, done),
        Err(_) => {
            // The record as it stands now (or as queued, if the store cannot say).
            let now = api.gw.store().command(rec.id).await.ok().flatten();
            (StatusCode::ACCEPTED, now.unwrap_or(rec))
        }
    }
}

pub(super) async fn post_command(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<CommandBody>,
) -> Response {
    match send_and_wait(&api, &id, &body).await {
        Ok((status, rec)) => {
            let location = format!("/api/v1/commands/{}", rec.id);
            let mut r = (status, axum::Json(rec)).into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Err(e) => e.into_response(),
    }
}

pub(super) async fn get_command(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<i64>,
) -> Response {
    match api.gw.command_record(id).await {
        Ok(Some(c)) => axum::Json(c).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no_command",
            format!("no command {id}"),
        ),
        Err(e) => command_error(e).into_response(),
    }
}

/// Cancels a queued command: 200 with the record (`canceled`); 409 `too_late` with
/// the record if it was sent already (a device cannot be asked to forget one) or is
/// over.
pub(super) async fn cancel_command(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    match api.gw.cancel_command(id).await {
        Ok(Cancel::Canceled(rec)) => Ok(axum::Json(rec).into_response()),
        Ok(Cancel::TooLate(rec)) => Ok((
            StatusCode::CONFLICT,
            axum::Json(json!({
                "error": format!("command {id} is {}: only a queued command can be cancelled", rec.state.as_str()),
                "code": "too_late",
                "command": rec,
            })),
        )
            .into_response()),
        Ok(Cancel::NotFound) => Err(api_error(
            StatusCode::NOT_FOUND,
            "no_command",
            format!("no command {id}"),
        )),
        Err(e) => Err(command_error(e)),
    }
}

pub(super) async fn delete_group(
    State(ApiState(api)): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    match api.gw.store().delete_group(&name).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(false) => Err(api_error(
            StatusCode::NOT_FOUND,
            "no_group",
            format!("no group {name:?}"),
        )),
        Err(e) => Err(store_error(e)),
    }
}

pub(super) async fn list_groups(State(ApiState(api)): State<ApiState>) -> Response {
    match api.gw.store().groups().await {
        Ok(g) => axum::Json(
            g.into_iter()
                .map(|(name, devices)| json!({"name": name, "devices": devices}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => store_error(e).into_response(),
    }
}

pub(super) async fn get_group(
    State(ApiState(api)): State<ApiState>,
    Path(name): Path<String>,
) -> Response {
    match api.gw.store().group(&name).await {
        Ok(Some(devices)) => axum::Json(json!({"name": name, "devices": devices})).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no_group",
            format!("no group {name:?}"),
        ),
        Err(e) => store_error(e).into_response(),
    }
}

/// Body of `PUT /groups/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupBody {
    devices: Vec<String>,
}

pub(super) async fn put_group(
    State(ApiState(api)): State<ApiState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<GroupBody>,
) -> Response {
    if let Err(e) = DeviceId::new(&name) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_group_name",
            format!("group name: {e}"),
        );
    }
    if body.devices.len() > 100_000 {
        return error(
            StatusCode::BAD_REQUEST,
            "too_many",
            "at most 100,000 devices a group",
        );
    }
    for d in &body.devices {
        if let Err(r) = valid_id(d) {
            return r.into_response();
        }
    }
    let mut devices = body.devices;
    devices.sort();
    devices.dedup();
    match api.gw.store().put_group(&name, devices.clone()).await {
        Ok(()) => axum::Json(json!({"name": name, "devices": devices})).into_response(),
        Err(e) => store_error(e).into_response(),
    }
}

pub(super) async fn post_group_command(
    State(ApiState(api)): State<ApiState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<CommandBody>,
) -> Response {
    // Checked once, before any work: a bad number is the request's fault, not a
    // member's.
    let (ttl, wait) = match body.ttl().and_then(|t| Ok((t, body.wait()?))) {
        Ok(tw) => tw,
        Err(e) => return e.into_response(),
    };
    let members = match api.gw.store().group(&name).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "no_group",
                format!("no group {name:?}"),
            );
        }
        Err(e) => return store_error(e).into_response(),
    };
    let deadline = tokio::time::Instant::now() + wait;
    // Queued a few at a time in this task (a group may have 100,000 members: no task
    // and no store operation per member at once), then all waited for together until
    // one deadline.
    let queued: Vec<Result<CommandRecord, ApiError>> = {
        use futures_util::StreamExt;
        let (api, body) = (&api, &body);
        futures_util::stream::iter(members.iter().cloned())
            .map(|device| async move { send(api, &device, body, ttl).await })
            .buffered(GROUP_CONCURRENCY)
            .collect()
            .await
    };
    let mut receipts = Vec::with_capacity(members.len());
    for (device, queued) in members.iter().zip(queued) {
        let receipt = match queued {
            Ok(rec) => {
                let (status, rec) = wait_for(&api, rec, deadline).await;
                json!({"device": device, "status": status.as_u16(), "command": rec})
            }
            Err(e) => json!({
                "device": device, "status": e.status.as_u16(), "code": e.code, "error": e.message
            }),
        };
        receipts.push(receipt);
    }
    axum::Json(json!({"group": name, "receipts": receipts})).into_response()
}
