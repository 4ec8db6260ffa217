//! The worker of one direction S → T: reads S's change table, applies it to T through the
//! same applier as stream mode ([`crate::apply::Applier`]), deletes at S.
//!
//! ```text
//!          LISTEN <prefix>_changes / poll_interval
//!   S ──────────────────────────────▶ worker
//!   │ read (REPEATABLE READ):                │ rows → source transactions (super::events)
//!   │  new rows   id > last_id  LIMIT n      │   echo dropped, bad rows set aside (dead)
//!   │  late rows  txid >= hold_xid, id <=    │ Applier on T: conflicts, tombstones, journal,
//!   │             last_id, not yet applied   │   each transaction's cursor (last_id,
//!   │                                        │   hold_xid, late ids) committed with its data
//!   │ ◀── dead rows (before T commits) ──────│
//!   │ ◀── delete applied rows (after) ───────│
//! ```
//!
//! See the module docs of [`crate::trigger`] for why progress is `(last_id, hold_xid)` plus
//! a small set of ids rather than a single id, and [`crate::apply::position`] for how the
//! applier records it.
//!
//! A row the target refuses (a bad value, a constraint) is located by the applier
//! ([`crate::direction::FailedChange`]): the worker starts a fresh applier, reads the batch
//! again from T's progress and sends that row to the dead-letter table instead, so a bad row
//! costs one extra round and the others are never lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, IsolationLevel, Statement};

use crate::apply::{Applier, ApplyLimits, Outcome};
use crate::catalog::{self, TableInfo};
use crate::config::{Config, SchemaMismatch};
use crate::direction::{DirectionContext, DirectionError, DirectionState};
use crate::lsn::PgTimestamp;
use crate::pgconn;
use crate::pgconn::pg_message;
use crate::protocol::{self, pipeline::Pipeline, ConnectOptions};

use super::change::{self, Change, RawRow, RowError};
use super::cursor::{self, load_state, record_progress, recorded_progress, State};
use super::events::TxnBuilder;
use super::sql;

/// Late rows read per poll at most; above it the hold horizon stays where it was so none is
/// skipped (see [`State`]).
const MAX_LATE_ROWS: i64 = 10_000;

/// The failpoint that aborts the process right after a batch commits on the target and
/// before the source rows are deleted (`WALBRIDGE_FAILPOINT=trigger_after_commit`), for the
/// crash tests.
pub const FAILPOINT_AFTER_COMMIT: &str = "trigger_after_commit";

/// A change row on its way: applied, dropped as an echo, or dead.
struct Item {
    row: RawRow,
    kind: Kind,
}

enum Kind {
    /// Made on another node and logged here by an old trigger while walbridge applied it.
    Echo,
    /// Cannot be applied: the error text for the dead-letter table (which holds the row, so
    /// the text may name its values), and the text for the log (row values withheld unless
    /// `[log] row_contents`).
    Dead(String, String),
    /// To apply.
    Change(Box<Change>),
    /// A schema change, alone in its batch (see [`super::ddl`]).
    Ddl,
}

/// The worker's view of the target, for what is not applying: its catalog (to check rows
/// before they are applied), the recorded progress, and progress-only commits.
struct Target {
    client: Client,
    search_path: Vec<String>,
    tables: BTreeMap<(String, String), Arc<TableInfo>>,
    tables_loaded: Instant,
}

/// The worker's view of the source.
struct Source {
    client: Client,
    notifications: mpsc::Receiver<tokio_postgres::Notification>,
    read_late: Statement,
    read_new: Statement,
    table_oid: u32,
}

/// The applier and the task that drives its session; the task ends with the applier.
struct Apply {
    applier: Applier,
    driver: JoinHandle<Result<(), protocol::ProtocolError>>,
}

impl Drop for Apply {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// How applying a batch ended.
enum Applied {
    /// Every source transaction committed on T; true when the last one's recorded progress
    /// covers the whole batch (else echo or dead rows follow it, recorded on their own).
    Done(bool),
    /// The applier gave up its state (a row refused, or a transaction too large to redo
    /// from memory): the batch is read again from T's progress with a fresh applier.
    Again,
}

/// One direction's worker.
struct Worker<'a> {
    ctx: &'a DirectionContext,
    config: &'a Config,
    s: Source,
    t: Target,
    apply: Option<Apply>,
    /// Started carefully (after a transaction too large to redo conflicted).
    careful_start: bool,
    builder: TxnBuilder,
    state: State,
    peers: Vec<String>,
    failpoint: bool,
    depth_checked: Option<Instant>,
    /// Rows with a larger id are left alone (the cut-over drains up to its fence).
    max_id: i64,
    /// Change rows handled since start.
    handled: u64,
    /// Rows the target refused (id → the server's words, values kept): dead-lettered when
    /// they are read again.
    refused: HashMap<i64, String>,
    /// S's replicated tables, read when a row's table or column is missing on T: when S has
    /// it, the change is described as S has it, so the applier meets the schema mismatch
    /// (parks it or stops) instead of the row going dead.
    source_tables: Option<Target>,
}

/// A direction error from a server error: transient or definite by its SQLSTATE.
fn pg_fail(node: &str, what: &str, e: &tokio_postgres::Error) -> DirectionError {
    DirectionError::caused_by(format!("node {node}: {what}: {}", pg_message(e)), e)
}

