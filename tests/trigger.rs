//! Trigger mode against real clusters and the real binary: setup, run, the legacy change-table
//! format, dead rows, a crash between the peer's commit and the source's delete, the cut-over
//! to stream mode under load, and `mode = "auto"`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.users (id int PRIMARY KEY, name text, tags text[], \
                                                 balance numeric, active boolean, born date);
                      CREATE TABLE public.log (v text);
                      ALTER TABLE public.log REPLICA IDENTITY FULL;";

fn trigger_toml(extra: &str) -> String {
    format!(
        "mode = \"trigger\"\ntables = [\"public.*\"]\n{extra}\n\n[trigger]\npoll_interval = \"1s\"\n"
    )
}

/// walbridge's sessions have left both servers (they hold the replication origins).
fn stopped(d: &Deployment) {
    for n in ["east", "west"] {
        d.wait_for(
            n,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walbridge-%'",
            "0",
        );
    }
}

/// Both change tables are empty.
fn wait_drained(d: &Deployment) {
    for n in ["east", "west"] {
        d.wait_for(n, "SELECT count(*) FROM public.database_changes", "0");
    }
}

#[test]
fn trigger_mode_replicates_both_ways_without_echo() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    let out = d.walbridge_ok(&["setup"]);
    assert!(out.contains("east: trigger mode"), "{out}");
    assert!(
        out.contains("change table public.database_changes created"),
        "{out}"
    );
    // Idempotent.
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");

    d.sql(
        "east",
        "INSERT INTO users VALUES (1, 'ana', '{a,b}', 10.50, true, '2000-01-02'), (2, 'bo', NULL, NULL, NULL, NULL)",
    );
    d.wait_for("west", "SELECT count(*) FROM users", "2");
    d.sql(
        "west",
        "UPDATE users SET name = 'bob', balance = 1e20 WHERE id = 2",
    );
    d.wait_for(
        "east",
        "SELECT name || ' ' || balance FROM users WHERE id = 2",
        "bob 100000000000000000000",
    );
    d.sql(
        "west",
        "INSERT INTO users (id, name) VALUES (3, 'cy'); DELETE FROM users WHERE id = 1",
    );
    d.wait_for(
        "east",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM users",
        "2,3",
    );
    // A key change travels as an update with its old key.
    d.sql("east", "UPDATE users SET id = 30 WHERE id = 3");
    d.wait_for(
        "west",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM users",
        "2,30",
    );
    // A column added on both nodes while walbridge runs (DDL is not replicated).
    for n in ["east", "west"] {
        d.sql(n, "ALTER TABLE users ADD COLUMN extra int");
    }
    d.sql("east", "UPDATE users SET extra = 7 WHERE id = 2");
    d.wait_for("west", "SELECT extra FROM users WHERE id = 2", "7");
    // A session that opts out is not replicated.
    d.sql(
        "east",
        "SELECT walbridge.skip_session(); INSERT INTO users (id, name) VALUES (99, 'local only')",
    );
    // A table without a key (REPLICA IDENTITY FULL), and TRUNCATE.
    d.sql("east", "INSERT INTO log VALUES ('x'), ('x'), ('y'); DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE v = 'x' LIMIT 1)");
    d.wait_for(
        "west",
        "SELECT string_agg(v, ',' ORDER BY v) FROM log",
        "x,y",
    );
    d.sql("west", "TRUNCATE log");
    d.wait_for("east", "SELECT count(*) FROM log", "0");
    d.sql("east", "DELETE FROM users WHERE id = 99");
    wait_drained(&d);

    let rows = "SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s', id, name, tags, balance, active, born, extra), ';' ORDER BY id) FROM users";
    assert_eq!(d.sql("east", rows), d.sql("west", rows));
    // No echo: each node logged exactly its own changes (east: 2 inserts, 1 update, 3 inserts
    // and 1 delete on log, 1 update of the new column, the delete of the unreplicated row 99;
    // west: 1 update, 1 insert, 1 delete, 1 truncate), nothing that was applied to it.
    assert_eq!(
        d.sql("east", "SELECT last_value FROM database_changes_id_seq"),
        "9"
    );
    assert_eq!(
        d.sql("west", "SELECT last_value FROM database_changes_id_seq"),
        "4"
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT source, last_id FROM walbridge.trigger_progress"
        ),
        "east|9"
    );
    // Applied changes carry the source's origin.
    assert_eq!(
        d.sql(
            "west",
            "SELECT r.roname FROM users u, pg_xact_commit_timestamp_origin(u.xmin) c \
                       JOIN pg_replication_origin r ON r.roident = c.roident WHERE u.id = 30"
        ),
        "walbridge_from_east"
    );

    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "{}", run.log());
    stopped(&d);
    d.walbridge_ok(&["teardown"]);
    for n in ["east", "west"] {
        assert_eq!(
            d.sql(n, "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'walbridge%') \
                          + (SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge') \
                          + (SELECT count(*) FROM pg_class WHERE relname LIKE 'database_changes%' AND relkind = 'r')"),
            "0",
            "teardown left objects on {n}"
        );
    }
}

