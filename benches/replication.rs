//! End-to-end replication benchmark, per PostgreSQL server version: walbridge (pgoutput, and
//! wal2json where it is installed) beside PostgreSQL's own logical replication, on the same
//! machine in the same run.
//!
//! ```text
//! cargo bench --bench replication -- [--quick] [--reps N] [--versions 15,16,17,18] [a b c d e f g]
//! ```
//!
//! Scenarios (all of them when no letter is given):
//!
//! (a) backlog drain: single-row INSERT transactions committed on A while replication is
//!     paused, then resumed: rows/s applied on B.
//! (b) one large transaction (1,000,000 rows) committed on A while replication runs: time from
//!     A's commit until the last row is visible on B, and walbridge's peak RSS.
//! (c) commit-to-visible latency at a steady 200 transactions/s, p50/p99, from an
//!     `ENABLE ALWAYS` trigger on B stamping arrival time against the commit time the apply
//!     preserves through its replication origin.
//! (d) pgbench, 4 clients, single-row transactions on A while replicating: the load's tps and
//!     how far B trails when the load ends.
//! (e) CPU per replicated row during (a)'s drain, from `/proc`: A's walsender, the walbridge
//!     process, B's applying backend (walbridge's apply session / the native apply worker),
//!     B's walsender (decoding what was applied on B, the echo), B's other processes
//!     (walwriter, checkpointer, exited backends...) and A's other processes.
//! (f) on PostgreSQL 16+: native bidirectional replication (a subscription each way with
//!     `origin = none`) as a second baseline in (a)–(e); given alone, `f` means every scenario.
//! (g) live bidirectional load: single-row inserts on both nodes at once (2 pgbench clients
//!     each), walbridge against native bidirectional (16+) and pglogical (where
//!     `postgresql-<major>-pglogical` is installed): the applications' load time, the catch-up
//!     after it, and total CPU (servers + walbridge) per replicated transaction.
//!
//! `--versions` picks the servers (default: every one installed among 15–18, found as the
//! tests find them through `WALBRIDGE_PG_MAJOR`); `--quick` divides the sizes by 10 and runs
//! once; otherwise the throughput scenarios (a, b, d, e, g) take the median of 5 runs (or
//! `--reps N`), interleaving the systems, and show min–max. Results are printed as a table per
//! version and written to `target/bench-replication.md` (markdown) and
//! `target/bench-replication.jsonl` (one JSON object per figure).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walbridge::localpg::procstat::{self, ServerCpu};
use walbridge::localpg::{self, ClusterOptions, LocalCluster};

const TABLE: &str =
    "CREATE TABLE public.bench (id bigint PRIMARY KEY, payload text NOT NULL, n int NOT NULL);
     CREATE SEQUENCE public.bench_seq;
     CREATE PROCEDURE public.bench_fill(count int) LANGUAGE plpgsql AS $$
     BEGIN
       FOR i IN 1..count LOOP
         INSERT INTO public.bench VALUES (nextval('public.bench_seq'), 'payload-0123456789-abcdefghij', 1);
         COMMIT;
       END LOOP;
     END $$;";

const INSERT_ONE: &str =
    "INSERT INTO bench VALUES (nextval('bench_seq'), 'payload-0123456789-abcdefghij', 1);\n";

/// One server version under test.
struct Version {
    major: u32,
    /// `postgres --version`'s number ("17.10").
    full: String,
    bin: PathBuf,
    wal2json: bool,
    pglogical: bool,
    /// Debian's `output_plugin_libraries` allow-list exists in this build.
    plugin_allowlist: bool,
}

impl Version {
    /// The installation `WALBRIDGE_PG_MAJOR=<major>` selects, or why there is none.
    fn find(major: u32) -> Result<Version, String> {
        // The harness picks binaries through this variable; the bench is single-threaded here.
        std::env::set_var("WALBRIDGE_PG_MAJOR", major.to_string());
        let bin = localpg::bin_dir().map_err(|e| e.to_string())?;
        let found = localpg::server_major(&bin).map_err(|e| e.to_string())?;
        if found != major {
            return Err(format!("{} holds PostgreSQL {found}", bin.display()));
        }
        let full = Command::new(bin.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| {
                // "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let plugin_allowlist = Command::new(bin.join("postgres"))
            .arg("--describe-config")
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.split('\t').next() == Some("output_plugin_libraries"))
            })
            .unwrap_or(false);
        Ok(Version {
            major,
            full,
            wal2json: has_library(&bin, "wal2json"),
            pglogical: has_library(&bin, "pglogical"),
            plugin_allowlist,
            bin,
        })
    }
}

