//! Routing and the HTTP edge: client keys, body and content-type limits, Anthropic-shaped
//! errors with `request-id`, and the small endpoints (`/health`, `/metrics`, `/v1/models`,
//! `/v1/messages/count_tokens`).

use super::App;
use super::body::Body;
use super::messages::{self, Exchange};
use super::work::Admission;
use crate::anthropic::request::{self as areq, ApiVersion, Endpoint};
use crate::anthropic::{ApiError, ErrorKind};
use crate::keys::{Caller, Keys};
use crate::translate::tokens;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::full(serde_json::to_vec(v).expect("JSON values serialise")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The error response: Anthropic's JSON shape, `retry-after`, `x-should-retry`.
pub fn error_response(e: &ApiError, request_id: &str) -> Response<Body> {
    let mut r = json_response(e.status(), &e.body(request_id));
    let h = r.headers_mut();
    if let Some(d) = e.retry_after {
        let secs = d.as_secs().max(1);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        h.insert("retry-after-ms", HeaderValue::from(d.as_millis().max(1) as u64));
    }
    h.insert("x-should-retry", HeaderValue::from_static(if e.should_retry() { "true" } else { "false" }));
    r
}

fn presented_key(req: &http::request::Parts) -> Option<&str> {
    api_key_header(req).or_else(|| bearer(req))
}

fn api_key_header(req: &http::request::Parts) -> Option<&str> {
    req.headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

fn bearer(req: &http::request::Parts) -> Option<&str> {
    let auth = req.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The key's short fingerprint for the access log (never the key).
fn key_tag(req: &http::request::Parts) -> String {
    presented_key(req).map(|k| crate::hash::fingerprint_of(k.as_bytes())).unwrap_or_else(|| "-".into())
}

/// Who sent the request (named key, unnamed key, anonymous), or the 401.
fn identify(app: &App, req: &http::request::Parts) -> Result<Caller, ApiError> {
    let auth = app.auth.read().unwrap_or_else(|e| e.into_inner());
    match (api_key_header(req), bearer(req)) {
        // Both sent (the SDKs do, with both ANTHROPIC_API_KEY and ANTHROPIC_AUTH_TOKEN set):
        // either may be this server's key.
        (Some(key), Some(token)) => app
            .keys
            .identify(&auth, Some(key))
            .or_else(|e| app.keys.identify(&auth, Some(token)).map_err(|_| e)),
        (key, token) => app.keys.identify(&auth, key.or(token)),
    }
}

/// Reads a body of at most `max` bytes, then waits for its share of the body budget.
async fn read_body(
    app: &App,
    parts: &http::request::Parts,
    body: Incoming,
    max: u64,
) -> Result<(Bytes, Admission), ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::RequestTooLarge,
            format!("Request exceeds the maximum allowed size ({max} bytes)"),
        )
    };
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| ApiError::invalid("Content-Length is not a number"))?;
        if len > max {
            return Err(too_large());
        }
    }
    match parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(ct) if ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") => {}
        Some(ct) => {
            return Err(ApiError::invalid(format!("Content-Type must be application/json, not {ct:?}")));
        }
        None => return Err(ApiError::invalid("Content-Type must be application/json")),
    }
    // A compressed body would be read as broken JSON: say what is wrong instead.
    if let Some(enc) = parts.headers.get(header::CONTENT_ENCODING) {
        let enc = String::from_utf8_lossy(enc.as_bytes());
        if !enc.trim().eq_ignore_ascii_case("identity") {
            return Err(ApiError::invalid(format!(
                "Content-Encoding {enc:?} is not supported: send the request body uncompressed"
            ))
            .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        }
    }
    let limited = http_body_util::Limited::new(body, max as usize);
    let timeout = app.config.server.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => {
            Err(ApiError::invalid(format!("the request body did not arrive within {} s", timeout.as_secs()))
                .with_status(StatusCode::REQUEST_TIMEOUT))
        }
        Ok(Err(e)) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Err(too_large())
            } else {
                Err(ApiError::invalid(format!("the request body could not be read: {e}")))
            }
        }
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }?;
    let admission = app.work.admit(bytes.len()).await?;
    Ok((bytes, admission))
}

