//! SQL text for applying changes to one target table. Pure string building, no I/O.
//!
//! Every identifier is quoted and every value is a `$n` parameter sent in text format and cast
//! to the target column's type, so nothing a source row contains can change a statement's
//! meaning. Statements come in two families:
//!
//! * **optimistic** (the common path, pipelined): each statement asserts that exactly the
//!   expected rows changed and that no conflict is possible (`walbridge.expect_rows`); if not,
//!   it raises, the whole transaction rolls back, and apply redoes it carefully;
//! * **careful**: read the target's row version under lock, let `conflict::decide` choose,
//!   then run a plain statement and log the conflict.

use std::fmt::Write;

use crate::catalog::{json_value, quote_ident, row_json, text_value, TableInfo};
use crate::event::{OldTuple, Relation, Tuple, Value};

/// How a source relation's columns land on a target table.
#[derive(Clone, Debug)]
pub struct TableMap {
    /// The target's catalog description.
    pub target: TableInfo,
    /// Per source column: the target column index, `None` when not written (a column the
    /// configuration skips, or one the target generates itself).
    pub target_column: Vec<Option<usize>>,
    /// Source column positions that find a row: the stream's replica identity columns.
    pub key: Vec<usize>,
    /// Source positions of the target's unique key (for tombstones and conflict logs), when
    /// the target has one and every part of it is replicated.
    pub unique_key: Option<Vec<usize>>,
    /// Whether the key is every column (REPLICA IDENTITY FULL without a primary key): rows are
    /// then matched with `IS NOT DISTINCT FROM` and one at a time.
    pub full_identity: bool,
    /// Some written column is `GENERATED ALWAYS AS IDENTITY`.
    pub overriding: bool,
    /// Source positions of the written `GENERATED ALWAYS AS IDENTITY` columns. They are never
    /// in an UPDATE's SET list: PostgreSQL accepts only `DEFAULT` there (SQLSTATE 428C9), even
    /// for an unchanged value. See [`IdentityChange`].
    pub always_identity: Vec<usize>,
}

/// What an update does to the table's `GENERATED ALWAYS AS IDENTITY` columns.
///
/// An identity value must replicate exactly, but an UPDATE cannot write one (there is no
/// `OVERRIDING SYSTEM VALUE` for UPDATE). In the common case (a plain UPDATE of other
/// columns) the value is unchanged and simply left out of the SET list. When the stream shows
/// it changed (the source ran `SET id = DEFAULT`) or cannot tell (a non-key identity column
/// without a full old row), the optimistic statement either does not apply (changed) or
/// applies only if the target's value already equals the new one; otherwise it fails into the
/// careful path, which writes the new value with [`TableMap::identity_rewrite`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityChange {
    /// No identity value is known to change; the statement must check that the target's
    /// values of these source positions equal the new row's (the stream cannot tell).
    Unchanged {
        /// Positions whose equality the statement checks.
        check: Vec<usize>,
    },
    /// An identity value changes: only the careful path can write it.
    Changed,
}

/// The source relation cannot be applied to the target table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// A published column does not exist on the target.
    #[error(
        "column {column:?} of table {table} exists on the source but not on the target; \
         add it on the target (DDL is not replicated) or list it in replication.skip_columns"
    )]
    MissingColumn {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
    },
    /// Updates and deletes cannot find rows.
    #[error(
        "table {table} has no replica identity columns in the stream; give it a primary key, \
         REPLICA IDENTITY USING INDEX or REPLICA IDENTITY FULL"
    )]
    NoIdentity {
        /// `schema.table`.
        table: String,
    },
}

impl TableMap {
    /// Maps `relation` (as the stream describes it) onto `target`; `skip` lists source columns
    /// never written to peers.
    pub fn new(relation: &Relation, target: TableInfo, skip: &[String]) -> Result<Self, MapError> {
        let table = relation.qualified_name();
        let mut target_column = Vec::with_capacity(relation.columns.len());
        let mut overriding = false;
        let mut always_identity = Vec::new();
        for (pos, col) in relation.columns.iter().enumerate() {
            if skip.contains(&col.name) {
                target_column.push(None);
                continue;
            }
            let Some(idx) = target.columns.iter().position(|c| c.name == col.name) else {
                return Err(MapError::MissingColumn {
                    table,
                    column: col.name.clone(),
                });
            };
            let info = &target.columns[idx];
            if info.generated {
                target_column.push(None);
                continue;
            }
            overriding |= info.identity_always;
            if info.identity_always {
                always_identity.push(pos);
            }
            target_column.push(Some(idx));
        }
        let key: Vec<usize> = relation
            .key_positions()
            .filter(|&i| target_column[i].is_some())
            .collect();
        let full_identity = relation.replica_identity == crate::event::ReplicaIdentity::Full
            && target.primary_key.is_empty()
            && target.identity_index.is_empty();
        let unique_key = target.unique_key().and_then(|cols| {
            cols.iter()
                .map(|name| {
                    relation
                        .position(name)
                        .filter(|&i| target_column[i].is_some())
                })
                .collect::<Option<Vec<usize>>>()
        });
        // With FULL identity but a unique key on the target, find rows by that key: cheaper,
        // and it works for types without an equality operator.
        let key = match (&unique_key, relation.replica_identity) {
            (Some(uk), crate::event::ReplicaIdentity::Full) => uk.clone(),
            _ => key,
        };
        Ok(TableMap {
            target,
            target_column,
            key,
            unique_key,
            full_identity,
            overriding,
            always_identity,
        })
    }

    /// Fails when updates and deletes could not find their rows.
    pub fn require_identity(&self) -> Result<(), MapError> {
        if self.key.is_empty() {
            return Err(MapError::NoIdentity {
                table: self.target.qualified_name(),
            });
        }
        Ok(())
    }

    fn col(&self, source_pos: usize) -> Option<&crate::catalog::ColumnInfo> {
        self.target_column[source_pos].map(|i| &self.target.columns[i])
    }

