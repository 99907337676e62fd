//! Which pipeline definition a store version's records were handled under, so that a rebuild
//! can tell the bad records the live sink dead-lettered from those it applied under an
//! earlier pipeline file.
//!
//! A rebuild dead-letters a bad record only if the live sink has not handled it
//! ([`kontext_stream::sink::RebuildLetters`]): the live sink dead-lettered it already. That
//! holds only if both judged it by the same definition. The usual reason to rebuild is a
//! changed pipeline file, and a record the old mapping applied may fail the new one (a new
//! coercion, a smaller `limits.max_record_bytes`, dead letters turned on): the rebuild must
//! dead-letter it, or its effect is gone after the switch and nothing says so.
//!
//! So each version has `stores/<name>.v<N>.definition.json`: the definition its live sink
//! runs ([`definition`]) and the offsets below which it handled records under other ones.
//! At start, a definition that differs from the recorded one (or none recorded: a store from
//! before this file, whose history is unknown) moves those offsets up to everything the
//! version has applied. A rebuild's new version is built under the running definition and
//! starts with none. The file belongs to the instance's data directory, like the version
//! pointer: an instance sharing a PostgreSQL store records only what its own starts saw.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kontext_core::config::{PipelineConfig, StoreConfig};
use kontext_store::ContextStore;
use kontext_stream::sink::Handled;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::rebuild;

/// What the recording file of a version holds.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    /// [`definition`] of the last start, as text: compared as text, so that nothing parsed
    /// back (a float) can differ from what the running file gives.
    definition: String,
    /// Next offsets per partition below which records were handled under other definitions.
    earlier_definitions_below: Vec<Mark>,
}

impl Recorded {
    /// [`Recorded::earlier_definitions_below`] as offsets.
    fn below(self) -> Handled {
        self.earlier_definitions_below
            .into_iter()
            .map(|m| ((m.topic, m.partition), m.next_offset))
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Mark {
    topic: String,
    partition: i32,
    next_offset: i64,
}

/// The parts of a pipeline that decide what a store's sink makes of a record: the mapping
/// (entities, sources, features and joins, whose outputs it reads), `limits:`, whether bad
/// records are dead-lettered, the store's kind, and the kontext version. Any change to them
/// counts (a change that decides nothing differently costs only second letters at the next
/// rebuild); ports, retries and caches do not. JSON text: maps are ordered, so the same file
/// gives the same text.
pub fn definition(config: &PipelineConfig, store: &StoreConfig) -> String {
    serde_json::json!({
        "kontext": env!("CARGO_PKG_VERSION"),
        "entities": config.entities,
        "sources": config.sources,
        "features": config.features,
        "joins": config.joins,
        "limits": config.limits,
        "dead_letter": config.dead_letter,
        "store_kind": store.kind,
    })
    .to_string()
}

/// The end of a recording file's name, after `<store>.v<N>`.
const SUFFIX: &str = ".definition.json";

/// The recording file of a store's version.
pub fn path(data_dir: &Path, store: &str, version: u64) -> PathBuf {
    data_dir
        .join("stores")
        .join(format!("{store}.v{version}{SUFFIX}"))
}

/// The recorded file, `None` when there is none or it cannot be read (then the history is
/// unknown, which costs second letters, not lost ones).
fn read(path: &Path) -> Option<Recorded> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the store's recorded definition; treating everything it applied as handled under another one");
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(recorded) => Some(recorded),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the store's recorded definition is not valid; treating everything it applied as handled under another one");
            None
        }
    }
}

fn write(path: &Path, definition: String, below: &Handled) -> Result<()> {
    let recorded = Recorded {
        definition,
        earlier_definitions_below: below
            .iter()
            .map(|((topic, partition), next)| Mark {
                topic: topic.clone(),
                partition: *partition,
                next_offset: *next,
            })
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&recorded)?;
    rebuild::write_durably(path, &text).with_context(|| format!("recording {}", path.display()))
}

