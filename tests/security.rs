//! Privilege and injection: what an ordinary role (a table owner, a writer) can make
//! walbridge's sessions and functions do, on real clusters, as that role.

use std::process::{Command, Stdio};

use crate::support::*;

/// Runs SQL through `psql` as `user` (the test clusters trust loopback connections); the
/// output, or the error text when psql fails.
fn psql_as(c: &LocalCluster, user: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(c.bin_dir().join("psql"))
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
    let d = Deployment::new(&["east", "west"], ROLES, toml);
    for node in ["east", "west"] {
        ok_as(
            &d,
            node,
            "alice",
            "CREATE TABLE public.items (id int PRIMARY KEY, name text);
             CREATE TYPE public.mood AS ENUM ('calm', 'wild');
             CREATE TABLE public.pets (id int PRIMARY KEY, m public.mood)",
        );
        ok_as(&d, node, "alice", SHADOWS);
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
    d.walbridge_ok(&["setup"]);
    let run = d.spawn_run("run.log");
    write_through_every_path(&d);
    d.walbridge_ok(&["verify"]);
    assert_no_canary(&d, &run);
}

#[test]
fn functions_on_the_search_path_never_run_in_walbridge_sessions_trigger() {
    let d = shadowed_deployment(&trigger_toml());
    d.walbridge_ok(&["setup"]);
    let run = d.spawn_run("run.log");
    write_through_every_path(&d);
    d.walbridge_ok(&["verify"]);
    assert_no_canary(&d, &run);
}
