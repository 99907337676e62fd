//! Wiring: open the log and the store a pipeline file names, make sure its topics exist, and
//! run the store sink and the HTTP API until shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use kontext_core::config::{
    resolve_env, FsyncMode, LogConfig, PipelineConfig, StoreConfig, StoreKind,
};
use kontext_kafka::{KafkaConfig, KafkaLog};
use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog, FsyncPolicy};
use kontext_log::{ConsumerConfig, CreateOutcome, Log, LogError, Retention, TopicSpec};
use kontext_serve::AppState;
use kontext_store::{
    ContextStore, EmbeddedStore, PostgresStore, StoreError, StoreSchema, SwitchableStore,
};
use kontext_stream::dlq::DeadLetters;
use kontext_stream::retry::Waiter;
use kontext_stream::{PipelineMetrics, Router, StoreSink};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::definition;
use crate::partitions::{ExistingTopic, PartitionMismatch};
use crate::rebuild::{self, Rebuilds, StoreSlot};

/// Opens the log backend the pipeline file names.
pub async fn open_log(config: &PipelineConfig, data_dir: &Path) -> Result<Arc<dyn Log>> {
    match &config.log {
        LogConfig::Embedded { fsync } => {
            let fsync = match fsync {
                FsyncMode::Always => FsyncPolicy::Always,
                FsyncMode::GroupCommit => FsyncPolicy::default(),
                FsyncMode::Never => FsyncPolicy::Never,
            };
            let dir = data_dir.join("log");
            let log = EmbeddedLog::open(
                &dir,
                EmbeddedConfig {
                    fsync,
                    ..EmbeddedConfig::default()
                },
            )
            .with_context(|| format!("opening the embedded log in {}", dir.display()))?;
            Ok(log)
        }
        LogConfig::Kafka {
            bootstrap_servers,
            properties,
            replication_factor,
            ..
        } => {
            let properties = properties
                .iter()
                .map(|(k, v)| Ok((k.clone(), resolve_env(v, &format!("log.properties.{k}"))?)))
                .collect::<Result<_, String>>()
                .map_err(anyhow::Error::msg)?;
            let kafka = KafkaConfig {
                properties,
                reader_group: config.reader_group(),
                replication_factor: replication_factor.map(i32::from),
                ..KafkaConfig::new(bootstrap_servers.clone())
            };
            let log = KafkaLog::new(kafka)
                .with_context(|| format!("configuring the Kafka client for {bootstrap_servers}"))?;
            Ok(Arc::new(log))
        }
    }
}

/// Creates every topic the pipeline uses, as [`ensure_topics`] does.
/// An unreachable broker is retried with exponential backoff (`retry.defaults`: 100 ms
/// doubling to 30 s unless set) until it answers or `shutdown` is cancelled; each attempt says
/// what is wrong.
pub async fn ensure_topics_with_retry(
    log: &dyn Log,
    config: &PipelineConfig,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut wait = Waiter::new(config.retry.waiting_policy());
    loop {
        match ensure_topics(log, config).await {
            Ok(()) => return Ok(()),
            Err(e) if is_transient(&e) && !shutdown.is_cancelled() => {
                let delay = wait.next_delay();
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "the {} log is unavailable; retrying", log.backend());
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(e),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<kontext_log::LogError>()
            .is_some_and(|l| l.is_transient())
    })
}

/// Creates every topic the pipeline uses (entity, features, dead-letter and processor topics).
/// An existing topic is left as it is if it has the partition count the pipeline file gives it
/// (or, for a dead-letter topic, more); state and stores are kept per partition, so a
/// different count would route entities elsewhere. Existing topics are all checked before any
/// is created, so a start they refuse ([`PartitionMismatch`], naming the settings to change)
/// creates nothing. Compaction and retention of existing topics are neither compared nor
/// changed.
pub async fn ensure_topics(log: &dyn Log, config: &PipelineConfig) -> Result<()> {
    let listed = log.list_topics().await.context("listing topics")?;
    let (present, missing): (Vec<_>, Vec<_>) = (topic_specs(config).into_iter())
        .partition(|spec| listed.binary_search(&spec.name).is_ok());
    let mut existing = Vec::new();
    for spec in &present {
        let partitions = match log.create_topic(spec).await {
            Ok(_) => spec.partitions,
            Err(LogError::TopicMismatch { existing, .. }) => existing,
            Err(e) => return Err(creating(e, spec)),
        };
        existing.push(ExistingTopic::new(config, &spec.name, partitions));
    }
    if let Some(mismatch) = PartitionMismatch::check(config, existing) {
        return Err(mismatch.into());
    }
    for spec in &missing {
        match log.create_topic(spec).await {
            Ok(CreateOutcome::Created) => {
                info!(topic = %spec.name, partitions = spec.partitions, "created topic")
            }
            Ok(CreateOutcome::AlreadyExists) => {}
            Err(e) => return Err(creating(e, spec)),
        }
    }
    Ok(())
}

