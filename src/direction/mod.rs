//! The direction contract: what every part that works for one direction (source → target)
//! shares, below the pipeline that does the work and the runtime that supervises it.
//!
//! ```text
//!   runtime ── supervise(ctx) ──▶ stream / trigger worker ── Err(DirectionError) ──▶ runtime
//!                                   │ reports into                                 │ retry (transient)
//!                                   ▼                                              │ or park (definite)
//!                               StatusBoard ◀── monitor (probe) ── status, /readyz ┘
//! ```
//!
//! - [`DirectionContext`]: configuration, metrics, status board, shutdown token and this
//!   instance's share of the directions ([`spread::Fleet`]), handed down by the runtime.
//! - [`DirectionError`] with its [`ErrorClass`]: the runtime reads only the class.
//! - [`state`]: the status board that `walbridge status`, `/readyz` and the workers share.
//! - [`probe`]: node probes; [`prereq`]: the prerequisite checks (wal_level, slots, plugin).
//! - [`claim`] and [`spread`]: which instance owns a direction.

pub mod claim;
pub mod prereq;
pub mod probe;
pub mod spread;
pub mod state;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
pub use state::{DirectionState, DirectionStatus, NodeStatus, SlotStatus, StatusBoard};

/// Everything a direction's worker needs, handed down by the runtime.
#[derive(Clone)]
pub struct DirectionContext {
    /// The whole configuration.
    pub config: Arc<Config>,
    /// Source node name.
    pub source: String,
    /// Target node name.
    pub target: String,
    /// Metrics to count into.
    pub metrics: Metrics,
    /// Live state to report into.
    pub status: StatusBoard,
    /// Cancelled on SIGINT/SIGTERM: finish or abandon the in-flight transaction, then return.
    pub shutdown: CancellationToken,
    /// Server process id of an apply session given up as dead (0: none): the next attempt
    /// ends it on the target, so it cannot keep holding the replication origin.
    pub abandoned_apply_pid: Arc<std::sync::atomic::AtomicI32>,
    /// This instance's share of the directions, and requests to hand one over.
    pub fleet: spread::Fleet,
}

impl DirectionContext {
    /// Updates this direction's entry on the status board.
    pub fn report(&self, f: impl FnOnce(&mut DirectionStatus)) {
        self.status.direction(&self.source, &self.target, f);
    }
}

/// Whether a failure is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connection lost, server restarting, lock held by a previous session: retry with backoff.
    Transient,
    /// Missing column or table, slot gone, conflict under policy `error`, bad data: stop this
    /// direction and tell the operator.
    Definite,
}

/// Why a direction's worker stopped.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct DirectionError {
    /// Retry or stop.
    pub class: ErrorClass,
    /// What happened and what to do, naming the node/table.
    pub message: String,
}

impl DirectionError {
    /// A transient failure.
    pub fn transient(message: impl Into<String>) -> Self {
        DirectionError {
            class: ErrorClass::Transient,
            message: message.into(),
        }
    }

    /// A definite failure.
    pub fn definite(message: impl Into<String>) -> Self {
        DirectionError {
            class: ErrorClass::Definite,
            message: message.into(),
        }
    }

    /// True when retrying may help.
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}
