//! End to end through the daemon and the emulator over real TCP: streaming and non-streaming
//! replies, tools, thinking, stop sequences, failover, error mapping, limits, cancellation, metrics.

use crate::common;

use amq2api::emulator::Behaviour;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use serde_json::{Value, json};
use std::time::Duration;

/// The event order of Anthropic's streaming documentation (one checker, in the library).
fn assert_stream_grammar(frames: &[(String, Value)]) {
    amq2api::anthropic::grammar::check_frames(frames.iter().map(|(n, d)| (n.as_str(), d)))
        .unwrap_or_else(|e| panic!("{e}: {frames:?}"));
    assert_eq!(frames.last().unwrap().0, "message_stop");
}

#[tokio::test]
async fn streaming_and_non_streaming_text() {
    let h = Harness::start(Setup::default()).await;
    let r = post(&h, "/v1/messages", &simple("hi there", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert!(r.headers.get("request-id").unwrap().to_str().unwrap().starts_with("req_"));
    let frames = r.sse();
    assert_stream_grammar(&frames);
    assert_eq!(frames[1].0, "ping");
    assert_eq!(sse_text(&frames), "Hello from the Amazon Q emulator. You said: hi there");
    let delta = frames.iter().find(|(e, _)| e == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "end_turn");

    let r = post(&h, "/v1/messages", &simple("hi there", false)).await;
    assert_eq!(r.status, 200);
    let m = r.json();
    assert_eq!(m["type"], "message");
    assert_eq!(m["model"], "claude-sonnet-4-5-20250929");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message_text(&m), "Hello from the Amazon Q emulator. You said: hi there");
    assert_eq!(m["stop_reason"], "end_turn");
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 5);
    h.stop().await;
}

/// Events leave in one batch only when they are there together: fragments that arrive apart
/// leave as deltas of their own (nothing waits to fill a batch), and fragments that arrive
/// together may be joined; the text is whole either way.
#[tokio::test]
async fn fragments_that_arrive_apart_leave_apart() {
    let h = Harness::start(Setup::default()).await;
    let text_deltas = |frames: &[(String, Value)]| {
        frames
            .iter()
            .filter(|(e, d)| e == "content_block_delta" && d["delta"]["type"] == "text_delta")
            .count()
    };
    let expected = "Hello from the Amazon Q emulator. You said: apart";
    let fragments = amq2api::emulator::reply::fragments(expected).count();
    assert!(fragments > 4, "{fragments}");

    let r = post(&h, "/v1/messages", &simple("apart\n#emulator: slow-fragments 60", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let frames = r.sse();
    assert_stream_grammar(&frames);
    assert_eq!(sse_text(&frames), expected);
    assert_eq!(text_deltas(&frames), fragments, "one delta per fragment 60 ms apart: {frames:?}");

    let r = post(&h, "/v1/messages", &simple("apart", true)).await;
    let frames = r.sse();
    assert_stream_grammar(&frames);
    assert_eq!(sse_text(&frames), expected);
    let joined = text_deltas(&frames);
    assert!((1..=fragments).contains(&joined), "{joined} deltas for {fragments} fragments");
    h.stop().await;
}

fn weather_tools() -> Value {
    json!([{"name": "get_weather", "description": "Weather for a city",
        "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false}}])
}

#[tokio::test]
async fn tool_call_and_tool_result_round_trip() {
    let h = Harness::start(Setup::default()).await;
    let ask = "What is the weather?\n#emulator: tool get_weather {\"city\": \"Paris\", \"days\": [1, 2]}";
    for stream in [false, true] {
        let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream, "tools": weather_tools(),
            "messages": [{"role": "user", "content": ask}]});
        let r = post(&h, "/v1/messages", &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let (id, input, stop) = if stream {
            let frames = r.sse();
            assert_stream_grammar(&frames);
            let start = frames
                .iter()
                .find(|(e, d)| e == "content_block_start" && d["content_block"]["type"] == "tool_use")
                .unwrap();
            assert_eq!(start.1["content_block"]["input"], json!({}));
            let partial: String = frames
                .iter()
                .filter(|(_, d)| d["delta"]["type"] == "input_json_delta")
                .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_string())
                .collect();
            let stop =
                frames.iter().find(|(e, _)| e == "message_delta").unwrap().1["delta"]["stop_reason"].clone();
            (start.1["content_block"]["id"].clone(), serde_json::from_str::<Value>(&partial).unwrap(), stop)
        } else {
            let m = r.json();
            let tu =
                m["content"].as_array().unwrap().iter().find(|b| b["type"] == "tool_use").unwrap().clone();
            assert_eq!(tu["name"], "get_weather");
            (tu["id"].clone(), tu["input"].clone(), m["stop_reason"].clone())
        };
        assert!(id.as_str().unwrap().starts_with("toolu_"));
        assert_eq!(input, json!({"city": "Paris", "days": [1, 2]}));
        assert_eq!(stop, "tool_use");

        // The follow-up with the tool result is accepted by the (strict) emulator.
        let follow = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "tools": weather_tools(),
        "messages": [
            {"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": "get_weather", "input": input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "Sunny, 21 C"}]}
        ]});
        let r = post(&h, "/v1/messages", &follow).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(message_text(&r.json()).contains("I received the tool result: Sunny, 21 C"));
    }
    assert_eq!(h.emulator.stats().rejected_malformed, 0);
    h.stop().await;
}

#[tokio::test]
async fn thinking_and_stop_sequences() {
    let h = Harness::start(Setup::default()).await;
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048},
        "messages": [{"role": "user", "content": "Think first.\n#emulator: thinking-tags"}]});
    let m = post(&h, "/v1/messages", &body).await.json();
    assert_eq!(m["content"][0]["type"], "thinking", "{m}");
    assert!(!m["content"][0]["thinking"].as_str().unwrap().is_empty());
    assert!(!m["content"][0]["signature"].as_str().unwrap().is_empty());
    assert_eq!(m["content"][1]["type"], "text");
    // The thinking block goes back as context and is accepted.
    let follow = json!({"model": "claude-sonnet-4-5", "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048},
        "messages": [{"role": "user", "content": "Think first."}, {"role": "assistant", "content": m["content"].clone()},
                     {"role": "user", "content": "And now?"}]});
    assert_eq!(post(&h, "/v1/messages", &follow).await.status, 200);

    for stream in [false, true] {
        let mut body = simple("stop here", stream);
        body["stop_sequences"] = json!(["You said"]);
        let r = post(&h, "/v1/messages", &body).await;
        if stream {
            let frames = r.sse();
            assert_eq!(sse_text(&frames), "Hello from the Amazon Q emulator. ");
            let d = &frames.iter().find(|(e, _)| e == "message_delta").unwrap().1;
            assert_eq!(d["delta"]["stop_reason"], "stop_sequence");
            assert_eq!(d["delta"]["stop_sequence"], "You said");
        } else {
            let m = r.json();
            assert_eq!(message_text(&m), "Hello from the Amazon Q emulator. ");
            assert_eq!(m["stop_reason"], "stop_sequence");
        }
    }
    let mut body = simple("x", false);
    body["max_tokens"] = json!(3);
    let m = post(&h, "/v1/messages", &body).await.json();
    assert_eq!(m["stop_reason"], "max_tokens");
    assert_eq!(m["usage"]["output_tokens"], 3);
    h.stop().await;
}

