//! Randomized concurrent writes on a small key space on both nodes: after quiescence both
//! nodes are identical and every conflict was counted.

use rand::{Rng, SeedableRng};

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.kv (id int PRIMARY KEY, v text, n int);";

/// A psql script of `ops` random single-statement transactions on keys 1..=keys.
fn script(seed: u64, node: &str, ops: usize, keys: i32) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = String::from("\\set ON_ERROR_STOP off\n");
    for i in 0..ops {
        let k = rng.random_range(1..=keys);
        match rng.random_range(0..10) {
            0..=3 => s.push_str(&format!(
                "INSERT INTO kv VALUES ({k}, '{node}-{i}', {i}) ON CONFLICT (id) DO NOTHING;\n"
            )),
            4..=7 => s.push_str(&format!(
                "UPDATE kv SET v = '{node}-{i}', n = n + 1 WHERE id = {k};\n"
            )),
            _ => s.push_str(&format!("DELETE FROM kv WHERE id = {k};\n")),
        }
        if i % 20 == 0 {
            s.push_str("SELECT pg_sleep(0.002);\n");
        }
    }
    s
}

fn run_scripts(d: &Deployment, seed: u64, phase: u64) {
    let scripts: Vec<(String, String)> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let seed = seed * 100 + phase * 10 + i as u64;
            (node.to_string(), script(seed, node, 400, 12))
        })
        .collect();
    run_scripts_together(d, &scripts, &format!("{seed}-{phase}"));
}

fn conflicts_recorded(d: &Deployment) -> f64 {
    ["a", "b"]
        .iter()
        .map(|n| {
            d.sql(n, "SELECT count(*) FROM walbridge.conflicts")
                .parse::<f64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn heavy_random_concurrent_writes_converge_for_several_seeds() {
    let mut report = Vec::new();
    for seed in 1..=4u64 {
        let mut d = Deployment::new(
            &["a", "b"],
            SCHEMA,
            "tables = [\"public.kv\"]\npriority = [\"a\", \"b\"]",
        );
        let port = d.enable_metrics();
        d.walbridge_ok(&["setup"]);
        let mut counted = 0.0;

        // Phase 1: replication running while both write.
        let mut run = d.spawn_run(&format!("run-{seed}-1.log"));
        run_scripts(&d, seed, 1);
        d.wait_caught_up();
        counted += metric_sum(&scrape(port), "walbridge_conflicts_total", &[]);
        run.signal(libc::SIGTERM);
        assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());

        // Phase 2: both write while replication is paused, then it resumes.
        run_scripts(&d, seed, 2);
        let mut run = d.spawn_run(&format!("run-{seed}-2.log"));
        d.wait_caught_up();
        counted += metric_sum(&scrape(port), "walbridge_conflicts_total", &[]);
        run.signal(libc::SIGTERM);
        assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());

        let fa = d.fingerprint("a", "kv", "id");
        let fb = d.fingerprint("b", "kv", "id");
        assert_eq!(fa, fb, "seed {seed}: nodes differ");
        let recorded = conflicts_recorded(&d);
        assert_eq!(
            counted, recorded,
            "seed {seed}: every conflict is counted and recorded"
        );
        report.push(format!(
            "seed {seed}: {recorded} conflicts, {} rows",
            fa.split('|').next().unwrap_or("?")
        ));
    }
    eprintln!("randomized convergence: {}", report.join("; "));
}

#[test]
fn heavy_pgbench_on_both_nodes_updating_the_same_rows_converges() {
    let d = Deployment::new(
        &["a", "b"],
        "CREATE TABLE public.hot (id int PRIMARY KEY, n bigint NOT NULL, who text);
         INSERT INTO hot SELECT i, 0, 'init' FROM generate_series(1, 10) i;",
        "tables = [\"public.hot\"]",
    );
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");
    let mut benches = Vec::new();
    for node in ["a", "b"] {
        let path = d.dir.path().join(format!("{node}.pgbench"));
        std::fs::write(
            &path,
            format!("\\set id random(1, 10)\nUPDATE hot SET n = n + 1, who = '{node}' WHERE id = :id;\n"),
        )
        .unwrap();
        let c = d.node(node);
        benches.push(
            std::process::Command::new(c.client_tool("pgbench").expect("pgbench"))
                .args([
                    "-n",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &c.port().to_string(),
                    "-U",
                    "postgres",
                ])
                .args(["-c", "2", "-T", "20", "-f"])
                .arg(&path)
                .arg("postgres")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let mut tps = Vec::new();
    for b in benches {
        let out = b.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        tps.push(
            text.lines()
                .find(|l| l.starts_with("tps"))
                .unwrap_or("")
                .to_string(),
        );
    }
    d.wait_caught_up_within(std::time::Duration::from_secs(240));
    assert_eq!(
        d.fingerprint("a", "hot", "id"),
        d.fingerprint("b", "hot", "id")
    );
    run.assert_running();
    let conflicts: i64 = ["a", "b"]
        .iter()
        .map(|n| {
            d.sql(n, "SELECT count(*) FROM walbridge.conflicts")
                .parse::<i64>()
                .unwrap()
        })
        .sum();
    eprintln!("pgbench hot rows: {tps:?}; {conflicts} conflicts resolved; converged");
}
