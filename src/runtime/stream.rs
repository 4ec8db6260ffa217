//! One stream-mode direction S→T: the source's slot decoded into events, applied to T.
//!
//! The loop has one `select!` arm per concern, highest priority first; every arm awaits only a
//! cancel-safe receive, and the work happens in the arm's body, so nothing is lost when another
//! arm wins:
//!
//! ```text
//!   shutdown  ─▶ finish in-flight work, confirm, end the stream cleanly
//!   reply     ─▶ a transaction committed (or failed: careful redo) on T
//!   tick      ─▶ ask T for durable progress; confirm it to S; lag metrics
//!   source    ─▶ decode, apply (only while the in-flight window has room)
//! ```
//!
//! Dead links. The source side is watched by the stream driver (nothing from the walsender
//! for its `wal_sender_timeout` although asked to answer: see `source::receive_timeout`).
//! The apply side is watched beside the loop: when a request to the target has been
//! unanswered for [`APPLY_PROBE_AFTER`], a fresh connection looks at the apply session's
//! server process. Working on it (`active`, not blocked writing to us): wait on. Idle, gone,
//! blocked writing to us, or the target unreachable within [`APPLY_PROBE_TIMEOUT`]: the link
//! is dead, the direction reconnects, and the abandoned server process is ended so it cannot
//! keep holding the replication origin.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::apply::{Applier, ApplyLimits, Outcome};
use crate::config::Plugin;
use crate::direction::prereq;
use crate::direction::state::Observation;
use crate::direction::{claim, DirectionContext, DirectionError, DirectionState};
use crate::lsn::Lsn;
use crate::pgconn;
use crate::protocol::pipeline::Pipeline;
use crate::protocol::{self, ConnectOptions, StreamConfig};
use crate::source::{Source, SourceError, SourceItem, SourceOptions};

fn source_err(node: &str, e: SourceError) -> DirectionError {
    DirectionError::caused_by(format!("node {node}: {e}"), &e)
}

fn connect_err(e: pgconn::ConnectError) -> DirectionError {
    DirectionError::caused_by(e.to_string(), &e)
}

fn sql_err(node: &str, what: &str, e: tokio_postgres::Error) -> DirectionError {
    let msg = format!("node {node}: {what}: {}", crate::pgconn::pg_message(&e));
    DirectionError::caused_by(msg, &e)
}

