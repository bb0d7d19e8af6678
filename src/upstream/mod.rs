//! Amazon Q side: the wire codec for Amazon Q's streamed responses and, later, the request and event
//! types and the HTTP client that speaks to the service.

pub mod eventstream;
