//! Data safety and privacy against real clusters and the real binary: row values stay out of
//! logs and status, lossy wal2json is refused, and tables that start matching
//! `replication.tables` while `run` streams are replicated, never skipped.

use std::net::SocketAddr;

use serde_json::Value;

use crate::observability::{http_get, scrape};
use crate::support::*;

/// Runs `status --json`; the parsed object.
fn status_json(d: &Deployment) -> Value {
    let out = d.walbridge(&["status", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not one JSON object ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The `last_error` of direction `s` → `t` in a status object (`""` when none).
fn last_error(json: &Value, s: &str, t: &str) -> String {
    json["directions"]
        .as_array()
        .and_then(|dirs| {
            dirs.iter()
                .find(|d| d["source"] == s && d["target"] == t)
                .and_then(|d| d["last_error"].as_str())
        })
        .unwrap_or_default()
        .to_string()
}

/// A value that only the rows hold, so finding it anywhere else is a leak.
const SECRET: &str = "zebra-4711@example.org";

#[test]
fn row_values_in_server_errors_stay_out_of_logs_and_status() {
    let mut d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.people (id int PRIMARY KEY, email text);",
        "plugin = \"pgoutput\"",
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], d.enable_metrics()));
    // West alone has a unique email and already holds the address (written before setup,
    // so not replicated): east's row with the same address fails there with
    // `DETAIL: Key (email)=(zebra-4711@example.org) already exists.`
    d.sql(
        "west",
        &format!(
            "ALTER TABLE people ADD CONSTRAINT people_email_key UNIQUE (email);
             INSERT INTO people VALUES (1, '{SECRET}')"
        ),
    );
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");
    d.sql(
        "east",
        &format!("INSERT INTO people VALUES (2, '{SECRET}')"),
    );

    let mut status = Value::Null;
    let stopped = wait_until(WAIT, || {
        status = status_json(&d);
        last_error(&status, "east", "west").contains("people_email_key")
    });
    run.assert_running();
    assert!(stopped, "east -> west never reported the failure: {status}");
    let (_, board) = http_get(addr, "/status").expect("/status answers");
    let metrics = scrape(addr);
    let log = run.log();
    for (what, text) in [
        ("status --json", status.to_string()),
        ("/status", board),
        ("the log", log.clone()),
        ("/metrics", format!("{:?}", metrics.samples)),
    ] {
        assert!(
            !text.contains("zebra-4711"),
            "a row value reached {what}:\n{text}"
        );
    }
    assert!(log.contains("detail withheld"), "{log}");
    drop(run);

    // The opt-in for debugging shows it.
    let run = d.spawn_run_env("debug.log", &[("WALBRIDGE_LOG_ROW_CONTENTS", "1")]);
    let shown = wait_until(WAIT, || run.log().contains("zebra-4711"));
    assert!(
        shown,
        "row_contents did not show the DETAIL:\n{}",
        run.log()
    );
}

const WAL2JSON: &str = "plugin = \"wal2json\"\ntables = [\"public.*\"]";

/// Two nodes replicating `public.*` with wal2json, running, table `a` seen streaming; `None`
/// without wal2json.
fn wal2json_pair_streaming_table_a() -> Option<(Deployment, Runner)> {
    if !wal2json_available() {
        return None;
    }
    let d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.a (id int PRIMARY KEY);",
        WAL2JSON,
    );
    d.walbridge_ok(&["setup"]);
    let run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO a VALUES (1)");
    d.wait_for("west", "SELECT count(*) FROM a", "1");
    Some((d, run))
}

#[test]
fn wal2json_replicates_a_table_created_while_running() {
    let Some((d, mut run)) = wal2json_pair_streaming_table_a() else {
        return;
    };
    // A new table matching `public.*`, created on both nodes (DDL is not replicated) while
    // the stream runs: its rows are replicated, not skipped and confirmed past.
    for n in ["east", "west"] {
        d.sql(n, "CREATE TABLE public.b (id int PRIMARY KEY, v text)");
    }
    d.sql("east", "INSERT INTO b VALUES (1, 'x'), (2, 'y')");
    d.sql("east", "UPDATE b SET v = 'z' WHERE id = 2");
    d.wait_for(
        "west",
        "SELECT string_agg(id || v, ',' ORDER BY id) FROM b",
        "1x,2z",
    );
    d.sql("west", "DELETE FROM b WHERE id = 1");
    d.wait_for("east", "SELECT count(*) FROM b", "1");
    run.assert_running();
}

