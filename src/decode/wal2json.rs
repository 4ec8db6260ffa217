//! wal2json format-version 2 decoder.
//!
//! walbridge starts wal2json with `format-version 2` and `include-xids`, `include-timestamp`,
//! `include-lsn`, `include-origin`, `include-type-oids`, `include-pk`, `include-transaction`
//! ([`START_OPTIONS`]). Each XLogData payload is then one JSON document (this was checked
//! against PostgreSQL 15 with wal2json 2.5; see `fixtures/wal2json/`):
//!
//! ```text
//!  {"action":"B","xid":743,"timestamp":"2026-11-21 08:52:27.148844+00","origin":0,
//!   "lsn":"0/1566560","nextlsn":"0/1566590"}                  lsn = commit record, nextlsn = end
//!  {"action":"I",...,"lsn":"0/15662B0","schema":"public","table":"t",
//!   "columns":[{"name":"id","type":"integer","typeoid":23,"value":1},...],"pk":[...]}
//!  {"action":"U",...,"columns":[...],"identity":[...]}       unchanged TOAST columns are absent
//!  {"action":"D",...,"identity":[...]}
//!  {"action":"T",...,"schema":"public","table":"a"}           one document per truncated table
//!  {"action":"M",...,"transactional":true,"prefix":"p","content":"text"}
//!  {"action":"C",...,"lsn":"0/1566560","nextlsn":"0/1566590"} written at XLogData start = nextlsn
//! ```
//!
//! wal2json knows tables only by name and prints no replica identity or key flags, so the
//! caller describes each table with [`Wal2JsonDecoder::register_relation`] (from the source's
//! catalog) and each replication origin with [`Wal2JsonDecoder::register_origin`]. A change
//! for a table or origin the decoder does not know, or whose columns do not fit the
//! description, is an error for which [`Wal2JsonError::needs_catalog`] is true: reload the
//! catalog, register again, and call `decode` again with the same bytes. A failed `decode`
//! leaves the decoder as it was.
//!
//! Events come out as pgoutput would give them, so consumers need not know the plugin:
//! full-width tuples aligned with the relation's columns, [`Value::UnchangedToast`] for
//! columns an update left out, an old key only when a key column changed (always the old
//! row under REPLICA IDENTITY FULL), values in the type's text output (numbers keep their
//! exact digits, booleans are `t`/`f`, bytea gets its `\x` back), a [`Event::Relation`]
//! before a table's first change, and one [`Event::Truncate`] per TRUNCATE statement:
//! wal2json prints one `T` document per table, and the decoder holds them back until the
//! next document shows the statement is complete.
//!
//! What wal2json cannot say: the origin's commit LSN ([`Origin::lsn`] is `Lsn::ZERO`),
//! TRUNCATE's CASCADE / RESTART IDENTITY flags (always false; cascaded tables are listed),
//! and, before wal2json 2.6 (no `numeric-data-types-as-string`), NaN and ±Infinity of
//! float and numeric columns, which it prints as `null` like SQL NULL.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{Deserializer, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{
    Begin, Change, ChangeOp, Commit, Event, LogicalMessage, OldKind, OldTuple, Origin, Relation,
    ReplicaIdentity, Truncate, Tuple, Value,
};
use crate::lsn::{Lsn, PgTimestamp};

/// The plugin options walbridge starts wal2json with (`START_REPLICATION ... (options)`).
///
/// `numeric-data-types-as-string` is not among them: wal2json 2.5 (Debian 12's package)
/// rejects it as unknown. Add it (`"1"`) when the server's wal2json is 2.6 or newer, so
/// NaN and ±Infinity survive; the decoder reads both forms.
pub const START_OPTIONS: &[(&str, &str)] = &[
    ("format-version", "2"),
    ("include-xids", "1"),
    ("include-timestamp", "1"),
    ("include-lsn", "1"),
    ("include-origin", "1"),
    ("include-type-oids", "1"),
    ("include-pk", "1"),
    ("include-transaction", "1"),
];

/// The value of wal2json's `add-tables` / `filter-tables` option for these tables.
///
/// wal2json splits the list at commas and white space and each entry at its first `.`, and
/// takes a whole `*` name part as "all"; a backslash escapes the next character. Names are
/// escaped here so any raw catalog name (`Mixed Case`, `a.b`, `*`) selects exactly itself.
pub fn table_list_option<'a>(tables: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (schema, table) in tables {
        if !out.is_empty() {
            out.push(',');
        }
        escape_table_part(&mut out, schema);
        out.push('.');
        escape_table_part(&mut out, table);
    }
    out
}

fn escape_table_part(out: &mut String, name: &str) {
    for c in name.chars() {
        // wal2json tests with C isspace(): space, \t, \n, \v, \f, \r.
        if matches!(
            c,
            '\\' | ',' | '.' | '*' | ' ' | '\t' | '\n' | '\u{b}' | '\u{c}' | '\r'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The refusal of a wal2json older than 2.6 (no `numeric-data-types-as-string`, so NaN and
/// ±Infinity arrive as null) on a node whose replicated `columns` (`schema.table.column`) are
/// float or numeric: what would happen and the three ways out.
pub fn lossy_refusal(columns: &[String]) -> String {
    format!(
        "wal2json on this node is older than 2.6 and writes NaN and ±Infinity as null, so these \
         float/numeric columns would replicate such values as NULL: {}; upgrade wal2json to 2.6 \
         or later, use plugin = \"pgoutput\", or accept the loss with \
         replication.allow_lossy_wal2json = true",
        columns.join(", ")
    )
}

/// The value of wal2json's `filter-origins` option: changes written under these
/// replication origins (`pg_replication_origin.roident`) are not sent at all.
pub fn origin_list_option(ids: impl IntoIterator<Item = u16>) -> String {
    ids.into_iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A wal2json document could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum Wal2JsonError {
    /// The payload is not JSON, or not the JSON shape wal2json prints.
    #[error(
        "wal2json sent malformed JSON ({source}); is the slot's plugin wal2json with format-version 2?"
    )]
    InvalidJson {
        /// serde's description, with the position in the document.
        #[source]
        source: serde_json::Error,
    },
    /// The payload is not UTF-8 (only message contents may be arbitrary bytes).
    #[error(
        "wal2json sent a change that is not valid UTF-8 (at byte {offset}); walbridge needs a UTF8-encoded source database"
    )]
    InvalidUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The document has no `action` or an action walbridge does not know.
    #[error(
        "wal2json sent a document with action {action:?}; walbridge understands format-version 2 actions B, C, I, U, D, T and M"
    )]
    UnknownAction {
        /// The action as sent (empty when missing).
        action: String,
    },
    /// A field this action needs is missing or null.
    #[error("wal2json {action:?} document lacks {field:?}; {hint}")]
    MissingField {
        /// The document's action.
        action: String,
        /// The missing field.
        field: &'static str,
        /// What to change so wal2json prints it.
        hint: &'static str,
    },
    /// An LSN field is not of the form `XXX/XXX`.
    #[error("wal2json sent {field:?} = {value:?}, which is not an LSN")]
    BadLsn {
        /// The field.
        field: &'static str,
        /// The text sent.
        value: String,
    },
    /// The commit timestamp could not be parsed.
    #[error("wal2json sent the commit timestamp {value:?}, which walbridge cannot parse")]
    BadTimestamp {
        /// The text sent.
        value: String,
    },
    /// The origin is not a replication origin id.
    #[error("wal2json sent origin {value}, which is not a replication origin id (0..65535)")]
    BadOrigin {
        /// The number sent.
        value: u32,
    },
    /// A column value has a shape wal2json never prints.
    #[error("wal2json sent an unusable value for column {column:?} of {schema}.{table}: {reason}")]
    BadValue {
        /// Schema of the table.
        schema: String,
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A change for a table that was never registered.
    #[error(
        "wal2json sent a change for {schema}.{table}, which the decoder does not know; load its description from the catalog and register it"
    )]
    UnknownRelation {
        /// Schema of the table.
        schema: String,
        /// The table.
        table: String,
    },
    /// The change's columns do not fit the registered description (the table changed).
    #[error(
        "wal2json's change for {schema}.{table} does not fit its registered description ({reason}); reload the table from the catalog and register it again"
    )]
    RelationMismatch {
        /// Schema of the table.
        schema: String,
        /// The table.
        table: String,
        /// The difference found.
        reason: String,
    },
    /// A transaction under a replication origin whose name was never registered.
    #[error(
        "wal2json sent a transaction from replication origin {id}, which the decoder does not know; load pg_replication_origin and register it"
    )]
    UnknownOrigin {
        /// `pg_replication_origin.roident`.
        id: u16,
    },
}

