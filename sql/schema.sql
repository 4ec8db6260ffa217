-- walbridge's own objects, created by `walbridge setup` on every node (both modes).
-- Idempotent: safe to run again; `walbridge teardown` runs sql/uninstall.sql.
-- Nothing here is ever replicated: walbridge excludes its own schema whatever the patterns say.

CREATE SCHEMA IF NOT EXISTS walbridge;
COMMENT ON SCHEMA walbridge IS 'walbridge replication bookkeeping; see https://github.com/walbridge/walbridge';
-- Any role may look names up here (to call walbridge.skip_session()); every table and every
-- other function stays closed to PUBLIC, so no role can write walbridge's bookkeeping.
--
-- Privileges, in short: every function pins search_path = pg_catalog, pg_temp and has EXECUTE
-- revoked from PUBLIC, except skip_session(). Triggers fire without EXECUTE, so application
-- roles write replicated tables as before but cannot attach walbridge's trigger functions to
-- tables of their own (with arguments of their choosing). The SECURITY DEFINER functions are
-- the narrow pieces that write what application roles may not: skip_session() (a replication
-- origin), record_tombstones() and trigger mode's capture functions (rows of walbridge's
-- tables). They never run code a user wrote: no unqualified name, and rows become JSON
-- through walbridge.row_jsonb / walbridge.json_value_sql, which never call a user's cast.
-- When setup runs as a superuser it makes them owned by NOLOGIN roles with just the rights
-- they need (sql/definer_roles.sql).
GRANT USAGE ON SCHEMA walbridge TO PUBLIC;

-- Settings `setup` records for the functions below (the skip origin's name, the node's name).
CREATE TABLE IF NOT EXISTS walbridge.settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);
-- Tables are closed to PUBLIC even where ALTER DEFAULT PRIVILEGES opened new ones to it.
REVOKE ALL ON walbridge.settings FROM PUBLIC;

-- A user session opts out of replication for its own writes (a maintenance backfill, say):
--   SELECT walbridge.skip_session();
-- Stream mode: the session gets a local-only replication origin, so decoding drops its changes.
-- Trigger mode: the change-logging trigger sees walbridge.skip = on and logs nothing.
-- SECURITY DEFINER because setting up a replication origin needs a right ordinary roles lack;
-- it only ever sets up the skip origin named in walbridge.settings (which no ordinary role can
-- write), takes no argument and calls nothing by an unqualified name, so a caller can neither
-- pick another origin (and pass its writes off as a peer's) nor move any origin's progress.
CREATE OR REPLACE FUNCTION walbridge.skip_session() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    origin text;
BEGIN
    PERFORM pg_catalog.set_config('walbridge.skip', 'on', false);
    SELECT s.value INTO origin FROM walbridge.settings s WHERE s.name = 'skip_origin';
    -- No skip origin (trigger mode set up without a superuser): walbridge.skip is all it takes.
    IF origin IS NULL OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin o
                                      WHERE o.roname OPERATOR(pg_catalog.=) origin) THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p
                    WHERE p.pronamespace OPERATOR(pg_catalog.=) 'pg_catalog'::regnamespace
                      AND p.proname OPERATOR(pg_catalog.=) 'pg_replication_origin_session_setup'
                      AND pg_catalog.has_function_privilege(p.oid, 'EXECUTE')) THEN
        RAISE EXCEPTION 'walbridge.skip_session(): the owner of this function may not set up replication origins'
            USING HINT = 'run walbridge setup as a superuser once';
    END IF;
    IF pg_catalog.pg_replication_origin_session_is_setup() IS NOT TRUE THEN
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
-- columns existed (every writer records them now: the careful path, the set-based
-- last-write-wins statements and trigger mode).
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS policy          text;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS local_writer    text;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS local_tombstone boolean;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS row_equals_old  boolean;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS complete_row    boolean;
-- A last-write-wins decision made by a commit-time difference smaller than the clock skew
-- walbridge measured between the two writers: the order of the writes is not certain.
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS ambiguous       boolean NOT NULL DEFAULT false;
-- Where the change came from and the policy version, so replay is exact:
--   source_lsn        stream mode: the LSN of the source transaction's commit record (the
--                     commit LSN pgoutput sends; the target's origin progress records the end
--                     of that record; with wal2json, the LSN of its begin message). NULL where
--                     the plugin does not say (wal2json without include-lsn), in trigger mode.
--   source_change_id  trigger mode: the id of the source's change-table row (the cursor).
--   priority          the node order ties and node_priority used: replication.priority as
--                     configured, then the unlisted nodes by name.
-- Row versions are kept whole up to replication.conflict_max_row_bytes of JSON text; a larger
-- one is kept cut (walbridge.journal_row) and flagged *_row_truncated.
-- remote_unsent: columns the source did not send (unchanged TOASTed values of an UPDATE);
-- remote_row holds the target row's value for them (what the update keeps; the key matched),
-- or leaves them out when the target had no row.
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS source_lsn           pg_lsn;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS source_change_id     bigint;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS priority             text[];
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS local_row_truncated  boolean NOT NULL DEFAULT false;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS remote_row_truncated boolean NOT NULL DEFAULT false;
ALTER TABLE walbridge.conflicts ADD COLUMN IF NOT EXISTS remote_unsent        text[];
REVOKE ALL ON walbridge.conflicts FROM PUBLIC;
REVOKE ALL ON SEQUENCE walbridge.conflicts_id_seq FROM PUBLIC;

