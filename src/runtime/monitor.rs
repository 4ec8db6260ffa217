//! Watches the nodes on an interval that does not load them (one short catalog query per node
//! every 5 s, all nodes at once, each bounded by a timeout so a hung node delays nobody):
//! reachability (`walbridge_node_up`), the node's current WAL position (the head that lag in
//! bytes is measured against) and, per slot, the WAL it retains against `max_retained_wal`.
//!
//! The WAL guardrail: a slot whose peer stops confirming pins WAL until the disk fills, the
//! classic way logical replication takes a primary down. The monitor exports
//! `walbridge_slot_retained_wal_bytes` and `walbridge_slot_wal_budget_ratio`, warns once when a
//! slot crosses 80 % and again at 100 % naming the peer that holds it back, and estimates from
//! the growth over the last two minutes how long until the budget is reached.
//!
//! The probes themselves live in [`crate::direction::probe`], the same ones `walbridge status`
//! runs when no process is running, so both report the same numbers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, NodeConfig};
use crate::direction::probe::{
    budget_ratio, clock_offset, node_mode, probe_node, seconds_until_budget, skews, slot_peer,
    Probe, INTERVAL, PROBE_TIMEOUT,
};
use crate::direction::state::{
    slot_sentence, NodeStatus, SlotStatus, StatusBoard, BUDGET_WARN_RATIO,
};
use crate::lsn::PgTimestamp;
use crate::metrics::Metrics;

/// Growth of retained WAL is measured over this window.
const GROWTH_WINDOW: Duration = Duration::from_secs(120);

/// Shortest span of samples a growth rate is computed from.
const GROWTH_MIN_SPAN: Duration = Duration::from_secs(9);

/// Per-node memory between polls.
struct Watch {
    client: Option<Client>,
    samples: HashMap<String, VecDeque<(Instant, u64)>>,
    warned: HashMap<String, u8>,
    exported: HashSet<String>,
    lost: HashSet<String>,
    was_up: Option<bool>,
}