impl Wal2JsonError {
    /// True when the caller should (re)load the catalog (tables or replication origins),
    /// register what it found, and decode the same bytes again.
    pub fn needs_catalog(&self) -> bool {
        matches!(
            self,
            Self::UnknownRelation { .. }
                | Self::RelationMismatch { .. }
                | Self::UnknownOrigin { .. }
        )
    }
}

/// A registered table, with what decoding needs precomputed.
#[derive(Debug)]
struct Registered {
    relation: Arc<Relation>,
    /// Generated columns, which wal2json prints and pgoutput does not.
    generated: Vec<String>,
    /// Column positions by name, for names out of attribute order.
    by_name: HashMap<String, usize>,
    /// Positions of the key (replica identity) columns.
    keys: Vec<usize>,
    /// An [`Event::Relation`] went out since the registration.
    announced: bool,
}

/// Truncated tables waiting for the rest of their statement.
#[derive(Debug)]
struct PendingTruncate {
    lsn: Option<Lsn>,
    relations: Vec<Arc<Relation>>,
}

/// Turns wal2json format-version 2 documents into [`Event`]s.
///
/// Pure and synchronous: the caller feeds it each XLogData payload in stream order.
#[derive(Debug, Default)]
pub struct Wal2JsonDecoder {
    /// schema -> table -> description.
    relations: HashMap<String, HashMap<String, Registered>>,
    /// `roident` -> `roname`.
    origins: HashMap<u16, String>,
    pending_truncate: Option<PendingTruncate>,
    /// schema -> tables whose changes yield no events (not replicated).
    ignored: HashMap<String, HashSet<String>>,
}

impl Wal2JsonDecoder {
    /// A decoder that knows no tables or origins yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells the decoder what a table looks like, from the source's catalog: its real OID,
    /// replica identity, and columns in attribute order without dropped or generated ones,
    /// with key flags on the replica identity columns. `generated` names the table's
    /// generated columns, which wal2json prints and the decoder drops (pgoutput does not
    /// publish them). Replaces any earlier description of the same `schema.table`.
    pub fn register_relation(&mut self, relation: Arc<Relation>, generated: Vec<String>) {
        if let Some(tables) = self.ignored.get_mut(&relation.schema) {
            tables.remove(&relation.table);
        }
        let by_name = relation
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        let keys = relation.key_positions().collect();
        let tables = self.relations.entry(relation.schema.clone()).or_default();
        let announced = tables
            .get(&relation.table)
            .is_some_and(|old| old.announced && old.relation == relation);
        tables.insert(
            relation.table.clone(),
            Registered {
                relation,
                generated,
                by_name,
                keys,
                announced,
            },
        );
    }

    /// Tells the decoder that `schema.table` is not replicated: its changes and truncates
    /// yield no events (and need no description) until it is registered.
    pub fn ignore_relation(&mut self, schema: &str, table: &str) {
        if let Some(tables) = self.relations.get_mut(schema) {
            tables.remove(table);
        }
        self.ignored
            .entry(schema.to_string())
            .or_default()
            .insert(table.to_string());
    }

    fn is_ignored(&self, doc: &Document<'_>) -> bool {
        match (&doc.schema, &doc.table) {
            (Some(schema), Some(table)) => self
                .ignored
                .get(schema.0.as_ref())
                .is_some_and(|t| t.contains(table.0.as_ref())),
            _ => false,
        }
    }

    /// The registered description of `schema.table`, if any.
    pub fn relation(&self, schema: &str, table: &str) -> Option<&Arc<Relation>> {
        self.registered(schema, table).map(|r| &r.relation)
    }

    /// Names a replication origin (`pg_replication_origin.roident` -> `roname`), since
    /// wal2json prints origins by id and [`Event::Origin`] carries the name.
    pub fn register_origin(&mut self, id: u16, name: impl Into<String>) {
        self.origins.insert(id, name.into());
    }

    /// Forgets the state of the stream (a TRUNCATE held back); call it when the stream
    /// restarts. Registered tables and origins stay.
    pub fn reset(&mut self) {
        self.pending_truncate = None;
    }

    /// Decodes one wal2json document (one XLogData payload) starting at WAL position
    /// `wal_start` (the XLogData header's start LSN).
    ///
    /// Returns the events in stream order, possibly none (a `T` document is held back
    /// until its statement is complete) or several (Begin then Origin; a held-back
    /// Truncate before the next event; a Relation before a table's first change).
    pub fn decode(&mut self, wal_start: Lsn, data: &[u8]) -> Result<Vec<Event>, Wal2JsonError> {
        let mut out = Vec::new();
        self.decode_into(wal_start, data, &mut out)?;
        Ok(out)
    }

    /// Like [`Self::decode`], appending to `out`, which is left as it was on error.
    pub fn decode_into(
        &mut self,
        wal_start: Lsn,
        data: &[u8],
        out: &mut Vec<Event>,
    ) -> Result<(), Wal2JsonError> {
        let text = document_text(data)?;
        let doc: Document<'_> =
            serde_json::from_str(&text).map_err(|source| Wal2JsonError::InvalidJson { source })?;
        let action = doc.action.as_ref().map(|a| a.0.as_ref()).unwrap_or("");
        match action {
            "B" => {
                let events = self.begin(&doc)?;
                self.flush_truncate(out);
                out.extend(events);
            }
            "C" => {
                let commit = commit(&doc, wal_start)?;
                self.flush_truncate(out);
                out.push(Event::Commit(commit));
            }
            "I" | "U" | "D" | "T" if self.is_ignored(&doc) => {}
            "I" | "U" | "D" => {
                let change = self.change(&doc, action)?;
                self.flush_truncate(out);
                self.announce(&change.relation, out);
                out.push(Event::Change(change));
            }
            "T" => {
                let relation = self.lookup(&doc, action)?.relation.clone();
                let lsn = optional_lsn(&doc.lsn, "lsn")?;
                // The statement's tables share the change's LSN; another LSN is another
                // statement.
                if self.pending_truncate.as_ref().is_some_and(|p| p.lsn != lsn) {
                    self.flush_truncate(out);
                }
                self.announce(&relation, out);
                self.pending_truncate
                    .get_or_insert_with(|| PendingTruncate {
                        lsn,
                        relations: Vec::new(),
                    })
                    .relations
                    .push(relation);
            }
            "M" => {
                let message = message(&doc, wal_start)?;
                self.flush_truncate(out);
                out.push(Event::Message(message));
            }
            other => {
                return Err(Wal2JsonError::UnknownAction {
                    action: other.to_string(),
                })
            }
        }
        Ok(())
    }

    fn registered(&self, schema: &str, table: &str) -> Option<&Registered> {
        self.relations.get(schema)?.get(table)
    }

