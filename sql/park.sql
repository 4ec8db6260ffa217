-- `replication.on_schema_mismatch = "park"`: changes of a table whose target schema does not
-- fit (the table or one of its columns is missing), kept in order until it fits. Created by
-- `walbridge setup` on every node, after sql/schema.sql; idempotent.
--
-- One row per change, written by the apply session of direction `source` -> `target` in the
-- same transaction as the origin's progress, so a change is either parked here or still to
-- come from the source, never both and never neither. `seq` orders a table's changes. A row
-- holds what replaying it needs without the source: the source's column names, type OIDs and
-- key columns as of the change; the new values (text form; a NULL element is SQL NULL; the
-- columns in `unchanged` are TOAST values the update did not change, their element is NULL);
-- the old key or row of an update or delete (`old_kind` 'key' or 'full'); where and when the
-- source committed it. walbridge replays a table's rows in `seq` order once the target's
-- schema fits and deletes them in the replay's transaction.
CREATE TABLE IF NOT EXISTS walbridge.parked (
    seq              bigserial PRIMARY KEY,
    source           text NOT NULL,
    target           text NOT NULL,
    schema_name      text NOT NULL,
    table_name       text NOT NULL,
    op               text NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    replica_identity text NOT NULL,
    columns          text[] NOT NULL,
    type_oids        oid[] NOT NULL,
    key_columns      text[] NOT NULL,
    new_values       text[],
    unchanged        text[] NOT NULL DEFAULT '{}',
    old_kind         text CHECK (old_kind IN ('key', 'full')),
    old_values       text[],
    xid              bigint,
    commit_lsn       pg_lsn,
    commit_time      timestamptz NOT NULL,
    source_origin    text,
    reason           text NOT NULL,
    parked_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
CREATE INDEX IF NOT EXISTS parked_table ON walbridge.parked (source, schema_name, table_name, seq);
REVOKE ALL ON walbridge.parked FROM PUBLIC;
REVOKE ALL ON SEQUENCE walbridge.parked_seq_seq FROM PUBLIC;
