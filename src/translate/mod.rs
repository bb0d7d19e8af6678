//! Translation between the two APIs: Claude requests → Amazon Q requests, Amazon Q events →
//! Claude events; the model map and token accounting.

pub mod catalog;
pub mod models;
pub mod reasoning;
pub mod request;
pub mod response;
pub mod tokens;

pub use catalog::Catalog;
pub use models::{ModelCaps, ModelInfo, ModelMap};
pub use request::{Context, ToolNames, Translated, translate};
pub use response::{Aggregator, ResponseParams, ResponseState};
