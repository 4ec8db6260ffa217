//! The change-event model shared by both decoders and every consumer.
//!
//! pgoutput and wal2json describe the same thing in different shapes; everything after the
//! decoders (apply, `tail`, conflicts) sees only these types, so a consumer never needs to
//! know which plugin produced an event.
//!
//! ```text
//!  decoders:  Begin ─ Origin? ─ (Relation | Type | Change | Truncate | Message)* ─ Commit
//!  framed:    Begin{origin} ─── (Relation | Type | Change | Truncate | Message)* ─ Commit
//! ```
//!
//! The decoders give the plugin's messages as they come; the transaction frame is made once,
//! by [`crate::decode::frame::Framer`] inside the source: it folds the Origin message into
//! [`Begin::origin`] and, when asked, drops a transaction with an origin whole (echo). So
//! every consumer (apply, `tail`) sees framed transactions and never an [`Event::Origin`].
//!
//! Tuples are positional: `Tuple.0[i]` is the value of `relation.columns[i]`. Old tuples are
//! always full width; with an old *key* the non-key positions hold [`Value::Null`].

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::lsn::{Lsn, PgTimestamp};

/// One decoded message of a logical decoding stream, independent of the output plugin.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A transaction starts; its changes follow until [`Event::Commit`].
    Begin(Begin),
    /// The transaction commits.
    Commit(Commit),
    /// The transaction was written under a replication origin (it arrived by replication).
    /// Only the decoders yield it; a framed stream carries it in [`Begin::origin`].
    Origin(Origin),
    /// A table's description; pgoutput sends it before the first change of a table in a
    /// session and again whenever the table changed.
    Relation(Arc<Relation>),
    /// A non-built-in data type's name (pgoutput sends these so OIDs can be resolved).
    Type(TypeInfo),
    /// A row was inserted, updated or deleted.
    Change(Change),
    /// One or more tables were truncated together.
    Truncate(Truncate),
    /// A `pg_logical_emit_message` record.
    Message(LogicalMessage),
    /// A block of a large transaction streamed while still in progress (pgoutput protocol 2,
    /// `streaming 'on'`) starts; its changes follow until [`Event::StreamStop`]. Blocks of one
    /// transaction may be separated by blocks of others and by whole ordinary transactions.
    StreamStart(StreamStart),
    /// The streamed block ends.
    StreamStop,
    /// Inside a streamed block: the changes that follow (up to the next one of these or the
    /// block's end) belong to this (sub)transaction xid. Only sent when it changes; a block
    /// starts with the top-level xid.
    Subtransaction(u32),
    /// A streamed transaction committed; nothing of it follows.
    StreamCommit(StreamCommit),
    /// A streamed (sub)transaction rolled back: `subxid == xid` discards the whole
    /// transaction, another `subxid` only that subtransaction's changes (and its children's).
    StreamAbort {
        /// The top-level transaction.
        xid: u32,
        /// The (sub)transaction that rolled back.
        subxid: u32,
    },
}

impl Event {
    /// Short lowercase name of the event kind, used in logs and the `tail` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Begin(_) => "begin",
            Event::Commit(_) => "commit",
            Event::Origin(_) => "origin",
            Event::Relation(_) => "relation",
            Event::Type(_) => "type",
            Event::Change(c) => c.op.as_str(),
            Event::Truncate(_) => "truncate",
            Event::Message(_) => "message",
            Event::StreamStart(_) => "stream_start",
            Event::StreamStop => "stream_stop",
            Event::Subtransaction(_) => "subtransaction",
            Event::StreamCommit(_) => "stream_commit",
            Event::StreamAbort { .. } => "stream_abort",
        }
    }
}

/// Start of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// Transaction id on the source.
    pub xid: u32,
    /// LSN of the commit record, known up front because decoding starts at commit time;
    /// `Lsn::ZERO` when the plugin does not say (wal2json without `include-lsn`).
    pub final_lsn: Lsn,
    /// Commit time on the source.
    pub commit_time: PgTimestamp,
    /// The replication origin the transaction was written under (it arrived by replication,
    /// or its session opted out with `walbridge.skip_session()`): set by the framer from the
    /// Origin message; `None` from the decoders and for a local transaction.
    pub origin: Option<Origin>,
}

/// Start of a block of a streamed in-progress transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction id on the source.
    pub xid: u32,
    /// The transaction's first block in this replication session (its earlier changes, if
    /// any were streamed in an earlier session, come again from the start).
    pub first_segment: bool,
    /// The replication origin the transaction was written under: set by the framer from the
    /// Origin message that follows the first block's start (like [`Begin::origin`]).
    pub origin: Option<Origin>,
}

/// A streamed transaction committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    /// The top-level transaction id.
    pub xid: u32,
    /// Its commit, as for an ordinary transaction.
    pub commit: Commit,
}

/// End of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to resume from and to record as origin
    /// progress, so a restart never decodes this transaction again.
    pub end_lsn: Lsn,
    /// Commit time on the source.
    pub commit_time: PgTimestamp,
}

/// The replication origin a transaction was written under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The origin's name (`walbridge_from_east`, or another tool's origin).
    pub name: String,
    /// The commit LSN on the origin's own node, as recorded by the applying session.
    pub lsn: Lsn,
}

/// How a table identifies the rows of updates and deletes (`pg_class.relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// The primary key (`d`).
    Default,
    /// Nothing: updates and deletes cannot be replicated (`n`).
    Nothing,
    /// Every column (`f`).
    Full,
    /// A chosen unique index (`i`).
    Index,
}

