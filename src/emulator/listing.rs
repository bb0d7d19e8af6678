//! The listing operations: `ListAvailableModels` (`GET /ListAvailableModels?…` on the Amazon Q role,
//! `POST /management/` with `KiroControlPlaneBearerService.ListAvailableModels` on the management
//! role) and `ListAvailableProfiles` (`POST /` with `AmazonCodeWhispererService.ListAvailableProfiles`
//! on the Amazon Q role).

use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use super::Role;
use super::semantics::check_profile;
use super::server::{Body, json_response, read_body};
use super::state::{Channel, Credential, Shared};
use super::wire::{self, AMZ_JSON, Reason};

/// The `X-Amz-Target` of `ListAvailableProfiles` on the Amazon Q role.
pub const PROFILES_TARGET: &str = "AmazonCodeWhispererService.ListAvailableProfiles";
/// The `X-Amz-Target` of `ListAvailableModels` on the management role.
pub const MODELS_TARGET: &str = "KiroControlPlaneBearerService.ListAvailableModels";
/// The `origin`s a catalog call may name.
pub const ORIGINS: [&str; 2] = ["AI_EDITOR", "CLI"];
/// Largest listing request body read.
const MAX_BODY: usize = 64 * 1024;
/// The most `maxResults` may ask for.
const MAX_RESULTS: u64 = 100;

/// The parameters of a `ListAvailableModels` call, from the query or the body.
#[derive(Debug, Default)]
struct ModelsQuery {
    origin: Option<String>,
    profile_arn: Option<String>,
    max_results: Option<String>,
    next_token: Option<String>,
}

/// `ListAvailableModels` as a REST `GET` on the Amazon Q role.
pub(super) fn models_get(req: &Request<Incoming>, shared: &Shared, request_id: &str) -> Response<Body> {
    let credential = match wire::admit(shared, req.headers(), Role::AmazonQ, Channel::Catalog) {
        Ok(credential) => credential,
        Err(denied) => return denied.response(request_id),
    };
    shared.count_listing(&credential.account, Channel::Catalog);
    let mut query = ModelsQuery::default();
    for (key, value) in query_pairs(req.uri().query().unwrap_or_default()) {
        let slot = match key.as_str() {
            "origin" => &mut query.origin,
            "profileArn" => &mut query.profile_arn,
            "maxResults" => &mut query.max_results,
            "nextToken" => &mut query.next_token,
            _ => continue,
        };
        *slot = Some(value);
    }
    models(shared, &credential, query, "application/json", request_id)
}

/// `ListAvailableModels` as a JSON-RPC `POST` on the management role.
pub(super) async fn models_post(req: Request<Incoming>, shared: &Shared, request_id: &str) -> Response<Body> {
    let headers = req.headers();
    if let Err(rejected) = rpc_headers(headers, MODELS_TARGET) {
        return rejected.response(request_id);
    }
    let credential = match wire::admit(shared, headers, Role::Management, Channel::Catalog) {
        Ok(credential) => credential,
        Err(denied) => return denied.response(request_id),
    };
    shared.count_listing(&credential.account, Channel::Catalog);
    let body = match rpc_body(req).await {
        Ok(body) => body,
        Err(rejected) => return rejected.response(request_id),
    };
    let text = |name: &str| match body.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    };
    let query = ModelsQuery {
        origin: text("origin"),
        profile_arn: text("profileArn"),
        max_results: body.get("maxResults").filter(|v| !v.is_null()).map(Value::to_string),
        next_token: text("nextToken"),
    };
    models(shared, &credential, query, AMZ_JSON, request_id)
}

/// The catalog page a checked `ListAvailableModels` call gets.
fn models(
    shared: &Shared,
    credential: &Credential,
    query: ModelsQuery,
    content_type: &'static str,
    request_id: &str,
) -> Response<Body> {
    if !query.origin.as_deref().is_some_and(|o| ORIGINS.contains(&o)) {
        return wire::validation(
            "1 validation error detected: Value at 'origin' failed to satisfy constraint: Member must satisfy \
             enum value set: [AI_EDITOR, CLI]",
            Reason::Null,
            request_id,
        );
    }
    let max_results = match parse_max_results(query.max_results.as_deref()) {
        Ok(max) => max,
        Err(BadMaxResults) => return bad_max_results(request_id),
    };
    if let Err(refusal) = check_profile(shared, credential, query.profile_arn.as_deref()) {
        return refusal.response(request_id);
    }
    let account = credential.account.as_str();
    if let Some(response) = wire::behaviour_error(&shared.listing_behaviour(account), request_id) {
        return response;
    }
    let catalog = shared.catalog_for(account);
    let start = match query.next_token.as_deref() {
        None => 0,
        Some(token) => match token.strip_prefix("emu-page-").and_then(|n| n.parse::<usize>().ok()) {
            Some(start) if start > 0 && start < catalog.len() => start,
            _ => return wire::validation("Invalid nextToken.", Reason::Null, request_id),
        },
    };
    let page = [max_results, shared.opts.catalog_page_size].into_iter().flatten().min().unwrap_or(usize::MAX);
    let end = start.saturating_add(page).min(catalog.len());
    let mut body = json!({
        "models": catalog[start..end].iter().map(|m| m.to_json()).collect::<Vec<_>>(),
    });
    if let Some(default) = catalog.first() {
        body["defaultModel"] = json!({ "modelId": default.model_id });
    }
    if end < catalog.len() {
        body["nextToken"] = json!(format!("emu-page-{end}"));
    }
    json_response(StatusCode::OK, content_type, &body, request_id)
}

