//! The pipeline definition (`kontext run -c pipeline.yaml`).
//!
//! Parsing is strict (`deny_unknown_fields`): a misspelt key is an error, not a silent default.
//! After parsing, [`PipelineConfig::validate`] checks every cross-reference (a source's entity
//! exists, a relation points at a declared entity, topics are valid names ...) and reports all
//! problems at once, each with the path of the field and how to fix it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod mapping;
pub use mapping::{FieldMapping, FieldSpec, FieldType};

mod features;
pub use features::{
    features_topic, parse_span, FeatureAgg, FeatureConfig, FeatureWindow, WindowKind,
    FEATURES_SOURCE,
};

mod joins;
pub use joins::{EnrichmentConfig, EnrichmentKind};

mod retry;
pub use retry::{
    Jitter, LimitsConfig, RetryConfig, RetryPolicy, RetrySettings, RetryStage,
    DEFAULT_MAX_EVENT_TIME_AHEAD, DEFAULT_MAX_RECORD_BYTES,
};

/// Default partition count of context topics: a multiple of common consumer counts, within the
/// seed's "12-24 partitions per topic".
pub const DEFAULT_PARTITIONS: i32 = 12;

/// A whole pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Names the pipeline; consumer group ids derive from it.
    pub name: String,
    /// Where the embedded log and store live. The `--data-dir` flag overrides it.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Entity types by name (`customer`, `order` ...).
    pub entities: BTreeMap<String, EntityConfig>,
    /// Source systems by name (`crm`, `billing` ...).
    pub sources: BTreeMap<String, SourceConfig>,
    /// The context store, when there is one. Give either `store` or `stores`; neither means
    /// one embedded store named `main`.
    #[serde(default)]
    pub store: Option<StoreConfig>,
    /// Several context stores, each fed by its own consumer group; `serve.store` names the one
    /// the API serves from (the first by default).
    #[serde(default)]
    pub stores: Vec<StoreConfig>,
    #[serde(default)]
    pub serve: ServeConfig,
    /// Where records that cannot be processed go.
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    /// How each stage retries transient failures (see [`RetryConfig`]).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Limits on records, e.g. the largest one processed.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Aggregates that become fields of an entity's context (`orders_30d`), computed by the
    /// processor stage (see `docs/processing.md`, "Runtime").
    #[serde(default)]
    pub features: BTreeMap<String, FeatureConfig>,
    /// Stream-table enrichment joins: fields of one entity copied into the updates of another
    /// (an order gets its customer's tier), computed by the processor stage.
    #[serde(default)]
    pub joins: BTreeMap<String, EnrichmentConfig>,
    /// Memory the processor's state stores may use besides the storage engine's own.
    #[serde(default)]
    pub state: StateConfig,
}

/// Memory budgets of the processor's state (features and joins), per process, shared by all
/// its tasks. They change how fast state is read, never what is read: `None` takes the
/// runtime's default (64 MiB each, `kontext_process::StateDbOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Committed state values kept in memory in front of point reads (window accumulators,
    /// join table rows), in bytes; 0 for none.
    #[serde(default)]
    pub value_cache_bytes: Option<u64>,
    /// Remembered dedup ids kept in memory, so that a new id is answered without searching
    /// the state on disk, in bytes; 0 for none. A task whose ids do not fit reads from disk.
    #[serde(default)]
    pub key_index_bytes: Option<u64>,
}

/// Dead-letter topics: a record that can never be processed (bad data) is copied byte for byte
/// to `<source topic><suffix>` with headers saying why, and the partition moves on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// `false` only logs and counts bad records (they are still skipped).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Appended to the source topic's name.
    #[serde(default = "default_dlq_suffix")]
    pub suffix: String,
}

fn default_true() -> bool {
    true
}

fn default_dlq_suffix() -> String {
    ".dlq".into()
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            suffix: default_dlq_suffix(),
        }
    }
}

impl DeadLetterConfig {
    /// The dead-letter topic of a source topic.
    pub fn topic_for(&self, source_topic: &str) -> String {
        format!("{source_topic}{}", self.suffix)
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".kontext")
}

/// Which log backend carries the topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Read through `RawLogConfig` (which refuses unknown keys); `tag` and the field attributes
// below shape what is written.
#[serde(tag = "backend", rename_all = "snake_case", try_from = "RawLogConfig")]
pub enum LogConfig {
    /// The durable on-disk log in `data_dir/log`.
    Embedded {
        /// `always`, `group_commit` (default) or `never`; see the config reference.
        #[serde(default)]
        fsync: FsyncMode,
    },
    /// An Apache Kafka cluster.
    Kafka {
        /// `host:port[,host:port...]`
        bootstrap_servers: String,
        /// Extra librdkafka client properties (`security.protocol`, `sasl.mechanism` ...).
        #[serde(default)]
        properties: BTreeMap<String, String>,
        /// The processor's task loop commits its outputs, changelog records and input offsets
        /// in one Kafka transaction per batch (consume-transform-produce), as Kafka Streams'
        /// `exactly_once_v2`. Off: the same results through idempotent steps, without
        /// transactions (see `docs/processing.md`).
        #[serde(default)]
        exactly_once: bool,
        /// The replication factor of the topics kontext creates; `None`: the brokers'
        /// `default.replication.factor` (as Kafka Streams' `replication.factor: -1`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replication_factor: Option<i16>,
    },
}

