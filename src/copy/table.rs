//! Copying one table from the source's snapshot into one peer: `COPY ... TO STDOUT` piped
//! chunk by chunk into `COPY ... FROM STDIN`, in one transaction on each side.
//!
//! ```text
//!   source: BEGIN REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT 's';
//!           COPY (SELECT cols FROM [ONLY] t) TO STDOUT (FORMAT binary)
//!                │ CopyData chunks (bounded: tokio-postgres reads the socket only as fast
//!                ▼ as the peer accepts)
//!   peer:   BEGIN; pg_replication_origin_xact_setup(consistent point, snapshot time);
//!           COPY t (cols) FROM STDIN (FORMAT binary); COMMIT
//! ```
//!
//! The peer's session has the origin `<prefix>_copy_<source>_<n>` set up, so the copied rows
//! look written by the source at the snapshot's time, and decoding on the peer drops them (no
//! echo back). Binary format is used when every column has a built-in type of the same name on
//! both sides (binary array and composite values carry type OIDs, which differ between
//! clusters for user-defined types); otherwise text format, which converts by name.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio_postgres::Client;

use super::progress::TableProgress;
use super::{sql_err, CopyError};
use crate::catalog::{quote_ident, quote_literal, TableInfo, TableKind};

/// OIDs below this are built into every PostgreSQL (`FirstNormalObjectId`).
const FIRST_USER_OID: u32 = 16384;

/// What moving one table needs, decided from both sides' catalogs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePlan {
    /// `schema.table`, raw.
    pub name: String,
    /// `"schema"."table"`.
    pub quoted: String,
    /// Partitioned tables are read and written through their root.
    pub partitioned: bool,
    /// Columns copied (raw names): not generated, not skipped, present on the peer.
    pub columns: Vec<String>,
    /// Binary COPY (else text).
    pub binary: bool,
}

impl TablePlan {
    /// Plans the copy of `source` into `target` leaving out `skip` columns; the columns the
    /// peer lacks are returned as errors (the caller reports them before anything is done).
    pub fn new(source: &TableInfo, target: &TableInfo, skip: &[String]) -> (Self, Vec<String>) {
        let mut columns = Vec::new();
        let mut missing = Vec::new();
        let mut binary = true;
        for c in source.columns.iter().filter(|c| !c.generated) {
            if skip.contains(&c.name) {
                continue;
            }
            match target.column(&c.name) {
                Some(t) if !t.generated => {
                    binary &= c.type_oid < FIRST_USER_OID
                        && t.type_oid == c.type_oid
                        && t.type_sql == c.type_sql;
                    columns.push(c.name.clone());
                }
                Some(_) => missing.push(format!(
                    "column {:?} of {} is generated here but not on the source; it cannot \
                     receive copied values",
                    c.name,
                    source.qualified_name()
                )),
                None => missing.push(format!(
                    "column {:?} of {} exists on the source but not here; add it (DDL is not \
                     replicated) or list it in replication.skip_columns",
                    c.name,
                    source.qualified_name()
                )),
            }
        }
        (
            TablePlan {
                name: source.qualified_name(),
                quoted: source.quoted_name(),
                partitioned: source.kind == TableKind::Partitioned,
                columns,
                binary,
            },
            missing,
        )
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn format(&self) -> &'static str {
        if self.binary {
            "binary"
        } else {
            "text"
        }
    }

    /// `[ONLY] "s"."t"` for reading: a partitioned root includes its partitions, an ordinary
    /// table never includes inheritance children (they are tables of their own).
    pub fn relation(&self) -> String {
        if self.partitioned {
            self.quoted.clone()
        } else {
            format!("ONLY {}", self.quoted)
        }
    }

    /// The source's `COPY ... TO STDOUT`.
    pub fn copy_out_sql(&self) -> String {
        format!(
            "COPY (SELECT {} FROM {}) TO STDOUT (FORMAT {})",
            self.column_list(),
            self.relation(),
            self.format()
        )
    }

    /// The peer's `COPY ... FROM STDIN` (into the root for partitioned tables: rows are
    /// routed to their partitions).
    pub fn copy_in_sql(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT {})",
            self.quoted,
            self.column_list(),
            self.format()
        )
    }

    /// Whether the table has any row (a copy target must be empty).
    pub fn has_rows_sql(&self) -> String {
        format!("SELECT EXISTS (SELECT 1 FROM {})", self.relation())
    }
}

/// `TRUNCATE` of every listed table in one statement (tables referencing each other must be
/// emptied together).
pub fn truncate_sql(plans: &[TablePlan]) -> String {
    let list = plans
        .iter()
        .map(TablePlan::relation)
        .collect::<Vec<_>>()
        .join(", ");
    format!("TRUNCATE {list}")
}

/// The source side of one copy: a transaction in the exported snapshot.
pub fn import_snapshot_sql(snapshot: &str) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    )
}

