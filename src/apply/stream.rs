//! Large transactions applied while they are still in progress on the source.
//!
//! With pgoutput protocol 2 and `streaming 'on'`, the walsender sends a transaction larger
//! than its `logical_decoding_work_mem` in blocks as it is being written, and its commit or
//! abort later. Such a transaction is applied *live*: into one explicit transaction on the
//! target (the apply session's, under the source's replication origin), its changes encoded
//! and pipelined as they arrive like any others (multi-row INSERT / COPY, asserted updates and
//! deletes), never buffered in walbridge's memory:
//!
//! ```text
//!   StreamStart(x) ─ I.. ─ Subtransaction(s) ─ I.. ─ StreamStop   StreamAbort(x, s)     StreamCommit(x)
//!   BEGIN; INSERT ..;      SAVEPOINT wb_s;     INSERT ..;          ROLLBACK TO wb_s;      apply_finish(..); COMMIT
//! ```
//!
//! * Commit: the group closes like an ordinary one: `apply_finish` stamps the origin's
//!   progress with the Stream Commit's end LSN and commit time, atomically with the rows.
//! * Abort of the transaction: the open target transaction is rolled back, nothing commits.
//! * Abort of a subtransaction: `ROLLBACK TO SAVEPOINT` of the savepoint taken before its
//!   first change (which also discards its children's changes, as on the source).
//! * Conflicts: the statements are the optimistic ones; a change that finds something
//!   unexpected fails the transaction at its commit, which is then read again and applied on
//!   the careful path (as for any transaction too large to keep), still live. Until the
//!   Stream Commit arrives its commit time is not known: conflict checks use the time its
//!   first block arrived (earlier than the commit, later than any target write it found),
//!   and the rows are stamped with the real commit time by `apply_finish`.
//!
//! Interleaving. The apply session can hold one open transaction, and the replication origin
//! belongs to that one session. When an ordinary transaction arrives (it commits on the
//! source before the streamed one, so must commit on the target first), or a second streamed
//! transaction starts, while one is live, the live one is *given up*: its target transaction
//! is rolled back, its xid is added to [`Applier::spilled`], and the stream is read again
//! from the target's progress ([`Outcome::Restream`]). The source then keeps that
//! transaction's blocks in a temporary file and passes it on whole, as an ordinary
//! transaction, when it commits (`source::spill`); the transactions around it are applied as
//! they come. PostgreSQL's own apply worker (`streaming = on`) spills every streamed
//! transaction to files; walbridge only those that interleave, at the cost of decoding the
//! given-up part once more.
//!
//! Crash safety: nothing of a live transaction is committed before its Stream Commit, so a
//! crash (of walbridge or either server) loses only the open target transaction, and the
//! source streams the whole transaction again from the origin's progress.

use super::{
    proto, Applier, Begin, HashMap, Instant, Lsn, OpenTxn, Outcome, PgTimestamp, Response,
};
use crate::direction::DirectionError;
use crate::event::{StreamCommit, StreamStart};

/// The streamed transaction being applied live.
pub(super) struct Live {
    /// Its top-level xid.
    xid: u32,
    /// The (sub)transaction of the last change.
    current: u32,
    /// Subtransactions with a savepoint, in the order taken.
    savepoints: Vec<u32>,
}

/// The savepoint taken before subtransaction `xid`'s first change.
fn savepoint(xid: u32) -> String {
    format!("wb_sub_{xid}")
}

impl Applier {
    /// Streamed transactions the source must spill when the stream is read again.
    pub fn spilled(&self) -> Vec<u32> {
        self.spilled.iter().copied().collect()
    }

