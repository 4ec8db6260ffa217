//! Shared test harness: throwaway clusters (from `walbridge::localpg`), the real binary as a
//! child process, and condition polling instead of sleeps.

#![allow(dead_code, unused_imports)]

use std::time::Duration;

pub use walbridge::localpg::{wait_until, ClusterOptions, LocalCluster, StopMode};

pub mod proxy;
pub use proxy::FaultProxy;

pub mod db;
pub use db::{sharing_enabled, TestDb};

pub mod apply;
pub use apply::start_applier;

/// How long a test waits for replication or a server to reach a state before failing.
pub const WAIT: Duration = Duration::from_secs(60);

/// Starts a cluster with the defaults every test wants (logical WAL, commit timestamps).
pub fn cluster() -> LocalCluster {
    LocalCluster::start(&ClusterOptions::default()).expect("start a local PostgreSQL cluster")
}

/// Starts a cluster with extra `postgresql.conf` lines.
pub fn cluster_with(conf: &[&str]) -> LocalCluster {
    LocalCluster::start(&ClusterOptions {
        conf: conf.iter().map(|s| s.to_string()).collect(),
        ..ClusterOptions::default()
    })
    .expect("start a local PostgreSQL cluster")
}

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The `walbridge` binary under test: `WALBRIDGE_BIN` when set (a long run by hand pinned to
/// one build while the tree is rebuilt), else the one cargo built with the tests.
pub fn walbridge_bin() -> String {
    std::env::var("WALBRIDGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_walbridge").to_string())
}

/// A set of nodes (one cluster each) with a walbridge configuration file for them.
pub struct Deployment {
    /// Node names, in configuration order.
    pub names: Vec<String>,
    /// The clusters, same order.
    pub clusters: Vec<LocalCluster>,
    /// Holds the config file and logs.
    pub dir: tempfile::TempDir,
    /// The configuration file.
    pub config: PathBuf,
    extra_toml: String,
    metrics_listen: Option<String>,
    /// Fault proxies by node name: walbridge reaches those nodes through them.
    proxies: Vec<(String, FaultProxy)>,
}

impl Deployment {
    /// Starts one cluster per name, runs `schema` on each (database `postgres`), and writes a
    /// configuration with `extra_toml` appended under `[replication]` defaults.
    pub fn new(names: &[&str], schema: &str, replication_toml: &str) -> Self {
        Self::with_conf(names, schema, replication_toml, &[])
    }

    /// As [`Deployment::new`] with extra `postgresql.conf` lines for every cluster.
    pub fn with_conf(names: &[&str], schema: &str, replication_toml: &str, conf: &[&str]) -> Self {
        let per_node: Vec<&[&str]> = names.iter().map(|_| conf).collect();
        Self::with_node_conf(names, schema, replication_toml, &per_node)
    }

    /// As [`Deployment::new`] with extra `postgresql.conf` lines per cluster (same order as
    /// `names`).
    pub fn with_node_conf(
        names: &[&str],
        schema: &str,
        replication_toml: &str,
        conf: &[&[&str]],
    ) -> Self {
        let clusters: Vec<LocalCluster> = names
            .iter()
            .enumerate()
            .map(|(i, _)| cluster_with(conf.get(i).copied().unwrap_or(&[])))
            .collect();
        Self::from_clusters(names, schema, replication_toml, clusters)
    }

