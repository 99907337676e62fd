//! A store whose current version can be replaced while it serves: the blue/green switch of a
//! rebuild.
//!
//! Readers and the live sink go through [`SwitchableStore`]. A rebuild fills a new version
//! from the log on the side; [`SwitchableStore::switch_if_caught_up`] replaces the current
//! version with it in one step, and only when the new version holds every record the current
//! one holds. The check and the swap happen under the lock every `apply` takes, so no batch
//! lands in the old version between them: the live sink's next batch starts at offsets the
//! new version has reached, its already-applied prefix is skipped by offset, and nothing
//! falls into a gap.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::{
    ApplyStats, CacheStats, ContextDocument, ContextStore, EntityDoc, EntityUpdate, StoreError,
    StoreSchema, WriteMarks,
};
use async_trait::async_trait;

/// A [`ContextStore`] that delegates to a current version which can be switched.
pub struct SwitchableStore {
    current: RwLock<Arc<dyn ContextStore>>,
    /// Every version is opened with the pipeline's schema: the first one's, kept here.
    schema: StoreSchema,
    /// Held by every `apply`, `flush` and switch, so a switch never races a write.
    writes: tokio::sync::Mutex<()>,
    /// The marks of the writes made through this handle, which outlive a switch (the
    /// versions' own counters differ); changed only under `writes`.
    marks: parking_lot::Mutex<WriteMarks>,
}

/// Whether a candidate version replaced the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchOutcome {
    /// The candidate is current now.
    Switched,
    /// The candidate is behind on these partitions: (topic, partition) → (candidate's next
    /// offset, current's next offset).
    Behind(BTreeMap<(String, i32), (i64, i64)>),
}

impl SwitchableStore {
    /// Serves `initial` until a switch.
    pub fn new(initial: Arc<dyn ContextStore>) -> Self {
        Self {
            schema: initial.schema().clone(),
            current: RwLock::new(initial),
            writes: tokio::sync::Mutex::new(()),
            marks: parking_lot::Mutex::new(WriteMarks::default()),
        }
    }

    /// The version serving now.
    pub fn current(&self) -> Arc<dyn ContextStore> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `candidate` current if it has applied at least everything the current version
    /// has, on every partition of `topics` (the topics the candidate is fed from); returns the
    /// replaced version on success. Offsets the current version holds of other topics (a
    /// source since removed from the pipeline) are not compared: nothing feeds them to the
    /// candidate, and nothing reads them after the switch either.
    pub async fn switch_if_caught_up(
        &self,
        candidate: &Arc<dyn ContextStore>,
        topics: &[String],
    ) -> Result<(SwitchOutcome, Option<Arc<dyn ContextStore>>), StoreError> {
        let _writes = self.writes.lock().await;
        let current = self.current();
        let ours = current.applied_offsets().await?;
        let theirs = candidate.applied_offsets().await?;
        let behind: BTreeMap<(String, i32), (i64, i64)> = ours
            .iter()
            .filter(|((topic, _), _)| topics.contains(topic))
            .filter_map(|(tp, &next)| {
                let got = theirs.get(tp).copied().unwrap_or(0);
                (got < next).then(|| (tp.clone(), (got, next)))
            })
            .collect();
        if !behind.is_empty() {
            return Ok((SwitchOutcome::Behind(behind), None));
        }
        // What the current version holds is durable by the time anyone reads it from the
        // candidate: a crash after the switch must not reopen a version missing it.
        candidate.flush().await?;
        let mut marks = self.marks.lock();
        marks.durable = marks.applied;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = candidate.clone();
        Ok((SwitchOutcome::Switched, Some(current)))
    }
}

