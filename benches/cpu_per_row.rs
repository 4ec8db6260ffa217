//! CPU per replicated row during a backlog drain, per process: walbridge's own, A's walsender
//! (decode + send), B's applying backend(s) and, for walbridge, B's walsender serving the
//! reverse direction (on PostgreSQL 15 with pgoutput it decodes walbridge's own writes: echo).
//! PostgreSQL's own logical replication (publication/subscription A→B) runs beside it.
//!
//! `cargo bench --bench cpu_per_row [-- native pgoutput wal2json]`. Environment:
//! - `CPU_ROWS` (default 100000): single-row INSERT transactions queued on A while nothing
//!   replicates; then replication starts and the drain is timed until the last row is on B.
//! - `WALBRIDGE_WRAP`: a command line `walbridge run` is started under, e.g.
//!   `valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p`, for instruction counts that
//!   do not depend on what else the machine does (run twice, with `CPU_ROWS=0` and e.g.
//!   `CPU_ROWS=10000`, and divide the difference by 10000: instructions per row).
//! - `WALBRIDGE_PG_MAJOR` picks the server version as in the tests.
//!
//! CPU times come from `/proc/<pid>/stat` (utime + stime, 10 ms ticks) of each process at the
//! end of the drain; the walsenders and walbridge start with the drain, so their whole life is
//! counted. Prefer these counts to the drain rate on a shared machine.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walbridge::localpg::{process_cpu_seconds, wait_until, ClusterOptions, LocalCluster};

const TABLE: &str =
    "CREATE TABLE public.bench (id bigint PRIMARY KEY, payload text NOT NULL, n int NOT NULL);
     CREATE SEQUENCE public.bench_seq;";

const INSERT_ONE: &str =
    "INSERT INTO bench VALUES (nextval('bench_seq'), 'payload-0123456789-abcdefghij', 1);\n";

fn sql(c: &LocalCluster, q: &str) -> String {
    c.psql("postgres", q).unwrap_or_else(|e| panic!("{e}\n{q}"))
}

fn pids(c: &LocalCluster, q: &str) -> Vec<u32> {
    sql(c, q)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| process_cpu_seconds(*p)).sum()
}

fn walbridge_bin() -> PathBuf {
    std::env::var_os("WALBRIDGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_walbridge")))
}

struct Result {
    rows: f64,
    secs: f64,
    own: Option<f64>,
    walsender_a: f64,
    backend_b: f64,
    walsender_b: f64,
}

