//! One row of a change table, checked against the target: which operation, which table, which
//! columns. Pure: the catalog arrives as [`TableInfo`]s, nothing here touches a connection.
//!
//! Every check that can fail for one row without saying anything about the others lives
//! here, so the worker can send such a row to the dead-letter table before it starts a
//! transaction: an unknown `metodo`, a `tabla` that is not a replicated table of the target
//! (`users; DROP TABLE users` is just a name that matches nothing), a `descripcion` that does
//! not parse, a column the target lacks, a key column missing from an update or delete.
//! Values are never turned into SQL here: they stay [`Literal`]s and travel as one JSON
//! parameter, cast to the column types by the server.

use std::sync::Arc;

use crate::catalog::TableInfo;
use crate::lsn::PgTimestamp;

use super::legacy::{self, Literal, ParseError};

/// The operation a change row asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// `TRUNCATE` (written by walbridge's statement trigger; the old script had none).
    Truncate,
}

impl Op {
    /// The `op` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// A change row as read from the source's change table.
#[derive(Clone, Debug, PartialEq)]
pub struct RawRow {
    /// `id`: the order of application.
    pub id: i64,
    /// `metodo`.
    pub metodo: Option<String>,
    /// `tabla`.
    pub tabla: Option<String>,
    /// `descripcion`, as text whatever its column type.
    pub descripcion: Option<String>,
    /// `origin_node`: the node the change was made on; `None` for rows written before
    /// walbridge (or by triggers that do not know the column), which are local.
    pub origin_node: Option<String>,
    /// `txid`: the writing transaction (`None` for rows older than walbridge's column).
    pub txid: Option<u64>,
    /// Commit time of `txid` on the source, when known.
    pub commit_time: Option<PgTimestamp>,
    /// `created_at`: when the row was logged (a stand-in when the commit time is unknown).
    pub created_at: Option<PgTimestamp>,
    /// `old_key`: the row's key before an update changed it.
    pub old_key: Option<String>,
}

impl RawRow {
    /// The best known time of the change: its commit time, else when it was logged.
    pub fn time(&self) -> Option<PgTimestamp> {
        self.commit_time.or(self.created_at)
    }
}

/// Why one change row cannot be applied. The message goes to the dead-letter table's
/// `error` column, so it names the row's own words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// `metodo` is not INSERT, UPDATE, DELETE (or TRUNCATE).
    #[error("metodo {0:?} is not INSERT, UPDATE or DELETE")]
    Metodo(String),
    /// A required column of the change row is NULL.
    #[error("{0} is NULL")]
    Null(&'static str),
    /// `tabla` names no replicated table of the target.
    #[error(
        "tabla {tabla:?} is not a replicated table on node {target} (checked against \
         replication.tables/exclude and the target's catalog)"
    )]
    UnknownTable {
        /// As written.
        tabla: String,
        /// The target node.
        target: String,
    },
    /// `descripcion` is neither JSON nor a Python dict literal.
    #[error("descripcion is neither a JSON object nor a Python dict literal: {0}")]
    Descripcion(ParseError),
    /// `old_key` (walbridge's own column) does not parse.
    #[error("old_key is not a JSON object: {0}")]
    OldKey(ParseError),
    /// A column the target table does not have.
    #[error("column {column:?} does not exist in table {table} on the target")]
    UnknownColumn {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
    },
    /// A column given twice.
    #[error("column {0:?} appears twice in descripcion")]
    DuplicateColumn(String),
    /// An update or delete without the value of a key column.
    #[error(
        "descripcion lacks the key column {column:?} of table {table}, so the row cannot be found"
    )]
    MissingKey {
        /// `schema.table`.
        table: String,
        /// The key column.
        column: String,
    },
    /// The target table cannot identify rows.
    #[error(
        "table {0} has no primary key or replica identity on the target, so updates and \
         deletes cannot find their row"
    )]
    NoIdentity(String),
    /// An insert or update with nothing to write.
    #[error("descripcion has no column to write")]
    Empty,
    /// A value its column's type cannot take in the event model (see [`super::events`]).
    #[error("column {column:?} of table {table}: {reason}")]
    Value {
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
        /// What is wrong with its value.
        reason: &'static str,
    },
}

