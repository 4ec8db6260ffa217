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
        &format!("tables = [\"public.*\"]\nplugin = \"{plugin}\""),
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
