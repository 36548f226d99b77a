//! The pair cases: each a rule of PROTOCOL.md §8 that takes both sides to show.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use super::*;

#[test]
fn records_are_acked_and_leave_the_ring() {
    let mut p = Pair::new();
    p.connect();
    assert!(matches!(
        p.events[0],
        Event::Connected {
            last_acked: None,
            ..
        }
    ));
    let seqs = p.send(20);
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    p.pump();
    assert_eq!(p.stored(), seqs);
    assert_eq!(p.dev.unacked(), Unacked::default());
    assert_eq!(p.dev.acked(), Some(20));
}

/// A record is acknowledged only by the commit that holds it: nothing before, and a
/// commit's ack never covers records that arrived while it ran.
#[test]
fn acks_follow_commits_and_never_run_ahead_of_them() {
    let mut p = Pair::new();
    p.auto_commit = false;
    p.connect();
    p.send(5);
    p.pump();
    // (The writer may have committed already; the session acts on its answer.)
    assert_eq!(p.dev.acked(), None, "no ack before the commit's outcome");
    assert_eq!(p.dev.unacked().records, 5);
    // More records arrive while the first batch is at the store.
    p.send(3);
    p.pump();
    p.commit();
    p.pump();
    assert_eq!(
        p.dev.acked(),
        Some(5),
        "the ack covers the first commit only"
    );
    assert_eq!(p.dev.unacked().records, 3);
    p.commit();
    p.pump();
    assert_eq!(p.stored(), (1..=8).collect::<Vec<_>>());
    assert_eq!(p.dev.acked(), Some(8));
    assert_eq!(p.dev.unacked(), Unacked::default());
}

/// The gateway stored the records but its ack was lost with the connection: the next
/// `Welcome.last_acked` settles them, and nothing is sent twice.
#[test]
fn lost_acks_are_settled_by_welcome_last_acked() {
    let mut p = Pair::new();
    p.connect();
    p.link.as_mut().unwrap().down = false;
    p.send(5);
    p.pump();
    assert_eq!(p.stored(), vec![1, 2, 3, 4, 5]);
    assert_eq!(p.dev.unacked().records, 5, "nothing acked: all kept");
    p.dev.handle_closed(p.t);
    p.device_closed();
    p.connect();
    assert!(p.events.iter().any(|e| matches!(
        e,
        Event::Connected {
            last_acked: Some(5),
            ..
        }
    )));
    assert_eq!(p.dev.unacked().records, 0, "Welcome.last_acked frees them");
    assert_eq!(p.sent[1], Vec::<Seq>::new(), "no replay of stored records");
    p.send(1);
    p.pump();
    assert_eq!(p.stored(), vec![1, 2, 3, 4, 5, 6]);
}

/// The link breaks in the middle of a record: the gateway commits the whole records
/// it had, the device replays the rest once.
#[test]
fn reconnect_mid_batch_replays_the_rest_once() {
    let mut p = Pair::new();
    p.connect();
    p.send(10);
    // Each record frame is 10 bytes here: the link breaks inside record 5.
    p.pump_limited(10 * 4 + 3);
    assert!(!p.dev.is_connected());
    assert!(matches!(p.gateway_end(), Some(End::PeerClosed)));
    assert_eq!(p.stored(), vec![1, 2, 3, 4], "whole records only");
    p.connect();
    assert_eq!(
        p.sent[1],
        (5..=10).collect::<Vec<_>>(),
        "5..=10 replayed once"
    );
    assert_eq!(p.stored(), (1..=10).collect::<Vec<_>>());
    assert_eq!(p.dev.unacked().records, 0);
}