#[test]
fn legacy_rows_written_by_hand_are_applied_and_removed() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    // The old script's tables, one with text and one with json descripcion, holding rows.
    d.sql(
        "east",
        "CREATE TABLE public.database_changes (id serial PRIMARY KEY, metodo varchar(10), tabla varchar(100), descripcion text);
         INSERT INTO database_changes (metodo, tabla, descripcion)
              VALUES ('INSERT', 'users', '{\"id\": 1, \"name\": \"from json\", \"tags\": [\"a\", \"b\"]}');",
    );
    d.sql(
        "west",
        "CREATE TABLE public.database_changes (id serial PRIMARY KEY, metodo text, tabla text, descripcion json);",
    );
    let out = d.walbridge_ok(&["setup"]);
    assert!(
        out.contains(
            "east: change table public.database_changes kept (descripcion text, 1 row(s) waiting)"
        ),
        "{out}"
    );
    let _run = d.spawn_run("run.log");
    d.wait_for(
        "west",
        "SELECT name || ' ' || tags::text FROM users WHERE id = 1",
        "from json {a,b}",
    );

    // By hand, in the Python dict form, any case, with and without schema.
    d.sql(
        "east",
        r#"INSERT INTO database_changes (metodo, tabla, descripcion) VALUES
             ('insert', 'public.users', E'{''id'': 2, ''name'': "O''Brien", ''active'': True, ''balance'': Decimal(''12.30''), ''born'': datetime.date(1999, 12, 31), ''tags'': (''x'',)}'),
             ('Update', 'USERS', E'{''id'': 1, ''name'': ''renamed\\u00e9'', ''active'': None}'),
             ('INSERT', 'users', '{"id": 3, "name": "gone soon"}'),
             ('delete', 'users', '{"id": 3}')"#,
    );
    d.wait_for(
        "west",
        "SELECT string_agg(format('%s %s %s %s %s %s', id, name, active, balance, born, tags), '; ' ORDER BY id) FROM users",
        "1 renamedé  <NULL> <NULL> {a,b}; 2 O'Brien t 12.30 1999-12-31 {x}"
            .replace("<NULL>", "")
            .as_str(),
    );
    // West's json-typed table works the same way.
    d.sql(
        "west",
        "INSERT INTO database_changes (metodo, tabla, descripcion) VALUES ('INSERT', 'users', '{\"id\": 4, \"name\": \"west json\"}')",
    );
    d.wait_for("east", "SELECT name FROM users WHERE id = 4", "west json");
    wait_drained(&d);
    assert_eq!(
        d.sql("east", "SELECT count(*) FROM database_changes_dead"),
        "0"
    );
}

#[test]
fn malformed_and_malicious_rows_go_to_the_dead_table() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    // A text descripcion, as the old script had, so malformed text can be stored at all.
    d.sql(
        "east",
        "CREATE TABLE public.database_changes (id bigserial PRIMARY KEY, metodo text, tabla text, descripcion text)",
    );
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
    d.sql(
        "east",
        r#"INSERT INTO database_changes (metodo, tabla, descripcion) VALUES
             ('INSERT', 'users', '{"id": 1, "name": "before"}'),
             ('INSERT', 'users', '{"id": 2, "name": '),
             ('UPSERT', 'users', '{"id": 3}'),
             ('INSERT', 'users; DROP TABLE users', '{"id": 4}'),
             ('INSERT', 'pg_catalog.pg_authid', '{"rolname": "x"}'),
             ('INSERT', 'users', '{"id": 5, "nope": 1}'),
             ('INSERT', 'users', '{"id": "five", "name": "type error"}'),
             ('INSERT', 'users', E'{''id'': 6, ''name'': os.system(''true'')}'),
             ('DELETE', 'users', '{"name": "no key"}'),
             ('INSERT', 'users', '{"id": 7, "name": "after"}')"#,
    );
    d.wait_for(
        "west",
        "SELECT string_agg(name, ',' ORDER BY id) FROM users",
        "before,after",
    );
    d.wait_for("east", "SELECT count(*) FROM database_changes", "0");
    let dead = d.sql(
        "east",
        "SELECT string_agg(format('%s:%s:%s', id, target_node, error), E'\\n' ORDER BY id) FROM database_changes_dead",
    );
    let lines: Vec<&str> = dead.lines().collect();
    assert_eq!(lines.len(), 8, "{dead}");
    assert!(
        lines[0].starts_with("2:west:descripcion is neither"),
        "{dead}"
    );
    assert!(
        lines[1].contains("metodo \"UPSERT\" is not INSERT, UPDATE or DELETE"),
        "{dead}"
    );
    assert!(
        lines[2]
            .contains("tabla \"users; DROP TABLE users\" is not a replicated table on node west"),
        "{dead}"
    );
    assert!(
        lines[3].contains("tabla \"pg_catalog.pg_authid\" is not a replicated table"),
        "{dead}"
    );
    assert!(
        lines[4].contains("column \"nope\" does not exist in table public.users"),
        "{dead}"
    );
    assert!(
        lines[5].contains("invalid input syntax for type integer: \"five\""),
        "{dead}"
    );
    assert!(
        lines[6].contains("unsupported Python call os.system"),
        "{dead}"
    );
    assert!(lines[7].contains("lacks the key column \"id\""), "{dead}");
    // Nothing was executed: the table is there on both nodes.
    assert_eq!(
        d.sql(
            "west",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'users'"
        ),
        "1"
    );
}

