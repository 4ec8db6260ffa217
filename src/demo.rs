//! `walbridge demo`: the zero-configuration first run.
//!
//! Starts two throwaway local clusters (`east`, `west`) from the PostgreSQL binaries on the
//! machine, creates a small schema on both, runs `setup`, replicates both ways, writes on both
//! sides, and prints once a second what flowed and how far behind each direction is, until
//! Ctrl-C; then stops replication cleanly and removes the clusters.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::localpg::{ClusterOptions, LocalCluster, LocalPgError};
use crate::pgconn;
use crate::setup::{self, SetupOptions};

/// The demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The local clusters could not be started.
    #[error("starting the demo clusters: {0}")]
    Cluster(#[from] LocalPgError),
    /// The generated configuration was rejected (a bug).
    #[error("the demo configuration is invalid: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// Setup failed.
    #[error("setting up the demo clusters: {0}")]
    Setup(#[from] setup::SetupError),
    /// A demo query failed.
    #[error("demo query failed: {0}")]
    Sql(String),
    /// The runtime could not start.
    #[error(transparent)]
    Run(#[from] crate::runtime::RunError),
}

const SCHEMA: &str = "
CREATE TABLE public.accounts (
    id         bigint PRIMARY KEY,
    owner      text NOT NULL,
    balance    numeric(12,2) NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE public.events (
    id      bigint PRIMARY KEY,
    node    text NOT NULL,
    payload jsonb
);";

fn sql_err(e: tokio_postgres::Error) -> DemoError {
    DemoError::Sql(setup::pg_message(&e))
}

/// Runs the demo until `shutdown` is cancelled.
pub async fn run(shutdown: CancellationToken) -> Result<(), DemoError> {
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "walbridge demo: starting two local PostgreSQL clusters ..."
    );
    // TCP needs the generated password; only the private socket directory is trusted.
    let options = ClusterOptions {
        fast_and_unsafe: true,
        tcp_password: true,
        ..ClusterOptions::default()
    };
    let (east, west) = tokio::task::spawn_blocking(move || {
        Ok::<_, LocalPgError>((
            LocalCluster::start(&options)?,
            LocalCluster::start(&options)?,
        ))
    })
    .await
    .map_err(|e| DemoError::Sql(e.to_string()))??;
    for c in [&east, &west] {
        c.psql("postgres", SCHEMA)?;
    }
    let metrics_port = crate::localpg::free_port()?;
    let listen = if std::net::TcpListener::bind("127.0.0.1:9187").is_ok() {
        "127.0.0.1:9187".to_string()
    } else {
        format!("127.0.0.1:{metrics_port}")
    };
    let toml = format!(
        "[[nodes]]\nname = \"east\"\ndsn = \"{}\"\n\n[[nodes]]\nname = \"west\"\ndsn = \"{}\"\n\n\
         [replication]\ntables = [\"public.*\"]\nplugin = \"pgoutput\"\nconflict = \"last_write_wins\"\n\
         priority = [\"east\", \"west\"]\n\n[metrics]\nlisten = \"{listen}\"\n",
        east.dsn("postgres"),
        west.dsn("postgres")
    );
    let config_path = east.base_dir().join("walbridge-demo.toml");
    let _ = std::fs::write(&config_path, &toml);
    let config = Arc::new(Config::from_toml_str(&toml)?);
    let _ = writeln!(
        out,
        "  east: psql -h {} -p {} -U postgres postgres\n  west: psql -h {} -p {} -U postgres postgres\n  \
         (TCP logins need the generated password, in the dsn of the config file)\n  \
         config: {}\n",
        east.base_dir().display(),
        east.port(),
        west.base_dir().display(),
        west.port(),
        config_path.display()
    );

    setup::setup(&config, &SetupOptions::default(), &mut out).await?;

    let run_shutdown = CancellationToken::new();
    let runtime = tokio::spawn(crate::runtime::run(config.clone(), run_shutdown.clone()));
    let _ = writeln!(
        out,
        "\nreplicating both ways; metrics at http://{listen}/metrics, health at /healthz and /readyz\n\
         writing on both sides; press Ctrl-C to stop and remove the clusters\n"
    );

    let result = write_and_report(&config, &listen, &shutdown).await;
    run_shutdown.cancel();
    let stopped = runtime.await;
    let _ = writeln!(out, "\nstopped; removing the demo clusters");
    drop((east, west));
    result?;
    match stopped {
        Ok(r) => r.map_err(DemoError::from),
        Err(e) => Err(DemoError::Sql(e.to_string())),
    }
}

async fn write_and_report(
    config: &Config,
    listen: &str,
    shutdown: &CancellationToken,
) -> Result<(), DemoError> {
    let mut clients = Vec::new();
    for node in &config.nodes {
        let c = pgconn::connect(&node.dsn, "walbridge-demo-writer")
            .await
            .map_err(|e| DemoError::Sql(e.to_string()))?;
        clients.push((node.name.clone(), c));
    }
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut n: i64 = 0;
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        n += 1;
        for (i, (name, client)) in clients.iter().enumerate() {
            // Each node inserts its own keys (even on east, odd on west) and updates the other's.
            let id = n * 2 + i as i64;
            client
                .execute(
                    "INSERT INTO public.accounts (id, owner, balance) VALUES ($1, $2, $3::int8)",
                    &[&id, &format!("{name}-{n}"), &(n % 1000)],
                )
                .await
                .map_err(sql_err)?;
            client
                .execute(
                    "INSERT INTO public.events (id, node, payload) VALUES ($1, $2, pg_catalog.jsonb_build_object('n', $3::int8))",
                    &[&id, name, &n],
                )
                .await
                .map_err(sql_err)?;
            if n % 5 == 0 {
                client
                    .execute(
                        "UPDATE public.accounts SET balance = balance + 1, updated_at = pg_catalog.now() WHERE id = $1",
                        &[&(n * 2 - 10 + 1 - i as i64)],
                    )
                    .await
                    .map_err(sql_err)?;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let mut line = format!("[{:>4}s]", started.elapsed().as_secs());
            for (name, client) in &clients {
                let row = client
                    .query_one("SELECT count(*) FROM public.accounts", &[])
                    .await
                    .map_err(sql_err)?;
                let _ = write!(line, " {name}: {} accounts", row.get::<_, i64>(0));
            }
            let _ = write!(line, " | {}", lag_summary(listen).await);
            println!("{line}");
        }
    }
}

/// `east->west 12 txns, lag 0.003 s` from the running process's /metrics.
async fn lag_summary(listen: &str) -> String {
    let text = match fetch_metrics(listen).await {
        Some(t) => t,
        None => return "metrics unavailable".into(),
    };
    let mut parts = Vec::new();
    for (s, t) in [("east", "west"), ("west", "east")] {
        let labels = format!("source=\"{s}\",target=\"{t}\"");
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains(&labels))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        parts.push(format!(
            "{s}->{t} {} txns, lag {:.3} s / {} B",
            value("walbridge_transactions_applied_total"),
            value("walbridge_replication_lag_seconds"),
            value("walbridge_replication_lag_bytes")
        ));
    }
    parts.join(", ")
}

async fn fetch_metrics(listen: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(listen).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}
