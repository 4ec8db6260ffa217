//! Table names and table patterns as the configuration writes them.
//!
//! Names are raw catalog names, never SQL-quoted: `public.Joe's "Quoted" Table` names the table
//! whose `pg_class.relname` is `Joe's "Quoted" Table` in schema `public`. A name is split at its
//! FIRST `.`, so a schema name cannot contain a dot but a table name can. Matching is
//! case-sensitive, exactly as the catalogs compare names.

use std::fmt;
use std::str::FromStr;

/// The schema that holds walbridge's own objects (`walbridge.skip_session()`, conflict log...).
pub const WALBRIDGE_SCHEMA: &str = "walbridge";

/// A table named by schema and table, as the catalogs spell them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QualifiedName {
    /// `pg_namespace.nspname`.
    pub schema: String,
    /// `pg_class.relname`.
    pub name: String,
}

/// A `schema.table` name or pattern that cannot be split into its two parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// No `.` at all.
    #[error("{0:?} has no '.'; write schema.table, e.g. \"public.{0}\"")]
    NoDot(String),
    /// Nothing before the first `.`.
    #[error("{0:?} has an empty schema part before the first '.'")]
    EmptySchema(String),
    /// Nothing after the first `.`.
    #[error("{0:?} has an empty table part after the first '.'")]
    EmptyTable(String),
}

/// Splits `s` at its first `.` into two non-empty parts.
fn split_qualified(s: &str) -> Result<(&str, &str), NameError> {
    let (schema, table) = s
        .split_once('.')
        .ok_or_else(|| NameError::NoDot(s.to_string()))?;
    if schema.is_empty() {
        return Err(NameError::EmptySchema(s.to_string()));
    }
    if table.is_empty() {
        return Err(NameError::EmptyTable(s.to_string()));
    }
    Ok((schema, table))
}

impl QualifiedName {
    /// A name from its two parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table`, split at the first `.`; both parts must be non-empty.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (schema, name) = split_qualified(s)?;
        Ok(QualifiedName::new(schema, name))
    }

    /// The name as an SQL identifier pair, `"schema"."table"`, safe to splice into a statement.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// True when `schema`.`table` is this name.
    pub fn is(&self, schema: &str, table: &str) -> bool {
        self.schema == schema && self.name == table
    }
}

impl fmt::Display for QualifiedName {
    /// `schema.table`, unquoted: the form of the config file and of the `table` metric label.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl FromStr for QualifiedName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QualifiedName::parse(s)
    }
}

/// Quotes an identifier for SQL: wraps it in `"` and doubles any `"` inside.
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A `*` glob over one name part: the literal pieces between the stars.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Glob {
    /// `"a*b*"` is `["a", "b", ""]`; a pattern without `*` has exactly one piece.
    pieces: Vec<String>,
}

impl Glob {
    fn new(s: &str) -> Self {
        Glob {
            pieces: s.split('*').map(str::to_string).collect(),
        }
    }

    /// The same glob as an SQL `LIKE` pattern (escape character `\`): `*` becomes `%`, and
    /// `%`, `_` and `\` stand for themselves.
    fn like(&self) -> String {
        let mut out = String::new();
        for (i, piece) in self.pieces.iter().enumerate() {
            if i > 0 {
                out.push('%');
            }
            for c in piece.chars() {
                if matches!(c, '%' | '_' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        out
    }

    fn matches(&self, text: &str) -> bool {
        match self.pieces.as_slice() {
            [] => false,
            [only] => text == only,
            [first, middle @ .., last] => {
                let Some(rest) = text.strip_prefix(first.as_str()) else {
                    return false;
                };
                let Some(mut rest) = rest.strip_suffix(last.as_str()) else {
                    return false;
                };
                // Leftmost-first search is exact for `*`-only globs: taking the earliest
                // occurrence of each piece leaves the most room for the pieces after it.
                for piece in middle {
                    match rest.find(piece.as_str()) {
                        Some(at) => rest = &rest[at + piece.len()..],
                        None => return false,
                    }
                }
                true
            }
        }
    }
}

/// One `tables` / `exclude` entry: a glob for the schema and one for the table.
///
/// `*` matches any run of characters (also none) within its part; every other character,
/// including spaces, quotes and upper case, stands for itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePattern {
    text: String,
    schema: Glob,
    table: Glob,
}

impl TablePattern {
    /// Parses `schema.table` with optional `*` globs, split at the first `.`.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (schema, table) = split_qualified(s)?;
        Ok(TablePattern {
            text: s.to_string(),
            schema: Glob::new(schema),
            table: Glob::new(table),
        })
    }

    /// True when the table `schema`.`table` is covered by this pattern.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema.matches(schema) && self.table.matches(table)
    }

    /// The schema and table globs as SQL `LIKE` patterns (escape `\`), for the database's
    /// own view of the selection (`walbridge.is_replicated`, `sql/ddl.sql`).
    pub fn like_patterns(&self) -> (String, String) {
        (self.schema.like(), self.table.like())
    }

    /// The pattern as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which tables are replicated: `tables` minus `exclude`, never walbridge's own objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSelection {
    include: Vec<TablePattern>,
    exclude: Vec<TablePattern>,
    /// The trigger-mode change table and its dead-letter table, whatever their schema.
    reserved: Vec<QualifiedName>,
}