impl LogConfig {
    /// A Kafka log at `bootstrap_servers` with every other setting at its default.
    pub fn kafka(bootstrap_servers: impl Into<String>) -> Self {
        LogConfig::Kafka {
            bootstrap_servers: bootstrap_servers.into(),
            properties: BTreeMap::new(),
            exactly_once: false,
            replication_factor: None,
        }
    }

    /// Whether the processor commits its batches in Kafka transactions.
    pub fn exactly_once(&self) -> bool {
        matches!(
            self,
            LogConfig::Kafka {
                exactly_once: true,
                ..
            }
        )
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig::Embedded {
            fsync: FsyncMode::default(),
        }
    }
}

/// librdkafka settings that kontext sets itself because its delivery and commit guarantees
/// depend on them: `log.properties` may not set them (the Kafka client's own
/// validation rejects them too).
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "group.id",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "auto.offset.reset",
    "transactional.id",
];

/// `log:` as the file spells it. Read as one plain struct rather than through serde's tagged
/// enum, which buffers the map and so reports an unknown key at line 1, column 1; and
/// `backend` can default to `embedded`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogConfig {
    #[serde(default)]
    backend: Backend,
    fsync: Option<FsyncMode>,
    bootstrap_servers: Option<String>,
    properties: Option<BTreeMap<String, String>>,
    exactly_once: Option<bool>,
    replication_factor: Option<i16>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Backend {
    #[default]
    Embedded,
    Kafka,
}

impl TryFrom<RawLogConfig> for LogConfig {
    type Error = String;

    fn try_from(raw: RawLogConfig) -> Result<Self, String> {
        let not_for = |key: &str, backend: &str, other: &str| {
            format!("log.{key}: a setting of backend: {other}, not of backend: {backend}")
        };
        match raw.backend {
            Backend::Embedded => {
                for (key, set) in [
                    ("bootstrap_servers", raw.bootstrap_servers.is_some()),
                    ("properties", raw.properties.is_some()),
                    ("exactly_once", raw.exactly_once.is_some()),
                    ("replication_factor", raw.replication_factor.is_some()),
                ] {
                    if set {
                        let mut e = not_for(key, "embedded", "kafka");
                        if key == "exactly_once" {
                            e.push_str(" (the embedded log commits a batch atomically already)");
                        }
                        return Err(e);
                    }
                }
                Ok(LogConfig::Embedded {
                    fsync: raw.fsync.unwrap_or_default(),
                })
            }
            Backend::Kafka => {
                if raw.fsync.is_some() {
                    return Err(not_for("fsync", "kafka", "embedded"));
                }
                Ok(LogConfig::Kafka {
                    bootstrap_servers: raw.bootstrap_servers.ok_or(
                        "log.bootstrap_servers: required with backend: kafka (host:port[,host:port])",
                    )?,
                    properties: raw.properties.unwrap_or_default(),
                    exactly_once: raw.exactly_once.unwrap_or_default(),
                    replication_factor: match raw.replication_factor {
                        Some(n) if n < 1 => {
                            return Err(format!(
                                "log.replication_factor: {n} is not a replication factor: use 1 \
                                 or more (3 on a production cluster), or leave it out for the \
                                 brokers' default.replication.factor"
                            ))
                        }
                        n => n,
                    },
                })
            }
        }
    }
}

/// When the embedded log fsyncs before acknowledging a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncMode {
    /// Every send call is fsynced before it is acknowledged.
    Always,
    /// Concurrent sends share one fsync; each is acknowledged once it is durable.
    #[default]
    GroupCommit,
    /// Acknowledge after the write; the OS flushes (Kafka's own default behaviour).
    Never,
}

/// Topic defaults and per-topic settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Per-topic overrides, by topic name.
    #[serde(default)]
    pub overrides: BTreeMap<String, TopicOverride>,
}

fn default_partitions() -> i32 {
    DEFAULT_PARTITIONS
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            partitions: DEFAULT_PARTITIONS,
            overrides: BTreeMap::new(),
        }
    }
}

/// Settings of one topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicOverride {
    pub partitions: Option<i32>,
    /// `cleanup.policy=compact`: keep the latest record per key.
    #[serde(default)]
    pub compacted: bool,
    /// `retention.ms`
    pub retention_ms: Option<u64>,
    /// `retention.bytes` per partition.
    pub retention_bytes: Option<u64>,
}

/// An entity type: what its id is called and which topic carries its events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// The canonical field naming the entity id (`customer_id`); the record key carries it.
    pub key: String,
    /// The entity-based topic (`context.customers`).
    pub topic: String,
    /// Relations to other entity types: `customer: customer_id` says "this entity belongs to the
    /// customer whose id is in my canonical field `customer_id`".
    #[serde(default)]
    pub belongs_to: BTreeMap<String, String>,
    /// How many of this entity's most recent records a parent's context lists.
    #[serde(default = "default_related_limit")]
    pub related_limit: usize,
}

fn default_related_limit() -> usize {
    10
}

/// A source system writing into an entity topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The topic the source writes to.
    pub topic: String,
    /// The entity type its events describe.
    pub entity: String,
    /// Which records of the topic belong to this source. `ce_source` must equal it; a source
    /// without `match` takes the records no other source on the topic matched (plain records
    /// without CloudEvents headers included).
    #[serde(default, rename = "match")]
    pub matcher: Option<SourceMatch>,
    /// Canonical field name -> where its value comes from: a path in the source payload
    /// (`loyalty.tier`), or `{path | jq, type}` (see [`FieldMapping`]).
    pub fields: BTreeMap<String, FieldMapping>,
    /// Records to drop before they reach the store.
    #[serde(default)]
    pub filter: Option<FilterConfig>,
}

