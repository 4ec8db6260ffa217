//! The worker of one direction S → T: reads S's change table, applies to T, deletes at S.
//!
//! ```text
//!          LISTEN <prefix>_changes / poll_interval
//!   S ──────────────────────────────▶ worker
//!   │ read (REPEATABLE READ):                │ apply (one transaction on T):
//!   │  new rows   id > last_id  LIMIT n      │  SET replica role, walbridge.skip, origin,
//!   │                                        │      synchronous_commit on (never off)
//!   │  late rows  txid >= hold_xid, id <=    │  lookups (pipelined, FOR UPDATE)
//!   │             last_id, not yet applied   │  conflict::decide per change
//!   │                                        │  writes (pipelined)
//!   │ ◀── dead rows (before T commits) ──────│  progress: last_id, hold_xid, late ids
//!   │ ◀── delete applied rows (after) ───────│  COMMIT
//! ```
//!
//! See the module docs of [`crate::trigger`] for why progress is `(last_id, hold_xid)` plus
//! a small set of ids rather than a single id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, Statement};

use crate::catalog::{self, TableInfo};
use crate::config::{Config, ConflictPolicy};
use crate::conflict::{self, Action, Incoming, LocalState, Version};
use crate::direction::{DirectionContext, DirectionError, DirectionState, ErrorClass};
use crate::event::ChangeOp;
use crate::lsn::PgTimestamp;
use crate::pgconn;
use crate::pgconn::pg_message;

use super::change::{self, Change, Op, RawRow, RowError};
use super::cursor::{self, load_state, record_progress, State};
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
    Ddl(Box<crate::event::SchemaChange>),
}

/// What went wrong inside one apply attempt.
enum Attempt {
    /// The item at this index failed on its own; the others may go on.
    Row(usize, String, String, Option<String>),
    /// The whole direction must stop or retry.
    Fatal(DirectionError),
}

/// The worker's view of the target.
struct Target {
    client: Client,
    commit_ts: bool,
    origin_ok: bool,
    /// roident → node name, for the writer of a row version.
    origins: HashMap<u32, String>,
    search_path: Vec<String>,
    tables: BTreeMap<(String, String), Arc<TableInfo>>,
    tables_loaded: Instant,
    statements: HashMap<String, Statement>,
}

/// The worker's view of the source.
struct Source {
    client: Client,
    notifications: mpsc::Receiver<tokio_postgres::Notification>,
    read_late: Statement,
    read_new: Statement,
    table_oid: u32,
}

/// One direction's worker.
struct Worker<'a> {
    ctx: &'a DirectionContext,
    config: &'a Config,
    s: Source,
    t: Target,
    state: State,
    peers: Vec<String>,
    failpoint: bool,
    depth_checked: Option<Instant>,
    /// Rows with a larger id are left alone (the cut-over drains up to its fence).
    max_id: i64,
    /// Change rows handled since start.
    handled: u64,
}

/// A direction error from a server error: transient or definite by its SQLSTATE.
fn pg_fail(node: &str, what: &str, e: &tokio_postgres::Error) -> DirectionError {
    let text = format!("node {node}: {what}: {}", pg_message(e));
    match classify(e) {
        ErrorClass::Transient => DirectionError::transient(text),
        ErrorClass::Definite => DirectionError::definite(text),
    }
}

fn pg_err(node: &str, what: &str) -> impl FnOnce(tokio_postgres::Error) -> DirectionError {
    let (node, what) = (node.to_string(), what.to_string());
    move |e| pg_fail(&node, &what, &e)
}

fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    crate::direction::Classify::class(e)
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

