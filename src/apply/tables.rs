//! The table cache: how each replicated relation is applied on the target.
//!
//! Kept apart because its invariant is about the source's descriptions, not the session or
//! the transactions: a `TableState` is only used for changes described exactly as it was
//! mapped (a new `Relation` message drops the mapping; the next change maps it again), and
//! `labels` keeps every relation's `schema.table` for metric labels even after its mapping is
//! dropped, so counts of acknowledged transactions are labelled with the name they had.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::ConflictPolicy;
use crate::event::{ChangeOp, Relation};

use super::sql::{self, TableMap};

/// The relations seen on the stream and their apply state, by relation OID.
#[derive(Default)]
pub(super) struct Tables {
    /// Mapped tables (dropped when their relation is described again).
    pub(super) states: HashMap<u32, Arc<TableState>>,
    /// The latest description of every relation OID seen.
    pub(super) relations: HashMap<u32, Arc<Relation>>,
    /// `schema.table` of every relation OID seen (metric labels).
    pub(super) labels: HashMap<u32, String>,
    /// Metric handles, looked up once instead of hashing labels per transaction.
    pub(super) change_counters: HashMap<(u32, ChangeOp), prometheus::IntCounter>,
}

impl Tables {
    /// The mapping of `relation`, if it was mapped from this very description.
    pub(super) fn mapped(&self, relation: &Arc<Relation>) -> Option<Arc<TableState>> {
        self.states
            .get(&relation.oid)
            .filter(|t| Arc::ptr_eq(&t.relation, relation) || t.relation == *relation)
            .cloned()
    }

    /// Caches a table's mapping and keeps its name for metric labels.
    pub(super) fn insert(&mut self, oid: u32, state: Arc<TableState>) {
        self.labels.insert(oid, state.label.clone());
        self.states.insert(oid, state);
    }

    /// Drops every mapping, keeping the descriptions: each table is looked up on the target
    /// again at its next change (the target's schema changed under the applier: a column or
    /// table dropped there by hand).
    pub(super) fn forget_mappings(&mut self) {
        self.states.clear();
    }

    /// A new description of a relation: its mapping is dropped (the next change maps it
    /// again).
    pub(super) fn describe(&mut self, rel: Arc<Relation>) {
        self.states.remove(&rel.oid);
        self.relations.insert(rel.oid, rel);
    }

    /// Target table `named` (`schema`, `table`; every table when `None`) got delete
    /// tombstones: its inserts check each key against them from now on.
    pub(super) fn tombstones_appeared(&self, named: Option<(&str, &str)>) {
        for t in self.states.values() {
            let target = &t.map.target;
            if named.is_none_or(|(s, n)| s == target.schema && n == target.name) {
                t.tombstoned.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// How a replicated table is applied.
pub(super) struct TableState {
    /// The description it was mapped from: a change described otherwise (one buffered
    /// before a new `Relation`, sent again after a failure) needs its own mapping.
    pub(super) relation: Arc<Relation>,
    pub(super) map: TableMap,
    pub(super) label: String,
    pub(super) policy: ConflictPolicy,
    /// Origin ids (`oid[]` literal) the optimistic path may overwrite.
    pub(super) overwritable: String,
    /// Whether an older target version may be overwritten without a check.
    pub(super) by_time: bool,
    /// last_write_wins only: how statements resolve `update_older`/`delete_older` in SQL.
    pub(super) resolving: Option<sql::Resolving>,
    /// The table has had such conflicts: use the resolving statements from now on (they cost
    /// a little more than the plain ones, so only contended tables get them).
    pub(super) hot: AtomicBool,
    /// The table has (or had, this session) delete tombstones: inserts check each key
    /// against them; without any, plain multi-row INSERTs behind one guard per group.
    pub(super) tombstoned: AtomicBool,
}

impl TableState {
    /// The resolving statements' settings, once the table is contended.
    pub(super) fn resolving_now(&self) -> Option<&sql::Resolving> {
        self.resolving
            .as_ref()
            .filter(|_| self.hot.load(Ordering::Relaxed))
    }
}
