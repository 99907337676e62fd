-- The PostgreSQL context store's tables, created at connect (idempotent). See
-- docs/store-postgres.md. Every text column that is compared or ordered is COLLATE "C": the
-- version order and the id order are byte orders, as in the embedded store, whatever the
-- database's default collation is.

-- fillfactor 80 on the tables every batch updates: room on the page for the new row version,
-- so that an update of non-key columns is a HOT update (no index write).

-- One row per entity: the bookkeeping `EntityDoc` keeps beside the fields. A deleted entity
-- keeps its row (not `visible`): its tombstone keeps out the upserts older than it that arrive
-- later, from another partition or topic.
CREATE TABLE IF NOT EXISTS kontext_entities (
    entity_type    text COLLATE "C" NOT NULL,
    entity_id      text COLLATE "C" NOT NULL,
    -- Log records applied to this entity (upserts and tombstones), each exactly once.
    events_applied bigint NOT NULL,
    -- The newest upsert applied (by version): `EntityDoc::latest`; NULL if none was.
    source         text,
    event_id       text,
    event_type     text,
    topic          text COLLATE "C",
    "partition"    integer,
    "offset"       bigint,
    event_time_ms  bigint,
    -- The version of the newest tombstone applied; NULL if none was. Fields of this version
    -- or older are gone, and so is the entity unless its newest upsert is newer.
    deleted_time_ms   bigint,
    deleted_topic     text COLLATE "C",
    deleted_partition integer,
    deleted_offset    bigint,
    visible boolean GENERATED ALWAYS AS (
        event_time_ms IS NOT NULL AND (deleted_time_ms IS NULL OR
            (event_time_ms, topic, "partition", "offset")
                > (deleted_time_ms, deleted_topic, deleted_partition, deleted_offset))
    ) STORED,
    PRIMARY KEY (entity_type, entity_id)
) WITH (fillfactor = 80);

-- Tables of a kontext before versioned tombstones (which deleted the row) get the columns.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'kontext_entities'
                     AND column_name = 'visible') THEN
        ALTER TABLE kontext_entities
            ALTER COLUMN source DROP NOT NULL,
            ALTER COLUMN event_id DROP NOT NULL,
            ALTER COLUMN topic DROP NOT NULL,
            ALTER COLUMN "partition" DROP NOT NULL,
            ALTER COLUMN "offset" DROP NOT NULL,
            ALTER COLUMN event_time_ms DROP NOT NULL,
            ADD COLUMN deleted_time_ms bigint,
            ADD COLUMN deleted_topic text COLLATE "C",
            ADD COLUMN deleted_partition integer,
            ADD COLUMN deleted_offset bigint,
            ADD COLUMN visible boolean GENERATED ALWAYS AS (
                event_time_ms IS NOT NULL AND (deleted_time_ms IS NULL OR
                    (event_time_ms, topic, "partition", "offset")
                        > (deleted_time_ms, deleted_topic, deleted_partition, deleted_offset))
            ) STORED;
    END IF;
END $$;

-- One row per field, with the provenance (and so the version) of the event that wrote it.
-- `json`, not `jsonb`: it keeps the text serde_json wrote, so values read back exactly as
-- written (jsonb would reject "\u0000" in strings and rewrite numbers such as 1e-7).
CREATE TABLE IF NOT EXISTS kontext_fields (
    entity_type    text COLLATE "C" NOT NULL,
    entity_id      text COLLATE "C" NOT NULL,
    field          text COLLATE "C" NOT NULL,
    value          json NOT NULL,
    source         text NOT NULL,
    event_id       text NOT NULL,
    event_type     text,
    topic          text COLLATE "C" NOT NULL,
    "partition"    integer NOT NULL,
    "offset"       bigint NOT NULL,
    event_time_ms  bigint NOT NULL,
    PRIMARY KEY (entity_type, entity_id, field)
) WITH (fillfactor = 80);

-- The relation index: a child entity belongs to the parent its relation field names.
-- Maintained in the same transaction as the fields it derives from.
CREATE TABLE IF NOT EXISTS kontext_relations (
    child_type  text COLLATE "C" NOT NULL,
    child_id    text COLLATE "C" NOT NULL,
    parent_type text COLLATE "C" NOT NULL,
    parent_id   text COLLATE "C" NOT NULL,
    PRIMARY KEY (child_type, child_id, parent_type)
);
CREATE INDEX IF NOT EXISTS kontext_relations_by_parent
    ON kontext_relations (parent_type, parent_id, child_type, child_id);

-- Next offset to apply per source partition, written with the data it covers.
CREATE TABLE IF NOT EXISTS kontext_offsets (
    topic       text COLLATE "C" NOT NULL,
    "partition" integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, "partition")
);