/// Selects a source's records by CloudEvents attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceMatch {
    pub ce_source: String,
}

/// Drops a record when any condition holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub drop_if: Vec<Condition>,
}

/// A test on one field of the source payload (a dotted path), on the CloudEvents type
/// (`field: "@type"`) or source (`field: "@source"`); or a jq predicate (`jq: ...`) that
/// holds when its first output is neither `false` nor `null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The tested field; required unless `jq` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// A jq predicate on the payload (`$type` and `$source` are the CloudEvents attributes);
    /// stands alone, without `field` and a test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jq: Option<String>,
    /// The field equals this JSON value (`equals: null` too: `Some(Value::Null)`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub equals: Option<serde_json::Value>,
    /// The field equals one of these values.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<serde_json::Value>>,
    /// The field is present (`true`) or absent (`false`).
    #[serde(default)]
    pub exists: Option<bool>,
}

/// A key that is present holds a value, `null` included: serde's `Option` would read a present
/// `null` as absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// A context store the pipeline writes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Names the store; its consumer group is `kontext.<pipeline>.store.<name>`.
    #[serde(default = "default_store_name")]
    pub name: String,
    #[serde(default)]
    pub kind: StoreKind,
    /// `kind: postgres` only: a libpq-style URL, `postgres://user:pass@host:port/db`. A value
    /// of the form `${VAR}` is read from the environment variable `VAR` when the pipeline
    /// starts, so passwords need not live in the file.
    #[serde(default)]
    pub url: Option<String>,
    /// `kind: postgres` only: the schema the store's tables live in.
    #[serde(default)]
    pub schema: Option<String>,
    /// `kind: embedded` only: how many assembled context documents are kept in memory and
    /// served until something they show changes (4 096 when unset; 0 turns the cache off).
    #[serde(default)]
    pub context_cache: Option<usize>,
    /// `kind: embedded` only: the longest a write stays visible but not yet fsynced while
    /// writes go on (100ms when unset; 0 fsyncs every write). The store's consumer group
    /// commits offsets only once the writes are durable, so a crash replays at most this much
    /// from the log.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::optional"
    )]
    pub sync_interval: Option<Duration>,
}

fn default_store_name() -> String {
    "main".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            name: default_store_name(),
            kind: StoreKind::default(),
            url: None,
            schema: None,
            context_cache: None,
            sync_interval: None,
        }
    }
}

impl StoreConfig {
    /// The PostgreSQL URL with a `${VAR}` reference resolved from the environment.
    pub fn resolved_url(&self) -> Result<Option<String>, String> {
        let Some(url) = &self.url else {
            return Ok(None);
        };
        resolve_env(url, &format!("store {:?}: url", self.name)).map(Some)
    }

    /// `kind: postgres` only: the PostgreSQL schema of version `version` of the store, as
    /// `kontext rebuild` makes them (`None`: the URL's default schema). Version 0 is the
    /// configured `schema`; a rebuilt version `v` lives in `<schema or "kontext">_<name>_v<v>`,
    /// the name lower-cased with other characters than letters, digits and `_` as `_`, so the
    /// versions of two stores in one database never share a schema.
    pub fn version_schema(&self, version: u64) -> Option<String> {
        match version {
            0 => self.schema.clone(),
            v => {
                let name: String = self
                    .name
                    .chars()
                    .map(|c| match c.to_ascii_lowercase() {
                        c @ ('a'..='z' | '0'..='9') => c,
                        _ => '_',
                    })
                    .collect();
                let base = self.schema.as_deref().unwrap_or("kontext");
                Some(format!("{base}_{name}_v{v}"))
            }
        }
    }
}

/// Store implementations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// A single-file embedded database in `data_dir/stores/<name>.redb`.
    #[default]
    Embedded,
    /// PostgreSQL (`url` required), for production: several kontext instances and other
    /// tools can read it.
    Postgres,
}

/// The HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The store the API serves from, by name; the first store by default.
    #[serde(default)]
    pub store: Option<String>,
    /// How `format=markdown` renders context for prompts.
    #[serde(default)]
    pub render: RenderConfig,
    /// The MCP endpoint (`/mcp`).
    #[serde(default)]
    pub mcp: McpConfig,
    /// `0`: the API runs on the pipeline's async runtime. `N`: on a runtime of its own with
    /// `N` threads, where a request does not wait behind the pipeline's batches (a lower tail
    /// for short requests under ingest; markdown renderings, which take longer, then share the
    /// cores with the pipeline by the operating system's time slices).
    #[serde(default)]
    pub threads: usize,
    /// `0`: the API's own threads (`threads`) are scheduled like any other. `1`–`99`: they
    /// run at this real-time priority (Linux `SCHED_FIFO`), so a request that arrives while the
    /// pipeline keeps the cores busy runs at once instead of after a time slice. Needs
    /// `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` of at least this value; never applied to the
    /// pipeline's threads.
    #[serde(default)]
    pub realtime_priority: u8,
}

