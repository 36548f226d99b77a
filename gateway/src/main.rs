//! `gateway`: the command line. Everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use gateway::{Config, Gateway, LogFormat};

// A module of the binary, not the library: only it needs the simulator and the PKI tool.
#[cfg(feature = "quickstart")]
mod quickstart;

/// IoT device gateway: devices connect with mutual TLS, their telemetry is stored
/// durably and acknowledged, and commands are relayed to them.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    ///
    /// Settings come from the defaults, then `--config FILE`, then flags. SIGHUP reloads
    /// the CA, CRL and gateway certificate; SIGINT/SIGTERM shut down gracefully.
    ///
    /// Example: gateway run --ca certs/ca.pem --cert certs/gateway.pem --key certs/gateway.key.pem --crl certs/crl.pem
    Run(RunArgs),
    /// Print the effective settings as TOML (defaults, file and flags merged).
    PrintConfig(RunArgs),
    /// Print the live event stream of a running gateway (telemetry, presence,
    /// commands, refused handshakes), one JSON object per line.
    ///
    /// Example: gateway events --token-file quickstart/data/api-token --device sim-0001
    Events(EventsArgs),
    /// Copy the store of a gateway into a new file, safely while it runs (SQLite online
    /// backup: a consistent snapshot of everything committed).
    ///
    /// Restore: stop the gateway, copy the file to DATA_DIR/gateway.sqlite (removing
    /// gateway.sqlite-wal and -shm beside it), start the gateway.
    Backup(BackupArgs),
    /// Try it all in one command: a development CA and certificates in ./quickstart
    /// (made if absent), the gateway on built-in defaults (devices on 127.0.0.1:7443,
    /// dashboard and API on 127.0.0.1:8080), and simulated devices in this process.
    /// Prints the dashboard URL with its token. Ctrl-C stops everything.
    #[cfg(feature = "quickstart")]
    Quickstart(QuickstartArgs),
}

#[cfg(feature = "quickstart")]
#[derive(Args)]
struct QuickstartArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 25)]
    devices: usize,
    /// Telemetry records per device per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Directory for the certificates and the data.
    #[arg(long, default_value = "quickstart")]
    dir: PathBuf,
    /// Device listener.
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: SocketAddr,
    /// Dashboard and API listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    api_listen: SocketAddr,
    /// Relay telemetry to this MQTT broker (mqtt://HOST[:PORT]) [default: no bridge].
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
}

