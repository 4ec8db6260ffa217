//! The live state of every direction and node, shared by the pipelines and the monitor (which
//! write it) and the HTTP endpoints, the metrics and `walbridge status` (which read it), so
//! `/readyz`, `/status`, `/metrics` and `status` all tell the same story from the same numbers.
//!
//! Lag is derived here, in one place ([`StatusBoard::refresh`]), from facts the others report:
//!
//! ```text
//!   stream worker (every 500 ms)      monitor (every 5 s, per node)
//!     confirmed, received, idle,        current WAL position, slots
//!     last applied commit time          (restart/confirmed LSN, retained WAL)
//!                 \                       /
//!                  ▼                     ▼
//!          lag_bytes   = max(source WAL now, received) - max(confirmed, slot confirmed)
//!          lag_seconds = 0 when caught up, else now - max(last in sync, last applied commit)
//! ```
//!
//! "Caught up" needs evidence, not just an idle applier: the worker must have consumed a
//! keepalive at or past the source's WAL position as the monitor last saw it, so a stream that
//! has only just started (idle, but with a backlog still on the wire) does not count as in
//! sync. While a direction is down its lag keeps growing from the last moment it was known to
//! be in sync, which is what an operator wants an alert on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lsn::{Lsn, PgTimestamp};
use crate::metrics::Metrics;

/// After this long without a report from its worker, a streaming direction no longer counts
/// as caught up (the worker may be stuck on a dead connection).
const OBSERVATION_MAX_AGE: Duration = Duration::from_secs(5);

/// A budget ratio at or above this is a warning (`/readyz` body, logs).
pub const BUDGET_WARN_RATIO: f64 = 0.8;

/// Where a direction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Another instance owns it (see `owner`); this one retries the claim every second or so.
    Standby,
    /// Stopped on a definite error (see `last_error`); needs an operator.
    Failed,
    /// Stopped on request.
    Stopped,
    /// No `walbridge run` is serving this configuration (`walbridge status` without a
    /// process: the numbers come from the databases alone).
    NotRunning,
}

impl DirectionState {
    /// The snake_case word used in JSON and `/readyz` reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            DirectionState::Starting => "starting",
            DirectionState::Connecting => "connecting",
            DirectionState::Streaming => "streaming",
            DirectionState::Reconnecting => "reconnecting",
            DirectionState::Standby => "standby",
            DirectionState::Failed => "failed",
            DirectionState::Stopped => "stopped",
            DirectionState::NotRunning => "not_running",
        }
    }
}

