//! `walbridge setup --copy-from NODE`: the initial copy, consistent with the stream.
//!
//! For each peer P of NODE, the slot NODE→P is created with an exported snapshot
//! ([`slot`]); every replicated table is copied from that snapshot into P ([`table`]); P's
//! origin `<prefix>_from_NODE` is set to the slot's consistent point. The copy holds exactly
//! the transactions committed before the consistent point, the slot streams exactly those
//! after it:
//!
//! ```text
//!   NODE WAL ──────────────────┬───────────────────────────────▶
//!                  consistent point C
//!   copy (snapshot at C) ◀─────┘└────▶ slot NODE→P streams from C
//! ```
//!
//! Copied rows are written on P under the origin `<prefix>_copy_NODE_<n>` (one per parallel
//! job: PostgreSQL 15 lets one session use an origin at a time) with commit time = NODE's clock
//! right after the slot was created, so conflict resolution sees them as NODE's versions older
//! than anything NODE streams later, and decoding on P drops them (nothing echoes back). These
//! origins stay until `walbridge teardown`: rows carry their ids.
//!
//! Order within `setup`: checks (targets empty unless `--truncate`, no slot NODE→P yet, every
//! copied column present on P), nothing changed on failure; schema, publication and origins;
//! then this copy; then the remaining slots as usual.
//!
//! Failure or Ctrl-C: copies in flight roll back, the tables already copied are emptied again
//! (they were empty, or `--truncate` emptied them), and every slot created so far is dropped:
//! no half-made slot stays behind.

pub mod progress;
pub mod slot;
pub mod table;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, quote_literal, TableInfo};
use crate::config::Config;
use crate::direction::prereq::Problem;
use crate::lsn::Lsn;
use crate::pgconn;
use progress::{human_bytes, Progress};
use table::TablePlan;

/// The copy failed or was interrupted.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A node could not be reached, or a statement, catalog read or replication command on
    /// it failed.
    #[error(transparent)]
    Node(#[from] pgconn::NodeError),
    /// Something the message explains.
    #[error("node {node}: {message}")]
    Other {
        /// The node.
        node: String,
        /// What is wrong.
        message: String,
    },
    /// SIGINT/SIGTERM arrived.
    #[error("interrupted")]
    Interrupted,
    /// The copy stopped and what it had done was undone (or could not be, as said).
    #[error("copy from {source_node} failed: {cause}; {undone}")]
    Aborted {
        /// The node copied from.
        source_node: String,
        /// Why it stopped (already in the message, so not a `source`).
        cause: Box<CopyError>,
        /// What was cleaned up.
        undone: String,
    },
}

fn sql_err(node: &str, what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CopyError {
    let sql = pgconn::NodeError::sql(node, &what.into());
    move |source| CopyError::Node(sql(source))
}

/// A node `setup` is connected to.
#[derive(Clone, Copy)]
pub struct NodeRef<'a> {
    /// The node's name.
    pub name: &'a str,
    /// Its SQL session.
    pub client: &'a Client,
}

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct CopyRequest {
    /// The node copied from.
    pub source: String,
    /// Tables copied at once (over all peers).
    pub jobs: usize,
    /// Empty the peers' tables first.
    pub truncate: bool,
}

/// The checked plan: which tables go to which peer, and how.
#[derive(Clone, Debug)]
pub struct CopyPlan {
    source: String,
    jobs: usize,
    truncate: bool,
    peers: Vec<PeerPlan>,
}

#[derive(Clone, Debug)]
struct PeerPlan {
    name: String,
    tables: Vec<TablePlan>,
}

