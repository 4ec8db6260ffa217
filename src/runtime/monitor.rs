//! Watches the nodes on an interval that does not load them: reachability (`walbridge_node_up`)
//! and, per slot, the WAL it retains against `max_retained_wal` (the classic way replication
//! fills a disk), warning at 80 % and 100 % with the peer that holds it back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{SlotStatus, StatusBoard};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pgconn;

/// How often nodes are polled.
const INTERVAL: Duration = Duration::from_secs(5);

/// Polls every node until shutdown.
pub async fn run(
    config: Arc<Config>,
    metrics: Metrics,
    status: StatusBoard,
    shutdown: CancellationToken,
) {
    let mut clients: HashMap<String, tokio_postgres::Client> = HashMap::new();
    let mut previous: HashMap<(String, String), (u64, Instant)> = HashMap::new();
    let mut warned: HashMap<(String, String), u8> = HashMap::new();
    let prefix = config.replication.slot_prefix.clone();
    let budget = config.replication.max_retained_wal;
    loop {
        for node in &config.nodes {
            if clients.get(&node.name).is_none_or(|c| c.is_closed()) {
                match pgconn::connect(&node.dsn, &format!("walbridge-monitor-{}", node.name)).await
                {
                    Ok(c) => {
                        clients.insert(node.name.clone(), c);
                    }
                    Err(_) => {
                        clients.remove(&node.name);
                    }
                }
            }
            let rows = match clients.get(&node.name) {
                Some(c) => c
                    .query(
                        "SELECT slot_name::text, active,
                                (pg_catalog.pg_current_wal_lsn() - restart_lsn)::int8
                           FROM pg_catalog.pg_replication_slots
                          WHERE slot_name LIKE $1 || '\\_%\\_to\\_%' AND database = current_database()
                          ORDER BY 1",
                        &[&prefix],
                    )
                    .await
                    .ok(),
                None => None,
            };
            let up = rows.is_some();
            metrics
                .node_up
                .with_label_values(&[&node.name])
                .set(i64::from(up));
            let Some(rows) = rows else {
                clients.remove(&node.name);
                status.node(&node.name, |n| n.reachable = false);
                continue;
            };
            let mut slots = Vec::new();
            for r in rows {
                let slot: String = r.get(0);
                let active: bool = r.get(1);
                let retained: Option<i64> = r.get(2);
                let retained = retained.map(|v| v.max(0) as u64);
                let key = (node.name.clone(), slot.clone());
                let mut growth = None;
                if let Some(bytes) = retained {
                    metrics
                        .slot_retained_wal
                        .with_label_values(&[&node.name, &slot])
                        .set(bytes as i64);
                    let ratio = if budget > 0 {
                        bytes as f64 / budget as f64
                    } else {
                        0.0
                    };
                    metrics
                        .slot_wal_budget_ratio
                        .with_label_values(&[&node.name, &slot])
                        .set(ratio);
                    if let Some((before, at)) = previous.get(&key) {
                        let secs = at.elapsed().as_secs_f64();
                        if secs > 0.0 {
                            growth = Some((bytes as f64 - *before as f64) / secs);
                        }
                    }
                    previous.insert(key.clone(), (bytes, Instant::now()));
                    let level = if ratio >= 1.0 {
                        2
                    } else if ratio >= 0.8 {
                        1
                    } else {
                        0
                    };
                    let was = warned.insert(key.clone(), level).unwrap_or(0);
                    if level > was {
                        let peer = slot.rsplit("_to_").next().unwrap_or("?");
                        warn!(
                            node = %node.name, slot = %slot, retained_bytes = bytes,
                            budget_bytes = budget, percent = (ratio * 100.0).round(),
                            "slot retains {}% of max_retained_wal: {peer} is not confirming \
                             (down or far behind); WAL on {} grows until it catches up",
                            (ratio * 100.0).round(),
                            node.name
                        );
                    }
                }
                slots.push(SlotStatus {
                    name: slot,
                    retained_wal_bytes: retained,
                    active,
                    growth_bytes_per_second: growth,
                });
            }
            status.node(&node.name, |n| {
                n.reachable = true;
                // Trigger-mode nodes are named by the runtime; slots mean stream mode.
                if n.mode.is_empty() {
                    n.mode = "stream".into();
                }
                n.slots = slots;
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}
