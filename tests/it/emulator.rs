//! The Amazon Q + Kiro + OIDC emulator over real loopback TCP, driven by a plain hyper client and
//! read with the project's own event-stream decoder: token issue and rotation (OIDC and social),
//! the OIDC device flow, credentials and endpoint roles, profile ARNs, the catalog, request rules,
//! native reasoning and its replay, the end of a stream, every scripted behaviour, directives,
//! user agents, stream cancellation, HTTP/2 and shutdown.

use std::time::{Duration, Instant};

use amq2api::emulator::catalog::non_claude_catalog;
use amq2api::emulator::{
    BUILDER_ID_PROFILE_ARN, Behaviour, Emulator, EmulatorOptions, ModelEntry, Role, SOCIAL_PROFILE_ARN,
    SocialDeadToken, Standalone, default_catalog, run_standalone, run_standalone_with,
};
use amq2api::upstream::eventstream::{DecodeError, Decoder, Frame};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const CLIENT: &str = "client-a";
const SECRET: &str = "secret-a";
const REFRESH: &str = "refresh-a";
const TARGET: &str = "AmazonCodeWhispererStreamingService.GenerateAssistantResponse";
const BEARER_INVALID: &str = "The bearer token included in the request is invalid.";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn emulator_with(opts: EmulatorOptions) -> Emulator {
    let emu = Emulator::start(opts).await.expect("start the emulator");
    emu.add_account(CLIENT, SECRET, REFRESH);
    emu
}

async fn emulator() -> Emulator {
    emulator_with(EmulatorOptions::default()).await
}

async fn send(req: Request<Full<Bytes>>) -> Response<Incoming> {
    client().request(req).await.expect("request reaches the emulator")
}

async fn read_json(resp: Response<Incoming>) -> (StatusCode, HeaderMap, Value) {
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("read the body").to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (parts.status, parts.headers, value)
}

fn token_request(emu: &Emulator, body: &str) -> Request<Full<Bytes>> {
    Request::post(emu.token_endpoint())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn refresh(
    emu: &Emulator,
    client_id: &str,
    secret: &str,
    refresh_token: &str,
) -> (StatusCode, HeaderMap, Value) {
    let body = json!({
        "clientId": client_id,
        "clientSecret": secret,
        "grantType": "refresh_token",
        "refreshToken": refresh_token,
    });
    read_json(send(token_request(emu, &body.to_string())).await).await
}

/// A fresh access token of the default account.
async fn access_token(emu: &Emulator) -> String {
    access_token_of(emu, CLIENT, SECRET).await
}

/// Refreshes with whatever refresh token the account holds (the test tracks none: re-register).
async fn access_token_of(emu: &Emulator, client_id: &str, secret: &str) -> String {
    let seed = format!("seed-{client_id}-{}", std::process::id());
    emu.add_account(client_id, secret, &seed);
    let (status, _, body) = refresh(emu, client_id, secret, &seed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["accessToken"].as_str().expect("accessToken").to_owned()
}

fn q_request(emu: &Emulator, token: Option<&str>, body: &Value) -> Request<Full<Bytes>> {
    let mut req = Request::post(emu.endpoint())
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amz-target", TARGET);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn tools() -> Value {
    json!([
        {"toolSpecification": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "inputSchema": {"json": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"]
            }}
        }},
        {"toolSpecification": {
            "name": "get_time",
            "description": "Current time in a zone.",
            "inputSchema": {"json": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}}}
        }}
    ])
}

/// A valid request whose current message says `content`, with the two tools defined.
fn chat(content: &str) -> Value {
    json!({"conversationState": {
        "conversationId": "conv-1",
        "chatTriggerType": "MANUAL",
        "currentMessage": {"userInputMessage": {
            "content": content,
            "modelId": "claude-sonnet-4.5",
            "origin": "AI_EDITOR",
            "userInputMessageContext": {"tools": tools()}
        }}
    }})
}

/// A valid request that answers an earlier `get_weather` call.
fn tool_result_chat() -> Value {
    json!({"conversationState": {
        "chatTriggerType": "MANUAL",
        "history": [
            {"userInputMessage": {"content": "Weather in Paris?"}},
            {"assistantResponseMessage": {
                "content": "Checking.",
                "toolUses": [{"toolUseId": "tooluse_1", "name": "get_weather", "input": {"city": "Paris", "days": 1}}]
            }}
        ],
        "currentMessage": {"userInputMessage": {
            "content": "",
            "userInputMessageContext": {
                "tools": tools(),
                "toolResults": [{"toolUseId": "tooluse_1", "content": [{"text": "Sunny, 21 C"}], "status": "success"}]
            }
        }}
    }})
}

/// A streamed reply as the client saw it.
#[derive(Debug)]
struct Stream {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<Frame>,
    /// When each frame was decoded.
    arrivals: Vec<Instant>,
    decode_error: Option<DecodeError>,
    body_error: Option<String>,
}

impl Stream {
    fn events(&self, event_type: &str) -> Vec<Value> {
        self.frames
            .iter()
            .filter(|f| f.header_str(":event-type") == Some(event_type))
            .map(|f| serde_json::from_slice(&f.payload).expect("event payload is JSON"))
            .collect()
    }

    fn text(&self) -> String {
        self.events("assistantResponseEvent")
            .iter()
            .map(|e| e["content"].as_str().unwrap().to_owned())
            .collect()
    }

    fn event_types(&self) -> Vec<String> {
        self.frames.iter().map(|f| f.header_str(":event-type").unwrap_or("-").to_owned()).collect()
    }

    /// Tool calls: (id, name, joined input, whether a stop frame came).
    fn tool_calls(&self) -> Vec<(String, String, String, bool)> {
        let mut calls: Vec<(String, String, String, bool)> = Vec::new();
        for event in self.events("toolUseEvent") {
            let id = event["toolUseId"].as_str().expect("toolUseId").to_owned();
            let name = event["name"].as_str().expect("name").to_owned();
            let call = match calls.iter_mut().find(|c| c.0 == id) {
                Some(call) => call,
                None => {
                    assert!(event.get("input").is_none(), "first toolUseEvent carries no input: {event}");
                    calls.push((id, name.clone(), String::new(), false));
                    calls.last_mut().unwrap()
                }
            };
            assert_eq!(call.1, name);
            assert!(!call.3, "nothing after stop");
            if let Some(input) = event.get("input") {
                call.2.push_str(input.as_str().expect("input is a string fragment"));
            }
            if event.get("stop") == Some(&json!(true)) {
                call.3 = true;
            }
        }
        calls
    }

    fn assert_clean(&self) {
        assert_eq!(self.decode_error, None);
        assert_eq!(self.body_error, None);
    }
}

async fn read_stream(resp: Response<Incoming>) -> Stream {
    let (parts, mut body) = resp.into_parts();
    let mut decoder = Decoder::new();
    let mut stream = Stream {
        status: parts.status,
        headers: parts.headers,
        frames: Vec::new(),
        arrivals: Vec::new(),
        decode_error: None,
        body_error: None,
    };
    'read: loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                stream.body_error = Some(e.to_string());
                break;
            }
            Some(Ok(chunk)) => {
                let Ok(data) = chunk.into_data() else { continue };
                decoder.push(&data);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            stream.frames.push(frame);
                            stream.arrivals.push(Instant::now());
                        }
                        Ok(None) => break,
                        Err(e) => {
                            stream.decode_error = Some(e);
                            break 'read;
                        }
                    }
                }
            }
        }
    }
    if stream.decode_error.is_none() && stream.body_error.is_none() {
        stream.decode_error = decoder.finish().err();
    }
    stream
}

/// Sends `body` with a fresh token of the default account and reads the stream.
async fn chat_stream(emu: &Emulator, body: &Value) -> Stream {
    let token = access_token(emu).await;
    read_stream(send(q_request(emu, Some(&token), body)).await).await
}

async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- OIDC ----

#[tokio::test]
async fn token_issue_and_rotation() {
    let emu = emulator().await;
    let (status, headers, body) = refresh(&emu, CLIENT, SECRET, REFRESH).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers.contains_key("x-amzn-requestid"));
    let access = body["accessToken"].as_str().unwrap();
    assert!(access.len() > 100 && !access.contains('.'), "opaque, not a JWT: {access}");
    assert_eq!(body["tokenType"], "Bearer");
    assert_eq!(body["expiresIn"], 3600);
    let rotated = body["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(rotated, REFRESH);

    // The old refresh token stopped working at once.
    let (status, headers, body) = refresh(&emu, CLIENT, SECRET, REFRESH).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert!(body["error_description"].is_string());
    assert_eq!(headers["x-amzn-errortype"], "InvalidGrantException");

    let (status, _, body) = refresh(&emu, CLIENT, SECRET, &rotated).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["accessToken"].as_str().unwrap(), access);

    let stats = emu.stats();
    assert_eq!((stats.refreshes, stats.refresh_failures), (2, 1));
    assert_eq!(emu.stats_for(CLIENT).refreshes, 2);
}

#[tokio::test]
async fn refresh_token_kept_without_rotation() {
    let opts = EmulatorOptions { rotate_refresh_tokens: false, ..Default::default() };
    let emu = emulator_with(opts).await;
    for _ in 0..2 {
        let (status, _, body) = refresh(&emu, CLIENT, SECRET, REFRESH).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.get("refreshToken").is_none(), "{body}");
    }
}

#[tokio::test]
async fn invalid_client() {
    let emu = emulator().await;
    for (client_id, secret) in [("nobody", SECRET), (CLIENT, "wrong-secret")] {
        let (status, headers, body) = refresh(&emu, client_id, secret, REFRESH).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "invalid_client");
        assert!(body["error_description"].is_string());
        assert_eq!(headers["x-amzn-errortype"], "InvalidClientException");
    }
    assert_eq!(emu.stats().refresh_failures, 2);
}

#[tokio::test]
async fn malformed_token_requests() {
    let emu = emulator().await;
    let (status, _, body) = read_json(send(token_request(&emu, "not json")).await).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    let (status, _, body) = read_json(send(token_request(&emu, r#"{"clientId": "client-a"}"#)).await).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    let other_grant =
        json!({"clientId": CLIENT, "clientSecret": SECRET, "grantType": "authorization_code", "code": "x"});
    let (status, _, body) = read_json(send(token_request(&emu, &other_grant.to_string())).await).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("unsupported_grant_type")));
}

#[tokio::test]
async fn revoked_refresh_token_is_invalid_grant() {
    let emu = emulator().await;
    emu.revoke_refresh_token(CLIENT);
    let (status, _, body) = refresh(&emu, CLIENT, SECRET, REFRESH).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
}

// ---- authentication and request checks ----

fn assert_bearer_invalid(status: StatusCode, headers: &HeaderMap, body: &Value) {
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        &json!({"__type": "com.amazon.aws.codewhisperer#AccessDeniedException", "message": BEARER_INVALID})
    );
    assert!(headers["x-amzn-errortype"].to_str().unwrap().starts_with("AccessDeniedException"));
    assert!(headers.contains_key("x-amzn-requestid"));
}

