//! `walbridge verify`: proves that every node holds the same rows, and names where they differ.
//!
//! Per replicated table, every node computes (concurrently, inside the database) the row count
//! and a content hash that does not depend on physical row order: the sums of two seeded
//! 64-bit hashes of each row's canonical text (see [`sql`]). Rows never leave the database
//! except for the handful of keys named at the end.
//!
//! When a table differs and has a key (primary key, else replica identity index), verify
//! bisects on it:
//!
//! ```text
//!   [whole table]            hashes differ
//!      │  reference node (most rows): keys at every n/16-th row  ──▶ 15 boundaries
//!      ▼
//!   [..b1) [b1..b2) ... [b15..)   one GROUP BY per node gives 16 bucket hashes
//!             │ differs
//!             ▼ recurse until a range holds ≤ 64 rows, then compare per-key hashes
//!   key 1507: row differs / missing on west
//! ```
//!
//! A range missing entirely on some node, or ranges beyond the difference budget, are
//! reported as ranges without descending further. Each node's queries for one table run in
//! one `REPEATABLE READ` read-only transaction, so a node's answers are mutually consistent;
//! while replication is flowing, changes still in flight show up as differences.
//!
//! Collision resistance: a difference goes unnoticed only if the count matches and both
//! 64-bit sums (mod 2^64) coincide. For data that is not crafted against `hashtextextended`
//! (Jenkins lookup3), a changed, missing or extra row makes each sum a fresh uniform value, so
//! the chance of missing it is about 2^-64 per sum, and the two seeds make the pair far less
//! likely still. It is a checksum for replication faults, not a defence against an attacker
//! who writes to the database.
//!
//! Generated columns are left out (peers recompute them, walbridge never writes them), and so
//! are `skip_columns` (never replicated). Columns are hashed in the first node's attribute
//! order, by name, so differing physical layouts compare equal.

pub mod sql;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use futures::future::try_join_all;
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, TableInfo, TableKind};
use crate::config::{Config, QualifiedName};
use crate::pgconn;
use sql::{KeyColumn, KeyRange, Statement, TableSql};

/// Tunables of the bisection.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Only this table (`--table`).
    pub table: Option<QualifiedName>,
    /// Pieces a differing range is split into per step.
    pub fanout: usize,
    /// A differing range with at most this many rows on every node is compared key by key.
    pub leaf_rows: i64,
    /// At most this many differences are named per table; beyond it, ranges stay coarse.
    pub max_differences: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            table: None,
            fanout: 16,
            leaf_rows: 64,
            max_differences: 50,
        }
    }
}

/// Verification could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A node could not be reached, or a query or catalog read on it failed.
    #[error(transparent)]
    Node(#[from] pgconn::NodeError),
    /// `--table` names a table that is not replicated.
    #[error(
        "table {0} is not replicated (no node has it, or replication.tables / exclude leave it \
         out); name a replicated table as schema.table"
    )]
    UnknownTable(String),
    /// A server sent a value verify cannot read (a walbridge bug or an unexpected server).
    #[error("node {node}: unexpected answer while {what}: {detail}")]
    Unexpected {
        /// The node.
        node: String,
        /// What was being done.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// SIGINT/SIGTERM arrived.
    #[error("interrupted; nothing was changed")]
    Interrupted,
}

impl VerifyError {
    /// Whether this is a usage error (exit code 2) rather than a failure.
    pub fn is_usage(&self) -> bool {
        matches!(self, VerifyError::UnknownTable(_))
    }
}

/// The outcome of `walbridge verify`, printed as text or as one JSON object.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Every table identical on every node.
    pub identical: bool,
    /// One entry per table, in name order.
    pub tables: Vec<TableReport>,
}

/// One table's comparison.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// Per node: row count and content hash (absent for a node lacking the table).
    pub nodes: BTreeMap<String, NodeSummary>,
    /// Same rows on every node.
    pub identical: bool,
    /// Key columns used to locate differences (empty: none, counts and hashes only).
    pub key: Vec<String>,
    /// Where the nodes differ, in key order.
    pub differences: Vec<Difference>,
    /// Caveats: no key, columns missing on a node, differences beyond the budget.
    pub notes: Vec<String>,
    /// Time spent on this table.
    pub seconds: f64,
}

