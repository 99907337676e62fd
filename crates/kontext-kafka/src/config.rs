//! The Kafka backend's configuration, and the librdkafka settings derived from it.

use std::collections::BTreeMap;
use std::time::Duration;

use kontext_log::{LogError, OffsetReset};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// How kontext connects to Apache Kafka.
///
/// ```yaml
/// bootstrap_servers: "127.0.0.1:9092"
/// client_id: kontext            # default
/// replication_factor: 3         # default: the broker's default.replication.factor
/// request_timeout: 30s          # default
/// metadata_max_age: 5m          # default
/// properties:                   # any other librdkafka setting, for every client
///   security.protocol: SASL_SSL
///   sasl.mechanism: SCRAM-SHA-512
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub bootstrap_servers: String,

    /// `client.id` of every client this backend creates; shows up in broker logs, quotas and
    /// `kafka-consumer-groups --describe`.
    #[serde(default = "default_client_id")]
    pub client_id: String,

    /// Replication factor of topics created by [`kontext_log::Log::create_topic`]. `None` asks
    /// the broker to use its `default.replication.factor` (CreateTopics with -1), which is what
    /// an operator of the cluster most likely wants; set it to pin it.
    #[serde(default)]
    pub replication_factor: Option<i32>,

    /// Bound on admin and metadata calls (create, list, describe, committed offsets, metadata
    /// refreshes). Not a bound on synchronous commits, whose outcome librdkafka waits for
    /// without a deadline, nor on produce: delivery is bounded by librdkafka's
    /// `delivery.timeout.ms` (settable in `properties`).
    #[serde(default = "default_request_timeout", with = "kontext_core::duration")]
    pub request_timeout: Duration,

    /// How long the producer trusts a cached partition count before fetching it again. Keys
    /// are routed with the count, so after partitions are added a producer keeps the old
    /// routing for at most this long — the same bound as the Java client's
    /// `metadata.max.age.ms` (5 minutes by default).
    #[serde(default = "default_metadata_max_age", with = "kontext_core::duration")]
    pub metadata_max_age: Duration,

    /// `group.id` of the clients that read a partition's range without joining a group
    /// ([`kontext_log::Log::read_partition`]: restores, the dead-letter tools, lag). They never
    /// commit, but librdkafka still looks up the group's coordinator, which on a cluster with
    /// ACLs needs DESCRIBE on the group: a pipeline sets `kontext.<pipeline>.reader`, under
    /// the prefix of its other groups. Default `kontext-partition-reader`.
    #[serde(default = "default_reader_group")]
    pub reader_group: String,

    /// Extra librdkafka settings applied to every client (producer, consumers, admin):
    /// `security.protocol`, `sasl.*`, `ssl.*`, `compression.type`, `linger.ms` ... The
    /// settings that carry kontext's guarantees (see [`RESERVED_PROPERTIES`]) are rejected.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// How often, by default, librdkafka commits the offsets a member stored with
/// [`kontext_log::Consumer::commit_in_background`] (librdkafka's own default is 5 s). The
/// pipeline's loops record their offsets in their own state and commit after every batch; a
/// group commit per batch was an OffsetCommit request (and a write to `__consumer_offsets`) per
/// batch and group, about a tenth of a local broker's CPU at 1 000 events/s (BENCHMARKS.md,
/// "Group commits once a second"). One a second keeps `/v1/lag` and `kafka-consumer-groups`
/// within a second of the truth; a crash re-delivers at most that much, which the loops skip.
pub const AUTO_COMMIT_INTERVAL_MS: u64 = 1_000;

/// librdkafka settings that kontext sets itself because its delivery and commit guarantees
/// depend on them; [`KafkaConfig::validate`] rejects them in `properties`, as the pipeline
/// file's validation does.
pub use kontext_core::config::RESERVED_KAFKA_PROPERTIES as RESERVED_PROPERTIES;

