//! What a dead letter's headers say, its coordinates, and `replay`'s filters.

use std::fmt;

use anyhow::{anyhow, Result};
use kontext_core::envelope::now_ms;
use kontext_core::record::Record;
use kontext_stream::dlq::headers;

use super::{ReplayArgs, KONTEXT_STAGE};

/// Coordinates of a record: `topic/partition/offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Coord {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
}

impl fmt::Display for Coord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

impl std::str::FromStr for Coord {
    type Err = anyhow::Error;

    /// `TOPIC/PARTITION/OFFSET`, or `TOPIC/PARTITION@OFFSET` as the logs and `show`'s
    /// `from` line write a record's place. Topic names cannot contain `/` or `@`, but we
    /// split from the right anyway.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || anyhow!("{s:?} is not TOPIC/PARTITION/OFFSET (or TOPIC/PARTITION@OFFSET)");
        let (place, offset) = (s.rsplit_once('@'))
            .or_else(|| s.rsplit_once('/'))
            .ok_or_else(bad)?;
        let (topic, partition) = place.rsplit_once('/').ok_or_else(bad)?;
        Ok(Coord {
            topic: topic.to_string(),
            partition: partition
                .parse()
                .map_err(|_| anyhow!("{s:?}: partition {partition:?} is not a number"))?,
            offset: offset
                .parse()
                .map_err(|_| anyhow!("{s:?}: offset {offset:?} is not a number"))?,
        })
    }
}

/// What the headers of a dead letter say.
#[derive(Debug, Clone)]
pub(super) struct DeadLetter {
    pub(super) at: Coord,
    /// Original topic, partition and offset.
    pub(super) origin: Option<(String, i32, Option<i64>)>,
    pub(super) stage: String,
    /// kontext's name of the stage, when the writer set it.
    pub(super) kontext_stage: Option<String>,
    /// The bounded error kind (`kontext.errors.kind`, else the last segment of the class).
    pub(super) kind: String,
    pub(super) class: String,
    pub(super) message: String,
    /// When it failed (`kontext.errors.time`).
    pub(super) time_ms: Option<i64>,
}

impl DeadLetter {
    pub(super) fn parse(record: &Record) -> Self {
        // The writer adds its headers after the record's own, which may hold error headers of
        // an earlier failure (a dead letter re-produced into its topic with its headers): the
        // last one of a name is this letter's.
        let text = |k: &str| {
            record
                .headers
                .iter()
                .rfind(|h| h.key == k)
                .and_then(|h| h.value.as_deref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let class = text(headers::EXCEPTION_CLASS_NAME).unwrap_or_default();
        let kind = text(headers::KIND)
            .or_else(|| class.rsplit([':', '.']).next().map(str::to_owned))
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let origin = match (
            text(headers::TOPIC),
            text(headers::PARTITION).and_then(|p| p.trim().parse().ok()),
        ) {
            (Some(t), Some(p)) if !t.is_empty() => Some((
                t,
                p,
                text(headers::OFFSET).and_then(|o| o.trim().parse().ok()),
            )),
            _ => None,
        };
        DeadLetter {
            at: Coord {
                topic: record.topic.to_string(),
                partition: record.partition,
                offset: record.offset,
            },
            origin,
            stage: text(headers::STAGE).unwrap_or_else(|| "unknown".into()),
            kontext_stage: text(KONTEXT_STAGE),
            kind,
            class,
            message: text(headers::EXCEPTION_MESSAGE).unwrap_or_default(),
            time_ms: text(headers::TIME).and_then(|t| parse_time(&t).ok()),
        }
    }
}

/// Headers the dead-letter writer adds (Kafka Connect's and kontext's).
pub(super) fn is_error_header(key: &str) -> bool {
    key.starts_with("__connect.errors.") || key.starts_with("kontext.errors.")
}

/// `replay`'s filters; all given ones must hold.
#[derive(Debug, Default)]
pub(super) struct Filter {
    pub(super) error: Option<String>,
    pub(super) stage: Option<String>,
    pub(super) since_ms: Option<i64>,
    pub(super) until_ms: Option<i64>,
    pub(super) key: Option<String>,
}

impl Filter {
    pub(super) fn from_args(args: &ReplayArgs) -> Result<Self> {
        let time = |flag: &str, v: &Option<String>| -> Result<Option<i64>> {
            v.as_deref()
                .map(|t| parse_time(t).map_err(|e| anyhow!("--{flag}: {e}")))
                .transpose()
        };
        Ok(Filter {
            error: args.error.as_ref().map(|e| e.to_lowercase()),
            stage: args.stage.clone(),
            since_ms: time("since", &args.since)?,
            until_ms: time("until", &args.until)?,
            key: args.key.clone(),
        })
    }

    pub(super) fn matches(&self, letter: &DeadLetter, record: &Record) -> bool {
        if let Some(e) = &self.error {
            let hit = [&letter.kind, &letter.class, &letter.message]
                .iter()
                .any(|s| s.to_lowercase().contains(e));
            if !hit {
                return false;
            }
        }
        if let Some(s) = &self.stage {
            let kontext = letter.kontext_stage.as_deref().unwrap_or_default();
            if !letter.stage.eq_ignore_ascii_case(s) && !kontext.eq_ignore_ascii_case(s) {
                return false;
            }
        }
        if self.since_ms.is_some() || self.until_ms.is_some() {
            let Some(t) = letter.time_ms else {
                return false;
            };
            if self.since_ms.is_some_and(|s| t < s) || self.until_ms.is_some_and(|u| t >= u) {
                return false;
            }
        }
        if let Some(k) = &self.key {
            if record.key.as_deref() != Some(k.as_bytes()) {
                return false;
            }
        }
        true
    }
}

/// RFC 3339, or a duration ago (`90s`, `15m`, `2h`).
pub(super) fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(t.timestamp_millis());
    }
    match kontext_core::duration::parse(text) {
        Ok(ago) => Ok(now_ms() - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-11-25T14:00:00Z) nor a duration ago (15m, 2h)"
        )),
    }
}
