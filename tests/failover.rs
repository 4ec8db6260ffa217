//! Nodes that are a primary with a physical standby: the multi-host DSN follows the primary
//! (`target_session_attrs`), failover slots survive a promotion on PostgreSQL 17+, and on
//! 15–16 status says what a promotion costs.

use std::time::{Duration, Instant};

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

/// `[[nodes]]` a (primary and standby, following the primary) and b, over `LEDGER`.
fn write_failover_config(d: &Deployment, a_first: &LocalCluster, a_second: &LocalCluster) {
    let toml = format!(
        "[[nodes]]\nname = \"a\"\ndsn = \"{}\"\n\n[[nodes]]\nname = \"b\"\ndsn = \"{}\"\n\n\
         [replication]\ntables = [\"public.ledger\", \"public.hot\"]\n\n[metrics]\nlisten = \"\"\n",
        two_host_dsn(a_first, a_second, "read-write"),
        d.node("b").dsn("postgres"),
    );
    std::fs::write(&d.config, toml).expect("write config");
}

/// Node a is a primary A1 with a synchronous physical standby A2 (slot synchronization on);
/// `walbridge run` follows a's DSN `host=A1,A2 target_session_attrs=read-write`. Both nodes
/// write; once the failover slot is synchronized to A2, A1 stops (immediate) and A2 is
/// promoted; writes go on on A2 and B. Nothing is lost, nothing repeated, the nodes end
/// identical.
#[test]
fn heavy_promotion_of_a_standby_keeps_replicating_without_loss() {
    if pg_major() < 17 {
        eprintln!("skipped: failover slots need PostgreSQL 17+ (WALBRIDGE_PG_MAJOR=17)");
        return;
    }
    let a1 = cluster();
    let b = cluster();
    let mut d = Deployment::from_clusters(&["a", "b"], LEDGER, "", vec![a1, b]);
    let mut a2 = standby_of(d.node("a"), "a2_slot");
    write_failover_config(&d, d.node("a"), &a2);

    // Before the primary lists the standby's slot: check-config names what is missing.
    let out = d.walbridge(&["check-config", "--connect"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("synchronized_standby_slots is empty"),
        "check-config --connect:\n{text}"
    );
    // Commits on A1 wait for A2 (synchronous), and walbridge never gets a change A2 lacks.
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = 'walbridge_standby'",
        "ALTER SYSTEM SET synchronized_standby_slots = 'a2_slot'",
        "SELECT pg_reload_conf()",
    ] {
        d.sql("a", sql);
    }
    let setup = d.walbridge_ok(&["setup"]);
    assert!(setup.contains("failover slots"), "setup:\n{setup}");
    assert!(
        !setup.contains("synchronized_standby_slots is empty"),
        "{setup}"
    );
    assert_eq!(
        d.sql(
            "a",
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'walbridge_a_to_b'"
        ),
        "t"
    );

    let mut run = d.spawn_run("run.log");
    let writer_a1 = ledger_writer(&d, "a", 1, 1_000_000, "0.005", true);
    let writer_b = ledger_writer(&d, "b", 1_000_001, 2500, "0.005", true);
    // The failover slot reaches A2, and a's rows reach B.
    let synced = "SELECT count(*) FROM pg_replication_slots \
                  WHERE slot_name = 'walbridge_a_to_b' AND synced AND NOT temporary";
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(120), || {
            last = a2
                .psql("postgres", synced)
                .unwrap_or_else(|e| e.to_string());
            last == "1"
        }),
        "the failover slot was not synchronized to the standby ({last})"
    );
    d.wait_for(
        "b",
        "SELECT count(*) >= 300 FROM ledger WHERE note = 'a'",
        "t",
    );

    // The primary dies; the standby is promoted.
    d.node_mut("a").stop(StopMode::Immediate).expect("stop A1");
    let mut writer_a1 = writer_a1;
    let _ = writer_a1.wait();
    a2.promote().expect("promote A2");
    let promoted = Instant::now();
    // From here on, node a is A2 (the old primary stays down).
    std::mem::swap(&mut d.clusters[0], &mut a2);
    let written_on_a1 = d.sql("a", "SELECT count(*) FROM ledger WHERE note = 'a'");
    d.sql("b", "INSERT INTO ledger VALUES (0, 'mark-b')");
    d.sql("a", "INSERT INTO ledger VALUES (0, 'mark-a')");
    let mut b_to_a = None;
    let mut a_to_b = None;
    assert!(
        wait_until(WAIT, || {
            if b_to_a.is_none()
                && d.sql("a", "SELECT count(*) FROM ledger WHERE note = 'mark-b'") == "1"
            {
                b_to_a = Some(promoted.elapsed());
            }
            if a_to_b.is_none()
                && d.sql("b", "SELECT count(*) FROM ledger WHERE note = 'mark-a'") == "1"
            {
                a_to_b = Some(promoted.elapsed());
            }
            b_to_a.is_some() && a_to_b.is_some()
        }),
        "no row flowed through the new primary within {WAIT:?}; log:\n{}",
        run.log()
    );
    eprintln!(
        "figures: promote -> first row applied on the new primary (b->a) {:.1}s, \
         first row from it applied on b (a->b) {:.1}s; {written_on_a1} rows of a before the \
         promotion",
        b_to_a.unwrap_or_default().as_secs_f64(),
        a_to_b.unwrap_or_default().as_secs_f64()
    );
    let writer_a2 = ledger_writer(&d, "a", 2_000_001, 500, "0.005", true);
    for mut w in [writer_b, writer_a2] {
        let _ = w.wait();
    }
    run.assert_running();
    d.wait_caught_up();
    let rows = d.assert_ledger();
    // A1's rows were committed in order, each synchronously on A2: no gap among them.
    assert_eq!(
        d.sql(
            "a",
            "SELECT count(*) = max(seq) FROM ledger WHERE note = 'a' AND seq < 1000000"
        ),
        "t",
        "a row committed on A1 is missing after the promotion"
    );
    assert_eq!(
        d.sql(
            "b",
            "SELECT count(*) FROM ledger WHERE note IN ('b', 'mark-b')"
        ),
        "2501"
    );
    eprintln!("figures: {rows} ledger rows checked on both nodes");
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

