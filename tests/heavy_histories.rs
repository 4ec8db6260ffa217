//! Randomized concurrent histories with the real binary (issue 18's shape): every node writes
//! random statements on 10 hot keys at the same time (40 % upsert, 40 % update, 20 % delete,
//! small random pauses), in two phases with `walbridge run` killed with SIGKILL between them;
//! once replication is idle every node must hold the same rows.
//!
//! The seed fixes the statements, not the timing. A failure prints the seed and the rows that
//! differ; `WALBRIDGE_SEED=N` runs that seed again, `WALBRIDGE_SEEDS=N` runs seeds 1..=N (the
//! long run by hand; CI runs seeds 1..=3 per shape).

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.kv (id int PRIMARY KEY, v text, n int);";
const KEYS: i32 = 10;
const STATEMENTS_PER_PHASE: usize = 50;

/// The seeds to run: `WALBRIDGE_SEED`, else 1..=`WALBRIDGE_SEEDS` (default 3).
fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("WALBRIDGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let n = std::env::var("WALBRIDGE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3u64);
    (1..=n).collect()
}

/// One node's psql script for one phase.
fn script(seed: u64, node: &str, phase: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1_000 + phase * 100 + node_salt(node));
    let mut s = String::from("\\set ON_ERROR_STOP off\n");
    for i in 0..STATEMENTS_PER_PHASE {
        let k = rng.random_range(1..=KEYS);
        let v = format!("{node}{phase}-{i}");
        match rng.random_range(0..10) {
            0..=3 => s.push_str(&format!(
                "INSERT INTO kv VALUES ({k}, '{v}', 1) \
                 ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, n = kv.n + 1;\n"
            )),
            4..=7 => s.push_str(&format!(
                "UPDATE kv SET v = '{v}u', n = n + 1 WHERE id = {k};\n"
            )),
            _ => s.push_str(&format!("DELETE FROM kv WHERE id = {k};\n")),
        }
        if rng.random_range(0..4) == 0 {
            s.push_str(&format!(
                "SELECT pg_sleep({});\n",
                rng.random_range(1..=8) as f64 / 1_000.0
            ));
        }
    }
    s
}

fn node_salt(node: &str) -> u64 {
    node.bytes().map(u64::from).sum()
}

/// Runs every node's script for `phase` at the same time.
fn write_everywhere(d: &Deployment, seed: u64, phase: u64) {
    let scripts: Vec<(String, String)> = d
        .names
        .iter()
        .map(|node| (node.clone(), script(seed, node, phase)))
        .collect();
    run_scripts_together(d, &scripts, &format!("{seed}-{phase}"));
}

/// Waits until every node's changes so far have been taken by walbridge: stream nodes' slots
/// confirmed past the node's WAL position at the call, trigger nodes' change tables empty.
/// Twice, to cover what the first round caused on the peers. False on timeout.
fn wait_idle(d: &Deployment) -> bool {
    for _round in 0..2 {
        for n in &d.names {
            let c = d.node(n);
            let q = |sql: &str| c.psql("postgres", sql).unwrap_or_default();
            let lsn = q("SELECT pg_current_wal_lsn()");
            // A name in a CASE branch is resolved even when the branch is not taken: ask
            // whether the change table exists first.
            let queue = if q("SELECT to_regclass('public.database_changes') IS NOT NULL") == "t" {
                "NOT EXISTS (SELECT 1 FROM public.database_changes)"
            } else {
                "true"
            };
            let sql = format!(
                "SELECT coalesce((SELECT bool_and(confirmed_flush_lsn >= '{lsn}') \
                 FROM pg_replication_slots WHERE slot_name LIKE 'walbridge\\_%'), true) \
                 AND {queue}"
            );
            if !wait_until(Duration::from_secs(120), || q(&sql) == "t") {
                eprintln!(
                    "{n} not idle past {lsn}: slots {}; change table empty: {}",
                    q(
                        "SELECT string_agg(format('%s active=%s confirmed=%s', slot_name, active, \
                       confirmed_flush_lsn), '; ') FROM pg_replication_slots"
                    ),
                    q(&format!("SELECT {queue}"))
                );
                return false;
            }
        }
    }
    true
}

