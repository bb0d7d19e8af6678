//! Amazon Q side: the event-stream codec, the request and event types, error classification,
//! and the HTTP client that calls `GenerateAssistantResponse` and OIDC `CreateToken`, directly
//! or through an account's egress proxy.

pub mod agent;
pub mod catalog;
pub mod client;
pub mod conn;
pub mod errors;
pub mod events;
pub mod eventstream;
pub mod tunnel;
pub mod types;

pub use agent::Agent;
pub use client::{
    Caller, Endpoints, EventStream, Profile, RefreshError, Role, TokenGrant, UpstreamClient, endpoints_for,
};
pub use errors::{QuotaKind, UpstreamFailure};
pub use events::{Event, StreamError};
