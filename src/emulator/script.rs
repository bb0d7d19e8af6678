//! Scripted behaviours: the [`Behaviour`] an account (or one request) gets, and the `#emulator:`
//! directives a prompt can carry to choose a behaviour or shape the reply.

use std::time::Duration;

use serde_json::Value;

/// How many empty frames `empty-frames` sends before the answer.
pub const EMPTY_FRAMES: u32 = 20;

/// What the emulator does with a request that passed authentication and validation.
#[derive(Clone, Debug, PartialEq)]
pub enum Behaviour {
    /// Stream an ordinary reply.
    Normal,
    /// 403 `AccessDeniedException`, reason `TEMPORARILY_SUSPENDED`.
    Suspended,
    /// 429 `ThrottlingException` (no reason), with a `retry-after` header when `Some`.
    Throttled { retry_after_secs: Option<u64> },
    /// 429 `ThrottlingException`, reason `INSUFFICIENT_MODEL_CAPACITY` ("high traffic").
    CapacityExhausted,
    /// 429 `ThrottlingException`, reason `MONTHLY_REQUEST_COUNT`.
    MonthlyQuota,
    /// 429 `ThrottlingException`, reason `DAILY_REQUEST_COUNT`.
    DailyQuota,
    /// 500 `InternalServerException`.
    InternalError,
    /// 503 `ServiceUnavailableException`.
    Unavailable,
    /// Sleep this long before the response headers, then stream normally.
    SlowFirstByte(Duration),
    /// Sleep this long before every event frame after the first.
    SlowFragments(Duration),
    /// Close the TCP connection without answering.
    ResetBeforeFirstByte,
    /// Send the headers and a few frames, then close the TCP connection abruptly.
    ResetAfterFirstByte,
    /// Send the headers and the opening frames, then end the body: no content, none of the
    /// closing events (usage, metering): an answer cut before it began.
    EmptyAnswer,
    /// Send a couple of good frames, then one whose message CRC is wrong, then end the body.
    CorruptFrame,
    /// Send a few frames, then an exception frame of this type with `{"message": …}`, then end.
    InStreamException { exception_type: String, message: String },
    /// Start a tool call, send part of its input, end the body without `stop: true`.
    ToolCallCutBeforeStop,
    /// A reply of exactly this many characters, in small fragments.
    LongReply { chars: usize },
    /// `reasoningContentEvent` frames (text, then a signature) before the answer.
    Reasoning,
    /// Send the headers and the first frames, stay silent this long, then finish normally.
    SilentAfterFirstByte(Duration),
    /// Send the headers, then [`EMPTY_FRAMES`] `assistantResponseEvent {"content": ""}` frames
    /// this far apart (the stream is never idle, and nothing in it is content), then finish
    /// normally.
    EmptyFrames(Duration),
    /// 429 `ThrottlingException` "Due to suspicious activity, we are imposing temporary
    /// limits…", `"reason": null`: the account is being watched.
    Suspicious,
    /// 403 `AccessDeniedException` "…temporarily is suspended. We've locked your account…",
    /// without a reason.
    Locked,
    /// 403 `AccessDeniedException` "The bearer token included in the request is invalid.",
    /// whatever the token (one refreshed just now too): an account whose chat calls refuse
    /// every token its sign-in gives.
    BearerRefused,
    /// 400 `ValidationException`, reason `TOOL_USE_RESULT_MISMATCH`.
    ToolUseResultMismatch,
    /// 400 `ValidationException`, reason `TOOL_SCHEMA_INVALID`.
    ToolSchemaInvalid,
    /// 400 `ValidationException`, reason `THINKING_SIGNATURE_INVALID`.
    SignatureInvalid,
    /// 400 `ValidationException` "profileArn is required for this request." (`"reason": null`).
    ProfileRequired,
    /// 402 `ServiceQuotaExceededException`, reason `OVERAGE_REQUEST_LIMIT_EXCEEDED`.
    Overage,
    /// 429 `ThrottlingException`, reason `INSUFFICIENT_MODEL_CAPACITY`, "The model you've selected
    /// is experiencing a high volume of traffic…".
    HighTraffic,
    /// 400 `ValidationException`, reason `INVALID_MODEL_ID`.
    InvalidModel,
}

