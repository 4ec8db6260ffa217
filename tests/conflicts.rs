//! Conflicts: both nodes write the same rows while replication is stopped, then replication
//! runs; every case ends with both nodes identical, the outcome the policy defines, and the
//! conflict recorded where it was resolved.

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text);";

fn pair(policy: &str, priority: &str) -> Deployment {
    let d = Deployment::new(
        &["a", "b"],
        SCHEMA,
        &format!("tables = [\"public.items\"]\nconflict = \"{policy}\"\npriority = [{priority}]"),
    );
    d.walbridge_ok(&["setup"]);
    d
}

/// Rows 1..=3 present on both nodes, written by `a` and replicated to `b`.
fn seeded(policy: &str, priority: &str) -> Deployment {
    let d = pair(policy, priority);
    d.sql(
        "a",
        "INSERT INTO items VALUES (1, 'seed'), (2, 'seed'), (3, 'seed')",
    );
    d.replicate_once("seed.log");
    assert_eq!(d.sql("b", "SELECT count(*) FROM items"), "3");
    d
}

fn value(d: &Deployment, node: &str, id: i32) -> String {
    d.sql(
        node,
        &format!("SELECT coalesce((SELECT v FROM items WHERE id = {id}), '<none>')"),
    )
}

/// `kind/resolution` of every conflict recorded on `node`, in order.
fn conflicts(d: &Deployment, node: &str) -> String {
    d.sql(
        node,
        "SELECT coalesce(string_agg(kind || '/' || resolution || ':' || source || '>' || target, ' ' ORDER BY id), '') FROM walbridge.conflicts",
    )
}

fn converged(d: &Deployment) {
    assert_eq!(
        d.fingerprint("a", "items", "id"),
        d.fingerprint("b", "items", "id")
    );
}

#[test]
fn lww_update_update_later_wins_on_both_nodes() {
    let d = seeded("last_write_wins", "\"a\", \"b\"");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 1");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 1");
    d.replicate_once("run.log");
    assert_eq!(value(&d, "a", 1), "from b");
    assert_eq!(value(&d, "b", 1), "from b");
    converged(&d);
    assert_eq!(conflicts(&d, "b"), "update_older/skipped:a>b");
    assert_eq!(conflicts(&d, "a"), "");
    // The conflict row carries both versions.
    assert_eq!(
        d.sql("b", "SELECT key::text || ' ' || (local_row->>'v') || ' ' || (remote_row->>'v') FROM walbridge.conflicts"),
        "[\"1\"] from b from a"
    );
}

#[test]
fn lww_insert_insert_of_one_key_keeps_the_later_row() {
    let d = pair("last_write_wins", "\"a\", \"b\"");
    d.sql("a", "INSERT INTO items VALUES (7, 'from a')");
    d.sql("b", "INSERT INTO items VALUES (7, 'from b')");
    d.replicate_once("run.log");
    assert_eq!(value(&d, "a", 7), "from b");
    converged(&d);
    assert_eq!(conflicts(&d, "a"), "insert_exists/applied:b>a");
    assert_eq!(conflicts(&d, "b"), "insert_exists/skipped:a>b");
}

#[test]
fn lww_update_then_later_delete_deletes_everywhere() {
    let d = seeded("last_write_wins", "\"a\", \"b\"");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 2");
    d.sql("b", "DELETE FROM items WHERE id = 2");
    d.replicate_once("run.log");
    assert_eq!(value(&d, "a", 2), "<none>");
    assert_eq!(value(&d, "b", 2), "<none>");
    converged(&d);
    assert_eq!(conflicts(&d, "b"), "update_missing/skipped:a>b");
    assert_eq!(conflicts(&d, "a"), "");
}

#[test]
fn lww_delete_then_later_update_keeps_the_row_everywhere() {
    let d = seeded("last_write_wins", "\"a\", \"b\"");
    d.sql("a", "DELETE FROM items WHERE id = 2");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 2");
    d.replicate_once("run.log");
    assert_eq!(value(&d, "a", 2), "from b");
    assert_eq!(value(&d, "b", 2), "from b");
    converged(&d);
    assert_eq!(conflicts(&d, "a"), "update_missing/applied:b>a");
    assert_eq!(conflicts(&d, "b"), "delete_older/skipped:a>b");
}