fn pg_err(node: &str, what: &str) -> impl FnOnce(tokio_postgres::Error) -> DirectionError {
    let (node, what) = (node.to_string(), what.to_string());
    move |e| pg_fail(&node, &what, &e)
}

/// Whether a server error is about the one statement's data (so the change row is dead and
/// the others go on) rather than about the target as a whole (permissions, read-only, disk),
/// which stops the direction instead of sending every row to the dead-letter table.
fn is_row_error(code: &str) -> bool {
    code.starts_with("22") // data exception: bad input syntax, out of range, too long
        || code.starts_with("23") // integrity: not null, unique, check, foreign key
        || code.starts_with("P0") // raised by a user's trigger
        || matches!(
            code,
            "42703" // undefined column
                | "42P01" // undefined table
                | "42804" // datatype mismatch
                | "42846" // cannot coerce
                | "42883" // undefined function (no operator for a type)
                | "54000" // program limit exceeded (row too big)
                | "0A000" // feature not supported for this value
        )
}

/// Runs direction S → T in trigger mode until `ctx.shutdown` is cancelled (then `Ok`) or an
/// error stops it (transient: the runtime retries; definite: the direction stops).
#[tracing::instrument(name = "trigger", skip_all, fields(source = %ctx.source, target = %ctx.target))]
pub async fn run_direction(ctx: &DirectionContext) -> Result<(), DirectionError> {
    ctx.report(|s| {
        s.mode = "trigger".into();
        s.origin = Some(ctx.config.origin_name(&ctx.source));
        s.state = DirectionState::Connecting;
    });
    let mut worker = tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => return Ok(()),
        w = Worker::connect(ctx) => w?,
    };
    tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => return Ok(()),
        r = worker.recover() => r?,
    }
    ctx.report(|s| {
        s.state = DirectionState::Streaming;
        s.last_error = None;
    });
    tracing::info!(
        table = %ctx.config.trigger.table,
        last_id = worker.state.last_id,
        "trigger-mode direction running"
    );
    let poll = ctx.config.trigger.poll_interval;
    loop {
        // Drain while there is more to read. A step cancelled by shutdown is safe at any
        // point: T's transactions committed with their progress or not at all, and S's rows
        // are deleted only after.
        loop {
            let more = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return Ok(()),
                r = worker.step() => r?,
            };
            if !more {
                break;
            }
        }
        tokio::select! {
            biased;
            // Shutdown first: nothing is in flight between steps.
            _ = ctx.shutdown.cancelled() => return Ok(()),
            // A NOTIFY from the change table's statement trigger: read at once.
            n = worker.s.notifications.recv() => {
                if n.is_none() {
                    return Err(DirectionError::transient(format!(
                        "node {}: the listening connection closed", ctx.source
                    )));
                }
                // Several notifications may be queued: one read serves them all.
                while worker.s.notifications.try_recv().is_ok() {}
            }
            // The safety net when a notification is missed.
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Applies every row of S's change table with `id <= max_id` to T and returns (the
/// cut-over's drain): the same reads, conflict handling and progress as [`run_direction`].
/// Returns how many change rows were handled.
pub async fn drain_direction(ctx: &DirectionContext, max_id: i64) -> Result<u64, DirectionError> {
    let mut worker = Worker::connect(ctx).await?;
    worker.max_id = max_id;
    worker.recover().await?;
    while worker.step().await? {}
    Ok(worker.handled)
}

impl<'a> Worker<'a> {
    async fn connect(ctx: &'a DirectionContext) -> Result<Worker<'a>, DirectionError> {
        let config: &Config = &ctx.config;
        let (src, tgt) = (&ctx.source, &ctx.target);
        let node = |name: &str| {
            config.node(name).ok_or_else(|| {
                DirectionError::definite(format!("node {name} is not in the configuration"))
            })
        };
        let connect_err = |name: &str| {
            let name = name.to_string();
            move |e: pgconn::ConnectError| {
                DirectionError::caused_by(format!("node {name}: {e}"), &e)
            }
        };
        let (tx, rx) = mpsc::channel(16);
        let s_client = pgconn::connect_listening(
            &node(src)?.dsn,
            &format!("walbridge-trigger-read-{src}-to-{tgt}"),
            tx,
        )
        .await
        .map_err(connect_err(src))?;
        let t_client = pgconn::connect(
            &node(tgt)?.dsn,
            &format!("walbridge-trigger-catalog-{src}-to-{tgt}"),
        )
        .await
        .map_err(connect_err(tgt))?;

        // Why the source is in trigger mode, for `status`.
        if let Ok(m) = super::mode::node_mode(config, src, &s_client).await {
            ctx.report(|s| s.mode_reason = Some(m.reason));
        }
        let s = Source::open(s_client, rx, config, src).await?;
        let t = Target::open(t_client, config, tgt).await?;
        let peers = config
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| n != src)
            .collect();
        Ok(Worker {
            ctx,
            config,
            s,
            t,
            apply: None,
            careful_start: false,
            builder: TxnBuilder::new(&config.replication.slot_prefix, PgTimestamp::now()),
            state: State::default(),
            peers,
            failpoint: std::env::var("WALBRIDGE_FAILPOINT").as_deref()
                == Ok(FAILPOINT_AFTER_COMMIT),
            depth_checked: None,
            max_id: i64::MAX,
            handled: 0,
            refused: HashMap::new(),
            source_tables: None,
        })
    }

    /// The applier, started on first use (and again after it gave up its state): a
    /// pipelined session on T under S's replication origin, one group in flight (the cursor
    /// carries no order T could check) and every commit durable before S deletes its rows.
    async fn applier(&mut self) -> Result<&mut Applier, DirectionError> {
        if self.apply.is_none() {
            let (src, tgt) = (self.ctx.source.as_str(), self.ctx.target.as_str());
            let node = self.config.node(tgt).ok_or_else(|| {
                DirectionError::definite(format!("node {tgt} is not in the configuration"))
            })?;
            let raw = protocol::connect(
                &node.dsn,
                ConnectOptions {
                    application_name: format!("walbridge-trigger-apply-{src}-to-{tgt}"),
                    replication: false,
                    params: Vec::new(),
                },
            )
            .await
            .map_err(|e| DirectionError::caused_by(format!("node {tgt}: {e}"), &e))?;
            let (pipe, driver) = Pipeline::from_raw(raw);
            let driver = tokio::spawn(driver);
            let catalog =
                match pgconn::connect(&node.dsn, &format!("walbridge-catalog-{tgt}")).await {
                    Ok(c) => c,
                    Err(e) => {
                        driver.abort();
                        return Err(DirectionError::caused_by(format!("node {tgt}: {e}"), &e));
                    }
                };
            let limits = ApplyLimits {
                max_in_flight: 1,
                durable_commits: true,
                allow_no_origin: true,
                ..ApplyLimits::default()
            };
            let started = Applier::start(
                pipe,
                catalog,
                self.ctx.config.clone(),
                src,
                tgt,
                self.ctx.metrics.clone(),
                limits,
            )
            .await;
            let mut applier = match started {
                Ok((applier, _)) => applier,
                Err(e) => {
                    driver.abort();
                    return Err(e);
                }
            };
            if std::mem::take(&mut self.careful_start) {
                applier.apply_next_transaction_carefully();
            }
            self.apply = Some(Apply { applier, driver });
        }
        match self.apply.as_mut() {
            Some(a) => Ok(&mut a.applier),
            None => Err(DirectionError::transient("the applier is not running")),
        }
    }

    /// Reads the progress recorded on T and deletes at S what T applied but S still holds
    /// (a crash between T's commit and S's delete).
    async fn recover(&mut self) -> Result<(), DirectionError> {
        let (src, tgt) = (self.ctx.source.clone(), self.ctx.target.clone());
        self.state = load_state(&self.t.client, &src)
            .await
            .map_err(pg_err(&tgt, "reading walbridge.trigger_progress"))?;
        // A change table recreated since (ids restarted) would hide new rows below last_id.
        let seq = self
            .s
            .client
            .query_one(
                "SELECT pg_catalog.pg_sequence_last_value(
                        pg_catalog.pg_get_serial_sequence($1, 'id')::regclass)",
                &[&self.config.trigger.table.quoted()],
            )
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<i64>>(0));
        if let Some(last) = seq {
            if last < self.state.last_id {
                return Err(DirectionError::definite(format!(
                    "node {src}: the id sequence of {} is at {last}, below the {} that node \
                     {tgt} already applied: the change table was recreated. If its rows were \
                     all applied, run on {tgt}: DELETE FROM walbridge.trigger_progress WHERE \
                     source = '{src}'; DELETE FROM walbridge.trigger_applied WHERE source = \
                     '{src}';",
                    self.config.trigger.table, self.state.last_id
                )));
            }
        }
        self.delete_applied(&[], true).await
    }

    /// One read-apply-delete round. True when more rows may be waiting.
    async fn step(&mut self) -> Result<bool, DirectionError> {
        let batch_size = self.config.trigger.batch_size;
        let (mut rows, snapshot_hold, late_capped) = self.read().await?;
        let ddl_cut = super::ddl::cut_at_ddl(&mut rows);
        if rows.is_empty() {
            // Nothing to apply; still let the hold horizon move on, so `late` shrinks.
            if snapshot_hold > self.state.hold && !self.state.late.is_empty() {
                let (next, left) = self.state.advance(&[], snapshot_hold, false);
                self.commit_progress_only(&next).await?;
                self.state = next;
                self.delete_applied(&left, false).await?;
            }
            self.ctx
                .metrics
                .lag_seconds
                .with_label_values(&[&self.ctx.source, &self.ctx.target])
                .set(0.0);
            self.ctx.report(|s| s.lag_seconds = Some(0.0));
            // Parked tables whose target schema fits again (see apply::park), also right
            // after a start, before any row needs the applier.
            if self.config.replication.on_schema_mismatch == SchemaMismatch::Park {
                self.applier().await?.check_parked().await?;
            }
            self.update_depth(false).await;
            return Ok(false);
        }
        let full = rows.len() >= batch_size;
        let mut items = self.prepare(rows).await?;
        // Rows left out by the cut stay visible in this snapshot: keep the hold horizon, as
        // for capped late rows, so they are read again.
        let keep_hold = late_capped || ddl_cut;
        let txns = self.source_transactions(&mut items);
        // Dead rows go to S before T commits their progress; writing them twice is harmless.
        self.write_dead(&items).await?;
        let handled: Vec<(i64, Option<u64>)> =
            items.iter().map(|i| (i.row.id, i.row.txid)).collect();
        let (next, left) = self.state.advance(&handled, snapshot_hold, keep_hold);
        let covered_all = match self.apply_all(txns, &handled, &next, snapshot_hold).await? {
            Applied::Done(covered_all) => covered_all,
            Applied::Again => {
                // Whatever committed before is in T's progress: read from there, with a new
                // applier, which knows no table: each is described again at its next change.
                self.apply = None;
                self.builder.forget_relations();
                self.state = load_state(&self.t.client, &self.ctx.source)
                    .await
                    .map_err(pg_err(
                        &self.ctx.target,
                        "reading walbridge.trigger_progress",
                    ))?;
                return Ok(true);
            }
        };
        if !covered_all {
            self.commit_progress_only(&next).await?;
        }
        self.after_commit(&items);
        self.state = next;
        let mut candidates: Vec<i64> = handled.iter().map(|(id, _)| *id).collect();
        candidates.extend(left);
        self.delete_applied(&candidates, false).await?;
        if items.iter().any(|i| matches!(i.kind, Kind::Ddl)) {
            // The schema changed: the rows after it meet the target's tables as they are now.
            self.t.load_tables(self.config).await.map_err(|e| {
                DirectionError::caused_by(format!("node {}: {e}", self.ctx.target), &e)
            })?;
        }
        self.update_depth(full || ddl_cut).await;
        Ok(full || late_capped || ddl_cut)
    }

    /// The batch's source transactions (see [`super::events`]); a change whose values the
    /// event model cannot carry becomes a dead row.
    fn source_transactions(&mut self, items: &mut [Item]) -> Vec<super::events::SourceTxn> {
        self.builder.set_read_at(PgTimestamp::now());
        for item in items.iter_mut() {
            match &item.kind {
                Kind::Ddl => self.builder.push_ddl(&item.row),
                Kind::Change(c) => {
                    let skip = self.config.skip_columns_for(&c.table.schema, &c.table.name);
                    if let Err(e) = self.builder.push_change(&item.row, c, skip) {
                        item.kind = Kind::Dead(e.to_string(), e.shown());
                    }
                }
                Kind::Echo | Kind::Dead(..) => {}
            }
        }
        self.builder.take()
    }

    /// Feeds the source transactions to the applier, each with the cursor that covers it and
    /// every row read before it (echo and dead rows included), and waits until T committed
    /// them all. `next` is the batch's cursor after its last row.
    async fn apply_all(
        &mut self,
        txns: Vec<super::events::SourceTxn>,
        handled: &[(i64, Option<u64>)],
        next: &State,
        snapshot_hold: u64,
    ) -> Result<Applied, DirectionError> {
        if txns.is_empty() {
            return Ok(Applied::Done(false));
        }
        let position: HashMap<i64, usize> = handled
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        let source = self.ctx.source.clone();
        let start = self.state.clone();
        let mut covered_all = false;
        let mut outcome = Ok(Outcome::Continue);
        {
            let applier = self.applier().await?;
            for txn in txns {
                let last = txn
                    .rows
                    .iter()
                    .filter_map(|(id, _)| position.get(id))
                    .max()
                    .copied()
                    .unwrap_or(0);
                covered_all = last + 1 == handled.len();
                // Before the batch's end the hold horizon stays: rows of the batch not
                // handled yet must still be read again after a crash.
                let cursor = if covered_all {
                    next.clone()
                } else {
                    start.advance(&handled[..=last], snapshot_hold, true).0
                };
                applier.set_next_position(recorded_progress(&source, &cursor));
                for event in txn.events {
                    outcome = applier.on_event(event, true).await;
                    if !matches!(outcome, Ok(Outcome::Continue)) {
                        break;
                    }
                }
                if !matches!(outcome, Ok(Outcome::Continue)) {
                    break;
                }
            }
            if matches!(outcome, Ok(Outcome::Continue)) {
                outcome = applier.close_group().await;
            }
            // Until T has committed every transaction: replies, and redos after a failure.
            while matches!(outcome, Ok(Outcome::Continue))
                && (!applier.idle() || applier.has_in_flight())
            {
                outcome = if applier.has_redo() {
                    applier.redo_one().await.map(|()| Outcome::Continue)
                } else {
                    applier.on_reply().await
                };
            }
        }
        match outcome {
            Ok(Outcome::Continue) => Ok(Applied::Done(covered_all)),
            Ok(Outcome::Restream) => {
                // A conflict in a transaction too large to redo from memory: read it again
                // and apply it change by change.
                self.careful_start = true;
                Ok(Applied::Again)
            }
            Err(e) => match e.failed_change {
                Some(f) if is_row_error(&f.sqlstate) => {
                    tracing::info!(
                        id = f.source_change_id,
                        sqlstate = %f.sqlstate,
                        "the target refused a change row; reading the batch again without it"
                    );
                    self.refused.insert(f.source_change_id, f.stored_text);
                    Ok(Applied::Again)
                }
                _ => Err(e),
            },
        }
    }

    /// Reads late rows and new rows in one snapshot, and that snapshot's xmin.
    async fn read(&mut self) -> Result<(Vec<RawRow>, u64, bool), DirectionError> {
        let src = self.ctx.source.clone();
        let err = |what: &'static str| pg_err(&src, what);
        let txn = self
            .s
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(err("starting a read"))?;
        let hold: String = txn
            .query_one(
                "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text",
                &[],
            )
            .await
            .map_err(err("reading the snapshot horizon"))?
            .get(0);
        let snapshot_hold = hold.parse::<u64>().unwrap_or(self.state.hold);
        let mut rows = Vec::new();
        let mut late_capped = false;
        if self.state.last_id > 0 {
            let late_ids: Vec<i64> = self.state.late.keys().copied().collect();
            let hold_text = self.state.hold.to_string();
            let late = txn
                .query(
                    &self.s.read_late,
                    &[
                        &hold_text,
                        &self.state.last_id,
                        &late_ids,
                        &(MAX_LATE_ROWS + 1),
                        &self.max_id,
                    ],
                )
                .await
                .map_err(err("reading late rows of the change table"))?;
            late_capped = late.len() as i64 > MAX_LATE_ROWS;
            for r in late.iter().take(MAX_LATE_ROWS as usize) {
                rows.push(raw_row(r).map_err(err("reading the change table"))?);
            }
        }
        let room = self
            .config
            .trigger
            .batch_size
            .saturating_sub(rows.len())
            .max(1) as i64;
        let new = txn
            .query(
                &self.s.read_new,
                &[&self.state.last_id, &room, &self.max_id],
            )
            .await
            .map_err(err("reading the change table"))?;
        for r in &new {
            rows.push(raw_row(r).map_err(err("reading the change table"))?);
        }
        txn.commit().await.map_err(err("ending a read"))?;
        Ok((rows, snapshot_hold, late_capped))
    }

    /// Turns rows into items: echoes, dead rows, changes checked against T's catalog.
    async fn prepare(&mut self, rows: Vec<RawRow>) -> Result<Vec<Item>, DirectionError> {
        let src = self.ctx.source.clone();
        let mut items = Vec::with_capacity(rows.len());
        for row in rows {
            let kind = match row.origin_node.as_deref() {
                Some(o) if o != src => Kind::Echo,
                _ if self.refused.contains_key(&row.id) => {
                    let stored = self.refused.remove(&row.id).unwrap_or_default();
                    Kind::Dead(
                        stored,
                        "the target refused the change; the dead-letter table has the \
                         server's error"
                            .into(),
                    )
                }
                _ if super::ddl::is_ddl(&row) => match super::ddl::parse(&row) {
                    Ok(_) => Kind::Ddl,
                    Err(e) => Kind::Dead(e.clone(), e),
                },
                _ => match self.build(&row).await? {
                    Ok(c) => Kind::Change(Box::new(c)),
                    Err(e) => Kind::Dead(e.to_string(), e.shown()),
                },
            };
            items.push(Item { row, kind });
        }
        Ok(items)
    }

    async fn build(&mut self, row: &RawRow) -> Result<Result<Change, RowError>, DirectionError> {
        let op = match row.metodo.as_deref().map(change::parse_metodo) {
            None => return Ok(Err(RowError::Null("metodo"))),
            Some(Err(e)) => return Ok(Err(e)),
            Some(Ok(op)) => op,
        };
        let Some(tabla) = row.tabla.as_deref() else {
            return Ok(Err(RowError::Null("tabla")));
        };
        let target = self.ctx.target.clone();
        let catalog_err =
            |e: catalog::CatalogError| DirectionError::caused_by(format!("node {target}: {e}"), &e);
        let mut resolved = self.t.resolve(tabla);
        if resolved.is_none() && self.t.tables_loaded.elapsed() > Duration::from_secs(10) {
            // A table created since: look again, at most every ten seconds.
            self.t.load_tables(self.config).await.map_err(catalog_err)?;
            resolved = self.t.resolve(tabla);
        }
        if resolved.is_none() {
            // A replicated table created on the target since (by walbridge.ddl(), whose own
            // change row this direction never sees): read just that one.
            resolved = self
                .t
                .learn_table(self.config, tabla)
                .await
                .map_err(catalog_err)?;
        }
        let Some(table) = resolved else {
            let missing = RowError::UnknownTable {
                tabla: tabla.to_string(),
                target: self.ctx.target.clone(),
            };
            return self.as_on_source(row, op, tabla, missing).await;
        };
        let skip = self.config.skip_columns_for(&table.schema, &table.name);
        let mut built = change::build(row, op, table.clone(), skip);
        if let Err(RowError::UnknownColumn { .. }) = built {
            // A column added since the catalog was read: read this table again, once.
            let fresh = self
                .t
                .refresh(&table.schema, &table.name)
                .await
                .map_err(catalog_err)?;
            if let Some(info) = fresh.filter(|f| f.columns != table.columns) {
                built = change::build(row, op, info, skip);
            }
        }
        match built {
            Err(e @ RowError::UnknownColumn { .. }) => {
                let tabla = format!("{}.{}", table.schema, table.name);
                self.as_on_source(row, op, &tabla, e).await
            }
            other => Ok(other),
        }
    }

    /// A row whose table or column T lacks. When S's table has it, this is a schema mismatch,
    /// not a bad row: the change is described as S's table has it, and the applier meets the
    /// mismatch as in stream mode (`on_schema_mismatch`: parked, or the direction stops
    /// naming the table and column while the rows wait in the change table). When S lacks it
    /// too, the row itself is wrong: dead, with `missing`.
    async fn as_on_source(
        &mut self,
        row: &RawRow,
        op: change::Op,
        tabla: &str,
        missing: RowError,
    ) -> Result<Result<Change, RowError>, DirectionError> {
        let src = self.ctx.source.clone();
        if self.source_tables.is_none() {
            let node = self.config.node(&src).ok_or_else(|| {
                DirectionError::definite(format!("node {src} is not in the configuration"))
            })?;
            let client = pgconn::connect(
                &node.dsn,
                &format!(
                    "walbridge-trigger-source-catalog-{src}-to-{}",
                    self.ctx.target
                ),
            )
            .await
            .map_err(|e| DirectionError::caused_by(format!("node {src}: {e}"), &e))?;
            self.source_tables = Some(Target::open(client, self.config, &src).await?);
        }
        let Some(s) = self.source_tables.as_mut() else {
            return Ok(Err(missing));
        };
        let catalog_err =
            |e: catalog::CatalogError| DirectionError::caused_by(format!("node {src}: {e}"), &e);
        // S's table as it is now (its schema changes too): that one table read again, or,
        // for a name not known yet, all of them (at most every ten seconds).
        let table = match s.resolve(tabla) {
            Some(t) => s.refresh(&t.schema, &t.name).await.map_err(catalog_err)?,
            None => match s
                .learn_table(self.config, tabla)
                .await
                .map_err(catalog_err)?
            {
                Some(t) => Some(t),
                None if s.tables_loaded.elapsed() > Duration::from_secs(10) => {
                    s.load_tables(self.config).await.map_err(catalog_err)?;
                    s.resolve(tabla)
                }
                None => None,
            },
        };
        let Some(table) = table else {
            return Ok(Err(missing));
        };
        let skip = self.config.skip_columns_for(&table.schema, &table.name);
        Ok(change::build(row, op, table, skip).map_err(|_| missing))
    }

    /// Copies the batch's dead rows to S's dead-letter table.
    async fn write_dead(&mut self, items: &[Item]) -> Result<(), DirectionError> {
        for item in items {
            if let Kind::Dead(error, _) = &item.kind {
                self.s
                    .dead(self.config, &item.row, &self.ctx.target, error)
                    .await
                    .map_err(pg_err(&self.ctx.source, "writing the dead-letter table"))?;
            }
        }
        Ok(())
    }

    /// Records `next` on T in a transaction of its own: the batch ended with rows that
    /// needed no applying (echo, dead), or none was read and only the hold horizon moved.
    /// The applier is idle then, so nothing of the batch is still to commit.
    async fn commit_progress_only(&mut self, next: &State) -> Result<(), DirectionError> {
        let (src, tgt) = (self.ctx.source.clone(), self.ctx.target.clone());
        let txn = self
            .t
            .client
            .transaction()
            .await
            .map_err(pg_err(&tgt, "starting a transaction"))?;
        record_progress(&txn, &src, next)
            .await
            .map_err(pg_err(&tgt, "recording progress"))?;
        txn.commit().await.map_err(pg_err(&tgt, "committing"))
    }

    /// Bookkeeping after T committed the batch: the failpoint, what the applier does not
    /// count (dead rows, echoes, the lag), and the status board.
    fn after_commit(&mut self, items: &[Item]) {
        if self.failpoint {
            tracing::error!(
                "failpoint {FAILPOINT_AFTER_COMMIT}: aborting after the commit on the target"
            );
            std::process::abort();
        }
        let (src, tgt) = (self.ctx.source.clone(), self.ctx.target.clone());
        let m = &self.ctx.metrics;
        let mut echoes = 0u64;
        for item in items {
            match &item.kind {
                Kind::Dead(_, shown) => {
                    m.trigger_dead_rows.with_label_values(&[&src]).inc();
                    m.errors
                        .with_label_values(&[&src, &tgt, "trigger_row"])
                        .inc();
                    tracing::warn!(
                        id = item.row.id,
                        tabla = ?item.row.tabla,
                        error = %shown,
                        "moved a change row to the dead-letter table"
                    );
                }
                Kind::Echo => echoes += 1,
                Kind::Change(_) | Kind::Ddl => {}
            }
        }
        // Counted once per source, by its first direction.
        if echoes > 0 && self.peers.first() == Some(&tgt) {
            m.echo_suppressed.with_label_values(&[&src]).inc_by(echoes);
        }
        let times = items
            .iter()
            .filter(|i| matches!(i.kind, Kind::Change(_) | Kind::Ddl));
        if let Some(t) = times.filter_map(|i| i.row.time()).max() {
            let lag = t.seconds_until(PgTimestamp::now()).max(0.0);
            m.lag_seconds.with_label_values(&[&src, &tgt]).set(lag);
            self.ctx.report(|s| s.lag_seconds = Some(lag));
        }
        let applied = m
            .transactions_applied
            .with_label_values(&[&src, &tgt])
            .get();
        self.ctx.report(|s| {
            s.transactions_applied = applied;
            s.state = DirectionState::Streaming;
        });
        tracing::debug!(rows = items.len(), "batch applied");
        self.handled += items.len() as u64;
    }

    /// Deletes at S the rows that every peer has applied, among `candidates` (at start:
    /// among every row up to `last_id`).
    async fn delete_applied(
        &mut self,
        candidates: &[i64],
        startup: bool,
    ) -> Result<(), DirectionError> {
        let (src, tgt) = (self.ctx.source.clone(), self.ctx.target.clone());
        let others: Vec<String> = self.peers.iter().filter(|p| **p != tgt).cloned().collect();
        cursor::delete_applied(
            &mut self.s.client,
            &self.config.trigger.table,
            self.s.table_oid,
            &self.state,
            candidates,
            startup,
            &tgt,
            &others,
        )
        .await
        .map_err(|(what, e)| pg_fail(&src, what, &e))
    }

    /// `walbridge_trigger_queue_depth{node=S}`: rows in S's change table, counted at most
    /// every five seconds while draining a backlog, every second otherwise.
    async fn update_depth(&mut self, busy: bool) {
        let every = Duration::from_secs(if busy { 5 } else { 1 });
        if self.depth_checked.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.depth_checked = Some(Instant::now());
        let sql = format!(
            "SELECT count(*) FROM {}",
            self.config.trigger.table.quoted()
        );
        if let Ok(row) = self.s.client.query_one(&sql, &[]).await {
            let depth: i64 = row.get(0);
            let src = self.ctx.source.clone();
            self.ctx
                .metrics
                .trigger_queue_depth
                .with_label_values(&[&src])
                .set(depth);
            self.ctx.status.node(&src, |n| {
                n.trigger_queue_depth = Some(depth);
                n.mode = "trigger".into();
            });
        }
    }
}

