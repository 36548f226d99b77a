//! End-to-end: what a new operator hits first (issue "The front door"): the everyday
//! API (pre-registered devices, cancelled commands, deleted groups and devices, paging,
//! export), JSON errors for every rejection, `last_seen_ms` that follows frames,
//! refused handshakes newest first with the certificate and kept across restarts, and
//! the data-directory lock. All against a real gateway with real devices.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;

use e2e::{ApiClient as Api, Down, RawDevice, TestGateway, eventually};
use gateway::Gateway;
use serde_json::{Value as Json, json};

/// `curl -d` labels a JSON body `application/x-www-form-urlencoded`, and the README's
/// examples use it: the body is what counts.
#[tokio::test]
async fn a_json_body_is_read_whatever_its_content_type() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    for content_type in ["application/x-www-form-urlencoded", "text/plain"] {
        let body = Some((content_type, r#"{"devices": ["a-1"]}"#.to_owned()));
        let (status, _, j) = api
            .call(reqwest::Method::PUT, "/api/v1/groups/g", body)
            .await;
        assert_eq!(status, 200, "{content_type}: {j}");
    }
    let body = Some(("application/json", "{not json".to_owned()));
    let (status, _, j) = api
        .call(reqwest::Method::PUT, "/api/v1/groups/g", body)
        .await;
    assert_eq!((status, j["code"].as_str()), (400, Some("bad_body")), "{j}");
}

/// Query strings, paths and methods that do not parse get the API's JSON error object,
/// and an unknown event type is refused instead of matching nothing forever.
#[tokio::test]
async fn every_rejection_is_a_json_error() {
    let tg = TestGateway::start().await;
    let (_dev, _) = tg.device("q-1", 1).await;
    let api = Api::new(&tg.gw);
    for (path, code) in [
        ("/api/v1/devices/q-1/telemetry?since=abc", "bad_query"),
        ("/api/v1/devices/q-1/telemetry?limit=0", "bad_query"),
        ("/api/v1/devices/q-1/telemetry?bogus=1", "bad_query"),
        ("/api/v1/devices?after=..%2F", "bad_query"),
        ("/api/v1/commands/abc", "bad_request"),
        ("/api/v1/nothing-here", "no_route"),
    ] {
        let (status, j) = api.get(path).await;
        let expected = if code == "no_route" { 404 } else { 400 };
        assert_eq!(status, expected, "{path}: {j}");
        assert_eq!(j["code"], code, "{path}: {j}");
        assert!(j["error"].as_str().is_some_and(|e| !e.is_empty()), "{j}");
    }
    let (status, _, j) = api
        .call(reqwest::Method::PATCH, "/api/v1/devices/q-1", None)
        .await;
    assert_eq!(
        (status, j["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // The event stream checks its filters before upgrading.
    let info = tg.gw.api().unwrap();
    for query in ["type=bogus", "typo=telemetry", "device=no%20spaces"] {
        let url = format!(
            "ws://{}/api/v1/events?token={}&{query}",
            info.addr, info.token
        );
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 400, "{query}");
                let body: Json = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["code"], "bad_query", "{query}: {body}");
            }
            Ok(_) => panic!("{query}: the stream was opened"),
            Err(e) => panic!("{query}: {e}"),
        }
    }
}

/// A device registered before it ever connected can be given commands; a queued
/// command can be cancelled (once; a sent one cannot), and the device never gets it.
#[tokio::test]
async fn preregistered_devices_get_commands_and_queued_commands_can_be_cancelled() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let put = reqwest::Method::PUT;
    let (status, j) = api.get("/api/v1/devices/new-1").await;
    assert_eq!((status, j["code"].as_str()), (404, Some("no_device")));
    let (status, j) = api
        .send(put.clone(), "/api/v1/devices/new-1", json!({}))
        .await;
    assert_eq!(status, 201, "{j}");
    assert_eq!(
        (j["id"].as_str(), j["online"].as_bool()),
        (Some("new-1"), Some(false))
    );
    let (status, _) = api.send(put, "/api/v1/devices/new-1", json!({})).await;
    assert_eq!(status, 200, "registering again is harmless");

    let post = |name: &'static str| {
        let api = &api;
        async move {
            let (status, j) = api
                .send(
                    reqwest::Method::POST,
                    "/api/v1/devices/new-1/commands",
                    json!({"name": name}),
                )
                .await;
            assert_eq!(status, 202, "{j}");
            assert_eq!(j["state"], "queued");
            j["id"].as_i64().unwrap()
        }
    };
    let keep = post("echo").await;
    let cancel = post("reboot").await;
    let cancel_path = format!("/api/v1/commands/{cancel}/cancel");
    let (status, j) = api
        .send(reqwest::Method::POST, &cancel_path, json!({}))
        .await;
    assert_eq!(
        (status, j["state"].as_str()),
        (200, Some("canceled")),
        "{j}"
    );
    let (status, j) = api
        .send(reqwest::Method::POST, &cancel_path, json!({}))
        .await;
    assert_eq!((status, j["code"].as_str()), (409, Some("too_late")), "{j}");
    let (status, j) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/commands/999999/cancel",
            json!({}),
        )
        .await;
    assert_eq!((status, j["code"].as_str()), (404, Some("no_command")));

    // The device connects: it gets the command that was kept, not the cancelled one.
    let (mut dev, _) = tg.device("new-1", 1).await;
    let first = loop {
        match dev.recv().await.unwrap() {
            Some(Down::Command { id, .. }) => break id,
            Some(_) => continue,
            None => panic!("the gateway closed the session"),
        }
    };
    assert_eq!(i64::from(first), keep);
    dev.ping(7).await.unwrap();
    loop {
        match dev.recv().await.unwrap() {
            Some(Down::Pong(_)) => break,
            Some(Down::Command { id, .. }) => panic!("cancelled command {id} was sent"),
            Some(_) => continue,
            None => panic!("closed"),
        }
    }
    // A sent command cannot be cancelled.
    let (status, j) = api
        .send(
            reqwest::Method::POST,
            &format!("/api/v1/commands/{keep}/cancel"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, j["command"]["state"].as_str()),
        (409, Some("sent")),
        "{j}"
    );
}

