//! Active-active streaming: both directions, both plugins, no echo.

use crate::support::*;

const SCHEMA: &str = "
    CREATE TABLE public.items (id int PRIMARY KEY, name text, qty numeric, tags text[]);
    CREATE TABLE public.notes (k text PRIMARY KEY, body text);
";

fn both_directions(plugin: &str) {
    let d = Deployment::new(
        &["east", "west"],
        SCHEMA,
        // wal2json 2.5 (this machine's) writes NaN as null; `qty numeric` never holds one.
        &format!(
            "tables = [\"public.*\"]\nplugin = \"{plugin}\"\nallow_lossy_wal2json = {}",
            plugin == "wal2json"
        ),
    );
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");

    d.sql(
        "east",
        "INSERT INTO items VALUES (1, 'one', 1.5, '{a,NULL}'), (2, 'two', 2, NULL)",
    );
    d.sql("west", "INSERT INTO items VALUES (3, 'three', 3.25, '{}'); INSERT INTO notes VALUES ('w', 'from west')");
    d.wait_for("west", "SELECT count(*) FROM items", "3");
    d.wait_for("east", "SELECT count(*) FROM items", "3");
    d.wait_for("east", "SELECT body FROM notes WHERE k = 'w'", "from west");

    d.sql(
        "east",
        "UPDATE items SET name = 'uno', qty = qty * 10 WHERE id = 1",
    );
    d.sql("west", "DELETE FROM items WHERE id = 2");
    d.wait_for(
        "west",
        "SELECT name || ':' || qty FROM items WHERE id = 1",
        "uno:15.0",
    );
    d.wait_for("east", "SELECT count(*) FROM items WHERE id = 2", "0");

    d.sql("west", "TRUNCATE notes");
    d.wait_for("east", "SELECT count(*) FROM notes", "0");

    let table =
        "SELECT string_agg(format('%s|%s|%s|%s', id, name, qty, tags), ';' ORDER BY id) FROM items";
    let east = d.sql("east", table);
    d.wait_for("west", table, &east);
    run.assert_running();

    // No echo: once everything written so far is consumed, no row version changes.
    d.wait_caught_up();
    let east_versions = d.row_versions("east", "items", "id");
    let west_versions = d.row_versions("west", "items", "id");
    d.wait_caught_up();
    assert_eq!(d.row_versions("east", "items", "id"), east_versions);
    assert_eq!(d.row_versions("west", "items", "id"), west_versions);

    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

#[test]
fn both_directions_pgoutput() {
    both_directions("pgoutput");
}

#[test]
fn both_directions_wal2json() {
    if !wal2json_available() {
        return;
    }
    both_directions("wal2json");
}

#[test]
fn large_batches_with_awkward_values_arrive_intact() {
    let d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.awkward (
             id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             t text, b bytea, a text[], j jsonb, n numeric, ts timestamptz);",
        "tables = [\"public.*\"]",
    );
    d.walbridge_ok(&["setup"]);
    let run = d.spawn_run("run.log");
    // One transaction of 300 rows: applied as COPY (no tombstones on the table yet).
    d.sql(
        "east",
        "INSERT INTO awkward (t, b, a, j, n, ts)
         SELECT CASE i % 5 WHEN 0 THEN NULL WHEN 1 THEN E'tab\\there\\nnew line' WHEN 2 THEN E'back\\\\slash'
                           WHEN 3 THEN E'cr\\rlf éè \\\\N' ELSE repeat('x', i) END,
                decode(md5(i::text), 'hex'),
                ARRAY['a', NULL, E'q\"uote', E'tab\\t'],
                jsonb_build_object('i', i, 's', E'line\\nbreak'),
                i / 7.0,
                '2026-01-01 00:00:00+00'::timestamptz + i * interval '1 minute'
           FROM generate_series(1, 300) i",
    );
    let q = "SELECT count(*) || '|' || md5(string_agg(t::text, ',' ORDER BY id)) FROM awkward t";
    let east = d.sql("east", q);
    d.wait_for("west", q, &east);
    drop(run);
}

const TRUNCATE_SCHEMA: &str = "
    CREATE TABLE public.parent (id int PRIMARY KEY, v text);
    CREATE TABLE public.kid (id int PRIMARY KEY, parent_id int REFERENCES public.parent);
