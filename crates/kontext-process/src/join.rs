//! The stream-table enrichment join: a table materialized from a (compacted) topic, and a
//! stream enriched with the table's current value for the event's key or a foreign key.
//!
//! Semantics (the model test checks this): the table is the last value per key of the table
//! records applied so far (a tombstone deletes the key); each stream event is joined with the
//! table as it stands when the event is processed. *Inner*: no match, no output. *Left*: the
//! event is emitted with no table value. Which table records come before a stream event is the
//! runtime's merge order: [`next_side`] (the lower timestamp first, the table on ties, as Kafka
//! Streams does), so a replay from the same offsets interleaves identically.
//!
//! A join by the record key needs the stream and table topics co-partitioned
//! ([`check_copartitioning`]). A join by a foreign key (an order's `customer_id`) first
//! re-keys the stream through the internal topic `<app>-<op>-repartition` ([`rekey`]).

use bytes::Bytes;
use kontext_core::partitioner::partition_for_key;
use kontext_core::record::{Header, ProduceRecord, Record};

use crate::event::{Coords, Event, FieldPath, Scalar};
use crate::progress::Progress;
use crate::store::{StateStore, StoreError, WriteBatch};

/// Inner or left join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JoinKind {
    /// Events without a table row are dropped.
    Inner,
    /// Events without a table row are emitted without enrichment.
    #[default]
    Left,
}

/// What the stream is joined on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinKey {
    /// The stream record's key (the topics must be co-partitioned).
    RecordKey,
    /// A field of the event's value (a foreign key); the stream must be re-keyed by it first.
    Field(FieldPath),
}

/// How a table record changes its key's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableMode {
    /// The record's value is the whole row (a compacted topic of full records).
    #[default]
    Replace,
    /// The record's value is a JSON object of changed fields, merged into the row (partial
    /// updates of an entity from several sources); a value that is not an object replaces it.
    Merge,
}

/// Configuration of an [`EnrichmentJoin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinConfig {
    pub kind: JoinKind,
    pub key: JoinKey,
    /// Name of the field the table value is put under in the enriched event.
    pub field: String,
    /// Whether table records are whole rows or partial updates.
    pub table: TableMode,
}

/// One input of [`EnrichmentJoin::process_ordered`]: a table record or a stream event.
#[derive(Debug, Clone, PartialEq)]
pub enum JoinInput {
    Table(TableUpdate),
    Stream(Event),
}

/// One record of the table topic: an upsert, or a delete when `value` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableUpdate {
    pub key: Bytes,
    pub value: Option<Bytes>,
    pub coords: Coords,
}

impl TableUpdate {
    /// A table record from the log (a record without a key cannot be a table row: `None`).
    pub fn from_record(record: &Record) -> Option<Self> {
        Some(Self {
            key: record.key.clone()?,
            value: record.value.clone(),
            coords: Coords::new(record.topic.clone(), record.partition, record.offset),
        })
    }
}

/// One enriched event.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinOutput {
    /// Index of the stream event in the input batch.
    pub index: usize,
    /// The table's value (raw bytes as produced to the table topic), `None` for an unmatched
    /// left join.
    pub right: Option<Bytes>,
    /// The stream event's coordinates: the output's version.
    pub version: Coords,
}

/// The result of a batch of stream events.
#[derive(Debug, Default)]
pub struct JoinBatch {
    pub outputs: Vec<JoinOutput>,
    /// The stream's input offsets (the join keeps no other state per stream event).
    pub state: WriteBatch,
    /// Inner join: events without a match. Left join: events emitted without enrichment.
    pub unmatched: u64,
    /// Foreign-key joins: events without the key field (dropped for inner, kept for left).
    pub missing_key: u64,
    pub already_applied: u64,
    /// [`EnrichmentJoin::process_ordered`]: table records applied.
    pub table_applied: u64,
}

/// The result of a batch of table records.
#[derive(Debug, Default)]
pub struct TableBatch {
    pub state: WriteBatch,
    pub applied: u64,
    pub already_applied: u64,
}

/// The enrichment join operator. The table lives in the store under `t key` → table-record
/// coordinates and value.
#[derive(Debug, Clone)]
pub struct EnrichmentJoin {
    config: JoinConfig,
}

