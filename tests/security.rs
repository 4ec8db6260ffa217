//! Privilege and injection: what an ordinary role (a table owner, a writer) can make
//! walbridge's sessions and functions do, on real clusters, as that role.

use std::process::{Command, Stdio};

use crate::support::*;

/// Runs SQL through `psql` as `user` (the test clusters trust loopback connections); the
/// output, or the error text when psql fails.
fn psql_as(c: &LocalCluster, user: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(c.client_tool("psql").expect("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &c.port().to_string(),
            "-U",
            user,
            "-d",
            "postgres",
            "-c",
            sql,
        ])
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ok_as(d: &Deployment, node: &str, user: &str, sql: &str) -> String {
    psql_as(d.node(node), user, sql).unwrap_or_else(|e| panic!("as {user} on {node}: {e}\n{sql}"))
}

/// `sql` fails as `user` with a privilege error.
fn denied_as(d: &Deployment, node: &str, user: &str, sql: &str) {
    match psql_as(d.node(node), user, sql) {
        Ok(out) => panic!("as {user} on {node}, `{sql}` succeeded: {out:?}"),
        Err(e) => assert!(e.contains("permission denied"), "`{sql}`: {e}"),
    }
}

/// An ordinary role `alice` (LOGIN, no other attribute) that may create objects in `public`,
/// and a canary table anyone may write, on every node.
const ROLES: &str = "CREATE ROLE alice LOGIN;
    GRANT CREATE ON SCHEMA public TO alice;
    CREATE TABLE public.canary (fired text, as_user text);
    GRANT INSERT, SELECT ON public.canary TO PUBLIC;";

fn stream_toml() -> String {
    "tables = [\"public.items\", \"public.pets\"]".to_string()
}

fn trigger_toml() -> String {
    format!(
        "mode = \"trigger\"\n{}\n\n[trigger]\npoll_interval = \"1s\"\n",
        stream_toml()
    )
}

// ---------------------------------------------------------------------------------------
// search_path: functions a user puts on the default path never run in walbridge's sessions
// ---------------------------------------------------------------------------------------

/// Functions in `public` that beat walbridge's built-ins in overload resolution under the
/// default `search_path` (an exact argument type wins over `anyelement` or `VARIADIC
/// "any"`), each writing to the canary as whoever runs it.
const SHADOWS: &str = "
    CREATE FUNCTION public.jsonb_build_array(integer) RETURNS jsonb LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.canary VALUES ('jsonb_build_array', current_user);
        RETURN pg_catalog.jsonb_build_array($1);
    END $$;
    CREATE FUNCTION public.to_jsonb(public.items) RETURNS jsonb LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.canary VALUES ('to_jsonb', current_user);
        RETURN pg_catalog.to_jsonb($1);
    END $$;
    CREATE FUNCTION public.jsonb_populate_record(public.items, jsonb) RETURNS public.items
    LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.canary VALUES ('jsonb_populate_record', current_user);
        RETURN pg_catalog.jsonb_populate_record($1, $2);
    END $$;
    CREATE FUNCTION public.format(text, text, text) RETURNS text LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.canary VALUES ('format', current_user);
        RETURN pg_catalog.format($1, $2, $3);
    END $$;";

fn shadowed_deployment(toml: &str) -> Deployment {
    alices_deployment(
        toml,
        &[
            "CREATE TABLE public.items (id int PRIMARY KEY, name text);
             CREATE TYPE public.mood AS ENUM ('calm', 'wild');
             CREATE TABLE public.pets (id int PRIMARY KEY, m public.mood)",
            SHADOWS,
        ],
    )
}

/// Two nodes with [`ROLES`], then `alice` runs each of `as_alice` on both (her objects).
fn alices_deployment(toml: &str, as_alice: &[&str]) -> Deployment {
    let d = Deployment::new(&["east", "west"], ROLES, toml);
    for node in ["east", "west"] {
        for sql in as_alice {
            ok_as(&d, node, "alice", sql);
        }
    }
    d
}

/// Writes that take the optimistic, tombstone-checked and careful (conflict) paths.
fn write_through_every_path(d: &Deployment) {
    d.sql("east", "INSERT INTO items VALUES (1, 'one'), (2, 'two')");
    d.wait_for("west", "SELECT count(*) FROM items", "2");
    d.sql("east", "DELETE FROM items WHERE id = 1");
    d.wait_for("west", "SELECT count(*) FROM items", "1");
    // A tombstone now exists on west: the next insert checks it.
    d.sql("east", "INSERT INTO items VALUES (3, 'three')");
    d.wait_for("west", "SELECT count(*) FROM items", "2");
    // insert_exists: the careful path reads the target row.
    d.sql("west", "INSERT INTO items VALUES (4, 'west')");
    d.wait_for("east", "SELECT count(*) FROM items WHERE id = 4", "1");
    d.sql("east", "UPDATE items SET name = 'east' WHERE id = 4");
    d.sql("west", "UPDATE items SET name = 'later' WHERE id = 4");
    d.wait_for("east", "SELECT name FROM items WHERE id = 4", "later");
    d.wait_for("west", "SELECT name FROM items WHERE id = 4", "later");
}

fn assert_no_canary(d: &Deployment, run: &Runner) {
    for node in ["east", "west"] {
        let fired = d.sql(node, "SELECT fired || ' as ' || as_user FROM public.canary");
        assert_eq!(
            fired,
            "",
            "walbridge ran a function from public on {node}; log:\n{}",
            run.log()
        );
    }
}

#[test]
fn functions_on_the_search_path_never_run_in_walbridge_sessions_stream() {
    let d = shadowed_deployment(&stream_toml());
    let run = d.setup_and_run();
    write_through_every_path(&d);
    d.walbridge_ok(&["verify"]);
    assert_no_canary(&d, &run);
}

#[test]
fn functions_on_the_search_path_never_run_in_walbridge_sessions_trigger() {
    let d = shadowed_deployment(&trigger_toml());
    let run = d.setup_and_run();
    write_through_every_path(&d);
    d.walbridge_ok(&["verify"]);
    assert_no_canary(&d, &run);
}

// ---------------------------------------------------------------------------------------
// SECURITY DEFINER functions: a table owner's cast to json never runs with their rights
// ---------------------------------------------------------------------------------------

/// Tables owned by `alice` on every node: `pets` has an enum of hers in its key.
fn owner_deployment(toml: &str) -> Deployment {
    alices_deployment(
        toml,
        &["CREATE TABLE public.items (id int PRIMARY KEY, name text);
           CREATE TYPE public.mood AS ENUM ('calm', 'wild');
           CREATE TABLE public.pets (m public.mood, id int, note text, PRIMARY KEY (m, id))"],
    )
}

/// alice's cast from her enum to json: it tries to make her a superuser (which works only
/// when it runs with a superuser's rights) and records who ran it.
const CAST_ATTACK: &str = "
    CREATE FUNCTION public.mood_json(public.mood) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.canary VALUES ('cast', current_user);
        BEGIN
            EXECUTE 'ALTER ROLE alice SUPERUSER';
        EXCEPTION WHEN insufficient_privilege THEN
            NULL;
        END;
        RETURN pg_catalog.to_json($1::text);
    END $$;
    CREATE CAST (public.mood AS json) WITH FUNCTION public.mood_json(public.mood);";

/// alice writes her table on east, with the cast in place on both nodes, through every kind
/// of change.
fn owner_writes(d: &Deployment) {
    for node in ["east", "west"] {
        ok_as(d, node, "alice", CAST_ATTACK);
    }
    ok_as(
        d,
        "east",
        "alice",
        "INSERT INTO pets VALUES ('calm', 1, 'a'), ('wild', 2, 'b')",
    );
    ok_as(
        d,
        "east",
        "alice",
        "UPDATE pets SET note = 'c' WHERE id = 1",
    );
    ok_as(d, "east", "alice", "DELETE FROM pets WHERE id = 2");
    d.wait_for(
        "west",
        "SELECT string_agg(m::text || ':' || id || ':' || note, ',' ORDER BY id) FROM pets",
        "calm:1:c",
    );
    ok_as(d, "east", "alice", "TRUNCATE pets");
    d.wait_for("west", "SELECT count(*) FROM pets", "0");
}

/// The same new key written on both nodes while walbridge is stopped: when it runs again,
/// each side resolves an insert_exists conflict on the careful path, which reads the
/// target's row (with alice's enum) as JSON in walbridge's session.
fn conflict_on_the_careful_path(d: &Deployment, run: Runner) -> Runner {
    drop(run);
    ok_as(
        d,
        "east",
        "alice",
        "INSERT INTO pets VALUES ('wild', 7, 'east')",
    );
    ok_as(
        d,
        "west",
        "alice",
        "INSERT INTO pets VALUES ('wild', 7, 'west')",
    );
    let run = d.spawn_run("run2.log");
    for node in ["east", "west"] {
        d.wait_for(node, "SELECT note FROM pets WHERE id = 7", "west");
    }
    run
}

/// The cast never ran as anyone but alice, and alice is still no superuser, on any node.
fn assert_attack_failed(d: &Deployment) {
    for node in ["east", "west"] {
        assert_eq!(
            d.sql(
                node,
                "SELECT string_agg(fired || ' as ' || as_user, ', ') FROM public.canary \
                  WHERE as_user <> 'alice'"
            ),
            "",
            "alice's cast ran with someone else's rights on {node}"
        );
        assert_eq!(
            d.sql(
                node,
                "SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'"
            ),
            "f"
        );
    }
}

/// What alice must not do to walbridge's own objects.
fn assert_no_forgery(d: &Deployment, extra: &[&str]) {
    let mut attempts = vec![
        "INSERT INTO walbridge.tombstones VALUES ('public.items'::regclass, '[1]')",
        "SELECT * FROM walbridge.settings",
        "SELECT walbridge.apply_finish(NULL, '0/1', pg_catalog.now())",
        "SELECT walbridge.expect_no_tombstones('public.items'::regclass)",
        "SELECT walbridge.row_jsonb('public.items'::regclass, NULL::public.items)",
        // Attaching walbridge's triggers (with arguments of her choice) to a table of hers.
        "CREATE TABLE public.mine (id int PRIMARY KEY);
         CREATE TRIGGER t AFTER DELETE ON public.mine REFERENCING OLD TABLE AS walbridge_deleted_rows
             FOR EACH STATEMENT EXECUTE FUNCTION walbridge.record_tombstones('id')",
    ];
    attempts.extend_from_slice(extra);
    for sql in attempts {
        denied_as(d, "east", "alice", sql);
    }
}

#[test]
fn a_table_owners_json_cast_never_runs_with_walbridge_rights_stream() {
    let d = owner_deployment(&stream_toml());
    let run = d.setup_and_run();
    owner_writes(&d);
    let _run = conflict_on_the_careful_path(&d, run);
    assert_attack_failed(&d);
    // The delete's tombstone was recorded, its enum key in text form.
    assert_eq!(
        d.sql("east", "SELECT key::text FROM walbridge.tombstones"),
        "[\"wild\", 2]"
    );
    assert_eq!(
        d.sql(
            "east",
            "SELECT string_agg(proname || ':' || proowner::regrole, ',' ORDER BY proname) \
               FROM pg_proc WHERE prosecdef AND pronamespace = 'walbridge'::regnamespace"
        ),
        "origin_writer:walbridge_capture,record_tombstones:walbridge_capture,\
         skip_session:walbridge_skip,tombstone_writer:walbridge_capture"
    );
    assert_no_forgery(&d, &[]);
}

#[test]
fn a_table_owners_json_cast_never_runs_with_walbridge_rights_trigger() {
    let d = owner_deployment(&trigger_toml());
    let run = d.setup_and_run();
    owner_writes(&d);
    let _run = conflict_on_the_careful_path(&d, run);
    assert_attack_failed(&d);
    assert_eq!(
        d.sql(
            "east",
            "SELECT string_agg(proname || ':' || proowner::regrole, ',' ORDER BY proname) \
               FROM pg_proc WHERE prosecdef AND pronamespace = 'walbridge'::regnamespace"
        ),
        "capture:walbridge_capture,capture_truncate:walbridge_capture,\
         origin_writer:walbridge_capture,record_tombstones:walbridge_capture,\
         skip_session:walbridge_skip,tombstone_writer:walbridge_capture"
    );
    assert_no_forgery(
        &d,
        &[
            "INSERT INTO public.database_changes (metodo, tabla, descripcion) \
             VALUES ('DELETE', 'public.items', '{\"id\": 1}')",
            "CREATE TABLE public.mine (id int PRIMARY KEY);
             CREATE TRIGGER t AFTER INSERT ON public.mine FOR EACH ROW
                 EXECUTE FUNCTION walbridge.capture('east', 'public.items', 'id')",
        ],
    );
}

// ---------------------------------------------------------------------------------------
// walbridge.skip_session() for ordinary roles
// ---------------------------------------------------------------------------------------

/// alice keeps one insert out of replication; the next one, in another session, travels.
fn skip_one_insert(d: &Deployment) {
    ok_as(
        d,
        "east",
        "alice",
        "SELECT walbridge.skip_session(); INSERT INTO items VALUES (100, 'skipped')",
    );
    ok_as(
        d,
        "east",
        "alice",
        "INSERT INTO items VALUES (101, 'replicated')",
    );
    d.wait_for("west", "SELECT count(*) FROM items WHERE id = 101", "1");
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM items WHERE id = 100"),
        "0"
    );
    assert_eq!(d.sql("east", "SELECT count(*) FROM items"), "2");
}

#[test]
fn skip_session_works_for_an_ordinary_role_stream() {
    let d = owner_deployment(&stream_toml());
    let _run = d.setup_and_run();
    skip_one_insert(&d);
    // The right skip_session() uses is not hers: no other origin, no progress.
    denied_as(
        &d,
        "east",
        "alice",
        "SELECT pg_catalog.pg_replication_origin_session_setup('walbridge_from_west')",
    );
    denied_as(
        &d,
        "east",
        "alice",
        "SELECT pg_catalog.pg_replication_origin_xact_setup('0/1', pg_catalog.now())",
    );
}

#[test]
fn skip_session_works_for_an_ordinary_role_trigger() {
    let d = owner_deployment(&trigger_toml());
    let _run = d.setup_and_run();
    skip_one_insert(&d);
    d.wait_for("east", "SELECT count(*) FROM public.database_changes", "0");
}

// ---------------------------------------------------------------------------------------
// Trigger mode set up by a role that is no superuser
// ---------------------------------------------------------------------------------------

#[test]
fn trigger_mode_set_up_by_a_non_superuser_works_for_ordinary_writers() {
    let d = Deployment::new(
        &["east", "west"],
        "CREATE ROLE wb LOGIN;
         GRANT CREATE ON DATABASE postgres TO wb;
         GRANT CREATE ON SCHEMA public TO wb;
         CREATE ROLE alice LOGIN;",
        "",
    );
    let mut toml = String::new();
    for node in ["east", "west"] {
        ok_as(
            &d,
            node,
            "wb",
            "CREATE TABLE public.items (id int PRIMARY KEY, name text);
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.items TO alice;",
        );
        toml.push_str(&format!(
            "[[nodes]]\nname = \"{node}\"\ndsn = \"host=127.0.0.1 port={} user=wb dbname=postgres \
             sslmode=disable\"\n\n",
            d.node(node).port()
        ));
    }
    toml.push_str(
        "[replication]\nmode = \"trigger\"\ntables = [\"public.items\"]\n\n\
         [trigger]\npoll_interval = \"1s\"\n\n[metrics]\nlisten = \"\"\n",
    );
    std::fs::write(&d.config, toml).expect("write config");
    d.walbridge_ok(&["setup"]);
    // No owner roles without a superuser: the definer functions stay the setup role's.
    assert_eq!(
        d.sql(
            "east",
            "SELECT string_agg(DISTINCT proowner::regrole::text, ',') FROM pg_proc \
              WHERE prosecdef AND pronamespace = 'walbridge'::regnamespace"
        ),
        "wb"
    );
    let _run = d.spawn_run("run.log");
    ok_as(&d, "east", "alice", "INSERT INTO items VALUES (1, 'one')");
    d.wait_for("west", "SELECT name FROM items WHERE id = 1", "one");
    ok_as(
        &d,
        "west",
        "alice",
        "SELECT walbridge.skip_session(); UPDATE items SET name = 'local' WHERE id = 1",
    );
    ok_as(&d, "west", "alice", "INSERT INTO items VALUES (2, 'two')");
    d.wait_for("east", "SELECT count(*) FROM items", "2");
    assert_eq!(d.sql("east", "SELECT name FROM items WHERE id = 1"), "one");
    denied_as(
        &d,
        "east",
        "alice",
        "INSERT INTO public.database_changes (metodo, tabla, descripcion) \
         VALUES ('DELETE', 'public.items', '{\"id\": 1}')",
    );
}

// ---------------------------------------------------------------------------------------
// SECURITY DEFINER functions open to PUBLIC: a caller's arguments never run a cast of hers
// ---------------------------------------------------------------------------------------

/// walbridge.tombstone_writer is SECURITY DEFINER and callable by anyone (node_priority's
/// guard calls it in the writer's session). alice calls it herself with a row of her own
/// composite type, whose `id` is her enum, and a relation whose `id` is an integer: were the
/// key built from her row's types instead of the relation's, her cast to json would run with
/// the function owner's rights (and could forge tombstones).
#[test]
fn a_callers_row_type_never_runs_her_cast_in_tombstone_writer() {
    let d = owner_deployment(&stream_toml());
    d.walbridge_ok(&["setup"]);
    for node in ["east", "west"] {
        ok_as(&d, node, "alice", CAST_ATTACK);
    }
    ok_as(
        &d,
        "east",
        "alice",
        "CREATE TYPE public.disguise AS (id public.mood)",
    );
    let attempt = psql_as(
        d.node("east"),
        "alice",
        "SELECT walbridge.tombstone_writer('public.items'::regclass, \
         ROW('calm')::public.disguise, ARRAY['id'])",
    );
    assert_attack_failed(&d);
    let err = attempt.expect_err("a row that is not of the relation's type is refused");
    assert!(err.contains("is not a row of"), "{err}");
    // The guard's own call (a row of the table) still answers.
    assert_eq!(
        ok_as(
            &d,
            "east",
            "alice",
            "SELECT coalesce(walbridge.tombstone_writer('public.items'::regclass, \
             ROW(1, 'x')::public.items, ARRAY['id']), 'none')"
        ),
        "none"
    );
}

// ---------------------------------------------------------------------------------------
// Tables: closed to PUBLIC whatever the default privileges say
// ---------------------------------------------------------------------------------------

/// A database whose administrator opened new tables and sequences to everyone (`ALTER DEFAULT
/// PRIVILEGES ... TO PUBLIC`) before running setup: walbridge's bookkeeping still stays
/// closed, or alice could point walbridge.settings' skip origin at a peer's origin (her writes
/// would pass for that peer's), forge tombstones or change rows, or rewind trigger-mode
/// progress.
#[test]
fn walbridge_tables_stay_closed_under_default_privileges_for_public() {
    let d = Deployment::new(
        &["east", "west"],
        &format!(
            "{ROLES}
             ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO PUBLIC;
             ALTER DEFAULT PRIVILEGES GRANT ALL ON SEQUENCES TO PUBLIC;
             CREATE TABLE public.items (id int PRIMARY KEY, name text);
             CREATE TABLE public.pets (id int PRIMARY KEY)"
        ),
        &trigger_toml(),
    );
    d.walbridge_ok(&["setup"]);
    for sql in [
        "UPDATE walbridge.settings SET value = 'walbridge_from_west' WHERE name = 'skip_origin'",
        "INSERT INTO walbridge.tombstones VALUES ('public.items'::regclass, '[1]')",
        "DELETE FROM walbridge.conflicts",
        "SELECT pg_catalog.nextval('walbridge.conflicts_id_seq')",
        "DELETE FROM walbridge.trigger_progress",
        "DELETE FROM walbridge.trigger_applied",
        "DELETE FROM walbridge.trigger_peer_progress",
        "DELETE FROM walbridge.stopped",
        "SELECT pg_catalog.nextval('walbridge.skipped_id_seq')",
        // The change table: a forged row would be applied on every peer with walbridge's
        // rights.
        "INSERT INTO public.database_changes (metodo, tabla, descripcion) \
         VALUES ('DELETE', 'public.items', '{\"id\": 1}')",
        "DELETE FROM public.database_changes_dead",
    ] {
        denied_as(&d, "east", "alice", sql);
    }
}

// ---------------------------------------------------------------------------------------
// sql/uninstall.sql, run by hand by a superuser with its own search_path
// ---------------------------------------------------------------------------------------

/// alice's `public.format` matches the arguments uninstall.sql passes to format() better than
/// pg_catalog's `format(text, VARIADIC "any")`: run by hand by a superuser whose search_path
/// has `public` (psql's default), an unqualified call would run her function as superuser.
#[test]
fn uninstall_sql_by_hand_never_runs_a_users_function() {
    let d = alices_deployment(
        &stream_toml(),
        &["CREATE TABLE public.items (id int PRIMARY KEY, name text);
           CREATE TABLE public.pets (id int PRIMARY KEY);
           CREATE FUNCTION public.format(text, name, regclass) RETURNS text
           LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO public.canary VALUES ('format', current_user);
               BEGIN
                   EXECUTE 'ALTER ROLE alice SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN
                   NULL;
               END;
               RETURN pg_catalog.format($1, $2, $3);
           END $$;"],
    );
    d.walbridge_ok(&["setup"]);
    d.sql("east", include_str!("../sql/uninstall.sql"));
    assert_attack_failed(&d);
    assert_eq!(
        d.sql(
            "east",
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'walbridge%'"
        ),
        "0"
    );
}