impl CopyPlan {
    /// The node copied from.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The name of copy origin `n` for rows copied from `source` (`<prefix>_copy_<source>_<n>`).
pub fn copy_origin_name(config: &Config, source: &str, n: usize) -> String {
    format!("{}_copy_{source}_{n}", config.replication.slot_prefix)
}

/// Checks everything the copy needs before anything is changed, and plans it. The problems
/// are reported by `setup` together with its own.
pub async fn plan(
    config: &Config,
    request: &CopyRequest,
    nodes: &[NodeRef<'_>],
    tables: &[TableInfo],
) -> Result<(CopyPlan, Vec<Problem>), CopyError> {
    let mut problems = Vec::new();
    let problem = |node: &str, message: String| Problem {
        node: node.to_string(),
        message,
    };
    let Some(source) = nodes.iter().find(|n| n.name == request.source) else {
        return Err(CopyError::Other {
            node: request.source.clone(),
            message: "not a configured node".into(),
        });
    };
    let catalog_err = |node: &str| {
        let catalog = pgconn::NodeError::catalog(node);
        move |source| CopyError::Node(catalog(source))
    };
    let mut source_tables = Vec::new();
    for t in tables {
        if let Some(info) = catalog::table_info(source.client, &t.schema, &t.name)
            .await
            .map_err(catalog_err(source.name))?
        {
            source_tables.push(info);
        }
    }
    let peers: Vec<&NodeRef> = nodes.iter().filter(|n| n.name != request.source).collect();
    let units = peers.len() * source_tables.len();
    let jobs = request.jobs.clamp(1, units.max(1));

    let mut plans = Vec::new();
    for peer in &peers {
        let slot = config.slot_name(source.name, peer.name);
        let exists = source
            .client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql_err(source.name, "looking up slots"))?
            .is_some();
        if exists {
            problems.push(problem(
                source.name,
                format!(
                    "slot {slot} already exists; --copy-from creates it with the copy's snapshot \
                     so that no change is lost or applied twice. Drop it first (walbridge \
                     teardown, or SELECT pg_drop_replication_slot('{slot}') on {}) and copy \
                     again with --truncate",
                    source.name
                ),
            ));
        }

        let mut peer_tables = Vec::new();
        let mut non_empty = Vec::new();
        for src in &source_tables {
            let Some(dst) = catalog::table_info(peer.client, &src.schema, &src.name)
                .await
                .map_err(catalog_err(peer.name))?
            else {
                continue; // setup reports tables missing on a node
            };
            let skip = config.skip_columns_for(&src.schema, &src.name);
            let (plan, missing) = TablePlan::new(src, &dst, skip);
            problems.extend(missing.into_iter().map(|m| problem(peer.name, m)));
            let has_rows: bool = peer
                .client
                .query_one(plan.has_rows_sql().as_str(), &[])
                .await
                .map_err(sql_err(peer.name, format!("reading {}", plan.name)))?
                .get(0);
            if has_rows {
                non_empty.push(plan.name.clone());
            }
            peer_tables.push(plan);
        }
        if !non_empty.is_empty() && !request.truncate {
            problems.push(problem(
                peer.name,
                format!(
                    "table(s) {} already hold rows; --copy-from fills empty tables only: pass \
                     --truncate to empty them first (their rows here are lost), or empty them \
                     yourself",
                    non_empty.join(", ")
                ),
            ));
        }
        if request.truncate {
            // TRUNCATE fails when a table outside the copy references one inside it.
            let names: Vec<String> = peer_tables.iter().map(|p| p.quoted.clone()).collect();
            let blockers = peer
                .client
                .query(
                    "SELECT c.conrelid::regclass::text, c.confrelid::regclass::text
                       FROM pg_catalog.pg_constraint c
                      WHERE c.contype = 'f'
                        AND c.confrelid = ANY (SELECT n::regclass FROM unnest($1::text[]) n)
                        AND c.conrelid <> ALL (SELECT n::regclass FROM unnest($1::text[]) n)
                        AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_partition_ancestors(c.conrelid) a
                                         WHERE a.relid = ANY (SELECT n::regclass FROM unnest($1::text[]) n))",
                    &[&names],
                )
                .await
                .map_err(sql_err(peer.name, "reading foreign keys"))?;
            for b in blockers {
                let (from, to): (String, String) = (b.get(0), b.get(1));
                problems.push(problem(
                    peer.name,
                    format!(
                        "table {from} (not replicated) references {to}, so --truncate cannot \
                         empty {to}; empty {from} or drop its foreign key first"
                    ),
                ));
            }
        }

        // Every origin that has been used keeps one of max_replication_slots' entries (its
        // progress), until it is dropped: existing ones, the ones setup adds, and ours.
        let mut planned: Vec<String> = nodes
            .iter()
            .filter(|n| n.name != peer.name)
            .map(|n| config.origin_name(n.name))
            .collect();
        planned.push(config.skip_origin_name());
        planned.extend((1..=jobs).map(|n| copy_origin_name(config, source.name, n)));
        let row = peer
            .client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int8,
                        (SELECT count(*) FROM (SELECT roname::text FROM pg_catalog.pg_replication_origin
                                               UNION SELECT unnest($1::text[])) o)",
                &[&planned],
            )
            .await
            .map_err(sql_err(peer.name, "reading max_replication_slots"))?;
        let (max_slots, needed): (i64, i64) = (row.get(0), row.get(1));
        if needed > max_slots {
            problems.push(problem(
                peer.name,
                format!(
                    "max_replication_slots is {max_slots}, and replication origins need {needed} \
                     entries with --jobs {jobs} (each copy job writes under an origin of its \
                     own, kept until teardown); lower --jobs or raise max_replication_slots and \
                     restart PostgreSQL"
                ),
            ));
        }
        plans.push(PeerPlan {
            name: peer.name.to_string(),
            tables: peer_tables,
        });
    }
    Ok((
        CopyPlan {
            source: request.source.clone(),
            jobs,
            truncate: request.truncate,
            peers: plans,
        },
        problems,
    ))
}

