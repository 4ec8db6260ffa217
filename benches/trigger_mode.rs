//! Trigger mode end to end, beside a faithful re-creation of the old polling script, on the
//! same machine in the same run. Prints figures; no criterion (each run takes a minute).
//!
//! For each system, on a fresh pair of local clusters A and B:
//!
//! * **latency**: one row per transaction committed on A at a steady rate; a watcher polls B
//!   every millisecond; latency = first seen on B minus commit acknowledged on A (p50, p99,
//!   max);
//! * **throughput**: a backlog of rows written on A while replication is stopped, then the
//!   time from start until all are on B (rows/s).
//!
//! The polling script, re-created from its README: every 5 seconds (the `schedule` library:
//! next run 5 s after the previous one ended, checked by a loop that sleeps 1 s), for each
//! direction read the whole `database_changes` table in id order, and for each row build the
//! INSERT/UPDATE/DELETE from `descripcion`, run it on the other node in its own transaction
//! (psycopg2: BEGIN, statement, COMMIT), then delete the row at the source the same way.
//!
//! `cargo bench --bench trigger_mode` (set `WALBRIDGE_BENCH_QUICK=1` for a short run,
//! `WALBRIDGE_BENCH_WALBRIDGE_ONLY=1` to leave the polling script out).

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use walbridge::config::Config;
use walbridge::direction::{DirectionContext, StatusBoard};
use walbridge::localpg::{ClusterOptions, LocalCluster};
use walbridge::metrics::Metrics;

const TABLE: &str =
    "CREATE TABLE public.bench (id bigint PRIMARY KEY, payload text, n int, at timestamptz)";

struct Params {
    rate: u32,
    seconds: u64,
    backlog: i64,
}

