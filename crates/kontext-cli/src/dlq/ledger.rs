//! The replay ledger: a one-partition topic beside each dead-letter topic that records, per dead
//! letter, the intent to replay it and where its copy landed. See `docs/dead-letters.md`.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use bytes::Bytes;
use kontext_core::envelope::{format_time, now_ms};
use kontext_core::record::ProduceRecord;
use kontext_log::TopicSpec;
use serde::{Deserialize, Serialize};

use super::{Ctx, LEDGER_SUFFIX, REPLAY_OF};

/// The ledger topic of a dead-letter topic.
pub(super) fn ledger_topic(dlq: &str) -> String {
    format!("{dlq}{LEDGER_SUFFIX}")
}

/// The ledger topic of a dead-letter topic as it is created: one partition, so the ledger
/// reads back in the order it was written.
pub(crate) fn ledger_spec(dlq: &str) -> TopicSpec {
    TopicSpec::new(ledger_topic(dlq), 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum EntryState {
    Intent,
    Done,
}

/// One ledger record (JSON value; the key is `of`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LedgerEntry {
    pub(super) state: EntryState,
    /// The dead letter: `topic/partition/offset`.
    pub(super) of: String,
    /// The target topic and partition.
    pub(super) topic: String,
    pub(super) partition: i32,
    /// `intent`: the target partition's high watermark before the produce; a copy, if it
    /// landed, is at or after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) scan_from: Option<i64>,
    /// `done`: where the copy landed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) offset: Option<i64>,
    pub(super) time: String,
    pub(super) pipeline: String,
}

/// The ledger's last word on one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Known {
    Done {
        topic: String,
        partition: i32,
        offset: Option<i64>,
        time: String,
    },
    Pending {
        topic: String,
        partition: i32,
        scan_from: i64,
    },
}

/// The replay ledger of one dead-letter topic, read whole.
pub(super) struct Ledger {
    pub(super) topic: String,
    pub(super) entries: HashMap<String, Known>,
}

impl Ledger {
    pub(super) async fn read(ctx: &Ctx, dlq: &str) -> Result<Self> {
        let topic = ledger_topic(dlq);
        let mut ledger = Ledger {
            topic: topic.clone(),
            entries: HashMap::new(),
        };
        let mut reader = ctx.read_all(&topic).await?;
        while let Some(batch) = reader.next_batch().await? {
            for record in batch {
                let Some(entry) = record
                    .value
                    .as_ref()
                    .and_then(|v| serde_json::from_slice::<LedgerEntry>(v).ok())
                else {
                    tracing::warn!(at = %record.coordinates(), "ignoring an unreadable ledger entry");
                    continue;
                };
                ledger.apply(entry);
            }
        }
        Ok(ledger)
    }

    /// Entries are read in order; the last one for a dead letter wins.
    pub(super) fn apply(&mut self, e: LedgerEntry) {
        let known = match e.state {
            EntryState::Done => Known::Done {
                topic: e.topic,
                partition: e.partition,
                offset: e.offset,
                time: e.time,
            },
            EntryState::Intent => Known::Pending {
                topic: e.topic,
                partition: e.partition,
                scan_from: e.scan_from.unwrap_or(0),
            },
        };
        self.entries.insert(e.of, known);
    }

    pub(super) fn is_done(&self, coord: &str) -> bool {
        matches!(self.entries.get(coord), Some(Known::Done { .. }))
    }

    /// Settles every intent without a `done`: scans the target partitions from the recorded
    /// high watermarks for copies carrying `kontext.replay.of`; those found become `done` (in
    /// the ledger too, if `write`). Returns the dead letters found.
    pub(super) async fn recover(&mut self, ctx: &Ctx, write: bool) -> Result<HashSet<String>> {
        // target topic -> partition -> (scan from, dead letters waiting there)
        let mut scans: BTreeMap<String, BTreeMap<i32, (i64, HashSet<String>)>> = BTreeMap::new();
        for (coord, known) in &self.entries {
            if let Known::Pending {
                topic,
                partition,
                scan_from,
            } = known
            {
                let slot = scans
                    .entry(topic.clone())
                    .or_default()
                    .entry(*partition)
                    .or_insert((*scan_from, HashSet::new()));
                slot.0 = slot.0.min(*scan_from);
                slot.1.insert(coord.clone());
            }
        }
        let mut found: HashMap<String, (String, i32, i64)> = HashMap::new();
        for (topic, partitions) in &scans {
            let starts = partitions
                .iter()
                .map(|(p, (from, _))| (*p, *from))
                .collect();
            let mut reader = ctx.reader(topic, &starts).await?;
            while let Some(batch) = reader.next_batch().await? {
                for record in batch {
                    let Some(of) = record.header(REPLAY_OF) else {
                        continue;
                    };
                    let of = String::from_utf8_lossy(of).into_owned();
                    let waiting = partitions
                        .get(&record.partition)
                        .is_some_and(|(_, w)| w.contains(&of));
                    if waiting {
                        found
                            .entry(of)
                            .or_insert((topic.clone(), record.partition, record.offset));
                    }
                }
            }
        }
        if found.is_empty() {
            return Ok(HashSet::new());
        }
        let time = format_time(now_ms());
        if write {
            let entries: Vec<ProduceRecord> = found
                .iter()
                .map(|(of, (topic, partition, offset))| {
                    let e = LedgerEntry {
                        state: EntryState::Done,
                        of: of.clone(),
                        topic: topic.clone(),
                        partition: *partition,
                        scan_from: None,
                        offset: Some(*offset),
                        time: time.clone(),
                        pipeline: ctx.config.name.clone(),
                    };
                    ProduceRecord {
                        topic: self.topic.clone(),
                        partition: Some(0),
                        key: Some(Bytes::from(of.clone())),
                        value: Some(Bytes::from(serde_json::to_vec(&e).unwrap_or_default())),
                        headers: Vec::new(),
                        timestamp_ms: None,
                    }
                })
                .collect();
            let producer = ctx.log.producer().await.context("creating a producer")?;
            producer
                .send(entries)
                .await
                .context("recording recovered replays in the ledger")?;
        }
        for (of, (topic, partition, offset)) in &found {
            self.entries.insert(
                of.clone(),
                Known::Done {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: Some(*offset),
                    time: time.clone(),
                },
            );
        }
        Ok(found.into_keys().collect())
    }
}