impl RowError {
    /// The error as logs show it: the parser's words about `descripcion` or `old_key` quote
    /// the row, so they are withheld unless `[log] row_contents` (the dead-letter table keeps
    /// them in full, next to the row).
    pub fn shown(&self) -> String {
        match self {
            RowError::Descripcion(e) | RowError::OldKey(e) if !crate::telemetry::row_contents() => {
                let what = if matches!(self, RowError::Descripcion(_)) {
                    "descripcion is neither a JSON object nor a Python dict literal"
                } else {
                    "old_key is not a JSON object"
                };
                format!(
                    "{what} (at byte {}; {})",
                    e.offset,
                    crate::telemetry::ROW_WITHHELD
                )
            }
            other => other.to_string(),
        }
    }
}

/// A change ready to apply: the table, and the values as one JSON object per purpose.
#[derive(Clone, Debug)]
pub struct Change {
    /// The change row's id.
    pub id: i64,
    /// What to do.
    pub op: Op,
    /// The target table.
    pub table: Arc<TableInfo>,
    /// Columns written by an insert or update, in descripcion order (generated, skipped and,
    /// for an update that keeps its key, key columns left out).
    pub columns: Vec<String>,
    /// Every column the change carries (what an insert, or the re-creation of a row from an
    /// update, writes).
    pub row_columns: Vec<String>,
    /// Columns that find the row (update, delete; insert: the unique key for conflict checks).
    pub key_columns: Vec<String>,
    /// The key values as a JSON object.
    pub key_json: String,
    /// The key values as a JSON array (for logs and the conflicts table).
    pub key_array: String,
    /// Whether the key matches every column (REPLICA IDENTITY FULL without a key): then rows
    /// are compared with `IS NOT DISTINCT FROM` and one row at a time.
    pub full_identity: bool,
    /// For an update: every writable column of the target is present, so a missing row can
    /// be recreated from it.
    pub complete: bool,
    /// The incoming values as a JSON object: the one parameter of inserts and updates (and
    /// the remote row of the conflicts table).
    pub row_json: String,
    /// For an update that changed the key: the new key as a JSON object.
    pub new_key_json: Option<String>,
}

/// Parses `metodo`, any case, surrounding blanks ignored.
pub fn parse_metodo(metodo: &str) -> Result<Op, RowError> {
    match metodo.trim().to_ascii_uppercase().as_str() {
        "INSERT" => Ok(Op::Insert),
        "UPDATE" => Ok(Op::Update),
        "DELETE" => Ok(Op::Delete),
        "TRUNCATE" => Ok(Op::Truncate),
        _ => Err(RowError::Metodo(metodo.to_string())),
    }
}

/// Resolves `tabla` to a replicated table of the target.
///
/// Accepted forms, tried in this order: `schema.table` as raw catalog names (split at the
/// first `.`, as the configuration's patterns); a bare `table`, looked up in the target's
/// `search_path` schemas in order (`public` by default); an SQL-quoted name (`"Mixed
/// Case"."T"`, `public."T"`) with SQL's rules (unquoted parts fold to lower case). A name
/// that does not match exactly is retried in lower case, since the old script put `tabla`
/// into SQL unquoted, where PostgreSQL folds it. `known(schema, table)` says whether a table
/// is replicated and present on the target.
pub fn resolve_tabla(
    tabla: &str,
    known: impl Fn(&str, &str) -> bool,
    search_path: &[String],
) -> Option<(String, String)> {
    let text = tabla.trim();
    if text.is_empty() {
        return None;
    }
    let lookup = |schema: Option<&str>, name: &str| -> Option<(String, String)> {
        match schema {
            Some(s) => known(s, name).then(|| (s.to_string(), name.to_string())),
            None => search_path
                .iter()
                .find(|s| known(s, name))
                .map(|s| (s.clone(), name.to_string())),
        }
    };
    if text.contains('"') {
        let (schema, name) = parse_sql_name(text)?;
        return lookup(schema.as_deref(), &name);
    }
    let raw = match text.split_once('.') {
        Some((s, n)) => lookup(Some(s), n).or_else(|| lookup(None, text)),
        None => lookup(None, text),
    };
    raw.or_else(|| {
        let lower = text.to_ascii_lowercase();
        if lower == text {
            return None;
        }
        match lower.split_once('.') {
            Some((s, n)) => lookup(Some(s), n),
            None => lookup(None, &lower),
        }
    })
}

