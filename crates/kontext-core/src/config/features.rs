//! `features:` in the pipeline file: aggregates over one entity type's normalized updates that
//! become fields of another entity's context (`orders_30d` of a customer).
//!
//! ```yaml
//! features:
//!   orders_30d:            # the field name in the target entity's context
//!     from: order          # whose normalized updates feed it
//!     entity: customer     # the entity that gets the field
//!     key: customer_id     # canonical field of the input holding the target entity's id
//!     agg: count           # count | sum | avg | min | max | latest | distinct_count
//!     field: total         # the aggregated field (all but count)
//!     window: 30d          # rolling window by event time; omit for all-time
//!     dedup: 1h            # optional: drop inputs whose event id was seen within this window
//! ```
//!
//! `window` also takes `{ tumbling: 1d }` (calendar-aligned windows: "orders today"),
//! `{ session: 30m }` (activity separated by gaps: "pages this visit") and
//! `{ hopping: { size: 1h, advance: 5m } }` ("the last hour, in 5-minute steps"), with an
//! optional `grace: 10m` for late events; such a feature's value is the key's current window,
//! `{"value": .., "window_start": .., "window_end": ..}`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{is_valid_name, FieldMapping, PipelineConfig, SourceConfig, SourceMatch};

/// `ce_source` of the records the processor writes to features topics; the store sinks apply
/// them through a built-in source per target entity (`kontext.features.<entity>`).
pub const FEATURES_SOURCE: &str = "kontext.features";

/// The topic carrying the features of the entities whose topic is `entity_topic`: same
/// partition count and partitioner, so it is co-partitioned with the entity topic.
pub fn features_topic(entity_topic: &str) -> String {
    format!("{entity_topic}.features")
}

/// One feature: an aggregate of `from` updates, per `key`, written into `entity`'s context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    /// The entity type whose normalized updates are aggregated.
    pub from: String,
    /// The entity type whose context gets the feature as a field.
    pub entity: String,
    /// Canonical field of the input update holding the target entity's id.
    pub key: String,
    /// The aggregate function.
    pub agg: FeatureAgg,
    /// The canonical input field the function aggregates; required for all but `count`.
    #[serde(default)]
    pub field: Option<String>,
    /// Rolling window by event time (`30d`, `1h`, `15m`): the value covers the inputs of the
    /// last `window` up to the stream time. Or `{ tumbling: 1d }` / `{ session: 30m }`: the
    /// value is the key's newest such window. Omitted: all time.
    #[serde(default)]
    pub window: Option<FeatureWindow>,
    /// `tumbling`, `hopping` and `session` windows only: how long after a window's end late
    /// events are still counted in it (0 when unset).
    #[serde(default)]
    pub grace: Option<String>,
    /// Drop inputs whose event id (`ce_id`) was already seen within this event-time window.
    #[serde(default)]
    pub dedup: Option<String>,
}

/// Aggregate functions of a feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureAgg {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    Latest,
    DistinctCount,
}

impl FeatureAgg {
    /// The name used in the pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            FeatureAgg::Count => "count",
            FeatureAgg::Sum => "sum",
            FeatureAgg::Avg => "avg",
            FeatureAgg::Min => "min",
            FeatureAgg::Max => "max",
            FeatureAgg::Latest => "latest",
            FeatureAgg::DistinctCount => "distinct_count",
        }
    }
}

/// `window:` of a feature as written: a span (`30d`, rolling) or a one-key map naming the
/// window type (`{ tumbling: 1d }`, `{ session: 30m }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureWindow {
    Rolling(String),
    Typed(BTreeMap<String, serde_json::Value>),
}

/// A feature's window, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WindowKind {
    /// No `window`: every input ever.
    AllTime,
    /// `window: 30d`: the inputs of the last span up to the stream time.
    Rolling(Duration),
    /// `window: { tumbling: 1d }`: epoch-aligned windows of this size.
    Tumbling(Duration),
    /// `window: { session: 30m }`: per key, inputs closer than this gap to each other.
    Session(Duration),
    /// `window: { hopping: { size: 1h, advance: 5m } }`: windows of `size` starting every
    /// `advance`; the key shows the one closing next after its newest input ("the last hour,
    /// in steps of 5 minutes").
    Hopping { size: Duration, advance: Duration },
}

