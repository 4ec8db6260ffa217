//! A node's change feed: a replication stream decoded into [`Event`]s.
//!
//! ```text
//!   START_REPLICATION ──XLogData──▶ decoder (pgoutput | wal2json) ──Event──▶ consumer
//!                    ──Keepalive──────────────────────────────────────────▶ consumer
//! ```
//!
//! wal2json does not describe tables, so for it the source reads table descriptions from the
//! node's catalog (once per table, again when a change no longer fits) and names replication
//! origins from `pg_replication_origin`. Both plugins then yield the same events.
//!
//! With a [`SourceOptions::selection`], wal2json is not given the replicated tables
//! (`add-tables` is fixed when the stream starts, so a table created later would be skipped
//! and confirmed past): it streams every table but walbridge's own (`filter-tables`), and the
//! source decides per table, from the catalog, the first time the table appears:
//!
//! ```text
//!   change of s.t ──▶ known? ──yes──▶ decode ──▶ Event
//!                        │ no
//!                        ▼
//!       root of s.t's partition tree matches the selection? ──no──▶ ignored (no events)
//!                        │ yes
//!                        ▼
//!       describe s.t from the catalog, decode ──▶ Event
//! ```
//!
//! The transaction frame is made here, once ([`crate::decode::frame`]): the Origin message is
//! folded into its Begin, and with [`SourceOptions::drop_echo`] a transaction with an origin
//! is left out whole ([`SourceItem::Echo`] tells that it was).
//!
//! Echo: what walbridge applied on this node carries a replication origin and must not travel
//! on. With pgoutput on PostgreSQL 16+ the server leaves such transactions out (`origin
//! 'none'`); wal2json filters them by id (`filter-origins`); on 15 pgoutput sends them and the
//! source drops them, skipping their change messages undecoded: the client-side safety net.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio_postgres::Client;

use crate::catalog::{self, quote_ident};
use crate::config::{Plugin, QualifiedName, TableSelection, WALBRIDGE_SCHEMA};
use crate::decode::frame::{Framed, Framer};
use crate::decode::pgoutput::PgOutputDecoder;
use crate::decode::wal2json::{self, Wal2JsonDecoder, Wal2JsonError};
use crate::decode::DecodeError;
use crate::dsn::Dsn;
use crate::event::{Commit, Event};
use crate::lsn::Lsn;
use crate::pgconn;
use crate::protocol::{
    self, CreatedSlot, DriverFuture, Feedback, ProtocolError, ReplicationClient, ReplicationStream,
    SnapshotAction, StreamConfig, StreamItem, XLogData,
};

mod spill;
use spill::{Replay, Routed, Spill};

/// What to stream.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// The output plugin the slot was created with.
    pub plugin: Plugin,
    /// The slot to read.
    pub slot: String,
    /// Publication (pgoutput).
    pub publication: String,
    /// Where to start (`0/0`: from the slot's confirmed position).
    pub start: Lsn,
    /// Tables known to be replicated (partitions included), described up front (wal2json).
    pub tables: Vec<(String, String)>,
    /// wal2json: the tables to pass on (a partition through its root); the others, and
    /// walbridge's own objects, yield no events. `None` (`tail`): every table.
    pub selection: Option<TableSelection>,
    /// wal2json older than 2.6 writes NaN and ±Infinity as null. `Some`: refuse to stream a
    /// replicated table with float or numeric columns (the columns listed here per table are
    /// never sent and do not count), at start and when a table first appears; `None`: accept
    /// the loss with a warning.
    pub refuse_lossy: Option<BTreeMap<QualifiedName, Vec<String>>>,
    /// Origin ids whose changes the server should drop (wal2json `filter-origins`); echo
    /// suppression also drops any transaction with an origin after decoding.
    pub filter_origins: Vec<u16>,
    /// Pass `pg_logical_emit_message` records on: pgoutput is started with `messages 'true'`;
    /// wal2json sends them regardless (2.5 has no option for it) and the source drops them
    /// unless this is set.
    pub messages: bool,
    /// `application_name` of the replication session.
    pub application_name: String,
    /// Stream settings (status interval, buffer budget, cancellation).
    pub stream: StreamConfig,
    /// Leave out transactions that carry an origin (walbridge's own applied changes, and
    /// writes after `walbridge.skip_session()`). With pgoutput on PostgreSQL 16+ the server is
    /// asked not to send them at all (`origin 'none'`). Elsewhere they still arrive and the
    /// source drops them whole (their change messages undecoded), yielding
    /// [`SourceItem::Echo`] for each.
    pub drop_echo: bool,
    /// pgoutput: ask for large transactions while they are still in progress (protocol
    /// version 2, `streaming 'on'`): their blocks arrive as [`Event::StreamStart`] ...
    /// [`Event::StreamCommit`] / [`Event::StreamAbort`]. Ignored with wal2json.
    pub stream_in_progress: bool,
    /// Streamed transactions (xids) to keep on disk until they commit and then pass on as
    /// one ordinary transaction (see `spill`): those the applier could not keep open because
    /// other transactions interleaved with them.
    pub spill: Vec<u32>,
}