#[tokio::test]
async fn bearer_missing_unknown_or_expired_is_403() {
    let emu = emulator().await;
    let (status, headers, body) = read_json(send(q_request(&emu, None, &chat("hi"))).await).await;
    assert_bearer_invalid(status, &headers, &body);
    let (status, headers, body) =
        read_json(send(q_request(&emu, Some("aoaUnknown"), &chat("hi"))).await).await;
    assert_bearer_invalid(status, &headers, &body);

    let token = access_token(&emu).await;
    let ok = send(q_request(&emu, Some(&token), &chat("hi"))).await;
    assert_eq!(ok.status(), StatusCode::OK);
    read_stream(ok).await.assert_clean();
    emu.expire_access_tokens(CLIENT);
    let (status, headers, body) = read_json(send(q_request(&emu, Some(&token), &chat("hi"))).await).await;
    assert_bearer_invalid(status, &headers, &body);
    // A fresh token works again.
    let fresh = access_token(&emu).await;
    assert_eq!(send(q_request(&emu, Some(&fresh), &chat("hi"))).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn access_tokens_expire_after_their_ttl() {
    let emu = emulator_with(EmulatorOptions { access_token_ttl: Duration::ZERO, ..Default::default() }).await;
    let (status, _, body) = refresh(&emu, CLIENT, SECRET, REFRESH).await;
    assert_eq!(body["expiresIn"], 0);
    assert_eq!(status, StatusCode::OK);
    let token = body["accessToken"].as_str().unwrap();
    let (status, headers, body) = read_json(send(q_request(&emu, Some(token), &chat("hi"))).await).await;
    assert_bearer_invalid(status, &headers, &body);
}

#[tokio::test]
async fn wrong_target_or_content_type_is_400() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let mut req = q_request(&emu, Some(&token), &chat("hi"));
    req.headers_mut()
        .insert("x-amz-target", "AmazonCodeWhispererStreamingService.SendMessage".parse().unwrap());
    let (status, headers, body) = read_json(send(req).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["__type"], "com.amazon.aws.codewhisperer#UnknownOperationException");
    assert!(headers["x-amzn-errortype"].to_str().unwrap().starts_with("UnknownOperationException"));

    let mut req = q_request(&emu, Some(&token), &chat("hi"));
    req.headers_mut().insert("content-type", "application/json".parse().unwrap());
    let (status, _, body) = read_json(send(req).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["__type"], "com.amazon.aws.codewhisperer#SerializationException");
    assert_eq!(emu.stats().rejected_malformed, 2);
}

#[tokio::test]
async fn malformed_body_is_improperly_formed() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let mut bad = chat("hi");
    bad["conversationState"]["chatTriggerType"] = json!("AUTO");
    let (status, headers, body) = read_json(send(q_request(&emu, Some(&token), &bad)).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"__type": "com.amazon.aws.codewhisperer#ValidationException", "message": "Improperly formed request.", "reason": null})
    );
    assert!(headers["x-amzn-errortype"].to_str().unwrap().starts_with("ValidationException"));
    assert_eq!(emu.stats().rejected_malformed, 1);
    assert_eq!(emu.stats_for(CLIENT).last_request, Some(bad), "the rejected body is kept for inspection");

    let too_long = chat(&"x".repeat(600_001));
    let (status, _, body) = read_json(send(q_request(&emu, Some(&token), &too_long)).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["reason"], "CONTENT_LENGTH_EXCEEDS_THRESHOLD");
    assert_eq!(body["message"], "Input is too long.");

    let req = Request::post(emu.endpoint())
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amz-target", TARGET)
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let (status, _, body) = read_json(send(req).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["__type"], "com.amazon.aws.codewhisperer#SerializationException");
    assert_eq!(emu.stats().rejected_malformed, 3);
}

// ---- normal replies ----

#[tokio::test]
async fn normal_request_streams_the_expected_text() {
    let emu = emulator().await;
    let request = chat("Hi there, emulator!");
    let stream = chat_stream(&emu, &request).await;
    stream.assert_clean();
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.headers["content-type"], "application/vnd.amazon.eventstream");
    assert!(stream.headers.contains_key("x-amzn-requestid"));
    for frame in &stream.frames {
        assert_eq!(frame.header_str(":message-type"), Some("event"));
        assert_eq!(frame.header_str(":content-type"), Some("application/json"));
    }
    let types = stream.event_types();
    assert_eq!(types[0], "initial-response");
    assert_eq!(stream.events("initial-response")[0], json!({"conversationId": "conv-1"}));
    assert_eq!(types[1], "messageMetadataEvent", "{types:?}");
    assert_eq!(
        &types[types.len() - 3..],
        ["metadataEvent", "contextUsageEvent", "meteringEvent"],
        "{types:?}"
    );
    assert_eq!(
        stream.events("metadataEvent")[0],
        json!({"stopReason": "END_TURN"}),
        "no tokenUsage by default"
    );
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: Hi there, emulator!");
    let fragments = stream.events("assistantResponseEvent");
    assert!(fragments.len() > 4);
    for fragment in &fragments {
        let len = fragment["content"].as_str().unwrap().chars().count();
        assert!((1..=12).contains(&len), "{fragment}");
        assert_eq!(fragment["modelId"], "claude-sonnet-4.5");
    }
    let metering = &stream.events("meteringEvent")[0];
    assert!(metering["usage"].as_f64().unwrap() > 0.0 && metering["unit"] == "credit");
    let context = stream.events("contextUsageEvent")[0]["contextUsagePercentage"].as_f64().unwrap();
    assert!(context > 0.0 && context < 1.0, "{context}");
    assert_eq!(stream.events("messageMetadataEvent")[0]["conversationId"], "conv-1");
    assert!(stream.tool_calls().is_empty());

    wait_until("the stream is counted complete", Duration::from_secs(1), || {
        let s = emu.stats();
        s.completed_streams == 1 && s.open_streams == 0
    })
    .await;
    let account = emu.stats_for(CLIENT);
    assert_eq!(account.requests, 1);
    assert_eq!(account.open_streams, 0);
    assert_eq!(account.last_request, Some(request));
    assert_eq!(emu.stats().requests, 1);
}

#[tokio::test]
async fn tool_results_are_acknowledged() {
    let emu = emulator().await;
    let stream = chat_stream(&emu, &tool_result_chat()).await;
    stream.assert_clean();
    assert_eq!(stream.text(), "I received the tool result: Sunny, 21 C");
    // No conversation id in the request: one is made up and used throughout.
    let id = stream.events("initial-response")[0]["conversationId"].as_str().unwrap().to_owned();
    assert!(!id.is_empty());
    assert_eq!(stream.events("messageMetadataEvent")[0]["conversationId"], id.as_str());
}

#[tokio::test]
async fn tool_directive_streams_a_whole_tool_call() {
    let emu = emulator().await;
    let stream =
        chat_stream(&emu, &chat("Weather?\n#emulator: tool get_weather {\"city\": \"Paris\", \"days\": 3}"))
            .await;
    stream.assert_clean();
    let calls = stream.tool_calls();
    assert_eq!(calls.len(), 1, "{:?}", stream.event_types());
    let (id, name, input, stop) = &calls[0];
    assert!(id.starts_with("tooluse_") && id.len() <= 64, "{id}");
    assert_eq!(name, "get_weather");
    assert!(*stop, "a whole call ends with stop");
    assert_eq!(serde_json::from_str::<Value>(input).unwrap(), json!({"city": "Paris", "days": 3}));
    assert!(stream.events("toolUseEvent").len() > 3, "input comes in several fragments");
    assert_eq!(stream.text(), "", "no text unless asked for");
}

#[tokio::test]
async fn tools2_calls_the_first_two_tools_with_generated_arguments() {
    let emu = emulator().await;
    let stream = chat_stream(&emu, &chat("#emulator: tools2\n#emulator: text Calling two tools.")).await;
    stream.assert_clean();
    assert_eq!(stream.text(), "Calling two tools.");
    let calls = stream.tool_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].1.as_str(), calls[1].1.as_str()), ("get_weather", "get_time"));
    assert_ne!(calls[0].0, calls[1].0);
    assert!(calls.iter().all(|c| c.3));
    assert_eq!(serde_json::from_str::<Value>(&calls[0].2).unwrap(), json!({"city": "example", "days": 1}));
    assert_eq!(serde_json::from_str::<Value>(&calls[1].2).unwrap(), json!({"zone": "UTC"}));
}

#[tokio::test]
async fn tool_directive_for_an_undefined_tool_says_so() {
    let emu = emulator().await;
    let stream = chat_stream(&emu, &chat("#emulator: tool launch_rocket {}")).await;
    stream.assert_clean();
    assert!(stream.tool_calls().is_empty());
    assert!(stream.text().contains("`launch_rocket` is not defined"), "{}", stream.text());
}

#[tokio::test]
async fn text_and_thinking_tags_directives() {
    let emu = emulator().await;
    let stream = chat_stream(&emu, &chat("#emulator: text Exactly   this.")).await;
    assert_eq!(stream.text(), "Exactly   this.");
    let stream = chat_stream(&emu, &chat("Think first.\n#emulator: thinking-tags")).await;
    stream.assert_clean();
    let text = stream.text();
    assert!(text.starts_with("<thinking>"), "{text}");
    let (thinking, answer) = text.split_once("</thinking>").expect("closing tag");
    assert!(thinking.len() > "<thinking>".len());
    assert_eq!(answer.trim_start(), "Hello from the Amazon Q emulator. You said: Think first.");
}

#[tokio::test]
async fn long_reply_has_the_requested_length() {
    let emu = emulator().await;
    let stream = chat_stream(&emu, &chat("#emulator: long 5000")).await;
    stream.assert_clean();
    assert_eq!(stream.text().chars().count(), 5000);
    assert!(stream.events("assistantResponseEvent").len() > 5000 / 12);
    assert_eq!(stream.event_types().last().map(String::as_str), Some("meteringEvent"));
}

#[tokio::test]
async fn reasoning_comes_before_the_answer() {
    let emu = emulator().await;
    emu.set_behaviour(CLIENT, Behaviour::Reasoning);
    let stream = chat_stream(&emu, &chat("Why?")).await;
    stream.assert_clean();
    let types = stream.event_types();
    let first_text = types.iter().position(|t| t == "assistantResponseEvent").unwrap();
    let last_reasoning = types.iter().rposition(|t| t == "reasoningContentEvent").unwrap();
    assert!(last_reasoning < first_text, "{types:?}");
    let reasoning = stream.events("reasoningContentEvent");
    let (signature, texts) = reasoning.split_last().unwrap();
    assert!(signature["signature"].as_str().is_some_and(|s| !s.is_empty()), "{signature}");
    assert!(texts.len() > 1 && texts.iter().all(|t| t["text"].is_string()));
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: Why?");
}

// ---- behaviours ----

/// (behaviour, directive, status, exception name, reason)
fn error_behaviours() -> Vec<(Behaviour, &'static str, StatusCode, &'static str, Option<&'static str>)> {
    vec![
        (
            Behaviour::Suspended,
            "suspended",
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            Some("TEMPORARILY_SUSPENDED"),
        ),
        (
            Behaviour::Throttled { retry_after_secs: None },
            "throttled",
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            None,
        ),
        (
            Behaviour::CapacityExhausted,
            "capacity",
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            Some("INSUFFICIENT_MODEL_CAPACITY"),
        ),
        (
            Behaviour::MonthlyQuota,
            "quota-monthly",
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            Some("MONTHLY_REQUEST_COUNT"),
        ),
        (
            Behaviour::DailyQuota,
            "quota-daily",
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            Some("DAILY_REQUEST_COUNT"),
        ),
        (
            Behaviour::InternalError,
            "error-500",
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            None,
        ),
        (
            Behaviour::Unavailable,
            "error-503",
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            None,
        ),
        (Behaviour::Suspicious, "suspicious", StatusCode::TOO_MANY_REQUESTS, "ThrottlingException", None),
        (Behaviour::Locked, "locked", StatusCode::FORBIDDEN, "AccessDeniedException", None),
        (
            Behaviour::ToolUseResultMismatch,
            "tool-mismatch",
            StatusCode::BAD_REQUEST,
            "ValidationException",
            Some("TOOL_USE_RESULT_MISMATCH"),
        ),
        (
            Behaviour::ToolSchemaInvalid,
            "tool-schema-invalid",
            StatusCode::BAD_REQUEST,
            "ValidationException",
            Some("TOOL_SCHEMA_INVALID"),
        ),
        (
            Behaviour::SignatureInvalid,
            "signature-invalid",
            StatusCode::BAD_REQUEST,
            "ValidationException",
            Some("THINKING_SIGNATURE_INVALID"),
        ),
        (
            Behaviour::ProfileRequired,
            "profile-required",
            StatusCode::BAD_REQUEST,
            "ValidationException",
            None,
        ),
        (
            Behaviour::Overage,
            "overage",
            StatusCode::PAYMENT_REQUIRED,
            "ServiceQuotaExceededException",
            Some("OVERAGE_REQUEST_LIMIT_EXCEEDED"),
        ),
        (
            Behaviour::HighTraffic,
            "high-traffic",
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            Some("INSUFFICIENT_MODEL_CAPACITY"),
        ),
        (
            Behaviour::InvalidModel,
            "invalid-model",
            StatusCode::BAD_REQUEST,
            "ValidationException",
            Some("INVALID_MODEL_ID"),
        ),
    ]
}

