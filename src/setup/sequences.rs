//! `replication.sequence_ranges`: every node draws serial/identity values from its own
//! residue class, so inserts on different nodes never collide on generated keys.
//!
//! With N nodes, node i (0-based, configuration order) gets `INCREMENT BY N` and values
//! `≡ i + 1 (mod N)`, starting past the largest value any node holds:
//!
//! ```text
//!   N = 2:   east: 1, 3, 5, ...      west: 2, 4, 6, ...
//! ```
//!
//! Idempotent: a sequence already stepping by N in its node's class is left where it is, so
//! running setup again never moves a sequence backwards.

use std::fmt::Write as _;

use super::{sql_err, NodeSession, SetupError};
use crate::catalog::{quote_ident, TableInfo};
use crate::config::Config;

/// One owned sequence of a replicated table.
struct OwnedSequence {
    sequence: String,
    column: String,
}

async fn owned_sequences(
    n: &NodeSession,
    table: &TableInfo,
) -> Result<Vec<OwnedSequence>, SetupError> {
    let rows = n
        .client
        .query(
            "SELECT s.oid::regclass::text, a.attname
               FROM pg_catalog.pg_depend d
               JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
              WHERE d.refobjid = pg_catalog.format('%I.%I', $1::text, $2::text)::regclass
                AND d.deptype IN ('a', 'i')
              ORDER BY 2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(sql_err(&n.name, "listing owned sequences"))?;
    Ok(rows
        .iter()
        .map(|r| OwnedSequence {
            sequence: r.get(0),
            column: r.get(1),
        })
        .collect())
}

/// Applies the per-node ranges to every sequence a replicated table owns.
pub async fn give_each_node_its_range(
    config: &Config,
    nodes: &[NodeSession],
    tables: &[TableInfo],
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), SetupError> {
    let count = i64::try_from(nodes.len()).unwrap_or(i64::MAX);
    for table in tables {
        let Some(first) = nodes.first() else {
            return Ok(());
        };
        for owned in owned_sequences(first, table).await? {
            // The largest value any node holds, column or sequence.
            let mut high: i64 = 0;
            for n in nodes {
                let row = n
                    .client
                    .query_one(
                        &format!(
                            "SELECT greatest(coalesce((SELECT max({col})::int8 FROM {table}), 0),
                                             coalesce((SELECT last_value FROM pg_catalog.pg_sequences
                                                        WHERE pg_catalog.format('%I.%I', schemaname, sequencename)::regclass
                                                              = $1::text::regclass), 0))",
                            col = quote_ident(&owned.column),
                            table = table.quoted_name(),
                        ),
                        &[&owned.sequence],
                    )
                    .await
                    .map_err(sql_err(&n.name, format!("reading {}", owned.sequence)))?;
                high = high.max(row.get::<_, i64>(0));
            }
            let mut line = format!("{}.{}:", table.qualified_name(), owned.column);
            for n in nodes {
                let i = config
                    .nodes
                    .iter()
                    .position(|c| c.name == n.name)
                    .map_or(0, |p| p as i64);
                let residue = i + 1;
                // The value the next nextval() returns: last_value, or one step past it once
                // it was handed out (pg_sequences shows NULL for a sequence not read yet).
                let row = n
                    .client
                    .query_one(
                        &format!(
                            "SELECT s.last_value, s.is_called, p.increment_by
                               FROM {seq} s, pg_catalog.pg_sequences p
                              WHERE pg_catalog.format('%I.%I', p.schemaname, p.sequencename)::regclass
                                    = {lit}::regclass",
                            seq = owned.sequence,
                            lit = crate::catalog::quote_literal(&owned.sequence)
                        ),
                        &[],
                    )
                    .await
                    .map_err(sql_err(&n.name, format!("reading {}", owned.sequence)))?;
                let (last, called, step): (i64, bool, i64) = (row.get(0), row.get(1), row.get(2));
                let next = if called { last + step } else { last };
                if step == count && (next - residue).rem_euclid(count) == 0 {
                    let _ = write!(line, " {} keeps {}+{}k", n.name, residue, count);
                    continue;
                }
                // The smallest value past `high` in this node's class.
                let start = high + 1 + (residue - (high + 1)).rem_euclid(count);
                n.client
                    .execute(
                        &format!("ALTER SEQUENCE {} INCREMENT BY {count}", owned.sequence),
                        &[],
                    )
                    .await
                    .map_err(sql_err(
                        &n.name,
                        format!("setting the step of {}", owned.sequence),
                    ))?;
                n.client
                    .execute(
                        "SELECT pg_catalog.setval($1::text::regclass, $2, false)",
                        &[&owned.sequence, &start],
                    )
                    .await
                    .map_err(sql_err(&n.name, format!("moving {}", owned.sequence)))?;
                let _ = write!(line, " {} from {start} by {count}", n.name);
            }
            let _ = writeln!(out, "{line}");
        }
    }
    Ok(())
}