    /// Source positions of the written columns.
    pub fn written(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.target_column.len()).filter(|&i| self.target_column[i].is_some())
    }

    /// The columns of `present` an UPDATE sets (and takes parameters for, in this order):
    /// written ones, without `GENERATED ALWAYS` identity columns.
    pub fn settable(&self, present: &[usize]) -> Vec<usize> {
        present
            .iter()
            .copied()
            .filter(|&p| self.target_column[p].is_some() && !self.always_identity.contains(&p))
            .collect()
    }

    /// Whether an UPDATE has a column it may set at all (a table of `GENERATED ALWAYS`
    /// identity columns only has none).
    pub fn has_settable(&self) -> bool {
        let all: Vec<usize> = self.written().collect();
        !self.settable(&all).is_empty()
    }

    /// Whether an update from `old` to `new` changes a `GENERATED ALWAYS` identity value, or
    /// which values the statement must check because the stream cannot tell.
    pub fn identity_change(&self, new: &Tuple, old: Option<&OldTuple>) -> IdentityChange {
        let mut check = Vec::new();
        for &p in &self.always_identity {
            let Some(new_value) = new
                .0
                .get(p)
                .filter(|v| !matches!(v, Value::UnchangedToast | Value::Null))
            else {
                continue;
            };
            // Identity columns are NOT NULL: a NULL in an old key tuple means "not sent".
            let old_value = old
                .and_then(|o| o.tuple.0.get(p))
                .filter(|v| !matches!(v, Value::Null | Value::UnchangedToast));
            match old_value {
                Some(v) if v != new_value => return IdentityChange::Changed,
                Some(_) => {}
                // Without an old tuple the key did not change (both plugins send the old key
                // whenever it does).
                None if old.is_none() && self.key.contains(&p) => {}
                None => check.push(p),
            }
        }
        IdentityChange::Unchanged { check }
    }

    /// ` AND {alias}."c" = $n::t ...` for the identity positions `check`, parameters from
    /// `first`.
    fn identity_check(&self, alias: &str, check: &[usize], first: usize) -> String {
        let mut out = String::new();
        for (n, &pos) in check.iter().enumerate() {
            let _ = write!(
                out,
                " AND {alias}.{} = {}",
                self.name(pos),
                self.cast(pos, first + n)
            );
        }
        out
    }

    fn cast(&self, source_pos: usize, param: usize) -> String {
        match self.col(source_pos) {
            Some(c) => format!("${param}::{}", c.type_sql),
            None => format!("${param}"),
        }
    }

    fn name(&self, source_pos: usize) -> String {
        self.col(source_pos)
            .map(|c| quote_ident(&c.name))
            .unwrap_or_default()
    }

    /// `cur."k1" = $n::t AND ...` (or `IS NOT DISTINCT FROM`, comparing as text when the type
    /// has no equality), parameters numbered from `first`.
    fn key_match(&self, alias: &str, first: usize) -> String {
        let mut out = String::new();
        for (n, &pos) in self.key.iter().enumerate() {
            if n > 0 {
                out.push_str(" AND ");
            }
            let name = self.name(pos);
            let eq = self.col(pos).is_none_or(|c| c.has_equality);
            if self.full_identity {
                if eq {
                    let _ = write!(
                        out,
                        "{alias}.{name} IS NOT DISTINCT FROM {}",
                        self.cast(pos, first + n)
                    );
                } else {
                    let _ = write!(
                        out,
                        "{} IS NOT DISTINCT FROM ${}::text",
                        text_value(&format!("{alias}.{name}"), self.col(pos)),
                        first + n
                    );
                }
            } else {
                let _ = write!(out, "{alias}.{name} = {}", self.cast(pos, first + n));
            }
        }
        out
    }

    /// `pg_catalog.jsonb_build_array($a::t, ...)` over the unique key, parameters from `first`.
    fn key_json(&self, positions: &[usize], first: usize) -> String {
        let parts: Vec<String> = positions
            .iter()
            .enumerate()
            .map(|(n, &pos)| json_value(&self.cast(pos, first + n), self.col(pos)))
            .collect();
        format!("pg_catalog.jsonb_build_array({})", parts.join(", "))
    }

    /// Optimistic multi-row INSERT of `rows` rows (parameters: the written columns of each row
    /// in order). Fails with WB001 when a key exists or a tombstone has the key (a possible
    /// conflict), and with 23505 on a unique violation.
    pub fn insert_optimistic(&self, rows: usize) -> String {
        let names: Vec<String> = self.written().map(|p| self.name(p)).collect();
        let values = self.values_list(rows);
        let overriding = if self.overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        };
        let tombstone_check = match &self.unique_key {
            Some(uk) => {
                let key: Vec<String> = uk
                    .iter()
                    .map(|&p| json_value(&format!("v.{}", self.name(p)), self.col(p)))
                    .collect();
                format!(
                    " WHERE NOT EXISTS (SELECT 1 FROM walbridge.tombstones tb \
                     WHERE tb.relid = {} AND tb.key = pg_catalog.jsonb_build_array({}))",
                    self.target.oid,
                    key.join(", ")
                )
            }
            None => String::new(),
        };
        format!(
            "WITH ins AS (INSERT INTO {table} ({names}){overriding} \
             SELECT * FROM (VALUES {values}) AS v ({names}){tombstone_check} RETURNING 1) \
             SELECT walbridge.expect_rows(count(*), {rows}) FROM ins",
            table = self.target.quoted_name(),
            names = names.join(", "),
        )
    }

    /// `COPY ... FROM STDIN` of the written columns (text format), for large batches of a
    /// table without tombstones; identity columns take the copied values as they are.
    pub fn copy_in(&self) -> String {
        let names: Vec<String> = self.written().map(|p| self.name(p)).collect();
        format!(
            "COPY {} ({}) FROM STDIN",
            self.target.quoted_name(),
            names.join(", ")
        )
    }

    /// `($1::t1, $2::t2), ($3::t1, $4::t2), ...`: `rows` rows of the written columns.
    fn values_list(&self, rows: usize) -> String {
        let cols: Vec<usize> = self.written().collect();
        let mut values = String::new();
        let mut param = 1;
        for r in 0..rows {
            if r > 0 {
                values.push_str(", ");
            }
            values.push('(');
            for (n, &pos) in cols.iter().enumerate() {
                if n > 0 {
                    values.push_str(", ");
                }
                values.push_str(&self.cast(pos, param));
                param += 1;
            }
            values.push(')');
        }
        values
    }

    /// Plain multi-row INSERT of `rows` rows, for a table without tombstones (guarded by
    /// [`TOMBSTONE_GUARD`] once per group): a key that exists fails with 23505.
    pub fn insert_plain_rows(&self, rows: usize) -> String {
        let names: Vec<String> = self.written().map(|p| self.name(p)).collect();
        let values = self.values_list(rows);
        format!(
            "INSERT INTO {} ({}){} VALUES {values}",
            self.target.quoted_name(),
            names.join(", "),
            if self.overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
        )
    }

    /// Guard that holds when the row's current version cannot be in conflict with the
    /// incoming change: written by a node whose origin id is in the array `$o` (the source
    /// itself, and under node_priority the nodes it outranks) or, when `by_time`, committed
    /// strictly before the incoming change (`$t`).
    fn guard(&self, origin_param: usize, time_param: usize, by_time: bool) -> String {
        let time = if by_time {
            format!(" OR o.timestamp < ${time_param}::timestamptz")
        } else {
            String::new()
        };
        format!(
            "(SELECT o.roident = ANY(${origin_param}::oid[]){time} \
             FROM pg_catalog.pg_xact_commit_timestamp_origin(cur.xmin) o) IS NOT FALSE"
        )
    }

    /// Optimistic UPDATE of one row. Parameters: the [`TableMap::settable`] columns of
    /// `present` (source positions whose value is not unchanged-TOAST), then the new values of
    /// the identity columns to `check` (see [`IdentityChange`]), then the key values, then the
    /// origin ids it may overwrite (an `oid[]`) and its commit time. `by_time`: whether an
    /// older target version may be overwritten without a conflict check (last_write_wins,
    /// error).
    pub fn update_optimistic(&self, present: &[usize], check: &[usize], by_time: bool) -> String {
        let (set, next) = self.set_list(present, "cur");
        let identity = self.identity_check("cur", check, next);
        let next = next + check.len();
        let key = self.key_match("cur", next);
        let guard = self.guard(next + self.key.len(), next + self.key.len() + 1, by_time);
        format!(
            "WITH upd AS (UPDATE {table} AS cur SET {set} WHERE {target}{identity} AND {guard} \
             RETURNING 1) SELECT walbridge.expect_rows(count(*), 1) FROM upd",
            table = self.target.quoted_name(),
            target = self.row_target(&key),
        )
    }

    /// Careful path: whether the row's identity values differ from the new ones. Parameters:
    /// the new values of `identity` (source positions), then the key values. One row
    /// (`t`/`f`), none when the row is gone.
    pub fn identity_differs(&self, identity: &[usize]) -> String {
        let differs: Vec<String> = identity
            .iter()
            .enumerate()
            .map(|(n, &p)| {
                format!(
                    "cur.{} IS DISTINCT FROM {}",
                    self.name(p),
                    self.cast(p, n + 1)
                )
            })
            .collect();
        let key = self.key_match("cur", identity.len() + 1);
        format!(
            "SELECT {} FROM {} AS cur WHERE {} LIMIT 1",
            differs.join(" OR "),
            self.target.quoted_name(),
            self.row_target(&key)
        )
    }

    /// Careful path: the statements that write new values into `GENERATED ALWAYS` identity
    /// columns, in one transaction: the columns become `GENERATED BY DEFAULT` (which an
    /// UPDATE may set), the row is updated, and they become `GENERATED ALWAYS` again before the
    /// transaction commits, so no other session ever sees the change. Parameters of the
    /// UPDATE (the second statement): the new values of `identity`, then the key values.
    ///
    /// Chosen over DELETE + INSERT ... OVERRIDING SYSTEM VALUE because the row stays the same
    /// row: the target sees an UPDATE as the source did, so foreign keys act as for an UPDATE
    /// (a DELETE would fire `ON DELETE CASCADE`/`SET NULL` on referencing rows, or fail a
    /// `RESTRICT`, whenever they are enforced), update triggers fire instead of delete and
    /// insert triggers, and no delete tombstone is recorded for a key that still exists. The
    /// price is an `ACCESS EXCLUSIVE` lock on the table until the apply transaction commits and
    /// the need to own the table (or be superuser); it is paid only in the rare case of a
    /// changed identity value.
    pub fn identity_rewrite(&self, identity: &[usize]) -> [String; 3] {
        let alter = |how: &str| {
            let parts: Vec<String> = identity
                .iter()
                .map(|&p| format!("ALTER COLUMN {} SET GENERATED {how}", self.name(p)))
                .collect();
            format!(
                "ALTER TABLE {} {}",
                self.target.quoted_name(),
                parts.join(", ")
            )
        };
        let set: Vec<String> = identity
            .iter()
            .enumerate()
            .map(|(n, &p)| format!("{} = {}", self.name(p), self.cast(p, n + 1)))
            .collect();
        let key = self.key_match("cur", identity.len() + 1);
        [
            alter("BY DEFAULT"),
            format!(
                "UPDATE {} AS cur SET {} WHERE {}",
                self.target.quoted_name(),
                set.join(", "),
                self.row_target(&key)
            ),
            alter("ALWAYS"),
        ]
    }

    /// Optimistic DELETE of one row. Parameters: key values, the origin ids it may overwrite
    /// (`oid[]`), commit time.
    pub fn delete_optimistic(&self, by_time: bool) -> String {
        let key = self.key_match("cur", 1);
        let guard = self.guard(1 + self.key.len(), 2 + self.key.len(), by_time);
        format!(
            "WITH del AS (DELETE FROM {table} AS cur WHERE {target} AND {guard} RETURNING 1) \
             SELECT walbridge.expect_rows(count(*), 1) FROM del",
            table = self.target.quoted_name(),
            target = self.row_target(&key),
        )
    }

    /// Rows are found by key; with FULL identity and no unique key, one arbitrary matching
    /// row (duplicates are indistinguishable).
    fn row_target(&self, key_match: &str) -> String {
        if self.full_identity {
            format!(
                "cur.ctid = (SELECT c2.ctid FROM {} AS c2 WHERE {} LIMIT 1)",
                self.target.quoted_name(),
                key_match.replace("cur.", "c2.")
            )
        } else {
            key_match.to_string()
        }
    }

    /// `"c" = $1::t, ...` over the [`TableMap::settable`] columns of `present`, and the next
    /// parameter number. With none of them (every present column is a `GENERATED ALWAYS`
    /// identity or unchanged TOAST), a written column is set to itself (`{alias}` is the
    /// updated table's alias), so the statement still writes a new row version.
    fn set_list(&self, present: &[usize], alias: &str) -> (String, usize) {
        let mut set = String::new();
        let mut param = 1;
        for pos in self.settable(present) {
            if param > 1 {
                set.push_str(", ");
            }
            let _ = write!(set, "{} = {}", self.name(pos), self.cast(pos, param));
            param += 1;
        }
        if set.is_empty() {
            let all: Vec<usize> = self.written().collect();
            if let Some(&pos) = self.settable(&all).first() {
                let name = self.name(pos);
                let _ = write!(set, "{name} = {alias}.{name}");
            }
        }
        (set, param)
    }

    /// Careful path: the target's current row for a key, locked, with its version and whether
    /// it equals the change's old row. Parameters: key values, then (when `old_columns` is
    /// non-empty) the old row's values of those columns. Returns one row or none:
    /// `(row as json text, commit time, origin id, equals_old, written by this transaction)`.
    ///
    /// The version is computed in the target list, never in a `LATERAL` join: when the lock
    /// waits for a concurrent writer, PostgreSQL re-reads the locked row but reuses a joined
    /// function's earlier result, which would pair the new row with the old commit time.
    pub fn lookup_row(&self, old_columns: &[usize]) -> String {
        let key = self.key_match("cur", 1);
        let mut equals = String::from("NULL::boolean");
        if !old_columns.is_empty() {
            let mut param = 1 + self.key.len();
            let parts: Vec<String> = old_columns
                .iter()
                .filter(|&&p| self.target_column[p].is_some())
                .map(|&p| {
                    let s = format!(
                        "{} IS NOT DISTINCT FROM ${param}::text",
                        text_value(&format!("cur.{}", self.name(p)), self.col(p))
                    );
                    param += 1;
                    s
                })
                .collect();
            if !parts.is_empty() {
                equals = format!("({})", parts.join(" AND "));
            }
        }
        format!(
            "SELECT ({row})::text, \
                    (pg_catalog.pg_xact_commit_timestamp_origin(cur.xmin)).timestamp, \
                    (pg_catalog.pg_xact_commit_timestamp_origin(cur.xmin)).roident::int8, {equals}, \
                    {MINE} \
             FROM {table} AS cur \
             WHERE {target} LIMIT 1 FOR UPDATE OF cur",
            row = row_json("cur", &self.target),
            table = self.target.quoted_name(),
            target = self.row_target(&key),
        )
    }

    /// Careful path: the key's tombstone version, if any. Parameters: unique key values.
    pub fn lookup_tombstone(&self) -> Option<String> {
        let uk = self.unique_key.as_ref()?;
        Some(format!(
            "SELECT o.timestamp, o.roident::int8, {} FROM walbridge.tombstones tb \
             LEFT JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(tb.xmin) o ON true \
             WHERE tb.relid = {} AND tb.key = {}",
            MINE.replace("cur.", "tb."),
            self.target.oid,
            self.key_json(uk, 1)
        ))
    }

    /// Careful path: record a deletion that found no row. Parameters: unique key values.
    pub fn record_tombstone(&self) -> Option<String> {
        let uk = self.unique_key.as_ref()?;
        Some(format!(
            "INSERT INTO walbridge.tombstones (relid, key) VALUES ({}, {}) \
             ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key",
            self.target.oid,
            self.key_json(uk, 1)
        ))
    }

    /// Careful path: forget a tombstone once a later insert recreated the key. Parameters:
    /// unique key values.
    pub fn delete_tombstone(&self) -> Option<String> {
        let uk = self.unique_key.as_ref()?;
        Some(format!(
            "DELETE FROM walbridge.tombstones WHERE relid = {} AND key = {}",
            self.target.oid,
            self.key_json(uk, 1)
        ))
    }

    /// Careful path: plain single-row INSERT of the written columns.
    pub fn insert_plain(&self) -> String {
        let cols: Vec<usize> = self.written().collect();
        let names: Vec<String> = cols.iter().map(|&p| self.name(p)).collect();
        let values: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(n, &p)| self.cast(p, n + 1))
            .collect();
        format!(
            "INSERT INTO {} ({}){} VALUES ({})",
            self.target.quoted_name(),
            names.join(", "),
            if self.overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            values.join(", ")
        )
    }

    /// Careful path: plain UPDATE of the [`TableMap::settable`] present columns; parameters:
    /// their values, then the key values.
    pub fn update_plain(&self, present: &[usize]) -> String {
        let (set, next) = self.set_list(present, "cur");
        let key = self.key_match("cur", next);
        format!(
            "UPDATE {} AS cur SET {set} WHERE {}",
            self.target.quoted_name(),
            self.row_target(&key)
        )
    }

    /// Careful path: plain DELETE by key.
    pub fn delete_plain(&self) -> String {
        let key = self.key_match("cur", 1);
        format!(
            "DELETE FROM {} AS cur WHERE {}",
            self.target.quoted_name(),
            self.row_target(&key)
        )
    }
}

