//! Applying a source's transactions to a target, in order, exactly once.
//!
//! Source transactions are applied in *Sync groups* on the target's pipelined session: the
//! statements of one or more consecutive source transactions, then
//! `walbridge.apply_finish(expected, end_lsn, commit_time)`, then `Sync`, which commits the
//! group as one implicit transaction. `apply_finish` stamps it with the source's end LSN and
//! commit time through the session's replication origin, so progress commits atomically with
//! the data and a restart resumes exactly after the last committed group.
//!
//! ```text
//!   txns k..m   ──▶ [stmts of k .. stmts of m, apply_finish(end(k-1), end(m), t(m))] Sync
//!   txns m+1..n ──▶ [stmts ..., apply_finish(end(m), end(n), t(n))] Sync        (pipelined)
//! ```
//!
//! A group holds what the source has already delivered (it closes as soon as the source has
//! nothing queued, so a quiet stream applies each transaction alone, at once); consecutive
//! INSERTs into one table become multi-row INSERTs across its transactions. Conflict checks
//! compare each change's own commit time; the rows a group writes carry its last commit time.
//! With two nodes that cannot change an outcome (every other version of those rows is the
//! target's own, whose times are exact); with three or more, a group only holds transactions
//! of one commit time ([`crate::conflict::may_share_stamp`]), so every row keeps its exact
//! source commit time and writer. With three or more nodes every group (and careful
//! transaction) also starts by taking this target's applier lock
//! ([`crate::conflict::SERIALIZE_APPLIERS_SQL`]), so appliers from different sources take turns.
//!
//! Many groups are in flight at once. Statements are *optimistic*: each asserts that exactly
//! the expected rows changed and that no conflict was possible. If one fails, its group rolls
//! back; every later group in flight then fails in `apply_finish` because the origin's
//! progress is not what it expects, so nothing commits out of order. Apply then sends those
//! transactions again one by one, and the one that conflicts is redone *carefully* (read the
//! row under lock, let [`crate::conflict::decide`] choose, execute, log the conflict).
//!
//! What the source may be told (flush LSN) is only what the target has made durable:
//! `pg_replication_origin_session_progress(true)` flushes the target's WAL up to the last
//! applied commit and returns its source position.

mod careful;
mod ddl;
mod group;
mod ledger;
mod park;
pub mod position;
mod session;
pub mod sql;
mod stream;
mod tables;
mod writers;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::Client;

use crate::catalog;
use crate::config::{Config, ConflictPolicy};
use crate::conflict::{ConflictKind, Resolution};
use crate::direction::{Classify, DirectionError, ErrorClass};
use crate::event::{Begin, Change, ChangeOp, Commit, Event, Relation, Truncate, Tuple, Value};
use crate::lsn::{Lsn, PgTimestamp};
use crate::metrics::Metrics;
use crate::protocol::pipeline::{Pipeline, Response, Rows};
use crate::protocol::ServerError;
use group::{Item, OpenGroup, OpenTxn, Sent};
use ledger::{Group, Ledger};
pub use park::{CHECK_EVERY as PARK_CHECK_EVERY, PARK_SQL};
use session::Session;
use sql::TableMap;
use tables::{TableState, Tables};
pub use writers::Writers;

/// Tunables of the apply pipeline.
#[derive(Clone, Debug)]
pub struct ApplyLimits {
    /// Groups in flight (sent, not yet acknowledged).
    pub max_in_flight: usize,
    /// Source transactions per group at most.
    pub max_group_transactions: usize,
    /// Changes of one transaction kept for a careful redo; a larger transaction that
    /// conflicts is read again from the source and applied change by change.
    pub max_buffered_changes: usize,
    /// Rows per multi-row INSERT (a batch is sent when it reaches this size).
    pub insert_batch_rows: usize,
    /// Batches of at least this many rows of a table without tombstones go as COPY.
    pub copy_min_rows: usize,
    /// Send encoded statements once this many bytes are waiting.
    pub flush_bytes: usize,
    /// Every commit is on the target's disk before it is acknowledged (a source that forgets
    /// what the target applied, as trigger mode deletes its change rows, needs it); else the
    /// session runs with `synchronous_commit = off` and confirms only flushed progress.
    pub durable_commits: bool,
    /// A source whose positions are recorded with the data (trigger mode) may apply without
    /// the source's replication origin when the role may not use origins: rows then keep the
    /// target's commit time, conflicts compare it, and nothing stamps or moves an origin.
    pub allow_no_origin: bool,
}

impl Default for ApplyLimits {
    fn default() -> Self {
        ApplyLimits {
            max_in_flight: 64,
            max_group_transactions: 2_000,
            max_buffered_changes: 20_000,
            insert_batch_rows: 1024,
            copy_min_rows: 64,
            flush_bytes: 256 * 1024,
            durable_commits: false,
            allow_no_origin: false,
        }
    }
}

/// What the applier asks of its caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Carry on.
    Continue,
    /// A conflict hit a transaction too large to redo from memory: restart the source at the
    /// target's progress and apply the next transaction carefully.
    Restream,
}

/// Applies one direction's transactions to its target.
pub struct Applier {
    /// The target session and its prepared statements.
    session: Session,
    /// The table cache.
    tables: Tables,
    config: Arc<Config>,
    source: String,
    target: String,
    metrics: Metrics,
    writers: Writers,
    limits: ApplyLimits,
    /// Nodes in the configuration: with three or more, a group holds one commit time only.
    node_count: usize,
    /// Whether each transaction first takes `conflict::SERIALIZE_APPLIERS_SQL`.
    take_turns: bool,
    open: Option<OpenTxn>,
    group: Option<OpenGroup>,
    /// What is in flight and what is acknowledged and durable.
    ledger: Ledger,
    /// After a conflict: how many more groups go with one transaction each and alone in
    /// flight, so a further conflict is found without failing a whole window.
    single_txn_groups_left: usize,
    /// The next transaction to begin is applied carefully, change by change as it arrives
    /// (set after a restream for a conflict in a transaction too large to keep).
    careful_from_next_begin: bool,
    last_commit_time: Option<PgTimestamp>,
    /// The careful transaction open on the target (`BEGIN` sent, not yet committed), applied
    /// change by change as the source streams it.
    careful_on_target: Option<careful::CarefulTxn>,
    /// Groups and transactions sent, for the summary logged at the end.
    groups_sent: u64,
    transactions_sent: u64,
    txn_counter: prometheus::IntCounter,
    apply_histogram: prometheus::Histogram,
    /// Prefix of `walbridge.ddl()`'s logical messages (`<slot_prefix>_ddl`).
    ddl_prefix: String,
    /// A careful transaction holding a schema change is open: table descriptions are read
    /// through the apply session, which sees what the statement changed.
    in_ddl_txn: bool,
    /// Apply this source transaction carefully from its start (it holds a schema change).
    careful_xid: Option<u32>,
    /// The position of the next commit, when it is not an LSN (see [`position`]).
    next_position: Option<Box<position::Recorded>>,
    /// The streamed in-progress transaction being applied as it arrives (see [`stream`]).
    live: Option<stream::Live>,
    /// Streamed transactions the source must spill (they could not stay open here).
    spilled: HashSet<u32>,
    /// The coming restream is for a spill, not after a conflict: no careful mode.
    restream_for_spill: bool,
    /// Tables whose changes are parked (`replication.on_schema_mismatch = "park"`).
    park: park::Parked,
}

/// The target session could not be prepared.
fn server(target: &str, what: &str, e: ServerError) -> DirectionError {
    DirectionError::caused_by(format!("node {target}: {what}: {e}"), &e)
}

