use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::LogError;

/// What a topic should look like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// `cleanup.policy=compact` on Kafka. The embedded log records the flag; compaction of
    /// embedded segments is not implemented yet, so embedded compacted topics keep everything.
    pub compacted: bool,
    pub retention: Retention,
}

impl TopicSpec {
    /// A topic with `partitions` partitions, not compacted, with unlimited retention.
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            compacted: false,
            retention: Retention::default(),
        }
    }

    /// Kafka's naming rules for the topic's name (`Topic.validate`), which both backends
    /// check before anything else: Kafka's clients do not (librdkafka fails on a name over 512
    /// bytes without saying why), and on the embedded log the name is a directory's.
    pub fn check_name(&self) -> Result<(), LogError> {
        match kontext_core::config::topic_name_problem(&self.name) {
            Some(problem) => Err(LogError::Invalid(format!(
                "topic {:?}: {problem}",
                self.name
            ))),
            None => Ok(()),
        }
    }
}

/// Retention limits; `None` means unlimited. Applied per partition, whole segments at a time,
/// never to the active segment (as in Kafka).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// `retention.ms`
    pub time: Option<Duration>,
    /// `retention.bytes`, per partition.
    pub bytes: Option<u64>,
}

/// Whether [`crate::Log::create_topic`] created the topic or found it already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    AlreadyExists,
}

/// A topic as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicDescription {
    pub name: String,
    pub compacted: bool,
    pub retention: Retention,
    pub partitions: Vec<PartitionInfo>,
}

/// One partition's watermarks: `low` is the first offset still in the log, `high` the offset
/// the next record will get. On Kafka `high` is the last stable offset, as a `read_committed`
/// reader sees it: records of a transaction still open are above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    pub partition: i32,
    pub low_watermark: i64,
    pub high_watermark: i64,
}

/// Where a group starts on a partition it has no committed offset for (`auto.offset.reset`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

/// A consumer group member's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    pub group_id: String,
    pub topics: Vec<String>,
    pub offset_reset: OffsetReset,
    /// The member's offsets are committed only inside transactions
    /// ([`crate::TransactionalProducer::commit`]); its caller commits none itself. The Kafka
    /// backend then turns librdkafka's automatic commit off, as `send_offsets_to_transaction`
    /// requires of the consumer (offsets given to `commit_in_background` are stored and never
    /// committed; `commit` still commits); the embedded log has nothing to turn off.
    pub transactional: bool,
}

impl ConsumerConfig {
    pub fn new(group_id: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            group_id: group_id.into(),
            topics,
            offset_reset: OffsetReset::Earliest,
            transactional: false,
        }
    }

    /// This config with [`field@ConsumerConfig::transactional`] set to `transactional`.
    pub fn transactional(mut self, transactional: bool) -> Self {
        self.transactional = transactional;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kafka_legal_topic_names_only() {
        let check = |name: &str| TopicSpec::new(name, 1).check_name();
        for ok in ["orders", "context.customers", "a_b-c.9", &"x".repeat(249)] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(250)] {
            assert!(matches!(check(bad), Err(LogError::Invalid(_))), "{bad}");
        }
    }
}