/// Whether the server in `bin` can load `<name>.so` (Debian's `lib/`, or `lib/postgresql/`).
fn has_library(bin: &Path, name: &str) -> bool {
    let Ok(bin) = bin.canonicalize() else {
        return false;
    };
    let Some(root) = bin.parent() else {
        return false;
    };
    [
        root.join("lib").join(format!("{name}.so")),
        root.join("lib/postgresql").join(format!("{name}.so")),
    ]
    .iter()
    .any(|p| p.is_file())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Replicator {
    /// Publication on A, subscription on B.
    Native,
    /// A subscription each way with `origin = none` (16+).
    NativeBidi,
    /// pglogical, a subscription each way (`forward_origins = '{}'`).
    Pglogical,
    /// walbridge with this plugin (it always replicates both ways).
    Walbridge(&'static str),
}

impl Replicator {
    fn name(self) -> String {
        match self {
            Replicator::Native => "native".into(),
            Replicator::NativeBidi => "native bidirectional".into(),
            Replicator::Pglogical => "pglogical".into(),
            Replicator::Walbridge(p) => format!("walbridge/{p}"),
        }
    }
}

struct Pair {
    a: LocalCluster,
    b: LocalCluster,
    dir: PathBuf,
}

fn pair(v: &Version, r: Replicator) -> Pair {
    let mut conf = vec![
        "max_wal_size = 4GB".to_string(),
        "checkpoint_timeout = 30min".to_string(),
    ];
    if r == Replicator::Pglogical {
        conf.push("shared_preload_libraries = 'pglogical'".into());
        if v.plugin_allowlist {
            conf.push(
                "output_plugin_libraries = 'pgoutput, test_decoding, wal2json, pglogical_output'"
                    .into(),
            );
        }
    }
    let opts = ClusterOptions {
        conf,
        ..ClusterOptions::default()
    };
    let a = LocalCluster::start(&opts).expect("cluster a");
    let b = LocalCluster::start(&opts).expect("cluster b");
    sql(&a, TABLE);
    sql(&b, TABLE);
    let dir = a.base_dir().to_path_buf();
    Pair { a, b, dir }
}

fn sql(c: &LocalCluster, q: &str) -> String {
    c.psql("postgres", q).unwrap_or_else(|e| panic!("{e}\n{q}"))
}

fn conninfo(c: &LocalCluster) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        c.port()
    )
}

/// Prepares replication A→B (and B→A for the bidirectional systems), not running yet.
fn prepare(p: &Pair, r: Replicator) -> Option<PathBuf> {
    match r {
        Replicator::Native => {
            sql(&p.a, "CREATE PUBLICATION bench_pub FOR ALL TABLES");
            sql(
                &p.b,
                &format!(
                    "CREATE SUBSCRIPTION bench_sub CONNECTION '{}' PUBLICATION bench_pub \
                     WITH (copy_data = false, enabled = false)",
                    conninfo(&p.a)
                ),
            );
            None
        }
        Replicator::NativeBidi => {
            for (node, peer, name) in [(&p.b, &p.a, "b_from_a"), (&p.a, &p.b, "a_from_b")] {
                sql(peer, "CREATE PUBLICATION bench_pub FOR ALL TABLES");
                sql(
                    node,
                    &format!(
                        "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION bench_pub \
                         WITH (copy_data = false, enabled = false, origin = none)",
                        conninfo(peer)
                    ),
                );
            }
            None
        }
        Replicator::Pglogical => {
            for (c, name) in [(&p.a, "a"), (&p.b, "b")] {
                sql(c, "CREATE EXTENSION pglogical");
                sql(
                    c,
                    &format!(
                        "SELECT pglogical.create_node(node_name := '{name}', dsn := '{}')",
                        conninfo(c)
                    ),
                );
                sql(
                    c,
                    "SELECT pglogical.replication_set_add_table('default', 'public.bench')",
                );
            }
            None
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
            Some(config)
        }
    }
}

