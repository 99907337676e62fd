//! Routing, filtering and normalization: a record in, an [`EntityUpdate`] (or a reason) out.
//!
//! Everything is compiled once when the pipeline starts: field paths are split into segments
//! (the hot path only walks JSON maps), jq programs are compiled, coercions become an enum.
//! Path-only mappings never touch the jq interpreter; the first jq program a record needs
//! converts its payload to jq values, once, for all programs of its source (a record dropped
//! by a plain condition first never pays for it).
//!
//! A source with no jq program at all does not even parse its whole payload: the record is
//! routed on its attributes first, then the payload is parsed with a trie of the paths the
//! source reads (`normalize/project.rs`), keeping only their values; a payload that parse
//! rejects is parsed in full, so the error is the one the full parse gives.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use kontext_core::config::{Condition, FieldMapping, FieldType, PipelineConfig, FEATURES_SOURCE};
use kontext_core::envelope::{self, ContextEvent, EnvelopeError};
use kontext_core::jq::{JqInput, JqProgram};
use kontext_core::record::Record;
use kontext_store::{Change, EntityUpdate, Fields, Provenance};
use serde_json::{Map, Value};

use project::{Projection, SlotPath, Slots};

/// What processing did with one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A change for the store.
    Update(EntityUpdate),
    /// Dropped on purpose by the source's filter.
    Filtered { source: String },
    /// Not processable; the reason says why. Counted and logged with the record's coordinates.
    Invalid(ProcessError),
}

/// Why a record could not be processed. All variants are permanent (bad data or a record no
/// source claims): retrying the same bytes cannot succeed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("no source on topic {topic:?} matches {}; declare one in the pipeline file", match ce_source {
        Some(source) => format!("ce_source {source:?}"),
        None => "a record without ce_source".to_string(),
    })]
    NoSource {
        topic: String,
        ce_source: Option<String>,
    },
    /// The source's mapping or filter failed on this record.
    #[error(transparent)]
    Normalize(#[from] NormalizeError),
}

/// A mapping or filter of the pipeline file failed on one record. Permanent: the same record
/// fails the same way every time (mappings are pure functions of the event), so it goes to the
/// dead-letter topic. `at` is the config path of what failed (`sources.billing.fields.amount`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NormalizeError {
    /// A value could not be converted to the field's `type`.
    #[error("{at}: cannot convert {value} to {expected}")]
    Coercion {
        /// The mapping, as a config path.
        at: String,
        /// The offending value as JSON (shortened past 200 characters).
        value: String,
        /// The declared type.
        expected: FieldType,
    },
    /// A jq program (computed field or filter predicate) failed, or does not compile (only
    /// possible when the router was built from a configuration that was never validated).
    #[error("{at}: jq program {code:?} failed: {message}")]
    Jq {
        /// The field or condition, as a config path.
        at: String,
        /// The program.
        code: String,
        /// jq's error.
        message: String,
    },
}

impl NormalizeError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            NormalizeError::Coercion { .. } => "coercion_failed",
            NormalizeError::Jq { .. } => "jq_failed",
        }
    }
}

impl ProcessError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProcessError::Envelope(e) => e.kind(),
            ProcessError::NoSource { .. } => "no_source",
            ProcessError::Normalize(e) => e.kind(),
        }
    }

    /// Whether the same record could be processed on another try: never, since decoding,
    /// routing and mappings are pure functions of the record and the pipeline file. Listed
    /// per variant so that a new variant has to be classified (docs/failures.md).
    pub fn is_transient(&self) -> bool {
        match self {
            ProcessError::Envelope(e) => e.is_transient(),
            ProcessError::NoSource { .. } | ProcessError::Normalize(_) => false,
        }
    }
}

/// The pipeline's sources, compiled for the hot path.
#[derive(Debug, Clone)]
pub struct Router {
    /// topic -> sources writing to it
    topics: BTreeMap<String, TopicSources>,
    /// `limits.max_event_time_ahead` in milliseconds (`0`: none).
    max_time_ahead_ms: i64,
}

