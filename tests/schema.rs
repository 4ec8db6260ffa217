//! Schema changes through `walbridge.ddl()`: applied on every peer at their point of the
//! stream, while `run` runs, without a restart.

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.items (id int PRIMARY KEY, name text);";

/// `statement` as a `SELECT walbridge.ddl('...')` call.
fn ddl(statement: &str) -> String {
    format!("SELECT walbridge.ddl('{}')", statement.replace('\'', "''"))
}

/// Rows `from..to` into `table` on `node`, one committed transaction each, paced so they
/// interleave with what other threads do meanwhile.
fn trickle(d: &Deployment, node: &str, table: &str, from: i32, to: i32) {
    d.sql(
        node,
        &format!(
            "DO $$ BEGIN FOR i IN {from}..{to} LOOP \
               INSERT INTO {table} (id, name) VALUES (i, 'n' || i); COMMIT; \
               PERFORM pg_sleep(0.005); END LOOP; END $$"
        ),
    );
}

/// Waits until every node holds the same rows in `table`.
fn assert_identical(d: &Deployment, table: &str, key: &str) {
    let mut last = Vec::new();
    let same = wait_until(WAIT, || {
        last = d
            .names
            .iter()
            .map(|n| d.fingerprint(n, table, key))
            .collect();
        last.windows(2).all(|w| w[0] == w[1])
    });
    assert!(same, "{table} differs between nodes: {last:?}");
}

fn add_column_while_both_nodes_write(plugin: &str) {
    let d = Deployment::new(
        &["east", "west"],
        SCHEMA,
        &format!("plugin = \"{plugin}\"\nallow_lossy_wal2json = true"),
    );
    let mut run = d.setup_and_run();
    std::thread::scope(|s| {
        s.spawn(|| trickle(&d, "east", "public.items", 1, 300));
        s.spawn(|| trickle(&d, "west", "public.items", 100_001, 100_300));
        s.spawn(|| {
            d.wait_for(
                "east",
                "SELECT count(*) >= 50 FROM items WHERE id > 100000",
                "t",
            );
            d.sql(
                "east",
                &ddl("ALTER TABLE public.items ADD COLUMN note text NOT NULL DEFAULT 'none'"),
            );
        });
    });
    // Rows written after the change carry the new column both ways.
    d.wait_for(
        "west",
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attname = 'note'",
        "1",
    );
    d.sql("east", "INSERT INTO items VALUES (500, 'e', 'from east')");
    d.sql(
        "west",
        "INSERT INTO items VALUES (100500, 'w', 'from west')",
    );
    d.wait_for("west", "SELECT note FROM items WHERE id = 500", "from east");
    d.wait_for(
        "east",
        "SELECT note FROM items WHERE id = 100500",
        "from west",
    );
    assert_identical(&d, "public.items", "id");
    assert_eq!(d.sql("east", "SELECT count(*) FROM items"), "602");
    run.assert_no_direction_stopped();
    run.stop_ok();
}

#[test]
fn ddl_add_column_while_both_nodes_write() {
    add_column_while_both_nodes_write("pgoutput");
}

#[test]
fn ddl_add_column_while_both_nodes_write_wal2json() {
    if !wal2json_available() {
        return;
    }
    add_column_while_both_nodes_write("wal2json");
}

