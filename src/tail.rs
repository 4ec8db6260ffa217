//! `walbridge tail`: one node's decoded changes as JSON lines, a CDC feed and the first
//! debugging tool.
//!
//! ```text
//!   slot (temporary, or --slot) ──▶ Source (pgoutput | wal2json) ──Event──▶ Renderer ──▶ stdout
//!                                        ▲                                    │ flushed before
//!                                        └──── confirm(commit end LSN) ◀──────┘ every wait
//! ```
//!
//! Every line is one self-contained JSON object whose `op` says what it is (`begin`,
//! `commit`, `insert`, `update`, `delete`, `truncate`, `message`); the full shape is in
//! `docs/tail.md`. The renderer folds what the stream says across several messages into the
//! lines that need it: a transaction's replication origin (folded into its Begin by the
//! source's framer, [`crate::decode::frame`]) goes into its begin and commit lines, and each
//! change carries its table's column names, types and key flags (from the Relation message
//! before it), so a consumer never has to keep state.
//!
//! Output: lines go out as soon as nothing more is waiting to be read (so a live reader sees
//! each change at once), in batches of up to 64 kB while a large transaction streams.
//!
//! Progress: after a commit line is written and flushed, its end LSN is confirmed to the
//! slot, so a `--slot` feed resumes after the last transaction it printed (at-least-once: a
//! transaction cut off by a stop is printed again). The temporary slot used without `--slot`
//! lives exactly as long as the stream's session, so nothing stays behind on the node.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::FutureExt as _;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::catalog::quote_ident;
use crate::config::{Config, NodeConfig, Plugin};
use crate::event::{Change, Column, Commit, Event, LogicalMessage, Relation, Truncate, Value};
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgconn;
use crate::protocol::{ProtocolError, StreamConfig, StreamItem};
use crate::source::{Source, SourceError, SourceItem, SourceOptions};

/// What `walbridge tail` reads.
#[derive(Clone, Debug)]
pub struct TailOptions {
    /// The configured node to read.
    pub node: String,
    /// Output plugin; default: the slot's plugin with `slot`, else `replication.plugin`.
    pub plugin: Option<Plugin>,
    /// Start position (the server starts at the slot's confirmed position if that is later).
    pub from: Option<Lsn>,
    /// An existing logical slot to read (and advance); `None`: a temporary slot.
    pub slot: Option<String>,
    /// pgoutput's publication; default `<slot_prefix>_pub`.
    pub publication: Option<String>,
}

/// `walbridge tail` could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// `--node` names no configured node.
    #[error("node {0} is not in the configuration")]
    UnknownNode(String),
    /// `--slot` names one of walbridge's replication slots, which tail must not advance.
    #[error(
        "slot {slot} is walbridge's replication slot for {direction}; tail advances the slot it \
         reads, so replication would skip what tail printed. Omit --slot to read through a \
         temporary slot, or create a slot of your own: SELECT \
         pg_create_logical_replication_slot('my_feed', '{plugin}')"
    )]
    ReplicationSlot {
        /// The slot.
        slot: String,
        /// `source -> target`, or the pattern's source.
        direction: String,
        /// The plugin to suggest.
        plugin: &'static str,
    },
    /// pgoutput needs a publication and it does not exist.
    #[error(
        "publication {publication} does not exist on node {node}; pgoutput streams the tables \
         of a publication: create it with CREATE PUBLICATION {quoted} FOR ALL TABLES (or run \
         walbridge setup, which creates {publication}), or name another one with --publication"
    )]
    NoPublication {
        /// The publication.
        publication: String,
        /// Quoted for SQL.
        quoted: String,
        /// The node.
        node: String,
    },
    /// `--slot` names a slot that does not exist.
    #[error(
        "replication slot {slot} does not exist on node {node}; create it with SELECT \
         pg_create_logical_replication_slot('{slot}', '{plugin}'), or omit --slot to read \
         through a temporary slot"
    )]
    NoSlot {
        /// The slot.
        slot: String,
        /// The node.
        node: String,
        /// The plugin to suggest.
        plugin: &'static str,
    },
    /// `--slot` names a slot tail cannot read.
    #[error("replication slot {slot} on node {node} cannot be tailed: {reason}")]
    UnusableSlot {
        /// The slot.
        slot: String,
        /// The node.
        node: String,
        /// Why, and what to do.
        reason: String,
    },
    /// The node could not be reached for its catalog, or a catalog query failed.
    #[error(transparent)]
    Node(#[from] pgconn::NodeError),
    /// The change stream failed.
    #[error("node {node}: {source}")]
    Source {
        /// The node.
        node: String,
        /// What failed.
        #[source]
        source: Box<SourceError>,
    },
    /// The server ended the stream without being asked to.
    #[error("node {0}: the replication stream ended; is the server shutting down?")]
    StreamEnded(String),
    /// Standard output could not be written.
    #[error("cannot write to standard output: {0}")]
    Output(#[source] io::Error),
}

impl TailError {
    /// A wrong argument rather than a failure at run time (exit 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            TailError::UnknownNode(_) | TailError::ReplicationSlot { .. }
        )
    }
}

