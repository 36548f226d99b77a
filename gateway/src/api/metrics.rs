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
    metric(
        "gateway_handshakes_in_progress",
        "gauge",
        "Connections in their TLS handshake (not yet authenticated).",
        m.handshakes_in_progress.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "gateway_max_connections",
        "gauge",
        "Device connections allowed past the handshake (max_connections in force).",
        gw.shared().max_connections.to_string(),
    );
    metric(
        "gateway_api_connections",
        "gauge",
        "Operator API connections open (WebSocket streams included).",
        m.api_connections.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "gateway_api_connections_refused_total",
        "counter",
        "API connections closed at once at api_max_connections.",
        load(&m.api_connections_refused),
    );
    metric(
        "gateway_command_results_ignored_total",
        "counter",
        "Command results for commands not in flight on their session.",
        load(&m.command_results_ignored),
    );
    let failing = gw.shared().unhealthy();
    metric(
        "gateway_store_healthy",
        "gauge",
        "1 while the store commits what it is given, 0 while commits fail.",
        u8::from(failing.is_none()).to_string(),
    );
    metric(
        "gateway_store_failures_total",
        "counter",
        "Store commits or operations that failed.",
        gw.store().failures().to_string(),
    );
    let material = gw.shared().tls.current();
    if let Some(t) = material.crl_next_update {
        metric(
            "gateway_crl_next_update_timestamp_seconds",
            "gauge",
            "The CRL's next-update date (the earliest, if several).",
            t.to_string(),
        );
    }
    metric(
        "gateway_crl_stale",
        "gauge",
        "1 while the CRL is past its next-update date.",
        u8::from(material.crl_stale(crate::tls::unix_now())).to_string(),
    );
    let _ = writeln!(
        out,
        "# HELP gateway_preauth_refusals_total Connections closed before finishing their \
         TLS handshake: their source at max_handshakes_per_source, or evicted at \
         max_handshakes.\n# TYPE gateway_preauth_refusals_total counter\n\
         gateway_preauth_refusals_total{{reason=\"per_source\"}} {}\n\
         gateway_preauth_refusals_total{{reason=\"evicted\"}} {}",
        load(&m.preauth_refused_per_source),
        load(&m.preauth_evicted),
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