/// `ListAvailableProfiles` (`POST /` on the Amazon Q role).
pub(super) async fn profiles(req: Request<Incoming>, shared: &Shared, request_id: &str) -> Response<Body> {
    let headers = req.headers();
    if let Err(rejected) = rpc_headers(headers, PROFILES_TARGET) {
        return rejected.response(request_id);
    }
    let credential = match wire::admit(shared, headers, Role::AmazonQ, Channel::Profiles) {
        Ok(credential) => credential,
        Err(denied) => return denied.response(request_id),
    };
    shared.count_listing(&credential.account, Channel::Profiles);
    let body = match rpc_body(req).await {
        Ok(body) => body,
        Err(rejected) => return rejected.response(request_id),
    };
    // A JSON number; anything else (a string included) fails the bounds check.
    let max_results = body.get("maxResults").filter(|v| !v.is_null()).map(Value::to_string);
    if parse_max_results(max_results.as_deref()).is_err() {
        return bad_max_results(request_id);
    }
    if let Some(response) = wire::behaviour_error(&shared.listing_behaviour(&credential.account), request_id)
    {
        return response;
    }
    let own = shared.profile_of(&credential.account).and_then(|(_, arn)| arn);
    let profiles: Vec<Value> = own.iter().map(|arn| profile_json(arn)).collect();
    json_response(StatusCode::OK, AMZ_JSON, &json!({ "profiles": profiles }), request_id)
}

/// `{"arn", "profileName", "region"}` of a profile ARN.
fn profile_json(arn: &str) -> Value {
    let region = arn.split(':').nth(3).unwrap_or("us-east-1");
    let id = arn.rsplit('/').next().unwrap_or(arn);
    json!({ "arn": arn, "profileName": format!("emulator-{id}"), "region": region })
}

/// Why a JSON-RPC listing call is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RpcRejection {
    /// 400 `UnknownOperationException`.
    UnknownOperation,
    /// 400 `SerializationException`: not `application/x-amz-json-1.0`.
    ContentType,
    /// 400 `SerializationException`: the body could not be read.
    Unreadable,
    /// 400 `SerializationException`: the body is not a JSON object.
    NotAnObject,
}

impl RpcRejection {
    fn response(self, request_id: &str) -> Response<Body> {
        let serialization = |message: &str| {
            wire::q_error(
                StatusCode::BAD_REQUEST,
                "SerializationException",
                message,
                Reason::Omit,
                request_id,
            )
        };
        match self {
            RpcRejection::UnknownOperation => wire::unknown_operation(request_id),
            RpcRejection::ContentType => wire::wrong_content_type(request_id),
            RpcRejection::Unreadable => serialization("The request body could not be read."),
            RpcRejection::NotAnObject => serialization("The request body is not a JSON object."),
        }
    }
}

/// The `X-Amz-Target` and `Content-Type` of a JSON-RPC listing call.
fn rpc_headers(headers: &HeaderMap, target: &str) -> Result<(), RpcRejection> {
    let sent = headers.get("x-amz-target").and_then(|v| v.to_str().ok());
    if sent != Some(target) {
        return Err(RpcRejection::UnknownOperation);
    }
    if wire::media_type(headers).as_deref() != Some(AMZ_JSON) {
        return Err(RpcRejection::ContentType);
    }
    Ok(())
}

/// A JSON-RPC listing body: a JSON object (an empty body counts as `{}`).
async fn rpc_body(req: Request<Incoming>) -> Result<Map<String, Value>, RpcRejection> {
    let bytes = read_body(req.into_body(), MAX_BODY).await.map_err(|_| RpcRejection::Unreadable)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(body)) => Ok(body),
        _ => Err(RpcRejection::NotAnObject),
    }
}

/// A `maxResults` that is not an integer 1..=100.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BadMaxResults;

/// `maxResults`, if given: an integer 1..=100.
fn parse_max_results(raw: Option<&str>) -> Result<Option<usize>, BadMaxResults> {
    match raw {
        None => Ok(None),
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if (1..=MAX_RESULTS).contains(&n) => Ok(Some(n as usize)),
            _ => Err(BadMaxResults),
        },
    }
}

fn bad_max_results(request_id: &str) -> Response<Body> {
    wire::validation(
        "1 validation error detected: Value at 'maxResults' failed to satisfy constraint: Member must be \
         between 1 and 100",
        Reason::Null,
        request_id,
    )
}

/// The `key=value` pairs of a query string, percent-decoded (`+` is a space).
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_decoded() {
        let pairs = query_pairs(
            "origin=AI_EDITOR&profileArn=arn%3Aaws%3Acodewhisperer%3Aus-east-1%3A123456789012%3Aprofile%2FABC&x=a+b&bad=%zz&end=%4",
        );
        assert_eq!(pairs[0], ("origin".into(), "AI_EDITOR".into()));
        assert_eq!(pairs[1].1, "arn:aws:codewhisperer:us-east-1:123456789012:profile/ABC");
        assert_eq!(pairs[2].1, "a b");
        assert_eq!(pairs[3].1, "%zz");
        assert_eq!(pairs[4].1, "%4");
    }

    #[test]
    fn max_results_bounds() {
        assert_eq!(parse_max_results(None), Ok(None));
        assert_eq!(parse_max_results(Some("10")), Ok(Some(10)));
        for bad in ["0", "101", "-1", "ten", "1.5"] {
            assert!(parse_max_results(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn profile_entries_name_their_region() {
        let p = profile_json("arn:aws:codewhisperer:eu-central-1:123456789012:profile/ABCDEF");
        assert_eq!(
            p,
            json!({"arn": "arn:aws:codewhisperer:eu-central-1:123456789012:profile/ABCDEF", "profileName": "emulator-ABCDEF", "region": "eu-central-1"})
        );
    }
}