impl KafkaConfig {
    /// A configuration with every default, for the given bootstrap servers.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            client_id: default_client_id(),
            replication_factor: None,
            request_timeout: default_request_timeout(),
            metadata_max_age: default_metadata_max_age(),
            reader_group: default_reader_group(),
            properties: BTreeMap::new(),
        }
    }

    /// Checks the configuration and reports every problem at once (one message, `; `-joined),
    /// so that fixing a config file takes one round trip.
    pub fn validate(&self) -> Result<(), LogError> {
        let mut problems = Vec::new();
        if self.bootstrap_servers.trim().is_empty() {
            problems.push("bootstrap_servers must not be empty".to_string());
        }
        if self.client_id.trim().is_empty() {
            problems.push("client_id must not be empty".to_string());
        }
        if let Some(rf) = self.replication_factor {
            if rf < 1 || rf > i32::from(i16::MAX) {
                problems.push(format!(
                    "replication_factor must be between 1 and 32767 (or absent for the broker's default), got {rf}"
                ));
            }
        }
        if self.request_timeout.is_zero() {
            problems.push("request_timeout must be positive".to_string());
        }
        if self.metadata_max_age.is_zero() {
            problems.push("metadata_max_age must be positive".to_string());
        }
        for key in self.properties.keys() {
            if RESERVED_PROPERTIES.contains(&key.as_str()) {
                problems.push(format!(
                    "properties.{key} is set by kontext and cannot be overridden"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LogError::Invalid(format!(
                "kafka config: {}",
                problems.join("; ")
            )))
        }
    }

    /// Settings shared by every client: connection, identity, and those of the user's
    /// properties that apply to a client of `role` ([`ClientRole::takes`]).
    pub(crate) fn base_client_config(&self, role: ClientRole) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id);
        for (key, value) in &self.properties {
            if role.takes(key) {
                config.set(key, value);
            }
        }
        config
    }

    /// The client that reads metadata (topics, partitions, watermarks): the admin's settings,
    /// and never a topic auto-created by looking it up, whatever `properties` say (a missing
    /// topic is created by `create_topic`, with the spec's partitions and compaction, not the
    /// broker's defaults).
    pub(crate) fn metadata_client_config(&self) -> ClientConfig {
        let mut config = self.base_client_config(ClientRole::Admin);
        config.set("allow.auto.create.topics", "false");
        config
    }

    /// The producer: idempotent with `acks=all`, so a retried batch is never duplicated or
    /// reordered within a partition. `linger.ms` = 0 unless `properties` set it: kontext
    /// produces a batch and waits for it before it commits, so lingering only delays every
    /// hop (librdkafka still batches what is queued while a request is in flight). `murmur2_random` is librdkafka's Java-compatible
    /// partitioner; kontext sets the partition of keyed records itself (see `producer.rs`),
    /// this only keeps librdkafka consistent should a keyed record ever reach it unpartitioned.
    pub(crate) fn producer_config(&self) -> ClientConfig {
        let mut config = self.base_client_config(ClientRole::Producer);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random");
        if !self.properties.contains_key("linger.ms") {
            config.set("linger.ms", "0");
        }
        config
    }

    /// A transactional producer: [`KafkaConfig::producer_config`] plus `transactional.id`, and
    /// `transaction.timeout.ms` = 10 s unless `properties` set it (Kafka Streams' default under
    /// exactly-once: a transaction left open by a crashed producer whose id is never reused
    /// blocks `read_committed` readers of its partitions until it times out). librdkafka
    /// refuses a transactional client whose `message.timeout.ms` (alias `delivery.timeout.ms`)
    /// exceeds it, or whose `socket.timeout.ms` exceeds it by more than 100 ms: when the user
    /// set those and not the transaction timeout, it is raised to cover them.
    pub(crate) fn transactional_producer_config(&self, transactional_id: &str) -> ClientConfig {
        let mut config = self.producer_config();
        config.set("transactional.id", transactional_id);
        if !self.properties.contains_key("transaction.timeout.ms") {
            let set = |key: &str| {
                self.properties
                    .get(key)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            let timeout = ["message.timeout.ms", "delivery.timeout.ms"]
                .into_iter()
                .filter_map(set)
                .chain(set("socket.timeout.ms").map(|t| t.saturating_sub(100)))
                .fold(10_000, u64::max);
            config.set("transaction.timeout.ms", timeout.to_string());
        }
        config
    }

    /// A client of group `group_id` that never stores offsets on its own: offsets move only
    /// through [`kontext_log::Consumer::commit`] (at once) and
    /// [`kontext_log::Consumer::commit_in_background`], after the records' effects are durable.
    /// With `auto_commit` librdkafka commits what the latter stored every
    /// `auto.commit.interval.ms` ([`AUTO_COMMIT_INTERVAL_MS`] unless `properties` set it), when
    /// a rebalance revokes partitions, and at close; without it (a member whose offsets go
    /// through transactions, `ConsumerConfig::transactional`, or a client outside the group)
    /// nothing is committed on its own. `read_committed` hides records of aborted transactions
    /// (and of open ones until they end).
    pub(crate) fn consumer_config(
        &self,
        group_id: &str,
        reset: OffsetReset,
        auto_commit: bool,
    ) -> ClientConfig {
        let mut config = self.base_client_config(ClientRole::Consumer);
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", auto_commit.to_string())
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            .set(
                "auto.offset.reset",
                match reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            );
        if auto_commit && !self.properties.contains_key("auto.commit.interval.ms") {
            config.set(
                "auto.commit.interval.ms",
                AUTO_COMMIT_INTERVAL_MS.to_string(),
            );
        }
        config
    }

    /// [`KafkaConfig::consumer_config`] for a client that uses the group's id but is no member
    /// of it (reading committed offsets, resetting them, reading a partition): it never stores
    /// offsets, and says so by committing none on its own.
    pub(crate) fn outsider_config(&self, group_id: &str) -> ClientConfig {
        self.consumer_config(group_id, OffsetReset::default(), false)
    }
}

