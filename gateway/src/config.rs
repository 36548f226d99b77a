//! Gateway settings: defaults, a TOML file, and command-line flags, in rising order of
//! precedence. `gateway.example.toml` at the repository root documents every setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every setting of the gateway. Field names are the TOML keys and, with `-` for `_`,
/// the command-line flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Device listener address.
    pub listen: SocketAddr,
    /// PEM bundle of the CA that issues device certificates.
    pub ca: PathBuf,
    /// PEM certificate (chain) of the gateway.
    pub cert: PathBuf,
    /// PEM private key of the gateway certificate.
    pub key: PathBuf,
    /// PEM CRL; revoked device certificates are refused. Optional.
    pub crl: Option<PathBuf>,
    /// Directory for the SQLite store.
    pub data_dir: PathBuf,

    /// Refuse TLS 1.2.
    pub tls13_only: bool,
    /// Largest TLS record the gateway sends, header included (at least 1024), so that
    /// small devices can use a small TLS receive buffer. Unset: 16 KiB records.
    pub max_fragment_size: Option<usize>,

    /// Most device connections at once; more are answered `Goodbye{Overload}`.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time allowed between the handshake and a complete `Hello`.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Heartbeat interval announced in `Welcome`; a session silent for 3 intervals is
    /// closed.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Time allowed for one write to a device before its session is closed.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Largest frame accepted from a device, header included (`Welcome.max_frame`).
    pub max_frame: u16,
    /// Most telemetry records a session holds waiting for a commit; when reached, the
    /// gateway stops reading from that device until the commit is done.
    pub max_pending_records: usize,
    /// Seconds a device is asked to wait before reconnecting after `Goodbye` for
    /// overload or shutdown.
    pub retry_after_s: u16,

    /// Acknowledge telemetry once committed to SQLite's write-ahead log without waiting
    /// for the disk (`synchronous=NORMAL`). Survives a crash of the gateway, but a power
    /// loss may lose the last commits, which devices were already told are durable.
    pub danger_ack_before_fsync: bool,
    /// Most records in one group commit.
    pub max_commit_records: usize,
    /// Delete telemetry older than this. Unset: keep by age.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Keep at most this many telemetry rows (oldest deleted first). Unset: no cap.
    pub retention_max_rows: Option<u64>,

    /// Time to live of a command when the caller gives none.
    #[serde(with = "humantime_serde")]
    pub command_ttl: Duration,
    /// Most commands a device may have queued; more are refused.
    pub max_queued_commands: usize,

    /// Operator API and dashboard listener; unset: no API.
    pub api_listen: Option<SocketAddr>,
    /// File holding the API bearer token; created with a random token on first start
    /// if missing. Unset: `DATA_DIR/api-token`.
    pub api_token_file: Option<PathBuf>,

    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: use text or json")),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            ca: PathBuf::from("certs/ca.pem"),
            cert: PathBuf::from("certs/gateway.pem"),
            key: PathBuf::from("certs/gateway.key.pem"),
            crl: None,
            data_dir: PathBuf::from("data"),
            tls13_only: false,
            max_fragment_size: None,
            max_connections: 19_000,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            max_frame: 4096,
            max_pending_records: 1024,
            retry_after_s: 5,
            danger_ack_before_fsync: false,
            max_commit_records: 20_000,
            retention: Some(Duration::from_secs(30 * 24 * 3600)),
            retention_max_rows: None,
            command_ttl: Duration::from_secs(3600),
            max_queued_commands: 1000,
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            api_token_file: None,
            log_format: LogFormat::Text,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("setting {name}: {problem}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// What is wrong and what would work.
        problem: String,
    },
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Checks ranges that the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use device_client::proto::{MAX_UPLINK_FRAME, MIN_MAX_FRAME};
        let invalid = |name, problem: String| Err(ConfigError::Invalid { name, problem });
        if self.max_frame < MIN_MAX_FRAME {
            return invalid(
                "max_frame",
                format!(
                    "{} is below the protocol's minimum of {MIN_MAX_FRAME}",
                    self.max_frame
                ),
            );
        }
        if let Some(f) = self.max_fragment_size
            && !(1024..=16_389).contains(&f)
        {
            return invalid(
                "max_fragment_size",
                format!(
                    "{f} is outside 1024..=16389; the gateway's first TLS flight must fit \
                     one record (PROTOCOL.md §6.2)"
                ),
            );
        }
        if self.max_connections == 0 {
            return invalid("max_connections", "must be at least 1".into());
        }
        if self.heartbeat < Duration::from_secs(1) || self.heartbeat.as_secs() > 3600 {
            return invalid("heartbeat", "must be between 1s and 1h".into());
        }
        if self.max_pending_records == 0 || self.max_commit_records == 0 {
            return invalid("max_pending_records", "limits must be at least 1".into());
        }
        if self.command_ttl.is_zero() {
            return invalid("command_ttl", "must be positive".into());
        }
        // Not an error: a smaller max_frame only refuses the largest valid records.
        let _ = MAX_UPLINK_FRAME;
        Ok(())
    }

    /// The API token file (`api_token_file`, or `DATA_DIR/api-token`).
    pub fn token_path(&self) -> PathBuf {
        self.api_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("api-token"))
    }

    /// The SQLite file inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("gateway.sqlite")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.example.toml");
        let from_file = Config::from_file(&path).unwrap();
        // The example names a CRL; the default has none.
        let expected = Config {
            crl: Some(PathBuf::from("certs/crl.pem")),
            ..Config::default()
        };
        assert_eq!(from_file, expected);
        expected.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = toml::from_str::<Config>("listne = \"0.0.0.0:1\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        let cfg = Config {
            max_frame: 100,
            ..Config::default()
        };
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                name: "max_frame",
                ..
            })
        ));
        let cfg = Config {
            max_fragment_size: Some(512),
            ..Config::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn durations_read_as_human_text() {
        let cfg: Config = toml::from_str("heartbeat = \"15s\"\nretention = \"7days\"").unwrap();
        assert_eq!(cfg.heartbeat, Duration::from_secs(15));
        assert_eq!(cfg.retention, Some(Duration::from_secs(7 * 86400)));
    }
}