#[tokio::test]
async fn failover_skips_suspended_and_throttled_accounts() {
    let setup = Setup {
        accounts: vec!["acct-1".into(), "acct-2".into(), "acct-3".into()],
        accounts_settings: "strategy = \"round-robin\"".into(),
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    h.emulator.set_behaviour(&client_id("acct-1"), Behaviour::Suspended);
    h.emulator.set_behaviour(&client_id("acct-2"), Behaviour::Throttled { retry_after_secs: Some(2) });
    for i in 0..6 {
        // A new conversation each time (one conversation stays on one account).
        let r = post(&h, "/v1/messages", &simple(&format!("hello {i}"), i % 2 == 0)).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    // The suspended account is tried once and never again.
    assert_eq!(h.emulator.stats_for(&client_id("acct-1")).requests, 1);
    assert_eq!(h.emulator.stats_for(&client_id("acct-3")).requests, 6);
    let health = get(&h, "/health").await;
    assert_eq!(health.status, 200);
    let hj = health.json();
    assert_eq!(hj["status"], "degraded");
    assert_eq!(hj["accounts"]["suspended"], 1);
    assert_eq!(hj["accounts"]["cooling"], 1);
    // The throttled account comes back after its cooldown.
    h.emulator.set_behaviour(&client_id("acct-2"), Behaviour::Normal);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = h.emulator.stats_for(&client_id("acct-2")).requests;
    for i in 0..4 {
        assert_eq!(post(&h, "/v1/messages", &simple(&format!("again {i}"), false)).await.status, 200);
    }
    assert!(h.emulator.stats_for(&client_id("acct-2")).requests > before);
    h.stop().await;
}

#[tokio::test]
async fn errors_before_the_stream_map_to_anthropic_errors() {
    let h = Harness::start(Setup::default()).await;
    let cid = client_id("acct-1");
    let cases: Vec<(&str, u16, &str)> = vec![
        ("throttled 7", 429, "rate_limit_error"),
        ("capacity", 529, "overloaded_error"),
        ("error-500", 500, "api_error"),
        ("error-503", 529, "overloaded_error"),
    ];
    for (directive, status, kind) in cases {
        // The account must be usable again for the next case.
        assert!(amq2api_enable(&h).await);
        let r = post(&h, "/v1/messages", &simple(&format!("x\n#emulator: {directive}"), false)).await;
        assert_eq!(r.status, status, "{directive}: {}", r.text());
        let j = r.json();
        assert_eq!(j["type"], "error");
        assert_eq!(j["error"]["type"], kind, "{directive}");
        assert!(j["request_id"].as_str().unwrap().starts_with("req_"));
        if status == 429 {
            assert_eq!(r.headers["retry-after"], "7");
        }
    }
    let _ = cid;
    // Too long for Amazon Q: refused before any upstream call.
    let before = h.emulator.stats().requests;
    let r = post(&h, "/v1/messages", &simple(&"x".repeat(600_001), false)).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().starts_with("prompt is too long"));
    assert_eq!(h.emulator.stats().requests, before);
    h.stop().await;
}

/// Waits for the single test account to be active again (cooldowns are short in these tests).
async fn amq2api_enable(h: &Harness) -> bool {
    for _ in 0..100 {
        let j = get(h, "/health").await.json();
        if j["accounts"]["active"] == 1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn suspended_only_account_gives_529_and_stays_out() {
    let h = Harness::start(Setup::default()).await;
    h.emulator.set_behaviour(&client_id("acct-1"), Behaviour::Suspended);
    let r = post(&h, "/v1/messages", &simple("x", false)).await;
    assert_eq!(r.status, 529);
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    let r = post(&h, "/v1/messages", &simple("x", true)).await;
    assert_eq!(r.status, 529);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("no usable Amazon Q account"));
    assert_eq!(h.emulator.stats_for(&client_id("acct-1")).requests, 1);
    let health = get(&h, "/health").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["status"], "unavailable");
    h.stop().await;
}

#[tokio::test]
async fn faults_after_the_first_byte_end_with_an_error_event() {
    let h = Harness::start(Setup::default()).await;
    for (directive, kind) in [
        ("corrupt-frame", "api_error"),
        ("reset-after", "api_error"),
        ("exception error MODEL_TEMPORARILY_UNAVAILABLE", "overloaded_error"),
    ] {
        let r = post(&h, "/v1/messages", &simple(&format!("hello\n#emulator: {directive}"), true)).await;
        assert_eq!(r.status, 200, "{directive}");
        let frames = r.sse();
        let last = frames.last().unwrap();
        assert_eq!(last.0, "error", "{directive}: {frames:?}");
        assert_eq!(last.1["error"]["type"], kind, "{directive}");
        // Non-streaming gets an error response instead of a truncated message.
        let r = post(&h, "/v1/messages", &simple(&format!("hello\n#emulator: {directive}"), false)).await;
        assert!(r.status >= 500, "{directive}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], kind);
    }
    // A tool call the service cuts before its stop (it does, with large inputs) is never
    // presented: it is left out, and the message ends with max_tokens (an error had clients
    // send the same request again, into the same cut), streamed and not.
    for stream in [true, false] {
        let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream, "tools": weather_tools(),
            "messages": [{"role": "user", "content": "w\n#emulator: tool get_weather {\"city\": \"Oslo\"}\n#emulator: tool-cut"}]});
        let r = post(&h, "/v1/messages", &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if stream {
            let frames = r.sse();
            assert_eq!(frames.last().unwrap().0, "message_stop", "{frames:?}");
            assert!(
                !frames
                    .iter()
                    .any(|(e, d)| e == "content_block_start" && d["content_block"]["type"] == "tool_use")
            );
            let delta = frames.iter().find(|(e, _)| e == "message_delta").unwrap();
            assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
        } else {
            let m = r.json();
            assert_eq!(m["stop_reason"], "max_tokens", "{m}");
            assert!(!m["content"].as_array().unwrap().iter().any(|b| b["type"] == "tool_use"), "{m}");
        }
    }
    // The ContentLengthExceeded exception is a max_tokens stop.
    let m = post(
        &h,
        "/v1/messages",
        &simple("x\n#emulator: exception ContentLengthExceededException too long", false),
    )
    .await
    .json();
    assert_eq!(m["stop_reason"], "max_tokens", "{m}");
    // Still serving.
    assert_eq!(post(&h, "/v1/messages", &simple("still there?", false)).await.status, 200);
    h.stop().await;
}

/// A non-streaming answer reaches the client only whole, at its end: one whose stream fails
/// after its first content (a reset, the model's capacity) goes to another account, as one
/// that fails before any content does, and the failure is the first account's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streaming_answer_that_fails_midway_fails_over() {
    use amq2api::emulator::Behaviour;
    let h = Harness::start(Setup { accounts: vec!["acct-1".into(), "acct-2".into()], ..Default::default() })
        .await;
    h.emulator.set_behaviour(&client_id("acct-1"), Behaviour::ResetAfterFirstByte);
    for i in 0..6 {
        let r = post(&h, "/v1/messages", &simple(&format!("hello {i}"), false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["stop_reason"], "end_turn");
    }
    let failed = h.emulator.stats_for(&client_id("acct-1")).requests;
    assert!(failed > 0, "the failing account was never tried");
    // An answer that ends with nothing in it (no content, none of the closing events) was
    // cut before it began: another account answers, streamed or not.
    h.emulator.set_behaviour(&client_id("acct-1"), Behaviour::EmptyAnswer);
    let before = h.emulator.stats_for(&client_id("acct-1")).requests;
    for i in 0..6 {
        let stream = i % 2 == 0;
        let r = post(&h, "/v1/messages", &simple(&format!("empty {i}"), stream)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = if stream {
            r.sse()
                .iter()
                .filter(|(e, d)| e == "content_block_delta" && d["delta"]["type"] == "text_delta")
                .count()
        } else {
            r.json()["content"].as_array().unwrap().len()
        };
        assert!(text > 0, "an empty answer reached the client: {}", r.text());
    }
    assert!(
        h.emulator.stats_for(&client_id("acct-1")).requests > before,
        "the empty account was never tried"
    );
    // An empty text event first is no content: the empty answer after it still fails over.
    let before = h.emulator.stats_for(&client_id("acct-1")).requests;
    for i in 0..6 {
        let r = post(&h, "/v1/messages", &simple(&format!("empty {i}\n#emulator: empty-text-first"), false))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let content = r.json()["content"].as_array().unwrap().len();
        assert!(content > 0, "an empty answer reached the client: {}", r.text());
    }
    assert!(
        h.emulator.stats_for(&client_id("acct-1")).requests > before,
        "the empty account was never tried"
    );
    h.emulator.set_behaviour(&client_id("acct-1"), Behaviour::ResetAfterFirstByte);
    assert!(h.account("acct-1")["last_error"].is_string(), "{}", h.account("acct-1"));
    // Streaming: the first bytes went out, so the failure is the client's to see.
    let r = post(&h, "/v1/messages", &simple("hello", true)).await;
    let last = r.sse().last().unwrap().0.clone();
    assert!(last == "message_stop" || last == "error", "{last}");
    h.stop().await;
}

/// A tool call leaves whole, at its `stop`: while the service streams a long one, the client
/// gets nothing of it, and the pings (every 15 s of the client's silence, not the upstream's)
/// keep proxies with read timeouts from cutting the stream. Before, an upstream busy with a
/// tool call for minutes held the pings back, and nothing at all went out.
#[tokio::test]
async fn pings_keep_a_stream_alive_while_a_long_tool_call_arrives() {
    let h = Harness::start(Setup::default()).await;
    let city = "Llanfairpwllgwyngyll ".repeat(14);
    let prompt =
        format!("w\n#emulator: tool get_weather {{\"city\": \"{city}\"}}\n#emulator: slow-fragments 400");
    let body = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": true, "tools": weather_tools(),
        "messages": [{"role": "user", "content": prompt}]});
    let t0 = std::time::Instant::now();
    let frames = post(&h, "/v1/messages", &body).await.sse();
    assert!(
        t0.elapsed() > Duration::from_secs(16),
        "the call was not slow enough to show it: {:?}",
        t0.elapsed()
    );
    let tool = frames
        .iter()
        .position(|(e, d)| e == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .unwrap_or_else(|| panic!("{frames:?}"));
    // message_start's own ping, then at least one while the call arrived.
    let pings = frames[..tool].iter().filter(|(e, _)| e == "ping").count();
    assert!(pings >= 2, "no ping while the tool call arrived: {:?}", &frames[..tool]);
    assert_eq!(frames.last().unwrap().0, "message_stop");
    h.stop().await;
}

/// Starts a long streamed reply (slow when the emulator's fragments are) and returns its body
/// after the 200.
async fn slow_stream(h: &Harness) -> hyper::body::Incoming {
    let req = http::Request::post(h.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .body(Full::new(Bytes::from(simple("go slowly\n#emulator: long 5000", true).to_string())))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body()
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let mut setup = Setup::default();
    setup.emulator.fragment_delay = Duration::from_millis(50);
    let h = Harness::start(setup).await;
    let mut body = slow_stream(&h).await;
    use http_body_util::BodyExt;
    let _first = body.frame().await.unwrap().unwrap();
    assert_eq!(h.emulator.stats().open_streams, 1);
    drop(body);
    let t0 = std::time::Instant::now();
    loop {
        let s = h.emulator.stats();
        if s.open_streams == 0 && s.cancelled_streams == 1 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "upstream stream still open after 1 s: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The lease was released: the account serves again.
    assert_eq!(post(&h, "/v1/messages", &simple("next", false)).await.status, 200);
    h.stop().await;
}

/// The account's counters as `amqctl --json account` shows them: (requests, failures,
/// tokens_out, last_error).
async fn verdicts(h: &Harness) -> (u64, u64, u64, Option<String>) {
    let ctl = h.clone_for_ctl();
    let a = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
            .arg("--socket")
            .arg(ctl.dir.join("control.sock"))
            .args(["--json", "account", "acct-1"])
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    })
    .await
    .unwrap();
    (
        a["requests"].as_u64().unwrap(),
        a["failures"].as_u64().unwrap(),
        a["tokens_out"].as_u64().unwrap(),
        a["last_error"].as_str().map(str::to_owned),
    )
}

/// Once content has reached the client, the stream's end is the account's verdict (recorded by
/// the relay): a stream that ends well counts a request and its output tokens; one whose
/// upstream fails midway — streaming or not — is a failure of the account, classified as one
/// before any content is, with the upstream's error (which the client's names); one the client
/// leaves is neither. (One the daemon ends itself — timeout, shutdown — is no verdict either:
/// `a_stream_this_daemon_ends_is_no_verdict_on_its_account`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_stream_is_recorded_on_its_account() {
    let mut setup = Setup::default();
    setup.emulator.fragment_delay = Duration::from_millis(50);
    let h = Harness::start(setup).await;
    let r = post(&h, "/v1/messages", &simple("hello", true)).await;
    assert_eq!(r.sse().last().unwrap().0, "message_stop");
    let (requests, failures, tokens_out, _) = verdicts(&h).await;
    assert_eq!((requests, failures), (1, 0));
    assert!(tokens_out > 0);

    let r = post(&h, "/v1/messages", &simple("hello\n#emulator: reset-after", true)).await;
    let last = r.sse().last().unwrap().clone();
    assert_eq!(last.0, "error");
    let (requests, failures, _, last_error) = verdicts(&h).await;
    assert_eq!((requests, failures), (1, 1), "a mid-stream failure is the account's");
    let last_error = last_error.unwrap();
    assert!(last.1["error"]["message"].as_str().unwrap().contains(&last_error), "{last_error}: {last:?}");

    // Non-streaming, nothing sent yet: the failure is the account's as before any content (on
    // every account the request went to; here, one).
    let r = post(&h, "/v1/messages", &simple("hello\n#emulator: corrupt-frame", false)).await;
    assert_eq!(r.status, 500, "{}", r.text());
    let (requests, failures, _, last_error) = verdicts(&h).await;
    assert_eq!((requests, failures), (1, 2));
    let last_error = last_error.unwrap();
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains(&last_error),
        "{last_error}: {}",
        r.text()
    );

    // The client leaves after the first bytes: no verdict.
    let mut body = slow_stream(&h).await;
    use http_body_util::BodyExt;
    let _first = body.frame().await.unwrap().unwrap();
    drop(body);
    let t0 = std::time::Instant::now();
    while h.emulator.stats().open_streams > 0 {
        assert!(t0.elapsed() < Duration::from_secs(2), "the upstream stream stays open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (requests, failures, _, _) = verdicts(&h).await;
    assert_eq!((requests, failures), (1, 2), "a stream the client left is no verdict");
    h.stop().await;
}

/// How a stream ends after its first content is classified as a failure before any content
/// is: a throttle in the middle of the answer cools the account down (it kept its traffic
/// before). A stream this daemon ends itself (`request_timeout_secs`) is no verdict on the
/// account: the account did nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_this_daemon_ends_is_no_verdict_on_its_account() {
    let mut setup = Setup { server: "request_timeout_secs = 1".into(), ..Default::default() };
    setup.emulator.fragment_delay = Duration::from_millis(50);
    let h = Harness::start(setup).await;
    let r = post(&h, "/v1/messages", &simple("go on\n#emulator: long 5000", true)).await;
    let last = r.sse().last().unwrap().clone();
    assert_eq!(last.0, "error", "{last:?}");
    assert!(last.1["error"]["message"].as_str().unwrap().contains("timed out"), "{last:?}");
    let (_, failures, _, last_error) = verdicts(&h).await;
    assert_eq!((failures, last_error), (0, None), "the daemon's own timeout was put on the account");
    assert_eq!(h.account("acct-1")["state"], "active");

    let r =
        post(&h, "/v1/messages", &simple("hi\n#emulator: exception ThrottlingException Rate exceeded", true))
            .await;
    assert_eq!(r.sse().last().unwrap().0, "error");
    assert_eq!(h.account("acct-1")["state"], "cooling", "a throttle mid-stream left the account serving");
    h.stop().await;
}

