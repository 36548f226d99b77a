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

/// The certificate expiry windows of `gateway_device_certificates_expiring`.
const EXPIRY_WINDOWS: [(&str, i64); 4] = [
    ("expired", 0),
    ("1d", 86_400),
    ("7d", 7 * 86_400),
    ("30d", 30 * 86_400),
];

pub(super) async fn handler(State(super::ApiState(api)): State<ApiState>) -> Response {
    let counts = api.gw.store().command_counts().await.unwrap_or_default();
    let now = crate::tls::unix_now();
    let deadlines = EXPIRY_WINDOWS.iter().map(|(_, w)| now + w).collect();
    let expiring = api
        .gw
        .store()
        .certs_expiring_before(deadlines)
        .await
        .unwrap_or_default();
    let mut body = render(&api.gw, &counts);
    rollout_metrics(&mut body, &api.gw);
    if expiring.len() == EXPIRY_WINDOWS.len() {
        let _ = writeln!(
            body,
            "# HELP gateway_device_certificates_expiring Devices whose last certificate \
             has expired, or expires within the window (cumulative).\n\
             # TYPE gateway_device_certificates_expiring gauge"
        );
        for ((window, _), n) in EXPIRY_WINDOWS.iter().zip(expiring) {
            let _ = writeln!(
                body,
                "gateway_device_certificates_expiring{{within=\"{window}\"}} {n}"
            );
        }
    }
    if let Some(b) = &api.gw.shared().bridge {
        bridge_metrics(&mut body, b, api.gw.store()).await;
    }
    if let Some(f) = &api.gw.shared().fleet {
        fleet_metrics(&mut body, f, api.gw.store()).await;
    }
    if let Some(c) = &api.gw.shared().fleet_commands {
        fleet_command_metrics(&mut body, c);
    }
    process_metrics(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn render(gw: &crate::Gateway, commands: &[(CommandState, u64)]) -> String {
    let m = gw.metrics();
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        sample(&mut out, name, kind, help, &value)
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
    // The plain counters, one row each.
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 9] = [
        (
            "gateway_firmware_bytes_sent_total",
            "Firmware image bytes sent to devices in chunks (protocol version 3).",
            &m.firmware_bytes_sent,
        ),
        (
            "gateway_handshakes_ok_total",
            "TLS handshakes completed.",
            &m.handshakes_ok,
        ),
        (
            "gateway_telemetry_received_total",
            "Telemetry records received.",
            &m.telemetry_received,
        ),
        (
            "gateway_telemetry_stored_total",
            "Telemetry records stored (new).",
            &m.telemetry_stored,
        ),
        (
            "gateway_telemetry_duplicates_total",
            "Telemetry records received again and ignored.",
            &m.telemetry_duplicates,
        ),
        (
            "gateway_protocol_violations_total",
            "Sessions closed for a protocol violation.",
            &m.protocol_violations,
        ),
        (
            "gateway_overload_refusals_total",
            "Connections refused at max_connections.",
            &m.overload_refusals,
        ),
        (
            "gateway_api_connections_refused_total",
            "API connections closed at once at api_max_connections.",
            &m.api_connections_refused,
        ),
        (
            "gateway_command_results_ignored_total",
            "Command results for commands not in flight on their session.",
            &m.command_results_ignored,
        ),
    ];
    for (name, help, value) in counters {
        metric(name, "counter", help, load(value));
    }

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
    let now = crate::tls::unix_now();
    if let Some(t) = material.crl_next_update {
        metric(
            "gateway_crl_next_update_timestamp_seconds",
            "gauge",
            "The CRL's next-update date (the earliest, if several).",
            t.to_string(),
        );
        metric(
            "gateway_crl_next_update_seconds",
            "gauge",
            "Seconds left until the CRL's next update (negative: past it; a warning is \
             logged from 7 days before).",
            (t - now).to_string(),
        );
    }
    if let Some(t) = material.gateway_not_after {
        metric(
            "gateway_certificate_expiry_timestamp_seconds",
            "gauge",
            "Expiry of the gateway's own certificate (a warning is logged from 7 days \
             before).",
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
        "# HELP gateway_build_info Always 1; the version is in the label.\n\
         # TYPE gateway_build_info gauge\n\
         gateway_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
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

/// The MQTT bridge's state.
async fn bridge_metrics(out: &mut String, b: &crate::bridge::BridgeStatus, store: &crate::Store) {
    samples(
        out,
        &[
            (
                "gateway_mqtt_connected",
                "gauge",
                "1 while the MQTT bridge is connected to its broker.",
                u8::from(b.connected.load(Ordering::Relaxed)).to_string(),
            ),
            (
                "gateway_mqtt_published_total",
                "counter",
                "Records the broker acknowledged (QoS 1) or that were sent (QoS 0).",
                b.published.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_mqtt_connect_failures_total",
                "counter",
                "Connections to the broker that failed or broke.",
                b.connect_failures.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_mqtt_connects_total",
                "counter",
                "Connections the broker accepted (the first, then each reconnect).",
                b.connects.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_mqtt_refused_total",
                "counter",
                "Records the broker refused in its PUBACK (logged, not retried).",
                b.refused.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_mqtt_dropped_total",
                "counter",
                "Records retention deleted before the bridge delivered them (mqtt.drop_undelivered).",
                b.dropped.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_mqtt_commands_total",
                "counter",
                "Command requests taken from the broker (queued or answered with an error).",
                b.commands.load(Ordering::Relaxed).to_string(),
            ),
        ],
    );
    sink_backlog(
        out,
        "mqtt",
        "the bridge",
        store,
        b.cursor.load(Ordering::Relaxed),
    )
    .await;
}

/// The fleet sink's state.
async fn fleet_metrics(out: &mut String, f: &crate::fleet::FleetStatus, store: &crate::Store) {
    samples(
        out,
        &[
            (
                "gateway_fleet_connected",
                "gauge",
                "1 while the fleet sink is connected to NATS with its stream in place.",
                u8::from(f.connected.load(Ordering::Relaxed)).to_string(),
            ),
            (
                "gateway_fleet_published_total",
                "counter",
                "Records the fleet's stream acknowledged (new or duplicate).",
                f.published.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_fleet_duplicates_total",
                "counter",
                "Records the stream already had (sent again after a crash, or by another gateway).",
                f.duplicates.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_fleet_failures_total",
                "counter",
                "Connections to NATS, or publishes, that failed.",
                f.failures.load(Ordering::Relaxed).to_string(),
            ),
        ],
    );
    sink_backlog(
        out,
        "fleet",
        "the fleet sink",
        store,
        f.cursor.load(Ordering::Relaxed),
    )
    .await;
}

/// A northbound sink's backlog: `gateway_{sink}_backlog_records` and
/// `gateway_{sink}_backlog_age_seconds`.
async fn sink_backlog(out: &mut String, sink: &str, who: &str, store: &crate::Store, cursor: i64) {
    let (backlog, oldest) = store.backlog(cursor).await.unwrap_or((0, None));
    let age = oldest.map_or(0.0, |t| (crate::store::now_ms() - t).max(0) as f64 / 1000.0);
    samples(
        out,
        &[
            (
                &format!("gateway_{sink}_backlog_records"),
                "gauge",
                &format!("Stored records {who} has not delivered yet."),
                backlog.to_string(),
            ),
            (
                &format!("gateway_{sink}_backlog_age_seconds"),
                "gauge",
                &format!("Age of the oldest record {who} has not delivered yet (0: none)."),
                format!("{age}"),
            ),
        ],
    );
}

/// Writes each sample with its HELP and TYPE lines: (name, type, help, value).
fn samples(out: &mut String, rows: &[(&str, &str, &str, String)]) {
    for (name, kind, help, value) in rows {
        sample(out, name, kind, help, value);
    }
}

/// Devices of the firmware rollouts still under way (running or paused), by state.
fn rollout_metrics(out: &mut String, gw: &crate::Gateway) {
    let mut by_state = std::collections::BTreeMap::<&str, usize>::new();
    for r in gw.shared().firmware.with(|r| r.list()) {
        if r.state.is_final() {
            continue;
        }
        for (state, n) in r.counts {
            if state != "total" {
                *by_state.entry(state).or_default() += n;
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP gateway_rollout_devices Devices of the firmware rollouts under way \
         (running or paused), by state.\n# TYPE gateway_rollout_devices gauge"
    );
    for (state, n) in by_state {
        let _ = writeln!(out, "gateway_rollout_devices{{state=\"{state}\"}} {n}");
    }
}

/// Writes one sample with its HELP and TYPE lines.
fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: &str) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The fleet's command routing.
fn fleet_command_metrics(out: &mut String, c: &crate::fleet::commands::FleetCommands) {
    let n = &c.counts;
    samples(
        out,
        &[
            (
                "gateway_fleet_command_slot",
                "gauge",
                "This gateway's command-id slot in the fleet (ids are slot * 2^32 + n; 0 until claimed).",
                c.slot().to_string(),
            ),
            (
                "gateway_fleet_commands_handed_total",
                "counter",
                "Commands asked here and handed to the gateway that holds their device.",
                n.handed.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_fleet_commands_published_total",
                "counter",
                "Commands put into the fleet's pending stream (device online nowhere).",
                n.published.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_fleet_commands_taken_total",
                "counter",
                "Commands of other gateways taken here for delivery.",
                n.taken.load(Ordering::Relaxed).to_string(),
            ),
            (
                "gateway_fleet_commands_expired_total",
                "counter",
                "Pending commands found past their time to live and dropped.",
                n.expired.load(Ordering::Relaxed).to_string(),
            ),
        ],
    );
}

/// The standard `process_*` metrics, from `/proc/self` (left out where it is not
/// readable).
fn process_metrics(out: &mut String) {
    let mut metric =
        |name: &str, kind: &str, help: &str, value: String| sample(out, name, kind, help, &value);
    // /proc counts CPU time in USER_HZ, which Linux fixes at 100 for user space.
    let ticks = 100.0;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        // Fields after the command name, which is in parentheses and may hold spaces.
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime, stime (fields 14 and 15 of the whole line), in clock ticks.
        let cpu = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        if let (Some(u), Some(s)) = (cpu(11), cpu(12)) {
            metric(
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent, in seconds.",
                format!("{}", (u + s) as f64 / ticks),
            );
        }
        // starttime (field 22), in ticks since boot.
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        });
        if let (Some(start), Some(boot)) = (cpu(19), boot) {
            metric(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, in seconds.",
                format!("{}", boot as f64 + start as f64 / ticks),
            );
        }
    }
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        });
    if let Some(kib) = rss_kib {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (kib * 1024).to_string(),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count().to_string(),
        );
    }
    if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
        metric(
            "process_max_fds",
            "gauge",
            "The open-file limit.",
            soft.to_string(),
        );
    }
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