/// A request to the target unanswered this long makes walbridge look at the apply session.
pub const APPLY_PROBE_AFTER: Duration = Duration::from_secs(10);
/// How long that look (a fresh connection and one query) may take.
pub const APPLY_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// When the target last answered (or nothing was awaited), shared by the loop and the probe.
struct Liveness {
    epoch: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Liveness {
    fn new() -> Self {
        Liveness {
            epoch: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Release);
    }

    fn silent(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Resolves (with the reason) only once the apply link is found dead; see the module docs.
async fn watch_apply(
    live: &Liveness,
    dsn: &crate::dsn::Dsn,
    pid: i32,
    app: &str,
    target: &str,
) -> DirectionError {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let silent = live.silent();
        if silent < APPLY_PROBE_AFTER {
            continue;
        }
        let mut dsn = dsn.clone();
        dsn.connect_timeout = Some(APPLY_PROBE_TIMEOUT);
        let look = async {
            let client = pgconn::connect(&dsn, &format!("walbridge-probe-{target}"))
                .await
                .map_err(|e| e.to_string())?;
            let row = client
                .query_opt(
                    "SELECT state, wait_event FROM pg_catalog.pg_stat_activity \
                     WHERE pid = $1 AND application_name = $2",
                    &[&pid, &app],
                )
                .await
                .map_err(|e| crate::pgconn::pg_message(&e))?;
            let seen = row.map(|r| {
                (
                    r.get::<_, Option<String>>(0).unwrap_or_default(),
                    r.get::<_, Option<String>>(1).unwrap_or_default(),
                )
            });
            let working =
                matches!(&seen, Some((state, wait)) if state == "active" && wait != "ClientWrite");
            if !working {
                // Ours and given up: end it so it releases the origin and its locks.
                let _ = client
                    .execute(
                        "SELECT pg_catalog.pg_terminate_backend(pid) FROM \
                         pg_catalog.pg_stat_activity WHERE pid = $1 AND application_name = $2",
                        &[&pid, &app],
                    )
                    .await;
            }
            Ok::<_, String>((working, seen))
        };
        let reason = match tokio::time::timeout(APPLY_PROBE_TIMEOUT, look).await {
            Ok(Ok((true, _))) => {
                debug!(target = %target, pid, silent_s = silent.as_secs(), "apply session is busy on the target; waiting");
                live.mark();
                continue;
            }
            Ok(Ok((false, Some((state, wait))))) => format!(
                "its server process {pid} is {state}{}",
                if wait.is_empty() {
                    String::new()
                } else {
                    format!(" ({wait})")
                }
            ),
            Ok(Ok((false, None))) => format!("its server process {pid} is gone"),
            Ok(Err(e)) => format!("a fresh connection failed too: {e}"),
            Err(_) => format!(
                "a fresh connection got no answer within {}s either",
                APPLY_PROBE_TIMEOUT.as_secs()
            ),
        };
        return DirectionError::transient(format!(
            "node {target}: the apply session got no answer for {}s and {reason}; the link is \
             dead, reconnecting",
            silent.as_secs()
        ));
    }
}

/// Ends the apply session that an earlier attempt gave up as dead, if it is still there.
async fn end_abandoned(ctx: &DirectionContext, catalog: &tokio_postgres::Client, app: &str) {
    let pid = ctx.abandoned_apply_pid.swap(0, Ordering::AcqRel);
    if pid == 0 {
        return;
    }
    match catalog
        .execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
             WHERE pid = $1 AND application_name = $2",
            &[&pid, &app],
        )
        .await
    {
        Ok(1) => info!(target = %ctx.target, pid, "ended the abandoned apply session"),
        Ok(_) => {}
        Err(e) => {
            debug!(target = %ctx.target, pid, error = %e, "could not end the abandoned apply session")
        }
    }
}

/// How a direction's run ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was asked for.
    Shutdown,
    /// Handed to another instance (this one was over its share).
    Released,
}

