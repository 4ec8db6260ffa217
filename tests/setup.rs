//! `walbridge setup` / `teardown` against real clusters.

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.items (id int PRIMARY KEY, name text);
                      CREATE TABLE public.\"Mixed Case\" (k text PRIMARY KEY, v int);";

fn objects(d: &Deployment, node: &str) -> String {
    d.sql(
        node,
        "SELECT (SELECT string_agg(slot_name || ':' || plugin, ',' ORDER BY slot_name) FROM pg_replication_slots)
           || ' | ' || (SELECT string_agg(roname, ',' ORDER BY roname) FROM pg_replication_origin)
           || ' | ' || (SELECT string_agg(pubname, ',') FROM pg_publication)
           || ' | ' || (SELECT count(*) FROM pg_publication_tables)
           || ' | ' || (SELECT count(*) FROM pg_trigger WHERE tgname = 'walbridge_tombstones')
           || ' | ' || (SELECT count(*) FROM pg_proc WHERE proname = 'skip_session')",
    )
}

#[test]
fn setup_creates_slots_origins_publication_and_is_idempotent() {
    let d = Deployment::new(&["east", "west"], SCHEMA, "tables = [\"public.*\"]");
    let out = d.walbridge_ok(&["setup"]);
    assert!(out.contains("replicating 2 table(s)"), "{out}");
    let east = objects(&d, "east");
    assert_eq!(
        east,
        "walbridge_east_to_west:pgoutput | walbridge_from_west,walbridge_skip | walbridge_pub | 2 | 2 | 1"
    );
    let west = objects(&d, "west");
    assert_eq!(
        west,
        "walbridge_west_to_east:pgoutput | walbridge_from_east,walbridge_skip | walbridge_pub | 2 | 2 | 1"
    );
    // Twice: nothing changes, nothing fails.
    let again = d.walbridge_ok(&["setup"]);
    assert!(again.contains("exists"), "{again}");
    assert_eq!(objects(&d, "east"), east);
    assert_eq!(objects(&d, "west"), west);

    d.walbridge_ok(&["teardown"]);
    for node in ["east", "west"] {
        assert_eq!(
            d.sql(node, "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_replication_origin)
                         + (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge')
                         + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'walbridge%')
                         + (SELECT count(*) FROM pg_roles WHERE rolname IN ('walbridge_skip', 'walbridge_capture'))"),
            "0",
            "teardown left objects on {node}"
        );
        // User data is left alone.
        assert_eq!(
            d.sql(
                node,
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ),
            "2"
        );
    }
}

#[test]
fn setup_reports_every_missing_prerequisite_and_changes_nothing() {
    let d = Deployment::with_conf(
        &["east", "west"],
        "CREATE TABLE public.nokey (a int); CREATE TABLE public.ok (id int primary key);",
        "tables = [\"public.*\"]",
        &["wal_level = replica", "track_commit_timestamp = off"],
    );
    d.sql("west", "DROP TABLE public.ok");
    let out = d.walbridge(&["setup"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node east: wal_level is replica"), "{err}");
    assert!(err.contains("set wal_level = logical"), "{err}");
    assert!(err.contains("track_commit_timestamp"), "{err}");
    assert!(err.contains("public.nokey has no primary key"), "{err}");
    assert!(
        err.contains("table public.ok exists on east but not here"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        d.sql(
            "east",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge'"
        ),
        "0"
    );
}

#[test]
fn skip_session_sets_the_local_origin() {
    let d = Deployment::new(&["east", "west"], SCHEMA, "tables = [\"public.*\"]");
    d.walbridge_ok(&["setup"]);
    assert_eq!(
        d.sql(
            "east",
            "SELECT walbridge.skip_session(); SELECT pg_replication_origin_session_is_setup()"
        ),
        "\nt"
    );
}

#[test]
fn check_config_connect_reports_unreachable_nodes_and_missing_prerequisites() {
    let mut d = Deployment::new(&["east", "west"], SCHEMA, "tables = [\"public.*\"]");
    let ok = d.walbridge(&["check-config", "--connect"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("all nodes reachable and ready"));

    d.sql("west", "DROP TABLE public.items");
    d.node_mut("east").stop(StopMode::Fast).unwrap();
    let bad = d.walbridge(&["check-config", "--connect"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("node east: unreachable"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
