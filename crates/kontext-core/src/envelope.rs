//! The context event envelope: CloudEvents 1.0 over the Kafka protocol binding.
//!
//! Three shapes are accepted, so that any Kafka client can produce context events:
//! - **binary mode**: key = entity id (UTF-8), value = the JSON payload, attributes in headers
//!   `ce_specversion`, `ce_id`, `ce_source`, `ce_type`, `ce_time` (RFC 3339), `content-type`;
//! - **structured mode**: `content-type: application/cloudevents+json`, the value is a whole
//!   CloudEvent with the payload in `data`;
//! - **plain**: no CloudEvents headers at all; the id is derived from the record's coordinates
//!   and the time from the record timestamp.
//!
//! A null value with a key is a tombstone: the entity is deleted. (A structured-mode event
//! without `data`, or with `"data": null`, is not: it is an event with an empty payload.)
//! Everything else is rejected with a specific [`EnvelopeError`].

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::record::Record;

/// The only CloudEvents spec version kontext reads.
pub const SPEC_VERSION: &str = "1.0";
/// `content-type` of a structured-mode CloudEvent.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How the event was carried in the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeMode {
    Binary,
    Structured,
    Plain,
}

/// A decoded context event.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextEvent {
    /// `ce_id`, or `<topic>-<partition>-<offset>` for plain records.
    pub id: String,
    /// `ce_source`: the system the event comes from. `None` for plain records.
    pub source: Option<String>,
    /// `ce_type`, e.g. `crm.customer.updated`. `None` for plain records.
    pub event_type: Option<String>,
    /// Event time in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The record key: the id of the entity the event is about.
    pub entity_id: String,
    /// The JSON payload; `None` for a tombstone (delete the entity). From
    /// [`decode_projected`], possibly only the parts of it the caller reads.
    pub data: Option<Map<String, Value>>,
    pub mode: EnvelopeMode,
}

/// Why a record is not a valid context event. Every variant is permanent: the same bytes will
/// never decode, so retrying cannot help ([`EnvelopeError::is_transient`] says so per variant).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record is {size} bytes, more than the limit of {max} (limits.max_record_bytes)")]
    TooLarge { size: u64, max: u64 },
    #[error("record has no key: the key must be the entity id")]
    MissingKey,
    #[error("record key is empty: the key must be the entity id")]
    EmptyKey,
    #[error("record key is not valid UTF-8")]
    KeyNotUtf8,
    #[error("value is not valid UTF-8 JSON: {0}")]
    ValueNotUtf8(String),
    #[error("value is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("payload must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error(
        "unsupported content-type {0:?}: expected application/json or {STRUCTURED_CONTENT_TYPE}"
    )]
    UnsupportedContentType(String),
    #[error("unsupported CloudEvents specversion {0:?}: expected \"1.0\"")]
    UnsupportedSpecVersion(String),
    #[error("CloudEvents attribute {0:?} is missing")]
    MissingAttribute(&'static str),
    #[error("CloudEvents attribute {name:?} is invalid: {reason}")]
    InvalidAttribute { name: &'static str, reason: String },
    #[error("CloudEvents attribute {name:?} must be {expected}, found {found}")]
    WrongType {
        name: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error(
        "event time {event_ms} ms is {} s after the record's timestamp {record_ms} ms, more than \
         limits.max_event_time_ahead ({} s): a clock or ce_time in the future would outrank every \
         later update of the entity until then; fix the producer, or raise the limit",
        (event_ms - record_ms) / 1000,
        max_ahead_ms / 1000
    )]
    TimeAhead {
        event_ms: i64,
        record_ms: i64,
        max_ahead_ms: i64,
    },
}

impl EnvelopeError {
    /// A short, stable, bounded label for metrics (`reason="invalid_json"`).
    pub fn kind(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. } => "record_too_large",
            EnvelopeError::MissingKey => "missing_key",
            EnvelopeError::EmptyKey => "empty_key",
            EnvelopeError::KeyNotUtf8 => "key_not_utf8",
            EnvelopeError::ValueNotUtf8(_) => "value_not_utf8",
            EnvelopeError::InvalidJson(_) => "invalid_json",
            EnvelopeError::NotAnObject(_) => "not_an_object",
            EnvelopeError::UnsupportedContentType(_) => "unsupported_content_type",
            EnvelopeError::UnsupportedSpecVersion(_) => "unsupported_specversion",
            EnvelopeError::MissingAttribute(_) => "missing_attribute",
            EnvelopeError::InvalidAttribute { .. } => "invalid_attribute",
            EnvelopeError::WrongType { .. } => "wrong_type",
            EnvelopeError::TimeAhead { .. } => "time_ahead",
        }
    }

    /// Whether the same record could decode on another try: never. Listed per variant so
    /// that a new variant has to be classified.
    pub fn is_transient(&self) -> bool {
        match self {
            EnvelopeError::TooLarge { .. }
            | EnvelopeError::MissingKey
            | EnvelopeError::EmptyKey
            | EnvelopeError::KeyNotUtf8
            | EnvelopeError::ValueNotUtf8(_)
            | EnvelopeError::InvalidJson(_)
            | EnvelopeError::NotAnObject(_)
            | EnvelopeError::UnsupportedContentType(_)
            | EnvelopeError::UnsupportedSpecVersion(_)
            | EnvelopeError::MissingAttribute(_)
            | EnvelopeError::InvalidAttribute { .. }
            | EnvelopeError::WrongType { .. }
            | EnvelopeError::TimeAhead { .. } => false,
        }
    }
}

