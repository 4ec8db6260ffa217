//! Conflict forensics: `walbridge conflicts` and `walbridge why`. Read-only.
//!
//! Every node journals the conflicts it resolved in its own `walbridge.conflicts`, in the same
//! transaction as the resolution. These commands read the journals of all nodes and the row
//! versions themselves:
//!
//! ```text
//!   conflicts : every node's journal, merged, newest last (sorted by resolved_at)
//!   why       : node N's row for KEY      to_jsonb(row), commit time and origin of its xmin
//!               every other node's row    the same
//!               the journal entries       table_name = T and key = KEY's text values, in the
//!                                         key columns' order (what apply writes), oldest first
//! ```
//!
//! The writer of a row version is the node whose replication origin
//! (`pg_xact_commit_timestamp_origin(xmin)`, available since PostgreSQL 14) applied it; no
//! origin means the node itself wrote it. Row contents are printed because the operator asked
//! for them; they never go to logs.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value as Json;
use thiserror::Error;
use tokio_postgres::Client;

use crate::catalog;
use crate::config::{quote_ident, Config, ConflictPolicy, QualifiedName};
use crate::conflict::{self, Action, Incoming, LocalState, Version};
use crate::event::ChangeOp;
use crate::lsn::PgTimestamp;
use crate::pgconn;

/// What went wrong reading the journals or the rows.
#[derive(Debug, Error)]
pub enum ForensicsError {
    /// The command's arguments cannot be used.
    #[error("{0}")]
    Usage(String),
    /// A node could not be reached.
    #[error("cannot connect to node {node}")]
    Connect {
        /// The node.
        node: String,
        /// The cause.
        #[source]
        source: pgconn::ConnectError,
    },
    /// A query failed.
    #[error("reading {what} on node {node} failed")]
    Query {
        /// The node.
        node: String,
        /// What was read.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Reading the table's definition failed.
    #[error("reading the definition of {table} on node {node} failed")]
    Catalog {
        /// The node.
        node: String,
        /// The table.
        table: String,
        /// The cause.
        #[source]
        source: catalog::CatalogError,
    },
}

impl ForensicsError {
    /// Whether the arguments were at fault (exit 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, ForensicsError::Usage(_))
    }
}

/// One entry of a node's `walbridge.conflicts`.
#[derive(Clone, Debug, Serialize)]
pub struct ConflictEntry {
    /// The node whose journal holds it (where the conflict was resolved: the target).
    pub node: String,
    /// Its id in that journal.
    pub id: i64,
    /// When it was resolved (RFC 3339, UTC).
    pub resolved_at: String,
    /// The node the change came from.
    pub source: String,
    /// The node it was applied to.
    pub target: String,
    /// `schema.table`.
    pub table: String,
    /// The key's values, as text, in the key columns' order.
    pub key: Json,
    /// `insert_exists`, `update_missing`, `update_older`, `delete_missing`, `delete_older`.
    pub kind: String,
    /// `applied`, `skipped` or `error`.
    pub resolution: String,
    /// The target's row version when the change arrived (`null`: none).
    pub local_row: Option<Json>,
    /// The incoming row version.
    pub remote_row: Option<Json>,
    /// Commit time of the target's row version (RFC 3339, UTC).
    pub local_commit_ts: Option<String>,
    /// Commit time of the incoming change (RFC 3339, UTC).
    pub remote_commit_ts: Option<String>,
    /// The policy that decided (`null`: journaled without the facts replay needs).
    pub policy: Option<String>,
    /// The node that wrote the target's version (row or tombstone).
    pub local_writer: Option<String>,
    /// Whether the target's version was a delete tombstone (no row).
    pub local_tombstone: Option<bool>,
    /// Whether the target's row equalled the change's old row (REPLICA IDENTITY FULL only).
    pub row_equals_old: Option<bool>,
    /// Whether the incoming row carried every column value.
    pub complete_row: Option<bool>,
    /// A last-write-wins decision made by less than the measured clock skew of the writers.
    pub ambiguous: bool,
    /// Stream mode: the LSN of the source transaction's commit record.
    pub source_lsn: Option<String>,
    /// Trigger mode: the id of the source's change-table row.
    pub source_change_id: Option<i64>,
    /// The node order the decision used (`replication.priority`, then unlisted nodes by name).
    pub priority: Option<Vec<String>>,
    /// The local version was over `replication.conflict_max_row_bytes` and is kept cut.
    pub local_row_truncated: bool,
    /// The incoming version was over the bound and is kept cut.
    pub remote_row_truncated: bool,
    /// Columns the source did not send (unchanged TOAST): `remote_row` holds the local row's
    /// value for them, or leaves them out when there was no local row.
    pub remote_unsent: Option<Vec<String>>,
    /// Both versions carry the same commit time: priority broke the tie.
    pub tie: Option<bool>,
    /// The rule that ordered the two versions (`null` without the facts, or without a local
    /// version).
    pub rule: Option<String>,
    #[serde(skip)]
    sort_micros: i64,
}