impl TableSelection {
    /// A selection from `tables`, `exclude` and the tables walbridge keeps for itself (on top of
    /// the whole [`WALBRIDGE_SCHEMA`] schema).
    pub fn new(
        include: Vec<TablePattern>,
        exclude: Vec<TablePattern>,
        reserved: Vec<QualifiedName>,
    ) -> Self {
        TableSelection {
            include,
            exclude,
            reserved,
        }
    }

    /// True when `schema`.`table` is replicated: matched by some `tables` pattern, by no
    /// `exclude` pattern, and not one of walbridge's own objects.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        !self.is_reserved(schema, table)
            && self.include.iter().any(|p| p.matches(schema, table))
            && !self.exclude.iter().any(|p| p.matches(schema, table))
    }

    /// True for walbridge's own objects, which are never replicated whatever the patterns say.
    pub fn is_reserved(&self, schema: &str, table: &str) -> bool {
        schema == WALBRIDGE_SCHEMA || self.reserved.iter().any(|r| r.is(schema, table))
    }

    /// The tables walbridge keeps for itself outside its schema (the change and dead tables).
    pub fn reserved(&self) -> &[QualifiedName] {
        &self.reserved
    }

    /// The `tables` patterns.
    pub fn include(&self) -> &[TablePattern] {
        &self.include
    }

    /// The `exclude` patterns.
    pub fn exclude(&self) -> &[TablePattern] {
        &self.exclude
    }
}

#[cfg(test)]
mod like_tests {
    use super::TablePattern;

    #[test]
    fn globs_become_like_patterns_with_sql_wildcards_escaped() {
        let p = TablePattern::parse("pub*.a_b%c*").expect("valid pattern");
        assert_eq!(
            p.like_patterns(),
            ("pub%".to_string(), "a\\_b\\%c%".to_string())
        );
        let p = TablePattern::parse("s.x\\y").expect("valid pattern");
        assert_eq!(p.like_patterns(), ("s".to_string(), "x\\\\y".to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TablePattern {
        TablePattern::parse(s).unwrap()
    }

    #[test]
    fn exact_names_match_only_themselves() {
        assert!(p("public.accounts").matches("public", "accounts"));
        assert!(!p("public.accounts").matches("public", "accounts2"));
        assert!(!p("public.accounts").matches("Public", "accounts"));
    }

    #[test]
    fn stars_glob_within_a_part() {
        assert!(p("public.*").matches("public", "anything"));
        assert!(p("public.*").matches("public", "Mixed Case"));
        assert!(!p("public.*").matches("private", "x"));
        assert!(p("*.*").matches("a", "b"));
        assert!(p("app_*.order*").matches("app_eu", "orders_2024"));
        assert!(p("s.a*b*c").matches("s", "abc"));
        assert!(p("s.a*b*c").matches("s", "axxbyyc"));
        assert!(!p("s.a*b*c").matches("s", "acb"));
        assert!(
            !p("s.ab*ba").matches("s", "aba"),
            "prefix and suffix must not overlap"
        );
        assert!(p("s.*x*").matches("s", "x"));
    }

    #[test]
    fn raw_names_with_spaces_quotes_and_case() {
        assert!(p("Mixed Case.*").matches("Mixed Case", "T"));
        assert!(!p("Mixed Case.*").matches("mixed case", "T"));
        let q = p(r#"public.Joe's "Quoted" Table"#);
        assert!(q.matches("public", r#"Joe's "Quoted" Table"#));
        assert!(!q.matches("public", "Joe's Quoted Table"));
    }

    #[test]
    fn split_at_first_dot() {
        let q = QualifiedName::parse("s.a.b").unwrap();
        assert_eq!((q.schema.as_str(), q.name.as_str()), ("s", "a.b"));
        assert!(p("s.a.*").matches("s", "a.b"));
    }

    #[test]
    fn malformed_patterns_are_errors() {
        assert_eq!(
            TablePattern::parse("accounts"),
            Err(NameError::NoDot("accounts".into()))
        );
        assert!(matches!(
            TablePattern::parse(".x"),
            Err(NameError::EmptySchema(_))
        ));
        assert!(matches!(
            TablePattern::parse("x."),
            Err(NameError::EmptyTable(_))
        ));
    }

    #[test]
    fn quoting_doubles_quotes() {
        let q = QualifiedName::new("Mixed Case", r#"Joe's "Quoted" Table"#);
        assert_eq!(q.quoted(), r#""Mixed Case"."Joe's ""Quoted"" Table""#);
        assert_eq!(q.to_string(), r#"Mixed Case.Joe's "Quoted" Table"#);
    }

    #[test]
    fn selection_excludes_and_protects_own_objects() {
        let sel = TableSelection::new(
            vec![p("*.*")],
            vec![p("public.tmp_*")],
            vec![
                QualifiedName::new("public", "database_changes"),
                QualifiedName::new("public", "database_changes_dead"),
            ],
        );
        assert!(sel.matches("public", "accounts"));
        assert!(!sel.matches("public", "tmp_x"));
        assert!(!sel.matches("walbridge", "conflicts"));
        assert!(!sel.matches("public", "database_changes"));
        assert!(!sel.matches("public", "database_changes_dead"));
        assert!(sel.matches("other", "database_changes"));
    }
}