impl EnrichmentJoin {
    /// An operator with this configuration.
    pub fn new(config: JoinConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &JoinConfig {
        &self.config
    }

    /// Whether the stream must be re-keyed through a repartition topic first.
    pub fn requires_repartition(&self) -> bool {
        matches!(self.config.key, JoinKey::Field(_))
    }

    /// Applies table records (in topic order). A record at or below the offset already held for
    /// its key is skipped, so a changelog restored ahead of the store's offsets is harmless.
    pub fn apply_table<S: StateStore + ?Sized>(
        &self,
        store: &S,
        updates: &[TableUpdate],
    ) -> Result<TableBatch, StoreError> {
        let mut out = TableBatch::default();
        let committed = store.offsets()?;
        for update in updates {
            let tp = kontext_core::record::TopicPartition::new(
                update.coords.topic.clone(),
                update.coords.partition,
            );
            if committed
                .get(&tp)
                .is_some_and(|next| update.coords.offset < *next)
            {
                out.already_applied += 1;
                continue;
            }
            out.state.set_offset(tp, update.coords.offset + 1);
            if self.apply_row(store, &mut out.state, update)? {
                out.applied += 1;
            } else {
                out.already_applied += 1;
            }
        }
        Ok(out)
    }

    /// Joins a batch of stream events with the table as it is in `store`.
    pub fn process<S: StateStore + ?Sized>(
        &self,
        store: &S,
        events: &[Event],
    ) -> Result<JoinBatch, StoreError> {
        let mut out = JoinBatch {
            outputs: Vec::with_capacity(events.len()),
            ..Default::default()
        };
        if events.is_empty() {
            return Ok(out);
        }
        let mut progress = Progress::load(store, &out.state)?;
        for (index, event) in events.iter().enumerate() {
            if progress.admit(event).is_none() {
                out.already_applied += 1;
                continue;
            }
            self.join_event(store, index, event, &mut out)?;
        }
        progress.finish(&mut out.state);
        Ok(out)
    }

    /// Table records and stream events in the one order the runtime merged them (for a
    /// foreign-key join, the order of the repartition topic both sides were re-keyed into):
    /// each event sees the table records before it, in this batch or committed. Inputs below
    /// the store's offsets are skipped, so a replay from the store's offsets gives the same
    /// outputs. Output indexes point into `inputs`.
    pub fn process_ordered<S: StateStore + ?Sized>(
        &self,
        store: &S,
        inputs: &[JoinInput],
    ) -> Result<JoinBatch, StoreError> {
        let mut out = JoinBatch::default();
        if inputs.is_empty() {
            return Ok(out);
        }
        let mut progress = Progress::load(store, &out.state)?;
        for (index, input) in inputs.iter().enumerate() {
            match input {
                JoinInput::Table(update) => {
                    if !progress.admit_offset(&update.coords) {
                        out.already_applied += 1;
                    } else if self.apply_row(store, &mut out.state, update)? {
                        out.table_applied += 1;
                    } else {
                        out.already_applied += 1;
                    }
                }
                JoinInput::Stream(event) => {
                    if progress.admit(event).is_none() {
                        out.already_applied += 1;
                        continue;
                    }
                    self.join_event(store, index, event, &mut out)?;
                }
            }
        }
        progress.finish(&mut out.state);
        Ok(out)
    }

    /// Writes one table record into `state`; `false` if its key's row is already at or past
    /// it.
    fn apply_row<S: StateStore + ?Sized>(
        &self,
        store: &S,
        state: &mut WriteBatch,
        update: &TableUpdate,
    ) -> Result<bool, StoreError> {
        let key = table_key(&update.key);
        let current = crate::store::get_through(store, state, &key)?;
        let mut previous = None;
        if let Some(current) = &current {
            let (partition, offset, value) = decode_row(current)?;
            if partition == update.coords.partition && offset >= update.coords.offset {
                return Ok(false);
            }
            previous = Some(value);
        }
        let Some(value) = &update.value else {
            state.delete_bytes(Bytes::from(key));
            return Ok(true);
        };
        let merged = match (self.config.table, previous) {
            (TableMode::Merge, Some(previous)) => merge_objects(previous, value),
            _ => None,
        };
        let value: &[u8] = merged.as_deref().unwrap_or(value);
        let mut row = Vec::with_capacity(value.len() + 12);
        row.extend_from_slice(&update.coords.partition.to_le_bytes());
        row.extend_from_slice(&update.coords.offset.to_le_bytes());
        row.extend_from_slice(value);
        state.put_bytes(Bytes::from(key), Bytes::from(row));
        Ok(true)
    }

    /// Looks up one stream event's table row (through the batch's pending table writes).
    fn join_event<S: StateStore + ?Sized>(
        &self,
        store: &S,
        index: usize,
        event: &Event,
        out: &mut JoinBatch,
    ) -> Result<(), StoreError> {
        let key = match &self.config.key {
            JoinKey::RecordKey => table_key(&event.key),
            JoinKey::Field(path) => match event.scalar(path) {
                Some(fk) => table_key(&scalar_key(&fk)),
                None => {
                    out.missing_key += 1;
                    if self.config.kind == JoinKind::Left {
                        out.outputs.push(JoinOutput {
                            index,
                            right: None,
                            version: event.coords.clone(),
                        });
                    }
                    return Ok(());
                }
            },
        };
        let right = match crate::store::get_through(store, &out.state, &key)? {
            Some(row) => {
                decode_row(&row)?;
                Some(row.slice(12..))
            }
            None => None,
        };
        if right.is_none() {
            out.unmatched += 1;
            if self.config.kind == JoinKind::Inner {
                return Ok(());
            }
        }
        out.outputs.push(JoinOutput {
            index,
            right,
            version: event.coords.clone(),
        });
        Ok(())
    }

    /// The enriched event: the stream event's value with the table value (parsed as JSON, or
    /// as a string if it is not JSON) under the configured field; `null` when unmatched.
    pub fn enrich(&self, event: &Event, output: &JoinOutput) -> serde_json::Value {
        let right = output.right.as_ref().map_or(serde_json::Value::Null, |b| {
            serde_json::from_slice(b).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
            })
        });
        let mut value = event.value.clone();
        match value.as_object_mut() {
            Some(object) => {
                object.insert(self.config.field.clone(), right);
                value
            }
            None => serde_json::json!({ "value": value, self.config.field.clone(): right }),
        }
    }
}