/// A request's record while `handle` runs: when the client goes away first (hyper drops the
/// handler), its `Drop` writes the access line, metrics and usage under 499, charged for what
/// the answer used so far (as a stream left early is, in `messages::StreamEnd`). Before, a
/// non-streaming request whose client left was neither logged nor counted: its tokens and
/// credits escaped the key's budgets.
struct Left {
    app: Arc<App>,
    request_id: String,
    started: Instant,
    x: Exchange,
    /// `handle` got to its end (it logged the request, or a stream will).
    done: bool,
}

impl Drop for Left {
    fn drop(&mut self) {
        if self.done || !self.x.messages {
            return;
        }
        self.app.metrics.request(self.x.model_label(), 499);
        // Tokens only when an account answered (as usage, in `access_log`).
        if self.x.account.is_some() {
            self.app.metrics.tokens(self.x.model_label(), self.x.tokens_in, self.x.tokens_out);
            if let Some(c) = self.x.credits {
                self.app.metrics.credits(self.x.model_label(), c);
            }
        }
        self.app.metrics.request_duration(self.started.elapsed());
        super::access_log(&self.app, &self.request_id, &self.x, 499, self.started);
    }
}

/// Serves one request. Never panics on input; every error is Anthropic-shaped.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request_id = crate::ids::prefixed("req_");
    let (parts, body) = req.into_parts();
    let caller = if parts.uri.path() == "/health" { Ok(Caller::Anonymous) } else { identify(&app, &parts) };
    let key = match &caller {
        Ok(c @ (Caller::Named(_) | Caller::Unnamed(_))) => c.label(),
        _ => key_tag(&parts),
    };
    let mut left = Left {
        app: app.clone(),
        request_id: request_id.clone(),
        started,
        x: Exchange { key, ..Default::default() },
        done: false,
    };
    let x = &mut left.x;
    // Every line logged for this request (failover, refresh, the stream's end) carries its id,
    // the client key's tag, and once known the model, the account and the attempt.
    let span = if parts.uri.path() == "/health" {
        tracing::Span::none()
    } else {
        tracing::info_span!(
            "request",
            id = %request_id,
            key = %x.key,
            model = tracing::field::Empty,
            account = tracing::field::Empty,
            attempt = tracing::field::Empty,
        )
    };
    let mut resp = match tokio::time::timeout(
        app.config.server.request_timeout,
        route(&app, &parts, body, caller, &request_id, x, started).instrument(span),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => error_response(&e, &request_id),
        Err(_) => error_response(
            &ApiError::new(ErrorKind::Api, "request timed out (request_timeout_secs)"),
            &request_id,
        ),
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("request-id", v);
    }
    // 529 has no standard reason phrase: HTTP/1.1 clients and proxies get "529 Overloaded" (as
    // Anthropic's API answers), not "529 <none>".
    if resp.status().as_u16() == 529 {
        resp.extensions_mut().insert(hyper::ext::ReasonPhrase::from_static(b"Overloaded"));
    }
    let status = resp.status().as_u16();
    let streaming = resp.body().is_stream();
    // A stream is counted when it ends, under its real outcome (`messages::StreamEnd`).
    if parts.uri.path().starts_with("/v1/messages") && !streaming {
        app.metrics.request(x.model_label(), status);
    }
    // A stream is logged and timed when it ends (`messages::StreamEnd`).
    if !streaming && parts.uri.path() != "/health" && parts.uri.path() != "/metrics" {
        super::access_log(&app, &request_id, x, status, started);
        app.metrics.request_duration(started.elapsed());
    }
    left.done = true;
    resp
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("Not found: {path}"))
}

