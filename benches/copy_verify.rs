//! End-to-end figures for `setup --copy-from` and `verify`, beside PostgreSQL's own tools.
//!
//! Starts two throwaway clusters, loads the same tables on the source (an ordinary table, a
//! partitioned one, one with ~500-byte text rows; 1M rows in all, `WALBRIDGE_BENCH_ROWS`
//! scales it), then in one run on the same machine:
//!
//! 1. `walbridge setup --copy-from east` (the real binary): copy throughput;
//! 2. `walbridge verify` on the identical tables: time per million rows;
//! 3. `walbridge teardown`, the target emptied, then `pg_dump -Fd -j 2 --data-only` and
//!    `pg_restore -j 2 --data-only` of the same tables (what the old sync script did);
//! 4. `walbridge verify` again, as a check that both paths produced the same rows.
//!
//! Run with `cargo bench --bench copy_verify` (or `cargo test --bench copy_verify` for a
//! quick debug-build run). Prints one line per figure and the ratio.

// A benchmark program, not a library: its helpers need no docs.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use walbridge::localpg::{ClusterOptions, LocalCluster};

const SCHEMA: &str = "
    CREATE TABLE public.items (id int PRIMARY KEY, name text, qty numeric, at timestamptz, tags text[]);
    CREATE TABLE public.events (id bigint, day date, payload jsonb, PRIMARY KEY (id, day))
        PARTITION BY RANGE (day);
    CREATE TABLE public.events_a PARTITION OF public.events FOR VALUES FROM ('2024-01-01') TO ('2024-07-01');
    CREATE TABLE public.events_b PARTITION OF public.events FOR VALUES FROM ('2024-07-01') TO ('2025-01-01');
    CREATE TABLE public.docs (id int PRIMARY KEY, title text, body text);
";

fn data(rows: u64) -> String {
    let (items, events, docs) = (rows * 6 / 10, rows * 3 / 10, rows / 10);
    format!(
        "INSERT INTO public.items SELECT g, 'item ' || g, g * 1.25, '2024-01-01'::timestamptz + g * interval '1 s', \
                ARRAY['a' || g % 7, 'b' || g % 3] FROM generate_series(1, {items}) g;
         INSERT INTO public.events SELECT g, DATE '2024-01-01' + (g % 366), \
                jsonb_build_object('n', g, 'kind', 'k' || g % 10, 'ok', g % 2 = 0) FROM generate_series(1, {events}) g;
         INSERT INTO public.docs SELECT g, 'doc ' || g, repeat(md5(g::text), 16) FROM generate_series(1, {docs}) g;"
    )
}

fn psql(c: &LocalCluster, sql: &str) -> String {
    c.psql("postgres", sql)
        .unwrap_or_else(|e| panic!("psql failed: {e}\n{sql}"))
}

/// CPU seconds (user + system) used by finished child processes so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we own; RUSAGE_CHILDREN is a valid target.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn run(cmd: &mut Command, what: &str) -> (Output, f64) {
    let cpu_before = children_cpu();
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  {what}: {secs:.2}s wall, {:.2}s CPU in the client process",
        children_cpu() - cpu_before
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, secs)
}

fn walbridge(config: &Path, args: &[&str]) -> (String, f64) {
    let (out, secs) = run(
        Command::new(env!("CARGO_BIN_EXE_walbridge"))
            .args(args)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn"),
        &format!("walbridge {args:?}"),
    );
    (String::from_utf8_lossy(&out.stdout).into_owned(), secs)
}

fn pg_tool(bin: &Path, tool: &str, c: &LocalCluster, args: &[&str]) -> f64 {
    let port = c.port().to_string();
    run(
        Command::new(bin.join(tool))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args),
        tool,
    )
    .1
}

fn main() {
    // `cargo bench` passes `--bench`; anything else that looks like a filter is ignored.
    let rows: u64 = std::env::var("WALBRIDGE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let options = ClusterOptions::default();
    let east = LocalCluster::start(&options).expect("start east");
    let west = LocalCluster::start(&options).expect("start west");
    for c in [&east, &west] {
        psql(c, SCHEMA);
    }
    eprintln!("loading {rows} rows on east...");
    psql(&east, &data(rows));
    psql(&east, "VACUUM ANALYZE");
    let table_bytes: f64 = psql(
        &east,
        "SELECT sum(pg_table_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
          WHERE n.nspname = 'public' AND c.relkind = 'r'",
    )
    .parse()
    .expect("table size");
    let mb = table_bytes / 1e6;

    let dir = tempfile::tempdir().expect("temp dir");
    let config: PathBuf = dir.path().join("walbridge.toml");
    std::fs::write(
        &config,
        format!(
            "[[nodes]]\nname = \"east\"\ndsn = \"{}\"\n\n[[nodes]]\nname = \"west\"\ndsn = \"{}\"\n\n\
             [replication]\ntables = [\"public.*\"]\n\n[metrics]\nlisten = \"\"\n",
            east.dsn("postgres"),
            west.dsn("postgres")
        ),
    )
    .expect("write config");

    // 1. walbridge copy.
    let (out, copy_secs) = walbridge(&config, &["setup", "--copy-from", "east", "--jobs", "2"]);
    let copy_line = out
        .lines()
        .find(|l| l.starts_with("copied "))
        .unwrap_or("")
        .to_string();
    // 2. verify, identical.
    let (_, verify_secs) = walbridge(&config, &["verify"]);

    // 3. pg_dump | pg_restore of the same tables into the emptied target.
    walbridge(&config, &["teardown"]);
    psql(&west, "TRUNCATE public.items, public.events, public.docs");
    let bin = east.bin_dir().to_path_buf();
    let dump = dir.path().join("dump");
    let dump_s = dump.to_string_lossy().into_owned();
    let dump_secs = pg_tool(
        &bin,
        "pg_dump",
        &east,
        &[
            "-d",
            "postgres",
            "-Fd",
            "-j",
            "2",
            "--data-only",
            "-n",
            "public",
            "-f",
            &dump_s,
        ],
    );
    let restore_secs = pg_tool(
        &bin,
        "pg_restore",
        &west,
        &["-d", "postgres", "-j", "2", "--data-only", &dump_s],
    );
    // 4. The same rows either way.
    let (_, verify2_secs) = walbridge(&config, &["verify"]);

    let pg_secs = dump_secs + restore_secs;
    let per_m = |secs: f64| secs / (rows as f64 / 1e6);
    println!("copy_verify: {rows} rows, {mb:.0} MB of table data (2 clusters, same machine)");
    println!(
        "  walbridge setup --copy-from (whole setup): {copy_secs:.2}s, {:.0} rows/s, {:.1} MB/s",
        rows as f64 / copy_secs,
        mb / copy_secs
    );
    println!("    {copy_line}");
    println!(
        "  pg_dump -Fd -j 2 + pg_restore -j 2:        {pg_secs:.2}s ({dump_secs:.2}s dump + {restore_secs:.2}s restore), {:.0} rows/s, {:.1} MB/s",
        rows as f64 / pg_secs,
        mb / pg_secs
    );
    println!(
        "  ratio (pg_dump+pg_restore time / walbridge time): {:.2}x",
        pg_secs / copy_secs
    );
    println!(
        "  walbridge verify (identical, 2 nodes): {verify_secs:.2}s = {:.2}s per million rows; again after pg_restore: {verify2_secs:.2}s",
        per_m(verify_secs)
    );
}
