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
