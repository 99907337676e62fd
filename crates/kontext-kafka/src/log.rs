//! [`KafkaLog`]: the admin surface of the Kafka backend and the factory of its clients.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kontext_core::record::{Record, TopicPartition};
use kontext_log::{
    Consumer, ConsumerConfig, CreateOutcome, Log, LogError, Producer, Retention, TopicDescription,
    TopicSpec, TransactionalProducer,
};
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::{ClientRole, KafkaConfig};
use crate::consumer::{to_record, GroupConsumer, GroupContext, KafkaConsumer};
use crate::error::{code_error, log_error};
use crate::metadata::{blocking, MetadataClient, PartitionCounts, WatchContext};
use crate::producer::{KafkaProducer, KafkaTransactionalProducer};

/// How long [`KafkaLog::explained`] waits for the metadata client to connect: a SASL handshake
/// fails within a second.
const AUTH_PROBE: Duration = Duration::from_secs(3);

/// How many groups' offsets clients [`KafkaLog`] keeps ([`Log::committed_offsets`]): a
/// pipeline asks about a handful of groups; more (rebuilds' groups over a long life) start the
/// cache over.
const OFFSETS_CLIENTS: usize = 16;

/// How many queued events (logs, errors) a kept offsets client serves after each fetch: more
/// than a fetch's own, so that a backlog shrinks; each poll without one returns at once.
const QUEUED_EVENTS_PER_FETCH: usize = 64;

/// The Kafka backend of the kontext [`Log`]. Creating it connects to nothing yet: librdkafka
/// connects on first use, so an unreachable cluster shows up as [`LogError::Unavailable`]
/// from the first call, not from the constructor.
pub struct KafkaLog {
    config: KafkaConfig,
    admin: AdminClient<DefaultClientContext>,
    metadata: Arc<MetadataClient>,
    partitions: Arc<PartitionCounts>,
    /// Created on the first `producer()` call and shared afterwards.
    producer: Mutex<Option<Arc<KafkaProducer>>>,
    /// Per group, the client that reads its committed offsets: kept, so that every
    /// `/metrics` scrape and `/v1/lag` request does not connect a new client to the cluster.
    offsets_clients: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

impl KafkaLog {
    /// An idempotent producer on a librdkafka client of its own (so its own broker connections).
    fn new_producer(&self) -> Result<Arc<KafkaProducer>, LogError> {
        let inner: FutureProducer =
            create(&self.config.producer_config(), "creating the producer")?;
        Ok(Arc::new(KafkaProducer::new(
            inner,
            self.partitions.clone(),
            self.config.request_timeout,
        )))
    }

    /// Checks `config` (every problem reported at once) and creates the admin and metadata
    /// clients.
    pub fn new(config: KafkaConfig) -> Result<Self, LogError> {
        config.validate()?;
        let admin: AdminClient<DefaultClientContext> = create(
            &config.base_client_config(ClientRole::Admin),
            "creating the admin client",
        )?;
        let metadata_client: BaseConsumer<WatchContext> = config
            .metadata_client_config()
            .create_with_context(WatchContext::default())
            .map_err(|e| config_error("creating the metadata client", e))?;
        let metadata = Arc::new(MetadataClient::new(metadata_client, config.request_timeout));
        let partitions = Arc::new(PartitionCounts::new(
            metadata.clone(),
            config.metadata_max_age,
        ));
        Ok(Self {
            config,
            admin,
            metadata,
            partitions,
            producer: Mutex::new(None),
            offsets_clients: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration this log was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The client [`Log::committed_offsets`] asks for `group`'s offsets: one with the group's
    /// id that never subscribes (so it neither joins the group nor disturbs its members),
    /// created on the first request and kept. Past [`OFFSETS_CLIENTS`] groups the kept ones are
    /// closed, on the blocking pool (closing waits for librdkafka's threads).
    fn offsets_client(&self, group: &str) -> Result<Arc<BaseConsumer>, LogError> {
        let mut clients = self.offsets_clients.lock();
        if let Some(client) = clients.get(group) {
            return Ok(client.clone());
        }
        let client: Arc<BaseConsumer> = Arc::new(create(
            &self.config.outsider_config(group),
            "creating the offsets client",
        )?);
        if clients.len() >= OFFSETS_CLIENTS {
            let old = std::mem::take(&mut *clients);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(old))),
                Err(_) => drop(old),
            }
        }
        clients.insert(group.to_string(), client.clone());
        Ok(client)
    }

