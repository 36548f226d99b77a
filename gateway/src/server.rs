//! The device listener: accept, the pre-authentication budget, TLS handshake, the
//! connection cap, then a session task.
//!
//! Shaped like mini-redis: one accept loop, a task per connection holding a permit, a
//! shutdown signal every task watches, and a tracing span per connection.
//!
//! ```text
//!  accept ─► pre-auth ticket? ──no──► close (source at max_handshakes_per_source)
//!               │ yes; at max_handshakes the oldest handshake is closed to make room
//!               ▼
//!            TLS handshake (handshake_timeout) ─► identity (CN, CRL, expiry)
//!               ▼
//!            connection permit? ──no──► Goodbye{Overload}, close
//!               │ yes: max_connections; the ticket is returned
//!               ▼
//!            session
//! ```
//!
//! Unauthenticated connections draw from their own, smaller budget: a flood of
//! half-open connections never takes the room of devices that have authenticated, one
//! source address can take only its share of it, and a full budget makes room for a
//! new connection by closing the one that has waited longest (see `PreAuth`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use device_client::proto::{Downlink, Goodbye, GoodbyeReason, MIN_MAX_FRAME};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{Instrument, info, info_span, warn};

use crate::Shared;
use crate::events::Refused;
use crate::store::now_ms;
use crate::tls::{self, Refusal};
use crate::tls_stream::{self, TlsStream};

