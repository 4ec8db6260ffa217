//! Large transactions streamed while in progress (pgoutput protocol 2, `streaming 'on'`):
//! applied into an open target transaction as they arrive, committed with the source,
//! rolled back with it, and interleaved with ordinary transactions in commit order.
//!
//! `logical_decoding_work_mem = 64kB` makes every transaction above a few hundred rows stream.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::support::*;
use walbridge::localpg::procstat::peak_rss_kb;

const SCHEMA: &str = "
    CREATE TABLE public.big (id int PRIMARY KEY, v text);
    CREATE TABLE public.small (id int PRIMARY KEY, v text);
";

fn deployment(toml: &str) -> Deployment {
    let d = Deployment::with_conf(
        &["east", "west"],
        SCHEMA,
        &format!("tables = [\"public.*\"]\n{toml}"),
        &["logical_decoding_work_mem = 64kB"],
    );
    d.walbridge_ok(&["setup"]);
    d
}

/// A `psql` session on a node kept open across steps (a transaction left in progress).
struct Session {
    child: Child,
    stdin: ChildStdin,
}

impl Session {
    fn open(d: &Deployment, node: &str) -> Session {
        let c = d.node(node);
        let psql = c.client_tool("psql").expect("psql");
        let mut child = Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &c.dsn("postgres")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn psql");
        let stdin = child.stdin.take().expect("psql stdin");
        Session { child, stdin }
    }

    fn run(&mut self, sql: &str) {
        writeln!(self.stdin, "{sql}").expect("write to psql");
        self.stdin.flush().expect("flush psql");
    }

