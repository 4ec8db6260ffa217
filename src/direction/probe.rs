//! Node probes: one short catalog query per node (reachability, current WAL position, and per
//! slot the WAL it retains against `max_retained_wal`), bounded by [`PROBE_TIMEOUT`] so a hung
//! node delays nobody, plus the clock offset and the arithmetic of the WAL budget.
//!
//! The runtime's monitor (`runtime::monitor`) polls these every [`INTERVAL`]; `walbridge status`
//! runs the same [`probe`] when no process is running, so both report the same numbers.

use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{Config, Mode, NodeConfig};
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgconn;

/// How often nodes are polled.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Bound on connecting to and querying one node.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// One slot as read from `pg_replication_slots`.
#[derive(Clone, Debug)]
pub struct ProbedSlot {
    /// `slot_name`.
    pub name: String,
    /// `active`.
    pub active: bool,
    /// `pg_current_wal_lsn() - restart_lsn`, `None` when the slot has no `restart_lsn` (lost).
    pub retained_wal_bytes: Option<u64>,
    /// `confirmed_flush_lsn`.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `wal_status`.
    pub wal_status: Option<String>,
    /// `plugin`.
    pub plugin: Option<String>,
}

/// What one look at a node shows.
#[derive(Clone, Debug)]
pub struct Probe {
    /// `pg_current_wal_lsn()`.
    pub current_wal_lsn: Lsn,
    /// walbridge's slots (named `<prefix>_<source>_to_<target>`) in the node's database.
    pub slots: Vec<ProbedSlot>,
    /// Trigger mode: rows in the change table, when the table exists.
    pub trigger_queue_depth: Option<i64>,
}

const SLOTS_SQL: &str = "SELECT pg_catalog.pg_current_wal_lsn()::text, s.slot_name::text, s.active,
        (pg_catalog.pg_current_wal_lsn() - s.restart_lsn)::int8,
        s.confirmed_flush_lsn::text, s.wal_status, s.plugin::text
   FROM (SELECT 1) AS one
   LEFT JOIN pg_catalog.pg_replication_slots s
          ON s.database = pg_catalog.current_database()
         AND s.slot_type = 'logical'
         AND starts_with(s.slot_name::text, $1 || '_')
         AND strpos(s.slot_name::text, '_to_') > 0
  ORDER BY 2";

/// Reads the node's WAL position, walbridge's slots and (outside pure stream mode) the
/// trigger queue depth, in at most two short queries.
pub async fn probe(client: &Client, config: &Config) -> Result<Probe, tokio_postgres::Error> {
    let rows = client
        .query(SLOTS_SQL, &[&config.replication.slot_prefix])
        .await?;
    let mut current = Lsn::ZERO;
    let mut slots = Vec::new();
    for r in rows {
        let wal: Option<String> = r.get(0);
        current = wal.and_then(|w| w.parse().ok()).unwrap_or(current);
        let Some(name) = r.get::<_, Option<String>>(1) else {
            continue;
        };
        slots.push(ProbedSlot {
            name,
            active: r.get::<_, Option<bool>>(2).unwrap_or(false),
            retained_wal_bytes: r
                .get::<_, Option<i64>>(3)
                .map(|v| u64::try_from(v).unwrap_or(0)),
            confirmed_flush_lsn: r.get::<_, Option<String>>(4).and_then(|l| l.parse().ok()),
            wal_status: r.get(5),
            plugin: r.get(6),
        });
    }
    let trigger_queue_depth = if config.replication.mode == Mode::Stream {
        None
    } else {
        let table = &config.trigger.table;
        let exists = client
            .query_one(
                "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
                &[&table.quoted()],
            )
            .await?
            .get::<_, bool>(0);
        if exists {
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM {}", table.quoted()), &[])
                .await?
                .get(0);
            Some(n)
        } else {
            None
        }
    };
    Ok(Probe {
        current_wal_lsn: current,
        slots,
        trigger_queue_depth,
    })
}

/// The capture mode a node shows: `stream` when walbridge has slots there, else what the
/// configuration asks for (`auto` resolves to `trigger` once a change table exists).
pub fn node_mode(config: &Config, probe: &Probe) -> &'static str {
    match config.replication.mode {
        Mode::Stream => "stream",
        Mode::Trigger => "trigger",
        Mode::Auto if !probe.slots.is_empty() => "stream",
        Mode::Auto if probe.trigger_queue_depth.is_some() => "trigger",
        Mode::Auto => "auto",
    }
}

/// The target of the configured direction that owns `slot` on `node`, if any.
pub fn slot_peer(config: &Config, node: &str, slot: &str) -> Option<String> {
    config
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .find(|t| *t != node && config.slot_name(node, t) == slot)
        .map(str::to_string)
}