    fn admin_options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.config.request_timeout))
            .operation_timeout(Some(self.config.request_timeout))
    }

    /// Waits until the metadata shows `topic` with `partitions` partitions, so that a producer
    /// or consumer created right after `create_topic` finds it (CreateTopics returns when the
    /// controller committed the topic, which the broker's metadata cache may not show yet).
    async fn await_topic(&self, topic: &str, partitions: i32) -> Result<(), LogError> {
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            if let Some(ids) = self.metadata.partitions(topic).await? {
                if ids.len() == partitions as usize {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(LogError::Unavailable(format!(
                    "topic {topic:?} was created but did not appear in the metadata within {:?}",
                    self.config.request_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `cleanup.policy`, `retention.ms` and `retention.bytes` of a topic.
    async fn topic_config(&self, topic: &str) -> Result<(bool, Retention), LogError> {
        let results = self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &self.admin_options())
            .await
            .map_err(|e| log_error(&format!("describing the config of {topic:?}"), e))?;
        let resource = match results.into_iter().next() {
            Some(Ok(resource)) => resource,
            Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                return Err(LogError::UnknownTopic(topic.to_string()))
            }
            Some(Err(code)) => {
                return Err(code_error(
                    &format!("describing the config of {topic:?}"),
                    code,
                ))
            }
            None => {
                return Err(LogError::Kafka {
                    message: format!("describing the config of {topic:?}: empty answer"),
                    transient: true,
                })
            }
        };
        let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
        let compacted = value("cleanup.policy")
            .map(|p| p.split(',').any(|v| v.trim() == "compact"))
            .unwrap_or(false);
        // Kafka spells "unlimited" as -1.
        let time = value("retention.ms")
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        let bytes = value("retention.bytes")
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(|b| u64::try_from(b).ok());
        Ok((compacted, Retention { time, bytes }))
    }
}

impl KafkaLog {
    /// `result`, unless it failed for want of the cluster (a timeout, no broker reachable)
    /// while the cluster was refusing the credentials or the TLS handshake: then that, which retrying will not
    /// change, instead of a timeout that retrying seems to promise to fix.
    async fn explained<T>(&self, result: Result<T, LogError>) -> Result<T, LogError> {
        let e = match result {
            Err(e) if e.is_transient() => e,
            other => return other,
        };
        match self.metadata.refused_handshake(AUTH_PROBE).await {
            Some(refusal) => Err(LogError::Kafka {
                message: refusal.explain(&e),
                transient: false,
            }),
            None => Err(e),
        }
    }

    /// [`Log::create_topic`], without [`KafkaLog::explained`].
    async fn create_topic_now(&self, spec: &TopicSpec) -> Result<CreateOutcome, LogError> {
        spec.check_name()?;
        if spec.partitions < 1 {
            return Err(LogError::Invalid(format!(
                "topic {:?} needs at least one partition, got {}",
                spec.name, spec.partitions
            )));
        }
        // An existing topic is only looked up: a principal without Create on topics a
        // platform team made beforehand can run the pipeline (CreateTopics would be refused
        // before the broker says the topic exists).
        if let Some(ids) = self.metadata.partitions(&spec.name).await? {
            return existing_topic(spec, ids.len());
        }
        let retention_ms = match spec.retention.time {
            Some(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX).to_string(),
            None => "-1".to_string(),
        };
        let retention_bytes = match spec.retention.bytes {
            Some(b) => i64::try_from(b).unwrap_or(i64::MAX).to_string(),
            None => "-1".to_string(),
        };
        let replication = TopicReplication::Fixed(self.config.replication_factor.unwrap_or(-1));
        let topic = NewTopic::new(&spec.name, spec.partitions, replication)
            .set(
                "cleanup.policy",
                if spec.compacted { "compact" } else { "delete" },
            )
            .set("retention.ms", &retention_ms)
            .set("retention.bytes", &retention_bytes);
        let results = self
            .admin
            .create_topics([&topic], &self.admin_options())
            .await
            .map_err(|e| log_error(&format!("creating topic {:?}", spec.name), e))?;
        match results.into_iter().next() {
            Some(Ok(_)) => {
                self.await_topic(&spec.name, spec.partitions).await?;
                Ok(CreateOutcome::Created)
            }
            // Created by someone else since the lookup.
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
                let existing = self
                    .metadata
                    .partitions(&spec.name)
                    .await?
                    // Deleted again between the two calls: report it as the race it is.
                    .ok_or_else(|| LogError::UnknownTopic(spec.name.clone()))?;
                existing_topic(spec, existing.len())
            }
            Some(Err((_, code @ RDKafkaErrorCode::InvalidTopic)))
            | Some(Err((_, code @ RDKafkaErrorCode::InvalidPartitions)))
            | Some(Err((_, code @ RDKafkaErrorCode::InvalidReplicationFactor)))
            | Some(Err((_, code @ RDKafkaErrorCode::InvalidConfig))) => Err(LogError::Invalid(
                format!("creating topic {:?}: {code}", spec.name),
            )),
            Some(Err((_, code))) => {
                Err(code_error(&format!("creating topic {:?}", spec.name), code))
            }
            None => Err(LogError::Kafka {
                message: format!("creating topic {:?}: empty answer", spec.name),
                transient: true,
            }),
        }
    }

    /// [`Log::list_topics`], without [`KafkaLog::explained`].
    async fn list_topics_now(&self) -> Result<Vec<String>, LogError> {
        let mut names: Vec<String> = self
            .metadata
            .topics()
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| !name.starts_with("__"))
            .collect();
        names.sort();
        Ok(names)
    }

    /// [`Log::describe_topic`], without [`KafkaLog::explained`].
    async fn describe_topic_now(&self, topic: &str) -> Result<TopicDescription, LogError> {
        let partitions = self
            .metadata
            .partitions(topic)
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))?;
        let (compacted, retention) = self.topic_config(topic).await?;
        let partitions = self.metadata.watermarks(topic, partitions).await?;
        Ok(TopicDescription {
            name: topic.to_string(),
            compacted,
            retention,
            partitions,
        })
    }
}