/// Starts replication; returns the walbridge child, if any.
fn resume(p: &Pair, r: Replicator, config: Option<&PathBuf>) -> Option<Child> {
    match r {
        Replicator::Native => {
            sql(&p.b, "ALTER SUBSCRIPTION bench_sub ENABLE");
            None
        }
        Replicator::NativeBidi => {
            sql(&p.b, "ALTER SUBSCRIPTION b_from_a ENABLE");
            sql(&p.a, "ALTER SUBSCRIPTION a_from_b ENABLE");
            None
        }
        Replicator::Pglogical => {
            for (node, peer, name) in [(&p.b, &p.a, "b_from_a"), (&p.a, &p.b, "a_from_b")] {
                sql(
                    node,
                    &format!(
                        "SELECT pglogical.create_subscription(subscription_name := '{name}', \
                         provider_dsn := '{}', replication_sets := ARRAY['default'], \
                         synchronize_structure := false, synchronize_data := false, \
                         forward_origins := '{{}}')",
                        conninfo(peer)
                    ),
                );
            }
            None
        }
        Replicator::Walbridge(_) => Some(
            Command::new(env!("CARGO_BIN_EXE_walbridge"))
                .args(["run", "--config"])
                .arg(config.expect("walbridge config"))
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

/// A psql session kept open for cheap repeated queries; its backend is `bench-poller` in
/// `pg_stat_activity` and left out of the CPU figures.
struct Poller {
    child: Child,
    reader: std::io::BufReader<std::process::ChildStdout>,
    backend: u32,
}

impl Poller {
    fn new(c: &LocalCluster) -> Self {
        let mut child = Command::new(c.client_tool("psql").expect("psql"))
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
            .env("PGAPPNAME", "bench-poller")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql");
        let reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut poller = Poller {
            child,
            reader,
            backend: 0,
        };
        poller.backend = poller.query("SELECT pg_backend_pid()").parse().unwrap_or(0);
        poller
    }

    fn query(&mut self, q: &str) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{q};\n\\echo __END__").expect("write");
        stdin.flush().expect("flush");
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line.trim() == "__END__" {
                break;
            }
            out.push_str(line.trim_end());
        }
        out
    }

    /// Polls `q` every `every` until it returns a non-empty result; that result.
    fn until_some(&mut self, q: &str, every: Duration, timeout: Duration) -> String {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let out = self.query(q);
            if !out.is_empty() {
                return out;
            }
            std::thread::sleep(every);
        }
        panic!("timed out after {timeout:?} waiting for `{q}`");
    }

    /// Waits until row `id` of `bench` exists; how long that took.
    fn wait_row(&mut self, table: &str, id: i64, timeout: Duration) -> Duration {
        let start = Instant::now();
        self.until_some(
            &format!("SELECT 1 FROM {table} WHERE id = {id}"),
            Duration::from_millis(2),
            timeout,
        );
        start.elapsed()
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

/// Where a server process's CPU goes in (e).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Role {
    Walsender,
    Apply,
    Poller,
    Other,
}

/// The role of every live backend of `c`, from `pg_stat_activity`.
fn roles(c: &LocalCluster) -> HashMap<u32, Role> {
    sql(
        c,
        "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, '') FROM pg_stat_activity",
    )
    .lines()
    .filter_map(|line| {
        let mut f = line.splitn(3, '|');
        let pid: u32 = f.next()?.parse().ok()?;
        let kind = f.next().unwrap_or("");
        let app = f.next().unwrap_or("");
        let role = if app == "bench-poller" {
            Role::Poller
        } else if kind == "walsender" {
            Role::Walsender
        } else if app.starts_with("walbridge-apply-")
            || (kind.starts_with("logical replication") && kind.ends_with("worker"))
            || kind.starts_with("pglogical apply")
        {
            Role::Apply
        } else {
            Role::Other
        };
        Some((pid, role))
    })
    .collect()
}

/// CPU seconds per role between two readings of one server (exited backends and the
/// postmaster count as `Other`).
fn cpu_by_role(
    before: &ServerCpu,
    after: &ServerCpu,
    roles: &HashMap<u32, Role>,
) -> HashMap<Role, f64> {
    let (per, rest) = before.delta(after);
    let mut out: HashMap<Role, f64> = HashMap::new();
    *out.entry(Role::Other).or_default() += rest;
    for (pid, cpu) in per {
        let role = roles.get(&pid).copied().unwrap_or(Role::Other);
        *out.entry(role).or_default() += cpu;
    }
    out.remove(&Role::Poller);
    out
}

/// The CPU-per-row components of (e), in the order printed.
const CPU_PARTS: [&str; 7] = [
    "A's walsender (decode + send)",
    "walbridge process",
    "B: applying backend / apply worker",
    "B's walsender (echo: decoding what was applied on B)",
    "B: other processes (walwriter, checkpointer, exited backends...)",
    "A: other processes",
    "total",
];

struct DrainRun {
    rows_per_s: f64,
    /// µs per replicated row, in `CPU_PARTS` order.
    cpu_us: [f64; 7],
}

/// (a) + (e): drains a backlog of `txns` single-row transactions.
fn drain(v: &Version, r: Replicator, txns: usize) -> DrainRun {
    let p = pair(v, r);
    let config = prepare(&p, r);
    sql(&p.a, &format!("CALL bench_fill({txns})"));
    sql(&p.a, "INSERT INTO bench VALUES (-1, 'marker', 0)");
    let mut poller = Poller::new(&p.b);
    let a0 = ServerCpu::read(p.a.data_dir());
    let b0 = ServerCpu::read(p.b.data_dir());
    let started = Instant::now();
    let child = resume(&p, r, config.as_ref());
    poller.wait_row("bench", -1, Duration::from_secs(900));
    let secs = started.elapsed().as_secs_f64();
    let a1 = ServerCpu::read(p.a.data_dir());
    let b1 = ServerCpu::read(p.b.data_dir());
    let own = child.as_ref().map_or(0.0, |c| {
        procstat::process_cpu_seconds(c.id()).unwrap_or(0.0)
    });
    let a = cpu_by_role(&a0, &a1, &roles(&p.a));
    let b = cpu_by_role(&b0, &b1, &roles(&p.b));
    let rows: f64 = sql(&p.b, "SELECT count(*) FROM bench")
        .parse()
        .unwrap_or(0.0);
    stop(child);
    drop(poller);
    let get = |m: &HashMap<Role, f64>, r: Role| m.get(&r).copied().unwrap_or(0.0);
    let parts = [
        get(&a, Role::Walsender),
        own,
        get(&b, Role::Apply),
        get(&b, Role::Walsender),
        get(&b, Role::Other),
        get(&a, Role::Apply) + get(&a, Role::Other),
    ];
    let total: f64 = parts.iter().sum();
    let per_row = |s: f64| s / rows.max(1.0) * 1e6;
    DrainRun {
        rows_per_s: rows / secs,
        cpu_us: [
            per_row(parts[0]),
            per_row(parts[1]),
            per_row(parts[2]),
            per_row(parts[3]),
            per_row(parts[4]),
            per_row(parts[5]),
            per_row(total),
        ],
    }
}

/// (b) one `rows`-row transaction committed on A while replicating: (seconds from A's commit
/// until it is visible on B, walbridge's peak RSS in MB, seconds A took to run it).
fn big_transaction(v: &Version, r: Replicator, rows: usize) -> (f64, f64, f64) {
    let p = pair(v, r);
    let config = prepare(&p, r);
    let child = resume(&p, r, config.as_ref());
    let mut poller = Poller::new(&p.b);
    sql(&p.a, "INSERT INTO bench VALUES (-2, 'warmup', 0)");
    poller.wait_row("bench", -2, Duration::from_secs(120));
    let (visible, insert_secs) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let t = Instant::now();
            sql(
                &p.a,
                &format!(
                    "INSERT INTO bench SELECT i, 'payload-0123456789-abcdefghij', 1 \
                       FROM generate_series(1, {rows}) i; \
                     INSERT INTO bench VALUES (-1, 'marker', 0)"
                ),
            );
            t.elapsed().as_secs_f64()
        });
        // Polls from before the commit, so the first sighting is within 5 ms of visibility.
        let visible = poller.until_some(
            "SELECT extract(epoch FROM clock_timestamp()) FROM bench WHERE id = -1",
            Duration::from_millis(5),
            Duration::from_secs(1800),
        );
        (visible, writer.join().expect("writer"))
    });
    let committed = sql(
        &p.a,
        "SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin)) FROM bench WHERE id = -1",
    );
    let rss = child
        .as_ref()
        .map_or(0.0, |c| procstat::peak_rss_kb(c.id()) as f64 / 1024.0);
    stop(child);
    let lag =
        visible.parse::<f64>().unwrap_or(f64::NAN) - committed.parse::<f64>().unwrap_or(f64::NAN);
    (lag, rss, insert_secs)
}

