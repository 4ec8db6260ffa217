//! `walbridge drift`: where the nodes' schemas of the replicated tables differ.
//!
//! DDL outside `walbridge.ddl()` is not replicated, so nodes drift apart: a column added on
//! one node only, a type widened on another. Drift reads each node's catalog and compares,
//! per replicated table, what replication depends on:
//!
//! ```text
//!   node east ─ catalog ─┐                     public.t: column note missing on west
//!   node west ─ catalog ─┼─▶ compare by name ─▶ public.t: column id: identity differs
//!   node ...  ─ catalog ─┘   (pure, below)      public.u: missing on west
//! ```
//!
//! Compared: presence of the table, presence of each column, its type (`format_type`), its
//! nullability, its identity kind (`ALWAYS` / `BY DEFAULT`), its generation expression, the
//! primary key columns and the replica identity. Column order is not compared (walbridge
//! applies by name), nor are `skip_columns` (never sent to peers), nor plain defaults.
//!
//! Some differences stop replication as soon as a row of that table changes: a table missing
//! on a node, or a column missing on a node (the applier stops that direction with a definite
//! error, see [`crate::apply`]). [`Difference::stops_replication`] says which; `setup` and
//! `check-config --connect` refuse those and print the others as warnings.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use futures::future::join_all;
use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::{self, TableInfo};
use crate::config::{Config, QualifiedName};
use crate::event::ReplicaIdentity;
use crate::pgconn;

/// Drift could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// A node's catalog could not be read.
    #[error(transparent)]
    Node(#[from] pgconn::NodeError),
    /// `--table` names a table that is not replicated.
    #[error(
        "table {0} is not replicated (no node has it, or replication.tables / exclude leave it \
         out); name a replicated table as schema.table"
    )]
    UnknownTable(String),
}

impl DriftError {
    /// Whether this is a usage error (exit code 2) rather than a failure.
    pub fn is_usage(&self) -> bool {
        matches!(self, DriftError::UnknownTable(_))
    }
}

/// What differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The table exists on some nodes only.
    MissingTable,
    /// The column exists on some nodes only.
    MissingColumn,
    /// The column's type (`format_type`) differs.
    Type,
    /// `NOT NULL` on some nodes only.
    Nullability,
    /// Identity kind: `ALWAYS`, `BY DEFAULT` or none.
    Identity,
    /// Stored generation expression, or none.
    Generated,
    /// Primary key columns.
    PrimaryKey,
    /// Replica identity setting (and index columns).
    ReplicaIdentity,
}

impl Kind {
    /// The thing compared, in words.
    fn what(self) -> &'static str {
        match self {
            Kind::MissingTable | Kind::MissingColumn => "presence",
            Kind::Type => "type",
            Kind::Nullability => "nullability",
            Kind::Identity => "identity",
            Kind::Generated => "generation expression",
            Kind::PrimaryKey => "primary key",
            Kind::ReplicaIdentity => "replica identity",
        }
    }
}

/// One difference of one table between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// What differs.
    pub kind: Kind,
    /// The column, for column differences (`null` for table-level ones).
    pub column: Option<String>,
    /// Per node, its value: the column's type for `missing_column`, `"present"` for
    /// `missing_table`, the compared property otherwise; `null` where the node has none
    /// (no table, no column, no identity, no key).
    pub values: BTreeMap<String, Option<String>>,
    /// Nodes lacking the table or column (`missing_*` kinds), else empty.
    pub missing_on: Vec<String>,
    /// The difference in words.
    pub detail: String,
}

impl Difference {
    /// Whether replication stops on this difference when a row of the table changes: a table
    /// or column missing on a node.
    pub fn stops_replication(&self) -> bool {
        matches!(self.kind, Kind::MissingTable | Kind::MissingColumn)
    }
}

/// One table's differences (empty: same shape everywhere).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableDrift {
    /// `schema.table`.
    pub table: String,
    /// What differs, table-level first, then column by column.
    pub differences: Vec<Difference>,
}

/// A node whose catalog was not read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unreachable {
    /// The node.
    pub node: String,
    /// Why, in words.
    pub error: String,
}

/// The outcome of `walbridge drift`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Some table differs between the compared nodes.
    pub drift: bool,
    /// The nodes whose catalogs were compared.
    pub nodes: Vec<String>,
    /// Nodes that could not be reached (their tables were not compared).
    pub unreachable: Vec<Unreachable>,
    /// Every replicated table (or the `--table` one), in name order.
    pub tables: Vec<TableDrift>,
}

impl Report {
    /// 0 no drift and every node compared, 1 drift or an unreachable node (as `verify`, which
    /// fails with 1 when it cannot reach a node).
    pub fn exit_code(&self) -> u8 {
        u8::from(self.drift || !self.unreachable.is_empty())
    }

