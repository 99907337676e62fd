//! `joins:` in the pipeline file: stream-table enrichment joins. Each update of the `from`
//! entity that names a `with` entity (by a foreign key) is enriched with that entity's current
//! canonical fields, written into the `from` entity's context as new fields.
//!
//! ```yaml
//! joins:
//!   order_customer:          # names the join's state and changelog
//!     from: order            # the stream: the entity whose updates are enriched
//!     with: customer         # the table: this entity's current canonical fields
//!     key: customer_id       # canonical field of the order holding the customer's id
//!     kind: left             # left (default): unknown customer -> the fields are null
//!                            # inner: unknown customer -> no enrichment written
//!     fields:                # field of the order <- canonical field of the customer
//!       customer_tier: loyalty_tier
//!       customer_name: full_name
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{is_valid_name, PipelineConfig, FEATURES_SOURCE};

/// One enrichment join (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentConfig {
    /// The entity type whose updates are enriched (the stream).
    pub from: String,
    /// The entity type whose current fields enrich them (the table).
    pub with: String,
    /// Canonical field of a `from` update holding the `with` entity's id. Updates without it
    /// are not enriched (a partial update that does not name the customer keeps what an
    /// earlier one wrote).
    pub key: String,
    /// What an update whose `with` entity is unknown gets.
    #[serde(default)]
    pub kind: EnrichmentKind,
    /// The fields written into the `from` entity: new field name → canonical field of `with`.
    pub fields: BTreeMap<String, String>,
}

/// Left or inner join.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EnrichmentKind {
    /// Unknown `with` entity: the fields are written as `null` (the context says "not known
    /// when this update happened").
    #[default]
    Left,
    /// Unknown `with` entity: nothing is written.
    Inner,
}

impl EnrichmentConfig {
    /// The canonical fields of the `with` entity the join reads (its table keeps only these).
    pub fn table_fields(&self) -> impl Iterator<Item = &str> {
        self.fields.values().map(String::as_str)
    }
}

impl PipelineConfig {
    /// Whether the pipeline has a processor stage (features or joins).
    pub fn has_processing(&self) -> bool {
        !self.features.is_empty() || !self.joins.is_empty()
    }

