//! amq2api: the Anthropic Claude Messages API served from a pool of Amazon Q Developer accounts.
#![forbid(unsafe_code)]

pub mod upstream;
