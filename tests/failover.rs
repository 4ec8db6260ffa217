//! Nodes that are a primary with a physical standby: the multi-host DSN follows the primary
//! (`target_session_attrs`), failover slots survive a promotion on PostgreSQL 17+, and on
//! 15–16 status says what a promotion costs.

use walbridge::dsn::Dsn;
use walbridge::protocol::{self, ConnectOptions};

use crate::support::*;

/// A standby of `primary` streaming through physical slot `slot`, with slot synchronization
/// on (PostgreSQL 17+).
fn standby_of(primary: &LocalCluster, slot: &str) -> LocalCluster {
    let mut conf = Vec::new();
    if primary.major() >= 17 {
        conf.push("sync_replication_slots = on".to_string());
    }
    LocalCluster::start_standby(
        primary,
        slot,
        &ClusterOptions {
            conf,
            ..ClusterOptions::default()
        },
    )
    .expect("start a physical standby (needs pg_basebackup >= the server: .ci/install-postgres)")
}

/// `host=127.0.0.1,127.0.0.1 port=<a>,<b> ... target_session_attrs=<attrs>`.
fn two_host_dsn(first: &LocalCluster, second: &LocalCluster, attrs: &str) -> String {
    format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=postgres sslmode=disable \
         connect_timeout=5 target_session_attrs={attrs}",
        first.port(),
        second.port()
    )
}

/// The port of the server each connection kind reaches with `dsn`, or the error text.
async fn reached(dsn: &str) -> (Result<String, String>, Result<String, String>) {
    let dsn = Dsn::parse(dsn).expect("dsn");
    let sql = match walbridge::pgconn::connect(&dsn, "walbridge-test").await {
        Ok(c) => c
            .query_one("SELECT pg_catalog.current_setting('port')", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let repl = match protocol::connect(&dsn, ConnectOptions::replication("walbridge-test")).await {
        Ok(mut c) => c
            .simple_query("SELECT pg_catalog.current_setting('port')")
            .await
            .map(|r| r.get(0, 0).unwrap_or_default().to_string())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    (sql, repl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_host_dsn_connects_to_the_server_target_session_attrs_asks_for() {
    let primary = cluster();
    let standby = standby_of(&primary, "standby_slot");
    let p = primary.port().to_string();
    let s = standby.port().to_string();
    // The standby is listed first: read-write and primary pass over it, for both the SQL
    // sessions (apply, jobs) and the replication session.
    for attrs in ["read-write", "primary"] {
        let (sql, repl) = reached(&two_host_dsn(&standby, &primary, attrs)).await;
        assert_eq!(sql.as_deref(), Ok(p.as_str()), "{attrs}");
        assert_eq!(repl.as_deref(), Ok(p.as_str()), "{attrs}");
    }
    for attrs in ["standby", "read-only", "prefer-standby"] {
        let (sql, _) = reached(&two_host_dsn(&primary, &standby, attrs)).await;
        assert_eq!(sql.as_deref(), Ok(s.as_str()), "{attrs}");
    }
    let (sql, _) = reached(&two_host_dsn(&primary, &standby, "any")).await;
    assert_eq!(sql.as_deref(), Ok(p.as_str()));
    // The URI form, with a port per host.
    let uri = format!(
        "postgresql://postgres@127.0.0.1:{s},127.0.0.1:{p}/postgres?sslmode=disable&target_session_attrs=read-write"
    );
    let (sql, repl) = reached(&uri).await;
    assert_eq!(sql.as_deref(), Ok(p.as_str()));
    assert_eq!(repl.as_deref(), Ok(p.as_str()));
    // Only a standby to choose from: a sentence saying why (a promotion would fix it).
    let only_standby = format!(
        "host=127.0.0.1 port={s} user=postgres dbname=postgres sslmode=disable \
         target_session_attrs=read-write"
    );
    let (sql, repl) = reached(&only_standby).await;
    let sql = sql.expect_err("a standby is not read-write");
    assert!(sql.contains("is a standby"), "{sql}");
    assert!(repl.expect_err("replication too").contains("is a standby"));
}
