//! Change rows as the event model: trigger mode as a source of the same framed
//! [`Event`]s the stream gives, so one applier can apply both (issue 12).
//!
//! Pure: the rows arrive checked against the target's catalog ([`super::change::build`]),
//! nothing here touches a connection. A batch read in id order becomes source transactions:
//!
//! ```text
//!   ids    41 (txid 900) INSERT t | 42 (900) UPDATE t | 43 (905) DDL | 44 (no txid) DELETE u
//!   txns   Begin{xid 900} Relation(t) Insert Update Commit
//!          Begin{xid 905} Message(<prefix>_ddl) Commit
//!          Begin{xid 0}   Relation(u) Delete Commit
//! ```
//!
//! How the hard points are decided:
//!
//! - **Transaction boundary**: consecutive rows of one `txid` form one source transaction,
//!   with that transaction's commit time (`pg_xact_commit_timestamp`, else the latest
//!   `created_at` of its rows, else the time the batch was read), so conflict decisions stay
//!   per source transaction, as the worker's per-row times are today. A row without `txid`
//!   (written by an old trigger or by hand) is a transaction of its own with its own time.
//!   Rows of concurrent transactions interleave in id order; each run of one `txid` is its
//!   own transaction and id order is kept.
//! - **Dead rows and echo** are decided before this: the caller (the source) builds each row
//!   with [`super::change::build`], drops echoes and keeps the rows that cannot be applied
//!   for the dead-letter table with its progress. A value this module cannot convert is one
//!   more dead row ([`TxnBuilder::push_change`] returns the error and pushes nothing).
//! - **JSON values** go through the stream's converter,
//!   [`crate::decode::wal2json::json_column_value`] with PostgreSQL's `to_json` rendering
//!   (legacy Python literals are JSON once parsed, see [`super::legacy`]). The values equal
//!   what the worker's `json_populate_record` writes, type for type
//!   (`trigger::the_worker_and_the_event_path_write_the_same_values`), except a `json`
//!   column's text: the worker's goes through `jsonb` (its spacing, keys sorted), this keeps
//!   the row's compact JSON (key order kept).
//! - **Partial updates** (a legacy row that names only some columns): the columns it does not
//!   name are [`Value::UnchangedToast`], which the applier's UPDATE leaves as they are, and
//!   which makes the change an incomplete row for [`crate::conflict::decide`] (it cannot
//!   recreate a missing row), exactly as the worker's `complete` flag does.
//! - **Partial inserts** (a row that leaves a column to its default, a serial key say): the
//!   relation of that change lists only the columns the row names, so the applier's INSERT
//!   leaves the others to their defaults; a [`Event::Relation`] is sent whenever the columns
//!   of a table's changes differ from the previous change's.
//! - **Keys**: an update that changed its key (`old_key`) and every delete carry an old key
//!   tuple ([`OldKind::Key`]; the row itself under a whole-row identity, [`OldKind::Full`]);
//!   an update that kept its key finds its row by the key values in the new tuple.
//! - **Positions**: events carry no LSN (`Lsn::ZERO`); each [`SourceTxn`] lists its change
//!   rows (`id`, `txid`), from which the direction's cursor advances when the target commits.
//!
//! Relations are the target's tables ([`Relation::oid`] is the target's OID), since trigger
//! mode never reads the source's catalog.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::catalog::TableInfo;
use crate::decode::wal2json::{json_column_value, JsonRendering};
use crate::event::{
    Begin, Change, ChangeOp, Column, Commit, Event, LogicalMessage, OldKind, OldTuple, Relation,
    ReplicaIdentity, Truncate, Tuple, Value,
};
use crate::lsn::{Lsn, PgTimestamp};

use super::change::{self, Op, RawRow, RowError};

/// One source transaction of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceTxn {
    /// `Begin`, its changes, `Commit`: a framed transaction as the stream's source gives it.
    pub events: Vec<Event>,
    /// The change rows it came from (`id`, `txid`), in id order: the cursor's step.
    pub rows: Vec<(i64, Option<u64>)>,
}

