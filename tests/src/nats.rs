//! A real three-node NATS JetStream cluster on 127.0.0.1, for tests of what only a
//! cluster can show: a node that dies, a meta leader that moves, a node that comes back
//! with its store.
//!
//! Needs Debian's `nats-server` (`apt-get install nats-server`). Without it
//! [`NatsCluster::available`] says so, and the tests skip unless `REQUIRE_NATS` is set
//! (as in CI), which makes its absence a failure.
//!
//! Readiness is read from each node's monitoring endpoint (`/jsz`), not guessed from a
//! sleep: a node is ready once it knows a meta leader of a three-node meta group.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How many nodes the cluster has.
const NODES: usize = 3;

/// Three `nats-server` processes forming one JetStream cluster (`iotc`) on 127.0.0.1,
/// each with its own client, cluster and monitoring port and its own store directory;
/// all of them in one temp dir that also holds their configs and logs.
///
/// Nodes are numbered 0, 1, 2 (their server names are `n1`, `n2`, `n3`). Dropping it
/// kills them all.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// One server: its ports stay the same across restarts, so clients and routes find it
/// again where they left it.
struct Node {
    child: Option<Child>,
    client: u16,
    http: u16,
}

/// `/usr/sbin/nats-server` (Debian's place), else the first `nats-server` on `PATH`.
fn binary() -> Option<PathBuf> {
    let debian = PathBuf::from("/usr/sbin/nats-server");
    if debian.exists() {
        return Some(debian);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// `n` distinct free ports on 127.0.0.1. The listeners are all held until every port
/// is chosen, so that the OS cannot hand out the same port twice.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// `GET /jsz` on 127.0.0.1:`port`, over a fresh connection that the server closes
/// after answering: the body as JSON, or what went wrong (the node may be starting).
fn jsz(port: u16) -> Result<serde_json::Value, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Short timeouts: a node that hangs must not hold the caller past its deadline.
    let timeout = Duration::from_secs(1);
    let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    tcp.write_all(
        format!("GET /jsz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("not 200: {head}"));
    }
    serde_json::from_str(body).map_err(|e| format!("{e}: {body:?}"))
}

/// Whether the node with this monitoring port knows a meta leader of a three-node
/// JetStream meta group; if not, why not.
fn ready(http: u16) -> Result<(), String> {
    let j = jsz(http)?;
    let meta = &j["meta_cluster"];
    let leader = meta["leader"].as_str().unwrap_or_default();
    let size = meta["cluster_size"].as_u64();
    if leader.is_empty() || size != Some(NODES as u64) {
        return Err(format!("not ready: meta_cluster {meta}"));
    }
    Ok(())
}

impl NatsCluster {
    /// Whether `nats-server` is installed. Panics if it is not and `REQUIRE_NATS` is
    /// set; prints that the test is skipped otherwise.
    pub fn available() -> bool {
        let ok = binary().is_some();
        if !ok {
            assert!(
                std::env::var_os("REQUIRE_NATS").is_none(),
                "REQUIRE_NATS is set but nats-server is not installed \
                 (apt-get install nats-server)"
            );
            eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
        }
        ok
    }

    /// Starts the three servers on free ports and waits (at most [`crate::WAIT`]) until
    /// each one knows the meta leader of the three-node cluster and accepts clients.
    pub fn start() -> Self {
        let ports = free_ports(3 * NODES);
        let (client, rest) = ports.split_at(NODES);
        let (cluster, http) = rest.split_at(NODES);
        let dir = tempfile::tempdir().expect("a temp dir");
        let routes: Vec<String> = cluster
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let routes = routes.join(", ");
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(format!("store-{name}"));
            // Routes to every node, itself included: a server recognises and drops the
            // route to itself, and one config shape serves all three. One key a line
            // and commas between routes: the parser wants a newline or comma after a
            // quoted value inside a block and between the items of an array.
            let conf = format!(
                "server_name: {name}\n\
                 listen: 127.0.0.1:{client}\n\
                 http: 127.0.0.1:{http}\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 256MB\n  \
                 max_file_store: 2GB\n}}\n\
                 cluster {{\n  name: iotc\n  listen: 127.0.0.1:{cluster}\n  routes: [ {routes} ]\n}}\n",
                client = client[i],
                http = http[i],
                cluster = cluster[i],
                store = store.display(),
            );
            std::fs::write(dir.path().join(format!("{name}.conf")), conf)
                .expect("writing the nats-server config");
            nodes.push(Node {
                child: None,
                client: client[i],
                http: http[i],
            });
        }
        let mut c = NatsCluster { nodes, dir };
        // All three first, then wait: a meta leader needs a quorum of peers.
        for i in 0..NODES {
            c.spawn(i);
        }
        for i in 0..NODES {
            c.wait_ready(i);
        }
        c
    }

    /// `nats://127.0.0.1:PORT` of each node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client))
            .collect()
    }

    /// Stops node `node` (0, 1 or 2) the way an operator would: SIGTERM through the
    /// `kill` command (the crate does not depend on `libc`), so it shuts down cleanly
    /// and its store stays consistent. If it has not exited after [`crate::WAIT`] it is
    /// killed. Nothing happens if it is already stopped.
    pub fn stop(&mut self, node: usize) {
        let Some(mut child) = self.nodes[node].child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + crate::WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Starts node `node` again (stopping it first if it runs) with the same ports,
    /// config and store, and waits until it knows the meta leader again and accepts
    /// clients.
    pub fn restart(&mut self, node: usize) {
        self.stop(node);
        self.spawn(node);
        self.wait_ready(node);
    }

    /// Everything node `node` has logged, across its restarts.
    pub fn log(&self, node: usize) -> String {
        std::fs::read_to_string(self.log_path(node)).unwrap_or_default()
    }

    fn log_path(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("n{}.log", node + 1))
    }

    fn conf_path(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("n{}.conf", node + 1))
    }

    /// Starts the process of `node`, its log appended to (kept across restarts, so a
    /// failure shows what happened before).
    fn spawn(&mut self, node: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(node))
            .expect("opening the nats-server log");
        let child = Command::new(binary().expect("nats-server is installed"))
            .arg("-c")
            .arg(self.conf_path(node))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting nats-server");
        self.nodes[node].child = Some(child);
    }

    /// Waits until `node` knows a meta leader of three and accepts client connections
    /// (the monitoring port opens before the client port does), polling every 50 ms.
    fn wait_ready(&mut self, node: usize) {
        let deadline = Instant::now() + crate::WAIT;
        let client = SocketAddr::from(([127, 0, 0, 1], self.nodes[node].client));
        loop {
            let state = ready(self.nodes[node].http).and_then(|()| {
                TcpStream::connect_timeout(&client, Duration::from_secs(1))
                    .map(drop)
                    .map_err(|e| format!("client port: {e}"))
            });
            let Err(why) = state else { return };
            if let Some(Ok(Some(status))) = self.nodes[node].child.as_mut().map(Child::try_wait) {
                panic!(
                    "nats-server n{} exited ({status}): {}",
                    node + 1,
                    self.log(node)
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server n{} is not ready ({why}): {}",
                node + 1,
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The directory with the configs, logs and stores.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cluster comes up, and a node that is stopped and restarted rejoins it.
    #[test]
    fn starts_and_rejoins() {
        if !NatsCluster::available() {
            return;
        }
        let t = Instant::now();
        let mut c = NatsCluster::start();
        eprintln!("start() took {:?}", t.elapsed());
        assert_eq!(c.urls().len(), 3);
        for i in 0..NODES {
            ready(c.nodes[i].http).expect("ready after start");
        }
        let t = Instant::now();
        c.stop(1);
        eprintln!("stop() took {:?}", t.elapsed());
        assert!(c.nodes[1].child.is_none());
        assert!(
            jsz(c.nodes[1].http).is_err(),
            "a stopped node still answers"
        );
        let t = Instant::now();
        c.restart(1);
        eprintln!("restart() took {:?}", t.elapsed());
        ready(c.nodes[1].http).expect("ready after restart");
        assert!(c.log(1).contains("Server is ready"), "{}", c.log(1));
    }
}
