//! The fault matrix, end to end through the daemon with the emulator, streaming and not: for
//! each upstream fault, what the client sees, what the account's state becomes, and that the
//! daemon serves the next request. README's "Failure behaviour" table is this file in prose.

use crate::common;

use amq2api::emulator::Behaviour;
use common::*;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    /// The request succeeded (failover or retry hid the fault).
    Ok,
    /// An error before the first byte: status and error type.
    Error(u16, &'static str),
    /// Streaming: a 200 whose stream ends with `event: error` of this type. Non-streaming: the
    /// answer, from another account (nothing had been sent: it fails over).
    MidStream(&'static str),
}

struct Fault {
    name: &'static str,
    /// Applied to acct-1, which serves the first request (round-robin from a fresh start).
    setup: fn(&Harness),
    seen: Seen,
    /// acct-1's state afterwards.
    state: &'static str,
}

fn set(h: &Harness, b: Behaviour) {
    h.emulator.set_behaviour_for_next(&client_id("acct-1"), b, 1);
}

fn faults() -> Vec<Fault> {
    vec![
        Fault {
            name: "suspended",
            setup: |h| set(h, Behaviour::Suspended),
            seen: Seen::Ok,
            state: "suspended",
        },
        Fault {
            name: "throttled",
            setup: |h| set(h, Behaviour::Throttled { retry_after_secs: Some(30) }),
            seen: Seen::Ok,
            state: "cooling",
        },
        Fault {
            name: "monthly quota",
            setup: |h| set(h, Behaviour::MonthlyQuota),
            seen: Seen::Ok,
            state: "quota",
        },
        Fault {
            name: "bearer token invalid",
            setup: |h| h.emulator.expire_access_tokens(&client_id("acct-1")),
            seen: Seen::Ok,
            state: "active",
        },
        Fault {
            name: "refresh token dead",
            setup: |h| {
                h.emulator.revoke_refresh_token(&client_id("acct-1"));
                h.emulator.expire_access_tokens(&client_id("acct-1"));
            },
            seen: Seen::Ok,
            state: "invalid",
        },
        Fault {
            name: "transient 500",
            setup: |h| set(h, Behaviour::InternalError),
            seen: Seen::Ok,
            state: "active",
        },
        Fault {
            name: "transient 503",
            setup: |h| set(h, Behaviour::Unavailable),
            seen: Seen::Ok,
            state: "active",
        },
        Fault {
            name: "connection reset before the first byte",
            setup: |h| set(h, Behaviour::ResetBeforeFirstByte),
            seen: Seen::Ok,
            state: "active",
        },
        Fault {
            name: "upstream silent past the first-byte timeout",
            setup: |h| set(h, Behaviour::SlowFirstByte(Duration::from_secs(3))),
            seen: Seen::Ok,
            state: "active",
        },
        Fault {
            name: "upstream silent after its headers",
            setup: |h| set(h, Behaviour::SilentAfterFirstByte(Duration::from_secs(3))),
            seen: Seen::Ok,
            state: "active",
        },
        Fault {
            name: "connection reset after the first byte",
            setup: |h| set(h, Behaviour::ResetAfterFirstByte),
            seen: Seen::MidStream("api_error"),
            state: "active",
        },
        Fault {
            name: "corrupt frame",
            setup: |h| set(h, Behaviour::CorruptFrame),
            seen: Seen::MidStream("api_error"),
            state: "active",
        },
        Fault {
            name: "in-stream exception (model unavailable)",
            setup: |h| {
                set(
                    h,
                    Behaviour::InStreamException {
                        exception_type: "error".into(),
                        message: "MODEL_TEMPORARILY_UNAVAILABLE".into(),
                    },
                )
            },
            seen: Seen::MidStream("overloaded_error"),
            state: "active",
        },
        Fault {
            // Left out, the message ending with max_tokens (see translate::response).
            name: "tool call cut before stop",
            setup: |h| set(h, Behaviour::ToolCallCutBeforeStop),
            seen: Seen::Ok,
            state: "active",
        },
        Fault {
            name: "every account suspended",
            setup: |h| {
                h.emulator.set_behaviour(&client_id("acct-1"), Behaviour::Suspended);
                h.emulator.set_behaviour(&client_id("acct-2"), Behaviour::Suspended);
            },
            seen: Seen::Error(529, "overloaded_error"),
            state: "suspended",
        },
        Fault {
            name: "every account throttled",
            setup: |h| {
                h.emulator
                    .set_behaviour(&client_id("acct-1"), Behaviour::Throttled { retry_after_secs: Some(9) });
                h.emulator
                    .set_behaviour(&client_id("acct-2"), Behaviour::Throttled { retry_after_secs: Some(9) });
            },
            seen: Seen::Error(429, "rate_limit_error"),
            state: "cooling",
        },
    ]
}

fn tools_request(text: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "claude-sonnet-4-5", "max_tokens": 1024, "stream": stream,
        "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "messages": [{"role": "user", "content": text}],
    })
}

