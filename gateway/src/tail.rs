//! `gateway events`: a client of the gateway's own event stream (the WebSocket at
//! `/api/v1/events`), printing one JSON object per line, so that tailing events needs
//! no tool beyond the gateway itself.

use std::io::Write;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::{self, Message};

/// Which events to ask for (empty: all).
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Devices.
    pub devices: Vec<String>,
    /// Groups (their devices).
    pub groups: Vec<String>,
    /// Event types: `telemetry`, `presence`, `command`, `handshake_refused`, `desired`,
    /// `reported`.
    pub types: Vec<String>,
}

/// Why the stream could not be followed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TailError {
    /// The gateway answered the request with an error (a bad token, a bad filter).
    #[error("the gateway refused the stream: {status} {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// Its JSON error object.
        body: String,
    },
    /// The connection failed or broke.
    #[error("{api}: {source}")]
    Connection {
        /// The API's address.
        api: String,
        /// Why.
        source: Box<tungstenite::Error>,
    },
}

/// Writes the events of the gateway at `api` (`http://HOST:PORT`) that pass `filter`
/// to `out`, one per line, until `count` were written, the gateway closes the stream,
/// `out` is closed (a pipe to `head`), or Ctrl-C.
pub async fn events(
    api: &str,
    token: &str,
    filter: &Filter,
    count: Option<u64>,
    out: &mut impl Write,
) -> Result<u64, TailError> {
    let base = api
        .trim_end_matches('/')
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let mut query = vec![("token", token)];
    query.extend(filter.devices.iter().map(|d| ("device", d.as_str())));
    query.extend(filter.groups.iter().map(|g| ("group", g.as_str())));
    query.extend(filter.types.iter().map(|t| ("type", t.as_str())));
    let query = serde_urlencoded::to_string(&query).unwrap_or_default();
    let url = format!("{base}/api/v1/events?{query}");
    let broken = |source| TailError::Connection {
        api: api.to_owned(),
        source: Box::new(source),
    };
    let mut ws = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Err(TailError::Refused {
                status: resp.status().as_u16(),
                body,
            });
        }
        Err(e) => return Err(broken(e)),
    };
    // On stderr, so that stdout stays JSON lines: a script can start this, wait for
    // the line, and then cause the events it wants to see.
    eprintln!("gateway events: subscribed to {api}");
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = tokio::signal::ctrl_c() => break,
        };
        match msg {
            Some(Ok(Message::Text(t))) => {
                seen += 1;
                if writeln!(out, "{}", t.as_str())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    break;
                }
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(broken(e)),
        }
    }
    let _ = ws.close(None).await;
    Ok(seen)
}