/// Refuses `slot` when it is one of walbridge's own replication slots
/// (`<slot_prefix>_<source>_to_<target>`), for any configured node or the tailed one.
pub fn check_slot_is_not_walbridges(
    config: &Config,
    node: &str,
    slot: &str,
    plugin: Plugin,
) -> Result<(), TailError> {
    let refuse = |direction: String| TailError::ReplicationSlot {
        slot: slot.to_string(),
        direction,
        plugin: plugin.as_str(),
    };
    for d in config.directions() {
        if config.slot_name(&d.source, &d.target) == slot {
            return Err(refuse(d.to_string()));
        }
    }
    // The configuration given to tail may list only the tailed node.
    let prefix = format!("{}_{node}_to_", config.replication.slot_prefix);
    if let Some(target) = slot.strip_prefix(&prefix) {
        return Err(refuse(format!("{node} -> {target}")));
    }
    Ok(())
}

/// The temporary slot's name: `<slot_prefix>_tail_<pid>`, at most 63 bytes.
fn temporary_slot_name(config: &Config) -> String {
    let suffix = format!("_tail_{}", std::process::id());
    let mut prefix = config.replication.slot_prefix.clone();
    prefix.truncate(63 - suffix.len());
    format!("{prefix}{suffix}")
}

fn sql_err(node: &str, what: &str) -> impl FnOnce(tokio_postgres::Error) -> TailError {
    let sql = pgconn::NodeError::sql(node, what);
    move |source| TailError::Node(sql(source))
}