impl FeatureWindow {
    /// The resolved window, or what is wrong with it (for the `window` field).
    pub fn kind(&self) -> Result<WindowKind, String> {
        let forms = "use `window: 30d` (rolling), `{ tumbling: 1d }`, `{ session: 30m }` or `{ hopping: { size: 1h, advance: 5m } }`";
        match self {
            FeatureWindow::Rolling(span) => parse_span(span).map(WindowKind::Rolling),
            FeatureWindow::Typed(map) => {
                let mut entries = map.iter();
                let (Some((kind, value)), None) = (entries.next(), entries.next()) else {
                    return Err(format!("name one window type: {forms}"));
                };
                let span = || match value {
                    serde_json::Value::String(s) => parse_span(s),
                    other => Err(format!(
                        "`{kind}` takes a duration such as 1d or 30m, not {other}"
                    )),
                };
                match kind.as_str() {
                    "tumbling" => span().map(WindowKind::Tumbling),
                    "session" => span().map(WindowKind::Session),
                    "sliding" | "rolling" => span().map(WindowKind::Rolling),
                    "hopping" => hopping(value),
                    other => Err(format!("unknown window type {other:?}: {forms}")),
                }
            }
        }
    }
}

/// `{ hopping: { size: 1h, advance: 5m } }`'s inner map.
fn hopping(value: &serde_json::Value) -> Result<WindowKind, String> {
    let usage =
        "`hopping` takes `{ size: 1h, advance: 5m }` (windows of `size` starting every `advance`)";
    let serde_json::Value::Object(map) = value else {
        return Err(usage.into());
    };
    if map.keys().any(|k| k != "size" && k != "advance") {
        return Err(usage.into());
    }
    let span = |name: &str| match map.get(name) {
        Some(serde_json::Value::String(s)) => parse_span(s),
        _ => Err(usage.to_string()),
    };
    let (size, advance) = (span("size")?, span("advance")?);
    if advance > size {
        return Err(format!(
            "advance must not exceed size (windows would leave gaps): got size {}, advance {}",
            map["size"], map["advance"]
        ));
    }
    Ok(WindowKind::Hopping { size, advance })
}

impl FeatureConfig {
    /// The resolved window (validated: whenever the config passed validation, this is the
    /// window it names).
    pub fn window_kind(&self) -> WindowKind {
        match &self.window {
            None => WindowKind::AllTime,
            Some(w) => w.kind().unwrap_or(WindowKind::AllTime),
        }
    }

    /// The grace period of tumbling and session windows (0 when unset).
    pub fn grace_duration(&self) -> Duration {
        self.grace
            .as_deref()
            .and_then(|g| parse_span(g).ok())
            .unwrap_or_default()
    }

    /// The dedup window, if any.
    pub fn dedup_duration(&self) -> Option<Duration> {
        self.dedup.as_deref().and_then(|w| parse_span(w).ok())
    }
}

/// Parses a feature window: a positive whole number with a unit `ms`, `s`, `m`, `h` or `d`
/// (`30d`, `1h`).
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("{text:?} is not a duration: use a number and a unit, e.g. 30d, 1h, 15m")
    })?;
    let secs = match unit {
        "ms" => return positive(Duration::from_millis(n), text),
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        other => {
            return Err(format!(
                "{text:?} has unit {other:?}: use ms, s, m, h or d, e.g. 30d"
            ))
        }
    };
    positive(Duration::from_secs(secs), text)
}

fn positive(d: Duration, text: &str) -> Result<Duration, String> {
    if d.is_zero() {
        Err(format!("{text:?} is empty: a window must be longer than 0"))
    } else if d.as_millis() > i64::MAX as u128 / 4 {
        Err(format!("{text:?} is too long"))
    } else {
        Ok(d)
    }
}