/// The MCP endpoint of the HTTP API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// `Host` header values `/mcp` accepts besides the loopback names (`localhost`,
    /// `127.0.0.1`, `::1`), e.g. `context.internal` or `context.internal:8080`. The check
    /// protects against DNS rebinding by web pages; list the names remote MCP clients use.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// Markdown rendering for prompts: which sections a token budget keeps first, and how tokens
/// are counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderConfig {
    /// Sections in the order a token budget keeps them: `fields`, `belongs_to.<type>`,
    /// `related.<type>`, `provenance`. Sections not listed follow in the default order
    /// (fields, parents, related types by name, provenance).
    #[serde(default)]
    pub priority: Vec<String>,
    /// The tokenizer budgets are counted with, unless a request names another.
    #[serde(default)]
    pub tokenizer: Tokenizer,
}

/// BPE tokenizers a token budget can be counted with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tokenizer {
    /// `cl100k_base` (GPT-4, GPT-3.5, text-embedding-3).
    #[default]
    #[serde(rename = "cl100k", alias = "cl100k_base")]
    Cl100k,
    /// `o200k_base` (GPT-4o, GPT-4.1, o-series, GPT-5).
    #[serde(rename = "o200k", alias = "o200k_base")]
    O200k,
}

impl Tokenizer {
    /// The short name used in config and query strings.
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Cl100k => "cl100k",
            Tokenizer::O200k => "o200k",
        }
    }

    /// Parses `cl100k`/`cl100k_base` or `o200k`/`o200k_base`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cl100k" | "cl100k_base" => Some(Tokenizer::Cl100k),
            "o200k" | "o200k_base" => Some(Tokenizer::O200k),
            _ => None,
        }
    }
}

/// A section of a rendered context, as named in `serve.render.priority`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RenderSection {
    /// The entity's own canonical fields.
    Fields,
    /// Where each of the entity's fields came from.
    Provenance,
    /// The parent entity of a type (`belongs_to.customer`).
    BelongsTo(String),
    /// The child entities of a type (`related.order`), newest first.
    Related(String),
}

impl RenderSection {
    /// Parses `fields`, `provenance`, `belongs_to.<type>` or `related.<type>`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fields" => Some(Self::Fields),
            "provenance" => Some(Self::Provenance),
            _ => {
                let (kind, t) = s.split_once('.')?;
                if t.is_empty() {
                    return None;
                }
                match kind {
                    "belongs_to" => Some(Self::BelongsTo(t.to_string())),
                    "related" => Some(Self::Related(t.to_string())),
                    _ => None,
                }
            }
        }
    }
}