-- A row version as walbridge.conflicts keeps it: whole when its JSON text is at most
-- max_bytes; else every column stays, each value (as text) cut to an equal share of max_bytes,
-- so the version stays within about max_bytes and still shows how every value begins.
CREATE OR REPLACE FUNCTION walbridge.journal_row(r jsonb, max_bytes integer)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    share  integer;
    e      record;
    t      text;
    result jsonb := '{}';
BEGIN
    IF r IS NULL OR max_bytes IS NULL OR pg_catalog.octet_length(r::text) <= max_bytes THEN
        RETURN r;
    END IF;
    IF pg_catalog.jsonb_typeof(r) <> 'object' THEN
        RETURN pg_catalog.to_jsonb(pg_catalog.left(r::text, max_bytes / 4));
    END IF;
    SELECT GREATEST(max_bytes / GREATEST(pg_catalog.count(*), 1)::integer
                               - pg_catalog.max(pg_catalog.octet_length(k)) - 8, 16)
      INTO share FROM pg_catalog.jsonb_object_keys(r) AS k;
    FOR e IN SELECT j.key, j.value FROM pg_catalog.jsonb_each(r) AS j LOOP
        IF pg_catalog.octet_length(e.value::text) <= share THEN
            result := result || pg_catalog.jsonb_build_object(e.key, e.value);
            CONTINUE;
        END IF;
        t := CASE pg_catalog.jsonb_typeof(e.value) WHEN 'string' THEN e.value #>> '{}'
                                                   ELSE e.value::text END;
        t := pg_catalog.left(t, share);
        -- Multi-byte characters and escapes take more than a byte each: cut again.
        WHILE pg_catalog.octet_length(pg_catalog.to_jsonb(t)::text) > share LOOP
            t := pg_catalog.left(t, pg_catalog.length(t)
                 - (pg_catalog.octet_length(pg_catalog.to_jsonb(t)::text) - share));
        END LOOP;
        result := result || pg_catalog.jsonb_build_object(e.key, t);
    END LOOP;
    RETURN result;
END
$$;
REVOKE ALL ON FUNCTION walbridge.journal_row(jsonb, integer) FROM PUBLIC;

-- Deleted keys, so a late update or insert from another node does not resurrect a row that was
-- deleted after it was written (last-write-wins needs the time of the delete). The deleting
-- transaction's commit time and origin are those of the tombstone row's xmin.
CREATE TABLE IF NOT EXISTS walbridge.tombstones (
    relid oid   NOT NULL,
    key   jsonb NOT NULL,
    PRIMARY KEY (relid, key)
);
REVOKE ALL ON walbridge.tombstones FROM PUBLIC;

