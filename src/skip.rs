//! `walbridge skip`: the way past a source transaction that cannot be applied (like
//! `ALTER SUBSCRIPTION ... SKIP`).
//!
//! When a direction stops on a definite error, `walbridge run` records the stop on the target
//! (`walbridge.stopped`, with the end LSN of the transaction that failed). `skip` moves past
//! exactly that transaction and nothing else:
//!
//! ```text
//!   target T: walbridge.stopped (S, T, end X) ── skip --lsn X ──▶ checks:
//!     stop recorded for S -> T, on X            else refused (not stopped / another LSN)
//!     T's origin progress P < X                 else refused (already past)
//!   source S: peek the slot up to X (pgoutput or wal2json, nothing consumed)
//!     first transaction after P without an origin ends at X    else refused
//!   target T, one transaction under the origin of S:
//!     INSERT its changes INTO walbridge.skipped; DELETE the stop;
//!     pg_replication_origin_xact_setup(X, commit time)  ── COMMIT: progress = X
//! ```
//!
//! The origin moves with the commit that records the skipped rows (the same mechanism the
//! applier uses), so a crash leaves either both or neither. A `walbridge run` that still runs
//! notices the stop gone within [`RESUME_POLL`] and starts the direction again from X.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value as Json};
use tokio_postgres::Client;

use crate::config::{Config, Mode, Plugin};
use crate::decode::pgoutput::PgOutputDecoder;
use crate::decode::wal2json::{self, Wal2JsonDecoder};
use crate::event::{Change, ChangeOp, Column, Event, OldKind, Relation, Tuple, Value};
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgconn;
use crate::trigger::CaptureMode;

/// The tables of `walbridge.stopped` and `walbridge.skipped` (sql/skip.sql), run by `setup`.
pub const SKIP_SQL: &str = include_str!("../sql/skip.sql");

/// How often a running `walbridge run` looks whether a stopped direction was skipped past.
pub const RESUME_POLL: Duration = Duration::from_secs(2);

/// `walbridge skip` did not skip.
#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    /// The request does not fit the direction's state; nothing was changed.
    #[error("refused: {0}; nothing was changed")]
    Refused(String),
    /// A node could not be reached, or a statement on it failed.
    #[error(transparent)]
    Node(#[from] pgconn::NodeError),
    /// The slot sent something the decoder cannot read.
    #[error("node {node}: decoding slot {slot}: {detail}")]
    Decode {
        /// The source node.
        node: String,
        /// The slot.
        slot: String,
        /// What was wrong.
        detail: String,
    },
}

fn sql_err(node: &str, what: &str) -> impl FnOnce(tokio_postgres::Error) -> SkipError {
    let sql = pgconn::NodeError::sql(node, what);
    move |source| SkipError::Node(sql(source))
}

/// A slot or origin another session holds (`55006`, object in use: a `walbridge run` still
/// works on the direction) is a refusal saying so; any other failure is `otherwise`'s.
fn refused_if_in_use(
    e: tokio_postgres::Error,
    refusal: impl FnOnce() -> String,
    otherwise: impl FnOnce(tokio_postgres::Error) -> SkipError,
) -> SkipError {
    if e.as_db_error().is_some_and(|d| d.code().code() == "55006") {
        SkipError::Refused(refusal())
    } else {
        otherwise(e)
    }
}

/// What was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// End LSN of the skipped transaction (the target's origin progress now).
    pub end_lsn: Lsn,
    /// Its source transaction id.
    pub xid: u32,
    /// Changes recorded in `walbridge.skipped`.
    pub changes: usize,
}

/// One change of the skipped transaction, as stored.
struct Recorded {
    table: Option<String>,
    op: &'static str,
    row: Option<Json>,
    old_key: Option<Json>,
}

/// The transaction found in the slot.
struct Found {
    xid: u32,
    commit_time: PgTimestamp,
    changes: Vec<Recorded>,
}