    /// Ends the session and waits for psql to exit (its last statement ran).
    fn close(mut self) {
        self.run("\\q");
        let _ = self.child.wait();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Rows `from..=to` of `big`.
fn insert(from: u32, to: u32) -> String {
    format!("INSERT INTO big SELECT g, md5(g::text) FROM generate_series({from}, {to}) g;")
}

/// Waits until west's apply session holds an open transaction (a streamed one, applied live).
fn wait_applied_live(d: &Deployment) {
    d.wait_for(
        "west",
        "SELECT count(*) > 0 FROM pg_stat_activity \
         WHERE application_name LIKE 'walbridge-apply-east%' AND backend_xid IS NOT NULL",
        "t",
    );
}

/// Opens a transaction on east inserting rows 1..=`rows` and waits until west applies it live
/// (streamed, not yet committed); the caller commits or rolls back.
fn streaming_on_east(d: &Deployment, rows: u32) -> Session {
    let mut s = Session::open(d, "east");
    s.run("BEGIN;");
    s.run(&insert(1, rows));
    wait_applied_live(d);
    s
}

#[test]
fn streamed_transaction_is_applied_while_in_progress() {
    let d = deployment("");
    let mut run = d.spawn_run("run.log");
    let mut s = Session::open(&d, "east");
    s.run("BEGIN;");
    s.run(&insert(1, 200_000));
    // Streamed by east, applied into an open transaction on west, not visible there yet.
    d.wait_for(
        "east",
        "SELECT coalesce(sum(stream_txns), 0) > 0 FROM pg_stat_replication_slots",
        "t",
    );
    wait_applied_live(&d);
    assert_eq!(d.sql("west", "SELECT count(*) FROM big"), "0");
    s.run("COMMIT;");
    s.close();
    d.wait_for("west", "SELECT count(*) FROM big", "200000");
    assert_eq!(
        d.fingerprint("west", "big", "id"),
        d.fingerprint("east", "big", "id")
    );
    // No echo: east's rows are the ones its own transaction wrote, never rewritten.
    d.wait_caught_up();
    assert_eq!(
        d.sql("east", "SELECT count(DISTINCT xmin::text) FROM big"),
        "1"
    );
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM walbridge.conflicts"),
        "0"
    );
    assert_eq!(
        d.sql("east", "SELECT count(*) FROM walbridge.conflicts"),
        "0"
    );
    run.assert_running();
}

#[test]
fn streamed_transaction_rolled_back_leaves_nothing() {
    let d = deployment("");
    let _run = d.spawn_run("run.log");
    let mut s = streaming_on_east(&d, 100_000);
    s.run("ROLLBACK;");
    s.close();
    d.sql("east", "INSERT INTO small VALUES (1, 'after')");
    d.wait_for("west", "SELECT count(*) FROM small", "1");
    assert_eq!(d.sql("west", "SELECT count(*) FROM big"), "0");
    // Nothing is left open on west either.
    d.wait_for(
        "west",
        "SELECT count(*) FROM pg_stat_activity \
         WHERE application_name LIKE 'walbridge-apply-east%' AND backend_xid IS NOT NULL",
        "0",
    );
}

#[test]
fn streamed_subtransaction_rolled_back_is_left_out() {
    let d = deployment("");
    let _run = d.spawn_run("run.log");
    let mut s = Session::open(&d, "east");
    s.run("BEGIN;");
    s.run(&insert(1, 30_000));
    s.run("SAVEPOINT a;");
    s.run(&insert(30_001, 60_000));
    s.run("SAVEPOINT b;");
    s.run(&insert(60_001, 70_000));
    s.run("ROLLBACK TO SAVEPOINT a;");
    s.run("SAVEPOINT c;");
    s.run(&insert(70_001, 90_000));
    s.run("RELEASE SAVEPOINT c;");
    s.run(&insert(90_001, 100_000));
    s.run("COMMIT;");
    s.close();
    let summary = "SELECT count(*) || ':' || min(id) || ':' || max(id) || ':' || \
                   count(*) FILTER (WHERE id BETWEEN 30001 AND 70000) FROM big";
    assert_eq!(d.sql("east", summary), "60000:1:100000:0");
    d.wait_for("west", summary, "60000:1:100000:0");
}

#[test]
fn ordinary_transaction_interleaved_with_a_streamed_one_arrives_first() {
    let d = deployment("");
    let mut run = d.spawn_run("run.log");
    let mut s = streaming_on_east(&d, 100_000);
    // A small transaction commits while the large one is still open on east.
    d.sql("east", "INSERT INTO small VALUES (1, 'first')");
    d.wait_for("west", "SELECT v FROM small WHERE id = 1", "first");
    assert_eq!(d.sql("west", "SELECT count(*) FROM big"), "0");
    s.run(&insert(100_001, 150_000));
    s.run("COMMIT;");
    s.close();
    d.wait_for("west", "SELECT count(*) FROM big", "150000");
    // It got there spilled: given up live when the small one interleaved.
    assert!(run.log().contains("kept on disk"), "log:\n{}", run.log());
    assert_eq!(
        d.fingerprint("west", "big", "id"),
        d.fingerprint("east", "big", "id")
    );
    run.assert_running();
}

#[test]
fn spilled_transaction_leaves_out_its_rolled_back_subtransaction() {
    let d = deployment("");
    let run = d.spawn_run("run.log");
    let mut s = streaming_on_east(&d, 50_000);
    // Interleaved: from here on the large transaction is kept on disk until it commits.
    d.sql("east", "INSERT INTO small VALUES (1, 'first')");
    d.wait_for("west", "SELECT count(*) FROM small", "1");
    s.run("SAVEPOINT a;");
    s.run(&insert(50_001, 80_000));
    s.run("ROLLBACK TO SAVEPOINT a;");
    s.run(&insert(80_001, 100_000));
    s.run("COMMIT;");
    s.close();
    let summary = "SELECT count(*) || ':' || max(id) || ':' || \
                   count(*) FILTER (WHERE id BETWEEN 50001 AND 80000) FROM big";
    d.wait_for("west", summary, "70000:100000:0");
    assert_eq!(
        d.fingerprint("west", "big", "id"),
        d.fingerprint("east", "big", "id")
    );
    assert!(run.log().contains("kept on disk"), "log:\n{}", run.log());
}

#[test]
fn streamed_transaction_conflict_is_resolved_by_last_write_wins() {
    // Small (still streamed at 64kB): the careful path is one change per round trip.
    let d = deployment("");
    let mut run = d.spawn_run("run.log");
    d.sql("east", &insert(1, 4_000));
    d.wait_for("west", "SELECT count(*) FROM big", "4000");
    let mut s = Session::open(&d, "east");
    s.run("BEGIN;");
    s.run("UPDATE big SET v = 'east:' || id WHERE id <= 2000;");
    wait_applied_live(&d);
    // West writes a row the streamed transaction has not reached yet: newer than the
    // transaction's first block, older than its commit.
    d.sql("west", "UPDATE big SET v = 'west' WHERE id = 3000");
    d.wait_for("east", "SELECT v FROM big WHERE id = 3000", "west");
    s.run("UPDATE big SET v = 'east:' || id WHERE id > 2000;");
    s.run("COMMIT;");
    s.close();
    // The streamed transaction commits last: it wins on both nodes, decided on west's
    // careful path (its optimistic update found west's newer row).
    let done = "SELECT count(*) FROM big WHERE v = 'east:' || id";
    d.wait_for("east", done, "4000");
    d.wait_for("west", done, "4000");
    assert!(
        run.log().contains("needs conflict resolution"),
        "log:\n{}",
        run.log()
    );
    assert_eq!(
        d.fingerprint("west", "big", "id"),
        d.fingerprint("east", "big", "id")
    );
    run.assert_running();
}

#[test]
fn kill_during_streamed_transaction_applies_it_once() {
    let d = deployment("");
    let mut run = d.spawn_run("run.log");
    let mut s = streaming_on_east(&d, 100_000);
    // Half applied on west, in its open transaction: walbridge dies.
    run.signal(libc::SIGKILL);
    run.wait_exit(WAIT);
    s.run(&insert(100_001, 200_000));
    s.run("COMMIT;");
    s.close();
    let _run = d.spawn_run("run2.log");
    d.wait_for("west", "SELECT count(*) FROM big", "200000");
    assert_eq!(
        d.fingerprint("west", "big", "id"),
        d.fingerprint("east", "big", "id")
    );
    // Each row once, by one transaction: nothing was applied twice or resolved.
    assert_eq!(
        d.sql("west", "SELECT count(DISTINCT xmin::text) FROM big"),
        "1"
    );
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM walbridge.conflicts"),
        "0"
    );
}