/// One direction's state, as `status --json` prints it (the contract's keys first).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirectionStatus {
    /// Source node.
    pub source: String,
    /// Target node.
    pub target: String,
    /// `stream` or `trigger`.
    pub mode: String,
    /// Why this mode (for `mode = "auto"`).
    #[serde(default)]
    pub mode_reason: Option<String>,
    /// Output plugin (stream mode).
    #[serde(default)]
    pub plugin: Option<String>,
    /// Slot on the source (stream mode).
    #[serde(default)]
    pub slot: Option<String>,
    /// Origin on the target.
    #[serde(default)]
    pub origin: Option<String>,
    /// Last source LSN confirmed as applied and flushed on the target.
    #[serde(default, with = "opt_lsn")]
    pub confirmed_lsn: Option<Lsn>,
    /// Bytes of source WAL not yet confirmed (source's current WAL position minus
    /// `confirmed_lsn`); `None` while one of the two is unknown.
    #[serde(default)]
    pub lag_bytes: Option<u64>,
    /// Seconds the target is behind the source: 0 when caught up, else now minus the later of
    /// the last moment it was in sync and the source commit time of the last applied
    /// transaction; `None` when unknown.
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    /// Lifecycle state.
    pub state: DirectionState,
    /// The last error, kept until the direction streams again.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The instance that holds the direction's claim on the target (`null` while unowned or
    /// not known).
    #[serde(default)]
    pub owner: Option<String>,
    /// This process owns the direction (`walbridge_direction_owned`).
    #[serde(default)]
    pub owned: bool,
    /// Source transactions applied since start.
    #[serde(default)]
    pub transactions_applied: u64,
    /// Highest source WAL position received by the stream.
    #[serde(default, with = "opt_lsn")]
    pub received_lsn: Option<Lsn>,
    /// End of the last transaction applied on the target according to its replication origin
    /// (`walbridge status` reads it from the target).
    #[serde(default, with = "opt_lsn")]
    pub applied_lsn: Option<Lsn>,
    /// Source commit time of the last transaction applied since start (RFC 3339).
    #[serde(default, with = "opt_ts")]
    pub last_applied_commit_time: Option<PgTimestamp>,
    /// Last moment the target was known to have everything the source had committed.
    #[serde(default, with = "opt_ts")]
    pub in_sync_at: Option<PgTimestamp>,
    /// Tables with changes parked on the target (`replication.on_schema_mismatch = "park"`):
    /// `schema.table` -> changes waiting in `walbridge.parked` (`walbridge status` reads it
    /// from the target).
    #[serde(default)]
    pub parked: std::collections::BTreeMap<String, i64>,
    /// The stream's applier had nothing open or in flight at the last report.
    #[serde(skip)]
    idle: bool,
    /// WAL end of the last keepalive the worker consumed.
    #[serde(skip)]
    keepalive_lsn: Lsn,
    /// Wall time of the worker's last report while streaming: while the direction is down
    /// and nothing better is known, it has been behind at least since then.
    #[serde(skip)]
    last_streaming_at: Option<PgTimestamp>,
    /// When the worker last reported.
    #[serde(skip)]
    observed_at: Option<Instant>,
}

impl DirectionStatus {
    /// A direction nobody has reported on yet.
    pub fn new(source: &str, target: &str) -> Self {
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
            owner: None,
            owned: false,
            transactions_applied: 0,
            received_lsn: None,
            applied_lsn: None,
            parked: std::collections::BTreeMap::new(),
            last_applied_commit_time: None,
            in_sync_at: None,
            idle: false,
            keepalive_lsn: Lsn::ZERO,
            observed_at: None,
            last_streaming_at: None,
        }
    }

    fn observation_fresh(&self) -> bool {
        self.observed_at
            .is_some_and(|at| at.elapsed() <= OBSERVATION_MAX_AGE)
    }
}

/// What a stream worker knows about its progress, reported on every tick.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    /// Durable progress on the target, as confirmed to the source.
    pub confirmed: Lsn,
    /// Highest source WAL position received (XLogData or keepalive).
    pub received: Lsn,
    /// WAL end of the last keepalive the worker consumed: everything before it has been
    /// handed to the applier.
    pub keepalive: Lsn,
    /// Nothing open or in flight on the target.
    pub idle: bool,
    /// Source commit time of the last transaction the target acknowledged.
    pub last_commit_time: Option<PgTimestamp>,
    /// Transactions applied since start.
    pub transactions_applied: u64,
}

/// One slot's numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlotStatus {
    /// Slot name.
    pub name: String,
    /// WAL it retains (the node's current WAL position minus the slot's `restart_lsn`).
    #[serde(default)]
    pub retained_wal_bytes: Option<u64>,
    /// A walsender uses it.
    pub active: bool,
    /// The peer whose confirmations move this slot (the target of its direction), when the
    /// slot belongs to a configured direction.
    #[serde(default)]
    pub peer: Option<String>,
    /// The slot's `confirmed_flush_lsn`.
    #[serde(default, with = "opt_lsn")]
    pub confirmed_flush_lsn: Option<Lsn>,
    /// PostgreSQL's `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    #[serde(default)]
    pub wal_status: Option<String>,
    /// Retained WAL divided by `max_retained_wal`.
    #[serde(default)]
    pub budget_ratio: Option<f64>,
    /// Retained WAL growth in bytes per second over the last minute or so.
    #[serde(default)]
    pub growth_bytes_per_second: Option<f64>,
    /// At the current growth rate, seconds until the retained WAL reaches
    /// `max_retained_wal` (0 when already there, `None` when not growing).
    #[serde(default)]
    pub seconds_until_budget: Option<f64>,
}