#[test]
fn crash_between_peer_commit_and_source_delete_repeats_nothing() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    d.walbridge_ok(&["setup"]);
    // The table without a key shows any repetition as a duplicate row.
    d.sql(
        "east",
        "INSERT INTO log SELECT 'row ' || g FROM generate_series(1, 50) g;
         INSERT INTO users (id, name) VALUES (1, 'a')",
    );
    let mut run = d.spawn_run_env(
        "crash.log",
        &[("WALBRIDGE_FAILPOINT", "trigger_after_commit")],
    );
    let code = run.wait_exit(WAIT);
    assert!(code.is_some(), "the failpoint did not stop walbridge");
    assert!(
        run.log().contains("failpoint trigger_after_commit"),
        "{}",
        run.log()
    );
    // Committed on west, still logged on east.
    d.wait_for("west", "SELECT count(*) FROM log", "50");
    assert_eq!(d.sql("east", "SELECT count(*) FROM database_changes"), "51");

    let _run = d.spawn_run("after.log");
    d.wait_for("east", "SELECT count(*) FROM database_changes", "0");
    d.sql("east", "INSERT INTO log VALUES ('later')");
    d.wait_for("west", "SELECT count(*) FROM log", "51");
    assert_eq!(d.sql("west", "SELECT count(DISTINCT v) FROM log"), "51");
    assert_eq!(d.sql("west", "SELECT count(*) FROM users"), "1");
}

#[test]
fn cut_over_to_stream_under_write_load_loses_and_repeats_nothing() {
    if !wal2json_available() {
        return;
    }
    let mut d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.items (id bigint PRIMARY KEY, note text);",
        &trigger_toml("plugin = \"wal2json\""),
    );
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("trigger.log");

    // A steady writer on east, numbering its rows.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let dsn = d.node("east").dsn("postgres");
        std::thread::spawn(move || writer_loop(&dsn, &stop))
    };
    d.wait_for("west", "SELECT count(*) > 20 FROM items", "t");

    // Stop trigger mode and switch to stream mode while the writer goes on.
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "{}", run.log());
    d.set_replication_toml("mode = \"stream\"\nplugin = \"wal2json\"\ntables = [\"public.*\"]\n");
    let out = d.walbridge_ok(&["setup"]);
    assert!(
        out.contains("east: cut-over to stream mode complete"),
        "{out}"
    );
    assert!(
        out.contains("west: cut-over to stream mode complete"),
        "{out}"
    );
    // Let the writer run on under stream mode a little, then stop it.
    let at_cutover: i64 = d
        .sql("east", "SELECT max(id) FROM items")
        .parse()
        .unwrap_or(0);
    d.wait_for(
        "east",
        &format!("SELECT max(id) > {} FROM items", at_cutover + 20),
        "t",
    );
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().expect("writer thread");

    // What reached west through the change table, and what waits in the slot for the stream:
    // together every row, each exactly once.
    let on_west: Vec<i64> = ids(&d.sql(
        "west",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM items",
    ));
    let in_slot = d.sql(
        "east",
        "SELECT string_agg(data, E'\\n') FROM pg_logical_slot_peek_changes('walbridge_east_to_west', NULL, NULL, 'format-version', '2')",
    );
    let mut streamed: Vec<i64> = in_slot
        .lines()
        .filter(|l| l.contains("\"action\":\"I\"") && l.contains("\"table\":\"items\""))
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["columns"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "id")?["value"]
                .as_i64()
        })
        .collect();
    streamed.sort_unstable();
    let mut all: Vec<i64> = on_west.iter().chain(streamed.iter()).copied().collect();
    all.sort_unstable();
    let expected: Vec<i64> = (1..=written).collect();
    assert!(
        !streamed.is_empty(),
        "nothing was written after the cut-over"
    );
    assert!(!on_west.is_empty());
    assert_eq!(all, expected, "west {on_west:?}\nslot {streamed:?}");
    // And the stream runtime delivers them: every row once, no insert meeting its own row.
    let _stream = d.spawn_run("stream.log");
    d.wait_for("west", "SELECT count(*) FROM items", &written.to_string());
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM walbridge.conflicts"),
        "0"
    );
    // Trigger mode is gone from east.
    assert_eq!(
        d.sql(
            "east",
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'walbridge_capture'"
        ),
        "0"
    );
}

/// Inserts rows 1, 2, 3... on `dsn` until `stop`; returns how many.
fn writer_loop(dsn: &str, stop: &AtomicBool) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
            .await
            .expect("connect writer");
        tokio::spawn(conn);
        let mut n = 0i64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            client
                .execute("INSERT INTO items VALUES ($1, 'w')", &[&n])
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

fn ids(s: &str) -> Vec<i64> {
    s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
}

