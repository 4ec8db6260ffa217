//! Nodes that are a primary with physical standbys: failover slots and what the operator sets.
//!
//! A logical slot lives on one server. On PostgreSQL 17+ a slot created with `failover`
//! enabled is copied to a standby that synchronizes slots, so after a promotion walbridge
//! (following the multi-host DSN, `target_session_attrs=read-write`) finds its slot on the new
//! primary and streams on from where the target's origin says:
//!
//! ```text
//!  primary A1  slot walbridge_a_to_b (failover) ──WAL──▶ standby A2  slot copy (synced = t)
//!     │ dies                                                │ pg_ctl promote
//!     ▼                                                     ▼
//!  walbridge reconnects: host=A1 refused, host=A2 read-write ── START_REPLICATION on the copy
//! ```
//!
//! The standby needs `sync_replication_slots = on`, `hot_standby_feedback = on`,
//! `primary_slot_name` and a `primary_conninfo` that names a database; the primary should list
//! the standby's physical slot in `synchronized_standby_slots`, so that no change reaches
//! walbridge before it reached the standby. On 15 and 16 a promotion loses the slots: the
//! operator runs `setup` again and `verify` (then copies what differs) for the gap.

use std::time::Duration;

use tokio_postgres::Client;

use super::{sql_err, SetupError};
use crate::catalog::quote_ident;
use crate::dsn::{Dsn, TargetSessionAttrs};
use crate::pgconn;
use crate::protocol;

/// The first major version whose slots survive a promotion.
pub const FAILOVER_SLOTS_SINCE: i64 = 170000;

/// What a node with standbys is told when its server cannot keep slots through a promotion.
pub fn promotion_loses_slots(node: &str, major: i64) -> String {
    format!(
        "PostgreSQL {major} cannot keep logical slots through a promotion (failover slots need \
         17+): after node {node}'s standby is promoted, its slots and everything not yet \
         streamed from them are gone; run walbridge setup again (it creates new slots), then \
         walbridge verify, and copy the tables it names from {node} for the gap"
    )
}

/// Whether slots on a server of `server_version_num` are created with `failover`.
pub fn wants_failover(enabled: bool, server_version_num: i64) -> bool {
    enabled && server_version_num >= FAILOVER_SLOTS_SINCE
}

/// Whether `slot` on the node has `failover` enabled (`None`: no such slot, or before 17).
pub async fn slot_has_failover(
    client: &Client,
    slot: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT failover FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Turns `failover` on for an existing slot (a replication command; 17+), e.g. one created
/// before the upgrade to 17 or with `failover_slots = false`.
pub async fn enable_failover(node: &str, dsn: &Dsn, slot: &str) -> Result<(), SetupError> {
    let mut session = protocol::connect_replication(dsn, "walbridge-setup")
        .await
        .map_err(pgconn::NodeError::replication(
            node,
            "opening a replication session",
        ))?;
    session
        .simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
            quote_ident(slot)
        ))
        .await
        .map_err(pgconn::NodeError::replication(
            node,
            &format!("enabling failover on slot {slot}"),
        ))?;
    let _ = session.into_inner().close().await;
    Ok(())
}