#[test]
fn lww_delete_delete_is_recorded_and_converges() {
    let d = seeded("last_write_wins", "\"a\", \"b\"");
    d.sql("a", "DELETE FROM items WHERE id = 3");
    d.sql("b", "DELETE FROM items WHERE id = 3");
    d.replicate_once("run.log");
    converged(&d);
    assert_eq!(d.sql("a", "SELECT count(*) FROM items"), "2");
    assert_eq!(conflicts(&d, "a"), "delete_missing/skipped:b>a");
    assert_eq!(conflicts(&d, "b"), "delete_missing/skipped:a>b");
}

/// Gives the target's row the exact commit time of the source's change, as if both nodes had
/// committed in the same microsecond: the row is rewritten on `node` under an origin walbridge
/// does not know (so it counts as a local write, and is not replicated itself) with the commit
/// time forged through `pg_replication_origin_xact_setup`.
fn forge_local_version(d: &Deployment, node: &str, id: i32, v: &str, time: &str) {
    d.sql(
        node,
        &format!(
            "SELECT pg_replication_origin_create('test_forge');
             SELECT pg_replication_origin_session_setup('test_forge');
             BEGIN;
             SELECT pg_replication_origin_xact_setup('0/1', '{time}');
             UPDATE items SET v = '{v}' WHERE id = {id};
             COMMIT;"
        ),
    );
}

fn tie(priority: &str) -> (Deployment, String) {
    let d = seeded("last_write_wins", priority);
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 1");
    let time = d.sql(
        "b",
        "SELECT pg_xact_commit_timestamp(xmin) FROM items WHERE id = 1",
    );
    forge_local_version(&d, "a", 1, "from a", &time);
    assert_eq!(
        d.sql(
            "a",
            "SELECT pg_xact_commit_timestamp(xmin) FROM items WHERE id = 1"
        ),
        time
    );
    d.replicate_once("run.log");
    (d, time)
}

#[test]
fn lww_exact_tie_goes_to_the_node_first_in_priority() {
    // a first: a keeps its row and records b's change as the loser.
    let (d, _) = tie("\"a\", \"b\"");
    assert_eq!(value(&d, "a", 1), "from a");
    assert_eq!(conflicts(&d, "a"), "update_older/skipped:b>a");
    // b first: b's change wins on a.
    let (d, _) = tie("\"b\", \"a\"");
    assert_eq!(value(&d, "a", 1), "from b");
    assert_eq!(conflicts(&d, "a"), "");
}

#[test]
fn node_priority_higher_node_wins_whatever_the_times() {
    let d = seeded("node_priority", "\"a\", \"b\"");
    // b inserts key 8 later than a, but a has priority.
    d.sql("a", "INSERT INTO items VALUES (8, 'from a')");
    d.sql("b", "INSERT INTO items VALUES (8, 'from b')");
    // b's own rows: a's later update of one and b's delete of the other race.
    d.sql("b", "INSERT INTO items VALUES (10, 'b row'), (11, 'b row')");
    d.replicate_once("run.log");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 10");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 10");
    d.sql("a", "UPDATE items SET v = 'a updates' WHERE id = 11");
    d.sql("b", "DELETE FROM items WHERE id = 11");
    d.replicate_once("run2.log");
    for node in ["a", "b"] {
        assert_eq!(value(&d, node, 8), "from a", "{node}");
        assert_eq!(value(&d, node, 10), "from a", "{node}");
        assert_eq!(value(&d, node, 11), "a updates", "{node}");
    }
    converged(&d);
    assert_eq!(
        conflicts(&d, "a"),
        "insert_exists/skipped:b>a update_older/skipped:b>a delete_older/skipped:b>a"
    );
    assert_eq!(
        conflicts(&d, "b"),
        "insert_exists/applied:a>b update_missing/applied:a>b"
    );
}