async fn route(
    app: &Arc<App>,
    parts: &http::request::Parts,
    body: Incoming,
    caller: Result<Caller, ApiError>,
    request_id: &str,
    x: &mut Exchange,
    started: Instant,
) -> Result<Response<Body>, ApiError> {
    let path = parts.uri.path();
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    let allow = match path {
        "/health" => "GET, HEAD",
        "/metrics" | "/v1/models" => "GET",
        "/v1/messages" | "/v1/messages/count_tokens" => "POST",
        p if p.starts_with("/v1/models/") => "GET",
        _ => return Err(not_found(parts.uri.path())),
    };
    let method_ok = match allow {
        "GET, HEAD" => parts.method == Method::GET || parts.method == Method::HEAD,
        "GET" => parts.method == Method::GET,
        _ => parts.method == Method::POST,
    };
    if !method_ok {
        let e = ApiError::invalid(format!("Method not allowed (allowed: {allow})"))
            .with_status(StatusCode::METHOD_NOT_ALLOWED);
        let mut r = error_response(&e, request_id);
        r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        return Ok(r);
    }
    if path == "/health" {
        return Ok(health(app));
    }
    let caller = caller?;
    x.caller = Some(caller.clone());
    match path {
        "/metrics" => {
            let mut r = Response::new(Body::full(app.metrics.render()));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
            Ok(r)
        }
        "/v1/models" => Ok(models_list(app, parts, &caller)),
        p if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            // Percent-encoded brackets (`claude-opus-4-8%5B1m%5D`) name the `[1m]` listing; a
            // dated id (`claude-sonnet-4-5-20250929`) names its model.
            let id = percent_decode(id);
            let (base, one_m) = crate::translate::catalog::normalise(&id);
            let alias = if one_m { format!("{base}[1m]") } else { base };
            app.models
                .list_live(&app.pool.union())
                .into_iter()
                .filter(|m| Keys::check_model(&caller, &m.id).is_ok())
                .find(|m| m.id == id || m.id == alias)
                .map(|mut m| {
                    // Answered under the id asked for, as Anthropic's API does for aliases.
                    m.id = id.clone();
                    m
                })
                .map(|m| json_response(StatusCode::OK, &model_json(&m)))
                .ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("model: {id}")))
        }
        "/v1/messages/count_tokens" => {
            let max = app.config.server.count_tokens_max_bytes.min(app.config.server.max_body_bytes);
            // A key over its limits is refused before its body is read (it would take its
            // share of the body budget and the parsing threads every key shares).
            Keys::precheck(&caller, false)?;
            let (bytes, admission) = read_body(app, parts, body, max).await?;
            let version = ApiVersion::from_header(header_str(parts, "anthropic-version"))?;
            let betas = betas_of(parts);
            let len = bytes.len();
            let models = app.clone();
            let (model, resolved, counted) = app
                .work
                .run(admission, len, move || {
                    let req = areq::parse_with(&bytes, version, Endpoint::CountTokens, betas)?;
                    let live = models.pool.union();
                    let resolved = models.models.resolve_live(&req.routed_model(), &live);
                    let counted =
                        resolved.as_ref().map(|_| tokens::count_request(&req)).map_err(Clone::clone);
                    Ok::<_, ApiError>((req.model, resolved.ok(), counted))
                })
                .await??;
            Keys::check_model(&caller, &model)?;
            x.model = model;
            x.resolved(resolved.unwrap_or_default());
            Ok(json_response(StatusCode::OK, &json!({"input_tokens": counted?})))
        }
        "/v1/messages" => {
            x.messages = true;
            Keys::precheck(&caller, true)?;
            let (bytes, admission) = read_body(app, parts, body, app.config.server.max_body_bytes).await?;
            let version = ApiVersion::from_header(header_str(parts, "anthropic-version"))?;
            let betas = betas_of(parts);
            let session = header_str(parts, "x-claude-code-session-id").map(str::to_string);
            let key_tag = x.key.clone();
            let len = bytes.len();
            let work_app = app.clone();
            let prepared = app
                .work
                .run(admission, len, move || {
                    messages::prepare(&work_app, &bytes, version, betas, session.as_deref(), &key_tag)
                })
                .await??;
            x.model = prepared.req.model.clone();
            x.resolved(prepared.translated.q_model.clone());
            tracing::Span::current().record("model", x.model.as_str());
            x.stream = prepared.req.stream;
            // The key's limits, before any upstream call.
            x.admitted = Keys::admit(&caller, &x.model, &x.upstream_model)?.map(Arc::new);
            x.tokens_in = prepared.input_tokens();
            if prepared.req.stream {
                let producer =
                    messages::stream(app, prepared, x.clone(), started, request_id.to_string()).await?;
                let mut r = Response::new(Body::Stream(producer, None));
                let h = r.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                h.insert("x-accel-buffering", HeaderValue::from_static("no"));
                Ok(r)
            } else {
                let m = messages::aggregate(app, &prepared, x).await?;
                x.first_byte = Some(started.elapsed());
                app.metrics.first_byte(started.elapsed());
                let mut r = json_response(StatusCode::OK, &m);
                // The credits the service charged: a header of ours, never in Anthropic's usage.
                if let Some(v) = x.credits.and_then(|c| HeaderValue::from_str(&format!("{c:.4}")).ok()) {
                    r.headers_mut().insert("x-amq2api-credits", v);
                }
                Ok(r)
            }
        }
        _ => Err(not_found(parts.uri.path())),
    }
}

