//! The context document: an entity with its related entities, assembled for an AI consumer.
//!
//! A lookup builds one of these per request, so its shape is chosen for cheap assembly: an
//! event usually sets several fields of an entity, and the provenance of those fields is one
//! [`ProvenanceView`] shared through an [`Arc`] (built, event time formatted, once per event
//! and document) rather than a copy per field.
//!
//! The structs are declared with their fields in **key order** and serialize through the
//! derived `Serialize`: the API's JSON has always had sorted keys (it used to be built through
//! `serde_json::Value`, whose objects are sorted maps), and serializing the document directly
//! must give the same bytes. `serializes_with_sorted_keys` checks that.

use std::collections::BTreeMap;
use std::sync::Arc;

use kontext_core::envelope::format_time;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::model::{EntityDoc, Provenance};

/// An entity's assembled context, as `GET /v1/context/{type}/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContextDocument {
    /// The newest event applied to this entity.
    pub as_of: Arc<ProvenanceView>,
    /// Entities this one belongs to (an order's customer), by entity type.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub belongs_to: BTreeMap<String, Arc<RelatedEntity>>,
    pub entity_id: String,
    pub entity_type: String,
    /// How many log records shaped this entity.
    pub events_applied: u64,
    /// Canonical fields, latest value each.
    pub fields: Map<String, Value>,
    /// Per field: the event it came from (fields set by one event share one view).
    pub provenance: BTreeMap<String, Arc<ProvenanceView>>,
    /// Entities that belong to this one (a customer's orders), newest first, bounded by each
    /// type's `related_limit`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub related: BTreeMap<String, RelatedList>,
    /// `as_of` event time in milliseconds, for staleness computations.
    #[serde(skip)]
    pub as_of_ms: i64,
}

/// A bounded list of related entities.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelatedList {
    /// Shared: the embedded store reuses the decoded entity across the documents that show it
    /// while its stored bytes are unchanged.
    pub items: Vec<Arc<RelatedEntity>>,
    /// How many exist in all; `items` holds the newest `related_limit` of them.
    pub total: usize,
}

/// A related entity, with provenance per field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelatedEntity {
    pub entity_id: String,
    pub fields: Map<String, Value>,
    pub provenance: BTreeMap<String, Arc<ProvenanceView>>,
}

/// [`Provenance`] with the event time as RFC 3339, for readers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProvenanceView {
    pub event_id: String,
    pub event_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    pub offset: i64,
    pub partition: i32,
    pub source: String,
    pub topic: String,
}

impl From<&Provenance> for ProvenanceView {
    fn from(p: &Provenance) -> Self {
        Self::from(p.clone())
    }
}

impl From<Provenance> for ProvenanceView {
    fn from(p: Provenance) -> Self {
        Self {
            event_time: format_time(p.event_time_ms),
            source: p.source,
            event_id: p.event_id,
            event_type: p.event_type,
            topic: p.topic,
            partition: p.partition,
            offset: p.offset,
        }
    }
}

/// What a context shows of one stored entity: its fields with their (shared) provenance. The
/// embedded store decodes it straight from the stored bytes
/// ([`crate::embedded`]'s `codec::decode_view`); other stores convert an [`EntityDoc`].
#[derive(Debug, PartialEq)]
pub(crate) struct EntityView {
    pub entity_id: String,
    pub fields: Map<String, Value>,
    pub provenance: BTreeMap<String, Arc<ProvenanceView>>,
    pub events_applied: u64,
    pub latest: Arc<ProvenanceView>,
    pub latest_ms: i64,
}

impl EntityView {
    pub(crate) fn from_doc(doc: &EntityDoc) -> Self {
        let mut views = Views::default();
        let provenance = doc
            .fields
            .iter()
            .map(|(k, f)| (k.clone(), views.get(&f.provenance)))
            .collect();
        EntityView {
            entity_id: doc.entity_id.clone(),
            fields: doc.values(),
            provenance,
            events_applied: doc.events_applied,
            latest: views.get(&doc.latest),
            latest_ms: doc.latest.event_time_ms,
        }
    }

    /// The entity as a related entity of another one's context.
    pub(crate) fn into_related(self) -> RelatedEntity {
        RelatedEntity {
            entity_id: self.entity_id,
            fields: self.fields,
            provenance: self.provenance,
        }
    }
}

impl RelatedEntity {
    /// An entity as a related entity of another one's context.
    pub(crate) fn from_doc(doc: &EntityDoc) -> Self {
        EntityView::from_doc(doc).into_related()
    }
}

impl ContextDocument {
    /// The document of `doc` with its parents and related lists, as every store assembles it.
    pub(crate) fn assemble(
        doc: &EntityDoc,
        belongs_to: BTreeMap<String, Arc<RelatedEntity>>,
        related: BTreeMap<String, RelatedList>,
    ) -> Self {
        Self::from_view(
            &doc.entity_type,
            EntityView::from_doc(doc),
            belongs_to,
            related,
        )
    }

    pub(crate) fn from_view(
        entity_type: &str,
        view: EntityView,
        belongs_to: BTreeMap<String, Arc<RelatedEntity>>,
        related: BTreeMap<String, RelatedList>,
    ) -> Self {
        ContextDocument {
            as_of: view.latest,
            belongs_to,
            entity_id: view.entity_id,
            entity_type: entity_type.to_string(),
            events_applied: view.events_applied,
            fields: view.fields,
            provenance: view.provenance,
            related,
            as_of_ms: view.latest_ms,
        }
    }