/// Turns batches of change rows, in id order, into source transactions. One builder serves a
/// direction for as long as its applier lives: a table is described (`Relation`) when its
/// columns change, not in every batch, so the applier keeps its statements.
pub struct TxnBuilder {
    ddl_prefix: String,
    read_at: PgTimestamp,
    /// The relation last sent per table OID.
    sent: HashMap<u32, Arc<Relation>>,
    open: Option<Open>,
    done: Vec<SourceTxn>,
}

struct Open {
    txid: Option<u64>,
    time: Option<PgTimestamp>,
    events: Vec<Event>,
    rows: Vec<(i64, Option<u64>)>,
}

impl TxnBuilder {
    /// A builder: `slot_prefix` names the schema-change messages (`<slot_prefix>_ddl`, as in
    /// stream mode); `read_at` is the time of a row whose commit time is unknown (the batch
    /// was read then; see [`TxnBuilder::take`]).
    pub fn new(slot_prefix: &str, read_at: PgTimestamp) -> Self {
        TxnBuilder {
            ddl_prefix: format!("{slot_prefix}_ddl"),
            read_at,
            sent: HashMap::new(),
            open: None,
            done: Vec::new(),
        }
    }

    /// The next batch's read time (see [`TxnBuilder::new`]).
    pub fn set_read_at(&mut self, read_at: PgTimestamp) {
        self.read_at = read_at;
    }

    /// Describes every table again before its next change (the applier was restarted, so
    /// it knows none).
    pub fn forget_relations(&mut self) {
        self.sent.clear();
    }

    /// Adds a change row of `table` (resolved from its `tabla` by the caller): a schema
    /// change, or a change checked by [`change::build`]. On error nothing is added: the row is
    /// dead (echoes are the caller's to drop before).
    pub fn push_row(
        &mut self,
        row: &RawRow,
        table: Arc<TableInfo>,
        skip: &[String],
    ) -> Result<(), RowError> {
        if super::ddl::is_ddl(row) {
            self.push_ddl(row);
            return Ok(());
        }
        let op = change::parse_metodo(row.metodo.as_deref().ok_or(RowError::Null("metodo"))?)?;
        let c = change::build(row, op, table, skip)?;
        self.push_change(row, &c, skip)
    }

    /// Adds a change built by [`change::build`]; `skip` is the table's
    /// `replication.skip_columns`. On error nothing is added: the row is dead.
    pub fn push_change(
        &mut self,
        row: &RawRow,
        c: &change::Change,
        skip: &[String],
    ) -> Result<(), RowError> {
        let table = &c.table;
        let full = full_relation(table, skip);
        let values = parse_values(&c.row_json, table)?;
        let event = match c.op {
            Op::Truncate => {
                let rel = self.relation(full);
                Event::Truncate(Truncate {
                    relations: vec![rel],
                    cascade: false,
                    restart_identity: false,
                })
            }
            Op::Insert => {
                let named = |col: &Column| values.iter().any(|(n, _)| *n == col.name);
                let rel = if full.columns.iter().all(named) {
                    full
                } else {
                    Relation {
                        columns: full.columns.iter().filter(|c| named(c)).cloned().collect(),
                        ..full
                    }
                };
                let new = tuple(&rel, &values, Value::Null);
                Event::Change(Change {
                    op: ChangeOp::Insert,
                    relation: self.relation(rel),
                    new: Some(new),
                    old: None,
                    source_change_id: Some(row.id),
                })
            }
            Op::Update => {
                let new = tuple(&full, &values, Value::UnchangedToast);
                let old = match &c.new_key_json {
                    Some(_) => Some(key_tuple(&full, &c.key_json, table)?),
                    None => None,
                };
                Event::Change(Change {
                    op: ChangeOp::Update,
                    relation: self.relation(full),
                    new: Some(new),
                    old,
                    source_change_id: Some(row.id),
                })
            }
            Op::Delete => {
                let old = if c.full_identity {
                    OldTuple {
                        kind: OldKind::Full,
                        tuple: tuple(&full, &values, Value::Null),
                    }
                } else {
                    key_tuple(&full, &c.key_json, table)?
                };
                Event::Change(Change {
                    op: ChangeOp::Delete,
                    relation: self.relation(full),
                    new: None,
                    old: Some(old),
                    source_change_id: Some(row.id),
                })
            }
        };
        let relation_event = match &event {
            Event::Change(ch) => self.relation_event(&ch.relation),
            Event::Truncate(t) => t.relations.first().and_then(|r| self.relation_event(r)),
            _ => None,
        };
        let open = self.open_for(row);
        open.events.extend(relation_event);
        open.events.push(event);
        Ok(())
    }

