//! The settings' tests: the example file against the defaults, relative paths, checks.

use super::*;

#[test]
fn example_file_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.example.toml");
    // Parsed as text: `from_file` would make its paths relative to the repository.
    let from_file: Config = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // The example names a CRL; the default has none.
    let expected = Config {
        crl: Some(PathBuf::from("certs/crl.pem")),
        ..Config::default()
    };
    assert_eq!(from_file, expected);
    expected.validate().unwrap();
}

/// The example file's commented-out section from the line `start` to the line
/// `end` (or the end), uncommented and parsed.
fn example_section(start: &str, end: &str) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let from = text.find(start).unwrap();
    let to = if end.is_empty() {
        text.len()
    } else {
        text.find(end).unwrap()
    };
    let uncommented: String = text[from..to]
        .lines()
        .filter(|l| l.starts_with("# ") && !l.starts_with("#  "))
        .map(|l| format!("{}\n", &l[2..]))
        .collect();
    toml::from_str(&uncommented).unwrap()
}

/// The `[mqtt]` section is commented out in the example; uncommented, it is the
/// defaults (plus the TLS files it names as examples).
#[test]
fn example_mqtt_section_matches_the_defaults() {
    let from_file = example_section("# [mqtt]", "# --- Fleet");
    let expected = MqttSettings {
        ca: Some(PathBuf::from("certs/broker-ca.pem")),
        cert: Some(PathBuf::from("certs/bridge.pem")),
        key: Some(PathBuf::from("certs/bridge.key.pem")),
        ..MqttSettings::default()
    };
    assert_eq!(from_file.mqtt, Some(expected));
}

/// The same for the `[fleet]` section.
#[test]
fn example_fleet_section_matches_the_defaults() {
    let from_file = example_section("# [fleet]", "");
    let expected = FleetSettings {
        ca: Some(PathBuf::from("certs/nats-ca.pem")),
        creds: Some(PathBuf::from("certs/gateway.creds")),
        ..FleetSettings::default()
    };
    assert_eq!(from_file.fleet, Some(expected));
}

#[test]
fn relative_paths_in_a_file_are_relative_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "ca = \"pki/ca.pem\"\ncrl = \"pki/crl.pem\"\ndata_dir = \"/var/lib/gw\"\n",
    )
    .unwrap();
    let c = Config::from_file(&file).unwrap();
    assert_eq!(c.ca, dir.path().join("pki/ca.pem"));
    assert_eq!(c.crl, Some(dir.path().join("pki/crl.pem")));
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/gw"));
    // Defaults the file does not set are relative to it too.
    assert_eq!(c.cert, dir.path().join("certs/gateway.pem"));
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
fn settings_that_cannot_work_are_refused_by_name() {
    let zero = Duration::ZERO;
    let cases: Vec<(&str, Config)> = vec![
        (
            "handshake_timeout",
            Config {
                handshake_timeout: zero,
                ..Config::default()
            },
        ),
        (
            "hello_timeout",
            Config {
                hello_timeout: zero,
                ..Config::default()
            },
        ),
        (
            "write_timeout",
            Config {
                write_timeout: zero,
                ..Config::default()
            },
        ),
        (
            "api_header_timeout",
            Config {
                api_header_timeout: zero,
                ..Config::default()
            },
        ),
        (
            "heartbeat",
            Config {
                heartbeat: zero,
                ..Config::default()
            },
        ),
        (
            "command_ttl",
            Config {
                command_ttl: zero,
                ..Config::default()
            },
        ),
        (
            "retention",
            Config {
                retention: Some(zero),
                ..Config::default()
            },
        ),
        (
            "retention_max_rows",
            Config {
                retention_max_rows: Some(0),
                ..Config::default()
            },
        ),
        (
            "mqtt.home_assistant",
            Config {
                mqtt: Some(MqttSettings {
                    home_assistant: true,
                    payload: PayloadFormat::Postcard,
                    ..MqttSettings::default()
                }),
                ..Config::default()
            },
        ),
        (
            "max_connections",
            Config {
                max_connections: Some(0),
                ..Config::default()
            },
        ),
        (
            "max_handshakes",
            Config {
                max_handshakes: 0,
                ..Config::default()
            },
        ),
        (
            "max_handshakes_per_source",
            Config {
                max_handshakes: 10,
                max_handshakes_per_source: 11,
                ..Config::default()
            },
        ),
        (
            "max_pending_records",
            Config {
                max_pending_records: 0,
                ..Config::default()
            },
        ),
        (
            "max_commit_records",
            Config {
                max_commit_records: 0,
                ..Config::default()
            },
        ),
        (
            "max_queued_commands",
            Config {
                max_queued_commands: 0,
                ..Config::default()
            },
        ),
        (
            "api_max_connections",
            Config {
                api_max_connections: 0,
                ..Config::default()
            },
        ),
        (
            "listen_backlog",
            Config {
                listen_backlog: 0,
                ..Config::default()
            },
        ),
        (
            "max_frame",
            Config {
                max_frame: 127,
                ..Config::default()
            },
        ),
    ];
    for (name, cfg) in cases {
        match cfg.validate() {
            Err(ConfigError::Invalid { name: n, problem }) => {
                assert_eq!(n, name, "{problem}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn durations_read_as_human_text() {
    let cfg: Config = toml::from_str("heartbeat = \"15s\"\nretention = \"7days\"").unwrap();
    assert_eq!(cfg.heartbeat, Duration::from_secs(15));
    assert_eq!(cfg.retention, Some(Duration::from_secs(7 * 86400)));
}
