//! The operator interface: JSON HTTP API under `/api/v1`, a WebSocket of live events,
//! Prometheus metrics, and the dashboard page, on their own listener (127.0.0.1:8080
//! by default).
//!
//! ```text
//!  GET  /                      dashboard (static page; asks for the token)
//!  GET  /healthz               "ok"                                    no token
//!  GET  /metrics               Prometheus text                         token
//!  /api/v1/...                 JSON (see openapi.json)                 token
//!  GET  /api/v1/events         WebSocket: telemetry, presence, commands token (or ?token=)
//! ```
//!
//! Every request under `/api/v1` and `/metrics` needs `Authorization: Bearer TOKEN`;
//! the events WebSocket may pass the token as `?token=` because browsers cannot set
//! headers on a WebSocket. Tokens are compared in constant time.
//!
//! Bounded like the device port: at most `api_max_connections` connections (WebSocket
//! streams included; more are closed at once), `api_header_timeout` to send a request's
//! headers or the next chunk of its body or, on a kept-alive connection, the next
//! request; HTTP/1.1 only.

mod metrics;
mod token;

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::warn;

use crate::store::{Cancel, CommandRecord, TelemetryCursor, TelemetryQuery};
use crate::{CommandError, Event, Gateway, Shared, StoreError};
use device_client::proto::DeviceId;

pub use token::{TokenError, load_or_create_token};

/// The OpenAPI document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

const DASHBOARD: &str = include_str!("dashboard.html");

/// Longest a request may wait for a command result, in seconds.
const MAX_WAIT_S: f64 = 60.0;

/// Commands of a group queued at once (each is a store operation; the rest wait).
const GROUP_CONCURRENCY: usize = 64;

/// Time allowed to send one event to a WebSocket client before it is dropped: a client
/// that does not read must not hold a connection slot forever.
const WS_SEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Api {
    gw: Gateway,
    token: Arc<str>,
}

/// Every route: path, methods (for the OpenAPI sync test), handler.
pub fn routes() -> Vec<(
    &'static str,
    &'static [&'static str],
    MethodRouter<ApiState>,
)> {
    vec![
        ("/api/v1/devices", &["get"], get(list_devices)),
        (
            "/api/v1/devices/{id}",
            &["get", "put", "delete"],
            get(get_device).put(put_device).delete(delete_device),
        ),
        (
            "/api/v1/devices/{id}/telemetry",
            &["get"],
            get(get_telemetry),
        ),
        (
            "/api/v1/devices/{id}/telemetry/export",
            &["get"],
            get(export_telemetry),
        ),
        (
            "/api/v1/devices/{id}/commands",
            &["get", "post"],
            get(list_commands).post(post_command),
        ),
        ("/api/v1/commands/{id}", &["get"], get(get_command)),
        (
            "/api/v1/commands/{id}/cancel",
            &["post"],
            post(cancel_command),
        ),
        ("/api/v1/groups", &["get"], get(list_groups)),
        (
            "/api/v1/groups/{name}",
            &["get", "put", "delete"],
            get(get_group).put(put_group).delete(delete_group),
        ),
        (
            "/api/v1/groups/{name}/commands",
            &["post"],
            post(post_group_command),
        ),
        ("/api/v1/refusals", &["get"], get(list_refusals)),
        ("/api/v1/bridge", &["get"], get(bridge_state)),
        ("/api/v1/events", &["get"], get(events)),
        ("/api/v1/openapi.json", &["get"], get(openapi)),
        ("/metrics", &["get"], get(metrics::handler)),
    ]
}

/// The state handlers see (opaque outside this module).
#[derive(Clone)]
pub struct ApiState(Api);

/// The router: authenticated routes, the dashboard, the health check.
pub fn router(gw: Gateway, token: &str) -> Router {
    let state = ApiState(Api {
        gw,
        token: Arc::from(token),
    });
    let mut authed = Router::new();
    for (path, _, handler) in routes() {
        authed = authed.route(path, handler);
    }
    let authed = authed.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let body_timeout = state.0.gw.shared().config.api_header_timeout;
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .merge(authed)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no_route", "no such route") })
        .layer(middleware::map_response(json_errors))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_timeout,
        ))
        .with_state(state)
}

