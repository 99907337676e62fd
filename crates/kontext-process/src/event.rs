//! The input of every operator: a decoded context event with its log coordinates.

use std::sync::Arc;

use bytes::Bytes;

/// Where an input record sits in the log. Within one task (one input partition) offsets
/// increase in processing order, so they version everything the task derives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Coords {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

impl Coords {
    /// Coordinates of a record.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32, offset: i64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
        }
    }
}

/// The id of an [`Event::tick`]: `0xff` never occurs in UTF-8, and every event id the runtime
/// decodes is a string (`ce_id`, or topic-partition-offset).
pub const TICK_ID: &[u8] = b"\xfftick";

/// One event as the stateful operators see it: already decoded and normalized upstream
/// (`kontext-stream`), keyed by entity id, with its event time.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The record key (entity id); aggregation and joins by key group on it.
    pub key: Bytes,
    /// The event id (`ce_id`); deduplication is by this id.
    pub id: Bytes,
    /// Event time, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Input coordinates: the version of every output this event produces.
    pub coords: Coords,
    /// The normalized payload.
    pub value: serde_json::Value,
}

impl Event {
    /// A **tick**: no event, only the news that stream time reached `time_ms`, from the input
    /// at `coords`. [`crate::Aggregate`] admits it like an event (skipped below the store's
    /// offsets) and lets it move stream time, so a quiet input's sliding windows decay and its
    /// windows close, but adds it to no key. Its id is [`TICK_ID`], which is not UTF-8 and so
    /// no decoded event's id; its key is empty. Deduplication and joins do not take ticks.
    pub fn tick(time_ms: i64, coords: Coords) -> Self {
        Self {
            key: Bytes::new(),
            id: Bytes::from_static(TICK_ID),
            time_ms,
            coords,
            value: serde_json::Value::Null,
        }
    }

    /// Whether this is a [`Event::tick`].
    pub fn is_tick(&self) -> bool {
        self.id.as_ref() == TICK_ID
    }

    /// The scalar at `field` (a top-level field name, or a `.`-separated path), if present and
    /// a number, string or bool.
    pub fn scalar(&self, field: &FieldPath) -> Option<Scalar> {
        Scalar::from_json(field.lookup(&self.value)?)
    }
}

/// A field path compiled once (`"total"`, `"customer.id"`), so the hot path does no parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<String>,
}

impl std::fmt::Display for FieldPath {
    /// The `.`-separated path it was compiled from.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.segments.join("."))
    }
}

impl FieldPath {
    /// Compiles a `.`-separated path.
    pub fn new(path: &str) -> Self {
        Self {
            segments: path.split('.').map(str::to_owned).collect(),
        }
    }

    /// The value at this path in `value`.
    pub fn lookup<'a>(&self, value: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
        let mut current = value;
        for segment in &self.segments {
            current = current.as_object()?.get(segment)?;
        }
        Some(current)
    }

    /// The path as written.
    pub fn as_string(&self) -> String {
        self.segments.join(".")
    }
}

/// A scalar field value as aggregations consume it.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// Any JSON number (as f64), or a string that parses as one.
    Num(f64),
    /// A string (or a bool, as `"true"` / `"false"`).
    Text(String),
}

impl Scalar {
    /// Numbers stay numbers, bools and strings become text; null, arrays and objects are absent.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::Number(n) => n.as_f64().map(Scalar::Num),
            serde_json::Value::String(s) => Some(Scalar::Text(s.clone())),
            serde_json::Value::Bool(b) => Some(Scalar::Text(b.to_string())),
            _ => None,
        }
    }

    /// The numeric value: numbers, and strings holding a finite number (`"129.90"`; not
    /// `"NaN"`, `"inf"` or `"1e999"`, which Rust's parser accepts but no sum, min or max can
    /// recover from).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Num(n) => Some(*n),
            Scalar::Text(s) => s.trim().parse().ok().filter(|v: &f64| v.is_finite()),
        }
    }

    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Scalar::Num(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Scalar::Text(s) => serde_json::Value::String(s.clone()),
        }
    }
}
