-- The PostgreSQL context store's tables, created at connect (idempotent). See
-- docs/store-postgres.md. Every text column that is compared or ordered is COLLATE "C": the
-- version order and the id order are byte orders, as in the embedded store, whatever the
-- database's default collation is.

-- fillfactor 80 on the tables every batch updates: room on the page for the new row version,
-- so that an update of non-key columns is a HOT update (no index write).

-- One row per entity: the bookkeeping `EntityDoc` keeps beside the fields.
CREATE TABLE IF NOT EXISTS kontext_entities (
    entity_type    text COLLATE "C" NOT NULL,
    entity_id      text COLLATE "C" NOT NULL,
    -- Log records applied to this entity, each exactly once.
    events_applied bigint NOT NULL,
    -- The newest event applied (by version): `EntityDoc::latest`.
    source         text NOT NULL,
    event_id       text NOT NULL,
    event_type     text,
    topic          text COLLATE "C" NOT NULL,
    "partition"    integer NOT NULL,
    "offset"       bigint NOT NULL,
    event_time_ms  bigint NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
) WITH (fillfactor = 80);

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
