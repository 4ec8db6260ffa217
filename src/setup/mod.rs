//! `walbridge setup` and `walbridge teardown`: prepare every node, and remove it all again.
//!
//! Setup is idempotent: every object is created only when missing and adjusted when it differs,
//! so running it twice changes nothing. Prerequisites are checked on every node before
//! anything is created, and all problems are reported together.
//!
//! Stream mode creates, per node, the `walbridge` schema (`sql/schema.sql`), the skip origin,
//! the publication and delete-tombstone triggers; per direction S→T, the slot
//! `<prefix>_S_to_T` on S and the origin `<prefix>_from_S` on T. The slot is created last: its
//! consistent point is where replication of S→T starts, so everything committed after setup
//! is replicated.
//!
//! Trigger mode (per node, [`crate::trigger::choose`]) creates the change table, its
//! dead-letter twin and the capture triggers instead of the publication and slots
//! ([`capture`]); a node that was in trigger mode and is now in stream mode is
//! cut over once its slots exist ([`capture::cut_over`]).

pub mod capture;
pub mod failover;
mod sequences;
mod teardown;

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::catalog::{self, quote_ident, TableInfo, TableKind};
use crate::config::{Config, ConflictPolicy};
use crate::pgconn;
use crate::trigger::{self, CaptureMode};
// Moved down (the prerequisite checks to `direction`, the server-message helpers to
// `pgconn`); still importable here so code written before the move keeps building.
pub use crate::direction::prereq::{self, Problem};
pub use crate::pgconn::{is_superuser, pg_message, pg_message_with_values};
pub use teardown::teardown;

/// The SQL that creates walbridge's schema objects on a node.
pub const SCHEMA_SQL: &str = include_str!("../../sql/schema.sql");
/// `sql/definer_roles.sql`: NOLOGIN owners for the SECURITY DEFINER functions (superuser only).
pub const DEFINER_ROLES_SQL: &str = include_str!("../../sql/definer_roles.sql");
/// `walbridge.ddl()` and what it needs (`sql/ddl.sql`).
pub const DDL_SQL: &str = include_str!("../../sql/ddl.sql");

/// Name of the statement-level trigger that records delete tombstones.
pub const TOMBSTONE_TRIGGER: &str = "walbridge_tombstones";

/// Name of the row trigger that keeps a node's own writes within `node_priority`'s order.
pub const PRIORITY_GUARD_TRIGGER: &str = "walbridge_priority_guard";