async fn account_state(h: &Harness, id: &str) -> String {
    let sock = h.dir.path().join("control.sock");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
            .arg("--socket")
            .arg(sock)
            .args(["--json", "accounts"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    v.as_array().unwrap().iter().find(|a| a["id"] == id).unwrap()["state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix() {
    let mut rows = Vec::new();
    for f in faults() {
        for stream in [false, true] {
            let setup = Setup {
                accounts: vec!["acct-1".into(), "acct-2".into()],
                accounts_settings: "strategy = \"round-robin\"".into(),
                upstream: "first_byte_timeout_secs = 1\nstream_idle_timeout_secs = 1".into(),
                ..Default::default()
            };
            let h = Harness::start(setup).await;
            (f.setup)(&h);
            let text = if f.name.contains("tool call") {
                "w\n#emulator: tool get_weather {\"city\": \"Oslo\"}"
            } else {
                "hello"
            };
            let r = post(&h, "/v1/messages", &tools_request(text, stream)).await;
            let what = format!("{} ({})", f.name, if stream { "stream" } else { "non-stream" });
            match f.seen {
                Seen::Ok => {
                    assert_eq!(r.status, 200, "{what}: {}", r.text());
                    if stream {
                        assert_eq!(r.sse().last().unwrap().0, "message_stop", "{what}");
                    }
                }
                Seen::Error(status, kind) => {
                    assert_eq!(r.status, status, "{what}: {}", r.text());
                    assert_eq!(r.json()["error"]["type"], kind, "{what}");
                }
                Seen::MidStream(kind) => {
                    if stream {
                        assert_eq!(r.status, 200, "{what}");
                        let frames = r.sse();
                        let last = frames.last().unwrap();
                        assert_eq!(
                            (last.0.as_str(), last.1["error"]["type"].as_str().unwrap()),
                            ("error", kind),
                            "{what}"
                        );
                        assert!(!frames.iter().any(|(e, _)| e == "message_stop"), "{what}");
                    } else {
                        assert_eq!(r.status, 200, "{what}: {}", r.text());
                        assert_eq!(r.json()["stop_reason"], "end_turn", "{what}");
                    }
                }
            }
            let state = account_state(&h, "acct-1").await;
            assert_eq!(state, f.state, "{what}: acct-1 state");
            // Still serving: put the accounts right and ask again.
            for id in ["acct-1", "acct-2"] {
                h.emulator.set_behaviour(&client_id(id), Behaviour::Normal);
                h.emulator.add_account(&client_id(id), &format!("secret-{id}"), &format!("refresh-{id}"));
            }
            let sock = h.dir.path().join("control.sock");
            tokio::task::spawn_blocking(move || {
                for id in ["acct-1", "acct-2"] {
                    let _ = std::process::Command::new(env!("CARGO_BIN_EXE_amqctl"))
                        .arg("--socket")
                        .arg(&sock)
                        .args(["enable", id])
                        .output();
                }
            })
            .await
            .unwrap();
            let next = post(&h, "/v1/messages", &simple("next", stream)).await;
            assert_eq!(next.status, 200, "{what}: the next request: {}", next.text());
            rows.push(format!("{what}: {:?}, acct-1 {state}", f.seen));
            h.stop().await;
        }
    }
    eprintln!("{}", rows.join("\n"));
}

/// `#emulator: suspended once` fails the first attempt only: the request fails over and is
/// served (200), the account that took the first attempt is suspended, the other one served;
/// without `once` the directive fails every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_directive_fails_the_first_attempt_and_failover_serves() {
    for stream in [false, true] {
        let setup = Setup { accounts: vec!["acct-1".into(), "acct-2".into()], ..Default::default() };
        let h = Harness::start(setup).await;
        let r = post(&h, "/v1/messages", &simple("hello\n#emulator: suspended once", stream)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = if stream { sse_text(&r.sse()) } else { message_text(&r.json()) };
        assert!(text.contains("Hello from the Amazon Q emulator"), "{text}");
        let states = [account_state(&h, "acct-1").await, account_state(&h, "acct-2").await];
        let mut sorted = states.clone();
        sorted.sort();
        assert_eq!(sorted, ["active", "suspended"], "one account took the failed first attempt: {states:?}");
        // Without `once`, the failover meets the same failure.
        let r = post(&h, "/v1/messages", &simple("hello\n#emulator: suspended", stream)).await;
        assert_ne!(r.status, 200, "{}", r.text());
        h.stop().await;
    }
}
