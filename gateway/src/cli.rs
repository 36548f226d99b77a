//! The command line's arguments (a module of the `gateway` binary): subcommands, one
//! flag per setting, and the defaults shown in `--help`, taken from `Config::default()`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gateway::{Config, LogFormat};

/// IoT device gateway: devices connect with mutual TLS, their telemetry is stored
/// durably and acknowledged, and commands are relayed to them.
#[derive(Parser)]
#[command(version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
pub(crate) struct QuickstartArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 25)]
    pub(crate) devices: usize,
    /// Telemetry records per device per second.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) rate: f64,
    /// Directory for the certificates and the data.
    #[arg(long, default_value = "quickstart")]
    pub(crate) dir: PathBuf,
    /// Device listener.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub(crate) listen: SocketAddr,
    /// Dashboard and API listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) api_listen: SocketAddr,
    /// Relay telemetry to this MQTT broker (mqtt://HOST[:PORT]) [default: no bridge].
    #[arg(long, value_name = "URL")]
    pub(crate) mqtt: Option<String>,
}

#[derive(Args)]
pub(crate) struct EventsArgs {
    /// The gateway's API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) api: String,
    /// File holding the API token (the gateway's DATA_DIR/api-token).
    #[arg(long, default_value = "data/api-token")]
    pub(crate) token_file: PathBuf,
    /// Only events of this device (repeatable).
    #[arg(long)]
    pub(crate) device: Vec<String>,
    /// Only events of the devices of this group (repeatable).
    #[arg(long)]
    pub(crate) group: Vec<String>,
    /// Only events of this type: telemetry, presence, command, handshake_refused,
    /// desired, reported
    /// (repeatable).
    #[arg(long = "type")]
    pub(crate) types: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub(crate) count: Option<u64>,
}

#[derive(Args)]
pub(crate) struct BackupArgs {
    /// The new file (must not exist).
    #[arg(long)]
    pub(crate) to: PathBuf,
    /// The gateway's configuration file, to find its data directory.
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    /// The gateway's data directory [default: data, or the config file's].
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// TOML configuration file (see gateway.example.toml).
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) o: Overrides,
}