/// The outcome of a failed statement inside an apply attempt for item `i`: `None` for the
/// "transaction is aborted" echo of an earlier failure.
fn row_failure(i: usize, e: &tokio_postgres::Error, node: &str, what: &str) -> Option<Attempt> {
    match e.as_db_error() {
        Some(db) if db.code().code() == "25P02" => None,
        Some(db) if is_row_error(db.code().code()) => Some(Attempt::Row(
            i,
            crate::pgconn::pg_message_with_values(e),
            pg_message(e),
            Some(db.code().code().to_string()),
        )),
        _ => Some(Attempt::Fatal(pg_fail(node, what, e))),
    }
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
        // point: T's transaction either committed with its progress or not at all, and S's
        // rows are deleted only after.
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
                let text = format!("node {name}: {e}");
                if e.is_transient() {
                    DirectionError::transient(text)
                } else {
                    DirectionError::definite(text)
                }
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
            &format!("walbridge-trigger-apply-{src}-to-{tgt}"),
        )
        .await
        .map_err(connect_err(tgt))?;

        // Why the source is in trigger mode, for `status`.
        if let Ok(m) = super::mode::node_mode(config, src, &s_client).await {
            ctx.report(|s| s.mode_reason = Some(m.reason));
        }
        let s = Source::open(s_client, rx, config, src).await?;
        let t = Target::open(t_client, config, src, tgt).await?;
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
            state: State::default(),
            peers,
            failpoint: std::env::var("WALBRIDGE_FAILPOINT").as_deref()
                == Ok(FAILPOINT_AFTER_COMMIT),
            depth_checked: None,
            max_id: i64::MAX,
            handled: 0,
        })
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
        let started = Instant::now();
        let batch_size = self.config.trigger.batch_size;
        let (mut rows, snapshot_hold, late_capped) = self.read().await?;
        let ddl_cut = super::ddl::cut_at_ddl(&mut rows);
        if rows.is_empty() {
            // Nothing to apply; still let the hold horizon move on, so `late` shrinks.
            if snapshot_hold > self.state.hold && !self.state.late.is_empty() {
                self.commit_progress_only(snapshot_hold).await?;
            }
            self.ctx
                .metrics
                .lag_seconds
                .with_label_values(&[&self.ctx.source, &self.ctx.target])
                .set(0.0);
            self.ctx.report(|s| s.lag_seconds = Some(0.0));
            self.update_depth(false).await;
            return Ok(false);
        }
        let full = rows.len() >= batch_size;
        let mut items = self.prepare(rows).await?;
        // Rows left out by the cut stay visible in this snapshot: keep the hold horizon, as
        // for capped late rows, so they are read again.
        let cut = cut_at_stamp(&mut items, self.config.nodes.len()) | ddl_cut;
        let outcome = self
            .apply(&mut items, snapshot_hold, late_capped || cut)
            .await?;
        let truncated = outcome.truncated;
        self.after_commit(&items, outcome, started).await?;
        if items.iter().any(|i| matches!(i.kind, Kind::Ddl(_))) {
            // The schema changed: the rows after it meet the target's tables as they are now.
            self.t
                .load_tables(self.config)
                .await
                .map_err(|e| DirectionError::transient(format!("node {}: {e}", self.ctx.target)))?;
        }
        self.update_depth(full || truncated || cut).await;
        Ok(full || truncated || late_capped || cut)
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
                _ if super::ddl::is_ddl(&row) => match super::ddl::parse(&row) {
                    Ok(d) => Kind::Ddl(Box::new(d)),
                    Err(e) => Kind::Dead(e.clone(), e),
                },
                _ => match self.build(&row).await? {
                    Ok(c) => Kind::Change(Box::new(c)),
                    Err(e) => Kind::Dead(e.to_string(), e.to_string()),
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
        let mut resolved = self.t.resolve(tabla);
        if resolved.is_none() && self.t.tables_loaded.elapsed() > Duration::from_secs(10) {
            // A table created since: look again, at most every ten seconds.
            self.t
                .load_tables(self.config)
                .await
                .map_err(|e| DirectionError::transient(format!("node {}: {e}", self.ctx.target)))?;
            resolved = self.t.resolve(tabla);
        }
        if resolved.is_none() {
            // A replicated table created on the target since (by walbridge.ddl(), whose own
            // change row this direction never sees): read just that one.
            resolved =
                self.t.learn_table(self.config, tabla).await.map_err(|e| {
                    DirectionError::transient(format!("node {}: {e}", self.ctx.target))
                })?;
        }
        let Some(table) = resolved else {
            return Ok(Err(RowError::UnknownTable {
                tabla: tabla.to_string(),
                target: self.ctx.target.clone(),
            }));
        };
        let skip = self.config.skip_columns_for(&table.schema, &table.name);
        let built = change::build(row, op, table.clone(), skip);
        if let Err(RowError::UnknownColumn { .. }) = built {
            // A column added since the catalog was read: read this table again, once.
            let fresh = catalog::table_info(&self.t.client, &table.schema, &table.name)
                .await
                .map_err(|e| DirectionError::transient(format!("node {}: {e}", self.ctx.target)))?;
            if let Some(info) = fresh.filter(|f| f.columns != table.columns) {
                let info = Arc::new(info);
                self.t
                    .tables
                    .insert((info.schema.clone(), info.name.clone()), info.clone());
                self.t.statements.clear();
                return Ok(change::build(row, op, info, skip));
            }
        }
        Ok(built)
    }

    /// Applies the items in one transaction on T. A row that fails alone is marked dead and
    /// the batch is cut after it (the rows after it come in the next step, so every attempt
    /// makes progress and no row runs more than twice).
    async fn apply(
        &mut self,
        items: &mut Vec<Item>,
        snapshot_hold: u64,
        late_capped: bool,
    ) -> Result<Outcome, DirectionError> {
        let mut truncated = false;
        let mut retried: HashSet<i64> = HashSet::new();
        loop {
            // With a cut batch or capped late rows, some rows visible in this snapshot were
            // not handled: the hold horizon must stay where it was so they are read again.
            let keep_hold = truncated || late_capped;
            match self.try_apply(items, snapshot_hold, keep_hold).await {
                Ok((next, left, applied)) => {
                    return Ok(Outcome {
                        next,
                        left,
                        applied,
                        truncated,
                    })
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Row(i, message, shown, code)) => {
                    let Some(item) = items.get_mut(i) else {
                        return Err(DirectionError::transient(shown));
                    };
                    // A unique violation may be a local insert racing ours: read again once.
                    if code.as_deref() == Some("23505") && retried.insert(item.row.id) {
                        continue;
                    }
                    item.kind = Kind::Dead(message, shown);
                    items.truncate(i + 1);
                    truncated = true;
                }
            }
        }
    }

    async fn try_apply(
        &mut self,
        items: &[Item],
        snapshot_hold: u64,
        keep_hold: bool,
    ) -> Result<(State, Vec<i64>, usize), Attempt> {
        let (src, tgt) = (self.ctx.source.clone(), self.ctx.target.clone());
        let fatal = |what: &'static str| {
            let tgt = tgt.clone();
            move |e: tokio_postgres::Error| Attempt::Fatal(pg_fail(&tgt, what, &e))
        };
        // Statements first (each prepared once per connection).
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            plans.push(match &item.kind {
                // A statement that cannot be prepared (the table was dropped, a key type has
                // no equality) is that row's failure.
                Kind::Change(c) => match self.t.plan(c).await {
                    Ok(plan) => Some(plan),
                    Err(e) => {
                        return Err(row_failure(i, &e, &tgt, "preparing a statement")
                            .unwrap_or_else(|| fatal("preparing a statement")(e)))
                    }
                },
                _ => None,
            });
        }
        let conflict_stmt =
            self.t
                .statement(sql::CONFLICT_SQL)
                .await
                .map_err(|e| match e.as_db_error() {
                    Some(db) if conflict::journal_outdated(db.code().code()) => {
                        Attempt::Fatal(DirectionError::definite(format!(
                        "node {tgt}: preparing the conflict journal's statement failed ({}): {}",
                        db.message(),
                        conflict::JOURNAL_OUTDATED_FIX
                    )))
                    }
                    _ => fatal("preparing a statement")(e),
                })?;

        let txn = self
            .t
            .client
            .transaction()
            .await
            .map_err(fatal("starting a transaction"))?;
        // With three or more nodes, take turns with the other appliers to T first (see
        // `conflict::SERIALIZE_APPLIERS_SQL`).
        if conflict::appliers_take_turns(self.config.nodes.len(), self.config.uses_node_priority())
        {
            txn.execute(conflict::SERIALIZE_APPLIERS_SQL, &[])
                .await
                .map_err(fatal("waiting for the other appliers to this node"))?;
        }
        // Stamp the transaction with the source's commit time (the latest of the batch; with
        // three or more nodes the only one, see `cut_at_stamp`), so last-write-wins on T
        // compares real times and T's decoding sees the origin.
        let newest = items
            .iter()
            .filter(|i| matches!(i.kind, Kind::Change(_)))
            .filter_map(|i| i.row.time())
            .max()
            .and_then(|t| t.to_datetime());
        if let (true, Some(ts)) = (self.t.origin_ok, newest) {
            txn.execute(
                "SELECT pg_catalog.pg_replication_origin_xact_setup('0/0', $1)",
                &[&ts],
            )
            .await
            .map_err(fatal(
                "stamping the transaction with the source commit time",
            ))?;
        }

        // A schema change is alone in its batch (see `super::ddl`).
        for item in items {
            if let Kind::Ddl(d) = &item.kind {
                txn.execute(
                    crate::event::SchemaChange::APPLY_SQL,
                    &[&d.search_path, &d.statement],
                )
                .await
                .map_err(|e| Attempt::Fatal(super::ddl::failed(&src, &tgt, d, &pg_message(&e))))?;
                tracing::info!(
                    source = %src, target = %tgt, statement = %d.statement,
                    "schema change applied"
                );
            }
        }

        // 1. Lookups, pipelined: the target's row (locked) and tombstone of every key.
        let mut lookups: Vec<(usize, (u32, String), &Statement)> = Vec::new();
        let mut seen_keys: HashSet<(u32, String)> = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let (Kind::Change(c), Some(Some(plan))) = (&item.kind, plans.get(i)) else {
                continue;
            };
            if let Some(stmt) = &plan.lookup {
                let key = (c.table.oid, c.key_json.clone());
                if seen_keys.insert(key.clone()) {
                    lookups.push((i, key, stmt));
                }
            }
        }
        let results = futures::future::join_all(lookups.iter().map(|(_, (_, key), stmt)| {
            let txn = &txn;
            async move { txn.query_opt(*stmt, &[key as &(dyn ToSql + Sync)]).await }
        }))
        .await;
        let mut known: HashMap<(u32, String), Local> = HashMap::new();
        for ((i, key, _), result) in lookups.iter().zip(results) {
            match result {
                Ok(row) => {
                    known.insert(key.clone(), local_state(&self.t.origins, row.as_ref()));
                }
                Err(e) => {
                    if let Some(f) = row_failure(*i, &e, &tgt, "reading the target row") {
                        return Err(f);
                    }
                }
            }
        }

        // 2. Decisions, in id order, each seeing the effect of the ones before.
        let src_rank = self.config.node_rank(&src);
        let mut ops: Vec<(usize, Statement, Vec<Param>)> = Vec::new();
        let mut applied = 0usize;
        for (i, item) in items.iter().enumerate() {
            let (Kind::Change(c), Some(Some(plan))) = (&item.kind, plans.get(i)) else {
                continue;
            };
            if c.op == Op::Truncate {
                known.retain(|(oid, _), _| *oid != c.table.oid);
                if let Some(s) = &plan.truncate {
                    ops.push((i, s.clone(), Vec::new()));
                    applied += 1;
                }
                continue;
            }
            let key = (c.table.oid, c.key_json.clone());
            let local = if plan.lookup.is_some() {
                known.get(&key).cloned().unwrap_or_default()
            } else {
                Local::default()
            };
            let op = match c.op {
                Op::Insert => ChangeOp::Insert,
                Op::Update => ChangeOp::Update,
                Op::Delete | Op::Truncate => ChangeOp::Delete,
            };
            let time = item.row.time();
            // Without a lookup (a table without a unique key) there is no version to compare:
            // the change is applied as it comes.
            let decision = if plan.lookup.is_none() {
                conflict::Decision {
                    conflict: None,
                    action: match c.op {
                        Op::Insert => Action::Insert,
                        Op::Update => Action::Update,
                        Op::Delete | Op::Truncate => Action::Delete,
                    },
                }
            } else {
                conflict::decide(
                    self.config
                        .conflict_policy_for(&c.table.schema, &c.table.name),
                    Incoming {
                        op,
                        version: Version {
                            commit_time: time,
                            writer_rank: src_rank,
                        },
                        complete_row: c.op != Op::Update || c.complete,
                    },
                    LocalState {
                        row: local.row.as_ref().map(|r| r.version(self.config, &tgt)),
                        row_equals_old: None,
                        tombstone: local
                            .tombstone
                            .as_ref()
                            .map(|r| r.version(self.config, &tgt)),
                    },
                )
            };
            if let Some((kind, resolution)) = decision.conflict {
                self.ctx
                    .metrics
                    .conflicts
                    .with_label_values(&[&src, &tgt, kind.as_str(), resolution.as_str()])
                    .inc();
                let local_ts = local
                    .row
                    .as_ref()
                    .or(local.tombstone.as_ref())
                    .and_then(|r| r.time);
                let facts = journal_facts(self.config, self.ctx, c, &local, time);
                ops.push((
                    i,
                    conflict_stmt.clone(),
                    vec![
                        Param::Text(Some(src.clone())),
                        Param::Text(Some(tgt.clone())),
                        Param::Text(Some(c.table.qualified_name())),
                        Param::Text(Some(c.key_array.clone())),
                        Param::Text(Some(kind.as_str().to_string())),
                        Param::Text(Some(resolution.as_str().to_string())),
                        Param::Text(local.row.as_ref().and_then(|r| r.json.clone())),
                        Param::Text(Some(facts.remote_row)),
                        Param::Time(local_ts),
                        Param::Time(time.and_then(|t| t.to_datetime())),
                        Param::Text(Some(facts.policy.as_str().to_string())),
                        Param::Text(facts.local_writer),
                        Param::Text(Some(facts.local_tombstone.to_string())),
                        Param::Text(Some((c.op != Op::Update || c.complete).to_string())),
                        Param::Text(Some(facts.ambiguous.to_string())),
                        Param::Text(Some(c.id.to_string())),
                        Param::Text(Some(facts.priority)),
                        Param::Text(Some(facts.unsent)),
                        Param::Text(Some(
                            self.config.replication.conflict_max_row_bytes.to_string(),
                        )),
                    ],
                ));
            }
            let row = || Param::Text(Some(c.row_json.clone()));
            let key_param = || Param::Text(Some(c.key_json.clone()));
            let write = match decision.action {
                Action::Insert | Action::InsertFromUpdate => {
                    plan.insert.as_ref().map(|s| (s, vec![row()]))
                }
                Action::Update => plan.update.as_ref().map(|s| (s, vec![row(), key_param()])),
                Action::Delete => plan.delete.as_ref().map(|s| (s, vec![key_param()])),
                Action::RecordTombstone => plan.tombstone.as_ref().map(|s| (s, vec![key_param()])),
                Action::Skip => None,
                Action::Stop => {
                    let kind = decision.conflict.map_or("conflict", |(k, _)| k.as_str());
                    return Err(Attempt::Fatal(DirectionError::definite(format!(
                        "conflict {kind} on node {tgt}, table {} key {} (change row {} of node \
                         {src}): replication.conflict is \"error\", so this direction stops; \
                         resolve the row by hand, then restart walbridge",
                        c.table.qualified_name(),
                        crate::telemetry::shown_row(&c.key_array),
                        c.id
                    ))));
                }
            };
            if let Some((stmt, params)) = write {
                ops.push((i, stmt.clone(), params));
                applied += 1;
            }
            // What T holds for the key after this change.
            let mine = Some(Seen {
                json: Some(c.row_json.clone()),
                time: time.and_then(|t| t.to_datetime()),
                writer: Some(src.clone()),
            });
            match decision.action {
                Action::Insert | Action::Update | Action::InsertFromUpdate => {
                    if let Some(new_key) = &c.new_key_json {
                        known.insert(key, Local::default());
                        known.insert(
                            (c.table.oid, new_key.clone()),
                            Local {
                                row: mine,
                                tombstone: None,
                            },
                        );
                    } else {
                        known.insert(
                            key,
                            Local {
                                row: mine,
                                tombstone: None,
                            },
                        );
                    }
                }
                Action::Delete | Action::RecordTombstone => {
                    known.insert(
                        key,
                        Local {
                            row: None,
                            tombstone: mine,
                        },
                    );
                }
                Action::Skip | Action::Stop => {}
            }
        }

        // 3. Writes and conflict records, pipelined.
        let results = futures::future::join_all(ops.iter().map(|(_, stmt, params)| {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::as_sql).collect();
            let txn = &txn;
            async move { txn.execute(stmt, &refs).await }
        }))
        .await;
        for ((i, _, _), r) in ops.iter().zip(results) {
            if let Err(e) = r {
                if let Some(f) = row_failure(*i, &e, &tgt, "applying a change") {
                    return Err(f);
                }
            }
        }

        // 4. Dead rows go to S before T commits; writing them twice is harmless.
        for item in items {
            if let Kind::Dead(error, _) = &item.kind {
                self.s
                    .dead(self.config, &item.row, &tgt, error)
                    .await
                    .map_err(|e| {
                        Attempt::Fatal(pg_fail(&src, "writing the dead-letter table", &e))
                    })?;
            }
        }

        // 5. Progress, in the same transaction as the data.
        let handled: Vec<(i64, Option<u64>)> =
            items.iter().map(|i| (i.row.id, i.row.txid)).collect();
        let (next, left) = self.state.advance(&handled, snapshot_hold, keep_hold);
        record_progress(&txn, &src, &next)
            .await
            .map_err(fatal("recording progress in walbridge.trigger_progress"))?;
        txn.commit().await.map_err(fatal("committing"))?;
        Ok((next, left, applied))
    }

    /// Bookkeeping after T committed: the failpoint, metrics, then deletion at S.
    async fn after_commit(
        &mut self,
        items: &[Item],
        outcome: Outcome,
        started: Instant,
    ) -> Result<(), DirectionError> {
        if self.failpoint {
            tracing::error!(
                "failpoint {FAILPOINT_AFTER_COMMIT}: aborting after the commit on the target"
            );
            std::process::abort();
        }
        let (src, tgt) = (self.ctx.source.clone(), self.ctx.target.clone());
        let m = &self.ctx.metrics;
        let mut txids = HashSet::new();
        let mut echoes = 0u64;
        for item in items {
            match &item.kind {
                Kind::Change(c) => {
                    m.changes_applied
                        .with_label_values(&[&src, &tgt, &c.table.qualified_name(), c.op.as_str()])
                        .inc();
                    txids.insert(item.row.txid.unwrap_or(item.row.id as u64));
                }
                Kind::Dead(_, error) => {
                    m.trigger_dead_rows.with_label_values(&[&src]).inc();
                    m.errors
                        .with_label_values(&[&src, &tgt, "trigger_row"])
                        .inc();
                    tracing::warn!(
                        id = item.row.id,
                        tabla = ?item.row.tabla,
                        error = %error,
                        "moved a change row to the dead-letter table"
                    );
                }
                Kind::Echo => echoes += 1,
                Kind::Ddl(_) => {
                    txids.insert(item.row.txid.unwrap_or(item.row.id as u64));
                }
            }
        }
        // Counted once per source, by its first direction.
        if echoes > 0 && self.peers.first() == Some(&tgt) {
            m.echo_suppressed.with_label_values(&[&src]).inc_by(echoes);
        }
        let n = txids.len() as u64;
        m.transactions_applied
            .with_label_values(&[&src, &tgt])
            .inc_by(n);
        m.apply_duration
            .with_label_values(&[&src, &tgt])
            .observe(started.elapsed().as_secs_f64());
        if let Some(t) = items.iter().filter_map(|i| i.row.time()).max() {
            let lag = t.seconds_until(PgTimestamp::now()).max(0.0);
            m.lag_seconds.with_label_values(&[&src, &tgt]).set(lag);
            self.ctx.report(|s| s.lag_seconds = Some(lag));
        }
        self.ctx.report(|s| {
            s.transactions_applied += n;
            s.state = DirectionState::Streaming;
        });
        tracing::debug!(
            rows = items.len(),
            applied = outcome.applied,
            "batch applied"
        );

        self.handled += items.len() as u64;
        let mut candidates: Vec<i64> = items.iter().map(|i| i.row.id).collect();
        candidates.extend(outcome.left);
        self.state = outcome.next;
        self.delete_applied(&candidates, false).await
    }

    /// Records a hold advance when no row was read, so `late` shrinks.
    async fn commit_progress_only(&mut self, snapshot_hold: u64) -> Result<(), DirectionError> {
        let (src, tgt) = (self.ctx.source.clone(), self.ctx.target.clone());
        let (next, left) = self.state.advance(&[], snapshot_hold, false);
        let txn = self
            .t
            .client
            .transaction()
            .await
            .map_err(pg_err(&tgt, "starting a transaction"))?;
        record_progress(&txn, &src, &next)
            .await
            .map_err(pg_err(&tgt, "recording progress"))?;
        txn.commit().await.map_err(pg_err(&tgt, "committing"))?;
        self.state = next;
        self.delete_applied(&left, false).await
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

/// What one successful apply left behind.
struct Outcome {
    next: State,
    left: Vec<i64>,
    applied: usize,
    truncated: bool,
}

/// A statement parameter: text (JSON travels as text) or a time.
enum Param {
    Text(Option<String>),
    Time(Option<DateTime<Utc>>),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(t) => t,
            Param::Time(t) => t,
        }
    }
}