/// What has been done so far, for undoing it.
#[derive(Default)]
struct Done {
    /// Slots whose creation was attempted (created or maybe created).
    slots: Vec<String>,
    /// Peers whose tables may have changed.
    touched: Vec<String>,
}

/// The copy's facts for one peer: the slot and its snapshot.
struct PeerSnapshot {
    slot: String,
    consistent_point: Lsn,
    snapshot: String,
    taken_at: String,
}

/// One table to one peer.
#[derive(Clone, Copy, Debug)]
struct Unit {
    peer: usize,
    table: usize,
}

/// A finished unit.
struct Copied {
    unit: Unit,
    rows: u64,
    bytes: u64,
    seconds: f64,
}

/// Runs the copy. On failure or interruption everything done is undone and the returned
/// error says what was cleaned up.
pub async fn run(
    config: &Config,
    plan: &CopyPlan,
    shutdown: &CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<(), CopyError> {
    let mut done = Done::default();
    match run_inner(config, plan, shutdown, out, &mut done).await {
        Ok(()) => Ok(()),
        Err(cause) => {
            let undone = undo(config, plan, &done).await;
            Err(CopyError::Aborted {
                source_node: plan.source.clone(),
                cause: Box::new(cause),
                undone,
            })
        }
    }
}

/// Session settings of every copy session: nothing times out, nothing is JIT-compiled.
const SESSION_SETTINGS: &str = "SET statement_timeout = 0; SET lock_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0; SET jit = off";

async fn connect(config: &Config, node: &str, app: &str) -> Result<Client, CopyError> {
    let dsn = &config
        .node(node)
        .ok_or_else(|| CopyError::Other {
            node: node.to_string(),
            message: "not a configured node".into(),
        })?
        .dsn;
    let client = pgconn::connect(dsn, app)
        .await
        .map_err(pgconn::NodeError::connect(node))?;
    client
        .batch_execute(SESSION_SETTINGS)
        .await
        .map_err(sql_err(node, "preparing the session"))?;
    Ok(client)
}

/// Creates the origin when missing.
async fn ensure_origin(client: &Client, node: &str, origin: &str) -> Result<(), CopyError> {
    client
        .execute(
            "SELECT pg_catalog.pg_replication_origin_create($1)
              WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await
        .map_err(sql_err(node, format!("creating origin {origin}")))?;
    Ok(())
}

/// Sets up `origin` on a session, waiting while a session that just went away still holds it.
async fn setup_origin_session(client: &Client, node: &str, origin: &str) -> Result<(), CopyError> {
    let mut attempts = 0;
    loop {
        match client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                &[&origin],
            )
            .await
        {
            Ok(_) => return Ok(()),
            // 55006: still held by a session that is going away.
            Err(e) if attempts < 50 && e.code().is_some_and(|c| c.code() == "55006") => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(sql_err(node, format!("using origin {origin}"))(e)),
        }
    }
}

/// A peer session writing under `origin`: replica role (no user triggers or FK checks, as
/// PostgreSQL's own apply workers) when the role may set it.
async fn peer_session(
    config: &Config,
    node: &str,
    origin: &str,
    app: &str,
) -> Result<Client, CopyError> {
    let client = connect(config, node, app).await?;
    let superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_err(node, "reading the role"))?
        .get(0);
    // walbridge.skip: trigger mode's change-logging triggers ignore this session.
    let mut settings = String::from("SET walbridge.skip = 'on';");
    if superuser {
        settings.push_str("SET session_replication_role = replica;");
    }
    client
        .batch_execute(&settings)
        .await
        .map_err(sql_err(node, "preparing the session"))?;
    setup_origin_session(&client, node, origin).await?;
    Ok(client)
}

