//! The in-flight ledger: what was sent to the target and what it has acknowledged.
//!
//! Kept apart because its invariant is about order and durability, not encoding: groups are
//! answered strictly in the order they were sent (`in_flight`, oldest first), `expected` is
//! the origin progress the next group asserts, `committed` only moves when a group's
//! `ReadyForQuery` arrives without error, and `flushed` (what may be confirmed to the source)
//! only moves forward and only to what the target reported durable.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::protocol::ServerError;

use super::group::Sent;

/// What a group in flight was sent for (its replies are handled accordingly).
pub(super) enum Group {
    Txns(Vec<Sent>, Vec<String>),
    Progress,
    /// An open group abandoned on shutdown: made to fail so it never commits.
    Abort,
    /// Closing statements of failed groups.
    Close,
}

/// Groups in flight, acknowledged and durable progress, and what waits to be sent again.
pub(super) struct Ledger {
    pub(super) in_flight: VecDeque<Group>,
    pub(super) progress_pending: bool,
    /// Origin progress the next group expects (end LSN of the last transaction sent).
    pub(super) expected: Lsn,
    /// End LSN of the last acknowledged transaction.
    pub(super) committed: Lsn,
    /// Durable progress (last flushed-progress answer).
    pub(super) flushed: Lsn,
    /// A keepalive position that may be confirmed once everything sent before it is durable.
    pub(super) idle_point: Option<(Lsn, Lsn)>,
    /// A group failed while another was being encoded: resolved when that one closes, because
    /// a `Sync` must never fall inside an open group.
    pub(super) pending_failure: Option<(Vec<Sent>, Vec<String>, ServerError)>,
    /// A progress query was asked for while a group was open.
    pub(super) progress_wanted: bool,
    /// Buffered transactions to send again, one per group.
    pub(super) redo: VecDeque<Sent>,
    /// Replies of the oldest group in flight, collected until its `ReadyForQuery`.
    pub(super) acc_rows: Vec<Vec<Option<Bytes>>>,
    pub(super) acc_error: Option<ServerError>,
}