const LAT: &str = "CREATE TABLE public.lat (id bigint PRIMARY KEY, arrived timestamptz);";
const LAT_TRIGGER: &str = "
    CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.arrived := clock_timestamp(); RETURN NEW; END $$;
    CREATE TRIGGER stamp BEFORE INSERT ON lat FOR EACH ROW EXECUTE FUNCTION stamp();
    ALTER TABLE lat ENABLE ALWAYS TRIGGER stamp;";

/// (c) latency at a steady rate: (p50, p99) in ms.
fn latency(v: &Version, r: Replicator, rate: u32, seconds: u32) -> (f64, f64) {
    let p = pair(v, r);
    sql(&p.a, LAT);
    sql(&p.b, LAT);
    sql(&p.b, LAT_TRIGGER);
    let config = prepare(&p, r);
    let child = resume(&p, r, config.as_ref());
    let mut poller = Poller::new(&p.b);
    // Warm up: wait for the stream to be established.
    sql(&p.a, "INSERT INTO lat VALUES (0, NULL)");
    poller.wait_row("lat", 0, Duration::from_secs(120));
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
    let last: i64 = sql(&p.a, "SELECT max(id) FROM lat").parse().unwrap_or(0);
    poller.wait_row("lat", last, Duration::from_secs(120));
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

/// (d) a 4-client pgbench of `txns` single-row transactions on A while replicating: (seconds
/// B trails when the load ends, the load's tps).
fn trailing(v: &Version, r: Replicator, txns: usize) -> (f64, f64) {
    let p = pair(v, r);
    let config = prepare(&p, r);
    let child = resume(&p, r, config.as_ref());
    let mut poller = Poller::new(&p.b);
    sql(&p.a, "INSERT INTO bench VALUES (-2, 'warmup', 0)");
    poller.wait_row("bench", -2, Duration::from_secs(120));
    let started = Instant::now();
    let out = pgbench(
        &p.a,
        INSERT_ONE,
        &["-c", "4", "-j", "2", "-t", &(txns / 4).to_string()],
    );
    let load_secs = started.elapsed().as_secs_f64();
    sql(&p.a, "INSERT INTO bench VALUES (-1, 'marker', 0)");
    let trail = poller.wait_row("bench", -1, Duration::from_secs(900));
    stop(child);
    let tps = out
        .lines()
        .find(|l| l.starts_with("tps"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
        .unwrap_or(txns as f64 / load_secs);
    (trail.as_secs_f64(), tps)
}

struct LoadRun {
    /// Seconds until both nodes' applications finished their inserts.
    load_secs: f64,
    /// Seconds from then until each node has the other's rows.
    catchup_secs: f64,
    /// CPU seconds of the walbridge process.
    walbridge_cpu: f64,
    /// CPU seconds of both servers (every process, the applications' backends included).
    servers_cpu: f64,
    /// Total CPU µs per replicated transaction.
    us_per_txn: f64,
}

/// (g) `per_node` single-row inserts on each node at once, 2 clients each.
fn bidi_load(v: &Version, r: Replicator, per_node: usize) -> LoadRun {
    let p = pair(v, r);
    // Disjoint keys: odd on A, even on B.
    sql(&p.a, "ALTER SEQUENCE bench_seq INCREMENT 2 RESTART 1");
    sql(&p.b, "ALTER SEQUENCE bench_seq INCREMENT 2 RESTART 2");
    let config = prepare(&p, r);
    let child = resume(&p, r, config.as_ref());
    let mut poll_a = Poller::new(&p.a);
    let mut poll_b = Poller::new(&p.b);
    sql(&p.a, "INSERT INTO bench VALUES (-3, 'warmup', 0)");
    poll_b.wait_row("bench", -3, Duration::from_secs(120));
    sql(&p.b, "INSERT INTO bench VALUES (-4, 'warmup', 0)");
    poll_a.wait_row("bench", -4, Duration::from_secs(120));

    let a0 = ServerCpu::read(p.a.data_dir());
    let b0 = ServerCpu::read(p.b.data_dir());
    let own0 = child.as_ref().map_or(0.0, |c| {
        procstat::process_cpu_seconds(c.id()).unwrap_or(0.0)
    });
    let started = Instant::now();
    let per_client = (per_node / 2).to_string();
    let args = ["-c", "2", "-j", "2", "-t", per_client.as_str()];
    std::thread::scope(|s| {
        let on_a = s.spawn(|| pgbench(&p.a, INSERT_ONE, &args));
        pgbench(&p.b, INSERT_ONE, &args);
        on_a.join().expect("pgbench on a");
    });
    let load_secs = started.elapsed().as_secs_f64();
    sql(&p.a, "INSERT INTO bench VALUES (-1, 'marker', 0)");
    sql(&p.b, "INSERT INTO bench VALUES (-2, 'marker', 0)");
    poll_b.wait_row("bench", -1, Duration::from_secs(900));
    poll_a.wait_row("bench", -2, Duration::from_secs(900));
    let total_secs = started.elapsed().as_secs_f64();
    let a1 = ServerCpu::read(p.a.data_dir());
    let b1 = ServerCpu::read(p.b.data_dir());
    let own = child.as_ref().map_or(0.0, |c| {
        procstat::process_cpu_seconds(c.id()).unwrap_or(0.0)
    }) - own0;
    let servers: f64 = [(&a0, &a1, poll_a.backend), (&b0, &b1, poll_b.backend)]
        .into_iter()
        .map(|(before, after, poller)| {
            let (per, rest) = before.delta(after);
            rest + per
                .iter()
                .filter(|(pid, _)| **pid != poller)
                .map(|(_, cpu)| cpu)
                .sum::<f64>()
        })
        .sum();
    stop(child);
    let replicated = (2 * (per_node / 2 * 2)) as f64;
    LoadRun {
        load_secs,
        catchup_secs: total_secs - load_secs,
        walbridge_cpu: own,
        servers_cpu: servers,
        us_per_txn: (own + servers) / replicated * 1e6,
    }
}

/// Median and range of repeated measurements.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    runs: usize,
}

impl Stat {
    fn of(values: &[f64]) -> Stat {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            return Stat {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                runs: 0,
            };
        }
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
            runs: n,
        }
    }
}