/// Whether row `cur` was written by the current transaction (an earlier change of the same
/// target transaction): its commit time and origin are not known yet (`NULL`), and it is the
/// source's own version, not the target's.
const MINE: &str = "coalesce(cur.xmin OPERATOR(pg_catalog.=) \
                    pg_catalog.pg_current_xact_id_if_assigned()::xid, false)";

/// What a resolving statement needs to decide last-write-wins by itself.
#[derive(Clone, Debug)]
pub struct Resolving {
    /// `CASE <origin id> WHEN .. THEN <rank> .. ELSE <target rank> END` over `{ro}`.
    pub rank_case: String,
    /// The source node's rank.
    pub source_rank: usize,
    /// Source node name (for the conflict log).
    pub source: String,
    /// Target node name.
    pub target: String,
    /// `CASE <origin id> WHEN .. THEN '<node>' .. ELSE '<target>' END` over `{ro}`: the
    /// local version's writer, for the journal.
    pub writer_case: String,
    /// The priority order the journal records (the policy version).
    pub priority: Vec<String>,
    /// `replication.conflict_max_row_bytes`.
    pub max_row_bytes: u64,
}

impl TableMap {
    /// The locked current row with its version, and whether the incoming change wins under
    /// last-write-wins (`wb_apply`): written by an overwritable origin (`$o`), unknown time,
    /// older, or a tie the source wins by rank.
    fn decided_row(
        &self,
        key_first: usize,
        o: usize,
        t: usize,
        r: &Resolving,
        identity: &str,
    ) -> String {
        let key = format!("{}{identity}", self.key_match("c", key_first));
        let limit = if self.full_identity { " LIMIT 1" } else { "" };
        format!(
            "cur AS (SELECT c.ctid AS wb_ctid, \
             (pg_catalog.pg_xact_commit_timestamp_origin(c.xmin)).timestamp AS wb_ts, \
             (pg_catalog.pg_xact_commit_timestamp_origin(c.xmin)).roident AS wb_ro, \
             ({row})::text AS wb_row FROM {table} AS c \
             WHERE {key}{limit} FOR UPDATE OF c), \
             dec AS (SELECT cur.*, (wb_ro = ANY(${o}::oid[]) OR wb_ts IS NULL \
             OR wb_ts < ${t}::timestamptz OR (wb_ts = ${t}::timestamptz AND {rank} > {src})) \
             AS wb_apply FROM cur)",
            row = row_json("c", &self.target),
            table = self.target.quoted_name(),
            rank = r.rank_case.replace("{ro}", "wb_ro"),
            src = r.source_rank,
        )
    }

