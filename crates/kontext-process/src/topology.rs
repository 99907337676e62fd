//! A description of a processing topology, built with a small DSL in the spirit of Kafka
//! Streams. [`Topology::plan`] checks it and spells out its stages and internal topics;
//! `kontext_stream::topology::TopologyRunner` runs it on the embedded log or on Kafka.
//!
//! ```
//! use kontext_process::*;
//! let orders = Topology::stream("context.orders")
//!     .filter("not-test", Predicate::FieldNotEquals { field: FieldPath::new("status"), value: "test".into() })
//!     .dedup("orders-dedup", DedupConfig { window_ms: 3_600_000 })
//!     .join_table("with-customer", "context.customers", JoinConfig {
//!         kind: JoinKind::Left,
//!         key: JoinKey::Field(FieldPath::new("customer_id")),
//!         field: "customer".into(),
//!         table: Default::default(),
//!     })
//!     .to("context.orders-enriched");
//! let topology = Topology::new("kontext").with(orders);
//! let layout = |topic: &str| Some(TopicLayout {
//!     name: topic.into(), partitions: 12, partitioner: Partitioner::Murmur2,
//! });
//! let plan = topology.plan(&layout).unwrap();
//! assert!(plan.internal_topics.contains(&"kontext-with-customer-repartition".to_string()));
//! assert!(plan.internal_topics.contains(&"kontext-orders-dedup-changelog".to_string()));
//! ```

use crate::aggregate::AggregateConfig;
use crate::dedup::DedupConfig;
use crate::event::{Event, FieldPath, Scalar};
use crate::join::{
    changelog_topic_name, check_copartitioning, repartition_topic_name, CoPartitionError,
    JoinConfig, JoinKey, TopicLayout,
};

/// A stateless predicate for `filter` (the normalize/filter engine of `kontext-stream` will
/// supply richer ones; these are the shapes a description needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    /// Keep events whose field equals the value (compared as text).
    FieldEquals { field: FieldPath, value: String },
    /// Keep events whose field is absent or differs from the value.
    FieldNotEquals { field: FieldPath, value: String },
    /// A jq expression evaluated by the normalize engine; keep when it yields `true`.
    Jq(String),
}

impl Predicate {
    /// Whether `event` passes a field predicate; `None` for [`Predicate::Jq`], which the
    /// runtime evaluates with its compiled program. A number compares by its shortest text
    /// (`42`, `129.9`), a bool as `true` / `false`.
    pub fn matches_field(&self, event: &Event) -> Option<bool> {
        let text = |field: &FieldPath| {
            event.scalar(field).map(|s| match s {
                Scalar::Text(t) => t,
                Scalar::Num(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => (n as i64).to_string(),
                Scalar::Num(n) => n.to_string(),
            })
        };
        match self {
            Predicate::FieldEquals { field, value } => Some(text(field).as_deref() == Some(value)),
            Predicate::FieldNotEquals { field, value } => {
                Some(text(field).as_deref() != Some(value))
            }
            Predicate::Jq(_) => None,
        }
    }
}

/// One operator of a stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Filter {
        name: String,
        predicate: Predicate,
    },
    Dedup {
        name: String,
        config: DedupConfig,
    },
    JoinTable {
        name: String,
        table: String,
        config: JoinConfig,
    },
    Aggregate {
        name: String,
        config: AggregateConfig,
    },
    /// Re-keys the stream by a field through `<app>-<name>-repartition` (Kafka Streams'
    /// `groupBy` / `selectKey`), so that a following aggregate groups by it.
    GroupBy {
        name: String,
        by: FieldPath,
    },
}

impl Op {
    /// The operator's name: unique in its topology, it names the operator's state store,
    /// changelog and repartition topics.
    pub fn name(&self) -> &str {
        match self {
            Op::Filter { name, .. }
            | Op::Dedup { name, .. }
            | Op::JoinTable { name, .. }
            | Op::Aggregate { name, .. }
            | Op::GroupBy { name, .. } => name,
        }
    }
}