impl PipelineConfig {
    /// Adds one built-in source per features topic (`ce_source: kontext.features`) mapping
    /// each feature and join output field of that entity to the field of the same name, so that the store sinks
    /// (and every tool reading `sources`) treat the features topics like any source topic.
    /// Called by [`PipelineConfig::parse`] after validation.
    pub(super) fn add_feature_sources(&mut self) {
        let mut per_entity: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, feature) in &self.features {
            per_entity
                .entry(feature.entity.clone())
                .or_default()
                .push(name.clone());
        }
        for join in self.joins.values() {
            per_entity
                .entry(join.from.clone())
                .or_default()
                .extend(join.fields.keys().cloned());
        }
        for (entity, names) in per_entity {
            let Some(entity_config) = self.entities.get(&entity) else {
                continue;
            };
            let source = SourceConfig {
                topic: features_topic(&entity_config.topic),
                entity: entity.clone(),
                matcher: Some(SourceMatch {
                    ce_source: FEATURES_SOURCE.into(),
                }),
                fields: names
                    .into_iter()
                    .map(|n| (n.clone(), FieldMapping::Path(n)))
                    .collect(),
                filter: None,
            };
            self.sources
                .insert(format!("{FEATURES_SOURCE}.{entity}"), source);
        }
    }

    /// The features topics the pipeline writes and reads: `<entity topic>.features` of each
    /// entity a feature or join writes into.
    pub fn features_topics(&self) -> BTreeSet<String> {
        self.features
            .values()
            .map(|f| f.entity.as_str())
            .chain(self.joins.values().map(|j| j.from.as_str()))
            .filter_map(|entity| self.entities.get(entity))
            .map(|e| features_topic(&e.topic))
            .collect()
    }

    /// Checks `features`: entity types exist, the key and field are named, windows parse, and
    /// a feature's name does not shadow a canonical field a source already writes.
    pub(super) fn validate_features(&self, err: &mut impl FnMut(String, String)) {
        // A features topic is written by the processor and read through a built-in source:
        // an entity topic of the same name would mix the two (and their partition counts).
        let features_topics = self.features_topics();
        for (name, entity) in &self.entities {
            if features_topics.contains(&entity.topic) {
                err(
                    format!("entities.{name}.topic"),
                    format!(
                        "{:?} is the features topic kontext writes for another entity's features and joins: name the entity topic differently",
                        entity.topic
                    ),
                );
            }
        }
        for (name, feature) in &self.features {
            let at = format!("features.{name}");
            if self
                .sources
                .contains_key(&format!("{FEATURES_SOURCE}.{}", feature.entity))
            {
                err(
                    format!("sources.{FEATURES_SOURCE}.{}", feature.entity),
                    "this source name is reserved for the features of the entity: rename the source".into(),
                );
            }
            if !is_valid_name(name) || name.contains('.') {
                err(
                    at.clone(),
                    "feature names use only letters, digits, '_' and '-' (they become field names)"
                        .into(),
                );
            }
            for (what, entity) in [("from", &feature.from), ("entity", &feature.entity)] {
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
            if feature.key.trim().is_empty() {
                err(
                    format!("{at}.key"),
                    format!(
                        "name the canonical field of a {} holding the {}'s id, e.g. `{}_id`",
                        feature.from, feature.entity, feature.entity
                    ),
                );
            }
            self.check_canonical(err, format!("{at}.key"), &feature.from, &feature.key);
            if let Some(field) = &feature.field {
                self.check_canonical(err, format!("{at}.field"), &feature.from, field);
            }
            match (&feature.field, feature.agg) {
                (Some(_), FeatureAgg::Count) => err(
                    format!("{at}.field"),
                    "`agg: count` counts inputs and takes no field: remove `field`".into(),
                ),
                (None, agg) if agg != FeatureAgg::Count => err(
                    format!("{at}.field"),
                    format!(
                        "`agg: {}` needs the canonical input field to aggregate, e.g. `field: total`",
                        agg.name()
                    ),
                ),
                (Some(f), _) if f.trim().is_empty() => err(
                    format!("{at}.field"),
                    "name a canonical field of the input, e.g. `field: total`".into(),
                ),
                _ => {}
            }
            if let Some(Err(problem)) = feature.window.as_ref().map(FeatureWindow::kind) {
                err(format!("{at}.window"), problem);
            }
            for (what, value) in [("dedup", &feature.dedup), ("grace", &feature.grace)] {
                if let Some(Err(problem)) = value.as_deref().map(parse_span) {
                    err(format!("{at}.{what}"), problem);
                }
            }
            if feature.grace.is_some()
                && !matches!(
                    feature.window.as_ref().map(FeatureWindow::kind),
                    Some(Ok(WindowKind::Tumbling(_)
                        | WindowKind::Session(_)
                        | WindowKind::Hopping { .. }))
                )
            {
                err(
                    format!("{at}.grace"),
                    "`grace` applies to `{ tumbling: .. }`, `{ session: .. }` and `{ hopping: .. }` windows; a rolling or all-time feature has no window end to be late for: remove it".into(),
                );
            }
            if self.mapped_fields(&feature.entity).any(|f| f == name) {
                err(
                    at.clone(),
                    format!(
                        "a source already writes the field {name:?} of {}: rename the feature",
                        feature.entity
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_take_days_and_reject_zero_and_unknown_units() {
        assert_eq!(parse_span("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_span("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_span("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_span("0d").is_err());
        assert!(parse_span("2w").is_err());
        assert!(parse_span("d").is_err());
    }

    #[test]
    fn every_feature_problem_is_reported_with_its_path() {
        let yaml = r#"
name: p
entities:
  customer: { key: customer_id, topic: context.customers }
  order: { key: order_id, topic: context.orders }
sources:
  shop: { topic: context.orders, entity: order, fields: { customer_id: c, total: t } }
  crm: { topic: context.customers, entity: customer, fields: { given_name: n } }
features:
  orders_30d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d }
  bad: { from: orders, entity: customer, key: customer_id, agg: sum, window: 2w }
  given_name: { from: order, entity: customer, key: customer_id, agg: count, field: total }
"#;
        let e = PipelineConfig::parse("p.yaml", yaml).unwrap_err();
        let fields: Vec<&str> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "features.bad.from",
                "features.bad.field",
                "features.bad.window",
                "features.given_name.field",
                "features.given_name",
            ],
            "{e}"
        );
        let ok = yaml
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                !l.starts_with("bad:") && !l.starts_with("given_name:")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = PipelineConfig::parse("p.yaml", &ok).unwrap();
        let builtin = &config.sources["kontext.features.customer"];
        assert_eq!(builtin.topic, "context.customers.features");
        assert_eq!(
            config.source_topics(),
            vec![
                "context.customers",
                "context.customers.features",
                "context.orders"
            ]
        );
        assert_eq!(
            config.features["orders_30d"].window_kind(),
            WindowKind::Rolling(Duration::from_secs(30 * 86_400))
        );
    }

    #[test]
    fn tumbling_and_session_windows_parse_and_their_mistakes_name_the_fix() {
        let yaml = |features: &str| {
            format!(
                r#"
name: p
entities:
  customer: {{ key: customer_id, topic: context.customers }}
  order: {{ key: order_id, topic: context.orders }}
sources:
  shop: {{ topic: context.orders, entity: order, fields: {{ customer_id: c, total: t }} }}
features:
{features}"#
            )
        };
        let ok = yaml(concat!(
            "  today: { from: order, entity: customer, key: customer_id, agg: count, window: { tumbling: 1d }, grace: 10m }\n",
            "  visit: { from: order, entity: customer, key: customer_id, agg: sum, field: total, window: { session: 30m } }\n",
            "  ever: { from: order, entity: customer, key: customer_id, agg: count }\n",
            "  last_hour: { from: order, entity: customer, key: customer_id, agg: count, window: { hopping: { size: 1h, advance: 5m } } }\n",
        ));
        let config = PipelineConfig::parse("p.yaml", &ok).unwrap();
        let today = &config.features["today"];
        assert_eq!(
            today.window_kind(),
            WindowKind::Tumbling(Duration::from_secs(86_400))
        );
        assert_eq!(today.grace_duration(), Duration::from_secs(600));
        assert_eq!(
            config.features["visit"].window_kind(),
            WindowKind::Session(Duration::from_secs(1_800))
        );
        assert_eq!(config.features["ever"].window_kind(), WindowKind::AllTime);
        assert_eq!(
            config.features["last_hour"].window_kind(),
            WindowKind::Hopping {
                size: Duration::from_secs(3_600),
                advance: Duration::from_secs(300)
            }
        );
        assert_eq!(config.features["ever"].grace_duration(), Duration::ZERO);

        let bad = yaml(concat!(
            "  a: { from: order, entity: customer, key: customer_id, agg: count, window: { hopping: { size: 5m, advance: 1h } } }\n",
            "  b: { from: order, entity: customer, key: customer_id, agg: count, window: { tumbling: 1d, session: 1h } }\n",
            "  c: { from: order, entity: customer, key: customer_id, agg: count, window: { weekly: 1d } }\n",
            "  d: { from: order, entity: customer, key: customer_id, agg: count, window: 30d, grace: 1h }\n",
            "  e: { from: order, entity: customer, key: customer_id, agg: count, window: { session: 5 } }\n",
        ));
        let e = PipelineConfig::parse("p.yaml", &bad).unwrap_err();
        let got = e.field_messages();
        let fields: Vec<&str> = got.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            fields,
            vec![
                "features.a.window",
                "features.b.window",
                "features.c.window",
                "features.d.grace",
                "features.e.window"
            ],
            "{e}"
        );
        assert!(got[0].1.contains("advance must not exceed size"), "{e}");
        assert!(got[2].1.contains("unknown window type \"weekly\""), "{e}");
        assert!(got[4].1.contains("takes a duration"), "{e}");
    }

    /// A feature reads its `key` and `field` from the canonical fields of its `from` entity;
    /// a name no source maps (a typo) would compute nothing, silently, so it is refused with
    /// the names there are. The entity's own key field is one of them.
    #[test]
    fn feature_keys_and_fields_must_be_canonical_fields_of_the_input() {
        let yaml = r#"
name: p
entities:
  customer: { key: customer_id, topic: context.customers }
  order: { key: order_id, topic: context.orders }
sources:
  shop: { topic: context.orders, entity: order, fields: { customer_id: c, total: t } }
  returns: { topic: context.orders, entity: order, match: { ce_source: returns }, fields: { refund: r } }
features:
  typo_key: { from: order, entity: customer, key: custmer_id, agg: count }
  typo_field: { from: order, entity: customer, key: customer_id, agg: sum, field: totl }
  ok_field: { from: order, entity: customer, key: customer_id, agg: max, field: refund }
  own_key: { from: order, entity: order, key: order_id, agg: count }
"#;
        let e = PipelineConfig::parse("p.yaml", yaml).unwrap_err();
        let got = e.field_messages();
        let fields: Vec<&str> = got.iter().map(|(f, _)| *f).collect();
        assert_eq!(
            fields,
            vec!["features.typo_field.field", "features.typo_key.key"],
            "{e}"
        );
        assert_eq!(
            got[1].1,
            "\"custmer_id\" is not a canonical field of order: its key and the fields its sources map are customer_id, order_id, refund, total; name one of them, or map \"custmer_id\" in a source of order (`sources.<source>.fields`)"
        );
    }

    /// A source attached to an unknown entity type (a typo) may be the one meant to map the
    /// feature's key: that typo is the error, not a key no source maps.
    #[test]
    fn a_source_of_an_unknown_entity_type_is_reported_without_knock_on_errors() {
        let yaml = r#"
name: p
entities:
  customer: { key: customer_id, topic: context.customers }
  order: { key: order_id, topic: context.orders }
sources:
  shop: { topic: context.orders, entity: orders, fields: { customer_id: c } }
features:
  n: { from: order, entity: customer, key: customer_id, agg: count }
"#;
        let e = PipelineConfig::parse("p.yaml", yaml).unwrap_err();
        let fields: Vec<&str> = e.field_messages().iter().map(|(f, _)| *f).collect();
        assert_eq!(fields, vec!["sources.shop.entity"], "{e}");
    }

    #[test]
    fn an_unknown_feature_key_is_an_error() {
        let yaml = r#"
name: p
entities: { order: { key: order_id, topic: context.orders } }
sources: { shop: { topic: context.orders, entity: order, fields: { total: t } } }
features: { n: { from: order, entity: order, key: order_id, agg: count, windw: 1h } }
"#;
        let e = PipelineConfig::parse("p.yaml", yaml).unwrap_err();
        assert!(e.to_string().contains("windw"), "{e}");
    }
}
