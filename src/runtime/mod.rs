//! The runtime: the only place that spawns tasks. One worker per direction, each its own
//! failure domain, restarted with backoff on transient errors and parked on definite ones.

mod housekeeping;
pub mod monitor;
mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::config::{Config, Mode};
use crate::direction::{claim, spread};
use crate::metrics::Metrics;
use crate::trigger::CaptureMode;
// The direction contract moved down to `crate::direction`; these names stay importable here
// so code written against `runtime::…` before the move keeps building.
pub use crate::direction::{
    state, DirectionContext, DirectionError, DirectionState, DirectionStatus, ErrorClass,
    NodeStatus, SlotStatus, StatusBoard,
};

/// `walbridge run` could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The metrics endpoint could not listen.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// A configured mode is not available.
    #[error("{0}")]
    Unsupported(String),
}

/// Spawns a task with a tracing span named after it, tracked for shutdown.
fn spawn_named<F>(tracker: &TaskTracker, name: String, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let span = tracing::info_span!("task", name = %name);
    tracker.spawn(fut.instrument(span));
}

/// Runs every direction until `shutdown` is cancelled, then stops them cleanly.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), RunError> {
    let directions = config.directions();
    let metrics = Metrics::new();
    metrics.register_topology(
        config.nodes.iter().map(|n| n.name.as_str()),
        directions
            .iter()
            .map(|d| (d.source.as_str(), d.target.as_str())),
    );
    let status = StatusBoard::new(
        config.nodes.iter().map(|n| n.name.as_str()),
        directions
            .iter()
            .map(|d| (d.source.as_str(), d.target.as_str())),
    );
    let tracker = TaskTracker::new();
    if let Some(addr) = config.metrics.listen {
        let server =
            crate::http::serve(addr, metrics.clone(), status.clone(), shutdown.clone()).await?;
        info!(%addr, "serving /metrics, /healthz and /readyz");
        spawn_named(&tracker, "http".into(), server);
    }
    spawn_named(
        &tracker,
        "housekeeping".into(),
        housekeeping::run(config.clone(), shutdown.clone()),
    );
    spawn_named(
        &tracker,
        "monitor".into(),
        monitor::run(
            config.clone(),
            metrics.clone(),
            status.clone(),
            shutdown.clone(),
        ),
    );
    // Each node's capture mode (what setup recorded under `auto`), said once at start; a
    // direction resolves its source's mode again whenever it (re)starts.
    for (node, m) in config
        .nodes
        .iter()
        .zip(crate::trigger::node_modes(&config).await)
    {
        match m {
            Ok(m) => {
                info!(node = %node.name, mode = m.mode.as_str(), reason = %m.reason, "capture mode");
                status.node(&node.name, |n| n.mode = m.mode.as_str().into());
            }
            Err(e) => warn!(node = %node.name, error = %e, "capture mode not known yet"),
        }
    }
    let fleet = spread::Fleet::new(directions.len());
    spawn_named(
        &tracker,
        "spread".into(),
        spread::run(
            config.clone(),
            fleet.clone(),
            status.clone(),
            shutdown.clone(),
        ),
    );
    for d in &directions {
        let ctx = DirectionContext {
            fleet: fleet.clone(),
            config: config.clone(),
            source: d.source.clone(),
            target: d.target.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            shutdown: shutdown.child_token(),
            abandoned_apply_pid: Arc::default(),
        };
        let name = format!("{}->{}", d.source, d.target);
        let span = tracing::info_span!("direction", source = %d.source, target = %d.target);
        tracker.spawn(supervise(ctx).instrument(span));
        let _ = name;
    }
    tracker.close();
    shutdown.cancelled().await;
    info!("stopping: finishing in-flight transactions");
    if tokio::time::timeout(Duration::from_secs(60), tracker.wait())
        .await
        .is_err()
    {
        warn!("some directions did not stop within 60 s; exiting anyway");
    }
    info!("stopped");
    Ok(())
}

