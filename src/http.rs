//! The operator's HTTP endpoints, served at `[metrics] listen`:
//!
//! | path | answers |
//! |---|---|
//! | `/metrics` | Prometheus text format, every metric of the contract |
//! | `/healthz` | 200 while the process runs |
//! | `/readyz` | 200 while every direction streams, every node answers and no slot is over its WAL budget; else 503 with the reasons as JSON |
//! | `/status` | the live status board as JSON (what `walbridge status` reads from a running process) |
//!
//! Lag gauges are recomputed from the status board on every scrape, so `/metrics`, `/status`
//! and `walbridge status` show the same numbers and a scrape never sees a stale lag.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::direction::StatusBoard;
use crate::lsn::PgTimestamp;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    status: StatusBoard,
    started: Instant,
    started_at: PgTimestamp,
    addr: SocketAddr,
}

/// The HTTP server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for [metrics] listen: {source}; choose a free address or set listen = \"\"")]
pub struct HttpError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds the listener now (so a taken port fails at startup) and returns the server future.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    status: StatusBoard,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send, HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError { addr, source })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_handler))
        .with_state(AppState {
            metrics,
            status,
            started: Instant::now(),
            started_at: PgTimestamp::now(),
            addr,
        });
    Ok(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    s.status.refresh(Some(&s.metrics));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let warnings = s.status.warnings();
    match s.status.not_ready() {
        None => (
            StatusCode::OK,
            Json(serde_json::json!({"ready": true, "warnings": warnings})),
        ),
        Some(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reasons": reasons, "warnings": warnings})),
        ),
    }
}

async fn status_handler(State(s): State<AppState>) -> impl IntoResponse {
    s.status.refresh(Some(&s.metrics));
    Json(serde_json::json!({
        "process": {
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": s.started_at.to_datetime().map(|t| t.to_rfc3339()),
            "uptime_seconds": s.started.elapsed().as_secs_f64(),
            "listen": s.addr.to_string(),
            "ready": s.status.not_ready().is_none(),
        },
        "nodes": s.status.nodes(),
        "directions": s.status.directions(),
        "warnings": s.status.warnings(),
    }))
}
