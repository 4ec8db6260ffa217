//! `replication.on_schema_mismatch = "park"`: a per-table hold for changes whose table does
//! not fit the target's schema.
//!
//! A change fits when the target has its table and every column the source sends (what
//! [`super::sql::TableMap::new`] checks when a table is mapped: a missing table or a
//! `MissingColumn`). Anything the server refuses later (a value that does not cast, a
//! constraint, a unique violation) is not a schema mismatch and is handled as before.
//!
//! ```text
//!   change of T ──▶ T parked? ──no──▶ T fits? ──yes──▶ applied as usual
//!                      │ yes             │ no: T is parked from now on
//!                      ▼                 ▼
//!        INSERT INTO walbridge.parked (in the same group / careful transaction, so it commits
//!        with the origin's progress: exactly once across a crash)
//!
//!   check (a Relation message or a schema change arrived, or every CHECK_EVERY), between
//!   transactions, nothing in flight:
//!     T fits now? ──yes──▶ per source transaction, oldest first: BEGIN; each change applied
//!                          carefully (the usual conflict rules, its own commit time);
//!                          DELETE its parked rows; apply_finish (progress unchanged); COMMIT
//! ```
//!
//! A parked table stays parked until its replay has emptied it, so a newer change of that
//! table is parked behind the older ones and never applied ahead of them; other tables go on.
//! The parked rows of a direction are read back when the applier starts, so a restart keeps
//! parking where the last process left off.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::Client;

use super::careful::Failed;
use super::{Applier, Item};
use crate::config::{Config, SchemaMismatch};
use crate::direction::DirectionError;
use crate::event::{
    Begin, Change, ChangeOp, Column, Commit, OldKind, OldTuple, Relation, ReplicaIdentity, Tuple,
    Value,
};
use crate::lsn::{Lsn, PgTimestamp};

/// `walbridge.parked` (sql/park.sql), created by `setup`.
pub const PARK_SQL: &str = include_str!("../../sql/park.sql");

