//! Firmware updates (protocol version 3): images signed with the release key, and
//! rollouts of an image to devices or a group.

use super::*;
use crate::firmware::rollout::{RolloutError, RolloutView};
use crate::firmware::upload::{self, UploadError};
use crate::store::FirmwareKey;

/// `POST /api/v1/firmware`: a multipart form with the image (`image`) and the
/// signature file `certs sign-firmware` wrote (`signature`). 201 with the image's
/// summary; 400 `invalid_firmware` with what is wrong; 409 `firmware_exists` for a
/// version uploaded before; 409 `no_release_key` when the gateway has no release key;
/// 413 `too_large`.
pub(super) async fn post_firmware(
    State(ApiState(api)): State<ApiState>,
    mut form: axum::extract::Multipart,
) -> Result<Response, ApiError> {
    let shared = api.gw.shared();
    let Some(key) = shared.firmware.release_key else {
        return Err(api_error(
            StatusCode::CONFLICT,
            "no_release_key",
            "this gateway takes no firmware: set release_key in its configuration to the \
             release.pub.pem that `certs release-key` wrote, and restart it",
        ));
    };
    let max = shared.config.max_firmware_size;
    let (mut image, mut sig) = (None, None);
    loop {
        let field = form.next_field().await.map_err(|e| {
            api_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("not a multipart form: {e}"),
            )
        })?;
        let Some(mut field) = field else { break };
        let name = field.name().unwrap_or_default().to_owned();
        // Read a piece at a time, so an oversized upload is refused at the limit
        // rather than held whole.
        let mut bytes = Vec::new();
        while let Some(piece) = field.chunk().await.map_err(|e| {
            api_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading part {name:?}: {e}"),
            )
        })? {
            if (bytes.len() + piece.len()) as u64 > max {
                return Err(api_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("part {name:?} is over max_firmware_size ({max} bytes)"),
                ));
            }
            bytes.extend_from_slice(&piece);
        }
        match name.as_str() {
            "image" => image = Some(bytes),
            "signature" => sig = Some(bytes),
            other => {
                return Err(api_error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("unknown part {other:?}: the form has `image` and `signature`"),
                ));
            }
        }
    }
    let (Some(image), Some(sig)) = (image, sig) else {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the form needs two parts: `image` (the firmware) and `signature` (its \
             .sig.json from `certs sign-firmware`)",
        ));
    };
    let checked = upload::check(&key, &image, &sig).map_err(|e| {
        let code = match e {
            UploadError::BadSignature => "bad_signature",
            _ => "invalid_firmware",
        };
        api_error(StatusCode::BAD_REQUEST, code, e.to_string())
    })?;
    let version = checked.version.clone();
    let stored = api
        .gw
        .store()
        .add_firmware(
            checked.version,
            checked.sha256,
            checked.signature,
            Arc::from(image),
        )
        .await
        .map_err(store_error)?;
    match stored {
        Some(img) => Ok((
            StatusCode::CREATED,
            axum::Json(crate::firmware::rollout::ImageInfo::of(&img)),
        )
            .into_response()),
        None => Err(api_error(
            StatusCode::CONFLICT,
            "firmware_exists",
            format!("firmware {version:?} was uploaded before: give a new build a new version"),
        )),
    }
}

/// `GET /api/v1/firmware`: every image, newest first.
pub(super) async fn list_firmware(
    State(ApiState(api)): State<ApiState>,
) -> Result<Response, ApiError> {
    let list = api.gw.store().list_firmware().await.map_err(store_error)?;
    Ok(axum::Json(json!({ "firmware": list })).into_response())
}

/// `POST /api/v1/rollouts` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RolloutBody {
    /// The image's version.
    firmware: String,
    /// Devices to update...
    devices: Option<Vec<String>>,
    /// ...or a group's members (now).
    group: Option<String>,
    /// The rollout stops when more than this share (0 to 1) of its devices failed.
    failure_threshold: Option<f64>,
    /// Devices updating at once.
    max_in_flight: Option<u32>,
    /// Seconds a device may go without progress before it counts as failed.
    device_timeout_s: Option<u32>,
}

/// Default share of failed devices that stops a rollout.
const DEFAULT_FAILURE_THRESHOLD: f64 = 0.1;
/// Default devices updating at once.
const DEFAULT_MAX_IN_FLIGHT: u32 = 50;

fn invalid_rollout(message: impl Into<String>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_rollout", message)
}