/// Options of `walbridge setup`.
#[derive(Clone, Debug, Default)]
pub struct SetupOptions {
    /// `--copy-from NODE`.
    pub copy_from: Option<String>,
    /// `--jobs N`.
    pub jobs: usize,
    /// `--truncate`.
    pub truncate: bool,
    /// Cancelled on SIGINT/SIGTERM: the copy stops and undoes itself.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Setup or teardown failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A node could not be reached, or a statement, catalog read or replication command on
    /// it failed.
    #[error(transparent)]
    Node(#[from] pgconn::NodeError),
    /// Nodes lack prerequisites; nothing was changed.
    #[error("{} prerequisite(s) missing, nothing was changed:\n  {}", .0.len(), .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Prerequisites(Vec<Problem>),
    /// The nodes' schemas could not be compared.
    #[error(transparent)]
    Drift(#[from] crate::drift::DriftError),
    /// The initial copy (`--copy-from`) failed; it says what it undid.
    #[error(transparent)]
    Copy(#[from] crate::copy::CopyError),
    /// `replication.sequence_ranges`: a sequence cannot hold its node's range.
    #[error(
        "node {node}: sequence {sequence} has MAXVALUE {max_value}, below {first}, the first \
         value of the node's range; raise its MAXVALUE or turn replication.sequence_ranges off"
    )]
    SequenceRange {
        /// The node.
        node: String,
        /// The sequence (as `regclass` text).
        sequence: String,
        /// Its `MAXVALUE`.
        max_value: i64,
        /// The first value of the node's residue class.
        first: i64,
    },
    /// Something else that the message explains.
    #[error("{0}")]
    Other(String),
}

/// Maps a failed statement to [`SetupError::Node`] naming the node and what was being done.
pub(crate) fn sql_err(
    node: &str,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    let sql = pgconn::NodeError::sql(node, &what.into());
    move |source| SetupError::Node(sql(source))
}

/// An open connection to a configured node.
pub struct NodeSession {
    /// The node's name.
    pub name: String,
    /// The SQL connection.
    pub client: Client,
}

/// Connects to every node, in configuration order.
pub async fn connect_all(config: &Config, purpose: &str) -> Result<Vec<NodeSession>, SetupError> {
    let mut out = Vec::with_capacity(config.nodes.len());
    for node in &config.nodes {
        let client = pgconn::connect(&node.dsn, &format!("walbridge-{purpose}"))
            .await
            .map_err(pgconn::NodeError::connect(&node.name))?;
        out.push(NodeSession {
            name: node.name.clone(),
            client,
        });
    }
    Ok(out)
}

/// The replicated tables, identical on every node: resolved from the patterns on each node,
/// with a problem for each table some node lacks and for each table without a key.
pub async fn resolve_tables(
    config: &Config,
    nodes: &[NodeSession],
) -> Result<(Vec<TableInfo>, Vec<Problem>), SetupError> {
    let mut per_node: BTreeMap<&str, BTreeMap<(String, String), TableInfo>> = BTreeMap::new();
    for n in nodes {
        let tables = prereq::selected_tables(&n.client, config)
            .await
            .map_err(pgconn::NodeError::catalog(&n.name))?;
        per_node.insert(
            &n.name,
            tables
                .into_iter()
                .map(|t| ((t.schema.clone(), t.name.clone()), t))
                .collect(),
        );
    }
    let all: BTreeSet<(String, String)> =
        per_node.values().flat_map(|m| m.keys().cloned()).collect();
    let mut problems = Vec::new();
    for (schema, name) in &all {
        let has: Vec<&str> = nodes
            .iter()
            .filter(|n| per_node[n.name.as_str()].contains_key(&(schema.clone(), name.clone())))
            .map(|n| n.name.as_str())
            .collect();
        for n in nodes {
            if !has.contains(&n.name.as_str()) {
                problems.push(Problem {
                    node: n.name.clone(),
                    message: format!(
                        "table {schema}.{name} exists on {} but not here; create it with the same \
                         columns (DDL is not replicated) or add it to replication.exclude",
                        has.join(", ")
                    ),
                });
            }
        }
    }
    // Updates and deletes need a key on every node (from what was just read: no second look).
    for n in nodes {
        for info in per_node[n.name.as_str()].values() {
            problems.extend(prereq::identity_problem(&n.name, info));
        }
    }
    let first = nodes
        .first()
        .map(|n| per_node[n.name.as_str()].clone())
        .unwrap_or_default();
    let tables = first.into_values().collect();
    Ok((tables, problems))
}

/// Runs `walbridge setup`: checks, then creates what is missing. Progress lines go to `out`.
pub async fn setup(
    config: &Config,
    options: &SetupOptions,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), SetupError> {
    let nodes = connect_all(config, "setup").await?;

    // 1. Everything every node needs, checked before anything changes. Each node gets its
    //    capture mode first (stream or trigger; `auto` decides per node).
    let mut problems = Vec::new();
    let mut modes: BTreeMap<String, (CaptureMode, String)> = BTreeMap::new();
    let mut warnings: Vec<String> = Vec::new();
    let mut lossy_nodes: Vec<String> = Vec::new();
    let mut versions: BTreeMap<String, i64> = BTreeMap::new();
    let mut standby_lines: Vec<String> = Vec::new();
    for n in &nodes {
        let facts = prereq::node_facts(&n.client, &config.replication.slot_prefix)
            .await
            .map_err(sql_err(&n.name, "reading server settings"))?;
        versions.insert(n.name.clone(), facts.server_version_num);
        let (mode, reason) = trigger::choose(config.replication.mode, &facts);
        let (p, w, lossy) = node_problems(config, n, mode, &facts).await?;
        problems.extend(p);
        warnings.extend(w.into_iter().map(|w| format!("{}: warning: {w}", n.name)));
        if mode == CaptureMode::Stream {
            let (lines, w) = standby_report(config, n, &facts).await?;
            standby_lines.extend(lines);
            warnings.extend(w.into_iter().map(|w| format!("{}: warning: {w}", n.name)));
        }
        if lossy {
            lossy_nodes.push(n.name.clone());
        }
        modes.insert(n.name.clone(), (mode, reason));
    }
    let (tables, missing) = resolve_tables(config, &nodes).await?;
    problems.extend(missing);
    let (p, w) = lossy_wal2json(config, &nodes, &lossy_nodes, &tables).await?;
    problems.extend(p);
    warnings.extend(w);
    let (p, w) = schema_drift(config, &nodes).await?;
    problems.extend(p);
    warnings.extend(w);
    if tables.is_empty() {
        problems.push(Problem {
            node: nodes.first().map(|n| n.name.clone()).unwrap_or_default(),
            message: format!(
                "no table matches replication.tables {:?}; create the tables first (on every node)",
                config
                    .replication
                    .tables
                    .include()
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
            ),
        });
    }
    // The copy's own checks (empty targets, no slot yet, columns), before anything changes.
    let copy_plan = match &options.copy_from {
        Some(_) if modes.values().any(|(m, _)| *m == CaptureMode::Trigger) => {
            problems.push(Problem {
                node: modes
                    .iter()
                    .find(|(_, (m, _))| *m == CaptureMode::Trigger)
                    .map(|(n, _)| n.clone())
                    .unwrap_or_default(),
                message: "setup --copy-from needs every node in stream mode (the copy meets                           the stream at a slot's snapshot), and this node is in trigger mode;                           copy the tables by hand (pg_dump) before setup"
                    .to_string(),
            });
            None
        }
        Some(source) => {
            let refs: Vec<crate::copy::NodeRef> = nodes
                .iter()
                .map(|n| crate::copy::NodeRef {
                    name: &n.name,
                    client: &n.client,
                })
                .collect();
            let request = crate::copy::CopyRequest {
                source: source.clone(),
                jobs: options.jobs,
                truncate: options.truncate,
            };
            let (plan, refusals) = crate::copy::plan(config, &request, &refs, &tables).await?;
            problems.extend(refusals);
            Some(plan)
        }
        None => None,
    };
    if !problems.is_empty() {
        return Err(SetupError::Prerequisites(problems));
    }
    let _ = writeln!(
        out,
        "replicating {} table(s): {}",
        tables.len(),
        tables
            .iter()
            .map(|t| t.qualified_name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mode_of = |node: &str| modes.get(node).map_or(CaptureMode::Stream, |m| m.0);
    for (node, (mode, reason)) in &modes {
        let _ = writeln!(out, "{node}: {} mode ({reason})", mode.as_str());
    }
    for w in &warnings {
        let _ = writeln!(out, "{w}");
    }
    let any_trigger = modes.values().any(|(m, _)| *m == CaptureMode::Trigger);

    // 2. Per node: schema, settings, skip origin, then per mode the publication or the change
    //    table and capture triggers; tombstone triggers in both.
    for n in &nodes {
        let node_mode = mode_of(&n.name);
        install_schema(config, n).await?;
        match ensure_origin(&n.client, &n.name, &config.skip_origin_name()).await {
            Ok(true) => {
                let _ = writeln!(
                    out,
                    "{}: created origin {}",
                    n.name,
                    config.skip_origin_name()
                );
            }
            Ok(false) => {}
            Err(e) if node_mode == CaptureMode::Trigger && is_permission_error(&e) => {
                let _ = writeln!(out, "{}: warning: {e}", n.name);
            }
            Err(e) => return Err(e),
        }
        if any_trigger {
            capture::install_bookkeeping(n).await?;
        }
        if node_mode == CaptureMode::Stream {
            let pub_line = ensure_publication(config, n, &tables).await?;
            let _ = writeln!(out, "{}: {pub_line}", n.name);
        }
        let mut infos = Vec::with_capacity(tables.len());
        for t in &tables {
            let info = catalog::table_info(&n.client, &t.schema, &t.name)
                .await
                .map_err(pgconn::NodeError::catalog(&n.name))?
                .ok_or_else(|| {
                    SetupError::Other(format!(
                        "node {}: table {} disappeared during setup",
                        n.name,
                        t.qualified_name()
                    ))
                })?;
            ensure_tombstone_trigger(n, &info).await?;
            ensure_priority_guard(config, n, &info).await?;
            infos.push(info);
        }
        if node_mode == CaptureMode::Trigger {
            capture::install_node(config, n, &infos, out).await?;
        }
    }

    // The copy creates the slots <copy_from>→P with their snapshots and fills the peers.
    if let Some(plan) = &copy_plan {
        crate::copy::run(config, plan, &options.shutdown, out).await?;
    }

    // 3. Per direction: the origin on the target, then the slot on the source (stream-mode
    //    sources; a trigger-mode source's change table serves every direction from it).
    for d in config.directions() {
        let source = node_session(&nodes, &d.source)?;
        let target = node_session(&nodes, &d.target)?;
        let origin = config.origin_name(&d.source);
        let slot = config.slot_name(&d.source, &d.target);
        let origin_created = match ensure_origin(&target.client, &target.name, &origin).await {
            Ok(created) => created,
            Err(e) if mode_of(&d.target) == CaptureMode::Trigger && is_permission_error(&e) => {
                let _ = writeln!(out, "{}: warning: {e}", d.target);
                false
            }
            Err(e) => return Err(e),
        };
        if mode_of(&d.source) == CaptureMode::Trigger {
            let _ = writeln!(
                out,
                "{} -> {}: trigger mode (change table {} on {}), origin {origin} on {} {}",
                d.source,
                d.target,
                config.trigger.table,
                d.source,
                d.target,
                if origin_created { "created" } else { "exists" },
            );
            continue;
        }
        let failover = failover::wants_failover(
            config.replication.failover_slots,
            versions.get(&d.source).copied().unwrap_or(0),
        );
        let slot_created = ensure_slot(config, source, &slot, failover).await?;
        if slot_created && !origin_created {
            // A new slot starts a new stream: progress recorded for an old one would skip it.
            reset_origin(&target.client, &target.name, &origin).await?;
        }
        let _ = writeln!(
            out,
            "{} -> {}: slot {slot} on {} {}, origin {origin} on {} {}",
            d.source,
            d.target,
            d.source,
            if slot_created { "created" } else { "exists" },
            d.target,
            if origin_created { "created" } else { "exists" },
        );
    }
    // 4. Nodes switching from trigger to stream mode: cut over now that their slots exist.
    for n in &nodes {
        if mode_of(&n.name) != CaptureMode::Stream {
            continue;
        }
        let installed = capture::capture_installed(&n.client)
            .await
            .map_err(sql_err(&n.name, "looking for capture triggers"))?;
        let pending = capture::cutover_pending(&n.client)
            .await
            .map_err(sql_err(&n.name, "reading the cut-over state"))?;
        if installed || pending {
            capture::cut_over(config, &nodes, &n.name, out).await?;
        }
    }
    for n in &nodes {
        if let Some((mode, reason)) = modes.get(&n.name) {
            trigger::mode::record_mode(&n.client, *mode, reason)
                .await
                .map_err(sql_err(&n.name, "recording the capture mode"))?;
        }
    }
    if config.replication.sequence_ranges {
        sequences::give_each_node_its_range(config, &nodes, &tables, out).await?;
    }
    for line in &standby_lines {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "setup complete; start replication with: walbridge run");
    Ok(())
}

/// A failure for lack of privilege (SQLSTATE 42501), which trigger mode can live with.
fn is_permission_error(e: &SetupError) -> bool {
    matches!(e, SetupError::Node(pgconn::NodeError::Sql { source, .. })
        if source.as_db_error().is_some_and(|d| d.code().code() == "42501"))
}

/// `check-config --connect`: every node reachable and ready for the configured mode.
/// Returns the problems found (empty = ready); prints one line per node to `out`.
pub async fn check(
    config: &Config,
    out: &mut (dyn std::io::Write + Send),
) -> Result<Vec<Problem>, SetupError> {
    let mut problems = Vec::new();
    let mut nodes = Vec::new();
    let mut lossy_nodes: Vec<String> = Vec::new();
    for node in &config.nodes {
        match pgconn::connect(&node.dsn, "walbridge-check").await {
            Ok(client) => {
                let _ = writeln!(out, "{}: reachable ({})", node.name, node.dsn.describe());
                nodes.push(NodeSession {
                    name: node.name.clone(),
                    client,
                });
            }
            Err(e) => problems.push(Problem {
                node: node.name.clone(),
                message: format!("unreachable: {e}"),
            }),
        }
    }
    for n in &nodes {
        let facts = prereq::node_facts(&n.client, &config.replication.slot_prefix)
            .await
            .map_err(sql_err(&n.name, "reading server settings"))?;
        // Each node is checked for the mode it gets (`auto` decides per node).
        let (mode, reason) = trigger::choose(config.replication.mode, &facts);
        let _ = writeln!(out, "{}: {} mode ({reason})", n.name, mode.as_str());
        let (p, w, lossy) = node_problems(config, n, mode, &facts).await?;
        problems.extend(p);
        for w in w {
            let _ = writeln!(out, "{}: note: {w}", n.name);
        }
        if mode == CaptureMode::Stream {
            let (lines, w) = standby_report(config, n, &facts).await?;
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
            for w in w {
                let _ = writeln!(out, "{}: warning: {w}", n.name);
            }
        }
        if lossy {
            lossy_nodes.push(n.name.clone());
        }
    }
    if nodes.len() == config.nodes.len() {
        let (tables, missing) = resolve_tables(config, &nodes).await?;
        problems.extend(missing);
        let (p, w) = lossy_wal2json(config, &nodes, &lossy_nodes, &tables).await?;
        problems.extend(p);
        for w in w {
            let _ = writeln!(out, "{w}");
        }
        let (p, w) = schema_drift(config, &nodes).await?;
        problems.extend(p);
        for w in w {
            let _ = writeln!(out, "{w}");
        }
        let _ = writeln!(out, "tables resolved: {}", tables.len());
    }
    Ok(problems)
}

/// What one node lacks for the capture mode it gets, warnings that do not stop setup, and
/// whether its wal2json writes NaN and ±Infinity as null (checked against the tables later).
async fn node_problems(
    config: &Config,
    n: &NodeSession,
    mode: CaptureMode,
    facts: &prereq::NodeFacts,
) -> Result<(Vec<Problem>, Vec<String>, bool), SetupError> {
    if mode == CaptureMode::Trigger {
        let (p, w) = capture::check_node(config, &n.client, &n.name)
            .await
            .map_err(sql_err(&n.name, "checking trigger-mode prerequisites"))?;
        let problems = p
            .into_iter()
            .map(|message| Problem {
                node: n.name.clone(),
                message,
            })
            .collect();
        return Ok((problems, w, false));
    }
    let mut problems = prereq::common_problems(&n.name, facts);
    problems.extend(prereq::stream_problems(&n.name, facts, config.nodes.len()));
    let mut lossy = false;
    if facts.stream_blocker().is_none() {
        let probe = prereq::plugin_probe(&n.client, &n.name, config.replication.plugin)
            .await
            .map_err(sql_err(&n.name, "probing the output plugin"))?;
        problems.extend(probe.problem);
        lossy = probe.lossy_wal2json;
    }
    Ok((problems, Vec::new(), lossy))
}

/// For each node whose wal2json writes NaN and ±Infinity as null: a problem naming the float
/// and numeric columns of `tables` (or, with `replication.allow_lossy_wal2json`, a warning).
async fn lossy_wal2json(
    config: &Config,
    nodes: &[NodeSession],
    lossy: &[String],
    tables: &[TableInfo],
) -> Result<(Vec<Problem>, Vec<String>), SetupError> {
    let names: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    for n in nodes.iter().filter(|n| lossy.contains(&n.name)) {
        let found = prereq::lossy_wal2json_problem(&n.client, &n.name, config, &names)
            .await
            .map_err(pgconn::NodeError::catalog(&n.name))?;
        match found {
            Some(p) if config.replication.allow_lossy_wal2json => warnings.push(format!(
                "{}: warning: {} (allowed by replication.allow_lossy_wal2json)",
                n.name, p.message
            )),
            Some(p) => problems.push(p),
            None => {}
        }
    }
    Ok((problems, warnings))
}

/// Schema drift between the nodes ([`crate::drift`]): a column missing on a node is a problem
/// (the first change of that table would stop replication; a missing table is already one
/// from [`resolve_tables`]); the other differences are warnings, since replication runs
/// through them.
async fn schema_drift(
    config: &Config,
    nodes: &[NodeSession],
) -> Result<(Vec<Problem>, Vec<String>), SetupError> {
    let sessions: Vec<(&str, &Client)> =
        nodes.iter().map(|n| (n.name.as_str(), &n.client)).collect();
    let report = crate::drift::compare_sessions(config, &sessions).await?;
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    for (table, d) in report.differences() {
        match d.kind {
            crate::drift::Kind::MissingTable => {}
            crate::drift::Kind::MissingColumn => {
                for node in &d.missing_on {
                    problems.push(Problem {
                        node: node.clone(),
                        message: format!(
                            "table {table}: {}; add the column here (plain DDL is not \
                             replicated), drop it on the other nodes, or list it in \
                             replication.skip_columns (see `walbridge drift`)",
                            d.detail
                        ),
                    });
                }
            }
            _ => warnings.push(format!("warning: schema drift: {table}: {}", d.detail)),
        }
    }
    Ok((problems, warnings))
}

fn node_session<'a>(nodes: &'a [NodeSession], name: &str) -> Result<&'a NodeSession, SetupError> {
    nodes
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| SetupError::Other(format!("node {name} is not configured")))
}