#[derive(Debug, Clone, Default)]
struct TopicSources {
    by_ce_source: BTreeMap<String, CompiledSource>,
    fallback: Option<CompiledSource>,
}

#[derive(Debug, Clone)]
struct CompiledSource {
    name: String,
    entity_type: String,
    /// The entity's key field (empty: none), shared by every update like the field names.
    key_field: Arc<str>,
    /// The index in `fields` before which the key field is added, so that every field is
    /// appended to the update's sorted fields (`fields.len()`: after them all).
    key_at: usize,
    /// In canonical name order.
    fields: Vec<CompiledField>,
    drop_if: Vec<CompiledCondition>,
    /// No field is computed by jq, so the payload is only read through paths and the record's
    /// payload can give its values away instead of being cloned (`FieldValue::Path::take`).
    paths_only: bool,
    /// The paths of a `paths_only` source without jq conditions: its payloads are parsed
    /// into slots holding only the values of these paths (`None`: parsed in full).
    projection: Option<Projection>,
}

/// A record's payload as jq input, converted on first use.
struct LazyJqInput<'a> {
    event: &'a ContextEvent,
    data: &'a Map<String, Value>,
    cell: OnceCell<JqInput>,
}

impl LazyJqInput<'_> {
    fn get(&self) -> &JqInput {
        self.cell.get_or_init(|| {
            JqInput::new(
                self.data,
                self.event.event_type.as_deref(),
                self.event.source.as_deref(),
            )
        })
    }
}

#[derive(Debug, Clone)]
struct CompiledField {
    /// Shared by every update of the source: cloning it is a reference count, not a copy.
    canonical: Arc<str>,
    value: FieldValue,
    coerce: Option<FieldType>,
    /// `sources.<name>.fields.<canonical>`, for errors.
    at: String,
}

#[derive(Debug, Clone)]
enum FieldValue {
    Path {
        path: PayloadPath,
        /// No later field reads this path, a path inside it or a path it is inside, so the
        /// value can be moved out of the payload instead of cloned (only in a `paths_only`
        /// source: a jq field would read the whole payload).
        take: bool,
    },
    Jq(Jq),
}

/// A compiled program, or why it does not compile (a router built from an unvalidated
/// configuration rejects the source's records instead of panicking).
#[derive(Debug, Clone)]
struct Jq {
    code: String,
    program: Result<JqProgram, String>,
}

#[derive(Debug, Clone)]
enum CompiledCondition {
    Test {
        target: Target,
        test: Test,
    },
    Jq {
        jq: Jq,
        /// `sources.<name>.filter.drop_if[i]`, for errors.
        at: String,
    },
}

#[derive(Debug, Clone)]
enum Target {
    EventType,
    EventSource,
    Path(PayloadPath),
}

/// A dotted path into the payload.
#[derive(Debug, Clone)]
struct PayloadPath {
    segments: Vec<String>,
    /// Where a projected parse keeps its value (set when the source is projected).
    slot: Option<SlotPath>,
}

/// A record's payload: parsed in full, or only the values of a projected source's paths.
enum Payload {
    Full(Map<String, Value>),
    Projected(Slots),
}

#[derive(Debug, Clone)]
enum Test {
    Equals(Value),
    OneOf(Vec<Value>),
    Exists(bool),
}

