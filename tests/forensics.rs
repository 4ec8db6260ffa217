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
    let out = json(&d.walbridge_ok(&[
        "why",
        "--node",
        "a",
        "--table",
        "public.items",
        "--key",
        r#"{"id": 1}"#,
        "--json",
    ]));
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
    let two = json(&d.walbridge_ok(&[
        "why",
        "--node",
        "b",
        "--table",
        "public.items",
        "--key",
        r#"{"id": 2}"#,
        "--json",
    ]));
    assert_eq!(two["current"]["written_by"], "a");
    assert_eq!(two["others"][0]["written_by"], "a");
    assert_eq!(two["conflicts"].as_array().map(Vec::len), Some(0));
    // A missing row.
    let gone = json(&d.walbridge_ok(&[
        "why",
        "--node",
        "a",
        "--table",
        "public.items",
        "--key",
        r#"{"id": 99}"#,
        "--json",
    ]));
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
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
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
    d.walbridge_ok(&["setup"]);
    let _run = d.spawn_run("run.log");
    let mut last = String::new();
    let measured = wait_until(std::time::Duration::from_secs(30), || {
        last = std::net::TcpStream::connect(("127.0.0.1", port))
            .map(|_| scrape(port))
            .unwrap_or_default();
        metric_sum(&last, "walbridge_clock_skew_seconds", &[("node", "c")]) > 0.4
    });
    assert!(measured, "no skew measured:\n{last}");

    d.sql("a", "INSERT INTO items VALUES (1, 'seed')");
    d.wait_for("c", "SELECT v FROM items WHERE id = 1", "seed");
    d.sql("c", "UPDATE items SET v = 'from c' WHERE id = 1");
    d.wait_for("a", "SELECT v FROM items WHERE id = 1", "from c");
    d.sql("a", "UPDATE items SET v = 'from a' WHERE id = 1");
    d.wait_for("c", "SELECT count(*) FROM walbridge.conflicts", "1");
    assert_eq!(
        d.sql(
            "c",
            "SELECT kind || ' ' || resolution || ' ' || source || ' ' || ambiguous FROM walbridge.conflicts"
        ),
        "update_older skipped a true"
    );
    let flagged = wait_until(std::time::Duration::from_secs(10), || {
        last = scrape(port);
        metric_sum(
            &last,
            "walbridge_conflicts_ambiguous_total",
            &[("source", "a"), ("target", "c")],
        ) == 1.0
    });
    assert!(flagged, "ambiguous conflict not counted:\n{last}");
    // `walbridge conflicts` shows it.
    let out = json(&d.walbridge_ok(&["conflicts", "--json"]));
    assert_eq!(out["conflicts"][0]["ambiguous"], true);
}
