//! Amazon Q `GenerateAssistantResponse` request body, typed and serialised exactly as the
//! service expects it (PROTOCOL.md §2, and §5 for native reasoning).

use serde::Serialize;
use serde_json::{Map, Value};

/// The whole request body: `{"conversationState": …, "profileArn"?: …,
/// "additionalModelRequestFields"?: …}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GenerateRequest {
    pub conversation_state: ConversationState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_arn: Option<String>,
    /// Native reasoning for a model that takes it (`thinking`, `output_config`, `max_tokens`),
    /// already checked against the model's `additionalModelRequestFieldsSchema`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_model_request_fields: Option<Map<String, Value>>,
}

impl GenerateRequest {
    /// The JSON body with `profile_arn` in place of the request's own (without copying the
    /// conversation: with failover the same request goes out with each account's profile).
    pub fn to_body(&self, profile_arn: Option<&str>) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            conversation_state: &'a ConversationState,
            #[serde(skip_serializing_if = "Option::is_none")]
            profile_arn: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            additional_model_request_fields: Option<&'a Map<String, Value>>,
        }
        serde_json::to_vec(&Body {
            conversation_state: &self.conversation_state,
            profile_arn,
            additional_model_request_fields: self.additional_model_request_fields.as_ref(),
        })
        .expect("request types always serialise")
    }

    /// Whether any history turn replays reasoning (`reasoningContent`).
    pub fn replays_reasoning(&self) -> bool {
        self.conversation_state.history.iter().any(
            |m| matches!(m, HistoryMessage::AssistantResponseMessage(a) if a.reasoning_content.is_some()),
        )
    }

    /// The same request with no reasoning replayed in its history: what goes again when the
    /// service refuses a replayed signature (a thinking block another model or service signed).
    pub fn without_replayed_reasoning(&self) -> GenerateRequest {
        let mut out = self.clone();
        for m in &mut out.conversation_state.history {
            if let HistoryMessage::AssistantResponseMessage(a) = m {
                a.reasoning_content = None;
            }
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConversationState {
    pub conversation_id: String,
    pub chat_trigger_type: ChatTriggerType,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryMessage>,
    pub current_message: CurrentMessage,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChatTriggerType {
    Manual,
}

/// One turn of the history: exactly one of the two message kinds.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum HistoryMessage {
    UserInputMessage(UserInputMessage),
    AssistantResponseMessage(AssistantResponseMessage),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CurrentMessage {
    pub user_input_message: UserInputMessage,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UserInputMessage {
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_input_message_context: Option<UserInputMessageContext>,
    /// A prompt-cache checkpoint after this message (models with prompt caching).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_point: Option<CachePoint>,
}

/// `{"type": "default"}`: the conversation up to here may be cached.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CachePoint {
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl CachePoint {
    pub const DEFAULT: CachePoint = CachePoint { kind: "default" };
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UserInputMessageContext {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env_state: Option<EnvState>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_results: Vec<ToolResult>,
}

impl UserInputMessageContext {
    pub fn is_empty(&self) -> bool {
        self.env_state.is_none() && self.tools.is_empty() && self.tool_results.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvState {
    pub operating_system: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_working_directory: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tool {
    pub tool_specification: ToolSpecification,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpecification {
    pub name: String,
    pub description: String,
    pub input_schema: InputSchema,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InputSchema {
    pub json: Value,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolResult {
    pub tool_use_id: String,
    pub content: Vec<ToolResultContent>,
    pub status: ToolResultStatus,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum ToolResultContent {
    Text(String),
    Json(Value),
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ToolResultStatus {
    Success,
    Error,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AssistantResponseMessage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_uses: Vec<ToolUse>,
    /// The reasoning that preceded this answer, replayed exactly as the model produced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<ReasoningContent>,
    /// A prompt-cache checkpoint after this message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_point: Option<CachePoint>,
}

/// `reasoningContent`: a union, exactly one of readable reasoning with its signature or
/// redacted (encrypted, base64) reasoning.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum ReasoningContent {
    /// `{"reasoningText": {"text", "signature"}}`.
    ReasoningText { text: String, signature: String },
    /// `{"redactedContent": "<base64>"}`.
    RedactedContent(String),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolUse {
    pub tool_use_id: String,
    pub name: String,
    pub input: Value,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Image {
    /// `png`, `jpeg`, `gif` or `webp`.
    pub format: String,
    pub source: ImageSource,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageSource {
    /// Base64 of the image bytes.
    pub bytes: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serialises_like_the_service_expects() {
        let req = GenerateRequest {
            conversation_state: ConversationState {
                conversation_id: "c-1".into(),
                chat_trigger_type: ChatTriggerType::Manual,
                history: vec![
                    HistoryMessage::UserInputMessage(UserInputMessage {
                        content: "hi".into(),
                        model_id: Some("claude-sonnet-4.5".into()),
                        origin: Some("AI_EDITOR".into()),
                        ..Default::default()
                    }),
                    HistoryMessage::AssistantResponseMessage(AssistantResponseMessage {
                        message_id: None,
                        content: "calling".into(),
                        tool_uses: vec![ToolUse {
                            tool_use_id: "t1".into(),
                            name: "get".into(),
                            input: json!({"a": 1}),
                        }],
                        reasoning_content: None,
                        cache_point: None,
                    }),
                ],
                current_message: CurrentMessage {
                    user_input_message: UserInputMessage {
                        content: "".into(),
                        user_input_message_context: Some(UserInputMessageContext {
                            env_state: None,
                            tools: vec![Tool {
                                tool_specification: ToolSpecification {
                                    name: "get".into(),
                                    description: "d".into(),
                                    input_schema: InputSchema { json: json!({"type": "object"}) },
                                },
                            }],
                            tool_results: vec![ToolResult {
                                tool_use_id: "t1".into(),
                                content: vec![ToolResultContent::Text("ok".into())],
                                status: ToolResultStatus::Error,
                            }],
                        }),
                        ..Default::default()
                    },
                },
            },
            profile_arn: None,
            additional_model_request_fields: None,
        };
        let mut with_arn = req.clone();
        with_arn.profile_arn = Some("arn:aws:codewhisperer:x".into());
        assert_eq!(req.to_body(None), serde_json::to_vec(&req).unwrap());
        assert_eq!(req.to_body(Some("arn:aws:codewhisperer:x")), serde_json::to_vec(&with_arn).unwrap());
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            json!({"conversationState": {
                "conversationId": "c-1",
                "chatTriggerType": "MANUAL",
                "history": [
                    {"userInputMessage": {"content": "hi", "modelId": "claude-sonnet-4.5", "origin": "AI_EDITOR"}},
                    {"assistantResponseMessage": {"content": "calling",
                        "toolUses": [{"toolUseId": "t1", "name": "get", "input": {"a": 1}}]}}
                ],
                "currentMessage": {"userInputMessage": {"content": "", "userInputMessageContext": {
                    "tools": [{"toolSpecification": {"name": "get", "description": "d",
                        "inputSchema": {"json": {"type": "object"}}}}],
                    "toolResults": [{"toolUseId": "t1", "content": [{"text": "ok"}], "status": "error"}]
                }}}
            }})
        );
    }

    #[test]
    fn native_reasoning_members() {
        let mut req = GenerateRequest {
            conversation_state: ConversationState {
                conversation_id: "c-2".into(),
                chat_trigger_type: ChatTriggerType::Manual,
                history: vec![
                    HistoryMessage::UserInputMessage(UserInputMessage {
                        content: "a".into(),
                        ..Default::default()
                    }),
                    HistoryMessage::AssistantResponseMessage(AssistantResponseMessage {
                        message_id: None,
                        content: "b".into(),
                        tool_uses: vec![],
                        reasoning_content: Some(ReasoningContent::ReasoningText {
                            text: "hm".into(),
                            signature: "c2ln".into(),
                        }),
                        cache_point: None,
                    }),
                    HistoryMessage::UserInputMessage(UserInputMessage {
                        content: "c".into(),
                        ..Default::default()
                    }),
                    HistoryMessage::AssistantResponseMessage(AssistantResponseMessage {
                        message_id: None,
                        content: "d".into(),
                        tool_uses: vec![],
                        reasoning_content: Some(ReasoningContent::RedactedContent("cmVk".into())),
                        cache_point: None,
                    }),
                ],
                current_message: CurrentMessage {
                    user_input_message: UserInputMessage { content: "e".into(), ..Default::default() },
                },
            },
            profile_arn: None,
            additional_model_request_fields: json!({"thinking": {"type": "adaptive"}, "max_tokens": 2048})
                .as_object()
                .cloned(),
        };
        let v: Value = serde_json::from_slice(&req.to_body(Some("arn:aws:codewhisperer:y"))).unwrap();
        assert_eq!(
            v["additionalModelRequestFields"],
            json!({"thinking": {"type": "adaptive"}, "max_tokens": 2048})
        );
        assert_eq!(v["profileArn"], "arn:aws:codewhisperer:y");
        let history = &v["conversationState"]["history"];
        assert_eq!(
            history[1]["assistantResponseMessage"]["reasoningContent"],
            json!({"reasoningText": {"text": "hm", "signature": "c2ln"}})
        );
        assert_eq!(
            history[3]["assistantResponseMessage"]["reasoningContent"],
            json!({"redactedContent": "cmVk"})
        );
        req.profile_arn = Some("arn:aws:codewhisperer:y".into());
        assert_eq!(req.to_body(Some("arn:aws:codewhisperer:y")), serde_json::to_vec(&req).unwrap());
    }
}