    pub(super) async fn on_stream_start(
        &mut self,
        start: StreamStart,
    ) -> Result<Outcome, DirectionError> {
        if let Some(live) = &mut self.live {
            if live.xid == start.xid {
                // The next block: it starts with the top-level transaction.
                live.current = start.xid;
                return Ok(Outcome::Continue);
            }
            // A second streamed transaction interleaves with the live one.
            return self.give_up_live().await;
        }
        if self.open.is_some() {
            return Err(DirectionError::definite(format!(
                "the stream from {} started streaming transaction {} inside another transaction",
                self.source, start.xid
            )));
        }
        if !start.first_segment {
            // Its start went by unseen (never within one session): take it whole later.
            self.spilled.insert(start.xid);
            return self.restream_for_spill().await;
        }
        // What gathered before it commits first; a failed group's transactions are sent again
        // now (the live transaction will hold the session's one open transaction).
        if self.close_group().await? == Outcome::Restream {
            return Ok(Outcome::Restream);
        }
        while !self.ledger.redo.is_empty() {
            if self.has_redo() {
                self.redo_one().await?;
            } else if self.on_reply().await? == Outcome::Restream {
                return Ok(Outcome::Restream);
            }
        }
        let careful_as_it_arrives = std::mem::take(&mut self.careful_from_next_begin)
            || self.careful_xid.take_if(|x| *x == start.xid).is_some();
        self.open = Some(OpenTxn {
            begin: Begin {
                xid: start.xid,
                final_lsn: Lsn::ZERO,
                commit_time: PgTimestamp::now(),
                origin: start.origin,
            },
            // Never kept: a conflict re-reads it from the source.
            items: None,
            changes: 0,
            counts: HashMap::new(),
            truncates: HashMap::new(),
            started: Instant::now(),
            careful_as_it_arrives,
        });
        self.live = Some(Live {
            xid: start.xid,
            current: start.xid,
            savepoints: Vec::new(),
        });
        tracing::debug!(source = %self.source, target = %self.target, xid = start.xid,
            careful = careful_as_it_arrives, "applying a streamed transaction as it arrives");
        Ok(Outcome::Continue)
    }