/// Formats `x` with the precision its unit deserves.
fn fmt(x: f64, unit: &str) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    match unit {
        "rows/s" | "tps" | "MB" => format!("{x:.0}"),
        "ms" => format!("{x:.3}"),
        "µs" => format!("{x:.1}"),
        _ => format!("{x:.2}"),
    }
}

/// The figures of one version, printed and written as markdown and JSON lines.
struct Report {
    major: u32,
    rows: Vec<String>,
    cpu_table: String,
    notes: Vec<String>,
    json: Vec<String>,
}

impl Report {
    fn new(major: u32) -> Report {
        Report {
            major,
            rows: Vec::new(),
            cpu_table: String::new(),
            notes: Vec::new(),
            json: Vec::new(),
        }
    }

    /// One figure: `ratio` is against the scenario's baseline (native, or the bidirectional
    /// baseline in (g)).
    fn figure(
        &mut self,
        scenario: &str,
        system: &str,
        metric: &str,
        unit: &str,
        stat: Stat,
        ratio: Option<f64>,
    ) {
        let range = if stat.runs > 1 {
            format!("{}–{}", fmt(stat.min, unit), fmt(stat.max, unit))
        } else {
            String::new()
        };
        let ratio_text = ratio
            .filter(|r| r.is_finite())
            .map_or(String::new(), |r| format!("{r:.2}×"));
        let line = format!(
            "| {scenario} | {system} | {metric} | {} {unit} | {range} | {ratio_text} |",
            fmt(stat.median, unit)
        );
        println!(
            "    {system:<22} {metric:<28} {:>10} {unit:<6} {range:>22}  {ratio_text}",
            fmt(stat.median, unit)
        );
        self.rows.push(line);
        let num = |x: f64| {
            if x.is_finite() {
                serde_json::Value::from(x)
            } else {
                serde_json::Value::Null
            }
        };
        self.json.push(
            serde_json::json!({
                "version": self.major,
                "scenario": scenario,
                "system": system,
                "metric": metric,
                "unit": unit,
                "median": num(stat.median),
                "min": num(stat.min),
                "max": num(stat.max),
                "runs": stat.runs,
                "ratio": ratio.map(num),
            })
            .to_string(),
        );
    }