async fn install_schema(config: &Config, n: &NodeSession) -> Result<(), SetupError> {
    n.client.batch_execute(SCHEMA_SQL).await.map_err(sql_err(
        &n.name,
        "creating the walbridge schema (sql/schema.sql)",
    ))?;
    n.client
        .batch_execute(crate::skip::SKIP_SQL)
        .await
        .map_err(sql_err(
            &n.name,
            "creating walbridge's skip tables (sql/skip.sql)",
        ))?;
    n.client
        .batch_execute(crate::apply::PARK_SQL)
        .await
        .map_err(sql_err(&n.name, "creating walbridge.parked (sql/park.sql)"))?;
    if is_superuser(&n.client)
        .await
        .map_err(sql_err(&n.name, "reading the role's attributes"))?
    {
        n.client
            .batch_execute(DEFINER_ROLES_SQL)
            .await
            .map_err(sql_err(
                &n.name,
                "creating the owners of walbridge's functions (sql/definer_roles.sql)",
            ))?;
    }
    n.client
        .batch_execute(DDL_SQL)
        .await
        .map_err(sql_err(&n.name, "creating walbridge.ddl() (sql/ddl.sql)"))?;
    let (include, exclude, reserved) = selection_settings(&config.replication.tables);
    let change_table = config.trigger.table.quoted();
    // For walbridge.join_tables: the residue class of this node's sequences ("" when off).
    let ranges = if config.replication.sequence_ranges {
        let index = config
            .nodes
            .iter()
            .position(|c| c.name == n.name)
            .unwrap_or(0);
        format!("{}:{}", config.nodes.len(), index + 1)
    } else {
        String::new()
    };
    for (name, value) in [
        ("node_name", n.name.as_str()),
        ("skip_origin", &config.skip_origin_name()),
        ("slot_prefix", &config.replication.slot_prefix),
        ("tables_include", &include),
        ("tables_exclude", &exclude),
        ("tables_reserved", &reserved),
        ("change_table", &change_table),
        ("sequence_ranges", &ranges),
    ] {
        n.client
            .execute(
                "INSERT INTO walbridge.settings (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &value],
            )
            .await
            .map_err(sql_err(&n.name, "recording walbridge.settings"))?;
    }
    Ok(())
}

