//! Reasoning end to end against the emulator, whose signatures are HMACs of its own (only what it
//! made, unchanged, verifies on replay).
//!
//! Through the daemon (real HTTP, no catalog yet: prompt-tag path): the emulator's
//! `reasoningContentEvent`s reach the client as a `thinking` block carrying the emulator's
//! signature, or as a `redacted_thinking` block, streamed and not.
//!
//! Native reasoning (a model with a schema): the catalog does not reach the daemon's handler yet,
//! so the request is translated with the catalog's [`ModelCaps`] directly and sent with the
//! daemon's own upstream client over real HTTP; the answer runs through the daemon's response
//! state machine. The model's reasoning comes back signed, its replay is accepted, and a changed
//! signature is refused as the client's 400 `invalid_request_error` after one call.

use crate::common;

use amq2api::anthropic::grammar;
use amq2api::anthropic::request::{ApiVersion, Endpoint, parse_value};
use amq2api::anthropic::sse::StreamEvent;
use amq2api::anthropic::{ApiError, ErrorKind};
use amq2api::config::Secret;
use amq2api::emulator::{Emulator, default_catalog};
use amq2api::translate::{Aggregator, Context, ModelCaps, ModelMap, ResponseState, translate};
use amq2api::upstream::{Agent, Caller, Event, UpstreamClient, UpstreamFailure};
use bytes::Bytes;
use common::*;
use serde_json::{Value, json};

/// The grammar of the frames, and what they carried.
fn checked(frames: &[(String, Value)]) -> grammar::Summary {
    grammar::check_frames(frames.iter().map(|(n, d)| (n.as_str(), d)))
        .unwrap_or_else(|e| panic!("{e}: {frames:?}"))
}

#[tokio::test]
async fn the_emulators_reasoning_reaches_the_client_signed() {
    let h = Harness::start(Setup::default()).await;
    let ask = |stream: bool| simple("Why is the sky blue?\n#emulator: reasoning", stream);

    let frames = post(&h, "/v1/messages", &ask(true)).await.sse();
    let summary = checked(&frames);
    let [(thinking, signature)] = summary.thinking.as_slice() else {
        panic!("one thinking block: {frames:?}");
    };
    assert!(!thinking.is_empty());
    assert!(h.emulator.verify_reasoning(thinking, signature), "the emulator's signature, unchanged");
    let start = frames.iter().find(|(e, _)| e == "content_block_start").unwrap();
    assert_eq!(start.1["content_block"], json!({"type": "thinking", "thinking": "", "signature": ""}));
    assert!(summary.text.starts_with("Hello from the Amazon Q emulator."), "{}", summary.text);

    let m = post(&h, "/v1/messages", &ask(false)).await.json();
    assert_eq!(m["content"][0]["type"], "thinking", "{m}");
    let (text, sig) =
        (m["content"][0]["thinking"].as_str().unwrap(), m["content"][0]["signature"].as_str().unwrap());
    assert!(h.emulator.verify_reasoning(text, sig));
    assert_eq!(m["content"][1]["type"], "text");

    // Without a catalog the thinking block is the prompt-tag path's: before the current tool
    // loop (a new user question follows it), it is left out, as Anthropic leaves it out.
    let follow = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": m["content"].clone()},
        {"role": "user", "content": "And at sunset?"}]});
    let r = post(&h, "/v1/messages", &follow).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = h.emulator.stats_for(&client_id("acct-1")).last_request.unwrap();
    let replayed = &sent["conversationState"]["history"][1]["assistantResponseMessage"];
    assert!(replayed.get("reasoningContent").is_none(), "{replayed}");
    let content = replayed["content"].as_str().unwrap();
    assert!(!content.contains(text) && !content.contains("<thinking>"), "{content}");
    assert!(content.contains(m["content"][1]["text"].as_str().unwrap()), "{content}");
    h.stop().await;
}

#[tokio::test]
async fn redacted_reasoning_reaches_the_client_as_redacted_thinking() {
    let h = Harness::start(Setup::default()).await;
    let ask = |stream: bool| simple("Secret plans?\n#emulator: redacted-thinking", stream);
    let frames = post(&h, "/v1/messages", &ask(true)).await.sse();
    let summary = checked(&frames);
    assert!(summary.thinking.is_empty());
    let [data] = summary.redacted.as_slice() else {
        panic!("one redacted_thinking block: {frames:?}");
    };
    assert!(!data.is_empty());
    let m = post(&h, "/v1/messages", &ask(false)).await.json();
    assert_eq!(m["content"][0]["type"], "redacted_thinking", "{m}");
    assert!(!m["content"][0]["data"].as_str().unwrap().is_empty());
    assert_eq!(m["content"][1]["type"], "text");
    h.stop().await;
}