#[test]
fn streamed_transaction_waits_for_commit_with_streaming_off() {
    // The same transaction with `stream_in_progress = false`: nothing is open on west while
    // it is in progress on east (so the tests above observe streaming, not chance).
    let d = deployment("stream_in_progress = false");
    let _run = d.spawn_run("run.log");
    let mut s = Session::open(&d, "east");
    s.run("BEGIN;");
    s.run(&insert(1, 100_000));
    d.sql("east", "INSERT INTO small VALUES (1, 'marker')");
    d.wait_for("west", "SELECT count(*) FROM small", "1");
    assert_eq!(
        d.sql(
            "west",
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name LIKE 'walbridge-apply-east%' AND backend_xid IS NOT NULL"
        ),
        "0"
    );
    s.run("COMMIT;");
    s.close();
    d.wait_for("west", "SELECT count(*) FROM big", "100000");
}

#[test]
fn heavy_million_row_streamed_transaction_keeps_memory_bounded() {
    let d = deployment("");
    let run = d.spawn_run("run.log");
    let mut s = streaming_on_east(&d, 1_000_000);
    s.run("COMMIT;");
    s.close();
    d.wait_for("west", "SELECT count(*) FROM big", "1000000");
    let peak = peak_rss_kb(run.child.id());
    eprintln!(
        "walbridge peak RSS while streaming a 1M-row transaction: {} MB",
        peak / 1024
    );
    assert!(peak > 0 && peak < 200 * 1024, "peak RSS {peak} kB");
}