/// At the start of `version`'s live sink: records the running definition, and, when it is not
/// the recorded one, that everything `store` has applied was handled under another.
pub async fn record_at_start(
    config: &PipelineConfig,
    store_config: &StoreConfig,
    data_dir: &Path,
    version: u64,
    store: &dyn ContextStore,
) -> Result<()> {
    let path = path(data_dir, &store_config.name, version);
    let running = definition(config, store_config);
    let recorded = read(&path);
    if recorded.as_ref().is_some_and(|r| r.definition == running) {
        return Ok(());
    }
    let mut below = recorded.map(Recorded::below).unwrap_or_default();
    let applied = store
        .applied_offsets()
        .await
        .with_context(|| format!("reading the offsets of store {}", store_config.name))?;
    for (tp, next) in applied {
        let mark = below.entry(tp).or_insert(next);
        *mark = (*mark).max(next);
    }
    if !below.is_empty() {
        info!(store = %store_config.name, version, "the pipeline definition changed: a rebuild will dead-letter the bad records of what this version applied so far, whatever the live sink did with them");
    }
    if let Err(e) = write(&path, running, &below) {
        // A read-only data directory (a Kafka log and PostgreSQL stores need nothing else
        // there) must not stop the pipeline. Without the file a rebuild letters every bad
        // record this version applied; a stale file must not stay behind to say otherwise.
        rebuild::remove_if_present(&path).with_context(|| {
            format!(
                "{e:#}; and the earlier record cannot be deleted either: delete {} by hand",
                path.display()
            )
        })?;
        warn!(store = %store_config.name, error = %format!("{e:#}"), "cannot record the pipeline definition; a rebuild will dead-letter every bad record this version applied");
    }
    Ok(())
}

/// A version being rebuilt, before its sink starts: every record it will hold is handled under
/// the running definition.
pub fn record_rebuilt(
    config: &PipelineConfig,
    store_config: &StoreConfig,
    data_dir: &Path,
    version: u64,
) -> Result<()> {
    let path = path(data_dir, &store_config.name, version);
    write(&path, definition(config, store_config), &Handled::new())
}

/// Deletes the files of every version of `store` but `current` (and temporary files of
/// interrupted writes): what a crash between a rebuild's switch and the deletion of the old
/// version, or an abandoned rebuild, left behind.
pub fn discard_abandoned(data_dir: &Path, store: &str, current: u64) -> Result<()> {
    let others = rebuild::version_files(data_dir, store, SUFFIX)
        .into_iter()
        .filter(|(version, _)| *version != current);
    // `rebuild::write_durably`'s temporary files, of any version.
    let interrupted = rebuild::version_files(data_dir, store, &format!("{SUFFIX}.tmp"));
    for (_, path) in others.chain(interrupted) {
        // Never read: `record_rebuilt` writes a version's file before its sink starts.
        if let Err(e) = rebuild::remove_if_present(&path) {
            warn!(error = %format!("{e:#}"), "cannot delete an abandoned definition file; leaving it");
        }
    }
    Ok(())
}

/// For a rebuild of the version `live` serves: below which offsets the live sink handled records
/// under another definition than the running one. Without a record of this start (a store
/// written by a kontext without this file, or a file that cannot be read), all it applied.
pub async fn earlier_definitions(
    config: &PipelineConfig,
    store_config: &StoreConfig,
    data_dir: &Path,
    version: u64,
    live: &dyn ContextStore,
) -> Result<Handled> {
    match read(&path(data_dir, &store_config.name, version)) {
        Some(r) if r.definition == definition(config, store_config) => Ok(r.below()),
        _ => Ok(live.applied_offsets().await?),
    }
}

#[cfg(test)]
mod tests {
    use kontext_store::{EmbeddedStore, StoreSchema};

    use super::*;

    fn offsets(pairs: &[(&str, i32, i64)]) -> Handled {
        pairs
            .iter()
            .map(|(t, p, n)| ((t.to_string(), *p), *n))
            .collect()
    }

    /// A data directory, the builtin pipeline, its served store's config and an embedded store.
    fn fixture() -> (
        tempfile::TempDir,
        PipelineConfig,
        StoreConfig,
        EmbeddedStore,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::quickstart::builtin_pipeline().unwrap();
        let store_config = config.served_store();
        let store = EmbeddedStore::open(
            &dir.path().join("s.redb"),
            StoreSchema::from_config(&config),
        )
        .unwrap();
        (dir, config, store_config, store)
    }