/// What [`Log::create_topic`] answers for `spec` when its topic exists with `existing`
/// partitions in the metadata. None yet: someone else is creating it (the lookup, or our
/// CreateTopics's `TopicAlreadyExists`, came before its partitions), a transient error.
fn existing_topic(spec: &TopicSpec, existing: usize) -> Result<CreateOutcome, LogError> {
    let existing = i32::try_from(existing).unwrap_or(i32::MAX);
    if existing == 0 {
        Err(LogError::Kafka {
            message: format!("topic {:?} has no partitions yet", spec.name),
            transient: true,
        })
    } else if existing == spec.partitions {
        Ok(CreateOutcome::AlreadyExists)
    } else {
        Err(LogError::TopicMismatch {
            topic: spec.name.clone(),
            existing,
            requested: spec.partitions,
        })
    }
}

#[async_trait]
impl Log for KafkaLog {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    /// Creates the topic with `cleanup.policy=compact` if asked, and with `retention.ms` /
    /// `retention.bytes` set explicitly (-1 for `None`): Kafka's defaults (7 days, unlimited)
    /// would otherwise silently differ from the spec's "unlimited".
    async fn create_topic(&self, spec: &TopicSpec) -> Result<CreateOutcome, LogError> {
        let result = self.create_topic_now(spec).await;
        self.explained(result).await
    }

    async fn list_topics(&self) -> Result<Vec<String>, LogError> {
        let result = self.list_topics_now().await;
        self.explained(result).await
    }