/// Polls every node until shutdown.
pub async fn run(
    config: Arc<Config>,
    metrics: Metrics,
    status: StatusBoard,
    shutdown: CancellationToken,
) {
    status.set_wal_budget(config.replication.max_retained_wal);
    let mut watches: Vec<Watch> = config
        .nodes
        .iter()
        .map(|_| Watch {
            client: None,
            samples: HashMap::new(),
            warned: HashMap::new(),
            exported: HashSet::new(),
            lost: HashSet::new(),
            was_up: None,
        })
        .collect();
    loop {
        let polls = config
            .nodes
            .iter()
            .zip(watches.iter_mut())
            .map(|(node, w)| {
                let app = format!("walbridge-monitor-{}", node.name);
                let config = &config;
                async move {
                    let result = probe_node(node, config, &mut w.client, &app).await;
                    let mut offset = None;
                    if let (Ok(_), Some(c)) = (&result, w.client.as_ref()) {
                        offset = tokio::time::timeout(PROBE_TIMEOUT, clock_offset(c))
                            .await
                            .ok()
                            .and_then(Result::ok);
                    }
                    (node, w, result, offset)
                }
            });
        let mut offsets = Vec::new();
        for (node, watch, result, offset) in futures::future::join_all(polls).await {
            record(&config, &metrics, &status, node, watch, result);
            if let Some(o) = offset {
                offsets.push((node.name.as_str(), o));
            }
        }
        for (node, skew) in skews(&offsets) {
            metrics.clock_skew.with_label_values(&[node]).set(skew);
        }
        status.refresh(Some(&metrics));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

/// Turns one probe into metrics, board entries and guardrail warnings.
fn record(
    config: &Config,
    metrics: &Metrics,
    status: &StatusBoard,
    node: &NodeConfig,
    w: &mut Watch,
    result: Result<Probe, String>,
) {
    let name = node.name.as_str();
    let now = PgTimestamp::now();
    metrics
        .node_up
        .with_label_values(&[name])
        .set(i64::from(result.is_ok()));
    let probe = match result {
        Ok(p) => p,
        Err(error) => {
            if w.was_up != Some(false) {
                warn!(node = %name, %error, "node is unreachable");
            }
            w.was_up = Some(false);
            status.node(name, |n| {
                n.reachable = false;
                n.error = Some(error);
                n.checked_at = Some(now);
            });
            return;
        }
    };
    if w.was_up == Some(false) {
        info!(node = %name, "node is reachable again");
    }
    w.was_up = Some(true);
    let budget = config.replication.max_retained_wal;
    let mut slots = Vec::new();
    let mut seen = HashSet::new();
    for s in &probe.slots {
        seen.insert(s.name.clone());
        let peer = slot_peer(config, name, &s.name);
        let mut slot = SlotStatus {
            name: s.name.clone(),
            retained_wal_bytes: s.retained_wal_bytes,
            active: s.active,
            peer,
            confirmed_flush_lsn: s.confirmed_flush_lsn,
            wal_status: s.wal_status.clone(),
            budget_ratio: None,
            growth_bytes_per_second: None,
            seconds_until_budget: None,
        };
        if let Some(bytes) = s.retained_wal_bytes {
            let labels = [name, s.name.as_str()];
            metrics
                .slot_retained_wal
                .with_label_values(&labels)
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            slot.budget_ratio = budget_ratio(bytes, budget);
            metrics
                .slot_wal_budget_ratio
                .with_label_values(&labels)
                .set(slot.budget_ratio.unwrap_or(0.0));
            slot.growth_bytes_per_second =
                growth(w.samples.entry(s.name.clone()).or_default(), bytes);
            slot.seconds_until_budget =
                seconds_until_budget(bytes, budget, slot.growth_bytes_per_second);
        }
        guardrail(
            name,
            &slot,
            budget,
            w.warned.entry(s.name.clone()).or_default(),
        );
        let lost = s.wal_status.as_deref() == Some("lost");
        if lost && w.lost.insert(s.name.clone()) {
            warn!(node = %name, slot = %s.name,
                "slot lost the WAL it needed (max_slot_wal_keep_size); its direction cannot \
                 resume: run walbridge teardown and setup again, then re-copy the peer");
        }
        slots.push(slot);
    }
    // Slots that disappeared (teardown while running) stop being exported.
    for gone in w.exported.difference(&seen) {
        let _ = metrics.slot_retained_wal.remove_label_values(&[name, gone]);
        let _ = metrics
            .slot_wal_budget_ratio
            .remove_label_values(&[name, gone]);
        w.samples.remove(gone);
        w.warned.remove(gone);
        w.lost.remove(gone);
    }
    w.exported = seen;
    if let Some(depth) = probe.trigger_queue_depth {
        metrics
            .trigger_queue_depth
            .with_label_values(&[name])
            .set(depth);
    }
    let mode = node_mode(config, &probe);
    status.node(name, |n: &mut NodeStatus| {
        n.reachable = true;
        n.error = None;
        n.checked_at = Some(now);
        n.mode = mode.into();
        n.current_wal_lsn = Some(probe.current_wal_lsn);
        n.slots = slots;
        n.trigger_queue_depth = probe.trigger_queue_depth;
    });
}

/// Adds a sample and returns the growth rate over the window, in bytes per second.
fn growth(samples: &mut VecDeque<(Instant, u64)>, bytes: u64) -> Option<f64> {
    let now = Instant::now();
    samples.push_back((now, bytes));
    while samples.len() > 2
        && samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > GROWTH_WINDOW)
    {
        samples.pop_front();
    }
    let (first_at, first) = *samples.front()?;
    let span = now.duration_since(first_at);
    (span >= GROWTH_MIN_SPAN).then(|| (bytes as f64 - first as f64) / span.as_secs_f64())
}

/// Warns once per level crossed upwards (80 %, 100 %); says so when the slot is back under.
fn guardrail(node: &str, slot: &SlotStatus, budget: u64, level: &mut u8) {
    let Some(ratio) = slot.budget_ratio else {
        return;
    };
    let now = if ratio >= 1.0 {
        2
    } else if ratio >= BUDGET_WARN_RATIO {
        1
    } else {
        0
    };
    if now > *level {
        let text = slot_sentence(node, slot, budget);
        warn!(node = %node, slot = %slot.name, peer = slot.peer.as_deref().unwrap_or(""),
              retained_bytes = slot.retained_wal_bytes.unwrap_or(0), budget_bytes = budget,
              "{text}");
    } else if now == 0 && *level > 0 {
        info!(node = %node, slot = %slot.name, "slot is back under 80% of max_retained_wal");
    }
    *level = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_needs_a_span() {
        let mut s = VecDeque::new();
        let start = Instant::now();
        s.push_back((start - Duration::from_secs(10), 1000));
        let g = growth(&mut s, 2000).unwrap();
        assert!((90.0..=101.0).contains(&g), "{g}");
        let mut fresh = VecDeque::new();
        assert_eq!(growth(&mut fresh, 5), None);
    }
}