/// Which input the runtime processes next so that the join is reproducible: the head with the
/// lower timestamp, the table on ties (Kafka Streams' rule); `None` when both are empty. When
/// one side is empty the runtime may wait (Kafka Streams' `max.task.idle.ms`) before taking
/// the other.
pub fn next_side(stream_head_ms: Option<i64>, table_head_ms: Option<i64>) -> Option<Side> {
    match (stream_head_ms, table_head_ms) {
        (None, None) => None,
        (Some(_), None) => Some(Side::Stream),
        (None, Some(_)) => Some(Side::Table),
        (Some(s), Some(t)) if t <= s => Some(Side::Table),
        _ => Some(Side::Stream),
    }
}

/// A join input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Stream,
    Table,
}

/// How a topic's records are spread over its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitioner {
    /// Kafka's Java default: `toPositive(murmur2(key)) % partitions` (what kontext, Kafka
    /// Connect and Debezium use).
    Murmur2,
    /// Anything else (librdkafka's default `consistent_random` is crc32-based, for one).
    Other(String),
}

/// What the co-partitioning check needs to know about a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLayout {
    pub name: String,
    pub partitions: i32,
    pub partitioner: Partitioner,
}

/// Why two topics are not co-partitioned. Retry meaning: none; the topology must repartition
/// (or the topics be recreated) — this is a configuration error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoPartitionError {
    #[error("{stream} has {stream_partitions} partitions but {table} has {table_partitions}: a join by key needs equal counts (repartition the stream through an internal topic with {table_partitions} partitions)")]
    PartitionCounts {
        stream: String,
        stream_partitions: i32,
        table: String,
        table_partitions: i32,
    },
    #[error("{stream} and {table} are partitioned differently ({stream_partitioner:?} vs {table_partitioner:?}): equal keys may land in different partitions")]
    Partitioners {
        stream: String,
        stream_partitioner: Partitioner,
        table: String,
        table_partitioner: Partitioner,
    },
}

/// Checks that a join by record key can run per partition: equal partition counts and the
/// same partitioner, so a key's stream records and table row are in the same partition number.
pub fn check_copartitioning(
    stream: &TopicLayout,
    table: &TopicLayout,
) -> Result<(), CoPartitionError> {
    if stream.partitions != table.partitions {
        return Err(CoPartitionError::PartitionCounts {
            stream: stream.name.clone(),
            stream_partitions: stream.partitions,
            table: table.name.clone(),
            table_partitions: table.partitions,
        });
    }
    if stream.partitioner != table.partitioner {
        return Err(CoPartitionError::Partitioners {
            stream: stream.name.clone(),
            stream_partitioner: stream.partitioner.clone(),
            table: table.name.clone(),
            table_partitioner: table.partitioner.clone(),
        });
    }
    Ok(())
}

