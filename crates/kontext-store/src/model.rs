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

    /// [`Provenance::version`], owning its topic.
    pub(crate) fn owned_version(&self) -> OwnedVersion {
        (
            self.event_time_ms,
            self.topic.clone(),
            self.partition,
            self.offset,
        )
    }

    /// Whether this event is not newer than `version`: a tombstone of that version removes
    /// what the event wrote.
    pub(crate) fn not_newer_than(&self, version: &OwnedVersion) -> bool {
        let (time, topic, partition, offset) = version;
        (
            self.event_time_ms,
            self.topic.as_str(),
            self.partition,
            self.offset,
        ) <= (*time, topic.as_str(), *partition, *offset)
    }
}

/// A [`Version`] that owns its topic, `(event time, topic, partition, offset)`: what a store
/// keeps of a version to compare later ones with (an entity's latest, a tombstone's).
pub(crate) type OwnedVersion = (i64, String, i32, i64);

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
    /// Log records applied to this entity id, each exactly once: upserts and tombstones,
    /// across deletes (a count that does not depend on the order of arrival).
    pub events_applied: u64,
    /// The newest upsert applied (by version).
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
    Upsert(Fields),
    /// Remove the entity (a tombstone), versioned like a field: what is not newer than the
    /// event goes, and later-arriving older upserts stay out.
    Delete,
}

/// The canonical fields an upsert sets: sorted by name, each name once, as a
/// `Map<String, Value>` iterates them.
///
/// Names are [`Arc<str>`]: the normalizer shares one per canonical field of a source among all
/// of its updates, instead of allocating (and later freeing) a `String` per field per event;
/// and a short sorted `Vec` is cheaper to build and drop than a B-tree. Lookups are binary
/// searches. Build it with [`Fields::insert`], or collect it from `(name, value)` pairs or a
/// `Map` (a later duplicate replaces an earlier one, as in a map).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Vec<(Arc<str>, Value)>);

impl Fields {
    /// No fields.
    pub fn new() -> Self {
        Self::default()
    }

    /// No fields, with room for `capacity` of them.
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// Sets a field, replacing its value if the name is there. Names inserted in ascending
    /// order cost one comparison each.
    pub fn insert(&mut self, name: Arc<str>, value: Value) {
        match self.0.last() {
            Some((last, _)) if **last < *name => self.0.push((name, value)),
            None => self.0.push((name, value)),
            Some(_) => match self.0.binary_search_by(|(n, _)| (**n).cmp(&*name)) {
                Ok(at) => self.0[at].1 = value,
                Err(at) => self.0.insert(at, (name, value)),
            },
        }
    }

    /// The value of a field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|at| &self.0[at].1)
    }

    /// How many fields are set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fields in name order.
    pub fn iter(&self) -> FieldsIter<'_> {
        self.0.iter().map(entry_ref)
    }

    /// The names in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(|(n, _)| &**n)
    }

    /// The fields as a JSON object.
    pub fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(n, v)| (n.to_owned(), v.clone()))
            .collect()
    }
}

/// [`Fields::iter`].
pub type FieldsIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (Arc<str>, Value)>,
    fn(&'a (Arc<str>, Value)) -> (&'a str, &'a Value),
>;

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a str, &'a Value);
    type IntoIter = FieldsIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<N: Into<Arc<str>>> FromIterator<(N, Value)> for Fields {
    fn from_iter<I: IntoIterator<Item = (N, Value)>>(iter: I) -> Self {
        let mut fields = Fields::new();
        for (name, value) in iter {
            fields.insert(name.into(), value);
        }
        fields
    }
}

impl From<Map<String, Value>> for Fields {
    fn from(map: Map<String, Value>) -> Self {
        // A map iterates in name order: every insert appends.
        map.into_iter().collect()
    }
}

impl std::ops::Index<&str> for Fields {
    type Output = Value;

    /// The value of a field.
    ///
    /// # Panics
    /// If the field is not set, like `Map`'s index.
    fn index(&self, name: &str) -> &Value {
        match self.get(name) {
            Some(value) => value,
            None => panic!("no field {name:?}"),
        }
    }
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
/// The parent id a relation field's value names: a non-empty string, or a number written as
/// text (`"customer_id": 10042` names customer `10042`). Both stores read relations this way,
/// for the parent's related lists and for the child's `belongs_to` alike.
pub(crate) fn parent_id_of(value: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match value {
        Value::String(s) if !s.is_empty() => Some(std::borrow::Cow::Borrowed(s)),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        _ => None,
    }
}

pub(crate) fn merge_fields(
    doc: &mut EntityDoc,
    fields: &Fields,
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
                    doc.fields.insert(name.to_owned(), entry);
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

fn entry_ref((name, value): &(Arc<str>, Value)) -> (&str, &Value) {
    (name, value)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// `Fields` holds what a `Map` holds after the same inserts, in the same order (the
        /// store and the PostgreSQL plan iterate it), whatever order the names come in.
        #[test]
        fn fields_behave_like_a_map(
            inserts in prop::collection::vec(("[a-e]{0,3}", any::<i64>()), 0..24),
            lookups in prop::collection::vec("[a-e]{0,3}", 0..8),
        ) {
            let mut fields = Fields::new();
            let mut map = Map::new();
            for (name, n) in &inserts {
                fields.insert(Arc::from(name.as_str()), Value::from(*n));
                map.insert(name.clone(), Value::from(*n));
            }
            prop_assert_eq!(fields.len(), map.len());
            prop_assert_eq!(fields.is_empty(), map.is_empty());
            prop_assert!(fields.iter().eq(map.iter().map(|(k, v)| (k.as_str(), v))));
            prop_assert!(fields.keys().eq(map.keys().map(String::as_str)));
            for name in lookups.iter().chain(inserts.iter().map(|(n, _)| n)) {
                prop_assert_eq!(fields.get(name), map.get(name));
            }
            prop_assert_eq!(&fields.to_map(), &map);
            prop_assert_eq!(&Fields::from(map.clone()), &fields);
            let collected: Fields = inserts.iter().map(|(k, n)| (k.as_str(), Value::from(*n))).collect();
            prop_assert_eq!(collected, fields);
        }
    }
}