#[test]
fn wal2json_with_no_matching_table_streams_nothing_else() {
    if !wal2json_available() {
        return;
    }
    // Every table matching `public.*` is gone when run starts: that selection is empty, and
    // must not mean "every table" (another schema's, or walbridge's own bookkeeping).
    let d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.a (id int PRIMARY KEY);
         CREATE SCHEMA other; CREATE TABLE other.x (id int PRIMARY KEY);",
        WAL2JSON,
    );
    d.walbridge_ok(&["setup"]);
    for n in ["east", "west"] {
        d.sql(n, "DROP TABLE public.a");
    }
    let mut run = d.spawn_run("run.log");
    for n in ["east", "west"] {
        d.sql(
            n,
            "INSERT INTO other.x VALUES (1);
             UPDATE walbridge.settings SET value = value WHERE name = 'node_name';",
        );
        d.sql(n, "CREATE TABLE public.b (id int PRIMARY KEY)");
    }
    d.sql("east", "INSERT INTO b VALUES (1)");
    d.sql("west", "INSERT INTO b VALUES (2)");
    for n in ["east", "west"] {
        d.wait_for(n, "SELECT count(*) FROM b", "2");
    }
    // Both streams passed those changes before b's: they were dropped, not applied (each
    // node keeps its own walbridge.settings, and other.x its one row).
    for n in ["east", "west"] {
        assert_eq!(d.sql(n, "SELECT count(*) FROM other.x"), "1", "on {n}");
        assert_eq!(
            d.sql(
                n,
                "SELECT value FROM walbridge.settings WHERE name = 'node_name'"
            ),
            n
        );
    }
    run.assert_running();
}

#[test]
fn lossy_wal2json_is_refused_with_float_columns() {
    if !wal2json_available() {
        return;
    }
    // This machine's wal2json (2.5) rejects numeric-data-types-as-string, so it writes NaN
    // and ±Infinity as null: the probe finds that on the real servers.
    let mut d = Deployment::new(
        &["east", "west"],
        "CREATE DOMAIN price AS numeric(10, 2);
         CREATE TABLE public.m (id int PRIMARY KEY, f float8, n numeric, p price, t text,
                                g float8 GENERATED ALWAYS AS (f * 2) STORED);",
        WAL2JSON,
    );
    let columns = "public.m.f, public.m.n, public.m.p;";
    for cmd in [&["check-config", "--connect"][..], &["setup"][..]] {
        let out = d.walbridge(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains(columns) && stderr.contains("allow_lossy_wal2json"),
            "{cmd:?}: {stderr}"
        );
    }
    // Accepted on purpose: setup goes on, with a warning.
    d.set_replication_toml(&format!("{WAL2JSON}\nallow_lossy_wal2json = true"));
    let out = d.walbridge_ok(&["setup"]);
    assert!(out.contains("warning") && out.contains(columns), "{out}");
    // And run refuses it again once the key is gone.
    d.set_replication_toml(WAL2JSON);
    let mut run = d.spawn_run("run.log");
    let refused = wait_until(WAIT, || {
        let log = run.log();
        log.contains(columns) && log.contains("direction stopped")
    });
    assert!(refused, "run did not refuse:\n{}", run.log());
    d.sql("east", "INSERT INTO m (id, f) VALUES (1, 'NaN')");
    assert_eq!(d.sql("west", "SELECT count(*) FROM m"), "0");
    run.assert_running();
    // pgoutput sends exact values: no refusal.
    d.set_replication_toml("plugin = \"pgoutput\"");
    d.walbridge_ok(&["check-config", "--connect"]);
}

#[test]
fn lossy_wal2json_refuses_a_float_table_that_joins_while_running() {
    let Some((d, mut run)) = wal2json_pair_streaming_table_a() else {
        return;
    };
    for n in ["east", "west"] {
        d.sql(n, "CREATE TABLE public.m (id int PRIMARY KEY, f real)");
    }
    d.sql("east", "INSERT INTO m VALUES (1, 'Infinity')");
    let refused = wait_until(WAIT, || {
        let log = run.log();
        log.contains("public.m.f;") && log.contains("direction stopped")
    });
    assert!(refused, "run did not refuse:\n{}", run.log());
    assert_eq!(d.sql("west", "SELECT count(*) FROM m"), "0");
    run.assert_running();
}