/// Which journal entries to read.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only entries resolved within this long before now.
    pub since: Option<Duration>,
    /// Only entries of this table.
    pub table: Option<QualifiedName>,
    /// Only entries of this key (the journal's text-array form).
    pub key: Option<Json>,
}

const SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; \
                       SET search_path = pg_catalog; SET default_transaction_read_only = on";

async fn connect(config: &Config, node: &str) -> Result<Client, ForensicsError> {
    let Some(n) = config.node(node) else {
        return Err(ForensicsError::Usage(format!(
            "--node {node}: not a configured node"
        )));
    };
    let client = pgconn::connect(&n.dsn, "walbridge-forensics")
        .await
        .map_err(|source| ForensicsError::Connect {
            node: node.to_string(),
            source,
        })?;
    client
        .batch_execute(SESSION)
        .await
        .map_err(|source| ForensicsError::Query {
            node: node.to_string(),
            what: "session settings",
            source,
        })?;
    Ok(client)
}

const JOURNAL_SQL: &str = "\
SELECT id, pg_catalog.to_json(resolved_at) #>> '{}', source, target, table_name, key::text,
       kind, resolution, local_row::text, remote_row::text,
       pg_catalog.to_json(local_commit_ts) #>> '{}', pg_catalog.to_json(remote_commit_ts) #>> '{}',
       (pg_catalog.date_part('epoch', resolved_at) * 1000000)::int8,
       policy, local_writer, local_tombstone, row_equals_old, complete_row, ambiguous,
       source_lsn::text, source_change_id, priority, local_row_truncated, remote_row_truncated,
       remote_unsent
  FROM walbridge.conflicts
 WHERE ($1::float8 IS NULL
        OR resolved_at >= pg_catalog.now() - pg_catalog.make_interval(secs => $1::float8))
   AND ($2::text IS NULL OR table_name = $2::text)
   AND ($3::text IS NULL OR key = $3::text::jsonb)
 ORDER BY resolved_at, id";

fn parse_json(text: Option<String>) -> Option<Json> {
    text.map(|t| serde_json::from_str(&t).unwrap_or(Json::String(t)))
}

async fn journal_of(
    client: &Client,
    node: &str,
    filter: &Filter,
) -> Result<Vec<ConflictEntry>, ForensicsError> {
    let since = filter.since.map(|d| d.as_secs_f64());
    let table = filter.table.as_ref().map(|t| t.to_string());
    let key = filter.key.as_ref().map(|k| k.to_string());
    let rows = client
        .query(JOURNAL_SQL, &[&since, &table, &key])
        .await
        .map_err(|source| ForensicsError::Query {
            node: node.to_string(),
            what: "walbridge.conflicts",
            source,
        })?;
    let mut entries: Vec<ConflictEntry> = rows
        .iter()
        .map(|r| ConflictEntry {
            node: node.to_string(),
            id: r.get(0),
            resolved_at: r.get::<_, Option<String>>(1).unwrap_or_default(),
            source: r.get(2),
            target: r.get(3),
            table: r.get(4),
            key: parse_json(r.get(5)).unwrap_or(Json::Null),
            kind: r.get(6),
            resolution: r.get(7),
            local_row: parse_json(r.get(8)),
            remote_row: parse_json(r.get(9)),
            local_commit_ts: r.get(10),
            remote_commit_ts: r.get(11),
            sort_micros: r.get::<_, Option<i64>>(12).unwrap_or_default(),
            policy: r.get(13),
            local_writer: r.get(14),
            local_tombstone: r.get(15),
            row_equals_old: r.get(16),
            complete_row: r.get(17),
            ambiguous: r.get(18),
            source_lsn: r.get(19),
            source_change_id: r.get(20),
            priority: r.get(21),
            local_row_truncated: r.get(22),
            remote_row_truncated: r.get(23),
            remote_unsent: r.get(24),
            tie: None,
            rule: None,
        })
        .collect();
    for e in &mut entries {
        let (tie, rule) = match decision_facts(e) {
            Some((policy, incoming, local)) => match local.row.or(local.tombstone) {
                Some(l) => (
                    Some(incoming.version.commit_time == l.commit_time),
                    Some(conflict::deciding_rule(policy, incoming.version, l).to_string()),
                ),
                None => (None, None),
            },
            None => (None, None),
        };
        e.tie = tie;
        e.rule = rule;
    }
    Ok(entries)
}