/// `replication.tables` as `walbridge.is_replicated` (`sql/ddl.sql`) reads it: JSON arrays of
/// `[schema, table]` LIKE patterns to include and exclude, and walbridge's own tables.
fn selection_settings(selection: &crate::config::TableSelection) -> (String, String, String) {
    let likes = |patterns: &[crate::config::TablePattern]| {
        serde_json::Value::Array(
            patterns
                .iter()
                .map(|p| {
                    let (s, t) = p.like_patterns();
                    serde_json::json!([s, t])
                })
                .collect(),
        )
        .to_string()
    };
    let reserved = serde_json::Value::Array(
        selection
            .reserved()
            .iter()
            .map(|q| serde_json::json!([q.schema, q.name]))
            .collect(),
    )
    .to_string();
    (
        likes(selection.include()),
        likes(selection.exclude()),
        reserved,
    )
}

/// Creates a replication origin when missing; true when created.
async fn ensure_origin(client: &Client, node: &str, origin: &str) -> Result<bool, SetupError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1",
            &[&origin],
        )
        .await
        .map_err(sql_err(node, format!("looking up origin {origin}")))?
        .is_some();
    if !exists {
        client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_create($1)",
                &[&origin],
            )
            .await
            .map_err(sql_err(node, format!("creating origin {origin}")))?;
    }
    Ok(!exists)
}