/// The source could not be started or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The replication session failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The catalog connection (wal2json) failed.
    #[error("{0}")]
    Connect(#[from] pgconn::ConnectError),
    /// A catalog query failed.
    #[error("reading the source catalog: {0}")]
    Catalog(#[from] catalog::CatalogError),
    /// A catalog query failed.
    #[error("reading the source catalog: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The plugin sent something undecodable.
    #[error("decoding the {plugin} stream at {lsn}: {source}")]
    Decode {
        /// Which plugin.
        plugin: &'static str,
        /// Where.
        lsn: Lsn,
        /// What.
        #[source]
        source: DecodeError,
    },
    /// The server removed WAL the slot still needed (`max_slot_wal_keep_size`).
    #[error(
        "replication slot {slot} on {node} was invalidated: the server removed WAL it still \
         needed (max_slot_wal_keep_size), so the changes committed there after {confirmed} \
         never reached the peer and can no longer be streamed; run walbridge verify to see \
         what differs, then rebuild this direction: walbridge teardown, then walbridge setup \
         --copy-from this node (other directions go on meanwhile)"
    )]
    SlotLost {
        /// The slot.
        slot: String,
        /// The node.
        node: String,
        /// The last position the peer confirmed.
        confirmed: String,
    },
    /// wal2json older than 2.6 would turn NaN and ±Infinity of these columns into NULL.
    #[error("{}", crate::decode::wal2json::lossy_refusal(.columns))]
    LossyWal2Json {
        /// The node (the caller names it).
        node: String,
        /// `schema.table.column`.
        columns: Vec<String>,
    },
    /// A streamed transaction could not be kept on (or read back from) local disk.
    #[error(
        "keeping a streamed transaction of node {node} in a temporary file failed (is $TMPDIR \
         full or unwritable?): {source}"
    )]
    Spill {
        /// The node.
        node: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The slot does not exist.
    #[error(
        "replication slot {slot} does not exist on {node}; run walbridge setup (if {node} is a \
         promoted standby, the promotion lost the slot: only failover slots synchronized to the \
         standby survive one, on PostgreSQL 17+; after setup, run walbridge verify and copy \
         from {node} what it names, since changes made before the new slot were not streamed)"
    )]
    NoSlot {
        /// The slot.
        slot: String,
        /// The node.
        node: String,
    },
}

impl crate::direction::Classify for SourceError {
    fn class(&self) -> crate::direction::ErrorClass {
        if self.is_transient() {
            crate::direction::ErrorClass::Transient
        } else {
            crate::direction::ErrorClass::Definite
        }
    }
}

impl SourceError {
    /// Transient (retry) or definite (stop).
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Protocol(e) => e.is_transient(),
            SourceError::Connect(e) => e.is_transient(),
            SourceError::Sql(e) => pgconn::is_transient(e),
            SourceError::Catalog(e) => pgconn::is_transient(&e.0),
            // Disk space may come back; the transaction is streamed again from its start.
            SourceError::Spill { .. } => true,
            SourceError::Decode { .. }
            | SourceError::NoSlot { .. }
            | SourceError::SlotLost { .. }
            | SourceError::LossyWal2Json { .. } => false,
        }
    }
}

enum Decoder {
    PgOutput(PgOutputDecoder),
    Wal2Json(Box<Wal2JsonDecoder>),
}