/// A stream being described: a source topic and its operators so far.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamBuilder {
    source: String,
    ops: Vec<Op>,
}

/// A finished stream: source, operators, sink topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub source: String,
    pub ops: Vec<Op>,
    pub sink: String,
}

/// A set of pipelines under one application id (the prefix of internal topics and consumer
/// groups).
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub app: String,
    pub pipelines: Vec<Pipeline>,
}

/// What the runtime runs, in order, for one pipeline; internal topics spelled out.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Consume `topic`.
    Source { topic: String },
    /// Apply a stateless or stateful operator in the current task; stateful ones name their
    /// store and its changelog topic.
    Operator {
        op: Op,
        store: Option<String>,
        changelog: Option<String>,
    },
    /// Re-key by `by` and produce to `topic` (for a join, with the table's partition count),
    /// then consume it: a new sub-topology, as in Kafka Streams. `op` names the operator that
    /// needs it (a join by foreign key, or a `group_by`).
    Repartition {
        op: String,
        by: FieldPath,
        topic: String,
        partitions: i32,
    },
    /// Produce the outputs to `topic`.
    Sink { topic: String },
}

/// The plan of a topology: stages per pipeline and every internal topic to create
/// (repartition topics, and compacted changelog topics).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub pipelines: Vec<Vec<Stage>>,
    pub internal_topics: Vec<String>,
}

/// A problem with a topology. All of them are found at once by [`Topology::plan`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("operator name {0:?} is used twice (names make internal topic names)")]
    DuplicateName(String),
    #[error("operator {name:?}: {reason}")]
    InvalidOperator { name: String, reason: String },
    #[error("operator name {0:?} must be 1 to 100 ASCII letters, digits, '_' or '-' (it names topics and state)")]
    InvalidName(String),
    #[error("operator {name:?} follows aggregate {aggregate:?}: an aggregate ends its stream (its outputs are table updates); send them `to` a topic and start a new stream there")]
    AfterAggregate { name: String, aggregate: String },
    #[error("join {name:?}: {source}")]
    NotCoPartitioned {
        name: String,
        #[source]
        source: CoPartitionError,
    },
}

impl Topology {
    /// An empty topology for application `app`.
    pub fn new(app: impl Into<String>) -> Self {
        Self {
            app: app.into(),
            pipelines: Vec::new(),
        }
    }

    /// Starts describing a stream read from `topic`.
    pub fn stream(topic: impl Into<String>) -> StreamBuilder {
        StreamBuilder {
            source: topic.into(),
            ops: Vec::new(),
        }
    }

    /// Adds a pipeline.
    pub fn with(mut self, pipeline: Pipeline) -> Self {
        self.pipelines.push(pipeline);
        self
    }