-- A row as JSON without running code a user wrote. to_jsonb and jsonb_build_array call a
-- user-defined cast to json for any type created after initdb (an enum, a domain over one, a
-- composite or array holding one): in a SECURITY DEFINER function, or in walbridge's own
-- sessions, such a cast would run with walbridge's rights. So a column whose type was created
-- after initdb (oid >= 16384: enums, domains, composites, extension types, arrays of them)
-- becomes its text form through the type's output function (pg_catalog.format('%s', ...)),
-- which a user cannot replace (a new base type needs C functions, so a superuser); every
-- other column keeps its JSON form. The peer reads a text form back through the column
-- type's input function (jsonb_populate_record does that for a JSON string). walbridge's generated SQL uses the same rule
-- (catalog::json_value), so keys written here compare equal to keys built by the apply side.
--
-- json_value_sql: the SQL expression for column `col` of `rel`, written as `expr`.
CREATE OR REPLACE FUNCTION walbridge.json_value_sql(rel oid, col name, expr text)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (
                SELECT 1 FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid OPERATOR(pg_catalog.=) rel
                   AND a.attname OPERATOR(pg_catalog.=) col
                   AND a.atttypid OPERATOR(pg_catalog.>=) 16384::oid)
           THEN pg_catalog.format(
                'CASE WHEN pg_catalog.num_nulls(%1$s) OPERATOR(pg_catalog.=) 0 '
                'THEN pg_catalog.format(''%%s'', %1$s) END', expr)
           ELSE expr END
$$;
REVOKE ALL ON FUNCTION walbridge.json_value_sql(oid, name, text) FROM PUBLIC;

-- row_jsonb: row `r` of relation `rel` as a JSON object, by the rule above (to_jsonb itself
-- when no column needs its text form). Callers on a hot path (the capture trigger) make the
-- cheap check themselves and call this only for a table that has such a column.
CREATE OR REPLACE FUNCTION walbridge.row_jsonb(rel oid, r anyelement)
RETURNS jsonb LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    expr   text;
    result jsonb;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_attribute a
         WHERE a.attrelid OPERATOR(pg_catalog.=) rel
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
           AND a.atttypid OPERATOR(pg_catalog.>=) 16384::oid) THEN
        RETURN pg_catalog.to_jsonb(r);
    END IF;
    -- jsonb_build_object takes at most 100 arguments: objects of 40 columns, concatenated.
    SELECT pg_catalog.string_agg(part, ' OPERATOR(pg_catalog.||) ' ORDER BY grp) INTO expr
      FROM (SELECT grp, pg_catalog.format('pg_catalog.jsonb_build_object(%s)',
                       pg_catalog.string_agg(pg_catalog.format(
                           CASE WHEN atttypid OPERATOR(pg_catalog.>=) 16384::oid
                                THEN '%1$L, CASE WHEN pg_catalog.num_nulls(($1).%1$I) '
                                     'OPERATOR(pg_catalog.=) 0 '
                                     'THEN pg_catalog.format(''%%s'', ($1).%1$I) END'
                                ELSE '%1$L, ($1).%1$I' END, attname),
                           ', ' ORDER BY attnum)) AS part
              FROM (SELECT a.attname, a.attnum, a.atttypid,
                           (pg_catalog.row_number() OVER (ORDER BY a.attnum) OPERATOR(pg_catalog.-) 1)
                               OPERATOR(pg_catalog./) 40 AS grp
                      FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid OPERATOR(pg_catalog.=) rel
                       AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped) c
             GROUP BY grp) g;
    EXECUTE 'SELECT ' OPERATOR(pg_catalog.||) expr INTO result USING r;
    RETURN result;
END
$$;
REVOKE ALL ON FUNCTION walbridge.row_jsonb(oid, anyelement) FROM PUBLIC;

-- Statement-level AFTER DELETE trigger body; the trigger's arguments are the key columns.
-- SECURITY DEFINER: deleting roles may not write walbridge.tombstones themselves (they could
-- forge tombstones). Only setup can attach it (EXECUTE is not granted), and it runs no code a
-- user wrote (keys become JSON through json_value_sql).
CREATE OR REPLACE FUNCTION walbridge.record_tombstones() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key_expr text;
BEGIN
    IF TG_NARGS OPERATOR(pg_catalog.=) 0 THEN
        RETURN NULL;
    END IF;
    SELECT pg_catalog.string_agg(
               walbridge.json_value_sql(TG_RELID, a::name, pg_catalog.format('%I', a)), ', ')
      INTO key_expr FROM pg_catalog.unnest(TG_ARGV) AS a;
    EXECUTE pg_catalog.format(
        'INSERT INTO walbridge.tombstones (relid, key) '
        'SELECT %s, pg_catalog.jsonb_build_array(%s) FROM walbridge_deleted_rows '
        'ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key',
        TG_RELID, key_expr);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION walbridge.record_tombstones() FROM PUBLIC;