fn proto(e: crate::protocol::ProtocolError) -> DirectionError {
    DirectionError::caused_by(e.to_string(), &e)
}

/// Whether a buffered transaction's changes carry ids of their own (and it holds no schema
/// change, whose failure stops the direction whatever the source).
fn has_change_ids(sent: &Sent) -> bool {
    let items = sent.items.as_deref().unwrap_or_default();
    items
        .iter()
        .any(|i| matches!(i, Item::Change(c) if c.source_change_id.is_some()))
        && !items.iter().any(|i| matches!(i, Item::Ddl(_)))
}

fn text(b: &Option<Bytes>) -> Option<&str> {
    b.as_deref().and_then(|b| std::str::from_utf8(b).ok())
}

impl Applier {
    /// Prepares the target session: settings, the origin, and where the stream must start.
    /// Returns the applier and the origin's progress (the LSN to stream from).
    pub async fn start(
        pipe: Pipeline,
        catalog: Client,
        config: Arc<Config>,
        source: &str,
        target: &str,
        metrics: Metrics,
        limits: ApplyLimits,
    ) -> Result<(Applier, Lsn), DirectionError> {
        let (session, progress, origins) = Session::open(
            pipe,
            catalog,
            &config.origin_name(source),
            source,
            target,
            limits.durable_commits,
            limits.allow_no_origin,
        )
        .await?;
        let writers = Writers::new(&config, target, &origins);
        let node_count = config.nodes.len();
        let take_turns =
            crate::conflict::appliers_take_turns(node_count, config.uses_node_priority());
        let ddl_prefix = ddl::message_prefix(&config.replication.slot_prefix);
        let park = park::Parked::load(&session.catalog, &config, source, target).await?;
        let txn_counter = metrics
            .transactions_applied
            .with_label_values(&[source, target]);
        let apply_histogram = metrics.apply_duration.with_label_values(&[source, target]);
        Ok((
            Applier {
                session,
                tables: Tables::default(),
                config,
                source: source.to_string(),
                target: target.to_string(),
                metrics,
                writers,
                limits,
                node_count,
                take_turns,
                open: None,
                group: None,
                ledger: Ledger::new(progress),
                single_txn_groups_left: 0,
                careful_from_next_begin: false,
                last_commit_time: None,
                careful_on_target: None,
                groups_sent: 0,
                transactions_sent: 0,
                txn_counter,
                apply_histogram,
                ddl_prefix,
                in_ddl_txn: false,
                careful_xid: None,
                next_position: None,
                live: None,
                spilled: HashSet::new(),
                restream_for_spill: false,
                park,
            },
            progress,
        ))
    }

    /// Whether the applier can take more source events now (bounded in-flight window).
    pub fn ready_for_more(&self) -> bool {
        if self.ledger.pending_failure.is_some() {
            // Only to finish the transaction being received, so its group can close.
            return self.open.is_some();
        }
        self.ledger.redo.is_empty() && self.groups_in_flight() < self.window()
    }

    fn groups_in_flight(&self) -> usize {
        self.ledger.groups_in_flight()
    }

    fn window(&self) -> usize {
        if self.single_txn_groups_left > 0 {
            1
        } else {
            self.limits.max_in_flight
        }
    }

    /// Whether replies are awaited (and may be read now).
    pub fn has_in_flight(&self) -> bool {
        !self.ledger.in_flight.is_empty() && self.ledger.pending_failure.is_none()
    }

    /// Whether buffered transactions wait to be sent again.
    pub fn has_redo(&self) -> bool {
        !self.ledger.redo.is_empty() && self.groups_in_flight() < self.window()
    }

    /// Sends the next buffered transaction again, in a group of its own.
    pub async fn redo_one(&mut self) -> Result<(), DirectionError> {
        if let Some(sent) = self.ledger.redo.pop_front() {
            self.resend(sent).await?;
        }
        Ok(())
    }

    /// Durable progress: what may be confirmed to the source.
    pub fn confirmable(&self) -> Lsn {
        self.ledger.confirmable(self.idle())
    }

    /// End LSN of the last transaction the target committed (where a restarted stream
    /// resumes).
    pub fn committed_lsn(&self) -> Lsn {
        self.ledger.committed
    }

    /// The source's commit time of the last applied transaction.
    pub fn last_commit_time(&self) -> Option<PgTimestamp> {
        self.last_commit_time
    }

    /// True when nothing is open, buffered or in flight.
    pub fn idle(&self) -> bool {
        self.open.is_none()
            && self.group.is_none()
            && self.groups_in_flight() == 0
            && self.ledger.redo.is_empty()
    }

    /// Apply the next transaction carefully (the source was restarted after a conflict in a
    /// transaction too large to keep).
    pub fn apply_next_transaction_carefully(&mut self) {
        self.careful_from_next_begin = true;
    }

    /// The source is being restarted from [`Applier::committed_lsn`] after
    /// [`Outcome::Restream`]: after a conflict in a transaction too large to keep, the next
    /// transaction is applied carefully; after a streamed transaction had to be given up (see
    /// `apply::stream`), it is spilled by the source ([`Applier::spilled`]) instead.
    pub fn on_restream(&mut self) {
        self.live = None;
        if !std::mem::take(&mut self.restream_for_spill) {
            self.careful_from_next_begin = true;
        }
    }

    /// A keepalive: the source has nothing before `wal_end` left to send.
    pub async fn on_keepalive(&mut self, wal_end: Lsn) -> Result<Outcome, DirectionError> {
        let outcome = self.close_group().await?;
        if self.open.is_none() && self.group.is_none() {
            self.ledger.idle_point = Some((wal_end, self.ledger.expected));
        }
        Ok(outcome)
    }

    /// A transaction with nothing to apply (an echo, or changes only to tables that are not
    /// replicated) ended at `end_lsn`: like a keepalive, a position that may be confirmed
    /// once everything sent before it is durable. A source that writes only unreplicated
    /// tables then sees its slot follow even while its walsender never waits for WAL (so
    /// sends no keepalive), as during a long burst with wal2json, which sends every
    /// transaction.
    /// A transaction the source left out whole (an echo): nothing to apply, but once
    /// everything before it is applied its end is a position the source may confirm, so a
    /// node that only receives echo still lets its slot advance.
    pub fn on_dropped(&mut self, commit: &Commit) {
        self.skipped_until(commit.end_lsn);
    }

    fn skipped_until(&mut self, end_lsn: Lsn) {
        if self.open.is_none() && self.group.is_none() {
            self.ledger.idle_point = Some((end_lsn, self.ledger.expected));
        }
    }

    /// The position of the next transaction's commit, for a source whose positions are not
    /// LSNs (trigger mode's change-table cursor): recorded with that transaction's data
    /// (see [`position`]).
    pub fn set_next_position(&mut self, recorded: position::Recorded) {
        self.next_position = Some(Box::new(recorded));
    }

    /// Queues a durable-progress query (at most one at a time, never inside a group).
    pub async fn request_progress(&mut self) -> Result<(), DirectionError> {
        if self.ledger.progress_pending {
            return Ok(());
        }
        if self.group.is_some() || self.careful_on_target.is_some() {
            // A Sync now would commit the open group's statements so far.
            self.ledger.progress_wanted = true;
            return Ok(());
        }
        self.ledger.progress_wanted = false;
        let name = self.statement(sql::FLUSHED_PROGRESS)?;
        self.session
            .enc
            .execute(&name, std::iter::empty())
            .map_err(proto)?;
        self.session.enc.sync();
        self.ledger.in_flight.push_back(Group::Progress);
        self.ledger.progress_pending = true;
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), DirectionError> {
        if !self.session.enc.is_empty() {
            self.session
                .pipe
                .send(self.session.enc.take())
                .await
                .map_err(proto)?;
        }
        self.take_live_replies()
    }

