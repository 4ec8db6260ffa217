//! `walbridge status [--json]`: the contract's JSON shape, the exit codes, the numbers from
//! the databases without a process and from the running process's board with one.

use std::net::SocketAddr;

use serde_json::Value;

use crate::observability::{scrape, wait_readyz};
use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.items (id int PRIMARY KEY, v text);";

/// Runs `status --json`: exit code and the parsed object.
fn status_json(d: &Deployment) -> (i32, Value) {
    let out = d.walbridge(&["status", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "status --json is not one JSON object ({e}):\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The keys the contract promises, with their JSON types.
fn assert_contract_shape(json: &Value) {
    let nodes = json["nodes"].as_array().expect("nodes is an array");
    assert!(!nodes.is_empty());
    for n in nodes {
        assert!(n["name"].is_string(), "{n}");
        assert!(n["reachable"].is_boolean(), "{n}");
        assert!(n.get("mode").is_some(), "{n}");
        for s in n["slots"].as_array().expect("slots is an array") {
            assert!(s["name"].is_string(), "{s}");
            assert!(
                s["retained_wal_bytes"].is_u64() || s["retained_wal_bytes"].is_null(),
                "{s}"
            );
            assert!(s["active"].is_boolean(), "{s}");
        }
    }
    let directions = json["directions"]
        .as_array()
        .expect("directions is an array");
    assert!(!directions.is_empty());
    for d in directions {
        for key in [
            "source",
            "target",
            "mode",
            "plugin",
            "slot",
            "origin",
            "confirmed_lsn",
            "lag_bytes",
            "lag_seconds",
            "state",
            "last_error",
        ] {
            assert!(d.get(key).is_some(), "direction lacks {key}: {d}");
        }
        assert!(d["state"].is_string());
        assert!(d["lag_bytes"].is_u64() || d["lag_bytes"].is_null(), "{d}");
        assert!(
            d["lag_seconds"].is_number() || d["lag_seconds"].is_null(),
            "{d}"
        );
        if let Some(lsn) = d["confirmed_lsn"].as_str() {
            assert!(lsn.parse::<walbridge::lsn::Lsn>().is_ok(), "{lsn}");
        }
    }
}

fn direction<'a>(json: &'a Value, s: &str, t: &str) -> &'a Value {
    json["directions"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["source"] == s && d["target"] == t))
        .unwrap_or_else(|| panic!("no direction {s} -> {t} in {json}"))
}

fn node<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("no node {name} in {json}"))
}