#[tokio::test]
async fn count_tokens_and_models() {
    let h = Harness::start(Setup::default()).await;
    let body = json!({"model": "claude-sonnet-4-5", "system": "You are terse.", "tools": weather_tools(),
        "messages": [{"role": "user", "content": "How many tokens is this sentence?"}]});
    let r = post(&h, "/v1/messages/count_tokens", &body).await;
    assert_eq!(r.status, 200);
    let n = r.json()["input_tokens"].as_u64().unwrap();
    assert!(n > 20 && n < 200, "{n}");
    assert_eq!(h.emulator.stats().requests, 0, "count_tokens never calls upstream");

    // Pagination ends.
    let mut after: Option<String> = None;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let path = match &after {
            Some(a) => format!("/v1/models?limit=2&after_id={a}"),
            None => "/v1/models?limit=2".into(),
        };
        let page = get(&h, &path).await.json();
        for m in page["data"].as_array().unwrap() {
            assert_eq!(m["type"], "model");
            seen.push(m["id"].as_str().unwrap().to_string());
        }
        if page["has_more"] == false {
            break;
        }
        after = page["last_id"].as_str().map(str::to_string);
    }
    assert!(seen.len() >= 4 && seen.contains(&"claude-sonnet-4-5-20250929".to_string()), "{seen:?}");
    let one = get(&h, "/v1/models/claude-sonnet-4-5-20250929").await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["display_name"], "Claude Sonnet 4.5");
    assert_eq!(get(&h, "/v1/models/gpt-5").await.status, 404);
    h.stop().await;
}