fn creating(e: LogError, spec: &TopicSpec) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("creating topic {}", spec.name))
}

/// The entity topics, and a dead-letter topic beside each source topic: at least the source's
/// partition count (a dead letter keeps its partition number), never compacted (bad records
/// may lack a key). Counts by [`PipelineConfig::partitions_of`].
pub(crate) fn topic_specs(config: &PipelineConfig) -> Vec<TopicSpec> {
    // Features, repartition and changelog topics of the processor, when there are features.
    let mut specs = kontext_stream::processor::topic_specs(config);
    for entity in config.entities.values() {
        let settings = config.topic_settings(&entity.topic);
        specs.push(TopicSpec {
            name: entity.topic.clone(),
            partitions: config.partitions_of(&entity.topic),
            compacted: settings.compacted,
            retention: Retention {
                time: settings.retention_ms.map(Duration::from_millis),
                bytes: settings.retention_bytes,
            },
        });
    }
    if config.dead_letter.enabled {
        for topic in config.source_topics() {
            let name = config.dead_letter.topic_for(&topic);
            let partitions = config.partitions_of(&name);
            specs.push(TopicSpec::new(name, partitions));
        }
    }
    specs
}

/// A running pipeline: one store sink per store + the HTTP API.
///
/// Stop it by cancelling the shutdown token and then [`Running::join`]. Dropping it without
/// the join stops it too when the API has threads of its own (`serve.threads` > 0): the API's
/// runtime shuts down with it, its server task is dropped, and that task's drop guard cancels
/// the shutdown token (as a panicking task does), so the sinks and the processor end instead
/// of running on unserved. With the shared runtime (the default) the tasks run on until the
/// token is cancelled.
pub struct Running {
    /// The store the API serves from.
    pub store: Arc<dyn ContextStore>,
    /// The served store's sink metrics.
    pub metrics: Arc<PipelineMetrics>,
    pub addr: std::net::SocketAddr,
    /// What the API serves from, for serving MCP on stdio in the same process.
    pub state: AppState,
    sinks: Vec<(
        String,
        JoinHandle<Result<(), kontext_stream::sink::SinkError>>,
    )>,
    /// The processor stage computing `features`, when the pipeline has any.
    processor: Option<JoinHandle<Result<(), kontext_stream::processor::ProcessorError>>>,
    server: JoinHandle<std::io::Result<()>>,
    /// Runs `server` when the API has threads of its own (`serve.threads`); shut down when
    /// this is dropped, after every task ended.
    _serving: ServingRuntime,
}

impl Running {
    /// Waits for every task to end (after `shutdown` was cancelled, or on a fatal error), and
    /// returns the first failure or panic among them once all have ended.
    pub async fn join(self) -> Result<()> {
        join_tasks(self.sinks, self.processor, self.server).await
    }
}

/// Awaits every task, also after one of them failed or panicked (a task that fails or panics
/// cancels the shutdown token, so the others end too), and then returns the first failure in
/// this order: a sink's, the processor's, the HTTP server's.
async fn join_tasks<S, P>(
    sinks: Vec<(String, JoinHandle<Result<(), S>>)>,
    processor: Option<JoinHandle<Result<(), P>>>,
    server: JoinHandle<std::io::Result<()>>,
) -> Result<()>
where
    S: std::error::Error + Send + Sync + 'static,
    P: std::error::Error + Send + Sync + 'static,
{
    let mut outcomes = Vec::new();
    for (name, sink) in sinks {
        outcomes.push(outcome(sink.await, &format!("the sink of store {name}")));
    }
    if let Some(processor) = processor {
        outcomes.push(outcome(processor.await, "the processor"));
    }
    outcomes.push(outcome(server.await, "the HTTP server"));
    outcomes.into_iter().collect()
}