/// Groups and devices can be deleted; a connected device cannot.
#[tokio::test]
async fn groups_and_offline_devices_can_be_deleted() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let del = reqwest::Method::DELETE;
    let (status, _) = api
        .send(
            reqwest::Method::PUT,
            "/api/v1/groups/g1",
            json!({"devices": ["d-1"]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = api.call(del.clone(), "/api/v1/groups/g1", None).await;
    assert_eq!(status, 204);
    let (status, j) = api.get("/api/v1/groups/g1").await;
    assert_eq!((status, j["code"].as_str()), (404, Some("no_group")));
    let (status, _, j) = api.call(del.clone(), "/api/v1/groups/g1", None).await;
    assert_eq!((status, j["code"].as_str()), (404, Some("no_group")));

    let (mut dev, _) = tg.device("d-1", 1).await;
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;
    let (status, _, j) = api.call(del.clone(), "/api/v1/devices/d-1", None).await;
    assert_eq!(
        (status, j["code"].as_str()),
        (409, Some("device_online")),
        "{j}"
    );
    drop(dev);
    eventually("d-1 offline", || async {
        (!tg.gw.is_online("d-1")).then_some(())
    })
    .await;
    let (status, _, j) = api.call(del.clone(), "/api/v1/devices/d-1", None).await;
    assert_eq!(status, 204, "{j}");
    let (status, _) = api.get("/api/v1/devices/d-1").await;
    assert_eq!(status, 404);
    assert!(tg.stored("d-1").is_empty(), "its telemetry is gone");
}

/// 10,000 devices, a page at a time, by following `Link: rel="next"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_through_ten_thousand_devices() {
    let tg = TestGateway::start().await;
    let store = tg.gw.store().clone();
    // Registered concurrently: they share group commits.
    let tasks: Vec<_> = (0..10_000)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.register_device(&format!("p-{i:05}")).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    let api = Api::new(&tg.gw);
    let mut next = Some("/api/v1/devices?limit=1000".to_owned());
    let (mut seen, mut pages) = (Vec::new(), 0);
    while let Some(path) = next.take() {
        let (status, link, j) = api.call(reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{j}");
        let page = j.as_array().unwrap();
        assert!(page.len() <= 1000);
        seen.extend(page.iter().map(|d| d["id"].as_str().unwrap().to_owned()));
        pages += 1;
        next = link.map(|l| {
            assert!(l.ends_with(r#">; rel="next""#), "{l}");
            l.trim_start_matches('<')
                .split('>')
                .next()
                .unwrap()
                .to_owned()
        });
        assert!(pages <= 11, "paging does not end");
    }
    assert_eq!(seen.len(), 10_000);
    let unique: BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 10_000, "no device twice");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "by id");
    // The default page is 1,000.
    let (_, link, j) = api
        .call(reqwest::Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(j.as_array().unwrap().len(), 1000);
    assert!(link.is_some());
}

/// Telemetry pages with a cursor in both orders, and a time range exported as NDJSON
/// and CSV, oldest first.
#[tokio::test]
async fn telemetry_pages_and_exports_a_time_range() {
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("t-1", 1).await;
    for seq in 1..=25 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(25).await;
    let api = Api::new(&tg.gw);

    for order in ["newest", "oldest"] {
        let mut next = Some(format!(
            "/api/v1/devices/t-1/telemetry?limit=10&order={order}"
        ));
        let mut seqs = Vec::new();
        while let Some(path) = next.take() {
            let (status, link, j) = api.call(reqwest::Method::GET, &path, None).await;
            assert_eq!(status, 200, "{j}");
            seqs.extend(
                j.as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["seq"].as_u64().unwrap()),
            );
            next = link.map(|l| l[1..l.find('>').unwrap()].to_owned());
        }
        let mut expected: Vec<u64> = (1..=25).collect();
        if order == "newest" {
            expected.reverse();
        }
        assert_eq!(seqs, expected, "{order}");
    }

    // Everything, then a range that cuts it.
    let (status, all) = api.text("/api/v1/devices/t-1/telemetry/export").await;
    assert_eq!(status, 200);
    let rows: Vec<Json> = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 25);
    let seqs: Vec<u64> = rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=25).collect::<Vec<_>>(), "oldest first");
    // Records stored within one millisecond share a time: cut between two times.
    let times: Vec<i64> = rows
        .iter()
        .map(|r| r["time_ms"].as_i64().unwrap())
        .collect();
    let cut = times[10];
    let inside = times.iter().filter(|&&t| t >= cut).count();
    let (status, csv) = api
        .text(&format!(
            "/api/v1/devices/t-1/telemetry/export?since={cut}&format=csv"
        ))
        .await;
    assert_eq!(status, 200);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("device,boot_id,seq,time_ms,received_ms,name,value")
    );
    let body: Vec<&str> = lines.collect();
    assert_eq!(body.len(), inside, "one row per reading in the range");
    assert!(
        body.iter()
            .all(|l| l.starts_with("t-1,1,") && l.contains(",temp,"))
    );
    let (status, j) = api
        .get("/api/v1/devices/t-1/telemetry/export?format=xml")
        .await;
    assert_eq!((status, j["code"].as_str()), (400, Some("bad_query")));
}

