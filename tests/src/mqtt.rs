//! A real Mosquitto broker for the bridge's tests, and `mosquitto_sub` as the
//! independent subscriber (a client that shares no code with the bridge).
//!
//! Needs Debian's `mosquitto` and `mosquitto-clients` (`.ci/run` installs them). Without
//! them [`Mosquitto::available`] says so, and the tests skip unless `REQUIRE_MOSQUITTO`
//! is set (as in CI), which makes their absence a failure.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A `mosquitto` process on 127.0.0.1, with persistence in its own directory so that a
/// subscriber's persistent session survives a restart.
pub struct Mosquitto {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    /// Extra lines for its listener (TLS files).
    listener: String,
}

fn binary() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Mosquitto {
    /// Whether `mosquitto` and `mosquitto_sub` are installed. Panics if they are not
    /// and `REQUIRE_MOSQUITTO` is set; prints that the test is skipped otherwise.
    pub fn available() -> bool {
        let sub = Command::new("mosquitto_sub")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        let ok = binary().is_some() && sub;
        if !ok {
            assert!(
                std::env::var_os("REQUIRE_MOSQUITTO").is_none(),
                "REQUIRE_MOSQUITTO is set but mosquitto is not installed \
                 (apt-get install mosquitto mosquitto-clients)"
            );
            eprintln!(
                "SKIPPED: mosquitto is not installed (apt-get install mosquitto mosquitto-clients)"
            );
        }
        ok
    }

    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with(String::new())
    }

    /// A broker that speaks only TLS, with this certificate chain and key (PEM files).
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        Self::start_with(format!(
            "certfile {}\nkeyfile {}\n",
            cert.display(),
            key.display()
        ))
    }

    fn start_with(listener: String) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut m = Mosquitto {
            child: None,
            port,
            dir: tempfile::tempdir().expect("a temp dir"),
            listener,
        };
        m.restart();
        m
    }

    /// Starts it again (same port, same persistence) after [`stop`](Self::stop).
    pub fn restart(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        // Started as root, mosquitto drops to the user `mosquitto`, which cannot write
        // the persistence file into this (0700) directory: stay root then.
        let root = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
        };
        let user = if root { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\n{}allow_anonymous true\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\nmax_queued_messages 0\n\
                 log_dest stderr\nlog_type all\n{user}",
                self.port,
                self.listener,
                self.dir.path().display()
            ),
        )
        .expect("writing mosquitto.conf");
        let child = Command::new(binary().expect("mosquitto is installed"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("log"))
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + crate::WAIT;
        while TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGTERM: it saves its persistent sessions) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `mosquitto_sub` subscribed at QoS 1 with a persistent session (`-c -i ID`),
/// collecting `topic payload` lines as they arrive, until dropped.
pub struct Subscriber {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Subscriber {
    /// Subscribes `id` to `topic` and waits until the broker has the subscription.
    pub fn start(broker: &Mosquitto, id: &str, topic: &str) -> Self {
        Self::start_with(broker, id, topic, &["-v"])
    }

    /// The same over MQTT 5, each line `topic|correlation data|payload`.
    pub fn start_v5(broker: &Mosquitto, id: &str, topic: &str) -> Self {
        Self::start_with(broker, id, topic, &["-V", "mqttv5", "-F", "%t|%D|%p"])
    }

    fn start_with(broker: &Mosquitto, id: &str, topic: &str, output: &[&str]) -> Self {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args(["-i", id, "-c", "-q", "1", "-t", topic])
            .args(output)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto_sub");
        let stdout = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let deadline = Instant::now() + crate::WAIT;
        while !broker
            .log()
            .contains(&format!("Received SUBSCRIBE from {id}"))
        {
            assert!(
                Instant::now() < deadline,
                "{id} did not subscribe: {}",
                broker.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, lines }
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Publishes one message with `mosquitto_pub` over MQTT 5 at QoS 1; `properties` are
/// `(name, value)` pairs for `-D publish NAME VALUE` (`response-topic`,
/// `correlation-data` ...).
pub fn publish(broker: &Mosquitto, topic: &str, payload: &str, properties: &[(&str, &str)]) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-t", topic, "-m", payload]);
    for (name, value) in properties {
        cmd.args(["-D", "publish", name, value]);
    }
    let out = cmd.output().expect("running mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
