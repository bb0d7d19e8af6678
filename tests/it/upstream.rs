//! The upstream client against the emulator: OIDC refresh outcomes and every scripted
//! behaviour of `GenerateAssistantResponse`, each checked as the typed outcome the pool acts on;
//! calls through egress proxies (SOCKS5 and HTTP `CONNECT`, test servers on loopback) and how
//! their failures are reported; and Amazon Q over HTTPS (a TLS front with a throwaway CA).

use crate::common;

use amq2api::config::{Secret, Template, UpstreamConfig};
use amq2api::emulator::{Behaviour, Emulator, EmulatorOptions};
use amq2api::upstream::types::*;
use amq2api::upstream::{
    Agent, Caller, Event, QuotaKind, RefreshError, StreamError, TokenGrant, UpstreamClient, UpstreamFailure,
};
use bytes::Bytes;
use std::time::Duration;

fn config(e: &Emulator) -> UpstreamConfig {
    UpstreamConfig {
        endpoint: Template::new(&e.endpoint()),
        runtime_endpoint: Template::new(&e.endpoint()),
        management_endpoint: Template::new(&e.endpoint()),
        token_endpoint: Template::new(&e.token_endpoint()),
        social_token_endpoint: Template::new(&e.token_endpoint()),
        suspicious_cooldown: Duration::from_secs(1800),
        ca_file: None,
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(1),
        stream_idle_timeout: Duration::from_secs(1),
        max_attempts: 3,
    }
}

/// One installation for every call of these tests.
fn agent() -> &'static Agent {
    static AGENT: std::sync::OnceLock<Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| Agent::new(Agent::new_machine_id()))
}

/// A caller with an access token.
fn caller(token: &Secret) -> Caller<'_> {
    Caller { bearer: token, api_key: false, agent: agent(), proxy: None }
}

fn body(text: &str) -> Bytes {
    let req = GenerateRequest {
        conversation_state: ConversationState {
            conversation_id: "c".into(),
            chat_trigger_type: ChatTriggerType::Manual,
            history: vec![],
            current_message: CurrentMessage {
                user_input_message: UserInputMessage {
                    content: text.into(),
                    model_id: Some("claude-sonnet-4.5".into()),
                    origin: Some("AI_EDITOR".into()),
                    ..Default::default()
                },
            },
        },
        profile_arn: None,
        additional_model_request_fields: None,
    };
    Bytes::from(serde_json::to_vec(&req).unwrap())
}

/// A refresh of the test account `cid` (refresh token `rt0`) at `token_endpoint`.
async fn refresh(c: &UpstreamClient, token_endpoint: &http::Uri) -> Result<TokenGrant, RefreshError> {
    c.create_token(
        token_endpoint,
        &Secret::new("cid"),
        &Secret::new("secret"),
        &Secret::new("rt0"),
        agent(),
        None,
    )
    .await
}

struct Env {
    e: Emulator,
    c: UpstreamClient,
    token: Secret,
}

async fn env() -> Env {
    let e = Emulator::start(EmulatorOptions::default()).await.unwrap();
    e.add_account("cid", "secret", "rt0");
    let c = UpstreamClient::new(&config(&e)).unwrap();
    let grant = refresh(&c, &e.token_endpoint().parse().unwrap()).await.unwrap();
    assert!(grant.refresh_token.is_some(), "rotation");
    Env { e, c, token: grant.access_token }
}

async fn call(env: &Env, b: Behaviour) -> Result<(Vec<Event>, Option<StreamError>), UpstreamFailure> {
    env.e.set_behaviour_for_next("cid", b, 1);
    let mut s =
        env.c.generate(&env.e.endpoint().parse().unwrap(), &caller(&env.token), body("hi"), 1).await?;
    let mut events = Vec::new();
    while let Some(ev) = s.next().await {
        match ev {
            Ok(ev) => events.push(ev),
            Err(e) => return Ok((events, Some(e))),
        }
    }
    Ok((events, None))
}