fn assert_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Value,
    expected: (StatusCode, &str, Option<&str>),
) {
    let (want_status, name, reason) = expected;
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["__type"], format!("com.amazon.aws.codewhisperer#{name}"));
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(body.get("reason").and_then(Value::as_str), reason, "{body}");
    assert!(headers["x-amzn-errortype"].to_str().unwrap().starts_with(&format!("{name}:")));
    assert!(headers.contains_key("x-amzn-requestid"));
    assert_eq!(headers["content-type"], "application/x-amz-json-1.0");
}

#[tokio::test]
async fn error_behaviours_answer_before_the_stream() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    for (behaviour, _, status, name, reason) in error_behaviours() {
        emu.set_behaviour(CLIENT, behaviour.clone());
        let (got, headers, body) = read_json(send(q_request(&emu, Some(&token), &chat("hi"))).await).await;
        assert_error(got, &headers, &body, (status, name, reason));
        assert!(!headers.contains_key("retry-after"), "{behaviour:?}");
    }
    emu.set_behaviour(CLIENT, Behaviour::Throttled { retry_after_secs: Some(7) });
    let (status, headers, _) = read_json(send(q_request(&emu, Some(&token), &chat("hi"))).await).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(emu.stats().open_streams + emu.stats().completed_streams, 0);
}

#[tokio::test]
async fn directives_override_the_account_behaviour() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    for (_, directive, status, name, reason) in error_behaviours() {
        let body = chat(&format!("Hello\n#emulator: {directive}"));
        let (got, headers, body) = read_json(send(q_request(&emu, Some(&token), &body)).await).await;
        assert_error(got, &headers, &body, (status, name, reason));
    }
    let body = chat("#emulator: throttled 3");
    let (_, headers, _) = read_json(send(q_request(&emu, Some(&token), &body)).await).await;
    assert_eq!(headers["retry-after"], "3");
    // A directive wins over a failing account behaviour too.
    emu.set_behaviour(CLIENT, Behaviour::Suspended);
    let stream = read_stream(send(q_request(&emu, Some(&token), &chat("#emulator: normal"))).await).await;
    assert_eq!(stream.status, StatusCode::OK);
    // An unknown directive is ignored.
    emu.set_behaviour(CLIENT, Behaviour::Normal);
    let stream = read_stream(send(q_request(&emu, Some(&token), &chat("#emulator: teleport 5"))).await).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: ");
}

#[tokio::test]
async fn behaviour_for_next_requests_then_back() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    emu.set_behaviour_for_next(CLIENT, Behaviour::Unavailable, 2);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = send(q_request(&emu, Some(&token), &chat("hi"))).await;
        statuses.push(resp.status());
        let _ = resp.into_body().collect().await;
    }
    assert_eq!(statuses, [StatusCode::SERVICE_UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE, StatusCode::OK]);
    assert_eq!(emu.stats_for(CLIENT).requests, 3);
}

#[tokio::test]
async fn behaviours_are_per_account() {
    let emu = emulator().await;
    let token_a = access_token(&emu).await;
    let token_b = access_token_of(&emu, "client-b", "secret-b").await;
    emu.set_behaviour("client-b", Behaviour::Suspended);
    assert_eq!(send(q_request(&emu, Some(&token_a), &chat("hi"))).await.status(), StatusCode::OK);
    assert_eq!(send(q_request(&emu, Some(&token_b), &chat("hi"))).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(emu.stats_for("client-b").requests, 1);
    assert_eq!(emu.stats_for("client-b").refreshes, 1);
}

#[tokio::test]
async fn tool_call_cut_before_stop_has_no_stop_frame() {
    let emu = emulator().await;
    emu.set_behaviour(CLIENT, Behaviour::ToolCallCutBeforeStop);
    let stream = chat_stream(&emu, &chat("hi")).await;
    stream.assert_clean();
    let calls = stream.tool_calls();
    assert_eq!(calls.len(), 1);
    let (_, name, input, stop) = &calls[0];
    assert_eq!(name, "get_weather");
    assert!(!stop, "no stop frame");
    assert!(!input.is_empty());
    assert!(serde_json::from_str::<Value>(input).is_err(), "input is cut: {input}");
    assert_eq!(stream.event_types().last().map(String::as_str), Some("toolUseEvent"));
}

#[tokio::test]
async fn corrupt_frame_fails_the_message_crc() {
    let emu = emulator().await;
    let stream = chat_stream(&emu, &chat("#emulator: corrupt-frame")).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert!(stream.frames.len() >= 2, "good frames first");
    assert!(
        matches!(stream.decode_error, Some(DecodeError::MessageChecksumMismatch { .. })),
        "{:?}",
        stream.decode_error
    );
}

#[tokio::test]
async fn in_stream_exception_frame() {
    let emu = emulator().await;
    emu.set_behaviour(
        CLIENT,
        Behaviour::InStreamException {
            exception_type: "ContentLengthExceededException".into(),
            message: "Output too long".into(),
        },
    );
    let stream = chat_stream(&emu, &chat("hi")).await;
    stream.assert_clean();
    assert!(!stream.text().is_empty(), "some text before the exception");
    let last = stream.frames.last().unwrap();
    assert_eq!(last.header_str(":message-type"), Some("exception"));
    assert_eq!(last.header_str(":exception-type"), Some("ContentLengthExceededException"));
    assert_eq!(last.header_str(":content-type"), Some("application/json"));
    assert_eq!(
        serde_json::from_slice::<Value>(&last.payload).unwrap(),
        json!({"message": "Output too long"})
    );

    let stream = chat_stream(&emu, &chat("#emulator: exception error MODEL_TEMPORARILY_UNAVAILABLE")).await;
    let last = stream.frames.last().unwrap();
    assert_eq!(last.header_str(":exception-type"), Some("error"));
    let payload: Value = serde_json::from_slice(&last.payload).unwrap();
    assert_eq!(payload["reason"], "MODEL_TEMPORARILY_UNAVAILABLE");
}

#[tokio::test]
async fn reset_before_first_byte_gives_no_response() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let err = client().request(q_request(&emu, Some(&token), &chat("#emulator: reset-before"))).await;
    assert!(err.is_err(), "no response: {:?}", err.map(|r| r.status()));
    emu.set_behaviour(CLIENT, Behaviour::ResetBeforeFirstByte);
    assert!(client().request(q_request(&emu, Some(&token), &chat("hi"))).await.is_err());
}

#[tokio::test]
async fn reset_after_first_byte_cuts_the_body() {
    let emu = emulator().await;
    emu.set_behaviour(CLIENT, Behaviour::ResetAfterFirstByte);
    let stream = chat_stream(&emu, &chat("hi")).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert!(stream.frames.len() >= 2, "{:?}", stream.event_types());
    assert!(stream.body_error.is_some(), "the body ends with an error, not cleanly");
    assert!(stream.events("meteringEvent").is_empty(), "the stream never ended");
}

#[tokio::test]
async fn slow_first_byte_delays_the_headers() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let start = Instant::now();
    let resp = send(q_request(&emu, Some(&token), &chat("#emulator: slow-first-byte 300"))).await;
    assert!(start.elapsed() >= Duration::from_millis(300));
    read_stream(resp).await.assert_clean();
}

#[tokio::test]
async fn slow_fragments_and_fragment_delay_space_the_frames() {
    let emu = emulator().await;
    emu.set_behaviour(CLIENT, Behaviour::SlowFragments(Duration::from_millis(20)));
    let stream = chat_stream(&emu, &chat("hi")).await;
    stream.assert_clean();
    let span = *stream.arrivals.last().unwrap() - stream.arrivals[0];
    let gaps = stream.frames.len() as u32 - 1;
    assert!(span >= Duration::from_millis(20) * gaps, "{span:?} for {gaps} gaps");

    let emu =
        emulator_with(EmulatorOptions { fragment_delay: Duration::from_millis(10), ..Default::default() })
            .await;
    let stream = chat_stream(&emu, &chat("hi")).await;
    let span = *stream.arrivals.last().unwrap() - stream.arrivals[0];
    assert!(span >= Duration::from_millis(10) * (stream.frames.len() as u32 - 1), "{span:?}");
}

#[tokio::test]
async fn silent_after_first_byte_pauses_after_the_initial_frames() {
    let emu = emulator().await;
    let stream = chat_stream(&emu, &chat("#emulator: silent 400")).await;
    stream.assert_clean();
    assert_eq!(stream.frames[0].header_str(":event-type"), Some("initial-response"));
    let gap = stream.arrivals[1] - stream.arrivals[0];
    assert!(gap >= Duration::from_millis(400), "{gap:?}");
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: ");
}