/// `count_tokens` bodies have their own cap (`count_tokens_max_bytes`), below `max_body_bytes`:
/// above it, 413 `request_too_large` in Anthropic's shape; the same body is a valid Messages
/// request. Bodies above 64 KiB are parsed and counted on the CPU pool, and answer as inline ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_bodies_have_their_own_cap() {
    let h = Harness::start(Setup { server: "count_tokens_max_bytes = 200000".into(), ..Default::default() })
        .await;
    let words = |n: usize| "count these words please ".repeat(n / 25);
    let big = simple(&words(300_000), false);
    let r = post(&h, "/v1/messages/count_tokens", &big).await;
    assert_eq!(
        (r.status, r.json()["error"]["type"].clone()),
        (413, json!("request_too_large")),
        "{}",
        r.text()
    );
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("200000 bytes"), "{}", r.text());
    let r = post(&h, "/v1/messages", &big).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["usage"]["input_tokens"].as_u64().unwrap() > 40_000, "{}", r.text());
    // Under the cap, on the pool (above 64 KiB) and inline: four tokens a phrase either way.
    let mut counts = Vec::new();
    for size in [150_000, 15_000] {
        let r = post(&h, "/v1/messages/count_tokens", &simple(&words(size), false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        counts.push(r.json()["input_tokens"].as_u64().unwrap());
    }
    assert_eq!(counts[0] - counts[1], (150_000 - 15_000) / 25 * 4, "{counts:?}");
    h.stop().await;
}

#[tokio::test]
async fn auth_and_http_edge_errors() {
    let h = Harness::start(Setup::default()).await;
    let send_with =
        |key: Option<(&'static str, String)>, ct: &'static str, body: Bytes, path: &str, method: &str| {
            let mut b = http::Request::builder().method(method).uri(h.url(path)).header("content-type", ct);
            if let Some((k, v)) = key {
                b = b.header(k, v);
            }
            send(b.body(Full::new(body)).unwrap())
        };
    let good = Bytes::from(simple("x", false).to_string());
    let r = send_with(None, "application/json", good.clone(), "/v1/messages", "POST").await;
    assert_eq!((r.status, r.json()["error"]["type"].clone()), (401, json!("authentication_error")));
    let r = send_with(
        Some(("x-api-key", "sk-wrong-key-000000000".into())),
        "application/json",
        good.clone(),
        "/v1/messages",
        "POST",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = send_with(
        Some(("authorization", format!("Bearer {API_KEY}"))),
        "application/json",
        good.clone(),
        "/v1/messages",
        "POST",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Both headers (the SDKs send both when both ANTHROPIC_API_KEY and ANTHROPIC_AUTH_TOKEN
    // are set): either may hold this server's key.
    for (x_api_key, bearer, status) in [
        ("sk-someone-elses-000000", API_KEY, 200),
        (API_KEY, "sk-someone-elses-000000", 200),
        ("sk-someone-elses-000000", "sk-another-one-0000000", 401),
    ] {
        let req = http::Request::post(h.url("/v1/messages"))
            .header("content-type", "application/json")
            .header("x-api-key", x_api_key)
            .header("authorization", format!("Bearer {bearer}"))
            .body(Full::new(good.clone()))
            .unwrap();
        let r = send(req).await;
        assert_eq!(r.status, status, "x-api-key {x_api_key}, bearer {bearer}: {}", r.text());
    }
    let key = || Some(("x-api-key", API_KEY.to_string()));
    // A compressed body: 415 naming the encoding, not a JSON error about byte 1.
    let req = http::Request::post(h.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("x-api-key", API_KEY)
        .body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00")))
        .unwrap();
    let r = send(req).await;
    assert_eq!(
        (r.status, r.json()["error"]["type"].clone()),
        (415, json!("invalid_request_error")),
        "{}",
        r.text()
    );
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("\"gzip\" is not supported"),
        "{}",
        r.text()
    );
    let r = send_with(key(), "text/plain", good.clone(), "/v1/messages", "POST").await;
    assert_eq!((r.status, r.json()["error"]["type"].clone()), (400, json!("invalid_request_error")));
    let r = send_with(key(), "application/json", Bytes::from_static(b"{nope"), "/v1/messages", "POST").await;
    assert_eq!(r.status, 400);
    let r =
        send_with(key(), "application/json", Bytes::from_static(b"\xff\xfe"), "/v1/messages", "POST").await;
    assert_eq!(r.status, 400);
    let r = send_with(key(), "application/json", good.clone(), "/v1/nothing", "POST").await;
    assert_eq!((r.status, r.json()["error"]["type"].clone()), (404, json!("not_found_error")));
    let r = send_with(key(), "application/json", good.clone(), "/v1/messages", "GET").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "POST");
    let huge = Bytes::from(vec![b' '; 33 * 1024 * 1024]);
    let r = send_with(key(), "application/json", huge, "/v1/messages", "POST").await;
    assert_eq!((r.status, r.json()["error"]["type"].clone()), (413, json!("request_too_large")));
    let r = send_with(None, "application/json", Bytes::new(), "/health", "GET").await;
    assert_eq!(r.status, 200);
    let r = send_with(None, "application/json", Bytes::new(), "/metrics", "GET").await;
    assert_eq!(r.status, 401);
    let r = send_with(key(), "application/json", Bytes::new(), "/metrics", "GET").await;
    assert!(
        // The Bearer request and the two with both headers.
        r.text().contains("amq2api_requests_total{model=\"claude-sonnet-4-5\",status=\"200\"} 3"),
        "{}",
        r.text()
    );
    let r = send_with(
        key(),
        "application/json",
        Bytes::from(json!({"model": "m", "messages": []}).to_string()),
        "/v1/messages",
        "POST",
    )
    .await;
    assert_eq!(r.json()["error"]["message"], "max_tokens: Field required");
    h.stop().await;
}

/// POST with an optional `anthropic-version` header.
async fn post_version(h: &Harness, path: &str, version: Option<&str>, body: &Value) -> Reply {
    let mut req = http::Request::post(h.url(path))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY);
    if let Some(v) = version {
        req = req.header("anthropic-version", v);
    }
    send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await
}

#[tokio::test]
async fn anthropic_version_known_or_absent_is_served_and_unknown_is_400() {
    let h = Harness::start(Setup::default()).await;
    for (version, status) in
        [(None, 200), (Some("2023-06-01"), 200), (Some("2023-01-01"), 200), (Some("2026-10-21"), 200)]
    {
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let r = post_version(&h, path, version, &simple("hi", false)).await;
            assert_eq!(r.status, status, "{version:?} {path}: {}", r.text());
        }
    }
    for bad in ["9999-99-99", "2027-01-01", "2023-6-1", "latest"] {
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let r = post_version(&h, path, Some(bad), &simple("hi", true)).await;
            assert_eq!(r.status, 400, "{bad} {path}: {}", r.text());
            let e = r.json();
            assert_eq!(e["type"], "error");
            assert_eq!(e["error"]["type"], "invalid_request_error");
            let msg = e["error"]["message"].as_str().unwrap();
            assert!(
                msg.starts_with(&format!("anthropic-version: \"{bad}\" is not a valid version")),
                "{msg}"
            );
        }
    }
    h.stop().await;
}

/// A request whose last user message holds a base64 image of `len` characters, at the top
/// level or inside a tool result.
fn with_image(len: usize, in_tool_result: bool) -> Value {
    let image = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A".repeat(len)}});
    let (assistant, last) = if in_tool_result {
        (
            json!([{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]),
            json!([{"type": "tool_result", "tool_use_id": "toolu_1", "content": [image]}]),
        )
    } else {
        (json!("ok"), json!([{"type": "text", "text": "what is this?"}, image]))
    };
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 100,
        "tools": weather_tools(),
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": assistant},
            {"role": "user", "content": last}
        ]
    })
}

