-- Owners for walbridge's SECURITY DEFINER functions: NOLOGIN roles with only the rights each
-- function needs, so that even a flaw in one of them could not lend a caller more than that.
-- Run by `walbridge setup` after sql/schema.sql when it connects as a superuser (creating
-- roles and granting on pg_catalog functions needs one); otherwise the functions stay owned by
-- the setup role. Idempotent. Roles are cluster-wide: several databases share them.
--
--   walbridge_skip     owns skip_session(): may set up a replication origin for its session
--                      and read walbridge.settings (the skip origin's name), nothing else.
--   walbridge_capture  owns record_tombstones() and trigger mode's capture functions: may
--                      write walbridge.tombstones, insert into the change table and ask
--                      whether its session has a replication origin.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'walbridge_skip') THEN
        CREATE ROLE walbridge_skip NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'walbridge_capture') THEN
        CREATE ROLE walbridge_capture NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE walbridge_skip IS 'walbridge: owner of walbridge.skip_session() (NOLOGIN)';
COMMENT ON ROLE walbridge_capture IS 'walbridge: owner of its change-logging triggers (NOLOGIN)';

GRANT USAGE ON SCHEMA walbridge TO walbridge_skip, walbridge_capture;

GRANT SELECT ON walbridge.settings TO walbridge_skip;
DO $$
DECLARE
    f regprocedure;
BEGIN
    -- Every signature the server has (newer versions may add overloads).
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pg_catalog'::regnamespace
                AND p.proname IN ('pg_replication_origin_session_setup',
                                  'pg_replication_origin_session_is_setup')
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO walbridge_skip', f);
    END LOOP;
    -- The capture functions log nothing for a session under a replication origin (a change
    -- walbridge applies): they only ask whether one is set up.
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'pg_catalog'::regnamespace
                AND p.proname = 'pg_replication_origin_session_is_setup'
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO walbridge_capture', f);
    END LOOP;
END
$$;
ALTER FUNCTION walbridge.skip_session() OWNER TO walbridge_skip;

GRANT SELECT, INSERT, UPDATE ON walbridge.tombstones TO walbridge_capture;
GRANT EXECUTE ON FUNCTION walbridge.json_value_sql(oid, name, text),
                          walbridge.row_jsonb(oid, anyelement)
   TO walbridge_capture;
ALTER FUNCTION walbridge.record_tombstones() OWNER TO walbridge_capture;

-- node_priority's guard (walbridge.priority_guard) asks who wrote a row version or a tombstone.
GRANT SELECT ON pg_catalog.pg_replication_origin TO walbridge_capture;
ALTER FUNCTION walbridge.origin_writer(oid) OWNER TO walbridge_capture;
ALTER FUNCTION walbridge.tombstone_writer(oid, anyelement, text[]) OWNER TO walbridge_capture;