/// How often parked tables are checked without a hint (a Relation message or a replicated
/// schema change hints at once).
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Parked rows replayed per check and table at most (each is a round trip; the rest follow
/// at the next tick).
const REPLAY_BATCH: i64 = 5_000;

/// Relation OID the replayed changes are mapped under (never a real `pg_class` OID: those
/// stay below `FirstNormalObjectId`-based counters far from `u32::MAX`).
const REPLAY_OID: u32 = u32::MAX;

const PARK_INSERT: &str = "INSERT INTO walbridge.parked (source, target, schema_name, \
     table_name, op, replica_identity, columns, type_oids, key_columns, new_values, unchanged, \
     old_kind, old_values, xid, commit_lsn, commit_time, source_origin, reason) VALUES ($1, $2, \
     $3, $4, $5, $6, $7::text[], $8::oid[], $9::text[], $10::text[], $11::text[], $12, \
     $13::text[], $14::int8, $15::pg_lsn, $16::timestamptz, $17, $18)";

const PARK_DELETE: &str = "DELETE FROM walbridge.parked WHERE seq = ANY ($1::int8[])";

/// Parked tables of one direction.
pub(super) struct Parked {
    enabled: bool,
    /// `(schema, table)` of every table with parked changes on the target.
    tables: BTreeSet<(String, String)>,
    /// Check at the next opportunity (a hint arrived).
    due: bool,
    last_check: Instant,
}

fn catalog_err(target: &str, what: &str, e: tokio_postgres::Error) -> DirectionError {
    let msg = format!("node {target}: {what}: {}", crate::pgconn::pg_message(&e));
    DirectionError::caused_by(msg, &e)
}

impl Parked {
    /// The tables with parked changes of `source` on `target` (none read when parking is off).
    pub(super) async fn load(
        catalog: &Client,
        config: &Config,
        source: &str,
        target: &str,
    ) -> Result<Parked, DirectionError> {
        let enabled = config.replication.on_schema_mismatch == SchemaMismatch::Park;
        let mut tables = BTreeSet::new();
        if enabled {
            let rows = catalog
                .query(
                    "SELECT DISTINCT schema_name, table_name FROM walbridge.parked \
                     WHERE source = $1 AND target = $2",
                    &[&source, &target],
                )
                .await
                .map_err(|e| {
                    catalog_err(
                        target,
                        "reading walbridge.parked (run walbridge setup to create it)",
                        e,
                    )
                })?;
            for r in rows {
                tables.insert((r.get::<_, String>(0), r.get::<_, String>(1)));
            }
        }
        Ok(Parked {
            enabled,
            due: !tables.is_empty(),
            tables,
            last_check: Instant::now(),
        })
    }

    /// A hint that a target schema may have changed (a Relation message, an applied
    /// `walbridge.ddl()`).
    pub(super) fn hint(&mut self) {
        if self.enabled && !self.tables.is_empty() {
            self.due = true;
        }
    }
}

/// A PostgreSQL array literal (text form) of `items`; `None` is NULL.
fn array_literal<'a>(items: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut out = String::from("{");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            None => out.push_str("NULL"),
            Some(s) => {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    out
}

/// The parameters of [`PARK_INSERT`] for one change, as text.
fn park_params(
    source: &str,
    target: &str,
    begin: &Begin,
    change: &Change,
    reason: &str,
) -> Result<Vec<Option<String>>, DirectionError> {
    let rel = &change.relation;
    let text_of = |v: &Value| -> Result<Option<String>, DirectionError> {
        match v {
            Value::Null | Value::UnchangedToast => Ok(None),
            Value::Text(b) => std::str::from_utf8(b)
                .map(|s| Some(s.to_string()))
                .map_err(|_| {
                    DirectionError::definite(format!(
                    "{source} -> {target}: a value of {} is not valid UTF-8; it cannot be parked",
                    rel.qualified_name()
                ))
                }),
            Value::Binary(_) => Err(DirectionError::definite(format!(
                "{source} -> {target}: a change of {} arrived in binary form, which cannot be \
                 parked (walbridge.parked keeps text)",
                rel.qualified_name()
            ))),
        }
    };
    let values = |t: &Tuple| -> Result<String, DirectionError> {
        let texts = t.0.iter().map(text_of).collect::<Result<Vec<_>, _>>()?;
        Ok(array_literal(texts.iter().map(|o| o.as_deref())))
    };
    let unchanged = change.new.as_ref().map_or_else(Vec::new, |n| {
        n.0.iter()
            .zip(&rel.columns)
            .filter(|(v, _)| matches!(v, Value::UnchangedToast))
            .map(|(_, c)| c.name.as_str())
            .collect()
    });
    Ok(vec![
        Some(source.to_string()),
        Some(target.to_string()),
        Some(rel.schema.clone()),
        Some(rel.table.clone()),
        Some(change.op.as_str().to_string()),
        Some(rel.replica_identity.code().to_string()),
        Some(array_literal(
            rel.columns.iter().map(|c| Some(c.name.as_str())),
        )),
        Some(format!(
            "{{{}}}",
            rel.columns
                .iter()
                .map(|c| c.type_oid.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )),
        Some(array_literal(
            rel.columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| Some(c.name.as_str())),
        )),
        change.new.as_ref().map(values).transpose()?,
        Some(array_literal(unchanged.into_iter().map(Some))),
        change.old.as_ref().map(|o| {
            match o.kind {
                OldKind::Key => "key",
                OldKind::Full => "full",
            }
            .to_string()
        }),
        change.old.as_ref().map(|o| values(&o.tuple)).transpose()?,
        Some(begin.xid.to_string()),
        (begin.final_lsn != Lsn::ZERO).then(|| begin.final_lsn.to_string()),
        Some(begin.commit_time.to_string()),
        begin.origin.as_ref().map(|o| o.name.clone()),
        Some(reason.to_string()),
    ])
}

/// One parked row, read back for replay.
struct ParkedRow {
    seq: i64,
    change: Change,
    xid: i64,
    commit_lsn: Option<String>,
    commit_time: PgTimestamp,
}

fn parse_row(schema: &str, table: &str, r: &tokio_postgres::Row) -> Option<ParkedRow> {
    let op = match r.get::<_, String>(1).as_str() {
        "insert" => ChangeOp::Insert,
        "update" => ChangeOp::Update,
        "delete" => ChangeOp::Delete,
        _ => return None,
    };
    let identity = ReplicaIdentity::from_code(*r.get::<_, String>(2).as_bytes().first()?)?;
    let names: Vec<String> = r.get(3);
    let types: Vec<u32> = r.get(4);
    let keys: Vec<String> = r.get(5);
    let columns = names
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&0)))
        .map(|(n, &t)| Column {
            name: n.clone(),
            type_oid: t,
            type_modifier: -1,
            is_key: keys.contains(n),
        })
        .collect();
    let unchanged: Vec<String> = r.get(7);
    let tuple = |values: Vec<Option<String>>, unchanged: &[String]| {
        Tuple(
            values
                .into_iter()
                .zip(&names)
                .map(|(v, n)| match v {
                    Some(s) => Value::Text(Bytes::from(s)),
                    None if unchanged.contains(n) => Value::UnchangedToast,
                    None => Value::Null,
                })
                .collect(),
        )
    };
    let new = r
        .get::<_, Option<Vec<Option<String>>>>(6)
        .map(|v| tuple(v, &unchanged));
    let old_kind = match r.get::<_, Option<String>>(8).as_deref() {
        Some("full") => OldKind::Full,
        _ => OldKind::Key,
    };
    let old = r
        .get::<_, Option<Vec<Option<String>>>>(9)
        .map(|v| OldTuple {
            kind: old_kind,
            tuple: tuple(v, &[]),
        });
    Some(ParkedRow {
        seq: r.get(0),
        change: Change {
            op,
            relation: Arc::new(Relation {
                oid: REPLAY_OID,
                schema: schema.to_string(),
                table: table.to_string(),
                replica_identity: identity,
                columns,
            }),
            new,
            old,
            source_change_id: None,
        },
        xid: r.get::<_, Option<i64>>(10).unwrap_or(0),
        commit_lsn: r.get(11),
        commit_time: PgTimestamp::parse(&r.get::<_, String>(12))?,
    })
}

