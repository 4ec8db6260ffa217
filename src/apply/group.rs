//! The transaction being received and the group being encoded.
//!
//! Kept apart because its invariant is about the open Sync group, not what is in flight: a
//! group holds whole source transactions only (a `Sync` never falls inside one), its pending
//! multi-row INSERT (`batch`) belongs to exactly one table (`batch_table`) and is encoded
//! before any other statement of the group, and `parsed` lists every statement first parsed
//! inside it, so a failed group's uncertain statements can be forgotten.

use std::collections::HashMap;
use std::time::Instant;

use crate::event::{Begin, Change, ChangeOp, Commit, Truncate, Tuple};
use crate::lsn::{Lsn, PgTimestamp};

use super::position;

/// One item of a transaction, kept for a careful redo.
#[derive(Clone, Debug)]
pub(super) enum Item {
    Change(Change),
    Truncate(Truncate),
    /// A replicated schema change (`walbridge.ddl()`), see [`ddl`].
    Ddl(crate::event::SchemaChange),
}

/// A transaction being received from the source.
pub(super) struct OpenTxn {
    pub(super) begin: Begin,
    pub(super) items: Option<Vec<Item>>,
    pub(super) changes: usize,
    /// Changes per (relation OID, op), labelled when counted.
    pub(super) counts: HashMap<(u32, ChangeOp), u64>,
    /// Truncated tables (`schema.table`) and how often.
    pub(super) truncates: HashMap<String, u64>,
    pub(super) started: Instant,
    /// Applied carefully from its first change, each change as it arrives and never in a
    /// group (after a conflict in a transaction too large to keep, or for a schema change).
    pub(super) careful_as_it_arrives: bool,
}

/// A received transaction, waiting for its group to commit.
pub(super) struct Sent {
    pub(super) end_lsn: Lsn,
    pub(super) commit_time: PgTimestamp,
    pub(super) begin: Begin,
    pub(super) commit: Commit,
    pub(super) items: Option<Vec<Item>>,
    /// Changes per (relation OID, op), labelled when counted.
    pub(super) counts: HashMap<(u32, ChangeOp), u64>,
    /// Truncated tables (`schema.table`) and how often.
    pub(super) truncates: HashMap<String, u64>,
    pub(super) started: Instant,
    /// A position that is not an LSN (see [`position`]); `None` in stream mode.
    pub(super) recorded: Option<Box<position::Recorded>>,
}

/// The group being encoded (statements sent or buffered, no `Sync` yet).
pub(super) struct OpenGroup {
    pub(super) members: Vec<Sent>,
    pub(super) first_commit_time: PgTimestamp,
    /// Statements first parsed inside this group: if the group fails, whether the server kept
    /// them is unknown, so they are closed and parsed again.
    pub(super) parsed: Vec<String>,
    pub(super) batch: Vec<Tuple>,
    pub(super) batch_table: Option<u32>,
    /// Tables whose "no tombstones" guard is already in this group.
    pub(super) guarded: Vec<u32>,
    /// When the group opened.
    pub(super) opened: Instant,
    /// An explicit transaction (`BEGIN` first): it holds a streamed transaction, whose
    /// subtransactions need savepoints. Closed with `COMMIT`.
    pub(super) explicit: bool,
}
