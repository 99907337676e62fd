//! Blue/green rebuilds of a context store from the log, while the current version serves.
//!
//! A store's versions: 0 is the original (`stores/<name>.redb`, or the configured PostgreSQL
//! schema), N > 0 is `stores/<name>.v<N>.redb` or the schema `<schema>_v<N>`. The file
//! `stores/<name>.current` names the version in use (absent: 0).
//!
//! A rebuild of version N+1: open it empty, feed it from the beginning of the log in its own
//! consumer group (`kontext.<pipeline>.store.<name>.rebuild.v<N+1>`; dead letters only for
//! bad records the live version has not handled yet under the running pipeline definition,
//! the live sink reported the others: [`StoreSink::with_rebuild_letters`],
//! [`crate::definition`]) and, whenever it has applied at least
//! everything the current version has, switch ([`SwitchableStore::switch_if_caught_up`]);
//! then record the new version in the pointer file, delete the old version and the rebuild's
//! consumer group (`Log::delete_group`: its offsets are of no use any more). Until the switch
//! nothing about the current version changes: an interrupted or failed rebuild (cancelled,
//! crashed, killed) leaves it serving as before, and the next start deletes the abandoned
//! version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use kontext_core::config::{PipelineConfig, StoreConfig, StoreKind};
use kontext_core::envelope::now_ms;
use kontext_log::{ConsumerConfig, Log, LogError};
use kontext_serve::admin::{Admin, RebuildState, RebuildStatus, StatusCode};
use kontext_serve::ApiError;
use kontext_store::{ContextStore, SwitchOutcome, SwitchableStore};
use kontext_stream::sink::RebuildLetters;
use kontext_stream::{PipelineMetrics, Router, StoreSink};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{app, definition};

/// How often a running rebuild of a PostgreSQL store counts the members of the store's group.
const MEMBER_CHECK: Duration = Duration::from_secs(10);
/// How often a running rebuild samples its progress and tries to switch.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a finished rebuild waits for its consumer to have left its group before deleting
/// the group.
const GROUP_DELETE_WAIT: Duration = Duration::from_secs(10);

/// A store of the running pipeline and the version it serves.
pub struct StoreSlot {
    pub config: StoreConfig,
    pub store: Arc<SwitchableStore>,
    pub version: Mutex<u64>,
    /// The live sink's metrics, where a rebuild counts its dead letters.
    pub metrics: Arc<PipelineMetrics>,
}

/// The rebuilds of a running pipeline's stores.
pub struct Rebuilds {
    config: PipelineConfig,
    data_dir: PathBuf,
    log: Arc<dyn Log>,
    slots: BTreeMap<String, Arc<StoreSlot>>,
    runs: Mutex<BTreeMap<String, Run>>,
    shutdown: CancellationToken,
    /// The pipeline's runtime: a rebuild is pipeline work, started from a request on the API's
    /// own runtime (see [`crate::app::start_pipeline`]).
    runtime: tokio::runtime::Handle,
}

struct Run {
    status: Arc<Mutex<RebuildStatus>>,
    cancel: CancellationToken,
}

impl Rebuilds {
    pub fn new(
        config: PipelineConfig,
        data_dir: PathBuf,
        log: Arc<dyn Log>,
        slots: BTreeMap<String, Arc<StoreSlot>>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            config,
            data_dir,
            log,
            slots,
            runs: Mutex::new(BTreeMap::new()),
            shutdown,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn slot(&self, store: &str) -> Result<&Arc<StoreSlot>, ApiError> {
        self.slots.get(store).ok_or_else(|| {
            let known: Vec<&str> = self.slots.keys().map(String::as_str).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_store",
                format!(
                    "no store named {store:?}; this pipeline has: {}",
                    known.join(", ")
                ),
            )
        })
    }
}