#[derive(Args)]
struct EventsArgs {
    /// The gateway's API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// File holding the API token (the gateway's DATA_DIR/api-token).
    #[arg(long, default_value = "data/api-token")]
    token_file: PathBuf,
    /// Only events of this device (repeatable).
    #[arg(long)]
    device: Vec<String>,
    /// Only events of the devices of this group (repeatable).
    #[arg(long)]
    group: Vec<String>,
    /// Only events of this type: telemetry, presence, command, handshake_refused
    /// (repeatable).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args)]
struct BackupArgs {
    /// The new file (must not exist).
    #[arg(long)]
    to: PathBuf,
    /// The gateway's configuration file, to find its data directory.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The gateway's data directory [default: data, or the config file's].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// TOML configuration file (see gateway.example.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    o: Overrides,
}

/// One flag per setting; each overrides the file. See gateway.example.toml. The
/// defaults shown in `--help` come from `Config::default()` ([`with_defaults`]).
#[derive(Args)]
struct Overrides {
    /// Device listener address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// CA bundle (PEM) that issues device certificates.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Gateway certificate chain (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Gateway private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// CRL (PEM); revoked devices are refused [default: none].
    #[arg(long)]
    crl: Option<PathBuf>,
    /// Directory of the SQLite store.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Refuse TLS 1.2.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    tls13_only: Option<bool>,
    /// Refuse every device while the CRL is past its next-update date (false: warn only).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    refuse_stale_crl: Option<bool>,
    /// Largest TLS record sent, header included (>= 1024), for small devices [default:
    /// 16 KiB, TLS's own].
    #[arg(long)]
    max_fragment_size: Option<usize>,
    /// Listen backlog of the device and API listeners.
    #[arg(long)]
    listen_backlog: Option<u32>,
    /// Most device connections past the TLS handshake at once [default: what the
    /// open-file limit leaves after the other budgets].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections in their TLS handshake at once.
    #[arg(long)]
    max_handshakes: Option<usize>,
    /// Most connections in their TLS handshake at once from one address (IPv6: one /64).
    #[arg(long)]
    max_handshakes_per_source: Option<usize>,
    /// TLS handshake timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    handshake_timeout: Option<Duration>,
    /// Time allowed for Hello after the handshake.
    #[arg(long, value_parser = humantime::parse_duration)]
    hello_timeout: Option<Duration>,
    /// Heartbeat interval sent to devices.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
    /// Time allowed for one write to a device.
    #[arg(long, value_parser = humantime::parse_duration)]
    write_timeout: Option<Duration>,
    /// Largest frame accepted from a device, header included.
    #[arg(long)]
    max_frame: Option<u16>,
    /// Records a session may hold waiting for a commit.
    #[arg(long)]
    max_pending_records: Option<usize>,
    /// Seconds devices are asked to wait after Goodbye{Overload|Shutdown}.
    #[arg(long)]
    retry_after_s: Option<u16>,
    /// Ack before fsync: a power loss may lose telemetry devices saw acked.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    danger_ack_before_fsync: Option<bool>,
    /// Records in one group commit, at most.
    #[arg(long)]
    max_commit_records: Option<usize>,
    /// Delete telemetry older than this, e.g. 30days.
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Keep at most this many telemetry rows [default: no limit].
    #[arg(long)]
    retention_max_rows: Option<u64>,
    /// Time to live of commands without one.
    #[arg(long, value_parser = humantime::parse_duration)]
    command_ttl: Option<Duration>,
    /// Commands queued per device, at most.
    #[arg(long)]
    max_queued_commands: Option<usize>,
    /// Operator API and dashboard address.
    #[arg(long, conflicts_with = "no_api")]
    api_listen: Option<SocketAddr>,
    /// Run without the operator API and dashboard.
    #[arg(long)]
    no_api: bool,
    /// File holding the API bearer token [default: DATA_DIR/api-token, made on first start].
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Most operator API connections at once.
    #[arg(long)]
    api_max_connections: Option<usize>,
    /// Time for an API request's headers, and the longest idle pause on an API connection,
    /// e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    api_header_timeout: Option<Duration>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<LogFormat>,
    /// Relay telemetry to this MQTT broker: mqtt://HOST[:PORT] or mqtts://HOST[:PORT]
    /// (the other [mqtt] settings from the config file, or their defaults) [default:
    /// no bridge].
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// Join a fleet: relay telemetry into the NATS JetStream cluster at these servers
    /// (nats://HOST:PORT, comma-separated; the other [fleet] settings from the config
    /// file, or their defaults) [default: no fleet].
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    fleet: Option<Vec<String>>,
    /// This gateway's id in the fleet [default: gateway].
    #[arg(long, value_name = "ID")]
    fleet_gateway_id: Option<String>,
    /// Log level: error, warn, info, debug, trace, or a filter such as
    /// "info,gateway::session=debug". RUST_LOG wins if set.
    #[arg(long)]
    log_level: Option<String>,
}

impl Overrides {
    fn apply(self, c: &mut Config) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            listen,
            ca,
            cert,
            key,
            data_dir,
            tls13_only,
            refuse_stale_crl,
            listen_backlog,
            max_handshakes,
            max_handshakes_per_source,
            handshake_timeout,
            hello_timeout,
            heartbeat,
            write_timeout,
            max_frame,
            max_pending_records,
            retry_after_s,
            danger_ack_before_fsync,
            max_commit_records,
            command_ttl,
            max_queued_commands,
            api_max_connections,
            api_header_timeout,
            log_format,
            log_level
        );
        if self.max_connections.is_some() {
            c.max_connections = self.max_connections;
        }
        if self.crl.is_some() {
            c.crl = self.crl;
        }
        if self.max_fragment_size.is_some() {
            c.max_fragment_size = self.max_fragment_size;
        }
        if self.retention.is_some() {
            c.retention = self.retention;
        }
        if self.retention_max_rows.is_some() {
            c.retention_max_rows = self.retention_max_rows;
        }
        if self.api_listen.is_some() {
            c.api_listen = self.api_listen;
        }
        if self.no_api {
            c.api_listen = None;
        }
        if self.api_token_file.is_some() {
            c.api_token_file = self.api_token_file;
        }
        if let Some(url) = self.mqtt {
            c.mqtt.get_or_insert_with(Default::default).url = url;
        }
        if let Some(urls) = self.fleet {
            c.fleet.get_or_insert_with(Default::default).urls = urls;
        }
        // Only with a fleet (from --fleet or the file): an id alone turns nothing on.
        if let (Some(id), Some(f)) = (self.fleet_gateway_id, c.fleet.as_mut()) {
            f.gateway_id = id;
        }
    }
}