/// Empties every planned table of `peer` in one transaction under the copy origin.
async fn truncate_peer(
    client: &Client,
    peer: &PeerPlan,
    stamp: Option<(&Lsn, &str)>,
) -> Result<(), CopyError> {
    if peer.tables.is_empty() {
        return Ok(());
    }
    let mut sql = String::from("BEGIN;");
    if let Some((lsn, at)) = stamp {
        sql.push_str(&format!(
            "SELECT pg_catalog.pg_replication_origin_xact_setup({}::pg_lsn, {}::timestamptz);",
            quote_literal(&lsn.to_string()),
            quote_literal(at)
        ));
    }
    sql.push_str(&table::truncate_sql(&peer.tables));
    sql.push_str("; COMMIT");
    client
        .batch_execute(&sql)
        .await
        .map_err(sql_err(&peer.name, "emptying the tables (--truncate)"))
}

async fn run_inner(
    config: &Config,
    plan: &CopyPlan,
    shutdown: &CancellationToken,
    out: &mut (dyn Write + Send),
    done: &mut Done,
) -> Result<(), CopyError> {
    let started = Instant::now();
    let source = plan.source.as_str();
    let source_dsn = &config
        .node(source)
        .ok_or_else(|| CopyError::Other {
            node: source.to_string(),
            message: "not a configured node".into(),
        })?
        .dsn;
    let src = connect(config, source, &format!("walbridge-copy-{source}")).await?;

    // Origins on every peer: the copy's own, and the stream's (its progress is set below).
    let mut ctl = Vec::new();
    for peer in &plan.peers {
        let client = connect(config, &peer.name, &format!("walbridge-copy-{source}")).await?;
        for n in 1..=plan.jobs {
            ensure_origin(&client, &peer.name, &copy_origin_name(config, source, n)).await?;
        }
        ensure_origin(&client, &peer.name, &config.origin_name(source)).await?;
        ctl.push(client);
    }

    // Row and size estimates, largest tables first so the parallel jobs end together.
    let mut estimates: HashMap<String, (Option<u64>, i64)> = HashMap::new();
    for t in plan.peers.iter().flat_map(|p| &p.tables) {
        if estimates.contains_key(&t.name) {
            continue;
        }
        let row = src
            .query_one(
                "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::float8,
                        coalesce(bool_or(c.reltuples < 0), true),
                        coalesce(sum(pg_catalog.pg_relation_size(c.oid)), 0)::int8
                   FROM pg_catalog.pg_class c
                  WHERE c.relkind = 'r'
                    AND c.oid IN (SELECT $1::text::regclass
                                  UNION ALL
                                  SELECT relid FROM pg_catalog.pg_partition_tree($1::text::regclass))",
                &[&t.quoted],
            )
            .await
            .map_err(sql_err(
                source,
                format!("estimating the size of {}", t.name),
            ))?;
        let (rows, unknown, bytes): (f64, bool, i64) = (row.get(0), row.get(1), row.get(2));
        let rows = (!unknown).then_some(rows.max(0.0) as u64);
        estimates.insert(t.name.clone(), (rows, bytes));
    }

    // The slots, each with its snapshot; their sessions stay open until the copy is done.
    let mut exported = Vec::new();
    let mut snapshots = Vec::new();
    for peer in &plan.peers {
        let name = config.slot_name(source, &peer.name);
        done.slots.push(name.clone());
        let slot = slot::create(
            source,
            source_dsn,
            &src,
            &name,
            config.replication.plugin.as_str(),
            shutdown,
        )
        .await?;
        let _ = writeln!(
            out,
            "{source} -> {}: slot {} created at {} with snapshot {}",
            peer.name, slot.name, slot.consistent_point, slot.snapshot
        );
        snapshots.push(PeerSnapshot {
            slot: slot.name.clone(),
            consistent_point: slot.consistent_point,
            snapshot: slot.snapshot.clone(),
            taken_at: slot.taken_at.clone(),
        });
        exported.push(slot);
    }

    // Empty the tables first when asked, all at once (foreign keys between them).
    for ((peer, client), snap) in plan.peers.iter().zip(&ctl).zip(&snapshots) {
        done.touched.push(peer.name.clone());
        if plan.truncate {
            if shutdown.is_cancelled() {
                return Err(CopyError::Interrupted);
            }
            setup_origin_session(client, &peer.name, &copy_origin_name(config, source, 1)).await?;
            truncate_peer(client, peer, Some((&snap.consistent_point, &snap.taken_at))).await?;
            client
                .batch_execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
                .await
                .map_err(sql_err(&peer.name, "releasing the copy origin"))?;
            let _ = writeln!(
                out,
                "{}: emptied {} table(s) (--truncate)",
                peer.name,
                peer.tables.len()
            );
        }
    }

    let mut units: Vec<Unit> = plan
        .peers
        .iter()
        .enumerate()
        .flat_map(|(p, peer)| (0..peer.tables.len()).map(move |t| Unit { peer: p, table: t }))
        .collect();
    units.sort_by_key(|u| {
        std::cmp::Reverse(
            plan.peers
                .get(u.peer)
                .and_then(|p| p.tables.get(u.table))
                .and_then(|t| estimates.get(&t.name))
                .map_or(0, |e| e.1),
        )
    });
    let queue = Mutex::new(units.into_iter().collect::<VecDeque<_>>());
    let progress = Progress::detect();
    let ctx = WorkerContext {
        config,
        plan,
        snapshots: &snapshots,
        estimates: &estimates,
        progress: &progress,
        queue: &queue,
    };
    let workers = try_join_all((1..=plan.jobs).map(|n| worker(&ctx, n)));
    let results = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Err(CopyError::Interrupted),
        r = workers => r?,
    };
    let mut copied: Vec<Copied> = results.into_iter().flatten().collect();

    // The snapshots are no longer needed.
    for slot in exported {
        slot.release().await;
    }

    copied.sort_by_key(|c| (c.unit.peer, c.unit.table));
    let (mut rows, mut bytes) = (0u64, 0u64);
    for c in &copied {
        rows += c.rows;
        bytes += c.bytes;
        if let Some((peer, t)) = plan
            .peers
            .get(c.unit.peer)
            .and_then(|p| p.tables.get(c.unit.table).map(|t| (p, t)))
        {
            let _ = writeln!(
                out,
                "{source} -> {}: {} {} rows ({}, {}) in {:.1}s",
                peer.name,
                t.name,
                c.rows,
                human_bytes(c.bytes),
                if t.binary { "binary" } else { "text" },
                c.seconds
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "copied {rows} rows ({}) from {source} to {} peer(s) in {secs:.1}s ({:.0} rows/s)",
        human_bytes(bytes),
        plan.peers.len(),
        rows as f64 / secs.max(1e-3)
    );
    // The stream NODE→P starts where the copy ends; sequences continue after copied values.
    for ((peer, client), snap) in plan.peers.iter().zip(&ctl).zip(&snapshots) {
        let origin = config.origin_name(source);
        client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_advance($1, $2::text::pg_lsn)",
                &[&origin, &snap.consistent_point.to_string()],
            )
            .await
            .map_err(sql_err(
                &peer.name,
                format!("setting the progress of origin {origin}"),
            ))?;
        if config.replication.sequence_ranges {
            let _ = writeln!(
                out,
                "{}: sequences left alone (sequence_ranges keeps each node in its own range)",
                peer.name
            );
        } else {
            for t in &peer.tables {
                for line in advance_sequences(client, &peer.name, t).await? {
                    let _ = writeln!(out, "{}: {line}", peer.name);
                }
            }
        }
        let _ = writeln!(
            out,
            "{source} -> {}: stream starts at {} (slot {}, origin {origin} on {})",
            peer.name, snap.consistent_point, snap.slot, peer.name
        );
    }

    Ok(())
}