/// A joined task's result, its panic turned into an error naming `what` panicked.
fn outcome<E>(joined: Result<Result<(), E>, tokio::task::JoinError>, what: &str) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match joined {
        Ok(result) => result.with_context(|| format!("{what} failed")),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{what} panicked"))),
    }
}

/// Spawns `task` and cancels `stop` when it ends: returned, failed or panicked.
fn spawn_then_cancel<T: Send + 'static>(
    stop: CancellationToken,
    task: impl std::future::Future<Output = T> + Send + 'static,
) -> JoinHandle<T> {
    tokio::spawn(async move {
        let _stop = stop.drop_guard();
        task.await
    })
}

/// The HTTP API's own async runtime, if it has one. On the pipeline's runtime a request can
/// wait in the workers' queues behind the sinks' and the processor's batches; on threads of its
/// own, which sleep until a request arrives, the operating system runs it as soon as it comes.
struct ServingRuntime(Option<tokio::runtime::Runtime>);

impl ServingRuntime {
    /// The API's runtime for `threads` (none when 0: the API then runs on the current one),
    /// at the real-time `priority` unless that is 0. Built before anything else starts, so a
    /// missing privilege stops the start at once.
    fn new(threads: usize, priority: u8) -> Result<Self> {
        if threads == 0 {
            anyhow::ensure!(
                priority == 0,
                "serve.realtime_priority applies to the API's own threads only: set serve.threads to 1 or more"
            );
            return Ok(Self(None));
        }
        Ok(Self(Some(Self::runtime(threads, priority)?)))
    }

    /// Serves the API on `listener`, on this runtime (or the current one).
    fn serve(
        &self,
        listener: std::net::TcpListener,
        state: AppState,
        shutdown: CancellationToken,
    ) -> Result<JoinHandle<std::io::Result<()>>> {
        listener.set_nonblocking(true)?;
        // The listener registers with, and the server is spawned on, the entered runtime.
        let _in_runtime = self.0.as_ref().map(|runtime| runtime.enter());
        let listener = TcpListener::from_std(listener)?;
        Ok(spawn_then_cancel(
            shutdown.clone(),
            kontext_serve::serve(listener, state, shutdown),
        ))
    }

    /// The API's runtime: `threads` worker threads named `kontext-serve`, each made a
    /// real-time thread of `priority` as it starts when that is not 0 (checked first, so a
    /// missing privilege stops the start with an error that says how to grant it).
    fn runtime(threads: usize, priority: u8) -> Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(threads)
            .thread_name("kontext-serve")
            .enable_all();
        if priority > 0 {
            crate::realtime::check(priority)?;
            builder.on_thread_start(move || {
                if let Err(e) = crate::realtime::set_current_thread(priority) {
                    tracing::warn!(error = %e, priority, "a serving thread keeps normal scheduling");
                }
            });
        }
        builder
            .build()
            .context("starting the HTTP API's runtime (serve.threads)")
    }
}

impl Drop for ServingRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            // Dropped on the pipeline's runtime, which must not block.
            runtime.shutdown_background();
        }
    }
}

/// Opens the version of one of the pipeline's stores that serves now (see
/// [`crate::rebuild`]), deleting what an interrupted rebuild left behind.
pub async fn open_store(
    config: &PipelineConfig,
    store: &StoreConfig,
    data_dir: &Path,
    shutdown: &CancellationToken,
) -> Result<(Arc<dyn ContextStore>, u64)> {
    let version = rebuild::current_version(data_dir, &store.name)?;
    if store.kind == StoreKind::Embedded {
        rebuild::discard_abandoned_files(data_dir, &store.name, version)?;
    }
    definition::discard_abandoned(data_dir, &store.name, version)?;
    let opened = open_store_version(config, store, data_dir, version, shutdown).await?;
    Ok((opened, version))
}