";

/// `TRUNCATE parent CASCADE` with the referencing table replicated too: the source's message
/// lists both, and the target truncates both (without cascading any further).
#[test]
fn truncate_cascade_of_replicated_tables_applies_the_listed_tables() {
    let d = Deployment::new(
        &["east", "west"],
        TRUNCATE_SCHEMA,
        "tables = [\"public.*\"]",
    );
    d.walbridge_ok(&["setup"]);
    d.sql(
        "east",
        "INSERT INTO parent VALUES (1, 'p'), (2, 'p'); INSERT INTO kid VALUES (10, 1), (20, 2)",
    );
    d.replicate_once("seed.log");
    assert_eq!(d.sql("west", "SELECT count(*) FROM kid"), "2");
    d.sql("east", "TRUNCATE parent CASCADE");
    d.replicate_once("truncate.log");
    assert_eq!(
        d.sql(
            "west",
            "SELECT (SELECT count(*) FROM parent) + (SELECT count(*) FROM kid)"
        ),
        "0"
    );
}

/// A table walbridge does not replicate references a replicated one on the target: the
/// source's `TRUNCATE ... CASCADE` must not empty it there. Like PostgreSQL's own apply, the
/// target truncates only the listed tables, which the foreign key refuses, so the direction
/// stops and says why; the unreplicated rows stay.
#[test]
fn truncate_cascade_never_empties_unreplicated_tables_on_the_peer() {
    let d = Deployment::new(
        &["east", "west"],
        &format!(
            "{TRUNCATE_SCHEMA}
             CREATE TABLE public.audit (id int PRIMARY KEY, parent_id int REFERENCES public.parent);"
        ),
        "tables = [\"public.*\"]\nexclude = [\"public.audit\"]",
    );
    d.walbridge_ok(&["setup"]);
    d.sql(
        "east",
        "INSERT INTO parent VALUES (1, 'p'), (2, 'p'); INSERT INTO kid VALUES (10, 1)",
    );
    d.replicate_once("seed.log");
    d.sql("west", "INSERT INTO audit VALUES (100, 1), (200, 2)");
    d.sql("east", "TRUNCATE parent CASCADE");
    let run = d.spawn_run("run.log");
    let stopped = wait_until(WAIT, || run.log().contains("never cascades"));
    let log = run.log();
    assert!(stopped, "log:\n{log}");
    assert!(
        log.contains("\"audit\""),
        "the error names the table:\n{log}"
    );
    assert_eq!(d.sql("west", "SELECT count(*) FROM audit"), "2");
    assert_eq!(d.sql("west", "SELECT count(*) FROM parent"), "2");
    assert_eq!(d.sql("west", "SELECT count(*) FROM kid"), "1");
    // Nothing of that transaction was applied or confirmed.
    assert_eq!(
        d.sql(
            "east",
            "SELECT confirmed_flush_lsn < pg_current_wal_lsn() FROM pg_replication_slots \
             WHERE slot_name = 'walbridge_east_to_west'"
        ),
        "t"
    );
    drop(run);
}