/// Retained WAL divided by the budget (`None` without a budget).
pub fn budget_ratio(retained: u64, budget: u64) -> Option<f64> {
    (budget > 0).then(|| retained as f64 / budget as f64)
}

/// Seconds until `retained` reaches `budget` at `growth` bytes/s.
pub fn seconds_until_budget(retained: u64, budget: u64, growth: Option<f64>) -> Option<f64> {
    if budget == 0 {
        return None;
    }
    if retained >= budget {
        return Some(0.0);
    }
    growth
        .filter(|g| *g > 0.0)
        .map(|g| (budget - retained) as f64 / g)
}

/// Connects (if needed) and probes one node within [`PROBE_TIMEOUT`].
pub async fn probe_node(
    node: &NodeConfig,
    config: &Config,
    client: &mut Option<Client>,
    application_name: &str,
) -> Result<Probe, String> {
    let attempt = async {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = Some(
                pgconn::connect(&node.dsn, application_name)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let Some(c) = client.as_ref() else {
            return Err("no connection".to_string());
        };
        probe(c, config).await.map_err(|e| pgconn::pg_message(&e))
    };
    let result = match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "node {} did not answer within {}s",
            node.name,
            PROBE_TIMEOUT.as_secs()
        )),
    };
    if result.is_err() {
        *client = None;
    }
    result
}

/// Clock samples taken per poll; the one with the shortest round trip is used.
const CLOCK_SAMPLES: usize = 3;

/// The node's clock minus this process's, in seconds, corrected for the round trip: the
/// node read its clock somewhere between our `before` and `after`, so it is compared with
/// their midpoint (error at most half the round trip, which on a LAN is well under 1 ms).
pub async fn clock_offset(client: &Client) -> Result<f64, tokio_postgres::Error> {
    let mut best: Option<(i64, f64)> = None;
    for _ in 0..CLOCK_SAMPLES {
        let before = PgTimestamp::now();
        let row = client
            .query_one(
                "SELECT pg_catalog.to_json(pg_catalog.clock_timestamp()) #>> '{}'",
                &[],
            )
            .await?;
        let after = PgTimestamp::now();
        let Some(node) = row
            .get::<_, Option<String>>(0)
            .as_deref()
            .and_then(PgTimestamp::parse)
        else {
            continue;
        };
        let round_trip = after.0 - before.0;
        let midpoint = before.0 + round_trip / 2;
        let offset = (node.0 - midpoint) as f64 / 1_000_000.0;
        if best.is_none_or(|(rt, _)| round_trip < rt) {
            best = Some((round_trip, offset));
        }
    }
    Ok(best.map_or(0.0, |(_, o)| o))
}

/// Each node's offset minus the median of all offsets (the mean of the middle two for an
/// even count): `walbridge_clock_skew_seconds`.
pub fn skews<'a>(offsets: &[(&'a str, f64)]) -> Vec<(&'a str, f64)> {
    let mut sorted: Vec<f64> = offsets.iter().map(|(_, o)| *o).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    offsets
        .iter()
        .map(|(name, o)| (*name, o - median))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_relative_to_the_median() {
        let s = skews(&[("a", 0.010), ("b", 0.310), ("c", 0.0)]);
        let near = |x: f64, y: f64| (x - y).abs() < 1e-9;
        assert!(
            near(s[0].1, 0.0) && near(s[1].1, 0.3) && near(s[2].1, -0.01),
            "{s:?}"
        );
        let two = skews(&[("a", 0.0), ("b", 0.3)]);
        assert!(near(two[0].1, -0.15) && near(two[1].1, 0.15), "{two:?}");
        assert!(skews(&[]).is_empty());
    }

    #[test]
    fn time_to_budget() {
        assert_eq!(seconds_until_budget(100, 0, Some(1.0)), None);
        assert_eq!(seconds_until_budget(200, 100, Some(1.0)), Some(0.0));
        assert_eq!(seconds_until_budget(40, 100, Some(2.0)), Some(30.0));
        assert_eq!(seconds_until_budget(40, 100, Some(-2.0)), None);
        assert_eq!(seconds_until_budget(40, 100, None), None);
    }

    #[test]
    fn peers_come_from_the_configured_directions() {
        let config = Config::from_toml_str(
            "[[nodes]]\nname = \"a\"\ndsn = \"host=x dbname=d user=u\"\n\
             [[nodes]]\nname = \"b_to_c\"\ndsn = \"host=y dbname=d user=u\"\n",
        )
        .unwrap();
        assert_eq!(
            slot_peer(&config, "a", "walbridge_a_to_b_to_c").as_deref(),
            Some("b_to_c")
        );
        assert_eq!(slot_peer(&config, "a", "walbridge_a_to_zed"), None);
    }
}
