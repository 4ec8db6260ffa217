//! Prerequisite checks: everything `setup` and `run` need from a node, checked up front and
//! reported all at once with the exact change to make.

use std::fmt;

use tokio_postgres::Client;

use crate::catalog::{self, TableInfo};
use crate::config::{Config, Plugin};

/// One thing a node lacks, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The node.
    pub node: String,
    /// What is wrong and how to fix it, as one sentence.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.message)
    }
}

/// What a node can do, read once: decides stream or trigger mode under `mode = "auto"`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `wal_level`.
    pub wal_level: String,
    /// `track_commit_timestamp`.
    pub track_commit_timestamp: bool,
    /// `max_replication_slots`.
    pub max_replication_slots: i64,
    /// `max_wal_senders`.
    pub max_wal_senders: i64,
    /// Slots that exist and are not walbridge's (with this prefix).
    pub other_slots: i64,
    /// The role is superuser.
    pub superuser: bool,
    /// The role has REPLICATION (or is superuser).
    pub replication: bool,
    /// `server_version_num`.
    pub server_version_num: i64,
    /// `server_encoding`.
    pub server_encoding: String,
}

impl NodeFacts {
    /// Whether logical decoding can run here: the reason it cannot, if not.
    pub fn stream_blocker(&self) -> Option<String> {
        if self.wal_level != "logical" {
            return Some(format!(
                "wal_level is {}; set wal_level = logical in postgresql.conf and restart PostgreSQL",
                self.wal_level
            ));
        }
        if !self.replication {
            return Some(
                "the role has neither REPLICATION nor superuser; run ALTER ROLE <user> REPLICATION"
                    .to_string(),
            );
        }
        None
    }
}

/// Reads the facts of one node.
pub async fn node_facts(
    client: &Client,
    slot_prefix: &str,
) -> Result<NodeFacts, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_catalog.current_setting('wal_level'),
                    pg_catalog.current_setting('track_commit_timestamp') = 'on',
                    pg_catalog.current_setting('max_replication_slots')::int8,
                    pg_catalog.current_setting('max_wal_senders')::int8,
                    (SELECT count(*) FROM pg_catalog.pg_replication_slots
                      WHERE slot_name NOT LIKE $1 || '\\_%'),
                    r.rolsuper,
                    r.rolsuper OR r.rolreplication,
                    pg_catalog.current_setting('server_version_num')::int8,
                    pg_catalog.current_setting('server_encoding')
               FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[&slot_prefix],
        )
        .await?;
    Ok(NodeFacts {
        wal_level: row.get(0),
        track_commit_timestamp: row.get(1),
        max_replication_slots: row.get(2),
        max_wal_senders: row.get(3),
        other_slots: row.get(4),
        superuser: row.get(5),
        replication: row.get(6),
        server_version_num: row.get(7),
        server_encoding: row.get(8),
    })
}

/// Problems that stop stream mode on a node with `facts`, in a mesh of `nodes` nodes.
pub fn stream_problems(node: &str, facts: &NodeFacts, nodes: usize) -> Vec<Problem> {
    let mut out = Vec::new();
    let p = |message: String| Problem {
        node: node.to_string(),
        message,
    };
    if let Some(reason) = facts.stream_blocker() {
        out.push(p(reason));
    }
    if !facts.track_commit_timestamp {
        out.push(p(
            "track_commit_timestamp is off; conflict resolution needs commit times: set \
             track_commit_timestamp = on in postgresql.conf and restart PostgreSQL"
                .to_string(),
        ));
    }
    let needed = (nodes - 1) as i64;
    if facts.max_replication_slots < facts.other_slots + needed {
        out.push(p(format!(
            "max_replication_slots is {} with {} slots used by others, and walbridge needs {}; \
             set max_replication_slots = {} or more and restart PostgreSQL",
            facts.max_replication_slots,
            facts.other_slots,
            needed,
            facts.other_slots + needed + 2
        )));
    }
    if facts.max_wal_senders < needed + 1 {
        out.push(p(format!(
            "max_wal_senders is {} and walbridge needs {} (one per peer, plus one for `tail` or \
             a restart); set max_wal_senders = {} or more and restart PostgreSQL",
            facts.max_wal_senders,
            needed + 1,
            needed + 2
        )));
    }
    if facts.server_version_num < 140000 {
        out.push(p(format!(
            "PostgreSQL {} is too old; walbridge needs 14 or later",
            facts.server_version_num
        )));
    }
    if facts.server_encoding != "UTF8" {
        out.push(p(format!(
            "server_encoding is {}; walbridge replicates UTF8 databases only",
            facts.server_encoding
        )));
    }
    out
}