#[tokio::test]
async fn token_refresh_outcomes() {
    let e = Emulator::start(EmulatorOptions::default()).await.unwrap();
    e.add_account("cid", "secret", "rt0");
    let c = UpstreamClient::new(&config(&e)).unwrap();
    let url = e.token_endpoint().parse().unwrap();
    let s = Secret::new;
    let g = c.create_token(&url, &s("cid"), &s("secret"), &s("rt0"), agent(), None).await.unwrap();
    assert!(g.expires_in > Duration::from_secs(3000));
    let rt1 = g.refresh_token.unwrap();
    assert!(matches!(
        c.create_token(&url, &s("cid"), &s("secret"), &s("rt0"), agent(), None).await,
        Err(RefreshError::InvalidGrant(_))
    ));
    assert!(c.create_token(&url, &s("cid"), &s("secret"), &rt1, agent(), None).await.is_ok());
    assert!(matches!(
        c.create_token(&url, &s("cid"), &s("wrong"), &rt1, agent(), None).await,
        Err(RefreshError::InvalidClient(_))
    ));
    assert!(matches!(
        c.create_token(&url, &s("nobody"), &s("x"), &rt1, agent(), None).await,
        Err(RefreshError::InvalidClient(_))
    ));
    let dead: http::Uri = "http://127.0.0.1:9/token".parse().unwrap();
    assert!(matches!(
        c.create_token(&dead, &s("cid"), &s("secret"), &rt1, agent(), None).await,
        Err(RefreshError::Transient(_))
    ));
}

#[tokio::test]
async fn every_behaviour_has_its_typed_outcome() {
    let env = env().await;
    let (events, err) = call(&env, Behaviour::Normal).await.unwrap();
    assert!(err.is_none());
    assert!(matches!(events[0], Event::InitialResponse { .. }));
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Event::AssistantResponse { content } => Some(content.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, "Hello from the Amazon Q emulator. You said: hi");
    assert!(events.iter().any(|e| matches!(e, Event::ContextUsage { .. })));

    assert!(matches!(call(&env, Behaviour::Suspended).await, Err(UpstreamFailure::Suspended { .. })));
    assert!(matches!(
        call(&env, Behaviour::Throttled { retry_after_secs: Some(4) }).await,
        Err(UpstreamFailure::Throttled { retry_after: Some(d), .. }) if d == Duration::from_secs(4)
    ));
    assert!(matches!(call(&env, Behaviour::CapacityExhausted).await, Err(UpstreamFailure::Capacity { .. })));
    assert!(matches!(
        call(&env, Behaviour::MonthlyQuota).await,
        Err(UpstreamFailure::Quota { kind: QuotaKind::Monthly, .. })
    ));
    assert!(matches!(
        call(&env, Behaviour::DailyQuota).await,
        Err(UpstreamFailure::Quota { kind: QuotaKind::Daily, .. })
    ));
    assert!(matches!(
        call(&env, Behaviour::InternalError).await,
        Err(UpstreamFailure::Transient { status: Some(500), .. })
    ));
    assert!(matches!(
        call(&env, Behaviour::Unavailable).await,
        Err(UpstreamFailure::Transient { status: Some(503), .. })
    ));
    assert!(matches!(
        call(&env, Behaviour::SlowFirstByte(Duration::from_secs(3))).await,
        Err(UpstreamFailure::Transient { status: None, .. })
    ));
    assert!(matches!(
        call(&env, Behaviour::ResetBeforeFirstByte).await,
        Err(UpstreamFailure::Transient { status: None, .. })
    ));
    let (_, err) = call(&env, Behaviour::ResetAfterFirstByte).await.unwrap();
    assert!(matches!(err, Some(StreamError::Transport(_)) | Some(StreamError::Decode(_))), "{err:?}");
    let (_, err) = call(&env, Behaviour::CorruptFrame).await.unwrap();
    assert!(matches!(err, Some(StreamError::Decode(_))), "{err:?}");
    let (_, err) = call(
        &env,
        Behaviour::InStreamException {
            exception_type: "error".into(),
            message: "MODEL_TEMPORARILY_UNAVAILABLE".into(),
        },
    )
    .await
    .unwrap();
    assert!(err.as_ref().is_some_and(|e| e.is_capacity()), "{err:?}");
    let (_, err) = call(
        &env,
        Behaviour::InStreamException {
            exception_type: "ContentLengthExceededException".into(),
            message: "too long".into(),
        },
    )
    .await
    .unwrap();
    assert!(err.as_ref().is_some_and(|e| e.is_output_truncation()), "{err:?}");
    let (events, err) = call(&env, Behaviour::ToolCallCutBeforeStop).await.unwrap();
    assert!(err.is_none());
    assert!(!events.iter().any(|e| matches!(e, Event::ToolUse { stop: true, .. })));
    let (_, err) = call(&env, Behaviour::SilentAfterFirstByte(Duration::from_secs(3))).await.unwrap();
    assert!(matches!(err, Some(StreamError::Idle(1))), "{err:?}");
    let (events, _) = call(&env, Behaviour::Reasoning).await.unwrap();
    assert!(events.iter().any(|e| matches!(e, Event::Reasoning { signature: Some(_), .. })));
    let (events, _) = call(&env, Behaviour::LongReply { chars: 5000 }).await.unwrap();
    let n: usize = events
        .iter()
        .map(|e| match e {
            Event::AssistantResponse { content } => content.chars().count(),
            _ => 0,
        })
        .sum();
    assert_eq!(n, 5000);
    // A refused bearer token.
    env.e.expire_access_tokens("cid");
    assert!(matches!(
        env.c.generate(&env.e.endpoint().parse().unwrap(), &caller(&env.token), body("x"), 1).await,
        Err(UpstreamFailure::TokenInvalid)
    ));
}

