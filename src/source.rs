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
//! Echo: what walbridge applied on this node carries a replication origin and must not travel
//! on. With pgoutput on PostgreSQL 16+ the server leaves such transactions out (`origin
//! 'none'`); wal2json filters them by id (`filter-origins`); on 15 pgoutput sends them and the
//! source skips their changes undecoded, then `run` drops them: the client-side safety net.

use std::collections::VecDeque;

use tokio_postgres::Client;

use crate::catalog::{self, quote_ident};
use crate::config::Plugin;
use crate::decode::pgoutput::PgOutputDecoder;
use crate::decode::wal2json::{self, Wal2JsonDecoder, Wal2JsonError};
use crate::decode::DecodeError;
use crate::dsn::Dsn;
use crate::event::Event;
use crate::lsn::Lsn;
use crate::pgconn;
use crate::protocol::{
    self, CreatedSlot, DriverFuture, Feedback, ProtocolError, ReplicationClient, ReplicationStream,
    SnapshotAction, StreamConfig, StreamItem,
};

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
    /// Tables to stream (wal2json `add-tables`; partitions included); empty = all.
    pub tables: Vec<(String, String)>,
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
    /// asked not to send them at all (`origin 'none'`). Elsewhere (pgoutput on 15) they still
    /// arrive and their change messages are skipped without decoding (their Begin, Origin and
    /// Commit still come through): the safety net, since `run` drops such transactions anyway.
    pub skip_echo_changes: bool,
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
    /// The slot does not exist.
    #[error("replication slot {slot} does not exist on {node}; run walbridge setup")]
    NoSlot {
        /// The slot.
        slot: String,
        /// The node.
        node: String,
    },
}

impl SourceError {
    /// Transient (retry) or definite (stop).
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Protocol(e) => e.is_transient(),
            SourceError::Connect(e) => e.is_transient(),
            SourceError::Sql(e) => e.is_closed() || e.as_db_error().is_none(),
            SourceError::Catalog(e) => e.0.is_closed() || e.0.as_db_error().is_none(),
            SourceError::Decode { .. } | SourceError::NoSlot { .. } => false,
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
    pending: VecDeque<(Event, Lsn)>,
    /// Pass `pg_logical_emit_message` records on (wal2json sends them whether asked or not).
    messages: bool,
    /// wal2json 2.5 has no `numeric-data-types-as-string`: NaN/Infinity arrive as null.
    pub numeric_as_string: bool,
    skip_echo_changes: bool,
    /// The server drops transactions with an origin before sending (pgoutput `origin 'none'`).
    server_echo_filter: bool,
    /// Inside a transaction that carries an origin.
    in_echo: bool,
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
    /// The server has nothing before `wal_end` left to send.
    Keepalive {
        /// The server's WAL end.
        wal_end: Lsn,
    },
}

