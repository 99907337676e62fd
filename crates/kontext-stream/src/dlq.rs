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
    /// kontext: set when the dead letter has no value because the record's did not fit
    /// ([`super::LETTER_BYTES_CAP`]): the record's value size in bytes. The record itself is
    /// in the log at the `__connect.errors.*` coordinates.
    pub const VALUE_OMITTED: &str = "kontext.errors.value.omitted.bytes";
    /// kontext: set when, even without its value, the letter did not fit, so the record's own
    /// headers were left out too: their size in bytes (names and values).
    pub const HEADERS_OMITTED: &str = "kontext.errors.headers.omitted.bytes";
    /// kontext: set when, without its value and headers, the letter still did not fit, so the
    /// record's key was left out too: its size in bytes.
    pub const KEY_OMITTED: &str = "kontext.errors.key.omitted.bytes";
}

/// The most of an error's message (and of its debug form) a dead letter's headers carry: an
/// error can quote the input (a jq error quotes the value it failed on).
const ERROR_TEXT_CAP: usize = 16 * 1024;

/// The largest dead letter (key, value and headers) written with its value. Below librdkafka's
/// default `message.max.bytes` (1 000 000) and Kafka's default `max.message.bytes` (1 048 588),
/// with room for the batch overhead: a bigger letter would be refused by the producer, a
/// permanent error, and the sink would stop on its partition for good. A record whose letter
/// would be bigger (a `record_too_large` one always is at the default limits) is dead-lettered
/// without its value, with [`headers::VALUE_OMITTED`].
pub const LETTER_BYTES_CAP: usize = 900_000;

