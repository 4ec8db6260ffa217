//! Shared test harness: throwaway clusters (from `walbridge::localpg`), the real binary as a
//! child process, and condition polling instead of sleeps.

#![allow(dead_code, unused_imports)]

use std::time::Duration;

pub use walbridge::localpg::{wait_until, ClusterOptions, LocalCluster, StopMode};

/// How long a test waits for replication or a server to reach a state before failing.
pub const WAIT: Duration = Duration::from_secs(60);

/// Starts a cluster with the defaults every test wants (logical WAL, commit timestamps).
pub fn cluster() -> LocalCluster {
    LocalCluster::start(&ClusterOptions::default()).expect("start a local PostgreSQL cluster")
}

/// Starts a cluster with extra `postgresql.conf` lines.
pub fn cluster_with(conf: &[&str]) -> LocalCluster {
    LocalCluster::start(&ClusterOptions {
        conf: conf.iter().map(|s| s.to_string()).collect(),
        ..ClusterOptions::default()
    })
    .expect("start a local PostgreSQL cluster")
}