/// Every node's journal entries that pass `filter`, oldest first (newest last).
pub async fn conflicts(
    config: &Config,
    filter: &Filter,
) -> Result<Vec<ConflictEntry>, ForensicsError> {
    let mut all = Vec::new();
    for node in &config.nodes {
        let client = connect(config, &node.name).await?;
        all.extend(journal_of(&client, &node.name, filter).await?);
    }
    all.sort_by(|a, b| (a.sort_micros, &a.node, a.id).cmp(&(b.sort_micros, &b.node, b.id)));
    Ok(all)
}

/// `walbridge conflicts` as text: one line per entry.
pub fn render_conflicts(entries: &[ConflictEntry]) -> String {
    let mut out = String::new();
    if entries.is_empty() {
        out.push_str("no conflicts recorded\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<32} {:<10} {:<24} {:<16} {:<15} {:<10} source>target",
        "resolved_at", "node", "table", "key", "kind", "resolution"
    );
    for e in entries {
        let _ = writeln!(
            out,
            "{:<32} {:<10} {:<24} {:<16} {:<15} {:<10} {}>{}",
            e.resolved_at, e.node, e.table, e.key, e.kind, e.resolution, e.source, e.target
        );
    }
    out
}

/// One node's version of the row.
#[derive(Clone, Debug, Serialize)]
pub struct RowVersion {
    /// The node.
    pub node: String,
    /// Whether the row exists there.
    pub exists: bool,
    /// The row (`to_jsonb`), when it exists.
    pub row: Option<Json>,
    /// Commit time of the transaction that wrote this version (RFC 3339, UTC; `null` when not
    /// known: written before `track_commit_timestamp` was on, or frozen).
    pub commit_time: Option<String>,
    /// The node that wrote this version: the node itself, or the node whose replication origin
    /// applied it (`null` when not known).
    pub written_by: Option<String>,
}

/// What `walbridge why` reports.
#[derive(Clone, Debug, Serialize)]
pub struct WhyReport {
    /// The node asked about.
    pub node: String,
    /// `schema.table`.
    pub table: String,
    /// The key as given.
    pub key: Json,
    /// The key as the journal records it (text values in the key columns' order).
    pub journal_key: Json,
    /// The conflict policy configured for the table.
    pub policy: String,
    /// The row on the node asked about.
    pub current: RowVersion,
    /// The row on every other node, in configuration order.
    pub others: Vec<RowVersion>,
    /// Every conflict recorded for the key on any node, oldest first.
    pub conflicts: Vec<ConflictEntry>,
}

/// The key columns apply uses: the replica identity index, else the primary key.
async fn key_columns(
    client: &Client,
    node: &str,
    table: &QualifiedName,
) -> Result<Vec<String>, ForensicsError> {
    let info = catalog::table_info(client, &table.schema, &table.name)
        .await
        .map_err(|source| ForensicsError::Catalog {
            node: node.to_string(),
            table: table.to_string(),
            source,
        })?
        .ok_or_else(|| {
            ForensicsError::Usage(format!("table {table} does not exist on node {node}"))
        })?;
    Ok(if info.identity_index.is_empty() {
        info.primary_key
    } else {
        info.identity_index
    })
}

async fn row_on(
    config: &Config,
    client: &Client,
    node: &str,
    table: &QualifiedName,
    columns: &[String],
    key: &Json,
) -> Result<RowVersion, ForensicsError> {
    let matches: Vec<String> = columns
        .iter()
        .map(|c| {
            let c = quote_ident(c);
            format!("t.{c} IS NOT DISTINCT FROM k.{c}")
        })
        .collect();
    let sql = format!(
        "SELECT pg_catalog.to_jsonb(t)::text, pg_catalog.to_json(o.timestamp) #>> '{{}}', \
                o.roident::int8, r.roname::text \
           FROM ONLY {tbl} t \
          CROSS JOIN pg_catalog.jsonb_populate_record(NULL::{tbl}, $1::text::jsonb) k \
           LEFT JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(t.xmin) o ON true \
           LEFT JOIN pg_catalog.pg_replication_origin r ON r.roident = o.roident \
          WHERE {}",
        matches.join(" AND "),
        tbl = table.quoted(),
    );
    let rows = client
        .query(&sql, &[&key.to_string()])
        .await
        .map_err(|source| ForensicsError::Query {
            node: node.to_string(),
            what: "the row",
            source,
        })?;
    let Some(r) = rows.first() else {
        return Ok(RowVersion {
            node: node.to_string(),
            exists: false,
            row: None,
            commit_time: None,
            written_by: None,
        });
    };
    let commit_time: Option<String> = r.get(1);
    let roident: Option<i64> = r.get(2);
    let roname: Option<String> = r.get(3);
    let written_by = match (roident, roname) {
        (Some(0), _) => Some(node.to_string()),
        (_, Some(name)) => Some(
            config
                .nodes
                .iter()
                .find(|n| config.origin_name(&n.name) == name)
                .map_or_else(|| format!("origin {name}"), |n| n.name.clone()),
        ),
        (Some(_), None) | (None, _) if commit_time.is_some() => Some(node.to_string()),
        _ => None,
    };
    Ok(RowVersion {
        node: node.to_string(),
        exists: true,
        row: parse_json(r.get(0)),
        commit_time,
        written_by,
    })
}

/// `walbridge why`: the row's versions on every node and the conflicts that decided it.
pub async fn why(
    config: &Config,
    node: &str,
    table: &QualifiedName,
    key: &Json,
) -> Result<WhyReport, ForensicsError> {
    let Some(obj) = key.as_object().filter(|o| !o.is_empty()) else {
        return Err(ForensicsError::Usage(
            "--key must be a JSON object of the key columns, e.g. '{\"id\": 42}'".into(),
        ));
    };
    let client = connect(config, node).await?;
    let columns = key_columns(&client, node, table).await?;
    if columns.is_empty() {
        return Err(ForensicsError::Usage(format!(
            "{table} has no primary key or replica identity index, so its rows have no key"
        )));
    }
    let mut missing: Vec<&str> = columns
        .iter()
        .filter(|c| !obj.contains_key(c.as_str()))
        .map(String::as_str)
        .collect();
    missing.extend(
        obj.keys()
            .filter(|k| !columns.contains(k))
            .map(String::as_str),
    );
    if !missing.is_empty() {
        return Err(ForensicsError::Usage(format!(
            "--key must name exactly the key columns of {table} ({}); not {}",
            columns.join(", "),
            missing.join(", ")
        )));
    }
    // The journal's form of the key: each column's text output, in key order.
    let array_sql = format!(
        "SELECT pg_catalog.jsonb_build_array({})::text \
           FROM pg_catalog.jsonb_populate_record(NULL::{}, $1::text::jsonb) k",
        columns
            .iter()
            .map(|c| format!("k.{}::text", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", "),
        table.quoted()
    );
    let journal_key: String = client
        .query_one(&array_sql, &[&key.to_string()])
        .await
        .map_err(|source| ForensicsError::Query {
            node: node.to_string(),
            what: "the key",
            source,
        })?
        .get(0);
    let journal_key: Json = serde_json::from_str(&journal_key).unwrap_or(Json::Null);

    let current = row_on(config, &client, node, table, &columns, key).await?;
    let mut others = Vec::new();
    for n in config.nodes.iter().filter(|n| n.name != node) {
        let c = connect(config, &n.name).await?;
        others.push(row_on(config, &c, &n.name, table, &columns, key).await?);
    }
    let filter = Filter {
        since: None,
        table: Some(table.clone()),
        key: Some(journal_key.clone()),
    };
    let conflicts = conflicts(config, &filter).await?;
    Ok(WhyReport {
        node: node.to_string(),
        table: table.to_string(),
        key: key.clone(),
        journal_key,
        policy: config
            .conflict_policy_for(&table.schema, &table.name)
            .to_string(),
        current,
        others,
        conflicts,
    })
}

fn render_version(out: &mut String, v: &RowVersion) {
    if v.exists {
        let _ = writeln!(
            out,
            "  {}: {} (committed {}, written by {})",
            v.node,
            v.row.as_ref().map_or(String::new(), |r| r.to_string()),
            v.commit_time.as_deref().unwrap_or("unknown"),
            v.written_by.as_deref().unwrap_or("unknown"),
        );
    } else {
        let _ = writeln!(out, "  {}: no row", v.node);
    }
}

/// `walbridge why` as text.
pub fn render_why(r: &WhyReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} key {} on {} (policy {}):",
        r.table, r.key, r.node, r.policy
    );
    render_version(&mut out, &r.current);
    if !r.others.is_empty() {
        let _ = writeln!(out, "other nodes:");
        for v in &r.others {
            render_version(&mut out, v);
        }
    }
    if r.conflicts.is_empty() {
        let _ = writeln!(out, "no conflict recorded for this key");
    } else {
        let _ = writeln!(out, "conflicts, oldest first:");
        for c in &r.conflicts {
            let _ = writeln!(
                out,
                "  {} on {}: {} from {} {} (incoming committed {} at {}, local committed {}; \
                 {} under {})\n    local  {}\n    incoming {}",
                c.resolved_at,
                c.node,
                c.kind,
                c.source,
                c.resolution,
                c.remote_commit_ts.as_deref().unwrap_or("unknown"),
                c.source_lsn.clone().unwrap_or_else(|| c
                    .source_change_id
                    .map_or("unknown".to_string(), |id| format!("change row {id}"))),
                c.local_commit_ts.as_deref().unwrap_or("unknown"),
                c.rule.as_deref().unwrap_or("rule unknown"),
                c.policy.as_deref().unwrap_or("unknown policy"),
                c.local_row
                    .as_ref()
                    .map_or("(none)".to_string(), |j| j.to_string()),
                c.remote_row
                    .as_ref()
                    .map_or("(none)".to_string(), |j| j.to_string()),
            );
        }
    }
    out
}