/// What a librdkafka client is for, which decides the user's properties it gets: librdkafka
/// warns (CONFWARN) about every consumer property given to a producer and vice versa, so
/// `group.instance.id` in `properties` (static membership, which the docs recommend) made
/// every producer log two warnings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientRole {
    Producer,
    Consumer,
    /// The admin and metadata clients: only properties of every client (security, ...).
    Admin,
}

/// librdkafka's consumer-only properties (scope `C` in its CONFIGURATION.md).
const CONSUMER_ONLY: &[&str] = &[
    "group.instance.id",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "group.protocol.type",
    "group.protocol",
    "group.remote.assignor",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "auto.commit.interval.ms",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "check.crcs",
];

/// librdkafka's producer-only properties (scope `P`).
const PRODUCER_ONLY: &[&str] = &[
    "transaction.timeout.ms",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
];

impl ClientRole {
    /// Whether a client of this role gets property `key`. Properties not listed as consumer-
    /// or producer-only go to every client, so an unknown one still reaches librdkafka.
    pub(crate) fn takes(self, key: &str) -> bool {
        if CONSUMER_ONLY.contains(&key) {
            self == ClientRole::Consumer
        } else if PRODUCER_ONLY.contains(&key) {
            self == ClientRole::Producer
        } else {
            true
        }
    }
}

fn default_client_id() -> String {
    "kontext".to_string()
}