/// Moves the target of `source -> target` past the source transaction ending at `lsn`.
pub async fn skip(
    config: &Config,
    source: &str,
    target: &str,
    lsn: Lsn,
) -> Result<Skipped, SkipError> {
    if source == target
        || !config
            .directions()
            .iter()
            .any(|d| d.source == source && d.target == target)
    {
        let nodes: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
        return Err(SkipError::Refused(format!(
            "there is no direction {source} -> {target}; nodes are {}",
            nodes.join(", ")
        )));
    }
    let (Some(s_node), Some(t_node)) = (config.node(source), config.node(target)) else {
        return Err(SkipError::Refused(format!(
            "there is no direction {source} -> {target}"
        )));
    };
    let src = pgconn::connect(&s_node.dsn, "walbridge-skip")
        .await
        .map_err(pgconn::NodeError::connect(source))?;
    let tgt = pgconn::connect(&t_node.dsn, "walbridge-skip")
        .await
        .map_err(pgconn::NodeError::connect(target))?;
    check_capture(config, source, &src).await?;

    // 1. The direction stopped on this very transaction, and the target is not past it.
    let stop = tgt
        .query_opt(
            "SELECT end_lsn::text, error FROM walbridge.stopped WHERE source = $1 AND target = $2",
            &[&source, &target],
        )
        .await
        .map_err(sql_err(target, "reading walbridge.stopped"))?;
    let Some(stop) = stop else {
        return Err(SkipError::Refused(format!(
            "direction {source} -> {target} is not stopped (no stop is recorded on {target}); \
             skip only moves past the transaction a direction stopped on"
        )));
    };
    let (stopped_on, error): (Option<String>, String) = (stop.get(0), stop.get(1));
    let Some(stopped_on) = stopped_on.and_then(|l| l.parse::<Lsn>().ok()) else {
        return Err(SkipError::Refused(format!(
            "direction {source} -> {target} stopped on an error that is not tied to one \
             transaction ({error}); fix its cause and restart walbridge run"
        )));
    };
    if stopped_on != lsn {
        return Err(SkipError::Refused(format!(
            "direction {source} -> {target} stopped on the transaction ending at {stopped_on}, \
             not {lsn}"
        )));
    }
    let origin = config.origin_name(source);
    let progress: Option<String> = tgt
        .query_one(
            "SELECT pg_catalog.pg_replication_origin_progress($1, true)::text",
            &[&origin],
        )
        .await
        .map_err(sql_err(target, "reading the origin's progress"))?
        .get(0);
    let progress = progress
        .and_then(|p| p.parse::<Lsn>().ok())
        .unwrap_or(Lsn::ZERO);
    if progress >= lsn {
        return Err(SkipError::Refused(format!(
            "{target} has already applied the stream of {source} up to {progress}, past {lsn}"
        )));
    }

    // 2. The transaction itself, peeked from the slot (nothing consumed).
    let found = peek_transaction(config, source, target, &src, progress, lsn).await?;

    // 3. Record it and move the origin, in one transaction on the target.
    let changes = found.changes.len();
    record(&tgt, config, source, target, lsn, &found).await?;
    tracing::info!(
        source, target, end_lsn = %lsn, xid = found.xid, changes,
        "skipped a transaction; its changes are in walbridge.skipped"
    );
    Ok(Skipped {
        end_lsn: lsn,
        xid: found.xid,
        changes,
    })
}

/// Only stream-mode directions can be skipped (trigger mode sets a bad row aside itself).
async fn check_capture(config: &Config, source: &str, src: &Client) -> Result<(), SkipError> {
    let mode = match config.replication.mode {
        Mode::Stream => CaptureMode::Stream,
        Mode::Trigger => CaptureMode::Trigger,
        Mode::Auto => {
            crate::trigger::node_mode(config, source, src)
                .await
                .map_err(sql_err(source, "reading its capture mode"))?
                .mode
        }
    };
    if mode == CaptureMode::Trigger {
        return Err(SkipError::Refused(format!(
            "{source} is in trigger mode, where skip does not apply: a row the target refuses \
             moves to the change table's dead-row table with its error and the rows after it go \
             on; a direction stopped on a table or column the target lacks goes on once the \
             target has it and walbridge run is restarted (or with on_schema_mismatch = \
             \"park\"); to drop such rows instead, move them to the dead-row table by hand"
        )));
    }
    Ok(())
}