#[tokio::test]
async fn client_disconnect_cancels_the_stream() {
    let emu = emulator().await;
    emu.set_behaviour(CLIENT, Behaviour::SlowFragments(Duration::from_millis(100)));
    let token = access_token(&emu).await;
    let resp = send(q_request(&emu, Some(&token), &chat("a reply long enough to take a while"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first chunk").expect("readable");
    assert!(first.is_data());
    assert_eq!(emu.stats().open_streams, 1);
    assert_eq!(emu.stats_for(CLIENT).open_streams, 1);
    drop(body);
    wait_until("the stream is cancelled", Duration::from_secs(1), || {
        let s = emu.stats();
        s.open_streams == 0 && s.cancelled_streams == 1
    })
    .await;
    assert_eq!(emu.stats().completed_streams, 0);
    assert_eq!(emu.stats_for(CLIENT).open_streams, 0);
}

// ---- transport and lifecycle ----

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let h2: HttpClient = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let resp = h2.request(q_request(&emu, Some(&token), &chat("over h2"))).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let stream = read_stream(resp).await;
    stream.assert_clean();
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: over h2");
}

#[tokio::test]
async fn concurrent_streams_are_counted() {
    let emu = emulator().await;
    emu.set_behaviour(CLIENT, Behaviour::SlowFragments(Duration::from_millis(5)));
    let token = access_token(&emu).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let req = q_request(&emu, Some(&token), &chat(&format!("request {i}")));
        tasks.push(tokio::spawn(async move { read_stream(send(req).await).await }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let stream = task.await.unwrap();
        stream.assert_clean();
        assert_eq!(stream.text(), format!("Hello from the Amazon Q emulator. You said: request {i}"));
    }
    wait_until("all streams complete", Duration::from_secs(1), || emu.stats().completed_streams == 8).await;
    assert_eq!(emu.stats().open_streams, 0);
}

#[tokio::test]
async fn unknown_paths_are_404() {
    let emu = emulator().await;
    let req = Request::get(format!("{}v1/other", emu.endpoint())).body(Full::new(Bytes::new())).unwrap();
    assert_eq!(send(req).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let emu = emulator().await;
    let addr = emu.addr();
    assert_eq!(emu.endpoint(), format!("http://{addr}/"));
    assert_eq!(emu.token_endpoint(), format!("http://{addr}/token"));
    assert_eq!(emu.social_token_endpoint(), format!("http://{addr}/refreshToken"));
    assert_eq!(emu.runtime_endpoint(), format!("http://{addr}/runtime/"));
    assert_eq!(emu.management_endpoint(), format!("http://{addr}/management/"));
    assert_eq!(emu.catalog_url(), format!("http://{addr}/ListAvailableModels"));
    emu.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn standalone_serves_its_accounts_until_shutdown() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let accounts = vec![("demo".to_owned(), "demo-secret".to_owned(), "demo-refresh".to_owned())];
    let server = tokio::spawn(async move {
        run_standalone(listener, &accounts, async {
            let _ = stopped.await;
        })
        .await
    });
    let body = json!({"clientId": "demo", "clientSecret": "demo-secret", "grantType": "refresh_token", "refreshToken": "demo-refresh"});
    let req =
        Request::post(format!("http://{addr}/token")).body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let (status, _, body) = read_json(send(req).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops on shutdown").unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn standalone_serves_social_accounts_and_api_keys() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let setup = Standalone {
        options: EmulatorOptions { require_profile_arn: true, ..Default::default() },
        social: vec!["standalone-social".to_owned()],
        api_keys: vec!["ksk_standalone".to_owned()],
        ..Standalone::default()
    };
    let server = tokio::spawn(async move {
        run_standalone_with(listener, &setup, async {
            let _ = stopped.await;
        })
        .await
    });
    let req = Request::post(format!("http://{addr}/refreshToken"))
        .header("user-agent", KIRO_UA)
        .body(Full::new(Bytes::from(json!({"refreshToken": "standalone-social"}).to_string())))
        .unwrap();
    let (status, _, body) = read_json(send(req).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["accessToken"].as_str().unwrap();
    let runtime = format!("http://{addr}/runtime/");
    let resp = send(rpc(&runtime, TARGET, Auth::Bearer(token), None, &chat("hi"))).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "the options apply: a profile ARN is required");
    let resp =
        send(rpc(&runtime, TARGET, Auth::Bearer(token), None, &with_profile(chat("hi"), SOCIAL_PROFILE_ARN)))
            .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = send(rpc(&runtime, TARGET, Auth::ApiKey("ksk_standalone"), None, &chat("hi"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops on shutdown").unwrap();
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let emu = emulator().await;
    let addr = emu.addr();
    let clone = emu.clone();
    drop(emu);
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok(), "a clone keeps it running");
    drop(clone);
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(1), "still listening");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Collects what the emulator logs on this thread (tests run on a current-thread runtime).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn rejection_warning_names_the_rule_and_the_path() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let mut bad = tool_result_chat();
    bad["conversationState"]["history"][1]["assistantResponseMessage"]["toolUses"][0]["name"] =
        json!("get_forecast");
    let resp = send(q_request(&emu, Some(&token), &bad)).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains("every tool name used in history toolUses is defined in the current message's tools"),
        "{log}"
    );
    assert!(log.contains("conversationState.history[1].assistantResponseMessage.toolUses[0].name"), "{log}");
}

// ---- 2026: credentials, roles, profile ARNs, catalog, native reasoning ----

const KIRO_UA: &str = "KiroIDE-0.9.2-3f1c9a0e5b7d2c4f6a8e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d2f4a";
const NOT_AUTHORIZED: &str = "User is not authorized to make this call";
const PROFILE_REQUIRED: &str = "profileArn is required for this request.";
const IDC_ARN: &str = "arn:aws:codewhisperer:eu-central-1:123456789012:profile/IDCPROFILE01";
const OTHER_ARN: &str = "arn:aws:codewhisperer:us-east-1:210987654321:profile/SOMEONEELSE1";
const SOCIAL_ARN: &str = "arn:aws:codewhisperer:us-east-1:111122223333:profile/KIROSOCIAL01";
const PROFILES_TARGET: &str = "AmazonCodeWhispererService.ListAvailableProfiles";
const MODELS_TARGET: &str = "KiroControlPlaneBearerService.ListAvailableModels";

/// How a call authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    Nothing,
    /// `Authorization: Bearer <token>`.
    Bearer(&'a str),
    /// `Authorization: Bearer <key>` and `tokentype: API_KEY`.
    ApiKey(&'a str),
}

/// A JSON-RPC `POST` to `url` with `target`, `auth` and, when given, a user agent.
fn rpc(
    url: &str,
    target: &str,
    auth: Auth<'_>,
    user_agent: Option<&str>,
    body: &Value,
) -> Request<Full<Bytes>> {
    let mut req = Request::post(url)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amz-target", target);
    match auth {
        Auth::Nothing => {}
        Auth::Bearer(token) => req = req.header("authorization", format!("Bearer {token}")),
        Auth::ApiKey(key) => {
            req = req.header("authorization", format!("Bearer {key}")).header("tokentype", "API_KEY")
        }
    }
    if let Some(ua) = user_agent {
        req = req.header("user-agent", ua);
    }
    req.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// A chat call on the Amazon Q role.
fn q_call(emu: &Emulator, auth: Auth<'_>, body: &Value) -> Request<Full<Bytes>> {
    rpc(&emu.endpoint(), TARGET, auth, None, body)
}

/// A chat call on the runtime role.
fn runtime_call(emu: &Emulator, auth: Auth<'_>, body: &Value) -> Request<Full<Bytes>> {
    rpc(&emu.runtime_endpoint(), TARGET, auth, None, body)
}

/// `GET /ListAvailableModels?<query>` with a bearer token.
fn catalog_get(emu: &Emulator, token: &str, query: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{}?{query}", emu.catalog_url()))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn social_refresh(
    emu: &Emulator,
    refresh_token: &str,
    user_agent: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = Request::post(emu.social_token_endpoint()).header("content-type", "application/json");
    if let Some(ua) = user_agent {
        req = req.header("user-agent", ua);
    }
    let body = json!({ "refreshToken": refresh_token }).to_string();
    read_json(send(req.body(Full::new(Bytes::from(body))).unwrap()).await).await
}

/// Registers a social account and returns its id and a fresh access token.
async fn social_account(emu: &Emulator, refresh_token: &str, profile_arn: Option<&str>) -> (String, String) {
    let id = emu.add_social_account(refresh_token, profile_arn);
    let (status, _, body) = social_refresh(emu, refresh_token, Some(KIRO_UA)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (id, body["accessToken"].as_str().expect("accessToken").to_owned())
}

/// `chat(content)` on `model`, with `additionalModelRequestFields` when given.
fn chat_on(content: &str, model: &str, fields: Option<Value>) -> Value {
    let mut body = chat(content);
    body["conversationState"]["currentMessage"]["userInputMessage"]["modelId"] = json!(model);
    if let Some(fields) = fields {
        body["additionalModelRequestFields"] = fields;
    }
    body
}

fn with_profile(mut body: Value, arn: &str) -> Value {
    body["profileArn"] = json!(arn);
    body
}

/// Reads an error answer and checks its exception name, message and `reason` member (`None`:
/// absent; `Some(Value::Null)`: `"reason": null`).
async fn expect_error(
    resp: Response<Incoming>,
    status: StatusCode,
    name: &str,
    message: Option<&str>,
    reason: Option<Value>,
) -> Value {
    let (got, headers, body) = read_json(resp).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["__type"], format!("com.amazon.aws.codewhisperer#{name}"), "{body}");
    if let Some(message) = message {
        assert_eq!(body["message"], message, "{body}");
    }
    assert_eq!(body.get("reason").cloned(), reason, "{body}");
    assert!(headers["x-amzn-errortype"].to_str().unwrap().starts_with(&format!("{name}:")));
    body
}

/// The signature a reasoning stream carried, and its text.
fn reasoning_of(stream: &Stream) -> (String, String, usize) {
    let events = stream.events("reasoningContentEvent");
    let text: String = events.iter().filter_map(|e| e["text"].as_str()).collect();
    let pieces: Vec<&str> = events.iter().filter_map(|e| e["signature"].as_str()).collect();
    (text, pieces.concat(), pieces.len())
}

#[tokio::test]
async fn each_role_takes_its_credential_kinds() {
    let emu = emulator().await;
    let oidc = access_token(&emu).await;
    let (social_id, social) = social_account(&emu, "social-refresh-1", None).await;
    let key = emu.add_api_key("ksk_roles0123456789");

    // Amazon Q: OIDC and social yes; an API key is unknown there.
    for token in [&oidc, &social] {
        let stream = read_stream(send(q_call(&emu, Auth::Bearer(token), &chat("hi"))).await).await;
        assert_eq!(stream.status, StatusCode::OK);
        stream.assert_clean();
    }
    let resp = send(q_call(&emu, Auth::ApiKey(&key), &chat("hi"))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(BEARER_INVALID), None).await;

    // Runtime: social and API keys yes; OIDC tokens not authorized.
    for auth in [Auth::Bearer(&social), Auth::ApiKey(&key)] {
        let stream = read_stream(send(runtime_call(&emu, auth, &chat("over the runtime"))).await).await;
        assert_eq!(stream.status, StatusCode::OK);
        assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: over the runtime");
    }
    let resp = send(runtime_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(NOT_AUTHORIZED), None).await;
    // `/runtime` without the slash is the same role.
    let resp =
        send(rpc(&format!("http://{}/runtime", emu.addr()), TARGET, Auth::Bearer(&oidc), None, &chat("hi")))
            .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // Management: everyone.
    for auth in [Auth::Bearer(&oidc), Auth::Bearer(&social), Auth::ApiKey(&key)] {
        let resp =
            send(rpc(&emu.management_endpoint(), MODELS_TARGET, auth, None, &json!({"origin": "AI_EDITOR"})))
                .await;
        let (status, _, body) = read_json(resp).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(!body["models"].as_array().unwrap().is_empty());
    }

    assert_eq!(emu.stats_for(CLIENT).refused, 2);
    assert_eq!(emu.stats_for(&key).refused, 1);
    assert_eq!(emu.stats().refused, 3);
    let social_stats = emu.stats_for(&social_id);
    assert_eq!(
        (social_stats.requests, social_stats.runtime_requests, social_stats.catalog_requests),
        (2, 1, 1)
    );
    let key_stats = emu.stats_for(&key);
    assert_eq!((key_stats.requests, key_stats.runtime_requests), (1, 1));
}

#[tokio::test]
async fn role_access_is_configurable() {
    let emu = emulator_with(EmulatorOptions {
        runtime_accepts_oidc: true,
        q_accepts_api_keys: true,
        ..Default::default()
    })
    .await;
    let oidc = access_token(&emu).await;
    let key = emu.add_api_key("ksk_configurable01");
    assert_eq!(send(runtime_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await.status(), StatusCode::OK);
    assert_eq!(send(q_call(&emu, Auth::ApiKey(&key), &chat("hi"))).await.status(), StatusCode::OK);

    // Per account and role, then back to the options' rule.
    emu.set_role_access(CLIENT, Role::Runtime, Some(false));
    let resp = send(runtime_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(NOT_AUTHORIZED), None).await;
    emu.set_role_access(CLIENT, Role::AmazonQ, Some(false));
    let resp = send(q_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(NOT_AUTHORIZED), None).await;
    emu.set_role_access(CLIENT, Role::Runtime, None);
    assert_eq!(send(runtime_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await.status(), StatusCode::OK);
    assert_eq!(emu.stats_for(CLIENT).refused, 2);
}

#[tokio::test]
async fn a_switched_off_role_is_404() {
    let emu = emulator().await;
    let (_, social) = social_account(&emu, "social-refresh-off", None).await;
    emu.set_role_enabled(Role::AmazonQ, false);
    assert_eq!(send(q_call(&emu, Auth::Bearer(&social), &chat("hi"))).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(send(catalog_get(&emu, &social, "origin=AI_EDITOR")).await.status(), StatusCode::NOT_FOUND);
    // The other roles and the token endpoints still answer.
    assert_eq!(send(runtime_call(&emu, Auth::Bearer(&social), &chat("hi"))).await.status(), StatusCode::OK);
    let (status, _, _) = refresh(&emu, CLIENT, SECRET, REFRESH).await;
    assert_eq!(status, StatusCode::OK);
    emu.set_role_enabled(Role::AmazonQ, true);
    assert_eq!(send(q_call(&emu, Auth::Bearer(&social), &chat("hi"))).await.status(), StatusCode::OK);
    emu.set_role_enabled(Role::Runtime, false);
    assert_eq!(
        send(runtime_call(&emu, Auth::Bearer(&social), &chat("hi"))).await.status(),
        StatusCode::NOT_FOUND
    );
}

// ---- social accounts ----

#[tokio::test]
async fn social_refresh_rotates_and_returns_the_profile() {
    let emu = emulator().await;
    let id = emu.add_social_account("social-rt-0", Some(SOCIAL_ARN));
    assert!(id.starts_with("social-") && id.len() == "social-".len() + 16, "{id}");
    assert_eq!(
        emu.add_social_account("social-rt-0", Some(SOCIAL_ARN)),
        id,
        "the same refresh token, the same id"
    );
    assert_eq!(emu.live_refresh_token(&id).as_deref(), Some("social-rt-0"));

    let (status, headers, body) = social_refresh(&emu, "social-rt-0", Some(KIRO_UA)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers.contains_key("x-amzn-requestid"));
    let access = body["accessToken"].as_str().unwrap();
    assert!(access.len() > 100 && !access.contains('.'), "{access}");
    assert_eq!(body["expiresIn"], 3600);
    assert_eq!(body["profileArn"], SOCIAL_ARN);
    let rotated = body["refreshToken"].as_str().unwrap().to_owned();
    assert_ne!(rotated, "social-rt-0");
    assert_eq!(emu.live_refresh_token(&id).as_deref(), Some(rotated.as_str()));

    // The old token died at once.
    let (status, _, body) = social_refresh(&emu, "social-rt-0", Some(KIRO_UA)).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    assert!(body["error_description"].is_string());

    // The access token works, and the account sends its ARN.
    let stream =
        read_stream(send(q_call(&emu, Auth::Bearer(access), &with_profile(chat("hi"), SOCIAL_ARN))).await)
            .await;
    assert_eq!(stream.status, StatusCode::OK);
    let (status, _, _) = social_refresh(&emu, &rotated, Some(KIRO_UA)).await;
    assert_eq!(status, StatusCode::OK);

    let stats = emu.stats_for(&id);
    assert_eq!((stats.refreshes, stats.requests), (2, 1));
    assert_eq!(stats.refresh_user_agent.as_deref(), Some(KIRO_UA));
    assert_eq!((emu.stats().refreshes, emu.stats().refresh_failures), (2, 1));
}

#[tokio::test]
async fn social_refresh_needs_a_kiro_client_and_a_token() {
    let emu = emulator().await;
    let id = emu.add_social_account("social-rt-ua", None);
    for ua in [None, Some("aws-sdk-rust/1.3.9 os/linux"), Some("kiroide-0.9.2-abc")] {
        let (status, _, body) = social_refresh(&emu, "social-rt-ua", ua).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{ua:?}"
        );
    }
    for body in ["not json", "{}", r#"{"refreshToken": ""}"#, r#"{"refreshToken": 5}"#] {
        let req = Request::post(emu.social_token_endpoint())
            .header("user-agent", KIRO_UA)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let (status, _, answer) = read_json(send(req).await).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request")),
            "{body}"
        );
    }
    // None of that cost the account its chain.
    assert_eq!(emu.live_refresh_token(&id).as_deref(), Some("social-rt-ua"));
    assert_eq!(emu.stats().refresh_failures, 7);
    // An OIDC client id is no social refresh token, and a social account is no OIDC client.
    let (status, _, _) = social_refresh(&emu, REFRESH, Some(KIRO_UA)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, body) = refresh(&emu, &id, "", "social-rt-ua").await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_client")));
}

#[tokio::test]
async fn social_refresh_without_rotation_or_profile() {
    let emu = emulator_with(EmulatorOptions { rotate_refresh_tokens: false, ..Default::default() }).await;
    let id = emu.add_social_account("social-rt-keep", None);
    for _ in 0..2 {
        let (status, _, body) = social_refresh(&emu, "social-rt-keep", Some(KIRO_UA)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.get("refreshToken").is_none() && body.get("profileArn").is_none(), "{body}");
        // Without its own ARN, the account sends the fixed social one.
        let token = body["accessToken"].as_str().unwrap();
        let resp =
            send(q_call(&emu, Auth::Bearer(token), &with_profile(chat("hi"), SOCIAL_PROFILE_ARN))).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(emu.stats_for(&id).refreshes, 2);
}

#[tokio::test]
async fn dead_social_tokens_answer_as_configured() {
    let emu = emulator_with(EmulatorOptions {
        social_dead_token: SocialDeadToken::Unauthorized,
        ..Default::default()
    })
    .await;
    let id = emu.add_social_account("social-rt-dead", None);
    emu.revoke_refresh_token(&id);
    assert_eq!(emu.live_refresh_token(&id), None);
    let (status, _, body) = social_refresh(&emu, "social-rt-dead", Some(KIRO_UA)).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    // Registering it again revives it.
    emu.add_social_account_as(&id, "social-rt-dead", None);
    let (status, _, _) = social_refresh(&emu, "social-rt-dead", Some(KIRO_UA)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn social_rotation_grace_keeps_the_old_token_until_the_new_one_is_used() {
    let emu = emulator_with(EmulatorOptions { rotation_grace: true, ..Default::default() }).await;
    let id = emu.add_social_account("social-rt-grace", None);
    let (_, _, first) = social_refresh(&emu, "social-rt-grace", Some(KIRO_UA)).await;
    // The successor was "lost": the old token still works once more.
    let (status, _, second) = social_refresh(&emu, "social-rt-grace", Some(KIRO_UA)).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_ne!(first["refreshToken"], second["refreshToken"]);
    // Using the newest access token ends the grace.
    let token = second["accessToken"].as_str().unwrap();
    assert_eq!(send(runtime_call(&emu, Auth::Bearer(token), &chat("hi"))).await.status(), StatusCode::OK);
    let (status, _, _) = social_refresh(&emu, "social-rt-grace", Some(KIRO_UA)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(emu.live_refresh_token(&id).as_deref(), second["refreshToken"].as_str());
}

// ---- API keys ----

#[tokio::test]
async fn api_keys_need_the_tokentype_header() {
    let emu = emulator().await;
    let key = emu.add_api_key("ksk_0123456789abcdef");
    assert_eq!(key, "ksk_0123456789abcdef");
    assert_eq!(emu.live_refresh_token(&key), None, "an API key has nothing to refresh");

    let resp = send(runtime_call(&emu, Auth::Bearer(&key), &chat("hi"))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(BEARER_INVALID), None).await;
    let mut wrong_value = runtime_call(&emu, Auth::Bearer(&key), &chat("hi"));
    wrong_value.headers_mut().insert("tokentype", "BEARER".parse().unwrap());
    assert_eq!(send(wrong_value).await.status(), StatusCode::FORBIDDEN);
    let stream = read_stream(send(runtime_call(&emu, Auth::ApiKey(&key), &chat("keyed"))).await).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: keyed");

    // An access token sent as an API key, and an unknown key, are no credentials.
    let oidc = access_token(&emu).await;
    assert_eq!(
        send(runtime_call(&emu, Auth::ApiKey(&oidc), &chat("hi"))).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(runtime_call(&emu, Auth::ApiKey("ksk_unknown"), &chat("hi"))).await.status(),
        StatusCode::FORBIDDEN
    );
    // No profile ARN: an API key sends none, and any it sends is refused.
    let resp =
        send(runtime_call(&emu, Auth::ApiKey(&key), &with_profile(chat("hi"), SOCIAL_PROFILE_ARN))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(NOT_AUTHORIZED), None).await;

    emu.revoke_api_key(&key);
    let resp = send(runtime_call(&emu, Auth::ApiKey(&key), &chat("hi"))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(BEARER_INVALID), None).await;
    emu.add_api_key(&key);
    assert_eq!(send(runtime_call(&emu, Auth::ApiKey(&key), &chat("hi"))).await.status(), StatusCode::OK);
    assert_eq!(emu.stats_for(&key).requests, 3);
}

// ---- profile ARNs ----

#[tokio::test]
async fn list_available_profiles() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let call = |auth, body: Value| rpc(&emu.endpoint(), PROFILES_TARGET, auth, None, &body);
    let (status, headers, body) =
        read_json(send(call(Auth::Bearer(&token), json!({"maxResults": 10}))).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/x-amz-json-1.0");
    assert_eq!(body, json!({"profiles": []}), "a Builder ID account has no profile");

    emu.set_profile_arn(CLIENT, Some(IDC_ARN));
    let (_, _, body) = read_json(send(call(Auth::Bearer(&token), json!({}))).await).await;
    assert_eq!(
        body,
        json!({"profiles": [{"arn": IDC_ARN, "profileName": "emulator-IDCPROFILE01", "region": "eu-central-1"}]})
    );

    let resp = send(call(Auth::Bearer(&token), json!({"maxResults": 0}))).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(Value::Null)).await;
    let key = emu.add_api_key("ksk_profiles");
    let resp = send(call(Auth::ApiKey(&key), json!({}))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(BEARER_INVALID), None).await;
    let resp = send(call(Auth::Nothing, json!({}))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let mut wrong_type = call(Auth::Bearer(&token), json!({}));
    wrong_type.headers_mut().insert("content-type", "application/json".parse().unwrap());
    expect_error(send(wrong_type).await, StatusCode::BAD_REQUEST, "SerializationException", None, None).await;
    assert_eq!(emu.stats_for(CLIENT).profile_requests, 3);
    assert_eq!(emu.stats().profile_requests, 3);
    assert_eq!(emu.stats().requests, 0, "listing calls are no chat requests");
}

#[tokio::test]
async fn profile_arn_rules_for_chat_calls() {
    let emu = emulator().await;
    let oidc = access_token(&emu).await;
    let (_, social) = social_account(&emu, "social-rt-arn", None).await;
    let ok = |resp: Response<Incoming>| {
        assert_eq!(resp.status(), StatusCode::OK);
    };

    // A Builder ID account: nothing, or the placeholder; another ARN is not authorized.
    ok(send(q_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await);
    ok(send(q_call(&emu, Auth::Bearer(&oidc), &with_profile(chat("hi"), BUILDER_ID_PROFILE_ARN))).await);
    let resp = send(q_call(&emu, Auth::Bearer(&oidc), &with_profile(chat("hi"), OTHER_ARN))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(NOT_AUTHORIZED), None).await;
    // A social account without its own ARN: the fixed social one.
    ok(send(q_call(&emu, Auth::Bearer(&social), &with_profile(chat("hi"), SOCIAL_PROFILE_ARN))).await);
    let resp =
        send(q_call(&emu, Auth::Bearer(&social), &with_profile(chat("hi"), BUILDER_ID_PROFILE_ARN))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // An IdC account: exactly its ARN, always.
    emu.set_profile_arn(CLIENT, Some(IDC_ARN));
    ok(send(q_call(&emu, Auth::Bearer(&oidc), &with_profile(chat("hi"), IDC_ARN))).await);
    let resp = send(q_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await;
    expect_error(
        resp,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        Some(PROFILE_REQUIRED),
        Some(Value::Null),
    )
    .await;
    for arn in [BUILDER_ID_PROFILE_ARN, OTHER_ARN] {
        let resp = send(q_call(&emu, Auth::Bearer(&oidc), &with_profile(chat("hi"), arn))).await;
        expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(NOT_AUTHORIZED), None).await;
    }
    emu.set_profile_arn(CLIENT, None);
    ok(send(q_call(&emu, Auth::Bearer(&oidc), &chat("hi"))).await);
}

#[tokio::test]
async fn require_profile_arn_refuses_calls_without_one() {
    let emu = emulator_with(EmulatorOptions { require_profile_arn: true, ..Default::default() }).await;
    let oidc = access_token(&emu).await;
    let (_, social) = social_account(&emu, "social-rt-req", None).await;
    let key = emu.add_api_key("ksk_required");
    for (auth, arn, runtime) in [
        (Auth::Bearer(&oidc), BUILDER_ID_PROFILE_ARN, false),
        (Auth::Bearer(&social), SOCIAL_PROFILE_ARN, true),
    ] {
        let call =
            |body: &Value| if runtime { runtime_call(&emu, auth, body) } else { q_call(&emu, auth, body) };
        let resp = send(call(&chat("hi"))).await;
        expect_error(
            resp,
            StatusCode::BAD_REQUEST,
            "ValidationException",
            Some(PROFILE_REQUIRED),
            Some(Value::Null),
        )
        .await;
        assert_eq!(send(call(&with_profile(chat("hi"), arn))).await.status(), StatusCode::OK);
    }
    assert_eq!(send(runtime_call(&emu, Auth::ApiKey(&key), &chat("hi"))).await.status(), StatusCode::OK);
    // The catalog too.
    let resp = send(catalog_get(&emu, &oidc, "origin=AI_EDITOR")).await;
    expect_error(
        resp,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        Some(PROFILE_REQUIRED),
        Some(Value::Null),
    )
    .await;
    let query = format!(
        "origin=AI_EDITOR&profileArn={}",
        BUILDER_ID_PROFILE_ARN.replace(':', "%3A").replace('/', "%2F")
    );
    assert_eq!(send(catalog_get(&emu, &oidc, &query)).await.status(), StatusCode::OK);
}

// ---- the catalog ----

#[tokio::test]
async fn catalog_lists_the_default_models() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let (status, headers, body) = read_json(send(catalog_get(&emu, &token, "origin=AI_EDITOR")).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    assert!(body.get("nextToken").is_none());
    assert_eq!(body["defaultModel"], json!({"modelId": "claude-sonnet-4.5"}));
    let models = body["models"].as_array().unwrap();
    assert_eq!(models.len(), default_catalog().len());
    let model =
        |id: &str| models.iter().find(|m| m["modelId"] == id).unwrap_or_else(|| panic!("{id} listed"));
    for id in [
        "claude-haiku-4.5",
        "claude-sonnet-4.5-1m",
        "claude-opus-4.7",
        "claude-opus-5",
        "claude-fable-5",
        "gpt-5.6-terra",
        "deepseek-3.2",
        "glm-5",
        "qwen3-coder-next",
        "auto",
    ] {
        model(id);
    }
    let opus = model("claude-opus-4.8");
    assert_eq!(opus["tokenLimits"], json!({"maxInputTokens": 1_000_000, "maxOutputTokens": 128_000}));
    for member in ["modelName", "description", "rateMultiplier", "supportedInputTypes"] {
        assert!(opus.get(member).is_some(), "{member}: {opus}");
    }
    assert_eq!(opus["promptCaching"]["supportsPromptCaching"], true);
    assert!(opus["promptCaching"]["maximumCacheCheckpointsPerRequest"].as_u64().unwrap() > 0);
    let schema = &opus["additionalModelRequestFieldsSchema"];
    assert_eq!(schema["additionalProperties"], false);
    assert!(
        schema["properties"]["output_config"]["properties"]["effort"]["enum"]
            .as_array()
            .unwrap()
            .contains(&json!("xhigh"))
    );
    assert_eq!(model("claude-sonnet-5")["tokenLimits"]["maxInputTokens"], 1_000_000);
    assert_eq!(model("claude-sonnet-4.6")["tokenLimits"]["maxOutputTokens"], 64_000);
    let sonnet45 = model("claude-sonnet-4.5");
    assert_eq!(sonnet45["tokenLimits"]["maxInputTokens"], 200_000);
    assert!(sonnet45.get("additionalModelRequestFieldsSchema").is_none());
    assert_eq!(model("deepseek-3.2")["supportedInputTypes"], json!(["TEXT"]));

    // The management role lists the same.
    let resp = send(rpc(
        &emu.management_endpoint(),
        MODELS_TARGET,
        Auth::Bearer(&token),
        None,
        &json!({"origin": "AI_EDITOR"}),
    ))
    .await;
    let (status, headers, managed) = read_json(resp).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/x-amz-json-1.0");
    assert_eq!(managed, body);
    assert_eq!(emu.stats_for(CLIENT).catalog_requests, 2);
}

#[tokio::test]
async fn catalog_calls_are_checked() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    for query in [
        "",
        "origin=WEB",
        "origin=AI_EDITOR&maxResults=0",
        "origin=AI_EDITOR&maxResults=x",
        "origin=AI_EDITOR&nextToken=bogus",
    ] {
        let resp = send(catalog_get(&emu, &token, query)).await;
        expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(Value::Null)).await;
    }
    assert_eq!(
        send(catalog_get(&emu, "aoaUnknown", "origin=AI_EDITOR")).await.status(),
        StatusCode::FORBIDDEN
    );
    let key = emu.add_api_key("ksk_catalog");
    let mut keyed = catalog_get(&emu, &key, "origin=AI_EDITOR");
    keyed.headers_mut().insert("tokentype", "API_KEY".parse().unwrap());
    assert_eq!(send(keyed).await.status(), StatusCode::FORBIDDEN, "the Amazon Q role does not know API keys");
    let management = |target: &str, body: Value| {
        rpc(&emu.management_endpoint(), target, Auth::Bearer(&token), None, &body)
    };
    let resp = send(management("KiroControlPlaneBearerService.GetUsageLimits", json!({}))).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "UnknownOperationException", None, None).await;
    let resp = send(management(MODELS_TARGET, json!({}))).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(Value::Null)).await;
    let resp = send(management(MODELS_TARGET, json!(["origin"]))).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "SerializationException", None, None).await;

    // An IdC account names its profile, percent-encoded in the query.
    emu.set_profile_arn(CLIENT, Some(IDC_ARN));
    let resp = send(catalog_get(&emu, &token, "origin=AI_EDITOR")).await;
    expect_error(
        resp,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        Some(PROFILE_REQUIRED),
        Some(Value::Null),
    )
    .await;
    let encoded = IDC_ARN.replace(':', "%3A").replace('/', "%2F");
    assert_eq!(
        send(catalog_get(&emu, &token, &format!("origin=AI_EDITOR&profileArn={encoded}"))).await.status(),
        StatusCode::OK
    );
    let resp = send(management(MODELS_TARGET, json!({"origin": "CLI", "profileArn": OTHER_ARN}))).await;
    expect_error(resp, StatusCode::FORBIDDEN, "AccessDeniedException", Some(NOT_AUTHORIZED), None).await;

    // Listing behaviours fail listing calls only.
    emu.set_profile_arn(CLIENT, None);
    emu.set_listing_behaviour(CLIENT, Behaviour::Suspended);
    let resp = send(catalog_get(&emu, &token, "origin=AI_EDITOR")).await;
    expect_error(
        resp,
        StatusCode::FORBIDDEN,
        "AccessDeniedException",
        None,
        Some(json!("TEMPORARILY_SUSPENDED")),
    )
    .await;
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &chat("hi"))).await.status(), StatusCode::OK);
    emu.set_listing_behaviour(CLIENT, Behaviour::Normal);
    assert_eq!(send(catalog_get(&emu, &token, "origin=AI_EDITOR")).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn catalog_pages_follow_next_token() {
    let emu = emulator_with(EmulatorOptions { catalog_page_size: Some(6), ..Default::default() }).await;
    let token = access_token(&emu).await;
    let mut ids = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let body = match &next {
            Some(t) => json!({"origin": "AI_EDITOR", "nextToken": t}),
            None => json!({"origin": "AI_EDITOR"}),
        };
        let resp =
            send(rpc(&emu.management_endpoint(), MODELS_TARGET, Auth::Bearer(&token), None, &body)).await;
        let (status, _, page) = read_json(resp).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page["models"].as_array().unwrap().len() <= 6);
        assert_eq!(page["defaultModel"]["modelId"], "claude-sonnet-4.5", "on every page");
        ids.extend(
            page["models"].as_array().unwrap().iter().map(|m| m["modelId"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        match page.get("nextToken").and_then(Value::as_str) {
            Some(t) => next = Some(t.to_owned()),
            None => break,
        }
    }
    let all: Vec<String> = default_catalog().into_iter().map(|m| m.model_id).collect();
    assert_eq!(ids, all);
    assert_eq!(pages, all.len().div_ceil(6));
    // maxResults makes pages smaller still.
    let (_, _, page) =
        read_json(send(catalog_get(&emu, &token, "origin=AI_EDITOR&maxResults=2")).await).await;
    assert_eq!(page["models"].as_array().unwrap().len(), 2);
    assert!(page["nextToken"].is_string());
}

#[tokio::test]
async fn an_account_s_catalog_limits_its_models() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    emu.set_catalog(CLIENT, non_claude_catalog());
    assert!(emu.catalog_for(CLIENT).iter().all(|m| !m.model_id.starts_with("claude")));
    let (_, _, body) = read_json(send(catalog_get(&emu, &token, "origin=AI_EDITOR")).await).await;
    let listed: Vec<&str> =
        body["models"].as_array().unwrap().iter().map(|m| m["modelId"].as_str().unwrap()).collect();
    assert!(!listed.is_empty() && listed.iter().all(|id| !id.starts_with("claude")), "{listed:?}");
    assert_eq!(body["defaultModel"]["modelId"], "auto");

    let resp = send(q_call(&emu, Auth::Bearer(&token), &chat("hi"))).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(json!("INVALID_MODEL_ID")))
        .await;
    let stream =
        read_stream(send(q_call(&emu, Auth::Bearer(&token), &chat_on("hi", "glm-5", None))).await).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.events("assistantResponseEvent")[0]["modelId"], "glm-5");
    // No modelId: the default model, here `auto`.
    let mut no_model = chat("hi");
    no_model["conversationState"]["currentMessage"]["userInputMessage"]
        .as_object_mut()
        .unwrap()
        .remove("modelId");
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &no_model)).await.status(), StatusCode::OK);
    // An empty catalog takes nothing at all.
    emu.set_catalog(CLIENT, Vec::new());
    let resp = send(q_call(&emu, Auth::Bearer(&token), &no_model)).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(json!("INVALID_MODEL_ID")))
        .await;
    // Other accounts keep the default catalog.
    let other = access_token_of(&emu, "client-b", "secret-b").await;
    assert_eq!(send(q_call(&emu, Auth::Bearer(&other), &chat("hi"))).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_custom_catalog_entry_is_served_and_enforced() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let schema = amq2api::emulator::catalog::claude_reasoning_schema(8_000, false);
    let mut custom = ModelEntry::new("claude-custom-1", 50_000, 8_000).with_schema(schema);
    custom.supported_input_types = vec!["TEXT".to_owned()];
    emu.set_catalog(CLIENT, vec![custom.clone(), ModelEntry::new("plain-1", 10_000, 1_000)]);
    let (_, _, body) = read_json(send(catalog_get(&emu, &token, "origin=CLI")).await).await;
    assert_eq!(body["models"][0], custom.to_json());
    assert_eq!(body["models"][0]["tokenLimits"], json!({"maxInputTokens": 50_000, "maxOutputTokens": 8_000}));
    assert_eq!(body["defaultModel"]["modelId"], "claude-custom-1");
    let ok = chat_on(
        "hi",
        "claude-custom-1",
        Some(json!({"max_tokens": 8_000, "thinking": {"type": "adaptive"}})),
    );
    let stream = read_stream(send(q_call(&emu, Auth::Bearer(&token), &ok)).await).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert!(!stream.events("reasoningContentEvent").is_empty());
    // The percentage is against this model's 50,000 tokens.
    let percentage = stream.events("contextUsageEvent")[0]["contextUsagePercentage"].as_f64().unwrap();
    let expected = ok.to_string().len() as f64 / 4.0 / 50_000.0 * 100.0;
    assert!((percentage - expected).abs() < 0.001, "{percentage} vs {expected}");
    let too_many = chat_on("hi", "claude-custom-1", Some(json!({"max_tokens": 8_001})));
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &too_many)).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        send(q_call(&emu, Auth::Bearer(&token), &chat_on("hi", "plain-1", None))).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn every_model_the_daemon_maps_to_is_in_the_default_catalog() {
    let map = amq2api::translate::models::ModelMap::default();
    let emu = emulator().await;
    let token = access_token(&emu).await;
    for listed in map.list() {
        let q_model = map.resolve(&listed.id).expect("a listed model resolves");
        let stream =
            read_stream(send(q_call(&emu, Auth::Bearer(&token), &chat_on("hi", &q_model, None))).await).await;
        assert_eq!(stream.status, StatusCode::OK, "{} → {q_model}", listed.id);
    }
}

#[tokio::test]
async fn input_types_and_cache_points_follow_the_model() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let image = json!([{"format": "png", "source": {"bytes": "iVBORw0KGgo="}}]);
    let mut with_image = chat_on("look", "deepseek-3.2", None);
    with_image["conversationState"]["currentMessage"]["userInputMessage"]["images"] = image.clone();
    let resp = send(q_call(&emu, Auth::Bearer(&token), &with_image)).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(Value::Null)).await;
    with_image["conversationState"]["currentMessage"]["userInputMessage"]["modelId"] =
        json!("claude-sonnet-4.5");
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &with_image)).await.status(), StatusCode::OK);

    let mut cached = chat("cache me");
    let user = &mut cached["conversationState"]["currentMessage"]["userInputMessage"];
    user["cachePoint"] = json!({"type": "default"});
    user["userInputMessageContext"]["tools"]
        .as_array_mut()
        .unwrap()
        .push(json!({"cachePoint": {"type": "default"}}));
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &cached)).await.status(), StatusCode::OK);
    let mut too_many = cached.clone();
    let tools = too_many["conversationState"]["currentMessage"]["userInputMessage"]["userInputMessageContext"]["tools"]
        .as_array_mut()
        .unwrap();
    for _ in 0..3 {
        tools.push(json!({"cachePoint": {"type": "default"}}));
    }
    let resp = send(q_call(&emu, Auth::Bearer(&token), &too_many)).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(Value::Null)).await;
    cached["conversationState"]["currentMessage"]["userInputMessage"]["modelId"] = json!("glm-5");
    let resp = send(q_call(&emu, Auth::Bearer(&token), &cached)).await;
    expect_error(resp, StatusCode::BAD_REQUEST, "ValidationException", None, Some(Value::Null)).await;
    let mut bad_shape = chat("hi");
    bad_shape["conversationState"]["currentMessage"]["userInputMessage"]["cachePoint"] =
        json!({"type": "ephemeral"});
    let resp = send(q_call(&emu, Auth::Bearer(&token), &bad_shape)).await;
    expect_error(
        resp,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        Some("Improperly formed request."),
        Some(Value::Null),
    )
    .await;
}