/// One flag per setting; each overrides the file. See gateway.example.toml. The
/// defaults shown in `--help` come from `Config::default()` ([`with_defaults`]).
#[derive(Args)]
pub(crate) struct Overrides {
    /// Device listener address.
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// CA bundle (PEM) that issues device certificates.
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Gateway certificate chain (PEM).
    #[arg(long)]
    pub(crate) cert: Option<PathBuf>,
    /// Gateway private key (PEM).
    #[arg(long)]
    pub(crate) key: Option<PathBuf>,
    /// CRL (PEM); revoked devices are refused [default: none].
    #[arg(long)]
    pub(crate) crl: Option<PathBuf>,
    /// Directory of the SQLite store.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Refuse TLS 1.2.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    tls13_only: Option<bool>,
    /// Refuse every device while the CRL is past its next-update date (false: warn only).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub(crate) refuse_stale_crl: Option<bool>,
    /// Largest TLS record sent, header included (>= 1024), for small devices [default:
    /// 16 KiB, TLS's own].
    #[arg(long)]
    pub(crate) max_fragment_size: Option<usize>,
    /// Listen backlog of the device and API listeners.
    #[arg(long)]
    pub(crate) listen_backlog: Option<u32>,
    /// Most device connections past the TLS handshake at once [default: what the
    /// open-file limit leaves after the other budgets].
    #[arg(long)]
    pub(crate) max_connections: Option<usize>,
    /// Most connections in their TLS handshake at once.
    #[arg(long)]
    pub(crate) max_handshakes: Option<usize>,
    /// Most connections in their TLS handshake at once from one address (IPv6: one /64).
    #[arg(long)]
    pub(crate) max_handshakes_per_source: Option<usize>,
    /// TLS handshake timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) handshake_timeout: Option<Duration>,
    /// Time allowed for Hello after the handshake.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) hello_timeout: Option<Duration>,
    /// Heartbeat interval sent to devices.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) heartbeat: Option<Duration>,
    /// Time allowed for one write to a device.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) write_timeout: Option<Duration>,
    /// Largest frame accepted from a device, header included.
    #[arg(long)]
    pub(crate) max_frame: Option<u16>,
    /// Records a session may hold waiting for a commit.
    #[arg(long)]
    pub(crate) max_pending_records: Option<usize>,
    /// Seconds devices are asked to wait after Goodbye{Overload|Shutdown}.
    #[arg(long)]
    pub(crate) retry_after_s: Option<u16>,
    /// Highest device protocol version spoken (1: behave as a version 1 gateway; 2: no
    /// firmware transfer).
    #[arg(long)]
    pub(crate) max_protocol_version: Option<u8>,
    /// Release public key (release.pub.pem or .bin from `certs release-key`): firmware
    /// uploads must be signed by it [default: none, uploads refused].
    #[arg(long)]
    pub(crate) release_key: Option<PathBuf>,
    /// Largest firmware image taken by the API, in bytes.
    #[arg(long)]
    pub(crate) max_firmware_size: Option<u64>,
    /// Ack before fsync: a power loss may lose telemetry devices saw acked.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub(crate) danger_ack_before_fsync: Option<bool>,
    /// Records in one group commit, at most.
    #[arg(long)]
    pub(crate) max_commit_records: Option<usize>,
    /// Delete telemetry older than this, e.g. 30days.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) retention: Option<Duration>,
    /// Keep at most this many telemetry rows [default: no limit].
    #[arg(long)]
    pub(crate) retention_max_rows: Option<u64>,
    /// Time to live of commands without one.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) command_ttl: Option<Duration>,
    /// Commands queued per device, at most.
    #[arg(long)]
    pub(crate) max_queued_commands: Option<usize>,
    /// Operator API and dashboard address.
    #[arg(long, conflicts_with = "no_api")]
    pub(crate) api_listen: Option<SocketAddr>,
    /// Run without the operator API and dashboard.
    #[arg(long)]
    pub(crate) no_api: bool,
    /// File holding the API bearer token [default: DATA_DIR/api-token, made on first start].
    #[arg(long)]
    pub(crate) api_token_file: Option<PathBuf>,
    /// Most operator API connections at once.
    #[arg(long)]
    pub(crate) api_max_connections: Option<usize>,
    /// Time for an API request's headers, and the longest idle pause on an API connection,
    /// e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) api_header_timeout: Option<Duration>,
    /// Log format: text or json.
    #[arg(long)]
    pub(crate) log_format: Option<LogFormat>,
    /// Relay telemetry to this MQTT broker: mqtt://HOST[:PORT] or mqtts://HOST[:PORT]
    /// (the other [mqtt] settings from the config file, or their defaults) [default:
    /// no bridge].
    #[arg(long, value_name = "URL")]
    pub(crate) mqtt: Option<String>,
    /// Join a fleet: relay telemetry into the NATS JetStream cluster at these servers
    /// (nats://HOST:PORT, comma-separated; the other [fleet] settings from the config
    /// file, or their defaults) [default: no fleet].
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub(crate) fleet: Option<Vec<String>>,
    /// This gateway's id in the fleet [default: gateway].
    #[arg(long, value_name = "ID")]
    pub(crate) fleet_gateway_id: Option<String>,
    /// Log level: error, warn, info, debug, trace, or a filter such as
    /// "info,gateway::session=debug". RUST_LOG wins if set.
    #[arg(long)]
    pub(crate) log_level: Option<String>,
}

impl Overrides {
    pub(crate) fn apply(self, c: &mut Config) {
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
            max_protocol_version,
            max_firmware_size,
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
        if self.release_key.is_some() {
            c.release_key = self.release_key;
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
    pub(crate) fn config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.o.apply(&mut config);
        config.validate()?;
        Ok(config)
    }
}

/// Appends each setting's default, as `Config::default()` has it, to the help of its
/// flag in `run` and `print-config`: the defaults are written once, in config.rs.
/// (Settings without a default value say in their help what being unset means.)
pub(crate) fn with_defaults(cmd: clap::Command) -> clap::Command {
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
    use clap::CommandFactory;

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