impl Source {
    async fn open(
        client: Client,
        notifications: mpsc::Receiver<tokio_postgres::Notification>,
        config: &Config,
        node: &str,
    ) -> Result<Source, DirectionError> {
        let table = &config.trigger.table;
        let err = |what: &'static str| pg_err(node, what);
        let row = client
            .query_opt(
                "SELECT c.oid,
                        (SELECT count(*) FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid = c.oid AND NOT a.attisdropped
                            AND a.attname IN ('id', 'metodo', 'tabla', 'descripcion',
                                              'origin_node', 'txid', 'created_at', 'old_key'))
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.schema, &table.name],
            )
            .await
            .map_err(err("looking up the change table"))?;
        let Some(row) = row else {
            return Err(DirectionError::definite(format!(
                "node {node}: the change table {table} does not exist; run walbridge setup"
            )));
        };
        let (oid, columns): (u32, i64) = (row.get(0), row.get(1));
        if columns < 8 {
            return Err(DirectionError::definite(format!(
                "node {node}: the change table {table} lacks walbridge's columns (origin_node, \
                 txid, created_at, old_key); run walbridge setup"
            )));
        }
        let commit_ts = track_commit_timestamp(&client)
            .await
            .map_err(err("reading track_commit_timestamp"))?;
        let channel = sql::channel(&config.replication.slot_prefix);
        client
            .batch_execute(&format!("LISTEN {}", catalog::quote_ident(&channel)))
            .await
            .map_err(err("listening for change notifications"))?;
        let commit_expr = if commit_ts {
            "CASE WHEN c.txid IS NOT NULL AND pg_catalog.pg_xact_status(c.txid) = 'committed' \
                  THEN pg_catalog.pg_xact_commit_timestamp(c.txid::xid) END"
        } else {
            "NULL::timestamptz"
        };
        let cols = format!(
            "SELECT c.id::int8, c.metodo::text, c.tabla::text, c.descripcion::text, \
                    c.origin_node::text, c.txid::text, {commit_expr}, c.created_at, \
                    c.old_key::text \
               FROM {} AS c",
            table.quoted()
        );
        let read_late = client
            .prepare(&format!(
                "{cols} WHERE c.txid >= $1::text::xid8 AND c.id <= $2::int8 \
                   AND c.id <> ALL($3::int8[]) AND c.id <= $5::int8 ORDER BY c.id LIMIT $4::int8"
            ))
            .await
            .map_err(err("preparing the change-table reads"))?;
        let read_new = client
            .prepare(&format!(
                "{cols} WHERE c.id > $1::int8 AND c.id <= $3::int8 ORDER BY c.id LIMIT $2::int8"
            ))
            .await
            .map_err(err("preparing the change-table reads"))?;
        Ok(Source {
            client,
            notifications,
            read_late,
            read_new,
            table_oid: oid,
        })
    }

    /// Copies a row that cannot be applied to the dead-letter table, with the error.
    async fn dead(
        &self,
        config: &Config,
        row: &RawRow,
        target: &str,
        error: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        let sql = format!(
            "INSERT INTO {} (id, target_node, metodo, tabla, descripcion, origin_node, txid, \
                             created_at, old_key, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7::text::xid8, $8, $9::text::jsonb, $10) \
             ON CONFLICT (id, target_node) DO UPDATE \
                SET error = EXCLUDED.error, failed_at = pg_catalog.clock_timestamp()",
            config.trigger.dead_table().quoted()
        );
        let txid = row.txid.map(|t| t.to_string());
        let created = row.created_at.and_then(|t| t.to_datetime());
        // old_key is walbridge's jsonb column; anything else is kept as text elsewhere.
        self.client
            .execute(
                &sql,
                &[
                    &row.id,
                    &target,
                    &row.metodo,
                    &row.tabla,
                    &row.descripcion,
                    &row.origin_node,
                    &txid,
                    &created,
                    &row.old_key,
                    &error,
                ],
            )
            .await
    }
}

