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
    /// When the CRL is past its next-update date, refuse every device handshake (fail
    /// closed) instead of only warning. Off: a stale CRL is logged and shown by the
    /// `gateway_crl_stale` metric, and its revocations still apply.
    pub refuse_stale_crl: bool,
    /// Largest TLS record the gateway sends, header included (at least 1024), so that
    /// small devices can use a small TLS receive buffer. Unset: 16 KiB records.
    pub max_fragment_size: Option<usize>,

    /// Listen backlog of the device and API listeners: connections the kernel holds
    /// until the gateway accepts them, so that a reconnect burst is not turned away.
    pub listen_backlog: u32,
    /// Most device connections past the TLS handshake at once; more are answered
    /// `Goodbye{Overload}`. Unset: what the open-file limit leaves after the other
    /// budgets (`max_handshakes`, `api_max_connections`, a reserve for the store).
    pub max_connections: Option<usize>,
    /// Most connections in their TLS handshake at once (not yet authenticated), from
    /// all sources together; more are closed at once. A budget of its own, so that
    /// unauthenticated connections never take the room of devices.
    pub max_handshakes: usize,
    /// Most connections in their TLS handshake at once from one source address (an
    /// IPv6 /64 counts as one source); more are closed at once.
    pub max_handshakes_per_source: usize,
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
    /// The highest device protocol version spoken (1 to 3). 1 makes the gateway
    /// behave as a version 1 gateway (no state document), 2 as one without firmware
    /// transfer: for a fleet upgraded in stages, or to test devices against one.
    pub max_protocol_version: u8,

    /// The release public key (`release.pub.pem` or the 65-byte `release.pub.bin` of
    /// `certs release-key`): an uploaded firmware image is taken only with a valid
    /// signature by it. Unset: firmware uploads are refused.
    pub release_key: Option<PathBuf>,
    /// Largest firmware image taken by `POST /api/v1/firmware`, in bytes.
    pub max_firmware_size: u64,

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
    /// Most operator API connections at once (WebSocket streams included); more are
    /// closed at once.
    pub api_max_connections: usize,
    /// Time an API client has to send a request's headers, and the longest pause
    /// allowed between requests on a kept-alive connection and inside a request body.
    #[serde(with = "humantime_serde")]
    pub api_header_timeout: Duration,

    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
    /// The MQTT bridge (docs/MQTT.md): off unless a `[mqtt]` section (or `--mqtt URL`)
    /// names a broker.
    pub mqtt: Option<MqttSettings>,

    /// The fleet (docs/FLEET.md): off unless a `[fleet]` section (or `--fleet URLS`)
    /// names NATS servers.
    pub fleet: Option<FleetSettings>,

    /// Log level or filter: `error`, `warn`, `info`, `debug`, `trace`, or a filter such
    /// as `info,gateway::session=debug`. `RUST_LOG`, if set, wins.
    pub log_level: String,
}

/// The `[mqtt]` section: where and how the bridge relays telemetry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// The broker: `mqtt://HOST[:PORT]` (1883) or `mqtts://HOST[:PORT]` (8883, TLS).
    pub url: String,
    /// MQTT client id (also the persistent session's name at the broker).
    pub client_id: String,
    /// This gateway's name in topics (`{prefix}/gateways/{gateway_id}/status`).
    pub gateway_id: String,
    /// Keep-alive interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// MQTT version: `"5"` or `"3.1.1"` (no properties: no `boot`/`seq` user
    /// properties and no Response Topic; see docs/MQTT.md).
    pub protocol: MqttVersion,
    /// First level of every topic.
    pub topic_prefix: String,
    /// 1: at least once, the cursor moves on the broker's PUBACK; 0: at most once.
    pub qos: u8,
    /// Telemetry payloads: `json`, or `postcard` (the device's bytes unchanged).
    pub payload: PayloadFormat,
    /// CA bundle (PEM) that signs the broker's certificate (`mqtts://`).
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for brokers that want mutual TLS.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Let retention (`retention`, `retention_max_rows`) delete records the bridge has
    /// not delivered yet. Off: while the broker is away the store keeps everything and
    /// grows. On: the store stays bounded, and what it drops undelivered is counted
    /// (`gateway_mqtt_dropped_total`) and logged.
    pub drop_undelivered: bool,
    /// Take command requests from `{prefix}/devices/+/commands/request`. Whoever may
    /// publish there may command devices: the broker's ACLs guard it.
    pub accept_commands: bool,
    /// Announce each device's readings to Home Assistant (MQTT discovery), so they
    /// appear there as sensors. Needs `payload = "json"`.
    pub home_assistant: bool,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "iot-gateway".into(),
            gateway_id: "gateway".into(),
            keep_alive: Duration::from_secs(30),
            protocol: MqttVersion::V5,
            topic_prefix: "iot".into(),
            qos: 1,
            payload: PayloadFormat::Json,
            ca: None,
            cert: None,
            key: None,
            drop_undelivered: false,
            accept_commands: true,
            home_assistant: false,
            discovery_prefix: "homeassistant".into(),
        }
    }
}