    /// `pg_catalog.jsonb_build_array(($n::type)::text, ...)` of the key, as the careful path logs it.
    fn key_text_json(&self, first: usize) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(n, &pos)| text_value(&self.cast(pos, first + n), self.col(pos)))
            .collect();
        format!("pg_catalog.jsonb_build_array({})", parts.join(", "))
    }

    /// The skipped change's journal row, with every fact replay needs (see
    /// `walbridge.conflicts` in sql/schema.sql). `t`: the incoming commit time; `t + 1`: its
    /// commit LSN; `t + 2`: the measured clock skews (`float8[]`, by rank) for `ambiguous`;
    /// `t + 3`: the trigger-mode change row's id (`int8`, NULL for a WAL change).
    /// `complete`: the incoming row carries every written column; `unsent`: the columns it
    /// lacks (their journaled value is the locked row's, the value the skipped update keeps).
    #[allow(clippy::too_many_arguments)]
    fn conflict_insert(
        &self,
        r: &Resolving,
        kind: &str,
        key_first: usize,
        remote: &str,
        t: usize,
        complete: bool,
        unsent: &[usize],
    ) -> String {
        let lit = crate::catalog::quote_literal;
        let names = |ps: &[usize]| -> Vec<String> {
            ps.iter()
                .filter_map(|&p| self.col(p).map(|c| c.name.clone()))
                .collect()
        };
        let array = |v: &[String]| {
            format!(
                "ARRAY[{}]::text[]",
                v.iter().map(|n| lit(n)).collect::<Vec<_>>().join(", ")
            )
        };
        // Unsent values from the locked row, so the journal keeps the whole version.
        let fill: Vec<String> = names(unsent)
            .iter()
            .map(|n| format!("{}, dec.wb_row::jsonb -> {}", lit(n), lit(n)))
            .collect();
        let remote = if fill.is_empty() {
            remote.to_string()
        } else {
            format!(
                "pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object({})) || {remote}",
                fill.join(", ")
            )
        };
        let rank = r.rank_case.replace("{ro}", "dec.wb_ro");
        let m = r.max_row_bytes;
        format!(
            "skip AS (INSERT INTO walbridge.conflicts (source, target, table_name, key, kind, \
             resolution, local_commit_ts, remote_commit_ts, policy, local_writer, \
             local_tombstone, row_equals_old, complete_row, ambiguous, source_lsn, priority, \
             remote_unsent, local_row, remote_row, local_row_truncated, remote_row_truncated, \
             source_change_id) \
             SELECT {src}, {tgt}, {label}, {key}, '{kind}', 'skipped', dec.wb_ts, ${t}::timestamptz, \
             'last_write_wins', {writer}, false, {equals_old}, {complete}, \
             COALESCE(pg_catalog.abs(pg_catalog.date_part('epoch', dec.wb_ts - ${t}::timestamptz)) \
             < pg_catalog.abs((${s}::float8[])[{src_rank} + 1] - (${s}::float8[])[{rank} + 1]), false), \
             ${l}::pg_lsn, {priority}, {unsent}, \
             walbridge.journal_row(dec.wb_row::jsonb, {m}), walbridge.journal_row({remote}, {m}), \
             COALESCE(pg_catalog.octet_length(dec.wb_row::jsonb::text) > {m}, false), \
             COALESCE(pg_catalog.octet_length(({remote})::text) > {m}, false), ${c}::int8 \
             FROM dec WHERE NOT dec.wb_apply RETURNING key::text, ambiguous)",
            src = lit(&r.source),
            tgt = lit(&r.target),
            label = lit(&self.target.qualified_name()),
            key = self.key_text_json(key_first),
            writer = r.writer_case.replace("{ro}", "dec.wb_ro"),
            // Found by the whole old row: it equals it.
            equals_old = if self.full_identity { "true" } else { "NULL::boolean" },
            l = t + 1,
            s = t + 2,
            c = t + 3,
            src_rank = r.source_rank,
            priority = array(&r.priority),
            unsent = array(&names(unsent)),
        )
    }

    /// A last-write-wins UPDATE that resolves `update_older` itself: applies when the incoming
    /// change wins, else records the conflict and skips; fails (WB001) only when the row is
    /// missing (or its identity values to `check` differ). Parameters as
    /// [`TableMap::update_optimistic`] with `by_time`, then the source's commit LSN, the
    /// clock skews by rank and the change row id (see [`TableMap::conflict_insert`]). Returns one row:
    /// `(_, skipped key or NULL, table, kind, ambiguous)`.
    pub fn update_resolving(&self, present: &[usize], check: &[usize], r: &Resolving) -> String {
        let (set, next) = self.set_list(present, "c");
        let identity = self.identity_check("c", check, next);
        let next = next + check.len();
        let o = next + self.key.len();
        let t = o + 1;
        let remote: Vec<String> = self
            .settable(present)
            .into_iter()
            .enumerate()
            .map(|(n, p)| {
                format!(
                    "{}, {}",
                    crate::catalog::quote_literal(
                        &self.col(p).map(|c| c.name.clone()).unwrap_or_default()
                    ),
                    text_value(&self.cast(p, n + 1), self.col(p))
                )
            })
            .collect();
        let remote = format!("pg_catalog.jsonb_build_object({})", remote.join(", "));
        let unsent: Vec<usize> = self.written().filter(|p| !present.contains(p)).collect();
        format!(
            "WITH {dec}, \
             upd AS (UPDATE {table} AS c SET {set} FROM dec WHERE c.ctid = dec.wb_ctid AND dec.wb_apply RETURNING 1), \
             {skip} \
             SELECT walbridge.expect_rows((SELECT count(*) FROM upd) + (SELECT count(*) FROM skip), 1), \
             (SELECT key FROM skip), {label}, 'update_older', (SELECT ambiguous FROM skip)",
            dec = self.decided_row(next, o, t, r, &identity),
            table = self.target.quoted_name(),
            skip = self.conflict_insert(r, "update_older", next, &remote, t, unsent.is_empty(), &unsent),
            label = crate::catalog::quote_literal(&self.target.qualified_name()),
        )
    }

    /// The DELETE counterpart of [`TableMap::update_resolving`] (`delete_older`).
    pub fn delete_resolving(&self, r: &Resolving) -> String {
        let o = 1 + self.key.len();
        let t = o + 1;
        format!(
            "WITH {dec}, \
             del AS (DELETE FROM {table} AS c USING dec WHERE c.ctid = dec.wb_ctid AND dec.wb_apply RETURNING 1), \
             {skip} \
             SELECT walbridge.expect_rows((SELECT count(*) FROM del) + (SELECT count(*) FROM skip), 1), \
             (SELECT key FROM skip), {label}, 'delete_older', (SELECT ambiguous FROM skip)",
            dec = self.decided_row(1, o, t, r, ""),
            table = self.target.quoted_name(),
            skip = self.conflict_insert(r, "delete_older", 1, "NULL::jsonb", t, false, &[]),
            label = crate::catalog::quote_literal(&self.target.qualified_name()),
        )
    }
}

/// Careful path: one row of `walbridge.conflicts`. Parameters: source, target, table, key
/// (json text), kind, resolution, local row (json text), remote row (json text), local commit
/// time, remote commit time, policy, the local version's writer, whether that version is a
/// tombstone, whether the row equalled the change's old row, whether the incoming row was
/// complete, whether the decision was ambiguous (closer than the measured clock skew), the
/// source's commit LSN, the priority order (json array), the columns the source did not send
/// (json array), the row size bound (`replication.conflict_max_row_bytes`), the trigger-mode
/// change row's id (NULL for a WAL change).
pub const INSERT_CONFLICT: &str = "INSERT INTO walbridge.conflicts \
    (source, target, table_name, key, kind, resolution, \
     local_commit_ts, remote_commit_ts, policy, local_writer, local_tombstone, row_equals_old, \
     complete_row, ambiguous, source_lsn, priority, remote_unsent, \
     local_row, remote_row, local_row_truncated, remote_row_truncated, source_change_id) \
    SELECT $1, $2, $3, $4::jsonb, $5, $6, $9::timestamptz, $10::timestamptz, \
     $11, $12, $13::bool, $14::bool, $15::bool, $16::bool, $17::pg_lsn, \
     ARRAY(SELECT pg_catalog.jsonb_array_elements_text($18::jsonb)), \
     ARRAY(SELECT pg_catalog.jsonb_array_elements_text($19::jsonb)), \
     walbridge.journal_row($7::jsonb, $20::int4), walbridge.journal_row($8::jsonb, $20::int4), \
     COALESCE(pg_catalog.octet_length($7::jsonb::text) > $20::int4, false), \
     COALESCE(pg_catalog.octet_length($8::jsonb::text) > $20::int4, false), $21::int8";

