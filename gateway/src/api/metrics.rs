//! `GET /metrics`: Prometheus text exposition of the gateway's counters.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::ApiState;
use crate::events::Histogram;
use crate::store::CommandState;
use crate::tls::Refusal;

pub(super) async fn handler(State(super::ApiState(api)): State<ApiState>) -> Response {
    let counts = api.gw.store().command_counts().await.unwrap_or_default();
    let body = render(&api.gw, &counts);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn render(gw: &crate::Gateway, commands: &[(CommandState, u64)]) -> String {
    let m = gw.metrics();
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
    metric(
        "gateway_connections",
        "gauge",
        "Device connections open (TLS done).",
        m.connections.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "gateway_sessions",
        "gauge",
        "Device sessions open (after Hello).",
        m.sessions.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "gateway_handshakes_ok_total",
        "counter",
        "TLS handshakes completed.",
        load(&m.handshakes_ok),
    );
    metric(
        "gateway_telemetry_received_total",
        "counter",
        "Telemetry records received.",
        load(&m.telemetry_received),
    );
    metric(
        "gateway_telemetry_stored_total",
        "counter",
        "Telemetry records stored (new).",
        load(&m.telemetry_stored),
    );
    metric(
        "gateway_telemetry_duplicates_total",
        "counter",
        "Telemetry records received again and ignored.",
        load(&m.telemetry_duplicates),
    );
    metric(
        "gateway_protocol_violations_total",
        "counter",
        "Sessions closed for a protocol violation.",
        load(&m.protocol_violations),
    );
    metric(
        "gateway_overload_refusals_total",
        "counter",
        "Connections refused at max_connections.",
        load(&m.overload_refusals),
    );
    let _ = writeln!(
        out,
        "# HELP gateway_handshakes_refused_total TLS connections refused, by reason.\n\
         # TYPE gateway_handshakes_refused_total counter"
    );
    for r in Refusal::ALL {
        let _ = writeln!(
            out,
            "gateway_handshakes_refused_total{{reason=\"{}\"}} {}",
            r.as_str(),
            m.refused_count(r)
        );
    }
    let _ = writeln!(
        out,
        "# HELP gateway_commands Commands in the store, by state.\n# TYPE gateway_commands gauge"
    );
    for state in CommandState::ALL {
        let n = commands
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "gateway_commands{{state=\"{}\"}} {n}", state.as_str());
    }
    histogram(
        &mut out,
        "gateway_ack_latency_seconds",
        "From a record's arrival to its ack being queued.",
        &m.ack_latency,
    );
    histogram(
        &mut out,
        "gateway_commit_latency_seconds",
        "From a batch's submission to the store to its commit.",
        &m.commit_latency,
    );
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (buckets, sum, count) = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (le, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}
