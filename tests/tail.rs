//! `walbridge tail` as a user runs it: the real binary against a one-node configuration,
//! changes made with psql, JSON lines read from its stdout.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::support::*;

/// A running `walbridge tail` whose stdout lines arrive on a channel.
pub struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::path::PathBuf,
}

impl Tail {
    /// Starts `walbridge tail <args> --config <d.config>`.
    pub fn spawn(d: &Deployment, args: &[&str]) -> Tail {
        let name: String = args
            .join("_")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let stderr = d.dir.path().join(format!("tail-{name}.log"));
        let mut child = Command::new(walbridge_bin())
            .arg("tail")
            .args(args)
            .arg("--config")
            .arg(&d.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn walbridge tail");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Tail {
            child,
            lines,
            stderr,
        }
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The next `n` lines, parsed; panics (with stderr) when they do not come within WAIT.
    pub fn take(&self, n: usize) -> Vec<Json> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")),
                ),
                Err(_) => panic!(
                    "only {} of {n} lines within {WAIT:?}: {out:#?}\nstderr:\n{}",
                    out.len(),
                    self.stderr()
                ),
            }
        }
        out
    }

    /// Sends a signal.
    pub fn signal(&self, signal: i32) {
        signal_child(&self.child, signal);
    }

    /// The exit code, waiting up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_child_exit(&mut self.child, timeout)
    }

    /// Interrupts it and asserts the clean exit (0).
    pub fn interrupt(&mut self) {
        self.signal(libc::SIGINT);
        let code = self.wait_exit(WAIT);
        assert_eq!(
            code,
            Some(0),
            "exit after SIGINT; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a `walbridge tail` of `node` is streaming (its walsender is past startup), so
/// that changes made from now on are in its feed.
pub fn wait_streaming(d: &Deployment, node: &str, tail: &Tail) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_replication \
         WHERE application_name = 'walbridge-tail-{node}' AND state = 'streaming'"
    );
    let mut last = String::new();
    let ok = wait_until(WAIT, || {
        last = d.node(node).psql("postgres", &sql).unwrap_or_default();
        last == "1"
    });
    assert!(
        ok,
        "tail never started streaming ({last}); stderr:\n{}",
        tail.stderr()
    );
}

const SCHEMA: &str = "
    CREATE TYPE mood AS ENUM ('ok', 'meh');
    CREATE TABLE items (id int PRIMARY KEY, name text, m mood);
";

fn str_field<'a>(line: &'a Json, field: &str) -> &'a str {
    line[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {line}"))
}

/// Begin and commit frame one psql transaction, with matching xid, LSNs and time.
fn check_frame(lines: &[Json]) {
    let (begin, commit) = (&lines[0], &lines[lines.len() - 1]);
    assert_eq!(begin["op"], "begin", "{lines:#?}");
    assert_eq!(commit["op"], "commit", "{lines:#?}");
    assert!(begin["xid"].as_u64().is_some(), "{begin}");
    assert_eq!(begin["xid"], commit["xid"]);
    assert_eq!(begin["commit_lsn"], commit["commit_lsn"]);
    assert_eq!(begin["commit_time"], commit["commit_time"]);
    assert_eq!(begin["origin"], Json::Null);
    let time = str_field(begin, "commit_time");
    assert!(
        chrono::DateTime::parse_from_rfc3339(time).is_ok(),
        "commit_time {time}"
    );
    for lsn in [str_field(begin, "commit_lsn"), str_field(commit, "end_lsn")] {
        assert!(lsn.parse::<walbridge::lsn::Lsn>().is_ok(), "{lsn}");
    }
    for change in &lines[1..lines.len() - 1] {
        assert_eq!(change["xid"], begin["xid"], "{change}");
        // Truncate lines carry no LSN (see docs/tail.md).
        if change["op"] != "truncate" {
            assert!(str_field(change, "lsn")
                .parse::<walbridge::lsn::Lsn>()
                .is_ok());
        }
    }
}