-- Last statement of every transaction walbridge applies in stream mode. It refuses to commit
-- unless this session's origin progress is exactly where the previous transaction of the
-- pipeline left it, so when one pipelined transaction fails, every later one fails too instead
-- of committing out of order; then it stamps the transaction with the source's end LSN and
-- commit time, which commit atomically with the data as the origin's progress.
CREATE OR REPLACE FUNCTION walbridge.apply_finish(expected pg_lsn, end_lsn pg_lsn, commit_time timestamptz)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
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
REVOKE ALL ON FUNCTION walbridge.apply_finish(pg_lsn, pg_lsn, timestamptz) FROM PUBLIC;

-- The optimistic apply path asks "did exactly the expected rows change?"; anything else is a
-- possible conflict, which aborts this transaction so walbridge can resolve it carefully.
CREATE OR REPLACE FUNCTION walbridge.expect_rows(actual bigint, expected bigint)
RETURNS void LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF actual IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'walbridge: % rows changed, % expected', actual, expected
            USING ERRCODE = 'WB001';
    END IF;
END
$$;
REVOKE ALL ON FUNCTION walbridge.expect_rows(bigint, bigint) FROM PUBLIC;

-- Guards plain multi-row INSERTs of a table that had no delete tombstones when walbridge last
-- looked: if one has appeared since, the transaction must take the per-row check instead.
-- The error names the table in its structured SCHEMA and TABLE fields, which the applier reads.
CREATE OR REPLACE FUNCTION walbridge.expect_no_tombstones(rel oid)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    nsp text;
    tab text;
BEGIN
    IF EXISTS (SELECT 1 FROM walbridge.tombstones t WHERE t.relid OPERATOR(pg_catalog.=) rel) THEN
        SELECT n.nspname, c.relname INTO nsp, tab
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.oid OPERATOR(pg_catalog.=) rel;
        RAISE EXCEPTION 'walbridge: relation % has tombstones', rel
            USING ERRCODE = 'WB003', SCHEMA = COALESCE(nsp, ''), TABLE = COALESCE(tab, '');
    END IF;
END
$$;
REVOKE ALL ON FUNCTION walbridge.expect_no_tombstones(oid) FROM PUBLIC;

-- node_priority's guard. That policy orders row versions by the writer's priority first, so
-- a node's own statement that replaces a version written by a node that outranks it would be
-- discarded by every peer and kept by this node alone. The guard discards it here too: a
-- BEFORE ROW trigger on node_priority tables that returns NULL (the row is left as it is) for
-- an UPDATE or DELETE of a row last written by a node that outranks this one, and for an
-- INSERT of a missing key whose deletion such a node wrote (its tombstone). walbridge's own
-- apply sessions (walbridge.skip = on, or session_replication_role = replica) are not guarded.
-- Arguments: this node's rank, the slot prefix, the ranks by node name (jsonb), the key
-- columns.
--
-- origin_writer / tombstone_writer: the name of the replication origin that wrote a version
-- ('' for this node, NULL for no tombstone). SECURITY DEFINER because pg_replication_origin
-- and walbridge.tombstones are not readable by the roles that write the tables; they return
-- origin names only, and EXECUTE is granted to PUBLIC since any writer of a guarded table
-- calls them.
CREATE OR REPLACE FUNCTION walbridge.origin_writer(ro oid) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce((SELECT o.roname FROM pg_catalog.pg_replication_origin o
                      WHERE o.roident OPERATOR(pg_catalog.=) ro), '')