#[test]
fn node_priority_discards_a_lower_node_edit_of_a_row_the_higher_node_wrote() {
    let d = seeded("node_priority", "\"a\", \"b\"");
    // Row 3 was written by a: b's update and delete are discarded on b itself (its peers
    // would discard them), and so is b's re-insert of a key a deleted.
    assert_eq!(
        d.sql("b", "WITH u AS (UPDATE items SET v = 'b edits' WHERE id = 3 RETURNING 1) SELECT count(*) FROM u"),
        "0"
    );
    d.sql("b", "DELETE FROM items WHERE id = 2");
    d.sql("a", "DELETE FROM items WHERE id = 1");
    d.replicate_once("run.log");
    d.sql("b", "INSERT INTO items VALUES (1, 'b again')");
    // b's own row: b's edits stand, and reach a.
    d.sql("b", "INSERT INTO items VALUES (5, 'b row')");
    d.sql("b", "UPDATE items SET v = 'b edits' WHERE id = 5");
    d.replicate_once("run2.log");
    for node in ["a", "b"] {
        assert_eq!(value(&d, node, 1), "<none>", "{node}");
        assert_eq!(value(&d, node, 2), "seed", "{node}");
        assert_eq!(value(&d, node, 3), "seed", "{node}");
        assert_eq!(value(&d, node, 5), "b edits", "{node}");
    }
    converged(&d);
    assert_eq!(conflicts(&d, "a"), "");
    // walbridge's own apply sessions are not guarded: a's later edit of b's row reaches b.
    d.sql("a", "UPDATE items SET v = 'a edits' WHERE id = 5");
    d.replicate_once("run3.log");
    assert_eq!(value(&d, "b", 5), "a edits");
}

#[test]
fn node_priority_reinsert_after_the_sources_own_delete_in_one_transaction_is_kept() {
    let d = pair("node_priority", "\"a\", \"b\"");
    d.sql("b", "INSERT INTO items VALUES (7, 'b row')");
    d.replicate_once("seed.log");
    // Applied on a as one transaction: the tombstone the delete leaves there is b's own
    // version (no commit time yet), not a's, so b's re-insert wins over it.
    d.sql(
        "b",
        "BEGIN; DELETE FROM items WHERE id = 7; INSERT INTO items VALUES (7, 'b again'); COMMIT",
    );
    d.replicate_once("run.log");
    assert_eq!(value(&d, "a", 7), "b again");
    converged(&d);
    assert_eq!(conflicts(&d, "a"), "");
}

#[test]
fn error_policy_stops_the_direction_and_applies_nothing() {
    let d = seeded("error", "\"a\", \"b\"");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 1");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 1");
    d.sql("b", "INSERT INTO items VALUES (9, 'b only')");
    let mut run = d.spawn_run("run.log");
    // b -> a has no conflict (b's update is newer) and applies; a -> b stops.
    d.wait_for("a", "SELECT v FROM items WHERE id = 9", "b only");
    let stopped = wait_until(WAIT, || {
        // Keys and rows are withheld from logs by default ([log] row_contents).
        run.log().contains("conflict on public.items key (withheld")
    });
    assert!(stopped, "log:\n{}", run.log());
    let log = run.log();
    assert!(log.contains("under conflict policy \"error\""), "{log}");
    assert!(log.contains("from a to b"), "{log}");
    assert_eq!(value(&d, "b", 1), "from b");
    run.assert_running();
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0));
    // Nothing of a's conflicting transaction was applied or recorded as resolved.
    assert_eq!(conflicts(&d, "b"), "");
}

#[test]
fn conflict_per_table_overrides_the_policy() {
    let d = Deployment::new(
        &["a", "b"],
        "CREATE TABLE public.items (id int PRIMARY KEY, v text); CREATE TABLE public.cache (id int PRIMARY KEY, v text);",
        "tables = [\"public.*\"]\nconflict = \"last_write_wins\"\npriority = [\"a\", \"b\"]\n\
         conflict_per_table = { \"public.cache\" = \"node_priority\" }",
    );
    d.walbridge_ok(&["setup"]);
    d.sql(
        "a",
        "INSERT INTO items VALUES (1, 'a'); INSERT INTO cache VALUES (1, 'a')",
    );
    d.sql(
        "b",
        "INSERT INTO items VALUES (1, 'b'); INSERT INTO cache VALUES (1, 'b')",
    );
    d.replicate_once("run.log");
    // items: later (b) wins; cache: a wins by priority.
    assert_eq!(d.sql("a", "SELECT v FROM items"), "b");
    assert_eq!(d.sql("a", "SELECT v FROM cache"), "a");
    assert_eq!(d.sql("b", "SELECT v FROM cache"), "a");
}

