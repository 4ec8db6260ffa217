//! Prometheus metrics: every name and label of the contract, registered once.
//!
//! The standard process metrics (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! ...) come from the `prometheus` crate's process collector, in the same registry.
//!
//! Labels come from small fixed sets (node, direction, table, kind), never from row keys, so
//! cardinality stays bounded by the configuration. Counters whose labels are known at start are
//! exported at 0 from the start ([`Metrics::register_topology`]).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Metric names, as in the contract.
pub mod names {
    /// Row changes applied on a target.
    pub const CHANGES_APPLIED: &str = "walbridge_changes_applied_total";
    /// Source transactions applied on a target.
    pub const TRANSACTIONS_APPLIED: &str = "walbridge_transactions_applied_total";
    /// Transactions dropped because they arrived by replication (echo suppression).
    pub const ECHO_SUPPRESSED: &str = "walbridge_echo_suppressed_total";
    /// Conflicts detected and how they were resolved.
    pub const CONFLICTS: &str = "walbridge_conflicts_total";
    /// Seconds between a source commit and its apply on the target.
    pub const LAG_SECONDS: &str = "walbridge_replication_lag_seconds";
    /// Bytes of source WAL the target has not confirmed.
    pub const LAG_BYTES: &str = "walbridge_replication_lag_bytes";
    /// Time to apply one transaction.
    pub const APPLY_DURATION: &str = "walbridge_apply_duration_seconds";
    /// WAL a slot keeps from being removed.
    pub const SLOT_RETAINED_WAL: &str = "walbridge_slot_retained_wal_bytes";
    /// Retained WAL as a fraction of `max_retained_wal`.
    pub const SLOT_WAL_BUDGET_RATIO: &str = "walbridge_slot_wal_budget_ratio";
    /// 1 when the node answers, 0 otherwise.
    pub const NODE_UP: &str = "walbridge_node_up";
    /// Reconnections per direction.
    pub const RECONNECTS: &str = "walbridge_reconnects_total";
    /// Errors per direction and kind.
    pub const ERRORS: &str = "walbridge_errors_total";
    /// 1 while a direction is connected and streaming, else 0 (what `/readyz` checks).
    pub const DIRECTION_UP: &str = "walbridge_direction_up";
    /// 1 in the instance that owns the direction, 0 in the others.
    pub const DIRECTION_OWNED: &str = "walbridge_direction_owned";
    /// Rows waiting in a trigger-mode change table.
    pub const TRIGGER_QUEUE_DEPTH: &str = "walbridge_trigger_queue_depth";
    /// Trigger-mode rows moved to the dead-letter table.
    pub const TRIGGER_DEAD_ROWS: &str = "walbridge_trigger_dead_rows_total";
    /// A node's clock minus the median of all nodes' clocks.
    pub const CLOCK_SKEW: &str = "walbridge_clock_skew_seconds";
    /// Last-write-wins conflicts decided by less than the measured clock skew.
    pub const CONFLICTS_AMBIGUOUS: &str = "walbridge_conflicts_ambiguous_total";
    /// Changes kept in `walbridge.parked` on the target until its schema fits.
    pub const PARKED_CHANGES: &str = "walbridge_parked_changes";
}

