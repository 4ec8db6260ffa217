-- walbridge's own objects, created by `walbridge setup` on every node (both modes).
-- Idempotent: safe to run again; `walbridge teardown` runs sql/uninstall.sql.
-- Nothing here is ever replicated: walbridge excludes its own schema whatever the patterns say.

CREATE SCHEMA IF NOT EXISTS walbridge;
COMMENT ON SCHEMA walbridge IS 'walbridge replication bookkeeping; see https://github.com/walbridge/walbridge';

-- Settings `setup` records for the functions below (the skip origin's name, the node's name).
CREATE TABLE IF NOT EXISTS walbridge.settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- A user session opts out of replication for its own writes (a maintenance backfill, say):
--   SELECT walbridge.skip_session();
-- Stream mode: the session gets a local-only replication origin, so decoding drops its changes.
-- Trigger mode: the change-logging trigger sees walbridge.skip = on and logs nothing.
CREATE OR REPLACE FUNCTION walbridge.skip_session() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    origin text;
BEGIN
    PERFORM pg_catalog.set_config('walbridge.skip', 'on', false);
    SELECT value INTO origin FROM walbridge.settings WHERE name = 'skip_origin';
    IF origin IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = origin)
       AND pg_catalog.pg_replication_origin_session_is_setup() IS NOT TRUE THEN
        PERFORM pg_catalog.pg_replication_origin_session_setup(origin);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION walbridge.skip_session() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION walbridge.skip_session() TO PUBLIC;

-- Every conflict walbridge resolved on this node, written in the same transaction as the
-- resolution. Old rows are removed after `replication.conflict_retention`.
CREATE TABLE IF NOT EXISTS walbridge.conflicts (
    id               bigserial PRIMARY KEY,
    resolved_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    source           text NOT NULL,
    target           text NOT NULL,
    table_name       text NOT NULL,
    key              jsonb NOT NULL,
    kind             text NOT NULL,
    resolution       text NOT NULL,
    local_row        jsonb,
    remote_row       jsonb,
    local_commit_ts  timestamptz,
    remote_commit_ts timestamptz
);
CREATE INDEX IF NOT EXISTS conflicts_resolved_at ON walbridge.conflicts (resolved_at);
-- The facts of the decision, so `walbridge conflicts replay` can recompute it under another
-- policy: the policy used, the node that wrote the local version, whether that version was a
-- delete tombstone (no row), whether the row equalled the change's old row (REPLICA IDENTITY
-- FULL), and whether the incoming row was complete. NULL in rows journaled before these
-- columns existed and in rows the set-based last-write-wins statements and trigger mode write.
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS policy          text;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS local_writer    text;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS local_tombstone boolean;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS row_equals_old  boolean;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS complete_row    boolean;
-- A last-write-wins decision made by a commit-time difference smaller than the clock skew
-- walbridge measured between the two writers: the order of the writes is not certain.
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS ambiguous       boolean NOT NULL DEFAULT false;

-- Deleted keys, so a late update or insert from another node does not resurrect a row that was
-- deleted after it was written (last-write-wins needs the time of the delete). The deleting
-- transaction's commit time and origin are those of the tombstone row's xmin.
CREATE TABLE IF NOT EXISTS walbridge.tombstones (
    relid oid   NOT NULL,
    key   jsonb NOT NULL,
    PRIMARY KEY (relid, key)
);

-- Statement-level AFTER DELETE trigger body; the trigger's arguments are the key columns.
CREATE OR REPLACE FUNCTION walbridge.record_tombstones() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    key_expr text;
BEGIN
    IF TG_NARGS = 0 THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(format('%I', a), ', ') INTO key_expr FROM unnest(TG_ARGV) AS a;
    EXECUTE format(
        'INSERT INTO walbridge.tombstones (relid, key) '
        'SELECT %s, jsonb_build_array(%s) FROM walbridge_deleted_rows '
        'ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key',
        TG_RELID, key_expr);
    RETURN NULL;
END
$$;

-- Last statement of every transaction walbridge applies in stream mode. It refuses to commit
-- unless this session's origin progress is exactly where the previous transaction of the
-- pipeline left it, so when one pipelined transaction fails, every later one fails too instead
-- of committing out of order; then it stamps the transaction with the source's end LSN and
-- commit time, which commit atomically with the data as the origin's progress.
CREATE OR REPLACE FUNCTION walbridge.apply_finish(expected pg_lsn, end_lsn pg_lsn, commit_time timestamptz)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    progress pg_lsn := pg_catalog.pg_replication_origin_session_progress(false);
BEGIN
    IF expected IS NOT NULL AND progress IS DISTINCT FROM expected
       AND NOT (expected = '0/0' AND progress IS NULL) THEN
        RAISE EXCEPTION 'walbridge: origin progress is %, expected %', progress, expected
            USING ERRCODE = 'WB002';
    END IF;
    PERFORM pg_catalog.pg_replication_origin_xact_setup(end_lsn, commit_time);
END
$$;

-- The optimistic apply path asks "did exactly the expected rows change?"; anything else is a
-- possible conflict, which aborts this transaction so walbridge can resolve it carefully.
CREATE OR REPLACE FUNCTION walbridge.expect_rows(actual bigint, expected bigint)
RETURNS void LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF actual IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'walbridge: % rows changed, % expected', actual, expected
            USING ERRCODE = 'WB001';
    END IF;
END
$$;

-- Guards plain multi-row INSERTs of a table that had no delete tombstones when walbridge last
-- looked: if one has appeared since, the transaction must take the per-row check instead.
CREATE OR REPLACE FUNCTION walbridge.expect_no_tombstones(rel oid)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM walbridge.tombstones WHERE relid = rel) THEN
        RAISE EXCEPTION 'walbridge: relation % has tombstones', rel
            USING ERRCODE = 'WB003';
    END IF;
END
$$;
