//! One device session: from the end of the TLS handshake to the close (PROTOCOL.md §8).
//!
//! ```text
//!            ┌──────────── select! ─────────────┐
//!  socket ──►│ readable → read all, split frames │──► Batch (double-buffered) ─► store
//!  store  ──►│ BatchDone → Ack, live events      │
//!  close  ──►│ Goodbye(reason)                   │
//!  commands ►│ take queued → Command frames      │
//!  timer  ──►│ hello / idle timeout              │
//!            └──────────────────────────────────┘──► write buffer ─► socket
//! ```
//!
//! Memory: an idle session holds no read or write buffer. It waits for the socket to be
//! readable, then reads everything TLS has into a per-thread scratch buffer and keeps
//! only a partial frame, if one is left over.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use device_client::proto::{
    self, Ack, Command, CommandResult, Downlink, Goodbye, GoodbyeReason, MAX_DOWNLINK_FRAME,
    MIN_MAX_FRAME, Name, PROTOCOL_VERSION, Pong, Seq, Uplink, Welcome,
};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::Shared;
use crate::events::Event;
use crate::inbound::{Frame, HelloFields, Inbound, Stop};
use crate::registry::{Entry, Signals};
use crate::store::{Batch, BatchDone, SessionInfo, StoreError, now_ms};
use crate::tls::PeerIdentity;
use crate::values;

/// Commands in flight to one device at a time.
const MAX_COMMANDS_IN_FLIGHT: usize = 16;
/// Bytes read from TLS per read call (the scratch buffer is per worker thread).
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

pub use crate::inbound::Violation;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum End {
    /// The device closed the connection.
    #[error("closed by the device")]
    PeerClosed,
    /// The gateway sent `Goodbye`.
    #[error("goodbye: {}", .0.as_str())]
    Goodbye(GoodbyeReason),
    /// The device broke the protocol.
    #[error("protocol violation: {0}")]
    Violation(#[from] Violation),
    /// No `Hello` in time.
    #[error("no Hello within the hello timeout")]
    HelloTimeout,
    /// A write did not finish in time.
    #[error("write timed out")]
    WriteTimeout,
    /// The connection failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[source] Arc<StoreError>),
}

impl From<StoreError> for End {
    fn from(e: StoreError) -> Self {
        End::Store(Arc::new(e))
    }
}

impl From<Stop> for End {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Violation(v) => End::Violation(v),
            Stop::UnsupportedVersion(_) => End::Goodbye(GoodbyeReason::UnsupportedVersion),
            // Never after the first stop: the session ends at it.
            Stop::Stopped => End::PeerClosed,
        }
    }
}

impl End {
    fn label(&self) -> String {
        match self {
            End::PeerClosed => "closed".into(),
            End::Goodbye(r) => r.as_str().into(),
            End::Violation(_) => "protocol_violation".into(),
            End::HelloTimeout => "hello_timeout".into(),
            End::WriteTimeout => "write_timeout".into(),
            End::Io(_) => "io_error".into(),
            End::Store(_) => "server_error".into(),
        }
    }
}

struct Open {
    device_key: i64,
    peer_max_frame: usize,
    /// Highest seq acked.
    acked: Option<Seq>,
    /// Commands sent and not answered.
    commands_in_flight: Vec<i64>,
    /// Records being filled while the other batch commits.
    filling: Box<Batch>,
    /// A batch at the store, if any.
    committing: bool,
    /// The other batch, back from the store (made at the first submit).
    spare: Option<Box<Batch>>,
    /// Arrival of the oldest record not yet acked, for the ack latency metric.
    oldest_unacked: Option<Instant>,
}

