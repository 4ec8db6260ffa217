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

impl ErrorClass {
    /// The class of a server error from its SQLSTATE: the one rule
    /// ([`crate::protocol::sqlstate_is_transient`]: connection exceptions, shutdown and
    /// restart, resource shortages, serialization failures and deadlocks, lock timeouts,
    /// read-only, cancelled statements are transient; the rest is definite).
    pub fn of_sqlstate(code: &str) -> Self {
        Self::transient_if(crate::protocol::sqlstate_is_transient(code))
    }

    fn transient_if(transient: bool) -> Self {
        if transient {
            ErrorClass::Transient
        } else {
            ErrorClass::Definite
        }
    }
}

/// An error whose class is decided once, from the SQLSTATE the server sent or the kind of
/// I/O failure, never from its text. Build a [`DirectionError`] from it with
/// [`DirectionError::caused_by`].
pub trait Classify {
    /// Retry or stop.
    fn class(&self) -> ErrorClass;
}

impl Classify for tokio_postgres::Error {
    fn class(&self) -> ErrorClass {
        ErrorClass::transient_if(crate::pgconn::is_transient(self))
    }
}

impl Classify for crate::protocol::ServerError {
    fn class(&self) -> ErrorClass {
        ErrorClass::of_sqlstate(&self.code)
    }
}

impl Classify for crate::protocol::ProtocolError {
    fn class(&self) -> ErrorClass {
        ErrorClass::transient_if(self.is_transient())
    }
}

impl Classify for crate::pgconn::ConnectError {
    fn class(&self) -> ErrorClass {
        ErrorClass::transient_if(self.is_transient())
    }
}

impl Classify for crate::pgconn::NodeError {
    fn class(&self) -> ErrorClass {
        match self {
            crate::pgconn::NodeError::Connect { source, .. } => source.class(),
            crate::pgconn::NodeError::Sql { source, .. } => source.class(),
            crate::pgconn::NodeError::Catalog { source, .. } => source.class(),
            crate::pgconn::NodeError::Replication { source, .. } => source.class(),
        }
    }
}

impl Classify for crate::catalog::CatalogError {
    fn class(&self) -> ErrorClass {
        self.0.class()
    }
}

/// Why a direction's worker stopped.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct DirectionError {
    /// Retry or stop.
    pub class: ErrorClass,
    /// What happened and what to do, naming the node/table.
    pub message: String,
    /// End LSN of the one source transaction that failed, when the failure is tied to one
    /// (recorded with the stop, so `walbridge skip` can move past exactly that transaction).
    pub transaction_end: Option<crate::lsn::Lsn>,
    /// The one change the server refused, when the applier could tell which (a source whose
    /// changes have ids of their own, trigger mode's change rows): that source may set the
    /// change aside and go on with the rest.
    pub failed_change: Option<FailedChange>,
}

/// A change the target refused, located by applying its transaction change by change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedChange {
    /// [`crate::event::Change::source_change_id`] of the refused change.
    pub source_change_id: i64,
    /// The server's SQLSTATE: whether the data (a bad value, a constraint) or the target as
    /// a whole (permissions, disk) is at fault is the source's to decide from it.
    pub sqlstate: String,
    /// The server's words with row values kept, for storing next to the row it is about
    /// (trigger mode's dead-letter table), never for logs.
    pub stored_text: String,
}

impl DirectionError {
    /// A transient failure.
    pub fn transient(message: impl Into<String>) -> Self {
        DirectionError {
            class: ErrorClass::Transient,
            message: message.into(),
            transaction_end: None,
            failed_change: None,
        }
    }

    /// A definite failure.
    pub fn definite(message: impl Into<String>) -> Self {
        DirectionError {
            class: ErrorClass::Definite,
            message: message.into(),
            transaction_end: None,
            failed_change: None,
        }
    }

    /// A failure worded by `message`, classed by its cause (see [`Classify`]).
    pub fn caused_by(message: impl Into<String>, cause: &impl Classify) -> Self {
        DirectionError {
            class: cause.class(),
            message: message.into(),
            transaction_end: None,
            failed_change: None,
        }
    }

    /// The same error, tied to the source transaction ending at `end` (kept if already tied).
    pub fn at_transaction(mut self, end: crate::lsn::Lsn) -> Self {
        self.transaction_end.get_or_insert(end);
        self
    }

    /// The same error, naming the change the target refused.
    pub fn with_failed_change(mut self, failed: FailedChange) -> Self {
        self.failed_change = Some(failed);
        self
    }

    /// True when retrying may help.
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_are_classed_by_sqlstate_alone() {
        let class = |code: &str| {
            crate::protocol::ServerError {
                code: code.into(),
                message: "words that must not matter: connection, does not exist".into(),
                ..Default::default()
            }
            .class()
        };
        for code in [
            "57P01", "57P02", "57P03", "08006", "08001", "40001", "40P01", "53300", "55P03",
            "25006", "57014",
        ] {
            assert_eq!(class(code), ErrorClass::Transient, "{code}");
        }
        for code in [
            "42P01", "42703", "22P02", "23505", "28P01", "XX000", "WB001",
        ] {
            assert_eq!(class(code), ErrorClass::Definite, "{code}");
        }
        let e = DirectionError::caused_by(
            "node b: reading the catalog",
            &crate::protocol::ServerError {
                code: "57P01".into(),
                ..Default::default()
            },
        );
        assert!(e.is_transient());
        assert_eq!(e.to_string(), "node b: reading the catalog");
    }
}