/// `TRUNCATE` of exactly the given quoted table names, with the source's `RESTART IDENTITY`.
///
/// Never `CASCADE`, whatever the source used: the source's message already lists every table
/// its cascade emptied that is replicated, and a cascade on the target would also empty tables
/// walbridge does not replicate that happen to reference one of them. This is what
/// PostgreSQL's own apply worker does (it truncates the listed relations with
/// `DROP_RESTRICT`); as there, a table that is not in the list but references one of them with
/// a foreign key makes the statement fail (SQLSTATE 0A000), and the direction stops with an
/// error saying so (see [`truncate_refused`]) instead of deleting rows the source never sent.
pub fn truncate(tables: &[String], restart_identity: bool) -> String {
    format!(
        "TRUNCATE {}{}",
        tables.join(", "),
        if restart_identity {
            " RESTART IDENTITY"
        } else {
            ""
        },
    )
}

/// Whether `error`, the failure of a statement or group that ran a TRUNCATE (`truncated`), is
/// the target refusing it because a table outside it references one of the truncated tables
/// (PostgreSQL's "cannot truncate a table referenced in a foreign key constraint"): the
/// operator must decide, nothing is cascaded.
///
/// Told by the SQLSTATE, never by the message (a server with another `lc_messages` words it
/// in its own language): a TRUNCATE of the tables walbridge replicates raises
/// `feature_not_supported` (0A000) for that, and otherwise only for another session's
/// temporary table (which no publication holds) or a foreign table whose wrapper cannot
/// truncate (the server's own words, quoted in the stop, then say so).
pub fn truncate_refused(error: &crate::protocol::ServerError, truncated: bool) -> bool {
    truncated && error.code == "0A000"
}

/// SQLSTATE raised by `walbridge.expect_rows` (sql/schema.sql): a statement changed other
/// rows than expected, a possible conflict; the transaction is redone carefully.
pub const ROWS_NOT_AS_EXPECTED: &str = "WB001";

/// SQLSTATE raised by `walbridge.expect_no_tombstones` (sql/schema.sql), with the table in the
/// error's SCHEMA and TABLE fields: the table got delete tombstones since it was mapped.
pub const TOMBSTONES_APPEARED: &str = "WB003";

/// Fails (WB001, like a possible conflict) so that the group rolls back and its transactions
/// are redone carefully: used for a change only the careful path can write.
pub const NEEDS_CAREFUL: &str = "SELECT walbridge.expect_rows(0, 1)";

/// Fails (WB003) when the table (`$1`, its OID) has delete tombstones: plain INSERTs of it
/// must then take the per-row check.
pub const TOMBSTONE_GUARD: &str = "SELECT walbridge.expect_no_tombstones($1::oid)";

/// Last statement of every applied transaction: checks the pipeline's position and stamps the
/// source's commit. Parameters: expected origin progress, end LSN, commit time.
pub const APPLY_FINISH: &str =
    "SELECT walbridge.apply_finish($1::pg_lsn, $2::pg_lsn, $3::timestamptz)";

/// The origin progress that is durable on the target (flushes WAL up to the last applied
/// commit first), which is what may be confirmed to the source.
pub const FLUSHED_PROGRESS: &str = "SELECT pg_catalog.pg_replication_origin_session_progress(true)";

#[cfg(test)]
mod tests {
    //! The builders' contract with their callers: the `$n` a statement uses are exactly the
    //! parameters its caller sends (in number), names are quoted, values never inlined, and
    //! every function is schema-qualified.

    use std::collections::BTreeSet;

    use super::*;
    use crate::catalog::{ColumnInfo, TableKind};
    use crate::event::{Column, OldKind, ReplicaIdentity};

    fn col(name: &str, type_oid: u32, type_sql: &str) -> ColumnInfo {
        ColumnInfo::for_test(name, type_oid, type_sql)
    }

    /// `"Mixed Case"."we;ird ""t"""`: id (GENERATED ALWAYS identity, the key), `a"b` text,
    /// `g` (generated), `mood` (a user type), `secret` (skipped by the configuration).
    fn target(replica_identity: ReplicaIdentity, primary_key: &[&str]) -> TableInfo {
        let mut id = col("id", 20, "bigint");
        id.identity_always = true;
        let mut g = col("g", 23, "integer");
        g.generated = true;
        TableInfo {
            oid: 4242,
            schema: "Mixed Case".into(),
            name: "we;ird \"t\"".into(),
            kind: TableKind::Ordinary,
            replica_identity,
            columns: vec![
                id,
                col("a\"b", 25, "text"),
                g,
                col("mood", 70000, "public.mood"),
                col("secret", 25, "text"),
            ],
            primary_key: primary_key.iter().map(|s| s.to_string()).collect(),
            identity_index: vec![],
        }
    }

    fn relation(target: &TableInfo, keys: &[&str]) -> Relation {
        Relation {
            oid: 16400,
            schema: target.schema.clone(),
            table: target.name.clone(),
            replica_identity: target.replica_identity,
            columns: target
                .columns
                .iter()
                .map(|c| Column {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: -1,
                    is_key: keys.contains(&c.name.as_str()),
                })
                .collect(),
        }
    }

    fn keyed() -> TableMap {
        let t = target(ReplicaIdentity::Default, &["id"]);
        let rel = relation(&t, &["id"]);
        TableMap::new(&rel, t, &["secret".to_string()]).expect("maps")
    }

    /// REPLICA IDENTITY FULL and no key on the target.
    fn full() -> TableMap {
        let mut t = target(ReplicaIdentity::Full, &[]);
        t.columns[1].has_equality = false;
        let rel = relation(&t, &["id", "a\"b", "g", "mood", "secret"]);
        TableMap::new(&rel, t, &["secret".to_string()]).expect("maps")
    }

    /// The parameter numbers a statement uses.
    fn params(sql: &str) -> BTreeSet<usize> {
        let b = sql.as_bytes();
        let mut out = BTreeSet::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'$' {
                let digits: String = sql[i + 1..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(n) = digits.parse() {
                    out.insert(n);
                }
                i += 1 + digits.len();
            } else {
                i += 1;
            }
        }
        out
    }

    /// Asserts that `sql` uses exactly `$1 ..= $n`.
    fn uses(sql: &str, n: usize) {
        assert_eq!(params(sql), (1..=n).collect(), "{sql}");
    }

    /// Words directly followed by `(` that are neither schema-qualified nor SQL syntax.
    /// `count(*)` is let through: the aggregate resolves in the session's pinned
    /// `search_path=pg_catalog,pg_temp` (see `protocol`), though it is not written qualified.
    fn unqualified_calls(sql: &str) -> Vec<String> {
        const SYNTAX: &[&str] = &[
            "VALUES", "EXISTS", "ANY", "IN", "AS", "AND", "OR", "NOT", "SELECT", "FROM", "WHERE",
            "ON", "USING", "CONFLICT", "OPERATOR", "COALESCE", "coalesce", "GREATEST", "count",
        ];
        let mut out = Vec::new();
        let mut word = String::new();
        let mut qualified = false;
        let mut prev = ' ';
        for c in sql.chars() {
            if c.is_ascii_alphanumeric() || c == '_' {
                if word.is_empty() {
                    qualified = prev == '.';
                }
                word.push(c);
            } else {
                if c == '(' && !word.is_empty() && !qualified && !SYNTAX.contains(&word.as_str()) {
                    out.push(word.clone());
                }
                word.clear();
            }
            prev = c;
        }
        out
    }