    /// Emits a table's [`Event::Relation`] once per registration, before its first change.
    fn announce(&mut self, relation: &Relation, out: &mut Vec<Event>) {
        if let Some(reg) = self
            .relations
            .get_mut(&relation.schema)
            .and_then(|tables| tables.get_mut(&relation.table))
        {
            if !reg.announced {
                reg.announced = true;
                out.push(Event::Relation(reg.relation.clone()));
            }
        }
    }

    fn flush_truncate(&mut self, out: &mut Vec<Event>) {
        if let Some(pending) = self.pending_truncate.take() {
            out.push(Event::Truncate(Truncate {
                relations: pending.relations,
                cascade: false,
                restart_identity: false,
            }));
        }
    }

    fn begin(&self, doc: &Document<'_>) -> Result<Vec<Event>, Wal2JsonError> {
        let xid = doc.xid.ok_or_else(|| missing("B", "xid"))?;
        let commit_time = timestamp(doc, "B")?;
        let final_lsn = optional_lsn(&doc.lsn, "lsn")?.unwrap_or(Lsn::ZERO);
        let mut events = vec![Event::Begin(Begin {
            xid,
            final_lsn,
            commit_time,
            origin: None,
        })];
        if let Some(value) = doc.origin.filter(|&o| o != 0) {
            let id = u16::try_from(value).map_err(|_| Wal2JsonError::BadOrigin { value })?;
            let name = self
                .origins
                .get(&id)
                .ok_or(Wal2JsonError::UnknownOrigin { id })?;
            events.push(Event::Origin(Origin {
                name: name.clone(),
                lsn: Lsn::ZERO,
            }));
        }
        Ok(events)
    }

    /// The registered table a change or truncate names.
    fn lookup(&self, doc: &Document<'_>, action: &str) -> Result<&Registered, Wal2JsonError> {
        let schema = doc
            .schema
            .as_ref()
            .ok_or_else(|| missing(action, "schema"))?;
        let table = doc.table.as_ref().ok_or_else(|| missing(action, "table"))?;
        self.registered(&schema.0, &table.0)
            .ok_or_else(|| Wal2JsonError::UnknownRelation {
                schema: schema.0.to_string(),
                table: table.0.to_string(),
            })
    }

    fn change(&self, doc: &Document<'_>, action: &str) -> Result<Change, Wal2JsonError> {
        let reg = self.lookup(doc, action)?;
        let rel = &reg.relation;
        let full = rel.replica_identity == ReplicaIdentity::Full;
        let new = match action {
            "D" => None,
            _ => {
                let fields = doc
                    .columns
                    .as_deref()
                    .ok_or_else(|| missing(action, "columns"))?;
                let mut values = fill(reg, fields)?;
                for (value, column) in values.iter_mut().zip(&rel.columns) {
                    if *value != Value::UnchangedToast {
                        continue;
                    }
                    // Only an update can leave a column out (an unchanged TOASTed value),
                    // and only a variable-length one can be TOASTed.
                    if action == "I" || is_fixed_width(column.type_oid) {
                        return Err(mismatch(
                            rel,
                            format!("column {:?} is missing", column.name),
                        ));
                    }
                }
                Some(Tuple(values))
            }
        };
        let old = match (action, doc.identity.as_deref()) {
            ("I", _) => None,
            ("D", None) => return Err(missing(action, "identity")),
            (_, None) if full => return Err(missing(action, "identity")),
            (_, None) => None,
            (_, Some(fields)) if full => Some(OldTuple {
                kind: OldKind::Full,
                tuple: Tuple(fill(reg, fields)?),
            }),
            (_, Some(fields)) => {
                let mut values = fill(reg, fields)?;
                for (value, column) in values.iter_mut().zip(&rel.columns) {
                    match (column.is_key, &*value) {
                        (true, Value::UnchangedToast) => {
                            return Err(mismatch(
                                rel,
                                format!(
                                    "key column {:?} is missing from the identity",
                                    column.name
                                ),
                            ))
                        }
                        (true, _) => {}
                        (false, Value::UnchangedToast) => *value = Value::Null,
                        (false, _) => {
                            return Err(mismatch(
                                rel,
                                format!(
                                    "column {:?} is in the identity but not a key",
                                    column.name
                                ),
                            ))
                        }
                    }
                }
                // pgoutput sends an update's old key only when a key column changed.
                let changed = match &new {
                    Some(new) => reg.keys.iter().any(|&k| values.get(k) != new.0.get(k)),
                    None => true,
                };
                changed.then_some(OldTuple {
                    kind: OldKind::Key,
                    tuple: Tuple(values),
                })
            }
        };
        let op = match action {
            "I" => ChangeOp::Insert,
            "U" => ChangeOp::Update,
            _ => ChangeOp::Delete,
        };
        Ok(Change {
            op,
            relation: rel.clone(),
            new,
            old,
            source_change_id: None,
        })
    }
}

/// The document as text: UTF-8 is required, except that a message's content may hold any
/// bytes (wal2json copies `pg_logical_emit_message` content as is); those are replaced by
/// U+FFFD.
fn document_text(data: &[u8]) -> Result<Cow<'_, str>, Wal2JsonError> {
    match std::str::from_utf8(data) {
        Ok(text) => Ok(Cow::Borrowed(text)),
        Err(_) if data.starts_with(br#"{"action":"M""#) => Ok(String::from_utf8_lossy(data)),
        Err(e) => Err(Wal2JsonError::InvalidUtf8 {
            offset: e.valid_up_to(),
        }),
    }
}

fn missing(action: &str, field: &'static str) -> Wal2JsonError {
    let hint = match field {
        "xid" => "start wal2json with include-xids 1",
        "timestamp" => "start wal2json with include-timestamp 1",
        "schema" => "do not turn wal2json's include-schemas off",
        "identity" => "the table needs a primary key, a replica identity index or REPLICA IDENTITY FULL, and walbridge needs wal2json format-version 2",
        _ => "walbridge needs wal2json format-version 2",
    };
    Wal2JsonError::MissingField {
        action: action.to_string(),
        field,
        hint,
    }
}

fn mismatch(rel: &Relation, reason: String) -> Wal2JsonError {
    Wal2JsonError::RelationMismatch {
        schema: rel.schema.clone(),
        table: rel.table.clone(),
        reason,
    }
}

fn optional_lsn(
    value: &Option<Str<'_>>,
    field: &'static str,
) -> Result<Option<Lsn>, Wal2JsonError> {
    value
        .as_ref()
        .map(|v| {
            v.0.parse().map_err(|_| Wal2JsonError::BadLsn {
                field,
                value: v.0.to_string(),
            })
        })
        .transpose()
}

fn timestamp(doc: &Document<'_>, action: &str) -> Result<PgTimestamp, Wal2JsonError> {
    let text = doc
        .timestamp
        .as_ref()
        .ok_or_else(|| missing(action, "timestamp"))?;
    PgTimestamp::parse(&text.0).ok_or_else(|| Wal2JsonError::BadTimestamp {
        value: text.0.to_string(),
    })
}

fn commit(doc: &Document<'_>, wal_start: Lsn) -> Result<Commit, Wal2JsonError> {
    let commit_time = timestamp(doc, "C")?;
    let commit_lsn = optional_lsn(&doc.lsn, "lsn")?.unwrap_or(Lsn::ZERO);
    // Logical decoding writes the commit callback's output at the transaction's end LSN,
    // so the XLogData start is the end LSN when wal2json does not print it.
    let end_lsn = optional_lsn(&doc.nextlsn, "nextlsn")?.unwrap_or(wal_start);
    Ok(Commit {
        commit_lsn,
        end_lsn,
        commit_time,
    })
}

