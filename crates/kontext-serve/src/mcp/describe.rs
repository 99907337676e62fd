//! What `describe_entity_types` tells an AI about the pipeline's entity types: how each is
//! identified, where its events flow, how types relate, and which canonical fields the sources
//! fill. Built once from the pipeline file; the tool adds a few example ids at call time.

use std::collections::{BTreeMap, BTreeSet};

use kontext_core::config::PipelineConfig;
use kontext_store::StoreSchema;
use serde::Serialize;

/// Descriptions of every entity type of one pipeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityCatalog {
    /// The pipeline's name, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    pub entity_types: Vec<EntityTypeDescription>,
}

/// One entity type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityTypeDescription {
    /// The name tools take as `entity_type` (`customer`).
    pub entity_type: String,
    /// The canonical field naming the id; record keys carry it (`customer_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The log topic carrying this type's events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Parents: this entity's `field` holds the id of a parent of `entity_type`.
    pub belongs_to: Vec<Relation>,
    /// Children: entities of `entity_type` whose `field` holds this entity's id. A context lists
    /// the newest `listed` of them under `related`.
    pub has_many: Vec<Relation>,
    /// Canonical field -> the source systems that fill it (a field several sources fill takes
    /// the newest event's value). The key field is filled by every source, from the record
    /// key.
    pub fields: BTreeMap<String, Vec<String>>,
    /// Source systems writing this type's events, as provenance names them: a source's
    /// `ce_source` when it matches by one (`kontext.features` for the computed features),
    /// else its name in the pipeline file.
    pub sources: Vec<String>,
}

/// A relation between two entity types, through a canonical field of the child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Relation {
    /// The other entity type.
    pub entity_type: String,
    /// The child's canonical field holding the parent id.
    pub field: String,
    /// For `has_many`: how many of the newest children a parent's context lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed: Option<usize>,
}

impl EntityCatalog {
    /// Everything the pipeline file says about its entity types.
    pub fn from_config(config: &PipelineConfig) -> Self {
        let entity_types = config
            .entities
            .iter()
            .map(|(name, entity)| {
                let mut fields: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                let mut sources = BTreeSet::new();
                for (source_name, source) in
                    config.sources.iter().filter(|(_, s)| &s.entity == name)
                {
                    let named = source
                        .matcher
                        .as_ref()
                        .map_or(source_name, |m| &m.ce_source);
                    sources.insert(named.clone());
                    for field in source.fields.keys() {
                        fields
                            .entry(field.clone())
                            .or_default()
                            .insert(named.clone());
                    }
                }
                fields.insert(entity.key.clone(), sources.clone());
                let fields = fields
                    .into_iter()
                    .map(|(field, by)| (field, by.into_iter().collect()))
                    .collect();
                let sources = sources.into_iter().collect();
                let belongs_to = entity
                    .belongs_to
                    .iter()
                    .map(|(parent, field)| Relation {
                        entity_type: parent.clone(),
                        field: field.clone(),
                        listed: None,
                    })
                    .collect();
                let has_many = config
                    .entities
                    .iter()
                    .flat_map(|(child, c)| {
                        c.belongs_to
                            .iter()
                            .filter(|(parent, _)| *parent == name)
                            .map(move |(_, field)| Relation {
                                entity_type: child.clone(),
                                field: field.clone(),
                                listed: Some(c.related_limit),
                            })
                    })
                    .collect();
                EntityTypeDescription {
                    entity_type: name.clone(),
                    key: Some(entity.key.clone()),
                    topic: Some(entity.topic.clone()),
                    belongs_to,
                    has_many,
                    fields,
                    sources,
                }
            })
            .collect();
        Self {
            pipeline: Some(config.name.clone()),
            entity_types,
        }
    }

    /// What can be said without the pipeline file: the type names and the relations the store
    /// maintains.
    pub fn from_schema(entity_types: &BTreeSet<String>, schema: &StoreSchema) -> Self {
        let entity_types = entity_types
            .iter()
            .map(|name| EntityTypeDescription {
                entity_type: name.clone(),
                key: None,
                topic: None,
                belongs_to: schema
                    .parents_of(name)
                    .iter()
                    .map(|(parent, field)| Relation {
                        entity_type: parent.clone(),
                        field: field.clone(),
                        listed: None,
                    })
                    .collect(),
                has_many: schema
                    .children_of(name)
                    .map(|(child, field)| Relation {
                        entity_type: child.to_string(),
                        field: field.to_string(),
                        listed: schema.related_limit.get(child).copied(),
                    })
                    .collect(),
                fields: BTreeMap::new(),
                sources: Vec::new(),
            })
            .collect();
        Self {
            pipeline: None,
            entity_types,
        }
    }
}