    /// Checks the topology against the topics' layouts (`layout(topic)`; `None` if the topic
    /// does not exist) and returns what the runtime must run and create. A join by record key
    /// is checked for co-partitioning; a join by foreign key gets a repartition stage through
    /// `<app>-<op>-repartition` with the table's partition count.
    pub fn plan(
        &self,
        layout: &dyn Fn(&str) -> Option<TopicLayout>,
    ) -> Result<Plan, Vec<TopologyError>> {
        let mut errors = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        let mut plan = Plan {
            pipelines: Vec::new(),
            internal_topics: Vec::new(),
        };
        for pipeline in &self.pipelines {
            let mut stages = vec![Stage::Source {
                topic: pipeline.source.clone(),
            }];
            let mut current = layout(&pipeline.source);
            if current.is_none() {
                errors.push(TopologyError::UnknownTopic(pipeline.source.clone()));
            }
            let mut aggregate: Option<&str> = None;
            // The last repartition, and whether a stateful operator followed it: the runner
            // drops an upstream segment's copies in the stores after a repartition, so a
            // re-key straight after a re-key (filters aside) would pass them on as new records.
            let mut repartitioned: Option<(&str, bool)> = None;
            for op in &pipeline.ops {
                if !names.insert(op.name().to_owned()) {
                    errors.push(TopologyError::DuplicateName(op.name().to_owned()));
                }
                if !valid_name(op.name()) {
                    errors.push(TopologyError::InvalidName(op.name().to_owned()));
                }
                if let Some(aggregate) = aggregate {
                    errors.push(TopologyError::AfterAggregate {
                        name: op.name().to_owned(),
                        aggregate: aggregate.to_owned(),
                    });
                }
                let mut store = None;
                match op {
                    Op::Filter {
                        name,
                        predicate: Predicate::Jq(code),
                    } => {
                        if let Err(reason) = kontext_core::jq::JqProgram::compile(code) {
                            errors.push(TopologyError::InvalidOperator {
                                name: name.clone(),
                                reason: format!("jq predicate {code:?}: {reason}"),
                            });
                        }
                    }
                    Op::Filter { .. } => {}
                    Op::GroupBy { name, by } => {
                        check_rekey(&mut errors, &mut repartitioned, name);
                        let topic = repartition_topic_name(&self.app, name);
                        plan.internal_topics.push(topic.clone());
                        let partitions = current.as_ref().map_or(1, |c| c.partitions);
                        stages.push(Stage::Repartition {
                            op: name.clone(),
                            by: by.clone(),
                            topic: topic.clone(),
                            partitions,
                        });
                        current = current.map(|c| TopicLayout { name: topic, ..c });
                        continue;
                    }
                    Op::Dedup { name, config } => {
                        if config.window_ms < 0 {
                            errors.push(TopologyError::InvalidOperator {
                                name: name.clone(),
                                reason: "window must not be negative".into(),
                            });
                        }
                        store = Some(name.clone());
                    }
                    Op::Aggregate { name, config } => {
                        aggregate = Some(name);
                        if let Err(reason) = crate::aggregate::Aggregate::new(config.clone()) {
                            errors.push(TopologyError::InvalidOperator {
                                name: name.clone(),
                                reason,
                            });
                        }
                        store = Some(name.clone());
                    }
                    Op::JoinTable {
                        name,
                        table,
                        config,
                    } => {
                        store = Some(name.clone());
                        match layout(table) {
                            None => errors.push(TopologyError::UnknownTopic(table.clone())),
                            Some(table_layout) => match &config.key {
                                JoinKey::Field(by) => {
                                    check_rekey(&mut errors, &mut repartitioned, name);
                                    let topic = repartition_topic_name(&self.app, name);
                                    plan.internal_topics.push(topic.clone());
                                    stages.push(Stage::Repartition {
                                        op: name.clone(),
                                        by: by.clone(),
                                        topic: topic.clone(),
                                        partitions: table_layout.partitions,
                                    });
                                    current = Some(TopicLayout {
                                        name: topic,
                                        ..table_layout
                                    });
                                }
                                JoinKey::RecordKey => {
                                    if let Some(stream) = &current {
                                        if let Err(source) =
                                            check_copartitioning(stream, &table_layout)
                                        {
                                            errors.push(TopologyError::NotCoPartitioned {
                                                name: name.clone(),
                                                source,
                                            });
                                        }
                                    }
                                }
                            },
                        }
                    }
                }
                if store.is_some() {
                    if let Some((_, stateful)) = &mut repartitioned {
                        *stateful = true;
                    }
                }
                let changelog = store
                    .as_ref()
                    .map(|store| changelog_topic_name(&self.app, store));
                if let Some(changelog) = &changelog {
                    plan.internal_topics.push(changelog.clone());
                }
                stages.push(Stage::Operator {
                    op: op.clone(),
                    store,
                    changelog,
                });
            }
            stages.push(Stage::Sink {
                topic: pipeline.sink.clone(),
            });
            plan.pipelines.push(stages);
        }
        if errors.is_empty() {
            Ok(plan)
        } else {
            Err(errors)
        }
    }
}