/// The size a record counts as against `limits.max_record_bytes`: key, value, and every
/// header's name and value, in bytes (Kafka's framing overhead is left out).
pub fn record_size(record: &Record) -> u64 {
    let len = |b: &Option<bytes::Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
    len(&record.key)
        + len(&record.value)
        + record
            .headers
            .iter()
            .map(|h| h.key.len() as u64 + len(&h.value))
            .sum::<u64>()
}

/// Rejects a record larger than `max` bytes ([`record_size`]) before anything parses it.
pub fn check_size(record: &Record, max: u64) -> Result<(), EnvelopeError> {
    let size = record_size(record);
    if size > max {
        Err(EnvelopeError::TooLarge { size, max })
    } else {
        Ok(())
    }
}

/// Refuses an event whose time is more than `max_ahead_ms` after its record's timestamp
/// (`limits.max_event_time_ahead`; `0`: no limit). Versions and stream time follow event time,
/// so one event dated in the future would win over every later update of its entity, and
/// stall the windows of its feature groups, until that time comes. Checked against the
/// record's timestamp, which the log keeps, so a replay decides the same; a record without
/// one (Kafka's `-1`, from the oldest message format) is not checked.
pub fn check_time(
    event: &ContextEvent,
    record: &Record,
    max_ahead_ms: i64,
) -> Result<(), EnvelopeError> {
    if max_ahead_ms > 0
        && record.timestamp_ms >= 0
        && event.time_ms.saturating_sub(record.timestamp_ms) > max_ahead_ms
    {
        Err(EnvelopeError::TimeAhead {
            event_ms: event.time_ms,
            record_ms: record.timestamp_ms,
            max_ahead_ms,
        })
    } else {
        Ok(())
    }
}

/// [`check_size`], then [`decode`].
pub fn decode_limited(record: &Record, max_bytes: u64) -> Result<ContextEvent, EnvelopeError> {
    check_size(record, max_bytes)?;
    decode(record)
}

/// Decodes a record into a [`ContextEvent`].
pub fn decode(record: &Record) -> Result<ContextEvent, EnvelopeError> {
    decode_projected(record, |_, _| None)
}

/// [`decode`], letting the caller parse a binary-mode or plain payload itself, e.g. keeping
/// only the parts of it that it will read.
///
/// `project` gets the event with its attributes decoded (`data` is still `None`) and the
/// payload as text (already checked to be UTF-8); it returns the payload as a map, which may
/// leave out whatever the caller never reads, or `None` to have the payload parsed in full.
/// It is called at most once, and never for tombstones, structured-mode events (their payload
/// is inside the CloudEvent's `data`) or records whose envelope is invalid. The result is
/// exactly [`decode`]'s, errors included, as long as `project` returns `None` for any payload
/// [`decode`] would reject (a payload `project` declines is parsed in full, so its error is
/// the one [`decode`] reports).
pub fn decode_projected(
    record: &Record,
    project: impl FnOnce(&ContextEvent, &str) -> Option<Map<String, Value>>,
) -> Result<ContextEvent, EnvelopeError> {
    let entity_id = decode_key(record)?;
    let content_type = header_str(record, "content-type", "content-type")?;
    let is_structured = content_type
        .map(|ct| media_type(ct).eq_ignore_ascii_case(STRUCTURED_CONTENT_TYPE))
        .unwrap_or(false);
    if is_structured {
        return decode_structured(record, entity_id);
    }
    if let Some(ct) = content_type {
        if !is_json_media_type(media_type(ct)) {
            return Err(EnvelopeError::UnsupportedContentType(ct.to_string()));
        }
    }
    let attributes = decode_attributes(record, entity_id);
    let Some(bytes) = &record.value else {
        return attributes;
    };
    let text = payload_text(bytes)?;
    // A payload error is reported before an attribute error (the order `decode` always had).
    let mut event = match attributes {
        Ok(event) => event,
        Err(e) => {
            parse_object(text)?;
            return Err(e);
        }
    };
    event.data = Some(match project(&event, text) {
        Some(map) => map,
        None => parse_object(text)?,
    });
    Ok(event)
}