    /// Adds a schema change row (`metodo = 'DDL'`): the logical message stream mode carries.
    pub fn push_ddl(&mut self, row: &RawRow) {
        let content = row.descripcion.clone().unwrap_or_default();
        let prefix = self.ddl_prefix.clone();
        // Tables may change under it: describe them again afterwards.
        self.sent.clear();
        self.open_for(row)
            .events
            .push(Event::Message(LogicalMessage {
                transactional: true,
                lsn: Lsn::ZERO,
                prefix,
                content: Bytes::from(content),
            }));
    }

    /// The batch's source transactions, in id order; the builder is ready for the next batch.
    pub fn take(&mut self) -> Vec<SourceTxn> {
        self.close();
        std::mem::take(&mut self.done)
    }

    /// The relation to use, shared with the last one sent when it is the same.
    fn relation(&self, rel: Relation) -> Arc<Relation> {
        match self.sent.get(&rel.oid) {
            Some(sent) if **sent == rel => sent.clone(),
            _ => Arc::new(rel),
        }
    }

    /// A `Relation` event when `rel` is not the one last sent for its table.
    fn relation_event(&mut self, rel: &Arc<Relation>) -> Option<Event> {
        if self.sent.get(&rel.oid).is_some_and(|s| Arc::ptr_eq(s, rel)) {
            return None;
        }
        self.sent.insert(rel.oid, rel.clone());
        Some(Event::Relation(rel.clone()))
    }

