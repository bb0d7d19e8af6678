//! The checks of a chat call that need to know the account and its model, made after the
//! structural rules of [`validate_request`](super::validate_request): the profile ARN, the model
//! id against the account's catalog, input types, cache points, `additionalModelRequestFields`
//! against the model's schema, and the signatures of replayed reasoning.

use http::{Response, StatusCode};
use serde_json::Value;

use super::catalog::ModelEntry;
use super::schema::{self, SchemaMismatch};
use super::server::Body;
use super::state::{Credential, Shared};
use super::validate::count_cache_points;
use super::wire::{self, Reason};
use super::{AccountKind, BUILDER_ID_PROFILE_ARN, SOCIAL_PROFILE_ARN};

/// Why a structurally valid call is refused.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Refusal {
    /// 400 "profileArn is required for this request.".
    ProfileRequired,
    /// 403 "User is not authorized to make this call" (a profile ARN that is not the account's).
    ProfileNotAuthorized,
    /// 400 `INVALID_MODEL_ID`.
    InvalidModel,
    /// 400: images for a model without `IMAGE` input.
    ImagesNotSupported,
    /// 400: a `cachePoint` for a model without prompt caching.
    CachingNotSupported,
    /// 400: more `cachePoint`s than the model's `maximumCacheCheckpointsPerRequest`.
    TooManyCachePoints { found: usize, max: u32 },
    /// 400 "additionalModelRequestFields is not supported for this model".
    FieldsNotSupported,
    /// 400 "Invalid additionalModelRequestFields".
    FieldsInvalid(SchemaMismatch),
    /// 400 `THINKING_SIGNATURE_INVALID`, at this JSON path.
    SignatureInvalid(String),
}

impl Refusal {
    /// The answer.
    pub fn response(&self, request_id: &str) -> Response<Body> {
        match self {
            Refusal::ProfileRequired => wire::validation(wire::PROFILE_REQUIRED, Reason::Null, request_id),
            Refusal::ProfileNotAuthorized => wire::access_denied(wire::NOT_AUTHORIZED, request_id),
            Refusal::InvalidModel => {
                wire::validation(wire::INVALID_MODEL, Reason::Code("INVALID_MODEL_ID"), request_id)
            }
            Refusal::ImagesNotSupported => {
                wire::validation("This model does not support image input.", Reason::Null, request_id)
            }
            Refusal::CachingNotSupported => {
                wire::validation("Prompt caching is not supported for this model.", Reason::Null, request_id)
            }
            Refusal::TooManyCachePoints { .. } => wire::validation(
                "The request has more cache points than this model allows.",
                Reason::Null,
                request_id,
            ),
            Refusal::FieldsNotSupported => {
                wire::validation(wire::FIELDS_NOT_SUPPORTED, Reason::Null, request_id)
            }
            Refusal::FieldsInvalid(_) => wire::validation(wire::FIELDS_INVALID, Reason::Null, request_id),
            Refusal::SignatureInvalid(_) => wire::q_error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                wire::SIGNATURE_INVALID,
                Reason::Code("THINKING_SIGNATURE_INVALID"),
                request_id,
            ),
        }
    }
}

/// The profile ARN an account must send: its own, else the placeholder of its kind (none for an
/// API key).
pub(super) fn expected_profile_arn(kind: AccountKind, own: Option<&str>) -> Option<&str> {
    own.or(match kind {
        AccountKind::Oidc => Some(BUILDER_ID_PROFILE_ARN),
        AccountKind::Social => Some(SOCIAL_PROFILE_ARN),
        AccountKind::ApiKey => None,
    })
}

/// The profile-ARN rule for a call that sent `sent`: a sent ARN must be the one the account must
/// send; a missing one is refused for an account with its own ARN, and, when `require` is set,
/// for every account that is not an API key.
pub(super) fn check_profile(
    shared: &Shared,
    credential: &Credential,
    sent: Option<&str>,
) -> Result<(), Refusal> {
    let (kind, own) = shared.profile_of(&credential.account).unwrap_or((credential.kind, None));
    match sent {
        Some(sent) if Some(sent) == expected_profile_arn(kind, own.as_deref()) => Ok(()),
        Some(_) => Err(Refusal::ProfileNotAuthorized),
        None if own.is_some() => Err(Refusal::ProfileRequired),
        None if shared.opts.require_profile_arn && kind != AccountKind::ApiKey => {
            Err(Refusal::ProfileRequired)
        }
        None => Ok(()),
    }
}

/// Every check of this module on a body that passed [`validate_request`](super::validate_request);
/// the model the call runs on.
pub(super) fn check_chat(
    shared: &Shared,
    credential: &Credential,
    body: &Value,
) -> Result<ModelEntry, Refusal> {
    check_profile(shared, credential, body.get("profileArn").and_then(Value::as_str))?;
    let state = &body["conversationState"];
    let model_id = state["currentMessage"]["userInputMessage"]["modelId"].as_str();
    let model = shared.model_for(&credential.account, model_id).ok_or(Refusal::InvalidModel)?;
    let messages =
        || state["history"].as_array().into_iter().flatten().chain(std::iter::once(&state["currentMessage"]));
    let has_images = messages()
        .any(|m| m["userInputMessage"]["images"].as_array().is_some_and(|images| !images.is_empty()));
    if has_images && !model.takes_images() {
        return Err(Refusal::ImagesNotSupported);
    }
    let cache_points = count_cache_points(body);
    if cache_points > 0 && !model.prompt_caching.supported {
        return Err(Refusal::CachingNotSupported);
    }
    if cache_points > model.prompt_caching.max_checkpoints as usize {
        return Err(Refusal::TooManyCachePoints {
            found: cache_points,
            max: model.prompt_caching.max_checkpoints,
        });
    }
    if let Some(fields) = body.get("additionalModelRequestFields").and_then(Value::as_object)
        && !fields.is_empty()
    {
        let Some(schema) = &model.request_fields_schema else {
            return Err(Refusal::FieldsNotSupported);
        };
        let fields = Value::Object(fields.clone());
        schema::check(schema, &fields, "additionalModelRequestFields").map_err(Refusal::FieldsInvalid)?;
    }
    for (i, item) in state["history"].as_array().into_iter().flatten().enumerate() {
        let reasoning = &item["assistantResponseMessage"]["reasoningContent"];
        let path = format!("conversationState.history[{i}].assistantResponseMessage.reasoningContent");
        let valid = if let Some(text) = reasoning.get("reasoningText") {
            let (text, signature) = (text["text"].as_str().unwrap_or_default(), text["signature"].as_str());
            signature.is_some_and(|signature| shared.signer().verify(text, signature))
        } else if let Some(content) = reasoning.get("redactedContent").and_then(Value::as_str) {
            shared.signer().verify_redacted(content)
        } else {
            true
        };
        if !valid {
            return Err(Refusal::SignatureInvalid(path));
        }
    }
    Ok(model)
}