impl Applier {
    /// Whether `change` must be parked, and why: its table already has parked changes, or it
    /// does not fit the target's schema (then it is parked from now on).
    async fn park_reason(&mut self, change: &Change) -> Result<Option<String>, DirectionError> {
        if !self.park.enabled {
            return Ok(None);
        }
        let rel = &change.relation;
        let key = (rel.schema.clone(), rel.table.clone());
        if self.park.tables.contains(&key) {
            return Ok(Some(format!(
                "{} has earlier parked changes",
                rel.qualified_name()
            )));
        }
        match self.table_fitting(rel).await? {
            Ok(_) => Ok(None),
            Err(mismatch) => {
                tracing::warn!(
                    source = %self.source, target = %self.target, table = %rel.qualified_name(),
                    reason = %mismatch,
                    "the target's schema does not fit; parking this table's changes"
                );
                self.park.tables.insert(key);
                Ok(Some(mismatch))
            }
        }
    }

    /// A TRUNCATE is never parked: one of a table with parked changes stops the direction
    /// (it would otherwise overtake them). Once the table fits and its changes are replayed
    /// (checked again when the direction restarts), the TRUNCATE applies.
    pub(super) fn refuse_truncate_of_parked(&self, rel: &Relation) -> Result<(), DirectionError> {
        if self
            .park
            .tables
            .contains(&(rel.schema.clone(), rel.table.clone()))
        {
            return Err(DirectionError::definite(format!(
                "{} -> {}: a TRUNCATE of {} arrived while changes of it are parked in \
                 walbridge.parked on {}; make the table fit there (they are then replayed) and \
                 restart walbridge",
                self.source,
                self.target,
                rel.qualified_name(),
                self.target
            )));
        }
        Ok(())
    }

    /// The pipelined path: parks `change` inside the open group when it must be. Returns
    /// whether it was parked.
    pub(super) async fn park_in_group(&mut self, change: &Change) -> Result<bool, DirectionError> {
        let Some(reason) = self.park_reason(change).await? else {
            return Ok(false);
        };
        let begin = self.open_txn()?.begin.clone();
        let params = park_params(&self.source, &self.target, &begin, change, &reason)?;
        {
            let open = self.open_txn()?;
            // The transaction has something to commit now (the parked row and its progress).
            open.changes += 1;
            if let Some(items) = &mut open.items {
                items.push(Item::Change(change.clone()));
            }
        }
        self.open_group()?;
        self.flush_batch().await?;
        self.execute_text(PARK_INSERT, &params)?;
        Ok(true)
    }

    /// The careful path: parks `change` in the open careful transaction when it must be.
    /// Returns whether it was parked.
    pub(super) async fn park_carefully(
        &mut self,
        begin: &Begin,
        change: &Change,
    ) -> Result<bool, Failed> {
        let Some(reason) = self.park_reason(change).await.map_err(Failed::Stop)? else {
            return Ok(false);
        };
        let params = park_params(&self.source, &self.target, begin, change, &reason)
            .map_err(Failed::Stop)?;
        let params: Vec<Option<&[u8]>> = params
            .iter()
            .map(|p| p.as_deref().map(str::as_bytes))
            .collect();
        self.exec(PARK_INSERT, &params).await?;
        Ok(true)
    }