/// `200 ok` while the gateway keeps what it acknowledges; `503` with the JSON error
/// object (`code: store_failing`, the reason and since when) while it cannot.
async fn healthz(State(ApiState(api)): State<ApiState>) -> Response {
    match api.gw.shared().unhealthy() {
        None => "ok".into_response(),
        Some(f) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "error": format!("the store cannot keep telemetry: {}", f.reason),
                "code": "store_failing",
                "since_ms": f.since_ms,
            })),
        )
            .into_response(),
    }
}

/// A connection's TCP stream holding its slot of `api_max_connections`: the slot is
/// freed when the stream is, so a WebSocket (which takes the stream over from HTTP)
/// keeps its slot for as long as it is open.
struct Slotted {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    shared: Arc<Shared>,
}

impl Drop for Slotted {
    fn drop(&mut self) {
        self.shared
            .metrics
            .api_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Serves the API on `listener` until `stop` turns true, within the connection cap and
/// the header timeout (module docs). Then lets requests in progress finish, for up to
/// 10 s.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(shared.config.api_max_connections));
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            a = crate::server::accept(&listener) => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared
                .metrics
                .api_connections_refused
                .fetch_add(1, Ordering::Relaxed);
            if shared.log_gates.api.admit(Instant::now()) {
                warn!(%peer, "API connection refused: at api_max_connections");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        shared
            .metrics
            .api_connections
            .fetch_add(1, Ordering::Relaxed);
        let io = Slotted {
            tcp,
            _slot: slot,
            shared: shared.clone(),
        };
        conns.spawn(serve_connection(
            io,
            router.clone(),
            shared.config.api_header_timeout,
            stop.clone(),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, conns.join_next()).await {}
    conns.shutdown().await;
}

/// One API connection: HTTP/1.1 with upgrades, until it closes or `stop` turns true.
async fn serve_connection(
    io: Slotted,
    router: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "API connection ended");
    }
}

async fn require_token(
    State(ApiState(api)): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Browsers cannot set headers on a WebSocket: the events stream takes ?token=.
    let from_query = (req.uri().path() == "/api/v1/events")
        .then(|| req.uri().query().and_then(query_token))
        .flatten();
    match bearer.or(from_query.as_deref()) {
        Some(t) if token::matches(t, &api.token) => next.run(req).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "bad_token",
            "the token is not valid",
        ),
        None => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "no_token",
                "send Authorization: Bearer <token> (the token is in DATA_DIR/api-token)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

fn query_token(q: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

/// An API error: status, a stable machine-readable code, a message for people. Sent as
/// `{"error": message, "code": code}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": self.message, "code": self.code})),
        )
            .into_response()
    }
}

fn api_error(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

/// A JSON error response.
fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    api_error(status, code, message).into_response()
}

/// A JSON request body, whatever its `Content-Type` says: the body is what counts
/// (`curl -d` labels JSON as a form). Safe to be lenient: every route needs the
/// bearer token, which a browser sends cross-site only after a CORS preflight that
/// this API never allows.
struct JsonBody<T>(T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| api_error(e.status(), "bad_body", e.body_text()))?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            api_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("the body is not the JSON this route takes: {e}"),
            )
        })
    }
}

/// Query parameters, refused with the JSON error object (`bad_query`) when they do not
/// parse or are unknown (the structs deny unknown fields).
struct Params<T>(T);

impl<T, S> axum::extract::FromRequestParts<S> for Params<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map(Params)
            .map_err(|e| bad_query(format!("query string: {e}")))
    }
}

fn bad_query(message: impl Into<String>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "bad_query", message)
}

/// Gives every error response the JSON error object, including those made outside
/// the handlers (a path that does not parse, a wrong method, a body too large).
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    let code = match status {
        StatusCode::NOT_FOUND => "no_route",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let mut out = error(status, code, message);
    for name in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// A `Link: <...>; rel="next"` header for the next page.
fn next_link(mut r: Response, next: Option<String>) -> Response {
    if let Some(next) = next
        && let Ok(v) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\""))
    {
        r.headers_mut().insert(header::LINK, v);
    }
    r
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store failure in the API");
    api_error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
}