/// The request's `anthropic-beta` features (every value of the header).
fn betas_of(parts: &http::request::Parts) -> areq::Betas {
    areq::Betas::from_header(parts.headers.get_all("anthropic-beta").iter().filter_map(|v| v.to_str().ok()))
}

fn header_str<'a>(parts: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

fn health(app: &App) -> Response<Body> {
    let s = app.pool.summary();
    let problem = app.pool.persistence_problem();
    let status = if s.active == 0 {
        "unavailable"
    } else if s.active < s.total || problem.is_some() {
        "degraded"
    } else {
        "ok"
    };
    let code = if status == "unavailable" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let mut body = json!({
        "status": status,
        "accounts": {
            "total": s.total, "active": s.active, "cooling": s.cooling + s.quota,
            "suspended": s.suspended, "invalid": s.invalid, "disabled": s.disabled,
            "tokens_unsaved": s.unsaved,
        },
        "version": env!("CARGO_PKG_VERSION"),
    });
    if let Some(p) = problem {
        body["store"] = json!({"ok": false, "problem": p});
    }
    json_response(code, &body)
}

/// `%XX` escapes decoded (`+` stays: model ids never hold a space); an invalid escape is kept.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Bytes, not a `str` slice: a path may hold raw UTF-8 right after a `%` (a slice
        // there panicked in the middle of a character).
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn model_json(m: &crate::translate::ModelInfo) -> Value {
    json!({"type": "model", "id": m.id, "display_name": m.display_name, "created_at": m.created_at})
}

/// The models the live catalog offers (a named key with `models` globs: those it may use).
fn models_list(app: &App, parts: &http::request::Parts, caller: &Caller) -> Response<Body> {
    let mut all = app.models.list_live(&app.pool.union());
    all.retain(|m| Keys::check_model(caller, &m.id).is_ok());
    let q: Vec<(String, String)> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let limit = get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(20).clamp(1, 1000);
    let (start, end) = if let Some(after) = get("after_id") {
        let s = all.iter().position(|m| m.id == after).map(|i| i + 1).unwrap_or(all.len());
        (s, (s + limit).min(all.len()))
    } else if let Some(before) = get("before_id") {
        let e = all.iter().position(|m| m.id == before).unwrap_or(0);
        (e.saturating_sub(limit), e)
    } else {
        (0, limit.min(all.len()))
    };
    let page = &all[start..end];
    let has_more = if get("before_id").is_some() { start > 0 } else { end < all.len() };
    json_response(
        StatusCode::OK,
        &json!({
            "data": page.iter().map(model_json).collect::<Vec<_>>(),
            "has_more": has_more,
            "first_id": page.first().map(|m| m.id.clone()),
            "last_id": page.last().map(|m| m.id.clone()),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    /// Escapes decode; a `%` not followed by two hex digits stays as it is, raw UTF-8 after it
    /// included (it panicked, slicing a character in two).
    #[test]
    fn percent_decoding_takes_any_input() {
        assert_eq!(percent_decode("claude%2Dsonnet%204"), "claude-sonnet 4");
        assert_eq!(percent_decode("%41%4a%4A"), "AJJ");
        assert_eq!(percent_decode("%aé"), "%aé");
        assert_eq!(percent_decode("%é1"), "%é1");
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%C3%A9"), "é");
        assert_eq!(percent_decode("%FF"), "\u{fffd}");
    }
}