/// A device that lost its ring and reused its boot id (a bug, or a crash of its own)
/// sends stored seqs again: they are acknowledged, not stored twice (PROTOCOL.md §8.2).
#[test]
fn replays_of_stored_records_are_acked_and_not_stored_twice() {
    let mut p = Pair::new();
    p.connect();
    p.send(4);
    p.pump();
    assert_eq!(p.stored(), vec![1, 2, 3, 4]);
    p.dev.handle_closed(p.t);
    p.device_closed();
    let mut cfg = Config::new(0xb007, "test-fw");
    cfg.jitter_seed = 7;
    p.dev = Client::new(cfg);
    p.events.clear();
    p.connect();
    // Only stored records: they are acknowledged all the same (one Ack).
    p.send(4);
    p.pump();
    assert_eq!(p.dev.acked(), Some(4), "replays alone are acknowledged");
    assert_eq!(p.dev.unacked(), Unacked::default());
    p.send(2);
    p.pump();
    assert_eq!(p.sent[1], vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(
        p.stored(),
        (1..=6).collect::<Vec<_>>(),
        "1..=4 not stored twice"
    );
    assert_eq!(p.dev.acked(), Some(6));
    assert_eq!(p.dev.unacked(), Unacked::default());
}

/// The device reconnects while its old connection is still open at the gateway, with
/// records at the store: the old session commits them before the new one opens, so
/// `Welcome.last_acked` counts them and the device sends none again.
#[test]
fn a_takeover_waits_for_the_old_sessions_commit() {
    let mut p = Pair::new();
    p.auto_commit = false;
    p.connect();
    p.send(5);
    p.pump();
    assert_eq!(p.dev.acked(), None);
    // The network drops the connection silently; the device notices first.
    let mut old = p.link.take().unwrap();
    old.up = false;
    old.down = false;
    p.stale = Some(old);
    p.dev.handle_closed(p.t);
    p.auto_commit = true;
    p.connect();
    let (end, last) = &p.ended[0];
    assert!(matches!(end, End::Goodbye(GoodbyeReason::Replaced)));
    // Told why, then (as it drains) the ack of what it committed: too late for a
    // device that stopped reading at the Goodbye, and harmless.
    assert_eq!(
        downlinks(last),
        vec!["Goodbye(replaced, 5)", "Ack(Ack { seq: 5 })"]
    );
    assert!(p.events.iter().any(|e| matches!(
        e,
        Event::Connected {
            last_acked: Some(5),
            ..
        }
    )));
    assert_eq!(p.sent[1], Vec::<Seq>::new(), "nothing sent twice");
    assert_eq!(p.stored(), vec![1, 2, 3, 4, 5]);
    assert_eq!(p.dev.unacked(), Unacked::default());
}

/// A quiet session stays open on heartbeats alone; silence is detected on both sides:
/// the device within two heartbeats of its last frame from the gateway, the gateway
/// within three.
#[test]
fn heartbeats_keep_a_quiet_session_and_silence_ends_it_on_both_sides() {
    let mut p = Pair::new();
    p.connect();
    p.advance_to(20 * HB);
    assert!(p.dev.is_open(), "ten heartbeats of quiet: still open");
    assert!(p.link.is_some(), "and the gateway still holds it");
    let pongs = p
        .events
        .iter()
        .filter(|e| matches!(e, Event::Pong { .. }))
        .count();
    assert!(pongs >= 19, "a ping per heartbeat answered: {pongs}");

    // Nothing from the device reaches the gateway any more, nor the other way.
    let cut = p.t;
    let link = p.link.as_mut().unwrap();
    link.up = false;
    link.down = false;
    let mut device_gone = None;
    let mut gateway_gone = None;
    while (device_gone.is_none() || gateway_gone.is_none()) && p.t < cut + 10 * HB {
        p.advance_to(p.t + 1000);
        if device_gone.is_none() && !p.dev.is_connected() {
            device_gone = Some(p.t - cut);
        }
        if gateway_gone.is_none() && p.link.is_none() {
            gateway_gone = Some(p.t - cut);
        }
    }
    let (device_gone, gateway_gone) = (device_gone.unwrap(), gateway_gone.unwrap());
    assert!(
        device_gone <= 2 * HB,
        "device noticed after {device_gone} ms"
    );
    assert!(
        gateway_gone <= 3 * HB,
        "gateway noticed after {gateway_gone} ms"
    );
    assert_eq!(p.disconnects(), vec![Disconnect::DeadPeer]);
    assert!(matches!(
        p.gateway_end(),
        Some(End::Goodbye(GoodbyeReason::IdleTimeout))
    ));
}

/// A `Goodbye` tells the device when to come back, and it does not come sooner; a
/// revoked device never comes back.
#[test]
fn retry_after_is_obeyed_and_revoked_is_final() {
    let mut p = Pair::new();
    p.connect();
    let end = p.link.as_mut().unwrap().gw.close(GoodbyeReason::Shutdown);
    p.gateway_ended(end);
    let at = p.dev.poll_connect().unwrap();
    assert!(
        at >= p.t + 5_000,
        "retry-after 5 s is obeyed: {at} at {}",
        p.t
    );
    assert_eq!(
        p.disconnects(),
        vec![Disconnect::Goodbye {
            reason: GoodbyeReason::Shutdown,
            retry_after_s: 5
        }]
    );

    p.connect();
    let end = p.link.as_mut().unwrap().gw.close(GoodbyeReason::Revoked);
    p.gateway_ended(end);
    assert_eq!(p.dev.poll_connect(), None, "never reconnects");
    assert!(matches!(
        p.events.last(),
        Some(Event::Disconnected {
            reconnect_at: None,
            ..
        })
    ));
    // Telemetry still queues (the application may hold on to it).
    assert!(p.send_one().is_ok());
}

/// A command whose result was lost goes out again on the next session; the device
/// does not run it twice but answers again, and the store records one result.
#[test]
fn commands_are_run_once_and_their_result_recorded_once() {
    let mut p = Pair::new();
    p.connect();
    let id = p.enqueue("echo");
    assert_eq!(p.commands.len(), 1);
    let wire = p.commands[0];
    assert_eq!(p.command(id).state, CommandState::Sent);
    // The result is lost on the way: the link from the device breaks.
    p.link.as_mut().unwrap().up = false;
    let v = Reading::new(Name::new("echo").unwrap(), Value::str("hi").unwrap());
    p.dev
        .complete_command(wire, CommandStatus::Succeeded, &[v])
        .unwrap();
    assert_eq!(
        p.dev.complete_command(wire, CommandStatus::Failed, &[]),
        Err(CompleteError::NotRunning),
        "a result is given once"
    );
    p.pump();
    assert_eq!(p.command(id).state, CommandState::Sent, "not recorded yet");
    p.dev.handle_closed(p.t);
    let mut old = p.link.take().unwrap();
    old.down = false;
    p.stale = Some(old);

    p.connect();
    assert_eq!(p.commands, vec![wire], "sent again, not run again");
    let rec = p.command(id);
    assert_eq!(rec.state, CommandState::Succeeded);
    assert_eq!(rec.status.as_deref(), Some("succeeded"));
    assert_eq!(rec.attempts, 2);
}

/// A command larger than the device's announced frame limit is not sent: it fails in
/// the store with the reason, and the next command still goes out.
#[test]
fn a_command_over_the_device_frame_limit_fails_with_the_reason() {
    let mut p = Pair::with(Config::new(0xb007, "test-fw").with_frames(128, 512));
    p.connect();
    let big: crate::values::OwnedReadings = (0..2)
        .map(|i| {
            (
                format!("blob{i}"),
                crate::values::OwnedValue::Bytes(vec![7; 100]),
            )
        })
        .collect();
    let id = p.enqueue_with("flash", big);
    assert!(p.commands.is_empty(), "nothing reached the device");
    let rec = p.command(id);
    assert_eq!(rec.state, CommandState::Failed);
    let error = rec.error.unwrap_or_default();
    assert!(
        error.contains("the device accepts frames of up to 128 bytes"),
        "{error}"
    );
    let next = p.enqueue("echo");
    assert_eq!(p.commands.len(), 1);
    assert_eq!(p.command(next).state, CommandState::Sent);
}

/// A result for a command not in flight on this session (never sent, or answered
/// already) is ignored without touching the store.
#[test]
fn results_of_commands_not_in_flight_are_ignored() {
    let mut p = Pair::new();
    p.connect();
    let id = p.enqueue("echo");
    let wire = p.commands[0];
    p.dev
        .complete_command(wire, CommandStatus::Succeeded, &[])
        .unwrap();
    p.pump();
    let first = p.command(id);
    assert_eq!(first.state, CommandState::Succeeded);
    // The same result again, and one for an id never sent, straight from the wire.
    let now = p.now();
    let link = p.link.as_mut().unwrap();
    let mut frames = Vec::new();
    for cid in [wire, wire.wrapping_add(1000)] {
        let mut buf = [0u8; 64];
        let n = proto::encode(
            &Uplink::CommandResult(proto::CommandResult {
                id: cid,
                status: CommandStatus::Failed,
                values: proto::Readings::new(),
            }),
            &mut buf,
        )
        .unwrap();
        frames.extend_from_slice(&buf[..n]);
    }
    let fed = link.gw.handle_bytes(now, &frames).unwrap();
    assert_eq!((fed.results.len(), fed.ignored_results), (0, 2));
    assert_eq!(p.command(id), first, "unchanged");
}

#[test]
fn a_full_ring_is_delivered_in_order_once_connected() {
    let mut p = Pair::new();
    let mut sent = 0;
    while p.send_one().is_ok() {
        sent += 1;
    }
    p.connect();
    assert_eq!(p.stored(), (1..=sent as Seq).collect::<Vec<_>>());
    assert!(p.send_one().is_ok(), "room again");
}

#[test]
fn records_wait_while_disconnected_and_go_in_order() {
    let mut p = Pair::new();
    p.send(3);
    p.connect();
    p.send(2);
    p.pump();
    assert_eq!(p.sent, vec![vec![1, 2, 3, 4, 5]]);
    assert_eq!(p.stored(), vec![1, 2, 3, 4, 5]);
}

/// A full batch waiting for its commit pauses reading; the commit resumes it, and
/// every record is stored once, in order.
#[test]
fn reading_pauses_while_a_full_batch_waits_for_its_commit() {
    let mut p = Pair::new();
    p.rules = Arc::new(Rules {
        max_pending_records: 4,
        ..(*p.rules).clone()
    });
    p.auto_commit = false;
    p.connect();
    p.send(4);
    p.pump();
    // The first batch is at the store; four more fill the next one, two wait.
    p.send(6);
    p.pump();
    let link = p.link.as_ref().unwrap();
    assert!(!link.gw.wants_input());
    assert_eq!(link.held.len(), 2 * 10, "two records not read");
    p.commit();
    p.pump();
    assert!(
        p.link.as_ref().unwrap().held.is_empty(),
        "read after the commit"
    );
    p.commit();
    p.pump();
    p.commit();
    p.pump();
    assert_eq!(p.stored(), (1..=10).collect::<Vec<_>>());
    assert_eq!(p.dev.acked(), Some(10));
}

/// A revoked device's records that wait for a commit are dropped, not stored: only
/// what was already at the store is kept (and acked while the session drains).
#[test]
fn a_revoked_session_keeps_nothing_more() {
    let mut p = Pair::new();
    p.auto_commit = false;
    p.connect();
    p.send(3);
    p.pump();
    p.send(2);
    p.pump();
    let end = p.link.as_mut().unwrap().gw.close(GoodbyeReason::Revoked);
    p.gateway_ended(end);
    assert_eq!(p.stored(), vec![1, 2, 3], "4 and 5 were waiting: dropped");
    assert_eq!(p.dev.poll_connect(), None);
}
