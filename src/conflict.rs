//! Conflict detection outcomes and resolution policy: pure decisions, no I/O.
//!
//! In active-active two nodes can change the same row before either hears of the other. Every
//! node decides each incoming change the same way from the same facts, so once writes stop all
//! nodes hold the same data. The facts are the commit time and writer of the incoming change
//! and of the target's current row version (`pg_xact_commit_timestamp_origin(xmin)`; rows
//! applied by walbridge keep their source commit time and carry the source's origin), and of a
//! delete tombstone when the row is gone.
//!
//! Policies order row versions; the greater version wins:
//!
//! ```text
//!   last_write_wins : (commit time, priority)   later time wins; a tie goes to the node
//!                                               earlier in `priority`, then by node name
//!   node_priority   : (priority, commit time)   the higher-priority writer wins whatever the
//!                                               times; the same writer's later change wins
//!   error           : detection as last_write_wins; any conflict stops the direction
//! ```
//!
//! Each is a total order on row versions, delete tombstones included, applied the same way to
//! inserts, updates, deletes and re-inserts: a node keeps the greatest version it has seen of
//! each key, so once every version reached every node they all keep the same one, whatever the
//! arrival order and grouping. A change from the node that wrote the current version is never
//! a conflict: it is that node's next change of its own row (a later version in both orders).
//!
//! A node's own statements are versions too, and they must not be smaller than what they
//! replace, or the peers would discard them while the node keeps them. Under last_write_wins a
//! new commit is later than anything the node has seen (clocks in sync). Under node_priority a
//! lower-priority node's statement on a row (or a deleted key) last written by a node that
//! outranks it would be smaller: the `walbridge.priority_guard` trigger (sql/schema.sql)
//! discards it on that node too. "The writer had seen this version" (old row equal, REPLICA
//! IDENTITY FULL) is not used: it is not an order, and with three or more nodes the versions
//! reach nodes in different orders.
//!
//! `apply` asks [`decide`] only on its careful path, after the optimistic statement for a change
//! found something unexpected; `conflict` decides, `apply` executes.

use std::fmt;

use crate::config::ConflictPolicy;
use crate::event::ChangeOp;
use crate::lsn::PgTimestamp;

/// What was found, as in the `kind` label of `walbridge_conflicts_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConflictKind {
    /// An insert found the key present (or deleted later than the insert was written).
    InsertExists,
    /// An update found no row.
    UpdateMissing,
    /// An update found a row version that wins over it.
    UpdateOlder,
    /// A delete found no row.
    DeleteMissing,
    /// A delete found a row version that wins over it.
    DeleteOlder,
}

impl ConflictKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert_exists",
            ConflictKind::UpdateMissing => "update_missing",
            ConflictKind::UpdateOlder => "update_older",
            ConflictKind::DeleteMissing => "delete_missing",
            ConflictKind::DeleteOlder => "delete_older",
        }
    }
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a conflict ended, as in the `resolution` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// The incoming change was applied (possibly transformed: an insert became an update).
    Applied,
    /// The incoming change was discarded; the target's version stays.
    Skipped,
    /// Policy `error`: the direction stops and nothing is applied.
    Error,
}

impl Resolution {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Applied => "applied",
            Resolution::Skipped => "skipped",
            Resolution::Error => "error",
        }
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row version: when and by which node it was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// Commit time; `None` when unknown (written before commit timestamps were tracked, or a
    /// frozen row): such a version loses to any timed one.
    pub commit_time: Option<PgTimestamp>,
    /// Rank of the writing node in the configuration's total order (0 = highest priority).
    pub writer_rank: usize,
}

/// What the target holds for the incoming change's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalState {
    /// The current row's version, if the row exists.
    pub row: Option<Version>,
    /// Whether the current row equals the change's old row (only known with REPLICA IDENTITY
    /// FULL): then the writer of the change had seen this version.
    pub row_equals_old: Option<bool>,
    /// The version of the key's deletion, if a tombstone exists (meaningful when no row).
    pub tombstone: Option<Version>,
}

/// The incoming change's facts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// Insert, update or delete.
    pub op: ChangeOp,
    /// Its version.
    pub version: Version,
    /// Whether an update carries every column value (no unchanged-TOAST placeholder left
    /// unfilled), so it could recreate a missing row.
    pub complete_row: bool,
}

/// What apply must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Insert the incoming row.
    Insert,
    /// Update the existing row with the incoming values (an insert that won over an existing
    /// row becomes this too).
    Update,
    /// Recreate a missing row from an update's new values.
    InsertFromUpdate,
    /// Delete the existing row.
    Delete,
    /// Record the incoming deletion as a tombstone (the row is already gone).
    RecordTombstone,
    /// Do nothing.
    Skip,
    /// Stop the direction (policy `error`).
    Stop,
}