/// Streams the decoded changes of `opts.node` to `out`, one JSON object per line, until
/// `shutdown` is cancelled (`Ok`) or something fails.
///
/// Checks before streaming: the slot (with `--slot`) exists, is logical, belongs to this
/// database and has a plugin walbridge reads; with pgoutput the publication exists.
pub async fn tail(
    config: &Config,
    opts: &TailOptions,
    out: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> Result<(), TailError> {
    let node = config
        .node(&opts.node)
        .ok_or_else(|| TailError::UnknownNode(opts.node.clone()))?;
    let name = node.name.as_str();
    if let Some(slot) = &opts.slot {
        let plugin = opts.plugin.unwrap_or(config.replication.plugin);
        check_slot_is_not_walbridges(config, name, slot, plugin)?;
    }
    let application_name = format!("walbridge-tail-{name}");
    let catalog = pgconn::connect(&node.dsn, &application_name)
        .await
        .map_err(pgconn::NodeError::connect(name))?;

    let plugin = match &opts.slot {
        Some(slot) => check_existing_slot(&catalog, node, slot, opts.plugin).await?,
        None => opts.plugin.unwrap_or(config.replication.plugin),
    };
    let publication = opts
        .publication
        .clone()
        .unwrap_or_else(|| config.publication_name());
    if plugin == Plugin::PgOutput {
        let found = catalog
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await
            .map_err(sql_err(name, "looking up the publication"))?;
        if found.is_none() {
            return Err(TailError::NoPublication {
                quoted: quote_ident(&publication),
                publication,
                node: name.to_string(),
            });
        }
    }

    // Not a child of `shutdown`: the stream must outlive the pump, so that its final status
    // update carries what the pump confirmed last (after printing), not an earlier position.
    let stream_cancel = CancellationToken::new();
    let source_opts = SourceOptions {
        plugin,
        slot: opts
            .slot
            .clone()
            .unwrap_or_else(|| temporary_slot_name(config)),
        publication,
        start: opts.from.unwrap_or(Lsn::ZERO),
        tables: Vec::new(),
        selection: None,
        refuse_lossy: None,
        filter_origins: Vec::new(),
        messages: true,
        application_name,
        drop_echo: false,
        stream_in_progress: false,
        spill: Vec::new(),
        stream: StreamConfig {
            cancel: stream_cancel.clone(),
            ..StreamConfig::default()
        },
    };
    let source_err = |source| TailError::Source {
        node: name.to_string(),
        source: Box::new(source),
    };
    let slot = source_opts.slot.clone();
    let (mut source, driver) = if opts.slot.is_some() {
        let (source, driver) = Source::start(&node.dsn, source_opts)
            .await
            .map_err(source_err)?;
        tracing::info!(node = name, plugin = %plugin, slot, "tailing");
        (source, driver)
    } else {
        let (source, driver, created) = Source::start_temporary(&node.dsn, source_opts)
            .await
            .map_err(source_err)?;
        tracing::info!(
            node = name, plugin = %plugin, slot, from = %created.consistent_point,
            "tailing through a temporary slot"
        );
        (source, driver)
    };
    let driver = tokio::spawn(driver);

    let result = pump(name, &mut source, &catalog, out, &shutdown).await;

    // End the stream cleanly: final status update (the last confirmed commit), CopyDone;
    // the session ends and with it a temporary slot.
    stream_cancel.cancel();
    drop(source);
    match tokio::time::timeout(Duration::from_secs(15), driver).await {
        Ok(Ok(Err(e))) if result.is_ok() => {
            tracing::debug!(error = %e, "stream ended with an error")
        }
        Err(_) => tracing::warn!(node = name, "the replication stream did not end in time"),
        _ => {}
    }
    result
}

/// Checks an existing slot and returns the plugin to read it with.
async fn check_existing_slot(
    catalog: &tokio_postgres::Client,
    node: &NodeConfig,
    slot: &str,
    plugin: Option<Plugin>,
) -> Result<Plugin, TailError> {
    let name = node.name.as_str();
    let row = catalog
        .query_opt(
            "SELECT slot_type, plugin, database, database = current_database() \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_err(name, "looking up the slot"))?;
    let unusable = |reason: String| TailError::UnusableSlot {
        slot: slot.to_string(),
        node: name.to_string(),
        reason,
    };
    let Some(row) = row else {
        return Err(TailError::NoSlot {
            slot: slot.to_string(),
            node: name.to_string(),
            plugin: plugin.unwrap_or(Plugin::PgOutput).as_str(),
        });
    };
    let slot_type: String = row.get(0);
    if slot_type != "logical" {
        return Err(unusable(format!(
            "it is a {slot_type} slot; tail reads logical slots"
        )));
    }
    let database: Option<String> = row.get(2);
    if row.get::<_, Option<bool>>(3) != Some(true) {
        return Err(unusable(format!(
            "it belongs to database {}; point the node's dsn at that database",
            database.unwrap_or_default()
        )));
    }
    let slot_plugin: Option<String> = row.get(1);
    let slot_plugin = slot_plugin.unwrap_or_default();
    let Ok(found) = slot_plugin.parse::<Plugin>() else {
        return Err(unusable(format!(
            "its output plugin is {slot_plugin}; walbridge reads pgoutput and wal2json"
        )));
    };
    match plugin {
        Some(p) if p != found => Err(unusable(format!(
            "it was created with {found}, not {p}; drop --plugin or pass --plugin {found}"
        ))),
        _ => Ok(found),
    }
}

/// Output is written in batches of up to this many bytes while input is ready.
const BATCH_BYTES: usize = 64 * 1024;

/// Reads, renders and writes until shutdown, a stream error, or a closed standard output.
///
/// Lines are flushed whenever tail is about to wait for the server, so a reader sees every
/// line as soon as nothing more is immediately available; under load, the lines of many
/// messages go out in one write. Positions are confirmed to the slot only once the lines
/// they cover are flushed.
async fn pump(
    node: &str,
    source: &mut Source,
    catalog: &tokio_postgres::Client,
    out: &mut (dyn Write + Send),
    shutdown: &CancellationToken,
) -> Result<(), TailError> {
    let mut printer = Printer {
        node,
        catalog,
        renderer: Renderer::default(),
        buf: Vec::with_capacity(2 * BATCH_BYTES),
        confirm: None,
    };
    loop {
        // Everything so far is printed before waiting.
        match out.write_all(&printer.buf).and_then(|()| out.flush()) {
            Ok(()) => {}
            // `walbridge tail | head`: the reader is done, so are we.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(TailError::Output(e)),
        }
        printer.buf.clear();
        if let Some(lsn) = printer.confirm.take() {
            source.feedback().confirm(lsn);
        }
        let item = tokio::select! {
            biased;
            // 1. Ctrl-C / SIGTERM: stop; the caller ends the stream.
            _ = shutdown.cancelled() => return Ok(()),
            // 2. The next message (a cancel-safe receive; the work happens below).
            item = source.recv() => item,
        };
        printer.handle(source, item, shutdown).await?;
        // Whatever else is already here, without waiting, up to a batch.
        while printer.buf.len() < BATCH_BYTES && !shutdown.is_cancelled() {
            let Some(item) = source.recv().now_or_never() else {
                break;
            };
            printer.handle(source, item, shutdown).await?;
        }
    }
}

/// Rendering state of [`pump`].
struct Printer<'a> {
    node: &'a str,
    catalog: &'a tokio_postgres::Client,
    renderer: Renderer,
    buf: Vec<u8>,
    /// Position to confirm once `buf` is flushed.
    confirm: Option<Lsn>,
}

impl Printer<'_> {
    async fn handle(
        &mut self,
        source: &mut Source,
        item: Option<Result<StreamItem, ProtocolError>>,
        shutdown: &CancellationToken,
    ) -> Result<(), TailError> {
        let source_err = |source| TailError::Source {
            node: self.node.to_string(),
            source: Box::new(source),
        };
        let Some(item) = item else {
            return if shutdown.is_cancelled() {
                Ok(())
            } else {
                Err(TailError::StreamEnded(self.node.to_string()))
            };
        };
        let item = item.map_err(|e| source_err(e.into()))?;
        for decoded in source.decode(item).await.map_err(source_err)? {
            match decoded {
                SourceItem::Keepalive { wal_end } => {
                    // No transaction is open: everything the server has sent is printed
                    // (once flushed), so the slot need not keep it.
                    if self.renderer.idle() {
                        self.confirm = self.confirm.max(Some(wal_end));
                    }
                }
                // Not asked for (drop_echo is off): `tail` shows every transaction.
                SourceItem::Echo { .. } => {}
                SourceItem::Event { event, wal_start } => {
                    let unknown = self.renderer.unknown_types(&event);
                    if !unknown.is_empty() {
                        for (oid, name) in lookup_types(self.catalog, &unknown).await {
                            self.renderer.learn_type(oid, name);
                        }
                    }
                    self.renderer.render(&event, wal_start, &mut self.buf);
                    if let Event::Commit(c) = &event {
                        self.confirm = self.confirm.max(Some(c.end_lsn));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Names of types that are neither built in nor announced by the stream, from the catalog.
/// A failed lookup only costs the names (`"type": null`), so it is logged, not fatal.
async fn lookup_types(
    catalog: &tokio_postgres::Client,
    oids: &[u32],
) -> Vec<(u32, Option<String>)> {
    let rows = catalog
        .query(
            "SELECT t.oid, n.nspname::text, t.typname::text FROM pg_catalog.pg_type t \
             JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = ANY($1)",
            &[&oids],
        )
        .await;
    let mut found: HashMap<u32, String> = HashMap::new();
    match rows {
        Ok(rows) => {
            for r in rows {
                let (oid, schema, name): (u32, String, String) = (r.get(0), r.get(1), r.get(2));
                found.insert(oid, qualified_type_name(&schema, &name));
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot look up type names; printing them as null"),
    }
    oids.iter().map(|&oid| (oid, found.remove(&oid))).collect()
}

/// `typname` for `pg_catalog` types, `schema.typname` for others.
fn qualified_type_name(schema: &str, name: &str) -> String {
    if schema == "pg_catalog" {
        name.to_string()
    } else {
        format!("{schema}.{name}")
    }
}

/// The transaction being printed.
#[derive(Debug)]
struct OpenTransaction {
    xid: u32,
    origin: Option<String>,
}

/// Turns events into JSON lines; pure (no I/O) so that it can be tested on its own.
///
/// Relation and Type events print nothing: they feed the column descriptions and type names
/// of the change lines.
#[derive(Debug, Default)]
pub struct Renderer {
    /// Type names the stream announced or the catalog gave (`None`: not found).
    types: HashMap<u32, Option<String>>,
    open: Option<OpenTransaction>,
    /// The `columns` array of each table's lines, rendered once per relation description
    /// (by OID; a new description of the table replaces it).
    columns: HashMap<u32, (Arc<Relation>, Box<RawValue>)>,
}

impl Renderer {
    /// No transaction is open: everything received so far has been printed.
    pub fn idle(&self) -> bool {
        self.open.is_none()
    }

    /// Column type OIDs of `event` whose names are not known yet (neither built in nor
    /// learnt); look them up and [`Renderer::learn_type`] them before rendering.
    pub fn unknown_types(&self, event: &Event) -> Vec<u32> {
        let columns = match event {
            Event::Relation(r) => &r.columns,
            Event::Change(c) => &c.relation.columns,
            _ => return Vec::new(),
        };
        let mut unknown: Vec<u32> = columns
            .iter()
            .map(|c| c.type_oid)
            .filter(|oid| Type::from_oid(*oid).is_none() && !self.types.contains_key(oid))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        unknown
    }

    /// Records a type's printable name (`None`: it has none, print `null`).
    pub fn learn_type(&mut self, oid: u32, name: Option<String>) {
        self.types.insert(oid, name);
    }

    fn type_name(&self, oid: u32) -> Option<String> {
        match Type::from_oid(oid) {
            Some(t) => Some(t.name().to_string()),
            None => self.types.get(&oid).cloned().flatten(),
        }
    }

    /// Appends the line `event` produces, if any, to `out`.
    /// `wal_start` is the WAL position of the message the event came from.
    pub fn render(&mut self, event: &Event, wal_start: Lsn, out: &mut Vec<u8>) {
        match event {
            Event::Begin(b) => {
                let origin = b.origin.as_ref().map(|o| o.name.clone());
                write_line(
                    out,
                    &BeginLine {
                        op: "begin",
                        xid: b.xid,
                        commit_lsn: b.final_lsn,
                        commit_time: b.commit_time,
                        origin: origin.as_deref(),
                    },
                );
                self.open = Some(OpenTransaction { xid: b.xid, origin });
            }
            // The source's framer folds it into the Begin: a framed stream has none.
            Event::Origin(_) => {}
            Event::Type(t) => {
                self.types
                    .insert(t.oid, Some(qualified_type_name(&t.schema, &t.name)));
            }
            Event::Relation(_) => {}
            Event::Commit(c) => {
                let open = self.open.take();
                self.commit_line(c, open.as_ref(), out);
            }
            Event::Change(c) => self.change_line(c, wal_start, out),
            Event::Truncate(t) => self.truncate_line(t, out),
            Event::Message(m) => self.message_line(m, out),
            // `tail` reads protocol version 1: no streamed transactions.
            Event::StreamStart(_)
            | Event::StreamStop
            | Event::Subtransaction(_)
            | Event::StreamCommit(_)
            | Event::StreamAbort { .. } => {}
        }
    }

    fn xid(&self) -> Option<u32> {
        self.open.as_ref().map(|o| o.xid)
    }

    fn commit_line(&self, c: &Commit, open: Option<&OpenTransaction>, out: &mut Vec<u8>) {
        write_line(
            out,
            &CommitLine {
                op: "commit",
                xid: open.map(|o| o.xid),
                commit_lsn: c.commit_lsn,
                end_lsn: c.end_lsn,
                commit_time: c.commit_time,
                origin: open.and_then(|o| o.origin.as_deref()),
            },
        );
    }

    /// The rendered `columns` array of `rel`, from the cache when it holds this description.
    fn columns_json(&mut self, rel: &Arc<Relation>) -> Box<RawValue> {
        if let Some((cached, json)) = self.columns.get(&rel.oid) {
            if Arc::ptr_eq(cached, rel) || **cached == **rel {
                return json.clone();
            }
        }
        let columns: Vec<ColumnOut<'_>> = rel
            .columns
            .iter()
            .map(|col| ColumnOut {
                name: &col.name,
                type_name: self.type_name(col.type_oid),
                type_oid: col.type_oid,
                typmod: col.type_modifier,
                key: col.is_key,
            })
            .collect();
        // Serializing names, strings and numbers cannot fail; the default is `null`.
        let json = serde_json::value::to_raw_value(&columns).unwrap_or_default();
        self.columns.insert(rel.oid, (rel.clone(), json.clone()));
        json
    }

    fn change_line(&mut self, c: &Change, wal_start: Lsn, out: &mut Vec<u8>) {
        let rel = &c.relation;
        let columns = self.columns_json(rel);
        let key = (rel.columns.iter().any(|col| col.is_key))
            .then(|| c.identity_tuple())
            .flatten()
            .map(|t| Row {
                columns: &rel.columns,
                values: &t.0,
                keys_only: true,
            });
        let old = c.old.as_ref().map(|o| Row {
            columns: &rel.columns,
            values: &o.tuple.0,
            keys_only: o.kind == crate::event::OldKind::Key,
        });
        let unchanged_toast: Vec<&str> = c
            .new
            .iter()
            .flat_map(|t| t.0.iter().zip(&rel.columns))
            .filter(|(v, _)| **v == Value::UnchangedToast)
            .map(|(_, col)| col.name.as_str())
            .collect();
        write_line(
            out,
            &ChangeLine {
                op: c.op.as_str(),
                xid: self.xid(),
                lsn: wal_start,
                schema: &rel.schema,
                table: &rel.table,
                columns,
                key,
                new: c.new.as_ref().map(|t| Row {
                    columns: &rel.columns,
                    values: &t.0,
                    keys_only: false,
                }),
                old,
                unchanged_toast,
            },
        );
    }

    fn truncate_line(&self, t: &Truncate, out: &mut Vec<u8>) {
        write_line(
            out,
            &TruncateLine {
                op: "truncate",
                xid: self.xid(),
                relations: t
                    .relations
                    .iter()
                    .map(|r| TableOut {
                        schema: &r.schema,
                        table: &r.table,
                    })
                    .collect(),
                cascade: t.cascade,
                restart_identity: t.restart_identity,
            },
        );
    }

    fn message_line(&self, m: &LogicalMessage, out: &mut Vec<u8>) {
        let (content, content_base64) = match std::str::from_utf8(&m.content) {
            Ok(s) => (Some(s), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&m.content)),
            ),
        };
        write_line(
            out,
            &MessageLine {
                op: "message",
                xid: if m.transactional { self.xid() } else { None },
                lsn: m.lsn,
                transactional: m.transactional,
                prefix: &m.prefix,
                content,
                content_base64,
            },
        );
    }
}

fn write_line(out: &mut Vec<u8>, line: &impl Serialize) {
    // Serializing these types into a Vec cannot fail: every key is a string and every value
    // a string, number, bool, null, list or map of those.
    if serde_json::to_writer(&mut *out, line).is_ok() {
        out.push(b'\n');
    }
}

#[derive(Serialize)]
struct BeginLine<'a> {
    op: &'static str,
    xid: u32,
    commit_lsn: Lsn,
    commit_time: PgTimestamp,
    origin: Option<&'a str>,
}

#[derive(Serialize)]
struct CommitLine<'a> {
    op: &'static str,
    xid: Option<u32>,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_time: PgTimestamp,
    origin: Option<&'a str>,
}

#[derive(Serialize)]
struct ColumnOut<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    type_name: Option<String>,
    type_oid: u32,
    typmod: i32,
    key: bool,
}

#[derive(Serialize)]
struct ChangeLine<'a> {
    op: &'static str,
    xid: Option<u32>,
    lsn: Lsn,
    schema: &'a str,
    table: &'a str,
    columns: Box<RawValue>,
    key: Option<Row<'a>>,
    new: Option<Row<'a>>,
    old: Option<Row<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unchanged_toast: Vec<&'a str>,
}

#[derive(Serialize)]
struct TableOut<'a> {
    schema: &'a str,
    table: &'a str,
}

#[derive(Serialize)]
struct TruncateLine<'a> {
    op: &'static str,
    xid: Option<u32>,
    relations: Vec<TableOut<'a>>,
    cascade: bool,
    restart_identity: bool,
}