/// The internal topic a stream is re-keyed through: `<app>-<op>-repartition` (Kafka Streams'
/// naming). It must have the table's partition count; the runtime creates it.
pub fn repartition_topic_name(app: &str, op: &str) -> String {
    format!("{app}-{op}-repartition")
}

/// The changelog topic of a store: `<app>-<store>-changelog`, compacted.
pub fn changelog_topic_name(app: &str, store: &str) -> String {
    format!("{app}-{store}-changelog")
}

/// Header names that carry an event's original coordinates through a repartition topic, so
/// the join's outputs keep the original version (a re-delivered repartition record gets a new
/// offset, but the same version).
pub const ORIGIN_TOPIC_HEADER: &str = "kontext_origin_topic";
/// See [`ORIGIN_TOPIC_HEADER`].
pub const ORIGIN_PARTITION_HEADER: &str = "kontext_origin_partition";
/// See [`ORIGIN_TOPIC_HEADER`].
pub const ORIGIN_OFFSET_HEADER: &str = "kontext_origin_offset";

/// Why an event cannot be re-keyed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RekeyError {
    /// The event has no usable value at the foreign-key path. Retry meaning: none; route the
    /// event as the join's `missing_key` case (left: emit unenriched; inner: drop).
    #[error("event has no foreign key at {0}")]
    MissingKey(String),
}

/// Re-keys an event by the foreign key at `fk` for the repartition topic: key = the foreign
/// key, partition = Kafka's murmur2 of it over `partitions` (the table's count), value = the
/// event's JSON, headers = CloudEvents id and time plus the original coordinates.
pub fn rekey(
    event: &Event,
    fk: &FieldPath,
    topic: &str,
    partitions: i32,
) -> Result<ProduceRecord, RekeyError> {
    let key = event
        .scalar(fk)
        .map(|s| scalar_key(&s))
        .ok_or_else(|| RekeyError::MissingKey(fk.as_string()))?;
    Ok(rekey_as(event, Bytes::from(key), topic, partitions))
}

/// The repartition record of `event` under `key` (partition: Kafka's murmur2 of `key` over
/// `partitions`), with [`rekey`]'s value and headers. A left join sends an event without a
/// foreign key this way under its own key, so that it still reaches the join.
pub fn rekey_as(event: &Event, key: Bytes, topic: &str, partitions: i32) -> ProduceRecord {
    let partition = partition_for_key(&key, partitions.max(1));
    ProduceRecord {
        topic: topic.to_owned(),
        partition: Some(partition),
        key: Some(key),
        value: Some(Bytes::from(event.value.to_string())),
        headers: vec![
            Header::new("ce_id", event.id.clone()),
            Header::new("ce_time_ms", event.time_ms.to_string()),
            Header::new(ORIGIN_TOPIC_HEADER, event.coords.topic.to_string()),
            Header::new(ORIGIN_PARTITION_HEADER, event.coords.partition.to_string()),
            Header::new(ORIGIN_OFFSET_HEADER, event.coords.offset.to_string()),
        ],
        timestamp_ms: Some(event.time_ms),
    }
}

/// The original coordinates of a repartition record, if it carries them.
pub fn origin_coords(record: &Record) -> Option<Coords> {
    let text = |h| std::str::from_utf8(record.header(h)?).ok();
    Some(Coords::new(
        text(ORIGIN_TOPIC_HEADER)?,
        text(ORIGIN_PARTITION_HEADER)?.parse().ok()?,
        text(ORIGIN_OFFSET_HEADER)?.parse().ok()?,
    ))
}

/// A foreign key as bytes: text as is, integral numbers without a fraction (`42`, not `42.0`).
fn scalar_key(s: &Scalar) -> Vec<u8> {
    match s {
        Scalar::Text(t) => t.as_bytes().to_vec(),
        Scalar::Num(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
            (*n as i64).to_string().into_bytes()
        }
        Scalar::Num(n) => n.to_string().into_bytes(),
    }
}

