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
//! Each sequence's `START WITH` is set to the first value of its node's class too, so a
//! `TRUNCATE ... RESTART IDENTITY` (replicated to every node, each restarting its own sequence)
//! stays in the class instead of sending every node back to 1:
//!
//! ```text
//!   TRUNCATE ... RESTART IDENTITY   east: 1, 3, 5, ...      west: 2, 4, 6, ...
//! ```
//!
//! Idempotent: a sequence already stepping by N in its node's class, with its start value in
//! the class, is left where it is, so running setup again never moves a sequence backwards.

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
                            "SELECT s.last_value, s.is_called, p.increment_by, p.start_value,
                                    p.min_value, p.max_value
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
                let (start_value, min_value, max_value): (i64, i64, i64) =
                    (row.get(3), row.get(4), row.get(5));
                // Where `RESTART IDENTITY` sends the sequence: its class's first value.
                let restart = first_in_class(min_value.max(1), residue, count);
                if restart > max_value {
                    return Err(SetupError::SequenceRange {
                        node: n.name.clone(),
                        sequence: owned.sequence.clone(),
                        max_value,
                        first: restart,
                    });
                }
                let next = if called { last + step } else { last };
                if step == count && (next - residue).rem_euclid(count) == 0 {
                    if start_value != restart {
                        set_start(n, &owned.sequence, &format!("START WITH {restart}")).await?;
                    }
                    let _ = write!(line, " {} keeps {}+{}k", n.name, residue, count);
                    continue;
                }
                // The smallest value past `high` in this node's class.
                let start = first_in_class(high + 1, residue, count);
                set_start(
                    n,
                    &owned.sequence,
                    &format!("INCREMENT BY {count} START WITH {restart}"),
                )
                .await?;
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

/// The smallest value `>= from` that is `≡ residue (mod count)`.
fn first_in_class(from: i64, residue: i64, count: i64) -> i64 {
    from + (residue - from).rem_euclid(count)
}

/// `ALTER SEQUENCE <sequence> <options>` (step and restart value; the current value is moved
/// separately by `setval`).
async fn set_start(n: &NodeSession, sequence: &str, options: &str) -> Result<(), SetupError> {
    n.client
        .execute(&format!("ALTER SEQUENCE {sequence} {options}"), &[])
        .await
        .map_err(sql_err(&n.name, format!("setting {options} on {sequence}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::first_in_class;

    #[test]
    fn first_in_class_stays_in_the_residue_class() {
        assert_eq!(first_in_class(1, 1, 2), 1);
        assert_eq!(first_in_class(1, 2, 2), 2);
        assert_eq!(first_in_class(2, 1, 2), 3);
        assert_eq!(first_in_class(10, 3, 3), 12);
        assert_eq!(first_in_class(12, 3, 3), 12);
    }
}
