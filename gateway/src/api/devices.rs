//! Devices and their telemetry: listing and paging, registration, records by cursor,
//! and exports (NDJSON, CSV) of a time range.

use super::*;

/// `?limit=` (default 1,000, at most 10,000) `&after=ID`: a page of devices by id;
/// `Link: rel="next"` names the next page while there may be one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeviceParams {
    limit: Option<u32>,
    after: Option<String>,
}

pub(super) async fn list_devices(
    State(ApiState(api)): State<ApiState>,
    Params(p): Params<DeviceParams>,
) -> Result<Response, ApiError> {
    let limit = page_limit(p.limit, 1000)?;
    if let Some(a) = &p.after {
        DeviceId::new(a).map_err(|e| bad_query(format!("after: {e}")))?;
    }
    let page = api
        .gw
        .devices_page(p.after, limit)
        .await
        .map_err(store_error)?;
    let next = (page.len() == limit as usize)
        .then(|| page.last())
        .flatten()
        .map(|d| format!("/api/v1/devices?limit={limit}&after={}", d.id));
    Ok(next_link(axum::Json(page).into_response(), next))
}

/// A page size: `default` if absent, 1 to 10,000.
pub(super) fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match limit.unwrap_or(default) {
        n @ 1..=10_000 => Ok(n),
        _ => Err(bad_query("limit must be from 1 to 10000")),
    }
}

pub(super) async fn get_device(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = valid_id(&id) {
        return r.into_response();
    }
    match api.gw.device(&id).await {
        Ok(Some(d)) => {
            // The firmware update under way, if the device is in one.
            let update = api.gw.shared().firmware.with(|r| r.device(&id));
            let mut body = serde_json::to_value(d).unwrap_or(Json::Null);
            if let (Some((rollout, p)), Some(obj)) = (update, body.as_object_mut()) {
                obj.insert(
                    "firmware_update".into(),
                    json!({
                        "rollout": rollout,
                        "state": p.state,
                        "received": p.received,
                        "reason": p.reason,
                    }),
                );
            }
            axum::Json(body).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no_device",
            format!("no device {id:?}"),
        ),
        Err(e) => store_error(e).into_response(),
    }
}

/// Registers a device before it first connects, so commands can be queued for it:
/// 201 if new, 200 if it was known; the device record either way.
pub(super) async fn put_device(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    let created = api
        .gw
        .store()
        .register_device(&id)
        .await
        .map_err(store_error)?;
    let rec = api.gw.device(&id).await.map_err(store_error)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(rec)).into_response())
}

/// Forgets a device that is offline: its telemetry, commands and group memberships.
/// (Its certificate stays valid: revoke it to keep it out.)
pub(super) async fn delete_device(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    valid_id(&id)?;
    if api.gw.is_online(&id) {
        return Err(api_error(
            StatusCode::CONFLICT,
            "device_online",
            format!(
                "{id:?} is connected: revoke its certificate (certs revoke, then SIGHUP the \
                 gateway) or wait until it disconnects"
            ),
        ));
    }
    match api.gw.store().delete_device(&id).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(false) => Err(api_error(
            StatusCode::NOT_FOUND,
            "no_device",
            format!("no device {id:?}"),
        )),
        Err(e) => Err(store_error(e)),
    }
}

/// `?since=&until=` in ms since the epoch, `limit` (default 100, at most 10,000),
/// `order` (`newest`, the default, or `oldest` first), `after` (the cursor of the
/// last record of the previous page, from the `Link` header).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryParams {
    since: Option<i64>,
    until: Option<i64>,
    limit: Option<u32>,
    order: Option<Order>,
    after: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum Order {
    Newest,
    Oldest,
}

impl Order {
    fn as_str(self) -> &'static str {
        match self {
            Order::Newest => "newest",
            Order::Oldest => "oldest",
        }
    }
}

pub(super) fn cursor(after: Option<&str>) -> Result<Option<TelemetryCursor>, ApiError> {
    after
        .map(|a| {
            TelemetryCursor::parse(a).ok_or_else(|| {
                bad_query("after must be a cursor from the Link header of the previous page")
            })
        })
        .transpose()
}