async fn reset_origin(client: &Client, node: &str, origin: &str) -> Result<(), SetupError> {
    client
        .batch_execute(&format!(
            "SELECT pg_catalog.pg_replication_origin_drop({o}); \
             SELECT pg_catalog.pg_replication_origin_create({o});",
            o = catalog::quote_literal(origin)
        ))
        .await
        .map_err(sql_err(node, format!("resetting origin {origin}")))
}

/// [`failover::standby_report`] for a node of the configuration.
async fn standby_report(
    config: &Config,
    n: &NodeSession,
    facts: &prereq::NodeFacts,
) -> Result<(Vec<String>, Vec<String>), SetupError> {
    let Some(node) = config.nodes.iter().find(|c| c.name == n.name) else {
        return Ok((Vec::new(), Vec::new()));
    };
    failover::standby_report(
        &n.name,
        &node.dsn,
        &n.client,
        facts.server_version_num,
        config.replication.failover_slots,
    )
    .await
}

/// Creates the slot when missing (with `failover` when asked, 17+); turns `failover` on for
/// an existing slot that lacks it. Returns whether the slot was created.
async fn ensure_slot(
    config: &Config,
    source: &NodeSession,
    slot: &str,
    failover: bool,
) -> Result<bool, SetupError> {
    let created = ensure_slot_exists(config, source, slot, failover).await?;
    if failover && !created {
        let has = failover::slot_has_failover(&source.client, slot)
            .await
            .map_err(sql_err(&source.name, format!("looking up slot {slot}")))?;
        if has == Some(false) {
            if let Some(node) = config.nodes.iter().find(|c| c.name == source.name) {
                failover::enable_failover(&source.name, &node.dsn, slot).await?;
            }
        }
    }
    Ok(created)
}