/// One journaled conflict whose outcome another policy would change.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayChange {
    /// The journal entry.
    pub conflict: ConflictEntry,
    /// What the recorded policy decided (recomputed with [`conflict::decide`]).
    pub recorded: String,
    /// What the replayed policy decides.
    pub replayed: String,
}

/// A journal entry a replay skipped.
#[derive(Clone, Debug, Serialize)]
pub struct NotReplayable {
    /// The node whose journal holds it.
    pub node: String,
    /// Its id there.
    pub id: i64,
    /// Why it cannot be replayed.
    pub reason: String,
}

/// What `walbridge conflicts replay` reports.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    /// The policy replayed.
    pub policy: String,
    /// Journal entries examined.
    pub examined: usize,
    /// Entries a replay cannot recompute exactly: journaled without the facts (before the
    /// journal kept them) or with a row version kept cut (over the size bound).
    pub not_replayable: usize,
    /// Those entries, with the reason.
    pub not_replayable_entries: Vec<NotReplayable>,
    /// Entries whose outcome would change, oldest first.
    pub changed: Vec<ReplayChange>,
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Insert => "insert",
        Action::Update => "update",
        Action::InsertFromUpdate => "insert_from_update",
        Action::Delete => "delete",
        Action::RecordTombstone => "record_tombstone",
        Action::Skip => "skip",
        Action::Stop => "stop",
    }
}