impl fmt::Display for RenderSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fields => f.write_str("fields"),
            Self::Provenance => f.write_str("provenance"),
            Self::BelongsTo(t) => write!(f, "belongs_to.{t}"),
            Self::Related(t) => write!(f, "related.{t}"),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            store: None,
            render: RenderConfig::default(),
            mcp: McpConfig::default(),
            threads: 0,
            realtime_priority: 0,
        }
    }
}

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the offending field (`sources.crm.entity`).
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Everything wrong with a pipeline file, reported at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(
            f,
            "{}: {} error{} in pipeline definition",
            self.file,
            n,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            writeln!(f, "  - {}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
impl ConfigError {
    /// Each error's field and message, in order: what a test compares.
    pub(crate) fn field_messages(&self) -> Vec<(&str, &str)> {
        self.errors
            .iter()
            .map(|e| (e.field.as_str(), e.message.as_str()))
            .collect()
    }
}

impl PipelineConfig {
    /// Reads, parses and validates a pipeline file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            errors: vec![FieldError {
                field: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::parse(&file, &text)
    }

    /// Parses and validates pipeline YAML; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: PipelineConfig = serde_yaml_ng::from_str(text).map_err(|e| {
            let message = e.to_string();
            // `RawLogConfig`'s conversion names its field (`log.<key>: ...`); serde_yaml has
            // no location for it.
            let error = match message.split_once(": ") {
                Some((field, rest)) if field.starts_with("log.") && !field.contains(' ') => {
                    FieldError {
                        field: field.to_string(),
                        message: rest.to_string(),
                    }
                }
                _ => FieldError {
                    field: e.location().map_or_else(
                        || "(document)".into(),
                        |l| format!("line {}, column {}", l.line(), l.column()),
                    ),
                    message,
                },
            };
            ConfigError {
                file: file.to_string(),
                errors: vec![error],
            }
        })?;
        let mut config = config;
        let errors = config.validate();
        if errors.is_empty() {
            config.add_feature_sources();
            Ok(config)
        } else {
            Err(ConfigError {
                file: file.to_string(),
                errors,
            })
        }
    }

    /// Checks cross-references and values; returns every problem found.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut err = |field: String, message: String| errors.push(FieldError { field, message });

        if !is_valid_name(&self.name) {
            err(
                "name".into(),
                "must be non-empty and use only letters, digits, '.', '_' and '-'".into(),
            );
        }
        if let LogConfig::Kafka {
            bootstrap_servers, ..
        } = &self.log
        {
            if bootstrap_servers.trim().is_empty() {
                err(
                    "log.bootstrap_servers".into(),
                    "must list at least one host:port".into(),
                );
            }
        }
        if !(1..=10_000).contains(&self.topics.partitions) {
            err(
                "topics.partitions".into(),
                format!("{} is out of range: use 1 to 10000", self.topics.partitions),
            );
        }
        for (topic, o) in &self.topics.overrides {
            if let Some(problem) = self.override_problem(topic) {
                err(format!("topics.overrides.{topic}"), problem);
            }
            if let Some(p) = o.partitions {
                if !(1..=10_000).contains(&p) {
                    err(
                        format!("topics.overrides.{topic}.partitions"),
                        format!("{p} is out of range: use 1 to 10000"),
                    );
                }
            }
            // Compaction keeps the newest record per key. Sources sharing an entity topic each
            // write their own fields of the entity under its id: once compacted, the log (and
            // so every store rebuilt from it) keeps only the last writer's fields.
            let writers: Vec<&str> = self
                .sources
                .iter()
                .filter(|(_, source)| source.topic == *topic)
                .map(|(name, _)| name.as_str())
                .collect();
            if o.compacted && writers.len() > 1 {
                err(
                    format!("topics.overrides.{topic}.compacted"),
                    format!(
                        "sources {} all write {topic:?}: compaction would keep only the newest record per entity, losing the other sources' fields for any store rebuilt from the log; remove `compacted` (bound the topic with `retention_ms` instead) or give each source its own topic",
                        writers.join(", ")
                    ),
                );
            }
        }
        if self.entities.is_empty() {
            err("entities".into(), "declare at least one entity type".into());
        }
        let mut entity_topics = BTreeMap::new();
        for (name, entity) in &self.entities {
            let at = format!("entities.{name}");
            if !is_valid_name(name) {
                err(
                    at.clone(),
                    "entity type names use only letters, digits, '.', '_' and '-'".into(),
                );
            }
            if entity.key.trim().is_empty() {
                err(
                    format!("{at}.key"),
                    "name the canonical field holding the entity id, e.g. `customer_id`".into(),
                );
            }
            if let Some(problem) = topic_name_problem(&entity.topic) {
                err(format!("{at}.topic"), problem);
            }
            if let Some(other) = entity_topics.insert(entity.topic.as_str(), name.as_str()) {
                err(format!("{at}.topic"), format!("topic {:?} is already the topic of entity {other:?}: each entity type has its own topic", entity.topic));
            }
            for (parent, field) in &entity.belongs_to {
                if !self.entities.contains_key(parent) {
                    err(
                        format!("{at}.belongs_to.{parent}"),
                        format!(
                            "unknown entity type {parent:?}; declared: {}",
                            self.entity_names()
                        ),
                    );
                }
                if field.trim().is_empty() {
                    err(
                        format!("{at}.belongs_to.{parent}"),
                        "name the canonical field holding the parent's id".into(),
                    );
                }
            }
        }
        if self.sources.is_empty() {
            err("sources".into(), "declare at least one source".into());
        }
        let mut unmatched_per_topic: BTreeMap<&str, &str> = BTreeMap::new();
        let mut matches_per_topic: BTreeSet<(&str, &str)> = BTreeSet::new();
        for (name, source) in &self.sources {
            let at = format!("sources.{name}");
            match self.entities.get(&source.entity) {
                None => err(format!("{at}.entity"), format!("unknown entity type {:?}; declared: {}", source.entity, self.entity_names())),
                Some(entity) if entity.topic != source.topic => err(
                    format!("{at}.topic"),
                    format!("entity {:?} lives in topic {:?}, not {:?}: sources write into their entity's topic", source.entity, entity.topic, source.topic),
                ),
                Some(_) => {}
            }
            match &source.matcher {
                None => {
                    if let Some(other) =
                        unmatched_per_topic.insert(source.topic.as_str(), name.as_str())
                    {
                        err(format!("{at}.match"), format!("source {other:?} already takes the unmatched records of {:?}: add `match: {{ce_source: ...}}` to one of them", source.topic));
                    }
                }
                Some(m) => {
                    if !matches_per_topic.insert((source.topic.as_str(), m.ce_source.as_str())) {
                        err(
                            format!("{at}.match.ce_source"),
                            format!(
                                "another source on {:?} already matches ce_source {:?}",
                                source.topic, m.ce_source
                            ),
                        );
                    }
                }
            }
            if source.fields.is_empty() {
                err(
                    format!("{at}.fields"),
                    "map at least one source field into the canonical model".into(),
                );
            }
            mapping::validate_fields(&at, &source.fields, &mut err);
            if let Some(filter) = &source.filter {
                if filter.drop_if.is_empty() {
                    err(
                        format!("{at}.filter.drop_if"),
                        "list at least one condition, or remove the filter".into(),
                    );
                }
                for (i, c) in filter.drop_if.iter().enumerate() {
                    mapping::validate_condition(&format!("{at}.filter.drop_if[{i}]"), c, &mut err);
                }
            }
        }
        if let LogConfig::Kafka { properties, .. } = &self.log {
            for key in properties.keys() {
                if RESERVED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                    err(
                        format!("log.properties.{key}"),
                        "set by kontext, whose delivery and commit guarantees depend on it: remove it (docs/CONFIG.md lists the keys it sets)".into(),
                    );
                }
            }
        }
        if self.dead_letter.enabled {
            // A dead-letter topic that is one the pipeline reads would feed every bad record
            // back in, to fail and be dead-lettered again, for ever.
            let features_topics = self.features_topics();
            let read: BTreeSet<&str> = self
                .sources
                .values()
                .map(|s| s.topic.as_str())
                .chain(self.entities.values().map(|e| e.topic.as_str()))
                .chain(features_topics.iter().map(String::as_str))
                .collect();
            // The features topics get dead-letter topics too, through their built-in sources
            // (added after validation, so not among the sources yet).
            let dead_lettered: BTreeSet<String> = (self.source_topics().into_iter())
                .chain(features_topics.iter().cloned())
                .collect();
            for topic in dead_lettered {
                let dlq = self.dead_letter.topic_for(&topic);
                if let Some(problem) = topic_name_problem(&dlq) {
                    err(
                        "dead_letter.suffix".into(),
                        format!("the dead-letter topic of {topic:?} would be invalid: {problem}"),
                    );
                } else if read.contains(dlq.as_str()) {
                    err(
                        "dead_letter.suffix".into(),
                        format!(
                            "the dead-letter topic of {topic:?} would be {dlq:?}, a topic this pipeline reads: bad records would come back in for ever. Use a suffix no entity or source topic ends with, other than `.features` (default `.dlq`)"
                        ),
                    );
                }
            }
        }
        self.validate_stores(&mut err);
        self.retry.validate(&mut err);
        self.limits.validate(&mut err);
        self.validate_features(&mut err);
        self.validate_joins(&mut err);
        if !is_listen_address(&self.serve.listen) {
            err(
                "serve.listen".into(),
                format!(
                    "{:?} is not an address: use host:port, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or localhost:8080",
                    self.serve.listen
                ),
            );
        }
        self.validate_render(&mut err);
        self.validate_serve_threads(&mut err);
        errors
    }

    /// Checks `store`/`stores`: names valid and unique, a URL exactly where PostgreSQL needs
    /// one, `serve.store` naming one of them.
    fn validate_stores(&self, err: &mut impl FnMut(String, String)) {
        if self.store.is_some() && !self.stores.is_empty() {
            err(
                "stores".into(),
                "give either `store` (one store) or `stores` (a list), not both".into(),
            );
        }
        let at = |i: usize| {
            if self.store.is_some() {
                "store".to_string()
            } else {
                format!("stores[{i}]")
            }
        };
        let stores = self.stores();
        let mut names = BTreeSet::new();
        for (i, store) in stores.iter().enumerate() {
            if !is_valid_name(&store.name) {
                err(
                    format!("{}.name", at(i)),
                    "must be non-empty and use only letters, digits, '.', '_' and '-'".into(),
                );
            } else if is_version_suffixed(&store.name) {
                err(
                    format!("{}.name", at(i)),
                    format!("{:?} ends like a rebuilt version's file (`<name>.v<N>.redb`), which another store's rebuilds would take for theirs: rename it (e.g. with '-' or '_' before the v)", store.name),
                );
            } else if !names.insert(store.name.as_str()) {
                err(
                    format!("{}.name", at(i)),
                    format!(
                        "another store is named {:?}: names must be unique",
                        store.name
                    ),
                );
            }
            match store.kind {
                StoreKind::Embedded => {
                    for (field, set) in [("url", store.url.is_some()), ("schema", store.schema.is_some())] {
                        if set {
                            err(
                                format!("{}.{field}", at(i)),
                                "only `kind: postgres` takes this; remove it or set `kind: postgres`".into(),
                            );
                        }
                    }
                }
                StoreKind::Postgres => match &store.url {
                    None => err(
                        format!("{}.url", at(i)),
                        "a postgres store needs `url: postgres://user:pass@host:port/db` (or `${VAR}`)".into(),
                    ),
                    Some(url)
                        if !(url.starts_with("postgres://")
                            || url.starts_with("postgresql://")
                            || (url.starts_with("${") && url.ends_with('}'))) =>
                    {
                        err(
                            format!("{}.url", at(i)),
                            format!("{url:?} is not a PostgreSQL URL: use postgres://user:pass@host:port/db or ${{VAR}}"),
                        )
                    }
                    Some(_) => {}
                },
            }
            if store.kind == StoreKind::Postgres && store.context_cache.is_some() {
                err(
                    format!("{}.context_cache", at(i)),
                    "only `kind: embedded` caches context documents; remove it".into(),
                );
            }
            if store.kind == StoreKind::Postgres && store.sync_interval.is_some() {
                err(
                    format!("{}.sync_interval", at(i)),
                    "only `kind: embedded` defers fsyncs (PostgreSQL commits are durable as configured on the server); remove it".into(),
                );
            }
            if store.kind == StoreKind::Postgres && is_valid_name(&store.name) {
                // Room for a million rebuilds within PostgreSQL's 63-byte identifiers.
                let longest = store.version_schema(999_999).unwrap_or_default();
                if longest.len() > 63 {
                    err(
                        format!("{}.name", at(i)),
                        format!("too long for the schemas of its rebuilt versions ({longest:?} is over PostgreSQL's 63 bytes): shorten the name or the schema"),
                    );
                }
                let first = stores[..i].iter().find(|other| {
                    other.kind == StoreKind::Postgres
                        && other.version_schema(1) == store.version_schema(1)
                });
                if let Some(other) = first {
                    err(
                        format!("{}.name", at(i)),
                        format!("store {:?} would rebuild into the same schemas ({:?}, ...): rename one, or give them different `schema`s", other.name, store.version_schema(1).unwrap_or_default()),
                    );
                }
            }
            if let Some(schema) = &store.schema {
                let valid = schema.len() <= 63
                    && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && schema
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !valid {
                    err(
                        format!("{}.schema", at(i)),
                        format!("{schema:?} is not a schema name: use lower-case letters, digits and '_', starting with a letter or '_', at most 63 bytes"),
                    );
                }
            }
        }
        if let Some(served) = &self.serve.store {
            if !names.contains(served.as_str()) {
                err(
                    "serve.store".into(),
                    format!(
                        "no store is named {served:?}; stores: {}",
                        join_or_none(&names)
                    ),
                );
            }
        }
    }

    /// The stores the pipeline writes to, in file order (one embedded `main` by default).
    pub fn stores(&self) -> Vec<StoreConfig> {
        match (&self.store, self.stores.is_empty()) {
            (Some(one), _) => vec![one.clone()],
            (None, false) => self.stores.clone(),
            (None, true) => vec![StoreConfig::default()],
        }
    }

    /// The store the API serves from (`serve.store`, else the first).
    pub fn served_store(&self) -> StoreConfig {
        let stores = self.stores();
        self.serve
            .store
            .as_ref()
            .and_then(|name| stores.iter().find(|s| &s.name == name).cloned())
            .unwrap_or_else(|| stores[0].clone())
    }

    /// Checks `serve.render.priority`: each name is a section some document of this pipeline
    /// can have, listed once.
    fn validate_render(&self, err: &mut impl FnMut(String, String)) {
        let parents: BTreeSet<&str> = self
            .entities
            .values()
            .flat_map(|e| e.belongs_to.keys().map(String::as_str))
            .collect();
        let children: BTreeSet<&str> = self
            .entities
            .iter()
            .filter(|(_, e)| !e.belongs_to.is_empty())
            .map(|(name, _)| name.as_str())
            .collect();
        let mut seen = BTreeSet::new();
        for (i, name) in self.serve.render.priority.iter().enumerate() {
            let at = format!("serve.render.priority[{i}]");
            let known = match RenderSection::parse(name) {
                None => {
                    err(at, format!("{name:?} is not a section: use fields, provenance, belongs_to.<type> or related.<type>"));
                    continue;
                }
                Some(RenderSection::BelongsTo(t)) if !parents.contains(t.as_str()) => {
                    Some(format!(
                        "no entity type belongs to {t:?}; parents: {}",
                        join_or_none(&parents)
                    ))
                }
                Some(RenderSection::Related(t)) if !children.contains(t.as_str()) => Some(format!(
                    "{t:?} is not an entity type with `belongs_to`; related types: {}",
                    join_or_none(&children)
                )),
                Some(_) => None,
            };
            if let Some(problem) = known {
                err(at, problem);
            } else if !seen.insert(name.as_str()) {
                err(at, format!("{name:?} is listed twice"));
            }
        }
    }

    /// The source topic (a features topic included: built-in sources read them) whose
    /// dead-letter topic `topic` is.
    pub fn dead_letter_source(&self, topic: &str) -> Option<String> {
        if !self.dead_letter.enabled {
            return None;
        }
        (self
            .source_topics()
            .into_iter()
            .chain(self.features_topics()))
        .find(|t| self.dead_letter.topic_for(t) == topic)
    }

    /// The entity topic whose `topics.overrides` entry sets the partition count of `topic`:
    /// the entity topic itself, its features topic (when features or joins write its entity),
    /// and the dead-letter topics of both. `None`: only `topics.partitions` sets it (the
    /// processor's repartition and changelog topics).
    pub fn partitions_owner(&self, topic: &str) -> Option<String> {
        let source = self.dead_letter_source(topic);
        let topic = source.as_deref().unwrap_or(topic);
        let entity_topics = || self.entities.values().map(|e| &e.topic);
        // An entity's own topic first: only then another entity's features topic.
        (entity_topics().find(|t| *t == topic))
            .or_else(|| {
                let written = self.features_topics().contains(topic);
                entity_topics().find(|t| written && features_topic(t) == topic)
            })
            .cloned()
    }

    /// The partition count the pipeline file gives `topic`: the override of its
    /// [`partitions_owner`](Self::partitions_owner), or `topics.partitions`. Every topic the
    /// pipeline creates takes its count from here.
    pub fn partitions_of(&self, topic: &str) -> i32 {
        (self.partitions_owner(topic))
            .and_then(|owner| self.topics.overrides.get(&owner)?.partitions)
            .unwrap_or(self.topics.partitions)
    }

    /// Why an override of `topic` would do nothing: overrides apply to entity topics, and the
    /// topics kontext derives from them (features, dead-letter) or makes for itself follow
    /// `topics.partitions` or their entity topic's settings.
    fn override_problem(&self, topic: &str) -> Option<String> {
        let entity_topics: Vec<&str> = self.entities.values().map(|e| e.topic.as_str()).collect();
        if entity_topics.contains(&topic) {
            return None;
        }
        // Named by what it would be, written or not: overrides are checked before the
        // features sources are added.
        let derived = entity_topics.iter().find_map(|&t| {
            if features_topic(t) == topic {
                Some(("the features topic", t))
            } else if self.dead_letter.topic_for(t) == topic
                || self.dead_letter.topic_for(&features_topic(t)) == topic
            {
                Some(("a dead-letter topic", t))
            } else {
                None
            }
        });
        Some(match derived {
            Some((what, t)) => format!(
                "{topic:?} is {what} of entity topic {t:?} and takes its partition count from \
                 there: set topics.overrides.{t} instead (overrides apply to entity topics only)"
            ),
            None => format!(
                "{topic:?} is not an entity topic of this pipeline ({}): overrides apply to \
                 entity topics only; the processor's own topics take topics.partitions",
                entity_topics.join(", ")
            ),
        })
    }

    /// Checks `serve.realtime_priority`: a `SCHED_FIFO` priority, for the API's own threads.
    fn validate_serve_threads(&self, err: &mut impl FnMut(String, String)) {
        let priority = self.serve.realtime_priority;
        if priority > 99 {
            err(
                "serve.realtime_priority".into(),
                format!("{priority} is out of range: use 1 to 99, or 0 for normal scheduling"),
            );
        } else if priority > 0 && self.serve.threads == 0 {
            err(
                "serve.realtime_priority".into(),
                "applies to the API's own threads only: set serve.threads to 1 or more (the pipeline's threads never run at real-time priority)".into(),
            );
        }
    }

    /// The consumer group that feeds a store: one group per store, so a slow store never
    /// holds back another.
    pub fn store_group(&self, store: &str) -> String {
        format!("kontext.{}.store.{store}", self.name)
    }

    /// The group id of the clients that read a partition's range without joining (lag,
    /// restores, dead-letter tools), under the prefix of the pipeline's other groups so that
    /// one prefixed ACL covers it.
    pub fn reader_group(&self) -> String {
        format!("kontext.{}.reader", self.name)
    }

    /// The topics the sources read, deduplicated and sorted.
    pub fn source_topics(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.sources.values().map(|s| s.topic.as_str()).collect();
        set.into_iter().map(str::to_owned).collect()
    }

    /// Partition count, compaction and retention of a topic, defaults applied.
    pub fn topic_settings(&self, topic: &str) -> TopicOverride {
        let mut t = self
            .topics
            .overrides
            .get(topic)
            .cloned()
            .unwrap_or_default();
        t.partitions = Some(t.partitions.unwrap_or(self.topics.partitions));
        t
    }

    fn entity_names(&self) -> String {
        self.entities
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The canonical fields the sources of `entity` map.
    fn mapped_fields<'a, 'e>(
        &'a self,
        entity: &'e str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'e> {
        self.sources
            .values()
            .filter(move |s| s.entity == entity)
            .flat_map(|s| s.fields.keys().map(String::as_str))
    }

    /// Every field a normalized update of `entity` can carry: its key field and the canonical
    /// fields its sources map (`None` for an unknown entity type).
    fn canonical_fields(&self, entity: &str) -> Option<BTreeSet<&str>> {
        let key = self.entities.get(entity)?.key.as_str();
        Some(
            self.mapped_fields(entity)
                .chain([key])
                .filter(|name| !name.trim().is_empty())
                .collect(),
        )
    }

    /// `field`, read from updates of `entity` at `at`, is a canonical field of it: a name no
    /// source maps never has a value, so a typo would compute nothing, silently.
    fn check_canonical(
        &self,
        err: &mut impl FnMut(String, String),
        at: String,
        entity: &str,
        field: &str,
    ) {
        let Some(known) = self.canonical_fields(entity) else {
            return; // the unknown entity type is reported on its own
        };
        // A source attached to an unknown entity type (a typo, reported on its own) may be
        // the one meant to map `field`: an error here would follow from that one.
        if (self.sources.values()).any(|s| !self.entities.contains_key(&s.entity)) {
            return;
        }
        if !field.trim().is_empty() && !known.contains(field) {
            err(
                at,
                format!(
                    "{field:?} is not a canonical field of {entity}: its key and the fields its sources map are {}; name one of them, or map {field:?} in a source of {entity} (`sources.<source>.fields`)",
                    join_or_none(&known)
                ),
            );
        }
    }
}

fn join_or_none(names: &BTreeSet<&str>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().copied().collect::<Vec<_>>().join(", ")
    }
}