#[test]
fn auto_chooses_trigger_mode_on_a_wal_level_replica_node() {
    let d = Deployment::with_node_conf(
        &["east", "west"],
        SCHEMA,
        "mode = \"auto\"\ntables = [\"public.*\"]\n\n[trigger]\npoll_interval = \"1s\"\n",
        &[&["wal_level = replica"], &[]],
    );
    let out = d.walbridge_ok(&["setup"]);
    assert!(
        out.contains("east: trigger mode (mode auto: logical decoding is not possible here (wal_level is replica"),
        "{out}"
    );
    assert!(
        out.contains("west: stream mode (mode auto: logical decoding is available"),
        "{out}"
    );
    assert_eq!(
        d.sql("east", "SELECT (SELECT count(*) FROM pg_replication_slots) || ' ' || \
                        (SELECT count(*) FROM pg_trigger WHERE tgname = 'walbridge_capture') || ' ' || \
                        (SELECT value FROM walbridge.settings WHERE name = 'capture_mode')"),
        "0 2 trigger"
    );
    assert_eq!(
        d.sql("west", "SELECT (SELECT string_agg(slot_name, ',') FROM pg_replication_slots) || ' ' || \
                        (SELECT count(*) FROM pg_trigger WHERE tgname = 'walbridge_capture') || ' ' || \
                        (SELECT value FROM walbridge.settings WHERE name = 'capture_mode')"),
        "walbridge_west_to_east 0 stream"
    );
    // Both directions of the mixed mesh run: east's change table to west, west's slot to
    // east, and what the stream applies on east is not logged by east's capture trigger.
    let _run = d.spawn_run("run.log");
    d.sql(
        "east",
        "INSERT INTO users (id, name) VALUES (1, 'from a replica-level node')",
    );
    d.wait_for(
        "west",
        "SELECT name FROM users",
        "from a replica-level node",
    );
    d.sql(
        "west",
        "INSERT INTO users (id, name) VALUES (2, 'from the streaming node')",
    );
    d.sql(
        "west",
        "UPDATE users SET name = 'edited on west' WHERE id = 1",
    );
    d.wait_for(
        "east",
        "SELECT string_agg(name, ',' ORDER BY id) FROM users",
        "edited on west,from the streaming node",
    );
    d.wait_for("east", "SELECT count(*) FROM database_changes", "0");
    assert_eq!(
        d.sql("east", "SELECT last_value FROM database_changes_id_seq"),
        "1",
        "east logged only its own insert"
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(name, ',' ORDER BY id) FROM users"
        ),
        "edited on west,from the streaming node"
    );
}

#[test]
fn a_transaction_that_commits_late_is_not_lost() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
    // A transaction takes change row 1 and stays open while row 2 commits and is applied.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(
            &d.node("east").dsn("postgres"),
            tokio_postgres::NoTls,
        ))
        .expect("connect");
    rt.spawn(conn);
    rt.block_on(client.batch_execute("BEGIN; INSERT INTO users (id, name) VALUES (1, 'slow')"))
        .expect("open transaction");
    d.sql("east", "INSERT INTO users (id, name) VALUES (2, 'fast')");
    d.wait_for("west", "SELECT string_agg(name, ',') FROM users", "fast");
    d.wait_for(
        "west",
        "SELECT last_id FROM walbridge.trigger_progress",
        "2",
    );
    rt.block_on(client.batch_execute("COMMIT")).expect("commit");
    d.wait_for(
        "west",
        "SELECT string_agg(name, ',' ORDER BY id) FROM users",
        "slow,fast",
    );
    wait_drained(&d);
}

#[test]
fn three_nodes_converge_and_every_peer_gets_each_row_before_it_is_deleted() {
    let names = ["east", "west", "north"];
    let d = Deployment::new(&names, SCHEMA, &trigger_toml(""));
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
    d.sql(
        "east",
        "INSERT INTO users (id, name) SELECT g, 'e' || g FROM generate_series(1, 300) g",
    );
    d.sql(
        "west",
        "INSERT INTO users (id, name) SELECT g, 'w' || g FROM generate_series(1001, 1100) g",
    );
    d.sql(
        "north",
        "UPDATE users SET name = 'n' WHERE false; INSERT INTO users (id, name) VALUES (5000, 'n')",
    );
    for n in names {
        d.wait_for(n, "SELECT count(*) FROM users", "401");
    }
    d.sql("north", "DELETE FROM users WHERE id <= 100");
    for n in names {
        d.wait_for(n, "SELECT count(*) FROM users", "301");
        d.wait_for(n, "SELECT count(*) FROM database_changes", "0");
    }
    let all = "SELECT md5(string_agg(id || name, ',' ORDER BY id)) FROM users";
    assert_eq!(d.sql("east", all), d.sql("west", all));
    assert_eq!(d.sql("east", all), d.sql("north", all));
    // No echo anywhere: each node logged only its own changes.
    assert_eq!(
        d.sql("east", "SELECT last_value FROM database_changes_id_seq"),
        "300"
    );
    assert_eq!(
        d.sql("north", "SELECT last_value FROM database_changes_id_seq"),
        "101"
    );
}

#[test]
fn concurrent_updates_converge_to_the_last_writer() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    d.walbridge_ok(&["setup"]);
    d.sql("east", "INSERT INTO users (id, name) VALUES (1, 'base')");
    d.sql("west", "INSERT INTO users (id, name) VALUES (1, 'base')");
    d.sql("east", "DELETE FROM database_changes");
    d.sql("west", "DELETE FROM database_changes");
    // Both nodes change the row while walbridge is not running; west writes last.
    d.sql(
        "east",
        "UPDATE users SET name = 'east, earlier' WHERE id = 1",
    );
    d.sql(
        "west",
        "SELECT pg_sleep(0.01); UPDATE users SET name = 'west, later' WHERE id = 1",
    );
    let _run = d.spawn_run("run.log");
    for n in ["east", "west"] {
        d.wait_for(n, "SELECT name FROM users WHERE id = 1", "west, later");
    }
    wait_drained(&d);
    assert_eq!(
        d.sql(
            "west",
            "SELECT kind || ' ' || resolution || ' ' || source FROM walbridge.conflicts"
        ),
        "update_older skipped east"
    );
}