#[tokio::test]
async fn an_image_over_5_mb_is_refused_naming_its_block() {
    let h = Harness::start(Setup::default()).await;
    const LIMIT: usize = 5 << 20;
    for (in_tool_result, path) in
        [(false, "messages.2.content.1.source.data"), (true, "messages.2.content.0.content.0.source.data")]
    {
        for endpoint in ["/v1/messages", "/v1/messages/count_tokens"] {
            let r = post(&h, endpoint, &with_image(LIMIT, in_tool_result)).await;
            assert_eq!(r.status, 200, "{endpoint}: at the limit: {}", r.text());
            let r = post(&h, endpoint, &with_image(LIMIT + 4, in_tool_result)).await;
            assert_eq!(r.status, 400, "{endpoint}: over the limit: {}", r.text());
            let e = r.json();
            assert_eq!(e["error"]["type"], "invalid_request_error");
            assert_eq!(
                e["error"]["message"],
                format!("{path}: image exceeds 5 MB maximum: {} bytes > {LIMIT} bytes", LIMIT + 4),
                "{endpoint}"
            );
        }
    }
    h.stop().await;
}

/// The samples of `name` in a Prometheus text exposition, as (labels, value).
fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        let (series_name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                (n, rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}")))
            }
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line}"));
                (k.to_string(), v.trim_end_matches('"').to_string())
            })
            .collect();
        out.push((labels, value.parse().unwrap_or_else(|e| panic!("bad value ({e}): {line}"))));
    }
    out
}

/// The sum of the samples of `name` that carry all of `want` (other labels are summed over).
fn sample_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(labels, _)| want.iter().all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|(_, v)| v)
        .fold(0.0, |sum, v| sum + v) // (an empty f64 sum() is -0.0)
}