/// On 15 and 16 a promotion loses the slots: after one, `status` (which follows a's DSN to the
/// new primary) says the slot is gone, what happened and what to run; with a standby in the
/// DSN it also warns beforehand. (On 17+ setup makes failover slots; the heavy test above
/// covers that.)
#[test]
fn status_explains_that_a_promotion_lost_the_slot_and_what_to_run() {
    let a1 = cluster();
    let b = cluster();
    let mut d = Deployment::from_clusters(&["a", "b"], LEDGER, "", vec![a1, b]);
    let mut a2 = standby_of(d.node("a"), "a2_slot");
    write_failover_config(&d, d.node("a"), &a2);
    // failover_slots off stands in for 15/16 on newer servers: the slot stays on A1 only.
    let mut toml = std::fs::read_to_string(&d.config).expect("config");
    toml = toml.replace("[replication]\n", "[replication]\nfailover_slots = false\n");
    std::fs::write(&d.config, toml).expect("config");
    let setup = d.walbridge_ok(&["setup"]);
    let status = d.walbridge(&["status", "--json"]);
    let before: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    if pg_major() < 17 {
        assert!(
            before["warnings"]
                .to_string()
                .contains("cannot keep logical slots through a promotion"),
            "{before}"
        );
        assert!(
            setup.contains("cannot keep logical slots through a promotion"),
            "{setup}"
        );
    } else {
        assert!(setup.contains("failover_slots is off"), "{setup}");
    }

    d.node_mut("a").stop(StopMode::Immediate).expect("stop A1");
    a2.promote().expect("promote A2");
    std::mem::swap(&mut d.clusters[0], &mut a2);
    let status = d.walbridge(&["status", "--json"]);
    let after: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let dir = after["directions"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["source"] == "a" && x["target"] == "b"))
        .cloned()
        .unwrap_or_default();
    let err = dir["last_error"].as_str().unwrap_or_default();
    for words in [
        "slot walbridge_a_to_b does not exist on a",
        "promoted standby",
        "run walbridge setup",
        "walbridge verify",
    ] {
        assert!(err.contains(words), "{words:?} missing from: {after}");
    }
    let text = d.walbridge(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("promoted standby"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}