/// Copies one table; returns `(rows, bytes)`. The caller holds both sessions, the source one
/// in the snapshot, the peer one with its origin set up and a transaction open.
pub async fn pump(
    plan: &TablePlan,
    source: (&str, &Client),
    target: (&str, &Client),
    progress: &mut TableProgress,
) -> Result<(u64, u64), CopyError> {
    let out = source
        .1
        .copy_out(plan.copy_out_sql().as_str())
        .await
        .map_err(sql_err(source.0, format!("reading {}", plan.name)))?;
    let sink = target
        .1
        .copy_in::<_, Bytes>(plan.copy_in_sql().as_str())
        .await
        .map_err(sql_err(target.0, format!("writing {}", plan.name)))?;
    futures::pin_mut!(out);
    futures::pin_mut!(sink);
    let mut bytes = 0u64;
    let mut messages = 0u64;
    while let Some(chunk) = out.next().await {
        let chunk = chunk.map_err(sql_err(source.0, format!("reading {}", plan.name)))?;
        let len = chunk.len() as u64;
        bytes += len;
        messages += 1;
        // PostgreSQL sends one CopyData message per row (the binary header rides with the
        // first, the binary trailer comes alone): close enough for progress; the exact count
        // comes from the peer at the end.
        let rows = u64::from(!(plan.binary && len == 2 && chunk.as_ref() == [0xff, 0xff]));
        progress.add(rows, len);
        // `feed` buffers (and waits for room), without flushing each row separately.
        sink.feed(chunk)
            .await
            .map_err(sql_err(target.0, format!("writing {}", plan.name)))?;
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .map_err(sql_err(target.0, format!("writing {}", plan.name)))?;
    tracing::debug!(table = %plan.name, rows, messages, bytes, "copy stream done");
    Ok((rows, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColumnInfo;
    use crate::event::ReplicaIdentity;

    fn col(name: &str, oid: u32, ty: &str, generated: bool) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            attnum: 1,
            type_oid: oid,
            type_sql: ty.into(),
            type_modifier: -1,
            not_null: false,
            generated,
            identity_always: false,
            identity_by_default: false,
            has_equality: true,
        }
    }

    fn table(kind: TableKind, columns: Vec<ColumnInfo>) -> TableInfo {
        TableInfo {
            oid: 1,
            schema: "public".into(),
            name: "T t".into(),
            kind,
            replica_identity: ReplicaIdentity::Default,
            columns,
            primary_key: vec!["id".into()],
            identity_index: vec![],
        }
    }

    #[test]
    fn generated_and_skipped_columns_are_not_copied() {
        let src = table(
            TableKind::Ordinary,
            vec![
                col("id", 23, "integer", false),
                col("secret", 25, "text", false),
                col("total", 23, "integer", true),
            ],
        );
        let (plan, missing) = TablePlan::new(&src, &src, &["secret".to_string()]);
        assert!(missing.is_empty());
        assert_eq!(plan.columns, ["id"]);
        assert!(plan.binary);
        assert_eq!(
            plan.copy_out_sql(),
            "COPY (SELECT \"id\" FROM ONLY \"public\".\"T t\") TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            plan.copy_in_sql(),
            "COPY \"public\".\"T t\" (\"id\") FROM STDIN (FORMAT binary)"
        );
    }

    #[test]
    fn partitioned_roots_are_read_with_their_partitions() {
        let src = table(
            TableKind::Partitioned,
            vec![col("id", 23, "integer", false)],
        );
        let (plan, _) = TablePlan::new(&src, &src, &[]);
        assert_eq!(plan.relation(), "\"public\".\"T t\"");
        assert_eq!(truncate_sql(&[plan]), "TRUNCATE \"public\".\"T t\"");
    }

    #[test]
    fn user_types_and_type_differences_fall_back_to_text() {
        let src = table(
            TableKind::Ordinary,
            vec![
                col("id", 23, "integer", false),
                col("m", 40000, "mood", false),
            ],
        );
        let (plan, _) = TablePlan::new(&src, &src, &[]);
        assert!(!plan.binary);
        assert!(plan.copy_out_sql().ends_with("(FORMAT text)"));

        let src = table(TableKind::Ordinary, vec![col("id", 23, "integer", false)]);
        let dst = table(TableKind::Ordinary, vec![col("id", 20, "bigint", false)]);
        let (plan, _) = TablePlan::new(&src, &dst, &[]);
        assert!(!plan.binary);
    }

    #[test]
    fn columns_the_peer_lacks_are_reported() {
        let src = table(
            TableKind::Ordinary,
            vec![col("id", 23, "integer", false), col("x", 25, "text", false)],
        );
        let dst = table(TableKind::Ordinary, vec![col("id", 23, "integer", false)]);
        let (_, missing) = TablePlan::new(&src, &dst, &[]);
        assert_eq!(missing.len(), 1);
        assert!(missing[0].contains("\"x\""), "{missing:?}");
    }

    #[test]
    fn snapshot_names_are_quoted() {
        assert_eq!(
            import_snapshot_sql("00000003-0000001B-1"),
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT \
             '00000003-0000001B-1'"
        );
    }
}