fn message(doc: &Document<'_>, wal_start: Lsn) -> Result<LogicalMessage, Wal2JsonError> {
    let transactional = doc
        .transactional
        .ok_or_else(|| missing("M", "transactional"))?;
    let prefix = doc.prefix.as_ref().ok_or_else(|| missing("M", "prefix"))?;
    let content = doc
        .content
        .as_ref()
        .ok_or_else(|| missing("M", "content"))?;
    let lsn = optional_lsn(&doc.lsn, "lsn")?.unwrap_or(wal_start);
    Ok(LogicalMessage {
        transactional,
        lsn,
        prefix: prefix.0.to_string(),
        content: Bytes::copy_from_slice(content.0.as_bytes()),
    })
}

/// A full-width tuple from wal2json's column list; columns not in the list are
/// [`Value::UnchangedToast`], generated columns are dropped.
fn fill(reg: &Registered, fields: &[Field<'_>]) -> Result<Vec<Value>, Wal2JsonError> {
    let rel = &reg.relation;
    let mut values = vec![Value::UnchangedToast; rel.columns.len()];
    // wal2json lists columns in attribute order, as the registration does: try the next
    // position before looking the name up.
    let mut next = 0;
    for field in fields {
        let name = field.name.0.as_ref();
        let pos = match rel.columns.get(next) {
            Some(c) if c.name == name => next,
            _ => match reg.by_name.get(name) {
                Some(&pos) => pos,
                None if reg.generated.iter().any(|g| g == name) => continue,
                None => return Err(mismatch(rel, format!("unknown column {name:?}"))),
            },
        };
        next = pos + 1;
        let Some(column) = rel.columns.get(pos) else {
            continue;
        };
        if let Some(oid) = field.typeoid {
            if oid != column.type_oid {
                return Err(mismatch(
                    rel,
                    format!(
                        "column {name:?} has type OID {oid}, registered as {}",
                        column.type_oid
                    ),
                ));
            }
        }
        let bad = |reason| Wal2JsonError::BadValue {
            schema: rel.schema.clone(),
            table: rel.table.clone(),
            column: name.to_string(),
            reason,
        };
        let raw = field.value.ok_or_else(|| bad("it has no \"value\""))?;
        let value =
            json_column_value(raw.get(), column.type_oid, JsonRendering::Wal2json).map_err(bad)?;
        match values.get_mut(pos) {
            Some(slot @ Value::UnchangedToast) => *slot = value,
            _ => return Err(bad("the column appears twice")),
        }
    }
    Ok(values)
}

/// `pg_type` OID of bytea, whose hex output wal2json prints without the leading `\x`.
const BYTEA_OID: u32 = 17;
/// `pg_type` OIDs of `json` and `jsonb`, whose values `to_json` embeds as JSON.
const JSON_OIDS: [u32; 2] = [114, 3802];
/// `pg_type` OIDs of `json[]` and `jsonb[]`, whose elements `to_json` embeds as JSON.
const JSON_ARRAY_OIDS: [u32; 2] = [199, 3807];
/// PostgreSQL's `MAXDIM`: an array literal nested deeper is no array of PostgreSQL's.
const MAX_ARRAY_DEPTH: usize = 6;

/// Which JSON rendering of a column value a document carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonRendering {
    /// wal2json's: scalars only, bytea as hex without its `\x`.
    Wal2json,
    /// PostgreSQL's `to_json` / `row_to_json` (trigger mode's change rows, and the old
    /// script's JSON): bytea keeps its `\x`, an array column is a JSON array, a `json` /
    /// `jsonb` column is its JSON itself, a composite is a JSON object.
    ToJson {
        /// The column is an array type: a JSON array becomes an array literal (`{1,2}`).
        array: bool,
    },
}

/// The text a column's output function printed, from a JSON rendering of it: one converter
/// for wal2json's documents and trigger mode's change rows.
///
/// With [`JsonRendering::ToJson`], a `json`/`jsonb` value is its JSON text (strings keep
/// their quotes; JSON `null` reads as SQL NULL, as `json_populate_record` reads it), a JSON
/// array of an array column is an array literal with every element quoted, and any other
/// JSON array or object (a composite, an array of a non-array column) is kept as JSON text,
/// which the column's input function accepts or refuses on the target.
pub fn json_column_value(
    raw: &str,
    type_oid: u32,
    rendering: JsonRendering,
) -> Result<Value, &'static str> {
    let first = raw.as_bytes().first();
    if let JsonRendering::ToJson { array } = rendering {
        if raw == "null" {
            return Ok(Value::Null);
        }
        if JSON_OIDS.contains(&type_oid) {
            return Ok(Value::Text(Bytes::copy_from_slice(raw.as_bytes())));
        }
        match first {
            Some(b'[') if array => {
                let mut out = String::with_capacity(raw.len());
                array_literal(raw, &mut out, 0, JSON_ARRAY_OIDS.contains(&type_oid))?;
                return Ok(Value::Text(Bytes::from(out)));
            }
            Some(b'[' | b'{') => return Ok(Value::Text(Bytes::copy_from_slice(raw.as_bytes()))),
            _ => {}
        }
    }
    let text: Cow<'_, str> = match first {
        Some(b'n') if raw == "null" => return Ok(Value::Null),
        Some(b't') if raw == "true" => Cow::Borrowed("t"),
        Some(b'f') if raw == "false" => Cow::Borrowed("f"),
        // Numbers keep the document's text, which is the output function's, digit for digit.
        Some(b'-' | b'0'..=b'9') => Cow::Borrowed(raw),
        Some(b'"') => json_string(raw)?,
        _ => return Err("it is a JSON object or array, which wal2json never prints"),
    };
    if type_oid == BYTEA_OID && rendering == JsonRendering::Wal2json {
        let mut bytes = Vec::with_capacity(text.len() + 2);
        bytes.extend_from_slice(b"\\x");
        bytes.extend_from_slice(text.as_bytes());
        return Ok(Value::Text(Bytes::from(bytes)));
    }
    Ok(Value::Text(match text {
        Cow::Borrowed(s) => Bytes::copy_from_slice(s.as_bytes()),
        Cow::Owned(s) => Bytes::from(s),
    }))
}

/// The content of a JSON string, unescaped only when it has escapes.
fn json_string(raw: &str) -> Result<Cow<'_, str>, &'static str> {
    match raw.get(1..raw.len().saturating_sub(1)) {
        Some(inner) if raw.len() >= 2 && raw.ends_with('"') && !inner.contains('\\') => {
            Ok(Cow::Borrowed(inner))
        }
        _ => Ok(serde_json::from_str::<Str<'_>>(raw)
            .map_err(|_| "the string does not parse")?
            .0),
    }
}

/// Appends the array literal of a JSON array: `[1, "a b", null, [2]]` → `{"1","a b",NULL,{"2"}}`.
/// Every element is quoted, so the element type's input function reads it whatever it is.
/// The elements of a `json[]`/`jsonb[]` (`json_elements`) are JSON themselves, arrays too,
/// so such a column is read as one dimension.
fn array_literal(
    raw: &str,
    out: &mut String,
    depth: usize,
    json_elements: bool,
) -> Result<(), &'static str> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err("the array has more dimensions than PostgreSQL allows (6)");
    }
    let items: Vec<&RawValue> =
        serde_json::from_str(raw).map_err(|_| "the array does not parse")?;
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let item = item.get();
        let text: Cow<'_, str> = match item.as_bytes().first() {
            Some(b'n') if item == "null" => {
                out.push_str("NULL");
                continue;
            }
            _ if json_elements => Cow::Borrowed(item),
            Some(b'[') => {
                array_literal(item, out, depth + 1, false)?;
                continue;
            }
            Some(b't') if item == "true" => Cow::Borrowed("t"),
            Some(b'f') if item == "false" => Cow::Borrowed("f"),
            Some(b'"') => json_string(item)?,
            // Numbers and objects (elements of json[] or of a composite array) as written.
            _ => Cow::Borrowed(item),
        };
        out.push('"');
        for c in text.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    Ok(())
}