fn rows(d: &Deployment, node: &str) -> Vec<String> {
    d.sql(
        node,
        "SELECT coalesce(string_agg(format('%s|%s|%s', id, v, n), E'\\n' ORDER BY id), '') FROM kv",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Waits until replication is idle and every node holds the same rows; else panics with the
/// seed and the differing rows.
fn assert_converged(d: &Deployment, seed: u64, shape: &str) {
    let idle_ok = wait_idle(d);
    let mut prints = Vec::new();
    let same = wait_until(Duration::from_secs(30), || {
        prints = d
            .names
            .iter()
            .map(|n| d.fingerprint(n, "kv", "id"))
            .collect();
        prints.iter().all(|p| *p == prints[0])
    });
    if same {
        return;
    }
    let all: Vec<(String, Vec<String>)> = d.names.iter().map(|n| (n.clone(), rows(d, n))).collect();
    let mut ids: Vec<i32> = Vec::new();
    for (_, r) in &all {
        for line in r {
            if let Some(id) = line.split('|').next().and_then(|s| s.parse().ok()) {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let mut diff = String::new();
    for id in ids {
        let per_node: Vec<String> = all
            .iter()
            .map(|(n, r)| {
                let row = r
                    .iter()
                    .find(|l| l.split('|').next() == Some(id.to_string().as_str()))
                    .cloned()
                    .unwrap_or_else(|| "(absent)".into());
                format!("{n}: {row}")
            })
            .collect();
        if per_node
            .iter()
            .map(|s| s.split_once(": ").map(|x| x.1))
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1
        {
            diff.push_str(&format!("  id {id}: {}\n", per_node.join("; ")));
        }
    }
    panic!(
        "{shape}, seed {seed} (replay: WALBRIDGE_SEED={seed}): nodes differ \
         (replication idle: {idle_ok}); fingerprints {prints:?}\n{diff}"
    );
}

/// One history: setup, phase 1 with replication running, SIGKILL, phase 2 with a new `run`,
/// then the comparison.
fn history(seed: u64, shape: &str, names: &[&str], toml: &str, conf: &[&[&str]]) {
    let started = std::time::Instant::now();
    let d = Deployment::with_node_conf(names, SCHEMA, toml, conf);
    d.walbridge_ok(&["setup"]);
    let ready = started.elapsed();
    let mut run = d.spawn_run(&format!("run-{seed}-1.log"));
    write_everywhere(&d, seed, 1);
    // Killed once it is applying (a replicated row version on the first node), so the kill
    // lands in the first phase's backlog.
    let first = d.names[0].clone();
    wait_until(WAIT, || {
        d.node(&first)
            .psql(
                "postgres",
                "SELECT EXISTS (SELECT 1 FROM kv, \
                 pg_catalog.pg_xact_commit_timestamp_origin(kv.xmin) o WHERE o.roident <> 0)",
            )
            .is_ok_and(|v| v == "t")
    });
    run.signal(libc::SIGKILL);
    run.wait_exit(WAIT);
    let _run = d.spawn_run(&format!("run-{seed}-2.log"));
    write_everywhere(&d, seed, 2);
    let written = started.elapsed();
    assert_converged(&d, seed, shape);
    eprintln!(
        "{shape}, seed {seed}: converged (clusters ready {ready:.1?}, written {written:.1?}, \
         converged {:.1?})",
        started.elapsed()
    );
}

/// Runs every seed (a divergent one does not stop the others) and fails naming the divergent
/// seeds.
fn each_seed(shape: &str, names: &[&str], toml: &str, conf: &[&[&str]]) {
    let seeds = seeds();
    let mut failed = Vec::new();
    for &seed in &seeds {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            history(seed, shape, names, toml, conf)
        }));
        if run.is_err() {
            failed.push(seed);
        }
    }
    eprintln!(
        "{shape}: {} of {} seed(s) converged; divergent seeds: {failed:?}",
        seeds.len() - failed.len(),
        seeds.len()
    );
    assert!(
        failed.is_empty(),
        "{shape}: seeds {failed:?} diverged (details above)"
    );
}

#[test]
fn heavy_random_histories_converge_on_three_nodes() {
    each_seed(
        "3 nodes, last_write_wins",
        &["a", "b", "c"],
        "tables = [\"public.kv\"]\nconflict = \"last_write_wins\"",
        &[],
    );
}

#[test]
fn heavy_random_histories_converge_on_five_nodes() {
    each_seed(
        "5 nodes, last_write_wins",
        &["a", "b", "c", "d", "e"],
        "tables = [\"public.kv\"]\nconflict = \"last_write_wins\"",
        &[],
    );
}

#[test]
fn heavy_random_histories_converge_on_a_mixed_stream_trigger_mesh() {
    each_seed(
        "mixed mesh (c in trigger mode), last_write_wins",
        &["a", "b", "c"],
        "tables = [\"public.kv\"]\nmode = \"auto\"\nconflict = \"last_write_wins\"",
        &[&[], &[], &["wal_level = replica"]],
    );
}

#[test]
#[ignore = "node_priority does not converge in every history yet (issue 18; README Limits): \
            run by hand with --ignored"]
fn heavy_random_histories_converge_under_node_priority() {
    each_seed(
        "3 nodes, node_priority",
        &["a", "b", "c"],
        "tables = [\"public.kv\"]\nconflict = \"node_priority\"\npriority = [\"c\", \"a\", \"b\"]",
        &[],
    );
}