/// A decoded change feed.
pub struct Source {
    stream: ReplicationStream,
    feedback: Feedback,
    decoder: Decoder,
    catalog: Option<Client>,
    pending: VecDeque<SourceItem>,
    /// Pass `pg_logical_emit_message` records on (wal2json sends them whether asked or not).
    messages: bool,
    /// wal2json 2.5 has no `numeric-data-types-as-string`: NaN/Infinity arrive as null.
    pub numeric_as_string: bool,
    /// The server drops transactions with an origin before sending (pgoutput `origin 'none'`).
    server_echo_filter: bool,
    /// Folds Origin into Begin and drops echo.
    framer: Framer,
    /// The framer's output, reused from message to message (no allocation per message).
    framed: Vec<Framed>,
    /// wal2json: which tables to pass on.
    selection: Option<TableSelection>,
    /// wal2json writes NaN and ±Infinity as null and that is refused: the columns that do not
    /// count (see [`SourceOptions::refuse_lossy`]).
    refuse_lossy: Option<BTreeMap<QualifiedName, Vec<String>>>,
    /// The node, for errors.
    node: String,
    /// Protocol version 2 with `streaming 'on'` was asked for.
    streaming: bool,
    /// Streamed transactions kept on disk until they commit.
    spill: Spill,
    /// A spilled transaction being replayed, with the position of its Stream Commit.
    replay: Option<(Replay, Lsn)>,
}

/// The first server version whose pgoutput takes `origin 'none'`.
const ORIGIN_FILTER_SINCE: u32 = 160_000;

/// Items the consumer sees.
#[derive(Debug)]
pub enum SourceItem {
    /// A decoded event; `wal_start` is the XLogData position it came from.
    Event {
        /// The event.
        event: Event,
        /// WAL position of the message.
        wal_start: Lsn,
    },
    /// The server has nothing before `wal_end` left to send. Never yielded while a
    /// transaction's Begin is held back by the framer.
    Keepalive {
        /// The server's WAL end.
        wal_end: Lsn,
    },
    /// A transaction with an origin was left out ([`SourceOptions::drop_echo`]).
    Echo {
        /// Its commit.
        commit: Commit,
    },
}

/// `START_REPLICATION` options for pgoutput; `origin_none` asks the server (16+) to leave out
/// every transaction that carries a replication origin.
fn pgoutput_options(opts: &SourceOptions, origin_none: bool) -> Vec<(String, String)> {
    // Protocol version 2 adds in-progress streaming (3 would add two-phase, 4 parallel
    // streaming; walbridge uses neither).
    let proto = if opts.stream_in_progress { "2" } else { "1" };
    let mut v = vec![
        ("proto_version".to_string(), proto.to_string()),
        (
            "publication_names".to_string(),
            quote_ident(&opts.publication),
        ),
    ];
    if opts.messages {
        v.push(("messages".to_string(), "true".to_string()));
    }
    if origin_none {
        v.push(("origin".to_string(), "none".to_string()));
    }
    if opts.stream_in_progress {
        v.push(("streaming".to_string(), "on".to_string()));
    }
    v
}

fn wal2json_options(opts: &SourceOptions, numeric_as_string: bool) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = wal2json::START_OPTIONS
        .iter()
        .map(|(k, val)| (k.to_string(), val.to_string()))
        .collect();
    if numeric_as_string {
        v.push(("numeric-data-types-as-string".into(), "1".into()));
    }
    // Not `add-tables`: it is fixed for the life of the stream (see the module docs).
    if let Some(selection) = &opts.selection {
        let mut filter = wal2json::table_list_option(
            selection
                .reserved()
                .iter()
                .map(|q| (q.schema.as_str(), q.name.as_str())),
        );
        if !filter.is_empty() {
            filter.push(',');
        }
        // The schema name has no character wal2json would need escaped.
        filter.push_str(WALBRIDGE_SCHEMA);
        filter.push_str(".*");
        v.push(("filter-tables".into(), filter));
    }
    if !opts.filter_origins.is_empty() {
        v.push((
            "filter-origins".into(),
            wal2json::origin_list_option(opts.filter_origins.iter().copied()),
        ));
    }
    // wal2json has no option to turn messages on: 2.5 rejects `include-messages` as unknown
    // and always sends them; without `SourceOptions::messages` the source drops them.
    v
}