    /// The transaction `row` belongs to, opening it (and closing the previous one) as needed.
    fn open_for(&mut self, row: &RawRow) -> &mut Open {
        let same = match (&self.open, row.txid) {
            (Some(open), Some(txid)) => open.txid == Some(txid),
            _ => false,
        };
        if !same {
            self.close();
        }
        let open = self.open.get_or_insert_with(|| Open {
            txid: row.txid,
            time: None,
            events: Vec::new(),
            rows: Vec::new(),
        });
        open.time = match (open.time, row.time()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        open.rows.push((row.id, row.txid));
        open
    }

    fn close(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        let commit_time = open.time.unwrap_or(self.read_at);
        let mut events = Vec::with_capacity(open.events.len() + 2);
        events.push(Event::Begin(Begin {
            // The 32-bit xid of the xid8, as pgoutput gives it.
            xid: open.txid.map_or(0, |t| (t & 0xFFFF_FFFF) as u32),
            final_lsn: Lsn::ZERO,
            commit_time,
            origin: None,
        }));
        events.extend(open.events);
        events.push(Event::Commit(Commit {
            commit_lsn: Lsn::ZERO,
            end_lsn: Lsn::ZERO,
            commit_time,
        }));
        self.done.push(SourceTxn {
            events,
            rows: open.rows,
        });
    }
}

/// The target table as a relation: its written columns (not generated, not skipped) in
/// attribute order, the identity columns as the key.
fn full_relation(table: &TableInfo, skip: &[String]) -> Relation {
    let identity = table.identity_columns();
    Relation {
        oid: table.oid,
        schema: table.schema.clone(),
        table: table.name.clone(),
        replica_identity: table.replica_identity,
        columns: table
            .columns
            .iter()
            .filter(|c| !c.generated && !skip.contains(&c.name))
            .map(|c| Column {
                name: c.name.clone(),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                is_key: identity.contains(&c.name)
                    || (table.replica_identity == ReplicaIdentity::Full
                        && table.primary_key.is_empty()
                        && table.identity_index.is_empty()),
            })
            .collect(),
    }
}

/// The values of a JSON object made by [`change::build`], converted to the columns' text.
fn parse_values(json: &str, table: &TableInfo) -> Result<Vec<(String, Value)>, RowError> {
    let bad = |column: &str, reason| RowError::Value {
        table: table.qualified_name(),
        column: column.to_string(),
        reason,
    };
    let object: HashMap<String, &serde_json::value::RawValue> =
        serde_json::from_str(json).map_err(|_| bad("", "the row is not a JSON object"))?;
    let mut out = Vec::with_capacity(object.len());
    for (name, raw) in object {
        let Some(col) = table.column(&name) else {
            return Err(bad(&name, "the target has no such column"));
        };
        let rendering = JsonRendering::ToJson {
            array: col.type_sql.ends_with("[]"),
        };
        let value =
            json_column_value(raw.get(), col.type_oid, rendering).map_err(|r| bad(&name, r))?;
        out.push((name, value));
    }
    Ok(out)
}

/// The full-width tuple of `rel` from named values; `absent` for the columns not named.
fn tuple(rel: &Relation, values: &[(String, Value)], absent: Value) -> Tuple {
    Tuple(
        rel.columns
            .iter()
            .map(|c| {
                values
                    .iter()
                    .find(|(n, _)| *n == c.name)
                    .map_or_else(|| absent.clone(), |(_, v)| v.clone())
            })
            .collect(),
    )
}

/// An old key tuple: the key columns from `key_json`, NULL elsewhere.
fn key_tuple(rel: &Relation, key_json: &str, table: &TableInfo) -> Result<OldTuple, RowError> {
    let key = parse_values(key_json, table)?;
    Ok(OldTuple {
        kind: OldKind::Key,
        tuple: tuple(rel, &key, Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ColumnInfo, TableKind};

    fn col(name: &str, type_oid: u32, type_sql: &str) -> ColumnInfo {
        ColumnInfo::for_test(name, type_oid, type_sql)
    }

    /// `users(id int PK, name text, tags text[], doc jsonb, pic bytea, upper_name GENERATED)`.
    fn users() -> Arc<TableInfo> {
        let mut g = col("upper_name", 25, "text");
        g.generated = true;
        Arc::new(TableInfo {
            oid: 7001,
            schema: "public".into(),
            name: "users".into(),
            kind: TableKind::Ordinary,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col("id", 23, "integer"),
                col("name", 25, "text"),
                col("tags", 1009, "text[]"),
                col("doc", 3802, "jsonb"),
                col("pic", 17, "bytea"),
                g,
            ],
            primary_key: vec!["id".into()],
            identity_index: vec![],
        })
    }

    fn row(id: i64, txid: Option<u64>, metodo: &str, descripcion: &str) -> RawRow {
        RawRow {
            id,
            metodo: Some(metodo.into()),
            tabla: Some("users".into()),
            descripcion: Some(descripcion.into()),
            origin_node: None,
            txid,
            commit_time: txid.map(|t| PgTimestamp(t as i64 * 1_000_000)),
            created_at: Some(PgTimestamp(id)),
            old_key: None,
        }
    }

    fn push(b: &mut TxnBuilder, r: &RawRow) -> Result<(), RowError> {
        let op = change::parse_metodo(r.metodo.as_deref().unwrap()).unwrap();
        let c = change::build(r, op, users(), &[]).unwrap();
        b.push_change(r, &c, &[])
    }

    fn text(v: &str) -> Value {
        Value::text(v)
    }

    fn changes(t: &SourceTxn) -> Vec<&Change> {
        t.events
            .iter()
            .filter_map(|e| match e {
                Event::Change(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn rows_of_one_txid_are_one_transaction_with_its_commit_time() {
        let mut b = TxnBuilder::new("wb", PgTimestamp(5));
        push(
            &mut b,
            &row(1, Some(900), "INSERT", r#"{"id": 1, "name": "a"}"#),
        )
        .unwrap();
        push(
            &mut b,
            &row(2, Some(900), "UPDATE", r#"{"id": 1, "name": "b"}"#),
        )
        .unwrap();
        push(&mut b, &row(3, Some(905), "DELETE", r#"{"id": 1}"#)).unwrap();
        let mut legacy = row(4, None, "DELETE", "{'id': 2}");
        legacy.created_at = None;
        push(&mut b, &legacy).unwrap();
        let txns = b.take();
        assert_eq!(txns.len(), 3);
        assert_eq!(txns[0].rows, vec![(1, Some(900)), (2, Some(900))]);
        assert_eq!(txns[1].rows, vec![(3, Some(905))]);
        assert_eq!(txns[2].rows, vec![(4, None)]);
        let kinds: Vec<&str> = txns[0].events.iter().map(Event::kind).collect();
        assert_eq!(
            kinds,
            ["begin", "relation", "insert", "relation", "update", "commit"]
        );
        match (&txns[0].events[0], txns[0].events.last()) {
            (Event::Begin(begin), Some(Event::Commit(commit))) => {
                assert_eq!(begin.xid, 900);
                assert_eq!(begin.commit_time, PgTimestamp(900_000_000));
                assert_eq!(commit.commit_time, begin.commit_time);
                assert_eq!(commit.end_lsn, Lsn::ZERO);
            }
            other => panic!("{other:?}"),
        }
        // A row without txid or any time takes the batch's read time.
        match &txns[2].events[0] {
            Event::Begin(begin) => assert_eq!(begin.commit_time, PgTimestamp(5)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_partial_insert_names_only_its_columns_and_a_partial_update_leaves_the_rest_unchanged() {
        let mut b = TxnBuilder::new("wb", PgTimestamp(0));
        push(&mut b, &row(1, Some(9), "INSERT", r#"{"name": "a"}"#)).unwrap();
        push(&mut b, &row(2, Some(9), "UPDATE", "{'id': 3, 'name': 'b'}")).unwrap();
        let txns = b.take();
        let c = changes(&txns[0]);
        let names = |c: &Change| -> Vec<String> {
            c.relation.columns.iter().map(|c| c.name.clone()).collect()
        };
        assert_eq!(
            names(c[0]),
            ["name"],
            "the serial key is left to its default"
        );
        assert_eq!(c[0].new, Some(Tuple(vec![text("a")])));
        assert_eq!(
            names(c[1]),
            ["id", "name", "tags", "doc", "pic"],
            "no generated column"
        );
        assert_eq!(
            c[1].new,
            Some(Tuple(vec![
                text("3"),
                text("b"),
                Value::UnchangedToast,
                Value::UnchangedToast,
                Value::UnchangedToast,
            ]))
        );
        assert_eq!(
            c[1].old, None,
            "the key did not change: it is in the new tuple"
        );
        assert!(c[1].relation.columns[0].is_key && !c[1].relation.columns[1].is_key);
    }

    #[test]
    fn a_changed_key_and_a_delete_carry_the_old_key() {
        let mut b = TxnBuilder::new("wb", PgTimestamp(0));
        let mut r = row(1, Some(9), "UPDATE", r#"{"id": 2, "name": "x"}"#);
        r.old_key = Some(r#"{"id": 1}"#.into());
        push(&mut b, &r).unwrap();
        push(
            &mut b,
            &row(2, Some(9), "DELETE", r#"{"id": 2, "name": "x"}"#),
        )
        .unwrap();
        let txns = b.take();
        let c = changes(&txns[0]);
        let key_of = |c: &Change| c.old.as_ref().map(|o| (o.kind, o.tuple.0[0].clone()));
        assert_eq!(key_of(c[0]), Some((OldKind::Key, text("1"))));
        assert_eq!(key_of(c[1]), Some((OldKind::Key, text("2"))));
        assert_eq!(c[1].new, None);
        assert_eq!(c[1].old.as_ref().unwrap().tuple.0[1], Value::Null);
        // Same columns as the update before it: no second Relation event.
        let relations = txns[0]
            .events
            .iter()
            .filter(|e| matches!(e, Event::Relation(_)))
            .count();
        assert_eq!(relations, 1);
    }

    #[test]
    fn json_values_become_the_columns_text() {
        let mut b = TxnBuilder::new("wb", PgTimestamp(0));
        push(
            &mut b,
            &row(
                1,
                Some(9),
                "INSERT",
                r#"{"id": 1, "name": "q\"uote", "tags": ["a b", null, "c\"d"],
                    "doc": {"k": [1, "v"]}, "pic": "\\x0102"}"#,
            ),
        )
        .unwrap();
        let txns = b.take();
        let c = changes(&txns[0]);
        assert_eq!(
            c[0].new,
            Some(Tuple(vec![
                text("1"),
                text("q\"uote"),
                text(r#"{"a b",NULL,"c\"d"}"#),
                text(r#"{"k":[1,"v"]}"#),
                text("\\x0102"),
            ]))
        );
    }

    #[test]
    fn ddl_and_truncate_rows_are_the_streams_events() {
        let mut b = TxnBuilder::new("wb", PgTimestamp(0));
        push(&mut b, &row(1, Some(9), "INSERT", r#"{"id": 1}"#)).unwrap();
        let ddl = row(
            2,
            Some(10),
            "DDL",
            r#"{"search_path": "public", "statement": "ALTER TABLE users ADD c int"}"#,
        );
        b.push_ddl(&ddl);
        push(&mut b, &row(3, Some(11), "TRUNCATE", "")).unwrap();
        let txns = b.take();
        assert_eq!(txns.len(), 3);
        match &txns[1].events[1] {
            Event::Message(m) => {
                assert!(m.transactional);
                assert_eq!(m.prefix, "wb_ddl");
                let sc = crate::event::SchemaChange::parse(&m.content).unwrap();
                assert_eq!(sc.statement, "ALTER TABLE users ADD c int");
            }
            other => panic!("{other:?}"),
        }
        // After a schema change every table is described again.
        let kinds: Vec<&str> = txns[2].events.iter().map(Event::kind).collect();
        assert_eq!(kinds, ["begin", "relation", "truncate", "commit"]);
    }

    #[test]
    fn a_value_its_column_cannot_take_is_a_dead_row() {
        let deep = format!(
            "{{\"id\": 1, \"tags\": {}{}}}",
            "[".repeat(7),
            "]".repeat(7)
        );
        let e = parse_values(&deep, &users()).unwrap_err();
        assert!(
            matches!(e, RowError::Value { ref column, .. } if column == "tags"),
            "{e}"
        );
        let e = parse_values(r#"{"nope": 1}"#, &users()).unwrap_err();
        assert!(
            matches!(e, RowError::Value { ref column, .. } if column == "nope"),
            "{e}"
        );
    }

    #[test]
    fn a_table_is_described_again_only_when_its_columns_change_or_the_applier_restarts() {
        let mut b = TxnBuilder::new("wb", PgTimestamp(0));
        let relations = |txns: &[SourceTxn]| {
            txns.iter()
                .flat_map(|t| &t.events)
                .filter(|e| matches!(e, Event::Relation(_)))
                .count()
        };
        push(
            &mut b,
            &row(1, Some(9), "UPDATE", r#"{"id": 1, "name": "a"}"#),
        )
        .unwrap();
        assert_eq!(relations(&b.take()), 1);
        push(&mut b, &row(2, Some(10), "DELETE", r#"{"id": 1}"#)).unwrap();
        assert_eq!(relations(&b.take()), 0, "the next batch, same table");
        b.forget_relations();
        push(&mut b, &row(3, Some(11), "DELETE", r#"{"id": 2}"#)).unwrap();
        assert_eq!(relations(&b.take()), 1);
    }
}
