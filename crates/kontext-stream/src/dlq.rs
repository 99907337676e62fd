//! Dead-letter topics.
//!
//! A record that can never be processed (bad data: its bytes will not decode however often we
//! try) is copied byte for byte (key, value, headers, timestamp) to the dead-letter topic of
//! its source topic, into the same partition number, with headers that say why. The header
//! names are Kafka Connect's (`DeadLetterQueueReporter`), so tools that read Connect's
//! dead-letter queues read ours; kontext adds `kontext.errors.*`.
//!
//! Writing a dead letter is retried with backoff; if it still fails, the sink stops with an
//! error rather than move past a record it could neither process nor park.

use std::sync::Arc;

use bytes::Bytes;
use kontext_core::config::{DeadLetterConfig, RetryPolicy, RetryStage};
use kontext_core::envelope::{format_time, now_ms};
use kontext_core::record::{Header, ProduceRecord, Record};
use kontext_log::{LogError, Producer};
use kontext_store::StoreError;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::normalize::ProcessError;
use crate::retry::Backoff;

/// Kafka Connect's dead-letter header names.
pub mod headers {
    pub const TOPIC: &str = "__connect.errors.topic";
    pub const PARTITION: &str = "__connect.errors.partition";
    pub const OFFSET: &str = "__connect.errors.offset";
    pub const CONNECTOR_NAME: &str = "__connect.errors.connector.name";
    pub const TASK_ID: &str = "__connect.errors.task.id";
    pub const STAGE: &str = "__connect.errors.stage";
    pub const CLASS_NAME: &str = "__connect.errors.class.name";
    pub const EXCEPTION_CLASS_NAME: &str = "__connect.errors.exception.class.name";
    pub const EXCEPTION_MESSAGE: &str = "__connect.errors.exception.message";
    pub const EXCEPTION_STACKTRACE: &str = "__connect.errors.exception.stacktrace";
    /// kontext: the bounded error kind (`invalid_json`, `missing_key` ...).
    pub const KIND: &str = "kontext.errors.kind";
    /// kontext: how many times processing was attempted.
    pub const ATTEMPTS: &str = "kontext.errors.attempts";
    /// kontext: when the record was dead-lettered (RFC 3339).
    pub const TIME: &str = "kontext.errors.time";
    /// kontext: the pipeline.
    pub const PIPELINE: &str = "kontext.errors.pipeline";
    /// kontext: the stage that failed, `decode`, `normalize` or `store` (Connect's
    /// `__connect.errors.stage` says the same in Connect's terms: `VALUE_CONVERTER`,
    /// `TRANSFORMATION`, `TASK_PUT`).
    pub const KONTEXT_STAGE: &str = "kontext.errors.stage";
}

/// The stage a record failed in: a bounded label for headers and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailedStage {
    /// The record is not a valid context event (envelope, size).
    Decode,
    /// No source claims it, or its mapping fails.
    Normalize,
    /// The context store rejected it, or kept failing on it while accepting other writes.
    Store,
}

impl FailedStage {
    /// `decode`, `normalize` or `store`.
    pub fn name(self) -> &'static str {
        match self {
            FailedStage::Decode => "decode",
            FailedStage::Normalize => "normalize",
            FailedStage::Store => "store",
        }
    }

    /// The stage of a processing error.
    pub fn of(error: &ProcessError) -> Self {
        match error {
            ProcessError::Envelope(_) => FailedStage::Decode,
            _ => FailedStage::Normalize,
        }
    }

    /// Kafka Connect's name for the stage.
    fn connect_name(self) -> &'static str {
        match self {
            FailedStage::Decode => "VALUE_CONVERTER",
            FailedStage::Normalize => "TRANSFORMATION",
            FailedStage::Store => "TASK_PUT",
        }
    }
}

/// Writes dead letters for one pipeline.
pub struct DeadLetters {
    config: DeadLetterConfig,
    pipeline: String,
    group: String,
    producer: Arc<dyn Producer>,
    retry: RetryPolicy,
}

impl DeadLetters {
    pub fn new(
        config: DeadLetterConfig,
        pipeline: String,
        group: String,
        producer: Arc<dyn Producer>,
    ) -> Self {
        Self {
            config,
            pipeline,
            group,
            producer,
            retry: RetryStage::DeadLetter.builtin(),
        }
    }

    /// Retries failed writes with `policy` (`retry.dead_letter` in the pipeline file) instead
    /// of the built-in 8 attempts.
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The dead-letter copy of `record`: its bytes unchanged, error headers added.
    pub fn letter(&self, record: &Record, error: &ProcessError) -> ProduceRecord {
        let stage = FailedStage::of(error);
        let class = match stage {
            FailedStage::Decode => "kontext_core::envelope",
            _ => "kontext_stream::normalize::Router",
        };
        self.build(record, stage, class, error.kind(), error, 1)
    }

    /// The dead-letter copy of a record the context store would not take: it failed
    /// `attempts` times with `error` while the store accepted other writes.
    pub fn store_letter(
        &self,
        record: &Record,
        error: &StoreError,
        attempts: u32,
    ) -> ProduceRecord {
        self.build(
            record,
            FailedStage::Store,
            "kontext_store::ContextStore",
            store_error_kind(error),
            error,
            attempts,
        )
    }

