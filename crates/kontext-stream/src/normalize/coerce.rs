//! Type coercions of mapped values (`type:` in a field mapping).
//!
//! Each conversion is strict: it either yields a value of the declared type that means the
//! same thing, or fails (never truncates `42.5` to `42`, never guesses a time zone other than
//! UTC for a time without one). `null` stays `null` whatever the type.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use kontext_core::config::FieldType;
use serde_json::{Number, Value};

/// Epoch values at or above this magnitude are milliseconds, below it seconds. 1e11 seconds is
/// the year 5138; 1e11 milliseconds is 1973-03-03, so neither range loses a plausible time.
const EPOCH_MILLIS_FROM: f64 = 1e11;

/// Converts `value` to `ty`, `None` when it cannot.
pub(super) fn coerce(value: &Value, ty: FieldType) -> Option<Value> {
    if value.is_null() {
        return Some(Value::Null);
    }
    match ty {
        FieldType::String => to_string(value),
        FieldType::Number => to_number(value).map(Value::Number),
        FieldType::Integer => to_integer(value),
        FieldType::Boolean => to_boolean(value),
        FieldType::Timestamp => to_timestamp(value)
            .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true))),
    }
}

/// The value as JSON for an error message, at most 200 characters.
pub(super) fn shorten(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= 200 {
        return text;
    }
    let mut s: String = text.chars().take(200).collect();
    s.push_str("...");
    s
}

fn to_string(value: &Value) -> Option<Value> {
    match value {
        Value::String(_) => Some(value.clone()),
        Value::Number(n) => Some(Value::String(n.to_string())),
        Value::Bool(b) => Some(Value::String(b.to_string())),
        _ => None,
    }
}

fn to_number(value: &Value) -> Option<Number> {
    match value {
        Value::Number(n) => Some(n.clone()),
        Value::String(s) => parse_number(s.trim()),
        _ => None,
    }
}

/// A decimal number in JSON's syntax plus a leading `+` (and leading zeros); integers stay
/// integers.
fn parse_number(s: &str) -> Option<Number> {
    let s = match s.strip_prefix('+') {
        Some(rest) if rest.starts_with(['+', '-']) => return None,
        Some(rest) => rest,
        None => s,
    };
    if !decimal_syntax(s) {
        return None;
    }
    if let Ok(i) = s.parse::<i64>() {
        return Some(Number::from(i));
    }
    if let Ok(u) = s.parse::<u64>() {
        return Some(Number::from(u));
    }
    s.parse::<f64>().ok().and_then(Number::from_f64)
}

/// `-?digits(.digits)?([eE][+-]?digits)?`: what Rust's parsers take beyond it ("inf", "NaN",
/// "1.", ".5", a second sign as in "+-3" or "++3") is not a number here.
fn decimal_syntax(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

fn to_integer(value: &Value) -> Option<Value> {
    let n = to_number(value)?;
    if n.is_i64() || n.is_u64() {
        return Some(Value::Number(n));
    }
    let f = n.as_f64()?;
    // Integral and exactly representable: below 2^53 every integer is.
    (f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0).then(|| Value::from(f as i64))
}

fn to_boolean(value: &Value) -> Option<Value> {
    match value {
        Value::Bool(_) => Some(value.clone()),
        Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Some(Value::Bool(true)),
        Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Some(Value::Bool(false)),
        _ => None,
    }
}

fn to_timestamp(value: &Value) -> Option<DateTime<Utc>> {
    let t = match value {
        Value::Number(n) => from_epoch(n.as_f64()?),
        Value::String(s) => parse_time(s.trim()),
        _ => None,
    }?;
    // RFC 3339 has four-digit years; also catches epoch microseconds read as milliseconds.
    (0..=9999)
        .contains(&chrono::Datelike::year(&t))
        .then_some(t)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_rfc2822(s) {
        return Some(t.with_timezone(&Utc));
    }
    // chrono's `%Y` also takes one to three digits ("25-11-26" would be year 25): the formats
    // below are for four-digit years only.
    let four_digit_year =
        s.len() > 4 && s.as_bytes()[..4].iter().all(u8::is_ascii_digit) && s.as_bytes()[4] == b'-';
    // Eight digits are a date in ISO 8601's basic format, as exports write them, not epoch
    // seconds of 1970-1973; digits that are no date fail rather than become a time in 1970.
    if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        return midnight(s, "%Y%m%d");
    }
    if !four_digit_year {
        return parse_number(s)
            .and_then(|n| n.as_f64())
            .and_then(from_epoch);
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc());
        }
    }
    if let Some(t) = midnight(s, "%Y-%m-%d") {
        return Some(t);
    }
    parse_number(s)
        .and_then(|n| n.as_f64())
        .and_then(from_epoch)
}

/// The date `s` in `format`, at midnight UTC.
fn midnight(s: &str, format: &str) -> Option<DateTime<Utc>> {
    let date = NaiveDate::parse_from_str(s, format).ok()?;
    date.and_hms_opt(0, 0, 0).map(|t| t.and_utc())
}

