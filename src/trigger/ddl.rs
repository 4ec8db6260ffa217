//! Schema changes in trigger mode: `walbridge.ddl()` on a trigger-mode node writes a change
//! row with `metodo = 'DDL'` (`sql/ddl.sql`) whose `descripcion` holds the statement and the
//! caller's `search_path` ([`SchemaChange`]). The worker applies such a row alone, at its
//! place in id order, in a transaction of its own on the peer (the applier runs it as stream
//! mode runs the same statement from a logical message), then reads the target's tables
//! again, so the rows after it meet the changed schema:
//!
//! ```text
//!   ids:  41 INSERT t | 42 DDL "ALTER TABLE t ADD c" | 43 INSERT t (c)
//!   batches:  [41]       [42]                           [43 ...]
//! ```
//!
//! A statement that fails on the peer stops the direction (it is schema, not a row to
//! dead-letter: the rows after it may need it) with the statement and the server's error.

use super::change::RawRow;
use crate::event::SchemaChange;

/// Whether the row is a schema change.
pub(super) fn is_ddl(row: &RawRow) -> bool {
    row.metodo
        .as_deref()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("DDL"))
}

/// Cuts a batch so that a schema change is applied alone: the rows before the first one stay
/// (it waits for the next batch); a batch that starts with one keeps only it. True when rows
/// were left for the next batch.
pub(super) fn cut_at_ddl(rows: &mut Vec<RawRow>) -> bool {
    match rows.iter().position(is_ddl) {
        None => false,
        Some(0) => {
            let cut = rows.len() > 1;
            rows.truncate(1);
            cut
        }
        Some(i) => {
            rows.truncate(i);
            true
        }
    }
}

/// The schema change a DDL row carries, or why it cannot be read (a dead row).
pub(super) fn parse(row: &RawRow) -> Result<SchemaChange, String> {
    let text = row.descripcion.as_deref().unwrap_or_default();
    SchemaChange::parse(text.as_bytes()).map_err(|e| {
        format!(
            "a DDL change row must hold what walbridge.ddl() writes \
             ({{\"search_path\": ..., \"statement\": ...}}): {e}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, metodo: &str) -> RawRow {
        RawRow {
            id,
            metodo: Some(metodo.to_string()),
            tabla: None,
            descripcion: None,
            origin_node: None,
            txid: None,
            commit_time: None,
            created_at: None,
            old_key: None,
        }
    }

    #[test]
    fn a_schema_change_is_applied_alone_in_id_order() {
        let ids = |rows: &[RawRow]| rows.iter().map(|r| r.id).collect::<Vec<_>>();
        let mut rows = vec![row(1, "INSERT"), row(2, "ddl"), row(3, "INSERT")];
        assert!(cut_at_ddl(&mut rows));
        assert_eq!(ids(&rows), [1]);
        let mut rows = vec![row(2, " DDL "), row(3, "INSERT")];
        assert!(cut_at_ddl(&mut rows));
        assert_eq!(ids(&rows), [2]);
        let mut rows = vec![row(2, "DDL")];
        assert!(!cut_at_ddl(&mut rows));
        let mut rows = vec![row(1, "INSERT"), row(3, "DELETE")];
        assert!(!cut_at_ddl(&mut rows));
        assert_eq!(ids(&rows), [1, 3]);
    }
}