/// Runs the direction until shutdown or release (`Ok`) or an error.
pub async fn run(ctx: &DirectionContext) -> Result<Ended, DirectionError> {
    let config = &ctx.config;
    let (s, t) = (ctx.source.as_str(), ctx.target.as_str());
    let source_node = config
        .node(s)
        .ok_or_else(|| DirectionError::definite(format!("node {s} is not configured")))?;
    let target_node = config
        .node(t)
        .ok_or_else(|| DirectionError::definite(format!("node {t} is not configured")))?;
    let slot = config.slot_name(s, t);
    let plugin = config.replication.plugin;
    ctx.report(|st| {
        st.mode = "stream".into();
        st.plugin = Some(plugin.as_str().into());
        st.slot = Some(slot.clone());
        st.origin = Some(config.origin_name(s));
        st.state = DirectionState::Connecting;
    });

    // The target: a pipelined session under the source's origin, and a catalog connection.
    let apply_app = claim::apply_application_name(s, t, &config.run.instance);
    let raw = protocol::connect(
        &target_node.dsn,
        ConnectOptions {
            application_name: apply_app.clone(),
            replication: false,
            params: Vec::new(),
        },
    )
    .await
    .map_err(|e| DirectionError::caused_by(e.to_string(), &e))?;
    let apply_pid = raw.backend_key().map(|(pid, _)| pid).unwrap_or(0);
    let (mut pipe, driver) = Pipeline::from_raw(raw);
    let apply_driver = tokio::spawn(driver);
    // An apply session an earlier attempt gave up as dead may still hold the origin and this
    // direction's claim: end it before claiming.
    let catalog = match pgconn::connect(&target_node.dsn, &format!("walbridge-catalog-{t}")).await {
        Ok(c) => c,
        Err(e) => {
            apply_driver.abort();
            return Err(connect_err(e));
        }
    };
    end_abandoned(ctx, &catalog, &apply_app).await;
    // Only the owner goes further; a standby waits here, on the session that will apply.
    match claim::acquire(ctx, &mut pipe).await {
        Ok(true) => {}
        Ok(false) => {
            apply_driver.abort();
            ctx.report(|st| st.state = DirectionState::Stopped);
            return Ok(Ended::Shutdown);
        }
        Err(e) => {
            apply_driver.abort();
            return Err(e);
        }
    }
    ctx.report(|st| st.state = DirectionState::Connecting);
    let (mut applier, progress) = Applier::start(
        pipe,
        catalog,
        config.clone(),
        s,
        t,
        ctx.metrics.clone(),
        ApplyLimits::default(),
    )
    .await?;

    // What the source must stream.
    let (tables, filter_origins) = if plugin == Plugin::Wal2Json {
        let client = pgconn::connect(&source_node.dsn, &format!("walbridge-catalog-{s}"))
            .await
            .map_err(connect_err)?;
        let mut tables = Vec::new();
        for t in prereq::selected_tables(&client, config)
            .await
            .map_err(|e| sql_err(s, "resolving tables", e.0))?
        {
            if t.kind == crate::catalog::TableKind::Partitioned {
                tables.extend(
                    crate::catalog::partitions_of(&client, &t.schema, &t.name)
                        .await
                        .map_err(|e| sql_err(s, "listing partitions", e.0))?,
                );
            }
            tables.push((t.schema, t.name));
        }
        let origins: Vec<u16> = client
            .query(
                "SELECT roident::int4 FROM pg_catalog.pg_replication_origin",
                &[],
            )
            .await
            .map_err(|e| sql_err(s, "listing origins", e))?
            .iter()
            .filter_map(|r| u16::try_from(r.get::<_, i32>(0)).ok())
            .collect();
        (tables, origins)
    } else {
        (Vec::new(), Vec::new())
    };

    let mut start = progress;
    loop {
        let stream_cancel = CancellationToken::new();
        let opts = SourceOptions {
            plugin,
            slot: slot.clone(),
            publication: config.publication_name(),
            start,
            tables: tables.clone(),
            selection: (plugin == Plugin::Wal2Json).then(|| config.replication.tables.clone()),
            refuse_lossy: (plugin == Plugin::Wal2Json && !config.replication.allow_lossy_wal2json)
                .then(|| config.replication.skip_columns.clone()),
            filter_origins: filter_origins.clone(),
            // walbridge.ddl()'s schema changes travel as logical messages.
            messages: true,
            application_name: format!("walbridge-source-{s}-to-{t}"),
            drop_echo: true,
            stream_in_progress: config.replication.stream_in_progress,
            spill: applier.spilled(),
            stream: StreamConfig {
                cancel: stream_cancel.clone(),
                ..StreamConfig::default()
            },
        };
        let (mut source, driver) =
            match start_source(ctx, &mut applier, &source_node.dsn, opts).await {
                Ok(Some(started)) => started,
                Ok(None) => {
                    apply_driver.abort();
                    ctx.report(|st| st.state = DirectionState::Stopped);
                    return Ok(Ended::Shutdown);
                }
                Err(e) => {
                    apply_driver.abort();
                    return Err(e);
                }
            };
        let stream_driver = tokio::spawn(driver);
        info!(
            source = %s,
            target = %t,
            from = %start,
            server_echo_filter = source.server_echo_filter(),
            "streaming"
        );
        ctx.report(|st| {
            st.state = DirectionState::Streaming;
            st.last_error = None;
        });
        crate::skip::clear_stop(&ctx.config, s, t).await;

        let live = Liveness::new();
        let result = tokio::select! {
            r = pump(ctx, &mut applier, &mut source, &live) => r,
            e = watch_apply(&live, &target_node.dsn, apply_pid, &apply_app, t) => {
                ctx.abandoned_apply_pid.store(apply_pid, Ordering::Release);
                Err(e)
            }
        };
        match result {
            Ok(how @ (Pumped::Shutdown | Pumped::Release)) => {
                let confirm = applier.finish().await;
                if let Ok(lsn) = &confirm {
                    source.feedback().confirm(*lsn);
                }
                stream_cancel.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(15), stream_driver).await;
                apply_driver.abort();
                confirm?;
                if matches!(how, Pumped::Release) {
                    ctx.report(|st| st.state = DirectionState::Standby);
                    return Ok(Ended::Released);
                }
                ctx.report(|st| st.state = DirectionState::Stopped);
                return Ok(Ended::Shutdown);
            }
            Ok(Pumped::Restream) => {
                // A conflict inside a transaction too large to keep (read it again from the
                // target's progress and apply it change by change), or a streamed transaction
                // that must be spilled: read again from the target's progress.
                stream_cancel.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(15), stream_driver).await;
                start = applier.committed_lsn();
                applier.on_restream();
                debug!(source = %s, target = %t, from = %start, "restreaming");
            }
            Err(e) => {
                stream_cancel.cancel();
                stream_driver.abort();
                apply_driver.abort();
                return Err(e);
            }
        }
    }
}