#[derive(Serialize)]
struct MessageLine<'a> {
    op: &'static str,
    xid: Option<u32>,
    lsn: Lsn,
    transactional: bool,
    prefix: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_base64: Option<String>,
}

/// A tuple as a JSON object in column order: `{"name": value, ...}`; unchanged TOAST
/// values are left out (the line lists them in `unchanged_toast`), and with `keys_only`
/// so are the columns outside the replica identity.
struct Row<'a> {
    columns: &'a [Column],
    values: &'a [Value],
    keys_only: bool,
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (col, value) in self.columns.iter().zip(self.values) {
            if (self.keys_only && !col.is_key) || *value == Value::UnchangedToast {
                continue;
            }
            map.serialize_entry(&col.name, &ValueOut(value))?;
        }
        map.end()
    }
}

/// A value: its text as a JSON string, `null`, or (binary format or text that is not UTF-8,
/// which tail never asks for) `{"base64": "..."}`.
struct ValueOut<'a>(&'a Value);

impl Serialize for ValueOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = match self.0 {
            Value::Null | Value::UnchangedToast => return s.serialize_none(),
            Value::Text(b) => match std::str::from_utf8(b) {
                Ok(text) => return s.serialize_str(text),
                Err(_) => b,
            },
            Value::Binary(b) => b,
        };
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(
            "base64",
            &base64::engine::general_purpose::STANDARD.encode(bytes),
        )?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        Begin, ChangeOp, OldKind, OldTuple, Origin, ReplicaIdentity, Tuple, TypeInfo,
    };
    use bytes::Bytes;
    use serde_json::json;

    fn relation(identity: ReplicaIdentity, keys: &[&str]) -> Arc<Relation> {
        let col = |name: &str, type_oid| Column {
            name: name.into(),
            type_oid,
            type_modifier: -1,
            is_key: keys.contains(&name),
        };
        Arc::new(Relation {
            oid: 16400,
            schema: "public".into(),
            table: "t".into(),
            replica_identity: identity,
            columns: vec![col("id", 23), col("body", 25), col("m", 70000)],
        })
    }

    fn lines(r: &mut Renderer, events: &[Event]) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for e in events {
            r.render(e, Lsn(0x10), &mut out);
        }
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn begin_of(xid: u32) -> Begin {
        Begin {
            xid,
            final_lsn: Lsn(0x100),
            commit_time: PgTimestamp(0),
            origin: None,
        }
    }

    fn begin() -> Event {
        Event::Begin(begin_of(7))
    }

    fn commit() -> Event {
        Event::Commit(Commit {
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x130),
            commit_time: PgTimestamp(0),
        })
    }

    fn text(s: &str) -> Value {
        Value::text(s)
    }

    #[test]
    fn origin_is_folded_into_begin_and_commit() {
        let mut r = Renderer::default();
        assert!(r.idle());
        let rel = relation(ReplicaIdentity::Default, &["id"]);
        let out = lines(
            &mut r,
            &[
                Event::Begin(Begin {
                    origin: Some(Origin {
                        name: "walbridge_from_b".into(),
                        lsn: Lsn(5),
                    }),
                    ..begin_of(7)
                }),
                Event::Relation(rel.clone()),
                Event::Change(Change {
                    op: ChangeOp::Insert,
                    relation: rel,
                    new: Some(Tuple(vec![text("1"), Value::Null, text("x")])),
                    old: None,
                    source_change_id: None,
                }),
            ],
        );
        assert!(!r.idle());
        assert_eq!(
            out[0],
            json!({"op": "begin", "xid": 7, "commit_lsn": "0/100",
                   "commit_time": "2000-01-01T00:00:00.000000Z", "origin": "walbridge_from_b"})
        );
        assert_eq!(out[1]["op"], "insert");
        assert_eq!(out[1]["xid"], 7);
        assert_eq!(out[1]["lsn"], "0/10");
        let out = lines(&mut r, &[commit()]);
        assert_eq!(
            out,
            vec![
                json!({"op": "commit", "xid": 7, "commit_lsn": "0/100", "end_lsn": "0/130",
                        "commit_time": "2000-01-01T00:00:00.000000Z",
                        "origin": "walbridge_from_b"})
            ]
        );
        assert!(r.idle());
        let out = lines(&mut r, &[begin(), commit()]);
        assert_eq!(out[0]["origin"], serde_json::Value::Null);
        assert_eq!(out[1]["origin"], serde_json::Value::Null);
    }

    #[test]
    fn unchanged_toast_is_left_out_and_listed_and_old_key_has_only_keys() {
        let mut r = Renderer::default();
        r.learn_type(70000, Some("public.mood".into()));
        let rel = relation(ReplicaIdentity::Default, &["id"]);
        let out = lines(
            &mut r,
            &[
                begin(),
                Event::Change(Change {
                    op: ChangeOp::Update,
                    relation: rel,
                    new: Some(Tuple(vec![text("2"), Value::UnchangedToast, Value::Null])),
                    old: Some(OldTuple {
                        kind: OldKind::Key,
                        tuple: Tuple(vec![text("1"), Value::Null, Value::Null]),
                    }),
                    source_change_id: None,
                }),
            ],
        );
        assert_eq!(
            out[1],
            json!({
                "op": "update", "xid": 7, "lsn": "0/10", "schema": "public", "table": "t",
                "columns": [
                    {"name": "id", "type": "int4", "type_oid": 23, "typmod": -1, "key": true},
                    {"name": "body", "type": "text", "type_oid": 25, "typmod": -1, "key": false},
                    {"name": "m", "type": "public.mood", "type_oid": 70000, "typmod": -1,
                     "key": false},
                ],
                "key": {"id": "1"},
                "new": {"id": "2", "m": null},
                "old": {"id": "1"},
                "unchanged_toast": ["body"],
            })
        );
    }

    #[test]
    fn full_identity_old_row_and_tables_without_a_key() {
        let mut r = Renderer::default();
        let full = relation(ReplicaIdentity::Full, &["id", "body", "m"]);
        let out = lines(
            &mut r,
            &[
                begin(),
                Event::Change(Change {
                    op: ChangeOp::Delete,
                    relation: full,
                    new: None,
                    old: Some(OldTuple {
                        kind: OldKind::Full,
                        tuple: Tuple(vec![text("1"), Value::Null, text("x")]),
                    }),
                    source_change_id: None,
                }),
            ],
        );
        assert_eq!(out[1]["key"], json!({"id": "1", "body": null, "m": "x"}));
        assert_eq!(out[1]["old"], json!({"id": "1", "body": null, "m": "x"}));
        assert_eq!(out[1]["new"], serde_json::Value::Null);
        // The custom type was never named: null.
        assert_eq!(out[1]["columns"][2]["type"], serde_json::Value::Null);

        let nothing = relation(ReplicaIdentity::Nothing, &[]);
        let out = lines(
            &mut r,
            &[Event::Change(Change {
                op: ChangeOp::Insert,
                relation: nothing,
                new: Some(Tuple(vec![
                    text("1"),
                    Value::Text(Bytes::from_static(b"\xff")),
                    Value::Binary(Bytes::from_static(b"\x00\x01")),
                ])),
                old: None,
                source_change_id: None,
            })],
        );
        assert_eq!(out[0]["key"], serde_json::Value::Null);
        assert_eq!(
            out[0]["new"],
            json!({"id": "1", "body": {"base64": "/w=="}, "m": {"base64": "AAE="}})
        );
    }

    #[test]
    fn messages_truncates_and_type_names() {
        let mut r = Renderer::default();
        let rel = relation(ReplicaIdentity::Default, &["id"]);
        assert_eq!(r.unknown_types(&Event::Relation(rel.clone())), vec![70000]);
        r.render(
            &Event::Type(TypeInfo {
                oid: 70000,
                schema: "app".into(),
                name: "mood".into(),
            }),
            Lsn(1),
            &mut Vec::new(),
        );
        assert!(r.unknown_types(&Event::Relation(rel.clone())).is_empty());
        assert_eq!(r.type_name(70000).as_deref(), Some("app.mood"));
        assert_eq!(r.type_name(1007).as_deref(), Some("_int4"));

        let out = lines(
            &mut r,
            &[
                Event::Message(LogicalMessage {
                    transactional: false,
                    lsn: Lsn(0x20),
                    prefix: "p".into(),
                    content: Bytes::from_static(b"\xfe\x41"),
                }),
                begin(),
                Event::Message(LogicalMessage {
                    transactional: true,
                    lsn: Lsn(0x30),
                    prefix: "p".into(),
                    content: Bytes::from_static("✓".as_bytes()),
                }),
                Event::Truncate(Truncate {
                    relations: vec![rel],
                    cascade: true,
                    restart_identity: false,
                }),
                commit(),
            ],
        );
        assert_eq!(
            out[0],
            json!({"op": "message", "xid": null, "lsn": "0/20", "transactional": false,
                   "prefix": "p", "content_base64": "/kE="})
        );
        assert_eq!(out[1]["op"], "begin");
        assert_eq!(
            out[2],
            json!({"op": "message", "xid": 7, "lsn": "0/30", "transactional": true,
                   "prefix": "p", "content": "✓"})
        );
        assert_eq!(
            out[3],
            json!({"op": "truncate", "xid": 7,
                   "relations": [{"schema": "public", "table": "t"}],
                   "cascade": true, "restart_identity": false})
        );
        assert_eq!(out[4]["op"], "commit");
    }

    #[test]
    fn a_new_description_of_a_table_replaces_its_columns() {
        let mut r = Renderer::default();
        let change = |rel: &Arc<Relation>| {
            Event::Change(Change {
                op: ChangeOp::Insert,
                relation: rel.clone(),
                new: Some(Tuple(vec![text("1"); rel.columns.len()])),
                old: None,
                source_change_id: None,
            })
        };
        let v1 = relation(ReplicaIdentity::Default, &["id"]);
        let mut v2 = (*v1).clone();
        v2.columns.truncate(1);
        let v2 = Arc::new(v2);
        let out = lines(&mut r, &[change(&v1), change(&v2), change(&v1)]);
        let widths: Vec<usize> = out
            .iter()
            .map(|l| l["columns"].as_array().unwrap().len())
            .collect();
        assert_eq!(widths, [3, 1, 3]);
    }

    #[test]
    fn walbridges_own_slots_are_refused() {
        let config = Config::from_toml_str(
            "[[nodes]]\nname = \"a\"\ndsn = \"host=h dbname=d user=u\"\n\
             [[nodes]]\nname = \"b\"\ndsn = \"host=h2 dbname=d user=u\"\n",
        )
        .unwrap();
        for slot in ["walbridge_a_to_b", "walbridge_b_to_a", "walbridge_a_to_c"] {
            let e = check_slot_is_not_walbridges(&config, "a", slot, Plugin::PgOutput).unwrap_err();
            assert!(e.is_usage(), "{slot}");
            assert!(e.to_string().contains("Omit --slot"), "{e}");
        }
        assert!(check_slot_is_not_walbridges(&config, "a", "feed", Plugin::PgOutput).is_ok());
        assert!(temporary_slot_name(&config).starts_with("walbridge_tail_"));
    }
}