/// Built-in fixed-length types: their values are never TOASTed, so an update that leaves
/// such a column out means the registered description is stale.
fn is_fixed_width(type_oid: u32) -> bool {
    matches!(
        type_oid,
        16 | 18
            | 20
            | 21
            | 23
            | 26
            | 27
            | 28
            | 29
            | 600
            | 601
            | 603
            | 628
            | 700
            | 701
            | 718
            | 774
            | 790
            | 829
            | 1082
            | 1083
            | 1114
            | 1184
            | 1186
            | 1266
            | 2950
            | 3220
    )
}

/// One wal2json v2 document; fields walbridge does not use (`pk`, `type`) are skipped.
#[derive(Deserialize)]
struct Document<'a> {
    #[serde(default, borrow)]
    action: Option<Str<'a>>,
    #[serde(default)]
    xid: Option<u32>,
    #[serde(default, borrow)]
    timestamp: Option<Str<'a>>,
    #[serde(default)]
    origin: Option<u32>,
    #[serde(default, borrow)]
    lsn: Option<Str<'a>>,
    #[serde(default, borrow)]
    nextlsn: Option<Str<'a>>,
    #[serde(default, borrow)]
    schema: Option<Str<'a>>,
    #[serde(default, borrow)]
    table: Option<Str<'a>>,
    #[serde(default, borrow)]
    columns: Option<Vec<Field<'a>>>,
    #[serde(default, borrow)]
    identity: Option<Vec<Field<'a>>>,
    #[serde(default)]
    transactional: Option<bool>,
    #[serde(default, borrow)]
    prefix: Option<Str<'a>>,
    #[serde(default, borrow)]
    content: Option<Str<'a>>,
}

/// One entry of `columns` or `identity`.
#[derive(Deserialize)]
struct Field<'a> {
    #[serde(borrow)]
    name: Str<'a>,
    #[serde(default)]
    typeoid: Option<u32>,
    /// The JSON value as sent; `Some("null")` for SQL NULL, `None` when absent.
    #[serde(default, borrow, deserialize_with = "present")]
    value: Option<&'a RawValue>,
}