/// The current time in milliseconds since the Unix epoch, the unit of event times.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Formats milliseconds since the epoch as RFC 3339 with millisecond precision (`ce_time`).
pub fn format_time(time_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(time_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn decode_key(record: &Record) -> Result<String, EnvelopeError> {
    let key = record.key.as_ref().ok_or(EnvelopeError::MissingKey)?;
    if key.is_empty() {
        return Err(EnvelopeError::EmptyKey);
    }
    std::str::from_utf8(key)
        .map(str::to_owned)
        .map_err(|_| EnvelopeError::KeyNotUtf8)
}

/// The attributes of a binary-mode (`ce_specversion` present) or plain record, `data` left
/// `None`.
fn decode_attributes(record: &Record, entity_id: String) -> Result<ContextEvent, EnvelopeError> {
    match header_str(record, "ce_specversion", "ce_specversion")? {
        Some(version) => {
            check_spec_version(version)?;
            let id = required_header(record, "ce_id")?;
            let source = required_header(record, "ce_source")?;
            let event_type = required_header(record, "ce_type")?;
            let time_ms = match header_str(record, "ce_time", "ce_time")? {
                Some(t) => parse_time("ce_time", t)?,
                None => record.timestamp_ms,
            };
            Ok(ContextEvent {
                id: id.to_string(),
                source: Some(source.to_string()),
                event_type: Some(event_type.to_string()),
                time_ms,
                entity_id,
                data: None,
                mode: EnvelopeMode::Binary,
            })
        }
        None => Ok(ContextEvent {
            id: format!("{}-{}-{}", record.topic, record.partition, record.offset),
            source: None,
            event_type: None,
            time_ms: record.timestamp_ms,
            entity_id,
            data: None,
            mode: EnvelopeMode::Plain,
        }),
    }
}

fn decode_structured(record: &Record, entity_id: String) -> Result<ContextEvent, EnvelopeError> {
    let Some(bytes) = &record.value else {
        // A structured tombstone has nothing to describe it; treat it like a plain delete.
        return Ok(ContextEvent {
            id: format!("{}-{}-{}", record.topic, record.partition, record.offset),
            source: None,
            event_type: None,
            time_ms: record.timestamp_ms,
            entity_id,
            data: None,
            mode: EnvelopeMode::Structured,
        });
    };
    let mut event = parse_object(payload_text(bytes)?)?;
    let version = attribute(&event, "specversion")?;
    check_spec_version(version)?;
    let id = attribute(&event, "id")?.to_string();
    let source = attribute(&event, "source")?.to_string();
    let event_type = attribute(&event, "type")?.to_string();
    let time_ms = match event.get("time") {
        None | Some(Value::Null) => record.timestamp_ms,
        Some(Value::String(t)) => parse_time("time", t)?,
        Some(other) => {
            return Err(EnvelopeError::WrongType {
                name: "time",
                expected: "an RFC 3339 string",
                found: json_kind(other),
            })
        }
    };
    if let Some(ct) = event.get("datacontenttype").and_then(Value::as_str) {
        if !is_json_media_type(media_type(ct)) {
            return Err(EnvelopeError::UnsupportedContentType(ct.to_string()));
        }
    }
    if event.contains_key("data_base64") {
        return Err(EnvelopeError::InvalidAttribute {
            name: "data_base64",
            reason: "binary data is not supported: context payloads must be JSON objects".into(),
        });
    }
    // `data` is optional in a CloudEvent: without it (or null) the event is about the
    // entity and carries no payload. Only a null record value is a tombstone.
    let data = match event.remove("data") {
        None | Some(Value::Null) => Some(Map::new()),
        Some(Value::Object(map)) => Some(map),
        Some(other) => return Err(EnvelopeError::NotAnObject(json_kind(&other))),
    };
    Ok(ContextEvent {
        id,
        source: Some(source),
        event_type: Some(event_type),
        time_ms,
        entity_id,
        data,
        mode: EnvelopeMode::Structured,
    })
}

fn payload_text(bytes: &[u8]) -> Result<&str, EnvelopeError> {
    std::str::from_utf8(bytes).map_err(|e| EnvelopeError::ValueNotUtf8(e.to_string()))
}

fn parse_object(text: &str) -> Result<Map<String, Value>, EnvelopeError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(EnvelopeError::NotAnObject(json_kind(&other))),
        Err(e) => Err(EnvelopeError::InvalidJson(e.to_string())),
    }
}

