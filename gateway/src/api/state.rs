//! The device state document (protocol version 2): desired settings set by the
//! operator, for one device or a group, and what each device reports.

use super::*;
use crate::store::PutDesired;

/// `PUT .../state` body: settings to merge (`null` unsets one), and optionally the
/// version the caller last saw (the change is refused with 409 if it moved on).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StateBody {
    desired: Json,
    version: Option<u32>,
}

pub(super) async fn get_state(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    match api.gw.device_state(&id).await.map_err(store_error)? {
        Some(s) => Ok(axum::Json(s).into_response()),
        None => Err(api_error(
            StatusCode::NOT_FOUND,
            "no_device",
            format!("no device {id:?}"),
        )),
    }
}

/// 200 with the state after the change (a device not yet known becomes known, as
/// with commands); 400 `invalid_state`; 409 `version_conflict` with the version now.
pub(super) async fn put_state(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<StateBody>,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    put_one(&api, &id, body.desired, body.version).await?;
    get_state(State(ApiState(api)), Path(id)).await
}

/// Puts the same change to every member of a group; one receipt per member.
pub(super) async fn put_group_state(
    State(ApiState(api)): State<ApiState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<StateBody>,
) -> Result<Response, ApiError> {
    if body.version.is_some() {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "invalid_state",
            "\"version\" applies to one device; a group's members have versions of their own",
        ));
    }
    // A change that is wrong for any document is the request's fault: said once, and
    // nothing is changed. (One that is wrong only for some members, too many settings
    // for what they hold, is in those members' receipts.)
    if let Err(e) = crate::state::DesiredDoc::default().apply(&body.desired) {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "invalid_state",
            e.to_string(),
        ));
    }
    let members = api
        .gw
        .store()
        .group(&name)
        .await
        .map_err(store_error)?
        .ok_or_else(|| {
            api_error(
                StatusCode::NOT_FOUND,
                "no_group",
                format!("no group {name:?}"),
            )
        })?;
    let results: Vec<Result<u32, ApiError>> = {
        use futures_util::StreamExt;
        let (api, desired) = (&api, &body.desired);
        futures_util::stream::iter(members.iter().cloned())
            .map(|device| async move { put_one(api, &device, desired.clone(), None).await })
            .buffered(GROUP_CONCURRENCY)
            .collect()
            .await
    };
    let mut receipts = Vec::with_capacity(members.len());
    for (device, r) in members.iter().zip(results) {
        receipts.push(match r {
            Ok(version) => json!({"device": device, "status": 200, "desired_version": version}),
            Err(e) => json!({
                "device": device, "status": e.status.as_u16(), "code": e.code, "error": e.message
            }),
        });
    }
    Ok(axum::Json(json!({"group": name, "receipts": receipts})).into_response())
}

/// Applies one change; the desired version after it.
async fn put_one(api: &Api, id: &str, desired: Json, expect: Option<u32>) -> Result<u32, ApiError> {
    match api.gw.put_desired(id, desired, expect).await {
        Ok(PutDesired::Done { doc, .. }) => Ok(doc.version),
        Ok(PutDesired::Conflict { version }) => Err(api_error(
            StatusCode::CONFLICT,
            "version_conflict",
            format!("the desired state of {id:?} is at version {version}; read it again and retry"),
        )),
        Ok(PutDesired::Invalid(e)) => Err(api_error(
            StatusCode::BAD_REQUEST,
            "invalid_state",
            e.to_string(),
        )),
        Err(e) => Err(store_error(e)),
    }
}
