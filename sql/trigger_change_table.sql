-- walbridge trigger mode: the change table and its dead-letter twin, on a trigger-mode node.
-- A template: `walbridge setup` replaces {{change_table}}, {{dead_table}}, {{txid_index}},
-- {{channel}} with quoted names. Idempotent; an existing table of the old polling script
-- (id, metodo, tabla, descripcion as text, json or jsonb) is kept with its rows, and gains
-- walbridge's columns, whose defaults keep rows written by old triggers valid.

CREATE TABLE IF NOT EXISTS {{change_table}} (
    id          bigserial PRIMARY KEY,
    metodo      text NOT NULL,
    tabla       text NOT NULL,
    descripcion jsonb
);
-- The node the change was made on. Old triggers do not set it: the default takes the
-- walbridge.origin setting of walbridge's apply session, so a row an old trigger logs for a
-- change walbridge applied names its real origin and is never sent back.
ALTER TABLE {{change_table}}
    ADD COLUMN IF NOT EXISTS origin_node text
        DEFAULT NULLIF(pg_catalog.current_setting('walbridge.origin', true), '');
-- The writing transaction: orders late committers and gives the commit time
-- (pg_xact_commit_timestamp) for conflict resolution. Existing rows keep NULL.
ALTER TABLE {{change_table}} ADD COLUMN IF NOT EXISTS txid xid8;
ALTER TABLE {{change_table}} ALTER COLUMN txid SET DEFAULT pg_catalog.pg_current_xact_id();
ALTER TABLE {{change_table}} ADD COLUMN IF NOT EXISTS created_at timestamptz;
ALTER TABLE {{change_table}} ALTER COLUMN created_at SET DEFAULT pg_catalog.clock_timestamp();
-- For an UPDATE that changed the row's key: the old key (descripcion has the new row).
ALTER TABLE {{change_table}} ADD COLUMN IF NOT EXISTS old_key jsonb;
CREATE INDEX IF NOT EXISTS {{txid_index}} ON {{change_table}} (txid);

CREATE TABLE IF NOT EXISTS {{dead_table}} (
    id          bigint NOT NULL,
    target_node text NOT NULL,
    metodo      text,
    tabla       text,
    descripcion text,
    origin_node text,
    txid        xid8,
    created_at  timestamptz,
    old_key     jsonb,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    PRIMARY KEY (id, target_node)
);

-- Closed to PUBLIC even where ALTER DEFAULT PRIVILEGES opened new tables to it: a row forged
-- here would be applied on every peer with walbridge's rights. Application roles log their
-- changes through the SECURITY DEFINER capture functions (sql/trigger_capture.sql).
REVOKE ALL ON {{change_table}}, {{dead_table}} FROM PUBLIC;

CREATE OR REPLACE TRIGGER walbridge_notify AFTER INSERT ON {{change_table}}
    FOR EACH STATEMENT EXECUTE FUNCTION walbridge.notify_changes({{channel}});
