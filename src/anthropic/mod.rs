//! The Anthropic side: Messages API request types (parsed at the edge), the error shape, and
//! the SSE wire format.

pub mod error;
pub mod grammar;
pub mod request;
pub mod sse;

pub use error::{ApiError, ErrorKind};
pub use request::{
    ApiVersion, Block, Endpoint, Message, MessagesRequest, Role, Thinking, ToolChoice, ToolDef,
};