/// The outcome for one change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The conflict, if the change was one, and how it ended.
    pub conflict: Option<(ConflictKind, Resolution)>,
    /// What to execute.
    pub action: Action,
}

impl Decision {
    fn plain(action: Action) -> Self {
        Decision {
            conflict: None,
            action,
        }
    }
}

/// Whether `a` wins over `b` under `policy` (strictly greater in the policy's order; equal
/// versions of the same writer count as `a` winning, it being that writer's later change).
pub fn wins(policy: ConflictPolicy, a: Version, b: Version) -> bool {
    let time = |v: Version| v.commit_time.map_or(i64::MIN, |t| t.0);
    // Lower rank = higher priority, so compare ranks reversed.
    match policy {
        ConflictPolicy::LastWriteWins | ConflictPolicy::Error => {
            (time(a), std::cmp::Reverse(a.writer_rank))
                >= (time(b), std::cmp::Reverse(b.writer_rank))
        }
        ConflictPolicy::NodePriority => {
            (std::cmp::Reverse(a.writer_rank), time(a))
                >= (std::cmp::Reverse(b.writer_rank), time(b))
        }
    }
}

/// Whether a source transaction committed at `next` may be applied in the same target
/// transaction as one committed at `first`, in a configuration of `node_count` nodes.
///
/// A target transaction carries one commit time and origin, so every row it writes gets the
/// stamp of its last source transaction. With two nodes that never changes a decision: the
/// only versions compared with such a row are the same source's later changes and the
/// target's own local writes, which are not decided. With three or more, a third node's
/// change is compared with the stamp, so only transactions of one commit time share it: every
/// version then keeps its exact source commit time and writer, whatever the grouping.
pub fn may_share_stamp(
    node_count: usize,
    first: Option<PgTimestamp>,
    next: Option<PgTimestamp>,
) -> bool {
    node_count <= 2 || first == next
}

/// First statement of every transaction that applies replicated changes on a target of a
/// configuration with three or more nodes: one transaction-level advisory lock per database,
/// so the appliers from different sources to one target take turns.
///
/// Without it, two changes of a key that is missing on the target can both commit unseen by
/// each other: a delete from one source records a tombstone while an older insert from
/// another source checks for tombstones in a snapshot taken before that one committed, and the
/// row stays on this node only. A missing row has no row lock to wait on; this lock stands in
/// for it. With two nodes a target has one source and needs none, unless a table is under
/// node_priority: there a node's own inserts take the lock too (`walbridge.priority_guard`),
/// so a deletion being applied and a local re-insert of the key cannot both commit unseen.
pub const SERIALIZE_APPLIERS_SQL: &str = "SELECT pg_catalog.pg_advisory_xact_lock(2003985009, 1)";

/// Whether appliers to one target must take [`SERIALIZE_APPLIERS_SQL`]: with three or more
/// nodes, or when any table is under node_priority.
pub fn appliers_take_turns(node_count: usize, node_priority: bool) -> bool {
    node_count > 2 || node_priority
}