/// Everything a copy worker shares with the others.
struct WorkerContext<'a> {
    config: &'a Config,
    plan: &'a CopyPlan,
    snapshots: &'a [PeerSnapshot],
    estimates: &'a HashMap<String, (Option<u64>, i64)>,
    progress: &'a Progress,
    queue: &'a Mutex<VecDeque<Unit>>,
}

/// Copy job `n`: takes units off the queue until it is empty. It keeps one source session and
/// one session per peer, the latter writing under the origin `<prefix>_copy_<source>_<n>`.
async fn worker(ctx: &WorkerContext<'_>, n: usize) -> Result<Vec<Copied>, CopyError> {
    let source = ctx.plan.source.as_str();
    let origin = copy_origin_name(ctx.config, source, n);
    let mut src: Option<Client> = None;
    let mut peers: HashMap<usize, Client> = HashMap::new();
    let mut copied = Vec::new();
    loop {
        let unit = match ctx.queue.lock() {
            Ok(mut q) => q.pop_front(),
            Err(_) => None,
        };
        let Some(unit) = unit else { break };
        let (Some(peer), Some(snap)) =
            (ctx.plan.peers.get(unit.peer), ctx.snapshots.get(unit.peer))
        else {
            continue;
        };
        let Some(t) = peer.tables.get(unit.table) else {
            continue;
        };
        let started = Instant::now();
        if src.is_none() {
            src = Some(connect(ctx.config, source, &format!("walbridge-copy-{source}-{n}")).await?);
        }
        let Some(s) = src.as_ref() else { continue };
        if let std::collections::hash_map::Entry::Vacant(e) = peers.entry(unit.peer) {
            e.insert(
                peer_session(
                    ctx.config,
                    &peer.name,
                    &origin,
                    &format!("walbridge-copy-{source}-{n}"),
                )
                .await?,
            );
        }
        let Some(p) = peers.get(&unit.peer) else {
            continue;
        };
        s.batch_execute(&table::import_snapshot_sql(&snap.snapshot))
            .await
            .map_err(sql_err(
                source,
                format!("importing snapshot {}", snap.snapshot),
            ))?;
        p.batch_execute(&format!(
            "BEGIN; SELECT pg_catalog.pg_replication_origin_xact_setup({}::pg_lsn, {}::timestamptz)",
            quote_literal(&snap.consistent_point.to_string()),
            quote_literal(&snap.taken_at)
        ))
        .await
        .map_err(sql_err(&peer.name, "starting the copy transaction"))?;
        let estimate = ctx.estimates.get(&t.name).and_then(|e| e.0);
        let mut progress = ctx
            .progress
            .start(format!("{} -> {}", t.name, peer.name), estimate);
        match table::pump(t, (source, s), (&peer.name, p), &mut progress).await {
            Ok((rows, bytes)) => {
                p.batch_execute("COMMIT")
                    .await
                    .map_err(sql_err(&peer.name, format!("committing {}", t.name)))?;
                s.batch_execute("COMMIT")
                    .await
                    .map_err(sql_err(source, "ending the snapshot transaction"))?;
                progress.finish(rows);
                copied.push(Copied {
                    unit,
                    rows,
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            Err(e) => {
                progress.abandon();
                return Err(e);
            }
        }
    }
    for (i, p) in &peers {
        let node = ctx.plan.peers.get(*i).map_or("?", |p| p.name.as_str());
        p.batch_execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
            .await
            .map_err(sql_err(node, "releasing the copy origin"))?;
    }
    Ok(copied)
}

/// Moves every serial/identity sequence of `t` on the peer past the largest copied value.
async fn advance_sequences(
    client: &Client,
    node: &str,
    t: &TablePlan,
) -> Result<Vec<String>, CopyError> {
    let seqs = client
        .query(
            "SELECT a.attname::text, s.seq
               FROM pg_catalog.pg_attribute a,
                    LATERAL (SELECT pg_catalog.pg_get_serial_sequence($1, a.attname) AS seq) s
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                AND s.seq IS NOT NULL",
            &[&t.quoted],
        )
        .await
        .map_err(sql_err(
            node,
            format!("finding the sequences of {}", t.name),
        ))?;
    let mut lines = Vec::new();
    for row in seqs {
        let (column, seq): (String, String) = (row.get(0), row.get(1));
        let sql = format!(
            "SELECT pg_catalog.setval($1::text::regclass,
                    greatest(m.v, coalesce(pg_catalog.pg_sequence_last_value($1::text::regclass), m.v)))
               FROM (SELECT max({col})::int8 AS v FROM {rel}) m
               JOIN pg_catalog.pg_sequence q ON q.seqrelid = $1::text::regclass
              WHERE m.v IS NOT NULL AND q.seqincrement > 0",
            col = catalog::quote_ident(&column),
            rel = t.relation(),
        );
        if let Some(r) = client
            .query_opt(sql.as_str(), &[&seq])
            .await
            .map_err(sql_err(node, format!("advancing sequence {seq}")))?
        {
            let value: i64 = r.get(0);
            lines.push(format!(
                "sequence {seq} set to {value} ({}.{column})",
                t.name
            ));
        }
    }
    Ok(lines)
}

/// Undoes a failed copy: empties the peers' tables again (they were empty before, or
/// `--truncate` emptied them), then drops the slots created. Returns what was done, in words.
async fn undo(config: &Config, plan: &CopyPlan, done: &Done) -> String {
    let mut said = Vec::new();
    let source = plan.source.as_str();
    for name in &done.touched {
        let Some(peer) = plan.peers.iter().find(|p| &p.name == name) else {
            continue;
        };
        let result = async {
            let client = connect(config, name, &format!("walbridge-copy-{source}-undo")).await?;
            setup_origin_session(&client, name, &copy_origin_name(config, source, 1)).await?;
            // The session's origin alone tags the TRUNCATE, so decoding here drops it.
            truncate_peer(&client, peer, None).await
        }
        .await;
        match result {
            Ok(()) => said.push(format!("emptied the copied tables on {name} again")),
            Err(e) => said.push(format!(
                "could not empty the tables on {name} ({e}); run setup --copy-from with --truncate"
            )),
        }
    }
    let client = connect(config, source, &format!("walbridge-copy-{source}-undo")).await;
    for slot_name in &done.slots {
        match &client {
            Ok(c) => match slot::drop_if_exists(c, slot_name).await {
                Ok(true) => said.push(format!("dropped slot {slot_name} on {source}")),
                Ok(false) => {}
                Err(e) => said.push(format!(
                    "could not drop slot {slot_name} on {source} ({}); drop it with SELECT \
                     pg_drop_replication_slot('{slot_name}')",
                    crate::pgconn::pg_message(&e)
                )),
            },
            Err(e) => said.push(format!(
                "could not reach {source} to drop slot {slot_name} ({e}); drop it with SELECT \
                 pg_drop_replication_slot('{slot_name}')"
            )),
        }
    }
    if said.is_empty() {
        "the copy had not changed anything yet".to_string()
    } else {
        said.join(", ")
    }
}