pub(super) async fn get_telemetry(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
    Params(p): Params<TelemetryParams>,
) -> Result<Response, ApiError> {
    known_device(&api, &id).await?;
    let limit = page_limit(p.limit, 100)?;
    let order = p.order.unwrap_or(Order::Newest);
    let q = TelemetryQuery {
        since_ms: p.since,
        until_ms: p.until,
        limit: Some(limit),
        after: cursor(p.after.as_deref())?,
        oldest_first: order == Order::Oldest,
    };
    let page = api
        .gw
        .store()
        .telemetry_page(&id, q)
        .await
        .map_err(store_error)?;
    let next = (page.len() == limit as usize)
        .then(|| page.last())
        .flatten()
        .map(|(c, _)| {
            let mut link = format!(
                "/api/v1/devices/{id}/telemetry?limit={limit}&order={}&after={c}",
                order.as_str()
            );
            for (k, v) in [("since", p.since), ("until", p.until)] {
                if let Some(v) = v {
                    link.push_str(&format!("&{k}={v}"));
                }
            }
            link
        });
    let records: Vec<_> = page.into_iter().map(|(_, r)| r).collect();
    Ok(next_link(axum::Json(records).into_response(), next))
}

/// `?since=&until=` (ms since the epoch) and `format` (`ndjson`, the default, or
/// `csv`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportParams {
    since: Option<i64>,
    until: Option<i64>,
    format: Option<ExportFormat>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum ExportFormat {
    Ndjson,
    Csv,
}

/// A device's telemetry in a time range, oldest first, streamed a page at a time (no
/// size limit, constant memory): NDJSON (one record per line, as the telemetry route
/// shows them) or CSV with one row per reading
/// (`device,boot_id,seq,time_ms,received_ms,name,value`).
pub(super) async fn export_telemetry(
    State(ApiState(api)): State<ApiState>,
    Path(id): Path<String>,
    Params(p): Params<ExportParams>,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    known_device(&api, &id).await?;
    let format = p.format.unwrap_or(ExportFormat::Ndjson);
    let first = match format {
        ExportFormat::Csv => Some(axum::body::Bytes::from_static(
            b"device,boot_id,seq,time_ms,received_ms,name,value\n",
        )),
        ExportFormat::Ndjson => None,
    };
    let store = api.gw.store().clone();
    let (since, until, device) = (p.since, p.until, id.clone());
    let pages = futures_util::stream::try_unfold(Some(None), move |after| {
        let (store, device) = (store.clone(), device.clone());
        async move {
            let Some(after) = after else {
                return Ok::<_, StoreError>(None);
            };
            let q = TelemetryQuery {
                since_ms: since,
                until_ms: until,
                limit: Some(EXPORT_PAGE),
                after,
                oldest_first: true,
            };
            let page = store.telemetry_page(&device, q).await?;
            if page.is_empty() {
                return Ok(None);
            }
            let next = (page.len() == EXPORT_PAGE as usize)
                .then(|| page.last().map(|(c, _)| Some(*c)))
                .flatten();
            let mut out = Vec::with_capacity(page.len() * 96);
            for (_, rec) in &page {
                match format {
                    ExportFormat::Ndjson => {
                        if serde_json::to_writer(&mut out, rec).is_ok() {
                            out.push(b'\n');
                        }
                    }
                    ExportFormat::Csv => csv_rows(&mut out, rec),
                }
            }
            Ok(Some((axum::body::Bytes::from(out), next)))
        }
    });
    let body = futures_util::stream::iter(first.map(Ok)).chain(pages);
    let (content_type, ext) = match format {
        ExportFormat::Ndjson => ("application/x-ndjson", "ndjson"),
        ExportFormat::Csv => ("text/csv; charset=utf-8", "csv"),
    };
    let disposition = format!("attachment; filename=\"{id}-telemetry.{ext}\"");
    let mut r = axum::body::Body::from_stream(body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// Records read from the store at a time by an export.
pub(super) const EXPORT_PAGE: u32 = 1000;

/// One CSV row per reading of `rec` (RFC 4180 quoting for text).
pub(super) fn csv_rows(out: &mut Vec<u8>, rec: &crate::TelemetryRecord) {
    use std::io::Write;
    for (name, value) in &rec.values {
        let value = match value {
            Json::String(s) => csv_field(s),
            other => other.to_string(),
        };
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            rec.device,
            rec.boot_id,
            rec.seq,
            rec.time_ms,
            rec.received_ms,
            csv_field(name),
            value
        );
    }
}

pub(super) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