/// Opens one version of a store: the embedded file under `data_dir`, or a connection pool
/// to PostgreSQL (retried with backoff while the server is unreachable, until `shutdown`).
pub async fn open_store_version(
    config: &PipelineConfig,
    store: &StoreConfig,
    data_dir: &Path,
    version: u64,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn ContextStore>> {
    let schema = StoreSchema::from_config(config);
    match store.kind {
        StoreKind::Embedded => {
            let path = rebuild::version_path(data_dir, &store.name, version);
            let opened = EmbeddedStore::open(&path, schema).map_err(|e| {
                let hint = match e {
                    // Says what to do itself.
                    StoreError::Incompatible(_) => String::new(),
                    _ => " (is another kontext using this data directory?)".into(),
                };
                anyhow::Error::new(e).context(format!(
                    "opening the context store {}{hint}",
                    path.display()
                ))
            })?;
            let cache = store
                .context_cache
                .unwrap_or(kontext_store::DEFAULT_CONTEXT_CACHE);
            let sync = store
                .sync_interval
                .unwrap_or(kontext_store::DEFAULT_SYNC_INTERVAL);
            Ok(Arc::new(
                opened.with_context_cache(cache).with_sync_interval(sync),
            ))
        }
        StoreKind::Postgres => {
            let url = store
                .resolved_url()
                .map_err(anyhow::Error::msg)?
                .with_context(|| {
                    format!("store {}: `url` is required for kind postgres", store.name)
                })?;
            let namespace = rebuild::version_namespace(store, version);
            let mut wait = Waiter::new(config.retry.waiting_policy());
            loop {
                let connected = match &namespace {
                    Some(ns) => PostgresStore::connect_in_namespace(&url, ns, schema.clone()).await,
                    None => PostgresStore::connect(&url, schema.clone()).await,
                };
                match connected {
                    Ok(pg) => return Ok(Arc::new(pg)),
                    Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                        let delay = wait.next_delay();
                        tracing::warn!(store = %store.name, error = %e, retry_in = ?delay, "PostgreSQL is unavailable; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("connecting store {} to PostgreSQL", store.name)
                        })
                    }
                }
            }
        }
    }
}

/// Starts the sink that feeds `store` from the pipeline's source topics, in the store's own
/// consumer group.
/// The dead letters of store `name`'s sinks (its live sink's, a rebuild's: `dlq replay` reads
/// the store's group in them to tell which store rejected a record); `None` when the pipeline
/// turns dead letters off.
pub(crate) async fn store_dead_letters(
    config: &PipelineConfig,
    name: &str,
    log: &dyn Log,
) -> Result<Option<DeadLetters>> {
    if !config.dead_letter.enabled {
        return Ok(None);
    }
    let producer = log
        .producer()
        .await
        .context("creating the dead-letter producer")?;
    Ok(Some(DeadLetters::new(
        config.dead_letter.clone(),
        config.name.clone(),
        config.store_group(name),
        producer,
    )))
}