async fn ensure_slot_exists(
    config: &Config,
    source: &NodeSession,
    slot: &str,
    failover: bool,
) -> Result<bool, SetupError> {
    let plugin = config.replication.plugin.as_str();
    let existing = source
        .client
        .query_opt(
            "SELECT plugin::text, database::text = pg_catalog.current_database() FROM pg_catalog.pg_replication_slots
              WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_err(&source.name, format!("looking up slot {slot}")))?;
    match existing {
        Some(row) => {
            let have: Option<String> = row.get(0);
            let same_db: Option<bool> = row.get(1);
            if have.as_deref() != Some(plugin) || same_db != Some(true) {
                return Err(SetupError::Other(format!(
                    "node {}: slot {slot} exists with plugin {} for another configuration; run \
                     walbridge teardown (or pg_drop_replication_slot('{slot}')) first",
                    source.name,
                    have.unwrap_or_else(|| "?".into())
                )));
            }
            Ok(false)
        }
        None => {
            let sql = if failover {
                // (slot_name, plugin, temporary, twophase, failover): 17+.
                "SELECT pg_catalog.pg_create_logical_replication_slot($1, $2, false, false, true)"
            } else {
                "SELECT pg_catalog.pg_create_logical_replication_slot($1, $2)"
            };
            source
                .client
                .query_one(sql, &[&slot, &plugin])
                .await
                .map_err(sql_err(&source.name, format!("creating slot {slot}")))?;
            Ok(true)
        }
    }
}