/// How the reply's content is shaped (directives that do not change the behaviour).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shape {
    /// `text <literal…>`: the reply text instead of the default one.
    pub text: Option<String>,
    /// `tool <name> <json-args>` / `tools2`.
    pub tools: Option<ToolDirective>,
    /// `thinking-tags`: `<thinking>…</thinking>` then the answer.
    pub thinking_tags: bool,
    /// `redacted-thinking`: one `reasoningContentEvent {"redactedContent"}` before the answer,
    /// instead of readable reasoning.
    pub redacted_thinking: bool,
    /// `empty-text-first`: an `assistantResponseEvent {"content": ""}` before anything else.
    pub empty_text_first: bool,
}

/// Which tool calls the reply makes.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolDirective {
    /// Call `name` with `args`; `Err` holds the args text when it is not a JSON object.
    One { name: String, args: Result<Value, String> },
    /// Call the first two defined tools with generated arguments.
    FirstTwo,
}

/// Everything the `#emulator:` lines of one prompt ask for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Directives {
    /// The last behaviour directive, overriding the account's behaviour for this request.
    pub behaviour: Option<Behaviour>,
    /// The behaviour directive ended in `once`: it applies to the first attempt only (a request
    /// whose `amz-sdk-request` says `attempt=1`, or that has none); a later attempt — the same
    /// prompt failed over by the client — gets the account's behaviour.
    pub once: bool,
    pub shape: Shape,
}

/// The marker that starts a directive line.
pub const DIRECTIVE_PREFIX: &str = "#emulator:";

/// Whether `line` is a directive line (leading blanks allowed).
pub fn is_directive_line(line: &str) -> bool {
    line.trim_start().starts_with(DIRECTIVE_PREFIX)
}

/// Parses every `#emulator:` line of `content`. Later lines win; unknown or malformed directives
/// are ignored (logged at debug).
pub fn parse_directives(content: &str) -> Directives {
    let mut out = Directives::default();
    for line in content.lines() {
        let Some(rest) = line.trim_start().strip_prefix(DIRECTIVE_PREFIX) else {
            continue;
        };
        let rest = rest.trim();
        let (word, args) = match rest.split_once(char::is_whitespace) {
            Some((word, args)) => (word, args.trim()),
            None => (rest, ""),
        };
        let word = word.to_ascii_lowercase();
        // A trailing `once` on a behaviour directive (not on the reply-shaping ones, whose
        // arguments are free text).
        let shaping = matches!(
            word.as_str(),
            "tool" | "tools2" | "text" | "thinking-tags" | "redacted-thinking" | "empty-text-first"
        );
        let (args, once) = match args.rsplit_once(char::is_whitespace) {
            _ if shaping => (args, false),
            _ if args.eq_ignore_ascii_case("once") => ("", true),
            Some((head, last)) if last.eq_ignore_ascii_case("once") => (head.trim(), true),
            _ => (args, false),
        };
        if !apply(&mut out, &word, args) {
            tracing::debug!(directive = rest, "emulator: ignoring unknown or malformed directive");
        } else if !shaping {
            out.once = once;
        }
    }
    out
}