async fn spawn_sink(
    config: &PipelineConfig,
    name: &str,
    store: Arc<dyn ContextStore>,
    log: Arc<dyn Log>,
    metrics: Arc<PipelineMetrics>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<Result<(), kontext_stream::sink::SinkError>>> {
    let consumer = ConsumerConfig::new(config.store_group(name), config.source_topics());
    let mut sink = StoreSink::new(log.clone(), store, Router::new(config), consumer, metrics)
        .with_config(config);
    if let Some(letters) = store_dead_letters(config, name, log.as_ref()).await? {
        sink = sink.with_dead_letters(letters);
    }
    // A dead sink must not leave the API serving stale context silently.
    Ok(spawn_then_cancel(shutdown.clone(), async move {
        sink.run(shutdown).await
    }))
}

/// Opens the stores, starts one sink per store and serves the API (from `serve.store`) on
/// `listen`.
pub async fn start_pipeline(
    config: &PipelineConfig,
    data_dir: &Path,
    log: Arc<dyn Log>,
    listen: &str,
    shutdown: CancellationToken,
) -> Result<Running> {
    let api_runtime = ServingRuntime::new(config.serve.threads, config.serve.realtime_priority)?;
    let served = config.served_store();
    // With features or joins, the sinks stop after the processor, once they applied what it wrote
    // (see below); a failing sink still stops everything.
    let sink_shutdown = if !config.has_processing() {
        shutdown.clone()
    } else {
        let token = CancellationToken::new();
        let (sinks_token, all) = (token.clone(), shutdown.clone());
        tokio::spawn(async move {
            sinks_token.cancelled().await;
            all.cancel();
        });
        token
    };
    let mut drained_stores = Vec::new();
    let mut sinks = Vec::new();
    let mut serving = None;
    let mut other_metrics = Vec::new();
    let mut slots = BTreeMap::new();
    for store_config in config.stores() {
        let (opened, version) = open_store(config, &store_config, data_dir, &shutdown).await?;
        definition::record_at_start(config, &store_config, data_dir, version, opened.as_ref())
            .await?;
        let switchable = Arc::new(SwitchableStore::new(opened));
        let metrics = Arc::new(PipelineMetrics::default());
        slots.insert(
            store_config.name.clone(),
            Arc::new(StoreSlot {
                config: store_config.clone(),
                store: switchable.clone(),
                version: std::sync::Mutex::new(version),
                metrics: metrics.clone(),
            }),
        );
        let store: Arc<dyn ContextStore> = switchable;
        let sink = spawn_sink(
            config,
            &store_config.name,
            store.clone(),
            log.clone(),
            metrics.clone(),
            sink_shutdown.clone(),
        )
        .await?;
        drained_stores.push(store.clone());
        info!(store = %store_config.name, kind = store.kind(), group = %config.store_group(&store_config.name), "store sink started");
        sinks.push((store_config.name.clone(), sink));
        if store_config.name == served.name {
            serving = Some((store, metrics));
        } else {
            other_metrics.push((store_config.name.clone(), metrics));
        }
    }
    let (store, metrics) = serving.context("the served store was not opened")?;
    let processor = config.has_processing().then(|| {
        let processor = kontext_stream::processor::Processor::new(config, data_dir, log.clone())
            .with_metrics(metrics.clone());
        let shutdown = shutdown.clone();
        let (log, topics) = (log.clone(), config.source_topics());
        info!(group = %kontext_stream::processor::process_group(config), "processor started");
        // The sinks stop after the processor, also when it panicked.
        spawn_then_cancel(sink_shutdown.clone(), async move {
            let result = {
                // Features that stop updating must not go unnoticed.
                let _stop = shutdown.clone().drop_guard();
                processor.run(shutdown.clone()).await
            };
            kontext_stream::processor::wait_until_applied(
                log.as_ref(),
                &drained_stores,
                &topics,
                Duration::from_secs(30),
            )
            .await;
            result
        })
    });
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("binding the HTTP API to {listen}"))?;
    let addr = listener.local_addr()?;
    let state = AppState::new(
        store.clone(),
        config.entities.keys().cloned().collect(),
        metrics.clone(),
    )
    .with_store_metrics(other_metrics)
    .with_render(config.serve.render.clone())
    .with_mcp_allowed_hosts(config.serve.mcp.allowed_hosts.clone())
    .with_lag(kontext_serve::LagSource {
        log: log.clone(),
        group: config.store_group(&served.name),
        topics: config.source_topics(),
        upstream: kontext_stream::processor::consumer_stages(config),
        transactional: config.log.exactly_once(),
    })
    .with_admin(Arc::new(Rebuilds::new(
        config.clone(),
        data_dir.to_path_buf(),
        log,
        slots,
        shutdown.clone(),
    )))
    .with_entity_descriptions(kontext_serve::mcp::EntityCatalog::from_config(config));
    let server = api_runtime.serve(listener, state.clone(), shutdown)?;
    info!(%addr, store = %served.name, "serving context");
    Ok(Running {
        store,
        metrics,
        addr,
        state,
        sinks,
        processor,
        server,
        _serving: api_runtime,
    })
}