    /// Every builder's output, named, for the checks that hold for all of them.
    fn every_statement(map: &TableMap) -> Vec<(&'static str, String)> {
        let written: Vec<usize> = map.written().collect();
        let resolving = Resolving {
            rank_case: "(CASE {ro} WHEN 1 THEN 0 ELSE 1 END)".into(),
            source_rank: 0,
            source: "east".into(),
            target: "we'st".into(),
            writer_case: "(CASE {ro} WHEN 1 THEN 'east' ELSE 'we''st' END)".into(),
            priority: vec!["east".into(), "we'st".into()],
            max_row_bytes: 65536,
        };
        let mut all = vec![
            ("insert_optimistic", map.insert_optimistic(3)),
            ("insert_plain_rows", map.insert_plain_rows(3)),
            ("copy_in", map.copy_in()),
            (
                "update_optimistic",
                map.update_optimistic(&written, &[], true),
            ),
            (
                "update_resolving",
                map.update_resolving(&written, &[], &resolving),
            ),
            ("delete_optimistic", map.delete_optimistic(true)),
            ("delete_resolving", map.delete_resolving(&resolving)),
            ("lookup_row", map.lookup_row(&written)),
            ("insert_plain", map.insert_plain()),
            ("update_plain", map.update_plain(&written)),
            ("delete_plain", map.delete_plain()),
            ("identity_differs", map.identity_differs(&[0])),
        ];
        for (i, s) in map.identity_rewrite(&[0]).into_iter().enumerate() {
            all.push((
                [
                    "identity_rewrite 0",
                    "identity_rewrite 1",
                    "identity_rewrite 2",
                ][i],
                s,
            ));
        }
        for (name, s) in [
            ("lookup_tombstone", map.lookup_tombstone()),
            ("record_tombstone", map.record_tombstone()),
            ("delete_tombstone", map.delete_tombstone()),
        ] {
            all.extend(s.map(|s| (name, s)));
        }
        all
    }

    #[test]
    fn generated_and_skipped_columns_are_never_written() {
        let map = keyed();
        assert_eq!(map.written().collect::<Vec<_>>(), vec![0, 1, 3]);
        assert_eq!(map.key, vec![0]);
        assert_eq!(map.unique_key, Some(vec![0]));
        assert!(map.overriding && !map.full_identity);
        // The identity column is never SET by an UPDATE.
        assert_eq!(map.settable(&[0, 1, 3]), vec![1, 3]);
        let named = |sql: &str| sql.contains("\"g\"") || sql.contains("\"secret\"");
        for sql in [
            map.insert_optimistic(2),
            map.insert_plain_rows(2),
            map.insert_plain(),
            map.copy_in(),
        ] {
            assert!(!named(&sql), "{sql}");
        }
        for (name, sql) in every_statement(&map) {
            assert!(
                !sql.contains("\"g\" =") && !sql.contains("\"secret\" ="),
                "{name}: {sql}"
            );
        }
    }

    #[test]
    fn statements_use_exactly_the_parameters_their_callers_send() {
        let map = keyed();
        let written: Vec<usize> = map.written().collect();
        let (w, k) = (written.len(), map.key.len());
        let settable = map.settable(&written).len();
        let r = Resolving {
            rank_case: "(CASE {ro} WHEN 1 THEN 0 ELSE 1 END)".into(),
            source_rank: 0,
            source: "east".into(),
            target: "west".into(),
            writer_case: "(CASE {ro} WHEN 1 THEN 'east' ELSE 'west' END)".into(),
            priority: vec!["east".into(), "west".into()],
            max_row_bytes: 65536,
        };
        // Multi-row inserts: every written column of every row.
        uses(&map.insert_optimistic(1), w);
        uses(&map.insert_optimistic(4), 4 * w);
        uses(&map.insert_plain_rows(8), 8 * w);
        uses(&map.insert_plain(), w);
        // Updates: set columns, identity values to check, key, then origins and commit time.
        uses(
            &map.update_optimistic(&written, &[], true),
            settable + k + 2,
        );
        // Without `by_time` the guard takes no commit time.
        uses(
            &map.update_optimistic(&written, &[0], false),
            settable + 1 + k + 1,
        );
        // Resolving statements also take the journal's source LSN, the measured skews and the
        // change row id.
        uses(&map.update_resolving(&written, &[], &r), settable + k + 5);
        uses(
            &map.update_resolving(&written, &[0], &r),
            settable + 1 + k + 5,
        );
        uses(&map.update_plain(&written), settable + k);
        // An update of unchanged TOAST only still has its key and guard parameters.
        uses(&map.update_optimistic(&[], &[], true), k + 2);
        uses(&map.delete_optimistic(true), k + 2);
        uses(&map.delete_optimistic(false), k + 1);
        uses(&map.delete_resolving(&r), k + 5);
        uses(&map.delete_plain(), k);
        uses(&map.lookup_row(&[]), k);
        uses(&map.lookup_row(&written), k + w);
        uses(&map.identity_differs(&[0]), 1 + k);
        let [by_default, update, always] = map.identity_rewrite(&[0]);
        uses(&by_default, 0);
        uses(&update, 1 + k);
        uses(&always, 0);
        for sql in [
            map.lookup_tombstone(),
            map.record_tombstone(),
            map.delete_tombstone(),
        ] {
            uses(&sql.expect("a unique key"), 1);
        }
        uses(APPLY_FINISH, 3);
        uses(TOMBSTONE_GUARD, 1);
        uses(INSERT_CONFLICT, 21);
    }