/// Applies one directive; false when it is unknown or its arguments are malformed.
fn apply(out: &mut Directives, word: &str, args: &str) -> bool {
    let millis = || args.split_whitespace().next()?.parse::<u64>().ok().map(Duration::from_millis);
    let behaviour = match word {
        "normal" => Behaviour::Normal,
        "suspended" => Behaviour::Suspended,
        "throttled" => {
            let retry_after_secs = match args.split_whitespace().next() {
                None => None,
                Some(secs) => match secs.parse() {
                    Ok(secs) => Some(secs),
                    Err(_) => return false,
                },
            };
            Behaviour::Throttled { retry_after_secs }
        }
        "quota-monthly" => Behaviour::MonthlyQuota,
        "quota-daily" => Behaviour::DailyQuota,
        "capacity" => Behaviour::CapacityExhausted,
        "error-500" => Behaviour::InternalError,
        "error-503" => Behaviour::Unavailable,
        "slow-first-byte" => match millis() {
            Some(d) => Behaviour::SlowFirstByte(d),
            None => return false,
        },
        "slow-fragments" => match millis() {
            Some(d) => Behaviour::SlowFragments(d),
            None => return false,
        },
        "silent" => match millis() {
            Some(d) => Behaviour::SilentAfterFirstByte(d),
            None => return false,
        },
        "empty-frames" => match millis() {
            Some(d) => Behaviour::EmptyFrames(d),
            None => return false,
        },
        "reset-before" => Behaviour::ResetBeforeFirstByte,
        "reset-after" => Behaviour::ResetAfterFirstByte,
        "empty-answer" => Behaviour::EmptyAnswer,
        "corrupt-frame" => Behaviour::CorruptFrame,
        "exception" => {
            let (exception_type, message) = match args.split_once(char::is_whitespace) {
                Some((t, m)) => (t, m.trim()),
                None => (args, ""),
            };
            if exception_type.is_empty() {
                return false;
            }
            let message = if message.is_empty() {
                "Encountered an unexpected error when processing the request, please try again."
            } else {
                message
            };
            Behaviour::InStreamException {
                exception_type: exception_type.to_owned(),
                message: message.to_owned(),
            }
        }
        "tool-cut" => Behaviour::ToolCallCutBeforeStop,
        "long" => match args.split_whitespace().next().and_then(|n| n.parse().ok()) {
            Some(chars) => Behaviour::LongReply { chars },
            None => return false,
        },
        "reasoning" => Behaviour::Reasoning,
        "suspicious" => Behaviour::Suspicious,
        "locked" => Behaviour::Locked,
        "bearer-refused" => Behaviour::BearerRefused,
        "tool-mismatch" => Behaviour::ToolUseResultMismatch,
        "tool-schema-invalid" => Behaviour::ToolSchemaInvalid,
        "signature-invalid" => Behaviour::SignatureInvalid,
        "profile-required" => Behaviour::ProfileRequired,
        "overage" => Behaviour::Overage,
        "high-traffic" => Behaviour::HighTraffic,
        "invalid-model" => Behaviour::InvalidModel,
        "tool" => {
            let (name, json) = match args.split_once(char::is_whitespace) {
                Some((name, json)) => (name, json.trim()),
                None => (args, ""),
            };
            if name.is_empty() {
                return false;
            }
            let args = if json.is_empty() {
                Ok(Value::Object(Default::default()))
            } else {
                match serde_json::from_str::<Value>(json) {
                    Ok(v @ Value::Object(_)) => Ok(v),
                    _ => Err(json.to_owned()),
                }
            };
            out.shape.tools = Some(ToolDirective::One { name: name.to_owned(), args });
            return true;
        }
        "tools2" => {
            out.shape.tools = Some(ToolDirective::FirstTwo);
            return true;
        }
        "text" => {
            out.shape.text = Some(args.to_owned());
            return true;
        }
        "thinking-tags" => {
            out.shape.thinking_tags = true;
            return true;
        }
        "redacted-thinking" => {
            out.shape.redacted_thinking = true;
            return true;
        }
        "empty-text-first" => {
            out.shape.empty_text_first = true;
            return true;
        }
        _ => return false,
    };
    out.behaviour = Some(behaviour);
    true
}

