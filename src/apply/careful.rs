//! The careful path: one change at a time, each decided against the target's row.
//!
//! Used only when the optimistic statement of a change found something unexpected (a possible
//! conflict). For each change: read the target's row for the key under `FOR UPDATE` with its
//! commit time and origin (and the key's tombstone when the row is gone), ask
//! [`crate::conflict::decide`], execute the chosen statement, and write the conflict to
//! `walbridge.conflicts` — all in the same transaction as the resolution, committed with the
//! origin's progress like any applied transaction.

use serde_json::{Map, Value as Json};

use super::position::Recorded;
use super::sql::{self, TableMap};
use super::{proto, text, value_param, Applier, Item, Sent, TableState};
use crate::config::ConflictPolicy;
use crate::conflict::{self, Action, ConflictKind, Incoming, LocalState, Resolution, Version};
use crate::direction::DirectionError;
use crate::event::{Begin, Change, ChangeOp, Commit, OldKind, Truncate, Tuple, Value};
use crate::lsn::PgTimestamp;
use crate::protocol::ServerError;
use crate::telemetry;

/// A conflict resolved in the current careful transaction: counted once it commits.
pub(super) type Resolved = (ConflictKind, Resolution, String);

/// A careful transaction applied change by change as the source streams it.
pub(super) struct CarefulTxn {
    begin: Begin,
    conflicts: Vec<Resolved>,
    sent: Sent,
}

/// Why one careful attempt did not commit.
pub(super) enum Failed {
    /// The server refused a statement; the attempt rolled back and may be retried.
    Server(ServerError),
    /// Policy `error` (or an unrecoverable situation): stop the direction.
    Stop(DirectionError),
}

use crate::protocol::pipeline::Rows;

impl Applier {
    /// One statement as its own round trip: `Parse` (unnamed) + `Bind` + `Execute` + `Sync`.
    /// Whatever is still in flight is read first, so the reply read here is this statement's.
    pub(super) async fn round_trip(
        &mut self,
        sql: &str,
        params: &[Option<&[u8]>],
    ) -> Result<Result<Rows, ServerError>, DirectionError> {
        self.settle_in_flight().await?;
        self.session.enc.parse("", sql).map_err(proto)?;
        self.session
            .enc
            .execute("", params.iter().copied())
            .map_err(proto)?;
        self.session.enc.sync();
        self.session
            .pipe
            .send(self.session.enc.take())
            .await
            .map_err(proto)?;
        let (rows, error) = self.read_group().await?;
        Ok(match error {
            Some(e) => Err(e),
            None => Ok(rows),
        })
    }

