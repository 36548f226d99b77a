//! The pair cases of the state document (protocol version 2, PROTOCOL.md §5.3, §8.6).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use serde_json::json;

use super::*;

fn reconnect(p: &mut Pair) {
    p.dev.handle_closed(p.t);
    p.device_closed();
    p.connect();
}

/// An operator's setting reaches an online device at once; the device applies it and
/// reports it, and the store shows it in sync.
#[test]
fn a_desired_setting_reaches_the_device_and_comes_back_reported() {
    let mut p = Pair::new();
    p.connect();
    assert!(matches!(p.events[0], Event::Connected { version: 3, .. }));
    // Right after `Welcome` the device says what it holds: nothing.
    assert_eq!(p.reports, vec![(0, 0)]);
    assert!(p.desired.is_empty(), "nothing desired yet, nothing sent");

    let v = p.put_desired(json!({"interval_s": 10, "mode": "eco"}));
    assert_eq!(v, 1);
    assert_eq!(
        p.desired,
        vec![(
            1,
            0,
            vec![
                "set interval_s=U64(10)".to_string(),
                "set mode=Str(\"eco\")".to_string()
            ]
        )]
    );
    assert_eq!(p.dev.desired_version(), 1);
    assert_eq!(
        p.reports.last(),
        Some(&(1, 2)),
        "the values come back reported"
    );
    let s = p.state();
    assert_eq!(s.desired_version, 1);
    assert_eq!(s.reported_version, Some(1));
    assert!(s.in_sync);
    assert_eq!(
        serde_json::Value::Object(s.reported),
        json!({"interval_s": 10, "mode": "eco"})
    );
    // Telemetry is unaffected.
    p.send(3);
    p.pump();
    assert_eq!(p.stored(), vec![1, 2, 3]);
}

/// A device that was away gets only what changed since the version it holds.
#[test]
fn a_reconnecting_device_gets_only_the_changes_since_its_version() {
    let mut p = Pair::new();
    p.connect();
    p.put_desired(json!({"a": 1, "b": 2, "c": 3}));
    assert_eq!(p.dev.desired_version(), 1);
    p.link.as_mut().unwrap().up = false;
    p.link.as_mut().unwrap().down = false;
    p.dev.handle_closed(p.t);
    p.gateway_ended(End::PeerClosed);
    // Offline: two changes.
    p.put_desired(json!({"b": 20}));
    p.put_desired(json!({"c": null}));
    assert_eq!(p.desired.len(), 1, "nothing reaches an offline device");
    p.connect();
    assert_eq!(
        p.desired.last().unwrap(),
        &(
            3,
            1,
            vec!["set b=U64(20)".to_string(), "unset c".to_string()]
        )
    );
    assert!(p.state().in_sync);
    // Up to date: the next session sends nothing.
    reconnect(&mut p);
    assert_eq!(p.desired.len(), 2);
}

/// A device that rebooted without keeping its settings holds version 0 and gets the
/// whole document.
#[test]
fn a_device_without_its_settings_gets_the_whole_document() {
    let mut p = Pair::new();
    p.connect();
    p.put_desired(json!({"a": 1}));
    p.put_desired(json!({"b": 2}));
    p.dev.set_desired_version(0);
    reconnect(&mut p);
    assert_eq!(
        p.desired.last().unwrap(),
        &(
            2,
            0,
            vec!["set a=U64(1)".to_string(), "set b=U64(2)".to_string()]
        )
    );
}

/// Changes based on a version the device does not hold are not applied: the device
/// reports version 0 and the gateway answers with the whole document.
#[test]
fn changes_to_a_version_the_device_does_not_hold_are_replaced_by_the_whole_document() {
    let mut p = Pair::new();
    p.connect();
    p.put_desired(json!({"a": 1}));
    // The device's memory of its version is wrong (say, restored from a bad flash).
    p.dev.set_desired_version(7);
    p.put_desired(json!({"b": 2}));
    assert_eq!(
        p.desired.last().unwrap(),
        &(
            2,
            0,
            vec!["set a=U64(1)".to_string(), "set b=U64(2)".to_string()]
        ),
        "the delta based on 1 was refused, the whole document applied"
    );
    assert!(
        p.reports.contains(&(0, 0)),
        "the device asked with version 0"
    );
    assert_eq!(p.dev.desired_version(), 2);
    assert!(p.state().in_sync);
}

/// A gateway that speaks version 1 only (`max_protocol_version = 1`): a version 2
/// device works as a version 1 device; it reports nothing and is sent nothing.
#[test]
fn a_version_2_device_works_with_a_version_1_gateway() {
    let mut p = Pair::new().gateway_version(1);
    p.dev
        .report_state(&[Reading::new(Name::new("x").unwrap(), Value::U64(1))])
        .unwrap();
    p.connect();
    assert!(matches!(p.events[0], Event::Connected { version: 1, .. }));
    assert_eq!(p.dev.session_version(), Some(1));
    assert!(p.reports.is_empty(), "no Reported in a version 1 session");
    p.put_desired(json!({"a": 1}));
    assert!(p.desired.is_empty());
    p.send(2);
    p.pump();
    assert_eq!(p.stored(), vec![1, 2]);
    assert!(
        p.gateway_end().is_none(),
        "no violation: the session lives on"
    );
    assert_eq!(
        p.dev.pending_results(),
        0,
        "the report was dropped, not kept"
    );
}

/// A device that needs version 2 refuses a version 1 gateway, with a fatal reason:
/// it does not reconnect.
#[test]
fn a_device_requiring_version_2_refuses_a_version_1_gateway() {
    let mut p = Pair::with(Config::new(0xb007, "test-fw").with_min_version(2)).gateway_version(1);
    p.connect();
    assert_eq!(p.disconnects(), vec![Disconnect::UnsupportedVersion(1)]);
    assert!(Disconnect::UnsupportedVersion(1).is_fatal());
    assert_eq!(p.dev.poll_connect(), None, "no reconnect");
}