    /// A client that never joins a group: `assign` at `from`, read until `to` or the end of
    /// the partition (`enable.partition.eof`), within the request timeout per poll without
    /// progress.
    async fn read_partition(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<Vec<Record>, LogError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let mut config = self.config.outsider_config(&self.config.reader_group);
        config.set("enable.partition.eof", "true");
        let reader: BaseConsumer<ReaderContext> = config
            .create_with_context(ReaderContext)
            .map_err(|e| config_error("creating a partition reader", e))?;
        let mut list = TopicPartitionList::with_capacity(1);
        list.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(|e| log_error("assigning the partition to read", e))?;
        reader
            .assign(&list)
            .map_err(|e| log_error("assigning the partition to read", e))?;
        let (topic, stall) = (Arc::<str>::from(topic), self.config.request_timeout);
        blocking(move || {
            let mut out = Vec::new();
            let mut last_progress = Instant::now();
            loop {
                match reader.poll(Duration::from_millis(200)) {
                    Some(Ok(message)) => {
                        last_progress = Instant::now();
                        if message.offset() >= to {
                            return Ok(out);
                        }
                        out.push(to_record(&message, topic.clone()));
                        if message.offset() + 1 >= to {
                            return Ok(out);
                        }
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => return Ok(out),
                    Some(Err(e)) => {
                        return Err(log_error(&format!("reading {topic}/{partition}"), e))
                    }
                    None if last_progress.elapsed() > stall => {
                        return Err(LogError::Kafka {
                            message: format!(
                                "reading {topic}/{partition}: nothing arrived for {stall:?} before offset {to}"
                            ),
                            transient: true,
                        })
                    }
                    None => {}
                }
            }
        })
        .await
    }

    async fn describe_topic(&self, topic: &str) -> Result<TopicDescription, LogError> {
        let result = self.describe_topic_now(topic).await;
        self.explained(result).await
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>, LogError> {
        let mut slot = self.producer.lock();
        if let Some(producer) = slot.as_ref() {
            return Ok(producer.clone());
        }
        let producer = self.new_producer()?;
        *slot = Some(producer.clone());
        Ok(producer)
    }

    /// A new idempotent producer: its own librdkafka client, threads and broker connections.
    async fn dedicated_producer(&self) -> Result<Arc<dyn Producer>, LogError> {
        Ok(self.new_producer()?)
    }

    /// A producer of its own (not the shared one): a transactional producer serves one
    /// transaction at a time.
    async fn transactional_producer(
        &self,
        transactional_id: &str,
    ) -> Result<Arc<dyn TransactionalProducer>, LogError> {
        if transactional_id.trim().is_empty() {
            return Err(LogError::Invalid(
                "a transactional producer needs a transactional id".to_string(),
            ));
        }
        let inner: FutureProducer = create(
            &self.config.transactional_producer_config(transactional_id),
            "creating a transactional producer",
        )?;
        let producer = KafkaTransactionalProducer::init(
            inner,
            transactional_id.to_string(),
            self.partitions.clone(),
            self.config.request_timeout,
        )
        .await?;
        Ok(Arc::new(producer))
    }

    /// Checks that the topics exist first: librdkafka would subscribe anyway and only report
    /// the missing topic as a recurring consumer error.
    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, LogError> {
        if config.group_id.is_empty() {
            return Err(LogError::Invalid("a consumer needs a group id".to_string()));
        }
        if config.topics.is_empty() {
            return Err(LogError::Invalid(
                "a consumer needs at least one topic".to_string(),
            ));
        }
        for topic in &config.topics {
            if self.metadata.partitions(topic).await?.is_none() {
                return Err(LogError::UnknownTopic(topic.clone()));
            }
        }
        let consumer: GroupConsumer = self
            .config
            .consumer_config(&config.group_id, config.offset_reset, !config.transactional)
            .create_with_context(GroupContext)
            .map_err(|e| config_error("creating the consumer", e))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| log_error(&format!("subscribing to {topics:?}"), e))?;
        Ok(Box::new(KafkaConsumer::new(consumer, &config.topics)))
    }

    /// Asks the group coordinator (OffsetFetch) through a client with the group's id that
    /// never subscribes (so it neither joins the group nor disturbs its members), kept per
    /// group for the next request (`/metrics` and `/v1/lag` ask on every call).
    async fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(i32, Option<i64>)>, LogError> {
        let partitions = self
            .metadata
            .partitions(topic)
            .await?
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))?;
        let client = self.offsets_client(group)?;
        let mut list = TopicPartitionList::with_capacity(partitions.len());
        for p in &partitions {
            list.add_partition(topic, *p);
        }
        let timeout = self.config.request_timeout;
        let group = group.to_string();
        let committed = blocking(move || {
            let committed = client
                .committed_offsets(list, timeout)
                .map_err(|e| log_error(&format!("fetching the offsets of group {group:?}"), e));
            // The kept client is polled nowhere else: serve its queued events (librdkafka's
            // logs and errors; it never subscribes, so no message comes) now, so they do not
            // pile up between requests. A poll serves at most one event, and says `None`
            // both for one served and for none left, hence a fixed number of them.
            for _ in 0..QUEUED_EVENTS_PER_FETCH {
                let _ = client.poll(Duration::ZERO);
            }
            committed
        })
        .await?;
        let mut out: Vec<(i32, Option<i64>)> = committed
            .elements_for_topic(topic)
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.partition(), Some(o)),
                // Offset::Invalid: the group never committed on this partition.
                _ => (e.partition(), None),
            })
            .collect();
        out.sort_by_key(|(p, _)| *p);
        Ok(out)
    }

    /// Commits `offsets` for `group` from a client that does not join the group, as
    /// `kafka-consumer-groups --reset-offsets` does: the broker accepts it only while the group
    /// has no active member, which is when a store sink rewinds its group before joining.
    async fn reset_group_offsets(
        &self,
        group: &str,
        offsets: &[(TopicPartition, i64)],
    ) -> Result<(), LogError> {
        let client: BaseConsumer = create(
            &self.config.outsider_config(group),
            "creating the offsets client",
        )?;
        let mut list = TopicPartitionList::with_capacity(offsets.len());
        for (tp, offset) in offsets {
            list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))
                .map_err(|e| log_error("building the offsets to reset", e))?;
        }
        let group = group.to_string();
        blocking(move || {
            client.commit(&list, CommitMode::Sync).map_err(|e| match e {
                // The coordinator refuses commits from outside while the group has members,
                // including a dead one until its session times out.
                KafkaError::ConsumerCommit(
                    RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::RebalanceInProgress,
                ) => LogError::GroupBusy(group.clone()),
                e => log_error(&format!("resetting the offsets of group {group:?}"), e),
            })
        })
        .await
    }

    /// DescribeGroups through the metadata client (DESCRIBE on the group).
    async fn group_members(&self, group: &str) -> Result<Option<usize>, LogError> {
        self.metadata.group_members(group).await.map(Some)
    }

    async fn delete_group(&self, group: &str) -> Result<(), LogError> {
        let results = self
            .admin
            .delete_groups(&[group], &self.admin_options())
            .await
            .map_err(|e| log_error(&format!("deleting group {group:?}"), e))?;
        match results.into_iter().next() {
            Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::GroupIdNotFound))) => Ok(()),
            Some(Err((_, RDKafkaErrorCode::NonEmptyGroup))) => {
                Err(LogError::GroupBusy(group.to_string()))
            }
            Some(Err((_, code))) => Err(log_error(
                &format!("deleting group {group:?}"),
                KafkaError::AdminOp(code),
            )),
            None => Err(LogError::Invalid(format!(
                "deleting group {group:?}: the broker answered for no group"
            ))),
        }
    }
}