/// What the conflict journal records besides the conflict itself: the policy, the local
/// version's writer, whether it is a tombstone, whether last-write-wins decided by less
/// than the measured clock skew (counted here), the priority order, and the incoming row
/// with the columns it lacks (an UPDATE row of an old trigger) filled from the target's.
fn journal_facts(
    config: &Config,
    ctx: &DirectionContext,
    c: &change::Change,
    local: &Local,
    time: Option<PgTimestamp>,
) -> JournalFacts {
    let tgt = ctx.target.as_str();
    let policy = config.conflict_policy_for(&c.table.schema, &c.table.name);
    let version = local.row.as_ref().or(local.tombstone.as_ref());
    let local_writer = version.map(|v| v.writer.clone().unwrap_or_else(|| tgt.to_string()));
    let ambiguous = policy == ConflictPolicy::LastWriteWins
        && match (version.and_then(|v| v.time), time, &local_writer) {
            (Some(local_t), Some(t), Some(writer)) => {
                let skew = |n: &str| ctx.metrics.clock_skew.with_label_values(&[n]).get();
                let uncertainty = (skew(&ctx.source) - skew(writer)).abs();
                let gap = (t.0 - PgTimestamp::from_datetime(local_t).0).abs() as f64 / 1e6;
                gap < uncertainty
            }
            _ => false,
        };
    if ambiguous {
        ctx.metrics
            .conflicts_ambiguous
            .with_label_values(&[&ctx.source, tgt])
            .inc();
    }
    let unsent: Vec<String> = if c.op == Op::Update && !c.complete {
        let skip = config.skip_columns_for(&c.table.schema, &c.table.name);
        c.table
            .columns
            .iter()
            .filter(|col| !col.generated && !skip.contains(&col.name))
            .filter(|col| !c.row_columns.contains(&col.name))
            .map(|col| col.name.clone())
            .collect()
    } else {
        Vec::new()
    };
    JournalFacts {
        policy,
        local_writer,
        local_tombstone: local.row.is_none() && local.tombstone.is_some(),
        ambiguous,
        priority: serde_json::Value::from(config.priority_order()).to_string(),
        remote_row: conflict::journal_remote_row(
            &c.row_json,
            local.row.as_ref().and_then(|r| r.json.as_deref()),
            &unsent,
        ),
        unsent: serde_json::Value::from(unsent).to_string(),
    }
}