// ---- native reasoning ----

#[tokio::test]
async fn native_reasoning_streams_text_then_a_signature_in_pieces() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let fields =
        json!({"thinking": {"type": "adaptive"}, "output_config": {"effort": "xhigh"}, "max_tokens": 32000});
    let stream = read_stream(
        send(q_call(&emu, Auth::Bearer(&token), &chat_on("Why?", "claude-opus-4.8", Some(fields)))).await,
    )
    .await;
    stream.assert_clean();
    let types = stream.event_types();
    let first_text = types.iter().position(|t| t == "assistantResponseEvent").unwrap();
    let last_reasoning = types.iter().rposition(|t| t == "reasoningContentEvent").unwrap();
    assert!(last_reasoning < first_text, "{types:?}");
    let events = stream.events("reasoningContentEvent");
    let first_signature = events.iter().position(|e| e.get("signature").is_some()).unwrap();
    assert!(events[..first_signature].iter().all(|e| e["text"].is_string()), "text first");
    assert!(events[first_signature..].iter().all(|e| e["signature"].is_string()), "then only signature");
    let (text, signature, pieces) = reasoning_of(&stream);
    assert!(text.contains("Why?") && text.contains("xhigh"), "{text}");
    assert!(pieces > 1, "the signature comes in pieces");
    assert!(emu.verify_reasoning(&text, &signature));
    assert!(!emu.verify_reasoning(&format!("{text} "), &signature));
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: Why?");

    // Thinking disabled by omission: no reasoning at all.
    let plain = read_stream(
        send(q_call(
            &emu,
            Auth::Bearer(&token),
            &chat_on("Why?", "claude-opus-4.8", Some(json!({"max_tokens": 2048}))),
        ))
        .await,
    )
    .await;
    assert!(plain.events("reasoningContentEvent").is_empty());
}