#[test]
fn old_script_triggers_do_not_echo_what_walbridge_applies() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    d.walbridge_ok(&["setup"]);
    // The old script's trigger on west, made to fire even for walbridge's replica-role
    // session: it logs what walbridge applies, without knowing walbridge's columns. Like
    // any trigger that fires for applied changes, it qualifies names: walbridge's sessions
    // pin search_path (as PostgreSQL's own apply worker does).
    d.sql(
        "west",
        "CREATE FUNCTION old_log() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO public.database_changes (metodo, tabla, descripcion)
           VALUES (TG_OP, TG_TABLE_NAME, pg_catalog.row_to_json(NEW)::jsonb);
           RETURN NULL;
         END $$;
         CREATE TRIGGER old_log AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION old_log();
         ALTER TABLE users ENABLE ALWAYS TRIGGER old_log;",
    );
    let out = d.walbridge_ok(&["setup"]);
    assert!(out.contains("trigger old_log on public.users"), "{out}");
    let _run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO users (id, name) VALUES (1, 'once')");
    d.wait_for("west", "SELECT name FROM users", "once");
    wait_drained(&d);
    // The old trigger's row named east as its origin and was dropped, not sent back.
    assert_eq!(
        d.sql("west", "SELECT last_value FROM database_changes_id_seq"),
        "1"
    );
    assert_eq!(
        d.sql(
            "east",
            "SELECT count(*) FROM walbridge.trigger_progress WHERE last_id = 1"
        ),
        "1"
    );
    assert_eq!(
        d.sql("east", "SELECT count(*) FROM walbridge.conflicts"),
        "0"
    );
}

#[test]
fn partitioned_tables_replicate_through_their_root() {
    let d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE public.m_low PARTITION OF public.m FOR VALUES FROM (0) TO (100);
         CREATE TABLE public.m_high PARTITION OF public.m FOR VALUES FROM (100) TO (200);",
        &trigger_toml(""),
    );
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO m VALUES (1, 'low'), (150, 'high')");
    d.wait_for(
        "west",
        "SELECT string_agg(v, ',' ORDER BY id) FROM m",
        "low,high",
    );
    // An update that moves the row to the other partition.
    d.sql("west", "UPDATE m SET id = 199 WHERE id = 1");
    d.wait_for(
        "east",
        "SELECT string_agg(id || tableoid::regclass::text, ',' ORDER BY id) FROM m",
        "150m_high,199m_high",
    );
    // (Partitions are not replicated tables of their own: rows logged under a partition's
    // name would have gone to the dead-letter table.)
    wait_drained(&d);
    assert_eq!(
        d.sql("east", "SELECT count(*) FROM database_changes_dead"),
        "0"
    );
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM database_changes_dead"),
        "0"
    );
}

#[test]
fn trigger_apply_commits_durably_under_synchronous_commit_off() {
    // Both servers default to synchronous_commit = off. A batch's source rows are deleted once
    // the peer has committed it, so the peer's commit must be flushed first: the apply
    // transaction runs with synchronous_commit on. A trigger that fires for applied rows
    // (ENABLE ALWAYS) records the setting inside that transaction.
    let schema = format!(
        "{SCHEMA}
         CREATE SCHEMA audit;
         CREATE TABLE audit.seen (setting text);
         CREATE FUNCTION audit.note() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog
           AS $$ BEGIN
             INSERT INTO audit.seen VALUES (pg_catalog.current_setting('synchronous_commit'));
             RETURN NEW;
           END $$;
         CREATE TRIGGER note AFTER INSERT ON public.users FOR EACH ROW EXECUTE FUNCTION audit.note();
         ALTER TABLE public.users ENABLE ALWAYS TRIGGER note;"
    );
    let d = Deployment::with_conf(
        &["east", "west"],
        &schema,
        &trigger_toml(""),
        &["synchronous_commit = off"],
    );
    assert_eq!(d.sql("west", "SHOW synchronous_commit"), "off");
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
    d.sql(
        "east",
        "INSERT INTO users (id, name) VALUES (1, 'a'), (2, 'b')",
    );
    d.wait_for("west", "SELECT count(*) FROM users", "2");
    wait_drained(&d);
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(DISTINCT setting, ',') FROM audit.seen"
        ),
        "on",
        "the apply transaction on west must flush its commit before east's rows are deleted"
    );
}