/// The shortest silence after which a replication link is declared dead.
pub const MIN_RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The bound used when the source disables `wal_sender_timeout` (0) or shows no value.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a replication stream may stay silent (although walbridge asks the walsender to
/// answer) before walbridge reconnects: the source's own `wal_sender_timeout` (as shown by
/// `SHOW`, e.g. `1min`), at least [`MIN_RECEIVE_TIMEOUT`]. The walsender gives up on a silent
/// walbridge after the same time, so both ends agree about a dead link.
pub fn receive_timeout(wal_sender_timeout: &str) -> Duration {
    let s = wal_sender_timeout.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let Ok(n) = number.parse::<u64>() else {
        return DEFAULT_RECEIVE_TIMEOUT;
    };
    let millis = match unit.trim() {
        "ms" | "" => n,
        "s" => n.saturating_mul(1000),
        "min" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return DEFAULT_RECEIVE_TIMEOUT,
    };
    if millis == 0 {
        return DEFAULT_RECEIVE_TIMEOUT;
    }
    Duration::from_millis(millis).max(MIN_RECEIVE_TIMEOUT)
}

impl Source {
    /// Opens the replication session on the existing slot `opts.slot` and starts streaming;
    /// the driver future must be spawned.
    pub async fn start(
        dsn: &Dsn,
        opts: SourceOptions,
    ) -> Result<(Source, DriverFuture), SourceError> {
        let (source, driver, _) = Self::open(dsn, opts, false).await?;
        Ok((source, driver))
    }

    /// Creates the temporary slot `opts.slot` (plugin `opts.plugin`, no snapshot) and streams
    /// it; the driver future must be spawned.
    ///
    /// A temporary slot belongs to the session that created it and only that session may
    /// stream it, so both happen on the one replication session the driver then owns. The
    /// server drops the slot when the stream ends, however it ends (also on a crash of
    /// walbridge or the connection). Returns where decoding starts (the slot's consistent
    /// point): changes committed after it are streamed.
    pub async fn start_temporary(
        dsn: &Dsn,
        opts: SourceOptions,
    ) -> Result<(Source, DriverFuture, CreatedSlot), SourceError> {
        let (source, driver, created) = Self::open(dsn, opts, true).await?;
        match created {
            Some(created) => Ok((source, driver, created)),
            // `open` with `temporary` always creates the slot.
            None => Err(SourceError::Protocol(ProtocolError::protocol(
                &dsn.describe(),
                "the temporary slot was not created",
            ))),
        }
    }

    async fn open(
        dsn: &Dsn,
        opts: SourceOptions,
        temporary: bool,
    ) -> Result<(Source, DriverFuture, Option<CreatedSlot>), SourceError> {
        let (decoder, catalog) = match opts.plugin {
            Plugin::PgOutput => (Decoder::PgOutput(PgOutputDecoder::new()), None),
            Plugin::Wal2Json => {
                let client = pgconn::connect(dsn, &opts.application_name).await?;
                let mut d = Wal2JsonDecoder::new();
                for (roident, roname) in origins(&client).await? {
                    d.register_origin(roident, roname);
                }
                for (schema, table) in &opts.tables {
                    if let Some((rel, generated)) =
                        catalog::relation_for_stream(&client, schema, table).await?
                    {
                        d.register_relation(rel, generated);
                    }
                }
                (Decoder::Wal2Json(Box::new(d)), Some(client))
            }
        };
        let mut numeric_as_string = opts.plugin == Plugin::Wal2Json;
        let streaming = opts.plugin == Plugin::PgOutput && opts.stream_in_progress;
        let spill = Spill::new(opts.spill.iter().copied());
        let mut retried = false;
        let (stream, feedback, driver, created, server_echo_filter) = loop {
            let mut client = protocol::connect_replication(dsn, &opts.application_name).await?;
            let server_echo_filter = opts.plugin == Plugin::PgOutput
                && opts.drop_echo
                && client
                    .connection()
                    .server_version_num()
                    .is_some_and(|v| v >= ORIGIN_FILTER_SINCE);
            let created = if temporary {
                if retried {
                    // The failed attempt's session drops its temporary slot while it
                    // cleans up, which may finish after its error reached us.
                    wait_slot_gone(&mut client, &opts.slot).await?;
                }
                Some(
                    client
                        .create_logical_slot(
                            &opts.slot,
                            opts.plugin.as_str(),
                            true,
                            SnapshotAction::NoExport,
                        )
                        .await?,
                )
            } else {
                let exists = client
                    .simple_query(&format!(
                        "SELECT wal_status, confirmed_flush_lsn::text \
                         FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                        catalog::quote_literal(&opts.slot)
                    ))
                    .await?;
                if exists.rows.is_empty() {
                    return Err(SourceError::NoSlot {
                        slot: opts.slot.clone(),
                        node: dsn.describe(),
                    });
                }
                if exists.get(0, 0) == Some("lost") {
                    return Err(SourceError::SlotLost {
                        slot: opts.slot.clone(),
                        node: dsn.describe(),
                        confirmed: exists.get(0, 1).unwrap_or("its last position").to_string(),
                    });
                }
                None
            };
            let mut stream_config = opts.stream.clone();
            if stream_config.receive_timeout.is_none() {
                let shown = client.simple_query("SHOW wal_sender_timeout").await?;
                stream_config.receive_timeout =
                    Some(receive_timeout(shown.get(0, 0).unwrap_or("")));
            }
            let options = match opts.plugin {
                Plugin::PgOutput => pgoutput_options(&opts, server_echo_filter),
                Plugin::Wal2Json => wal2json_options(&opts, numeric_as_string),
            };
            match client
                .start_logical(&opts.slot, opts.start, &options, stream_config)
                .await
            {
                Ok((stream, feedback, driver)) => {
                    break (stream, feedback, driver, created, server_echo_filter)
                }
                Err(e)
                    if numeric_as_string
                        && e.to_string().contains("numeric-data-types-as-string") =>
                {
                    if let (Some(skip), Some(client)) = (&opts.refuse_lossy, &catalog) {
                        lossy_check(client, &dsn.describe(), skip, &opts.tables).await?;
                    }
                    tracing::warn!(
                        node = %dsn.describe(),
                        "wal2json on this node is older than 2.6 and prints NaN and Infinity of \
                         float and numeric columns as null; such values replicate as NULL \
                         (upgrade wal2json or use plugin = \"pgoutput\")"
                    );
                    numeric_as_string = false;
                    retried = true;
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok((
            Source {
                stream,
                feedback,
                decoder,
                catalog,
                pending: VecDeque::new(),
                messages: opts.messages,
                numeric_as_string,
                server_echo_filter,
                framer: Framer::new(opts.drop_echo),
                framed: Vec::new(),
                selection: opts.selection,
                refuse_lossy: opts.refuse_lossy.filter(|_| !numeric_as_string),
                node: dsn.describe(),
                streaming,
                spill,
                replay: None,
            },
            driver,
            created,
        ))
    }

    /// Whether the server leaves out transactions with an origin (pgoutput `origin 'none'`,
    /// PostgreSQL 16+), so no echo reaches walbridge at all.
    pub fn server_echo_filter(&self) -> bool {
        self.server_echo_filter
    }

    /// Whether more is already received and waiting (decoded or not).
    pub fn has_queued(&self) -> bool {
        !self.pending.is_empty() || self.replay.is_some() || self.stream.queued() > 0
    }

    /// Progress shared with the stream driver: confirm applied positions here.
    pub fn feedback(&self) -> &Feedback {
        &self.feedback
    }

    /// The next event or keepalive; `None` when the stream ended cleanly (cancelled).
    /// Not cancel-safe while decoding: in a `select!`, use [`Source::recv`] + [`Source::decode`].
    pub async fn next(&mut self) -> Result<Option<SourceItem>, SourceError> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(item));
            }
            let Some(item) = self.recv().await else {
                return Ok(None);
            };
            let mut items = self.decode(item?).await?.into_iter();
            if let Some(first) = items.next() {
                self.pending.extend(items);
                return Ok(Some(first));
            }
        }
    }

    /// The next raw stream item if one is already waiting (never waits).
    pub fn try_recv(&mut self) -> Option<Result<StreamItem, ProtocolError>> {
        if let Some(item) = self.replayed() {
            return Some(item);
        }
        self.stream.try_recv()
    }

    /// The next raw stream item; cancel-safe. `None` when the stream ended cleanly.
    pub async fn recv(&mut self) -> Option<Result<StreamItem, ProtocolError>> {
        if let Some(item) = self.replayed() {
            return Some(item);
        }
        self.stream.recv().await
    }

    /// The next message of a spilled transaction being replayed (see `spill`), as if the
    /// server had sent it; read errors end the stream with an error.
    fn replayed(&mut self) -> Option<Result<StreamItem, ProtocolError>> {
        let (replay, at) = self.replay.as_mut()?;
        let at = *at;
        match replay.next() {
            Ok(Some(data)) => Some(Ok(StreamItem::XLogData(XLogData::replayed(at, data)))),
            Ok(None) => {
                self.replay = None;
                None
            }
            Err(e) => {
                self.replay = None;
                Some(Err(ProtocolError::protocol(
                    &self.node,
                    format!("reading back a spilled streamed transaction: {e}"),
                )))
            }
        }
    }

    /// Decodes one raw item into zero or more framed items (wal2json may look up the
    /// catalog).
    pub async fn decode(&mut self, item: StreamItem) -> Result<Vec<SourceItem>, SourceError> {
        let data = match item {
            StreamItem::Keepalive { wal_end } => {
                // A held Begin's transaction was not delivered yet, though it lies before
                // wal_end: this keepalive must not vouch for it (the next one will).
                return Ok(if self.framer.settled() {
                    vec![SourceItem::Keepalive { wal_end }]
                } else {
                    Vec::new()
                });
            }
            StreamItem::XLogData(data) => data,
        };
        let framed = &mut self.framed;
        framed.clear();
        match &mut self.decoder {
            Decoder::PgOutput(d) => {
                if self.framer.dropping()
                    && matches!(data.data.first(), Some(b'I' | b'U' | b'D' | b'T' | b'M'))
                {
                    return Ok(Vec::new());
                }
                let failed = |e: crate::decode::pgoutput::PgOutputError| SourceError::Decode {
                    plugin: "pgoutput",
                    lsn: data.wal_start,
                    source: e.into(),
                };
                if self.streaming {
                    let mut events = Vec::new();
                    d.decode_streaming(data.wal_start, &data.data, &mut events)
                        .map_err(failed)?;
                    if !self.spill.is_empty() {
                        let routed = self.spill.route(&data.data, std::mem::take(&mut events));
                        match routed.map_err(|source| SourceError::Spill {
                            node: self.node.clone(),
                            source,
                        })? {
                            Routed::Pass(passed) => events = passed,
                            Routed::Kept => {}
                            Routed::Replay(replay) => self.replay = Some((replay, data.wal_start)),
                        }
                    }
                    for event in events {
                        self.framer.push(event, data.wal_start, framed);
                    }
                } else if let Some(event) = d.decode(data.wal_start, &data.data).map_err(failed)? {
                    // One event at most: framed straight away, no list in between.
                    self.framer.push(event, data.wal_start, framed);
                }
            }
            Decoder::Wal2Json(d) => {
                let mut events = Vec::new();
                let mut retried = false;
                loop {
                    match d.decode_into(data.wal_start, &data.data, &mut events) {
                        Ok(()) => break,
                        Err(e) if e.needs_catalog() && !retried && self.catalog.is_some() => {
                            retried = true;
                            if let Some(client) = self.catalog.as_ref() {
                                let lossy = self.refuse_lossy.as_ref().map(|s| (s, &*self.node));
                                learn(d, client, &e, self.selection.as_ref(), lossy).await?;
                            }
                        }
                        Err(e) => {
                            return Err(SourceError::Decode {
                                plugin: "wal2json",
                                lsn: data.wal_start,
                                source: e.into(),
                            })
                        }
                    }
                }
                if !self.messages {
                    events.retain(|event| !matches!(event, Event::Message(_)));
                }
                for event in events {
                    self.framer.push(event, data.wal_start, framed);
                }
            }
        }
        let items = framed
            .drain(..)
            .map(|f| match f {
                Framed::Event(event, wal_start) => SourceItem::Event { event, wal_start },
                Framed::Echo(commit) => SourceItem::Echo { commit },
            })
            .collect();
        Ok(items)
    }
}

