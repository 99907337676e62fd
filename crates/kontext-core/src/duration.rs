//! Durations in configuration files: `"250us"`, `"5ms"`, `"2s"`, `"1m"`, `"1h"`, or a bare
//! number of milliseconds. Use with `#[serde(with = "kontext_core::duration")]`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes the duration in milliseconds, or microseconds when it is not a whole millisecond.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    let us = d.as_micros();
    if us.is_multiple_of(1000) {
        s.serialize_str(&format!("{}ms", us / 1000))
    } else {
        s.serialize_str(&format!("{us}us"))
    }
}

/// Reads a duration string or a bare number of milliseconds.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Millis(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
        Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
    }
}

/// `Option<Duration>` in the same notation: `#[serde(default, with =
/// "kontext_core::duration::optional")]`.
pub mod optional {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}

/// Parses `"250us"`, `"5ms"`, `"2s"`, `"1m"`, `"1h"` or `"250"` (milliseconds).
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let d = match unit.trim() {
        "us" => Duration::from_micros(n),
        "ms" | "" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?} (us, ms, s, m, h)"
            ))
        }
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_bare_milliseconds() {
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse("7"), Ok(Duration::from_millis(7)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse("2 fortnights").is_err());
        assert!(parse("ms").is_err());
    }
}