/// Binds a listener with an explicit backlog (the runtime's own bind uses 128, which a
/// reconnect burst of a few hundred devices overflows: each one then waits 1–3 s for
/// its SYN to be sent again).
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As the runtime's bind does: a restarted gateway can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The next connection; a failed accept (out of file descriptors, say) is logged and
/// tried again after a short pause, so a full process does not spin.
pub(crate) async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(a) => return a,
            Err(e) => {
                warn!(addr = ?listener.local_addr().ok(), error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Why a connection was closed before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreAuthRefusal {
    /// Its source is at `max_handshakes_per_source`.
    PerSource,
    /// `max_handshakes` were in their handshake, and this one had waited longest.
    Evicted,
}

impl PreAuthRefusal {
    const fn as_str(self) -> &'static str {
        match self {
            PreAuthRefusal::PerSource => "per_source",
            PreAuthRefusal::Evicted => "evicted",
        }
    }

    fn count(self, shared: &Shared, peer: Option<SocketAddr>) {
        let m = &shared.metrics;
        match self {
            PreAuthRefusal::PerSource => &m.preauth_refused_per_source,
            PreAuthRefusal::Evicted => &m.preauth_evicted,
        }
        .fetch_add(1, Ordering::Relaxed);
        if shared.log_gates.preauth.admit(Instant::now()) {
            let reason = self.as_str();
            match peer {
                Some(peer) => warn!(%peer, reason, "connection closed before its handshake"),
                None => warn!(reason, "connection closed before its handshake"),
            }
        }
    }
}

/// The budget of connections that have not finished their handshake.
///
/// When it is full, a new connection takes the place of the one that has waited
/// longest: a device's handshake takes milliseconds, so to keep devices out an attacker
/// must open connections faster than devices finish theirs (about 100,000 a second with
/// the default budget), instead of simply holding 1,024 of them open.
struct PreAuth {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<PreAuthState>,
}

#[derive(Default)]
struct PreAuthState {
    /// By admission number: the first is the one that has waited longest.
    admitted: BTreeMap<u64, Admitted>,
    next: u64,
    by_source: HashMap<IpAddr, usize>,
}

/// A connection in the budget, as the budget sees it.
struct Admitted {
    source: IpAddr,
    /// Fired to close the connection to make room.
    evict: oneshot::Sender<()>,
}

impl PreAuthState {
    fn release(&mut self, source: IpAddr) {
        if let Some(n) = self.by_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

/// A connection's place in the pre-authentication budget, given back on drop.
struct Ticket {
    budget: Arc<PreAuth>,
    number: u64,
    /// Resolves if the budget closed this connection to make room.
    evicted: Option<oneshot::Receiver<()>>,
    shared: Arc<Shared>,
}

/// The unit a per-source limit counts: an IPv4 address, or an IPv6 /64 (one host
/// usually holds a whole /64, so counting single IPv6 addresses would limit nothing).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl PreAuth {
    fn lock(&self) -> std::sync::MutexGuard<'_, PreAuthState> {
        // Counters and a map, each update whole: consistent after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(self: &Arc<Self>, ip: IpAddr, shared: &Arc<Shared>) -> Result<Ticket, PreAuthRefusal> {
        let source = source_of(ip);
        let mut s = self.lock();
        // Checked first: a source at its limit never pushes out anyone else.
        if s.by_source
            .get(&source)
            .is_some_and(|n| *n >= self.max_per_source)
        {
            return Err(PreAuthRefusal::PerSource);
        }
        if s.admitted.len() >= self.max_total
            && let Some((_, oldest)) = s.admitted.pop_first()
        {
            s.release(oldest.source);
            // Its place is taken now; the connection closes when its task sees this.
            let _ = oldest.evict.send(());
            shared
                .metrics
                .handshakes_in_progress
                .fetch_sub(1, Ordering::Relaxed);
            PreAuthRefusal::Evicted.count(shared, None);
        }
        let (evict, evicted) = oneshot::channel();
        let number = s.next;
        s.next += 1;
        s.admitted.insert(number, Admitted { source, evict });
        *s.by_source.entry(source).or_insert(0) += 1;
        shared
            .metrics
            .handshakes_in_progress
            .fetch_add(1, Ordering::Relaxed);
        Ok(Ticket {
            budget: self.clone(),
            number,
            evicted: Some(evicted),
            shared: shared.clone(),
        })
    }
}

impl Ticket {
    /// Resolves once the budget has closed this connection to make room; never
    /// otherwise.
    async fn evicted(&mut self) {
        if let Some(rx) = self.evicted.as_mut()
            && rx.await.is_ok()
        {
            return;
        }
        // The sender is gone only with our own entry: never evicted now.
        self.evicted = None;
        std::future::pending().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        // Not there if it was evicted: its place was given back then.
        if let Some(a) = s.admitted.remove(&self.number) {
            s.release(a.source);
            self.shared
                .metrics
                .handshakes_in_progress
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Accepts connections until `shutdown` turns true, then waits for every session to
/// say goodbye and end.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(shared.max_connections));
    let preauth = Arc::new(PreAuth {
        max_total: shared.config.max_handshakes,
        max_per_source: shared.config.max_handshakes_per_source,
        state: Mutex::default(),
    });
    let mut tasks = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            a = accept(&listener) => a,
            // Reap finished tasks so the set does not grow without bound.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let ticket = match preauth.admit(peer.ip(), &shared) {
            Ok(t) => t,
            Err(why) => {
                why.count(&shared, Some(peer));
                // Dropped unread: a reset, at no cost beyond the accept.
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!("conn", %peer, device = tracing::field::Empty);
        let shared = shared.clone();
        let permits = permits.clone();
        tasks.spawn(connection(shared, tcp, peer, ticket, permits).instrument(span));
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

/// TLS handshake and identity under a pre-authentication ticket, then a connection
/// permit and the session.
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    mut ticket: Ticket,
    permits: Arc<Semaphore>,
) {
    // Boxed so that its state (a whole TLS acceptor) is freed once the handshake is
    // done instead of staying in the connection's future for its whole life.
    let handshake = tokio::select! {
        hs = Box::pin(handshake(&shared, tcp, peer)) => hs,
        () = ticket.evicted() => None,
    };
    let Some((stream, identity)) = handshake else {
        return;
    };
    let Some((_permit, stream)) = admit(&shared, &permits, stream, ticket).await else {
        return;
    };
    tracing::Span::current().record("device", tracing::field::display(&identity.device));
    info!(serial = %identity.serial_hex(), "device connected");
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    crate::session::run(shared.clone(), stream, identity, peer).await;
    shared.metrics.connections.fetch_sub(1, Ordering::Relaxed);
}

type Stream = Box<TlsStream>;

/// Trades the pre-authentication ticket for a connection permit. At `max_connections`
/// the device is told `Goodbye{Overload}` (still under its ticket, so the budgets
/// bound these too) and `None` is returned.
async fn admit(
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
    stream: Stream,
    mut ticket: Ticket,
) -> Option<(OwnedSemaphorePermit, Stream)> {
    match permits.clone().try_acquire_owned() {
        Ok(permit) => {
            drop(ticket);
            Some((permit, stream))
        }
        Err(_) => {
            shared
                .metrics
                .overload_refusals
                .fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                () = Box::pin(refuse_overloaded(shared, stream)) => {}
                () = ticket.evicted() => {}
            }
            None
        }
    }
}

async fn handshake(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(Stream, tls::PeerIdentity)> {
    let material = shared.tls.current();
    let refused = |reason: Refusal, detail: String, cert: Option<tls::CertSummary>| {
        shared.metrics.refused(reason);
        if shared.log_gates.refused.admit(Instant::now()) {
            match &cert {
                Some(c) => {
                    warn!(%reason, %detail, %peer, subject = %c.subject, serial = %c.serial, "handshake refused")
                }
                None => warn!(%reason, %detail, %peer, "handshake refused"),
            }
        }
        let (subject, serial) = cert.map(|c| (c.subject, c.serial)).unzip();
        shared.refused(Refused {
            peer: peer.to_string(),
            reason: reason.as_str().to_owned(),
            time_ms: now_ms(),
            subject,
            serial,
        });
    };
    let accept = tls::Observed(Box::pin(tls_stream::accept(tcp, material.config.clone())));
    let stream = match timeout(shared.config.handshake_timeout, accept).await {
        Ok((Ok(s), _)) => s,
        Ok((Err(e), cert)) => {
            refused(Refusal::from_handshake_error(&e), e.to_string(), cert);
            return None;
        }
        Err(_) => {
            refused(
                Refusal::Timeout,
                "no handshake within the timeout".into(),
                None,
            );
            return None;
        }
    };
    let cert = stream.peer_certificates().and_then(|c| c.first()).cloned();
    let Some(cert) = cert else {
        refused(Refusal::NoClientCert, "no client certificate".into(), None);
        return None;
    };
    // Checked against the material current *now*: a reload may have revoked the
    // certificate during the handshake.
    match tls::identify(&cert, &shared.tls.current()) {
        Ok(id) => {
            shared.metrics.handshakes_ok.fetch_add(1, Ordering::Relaxed);
            // Boxed once here: moved by value, the TLS state (over 1 KB) would take a
            // slot in every future it passes through, for the connection's whole life.
            Some((Box::new(stream), id))
        }
        Err(reason) => {
            refused(
                reason,
                "certificate refused after the handshake".into(),
                tls::CertSummary::of(&cert),
            );
            None
        }
    }
}

/// Over the connection cap: tell the device to come back later, and close.
async fn refuse_overloaded(shared: &Arc<Shared>, mut stream: Stream) {
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
    if shared.log_gates.overload.admit(Instant::now()) {
        warn!("connection refused: at max_connections");
    }
}