    /// Takes the replies that already arrived for a live transaction's statements (they are
    /// kept for its group as usual), so they do not pile up unread until its commit: a
    /// million-row transaction would otherwise leave millions of replies queued.
    pub(super) fn take_live_replies(&mut self) -> Result<(), DirectionError> {
        // With nothing else in flight, every reply is the live group's and none ends it.
        if self.live.is_none() || !self.ledger.in_flight.is_empty() {
            return Ok(());
        }
        while let Some(reply) = self.session.pipe.try_recv() {
            match reply.map_err(proto)? {
                Response::Row(r) => self.ledger.acc_rows.push(r),
                Response::Error(e) => self.ledger.acc_error = Some(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// The block ends: send what is encoded so the target works on it meanwhile.
    pub(super) async fn on_stream_stop(&mut self) -> Result<Outcome, DirectionError> {
        if self.live.is_some() && self.group.is_some() {
            self.flush_batch().await?;
            self.flush().await?;
        }
        Ok(Outcome::Continue)
    }

    /// The changes that follow belong to (sub)transaction `xid`: a savepoint before the first
    /// change of each subtransaction.
    pub(super) async fn on_subtransaction(&mut self, xid: u32) -> Result<Outcome, DirectionError> {
        let Some(live) = &mut self.live else {
            return Ok(Outcome::Continue);
        };
        live.current = xid;
        if xid == live.xid || live.savepoints.contains(&xid) {
            return Ok(Outcome::Continue);
        }
        live.savepoints.push(xid);
        let sql = format!("SAVEPOINT {}", savepoint(xid));
        self.streamed_statement(&sql).await?;
        Ok(Outcome::Continue)
    }

    /// Runs a transaction-control statement inside the live transaction: pipelined in its
    /// group, or as a round trip on the careful path.
    async fn streamed_statement(&mut self, sql: &str) -> Result<(), DirectionError> {
        if self.careful_open().await? {
            if let Err(f) = self.exec(sql, &[]).await {
                self.careful_on_target = None;
                return Err(self.roll_back(f, "a savepoint failed").await?);
            }
            return Ok(());
        }
        self.open_group()?;
        // The transaction now has something to commit (its group must close with COMMIT).
        if let Some(open) = self.open.as_mut() {
            open.changes += 1;
        }
        self.flush_batch().await?;
        self.session.enc.parse("", sql).map_err(proto)?;
        self.session
            .enc
            .execute("", std::iter::empty())
            .map_err(proto)?;
        Ok(())
    }

    pub(super) async fn on_stream_commit(
        &mut self,
        c: StreamCommit,
        more_pending: bool,
    ) -> Result<Outcome, DirectionError> {
        if self.live.as_ref().is_none_or(|l| l.xid != c.xid) {
            return Err(DirectionError::transient(format!(
                "the stream from {} committed streamed transaction {} whose start was not \
                 seen; reading again from the target's progress",
                self.source, c.xid
            )));
        }
        self.live = None;
        self.spilled.remove(&c.xid);
        if let Some(open) = self.open.as_mut() {
            open.begin.final_lsn = c.commit.commit_lsn;
        }
        self.on_commit(c.commit, more_pending).await
    }

    pub(super) async fn on_stream_abort(
        &mut self,
        xid: u32,
        subxid: u32,
    ) -> Result<Outcome, DirectionError> {
        let Some(live) = self.live.as_mut().filter(|l| l.xid == xid) else {
            // Not applied here (nothing of it was seen in this session).
            self.spilled.remove(&xid);
            return Ok(Outcome::Continue);
        };
        if subxid != xid {
            let Some(i) = live.savepoints.iter().position(|s| *s == subxid) else {
                // No change of it arrived: nothing to undo.
                return Ok(Outcome::Continue);
            };
            // Later savepoints are its children or were released into it: gone with it.
            live.savepoints.truncate(i + 1);
            live.current = xid;
            let sql = format!("ROLLBACK TO SAVEPOINT {}", savepoint(subxid));
            self.streamed_statement(&sql).await?;
            return Ok(Outcome::Continue);
        }
        self.live = None;
        self.open = None;
        self.discard_live().await?;
        tracing::debug!(source = %self.source, target = %self.target, xid,
            "a streamed transaction was rolled back on the source; rolled back here too");
        Ok(Outcome::Continue)
    }

    /// Rolls back the live transaction's target transaction (it never commits) and settles
    /// everything sent before it.
    async fn discard_live(&mut self) -> Result<(), DirectionError> {
        if self.ledger.pending_failure.is_some() {
            return Err(DirectionError::transient(format!(
                "{} -> {}: a streamed transaction ended while a failed group waited to be \
                 redone; restarting from the target's progress",
                self.source, self.target
            )));
        }
        if let Some(txn) = self.careful_on_target.take() {
            return self.careful_abort(txn).await;
        }
        let parsed = self
            .group
            .as_mut()
            .map(|g| std::mem::take(&mut g.parsed))
            .unwrap_or_default();
        if self.group.is_some() {
            self.abort_open().await?;
        }
        self.settle_in_flight().await?;
        self.forget_statements(parsed).await
    }

    /// Another transaction interleaves with the live one: give the live one up, to be
    /// spilled by the source and applied whole at its commit (see the module docs).
    pub(super) async fn give_up_live(&mut self) -> Result<Outcome, DirectionError> {
        let Some(live) = self.live.take() else {
            return Ok(Outcome::Continue);
        };
        if self.open.take().is_some_and(|o| o.careful_as_it_arrives) {
            // It conflicted before: applied whole at its commit, still carefully.
            self.careful_xid = Some(live.xid);
        }
        self.discard_live().await?;
        self.spilled.insert(live.xid);
        tracing::info!(source = %self.source, target = %self.target, xid = live.xid,
            "other transactions interleave with a streamed one; it is kept on disk until it \
             commits, re-reading from the target's progress");
        self.restream_for_spill().await
    }

    async fn restream_for_spill(&mut self) -> Result<Outcome, DirectionError> {
        self.settle_in_flight().await?;
        self.ledger.redo.clear();
        self.single_txn_groups_left = 0;
        self.ledger.expected = self.ledger.committed;
        self.restream_for_spill = true;
        Ok(Outcome::Restream)
    }
}