    fn note(&mut self, text: String) {
        println!("    {text}");
        self.notes.push(text);
    }

    fn markdown(&self, v: &Version) -> String {
        let mut md = format!("### PostgreSQL {}\n\n", v.full);
        if !self.rows.is_empty() {
            md.push_str("| scenario | system | figure | median | min–max | ratio |\n");
            md.push_str("|---|---|---|---|---|---|\n");
            for r in &self.rows {
                md.push_str(r);
                md.push('\n');
            }
            md.push('\n');
        }
        if !self.cpu_table.is_empty() {
            md.push_str(&self.cpu_table);
            md.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(md, "- {n}");
        }
        if !self.notes.is_empty() {
            md.push('\n');
        }
        md
    }
}

/// Runs `measure` `reps` times for each system, interleaved; the values per system. A run
/// that fails (a panic: a server or tool error) is reported and left out, so one broken system
/// does not lose the others' figures.
fn interleaved<T>(
    systems: &[Replicator],
    reps: usize,
    mut measure: impl FnMut(Replicator) -> T,
) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = systems.iter().map(|_| Vec::new()).collect();
    for rep in 0..reps {
        for (i, r) in systems.iter().enumerate() {
            eprintln!("      run {}/{reps}: {}", rep + 1, r.name());
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(*r))) {
                Ok(v) => out[i].push(v),
                Err(_) => eprintln!(
                    "      run {}/{reps}: {} FAILED (left out)",
                    rep + 1,
                    r.name()
                ),
            }
        }
    }
    out
}

struct Options {
    quick: bool,
    reps: usize,
    versions: Vec<u32>,
    scenarios: Vec<char>,
    native_bidi: bool,
}

