//! A description of a processing topology, built with a small DSL in the spirit of Kafka
//! Streams: what the runtime will execute, not the runtime.
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
use crate::event::FieldPath;
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
}

impl Op {
    fn name(&self) -> &str {
        match self {
            Op::Filter { name, .. }
            | Op::Dedup { name, .. }
            | Op::JoinTable { name, .. }
            | Op::Aggregate { name, .. } => name,
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
    /// Re-key by `by` and produce to `topic` (with the table's partition count), then consume
    /// it: a new sub-topology, as in Kafka Streams.
    Repartition {
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
            for op in &pipeline.ops {
                if !names.insert(op.name().to_owned()) {
                    errors.push(TopologyError::DuplicateName(op.name().to_owned()));
                }
                let mut store = None;
                match op {
                    Op::Filter { .. } => {}
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
                                    let topic = repartition_topic_name(&self.app, name);
                                    plan.internal_topics.push(topic.clone());
                                    stages.push(Stage::Repartition {
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
                by: FieldPath::new("customer_id"),
                topic: "app-tickets-by-customer-repartition".into(),
                partitions: 12,
            }
        );
    }
}
