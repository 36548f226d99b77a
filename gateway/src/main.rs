//! `gateway`: the command line. Everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use gateway::{Config, Gateway, LogFormat};

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
    /// Example: gateway run --ca certs/ca.pem --cert certs/gateway.pem \
    ///   --key certs/gateway.key.pem --crl certs/crl.pem
    Run(RunArgs),
    /// Print the effective settings as TOML (defaults, file and flags merged).
    PrintConfig(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// TOML configuration file (see gateway.example.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    o: Overrides,
}

/// One flag per setting; each overrides the file. See gateway.example.toml.
#[derive(Args)]
struct Overrides {
    /// Device listener address [default: 0.0.0.0:7443].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// CA bundle (PEM) that issues device certificates [default: certs/ca.pem].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Gateway certificate chain (PEM) [default: certs/gateway.pem].
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Gateway private key (PEM) [default: certs/gateway.key.pem].
    #[arg(long)]
    key: Option<PathBuf>,
    /// CRL (PEM); revoked devices are refused.
    #[arg(long)]
    crl: Option<PathBuf>,
    /// Directory of the SQLite store [default: data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Refuse TLS 1.2.
    #[arg(long)]
    tls13_only: Option<bool>,
    /// Largest TLS record sent, header included (>= 1024), for small devices.
    #[arg(long)]
    max_fragment_size: Option<usize>,
    /// Most device connections at once [default: 19000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// TLS handshake timeout, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    handshake_timeout: Option<Duration>,
    /// Time allowed for Hello after the handshake, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    hello_timeout: Option<Duration>,
    /// Heartbeat interval sent to devices, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
    /// Time allowed for one write to a device, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    write_timeout: Option<Duration>,
    /// Largest frame accepted from a device, header included [default: 4096].
    #[arg(long)]
    max_frame: Option<u16>,
    /// Records a session may hold waiting for a commit [default: 1024].
    #[arg(long)]
    max_pending_records: Option<usize>,
    /// Seconds devices are asked to wait after Goodbye{Overload|Shutdown}.
    #[arg(long)]
    retry_after_s: Option<u16>,
    /// Ack before fsync: a power loss may lose telemetry devices saw acked.
    #[arg(long)]
    danger_ack_before_fsync: Option<bool>,
    /// Records in one group commit, at most [default: 20000].
    #[arg(long)]
    max_commit_records: Option<usize>,
    /// Delete telemetry older than this, e.g. 30days.
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Keep at most this many telemetry rows.
    #[arg(long)]
    retention_max_rows: Option<u64>,
    /// Time to live of commands without one, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    command_ttl: Option<Duration>,
    /// Commands queued per device, at most [default: 1000].
    #[arg(long)]
    max_queued_commands: Option<usize>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<LogFormat>,
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
            max_connections,
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
            log_format
        );
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

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::PrintConfig(args) => {
            let config = args.config()?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Cmd::Run(args) => {
            let config = args.config()?;
            init_logs(config.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(run(config))
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let hint = format!(
        "make certificates with: certs init --dir {}",
        config
            .ca
            .parent()
            .map_or(".".into(), |p| p.display().to_string())
    );
    let gw = Gateway::start(config)
        .await
        .with_context(|| format!("the gateway could not start ({hint})"))?;
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