/// A conversation whose history replays an assistant turn with `reasoning`.
fn replay(model: &str, reasoning: Value) -> Value {
    json!({"conversationState": {
        "chatTriggerType": "MANUAL",
        "history": [
            {"userInputMessage": {"content": "Why?", "modelId": model}},
            {"assistantResponseMessage": {"content": "Because.", "reasoningContent": reasoning}}
        ],
        "currentMessage": {"userInputMessage": {"content": "And then?", "modelId": model}}
    }})
}

#[tokio::test]
async fn replayed_reasoning_must_verify() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let fields = json!({"thinking": {"type": "enabled", "budget_tokens": 2048}});
    let stream = read_stream(
        send(q_call(&emu, Auth::Bearer(&token), &chat_on("Why?", "claude-sonnet-5", Some(fields)))).await,
    )
    .await;
    let (text, signature, _) = reasoning_of(&stream);

    let good = replay("claude-sonnet-5", json!({"reasoningText": {"text": text, "signature": signature}}));
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &good)).await.status(), StatusCode::OK);
    let made = emu.sign_reasoning("Made up by the test.");
    let signed = replay(
        "claude-sonnet-5",
        json!({"reasoningText": {"text": "Made up by the test.", "signature": made}}),
    );
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &signed)).await.status(), StatusCode::OK);

    for (text, signature) in [
        (format!("{text}!"), signature.clone()),
        // The first character changed (to one it is not: 'A' stays a signature 1 time in 64).
        (text.clone(), format!("{}{}", if signature.starts_with('A') { 'B' } else { 'A' }, &signature[1..])),
        (text.clone(), String::new()),
    ] {
        let bad = replay("claude-sonnet-5", json!({"reasoningText": {"text": text, "signature": signature}}));
        let resp = send(q_call(&emu, Auth::Bearer(&token), &bad)).await;
        expect_error(
            resp,
            StatusCode::BAD_REQUEST,
            "ValidationException",
            None,
            Some(json!("THINKING_SIGNATURE_INVALID")),
        )
        .await;
    }
    // Another emulator's signature is no good here.
    let other = Emulator::start(EmulatorOptions::default()).await.unwrap();
    let foreign = replay(
        "claude-sonnet-5",
        json!({"reasoningText": {"text": "x", "signature": other.sign_reasoning("x")}}),
    );
    assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &foreign)).await.status(), StatusCode::BAD_REQUEST);

    // A flat shape is a malformed body.
    let flat = replay("claude-sonnet-5", json!({"text": text, "signature": signature}));
    let resp = send(q_call(&emu, Auth::Bearer(&token), &flat)).await;
    expect_error(
        resp,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        Some("Improperly formed request."),
        Some(json!("REQUEST_BODY_INVALID")),
    )
    .await;
}

