//! The PostgreSQL context store: the same contract and results as the embedded store, in
//! tables a production database can host (see docs/store-postgres.md).
//!
//! Every [`ContextStore::apply`] is one transaction: lock and read the next offsets of the
//! batch's partitions (one statement), plan the batch in memory ([`super::plan`]), then one
//! set-based statement per table and step (entities with their tombstones, fields, the fields
//! tombstones remove, relations, offsets), each fed by `unnest` of arrays. No statement runs
//! per record, and no row is read before it is written except the offsets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, Row};

use super::connect::{self, Connect};
use super::plan::{self, BatchPlan};
use crate::document::{ContextDocument, RelatedEntity, RelatedList};
use crate::embedded::ApplyStats;
use crate::model::{
    parent_id_of, EntityDoc, EntityUpdate, FieldEntry, OwnedVersion, Provenance, StoreSchema,
};
use crate::{ContextStore, StoreError};

const SCHEMA_SQL: &str = include_str!("schema.sql");
/// Connections the store opens at most for lookups (the API's requests).
const READ_POOL_SIZE: usize = 8;
/// Connections the store opens at most for writes and offsets: one sink writes one batch at
/// a time.
const WRITE_POOL_SIZE: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a caller waits for a free connection before the call fails (transiently).
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A context store in PostgreSQL tables, behind two small connection pools.
///
/// Writes and lookups use separate pools. A tokio-postgres connection is driven by a task on
/// the runtime that opened it; write connections are always opened on the runtime the store
/// was opened on (the pipeline's), whoever asks for one. So with the API on a runtime of its
/// own (`serve.threads`) the sink's transactions never wait for the serving threads, nor the
/// API's lookups for the pipeline's.
pub struct PostgresStore {
    /// The sink's transactions, the table set-up and the applied offsets.
    writes: Pool,
    /// The runtime the store was opened on, where write connections are opened and driven.
    writes_runtime: tokio::runtime::Handle,
    /// Documents, entity lists and dumps.
    reads: Pool,
    schema: StoreSchema,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database[?options]`) and
    /// creates the store's tables if they are missing, in the connection's default schema
    /// (the URL's `search_path`, usually `public`).
    pub async fn connect(url: &str, schema: StoreSchema) -> Result<Self, StoreError> {
        Self::open(url, None, schema).await
    }

    /// Like [`PostgresStore::connect`], with the tables in the PostgreSQL schema `namespace`
    /// (created if missing): several stores in one database, e.g. one per pipeline or test.
    /// `namespace` is a lower-case SQL identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes).
    pub async fn connect_in_namespace(
        url: &str,
        namespace: &str,
        schema: StoreSchema,
    ) -> Result<Self, StoreError> {
        Self::open(url, Some(namespace), schema).await
    }

    /// The relations this store maintains.
    pub fn schema(&self) -> &StoreSchema {
        &self.schema
    }

    async fn open(
        url: &str,
        namespace: Option<&str>,
        schema: StoreSchema,
    ) -> Result<Self, StoreError> {
        let Connect { mut config, tls } = connect::parse(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if let Some(ns) = namespace {
            if !valid_namespace(ns) {
                return Err(StoreError::Config(format!(
                    "invalid PostgreSQL schema name {ns:?}: use [a-z_][a-z0-9_]*, at most 63 bytes"
                )));
            }
            // Set at connection start-up, so every statement below names tables unqualified
            // and every pooled connection sees the same ones.
            let options = match config.get_options() {
                Some(o) if !o.is_empty() => format!("{o} -c search_path={ns}"),
                _ => format!("-c search_path={ns}"),
            };
            config.options(options);
        }
        let pool = |max_size| {
            let manager = Manager::from_config(
                config.clone(),
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(max_size)
                .runtime(Runtime::Tokio1)
                .create_timeout(Some(CONNECT_TIMEOUT))
                .wait_timeout(Some(POOL_WAIT_TIMEOUT))
                .build()
                .map_err(|e| StoreError::Io(format!("PostgreSQL pool: {}", with_causes(&e))))
        };
        // Which host answered is not in the error: only with one host is a TLS failure the
        // URL's settings for sure (a list may just have reached a host that is down).
        let one_host = config.get_hosts().len().max(config.get_hostaddrs().len()) <= 1;
        let store = Self {
            writes: pool(WRITE_POOL_SIZE)?,
            writes_runtime: tokio::runtime::Handle::current(),
            reads: pool(READ_POOL_SIZE)?,
            schema,
        };
        // The first connection: a TLS failure now is a configuration error that stops the
        // start-up. Later (a certificate that expires, a rotated authority) it is waited out
        // like an outage, while pooled connections keep serving.
        if let Err(PoolError::Backend(e)) = store.writes.get().await {
            if let Some(refusal) = tls_refusal(&e).filter(|_| one_host) {
                return Err(StoreError::Config(refusal));
            }
            return Err(pg(e));
        }
        store.create_tables(namespace).await?;
        Ok(store)
    }

    async fn create_tables(&self, namespace: Option<&str>) -> Result<(), StoreError> {
        let mut client = self.writer().await?;
        let txn = read_committed(&mut client).await?;
        // Two stores starting at once would race on CREATE ... IF NOT EXISTS (it is not
        // atomic against a concurrent create); a transaction-scoped advisory lock orders them.
        txn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('kontext-store-ddl'))",
            &[],
        )
        .await
        .map_err(pg)?;
        if let Some(ns) = namespace {
            txn.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{ns}\""))
                .await
                .map_err(pg)?;
        }
        // Before any migration: a newer format is left exactly as it is.
        txn.batch_execute(
            "CREATE TABLE IF NOT EXISTS kontext_meta \
             (key text COLLATE \"C\" PRIMARY KEY, value bigint NOT NULL)",
        )
        .await
        .map_err(pg)?;
        let store = match namespace {
            Some(ns) => format!("the PostgreSQL store in schema {ns}"),
            None => "the PostgreSQL store".into(),
        };
        let recorded: Option<i64> = txn
            .query_opt("SELECT value FROM kontext_meta WHERE key = 'format'", &[])
            .await
            .map_err(pg)?
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(|e| crate::unreadable_format(&store, e))?;
        crate::check_format(&store, recorded.map(|v| v.max(0) as u64))?;
        txn.batch_execute(SCHEMA_SQL).await.map_err(pg)?;
        let format = crate::STORE_FORMAT as i64;
        txn.execute(
            "INSERT INTO kontext_meta (key, value) VALUES ('format', $1) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&format],
        )
        .await
        .map_err(pg)?;
        txn.commit().await.map_err(pg)
    }

    /// A connection for writes (and the applied offsets), taken on the store's runtime: one
    /// it opens is driven there, also when the API asked for it (`GET /v1/lag`).
    ///
    /// The whole checkout runs there, not only the driver task (a custom
    /// `deadpool_postgres::Connect` spawning it on the store's runtime): the socket registers
    /// with the I/O driver of the runtime that connects, so a connection opened from a blocked
    /// serving runtime would still wait for it. Tried:
    /// `writes_go_on_while_the_runtime_that_opened_the_lookups_connections_is_blocked` hangs.
    async fn writer(&self) -> Result<deadpool_postgres::Client, StoreError> {
        let pool = self.writes.clone();
        self.writes_runtime
            .spawn(async move { connection(&pool).await })
            .await
            .map_err(|e| {
                StoreError::Io(format!(
                    "PostgreSQL connection: the runtime the store was opened on is gone ({e})"
                ))
            })?
    }

    /// A connection for lookups.
    async fn reader(&self) -> Result<deadpool_postgres::Client, StoreError> {
        connection(&self.reads).await
    }

    /// The whole of [`ContextStore::apply`], in one transaction.
    async fn apply_batch(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(String, i32, i64)],
    ) -> Result<ApplyStats, StoreError> {
        check_text(updates, offsets)?;
        let partitions = plan::partitions(updates, offsets);
        if partitions.is_empty() {
            return Ok(ApplyStats::default());
        }
        let mut client = self.writer().await?;
        let txn = read_committed(&mut client).await?;

        // 1. Lock and read the next offsets. Missing rows are created (at 0) so that they can be
        //    locked too: two writers of one partition serialize here, and the second sees what
        //    the first committed.
        let (topics, parts): (Vec<&str>, Vec<i32>) = partitions.iter().copied().unzip();
        let stmt = txn.prepare_cached(LOCK_OFFSETS).await.map_err(pg)?;
        let mut stored = BTreeMap::new();
        for row in txn.query(&stmt, &[&topics, &parts]).await.map_err(pg)? {
            let next: i64 = row.try_get(2).map_err(pg)?;
            stored.insert(
                (row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?),
                next,
            );
        }

        let BatchPlan {
            stats,
            entities,
            offsets: next_offsets,
        } = plan::plan(updates, offsets, &stored);

        // 2. Entities: events_applied, the latest upsert and the latest tombstone. Returns the
        //    tombstones of the batch's deleted entities (stored or new), whose rows it locked.
        let mut tombs: BTreeMap<(String, String), OwnedVersion> = BTreeMap::new();
        let mut e = EntityColumns::default();
        for ((entity_type, entity_id), plan) in &entities {
            e.types.push(entity_type);
            e.ids.push(entity_id);
            e.counts
                .push(i64::try_from(plan.events).unwrap_or(i64::MAX));
            e.latest.push(plan.latest);
            e.tomb.push(plan.tomb);
        }
        if !e.types.is_empty() {
            let stmt = txn.prepare_cached(&UPSERT_ENTITIES).await.map_err(pg)?;
            let p = ProvenanceColumns::of(&e.latest);
            let d = ProvenanceColumns::of(&e.tomb);
            let rows = txn
                .query(
                    &stmt,
                    &[
                        &e.types,
                        &e.ids,
                        &e.counts,
                        &p.source,
                        &p.event_id,
                        &p.event_type,
                        &p.topic,
                        &p.partition,
                        &p.offset,
                        &p.time,
                        &d.time,
                        &d.topic,
                        &d.partition,
                        &d.offset,
                    ],
                )
                .await
                .map_err(pg)?;
            for row in rows {
                tombs.insert(
                    (row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?),
                    (
                        row.try_get(2).map_err(pg)?,
                        row.try_get(3).map_err(pg)?,
                        row.try_get(4).map_err(pg)?,
                        row.try_get(5).map_err(pg)?,
                    ),
                );
            }
        }

        // 3. Fields: one versioned upsert, of the fields newer than their entity's tombstone
        //    (the row is locked: it stays as read); it returns the relation fields it changed.
        let mut f = FieldColumns::default();
        for ((entity_type, entity_id), plan) in &entities {
            let tomb = match tombs.is_empty() {
                true => None,
                false => tombs.get(&(entity_type.to_string(), entity_id.to_string())),
            };
            for (field, (value, prov)) in &plan.fields {
                if tomb.is_some_and(|t| prov.not_newer_than(t)) {
                    continue;
                }
                f.types.push(entity_type);
                f.ids.push(entity_id);
                f.fields.push(field);
                f.values.push(serde_json::to_string(value).map_err(|e| {
                    StoreError::Corrupt(format!("{entity_type}/{entity_id}.{field}: {e}"))
                })?);
                f.prov.push(Some(*prov));
            }
        }
        let (rel_types, rel_fields): (Vec<&str>, Vec<&str>) = self
            .schema
            .belongs_to
            .iter()
            .flat_map(|(child, parents)| {
                parents
                    .iter()
                    .map(move |(_, field)| (child.as_str(), field.as_str()))
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .unzip();
        let mut changed_relations: Vec<(String, String, String)> = Vec::new();
        if !f.types.is_empty() {
            let stmt = txn.prepare_cached(&UPSERT_FIELDS).await.map_err(pg)?;
            let p = ProvenanceColumns::of(&f.prov);
            let rows = txn
                .query(
                    &stmt,
                    &[
                        &f.types,
                        &f.ids,
                        &f.fields,
                        &f.values,
                        &p.source,
                        &p.event_id,
                        &p.event_type,
                        &p.topic,
                        &p.partition,
                        &p.offset,
                        &p.time,
                        &rel_types,
                        &rel_fields,
                    ],
                )
                .await
                .map_err(pg)?;
            for row in rows {
                changed_relations.push((
                    row.try_get(0).map_err(pg)?,
                    row.try_get(1).map_err(pg)?,
                    row.try_get(2).map_err(pg)?,
                ));
            }
        }

        // 4. The stored fields the batch's tombstones remove; the relation fields among them
        //    unset their relations.
        let mut removed_relations: Vec<(String, String, &str)> = Vec::new();
        let (types, ids): (Vec<&str>, Vec<&str>) = entities
            .iter()
            .filter(|(_, plan)| plan.tomb.is_some())
            .map(|(k, _)| *k)
            .unzip();
        if !types.is_empty() {
            let stmt = txn.prepare_cached(DELETE_FIELDS).await.map_err(pg)?;
            for row in txn.query(&stmt, &[&types, &ids]).await.map_err(pg)? {
                let (child_type, child_id, field): (&str, &str, &str) = (
                    row.try_get(0).map_err(pg)?,
                    row.try_get(1).map_err(pg)?,
                    row.try_get(2).map_err(pg)?,
                );
                for (parent_type, _) in self
                    .schema
                    .parents_of(child_type)
                    .iter()
                    .filter(|(_, f)| f == field)
                {
                    removed_relations.push((child_type.into(), child_id.into(), parent_type));
                }
            }
        }

        // 5. Relations of the changed relation fields: point at the new parent, or at none.
        let mut set = RelationColumns::default();
        let mut unset = RelationColumns::default();
        for (child_type, child_id, parent_type) in &removed_relations {
            unset.child_types.push(child_type);
            unset.child_ids.push(child_id);
            unset.parent_types.push(parent_type);
        }
        for (child_type, child_id, field) in &changed_relations {
            let Some(plan) = entities.get(&(child_type.as_str(), child_id.as_str())) else {
                continue;
            };
            let Some((value, _)) = plan.fields.get(field.as_str()) else {
                continue;
            };
            for (parent_type, _) in self
                .schema
                .parents_of(child_type)
                .iter()
                .filter(|(_, f)| f == field)
            {
                let target = match parent_id(value) {
                    Some(id) => {
                        set.parent_ids.push(id);
                        &mut set
                    }
                    None => &mut unset,
                };
                target.child_types.push(child_type);
                target.child_ids.push(child_id);
                target.parent_types.push(parent_type);
            }
        }
        if !set.child_types.is_empty() {
            let stmt = txn.prepare_cached(SET_RELATIONS).await.map_err(pg)?;
            txn.execute(
                &stmt,
                &[
                    &set.child_types,
                    &set.child_ids,
                    &set.parent_types,
                    &set.parent_ids,
                ],
            )
            .await
            .map_err(pg)?;
        }
        if !unset.child_types.is_empty() {
            let stmt = txn.prepare_cached(UNSET_RELATIONS).await.map_err(pg)?;
            txn.execute(
                &stmt,
                &[&unset.child_types, &unset.child_ids, &unset.parent_types],
            )
            .await
            .map_err(pg)?;
        }

        // 6. Offsets, in the same transaction as the data they cover.
        let (mut topics, mut parts, mut nexts) = (Vec::new(), Vec::new(), Vec::new());
        for ((topic, partition), next) in &next_offsets {
            topics.push(*topic);
            parts.push(*partition);
            nexts.push(*next);
        }
        let stmt = txn.prepare_cached(ADVANCE_OFFSETS).await.map_err(pg)?;
        txn.execute(&stmt, &[&topics, &parts, &nexts])
            .await
            .map_err(pg)?;

        txn.commit().await.map_err(pg)?;
        Ok(stats)
    }

    /// Entities by key, each with its fields, in (type, id) order.
    async fn load(
        client: &impl deadpool_postgres::GenericClient,
        keys: &[(&str, &str)],
    ) -> Result<Vec<EntityDoc>, StoreError> {
        // Text cannot hold NUL, so no stored key has one (writes refuse them): such a key names
        // nothing, and binding it would fail the whole query (SQLSTATE 22021), which the API
        // would answer as an unavailable store (a request for `/v1/context/customer/C1%00`).
        let (types, ids): (Vec<&str>, Vec<&str>) = keys
            .iter()
            .copied()
            .filter(|(t, id)| !t.contains('\0') && !id.contains('\0'))
            .unzip();
        if types.is_empty() {
            return Ok(Vec::new());
        }
        let stmt = client
            .prepare_cached(&format!("{SELECT_DOCS} {WHERE_KEYS} {ORDER_DOCS}"))
            .await
            .map_err(pg)?;
        docs_from_rows(client.query(&stmt, &[&types, &ids]).await.map_err(pg)?)
    }

    async fn assemble(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<ContextDocument>, StoreError> {
        let mut client = self.reader().await?;
        // One snapshot for the entity, its parents and its children.
        let txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let Some(doc) = Self::load(&txn, &[(entity_type, entity_id)])
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let mut belongs_to = BTreeMap::new();
        for (parent_type, field) in self.schema.parents_of(entity_type) {
            let Some(parent_id) = doc.fields.get(field).and_then(|f| parent_id_of(&f.value)) else {
                continue;
            };
            if let Some(parent) = Self::load(&txn, &[(parent_type, &parent_id)])
                .await?
                .into_iter()
                .next()
            {
                belongs_to.insert(
                    parent_type.clone(),
                    Arc::new(RelatedEntity::from_doc(&parent)),
                );
            }
        }
        let mut related = BTreeMap::new();
        let children_stmt = txn.prepare_cached(CHILDREN).await.map_err(pg)?;
        for (child_type, _) in self.schema.children_of(entity_type) {
            let limit = self.schema.related_limit_of(child_type);
            // At least one row, so that the total (a window count) arrives even for limit 0.
            let fetch = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
            let rows = txn
                .query(
                    &children_stmt,
                    &[&entity_type, &entity_id, &child_type, &fetch],
                )
                .await
                .map_err(pg)?;
            let mut total = 0usize;
            let mut ids: Vec<String> = Vec::with_capacity(rows.len());
            for row in &rows {
                ids.push(row.try_get(0).map_err(pg)?);
                total = usize::try_from(row.try_get::<_, i64>(1).map_err(pg)?).unwrap_or(0);
            }
            ids.truncate(limit);
            let keys: Vec<(&str, &str)> = ids.iter().map(|id| (child_type, id.as_str())).collect();
            let mut by_id: BTreeMap<String, EntityDoc> = Self::load(&txn, &keys)
                .await?
                .into_iter()
                .map(|d| (d.entity_id.clone(), d))
                .collect();
            let items = ids
                .iter()
                .filter_map(|id| by_id.remove(id))
                .map(|d| Arc::new(RelatedEntity::from_doc(&d)))
                .collect();
            related.insert(child_type.to_string(), RelatedList { total, items });
        }
        txn.commit().await.map_err(pg)?;
        Ok(Some(ContextDocument::assemble(&doc, belongs_to, related)))
    }
}

#[async_trait]
impl ContextStore for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn schema(&self) -> &StoreSchema {
        PostgresStore::schema(self)
    }

    async fn apply(
        &self,
        updates: &[EntityUpdate],
        offsets: &[(String, i32, i64)],
    ) -> Result<ApplyStats, StoreError> {
        self.apply_batch(updates, offsets).await
    }

    async fn get(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<EntityDoc>, StoreError> {
        let client = self.reader().await?;
        Ok(Self::load(&client, &[(entity_type, entity_id)])
            .await?
            .into_iter()
            .next())
    }

    async fn context(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Arc<ContextDocument>>, StoreError> {
        Ok(self.assemble(entity_type, entity_id).await?.map(Arc::new))
    }

    async fn list(
        &self,
        entity_type: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        // No id holds a NUL (see `load`), and ids compare bytewise (`COLLATE "C"`): the ids
        // after `x\0...` are those after `x`, and text cannot bind the NUL.
        let after = after.map(|a| a.split('\0').next().unwrap_or_default());
        let client = self.reader().await?;
        let stmt = client.prepare_cached(LIST).await.map_err(pg)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        client
            .query(&stmt, &[&entity_type, &after, &limit])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.try_get(0).map_err(pg))
            .collect()
    }

    async fn applied_offsets(&self) -> Result<BTreeMap<(String, i32), i64>, StoreError> {
        let client = self.writer().await?;
        // Rows at 0 are the ones the lock statement created for partitions that never
        // advanced: the embedded store has no entry for them, neither do we.
        let stmt = client
            .prepare_cached(
                r#"SELECT topic, "partition", next_offset FROM kontext_offsets WHERE next_offset > 0"#,
            )
            .await
            .map_err(pg)?;
        let mut out = BTreeMap::new();
        for row in client.query(&stmt, &[]).await.map_err(pg)? {
            out.insert(
                (row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?),
                row.try_get(2).map_err(pg)?,
            );
        }
        Ok(out)
    }

    async fn dump(&self) -> Result<Vec<EntityDoc>, StoreError> {
        let client = self.reader().await?;
        let stmt = client
            .prepare_cached(&format!("{SELECT_DOCS} {ORDER_DOCS}"))
            .await
            .map_err(pg)?;
        docs_from_rows(client.query(&stmt, &[]).await.map_err(pg)?)
    }
}

/// A pooled connection; a pool that cannot give one is an I/O error (transient).
async fn connection(pool: &Pool) -> Result<deadpool_postgres::Client, StoreError> {
    pool.get().await.map_err(|e| match e {
        PoolError::Backend(e) => pg(e),
        other => StoreError::Io(format!("PostgreSQL connection: {}", with_causes(&other))),
    })
}

// ---- SQL ---------------------------------------------------------------------------------

/// Creates missing offset rows at 0 and locks all of them (a no-op update takes the row
/// lock), returning the stored next offsets. Input is sorted: writers lock in one order.
const LOCK_OFFSETS: &str = r#"
INSERT INTO kontext_offsets AS o (topic, "partition", next_offset)
SELECT t, p, 0 FROM unnest($1::text[], $2::int4[]) AS u(t, p)
ON CONFLICT (topic, "partition") DO UPDATE SET next_offset = o.next_offset
RETURNING topic, "partition", next_offset"#;

/// Removes the fields of the given entities that their tombstone covers (not newer than it),
/// returning them.
const DELETE_FIELDS: &str = r#"
DELETE FROM kontext_fields f
USING unnest($1::text[], $2::text[]) AS k(t, i), kontext_entities e
WHERE e.entity_type = k.t AND e.entity_id = k.i
  AND f.entity_type = k.t AND f.entity_id = k.i
  AND (f.event_time_ms, f.topic, f."partition", f."offset")
      <= (e.deleted_time_ms, e.deleted_topic, e.deleted_partition, e.deleted_offset)
RETURNING f.entity_type, f.entity_id, f.field"#;

/// The tombstone columns of `kontext_entities`, in the order of [`UPSERT_ENTITIES`]'s parameters.
const TOMBSTONE_COLUMNS: &str = "deleted_time_ms, deleted_topic, deleted_partition, deleted_offset";

/// The provenance columns, in the order of the statements' parameters.
const PROVENANCE_COLUMNS: &str =
    r#"source, event_id, event_type, topic, "partition", "offset", event_time_ms"#;

/// The version comparison of `merge_fields`: (event time, topic, partition, offset), the
/// topic compared bytewise (the column's collation is "C").
fn newer(new: &str, old: &str) -> String {
    format!(
        r#"({new}.event_time_ms, {new}.topic, {new}."partition", {new}."offset") > ({old}.event_time_ms, {old}.topic, {old}."partition", {old}."offset")"#
    )
}

/// Adds the batch's records to `events_applied` and keeps the greater of the stored and the
/// batch's latest upsert, and of their latest tombstones (a NULL on either side: the other).
/// Returns the entities that have a tombstone, with its version.
static UPSERT_ENTITIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let newer = newer("excluded", "e");
    let latest = PROVENANCE_COLUMNS.split(", ").map(|c| {
        format!(
            "{c} = CASE WHEN e.event_time_ms IS NULL OR {newer} THEN excluded.{c} ELSE e.{c} END"
        )
    });
    let tomb = |side: &str| {
        let columns: Vec<String> = TOMBSTONE_COLUMNS
            .split(", ")
            .map(|c| format!("{side}.{c}"))
            .collect();
        format!("({})", columns.join(", "))
    };
    let (new_tomb, old_tomb) = (tomb("excluded"), tomb("e"));
    let tombstone = TOMBSTONE_COLUMNS.split(", ").map(|c| {
        format!(
            "{c} = CASE WHEN e.deleted_time_ms IS NULL OR {new_tomb} > {old_tomb} THEN excluded.{c} ELSE e.{c} END"
        )
    });
    let set: Vec<String> = latest.chain(tombstone).collect();
    format!(
        r#"
WITH written AS (
    INSERT INTO kontext_entities AS e
        (entity_type, entity_id, events_applied, {PROVENANCE_COLUMNS}, {TOMBSTONE_COLUMNS})
    SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::int4[], $9::int8[], $10::int8[],
                         $11::int8[], $12::text[], $13::int4[], $14::int8[])
    ON CONFLICT (entity_type, entity_id) DO UPDATE SET
        events_applied = e.events_applied + excluded.events_applied,
        {}
    RETURNING entity_type, entity_id, {TOMBSTONE_COLUMNS}
)
SELECT * FROM written WHERE deleted_time_ms IS NOT NULL"#,
        set.join(",\n        ")
    )
});

/// The one versioned upsert of the batch's fields: a stored field is replaced only by a
/// greater version. Returns the changed rows that are relation fields ($12, $13: the
/// (entity type, field) pairs of the schema's `belongs_to`).
static UPSERT_FIELDS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let newer = newer("excluded", "f");
    format!(
        r#"
WITH changed AS (
    INSERT INTO kontext_fields AS f (entity_type, entity_id, field, value, {PROVENANCE_COLUMNS})
    SELECT t, i, n, v::json, s, ev, et, tp, p, o, ms
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::int4[], $10::int8[], $11::int8[])
         AS u(t, i, n, v, s, ev, et, tp, p, o, ms)
    ON CONFLICT (entity_type, entity_id, field) DO UPDATE SET
        value = excluded.value, source = excluded.source, event_id = excluded.event_id,
        event_type = excluded.event_type, topic = excluded.topic,
        "partition" = excluded."partition", "offset" = excluded."offset",
        event_time_ms = excluded.event_time_ms
    WHERE {newer}
    RETURNING entity_type, entity_id, field
)
SELECT c.entity_type, c.entity_id, c.field FROM changed c
WHERE (c.entity_type, c.field) IN (SELECT * FROM unnest($12::text[], $13::text[]))"#
    )
});

const SET_RELATIONS: &str = r#"
INSERT INTO kontext_relations AS r (child_type, child_id, parent_type, parent_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT (child_type, child_id, parent_type) DO UPDATE SET parent_id = excluded.parent_id
WHERE r.parent_id <> excluded.parent_id"#;

const UNSET_RELATIONS: &str = r#"
DELETE FROM kontext_relations r
USING unnest($1::text[], $2::text[], $3::text[]) AS u(ct, ci, pt)
WHERE r.child_type = u.ct AND r.child_id = u.ci AND r.parent_type = u.pt"#;

const ADVANCE_OFFSETS: &str = r#"
UPDATE kontext_offsets o SET next_offset = u.n
FROM unnest($1::text[], $2::int4[], $3::int8[]) AS u(t, p, n)
WHERE o.topic = u.t AND o."partition" = u.p AND u.n > o.next_offset"#;

/// An entity and its fields, one row per field (one row with NULL fields if it has none).
const SELECT_DOCS: &str = r#"
SELECT e.entity_type, e.entity_id, e.events_applied,
       e.source, e.event_id, e.event_type, e.topic, e."partition", e."offset", e.event_time_ms,
       f.field, f.value::text,
       f.source, f.event_id, f.event_type, f.topic, f."partition", f."offset", f.event_time_ms
FROM kontext_entities e
LEFT JOIN kontext_fields f ON f.entity_type = e.entity_type AND f.entity_id = e.entity_id
WHERE e.visible"#;
const WHERE_KEYS: &str = r#"
AND (e.entity_type, e.entity_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"#;
const ORDER_DOCS: &str = "ORDER BY e.entity_type, e.entity_id";

/// A parent's children of one type, newest first by their latest version, with the total
/// count. (Versions do not tie: a version is a record's position, and both stores apply one
/// update per record, skipping later ones at the same offset; the id only makes the order
/// total.)
const CHILDREN: &str = r#"
SELECT e.entity_id, count(*) OVER ()
FROM kontext_relations r
JOIN kontext_entities e ON e.entity_type = r.child_type AND e.entity_id = r.child_id
WHERE r.parent_type = $1 AND r.parent_id = $2 AND r.child_type = $3 AND e.visible
ORDER BY e.event_time_ms DESC, e.topic DESC, e."partition" DESC, e."offset" DESC, e.entity_id
LIMIT $4"#;

const LIST: &str = r#"
SELECT entity_id FROM kontext_entities
WHERE entity_type = $1 AND visible AND ($2::text IS NULL OR entity_id > $2)
ORDER BY entity_id LIMIT $3"#;

// ---- helpers -----------------------------------------------------------------------------

#[derive(Default)]
struct EntityColumns<'a> {
    types: Vec<&'a str>,
    ids: Vec<&'a str>,
    counts: Vec<i64>,
    latest: Vec<Option<&'a Provenance>>,
    tomb: Vec<Option<&'a Provenance>>,
}

#[derive(Default)]
struct FieldColumns<'a> {
    types: Vec<&'a str>,
    ids: Vec<&'a str>,
    fields: Vec<&'a str>,
    values: Vec<String>,
    prov: Vec<Option<&'a Provenance>>,
}

#[derive(Default)]
struct RelationColumns<'a> {
    child_types: Vec<&'a str>,
    child_ids: Vec<&'a str>,
    parent_types: Vec<&'a str>,
    parent_ids: Vec<String>,
}

/// Provenances as one array per column, for `unnest`; NULLs where there is none.
struct ProvenanceColumns<'a> {
    source: Vec<Option<&'a str>>,
    event_id: Vec<Option<&'a str>>,
    event_type: Vec<Option<&'a str>>,
    topic: Vec<Option<&'a str>>,
    partition: Vec<Option<i32>>,
    offset: Vec<Option<i64>>,
    time: Vec<Option<i64>>,
}

impl<'a> ProvenanceColumns<'a> {
    fn of(prov: &[Option<&'a Provenance>]) -> Self {
        let column = |f: fn(&'a Provenance) -> _| prov.iter().map(|p| p.map(f)).collect();
        Self {
            source: column(|p| p.source.as_str()),
            event_id: column(|p| p.event_id.as_str()),
            event_type: prov
                .iter()
                .map(|p| p.and_then(|p| p.event_type.as_deref()))
                .collect(),
            topic: column(|p| p.topic.as_str()),
            partition: prov.iter().map(|p| p.map(|p| p.partition)).collect(),
            offset: prov.iter().map(|p| p.map(|p| p.offset)).collect(),
            time: prov.iter().map(|p| p.map(|p| p.event_time_ms)).collect(),
        }
    }
}

/// Folds the rows of [`SELECT_DOCS`] (ordered by entity) into documents.
fn docs_from_rows(rows: Vec<Row>) -> Result<Vec<EntityDoc>, StoreError> {
    let mut docs: Vec<EntityDoc> = Vec::new();
    for row in rows {
        let entity_type: String = row.try_get(0).map_err(pg)?;
        let entity_id: String = row.try_get(1).map_err(pg)?;
        let same = docs
            .last()
            .is_some_and(|d| d.entity_type == entity_type && d.entity_id == entity_id);
        if !same {
            let events: i64 = row.try_get(2).map_err(pg)?;
            docs.push(EntityDoc {
                entity_type,
                entity_id,
                fields: BTreeMap::new(),
                events_applied: u64::try_from(events)
                    .map_err(|_| StoreError::Corrupt(format!("events_applied {events}")))?,
                latest: Arc::new(provenance(&row, 3)?),
            });
        }
        let Some(field) = row.try_get::<_, Option<String>>(10).map_err(pg)? else {
            continue;
        };
        let text: String = row.try_get(11).map_err(pg)?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("field {field}: {e}")))?;
        let provenance = Arc::new(provenance(&row, 12)?);
        if let Some(doc) = docs.last_mut() {
            doc.fields.insert(field, FieldEntry { value, provenance });
        }
    }
    Ok(docs)
}

/// The seven provenance columns starting at `at`.
fn provenance(row: &Row, at: usize) -> Result<Provenance, StoreError> {
    Ok(Provenance {
        source: row.try_get(at).map_err(pg)?,
        event_id: row.try_get(at + 1).map_err(pg)?,
        event_type: row.try_get(at + 2).map_err(pg)?,
        topic: row.try_get(at + 3).map_err(pg)?,
        partition: row.try_get(at + 4).map_err(pg)?,
        offset: row.try_get(at + 5).map_err(pg)?,
        event_time_ms: row.try_get(at + 6).map_err(pg)?,
    })
}

/// The parent id a relation field holds ([`parent_id_of`]).
fn parent_id(value: &Value) -> Option<String> {
    parent_id_of(value).map(std::borrow::Cow::into_owned)
}

/// PostgreSQL text cannot hold NUL characters (the embedded store can). Such a batch can
/// never be written: a permanent error, reported before anything is sent. (NUL inside JSON
/// values is fine: it travels escaped, and `json` keeps the escape.)
fn check_text(updates: &[EntityUpdate], offsets: &[(String, i32, i64)]) -> Result<(), StoreError> {
    let nul = |s: &str| s.contains('\0');
    for u in updates {
        let p = &u.provenance;
        let names_nul = match &u.change {
            crate::Change::Upsert(fields) => fields.keys().any(nul),
            crate::Change::Delete => false,
        };
        if nul(&u.entity_type)
            || nul(&u.entity_id)
            || names_nul
            || nul(&p.source)
            || nul(&p.event_id)
            || p.event_type.as_deref().is_some_and(nul)
            || nul(&p.topic)
        {
            return Err(StoreError::Corrupt(format!(
                "{}/{} (event {:?}): a NUL character in a name or id, which PostgreSQL text cannot hold",
                u.entity_type.escape_debug(),
                u.entity_id.escape_debug(),
                p.event_id
            )));
        }
    }
    if let Some((t, _, _)) = offsets.iter().find(|(t, _, _)| nul(t)) {
        return Err(StoreError::Corrupt(format!(
            "topic {t:?}: a NUL character, which PostgreSQL text cannot hold"
        )));
    }
    Ok(())
}

fn valid_namespace(ns: &str) -> bool {
    let mut chars = ns.chars();
    ns.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A transaction in READ COMMITTED whatever the database's default isolation: the DDL lock
/// and the offsets lock both rely on a statement that waited for a lock seeing what the
/// transaction holding it committed (under REPEATABLE READ or SERIALIZABLE its snapshot
/// would be older, and it would migrate again or fail to serialize).
async fn read_committed(
    client: &mut deadpool_postgres::Client,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(pg)
}

/// Maps a PostgreSQL error to the store's retry meaning: the connection, the server's state
/// or a conflict between transactions (transient: retry the batch) versus what the server
/// rejects about the statement or its data (permanent).
pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    // Class 28: the server refuses the login (a wrong password, no or a wrong client
    // certificate for `cert` authentication): the URL's settings, which no retry changes.
    if let Some(db) = e
        .as_db_error()
        .filter(|db| db.code().code().starts_with("28"))
    {
        return StoreError::Config(format!(
            "PostgreSQL refuses the login ({} {}): check the user, the password and the \
             client certificate (sslcert, sslkey) in the store's URL",
            db.code().code(),
            db.message()
        ));
    }
    let transient = match e.code() {
        None => true, // I/O, closed connection, timeout: no answer from the server
        Some(code) => is_transient_state(code),
    };
    let msg = match e.as_db_error() {
        Some(db) => format!("PostgreSQL {}: {}", db.code().code(), db.message()),
        None => format!("PostgreSQL: {}", with_causes(&e)),
    };
    if transient {
        StoreError::Io(msg)
    } else {
        StoreError::Corrupt(msg)
    }
}

/// A TLS failure that no retry changes, as the fix to name: the server's certificate fails
/// verification, or the server offers no TLS where the URL requires it. An I/O error during
/// the handshake is not one of them; nor, under TLS 1.3, is a client certificate the server
/// refuses: the client sees the connection reset, as in an outage.
fn tls_refusal(e: &tokio_postgres::Error) -> Option<String> {
    let mut outer: Option<&dyn std::error::Error> = None;
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        // tokio-postgres's own words (connect_tls.rs) for a server that answers "no" to TLS.
        if c.to_string() == "server does not support TLS" {
            return Some(
                "PostgreSQL: the server does not support TLS on this connection, and the URL's \
                 sslmode requires it: enable ssl on the server, or use sslmode=prefer (or \
                 disable); a Unix socket never offers TLS"
                    .into(),
            );
        }
        if let Some(ssl) = c.downcast_ref::<openssl::ssl::Error>() {
            let verify_failed = ssl.ssl_error().is_some_and(|stack| {
                stack
                    .errors()
                    .iter()
                    .any(|err| err.reason() == Some("certificate verify failed"))
            });
            if verify_failed {
                // postgres-openssl's error above this one appends X509's verify result.
                let ssl_text = ssl.to_string();
                let why = outer
                    .map(|o| o.to_string())
                    .and_then(|o| o.strip_prefix(&format!("{ssl_text}: ")).map(str::to_owned))
                    .unwrap_or_default();
                return Some(format!(
                    "PostgreSQL's TLS certificate fails verification (certificate verify failed: \
                     {why}): check that sslrootcert names the authority that signed the \
                     server's certificate and, with sslmode=verify-full, that the URL's host is \
                     a name the certificate is for"
                ));
            }
        }
        outer = Some(c);
        cause = c.source();
    }
    None
}

/// SQLSTATE classes and codes worth a retry: 08 connection exception, 40 transaction rollback
/// (serialization failure, deadlock), 53 insufficient resources, 57 operator intervention
/// (shutdown, cancel, terminated backend), 58 system error (I/O), 55P03 lock not available.
pub(crate) fn is_transient_state(code: &SqlState) -> bool {
    let c = code.code();
    matches!(c.get(..2), Some("08" | "40" | "53" | "57" | "58")) || c == "55P03"
}

/// An error and its causes, `outer: inner: ...`. tokio-postgres's errors show only their kind
/// ("error connecting to server", "error performing TLS handshake") and keep the reason
/// (connection refused, certificate verify failed) in their source.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}