#[tokio::test]
async fn metrics_count_the_tokens_requests_and_latencies_of_answers() {
    let h = Harness::start(Setup::default()).await;
    // `simple` asks for claude-sonnet-4-5-20250929: metrics name the model the name resolved
    // to (a dated name is its model's).
    let label = "claude-sonnet-4-5";
    let r = post(&h, "/v1/messages", &simple("count these tokens", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let frames = r.sse();
    let streamed =
        frames.iter().find(|(e, _)| e == "message_delta").expect("a message_delta").1["usage"].clone();
    let r = post(&h, "/v1/messages", &simple("and these ones as well", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let answered = r.json()["usage"].clone();
    let usage = |dir: &str| {
        let key = format!("{dir}put_tokens");
        streamed[&key].as_u64().unwrap() + answered[&key].as_u64().unwrap()
    };
    let (tokens_in, tokens_out) = (usage("in"), usage("out"));
    assert!(tokens_in > 0 && tokens_out > 0, "{streamed} {answered}");

    let m = get(&h, "/metrics").await;
    assert_eq!(m.status, 200);
    let text = m.text();
    let t = text.as_str();
    assert_eq!(
        (
            sample_sum(t, "amq2api_tokens_total", &[("model", label), ("direction", "in")]),
            sample_sum(t, "amq2api_tokens_total", &[("model", label), ("direction", "out")]),
        ),
        (tokens_in as f64, tokens_out as f64),
        "{t}"
    );
    assert_eq!(m.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(sample_sum(t, "amq2api_requests_total", &[("model", label), ("status", "200")]), 2.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_upstream_attempts_total", &[("outcome", "ok")]), 2.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_upstream_attempts_total", &[]), 2.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_failovers_total", &[]), 0.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_first_byte_seconds_count", &[]), 2.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_first_byte_seconds_bucket", &[("le", "+Inf")]), 2.0, "{t}");
    // Both answers, the stream included; the scrape itself is not a request to time.
    assert_eq!(sample_sum(t, "amq2api_request_duration_seconds_count", &[]), 2.0, "{t}");
    assert!(sample_sum(t, "amq2api_request_duration_seconds_sum", &[]) > 0.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_streams_in_flight", &[]), 0.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_accounts", &[("state", "active")]), 1.0, "{t}");
    // One refresh per call of the token endpoint, however many requests waited for it.
    assert_eq!(
        sample_sum(t, "amq2api_token_refreshes_total", &[("result", "ok")]),
        h.emulator.stats().refreshes as f64,
        "{t}"
    );
    assert_eq!(sample_sum(t, "amq2api_token_refreshes_total", &[("result", "failed")]), 0.0, "{t}");
    h.stop().await;
}

/// Waits until every account has fetched its model catalog.
async fn catalogs_fetched(h: &Harness, ids: &[&str]) {
    let t0 = std::time::Instant::now();
    loop {
        let accounts = h.ctl_json(&["accounts"]);
        let done = ids.iter().all(|id| {
            accounts.as_array().unwrap().iter().any(|a| a["id"] == *id && a["catalog_fetched_at"].is_u64())
        });
        if done {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "catalogs not fetched: {accounts}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn models_request(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "which model?"}]})
}

/// `/v1/models` is what the enabled accounts offer (their live catalogs), under Claude-style
/// ids with a `[1m]` id for each 1M window and other families under their own ids; a request
/// goes only to an account that offers its model; a model no account offers is a 404 naming it;
/// `max_tokens` above the model's output limit is a 400, as Anthropic answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_and_routing_follow_the_accounts_catalogs() {
    let setup = Setup {
        accounts: vec!["claude-seat".into(), "other-seat".into()],
        // The catalogs are set before the daemon starts (and fetches them).
        more_accounts: Some(Box::new(|e| {
            let claude_only: Vec<_> = amq2api::emulator::default_catalog()
                .into_iter()
                .filter(|m| m.model_id.starts_with("claude-"))
                .collect();
            e.set_catalog(&client_id("claude-seat"), claude_only);
            e.set_catalog(&client_id("other-seat"), amq2api::emulator::catalog::non_claude_catalog());
            String::new()
        })),
        ..Default::default()
    };
    let h = Harness::start(setup).await;
    catalogs_fetched(&h, &["claude-seat", "other-seat"]).await;
    let list = get(&h, "/v1/models?limit=1000").await.json();
    let ids: Vec<String> =
        list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    for want in [
        "claude-opus-4-8",
        "claude-opus-4-8[1m]",
        "claude-sonnet-4-5",
        "claude-sonnet-4-5[1m]",
        "claude-sonnet-5",
        "gpt-5.6-sol",
    ] {
        assert!(ids.contains(&want.to_owned()), "{want} missing from {ids:?}");
    }
    assert!(!ids.contains(&"claude-opus-4-5[1m]".to_owned()), "a 200k model has no [1m] id: {ids:?}");
    for m in list["data"].as_array().unwrap() {
        assert!(
            m["display_name"].as_str().is_some_and(|d| !d.is_empty()) && m["created_at"].is_string(),
            "{m}"
        );
    }
    // Routing: the non-Claude model only the other seat offers, a Claude model only the first.
    let r = post(&h, "/v1/messages", &models_request("gpt-5.6-sol", 1000)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let other = h.emulator.stats_for(&client_id("other-seat"));
    assert_eq!(other.requests, 1);
    assert_eq!(
        other.last_request.unwrap()["conversationState"]["currentMessage"]["userInputMessage"]["modelId"],
        "gpt-5.6-sol"
    );
    for model in ["claude-opus-4-8[1m]", "claude-sonnet-4-5-20250929", "claude-sonnet-5"] {
        let r = post(&h, "/v1/messages", &models_request(model, 1000)).await;
        assert_eq!(r.status, 200, "{model}: {}", r.text());
    }
    assert_eq!(
        h.emulator.stats_for(&client_id("other-seat")).requests,
        1,
        "Claude models went to the seat offering them"
    );
    let last = h.emulator.stats_for(&client_id("claude-seat")).last_request.unwrap();
    assert_eq!(last["conversationState"]["currentMessage"]["userInputMessage"]["modelId"], "claude-sonnet-5");
    // Nobody offers it: Anthropic's 404, naming the model.
    let r = post(&h, "/v1/messages", &models_request("claude-opus-9", 1000)).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    assert!(r.text().contains("claude-opus-9"), "{}", r.text());
    // Output limits from tokenLimits: Opus 4.8 takes 128000, Opus 4.6 64000.
    assert_eq!(post(&h, "/v1/messages", &models_request("claude-opus-4-8", 128_000)).await.status, 200);
    // Above a model's limit: served (at the model's limit), not refused.
    let r = post(&h, "/v1/messages", &models_request("claude-opus-4-6", 100_000)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A dated id retrieves its model.
    let m = get(&h, "/v1/models/claude-opus-4-8%5B1m%5D").await;
    assert_eq!(m.status, 200, "{}", m.text());
    h.stop().await;
}

/// An account that answers `INVALID_MODEL_ID` loses that model until its catalog is fetched
/// again (`amqctl refresh`), and the request fails over to an account that offers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_that_refuses_a_model_loses_it_until_the_next_fetch() {
    let setup = Setup { accounts: vec!["refuser".into(), "taker".into()], ..Default::default() };
    let h = Harness::start(setup).await;
    catalogs_fetched(&h, &["refuser", "taker"]).await;
    h.emulator.set_behaviour(&client_id("refuser"), Behaviour::InvalidModel);
    for i in 0..4 {
        let r = post(&h, "/v1/messages", &simple(&format!("r{i}"), i % 2 == 0)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(h.emulator.stats_for(&client_id("refuser")).requests <= 1, "tried at most once");
    let models = h.account("refuser")["models"].to_string();
    assert!(!models.contains("\"claude-sonnet-4.5\""), "{models}");
    assert_eq!(h.account("refuser")["state"], "active", "the model, not the account");
    h.emulator.set_behaviour(&client_id("refuser"), Behaviour::Normal);
    let r = h.ctl_json(&["refresh", "refuser"]);
    assert!(r.to_string().contains("catalog:"), "{r}");
    assert!(h.account("refuser")["models"].to_string().contains("\"claude-sonnet-4.5\""));
    h.stop().await;
}

/// The catalog is kept in the store (a restart serves it at once, without fetching), and a
/// failed fetch keeps the last good one, showing the failure with the account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_survives_restarts_and_failed_fetches() {
    let mut h = Harness::start(Setup { accounts: vec!["kept".into()], ..Default::default() }).await;
    let cid = client_id("kept");
    catalogs_fetched(&h, &["kept"]).await;
    assert_eq!(h.emulator.stats_for(&cid).catalog_requests, 1);
    h.emulator.set_listing_behaviour(&cid, Behaviour::InternalError);
    let r = h.ctl_json(&["refresh", "kept"]);
    assert!(r.to_string().contains("catalog fetch failed"), "{r}");
    let a = h.account("kept");
    assert!(a["catalog_error"].as_str().is_some_and(|e| e.contains("catalog fetch failed")), "{a}");
    assert!(a["models"].to_string().contains("claude-opus-4.8"), "the last good catalog stays: {a}");
    h.restart().await;
    let list = get(&h, "/v1/models?limit=1000").await.json();
    assert!(list.to_string().contains("claude-opus-4-8[1m]"), "served from the store: {list}");
    assert_eq!(
        h.emulator.stats_for(&cid).catalog_requests,
        2,
        "no fetch after the restart (the stored one is fresh)"
    );
    h.stop().await;
}

/// Usage: the service's own figures when `metadataEvent.tokenUsage` carries them (input
/// uncached, output, cache read and written, exactly), else the daemon's estimates with no cache
/// figures invented; the credits of `meteringEvent` go to the account, `/metrics` and the
/// non-streaming answer's `x-amq2api-credits` header — never into Anthropic's `usage`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_the_services_when_given_and_credits_are_counted() {
    let h = Harness::start(Setup {
        emulator: amq2api::emulator::EmulatorOptions { token_usage: true, ..Default::default() },
        ..Default::default()
    })
    .await;
    let r = post(&h, "/v1/messages", &simple("count me", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    let usage = &m["usage"];
    let up = h.emulator.stats_for(&client_id("acct-1"));
    let req = up.last_request.unwrap();
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(usage["cache_read_input_tokens"], 0);
    assert_eq!(usage["cache_creation_input_tokens"], 0);
    assert!(usage.get("credits").is_none(), "credits stay out of Anthropic's usage: {usage}");
    let credits: f64 = r.headers["x-amq2api-credits"].to_str().unwrap().parse().unwrap();
    assert!(credits > 0.0, "{credits}");
    assert!(req.is_object());
    // Streaming: message_delta carries the same service figures.
    let s = post(&h, "/v1/messages", &simple("count me", true)).await;
    let frames = s.sse();
    let delta = frames.iter().find(|(e, _)| e == "message_delta").unwrap();
    assert_eq!(delta.1["usage"]["input_tokens"], usage["input_tokens"], "{delta:?}");
    // The account's credits: both answers'.
    let a = h.account("acct-1");
    let account_credits = a["credits"].as_f64().unwrap();
    assert!((account_credits - 2.0 * credits).abs() < 0.001, "{account_credits} vs 2 × {credits}");
    let metrics = get(&h, "/metrics").await.text();
    assert!(metrics.contains("amq2api_credits_total{model=\"claude-sonnet-4-5\"}"), "{metrics}");
    h.stop().await;

    // Without tokenUsage: the estimate (context-usage share of the model's window); cache 0.
    let h = Harness::start(Setup::default()).await;
    let r = post(&h, "/v1/messages", &simple("estimate me", false)).await;
    let usage = r.json()["usage"].clone();
    assert!(usage["input_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        (usage["cache_read_input_tokens"].clone(), usage["cache_creation_input_tokens"].clone()),
        (0.into(), 0.into())
    );
    h.stop().await;
}

/// The client's `cache_control` breakpoints become Amazon Q `cachePoint`s for a model whose
/// catalog entry supports prompt caching (at most its checkpoint count), on the messages that
/// carry them; a model without caching gets none. The emulator checks both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_breakpoints_become_cache_points_where_the_model_caches() {
    let h = Harness::start(Setup::default()).await;
    catalogs_fetched(&h, &["acct-1"]).await;
    let cc = json!({"type": "ephemeral"});
    let body = |model: &str| {
        json!({
            "model": model, "max_tokens": 256,
            "system": [{"type": "text", "text": "You are terse.", "cache_control": cc}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "first", "cache_control": cc}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "second"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "fine", "cache_control": cc}]},
                {"role": "user", "content": [{"type": "text", "text": "third", "cache_control": cc}]},
            ],
        })
    };
    let r = post(&h, "/v1/messages", &body("claude-sonnet-4-5")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = h.emulator.stats_for(&client_id("acct-1")).last_request.unwrap();
    let state = &sent["conversationState"];
    let points: Vec<String> = state["history"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.as_object().unwrap().values().any(|v| v["cachePoint"] == json!({"type": "default"}))
        })
        .map(|(i, _)| format!("history.{i}"))
        .chain(
            (state["currentMessage"]["userInputMessage"]["cachePoint"] == json!({"type": "default"}))
                .then(|| "current".to_owned()),
        )
        .collect();
    // Four breakpoints (system + 3 messages), the model takes 4: the first message (it carries
    // the system prompt and its own), the assistant's "fine" and the current one.
    assert_eq!(points, ["history.0", "history.3", "current"], "{state}");
    // A model without prompt caching: no cachePoint at all (the emulator would refuse one).
    let r = post(&h, "/v1/messages", &body("gpt-5.6-sol")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = h.emulator.stats_for(&client_id("acct-1")).last_request.unwrap();
    assert!(!sent.to_string().contains("cachePoint"), "{sent}");
    h.stop().await;
}

/// Model names are the client's to choose: metrics and usage name the model a name resolved
/// to (or `other`), so that dated names and made-up names do not each make a new series, and
/// a name that is no identifier (control characters, kilobytes) is refused.
#[tokio::test]
async fn client_model_names_do_not_grow_the_metrics() {
    let h = Harness::start(Setup::default()).await;
    for n in 0..20 {
        for model in [format!("claude-sonnet-4-5-2025{:04}", 1000 + n), format!("claude-made-up-{n}")] {
            let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
            let r = post(&h, "/v1/messages/count_tokens", &body).await;
            assert!(r.status == 200 || r.status == 404, "{model}: {}", r.text());
        }
    }
    let text = get(&h, "/metrics").await.text();
    let labels: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("amq2api_requests_total{"))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(labels, ["claude-sonnet-4-5", "other"].into_iter().collect(), "{text}");
    for model in ["claude-sonnet-4-5\nforged access line".to_string(), "c".repeat(300)] {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        let r = post(&h, "/v1/messages/count_tokens", &body).await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            r.json()["error"]["message"].as_str().unwrap().starts_with("model: must be a model name"),
            "{}",
            r.text()
        );
    }
    h.stop().await;
}

/// A stream that fails after its 200 headers (a corrupt frame after some content: `event: error`
/// `api_error`; an in-stream exception: `overloaded_error`) is counted in `/metrics` under the
/// status its error stands for (500, 529), not 200; the tokens the client was told
/// (`message_start`'s input) still count.
#[tokio::test]
async fn metrics_count_a_stream_failed_midway_under_its_real_outcome() {
    let h = Harness::start(Setup::default()).await;
    // `simple` asks for claude-sonnet-4-5-20250929: metrics name the model the name resolved
    // to (a dated name is its model's).
    let label = "claude-sonnet-4-5";
    for (directive, kind) in [
        ("corrupt-frame", "api_error"),
        ("exception error MODEL_TEMPORARILY_UNAVAILABLE", "overloaded_error"),
    ] {
        let r =
            post(&h, "/v1/messages", &simple(&format!("fail midway\n#emulator: {directive}"), true)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let frames = r.sse();
        let error = frames.iter().find(|(e, _)| e == "error").unwrap_or_else(|| panic!("{frames:?}"));
        assert_eq!(error.1["error"]["type"], kind, "{frames:?}");
    }
    let text = get(&h, "/metrics").await.text();
    let t = text.as_str();
    assert_eq!(sample_sum(t, "amq2api_requests_total", &[("model", label), ("status", "200")]), 0.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_requests_total", &[("model", label), ("status", "500")]), 1.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_requests_total", &[("model", label), ("status", "529")]), 1.0, "{t}");
    assert!(sample_sum(t, "amq2api_tokens_total", &[("model", label), ("direction", "in")]) > 0.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_request_duration_seconds_count", &[]), 2.0, "{t}");
    assert_eq!(sample_sum(t, "amq2api_streams_in_flight", &[]), 0.0, "{t}");
    h.stop().await;
}

/// Every metric the shipped Grafana dashboard (`packaging/grafana/amq2api.json`) queries is one
/// a `/metrics` scrape exposes, and the dashboard is valid JSON with a query in every panel.
#[tokio::test]
async fn grafana_dashboard_queries_only_exposed_metrics() {
    let h = Harness::start(Setup::default()).await;
    for stream in [false, true] {
        let r = post(&h, "/v1/messages", &simple("fill every family", stream)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let scrape = get(&h, "/metrics").await.text();
    h.stop().await;
    let exposed: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/grafana/amq2api.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        exprs.extend(targets.iter().map(|t| t["expr"].as_str().unwrap().to_owned()));
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        exprs.push(var["definition"].as_str().unwrap().to_owned());
    }
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("amq2api_") {
            let name: String =
                rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[at + name.len()..];
            used.insert(name);
        }
    }
    for name in [
        "amq2api_requests_total",
        "amq2api_upstream_attempts_total",
        "amq2api_failovers_total",
        "amq2api_first_byte_seconds_bucket",
        "amq2api_request_duration_seconds_bucket",
        "amq2api_accounts",
        "amq2api_tokens_total",
        "amq2api_credits_total",
    ] {
        assert!(used.contains(name), "the dashboard shows {name}");
    }
    for name in &used {
        assert!(exposed.contains(name.as_str()), "{name} is not in a /metrics scrape: {exposed:?}");
    }
}

/// `count_tokens` and a stream's `message_start` `usage.input_tokens` come from the same local
/// count: over every golden request (`tests/fixtures/claude/*.json`) the two agree.
#[tokio::test]
async fn count_tokens_agrees_with_message_start_over_the_goldens() {
    let h = Harness::start(Setup::default()).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude");
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    let (mut compared, mut skipped) = (Vec::new(), Vec::new());
    for path in names.iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut body: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let counted = post(&h, "/v1/messages/count_tokens", &body).await;
        assert_eq!(counted.status, 200, "{name}: {}", counted.text());
        let counted = counted.json()["input_tokens"].as_u64().unwrap_or_else(|| panic!("{name}"));
        body["stream"] = serde_json::Value::Bool(true);
        let r = post(&h, "/v1/messages", &body).await;
        if r.status != 200 {
            // A golden the emulator refuses (as Amazon Q would) has no message_start to compare.
            skipped.push(format!("{name} ({})", r.status));
            continue;
        }
        let frames = r.sse();
        let start = frames.iter().find(|(e, _)| e == "message_start").unwrap_or_else(|| panic!("{name}"));
        let started = start.1["message"]["usage"]["input_tokens"].as_u64().unwrap();
        assert_eq!(started, counted, "{name}: message_start {started}, count_tokens {counted}");
        compared.push(name);
    }
    assert!(
        compared.len() >= 10 && compared.len() > skipped.len(),
        "compared {compared:?}, skipped {skipped:?}"
    );
    h.stop().await;
}

/// `/v1/messages` as `key`-less tests send it, with extra headers.
async fn post_with(h: &Harness, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut req = http::Request::post(h.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .header("anthropic-version", "2023-06-01");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await
}

/// What Claude Code sends in ordinary sessions that used to be refused or misrouted:
/// - a thinking block another model or service signed (a `/model` switch): the service refuses
///   the signature, and the history goes again without replayed reasoning;
/// - the 1M-context beta with the model's plain name: the 1M variant;
/// - interleaved thinking with a budget reaching `max_tokens`;
/// - tool search's `tool_reference` blocks in a tool result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_session_shapes_get_through() {
    let h = Harness::start(Setup::default()).await;
    let last = || h.emulator.stats_for(&client_id("acct-1")).last_request.unwrap();
    let requests = || h.emulator.stats_for(&client_id("acct-1")).requests;
    // The catalog is fetched: the models resolve against it (and reason natively).
    catalogs_fetched(&h, &["acct-1"]).await;

    // A real answer with signed thinking; its signature then changed, as another service's
    // would be to this one.
    let question = json!({"role": "user", "content": "Why is the sky blue?"});
    let ask = json!({"model": "claude-sonnet-5", "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048},
        "messages": [question.clone()]});
    let answer = post(&h, "/v1/messages", &ask).await.json();
    assert_eq!(answer["content"][0]["type"], "thinking", "{answer}");
    let mut content = answer["content"].clone();
    let signature = content[0]["signature"].as_str().unwrap().to_owned();
    let first = if signature.starts_with('A') { "B" } else { "A" };
    content[0]["signature"] = json!(format!("{first}{}", &signature[1..]));
    let foreign = json!({"model": "claude-sonnet-5", "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 2048},
        "messages": [question, {"role": "assistant", "content": content},
            {"role": "user", "content": "And at sunset?"}]});
    let refused = || async {
        let m = get(&h, "/metrics").await.text();
        m.lines()
            .find(|l| l.starts_with("amq2api_upstream_attempts_total{outcome=\"bad_request\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (before, refused_before) = (requests(), refused().await);
    let r = post(&h, "/v1/messages", &foreign).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (requests(), refused().await),
        (before + 2, refused_before + 1),
        "refused once, then sent again"
    );
    let sent = last();
    assert!(
        sent["conversationState"]["history"][1]["assistantResponseMessage"].get("reasoningContent").is_none()
    );
    assert_eq!(
        sent["conversationState"]["history"][1]["assistantResponseMessage"]["content"],
        answer["content"][1]["text"]
    );

    let plain = json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024,
        "messages": [{"role": "user", "content": "hello"}]});
    assert_eq!(
        post_with(&h, &plain, &[("anthropic-beta", "oauth-2025-04-20,context-1m-2025-08-07")]).await.status,
        200
    );
    assert_eq!(
        last()["conversationState"]["currentMessage"]["userInputMessage"]["modelId"],
        "claude-sonnet-4.5-1m"
    );
    let r = post_with(&h, &plain, &[("anthropic-beta", "interleaved-thinking-2025-05-14")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["model"], "claude-sonnet-4-5-20250929", "the model is echoed as sent");
    assert_eq!(
        last()["conversationState"]["currentMessage"]["userInputMessage"]["modelId"],
        "claude-sonnet-4.5"
    );

    let budget = json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 4096},
        "messages": [{"role": "user", "content": "think"}]});
    assert_eq!(post(&h, "/v1/messages", &budget).await.status, 400);
    let r = post_with(&h, &budget, &[("anthropic-beta", "interleaved-thinking-2025-05-14")]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let searched = json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024,
        "tools": [{"name": "Read", "description": "Read a file", "input_schema": {"type": "object"}, "defer_loading": true}],
        "messages": [
            {"role": "user", "content": "Find a tool to read files"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch", "input": {"query": "read"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                "content": [{"type": "tool_reference", "tool_name": "Read"}]}]}]});
    let r = post(&h, "/v1/messages", &searched).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(last().to_string().contains("[tool Read loaded: it can be called now]"));
    h.stop().await;
}

/// An image for a model that takes text only (`supportedInputTypes` without `IMAGE`): the
/// service would refuse the request, and every later one of the session (the image stays in
/// the history). It becomes a note; the model answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_for_a_text_only_model_becomes_a_note() {
    let h = Harness::start(Setup::default()).await;
    catalogs_fetched(&h, &["acct-1"]).await;
    let png =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let body = |model: &str| {
        json!({"model": model, "max_tokens": 256, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "text", "text": "What is in the picture?"}]}]})
    };
    let r = post(&h, "/v1/messages", &body("deepseek-3.2")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = h.emulator.stats_for(&client_id("acct-1")).last_request.unwrap();
    let current = &sent["conversationState"]["currentMessage"]["userInputMessage"];
    assert!(current.get("images").is_none_or(|i| i.as_array().is_some_and(|a| a.is_empty())), "{current}");
    assert!(current["content"].as_str().unwrap().contains("takes text only"), "{current}");
    // A model that takes images still gets it.
    assert_eq!(post(&h, "/v1/messages", &body("claude-sonnet-4-5-20250929")).await.status, 200);
    let sent = h.emulator.stats_for(&client_id("acct-1")).last_request.unwrap();
    assert_eq!(
        sent["conversationState"]["currentMessage"]["userInputMessage"]["images"].as_array().unwrap().len(),
        1
    );
    h.stop().await;
}

/// An answer whose head comes at once but whose content does not: past the longer of
/// `first_byte_timeout_secs` and `stream_idle_timeout_secs` from its start it fails over to
/// another account, and the client gets its answer from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_no_content_in_time_fails_over() {
    let h = Harness::start(Setup {
        accounts: vec!["acct-1".into(), "acct-2".into()],
        upstream: "first_byte_timeout_secs = 1\nstream_idle_timeout_secs = 2".into(),
        ..Default::default()
    })
    .await;
    let t0 = std::time::Instant::now();
    let r = post(&h, "/v1/messages", &simple("hi\n#emulator: silent 8000 once", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.sse().last().unwrap().0, "message_stop", "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(6), "waited out the silence: {:?}", t0.elapsed());
    assert_eq!(h.emulator.stats().requests, 2, "no failover");
    // Frames with nothing in them, closer together than the idle timeout, for 10 s: the same.
    let t0 = std::time::Instant::now();
    let r = post(&h, "/v1/messages", &simple("hi\n#emulator: empty-frames 500 once", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.sse().last().unwrap().0, "message_stop", "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(6), "waited out the empty frames: {:?}", t0.elapsed());
    assert_eq!(h.emulator.stats().requests, 4, "no failover");
    h.stop().await;
}