impl Target {
    async fn open(client: Client, config: &Config, node: &str) -> Result<Target, DirectionError> {
        let err = |what: &'static str| pg_err(node, what);
        // This session only reads the catalog and the progress, and records progress when a
        // batch ends with rows that needed no applying: that commit must be on T's disk
        // before S deletes the rows (see `crate::apply::ApplyLimits::durable_commits`).
        client
            .batch_execute(
                "SET walbridge.skip = 'on';
                 SELECT pg_catalog.set_config('synchronous_commit', 'on', false)
                  WHERE pg_catalog.current_setting('synchronous_commit') = 'off'",
            )
            .await
            .map_err(err("setting up the catalog session"))?;
        let search_path = default_search_path(&client)
            .await
            .map_err(err("reading the role's default search_path"))?;
        let mut t = Target {
            client,
            search_path,
            tables: BTreeMap::new(),
            tables_loaded: Instant::now(),
        };
        t.load_tables(config)
            .await
            .map_err(|e| DirectionError::caused_by(format!("node {node}: {e}"), &e))?;
        Ok(t)
    }

    /// The replicated tables present on the target.
    async fn load_tables(&mut self, config: &Config) -> Result<(), catalog::CatalogError> {
        let mut tables = BTreeMap::new();
        for t in catalog::list_tables(&self.client).await? {
            if !config.replication.tables.matches(&t.schema, &t.name) {
                continue;
            }
            if let Some(info) = catalog::table_info(&self.client, &t.schema, &t.name).await? {
                tables.insert((t.schema, t.name), Arc::new(info));
            }
        }
        self.tables = tables;
        self.tables_loaded = Instant::now();
        Ok(())
    }