/// A node's row count and content hash.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NodeSummary {
    /// Row count.
    pub rows: i64,
    /// 32 hex digits: the two 64-bit hash sums.
    pub hash: String,
}

/// A key range or a single key whose rows differ between nodes.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Difference {
    /// First key of the range (inclusive), `null` from the start of the table. For a single
    /// key, the key.
    pub from: Option<String>,
    /// End of the range (exclusive), `null` to the end of the table. For a single key, the key.
    pub to: Option<String>,
    /// The single differing key, when narrowed down to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Rows in the range (or with the key) per node.
    pub rows: BTreeMap<String, i64>,
    /// In words: "row differs", "missing on west", "43 rows differ".
    pub detail: String,
}

/// Row count and hash sums of a set of rows (sums kept mod 2^64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stats {
    rows: i64,
    sums: [u64; 2],
}

impl Stats {
    fn hash(&self) -> String {
        format!("{:016x}{:016x}", self.sums[0], self.sums[1])
    }
}

/// Parses an exact decimal sum (a `numeric` as text) and reduces it mod 2^64.
fn parse_sum(text: &str) -> Option<u64> {
    // |sum| < rows * 2^63; i128 holds it for any table with fewer than 2^64 rows.
    text.trim().parse::<i128>().ok().map(|v| v as u64)
}

/// A connected node.
struct Node {
    name: String,
    client: Client,
}

impl Node {
    async fn query(
        &self,
        stmt: &Statement,
        what: &str,
    ) -> Result<Vec<tokio_postgres::Row>, VerifyError> {
        let params: Vec<&(dyn ToSql + Sync)> = stmt
            .params
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect();
        self.client
            .query(&stmt.sql, &params)
            .await
            .map_err(|source| pgconn::NodeError::sql(&self.name, what)(source).into())
    }

    async fn execute(&self, sql: &str, what: &str) -> Result<(), VerifyError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|source| pgconn::NodeError::sql(&self.name, what)(source).into())
    }

    fn unexpected(&self, what: &str, detail: impl Into<String>) -> VerifyError {
        VerifyError::Unexpected {
            node: self.name.clone(),
            what: what.to_string(),
            detail: detail.into(),
        }
    }

    /// Reads `(count, sum1, sum2)` starting at column `at`.
    fn stats_at(&self, row: &tokio_postgres::Row, at: usize) -> Result<Stats, VerifyError> {
        let what = "reading a content hash";
        let rows: i64 = row
            .try_get(at)
            .map_err(|e| self.unexpected(what, e.to_string()))?;
        let mut sums = [0u64; 2];
        for (i, s) in sums.iter_mut().enumerate() {
            let text: String = row
                .try_get(at + 1 + i)
                .map_err(|e| self.unexpected(what, e.to_string()))?;
            *s = parse_sum(&text)
                .ok_or_else(|| self.unexpected(what, format!("{text:?} is not an integer")))?;
        }
        Ok(Stats { rows, sums })
    }

    async fn summary(&self, t: &TableSql, range: &KeyRange) -> Result<Stats, VerifyError> {
        let rows = self.query(&t.summary(range), "hashing rows").await?;
        let row = rows
            .first()
            .ok_or_else(|| self.unexpected("hashing rows", "no result row"))?;
        self.stats_at(row, 0)
    }

    async fn buckets(
        &self,
        t: &TableSql,
        range: &KeyRange,
        boundaries: &[Vec<String>],
    ) -> Result<Vec<Stats>, VerifyError> {
        let what = "hashing key ranges";
        let mut out = vec![Stats::default(); boundaries.len() + 1];
        for row in self.query(&t.buckets(range, boundaries), what).await? {
            let bucket: i32 = row
                .try_get(0)
                .map_err(|e| self.unexpected(what, e.to_string()))?;
            let slot = usize::try_from(bucket)
                .ok()
                .and_then(|b| out.get_mut(b))
                .ok_or_else(|| self.unexpected(what, format!("bucket {bucket} out of range")))?;
            *slot = self.stats_at(&row, 1)?;
        }
        Ok(out)
    }

    async fn quantiles(
        &self,
        t: &TableSql,
        range: &KeyRange,
        step: i64,
    ) -> Result<Vec<Vec<String>>, VerifyError> {
        let what = "splitting a key range";
        self.query(&t.quantiles(range, step), what)
            .await?
            .iter()
            .map(|row| self.key_of(row, t.key.len(), what))
            .collect()
    }

    fn key_of(
        &self,
        row: &tokio_postgres::Row,
        n: usize,
        what: &str,
    ) -> Result<Vec<String>, VerifyError> {
        (0..n)
            .map(|i| {
                row.try_get::<_, Option<String>>(i)
                    .map_err(|e| self.unexpected(what, e.to_string()))
                    .map(|v| v.unwrap_or_else(|| "NULL".to_string()))
            })
            .collect()
    }

    async fn row_hashes(
        &self,
        t: &TableSql,
        range: &KeyRange,
    ) -> Result<Vec<(Vec<String>, (String, String))>, VerifyError> {
        let what = "hashing single rows";
        let n = t.key.len();
        let mut out = Vec::new();
        for row in self.query(&t.row_hashes(range), what).await? {
            let key = self.key_of(&row, n, what)?;
            let h1: String = row
                .try_get(n)
                .map_err(|e| self.unexpected(what, e.to_string()))?;
            let h2: String = row
                .try_get(n + 1)
                .map_err(|e| self.unexpected(what, e.to_string()))?;
            out.push((key, (h1, h2)));
        }
        Ok(out)
    }
}