#[test]
fn a_lookup_that_waits_for_a_local_writer_sees_that_writers_commit_time() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO users (id, name) VALUES (1, 'base')");
    d.wait_for("west", "SELECT name FROM users WHERE id = 1", "base");
    // A local writer on west holds the row for a while and commits last; meanwhile east's
    // earlier edit reaches west, whose lookup waits for that lock and must then see the
    // writer's commit time, not the version it replaced.
    let west = d.node("west");
    let mut writer = std::process::Command::new(west.client_tool("psql").expect("psql"))
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &west.port().to_string(),
        ])
        .args(["-U", "postgres", "-d", "postgres", "-c"])
        .arg(
            "BEGIN; UPDATE users SET name = 'west, later' WHERE id = 1; \
             SELECT pg_sleep(2); COMMIT;",
        )
        .spawn()
        .expect("start the local writer");
    d.wait_for(
        "west",
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE a.query LIKE '%west, later%' AND l.locktype = 'transactionid' AND l.mode = 'ExclusiveLock'",
        "1",
    );
    d.sql(
        "east",
        "UPDATE users SET name = 'east, earlier' WHERE id = 1",
    );
    assert!(writer.wait().expect("the local writer").success());
    for n in ["east", "west"] {
        d.wait_for(n, "SELECT name FROM users WHERE id = 1", "west, later");
    }
    wait_drained(&d);
    for n in ["east", "west"] {
        assert_eq!(
            d.sql(n, "SELECT name FROM users WHERE id = 1"),
            "west, later",
            "{n} after both directions drained"
        );
    }
}

