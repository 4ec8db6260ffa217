//! End-to-end replication benchmark: walbridge (pgoutput and wal2json) against PostgreSQL's own
//! logical replication (publication/subscription, A→B), on the same machine in the same run.
//!
//! `cargo bench --bench replication` (add `-- a b c d` to pick scenarios, `--quick` for smaller
//! sizes). Every scenario starts fresh cluster pairs; figures are printed with the ratio
//! walbridge / native.
//!
//! (a) backlog drain: single-row INSERT transactions committed on A while replication is
//!     paused, then resumed: rows/s applied on B.
//! (b) one large transaction (1,000,000 rows by default): rows/s, and walbridge's peak RSS.
//! (c) commit-to-visible latency at a steady 200 transactions/s, p50/p99, from an
//!     `ENABLE ALWAYS` trigger on B stamping arrival time against the preserved commit time.
//! (d) pgbench with 4 clients, single-row transactions, while replicating: how far B trails
//!     when the load ends (seconds until caught up).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walbridge::localpg::{ClusterOptions, LocalCluster};

const TABLE: &str =
    "CREATE TABLE public.bench (id bigint PRIMARY KEY, payload text NOT NULL, n int NOT NULL);
                     CREATE SEQUENCE public.bench_seq;";

struct Pair {
    a: LocalCluster,
    b: LocalCluster,
    dir: PathBuf,
}

fn pair(extra_b: &str) -> Pair {
    let opts = ClusterOptions {
        conf: vec![
            "max_wal_size = 4GB".into(),
            "checkpoint_timeout = 30min".into(),
        ],
        ..ClusterOptions::default()
    };
    let a = LocalCluster::start(&opts).expect("cluster a");
    let b = LocalCluster::start(&opts).expect("cluster b");
    a.psql("postgres", TABLE).expect("schema a");
    b.psql("postgres", TABLE).expect("schema b");
    if !extra_b.is_empty() {
        b.psql("postgres", extra_b).expect("extra b");
    }
    let dir = a.base_dir().to_path_buf();
    Pair { a, b, dir }
}

fn sql(c: &LocalCluster, q: &str) -> String {
    c.psql("postgres", q).unwrap_or_else(|e| panic!("{e}\n{q}"))
}