fn create_table_then_rows(plugin: &str) {
    let d = Deployment::new(
        &["east", "west"],
        SCHEMA,
        &format!("plugin = \"{plugin}\"\nallow_lossy_wal2json = true"),
    );
    let mut run = d.setup_and_run();
    d.sql("east", "INSERT INTO items VALUES (1, 'before')");
    d.wait_for("west", "SELECT count(*) FROM items", "1");

    // The table and its first row in one transaction, the statement first.
    d.sql(
        "east",
        &format!(
            "BEGIN; {}; INSERT INTO public.fresh VALUES (1, 'same transaction'); COMMIT;",
            ddl("CREATE TABLE public.fresh (id int PRIMARY KEY, v text)")
        ),
    );
    // A change before the statement in the same transaction (the applier re-reads it).
    d.sql(
        "west",
        &format!(
            "BEGIN; INSERT INTO items VALUES (2, 'w'); {}; \
             INSERT INTO public.later VALUES (1, 'after the statement'); COMMIT;",
            ddl("CREATE TABLE later (id int PRIMARY KEY, v text)")
        ),
    );
    d.wait_for(
        "west",
        "SELECT v FROM fresh WHERE id = 1",
        "same transaction",
    );
    d.wait_for(
        "east",
        "SELECT v FROM later WHERE id = 1",
        "after the statement",
    );
    d.wait_for("east", "SELECT name FROM items WHERE id = 2", "w");

    // Later transactions, both ways, no restart: the tables joined replication everywhere.
    d.sql("east", "INSERT INTO fresh VALUES (2, 'east later')");
    d.sql(
        "west",
        "INSERT INTO fresh VALUES (3, 'west later'); DELETE FROM fresh WHERE id = 1",
    );
    d.sql("east", "INSERT INTO later VALUES (2, 'east')");
    d.wait_for(
        "east",
        "SELECT string_agg(v, ',' ORDER BY id) FROM fresh",
        "east later,west later",
    );
    d.wait_for(
        "west",
        "SELECT string_agg(v, ',' ORDER BY id) FROM fresh",
        "east later,west later",
    );
    d.wait_for("west", "SELECT count(*) FROM later", "2");
    assert_identical(&d, "public.fresh", "id");
    assert_identical(&d, "public.later", "id");
    // The delete left a tombstone: the new table got its trigger on both nodes.
    for n in ["east", "west"] {
        assert_eq!(
            d.sql(
                n,
                "SELECT count(*) FROM walbridge.tombstones WHERE relid = 'public.fresh'::regclass"
            ),
            "1",
            "{n}"
        );
    }
    run.assert_running();
    run.stop_ok();
}

#[test]
fn ddl_create_table_then_rows_join_without_restart() {
    create_table_then_rows("pgoutput");
}

#[test]
fn ddl_create_table_then_rows_join_without_restart_wal2json() {
    if !wal2json_available() {
        return;
    }
    create_table_then_rows("wal2json");
}

const TRIGGER_MODE: &str = "mode = \"trigger\"\n\n[trigger]\npoll_interval = \"1s\"\n";

#[test]
fn ddl_renames_and_drop_column_replicate() {
    renames_and_drop_column("");
}

#[test]
fn ddl_renames_and_drop_column_replicate_trigger_mode() {
    renames_and_drop_column(TRIGGER_MODE);
}

fn renames_and_drop_column(replication_toml: &str) {
    let d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.items (id int PRIMARY KEY, name text, extra int);",
        replication_toml,
    );
    let mut run = d.setup_and_run();
    d.sql("east", "INSERT INTO items VALUES (1, 'a', 1)");
    d.sql("west", "INSERT INTO items VALUES (2, 'b', 2)");
    d.wait_for("east", "SELECT count(*) FROM items", "2");
    d.wait_for("west", "SELECT count(*) FROM items", "2");

    // A column rename, then writes with the new name on both nodes.
    d.sql(
        "east",
        &ddl("ALTER TABLE public.items RENAME COLUMN name TO title"),
    );
    d.wait_for(
        "west",
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attname = 'title'",
        "1",
    );
    d.sql("west", "UPDATE items SET title = 'b2' WHERE id = 2");
    d.sql(
        "east",
        "INSERT INTO items (id, title, extra) VALUES (3, 'c', 3)",
    );
    d.wait_for("east", "SELECT title FROM items WHERE id = 2", "b2");
    d.wait_for("west", "SELECT title FROM items WHERE id = 3", "c");

    // A table rename, issued on the other node, with a row in the same transaction.
    d.sql(
        "west",
        &format!(
            "BEGIN; {}; INSERT INTO public.goods VALUES (4, 'd', 4); COMMIT;",
            ddl("ALTER TABLE public.items RENAME TO goods")
        ),
    );
    d.wait_for("east", "SELECT title FROM goods WHERE id = 4", "d");
    d.sql("east", "UPDATE goods SET extra = 30 WHERE id = 3");
    d.wait_for("west", "SELECT extra FROM goods WHERE id = 3", "30");

    // DROP COLUMN, then writes on both nodes.
    d.sql("east", &ddl("ALTER TABLE public.goods DROP COLUMN extra"));
    d.wait_for(
        "west",
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'public.goods'::regclass AND attname = 'extra' AND NOT attisdropped",
        "0",
    );
    d.sql("west", "INSERT INTO goods VALUES (5, 'e')");
    d.sql("east", "UPDATE goods SET title = 'a2' WHERE id = 1");
    d.wait_for("east", "SELECT count(*) FROM goods", "5");
    d.wait_for("west", "SELECT title FROM goods WHERE id = 1", "a2");
    assert_identical(&d, "public.goods", "id");
    run.assert_no_direction_stopped();
    run.stop_ok();
}