    /// As [`Deployment::new`] over clusters already started (same order as `names`): a
    /// server with extra environment, say.
    pub fn from_clusters(
        names: &[&str],
        schema: &str,
        replication_toml: &str,
        clusters: Vec<LocalCluster>,
    ) -> Self {
        for c in &clusters {
            if !schema.is_empty() {
                c.psql("postgres", schema).expect("create the test schema");
            }
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("walbridge.toml");
        let d = Deployment {
            names: names.iter().map(|s| s.to_string()).collect(),
            clusters,
            dir,
            config,
            extra_toml: replication_toml.to_string(),
            metrics_listen: None,
            proxies: Vec::new(),
        };
        d.write_config();
        d
    }

    /// Rewrites the configuration file (after changing `extra_toml`).
    pub fn write_config(&self) {
        let mut toml = String::new();
        for (name, c) in self.names.iter().zip(&self.clusters) {
            let dsn = match self.proxies.iter().find(|(n, _)| n == name) {
                Some((_, p)) => c
                    .dsn("postgres")
                    .replace(&format!("port={}", c.port()), &format!("port={}", p.port())),
                None => c.dsn("postgres"),
            };
            toml.push_str(&format!(
                "[[nodes]]\nname = \"{name}\"\ndsn = \"{dsn}\"\n\n"
            ));
        }
        toml.push_str("[replication]\n");
        toml.push_str(&self.extra_toml);
        toml.push_str(&format!(
            "\n\n[metrics]\nlisten = \"{}\"\n",
            self.metrics_listen.as_deref().unwrap_or("")
        ));
        std::fs::write(&self.config, toml).expect("write config");
    }

    /// Puts a [`FaultProxy`] between walbridge and node `name` and rewrites the configuration
    /// so walbridge connects through it (the tests' own psql sessions still go direct).
    pub fn proxy_node(&mut self, name: &str) -> &FaultProxy {
        let port = self.node(name).port();
        self.proxies
            .push((name.to_string(), FaultProxy::start(port)));
        self.write_config();
        self.proxy(name)
    }

    /// The proxy in front of node `name` (see [`Deployment::proxy_node`]).
    pub fn proxy(&self, name: &str) -> &FaultProxy {
        self.proxies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .expect("node has a proxy")
    }

    /// Replaces the `[replication]` body and rewrites the file.
    pub fn set_replication_toml(&mut self, toml: &str) {
        self.extra_toml = toml.to_string();
        self.write_config();
    }

    /// The cluster of node `name`.
    pub fn node(&self, name: &str) -> &LocalCluster {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .expect("known node");
        &self.clusters[i]
    }

    /// The cluster of node `name`, mutable (to stop and restart it).
    pub fn node_mut(&mut self, name: &str) -> &mut LocalCluster {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .expect("known node");
        &mut self.clusters[i]
    }

    /// Runs SQL on a node's `postgres` database through psql.
    pub fn sql(&self, node: &str, sql: &str) -> String {
        self.node(node)
            .psql("postgres", sql)
            .unwrap_or_else(|e| panic!("SQL on {node} failed: {e}\n{sql}"))
    }

    /// Runs `walbridge <args> --config <file>` to completion.
    pub fn walbridge(&self, args: &[&str]) -> Output {
        Command::new(walbridge_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .expect("run walbridge")
    }

    /// Runs a walbridge command that must succeed; returns stdout.
    pub fn walbridge_ok(&self, args: &[&str]) -> String {
        let out = self.walbridge(args);
        assert!(
            out.status.success(),
            "walbridge {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `walbridge run` in the background, logging to `<dir>/<log_name>`.
    pub fn spawn_run(&self, log_name: &str) -> Runner {
        self.spawn_run_env(log_name, &[])
    }

    /// As [`Deployment::spawn_run`] with extra environment variables (a failpoint, say).
    pub fn spawn_run_env(&self, log_name: &str, env: &[(&str, &str)]) -> Runner {
        Runner::spawn(&self.config, self.dir.path().join(log_name), env)
    }

    /// `walbridge setup` (must succeed), then `walbridge run` in the background logging to
    /// `run.log`: how most scenarios begin.
    pub fn setup_and_run(&self) -> Runner {
        self.walbridge_ok(&["setup"]);
        self.spawn_run("run.log")
    }

    /// Waits until `sql` returns `expected` on `node`; panics with the last value otherwise.
    pub fn wait_for(&self, node: &str, sql: &str, expected: &str) {
        let mut last = String::new();
        let ok = wait_until(WAIT, || {
            last = self
                .node(node)
                .psql("postgres", sql)
                .unwrap_or_else(|e| e.to_string());
            last == expected
        });
        assert!(
            ok,
            "on {node}, `{sql}` returned {last:?}, expected {expected:?}"
        );
    }
}

/// A background `walbridge run`, killed on drop.
pub struct Runner {
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Runner {
    /// Starts `walbridge run --config <config>` with `env`, logging to `log`.
    pub fn spawn(config: &Path, log: PathBuf, env: &[(&str, &str)]) -> Runner {
        Runner::spawn_command(&["run"], config, log, env)
    }

    /// Starts `walbridge <args> --config <config>` (a long `setup --copy-from`, say) with
    /// `env`, logging stdout and stderr to `log`.
    pub fn spawn_command(
        args: &[&str],
        config: &Path,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Runner {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(walbridge_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,walbridge=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn walbridge {args:?}: {e}"));
        Runner { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`libc::SIGTERM`, `libc::SIGKILL`, ...).
    pub fn signal(&self, signal: i32) {
        signal_child(&self.child, signal);
    }

    /// Waits for exit up to `timeout`; the exit code, `None` if it did not exit.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<i32> {
        wait_child_exit(&mut self.child, timeout)
    }

    /// Stops it with SIGTERM and asserts a clean exit (0) within [`WAIT`], showing the log
    /// otherwise.
    pub fn stop_ok(&mut self) {
        self.signal(libc::SIGTERM);
        assert_eq!(self.wait_exit(WAIT), Some(0), "log:\n{}", self.log());
    }

    /// Asserts the process is still running and no direction stopped ("direction stopped"
    /// is not in its log).
    pub fn assert_no_direction_stopped(&mut self) {
        self.assert_running();
        let log = self.log();
        assert!(!log.contains("direction stopped"), "log:\n{log}");
    }

    /// Asserts the process is still running (it did not die on an error).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "walbridge run exited early ({status}); log:\n{}",
                self.log()
            );
        }
    }
}

/// Sends `signal` (`libc::SIGTERM`, `libc::SIGINT`, ...) to a child process of the test.
pub fn signal_child(child: &Child, signal: i32) {
    // SAFETY: kill with a pid we own and a valid signal number.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

/// Waits up to `timeout` for a child process to exit; its exit code (-1 when killed by a
/// signal), `None` if it is still running.
pub fn wait_child_exit(child: &mut Child, timeout: std::time::Duration) -> Option<i32> {
    let mut code = None;
    wait_until(timeout, || match child.try_wait() {
        Ok(Some(status)) => {
            code = Some(status.code().unwrap_or(-1));
            true
        }
        _ => false,
    });
    code
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- walbridge run log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Paths are shown in assertion messages.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}

impl Deployment {
    /// Waits until walbridge has consumed and confirmed everything written so far on every
    /// node: each slot's `confirmed_flush_lsn` passes the node's WAL position as of now. Run
    /// twice, this also covers anything the first round caused on the peers (an echo).
    pub fn wait_caught_up(&self) {
        self.wait_caught_up_within(WAIT);
    }

    /// [`Deployment::wait_caught_up`] with a longer bound, for deliberately large backlogs.
    pub fn wait_caught_up_within(&self, timeout: std::time::Duration) {
        for _round in 0..2 {
            for (name, c) in self.names.iter().zip(&self.clusters) {
                let lsn = c
                    .psql("postgres", "SELECT pg_current_wal_lsn()")
                    .expect("current WAL position");
                let sql = format!(
                    "SELECT bool_and(confirmed_flush_lsn >= '{lsn}') FROM pg_replication_slots \
                     WHERE slot_name LIKE 'walbridge\\_%'"
                );
                let mut last = String::new();
                let ok = wait_until(timeout, || {
                    last = c.psql("postgres", &sql).unwrap_or_else(|e| e.to_string());
                    last == "t"
                });
                assert!(
                    ok,
                    "{name} did not catch up with {lsn} within {timeout:?} ({last})"
                );
            }
        }
    }

    /// Row versions of a table (`xmin` per key), to prove nothing rewrote rows.
    pub fn row_versions(&self, node: &str, table: &str, key: &str) -> String {
        self.sql(
            node,
            &format!("SELECT string_agg({key}::text || '@' || xmin::text, ',' ORDER BY {key}) FROM {table}"),
        )
    }
}

impl Deployment {
    /// Rewrites the configuration with `[metrics] listen` on a free port; returns the port.
    pub fn enable_metrics(&mut self) -> u16 {
        let port = walbridge::localpg::free_port().expect("free port");
        self.metrics_listen = Some(format!("127.0.0.1:{port}"));
        self.write_config();
        port
    }

    /// Runs walbridge until everything written so far has been applied everywhere, then stops
    /// it with SIGTERM (exit 0 expected).
    pub fn replicate_once(&self, log: &str) {
        let mut run = self.spawn_run(log);
        self.wait_caught_up();
        run.signal(libc::SIGTERM);
        assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
    }

    /// A table's content as `count|md5` in key order, to compare nodes.
    pub fn fingerprint(&self, node: &str, table: &str, key: &str) -> String {
        self.sql(
            node,
            &format!("SELECT count(*) || '|' || coalesce(md5(string_agg(t::text, ',' ORDER BY {key})), '') FROM {table} t"),
        )
    }
}

/// Fetches `/metrics` from a running walbridge (plain HTTP/1.0 over loopback).
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Sum of a metric's samples whose label set contains every `(name, value)` in `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An inserts-only ledger without a key (a change applied twice shows as a duplicate row),
/// and a small hot table that every writer updates (conflicts on the same keys).
pub const LEDGER: &str = "CREATE TABLE public.ledger (seq bigint NOT NULL, note text);
     ALTER TABLE public.ledger REPLICA IDENTITY FULL;
     CREATE TABLE public.hot (id int PRIMARY KEY, n bigint NOT NULL, by text);
     INSERT INTO public.hot SELECT g, 0, '' FROM generate_series(0, 7) g;";

/// Starts a psql on `node` that commits `n` ledger rows `from..from+n` (note = the node), one
/// per transaction, pausing `pause` seconds between; with `hot`, each transaction also
/// updates one of the 8 hot rows. It dies with its node; what it committed stays the truth.
pub fn ledger_writer(
    d: &Deployment,
    node: &str,
    from: i64,
    n: i64,
    pause: &str,
    hot: bool,
) -> std::process::Child {
    let c = d.node(node);
    let hot_sql = if hot {
        format!("UPDATE hot SET n = n + 1, by = '{node}' WHERE id = i % 8;")
    } else {
        String::new()
    };
    std::process::Command::new(c.client_tool("psql").expect("psql"))
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &c.port().to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-c"])
        .arg(format!(
            "DO $$ BEGIN FOR i IN {from}..{} LOOP \
               INSERT INTO ledger VALUES (i, '{node}'); {hot_sql} COMMIT; \
               PERFORM pg_sleep({pause}); \
             END LOOP; END $$;",
            from + n - 1
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the writer")
}

/// Runs each node's psql script (`(node, script)`) at the same time and waits for all of
/// them; the scripts are written to the deployment's directory as `<node>-<tag>.sql`.
pub fn run_scripts_together(d: &Deployment, scripts: &[(String, String)], tag: &str) {
    let mut children = Vec::new();
    for (node, script) in scripts {
        let path = d.dir.path().join(format!("{node}-{tag}.sql"));
        std::fs::write(&path, script).expect("write the script");
        let c = d.node(node);
        children.push(
            std::process::Command::new(c.client_tool("psql").expect("psql"))
                .args(["-X", "-q", "-h", "127.0.0.1", "-p", &c.port().to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-f"])
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn psql"),
        );
    }
    for mut c in children {
        c.wait().expect("psql ran");
    }
}

/// `count, distinct count and sum` of the ledger's `seq` on `node`, one line to compare.
pub fn ledger_summary(d: &Deployment, node: &str) -> String {
    d.sql(
        node,
        "SELECT count(*) || ' rows, ' || count(DISTINCT seq) || ' distinct, sum ' \
         || coalesce(sum(seq), 0) FROM ledger",
    )
}

impl Deployment {
    /// The ledger check, once everything is caught up: no node holds a row twice, every node
    /// holds exactly the same rows (count and ordered content hash of `ledger` and `hot`), so
    /// no row that its origin committed is missing anywhere. Returns the row count.
    pub fn assert_ledger(&self) -> i64 {
        let mut first: Option<(String, String, String)> = None;
        for name in &self.names {
            let dup = self.sql(
                name,
                "SELECT count(*) - count(DISTINCT (seq, note)) FROM ledger",
            );
            assert_eq!(dup, "0", "{name} holds ledger rows twice");
            let fp = (
                name.clone(),
                self.fingerprint(name, "ledger", "seq, note"),
                self.fingerprint(name, "hot", "id"),
            );
            match &first {
                None => first = Some(fp),
                Some(f) => {
                    assert_eq!(f.1, fp.1, "ledger differs between {} and {name}", f.0);
                    assert_eq!(f.2, fp.2, "hot rows differ between {} and {name}", f.0);
                }
            }
        }
        let (_, ledger, _) = first.expect("a node");
        ledger
            .split('|')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count")
    }
}

/// The major version of the PostgreSQL server the tests run against (chosen by
/// `$WALBRIDGE_PG_MAJOR` / `$WALBRIDGE_PG_BIN`, default the Debian server, 15).
pub fn pg_major() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(|| {
        let bin = walbridge::localpg::bin_dir().expect("PostgreSQL server binaries");
        walbridge::localpg::server_major(&bin).expect("PostgreSQL server version")
    })
}

/// Whether wal2json is available to the server under test (it is installed only for the
/// Debian PostgreSQL 15). When not, prints the reason and returns false: a test that needs
/// wal2json starts with `if !wal2json_available() { return; }`.
pub fn wal2json_available() -> bool {
    let installed = wal2json_installed();
    if !installed {
        eprintln!("skipped: wal2json is only installed for PostgreSQL 15");
    }
    installed
}

/// [`wal2json_available`] without the message, for set-up code shared with other tests.
pub fn wal2json_installed() -> bool {
    let bin = walbridge::localpg::bin_dir().expect("PostgreSQL server binaries");
    bin.parent()
        .map(|p| {
            p.join("lib").join("wal2json.so").is_file()
                || p.join("lib/postgresql/wal2json.so").is_file()
        })
        .unwrap_or(false)
}