/// `content` without its directive lines.
pub fn strip_directives(content: &str) -> String {
    let kept: Vec<&str> = content.lines().filter(|l| !is_directive_line(l)).collect();
    kept.join("\n").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn behaviour(line: &str) -> Option<Behaviour> {
        parse_directives(line).behaviour
    }

    #[test]
    fn behaviour_directives() {
        let ms = Duration::from_millis;
        let cases = [
            ("#emulator: suspended", Behaviour::Suspended),
            ("#emulator: throttled", Behaviour::Throttled { retry_after_secs: None }),
            ("#emulator: throttled 7", Behaviour::Throttled { retry_after_secs: Some(7) }),
            ("#emulator: quota-monthly", Behaviour::MonthlyQuota),
            ("#emulator: quota-daily", Behaviour::DailyQuota),
            ("#emulator: capacity", Behaviour::CapacityExhausted),
            ("#emulator: error-500", Behaviour::InternalError),
            ("#emulator: error-503", Behaviour::Unavailable),
            ("#emulator: slow-first-byte 250", Behaviour::SlowFirstByte(ms(250))),
            ("#emulator: slow-fragments 20", Behaviour::SlowFragments(ms(20))),
            ("#emulator: reset-before", Behaviour::ResetBeforeFirstByte),
            ("#emulator: reset-after", Behaviour::ResetAfterFirstByte),
            ("#emulator: corrupt-frame", Behaviour::CorruptFrame),
            ("#emulator: tool-cut", Behaviour::ToolCallCutBeforeStop),
            ("#emulator: long 5000", Behaviour::LongReply { chars: 5000 }),
            ("#emulator: reasoning", Behaviour::Reasoning),
            ("#emulator: silent 1500", Behaviour::SilentAfterFirstByte(ms(1500))),
            ("#emulator: empty-frames 500", Behaviour::EmptyFrames(ms(500))),
            ("#emulator: suspicious", Behaviour::Suspicious),
            ("#emulator: locked", Behaviour::Locked),
            ("#emulator: bearer-refused", Behaviour::BearerRefused),
            ("#emulator: tool-mismatch", Behaviour::ToolUseResultMismatch),
            ("#emulator: tool-schema-invalid", Behaviour::ToolSchemaInvalid),
            ("#emulator: signature-invalid", Behaviour::SignatureInvalid),
            ("#emulator: profile-required", Behaviour::ProfileRequired),
            ("#emulator: overage", Behaviour::Overage),
            ("#emulator: High-Traffic", Behaviour::HighTraffic),
            ("#emulator: invalid-model", Behaviour::InvalidModel),
            (
                "#emulator: exception error MODEL_TEMPORARILY_UNAVAILABLE",
                Behaviour::InStreamException {
                    exception_type: "error".into(),
                    message: "MODEL_TEMPORARILY_UNAVAILABLE".into(),
                },
            ),
            (
                "  #emulator:   EXCEPTION ContentLengthExceededException  Output  too long ",
                Behaviour::InStreamException {
                    exception_type: "ContentLengthExceededException".into(),
                    message: "Output  too long".into(),
                },
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(behaviour(line), Some(expected), "{line:?}");
        }
    }

    #[test]
    fn once_marks_a_behaviour_for_the_first_attempt() {
        let d = parse_directives("#emulator: suspended once");
        assert_eq!((d.behaviour, d.once), (Some(Behaviour::Suspended), true));
        let d = parse_directives("#emulator: throttled 5 ONCE");
        assert_eq!((d.behaviour, d.once), (Some(Behaviour::Throttled { retry_after_secs: Some(5) }), true));
        let d = parse_directives("#emulator: suspended once\n#emulator: error-500");
        assert_eq!((d.behaviour, d.once), (Some(Behaviour::InternalError), false));
        let d = parse_directives("#emulator: text said once");
        assert_eq!((d.shape.text.as_deref(), d.once), (Some("said once"), false));
        assert!(!parse_directives("#emulator: suspended").once);
    }

    #[test]
    fn malformed_and_unknown_directives_are_ignored() {
        for line in [
            "#emulator: slow-fragments",
            "#emulator: slow-fragments soon",
            "#emulator: long -3",
            "#emulator: throttled x",
            "#emulator: exception",
            "#emulator: teleport",
            "#emulator:",
            "emulator: suspended",
            "say #emulator: suspended",
        ] {
            assert_eq!(parse_directives(line), Directives::default(), "{line:?}");
        }
    }

    #[test]
    fn shaping_directives_combine_and_later_lines_win() {
        let d = parse_directives(
            "Hi\n#emulator: suspended\n#emulator: text Hello  there\n#emulator: slow-fragments 5\n\
             #emulator: tool get_weather {\"city\": \"Paris\"}\n#emulator: thinking-tags\n#emulator: redacted-thinking",
        );
        assert!(d.shape.redacted_thinking);
        assert_eq!(d.behaviour, Some(Behaviour::SlowFragments(Duration::from_millis(5))));
        assert_eq!(d.shape.text.as_deref(), Some("Hello  there"));
        assert!(d.shape.thinking_tags);
        assert_eq!(
            d.shape.tools,
            Some(ToolDirective::One { name: "get_weather".into(), args: Ok(json!({"city": "Paris"})) })
        );
    }

    #[test]
    fn tool_directive_arguments() {
        let d = parse_directives("#emulator: tool get_time");
        assert_eq!(d.shape.tools, Some(ToolDirective::One { name: "get_time".into(), args: Ok(json!({})) }));
        let d = parse_directives("#emulator: tool get_time [1, 2]");
        assert_eq!(
            d.shape.tools,
            Some(ToolDirective::One { name: "get_time".into(), args: Err("[1, 2]".into()) })
        );
        assert_eq!(parse_directives("#emulator: tools2").shape.tools, Some(ToolDirective::FirstTwo));
    }

    #[test]
    fn strip_directives_keeps_the_prose() {
        assert_eq!(strip_directives("Hello\n  #emulator: reasoning\nworld\n"), "Hello\nworld");
    }
}
