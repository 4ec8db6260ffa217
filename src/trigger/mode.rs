//! Which way each node's changes are captured: a replication slot (stream) or the change
//! table (trigger), and why.
//!
//! `replication.mode = "stream"` and `"trigger"` decide for every node. `"auto"` decides per
//! node: stream where logical decoding is possible ([`NodeFacts::stream_blocker`] is `None`),
//! else trigger. `setup` records its choice in the node's `walbridge.settings`
//! (`capture_mode`, `capture_mode_reason`), and `run` and `status` read it back from there, so
//! they follow what setup installed even when the node changed since (a node that could now
//! stream keeps its trigger mode, with a reason saying that `setup` switches it).

use serde::Serialize;
use tokio_postgres::Client;

use crate::config::{Config, Mode};
use crate::direction::prereq::{self, NodeFacts};

/// How one node's changes are captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    /// Logical decoding from a replication slot.
    Stream,
    /// The trigger-fed change table.
    Trigger,
}

impl CaptureMode {
    /// `stream` or `trigger`, as `status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Stream => "stream",
            CaptureMode::Trigger => "trigger",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "stream" => Some(CaptureMode::Stream),
            "trigger" => Some(CaptureMode::Trigger),
            _ => None,
        }
    }
}

/// One node's capture mode and the reason for it, for logs and `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeMode {
    /// The node.
    pub node: String,
    /// Its mode.
    pub mode: CaptureMode,
    /// Why, as a sentence fragment (`"wal_level is replica; ..."`).
    pub reason: String,
}

/// The mode `configured` gives a node with `facts` (what `setup` installs).
pub fn choose(configured: Mode, facts: &NodeFacts) -> (CaptureMode, String) {
    match configured {
        Mode::Stream => (CaptureMode::Stream, "replication.mode = \"stream\"".into()),
        Mode::Trigger => (
            CaptureMode::Trigger,
            "replication.mode = \"trigger\"".into(),
        ),
        Mode::Auto => match facts.stream_blocker() {
            None => (
                CaptureMode::Stream,
                "mode auto: logical decoding is available (wal_level = logical, REPLICATION \
                 right)"
                    .into(),
            ),
            Some(blocker) => (
                CaptureMode::Trigger,
                format!("mode auto: logical decoding is not possible here ({blocker})"),
            ),
        },
    }
}

/// The mode of node `node` as `run` and `status` use it: what setup recorded on the node
/// (under `mode = "auto"`), else what [`choose`] says now.
pub async fn node_mode(
    config: &Config,
    node: &str,
    client: &Client,
) -> Result<NodeMode, tokio_postgres::Error> {
    let facts = prereq::node_facts(client, &config.replication.slot_prefix).await?;
    let (now, now_reason) = choose(config.replication.mode, &facts);
    let recorded = recorded_mode(client).await?;
    let (mode, reason) = match (config.replication.mode, recorded) {
        (Mode::Auto, Some((mode, reason))) if mode != now => (
            mode,
            format!(
                "{reason}; {} now, run walbridge setup to switch to {} mode",
                if now == CaptureMode::Stream {
                    "logical decoding is possible"
                } else {
                    "logical decoding is no longer possible"
                },
                now.as_str()
            ),
        ),
        (Mode::Auto, Some((mode, reason))) => (mode, reason),
        _ => (now, now_reason),
    };
    Ok(NodeMode {
        node: node.to_string(),
        mode,
        reason,
    })
}

/// Every node's mode, in configuration order; a node that cannot be reached is an error in
/// its place.
pub async fn node_modes(config: &Config) -> Vec<Result<NodeMode, String>> {
    let mut out = Vec::with_capacity(config.nodes.len());
    for node in &config.nodes {
        let r = match crate::pgconn::connect(&node.dsn, "walbridge-status").await {
            Ok(client) => node_mode(config, &node.name, &client)
                .await
                .map_err(|e| format!("node {}: {}", node.name, crate::pgconn::pg_message(&e))),
            Err(e) => Err(format!("node {}: {e}", node.name)),
        };
        out.push(r);
    }
    out
}

/// What setup recorded on the node, if it ran.
async fn recorded_mode(
    client: &Client,
) -> Result<Option<(CaptureMode, String)>, tokio_postgres::Error> {
    let has = client
        .query_one(
            "SELECT pg_catalog.to_regclass('walbridge.settings') IS NOT NULL",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    if !has {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT name, value FROM walbridge.settings
              WHERE name IN ('capture_mode', 'capture_mode_reason')",
            &[],
        )
        .await?;
    let get = |n: &str| {
        rows.iter()
            .find(|r| r.get::<_, String>(0) == n)
            .map(|r| r.get::<_, String>(1))
    };
    Ok(get("capture_mode")
        .and_then(|m| CaptureMode::parse(&m))
        .map(|m| (m, get("capture_mode_reason").unwrap_or_default())))
}

/// Records the mode setup installed on a node.
pub async fn record_mode(
    client: &Client,
    mode: CaptureMode,
    reason: &str,
) -> Result<(), tokio_postgres::Error> {
    for (name, value) in [
        ("capture_mode", mode.as_str()),
        ("capture_mode_reason", reason),
    ] {
        client
            .execute(
                "INSERT INTO walbridge.settings (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &value],
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(wal_level: &str, replication: bool) -> NodeFacts {
        NodeFacts {
            wal_level: wal_level.into(),
            replication,
            ..NodeFacts::default()
        }
    }

    #[test]
    fn auto_streams_where_it_can() {
        let (m, why) = choose(Mode::Auto, &facts("logical", true));
        assert_eq!(m, CaptureMode::Stream, "{why}");
        let (m, why) = choose(Mode::Auto, &facts("replica", true));
        assert_eq!(m, CaptureMode::Trigger);
        assert!(why.contains("wal_level is replica"), "{why}");
        let (m, why) = choose(Mode::Auto, &facts("logical", false));
        assert_eq!(m, CaptureMode::Trigger);
        assert!(why.contains("REPLICATION"), "{why}");
    }

    #[test]
    fn explicit_modes_apply_to_every_node() {
        assert_eq!(
            choose(Mode::Trigger, &facts("logical", true)).0,
            CaptureMode::Trigger
        );
        assert_eq!(
            choose(Mode::Stream, &facts("replica", false)).0,
            CaptureMode::Stream
        );
    }
}
