-- walbridge's replicated schema changes, created by `walbridge setup` on every node.
-- Idempotent: safe to run again.
--
--   SELECT walbridge.ddl('ALTER TABLE public.items ADD COLUMN note text DEFAULT ''''');
--
-- runs the statement here, in the caller's transaction and with the caller's rights, then
-- records it in the change stream at that point (stream mode: a transactional logical message
-- with prefix '<slot_prefix>_ddl'; trigger mode: a change-table row with metodo = 'DDL'). Every peer's applier runs the same statement at the same
-- point of the stream, inside the transaction that applies the caller's, under walbridge's
-- replication origin (so it never travels on): a `CREATE TABLE` and rows written into it later
-- in the same transaction, or in later ones, arrive in that order everywhere. Plain DDL outside
-- walbridge.ddl() is not replicated.
--
-- Name lookup. The statement runs with the caller's search_path, on this node and, recorded
-- with the statement, on every peer (set for that statement only). On a peer "$user" means
-- walbridge's role, so schema-qualify names ("public.items") and nothing depends on it.
--
-- New tables. After the statement, walbridge.join_tables() adds every table that matches
-- replication.tables (as setup recorded it in walbridge.settings) and is not yet replicated to
-- the publication, and (re)creates its delete-tombstone trigger: on this node and, since the
-- peers run the same function after the same statement, on every peer, in the same
-- transaction. So a new table joins without a restart.
--
-- Rights. Every function here is SECURITY INVOKER with EXECUTE revoked from PUBLIC: the caller
-- needs the rights the statement needs, and to join a table the rights setup has (owner of the
-- publication, SELECT on walbridge.settings); in practice the role that runs walbridge setup,
-- or a role it grants them to. Each pins search_path = pg_catalog, pg_temp for its own lookups,
-- except walbridge.ddl() itself (below).

-- The replicated tables as `walbridge setup` recorded them: does `sch`.`tab` match?
-- walbridge.settings holds 'tables_include' and 'tables_exclude' (JSON arrays of
-- [schema LIKE pattern, table LIKE pattern], the configuration's globs) and 'tables_reserved'
-- (walbridge's own tables outside its schema, [schema, table]).
CREATE OR REPLACE FUNCTION walbridge.is_replicated(sch name, tab name) RETURNS boolean
LANGUAGE sql STABLE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
    -- The lists that name the table: include and exclude by pattern, reserved exactly.
    WITH naming AS (
        SELECT s.name
          FROM walbridge.settings s,
               pg_catalog.jsonb_array_elements(s.value::jsonb) AS p(v)
         WHERE s.name OPERATOR(pg_catalog.=)
                   ANY ('{tables_include,tables_exclude,tables_reserved}'::text[])
           AND CASE WHEN s.name OPERATOR(pg_catalog.=) 'tables_reserved'
                    THEN sch::text OPERATOR(pg_catalog.=) (p.v OPERATOR(pg_catalog.->>) 0)
                     AND tab::text OPERATOR(pg_catalog.=) (p.v OPERATOR(pg_catalog.->>) 1)
                    ELSE sch::text OPERATOR(pg_catalog.~~) (p.v OPERATOR(pg_catalog.->>) 0)
                     AND tab::text OPERATOR(pg_catalog.~~) (p.v OPERATOR(pg_catalog.->>) 1)
               END)
    SELECT sch OPERATOR(pg_catalog.<>) 'walbridge'
       AND EXISTS (SELECT 1 FROM naming n
                    WHERE n.name OPERATOR(pg_catalog.=) 'tables_include')
       AND NOT EXISTS (SELECT 1 FROM naming n
                        WHERE n.name OPERATOR(pg_catalog.<>) 'tables_include')
$$;
REVOKE ALL ON FUNCTION walbridge.is_replicated(name, name) FROM PUBLIC;

-- Brings every replicated table (roots of partition trees) into replication on this node: the
-- publication '<slot_prefix>_pub' (stream mode), the capture triggers (trigger mode; renewed
-- when the table or its key was renamed) and the delete-tombstone trigger, whose
-- arguments are the table's unique key columns (primary key, else the replica identity index),
-- renewed when they changed (a renamed key column). Tables already in are left alone.
CREATE OR REPLACE FUNCTION walbridge.join_tables() RETURNS void
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pub  text;
    mode text;
    node text;
    args text;
    ranges text;
    joined boolean;
    seq  regclass;
    t    record;
    want bytea;
    have bytea;
BEGIN
    SELECT s.value INTO mode FROM walbridge.settings s
     WHERE s.name OPERATOR(pg_catalog.=) 'capture_mode';
    SELECT s.value INTO node FROM walbridge.settings s
     WHERE s.name OPERATOR(pg_catalog.=) 'node_name';
    SELECT s.value OPERATOR(pg_catalog.||) '_pub' INTO pub
      FROM walbridge.settings s WHERE s.name OPERATOR(pg_catalog.=) 'slot_prefix';
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication p
                    WHERE p.pubname OPERATOR(pg_catalog.=) pub) THEN
        pub := NULL;
    END IF;
    SELECT s.value INTO ranges FROM walbridge.settings s
     WHERE s.name OPERATOR(pg_catalog.=) 'sequence_ranges';
    FOR t IN
        SELECT c.oid, n.nspname, c.relname,
               COALESCE(
                   (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
                      FROM pg_catalog.pg_index i
                     CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                      JOIN pg_catalog.pg_attribute a
                        ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
                       AND a.attnum OPERATOR(pg_catalog.=) k.attnum
                     WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisprimary),
                   (SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
                      FROM pg_catalog.pg_index i
                     CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                      JOIN pg_catalog.pg_attribute a
                        ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
                       AND a.attnum OPERATOR(pg_catalog.=) k.attnum
                     WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisreplident)) AS key
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::"char"[])
           AND NOT c.relispartition
           AND n.nspname OPERATOR(pg_catalog.<>) ALL ('{pg_catalog,information_schema,pg_toast}'::name[])
           AND walbridge.is_replicated(n.nspname, c.relname)
    LOOP
        joined := false;
        IF pub IS NOT NULL AND NOT EXISTS (
               SELECT 1 FROM pg_catalog.pg_publication_rel r
                 JOIN pg_catalog.pg_publication p ON p.oid OPERATOR(pg_catalog.=) r.prpubid
                WHERE p.pubname OPERATOR(pg_catalog.=) pub
                  AND r.prrelid OPERATOR(pg_catalog.=) t.oid) THEN
            EXECUTE pg_catalog.format('ALTER PUBLICATION %I ADD TABLE %I.%I',
                                      pub, t.nspname, t.relname);
            joined := true;
        END IF;
        -- Trigger mode: the capture triggers a table gets from setup (the key of a table
        -- without one is the whole row, as setup does), created when it has none and renewed
        -- when their arguments no longer name it as it is now: a renamed table (its change
        -- rows would name the old name) or a renamed or changed key.
        IF mode OPERATOR(pg_catalog.=) 'trigger' THEN
            SELECT pg_catalog.decode(pg_catalog.string_agg(
                       pg_catalog.encode(pg_catalog.convert_to(a, 'UTF8'), 'hex')
                       OPERATOR(pg_catalog.||) '00', '' ORDER BY o), 'hex')
              INTO want
              FROM pg_catalog.unnest(ARRAY[node, t.nspname::text OPERATOR(pg_catalog.||) '.'
                                                 OPERATOR(pg_catalog.||) t.relname::text]
                                     OPERATOR(pg_catalog.||) COALESCE(t.key, '{}'::text[]))
                   WITH ORDINALITY AS u(a, o);
            have := NULL;
            SELECT tg.tgargs INTO have FROM pg_catalog.pg_trigger tg
             WHERE tg.tgrelid OPERATOR(pg_catalog.=) t.oid
               AND tg.tgname OPERATOR(pg_catalog.=) 'walbridge_capture'
               AND tg.tgparentid OPERATOR(pg_catalog.=) 0;
            IF NOT FOUND THEN
                joined := true;
            END IF;
            IF have IS DISTINCT FROM want THEN
                args := pg_catalog.concat_ws(', ', pg_catalog.quote_literal(node),
                            pg_catalog.quote_literal(t.nspname OPERATOR(pg_catalog.||) '.'
                                                     OPERATOR(pg_catalog.||) t.relname),
                            (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(k), ', ' ORDER BY o)
                               FROM pg_catalog.unnest(t.key) WITH ORDINALITY AS u(k, o)));
                EXECUTE pg_catalog.format(
                    'CREATE OR REPLACE TRIGGER walbridge_capture AFTER INSERT OR UPDATE OR DELETE ON %I.%I '
                    'FOR EACH ROW EXECUTE FUNCTION walbridge.capture(%s); '
                    'CREATE OR REPLACE TRIGGER walbridge_capture_truncate AFTER TRUNCATE ON %I.%I '
                    'FOR EACH STATEMENT EXECUTE FUNCTION walbridge.capture_truncate(%s)',
                    t.nspname, t.relname, args, t.nspname, t.relname, args);
            END IF;
        END IF;
        -- replication.sequence_ranges: a joining table's sequences step by the node count
        -- from this node's residue ("<nodes>:<residue>"), as setup gives existing ones; only
        -- a sequence never used yet (a table just created), else setup must place it.
        IF joined AND ranges IS NOT NULL AND ranges OPERATOR(pg_catalog.<>) '' THEN
            FOR seq IN
                SELECT s.oid::regclass FROM pg_catalog.pg_depend d
                  JOIN pg_catalog.pg_class s ON s.oid OPERATOR(pg_catalog.=) d.objid
                 WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::regclass
                   AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::regclass
                   AND d.refobjid OPERATOR(pg_catalog.=) t.oid
                   AND d.deptype OPERATOR(pg_catalog.=) ANY ('{a,i}'::"char"[])
                   AND s.relkind OPERATOR(pg_catalog.=) 'S'
            LOOP
                CONTINUE WHEN pg_catalog.pg_sequence_last_value(seq) IS NOT NULL;
                EXECUTE pg_catalog.format(
                    'ALTER SEQUENCE %s INCREMENT BY %s START WITH %s RESTART WITH %s',
                    seq, pg_catalog.split_part(ranges, ':', 1),
                    pg_catalog.split_part(ranges, ':', 2), pg_catalog.split_part(ranges, ':', 2));
            END LOOP;
        END IF;
        CONTINUE WHEN t.key IS NULL;
        -- pg_trigger.tgargs: each argument followed by a zero byte.
        SELECT pg_catalog.decode(pg_catalog.string_agg(
                   pg_catalog.encode(pg_catalog.convert_to(k, 'UTF8'), 'hex')
                   OPERATOR(pg_catalog.||) '00', '' ORDER BY o), 'hex')
          INTO want FROM pg_catalog.unnest(t.key) WITH ORDINALITY AS u(k, o);
        SELECT tg.tgargs INTO have FROM pg_catalog.pg_trigger tg
         WHERE tg.tgrelid OPERATOR(pg_catalog.=) t.oid
           AND tg.tgname OPERATOR(pg_catalog.=) 'walbridge_tombstones'
           AND tg.tgparentid OPERATOR(pg_catalog.=) 0;
        IF have IS DISTINCT FROM want THEN
            EXECUTE pg_catalog.format(
                'CREATE OR REPLACE TRIGGER walbridge_tombstones AFTER DELETE ON %I.%I '
                'REFERENCING OLD TABLE AS walbridge_deleted_rows FOR EACH STATEMENT '
                'EXECUTE FUNCTION walbridge.record_tombstones(%s); '
                'ALTER TABLE %I.%I ENABLE ALWAYS TRIGGER walbridge_tombstones',
                t.nspname, t.relname,
                (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(k), ', ' ORDER BY o)
                   FROM pg_catalog.unnest(t.key) WITH ORDINALITY AS u(k, o)),
                t.nspname, t.relname);
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION walbridge.join_tables() FROM PUBLIC;

-- Runs one schema change here: `statement` with search_path `path` (for that statement only),
-- then joins new tables. Peers' appliers call this for a replicated statement (never
-- walbridge.ddl(), which would record it again).
CREATE OR REPLACE FUNCTION walbridge.ddl_apply(path text, statement text) RETURNS void
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Local to this function: its SET clause restores the pinned path when it returns.
    PERFORM pg_catalog.set_config('search_path', path, true);
    EXECUTE statement;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    PERFORM walbridge.join_tables();
END
$$;
REVOKE ALL ON FUNCTION walbridge.ddl_apply(text, text) FROM PUBLIC;

-- walbridge.ddl()'s work, with the caller's search_path passed in.
CREATE OR REPLACE FUNCTION walbridge.ddl_replicate(path text, statement text) RETURNS void
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    mode         text;
    prefix       text;
    change_table text;
    node         text;
    payload      text;
BEGIN
    IF statement IS NULL OR pg_catalog.btrim(statement) OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'walbridge.ddl(): no statement given';
    END IF;
    payload := pg_catalog.jsonb_build_object('search_path', path, 'statement', statement)::text;
    SELECT s.value INTO mode FROM walbridge.settings s
     WHERE s.name OPERATOR(pg_catalog.=) 'capture_mode';
    IF mode OPERATOR(pg_catalog.=) 'trigger' THEN
        -- Trigger mode: a change row, ordered by id with the rows of the data changes.
        SELECT s.value INTO change_table FROM walbridge.settings s
         WHERE s.name OPERATOR(pg_catalog.=) 'change_table';
        SELECT s.value INTO node FROM walbridge.settings s
         WHERE s.name OPERATOR(pg_catalog.=) 'node_name';
        IF change_table IS NULL OR node IS NULL THEN
            RAISE EXCEPTION 'walbridge.ddl(): walbridge.settings has no change_table or node_name'
                USING HINT = 'run walbridge setup';
        END IF;
        PERFORM walbridge.ddl_apply(path, statement);
        -- Untyped literals: descripcion may be jsonb, json or text (the polling script's).
        EXECUTE pg_catalog.format(
            'INSERT INTO %s (metodo, tabla, descripcion, origin_node) VALUES (''DDL'', ''walbridge.ddl'', %L, %L)',
            change_table, payload, node);
        RETURN;
    END IF;
    SELECT s.value INTO prefix FROM walbridge.settings s
     WHERE s.name OPERATOR(pg_catalog.=) 'slot_prefix';
    IF prefix IS NULL THEN
        RAISE EXCEPTION 'walbridge.ddl(): walbridge.settings has no slot_prefix'
            USING HINT = 'run walbridge setup';
    END IF;
    PERFORM walbridge.ddl_apply(path, statement);
    PERFORM pg_catalog.pg_logical_emit_message(
        true, prefix OPERATOR(pg_catalog.||) '_ddl', payload);
END
$$;
REVOKE ALL ON FUNCTION walbridge.ddl_replicate(text, text) FROM PUBLIC;

-- The entry point. LANGUAGE sql without a SET clause, unlike every other walbridge function:
-- it must read the caller's search_path, which a SET clause would replace before the body
-- runs. It is safe unpinned because it names nothing unqualified: two schema-qualified
-- function calls, no operator.
CREATE OR REPLACE FUNCTION walbridge.ddl(statement text) RETURNS void
LANGUAGE sql SECURITY INVOKER AS $$
    SELECT walbridge.ddl_replicate(pg_catalog.current_setting('search_path'), statement)
$$;
REVOKE ALL ON FUNCTION walbridge.ddl(text) FROM PUBLIC;