#[test]
fn sequence_ranges_keep_generated_keys_apart() {
    let d = Deployment::new(
        &["a", "b"],
        "CREATE TABLE public.orders (id bigserial PRIMARY KEY, note text);
         CREATE TABLE public.events (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text);",
        "tables = [\"public.*\"]\nsequence_ranges = true",
    );
    // Existing data (on both nodes, as after an initial copy): ranges start past it.
    d.sql("a", "INSERT INTO orders (note) VALUES ('before setup')");
    d.sql("b", "INSERT INTO orders VALUES (1, 'before setup')");
    let out = d.walbridge_ok(&["setup"]);
    assert!(
        out.contains("public.orders.id: a from 3 by 2 b from 2 by 2"),
        "{out}"
    );
    // Idempotent: a second setup leaves the sequences where they are.
    let again = d.walbridge_ok(&["setup"]);
    assert!(again.contains("a keeps 1+2k b keeps 2+2k"), "{again}");
    for node in ["a", "b"] {
        d.sql(
            node,
            &format!("INSERT INTO orders (note) SELECT '{node}' FROM generate_series(1, 5)"),
        );
        d.sql(
            node,
            &format!("INSERT INTO events (note) SELECT '{node}' FROM generate_series(1, 5)"),
        );
    }
    d.replicate_once("run.log");
    assert_eq!(d.sql("a", "SELECT count(*) FROM orders"), "11");
    assert_eq!(d.sql("b", "SELECT count(*) FROM events"), "10");
    assert_eq!(
        d.sql(
            "a",
            "SELECT bool_and(id % 2 = 1) FROM orders WHERE note = 'a'"
        ),
        "t"
    );
    assert_eq!(
        d.sql(
            "a",
            "SELECT bool_and(id % 2 = 0) FROM events WHERE note = 'b'"
        ),
        "t"
    );
    assert_eq!(conflicts(&d, "a") + &conflicts(&d, "b"), "");
    for table in ["orders", "events"] {
        assert_eq!(
            d.fingerprint("a", table, "id"),
            d.fingerprint("b", table, "id")
        );
    }
}

/// `TRUNCATE ... RESTART IDENTITY` is replayed on every node, and each node's sequence restarts
/// at the first value of its own class (START WITH), not at 1 for everyone.
#[test]
fn sequence_ranges_survive_truncate_restart_identity() {
    let d = Deployment::new(
        &["a", "b"],
        "CREATE TABLE public.orders (id bigserial PRIMARY KEY, note text);
         CREATE TABLE public.events (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text);",
        "tables = [\"public.*\"]\nsequence_ranges = true",
    );
    d.walbridge_ok(&["setup"]);
    for node in ["a", "b"] {
        d.sql(
            node,
            &format!("INSERT INTO orders (note) SELECT '{node}' FROM generate_series(1, 3)"),
        );
    }
    d.replicate_once("before.log");
    assert_eq!(d.sql("b", "SELECT count(*) FROM orders"), "6");
    d.sql("a", "TRUNCATE orders, events RESTART IDENTITY");
    d.replicate_once("truncate.log");
    assert_eq!(d.sql("b", "SELECT count(*) FROM orders"), "0");
    for node in ["a", "b"] {
        for table in ["orders", "events"] {
            d.sql(
                node,
                &format!("INSERT INTO {table} (note) SELECT '{node}' FROM generate_series(1, 4)"),
            );
        }
    }
    d.replicate_once("after.log");
    for table in ["orders", "events"] {
        assert_eq!(
            d.sql(
                "a",
                &format!("SELECT string_agg(id || ':' || note, ' ' ORDER BY id) FROM {table}")
            ),
            "1:a 2:b 3:a 4:b 5:a 6:b 7:a 8:b",
            "{table}"
        );
        assert_eq!(
            d.fingerprint("a", table, "id"),
            d.fingerprint("b", table, "id")
        );
    }
    assert_eq!(conflicts(&d, "a") + &conflicts(&d, "b"), "");
}

