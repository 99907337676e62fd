//! Routing, filtering and normalization: a record in, an [`EntityUpdate`] (or a reason) out.
//!
//! Field paths are split once when the pipeline starts; the hot path only walks JSON maps.

use std::collections::BTreeMap;

use kontext_core::config::{Condition, PipelineConfig};
use kontext_core::envelope::{self, ContextEvent, EnvelopeError};
use kontext_core::record::Record;
use kontext_store::{Change, EntityUpdate, Provenance};
use serde_json::{Map, Value};

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
    #[error("no source on topic {topic:?} matches ce_source {ce_source:?}; declare one in the pipeline file")]
    NoSource {
        topic: String,
        ce_source: Option<String>,
    },
}

impl ProcessError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ProcessError::Envelope(e) => e.kind(),
            ProcessError::NoSource { .. } => "no_source",
        }
    }
}

/// The pipeline's sources, compiled for the hot path.
#[derive(Debug, Clone)]
pub struct Router {
    /// topic -> sources writing to it
    topics: BTreeMap<String, TopicSources>,
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
    key_field: String,
    fields: Vec<(String, Vec<String>)>,
    drop_if: Vec<CompiledCondition>,
}

#[derive(Debug, Clone)]
struct CompiledCondition {
    target: Target,
    test: Test,
}

#[derive(Debug, Clone)]
enum Target {
    EventType,
    EventSource,
    Path(Vec<String>),
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
                .map(|e| e.key.clone())
                .unwrap_or_default();
            let compiled = CompiledSource {
                name: name.clone(),
                entity_type: source.entity.clone(),
                key_field,
                fields: source
                    .fields
                    .iter()
                    .map(|(canonical, path)| (canonical.clone(), split_path(path)))
                    .collect(),
                drop_if: source
                    .filter
                    .iter()
                    .flat_map(|f| f.drop_if.iter())
                    .map(compile_condition)
                    .collect(),
            };
            let entry = topics.entry(source.topic.clone()).or_default();
            match &source.matcher {
                Some(m) => {
                    entry.by_ce_source.insert(m.ce_source.clone(), compiled);
                }
                None => entry.fallback = Some(compiled),
            }
        }
        Self { topics }
    }

    /// Processes one record.
    pub fn process(&self, record: &Record) -> Outcome {
        let event = match envelope::decode(record) {
            Ok(e) => e,
            Err(e) => return Outcome::Invalid(e.into()),
        };
        let sources = self.topics.get(record.topic.as_ref());
        let source = sources.and_then(|s| {
            event
                .source
                .as_deref()
                .and_then(|cs| s.by_ce_source.get(cs))
                .or(s.fallback.as_ref())
        });
        let Some(source) = source else {
            return Outcome::Invalid(ProcessError::NoSource {
                topic: record.topic.to_string(),
                ce_source: event.source,
            });
        };
        if let Some(data) = &event.data {
            if source.drop_if.iter().any(|c| c.holds(&event, data)) {
                return Outcome::Filtered {
                    source: source.name.clone(),
                };
            }
        }
        let change = match &event.data {
            None => Change::Delete,
            Some(data) => Change::Upsert(source.normalize(data, &event.entity_id)),
        };
        Outcome::Update(EntityUpdate {
            entity_type: source.entity_type.clone(),
            entity_id: event.entity_id.clone(),
            change,
            provenance: Provenance {
                source: event.source.clone().unwrap_or_else(|| source.name.clone()),
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

impl CompiledSource {
    /// Maps source fields into canonical names. Absent fields are left out (the entity keeps
    /// its current value); the key field always carries the entity id.
    fn normalize(&self, data: &Map<String, Value>, entity_id: &str) -> Map<String, Value> {
        let mut out = Map::with_capacity(self.fields.len() + 1);
        for (canonical, path) in &self.fields {
            if let Some(v) = lookup(data, path) {
                out.insert(canonical.clone(), v.clone());
            }
        }
        if !self.key_field.is_empty() {
            out.insert(self.key_field.clone(), Value::String(entity_id.to_string()));
        }
        out
    }
}

impl CompiledCondition {
    fn holds(&self, event: &ContextEvent, data: &Map<String, Value>) -> bool {
        let found: Option<Value> = match &self.target {
            Target::EventType => event.event_type.clone().map(Value::String),
            Target::EventSource => event.source.clone().map(Value::String),
            Target::Path(path) => lookup(data, path).cloned(),
        };
        match &self.test {
            Test::Exists(want) => found.is_some() == *want,
            Test::Equals(v) => found.as_ref() == Some(v),
            Test::OneOf(vs) => found.as_ref().is_some_and(|f| vs.contains(f)),
        }
    }
}

fn compile_condition(c: &Condition) -> CompiledCondition {
    let target = match c.field.as_str() {
        "@type" => Target::EventType,
        "@source" => Target::EventSource,
        path => Target::Path(split_path(path)),
    };
    // Validation guarantees exactly one test is set.
    let test = if let Some(v) = &c.equals {
        Test::Equals(v.clone())
    } else if let Some(vs) = &c.one_of {
        Test::OneOf(vs.clone())
    } else {
        Test::Exists(c.exists.unwrap_or(true))
    };
    CompiledCondition { target, test }
}

fn split_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

fn lookup<'a>(data: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut current = data.get(first)?;
    for segment in rest {
        current = current.as_object()?.get(segment)?;
    }
    Some(current)
}

#[cfg(test)]
mod tests;
