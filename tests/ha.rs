//! Several `walbridge run` instances on one configuration: one owner per direction, the others
//! on standby; takeover after kill -9 and after SIGSTOP, nothing lost or applied twice.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::*;

/// Inserts-only ledger without a key (a change applied twice shows as a duplicate), and a
/// marks table whose rows, written right after a kill, time the takeover.
const SCHEMA: &str = "CREATE TABLE public.ledger (seq bigint NOT NULL, note text);
                      ALTER TABLE public.ledger REPLICA IDENTITY FULL;
                      CREATE TABLE public.marks (id bigint PRIMARY KEY);";

const TOML: &str = "tables = [\"public.ledger\", \"public.marks\"]";

/// An instance: its own config copy (own metrics port when `metrics`), named `name`.
pub(crate) fn spawn_instance(
    d: &Deployment,
    name: &str,
    log: &str,
    metrics: Option<u16>,
) -> Runner {
    let mut text = std::fs::read_to_string(&d.config).expect("config");
    if let Some(port) = metrics {
        text = text.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    }
    text.push_str("\n[run]\ninstance = \"${WB_INSTANCE}\"\n");
    let config: PathBuf = d.dir.path().join(format!("{name}.toml"));
    std::fs::write(&config, text).expect("write config");
    // The name comes through the environment, as `${HOSTNAME}` does in Kubernetes.
    Runner::spawn(&config, d.dir.path().join(log), &[("WB_INSTANCE", name)])
}