    /// Every difference, with its table.
    pub fn differences(&self) -> impl Iterator<Item = (&str, &Difference)> {
        self.tables
            .iter()
            .flat_map(|t| t.differences.iter().map(move |d| (t.table.as_str(), d)))
    }

    /// The human form: one block per table that differs, then a summary line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for u in &self.unreachable {
            let _ = writeln!(
                out,
                "node {}: unreachable, not compared: {}",
                u.node, u.error
            );
        }
        for t in self.tables.iter().filter(|t| !t.differences.is_empty()) {
            let _ = writeln!(
                out,
                "{}: {} difference{}",
                t.table,
                t.differences.len(),
                if t.differences.len() == 1 { "" } else { "s" }
            );
            for d in &t.differences {
                let _ = writeln!(out, "  {}", d.detail);
            }
        }
        let differing = self
            .tables
            .iter()
            .filter(|t| !t.differences.is_empty())
            .count();
        let _ = writeln!(
            out,
            "{} table{} compared on {}: {}",
            self.tables.len(),
            if self.tables.len() == 1 { "" } else { "s" },
            if self.nodes.is_empty() {
                "no node".to_string()
            } else {
                self.nodes.join(", ")
            },
            if differing == 0 {
                "no drift".to_string()
            } else {
                format!("drift in {differing}")
            }
        );
        out
    }
}

/// A table on one node: the catalog's description and its generation expressions.
#[derive(Clone, Debug)]
pub struct TableShape {
    /// Columns, keys, replica identity.
    pub info: TableInfo,
    /// Stored generated column → its expression (`pg_get_expr`).
    pub generated: BTreeMap<String, String>,
}

/// One node's replicated tables.
#[derive(Clone, Debug)]
pub struct NodeShapes {
    /// The node.
    pub node: String,
    /// Its tables that the configuration selects.
    pub tables: BTreeMap<QualifiedName, TableShape>,
}

/// Reads the replicated tables (or only `only`) of one node.
pub async fn read_node(
    client: &Client,
    node: &str,
    config: &Config,
    only: Option<&QualifiedName>,
) -> Result<NodeShapes, DriftError> {
    let err = |source| DriftError::from(pgconn::NodeError::catalog(node)(source));
    let mut tables = BTreeMap::new();
    for t in catalog::list_tables(client).await.map_err(err)? {
        if !config.replication.tables.matches(&t.schema, &t.name) {
            continue;
        }
        let name = QualifiedName::new(t.schema.clone(), t.name.clone());
        if only.is_some_and(|o| *o != name) {
            continue;
        }
        let Some(info) = catalog::table_info(client, &t.schema, &t.name)
            .await
            .map_err(err)?
        else {
            continue;
        };
        let generated = client
            .query(
                "SELECT a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                   FROM pg_catalog.pg_attrdef d
                   JOIN pg_catalog.pg_attribute a
                     ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                  WHERE d.adrelid = $1 AND a.attgenerated <> '' AND NOT a.attisdropped",
                &[&info.oid],
            )
            .await
            .map_err(|e| err(e.into()))?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        tables.insert(name, TableShape { info, generated });
    }
    Ok(NodeShapes {
        node: node.to_string(),
        tables,
    })
}

/// Compares open sessions (setup, `check-config --connect`): every node reached.
pub async fn compare_sessions(
    config: &Config,
    sessions: &[(&str, &Client)],
) -> Result<Report, DriftError> {
    let mut shapes = Vec::with_capacity(sessions.len());
    for (node, client) in sessions {
        shapes.push(read_node(client, node, config, None).await?);
    }
    Ok(compare(
        &shapes,
        &config.replication.skip_columns,
        Vec::new(),
    ))
}

/// Runs `walbridge drift`: connects to every node (concurrently), reads and compares.
pub async fn drift(config: &Config, only: Option<&QualifiedName>) -> Result<Report, DriftError> {
    let reads = join_all(config.nodes.iter().map(|n| async move {
        let client = match pgconn::connect(&n.dsn, "walbridge-drift").await {
            Ok(c) => c,
            Err(e) => {
                return Ok(Err(Unreachable {
                    node: n.name.clone(),
                    error: e.to_string(),
                }))
            }
        };
        read_node(&client, &n.name, config, only).await.map(Ok)
    }))
    .await;
    let mut shapes = Vec::new();
    let mut unreachable = Vec::new();
    for r in reads {
        match r? {
            Ok(s) => shapes.push(s),
            Err(u) => unreachable.push(u),
        }
    }
    if let Some(only) = only {
        if !shapes.is_empty() && !shapes.iter().any(|s| s.tables.contains_key(only)) {
            return Err(DriftError::UnknownTable(only.to_string()));
        }
    }
    Ok(compare(
        &shapes,
        &config.replication.skip_columns,
        unreachable,
    ))
}