/// Decides one incoming change against the target's state.
pub fn decide(policy: ConflictPolicy, incoming: Incoming, local: LocalState) -> Decision {
    let conflict = |kind: ConflictKind, applied: bool, action: Action| {
        if policy == ConflictPolicy::Error {
            Decision {
                conflict: Some((kind, Resolution::Error)),
                action: Action::Stop,
            }
        } else if applied {
            Decision {
                conflict: Some((kind, Resolution::Applied)),
                action,
            }
        } else {
            Decision {
                conflict: Some((kind, Resolution::Skipped)),
                action: Action::Skip,
            }
        }
    };
    let inc = incoming.version;
    // The writer of the current version sends its own next change: no conflict. Whether the
    // old row matched (`row_equals_old`) decides nothing: a rule that let a writer that had
    // seen the current version win would not be a total order, and nodes that receive the
    // versions in different orders would keep different ones.
    let sequential = |row: Version| row.writer_rank == inc.writer_rank;

    match (incoming.op, local.row) {
        (ChangeOp::Insert, Some(row)) => conflict(
            ConflictKind::InsertExists,
            wins(policy, inc, row),
            Action::Update,
        ),
        (ChangeOp::Insert, None) => match local.tombstone {
            Some(tomb) if !wins(policy, inc, tomb) => {
                conflict(ConflictKind::InsertExists, false, Action::Skip)
            }
            _ => Decision::plain(Action::Insert),
        },
        (ChangeOp::Update, Some(row)) if sequential(row) => Decision::plain(Action::Update),
        (ChangeOp::Update, Some(row)) => {
            if wins(policy, inc, row) {
                Decision::plain(Action::Update)
            } else {
                conflict(ConflictKind::UpdateOlder, false, Action::Skip)
            }
        }
        (ChangeOp::Update, None) => {
            let beats_delete = local.tombstone.is_none_or(|t| wins(policy, inc, t));
            if beats_delete && incoming.complete_row {
                conflict(ConflictKind::UpdateMissing, true, Action::InsertFromUpdate)
            } else {
                conflict(ConflictKind::UpdateMissing, false, Action::Skip)
            }
        }
        (ChangeOp::Delete, Some(row)) if sequential(row) => Decision::plain(Action::Delete),
        (ChangeOp::Delete, Some(row)) => {
            if wins(policy, inc, row) {
                Decision::plain(Action::Delete)
            } else {
                conflict(ConflictKind::DeleteOlder, false, Action::Skip)
            }
        }
        (ChangeOp::Delete, None) => {
            // Keep the later deletion's time, so a late insert or update from a third node
            // cannot bring the row back.
            let newer = local.tombstone.is_none_or(|t| wins(policy, inc, t));
            let action = if newer {
                Action::RecordTombstone
            } else {
                Action::Skip
            };
            if policy == ConflictPolicy::Error {
                conflict(ConflictKind::DeleteMissing, false, action)
            } else {
                Decision {
                    conflict: Some((ConflictKind::DeleteMissing, Resolution::Skipped)),
                    action,
                }
            }
        }
    }
}

/// Whether a server error (SQLSTATE `code`) writing the conflict journal means the node's
/// `walbridge.conflicts` predates this walbridge (a column, or `walbridge.journal_row`, is
/// missing): `setup` adds them.
pub fn journal_outdated(code: &str) -> bool {
    code == "42703" || code == "42883"
}

/// What to do about [`journal_outdated`], for the error text.
pub const JOURNAL_OUTDATED_FIX: &str = "walbridge.conflicts there predates this walbridge; \
     run `walbridge setup` once (it is idempotent) to add the journal's columns, then restart";

/// The rule that ordered the incoming version `incoming` against the target's `local` one
/// under `policy`, as `walbridge why` and `walbridge conflicts` name it.
pub fn deciding_rule(policy: ConflictPolicy, incoming: Version, local: Version) -> &'static str {
    let same_time = incoming.commit_time == local.commit_time;
    match policy {
        _ if incoming.writer_rank == local.writer_rank && same_time => "same writer",
        ConflictPolicy::LastWriteWins | ConflictPolicy::Error if same_time => {
            "commit time tie, broken by priority"
        }
        ConflictPolicy::LastWriteWins | ConflictPolicy::Error => "later commit time",
        ConflictPolicy::NodePriority if incoming.writer_rank == local.writer_rank => {
            "same writer, later commit time"
        }
        ConflictPolicy::NodePriority => "node priority",
    }
}