#[test]
fn status_without_a_process_reads_the_databases() {
    if !wal2json_available() {
        return;
    }
    let mut d = Deployment::new(&["east", "west"], SCHEMA, "plugin = \"wal2json\"");
    d.walbridge_ok(&["setup"]);
    // Changes after setup are pinned by the slot until a run confirms them.
    d.sql(
        "east",
        "INSERT INTO items SELECT g, repeat('x', 100) FROM generate_series(1, 500) g",
    );
    let (code, json) = status_json(&d);
    assert_eq!(code, 0, "{json}");
    assert_contract_shape(&json);
    assert_eq!(json["process"]["running"], false);
    let ew = direction(&json, "east", "west");
    assert_eq!(ew["state"], "not_running");
    assert_eq!(ew["mode"], "stream");
    assert_eq!(ew["plugin"], "wal2json");
    assert_eq!(ew["slot"], "walbridge_east_to_west");
    assert_eq!(ew["origin"], "walbridge_from_east");
    assert!(ew["confirmed_lsn"].is_string(), "{ew}");
    assert!(ew["lag_bytes"].as_u64().is_some_and(|b| b > 50_000), "{ew}");
    assert!(ew["last_error"].is_null(), "{ew}");
    // The same computation as the monitor: current WAL position minus the slot's confirmed.
    let expected = d.sql(
        "east",
        "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots \
         WHERE slot_name = 'walbridge_east_to_west'",
    );
    let expected: u64 = expected.parse().expect("a byte count");
    let got = ew["lag_bytes"].as_u64().unwrap_or(0);
    assert!(
        got <= expected && expected - got < 10_000,
        "status says {got}, the database {expected}"
    );
    let east = node(&json, "east");
    assert_eq!(east["reachable"], true);
    assert_eq!(east["mode"], "stream");
    let slots = east["slots"].as_array().expect("slots");
    assert_eq!(slots.len(), 1, "{east}");
    assert_eq!(slots[0]["name"], "walbridge_east_to_west");
    assert_eq!(slots[0]["active"], false);
    assert_eq!(slots[0]["peer"], "west");
    assert!(slots[0]["retained_wal_bytes"]
        .as_u64()
        .is_some_and(|b| b > 50_000));

    // The text form: a table per area.
    let out = d.walbridge(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "not running",
        "NODE",
        "REACHABLE",
        "walbridge_east_to_west",
        "DIRECTION",
        "east -> west",
        "west -> east",
        "not running",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }

    // A missing slot says what to do.
    d.sql(
        "west",
        "SELECT pg_drop_replication_slot('walbridge_west_to_east')",
    );
    let (code, json) = status_json(&d);
    assert_eq!(code, 0);
    let we = direction(&json, "west", "east");
    assert!(
        we["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("walbridge setup")),
        "{we}"
    );
    let _ = &mut d;
}

#[test]
fn status_exits_1_when_a_node_is_down() {
    let mut d = Deployment::new(&["east", "west"], SCHEMA, "");
    d.walbridge_ok(&["setup"]);
    d.node_mut("west").stop(StopMode::Fast).expect("stop west");
    let (code, json) = status_json(&d);
    assert_eq!(code, 1, "{json}");
    assert_contract_shape(&json);
    assert_eq!(node(&json, "west")["reachable"], false);
    assert!(node(&json, "west")["error"].is_string());
    assert_eq!(node(&json, "east")["reachable"], true);
    let we = direction(&json, "west", "east");
    assert!(
        we["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("west")),
        "{we}"
    );
    let out = d.walbridge(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("NO"));
}

#[test]
fn status_exits_2_on_a_configuration_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[nodes]]\nname = \"Bad Name\"\ndsn = \"host=x\"\n").expect("write");
    for args in [
        vec!["status", "--json", "--config"],
        vec!["status", "--config"],
    ] {
        let out = std::process::Command::new(walbridge_bin())
            .args(&args)
            .arg(&bad)
            .output()
            .expect("run status");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let missing = std::process::Command::new(walbridge_bin())
            .args(&args)
            .arg(dir.path().join("missing.toml"))
            .output()
            .expect("run status");
        assert_eq!(missing.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn status_shows_the_running_process_numbers() {
    let mut d = Deployment::new(&["east", "west"], SCHEMA, "plugin = \"pgoutput\"");
    let addr = SocketAddr::from(([127, 0, 0, 1], d.enable_metrics()));
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");
    wait_readyz(addr, 200, &mut run);
    d.sql("east", "INSERT INTO items VALUES (1, 'a'), (2, 'b')");
    d.sql("east", "UPDATE items SET v = 'c' WHERE id = 1");
    d.wait_for(
        "west",
        "SELECT string_agg(v, ',' ORDER BY id) FROM items",
        "c,b",
    );
    d.wait_caught_up();

    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        let (code, json) = status_json(&d);
        let settled = code == 0
            && direction(&json, "east", "west")["lag_seconds"] == 0.0
            && direction(&json, "east", "west")["transactions_applied"] == 2;
        last = json;
        settled
    });
    assert!(ok, "status never settled: {last}");
    assert_contract_shape(&last);
    assert_eq!(last["process"]["running"], true);
    assert!(last["process"]["pid"].is_u64());
    for (s, t) in [("east", "west"), ("west", "east")] {
        let dj = direction(&last, s, t);
        assert_eq!(dj["state"], "streaming", "{dj}");
        assert_eq!(dj["plugin"], "pgoutput");
        assert!(dj["confirmed_lsn"].is_string());
    }
    // The same numbers as the metrics.
    let m = scrape(addr);
    assert_eq!(
        m.value(
            "walbridge_transactions_applied_total",
            &[("source", "east"), ("target", "west")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.value(
            "walbridge_replication_lag_seconds",
            &[("source", "east"), ("target", "west")]
        ),
        Some(0.0)
    );
    for n in ["east", "west"] {
        assert_eq!(node(&last, n)["reachable"], true);
        assert_eq!(node(&last, n)["slots"][0]["active"], true, "{last}");
    }

    // While a node is down the process reports it and status exits 1.
    d.node_mut("west").stop(StopMode::Fast).expect("stop west");
    wait_readyz(addr, 503, &mut run);
    let ok = wait_until(WAIT, || {
        let (code, json) = status_json(&d);
        assert_eq!(code, 1, "{json}");
        last = json;
        direction(&last, "east", "west")["state"] != "streaming"
    });
    assert!(ok, "east -> west still streaming with west down: {last}");
    assert_eq!(node(&last, "west")["reachable"], false);
    let out = d.walbridge(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("walbridge run: running"), "{text}");
    d.node_mut("west").restart().expect("start west");
    wait_readyz(addr, 200, &mut run);
    let (code, _) = status_json(&d);
    assert_eq!(code, 0);
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}