/// `previous` with the fields of `update` set, when both are JSON objects.
fn merge_objects(previous: &[u8], update: &[u8]) -> Option<Vec<u8>> {
    use serde_json::{Map, Value};
    let mut row: Map<String, Value> = serde_json::from_slice(previous).ok()?;
    let changes: Map<String, Value> = serde_json::from_slice(update).ok()?;
    row.extend(changes);
    serde_json::to_vec(&row).ok()
}

fn table_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(b't');
    out.extend_from_slice(key);
    out
}

fn decode_row(row: &[u8]) -> Result<(i32, i64, &[u8]), StoreError> {
    if row.len() < 12 {
        return Err(StoreError::Corrupt("table row".into()));
    }
    let partition = i32::from_le_bytes(row[..4].try_into().unwrap_or_default());
    let offset = i64::from_le_bytes(row[4..12].try_into().unwrap_or_default());
    Ok((partition, offset, &row[12..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn layout(name: &str, partitions: i32) -> TopicLayout {
        TopicLayout {
            name: name.into(),
            partitions,
            partitioner: Partitioner::Murmur2,
        }
    }

    fn order(offset: i64, customer: &str) -> Event {
        Event {
            key: Bytes::from(format!("O-{offset}")),
            id: Bytes::from(format!("o{offset}")),
            time_ms: offset,
            coords: Coords::new("context.orders", 0, offset),
            value: serde_json::json!({ "customer_id": customer, "total": 10 }),
        }
    }

    #[test]
    fn copartitioning_needs_equal_counts_and_partitioners() {
        assert!(check_copartitioning(&layout("a", 12), &layout("b", 12)).is_ok());
        assert!(matches!(
            check_copartitioning(&layout("a", 12), &layout("b", 6)),
            Err(CoPartitionError::PartitionCounts { .. })
        ));
        let mut other = layout("b", 12);
        other.partitioner = Partitioner::Other("consistent_random".into());
        assert!(matches!(
            check_copartitioning(&layout("a", 12), &other),
            Err(CoPartitionError::Partitioners { .. })
        ));
    }

    #[test]
    fn rekey_puts_the_event_where_the_table_row_of_its_foreign_key_is() {
        let event = order(7, "C-10042");
        let topic = repartition_topic_name("kontext", "orders-by-customer");
        assert_eq!(topic, "kontext-orders-by-customer-repartition");
        let record = rekey(&event, &FieldPath::new("customer_id"), &topic, 12).unwrap();
        assert_eq!(record.key.as_deref(), Some(&b"C-10042"[..]));
        assert_eq!(record.partition, Some(partition_for_key(b"C-10042", 12)));
        let delivered = Record {
            topic: topic.as_str().into(),
            partition: 3,
            offset: 99,
            timestamp_ms: 7,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers.clone(),
        };
        assert_eq!(origin_coords(&delivered), Some(event.coords.clone()));
        assert!(rekey(&event, &FieldPath::new("nope"), &topic, 12).is_err());
    }

    #[test]
    fn foreign_key_join_enriches_left_and_inner() {
        let mut store = MemoryStore::new("customers");
        for kind in [JoinKind::Left, JoinKind::Inner] {
            let join = EnrichmentJoin::new(JoinConfig {
                kind,
                key: JoinKey::Field(FieldPath::new("customer_id")),
                field: "customer".into(),
                table: TableMode::Replace,
            });
            let table = join
                .apply_table(
                    &store,
                    &[TableUpdate {
                        key: Bytes::from_static(b"C-1"),
                        value: Some(Bytes::from_static(br#"{"tier":"gold"}"#)),
                        coords: Coords::new("context.customers", 0, 0),
                    }],
                )
                .unwrap();
            store.commit(table.state).unwrap();
            let events = [order(0, "C-1"), order(1, "C-2")];
            let batch = join.process(&MemoryStore::clone(&store), &events).unwrap();
            let expected = if kind == JoinKind::Left { 2 } else { 1 };
            assert_eq!(batch.outputs.len(), expected);
            assert_eq!(
                join.enrich(&events[0], &batch.outputs[0])["customer"]["tier"],
                "gold"
            );
            assert_eq!(batch.unmatched, 1);
        }
    }

    #[test]
    fn the_table_side_goes_first_on_equal_timestamps() {
        assert_eq!(next_side(Some(5), Some(5)), Some(Side::Table));
        assert_eq!(next_side(Some(4), Some(5)), Some(Side::Stream));
        assert_eq!(next_side(None, None), None);
    }
}
