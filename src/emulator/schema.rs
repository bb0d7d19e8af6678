//! A small JSON Schema checker: the subset the model catalog's
//! `additionalModelRequestFieldsSchema`s use, applied to a request's
//! `additionalModelRequestFields` with the service's `additionalProperties: false` strictness.
//!
//! Keywords understood: `type` (a name or a list of names: `object`, `array`, `string`,
//! `integer`, `number`, `boolean`, `null`), `enum`, `const`, `minimum`, `maximum`,
//! `exclusiveMinimum`, `exclusiveMaximum` (numbers), `minLength`, `maxLength`, `properties`,
//! `required`, `additionalProperties` (`false` or a schema; absent means allowed), `items`,
//! `minItems`, `maxItems`. Other keywords (`$schema`, `title`, `description`, …) are ignored.
//! `1024.0` is an integer, as JSON Schema says.

use serde_json::{Map, Value};

/// Why a value does not match its schema: the dotted path of the offending value and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct SchemaMismatch {
    pub path: String,
    pub problem: String,
}

/// Checks `value` against `schema`; `path` names `value` in the messages.
pub fn check(schema: &Value, value: &Value, path: &str) -> Result<(), SchemaMismatch> {
    let Some(schema) = schema.as_object() else {
        // `true` (or anything that is not an object) accepts everything; `false` nothing.
        return if schema == &Value::Bool(false) {
            mismatch(path, "no value is allowed here")
        } else {
            Ok(())
        };
    };
    if let Some(ty) = schema.get("type") {
        let names: Vec<&str> = match ty {
            Value::String(name) => vec![name.as_str()],
            Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !names.is_empty() && !names.iter().any(|name| has_type(value, name)) {
            return mismatch(
                path,
                format!(
                    "expected {}, found {}",
                    names.join(" or "),
                    crate::anthropic::request::type_name(value)
                ),
            );
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return mismatch(path, format!("{value} is not one of {}", Value::Array(allowed.clone())));
    }
    if let Some(expected) = schema.get("const")
        && expected != value
    {
        return mismatch(path, format!("expected {expected}"));
    }
    if let Some(n) = value.as_f64() {
        check_number(schema, n, path)?;
    }
    if let Some(s) = value.as_str() {
        let chars = s.chars().count() as f64;
        if limit(schema, "minLength").is_some_and(|min| chars < min) {
            return mismatch(path, "string too short");
        }
        if limit(schema, "maxLength").is_some_and(|max| chars > max) {
            return mismatch(path, "string too long");
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as f64;
        if limit(schema, "minItems").is_some_and(|min| len < min) {
            return mismatch(path, "too few items");
        }
        if limit(schema, "maxItems").is_some_and(|max| len > max) {
            return mismatch(path, "too many items");
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item_schema, item, &format!("{path}[{i}]"))?;
            }
        }
    }
    if let Some(object) = value.as_object() {
        check_object(schema, object, path)?;
    }
    Ok(())
}

fn check_number(schema: &Map<String, Value>, n: f64, path: &str) -> Result<(), SchemaMismatch> {
    if let Some(min) = limit(schema, "minimum")
        && n < min
    {
        return mismatch(path, format!("{n} is below the minimum {min}"));
    }
    if let Some(max) = limit(schema, "maximum")
        && n > max
    {
        return mismatch(path, format!("{n} is above the maximum {max}"));
    }
    if let Some(min) = limit(schema, "exclusiveMinimum")
        && n <= min
    {
        return mismatch(path, format!("{n} is not above {min}"));
    }
    if let Some(max) = limit(schema, "exclusiveMaximum")
        && n >= max
    {
        return mismatch(path, format!("{n} is not below {max}"));
    }
    Ok(())
}

fn check_object(
    schema: &Map<String, Value>,
    object: &Map<String, Value>,
    path: &str,
) -> Result<(), SchemaMismatch> {
    let empty = Map::new();
    let properties = schema.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    for name in
        schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
    {
        if !object.contains_key(name) {
            return mismatch(path, format!("`{name}` is required"));
        }
    }
    for (name, member) in object {
        let member_path = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
        match (properties.get(name), schema.get("additionalProperties")) {
            (Some(member_schema), _) => check(member_schema, member, &member_path)?,
            (None, Some(Value::Bool(false))) => {
                return mismatch(path, format!("`{name}` is not allowed"));
            }
            (None, Some(extra @ Value::Object(_))) => check(extra, member, &member_path)?,
            (None, _) => {}
        }
    }
    Ok(())
}

fn limit(schema: &Map<String, Value>, keyword: &str) -> Option<f64> {
    schema.get(keyword).and_then(Value::as_f64)
}

fn has_type(value: &Value, name: &str) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|n| n.fract() == 0.0),
        _ => false,
    }
}

fn mismatch<T>(path: &str, problem: impl Into<String>) -> Result<T, SchemaMismatch> {
    let path = if path.is_empty() { "$".to_owned() } else { path.to_owned() };
    Err(SchemaMismatch { path, problem: problem.into() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "thinking": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["type"],
                    "properties": {
                        "type": {"type": "string", "enum": ["adaptive", "enabled"]},
                        "budget_tokens": {"type": "integer", "minimum": 1024}
                    }
                },
                "max_tokens": {"type": "integer", "minimum": 1024, "maximum": 64000},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}
            }
        })
    }

    #[test]
    fn accepts_what_the_schema_allows() {
        for ok in [
            json!({}),
            json!({"thinking": {"type": "adaptive"}}),
            json!({"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 64000}),
            json!({"max_tokens": 1024.0}),
            json!({"tags": ["a", "b"]}),
        ] {
            check(&schema(), &ok, "").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_the_rest_with_a_path() {
        let cases = [
            (json!({"temperature": 1}), "$"),
            (json!({"thinking": {"type": "adaptive", "extra": 1}}), "thinking"),
            (json!({"thinking": {}}), "thinking"),
            (json!({"thinking": {"type": "off"}}), "thinking.type"),
            (json!({"thinking": {"type": "enabled", "budget_tokens": 10}}), "thinking.budget_tokens"),
            (json!({"max_tokens": 64001}), "max_tokens"),
            (json!({"max_tokens": 2048.5}), "max_tokens"),
            (json!({"max_tokens": "2048"}), "max_tokens"),
            (json!({"tags": ["a", 1]}), "tags[1]"),
            (json!({"tags": ["a", "b", "c"]}), "tags"),
            (json!([]), "$"),
        ];
        for (value, path) in cases {
            let err = check(&schema(), &value, "").expect_err(&value.to_string());
            assert_eq!(err.path, path, "{value}: {err}");
        }
        assert!(check(&json!(false), &json!(1), "x").is_err());
        assert!(check(&json!(true), &json!(1), "x").is_ok());
    }
}