/// How long a new owner keeps asking for the slot while a previous owner's walsender still
/// holds it (the server ends that one after `wal_sender_timeout`, 60 s by default).
const SLOT_BUSY_PATIENCE: Duration = Duration::from_secs(90);

/// Starts the stream, holding on to the claim while the slot is still busy (55006: a
/// previous owner's walsender has not gone yet) or the source is briefly away; `Ok(None)` on
/// shutdown.
async fn start_source(
    ctx: &DirectionContext,
    applier: &mut Applier,
    dsn: &crate::dsn::Dsn,
    opts: SourceOptions,
) -> Result<Option<(Source, crate::protocol::DriverFuture)>, DirectionError> {
    let s = ctx.source.as_str();
    let deadline = tokio::time::Instant::now() + SLOT_BUSY_PATIENCE;
    loop {
        match Source::start(dsn, opts.clone()).await {
            Ok(started) => return Ok(Some(started)),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                debug!(source = %s, target = %ctx.target, error = %e, "slot not available yet; retrying");
                ctx.report(|st| st.last_error = Some(format!("node {s}: {e}")));
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                // The apply session must not fall idle meanwhile (see claim::IDLE_LIMIT).
                applier.request_progress().await?;
                while applier.has_in_flight() {
                    let reply = applier.recv_response().await?;
                    applier.on_response(reply).await?;
                }
            }
            Err(e) => return Err(source_err(s, e)),
        }
    }
}

/// Confirms an idle position (a keepalive's, or a transaction with nothing to apply) to the
/// source at once, not at the next tick, at most every [`IdleConfirm::EVERY`].
///
/// While a source writes only tables that are not replicated, its slot's restart point can
/// only move once walbridge confirms a position past the server's latest running-transactions
/// record, and every second of delay is a second of the source's WAL retained: at 100 MB/s of
/// unreplicated writes, the tick's delay alone (up to 1.5 s through the status timer) kept
/// over 130 MB. An applied transaction is confirmed through the tick as before (its progress
/// must first be read back from the target).
#[derive(Default)]
struct IdleConfirm {
    last: Option<tokio::time::Instant>,
}

impl IdleConfirm {
    const EVERY: Duration = Duration::from_millis(50);

    fn push(&mut self, source: &Source, applier: &Applier) {
        let confirmable = applier.confirmable();
        if confirmable <= source.feedback().confirmed() {
            return;
        }
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            return;
        }
        self.last = Some(now);
        source.feedback().confirm(confirmable);
        source.feedback().request_now();
    }
}

/// How long a gathering group may stay open at most.
const GROUP_LINGER: Duration = Duration::from_millis(20);

/// Whether more source data is queued or clearly on its way (a backlog is being drained).
fn more_coming(source: &Source, applier: &Applier) -> bool {
    source.has_queued() || applier.draining_backlog()
}

enum Pumped {
    Shutdown,
    Restream,
    /// Hand the direction to another instance: asked for, and at a transaction boundary.
    Release,
}