/// Runs `walbridge verify`: compares the replicated tables (or `options.table`) on every node.
pub async fn verify(
    config: &Config,
    options: &VerifyOptions,
    shutdown: &CancellationToken,
) -> Result<Report, VerifyError> {
    let nodes = try_join_all(config.nodes.iter().map(|n| async move {
        let client = pgconn::connect(&n.dsn, "walbridge-verify")
            .await
            .map_err(pgconn::NodeError::connect(&n.name))?;
        let node = Node {
            name: n.name.clone(),
            client,
        };
        // Text forms must not depend on per-role or per-database defaults; JIT compilation
        // costs more than it saves on these one-pass scans.
        node.execute(
            "SET bytea_output = 'hex'; SET statement_timeout = 0; \
             SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0; SET jit = off",
            "preparing the session",
        )
        .await?;
        Ok::<_, VerifyError>(node)
    }))
    .await?;

    // Per node, the replicated tables it has.
    let catalogs = try_join_all(nodes.iter().map(|n| replicated_tables(config, n))).await?;
    let mut names: Vec<QualifiedName> = catalogs
        .iter()
        .flat_map(|m| m.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Some(only) = &options.table {
        if !names.contains(only) {
            return Err(VerifyError::UnknownTable(only.to_string()));
        }
        names = vec![only.clone()];
    }

    let mut tables = Vec::with_capacity(names.len());
    for name in &names {
        if shutdown.is_cancelled() {
            return Err(VerifyError::Interrupted);
        }
        let infos: Vec<Option<&TableInfo>> = catalogs.iter().map(|m| m.get(name)).collect();
        let started = Instant::now();
        let report = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(VerifyError::Interrupted),
            r = verify_table(config, options, &nodes, name, &infos) => r?,
        };
        tracing::debug!(table = %name, seconds = started.elapsed().as_secs_f64(), "verified");
        tables.push(report);
    }
    Ok(Report {
        identical: tables.iter().all(|t| t.identical),
        tables,
    })
}

/// The tables `config` replicates that exist on `node`.
async fn replicated_tables(
    config: &Config,
    node: &Node,
) -> Result<BTreeMap<QualifiedName, TableInfo>, VerifyError> {
    let catalog_err = |source| VerifyError::from(pgconn::NodeError::catalog(&node.name)(source));
    let mut out = BTreeMap::new();
    for t in catalog::list_tables(&node.client)
        .await
        .map_err(catalog_err)?
    {
        if !config.replication.tables.matches(&t.schema, &t.name) {
            continue;
        }
        if let Some(info) = catalog::table_info(&node.client, &t.schema, &t.name)
            .await
            .map_err(catalog_err)?
        {
            out.insert(QualifiedName::new(&t.schema, &t.name), info);
        }
    }
    Ok(out)
}

