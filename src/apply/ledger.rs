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
use crate::protocol::pipeline::Response;
use crate::protocol::ServerError;

use super::group::Sent;
use super::text;

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

impl Ledger {
    /// Nothing in flight; the target's origin is at `progress`, all of it durable.
    pub(super) fn new(progress: Lsn) -> Self {
        Ledger {
            in_flight: VecDeque::new(),
            progress_pending: false,
            expected: progress,
            committed: progress,
            flushed: progress,
            idle_point: None,
            pending_failure: None,
            progress_wanted: false,
            redo: VecDeque::new(),
            acc_rows: Vec::new(),
            acc_error: None,
        }
    }

    /// Groups of transactions in flight (progress queries and closing groups do not count
    /// against the window).
    pub(super) fn groups_in_flight(&self) -> usize {
        self.in_flight
            .iter()
            .filter(|g| matches!(g, Group::Txns(..)))
            .count()
    }

    /// Durable progress: what may be confirmed to the source. A keepalive's (or skipped
    /// transaction's) position counts only once the applier is `idle` and everything sent
    /// before it is durable.
    pub(super) fn confirmable(&self, idle: bool) -> Lsn {
        match self.idle_point {
            Some((wal_end, sent_before)) if idle && self.flushed >= sent_before => {
                wal_end.max(self.flushed)
            }
            _ => self.flushed,
        }
    }

    /// An answer to a flushed-progress query: durable progress only moves forward.
    pub(super) fn note_progress(&mut self, rows: &[Vec<Option<Bytes>>]) {
        if let Some(lsn) = rows
            .first()
            .and_then(|r| r.first())
            .and_then(text)
            .and_then(|t| t.parse::<Lsn>().ok())
        {
            self.flushed = self.flushed.max(lsn);
        }
    }

    /// Collects one reply of the oldest group in flight; at its `ReadyForQuery`, that group
    /// with its rows and error (none when nothing was in flight).
    #[allow(clippy::type_complexity)]
    pub(super) fn take_reply(
        &mut self,
        response: Response,
    ) -> Option<(Group, Vec<Vec<Option<Bytes>>>, Option<ServerError>)> {
        match response {
            Response::Row(r) => self.acc_rows.push(r),
            Response::Error(e) => self.acc_error = Some(e),
            Response::Ready(_) => {
                let rows = std::mem::take(&mut self.acc_rows);
                let error = self.acc_error.take();
                return self.in_flight.pop_front().map(|group| (group, rows, error));
            }
            _ => {}
        }
        None
    }
}