// ---- native reasoning ----

/// The emulator's catalog entry for `q_model`, as translation sees it.
fn caps_of(q_model: &str) -> ModelCaps {
    let m = default_catalog().into_iter().find(|m| m.model_id == q_model).expect("in the catalog");
    ModelCaps {
        max_input_tokens: Some(m.max_input_tokens),
        max_output_tokens: Some(m.max_output_tokens),
        request_fields_schema: m.request_fields_schema.clone(),
        max_cache_checkpoints: m.prompt_caching.max_checkpoints,
        text_only: !m.takes_images(),
    }
}

/// One emulator account called with the daemon's upstream client.
struct Direct<'a> {
    emulator: &'a Emulator,
    client: UpstreamClient,
    token: Secret,
    agent: Agent,
    models: ModelMap,
    caps: ModelCaps,
}

const DIRECT: &str = "direct-client";

impl<'a> Direct<'a> {
    async fn new(h: &'a Harness) -> Direct<'a> {
        h.emulator.add_account(DIRECT, "direct-secret", "direct-refresh");
        let client = UpstreamClient::new(&load(&h.config_path).config.upstream).unwrap();
        let agent = Agent::new(Agent::new_machine_id());
        let grant = client
            .create_token(
                &h.emulator.token_endpoint().parse().unwrap(),
                &Secret::new(DIRECT),
                &Secret::new("direct-secret"),
                &Secret::new("direct-refresh"),
                &agent,
                None,
            )
            .await
            .unwrap();
        let models = ModelMap::new(&[("claude-opus-4-6".into(), "claude-opus-4.6".into())]);
        Direct {
            emulator: &h.emulator,
            client,
            token: grant.access_token,
            agent,
            models,
            caps: caps_of("claude-opus-4.6"),
        }
    }

    /// Translates the Claude `body` for claude-opus-4.6 as the catalog describes it, sends it, and
    /// runs the answer through the response state machine: the upstream events and the message,
    /// or the client's error.
    async fn call(&self, body: &Value) -> Result<(Vec<Event>, Vec<StreamEvent>, Value), ApiError> {
        let req = parse_value(body, ApiVersion::V2023_06_01, Endpoint::Messages)?;
        let t = translate(
            &req,
            &Context { models: &self.models, session_id: None, caps: Some(&self.caps), catalog: None },
        )?;
        let caller = Caller { bearer: &self.token, api_key: false, agent: &self.agent, proxy: None };
        let endpoint = self.emulator.endpoint().parse().unwrap();
        let mut upstream = self
            .client
            .generate(&endpoint, &caller, Bytes::from(t.request.to_body(None)), 1)
            .await
            .map_err(|f: UpstreamFailure| amq2api::relay::failure_to_api(&f))?;
        let mut st = ResponseState::new(t.response.clone());
        let (mut received, mut out) = (Vec::new(), st.start());
        while !st.is_finished() {
            match upstream.next().await {
                Some(Ok(ev)) => {
                    received.push(ev.clone());
                    out.extend(st.on_event(ev));
                }
                Some(Err(e)) => out.extend(st.on_error(&e)),
                None => out.extend(st.on_end()),
            }
        }
        let mut agg = Aggregator::default();
        for e in &out {
            agg.push(e);
        }
        let message = agg.finish()?;
        Ok((received, out, message))
    }

    fn requests(&self) -> u64 {
        self.emulator.stats_for(DIRECT).requests
    }
}

fn opus(messages: Value) -> Value {
    json!({"model": "claude-opus-4-6", "max_tokens": 4096, "thinking": {"type": "adaptive"},
        "output_config": {"effort": "high"}, "messages": messages})
}

#[tokio::test]
async fn native_reasoning_comes_back_signed_and_replays_only_unchanged() {
    let h = Harness::start(Setup::default()).await;
    let d = Direct::new(&h).await;
    let question = json!({"role": "user", "content": "Why is the sky blue?"});
    let (received, events, m) = d.call(&opus(json!([question.clone()]))).await.unwrap();
    let sent = d.emulator.stats_for(DIRECT).last_request.unwrap();
    assert_eq!(
        sent["additionalModelRequestFields"],
        json!({"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}, "max_tokens": 4096})
    );
    assert!(!sent.to_string().contains("<thinking_mode>"), "no prompt tags: {sent}");
    // The signature came in pieces; the client gets them joined, in one signature_delta.
    let pieces = received.iter().filter(|e| matches!(e, Event::Reasoning { signature: Some(_), .. })).count();
    assert!(pieces > 1, "the emulator splits native signatures: {received:?}");
    let summary = grammar::check_events(&events).unwrap();
    let [(thinking, signature)] = summary.thinking.as_slice() else {
        panic!("one thinking block: {events:?}");
    };
    assert!(d.emulator.verify_reasoning(thinking, signature));
    assert_eq!(m["content"][0], json!({"type": "thinking", "thinking": thinking, "signature": signature}));
    assert_eq!(m["content"][1]["type"], "text");

    // The answer replayed as history is accepted: the emulator checks the signature.
    let follow = |assistant: Value| {
        opus(json!([question.clone(), {"role": "assistant", "content": assistant},
            {"role": "user", "content": "And at sunset?"}]))
    };
    let before = d.requests();
    let (_, _, again) = d.call(&follow(m["content"].clone())).await.unwrap();
    assert_eq!(again["content"][0]["type"], "thinking", "{again}");
    let sent = d.emulator.stats_for(DIRECT).last_request.unwrap();
    assert_eq!(
        sent["conversationState"]["history"][1]["assistantResponseMessage"]["reasoningContent"],
        json!({"reasoningText": {"text": thinking, "signature": signature}})
    );

    // A changed signature, or changed text under it: the client's 400, after one call.
    let mut tampered = signature.clone();
    let first = if tampered.starts_with('A') { "B" } else { "A" };
    tampered.replace_range(..1, first);
    let mut changed_text = m["content"].clone();
    changed_text[0]["thinking"] = json!(format!("{thinking} (edited)"));
    let mut changed_signature = m["content"].clone();
    changed_signature[0]["signature"] = json!(tampered);
    for assistant in [changed_signature, changed_text] {
        let before_bad = d.requests();
        let e = d.call(&follow(assistant)).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e:?}");
        assert!(e.message.contains("THINKING_SIGNATURE_INVALID"), "{}", e.message);
        assert_eq!(d.requests(), before_bad + 1);
    }
    assert_eq!(d.requests(), before + 3);
    h.stop().await;
}

#[tokio::test]
async fn native_redacted_reasoning_replays_unchanged_only() {
    let h = Harness::start(Setup::default()).await;
    let d = Direct::new(&h).await;
    let question = json!({"role": "user", "content": "Secret plans?\n#emulator: redacted-thinking"});
    let (_, events, m) = d.call(&opus(json!([question.clone()]))).await.unwrap();
    let summary = grammar::check_events(&events).unwrap();
    let [data] = summary.redacted.as_slice() else {
        panic!("one redacted_thinking block: {events:?}");
    };
    assert_eq!(m["content"][0], json!({"type": "redacted_thinking", "data": data}));
    let follow = |assistant: Value| {
        opus(
            json!([{"role": "user", "content": "Secret plans?"}, {"role": "assistant", "content": assistant},
            {"role": "user", "content": "Go on."}]),
        )
    };
    d.call(&follow(m["content"].clone())).await.unwrap();
    let sent = d.emulator.stats_for(DIRECT).last_request.unwrap();
    assert_eq!(
        sent["conversationState"]["history"][1]["assistantResponseMessage"]["reasoningContent"],
        json!({"redactedContent": data})
    );
    // Another emulator's redacted content (a different secret) is refused.
    let other = Emulator::start(Default::default()).await.unwrap();
    let mut foreign = m["content"].clone();
    foreign[0]["data"] = json!(other.redacted_reasoning());
    let e = d.call(&follow(foreign)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e:?}");
    assert!(e.message.contains("THINKING_SIGNATURE_INVALID"), "{}", e.message);
    h.stop().await;
}

/// A value the model does not take never reaches the service.
#[tokio::test]
async fn a_value_the_model_does_not_take_is_refused_before_any_call() {
    let h = Harness::start(Setup::default()).await;
    let d = Direct::new(&h).await;
    let mut body = opus(json!([{"role": "user", "content": "Hi"}]));
    body["output_config"]["effort"] = json!("xhigh");
    let e = d.call(&body).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
    assert_eq!(
        e.message,
        r#"output_config.effort: "xhigh" is not supported by claude-opus-4.6 (supported: low, medium, high, max)"#
    );
    assert_eq!(d.requests(), 0);
    h.stop().await;
}