/// Why a journal entry cannot be replayed exactly, if it cannot.
fn not_replayable(e: &ConflictEntry) -> Option<&'static str> {
    if e.policy.is_none() || e.complete_row.is_none() || e.local_tombstone.is_none() {
        Some("journaled without the decision's facts")
    } else if e.priority.is_none() {
        Some("journaled without the priority order")
    } else if e.local_row_truncated || e.remote_row_truncated {
        Some("a row version is over replication.conflict_max_row_bytes and kept cut")
    } else {
        None
    }
}

/// The facts of a journal entry as [`conflict::decide`] takes them, ranks from the recorded
/// priority order; `None` when the entry lacks them.
fn decision_facts(e: &ConflictEntry) -> Option<(ConflictPolicy, Incoming, LocalState)> {
    let policy: ConflictPolicy = e.policy.as_deref()?.parse().ok()?;
    let order = e.priority.as_ref()?;
    let rank = |node: &str| order.iter().position(|n| n == node).unwrap_or(usize::MAX);
    let op = match e.kind.as_str() {
        "insert_exists" => ChangeOp::Insert,
        "update_missing" | "update_older" => ChangeOp::Update,
        "delete_missing" | "delete_older" => ChangeOp::Delete,
        _ => return None,
    };
    let time = |t: &Option<String>| t.as_deref().and_then(PgTimestamp::parse);
    let incoming = Incoming {
        op,
        version: Version {
            commit_time: time(&e.remote_commit_ts),
            writer_rank: rank(&e.source),
        },
        complete_row: e.complete_row?,
    };
    let local_version = e.local_writer.as_deref().map(|w| Version {
        commit_time: time(&e.local_commit_ts),
        writer_rank: rank(w),
    });
    let tombstone = e.local_tombstone?;
    let local = LocalState {
        row: if e.local_row.is_some() {
            local_version
        } else {
            None
        },
        row_equals_old: e.row_equals_old,
        tombstone: if tombstone { local_version } else { None },
    };
    Some((policy, incoming, local))
}