/// Compares the nodes' tables (pure).
pub fn compare(
    nodes: &[NodeShapes],
    skip_columns: &BTreeMap<QualifiedName, Vec<String>>,
    unreachable: Vec<Unreachable>,
) -> Report {
    let names: BTreeSet<&QualifiedName> = nodes.iter().flat_map(|n| n.tables.keys()).collect();
    let tables: Vec<TableDrift> = names
        .into_iter()
        .map(|name| {
            let skipped: &[String] = skip_columns.get(name).map_or(&[], Vec::as_slice);
            TableDrift {
                table: name.to_string(),
                differences: compare_table(nodes, name, skipped),
            }
        })
        .collect();
    Report {
        drift: tables.iter().any(|t| !t.differences.is_empty()),
        nodes: nodes.iter().map(|n| n.node.clone()).collect(),
        unreachable,
        tables,
    }
}

fn compare_table(
    nodes: &[NodeShapes],
    name: &QualifiedName,
    skipped: &[String],
) -> Vec<Difference> {
    let mut out = Vec::new();
    let present: Vec<(&str, &TableShape)> = nodes
        .iter()
        .filter_map(|n| n.tables.get(name).map(|t| (n.node.as_str(), t)))
        .collect();
    if present.len() < nodes.len() {
        out.push(missing(
            Kind::MissingTable,
            None,
            "table",
            nodes
                .iter()
                .map(|n| {
                    let value = n.tables.get(name).map(|_| "present".to_string());
                    (n.node.clone(), value)
                })
                .collect(),
        ));
    }
    if present.len() < 2 {
        return out;
    }
    // Table-level properties.
    out.extend(differ(
        Kind::PrimaryKey,
        None,
        present.iter().map(|(n, t)| {
            let pk = &t.info.primary_key;
            (*n, (!pk.is_empty()).then(|| column_list(pk)))
        }),
    ));
    out.extend(differ(
        Kind::ReplicaIdentity,
        None,
        present
            .iter()
            .map(|(n, t)| (*n, Some(replica_identity(&t.info)))),
    ));
    // Columns, in the first node's order, then those the first node lacks.
    let mut columns: Vec<&str> = Vec::new();
    for (_, t) in &present {
        for c in &t.info.columns {
            if !columns.contains(&c.name.as_str()) && !skipped.contains(&c.name) {
                columns.push(&c.name);
            }
        }
    }
    for column in columns {
        let subject = format!("column {column}");
        let has: Vec<(&str, &TableShape, &catalog::ColumnInfo)> = present
            .iter()
            .filter_map(|(n, t)| t.info.column(column).map(|c| (*n, *t, c)))
            .collect();
        if has.len() < present.len() {
            out.push(missing(
                Kind::MissingColumn,
                Some(column),
                &subject,
                present
                    .iter()
                    .map(|(n, t)| {
                        (
                            n.to_string(),
                            t.info.column(column).map(|c| c.type_sql.clone()),
                        )
                    })
                    .collect(),
            ));
        }
        out.extend(differ(
            Kind::Type,
            Some(column),
            has.iter().map(|(n, _, c)| (*n, Some(c.type_sql.clone()))),
        ));
        out.extend(differ(
            Kind::Nullability,
            Some(column),
            has.iter().map(|(n, _, c)| {
                (
                    *n,
                    Some(if c.not_null { "NOT NULL" } else { "NULL" }.to_string()),
                )
            }),
        ));
        out.extend(differ(
            Kind::Identity,
            Some(column),
            has.iter().map(|(n, _, c)| {
                let identity = if c.identity_always {
                    Some("ALWAYS")
                } else if c.identity_by_default {
                    Some("BY DEFAULT")
                } else {
                    None
                };
                (*n, identity.map(str::to_string))
            }),
        ));
        out.extend(differ(
            Kind::Generated,
            Some(column),
            has.iter()
                .map(|(n, t, _)| (*n, t.generated.get(column).cloned())),
        ));
    }
    out
}

/// `(a, b)`.
fn column_list(columns: &[String]) -> String {
    format!("({})", columns.join(", "))
}

/// `default`, `full`, `nothing` or `index (a, b)`.
fn replica_identity(t: &TableInfo) -> String {
    match t.replica_identity {
        ReplicaIdentity::Default => "default".to_string(),
        ReplicaIdentity::Full => "full".to_string(),
        ReplicaIdentity::Nothing => "nothing".to_string(),
        ReplicaIdentity::Index => format!("index {}", column_list(&t.identity_index)),
    }
}