/// `last_seen_ms` of a device online is its last frame, not its connect time.
#[tokio::test]
async fn last_seen_follows_every_frame() {
    let tg = TestGateway::start().await;
    let (mut dev, _) = tg.device("s-1", 1).await;
    let api = Api::new(&tg.gw);
    let (_, j) = api.get("/api/v1/devices/s-1").await;
    let connected = j["last_seen_ms"].as_i64().unwrap();
    // A frame sent in a later millisecond than the connect.
    let later = eventually("the clock to move", || async {
        let now = gateway::testing::now_ms();
        (now > connected + 5).then_some(now)
    })
    .await;
    dev.ping(1).await.unwrap();
    eventually("last_seen_ms to follow the ping", || async {
        let (_, j) = api.get("/api/v1/devices/s-1").await;
        (j["last_seen_ms"].as_i64().unwrap() >= later).then_some(())
    })
    .await;
    let (_, list) = api.get("/api/v1/devices").await;
    assert!(list[0]["last_seen_ms"].as_i64().unwrap() >= later);
}

/// Refused handshakes: newest first, with the certificate's subject and serial when
/// one was presented, and still there after a restart.
#[tokio::test]
async fn refusals_name_the_certificate_newest_first_and_survive_a_restart() {
    let mut tg = TestGateway::start().await;
    // First: a certificate from another CA.
    let stranger = certs::Ca::generate("someone else's CA", certs::Validity::days(1)).unwrap();
    let cert = stranger
        .issue_device("intruder-1", certs::Validity::days(1))
        .unwrap();
    let _ = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&cert)).await;
    // Then a revoked one (refused by the verifier too).
    let revoked = tg.pki.device("gone-1");
    tg.pki.revoke(&revoked);
    tg.gw.reload_tls().unwrap();
    let _ = RawDevice::connect(tg.addr(), &tg.pki.ca, Some(&revoked)).await;
    let api = Api::new(&tg.gw);
    let list = eventually("two refusals", || async {
        let (_, j) = api.get("/api/v1/refusals").await;
        (j.as_array().unwrap().len() >= 2).then_some(j)
    })
    .await;
    assert_eq!(list[0]["reason"], "revoked", "newest first: {list}");
    assert!(
        list[0]["subject"].as_str().unwrap().contains("gone-1"),
        "{list}"
    );
    let serial = revoked.serial.to_hex().to_lowercase();
    assert_eq!(list[0]["serial"], serial);
    assert_eq!(list[1]["reason"], "unknown_issuer", "{list}");
    assert!(list[1]["subject"].as_str().unwrap().contains("intruder-1"));

    // Restarted on the same data directory: still there.
    tg.gw.shutdown().await;
    let gw = Gateway::start(tg.pki.config(tg.data.path())).await.unwrap();
    let (_, again) = Api::new(&gw).get("/api/v1/refusals").await;
    assert_eq!(again[0]["subject"], list[0]["subject"], "{again}");
    assert_eq!(again[1]["reason"], "unknown_issuer");
    gw.shutdown().await;
}

/// A second gateway on the same data directory refuses to start and names the first.
#[tokio::test]
async fn a_second_gateway_on_the_same_data_dir_refuses_to_start() {
    let tg = TestGateway::start().await;
    let second = Gateway::start(tg.pki.config(tg.data.path())).await;
    let err = match second {
        Ok(_) => panic!("a second gateway started on the same data directory"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use by another gateway"), "{err}");
    assert!(
        err.contains(&format!("process {}", std::process::id())),
        "{err}"
    );
    // The first is unharmed, and once it stops the directory is free.
    let (mut dev, _) = tg.device("l-1", 1).await;
    dev.telemetry(1).await.unwrap();
    dev.wait_ack(1).await;
    tg.gw.shutdown().await;
    let third = Gateway::start(tg.pki.config(tg.data.path())).await.unwrap();
    third.shutdown().await;
}