/// [`journal_facts`].
struct JournalFacts {
    policy: ConflictPolicy,
    local_writer: Option<String>,
    local_tombstone: bool,
    ambiguous: bool,
    priority: String,
    remote_row: String,
    unsent: String,
}

/// The statements one change may need (prepared, cached per connection).
struct Plan {
    lookup: Option<Statement>,
    insert: Option<Statement>,
    update: Option<Statement>,
    delete: Option<Statement>,
    tombstone: Option<Statement>,
    truncate: Option<Statement>,
}

/// What the target holds for a key: its row and its tombstone, each with its version.
#[derive(Clone, Debug, Default)]
struct Local {
    row: Option<Seen>,
    tombstone: Option<Seen>,
}

#[derive(Clone, Debug)]
struct Seen {
    /// The row as JSON (for the conflicts table).
    json: Option<String>,
    time: Option<DateTime<Utc>>,
    /// The node that wrote this version; `None` for a local write on the target.
    writer: Option<String>,
}

impl Seen {
    fn version(&self, config: &Config, target: &str) -> Version {
        Version {
            commit_time: self.time.map(PgTimestamp::from_datetime),
            writer_rank: config.node_rank(self.writer.as_deref().unwrap_or(target)),
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
    async fn open(
        client: Client,
        config: &Config,
        source: &str,
        node: &str,
    ) -> Result<Target, DirectionError> {
        let err = |what: &'static str| pg_err(node, what);
        // Old triggers (and foreign keys, as in logical replication) do not fire for what
        // walbridge applies; this needs a superuser. walbridge.skip is honoured by
        // walbridge's own capture trigger in any case.
        if let Err(e) = client
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            tracing::warn!(
                node,
                error = %pg_message(&e),
                "cannot set session_replication_role = replica; triggers other than walbridge's \
                 will fire for applied changes (old change-logging triggers then log them with \
                 origin_node set, and walbridge does not send them back)"
            );
        }
        client
            .execute(
                "SELECT pg_catalog.set_config('walbridge.skip', 'on', false),
                        pg_catalog.set_config('walbridge.origin', $1, false)",
                &[&source],
            )
            .await
            .map_err(err("setting up the apply session"))?;
        // The source's rows of a batch are deleted once T has committed it, so that commit
        // must be on T's disk first: with the server's (or role's) `synchronous_commit = off`
        // a crash of T right after the delete would lose the batch for good. Every other
        // value (`local`, `on`, `remote_write`, `remote_apply`) flushes locally and is kept.
        client
            .execute(
                "SELECT pg_catalog.set_config('synchronous_commit', 'on', false)
                  WHERE pg_catalog.current_setting('synchronous_commit') = 'off'",
                &[],
            )
            .await
            .map_err(err("setting synchronous_commit for the apply session"))?;
        let origin = config.origin_name(source);
        let origin_ok = match client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                &[&origin],
            )
            .await
        {
            Ok(_) => true,
            Err(e) => match e.as_db_error().map(|d| d.code().code()) {
                Some("42704") => {
                    return Err(DirectionError::definite(format!(
                        "node {node}: replication origin {origin} does not exist; run walbridge \
                         setup"
                    )))
                }
                Some("42501") => {
                    tracing::warn!(
                        node,
                        origin = %origin,
                        "no permission to use replication origins; applied changes keep the \
                         target's commit time and conflicts compare it"
                    );
                    false
                }
                _ => {
                    return Err(pg_fail(
                        node,
                        &format!("using replication origin {origin}"),
                        &e,
                    ))
                }
            },
        };
        let commit_ts = track_commit_timestamp(&client)
            .await
            .map_err(err("reading track_commit_timestamp"))?;
        let prefix = format!("{}_from_", config.replication.slot_prefix);
        let origins = match client
            .query(
                "SELECT roident, roname::text FROM pg_catalog.pg_replication_origin",
                &[],
            )
            .await
        {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| {
                    let name: String = r.get(1);
                    let node = name.strip_prefix(&prefix)?;
                    config.node(node)?;
                    Some((r.get::<_, u32>(0), node.to_string()))
                })
                .collect(),
            Err(_) => HashMap::new(),
        };
        let search_path = default_search_path(&client)
            .await
            .map_err(err("reading the role's default search_path"))?;
        let mut t = Target {
            client,
            commit_ts,
            origin_ok,
            origins,
            search_path,
            tables: BTreeMap::new(),
            tables_loaded: Instant::now(),
            statements: HashMap::new(),
        };
        t.load_tables(config)
            .await
            .map_err(|e| DirectionError::transient(format!("node {node}: {e}")))?;
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
        // Statements name tables by OID and columns: start afresh.
        self.statements.clear();
        Ok(())
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