    pub(super) async fn exec(
        &mut self,
        sql: &str,
        params: &[Option<&[u8]>],
    ) -> Result<Rows, Failed> {
        match self.round_trip(sql, params).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(Failed::Server(e)),
            Err(e) => Err(Failed::Stop(e)),
        }
    }

    /// Applies a buffered transaction carefully, retrying serialization failures and races
    /// with local writers a few times.
    pub(super) async fn apply_carefully(&mut self, sent: Sent) -> Result<(), DirectionError> {
        let items = sent.items.clone().unwrap_or_default();
        let mut last = None;
        let mut refused_change = None;
        for _attempt in 0..3 {
            let mut at = None;
            match self
                .careful_attempt(
                    &sent.begin,
                    &items,
                    &sent.commit,
                    sent.recorded.as_deref(),
                    &mut at,
                )
                .await
            {
                Ok(conflicts) => {
                    self.ddl_txn_ended();
                    self.ledger.expected = sent.end_lsn;
                    self.acknowledge(&sent, &conflicts);
                    return Ok(());
                }
                Err(Failed::Stop(e)) => return Err(e.at_transaction(sent.end_lsn)),
                Err(Failed::Server(e)) => {
                    let _ = self.round_trip("ROLLBACK", &[]).await?;
                    self.ddl_txn_ended();
                    if crate::protocol::sqlstate_is_undefined_object(&e.code) {
                        // Dropped on the target since it was mapped: map it again, so the
                        // next attempt parks or stops naming what is missing.
                        self.tables.forget_mappings();
                    }
                    tracing::debug!(error = %e, "careful apply attempt failed; retrying");
                    last = Some(e);
                    refused_change = at;
                }
            }
        }
        let msg = format!(
            "{} -> {}: the transaction of {} (xid {}, end {}) cannot be applied: {}",
            self.source,
            self.target,
            sent.commit_time,
            sent.begin.xid,
            sent.end_lsn,
            last.as_ref()
                .map_or_else(|| "unknown error".to_string(), |e| e.to_string())
        );
        // Three refusals in a row: the last one's SQLSTATE says whether to retry later.
        let err = match &last {
            Some(e) => {
                let err = DirectionError::caused_by(msg, e);
                // A source whose changes have ids of their own learns which one was refused.
                match refused_change {
                    Some(id) => err.with_failed_change(crate::direction::FailedChange {
                        source_change_id: id,
                        sqlstate: e.code.clone(),
                        stored_text: e.text_with_values(),
                    }),
                    None => err,
                }
            }
            None => DirectionError::definite(msg),
        };
        Err(err.at_transaction(sent.end_lsn))
    }

    async fn careful_attempt(
        &mut self,
        begin: &Begin,
        items: &[Item],
        commit: &Commit,
        recorded: Option<&Recorded>,
        refused_change: &mut Option<i64>,
    ) -> Result<Vec<Resolved>, Failed> {
        self.exec("BEGIN", &[]).await?;
        self.take_turn().await?;
        let mut conflicts = Vec::new();
        for item in items {
            if let Err(f) = self.careful_item(begin, item, &mut conflicts).await {
                if let (Failed::Server(_), Item::Change(c)) = (&f, item) {
                    *refused_change = c.source_change_id;
                }
                return Err(f);
            }
        }
        self.careful_commit(commit, recorded).await?;
        Ok(conflicts)
    }

    /// With three or more nodes (or node_priority tables), waits for this target's other
    /// appliers (first statement of a careful transaction; see
    /// `conflict::SERIALIZE_APPLIERS_SQL`).
    async fn take_turn(&mut self) -> Result<(), Failed> {
        if self.take_turns {
            self.exec(crate::conflict::SERIALIZE_APPLIERS_SQL, &[])
                .await?;
        }
        Ok(())
    }

    pub(super) async fn careful_commit(
        &mut self,
        commit: &Commit,
        recorded: Option<&Recorded>,
    ) -> Result<(), Failed> {
        if let Some(recorded) = recorded {
            // A position that is not an LSN: its rows first (see `super::position`).
            self.exec_recorded(recorded).await?;
        }
        if self.session.origin {
            let (expected, end) = super::position::finish_lsns(
                recorded.is_some(),
                self.ledger.committed,
                commit.end_lsn,
            );
            let ts = commit.commit_time.to_string();
            self.exec(
                sql::APPLY_FINISH,
                &[
                    expected.as_deref().map(str::as_bytes),
                    Some(end.as_bytes()),
                    Some(ts.as_bytes()),
                ],
            )
            .await?;
        }
        self.exec("COMMIT", &[]).await?;
        Ok(())
    }

    /// Starts a careful transaction that is applied as the source streams it.
    pub(super) async fn careful_begin(
        &mut self,
        begin: Begin,
        sent: Sent,
    ) -> Result<(), DirectionError> {
        let begun = match self.exec("BEGIN", &[]).await {
            Ok(_) => self.take_turn().await,
            Err(f) => Err(f),
        };
        match begun {
            Ok(()) => {}
            Err(Failed::Server(e)) => {
                return Err(DirectionError::caused_by(
                    format!("node {}: BEGIN failed: {e}", self.target),
                    &e,
                ))
            }
            Err(Failed::Stop(e)) => return Err(e),
        }
        self.careful_on_target = Some(CarefulTxn {
            begin,
            conflicts: Vec::new(),
            sent,
        });
        Ok(())
    }

    /// One item of a streamed careful transaction.
    pub(super) async fn careful_stream_item(&mut self, item: Item) -> Result<(), DirectionError> {
        let Some(mut txn) = self.careful_on_target.take() else {
            return Ok(());
        };
        let begin = txn.begin.clone();
        let result = self.careful_item(&begin, &item, &mut txn.conflicts).await;
        match result {
            Ok(()) => {
                if let Item::Change(c) = &item {
                    *txn.sent.counts.entry((c.relation.oid, c.op)).or_default() += 1;
                } else if let Item::Truncate(t) = &item {
                    for rel in &t.relations {
                        *txn.sent.truncates.entry(rel.qualified_name()).or_default() += 1;
                    }
                }
                self.careful_on_target = Some(txn);
                Ok(())
            }
            Err(f) => Err(self
                .roll_back(
                    f,
                    "careful apply failed, retrying from the target's progress",
                )
                .await?),
        }
    }

    /// Commits a streamed careful transaction.
    pub(super) async fn careful_stream_commit(
        &mut self,
        commit: Commit,
        recorded: Option<Box<Recorded>>,
    ) -> Result<(), DirectionError> {
        let Some(mut txn) = self.careful_on_target.take() else {
            return Ok(());
        };
        match self.careful_commit(&commit, recorded.as_deref()).await {
            Ok(()) => {
                self.ddl_txn_ended();
                txn.sent.end_lsn = commit.end_lsn;
                txn.sent.commit_time = commit.commit_time;
                self.ledger.expected = commit.end_lsn;
                txn.sent.recorded = recorded;
                self.acknowledge(&txn.sent, &txn.conflicts);
                Ok(())
            }
            Err(f) => Err(self
                .roll_back(f, "committing a careful transaction failed")
                .await?),
        }
    }

    /// Rolls back after a failed careful step: a refused statement is worth retrying from the
    /// target's progress (transient), a stop is final.
    pub(super) async fn roll_back(
        &mut self,
        failed: Failed,
        what: &str,
    ) -> Result<DirectionError, DirectionError> {
        let _ = self.round_trip("ROLLBACK", &[]).await?;
        self.ddl_txn_ended();
        Ok(match failed {
            Failed::Stop(e) => e,
            // Not a classification: whatever the SQLSTATE (a conflict with a local writer,
            // WB002 progress moved), the streamed transaction is read again from the
            // target's progress and resolved afresh.
            Failed::Server(e) => DirectionError::transient(format!(
                "{} -> {}: {what}: {e}",
                self.source, self.target
            )),
        })
    }

    /// Rolls back a streamed careful transaction (shutdown).
    pub(super) async fn careful_abort(&mut self, _txn: CarefulTxn) -> Result<(), DirectionError> {
        let _ = self.round_trip("ROLLBACK", &[]).await?;
        self.ddl_txn_ended();
        Ok(())
    }

    async fn careful_item(
        &mut self,
        begin: &Begin,
        item: &Item,
        conflicts: &mut Vec<Resolved>,
    ) -> Result<(), Failed> {
        match item {
            Item::Truncate(t) => self.careful_truncate(t).await,
            Item::Change(c) => self.careful_change(begin, c, conflicts).await,
            Item::Ddl(d) => self.careful_ddl(d).await,
        }
    }

    async fn careful_truncate(&mut self, t: &Truncate) -> Result<(), Failed> {
        let sql = self.truncate_sql(t).await.map_err(Failed::Stop)?;
        match self.exec(&sql, &[]).await {
            Err(Failed::Server(e)) if sql::truncate_refused(&e, true) => Err(Failed::Stop(
                self.truncate_refused("applying a transaction carefully", &e),
            )),
            other => other.map(drop),
        }
    }

    pub(super) async fn careful_change(
        &mut self,
        begin: &Begin,
        change: &Change,
        conflicts: &mut Vec<Resolved>,
    ) -> Result<(), Failed> {
        if self.park_carefully(begin, change).await? {
            return Ok(());
        }
        let table = self.table(&change.relation).await.map_err(Failed::Stop)?;
        let map = &table.map;
        let Some(row_tuple) = change
            .new
            .as_ref()
            .or(change.old.as_ref().map(|o| &o.tuple))
        else {
            return Err(Failed::Stop(DirectionError::definite(format!(
                "the stream from {} sent a {} of {} without values",
                self.source, change.op, table.label
            ))));
        };
        // Unchanged TOAST values can be filled from a full old row.
        let new = change.new.as_ref().map(|n| fill_toast(n, change));
        let complete_row = new
            .as_ref()
            .is_some_and(|n| !n.0.iter().any(|v| matches!(v, Value::UnchangedToast)));
        let key_tuple = change.identity_tuple().unwrap_or(row_tuple).clone();

        if map.key.is_empty() {
            // No way to find rows: only inserts are possible, and they cannot conflict.
            if change.op == ChangeOp::Insert {
                let params = written_params(map, new.as_ref().unwrap_or(row_tuple));
                self.exec(&map.insert_plain(), &params).await?;
                return Ok(());
            }
            return Err(Failed::Stop(DirectionError::definite(format!(
                "{} -> {}: {} has no replica identity to find the row of a {}",
                self.source, self.target, table.label, change.op
            ))));
        }

        // The target's row, locked, with its version.
        let old_full: Vec<usize> = match &change.old {
            Some(o) if o.kind == OldKind::Full => map.written().collect(),
            _ => Vec::new(),
        };
        let mut params: Vec<Option<&[u8]>> = map
            .key
            .iter()
            .map(|&p| value_param(&key_tuple, p))
            .collect();
        if let Some(old) = &change.old {
            params.extend(old_full.iter().map(|&p| value_param(&old.tuple, p)));
        }
        let lookup = map.lookup_row(&old_full);
        let rows = self.exec(&lookup, &params).await?;
        let found = rows.first();
        let local_json = found
            .and_then(|r| r.first())
            .and_then(text)
            .map(str::to_string);
        let local_time = found
            .and_then(|r| r.get(1))
            .and_then(text)
            .and_then(PgTimestamp::parse);
        let local_origin = found
            .and_then(|r| r.get(2))
            .and_then(text)
            .and_then(|t| t.parse::<i64>().ok());
        let equals_old = found
            .and_then(|r| r.get(3))
            .and_then(text)
            .map(|t| t == "t");
        // A row this transaction wrote (an earlier change of it) is the source's own earlier
        // version, not the target's: its commit time and origin are not known before commit.
        let source_rank = self.writers.rank(&self.source);
        let mine = |flag: Option<&str>| flag == Some("t");
        let row = found.map(|r| Version {
            commit_time: local_time,
            writer_rank: if mine(r.get(4).and_then(text)) {
                source_rank
            } else {
                self.writers.rank_of(local_origin)
            },
        });

        // Without a row, the key's deletion (if recorded) is the local version.
        let mut tombstone = None;
        let mut tombstone_origin = None;
        if row.is_none() {
            if let Some(tsql) = map.lookup_tombstone() {
                let uk = map.unique_key.clone().unwrap_or_default();
                let p: Vec<Option<&[u8]>> =
                    uk.iter().map(|&i| value_param(&key_tuple, i)).collect();
                let t = self.exec(&tsql, &p).await?;
                if let Some(r) = t.first() {
                    let origin = r.get(1).and_then(text).and_then(|t| t.parse().ok());
                    tombstone_origin = origin;
                    tombstone = Some(Version {
                        commit_time: r.first().and_then(text).and_then(PgTimestamp::parse),
                        writer_rank: if mine(r.get(2).and_then(text)) {
                            source_rank
                        } else {
                            self.writers.rank_of(origin)
                        },
                    });
                }
            }
        }

        let incoming = Incoming {
            op: change.op,
            version: Version {
                commit_time: Some(begin.commit_time),
                writer_rank: source_rank,
            },
            complete_row,
        };
        let local = LocalState {
            row,
            row_equals_old: equals_old,
            tombstone,
        };
        let decision = conflict::decide(table.policy, incoming, local);

        let key_json = key_json(map, &key_tuple);
        let remote_json = row_json(map, new.as_ref().unwrap_or(row_tuple));
        // Values the source did not send (unchanged TOAST, no full old row to fill them).
        let unsent: Vec<String> = new
            .as_ref()
            .map(|n| unsent_columns(map, n))
            .unwrap_or_default();
        if let Some((kind, resolution)) = decision.conflict {
            if decision.action == Action::Stop {
                self.metrics
                    .conflicts
                    .with_label_values(&[
                        self.source.as_str(),
                        self.target.as_str(),
                        kind.as_str(),
                        resolution.as_str(),
                    ])
                    .inc();
                return Err(Failed::Stop(DirectionError::definite(format!(
                    "conflict on {} key {} ({kind}) from {} to {} under conflict policy \
                     \"error\": nothing applied; local row {}, incoming row {}; resolve it by \
                     hand, then restart walbridge",
                    table.label,
                    telemetry::shown_row(&key_json),
                    self.source,
                    self.target,
                    local_json.as_deref().map_or("(none)", telemetry::shown_row),
                    telemetry::shown_row(&remote_json),
                ))));
            }
        }

        self.execute_action(
            &table,
            change,
            decision.action,
            new.as_ref(),
            &key_tuple,
            tombstone.is_some(),
        )
        .await?;

        if let Some((kind, resolution)) = decision.conflict {
            let ts = begin.commit_time.to_string();
            // The local version's time and writer: the row's, else the tombstone's.
            let (local_ts, local_writer) = match (row, tombstone) {
                (Some(_), _) => (
                    local_time.map(|t| t.to_string()),
                    Some(self.writers.node(local_origin).to_string()),
                ),
                (None, Some(t)) => (
                    t.commit_time.map(|t| t.to_string()),
                    Some(self.writers.node(tombstone_origin).to_string()),
                ),
                (None, None) => (None, None),
            };
            let flag = |b: bool| if b { "true" } else { "false" };
            let local_tombstone = flag(row.is_none() && tombstone.is_some());
            // Last-write-wins by less than the clocks' measured disagreement: flag it.
            let local_version = row.or(tombstone);
            let ambiguous = table.policy == ConflictPolicy::LastWriteWins
                && match (local_version.and_then(|v| v.commit_time), &local_writer) {
                    (Some(local_t), Some(writer)) => {
                        let skew = |n: &str| self.metrics.clock_skew.with_label_values(&[n]).get();
                        let uncertainty = (skew(&self.source) - skew(writer)).abs();
                        let gap = (begin.commit_time.0 - local_t.0).abs() as f64 / 1_000_000.0;
                        gap < uncertainty
                    }
                    _ => false,
                };
            if ambiguous {
                self.metrics
                    .conflicts_ambiguous
                    .with_label_values(&[self.source.as_str(), self.target.as_str()])
                    .inc();
            }
            let table_label = table.label.clone();
            let (source, target) = (self.source.clone(), self.target.clone());
            let journal = Journal::new(&self.config, begin, &unsent);
            let source_change_id = change.source_change_id.map(|id| id.to_string());
            let remote_version =
                conflict::journal_remote_row(&remote_json, local_json.as_deref(), &unsent);
            let journaled = self
                .exec(
                    sql::INSERT_CONFLICT,
                    &[
                        Some(source.as_bytes()),
                        Some(target.as_bytes()),
                        Some(table_label.as_bytes()),
                        Some(key_json.as_bytes()),
                        Some(kind.as_str().as_bytes()),
                        Some(resolution.as_str().as_bytes()),
                        local_json.as_deref().map(str::as_bytes),
                        Some(remote_version.as_bytes()),
                        local_ts.as_deref().map(str::as_bytes),
                        Some(ts.as_bytes()),
                        Some(table.policy.as_str().as_bytes()),
                        local_writer.as_deref().map(str::as_bytes),
                        Some(local_tombstone.as_bytes()),
                        equals_old.map(|b| flag(b).as_bytes()),
                        Some(flag(complete_row).as_bytes()),
                        Some(flag(ambiguous).as_bytes()),
                        journal.source_lsn.as_deref().map(str::as_bytes),
                        Some(journal.priority.as_bytes()),
                        Some(journal.unsent.as_bytes()),
                        Some(journal.max_row_bytes.as_bytes()),
                        source_change_id.as_deref().map(str::as_bytes),
                    ],
                )
                .await;
            match journaled {
                Err(Failed::Server(e)) if conflict::journal_outdated(&e.code) => {
                    return Err(Failed::Stop(DirectionError::definite(format!(
                        "{} -> {}: journaling a conflict on {} failed ({e}): {}",
                        self.source,
                        self.target,
                        self.target,
                        conflict::JOURNAL_OUTDATED_FIX
                    ))));
                }
                other => other.map(drop)?,
            }
            tracing::info!(
                source = %self.source, target = %self.target, table = %table.label,
                key = %telemetry::shown_row(&key_json), kind = %kind, resolution = %resolution,
                "conflict resolved"
            );
            if matches!(kind, ConflictKind::UpdateOlder | ConflictKind::DeleteOlder) {
                // Contended table: let its statements settle these in SQL from now on.
                table.hot.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            conflicts.push((kind, resolution, table.label.clone()));
        }
        Ok(())
    }

    async fn execute_action(
        &mut self,
        table: &TableState,
        change: &Change,
        action: Action,
        new: Option<&Tuple>,
        key_tuple: &Tuple,
        had_tombstone: bool,
    ) -> Result<(), Failed> {
        let map = &table.map;
        let uk_params = |t: &Tuple| -> Vec<Option<Vec<u8>>> {
            map.unique_key
                .iter()
                .flatten()
                .map(|&i| value_param(t, i).map(<[u8]>::to_vec))
                .collect()
        };
        match action {
            Action::Skip | Action::Stop => {}
            Action::Insert | Action::InsertFromUpdate => {
                let Some(new) = new else { return Ok(()) };
                let params = written_params(map, new);
                self.exec(&map.insert_plain(), &params).await?;
                if had_tombstone {
                    if let Some(sql) = map.delete_tombstone() {
                        let owned = uk_params(new);
                        let p: Vec<Option<&[u8]>> = owned.iter().map(|v| v.as_deref()).collect();
                        self.exec(&sql, &p).await?;
                    }
                }
            }
            Action::Update => {
                let Some(new) = new else { return Ok(()) };
                let present: Vec<usize> = map
                    .written()
                    .filter(|&p| !matches!(new.0.get(p), Some(Value::UnchangedToast)))
                    .collect();
                // An insert that won over an existing row finds it by the new row's key.
                let key_src = if change.op == ChangeOp::Insert {
                    new
                } else {
                    key_tuple
                };
                let keys = || map.key.iter().map(|&p| value_param(key_src, p));
                let settable = map.settable(&present);
                if !settable.is_empty() {
                    let params: Vec<Option<&[u8]>> = settable
                        .iter()
                        .map(|&p| value_param(new, p))
                        .chain(keys())
                        .collect();
                    self.exec(&map.update_plain(&present), &params).await?;
                }
                // GENERATED ALWAYS identity values are left out above; write those that
                // differ from the row's (see `sql::IdentityChange`).
                let identity: Vec<usize> = map
                    .always_identity
                    .iter()
                    .copied()
                    .filter(|&p| present.contains(&p))
                    .collect();
                if !identity.is_empty() {
                    let params: Vec<Option<&[u8]>> = identity
                        .iter()
                        .map(|&p| value_param(new, p))
                        .chain(keys())
                        .collect();
                    let differs = self.exec(&map.identity_differs(&identity), &params).await?;
                    if differs.first().and_then(|r| r.first()).and_then(text) == Some("t") {
                        let [by_default, update, always] = map.identity_rewrite(&identity);
                        match self.exec(&by_default, &[]).await {
                            Err(Failed::Server(e)) if e.code == "42501" => {
                                return Err(Failed::Stop(DirectionError::definite(format!(
                                    "{} -> {}: a new GENERATED ALWAYS identity value of {} \
                                     (the source ran UPDATE ... SET ... = DEFAULT) can only be \
                                     written on {} by the table's owner or a superuser: {e}; \
                                     let walbridge's role own the table there, then restart",
                                    self.source, self.target, table.label, self.target
                                ))));
                            }
                            other => other.map(drop)?,
                        }
                        self.exec(&update, &params).await?;
                        self.exec(&always, &[]).await?;
                    }
                }
            }
            Action::Delete => {
                let params: Vec<Option<&[u8]>> =
                    map.key.iter().map(|&p| value_param(key_tuple, p)).collect();
                self.exec(&map.delete_plain(), &params).await?;
            }
            Action::RecordTombstone => {
                if let Some(sql) = map.record_tombstone() {
                    let owned = uk_params(key_tuple);
                    let p: Vec<Option<&[u8]>> = owned.iter().map(|v| v.as_deref()).collect();
                    self.exec(&sql, &p).await?;
                }
            }
        }
        Ok(())
    }
}