/// Records a re-key by `name`, refusing one that follows another re-key with only stateless
/// operators between them: the first re-key has no effect there, and the records between
/// the two would have no store to drop an upstream segment's copies.
fn check_rekey<'a>(
    errors: &mut Vec<TopologyError>,
    repartitioned: &mut Option<(&'a str, bool)>,
    name: &'a str,
) {
    if let Some((previous, false)) = repartitioned {
        errors.push(TopologyError::InvalidOperator {
            name: name.to_owned(),
            reason: format!(
                "it re-keys the stream right after {previous:?} re-keyed it (only stateless operators between): remove {previous:?}, or put a stateful operator such as dedup between them"
            ),
        });
    }
    *repartitioned = Some((name, false));
}

/// Operator names become parts of topic names (`<app>-<name>-changelog`) and state keyspaces.
fn valid_name(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl StreamBuilder {
    /// Keeps the events matching `predicate`.
    pub fn filter(mut self, name: impl Into<String>, predicate: Predicate) -> Self {
        self.ops.push(Op::Filter {
            name: name.into(),
            predicate,
        });
        self
    }

    /// Drops repeated event ids within a window.
    pub fn dedup(mut self, name: impl Into<String>, config: DedupConfig) -> Self {
        self.ops.push(Op::Dedup {
            name: name.into(),
            config,
        });
        self
    }

    /// Enriches with the table materialized from `table`.
    pub fn join_table(
        mut self,
        name: impl Into<String>,
        table: impl Into<String>,
        config: JoinConfig,
    ) -> Self {
        self.ops.push(Op::JoinTable {
            name: name.into(),
            table: table.into(),
            config,
        });
        self
    }

    /// Re-keys the stream by the field at `by` (through a repartition topic with the stream's
    /// partition count), like Kafka Streams' `groupBy`: a following `aggregate` groups by
    /// that field. Events without it are dropped and counted as filtered.
    pub fn group_by(mut self, name: impl Into<String>, by: FieldPath) -> Self {
        self.ops.push(Op::GroupBy {
            name: name.into(),
            by,
        });
        self
    }

    /// Aggregates per key over windows.
    pub fn aggregate(mut self, name: impl Into<String>, config: AggregateConfig) -> Self {
        self.ops.push(Op::Aggregate {
            name: name.into(),
            config,
        });
        self
    }

    /// Ends the stream in `topic`.
    pub fn to(self, topic: impl Into<String>) -> Pipeline {
        Pipeline {
            source: self.source,
            ops: self.ops,
            sink: topic.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::{JoinKind, Partitioner};

    fn layouts(topic: &str) -> Option<TopicLayout> {
        let partitions = match topic {
            "context.orders" | "context.customers" => 12,
            "context.tickets" => 6,
            _ => return None,
        };
        Some(TopicLayout {
            name: topic.into(),
            partitions,
            partitioner: Partitioner::Murmur2,
        })
    }

    #[test]
    fn plan_reports_every_problem_at_once() {
        let by_key = JoinConfig {
            kind: JoinKind::Inner,
            key: JoinKey::RecordKey,
            field: "customer".into(),
            table: Default::default(),
        };
        let topology = Topology::new("app")
            .with(
                Topology::stream("context.tickets")
                    .join_table("j", "context.customers", by_key.clone())
                    .to("out"),
            )
            .with(
                Topology::stream("nope")
                    .dedup("j", DedupConfig { window_ms: 1 })
                    .to("out"),
            );
        let errors = topology.plan(&layouts).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(matches!(errors[0], TopologyError::NotCoPartitioned { .. }));
        assert!(errors.contains(&TopologyError::UnknownTopic("nope".into())));
        assert!(errors.contains(&TopologyError::DuplicateName("j".into())));
    }

    #[test]
    fn an_aggregate_ends_its_stream_and_names_and_jq_are_checked() {
        let count = AggregateConfig {
            window: crate::WindowSpec::Tumbling { size_ms: 1_000 },
            grace_ms: 0,
            functions: vec![("n".into(), crate::AggFn::Count)],
            emit: crate::Emit::OnUpdate,
        };
        let topology = Topology::new("app").with(
            Topology::stream("context.orders")
                .aggregate("per.customer", count)
                .filter("after", Predicate::Jq(".a ==".into()))
                .to("out"),
        );
        let errors = topology.plan(&layouts).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(errors[0], TopologyError::InvalidName("per.customer".into()));
        assert!(
            matches!(&errors[1], TopologyError::AfterAggregate { name, .. } if name == "after")
        );
        assert!(
            matches!(&errors[2], TopologyError::InvalidOperator { name, reason } if name == "after" && reason.contains("jq")),
            "{errors:?}"
        );
    }

    #[test]
    fn a_re_key_right_after_a_re_key_is_refused() {
        let fk = JoinConfig {
            kind: JoinKind::Left,
            key: JoinKey::Field(FieldPath::new("customer_id")),
            field: "customer".into(),
            table: Default::default(),
        };
        let planned =
            |stream: StreamBuilder| Topology::new("app").with(stream.to("out")).plan(&layouts);
        let twice = Topology::stream("context.orders")
            .group_by("by-a", FieldPath::new("a"))
            .filter("f", Predicate::Jq("true".into()))
            .join_table("j", "context.customers", fk.clone());
        let errors = planned(twice).unwrap_err();
        assert!(
            matches!(&errors[..], [TopologyError::InvalidOperator { name, reason }] if name == "j" && reason.contains("by-a")),
            "{errors:?}"
        );
        let with_state_between = Topology::stream("context.orders")
            .group_by("by-a", FieldPath::new("a"))
            .dedup("d", DedupConfig { window_ms: 1 })
            .join_table("j", "context.customers", fk);
        assert!(planned(with_state_between).is_ok());
    }

    #[test]
    fn field_predicates_compare_numbers_and_text_as_text() {
        let event = |value: serde_json::Value| Event {
            key: bytes::Bytes::from_static(b"k"),
            id: bytes::Bytes::from_static(b"e"),
            time_ms: 0,
            coords: crate::Coords::new("t", 0, 0),
            value,
        };
        let status = |v: &str| Predicate::FieldEquals {
            field: FieldPath::new("s"),
            value: v.into(),
        };
        assert_eq!(
            status("42").matches_field(&event(serde_json::json!({"s": 42}))),
            Some(true)
        );
        assert_eq!(
            status("4.5").matches_field(&event(serde_json::json!({"s": 4.5}))),
            Some(true)
        );
        assert_eq!(
            status("test").matches_field(&event(serde_json::json!({"s": "live"}))),
            Some(false)
        );
        let not_test = Predicate::FieldNotEquals {
            field: FieldPath::new("s"),
            value: "test".into(),
        };
        assert_eq!(
            not_test.matches_field(&event(serde_json::json!({}))),
            Some(true)
        );
        assert_eq!(
            not_test.matches_field(&event(serde_json::json!({"s": "test"}))),
            Some(false)
        );
        assert_eq!(
            Predicate::Jq("true".into()).matches_field(&event(serde_json::json!({}))),
            None
        );
    }

    #[test]
    fn a_foreign_key_join_is_planned_through_a_repartition_topic() {
        let topology = Topology::new("app").with(
            Topology::stream("context.tickets")
                .join_table(
                    "tickets-by-customer",
                    "context.customers",
                    JoinConfig {
                        kind: JoinKind::Left,
                        key: JoinKey::Field(FieldPath::new("customer_id")),
                        field: "customer".into(),
                        table: Default::default(),
                    },
                )
                .to("out"),
        );
        let plan = topology.plan(&layouts).unwrap();
        assert_eq!(
            plan.pipelines[0][1],
            Stage::Repartition {
                op: "tickets-by-customer".into(),
                by: FieldPath::new("customer_id"),
                topic: "app-tickets-by-customer-repartition".into(),
                partitions: 12,
            }
        );
    }
}