/// `START_REPLICATION` options for pgoutput; `origin_none` asks the server (16+) to leave out
/// every transaction that carries a replication origin.
fn pgoutput_options(opts: &SourceOptions, origin_none: bool) -> Vec<(String, String)> {
    let mut v = vec![
        ("proto_version".to_string(), "1".to_string()),
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
    if !opts.tables.is_empty() {
        v.push((
            "add-tables".into(),
            wal2json::table_list_option(opts.tables.iter().map(|(s, t)| (s.as_str(), t.as_str()))),
        ));
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
        let mut retried = false;
        let (stream, feedback, driver, created, server_echo_filter) = loop {
            let mut client = protocol::connect_replication(dsn, &opts.application_name).await?;
            let server_echo_filter = opts.plugin == Plugin::PgOutput
                && opts.skip_echo_changes
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
                        "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                        catalog::quote_literal(&opts.slot)
                    ))
                    .await?;
                if exists.rows.is_empty() {
                    return Err(SourceError::NoSlot {
                        slot: opts.slot.clone(),
                        node: dsn.describe(),
                    });
                }
                None
            };
            let options = match opts.plugin {
                Plugin::PgOutput => pgoutput_options(&opts, server_echo_filter),
                Plugin::Wal2Json => wal2json_options(&opts, numeric_as_string),
            };
            match client
                .start_logical(&opts.slot, opts.start, &options, opts.stream.clone())
                .await
            {
                Ok((stream, feedback, driver)) => {
                    break (stream, feedback, driver, created, server_echo_filter)
                }
                Err(e)
                    if numeric_as_string
                        && e.to_string().contains("numeric-data-types-as-string") =>
                {
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
                skip_echo_changes: opts.skip_echo_changes,
                server_echo_filter,
                in_echo: false,
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
        !self.pending.is_empty() || self.stream.queued() > 0
    }

    /// Progress shared with the stream driver: confirm applied positions here.
    pub fn feedback(&self) -> &Feedback {
        &self.feedback
    }

    /// The next event or keepalive; `None` when the stream ended cleanly (cancelled).
    /// Not cancel-safe while decoding: in a `select!`, use [`Source::recv`] + [`Source::decode`].
    pub async fn next(&mut self) -> Result<Option<SourceItem>, SourceError> {
        loop {
            if let Some((event, wal_start)) = self.pending.pop_front() {
                return Ok(Some(SourceItem::Event { event, wal_start }));
            }
            let Some(item) = self.recv().await else {
                return Ok(None);
            };
            let mut items = self.decode(item?).await?.into_iter();
            if let Some(first) = items.next() {
                for rest in items {
                    if let SourceItem::Event { event, wal_start } = rest {
                        self.pending.push_back((event, wal_start));
                    }
                }
                return Ok(Some(first));
            }
        }
    }

    /// The next raw stream item if one is already waiting (never waits).
    pub fn try_recv(&mut self) -> Option<Result<StreamItem, ProtocolError>> {
        self.stream.try_recv()
    }

    /// The next raw stream item; cancel-safe. `None` when the stream ended cleanly.
    pub async fn recv(&mut self) -> Option<Result<StreamItem, ProtocolError>> {
        self.stream.recv().await
    }

    /// Decodes one raw item into zero or more items (wal2json may look up the catalog).
    pub async fn decode(&mut self, item: StreamItem) -> Result<Vec<SourceItem>, SourceError> {
        let data = match item {
            StreamItem::Keepalive { wal_end } => {
                return Ok(vec![SourceItem::Keepalive { wal_end }])
            }
            StreamItem::XLogData(data) => data,
        };
        {
            match &mut self.decoder {
                Decoder::PgOutput(d) => {
                    if self.in_echo
                        && matches!(data.data.first(), Some(b'I' | b'U' | b'D' | b'T' | b'M'))
                    {
                        return Ok(Vec::new());
                    }
                    let decoded =
                        d.decode(data.wal_start, &data.data)
                            .map_err(|e| SourceError::Decode {
                                plugin: "pgoutput",
                                lsn: data.wal_start,
                                source: e.into(),
                            })?;
                    match &decoded {
                        Some(Event::Origin(_)) => self.in_echo = self.skip_echo_changes,
                        Some(Event::Begin(_) | Event::Commit(_)) => self.in_echo = false,
                        _ => {}
                    }
                    Ok(decoded
                        .map(|event| SourceItem::Event {
                            event,
                            wal_start: data.wal_start,
                        })
                        .into_iter()
                        .collect())
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
                                    learn(d, client, &e).await?;
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
                    let messages = self.messages;
                    Ok(events
                        .into_iter()
                        .filter(|event| messages || !matches!(event, Event::Message(_)))
                        .map(|event| SourceItem::Event {
                            event,
                            wal_start: data.wal_start,
                        })
                        .collect())
                }
            }
        }
    }
}

/// Teaches the wal2json decoder what it lacked: a table description or an origin's name.
async fn learn(
    d: &mut Wal2JsonDecoder,
    client: &Client,
    e: &Wal2JsonError,
) -> Result<(), SourceError> {
    match e {
        Wal2JsonError::UnknownOrigin { .. } => {
            for (roident, roname) in origins(client).await? {
                d.register_origin(roident, roname);
            }
        }
        Wal2JsonError::UnknownRelation { schema, table }
        | Wal2JsonError::RelationMismatch { schema, table, .. } => {
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
