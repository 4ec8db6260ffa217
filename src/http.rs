//! The operator's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process runs),
//! `/readyz` (every direction streams, else 503 with the reasons as JSON) and `/status` (the
//! live status board as JSON, which `walbridge status` reads from a running process).

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::runtime::StatusBoard;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    status: StatusBoard,
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
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_handler))
        .with_state(AppState { metrics, status });
    Ok(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "the metrics server stopped");
        }
    })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.status.not_ready() {
        None => (StatusCode::OK, Json(serde_json::json!({"ready": true}))),
        Some(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reasons": reasons})),
        ),
    }
}

async fn status_handler(State(s): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({
        "nodes": s.status.nodes(),
        "directions": s.status.directions(),
    }))
}