/// (source, target) -> owner, from `walbridge status --json` (the targets' locks).
pub(crate) fn owners(d: &Deployment) -> BTreeMap<(String, String), Option<String>> {
    let out = d.walbridge(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["directions"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|x| {
            (
                (
                    x["source"].as_str().unwrap_or("").to_string(),
                    x["target"].as_str().unwrap_or("").to_string(),
                ),
                x["owner"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// HTTP status of `GET path` on a local port (0 when nothing answers).
fn http_code(port: u16, path: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn count(d: &Deployment, node: &str, sql: &str) -> i64 {
    d.sql(node, sql).parse().unwrap_or(-1)
}

#[test]
fn standby_instance_takes_over_after_kill_9() {
    let d = Deployment::new(&["a", "b"], SCHEMA, TOML);
    d.walbridge_ok(&["setup"]);
    let (p1, p2) = (
        walbridge::localpg::free_port().expect("port"),
        walbridge::localpg::free_port().expect("port"),
    );
    let mut one = spawn_instance(&d, "one", "one.log", Some(p1));
    let all_owned_by = |who: &str| owners(&d).values().all(|o| o.as_deref() == Some(who));
    assert!(
        wait_until(WAIT, || all_owned_by("one")),
        "{:?}\n{}",
        owners(&d),
        one.log()
    );
    let mut two = spawn_instance(&d, "two", "two.log", Some(p2));
    // The standby owns nothing, reaches every node, and is ready.
    assert!(
        wait_until(WAIT, || two.log().matches("standing by").count() == 2),
        "{}",
        two.log()
    );
    assert!(
        wait_until(WAIT, || http_code(p2, "/readyz") == 200),
        "{}",
        two.log()
    );
    assert!(
        wait_until(WAIT, || http_code(p1, "/readyz") == 200),
        "{}",
        one.log()
    );
    assert_eq!(
        metric_sum(&scrape(p1), "walbridge_direction_owned", &[]),
        2.0
    );
    assert_eq!(
        metric_sum(&scrape(p2), "walbridge_direction_owned", &[]),
        0.0
    );
    let text = d.walbridge_ok(&["status"]);
    assert!(text.contains("OWNER") && text.contains(" one"), "{text}");
    d.sql(
        "a",
        "INSERT INTO ledger SELECT g, 'a' FROM generate_series(1, 100) g",
    );
    d.sql(
        "b",
        "INSERT INTO ledger SELECT g, 'b' FROM generate_series(101, 200) g",
    );
    d.wait_for("a", "SELECT count(*) FROM ledger", "200");
    d.wait_for("b", "SELECT count(*) FROM ledger", "200");

    one.signal(libc::SIGKILL);
    one.wait_exit(WAIT);
    let killed = Instant::now();
    d.sql("a", "INSERT INTO marks VALUES (1)");
    d.sql("b", "INSERT INTO marks VALUES (2)");
    assert!(
        wait_until(Duration::from_secs(10), || count(
            &d,
            "a",
            "SELECT count(*) FROM marks"
        ) == 2
            && count(&d, "b", "SELECT count(*) FROM marks") == 2),
        "no takeover within 10 s; log:\n{}",
        two.log()
    );
    eprintln!("takeover after kill -9: {:?}", killed.elapsed());
    assert!(wait_until(WAIT, || all_owned_by("two")), "{:?}", owners(&d));
    assert_eq!(
        metric_sum(&scrape(p2), "walbridge_direction_owned", &[]),
        2.0
    );
    assert_eq!(
        two.log().matches("claimed direction").count(),
        2,
        "{}",
        two.log()
    );
    d.sql(
        "a",
        "INSERT INTO ledger SELECT g, 'a' FROM generate_series(201, 300) g",
    );
    d.wait_for(
        "b",
        "SELECT count(*) || ' ' || count(DISTINCT seq) FROM ledger",
        "300 300",
    );
    d.wait_caught_up();
    for n in ["a", "b"] {
        assert_eq!(
            d.sql(
                n,
                "SELECT count(*) || ' ' || count(DISTINCT seq) FROM ledger"
            ),
            "300 300"
        );
    }
    two.assert_running();
}

/// Instance name -> how many directions it owns.
fn owned_counts(d: &Deployment) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in owners(d).into_values().flatten() {
        *m.entry(o).or_insert(0) += 1;
    }
    m
}

#[test]
fn heavy_kill_9_owners_repeatedly_three_nodes_three_instances() {
    let nodes = ["a", "b", "c"];
    let d = Deployment::new(&nodes, SCHEMA, TOML);
    d.walbridge_ok(&["setup"]);
    let names = ["i1", "i2", "i3"];
    let mut runners: Vec<Runner> = names
        .iter()
        .map(|n| spawn_instance(&d, n, &format!("{n}-0.log"), None))
        .collect();
    assert!(
        wait_until(WAIT, || owners(&d).values().all(Option::is_some)),
        "{:?}",
        owners(&d)
    );
    let per_node = 1500;
    let mut writers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| ledger_writer(&d, n, 1 + i as i64 * 100_000, per_node, "0.005", false))
        .collect();
    let kills = 10;
    let mut times = Vec::new();
    for round in 1..=kills {
        let counts = owned_counts(&d);
        let Some((victim, _)) = counts.iter().max_by_key(|(_, c)| **c) else {
            panic!("nobody owns anything: {:?}", owners(&d));
        };
        let i = names
            .iter()
            .position(|n| n == victim)
            .expect("known instance");
        runners[i].signal(libc::SIGKILL);
        runners[i].wait_exit(WAIT);
        let killed = Instant::now();
        for (k, n) in nodes.iter().enumerate() {
            d.sql(
                n,
                &format!("INSERT INTO marks VALUES ({})", round * 10 + k as i64),
            );
        }
        let want = (round * 3).to_string();
        let ok = wait_until(Duration::from_secs(10), || {
            nodes
                .iter()
                .all(|n| d.sql(n, "SELECT count(*) FROM marks") == want)
        });
        let took = killed.elapsed();
        assert!(
            ok,
            "round {round}: no takeover within 10 s after killing {victim}; owners {:?}",
            owners(&d)
        );
        times.push(took);
        runners[i] = spawn_instance(&d, victim, &format!("{victim}-{round}.log"), None);
    }
    for w in &mut writers {
        assert!(w.wait().expect("writer").success());
    }
    let total = (per_node * 3).to_string();
    for n in nodes {
        d.wait_for(n, "SELECT count(*) FROM ledger", &total);
    }
    d.wait_caught_up();
    let first = ledger_summary(&d, "a");
    assert!(
        first.starts_with(&format!("{total} rows, {total} distinct")),
        "{first}"
    );
    for n in nodes {
        assert_eq!(ledger_summary(&d, n), first, "on {n}");
    }
    times.sort();
    eprintln!(
        "takeover after kill -9 over {kills} kills: min {:?}, median {:?}, max {:?}; {} rows checked on each of 3 nodes",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        total
    );
    for r in &mut runners {
        r.assert_running();
    }
}

/// The backend pids of walbridge apply sessions on `node` owned by `instance`.
fn apply_pids(d: &Deployment, node: &str, instance: &str) -> String {
    d.sql(
        node,
        &format!(
            "SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '') FROM pg_stat_activity \
             WHERE application_name LIKE 'walbridge-apply-%@{instance}'"
        ),
    )
}

#[test]
fn heavy_sigstopped_owner_is_fenced_and_applies_nothing_twice() {
    let nodes = ["a", "b"];
    // A stopped process's walsender goes after wal_sender_timeout; its apply session after
    // walbridge's idle_session_timeout (claim::IDLE_LIMIT) or, inside a transaction, this.
    let d = Deployment::with_conf(
        &nodes,
        SCHEMA,
        TOML,
        &[
            "wal_sender_timeout = '5s'",
            "idle_in_transaction_session_timeout = '10s'",
        ],
    );
    d.walbridge_ok(&["setup"]);
    let mut one = spawn_instance(&d, "one", "one.log", None);
    assert!(
        wait_until(WAIT, || owners(&d)
            .values()
            .all(|o| o.as_deref() == Some("one"))),
        "{:?}",
        owners(&d)
    );
    let mut two = spawn_instance(&d, "two", "two.log", None);
    assert!(wait_until(WAIT, || two
        .log()
        .matches("standing by")
        .count()
        == 2));
    let mut writers = vec![
        ledger_writer(&d, "a", 1, 1500, "0.005", false),
        ledger_writer(&d, "b", 100_001, 1500, "0.005", false),
    ];
    assert!(wait_until(WAIT, || count(
        &d,
        "b",
        "SELECT count(*) FROM ledger"
    ) > 200));
    one.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    assert!(
        wait_until(Duration::from_secs(60), || owners(&d)
            .values()
            .all(|o| o.as_deref() == Some("two"))),
        "no takeover after SIGSTOP; owners {:?}\n{}",
        owners(&d),
        two.log()
    );
    // The old owner's sessions were ended by the servers, not by the new owner.
    assert_eq!(apply_pids(&d, "a", "one"), "");
    assert_eq!(apply_pids(&d, "b", "one"), "");
    d.sql("a", "INSERT INTO marks VALUES (1)");
    d.wait_for("b", "SELECT count(*) FROM marks", "1");
    eprintln!("takeover after SIGSTOP: {:?}", stopped.elapsed());
    one.signal(libc::SIGCONT);
    for w in &mut writers {
        assert!(w.wait().expect("writer").success());
    }
    for n in nodes {
        d.wait_for(n, "SELECT count(*) FROM ledger", "3000");
    }
    d.wait_caught_up();
    // The resumed instance stands by again; it owns nothing.
    assert!(
        wait_until(WAIT, || one.log().contains("standing by")),
        "{}",
        one.log()
    );
    assert!(owners(&d).values().all(|o| o.as_deref() == Some("two")));
    for n in nodes {
        assert_eq!(
            ledger_summary(&d, n),
            "3000 rows, 3000 distinct, sum 152251500",
            "on {n}"
        );
    }
    one.assert_running();
    two.assert_running();
}

#[test]
fn heavy_directions_spread_over_instances_within_60_s() {
    let nodes = ["a", "b", "c"];
    let d = Deployment::new(&nodes, SCHEMA, TOML);
    d.walbridge_ok(&["setup"]);
    let mut first = spawn_instance(&d, "i1", "i1.log", None);
    assert!(
        wait_until(WAIT, || owned_counts(&d).get("i1") == Some(&6)),
        "{:?}",
        owners(&d)
    );
    let mut writers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| ledger_writer(&d, n, 1 + i as i64 * 100_000, 2000, "0.01", false))
        .collect();
    let mut others = vec![
        spawn_instance(&d, "i2", "i2.log", None),
        spawn_instance(&d, "i3", "i3.log", None),
    ];
    let started = Instant::now();
    let spread = |d: &Deployment| {
        let c = owned_counts(d);
        c.values().sum::<usize>() == 6 && c.len() == 3 && c.values().all(|n| *n <= 2)
    };
    assert!(
        wait_until(Duration::from_secs(60), || spread(&d)),
        "not spread within 60 s: {:?}\n{}",
        owned_counts(&d),
        first.log()
    );
    eprintln!(
        "spread 6 directions over 3 instances in {:?}",
        started.elapsed()
    );
    assert!(
        first.log().contains("handing a direction over"),
        "{}",
        first.log()
    );
    assert!(
        first.log().contains("released direction"),
        "{}",
        first.log()
    );
    for w in &mut writers {
        assert!(w.wait().expect("writer").success());
    }
    for n in nodes {
        d.wait_for(n, "SELECT count(*) FROM ledger", "6000");
    }
    d.wait_caught_up();
    let want = ledger_summary(&d, "a");
    assert!(want.starts_with("6000 rows, 6000 distinct"), "{want}");
    for n in nodes {
        assert_eq!(ledger_summary(&d, n), want, "on {n}");
    }
    // Still spread once the moves are over (nobody took back more than its share).
    assert!(spread(&d), "{:?}", owned_counts(&d));
    first.assert_running();
    for r in &mut others {
        r.assert_running();
    }
}
