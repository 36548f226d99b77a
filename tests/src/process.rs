//! The gateway as a child process, for what only a process can show: SIGKILL, SIGHUP,
//! SIGTERM, its log output.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A running `gateway run` process whose stderr is collected.
pub struct GatewayProcess {
    child: Child,
    /// Collected log output.
    pub logs: Arc<Mutex<String>>,
    written: Arc<Notify>,
}

impl GatewayProcess {
    /// Starts `BIN run ARGS...` and waits until it listens; returns it with the device
    /// listener address. `bin` is the gateway's command line: integration tests of this
    /// package pass `env!("CARGO_BIN_EXE_e2e-gateway")`, which is `gateway/src/main.rs`
    /// built here, so cargo rebuilds it whenever the gateway changes.
    pub async fn start(bin: &Path, args: &[String]) -> (Self, SocketAddr) {
        Self::start_under(&[], bin, args).await
    }

    /// Like [`start`](Self::start), but run through `prefix` (a program and its
    /// arguments that then runs the gateway, e.g. `prlimit --nofile=256 --`).
    pub async fn start_under(prefix: &[&str], bin: &Path, args: &[String]) -> (Self, SocketAddr) {
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the gateway");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let written = Arc::new(Notify::new());
        {
            let logs = logs.clone();
            let written = written.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut l = logs.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                    drop(l);
                    written.notify_waiters();
                }
            });
        }
        let p = GatewayProcess {
            child,
            logs,
            written,
        };
        let line = p.wait_for(&["gateway listening for devices"]).await;
        let addr = field(&line, "local_addr").unwrap_or_else(|| panic!("no address in {line:?}"));
        (p, addr)
    }

    /// Waits for a log line containing all of `parts`.
    pub async fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + crate::WAIT;
        loop {
            let written = self.written.notified();
            let text = self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(l) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_owned();
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                panic!("no log line with {parts:?}; logs:\n{text}");
            }
        }
    }

    /// The operator API's address, from its log line.
    pub async fn api_addr(&self) -> SocketAddr {
        let line = self
            .wait_for(&["operator API and dashboard listening"])
            .await;
        field(&line, "addr").unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; returns whether it exited with status 0.
    pub async fn wait_exit(mut self) -> bool {
        let deadline = tokio::time::Instant::now() + crate::WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the gateway") {
                return status.success();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway did not exit"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// A field of a log line, text (`name=value`) or JSON (`"name":"value"`).
fn field<T: std::str::FromStr>(line: &str, name: &str) -> Option<T> {
    let text = line
        .split(&format!(" {name}="))
        .nth(1)
        .and_then(|s| s.split_whitespace().next());
    let json = line
        .split(&format!("\"{name}\":\""))
        .nth(1)
        .and_then(|s| s.split('"').next());
    text.or(json)?.parse().ok()
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