/// A `missing_*` difference from each node's value (`None`: lacks it).
fn missing(
    kind: Kind,
    column: Option<&str>,
    subject: &str,
    values: BTreeMap<String, Option<String>>,
) -> Difference {
    let missing_on: Vec<String> = values
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| n.clone())
        .collect();
    let present: Vec<String> = values
        .iter()
        .filter_map(|(n, v)| match (kind, v) {
            (_, None) => None,
            (Kind::MissingTable, Some(_)) => Some(n.clone()),
            (_, Some(v)) => Some(format!("{n}: {v}")),
        })
        .collect();
    let detail = format!(
        "{subject} missing on {} (present on {})",
        missing_on.join(", "),
        present.join(", ")
    );
    Difference {
        kind,
        column: column.map(str::to_string),
        values,
        missing_on,
        detail,
    }
}

/// A difference when the nodes' values of one property are not all equal.
fn differ<'a>(
    kind: Kind,
    column: Option<&str>,
    values: impl Iterator<Item = (&'a str, Option<String>)>,
) -> Option<Difference> {
    let values: BTreeMap<String, Option<String>> =
        values.map(|(n, v)| (n.to_string(), v)).collect();
    let distinct: BTreeSet<&Option<String>> = values.values().collect();
    if distinct.len() < 2 {
        return None;
    }
    let listed: Vec<String> = values
        .iter()
        .map(|(n, v)| format!("{n}: {}", v.as_deref().unwrap_or("none")))
        .collect();
    let subject = column.map_or_else(String::new, |c| format!("column {c}: "));
    Some(Difference {
        kind,
        column: column.map(str::to_string),
        detail: format!("{subject}{} differs ({})", kind.what(), listed.join(", ")),
        values,
        missing_on: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ColumnInfo, TableKind};

    fn column(name: &str, type_sql: &str) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            attnum: 1,
            type_oid: 23,
            type_sql: type_sql.into(),
            type_modifier: -1,
            not_null: false,
            generated: false,
            identity_always: false,
            identity_by_default: false,
            has_equality: true,
        }
    }

    fn node(name: &str, columns: Vec<ColumnInfo>, identity: ReplicaIdentity) -> NodeShapes {
        let info = TableInfo {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            kind: TableKind::Ordinary,
            replica_identity: identity,
            columns,
            primary_key: vec!["id".into()],
            identity_index: Vec::new(),
        };
        NodeShapes {
            node: name.into(),
            tables: [(
                QualifiedName::new("public", "t"),
                TableShape {
                    info,
                    generated: BTreeMap::new(),
                },
            )]
            .into(),
        }
    }

    #[test]
    fn three_nodes_one_odd_out_and_skipped_columns_ignored() {
        let base = || vec![column("id", "integer"), column("v", "text")];
        let mut odd = base();
        odd[1].type_sql = "character varying(10)".into();
        odd.push(column("local", "integer"));
        let nodes = [
            node("a", base(), ReplicaIdentity::Default),
            node("b", base(), ReplicaIdentity::Default),
            node("c", odd, ReplicaIdentity::Full),
        ];
        let report = compare(&nodes, &BTreeMap::new(), Vec::new());
        let kinds: Vec<(Kind, Option<&str>)> = report
            .differences()
            .map(|(_, d)| (d.kind, d.column.as_deref()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::ReplicaIdentity, None),
                (Kind::Type, Some("v")),
                (Kind::MissingColumn, Some("local")),
            ]
        );
        let (_, missing) = report.differences().nth(2).unwrap();
        assert_eq!(missing.missing_on, vec!["a".to_string(), "b".to_string()]);
        assert!(missing.stops_replication());
        assert_eq!(
            report.differences().next().unwrap().1.detail,
            "replica identity differs (a: default, b: default, c: full)"
        );
        assert_eq!(report.exit_code(), 1);

        // A skipped column is never sent: its absence elsewhere is no drift.
        let skip = [(QualifiedName::new("public", "t"), vec!["local".to_string()])].into();
        let report = compare(&nodes, &skip, Vec::new());
        assert_eq!(report.differences().count(), 2);
    }

    #[test]
    fn unreachable_node_exits_1_without_drift() {
        let nodes = [node(
            "a",
            vec![column("id", "integer")],
            ReplicaIdentity::Default,
        )];
        let report = compare(
            &nodes,
            &BTreeMap::new(),
            vec![Unreachable {
                node: "b".into(),
                error: "connection refused".into(),
            }],
        );
        assert!(!report.drift);
        assert_eq!(report.exit_code(), 1);
        assert!(report
            .render()
            .starts_with("node b: unreachable, not compared: connection refused\n"));
    }
}