fn main() {
    let quick = std::env::var_os("WALBRIDGE_BENCH_QUICK").is_some();
    let p = if quick {
        Params {
            rate: 20,
            seconds: 11,
            backlog: 2_000,
        }
    } else {
        Params {
            rate: 40,
            seconds: 21,
            backlog: 10_000,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "trigger-mode benchmark: {} rows/s for {} s (latency), backlog of {} rows (throughput)",
        p.rate, p.seconds, p.backlog
    );
    let ours = rt.block_on(walbridge_trigger(&p));
    // Comparing two walbridge builds needs walbridge's side only (about a minute less).
    let old = if std::env::var_os("WALBRIDGE_BENCH_WALBRIDGE_ONLY").is_some() {
        None
    } else {
        Some(rt.block_on(polling_script(&p)))
    };
    println!();
    println!("| system | latency p50 | latency p99 | latency max | backlog throughput |");
    println!("|---|---|---|---|---|");
    let mut systems = vec![("walbridge trigger mode", &ours)];
    if let Some(old) = &old {
        systems.push(("polling script (5 s)", old));
    }
    for (name, r) in systems {
        println!(
            "| {name} | {} | {} | {} | {:.0} rows/s |",
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.rows_per_second
        );
    }
    if let Some(old) = &old {
        println!(
            "\nratio: latency p50 {:.0}x lower, throughput {:.1}x higher",
            old.p50.as_secs_f64() / ours.p50.as_secs_f64().max(1e-6),
            ours.rows_per_second / old.rows_per_second.max(1e-6)
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

struct Figures {
    p50: Duration,
    p99: Duration,
    max: Duration,
    rows_per_second: f64,
}

fn start_pair() -> (LocalCluster, LocalCluster) {
    let start = || LocalCluster::start(&ClusterOptions::default()).expect("local cluster");
    let (a, b) = (start(), start());
    for c in [&a, &b] {
        c.psql("postgres", TABLE).expect("schema");
    }
    (a, b)
}

async fn connect(c: &LocalCluster) -> Client {
    let (client, conn) = tokio_postgres::connect(&c.dsn("postgres"), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// Writes `rate` single-row transactions per second on `a` for `seconds` (ids from `first`),
/// while watching `b`; returns each row's latency.
async fn measure_latency(a: &Client, b: &Client, first: i64, p: &Params) -> Vec<Duration> {
    let total = (u64::from(p.rate) * p.seconds) as i64;
    let committed: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total as usize]));
    // The watcher: polls B until every row has been seen.
    let watch = async {
        let stmt = b
            .prepare("SELECT coalesce(max(id), 0) FROM bench")
            .await
            .expect("prepare");
        let mut seen = first - 1;
        let mut lat = vec![Duration::ZERO; total as usize];
        while seen < first + total - 1 {
            let max: i64 = b.query_one(&stmt, &[]).await.expect("poll").get(0);
            let now = Instant::now();
            if max > seen {
                let c = committed.lock().unwrap_or_else(|e| e.into_inner());
                for id in (seen + 1)..=max {
                    let i = (id - first) as usize;
                    if let Some(Some(t)) = c.get(i) {
                        lat[i] = now.saturating_duration_since(*t);
                    }
                }
                seen = max;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat
    };
    let write = async {
        let stmt = a
            .prepare("INSERT INTO bench VALUES ($1, 'payload', 1, now())")
            .await
            .expect("prepare");
        let period = Duration::from_secs_f64(1.0 / f64::from(p.rate));
        let start = Instant::now();
        for i in 0..total {
            let due = start + period * (i as u32);
            tokio::time::sleep_until(due.into()).await;
            a.execute(&stmt, &[&(first + i)]).await.expect("insert");
            let now = Instant::now();
            if let Some(slot) = committed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(i as usize)
            {
                *slot = Some(now);
            }
        }
    };
    let (lat, ()) = tokio::join!(watch, write);
    lat
}

fn summarize(mut lat: Vec<Duration>, rows_per_second: f64) -> Figures {
    lat.sort_unstable();
    let at = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Figures {
        p50: at(0.50),
        p99: at(0.99),
        max: lat.last().copied().unwrap_or_default(),
        rows_per_second,
    }
}

async fn backlog(a: &Client, first: i64, n: i64) {
    a.execute(
        "INSERT INTO bench SELECT g, 'payload', 1, now() FROM generate_series($1::int8, $2::int8) g",
        &[&first, &(first + n - 1)],
    )
    .await
    .expect("backlog");
}

async fn wait_count(b: &Client, n: i64) -> Instant {
    loop {
        let c: i64 = b
            .query_one("SELECT count(*) FROM bench", &[])
            .await
            .expect("count")
            .get(0);
        if c >= n {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn walbridge_trigger(p: &Params) -> Figures {
    let (ca, cb) = start_pair();
    let toml = format!(
        "[[nodes]]\nname = \"a\"\ndsn = \"{}\"\n[[nodes]]\nname = \"b\"\ndsn = \"{}\"\n\
         [replication]\nmode = \"trigger\"\ntables = [\"public.*\"]\n\
         [trigger]\npoll_interval = \"5s\"\nbatch_size = 500\n[metrics]\nlisten = \"\"\n",
        ca.dsn("postgres"),
        cb.dsn("postgres")
    );
    let config = Arc::new(Config::from_toml_str(&toml).expect("config"));
    let mut sink = std::io::sink();
    walbridge::setup::setup(&config, &Default::default(), &mut sink)
        .await
        .expect("setup");
    let (a, b) = (connect(&ca).await, connect(&cb).await);

    let start_workers = || {
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        let status = StatusBoard::new(["a", "b"], [("a", "b"), ("b", "a")]);
        let mut tasks = Vec::new();
        for (s, t) in [("a", "b"), ("b", "a")] {
            let ctx = DirectionContext {
                config: config.clone(),
                source: s.into(),
                target: t.into(),
                metrics: metrics.clone(),
                status: status.clone(),
                shutdown: shutdown.clone(),
                abandoned_apply_pid: Default::default(),
                fleet: walbridge::direction::spread::Fleet::new(2),
            };
            tasks.push(tokio::spawn(async move {
                walbridge::trigger::run_direction(&ctx)
                    .await
                    .expect("direction");
            }));
        }
        (shutdown, tasks)
    };

    let (stop, tasks) = start_workers();
    let lat = measure_latency(&a, &b, 1, p).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }

    let first = 1 + (u64::from(p.rate) * p.seconds) as i64;
    backlog(&a, first, p.backlog).await;
    let total = first - 1 + p.backlog;
    let started = Instant::now();
    let (stop, tasks) = start_workers();
    let done = wait_count(&b, total).await;
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let secs = done.duration_since(started).as_secs_f64();
    println!(
        "walbridge trigger mode: backlog of {} rows applied in {:.2} s",
        p.backlog, secs
    );
    summarize(lat, p.backlog as f64 / secs)
}

/// The old script's trigger on A: logs every change of `bench` into `database_changes`.
const OLD_TRIGGER: &str = "
CREATE TABLE public.database_changes (id serial PRIMARY KEY, metodo text, tabla text, descripcion json);
CREATE FUNCTION public.log_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO database_changes (metodo, tabla, descripcion) VALUES (TG_OP, TG_TABLE_NAME, row_to_json(OLD));
  ELSE
    INSERT INTO database_changes (metodo, tabla, descripcion) VALUES (TG_OP, TG_TABLE_NAME, row_to_json(NEW));
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER log_change AFTER INSERT OR UPDATE OR DELETE ON bench FOR EACH ROW EXECUTE FUNCTION log_change();";

/// psycopg2-style literal for a JSON value.
fn literal(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "NULL".into(),
        serde_json::Value::String(s) => format!("'{}'", s.replace('\'', "''")),
        other => format!("'{}'", other.to_string().replace('\'', "''")),
    }
}

/// The script's `build_query`.
fn build_query(metodo: &str, tabla: &str, descripcion: &str) -> Option<String> {
    let row: serde_json::Map<String, serde_json::Value> = serde_json::from_str(descripcion).ok()?;
    match metodo {
        "INSERT" => Some(format!(
            "INSERT INTO {tabla} ({}) VALUES ({})",
            row.keys().cloned().collect::<Vec<_>>().join(", "),
            row.values().map(literal).collect::<Vec<_>>().join(", ")
        )),
        "UPDATE" => Some(format!(
            "UPDATE {tabla} SET {} WHERE id = {}",
            row.iter()
                .filter(|(k, _)| *k != "id")
                .map(|(k, v)| format!("{k} = {}", literal(v)))
                .collect::<Vec<_>>()
                .join(", "),
            literal(row.get("id")?)
        )),
        "DELETE" => Some(format!(
            "DELETE FROM {tabla} WHERE id = {}",
            literal(row.get("id")?)
        )),
        _ => None,
    }
}

/// The script's `sync_changes(source, target)`: every row, one at a time.
async fn sync_changes(source: &Client, target: &Client) {
    let rows = source
        .query(
            "SELECT id, metodo, tabla, descripcion::text FROM database_changes ORDER BY id",
            &[],
        )
        .await
        .expect("read changes");
    for r in rows {
        let (id, metodo, tabla, descripcion): (i32, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let Some(q) = build_query(&metodo, &tabla, &descripcion) else {
            continue;
        };
        // psycopg2: BEGIN before the first statement, commit() after it.
        if target.simple_query("BEGIN").await.is_ok() && target.simple_query(&q).await.is_ok() {
            let _ = target.simple_query("COMMIT").await;
            let _ = source.simple_query("BEGIN").await;
            let _ = source
                .simple_query(&format!("DELETE FROM database_changes WHERE id = {id}"))
                .await;
            let _ = source.simple_query("COMMIT").await;
        } else {
            let _ = target.simple_query("ROLLBACK").await;
        }
    }
}

/// The script's main loop: `schedule.every(5).seconds.do(job)`, `run_pending()` then
/// `time.sleep(1)`.
async fn schedule_loop(
    a: &Client,
    b: &Client,
    stop: CancellationToken,
    first_job: &mut Option<Instant>,
) {
    let mut next_run = Instant::now() + Duration::from_secs(5);
    while !stop.is_cancelled() {
        if Instant::now() >= next_run {
            first_job.get_or_insert_with(Instant::now);
            sync_changes(a, b).await;
            sync_changes(b, a).await;
            next_run = Instant::now() + Duration::from_secs(5);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn polling_script(p: &Params) -> Figures {
    let (ca, cb) = start_pair();
    ca.psql("postgres", OLD_TRIGGER).expect("old trigger");
    cb.psql(
        "postgres",
        "CREATE TABLE public.database_changes (id serial PRIMARY KEY, metodo text, tabla text, descripcion json)",
    )
    .expect("old table");
    let (a, b) = (connect(&ca).await, connect(&cb).await);
    let (la, lb) = (connect(&ca).await, connect(&cb).await);

    let stop = CancellationToken::new();
    let mut unused = None;
    let (lat, ()) = tokio::join!(
        async {
            // Returns once every row was seen on B; then the loop stops.
            let lat = measure_latency(&a, &b, 1, p).await;
            stop.cancel();
            lat
        },
        schedule_loop(&la, &lb, stop.clone(), &mut unused)
    );

    let first = 1 + (u64::from(p.rate) * p.seconds) as i64;
    backlog(&a, first, p.backlog).await;
    let total = first - 1 + p.backlog;
    let stop = CancellationToken::new();
    let mut first_job = None;
    let started = Instant::now();
    let (done, ()) = tokio::join!(
        async {
            let t = wait_count(&b, total).await;
            stop.cancel();
            t
        },
        schedule_loop(&la, &lb, stop.clone(), &mut first_job)
    );
    let from_job = first_job.map_or(started, |t| t);
    let secs = done.duration_since(started).as_secs_f64();
    let apply_secs = done.duration_since(from_job).as_secs_f64();
    println!(
        "polling script: backlog of {} rows applied in {:.2} s ({:.2} s after its first poll)",
        p.backlog, secs, apply_secs
    );
    summarize(lat, p.backlog as f64 / apply_secs.max(1e-6))
}
