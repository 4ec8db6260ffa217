-- walbridge trigger mode: the change-logging functions, on a trigger-mode node.
-- A template: `walbridge setup` replaces {{change_table}} (quoted name), {{descripcion_type}}
-- (the type of its descripcion column: jsonb, json, text...) and {{origin_check}} (a test of
-- the session's replication origin, empty when the setup role may not call it).
--
-- Row trigger `walbridge_capture`, AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW, arguments:
--   TG_ARGV[0]  this node's name        -> origin_node
--   TG_ARGV[1]  schema.table (the root of a partitioned table) -> tabla
--   TG_ARGV[2:] the key columns (none: REPLICA IDENTITY FULL without a key, the whole row)
-- INSERT logs the new row; UPDATE the new row, plus the old key in old_key when the key
-- changed; DELETE the key. Nothing is logged for a session that set walbridge.skip = on
-- (walbridge's own apply sessions, walbridge.skip_session()) or that replays changes under a
-- replication origin (walbridge's stream-mode apply). The trigger is ENABLE (origin), so it
-- does not fire either in sessions with session_replication_role = replica.
--
-- SECURITY DEFINER: application roles get no privilege on the change table, so they cannot
-- forge change rows (a row there is applied on every peer with walbridge's rights). The
-- functions are safe to run with more rights than the writer because they run no code a user
-- wrote: rows become JSON through walbridge.row_jsonb (never a user's cast to json), every
-- name is qualified and search_path is pinned; and only setup can attach them to a table,
-- with its arguments (EXECUTE is not granted to anyone). When setup runs as a superuser they
-- are owned by the NOLOGIN role walbridge_capture, which may only insert into the change table
-- (sql/definer_roles.sql).

CREATE OR REPLACE FUNCTION walbridge.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_plain   boolean;
    v_new     jsonb;
    v_old     jsonb;
    v_key     jsonb;
    v_old_key jsonb;
BEGIN
    IF pg_catalog.current_setting('walbridge.skip', true) = 'on' {{origin_check}} THEN
        RETURN NULL;
    END IF;
    -- to_jsonb is safe when every column has a built-in type; otherwise walbridge.row_jsonb
    -- (sql/schema.sql) never lets a user's cast to json run here.
    v_plain := NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_attribute a
         WHERE a.attrelid OPERATOR(pg_catalog.=) TG_RELID
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
           AND a.atttypid OPERATOR(pg_catalog.>=) 16384::oid);
    IF TG_OP <> 'DELETE' THEN
        IF v_plain THEN
            v_new := pg_catalog.to_jsonb(NEW);
        ELSE
            v_new := walbridge.row_jsonb(TG_RELID, NEW);
        END IF;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        IF v_plain THEN
            v_old := pg_catalog.to_jsonb(OLD);
        ELSE
            v_old := walbridge.row_jsonb(TG_RELID, OLD);
        END IF;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {{change_table}} (metodo, tabla, descripcion, origin_node)
        VALUES ('INSERT', TG_ARGV[1], v_new::{{descripcion_type}}, TG_ARGV[0]);
    ELSIF TG_OP = 'UPDATE' THEN
        IF TG_NARGS > 2 THEN
            FOR i IN 2 .. TG_NARGS - 1 LOOP
                IF v_old -> TG_ARGV[i] IS DISTINCT FROM v_new -> TG_ARGV[i] THEN
                    SELECT pg_catalog.jsonb_object_agg(a, v_old -> a) INTO v_old_key
                      FROM pg_catalog.unnest(TG_ARGV[2:]) AS a;
                    EXIT;
                END IF;
            END LOOP;
        ELSIF v_old IS DISTINCT FROM v_new THEN
            v_old_key := v_old;
        END IF;
        INSERT INTO {{change_table}} (metodo, tabla, descripcion, origin_node, old_key)
        VALUES ('UPDATE', TG_ARGV[1], v_new::{{descripcion_type}}, TG_ARGV[0], v_old_key);
    ELSE
        IF TG_NARGS > 2 THEN
            SELECT pg_catalog.jsonb_object_agg(a, v_old -> a) INTO v_key
              FROM pg_catalog.unnest(TG_ARGV[2:]) AS a;
        ELSE
            v_key := v_old;
        END IF;
        INSERT INTO {{change_table}} (metodo, tabla, descripcion, origin_node)
        VALUES ('DELETE', TG_ARGV[1], v_key::{{descripcion_type}}, TG_ARGV[0]);
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION walbridge.capture() FROM PUBLIC;

-- Statement trigger `walbridge_capture_truncate`, AFTER TRUNCATE, same first two arguments.
CREATE OR REPLACE FUNCTION walbridge.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_catalog.current_setting('walbridge.skip', true) = 'on' {{origin_check}} THEN
        RETURN NULL;
    END IF;
    INSERT INTO {{change_table}} (metodo, tabla, descripcion, origin_node)
    VALUES ('TRUNCATE', TG_ARGV[1], '{}'::jsonb::{{descripcion_type}}, TG_ARGV[0]);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION walbridge.capture_truncate() FROM PUBLIC;
