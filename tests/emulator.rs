//! The Amazon Q + OIDC emulator over real loopback TCP, driven by a plain hyper client and read
//! with the project's own event-stream decoder: token issue and rotation, authentication, request
//! rules, every scripted behaviour, directives, stream cancellation, HTTP/2 and shutdown.

use std::time::{Duration, Instant};

use amq2api::emulator::{Behaviour, Emulator, EmulatorOptions, run_standalone};
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
    assert_eq!(&types[types.len() - 3..], ["metadataEvent", "contextUsageEvent", "meteringEvent"], "{types:?}");
    assert_eq!(stream.events("metadataEvent")[0], json!({"stopReason": "END_TURN"}), "no tokenUsage by default");
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