#[test]
fn ddl_failing_statement_stops_the_direction_naming_it() {
    failing_statement_stops("");
}

#[test]
fn ddl_failing_statement_stops_the_direction_naming_it_trigger_mode() {
    failing_statement_stops(TRIGGER_MODE);
}

fn failing_statement_stops(replication_toml: &str) {
    let mut d = Deployment::new(&["east", "west"], SCHEMA, replication_toml);
    let port = d.enable_metrics();
    d.walbridge_ok(&["setup"]);
    // A column west already has (plain DDL is not replicated): the statement fails there.
    d.sql("west", "ALTER TABLE items ADD COLUMN dup int");
    let mut run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO items VALUES (1, 'before')");
    d.wait_for("west", "SELECT count(*) FROM items", "1");
    d.sql(
        "east",
        &format!(
            "BEGIN; {}; INSERT INTO items VALUES (2, 'with it', 7); COMMIT;",
            ddl("ALTER TABLE public.items ADD COLUMN dup int")
        ),
    );
    let stopped = wait_until(WAIT, || run.log().contains("direction stopped"));
    let log = run.log();
    assert!(stopped, "log:\n{log}");
    assert!(
        log.contains("ALTER TABLE public.items ADD COLUMN dup int")
            && log.contains("already exists"),
        "log:\n{log}"
    );
    // Nothing of that transaction was applied, and status says why.
    assert_eq!(d.sql("west", "SELECT count(*) FROM items"), "1");
    let out = d.walbridge(&["status", "--json"]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let ew = json["directions"]
        .as_array()
        .and_then(|ds| {
            ds.iter()
                .find(|x| x["source"] == "east" && x["target"] == "west")
        })
        .cloned()
        .unwrap_or_default();
    let err = ew["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("ADD COLUMN dup") && err.contains("already exists"),
        "{json}"
    );
    // The other direction goes on.
    d.sql("west", "INSERT INTO items VALUES (3, 'west')");
    d.wait_for("east", "SELECT name FROM items WHERE id = 3", "west");
    let _ = port;
    run.signal(libc::SIGTERM);
    let _ = run.wait_exit(WAIT);
}

#[test]
fn ddl_reaches_every_node_of_three_once() {
    reaches_every_node_of_three_once("");
}

#[test]
fn ddl_reaches_every_node_of_three_once_trigger_mode() {
    reaches_every_node_of_three_once(TRIGGER_MODE);
}

fn reaches_every_node_of_three_once(replication_toml: &str) {
    let d = Deployment::new(&["n1", "n2", "n3"], SCHEMA, replication_toml);
    let mut run = d.setup_and_run();
    d.sql(
        "n2",
        &format!(
            "BEGIN; {}; {}; INSERT INTO public.fresh VALUES (1, 'n2'); COMMIT;",
            ddl("CREATE TABLE public.fresh (id int PRIMARY KEY, v text)"),
            ddl("ALTER TABLE public.items ADD COLUMN note text")
        ),
    );
    for n in ["n1", "n3"] {
        d.wait_for(n, "SELECT v FROM fresh WHERE id = 1", "n2");
    }
    d.sql(
        "n1",
        "INSERT INTO fresh VALUES (2, 'n1'); INSERT INTO items VALUES (1, 'a', 'n1')",
    );
    d.sql(
        "n3",
        "INSERT INTO fresh VALUES (3, 'n3'); INSERT INTO items VALUES (3, 'c', 'n3')",
    );
    for n in ["n1", "n2", "n3"] {
        d.wait_for(
            n,
            "SELECT string_agg(v, ',' ORDER BY id) FROM fresh",
            "n2,n1,n3",
        );
        d.wait_for(
            n,
            "SELECT string_agg(note, ',' ORDER BY id) FROM items",
            "n1,n3",
        );
    }
    assert_identical(&d, "public.items", "id");
    // Applied once per peer: a second CREATE TABLE would have stopped a direction.
    if replication_toml.contains("trigger") {
        // Every change row applied to both peers and deleted.
        for n in ["n1", "n2", "n3"] {
            d.wait_for(n, "SELECT count(*) FROM public.database_changes", "0");
        }
    } else {
        d.wait_caught_up();
    }
    let log = run.log();
    assert!(!log.contains("direction stopped"), "log:\n{log}");
    assert_eq!(
        log.matches("schema change applied").count(),
        4,
        "log:\n{log}"
    );
    run.assert_running();
    run.stop_ok();
}

#[test]
fn ddl_trigger_mode_travels_as_a_ddl_change_row() {
    let d = Deployment::new(
        &["east", "west"],
        SCHEMA,
        "mode = \"trigger\"\n\n[trigger]\npoll_interval = \"1s\"\n",
    );
    let mut run = d.setup_and_run();
    d.sql("east", "INSERT INTO items VALUES (1, 'before')");
    d.wait_for("west", "SELECT count(*) FROM items", "1");
    std::thread::scope(|s| {
        s.spawn(|| trickle(&d, "west", "public.items", 100_001, 100_100));
        s.spawn(|| {
            d.sql(
                "east",
                &format!(
                    "BEGIN; INSERT INTO items VALUES (2, 'same txn, before'); {}; \
                     INSERT INTO items VALUES (3, 'same txn, after', 'n3'); COMMIT;",
                    ddl("ALTER TABLE public.items ADD COLUMN note text DEFAULT 'none'")
                ),
            );
        });
    });
    // The change row is there, in order, with metodo DDL (until applied and deleted).
    d.wait_for("west", "SELECT note FROM items WHERE id = 3", "n3");
    d.sql(
        "west",
        "INSERT INTO items VALUES (100500, 'w', 'from west')",
    );
    d.wait_for(
        "east",
        "SELECT note FROM items WHERE id = 100500",
        "from west",
    );

    // A new table with a row in the same transaction, then rows both ways.
    d.sql(
        "east",
        &format!(
            "BEGIN; {}; INSERT INTO public.fresh VALUES (1, 'east'); COMMIT;",
            ddl("CREATE TABLE public.fresh (id int PRIMARY KEY, v text)")
        ),
    );
    d.wait_for("west", "SELECT v FROM fresh WHERE id = 1", "east");
    d.sql("west", "INSERT INTO fresh VALUES (2, 'west')");
    d.wait_for(
        "east",
        "SELECT string_agg(v, ',' ORDER BY id) FROM fresh",
        "east,west",
    );
    assert_identical(&d, "public.items", "id");
    let log = run.log();
    assert_eq!(
        log.matches("schema change applied").count(),
        2,
        "log:\n{log}"
    );
    assert!(!log.contains("direction stopped"), "log:\n{log}");
    assert_eq!(
        d.sql("east", "SELECT count(*) FROM public.database_changes_dead"),
        "0"
    );
    run.stop_ok();
}

#[test]
fn ddl_new_table_gets_each_node_its_sequence_range() {
    let d = Deployment::new(&["east", "west"], SCHEMA, "sequence_ranges = true");
    let mut run = d.setup_and_run();
    d.sql(
        "east",
        &ddl("CREATE TABLE public.events (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, s serial, v text)"),
    );
    d.wait_for(
        "west",
        "SELECT to_regclass('public.events') IS NOT NULL",
        "t",
    );
    d.sql(
        "east",
        "INSERT INTO events (v) SELECT 'e' FROM generate_series(1, 3)",
    );
    d.sql(
        "west",
        "INSERT INTO events (v) SELECT 'w' FROM generate_series(1, 3)",
    );
    let want = "1:1:e,2:2:w,3:3:e,4:4:w,5:5:e,6:6:w";
    let q = "SELECT string_agg(format('%s:%s:%s', id, s, v), ',' ORDER BY id) FROM events";
    d.wait_for("east", q, want);
    d.wait_for("west", q, want);
    run.assert_no_direction_stopped();
    run.stop_ok();
}