    /// Checks the parked tables (when a hint arrived or every [`CHECK_EVERY`]) and replays
    /// those whose target schema fits now. Runs only between transactions with nothing open;
    /// otherwise it waits for the next call. Also refreshes `walbridge_parked_changes`.
    pub async fn check_parked(&mut self) -> Result<(), DirectionError> {
        if !self.park.enabled || self.park.tables.is_empty() {
            return Ok(());
        }
        if !self.park.due && self.park.last_check.elapsed() < CHECK_EVERY {
            return Ok(());
        }
        let between = self.open.is_none()
            && self.group.is_none()
            && self.careful_on_target.is_none()
            && self.ledger.redo.is_empty()
            && self.ledger.pending_failure.is_none()
            && !self.in_ddl_txn;
        if !between {
            return Ok(());
        }
        self.park.due = false;
        self.park.last_check = Instant::now();
        // Every parked row sent so far must be committed (and read back) before replay.
        self.settle_in_flight().await?;
        let tables: Vec<(String, String)> = self.park.tables.iter().cloned().collect();
        for (schema, table) in tables {
            self.replay_table(&schema, &table).await?;
        }
        Ok(())
    }

    async fn parked_rows(
        &self,
        schema: &str,
        table: &str,
    ) -> Result<Vec<ParkedRow>, DirectionError> {
        let rows = self
            .session
            .catalog
            .query(
                "SELECT seq, op, replica_identity, columns, type_oids, key_columns, new_values, \
                 unchanged, old_kind, old_values, xid, commit_lsn::text, commit_time::text \
                 FROM walbridge.parked WHERE source = $1 AND target = $2 AND schema_name = $3 \
                 AND table_name = $4 ORDER BY seq LIMIT $5",
                &[&self.source, &self.target, &schema, &table, &REPLAY_BATCH],
            )
            .await
            .map_err(|e| catalog_err(&self.target, "reading walbridge.parked", e))?;
        rows.iter()
            .map(|r| {
                parse_row(schema, table, r).ok_or_else(|| {
                    DirectionError::definite(format!(
                        "node {}: a row of walbridge.parked for {schema}.{table} cannot be read \
                         back (seq {})",
                        self.target,
                        r.get::<_, i64>(0)
                    ))
                })
            })
            .collect()
    }

    /// Replays one parked table if its target schema fits, one source transaction per target
    /// transaction; stops at the first that does not commit (tried again later).
    async fn replay_table(&mut self, schema: &str, table: &str) -> Result<(), DirectionError> {
        let label = format!("{schema}.{table}");
        let gauge = self.metrics.parked_changes.with_label_values(&[
            self.source.as_str(),
            self.target.as_str(),
            label.as_str(),
        ]);
        let total: i64 = self
            .session
            .catalog
            .query_one(
                "SELECT count(*) FROM walbridge.parked WHERE source = $1 AND target = $2 \
                 AND schema_name = $3 AND table_name = $4",
                &[&self.source, &self.target, &schema, &table],
            )
            .await
            .map_err(|e| catalog_err(&self.target, "counting walbridge.parked", e))?
            .get(0);
        gauge.set(total);
        let key = (schema.to_string(), table.to_string());
        if total == 0 {
            self.park.tables.remove(&key);
            return Ok(());
        }
        let mut rows = self.parked_rows(schema, table).await?;
        let complete = (rows.len() as i64) == total;
        if !complete {
            // A batch ends at a source transaction's end: never replay half of one.
            if let Some(last) = rows.last().map(|r| (r.xid, r.commit_lsn.clone())) {
                let keep = rows
                    .iter()
                    .rposition(|r| (r.xid, r.commit_lsn.clone()) != last)
                    .map_or(rows.len(), |i| i + 1);
                rows.truncate(keep);
            }
            self.park.due = true;
        }
        // Replayed only as far as the target fits each description of the table the source
        // sent (mapped afresh: the target's schema is what this check is about).
        let mut fitting = 0;
        let mut described: Option<&Relation> = None;
        for r in &rows {
            if described.is_none_or(|d| d.columns != r.change.relation.columns) {
                self.tables.states.remove(&REPLAY_OID);
                if let Err(mismatch) = self.table_fitting(&r.change.relation).await? {
                    tracing::debug!(table = %label, reason = %mismatch, "parked table does not fit yet");
                    break;
                }
                described = Some(&r.change.relation);
            }
            fitting += 1;
        }
        self.tables.states.remove(&REPLAY_OID);
        // Never half of a source transaction.
        if let Some(cut) = rows.get(fitting).map(|r| (r.xid, r.commit_lsn.clone())) {
            fitting = rows
                .iter()
                .take(fitting)
                .position(|r| (r.xid, r.commit_lsn.clone()) == cut)
                .unwrap_or(fitting);
        }
        rows.truncate(fitting);
        if rows.is_empty() {
            return Ok(());
        }
        let replays_all = complete && fitting as i64 == total;
        // While replaying, the table's changes are applied, not parked again.
        self.park.tables.remove(&key);
        let mut left = total as usize;
        let mut rest = rows.as_slice();
        let mut described: Option<Vec<Column>> = None;
        while let Some(head) = rest.first() {
            let n = rest
                .iter()
                .take_while(|r| r.xid == head.xid && r.commit_lsn == head.commit_lsn)
                .count();
            let (txn, later) = rest.split_at(n);
            match self.replay_txn(txn, &mut described).await {
                Ok(()) => {}
                Err(Failed::Stop(e)) => {
                    self.tables.states.remove(&REPLAY_OID);
                    self.park.tables.insert(key);
                    return Err(e);
                }
                Err(Failed::Server(e)) => {
                    let _ = self.round_trip("ROLLBACK", &[]).await?;
                    self.tables.states.remove(&REPLAY_OID);
                    self.park.tables.insert(key);
                    tracing::warn!(
                        source = %self.source, target = %self.target, table = %label,
                        error = %e,
                        "replaying parked changes failed; they stay parked and are tried again"
                    );
                    gauge.set(left as i64);
                    return Ok(());
                }
            }
            left -= n;
            gauge.set(left as i64);
            rest = later;
        }
        self.tables.states.remove(&REPLAY_OID);
        if !replays_all {
            // The rest waits for the next check (more rows, or a description that does not
            // fit yet); the table's new changes keep parking behind it.
            self.park.tables.insert(key);
            tracing::info!(
                source = %self.source, target = %self.target, table = %label,
                changes = rows.len(), left,
                "parked changes replayed in part"
            );
            return Ok(());
        }
        tracing::info!(
            source = %self.source, target = %self.target, table = %label, changes = rows.len(),
            "parked changes replayed; the table is applied as usual again"
        );
        Ok(())
    }