/// Problems every mode shares: a role that can create walbridge's objects and origins.
pub fn common_problems(node: &str, facts: &NodeFacts) -> Vec<Problem> {
    let mut out = Vec::new();
    if !facts.superuser {
        out.push(Problem {
            node: node.to_string(),
            message: "the role is not a superuser; walbridge needs one to create replication \
                      origins and its schema (or grant EXECUTE on pg_replication_origin_* and \
                      CREATE on the database, then run setup as a superuser once)"
                .to_string(),
        });
    }
    out
}

/// What probing the output plugin found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PluginProbe {
    /// The plugin cannot be loaded.
    pub problem: Option<Problem>,
    /// wal2json without `numeric-data-types-as-string` (older than 2.6): NaN and ±Infinity of
    /// float and numeric columns arrive as null.
    pub lossy_wal2json: bool,
}

/// Whether the output plugin can be loaded on the node: a temporary slot is created and
/// dropped at once. For wal2json, decoding is also started on it (nothing is written or
/// consumed) with `numeric-data-types-as-string`, the option the stream relies on for exact
/// NaN and ±Infinity: a wal2json that rejects it (older than 2.6) writes them as null. This
/// tests the behaviour the stream will get, whatever the version string says.
pub async fn plugin_probe(
    client: &Client,
    node: &str,
    plugin: Plugin,
) -> Result<PluginProbe, tokio_postgres::Error> {
    if plugin == Plugin::PgOutput {
        return Ok(PluginProbe::default());
    }
    let probe = format!("walbridge_probe_{}", std::process::id());
    let result = client
        .query_one(
            "SELECT pg_catalog.pg_create_logical_replication_slot($1, $2, true)",
            &[&probe, &plugin.as_str()],
        )
        .await;
    match result {
        Ok(_) => {
            let lossy_wal2json = if plugin == Plugin::Wal2Json {
                let peek = client
                    .query(
                        "SELECT 1 FROM pg_catalog.pg_logical_slot_peek_changes($1, NULL, 1,
                             'numeric-data-types-as-string', '1')",
                        &[&probe],
                    )
                    .await;
                match peek {
                    Ok(_) => false,
                    Err(e)
                        if e.as_db_error().is_some_and(|d| {
                            d.message().contains("numeric-data-types-as-string")
                        }) =>
                    {
                        true
                    }
                    Err(e) => return Err(e),
                }
            } else {
                false
            };
            // An error drops a session's temporary slots: drop it only if it is still there.
            client
                .execute(
                    "SELECT pg_catalog.pg_drop_replication_slot(slot_name)
                       FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&probe],
                )
                .await?;
            Ok(PluginProbe {
                problem: None,
                lossy_wal2json,
            })
        }
        Err(e) => Ok(PluginProbe {
            lossy_wal2json: false,
            problem: Some(Problem {
                node: node.to_string(),
                message: format!(
                "the output plugin {} cannot be loaded ({}); install it (Debian: apt-get install \
                 postgresql-15-wal2json) or use plugin = \"pgoutput\"",
                    plugin.as_str(),
                    crate::pgconn::pg_message(&e)
                ),
            }),
        }),
    }
}

/// The refusal of a lossy wal2json on `node` when `tables` have float or numeric columns
/// (those of `replication.skip_columns` are never sent, so they do not count).
pub async fn lossy_wal2json_problem(
    client: &Client,
    node: &str,
    config: &Config,
    tables: &[(String, String)],
) -> Result<Option<Problem>, catalog::CatalogError> {
    let columns: Vec<String> = catalog::float_columns(client, tables)
        .await?
        .into_iter()
        .filter(|(s, t, c)| !config.skip_columns_for(s, t).contains(c))
        .map(|(s, t, c)| format!("{s}.{t}.{c}"))
        .collect();
    Ok((!columns.is_empty()).then(|| Problem {
        node: node.to_string(),
        message: crate::decode::wal2json::lossy_refusal(&columns),
    }))
}

/// Tables that updates and deletes could not be replicated for.
pub fn identity_problem(node: &str, table: &TableInfo) -> Option<Problem> {
    (!table.has_usable_identity()).then(|| Problem {
        node: node.to_string(),
        message: format!(
            "table {} has no primary key or replica identity, so its updates and deletes cannot \
             be replicated; add a primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL",
            table.qualified_name(),
            table.quoted_name()
        ),
    })
}

/// The tables the configuration selects on one node, with their descriptions.
pub async fn selected_tables(
    client: &Client,
    config: &Config,
) -> Result<Vec<TableInfo>, catalog::CatalogError> {
    let mut out = Vec::new();
    for t in catalog::list_tables(client).await? {
        if !config.replication.tables.matches(&t.schema, &t.name) {
            continue;
        }
        if let Some(info) = catalog::table_info(client, &t.schema, &t.name).await? {
            out.push(info);
        }
    }
    Ok(out)
}