/// The store file of a named store.
pub fn store_path(data_dir: &Path, store: &str) -> PathBuf {
    data_dir.join("stores").join(format!("{store}.redb"))
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        info!("shutting down");
        token.cancel();
    });
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::partitions::{PartitionFix, PartitionSetting};

    /// `GET path` on a plain connection from this thread, waiting at most 30 s for the answer.
    fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        match conn.read_to_string(&mut answer) {
            Ok(_) => answer,
            Err(e) => panic!("no answer to GET {path} in 30 s: {e}"),
        }
    }

    /// A task that panics stops the others, and the join reports the panic only after every
    /// task has ended (it used to return at the panic and leave the others running).
    #[tokio::test]
    async fn a_panicking_task_stops_the_others_and_the_join_awaits_them_all() {
        use std::future::Future;
        let shutdown = CancellationToken::new();
        let panicking: JoinHandle<Result<(), std::io::Error>> =
            spawn_then_cancel(shutdown.clone(), async { panic!("test: a sink panicked") });
        // Sink b, once told to stop, ends only after `finish`: its last batch.
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let stops = |token: CancellationToken| async move {
            token.cancelled().await;
            Ok::<(), std::io::Error>(())
        };
        let b = tokio::spawn({
            let stopped = stops(shutdown.clone());
            async move {
                stopped.await?;
                finished.await.expect("the test holds `finish`");
                Ok::<(), std::io::Error>(())
            }
        });
        let server = tokio::spawn(stops(shutdown.clone()));
        let mut join = Box::pin(join_tasks(
            vec![("a".into(), panicking), ("b".into(), b)],
            None::<JoinHandle<Result<(), std::io::Error>>>,
            server,
        ));
        tokio::time::timeout(Duration::from_secs(30), shutdown.cancelled())
            .await
            .expect("the panic cancels the shutdown token");
        let pending =
            std::future::poll_fn(|cx| std::task::Poll::Ready(join.as_mut().poll(cx).is_pending()))
                .await;
        assert!(pending, "the join returned while sink b was still running");
        finish.send(()).unwrap();
        let error = format!("{:#}", join.await.unwrap_err());
        assert!(error.starts_with("the sink of store a panicked"), "{error}");
        assert!(error.contains("test: a sink panicked"), "{error}");
    }

    /// With `serve.realtime_priority`, the API's runtime threads that run its tasks are
    /// `SCHED_FIFO` threads of that priority, and threads they create are not; without the
    /// privilege, the start fails and says how to grant it.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_apis_threads_run_at_the_realtime_priority_given() {
        if let Err(e) = crate::realtime::check(7) {
            // Not privileged here: the error is what a user sees.
            let message = format!("{e:#}");
            assert!(message.contains("CAP_SYS_NICE"), "{message}");
            let refused = ServingRuntime::runtime(2, 7).map(|_| ()).unwrap_err();
            assert_eq!(format!("{refused:#}"), message);
            return;
        }
        let runtime = ServingRuntime::runtime(2, 7).unwrap();
        let fifo = (libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, 7);
        let (seen, child) = runtime.block_on(async {
            let mut seen = Vec::new();
            for _ in 0..8 {
                let task = tokio::spawn(async { crate::realtime::current_thread() });
                seen.push(task.await.unwrap());
            }
            let child = tokio::spawn(async {
                std::thread::spawn(crate::realtime::current_thread)
                    .join()
                    .unwrap()
            });
            (seen, child.await.unwrap())
        });
        assert!(seen.iter().all(|&s| s == fifo), "{seen:?}");
        assert_eq!(child, (libc::SCHED_OTHER, 0));
        let normal = ServingRuntime::runtime(1, 0).unwrap();
        let (policy, _) = normal
            .block_on(async { tokio::spawn(async { crate::realtime::current_thread() }).await })
            .unwrap();
        assert_eq!(policy, libc::SCHED_OTHER);
        runtime.shutdown_background();
        normal.shutdown_background();
    }

    fn embedded_log(dir: &Path) -> Arc<dyn Log> {
        EmbeddedLog::open(&dir.join("log"), EmbeddedConfig::default()).unwrap()
    }

    async fn partitions(log: &dyn Log, topic: &str) -> usize {
        log.describe_topic(topic).await.unwrap().partitions.len()
    }

    /// An entity topic that exists with another partition count stops the start before any
    /// topic is created, and the error names the override that makes the pipeline file agree
    /// with it; with that override the start goes on, and the topics whose count follows it
    /// (its features and dead-letter topics, and the features topic's) get its count.
    #[tokio::test]
    async fn an_entity_topic_with_another_partition_count_names_its_override() {
        let dir = tempfile::tempdir().unwrap();
        let log = embedded_log(dir.path());
        let mut config = crate::quickstart::builtin_pipeline().unwrap();
        assert_eq!(config.topics.partitions, 12);
        let orders = "context.orders".to_string();
        log.create_topic(&TopicSpec::new(orders.clone(), 3))
            .await
            .unwrap();

        let error = ensure_topics(log.as_ref(), &config).await.unwrap_err();
        let mismatch = error.downcast_ref::<PartitionMismatch>().unwrap();
        let setting = PartitionSetting::Override(orders.clone());
        assert_eq!(mismatch.fix(), &PartitionFix::Set(vec![(setting, 3)]));
        let message = format!("{error:#}");
        assert!(
            message.starts_with("topic \"context.orders\" already exists with 3 partitions, not 12: set topics.overrides.context.orders.partitions: 3 in the pipeline file"),
            "{message}"
        );
        assert_eq!(log.list_topics().await.unwrap(), vec![orders.clone()]);

        config
            .topics
            .overrides
            .entry(orders.clone())
            .or_default()
            .partitions = Some(3);
        ensure_topics(log.as_ref(), &config).await.unwrap();
        let derived = [
            "context.orders.features",
            "context.orders.dlq",
            "context.orders.features.dlq",
        ];
        for topic in std::iter::once(orders.as_str()).chain(derived) {
            assert_eq!(partitions(log.as_ref(), topic).await, 3, "{topic}");
        }
        assert_eq!(partitions(log.as_ref(), "context.customers").await, 12);
    }

    /// Topics made by a run with another default count: the error counts them and names
    /// `topics.partitions`, which then starts the pipeline on them as they are.
    #[tokio::test]
    async fn topics_made_with_another_default_count_name_topics_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let log = embedded_log(dir.path());
        let mut config = crate::quickstart::builtin_pipeline().unwrap();
        config.topics.partitions = 4;
        ensure_topics(log.as_ref(), &config).await.unwrap();
        let topics = log.list_topics().await.unwrap();

        config.topics.partitions = 12;
        let error = ensure_topics(log.as_ref(), &config).await.unwrap_err();
        let mismatch = error.downcast_ref::<PartitionMismatch>().unwrap();
        assert_eq!(mismatch.misfits().count(), topics.len());
        let fix = PartitionFix::Set(vec![(PartitionSetting::Default, 4)]);
        assert_eq!(mismatch.fix(), &fix);
        let message = format!("{error:#}");
        let more = format!("not 12 (and {} more: ", topics.len() - 1);
        assert!(message.contains(&more), "{message}");

        config.topics.partitions = 4;
        ensure_topics(log.as_ref(), &config).await.unwrap();
        assert_eq!(log.list_topics().await.unwrap(), topics);
    }

    /// A dead-letter topic with more partitions than its source is used as it is (a dead
    /// letter keeps its partition number); one with fewer is refused.
    #[tokio::test]
    async fn a_dead_letter_topic_may_have_more_partitions_than_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let log = embedded_log(dir.path());
        let config = crate::quickstart::builtin_pipeline().unwrap();
        log.create_topic(&TopicSpec::new("context.orders.dlq", 24))
            .await
            .unwrap();
        log.create_topic(&TopicSpec::new("context.tickets.dlq", 3))
            .await
            .unwrap();
        let error = ensure_topics(log.as_ref(), &config).await.unwrap_err();
        let mismatch = error.downcast_ref::<PartitionMismatch>().unwrap();
        let misfits: Vec<&str> = mismatch.misfits().map(|t| t.name.as_str()).collect();
        assert_eq!(misfits, ["context.tickets.dlq"]);
        assert_eq!(log.list_topics().await.unwrap().len(), 2);
    }

    /// With threads of its own, the API answers while the pipeline's runtime has no worker
    /// free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn with_threads_of_its_own_the_api_answers_while_every_pipeline_worker_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::quickstart::builtin_pipeline().unwrap();
        config.serve.threads = 1;
        let log: Arc<dyn Log> =
            EmbeddedLog::open(&dir.path().join("log"), EmbeddedConfig::default()).unwrap();
        ensure_topics(log.as_ref(), &config).await.unwrap();
        let shutdown = CancellationToken::new();
        let running = start_pipeline(&config, dir.path(), log, "127.0.0.1:0", shutdown.clone())
            .await
            .unwrap();
        let addr = running.addr;
        // The runtime's only worker waits, without yielding, for a client on another thread.
        let answer = tokio::spawn(async move {
            std::thread::spawn(move || http_get(addr, "/v1/context/customer/C-1"))
                .join()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        assert!(answer.contains("\"entity_not_found\""), "{answer}");
        shutdown.cancel();
        running.join().await.unwrap();
    }
}