/// Runs a session to its end. Never panics on device input.
pub async fn run(
    shared: Arc<Shared>,
    stream: Box<TlsStream<TcpStream>>,
    identity: PeerIdentity,
    peer: SocketAddr,
) {
    let (ended_tx, ended_rx) = oneshot::channel();
    let signals = Arc::new(Signals::default());
    let session_no = shared.registry.next_session();
    let device: Arc<str> = Arc::from(identity.device.as_str());
    // Recorded first, checked second (as in `open_session`): a reload since the
    // handshake either finds this connection or is seen here.
    shared
        .registry
        .add_unopened(session_no, identity.serial.clone(), signals.clone());
    if shared.tls.current().revoked.contains(&identity.serial) {
        signals.close(GoodbyeReason::Revoked);
    }
    let mut s = Session {
        shared: shared.clone(),
        stream,
        device: device.clone(),
        peer,
        identity,
        inbound: Inbound::new(shared.config.max_frame),
        wbuf: Vec::new(),
        open: None,
        commit: None,
        signals: signals.clone(),
        entry: Some(Entry {
            session: session_no,
            signals,
            serial: Vec::new(),
            ended: ended_rx,
        }),
        deadline: Box::pin(sleep_until(Instant::now() + shared.config.hello_timeout)),
    };
    let end = s.drive().await;
    let reason = end.label();
    match &end {
        End::Violation(v) => {
            shared
                .metrics
                .protocol_violations
                .fetch_add(1, Ordering::Relaxed);
            warn!(reason = %v, "session closed: protocol violation");
        }
        End::Io(e) => info!(error = %e, "session closed: connection error"),
        End::Store(e) => warn!(error = %e, "session closed: store failure"),
        other => info!(reason = %other, "session closed"),
    }
    if matches!(end, End::Violation(_)) {
        s.goodbye(GoodbyeReason::ProtocolViolation);
    }
    Box::pin(s.finish()).await;
    if s.open.is_some() {
        shared.registry.remove(&device, session_no);
        shared.metrics.sessions.fetch_sub(1, Ordering::Relaxed);
        shared.publish_control(Event::Presence {
            device: device.clone(),
            online: false,
            peer: peer.to_string(),
            reason: Some(reason),
        });
    }
    shared.registry.remove_unopened(session_no);
    // Tells a session that is taking over that everything of this one is committed.
    drop(ended_tx);
    debug!("session task done");
}

struct Session {
    shared: Arc<Shared>,
    stream: Box<TlsStream<TcpStream>>,
    device: Arc<str>,
    peer: SocketAddr,
    identity: PeerIdentity,
    /// The reading half: frames and the protocol's rules.
    inbound: Inbound,
    /// Frames waiting to be written.
    wbuf: Vec<u8>,
    open: Option<Open>,
    /// The outcome of the batch at the store, if one is there.
    commit: Option<oneshot::Receiver<BatchDone>>,
    /// Close requests and command notifications (shared with the registry entry).
    signals: Arc<Signals>,
    /// Our registry entry, until `Hello` puts it in the registry.
    entry: Option<Entry>,
    /// Hello timeout, then idle timeout.
    deadline: Pin<Box<Sleep>>,
}

/// The outcome of the batch at the store; pending forever if there is none. `None`
/// if the store dropped it (shutting down).
async fn wait_commit(commit: &mut Option<oneshot::Receiver<BatchDone>>) -> Option<BatchDone> {
    match commit.as_mut() {
        Some(rx) => {
            let done = rx.await.ok();
            *commit = None;
            done
        }
        None => std::future::pending().await,
    }
}

/// What woke a session up.
enum Wake {
    Signal,
    Committed(Option<BatchDone>),
    Readable(io::Result<()>),
    Deadline,
}

/// Reads once without waiting: `None` if TLS has nothing more right now.
fn try_read(stream: &mut TlsStream<TcpStream>, buf: &mut [u8]) -> Option<io::Result<usize>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut rb = ReadBuf::new(buf);
    match Pin::new(stream).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    }
}

impl Session {
    async fn drive(&mut self) -> End {
        // The handshake may have read the first frames already (a device sends Hello
        // right behind its Finished): they wait inside TLS, and the socket will not turn
        // readable for them.
        let mut end = self.read_available().await.err();
        loop {
            if end.is_none() {
                // A commit may have finished or records arrived: keep one batch at the
                // store whenever there is something to commit.
                end = self.submit_if_idle().await.err();
                self.ack_replayed();
            }
            // Whatever happened, send what is queued (acks, pongs, a goodbye).
            if let Err(e) = self.flush().await {
                return e;
            }
            if let Some(end) = end {
                return end;
            }
            end = self.step().await;
        }
    }