/// Compares one table; `infos[i]` is its description on `nodes[i]`, if it has it.
async fn verify_table(
    config: &Config,
    options: &VerifyOptions,
    nodes: &[Node],
    name: &QualifiedName,
    infos: &[Option<&TableInfo>],
) -> Result<TableReport, VerifyError> {
    let started = Instant::now();
    let mut notes = Vec::new();
    let present: Vec<(&Node, &TableInfo)> = nodes
        .iter()
        .zip(infos)
        .filter_map(|(n, i)| i.map(|i| (n, i)))
        .collect();
    let missing: Vec<&str> = nodes
        .iter()
        .zip(infos)
        .filter(|(_, i)| i.is_none())
        .map(|(n, _)| n.name.as_str())
        .collect();
    if !missing.is_empty() {
        notes.push(format!("table missing on {}", missing.join(", ")));
    }
    let Some((_, first)) = present.first() else {
        return Err(VerifyError::UnknownTable(name.to_string()));
    };

    // Columns: the first node's order; those every node has, minus generated and skipped.
    let skip = config.skip_columns_for(&name.schema, &name.name);
    let mut columns = Vec::new();
    for c in first.columns.iter().filter(|c| !c.generated) {
        if skip.contains(&c.name) {
            continue;
        }
        let lacking: Vec<&str> = present
            .iter()
            .filter(|(_, i)| i.column(&c.name).is_none_or(|col| col.generated))
            .map(|(n, _)| n.name.as_str())
            .collect();
        if lacking.is_empty() {
            columns.push(c.name.clone());
        } else {
            notes.push(format!(
                "column {:?} missing on {} (not compared)",
                c.name,
                lacking.join(", ")
            ));
        }
    }
    for (n, info) in present.iter().skip(1) {
        for c in info.columns.iter().filter(|c| !c.generated) {
            if !skip.contains(&c.name) && first.column(&c.name).is_none() {
                notes.push(format!(
                    "column {:?} exists on {} but not on {} (not compared)",
                    c.name, n.name, present[0].0.name
                ));
            }
        }
    }
    let schema_differs = !notes.is_empty();

    // The key: primary key, else replica identity index, if every node has those columns.
    let key: Vec<KeyColumn> = first
        .unique_key()
        .map(|cols| {
            cols.iter()
                .filter_map(|k| {
                    first.column(k).map(|c| KeyColumn {
                        name: c.name.clone(),
                        type_sql: c.type_sql.clone(),
                    })
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let key_usable = !key.is_empty()
        && key.iter().all(|k| {
            present
                .iter()
                .all(|(_, i)| i.column(&k.name).is_some_and(|c| !c.generated))
        });
    let key = if key_usable { key } else { Vec::new() };
    if key.is_empty() {
        notes.push(
            "no primary key: row counts and hashes compared, differing rows cannot be located"
                .to_string(),
        );
    }
    let table = TableSql {
        from: match first.kind {
            TableKind::Partitioned => first.quoted_name(),
            TableKind::Ordinary => format!("ONLY {}", first.quoted_name()),
        },
        columns,
        key,
    };

    let session: Vec<&Node> = present.iter().map(|(n, _)| *n).collect();
    try_join_all(session.iter().map(|n| {
        n.execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            "starting a snapshot",
        )
    }))
    .await?;
    let result = compare(options, &session, &table).await;
    // Read-only: ending the transaction cannot lose anything, and a failed one must end too.
    for n in &session {
        let _ = n.client.batch_execute("ROLLBACK").await;
    }
    let (totals, differences, truncated) = result?;

    let nodes_out: BTreeMap<String, NodeSummary> = session
        .iter()
        .zip(&totals)
        .map(|(n, s)| {
            (
                n.name.clone(),
                NodeSummary {
                    rows: s.rows,
                    hash: s.hash(),
                },
            )
        })
        .collect();
    let same = totals.windows(2).all(|w| w[0] == w[1]);
    if truncated {
        notes.push(format!(
            "more than {} differences; the last ones are reported as ranges",
            options.max_differences
        ));
    }
    Ok(TableReport {
        table: name.to_string(),
        nodes: nodes_out,
        identical: same && !schema_differs,
        key: table.key.iter().map(|k| k.name.clone()).collect(),
        differences,
        notes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Totals per node, then (when they differ and there is a key) the differences.
async fn compare(
    options: &VerifyOptions,
    nodes: &[&Node],
    table: &TableSql,
) -> Result<(Vec<Stats>, Vec<Difference>, bool), VerifyError> {
    let whole = KeyRange::default();
    let totals = try_join_all(nodes.iter().map(|n| n.summary(table, &whole))).await?;
    let mut differences = Vec::new();
    let mut truncated = false;
    if totals.windows(2).all(|w| w[0] == w[1]) || table.key.is_empty() {
        return Ok((totals, differences, truncated));
    }

    let fanout = options.fanout.max(2);
    let leaf_rows = options.leaf_rows.max(1);
    // Depth first, pieces pushed in reverse: differences come out in key order.
    let mut stack: Vec<(KeyRange, Vec<Stats>)> = vec![(whole, totals.clone())];
    while let Some((range, stats)) = stack.pop() {
        if stats.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        let rows: Vec<i64> = stats.iter().map(|s| s.rows).collect();
        let most = rows.iter().copied().max().unwrap_or(0);
        let room = options.max_differences.saturating_sub(differences.len());
        if room == 0 {
            truncated = true;
            differences.push(range_difference(nodes, &range, &rows));
            continue;
        }
        // A range some node has no row of at all is named as a range (unless it is one row).
        if rows.contains(&0) && most > 1 {
            differences.push(range_difference(nodes, &range, &rows));
            continue;
        }
        if most <= leaf_rows {
            let keys = compare_keys(nodes, table, &range).await?;
            if keys.len() > room {
                truncated = true;
                differences.push(range_difference(nodes, &range, &rows));
            } else {
                differences.extend(keys);
            }
            continue;
        }
        // Split at quantiles of the node with the most rows here.
        let reference = rows
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| **r)
            .map_or(0, |(i, _)| i);
        let step = (most + fanout as i64 - 1) / fanout as i64;
        let boundaries = match nodes.get(reference) {
            Some(n) => n.quantiles(table, &range, step.max(1)).await?,
            None => Vec::new(),
        };
        if boundaries.is_empty() {
            differences.push(range_difference(nodes, &range, &rows));
            continue;
        }
        let per_node =
            try_join_all(nodes.iter().map(|n| n.buckets(table, &range, &boundaries))).await?;
        let pieces = split(&range, &boundaries);
        for (i, piece) in pieces.into_iter().enumerate().rev() {
            let piece_stats: Vec<Stats> = per_node
                .iter()
                .map(|b| b.get(i).copied().unwrap_or_default())
                .collect();
            if piece_stats.windows(2).any(|w| w[0] != w[1]) {
                stack.push((piece, piece_stats));
            }
        }
    }
    Ok((totals, merge_adjacent(differences), truncated))
}

/// Joins consecutive ranges that say the same thing (a block missing on a node, cut into
/// pieces by the bisection) into one range.
fn merge_adjacent(differences: Vec<Difference>) -> Vec<Difference> {
    let mut out: Vec<Difference> = Vec::with_capacity(differences.len());
    for d in differences {
        if let Some(prev) = out.last_mut() {
            let joinable = prev.key.is_none()
                && d.key.is_none()
                && prev.detail == d.detail
                && prev.to.is_some()
                && prev.to == d.from
                && prev.rows.keys().eq(d.rows.keys());
            if joinable {
                prev.to = d.to;
                for (node, n) in d.rows {
                    *prev.rows.entry(node).or_insert(0) += n;
                }
                continue;
            }
        }
        out.push(d);
    }
    out
}

/// `range` cut at `boundaries` into `boundaries.len() + 1` consecutive pieces.
fn split(range: &KeyRange, boundaries: &[Vec<String>]) -> Vec<KeyRange> {
    let mut out = Vec::with_capacity(boundaries.len() + 1);
    let mut lower = range.lower.clone();
    for b in boundaries {
        out.push(KeyRange {
            lower,
            upper: Some(b.clone()),
        });
        lower = Some(b.clone());
    }
    out.push(KeyRange {
        lower,
        upper: range.upper.clone(),
    });
    out
}

/// A key as people write it: the value, or `(a, b)` for a composite key.
fn show_key(key: &[String]) -> String {
    match key {
        [one] => one.clone(),
        many => format!("({})", many.join(", ")),
    }
}

fn range_difference(nodes: &[&Node], range: &KeyRange, rows: &[i64]) -> Difference {
    let counts: BTreeMap<String, i64> = nodes
        .iter()
        .zip(rows)
        .map(|(n, r)| (n.name.clone(), *r))
        .collect();
    let empty: Vec<&str> = nodes
        .iter()
        .zip(rows)
        .filter(|(_, r)| **r == 0)
        .map(|(n, _)| n.name.as_str())
        .collect();
    let detail = if !empty.is_empty() {
        format!("every row of the range missing on {}", empty.join(", "))
    } else if rows.windows(2).all(|w| w[0] == w[1]) {
        "rows differ".to_string()
    } else {
        "row counts differ".to_string()
    };
    Difference {
        from: range.lower.as_deref().map(show_key),
        to: range.upper.as_deref().map(show_key),
        key: None,
        rows: counts,
        detail,
    }
}

/// Compares a small range key by key.
async fn compare_keys(
    nodes: &[&Node],
    table: &TableSql,
    range: &KeyRange,
) -> Result<Vec<Difference>, VerifyError> {
    let lists = try_join_all(nodes.iter().map(|n| n.row_hashes(table, range))).await?;
    // Keys in key order (each list is ordered by the server), each once.
    let mut keys: Vec<&Vec<String>> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (key, _) in lists.iter().flatten() {
        if seen.insert(key) {
            keys.push(key);
        }
    }
    let per_node: Vec<BTreeMap<&Vec<String>, &(String, String)>> = lists
        .iter()
        .map(|l| l.iter().map(|(k, h)| (k, h)).collect())
        .collect();
    let mut out = Vec::new();
    for key in keys {
        let versions: Vec<Option<&&(String, String)>> =
            per_node.iter().map(|m| m.get(key)).collect();
        if versions.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        let missing: Vec<&str> = nodes
            .iter()
            .zip(&versions)
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n.name.as_str())
            .collect();
        let detail = if missing.is_empty() {
            "row differs".to_string()
        } else {
            format!("missing on {}", missing.join(", "))
        };
        let shown = show_key(key);
        out.push(Difference {
            from: Some(shown.clone()),
            to: Some(shown.clone()),
            key: Some(shown),
            rows: nodes
                .iter()
                .zip(&versions)
                .map(|(n, v)| (n.name.clone(), i64::from(v.is_some())))
                .collect(),
            detail,
        });
    }
    Ok(out)
}

impl Report {
    /// The report as one JSON object (`--json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"identical\": false, \"error\": {:?}}}", e.to_string()))
    }

    /// The report as text for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            let rows: Vec<i64> = t.nodes.values().map(|n| n.rows).collect();
            if t.identical {
                let _ = writeln!(
                    out,
                    "{}: identical ({} rows, {:.1}s)",
                    t.table,
                    rows.first().copied().unwrap_or(0),
                    t.seconds
                );
            } else {
                let _ = writeln!(out, "{}: DIFFERENT ({:.1}s)", t.table, t.seconds);
                let width = t.nodes.keys().map(String::len).max().unwrap_or(0);
                for (name, n) in &t.nodes {
                    let _ = writeln!(out, "  {name:width$}  {:>12} rows  hash {}", n.rows, n.hash);
                }
                let key = match t.key.as_slice() {
                    [one] => one.clone(),
                    many => format!("({})", many.join(", ")),
                };
                for d in &t.differences {
                    let counts = d
                        .rows
                        .iter()
                        .map(|(n, r)| format!("{n} {r}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let place = match (&d.key, &d.from, &d.to) {
                        (Some(k), _, _) => format!("{key} = {k}"),
                        (None, Some(f), Some(to)) => format!("{key} >= {f} and < {to}"),
                        (None, Some(f), None) => format!("{key} >= {f}"),
                        (None, None, Some(to)) => format!("{key} < {to}"),
                        (None, None, None) => "whole table".to_string(),
                    };
                    let _ = writeln!(out, "  {place}: {} (rows: {counts})", d.detail);
                }
            }
            for note in &t.notes {
                let _ = writeln!(out, "  note: {note}");
            }
        }
        let differing = self.tables.iter().filter(|t| !t.identical).count();
        if differing == 0 {
            let _ = writeln!(
                out,
                "all {} table(s) identical on every node",
                self.tables.len()
            );
        } else {
            let _ = writeln!(out, "{differing} of {} table(s) differ", self.tables.len());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_reduce_mod_2_64() {
        assert_eq!(parse_sum("0"), Some(0));
        assert_eq!(parse_sum("-1"), Some(u64::MAX));
        assert_eq!(parse_sum("18446744073709551617"), Some(1));
        assert_eq!(
            parse_sum("-5261452136018868549752"),
            Some((-5261452136018868549752i128) as u64)
        );
        assert_eq!(parse_sum("1.5"), None);
        assert_eq!(parse_sum(""), None);
    }

    #[test]
    fn split_covers_the_range_without_gaps() {
        let r = KeyRange {
            lower: Some(vec!["0".into()]),
            upper: None,
        };
        let pieces = split(&r, &[vec!["10".into()], vec!["20".into()]]);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0].lower, r.lower);
        assert_eq!(pieces[0].upper, Some(vec!["10".into()]));
        assert_eq!(pieces[1].lower, Some(vec!["10".into()]));
        assert_eq!(pieces[2].upper, None);
    }

    #[test]
    fn adjacent_missing_ranges_merge() {
        let range = |from: Option<&str>, to: Option<&str>, east: i64| Difference {
            from: from.map(String::from),
            to: to.map(String::from),
            key: None,
            rows: [("east".to_string(), east), ("west".to_string(), 0)]
                .into_iter()
                .collect(),
            detail: "every row of the range missing on west".into(),
        };
        let merged = merge_adjacent(vec![
            range(Some("1"), Some("5"), 4),
            range(Some("5"), Some("9"), 4),
            range(Some("20"), None, 7),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].from.as_deref(), Some("1"));
        assert_eq!(merged[0].to.as_deref(), Some("9"));
        assert_eq!(merged[0].rows["east"], 8);
        assert_eq!(merged[1].from.as_deref(), Some("20"));
    }

    #[test]
    fn keys_show_as_written() {
        assert_eq!(show_key(&["5".into()]), "5");
        assert_eq!(show_key(&["5".into(), "x".into()]), "(5, x)");
    }

    #[test]
    fn text_report_names_ranges_and_keys() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "east".to_string(),
            NodeSummary {
                rows: 10,
                hash: "a".repeat(32),
            },
        );
        nodes.insert(
            "west".to_string(),
            NodeSummary {
                rows: 9,
                hash: "b".repeat(32),
            },
        );
        let report = Report {
            identical: false,
            tables: vec![TableReport {
                table: "public.t".into(),
                nodes,
                identical: false,
                key: vec!["id".into()],
                differences: vec![
                    Difference {
                        from: Some("3".into()),
                        to: Some("3".into()),
                        key: Some("3".into()),
                        rows: [("east".to_string(), 1), ("west".to_string(), 0)]
                            .into_iter()
                            .collect(),
                        detail: "missing on west".into(),
                    },
                    Difference {
                        from: Some("100".into()),
                        to: None,
                        key: None,
                        rows: BTreeMap::new(),
                        detail: "rows differ".into(),
                    },
                ],
                notes: vec![],
                seconds: 0.25,
            }],
        };
        let text = report.render();
        assert!(text.contains("public.t: DIFFERENT"), "{text}");
        assert!(text.contains("id = 3: missing on west"), "{text}");
        assert!(text.contains("id >= 100: rows differ"), "{text}");
        assert!(text.contains("1 of 1 table(s) differ"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["identical"], false);
        assert_eq!(json["tables"][0]["differences"][0]["key"], "3");
        assert_eq!(
            json["tables"][0]["differences"][1]["to"],
            serde_json::Value::Null
        );
        assert_eq!(json["tables"][0]["nodes"]["west"]["rows"], 9);
    }
}