#[tokio::test]
async fn redacted_thinking_round_trips() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let stream = read_stream(
        send(q_call(&emu, Auth::Bearer(&token), &chat("Secret?\n#emulator: redacted-thinking"))).await,
    )
    .await;
    stream.assert_clean();
    let events = stream.events("reasoningContentEvent");
    assert_eq!(events.len(), 1, "{events:?}");
    let redacted = events[0]["redactedContent"].as_str().unwrap().to_owned();
    assert!(events[0].get("text").is_none() && events[0].get("signature").is_none());
    assert_eq!(stream.text(), "Hello from the Amazon Q emulator. You said: Secret?");

    for content in [redacted.clone(), emu.redacted_reasoning()] {
        let body = replay("claude-sonnet-4.5", json!({"redactedContent": content}));
        assert_eq!(send(q_call(&emu, Auth::Bearer(&token), &body)).await.status(), StatusCode::OK);
    }
    let mut raw = base64_decode(&redacted);
    raw[20] ^= 1;
    let body = replay("claude-sonnet-4.5", json!({"redactedContent": base64_encode(&raw)}));
    let resp = send(q_call(&emu, Auth::Bearer(&token), &body)).await;
    expect_error(
        resp,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        None,
        Some(json!("THINKING_SIGNATURE_INVALID")),
    )
    .await;
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[tokio::test]
async fn gpt_models_reason_opaquely() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let fields = json!({"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}});
    let stream = read_stream(
        send(q_call(&emu, Auth::Bearer(&token), &chat_on("Hm?", "gpt-5.6-sol", Some(fields)))).await,
    )
    .await;
    let (text, signature, _) = reasoning_of(&stream);
    assert_eq!(text, "...");
    assert!(emu.verify_reasoning("...", &signature));
    let fields = json!({"output_config": {"effort": "xhigh"}});
    let resp = send(q_call(&emu, Auth::Bearer(&token), &chat_on("Hm?", "gpt-5.6-sol", Some(fields)))).await;
    expect_error(
        resp,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        Some("Invalid additionalModelRequestFields"),
        Some(Value::Null),
    )
    .await;
}

#[tokio::test]
async fn additional_fields_follow_the_model_s_schema() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let call =
        |model: &str, fields: Value| q_call(&emu, Auth::Bearer(&token), &chat_on("hi", model, Some(fields)));
    let not_supported = "additionalModelRequestFields is not supported for this model";
    for model in ["claude-sonnet-4.5", "claude-haiku-4.5", "claude-opus-4.5", "deepseek-3.2"] {
        let resp = send(call(model, json!({"thinking": {"type": "adaptive"}}))).await;
        expect_error(
            resp,
            StatusCode::BAD_REQUEST,
            "ValidationException",
            Some(not_supported),
            Some(Value::Null),
        )
        .await;
        assert_eq!(
            send(call(model, json!({}))).await.status(),
            StatusCode::OK,
            "{model}: an empty object is no field"
        );
    }
    let invalid = [
        ("claude-opus-4.6", json!({"output_config": {"effort": "xhigh"}})),
        ("claude-sonnet-4.6", json!({"output_config": {"effort": "xhigh"}})),
        ("claude-opus-4.8", json!({"max_tokens": 128_001})),
        ("claude-opus-4.7", json!({"max_tokens": 64_001})),
        ("claude-sonnet-5", json!({"max_tokens": 1000})),
        ("claude-opus-4.8", json!({"temperature": 0.5})),
        ("claude-opus-4.8", json!({"thinking": {"type": "disabled"}})),
        ("claude-opus-4.8", json!({"thinking": {"budget_tokens": 2048}})),
        ("claude-opus-4.8", json!({"thinking": {"type": "adaptive", "display": "verbose"}})),
        ("claude-opus-4.8", json!("adaptive")),
    ];
    for (model, fields) in invalid {
        let resp = send(call(model, fields.clone())).await;
        let body = expect_error(
            resp,
            StatusCode::BAD_REQUEST,
            "ValidationException",
            Some("Invalid additionalModelRequestFields"),
            Some(Value::Null),
        )
        .await;
        assert!(!body.to_string().is_empty(), "{model} {fields}");
    }
    let valid = [
        ("claude-opus-4.7", json!({"output_config": {"effort": "xhigh"}})),
        ("claude-fable-5", json!({"output_config": {"effort": "xhigh"}, "max_tokens": 128_000})),
        ("claude-opus-4.6", json!({"output_config": {"effort": "max"}, "max_tokens": 64_000})),
        (
            "claude-sonnet-4.6",
            json!({"thinking": {"type": "enabled", "budget_tokens": 1024, "display": "summarized"}}),
        ),
    ];
    for (model, fields) in valid {
        assert_eq!(send(call(model, fields.clone())).await.status(), StatusCode::OK, "{model} {fields}");
    }
}

// ---- the end of a stream ----

#[tokio::test]
async fn streams_end_like_live_streams() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let prompt = "x".repeat(4000);
    let mut percentages = Vec::new();
    let mut usages = Vec::new();
    for model in ["claude-sonnet-4.5", "claude-opus-4.8"] {
        let stream =
            read_stream(send(q_call(&emu, Auth::Bearer(&token), &chat_on(&prompt, model, None))).await).await;
        let types = stream.event_types();
        assert_eq!(
            &types[types.len() - 3..],
            ["metadataEvent", "contextUsageEvent", "meteringEvent"],
            "{types:?}"
        );
        assert_eq!(stream.events("metadataEvent")[0]["stopReason"], "END_TURN");
        percentages.push(stream.events("contextUsageEvent")[0]["contextUsagePercentage"].as_f64().unwrap());
        let metering = &stream.events("meteringEvent")[0];
        assert_eq!(
            (metering["unit"].as_str(), metering["unitPlural"].as_str()),
            (Some("credit"), Some("credits"))
        );
        usages.push(metering["usage"].as_f64().unwrap());
    }
    // The same input is five times the share of a 200k window that it is of a 1M one.
    let ratio = percentages[0] / percentages[1];
    assert!((ratio - 5.0).abs() < 0.05, "{percentages:?}");
    let request_tokens = chat_on(&prompt, "claude-sonnet-4.5", None).to_string().len() as f64 / 4.0;
    assert!(
        (percentages[0] / 100.0 * 200_000.0 - request_tokens).abs() < 1.0,
        "{percentages:?} vs {request_tokens}"
    );
    // Credits scale with the model's rate (Opus 2.2 against Sonnet 1.3) and add up per account.
    assert!(usages[1] > usages[0], "{usages:?}");
    let credits = emu.stats_for(CLIENT).credits;
    assert!((credits - usages.iter().sum::<f64>()).abs() < 1e-9, "{credits} vs {usages:?}");

    // A tool call ends with TOOL_USE.
    let stream =
        read_stream(send(q_call(&emu, Auth::Bearer(&token), &chat("#emulator: tool get_time"))).await).await;
    assert_eq!(stream.events("metadataEvent")[0]["stopReason"], "TOOL_USE");
}