/// Decodes the slot of `source -> target` up to `lsn` without consuming it, and returns the
/// first transaction after `progress` that carries no origin: it must end at `lsn`.
async fn peek_transaction(
    config: &Config,
    source: &str,
    target: &str,
    src: &Client,
    progress: Lsn,
    lsn: Lsn,
) -> Result<Found, SkipError> {
    let slot = config.slot_name(source, target);
    let in_use = |e: tokio_postgres::Error| {
        refused_if_in_use(
            e,
            || {
                format!(
                    "slot {slot} on {source} is in use: walbridge run still streams {source} \
                     -> {target}, so the direction is not stopped"
                )
            },
            sql_err(source, &format!("reading slot {slot}")),
        )
    };
    let decode_err = |detail: String| SkipError::Decode {
        node: source.to_string(),
        slot: slot.clone(),
        detail,
    };
    let mut scan = Scan {
        open: None,
        progress,
        lsn,
        source,
        target,
    };
    match config.replication.plugin {
        Plugin::PgOutput => {
            let rows = src
                .query(
                    "SELECT lsn::text, data FROM pg_catalog.pg_logical_slot_peek_binary_changes(
                         $1, $2::text::pg_lsn, NULL,
                         'proto_version', '1', 'publication_names', $3)",
                    &[&slot, &lsn.to_string(), &config.publication_name()],
                )
                .await
                .map_err(in_use)?;
            let mut decoder = PgOutputDecoder::new();
            for row in rows {
                let (at, data) = peeked::<Vec<u8>>(&row).map_err(&decode_err)?;
                let event = decoder
                    .decode(at, &Bytes::from(data))
                    .map_err(|e| decode_err(e.to_string()))?;
                if let Some(found) = event.and_then(|e| scan.push(e)) {
                    return found;
                }
            }
        }
        Plugin::Wal2Json => {
            // The options walbridge streams with, so the documents (and the end LSNs a
            // stop records) are the ones the direction saw.
            let options: Vec<String> = wal2json::START_OPTIONS
                .iter()
                .flat_map(|(k, v)| [k.to_string(), v.to_string()])
                .collect();
            let rows = src
                .query(
                    "SELECT lsn::text, data FROM pg_catalog.pg_logical_slot_peek_changes(
                         $1, $2::text::pg_lsn, NULL, VARIADIC $3::text[])",
                    &[&slot, &lsn.to_string(), &options],
                )
                .await
                .map_err(in_use)?;
            let mut decoder = Wal2JsonDecoder::new();
            let selection = Some(&config.replication.tables);
            for row in rows {
                let (at, data) = peeked::<String>(&row).map_err(&decode_err)?;
                // A table or origin the decoder does not know yet is read from the catalog
                // (a few times: a table and an origin may both be new).
                let mut taught = 0;
                let events = loop {
                    match decoder.decode(at, data.as_bytes()) {
                        Ok(events) => break events,
                        Err(e) if taught < 3 && e.needs_catalog() => {
                            taught += 1;
                            crate::source::teach_wal2json(&mut decoder, src, &e, selection)
                                .await
                                .map_err(|e| decode_err(e.to_string()))?;
                        }
                        Err(e) => return Err(decode_err(e.to_string())),
                    }
                };
                for event in events {
                    if let Some(found) = scan.push(event) {
                        return found;
                    }
                }
            }
        }
    }
    Err(SkipError::Refused(format!(
        "slot {slot} on {source} holds no transaction ending at {lsn} after {target}'s \
         progress {progress}"
    )))
}

/// A row of `pg_logical_slot_peek_*changes`: its LSN and its data (`T`: bytes or text).
fn peeked<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r tokio_postgres::Row,
) -> Result<(Lsn, T), String> {
    let lsn: String = row.try_get(0).map_err(|e| e.to_string())?;
    let lsn = lsn
        .parse::<Lsn>()
        .map_err(|e| format!("the slot gave the LSN {lsn:?}: {e}"))?;
    Ok((lsn, row.try_get(1).map_err(|e| e.to_string())?))
}

/// Walks decoded events to the first transaction after `progress` without an origin.
struct Scan<'a> {
    /// The transaction being read: xid, whether it has an origin (an echo), its changes.
    open: Option<(u32, bool, Vec<Recorded>)>,
    progress: Lsn,
    lsn: Lsn,
    source: &'a str,
    target: &'a str,
}