/// `POST /api/v1/rollouts`: 201 with the rollout; 400 `invalid_rollout`; 404
/// `no_firmware` / `no_group`; 409 `devices_busy` (in another unfinished rollout).
pub(super) async fn post_rollout(
    State(ApiState(api)): State<ApiState>,
    JsonBody(body): JsonBody<RolloutBody>,
) -> Result<Response, ApiError> {
    let threshold = body.failure_threshold.unwrap_or(DEFAULT_FAILURE_THRESHOLD);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(invalid_rollout("failure_threshold is a share, from 0 to 1"));
    }
    let max_in_flight = body.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    if max_in_flight == 0 {
        return Err(invalid_rollout("max_in_flight must be at least 1"));
    }
    let device_timeout_s = body
        .device_timeout_s
        .unwrap_or(crate::firmware::Settings::DEFAULT_DEVICE_TIMEOUT_S);
    if device_timeout_s == 0 {
        return Err(invalid_rollout("device_timeout_s must be at least 1"));
    }
    let mut devices = match (body.devices, body.group) {
        (Some(d), None) => d,
        (None, Some(g)) => api
            .gw
            .store()
            .group(&g)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                api_error(StatusCode::NOT_FOUND, "no_group", format!("no group {g:?}"))
            })?,
        _ => return Err(invalid_rollout("give either \"devices\" or \"group\"")),
    };
    for d in &devices {
        valid_id(d)?;
    }
    devices.sort();
    devices.dedup();
    if devices.is_empty() {
        return Err(invalid_rollout("no devices to update"));
    }
    let store = api.gw.store();
    let image = store
        .load_firmware(FirmwareKey::Version(body.firmware.clone()))
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            api_error(
                StatusCode::NOT_FOUND,
                "no_firmware",
                format!(
                    "no firmware {:?}: upload it first (POST /api/v1/firmware)",
                    body.firmware
                ),
            )
        })?;
    let shared = api.gw.shared().clone();
    let busy = shared.firmware.with(|r| r.busy(&devices));
    if !busy.is_empty() {
        return Err(rollout_error(RolloutError::Busy(busy)));
    }
    let (id, now) = store
        .create_rollout(
            image.id,
            devices.clone(),
            threshold,
            max_in_flight,
            device_timeout_s,
        )
        .await
        .map_err(store_error)?;
    let image = Arc::new(image);
    shared.firmware.change(&shared, |r| {
        let settings = crate::firmware::Settings {
            device_timeout_s,
            ..crate::firmware::Settings::new(threshold, max_in_flight as usize)
        };
        r.create(id, image, &devices, settings, now, |d| {
            shared.registry.is_online(d)
        })
    });
    let view = shared.firmware.with(|r| r.view(id, true));
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// `GET /api/v1/rollouts`: every rollout, newest first, with counts per state.
pub(super) async fn list_rollouts(State(ApiState(api)): State<ApiState>) -> Response {
    let list = api.gw.shared().firmware.with(|r| r.list());
    axum::Json(json!({ "rollouts": list })).into_response()
}

/// `GET /api/v1/rollouts/{id}`: one rollout with each device's progress.
pub(super) async fn get_rollout(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    one_rollout(&api, id)
}

fn one_rollout(api: &Api, id: i64) -> Result<Response, ApiError> {
    let view: Option<RolloutView> = api.gw.shared().firmware.with(|r| r.view(id, true));
    view.map(|v| axum::Json(v).into_response())
        .ok_or_else(|| rollout_error(RolloutError::NoSuchRollout(id)))
}

fn rollout_error(e: RolloutError) -> ApiError {
    let (status, code) = match &e {
        RolloutError::NoSuchRollout(_) => (StatusCode::NOT_FOUND, "no_rollout"),
        RolloutError::Busy(_) => (StatusCode::CONFLICT, "devices_busy"),
        RolloutError::Finished { .. } => (StatusCode::CONFLICT, "rollout_finished"),
    };
    api_error(status, code, e.to_string())
}

/// What `POST /api/v1/rollouts/{id}/...` does.
#[derive(Debug, Clone, Copy)]
pub(super) enum Action {
    /// No new offers; transfers under way go on.
    Pause,
    /// Offers again.
    Resume,
    /// Transfers under way are withdrawn; nothing more is offered.
    Cancel,
}

/// `POST /api/v1/rollouts/{id}/pause|resume|cancel`: 200 with the rollout; 404
/// `no_rollout`; 409 `rollout_finished`.
pub(super) async fn rollout_action(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<i64>,
    action: Action,
) -> Result<Response, ApiError> {
    let shared = api.gw.shared().clone();
    let now = crate::store::now_ms();
    let online = |d: &str| shared.registry.is_online(d);
    let fx = shared.firmware.with(|r| match action {
        Action::Pause => r.set_paused(id, true, now, online),
        Action::Resume => r.set_paused(id, false, now, online),
        Action::Cancel => r.cancel(id, now),
    });
    shared.firmware.apply(&shared, fx.map_err(rollout_error)?);
    one_rollout(&api, id)
}
