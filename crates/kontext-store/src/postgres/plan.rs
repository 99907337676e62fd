//! What one batch does to the store, decided in memory before any write: the skip rule and the
//! collapse of several updates to one row per entity and per field.
//!
//! A pure function with its own tests, so that the SQL only executes decisions made here.
//! It reproduces the embedded store's record-by-record semantics (`EmbeddedStore::apply`)
//! exactly, in a form that needs one statement per table:
//! - an update whose offset is below the partition's next offset is skipped; an applied update
//!   moves the next offset to its offset + 1 (so a lower offset later in the batch is skipped);
//! - per field, the update with the greatest [`Version`](crate::Version) wins, as in
//!   `merge_fields`; `ON CONFLICT ... WHERE` keeps the greater of it and the stored one;
//! - per entity, the tombstone with the greatest version is kept with the entity; what is not
//!   newer than it goes (the SQL removes the stored fields it covers and refuses the batch's),
//!   in whatever order upserts and tombstones arrive, as `Pending::apply` does;
//! - `events_applied` counts every applied record of the entity, tombstones included.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::embedded::ApplyStats;
use crate::model::{Change, EntityUpdate, Provenance};

/// The effect of one batch, one entry per touched entity, in (type, id) order.
#[derive(Debug, Default)]
pub(crate) struct BatchPlan<'a> {
    /// Counts known without the store (`deleted` still lacks the entities that only a stored
    /// row can tell, which the write adds).
    pub stats: ApplyStats,
    pub entities: BTreeMap<(&'a str, &'a str), EntityPlan<'a>>,
    /// The new next offset of every (topic, partition) the batch covered.
    pub offsets: BTreeMap<(&'a str, i32), i64>,
}

/// What the batch does to one entity.
#[derive(Debug, Default)]
pub(crate) struct EntityPlan<'a> {
    /// Records applied, upserts and tombstones (added to `events_applied`).
    pub events: u64,
    /// The greatest version among the upserts.
    pub latest: Option<&'a Provenance>,
    /// The greatest version among the tombstones.
    pub tomb: Option<&'a Provenance>,
    /// Per field, the value of the greatest version among the upserts that set it (a stored
    /// tombstone or `tomb` may still keep it out).
    pub fields: BTreeMap<&'a str, (&'a Value, &'a Provenance)>,
}

/// The (topic, partition) pairs whose stored next offset the plan needs, sorted: the rows to
/// lock, in an order every writer shares (no deadlocks between concurrent writers).
pub(crate) fn partitions<'a>(
    updates: &'a [EntityUpdate],
    offsets: &'a [(String, i32, i64)],
) -> BTreeSet<(&'a str, i32)> {
    updates
        .iter()
        .map(|u| (u.provenance.topic.as_str(), u.provenance.partition))
        .chain(offsets.iter().map(|(t, p, _)| (t.as_str(), *p)))
        .collect()
}

/// Plans a batch against the stored next offsets (absent = 0).
pub(crate) fn plan<'a>(
    updates: &'a [EntityUpdate],
    offsets: &'a [(String, i32, i64)],
    stored: &BTreeMap<(String, i32), i64>,
) -> BatchPlan<'a> {
    let mut out = BatchPlan::default();
    let mut next: BTreeMap<(&'a str, i32), i64> = BTreeMap::new();
    for update in updates {
        let p = &update.provenance;
        let key = (p.topic.as_str(), p.partition);
        let upto = next.entry(key).or_insert_with(|| {
            stored
                .get(&(p.topic.clone(), p.partition))
                .copied()
                .unwrap_or(0)
        });
        if p.offset < *upto {
            out.stats.skipped += 1;
            continue;
        }
        *upto = p.offset + 1;
        out.stats.applied += 1;
        let entity = out
            .entities
            .entry((update.entity_type.as_str(), update.entity_id.as_str()))
            .or_default();
        entity.events += 1;
        match &update.change {
            Change::Upsert(fields) => {
                if entity.latest.is_none_or(|l| p.version() > l.version()) {
                    entity.latest = Some(p);
                }
                for (name, value) in fields {
                    let newer = entity
                        .fields
                        .get(name)
                        .is_none_or(|(_, old)| p.version() > old.version());
                    if newer {
                        entity.fields.insert(name, (value, p));
                    }
                }
            }
            Change::Delete => {
                out.stats.deleted += 1;
                if entity.tomb.is_none_or(|t| p.version() > t.version()) {
                    entity.tomb = Some(p);
                }
            }
        }
    }
    // Offsets also cover records that produced no update (invalid or filtered); a partition
    // whose stored offset is already higher keeps it (the write's `WHERE u.n > next_offset`).
    for (topic, partition, n) in offsets {
        let e = next.entry((topic.as_str(), *partition)).or_insert(0);
        *e = (*e).max(*n);
    }
    out.offsets = next;
    out
}