impl Scan<'_> {
    /// Takes one event; `Some` once the transaction is found (or found not to end at `lsn`).
    fn push(&mut self, event: Event) -> Option<Result<Found, SkipError>> {
        match event {
            // Read with protocol version 1: no streamed transactions.
            Event::StreamStart(_)
            | Event::StreamStop
            | Event::Subtransaction(_)
            | Event::StreamCommit(_)
            | Event::StreamAbort { .. } => {}
            Event::Begin(b) => self.open = Some((b.xid, b.origin.is_some(), Vec::new())),
            Event::Origin(_) => {
                if let Some(o) = self.open.as_mut() {
                    o.1 = true;
                }
            }
            Event::Change(c) => {
                if let Some(o) = self.open.as_mut() {
                    o.2.push(recorded_change(&c));
                }
            }
            Event::Truncate(t) => {
                if let Some(o) = self.open.as_mut() {
                    for r in &t.relations {
                        o.2.push(Recorded {
                            table: Some(r.qualified_name()),
                            op: "truncate",
                            row: None,
                            old_key: None,
                        });
                    }
                }
            }
            Event::Message(m) => {
                if let Some(o) = self.open.as_mut().filter(|_| m.transactional) {
                    let mut body = Map::new();
                    body.insert("prefix".into(), Json::String(m.prefix.clone()));
                    body.insert(
                        "content".into(),
                        Json::String(String::from_utf8_lossy(&m.content).into_owned()),
                    );
                    o.2.push(Recorded {
                        table: None,
                        op: "message",
                        row: Some(Json::Object(body)),
                        old_key: None,
                    });
                }
            }
            Event::Commit(c) => {
                let (xid, echo, changes) = self.open.take()?;
                if echo || c.end_lsn <= self.progress {
                    return None;
                }
                if c.end_lsn != self.lsn {
                    return Some(Err(SkipError::Refused(format!(
                        "the first transaction of {} that {} has not applied ends at {}, not {}",
                        self.source, self.target, c.end_lsn, self.lsn
                    ))));
                }
                return Some(Ok(Found {
                    xid,
                    commit_time: c.commit_time,
                    changes,
                }));
            }
            Event::Relation(_) | Event::Type(_) => {}
        }
        None
    }
}

/// A change as stored: the new row (or the old key / row of a delete) and, for an update
/// with an old key, that key.
fn recorded_change(c: &Change) -> Recorded {
    // An old key names the key columns only (the others are not part of it).
    let old = c.old.as_ref().map(|o| {
        let key_only = o.kind == OldKind::Key;
        row_json_of(&c.relation, &o.tuple, |col| !key_only || col.is_key)
    });
    let (row, old_key) = match c.op {
        ChangeOp::Delete => (old, None),
        ChangeOp::Insert | ChangeOp::Update => {
            (c.new.as_ref().map(|n| row_json(&c.relation, n)), old)
        }
    };
    Recorded {
        table: Some(c.relation.qualified_name()),
        op: c.op.as_str(),
        row,
        old_key,
    }
}

/// `{column: text value or null}`; unchanged TOAST values are left out.
fn row_json(relation: &Relation, tuple: &Tuple) -> Json {
    row_json_of(relation, tuple, |_| true)
}

/// [`row_json`] of the columns `keep` takes.
fn row_json_of(relation: &Relation, tuple: &Tuple, keep: impl Fn(&Column) -> bool) -> Json {
    let mut out = Map::new();
    for (col, value) in relation.columns.iter().zip(&tuple.0) {
        if !keep(col) {
            continue;
        }
        let v = match value {
            Value::Null => Json::Null,
            Value::UnchangedToast => continue,
            Value::Text(b) | Value::Binary(b) => {
                Json::String(String::from_utf8_lossy(b).into_owned())
            }
        };
        out.insert(col.name.clone(), v);
    }
    Json::Object(out)
}

/// Records the changes, deletes the stop and moves the origin, in one transaction on the
/// target under the source's origin.
async fn record(
    tgt: &Client,
    config: &Config,
    source: &str,
    target: &str,
    lsn: Lsn,
    found: &Found,
) -> Result<(), SkipError> {
    let origin = config.origin_name(source);
    tgt.execute(
        "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
        &[&origin],
    )
    .await
    .map_err(|e| {
        refused_if_in_use(
            e,
            || {
                format!(
                    "origin {origin} on {target} is in use: walbridge run is applying {source} \
                     -> {target}, so the direction is not stopped"
                )
            },
            sql_err(target, &format!("setting up origin {origin}")),
        )
    })?;
    let result = record_in_transaction(tgt, source, target, lsn, found).await;
    if result.is_err() {
        let _ = tgt.batch_execute("ROLLBACK").await;
    }
    let _ = tgt
        .batch_execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
        .await;
    result
}

