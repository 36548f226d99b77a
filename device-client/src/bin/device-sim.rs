//! `device-sim`: many simulated devices against one gateway, from one process.
//!
//! ```text
//! certs init --dir certs && certs devices --dir certs --prefix sim- --count 1000
//! device-sim --gateway 127.0.0.1:7443 --certs certs --devices 1000 --rate 0.2 --duration 60
//! ```

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use device_client::sim::{
    Devices, Histogram, SimConfig, Simulator, Stats, Summary, load_release_key,
};

/// `eprintln!` that never panics: progress and errors are for a person, and a stderr
/// that is gone (a pipe whose reader quit) must not turn the run or its exit status
/// into a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that never panics (see `say!`).
macro_rules! say_inline {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// Simulated devices: each has its own certificate and TLS connection, sends drifting
/// telemetry (temperature, humidity, battery, uptime, signal) at --rate records per
/// second, keeps unacked records in a ring and replays them after a reconnect, and
/// answers the commands echo, set_interval (interval_ms or interval_s) and reboot.
/// Devices install the firmware a gateway's rollout offers (protocol version 3) and
/// restart into it; with --release-key they check the release signature, without it
/// only size and SHA-256 (a simulator convenience).
///
/// A progress line goes to stderr once a second. At the end (after --duration, or on
/// Ctrl-C) the devices stop producing and wait up to --drain-timeout for their last
/// acks; then a summary is printed (to stdout, or to stderr with --json, which puts a
/// JSON summary on stdout).
#[derive(Parser)]
#[command(
    // The binary's name, not the crate's (`device-client`), in --version and usage.
    name = "device-sim",
    version,
    after_help = "\
Examples:
  certs init --dir certs
  certs devices --dir certs --prefix sim- --count 1000
  gateway run --ca certs/ca.pem --cert certs/gateway.pem --key certs/gateway.key.pem &
  device-sim --gateway 127.0.0.1:7443 --certs certs --devices 1000 --rate 0.2 --duration 60

Each device uses one socket: raise the open-file limit (ulimit -n) above --devices.
Exit status: 0 when every record was acked, 2 when some were still unacked at the end,
1 on errors."
)]
struct Cli {
    /// The gateway's device listener; or several, comma-separated (a fleet: devices
    /// spread over them, and move to the next after a failed connect).
    #[arg(long, value_name = "HOST:PORT")]
    gateway: String,
    /// The certs directory (ca.pem and devices/ID/{cert,key}.pem, as `certs` writes it).
    #[arg(long, value_name = "DIR")]
    certs: PathBuf,
    /// How many devices: PREFIX + a zero-padded counter from --first.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    devices: u64,
    /// Telemetry records per second per device (0.2 = one every 5 s; 0 = none).
    #[arg(long, value_name = "MSGS_PER_S", default_value_t = 1.0)]
    rate: f64,
    /// Seconds to run; without it, run until Ctrl-C.
    #[arg(long, value_name = "S")]
    duration: Option<f64>,
    /// Device id prefix (as given to `certs devices --prefix`).
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// First counter value (as given to `certs devices --start`).
    #[arg(long, value_name = "N", default_value_t = 0)]
    first: u64,
    /// The name the gateway's certificate must carry.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    server_name: String,
    /// Print the summary as JSON on stdout (per device: boot ids, records sent and the
    /// highest seq acked per boot).
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the last acks after producing stops.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    drain_timeout: f64,
    /// Each device's ring of unacked records in bytes (1024 to 65536; ~90 bytes a record).
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    ring_bytes: usize,
    /// Worker threads [default: one per core].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// TCP connects + TLS handshakes in progress at once (the connect ramp).
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_handshakes: usize,
    /// First reconnect delay in seconds (doubles per failure, with jitter, up to 60 s).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    backoff_min: f64,
    /// Lowest protocol version accepted from the gateway: 2 makes devices refuse a
    /// version 1 gateway (as a device that needs the state document would), 3 one
    /// without firmware updates.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    min_version: u8,
    /// The firmware release public key (`certs release-key` writes release.pub.bin, 65
    /// bytes SEC1, and release.pub.pem; either will do): offered images must carry its
    /// signature. Without it devices check size and SHA-256 only.
    #[arg(long, value_name = "FILE")]
    release_key: Option<PathBuf>,
    /// The share of devices (0 to 1) whose flash fails: they download an offered image
    /// and report storage_error instead of installing it (the same devices for the same
    /// offer in every run).
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    firmware_failure_rate: f64,
}

