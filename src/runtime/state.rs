//! The live state of every direction and node, shared by the pipelines (which write it) and
//! the HTTP endpoints and metrics (which read it), so `/readyz`, `/status` and the metrics all
//! tell the same story.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::lsn::Lsn;

/// Where a direction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionState {
    /// Not started yet.
    Starting,
    /// Connecting to its nodes.
    Connecting,
    /// Connected and replicating (possibly idle).
    Streaming,
    /// Lost a node; retrying with backoff.
    Reconnecting,
    /// Stopped on a definite error (see `last_error`); needs an operator.
    Failed,
    /// Stopped on request.
    Stopped,
}

/// One direction's state, as `status --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct DirectionStatus {
    /// Source node.
    pub source: String,
    /// Target node.
    pub target: String,
    /// `stream` or `trigger`.
    pub mode: String,
    /// Why this mode (for `mode = "auto"`).
    pub mode_reason: Option<String>,
    /// Output plugin (stream mode).
    pub plugin: Option<String>,
    /// Slot on the source (stream mode).
    pub slot: Option<String>,
    /// Origin on the target.
    pub origin: Option<String>,
    /// Last source LSN confirmed as applied and flushed on the target.
    pub confirmed_lsn: Option<Lsn>,
    /// Bytes of source WAL not yet confirmed.
    pub lag_bytes: Option<u64>,
    /// Seconds behind the source.
    pub lag_seconds: Option<f64>,
    /// Lifecycle state.
    pub state: DirectionState,
    /// The last error, kept until the direction streams again.
    pub last_error: Option<String>,
    /// Source transactions applied since start.
    pub transactions_applied: u64,
}

impl DirectionStatus {
    fn new(source: &str, target: &str) -> Self {
        DirectionStatus {
            source: source.to_string(),
            target: target.to_string(),
            mode: String::new(),
            mode_reason: None,
            plugin: None,
            slot: None,
            origin: None,
            confirmed_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            state: DirectionState::Starting,
            last_error: None,
            transactions_applied: 0,
        }
    }
}

/// One slot's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// WAL it retains.
    pub retained_wal_bytes: Option<u64>,
    /// A walsender uses it.
    pub active: bool,
    /// Retained WAL growth in bytes per second over the last polls (for the time to budget).
    pub growth_bytes_per_second: Option<f64>,
}

/// One node's state.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Answered the last probe.
    pub reachable: bool,
    /// `stream` or `trigger` (as a source).
    pub mode: String,
    /// walbridge's slots on it.
    pub slots: Vec<SlotStatus>,
    /// Trigger mode: rows waiting in its change table.
    pub trigger_queue_depth: Option<i64>,
}

#[derive(Debug, Default)]
struct Inner {
    directions: BTreeMap<(String, String), DirectionStatus>,
    nodes: BTreeMap<String, NodeStatus>,
    order: Vec<(String, String)>,
    node_order: Vec<String>,
}

/// Shared, cheaply cloned; locks are held only for the copy in or out, never across `.await`.
#[derive(Clone, Debug, Default)]
pub struct StatusBoard(Arc<Mutex<Inner>>);

impl StatusBoard {
    /// A board with every node and direction present in `Starting` state.
    pub fn new<'a>(
        nodes: impl IntoIterator<Item = &'a str>,
        directions: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let mut inner = Inner::default();
        for n in nodes {
            inner.node_order.push(n.to_string());
            inner.nodes.insert(
                n.to_string(),
                NodeStatus {
                    name: n.to_string(),
                    reachable: false,
                    mode: String::new(),
                    slots: Vec::new(),
                    trigger_queue_depth: None,
                },
            );
        }
        for (s, t) in directions {
            let key = (s.to_string(), t.to_string());
            inner.order.push(key.clone());
            inner.directions.insert(key, DirectionStatus::new(s, t));
        }
        StatusBoard(Arc::new(Mutex::new(inner)))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes one direction's status.
    pub fn direction(&self, source: &str, target: &str, f: impl FnOnce(&mut DirectionStatus)) {
        let mut inner = self.lock();
        let entry = inner
            .directions
            .entry((source.to_string(), target.to_string()))
            .or_insert_with(|| DirectionStatus::new(source, target));
        f(entry);
    }

    /// Changes one node's status.
    pub fn node(&self, name: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut inner = self.lock();
        let entry = inner
            .nodes
            .entry(name.to_string())
            .or_insert_with(|| NodeStatus {
                name: name.to_string(),
                reachable: false,
                mode: String::new(),
                slots: Vec::new(),
                trigger_queue_depth: None,
            });
        f(entry);
    }

    /// Every direction, in configuration order.
    pub fn directions(&self) -> Vec<DirectionStatus> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter_map(|k| inner.directions.get(k).cloned())
            .collect()
    }

    /// Every node, in configuration order.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let inner = self.lock();
        inner
            .node_order
            .iter()
            .filter_map(|k| inner.nodes.get(k).cloned())
            .collect()
    }

    /// `None` when every direction streams; otherwise why not, per direction.
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let reasons: Vec<String> = self
            .directions()
            .into_iter()
            .filter(|d| d.state != DirectionState::Streaming)
            .map(|d| {
                format!(
                    "{} -> {} is {}{}",
                    d.source,
                    d.target,
                    serde_json::to_value(d.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    d.last_error.map(|e| format!(": {e}")).unwrap_or_default()
                )
            })
            .collect();
        (!reasons.is_empty()).then_some(reasons)
    }
}
