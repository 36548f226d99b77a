//! End-to-end: the operator HTTP API and WebSocket against a real gateway with real
//! devices (TLS, protocol, SQLite), driven by a real HTTP client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::{ApiClient as Api, RawDevice, TestGateway, answer_commands};
use futures_util::StreamExt;
use serde_json::{Value as Json, json};

#[tokio::test]
async fn every_route_needs_the_token() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let paths = [
        "/api/v1/devices",
        "/api/v1/devices/x",
        "/api/v1/devices/x/telemetry",
        "/api/v1/devices/x/commands",
        "/api/v1/commands/1",
        "/api/v1/groups",
        "/api/v1/groups/g",
        "/api/v1/refusals",
        "/api/v1/events",
        "/api/v1/openapi.json",
        "/metrics",
    ];
    for path in paths {
        let url = format!("{}{path}", api.base);
        let none = api.http.get(&url).send().await.unwrap();
        assert_eq!(none.status(), 401, "{path} without a token");
        assert_eq!(none.headers()["www-authenticate"], "Bearer");
        let body: Json = none.json().await.unwrap();
        assert_eq!(body["code"], "no_token");
        let wrong = api
            .http
            .get(&url)
            .bearer_auth("0123456789abcdef-wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path} with a wrong token");
    }
    // A POST too.
    let r = api
        .http
        .post(format!("{}/api/v1/devices/x/commands", api.base))
        .json(&json!({"name": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health and the dashboard page are open.
    let h = api
        .http
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(h.text().await.unwrap(), "ok");
    let page = api.http.get(&api.base).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<html"));
}

#[tokio::test]
async fn devices_telemetry_and_unknowns() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let (mut dev, _) = tg.device("meter-1", 5).await;
    for seq in 1..=3 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(3).await;

    let (s, list) = api.get("/api/v1/devices").await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["id"], "meter-1");
    assert_eq!(list[0]["online"], true);
    assert_eq!(list[0]["firmware"], "test-1.0");
    assert!(list[0]["cert_not_after"].as_i64().unwrap() > 0);
    assert!(
        list[0]["peer_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    // Each device comes with its newest record, so a list needs no request per device.
    assert_eq!(list[0]["latest"]["seq"], 3);
    assert_eq!(list[0]["latest"]["values"]["temp"], json!(3.0));
    assert!(list[0]["latest"]["boot_id"].is_string());

    let (s, one) = api.get("/api/v1/devices/meter-1").await;
    assert_eq!((s, &one["id"]), (200, &json!("meter-1")));
    assert_eq!(one["latest"]["seq"], 3);
    // A device that never sent telemetry has none.
    let (_quiet, _) = tg.device("meter-2", 6).await;
    let (_, two) = api.get("/api/v1/devices/meter-2").await;
    assert_eq!(two["latest"], Json::Null);

    let (s, t) = api.get("/api/v1/devices/meter-1/telemetry?limit=2").await;
    assert_eq!(s, 200);
    let seqs: Vec<i64> = t
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 2], "newest first, limited");
    assert_eq!(t[0]["values"]["temp"], json!(3.0));
    let since = t[0]["time_ms"].as_i64().unwrap() + 1;
    let (_, none) = api
        .get(&format!("/api/v1/devices/meter-1/telemetry?since={since}"))
        .await;
    assert_eq!(none, json!([]));

    for path in [
        "/api/v1/devices/nobody",
        "/api/v1/devices/nobody/telemetry",
        "/api/v1/devices/nobody/commands",
        "/api/v1/commands/999999",
        "/api/v1/groups/nogroup",
        "/api/v1/no/such/route",
    ] {
        let (s, body) = api.get(path).await;
        assert_eq!(s, 404, "{path}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let (s, _) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/devices/nobody/commands",
            json!({"name": "echo"}),
        )
        .await;
    assert_eq!(s, 404);
    let (s, body) = api.get("/api/v1/devices/bad%20id").await;
    assert_eq!((s, body["code"].as_str()), (400, Some("bad_device_id")));
}

#[tokio::test]
async fn command_round_trip_and_pending_commands() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let (dev, _) = tg.device("valve-7", 1).await;
    let responder = answer_commands(dev);

    let (s, done) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/devices/valve-7/commands",
            json!({"name": "echo", "args": {"text": "hello"}, "wait_s": 10}),
        )
        .await;
    assert_eq!(s, 200, "{done}");
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["result"], json!({"text": "hello"}));
    let id = done["id"].as_i64().unwrap();
    let (s, again) = api.get(&format!("/api/v1/commands/{id}")).await;
    assert_eq!((s, &again), (200, &done));

    // Unknown command: still a result, a failed one.
    let (s, failed) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/devices/valve-7/commands",
            json!({"name": "self_destruct", "wait_s": 10}),
        )
        .await;
    assert_eq!(
        (s, &failed["state"], &failed["status"]),
        (200, &json!("failed"), &json!("unknown_command"))
    );

    // The device goes away: a command waits (202) and says where to look.
    responder.abort();
    let _ = responder.await;
    e2e::eventually("device offline", || async {
        (!tg.gw.is_online("valve-7")).then_some(())
    })
    .await;
    let r = api
        .http
        .post(format!("{}/api/v1/devices/valve-7/commands", api.base))
        .bearer_auth(&api.token)
        .json(&json!({"name": "echo", "args": {"text": "later"}, "ttl_s": 60, "wait_s": 0.2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let pending: Json = r.json().await.unwrap();
    assert_eq!(pending["state"], "queued");
    assert_eq!(location, format!("/api/v1/commands/{}", pending["id"]));

    // Bad requests say why.
    for (body, code) in [
        (json!({"name": "bad name"}), "bad_command"),
        (json!({"name": "x", "args": [1]}), "bad_command"),
        (json!({"name": "x", "ttl_s": -1}), "bad_ttl"),
        (json!({"nam": "x"}), "bad_body"),
    ] {
        let (s, err) = api
            .send(
                reqwest::Method::POST,
                "/api/v1/devices/valve-7/commands",
                body,
            )
            .await;
        assert_eq!((s, err["code"].as_str()), (400, Some(code)), "{err}");
    }
}

#[tokio::test]
async fn group_commands_get_a_receipt_per_device() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let mut responders = Vec::new();
    for id in ["lamp-a", "lamp-b"] {
        let (dev, _) = tg.device(id, 1).await;
        responders.push(answer_commands(dev));
    }
    let (s, g) = api
        .send(
            reqwest::Method::PUT,
            "/api/v1/groups/lamps",
            json!({"devices": ["lamp-b", "lamp-a", "lamp-ghost", "lamp-a"]}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(g["devices"], json!(["lamp-a", "lamp-b", "lamp-ghost"]));
    let (_, all) = api.get("/api/v1/groups").await;
    assert_eq!(all[0]["name"], "lamps");

    let (s, out) = api
        .send(
            reqwest::Method::POST,
            "/api/v1/groups/lamps/commands",
            json!({"name": "echo", "args": {"text": "on"}, "wait_s": 10}),
        )
        .await;
    assert_eq!(s, 200);
    let receipts = out["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 3, "one per device: {out}");
    for r in &receipts[..2] {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["command"]["state"], "succeeded");
        assert_eq!(r["command"]["result"], json!({"text": "on"}));
    }
    assert_eq!(receipts[2]["device"], "lamp-ghost");
    assert_eq!(receipts[2]["status"], 404, "never seen: no such device");

    let (s, _) = api
        .send(
            reqwest::Method::PUT,
            "/api/v1/groups/bad%20name",
            json!({"devices": []}),
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn websocket_streams_live_telemetry_filtered_by_device() {
    use tokio_tungstenite::tungstenite::Message;
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let (mut a, _) = tg.device("ws-a", 1).await;
    let (mut b, _) = tg.device("ws-b", 1).await;
    let info = tg.gw.api().unwrap();
    let url = format!(
        "ws://{}/api/v1/events?token={}&device=ws-b&type=telemetry",
        info.addr, info.token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // The subscription is live once the upgrade completes; these come after it.
    a.telemetry(1).await.unwrap();
    b.telemetry(1).await.unwrap();
    b.telemetry(2).await.unwrap();
    a.wait_ack(1).await;
    b.wait_ack(2).await;
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(e2e::WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(text) = msg else { continue };
        let ev: Json = serde_json::from_str(&text).unwrap();
        assert_eq!(ev["type"], "telemetry");
        assert_eq!(ev["device"], "ws-b", "filtered to ws-b: {ev}");
        assert_eq!(ev["values"]["temp"], json!(ev["seq"].as_f64().unwrap()));
        seen.insert(ev["seq"].as_i64().unwrap());
    }
    assert_eq!(seen, BTreeSet::from([1, 2]));
    // Without a token the upgrade is refused.
    let bad = format!("ws://{}/api/v1/events", info.addr);
    assert!(tokio_tungstenite::connect_async(&bad).await.is_err());
    let _ = api;
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let (mut dev, _) = tg.device("counted-1", 1).await;
    for seq in 1..=4 {
        dev.telemetry(seq).await.unwrap();
    }
    dev.wait_ack(4).await;
    // One refused handshake: no client certificate.
    if let Ok(mut anon) = RawDevice::connect(tg.addr(), &tg.pki.ca, None).await {
        let _ = anon.recv().await;
    }
    e2e::eventually("the refusal to be counted", || async {
        (tg.gw.recent_refusals().len() == 1).then_some(())
    })
    .await;
    let text = api
        .http
        .get(format!("{}/metrics", api.base))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "gateway_sessions 1",
        "gateway_connections 1",
        "gateway_handshakes_ok_total 1",
        "gateway_telemetry_received_total 4",
        "gateway_telemetry_stored_total 4",
        "gateway_handshakes_refused_total{reason=\"no_client_cert\"} 1",
        "gateway_commands{state=\"queued\"} 0",
        "# TYPE gateway_ack_latency_seconds histogram",
        "# TYPE gateway_commit_latency_seconds histogram",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let (_, refusals) = api.get("/api/v1/refusals").await;
    assert_eq!(refusals[0]["reason"], "no_client_cert");
}

/// The OpenAPI document lists exactly the routes the router serves.
#[tokio::test]
async fn openapi_matches_the_routes() {
    let tg = TestGateway::start().await;
    let api = Api::new(&tg.gw);
    let (s, doc) = api.get("/api/v1/openapi.json").await;
    assert_eq!(s, 200);
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = gateway::testing::api_routes()
        .into_iter()
        .flat_map(|(path, methods, _)| {
            methods
                .iter()
                .map(move |m| (path.to_owned(), (*m).to_owned()))
        })
        .collect();
    assert_eq!(documented, served);
    // And each one is really routed: no 404/405 from the router itself.
    for (path, method) in &served {
        let concrete = path.replace("{id}", "1").replace("{name}", "g");
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = api
            .http
            .request(m, format!("{}{concrete}", api.base))
            .bearer_auth(&api.token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_ne!(r.status(), 405, "{method} {path}");
        let body: Json = r.json().await.unwrap_or(Json::Null);
        assert_ne!(body["code"], "no_route", "{method} {path}");
    }
    let _ = Duration::ZERO;
}
