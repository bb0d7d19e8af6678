//! TOML text into the raw schema types of `amq2api.toml` and the accounts file, reporting every
//! shape problem (a wrong type, an unknown key), each at its place, instead of only the first.
//!
//! serde stops at the first error. On a failure the document is parsed into its spanned tree,
//! the entry the error points at is taken out, and the rest is tried again, until it fits: each
//! round adds one diagnostic and removes one entry, so the rounds end.

use super::diag::Reporter;
use serde::de::DeserializeOwned;
use std::ops::Range;
use toml::de::{DeArray, DeTable, DeValue};

/// The most shape problems listed from one file (each costs a pass over the document).
pub const MAX_SHAPE_ERRORS: usize = 50;

/// Deserializes `source` into `T`. On any problem every one found is reported to `rep` and
/// `None` is returned.
pub fn deserialize<T: DeserializeOwned>(rep: &mut Reporter, source: &str) -> Option<T> {
    let first = match toml::from_str::<T>(source) {
        Ok(v) => return Some(v),
        Err(e) => e,
    };
    rep.toml_error(&first);
    // A syntax error: there is no tree to look further into.
    let Ok(mut doc) = DeTable::parse(source) else { return None };
    let mut span = first.span();
    for _ in 1..MAX_SHAPE_ERRORS {
        // Without a place, or with a place no entry holds, nothing can be taken out.
        if !span.is_some_and(|s| remove_in_table(doc.get_mut(), &s)) {
            return None;
        }
        match T::deserialize(toml::de::Deserializer::from(doc.clone())) {
            Ok(_) => return None,
            Err(e) => {
                rep.toml_error(&e);
                span = e.span();
            }
        }
    }
    rep.error_at(None, format!("more than {MAX_SHAPE_ERRORS} problems: fix these and check again"));
    None
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Removes the innermost entry of `table` that `span` points into (its key or its value).
fn remove_in_table(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let mut hit = None;
    for (key, value) in table.iter_mut() {
        if contains(&key.span(), span) {
            hit = Some(key.clone());
            break;
        }
        // Containers are searched whatever their own span says (a table's span need not cover
        // every line of it).
        if remove_in_value(value.get_mut(), span) {
            return true;
        }
        if contains(&value.span(), span) {
            hit = Some(key.clone());
            break;
        }
    }
    match hit {
        Some(key) => table.remove(&key).is_some(),
        None => false,
    }
}

fn remove_in_value(value: &mut DeValue<'_>, span: &Range<usize>) -> bool {
    match value {
        DeValue::Table(t) => remove_in_table(t, span),
        DeValue::Array(items) => {
            let mut hit = None;
            for (i, item) in items.iter_mut().enumerate() {
                if remove_in_value(item.get_mut(), span) {
                    return true;
                }
                if contains(&item.span(), span) {
                    hit = Some(i);
                    break;
                }
            }
            let Some(i) = hit else { return false };
            let old = std::mem::replace(items, DeArray::new());
            for (j, item) in old.into_iter().enumerate() {
                if j != i {
                    items.push(item);
                }
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::path::Path;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        #[serde(default)]
        item: Vec<Item>,
        top: Option<i64>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        name: Option<String>,
        size: Option<i64>,
        tags: Option<Vec<String>>,
    }

    fn problems(src: &str) -> (bool, Vec<String>) {
        let mut rep = Reporter::new(Path::new("f.toml"), src);
        let ok = deserialize::<Doc>(&mut rep, src).is_some();
        (ok, rep.out.0.iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn every_shape_problem_with_its_place() {
        let src = "top = \"x\"\n[[item]]\nname = 1\n[[item]]\nsize = \"big\"\nextra = true\n\
                   [[item]]\ntags = [\"a\", 2]\n";
        let (ok, p) = problems(src);
        assert!(!ok);
        assert_eq!(p.len(), 5, "{p:#?}");
        for (place, what) in [
            ("f.toml:1:7:", "invalid type"),
            ("f.toml:3:8:", "invalid type"),
            ("f.toml:5:8:", "invalid type"),
            ("f.toml:6:1:", "unknown field `extra`"),
            ("f.toml:8:14:", "invalid type"),
        ] {
            assert!(p.iter().any(|l| l.starts_with(place) && l.contains(what)), "{place} {what}: {p:#?}");
        }
    }

    #[test]
    fn good_and_syntax_errors_as_before() {
        assert_eq!(problems("top = 1\n[[item]]\nname = \"a\"\n"), (true, vec![]));
        let (ok, p) = problems("top = \n");
        assert!(!ok);
        assert_eq!(p.len(), 1, "{p:?}");
    }
}