    /// The document's own entity, moved out (what [`ContextDocument::from_view`] built it
    /// from), leaving its parents and related lists.
    pub(crate) fn take_view(&mut self) -> EntityView {
        EntityView {
            entity_id: std::mem::take(&mut self.entity_id),
            fields: std::mem::take(&mut self.fields),
            provenance: std::mem::take(&mut self.provenance),
            events_applied: self.events_applied,
            latest: Arc::clone(&self.as_of),
            latest_ms: self.as_of_ms,
        }
    }
}

/// The views of the distinct provenances of one document, so equal ones are built once.
#[derive(Default)]
struct Views<'a>(Vec<(&'a Provenance, Arc<ProvenanceView>)>);

impl<'a> Views<'a> {
    fn get(&mut self, p: &'a Provenance) -> Arc<ProvenanceView> {
        // A document holds a handful of distinct events: a scan beats hashing them, and fields
        // that share one `Arc<Provenance>` match on the pointer.
        if let Some((_, view)) = self.0.iter().find(|(q, _)| std::ptr::eq(*q, p) || *q == p) {
            return Arc::clone(view);
        }
        let view = Arc::new(ProvenanceView::from(p));
        self.0.push((p, Arc::clone(&view)));
        view
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn view(i: u8, event_type: bool) -> Arc<ProvenanceView> {
        Arc::new(ProvenanceView::from(Provenance {
            source: format!("src\"{i}"),
            event_id: format!("e-{i}"),
            event_type: event_type.then(|| format!("t.{i}")),
            topic: "context.x".into(),
            partition: i32::from(i) - 3,
            offset: i64::from(i) * 1_000_003,
            event_time_ms: 1_764_072_000_000 + i64::from(i),
        }))
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            "[a-z\"\\\n\u{1}é🚀]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn fields() -> impl Strategy<Value = (Map<String, Value>, BTreeMap<String, Arc<ProvenanceView>>)>
    {
        prop::collection::btree_map("[a-z_]{1,8}", (value(), 0u8..4, any::<bool>()), 0..6).prop_map(
            |m| {
                let mut fields = Map::new();
                let mut provenance = BTreeMap::new();
                for (k, (v, i, t)) in m {
                    fields.insert(k.clone(), v);
                    provenance.insert(k, view(i, t));
                }
                (fields, provenance)
            },
        )
    }

    fn entity() -> impl Strategy<Value = Arc<RelatedEntity>> {
        ("[A-Z0-9-]{1,6}", fields()).prop_map(|(entity_id, (fields, provenance))| {
            Arc::new(RelatedEntity {
                entity_id,
                fields,
                provenance,
            })
        })
    }

    fn document() -> impl Strategy<Value = ContextDocument> {
        (
            fields(),
            prop::collection::btree_map("[a-z]{1,6}", entity(), 0..2),
            prop::collection::btree_map(
                "[a-z]{1,6}",
                (prop::collection::vec(entity(), 0..3), 0usize..100),
                0..3,
            ),
            any::<u64>(),
        )
            .prop_map(
                |((fields, provenance), belongs_to, related, events_applied)| ContextDocument {
                    as_of: view(9, true),
                    belongs_to,
                    entity_id: "C-1".into(),
                    entity_type: "customer".into(),
                    events_applied,
                    fields,
                    provenance,
                    related: related
                        .into_iter()
                        .map(|(t, (items, total))| (t, RelatedList { items, total }))
                        .collect(),
                    as_of_ms: 0,
                },
            )
    }

    proptest! {
        /// The API serves documents serialized directly; they must be the bytes they were when
        /// they went through `serde_json::Value` (sorted keys, same numbers and escapes).
        #[test]
        fn serializes_with_sorted_keys(doc in document()) {
            let direct = serde_json::to_string(&doc).unwrap();
            let through_value = serde_json::to_value(&doc).unwrap().to_string();
            prop_assert_eq!(direct, through_value);
        }
    }

    #[test]
    fn fields_of_one_event_share_one_provenance_view() {
        let p = |offset| Provenance {
            source: "crm".into(),
            event_id: format!("e-{offset}"),
            event_type: None,
            topic: "t".into(),
            partition: 0,
            offset,
            event_time_ms: offset,
        };
        let mut fields = BTreeMap::new();
        for (name, offset) in [("a", 1), ("b", 2), ("c", 1)] {
            fields.insert(
                name.to_string(),
                crate::FieldEntry {
                    value: json!(name),
                    provenance: Arc::new(p(offset)),
                },
            );
        }
        let doc = EntityDoc {
            entity_type: "customer".into(),
            entity_id: "C-1".into(),
            fields,
            events_applied: 3,
            latest: Arc::new(p(2)),
        };
        let v = EntityView::from_doc(&doc);
        assert!(Arc::ptr_eq(&v.provenance["a"], &v.provenance["c"]));
        assert!(Arc::ptr_eq(&v.provenance["b"], &v.latest));
        assert!(!Arc::ptr_eq(&v.provenance["a"], &v.provenance["b"]));
        assert_eq!(*v.provenance["a"], ProvenanceView::from(&p(1)));
        assert_eq!(v.latest.event_time, "1970-01-01T00:00:00.002Z");
    }
}