impl Router {
    /// Compiles the sources of a validated pipeline.
    pub fn new(config: &PipelineConfig) -> Self {
        let mut topics: BTreeMap<String, TopicSources> = BTreeMap::new();
        for (name, source) in &config.sources {
            let key_field = config
                .entities
                .get(&source.entity)
                .map(|e| Arc::from(e.key.as_str()))
                .unwrap_or_else(|| Arc::from(""));
            // The key field always carries the record's key: a mapping of it would be read,
            // converted (and could fail the record) only to be overwritten, so it is dropped.
            let mut fields: Vec<CompiledField> = source
                .fields
                .iter()
                .filter(|(canonical, _)| canonical.as_str() != &*key_field)
                .map(|(canonical, mapping)| {
                    compile_field(
                        &format!("sources.{name}.fields.{canonical}"),
                        canonical,
                        mapping,
                    )
                })
                .collect();
            let paths_only = mark_takeable_paths(&mut fields);
            let mut drop_if: Vec<CompiledCondition> = source
                .filter
                .iter()
                .flat_map(|f| f.drop_if.iter())
                .enumerate()
                .map(|(i, c)| compile_condition(&format!("sources.{name}.filter.drop_if[{i}]"), c))
                .collect();
            let projection = projection(paths_only, &mut fields, &mut drop_if);
            // Where the key sorts among the fields (they are in name order): there it is
            // appended like them.
            let key_at = fields.partition_point(|f| f.canonical < key_field);
            let compiled = CompiledSource {
                name: name.clone(),
                entity_type: source.entity.clone(),
                key_field,
                key_at,
                fields,
                drop_if,
                paths_only,
                projection,
            };
            let entry = topics.entry(source.topic.clone()).or_default();
            match &source.matcher {
                Some(m) => {
                    entry.by_ce_source.insert(m.ce_source.clone(), compiled);
                }
                None => entry.fallback = Some(compiled),
            }
        }
        Self {
            topics,
            max_time_ahead_ms: config.limits.max_event_time_ahead_ms(),
        }
    }

    /// The router parsing every payload in full, to check the projected parse against.
    #[cfg(test)]
    pub(crate) fn without_projection(mut self) -> Self {
        for topic in self.topics.values_mut() {
            for source in topic.by_ce_source.values_mut().chain(&mut topic.fallback) {
                source.projection = None;
            }
        }
        self
    }

    /// Processes one record.
    pub fn process(&self, record: &Record) -> Outcome {
        // Routing needs the attributes only, so the source is known before the payload is
        // parsed and a projected source parses only the paths it reads.
        let mut routed = None;
        let mut projected = None;
        let decoded = envelope::decode_projected(record, |event, text| {
            let source = self.route(record, event);
            routed = Some(source);
            projected = source?.projection.as_ref()?.parse(text);
            // The values are in `projected`: an empty map (no allocation) stands for them.
            projected.as_ref().map(|_| Map::new())
        });
        let mut event = match decoded {
            Ok(e) => e,
            Err(e) => return Outcome::Invalid(e.into()),
        };
        if let Err(e) = envelope::check_time(&event, record, self.max_time_ahead_ms) {
            return Outcome::Invalid(e.into());
        }
        let source = routed.unwrap_or_else(|| self.route(record, &event));
        let Some(source) = source else {
            return Outcome::Invalid(ProcessError::NoSource {
                topic: record.topic.to_string(),
                ce_source: event.source,
            });
        };
        let change = match event.data.take() {
            None => Change::Delete,
            Some(data) => {
                let mut payload = match projected {
                    Some(slots) => Payload::Projected(slots),
                    None => Payload::Full(data),
                };
                // A projected source has no jq program, so its jq input is never built.
                let no_map = Map::new();
                let jq_input = LazyJqInput {
                    event: &event,
                    data: match &payload {
                        Payload::Full(data) => data,
                        Payload::Projected(_) => &no_map,
                    },
                    cell: OnceCell::new(),
                };
                match source.filter(&event, &payload, &jq_input) {
                    Ok(false) => {}
                    Ok(true) => {
                        return Outcome::Filtered {
                            source: source.name.clone(),
                        }
                    }
                    Err(e) => return Outcome::Invalid(e.into()),
                }
                let fields = if source.paths_only {
                    drop(jq_input);
                    source.normalize_paths(&mut payload, &event.entity_id)
                } else {
                    source.normalize(&payload, &event.entity_id, &jq_input)
                };
                match fields {
                    Ok(fields) => Change::Upsert(fields),
                    Err(e) => return Outcome::Invalid(e.into()),
                }
            }
        };
        Outcome::Update(EntityUpdate {
            entity_type: source.entity_type.clone(),
            entity_id: event.entity_id,
            change,
            provenance: Provenance {
                source: event.source.unwrap_or_else(|| source.name.clone()),
                event_id: event.id,
                event_type: event.event_type,
                topic: record.topic.to_string(),
                partition: record.partition,
                offset: record.offset,
                event_time_ms: event.time_ms,
            },
        })
    }
}