/// What [`counting_server`] counted.
struct Counts {
    /// Connections accepted.
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Requests received whole (head and body).
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// How [`counting_server`] behaves.
#[derive(Default)]
struct Script {
    /// Close each connection after this many answers (as a server closing idle keep-alive
    /// connections does).
    close_after: Option<usize>,
    /// Read this request of each connection whole, then close the connection without an answer
    /// (the request reached the server: it may have acted on it).
    hang_up_on: Option<usize>,
    /// The body of the answer to `POST /token` instead of a small token grant.
    token_body: Option<String>,
}

/// A bare HTTP/1.1 server answering a request for `/token` with a token grant and every other
/// request with an empty event stream, as `script` says; it counts the connections it accepts
/// and the requests it receives.
async fn counting_server(script: Script) -> (String, Counts) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Counts { connections: Default::default(), requests: Default::default() };
    let (connections, requests) = (counts.connections.clone(), counts.requests.clone());
    let Script { close_after, hang_up_on, token_body } = script;
    let token_body: std::sync::Arc<str> =
        token_body.unwrap_or_else(|| r#"{"accessToken":"a","expiresIn":60}"#.into()).into();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            connections.fetch_add(1, Ordering::SeqCst);
            let requests = requests.clone();
            let token_body = token_body.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                loop {
                    // One request: the head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    requests.fetch_add(1, Ordering::SeqCst);
                    if hang_up_on == Some(answered + 1) {
                        return;
                    }
                    let (content_type, body) = if head.starts_with("post /token ") {
                        ("application/json", &*token_body)
                    } else {
                        ("application/vnd.amazon.eventstream", "")
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    answered += 1;
                    if close_after == Some(answered) {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/"), counts)
}

fn counting_config(endpoint: &str) -> UpstreamConfig {
    UpstreamConfig {
        endpoint: Template::new(endpoint),
        runtime_endpoint: Template::new(endpoint),
        management_endpoint: Template::new(endpoint),
        token_endpoint: Template::new(amq2api::config::DEFAULT_TOKEN_ENDPOINT),
        social_token_endpoint: Template::new(amq2api::config::DEFAULT_SOCIAL_TOKEN_ENDPOINT),
        suspicious_cooldown: Duration::from_secs(1800),
        ca_file: None,
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(2),
        stream_idle_timeout: Duration::from_secs(2),
        max_attempts: 3,
    }
}

async fn drain(mut s: amq2api::upstream::EventStream) {
    while let Some(ev) = s.next().await {
        ev.unwrap();
    }
}

#[tokio::test]
async fn amazon_q_connections_are_reused_and_ones_closed_while_idle_are_replaced() {
    use std::sync::atomic::Ordering;
    let token = Secret::new("t");

    // Sequential calls share one connection.
    let (endpoint, counts) = counting_server(Script::default()).await;
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    for _ in 0..5 {
        drain(c.generate(&endpoint.parse().unwrap(), &caller(&token), body("hi"), 1).await.unwrap()).await;
    }
    assert_eq!(counts.connections.load(Ordering::SeqCst), 1, "five calls, one connection");
    assert_eq!(counts.requests.load(Ordering::SeqCst), 5);

    // A server that closes each connection after one answer: every call still succeeds, on a
    // new connection each time.
    let (endpoint, counts) = counting_server(Script { close_after: Some(1), ..Default::default() }).await;
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    for _ in 0..5 {
        drain(c.generate(&endpoint.parse().unwrap(), &caller(&token), body("hi"), 1).await.unwrap()).await;
        // Let the close arrive before the next call takes the connection from the pool.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counts.connections.load(Ordering::SeqCst), 5);
    assert_eq!(counts.requests.load(Ordering::SeqCst), 5);
}

/// A bare server on loopback that reads each request (one read) and then hands the socket to
/// `answer`; its endpoint URL.
async fn raw_server<F, Fut>(answer: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/", listener.local_addr().unwrap());
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = sock.read(&mut buf).await;
                answer(sock).await;
            });
        }
    });
    endpoint
}