fn drain(what: &str, rows: usize) -> Result {
    let opts = ClusterOptions {
        conf: vec![
            "max_wal_size = 4GB".into(),
            "checkpoint_timeout = 30min".into(),
        ],
        ..ClusterOptions::default()
    };
    let a = LocalCluster::start(&opts).expect("cluster a");
    let b = LocalCluster::start(&opts).expect("cluster b");
    sql(&a, TABLE);
    sql(&b, TABLE);
    let config = a.base_dir().join("cpu.toml");
    if what == "native" {
        sql(&a, "CREATE PUBLICATION bench_pub FOR TABLE public.bench");
        sql(
            &b,
            &format!(
                "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} user=postgres \
                 dbname=postgres' PUBLICATION bench_pub WITH (copy_data = false, enabled = false)",
                a.port()
            ),
        );
    } else {
        std::fs::write(
            &config,
            format!(
                "[[nodes]]\nname = \"a\"\ndsn = \"{}\"\n[[nodes]]\nname = \"b\"\ndsn = \"{}\"\n\
                 [replication]\ntables = [\"public.bench\"]\nplugin = \"{what}\"\n\
                 [metrics]\nlisten = \"\"\n",
                a.dsn("postgres"),
                b.dsn("postgres")
            ),
        )
        .expect("config");
        let out = Command::new(walbridge_bin())
            .args(["setup", "--config"])
            .arg(&config)
            .output()
            .expect("walbridge setup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if rows >= 4 {
        let script = a.base_dir().join("insert.sql");
        std::fs::write(&script, INSERT_ONE).expect("script");
        let out = Command::new(a.client_tool("pgbench").expect("pgbench"))
            .args(["-n", "-h", "127.0.0.1", "-p", &a.port().to_string()])
            .args(["-U", "postgres", "-c", "4", "-j", "2", "-f"])
            .arg(&script)
            .args(["-t", &(rows / 4).to_string(), "postgres"])
            .output()
            .expect("pgbench");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    sql(&a, "INSERT INTO bench VALUES (-1, 'marker', 0)");
    let total: f64 = sql(&a, "SELECT count(*) FROM bench").parse().unwrap_or(0.0);

    let started = Instant::now();
    let mut child: Option<Child> = None;
    if what == "native" {
        sql(&b, "ALTER SUBSCRIPTION bench_sub ENABLE");
    } else {
        let wrap = std::env::var("WALBRIDGE_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = Command::new(w);
                c.args(words).arg(walbridge_bin());
                c
            }
            None => Command::new(walbridge_bin()),
        };
        child = Some(
            cmd.args(["run", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("walbridge run"),
        );
    }
    let slot = if what == "native" {
        "bench_sub"
    } else {
        "walbridge_a_to_b"
    };
    let apply = if what == "native" {
        "SELECT pid FROM pg_stat_activity WHERE backend_type LIKE 'logical replication%worker'"
    } else {
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'walbridge-apply-a-to-b%'"
    };
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    let mut seen_back = Vec::new();
    let mut cpu_a = 0.0;
    let mut cpu_b = 0.0;
    let mut cpu_back = 0.0;
    let done = wait_until(Duration::from_secs(900), || {
        // Keep every pid seen (and its last reading) in case a process restarts mid-drain.
        for (q, c, seen) in [
            (
                format!("SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"),
                &a,
                &mut seen_a,
            ),
            (apply.to_string(), &b, &mut seen_b),
            (
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'walbridge_b_to_a'"
                    .to_string(),
                &b,
                &mut seen_back,
            ),
        ] {
            for p in pids(c, &q) {
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
        }
        cpu_a = cpu_of(&seen_a);
        cpu_b = cpu_of(&seen_b);
        cpu_back = cpu_of(&seen_back);
        sql(&b, "SELECT EXISTS (SELECT 1 FROM bench WHERE id = -1)") == "t"
    });
    assert!(done, "the drain did not finish within 900 s");
    let secs = started.elapsed().as_secs_f64();
    // Final readings while everything still runs.
    cpu_a = cpu_a.max(cpu_of(&seen_a));
    cpu_b = cpu_b.max(cpu_of(&seen_b));
    cpu_back = cpu_back.max(cpu_of(&seen_back));
    let own = child.as_ref().and_then(|c| process_cpu_seconds(c.id()));
    if let Some(mut c) = child {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let _ = c.wait();
    }
    let applied: f64 = sql(&b, "SELECT count(*) FROM bench").parse().unwrap_or(0.0);
    assert_eq!(applied, total, "rows on B differ from rows on A");
    Result {
        rows: total,
        secs,
        own,
        walsender_a: cpu_a,
        backend_b: cpu_b,
        walsender_b: cpu_back,
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let which: Vec<&str> = if args.is_empty() {
        vec!["native", "pgoutput", "wal2json"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    let rows: usize = std::env::var("CPU_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let us = |s: f64, n: f64| s * 1e6 / n.max(1.0);
    println!(
        "| replicator | rows | drain rows/s | walbridge µs/row | A walsender µs/row | B apply µs/row | B walsender µs/row |"
    );
    println!("|---|---|---|---|---|---|---|");
    for what in which {
        let r = drain(what, rows);
        println!(
            "| {what} | {} | {:.0} | {} | {:.1} | {:.1} | {:.1} |",
            r.rows,
            r.rows / r.secs,
            r.own
                .map(|s| format!("{:.1} ({s:.2} s)", us(s, r.rows)))
                .unwrap_or_else(|| "—".into()),
            us(r.walsender_a, r.rows),
            us(r.backend_b, r.rows),
            us(r.walsender_b, r.rows),
        );
    }
}
