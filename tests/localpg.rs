//! The cluster harness itself: start, query, crash-stop, restart, clean up.

use crate::support::*;

#[test]
fn cluster_starts_with_logical_wal_and_is_removed_on_drop() {
    let mut c = cluster();
    assert_eq!(c.psql("postgres", "SHOW wal_level").unwrap(), "logical");
    assert_eq!(
        c.psql("postgres", "SHOW track_commit_timestamp").unwrap(),
        "on"
    );
    c.psql(
        "postgres",
        "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)",
    )
    .unwrap();
    c.stop(StopMode::Immediate).unwrap();
    assert!(c.psql("postgres", "SELECT 1").is_err());
    c.restart().unwrap();
    assert_eq!(c.psql("postgres", "SELECT count(*) FROM t").unwrap(), "1");
    let base = c.base_dir().to_path_buf();
    drop(c);
    assert!(
        !base.exists(),
        "cluster directory {base:?} should be removed"
    );
}

/// `WALBRIDGE_PG_MAJOR` picks the server the whole suite runs against (default: Debian's 15).
#[test]
fn cluster_runs_the_server_version_asked_for() {
    let c = cluster();
    let expected: u32 = std::env::var("WALBRIDGE_PG_MAJOR")
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(15);
    assert_eq!(c.major(), expected);
    assert_eq!(pg_major(), expected);
    let num: u32 = c
        .psql("postgres", "SHOW server_version_num")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(num / 10000, expected);
    // The server-only packages bring no psql; the Debian client talks to them.
    assert!(c.client_tool("psql").unwrap().is_file());
}
