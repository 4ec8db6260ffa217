//! Conflict forensics: `walbridge conflicts` merges every node's journal, `walbridge why`
//! explains one row from its versions and the conflicts recorded for its key.

use serde_json::Value;

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text);";

/// Two nodes under last-write-wins; row 1 seeded by `a`, then updated on both sides while
/// replication is stopped (b's update is later), then replicated: b skips a's older update.
fn update_update_conflict() -> Deployment {
    let d = Deployment::new(
        &["a", "b"],
        SCHEMA,
        "tables = [\"public.items\"]\nconflict = \"last_write_wins\"\npriority = [\"a\", \"b\"]",
    );
    d.walbridge_ok(&["setup"]);
    d.sql("a", "INSERT INTO items VALUES (1, 'seed'), (2, 'seed')");
    d.replicate_once("seed.log");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 1");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 1");
    d.replicate_once("run.log");
    d
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// `walbridge why --node NODE --table TABLE --key KEY --json`, parsed.
fn why_json(d: &Deployment, node: &str, table: &str, key: &str) -> Value {
    json(&d.walbridge_ok(&[
        "why", "--node", node, "--table", table, "--key", key, "--json",
    ]))
}

#[test]
fn conflicts_lists_every_nodes_journal_newest_last() {
    let d = update_update_conflict();
    // A second conflict, on a, later than the first.
    d.sql("a", "INSERT INTO items VALUES (7, 'from a')");
    d.sql("b", "INSERT INTO items VALUES (7, 'from b')");
    d.replicate_once("run2.log");

    let out = json(&d.walbridge_ok(&["conflicts", "--json"]));
    let list = out["conflicts"].as_array().expect("conflicts array");
    let summary: Vec<String> = list
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {} {}>{}",
                c["node"].as_str().unwrap_or("?"),
                c["key"],
                c["kind"].as_str().unwrap_or("?"),
                c["resolution"].as_str().unwrap_or("?"),
                c["source"].as_str().unwrap_or("?"),
                c["target"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    // Newest last: the update conflict on b, then the two insert conflicts (one per node).
    assert_eq!(summary.len(), 3, "{summary:#?}");
    assert_eq!(summary[0], "b [\"1\"] update_older skipped a>b");
    let mut later = summary[1..].to_vec();
    later.sort();
    assert_eq!(
        later,
        [
            "a [\"7\"] insert_exists applied b>a",
            "b [\"7\"] insert_exists skipped a>b"
        ]
    );
    let times: Vec<&str> = list
        .iter()
        .map(|c| c["resolved_at"].as_str().unwrap_or(""))
        .collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "newest last");
    assert_eq!(list[0]["table"], "public.items");
    assert_eq!(list[0]["local_row"]["v"], "from b");
    assert_eq!(list[0]["remote_row"]["v"], "from a");
    assert!(list[0]["remote_commit_ts"].is_string());
    assert!(list[0]["local_commit_ts"].is_string());

    // Filters: --table of another table, --since a window that is over, the text form.
    let none = json(&d.walbridge_ok(&["conflicts", "--json", "--table", "public.other"]));
    assert_eq!(none["conflicts"].as_array().map(Vec::len), Some(0));
    let recent = json(&d.walbridge_ok(&["conflicts", "--json", "--since", "1h"]));
    assert_eq!(recent["conflicts"].as_array().map(Vec::len), Some(3));
    d.sql(
        "b",
        "UPDATE walbridge.conflicts SET resolved_at = resolved_at - interval '2 hours' WHERE kind = 'update_older'",
    );
    let recent = json(&d.walbridge_ok(&["conflicts", "--json", "--since", "1h"]));
    assert_eq!(recent["conflicts"].as_array().map(Vec::len), Some(2));
    let text = d.walbridge_ok(&["conflicts", "--table", "public.items"]);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.lines()
            .nth(1)
            .is_some_and(|l| l.contains("update_older")),
        "{text}"
    );
}