$$;
REVOKE ALL ON FUNCTION walbridge.origin_writer(oid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION walbridge.origin_writer(oid) TO PUBLIC;

-- tombstone_writer: of the tombstone of row `r`'s key (columns `keys`), built as
-- record_tombstones builds it (no code a user wrote runs). `r` must be a row of `rel`: the
-- key's JSON form is chosen by `rel`'s column types, so a caller's row of another type (an
-- enum of hers where `rel` has an integer) would run her cast to json with this function's
-- rights.
CREATE OR REPLACE FUNCTION walbridge.tombstone_writer(rel oid, r anyelement, keys text[])
RETURNS text LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    key_expr text;
    k        jsonb;
BEGIN
    IF (SELECT c.reltype FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) rel)
       IS DISTINCT FROM pg_catalog.pg_typeof(r)::oid THEN
        RAISE EXCEPTION 'walbridge.tombstone_writer(): % is not a row of %',
            pg_catalog.pg_typeof(r), rel::regclass;
    END IF;
    SELECT pg_catalog.string_agg(
               walbridge.json_value_sql(rel, a::name, pg_catalog.format('($1).%I', a)), ', ')
      INTO key_expr FROM pg_catalog.unnest(keys) AS a;
    EXECUTE 'SELECT pg_catalog.jsonb_build_array(' OPERATOR(pg_catalog.||) key_expr
        OPERATOR(pg_catalog.||) ')' INTO k USING r;
    RETURN (SELECT walbridge.origin_writer(
                       (pg_catalog.pg_xact_commit_timestamp_origin(tb.xmin)).roident)
              FROM walbridge.tombstones tb
             WHERE tb.relid OPERATOR(pg_catalog.=) rel AND tb.key OPERATOR(pg_catalog.=) k);
END
$$;
REVOKE ALL ON FUNCTION walbridge.tombstone_writer(oid, anyelement, text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION walbridge.tombstone_writer(oid, anyelement, text[]) TO PUBLIC;

-- SECURITY INVOKER: it reads the guarded table's row as the role writing it.
CREATE OR REPLACE FUNCTION walbridge.priority_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    my_rank  int   := TG_ARGV[0]::int;
    prefix   text  := TG_ARGV[1];
    ranks    jsonb := TG_ARGV[2]::jsonb;
    keys     text[] := TG_ARGV[3:];
    probe    text;
    ro       oid;
    present  boolean;
    writer   text;
    node     text;
BEGIN
    IF pg_catalog.current_setting('walbridge.skip', true) IS NOT DISTINCT FROM 'on' THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('t.%1$I = ($1).%1$I', a), ' AND ')
      INTO probe FROM pg_catalog.unnest(keys) AS a;
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        -- A missing key has no row lock: take turns with walbridge's appliers (as they do
        -- with each other), so a deletion being applied cannot slip past this check.
        PERFORM pg_catalog.pg_advisory_xact_lock(2003985009, 1);
        EXECUTE pg_catalog.format('SELECT true FROM %s t WHERE %s', TG_RELID::regclass, probe)
           INTO present USING NEW;
        IF present THEN
            RETURN NEW;  -- ON CONFLICT DO UPDATE: the UPDATE is guarded as one
        END IF;
        writer := walbridge.tombstone_writer(TG_RELID, NEW, keys);
    ELSE
        EXECUTE pg_catalog.format(
            'SELECT (pg_catalog.pg_xact_commit_timestamp_origin(t.xmin)).roident FROM %s t WHERE %s',
            TG_RELID::regclass, probe) INTO ro USING OLD;
        IF ro IS NOT NULL THEN
            writer := walbridge.origin_writer(ro);
        END IF;
    END IF;
    node := CASE
        WHEN pg_catalog.starts_with(writer, prefix OPERATOR(pg_catalog.||) '_from_')
        THEN pg_catalog.substr(writer, pg_catalog.length(prefix) OPERATOR(pg_catalog.+) 7)
        WHEN pg_catalog.starts_with(writer, prefix OPERATOR(pg_catalog.||) '_copy_')
        THEN pg_catalog.regexp_replace(
                 pg_catalog.substr(writer, pg_catalog.length(prefix) OPERATOR(pg_catalog.+) 7),
                 '_[0-9]+$', '')
        END;
    IF (ranks OPERATOR(pg_catalog.->>) node)::int OPERATOR(pg_catalog.<) my_rank THEN
        RETURN NULL;
    END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION walbridge.priority_guard() FROM PUBLIC;