async fn ensure_publication(
    config: &Config,
    n: &NodeSession,
    tables: &[TableInfo],
) -> Result<String, SetupError> {
    let name = config.publication_name();
    let list = tables
        .iter()
        .map(|t| t.quoted_name())
        .collect::<Vec<_>>()
        .join(", ");
    let exists = n
        .client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(sql_err(&n.name, format!("looking up publication {name}")))?
        .is_some();
    let partitioned = tables.iter().any(|t| t.kind == TableKind::Partitioned);
    let sql = if exists {
        format!(
            "ALTER PUBLICATION {p} SET TABLE {list}; \
             ALTER PUBLICATION {p} SET (publish_via_partition_root = true, publish = 'insert, update, delete, truncate')",
            p = quote_ident(&name)
        )
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {list} \
             WITH (publish_via_partition_root = true, publish = 'insert, update, delete, truncate')",
            quote_ident(&name)
        )
    };
    n.client
        .batch_execute(&sql)
        .await
        .map_err(sql_err(&n.name, format!("creating publication {name}")))?;
    Ok(format!(
        "publication {name} {} ({} tables{})",
        if exists { "updated" } else { "created" },
        tables.len(),
        if partitioned {
            ", partitioned tables through their root"
        } else {
            ""
        }
    ))
}

