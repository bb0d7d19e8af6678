//! Arbitrary bytes as a Messages API request body: parse, translate to Amazon Q, count tokens.
//! Whatever the daemon accepts and translates must be a request Amazon Q accepts, as the
//! emulator's rule checker (`emulator::validate_request`) judges it: a violation would reach the
//! service as "Improperly formed request", so it panics here.
//!
//! Input layout: byte 0 chooses the `anthropic-version` (bit 0) and the endpoint (bit 1:
//! count_tokens); the rest is the body. Seeds are real bodies with one control byte in front
//! (the README's seeding command adds it).
#![no_main]

use amq2api::anthropic::request::{self, ApiVersion, Endpoint};
use amq2api::emulator::validate_request;
use amq2api::translate::{self, Context, ModelMap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let version = if ctl & 1 == 0 { ApiVersion::V2023_06_01 } else { ApiVersion::V2026_10_21 };
    let endpoint = if ctl & 2 == 0 { Endpoint::Messages } else { Endpoint::CountTokens };
    let Ok(req) = request::parse(body, version, endpoint) else {
        return;
    };
    let _ = translate::tokens::count_request(&req);
    let models = ModelMap::default();
    let ctx = Context { models: &models, session_id: None, caps: None, catalog: None };
    let Ok(t) = translate::translate(&req, &ctx) else {
        return;
    };
    // count_tokens bodies are only counted by the daemon, never sent: translating them must not
    // panic, but the Amazon Q rules apply to /v1/messages bodies only.
    if endpoint == Endpoint::CountTokens {
        return;
    }
    let json = translate::request::to_json(&t, None);
    if let Err(v) = validate_request(&json) {
        panic!(
            "translated request breaks an Amazon Q rule: {v}\nrequest: {req:#?}\ntranslated: {}",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
    }
});
