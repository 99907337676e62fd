//! Ticks: how a quiet repartition partition learns that stream time moved on.
//!
//! A task's stream time is the newest event time among its own inputs, so a repartition
//! partition that receives nothing keeps its sliding features as they were ("interactions in
//! the last hour" still counting last night's clicks) and never closes its windows. The re-key
//! loop sees the events of every partition: every [`TICK_INTERVAL`] it writes a tick, the
//! newest event time it has routed for a feature group, to each partition that got no input of
//! that group since the last check and whose own newest time is behind. A tick is a record of
//! the repartition topic, so a replay sees the same ticks at the same offsets and computes the
//! same values; the tasks of feature groups take it as [`kontext_process::Event::tick`]
//! (docs/processing.md, "Ticks").

use std::time::{Duration, Instant};

use bytes::Bytes;
use kontext_core::record::{ProduceRecord, Record};
use serde_json::{json, Value};

/// How often the re-key loop ticks the partitions that fell behind.
pub(crate) const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// How far ahead of this machine's clock an event time may be and still move other
/// partitions' stream time: one event dated years ahead by a broken source clock must not
/// age every value of its group and make every later event late. (It still moves its own
/// partition's, as it did before ticks.)
pub(crate) const TICK_FUTURE_ALLOWANCE: Duration = Duration::from_secs(300);

/// The re-key loop's record of the newest event time it routed per feature group, overall
/// and per partition. Per group: a group's stream time follows its own input (orders), not
/// another group's (clicks, whose source's clock may run ahead).
pub(crate) struct Ticker {
    /// Per group, per repartition partition: the newest event time written to it (event or
    /// tick), and whether an event of the group went to it since the last check.
    written: Vec<Vec<(i64, bool)>>,
    /// Per group: the newest event time routed to any partition.
    newest: Vec<i64>,
    last: Instant,
}

impl Ticker {
    pub(crate) fn new(groups: usize, partitions: i32, now: Instant) -> Self {
        let partitions = usize::try_from(partitions).unwrap_or(0);
        Self {
            written: vec![vec![(i64::MIN, false); partitions]; groups],
            newest: vec![i64::MIN; groups],
            last: now,
        }
    }

    /// An input of feature group `group` with event time `time_ms` was written to
    /// `partition`; `now_ms` is the wall clock, which limits how far ahead of it the time
    /// may move the others ([`TICK_FUTURE_ALLOWANCE`]).
    pub(crate) fn routed(&mut self, group: usize, partition: i32, time_ms: i64, now_ms: i64) {
        let Some(written) = self.written.get_mut(group) else {
            return;
        };
        if let Some((w, fed)) = usize::try_from(partition)
            .ok()
            .and_then(|p| written.get_mut(p))
        {
            *w = (*w).max(time_ms);
            *fed = true;
        }
        let limit = now_ms.saturating_add(TICK_FUTURE_ALLOWANCE.as_millis() as i64);
        if time_ms <= limit {
            self.newest[group] = self.newest[group].max(time_ms);
        }
    }

    /// At most every [`TICK_INTERVAL`]: a tick `(group, partition, time)` for each partition
    /// that got no input of the group since the last check and whose newest time is behind
    /// the group's newest, which it then counts as written. A partition that keeps getting
    /// inputs moves its stream time itself and gets no ticks.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(usize, i32, i64)> {
        if now.duration_since(self.last) < TICK_INTERVAL {
            return Vec::new();
        }
        self.last = now;
        let mut ticks = Vec::new();
        for (group, (written, &newest)) in self.written.iter_mut().zip(&self.newest).enumerate() {
            for (p, (w, fed)) in written.iter_mut().enumerate() {
                if !std::mem::take(fed) && *w < newest {
                    *w = newest;
                    ticks.push((group, p as i32, newest));
                }
            }
        }
        ticks
    }
}

/// The repartition record of a tick of feature group `group`: no key, the time in the value.
pub(crate) fn tick_record(topic: &str, partition: i32, group: &str, time_ms: i64) -> ProduceRecord {
    let mut record = ProduceRecord::new(
        topic.to_owned(),
        None,
        Some(Bytes::from(
            json!({ "tick": time_ms, "g": group }).to_string(),
        )),
    );
    record.partition = Some(partition);
    record
}