/// Issue 12's one pipeline, its common path: change rows (JSON and the old script's Python
/// dicts, a partial update, a changed key, a delete) become framed events
/// (`trigger::events`) and the stream's `Applier` applies them, recording the change-table
/// cursor in the same transaction through the progress seam (`apply::position`) and leaving
/// the origin's LSN (where a stream resumes after a cut-over) where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_rows_apply_through_the_stream_applier_with_their_cursor() {
    use walbridge::apply::{Applier, ApplyLimits};
    use walbridge::lsn::{Lsn, PgTimestamp};
    use walbridge::protocol::{self, pipeline::Pipeline, ConnectOptions};
    use walbridge::trigger::{events::TxnBuilder, recorded_progress, RawRow, State};

    let d = tokio::task::block_in_place(|| {
        let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
        d.walbridge_ok(&["setup"]);
        d.sql(
            "west",
            "INSERT INTO users VALUES (5, 'local', NULL, 7, false, NULL), (7, 'local7', NULL, NULL, NULL, NULL)",
        );
        // Where a stream would resume after a cut-over: must not move.
        d.sql(
            "west",
            "SELECT pg_replication_origin_advance('walbridge_from_east', '0/5000000')",
        );
        d
    });
    let config = Arc::new(walbridge::config::Config::load(&d.config).expect("config"));
    let dsn = config.node("west").expect("node west").dsn.clone();
    let mut options = ConnectOptions::replication("walbridge-test-trigger-apply");
    options.replication = false;
    let raw = protocol::connect(&dsn, options)
        .await
        .expect("apply session");
    let (pipe, driver) = Pipeline::from_raw(raw);
    tokio::spawn(driver);
    let catalog = walbridge::pgconn::connect(&dsn, "walbridge-test-catalog")
        .await
        .expect("catalog session");
    let users = Arc::new(
        walbridge::catalog::table_info(&catalog, "public", "users")
            .await
            .expect("catalog")
            .expect("users on west"),
    );
    let limits = ApplyLimits {
        max_in_flight: 1,
        durable_commits: true,
        ..ApplyLimits::default()
    };
    let (mut applier, progress) = Applier::start(
        pipe,
        catalog,
        config,
        "east",
        "west",
        walbridge::metrics::Metrics::new(),
        limits,
    )
    .await
    .expect("applier");
    assert_eq!(progress, "0/5000000".parse::<Lsn>().expect("lsn"));

    let row = |id: i64, txid: u64, metodo: &str, descripcion: &str| RawRow {
        id,
        metodo: Some(metodo.into()),
        tabla: Some("users".into()),
        descripcion: Some(descripcion.into()),
        origin_node: None,
        txid: Some(txid),
        commit_time: Some(PgTimestamp::now()),
        created_at: None,
        old_key: None,
    };
    let mut changed_key = row(5, 1002, "UPDATE", r#"{"id": 20, "name": "moved"}"#);
    changed_key.old_key = Some(r#"{"id": 2}"#.into());
    // Older than west's own version of row 7: a conflict, decided as in stream mode.
    let mut too_old = row(6, 1003, "UPDATE", "{'id': 7, 'name': 'too old'}");
    too_old.commit_time = Some(PgTimestamp(0));
    // Again, now that the table is contended: the resolving statement journals it.
    let mut older_still = row(7, 1004, "UPDATE", "{'id': 7, 'name': 'older still'}");
    older_still.commit_time = Some(PgTimestamp(0));
    let batches = vec![
        vec![
            row(
                1,
                1000,
                "INSERT",
                r#"{"id": 1, "name": "ana", "tags": ["a", "b c"], "balance": 10.50, "active": true, "born": "2000-01-02"}"#,
            ),
            row(
                2,
                1000,
                "INSERT",
                "{'id': 2, 'name': 'bo', 'tags': None, 'balance': Decimal('1e20')}",
            ),
            row(3, 1001, "UPDATE", "{'id': 1, 'name': 'ana maria'}"),
        ],
        vec![row(4, 1001, "DELETE", r#"{"id": 5}"#), changed_key, too_old],
        vec![older_still],
    ];
    let mut state = State::default();
    let mut builder = TxnBuilder::new("walbridge", PgTimestamp::now());
    tokio::time::timeout(Duration::from_secs(60), async {
        for batch in batches {
            builder.set_read_at(PgTimestamp::now());
            for r in &batch {
                builder.push_row(r, users.clone(), &[]).expect("a good row");
            }
            for txn in builder.take() {
                state = state.advance(&txn.rows, 1000, false).0;
                applier.set_next_position(recorded_progress("east", &state));
                for event in txn.events {
                    applier.on_event(event, true).await.expect("apply");
                }
            }
            applier.close_group().await.expect("close");
            // As the stream's loop: replies, and redos after a failed group.
            while !applier.idle() || applier.has_in_flight() {
                if applier.has_redo() {
                    applier.redo_one().await.expect("redo");
                } else {
                    applier.on_reply().await.expect("reply");
                }
            }
        }
        applier.finish().await.expect("finish")
    })
    .await
    .expect("the applier did not finish");

    tokio::task::block_in_place(|| {
        assert_eq!(
            d.sql("west", "SELECT string_agg(concat_ws('|', id, name, tags, balance, active, born), ' ' ORDER BY id) FROM users"),
            "1|ana maria|{a,\"b c\"}|10.50|t|2000-01-02 7|local7 20|moved|100000000000000000000"
        );
        assert_eq!(
            d.sql("west", "SELECT last_id || ' ' || hold_xid FROM walbridge.trigger_progress WHERE source = 'east'"),
            "7 1000"
        );
        assert_eq!(
            d.sql(
                "west",
                "SELECT string_agg(concat_ws(' ', kind, resolution, source_change_id), ',' \
                 ORDER BY source_change_id) FROM walbridge.conflicts"
            ),
            // Journaled with the change row it came from, as the trigger worker does.
            "update_older skipped 6,update_older skipped 7"
        );
        assert_eq!(
            d.sql("west", "SELECT string_agg(id::text, ',' ORDER BY id) FROM walbridge.trigger_applied WHERE source = 'east'"),
            "1,2,3,4,5,6,7"
        );
        assert_eq!(
            d.sql(
                "west",
                "SELECT pg_replication_origin_progress('walbridge_from_east', false)"
            ),
            "0/5000000"
        );
    });
}

/// The values trigger mode writes, type by type: every type the old script and `row_to_json`
/// write, JSON and Python literals, partial inserts and updates, a delete. Expected: what the
/// old trigger worker wrote (`descripcion` as one JSON parameter through
/// `json_populate_record` on the target), to which the event path (`trigger::events` through
/// the wal2json converter into `apply::Applier`) was compared row by row before the worker's
/// own applier was removed; a `json` column compares as jsonb (the worker's value went through
/// jsonb, the event path keeps the row's compact JSON).
#[test]
fn legacy_and_json_rows_write_the_values_the_old_worker_wrote() {
    const KINDS: &str = "CREATE TABLE public.kinds (id int PRIMARY KEY, t text, n numeric, \
        b boolean, d date, ts timestamptz, tm time, iv interval, u uuid, f float8, ia int[], \
        ta text[], j jsonb, js json, bt bytea, g text GENERATED ALWAYS AS (upper(t)) STORED);";
    let rows: Vec<(&str, &str)> = vec![
        (
            "INSERT",
            r#"{"id": 1, "t": "a \"q\" \\ b", "n": 12.50, "b": true, "d": "2024-01-02",
                "ts": "2024-01-02T03:04:05.6+00:00", "tm": "03:04:05", "iv": "1 day 02:00:00",
                "u": "12345678-1234-5678-1234-567812345678", "f": 1.5e300, "ia": [1, 2, null],
                "ta": ["x y", "{z}", null, "\"q\"", "NULL", ""], "j": {"k": [1, "v"], "s": "t"},
                "js": [1, {"a": 2}], "bt": "\\x00ff"}"#,
        ),
        (
            "insert",
            "{'id': 2, 't': \"O'Brien\", 'n': Decimal('-0.001'), 'b': False, \
              'd': datetime.date(1999, 12, 31), \
              'ts': datetime.datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=datetime.timezone.utc), \
              'tm': datetime.time(3, 4, 5, 6), 'iv': datetime.timedelta(days=1, seconds=5), \
              'u': UUID('12345678-1234-5678-1234-567812345678'), 'ia': [1, 2], 'ta': ('x',), \
              'f': 0.1, 'j': None}",
        ),
        ("INSERT", r#"{"id": 3}"#),
        (
            "INSERT",
            r#"{"id": 4, "ia": [[1, 2], [3, 4]], "j": "just a string", "js": null}"#,
        ),
        ("Update", "{'id': 1, 't': 'changed', 'ia': []}"),
        ("UPDATE", r#"{"id": 2, "j": [true, null], "n": 1e20}"#),
        ("DELETE", r#"{"id": 3}"#),
    ];
    const WRITTEN: &str = r#"(1,changed,12.50,t,2024-01-02,"2024-01-02 03:04:05.6",03:04:05,"1 day 02:00:00",12345678-1234-5678-1234-567812345678,1.5e+300,{},"{""x y"",""{z}"",NULL,""\\""q\\"""",""NULL"",""""}","{""k"": [1, ""v""], ""s"": ""t""}","[1, {""a"": 2}]","\\x00ff",CHANGED)
(2,O'Brien,100000000000000000000,f,1999-12-31,"2024-01-02 03:04:05.6",03:04:05.000006,24:00:05,12345678-1234-5678-1234-567812345678,0.1,"{1,2}",{x},"[true, null]",,,O'BRIEN)
(4,,,,,,,,,,"{{1,2},{3,4}}",,"""just a string""",,,)"#;

    let d = Deployment::new(&["east", "west"], KINDS, &trigger_toml(""));
    // The old script's table (text descripcion: Python dicts fit), kept by setup.
    d.sql(
        "east",
        "CREATE TABLE public.database_changes (id serial PRIMARY KEY, metodo varchar(10), \
         tabla varchar(100), descripcion text)",
    );
    d.walbridge_ok(&["setup"]);
    // The same rows as the old script's triggers (or a person) would log them.
    for (metodo, descripcion) in &rows {
        d.sql(
            "east",
            &format!(
                "INSERT INTO database_changes (metodo, tabla, descripcion) VALUES ({}, 'kinds', {})",
                walbridge::catalog::quote_literal(metodo),
                walbridge::catalog::quote_literal(descripcion)
            ),
        );
    }
    let _run = d.spawn_run("run.log");
    d.wait_for("east", "SELECT count(*) FROM database_changes", "0");
    assert_eq!(
        d.sql("east", "SELECT count(*) FROM database_changes_dead"),
        "0"
    );
    let written = d.sql(
        "west",
        "SELECT string_agg((k.id, k.t, k.n, k.b, k.d, k.ts AT TIME ZONE 'UTC', k.tm, k.iv, k.u, k.f, k.ia, k.ta, \
         k.j, k.js::jsonb, k.bt, k.g)::text, E'\\n' ORDER BY id) FROM public.kinds AS k",
    );
    assert_eq!(written, WRITTEN);
}

/// One echo rule for both modes: a stream-mode apply session names its source in
/// `walbridge.origin`, as the trigger worker's does, so a change-logging trigger that still
/// fires for applied rows (an old script's, where walbridge may not set
/// `session_replication_role`) logs them with `origin_node` set and they are never sent back.
#[test]
fn a_stream_apply_session_names_its_source_for_change_logging_triggers() {
    let d = Deployment::new(
        &["east", "west"],
        &format!("{SCHEMA} CREATE TABLE public.seen (origin text);"),
        "tables = [\"public.users\"]",
    );
    d.walbridge_ok(&["setup"]);
    // Fires for applied rows too (as an ordinary trigger does without the replica role).
    d.sql(
        "west",
        "CREATE FUNCTION public.log_origin() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO public.seen VALUES (coalesce(current_setting('walbridge.origin', true), '<unset>'));
             RETURN NULL;
         END $$;
         CREATE TRIGGER log_origin AFTER INSERT ON public.users
             FOR EACH ROW EXECUTE FUNCTION public.log_origin();
         ALTER TABLE public.users ENABLE ALWAYS TRIGGER log_origin;",
    );
    d.sql(
        "east",
        "INSERT INTO users (id, name) VALUES (1, 'from east')",
    );
    d.replicate_once("run.log");
    assert_eq!(
        d.sql("west", "SELECT name FROM users WHERE id = 1"),
        "from east"
    );
    assert_eq!(
        d.sql("west", "SELECT string_agg(origin, ',') FROM seen"),
        "east"
    );
}

/// A row the target refuses in SQL (a CHECK constraint west alone has), in the middle of one
/// source transaction: the applier names that change, it goes to the dead-letter table with
/// the server's error, and the rows before and after it, in the same and the next
/// transaction, are applied once. Row values stay out of the log.
#[test]
fn a_row_the_target_refuses_is_dead_and_its_neighbours_apply() {
    let d = Deployment::new(&["east", "west"], SCHEMA, &trigger_toml(""));
    d.walbridge_ok(&["setup"]);
    d.sql(
        "west",
        "ALTER TABLE users ADD CONSTRAINT west_balance CHECK (balance IS NULL OR balance >= 0)",
    );
    let run = d.spawn_run("run.log");
    d.sql(
        "east",
        "BEGIN;
         INSERT INTO users (id, name) VALUES (1, 'before');
         INSERT INTO users (id, name, balance) VALUES (2, 'refused', -987654);
         UPDATE users SET name = 'before, updated' WHERE id = 1;
         INSERT INTO users (id, name) VALUES (3, 'after');
         COMMIT;
         INSERT INTO users (id, name) VALUES (4, 'next transaction');",
    );
    d.wait_for(
        "west",
        "SELECT string_agg(id || ':' || name, ',' ORDER BY id) FROM users",
        "1:before, updated,3:after,4:next transaction",
    );
    d.wait_for("east", "SELECT count(*) FROM database_changes", "0");
    let dead = d.sql(
        "east",
        "SELECT string_agg(format('%s|%s|%s', target_node, descripcion::text LIKE '%-987654%', error), E'\\n') \
           FROM database_changes_dead",
    );
    assert!(dead.starts_with("west|t|"), "{dead}");
    assert!(
        dead.contains("west_balance") && dead.contains("23514"),
        "{dead}"
    );
    // The dead-letter table keeps the failing row; the log does not.
    assert!(dead.contains("-987654"), "{dead}");
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(
        wait_until(WAIT, || run
            .log()
            .contains("moved a change row to the dead-letter table")),
        "{}",
        run.log()
    );
    assert!(!run.log().contains("987654"), "{}", run.log());
    // East still has the row west refused; nothing else differs.
    assert_eq!(d.sql("east", "SELECT count(*) FROM users"), "4");
}
