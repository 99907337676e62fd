use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use kontext_core::config::PipelineConfig;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where a value came from: the event and its place in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// `ce_source`, or the name of the source that matched the record.
    pub source: String,
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Event time, milliseconds since the Unix epoch.
    pub event_time_ms: i64,
}

impl Provenance {
    /// The write version of this event.
    pub fn version(&self) -> Version<'_> {
        Version {
            event_time_ms: self.event_time_ms,
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// Orders writes to one field: last event time wins; ties are broken by log coordinates, so
/// the order is total and every replay, in any order, picks the same winner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version<'a> {
    pub event_time_ms: i64,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// One field of an entity: its latest value and where it came from.
///
/// An event usually sets several fields: they share its provenance (an [`Arc`]) instead of a
/// copy each, in memory as in the stored record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldEntry {
    pub value: Value,
    pub provenance: Arc<Provenance>,
}

/// What the store keeps per entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityDoc {
    pub entity_type: String,
    pub entity_id: String,
    pub fields: BTreeMap<String, FieldEntry>,
    /// Log records applied to this entity, each exactly once.
    pub events_applied: u64,
    /// The newest event applied (by version).
    pub latest: Arc<Provenance>,
}

impl EntityDoc {
    /// Field values without provenance.
    pub fn values(&self) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(k, f)| (k.clone(), f.value.clone()))
            .collect()
    }
}

/// What an event does to an entity.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Set these canonical fields (others keep their values).
    Upsert(Map<String, Value>),
    /// Remove the entity (a tombstone).
    Delete,
}

/// One normalized event, ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityUpdate {
    pub entity_type: String,
    pub entity_id: String,
    pub change: Change,
    pub provenance: Provenance,
}

/// `related_limit` of a child type the schema does not mention.
const DEFAULT_RELATED_LIMIT: usize = 10;

/// The relations the store maintains, from the pipeline's entity declarations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSchema {
    /// entity type -> (parent type, canonical field holding the parent id)
    pub belongs_to: BTreeMap<String, Vec<(String, String)>>,
    /// entity type -> how many recent records a parent's context lists
    pub related_limit: BTreeMap<String, usize>,
}

impl StoreSchema {
    pub fn from_config(config: &PipelineConfig) -> Self {
        let mut schema = StoreSchema::default();
        for (name, entity) in &config.entities {
            let parents = entity
                .belongs_to
                .iter()
                .map(|(p, f)| (p.clone(), f.clone()))
                .collect();
            schema.belongs_to.insert(name.clone(), parents);
            schema
                .related_limit
                .insert(name.clone(), entity.related_limit);
        }
        schema
    }

    /// How many of its newest `child_type` children a parent's context lists.
    pub fn related_limit_of(&self, child_type: &str) -> usize {
        self.related_limit
            .get(child_type)
            .copied()
            .unwrap_or(DEFAULT_RELATED_LIMIT)
    }

    /// Entity types that belong to `parent`, with the field that points at it.
    pub fn children_of<'a>(
        &'a self,
        parent: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.belongs_to.iter().flat_map(move |(child, parents)| {
            parents
                .iter()
                .filter(move |(p, _)| p == parent)
                .map(move |(_, field)| (child.as_str(), field.as_str()))
        })
    }

    pub fn parents_of(&self, child: &str) -> &[(String, String)] {
        self.belongs_to.get(child).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Applies an upsert to a document, field by field, keeping the newer version of each (the
/// fields it sets share `provenance`). Returns whether anything changed.
pub(crate) fn merge_fields(
    doc: &mut EntityDoc,
    fields: &Map<String, Value>,
    provenance: &Arc<Provenance>,
) -> bool {
    let mut changed = false;
    for (name, value) in fields {
        let newer = match doc.fields.get(name) {
            None => true,
            Some(existing) => {
                provenance.version().cmp(&existing.provenance.version()) == Ordering::Greater
            }
        };
        if newer {
            let entry = FieldEntry {
                value: value.clone(),
                provenance: Arc::clone(provenance),
            };
            match doc.fields.get_mut(name) {
                // No new key String for a field the document has.
                Some(existing) => *existing = entry,
                None => {
                    doc.fields.insert(name.clone(), entry);
                }
            }
            changed = true;
        }
    }
    if provenance.version() > doc.latest.version() {
        doc.latest = Arc::clone(provenance);
    }
    changed
}