/// Creates an rdkafka client, mapping a bad setting to [`LogError::Invalid`].
fn create<T: rdkafka::config::FromClientConfig>(
    config: &ClientConfig,
    what: &str,
) -> Result<T, LogError> {
    config.create().map_err(|err| config_error(what, err))
}

fn config_error(what: &str, err: KafkaError) -> LogError {
    match err {
        KafkaError::ClientConfig(_, desc, key, value) => {
            LogError::Invalid(format!("{what}: {desc} ({key}={value})"))
        }
        other => log_error(what, other),
    }
}

/// The context of `read_partition`'s reader: reaching the end of the partition is how it
/// knows it is done, so librdkafka's global "end of partition" error is not logged as one.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::debug!("librdkafka: {error}: {reason}");
        } else {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;

    use super::*;

    /// `/metrics` and `/v1/lag` ask for committed offsets on every scrape or request: the
    /// group's client is kept for the next one instead of a new connection each time, and the
    /// kept clients stay bounded.
    #[tokio::test]
    async fn a_groups_offsets_client_is_kept_for_the_next_request() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 2, 1).unwrap();
        let mut config = KafkaConfig::new(mock.bootstrap_servers());
        config.request_timeout = Duration::from_secs(5);
        let log = KafkaLog::new(config).unwrap();
        let kept = |group: &str| log.offsets_clients.lock().get(group).cloned();

        let nothing = vec![(0, None), (1, None)];
        assert_eq!(log.committed_offsets("g", "t").await.unwrap(), nothing);
        let first = kept("g").expect("the group's client is kept");
        assert_eq!(log.committed_offsets("g", "t").await.unwrap(), nothing);
        assert!(Arc::ptr_eq(&first, &kept("g").unwrap()), "the same client");

        for i in 0..OFFSETS_CLIENTS {
            log.committed_offsets(&format!("other-{i}"), "t")
                .await
                .unwrap();
        }
        let clients = log.offsets_clients.lock().len();
        assert!((1..=OFFSETS_CLIENTS).contains(&clients), "{clients} kept");
        assert!(kept("g").is_none(), "the oldest ones were closed");
    }

    /// A topic found without partitions is being created by someone else: a transient error,
    /// whether the lookup found it or our CreateTopics was told it exists.
    #[test]
    fn an_existing_topic_without_partitions_yet_is_transient() {
        let spec = TopicSpec::new("t", 3);
        let none_yet = existing_topic(&spec, 0).unwrap_err();
        assert!(none_yet.is_transient(), "{none_yet}");
        assert!(matches!(
            existing_topic(&spec, 3),
            Ok(CreateOutcome::AlreadyExists)
        ));
        assert!(matches!(
            existing_topic(&spec, 2),
            Err(LogError::TopicMismatch {
                existing: 2,
                requested: 3,
                ..
            })
        ));
    }
}