/// The lines `setup` prints for a node whose DSN names several hosts (a primary and its
/// standbys), and warnings for what is missing as far as it can be seen: on the primary
/// (`synchronized_standby_slots`, a streaming standby, its slot and feedback), and on each
/// other host that answers as a standby (its settings).
pub async fn standby_report(
    node: &str,
    dsn: &Dsn,
    client: &Client,
    server_version_num: i64,
    failover_slots: bool,
) -> Result<(Vec<String>, Vec<String>), SetupError> {
    let mut lines = Vec::new();
    let mut warnings = Vec::new();
    if dsn.hosts.len() < 2 {
        return Ok((lines, warnings));
    }
    let major = server_version_num / 10000;
    if server_version_num < FAILOVER_SLOTS_SINCE {
        warnings.push(promotion_loses_slots(node, major));
        return Ok((lines, warnings));
    }
    if !failover_slots {
        warnings.push(format!(
            "replication.failover_slots is off: a promotion of node {node}'s standby loses the \
             slots; turn it on (the default) and run setup again"
        ));
        return Ok((lines, warnings));
    }
    if dsn.target_session_attrs != TargetSessionAttrs::ReadWrite
        && dsn.target_session_attrs != TargetSessionAttrs::Primary
    {
        warnings.push(format!(
            "node {node}'s DSN names {} hosts but target_session_attrs is {}; add \
             target_session_attrs=read-write so walbridge follows a promotion",
            dsn.hosts.len(),
            dsn.target_session_attrs.as_str()
        ));
    }
    // The standbys streaming from this primary and the physical slots they use.
    let rows = client
        .query(
            "SELECT s.slot_name::text, s.active, s.xmin IS NOT NULL OR s.catalog_xmin IS NOT NULL
               FROM pg_catalog.pg_replication_slots s WHERE s.slot_type = 'physical'
              ORDER BY 1",
            &[],
        )
        .await
        .map_err(sql_err(node, "reading physical slots"))?;
    let physical: Vec<(String, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let synchronized: String = client
        .query_one(
            "SELECT pg_catalog.current_setting('synchronized_standby_slots')",
            &[],
        )
        .await
        .map_err(sql_err(node, "reading synchronized_standby_slots"))?
        .get(0);
    let active: Vec<&str> = physical
        .iter()
        .filter(|p| p.1)
        .map(|p| p.0.as_str())
        .collect();
    let slot_hint = active.first().copied().unwrap_or("<physical slot>");
    lines.push(format!(
        "{node}: slots are failover slots; for a standby to keep them through a promotion, set \
         on the standby: sync_replication_slots = on, hot_standby_feedback = on, \
         primary_slot_name = '{slot_hint}', primary_conninfo = '... dbname={db}' (a database is \
         needed), wal_level = logical; and on the primary: synchronized_standby_slots = \
         '{slot_hint}'",
        db = dsn.dbname
    ));
    if active.is_empty() {
        warnings.push(format!(
            "no standby streams from node {node}'s primary through a physical slot; set \
             primary_slot_name on the standby (failover slots are synchronized only then)"
        ));
    }
    for (name, is_active, feedback) in &physical {
        if *is_active && !feedback {
            warnings.push(format!(
                "the standby using physical slot {name} on node {node} sends no \
                 hot_standby_feedback; set hot_standby_feedback = on there"
            ));
        }
    }
    if synchronized.trim().is_empty() {
        warnings.push(format!(
            "synchronized_standby_slots is empty on node {node}'s primary; set it to the \
             standby's physical slot ('{slot_hint}') so walbridge never receives a change the \
             standby has not, which a promotion would otherwise lose"
        ));
    }
    for (i, _) in dsn.addresses().iter().enumerate() {
        if let Some(w) = check_standby_host(node, dsn, i).await {
            warnings.push(w);
        }
    }
    Ok((lines, warnings))
}

/// Checks host `i` of the DSN when it answers as a standby: its slot-sync settings. Hosts that
/// are down, or are the primary, say nothing.
async fn check_standby_host(node: &str, dsn: &Dsn, i: usize) -> Option<String> {
    let mut one = dsn.clone();
    one.hosts = vec![dsn.hosts.get(i)?.clone()];
    one.ports = vec![dsn.port_for(i)];
    one.target_session_attrs = TargetSessionAttrs::Standby;
    one.connect_timeout = Some(Duration::from_secs(5));
    let client = pgconn::connect(&one, "walbridge-setup").await.ok()?;
    let row = client
        .query_one(
            "SELECT pg_catalog.current_setting('sync_replication_slots'),
                    pg_catalog.current_setting('hot_standby_feedback'),
                    pg_catalog.current_setting('primary_slot_name'),
                    pg_catalog.current_setting('wal_level')",
            &[],
        )
        .await
        .ok()?;
    // Readable only with superuser or pg_read_all_settings: unknown otherwise.
    let conninfo: String = client
        .query_one("SELECT pg_catalog.current_setting('primary_conninfo')", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    let get = |c: usize| row.get::<_, Option<String>>(c).unwrap_or_default();
    let mut missing = Vec::new();
    if get(0) != "on" {
        missing.push("sync_replication_slots = on".to_string());
    }
    if get(1) != "on" {
        missing.push("hot_standby_feedback = on".to_string());
    }
    if get(2).is_empty() {
        missing.push("primary_slot_name".to_string());
    }
    if get(3) != "logical" {
        missing.push("wal_level = logical".to_string());
    }
    if !conninfo.is_empty() && !conninfo.contains("dbname=") {
        missing.push("dbname in primary_conninfo".to_string());
    }
    (!missing.is_empty()).then(|| {
        format!(
            "the standby {} of node {node} lacks {}: it will not keep walbridge's failover slots \
             through a promotion",
            dsn.describe_host(i),
            missing.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_slots_only_from_17_and_when_enabled() {
        assert!(wants_failover(true, 170_000));
        assert!(wants_failover(true, 180_004));
        assert!(!wants_failover(true, 160_009));
        assert!(!wants_failover(false, 170_000));
        let text = promotion_loses_slots("east", 16);
        assert!(text.contains("PostgreSQL 16"), "{text}");
        assert!(text.contains("walbridge setup") && text.contains("walbridge verify"));
    }
}
