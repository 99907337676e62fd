//! The context document: an entity with its related entities, assembled for an AI consumer.

use std::collections::BTreeMap;

use kontext_core::envelope::format_time;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::model::{EntityDoc, Provenance};
use crate::{EmbeddedStore, StoreError};

/// An entity's assembled context, as `GET /v1/context/{type}/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContextDocument {
    pub entity_type: String,
    pub entity_id: String,
    /// Canonical fields, latest value each.
    pub fields: Map<String, Value>,
    /// Per field: the event it came from.
    pub provenance: BTreeMap<String, ProvenanceView>,
    /// Entities this one belongs to (an order's customer), by entity type.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub belongs_to: BTreeMap<String, RelatedEntity>,
    /// Entities that belong to this one (a customer's orders), newest first, bounded by each
    /// type's `related_limit`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub related: BTreeMap<String, RelatedList>,
    /// The newest event applied to this entity.
    pub as_of: ProvenanceView,
    /// How many log records shaped this entity.
    pub events_applied: u64,
    /// `as_of` event time in milliseconds, for staleness computations.
    #[serde(skip)]
    pub as_of_ms: i64,
}

/// A bounded list of related entities.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelatedList {
    /// How many exist in all; `items` holds the newest `related_limit` of them.
    pub total: usize,
    pub items: Vec<RelatedEntity>,
}

/// A related entity, with provenance per field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelatedEntity {
    pub entity_id: String,
    pub fields: Map<String, Value>,
    pub provenance: BTreeMap<String, ProvenanceView>,
}

/// [`Provenance`] with the event time as RFC 3339, for readers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProvenanceView {
    pub source: String,
    pub event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_time: String,
}

impl From<&Provenance> for ProvenanceView {
    fn from(p: &Provenance) -> Self {
        Self {
            source: p.source.clone(),
            event_id: p.event_id.clone(),
            event_type: p.event_type.clone(),
            topic: p.topic.clone(),
            partition: p.partition,
            offset: p.offset,
            event_time: format_time(p.event_time_ms),
        }
    }
}

impl RelatedEntity {
    /// An entity as a related entity of another one's context.
    pub(crate) fn from_doc(doc: &EntityDoc) -> Self {
        Self {
            entity_id: doc.entity_id.clone(),
            fields: doc.values(),
            provenance: provenance_of(doc),
        }
    }
}

impl EmbeddedStore {
    /// Assembles the context of one entity; `None` if the store has never seen it.
    pub fn context(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<ContextDocument>, StoreError> {
        self.assemble_context(entity_type, entity_id)
    }
}

impl ContextDocument {
    /// The document of `doc` with its parents and related lists, as every store assembles it.
    pub(crate) fn assemble(
        doc: &EntityDoc,
        belongs_to: BTreeMap<String, RelatedEntity>,
        related: BTreeMap<String, RelatedList>,
    ) -> Self {
        ContextDocument {
            entity_type: doc.entity_type.clone(),
            entity_id: doc.entity_id.clone(),
            fields: doc.values(),
            provenance: provenance_of(doc),
            belongs_to,
            related,
            as_of: ProvenanceView::from(&doc.latest),
            events_applied: doc.events_applied,
            as_of_ms: doc.latest.event_time_ms,
        }
    }
}

fn provenance_of(doc: &EntityDoc) -> BTreeMap<String, ProvenanceView> {
    doc.fields
        .iter()
        .map(|(k, f)| (k.clone(), ProvenanceView::from(&f.provenance)))
        .collect()
}