    fn build(
        &self,
        record: &Record,
        stage: FailedStage,
        class: &str,
        kind: &str,
        error: &dyn std::error::Error,
        attempts: u32,
    ) -> ProduceRecord {
        let mut headers = record.headers.clone();
        let mut add = |k: &str, v: String| headers.push(Header::new(k, Bytes::from(v)));
        add(headers::TOPIC, record.topic.to_string());
        add(headers::PARTITION, record.partition.to_string());
        add(headers::OFFSET, record.offset.to_string());
        add(headers::CONNECTOR_NAME, self.pipeline.clone());
        add(headers::TASK_ID, self.group.clone());
        add(headers::STAGE, stage.connect_name().to_string());
        add(headers::CLASS_NAME, class.to_string());
        add(headers::EXCEPTION_CLASS_NAME, format!("{class}::{kind}"));
        add(headers::EXCEPTION_MESSAGE, error.to_string());
        add(headers::EXCEPTION_STACKTRACE, format!("{error:?}"));
        add(headers::KIND, kind.to_string());
        add(headers::ATTEMPTS, attempts.to_string());
        add(headers::TIME, format_time(now_ms()));
        add(headers::PIPELINE, self.pipeline.clone());
        add(headers::KONTEXT_STAGE, stage.name().to_string());
        ProduceRecord {
            topic: self.config.topic_for(&record.topic),
            partition: Some(record.partition),
            key: record.key.clone(),
            value: record.value.clone(),
            headers,
            timestamp_ms: Some(record.timestamp_ms),
        }
    }

    /// Writes `letters`, retrying transient failures with the dead-letter retry policy
    /// (built in: 100 ms doubling to 30 s, at most 8 attempts). `Ok(false)` means shutdown
    /// came first.
    pub async fn send(
        &self,
        letters: Vec<ProduceRecord>,
        shutdown: &CancellationToken,
    ) -> Result<bool, LogError> {
        Ok(self.send_counted(letters, shutdown).await?.is_some())
    }

    /// Like [`DeadLetters::send`], returning how many retries it took (`None`: shutdown came
    /// first).
    pub async fn send_counted(
        &self,
        letters: Vec<ProduceRecord>,
        shutdown: &CancellationToken,
    ) -> Result<Option<u32>, LogError> {
        if letters.is_empty() {
            return Ok(Some(0));
        }
        let mut backoff = Backoff::unseeded(self.retry);
        let started = tokio::time::Instant::now();
        loop {
            match self.producer.send_ref(&letters).await {
                Ok(_) => return Ok(Some(backoff.attempts())),
                Err(e) if e.is_transient() => {
                    let Some(delay) = backoff.next_delay(started.elapsed()) else {
                        return Err(e);
                    };
                    warn!(error = %e, attempt = backoff.attempts(), retry_in = ?delay, "writing dead letters failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The bounded error kind of a store failure: `store_unavailable` for a transient error that
/// outlasted the retries, `store_rejected` for a permanent one.
pub fn store_error_kind(error: &StoreError) -> &'static str {
    if error.is_transient() {
        "store_unavailable"
    } else {
        "store_rejected"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoProducer;

    #[async_trait::async_trait]
    impl Producer for NoProducer {
        async fn send(
            &self,
            _: Vec<ProduceRecord>,
        ) -> Result<Vec<kontext_core::record::RecordPosition>, LogError> {
            Err(LogError::Invalid("unused".into()))
        }
        async fn flush(&self) -> Result<(), LogError> {
            Ok(())
        }
    }

    #[test]
    fn letters_keep_the_record_and_add_connect_headers() {
        let dlq = DeadLetters::new(
            DeadLetterConfig::default(),
            "cs".into(),
            "g".into(),
            Arc::new(NoProducer),
        );
        let record = Record {
            topic: "context.orders".into(),
            partition: 4,
            offset: 17,
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"O-1")),
            value: Some(Bytes::from_static(b"{oops")),
            headers: vec![Header {
                key: "trace".into(),
                value: None,
            }],
        };
        let error = ProcessError::Envelope(kontext_core::envelope::EnvelopeError::InvalidJson(
            "eof".into(),
        ));
        let letter = dlq.letter(&record, &error);
        assert_eq!(letter.topic, "context.orders.dlq");
        assert_eq!(letter.partition, Some(4));
        assert_eq!(
            (letter.key, letter.value, letter.timestamp_ms),
            (
                record.key.clone(),
                record.value.clone(),
                Some(record.timestamp_ms)
            )
        );
        // Original headers first, untouched (a null value stays null).
        assert_eq!(letter.headers[0], record.headers[0]);
        let get = |k: &str| {
            letter
                .headers
                .iter()
                .find(|h| h.key == k)
                .and_then(|h| h.value.clone())
                .map(|v| String::from_utf8(v.to_vec()).unwrap())
        };
        assert_eq!(get(headers::TOPIC).as_deref(), Some("context.orders"));
        assert_eq!(get(headers::PARTITION).as_deref(), Some("4"));
        assert_eq!(get(headers::OFFSET).as_deref(), Some("17"));
        assert_eq!(get(headers::STAGE).as_deref(), Some("VALUE_CONVERTER"));
        assert_eq!(get(headers::KIND).as_deref(), Some("invalid_json"));
        assert_eq!(get(headers::CONNECTOR_NAME).as_deref(), Some("cs"));
        assert!(get(headers::EXCEPTION_MESSAGE)
            .unwrap()
            .contains("not valid JSON"));
    }
}