const IDENTITY_SCHEMA: &str = "
    CREATE TABLE public.ident_key (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
    CREATE TABLE public.ident_col (k int PRIMARY KEY, c_ident bigint GENERATED ALWAYS AS IDENTITY,
                                   v text);
";

/// Both identity tables agree on both nodes, identity values included.
fn identity_tables_agree(d: &Deployment) {
    for (table, key) in [("ident_key", "id"), ("ident_col", "k")] {
        assert_eq!(
            d.fingerprint("east", table, key),
            d.fingerprint("west", table, key),
            "{table}"
        );
    }
}

/// UPDATEs of tables with `GENERATED ALWAYS AS IDENTITY` columns (as the key and as a plain
/// column) replicate with their identity values exactly: plain updates of other columns leave
/// the identity alone, and `SET ... = DEFAULT` on the source (a new identity value) is written
/// on the peer too. Covers a backlog applied in groups (COPY, multi-row INSERTs, grouped
/// updates), live optimistic apply, and the careful path after a conflict.
fn identity_columns_replicate_exactly(plugin: &str) {
    let d = Deployment::new(
        &["east", "west"],
        IDENTITY_SCHEMA,
        &format!("tables = [\"public.*\"]\nplugin = \"{plugin}\""),
    );
    d.walbridge_ok(&["setup"]);

    // A backlog: one COPY-sized insert, then many small transactions (applied in groups).
    d.sql(
        "east",
        "INSERT INTO ident_key (v) SELECT 'r' || i FROM generate_series(1, 100) i;
         INSERT INTO ident_col (k, v) SELECT i, 'r' || i FROM generate_series(1, 100) i;",
    );
    let mut backlog = String::new();
    for i in 1..=20 {
        backlog.push_str(&format!(
            "INSERT INTO ident_key (v) VALUES ('s{i}'); INSERT INTO ident_col (k, v) VALUES ({}, 's{i}');
             UPDATE ident_key SET v = 'g{i}' WHERE id = {i}; UPDATE ident_col SET v = 'g{i}' WHERE k = {i};\n",
            100 + i
        ));
    }
    backlog.push_str(
        "UPDATE ident_key SET id = DEFAULT WHERE id = 30;
         UPDATE ident_col SET c_ident = DEFAULT, v = 'moved' WHERE k = 30;
         UPDATE ident_key SET v = 'after' WHERE id = 31;",
    );
    d.sql("east", &backlog);
    d.replicate_once("backlog.log");
    assert_eq!(d.sql("west", "SELECT count(*) FROM ident_key"), "120");
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM ident_key WHERE id = 30"),
        "0"
    );
    identity_tables_agree(&d);

    // Live: plain updates and new identity values, one transaction each.
    let mut run = d.spawn_run("live.log");
    d.sql("east", "UPDATE ident_key SET v = 'live' WHERE id = 40");
    d.sql("east", "UPDATE ident_col SET v = 'live' WHERE k = 40");
    d.sql("east", "UPDATE ident_key SET id = DEFAULT WHERE id = 41");
    d.sql(
        "east",
        "UPDATE ident_col SET c_ident = DEFAULT WHERE k = 41",
    );
    d.sql("west", "UPDATE ident_col SET v = 'from west' WHERE k = 42");
    d.wait_for("west", "SELECT count(*) FROM ident_key WHERE id = 41", "0");
    d.wait_caught_up();
    identity_tables_agree(&d);
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());

    // Careful path: a conflict on row 7 makes east's transaction be applied change by change
    // on west, new identity values included.
    d.sql(
        "east",
        "BEGIN;
         UPDATE ident_key SET v = 'east' WHERE id = 7; UPDATE ident_key SET id = DEFAULT WHERE id = 9;
         UPDATE ident_col SET v = 'east' WHERE k = 7; UPDATE ident_col SET c_ident = DEFAULT WHERE k = 9;
         COMMIT;",
    );
    d.sql(
        "west",
        "UPDATE ident_key SET v = 'west' WHERE id = 7; UPDATE ident_col SET v = 'west' WHERE k = 7;",
    );
    d.replicate_once("conflict.log");
    identity_tables_agree(&d);
    assert_eq!(d.sql("east", "SELECT v FROM ident_col WHERE k = 7"), "west");
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(kind || '/' || resolution, ' ' ORDER BY id) FROM walbridge.conflicts"
        ),
        "update_older/skipped update_older/skipped"
    );

    // The contended tables now settle conflicts in SQL: updates keep working there too.
    d.sql("east", "UPDATE ident_col SET v = 'hot' WHERE k = 50");
    d.sql(
        "east",
        "UPDATE ident_col SET c_ident = DEFAULT WHERE k = 51",
    );
    d.sql("east", "UPDATE ident_key SET id = DEFAULT WHERE id = 51");
    d.replicate_once("hot.log");
    identity_tables_agree(&d);
}

#[test]
fn identity_columns_replicate_exactly_pgoutput() {
    identity_columns_replicate_exactly("pgoutput");
}

#[test]
fn identity_columns_replicate_exactly_wal2json() {
    if !wal2json_available() {
        return;
    }
    identity_columns_replicate_exactly("wal2json");
}