impl ReplicaIdentity {
    /// Parses `pg_class.relreplident` / pgoutput's replica identity byte.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }

    /// The catalog letter.
    pub fn code(self) -> char {
        match self {
            Self::Default => 'd',
            Self::Nothing => 'n',
            Self::Full => 'f',
            Self::Index => 'i',
        }
    }
}

/// A table as the stream describes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Relation {
    /// `pg_class` OID on the source (0 when the plugin gives none, as wal2json).
    pub oid: u32,
    /// Schema name, raw (unquoted).
    pub schema: String,
    /// Table name, raw (unquoted).
    pub table: String,
    /// The table's replica identity.
    pub replica_identity: ReplicaIdentity,
    /// Published columns in attribute order (generated columns are not published).
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.table`, unquoted, as used in metric labels and logs.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Positions of the replica-identity (key) columns.
    pub fn key_positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
    }

    /// Position of the column called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Column {
    /// Column name, raw (unquoted).
    pub name: String,
    /// `pg_type` OID of the column's type.
    pub type_oid: u32,
    /// `atttypmod` (-1 when none).
    pub type_modifier: i32,
    /// Part of the replica identity: these columns find the row of an update or delete.
    pub is_key: bool,
}

/// The name of a non-built-in type, so consumers can print it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    /// The type's OID.
    pub oid: u32,
    /// Schema of the type.
    pub schema: String,
    /// Name of the type.
    pub name: String,
}

/// The kind of row change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeOp {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
}

impl ChangeOp {
    /// `insert`, `update` or `delete`, as in the `op` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Insert => "insert",
            ChangeOp::Update => "update",
            ChangeOp::Delete => "delete",
        }
    }
}

impl fmt::Display for ChangeOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an old tuple holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OldKind {
    /// Only the replica identity columns are set (pgoutput `K`); the rest are `Null`.
    Key,
    /// The whole old row (pgoutput `O`, replica identity FULL).
    Full,
}

/// The previous version of a row, sent with updates and deletes.
#[derive(Clone, Debug, PartialEq)]
pub struct OldTuple {
    /// Whether the tuple has every column or only the key.
    pub kind: OldKind,
    /// Full-width values.
    pub tuple: Tuple,
}

/// A row change.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Insert, update or delete.
    pub op: ChangeOp,
    /// The table, with its columns as of this change.
    pub relation: Arc<Relation>,
    /// New row for insert and update.
    pub new: Option<Tuple>,
    /// Old key or old row: always for delete; for update when the key changed or the
    /// identity is FULL; `None` otherwise (then the key is in `new`).
    pub old: Option<OldTuple>,
    /// The change row it came from in trigger mode (`walbridge.cambios.id` or a legacy
    /// table's id), journaled with a conflict on it; `None` for a decoded WAL change.
    pub source_change_id: Option<i64>,
}

impl Change {
    /// The tuple that identifies the row on the target: the old tuple if sent, else the new.
    pub fn identity_tuple(&self) -> Option<&Tuple> {
        self.old.as_ref().map(|o| &o.tuple).or(self.new.as_ref())
    }
}

/// Values of one row, positionally aligned with the relation's columns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tuple(pub Vec<Value>);

/// One column value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value the update did not change; the plugin did not send it, so an apply
    /// must leave the target's value as it is.
    UnchangedToast,
    /// The type's text output (what `psql` would print), in the database encoding (UTF-8).
    Text(Bytes),
    /// The type's binary send format (pgoutput with `binary 'true'`).
    Binary(Bytes),
}

impl Value {
    /// A text value from a string.
    pub fn text(s: impl Into<String>) -> Self {
        Value::Text(Bytes::from(s.into()))
    }

    /// The text, when this is a valid UTF-8 text value.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// Bytes carried (for memory accounting).
    pub fn len(&self) -> usize {
        match self {
            Value::Text(b) | Value::Binary(b) => b.len(),
            _ => 0,
        }
    }

    /// True for values that carry no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A TRUNCATE of one or more tables.
#[derive(Clone, Debug, PartialEq)]
pub struct Truncate {
    /// The tables, truncated in one statement.
    pub relations: Vec<Arc<Relation>>,
    /// `TRUNCATE ... CASCADE`.
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`.
    pub restart_identity: bool,
}

/// A `pg_logical_emit_message` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Part of a transaction (true) or emitted immediately (false).
    pub transactional: bool,
    /// LSN of the message record.
    pub lsn: Lsn,
    /// The prefix the writer chose.
    pub prefix: String,
    /// The payload.
    pub content: Bytes,
}

/// A schema change `walbridge.ddl()` recorded on its node (`sql/ddl.sql`): in stream mode the
/// content of a `<slot_prefix>_ddl` logical message, in trigger mode the `descripcion` of a
/// change row with `metodo = 'DDL'`. Both are the JSON object
/// `{"search_path": ..., "statement": ...}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct SchemaChange {
    /// The caller's `search_path` when the statement ran on its node.
    pub search_path: String,
    /// The statement, as given.
    pub statement: String,
}

impl SchemaChange {
    /// What a target runs for it: the statement under that `search_path`, then new matching
    /// tables join replication there (never `walbridge.ddl()`, which would record it again).
    pub const APPLY_SQL: &'static str = "SELECT walbridge.ddl_apply($1, $2)";

    /// Reads the recorded JSON.
    pub fn parse(content: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(content)
    }
}
