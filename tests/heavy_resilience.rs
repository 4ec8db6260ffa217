//! Crashes, restarts and big transactions: nothing lost, nothing applied twice.

use std::time::Duration;

use crate::support::*;

/// Inserts-only ledger without a key: a change applied twice would show as a duplicate row.
const LEDGER: &str = "CREATE TABLE public.ledger (seq bigint NOT NULL, note text);
                      ALTER TABLE public.ledger REPLICA IDENTITY FULL;";

#[test]
fn heavy_kill_9_repeatedly_loses_and_repeats_nothing() {
    let d = Deployment::new(&["a", "b"], LEDGER, "tables = [\"public.ledger\"]");
    d.walbridge_ok(&["setup"]);
    let mut w = ledger_writer(&d, "a", 1, 3000, "0.002", false);
    let mut run = d.spawn_run("run-0.log");
    for round in 1..=5 {
        // Kill only once replication has made progress since the last restart.
        let seen: i64 = d.sql("b", "SELECT count(*) FROM ledger").parse().unwrap();
        let moved = wait_until(WAIT, || {
            d.sql("b", "SELECT count(*) FROM ledger")
                .parse::<i64>()
                .unwrap()
                > seen + 50
        });
        assert!(
            moved,
            "no progress before kill {round}; log:\n{}",
            run.log()
        );
        run.signal(libc::SIGKILL);
        run.wait_exit(WAIT);
        run = d.spawn_run(&format!("run-{round}.log"));
    }
    assert!(w.wait().expect("writer").success());
    d.wait_for("b", "SELECT count(*) FROM ledger", "3000");
    d.wait_caught_up();
    assert_eq!(
        ledger_summary(&d, "b"),
        "3000 rows, 3000 distinct, sum 4501500"
    );
    assert_eq!(
        ledger_summary(&d, "a"),
        "3000 rows, 3000 distinct, sum 4501500"
    );
    run.assert_running();
}

#[test]
fn heavy_target_crash_and_restart_under_load_converges() {
    let mut d = Deployment::new(&["a", "b"], LEDGER, "tables = [\"public.ledger\"]");
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");
    let mut w = ledger_writer(&d, "a", 1, 2000, "0.002", false);
    d.wait_for("b", "SELECT count(*) > 100 FROM ledger", "t");
    d.node_mut("b").stop(StopMode::Immediate).unwrap();
    // While b is down, a keeps committing.
    let before: i64 = d.sql("a", "SELECT count(*) FROM ledger").parse().unwrap();
    assert!(wait_until(WAIT, || d
        .sql("a", "SELECT count(*) FROM ledger")
        .parse::<i64>()
        .unwrap()
        > before + 200));
    run.assert_running();
    d.node_mut("b").restart().unwrap();
    assert!(w.wait().expect("writer").success());
    d.wait_for("b", "SELECT count(*) FROM ledger", "2000");
    d.wait_caught_up();
    assert_eq!(
        ledger_summary(&d, "b"),
        "2000 rows, 2000 distinct, sum 2001000"
    );
    run.assert_running();
    let log = run.log();
    assert!(log.contains("reconnecting"), "{log}");
}

#[test]
fn heavy_three_node_mesh_delivers_each_write_exactly_once() {
    let d = Deployment::new(&["a", "b", "c"], LEDGER, "tables = [\"public.ledger\"]");
    d.walbridge_ok(&["setup"]);
    assert_eq!(d.sql("a", "SELECT count(*) FROM pg_replication_slots"), "2");
    let mut run = d.spawn_run("run.log");
    let mut writers: Vec<_> = [("a", 1), ("b", 100_001), ("c", 200_001)]
        .iter()
        .map(|(n, from)| ledger_writer(&d, n, *from, 500, "0.001", false))
        .collect();
    for w in &mut writers {
        assert!(w.wait().expect("writer").success());
    }
    for node in ["a", "b", "c"] {
        d.wait_for(node, "SELECT count(*) FROM ledger", "1500");
    }
    d.wait_caught_up();
    let expected = "1500 rows, 1500 distinct, sum 150375750";
    for node in ["a", "b", "c"] {
        assert_eq!(ledger_summary(&d, node), expected, "on {node}");
    }
    run.assert_running();
}

#[test]
fn heavy_sigterm_during_a_200k_row_transaction_applies_all_or_nothing() {
    let d = Deployment::new(&["a", "b"], LEDGER, "tables = [\"public.ledger\"]");
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run-1.log");
    d.sql(
        "a",
        "INSERT INTO ledger SELECT i, repeat('x', 100) FROM generate_series(1, 200000) i",
    );
    // Wait until b is inside the transaction: its apply session holds a transaction id.
    let in_txn = "SELECT count(*) > 0 FROM pg_stat_activity \
                  WHERE application_name LIKE 'walbridge-apply%' AND backend_xid IS NOT NULL";
    d.wait_for("b", in_txn, "t");
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
    let after_stop = d.sql("b", "SELECT count(*) FROM ledger");
    assert!(
        after_stop == "0" || after_stop == "200000",
        "partial transaction: {after_stop} rows"
    );
    let run2 = d.spawn_run("run-2.log");
    d.wait_for("b", "SELECT count(*) FROM ledger", "200000");
    d.wait_caught_up();
    assert_eq!(
        ledger_summary(&d, "b"),
        "200000 rows, 200000 distinct, sum 20000100000"
    );
    drop(run2);
    let _ = Duration::ZERO;
}