    #[test]
    fn names_are_quoted_and_functions_qualified() {
        for map in [keyed(), full()] {
            for (name, sql) in every_statement(&map) {
                assert!(
                    // Tombstones name the table by its OID.
                    name.ends_with("_tombstone") || sql.contains(r#""Mixed Case"."we;ird ""t""""#),
                    "{name}: {sql}"
                );
                assert!(
                    !sql.contains("we;ird \"t\" "),
                    "{name}: unquoted table: {sql}"
                );
                if sql.contains("a\"") {
                    assert!(sql.contains(r#""a""b""#), "{name}: unquoted column: {sql}");
                }
                assert_eq!(
                    unqualified_calls(&sql),
                    Vec::<String>::new(),
                    "{name}: {sql}"
                );
            }
        }
        // The node names of the conflict log are literals, quoted as such.
        let map = keyed();
        let all = every_statement(&map);
        let resolving = &all
            .iter()
            .find(|(n, _)| *n == "update_resolving")
            .expect("built")
            .1;
        assert!(resolving.contains("'we''st'"), "{resolving}");
    }

    #[test]
    fn values_are_cast_to_the_target_types_and_user_types_read_through_text() {
        let map = keyed();
        let insert = map.insert_plain();
        assert!(
            insert.contains("$1::bigint, $2::text, $3::public.mood"),
            "{insert}"
        );
        assert!(insert.contains("OVERRIDING SYSTEM VALUE"), "{insert}");
        // A user type's value is never handed to a cast to json its owner may have written.
        let lookup = map.lookup_row(&map.written().collect::<Vec<_>>());
        assert!(!lookup.contains("pg_catalog.to_jsonb(cur)"), "{lookup}");
        assert!(
            lookup.contains("pg_catalog.format('%s', cur.\"mood\")"),
            "{lookup}"
        );
        assert!(lookup.contains("FOR UPDATE OF cur"), "{lookup}");
    }

    #[test]
    fn full_identity_matches_one_row_null_safely_and_by_text_without_equality() {
        let map = full();
        assert!(map.full_identity);
        assert_eq!(map.unique_key, None);
        // Every written column is part of the key, found null-safely; `a"b` has no equality
        // operator and is compared as text.
        assert_eq!(map.key, vec![0, 1, 3]);
        let delete = map.delete_plain();
        assert!(
            delete.contains(r#"c2."id" IS NOT DISTINCT FROM $1::bigint"#),
            "{delete}"
        );
        assert!(
            delete.contains(r#"(c2."a""b")::text IS NOT DISTINCT FROM $2::text"#),
            "{delete}"
        );
        // Duplicates are indistinguishable: exactly one of them is deleted.
        assert!(
            delete.contains("cur.ctid = (SELECT c2.ctid FROM") && delete.contains("LIMIT 1)"),
            "{delete}"
        );
        assert_eq!(map.lookup_tombstone(), None);
    }

    #[test]
    fn identity_changes_are_told_from_unchanged_values() {
        let map = keyed();
        let t = |v: &[&str]| Tuple(v.iter().map(|s| Value::text(*s)).collect());
        let new = t(&["1", "x", "0", "ok", "s"]);
        // No old tuple: the key (the identity column) did not change.
        assert_eq!(
            map.identity_change(&new, None),
            IdentityChange::Unchanged { check: vec![] }
        );
        let old = |id: &str| OldTuple {
            kind: OldKind::Key,
            tuple: Tuple(vec![
                Value::text(id),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
            ]),
        };
        assert_eq!(
            map.identity_change(&new, Some(&old("1"))),
            IdentityChange::Unchanged { check: vec![] }
        );
        assert_eq!(
            map.identity_change(&new, Some(&old("2"))),
            IdentityChange::Changed
        );
    }

    #[test]
    fn a_missing_column_and_a_missing_identity_say_what_to_do() {
        let t = target(ReplicaIdentity::Default, &["id"]);
        let mut rel = relation(&t, &["id"]);
        rel.columns.push(Column {
            name: "extra".into(),
            type_oid: 25,
            type_modifier: -1,
            is_key: false,
        });
        let err = TableMap::new(&rel, t.clone(), &[]).expect_err("extra column");
        assert!(
            err.to_string().contains("replication.skip_columns"),
            "{err}"
        );
        // Skipping it is the way out.
        TableMap::new(&rel, t.clone(), &["extra".into(), "secret".into()]).expect("skipped");

        let keyless = relation(&t, &[]);
        let map = TableMap::new(&keyless, t, &[]).expect("maps");
        let err = map.require_identity().expect_err("no key");
        assert!(err.to_string().contains("REPLICA IDENTITY FULL"), "{err}");
    }

    #[test]
    fn truncate_lists_exactly_the_tables_and_never_cascades() {
        let sql = truncate(&["\"a\".\"b\"".into(), "\"c\".\"d\"".into()], true);
        assert_eq!(sql, "TRUNCATE \"a\".\"b\", \"c\".\"d\" RESTART IDENTITY");
        assert!(!truncate(&["x".into()], false).contains("CASCADE"));
    }

    /// `"app"."t" (id bigint PRIMARY KEY, v text, n integer)`, replicated whole: the plain
    /// case, whose statements are checked word for word below.
    fn plain() -> TableMap {
        let t = TableInfo {
            oid: 777,
            schema: "app".into(),
            name: "t".into(),
            kind: TableKind::Ordinary,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col("id", 20, "bigint"),
                col("v", 25, "text"),
                col("n", 23, "integer"),
            ],
            primary_key: vec!["id".into()],
            identity_index: vec![],
        };
        let rel = relation(&t, &["id"]);
        TableMap::new(&rel, t, &[]).expect("maps")
    }

    /// `source` east (rank 0, origin id 1), `target` west.
    fn east_wins_ties() -> Resolving {
        Resolving {
            rank_case: "(CASE {ro} WHEN 1 THEN 0 ELSE 1 END)".into(),
            source_rank: 0,
            source: "east".into(),
            target: "west".into(),
            writer_case: "(CASE {ro} WHEN 1 THEN 'east' ELSE 'west' END)".into(),
            priority: vec!["east".into(), "west".into()],
            max_row_bytes: 100,
        }
    }

    /// The optimistic guard over origin ids `$o` and, `by_time`, commit time `$t`.
    fn guard(o: usize, t: Option<usize>) -> String {
        let time = t.map_or(String::new(), |t| {
            format!(" OR o.timestamp < ${t}::timestamptz")
        });
        format!(
            "(SELECT o.roident = ANY(${o}::oid[]){time} \
             FROM pg_catalog.pg_xact_commit_timestamp_origin(cur.xmin) o) IS NOT FALSE"
        )
    }

    #[test]
    fn optimistic_insert_batch_expects_every_row_and_skips_none_silently() {
        // Every row is inserted unless a tombstone has its key; the count must be the batch
        // size, so a tombstoned key fails the statement (WB001) instead of losing the row.
        assert_eq!(
            plain().insert_optimistic(2),
            "WITH ins AS (INSERT INTO \"app\".\"t\" (\"id\", \"v\", \"n\") \
             SELECT * FROM (VALUES ($1::bigint, $2::text, $3::integer), \
             ($4::bigint, $5::text, $6::integer)) AS v (\"id\", \"v\", \"n\") \
             WHERE NOT EXISTS (SELECT 1 FROM walbridge.tombstones tb WHERE tb.relid = 777 \
             AND tb.key = pg_catalog.jsonb_build_array(v.\"id\")) RETURNING 1) \
             SELECT walbridge.expect_rows(count(*), 2) FROM ins"
        );
        // Without a unique key there are no tombstones to check.
        let keyless = full().insert_optimistic(1);
        assert!(!keyless.contains("tombstones"), "{keyless}");
        assert!(
            keyless.ends_with("RETURNING 1) SELECT walbridge.expect_rows(count(*), 1) FROM ins"),
            "{keyless}"
        );
    }

    #[test]
    fn plain_insert_batch_and_copy_write_the_columns_in_source_order() {
        let map = plain();
        assert_eq!(
            map.insert_plain_rows(2),
            "INSERT INTO \"app\".\"t\" (\"id\", \"v\", \"n\") \
             VALUES ($1::bigint, $2::text, $3::integer), ($4::bigint, $5::text, $6::integer)"
        );
        assert_eq!(
            map.insert_plain(),
            "INSERT INTO \"app\".\"t\" (\"id\", \"v\", \"n\") \
             VALUES ($1::bigint, $2::text, $3::integer)"
        );
        // COPY lines carry the written columns in the same order (see `copy_text`).
        assert_eq!(
            map.copy_in(),
            "COPY \"app\".\"t\" (\"id\", \"v\", \"n\") FROM STDIN"
        );
        // Identity values replicate as they are: the multi-row insert overrides them.
        let identity = keyed();
        assert!(identity
            .insert_plain_rows(1)
            .contains(") OVERRIDING SYSTEM VALUE VALUES ("));
        assert!(identity
            .insert_optimistic(1)
            .contains(") OVERRIDING SYSTEM VALUE SELECT * FROM (VALUES"));
    }

    #[test]
    fn optimistic_update_finds_the_row_by_its_old_key_and_may_set_a_new_one() {
        // A key change: the new key is SET ($1), the row is found by the old one ($4), which
        // the caller sends after the new values.
        assert_eq!(
            plain().update_optimistic(&[0, 1, 2], &[], true),
            format!(
                "WITH upd AS (UPDATE \"app\".\"t\" AS cur SET \"id\" = $1::bigint, \
                 \"v\" = $2::text, \"n\" = $3::integer WHERE cur.\"id\" = $4::bigint AND {} \
                 RETURNING 1) SELECT walbridge.expect_rows(count(*), 1) FROM upd",
                guard(5, Some(6))
            )
        );
    }

    #[test]
    fn optimistic_update_sets_only_sent_columns_and_compares_times_only_when_told() {
        let map = plain();
        // `v` is unchanged TOAST (not sent): left as it is; node_priority: no time compared.
        assert_eq!(
            map.update_optimistic(&[0, 2], &[], false),
            format!(
                "WITH upd AS (UPDATE \"app\".\"t\" AS cur SET \"id\" = $1::bigint, \
                 \"n\" = $2::integer WHERE cur.\"id\" = $3::bigint AND {} RETURNING 1) \
                 SELECT walbridge.expect_rows(count(*), 1) FROM upd",
                guard(4, None)
            )
        );
        // Nothing sent but the key: the row still gets a new version (its commit time and
        // origin are what later conflicts compare).
        assert_eq!(
            map.update_optimistic(&[], &[], true),
            format!(
                "WITH upd AS (UPDATE \"app\".\"t\" AS cur SET \"id\" = cur.\"id\" \
                 WHERE cur.\"id\" = $1::bigint AND {} RETURNING 1) \
                 SELECT walbridge.expect_rows(count(*), 1) FROM upd",
                guard(2, Some(3))
            )
        );
    }

    #[test]
    fn optimistic_update_of_an_always_identity_checks_its_value_instead_of_setting_it() {
        let map = keyed();
        let sql = map.update_optimistic(&[0, 1, 3], &[0], true);
        assert_eq!(
            sql,
            format!(
                "WITH upd AS (UPDATE \"Mixed Case\".\"we;ird \"\"t\"\"\" AS cur \
                 SET \"a\"\"b\" = $1::text, \"mood\" = $2::public.mood \
                 WHERE cur.\"id\" = $4::bigint AND cur.\"id\" = $3::bigint AND {} \
                 RETURNING 1) SELECT walbridge.expect_rows(count(*), 1) FROM upd",
                guard(5, Some(6))
            )
        );
    }

    #[test]
    fn optimistic_delete_finds_the_row_by_key_behind_the_guard() {
        let map = plain();
        for (by_time, guard) in [(true, guard(2, Some(3))), (false, guard(2, None))] {
            assert_eq!(
                map.delete_optimistic(by_time),
                format!(
                    "WITH del AS (DELETE FROM \"app\".\"t\" AS cur WHERE cur.\"id\" = $1::bigint \
                     AND {guard} RETURNING 1) SELECT walbridge.expect_rows(count(*), 1) FROM del"
                )
            );
        }
    }

    #[test]
    fn careful_statements_write_and_read_exactly_the_decided_row() {
        let map = plain();
        assert_eq!(
            map.update_plain(&[1, 2]),
            "UPDATE \"app\".\"t\" AS cur SET \"v\" = $1::text, \"n\" = $2::integer \
             WHERE cur.\"id\" = $3::bigint"
        );
        assert_eq!(
            map.delete_plain(),
            "DELETE FROM \"app\".\"t\" AS cur WHERE cur.\"id\" = $1::bigint"
        );
        // The locked row, its version, whether it equals the old row's `v`, and whether this
        // transaction wrote it.
        assert_eq!(
            map.lookup_row(&[1]),
            "SELECT (pg_catalog.to_jsonb(cur))::text, \
             (pg_catalog.pg_xact_commit_timestamp_origin(cur.xmin)).timestamp, \
             (pg_catalog.pg_xact_commit_timestamp_origin(cur.xmin)).roident::int8, \
             ((cur.\"v\")::text IS NOT DISTINCT FROM $2::text), \
             coalesce(cur.xmin OPERATOR(pg_catalog.=) \
             pg_catalog.pg_current_xact_id_if_assigned()::xid, false) \
             FROM \"app\".\"t\" AS cur WHERE cur.\"id\" = $1::bigint LIMIT 1 FOR UPDATE OF cur"
        );
        let key = "pg_catalog.jsonb_build_array($1::bigint)";
        assert_eq!(
            map.lookup_tombstone().expect("a key"),
            format!(
                "SELECT o.timestamp, o.roident::int8, coalesce(tb.xmin OPERATOR(pg_catalog.=) \
                 pg_catalog.pg_current_xact_id_if_assigned()::xid, false) \
                 FROM walbridge.tombstones tb \
                 LEFT JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(tb.xmin) o ON true \
                 WHERE tb.relid = 777 AND tb.key = {key}"
            )
        );
        assert_eq!(
            map.record_tombstone().expect("a key"),
            format!(
                "INSERT INTO walbridge.tombstones (relid, key) VALUES (777, {key}) \
                 ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key"
            )
        );
        assert_eq!(
            map.delete_tombstone().expect("a key"),
            format!("DELETE FROM walbridge.tombstones WHERE relid = 777 AND key = {key}")
        );
        assert_eq!(
            map.identity_differs(&[0]),
            "SELECT cur.\"id\" IS DISTINCT FROM $1::bigint FROM \"app\".\"t\" AS cur \
             WHERE cur.\"id\" = $2::bigint LIMIT 1"
        );
        assert_eq!(
            map.identity_rewrite(&[0]),
            [
                "ALTER TABLE \"app\".\"t\" ALTER COLUMN \"id\" SET GENERATED BY DEFAULT",
                "UPDATE \"app\".\"t\" AS cur SET \"id\" = $1::bigint WHERE cur.\"id\" = $2::bigint",
                "ALTER TABLE \"app\".\"t\" ALTER COLUMN \"id\" SET GENERATED ALWAYS",
            ]
            .map(String::from)
        );
    }

    /// The clauses of a resolving statement that decide what it does, for a statement whose
    /// key is `$k`, origins `$o` and commit time `$t`.
    fn decides(sql: &str, k: usize, o: usize, t: usize) {
        for clause in [
            // The current row, found by the (old) key and locked.
            format!(
                "(pg_catalog.to_jsonb(c))::text AS wb_row FROM \"app\".\"t\" AS c \
                 WHERE c.\"id\" = ${k}::bigint FOR UPDATE OF c)"
            ),
            // The incoming change wins: an overwritable writer, no known time, older, or a
            // tie the source wins by rank.
            format!(
                "(wb_ro = ANY(${o}::oid[]) OR wb_ts IS NULL OR wb_ts < ${t}::timestamptz \
                 OR (wb_ts = ${t}::timestamptz AND (CASE wb_ro WHEN 1 THEN 0 ELSE 1 END) > 0)) \
                 AS wb_apply FROM cur)"
            ),
            // Else it is journalled as skipped, with the commit LSN, skews and change id.
            format!("'skipped', dec.wb_ts, ${t}::timestamptz, 'last_write_wins'"),
            format!("${}::pg_lsn, ARRAY['east', 'west']::text[]", t + 1),
            format!("(${}::float8[])[0 + 1]", t + 2),
            format!(
                "${}::int8 FROM dec WHERE NOT dec.wb_apply RETURNING key::text, ambiguous)",
                t + 3
            ),
            format!("pg_catalog.jsonb_build_array((${k}::bigint)::text)"),
        ] {
            assert!(sql.contains(&clause), "{clause}\n  not in  {sql}");
        }
        uses(sql, t + 3);
    }

    #[test]
    fn resolving_update_applies_a_winning_change_and_journals_a_losing_one() {
        let sql = plain().update_resolving(&[0, 1], &[], &east_wins_ties());
        decides(&sql, 3, 4, 5);
        // Applied only where it wins, to the locked row; `n` was not sent: kept, and the
        // journal's remote row takes the locked row's value for it.
        assert!(sql.contains(
            "upd AS (UPDATE \"app\".\"t\" AS c SET \"id\" = $1::bigint, \"v\" = $2::text \
             FROM dec WHERE c.ctid = dec.wb_ctid AND dec.wb_apply RETURNING 1)"
        ));
        assert!(sql.contains("ARRAY['n']::text[]"), "{sql}");
        assert!(sql.contains(
            "pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object('n', \
             dec.wb_row::jsonb -> 'n')) || pg_catalog.jsonb_build_object('id', \
             ($1::bigint)::text, 'v', ($2::text)::text)"
        ));
        // Exactly one of the two happened, else WB001 (the row is gone: a careful redo).
        assert!(sql.ends_with(
            "SELECT walbridge.expect_rows((SELECT count(*) FROM upd) + (SELECT count(*) FROM skip), 1), \
             (SELECT key FROM skip), 'app.t', 'update_older', (SELECT ambiguous FROM skip)"
        ));
    }

    #[test]
    fn resolving_delete_deletes_a_winning_change_and_journals_a_losing_one() {
        let sql = plain().delete_resolving(&east_wins_ties());
        decides(&sql, 1, 2, 3);
        assert!(sql.contains(
            "del AS (DELETE FROM \"app\".\"t\" AS c USING dec \
             WHERE c.ctid = dec.wb_ctid AND dec.wb_apply RETURNING 1)"
        ));
        assert!(
            sql.contains("walbridge.journal_row(NULL::jsonb, 100)"),
            "{sql}"
        );
        assert!(sql.ends_with(
            "SELECT walbridge.expect_rows((SELECT count(*) FROM del) + (SELECT count(*) FROM skip), 1), \
             (SELECT key FROM skip), 'app.t', 'delete_older', (SELECT ambiguous FROM skip)"
        ));
    }

    #[test]
    fn odd_identifiers_stay_inside_their_quotes() {
        // Names that look like a parameter, a comment, a literal or a statement end.
        let t = TableInfo {
            oid: 1,
            schema: "s\"; DROP TABLE x; --".into(),
            name: "it's $1".into(),
            kind: TableKind::Ordinary,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("K\"ey", 20, "bigint"), col("v/*", 25, "text")],
            primary_key: vec!["K\"ey".into()],
            identity_index: vec![],
        };
        let rel = relation(&t, &["K\"ey"]);
        let map = TableMap::new(&rel, t, &[]).expect("maps");
        assert_eq!(
            map.update_plain(&[1]),
            "UPDATE \"s\"\"; DROP TABLE x; --\".\"it's $1\" AS cur SET \"v/*\" = $1::text \
             WHERE cur.\"K\"\"ey\" = $2::bigint"
        );
        assert_eq!(
            map.insert_plain(),
            "INSERT INTO \"s\"\"; DROP TABLE x; --\".\"it's $1\" (\"K\"\"ey\", \"v/*\") \
             VALUES ($1::bigint, $2::text)"
        );
        // As a literal (the journal's table name), the quote is doubled.
        let r = map.delete_resolving(&east_wins_ties());
        assert!(
            r.contains("'s\"; DROP TABLE x; --.it''s $1', 'delete_older'"),
            "{r}"
        );
    }
}