fn parse_args() -> Options {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--bench"))
        .collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| {
                args.iter()
                    .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
            })
    };
    let reps = value("--reps")
        .and_then(|r| r.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 })
        .max(1);
    let versions: Vec<u32> = value("--versions")
        .map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![15, 16, 17, 18]);
    let flag_values: Vec<String> = ["--reps", "--versions"]
        .iter()
        .filter_map(|f| value(f))
        .collect();
    let letters: Vec<char> = args
        .iter()
        .filter(|a| !a.starts_with("--") && !flag_values.contains(a))
        .flat_map(|a| a.chars())
        .filter(|c| "abcdefg".contains(*c))
        .collect();
    let mut scenarios: Vec<char> = letters.iter().copied().filter(|c| *c != 'f').collect();
    let native_bidi = letters.is_empty() || letters.contains(&'f');
    if scenarios.is_empty() {
        scenarios = "abcdeg".chars().collect();
    }
    Options {
        quick,
        reps,
        versions,
        scenarios,
        native_bidi,
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn ratio(value: f64, baseline: f64) -> Option<f64> {
    (baseline.is_finite() && baseline != 0.0).then(|| value / baseline)
}

fn run_version(v: &Version, o: &Options) -> Report {
    let scale = if o.quick { 10 } else { 1 };
    let reps = o.reps;
    let want = |c: char| o.scenarios.contains(&c);
    let mut report = Report::new(v.major);
    let mut systems = vec![Replicator::Native];
    if v.major >= 16 && o.native_bidi {
        systems.push(Replicator::NativeBidi);
    }
    systems.push(Replicator::Walbridge("pgoutput"));
    if v.wal2json {
        systems.push(Replicator::Walbridge("wal2json"));
    } else {
        report.note(format!(
            "walbridge/wal2json skipped: wal2json is not installed for PostgreSQL {}",
            v.major
        ));
    }
    let names: Vec<String> = systems.iter().map(|r| r.name()).collect();

    if want('a') || want('e') {
        let n = 300_000 / scale;
        println!("(a) backlog drain of {n} single-row INSERT transactions, median of {reps}");
        let runs = interleaved(&systems, reps, |r| drain(v, r, n));
        let rates: Vec<Stat> = runs
            .iter()
            .map(|rs| Stat::of(&rs.iter().map(|d| d.rows_per_s).collect::<Vec<_>>()))
            .collect();
        if want('a') {
            for (i, s) in rates.iter().enumerate() {
                report.figure(
                    &format!("(a) drain {n} tx"),
                    &names[i],
                    "rows/s",
                    "rows/s",
                    *s,
                    (i > 0).then(|| ratio(s.median, rates[0].median)).flatten(),
                );
            }
        }
        if want('e') {
            println!("(e) CPU per replicated row during the drain (µs, median of {reps})");
            let mut t = format!(
                "CPU per replicated row in (a), µs (median of {reps}{}):\n\n| per replicated row |",
                if reps > 1 { ", min–max" } else { "" }
            );
            for name in &names {
                let _ = write!(t, " {name} |");
            }
            t.push_str("\n|---|");
            t.push_str(&"---|".repeat(names.len()));
            t.push('\n');
            for (k, part) in CPU_PARTS.iter().enumerate() {
                let _ = write!(t, "| {part} |");
                let mut line = format!("    {part:<66}");
                for (i, rs) in runs.iter().enumerate() {
                    let s = Stat::of(&rs.iter().map(|d| d.cpu_us[k]).collect::<Vec<_>>());
                    let cell = if s.runs > 1 {
                        format!(
                            "{} ({}–{})",
                            fmt(s.median, "µs"),
                            fmt(s.min, "µs"),
                            fmt(s.max, "µs")
                        )
                    } else {
                        fmt(s.median, "µs")
                    };
                    let _ = write!(t, " {cell} |");
                    let _ = write!(line, " {cell:>16}");
                    report.json.push(
                        serde_json::json!({
                            "version": v.major, "scenario": "(e) cpu per row", "system": names[i],
                            "metric": part, "unit": "µs", "median": s.median, "min": s.min,
                            "max": s.max, "runs": s.runs,
                        })
                        .to_string(),
                    );
                }
                println!("{line}");
                t.push('\n');
            }
            let _ = write!(t, "| drain rate |");
            for s in &rates {
                let _ = write!(t, " {} rows/s |", fmt(s.median, "rows/s"));
            }
            t.push('\n');
            report.cpu_table = t;
        }
    }

    if want('b') {
        let n = 1_000_000 / scale;
        println!("(b) one transaction of {n} rows committed while replicating, median of {reps}");
        let runs = interleaved(&systems, reps, |r| big_transaction(v, r, n));
        let lag: Vec<Stat> = runs
            .iter()
            .map(|rs| Stat::of(&rs.iter().map(|x| x.0).collect::<Vec<_>>()))
            .collect();
        for (i, s) in lag.iter().enumerate() {
            report.figure(
                &format!("(b) {n}-row transaction"),
                &names[i],
                "commit-to-visible",
                "s",
                *s,
                (i > 0).then(|| ratio(s.median, lag[0].median)).flatten(),
            );
            if matches!(systems[i], Replicator::Walbridge(_)) {
                let rss = Stat::of(&runs[i].iter().map(|x| x.1).collect::<Vec<_>>());
                report.figure(
                    &format!("(b) {n}-row transaction"),
                    &names[i],
                    "walbridge peak RSS",
                    "MB",
                    rss,
                    None,
                );
            }
        }
        let insert = Stat::of(&runs.iter().flatten().map(|x| x.2).collect::<Vec<_>>());
        report.note(format!(
            "(b): A itself takes {} s (median) to run the {n}-row INSERT; native subscriptions \
             use the server's default `streaming` ({})",
            fmt(insert.median, "s"),
            if v.major >= 18 { "parallel" } else { "off" }
        ));
    }

    if want('c') {
        let secs = if o.quick { 5 } else { 20 };
        println!("(c) commit-to-visible latency at 200 transactions/s for {secs} s");
        let mut base = (f64::NAN, f64::NAN);
        for (i, r) in systems.iter().enumerate() {
            let (p50, p99) = latency(v, *r, 200, secs);
            if i == 0 {
                base = (p50, p99);
            }
            let one = |x: f64| Stat {
                median: x,
                min: x,
                max: x,
                runs: 1,
            };
            let scenario = format!("(c) 200 tx/s for {secs} s");
            report.figure(
                &scenario,
                &names[i],
                "latency p50",
                "ms",
                one(p50),
                (i > 0).then(|| ratio(p50, base.0)).flatten(),
            );
            report.figure(
                &scenario,
                &names[i],
                "latency p99",
                "ms",
                one(p99),
                (i > 0).then(|| ratio(p99, base.1)).flatten(),
            );
        }
    }

    if want('d') {
        let n = 100_000 / scale;
        println!("(d) pgbench, 4 clients, {n} single-row transactions while replicating, median of {reps}");
        let runs = interleaved(&systems, reps, |r| trailing(v, r, n));
        let tps: Vec<Stat> = runs
            .iter()
            .map(|rs| Stat::of(&rs.iter().map(|x| x.1).collect::<Vec<_>>()))
            .collect();
        for (i, rs) in runs.iter().enumerate() {
            let scenario = format!("(d) pgbench {n} tx");
            report.figure(
                &scenario,
                &names[i],
                "load tps",
                "tps",
                tps[i],
                (i > 0)
                    .then(|| ratio(tps[i].median, tps[0].median))
                    .flatten(),
            );
            let trail = Stat::of(&rs.iter().map(|x| x.0).collect::<Vec<_>>());
            report.figure(
                &scenario,
                &names[i],
                "B trails the load's end by",
                "s",
                trail,
                None,
            );
        }
    }

    if want('g') {
        let n = 25_000 / scale;
        let mut load_systems = Vec::new();
        if v.major >= 16 {
            load_systems.push(Replicator::NativeBidi);
        }
        if v.pglogical {
            load_systems.push(Replicator::Pglogical);
        } else {
            report.note(format!(
                "(g): pglogical skipped: no pglogical.so beside the PostgreSQL {} server \
                 (Debian 12 packages it for its own 15 only: apt-get install postgresql-15-pglogical)",
                v.major
            ));
        }
        load_systems.push(Replicator::Walbridge("pgoutput"));
        println!(
            "(g) {n} single-row inserts on each node at once, 2 clients each, median of {reps}"
        );
        let runs = interleaved(&load_systems, reps, |r| bidi_load(v, r, n));
        let base_load = Stat::of(&runs[0].iter().map(|x| x.load_secs).collect::<Vec<_>>());
        let base_cpu = Stat::of(&runs[0].iter().map(|x| x.us_per_txn).collect::<Vec<_>>());
        let single = load_systems.len() == 1;
        for (i, rs) in runs.iter().enumerate() {
            let name = load_systems[i].name();
            let scenario = format!("(g) {n} + {n} inserts, both ways");
            let rel = |s: Stat, b: Stat| {
                (i > 0 && !single)
                    .then(|| ratio(s.median, b.median))
                    .flatten()
            };
            let load = Stat::of(&rs.iter().map(|x| x.load_secs).collect::<Vec<_>>());
            report.figure(
                &scenario,
                &name,
                "application load time",
                "s",
                load,
                rel(load, base_load),
            );
            let catchup = Stat::of(&rs.iter().map(|x| x.catchup_secs).collect::<Vec<_>>());
            report.figure(
                &scenario,
                &name,
                "catch-up after the load",
                "s",
                catchup,
                None,
            );
            let servers = Stat::of(&rs.iter().map(|x| x.servers_cpu).collect::<Vec<_>>());
            report.figure(&scenario, &name, "CPU in the servers", "s", servers, None);
            if matches!(load_systems[i], Replicator::Walbridge(_)) {
                let own = Stat::of(&rs.iter().map(|x| x.walbridge_cpu).collect::<Vec<_>>());
                report.figure(&scenario, &name, "CPU of walbridge", "s", own, None);
            }
            let per = Stat::of(&rs.iter().map(|x| x.us_per_txn).collect::<Vec<_>>());
            report.figure(
                &scenario,
                &name,
                "total CPU per replicated tx",
                "µs",
                per,
                rel(per, base_cpu),
            );
        }
        if single {
            report.note("(g): no baseline on this version (native bidirectional needs 16+, pglogical is not installed)".into());
        }
    }
    report
}

fn main() {
    let o = parse_args();
    let started = Instant::now();
    println!(
        "walbridge end-to-end benchmark{}: versions {:?}, scenarios {}, {} run(s) each (ratios are walbridge / baseline)\n",
        if o.quick { " (--quick: sizes / 10)" } else { "" },
        o.versions,
        o.scenarios.iter().collect::<String>(),
        o.reps
    );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = format!(
        "## Replication benchmark\n\n`cargo bench --bench replication --{}{}` on {cores} cores, \
         throwaway clusters with fsync off, median of {} run(s) with min–max; ratios are \
         walbridge / native (in (g): / the first system listed).\n\n",
        if o.quick { " --quick" } else { "" },
        if o.reps != if o.quick { 1 } else { 5 } {
            format!(" --reps {}", o.reps)
        } else {
            String::new()
        },
        o.reps
    );
    let mut json = Vec::new();
    let dir = target_dir();
    let _ = std::fs::create_dir_all(&dir);
    let md_path = dir.join("bench-replication.md");
    let json_path = dir.join("bench-replication.jsonl");
    // Written after every version, so an interrupted run keeps what it measured.
    let save = |md: &str, json: &[String]| {
        let mut jsonl = json.join("\n");
        jsonl.push('\n');
        if let Err(e) =
            std::fs::write(&md_path, md).and_then(|()| std::fs::write(&json_path, jsonl))
        {
            eprintln!("cannot write {}: {e}", md_path.display());
        }
    };
    for major in &o.versions {
        let v = match Version::find(*major) {
            Ok(v) => v,
            Err(why) => {
                println!("== PostgreSQL {major}: skipped: {why}\n");
                let _ = writeln!(md, "### PostgreSQL {major}\n\nskipped: {why}\n");
                save(&md, &json);
                continue;
            }
        };
        println!("== PostgreSQL {} ({})", v.full, v.bin.display());
        let t = Instant::now();
        let report = run_version(&v, &o);
        println!(
            "   PostgreSQL {} took {:.0} s\n",
            v.major,
            t.elapsed().as_secs_f64()
        );
        let section = report.markdown(&v);
        println!("{section}");
        md.push_str(&section);
        json.extend(report.json);
        save(&md, &json);
    }
    println!(
        "written: {} and {} ({:.0} s in all)",
        md_path.display(),
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
}