impl RunArgs {
    fn config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.o.apply(&mut config);
        config.validate()?;
        Ok(config)
    }
}

fn init_logs(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(_) => tracing_subscriber::EnvFilter::try_new(level)
            .with_context(|| format!("log_level {level:?} is not a level or filter"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let matches = with_defaults(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match run_cli(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and its causes, each once: a cause whose message the line before
/// already holds is left out (wrapped errors often repeat their source's message).
fn report(e: &anyhow::Error) {
    let mut lines: Vec<String> = Vec::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if lines.last().is_some_and(|l| l.contains(&m)) {
            continue;
        }
        lines.push(m);
    }
    let mut it = lines.iter();
    if let Some(first) = it.next() {
        eprintln!("error: {first}");
    }
    for l in it {
        eprintln!("  because: {l}");
    }
}

fn run_cli(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::PrintConfig(args) => {
            let config = args.config()?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        #[cfg(feature = "quickstart")]
        Cmd::Quickstart(args) => {
            init_logs_quiet();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(quickstart(args))
        }
        Cmd::Events(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(tail_events(args)),
        Cmd::Backup(args) => backup(args),
        Cmd::Run(args) => {
            let config = args.config()?;
            init_logs(config.log_format, &config.log_level)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run(config))
        }
    }
}

/// Quickstart logs only warnings unless RUST_LOG says otherwise: its own status lines
/// say what happens.
#[cfg(feature = "quickstart")]
fn init_logs_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(feature = "quickstart")]
async fn quickstart(args: QuickstartArgs) -> anyhow::Result<()> {
    use crate::quickstart::{Options, prepare, start_devices};
    let opts = Options {
        dir: args.dir.clone(),
        devices: args.devices,
        rate: args.rate,
    };
    eprintln!(
        "quickstart: certificates for {} devices in {}",
        args.devices,
        args.dir.join("certs").display()
    );
    let progress = |done: usize, total: usize| {
        if total >= 100 && (done.is_multiple_of(500) || done == total) {
            eprintln!("  {done}/{total} device certificates");
        }
    };
    let mut config = prepare(&opts, &progress)?;
    config.listen = args.listen;
    config.api_listen = Some(args.api_listen);
    if let Some(url) = args.mqtt {
        config.mqtt = Some(gateway::config::MqttSettings {
            url,
            ..Default::default()
        });
        config.validate()?;
    }
    let gw = Gateway::start(config).await.with_context(|| {
        format!(
            "starting the gateway (is another one running? ports {} and {} must be free; \
             pick others with --listen and --api-listen)",
            args.listen, args.api_listen
        )
    })?;
    let sim = start_devices(&opts, gw.local_addr()).context("starting the simulated devices")?;
    let monitor = sim.monitor();
    let api = gw.api().context("the API did not start")?;
    let token_file = gw.config().token_path();
    eprintln!(
        "\n  gateway    devices connect to {} (mutual TLS)\n  \
         dashboard  http://{}/#token={}\n  \
         API token  {} (in {})\n  \
         try        curl -H \"Authorization: Bearer $(cat {})\" http://{}/api/v1/devices\n\n\
         {} simulated devices are connecting; Ctrl-C stops everything.\n",
        gw.local_addr(),
        api.addr,
        api.token,
        api.token,
        token_file.display(),
        token_file.display(),
        api.addr,
        args.devices
    );
    let status = {
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = monitor.stats();
                eprintln!(
                    "devices online {}  records sent {}  acked {}",
                    s.connected, s.sent, s.acked
                );
            }
        })
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping: devices finish sending, then the gateway commits and stops");
    status.abort();
    monitor.stop();
    let summary = sim.wait().await;
    gw.shutdown().await;
    if let Ok(s) = summary {
        eprintln!("{} records sent, {} acked and stored", s.sent, s.acked);
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let log_format = config.log_format;
    let gw = match Gateway::start(config.clone()).await {
        Ok(gw) => gw,
        Err(e) => {
            let hint = start_hint(&e, &config);
            return Err(anyhow::Error::new(e).context(format!(
                "the gateway could not start{}",
                hint.map(|h| format!(" ({h})")).unwrap_or_default()
            )));
        }
    };
    if let Some(api) = gw.api() {
        let token_file = gw.config().token_path();
        tracing::info!(
            url = %format!("http://{}/", api.addr),
            token_file = %token_file.display(),
            "dashboard (the token is in the token file)"
        );
        // The secret never goes into the log stream. A person at a terminal who just
        // made it sees it once; everyone else reads the file.
        let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
        if api.token_created && interactive && log_format == LogFormat::Text {
            eprintln!(
                "\nAPI token (made now, stored in {}; not shown again):\n  {}\n\
                 dashboard: http://{}/#token={}\n",
                token_file.display(),
                api.token,
                api.addr,
                api.token
            );
        }
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => match gw.reload_tls() {
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "reload failed; keeping the old TLS material"),
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down");
    gw.shutdown().await;
    Ok(())
}

/// What to do about a start error, when the error alone does not say it.
fn start_hint(e: &gateway::StartError, config: &Config) -> Option<String> {
    use gateway::StartError;
    use gateway::tls::TlsLoadError;
    let dir = |p: &std::path::Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.display().to_string(),
        _ => ".".to_owned(),
    };
    match e {
        StartError::Tls(TlsLoadError::Pem { path, .. }) if !path.exists() => Some(format!(
            "make a CA and the gateway's certificate with: certs init --dir {} \
             --gateway-name NAME; or point --ca, --cert and --key at yours",
            dir(path)
        )),
        StartError::Tls(TlsLoadError::Rustls(_)) => Some(format!(
            "check that {} is the private key of {} (certs init writes the pair as \
             gateway.pem and gateway.key.pem)",
            config.key.display(),
            config.cert.display()
        )),
        _ => None,
    }
}

/// `gateway events`: the WebSocket stream, one JSON object per line on stdout.
async fn tail_events(args: EventsArgs) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| {
            format!(
                "reading the API token from {} (pass --token-file DATA_DIR/api-token)",
                args.token_file.display()
            )
        })?
        .trim()
        .to_owned();
    let filter = gateway::tail::Filter {
        devices: args.device,
        groups: args.group,
        types: args.types,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    gateway::tail::events(&args.api, &token, &filter, args.count, &mut out).await?;
    Ok(())
}

/// `gateway backup`: SQLite online backup of the store.
fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    let from = config.database_path();
    gateway::store::backup_file(&from, &args.to)
        .with_context(|| format!("backing up {} to {}", from.display(), args.to.display()))?;
    eprintln!(
        "backed up {} to {} ({} bytes)",
        from.display(),
        args.to.display(),
        std::fs::metadata(&args.to).map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}

/// Appends each setting's default, as `Config::default()` has it, to the help of its
/// flag in `run` and `print-config`: the defaults are written once, in config.rs.
/// (Settings without a default value say in their help what being unset means.)
fn with_defaults(cmd: clap::Command) -> clap::Command {
    let defaults = match toml::Table::try_from(Config::default()) {
        Ok(t) => t,
        Err(_) => return cmd,
    };
    let add = |sub: clap::Command| {
        let ids: Vec<String> = sub
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        ids.into_iter()
            .fold(sub, |sub, id| match defaults.get(&id) {
                Some(v) if !v.is_table() => sub.mut_arg(&id, |a| {
                    let shown = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    let help = a.get_help().map(ToString::to_string).unwrap_or_default();
                    a.help(format!("{help} [default: {shown}]"))
                }),
                _ => sub,
            })
    };
    cmd.mut_subcommand("run", add)
        .mut_subcommand("print-config", add)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_help(id: &str) -> String {
        let cmd = with_defaults(Cli::command());
        let run = cmd.find_subcommand("run").expect("run");
        let arg = run
            .get_arguments()
            .find(|a| a.get_id() == id)
            .expect("the flag");
        arg.get_help().map(ToString::to_string).unwrap_or_default()
    }

    #[test]
    fn help_shows_the_defaults_of_the_config_once() {
        // The help once said "keep everything" while the default was 30 days.
        assert!(run_help("retention").ends_with("[default: 30days]"));
        assert!(run_help("listen").ends_with("[default: 0.0.0.0:7443]"));
        assert!(run_help("heartbeat").ends_with("[default: 30s]"));
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (key, v) in &defaults {
            if v.is_table() {
                continue;
            }
            let help = run_help(key);
            assert_eq!(
                help.matches("[default:").count(),
                1,
                "--{key}: one default, from the config: {help}"
            );
        }
    }
}
