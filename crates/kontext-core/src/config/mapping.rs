//! A source's field mappings and filter conditions: the syntax and its validation.
//!
//! ```yaml
//! fields:
//!   given_name: first_name                     # a path: compiled to a direct accessor
//!   tier: loyalty.tier                         # a dotted path
//!   full_name: { jq: '.first + " " + .last' }  # computed by a jq program
//!   amount: { path: amount, type: number }     # a path, coerced
//!   opened: { jq: .opened // .created, type: timestamp }
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::Condition;
use crate::jq::JqProgram;

/// How one canonical field is taken from a source's payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum FieldMapping {
    /// A dotted path into the payload (`loyalty.tier`), copied as it is.
    Path(String),
    /// A path or a jq program, with an optional type coercion.
    Spec(FieldSpec),
}

/// The map form of a field mapping: exactly one of `path` and `jq`, and optionally `type`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// A dotted path into the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A jq program run on the payload; its first output is the value (`null` or no output:
    /// the field is left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jq: Option<String>,
    /// Convert the value to this type; a value that cannot be converted sends the record to
    /// the dead-letter topic.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub coerce: Option<FieldType>,
}

/// Types a field value can be coerced to. `null` stays `null` whatever the type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// Strings as they are; numbers and booleans as their JSON text.
    String,
    /// Numbers as they are; strings holding a decimal number (`"12.50"`, `" 3 "`, `"1e3"`).
    Number,
    /// Integral numbers (`42`, `42.0`) and strings holding one; `42.5` is an error.
    Integer,
    /// Booleans, and the strings `true` / `false` in any case.
    Boolean,
    /// RFC 3339, RFC 2822, `YYYY-MM-DD HH:MM:SS[.fff]`, `YYYY-MM-DDTHH:MM:SS[.fff]` (no zone:
    /// UTC), `YYYY-MM-DD` (midnight UTC), and epoch seconds or milliseconds as a number or a
    /// string; written as RFC 3339 UTC with milliseconds (`2026-11-25T12:00:00.000Z`).
    Timestamp,
}

impl FieldType {
    /// The name used in the pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Boolean => "boolean",
            FieldType::Timestamp => "timestamp",
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FieldMapping {
    /// The dotted path, when the value is read from one.
    pub fn path(&self) -> Option<&str> {
        match self {
            FieldMapping::Path(p) => Some(p),
            FieldMapping::Spec(s) => s.path.as_deref(),
        }
    }

    /// The jq program, when the value is computed.
    pub fn jq(&self) -> Option<&str> {
        match self {
            FieldMapping::Path(_) => None,
            FieldMapping::Spec(s) => s.jq.as_deref(),
        }
    }

    /// The coercion, if any.
    pub fn coerce(&self) -> Option<FieldType> {
        match self {
            FieldMapping::Path(_) => None,
            FieldMapping::Spec(s) => s.coerce,
        }
    }
}

impl From<&str> for FieldMapping {
    fn from(path: &str) -> Self {
        FieldMapping::Path(path.to_owned())
    }
}

/// A string is a path; a map is a [`FieldSpec`], parsed strictly so that a misspelt key is
/// reported with its line and column.
impl<'de> Deserialize<'de> for FieldMapping {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MappingVisitor;
        impl<'de> Visitor<'de> for MappingVisitor {
            type Value = FieldMapping;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field path such as `loyalty.tier`, or a map with `path` or `jq` and an optional `type`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<FieldMapping, E> {
                Ok(FieldMapping::Path(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<FieldMapping, E> {
                Ok(FieldMapping::Path(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FieldMapping, A::Error> {
                FieldSpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(FieldMapping::Spec)
            }
        }
        deserializer.deserialize_any(MappingVisitor)
    }
}

/// Checks a source's `fields`: each is a well-formed path or a jq program that compiles.
pub(super) fn validate_fields(
    at: &str,
    fields: &BTreeMap<String, FieldMapping>,
    err: &mut impl FnMut(String, String),
) {
    for (canonical, mapping) in fields {
        let here = format!("{at}.fields.{canonical}");
        if canonical.trim().is_empty() {
            err(
                here.clone(),
                "the canonical field name must not be empty".into(),
            );
        }
        match (mapping.path(), mapping.jq()) {
            (Some(path), None) => {
                if let Some(problem) = path_problem(path) {
                    err(here, problem);
                }
            }
            (None, Some(code)) => {
                if let Err(e) = JqProgram::compile(code) {
                    err(
                        here,
                        format!("the jq program {code:?} does not compile: {e}"),
                    );
                }
            }
            _ => err(
                here,
                "give exactly one of `path` (a dotted path) and `jq` (a jq program)".into(),
            ),
        }
    }
}

/// Checks one `drop_if` condition: a jq predicate that compiles, or a field with exactly one
/// test.
pub(super) fn validate_condition(at: &str, c: &Condition, err: &mut impl FnMut(String, String)) {
    let tests = [c.equals.is_some(), c.one_of.is_some(), c.exists.is_some()];
    let n_tests = tests.iter().filter(|t| **t).count();
    match (&c.jq, &c.field) {
        (Some(code), None) if n_tests == 0 => {
            if let Err(e) = JqProgram::compile(code) {
                err(
                    format!("{at}.jq"),
                    format!("the jq predicate {code:?} does not compile: {e}"),
                );
            }
        }
        (Some(_), _) => err(
            at.to_owned(),
            "a `jq` condition stands alone: remove `field`, `equals`, `in` and `exists`".into(),
        ),
        (None, None) => err(
            at.to_owned(),
            "give `field` with one of `equals`, `in` or `exists`, or a `jq` predicate".into(),
        ),
        (None, Some(field)) => {
            if n_tests != 1 {
                err(
                    at.to_owned(),
                    "give exactly one of `equals`, `in` or `exists`".into(),
                );
            }
            if !matches!(field.as_str(), "@type" | "@source") {
                if let Some(problem) = path_problem(field) {
                    err(format!("{at}.field"), problem);
                }
            }
        }
    }
}

fn path_problem(path: &str) -> Option<String> {
    (path.trim().is_empty() || path.split('.').any(str::is_empty)).then(|| {
        format!("{path:?} is not a field path: use names separated by dots, e.g. `loyalty.tier`")
    })
}

#[cfg(test)]
mod tests;