/// Keeps a JSON `null` as a raw value instead of turning it into `None`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// A JSON string, borrowed from the document unless it had escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StrVisitor<'a>(PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for StrVisitor<'a> {
            type Value = Str<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }

        d.deserialize_str(StrVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_json_values_read_as_the_columns_text() {
        let v = |raw: &str, oid: u32, array: bool| {
            json_column_value(raw, oid, JsonRendering::ToJson { array })
        };
        let t = |s: &str| Ok(Value::text(s));
        // Scalars as wal2json's, except that bytea keeps its \x.
        assert_eq!(v("12.50", 1700, false), t("12.50"));
        assert_eq!(v("true", 16, false), t("t"));
        assert_eq!(v("null", 23, false), Ok(Value::Null));
        assert_eq!(v(r#""\\x0102""#, 17, false), t("\\x0102"));
        assert_eq!(
            json_column_value("\"0102\"", 17, JsonRendering::Wal2json),
            t("\\x0102")
        );
        // json and jsonb are their JSON, strings with their quotes.
        assert_eq!(v(r#""s""#, 3802, false), t(r#""s""#));
        assert_eq!(v(r#"{"a": [1]}"#, 114, false), t(r#"{"a": [1]}"#));
        // Arrays become literals, every element quoted; json[] elements stay JSON.
        assert_eq!(
            v("[[1, 2], [3, null]]", 1007, true),
            t(r#"{{"1","2"},{"3",NULL}}"#)
        );
        assert_eq!(
            v(r#"["a\"b", "c\\d", "", true]"#, 1009, true),
            t(r#"{"a\"b","c\\d","","t"}"#)
        );
        assert_eq!(v("[]", 1007, true), t("{}"));
        assert_eq!(
            v(r#"[[1], {"k": "v"}]"#, 3807, true),
            t(r#"{"[1]","{\"k\": \"v\"}"}"#)
        );
        // A composite is left to its input function on the target.
        assert_eq!(v(r#"{"x": 1}"#, 16_400, false), t(r#"{"x": 1}"#));
        assert!(v(&format!("{}{}", "[".repeat(7), "]".repeat(7)), 1007, true).is_err());
        assert!(v("[1,", 1007, true).is_err());
    }
    use crate::event::Column;
    use rand::{Rng, SeedableRng};

    macro_rules! fixture {
        ($name:literal) => {
            lines(include_bytes!(concat!("fixtures/wal2json/", $name, ".txt")))
        };
    }

    const CATALOG: &str = include_str!("fixtures/wal2json/catalog.tsv");

    /// `(wal_start, document)` pairs of a fixture file.
    fn lines(file: &'static [u8]) -> Vec<(Lsn, &'static [u8])> {
        file.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let tab = l.iter().position(|&b| b == b'\t').unwrap();
                let lsn = std::str::from_utf8(&l[..tab]).unwrap().parse().unwrap();
                (lsn, &l[tab + 1..])
            })
            .collect()
    }

    /// Every table of the captured catalog, as the source layer would describe it.
    fn catalog() -> Vec<(Arc<Relation>, Vec<String>)> {
        let mut tables: Vec<(Relation, Vec<String>)> = Vec::new();
        for line in CATALOG.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let oid: u32 = f[0].parse().unwrap();
            if tables.last().is_none_or(|(r, _)| r.oid != oid) {
                let identity = ReplicaIdentity::from_code(f[3].as_bytes()[0]).unwrap();
                tables.push((
                    Relation {
                        oid,
                        schema: f[1].into(),
                        table: f[2].into(),
                        replica_identity: identity,
                        columns: vec![],
                    },
                    vec![],
                ));
            }
            let (rel, generated) = tables.last_mut().unwrap();
            if !f[8].is_empty() {
                generated.push(f[5].into());
                continue;
            }
            rel.columns.push(Column {
                name: f[5].into(),
                type_oid: f[6].parse().unwrap(),
                type_modifier: f[7].parse().unwrap(),
                is_key: f[9] == "t",
            });
        }
        tables.into_iter().map(|(r, g)| (Arc::new(r), g)).collect()
    }

    fn relation(table: &str) -> Arc<Relation> {
        catalog()
            .into_iter()
            .find(|(r, _)| r.table == table)
            .unwrap()
            .0
    }

    /// A decoder that knows every table and origin of the fixtures.
    fn decoder() -> Wal2JsonDecoder {
        let mut dec = Wal2JsonDecoder::new();
        for (rel, generated) in catalog() {
            dec.register_relation(rel, generated);
        }
        dec.register_origin(1, "walbridge_from_east");
        dec.register_origin(2, "other_origin");
        dec
    }

    fn run(dec: &mut Wal2JsonDecoder, docs: &[(Lsn, &[u8])]) -> Vec<Event> {
        let mut out = Vec::new();
        for (lsn, doc) in docs {
            dec.decode_into(*lsn, doc, &mut out)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(doc)));
        }
        out
    }

    /// The row changes among `events`.
    fn changes(events: &[Event]) -> Vec<&Change> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Change(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    fn t(s: &str) -> Value {
        Value::text(s)
    }

    const N: Value = Value::Null;
    const U: Value = Value::UnchangedToast;

    fn tuple(values: &[Value]) -> Option<Tuple> {
        Some(Tuple(values.to_vec()))
    }

    fn old(kind: OldKind, values: &[Value]) -> Option<OldTuple> {
        Some(OldTuple {
            kind,
            tuple: Tuple(values.to_vec()),
        })
    }

    #[test]
    fn begin_and_commit_carry_lsns_and_commit_time() {
        let docs = fixture!("types");
        let mut dec = decoder();
        let time = PgTimestamp::parse("2026-11-21 08:52:27.148844+00").unwrap();
        assert_eq!(
            dec.decode(docs[0].0, docs[0].1).unwrap(),
            vec![Event::Begin(Begin {
                xid: 743,
                final_lsn: lsn("0/1566560"),
                commit_time: time,
                origin: None,
            })]
        );
        let commit = Event::Commit(Commit {
            commit_lsn: lsn("0/1566560"),
            end_lsn: lsn("0/1566590"),
            commit_time: time,
        });
        assert_eq!(
            dec.decode(docs[2].0, docs[2].1).unwrap(),
            vec![commit.clone()]
        );
        // The commit document is written at the end LSN: without include-lsn it stands in.
        let bare = br#"{"action":"C","xid":743,"timestamp":"2026-11-21 08:52:27.148844+00"}"#;
        let Event::Commit(c) = &dec.decode(docs[2].0, bare).unwrap()[0] else {
            panic!("not a commit")
        };
        assert_eq!((c.commit_lsn, c.end_lsn), (Lsn::ZERO, lsn("0/1566590")));
    }

    #[test]
    fn timestamps_with_any_offset_and_fraction() {
        let mut dec = decoder();
        for (text, expected) in [
            (
                "2026-11-21 14:23:10.988417+05:30",
                "2026-11-21 08:53:10.988417+00",
            ),
            (
                "2026-11-21 05:23:10.988417-03:30",
                "2026-11-21 08:53:10.988417+00",
            ),
            ("2026-11-21 09:53:10.98+01", "2026-11-21 08:53:10.98+00"),
        ] {
            let doc = format!(r#"{{"action":"B","xid":1,"timestamp":"{text}"}}"#);
            let Event::Begin(b) = &dec.decode(Lsn(1), doc.as_bytes()).unwrap()[0] else {
                panic!("not a begin")
            };
            assert_eq!(b.commit_time, PgTimestamp::parse(expected).unwrap());
            assert_eq!(b.final_lsn, Lsn::ZERO);
        }
    }

    #[test]
    fn type_matrix_keeps_the_output_functions_text() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("types"));
        let rel = relation("types");
        assert_eq!(events[1], Event::Relation(rel.clone()));
        let rows = changes(&events);
        assert_eq!(rows.len(), 6);
        assert!(rows
            .iter()
            .all(|c| c.op == ChangeOp::Insert && c.old.is_none()));
        let row = |id: &str, col: &str| {
            let pos = rel.position(col).unwrap();
            let c = rows
                .iter()
                .find(|c| c.new.as_ref().unwrap().0[0] == t(id))
                .unwrap();
            c.new.as_ref().unwrap().0[pos].clone()
        };
        let expected = [
            (
                "n",
                t("123456789012345678901234567890.123456789012345678901"),
            ),
            ("b", t("t")),
            (
                "txt",
                t("h\u{e9}llo \u{2603} \u{1F600} \"quoted\" back\\slash\nnew line\ttab"),
            ),
            ("by", t("\\x00ff10")),
            ("arr", t("{1,NULL,3}")),
            ("arr2", t("{{1,2},{3,NULL}}")),
            ("j", t(r#"{"k": "v", "n": [1, 2.50]}"#)),
            ("jb", t(r#"{"k": "v", "n": [1, 2.50]}"#)),
            ("ts", t("2024-02-29 12:34:56.789012")),
            ("tstz", t("infinity")),
            ("d", t("2024-01-01")),
            ("iv", t("1 day 02:03:04")),
            ("u", t("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
            ("m", t("happy")),
            ("dom", t("5")),
            ("comp", t("(1,\"x y\")")),
            ("ip", t("192.168.0.1/24")),
            ("cidr", t("10.0.0.0/8")),
            ("mac", t("08:00:2b:01:02:03")),
            ("bits", t("1010")),
            ("vb", t("101")),
            ("tsv", t("'a' 'cat' 'fat'")),
            ("i2", t("-32768")),
            ("i8", t("9223372036854775807")),
            ("o", t("4294967295")),
            ("mon", t("$12.34")),
            ("ch", t("ab ")),
            ("vc", t("varchar")),
        ];
        for (col, value) in expected {
            assert_eq!(row("1", col), value, "{col}");
        }
        // wal2json 2.5 prints NaN and ±Infinity as null: indistinguishable from NULL.
        assert_eq!(row("1", "f8"), N);
        assert_eq!(row("1", "f4"), N);
        assert_eq!(row("2", "n"), N);
        assert_eq!(row("2", "f4"), t("-0"));
        assert_eq!(
            row("3", "n"),
            t("-0.000000000000000000000000000000000000000001")
        );
        assert_eq!(row("3", "f8"), t("-0"));
        assert_eq!(row("4", "f8"), t("1e+308"));
        assert_eq!(row("4", "f4"), t("1.5e-05"));
        assert_eq!(row("5", "n"), t("-1.10"));
        assert_eq!(row("5", "f8"), t("0.1"));
        let nulls = rows[5].new.as_ref().unwrap();
        assert_eq!(nulls.0[0], t("6"));
        assert!(nulls.0[1..].iter().all(|v| *v == N));
    }

    #[test]
    fn numbers_as_strings_keep_nan_and_infinity() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("numeric_as_string_v26"));
        let new = changes(&events)[0].new.clone().unwrap();
        assert_eq!(&new.0[..5], &[t("2"), t("NaN"), t("-Infinity"), t("-0"), N]);
    }

    #[test]
    fn unchanged_toast_column_is_left_out_of_the_update() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("toast_update"));
        let c = changes(&events)[0];
        assert_eq!(c.op, ChangeOp::Update);
        assert_eq!(c.new, tuple(&[t("1"), U, t("2")]));
        assert_eq!(c.old, None, "the key did not change");
    }

    #[test]
    fn replica_identity_full_gives_the_old_row() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("full_update_delete"));
        let c = changes(&events);
        assert_eq!(c[0].new, tuple(&[t("1"), t("a2"), t("xxxxxxxxxx")]));
        assert_eq!(
            c[0].old,
            old(OldKind::Full, &[t("1"), t("a"), t("xxxxxxxxxx")])
        );
        assert_eq!(c[1].op, ChangeOp::Delete);
        assert_eq!(c[1].new, None);
        assert_eq!(c[1].old, old(OldKind::Full, &[t("2"), t("b"), N]));

        // The old row of FULL is complete even where the new row has an unchanged TOAST.
        let events = run(&mut dec, &fixture!("full_toast_update"));
        let c = changes(&events)[0];
        assert_eq!(c.new, tuple(&[t("4"), t("d2"), U]));
        let old = c.old.as_ref().unwrap();
        assert_eq!(old.kind, OldKind::Full);
        assert_eq!(&old.tuple.0[..2], &[t("4"), t("d")]);
        assert_eq!(old.tuple.0[2].len(), 3200);
    }

    #[test]
    fn old_key_only_when_a_key_column_changed() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("key_change"));
        let c = changes(&events);
        assert_eq!(c[0].new, tuple(&[t("1"), t("k"), t("v")]));
        assert_eq!(c[1].new, tuple(&[t("1"), t("k"), t("v2")]));
        assert_eq!(c[1].old, None);
        assert_eq!(c[2].new, tuple(&[t("1"), t("k2"), t("v2")]));
        assert_eq!(c[2].old, old(OldKind::Key, &[t("1"), t("k"), N]));
        assert_eq!(c[3].op, ChangeOp::Delete);
        assert_eq!(c[3].old, old(OldKind::Key, &[t("1"), t("k2"), N]));
        assert_eq!(
            c[3].identity_tuple(),
            Some(&Tuple(vec![t("1"), t("k2"), N]))
        );
    }

    #[test]
    fn replica_identity_index_uses_the_index_columns() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("index_identity"));
        let c = changes(&events);
        assert_eq!(c[1].old, None);
        assert_eq!(c[2].new, tuple(&[t("7"), t("c2"), t("v2")]));
        assert_eq!(c[2].old, old(OldKind::Key, &[N, t("c1"), N]));
        assert_eq!(c[3].old, old(OldKind::Key, &[N, t("c2"), N]));
    }

    #[test]
    fn generated_columns_are_dropped() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("generated"));
        let c = changes(&events);
        assert_eq!(c[0].new, tuple(&[t("1"), t("21"), t("1")]));
        assert_eq!(c[1].new, tuple(&[t("1"), t("22"), t("1")]));
        assert_eq!(c[2].old, old(OldKind::Key, &[t("1"), N, N]));
        // Unregistered, the generated column is an unknown column.
        let mut bare = Wal2JsonDecoder::new();
        bare.register_relation(relation("gen_t"), vec![]);
        let (at, doc) = fixture!("generated")[1];
        let err = bare.decode(at, doc).unwrap_err();
        assert!(
            matches!(&err, Wal2JsonError::RelationMismatch { reason, .. } if reason.contains("doubled"))
        );
    }

    #[test]
    fn quoted_names_and_partition_leaves_decode_by_raw_name() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("quoted_nokey"));
        let c = changes(&events);
        assert_eq!(c[0].relation.table, "Mixed Case");
        assert_eq!(c[0].new, tuple(&[t("1"), t("sel")]));
        // wal2json drops updates and deletes of a table without replica identity.
        assert_eq!(c.len(), 2);
        // A partitioned table's rows come under the leaf partition's name.
        let events = run(&mut dec, &fixture!("partition"));
        assert_eq!(changes(&events)[0].relation.table, "part_1");
    }

    #[test]
    fn one_truncate_event_per_statement() {
        let mut dec = decoder();
        let docs = fixture!("truncate");
        let names = |e: &Event| match e {
            Event::Truncate(t) => {
                assert!(!t.cascade && !t.restart_identity);
                Some(
                    t.relations
                        .iter()
                        .map(|r| r.table.clone())
                        .collect::<Vec<_>>(),
                )
            }
            _ => None,
        };
        let mut steps = Vec::new();
        for (at, doc) in &docs {
            let events = dec.decode(*at, doc).unwrap();
            steps.push(
                events
                    .iter()
                    .map(|e| match names(e) {
                        Some(tables) => format!("truncate {}", tables.join(",")),
                        None => match e {
                            Event::Relation(r) => format!("relation {}", r.table),
                            other => other.kind().to_string(),
                        },
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let expected: Vec<Vec<&str>> = vec![
            vec!["begin"],
            vec!["relation parent"],
            vec!["relation child"],
            vec!["truncate parent,child", "relation comp_key"],
            vec!["truncate comp_key", "commit"],
            vec!["begin"],
            vec![],
            vec![],
            vec!["truncate parent,child", "commit"],
        ];
        assert_eq!(steps, expected);
    }

    #[test]
    fn logical_messages() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("message"));
        let messages: Vec<&LogicalMessage> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m),
                _ => None,
            })
            .collect();
        assert_eq!(
            *messages[0],
            LogicalMessage {
                transactional: true,
                lsn: lsn("0/15BB950"),
                prefix: "walbridge".into(),
                content: Bytes::from("hello \"world\"\n\\ \u{e9}"),
            }
        );
        assert!(!messages[1].transactional);
        assert_eq!(messages[1].prefix, "other/prefix");
        assert_eq!(messages[1].content, Bytes::from("non-transactional"));
        // Contents that are not UTF-8 (bytea messages) arrive with U+FFFD in place.
        let events = run(&mut dec, &fixture!("message_binary"));
        let contents: Vec<Bytes> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.content.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(contents, [Bytes::from("A\u{FFFD}"), Bytes::from("A\u{e9}")]);
    }

    #[test]
    fn origin_follows_begin_by_name() {
        let docs = fixture!("origin");
        let mut dec = decoder();
        let events = run(&mut dec, &docs);
        let at = events
            .iter()
            .position(|e| matches!(e, Event::Origin(_)))
            .unwrap();
        let Event::Begin(begin) = &events[at - 1] else {
            panic!("origin must follow begin")
        };
        assert_eq!(begin.xid, 778);
        // pg_replication_origin_xact_setup's timestamp becomes the commit time.
        assert_eq!(
            begin.commit_time,
            PgTimestamp::parse("2020-01-01 00:00:00+00").unwrap()
        );
        assert_eq!(
            events[at],
            Event::Origin(Origin {
                name: "other_origin".into(),
                lsn: Lsn::ZERO
            })
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Origin(_)))
                .count(),
            1
        );
        let update = changes(&events)[1];
        assert_eq!(update.old, old(OldKind::Key, &[t("10")]));

        let mut fresh = Wal2JsonDecoder::new();
        let err = fresh.decode(docs[4].0, docs[4].1).unwrap_err();
        assert!(matches!(err, Wal2JsonError::UnknownOrigin { id: 2 }));
        assert!(err.needs_catalog());
        fresh.register_origin(2, "other_origin");
        assert_eq!(fresh.decode(docs[4].0, docs[4].1).unwrap().len(), 2);
    }

    #[test]
    fn unknown_relation_then_registered_decodes_the_same_bytes() {
        let (at, doc) = fixture!("key_change")[1];
        let mut dec = Wal2JsonDecoder::new();
        let err = dec.decode(at, doc).unwrap_err();
        assert!(
            matches!(&err, Wal2JsonError::UnknownRelation { schema, table } if schema == "public" && table == "comp_key")
        );
        assert!(err.needs_catalog());
        assert!(err.to_string().contains("public.comp_key"));
        dec.register_relation(relation("comp_key"), vec![]);
        let events = dec.decode(at, doc).unwrap();
        assert_eq!(events.len(), 2, "relation, then the insert");
        assert_eq!(dec.decode(at, doc).unwrap().len(), 1, "announced once");
    }

    #[test]
    fn descriptions_that_do_not_fit_are_reported() {
        let docs = fixture!("key_change");
        let base = relation("comp_key");
        let check = |rel: Relation, doc: usize, needle: &str| {
            let mut dec = Wal2JsonDecoder::new();
            dec.register_relation(Arc::new(rel), vec![]);
            let err = dec.decode(docs[doc].0, docs[doc].1).unwrap_err();
            assert!(err.needs_catalog(), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        };
        let mut other_type = (*base).clone();
        other_type.columns[2].type_oid = 1043;
        check(other_type, 1, "type OID 25, registered as 1043");
        let mut fewer = (*base).clone();
        fewer.columns.pop();
        check(fewer, 1, "unknown column \"v\"");
        let mut more = (*base).clone();
        more.columns.push(Column {
            name: "added".into(),
            type_oid: 25,
            type_modifier: -1,
            is_key: false,
        });
        check(more.clone(), 1, "column \"added\" is missing");
        // In an update, a missing text column is an unchanged TOAST value...
        let mut dec = Wal2JsonDecoder::new();
        dec.register_relation(Arc::new(more.clone()), vec![]);
        let events = dec.decode(docs[4].0, docs[4].1).unwrap();
        assert_eq!(
            changes(&events)[0].new,
            tuple(&[t("1"), t("k"), t("v2"), U])
        );
        // ...but a missing integer cannot be.
        more.columns[3].type_oid = 23;
        check(more, 4, "column \"added\" is missing");
        let mut other_key = (*base).clone();
        other_key.columns[1].is_key = false;
        check(other_key, 7, "\"b\" is in the identity but not a key");
        let mut wider_key = (*base).clone();
        wider_key.columns[2].is_key = true;
        check(wider_key, 7, "key column \"v\" is missing");
    }

    #[test]
    fn failed_decode_changes_nothing() {
        let docs = fixture!("truncate");
        let mut dec = decoder();
        let parent = relation("parent");
        run(&mut dec, &docs[..2]);
        // The child table is unknown: the held-back truncate of parent must survive.
        let mut partial = Wal2JsonDecoder::new();
        partial.register_relation(parent.clone(), vec![]);
        run(&mut partial, &docs[..2]);
        let mut out = vec![Event::Relation(parent)];
        let err = partial
            .decode_into(docs[2].0, docs[2].1, &mut out)
            .unwrap_err();
        assert!(matches!(err, Wal2JsonError::UnknownRelation { .. }));
        assert_eq!(out.len(), 1, "out untouched");
        partial.register_relation(relation("child"), vec![]);
        partial.register_relation(relation("comp_key"), vec![]);
        let rest = run(&mut partial, &docs[2..5]);
        let expected = run(&mut dec, &docs[2..5]);
        assert_eq!(rest, expected);
    }

    #[test]
    fn ignored_tables_yield_nothing_and_need_no_description() {
        let docs = fixture!("truncate");
        let mut dec = Wal2JsonDecoder::new();
        dec.register_relation(relation("parent"), vec![]);
        dec.ignore_relation("public", "child");
        dec.ignore_relation("public", "comp_key");
        let events = run(&mut dec, &docs[..5]);
        let truncated: Vec<Vec<String>> = events
            .iter()
            .filter_map(|e| match e {
                Event::Truncate(t) => Some(t.relations.iter().map(|r| r.table.clone()).collect()),
                _ => None,
            })
            .collect();
        assert_eq!(truncated, vec![vec!["parent".to_string()]]);
        // Registering a table again takes it out of the ignored ones.
        dec.register_relation(relation("child"), vec![]);
        let events = run(&mut dec, &docs[5..9]);
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Truncate(t) if t.relations.len() == 2)));
    }

    #[test]
    fn realistic_transaction_decodes() {
        let mut dec = decoder();
        let events = run(&mut dec, &fixture!("bench_template"));
        let c = changes(&events);
        assert_eq!(c.len(), 5);
        assert_eq!(
            c[1].new,
            tuple(&[
                t("2"),
                t("owner 2"),
                t("2.50"),
                t("t"),
                t("2026-01-01 00:02:00+00"),
                t("note \"2\"")
            ])
        );
        assert_eq!(c[3].op, ChangeOp::Update);
        assert_eq!(c[3].old, None);
    }

    #[test]
    fn malformed_documents_name_the_problem() {
        let mut dec = decoder();
        let cases: &[(&[u8], &str)] = &[
            (b"", "malformed JSON"),
            (b"{\"action\":\"B\",\"xid\":1", "column 21"),
            (b"[1]", "malformed JSON"),
            (b"{}", "action \"\""),
            (b"{\"action\":\"X\"}", "action \"X\""),
            (b"{\"action\":\"B\",\"timestamp\":\"2026-01-01 00:00:00+00\"}", "include-xids"),
            (b"{\"action\":\"B\",\"xid\":1}", "include-timestamp"),
            (b"{\"action\":\"B\",\"xid\":1,\"timestamp\":\"yesterday\"}", "\"yesterday\""),
            (
                b"{\"action\":\"C\",\"timestamp\":\"2026-01-01 00:00:00+00\",\"lsn\":\"0-1\"}",
                "not an LSN",
            ),
            (
                b"{\"action\":\"B\",\"xid\":1,\"timestamp\":\"2026-01-01 00:00:00+00\",\"origin\":70000}",
                "origin 70000",
            ),
            (b"{\"action\":\"I\",\"table\":\"t\"}", "lacks \"schema\""),
            (b"{\"action\":\"D\",\"schema\":\"public\",\"table\":\"parent\"}", "REPLICA IDENTITY"),
            (
                b"{\"action\":\"I\",\"schema\":\"public\",\"table\":\"parent\",\"columns\":[{\"name\":\"id\",\"value\":[1]}]}",
                "JSON object or array",
            ),
            (
                b"{\"action\":\"I\",\"schema\":\"public\",\"table\":\"parent\",\"columns\":[{\"name\":\"id\"}]}",
                "no \"value\"",
            ),
            (
                b"{\"action\":\"I\",\"schema\":\"public\",\"table\":\"parent\",\"columns\":[{\"name\":\"id\",\"value\":1},{\"name\":\"id\",\"value\":2}]}",
                "appears twice",
            ),
            (b"{\"action\":\"I\",\"schema\":\"\xff\"}", "UTF-8 (at byte 24)"),
            (b"{\"action\":\"M\",\"transactional\":true}", "lacks \"prefix\""),
            (b"{\"action\":\"B\",\"action\":\"B\"}", "duplicate field"),
        ];
        for (doc, needle) in cases {
            let err = dec.decode(Lsn(1), doc).unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "{:?}: {err}",
                String::from_utf8_lossy(doc)
            );
            assert!(!err.needs_catalog());
        }
    }

    fn all_fixtures() -> Vec<(Lsn, &'static [u8])> {
        [
            fixture!("types"),
            fixture!("toast_update"),
            fixture!("full_insert"),
            fixture!("full_update_delete"),
            fixture!("full_toast_update"),
            fixture!("key_change"),
            fixture!("generated"),
            fixture!("index_identity"),
            fixture!("quoted_nokey"),
            fixture!("truncate"),
            fixture!("message"),
            fixture!("message_binary"),
            fixture!("origin"),
            fixture!("partition"),
            fixture!("bench_template"),
            fixture!("numeric_as_string_v26"),
        ]
        .concat()
    }

    #[test]
    fn every_fixture_decodes() {
        let mut dec = decoder();
        let events = run(&mut dec, &all_fixtures());
        assert!(events.len() > 60);
    }

    #[test]
    fn every_prefix_is_an_error() {
        let mut dec = decoder();
        for (at, doc) in all_fixtures() {
            for end in 0..doc.len() {
                assert!(dec.decode(at, &doc[..end]).is_err(), "{end}");
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x2a1);
        let docs = all_fixtures();
        let mut dec = decoder();
        for _ in 0..20_000 {
            let (at, doc) = docs[rng.random_range(0..docs.len())];
            let mut bytes = doc.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[i] = rng.random(),
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, b"{}[],:\"\\0-e.ntf"[rng.random_range(0..15)]),
                }
            }
            let _ = dec.decode(at, &bytes);
        }
        for _ in 0..5_000 {
            let len = rng.random_range(0..64);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            assert!(dec.decode(Lsn(1), &bytes).is_err());
        }
    }

    #[test]
    fn option_values_escape_names() {
        assert_eq!(
            table_list_option([("public", "Mixed Case"), ("a.b", "*"), ("s", "x,y\\z")]),
            r"public.Mixed\ Case,a\.b.\*,s.x\,y\\z"
        );
        assert_eq!(table_list_option([]), "");
        assert_eq!(origin_list_option([1, 2]), "1,2");
    }
}