/// The feature group and time of a tick record, or `None` for any other record.
pub(crate) fn tick_of(record: &Record) -> Option<(String, i64)> {
    if record.key.is_some() {
        return None;
    }
    let value: Value = serde_json::from_slice(record.value.as_deref()?).ok()?;
    Some((
        value.get("g")?.as_str()?.to_owned(),
        value.get("tick")?.as_i64()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_quiet_partitions_behind_their_groups_newest_time_are_ticked_every_interval() {
        let start = Instant::now();
        let now_ms = 1_000_000;
        let mut ticker = Ticker::new(2, 3, start);
        // Nothing routed yet: nothing to tell.
        assert!(ticker.due(start + TICK_INTERVAL).is_empty());
        ticker.routed(0, 0, 5_000, now_ms);
        ticker.routed(0, 1, 9_000, now_ms);
        ticker.routed(1, 2, 20_000, now_ms);
        // Not yet an interval since the last check.
        assert!(ticker.due(start + TICK_INTERVAL).is_empty());
        let later = start + 2 * TICK_INTERVAL;
        // Group 0's quiet partition 2 learns 9 000, not group 1's 20 000; partition 0 got an
        // input of group 0 in this interval, so it moves itself.
        assert_eq!(
            ticker.due(later),
            vec![(0, 2, 9_000), (1, 0, 20_000), (1, 1, 20_000)]
        );
        // Partition 0 went quiet: now it is ticked.
        assert_eq!(ticker.due(later + TICK_INTERVAL), vec![(0, 0, 9_000)]);
        // Told: nothing again until time moves on.
        assert!(ticker.due(later + 2 * TICK_INTERVAL).is_empty());
        ticker.routed(0, 2, 12_000, now_ms);
        ticker.routed(0, 1, 10_000, now_ms);
        assert_eq!(ticker.due(later + 4 * TICK_INTERVAL), vec![(0, 0, 12_000)]);
        assert_eq!(ticker.due(later + 5 * TICK_INTERVAL), vec![(0, 1, 12_000)]);
    }

    /// An event dated far ahead of the clock moves only its own partition.
    #[test]
    fn an_event_from_the_far_future_ticks_no_other_partition() {
        let start = Instant::now();
        let now_ms = 1_000_000;
        let mut ticker = Ticker::new(1, 2, start);
        ticker.routed(0, 0, 900_000, now_ms);
        ticker.routed(0, 1, 800_000, now_ms);
        let ahead = now_ms + TICK_FUTURE_ALLOWANCE.as_millis() as i64;
        ticker.routed(0, 0, ahead + 1, now_ms);
        ticker.routed(0, 0, ahead, now_ms + 1);
        assert_eq!(ticker.due(start + TICK_INTERVAL), Vec::new());
        assert_eq!(ticker.due(start + 2 * TICK_INTERVAL), vec![(0, 1, ahead)]);
    }

    #[test]
    fn a_tick_record_reads_back_and_no_other_record_is_a_tick() {
        let produced = tick_record("p-features-repartition", 2, "clicks_1h", 1_234);
        assert_eq!(produced.partition, Some(2));
        let as_read = |key: Option<Bytes>, value: Option<Bytes>| Record {
            topic: "p-features-repartition".into(),
            partition: 2,
            offset: 7,
            key,
            value,
            timestamp_ms: 0,
            headers: Vec::new(),
        };
        assert_eq!(
            tick_of(&as_read(None, produced.value.clone())),
            Some(("clicks_1h".to_owned(), 1_234))
        );
        // A feature input has a key; a keyed record is never a tick, whatever its value.
        assert_eq!(
            tick_of(&as_read(Some(Bytes::from_static(b"C-1")), produced.value)),
            None
        );
        assert_eq!(
            tick_of(&as_read(None, Some(Bytes::from_static(b"{\"g\":\"x\"}")))),
            None
        );
        assert_eq!(tick_of(&as_read(None, None)), None);
    }
}