#[async_trait]
impl ContextStore for SwitchableStore {
    fn kind(&self) -> &'static str {
        self.current().kind()
    }

    fn schema(&self) -> &StoreSchema {
        &self.schema
    }

    async fn apply(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(String, i32, i64)],
    ) -> Result<ApplyStats, StoreError> {
        let _writes = self.writes.lock().await;
        let current = self.current();
        let stats = current.apply(updates, offsets).await?;
        let mut marks = self.marks.lock();
        marks.applied += 1;
        let theirs = current.write_marks();
        if theirs.durable == theirs.applied {
            marks.durable = marks.applied;
        }
        Ok(stats)
    }

    async fn get(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<EntityDoc>, StoreError> {
        self.current().get(entity_type, entity_id).await
    }

    async fn context(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Arc<ContextDocument>>, StoreError> {
        self.current().context(entity_type, entity_id).await
    }

    async fn list(
        &self,
        entity_type: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        self.current().list(entity_type, limit, after).await
    }

    async fn applied_offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        self.current().applied_offsets().await
    }

    async fn dump(&self) -> Result<Vec<EntityDoc>, StoreError> {
        self.current().dump().await
    }

    fn cache_stats(&self) -> Option<CacheStats> {
        self.current().cache_stats()
    }

    fn sync_interval(&self) -> Duration {
        self.current().sync_interval()
    }

    /// The marks of the writes made through this handle, across switches: a candidate is
    /// flushed before it becomes current, so everything the replaced version held is durable
    /// then.
    fn write_marks(&self) -> WriteMarks {
        *self.marks.lock()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let _writes = self.writes.lock().await;
        self.current().flush().await?;
        let mut marks = self.marks.lock();
        marks.durable = marks.applied;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{Change, Provenance};
    use crate::EmbeddedStore;

    fn update(id: &str, offset: i64) -> EntityUpdate {
        EntityUpdate {
            entity_type: "customer".into(),
            entity_id: id.into(),
            change: Change::Upsert(json!({"n": offset}).as_object().cloned().unwrap().into()),
            provenance: Provenance {
                source: "crm".into(),
                event_id: format!("e{offset}"),
                event_type: None,
                topic: "t".into(),
                partition: 0,
                offset,
                event_time_ms: 1_000 + offset,
            },
        }
    }

    /// Applies records `from..to` of partition t/0 (customer `C<offset % 3>`).
    async fn feed(store: &dyn ContextStore, from: i64, to: i64) -> ApplyStats {
        let updates: Vec<EntityUpdate> = (from..to)
            .map(|o| update(&format!("C{}", o % 3), o))
            .collect();
        store.apply(&updates, &[("t".into(), 0, to)]).await.unwrap()
    }

    /// The topics the tests' versions are fed from.
    fn topics() -> Vec<String> {
        vec!["t".to_string()]
    }

    fn open(dir: &tempfile::TempDir, name: &str) -> Arc<dyn ContextStore> {
        let schema = StoreSchema::default();
        Arc::new(EmbeddedStore::open(&dir.path().join(name), schema).unwrap())
    }

    #[tokio::test]
    async fn a_version_behind_is_not_switched_to_and_a_caught_up_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let blue = open(&dir, "blue.redb");
        let green = open(&dir, "green.redb");
        let store = SwitchableStore::new(blue.clone());
        feed(&store, 0, 10).await;
        feed(green.as_ref(), 0, 6).await;

        let (outcome, old) = store.switch_if_caught_up(&green, &topics()).await.unwrap();
        let behind = BTreeMap::from([(("t".to_string(), 0), (6, 10))]);
        assert_eq!(outcome, SwitchOutcome::Behind(behind));
        assert!(old.is_none());
        assert_eq!(
            store
                .get("customer", "C0")
                .await
                .unwrap()
                .unwrap()
                .events_applied,
            4
        );

        // The rebuild overtakes the live version: the switch happens, and the live sink's
        // next batch (10..15) lands in the new version without a gap or a double count.
        feed(green.as_ref(), 6, 12).await;
        let (outcome, old) = store.switch_if_caught_up(&green, &topics()).await.unwrap();
        assert_eq!(outcome, SwitchOutcome::Switched);
        assert!(Arc::ptr_eq(&old.unwrap(), &blue));
        let stats = feed(&store, 10, 15).await;
        assert_eq!((stats.applied, stats.skipped), (3, 2));
        assert_eq!(store.dump().await.unwrap(), green.dump().await.unwrap());
        let applied: u64 = store
            .dump()
            .await
            .unwrap()
            .iter()
            .map(|d| d.events_applied)
            .sum();
        assert_eq!(applied, 15, "every record 0..15 counted once");
        // The old version saw nothing after the switch.
        assert_eq!(blue.applied_offsets().await.unwrap()[&("t".into(), 0)], 10);
    }

    /// Offsets of a topic nothing feeds the candidate any more (a source removed from the
    /// pipeline, a common reason to rebuild) do not hold the switch back forever.
    #[tokio::test]
    async fn offsets_of_a_topic_no_longer_read_do_not_hold_the_switch_back() {
        let dir = tempfile::tempdir().unwrap();
        let blue = open(&dir, "blue.redb");
        let green = open(&dir, "green.redb");
        let store = SwitchableStore::new(blue);
        feed(&store, 0, 10).await;
        store
            .apply(&[], &[("removed".to_string(), 0, 42)])
            .await
            .unwrap();
        feed(green.as_ref(), 0, 10).await;
        let (outcome, _) = store
            .switch_if_caught_up(&green, &["t".into(), "removed".into()])
            .await
            .unwrap();
        let behind = BTreeMap::from([(("removed".to_string(), 0), (0, 42))]);
        assert_eq!(outcome, SwitchOutcome::Behind(behind), "compared when read");
        let (outcome, _) = store.switch_if_caught_up(&green, &topics()).await.unwrap();
        assert_eq!(outcome, SwitchOutcome::Switched);
    }

    /// The marks of writes through the handle survive a switch: the candidate is flushed as
    /// it becomes current, so what the replaced version held unsynced counts as durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_marks_carry_across_a_switch() {
        let dir = tempfile::tempdir().unwrap();
        let lazy = |name: &str| -> Arc<dyn ContextStore> {
            Arc::new(
                EmbeddedStore::open(&dir.path().join(name), StoreSchema::default())
                    .unwrap()
                    .with_sync_interval(std::time::Duration::from_secs(3600)),
            )
        };
        let (blue, green) = (lazy("blue.redb"), lazy("green.redb"));
        let store = SwitchableStore::new(blue);
        for from in 0..3 {
            feed(&store, from * 5, from * 5 + 5).await;
        }
        let unsynced = WriteMarks {
            applied: 3,
            durable: 0,
        };
        assert_eq!(store.write_marks(), unsynced);
        // The rebuild wrote one big unsynced batch; its own counter is 1, not 3.
        feed(green.as_ref(), 0, 15).await;
        assert_eq!(green.write_marks().durable, 0);
        let (outcome, _) = store.switch_if_caught_up(&green, &topics()).await.unwrap();
        assert_eq!(outcome, SwitchOutcome::Switched);
        assert_eq!(
            green.write_marks(),
            WriteMarks {
                applied: 1,
                durable: 1
            }
        );
        assert_eq!(
            store.write_marks(),
            WriteMarks {
                applied: 3,
                durable: 3
            }
        );
        feed(&store, 15, 20).await;
        assert_eq!(
            store.write_marks(),
            WriteMarks {
                applied: 4,
                durable: 3
            }
        );
        store.flush().await.unwrap();
        assert_eq!(
            store.write_marks(),
            WriteMarks {
                applied: 4,
                durable: 4
            }
        );
    }
}