fn valid_id(id: &str) -> Result<(), ApiError> {
    DeviceId::new(id)
        .map(|_| ())
        .map_err(|e| api_error(StatusCode::BAD_REQUEST, "bad_device_id", e.to_string()))
}

async fn known_device(api: &Api, id: &str) -> Result<(), ApiError> {
    valid_id(id)?;
    match api.gw.device(id).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(api_error(
            StatusCode::NOT_FOUND,
            "no_device",
            format!("no device {id:?}"),
        )),
        Err(e) => Err(store_error(e)),
    }
}

async fn dashboard() -> Response {
    (
        [
            // The page carries a command form: no other site may frame it.
            (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(DASHBOARD),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `?limit=` (default 1,000, at most 10,000) `&after=ID`: a page of devices by id;
/// `Link: rel="next"` names the next page while there may be one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceParams {
    limit: Option<u32>,
    after: Option<String>,
}

async fn list_devices(
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
fn page_limit(limit: Option<u32>, default: u32) -> Result<u32, ApiError> {
    match limit.unwrap_or(default) {
        n @ 1..=10_000 => Ok(n),
        _ => Err(bad_query("limit must be from 1 to 10000")),
    }
}

async fn get_device(State(ApiState(api)): State<ApiState>, Path(id): Path<String>) -> Response {
    if let Err(r) = valid_id(&id) {
        return r.into_response();
    }
    match api.gw.device(&id).await {
        Ok(Some(d)) => axum::Json(d).into_response(),
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
async fn put_device(
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
async fn delete_device(
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
struct TelemetryParams {
    since: Option<i64>,
    until: Option<i64>,
    limit: Option<u32>,
    order: Option<Order>,
    after: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Order {
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

fn cursor(after: Option<&str>) -> Result<Option<TelemetryCursor>, ApiError> {
    after
        .map(|a| {
            TelemetryCursor::parse(a).ok_or_else(|| {
                bad_query("after must be a cursor from the Link header of the previous page")
            })
        })
        .transpose()
}

async fn get_telemetry(
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
struct ExportParams {
    since: Option<i64>,
    until: Option<i64>,
    format: Option<ExportFormat>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ExportFormat {
    Ndjson,
    Csv,
}

/// A device's telemetry in a time range, oldest first, streamed a page at a time (no
/// size limit, constant memory): NDJSON (one record per line, as the telemetry route
/// shows them) or CSV with one row per reading
/// (`device,boot_id,seq,time_ms,received_ms,name,value`).
async fn export_telemetry(
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
const EXPORT_PAGE: u32 = 1000;

/// One CSV row per reading of `rec` (RFC 4180 quoting for text).
fn csv_rows(out: &mut Vec<u8>, rec: &crate::TelemetryRecord) {
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

async fn list_commands(State(ApiState(api)): State<ApiState>, Path(id): Path<String>) -> Response {
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
struct CommandBody {
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

fn command_error(e: CommandError) -> ApiError {
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
async fn send_and_wait(
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
async fn send(
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
async fn wait_for(
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

async fn post_command(
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

async fn get_command(State(ApiState(api)): State<ApiState>, Path(id): Path<i64>) -> Response {
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
async fn cancel_command(
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

async fn delete_group(
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

async fn list_groups(State(ApiState(api)): State<ApiState>) -> Response {
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

async fn get_group(State(ApiState(api)): State<ApiState>, Path(name): Path<String>) -> Response {
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
struct GroupBody {
    devices: Vec<String>,
}

async fn put_group(
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

async fn post_group_command(
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

/// The MQTT bridge: configured, connected, backlog, counters (404 `no_bridge` when
/// no broker is configured).
async fn bridge_state(State(ApiState(api)): State<ApiState>) -> Result<Response, ApiError> {
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

async fn list_refusals(State(ApiState(api)): State<ApiState>) -> Response {
    axum::Json(api.gw.recent_refusals()).into_response()
}

/// `?device=a&device=b&group=g&type=telemetry&type=presence` (all optional).
async fn events(
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
const EVENT_TYPES: [&str; 4] = ["telemetry", "presence", "command", "handshake_refused"];

struct Filter {
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

async fn stream_events(api: Api, mut socket: WebSocket, filter: Filter) {
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