async fn pump(
    ctx: &DirectionContext,
    applier: &mut Applier,
    source: &mut Source,
    live: &Liveness,
) -> Result<Pumped, DirectionError> {
    let (s, t) = (ctx.source.as_str(), ctx.target.as_str());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut linger = tokio::time::interval(GROUP_LINGER);
    linger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_wal_end = Lsn::ZERO;
    let mut release_wanted = false;
    let mut idle_confirm = IdleConfirm::default();
    loop {
        if !applier.has_in_flight() {
            live.mark();
        }
        if applier.has_redo() {
            applier.redo_one().await?;
            continue;
        }
        tokio::select! {
            biased;
            // Shutdown first: nothing new is started once it is asked for.
            _ = ctx.shutdown.cancelled() => return Ok(Pumped::Shutdown),
            // Replies from the target: acknowledge or redo.
            reply = applier.recv_response(), if applier.has_in_flight() => {
                live.mark();
                if applier.on_response(reply?).await? == Outcome::Restream {
                    return Ok(Pumped::Restream);
                }
            }
            // A group gathering a backlog is sent after a short while at most.
            _ = linger.tick(), if applier.has_open_group() => {
                if applier.close_group_older_than(GROUP_LINGER).await? == Outcome::Restream {
                    return Ok(Pumped::Restream);
                }
            }
            // Progress: durable position to the source, lag to the metrics.
            _ = tick.tick() => {
                if ctx.fleet.take_release(s, t) {
                    release_wanted = true;
                }
                // Released only between transactions: nothing open, nothing in flight.
                if release_wanted && applier.idle() {
                    return Ok(Pumped::Release);
                }
                // Parked tables whose target schema fits again are replayed here, between
                // transactions (see apply::park).
                applier.check_parked().await?;
                applier.request_progress().await?;
                let confirmed = applier.confirmable();
                source.feedback().confirm(confirmed);
                // The status board derives both lag gauges from this (see runtime::state).
                ctx.status.observe(s, t, Observation {
                    confirmed,
                    received: source.feedback().last_received().max(last_wal_end),
                    keepalive: last_wal_end,
                    idle: applier.idle(),
                    last_commit_time: applier.last_commit_time(),
                    transactions_applied:
                        ctx.metrics.transactions_applied.with_label_values(&[s, t]).get(),
                });
            }
            // The source, only while the window has room (backpressure to the walsender).
            item = source.recv(), if applier.ready_for_more() => {
                let Some(item) = item else {
                    return Err(DirectionError::transient(format!(
                        "node {s}: the replication stream ended"
                    )));
                };
                // Take what is already queued too (up to a bound), so the select above runs
                // once per batch rather than once per message.
                let mut next = Some(item);
                let mut taken = 0;
                while let Some(item) = next.take() {
                    let item = item.map_err(|e| source_err(s, e.into()))?;
                    let decoded = source.decode(item).await.map_err(|e| source_err(s, e))?;
                    let count = decoded.len();
                    for (i, decoded) in decoded.into_iter().enumerate() {
                        let outcome = match decoded {
                            SourceItem::Keepalive { wal_end } => {
                                last_wal_end = wal_end;
                                let outcome = applier.on_keepalive(wal_end).await?;
                                idle_confirm.push(source, applier);
                                outcome
                            }
                            SourceItem::Event { event, .. } => {
                                let more = i + 1 < count || more_coming(source, applier);
                                let commit = matches!(event, crate::event::Event::Commit(_));
                                let outcome = applier.on_event(event, more).await?;
                                if commit {
                                    idle_confirm.push(source, applier);
                                }
                                outcome
                            }
                            // Dropped by the source: it came from a peer (or its session
                            // opted out), so it must not travel on.
                            SourceItem::Echo { commit } => {
                                ctx.metrics.echo_suppressed.with_label_values(&[s]).inc();
                                applier.on_dropped(&commit);
                                idle_confirm.push(source, applier);
                                Outcome::Continue
                            }
                        };
                        if outcome == Outcome::Restream {
                            return Ok(Pumped::Restream);
                        }
                    }
                    taken += 1;
                    if taken < 256 && applier.ready_for_more() && !ctx.shutdown.is_cancelled() {
                        next = source.try_recv();
                    }
                }
                // Nothing more delivered yet: send the group if the target is idle (unless a
                // backlog is being drained: then bigger groups cost far less).
                if applier.maybe_close(more_coming(source, applier)).await? == Outcome::Restream {
                    return Ok(Pumped::Restream);
                }
            }
        }
    }
}