impl Router {
    /// The source a decoded record belongs to.
    fn route(&self, record: &Record, event: &ContextEvent) -> Option<&CompiledSource> {
        let sources = self.topics.get(record.topic.as_ref())?;
        let routed = event
            .source
            .as_deref()
            .and_then(|cs| sources.by_ce_source.get(cs))
            .or(sources.fallback.as_ref());
        // A tombstone without `ce_source` (a plain one, or a structured event's: a null value
        // has no attributes) deletes by topic and key alone: every source of a topic maps one
        // entity type (validation), so any of them names it. Not on a features topic, whose
        // one source is kontext's own: a tombstone there would delete the whole entity.
        match routed {
            None if record.value.is_none() && event.source.is_none() => sources
                .by_ce_source
                .iter()
                .find(|(ce_source, _)| ce_source.as_str() != FEATURES_SOURCE)
                .map(|(_, source)| source),
            routed => routed,
        }
    }
}

impl CompiledSource {
    /// Whether any `drop_if` condition holds, in file order; a failing jq predicate fails the
    /// record unless an earlier condition already dropped it.
    fn filter(
        &self,
        event: &ContextEvent,
        payload: &Payload,
        jq_input: &LazyJqInput,
    ) -> Result<bool, NormalizeError> {
        for c in &self.drop_if {
            if c.holds(event, payload, jq_input)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Maps source fields into canonical names. Absent fields (and jq results that are
    /// `null` or empty) are left out, so the entity keeps its current value; the key field
    /// always carries the entity id.
    fn normalize(
        &self,
        payload: &Payload,
        entity_id: &str,
        jq_input: &LazyJqInput,
    ) -> Result<Fields, NormalizeError> {
        let mut out = Fields::with_capacity(self.fields.len() + 1);
        for (i, field) in self.fields.iter().enumerate() {
            self.put_key_at(i, &mut out, entity_id);
            let value = match &field.value {
                FieldValue::Path { path, .. } => match payload.get(path) {
                    Some(v) => v.clone(),
                    None => continue,
                },
                FieldValue::Jq(jq) => match jq.first(&field.at, jq_input)? {
                    Some(v) if !v.is_null() => v,
                    _ => continue,
                },
            };
            field.put(&mut out, value)?;
        }
        self.put_key_at(self.fields.len(), &mut out, entity_id);
        Ok(out)
    }

    /// [`Self::normalize`] for a `paths_only` source: the payload is consumed, values whose
    /// path no later field reads are moved out of it instead of cloned.
    fn normalize_paths(
        &self,
        payload: &mut Payload,
        entity_id: &str,
    ) -> Result<Fields, NormalizeError> {
        debug_assert!(self.paths_only);
        let mut out = Fields::with_capacity(self.fields.len() + 1);
        for (i, field) in self.fields.iter().enumerate() {
            self.put_key_at(i, &mut out, entity_id);
            let value = match &field.value {
                FieldValue::Path { path, take: true } => payload.take(path),
                FieldValue::Path { path, take: false } => payload.get(path).cloned(),
                // Never compiled into a `paths_only` source.
                FieldValue::Jq(_) => None,
            };
            if let Some(value) = value {
                field.put(&mut out, value)?;
            }
        }
        self.put_key_at(self.fields.len(), &mut out, entity_id);
        Ok(out)
    }

    /// Adds the key field if it goes before `fields[i]` (`i == fields.len()`: after them).
    fn put_key_at(&self, i: usize, out: &mut Fields, entity_id: &str) {
        if i == self.key_at && !self.key_field.is_empty() {
            out.insert(
                Arc::clone(&self.key_field),
                Value::String(entity_id.to_string()),
            );
        }
    }
}

impl CompiledField {
    /// Coerces the field's value if it has a `type`, then adds it to the output.
    fn put(&self, out: &mut Fields, value: Value) -> Result<(), NormalizeError> {
        let value = match self.coerce {
            None => value,
            Some(ty) => coerce::coerce(&value, ty).ok_or_else(|| NormalizeError::Coercion {
                at: self.at.clone(),
                value: coerce::shorten(&value),
                expected: ty,
            })?,
        };
        out.insert(Arc::clone(&self.canonical), value);
        Ok(())
    }
}

impl Jq {
    fn compile(code: &str) -> Self {
        Self {
            code: code.to_owned(),
            program: JqProgram::compile(code),
        }
    }

    fn error(&self, at: &str, message: String) -> NormalizeError {
        NormalizeError::Jq {
            at: at.to_owned(),
            code: self.code.clone(),
            message,
        }
    }

    fn program(&self, at: &str) -> Result<&JqProgram, NormalizeError> {
        self.program
            .as_ref()
            .map_err(|e| self.error(at, format!("does not compile: {e}")))
    }

    fn first(&self, at: &str, input: &LazyJqInput) -> Result<Option<Value>, NormalizeError> {
        let program = self.program(at)?;
        program.first(input.get()).map_err(|e| self.error(at, e.0))
    }

    fn holds(&self, at: &str, input: &LazyJqInput) -> Result<bool, NormalizeError> {
        let program = self.program(at)?;
        program.holds(input.get()).map_err(|e| self.error(at, e.0))
    }
}

impl CompiledCondition {
    fn holds(
        &self,
        event: &ContextEvent,
        payload: &Payload,
        jq_input: &LazyJqInput,
    ) -> Result<bool, NormalizeError> {
        let (target, test) = match self {
            CompiledCondition::Jq { jq, at } => return jq.holds(at, jq_input),
            CompiledCondition::Test { target, test } => (target, test),
        };
        let attribute = match target {
            Target::EventType => event.event_type.as_deref(),
            Target::EventSource => event.source.as_deref(),
            Target::Path(path) => return Ok(test.holds(payload.get(path))),
        };
        // Compared as strings, without building a JSON string per record.
        let is = |v: &Value| attribute.is_some() && v.as_str() == attribute;
        Ok(match test {
            Test::Exists(want) => attribute.is_some() == *want,
            Test::Equals(v) => is(v),
            Test::OneOf(vs) => vs.iter().any(is),
        })
    }
}

impl Test {
    fn holds(&self, found: Option<&Value>) -> bool {
        match self {
            Test::Exists(want) => found.is_some() == *want,
            Test::Equals(v) => found == Some(v),
            Test::OneOf(vs) => found.is_some_and(|f| vs.contains(f)),
        }
    }
}

fn compile_field(at: &str, canonical: &str, mapping: &FieldMapping) -> CompiledField {
    // Validation guarantees exactly one of path and jq; an unvalidated mapping with neither
    // gets a program that fails, so its records are rejected rather than silently emptied.
    let value = match (mapping.path(), mapping.jq()) {
        (Some(path), _) => FieldValue::Path {
            path: PayloadPath::new(path),
            take: false,
        },
        (None, Some(code)) => FieldValue::Jq(Jq::compile(code)),
        (None, None) => FieldValue::Jq(Jq {
            code: String::new(),
            program: Err("the mapping has neither `path` nor `jq`".into()),
        }),
    };
    CompiledField {
        canonical: Arc::from(canonical),
        value,
        coerce: mapping.coerce(),
        at: at.to_owned(),
    }
}

fn compile_condition(at: &str, c: &Condition) -> CompiledCondition {
    if let Some(code) = &c.jq {
        return CompiledCondition::Jq {
            jq: Jq::compile(code),
            at: at.to_owned(),
        };
    }
    let target = match c.field.as_deref().unwrap_or_default() {
        "@type" => Target::EventType,
        "@source" => Target::EventSource,
        path => Target::Path(PayloadPath::new(path)),
    };
    // Validation guarantees exactly one test is set.
    let test = if let Some(v) = &c.equals {
        Test::Equals(v.clone())
    } else if let Some(vs) = &c.one_of {
        Test::OneOf(vs.clone())
    } else {
        Test::Exists(c.exists.unwrap_or(true))
    };
    CompiledCondition::Test { target, test }
}

fn split_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

/// The trie of every payload path a source reads, if it reads the payload through paths only
/// (no jq field, no jq condition); sets each path's slot.
fn projection(
    paths_only: bool,
    fields: &mut [CompiledField],
    drop_if: &mut [CompiledCondition],
) -> Option<Projection> {
    if !paths_only
        || drop_if
            .iter()
            .any(|c| matches!(c, CompiledCondition::Jq { .. }))
    {
        return None;
    }
    let mut paths: Vec<&mut PayloadPath> = Vec::new();
    for c in drop_if {
        if let CompiledCondition::Test {
            target: Target::Path(path),
            ..
        } = c
        {
            paths.push(path);
        }
    }
    for f in fields {
        if let FieldValue::Path { path, .. } = &mut f.value {
            paths.push(path);
        }
    }
    let projection = Projection::new(paths.iter().map(|p| p.segments.as_slice()));
    for path in paths {
        // Every path is in the trie; one that were not would find nothing in the slots.
        path.slot = projection.slot(&path.segments);
    }
    Some(projection)
}

/// Decides which path fields of a source may move their value out of the payload
/// (`FieldValue::Path::take`); returns whether the source maps paths only.
fn mark_takeable_paths(fields: &mut [CompiledField]) -> bool {
    let paths_only = fields
        .iter()
        .all(|f| matches!(f.value, FieldValue::Path { .. }));
    if !paths_only {
        return false;
    }
    for i in 0..fields.len() {
        let (done, later) = fields.split_at_mut(i + 1);
        let overlaps = |segments: &[String]| {
            later.iter().any(|f| match &f.value {
                FieldValue::Path { path: other, .. } => {
                    let other = &other.segments;
                    let n = segments.len().min(other.len());
                    segments[..n] == other[..n]
                }
                FieldValue::Jq(_) => true,
            })
        };
        if let FieldValue::Path { path, take } = &mut done[i].value {
            *take = !overlaps(&path.segments);
        }
    }
    true
}

impl PayloadPath {
    fn new(dotted: &str) -> Self {
        Self {
            segments: split_path(dotted),
            slot: None,
        }
    }
}

impl Payload {
    fn get(&self, path: &PayloadPath) -> Option<&Value> {
        match self {
            Payload::Full(data) => {
                let (first, rest) = path.segments.split_first()?;
                descend(data.get(first)?, rest)
            }
            Payload::Projected(slots) => {
                let at = path.slot?;
                descend(slots.get(at.slot)?.as_ref()?, &path.segments[at.depth..])
            }
        }
    }

    /// Moves the value at `path` out of the payload. A full payload keeps `null` in its place
    /// (replacing is a lookup; removing it from the B-tree costs more than cloning a short
    /// string); nothing reads it afterwards.
    fn take(&mut self, path: &PayloadPath) -> Option<Value> {
        let (value, rest) = match self {
            Payload::Full(data) => {
                let (first, rest) = path.segments.split_first()?;
                (data.get_mut(first)?, rest)
            }
            Payload::Projected(slots) => {
                let at = path.slot?;
                let slot = slots.get_mut(at.slot)?;
                let rest = &path.segments[at.depth..];
                if rest.is_empty() {
                    return slot.take();
                }
                (slot.as_mut()?, rest)
            }
        };
        let mut current = value;
        for segment in rest {
            current = current.as_object_mut()?.get_mut(segment)?;
        }
        Some(std::mem::take(current))
    }
}

/// The value at `path` inside `value`.
fn descend<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut current = value;
    for segment in path {
        current = current.as_object()?.get(segment)?;
    }
    Some(current)
}

mod coerce;
mod project;
#[cfg(test)]
mod tests;
