//! One device session: from the end of the TLS handshake to the close (PROTOCOL.md §8).
//! The protocol's rules live in a state machine without I/O ([`machine::Machine`]);
//! this driver does the I/O around it: TLS, the store, the registry, events.
//!
//! ```text
//!            ┌──────────── select! ─────────────┐
//!  socket ──►│ readable → read all → Machine     │──► batch ─► store
//!  store  ──►│ BatchDone → Machine (acks), events│
//!  close  ──►│ Machine::close (Goodbye)          │
//!  commands ►│ take queued → Machine::send_command│
//!  timer  ──►│ Machine::handle_timeout           │
//!            └──────────────────────────────────┘──► Machine::transmit ─► socket
//! ```
//!
//! Memory: an idle session holds no read or write buffer. It waits for the socket to be
//! readable, then reads everything TLS has into a per-thread scratch buffer and keeps
//! only a partial frame, if one is left over.

pub(crate) mod machine;
#[cfg(test)]
mod pair_tests;

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::tls_stream::TlsStream;
use device_client::proto::GoodbyeReason;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::Shared;
use crate::events::Event;
use crate::inbound::HelloFields;
use crate::registry::{Entry, Signals};
use crate::store::{BatchDone, OpenRecorded, SessionInfo, StoreError};
use crate::tls::PeerIdentity;

pub use machine::End;
use machine::{Fed, Machine, Now};

/// Bytes read from TLS per read call (the scratch buffer is per worker thread).
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// Runs a session to its end. Never panics on device input.
///
/// Not an `async fn`: the setup runs here, so that the future keeps the session only
/// (an `async fn` keeps its arguments and every local beside it, and the future is
/// what each idle connection costs).
pub fn run(
    shared: Arc<Shared>,
    stream: Box<TlsStream>,
    identity: PeerIdentity,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let (ended_tx, ended_rx) = oneshot::channel();
    let signals = Arc::new(Signals::default());
    let session_no = shared.registry.next_session();
    // Recorded first, checked second (as in `open_session`): a reload since the
    // handshake either finds this connection or is seen here.
    shared
        .registry
        .add_unopened(session_no, identity.serial.clone(), signals.clone());
    if shared.tls.current().revoked.contains(&identity.serial) {
        signals.close(GoodbyeReason::Revoked);
    }
    let machine = Machine::new(shared.session_rules.clone(), Now::real());
    let mut s = Session {
        deadline: Box::pin(sleep_until(Instant::from_std(machine.poll_timeout()))),
        machine,
        device: Arc::from(identity.device.as_str()),
        shared,
        stream,
        peer,
        identity,
        commit: None,
        signals: signals.clone(),
        entry: Some(Entry {
            session: session_no,
            signals,
            serial: Vec::new(),
            ended: ended_rx,
        }),
        session_no,
        _ended: ended_tx,
    };
    // Captured by move and borrowed inside: one copy of the session in the future
    // (an `async fn` taking `self` would keep two).
    async move { s.run().await }
}

struct Session {
    shared: Arc<Shared>,
    stream: Box<TlsStream>,
    device: Arc<str>,
    peer: SocketAddr,
    identity: PeerIdentity,
    /// The protocol's rules and the session's state.
    machine: Machine,
    /// The outcome of the batch at the store, if one is there.
    commit: Option<oneshot::Receiver<BatchDone>>,
    /// Close requests and command notifications (shared with the registry entry).
    signals: Arc<Signals>,
    /// Our registry entry, until `Hello` puts it in the registry.
    entry: Option<Entry>,
    /// The machine's deadline as a timer.
    deadline: Pin<Box<Sleep>>,
    session_no: u64,
    /// Dropped with the session: tells a session taking over that everything of this
    /// one is committed.
    _ended: oneshot::Sender<()>,
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
fn try_read(stream: &mut TlsStream, buf: &mut [u8]) -> Option<io::Result<usize>> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut rb = ReadBuf::new(buf);
    match Pin::new(stream).poll_read(&mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    }
}