    /// Reads `schema.table` again (its columns may have changed); `None` when it is gone.
    async fn refresh(
        &mut self,
        schema: &str,
        name: &str,
    ) -> Result<Option<Arc<TableInfo>>, catalog::CatalogError> {
        let key = (schema.to_string(), name.to_string());
        match catalog::table_info(&self.client, schema, name).await? {
            Some(info) => {
                let info = Arc::new(info);
                self.tables.insert(key, info.clone());
                Ok(Some(info))
            }
            None => {
                self.tables.remove(&key);
                Ok(None)
            }
        }
    }

    /// Looks up a `schema.table` that matches the selection but is not known yet.
    async fn learn_table(
        &mut self,
        config: &Config,
        tabla: &str,
    ) -> Result<Option<Arc<TableInfo>>, catalog::CatalogError> {
        let Some((schema, name)) = tabla.split_once('.') else {
            return Ok(None);
        };
        if !config.replication.tables.matches(schema, name) {
            return Ok(None);
        }
        let Some(info) = catalog::table_info(&self.client, schema, name).await? else {
            return Ok(None);
        };
        let info = Arc::new(info);
        self.tables
            .insert((schema.to_string(), name.to_string()), info.clone());
        Ok(Some(info))
    }

    fn resolve(&self, tabla: &str) -> Option<Arc<TableInfo>> {
        let (schema, name) = change::resolve_tabla(
            tabla,
            |s, n| self.tables.contains_key(&(s.to_string(), n.to_string())),
            &self.search_path,
        )?;
        self.tables.get(&(schema, name)).cloned()
    }
}