enum Replicator {
    Native,
    Walbridge(&'static str),
}

impl Replicator {
    fn name(&self) -> String {
        match self {
            Replicator::Native => "native".into(),
            Replicator::Walbridge(p) => format!("walbridge/{p}"),
        }
    }
}

/// Prepares replication A→B (not running yet).
fn prepare(p: &Pair, r: &Replicator) -> PathBuf {
    match r {
        Replicator::Native => {
            sql(&p.a, "CREATE PUBLICATION bench_pub FOR ALL TABLES");
            sql(
                &p.b,
                &format!(
                    "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=postgres' \
                     PUBLICATION bench_pub WITH (copy_data = false, enabled = false)",
                    p.a.port()
                ),
            );
            PathBuf::new()
        }
        Replicator::Walbridge(plugin) => {
            let config = p.dir.join("bench.toml");
            std::fs::write(
                &config,
                format!(
                    "[[nodes]]\nname = \"a\"\ndsn = \"{}\"\n[[nodes]]\nname = \"b\"\ndsn = \"{}\"\n\
                     [replication]\ntables = [\"public.bench\", \"public.lat\"]\nplugin = \"{plugin}\"\n[metrics]\nlisten = \"\"\n",
                    p.a.dsn("postgres"),
                    p.b.dsn("postgres")
                ),
            )
            .expect("config");
            let out = Command::new(env!("CARGO_BIN_EXE_walbridge"))
                .args(["setup", "--config"])
                .arg(&config)
                .output()
                .expect("walbridge setup");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            config
        }
    }
}

/// Starts replication; returns the walbridge child, if any.
fn resume(p: &Pair, r: &Replicator, config: &PathBuf) -> Option<Child> {
    match r {
        Replicator::Native => {
            sql(&p.b, "ALTER SUBSCRIPTION bench_sub ENABLE");
            None
        }
        Replicator::Walbridge(_) => Some(
            Command::new(env!("CARGO_BIN_EXE_walbridge"))
                .args(["run", "--config"])
                .arg(config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("walbridge run"),
        ),
    }
}

fn stop(child: Option<Child>) {
    if let Some(mut c) = child {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let _ = c.wait();
    }
}

/// Waits until `q` returns "t" on `c`, polling every 2 ms; the time it took.
fn wait_true(c: &LocalCluster, q: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut client = Poller::new(c);
    while start.elapsed() < timeout {
        if client.query(q) == "t" {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("timed out waiting for `{q}`");
}

/// A psql session kept open for cheap repeated queries.
struct Poller {
    child: Child,
}

impl Poller {
    fn new(c: &LocalCluster) -> Self {
        let child = Command::new(c.client_tool("psql").expect("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &c.port().to_string(),
                "-U",
                "postgres",
                "postgres",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql");
        Poller { child }
    }

    fn query(&mut self, q: &str) -> String {
        use std::io::{BufRead, BufReader, Write};
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{q};\n\\echo __END__").expect("write");
        stdin.flush().expect("flush");
        let stdout = self.child.stdout.as_mut().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line.trim() == "__END__" {
                break;
            }
            out.push_str(line.trim_end());
        }
        out
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbench(c: &LocalCluster, script: &str, args: &[&str]) -> String {
    let path = c
        .base_dir()
        .join(format!("bench-{}.sql", rand::random::<u32>()));
    std::fs::write(&path, script).expect("script");
    let out = Command::new(c.client_tool("pgbench").expect("pgbench"))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &c.port().to_string(),
            "-U",
            "postgres",
            "-f",
        ])
        .arg(&path)
        .args(args)
        .arg("postgres")
        .output()
        .expect("pgbench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const INSERT_ONE: &str =
    "INSERT INTO bench VALUES (nextval('bench_seq'), 'payload-0123456789-abcdefghij', 1);\n";

/// (a) backlog drain: rows/s.
fn backlog_drain(r: &Replicator, txns: usize) -> f64 {
    let p = pair("");
    let config = prepare(&p, r);
    pgbench(
        &p.a,
        INSERT_ONE,
        &["-c", "4", "-j", "2", "-t", &(txns / 4).to_string()],
    );
    sql(&p.a, "INSERT INTO bench VALUES (-1, 'marker', 0)");
    let started = Instant::now();
    let child = resume(&p, r, &config);
    wait_true(
        &p.b,
        "SELECT EXISTS (SELECT 1 FROM bench WHERE id = -1)",
        Duration::from_secs(600),
    );
    let secs = started.elapsed().as_secs_f64();
    let rows: f64 = sql(&p.b, "SELECT count(*) FROM bench")
        .parse()
        .unwrap_or(0.0);
    stop(child);
    rows / secs
}

/// Peak resident memory of a process (VmHWM), in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// (b) one big transaction: rows/s and walbridge's peak RSS (MB).
fn big_transaction(r: &Replicator, rows: usize) -> (f64, f64) {
    let p = pair("");
    let config = prepare(&p, r);
    sql(
        &p.a,
        &format!("INSERT INTO bench SELECT i, 'payload-0123456789-abcdefghij', 1 FROM generate_series(1, {rows}) i"),
    );
    sql(&p.a, "INSERT INTO bench VALUES (-1, 'marker', 0)");
    let started = Instant::now();
    let child = resume(&p, r, &config);
    wait_true(
        &p.b,
        "SELECT EXISTS (SELECT 1 FROM bench WHERE id = -1)",
        Duration::from_secs(900),
    );
    let secs = started.elapsed().as_secs_f64();
    let rss = child.as_ref().map_or(0.0, |c| peak_rss_mb(c.id()));
    stop(child);
    (rows as f64 / secs, rss)
}

const LAT: &str = "CREATE TABLE public.lat (id bigint PRIMARY KEY, arrived timestamptz);";
const LAT_TRIGGER: &str = "
    CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.arrived := clock_timestamp(); RETURN NEW; END $$;
    CREATE TRIGGER stamp BEFORE INSERT ON lat FOR EACH ROW EXECUTE FUNCTION stamp();
    ALTER TABLE lat ENABLE ALWAYS TRIGGER stamp;";

/// (c) latency at a steady rate: (p50, p99) in ms.
fn latency(r: &Replicator, rate: u32, seconds: u32) -> (f64, f64) {
    let p = pair("");
    sql(&p.a, LAT);
    sql(&p.b, LAT);
    sql(&p.b, LAT_TRIGGER);
    let config = prepare(&p, r);
    let child = resume(&p, r, &config);
    // Warm up: wait for the stream to be established.
    sql(&p.a, "INSERT INTO lat VALUES (0, NULL)");
    wait_true(
        &p.b,
        "SELECT EXISTS (SELECT 1 FROM lat WHERE id = 0)",
        Duration::from_secs(60),
    );
    pgbench(
        &p.a,
        "INSERT INTO lat VALUES (nextval('bench_seq'), NULL);\n",
        &[
            "-c",
            "1",
            "-R",
            &rate.to_string(),
            "-T",
            &seconds.to_string(),
        ],
    );
    let last = sql(&p.a, "SELECT max(id) FROM lat");
    wait_true(
        &p.b,
        &format!("SELECT EXISTS (SELECT 1 FROM lat WHERE id = {last})"),
        Duration::from_secs(60),
    );
    let out = sql(
        &p.b,
        "SELECT round((percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::numeric, 3) || ' ' || \
                round((percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::numeric, 3) \
           FROM (SELECT extract(epoch FROM arrived - pg_xact_commit_timestamp(xmin)) * 1000 AS ms \
                   FROM lat WHERE id > 0) s",
    );
    stop(child);
    let mut it = out
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    (it.next().unwrap_or(f64::NAN), it.next().unwrap_or(f64::NAN))
}

/// (d) seconds B trails when a 4-client pgbench of `txns` single-row transactions ends.
fn trailing(r: &Replicator, txns: usize) -> (f64, f64) {
    let p = pair("");
    let config = prepare(&p, r);
    let child = resume(&p, r, &config);
    sql(&p.a, "INSERT INTO bench VALUES (-2, 'warmup', 0)");
    wait_true(
        &p.b,
        "SELECT EXISTS (SELECT 1 FROM bench WHERE id = -2)",
        Duration::from_secs(60),
    );
    let started = Instant::now();
    let out = pgbench(
        &p.a,
        INSERT_ONE,
        &["-c", "4", "-j", "2", "-t", &(txns / 4).to_string()],
    );
    let load_secs = started.elapsed().as_secs_f64();
    sql(&p.a, "INSERT INTO bench VALUES (-1, 'marker', 0)");
    let trail = wait_true(
        &p.b,
        "SELECT EXISTS (SELECT 1 FROM bench WHERE id = -1)",
        Duration::from_secs(600),
    );
    stop(child);
    let tps = out
        .lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
        .unwrap_or(txns as f64 / load_secs);
    (trail.as_secs_f64(), tps)
}

/// Runs `measure` (rows/s, peak RSS in MB) `reps` times per replicator, interleaved, and
/// prints each median with its range and its ratio to native's.
fn report_rates(
    replicators: &[Replicator],
    reps: usize,
    measure: impl Fn(&Replicator) -> (f64, f64),
) {
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); replicators.len()];
    let mut rss: Vec<f64> = vec![0.0; replicators.len()];
    for _ in 0..reps {
        for (i, r) in replicators.iter().enumerate() {
            let (v, m) = measure(r);
            runs[i].push(v);
            rss[i] = rss[i].max(m);
        }
    }
    let mut native = f64::NAN;
    for (i, r) in replicators.iter().enumerate() {
        let v = &mut runs[i];
        v.sort_by(|a, b| a.total_cmp(b));
        let median = v[v.len() / 2];
        let range = format!("[{:.0} .. {:.0}]", v[0], v[v.len() - 1]);
        if i == 0 {
            native = median;
            println!("    {:<20} {median:>10.0} rows/s  {range}", r.name());
        } else {
            let memory = if rss[i] > 0.0 {
                format!("   peak RSS {:.0} MB", rss[i])
            } else {
                String::new()
            };
            println!(
                "    {:<20} {median:>10.0} rows/s  {range}   ratio {:.2}{memory}",
                r.name(),
                median / native
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--bench"))
        .collect();
    let quick = args.iter().any(|a| a == "--quick");
    let wanted = |s: &str| {
        let picked: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
        picked.is_empty() || picked.iter().any(|a| *a == s)
    };
    let scale = if quick { 10 } else { 1 };
    let replicators = [
        Replicator::Native,
        Replicator::Walbridge("pgoutput"),
        Replicator::Walbridge("wal2json"),
    ];
    println!("walbridge end-to-end benchmark (ratios are walbridge / native)\n");
    // The machine is shared and noisy: repeat the throughput scenarios, interleaving the
    // replicators, and report medians with the range.
    let reps = if quick { 1 } else { 3 };
    if wanted("a") {
        let n = 100_000 / scale;
        println!("(a) backlog drain of {n} single-row INSERT transactions, median of {reps}");
        report_rates(&replicators, reps, |r| (backlog_drain(r, n), 0.0));
    }
    if wanted("b") {
        let n = 1_000_000 / scale;
        println!("(b) one transaction of {n} rows, median of {reps}");
        report_rates(&replicators, reps, |r| big_transaction(r, n));
    }
    if wanted("c") {
        let secs = if quick { 5 } else { 15 };
        println!("(c) commit-to-visible latency at 200 transactions/s for {secs} s");
        let (n50, n99) = latency(&replicators[0], 200, secs);
        println!(
            "    {:<20} p50 {:>7.3} ms  p99 {:>7.3} ms",
            "native", n50, n99
        );
        for r in &replicators[1..] {
            let (p50, p99) = latency(r, 200, secs);
            println!(
                "    {:<20} p50 {:>7.3} ms  p99 {:>7.3} ms   ratio p50 {:.2} p99 {:.2}",
                r.name(),
                p50,
                p99,
                p50 / n50,
                p99 / n99
            );
        }
    }
    if wanted("d") {
        let n = 100_000 / scale;
        println!("(d) pgbench, 4 clients, {n} single-row transactions while replicating");
        let (native, tps) = trailing(&replicators[0], n);
        println!(
            "    {:<20} trails {:>6.2} s after the load ends (load {:.0} tps)",
            "native", native, tps
        );
        for r in &replicators[1..] {
            let (v, tps) = trailing(r, n);
            println!(
                "    {:<20} trails {:>6.2} s after the load ends (load {:.0} tps)   ratio {:.2}",
                r.name(),
                v,
                tps,
                if native > 0.0 { v / native } else { f64::NAN }
            );
        }
    }
}