    /// Checks `joins`: entity types exist, the key and fields are named, output fields do not
    /// shadow what a source or feature writes, names do not collide with features' state.
    pub(super) fn validate_joins(&self, err: &mut impl FnMut(String, String)) {
        let mut written: BTreeMap<(&str, &str), String> = BTreeMap::new();
        for (name, source) in &self.sources {
            for field in source.fields.keys() {
                written.insert(
                    (source.entity.as_str(), field.as_str()),
                    format!("source {name}"),
                );
            }
        }
        for (name, feature) in &self.features {
            written.insert(
                (feature.entity.as_str(), name.as_str()),
                format!("feature {name}"),
            );
        }
        for (name, join) in &self.joins {
            let at = format!("joins.{name}");
            if !is_valid_name(name) || name.contains('.') {
                err(
                    at.clone(),
                    "join names use only letters, digits, '_' and '-' (they name state directories and topics)"
                        .into(),
                );
            }
            if self
                .features
                .keys()
                .any(|f| f == name || format!("{f}-dedup") == *name)
            {
                err(
                    at.clone(),
                    "a feature has this name (their state and changelog would be shared): rename the join"
                        .into(),
                );
            }
            let reserved = format!("{FEATURES_SOURCE}.{}", join.from);
            if self.sources.contains_key(&reserved) {
                err(
                    format!("sources.{reserved}"),
                    "this source name is reserved for the joins and features of the entity: rename the source".into(),
                );
            }
            for (what, entity) in [("from", &join.from), ("with", &join.with)] {
                if !self.entities.contains_key(entity) {
                    err(
                        format!("{at}.{what}"),
                        format!(
                            "unknown entity type {entity:?}; declared: {}",
                            self.entity_names()
                        ),
                    );
                }
            }
            if join.key.trim().is_empty() {
                err(
                    format!("{at}.key"),
                    format!(
                        "name the canonical field of a {} holding the {}'s id, e.g. `{}_id`",
                        join.from, join.with, join.with
                    ),
                );
            }
            self.check_canonical(err, format!("{at}.key"), &join.from, &join.key);
            if join.fields.is_empty() {
                err(
                    format!("{at}.fields"),
                    format!(
                        "name at least one field to copy, as `new_field: <canonical field of {}>`",
                        join.with
                    ),
                );
            }
            for (field, from) in &join.fields {
                let at = format!("{at}.fields.{field}");
                if !is_valid_name(field) || field.contains('.') {
                    err(
                        at.clone(),
                        "field names use only letters, digits, '_' and '-'".into(),
                    );
                }
                if from.trim().is_empty() {
                    err(
                        at.clone(),
                        format!("name the canonical field of {} to copy", join.with),
                    );
                }
                self.check_canonical(err, at.clone(), &join.with, from);
                let slot = (join.from.as_str(), field.as_str());
                if let Some(writer) = written.get(&slot) {
                    err(
                        at,
                        format!(
                            "{writer} already writes the field {field:?} of {}: rename it here",
                            join.from
                        ),
                    );
                } else {
                    written.insert(slot, format!("join {name}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name: p
entities:
  customer: { key: customer_id, topic: context.customers }
  order: { key: order_id, topic: context.orders }
sources:
  shop: { topic: context.orders, entity: order, fields: { customer_id: c, total: t } }
  crm: { topic: context.customers, entity: customer, fields: { tier: t } }
features:
  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d }
"#;

    #[test]
    fn a_join_adds_its_fields_to_the_built_in_source_of_the_stream_entity() {
        let yaml = format!(
            "{BASE}joins:\n  order_customer: {{ from: order, with: customer, key: customer_id, fields: {{ customer_tier: tier }} }}\n"
        );
        let config = PipelineConfig::parse("p.yaml", &yaml).unwrap();
        let join = &config.joins["order_customer"];
        assert_eq!(join.kind, EnrichmentKind::Left);
        let builtin = &config.sources["kontext.features.order"];
        assert_eq!(builtin.topic, "context.orders.features");
        assert_eq!(
            builtin.fields.keys().collect::<Vec<_>>(),
            vec!["customer_tier"]
        );
        assert!(config.sources.contains_key("kontext.features.customer"));
    }

    #[test]
    fn every_join_problem_is_reported_with_its_path() {
        let yaml = format!(
            r#"{BASE}joins:
  orders_30d: {{ from: order, with: customer, key: customer_id, fields: {{ tier_copy: tier }} }}
  bad: {{ from: orders, with: customer, key: " ", fields: {{}} }}
  shadow: {{ from: order, with: customer, key: customer_id, fields: {{ total: tier, "a.b": tier }} }}
"#
        );
        let e = PipelineConfig::parse("p.yaml", &yaml).unwrap_err();
        let fields: Vec<&str> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "joins.bad.from",
                "joins.bad.key",
                "joins.bad.fields",
                "joins.orders_30d",
                "joins.shadow.fields.a.b",
                "joins.shadow.fields.total",
            ],
            "{e}"
        );
        assert!(e.to_string().contains("source shop already writes"), "{e}");
    }

    /// The join's key is a canonical field of the stream entity and each copied field one of
    /// the table entity: a typo would enrich nothing, silently.
    #[test]
    fn join_keys_and_table_fields_must_be_canonical_fields() {
        let yaml = format!(
            r#"{BASE}joins:
  typos: {{ from: order, with: customer, key: customer, fields: {{ customer_tier: teir, customer_ref: customer_id }} }}
"#
        );
        let e = PipelineConfig::parse("p.yaml", &yaml).unwrap_err();
        let got = e.field_messages();
        assert_eq!(
            got,
            vec![
                (
                    "joins.typos.key",
                    "\"customer\" is not a canonical field of order: its key and the fields its sources map are customer_id, order_id, total; name one of them, or map \"customer\" in a source of order (`sources.<source>.fields`)"
                ),
                (
                    "joins.typos.fields.customer_tier",
                    "\"teir\" is not a canonical field of customer: its key and the fields its sources map are customer_id, tier; name one of them, or map \"teir\" in a source of customer (`sources.<source>.fields`)"
                ),
            ],
            "{e}"
        );
    }
}