    /// One source transaction's parked changes: applied carefully with its commit time, its
    /// rows deleted, progress left where it is, committed.
    async fn replay_txn(
        &mut self,
        txn: &[ParkedRow],
        described: &mut Option<Vec<Column>>,
    ) -> Result<(), Failed> {
        let Some(head) = txn.first() else {
            return Ok(());
        };
        let begin = Begin {
            xid: u32::try_from(head.xid).unwrap_or(0),
            final_lsn: head
                .commit_lsn
                .as_deref()
                .and_then(|l| l.parse().ok())
                .unwrap_or(Lsn::ZERO),
            commit_time: head.commit_time,
            origin: None,
        };
        self.exec("BEGIN", &[]).await?;
        if self.take_turns {
            self.exec(crate::conflict::SERIALIZE_APPLIERS_SQL, &[])
                .await?;
        }
        let mut conflicts = Vec::new();
        for row in txn {
            if described.as_ref() != Some(&row.change.relation.columns) {
                // Another description of the table: mapped anew.
                self.tables.states.remove(&REPLAY_OID);
                *described = Some(row.change.relation.columns.clone());
            }
            self.careful_change(&begin, &row.change, &mut conflicts)
                .await?;
        }
        let seqs = format!(
            "{{{}}}",
            txn.iter()
                .map(|r| r.seq.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        self.exec(PARK_DELETE, &[Some(seqs.as_bytes())]).await?;
        // Progress stays where it is: these changes were counted when they were parked.
        let commit = Commit {
            commit_lsn: begin.final_lsn,
            end_lsn: self.ledger.committed,
            commit_time: head.commit_time,
        };
        self.careful_commit(&commit, None).await?;
        let (s, t) = (self.source.as_str(), self.target.as_str());
        let label = head.change.relation.qualified_name();
        for row in txn {
            self.metrics
                .changes_applied
                .with_label_values(&[s, t, &label, row.change.op.as_str()])
                .inc();
        }
        for (kind, resolution, _) in &conflicts {
            self.metrics
                .conflicts
                .with_label_values(&[s, t, kind.as_str(), resolution.as_str()])
                .inc();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::array_literal;

    #[test]
    fn array_literal_quotes_and_keeps_nulls_apart() {
        assert_eq!(
            array_literal([Some("a"), None, Some("NULL"), Some("x\"y\\z"), Some("")]),
            r#"{"a",NULL,"NULL","x\"y\\z",""}"#
        );
        assert_eq!(array_literal(std::iter::empty()), "{}");
    }
}