/// The schemas a bare `tabla` is looked up in, in order: the `search_path` the role would
/// have without walbridge's pinned one (`ALTER ROLE ... IN DATABASE`, `ALTER ROLE`, `ALTER
/// DATABASE ... SET search_path`, else the server's built-in default), expanded by
/// PostgreSQL itself (`$user`, schemas that do not exist dropped) in a transaction that is
/// rolled back. Only names are read: nothing is resolved through that path.
async fn default_search_path(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    let path = async {
        client
            .query_one(
                "SELECT pg_catalog.set_config('search_path', COALESCE(
                    (SELECT pg_catalog.substr(c, 13)
                       FROM pg_catalog.pg_db_role_setting s
                      CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS c
                      WHERE c LIKE 'search\\_path=%'
                        AND s.setrole IN (0, (SELECT r.oid FROM pg_catalog.pg_roles r
                                               WHERE r.rolname = current_user))
                        AND s.setdatabase IN (0, (SELECT d.oid FROM pg_catalog.pg_database d
                                 WHERE d.datname = pg_catalog.current_database()))
                      ORDER BY s.setrole = 0, s.setdatabase = 0
                      LIMIT 1),
                    (SELECT boot_val FROM pg_catalog.pg_settings WHERE name = 'search_path')),
                    true)",
                &[],
            )
            .await?;
        client
            .query_one("SELECT pg_catalog.current_schemas(false)::text[]", &[])
            .await
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    Ok(path?.get(0))
}

async fn track_commit_timestamp(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT pg_catalog.current_setting('track_commit_timestamp') = 'on'",
            &[],
        )
        .await?
        .get(0))
}

fn raw_row(r: &tokio_postgres::Row) -> Result<RawRow, tokio_postgres::Error> {
    let txid: Option<String> = r.try_get(5)?;
    let commit: Option<DateTime<Utc>> = r.try_get(6)?;
    let created: Option<DateTime<Utc>> = r.try_get(7)?;
    Ok(RawRow {
        id: r.try_get(0)?,
        metodo: r.try_get(1)?,
        tabla: r.try_get(2)?,
        descripcion: r.try_get(3)?,
        origin_node: r.try_get(4)?,
        txid: txid.and_then(|t| t.parse().ok()),
        commit_time: commit.map(PgTimestamp::from_datetime),
        created_at: created.map(PgTimestamp::from_datetime),
        old_key: r.try_get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_errors_are_told_from_target_errors() {
        for code in ["22P02", "23505", "23502", "42703", "P0001", "22001"] {
            assert!(is_row_error(code), "{code}");
        }
        for code in ["42501", "25006", "53100", "XX000", "57P01"] {
            assert!(!is_row_error(code), "{code}");
        }
    }
}
