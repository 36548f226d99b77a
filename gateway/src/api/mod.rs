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
//!  GET|PUT .../devices/{id}/state   desired and reported settings (protocol v2)  token
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

mod commands;
mod devices;
mod events;
mod extract;
mod firmware;
mod metrics;
mod server;
mod state;
mod token;

use commands::*;
use devices::*;
use events::*;
use extract::*;
use firmware::*;
pub(crate) use server::serve;
use state::*;

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
        (
            "/api/v1/devices/{id}/state",
            &["get", "put"],
            get(get_state).put(put_state),
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
        (
            "/api/v1/groups/{name}/state",
            &["put"],
            axum::routing::put(put_group_state),
        ),
        (
            "/api/v1/firmware",
            &["get", "post"],
            // An image is bounded by `max_firmware_size`, checked as it arrives.
            get(list_firmware)
                .post(post_firmware)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        ),
        (
            "/api/v1/rollouts",
            &["get", "post"],
            get(list_rollouts).post(post_rollout),
        ),
        ("/api/v1/rollouts/{id}", &["get"], get(get_rollout)),
        (
            "/api/v1/rollouts/{id}/pause",
            &["post"],
            post(|s, p| rollout_action(s, p, Action::Pause)),
        ),
        (
            "/api/v1/rollouts/{id}/resume",
            &["post"],
            post(|s, p| rollout_action(s, p, Action::Resume)),
        ),
        (
            "/api/v1/rollouts/{id}/cancel",
            &["post"],
            post(|s, p| rollout_action(s, p, Action::Cancel)),
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