fn prints_one_line_per_change(plugin: &str) {
    let schema = format!("{SCHEMA} CREATE PUBLICATION walbridge_pub FOR ALL TABLES;");
    let d = Deployment::new(&["a"], &schema, &format!("plugin = \"{plugin}\""));
    let mut tail = Tail::spawn(&d, &["--node", "a"]);
    wait_streaming(&d, "a", &tail);

    d.sql(
        "a",
        "INSERT INTO items VALUES (1, 'one \"quoted\" ✓', 'ok')",
    );
    let insert = tail.take(3);
    check_frame(&insert);
    let line = &insert[1];
    assert_eq!(line["op"], "insert");
    assert_eq!(line["schema"], "public");
    assert_eq!(line["table"], "items");
    assert_eq!(
        line["columns"],
        serde_json::json!([
            {"name": "id", "type": "int4", "type_oid": 23, "typmod": -1, "key": true},
            {"name": "name", "type": "text", "type_oid": 25, "typmod": -1, "key": false},
            {"name": "m", "type": "public.mood", "type_oid": line["columns"][2]["type_oid"],
             "typmod": -1, "key": false},
        ])
    );
    assert_eq!(line["key"], serde_json::json!({"id": "1"}));
    assert_eq!(
        line["new"],
        serde_json::json!({"id": "1", "name": "one \"quoted\" ✓", "m": "ok"})
    );
    assert_eq!(line["old"], Json::Null);

    d.sql("a", "UPDATE items SET id = 2, m = NULL WHERE id = 1");
    let update = tail.take(3);
    check_frame(&update);
    assert_eq!(update[1]["op"], "update");
    assert_eq!(update[1]["key"], serde_json::json!({"id": "1"}));
    assert_eq!(update[1]["old"], serde_json::json!({"id": "1"}));
    assert_eq!(
        update[1]["new"],
        serde_json::json!({"id": "2", "name": "one \"quoted\" ✓", "m": null})
    );

    d.sql(
        "a",
        "DELETE FROM items; SELECT pg_logical_emit_message(true, 'p', 'bye')",
    );
    let delete = tail.take(4);
    check_frame(&delete);
    assert_eq!(delete[1]["op"], "delete");
    assert_eq!(delete[1]["new"], Json::Null);
    assert_eq!(delete[1]["old"], serde_json::json!({"id": "2"}));
    assert_eq!(delete[2]["op"], "message");
    assert_eq!(delete[2]["prefix"], "p");
    assert_eq!(delete[2]["content"], "bye");

    d.sql("a", "TRUNCATE items");
    let truncate = tail.take(3);
    check_frame(&truncate);
    assert_eq!(
        truncate[1]["relations"],
        serde_json::json!([{"schema": "public", "table": "items"}])
    );

    // The temporary slot existed while tail ran and is gone after a clean stop.
    assert_eq!(
        d.sql(
            "a",
            "SELECT slot_name LIKE 'walbridge\\_tail\\_%' AND temporary FROM pg_replication_slots"
        ),
        "t"
    );
    tail.interrupt();
    d.wait_for("a", "SELECT count(*) FROM pg_replication_slots", "0");
}

#[test]
fn tail_prints_one_json_line_per_change_pgoutput() {
    prints_one_line_per_change("pgoutput");
}

#[test]
fn tail_prints_one_json_line_per_change_wal2json() {
    if !wal2json_available() {
        return;
    }
    prints_one_line_per_change("wal2json");
}

/// With --slot, tail reads that slot (with the slot's plugin: here wal2json although the
/// configuration says pgoutput, so no publication is needed), advances it past what it
/// printed, and leaves it in place: a second run resumes after the first.
#[test]
fn tail_reuses_an_existing_slot_and_resumes_after_what_it_printed() {
    if !wal2json_available() {
        return;
    }
    let d = Deployment::new(&["a"], SCHEMA, "plugin = \"pgoutput\"");
    d.sql(
        "a",
        "SELECT pg_create_logical_replication_slot('feed', 'wal2json')",
    );
    // Written before tail starts: the slot keeps it.
    d.sql("a", "INSERT INTO items VALUES (1, 'before', 'ok')");

    let mut tail = Tail::spawn(&d, &["--node", "a", "--slot", "feed"]);
    let first = tail.take(3);
    check_frame(&first);
    assert_eq!(first[1]["new"]["name"], "before");
    let end = str_field(&first[2], "end_lsn").to_string();
    tail.interrupt();
    // The slot stays, confirmed past the printed transaction (its walsender may outlive the
    // exited client for a moment: wait for it to let go).
    d.wait_for(
        "a",
        &format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'feed' \
             AND NOT active AND confirmed_flush_lsn >= '{end}'"
        ),
        "1",
    );

    d.sql("a", "INSERT INTO items VALUES (2, 'after', 'meh')");
    let mut tail = Tail::spawn(&d, &["--node", "a", "--slot", "feed"]);
    let second = tail.take(3);
    check_frame(&second);
    assert_eq!(second[1]["new"]["name"], "after", "{second:#?}");
    tail.interrupt();
    assert_eq!(
        d.sql("a", "SELECT slot_name FROM pg_replication_slots"),
        "feed"
    );
}