/// How the direction's source captures its changes: the configured mode, or under `auto`
/// what setup recorded on the source (an unreachable source is a transient error).
async fn direction_mode(ctx: &DirectionContext) -> Result<CaptureMode, DirectionError> {
    match ctx.config.replication.mode {
        Mode::Stream => Ok(CaptureMode::Stream),
        Mode::Trigger => Ok(CaptureMode::Trigger),
        Mode::Auto => {
            let node = ctx.config.node(&ctx.source).ok_or_else(|| {
                DirectionError::definite(format!("node {} is not configured", ctx.source))
            })?;
            let client = crate::pgconn::connect(&node.dsn, "walbridge-mode")
                .await
                .map_err(|e| DirectionError::caused_by(format!("node {}: {e}", ctx.source), &e))?;
            let m = crate::trigger::node_mode(&ctx.config, &ctx.source, &client)
                .await
                .map_err(|e| {
                    DirectionError::caused_by(
                        format!(
                            "node {}: reading its capture mode: {}",
                            ctx.source,
                            crate::pgconn::pg_message(&e)
                        ),
                        &e,
                    )
                })?;
            ctx.report(|s| s.mode_reason = Some(m.reason.clone()));
            Ok(m.mode)
        }
    }
}

/// Exponential backoff with jitter: 250 ms doubling up to 30 s, each delay ±25 %.
fn backoff(attempt: u32) -> Duration {
    let base = 0.25_f64 * 2f64.powi(attempt.min(8) as i32);
    let capped = base.min(30.0);
    let jitter = rand::rng().random_range(0.75..1.25);
    Duration::from_secs_f64((capped * jitter).min(30.0))
}

/// Runs one direction, reconnecting on transient errors (one warning per outage) and
/// parking it on definite ones until shutdown.
async fn supervise(ctx: DirectionContext) {
    let (s, t) = (ctx.source.clone(), ctx.target.clone());
    let mut attempt: u32 = 0;
    loop {
        let started = tokio::time::Instant::now();
        let result = match direction_mode(&ctx).await {
            Ok(CaptureMode::Trigger) => crate::trigger::run_direction(&ctx).await.map(|()| false),
            Ok(CaptureMode::Stream) => stream::run(&ctx).await.map(|ended| match ended {
                stream::Ended::Shutdown => false,
                stream::Ended::Released => true,
            }),
            Err(e) => Err(e),
        };
        claim::released(
            &ctx,
            match &result {
                Ok(false) => "stopping",
                Ok(true) => "handed over: this instance was over its share",
                Err(_) => "the direction was interrupted",
            },
        );
        let err = match result {
            Ok(false) => return,
            Ok(true) => {
                // Let another instance claim it before this one may try again.
                attempt = 0;
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => {
                        ctx.report(|st| st.state = DirectionState::Stopped);
                        return;
                    }
                    _ = tokio::time::sleep(claim::HANDOVER_PAUSE) => {}
                }
                continue;
            }
            Err(e) => e,
        };
        ctx.metrics
            .errors
            .with_label_values(&[
                s.as_str(),
                t.as_str(),
                if err.is_transient() {
                    "transient"
                } else {
                    "definite"
                },
            ])
            .inc();
        if ctx.shutdown.is_cancelled() {
            return;
        }
        if !err.is_transient() {
            error!(source = %s, target = %t, error = %err, "direction stopped; fix the cause and restart walbridge");
            ctx.report(|st| {
                st.state = DirectionState::Failed;
                st.last_error = Some(err.message.clone());
            });
            ctx.shutdown.cancelled().await;
            ctx.report(|st| st.state = DirectionState::Stopped);
            return;
        }
        // A direction that streamed for a while starts a new outage.
        if started.elapsed() > Duration::from_secs(30) {
            attempt = 0;
        }
        if attempt == 0 {
            warn!(source = %s, target = %t, error = %err, "direction interrupted; reconnecting");
        } else {
            tracing::debug!(source = %s, target = %t, error = %err, attempt, "still reconnecting");
        }
        ctx.metrics
            .reconnects
            .with_label_values(&[s.as_str(), t.as_str()])
            .inc();
        ctx.report(|st| {
            st.state = DirectionState::Reconnecting;
            st.last_error = Some(err.message.clone());
        });
        let delay = backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                ctx.report(|st| st.state = DirectionState::Stopped);
                return;
            }
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
