use std::path::PathBuf;

/// Errors of a log backend. Each variant says whether retrying can help
/// ([`LogError::is_transient`]); callers decide on retries from that, never from the message.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Disk I/O failed. Transient: a full disk or a flaky device may recover.
    #[error("log I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A file of the log holds something that is not a valid log structure (beyond the torn
    /// tail that recovery truncates). Permanent: needs an operator.
    #[error("corrupt log data in {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    /// The topic does not exist. Permanent until someone creates it.
    #[error("unknown topic {0:?}: create it with `kontext topics create` or in the pipeline file")]
    UnknownTopic(String),

    /// The topic exists with a different configuration than asked for. Permanent.
    #[error("topic {topic:?} already exists with {existing} partitions, not {requested}")]
    TopicMismatch {
        topic: String,
        existing: i32,
        requested: i32,
    },

    /// The partition does not exist in the topic. Permanent.
    #[error("topic {topic:?} has no partition {partition}")]
    UnknownPartition { topic: String, partition: i32 },

    /// An argument is invalid (a bad topic name, zero partitions, an oversized record ...).
    /// Permanent.
    #[error("invalid request: {0}")]
    Invalid(String),

    /// The group already has a member in this process (the embedded log has one member per
    /// group; scale out with the Kafka backend). Permanent.
    #[error("consumer group {0:?} already has an active member")]
    GroupBusy(String),

    /// The broker could not be reached or did not answer in time. Transient.
    #[error("broker unavailable: {0}")]
    Unavailable(String),

    /// The Kafka client reported an error; `transient` carries librdkafka's retriability.
    #[error("kafka error: {message}")]
    Kafka { message: String, transient: bool },

    /// A fetch asked for an offset outside `[low, high]` (below the low watermark after
    /// retention, or past the end). Permanent for that offset: restart from `low` or `high`.
    #[error("offset {offset} of {topic}/{partition} is out of range [{low}, {high}]")]
    OffsetOutOfRange {
        topic: String,
        partition: i32,
        offset: i64,
        low: i64,
        high: i64,
    },

    /// The log was closed while the call was in flight.
    #[error("the log is shut down")]
    Closed,
}

impl LogError {
    /// Whether the same call may succeed if retried later.
    pub fn is_transient(&self) -> bool {
        match self {
            LogError::Io { .. } | LogError::Unavailable(_) => true,
            LogError::Kafka { transient, .. } => *transient,
            LogError::Corrupt { .. }
            | LogError::UnknownTopic(_)
            | LogError::TopicMismatch { .. }
            | LogError::UnknownPartition { .. }
            | LogError::Invalid(_)
            | LogError::GroupBusy(_)
            | LogError::OffsetOutOfRange { .. }
            | LogError::Closed => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LogError::Io {
            path: path.into(),
            source,
        }
    }
}