#[test]
fn tail_without_the_publication_says_how_to_create_it() {
    let d = Deployment::new(
        &["a"],
        SCHEMA,
        "plugin = \"pgoutput\"\nslot_prefix = \"wb\"",
    );
    let out = d.walbridge(&["tail", "--node", "a"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("publication wb_pub does not exist on node a")
            && stderr.contains("CREATE PUBLICATION \"wb_pub\" FOR ALL TABLES")
            && stderr.contains("walbridge setup"),
        "{stderr}"
    );
    // Checked before any slot was made.
    assert_eq!(d.sql("a", "SELECT count(*) FROM pg_replication_slots"), "0");
    // --publication names another one.
    d.sql("a", "CREATE PUBLICATION other FOR TABLE items");
    let mut tail = Tail::spawn(&d, &["--node", "a", "--publication", "other"]);
    wait_streaming(&d, "a", &tail);
    d.sql("a", "INSERT INTO items VALUES (1, 'x', 'ok')");
    assert_eq!(tail.take(3)[1]["op"], "insert");
    tail.interrupt();
}

#[test]
fn tail_argument_errors() {
    let d = Deployment::new(&["a"], SCHEMA, "");
    let run = |args: &[&str]| {
        let out = d.walbridge(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // An unknown node and walbridge's own replication slots are usage errors.
    let (code, err) = run(&["tail", "--node", "b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--node b") && err.contains("nodes are a"),
        "{err}"
    );
    let (code, err) = run(&["tail", "--node", "a", "--slot", "walbridge_a_to_b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("walbridge's replication slot for a -> b") && err.contains("Omit --slot"),
        "{err}"
    );
    // A missing slot, or one of another plugin than asked for, fails before streaming.
    let (code, err) = run(&["tail", "--node", "a", "--slot", "nosuch"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("replication slot nosuch does not exist on node a")
            && err.contains("pg_create_logical_replication_slot('nosuch', 'pgoutput')"),
        "{err}"
    );
    if !wal2json_available() {
        return;
    }
    d.sql(
        "a",
        "SELECT pg_create_logical_replication_slot('w', 'wal2json')",
    );
    let (code, err) = run(&["tail", "--node", "a", "--slot", "w", "--plugin", "pgoutput"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("it was created with wal2json, not pgoutput"),
        "{err}"
    );
}

/// --from starts past what committed before that position (the slot still holds it).
#[test]
fn tail_from_skips_what_committed_before() {
    let d = Deployment::new(
        &["a"],
        &format!("{SCHEMA} CREATE PUBLICATION walbridge_pub FOR ALL TABLES;"),
        "",
    );
    d.sql(
        "a",
        "SELECT pg_create_logical_replication_slot('feed', 'pgoutput')",
    );
    d.sql("a", "INSERT INTO items VALUES (1, 'skipped', 'ok')");
    let from = d.sql("a", "SELECT pg_current_wal_lsn()");
    d.sql("a", "INSERT INTO items VALUES (2, 'shown', 'ok')");
    let mut tail = Tail::spawn(&d, &["--node", "a", "--slot", "feed", "--from", &from]);
    let lines = tail.take(3);
    check_frame(&lines);
    assert_eq!(lines[1]["new"]["name"], "shown", "{lines:#?}");
    tail.interrupt();
}