/// What the journal records besides the decision's facts: where the change came from, the
/// policy version (the priority order) and the row bound, as statement parameters.
struct Journal {
    source_lsn: Option<String>,
    priority: String,
    unsent: String,
    max_row_bytes: String,
}

impl Journal {
    fn new(config: &crate::config::Config, begin: &Begin, unsent: &[String]) -> Self {
        Journal {
            // The commit LSN, known up front (`Lsn::ZERO` when the plugin does not say).
            source_lsn: (begin.final_lsn != crate::lsn::Lsn::ZERO)
                .then(|| begin.final_lsn.to_string()),
            priority: Json::from(config.priority_order()).to_string(),
            unsent: Json::from(unsent.to_vec()).to_string(),
            max_row_bytes: config.replication.conflict_max_row_bytes.to_string(),
        }
    }
}

/// The target's names of the written columns whose value `new` lacks (unchanged TOAST).
fn unsent_columns(map: &TableMap, new: &Tuple) -> Vec<String> {
    map.written()
        .filter(|&p| matches!(new.0.get(p), Some(Value::UnchangedToast)))
        .filter_map(|p| map.target_column[p].map(|i| map.target.columns[i].name.clone()))
        .collect()
}

/// The new row with unchanged-TOAST placeholders filled from a full old row, when sent.
fn fill_toast(new: &Tuple, change: &Change) -> Tuple {
    let Some(old) = change.old.as_ref().filter(|o| o.kind == OldKind::Full) else {
        return new.clone();
    };
    Tuple(
        new.0
            .iter()
            .zip(old.tuple.0.iter())
            .map(|(n, o)| match n {
                Value::UnchangedToast => o.clone(),
                other => other.clone(),
            })
            .collect(),
    )
}

fn written_params<'a>(map: &TableMap, t: &'a Tuple) -> Vec<Option<&'a [u8]>> {
    map.written().map(|p| value_param(t, p)).collect()
}

fn json_value(v: Option<&Value>) -> Json {
    match v {
        Some(Value::Text(b)) | Some(Value::Binary(b)) => {
            Json::String(String::from_utf8_lossy(b).into_owned())
        }
        _ => Json::Null,
    }
}

/// The key as a JSON array of its text values (for logs and `walbridge.conflicts.key`).
fn key_json(map: &TableMap, t: &Tuple) -> String {
    Json::Array(map.key.iter().map(|&p| json_value(t.0.get(p))).collect()).to_string()
}

/// A row as a JSON object of column name to text value (unchanged TOAST left out).
fn row_json(map: &TableMap, t: &Tuple) -> String {
    let mut obj = Map::new();
    for p in map.written() {
        if matches!(t.0.get(p), Some(Value::UnchangedToast)) {
            continue;
        }
        if let Some(i) = map.target_column[p] {
            obj.insert(map.target.columns[i].name.clone(), json_value(t.0.get(p)));
        }
    }
    Json::Object(obj).to_string()
}
