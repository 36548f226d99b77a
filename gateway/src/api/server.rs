//! The API's listener: its own accept loop, a slot of `api_max_connections` per
//! connection (kept by a WebSocket), and the header and idle timeouts.

use super::*;

/// A connection's TCP stream holding its slot of `api_max_connections`: the slot is
/// freed when the stream is, so a WebSocket (which takes the stream over from HTTP)
/// keeps its slot for as long as it is open.
pub(super) struct Slotted {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    shared: Arc<Shared>,
}

impl Drop for Slotted {
    fn drop(&mut self) {
        self.shared
            .metrics
            .api_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Serves the API on `listener` until `stop` turns true, within the connection cap and
/// the header timeout (module docs). Then lets requests in progress finish, for up to
/// 10 s.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(shared.config.api_max_connections));
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            a = crate::server::accept(&listener) => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared
                .metrics
                .api_connections_refused
                .fetch_add(1, Ordering::Relaxed);
            if shared.log_gates.api.admit(Instant::now()) {
                warn!(%peer, "API connection refused: at api_max_connections");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        shared
            .metrics
            .api_connections
            .fetch_add(1, Ordering::Relaxed);
        let io = Slotted {
            tcp,
            _slot: slot,
            shared: shared.clone(),
        };
        conns.spawn(serve_connection(
            io,
            router.clone(),
            shared.config.api_header_timeout,
            stop.clone(),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, conns.join_next()).await {}
    conns.shutdown().await;
}

/// One API connection: HTTP/1.1 with upgrades, until it closes or `stop` turns true.
pub(super) async fn serve_connection(
    io: Slotted,
    router: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "API connection ended");
    }
}