/// On a `node_priority` table with a unique key, the row trigger `walbridge.priority_guard`
/// (sql/schema.sql): a statement of this node that would replace a version written by a node
/// that outranks it is discarded, as every peer discards it. Elsewhere the trigger is dropped
/// (the table's policy may have changed).
async fn ensure_priority_guard(
    config: &Config,
    n: &NodeSession,
    t: &TableInfo,
) -> Result<(), SetupError> {
    let trg = quote_ident(PRIORITY_GUARD_TRIGGER);
    let table = t.quoted_name();
    let guarded = config.conflict_policy_for(&t.schema, &t.name) == ConflictPolicy::NodePriority;
    let sql = match t.unique_key() {
        Some(key) if guarded => {
            let ranks: serde_json::Map<String, serde_json::Value> = config
                .nodes
                .iter()
                .map(|node| (node.name.clone(), config.node_rank(&node.name).into()))
                .collect();
            let args = [
                config.node_rank(&n.name).to_string(),
                config.replication.slot_prefix.clone(),
                serde_json::Value::Object(ranks).to_string(),
            ]
            .iter()
            .chain(key.iter())
            .map(|a| catalog::quote_literal(a))
            .collect::<Vec<_>>()
            .join(", ");
            format!(
                "CREATE OR REPLACE TRIGGER {trg} BEFORE INSERT OR UPDATE OR DELETE ON {table} \
                 FOR EACH ROW EXECUTE FUNCTION walbridge.priority_guard({args})"
            )
        }
        _ => format!("DROP TRIGGER IF EXISTS {trg} ON {table}"),
    };
    n.client.batch_execute(&sql).await.map_err(sql_err(
        &n.name,
        format!(
            "creating the node_priority guard trigger on {}",
            t.qualified_name()
        ),
    ))
}

/// A statement-level AFTER DELETE trigger recording deleted keys, firing for local deletes and
/// for deletes walbridge applies (ENABLE ALWAYS), on tables with a unique key.
async fn ensure_tombstone_trigger(n: &NodeSession, t: &TableInfo) -> Result<(), SetupError> {
    let Some(key) = t.unique_key() else {
        return Ok(());
    };
    let args = key
        .iter()
        .map(|k| catalog::quote_literal(k))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "CREATE OR REPLACE TRIGGER {trg} AFTER DELETE ON {table} \
         REFERENCING OLD TABLE AS walbridge_deleted_rows \
         FOR EACH STATEMENT EXECUTE FUNCTION walbridge.record_tombstones({args}); \
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trg};",
        trg = quote_ident(TOMBSTONE_TRIGGER),
        table = t.quoted_name(),
    );
    n.client.batch_execute(&sql).await.map_err(sql_err(
        &n.name,
        format!("creating the tombstone trigger on {}", t.qualified_name()),
    ))
}
