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

/// A shared server is found again by the next process (here: the next acquire), survives
/// its users' databases, is stopped and deleted by its reaper once idle, and a server killed
/// under it is replaced by a fresh one.
#[test]
fn shared_cluster_is_reused_then_reaped_when_idle_and_replaced_when_dead() {
    use walbridge::localpg::{SharedCluster, IDLE_SECONDS};
    // A server of this test's own name: the run's other tests use "default".
    let name = format!("selftest{}", std::process::id());
    let options = ClusterOptions::default();
    let first = SharedCluster::acquire(&name, &options).expect("shared cluster");
    let server = first.base_dir().to_path_buf();
    let pid_file = first.data_dir().join("postmaster.pid");
    let port = first.port();
    first.create_database("kept").unwrap();
    // Its server is not this handle's: dropping the handle leaves it running.
    drop(first);
    let again = SharedCluster::acquire(&name, &options).expect("shared cluster");
    assert_eq!(again.port(), port, "the running server was not found again");
    assert_eq!(
        again
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_database WHERE datname = 'kept'"
            )
            .unwrap(),
        "1"
    );

    // Killed under its users: the next acquire starts a fresh one.
    let postmaster: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: kill with a pid read from the server's own pid file.
    unsafe {
        libc::kill(postmaster, libc::SIGKILL);
    }
    drop(again);
    let fresh = SharedCluster::acquire(&name, &options).expect("shared cluster");
    assert_eq!(
        fresh
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_database WHERE datname = 'kept'"
            )
            .unwrap(),
        "0",
        "the dead server's data was reused"
    );

    // Idle: the reaper stops the server and deletes its directory.
    drop(fresh);
    let reaped = wait_until(
        std::time::Duration::from_secs(u64::from(IDLE_SECONDS) + 30),
        || !server.exists(),
    );
    assert!(reaped, "{server:?} still there after its last user left");
    let _ = std::fs::remove_dir_all(server.parent().expect("run directory"));
}