fn from_epoch(x: f64) -> Option<DateTime<Utc>> {
    if !x.is_finite() {
        return None;
    }
    let millis = if x.abs() >= EPOCH_MILLIS_FROM {
        x
    } else {
        x * 1000.0
    };
    // Whole milliseconds: the output has millisecond precision.
    let millis = millis.round();
    if millis.abs() > 1e16 {
        return None;
    }
    DateTime::<Utc>::from_timestamp_millis(millis as i64)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ts(v: Value) -> Option<Value> {
        coerce(&v, FieldType::Timestamp)
    }

    #[test]
    fn timestamps_in_every_supported_format_become_rfc3339_utc_millis() {
        let want = Some(json!("2026-11-25T12:00:00.000Z"));
        for input in [
            json!("2026-11-25T12:00:00Z"),
            json!("2026-11-25T13:00:00+01:00"),
            json!("2026-11-25t12:00:00.000z"),
            json!("Wed, 25 Nov 2026 12:00:00 +0000"),
            json!("Wed, 25 Nov 2026 07:00:00 -0500"),
            json!("2026-11-25 12:00:00"),
            json!("2026-11-25T12:00:00"),
            json!(" 2026-11-25 12:00:00.000 "),
            json!(1_795_608_000),
            json!(1_795_608_000_000i64),
            json!(1_795_608_000.0),
            json!("1795608000"),
            json!("1795608000000"),
        ] {
            assert_eq!(ts(input.clone()), want, "{input}");
        }
        assert_eq!(
            ts(json!("2026-11-25")),
            Some(json!("2026-11-25T00:00:00.000Z"))
        );
        assert_eq!(
            ts(json!("2026-11-25 12:00:00.1234")),
            Some(json!("2026-11-25T12:00:00.123Z"))
        );
        assert_eq!(
            ts(json!(1_795_608_000.5)),
            Some(json!("2026-11-25T12:00:00.500Z"))
        );
        // Eight digits in a string: a date (ISO 8601 basic), not epoch seconds of 1970.
        assert_eq!(
            ts(json!("20261125")),
            Some(json!("2026-11-25T00:00:00.000Z"))
        );
        assert_eq!(ts(json!(0)), Some(json!("1970-01-01T00:00:00.000Z")));
        assert_eq!(ts(json!(-86_400)), Some(json!("1969-12-31T00:00:00.000Z")));
    }

    #[test]
    fn timestamps_that_are_not_times_fail() {
        for input in [
            json!("yesterday"),
            json!("2026-13-01"),
            json!("2026-11-25 25:00:00"),
            json!("25/11/2026"),
            json!(""),
            json!(true),
            json!({"at": 1}),
            json!([1]),
            // Epoch microseconds read as milliseconds: the year 58870.
            json!(1_795_608_000_000_000i64),
            json!("NaN"),
            // chrono's `%Y` takes short years: DD-MM-YY must not become the year 25 or 26.
            json!("25-11-26"),
            json!("26-11-25 12:00:00"),
            json!("126-11-25T12:00:00"),
            // Eight digits that are no date.
            json!("20261325"),
            json!("12345678"),
        ] {
            assert_eq!(ts(input.clone()), None, "{input}");
        }
    }

    #[test]
    fn numbers_come_from_decimal_strings_and_integers_stay_integers() {
        let n = |v: Value| coerce(&v, FieldType::Number);
        assert_eq!(n(json!("12.50")), Some(json!(12.5)));
        assert_eq!(n(json!(" 42 ")), Some(json!(42)));
        assert_eq!(n(json!("-7")), Some(json!(-7)));
        assert_eq!(n(json!("+3")), Some(json!(3)));
        assert_eq!(n(json!("1e3")), Some(json!(1000.0)));
        assert_eq!(n(json!("18446744073709551615")), Some(json!(u64::MAX)));
        assert_eq!(n(json!(3.25)), Some(json!(3.25)));
        for bad in [
            json!("12,50"),
            json!("inf"),
            json!("NaN"),
            json!("1.2.3"),
            json!(""),
            json!("abc"),
            // Rust's parsers take these; JSON's number syntax does not.
            json!("+-3"),
            json!("++3"),
            json!("1."),
            json!(".5"),
            json!("-"),
            json!("1e"),
            json!("1e+"),
            json!(true),
            json!([1]),
        ] {
            assert_eq!(n(bad.clone()), None, "{bad}");
        }
    }

    #[test]
    fn integers_refuse_to_truncate() {
        let i = |v: Value| coerce(&v, FieldType::Integer);
        assert_eq!(i(json!("42")), Some(json!(42)));
        assert_eq!(i(json!(42.0)), Some(json!(42)));
        assert_eq!(i(json!("42.0")), Some(json!(42)));
        assert_eq!(i(json!(-3)), Some(json!(-3)));
        assert_eq!(i(json!(42.5)), None);
        assert_eq!(i(json!("42.5")), None);
        assert_eq!(i(json!(1e300)), None);
        assert_eq!(i(json!("x")), None);
    }

    #[test]
    fn strings_and_booleans() {
        let s = |v: Value| coerce(&v, FieldType::String);
        assert_eq!(s(json!(42)), Some(json!("42")));
        assert_eq!(s(json!(12.5)), Some(json!("12.5")));
        assert_eq!(s(json!(true)), Some(json!("true")));
        assert_eq!(s(json!("x")), Some(json!("x")));
        assert_eq!(s(json!({"a": 1})), None);
        assert_eq!(s(json!([1])), None);
        let b = |v: Value| coerce(&v, FieldType::Boolean);
        assert_eq!(b(json!("true")), Some(json!(true)));
        assert_eq!(b(json!("FALSE")), Some(json!(false)));
        assert_eq!(b(json!(false)), Some(json!(false)));
        for bad in [json!("yes"), json!(1), json!("1"), json!("")] {
            assert_eq!(b(bad.clone()), None, "{bad}");
        }
    }

    #[test]
    fn null_stays_null_for_every_type() {
        for ty in [
            FieldType::String,
            FieldType::Number,
            FieldType::Integer,
            FieldType::Boolean,
            FieldType::Timestamp,
        ] {
            assert_eq!(coerce(&Value::Null, ty), Some(Value::Null), "{ty}");
        }
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let long = Value::String("x".repeat(500));
        let s = shorten(&long);
        assert_eq!(s.chars().count(), 203);
        assert!(s.ends_with("..."));
        assert_eq!(shorten(&json!("ok")), "\"ok\"");
    }
}