/// The incoming row version as the conflict journal keeps it: `remote` (a JSON object) with
/// each column of `unsent` (a value the source did not send: an unchanged TOASTed value) taken
/// from `local`, the target's row found by the same key, which is the value the applied
/// update keeps. A column `local` lacks (no row) stays out; the journal's `remote_unsent` names
/// them all. `remote` unchanged when it is not an object.
pub fn journal_remote_row(remote: &str, local: Option<&str>, unsent: &[String]) -> String {
    use serde_json::Value;
    if unsent.is_empty() {
        return remote.to_string();
    }
    let Ok(Value::Object(mut row)) = serde_json::from_str::<Value>(remote) else {
        return remote.to_string();
    };
    if let Some(Value::Object(local)) = local.and_then(|l| serde_json::from_str(l).ok()) {
        for c in unsent {
            if let Some(v) = local.get(c) {
                row.insert(c.clone(), v.clone());
            }
        }
    }
    Value::Object(row).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConflictPolicy::*;

    const EAST: usize = 0;
    const WEST: usize = 1;

    fn v(time: i64, rank: usize) -> Version {
        Version {
            commit_time: Some(PgTimestamp(time)),
            writer_rank: rank,
        }
    }

    fn inc(op: ChangeOp, time: i64, rank: usize) -> Incoming {
        Incoming {
            op,
            version: v(time, rank),
            complete_row: true,
        }
    }

    fn row(version: Version) -> LocalState {
        LocalState {
            row: Some(version),
            row_equals_old: None,
            tombstone: None,
        }
    }

    fn gone(tombstone: Option<Version>) -> LocalState {
        LocalState {
            row: None,
            row_equals_old: None,
            tombstone,
        }
    }

    /// Applies one node's change on the other in both orders and checks both nodes end with
    /// the same winner: the property every row of the outcome table must have.
    fn converges(policy: ConflictPolicy, a: Version, b: Version) -> bool {
        wins(policy, a, b) != wins(policy, b, a) || a == b
    }

    #[test]
    fn later_update_wins_on_both_nodes() {
        // east wrote at 10, west at 20; each receives the other's.
        let at_west = decide(
            LastWriteWins,
            inc(ChangeOp::Update, 10, EAST),
            row(v(20, WEST)),
        );
        let at_east = decide(
            LastWriteWins,
            inc(ChangeOp::Update, 20, WEST),
            row(v(10, EAST)),
        );
        assert_eq!(at_west.action, Action::Skip);
        assert_eq!(
            at_west.conflict,
            Some((ConflictKind::UpdateOlder, Resolution::Skipped))
        );
        assert_eq!(at_east.action, Action::Update);
        assert_eq!(at_east.conflict, None);
    }

    #[test]
    fn exact_tie_goes_to_priority_on_both_nodes() {
        let at_west = decide(
            LastWriteWins,
            inc(ChangeOp::Update, 10, EAST),
            row(v(10, WEST)),
        );
        let at_east = decide(
            LastWriteWins,
            inc(ChangeOp::Update, 10, WEST),
            row(v(10, EAST)),
        );
        assert_eq!(at_west.action, Action::Update);
        assert_eq!(at_east.action, Action::Skip);
    }

    #[test]
    fn node_priority_ignores_times() {
        let at_west = decide(
            NodePriority,
            inc(ChangeOp::Update, 10, EAST),
            row(v(20, WEST)),
        );
        let at_east = decide(
            NodePriority,
            inc(ChangeOp::Update, 20, WEST),
            row(v(10, EAST)),
        );
        assert_eq!(at_west.action, Action::Update);
        assert_eq!(at_east.action, Action::Skip);
        assert_eq!(
            at_east.conflict,
            Some((ConflictKind::UpdateOlder, Resolution::Skipped))
        );
    }

    #[test]
    fn node_priority_decides_by_the_order_even_when_the_old_row_matches() {
        // "The writer had seen this version" is not part of a total order: a node that got
        // the versions the other way round would keep the other one.
        let mut state = row(v(10, EAST));
        state.row_equals_old = Some(true);
        let d = decide(NodePriority, inc(ChangeOp::Update, 20, WEST), state);
        assert_eq!(d.action, Action::Skip);
        assert_eq!(
            d.conflict,
            Some((ConflictKind::UpdateOlder, Resolution::Skipped))
        );
    }

    #[test]
    fn same_writer_is_never_a_conflict() {
        for policy in [LastWriteWins, NodePriority, Error] {
            let d = decide(policy, inc(ChangeOp::Update, 5, WEST), row(v(10, WEST)));
            assert_eq!(d, Decision::plain(Action::Update), "{policy:?}");
            let d = decide(policy, inc(ChangeOp::Delete, 5, WEST), row(v(10, WEST)));
            assert_eq!(d, Decision::plain(Action::Delete), "{policy:?}");
        }
    }

    #[test]
    fn insert_insert_converges_to_one_row() {
        let at_west = decide(
            LastWriteWins,
            inc(ChangeOp::Insert, 10, EAST),
            row(v(20, WEST)),
        );
        let at_east = decide(
            LastWriteWins,
            inc(ChangeOp::Insert, 20, WEST),
            row(v(10, EAST)),
        );
        assert_eq!(
            at_west.conflict,
            Some((ConflictKind::InsertExists, Resolution::Skipped))
        );
        assert_eq!(
            at_east.conflict,
            Some((ConflictKind::InsertExists, Resolution::Applied))
        );
        assert_eq!(at_east.action, Action::Update);
    }

    #[test]
    fn update_racing_a_later_delete_loses() {
        // east updates at 10, west deletes at 20.
        let at_west = decide(
            LastWriteWins,
            inc(ChangeOp::Update, 10, EAST),
            gone(Some(v(20, WEST))),
        );
        let at_east = decide(
            LastWriteWins,
            inc(ChangeOp::Delete, 20, WEST),
            row(v(10, EAST)),
        );
        assert_eq!(at_west.action, Action::Skip);
        assert_eq!(
            at_west.conflict,
            Some((ConflictKind::UpdateMissing, Resolution::Skipped))
        );
        assert_eq!(at_east.action, Action::Delete);
    }

    #[test]
    fn update_racing_an_earlier_delete_recreates_the_row() {
        // west deletes at 10, east updates at 20.
        let at_west = decide(
            LastWriteWins,
            inc(ChangeOp::Update, 20, EAST),
            gone(Some(v(10, WEST))),
        );
        let at_east = decide(
            LastWriteWins,
            inc(ChangeOp::Delete, 10, WEST),
            row(v(20, EAST)),
        );
        assert_eq!(at_west.action, Action::InsertFromUpdate);
        assert_eq!(
            at_east.conflict,
            Some((ConflictKind::DeleteOlder, Resolution::Skipped))
        );
    }

    #[test]
    fn update_with_unfilled_toast_cannot_recreate() {
        let mut i = inc(ChangeOp::Update, 20, EAST);
        i.complete_row = false;
        let d = decide(LastWriteWins, i, gone(None));
        assert_eq!(d.action, Action::Skip);
    }

    #[test]
    fn insert_of_a_key_deleted_later_elsewhere_is_skipped() {
        let d = decide(
            LastWriteWins,
            inc(ChangeOp::Insert, 10, EAST),
            gone(Some(v(20, WEST))),
        );
        assert_eq!(d.action, Action::Skip);
        let d = decide(
            LastWriteWins,
            inc(ChangeOp::Insert, 30, EAST),
            gone(Some(v(20, WEST))),
        );
        assert_eq!(d, Decision::plain(Action::Insert));
    }

    #[test]
    fn delete_delete_records_the_later_deletion() {
        let d = decide(
            LastWriteWins,
            inc(ChangeOp::Delete, 30, EAST),
            gone(Some(v(20, WEST))),
        );
        assert_eq!(d.action, Action::RecordTombstone);
        assert_eq!(
            d.conflict,
            Some((ConflictKind::DeleteMissing, Resolution::Skipped))
        );
        let d = decide(
            LastWriteWins,
            inc(ChangeOp::Delete, 10, EAST),
            gone(Some(v(20, WEST))),
        );
        assert_eq!(d.action, Action::Skip);
    }

    #[test]
    fn error_policy_stops_on_every_kind() {
        let cases = [
            (inc(ChangeOp::Insert, 10, EAST), row(v(20, WEST))),
            (inc(ChangeOp::Update, 10, EAST), row(v(20, WEST))),
            (inc(ChangeOp::Update, 10, EAST), gone(None)),
            (inc(ChangeOp::Delete, 10, EAST), row(v(20, WEST))),
            (inc(ChangeOp::Delete, 10, EAST), gone(None)),
        ];
        for (i, l) in cases {
            let d = decide(Error, i, l);
            assert_eq!(d.action, Action::Stop, "{i:?} {l:?}");
            assert_eq!(d.conflict.map(|c| c.1), Some(Resolution::Error));
        }
    }

    #[test]
    fn unknown_commit_time_loses() {
        let old = Version {
            commit_time: None,
            writer_rank: EAST,
        };
        assert!(wins(LastWriteWins, v(1, WEST), old));
    }

    #[test]
    fn version_orders_are_total_and_antisymmetric() {
        let versions = [v(1, EAST), v(1, WEST), v(2, EAST), v(2, WEST), v(3, 2)];
        for policy in [LastWriteWins, NodePriority] {
            for a in versions {
                for b in versions {
                    assert!(converges(policy, a, b), "{policy:?} {a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn journal_fills_unsent_values_from_the_local_row() {
        let unsent = vec!["big".to_string()];
        assert_eq!(
            super::journal_remote_row(
                r#"{"id":"1","v":"new"}"#,
                Some(r#"{"id":1,"v":"old","big":"xxx"}"#),
                &unsent
            ),
            r#"{"big":"xxx","id":"1","v":"new"}"#
        );
        assert_eq!(
            super::journal_remote_row(r#"{"id":"1"}"#, None, &unsent),
            r#"{"id":"1"}"#
        );
        assert_eq!(super::journal_remote_row("x", None, &[]), "x");
    }

    #[test]
    fn the_deciding_rule_is_named() {
        use super::deciding_rule;
        assert_eq!(
            deciding_rule(LastWriteWins, v(10, EAST), v(10, WEST)),
            "commit time tie, broken by priority"
        );
        assert_eq!(
            deciding_rule(LastWriteWins, v(10, EAST), v(20, WEST)),
            "later commit time"
        );
        assert_eq!(
            deciding_rule(NodePriority, v(10, EAST), v(20, WEST)),
            "node priority"
        );
    }
}