/// The `[fleet]` section: the NATS JetStream cluster the gateways of a fleet share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSettings {
    /// NATS servers: `nats://HOST:PORT` (or `tls://`), any of the cluster's nodes.
    pub urls: Vec<String>,
    /// This gateway's name in the fleet (unique per gateway).
    pub gateway_id: String,
    /// The JetStream stream that holds the fleet's telemetry.
    pub stream: String,
    /// The key-value bucket that holds the fleet's device registry.
    pub bucket: String,
    /// The JetStream stream that holds commands waiting for a device online nowhere.
    pub commands_stream: String,
    /// First token of every subject: `{subject_prefix}.telemetry.{device}`.
    pub subject_prefix: String,
    /// Copies of the stream in the cluster (1, 3 or 5).
    pub replicas: usize,
    /// How long the stream remembers a record's id to drop a second copy of it (a
    /// gateway restarted, a device that moved): exactly once within this window.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long the stream keeps records.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// CA bundle (PEM) for `tls://` servers.
    pub ca: Option<PathBuf>,
    /// A NATS credentials file (`.creds`: JWT and NKey seed).
    pub creds: Option<PathBuf>,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".into()],
            gateway_id: "gateway".into(),
            stream: "IOT_TELEMETRY".into(),
            bucket: "IOT_DEVICES".into(),
            commands_stream: "IOT_COMMANDS".into(),
            subject_prefix: "iot".into(),
            replicas: 3,
            duplicate_window: Duration::from_secs(600),
            max_age: Duration::from_secs(7 * 86_400),
            ca: None,
            creds: None,
        }
    }
}

/// The MQTT version the bridge speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MqttVersion {
    /// MQTT 5.
    #[default]
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
}