/// Recomputes every journaled conflict (within `since`) under `policy`; read-only.
pub async fn replay(
    config: &Config,
    policy: ConflictPolicy,
    since: Option<Duration>,
) -> Result<ReplayReport, ForensicsError> {
    let filter = Filter {
        since,
        ..Filter::default()
    };
    let entries = conflicts(config, &filter).await?;
    let mut report = ReplayReport {
        policy: policy.to_string(),
        examined: entries.len(),
        not_replayable: 0,
        not_replayable_entries: Vec::new(),
        changed: Vec::new(),
    };
    for e in entries {
        let facts = match not_replayable(&e) {
            Some(reason) => Err(reason),
            None => decision_facts(&e).ok_or("journaled without the decision's facts"),
        };
        let (recorded_policy, incoming, local) = match facts {
            Ok(f) => f,
            Err(reason) => {
                report.not_replayable += 1;
                report.not_replayable_entries.push(NotReplayable {
                    node: e.node.clone(),
                    id: e.id,
                    reason: reason.to_string(),
                });
                continue;
            }
        };
        let before = conflict::decide(recorded_policy, incoming, local).action;
        let after = conflict::decide(policy, incoming, local).action;
        if before != after {
            report.changed.push(ReplayChange {
                recorded: action_name(before).to_string(),
                replayed: action_name(after).to_string(),
                conflict: e,
            });
        }
    }
    Ok(report)
}

/// `walbridge conflicts replay` as text.
pub fn render_replay(r: &ReplayReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "under {}: {} of {} recorded conflicts would end differently ({} not replayable)",
        r.policy,
        r.changed.len(),
        r.examined,
        r.not_replayable
    );
    for c in &r.changed {
        let e = &c.conflict;
        let _ = writeln!(
            out,
            "  {} on {}: {} {} {} from {}: {} (under {}) -> {}",
            e.resolved_at,
            e.node,
            e.table,
            e.key,
            e.kind,
            e.source,
            c.recorded,
            e.policy.as_deref().unwrap_or("?"),
            c.replayed
        );
    }
    out
}