/// `name`, `schema.name` with SQL quoting: quoted parts exact (`""` is a quote), unquoted
/// parts trimmed and folded to lower case. `None` when malformed or more than two parts.
fn parse_sql_name(text: &str) -> Option<(Option<String>, String)> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c == '"' {
                    break;
                }
                part.push(c);
                chars.next();
            }
            part = part.trim().to_ascii_lowercase();
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return None,
        }
    }
    match parts.len() {
        1 => parts.pop().map(|n| (None, n)),
        2 => {
            let name = parts.pop()?;
            let schema = parts.pop()?;
            Some((Some(schema), name))
        }
        _ => None,
    }
}

/// Builds the change for one row of `table` (already resolved from `tabla`), leaving out the
/// `skip` columns and the columns the target generates itself.
pub fn build(
    row: &RawRow,
    op: Op,
    table: Arc<TableInfo>,
    skip: &[String],
) -> Result<Change, RowError> {
    let qualified = table.qualified_name();
    if op == Op::Truncate {
        return Ok(Change {
            id: row.id,
            op,
            table,
            columns: Vec::new(),
            row_columns: Vec::new(),
            key_columns: Vec::new(),
            key_json: "{}".into(),
            key_array: "[]".into(),
            full_identity: false,
            complete: false,
            row_json: "{}".into(),
            new_key_json: None,
        });
    }
    let text = row
        .descripcion
        .as_deref()
        .ok_or(RowError::Null("descripcion"))?;
    let fields = legacy::parse_row(text).map_err(RowError::Descripcion)?;

    // Every named column must exist on the target (skipped ones are dropped first).
    let mut seen = std::collections::BTreeSet::new();
    let mut values: Vec<(String, Literal)> = Vec::with_capacity(fields.len());
    for (name, value) in fields {
        if !seen.insert(name.clone()) {
            return Err(RowError::DuplicateColumn(name));
        }
        if skip.contains(&name) {
            continue;
        }
        let Some(col) = table.column(&name) else {
            return Err(RowError::UnknownColumn {
                table: qualified,
                column: name,
            });
        };
        if col.generated {
            continue;
        }
        values.push((name, value));
    }

    let identity = table.identity_columns();
    let full_identity = table.primary_key.is_empty()
        && table.identity_index.is_empty()
        && table.replica_identity == crate::event::ReplicaIdentity::Full;

    // Where the key values come from: old_key for an update that changed its key, else the
    // row itself.
    let old_key: Option<Vec<(String, Literal)>> = match (&row.old_key, op) {
        (Some(text), Op::Update) => Some(legacy::parse_row(text).map_err(RowError::OldKey)?),
        _ => None,
    };
    let key_source: &[(String, Literal)] = old_key.as_deref().unwrap_or(&values);

    let key_columns: Vec<String> = match op {
        Op::Insert => table
            .unique_key()
            .map(<[String]>::to_vec)
            .unwrap_or_default(),
        _ if full_identity => {
            // Every comparable column the change carries.
            let cols: Vec<String> = identity
                .iter()
                .filter(|c| key_source.iter().any(|(n, _)| n == *c))
                .cloned()
                .collect();
            if cols.is_empty() {
                return Err(RowError::NoIdentity(qualified));
            }
            cols
        }
        _ => {
            if identity.is_empty() {
                return Err(RowError::NoIdentity(qualified));
            }
            identity
        }
    };
    let mut key: Vec<(String, Literal)> = Vec::with_capacity(key_columns.len());
    for c in &key_columns {
        match key_source.iter().find(|(n, _)| n == c) {
            Some((_, v)) => key.push((c.clone(), v.clone())),
            None if op == Op::Insert => {
                // An insert without its unique key (a serial filled by default): no lookup.
                key.clear();
                break;
            }
            None => {
                return Err(RowError::MissingKey {
                    table: qualified,
                    column: c.clone(),
                })
            }
        }
    }
    let key_columns: Vec<String> = key.iter().map(|(c, _)| c.clone()).collect();

    // Columns written: inserts write everything given; updates leave out an unchanged key
    // (and GENERATED ALWAYS identity columns, which cannot be updated).
    let written: Vec<&(String, Literal)> = match op {
        Op::Insert => values.iter().collect(),
        Op::Update => values
            .iter()
            .filter(|(n, _)| {
                let unchanged_key = old_key.is_none() && key_columns.contains(n);
                let identity_always = table.column(n).is_some_and(|c| c.identity_always);
                !unchanged_key && !identity_always
            })
            .collect(),
        Op::Delete | Op::Truncate => Vec::new(),
    };
    if op == Op::Insert && written.is_empty() {
        return Err(RowError::Empty);
    }
    let complete = op == Op::Update
        && table
            .columns
            .iter()
            .filter(|c| !c.generated && !skip.contains(&c.name))
            .all(|c| values.iter().any(|(n, _)| *n == c.name));

    let object = |pairs: &mut dyn Iterator<Item = &(String, Literal)>| {
        Literal::Object(pairs.map(|(n, v)| (n.clone(), v.clone())).collect()).to_json()
    };
    let new_key_json = old_key
        .as_ref()
        .map(|_| object(&mut values.iter().filter(|(n, _)| key_columns.contains(n))));
    Ok(Change {
        id: row.id,
        op,
        columns: written.iter().map(|(n, _)| n.clone()).collect(),
        row_columns: values.iter().map(|(n, _)| n.clone()).collect(),
        key_json: object(&mut key.iter()),
        key_array: Literal::Array(key.iter().map(|(_, v)| v.clone()).collect()).to_json(),
        key_columns,
        full_identity,
        complete,
        row_json: object(&mut values.iter()),
        new_key_json,
        table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ColumnInfo, TableKind};
    use crate::event::ReplicaIdentity;

    fn col(name: &str) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            attnum: 1,
            type_oid: 25,
            type_sql: "text".into(),
            type_modifier: -1,
            not_null: false,
            generated: false,
            identity_always: false,
            identity_by_default: false,
            has_equality: true,
        }
    }

    fn users() -> Arc<TableInfo> {
        let mut g = col("upper_name");
        g.generated = true;
        Arc::new(TableInfo {
            oid: 1,
            schema: "public".into(),
            name: "users".into(),
            kind: TableKind::Ordinary,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id"), col("name"), col("secret"), g],
            primary_key: vec!["id".into()],
            identity_index: vec![],
        })
    }

    fn row(descripcion: &str) -> RawRow {
        RawRow {
            id: 7,
            metodo: Some("insert".into()),
            tabla: Some("users".into()),
            descripcion: Some(descripcion.into()),
            origin_node: None,
            txid: None,
            commit_time: None,
            created_at: None,
            old_key: None,
        }
    }

    #[test]
    fn metodo_in_any_case() {
        assert_eq!(parse_metodo(" insert ").unwrap(), Op::Insert);
        assert_eq!(parse_metodo("Update").unwrap(), Op::Update);
        assert_eq!(parse_metodo("DELETE").unwrap(), Op::Delete);
        assert!(matches!(parse_metodo("UPSERT"), Err(RowError::Metodo(_))));
        assert!(matches!(
            parse_metodo("DROP TABLE x"),
            Err(RowError::Metodo(_))
        ));
    }

    #[test]
    fn tabla_forms() {
        let known = |s: &str, t: &str| {
            matches!(
                (s, t),
                ("public", "users") | ("app", "users") | ("app", "Mixed Case") | ("public", "a.b")
            )
        };
        let sp = vec!["public".to_string()];
        let r = |t: &str| resolve_tabla(t, known, &sp);
        let pair = |s: &str, t: &str| Some((s.to_string(), t.to_string()));
        assert_eq!(r("users"), pair("public", "users"));
        assert_eq!(r("app.users"), pair("app", "users"));
        assert_eq!(r("USERS"), pair("public", "users"));
        assert_eq!(r("App.Users"), pair("app", "users"));
        assert_eq!(r("app.Mixed Case"), pair("app", "Mixed Case"));
        assert_eq!(r(r#""app"."Mixed Case""#), pair("app", "Mixed Case"));
        assert_eq!(r(r#"APP."Mixed Case""#), pair("app", "Mixed Case"));
        assert_eq!(
            r("a.b"),
            pair("public", "a.b"),
            "a dotted bare name via search_path"
        );
        assert_eq!(r("users; DROP TABLE users"), None);
        assert_eq!(r("public.users; DROP TABLE users"), None);
        assert_eq!(r("other.users"), None);
        assert_eq!(r(r#""unterminated"#), None);
        assert_eq!(r(r#"a.b.c"."d""#), None);
        assert_eq!(r(""), None);
        let sp2 = vec!["app".to_string(), "public".to_string()];
        assert_eq!(resolve_tabla("users", known, &sp2), pair("app", "users"));
    }

    #[test]
    fn insert_keeps_given_columns_and_drops_generated_and_skipped() {
        let c = build(
            &row("{'id': 1, 'name': 'x', 'secret': 's', 'upper_name': 'X'}"),
            Op::Insert,
            users(),
            &["secret".to_string()],
        )
        .unwrap();
        assert_eq!(c.columns, vec!["id", "name"]);
        assert_eq!(c.row_json, r#"{"id":1,"name":"x"}"#);
        assert_eq!(c.key_columns, vec!["id"]);
        assert_eq!(c.key_json, r#"{"id":1}"#);
        assert_eq!(c.key_array, "[1]");
    }

    #[test]
    fn update_finds_the_row_by_key_or_old_key() {
        let c = build(&row(r#"{"id": 1, "name": "y"}"#), Op::Update, users(), &[]).unwrap();
        assert_eq!(c.columns, vec!["name"]);
        assert_eq!(c.key_json, r#"{"id":1}"#);
        assert!(!c.complete, "secret is missing");
        let mut r = row(r#"{"id": 2, "name": "y", "secret": null}"#);
        r.old_key = Some(r#"{"id": 1}"#.into());
        let c = build(&r, Op::Update, users(), &[]).unwrap();
        assert_eq!(c.columns, vec!["id", "name", "secret"]);
        assert_eq!(c.key_json, r#"{"id":1}"#);
        assert_eq!(c.new_key_json.as_deref(), Some(r#"{"id":2}"#));
        assert!(c.complete);
    }

    #[test]
    fn bad_rows_say_why() {
        let e = build(&row(r#"{"id": 1, "nope": 2}"#), Op::Insert, users(), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"column "nope" does not exist in table public.users on the target"#
        );
        let e = build(&row(r#"{"name": "x"}"#), Op::Delete, users(), &[]).unwrap_err();
        assert!(matches!(e, RowError::MissingKey { .. }), "{e}");
        let e = build(&row("{'id': 1, 'id': 2}"), Op::Insert, users(), &[]).unwrap_err();
        assert!(matches!(e, RowError::DuplicateColumn(_)), "{e}");
        let e = build(&row("not a dict"), Op::Insert, users(), &[]).unwrap_err();
        assert!(matches!(e, RowError::Descripcion(_)), "{e}");
        let e = build(&row("{}"), Op::Insert, users(), &[]).unwrap_err();
        assert_eq!(e, RowError::Empty);
    }

    #[test]
    fn full_identity_tables_match_on_the_given_columns() {
        let mut t = (*users()).clone();
        t.primary_key.clear();
        t.replica_identity = ReplicaIdentity::Full;
        let c = build(&row("{'name': 'x', 'id': 3}"), Op::Delete, Arc::new(t), &[]).unwrap();
        assert!(c.full_identity);
        assert_eq!(c.key_columns, vec!["id", "name"]);
    }
}
