//! Each account's model catalog (`ListAvailableModels`): what it offers, when it was fetched,
//! the last fetch's failure, and the models it refused since.

use crate::upstream::catalog::{CatalogModel, Models, share};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

/// One account's catalog.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountCatalog {
    /// By `modelId` (shared with every account that offers the same). Empty until the first
    /// fetch.
    pub models: Arc<Models>,
    /// When the catalog was last fetched whole; `None`: never (the account may serve anything).
    pub fetched_at: Option<SystemTime>,
    /// The last fetch's failure, while the last good catalog keeps serving.
    pub error: Option<String>,
    /// Models the account refused (`INVALID_MODEL_ID`) since the last fetch.
    pub dropped: BTreeSet<String>,
}

impl AccountCatalog {
    /// Whether the account offers `q_model`: `None` while its catalog is unknown.
    pub fn offers(&self, q_model: &str) -> Option<bool> {
        if self.dropped.contains(q_model) {
            return Some(false);
        }
        self.fetched_at.map(|_| self.models.contains_key(q_model))
    }

    /// A fetch's result: the new catalog replaces the old one (and forgets dropped models).
    pub fn replace(&mut self, models: Vec<CatalogModel>, at: SystemTime) {
        self.replace_shared(share(models), at);
    }

    /// As [`Self::replace`], with models already shared.
    pub fn replace_shared(&mut self, models: Arc<Models>, at: SystemTime) {
        self.models = models;
        self.fetched_at = Some(at);
        self.error = None;
        self.dropped.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::Catalog;

    fn model(id: &str) -> CatalogModel {
        CatalogModel {
            model_id: id.into(),
            model_name: None,
            max_input_tokens: Some(1),
            max_output_tokens: None,
            rate_multiplier: None,
            cache_checkpoints: None,
            request_fields_schema: None,
            text_only: false,
        }
    }

    #[test]
    fn a_dropped_model_is_not_offered_until_the_next_fetch() {
        let mut c = AccountCatalog::default();
        assert_eq!(c.offers("m"), None, "unknown before the first fetch");
        c.replace(vec![model("m")], SystemTime::now());
        assert_eq!(c.offers("m"), Some(true));
        c.dropped.insert("m".into());
        assert_eq!(c.offers("m"), Some(false));
        assert!(Catalog::from_offers([(&*c.models, &c.dropped)]).is_empty());
        c.replace(vec![model("m")], SystemTime::now());
        assert_eq!(c.offers("m"), Some(true));
    }

    #[test]
    fn accounts_with_the_same_models_share_one_copy() {
        let (mut a, mut b, mut c) = Default::default();
        AccountCatalog::replace(&mut a, vec![model("shared-x"), model("shared-y")], SystemTime::now());
        AccountCatalog::replace(&mut b, vec![model("shared-y"), model("shared-x")], SystemTime::now());
        AccountCatalog::replace(&mut c, vec![model("shared-x")], SystemTime::now());
        let (a, b, c): (AccountCatalog, AccountCatalog, AccountCatalog) = (a, b, c);
        assert!(Arc::ptr_eq(&a.models, &b.models));
        assert!(!Arc::ptr_eq(&a.models, &c.models));
        assert_eq!(c.models.len(), 1);
        // Once nobody uses a catalog, it is not kept.
        let weak = Arc::downgrade(&c.models);
        drop(c);
        assert!(weak.upgrade().is_none());
    }
}