impl Session {
    async fn run(&mut self) {
        let end = self.drive().await;
        let reason = end.label();
        match &end {
            End::Violation(v) => {
                self.shared
                    .metrics
                    .protocol_violations
                    .fetch_add(1, Ordering::Relaxed);
                warn!(reason = %v, "session closed: protocol violation");
            }
            End::Io(e) => info!(error = %e, "session closed: connection error"),
            End::Store(e) => warn!(error = %e, "session closed: store failure"),
            other => info!(reason = %other, "session closed"),
        }
        self.machine.ended(&end);
        // A revocation that came together with another end (the device closed at the
        // same moment, say) still keeps nothing more of this device.
        if self.signals.close_reason() == Some(GoodbyeReason::Revoked) {
            self.machine.discard_uncommitted();
        }
        Box::pin(self.finish()).await;
        let shared = &self.shared;
        if self.machine.is_open() {
            shared.registry.remove(&self.device, self.session_no);
            shared.metrics.sessions.fetch_sub(1, Ordering::Relaxed);
            shared.publish_control(Event::Presence {
                device: self.device.clone(),
                online: false,
                peer: self.peer.to_string(),
                reason: Some(reason.into()),
            });
        }
        shared.registry.remove_unopened(self.session_no);
        debug!("session task done");
    }