#[test]
fn why_explains_a_row_field_by_field() {
    let d = update_update_conflict();
    let out = why_json(&d, "a", "public.items", r#"{"id": 1}"#);
    assert_eq!(out["node"], "a");
    assert_eq!(out["table"], "public.items");
    assert_eq!(out["key"]["id"], 1);
    assert_eq!(out["journal_key"], serde_json::json!(["1"]));
    assert_eq!(out["policy"], "last_write_wins");
    // On a, the row is b's version, applied through b's origin, with b's commit time.
    let cur = &out["current"];
    assert_eq!(cur["node"], "a");
    assert_eq!(cur["exists"], true);
    assert_eq!(cur["row"], serde_json::json!({"id": 1, "v": "from b"}));
    assert_eq!(cur["written_by"], "b");
    let b_commit = d.sql(
        "b",
        "SELECT pg_catalog.to_json(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC')::text FROM items WHERE id = 1",
    );
    let b_commit = b_commit.trim_matches('"');
    let cur_commit = cur["commit_time"].as_str().expect("commit time");
    assert!(
        cur_commit.starts_with(b_commit),
        "{cur_commit} vs b's {b_commit}"
    );
    // On b, the same version, written by b itself.
    let others = out["others"].as_array().expect("others");
    assert_eq!(others.len(), 1);
    assert_eq!(others[0]["node"], "b");
    assert_eq!(
        others[0]["row"],
        serde_json::json!({"id": 1, "v": "from b"})
    );
    assert_eq!(others[0]["written_by"], "b");
    assert_eq!(others[0]["commit_time"], cur["commit_time"]);
    // The one conflict for the key, with both versions.
    let c = out["conflicts"].as_array().expect("conflicts");
    assert_eq!(c.len(), 1);
    assert_eq!(c[0]["node"], "b");
    assert_eq!(c[0]["kind"], "update_older");
    assert_eq!(c[0]["resolution"], "skipped");
    assert_eq!(c[0]["source"], "a");
    assert_eq!(c[0]["local_row"]["v"], "from b");
    assert_eq!(c[0]["remote_row"]["v"], "from a");
    assert!(
        c[0]["remote_commit_ts"].as_str() < c[0]["local_commit_ts"].as_str(),
        "the incoming change was older: {c:?}"
    );

    // A row without conflicts, written by a: no conflicts, a wrote it.
    let two = why_json(&d, "b", "public.items", r#"{"id": 2}"#);
    assert_eq!(two["current"]["written_by"], "a");
    assert_eq!(two["others"][0]["written_by"], "a");
    assert_eq!(two["conflicts"].as_array().map(Vec::len), Some(0));
    // A missing row.
    let gone = why_json(&d, "a", "public.items", r#"{"id": 99}"#);
    assert_eq!(gone["current"]["exists"], false);
    // Text form names the versions and the conflict.
    let text = d.walbridge_ok(&[
        "why",
        "--node",
        "a",
        "--table",
        "public.items",
        "--key",
        r#"{"id": 1}"#,
    ]);
    assert!(
        text.contains("written by b") && text.contains("update_older"),
        "{text}"
    );
    // A key that does not name the key columns is a usage error.
    let bad = d.walbridge(&[
        "why",
        "--node",
        "a",
        "--table",
        "public.items",
        "--key",
        r#"{"v": "x"}"#,
    ]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn replay_lists_the_conflicts_another_policy_would_decide_otherwise() {
    let d = update_update_conflict();
    d.sql("a", "INSERT INTO items VALUES (7, 'from a')");
    d.sql("b", "INSERT INTO items VALUES (7, 'from b')");
    d.replicate_once("run2.log");
    let journal = |node: &str| {
        d.sql(
            node,
            "SELECT string_agg(kind || ' ' || policy || ' ' || local_writer || ' ' || local_tombstone \
             || ' ' || coalesce(row_equals_old::text, '-') || ' ' || complete_row, '; ' ORDER BY id) \
             FROM walbridge.conflicts",
        )
    };
    // The journal keeps the facts of each decision.
    assert_eq!(
        journal("b"),
        "update_older last_write_wins b false - true; insert_exists last_write_wins b false - true"
    );
    assert_eq!(journal("a"), "insert_exists last_write_wins a false - true");
    let before = d.sql("a", "SELECT count(*) FROM walbridge.conflicts");

    // Replaying the policy that was used changes nothing.
    let same = json(&d.walbridge_ok(&[
        "conflicts",
        "replay",
        "--policy",
        "last_write_wins",
        "--json",
    ]));
    assert_eq!(same["policy"], "last_write_wins");
    assert_eq!(same["examined"], 3);
    assert_eq!(same["not_replayable"], 0);
    assert_eq!(same["changed"].as_array().map(Vec::len), Some(0));

    // Under node_priority with a first, a's versions win everywhere: all three change.
    let np = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", "node_priority", "--json"]));
    let mut changed: Vec<String> = np["changed"]
        .as_array()
        .expect("changed")
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {}->{}",
                c["conflict"]["node"].as_str().unwrap_or("?"),
                c["conflict"]["key"],
                c["conflict"]["kind"].as_str().unwrap_or("?"),
                c["recorded"].as_str().unwrap_or("?"),
                c["replayed"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    changed.sort();
    assert_eq!(
        changed,
        [
            "a [\"7\"] insert_exists update->skip",
            "b [\"1\"] update_older skip->update",
            "b [\"7\"] insert_exists skip->update",
        ]
    );
    // Under error every conflict stops the direction.
    let err = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", "error", "--json"]));
    assert_eq!(err["changed"].as_array().map(Vec::len), Some(3));
    assert!(err["changed"]
        .as_array()
        .is_some_and(|c| c.iter().all(|c| c["replayed"] == "stop")));
    // --since bounds the replay; an entry without the facts is counted, not guessed.
    d.sql(
        "b",
        "UPDATE walbridge.conflicts SET policy = NULL WHERE kind = 'update_older'",
    );
    let partial = json(&d.walbridge_ok(&[
        "conflicts",
        "replay",
        "--policy",
        "node_priority",
        "--since",
        "1h",
        "--json",
    ]));
    assert_eq!(partial["examined"], 3);
    assert_eq!(partial["not_replayable"], 1);
    assert_eq!(partial["changed"].as_array().map(Vec::len), Some(2));
    let text = d.walbridge_ok(&["conflicts", "replay", "--policy", "node_priority"]);
    assert!(text.starts_with("under node_priority: 2 of 3"), "{text}");
    // Read-only.
    assert_eq!(
        d.sql("a", "SELECT count(*) FROM walbridge.conflicts"),
        before
    );
    assert_eq!(value_of(&d, "b", 1), "from b");
}

fn value_of(d: &Deployment, node: &str, id: i32) -> String {
    d.sql(node, &format!("SELECT v FROM items WHERE id = {id}"))
}

/// libfaketime's library (Debian package `faketime`).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn clock_skew_of_a_node_300_ms_ahead_is_measured_within_20_ms() {
    use walbridge::localpg::{ClusterOptions, LocalCluster};
    if !std::path::Path::new(FAKETIME_LIB).is_file() {
        panic!("{FAKETIME_LIB} is missing: apt-get install faketime");
    }
    let ahead = LocalCluster::start(&ClusterOptions {
        server_env: vec![
            ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
            ("FAKETIME".into(), "+0.3".into()),
            ("FAKETIME_DONT_RESET".into(), "1".into()),
        ],
        ..ClusterOptions::default()
    })
    .expect("start a cluster under libfaketime");
    let clusters = vec![cluster(), cluster(), ahead];
    let mut d = Deployment::from_clusters(
        &["a", "b", "c"],
        SCHEMA,
        "tables = [\"public.items\"]\nconflict = \"last_write_wins\"",
        clusters,
    );
    let port = d.enable_metrics();
    let _run = d.setup_and_run();
    let skew = |node: &str, text: &str| {
        metric_sum(text, "walbridge_clock_skew_seconds", &[("node", node)])
    };
    let mut last = String::new();
    let measured = wait_until(std::time::Duration::from_secs(30), || {
        last = std::net::TcpStream::connect(("127.0.0.1", port))
            .map(|_| scrape(port))
            .unwrap_or_default();
        last.contains("walbridge_clock_skew_seconds{node=\"c\"}") && skew("c", &last) > 0.1
    });
    assert!(measured, "no skew measured:\n{last}");
    let (a, b, c) = (skew("a", &last), skew("b", &last), skew("c", &last));
    assert!(
        (c - 0.3).abs() < 0.02,
        "c is {c} s ahead of the median, not 0.3 ± 0.02"
    );
    assert!(a.abs() < 0.02 && b.abs() < 0.02, "a {a}, b {b}");
}

/// A node whose clock runs a second ahead edits a row; the other node edits it again right
/// after seeing that edit. By commit times the second edit looks older (by less than the
/// skew), so the fast node skips it: a last-write-wins decision the clocks cannot support,
/// journaled `ambiguous` and counted.
#[test]
fn lww_decision_closer_than_the_clock_skew_is_flagged_ambiguous() {
    use walbridge::localpg::{ClusterOptions, LocalCluster};
    let ahead = LocalCluster::start(&ClusterOptions {
        server_env: vec![
            ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
            ("FAKETIME".into(), "+1".into()),
            ("FAKETIME_DONT_RESET".into(), "1".into()),
        ],
        ..ClusterOptions::default()
    })
    .expect("start a cluster under libfaketime");
    let mut d = Deployment::from_clusters(
        &["a", "c"],
        SCHEMA,
        "tables = [\"public.items\"]\nconflict = \"last_write_wins\"",
        vec![cluster(), ahead],
    );
    let port = d.enable_metrics();
    let _run = d.setup_and_run();
    let mut last = String::new();
    let measured = wait_until(std::time::Duration::from_secs(30), || {
        last = std::net::TcpStream::connect(("127.0.0.1", port))
            .map(|_| scrape(port))
            .unwrap_or_default();
        metric_sum(&last, "walbridge_clock_skew_seconds", &[("node", "c")]) > 0.4
    });
    assert!(measured, "no skew measured:\n{last}");

    // c edits a seeded row, a edits it again once it has seen that: the n-th conflict.
    let race = |id: u32, n: u32| {
        d.sql("a", &format!("INSERT INTO items VALUES ({id}, 'seed')"));
        d.wait_for("c", &format!("SELECT v FROM items WHERE id = {id}"), "seed");
        d.sql(
            "c",
            &format!("UPDATE items SET v = 'from c' WHERE id = {id}"),
        );
        d.wait_for(
            "a",
            &format!("SELECT v FROM items WHERE id = {id}"),
            "from c",
        );
        d.sql(
            "a",
            &format!("UPDATE items SET v = 'from a' WHERE id = {id}"),
        );
        d.wait_for(
            "c",
            "SELECT count(*) FROM walbridge.conflicts",
            &n.to_string(),
        );
    };
    let counted = |n: f64, last: &mut String| {
        wait_until(std::time::Duration::from_secs(10), || {
            *last = scrape(port);
            metric_sum(
                last,
                "walbridge_conflicts_ambiguous_total",
                &[("source", "a"), ("target", "c")],
            ) == n
        })
    };
    race(1, 1);
    assert_eq!(
        d.sql(
            "c",
            "SELECT kind || ' ' || resolution || ' ' || source || ' ' || ambiguous FROM walbridge.conflicts"
        ),
        "update_older skipped a true"
    );
    assert!(
        counted(1.0, &mut last),
        "ambiguous conflict not counted:\n{last}"
    );
    // `walbridge conflicts` shows it.
    let out = json(&d.walbridge_ok(&["conflicts", "--json"]));
    assert_eq!(out["conflicts"][0]["ambiguous"], true);

    // The table is contended now: the same race on another key is settled by the set-based
    // statement, which flags and counts it the same way.
    race(2, 2);
    assert_eq!(
        d.sql(
            "c",
            "SELECT kind || ' ' || resolution || ' ' || source || ' ' || ambiguous || ' ' \
             || local_writer || ' ' || priority::text FROM walbridge.conflicts WHERE key = '[\"2\"]'"
        ),
        "update_older skipped a true c {a,c}"
    );
    assert!(
        counted(2.0, &mut last),
        "set-based ambiguous conflict not counted:\n{last}"
    );
}

/// Every journal row of `node` with the facts replay needs, one line each, oldest first:
/// `kind resolution source policy writer tombstone complete ambiguous priority`.
fn facts(d: &Deployment, node: &str) -> Vec<String> {
    d.sql(
        node,
        "SELECT coalesce(string_agg(concat_ws(' ', table_name, key::text, kind, resolution, source, \
         policy, local_writer, local_tombstone, complete_row, ambiguous, priority::text, \
         local_row_truncated, remote_row_truncated), E'\\n' ORDER BY id), '') \
         FROM walbridge.conflicts",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// The commit record at `lsn` on `node`: `(record type, end LSN)` from pg_walinspect.
fn commit_record(d: &Deployment, node: &str, lsn: &str) -> String {
    d.sql(node, "CREATE EXTENSION IF NOT EXISTS pg_walinspect");
    d.sql(
        node,
        &format!(
            "SELECT resource_manager || ' ' || record_type || ' ' || end_lsn \
             FROM pg_get_wal_record_info('{lsn}')"
        ),
    )
}

/// Two tables under two policies (`items`: last_write_wins, `ranked`: node_priority with b
/// first): a's updates lose on b under both, for different reasons. The journal keeps the
/// source's commit LSN (a commit record on a, covered by b's origin progress), the policy
/// version and both versions; `why` and `replay` report them field by
/// field.
#[test]
fn journal_keeps_commit_lsn_policy_version_and_facts_under_each_policy() {
    let d = Deployment::new(
        &["a", "b"],
        "CREATE TABLE public.items (id int PRIMARY KEY, v text);
         CREATE TABLE public.ranked (id int PRIMARY KEY, v text);",
        "tables = [\"public.items\", \"public.ranked\"]\nconflict = \"last_write_wins\"\n\
         priority = [\"b\", \"a\"]\nconflict_per_table = { \"public.ranked\" = \"node_priority\" }",
    );
    d.walbridge_ok(&["setup"]);
    d.sql(
        "a",
        "INSERT INTO items VALUES (1, 'seed'); INSERT INTO ranked VALUES (1, 'seed')",
    );
    d.replicate_once("seed.log");
    // a writes first (older), b later: b keeps its versions of both rows.
    let before = d.sql("a", "SELECT pg_current_wal_lsn()");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 1");
    d.sql("a", "UPDATE ranked SET v = 'from a' WHERE id = 1");
    let after = d.sql("a", "SELECT pg_current_wal_lsn()");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 1");
    d.sql("b", "UPDATE ranked SET v = 'from b' WHERE id = 1");
    d.replicate_once("run.log");
    for n in ["a", "b"] {
        assert_eq!(d.sql(n, "SELECT v FROM items"), "from b");
        assert_eq!(d.sql(n, "SELECT v FROM ranked"), "from b");
    }
    assert_eq!(
        facts(&d, "b"),
        [
            "public.items [\"1\"] update_older skipped a last_write_wins b f t f {b,a} f f",
            "public.ranked [\"1\"] update_older skipped a node_priority b f t f {b,a} f f",
        ]
    );
    assert_eq!(facts(&d, "a"), Vec::<String>::new());

    // The source LSN: commit records on a, written between the two bounds, in order; the
    // last one ends where b's origin for a stands.
    let lsns: Vec<String> = d
        .sql(
            "b",
            "SELECT string_agg(source_lsn::text, ' ' ORDER BY id) FROM walbridge.conflicts",
        )
        .split(' ')
        .map(str::to_string)
        .collect();
    assert_eq!(lsns.len(), 2);
    assert_eq!(
        d.sql(
            "a",
            &format!(
                "SELECT '{before}'::pg_lsn < '{}'::pg_lsn AND '{}'::pg_lsn < '{}'::pg_lsn \
                 AND '{}'::pg_lsn < '{after}'::pg_lsn",
                lsns[0], lsns[0], lsns[1], lsns[1]
            )
        ),
        "t"
    );
    let progress = d.sql(
        "b",
        "SELECT pg_replication_origin_progress('walbridge_from_a', false)",
    );
    for lsn in &lsns {
        let rec = commit_record(&d, "a", lsn);
        let end = rec.strip_prefix("Transaction COMMIT ");
        assert!(end.is_some(), "{lsn} is no commit record on a: {rec}");
        // b's origin progress for a covers the whole commit record.
        assert_eq!(
            d.sql(
                "a",
                &format!(
                    "SELECT '{}'::pg_lsn <= '{progress}'::pg_lsn",
                    end.unwrap_or("0/0")
                )
            ),
            "t",
            "{rec} vs progress {progress}"
        );
    }

    // `conflicts --json`: the new fields.
    let out = json(&d.walbridge_ok(&["conflicts", "--json"]));
    let list = out["conflicts"].as_array().expect("conflicts");
    assert_eq!(list.len(), 2);
    let items = &list[0];
    assert_eq!(items["table"], "public.items");
    assert_eq!(items["source_lsn"], lsns[0].as_str());
    assert_eq!(items["source_change_id"], Value::Null);
    assert_eq!(items["priority"], serde_json::json!(["b", "a"]));
    assert_eq!(items["policy"], "last_write_wins");
    assert_eq!(items["local_writer"], "b");
    assert_eq!(items["tie"], false);
    assert_eq!(items["rule"], "later commit time");
    assert_eq!(
        items["local_row"],
        serde_json::json!({"id": 1, "v": "from b"})
    );
    assert_eq!(
        items["remote_row"],
        serde_json::json!({"id": "1", "v": "from a"})
    );
    assert_eq!(items["remote_unsent"], serde_json::json!([]));
    assert_eq!(items["local_row_truncated"], false);
    assert_eq!(list[1]["table"], "public.ranked");
    assert_eq!(list[1]["rule"], "node priority");
    assert_eq!(list[1]["source_lsn"], lsns[1].as_str());

    // `why` on a for ranked: b wrote it, and the conflict on b with its rule.
    let why = why_json(&d, "a", "public.ranked", r#"{"id": 1}"#);
    assert_eq!(why["policy"], "node_priority");
    assert_eq!(why["current"]["written_by"], "b");
    assert_eq!(
        why["current"]["row"],
        serde_json::json!({"id": 1, "v": "from b"})
    );
    let c = why["conflicts"].as_array().expect("conflicts");
    assert_eq!(c.len(), 1);
    assert_eq!(c[0]["node"], "b");
    assert_eq!(c[0]["kind"], "update_older");
    assert_eq!(c[0]["resolution"], "skipped");
    assert_eq!(c[0]["policy"], "node_priority");
    assert_eq!(c[0]["rule"], "node priority");
    assert_eq!(c[0]["source_lsn"], lsns[1].as_str());
    assert_eq!(c[0]["priority"], serde_json::json!(["b", "a"]));

    // Replay: under last_write_wins both stay (b's versions are later); under node_priority
    // both stay (b first); under error both stop.
    for (policy, changed) in [("last_write_wins", 0), ("node_priority", 0), ("error", 2)] {
        let r = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", policy, "--json"]));
        assert_eq!(r["examined"], 2, "{policy}");
        assert_eq!(r["not_replayable"], 0, "{policy}: {r}");
        assert_eq!(
            r["changed"].as_array().map(Vec::len),
            Some(changed),
            "{policy}: {r}"
        );
    }
    let err = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", "error", "--json"]));
    for c in err["changed"].as_array().expect("changed") {
        assert_eq!(c["recorded"], "skip");
        assert_eq!(c["replayed"], "stop");
    }
    // The recorded priority order decides, not today's configuration: with a first now,
    // node_priority would still be replayed with b first.
    let mut d = d;
    d.set_replication_toml(
        "tables = [\"public.items\", \"public.ranked\"]\nconflict = \"last_write_wins\"\n\
         priority = [\"a\", \"b\"]",
    );
    let r = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", "node_priority", "--json"]));
    assert_eq!(r["changed"].as_array().map(Vec::len), Some(0), "{r}");
}

/// Two nodes whose clocks stand still at the same instant (libfaketime, an absolute time
/// without `@` freezes the clock), so every commit on either carries the same timestamp. Both
/// update the same row: an exact last-write-wins tie, which the priority order (a first)
/// breaks the same way on both nodes: a's change is applied on b, b's loses on a and is
/// journaled there as a tie.
#[test]
fn forged_tie_is_broken_by_priority_on_both_nodes_and_journaled_as_a_tie() {
    use walbridge::localpg::{ClusterOptions, LocalCluster};
    if pg_major() >= 16 {
        // Under a frozen wall clock the PostgreSQL 17 walsender drops its connection every
        // ten seconds (not yet understood), so replication never catches up there.
        eprintln!("skipped: a frozen libfaketime clock is only known to work with PostgreSQL 15");
        return;
    }
    let frozen = || {
        LocalCluster::start(&ClusterOptions {
            server_env: vec![
                ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
                ("FAKETIME".into(), "2026-01-01 00:00:00".into()),
                ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                ("FAKETIME_DONT_RESET".into(), "1".into()),
            ],
            ..ClusterOptions::default()
        })
        .expect("start a cluster under libfaketime with a frozen clock")
    };
    let d = Deployment::from_clusters(
        &["a", "b"],
        SCHEMA,
        "tables = [\"public.items\"]\nconflict = \"last_write_wins\"\npriority = [\"a\", \"b\"]",
        vec![frozen(), frozen()],
    );
    d.walbridge_ok(&["setup"]);
    d.sql("a", "INSERT INTO items VALUES (1, 'seed')");
    d.replicate_once("seed.log");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 1");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 1");
    let stamp = |n: &str| {
        d.sql(
            n,
            "SELECT pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC' FROM items WHERE id = 1",
        )
    };
    assert_eq!(stamp("a"), "2026-01-01 00:00:00", "a's clock is not frozen");
    assert_eq!(stamp("a"), stamp("b"), "the commit times differ");
    d.replicate_once("run.log");
    // a first: a's version stays on a and wins on b.
    assert_eq!(value_of(&d, "a", 1), "from a");
    assert_eq!(value_of(&d, "b", 1), "from a");
    assert_eq!(d.sql("b", "SELECT count(*) FROM walbridge.conflicts"), "0");
    // Every fact but `ambiguous`: with equal commit times any measured skew makes the order
    // uncertain, and whether the skew was sampled before the decision is a race.
    assert_eq!(
        facts(&d, "a")
            .iter()
            .map(|f| {
                let mut w: Vec<&str> = f.split(' ').collect();
                w.remove(9);
                w.join(" ")
            })
            .collect::<Vec<_>>(),
        ["public.items [\"1\"] update_older skipped b last_write_wins a f t {a,b} f f"]
    );
    assert_eq!(
        d.sql(
            "a",
            "SELECT local_commit_ts = remote_commit_ts FROM walbridge.conflicts"
        ),
        "t"
    );
    let why = why_json(&d, "b", "public.items", r#"{"id": 1}"#);
    assert_eq!(why["current"]["written_by"], "a");
    assert_eq!(why["others"][0]["written_by"], "a");
    let c = &why["conflicts"][0];
    assert_eq!(c["node"], "a");
    assert_eq!(c["source"], "b");
    assert_eq!(c["tie"], true);
    assert_eq!(c["rule"], "commit time tie, broken by priority");
    assert_eq!(c["local_commit_ts"], c["remote_commit_ts"]);
    assert_eq!(c["local_row"]["v"], "from a");
    assert_eq!(c["remote_row"]["v"], "from b");
    // Replayed under node_priority (a first) the tie ends the same way; under error it stops.
    let np = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", "node_priority", "--json"]));
    assert_eq!(np["examined"], 1);
    assert_eq!(np["changed"].as_array().map(Vec::len), Some(0), "{np}");
}

/// A 32 kB incompressible value (stored out of line, TOASTed) that a's update leaves
/// unchanged: pgoutput sends it as "unchanged" ('u'). b journals a's losing update with both
/// versions whole: the local one read from the row, the incoming one's TOASTed value taken
/// from it (the key matched) and named in `remote_unsent`. A 100 kB value is over the default
/// 64 kB bound: kept cut, flagged, and not replayable.
#[test]
fn toasted_versions_are_journaled_whole_and_oversized_ones_cut_and_flagged() {
    let d = Deployment::new(
        &["a", "b"],
        "CREATE TABLE public.docs (id int PRIMARY KEY, v text, body text);",
        "tables = [\"public.docs\"]\nconflict = \"last_write_wins\"\npriority = [\"a\", \"b\"]",
    );
    d.walbridge_ok(&["setup"]);
    let big =
        |n: i32| format!("(SELECT string_agg(md5(i::text), '') FROM generate_series(1, {n}) i)");
    d.sql(
        "a",
        &format!(
            "INSERT INTO docs VALUES (1, 'seed', {}), (2, 'seed', {})",
            big(1000),
            big(3200)
        ),
    );
    d.replicate_once("seed.log");
    // Out of line on both nodes.
    for n in ["a", "b"] {
        assert_eq!(
            d.sql(
                n,
                "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class WHERE relname = 'docs'"
            ),
            "t"
        );
    }
    // One transaction per row on a: once the first conflict made the table contended, the
    // second is settled by the set-based statement (or the careful path when redone).
    d.sql("a", "UPDATE docs SET v = 'from a' WHERE id = 1");
    d.sql("a", "UPDATE docs SET v = 'from a' WHERE id = 2");
    d.sql("b", "UPDATE docs SET v = 'from b'");
    d.replicate_once("run.log");
    assert_eq!(
        d.sql("a", "SELECT string_agg(v, ',' ORDER BY id) FROM docs"),
        "from b,from b"
    );
    assert_eq!(
        d.sql(
            "b",
            "SELECT string_agg(concat_ws(' ', key::text, kind, remote_unsent::text, \
             local_row_truncated, remote_row_truncated, \
             length(local_row->>'body'), length(remote_row->>'body'), \
             octet_length(local_row::text) <= 65536, octet_length(remote_row::text) <= 65536), \
             E'\\n' ORDER BY id) FROM walbridge.conflicts"
        ),
        "[\"1\"] update_older {body} f f 32000 32000 t t\n\
         [\"2\"] update_older {body} t t 21831 21831 t t"
    );
    assert_eq!(
        facts(&d, "b")
            .iter()
            .map(|f| f.split_once(' ').map_or("", |(_, rest)| rest).to_string())
            .collect::<Vec<_>>(),
        [
            "[\"1\"] update_older skipped a last_write_wins b f f f {a,b} f f",
            "[\"2\"] update_older skipped a last_write_wins b f f f {a,b} t t",
        ]
    );
    // Whole: the journaled value is the row's.
    assert_eq!(
        d.sql(
            "b",
            "SELECT c.local_row->>'body' = d.body AND c.remote_row->>'body' = d.body \
             FROM walbridge.conflicts c JOIN docs d ON d.id = 1 WHERE c.key = '[\"1\"]'"
        ),
        "t"
    );
    // Replay: under node_priority (a first) a's update would have won key 1; key 2 cannot be
    // recomputed from a cut version.
    let r = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", "node_priority", "--json"]));
    assert_eq!(r["examined"], 2);
    assert_eq!(r["not_replayable"], 1);
    let skipped = &r["not_replayable_entries"][0];
    assert_eq!(skipped["node"], "b");
    assert!(
        skipped["reason"]
            .as_str()
            .is_some_and(|s| s.contains("conflict_max_row_bytes")),
        "{skipped}"
    );
    let changed = r["changed"].as_array().expect("changed");
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0]["recorded"], "skip");
    assert_eq!(changed[0]["replayed"], "update");
    let c = &changed[0]["conflict"];
    assert_eq!(c["key"], serde_json::json!(["1"]));
    assert_eq!(c["remote_unsent"], serde_json::json!(["body"]));
    assert_eq!(c["remote_row"]["v"], "from a");
    assert_eq!(c["remote_row"]["body"].as_str().map(str::len), Some(32000));
    assert_eq!(c["local_row"]["body"], c["remote_row"]["body"]);
}

/// Trigger mode: east's older update loses on west. The journal row carries the decision's
/// facts (it had none before) and east's change-table id as the source position; replay
/// recomputes it.
#[test]
fn trigger_mode_conflict_is_journaled_with_its_facts() {
    let d = Deployment::new(
        &["east", "west"],
        SCHEMA,
        "mode = \"trigger\"\ntables = [\"public.items\"]\nconflict = \"last_write_wins\"\n\
         priority = [\"east\", \"west\"]\n\n[trigger]\npoll_interval = \"1s\"\n",
    );
    d.walbridge_ok(&["setup"]);
    d.sql("east", "INSERT INTO items VALUES (1, 'base')");
    d.sql("west", "INSERT INTO items VALUES (1, 'base')");
    d.sql("east", "DELETE FROM database_changes");
    d.sql("west", "DELETE FROM database_changes");
    d.sql("east", "UPDATE items SET v = 'east, earlier' WHERE id = 1");
    let change_id = d.sql("east", "SELECT max(id) FROM database_changes");
    d.sql(
        "west",
        "SELECT pg_sleep(0.01); UPDATE items SET v = 'west, later' WHERE id = 1",
    );
    let _run = d.spawn_run("run.log");
    for n in ["east", "west"] {
        d.wait_for(n, "SELECT v FROM items WHERE id = 1", "west, later");
        d.wait_for(n, "SELECT count(*) FROM public.database_changes", "0");
    }
    assert_eq!(
        facts(&d, "west"),
        // The key as stream mode journals it (key values as text): one applier for both.
        ["public.items [\"1\"] update_older skipped east last_write_wins west f t f {east,west} f f"]
    );
    let out = json(&d.walbridge_ok(&["conflicts", "--json"]));
    let c = &out["conflicts"][0];
    assert_eq!(c["node"], "west");
    assert_eq!(c["source_change_id"].to_string(), change_id);
    assert_eq!(c["source_lsn"], Value::Null);
    assert_eq!(c["rule"], "later commit time");
    assert_eq!(c["tie"], false);
    assert_eq!(c["local_row"]["v"], "west, later");
    assert_eq!(c["remote_row"]["v"], "east, earlier");
    assert!(c["remote_commit_ts"].as_str() < c["local_commit_ts"].as_str());
    // Replay: exact now; east first under node_priority, so east's update would have won.
    let r = json(&d.walbridge_ok(&["conflicts", "replay", "--policy", "node_priority", "--json"]));
    assert_eq!(r["not_replayable"], 0, "{r}");
    assert_eq!(r["changed"][0]["recorded"], "skip");
    assert_eq!(r["changed"][0]["replayed"], "update");
}

/// A node whose journal predates this walbridge (`setup` not run again after an upgrade): the
/// direction that must journal a conflict there stops with an error that says to run setup,
/// in stream mode (careful path) and trigger mode.
#[test]
fn an_outdated_journal_stops_the_direction_saying_to_run_setup() {
    let d = Deployment::new(
        &["a", "b"],
        SCHEMA,
        "tables = [\"public.items\"]\nconflict = \"last_write_wins\"",
    );
    d.walbridge_ok(&["setup"]);
    d.sql("a", "INSERT INTO items VALUES (1, 'seed')");
    d.replicate_once("seed.log");
    d.sql(
        "b",
        "ALTER TABLE walbridge.conflicts DROP COLUMN source_lsn",
    );
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 1");
    d.sql("b", "UPDATE items SET v = 'from b' WHERE id = 1");
    let run = d.spawn_run("run.log");
    let said = wait_until(WAIT, || run.log().contains("run `walbridge setup` once"));
    assert!(said, "{}", run.log());
    assert_eq!(value_of(&d, "b", 1), "from b");

    let t = Deployment::new(
        &["east", "west"],
        SCHEMA,
        "mode = \"trigger\"\ntables = [\"public.items\"]\n\n[trigger]\npoll_interval = \"1s\"\n",
    );
    t.walbridge_ok(&["setup"]);
    t.sql(
        "west",
        "ALTER TABLE walbridge.conflicts DROP COLUMN source_change_id",
    );
    // West has the row already: east's insert is a conflict that west must journal.
    t.sql("west", "INSERT INTO items VALUES (1, 'west')");
    t.sql("west", "DELETE FROM database_changes");
    t.sql("east", "INSERT INTO items VALUES (1, 'east')");
    let run = t.spawn_run("run.log");
    let said = wait_until(WAIT, || run.log().contains("run `walbridge setup` once"));
    assert!(said, "{}", run.log());
}