/// A 400 whose body is cut off (it might have said "throttled" or "no capacity") is a failure
/// of that attempt, which fails over, not the request's own fault, which stops it; one whose
/// body came whole is classified by what it says.
#[tokio::test]
async fn a_refusal_whose_body_is_cut_off_is_not_the_requests_fault() {
    use tokio::io::AsyncWriteExt;
    let endpoint = raw_server(|mut sock| async move {
        let part = r#"{"__type":"ThrottlingException","mess"#;
        let head = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{part}"
        );
        let _ = sock.write_all(head.as_bytes()).await;
        // Closed with 150 bytes of the body missing.
    })
    .await;
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    let token = Secret::new("t");
    let failure = c.generate(&endpoint.parse().unwrap(), &caller(&token), body("hi"), 1).await.err().unwrap();
    assert!(matches!(failure, UpstreamFailure::Transient { status: Some(400), .. }), "{failure:?}");
    assert!(failure.try_another_account(), "{failure:?}");
}

/// An upstream that answers 200 and then trickles one byte at a time, never finishing a frame:
/// the idle timeout counts from the last whole frame, so the stream ends with `Idle`. Before,
/// any byte reset it, and such an upstream held the request until `request_timeout_secs`.
#[tokio::test]
async fn an_upstream_trickling_bytes_that_make_no_frame_is_idle() {
    use tokio::io::AsyncWriteExt;
    let endpoint = raw_server(|mut sock| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.amazon.eventstream\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        if sock.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        // A prelude that promises a 16 MiB frame, one byte every 300 ms.
        for b in [0x01u8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10].iter().cycle().take(200) {
            let chunk = format!("1\r\n{}\r\n", *b as char);
            if sock.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    let cfg = UpstreamConfig { stream_idle_timeout: Duration::from_secs(1), ..counting_config(&endpoint) };
    let c = UpstreamClient::new(&cfg).unwrap();
    let token = Secret::new("t");
    let mut stream = c.generate(&endpoint.parse().unwrap(), &caller(&token), body("hi"), 1).await.unwrap();
    let t0 = std::time::Instant::now();
    let end =
        tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("the stream never ended");
    assert!(matches!(end, Some(Err(StreamError::Idle(1)))), "{end:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_request_read_on_a_reused_connection_is_never_sent_again() {
    use std::sync::atomic::Ordering;
    let token = Secret::new("t");
    // The server reads the second request of each connection whole and hangs up without an
    // answer. The request left: sending it again could run it twice (a double charge, a tool
    // call run twice), so the call fails and the caller decides (it fails over).
    let (endpoint, counts) = counting_server(Script { hang_up_on: Some(2), ..Default::default() }).await;
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    let mut outcomes = Vec::new();
    for i in 1..=10 {
        let r = c.generate(&endpoint.parse().unwrap(), &caller(&token), body("hi"), 1).await;
        outcomes.push(match r {
            Ok(s) => {
                drain(s).await;
                "ok"
            }
            Err(UpstreamFailure::Transient { status: None, .. }) => "failed",
            Err(e) => panic!("call {i}: {e:?}"),
        });
        assert_eq!(counts.requests.load(Ordering::SeqCst), i, "call {i} sent its request once: {outcomes:?}");
    }
    // Each connection: one answered call, then one that failed; a failed connection is not
    // used again.
    assert_eq!(outcomes, ["ok", "failed"].repeat(5));
    assert_eq!(counts.connections.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn refreshes_and_amazon_q_calls_share_one_connection_pool() {
    use std::sync::atomic::Ordering;
    let (endpoint, counts) = counting_server(Script::default()).await;
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    let token_url: http::Uri = format!("{endpoint}token").parse().unwrap();
    let s = Secret::new;
    for _ in 0..3 {
        drain(c.generate(&endpoint.parse().unwrap(), &caller(&s("t")), body("hi"), 1).await.unwrap()).await;
        let grant =
            c.create_token(&token_url, &s("cid"), &s("secret"), &s("rt"), agent(), None).await.unwrap();
        assert_eq!(grant.access_token.expose(), "a");
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 6);
    assert_eq!(counts.connections.load(Ordering::SeqCst), 1, "chat calls and refreshes, one connection");
}

#[tokio::test]
async fn a_refresh_read_on_a_reused_connection_is_never_sent_again() {
    use std::sync::atomic::Ordering;
    // A refresh sent twice would rotate the refresh token twice, and the second successor
    // would be lost with the answer: the chain breaks. The server reads the second request of
    // each connection whole and hangs up without an answer.
    let (endpoint, counts) = counting_server(Script { hang_up_on: Some(2), ..Default::default() }).await;
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    let token_url: http::Uri = format!("{endpoint}token").parse().unwrap();
    let s = Secret::new;
    let mut outcomes = Vec::new();
    for i in 1..=6 {
        outcomes.push(
            match c.create_token(&token_url, &s("cid"), &s("secret"), &s("rt"), agent(), None).await {
                Ok(_) => "ok",
                Err(RefreshError::Transient(_)) => "failed",
                Err(e) => panic!("refresh {i}: {e:?}"),
            },
        );
        assert_eq!(counts.requests.load(Ordering::SeqCst), i, "refresh {i} sent once: {outcomes:?}");
    }
    assert_eq!(outcomes, ["ok", "failed"].repeat(3));
    assert_eq!(counts.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_token_answer_over_the_limit_is_refused() {
    // 64 KiB is the most read of an answer that is not an event stream.
    let big = format!(r#"{{"accessToken":"{}","expiresIn":60}}"#, "a".repeat(64 * 1024));
    let (endpoint, _) = counting_server(Script { token_body: Some(big), ..Default::default() }).await;
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    let token_url: http::Uri = format!("{endpoint}token").parse().unwrap();
    let s = Secret::new;
    match c.create_token(&token_url, &s("cid"), &s("secret"), &s("rt"), agent(), None).await {
        Err(RefreshError::Transient(m)) => {
            assert_eq!(m, "reading the token answer: the body exceeds 65536 bytes");
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Egress proxies

use amq2api::config::accounts::parse_proxy;
use common::proxy::{Protocol, TestProxy};

fn proxy(url: &str) -> amq2api::config::Proxy {
    parse_proxy(url).unwrap()
}

/// A caller whose calls go through `proxy`.
fn caller_via<'a>(token: &'a Secret, proxy: &'a amq2api::config::Proxy) -> Caller<'a> {
    Caller { proxy: Some(proxy), ..caller(token) }
}

#[tokio::test]
async fn connections_through_different_proxies_are_never_shared() {
    use std::sync::atomic::Ordering;
    let token = Secret::new("t");
    let (endpoint, counts) = counting_server(Script::default()).await;
    let uri: http::Uri = endpoint.parse().unwrap();
    let target = uri.authority().unwrap().to_string();
    let c = UpstreamClient::new(&counting_config(&endpoint)).unwrap();
    let socks = TestProxy::start(Protocol::Socks5, None).await;
    // Takes any credentials: two user names are two egresses all the same.
    let http = TestProxy::start(Protocol::HttpConnect, None).await;
    let via_socks = proxy(&socks.url("socks5", None));
    let via_http = proxy(&http.url("http", None));
    let via_http_as_u1 = proxy(&http.url("http", Some(("u1", "p1"))));
    let via_http_as_u2 = proxy(&http.url("http", Some(("u2", "p2"))));
    let routes = [Some(&via_socks), Some(&via_http), None, Some(&via_http_as_u1), Some(&via_http_as_u2)];
    for _ in 0..3 {
        for route in routes {
            let caller = Caller { proxy: route, ..caller(&token) };
            drain(c.generate(&uri, &caller, body("hi"), 1).await.unwrap()).await;
        }
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 15);
    // One connection per route, each kept and reused for that route only.
    assert_eq!(counts.connections.load(Ordering::SeqCst), 5, "one connection per route");
    let tunnels = socks.tunnels();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0].target.as_deref(), Some(target.as_str()));
    assert_eq!(socks.count_sent("POST / HTTP/1.1"), 3, "the SOCKS5 route's calls, and no other");
    let tunnels = http.tunnels();
    assert_eq!(tunnels.len(), 3, "no credentials, u1 and u2: three tunnels: {tunnels:?}");
    assert!(tunnels.iter().all(|t| t.target.as_deref() == Some(target.as_str())), "{tunnels:?}");
    assert!(tunnels.iter().all(|t| t.outbound.is_some()), "{tunnels:?}");
    assert_eq!(http.count_sent("POST / HTTP/1.1"), 9);
    // A refresh through a proxy takes that proxy's connection too.
    let token_url: http::Uri = format!("{endpoint}token").parse().unwrap();
    let s = Secret::new;
    c.create_token(&token_url, &s("cid"), &s("secret"), &s("rt"), agent(), Some(&via_socks)).await.unwrap();
    assert_eq!(socks.tunnels().len(), 1);
    assert_eq!(socks.count_sent("POST /token HTTP/1.1"), 1);
    assert_eq!(counts.connections.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn socks5_resolves_names_here_socks5h_and_http_at_the_proxy() {
    let e = Emulator::start(EmulatorOptions::default()).await.unwrap();
    e.add_account("cid", "secret", "rt0");
    let c = UpstreamClient::new(&config(&e)).unwrap();
    let port = e.addr().port();
    // By name: the proxy is told the name, or the address it stands for.
    let named: http::Uri = format!("http://localhost:{port}/token").parse().unwrap();
    let s = Secret::new;
    let mut rt = s("rt0");
    for (protocol, scheme, by_name) in [
        (Protocol::Socks5, "socks5h", true),
        (Protocol::HttpConnect, "http", true),
        (Protocol::Socks5, "socks5", false),
    ] {
        let p = TestProxy::start(protocol, None).await;
        let grant = c
            .create_token(&named, &s("cid"), &s("secret"), &rt, agent(), Some(&proxy(&p.url(scheme, None))))
            .await
            .unwrap_or_else(|e| panic!("{scheme}: {e}"));
        rt = grant.refresh_token.unwrap();
        let targets: Vec<String> = p.tunnels().into_iter().filter_map(|t| t.target).collect();
        assert!(!targets.is_empty(), "{scheme}");
        if by_name {
            assert_eq!(targets, [format!("localhost:{port}")], "{scheme}");
        } else {
            // Each address of the name in turn, until one is reached: never the name.
            for t in &targets {
                let addr: std::net::SocketAddr = t.parse().unwrap_or_else(|_| panic!("{scheme}: {t}"));
                assert!(addr.ip().is_loopback() && addr.port() == port, "{scheme}: {t}");
            }
        }
        assert_eq!(p.count_sent("POST /token HTTP/1.1"), 1, "{scheme}");
    }
    assert_eq!(e.stats_for("cid").refreshes, 3);
}

/// How a call through a failing proxy ends: its failure and message.
async fn through(c: &UpstreamClient, endpoint: &http::Uri, p: &amq2api::config::Proxy) -> UpstreamFailure {
    let token = Secret::new("t");
    let caller = caller_via(&token, p);
    let call = c.generate(endpoint, &caller, body("hi"), 1);
    match tokio::time::timeout(Duration::from_secs(60), call).await.expect("an answer, not a hang") {
        Ok(_) => panic!("a call through {p} went through"),
        Err(f) => f,
    }
}

#[tokio::test]
async fn proxy_failures_are_typed_and_name_the_proxy_without_its_password() {
    let e = Emulator::start(EmulatorOptions::default()).await.unwrap();
    e.add_account("cid", "secret", "rt0");
    // The handshake with a proxy that never answers ends at the connect timeout.
    let cfg = UpstreamConfig {
        connect_timeout: Duration::from_secs(1),
        first_byte_timeout: Duration::from_secs(30),
        ..config(&e)
    };
    let c = UpstreamClient::new(&cfg).unwrap();
    let endpoint: http::Uri = e.endpoint().parse().unwrap();
    let auth = Some(("amq", "s3cret-pw"));
    let wrong = Some(("amq", "wrong-pw"));
    let socks = TestProxy::start(Protocol::Socks5, auth).await;
    let http = TestProxy::start(Protocol::HttpConnect, auth).await;
    let hang_up = TestProxy::start(Protocol::HangUp, None).await;
    let silent = TestProxy::start(Protocol::Silent, None).await;
    // Each is the account's own proxy failing (the account cools down; no other endpoint is
    // tried through it), a silent one too: before, it was "unreachable", and the relay spent a
    // second connect timeout trying the other endpoint through the same dead proxy.
    let cases = [
        (socks.url("socks5", wrong), "proxy_failed", "the proxy refused the user name and password"),
        (http.url("http", wrong), "proxy_failed", "the proxy refused the user name and password"),
        (socks.url("socks5", None), "proxy_failed", "the proxy wants a user name and password"),
        (http.url("http", None), "proxy_failed", "the proxy wants a user name and password"),
        (hang_up.url("socks5", None), "proxy_failed", "talking to the proxy"),
        (hang_up.url("http", None), "proxy_failed", "talking to the proxy"),
        (silent.url("http", wrong), "proxy_failed", "no tunnel within 1 s"),
    ];
    for (url, kind, says) in cases {
        let p = proxy(&url);
        let f = through(&c, &endpoint, &p).await;
        let message = f.to_string();
        assert_eq!(f.kind(), kind, "{url}: {message}");
        assert!(message.contains(says), "{url}: {message}");
        assert!(message.contains(&format!("through proxy {p}")), "{url}: {message}");
        assert!(!message.contains("-pw"), "the password leaked: {message}");
    }
    // A proxy that works but cannot reach the endpoint: nothing listens there, another endpoint
    // may do.
    let closed: http::Uri = "http://127.0.0.1:9/".parse().unwrap();
    for p in [socks.url("socks5", auth), http.url("http", auth)] {
        let f = through(&c, &closed, &proxy(&p)).await;
        assert_eq!(f.kind(), "unreachable", "{p}: {f}");
        assert!(!f.to_string().contains("-pw"), "the password leaked: {f}");
    }
    // Refreshes fail alike, and are retried later.
    let token_url: http::Uri = e.token_endpoint().parse().unwrap();
    let s = Secret::new;
    let p = proxy(&socks.url("socks5", wrong));
    match c.create_token(&token_url, &s("cid"), &s("secret"), &s("rt0"), agent(), Some(&p)).await {
        Err(RefreshError::Transient(m)) => {
            assert!(m.contains("the proxy refused the user name and password"), "{m}");
            assert!(m.contains("socks5://amq:***@"), "{m}");
            assert!(!m.contains("-pw"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    // Nothing reached the emulator; the right credentials do.
    assert_eq!((e.stats().requests, e.stats().refreshes), (0, 0));
    let p = proxy(&socks.url("socks5", auth));
    c.create_token(&token_url, &s("cid"), &s("secret"), &s("rt0"), agent(), Some(&p)).await.unwrap();
    assert!(socks.tunnels().iter().any(|t| t.auth_refused), "the wrong password was refused at the proxy");
}

/// Amazon Q as users reach it: over HTTPS. A TLS front on loopback (a certificate for
/// `localhost` from a throwaway CA, given as `ca_file`) relays to the emulator. A token
/// refresh and three streamed calls go through one TLS connection, each stream read to its
/// end; another account's call opens a connection of its own, with a full handshake (it resumes
/// no TLS session the first account began: a session ticket presented again would tie the two
/// together); without the CA the same call is refused at the handshake and names the endpoint.
#[tokio::test]
async fn amazon_q_and_oidc_over_tls_share_one_connection_and_check_the_certificate() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let e = Emulator::start(EmulatorOptions::default()).await.unwrap();
    e.add_account("cid", "secret", "rt0");
    let ca = common::certs::ca();
    let acceptor = tokio_rustls::TlsAcceptor::from(common::certs::server_config(&ca, "upstream"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let emulator = e.addr();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    let kinds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = kinds.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, counted, seen) = (acceptor.clone(), counted.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                seen.lock().unwrap().push(tls.get_ref().1.handshake_kind());
                counted.fetch_add(1, Ordering::SeqCst);
                let mut plain = tokio::net::TcpStream::connect(emulator).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let https =
        |url: String| url.replacen(&format!("http://{emulator}"), &format!("https://localhost:{port}"), 1);
    let endpoint = https(e.endpoint());
    assert!(endpoint.starts_with("https://localhost:"), "{endpoint}");
    let mut cfg = config(&e);
    cfg.endpoint = Template::new(&endpoint);
    cfg.token_endpoint = Template::new(&https(e.token_endpoint()));
    cfg.ca_file = Some(dir.path().join("ca.pem"));
    let c = UpstreamClient::new(&cfg).unwrap();
    let token_uri: http::Uri = https(e.token_endpoint()).parse().unwrap();
    let grant = refresh(&c, &token_uri).await.unwrap();
    for i in 0..3 {
        let mut s = c
            .generate(&endpoint.parse().unwrap(), &caller(&grant.access_token), body("hi"), 1)
            .await
            .unwrap();
        let mut text = String::new();
        while let Some(ev) = s.next().await {
            if let Event::AssistantResponse { content } = ev.unwrap() {
                text.push_str(&content);
            }
        }
        assert!(!text.is_empty(), "call {i}: the reply's text arrives over TLS");
    }
    assert_eq!(handshakes.load(Ordering::SeqCst), 1, "a refresh and three calls, one TLS connection");
    // Another account (another installation): a connection and a TLS session of its own.
    let other = Agent::new(Agent::new_machine_id());
    let mut s = c
        .generate(
            &endpoint.parse().unwrap(),
            &Caller { agent: &other, ..caller(&grant.access_token) },
            body("hi"),
            1,
        )
        .await
        .unwrap();
    while let Some(ev) = s.next().await {
        ev.unwrap();
    }
    assert_eq!(handshakes.load(Ordering::SeqCst), 2, "another account, another connection");
    let full = Some(rustls::HandshakeKind::Full);
    assert_eq!(
        *kinds.lock().unwrap(),
        vec![full, full],
        "the second account resumed the first one's TLS session"
    );

    // The system's roots only: the test CA is unknown, the handshake fails, nothing is sent.
    cfg.ca_file = None;
    let c = UpstreamClient::new(&cfg).unwrap();
    let refused = refresh(&c, &token_uri).await.expect_err("an unknown CA is refused");
    let shown = refused.to_string();
    assert!(shown.contains("localhost") && shown.to_lowercase().contains("certificate"), "{shown}");
    assert_eq!(handshakes.load(Ordering::SeqCst), 2, "no handshake completed without the CA");
}

/// The idle timeout counts from the last bytes received, not from the latest wait: a consumer
/// whose waits are cut short (the SSE stream's ping timer drops `next()` every 15 s) still sees
/// a silent upstream time out, instead of holding the client, the account and the connection
/// until the request's own deadline.
#[tokio::test]
async fn a_silent_stream_times_out_even_when_its_waits_are_cut_short() {
    let env = env().await;
    env.e.set_behaviour_for_next("cid", Behaviour::SilentAfterFirstByte(Duration::from_secs(4)), 1);
    let mut s =
        env.c.generate(&env.e.endpoint().parse().unwrap(), &caller(&env.token), body("hi"), 1).await.unwrap();
    let t0 = std::time::Instant::now();
    let err = loop {
        match tokio::time::timeout(Duration::from_millis(300), s.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Event::AssistantResponse { .. }))) => {
                panic!("content after {:?}: the 1 s idle timeout never fired", t0.elapsed())
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => break Some(e),
            Ok(None) => break None,
        }
    };
    assert!(matches!(err, Some(StreamError::Idle(1))), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "timed out after {:?}", t0.elapsed());
}