/// Every metric walbridge exports, in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `walbridge_changes_applied_total{source,target,table,op}`.
    pub changes_applied: IntCounterVec,
    /// `walbridge_transactions_applied_total{source,target}`.
    pub transactions_applied: IntCounterVec,
    /// `walbridge_echo_suppressed_total{node}`.
    pub echo_suppressed: IntCounterVec,
    /// `walbridge_conflicts_total{source,target,kind,resolution}`.
    pub conflicts: IntCounterVec,
    /// `walbridge_replication_lag_seconds{source,target}`.
    pub lag_seconds: GaugeVec,
    /// `walbridge_replication_lag_bytes{source,target}`.
    pub lag_bytes: IntGaugeVec,
    /// `walbridge_apply_duration_seconds{source,target}`.
    pub apply_duration: HistogramVec,
    /// `walbridge_slot_retained_wal_bytes{node,slot}`.
    pub slot_retained_wal: IntGaugeVec,
    /// `walbridge_slot_wal_budget_ratio{node,slot}`.
    pub slot_wal_budget_ratio: GaugeVec,
    /// `walbridge_node_up{node}`.
    pub node_up: IntGaugeVec,
    /// `walbridge_reconnects_total{source,target}`.
    pub reconnects: IntCounterVec,
    /// `walbridge_errors_total{source,target,kind}`.
    pub errors: IntCounterVec,
    /// `walbridge_direction_up{source,target}`.
    pub direction_up: IntGaugeVec,
    /// `walbridge_direction_owned{source,target}`.
    pub direction_owned: IntGaugeVec,
    /// `walbridge_trigger_queue_depth{node}`.
    pub trigger_queue_depth: IntGaugeVec,
    /// `walbridge_trigger_dead_rows_total{node}`.
    pub trigger_dead_rows: IntCounterVec,
    /// `walbridge_clock_skew_seconds{node}`.
    pub clock_skew: GaugeVec,
    /// `walbridge_conflicts_ambiguous_total{source,target}`.
    pub conflicts_ambiguous: IntCounterVec,
    /// `walbridge_parked_changes{source,target,table}`.
    pub parked_changes: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric definitions are static and valid");
            registry
                .register(Box::new(c.clone()))
                .expect("each metric is registered once");
            c
        };
        let int_gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)
                .expect("metric definitions are static and valid");
            registry
                .register(Box::new(g.clone()))
                .expect("each metric is registered once");
            g
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels)
                .expect("metric definitions are static and valid");
            registry
                .register(Box::new(g.clone()))
                .expect("each metric is registered once");
            g
        };
        use names::*;
        let changes_applied = counter(
            CHANGES_APPLIED,
            "Row changes applied on the target.",
            &["source", "target", "table", "op"],
        );
        let transactions_applied = counter(
            TRANSACTIONS_APPLIED,
            "Source transactions applied on the target.",
            &["source", "target"],
        );
        let echo_suppressed = counter(
            ECHO_SUPPRESSED,
            "Transactions read from a node and dropped because they arrived there by replication.",
            &["node"],
        );
        let conflicts = counter(
            CONFLICTS,
            "Conflicts detected on the target, by kind and resolution.",
            &["source", "target", "kind", "resolution"],
        );
        let lag_seconds = gauge(
            LAG_SECONDS,
            "Seconds between the source commit of the last applied transaction and now, 0 when caught up.",
            &["source", "target"],
        );
        let lag_bytes = int_gauge(
            LAG_BYTES,
            "Bytes of source WAL not yet confirmed as applied on the target.",
            &["source", "target"],
        );
        let apply_duration = HistogramVec::new(
            HistogramOpts::new(
                APPLY_DURATION,
                "Time from a transaction's begin to its commit on the target.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["source", "target"],
        )
        .expect("metric definitions are static and valid");
        registry
            .register(Box::new(apply_duration.clone()))
            .expect("each metric is registered once");
        let slot_retained_wal = int_gauge(
            SLOT_RETAINED_WAL,
            "WAL bytes the slot keeps from removal (current WAL position minus restart_lsn).",
            &["node", "slot"],
        );
        let slot_wal_budget_ratio = gauge(
            SLOT_WAL_BUDGET_RATIO,
            "Retained WAL of the slot divided by replication.max_retained_wal.",
            &["node", "slot"],
        );
        let node_up = int_gauge(
            NODE_UP,
            "1 when walbridge can reach the node, else 0.",
            &["node"],
        );
        let reconnects = counter(
            RECONNECTS,
            "Times a direction reconnected after losing a node.",
            &["source", "target"],
        );
        let errors = counter(
            ERRORS,
            "Errors that interrupted a direction, by kind: transient (connection lost, node \
             restarting; retried with backoff) or definite (the direction stopped; see \
             walbridge status).",
            &["source", "target", "kind"],
        );
        let direction_up = int_gauge(
            DIRECTION_UP,
            "1 while the direction is connected and streaming, else 0.",
            &["source", "target"],
        );
        let direction_owned = int_gauge(
            DIRECTION_OWNED,
            "1 in the walbridge instance that owns the direction (holds its claim on the \
             target), 0 in the others; the sum over instances is 1 per owned direction.",
            &["source", "target"],
        );
        let trigger_queue_depth = int_gauge(
            TRIGGER_QUEUE_DEPTH,
            "Rows waiting in the node's trigger-mode change table.",
            &["node"],
        );
        let trigger_dead_rows = counter(
            TRIGGER_DEAD_ROWS,
            "Trigger-mode change rows that could not be applied and moved to the dead-letter table.",
            &["node"],
        );
        // The standard process metrics (`process_cpu_seconds_total`,
        // `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
        // `process_open_fds`, `process_max_fds`, `process_start_time_seconds`,
        // `process_threads`), read from /proc at each scrape.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("the process collector is registered once");
        let clock_skew = gauge(
            CLOCK_SKEW,
            "The node's clock minus the median of all nodes' clocks (round-trip corrected), sampled every 5 s.",
            &["node"],
        );
        let conflicts_ambiguous = counter(
            CONFLICTS_AMBIGUOUS,
            "Last-write-wins conflicts decided by a commit-time difference smaller than the measured clock skew between the writers.",
            &["source", "target"],
        );
        let parked_changes = int_gauge(
            PARKED_CHANGES,
            "Changes of the table kept in walbridge.parked on the target (replication.on_schema_mismatch = park) until the target's schema fits.",
            &["source", "target", "table"],
        );
        Metrics {
            registry,
            changes_applied,
            transactions_applied,
            echo_suppressed,
            conflicts,
            lag_seconds,
            lag_bytes,
            apply_duration,
            slot_retained_wal,
            slot_wal_budget_ratio,
            node_up,
            reconnects,
            errors,
            direction_up,
            direction_owned,
            trigger_queue_depth,
            trigger_dead_rows,
            clock_skew,
            conflicts_ambiguous,
            parked_changes,
        }
    }

    /// Exports the series whose labels are known at start at 0: per direction reconnects,
    /// errors and transactions, lag and up; per node echo suppression and up.
    pub fn register_topology<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a str>,
        directions: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        for node in nodes {
            self.echo_suppressed.with_label_values(&[node]);
            self.node_up.with_label_values(&[node]);
        }
        for (s, t) in directions {
            self.reconnects.with_label_values(&[s, t]);
            self.transactions_applied.with_label_values(&[s, t]);
            self.lag_seconds.with_label_values(&[s, t]);
            self.lag_bytes.with_label_values(&[s, t]);
            self.direction_up.with_label_values(&[s, t]);
            self.direction_owned.with_label_values(&[s, t]);
            for kind in ["transient", "definite"] {
                self.errors.with_label_values(&[s, t, kind]);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_series_exist_at_zero() {
        let m = Metrics::new();
        m.register_topology(["a", "b"], [("a", "b"), ("b", "a")]);
        let text = m.encode();
        assert!(text.contains("walbridge_reconnects_total{source=\"a\",target=\"b\"} 0"));
        assert!(text.contains("walbridge_echo_suppressed_total{node=\"b\"} 0"));
        assert!(text.contains("walbridge_transactions_applied_total{source=\"b\",target=\"a\"} 0"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_exported() {
        let text = Metrics::new().encode();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} missing from:\n{text}"
            );
        }
    }
}