/// The careful path reads its own replies only. After a restream, a durable-progress query may
/// still be in flight on the apply session when the careful transaction begins; its reply
/// must be taken as progress, not as the answer to `BEGIN` (which would shift every later
/// answer by one: the row lookup would see no row). Drives the applier on a real target and
/// forces exactly that interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn careful_apply_never_reads_a_reply_meant_for_a_progress_query() {
    use std::sync::Arc;
    use walbridge::apply::{ApplyLimits, Outcome};
    use walbridge::event::{
        Begin, Change, ChangeOp, Column, Commit, Event, Relation, ReplicaIdentity, Tuple, Value,
    };
    use walbridge::lsn::{Lsn, PgTimestamp};

    let d = tokio::task::block_in_place(|| {
        let d = pair("last_write_wins", "\"a\", \"b\"");
        // The target's row, written locally before the incoming (later) update.
        d.sql("b", "INSERT INTO items VALUES (1, 'old')");
        d
    });
    let config = Arc::new(walbridge::config::Config::load(&d.config).expect("config"));
    let (mut applier, progress) = start_applier(config, "a", "b", ApplyLimits::default()).await;
    assert_eq!(progress, Lsn::ZERO);

    let relation = Arc::new(Relation {
        oid: 4242,
        schema: "public".into(),
        table: "items".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                is_key: true,
            },
            Column {
                name: "v".into(),
                type_oid: 25,
                type_modifier: -1,
                is_key: false,
            },
        ],
    });
    let text = |s: &str| Value::Text(bytes::Bytes::from(s.to_string()));
    let commit_time = PgTimestamp::now();
    let end: Lsn = "0/1000100".parse().expect("lsn");
    let events = vec![
        Event::Begin(Begin {
            xid: 77,
            final_lsn: end,
            commit_time,
            origin: None,
        }),
        Event::Relation(relation.clone()),
        Event::Change(Change {
            op: ChangeOp::Update,
            relation,
            new: Some(Tuple(vec![text("1"), text("new")])),
            old: None,
            source_change_id: None,
        }),
        Event::Commit(Commit {
            commit_lsn: end,
            end_lsn: end,
            commit_time,
        }),
    ];

    let applied = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        // The restream's state: a progress query in flight, the next transaction careful.
        applier.request_progress().await.expect("progress query");
        applier.apply_next_transaction_carefully();
        for event in events {
            assert_eq!(
                applier.on_event(event, false).await.expect("apply"),
                Outcome::Continue
            );
        }
        applier.finish().await.expect("finish")
    })
    .await
    .expect("the applier lost track of its replies (timed out)");
    assert_eq!(applied, end);

    tokio::task::block_in_place(|| {
        assert_eq!(value(&d, "b", 1), "new");
        assert_eq!(conflicts(&d, "b"), "");
        assert_eq!(
            d.sql(
                "b",
                "SELECT pg_replication_origin_progress('walbridge_from_a', false)"
            ),
            "0/1000100"
        );
    });
}

#[test]
fn retention_purges_old_conflict_records_and_tombstones_at_start() {
    let d = Deployment::new(
        &["a", "b"],
        SCHEMA,
        "tables = [\"public.items\"]\nconflict_retention = \"1h\"\ntombstone_retention = \"1s\"",
    );
    d.walbridge_ok(&["setup"]);
    // A tombstone (the delete's commit time is its age) and two conflict records, one past
    // the retention and one within it.
    d.sql(
        "a",
        "INSERT INTO items VALUES (1, 'x'); DELETE FROM items WHERE id = 1",
    );
    assert_eq!(d.sql("a", "SELECT count(*) FROM walbridge.tombstones"), "1");
    // The applier's insert guard names the table in the error's structured fields (the
    // applier reads them; it never parses the message).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(
            &d.node("a").dsn("postgres"),
            tokio_postgres::NoTls,
        ))
        .expect("connect");
    rt.spawn(conn);
    let err = rt
        .block_on(client.execute(
            "SELECT walbridge.expect_no_tombstones('public.items'::regclass)",
            &[],
        ))
        .expect_err("the guard passed with a tombstone");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        (db.code().code(), db.schema(), db.table()),
        ("WB003", Some("public"), Some("items"))
    );
    drop(client);
    d.sql(
        "a",
        "INSERT INTO walbridge.conflicts (resolved_at, source, target, table_name, key, kind, resolution)
         VALUES (now() - interval '2 hours', 'b', 'a', 'public.items', '{\"id\": 7}', 'update_missing', 'skipped'),
                (now(), 'b', 'a', 'public.items', '{\"id\": 8}', 'update_missing', 'skipped')",
    );
    // The tombstone must be older than its 1 s retention when the purge runs.
    d.wait_for(
        "a",
        "SELECT bool_and(now() - pg_xact_commit_timestamp(xmin) > interval '2 seconds') FROM walbridge.tombstones",
        "t",
    );
    let _run = d.spawn_run("run.log");
    d.wait_for("a", "SELECT count(*) FROM walbridge.tombstones", "0");
    d.wait_for(
        "a",
        "SELECT string_agg(key->>'id', ',' ORDER BY id) FROM walbridge.conflicts",
        "8",
    );
}