/// One node's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Answered the last probe.
    pub reachable: bool,
    /// `stream` or `trigger` (as a source).
    pub mode: String,
    /// walbridge's slots on it.
    #[serde(default)]
    pub slots: Vec<SlotStatus>,
    /// Trigger mode: rows waiting in its change table.
    #[serde(default)]
    pub trigger_queue_depth: Option<i64>,
    /// Its current WAL position (`pg_current_wal_lsn()`) at the last probe.
    #[serde(default, with = "opt_lsn")]
    pub current_wal_lsn: Option<Lsn>,
    /// Why the last probe failed (never a password).
    #[serde(default)]
    pub error: Option<String>,
    /// When it was last probed (RFC 3339).
    #[serde(default, with = "opt_ts")]
    pub checked_at: Option<PgTimestamp>,
}

impl NodeStatus {
    /// A node nobody has probed yet.
    pub fn new(name: &str) -> Self {
        NodeStatus {
            name: name.to_string(),
            reachable: false,
            mode: String::new(),
            slots: Vec::new(),
            trigger_queue_depth: None,
            current_wal_lsn: None,
            error: None,
            checked_at: None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    directions: BTreeMap<(String, String), DirectionStatus>,
    nodes: BTreeMap<String, NodeStatus>,
    order: Vec<(String, String)>,
    node_order: Vec<String>,
    budget: u64,
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
            inner.nodes.insert(n.to_string(), NodeStatus::new(n));
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

    /// Sets `max_retained_wal` (bytes; 0 = no budget), for the over-budget readiness check.
    pub fn set_wal_budget(&self, bytes: u64) {
        self.lock().budget = bytes;
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

    /// Records a stream worker's progress report, and whether it proves the direction in
    /// sync (idle, having consumed a keepalive at or past the source's WAL position as last
    /// seen by the monitor).
    pub fn observe(&self, source: &str, target: &str, o: Observation) {
        let mut inner = self.lock();
        let source_wal = inner.nodes.get(source).and_then(|n| n.current_wal_lsn);
        let entry = inner
            .directions
            .entry((source.to_string(), target.to_string()))
            .or_insert_with(|| DirectionStatus::new(source, target));
        entry.confirmed_lsn = Some(entry.confirmed_lsn.unwrap_or(Lsn::ZERO).max(o.confirmed));
        entry.received_lsn = Some(entry.received_lsn.unwrap_or(Lsn::ZERO).max(o.received));
        entry.keepalive_lsn = o.keepalive;
        entry.idle = o.idle;
        if o.last_commit_time.is_some() {
            entry.last_applied_commit_time = o.last_commit_time;
        }
        entry.transactions_applied = o.transactions_applied;
        entry.observed_at = Some(Instant::now());
        entry.last_streaming_at = Some(PgTimestamp::now());
        if caught_up(entry, source_wal) {
            entry.in_sync_at = Some(PgTimestamp::now());
        }
    }

    /// Changes one node's status.
    pub fn node(&self, name: &str, f: impl FnOnce(&mut NodeStatus)) {
        let mut inner = self.lock();
        let entry = inner
            .nodes
            .entry(name.to_string())
            .or_insert_with(|| NodeStatus::new(name));
        f(entry);
    }

    /// Recomputes every direction's lag from the latest reports and, with `metrics`, sets
    /// `walbridge_replication_lag_bytes` / `_seconds` to the same numbers and
    /// `walbridge_direction_up` to the state.
    pub fn refresh(&self, metrics: Option<&Metrics>) {
        let now = PgTimestamp::now();
        let mut inner = self.lock();
        let Inner {
            directions, nodes, ..
        } = &mut *inner;
        for d in directions.values_mut() {
            derive_lag(d, nodes.get(&d.source), now);
            if let Some(m) = metrics {
                let labels = [d.source.as_str(), d.target.as_str()];
                // Unknown lag exports 0: the direction-state alerts cover a direction that
                // never connected.
                m.lag_bytes.with_label_values(&labels).set(
                    d.lag_bytes
                        .map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
                );
                m.lag_seconds
                    .with_label_values(&labels)
                    .set(d.lag_seconds.unwrap_or(0.0));
                m.direction_up
                    .with_label_values(&labels)
                    .set(i64::from(d.state == DirectionState::Streaming));
                m.direction_owned
                    .with_label_values(&labels)
                    .set(i64::from(d.owned));
            }
        }
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

    /// `None` when every direction streams (or is on standby: another instance owns it),
    /// every probed node answers and no slot is over its WAL budget; otherwise why not, one
    /// sentence each.
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let mut reasons: Vec<String> = self
            .directions()
            .into_iter()
            .filter(|d| !matches!(d.state, DirectionState::Streaming | DirectionState::Standby))
            .map(|d| {
                format!(
                    "{} -> {} is {}{}",
                    d.source,
                    d.target,
                    d.state.as_str(),
                    d.last_error.map(|e| format!(": {e}")).unwrap_or_default()
                )
            })
            .collect();
        for n in self.nodes() {
            if !n.reachable && n.checked_at.is_some() {
                reasons.push(format!(
                    "node {} is unreachable{}",
                    n.name,
                    n.error.map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
            for s in &n.slots {
                if s.budget_ratio.is_some_and(|r| r >= 1.0) {
                    reasons.push(slot_sentence(&n.name, s, self.lock().budget));
                }
            }
        }
        (!reasons.is_empty()).then_some(reasons)
    }

    /// Slots at or above 80 % of their WAL budget but not over it, one sentence each.
    pub fn warnings(&self) -> Vec<String> {
        let budget = self.lock().budget;
        let mut out = Vec::new();
        for n in self.nodes() {
            for s in &n.slots {
                if s.budget_ratio
                    .is_some_and(|r| (BUDGET_WARN_RATIO..1.0).contains(&r))
                {
                    out.push(slot_sentence(&n.name, s, budget));
                }
            }
        }
        out
    }
}

/// "slot X on node retains 85 % of max_retained_wal (6.8 GB of 8 GB): peer is not confirming".
pub fn slot_sentence(node: &str, s: &SlotStatus, budget: u64) -> String {
    let retained = s.retained_wal_bytes.unwrap_or(0);
    let percent = s.budget_ratio.unwrap_or(0.0) * 100.0;
    let peer = s.peer.as_deref().map_or_else(
        || "no configured peer (a leftover slot? drop it or run walbridge teardown)".to_string(),
        |p| format!("{p} is not confirming (down, stopped or far behind)"),
    );
    let mut text = format!(
        "slot {} on {node} retains {percent:.0}% of max_retained_wal ({} of {}): {peer}",
        s.name,
        human_bytes(retained),
        human_bytes(budget)
    );
    if let Some(secs) = s.seconds_until_budget.filter(|v| *v > 0.0) {
        text.push_str(&format!(
            "; the budget is reached in about {} at the current rate",
            format_seconds(secs)
        ));
    }
    text
}

/// A duration for people: `45s`, `12m`, `3h20m`, `2d4h`.
pub fn format_seconds(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Bytes for people: `0 B`, `812 B`, `1.2 MB`, `8.0 GB` (powers of 1024).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

fn caught_up(d: &DirectionStatus, source_wal: Option<Lsn>) -> bool {
    if d.state != DirectionState::Streaming || !d.idle || !d.observation_fresh() {
        return false;
    }
    match source_wal {
        Some(wal) => d.keepalive_lsn >= wal,
        // Before the monitor's first look at the source: a consumed keepalive is the best
        // evidence available.
        None => !d.keepalive_lsn.is_zero(),
    }
}

fn derive_lag(d: &mut DirectionStatus, source: Option<&NodeStatus>, now: PgTimestamp) {
    let slot = source.and_then(|n| {
        n.slots
            .iter()
            .find(|s| d.slot.as_deref() == Some(s.name.as_str()))
    });
    let confirmed = max_opt(d.confirmed_lsn, slot.and_then(|s| s.confirmed_flush_lsn));
    d.confirmed_lsn = confirmed;
    let head = max_opt(source.and_then(|n| n.current_wal_lsn), d.received_lsn);
    d.lag_bytes = match (confirmed, head) {
        (Some(c), Some(h)) => Some(c.bytes_until(h)),
        _ => None,
    };
    if caught_up(d, source.and_then(|n| n.current_wal_lsn)) {
        d.in_sync_at = Some(now);
        d.lag_seconds = Some(0.0);
        return;
    }
    if d.lag_bytes == Some(0) {
        d.lag_seconds = Some(0.0);
        return;
    }
    let mut anchor = max_opt(d.in_sync_at, d.last_applied_commit_time);
    if anchor.is_none()
        && d.state != DirectionState::Streaming
        && d.lag_bytes.is_some_and(|b| b > 0)
    {
        anchor = d.last_streaming_at;
    }
    d.lag_seconds = anchor.map(|a| a.seconds_until(now).max(0.0));
}

fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// `Option<Lsn>` as `"0/16B3748"` or null.
mod opt_lsn {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::lsn::Lsn;

    pub fn serialize<S: Serializer>(v: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(l) => s.collect_str(l),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Lsn>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// `Option<PgTimestamp>` as RFC 3339 or null.
mod opt_ts {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::lsn::PgTimestamp;

    pub fn serialize<S: Serializer>(v: &Option<PgTimestamp>, s: S) -> Result<S::Ok, S::Error> {
        match v.and_then(|t| t.to_datetime()) {
            Some(t) => s.collect_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PgTimestamp>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        Ok(text.and_then(|t| PgTimestamp::parse(&t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board() -> StatusBoard {
        let b = StatusBoard::new(["a", "b"], [("a", "b"), ("b", "a")]);
        b.direction("a", "b", |d| {
            d.slot = Some("walbridge_a_to_b".into());
            d.state = DirectionState::Streaming;
        });
        b
    }

    fn obs(confirmed: u64, keepalive: u64, idle: bool) -> Observation {
        Observation {
            confirmed: Lsn(confirmed),
            received: Lsn(keepalive),
            keepalive: Lsn(keepalive),
            idle,
            last_commit_time: None,
            transactions_applied: 0,
        }
    }

    fn get(b: &StatusBoard, s: &str, t: &str) -> DirectionStatus {
        b.directions()
            .into_iter()
            .find(|d| d.source == s && d.target == t)
            .unwrap()
    }

    #[test]
    fn caught_up_needs_a_keepalive_past_the_source_position() {
        let b = board();
        b.node("a", |n| n.current_wal_lsn = Some(Lsn(1000)));
        // Idle, but the stream has not yet shown it reached the source's position.
        b.observe("a", "b", obs(500, 500, true));
        b.refresh(None);
        let d = get(&b, "a", "b");
        assert_eq!(d.lag_bytes, Some(500));
        assert_eq!(d.lag_seconds, None, "no anchor yet, so unknown");
        b.observe("a", "b", obs(1000, 1000, true));
        b.refresh(None);
        let d = get(&b, "a", "b");
        assert_eq!(d.lag_bytes, Some(0));
        assert_eq!(d.lag_seconds, Some(0.0));
        assert!(d.in_sync_at.is_some());
    }

    #[test]
    fn lag_seconds_grows_from_the_last_moment_in_sync_while_down() {
        let b = board();
        b.node("a", |n| n.current_wal_lsn = Some(Lsn(1000)));
        b.observe("a", "b", obs(1000, 1000, true));
        b.refresh(None);
        b.direction("a", "b", |d| {
            d.state = DirectionState::Reconnecting;
            d.in_sync_at = Some(PgTimestamp(PgTimestamp::now().0 - 90_000_000));
        });
        b.node("a", |n| n.current_wal_lsn = Some(Lsn(5000)));
        b.refresh(None);
        let d = get(&b, "a", "b");
        assert_eq!(d.lag_bytes, Some(4000));
        let lag = d.lag_seconds.unwrap();
        assert!((89.0..120.0).contains(&lag), "{lag}");
    }

    #[test]
    fn lag_seconds_is_known_while_down_even_if_never_seen_in_sync() {
        let b = board();
        b.node("a", |n| n.current_wal_lsn = Some(Lsn(1000)));
        // Streaming, but no keepalive proved it caught up, and nothing applied yet.
        b.observe("a", "b", obs(500, 0, true));
        b.direction("a", "b", |d| d.state = DirectionState::Reconnecting);
        b.node("a", |n| n.current_wal_lsn = Some(Lsn(9000)));
        b.refresh(None);
        let d = get(&b, "a", "b");
        assert!(d.lag_bytes.is_some_and(|l| l > 0));
        assert!(
            d.lag_seconds.is_some(),
            "lag in seconds must not read as unknown/0 while down"
        );
    }

    #[test]
    fn busy_lag_follows_the_last_applied_commit() {
        let b = board();
        b.node("a", |n| n.current_wal_lsn = Some(Lsn(9000)));
        let mut o = obs(1000, 0, false);
        o.last_commit_time = Some(PgTimestamp(PgTimestamp::now().0 - 3_000_000));
        b.observe("a", "b", o);
        b.refresh(None);
        let lag = get(&b, "a", "b").lag_seconds.unwrap();
        assert!((2.9..10.0).contains(&lag), "{lag}");
    }

    #[test]
    fn slot_confirmation_counts_when_the_stream_has_not_reported() {
        let b = board();
        b.node("a", |n| {
            n.current_wal_lsn = Some(Lsn(3000));
            n.slots.push(SlotStatus {
                name: "walbridge_a_to_b".into(),
                retained_wal_bytes: Some(10),
                active: false,
                peer: Some("b".into()),
                confirmed_flush_lsn: Some(Lsn(2000)),
                wal_status: None,
                budget_ratio: Some(1.5),
                growth_bytes_per_second: None,
                seconds_until_budget: Some(0.0),
            });
            n.reachable = true;
            n.checked_at = Some(PgTimestamp::now());
        });
        let m = Metrics::new();
        b.refresh(Some(&m));
        assert_eq!(get(&b, "a", "b").lag_bytes, Some(1000));
        assert_eq!(m.lag_bytes.with_label_values(&["a", "b"]).get(), 1000);
        let reasons = b.not_ready().unwrap();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("walbridge_a_to_b on a") && r.contains("b is not confirming")),
            "{reasons:?}"
        );
    }

    #[test]
    fn json_round_trip_keeps_the_contract_keys() {
        let b = board();
        b.observe("a", "b", obs(0x16B3748, 0x16B3748, true));
        let json = serde_json::to_value(b.directions()).unwrap();
        let first = &json[0];
        for key in [
            "source",
            "target",
            "mode",
            "plugin",
            "slot",
            "origin",
            "confirmed_lsn",
            "lag_bytes",
            "lag_seconds",
            "state",
            "last_error",
        ] {
            assert!(first.get(key).is_some(), "missing {key}: {first}");
        }
        assert_eq!(first["confirmed_lsn"], "0/16B3748");
        let back: Vec<DirectionStatus> = serde_json::from_value(json).unwrap();
        assert_eq!(back[0].confirmed_lsn, Some(Lsn(0x16B3748)));
        assert_eq!(back[0].state, DirectionState::Streaming);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_seconds(42.4), "42s");
        assert_eq!(format_seconds(200.0), "3m20s");
        assert_eq!(format_seconds(7_500.0), "2h05m");
        assert_eq!(format_seconds(190_000.0), "2d04h");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(8 << 30), "8.0 GB");
    }
}