/// Teaches a wal2json decoder reading outside a stream (`walbridge skip` peeking a slot) what
/// `e` says it lacked, with the source's catalog: a table description (or, with
/// `selection`, that the table is not replicated) or an origin's name.
pub async fn teach_wal2json(
    d: &mut Wal2JsonDecoder,
    client: &Client,
    e: &Wal2JsonError,
    selection: Option<&TableSelection>,
) -> Result<(), SourceError> {
    learn(d, client, e, selection, None).await
}

/// Teaches the wal2json decoder what it lacked: a table description (or that the table is
/// not replicated) or an origin's name.
async fn learn(
    d: &mut Wal2JsonDecoder,
    client: &Client,
    e: &Wal2JsonError,
    selection: Option<&TableSelection>,
    refuse_lossy: Option<(&BTreeMap<QualifiedName, Vec<String>>, &str)>,
) -> Result<(), SourceError> {
    match e {
        Wal2JsonError::UnknownOrigin { .. } => {
            for (roident, roname) in origins(client).await? {
                d.register_origin(roident, roname);
            }
        }
        Wal2JsonError::UnknownRelation { schema, table } => {
            if let Some(selection) = selection {
                if !replicated(client, selection, schema, table).await? {
                    d.ignore_relation(schema, table);
                    return Ok(());
                }
            }
            if let Some((skip, node)) = refuse_lossy {
                lossy_check(client, node, skip, &[(schema.clone(), table.clone())]).await?;
            }
            if let Some((rel, generated)) =
                catalog::relation_for_stream(client, schema, table).await?
            {
                d.register_relation(rel, generated);
            }
        }
        Wal2JsonError::RelationMismatch { schema, table, .. } => {
            if let Some((rel, generated)) =
                catalog::relation_for_stream(client, schema, table).await?
            {
                d.register_relation(rel, generated);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Refuses (wal2json older than 2.6) when `tables` have float or numeric columns that are
/// sent (not in `skip`).
async fn lossy_check(
    client: &Client,
    node: &str,
    skip: &BTreeMap<QualifiedName, Vec<String>>,
    tables: &[(String, String)],
) -> Result<(), SourceError> {
    let columns: Vec<String> = catalog::float_columns(client, tables)
        .await?
        .into_iter()
        .filter(|(s, t, c)| !skip.iter().any(|(q, cols)| q.is(s, t) && cols.contains(c)))
        .map(|(s, t, c)| format!("{s}.{t}.{c}"))
        .collect();
    if columns.is_empty() {
        return Ok(());
    }
    Err(SourceError::LossyWal2Json {
        node: node.to_string(),
        columns,
    })
}

/// Whether changes of `schema.table` are replicated: never walbridge's own objects; else
/// when the root of its partition tree (itself, for a plain table) matches the selection. A
/// table gone from the catalog is judged by its own name (a matching one is then passed on,
/// and its missing description stops the stream rather than skipping changes silently).
async fn replicated(
    client: &Client,
    selection: &TableSelection,
    schema: &str,
    table: &str,
) -> Result<bool, SourceError> {
    if selection.is_reserved(schema, table) {
        return Ok(false);
    }
    Ok(
        match catalog::replication_root(client, schema, table).await? {
            Some((root_schema, root)) => selection.matches(&root_schema, &root),
            None => selection.matches(schema, table),
        },
    )
}

/// Polls until no slot called `slot` exists (at most a few seconds; then creating it fails
/// with the server's own "already exists" error).
async fn wait_slot_gone(client: &mut ReplicationClient, slot: &str) -> Result<(), SourceError> {
    let sql = format!(
        "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
        catalog::quote_literal(slot)
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !client.simple_query(&sql).await?.rows.is_empty()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn origins(client: &Client) -> Result<Vec<(u16, String)>, SourceError> {
    Ok(client
        .query(
            "SELECT roident::int4, roname FROM pg_catalog.pg_replication_origin",
            &[],
        )
        .await?
        .iter()
        .filter_map(|r| Some((u16::try_from(r.get::<_, i32>(0)).ok()?, r.get(1))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_timeout_follows_wal_sender_timeout() {
        assert_eq!(receive_timeout("1min"), Duration::from_secs(60));
        assert_eq!(receive_timeout("90s"), Duration::from_secs(90));
        assert_eq!(receive_timeout("2h"), Duration::from_secs(7200));
        assert_eq!(receive_timeout("15000ms"), Duration::from_secs(15));
        // Never below the floor; 0 (disabled) and nonsense take the default.
        assert_eq!(receive_timeout("1s"), MIN_RECEIVE_TIMEOUT);
        assert_eq!(receive_timeout("0"), DEFAULT_RECEIVE_TIMEOUT);
        assert_eq!(receive_timeout("soon"), DEFAULT_RECEIVE_TIMEOUT);
    }
}