    async fn statement(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        if self.statements.len() > 2_000 {
            self.statements.clear();
        }
        let s = self.client.prepare(sql).await?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    async fn plan(&mut self, c: &Change) -> Result<Plan, tokio_postgres::Error> {
        let t = c.table.as_ref();
        let mut plan = Plan {
            lookup: None,
            insert: None,
            update: None,
            delete: None,
            tombstone: None,
            truncate: None,
        };
        let key = &c.key_columns;
        // Rows of a table without a unique key have no identity to version: no lookup.
        if c.op != Op::Truncate && !key.is_empty() && !c.full_identity {
            let sql = sql::lookup_sql(t, key, c.full_identity, self.commit_ts);
            plan.lookup = Some(self.statement(&sql).await?);
        }
        match c.op {
            Op::Insert => {
                plan.insert = Some(self.statement(&sql::insert_sql(t, &c.columns)).await?);
                let set: Vec<String> = c
                    .columns
                    .iter()
                    .filter(|n| !key.contains(n) && !t.column(n).is_some_and(|c| c.identity_always))
                    .cloned()
                    .collect();
                if !key.is_empty() && !set.is_empty() {
                    let sql = sql::update_sql(t, &set, key, c.full_identity);
                    plan.update = Some(self.statement(&sql).await?);
                }
            }
            Op::Update => {
                if !c.columns.is_empty() {
                    let sql = sql::update_sql(t, &c.columns, key, c.full_identity);
                    plan.update = Some(self.statement(&sql).await?);
                }
                if c.complete {
                    plan.insert = Some(self.statement(&sql::insert_sql(t, &c.row_columns)).await?);
                }
            }
            Op::Delete => {
                let sql = sql::delete_sql(t, key, c.full_identity);
                plan.delete = Some(self.statement(&sql).await?);
                if t.unique_key().is_some() && !c.full_identity {
                    plan.tombstone = Some(self.statement(&sql::tombstone_sql(t, key)).await?);
                }
            }
            Op::Truncate => {
                plan.truncate = Some(self.statement(&sql::truncate_sql(t)).await?);
            }
        }
        Ok(plan)
    }
}

/// The target's state from a lookup row; `origins` maps roident to node.
/// A batch is one transaction on T, stamped with one commit time. With three or more nodes,
/// ends the batch before the first change whose source commit time differs from the first
/// change's ([`conflict::may_share_stamp`]), so every applied row keeps its exact time. True
/// when rows were left for the next batch.
fn cut_at_stamp(items: &mut Vec<Item>, node_count: usize) -> bool {
    let mut first = None;
    for (i, item) in items.iter().enumerate() {
        if !matches!(item.kind, Kind::Change(_)) {
            continue;
        }
        let time = item.row.time();
        match first {
            None => first = Some(time),
            Some(f) if !conflict::may_share_stamp(node_count, f, time) => {
                items.truncate(i);
                return true;
            }
            Some(_) => {}
        }
    }
    false
}

fn local_state(origins: &HashMap<u32, String>, row: Option<&tokio_postgres::Row>) -> Local {
    {
        let Some(r) = row else {
            return Local::default();
        };
        let writer = |ro: Option<u32>| {
            ro.filter(|r| *r != 0)
                .and_then(|r| origins.get(&r).cloned())
        };
        let json: Option<String> = r.get(0);
        let found: Option<bool> = r.get(3);
        Local {
            row: json.map(|j| Seen {
                json: Some(j),
                time: r.get(1),
                writer: writer(r.get(2)),
            }),
            tombstone: found.filter(|f| *f).map(|_| Seen {
                json: None,
                time: r.get(4),
                writer: writer(r.get(5)),
            }),
        }
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