    /// Waits for one thing to happen and handles it; `Some` ends the session.
    async fn step(&mut self) -> Option<End> {
        let max_pending = self.shared.config.max_pending_records;
        let can_read = self
            .open
            .as_ref()
            .is_none_or(|o| o.filling.records.len() < max_pending);
        let hello_done = self.open.is_some();
        let wake = tokio::select! {
            biased;
            () = self.signals.woken() => Wake::Signal,
            done = wait_commit(&mut self.commit) => Wake::Committed(done),
            ready = self.stream.get_ref().0.readable(), if can_read => Wake::Readable(ready),
            () = &mut self.deadline => Wake::Deadline,
        };
        match wake {
            Wake::Signal => {
                if let Some(reason) = self.signals.close_reason() {
                    self.goodbye(reason);
                    return Some(End::Goodbye(reason));
                }
                // Commands before `Hello` wait: the session's start sends them all.
                if hello_done && self.signals.take_commands() {
                    // Boxed: an idle session's future would otherwise carry this
                    // rare state.
                    return Box::pin(self.send_commands(false)).await.err();
                }
                None
            }
            Wake::Committed(Some(done)) => self.committed(done).err(),
            // The store dropped the batch: it is stopping.
            Wake::Committed(None) => Some(StoreError::Closed.into()),
            Wake::Readable(Ok(())) => self.read_available().await.err(),
            Wake::Readable(Err(e)) => Some(End::Io(e)),
            Wake::Deadline if hello_done => {
                self.goodbye(GoodbyeReason::IdleTimeout);
                Some(End::Goodbye(GoodbyeReason::IdleTimeout))
            }
            Wake::Deadline => Some(End::HelloTimeout),
        }
    }

    /// Reads everything TLS has, handling every complete frame.
    async fn read_available(&mut self) -> Result<(), End> {
        // The common case has no await at all, so it takes no room in the session's
        // future (which is what every idle connection costs); only the rare `Hello`
        // step awaits, boxed.
        while let Some(hello) = self.read_now()? {
            Box::pin(self.open_session(hello)).await?;
        }
        Ok(())
    }

    /// Reads and handles everything TLS has now, without waiting; stops early to hand
    /// back a `Hello`, which needs awaits to open the session.
    fn read_now(&mut self) -> Result<Option<HelloFields>, End> {
        let mut got_any = false;
        let mut hello = None;
        while hello.is_none() {
            // Decode from the scratch buffer; nothing here awaits.
            let outcome =
                SCRATCH_BUF.with_borrow_mut(|scratch| match try_read(&mut self.stream, scratch) {
                    None => Ok(None),
                    Some(Err(e)) => Err(End::Io(e)),
                    Some(Ok(0)) => Err(End::PeerClosed),
                    Some(Ok(n)) => {
                        let fresh = scratch.get(..n).unwrap_or_default();
                        self.ingest(fresh).map(Some)
                    }
                });
            match outcome? {
                None => break,
                Some(h) => {
                    got_any = true;
                    hello = h;
                }
            }
        }
        if got_any {
            self.touch();
        }
        Ok(hello)
    }

    /// Handles the frames in `fresh` (after any leftover partial frame). Returns the
    /// fields of a `Hello` if one arrived: opening the session needs awaits.
    fn ingest(&mut self, fresh: &[u8]) -> Result<Option<HelloFields>, End> {
        // Taken out for the call, so that handling a frame can use the rest of the
        // session; `Inbound::new` allocates nothing.
        let mut inbound = std::mem::replace(&mut self.inbound, Inbound::new(0));
        let out = inbound.feed(fresh, |frame| self.on_frame(frame));
        self.inbound = inbound;
        if let Err(End::Goodbye(GoodbyeReason::UnsupportedVersion)) = &out {
            self.goodbye(GoodbyeReason::UnsupportedVersion);
        }
        out
    }