    /// A version's file across starts: a first start over a store that applied records
    /// records them all (unknown history), a start under the same definition keeps the mark,
    /// a start under another moves it up to what the store applied meanwhile, and a rebuilt
    /// version has none.
    #[tokio::test]
    async fn the_mark_moves_only_when_the_definition_changes() {
        let (dir, config, store_config, store) = fixture();
        let earlier = |config: PipelineConfig| {
            let (store, store_config, dir) = (&store, store_config.clone(), dir.path());
            async move {
                earlier_definitions(&config, &store_config, dir, 0, store)
                    .await
                    .unwrap()
            }
        };
        let topic = "context.customers";

        // A new store: nothing applied, nothing earlier.
        record_at_start(&config, &store_config, dir.path(), 0, &store)
            .await
            .unwrap();
        assert_eq!(earlier(config.clone()).await, Handled::new());

        // Applied under the running definition, then a restart with it: still nothing earlier.
        store.apply(&[], &[(topic, 0, 10)]).unwrap();
        record_at_start(&config, &store_config, dir.path(), 0, &store)
            .await
            .unwrap();
        assert_eq!(earlier(config.clone()).await, Handled::new());

        // A restart with another mapping: the ten records were handled under the old one.
        let mut changed = config.clone();
        changed.limits.max_record_bytes /= 2;
        record_at_start(&changed, &store_config, dir.path(), 0, &store)
            .await
            .unwrap();
        assert_eq!(earlier(changed.clone()).await, offsets(&[(topic, 0, 10)]));
        // A rebuild while the old definition runs cannot trust the file: all applied counts.
        store.apply(&[], &[(topic, 0, 15), (topic, 1, 3)]).unwrap();
        assert_eq!(
            earlier(config.clone()).await,
            offsets(&[(topic, 0, 15), (topic, 1, 3)])
        );
        // Back to the first definition: what the changed one applied moves the mark.
        record_at_start(&config, &store_config, dir.path(), 0, &store)
            .await
            .unwrap();
        assert_eq!(
            earlier(config.clone()).await,
            offsets(&[(topic, 0, 15), (topic, 1, 3)])
        );

        // A rebuilt version starts clean; a discarded one leaves no file.
        record_rebuilt(&config, &store_config, dir.path(), 1).unwrap();
        let rebuilt = read(&path(dir.path(), &store_config.name, 1)).unwrap();
        assert!(rebuilt.earlier_definitions_below.is_empty());
        rebuild::discard_version(&store_config, dir.path(), 1)
            .await
            .unwrap();
        assert!(!path(dir.path(), &store_config.name, 1).exists());

        // An unreadable file reads as unknown history.
        std::fs::write(path(dir.path(), &store_config.name, 0), b"{").unwrap();
        assert_eq!(
            earlier(config.clone()).await,
            offsets(&[(topic, 0, 15), (topic, 1, 3)])
        );
    }

    /// A file that cannot be written does not stop the start, and leaves no earlier file
    /// behind to vouch for what this start applies.
    #[tokio::test]
    async fn a_definition_that_cannot_be_recorded_only_warns_and_forgets_the_old_one() {
        let (dir, config, store_config, store) = fixture();
        record_at_start(&config, &store_config, dir.path(), 0, &store)
            .await
            .unwrap();
        let file = path(dir.path(), &store_config.name, 0);
        assert!(file.exists());
        // The temporary file's name taken by a directory: the write fails.
        let mut tmp = file.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::create_dir(&tmp).unwrap();
        store.apply(&[], &[("context.customers", 0, 7)]).unwrap();
        let mut changed = config.clone();
        changed.limits.max_record_bytes /= 2;
        record_at_start(&changed, &store_config, dir.path(), 0, &store)
            .await
            .unwrap();
        assert!(!file.exists());
        std::fs::remove_dir(&tmp).unwrap();
        // Back to the first file: all it finds applied counts as earlier.
        let earlier = earlier_definitions(&config, &store_config, dir.path(), 0, &store)
            .await
            .unwrap();
        assert_eq!(earlier, offsets(&[("context.customers", 0, 7)]));
    }

    /// Files of versions other than the current one, and interrupted writes, are deleted.
    #[test]
    fn abandoned_definition_files_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let stores = dir.path().join("stores");
        std::fs::create_dir_all(&stores).unwrap();
        let names = [
            "main.v0.definition.json",
            "main.v2.definition.json",
            "main.v3.definition.json",
            "main.v3.definition.json.tmp",
            "main.v3.redb",
            "main-2.v1.definition.json",
            "main.v2.v0.definition.json",
        ];
        for name in names {
            std::fs::write(stores.join(name), b"x").unwrap();
        }
        discard_abandoned(dir.path(), "main", 3).unwrap();
        assert_eq!(
            rebuild::file_names(&stores),
            [
                "main-2.v1.definition.json",
                "main.v2.v0.definition.json",
                "main.v3.definition.json",
                "main.v3.redb",
            ]
        );
    }
}