/// How telemetry payloads are written to MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// A JSON object: device, boot_id, seq, time_ms, received_ms, values.
    #[default]
    Json,
    /// The device's `Telemetry` message, postcard-encoded, as it arrived.
    Postcard,
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
            refuse_stale_crl: false,
            max_fragment_size: None,
            listen_backlog: 1024,
            max_connections: None,
            max_handshakes: 1024,
            max_handshakes_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            max_frame: 4096,
            max_pending_records: 1024,
            retry_after_s: 5,
            max_protocol_version: device_client::proto::PROTOCOL_VERSION,
            release_key: None,
            max_firmware_size: 16 * 1024 * 1024,
            danger_ack_before_fsync: false,
            max_commit_records: 20_000,
            retention: Some(Duration::from_secs(30 * 24 * 3600)),
            retention_max_rows: None,
            command_ttl: Duration::from_secs(3600),
            max_queued_commands: 1000,
            api_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            api_token_file: None,
            api_max_connections: 128,
            api_header_timeout: Duration::from_secs(10),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            mqtt: None,
            fleet: None,
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
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Makes the relative paths of a configuration file relative to the file's
    /// directory (as a reader of the file expects), not to the working directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.ca);
        fix(&mut self.cert);
        fix(&mut self.key);
        fix(&mut self.data_dir);
        if let Some(p) = &mut self.crl {
            fix(p);
        }
        if let Some(p) = &mut self.release_key {
            fix(p);
        }
        if let Some(p) = &mut self.api_token_file {
            fix(p);
        }
        if let Some(m) = &mut self.mqtt {
            for p in [&mut m.ca, &mut m.cert, &mut m.key].into_iter().flatten() {
                fix(p);
            }
        }
        if let Some(f) = &mut self.fleet {
            for p in [&mut f.ca, &mut f.creds].into_iter().flatten() {
                fix(p);
            }
        }
    }

    /// Checks ranges that the types cannot express: a setting that cannot work stops
    /// the gateway at start instead of refusing every device later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use device_client::proto::MIN_MAX_FRAME;
        let invalid = |name, problem: String| Err(ConfigError::Invalid { name, problem });
        // Above the largest valid frame is harmless: such frames fail to decode.
        if self.max_frame < MIN_MAX_FRAME {
            return invalid(
                "max_frame",
                format!(
                    "{} is below the protocol's minimum of {MIN_MAX_FRAME}",
                    self.max_frame
                ),
            );
        }
        use device_client::proto::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&self.max_protocol_version) {
            return invalid(
                "max_protocol_version",
                format!(
                    "{} is outside {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the versions \
                     this gateway speaks",
                    self.max_protocol_version
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
        let at_least_one: [(&'static str, usize); 8] = [
            ("max_connections", self.max_connections.unwrap_or(1)),
            ("max_handshakes", self.max_handshakes),
            ("max_handshakes_per_source", self.max_handshakes_per_source),
            ("max_pending_records", self.max_pending_records),
            ("max_commit_records", self.max_commit_records),
            ("max_queued_commands", self.max_queued_commands),
            ("api_max_connections", self.api_max_connections),
            ("listen_backlog", self.listen_backlog as usize),
        ];
        for (name, value) in at_least_one {
            if value == 0 {
                return invalid(name, "must be at least 1".into());
            }
        }
        if self.max_handshakes_per_source > self.max_handshakes {
            return invalid(
                "max_handshakes_per_source",
                format!(
                    "{} is above max_handshakes ({})",
                    self.max_handshakes_per_source, self.max_handshakes
                ),
            );
        }
        if self.listen_backlog > 65_535 {
            return invalid("listen_backlog", "must be at most 65535".into());
        }
        // Timeouts: zero would refuse every device (or API client), and an hour-long
        // handshake is a door held open for anyone.
        let sec = Duration::from_secs(1);
        let ms = Duration::from_millis(100);
        let timeouts = [
            ("handshake_timeout", self.handshake_timeout, ms, 600 * sec),
            ("hello_timeout", self.hello_timeout, ms, 600 * sec),
            ("write_timeout", self.write_timeout, ms, 600 * sec),
            ("api_header_timeout", self.api_header_timeout, ms, 600 * sec),
            ("heartbeat", self.heartbeat, sec, 3600 * sec),
            ("command_ttl", self.command_ttl, sec, 365 * 86_400 * sec),
        ];
        for (name, value, min, max) in timeouts {
            if value < min || value > max {
                return invalid(
                    name,
                    format!(
                        "{} is outside {}..={}",
                        humantime::format_duration(value),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
            }
        }
        if let Some(r) = self.retention
            && r < Duration::from_secs(60)
        {
            return invalid(
                "retention",
                format!(
                    "{} would delete telemetry as it arrives; use at least 1m, or leave it \
                     unset to keep telemetry by age",
                    humantime::format_duration(r)
                ),
            );
        }
        if self.retention_max_rows == Some(0) {
            return invalid("retention_max_rows", "must be at least 1".into());
        }
        if let Some(m) = &self.mqtt {
            if let Err(problem) = crate::bridge::Broker::parse(&m.url) {
                return invalid("mqtt.url", problem);
            }
            if m.qos > 1 {
                return invalid("mqtt.qos", format!("{} is not 0 or 1", m.qos));
            }
            let bad_level = |s: &str| s.is_empty() || s.contains(['+', '#', '/', '\0']);
            if bad_level(&m.topic_prefix) {
                return invalid(
                    "mqtt.topic_prefix",
                    "must be one topic level: not empty, no '+', '#' or '/'".into(),
                );
            }
            if bad_level(&m.gateway_id) {
                return invalid(
                    "mqtt.gateway_id",
                    "must be one topic level: not empty, no '+', '#' or '/'".into(),
                );
            }
            if m.keep_alive < Duration::from_secs(5) {
                return invalid("mqtt.keep_alive", "must be at least 5s".into());
            }
            if m.cert.is_some() != m.key.is_some() {
                return invalid("mqtt.cert", "mqtt.cert and mqtt.key go together".into());
            }
            if m.home_assistant && m.payload != PayloadFormat::Json {
                return invalid(
                    "mqtt.home_assistant",
                    "Home Assistant reads JSON: set mqtt.payload = \"json\"".into(),
                );
            }
            if m.home_assistant && bad_level(&m.discovery_prefix) {
                return invalid(
                    "mqtt.discovery_prefix",
                    "must be one topic level: not empty, no '+', '#' or '/'".into(),
                );
            }
        }
        if let Some(f) = &self.fleet {
            if f.urls.is_empty() {
                return invalid("fleet.urls", "name at least one NATS server".into());
            }
            let bad_token = |s: &str| {
                s.is_empty()
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            };
            if bad_token(&f.gateway_id) {
                return invalid(
                    "fleet.gateway_id",
                    "letters, digits, '-' and '_' only".into(),
                );
            }
            if bad_token(&f.stream) {
                return invalid("fleet.stream", "letters, digits, '-' and '_' only".into());
            }
            if bad_token(&f.bucket) {
                return invalid("fleet.bucket", "letters, digits, '-' and '_' only".into());
            }
            if bad_token(&f.commands_stream) {
                return invalid(
                    "fleet.commands_stream",
                    "letters, digits, '-' and '_' only".into(),
                );
            }
            if bad_token(&f.subject_prefix) {
                return invalid(
                    "fleet.subject_prefix",
                    "one subject token: letters, digits, '-' and '_' only".into(),
                );
            }
            if ![1, 3, 5].contains(&f.replicas) {
                return invalid("fleet.replicas", format!("{} is not 1, 3 or 5", f.replicas));
            }
            if f.duplicate_window < Duration::from_secs(1) {
                return invalid("fleet.duplicate_window", "must be at least 1s".into());
            }
        }
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
mod tests;