    /// A frame of the open session, its rules already checked (`Inbound`).
    fn on_frame(&mut self, frame: Frame<'_>) -> Result<(), End> {
        match frame {
            Frame::Telemetry { seq, time_ms, body } => {
                // `Inbound` hands out frames of open sessions only.
                let Some(open) = self.open.as_mut() else {
                    return Ok(());
                };
                let time_ms = time_ms
                    .and_then(|t| i64::try_from(t).ok())
                    .unwrap_or_else(now_ms);
                if open.filling.is_empty() && open.oldest_unacked.is_none() {
                    open.oldest_unacked = Some(Instant::now());
                }
                open.filling.push(seq, time_ms, body);
                self.shared
                    .metrics
                    .telemetry_received
                    .fetch_add(1, Ordering::Relaxed);
            }
            Frame::CommandResult(r) => self.command_result(&r),
            Frame::Ping(nonce) => self.queue(&Downlink::Pong(Pong { nonce })),
        }
        Ok(())
    }

    /// `Hello` arrived: take over from an older session, register, answer `Welcome`.
    async fn open_session(&mut self, h: HelloFields) -> Result<(), End> {
        let shared = self.shared.clone();
        let mut entry = match self.entry.take() {
            Some(e) => e,
            None => return Err(Violation::SecondHello.into()),
        };
        entry.serial = self.identity.serial.clone();
        let session_no = entry.session;
        // Checked against the material in force now: a certificate revoked since the
        // handshake gets no session. A reload after this check still finds the
        // connection, among the unopened ones until it is in the registry
        // (`Registry::close_revoked`).
        if shared.tls.current().revoked.contains(&self.identity.serial) {
            self.goodbye(GoodbyeReason::Revoked);
            return Err(End::Goodbye(GoodbyeReason::Revoked));
        }
        let replaced = shared.registry.insert(&self.device, entry);
        // Registered first, checked second: either the shutdown's close_all saw this
        // entry, or this sees the flag it set before (server::run).
        if *shared.shutting_down.borrow() {
            shared.registry.remove(&self.device, session_no);
            self.goodbye(GoodbyeReason::Shutdown);
            return Err(End::Goodbye(GoodbyeReason::Shutdown));
        }
        // In the registry now, so a reload from here on finds it there.
        shared.registry.remove_unopened(session_no);
        if let Some(old) = replaced {
            info!("device connected again: replacing its older session");
            old.signals.close(GoodbyeReason::Replaced);
            // The old session commits what it received before it ends, so the
            // last_acked below counts it. Bounded: a stuck old session cannot block us.
            let _ = timeout(Duration::from_secs(10), old.ended).await;
        }
        let info = SessionInfo {
            device: self.device.to_string(),
            cert_serial: self.identity.serial_hex(),
            cert_not_after: self.identity.not_after,
            firmware: h.firmware.clone(),
            peer_addr: self.peer.to_string(),
            boot_id: h.boot_id,
        };
        let opened = match shared.store.open_session(info).await {
            Ok(o) => o,
            Err(e) => {
                shared.registry.remove(&self.device, session_no);
                self.goodbye(GoodbyeReason::ServerError);
                return Err(e.into());
            }
        };
        shared.metrics.sessions.fetch_add(1, Ordering::Relaxed);
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            heartbeat_s: u16::try_from(shared.config.heartbeat.as_secs()).unwrap_or(u16::MAX),
            last_acked: opened.last_acked,
            server_time_ms: u64::try_from(now_ms()).unwrap_or(0),
            max_frame: shared.config.max_frame,
        };
        let filling = Batch::new(opened.device_key, h.boot_id);
        self.open = Some(Open {
            device_key: opened.device_key,
            peer_max_frame: usize::from(h.max_frame),
            acked: opened.last_acked,
            commands_in_flight: Vec::new(),
            filling,
            committing: false,
            spare: None,
            oldest_unacked: None,
        });
        self.queue(&Downlink::Welcome(welcome));
        debug!(boot_id = h.boot_id, firmware = %h.firmware, last_acked = ?opened.last_acked, "session open");
        shared.publish_control(Event::Presence {
            device: self.device.clone(),
            online: true,
            peer: self.peer.to_string(),
            reason: None,
        });
        self.touch();
        // Frames that came in the same read as Hello.
        self.inbound.opened(opened.last_acked);
        self.ingest(&[])?;
        // Re-deliver commands a previous session may have lost.
        self.send_commands(true).await
    }

    /// Sends queued commands, up to the in-flight limit.
    async fn send_commands(&mut self, include_sent: bool) -> Result<(), End> {
        let shared = self.shared.clone();
        let Some(open) = self.open.as_ref() else {
            return Ok(());
        };
        let room = MAX_COMMANDS_IN_FLIGHT.saturating_sub(open.commands_in_flight.len());
        if room == 0 {
            return Ok(());
        }
        let device_key = open.device_key;
        let cmds = shared
            .store
            .take_commands(device_key, room, include_sent)
            .await
            .map_err(End::from)?;
        let now = now_ms();
        for cmd in cmds {
            let ttl_ms = u32::try_from((cmd.expires_ms - now).max(1)).unwrap_or(u32::MAX);
            let encoded = match (Name::new(&cmd.name), values::borrow_readings(&cmd.args)) {
                (Ok(name), Ok(args)) => {
                    let msg = Downlink::Command(Command {
                        id: wire_id(cmd.id),
                        name,
                        args,
                        ttl_ms,
                    });
                    self.queue_checked(&msg)
                }
                _ => Err("invalid name or arguments".to_owned()),
            };
            match encoded {
                Ok(()) => {
                    if let Some(open) = self.open.as_mut() {
                        open.commands_in_flight.push(cmd.id);
                    }
                    if let Some(rec) = cmd.record {
                        shared.command_changed(rec);
                    }
                }
                Err(why) => {
                    warn!(command = cmd.id, %why, "command cannot be sent to this device");
                    let rec = shared
                        .store
                        .finish_command(
                            device_key,
                            cmd.id,
                            crate::store::CommandState::Failed,
                            None,
                            None,
                            Some(why),
                        )
                        .await
                        .map_err(End::from)?;
                    if let Some(rec) = rec {
                        shared.command_changed(rec);
                    }
                }
            }
        }
        Ok(())
    }

    fn command_result(&mut self, r: &CommandResult<'_>) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        // Only a command sent on this session has a result to record (a re-sent one
        // included: a new session sends every unanswered command again). Anything else
        // costs no store work and no task, however many the device sends.
        let Some(at) = open
            .commands_in_flight
            .iter()
            .position(|c| wire_id(*c) == r.id)
        else {
            let id = r.id;
            self.shared
                .metrics
                .command_results_ignored
                .fetch_add(1, Ordering::Relaxed);
            debug!(command = id, "result for a command not in flight: ignored");
            return;
        };
        let id = open.commands_in_flight.swap_remove(at);
        let device_key = open.device_key;
        let state = crate::store::state_for(r.status);
        let status = r.status.as_str().to_owned();
        let result = serde_json::Value::Object(values::readings_to_json(&r.values));
        let shared = self.shared.clone();
        let signals = self.signals.clone();
        // Recorded off the session's path: a slow store must not stall reading.
        tokio::spawn(async move {
            match shared
                .store
                .finish_command(device_key, id, state, Some(status), Some(result), None)
                .await
            {
                Ok(Some(rec)) => shared.command_changed(rec),
                Ok(None) => debug!(command = id, "result for an unknown or finished command"),
                Err(e) => warn!(command = id, error = %e, "storing a command result failed"),
            }
            // Room for more commands now.
            signals.commands_waiting();
        });
    }

    /// Submits the filling batch if no other is at the store.
    async fn submit_if_idle(&mut self) -> Result<(), End> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        if open.committing || open.filling.is_empty() {
            return Ok(());
        }
        // The second batch is made on the first submit: an idle session keeps one.
        let mut next = open
            .spare
            .take()
            .unwrap_or_else(|| Batch::new(open.device_key, open.filling.boot_id));
        next.clear();
        let mut batch = std::mem::replace(&mut open.filling, next);
        batch.received_ms = now_ms();
        batch.submitted = Some(std::time::Instant::now());
        open.committing = true;
        // Without awaiting when the store's queue has room (nearly always), so that
        // this path takes no room in an idle session's future.
        let rx = match self.shared.store.try_submit(batch) {
            Ok(rx) => Ok(rx),
            Err(crate::store::TrySubmit::Full(batch)) => {
                Box::pin(self.shared.store.submit(batch)).await
            }
            Err(crate::store::TrySubmit::Closed) => Err(StoreError::Closed),
        }
        .map_err(End::from)?;
        self.commit = Some(rx);
        Ok(())
    }

    /// A batch committed (or failed): ack, publish, submit the next.
    fn committed(&mut self, done: BatchDone) -> Result<(), End> {
        let shared = self.shared.clone();
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        open.committing = false;
        let BatchDone { mut batch, result } = done;
        let inserted = match result {
            Ok(n) => n,
            Err(e) => {
                self.goodbye(GoodbyeReason::ServerError);
                return Err(End::Store(e));
            }
        };
        let m = &shared.metrics;
        if let Some(t) = batch.submitted.take() {
            m.commit_latency.observe(t.elapsed());
        }
        m.telemetry_stored
            .fetch_add(inserted as u64, Ordering::Relaxed);
        m.telemetry_duplicates
            .fetch_add((batch.records.len() - inserted) as u64, Ordering::Relaxed);
        if let Some(last) = batch.records.last() {
            let seq = last.seq;
            if open.acked.is_none_or(|a| seq > a) {
                open.acked = Some(seq);
            }
            if let Some(t) = open.oldest_unacked.take() {
                m.ack_latency.observe(t.elapsed());
            }
            if !open.filling.is_empty() {
                open.oldest_unacked = Some(Instant::now());
            }
            let ack = Downlink::Ack(Ack { seq });
            if shared.has_subscribers() {
                for r in batch.records.iter().filter(|r| r.inserted) {
                    let values = match proto::decode_uplink(batch.body(r)) {
                        Ok(Uplink::Telemetry(t)) => values::readings_to_json(&t.readings),
                        _ => continue,
                    };
                    shared.publish(|| Event::Telemetry {
                        device: self.device.clone(),
                        boot_id: batch.boot_id,
                        seq: r.seq,
                        time_ms: r.time_ms,
                        values,
                    });
                }
            }
            batch.clear();
            open.spare = Some(batch);
            self.queue(&ack);
        } else {
            open.spare = Some(batch);
        }
        Ok(())
    }

    /// Acknowledges replayed records that were stored before this session: one `Ack`
    /// for all of them, whatever the number. They come before any new record of the
    /// session, so this never acks past a record waiting for its commit.
    fn ack_replayed(&mut self) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let Some(seq) = self.inbound.take_replayed() else {
            return;
        };
        if open.acked.is_none_or(|a| seq > a) {
            open.acked = Some(seq);
        }
        self.queue(&Downlink::Ack(Ack { seq }));
    }

    /// Resets the idle deadline: something arrived.
    fn touch(&mut self) {
        if self.open.is_some() {
            let idle = self.shared.config.heartbeat * 3;
            self.deadline.as_mut().reset(Instant::now() + idle);
            // What the API shows as "last seen": kept in memory, not committed per
            // frame (the store gets it when the session ends).
            self.signals.seen(now_ms());
        }
    }

    /// Queues a frame for the device; frames that do not fit its limit are dropped
    /// with a log line (control messages always fit: PROTOCOL.md §6.1).
    fn queue(&mut self, msg: &Downlink<'_>) {
        if let Err(why) = self.queue_checked(msg) {
            warn!(%why, "frame dropped");
        }
    }

    fn queue_checked(&mut self, msg: &Downlink<'_>) -> Result<(), String> {
        let limit = self
            .open
            .as_ref()
            .map_or(usize::from(MIN_MAX_FRAME), |o| o.peer_max_frame);
        // Encoded on the thread's stack (this is not an async fn), so the write buffer
        // only ever grows to the frames really queued: an ack is 5 bytes.
        let mut frame = [0u8; MAX_DOWNLINK_FRAME];
        let room = frame.len().min(limit);
        match proto::encode(msg, frame.get_mut(..room).unwrap_or_default()) {
            Ok(n) => {
                self.wbuf
                    .extend_from_slice(frame.get(..n).unwrap_or_default());
                Ok(())
            }
            Err(e) => Err(format!(
                "{e} (the device accepts frames of up to {limit} bytes)"
            )),
        }
    }

    fn goodbye(&mut self, reason: GoodbyeReason) {
        let retry_after_s = match reason {
            GoodbyeReason::Revoked | GoodbyeReason::UnsupportedVersion => 0,
            GoodbyeReason::ProtocolViolation => 60,
            _ => self.shared.config.retry_after_s,
        };
        self.queue(&Downlink::Goodbye(Goodbye {
            reason,
            retry_after_s,
        }));
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // Almost always the socket takes a few small frames at once: try that without
        // awaiting, so the write path takes no room in an idle session's future. Only
        // a device that does not read makes us wait, in a boxed future.
        match self.try_flush_now() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(End::Io(e)),
            None => Box::pin(self.flush_slowly()).await?,
        }
        self.wbuf.clear();
        if self.wbuf.capacity() > 512 {
            // A burst of commands passed; an idle session keeps no big buffer.
            self.wbuf = Vec::new();
        }
        Ok(())
    }

    /// Writes and flushes without waiting; `None` if the socket would block (what was
    /// written is gone from `wbuf`).
    fn try_flush_now(&mut self) -> Option<io::Result<()>> {
        use tokio::io::AsyncWrite;
        let mut cx = Context::from_waker(Waker::noop());
        let mut stream = Pin::new(&mut *self.stream);
        while !self.wbuf.is_empty() {
            match stream.as_mut().poll_write(&mut cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Some(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.wbuf.drain(..n.min(self.wbuf.len()));
                }
                Poll::Ready(Err(e)) => return Some(Err(e)),
                Poll::Pending => return None,
            }
        }
        match stream.poll_flush(&mut cx) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    /// The rest of a write the socket did not take at once, within the write timeout.
    async fn flush_slowly(&mut self) -> Result<(), End> {
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match timeout(self.shared.config.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Io(e)),
            Err(_) => Err(End::WriteTimeout),
        }
    }

    /// After the end: what is queued is sent (a protocol violation's `Goodbye`); records
    /// received are committed (the device will not replay what it sees acked, and a session
    /// taking over waits for this); then TLS is closed.
    async fn finish(&mut self) {
        let revoked = self.signals.close_reason() == Some(GoodbyeReason::Revoked);
        if revoked && let Some(open) = self.open.as_mut() {
            open.filling.clear();
        }
        // Drain: at most the batch at the store plus the filling one.
        for _ in 0..3 {
            let Some(open) = self.open.as_ref() else {
                break;
            };
            if open.committing {
                let waited = timeout(Duration::from_secs(10), wait_commit(&mut self.commit)).await;
                match waited {
                    Ok(Some(done)) => {
                        if self.committed(done).is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            } else if !open.filling.is_empty() {
                if self.submit_if_idle().await.is_err() {
                    break;
                }
            } else {
                break;
            }
        }
        let _ = timeout(Duration::from_secs(1), self.flush()).await;
        if let Some(open) = self.open.as_ref() {
            let _ = self.shared.store.close_session(open.device_key).await;
        }
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

/// A command's id as the device sees it: the low 32 bits of the store's id. In a
/// fleet the store numbers commands from `slot × 2³²`; the low 32 bits of its rows are
/// still unique (store/fleet.rs), so a result maps back to one command.
fn wire_id(id: i64) -> u32 {
    (id & 0xFFFF_FFFF) as u32
}
