//! The device listener: accept, connection cap, TLS handshake, then a session task.
//!
//! Shaped like mini-redis: one accept loop, a task per connection holding a semaphore
//! permit, a shutdown signal every task watches, and a tracing span per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use device_client::proto::{Downlink, Goodbye, GoodbyeReason, MIN_MAX_FRAME};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, info_span, warn};

use crate::Shared;
use crate::events::Refused;
use crate::store::now_ms;
use crate::tls::{self, Refusal};

/// Connections over the cap that still get a `Goodbye{Overload}` (the rest are dropped
/// at once): enough to tell a burst of devices to back off, small enough to bound the
/// handshake work overload can cause.
const OVERLOAD_REPLIES: usize = 64;

/// Accepts connections until `shutdown` turns true, then waits for every session to
/// say goodbye and end.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(shared.config.max_connections));
    let overload = Arc::new(Semaphore::new(OVERLOAD_REPLIES));
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            a = listener.accept() => a,
            // Reap finished tasks so the set does not grow without bound.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: log, pause briefly, go on.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!("conn", %peer, device = tracing::field::Empty);
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let shared = shared.clone();
                tasks.spawn(
                    async move {
                        connection(shared, tcp, peer).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(_) => {
                shared
                    .metrics
                    .overload_refusals
                    .fetch_add(1, Ordering::Relaxed);
                if let Ok(permit) = overload.clone().try_acquire_owned() {
                    let shared = shared.clone();
                    tasks.spawn(
                        async move {
                            refuse_overloaded(shared, tcp).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
            }
        }
    }
    drop(listener);
    info!(
        sessions = shared.registry.len(),
        "shutting down: saying goodbye to devices"
    );
    // The flag first, then close_all: a session registering meanwhile sees one or the
    // other (session::open_session).
    shared.shutting_down.send_replace(true);
    shared.registry.close_all(GoodbyeReason::Shutdown);
    // Sessions say goodbye and commit what they received; connections still in their
    // handshake or before `Hello` have nothing to lose and are dropped.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !shared.registry.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                warn!(left = shared.registry.len(), "sessions did not end in 30 s");
                break;
            }
        }
    }
    tasks.shutdown().await;
}

/// TLS handshake, identity, then the session.
async fn connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    // Boxed so that its state (a whole TLS acceptor) is freed once the handshake is
    // done instead of staying in the connection's future for its whole life.
    let Some((stream, identity)) = Box::pin(handshake(&shared, tcp, peer)).await else {
        return;
    };
    tracing::Span::current().record("device", tracing::field::display(&identity.device));
    info!(serial = %identity.serial_hex(), "device connected");
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    crate::session::run(shared.clone(), stream, identity, peer).await;
    shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
}

async fn handshake(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(
    Box<tokio_rustls::server::TlsStream<TcpStream>>,
    tls::PeerIdentity,
)> {
    let material = shared.tls.current();
    let acceptor = TlsAcceptor::from(material.config.clone());
    let refused = |reason: Refusal, detail: String| {
        shared.metrics.refused(reason);
        warn!(%reason, %detail, "handshake refused");
        shared.refused(Refused {
            peer: peer.to_string(),
            reason: reason.as_str(),
            time_ms: now_ms(),
        });
    };
    let stream = match timeout(shared.config.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refused(Refusal::from_handshake_error(&e), e.to_string());
            return None;
        }
        Err(_) => {
            refused(Refusal::Timeout, "no handshake within the timeout".into());
            return None;
        }
    };
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned();
    let Some(cert) = cert else {
        refused(Refusal::NoClientCert, "no client certificate".into());
        return None;
    };
    // Checked against the material current *now*: a reload may have revoked the
    // certificate during the handshake.
    match tls::identify(&cert, &shared.tls.current().revoked) {
        Ok(id) => {
            shared.metrics.handshakes_ok.fetch_add(1, Ordering::Relaxed);
            // Boxed once here: moved by value, the TLS state (over 1 KB) would take a
            // slot in every future it passes through, for the connection's whole life.
            Some((Box::new(stream), id))
        }
        Err(reason) => {
            refused(reason, "certificate refused after the handshake".into());
            None
        }
    }
}

/// Over the connection cap: finish the handshake (so the device can read it), send
/// `Goodbye{Overload}` and close.
async fn refuse_overloaded(shared: Arc<Shared>, tcp: TcpStream) {
    let acceptor = TlsAcceptor::from(shared.tls.current().config.clone());
    let Ok(Ok(mut stream)) = timeout(shared.config.handshake_timeout, acceptor.accept(tcp)).await
    else {
        return;
    };
    let mut buf = [0u8; MIN_MAX_FRAME as usize];
    let bye = Downlink::Goodbye(Goodbye {
        reason: GoodbyeReason::Overload,
        retry_after_s: shared.config.retry_after_s,
    });
    if let Ok(n) = device_client::proto::encode(&bye, &mut buf) {
        let frame = buf.get(..n).unwrap_or_default();
        let _ = timeout(shared.config.write_timeout, async {
            stream.write_all(frame).await?;
            stream.shutdown().await
        })
        .await;
    }
    warn!("connection refused: at max_connections");
}