/// `text`, cut to [`ERROR_TEXT_CAP`] bytes (at a character boundary) with `…` when longer.
fn capped(mut text: String) -> String {
    if text.len() > ERROR_TEXT_CAP {
        let mut end = ERROR_TEXT_CAP;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
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
        add(headers::EXCEPTION_MESSAGE, capped(error.to_string()));
        add(headers::EXCEPTION_STACKTRACE, capped(format!("{error:?}")));
        add(headers::KIND, kind.to_string());
        add(headers::ATTEMPTS, attempts.to_string());
        add(headers::TIME, format_time(now_ms()));
        add(headers::PIPELINE, self.pipeline.clone());
        add(headers::KONTEXT_STAGE, stage.name().to_string());
        // Too big a letter is refused by the producer, a permanent error that would stop the
        // sink on this record at every start: leave out the value, then the record's own
        // headers, then its key, until it fits. Each omission is said in a header, and a
        // letter with any is never replayed (`kontext dlq replay` checks VALUE_OMITTED).
        let size = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        let header_size = |h: &Header| h.key.len() + size(&h.value);
        let total = |key: &Option<Bytes>, value: &Option<Bytes>, headers: &[Header]| {
            size(key) + size(value) + headers.iter().map(header_size).sum::<usize>()
        };
        let omitted = |name: &str, n: usize| Header::new(name, Bytes::from(n.to_string()));
        let (mut key, mut value) = (record.key.clone(), record.value.clone());
        if total(&key, &value, &headers) > LETTER_BYTES_CAP {
            headers.push(omitted(headers::VALUE_OMITTED, size(&value)));
            value = None;
        }
        if total(&key, &value, &headers) > LETTER_BYTES_CAP {
            // The record's own headers come first in `headers`.
            let own: usize = headers
                .drain(..record.headers.len())
                .map(|h| header_size(&h))
                .sum();
            headers.push(omitted(headers::HEADERS_OMITTED, own));
        }
        if total(&key, &value, &headers) > LETTER_BYTES_CAP {
            headers.push(omitted(headers::KEY_OMITTED, size(&key)));
            key = None;
        }
        ProduceRecord {
            topic: self.config.topic_for(&record.topic),
            partition: Some(record.partition),
            key,
            value,
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

    /// A letter that would not fit a default Kafka producer goes without its value (the record
    /// stays in the log at the letter's coordinates); one that fits keeps it byte for byte.
    #[test]
    fn a_letter_too_large_for_the_log_is_written_without_its_value() {
        let dlq = DeadLetters::new(
            DeadLetterConfig::default(),
            "cs".into(),
            "g".into(),
            Arc::new(NoProducer),
        );
        let record = |bytes: usize| Record {
            topic: "context.orders".into(),
            partition: 0,
            offset: 3,
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"O-1")),
            value: Some(Bytes::from(vec![b'x'; bytes])),
            headers: Vec::new(),
        };
        let error = ProcessError::Envelope(kontext_core::envelope::EnvelopeError::InvalidJson(
            "eof".into(),
        ));
        let omitted = |letter: &ProduceRecord| {
            letter
                .headers
                .iter()
                .find(|h| h.key == headers::VALUE_OMITTED)
                .and_then(|h| h.value.clone())
        };
        let small = dlq.letter(&record(LETTER_BYTES_CAP / 2), &error);
        assert_eq!(
            small.value.as_ref().map(Bytes::len),
            Some(LETTER_BYTES_CAP / 2)
        );
        assert_eq!(omitted(&small), None);
        let big = dlq.letter(&record(LETTER_BYTES_CAP), &error);
        assert_eq!(big.value, None);
        assert_eq!(
            omitted(&big),
            Some(Bytes::from(LETTER_BYTES_CAP.to_string()))
        );
        assert_eq!(big.key, Some(Bytes::from_static(b"O-1")));
        let offset = big.headers.iter().find(|h| h.key == headers::OFFSET);
        assert_eq!(offset.and_then(|h| h.value.clone()), Some(Bytes::from("3")));
    }

    /// Without its value a letter can still be too big: a record's own headers, or its key,
    /// near the cap. They are left out in turn until the letter fits, and a long error text
    /// is cut, so no record can make a letter the producer refuses.
    #[test]
    fn a_letter_fits_whatever_part_of_the_record_is_big() {
        let dlq = DeadLetters::new(
            DeadLetterConfig::default(),
            "cs".into(),
            "g".into(),
            Arc::new(NoProducer),
        );
        let base = Record {
            topic: "context.orders".into(),
            partition: 0,
            offset: 3,
            timestamp_ms: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"O-1")),
            value: Some(Bytes::from_static(b"{}")),
            headers: vec![Header::new("trace", Bytes::from_static(b"t-1"))],
        };
        let big = Bytes::from(vec![b'x'; LETTER_BYTES_CAP]);
        let with_big_headers = Record {
            headers: vec![
                Header::new("a", big.slice(..LETTER_BYTES_CAP / 2)),
                Header::new("b", big.slice(..LETTER_BYTES_CAP / 2)),
            ],
            ..base.clone()
        };
        let with_big_key = Record {
            key: Some(big.clone()),
            ..base.clone()
        };
        let long_error = ProcessError::Envelope(
            kontext_core::envelope::EnvelopeError::InvalidJson("y".repeat(2 * LETTER_BYTES_CAP)),
        );
        let size = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        let header = |letter: &ProduceRecord, name: &str| {
            letter
                .headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value.clone())
        };
        for (record, error) in [
            (&with_big_headers, &long_error),
            (&with_big_key, &long_error),
            (&base, &long_error),
        ] {
            let letter = dlq.letter(record, error);
            let bytes = size(&letter.key)
                + size(&letter.value)
                + letter
                    .headers
                    .iter()
                    .map(|h| h.key.len() + size(&h.value))
                    .sum::<usize>();
            assert!(bytes <= LETTER_BYTES_CAP, "{bytes}");
            let message = header(&letter, headers::EXCEPTION_MESSAGE).unwrap();
            assert!(message.len() <= ERROR_TEXT_CAP + 3 && message.ends_with("…".as_bytes()));
        }
        // Only as much is left out as needed, and each omission is said.
        let letter = dlq.letter(&with_big_headers, &long_error);
        assert_eq!(header(&letter, headers::VALUE_OMITTED), Some("2".into()));
        assert_eq!(
            header(&letter, headers::HEADERS_OMITTED),
            Some((LETTER_BYTES_CAP + 2).to_string().into())
        );
        assert!(header(&letter, "a").is_none() && header(&letter, "b").is_none());
        assert_eq!(letter.key, base.key);
        let letter = dlq.letter(&with_big_key, &long_error);
        assert_eq!(letter.key, None);
        assert_eq!(
            header(&letter, headers::KEY_OMITTED),
            Some(LETTER_BYTES_CAP.to_string().into())
        );
        assert_eq!(header(&letter, "trace"), None, "headers go before the key");
        let letter = dlq.letter(&base, &long_error);
        assert_eq!(
            letter.value, base.value,
            "a cut error text needs no omission"
        );
        assert_eq!(header(&letter, "trace"), Some("t-1".into()));
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