fn seconds(what: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("--{what} must be a number of seconds >= 0, not {s}"))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            say!("device-sim: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if !cli.certs.is_dir() {
        bail!(
            "certs directory {} does not exist: run: certs init --dir {0} && certs devices --dir {0} --prefix {} --count {}",
            cli.certs.display(),
            cli.prefix,
            cli.devices
        );
    }
    if let Some(limit) = open_file_limit()
        && cli.devices + 64 > limit
    {
        say!(
            "device-sim: warning: {} devices need as many sockets, but the open-file limit is {limit}: raise it (ulimit -n {}) or run fewer devices per process",
            cli.devices,
            cli.devices + 256
        );
    }
    let count = usize::try_from(cli.devices).context("--devices is too large")?;
    let mut config = SimConfig::new(
        cli.gateway.clone(),
        Devices::Dir {
            dir: cli.certs.clone(),
            prefix: cli.prefix.clone(),
            first: cli.first,
            count,
        },
    );
    config.server_name = cli.server_name.clone();
    config.rate = cli.rate;
    config.duration = cli.duration.map(|d| seconds("duration", d)).transpose()?;
    config.drain_timeout = seconds("drain-timeout", cli.drain_timeout)?;
    config.ring_bytes = cli.ring_bytes;
    config.threads = cli.threads;
    config.max_handshakes = cli.max_handshakes;
    config.backoff_min = seconds("backoff-min", cli.backoff_min)?;
    config.min_version = cli.min_version;
    config.release_key = cli
        .release_key
        .as_deref()
        .map(load_release_key)
        .transpose()?;
    config.firmware_failure_rate = cli.firmware_failure_rate;

    say!(
        "device-sim: loading {count} device certificates from {}",
        cli.certs.display()
    );
    let sim = Simulator::start(config)?;
    say!(
        "device-sim: {count} devices -> {} ({} records/s each); Ctrl-C stops",
        cli.gateway,
        cli.rate
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(watch(sim))?;
    let human = human_summary(&summary);
    if cli.json {
        say_inline!("{human}");
        let mut json = serde_json::to_vec_pretty(&summary)?;
        json.push(b'\n');
        print_out(&json)?;
    } else {
        print_out(human.as_bytes())?;
    }
    Ok(if summary.drained {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Writes the summary to stdout. A reader that went away (`device-sim ... | head -3`)
/// is not an error of the simulation: the exit status still says whether every record
/// was acked (`print!` would panic instead).
fn print_out(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Prints progress once a second until the simulation ends; Ctrl-C stops it (twice:
/// at once, without waiting for acks).
async fn watch(sim: Simulator) -> anyhow::Result<Summary> {
    let monitor = sim.monitor();
    let done = sim.wait();
    tokio::pin!(done);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let tty = std::io::stderr().is_terminal();
    let mut last = Histogram::default();
    let mut interrupts = 0;
    let mut hinted = false;
    let mut all_connected = false;
    // One listener for the whole run: a `ctrl_c()` made anew in each round of the loop
    // misses an interrupt that arrives between two rounds (while a progress line is
    // printed, just when a script that reads them sends it), and the run never stops.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            summary = &mut done => {
                if tty {
                    say!();
                }
                return Ok(summary?);
            }
            _ = tick.tick() => {
                let stats = monitor.stats();
                let line = progress(&stats, &last);
                last = stats.ack_latency.clone();
                if tty {
                    say_inline!("\r\x1b[2K{line}");
                } else {
                    say!("{line}");
                }
                hinted = hint(&stats, hinted, tty);
                if let (false, Some(after)) = (all_connected, stats.all_connected_after) {
                    all_connected = true;
                    if tty {
                        say!();
                    }
                    say!(
                        "device-sim: all {} devices connected after {:.2} s",
                        stats.devices,
                        after.as_secs_f64()
                    );
                }
            }
            _ = interrupt.recv() => {
                interrupts += 1;
                if tty {
                    say!();
                }
                if interrupts == 1 {
                    say!("device-sim: stopping: waiting for the last acks (Ctrl-C again to quit now)");
                    monitor.stop();
                } else {
                    monitor.abort();
                }
            }
        }
    }
}

/// Says once what is probably wrong when nothing connects.
fn hint(s: &Stats, hinted: bool, tty: bool) -> bool {
    if hinted || s.ever_connected > 0 || s.elapsed < Duration::from_secs(15) {
        return hinted;
    }
    if tty {
        say!();
    }
    say!(
        "device-sim: no device has connected after {:.0} s (connect failures: {:?}, disconnects: {:?}): is the gateway running at that address, does its certificate carry --server-name, and does it trust this CA?",
        s.elapsed.as_secs_f64(),
        s.counts.connect_failures_by_reason,
        s.counts.disconnects_by_reason
    );
    true
}

fn ms(d: Option<Duration>) -> String {
    match d {
        Some(d) => format!("{:.1} ms", d.as_secs_f64() * 1000.0),
        None => "-".into(),
    }
}

/// One line: connected, sent, acked, ack latency of the last second, reconnects.
fn progress(s: &Stats, last: &Histogram) -> String {
    let recent = s.ack_latency.since(last);
    let mut line = format!(
        "[{:>5.0}s] connected {}/{}  sent {}  acked {}  unacked {}  ack p50 {} p99 {}  reconnects {}",
        s.elapsed.as_secs_f64(),
        s.connected,
        s.devices,
        s.counts.sent,
        s.counts.acked,
        s.counts.unacked,
        ms(recent.quantile(0.5)),
        ms(recent.quantile(0.99)),
        s.counts.reconnects,
    );
    if s.counts.connect_failures > 0 {
        line.push_str(&format!("  connect failures {}", s.counts.connect_failures));
    }
    if s.counts.ring_full > 0 {
        line.push_str(&format!("  ring full {}", s.counts.ring_full));
    }
    if s.counts.commands > 0 {
        line.push_str(&format!("  commands {}", s.counts.commands));
    }
    let c = &s.counts;
    if c.firmware_installed + c.firmware_failed + c.firmware_declined > 0 {
        line.push_str(&format!(
            "  firmware installed {} failed {} declined {}",
            c.firmware_installed, c.firmware_failed, c.firmware_declined
        ));
    }
    if s.phase != device_client::sim::Phase::Running {
        line.push_str(&format!("  ({:?})", s.phase).to_lowercase());
    }
    line
}

fn human_summary(s: &Summary) -> String {
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    let mut out = String::new();
    out.push_str(&format!(
        "device-sim: {} devices at {} records/s each, ran {:.1} s, drained in {:.1} s\n",
        s.devices,
        s.rate_per_device,
        s.run_ms as f64 / 1000.0,
        s.drain_ms as f64 / 1000.0
    ));
    out.push_str(&format!(
        "  all connected after  {}\n",
        s.all_connected_after_ms
            .map_or("never (see connect failures)".into(), |ms| format!(
                "{:.2} s",
                ms as f64 / 1000.0
            ))
    ));
    out.push_str(&format!(
        "  telemetry            sent {}, acked {}, unacked {}{}, ring full {}\n",
        s.counts.sent,
        s.counts.acked,
        s.counts.unacked,
        if s.drained {
            " (all acked)"
        } else {
            " (drain timed out)"
        },
        s.counts.ring_full
    ));
    out.push_str(&format!(
        "  ack latency          p50 {}, p90 {}, p99 {}, max {} ({} records queued on an open session)\n",
        f(s.ack_latency.p50_ms),
        f(s.ack_latency.p90_ms),
        f(s.ack_latency.p99_ms),
        f(s.ack_latency.max_ms),
        s.ack_latency.count
    ));
    out.push_str(&format!(
        "  sessions             connects {}, reconnects {}, disconnects {} {:?}, connect failures {} {:?}\n",
        s.counts.connects,
        s.counts.reconnects,
        s.counts.disconnects,
        s.counts.disconnects_by_reason,
        s.counts.connect_failures,
        s.counts.connect_failures_by_reason
    ));
    out.push_str(&format!(
        "  commands             {} run, {} reboots, {} records lost to reboots\n",
        s.counts.commands, s.counts.reboots, s.counts.lost_on_reboot
    ));
    let c = &s.counts;
    if c.firmware_installed + c.firmware_failed + c.firmware_declined > 0 {
        let mut versions = std::collections::BTreeMap::<&str, usize>::new();
        for d in &s.per_device {
            *versions.entry(d.firmware.as_str()).or_default() += 1;
        }
        out.push_str(&format!(
            "  firmware             {} installed, {} failed, {} declined; devices by version {versions:?}\n",
            c.firmware_installed, c.firmware_failed, c.firmware_declined
        ));
    }
    if s.counts.fatal > 0 {
        let first = s
            .per_device
            .iter()
            .find_map(|d| d.fatal.as_ref().map(|why| format!("{}: {why}", d.id)));
        out.push_str(&format!(
            "  refused for good     {} devices (first: {})\n",
            s.counts.fatal,
            first.unwrap_or_default()
        ));
    }
    out
}

/// The soft open-file limit, from /proc on Linux.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