/// `value`, or, when it is a whole `${VAR}` reference, the environment variable `VAR`, so that
/// a secret need not be in the pipeline file (`what` names the setting in the error).
pub fn resolve_env(value: &str, what: &str) -> Result<String, String> {
    match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
        Some(var) => std::env::var(var)
            .map_err(|_| format!("{what} names the environment variable {var}, which is not set")),
        None => Ok(value.to_string()),
    }
}

/// Whether a store name ends in `.v<digits>`, as the files of another store's rebuilt versions
/// do (`main.v2.redb` is version 2 of `main`).
fn is_version_suffixed(name: &str) -> bool {
    name.rsplit_once(".v")
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `serve.listen`: an IP address and port (`127.0.0.1:8080`, `[::1]:8080`), or a host name and
/// port (`localhost:8080`), which binding resolves.
fn is_listen_address(listen: &str) -> bool {
    listen.parse::<std::net::SocketAddr>().is_ok()
        || listen.rsplit_once(':').is_some_and(|(host, port)| {
            port.parse::<u16>().is_ok()
                && !host.is_empty()
                && (host.split('.')).all(|label| {
                    !label.is_empty()
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        })
}

/// Kafka's topic naming rules (`Topic.validate`).
pub fn topic_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("a topic name must not be empty".into())
    } else if name == "." || name == ".." {
        Some(format!("{name:?} is not a legal topic name"))
    } else if name.len() > 249 {
        Some("a topic name is at most 249 characters".into())
    } else if !is_valid_name(name) {
        Some(format!(
            "{name:?} is not a legal topic name: use only letters, digits, '.', '_' and '-'"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