impl Admin for Rebuilds {
    fn start_rebuild(&self, store: &str) -> Result<RebuildStatus, ApiError> {
        let slot = self.slot(store)?.clone();
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(run) = runs.get(store) {
            let status = lock(&run.status).clone();
            if status.state == RebuildState::Running {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "rebuild_running",
                    format!(
                        "store {store:?} is being rebuilt already ({} of {} records)",
                        status.applied, status.total
                    ),
                ));
            }
        }
        let current = *lock(&slot.version);
        let status = Arc::new(Mutex::new(RebuildStatus {
            store: store.to_string(),
            state: RebuildState::Running,
            current_version: current,
            target_version: current + 1,
            applied: 0,
            total: 0,
            started_ms: now_ms(),
            finished_ms: None,
            error: None,
            warnings: Vec::new(),
            restart_version: None,
        }));
        let cancel = self.shutdown.child_token();
        let job = Job {
            config: self.config.clone(),
            data_dir: self.data_dir.clone(),
            log: self.log.clone(),
            slot,
            status: status.clone(),
            cancel: cancel.clone(),
        };
        self.runtime.spawn(job.run());
        let snapshot = lock(&status).clone();
        runs.insert(store.to_string(), Run { status, cancel });
        Ok(snapshot)
    }

    fn rebuild_status(&self, store: &str) -> Result<RebuildStatus, ApiError> {
        let slot = self.slot(store)?;
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        match runs.get(store) {
            Some(run) => Ok(lock(&run.status).clone()),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_rebuild",
                format!(
                    "store {store:?} (version {}) has not been rebuilt since this process started",
                    lock(&slot.version)
                ),
            )),
        }
    }

    fn cancel_rebuild(&self, store: &str) -> Result<RebuildStatus, ApiError> {
        self.slot(store)?;
        let runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        match runs.get(store) {
            Some(run) if lock(&run.status).state == RebuildState::Running => {
                run.cancel.cancel();
                Ok(lock(&run.status).clone())
            }
            _ => Err(ApiError::new(
                StatusCode::CONFLICT,
                "no_rebuild_running",
                format!("store {store:?} is not being rebuilt"),
            )),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One rebuild, from opening the new version to the switch (or giving up).
struct Job {
    config: PipelineConfig,
    data_dir: PathBuf,
    log: Arc<dyn Log>,
    slot: Arc<StoreSlot>,
    status: Arc<Mutex<RebuildStatus>>,
    cancel: CancellationToken,
}

impl Job {
    async fn run(self) {
        let name = self.slot.config.name.clone();
        let target = lock(&self.status).target_version;
        let result = self.rebuild(target).await;
        let mut status = lock(&self.status);
        status.finished_ms = Some(now_ms());
        match result {
            Ok(true) => {
                status.state = RebuildState::Switched;
                status.current_version = target;
                match status.restart_version {
                    None => {
                        info!(store = %name, version = target, "rebuild finished: the new version serves")
                    }
                    Some(restart) => {
                        warn!(store = %name, version = target, restart_version = restart, "rebuild finished: the new version serves until a restart")
                    }
                }
            }
            Ok(false) => {
                status.state = RebuildState::Cancelled;
                info!(store = %name, "rebuild interrupted; the current version is untouched");
            }
            Err(e) => {
                status.state = RebuildState::Failed;
                status.error = Some(format!("{e:#}"));
                warn!(store = %name, error = %format!("{e:#}"), "rebuild failed; the current version is untouched");
            }
        }
    }

    /// `Ok(true)` once switched, `Ok(false)` if interrupted.
    async fn rebuild(&self, target: u64) -> Result<bool> {
        let store_config = &self.slot.config;
        self.refuse_a_shared_store(false).await?;
        let warnings = history_warnings(self.log.as_ref(), &self.config).await?;
        for warning in &warnings {
            warn!(store = %store_config.name, "{warning}");
        }
        lock(&self.status).warnings = warnings;
        discard_version(store_config, &self.data_dir, target).await?;
        let green = app::open_store_version(
            &self.config,
            store_config,
            &self.data_dir,
            target,
            &self.cancel,
        )
        .await?;
        // Before its sink starts: a failure here leaves nothing switched.
        if let Err(e) =
            definition::record_rebuilt(&self.config, store_config, &self.data_dir, target)
        {
            drop(green);
            let _ = discard_version(store_config, &self.data_dir, target).await;
            return Err(e);
        }
        let group = format!(
            "{}.rebuild.v{target}",
            self.config.store_group(&store_config.name)
        );
        info!(store = %store_config.name, version = target, %group, "rebuilding from the beginning of the log");
        let mut sink = StoreSink::new(
            self.log.clone(),
            green.clone(),
            Router::new(&self.config),
            ConsumerConfig::new(&group, self.config.source_topics()),
            Arc::new(PipelineMetrics::default()),
        )
        // The live sink's limits and retry policies: a record it applies, the rebuild applies.
        .with_config(&self.config);
        if let Some(dead_letters) =
            app::store_dead_letters(&self.config, &store_config.name, self.log.as_ref()).await?
        {
            let live: Arc<dyn ContextStore> = self.slot.store.clone();
            let current = *lock(&self.slot.version);
            let earlier_definitions = definition::earlier_definitions(
                &self.config,
                store_config,
                &self.data_dir,
                current,
                live.as_ref(),
            )
            .await?;
            sink = sink.with_rebuild_letters(RebuildLetters {
                dead_letters,
                live,
                earlier_definitions,
                metrics: self.slot.metrics.clone(),
            });
        }
        let sink_stop = self.cancel.child_token();
        let mut feeding = Some(tokio::spawn(sink.run(sink_stop.clone())));
        let outcome = self.until_switched(&green, &mut feeding).await;
        sink_stop.cancel();
        // `until_switched` takes the handle when it saw the sink end: awaiting a finished
        // `JoinHandle` a second time panics.
        let fed = match feeding {
            Some(handle) => Some(handle.await),
            None => None,
        };
        // Its consumer is closed now, and its offsets are of a version that is current or
        // discarded: nothing will read them again.
        self.delete_group(&group).await;
        match outcome {
            Ok(Some(old)) => {
                let old_version = std::mem::replace(&mut *lock(&self.slot.version), target);
                drop(old);
                // What a restart would serve: the pointer's version (the old one, unless an
                // earlier switch could not record itself).
                let durable = current_version(&self.data_dir, &store_config.name);
                let mut replaced = vec![old_version];
                match write_current_version(&self.data_dir, &store_config.name, target) {
                    Ok(()) => replaced.extend(durable.ok().filter(|&v| v != old_version)),
                    Err(e) => {
                        // The new version serves already; only a restart goes back to the one
                        // the pointer names, which stays on disk for that.
                        let durable = durable.unwrap_or(old_version);
                        let warning = format!(
                            "version {target} serves, but recording it as current failed \
                             ({e:#}): after a restart version {durable} (kept) serves again, \
                             catching up from the log if it still holds the records since \
                             then; rebuild again to make a new version stick"
                        );
                        warn!(store = %store_config.name, "{warning}");
                        {
                            let mut status = lock(&self.status);
                            status.warnings.push(warning);
                            status.restart_version = Some(durable);
                        }
                        replaced.retain(|&v| v != durable);
                    }
                }
                for version in replaced {
                    if let Err(e) = discard_version(store_config, &self.data_dir, version).await {
                        warn!(store = %store_config.name, version, error = %format!("{e:#}"), "could not delete the replaced version");
                    }
                }
                Ok(true)
            }
            Ok(None) => {
                drop(green);
                discard_version(store_config, &self.data_dir, target).await?;
                Ok(false)
            }
            Err(e) => {
                drop(green);
                let _ = discard_version(store_config, &self.data_dir, target).await;
                match fed {
                    Some(Ok(Err(sink_error))) => Err(e.context(sink_error.to_string())),
                    _ => Err(e),
                }
            }
        }
    }

    /// A PostgreSQL store other instances feed too (its consumer group has other members): a
    /// rebuild here would switch only this instance (the version pointer is a file of its data
    /// directory) and then drop the version the others still write. Checked strictly when the
    /// rebuild starts (a lookup that fails refuses too), and then every [`MEMBER_CHECK`]
    /// while it runs (`during`), where only another member counts (the live sink holds
    /// nothing for a moment whenever its own group rebalances) and a failed lookup is only
    /// logged: an instance that joined meanwhile fails the rebuild before anything is dropped,
    /// unless it joined within the last check's interval before the switch.
    async fn refuse_a_shared_store(&self, during: bool) -> Result<()> {
        if self.slot.config.kind != StoreKind::Postgres {
            return Ok(());
        }
        let name = &self.slot.config.name;
        let group = self.config.store_group(name);
        let members = match self.log.group_members(&group).await {
            Ok(members) => members,
            Err(e) if during => {
                warn!(store = %name, %group, error = %e, "cannot count the members of the store's group; checking again later");
                return Ok(());
            }
            Err(e) => {
                anyhow::bail!("cannot tell whether other instances feed store {name:?} (describing its consumer group {group:?}): {e}")
            }
        };
        let held = if during {
            i64::MAX
        } else {
            self.slot
                .metrics
                .sink_assigned_partitions
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        match shared_store_refusal(name, &group, members, held) {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }

    /// Deletes the rebuild's consumer group, waiting (unless shutting down) for a Kafka member
    /// that is still leaving. A group that cannot be deleted only costs its committed
    /// offsets: logged, not an error of the rebuild.
    async fn delete_group(&self, group: &str) {
        let deadline = tokio::time::Instant::now() + GROUP_DELETE_WAIT;
        loop {
            match self.log.delete_group(group).await {
                Ok(()) => return,
                Err(LogError::GroupBusy(_))
                    if !self.cancel.is_cancelled() && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    warn!(%group, error = %e, "could not delete the rebuild's consumer group; delete it with kafka-consumer-groups --delete");
                    return;
                }
            }
        }
    }

    /// Samples progress and tries to switch until it worked (the replaced version), the
    /// rebuild is interrupted (`None`) or its sink failed. When the sink's task ended, its
    /// handle is taken out of `feeding`.
    async fn until_switched(
        &self,
        green: &Arc<dyn ContextStore>,
        feeding: &mut Option<SinkTask>,
    ) -> Result<Option<Arc<dyn ContextStore>>> {
        let mut members_checked = tokio::time::Instant::now();
        loop {
            let Some(running) = feeding.as_mut() else {
                anyhow::bail!("the rebuild's sink is not running");
            };
            tokio::select! {
                // An interruption stops the sink too (its token is a child of ours): when both
                // are ready the interruption must win, or a cancelled rebuild reads as failed.
                biased;
                _ = self.cancel.cancelled() => return Ok(None),
                ended = running => {
                    *feeding = None;
                    if self.cancel.is_cancelled() {
                        return Ok(None);
                    }
                    let why = match ended {
                        Ok(Ok(())) => "the rebuild's sink stopped".to_string(),
                        Ok(Err(e)) => format!("the rebuild's sink failed: {e}"),
                        Err(e) => format!("the rebuild's sink panicked: {e}"),
                    };
                    anyhow::bail!(why);
                }
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            if members_checked.elapsed() >= MEMBER_CHECK {
                self.refuse_a_shared_store(true).await?;
                members_checked = tokio::time::Instant::now();
            }
            let applied: i64 = green.applied_offsets().await?.values().sum();
            let total = high_watermarks(self.log.as_ref(), &self.config).await?;
            {
                let mut status = lock(&self.status);
                status.applied = applied;
                status.total = total;
            }
            if let (SwitchOutcome::Switched, old) = self
                .slot
                .store
                .switch_if_caught_up(green, &self.config.source_topics())
                .await?
            {
                return Ok(old);
            }
        }
    }
}

/// Why a PostgreSQL store's rebuild must not run here, if it must not: its consumer group
/// `group` has other members than this instance's live sink (`members`, `None` where groups
/// are exclusive), or one member while that sink holds no partition (`held`): another
/// instance, or this one still joining.
fn shared_store_refusal(
    store: &str,
    group: &str,
    members: Option<usize>,
    held: i64,
) -> Option<String> {
    let members = members?;
    let shared = members > 1 || (members == 1 && held <= 0);
    shared.then(|| format!(
        "store {store:?} is fed by {members} member(s) of its consumer group {group:?}, and this instance's sink holds {held} partition(s): other instances of this pipeline feed this PostgreSQL store too (or this one is still joining the group: try again in a few seconds). A rebuild here would switch only this instance and drop the version the others write. Stop the other instances, rebuild, then start them again"
    ))
}

/// The task feeding a rebuild's new version.
type SinkTask = tokio::task::JoinHandle<Result<(), kontext_stream::sink::SinkError>>;

/// What a replay of the pipeline's source topics cannot see: records before a partition's low
/// watermark (removed by retention), and compacted topics (older records of a key removed).
/// The rebuild still runs and switches when caught up (offsets are all it compares): these say
/// what the new version lacks that the current one may have.
async fn history_warnings(log: &dyn Log, config: &PipelineConfig) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for topic in config.source_topics() {
        let description = log.describe_topic(&topic).await?;
        let gone: i64 = description.partitions.iter().map(|p| p.low_watermark).sum();
        if gone > 0 {
            warnings.push(format!("{topic}: the log no longer holds its first {gone} records (retention removed them): the new version lacks what only they said"));
        }
        if description.compacted {
            warnings.push(format!("{topic} is compacted: the log keeps only the newest record of each key, so the new version lacks what older records said"));
        }
    }
    Ok(warnings)
}

/// Records in the pipeline's source topics: high watermarks summed.
async fn high_watermarks(log: &dyn Log, config: &PipelineConfig) -> Result<i64> {
    let mut total = 0;
    for topic in config.source_topics() {
        let description = log.describe_topic(&topic).await?;
        total += description
            .partitions
            .iter()
            .map(|p| p.high_watermark)
            .sum::<i64>();
    }
    Ok(total)
}

/// The file of an embedded store's version.
pub fn version_path(data_dir: &Path, store: &str, version: u64) -> PathBuf {
    match version {
        0 => app::store_path(data_dir, store),
        v => data_dir.join("stores").join(format!("{store}.v{v}.redb")),
    }
}

/// The PostgreSQL schema of a store's version (`None`: the URL's default schema): see
/// [`StoreConfig::version_schema`].
pub fn version_namespace(store: &StoreConfig, version: u64) -> Option<String> {
    store.version_schema(version)
}

fn pointer_path(data_dir: &Path, store: &str) -> PathBuf {
    data_dir.join("stores").join(format!("{store}.current"))
}

/// The version a store serves, from its pointer file (0 without one).
pub fn current_version(data_dir: &Path, store: &str) -> Result<u64> {
    let path = pointer_path(data_dir, store);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().with_context(|| {
            format!(
                "{} should hold a version number; delete it to use version 0",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Makes `version` current durably: write a temporary file, fsync, rename over the pointer,
/// fsync the directory.
fn write_current_version(data_dir: &Path, store: &str, version: u64) -> Result<()> {
    write_durably(
        &pointer_path(data_dir, store),
        format!("{version}\n").as_bytes(),
    )
}

/// Replaces the file at `path` (in `stores/`) with `contents` durably: a temporary file,
/// fsync, rename, fsync of the directory.
pub fn write_durably(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().expect("a file in stores/");
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Deletes a version's data (a replaced or abandoned one); absent data is fine.
pub async fn discard_version(store: &StoreConfig, data_dir: &Path, version: u64) -> Result<()> {
    remove_if_present(&definition::path(data_dir, &store.name, version))?;
    match store.kind {
        StoreKind::Embedded => remove_if_present(&version_path(data_dir, &store.name, version)),
        StoreKind::Postgres => match version_namespace(store, version) {
            // Version 0 without a schema lives in `public`, beside whatever else is there:
            // it is left in place.
            None => Ok(()),
            Some(ns) if version == 0 && store.schema.is_some() => {
                warn!(store = %store.name, schema = %ns, "leaving the original schema in place; drop it when no longer needed");
                Ok(())
            }
            Some(ns) => {
                let url = store
                    .resolved_url()
                    .map_err(anyhow::Error::msg)?
                    .context("a postgres store needs a url")?;
                kontext_store::postgres::drop_namespace(&url, &ns)
                    .await
                    .with_context(|| format!("dropping the schema {ns}"))
            }
        },
    }
}

/// Deletes a file; an absent one is fine.
pub fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {}", path.display())),
    }
}

/// Deletes the versions of an embedded store a crashed or interrupted rebuild left behind
/// (every `<name>.v<N>.redb` but the current one).
pub fn discard_abandoned_files(data_dir: &Path, store: &str, current: u64) -> Result<()> {
    for (version, path) in version_files(data_dir, store, ".redb") {
        if version != current {
            info!(
                store,
                version, "deleting a version an interrupted rebuild left behind"
            );
            std::fs::remove_file(&path).with_context(|| format!("deleting {}", path.display()))?;
        }
    }
    Ok(())
}

/// The files in `stores/` named `<store>.v<N><suffix>`, with their version `N`.
pub fn version_files(data_dir: &Path, store: &str, suffix: &str) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("stores")) else {
        return Vec::new();
    };
    let prefix = format!("{store}.v");
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .strip_prefix(&prefix)?
                .strip_suffix(suffix)?
                .parse()
                .ok()?;
            Some((version, entry.path()))
        })
        .collect()
}

/// The names of the files in `dir`, sorted.
#[cfg(test)]
pub(crate) fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// `kontext rebuild`: asks the running pipeline to rebuild a store and follows its progress.
#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    /// The store to rebuild (its `name` in the pipeline file).
    #[arg(long)]
    pub store: String,
    /// The pipeline file: the API address is its `serve.listen`.
    #[arg(short, long, required_unless_present = "api")]
    pub config: Option<PathBuf>,
    /// The running pipeline's API, e.g. `http://127.0.0.1:8080` (instead of `--config`).
    #[arg(long)]
    pub api: Option<String>,
    /// Start the rebuild and return without following it.
    #[arg(long)]
    pub detach: bool,
}

/// Starts the rebuild over HTTP and prints its progress until it switched, failed or was
/// interrupted; Ctrl-C interrupts it (the current version keeps serving).
pub async fn run_cli(args: RebuildArgs) -> Result<()> {
    let api = match (&args.api, &args.config) {
        (Some(api), _) => api.trim_end_matches('/').to_string(),
        (None, Some(path)) => format!("http://{}", PipelineConfig::load(path)?.serve.listen),
        (None, None) => anyhow::bail!("give --config or --api"),
    };
    let url = format!("{api}/v1/admin/stores/{}/rebuild", args.store);
    let client = reqwest::Client::new();
    let started = client.post(&url).send().await.with_context(|| {
        format!("no kontext is serving at {api}: start the pipeline (kontext run -c ...) first; a rebuild runs inside it")
    })?;
    let mut status = admin_reply(started).await?;
    eprintln!(
        "rebuilding store {:?}: version {} -> {} (the current version keeps serving)",
        status.store, status.current_version, status.target_version
    );
    let mut warned = 0;
    let mut warn_new = |status: &RebuildStatus| {
        for warning in status.warnings.iter().skip(warned) {
            eprintln!("warning: {warning}");
        }
        warned = warned.max(status.warnings.len());
    };
    if args.detach {
        return Ok(());
    }
    let interrupted = CancellationToken::new();
    app::cancel_on_signal(interrupted.clone());
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_print = 0;
    while status.state == RebuildState::Running {
        tokio::select! {
            _ = interrupted.cancelled() => {
                status = admin_reply(client.delete(&url).send().await?).await?;
                eprintln!("\ninterrupting the rebuild; the current version is untouched");
                while status.state == RebuildState::Running {
                    tokio::time::sleep(CHECK_EVERY).await;
                    status = admin_reply(client.get(&url).send().await?).await?;
                }
                break;
            }
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        status = admin_reply(client.get(&url).send().await?).await?;
        warn_new(&status);
        let now = now_ms();
        if tty || now - last_print >= 1_000 {
            last_print = now;
            eprint!(
                "{}{}",
                progress_line(&status),
                if tty { "\r" } else { "\n" }
            );
        }
    }
    warn_new(&status);
    eprintln!("{}", progress_line(&status));
    println!("{}", outcome(&status)?);
    Ok(())
}

/// The last line of `kontext rebuild`: success only for a switch that a restart keeps.
fn outcome(status: &RebuildStatus) -> Result<String> {
    let took = status.finished_ms.unwrap_or_else(now_ms) - status.started_ms;
    match status.state {
        RebuildState::Switched => match status.restart_version {
            None => Ok(format!(
                "store {:?} rebuilt: version {} serves ({} records replayed in {:.1} s)",
                status.store,
                status.current_version,
                status.applied,
                took as f64 / 1000.0
            )),
            Some(restart) => anyhow::bail!(
                "store {:?} rebuilt, but not recorded as current: version {} serves until a \
                 restart, then version {restart} again (see the warning above)",
                status.store,
                status.current_version
            ),
        },
        RebuildState::Cancelled => anyhow::bail!(
            "rebuild of {:?} interrupted; version {} still serves",
            status.store,
            status.current_version
        ),
        RebuildState::Failed | RebuildState::Running => anyhow::bail!(
            "rebuild of {:?} failed: {}; version {} still serves",
            status.store,
            status.error.as_deref().unwrap_or("unknown error"),
            status.current_version
        ),
    }
}

/// `[#########...........]  45%  1234/2741 records`
fn progress_line(status: &RebuildStatus) -> String {
    const WIDTH: usize = 30;
    let fraction = if status.total > 0 {
        (status.applied as f64 / status.total as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let done = (fraction * WIDTH as f64).round() as usize;
    format!(
        "[{}{}] {:>3}%  {}/{} records",
        "#".repeat(done),
        ".".repeat(WIDTH - done),
        (fraction * 100.0).round() as u32,
        status.applied,
        status.total
    )
}

async fn admin_reply(response: reqwest::Response) -> Result<RebuildStatus> {
    let code = response.status();
    let body = response.text().await?;
    if code.is_success() {
        return serde_json::from_str(&body).with_context(|| format!("unexpected answer: {body}"));
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    anyhow::bail!("{message} (HTTP {code})")
}

#[cfg(test)]
mod tests {
    use kontext_log::embedded::{EmbeddedConfig, EmbeddedLog};

    use super::*;

    async fn wait_for(status: impl Fn() -> RebuildStatus, state: RebuildState) -> RebuildStatus {
        for _ in 0..400 {
            let s = status();
            if s.state == state {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the rebuild never reached {state:?}: {:?}", status());
    }

    /// The pipeline's served store at version 0 over `log` (its topics created), and the
    /// rebuilds of it.
    struct Served {
        name: String,
        /// Version 0, under the switchable handle.
        blue: Arc<dyn ContextStore>,
        slot: Arc<StoreSlot>,
        rebuilds: Rebuilds,
        shutdown: CancellationToken,
    }

    impl Served {
        async fn open(dir: &Path, config: &PipelineConfig, log: Arc<dyn Log>) -> Self {
            app::ensure_topics(log.as_ref(), config).await.unwrap();
            let store_config = config.served_store();
            let shutdown = CancellationToken::new();
            let (blue, version) = app::open_store(config, &store_config, dir, &shutdown)
                .await
                .unwrap();
            assert_eq!(version, 0);
            let slot = Arc::new(StoreSlot {
                config: store_config.clone(),
                store: Arc::new(SwitchableStore::new(blue.clone())),
                version: Mutex::new(0),
                metrics: Arc::new(PipelineMetrics::default()),
            });
            let rebuilds = Rebuilds::new(
                config.clone(),
                dir.to_path_buf(),
                log,
                BTreeMap::from([(store_config.name.clone(), slot.clone())]),
                shutdown.clone(),
            );
            Self {
                name: store_config.name,
                blue,
                slot,
                rebuilds,
                shutdown,
            }
        }

        /// Records the definition of version 0, as `app::start_pipeline` does.
        async fn record_definition(&self, dir: &Path, config: &PipelineConfig) {
            definition::record_at_start(config, &self.slot.config, dir, 0, self.blue.as_ref())
                .await
                .unwrap();
        }

        fn status(&self) -> RebuildStatus {
            self.rebuilds.rebuild_status(&self.name).unwrap()
        }

        /// Starts a rebuild and waits for it to switch.
        async fn rebuild(&self) -> RebuildStatus {
            self.rebuilds.start_rebuild(&self.name).unwrap();
            wait_for(|| self.status(), RebuildState::Switched).await
        }
    }

    fn embedded_log(dir: &Path, config: EmbeddedConfig) -> Arc<dyn Log> {
        EmbeddedLog::open(&dir.join("log"), config).unwrap()
    }

    /// A rebuild that cannot catch up (the current version claims offsets the log does not
    /// have yet) is interrupted: the current version still serves, no pointer file was
    /// written and the abandoned version's file is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_rebuild_leaves_the_current_version_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::quickstart::builtin_pipeline().unwrap();
        let log = embedded_log(dir.path(), EmbeddedConfig::default());
        let Served {
            name,
            blue,
            slot,
            rebuilds,
            ..
        } = Served::open(dir.path(), &config, log).await;
        let topic = config.source_topics()[0].clone();
        blue.apply(&[], &[(topic, 0, 1_000_000)]).await.unwrap();
        let started = rebuilds.start_rebuild(&name).unwrap();
        assert_eq!((started.current_version, started.target_version), (0, 1));
        let again = rebuilds.start_rebuild(&name).unwrap_err();
        assert_eq!(again.code, "rebuild_running");
        assert!(
            version_path(dir.path(), &name, 1).exists() || {
                // The job may not have opened it yet; give it a moment.
                tokio::time::sleep(Duration::from_millis(300)).await;
                version_path(dir.path(), &name, 1).exists()
            }
        );

        rebuilds.cancel_rebuild(&name).unwrap();
        let status = || rebuilds.rebuild_status(&name).unwrap();
        let done = wait_for(status, RebuildState::Cancelled).await;
        assert_eq!(done.current_version, 0);
        assert!(Arc::ptr_eq(&slot.store.current(), &blue));
        assert_eq!(*slot.version.lock().unwrap(), 0);
        assert!(!pointer_path(dir.path(), &name).exists());
        assert!(!version_path(dir.path(), &name, 1).exists());
        assert_eq!(current_version(dir.path(), &name).unwrap(), 0);
    }

    /// Recording the new version as current fails after the switch (here: a directory where
    /// the pointer's temporary file goes). The new version serves, and the status says so
    /// rather than "failed, untouched"; the version the pointer names stays on disk for a
    /// restart, and goes with the first switch that records itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_switch_whose_pointer_cannot_be_written_says_what_serves() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::quickstart::builtin_pipeline().unwrap();
        let log = embedded_log(dir.path(), EmbeddedConfig::default());
        let served = Served::open(dir.path(), &config, log).await;
        let mut tmp = pointer_path(dir.path(), &served.name).into_os_string();
        tmp.push(".tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let exists = |v| version_path(dir.path(), &served.name, v).exists();

        let status = served.rebuild().await;
        assert_eq!((status.current_version, status.error.as_deref()), (1, None));
        let warned = |status: &RebuildStatus, serving: u64| {
            let want = format!("version {serving} serves, but recording it as current failed");
            assert!(
                status.warnings.iter().any(|w| w.contains(&want)
                    && w.contains("after a restart version 0 (kept) serves again")),
                "{:?}",
                status.warnings
            );
            assert_eq!(status.restart_version, Some(0));
            let last = outcome(status).unwrap_err().to_string();
            assert!(
                last.contains(&format!(
                    "version {serving} serves until a restart, then version 0 again"
                )),
                "{last}"
            );
        };
        warned(&status, 1);
        assert!(!Arc::ptr_eq(&served.slot.store.current(), &served.blue));
        assert_eq!(*served.slot.version.lock().unwrap(), 1);
        assert_eq!(current_version(dir.path(), &served.name).unwrap(), 0);
        assert!(exists(0) && exists(1));

        // Failing again: the pointer still names 0, which a restart would serve; 1 goes.
        let status = served.rebuild().await;
        warned(&status, 2);
        assert_eq!(current_version(dir.path(), &served.name).unwrap(), 0);
        assert!(exists(0) && !exists(1) && exists(2));

        // Recorded at last: neither the one it replaced nor the pointer's old one is kept.
        std::fs::remove_dir(&tmp).unwrap();
        let status = served.rebuild().await;
        assert_eq!(status.warnings, Vec::<String>::new());
        assert_eq!(status.restart_version, None);
        let last = outcome(&status).unwrap();
        assert!(last.contains("rebuilt: version 3 serves"), "{last}");
        assert_eq!(current_version(dir.path(), &served.name).unwrap(), 3);
        assert!(!exists(0) && !exists(1) && !exists(2) && exists(3));
    }

    /// The current version holds offsets of a topic the pipeline no longer reads (a source
    /// removed from the file, the usual reason to rebuild). The new version can never have
    /// them; the rebuild still switches, comparing only the topics it is fed from.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_after_a_source_topic_was_removed_switches() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::quickstart::builtin_pipeline().unwrap();
        let log = embedded_log(dir.path(), EmbeddedConfig::default());
        let served = Served::open(dir.path(), &config, log).await;
        // Applied by an earlier pipeline file that also read `context.legacy`.
        let legacy = ("context.legacy".to_string(), 0, 42);
        served.blue.apply(&[], &[legacy]).await.unwrap();
        assert_eq!(served.rebuild().await.current_version, 1);
    }

    /// A CRM customer update of the builtin pipeline.
    fn crm_record(key: &str, email: &str) -> kontext_core::record::ProduceRecord {
        let data = serde_json::json!({"customer_id": key, "first_name": "A", "last_name": "B", "email": email});
        kontext_core::record::ProduceRecord::new(
            "context.customers",
            Some(bytes::Bytes::from(key.to_string())),
            Some(bytes::Bytes::from(data.to_string())),
        )
        .with_header("ce_specversion", "1.0")
        .with_header("ce_id", format!("id-{key}"))
        .with_header("ce_source", "crm")
        .with_header("ce_type", "crm.customer.updated")
        .with_header("content-type", "application/json")
    }

    /// A log taking records of up to 8 MiB (Kafka with message.max.bytes raised), holding a
    /// 2 MiB update of customer C-1 (within a 4 MiB `limits.max_record_bytes`, above the
    /// default) and a small one of C-2.
    async fn log_with_a_large_record(dir: &Path) -> Arc<dyn Log> {
        let log = embedded_log(
            dir,
            EmbeddedConfig {
                max_record_bytes: 8 * 1024 * 1024,
                ..EmbeddedConfig::default()
            },
        );
        let config = crate::quickstart::builtin_pipeline().unwrap();
        app::ensure_topics(log.as_ref(), &config).await.unwrap();
        let big = "x".repeat(2 * 1024 * 1024);
        log.producer()
            .await
            .unwrap()
            .send(vec![
                crm_record("C-1", &big),
                crm_record("C-2", "c2@example.com"),
            ])
            .await
            .unwrap();
        log
    }

    /// Runs the live sink, as `app::spawn_sink` builds it, until it applied C-1 and C-2.
    async fn live_sink_applies_both(served: &Served, config: &PipelineConfig, log: Arc<dyn Log>) {
        let switchable = served.slot.store.clone();
        let live = StoreSink::new(
            log,
            switchable.clone(),
            Router::new(config),
            ConsumerConfig::new(config.store_group(&served.name), config.source_topics()),
            served.slot.metrics.clone(),
        )
        .with_config(config);
        let live_stop = served.shutdown.child_token();
        let live_task = tokio::spawn(live.run(live_stop.clone()));
        for _ in 0..400 {
            if switchable.get("customer", "C-1").await.unwrap().is_some()
                && switchable.get("customer", "C-2").await.unwrap().is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        live_stop.cancel();
        live_task.await.unwrap().unwrap();
        let applied = switchable.get("customer", "C-1").await.unwrap();
        assert!(applied.is_some(), "the live sink applied C-1");
    }

    /// The rebuild's sink takes the pipeline's `limits:` (and `retry:`): a record the live sink
    /// applied (within `limits.max_record_bytes`, above the default) is in the new version too,
    /// not skipped as too large and gone after the switch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_keeps_what_the_live_sink_applied_under_the_pipeline_limits() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::quickstart::builtin_pipeline().unwrap();
        config.limits.max_record_bytes = 4 * 1024 * 1024;
        let log = log_with_a_large_record(dir.path()).await;
        let served = Served::open(dir.path(), &config, log.clone()).await;
        live_sink_applies_both(&served, &config, log).await;

        assert_eq!(served.rebuild().await.current_version, 1);
        let switchable = &served.slot.store;
        assert!(switchable.get("customer", "C-2").await.unwrap().is_some());
        assert!(
            switchable.get("customer", "C-1").await.unwrap().is_some(),
            "customer C-1, served before the rebuild, is gone after it"
        );
        let letters = log_end(&served, "context.customers.dlq").await;
        assert_eq!(letters, 0, "nothing to dead-letter");
    }

    /// The pipeline file changed since the live sink applied C-1 (its limit is the default
    /// now, and C-1 is larger): the rebuild, under the running file, dead-letters C-1 rather
    /// than leave it out of the new version without a word, and the letter is counted in the
    /// live sink's (exported) metrics. The new version's definition file starts clean.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_dead_letters_what_an_earlier_pipeline_file_applied_and_this_one_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let mut earlier = crate::quickstart::builtin_pipeline().unwrap();
        earlier.limits.max_record_bytes = 4 * 1024 * 1024;
        let log = log_with_a_large_record(dir.path()).await;
        {
            let served = Served::open(dir.path(), &earlier, log.clone()).await;
            served.record_definition(dir.path(), &earlier).await;
            live_sink_applies_both(&served, &earlier, log.clone()).await;
        }

        // Restarted with the default limit, as `app::start_pipeline` does.
        let running = crate::quickstart::builtin_pipeline().unwrap();
        let served = Served::open(dir.path(), &running, log.clone()).await;
        served.record_definition(dir.path(), &running).await;
        assert_eq!(served.rebuild().await.current_version, 1);
        let switchable = &served.slot.store;
        assert!(switchable.get("customer", "C-2").await.unwrap().is_some());
        assert!(switchable.get("customer", "C-1").await.unwrap().is_none());
        assert_eq!(log_end(&served, "context.customers.dlq").await, 1);
        let counted = served.slot.metrics.dead_lettered();
        assert_eq!(counted.values().sum::<u64>(), 1, "{counted:?}");
        assert!(!definition::path(dir.path(), &served.name, 0).exists());
        let rebuilt = definition::earlier_definitions(
            &running,
            &served.slot.config,
            dir.path(),
            1,
            served.blue.as_ref(),
        )
        .await
        .unwrap();
        assert!(rebuilt.is_empty(), "{rebuilt:?}");
    }

    /// Records in `topic` (summed high watermarks).
    async fn log_end(served: &Served, topic: &str) -> i64 {
        let description = served.rebuilds.log.describe_topic(topic).await.unwrap();
        description
            .partitions
            .iter()
            .map(|p| p.high_watermark)
            .sum()
    }

    /// A PostgreSQL store's group with another member than this instance's sink (or one
    /// member while this sink holds nothing: another instance, or this one joining) refuses
    /// the rebuild; a group of this sink alone, and an embedded log (exclusive groups), do not.
    #[test]
    fn a_store_other_instances_feed_is_refused() {
        let refuse =
            |members, held| shared_store_refusal("pg", "kontext.p.store.pg", members, held);
        assert_eq!(refuse(Some(1), 12), None);
        assert_eq!(
            refuse(Some(0), 0),
            None,
            "not joined at all: nobody else either"
        );
        assert_eq!(refuse(None, 0), None);
        let why = refuse(Some(2), 6).unwrap();
        assert!(
            why.contains("2 member(s)") && why.contains("other instances"),
            "{why}"
        );
        assert!(
            refuse(Some(3), 0).is_some(),
            "more instances than partitions"
        );
        assert!(
            refuse(Some(1), 0).is_some(),
            "the one member is not this sink (yet)"
        );
    }

    /// A source topic that lost history (compacted here; retention likewise) still rebuilds
    /// and switches, and the status says what the new version lacks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_says_when_the_log_lost_history() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::quickstart::builtin_pipeline().unwrap();
        let log = embedded_log(dir.path(), EmbeddedConfig::default());
        let partitions = config.topic_settings("context.orders").partitions.unwrap();
        let mut spec = kontext_log::TopicSpec::new("context.orders", partitions);
        spec.compacted = true;
        log.create_topic(&spec).await.unwrap();
        let done = Served::open(dir.path(), &config, log).await.rebuild().await;
        assert_eq!(done.warnings.len(), 1, "{:?}", done.warnings);
        assert!(
            done.warnings[0].starts_with("context.orders is compacted"),
            "{:?}",
            done.warnings
        );
    }

    #[test]
    fn abandoned_versions_are_deleted_and_the_current_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stores = dir.path().join("stores");
        std::fs::create_dir_all(&stores).unwrap();
        for f in ["main.v1.redb", "main.v2.redb", "other.v1.redb", "main.redb"] {
            std::fs::write(stores.join(f), b"x").unwrap();
        }
        write_current_version(dir.path(), "main", 2).unwrap();
        assert_eq!(current_version(dir.path(), "main").unwrap(), 2);
        discard_abandoned_files(dir.path(), "main", 2).unwrap();
        assert_eq!(
            file_names(&stores),
            ["main.current", "main.redb", "main.v2.redb", "other.v1.redb"]
        );
    }
}
