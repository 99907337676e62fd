//! jq programs in pipeline files: computed fields and filter predicates.
//!
//! Programs are compiled once (the pipeline validation compiles them to report errors, the
//! router compiles them again to run them) with the [`jaq`](https://github.com/01mf02/jaq)
//! engine. The library offered is jq's and jaq's standard library without what reads the
//! outside world (`env`, `$ENV`, `now`, `localtime`, `strflocaltime`, `input`), so a mapping is
//! a pure function of the event and rebuilding a store from the log gives the same fields.
//! (`debug` and `stderr` still write to the log and standard error: leave them out of
//! production pipelines.)
//!
//! A program reads the event's JSON payload as `.`; `$type` and `$source` hold the
//! CloudEvents type and source (or `null` for plain records).

use std::fmt;
use std::sync::Arc;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, Compiler, Ctx, Native, Vars};
use jaq_json::Val;
use serde_json::{Map, Number, Value};

/// The global variables every program may use, in the order [`JqInput`] binds them.
const GLOBAL_VARS: [&str; 2] = ["$type", "$source"];

/// Natives whose output depends on the machine or the moment, not on the event.
const IMPURE: [&str; 4] = ["env", "now", "localtime", "strflocaltime"];

type Filter = jaq_core::compile::Filter<Native<data::JustLut<Val>>>;

/// A compiled jq program; clones share the compiled form.
#[derive(Clone)]
pub struct JqProgram {
    code: String,
    filter: Arc<Filter>,
}

impl fmt::Debug for JqProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("JqProgram").field(&self.code).finish()
    }
}

/// A program failed on one event (a type error such as `"a" + 1`, `error("...")`, `halt`).
/// Retrying the same event cannot succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JqError(pub String);

/// One event prepared for jq: the payload converted to jq values once, shared by every
/// program of the event's source.
pub struct JqInput {
    data: Val,
    vars: [Val; 2],
}

impl JqInput {
    /// Converts a payload and binds `$type` and `$source`.
    pub fn new(data: &Map<String, Value>, ce_type: Option<&str>, ce_source: Option<&str>) -> Self {
        let opt = |s: Option<&str>| s.map_or(Val::Null, |s| Val::from(s.to_owned()));
        Self {
            data: object_to_val(data),
            vars: [opt(ce_type), opt(ce_source)],
        }
    }
}