#[tokio::test]
async fn token_usage_is_reported_when_asked_for() {
    let emu = emulator_with(EmulatorOptions { token_usage: true, ..Default::default() }).await;
    let token = access_token(&emu).await;
    let body = chat("#emulator: text Exactly forty characters of answer text.");
    let stream = read_stream(send(q_call(&emu, Auth::Bearer(&token), &body)).await).await;
    let metadata = &stream.events("metadataEvent")[0];
    assert_eq!(metadata["stopReason"], "END_TURN");
    let usage = &metadata["tokenUsage"];
    let input = usage["uncachedInputTokens"].as_u64().unwrap();
    assert_eq!(input, (body.to_string().len() as u64).div_ceil(4));
    assert_eq!(usage["outputTokens"], 10);
    assert_eq!(usage["totalTokens"], input + 10);
    assert_eq!(
        (usage["cacheReadInputTokens"].as_u64(), usage["cacheWriteInputTokens"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn max_tokens_cuts_the_answer() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let body = chat_on("#emulator: long 10000", "claude-opus-4.8", Some(json!({"max_tokens": 1024})));
    let stream = read_stream(send(q_call(&emu, Auth::Bearer(&token), &body)).await).await;
    stream.assert_clean();
    assert_eq!(stream.text().chars().count(), 4096);
    assert_eq!(stream.events("metadataEvent")[0]["stopReason"], "MAX_TOKENS");
    // Under the cap nothing changes.
    let body = chat_on("#emulator: long 4000", "claude-opus-4.8", Some(json!({"max_tokens": 1024})));
    let stream = read_stream(send(q_call(&emu, Auth::Bearer(&token), &body)).await).await;
    assert_eq!(stream.text().chars().count(), 4000);
    assert_eq!(stream.events("metadataEvent")[0]["stopReason"], "END_TURN");
}

// ---- 2026 error answers, in detail ----

#[tokio::test]
async fn the_2026_error_messages() {
    let emu = emulator().await;
    let token = access_token(&emu).await;
    let call =
        |directive: &str| q_call(&emu, Auth::Bearer(&token), &chat(&format!("#emulator: {directive}")));
    let body = expect_error(
        send(call("suspicious")).await,
        StatusCode::TOO_MANY_REQUESTS,
        "ThrottlingException",
        None,
        Some(Value::Null),
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("Due to suspicious activity, we are imposing temporary limits")
    );
    let body =
        expect_error(send(call("locked")).await, StatusCode::FORBIDDEN, "AccessDeniedException", None, None)
            .await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("temporarily is suspended") && message.contains("We've locked your account"),
        "{message}"
    );
    let body = expect_error(
        send(call("high-traffic")).await,
        StatusCode::TOO_MANY_REQUESTS,
        "ThrottlingException",
        None,
        Some(json!("INSUFFICIENT_MODEL_CAPACITY")),
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("The model you've selected is experiencing a high volume of traffic")
    );
    expect_error(
        send(call("profile-required")).await,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        Some(PROFILE_REQUIRED),
        Some(Value::Null),
    )
    .await;
    expect_error(
        send(call("overage")).await,
        StatusCode::PAYMENT_REQUIRED,
        "ServiceQuotaExceededException",
        None,
        Some(json!("OVERAGE_REQUEST_LIMIT_EXCEEDED")),
    )
    .await;
}

// ---- user agents ----

#[tokio::test]
async fn user_agents_are_recorded_per_account() {
    let emu = emulator().await;
    let token_a = access_token(&emu).await;
    let token_b = access_token_of(&emu, "client-b", "secret-b").await;
    let (social, social_token) = social_account(&emu, "social-rt-ua-rec", None).await;
    let ua = |n: &str| {
        format!(
            "aws-sdk-rust/1.3.9 os/linux lang/rust/1.85.0 md/appVersion-1.19.4 app/AmazonQ-For-CLI md/machine-{n}"
        )
    };
    let (ua_a, ua_b) = (ua("a"), ua("b"));

    // OIDC refresh, chat, catalog: each recorded.
    let body = json!({"clientId": CLIENT, "clientSecret": SECRET, "grantType": "refresh_token", "refreshToken": emu.live_refresh_token(CLIENT).unwrap()});
    let req = Request::post(emu.token_endpoint())
        .header("user-agent", ua_a.as_str())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    assert_eq!(send(req).await.status(), StatusCode::OK);
    let resp = send(rpc(&emu.endpoint(), TARGET, Auth::Bearer(&token_a), Some(&ua_a), &chat("hi"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut catalog = catalog_get(&emu, &token_b, "origin=AI_EDITOR");
    catalog.headers_mut().insert("user-agent", ua_b.parse().unwrap());
    assert_eq!(send(catalog).await.status(), StatusCode::OK);
    let resp = send(rpc(
        &emu.runtime_endpoint(),
        TARGET,
        Auth::Bearer(&social_token),
        Some("KiroIDE-0.9.2-aaaa"),
        &chat("hi"),
    ))
    .await;
    assert_eq!(resp.status(), StatusCode::OK);

    let a = emu.stats_for(CLIENT);
    assert_eq!(
        (a.refresh_user_agent.as_deref(), a.chat_user_agent.as_deref()),
        (Some(ua_a.as_str()), Some(ua_a.as_str()))
    );
    assert_eq!(a.user_agents, std::slice::from_ref(&ua_a));
    let b = emu.stats_for("client-b");
    assert_eq!(
        (b.catalog_user_agent.as_deref(), b.last_user_agent.as_deref()),
        (Some(ua_b.as_str()), Some(ua_b.as_str()))
    );
    let s = emu.stats_for(&social);
    assert_eq!(s.user_agents, [KIRO_UA.to_owned(), "KiroIDE-0.9.2-aaaa".to_owned()]);
    assert!(emu.shared_user_agents().is_empty(), "{:?}", emu.shared_user_agents());

    // Account b sends a's user agent: the two are linked.
    let resp = send(rpc(&emu.endpoint(), TARGET, Auth::Bearer(&token_b), Some(&ua_a), &chat("hi"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(emu.shared_user_agents(), [(ua_a.clone(), vec![CLIENT.to_owned(), "client-b".to_owned()])]);
}

// ---------------------------------------------------------------------------------------------
// The SSO OIDC device flow: RegisterClient, StartDeviceAuthorization, CreateToken (device code)

async fn oidc_post(emu: &Emulator, path: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
    let req = Request::post(format!("{}{path}", emu.oidc_endpoint()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    read_json(send(req).await).await
}

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

#[tokio::test]
async fn device_flow_is_strict_and_ends_in_a_working_account() {
    use amq2api::emulator::DeviceFlow;
    let emu = Emulator::start(EmulatorOptions::default()).await.unwrap();
    emu.set_device_flow(DeviceFlow { pending_polls: 1, ..Default::default() });

    // RegisterClient: clientName and clientType "public" required, scopes well formed.
    for bad in [
        json!({"clientType": "public"}),
        json!({"clientName": "x", "clientType": "confidential"}),
        json!({"clientName": "x", "clientType": "public", "scopes": "codewhisperer:conversations"}),
    ] {
        let (status, headers, body) = oidc_post(&emu, "/client/register", &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(headers.contains_key("x-amzn-errortype"), "{bad}");
    }
    let reg = json!({"clientName": "t", "clientType": "public", "scopes": ["codewhisperer:conversations"]});
    let (status, _, body) = oidc_post(&emu, "/client/register", &reg).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (cid, secret) = (body["clientId"].as_str().unwrap(), body["clientSecret"].as_str().unwrap());
    assert!(body["clientSecretExpiresAt"].as_u64().unwrap() > body["clientIdIssuedAt"].as_u64().unwrap());

    // StartDeviceAuthorization: the registered secret, an https start URL.
    let start = |secret: &str, url: &str| json!({"clientId": cid, "clientSecret": secret, "startUrl": url});
    let (status, headers, _) =
        oidc_post(&emu, "/device_authorization", &start("wrong", "https://view.awsapps.com/start")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-amzn-errortype"], "InvalidClientException");
    let (status, _, _) = oidc_post(&emu, "/device_authorization", &start(secret, "http://x.example/")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, dev) =
        oidc_post(&emu, "/device_authorization", &start(secret, "https://view.awsapps.com/start")).await;
    assert_eq!(status, StatusCode::OK, "{dev}");
    assert_eq!(dev["interval"], 1);
    assert_eq!(dev["expiresIn"], 600);
    let user_code = dev["userCode"].as_str().unwrap();
    assert!(dev["verificationUriComplete"].as_str().unwrap().ends_with(&format!("user_code={user_code}")));
    let device_code = dev["deviceCode"].as_str().unwrap();

    let poll = |code: &str| json!({"clientId": cid, "clientSecret": secret, "grantType": DEVICE_GRANT, "deviceCode": code});
    // An unknown code; then the first poll (pending), one too early (slow_down), and after the
    // interval grew by 5 s the approval.
    let (status, _, body) = oidc_post(&emu, "/token", &poll("dev-unknown")).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    let (status, headers, body) = oidc_post(&emu, "/token", &poll(device_code)).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("authorization_pending")));
    assert_eq!(headers["x-amzn-errortype"], "AuthorizationPendingException");
    let (status, headers, body) = oidc_post(&emu, "/token", &poll(device_code)).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("slow_down")));
    assert_eq!(headers["x-amzn-errortype"], "SlowDownException");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, _, body) = oidc_post(&emu, "/token", &poll(device_code)).await;
    assert_eq!(body["error"], "slow_down", "1 s is too early once the interval is 6 s");
    let stats = emu.device_stats();
    assert_eq!((stats.pending, stats.slow_downs, stats.too_early, stats.approved), (1, 2, 2, 0));

    // A second authorization, polled on time: approved; the code is then used up.
    let (_, _, dev) =
        oidc_post(&emu, "/device_authorization", &start(secret, "https://view.awsapps.com/start")).await;
    let code = dev["deviceCode"].as_str().unwrap();
    let (_, _, body) = oidc_post(&emu, "/token", &poll(code)).await;
    assert_eq!(body["error"], "authorization_pending");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (status, _, token) = oidc_post(&emu, "/token", &poll(code)).await;
    assert_eq!(status, StatusCode::OK, "{token}");
    assert_eq!(token["tokenType"], "Bearer");
    let refresh_token = token["refreshToken"].as_str().unwrap().to_owned();
    let (_, _, body) = oidc_post(&emu, "/token", &poll(code)).await;
    assert_eq!(body["error"], "invalid_grant");

    // The client is now an account: its access token chats, its refresh token rotates.
    let access = token["accessToken"].as_str().unwrap();
    let resp = send(q_request(&emu, Some(access), &chat("hello"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(emu.live_refresh_token(cid).as_deref(), Some(refresh_token.as_str()));
    let (status, _, body) = refresh(&emu, cid, secret, &refresh_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["refreshToken"].as_str(), Some(refresh_token.as_str()));
    let (status, _, _) = refresh(&emu, cid, secret, &refresh_token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "the rotated-away token is dead");
}

#[tokio::test]
async fn device_flow_denied_and_expired() {
    use amq2api::emulator::{DeviceDecision, DeviceFlow};
    let emu = Emulator::start(EmulatorOptions::default()).await.unwrap();
    let reg = json!({"clientName": "t", "clientType": "public"});
    let (_, _, body) = oidc_post(&emu, "/client/register", &reg).await;
    let (cid, secret) = (body["clientId"].as_str().unwrap(), body["clientSecret"].as_str().unwrap());
    let start =
        json!({"clientId": cid, "clientSecret": secret, "startUrl": "https://view.awsapps.com/start"});
    let poll = |code: &str| json!({"clientId": cid, "clientSecret": secret, "grantType": DEVICE_GRANT, "deviceCode": code});

    emu.set_device_flow(DeviceFlow {
        pending_polls: 0,
        decision: Some(DeviceDecision::Deny),
        ..Default::default()
    });
    let (_, _, dev) = oidc_post(&emu, "/device_authorization", &start).await;
    let (status, headers, body) = oidc_post(&emu, "/token", &poll(dev["deviceCode"].as_str().unwrap())).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("access_denied")));
    assert_eq!(headers["x-amzn-errortype"], "AccessDeniedException");

    emu.set_device_flow(DeviceFlow { expires_in_secs: 1, decision: None, ..Default::default() });
    let (_, _, dev) = oidc_post(&emu, "/device_authorization", &start).await;
    assert_eq!(dev["expiresIn"], 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, headers, body) = oidc_post(&emu, "/token", &poll(dev["deviceCode"].as_str().unwrap())).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("expired_token")));
    assert_eq!(headers["x-amzn-errortype"], "ExpiredTokenException");
    let d = emu.device_stats();
    assert_eq!((d.denied, d.expired, d.approved), (1, 1, 0));
}
