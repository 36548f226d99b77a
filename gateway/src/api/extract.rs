//! What every handler shares: the token check, JSON bodies and query strings read
//! into types, and errors as the API's JSON error object.

use super::*;

pub(super) async fn require_token(
    State(ApiState(api)): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Browsers cannot set headers on a WebSocket: the events stream takes ?token=.
    let from_query = (req.uri().path() == "/api/v1/events")
        .then(|| req.uri().query().and_then(query_token))
        .flatten();
    match bearer.or(from_query.as_deref()) {
        Some(t) if token::matches(t, &api.token) => next.run(req).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "bad_token",
            "the token is not valid",
        ),
        None => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "no_token",
                "send Authorization: Bearer <token> (the token is in DATA_DIR/api-token)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

pub(super) fn query_token(q: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
}

/// An API error: status, a stable machine-readable code, a message for people. Sent as
/// `{"error": message, "code": code}`.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": self.message, "code": self.code})),
        )
            .into_response()
    }
}

pub(super) fn api_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

/// A JSON error response.
pub(super) fn error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response {
    api_error(status, code, message).into_response()
}

/// A JSON request body, whatever its `Content-Type` says: the body is what counts
/// (`curl -d` labels JSON as a form). Safe to be lenient: every route needs the
/// bearer token, which a browser sends cross-site only after a CORS preflight that
/// this API never allows.
pub(super) struct JsonBody<T>(pub(super) T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| api_error(e.status(), "bad_body", e.body_text()))?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            api_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("the body is not the JSON this route takes: {e}"),
            )
        })
    }
}

/// Query parameters, refused with the JSON error object (`bad_query`) when they do not
/// parse or are unknown (the structs deny unknown fields).
pub(super) struct Params<T>(pub(super) T);

impl<T, S> axum::extract::FromRequestParts<S> for Params<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map(Params)
            .map_err(|e| bad_query(format!("query string: {e}")))
    }
}

pub(super) fn bad_query(message: impl Into<String>) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "bad_query", message)
}

/// Gives every error response the JSON error object, including those made outside
/// the handlers (a path that does not parse, a wrong method, a body too large).
pub(super) async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.trim().to_owned()
    };
    let code = match status {
        StatusCode::NOT_FOUND => "no_route",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let mut out = error(status, code, message);
    for name in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// A `Link: <...>; rel="next"` header for the next page.
pub(super) fn next_link(mut r: Response, next: Option<String>) -> Response {
    if let Some(next) = next
        && let Ok(v) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\""))
    {
        r.headers_mut().insert(header::LINK, v);
    }
    r
}

pub(super) fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store failure in the API");
    api_error(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
}

pub(super) fn valid_id(id: &str) -> Result<(), ApiError> {
    DeviceId::new(id)
        .map(|_| ())
        .map_err(|e| api_error(StatusCode::BAD_REQUEST, "bad_device_id", e.to_string()))
}

pub(super) async fn known_device(api: &Api, id: &str) -> Result<(), ApiError> {
    valid_id(id)?;
    match api.gw.device(id).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(api_error(
            StatusCode::NOT_FOUND,
            "no_device",
            format!("no device {id:?}"),
        )),
        Err(e) => Err(store_error(e)),
    }
}