impl JqProgram {
    /// Parses and compiles `code`. The error names what is wrong and where (`expected ...
    /// at "..."`, `undefined filter foo/1`).
    pub fn compile(code: &str) -> Result<Self, String> {
        let arena = Arena::default();
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let loader = Loader::new(defs);
        let modules =
            loader
                .load(&arena, File { code, path: () })
                .map_err(|errs| {
                    let mut out = Vec::new();
                    for (_file, e) in errs {
                        match e {
                            jaq_core::load::Error::Io(es) => {
                                out.extend(es.into_iter().map(|(s, m)| format!("{m} ({s})")))
                            }
                            jaq_core::load::Error::Lex(es) => out
                                .extend(es.into_iter().map(|(exp, at)| expected(exp.as_str(), at))),
                            jaq_core::load::Error::Parse(es) => out
                                .extend(es.into_iter().map(|(exp, at)| expected(exp.as_str(), at))),
                        }
                    }
                    out.join("; ")
                })?;
        let funs = jaq_core::funs()
            .chain(jaq_std::funs().filter(|(name, _, _)| !IMPURE.contains(name)))
            .chain(jaq_json::funs());
        let filter = Compiler::default()
            .with_funs(funs)
            .with_global_vars(GLOBAL_VARS)
            .compile(modules)
            .map_err(|errs| {
                errs.into_iter()
                    .flat_map(|(_file, es)| es)
                    .map(|(name, undefined)| {
                        let arity = match undefined {
                            jaq_core::compile::Undefined::Filter(n) => format!("/{n}"),
                            _ => String::new(),
                        };
                        format!("undefined {} {name}{arity}", undefined.as_str())
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        Ok(Self {
            code: code.to_owned(),
            filter: Arc::new(filter),
        })
    }

    /// The program's source text.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Runs the program and returns its first output, `None` when it produced none (`empty`).
    pub fn first(&self, input: &JqInput) -> Result<Option<Value>, JqError> {
        self.first_val(input)?.map(|v| val_to_json(&v)).transpose()
    }

    /// Runs the program as a predicate: true when its first output is neither `false` nor
    /// `null` (jq's truthiness); a program with no output is false.
    pub fn holds(&self, input: &JqInput) -> Result<bool, JqError> {
        Ok(self
            .first_val(input)?
            .is_some_and(|v| !matches!(v, Val::Null | Val::Bool(false))))
    }

    fn first_val(&self, input: &JqInput) -> Result<Option<Val>, JqError> {
        let vars = Vars::new(input.vars.iter().cloned());
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, vars);
        let mut out = self.filter.id.run((ctx, input.data.clone()));
        match out.next() {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            // `halt` and `halt_error` must never end the process: they fail the event.
            Some(Err(exn)) => Err(JqError(match exn.get_err() {
                Ok(e) => e.to_string(),
                Err(_) => "the program halted".to_owned(),
            })),
        }
    }
}

/// A syntax error: what the parser wanted, and the text where it stopped.
fn expected(what: &str, at: &str) -> String {
    if what == "nothing" {
        format!("unexpected {}", near(at))
    } else {
        format!("expected {what} at {}", near(at))
    }
}

/// Up to 30 characters of the source text where an error was found.
fn near(rest: &str) -> String {
    if rest.is_empty() {
        return "the end of the program".to_owned();
    }
    let mut s: String = rest.chars().take(30).collect();
    if s.len() < rest.len() {
        s.push_str("...");
    }
    format!("{s:?}")
}

fn object_to_val(map: &Map<String, Value>) -> Val {
    let mut out = jaq_json::Map::with_capacity_and_hasher(map.len(), Default::default());
    for (k, v) in map {
        out.insert(Val::from(k.clone()), json_to_val(v));
    }
    Val::obj(out)
}

fn json_to_val(v: &Value) -> Val {
    match v {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Val::Num(jaq_json::Num::from_integral(i))
            } else if let Some(u) = n.as_u64() {
                Val::Num(jaq_json::Num::from_integral(u))
            } else {
                Val::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => Val::from(s.clone()),
        Value::Array(a) => a.iter().map(json_to_val).collect(),
        Value::Object(m) => object_to_val(m),
    }
}

fn val_to_json(v: &Val) -> Result<Value, JqError> {
    Ok(match v {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(*b),
        Val::Num(n) => match n {
            jaq_json::Num::Int(i) => Value::from(*i as i64),
            jaq_json::Num::Float(f) => Number::from_f64(*f)
                .map(Value::Number)
                .ok_or_else(|| JqError(format!("{f} is not a JSON number")))?,
            // Big integers and decimal literals: through their text, as JSON reads them.
            other => {
                let text = other.to_string();
                serde_json::from_str::<Number>(&text)
                    .map(Value::Number)
                    .map_err(|_| JqError(format!("{text} is not a JSON number")))?
            }
        },
        Val::TStr(b) | Val::BStr(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Val::Arr(a) => Value::Array(a.iter().map(val_to_json).collect::<Result<_, _>>()?),
        Val::Obj(m) => {
            let mut out = Map::with_capacity(m.len());
            for (k, v) in m.iter() {
                let key = match k {
                    Val::TStr(b) | Val::BStr(b) => String::from_utf8_lossy(b).into_owned(),
                    other => other.to_string(),
                };
                out.insert(key, val_to_json(v)?);
            }
            Value::Object(out)
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn input(v: Value) -> JqInput {
        JqInput::new(v.as_object().unwrap(), Some("crm.updated"), None)
    }

    #[test]
    fn computes_a_value_from_the_payload_and_the_event_type() {
        let p = JqProgram::compile(r#".first + " " + .last"#).unwrap();
        let out = p.first(&input(json!({"first": "Ana", "last": "Silva"})));
        assert_eq!(out, Ok(Some(json!("Ana Silva"))));
        let t = JqProgram::compile("$type, $source").unwrap();
        assert_eq!(t.first(&input(json!({}))), Ok(Some(json!("crm.updated"))));
    }

    #[test]
    fn numbers_objects_and_empty_round_trip() {
        let p =
            JqProgram::compile("{n: (.a * 2), f: (.b / 4), big: .c, arr: [.d[] | . + 1]}").unwrap();
        let out = p.first(&input(
            json!({"a": 21, "b": 1, "c": 18446744073709551615u64, "d": [1, 2]}),
        ));
        assert_eq!(
            out,
            Ok(Some(
                json!({"n": 42, "f": 0.25, "big": 18446744073709551615u64, "arr": [2, 3]})
            ))
        );
        assert_eq!(
            JqProgram::compile("empty")
                .unwrap()
                .first(&input(json!({}))),
            Ok(None)
        );
    }

    #[test]
    fn predicates_use_jq_truthiness() {
        let p = JqProgram::compile(r#".action == "heartbeat""#).unwrap();
        assert_eq!(p.holds(&input(json!({"action": "heartbeat"}))), Ok(true));
        assert_eq!(p.holds(&input(json!({"action": "search"}))), Ok(false));
        let null = JqProgram::compile(".missing").unwrap();
        assert_eq!(null.holds(&input(json!({}))), Ok(false));
        let empty = JqProgram::compile("empty").unwrap();
        assert_eq!(empty.holds(&input(json!({}))), Ok(false));
    }

    #[test]
    fn runtime_errors_and_halt_fail_the_event_without_ending_the_process() {
        let p = JqProgram::compile(r#".a + 1"#).unwrap();
        let err = p.first(&input(json!({"a": "x"}))).unwrap_err();
        assert!(err.0.contains("cannot"), "{err}");
        let halt = JqProgram::compile("halt").unwrap();
        assert_eq!(
            halt.first(&input(json!({}))),
            Err(JqError("the program halted".into()))
        );
        let halt_error = JqProgram::compile(r#""bye" | halt_error(1)"#).unwrap();
        assert!(halt_error.first(&input(json!({}))).is_err());
    }

    #[test]
    fn compile_errors_say_what_and_where() {
        let syntax = JqProgram::compile(".a +* 2").unwrap_err();
        assert_eq!(syntax, r#"unexpected "+*""#);
        let end = JqProgram::compile(".a + ").unwrap_err();
        assert_eq!(end, "expected term at the end of the program");
        let undefined = JqProgram::compile("frobnicate(.a)").unwrap_err();
        assert_eq!(undefined, "undefined filter frobnicate/1");
        let var = JqProgram::compile("$nope").unwrap_err();
        assert_eq!(var, "undefined variable $nope");
        // Nothing that reads the outside world.
        for code in ["env", "now", "input", "$ENV", "localtime"] {
            assert!(JqProgram::compile(code).is_err(), "{code} compiled");
        }
    }

    #[test]
    fn compiled_programs_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<JqProgram>();
    }
}