    /// Prepared statement name for `sql`, adding its `Parse` to the buffer the first time
    /// (recorded in the open group's `parsed`).
    fn statement(&mut self, sql: &str) -> Result<String, DirectionError> {
        let parsed = self.group.as_mut().map(|g| &mut g.parsed);
        self.session.statement(sql, parsed).map_err(proto)
    }

    /// Adds `sql` (prepared once) with text parameters to the buffer of the open group.
    fn execute_text(&mut self, sql: &str, params: &[Option<String>]) -> Result<(), DirectionError> {
        let name = self.statement(sql)?;
        self.session
            .enc
            .execute(
                &name,
                params.iter().map(|p| p.as_deref().map(str::as_bytes)),
            )
            .map_err(proto)?;
        Ok(())
    }

    async fn table(&mut self, relation: &Arc<Relation>) -> Result<Arc<TableState>, DirectionError> {
        self.table_fitting(relation)
            .await?
            .map_err(DirectionError::definite)
    }

    /// The table's apply state, or (inner `Err`) why the target's schema does not fit the
    /// source's description: the table or one of its columns is missing there (a schema
    /// mismatch, which `replication.on_schema_mismatch` decides about; see [`park`]).
    async fn table_fitting(
        &mut self,
        relation: &Arc<Relation>,
    ) -> Result<Result<Arc<TableState>, String>, DirectionError> {
        if let Some(t) = self.tables.mapped(relation) {
            return Ok(Ok(t));
        }
        let info = if self.in_ddl_txn {
            self.table_info_in_txn(&relation.schema, &relation.table)
                .await?
        } else {
            catalog::table_info(&self.session.catalog, &relation.schema, &relation.table)
                .await
                .map_err(|e| {
                    let msg = format!(
                        "node {}: looking up table {}: {}",
                        self.target,
                        relation.qualified_name(),
                        crate::pgconn::pg_message(&e.0)
                    );
                    DirectionError::caused_by(msg, &e)
                })?
        };
        let Some(info) = info else {
            return Ok(Err(format!(
                "table {} exists on {} but not on {}; create it there (plain DDL is not \
                     replicated: use walbridge.ddl()) or exclude it from replication.tables",
                relation.qualified_name(),
                self.source,
                self.target
            )));
        };
        let skip = self
            .config
            .skip_columns_for(&relation.schema, &relation.table)
            .to_vec();
        let map = match TableMap::new(relation, info, &skip) {
            Ok(map) => map,
            Err(e @ sql::MapError::MissingColumn { .. }) => {
                return Ok(Err(format!("{} -> {}: {e}", self.source, self.target)))
            }
            Err(e) => {
                return Err(DirectionError::definite(format!(
                    "{} -> {}: {e}",
                    self.source, self.target
                )))
            }
        };
        let tombstoned = map.unique_key.is_some()
            && self
                .session
                .catalog
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM walbridge.tombstones WHERE relid = $1)",
                    &[&map.target.oid],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .map_err(|e| {
                    DirectionError::caused_by(
                        format!(
                            "node {}: reading walbridge.tombstones: {}",
                            self.target,
                            crate::pgconn::pg_message(&e)
                        ),
                        &e,
                    )
                })?;
        let policy = self
            .config
            .conflict_policy_for(&relation.schema, &relation.table);
        let resolving = (policy == ConflictPolicy::LastWriteWins).then(|| sql::Resolving {
            rank_case: self.writers.rank_case_sql(),
            source_rank: self.writers.rank(&self.source),
            source: self.source.clone(),
            target: self.target.clone(),
            writer_case: self.writers.writer_case_sql(),
            priority: self.config.priority_order(),
            max_row_bytes: self.config.replication.conflict_max_row_bytes,
        });
        let state = Arc::new(TableState {
            relation: relation.clone(),
            label: relation.qualified_name(),
            overwritable: self.writers.overwritable(policy, &self.source),
            by_time: policy != ConflictPolicy::NodePriority,
            policy,
            map,
            resolving,
            hot: AtomicBool::new(false),
            tombstoned: AtomicBool::new(tombstoned),
        });
        self.tables.insert(relation.oid, state.clone());
        Ok(Ok(state))
    }

    /// Feeds one source event. `more_pending`: the source has more already queued (so a group
    /// may stay open to take it).
    pub async fn on_event(
        &mut self,
        event: Event,
        more_pending: bool,
    ) -> Result<Outcome, DirectionError> {
        match event {
            Event::Begin(_) if self.live.is_some() => {
                // An ordinary transaction commits before the streamed one being applied.
                return self.give_up_live().await;
            }
            Event::Begin(begin) => {
                self.spilled.remove(&begin.xid);
                // The group's rows carry one stamp: close it where that stamp could change a
                // third node's conflict decision.
                let must_close = self.group.as_ref().is_some_and(|g| {
                    !crate::conflict::may_share_stamp(
                        self.node_count,
                        Some(g.first_commit_time),
                        Some(begin.commit_time),
                    )
                });
                let mut outcome = Outcome::Continue;
                if must_close {
                    outcome = self.close_group().await?;
                }
                let careful_as_it_arrives = std::mem::take(&mut self.careful_from_next_begin)
                    || self.careful_xid.take_if(|x| *x == begin.xid).is_some();
                self.open = Some(OpenTxn {
                    begin,
                    items: Some(Vec::new()),
                    changes: 0,
                    counts: HashMap::new(),
                    truncates: HashMap::new(),
                    started: Instant::now(),
                    careful_as_it_arrives,
                });
                return Ok(outcome);
            }
            Event::Relation(rel) => {
                // The table changed (or the stream re-describes it): map it again, after the
                // inserts buffered under its old description are encoded with it.
                if self
                    .group
                    .as_ref()
                    .is_some_and(|g| g.batch_table == Some(rel.oid))
                {
                    self.flush_batch().await?;
                }
                self.tables.describe(rel);
                self.park.hint();
            }
            // A framed stream has no Origin (it is in the Begin) and no echo: the source
            // dropped those transactions (see `decode::frame`).
            Event::Origin(_) | Event::Type(_) => {}
            Event::Message(m) => return self.on_message(m).await,
            Event::Change(change) => self.on_change(change).await?,
            Event::Truncate(t) => self.on_truncate(t).await?,
            Event::Commit(commit) => return self.on_commit(commit, more_pending).await,
            Event::StreamStart(start) => return self.on_stream_start(start).await,
            Event::StreamStop => return self.on_stream_stop().await,
            Event::Subtransaction(xid) => return self.on_subtransaction(xid).await,
            Event::StreamCommit(c) => return self.on_stream_commit(c, more_pending).await,
            Event::StreamAbort { xid, subxid } => return self.on_stream_abort(xid, subxid).await,
        }
        Ok(Outcome::Continue)
    }

    fn open_txn(&mut self) -> Result<&mut OpenTxn, DirectionError> {
        self.open.as_mut().ok_or_else(|| {
            DirectionError::definite(format!(
                "the stream from {} sent a change outside a transaction",
                self.source
            ))
        })
    }

    fn open_group(&mut self) -> Result<&mut OpenGroup, DirectionError> {
        let commit_time = self
            .open
            .as_ref()
            .map_or(PgTimestamp(0), |o| o.begin.commit_time);
        if self.group.is_none() && self.live.is_some() {
            // A streamed transaction: an explicit one, for its savepoints.
            self.session.enc.parse("", "BEGIN").map_err(proto)?;
            self.session
                .enc
                .execute("", std::iter::empty())
                .map_err(proto)?;
        }
        if self.group.is_none() && self.take_turns {
            // First statement of the group's transaction: take turns with the other sources'
            // appliers (see `conflict::SERIALIZE_APPLIERS_SQL`).
            if let Some(name) = self
                .session
                .prepared
                .get(crate::conflict::SERIALIZE_APPLIERS_SQL)
                .cloned()
            {
                self.session
                    .enc
                    .execute(&name, std::iter::empty())
                    .map_err(proto)?;
            }
        }
        Ok(self.group.get_or_insert_with(|| OpenGroup {
            members: Vec::new(),
            first_commit_time: commit_time,
            parsed: Vec::new(),
            batch: Vec::new(),
            batch_table: None,
            guarded: Vec::new(),
            opened: Instant::now(),
            explicit: self.live.is_some(),
        }))
    }

    /// In careful mode (after a restream), changes are applied one by one as they arrive.
    async fn careful_mode_item(&mut self, item: Item) -> Result<bool, DirectionError> {
        if !self.careful_open().await? {
            return Ok(false);
        }
        self.careful_stream_item(item).await?;
        Ok(true)
    }

    /// In careful mode, begins the careful transaction on the target unless it is open;
    /// false when the open transaction is not careful.
    async fn careful_open(&mut self) -> Result<bool, DirectionError> {
        let Some(open) = &self.open else {
            return Ok(false);
        };
        if !open.careful_as_it_arrives {
            return Ok(false);
        }
        if self.careful_on_target.is_none() {
            let sent = Sent {
                end_lsn: Lsn::ZERO,
                commit_time: open.begin.commit_time,
                begin: open.begin.clone(),
                commit: Commit {
                    commit_lsn: Lsn::ZERO,
                    end_lsn: Lsn::ZERO,
                    commit_time: open.begin.commit_time,
                },
                items: None,
                counts: HashMap::new(),
                truncates: HashMap::new(),
                started: open.started,
                recorded: None,
            };
            let begin = open.begin.clone();
            self.careful_begin(begin, sent).await?;
        }
        Ok(true)
    }

    /// walbridge's own objects are never applied, whatever a stream sends (the sources filter
    /// them already; this keeps a peer's bookkeeping out of this node's even if one did not).
    fn is_own_object(&self, relation: &Relation) -> bool {
        self.config
            .replication
            .tables
            .is_reserved(&relation.schema, &relation.table)
    }

    async fn on_change(&mut self, change: Change) -> Result<(), DirectionError> {
        if self.is_own_object(&change.relation) {
            return Ok(());
        }
        let limit = self.limits.max_buffered_changes;
        if self.open.as_ref().is_some_and(|o| o.careful_as_it_arrives) {
            self.careful_mode_item(Item::Change(change)).await?;
            return Ok(());
        }
        if self.park_in_group(&change).await? {
            return Ok(());
        }
        {
            let open = self.open_txn()?;
            open.changes += 1;
            *open
                .counts
                .entry((change.relation.oid, change.op))
                .or_default() += 1;
            if open.items.as_ref().is_some_and(|i| i.len() >= limit) {
                open.items = None;
            }
        }
        let table = self.table(&change.relation).await?;
        if change.op != ChangeOp::Insert {
            table.map.require_identity().map_err(|e| {
                DirectionError::definite(format!("{} -> {}: {e}", self.source, self.target))
            })?;
        }
        self.open_group()?;
        match change.op {
            ChangeOp::Insert => {
                let oid = change.relation.oid;
                let flush_first = self
                    .group
                    .as_ref()
                    .is_some_and(|g| g.batch_table.is_some_and(|t| t != oid));
                if flush_first {
                    self.flush_batch().await?;
                }
                let full = {
                    let group = self.open_group()?;
                    group.batch_table = Some(oid);
                    if let Some(new) = &change.new {
                        group.batch.push(new.clone());
                    }
                    group.batch.len()
                };
                if full >= self.limits.insert_batch_rows {
                    self.flush_batch().await?;
                }
            }
            ChangeOp::Update => {
                self.flush_batch().await?;
                self.encode_update(&table, &change)?;
            }
            ChangeOp::Delete => {
                self.flush_batch().await?;
                self.encode_delete(&table, &change)?;
            }
        }
        // Kept (moved, not copied) for a careful redo.
        if let Some(items) = self.open.as_mut().and_then(|o| o.items.as_mut()) {
            items.push(Item::Change(change));
        }
        if self.session.enc.len() >= self.limits.flush_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    fn commit_time(&self) -> PgTimestamp {
        self.open
            .as_ref()
            .map_or(PgTimestamp(0), |o| o.begin.commit_time)
    }

    /// The journal parameters of a resolving statement: the open transaction's commit LSN
    /// (NULL when the plugin does not say), the measured clock skews by node rank and the
    /// change's trigger-mode change row id (NULL for a WAL change).
    fn journal_params(&self, change: &Change) -> [Option<String>; 3] {
        let lsn = self
            .open
            .as_ref()
            .map(|o| o.begin.final_lsn)
            .filter(|l| *l != Lsn::ZERO)
            .map(|l| l.to_string());
        let skews: Vec<String> = self
            .config
            .priority_order()
            .iter()
            .map(|n| {
                self.metrics
                    .clock_skew
                    .with_label_values(&[n])
                    .get()
                    .to_string()
            })
            .collect();
        [
            lsn,
            Some(format!("{{{}}}", skews.join(","))),
            change.source_change_id.map(|id| id.to_string()),
        ]
    }

    fn encode_update(&mut self, table: &TableState, change: &Change) -> Result<(), DirectionError> {
        let Some(new) = &change.new else {
            return Err(DirectionError::definite(format!(
                "the stream from {} sent an update of {} without a new row",
                self.source, table.label
            )));
        };
        let present: Vec<usize> = table
            .map
            .written()
            .filter(|&p| !matches!(new.0.get(p), Some(Value::UnchangedToast)))
            .collect();
        let key_tuple = change.identity_tuple().unwrap_or(new);
        let check = match table.map.identity_change(new, change.old.as_ref()) {
            sql::IdentityChange::Unchanged { check } if table.map.has_settable() => check,
            _ => {
                // A new GENERATED ALWAYS identity value: no UPDATE can write it. Fail this
                // group so the transaction is redone carefully, where it is written (see
                // `sql::IdentityChange`).
                let name = self.statement(sql::NEEDS_CAREFUL)?;
                self.session
                    .enc
                    .execute(&name, std::iter::empty())
                    .map_err(proto)?;
                return Ok(());
            }
        };
        let resolving = table.resolving_now();
        let sql = match resolving {
            Some(r) => table.map.update_resolving(&present, &check, r),
            None => table.map.update_optimistic(&present, &check, table.by_time),
        };
        let name = self.statement(&sql)?;
        let ts = self.commit_time().to_string();
        let journal = resolving.map(|_| self.journal_params(change));
        let params = table
            .map
            .settable(&present)
            .into_iter()
            .chain(check.iter().copied())
            .map(|p| value_param(new, p))
            .chain(table.map.key.iter().map(|&p| value_param(key_tuple, p)))
            .chain(guard_params(table, &ts))
            .chain(journal_params(&journal));
        self.session.enc.execute(&name, params).map_err(proto)?;
        Ok(())
    }

    fn encode_delete(&mut self, table: &TableState, change: &Change) -> Result<(), DirectionError> {
        let Some(key_tuple) = change.identity_tuple() else {
            return Err(DirectionError::definite(format!(
                "the stream from {} sent a delete of {} without its key",
                self.source, table.label
            )));
        };
        let resolving = table.resolving_now();
        let sql = match resolving {
            Some(r) => table.map.delete_resolving(r),
            None => table.map.delete_optimistic(table.by_time),
        };
        let name = self.statement(&sql)?;
        let ts = self.commit_time().to_string();
        let journal = resolving.map(|_| self.journal_params(change));
        let params = table
            .map
            .key
            .iter()
            .map(|&p| value_param(key_tuple, p))
            .chain(guard_params(table, &ts))
            .chain(journal_params(&journal));
        self.session.enc.execute(&name, params).map_err(proto)?;
        Ok(())
    }

    /// Sends the group's pending multi-row INSERT, in power-of-two chunks so a handful of
    /// prepared statements serve every batch size.
    async fn flush_batch(&mut self) -> Result<(), DirectionError> {
        let Some(group) = self.group.as_mut() else {
            return Ok(());
        };
        let Some(oid) = group.batch_table.take() else {
            return Ok(());
        };
        let rows = std::mem::take(&mut group.batch);
        if rows.is_empty() {
            return Ok(());
        }
        let table = self
            .tables
            .states
            .get(&oid)
            .cloned()
            .ok_or_else(|| DirectionError::definite("insert batch for an unknown table"))?;
        let written: Vec<usize> = table.map.written().collect();
        let max_rows = (60_000 / written.len().max(1)).max(1);
        let plain = !table.tombstoned.load(Ordering::Relaxed);
        if plain && table.map.unique_key.is_some() {
            let target_oid = table.map.target.oid;
            let needs_guard = self
                .group
                .as_ref()
                .is_some_and(|g| !g.guarded.contains(&target_oid));
            if needs_guard {
                let name = self.statement(sql::TOMBSTONE_GUARD)?;
                let oid = target_oid.to_string();
                self.session
                    .enc
                    .execute(&name, [Some(oid.as_bytes())])
                    .map_err(proto)?;
                if let Some(g) = self.group.as_mut() {
                    g.guarded.push(target_oid);
                }
            }
        }
        if plain && rows.len() >= self.limits.copy_min_rows {
            // Large batches of a table without tombstones: COPY, inside the same group.
            self.session
                .enc
                .parse("", &table.map.copy_in())
                .map_err(proto)?;
            self.session
                .enc
                .execute("", std::iter::empty())
                .map_err(proto)?;
            let mut line = Vec::with_capacity(256);
            let mut chunk = Vec::with_capacity(64 * 1024);
            for t in &rows {
                line.clear();
                for (n, &p) in written.iter().enumerate() {
                    if n > 0 {
                        line.push(b'\t');
                    }
                    copy_text(&mut line, value_param(t, p));
                }
                line.push(b'\n');
                chunk.extend_from_slice(&line);
                if chunk.len() >= 64 * 1024 {
                    self.session.enc.copy_data(&chunk).map_err(proto)?;
                    chunk.clear();
                }
            }
            if !chunk.is_empty() {
                self.session.enc.copy_data(&chunk).map_err(proto)?;
            }
            self.session.enc.copy_done();
            if self.session.enc.len() >= self.limits.flush_bytes {
                self.flush().await?;
            }
            return Ok(());
        }
        let mut rest: &[Tuple] = &rows;
        while !rest.is_empty() {
            let n = rest.len().min(max_rows);
            let chunk = if n.is_power_of_two() {
                n
            } else {
                1 << (usize::BITS - 1 - n.leading_zeros())
            };
            let (now, later) = rest.split_at(chunk);
            let sql = if plain {
                table.map.insert_plain_rows(chunk)
            } else {
                table.map.insert_optimistic(chunk)
            };
            let name = self.statement(&sql)?;
            let params = now
                .iter()
                .flat_map(|t| written.iter().map(move |&p| value_param(t, p)));
            self.session.enc.execute(&name, params).map_err(proto)?;
            rest = later;
        }
        if self.session.enc.len() >= self.limits.flush_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    async fn on_truncate(&mut self, mut t: Truncate) -> Result<(), DirectionError> {
        t.relations.retain(|r| !self.is_own_object(r));
        if t.relations.is_empty() {
            return Ok(());
        }
        if self.careful_mode_item(Item::Truncate(t.clone())).await? {
            return Ok(());
        }
        {
            let open = self.open_txn()?;
            open.changes += 1;
            for rel in &t.relations {
                *open.truncates.entry(rel.qualified_name()).or_default() += 1;
            }
            if let Some(items) = &mut open.items {
                items.push(Item::Truncate(t.clone()));
            }
        }
        self.open_group()?;
        self.flush_batch().await?;
        let sql = self.truncate_sql(&t).await?;
        self.session.enc.parse("", &sql).map_err(proto)?;
        self.session
            .enc
            .execute("", std::iter::empty())
            .map_err(proto)?;
        Ok(())
    }

    async fn truncate_sql(&mut self, t: &Truncate) -> Result<String, DirectionError> {
        let mut names = Vec::new();
        for rel in &t.relations {
            self.refuse_truncate_of_parked(rel)?;
            names.push(self.table(rel).await?.map.target.quoted_name());
        }
        // Exactly the listed tables, never CASCADE (see `sql::truncate`).
        Ok(sql::truncate(&names, t.restart_identity))
    }

    /// The error for a TRUNCATE the target refused because a table outside it references one
    /// of the truncated tables (see [`sql::truncate_refused`]).
    fn truncate_refused(&self, what: &str, e: &ServerError) -> DirectionError {
        DirectionError::definite(format!(
            "{} -> {}: {what}: a TRUNCATE cannot be applied on {}: {e}. walbridge truncates \
             exactly the tables the source's TRUNCATE lists and never cascades to tables it \
             does not replicate (like PostgreSQL's own logical replication); replicate the \
             referencing table too (a TRUNCATE ... CASCADE on the source then lists it), or \
             drop that foreign key on {}, then restart walbridge",
            self.source, self.target, self.target, self.target
        ))
    }

    async fn on_commit(
        &mut self,
        commit: Commit,
        more_pending: bool,
    ) -> Result<Outcome, DirectionError> {
        let Some(open) = self.open.take() else {
            return Err(DirectionError::definite(format!(
                "the stream from {} sent a commit without a begin",
                self.source
            )));
        };
        let recorded = self.next_position.take();
        if self.careful_on_target.is_some() {
            self.careful_stream_commit(commit, recorded).await?;
            return Ok(Outcome::Continue);
        }
        if open.changes == 0 || open.careful_as_it_arrives {
            if !open.careful_as_it_arrives {
                self.skipped_until(commit.end_lsn);
            }
            return self.maybe_close(more_pending).await;
        }
        let sent = Sent {
            end_lsn: commit.end_lsn,
            commit_time: commit.commit_time,
            begin: open.begin,
            commit,
            items: open.items,
            counts: open.counts,
            truncates: open.truncates,
            started: open.started,
            recorded,
        };
        self.open_group()?.members.push(sent);
        self.maybe_close(more_pending).await
    }

    /// Closes the open group when it should go now; otherwise sends what it has so far so the
    /// target works on it meanwhile.
    ///
    /// Group commit: while the target is busy with a group, the next one keeps gathering what
    /// the source delivers; it closes as soon as the target is idle (at once on a quiet
    /// stream, so latency does not suffer), or when it is full.
    pub async fn maybe_close(&mut self, more_pending: bool) -> Result<Outcome, DirectionError> {
        let full = self
            .group
            .as_ref()
            .is_some_and(|g| g.members.len() >= self.limits.max_group_transactions);
        let target_idle = self.groups_in_flight() == 0;
        if full
            || self.single_txn_groups_left > 0
            || self.ledger.pending_failure.is_some()
            || (!more_pending && target_idle)
        {
            return self.close_group().await;
        }
        if !more_pending {
            self.flush().await?;
        }
        Ok(Outcome::Continue)
    }

    /// Whether the transactions coming in were committed a while ago on the source (a
    /// backlog is being drained): then groups gather instead of closing whenever the source
    /// queue is momentarily empty. Live transactions arrive within milliseconds of their
    /// commit.
    pub fn draining_backlog(&self) -> bool {
        const BACKLOG_AGE_MICROS: i64 = 50_000;
        self.open
            .as_ref()
            .map(|o| o.begin.commit_time)
            .or(self.last_commit_time)
            .is_some_and(|t| t.micros_until(PgTimestamp::now()) > BACKLOG_AGE_MICROS)
    }

    /// Whether a group is gathering (encoded, not yet sent with `Sync`).
    pub fn has_open_group(&self) -> bool {
        self.group.is_some()
    }

    /// Closes a gathering group that has been open longer than `age` (between transactions).
    pub async fn close_group_older_than(
        &mut self,
        age: Duration,
    ) -> Result<Outcome, DirectionError> {
        if self.open.is_none()
            && self
                .group
                .as_ref()
                .is_some_and(|g| g.opened.elapsed() > age)
        {
            return self.close_group().await;
        }
        Ok(Outcome::Continue)
    }

    /// Ends the open group (between transactions only): `apply_finish` for its last
    /// transaction, `Sync`, send.
    pub async fn close_group(&mut self) -> Result<Outcome, DirectionError> {
        if self.open.is_some() {
            return Ok(Outcome::Continue);
        }
        if self.group.as_ref().is_some_and(|g| g.members.is_empty()) {
            // Only possible with nothing encoded (changes open a group inside a transaction).
            self.group = None;
        }
        if self.group.is_none() {
            if let Some((failed, parsed, error)) = self.ledger.pending_failure.take() {
                return self.recover(failed, parsed, error).await;
            }
            return Ok(Outcome::Continue);
        }
        self.flush_batch().await?;
        // A position that is not an LSN: its rows first (see `position`).
        let recorded = self.encode_recorded()?;
        let Some(group) = self.group.take() else {
            return Ok(Outcome::Continue);
        };
        let Some(last) = group.members.last() else {
            return Ok(Outcome::Continue);
        };
        if self.session.origin {
            let name = self.statement(sql::APPLY_FINISH)?;
            let (expected, end) =
                position::finish_lsns(recorded, self.ledger.expected, last.end_lsn);
            let ts = last.commit_time.to_string();
            self.session
                .enc
                .execute(
                    &name,
                    [
                        expected.as_deref().map(str::as_bytes),
                        Some(end.as_bytes()),
                        Some(ts.as_bytes()),
                    ],
                )
                .map_err(proto)?;
        }
        if group.explicit {
            self.session.enc.parse("", "COMMIT").map_err(proto)?;
            self.session
                .enc
                .execute("", std::iter::empty())
                .map_err(proto)?;
        }
        self.session.enc.sync();
        self.ledger.expected = last.end_lsn;
        self.groups_sent += 1;
        self.transactions_sent += group.members.len() as u64;
        self.ledger
            .in_flight
            .push_back(Group::Txns(group.members, group.parsed));
        if group.explicit {
            // Had a statement failed, the server skipped the COMMIT and the transaction is
            // still open (aborted): end it. Otherwise this only draws a warning.
            self.end_explicit()?;
        }
        self.flush().await?;
        if let Some((failed, parsed, error)) = self.ledger.pending_failure.take() {
            return self.recover(failed, parsed, error).await;
        }
        if self.ledger.progress_wanted {
            self.request_progress().await?;
        }
        Ok(Outcome::Continue)
    }

    /// The next reply from the target; cancel-safe, so it can be a `select!` arm. Hand it to
    /// [`Applier::on_response`].
    pub async fn recv_response(&mut self) -> Result<Response, DirectionError> {
        self.session.pipe.recv().await.map_err(proto)
    }

    /// Takes one reply; when it completes the oldest group in flight, handles that group.
    pub async fn on_response(&mut self, response: Response) -> Result<Outcome, DirectionError> {
        match self.ledger.take_reply(response) {
            Some((group, rows, error)) => self.complete_group(group, rows, error).await,
            None => Ok(Outcome::Continue),
        }
    }

    /// Reads replies until the oldest group in flight completes, and handles it.
    pub async fn on_reply(&mut self) -> Result<Outcome, DirectionError> {
        let depth = self.ledger.in_flight.len();
        while self.ledger.in_flight.len() == depth && depth > 0 {
            let r = self.recv_response().await?;
            let outcome = self.on_response(r).await?;
            if outcome != Outcome::Continue {
                return Ok(outcome);
            }
        }
        Ok(Outcome::Continue)
    }

    async fn complete_group(
        &mut self,
        group: Group,
        rows: Vec<Vec<Option<Bytes>>>,
        error: Option<ServerError>,
    ) -> Result<Outcome, DirectionError> {
        match group {
            Group::Progress => {
                self.ledger.progress_pending = false;
                if let Some(e) = error {
                    return Err(server(&self.target, "reading the origin's progress", e));
                }
                self.ledger.note_progress(&rows);
                Ok(Outcome::Continue)
            }
            Group::Abort | Group::Close => Ok(Outcome::Continue),
            Group::Txns(members, parsed) => match error {
                None => {
                    let resolved =
                        resolved_in_sql(&rows, &self.source, &self.target, &self.metrics);
                    for (i, sent) in members.iter().enumerate() {
                        self.acknowledge(sent, if i == 0 { &resolved } else { &[] });
                    }
                    self.single_txn_groups_left = self.single_txn_groups_left.saturating_sub(1);
                    if self.groups_in_flight() == 0 && self.open.is_none() && self.group.is_some() {
                        // The target is idle: send the group that gathered meanwhile.
                        return self.close_group().await;
                    }
                    Ok(Outcome::Continue)
                }
                Some(e) if self.group.is_some() || self.open.is_some() => {
                    // A Sync must not fall inside the group being encoded: close it first
                    // (at once between transactions, else when the open one commits).
                    self.ledger.pending_failure = Some((members, parsed, e));
                    self.close_group().await
                }
                Some(e) => self.recover(members, parsed, e).await,
            },
        }
    }

    fn acknowledge(&mut self, sent: &Sent, conflicts: &[(ConflictKind, Resolution, String)]) {
        self.ledger.committed = sent.end_lsn;
        self.last_commit_time = Some(sent.commit_time);
        let (s, t) = (self.source.as_str(), self.target.as_str());
        self.txn_counter.inc();
        for (&(oid, op), n) in &sent.counts {
            let counter = self
                .tables
                .change_counters
                .entry((oid, op))
                .or_insert_with(|| {
                    let table = self.tables.labels.get(&oid).map_or("", String::as_str);
                    self.metrics
                        .changes_applied
                        .with_label_values(&[s, t, table, op.as_str()])
                });
            counter.inc_by(*n);
        }
        for (table, n) in &sent.truncates {
            self.metrics
                .changes_applied
                .with_label_values(&[s, t, table, "truncate"])
                .inc_by(*n);
        }
        for (kind, resolution, _) in conflicts {
            self.metrics
                .conflicts
                .with_label_values(&[s, t, kind.as_str(), resolution.as_str()])
                .inc();
        }
        self.apply_histogram
            .observe(sent.started.elapsed().as_secs_f64());
    }

    /// A group failed: drain the rest (they fail too), then send its transactions again one
    /// at a time; a lone failing transaction is redone carefully.
    async fn recover(
        &mut self,
        failed: Vec<Sent>,
        parsed: Vec<String>,
        error: ServerError,
    ) -> Result<Outcome, DirectionError> {
        let class = &error.code[..2.min(error.code.len())];
        if error.code == sql::TOMBSTONES_APPEARED {
            // A table got tombstones: its inserts take the per-row check from now on. The
            // error names it in its TABLE and SCHEMA fields; without them (a function
            // installed by an older setup), every table takes the check.
            let named = match (error.schema.as_deref(), error.table.as_deref()) {
                (Some(s), Some(t)) if !t.is_empty() => Some((s, t)),
                _ => None,
            };
            self.tables.tombstones_appeared(named);
        }
        let transient = error.class() == ErrorClass::Transient;
        // A table or column the target no longer has (dropped there by hand while this
        // applier ran, so its mapping is stale): when a failed transaction's table does not
        // fit once mapped again, the transactions are applied again, and the mismatch is met
        // where `on_schema_mismatch` decides (parked, or a stop naming the table and column).
        let schema_moved = !transient
            && crate::protocol::sqlstate_is_undefined_object(&error.code)
            && self.schema_moved(&failed).await?;
        let conflict_like = error.code == sql::ROWS_NOT_AS_EXPECTED
            || error.code == sql::TOMBSTONES_APPEARED
            || class == "23"
            || schema_moved;
        // A definite failure of a group of several transactions is narrowed down first (they
        // are sent again one by one, below), so the stop names the one that fails.
        let truncated = failed.iter().any(|s| !s.truncates.is_empty());
        let refused = sql::truncate_refused(&error, truncated);
        let narrow = !transient && failed.len() > 1 && !refused;
        // A lone transaction of changes with ids of their own (trigger mode's change rows) is
        // applied change by change, so the stop names the change the target refuses and its
        // source can set that one aside (see `DirectionError::failed_change`).
        let locate =
            !transient && !refused && matches!(failed.as_slice(), [one] if has_change_ids(one));
        if !conflict_like && !narrow && !locate && error.code != "40001" && error.code != "40P01" {
            let first = failed.first();
            if refused {
                return Err(self.truncate_refused(
                    &format!(
                        "applying the transaction of {} (xid {}, end {})",
                        first.map_or_else(String::new, |s| s.commit_time.to_string()),
                        first.map_or(0, |s| s.begin.xid),
                        failed.last().map_or(Lsn::ZERO, |s| s.end_lsn)
                    ),
                    &error,
                ));
            }
            let msg = format!(
                "{} -> {}: applying the transaction of {} (xid {}, end {}) failed: {error}",
                self.source,
                self.target,
                first.map_or_else(String::new, |s| s.commit_time.to_string()),
                first.map_or(0, |s| s.begin.xid),
                failed.last().map_or(Lsn::ZERO, |s| s.end_lsn)
            );
            // The target refuses writes for now (read-only, lock_timeout, cancelled): the
            // direction starts again from the origin's progress after a backoff.
            let stop = DirectionError::caused_by(msg, &error);
            return Err(match failed.as_slice() {
                [one] if !stop.is_transient() => stop.at_transaction(one.end_lsn),
                _ => stop,
            });
        }
        // Everything after the failed group fails in apply_finish (progress mismatch).
        let mut followers = Vec::new();
        let mut uncertain = parsed;
        while let Some(group) = self.ledger.in_flight.pop_front() {
            let (rows, _) = self.read_group().await?;
            match group {
                Group::Txns(members, parsed) => {
                    followers.extend(members);
                    uncertain.extend(parsed);
                }
                Group::Abort | Group::Close => {}
                Group::Progress => {
                    self.ledger.progress_pending = false;
                    self.ledger.note_progress(&rows);
                }
            }
        }
        self.ledger.expected = self.ledger.committed;
        self.forget_statements(uncertain).await?;
        if failed.iter().chain(&followers).any(|f| f.items.is_none()) {
            tracing::info!(
                source = %self.source, target = %self.target,
                "a large transaction needs conflict resolution; re-reading it from the source"
            );
            self.careful_from_next_begin = true;
            return Ok(Outcome::Restream);
        }
        self.single_txn_groups_left = 64;
        let mut failed = failed;
        if failed.len() == 1 {
            if let Some(one) = failed.pop() {
                self.apply_carefully(one).await?;
            }
        }
        self.ledger.redo.extend(failed);
        self.ledger.redo.extend(followers);
        Ok(Outcome::Continue)
    }

    /// Maps the tables of `failed` afresh (every mapping is dropped) and tells whether one
    /// of them no longer fits the target's schema.
    async fn schema_moved(&mut self, failed: &[Sent]) -> Result<bool, DirectionError> {
        self.tables.forget_mappings();
        let oids: std::collections::BTreeSet<u32> = failed
            .iter()
            .flat_map(|s| s.counts.keys().map(|(oid, _)| *oid))
            .collect();
        for oid in oids {
            let Some(relation) = self.tables.relations.get(&oid).cloned() else {
                continue;
            };
            if let Err(mismatch) = self.table_fitting(&relation).await? {
                tracing::info!(
                    source = %self.source, target = %self.target, reason = %mismatch,
                    "the target's schema changed under the applier"
                );
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads replies up to `ReadyForQuery`: the rows, and the error if the group failed.
    async fn read_group(&mut self) -> Result<(Rows, Option<ServerError>), DirectionError> {
        self.session.pipe.finish_group().await.map_err(proto)
    }

    /// Reads and handles the replies of everything still in flight, oldest first, so the
    /// next reply on the session is the answer to whatever is sent next.
    ///
    /// The session answers requests strictly in order and replies carry no tag, so a careful
    /// round trip (which reads "its" reply right after sending) must start with nothing in
    /// flight. After a restream the runtime's progress tick may have queued a progress query
    /// whose reply is still unread: without this, the careful transaction's `BEGIN` would read
    /// that reply, its row lookup would read the `BEGIN`'s (no row), and every later step
    /// would be one answer behind.
    ///
    /// ```text
    ///   sent:   progress?   BEGIN   lookup(key)   ...
    ///   read:   └ here, handled as progress; then each careful step reads its own answer
    /// ```
    pub(super) async fn settle_in_flight(&mut self) -> Result<(), DirectionError> {
        while let Some(group) = self.ledger.in_flight.pop_front() {
            // Replies of the oldest group may already have been taken one by one.
            let (more, error) = self.read_group().await?;
            let mut rows = std::mem::take(&mut self.ledger.acc_rows);
            rows.extend(more);
            let error = self.ledger.acc_error.take().or(error);
            match group {
                Group::Progress => {
                    self.ledger.progress_pending = false;
                    if let Some(e) = error {
                        return Err(server(&self.target, "reading the origin's progress", e));
                    }
                    self.ledger.note_progress(&rows);
                }
                Group::Abort | Group::Close => {}
                Group::Txns(members, _) => {
                    if let Some(e) = error {
                        // Its redo must come first; restart from the target's progress.
                        return Err(DirectionError::transient(format!(
                            "{} -> {}: a group sent before a careful step failed ({e}); \
                             restarting from the target's progress",
                            self.source, self.target
                        )));
                    }
                    let resolved =
                        resolved_in_sql(&rows, &self.source, &self.target, &self.metrics);
                    for (i, sent) in members.iter().enumerate() {
                        self.acknowledge(sent, if i == 0 { &resolved } else { &[] });
                    }
                    self.single_txn_groups_left = self.single_txn_groups_left.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    /// Closes statements first parsed in failed groups (the server may or may not have them)
    /// so they are parsed afresh under new names.
    async fn forget_statements(&mut self, names: Vec<String>) -> Result<(), DirectionError> {
        if names.is_empty() {
            return Ok(());
        }
        self.session.prepared.retain(|_, n| !names.contains(n));
        for n in &names {
            self.session.enc.close_statement(n);
        }
        self.session.enc.sync();
        self.ledger.in_flight.push_back(Group::Close);
        self.flush().await?;
        while let Some(group) = self.ledger.in_flight.pop_front() {
            let (rows, _) = self.read_group().await?;
            if let Group::Progress = group {
                self.ledger.progress_pending = false;
                self.ledger.note_progress(&rows);
            }
        }
        Ok(())
    }

    /// Sends a buffered transaction again, optimistically, in a group of its own.
    async fn resend(&mut self, sent: Sent) -> Result<(), DirectionError> {
        let items = sent.items.clone().unwrap_or_default();
        self.next_position = sent.recorded.clone();
        self.open = Some(OpenTxn {
            begin: sent.begin.clone(),
            items: Some(Vec::new()),
            changes: 0,
            counts: HashMap::new(),
            truncates: HashMap::new(),
            started: sent.started,
            careful_as_it_arrives: false,
        });
        for item in items {
            match item {
                Item::Change(c) => self.on_change(c).await?,
                Item::Truncate(t) => self.on_truncate(t).await?,
                // A transaction with a schema change is never in an optimistic group (see
                // `ddl`), so it is never sent again from there.
                Item::Ddl(_) => {
                    return Err(DirectionError::definite(format!(
                        "{} -> {}: a schema change was about to be re-sent optimistically; \
                         restart walbridge (it is then applied carefully)",
                        self.source, self.target
                    )))
                }
            }
        }
        self.on_commit(sent.commit.clone(), false).await?;
        Ok(())
    }

    /// Finishes cleanly on shutdown: abandons an open transaction or group (never committed),
    /// waits for what was sent, and makes progress durable. Returns what may be confirmed.
    pub async fn finish(&mut self) -> Result<Lsn, DirectionError> {
        let had_open = self.open.take().is_some();
        if had_open || self.group.is_some() || self.careful_on_target.is_some() {
            self.abort_open().await?;
        }
        self.ledger.pending_failure = None;
        self.ledger.redo.clear();
        while !self.ledger.in_flight.is_empty() {
            if self.on_reply().await? == Outcome::Restream {
                break;
            }
        }
        self.request_progress().await?;
        while !self.ledger.in_flight.is_empty() {
            self.on_reply().await?;
        }
        tracing::debug!(
            source = %self.source, target = %self.target,
            groups = self.groups_sent, transactions = self.transactions_sent,
            "apply finished"
        );
        Ok(self.confirmable())
    }

    /// Makes the open group's statements (sent without `Sync`) fail, so they roll back.
    async fn abort_open(&mut self) -> Result<(), DirectionError> {
        if let Some(txn) = self.careful_on_target.take() {
            return self.careful_abort(txn).await;
        }
        let explicit = self.group.take().is_some_and(|g| g.explicit);
        self.session
            .enc
            .parse("", "SELECT walbridge.expect_rows(0, 1)")
            .map_err(proto)?;
        self.session
            .enc
            .execute("", std::iter::empty())
            .map_err(proto)?;
        self.session.enc.sync();
        self.ledger.in_flight.push_back(Group::Abort);
        if explicit {
            self.end_explicit()?;
        }
        self.flush().await
    }

    /// Ends an explicit transaction left open by a failed group: `ROLLBACK` in a group of
    /// its own (a warning only when there is none).
    fn end_explicit(&mut self) -> Result<(), DirectionError> {
        self.session.enc.parse("", "ROLLBACK").map_err(proto)?;
        self.session
            .enc
            .execute("", std::iter::empty())
            .map_err(proto)?;
        self.session.enc.sync();
        self.ledger.in_flight.push_back(Group::Close);
        Ok(())
    }
}

/// Conflicts that resolving statements settled in SQL: rows `(_, key, table, kind,
/// ambiguous)` whose key is set. Logged here, counted by `acknowledge` once the transaction
/// committed (the ambiguous ones are counted here: the statement's transaction committed).
fn resolved_in_sql(
    rows: &[Vec<Option<Bytes>>],
    source: &str,
    target: &str,
    metrics: &Metrics,
) -> Vec<(ConflictKind, Resolution, String)> {
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| r.len() == 5) {
        if text(&row[4]) == Some("t") {
            metrics
                .conflicts_ambiguous
                .with_label_values(&[source, target])
                .inc();
        }
        let (Some(key), Some(table), Some(kind)) = (text(&row[1]), text(&row[2]), text(&row[3]))
        else {
            continue;
        };
        let kind = match kind {
            "update_older" => ConflictKind::UpdateOlder,
            "delete_older" => ConflictKind::DeleteOlder,
            _ => continue,
        };
        tracing::info!(
            source = %source, target = %target, table = %table,
            key = %crate::telemetry::shown_row(key), kind = %kind,
            resolution = "skipped", "conflict resolved"
        );
        out.push((kind, Resolution::Skipped, table.to_string()));
    }
    out
}

/// [`Applier::journal_params`] as statement parameters (none without a resolving statement).
fn journal_params(journal: &Option<[Option<String>; 3]>) -> impl Iterator<Item = Option<&[u8]>> {
    journal
        .iter()
        .flat_map(|j| j.iter().map(|p| p.as_deref().map(str::as_bytes)))
}

/// The optimistic guard's parameters: the overwritable origin ids, and the commit time when
/// the guard compares times (a statement must not receive parameters it does not use).
fn guard_params<'a>(table: &'a TableState, ts: &'a str) -> impl Iterator<Item = Option<&'a [u8]>> {
    std::iter::once(Some(table.overwritable.as_bytes()))
        .chain(table.by_time.then_some(Some(ts.as_bytes())))
}

/// Appends a value in COPY text format: NULL as `\N`, backslash, tab, newline and carriage
/// return escaped.
fn copy_text(out: &mut Vec<u8>, value: Option<&[u8]>) {
    let Some(bytes) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// The text-format parameter for column `pos` of `tuple` (`None` = NULL).
fn value_param(tuple: &Tuple, pos: usize) -> Option<&[u8]> {
    match tuple.0.get(pos) {
        Some(Value::Text(b)) | Some(Value::Binary(b)) => Some(b.as_ref()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::copy_text;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut out = Vec::new();
        copy_text(&mut out, Some(b"a\tb\nc\\d\re"));
        out.push(b'|');
        copy_text(&mut out, None);
        out.push(b'|');
        copy_text(&mut out, Some(b"\\x00ff"));
        assert_eq!(out, b"a\\tb\\nc\\\\d\\re|\\N|\\\\x00ff".to_vec());
    }
}
