//! `gateway`: the command line. Everything else is in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches};
use gateway::{Config, Gateway, LogFormat};

// A module of the binary, not the library: only it needs the simulator and the PKI tool.
mod cli;
#[cfg(feature = "quickstart")]
mod quickstart;
mod tail;

use cli::*;

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
                    s.connected, s.counts.sent, s.counts.acked
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
        eprintln!(
            "{} records sent, {} acked and stored",
            s.counts.sent, s.counts.acked
        );
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
    use gateway::TlsLoadError;
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
    let filter = tail::Filter {
        devices: args.device,
        groups: args.group,
        types: args.types,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    tail::events(&args.api, &token, &filter, args.count, &mut out).await?;
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
    gateway::backup_file(&from, &args.to)
        .with_context(|| format!("backing up {} to {}", from.display(), args.to.display()))?;
    eprintln!(
        "backed up {} to {} ({} bytes)",
        from.display(),
        args.to.display(),
        std::fs::metadata(&args.to).map(|m| m.len()).unwrap_or(0)
    );
    Ok(())
}