async fn record_in_transaction(
    tgt: &Client,
    source: &str,
    target: &str,
    lsn: Lsn,
    found: &Found,
) -> Result<(), SkipError> {
    let err = |what: &str| sql_err(target, what);
    tgt.batch_execute("BEGIN")
        .await
        .map_err(err("starting the transaction"))?;
    let commit_micros = found.commit_time.0;
    let lsn_text = lsn.to_string();
    let xid = i64::from(found.xid);
    for (seq, c) in found.changes.iter().enumerate() {
        let seq = i32::try_from(seq).unwrap_or(i32::MAX);
        tgt.execute(
            "INSERT INTO walbridge.skipped
                 (source, target, end_lsn, commit_time, xid, seq, table_name, op, \"row\", old_key)
             VALUES ($1, $2, $3::text::pg_lsn,
                     pg_catalog.to_timestamp(946684800) + pg_catalog.make_interval(secs => $4::float8 / 1e6),
                     $5, $6, $7, $8, $9, $10)",
            &[
                &source,
                &target,
                &lsn_text,
                &(commit_micros as f64),
                &xid,
                &seq,
                &c.table,
                &c.op,
                &c.row,
                &c.old_key,
            ],
        )
        .await
        .map_err(err("recording the skipped changes in walbridge.skipped"))?;
    }
    tgt.execute(
        "DELETE FROM walbridge.stopped WHERE source = $1 AND target = $2",
        &[&source, &target],
    )
    .await
    .map_err(err("clearing the stop"))?;
    tgt.execute(
        "SELECT pg_catalog.pg_replication_origin_xact_setup($1::text::pg_lsn,
             pg_catalog.to_timestamp(946684800) + pg_catalog.make_interval(secs => $2::float8 / 1e6))",
        &[&lsn_text, &(commit_micros as f64)],
    )
    .await
    .map_err(err("moving the origin"))?;
    tgt.batch_execute("COMMIT")
        .await
        .map_err(err("committing the skip"))?;
    Ok(())
}

/// `walbridge run`: a direction stopped on a definite error; record it on the target so
/// `status` and `skip` see it. Best effort: a target that cannot be reached is logged.
pub async fn record_stop(
    config: &Config,
    source: &str,
    target: &str,
    error: &str,
    end_lsn: Option<Lsn>,
) {
    let Some(node) = config.node(target) else {
        return;
    };
    let result = async {
        let client = pgconn::connect(&node.dsn, "walbridge-stop")
            .await
            .map_err(|e| e.to_string())?;
        client
            .execute(
                "INSERT INTO walbridge.stopped (source, target, end_lsn, error)
                 VALUES ($1, $2, $3::text::pg_lsn, $4)
                 ON CONFLICT (source, target) DO UPDATE
                    SET end_lsn = EXCLUDED.end_lsn, error = EXCLUDED.error,
                        stopped_at = EXCLUDED.stopped_at",
                &[&source, &target, &end_lsn.map(|l| l.to_string()), &error],
            )
            .await
            .map_err(|e| crate::pgconn::pg_message(&e))
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(source, target, error = %e, "cannot record the stop on the target; walbridge skip will refuse this direction");
    }
}

/// `walbridge run`: whether the recorded stop of `source -> target` is gone (skipped past,
/// or removed by hand), so the direction may start again. `false` when it cannot tell.
pub async fn stop_cleared(config: &Config, source: &str, target: &str) -> bool {
    let Some(node) = config.node(target) else {
        return false;
    };
    let Ok(client) = pgconn::connect(&node.dsn, "walbridge-stop").await else {
        return false;
    };
    matches!(
        client
            .query_opt(
                "SELECT 1 FROM walbridge.stopped WHERE source = $1 AND target = $2",
                &[&source, &target],
            )
            .await,
        Ok(None)
    )
}

/// `walbridge run`: the direction streams again (restarted after a fix), so a stop recorded
/// earlier is over; if the same transaction fails again, the stop is recorded anew. Best
/// effort, like [`record_stop`].
pub async fn clear_stop(config: &Config, source: &str, target: &str) {
    let Some(node) = config.node(target) else {
        return;
    };
    let Ok(client) = pgconn::connect(&node.dsn, "walbridge-stop").await else {
        return;
    };
    if let Err(e) = client
        .execute(
            "DELETE FROM walbridge.stopped WHERE source = $1 AND target = $2",
            &[&source, &target],
        )
        .await
    {
        tracing::debug!(source, target, error = %crate::pgconn::pg_message(&e), "cannot clear the recorded stop");
    }
}