fn attribute<'a>(
    event: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, EnvelopeError> {
    match event.get(name) {
        None | Some(Value::Null) => Err(EnvelopeError::MissingAttribute(name)),
        Some(Value::String(s)) if s.is_empty() => Err(EnvelopeError::InvalidAttribute {
            name,
            reason: "must not be empty".into(),
        }),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(EnvelopeError::WrongType {
            name,
            expected: "a string",
            found: json_kind(other),
        }),
    }
}

fn header_str<'a>(
    record: &'a Record,
    key: &str,
    name: &'static str,
) -> Result<Option<&'a str>, EnvelopeError> {
    match record.header(key) {
        None => Ok(None),
        Some(bytes) => {
            std::str::from_utf8(bytes)
                .map(Some)
                .map_err(|_| EnvelopeError::InvalidAttribute {
                    name,
                    reason: "header value is not UTF-8".into(),
                })
        }
    }
}

fn required_header<'a>(record: &'a Record, name: &'static str) -> Result<&'a str, EnvelopeError> {
    match header_str(record, name, name)? {
        None => Err(EnvelopeError::MissingAttribute(name)),
        Some("") => Err(EnvelopeError::InvalidAttribute {
            name,
            reason: "must not be empty".into(),
        }),
        Some(v) => Ok(v),
    }
}

fn check_spec_version(version: &str) -> Result<(), EnvelopeError> {
    if version == SPEC_VERSION {
        Ok(())
    } else {
        Err(EnvelopeError::UnsupportedSpecVersion(version.to_string()))
    }
}

fn parse_time(name: &'static str, text: &str) -> Result<i64, EnvelopeError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| EnvelopeError::InvalidAttribute {
            name,
            reason: format!("{text:?} is not RFC 3339: {e}"),
        })
}

/// `application/json; charset=utf-8` -> `application/json`.
fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

fn is_json_media_type(media: &str) -> bool {
    let suffix = media.len().checked_sub(5).map(|at| &media.as_bytes()[at..]);
    media.eq_ignore_ascii_case("application/json")
        || media.eq_ignore_ascii_case("text/json")
        || suffix.is_some_and(|s| s.eq_ignore_ascii_case(b"+json"))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;

/// The byte format of the fuzz corpus (`fuzz/corpus/`), shared by the fuzz targets and the
/// stable test that runs the corpus in CI, so that both read a corpus file the same way.
pub mod fuzzing {
    use bytes::Bytes;

    use crate::record::{Header, Record};

    /// Separates the parts of a corpus input (never part of valid UTF-8).
    pub const SEPARATOR: u8 = 0xFF;
    /// A key part of exactly this byte means "no key".
    pub const NO_KEY: u8 = 0xFE;

    /// Reads `key 0xFF value [0xFF name=value]...` as a record of `context.customers`,
    /// partition 0, offset 7: a key of the single byte `0xFE` is no key, a missing value part
    /// is a null value (a tombstone), a header part without `=` has a null value.
    pub fn record_from_bytes(data: &[u8]) -> Record {
        let mut parts = data.split(|b| *b == SEPARATOR);
        let key = match parts.next() {
            Some([NO_KEY]) | None => None,
            Some(k) => Some(Bytes::copy_from_slice(k)),
        };
        let value = parts.next().map(Bytes::copy_from_slice);
        let headers = parts
            .map(|h| match h.iter().position(|b| *b == b'=') {
                Some(eq) => Header {
                    key: String::from_utf8_lossy(&h[..eq]).into_owned(),
                    value: Some(Bytes::copy_from_slice(&h[eq + 1..])),
                },
                None => Header {
                    key: String::from_utf8_lossy(h).into_owned(),
                    value: None,
                },
            })
            .collect();
        Record {
            topic: "context.customers".into(),
            partition: 0,
            offset: 7,
            timestamp_ms: 1_700_000_000_000,
            key,
            value,
            headers,
        }
    }
}