fn default_reader_group() -> String {
    "kontext-partition-reader".to_string()
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_metadata_max_age() -> Duration {
    Duration::from_secs(300)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looking a missing topic up must not create it with the broker's defaults, even when
    /// the user's properties allow auto-creation for their clients.
    #[test]
    fn the_metadata_client_never_auto_creates_topics() {
        let mut config = KafkaConfig::new("localhost:9092".to_string());
        (config.properties).insert("allow.auto.create.topics".into(), "true".into());
        assert_eq!(
            config
                .metadata_client_config()
                .get("allow.auto.create.topics"),
            Some("false")
        );
    }

    #[test]
    fn deserializes_with_defaults_and_typed_durations() {
        let config: KafkaConfig = serde_json::from_str(
            r#"{"bootstrap_servers": "b:9092", "request_timeout": "5s",
                "properties": {"security.protocol": "SSL"}}"#,
        )
        .unwrap();
        assert_eq!(config.client_id, "kontext");
        assert_eq!(config.replication_factor, None);
        assert_eq!(config.request_timeout, Duration::from_secs(5));
        assert_eq!(config.metadata_max_age, Duration::from_secs(300));
        assert_eq!(config.properties["security.protocol"], "SSL");
        config.validate().unwrap();
    }

    #[test]
    fn each_client_gets_the_properties_of_its_role() {
        let mut config = KafkaConfig::new("b:9092");
        for (k, v) in [
            ("group.instance.id", "kontext-1"),
            ("linger.ms", "5"),
            ("security.protocol", "SSL"),
            ("some.future.property", "x"),
        ] {
            config.properties.insert(k.into(), v.into());
        }
        let consumer = config.consumer_config("g", OffsetReset::Earliest, true);
        let producer = config.producer_config();
        let admin = config.base_client_config(ClientRole::Admin);
        assert_eq!(consumer.get("group.instance.id"), Some("kontext-1"));
        assert_eq!(consumer.get("linger.ms"), None);
        assert_eq!(producer.get("group.instance.id"), None);
        assert_eq!(producer.get("linger.ms"), Some("5"));
        assert_eq!(admin.get("group.instance.id"), None);
        assert_eq!(admin.get("linger.ms"), None);
        for client in [&consumer, &producer, &admin] {
            assert_eq!(client.get("security.protocol"), Some("SSL"));
            assert_eq!(client.get("some.future.property"), Some("x"));
        }
        // Without the user's linger.ms, producers do not linger.
        let plain = KafkaConfig::new("b:9092");
        assert_eq!(plain.producer_config().get("linger.ms"), Some("0"));
        assert_eq!(
            plain.transactional_producer_config("t").get("linger.ms"),
            Some("0")
        );
        assert_eq!(
            plain
                .consumer_config("g", OffsetReset::Earliest, true)
                .get("linger.ms"),
            None
        );
        // Stored offsets are committed once a second, unless the user chose an interval.
        let members = plain.consumer_config("g", OffsetReset::Earliest, true);
        assert_eq!(members.get("enable.auto.commit"), Some("true"));
        assert_eq!(members.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(members.get("auto.commit.interval.ms"), Some("1000"));
        // Clients that only read or reset a group's offsets commit nothing on their own.
        let outsider = plain.outsider_config("g");
        assert_eq!(outsider.get("enable.auto.commit"), Some("false"));
        assert_eq!(outsider.get("group.id"), Some("g"));
        config
            .properties
            .insert("auto.commit.interval.ms".into(), "5000".into());
        let chosen = config.consumer_config("g", OffsetReset::Earliest, true);
        assert_eq!(chosen.get("auto.commit.interval.ms"), Some("5000"));
        assert_eq!(
            config.producer_config().get("auto.commit.interval.ms"),
            None
        );
        // kontext's own transactional settings still win over the user's default.
        config
            .properties
            .insert("transaction.timeout.ms".into(), "30000".into());
        let txn = config.transactional_producer_config("t");
        assert_eq!(txn.get("transaction.timeout.ms"), Some("30000"));
        assert_eq!(txn.get("transactional.id"), Some("t"));
    }

    /// `delivery.timeout.ms` (or `socket.timeout.ms`) above the 10 s transaction timeout made
    /// librdkafka refuse the transactional client, so `exactly_once` stopped the pipeline at
    /// start. The transaction timeout now covers them; librdkafka creates the client (no broker
    /// needed).
    #[test]
    fn a_long_delivery_timeout_does_not_rule_out_exactly_once() {
        use rdkafka::producer::FutureProducer;
        for (key, value, expected) in [
            ("delivery.timeout.ms", "60000", "60000"),
            ("message.timeout.ms", "45000", "45000"),
            ("socket.timeout.ms", "30000", "29900"),
            ("delivery.timeout.ms", "5000", "10000"),
        ] {
            let mut config = KafkaConfig::new("127.0.0.1:1".to_owned());
            config.properties.insert(key.into(), value.into());
            let txn = config.transactional_producer_config("t");
            assert_eq!(txn.get("transaction.timeout.ms"), Some(expected), "{key}");
            let created: Result<FutureProducer, _> = txn.create();
            assert!(created.is_ok(), "{key}={value}: {:?}", created.err());
        }
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = serde_json::from_str::<KafkaConfig>(r#"{"bootstrap_servers": "b", "acks": 1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let mut config = KafkaConfig::new(" ");
        config.replication_factor = Some(0);
        config.request_timeout = Duration::ZERO;
        config
            .properties
            .insert("enable.auto.commit".into(), "true".into());
        let message = config.validate().unwrap_err().to_string();
        for expected in [
            "bootstrap_servers",
            "replication_factor",
            "request_timeout",
            "enable.auto.commit",
        ] {
            assert!(
                message.contains(expected),
                "{expected} missing in {message}"
            );
        }
    }
}
