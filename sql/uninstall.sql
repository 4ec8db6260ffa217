-- Removes walbridge's objects from one node by hand (what `walbridge teardown` does), for a
-- node that walbridge can no longer reach with its configuration. User data is left alone.
-- Run it in the replicated database as a superuser. Slots first, so no WAL stays pinned.

-- Only built-in functions and operators: a function another role put on the caller's
-- search_path (public.format(text, name, regclass), say) would otherwise run as superuser.
SET search_path = pg_catalog, pg_temp;

SELECT pg_catalog.pg_terminate_backend(active_pid)
  FROM pg_catalog.pg_replication_slots
 WHERE slot_name LIKE 'walbridge\_%\_to\_%' AND active_pid IS NOT NULL;
SELECT pg_catalog.pg_drop_replication_slot(slot_name)
  FROM pg_catalog.pg_replication_slots
 WHERE slot_name LIKE 'walbridge\_%\_to\_%' AND database = pg_catalog.current_database();
SELECT pg_catalog.pg_replication_origin_drop(roname)
  FROM pg_catalog.pg_replication_origin
 WHERE roname LIKE 'walbridge\_from\_%' OR roname = 'walbridge_skip';
DROP PUBLICATION IF EXISTS walbridge_pub;

DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT tgrelid::regclass AS rel, tgname FROM pg_catalog.pg_trigger
              WHERE tgname IN ('walbridge_tombstones', 'walbridge_priority_guard', 'walbridge_capture',
                               'walbridge_capture_truncate', 'walbridge_notify')
                AND tgparentid = 0
    LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', t.tgname, t.rel);
    END LOOP;
END
$$;

-- Trigger mode: the change table (public.database_changes by default) and its _dead twin are
-- left alone here; drop them by hand once they hold nothing you need.
DROP SCHEMA IF EXISTS walbridge CASCADE;

-- The NOLOGIN owners of walbridge's functions (sql/definer_roles.sql), unless walbridge still
-- uses them in another database of the cluster. Only a superuser made them, so only a
-- superuser removes them. (`walbridge teardown` runs this part as it is.)
DO $$
DECLARE
    r text;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) current_user) THEN
        RAISE NOTICE 'not a superuser: roles walbridge_skip and walbridge_capture are left';
        RETURN;
    END IF;
    FOR r IN SELECT rolname FROM pg_catalog.pg_roles
              WHERE rolname IN ('walbridge_skip', 'walbridge_capture')
    LOOP
        EXECUTE pg_catalog.format('DROP OWNED BY %I', r);
        BEGIN
            EXECUTE pg_catalog.format('DROP ROLE %I', r);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            NULL;
        END;
    END LOOP;
END
$$;