    async fn drive(&mut self) -> End {
        // The handshake may have read the first frames already (a device sends Hello
        // right behind its Finished): they wait inside TLS, and the socket will not turn
        // readable for them.
        let mut end = self.read_available().await.err();
        loop {
            if end.is_none() {
                // A commit may have finished or records arrived: keep one batch at the
                // store whenever there is something to commit.
                end = self.submit().await.err();
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
        let can_read = self.machine.wants_input();
        let due = Instant::from_std(self.machine.poll_timeout());
        if self.deadline.deadline() != due {
            self.deadline.as_mut().reset(due);
        }
        let wake = tokio::select! {
            biased;
            () = self.signals.woken() => Wake::Signal,
            done = wait_commit(&mut self.commit) => Wake::Committed(done),
            ready = self.stream.tcp().readable(), if can_read => Wake::Readable(ready),
            () = &mut self.deadline => Wake::Deadline,
        };
        match wake {
            Wake::Signal => {
                if let Some(reason) = self.signals.close_reason() {
                    return Some(self.machine.close(reason));
                }
                // Both may have been signalled for this one wake-up (signals coalesce
                // into one permit): each is handled, neither waits for another signal.
                if self.machine.desired_base().is_some()
                    && self.signals.take_desired()
                    && let Err(end) = Box::pin(self.send_desired()).await
                {
                    return Some(end);
                }
                if self.signals.take_firmware() {
                    self.sync_firmware();
                }
                // Commands before `Hello` wait: the session's start sends them all.
                if self.machine.is_open()
                    && let Some(resend) = self.signals.take_commands()
                {
                    // Boxed: an idle session's future would otherwise carry this
                    // rare state.
                    return Box::pin(self.send_commands(resend)).await.err();
                }
                None
            }
            Wake::Committed(Some(done)) => self.committed(done).err(),
            // The store dropped the batch: it is stopping.
            Wake::Committed(None) => Some(StoreError::Closed.into()),
            Wake::Readable(Ok(())) => self.read_available().await.err(),
            Wake::Readable(Err(e)) => Some(End::Io(e)),
            Wake::Deadline => self.machine.handle_timeout(Now::real()).err(),
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
                        self.machine.handle_bytes(Now::real(), fresh).map(Some)
                    }
                });
            match outcome? {
                None => break,
                Some(fed) => {
                    got_any = true;
                    hello = self.fed(fed);
                }
            }
        }
        if got_any && self.machine.is_open() {
            // What the API shows as "last seen": kept in memory, not committed per
            // frame (the store gets it when the session ends).
            self.signals.seen(crate::store::now_ms());
        }
        Ok(hello)
    }

    /// Counts what the machine found and records command results; hands back a
    /// `Hello` to open the session with.
    fn fed(&mut self, fed: Fed) -> Option<HelloFields> {
        let m = &self.shared.metrics;
        if fed.records > 0 {
            m.telemetry_received
                .fetch_add(fed.records as u64, Ordering::Relaxed);
        }
        if fed.ignored_results > 0 {
            m.command_results_ignored
                .fetch_add(fed.ignored_results as u64, Ordering::Relaxed);
            debug!(
                count = fed.ignored_results,
                "results for commands not in flight: ignored"
            );
        }
        let device_key = self.machine.device_key();
        if fed.wants_desired
            && let (Some(base), Some(key)) = (self.machine.desired_base(), device_key)
            && self.shared.store.desired_version(key) != base
        {
            // Fetched from the store in the session's loop (it awaits).
            self.signals.desired_changed();
        }
        if let (Some((version, values)), Some(key)) = (fed.reported, device_key)
            && self
                .shared
                .store
                .report_changes_state(key, version, !values.is_empty())
        {
            self.shared.publish(|| Event::Reported {
                device: self.device.clone(),
                desired_version: version,
                values: values.clone(),
            });
            // Recorded off the session's path, as command results are, by one task at
            // a time: reports that come meanwhile are merged into its next write.
            if self.signals.add_report(version, values) {
                let (shared, signals) = (self.shared.clone(), self.signals.clone());
                tokio::spawn(async move {
                    while let Some((version, values)) = signals.take_reports() {
                        if let Err(e) = shared.store.record_reported(key, version, values).await {
                            warn!(error = %e, "storing a state report failed");
                        }
                    }
                });
            }
        }
        if fed.firmware_bytes > 0 {
            m.firmware_bytes_sent
                .fetch_add(fed.firmware_bytes as u64, Ordering::Relaxed);
        }
        if fed.firmware_sent.is_some() || !fed.firmware_status.is_empty() {
            self.firmware_fed(fed.firmware_sent, fed.firmware_status);
        }
        for r in fed.results {
            let Some(device_key) = device_key else {
                break;
            };
            let shared = self.shared.clone();
            let signals = self.signals.clone();
            // Recorded off the session's path: a slow store must not stall reading.
            tokio::spawn(async move {
                let id = r.id;
                match shared
                    .store
                    .finish_command(
                        device_key,
                        id,
                        r.state,
                        Some(r.status.to_owned()),
                        Some(r.values),
                        None,
                    )
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
        fed.hello
    }

    /// `Hello` arrived: take over from an older session, register, answer `Welcome`.
    async fn open_session(&mut self, h: HelloFields) -> Result<(), End> {
        let shared = self.shared.clone();
        let mut entry = match self.entry.take() {
            Some(e) => e,
            None => return Err(crate::inbound::Violation::SecondHello.into()),
        };
        entry.serial = self.identity.serial.clone();
        let session_no = entry.session;
        // Checked against the material in force now: a certificate revoked since the
        // handshake gets no session. A reload after this check still finds the
        // connection, among the unopened ones until it is in the registry
        // (`Registry::close_revoked`).
        if shared.tls.current().revoked.contains(&self.identity.serial) {
            return Err(self.machine.close(GoodbyeReason::Revoked));
        }
        let replaced = shared.registry.insert(&self.device, entry);
        // Registered first, checked second: either the shutdown's close_all saw this
        // entry, or this sees the flag it set before (server::run).
        if *shared.shutting_down.borrow() {
            shared.registry.remove(&self.device, session_no);
            return Err(self.machine.close(GoodbyeReason::Shutdown));
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
        // The store answers from memory; the writer records the session later and
        // then says whether commands wait (sent before included: a previous session
        // may have lost them), or that it failed.
        let signals = self.signals.clone();
        let recorded = move |r: OpenRecorded| match r {
            OpenRecorded::Done => {}
            OpenRecorded::CommandsWaiting => signals.commands_waiting_resend(),
            OpenRecorded::Failed => {
                if signals.close_reason().is_none() {
                    signals.close(GoodbyeReason::ServerError);
                }
            }
        };
        let opened = match shared.store.open_session(info, recorded).await {
            Ok(o) => o,
            Err(e) => {
                shared.registry.remove(&self.device, session_no);
                self.machine.close(GoodbyeReason::ServerError);
                return Err(e.into());
            }
        };
        shared.metrics.sessions.fetch_add(1, Ordering::Relaxed);
        let fed = self.machine.opened(Now::real(), &h, opened)?;
        debug!(boot_id = h.boot_id, firmware = %h.firmware, last_acked = ?opened.last_acked, "session open");
        shared.publish_control(Event::Presence {
            device: self.device.clone(),
            online: true,
            peer: self.peer.to_string(),
            reason: None,
        });
        // Firmware: an update installed (or rolled back), an offer to make.
        let version = self.machine.version().unwrap_or(0);
        shared.firmware.change(&shared, |r| {
            r.hello(
                &self.device,
                &h.firmware,
                version,
                crate::store::now_ms(),
                |d| shared.registry.is_online(d),
            )
        });
        self.sync_firmware();
        // Frames that came in the same read as Hello (never a second Hello: that is a
        // violation).
        self.fed(fed);
        // Commands signalled before the session was open (the registry had it, the
        // machine did not take them yet).
        match self.signals.take_commands() {
            Some(resend) => self.send_commands(resend).await,
            None => Ok(()),
        }
    }

    /// Makes the session serve what the device's rollout wants now: offers the
    /// image, or withdraws one no longer wanted (version 3).
    fn sync_firmware(&mut self) {
        if !self.machine.speaks_firmware() {
            // Offered while online: this session cannot take it.
            if let Some(version) = self.machine.version() {
                let shared = self.shared.clone();
                shared.firmware.change(&shared, |r| {
                    r.cannot_transfer(&self.device, version, crate::store::now_ms(), |d| {
                        shared.registry.is_online(d)
                    })
                });
            }
            return;
        }
        let wanted = self.shared.firmware.with(|r| r.wanted(&self.device));
        match (wanted, self.machine.firmware_offered()) {
            (Some((id, _)), Some(cur)) if id == cur => {}
            (Some((id, image)), _) => {
                if let Err(why) = self.machine.offer_firmware(id, image) {
                    warn!(%why, "firmware offer cannot be sent to this device");
                }
            }
            (None, Some(cur)) => self.machine.cancel_firmware(cur),
            (None, None) => {}
        }
    }

    /// Chunks went out, or the device said how a transfer ended.
    fn firmware_fed(
        &mut self,
        sent: Option<(u32, u32)>,
        statuses: Vec<(u32, device_client::proto::FirmwareOutcome)>,
    ) {
        let shared = self.shared.clone();
        let now = crate::store::now_ms();
        shared.firmware.change(&shared, |r| {
            let mut fx = crate::firmware::Effects::default();
            if let Some((id, end)) = sent {
                fx = r.sent(&self.device, id, end, now);
            }
            for (id, outcome) in statuses {
                let more = r.status(&self.device, id, outcome, now, |d| {
                    shared.registry.is_online(d)
                });
                fx.writes.extend(more.writes);
                fx.events.extend(more.events);
                fx.wake.extend(more.wake);
            }
            fx
        });
    }

    /// Sends what the device lacks of its desired state (version 2), if anything.
    async fn send_desired(&mut self) -> Result<(), End> {
        // Fetched again if the device asked anew while the store answered.
        for _ in 0..3 {
            let (Some(base), Some(key)) = (self.machine.desired_base(), self.machine.device_key())
            else {
                return Ok(());
            };
            let Some(delta) = self.shared.store.desired_since(key, base).await? else {
                return Ok(());
            };
            match self.machine.send_desired(&delta) {
                Ok(true) => {
                    debug!(
                        version = delta.version,
                        base = delta.base,
                        "desired state sent"
                    );
                    return Ok(());
                }
                Ok(false) => continue,
                Err(why) => {
                    warn!(%why, "desired state cannot be sent to this device");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Sends queued commands, up to the in-flight limit.
    async fn send_commands(&mut self, include_sent: bool) -> Result<(), End> {
        let room = self.machine.command_room();
        let Some(device_key) = self.machine.device_key() else {
            return Ok(());
        };
        if room == 0 {
            return Ok(());
        }
        let shared = self.shared.clone();
        let cmds = shared
            .store
            .take_commands(device_key, room, include_sent)
            .await
            .map_err(End::from)?;
        let now = Now::real();
        for cmd in cmds {
            match self.machine.send_command(now, &cmd) {
                Ok(()) => {
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
                            Some(why.to_string()),
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

    /// Submits the machine's batch if it has one (none while another is at the store).
    async fn submit(&mut self) -> Result<(), End> {
        let Some(batch) = self.machine.poll_batch(Now::real()) else {
            return Ok(());
        };
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

    /// A batch committed (or failed): publish, then the machine acks.
    fn committed(&mut self, mut done: BatchDone) -> Result<(), End> {
        let shared = &self.shared;
        let m = &shared.metrics;
        if let Some(t) = done.batch.submitted.take() {
            m.commit_latency.observe(t.elapsed());
        }
        if done.result.is_ok() && shared.has_subscribers() {
            publish_telemetry(shared, &self.device, &done);
        }
        let c = self.machine.handle_committed(Now::real(), done)?;
        m.telemetry_stored
            .fetch_add(c.inserted as u64, Ordering::Relaxed);
        m.telemetry_duplicates
            .fetch_add(c.duplicates as u64, Ordering::Relaxed);
        if let Some(l) = c.ack_latency {
            m.ack_latency.observe(l);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.machine.transmit().is_empty() {
            return Ok(());
        }
        // Almost always the socket takes a few small frames at once: try that without
        // awaiting, so the write path takes no room in an idle session's future. Only
        // a device that does not read makes us wait, in a boxed future.
        match self.try_flush_now() {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(End::Io(e)),
            None => Box::pin(self.flush_slowly()).await,
        }
    }

    /// Writes and flushes without waiting; `None` if the socket would block (what was
    /// written is gone from the machine's transmit buffer).
    fn try_flush_now(&mut self) -> Option<io::Result<()>> {
        use tokio::io::AsyncWrite;
        let mut cx = Context::from_waker(Waker::noop());
        let mut stream = Pin::new(&mut *self.stream);
        while !self.machine.transmit().is_empty() {
            match stream.as_mut().poll_write(&mut cx, self.machine.transmit()) {
                Poll::Ready(Ok(0)) => return Some(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.machine.transmitted(n),
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
            self.stream.write_all(self.machine.transmit()).await?;
            let n = self.machine.transmit().len();
            self.machine.transmitted(n);
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
        // Drain: at most the batch at the store plus the filling one.
        for _ in 0..3 {
            if self.machine.committing() {
                let waited = timeout(Duration::from_secs(10), wait_commit(&mut self.commit)).await;
                match waited {
                    Ok(Some(done)) => {
                        if self.committed(done).is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            } else if self.submit().await.is_err() || !self.machine.committing() {
                break;
            }
        }
        let _ = timeout(Duration::from_secs(1), self.flush()).await;
        if let Some(key) = self.machine.device_key() {
            let _ = self.shared.store.close_session(key).await;
        }
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
        // A lingering close: what the device sent meanwhile is read and dropped until
        // it closes too (it does on `Goodbye`), for at most a second. Closing a socket
        // with unread bytes makes the kernel send a reset instead of a FIN, and a reset
        // makes the device's network stack drop what it had received and not yet
        // read: the `Goodbye` and the last acks, and with them the retry-after.
        // Bounded by time only: reading and dropping costs next to nothing.
        let tcp = self.stream.tcp();
        let linger = async {
            let mut scratch = [0u8; 4096];
            while tcp.readable().await.is_ok() {
                match tcp.try_read(&mut scratch) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        };
        let _ = timeout(LINGER, linger).await;
    }
}

/// How long a closing session waits for the device to close its side.
const LINGER: Duration = Duration::from_secs(1);

/// Live events for the records a commit stored (not for duplicates).
fn publish_telemetry(shared: &Shared, device: &Arc<str>, done: &BatchDone) {
    use device_client::proto::{self, Uplink};
    let batch = &done.batch;
    for r in batch.records.iter().filter(|r| r.inserted) {
        let values = match proto::decode_uplink(batch.body(r)) {
            Ok(Uplink::Telemetry(t)) => crate::values::readings_to_json(&t.readings),
            _ => continue,
        };
        shared.publish(|| Event::Telemetry {
            device: device.clone(),
            boot_id: batch.boot_id,
            seq: r.seq,
            time_ms: r.time_ms,
            values,
        });
    }
}
