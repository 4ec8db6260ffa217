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

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::claim;
use super::state::Observation;
use super::{DirectionContext, DirectionError, DirectionState};
use crate::apply::{Applier, ApplyLimits, Outcome};
use crate::config::Plugin;
use crate::lsn::Lsn;
use crate::pgconn;
use crate::protocol::pipeline::Pipeline;
use crate::protocol::{self, ConnectOptions, StreamConfig};
use crate::setup::prereq;
use crate::source::{Source, SourceError, SourceItem, SourceOptions};

fn source_err(node: &str, e: SourceError) -> DirectionError {
    let msg = format!("node {node}: {e}");
    if e.is_transient() {
        DirectionError::transient(msg)
    } else {
        DirectionError::definite(msg)
    }
}

fn connect_err(e: pgconn::ConnectError) -> DirectionError {
    if e.is_transient() {
        DirectionError::transient(e.to_string())
    } else {
        DirectionError::definite(e.to_string())
    }
}

fn sql_err(node: &str, what: &str, e: tokio_postgres::Error) -> DirectionError {
    let msg = format!("node {node}: {what}: {}", crate::setup::pg_message(&e));
    if e.is_closed() || e.as_db_error().is_none() {
        DirectionError::transient(msg)
    } else {
        DirectionError::definite(msg)
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
    let raw = protocol::connect(
        &target_node.dsn,
        ConnectOptions {
            application_name: claim::apply_application_name(s, t, &config.run.instance),
            replication: false,
            params: Vec::new(),
        },
    )
    .await
    .map_err(|e| {
        if e.is_transient() {
            DirectionError::transient(e.to_string())
        } else {
            DirectionError::definite(e.to_string())
        }
    })?;
    let (mut pipe, driver) = Pipeline::from_raw(raw);
    let apply_driver = tokio::spawn(driver);
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
    let catalog = pgconn::connect(&target_node.dsn, &format!("walbridge-catalog-{t}"))
        .await
        .map_err(connect_err)?;
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
            filter_origins: filter_origins.clone(),
            messages: false,
            application_name: format!("walbridge-source-{s}-to-{t}"),
            skip_echo_changes: true,
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
        info!(source = %s, target = %t, from = %start, "streaming");
        ctx.report(|st| {
            st.state = DirectionState::Streaming;
            st.last_error = None;
        });

        let result = pump(ctx, &mut applier, &mut source).await;
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
                // A conflict inside a transaction too large to keep: read it again from the
                // target's progress and apply it change by change.
                stream_cancel.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(15), stream_driver).await;
                start = applier.committed_lsn();
                applier.set_careful_next();
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
) -> Result<Pumped, DirectionError> {
    let (s, t) = (ctx.source.as_str(), ctx.target.as_str());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut linger = tokio::time::interval(GROUP_LINGER);
    linger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_wal_end = Lsn::ZERO;
    let mut release_wanted = false;
    loop {
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
                                applier.on_keepalive(wal_end).await?
                            }
                            SourceItem::Event { event, .. } => {
                                let more = i + 1 < count || more_coming(source, applier);
                                applier.on_event(event, more).await?
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
