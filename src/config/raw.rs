//! The file as serde reads it, before validation: enumerations, durations and sizes stay text
//! here so that `validate` can name the key and list what is allowed, instead of serde's
//! generic "unknown variant".

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub nodes: Vec<RawNode>,
    #[serde(default)]
    pub replication: RawReplication,
    #[serde(default)]
    pub trigger: RawTrigger,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub run: RawRun,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default)]
    pub row_contents: bool,
}

/// `[run]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRun {
    #[serde(default)]
    pub instance: Option<String>,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub name: String,
    pub dsn: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// A size written as text (`"8GB"`) or as a plain number of bytes.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

/// `[replication]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReplication {
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default = "default_plugin")]
    pub plugin: String,
    #[serde(default = "default_tables")]
    pub tables: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Values are checked in `validate`; a table value here is the unquoted dotted-key form
    /// `{ public.accounts = [...] }`, which TOML reads as nested tables.
    #[serde(default)]
    pub skip_columns: BTreeMap<String, toml::Value>,
    #[serde(default = "default_conflict")]
    pub conflict: String,
    #[serde(default)]
    pub priority: Vec<String>,
    #[serde(default)]
    pub conflict_per_table: BTreeMap<String, toml::Value>,
    #[serde(default = "default_max_retained_wal")]
    pub max_retained_wal: RawSize,
    #[serde(default = "default_slot_prefix")]
    pub slot_prefix: String,
    #[serde(default = "default_conflict_retention")]
    pub conflict_retention: String,
    #[serde(default = "default_tombstone_retention")]
    pub tombstone_retention: String,
    #[serde(default = "default_conflict_max_row_bytes")]
    pub conflict_max_row_bytes: RawSize,
    #[serde(default)]
    pub sequence_ranges: bool,
    #[serde(default)]
    pub allow_lossy_wal2json: bool,
    #[serde(default = "default_true")]
    pub stream_in_progress: bool,
    #[serde(default = "default_true")]
    pub failover_slots: bool,
    #[serde(default = "default_on_schema_mismatch")]
    pub on_schema_mismatch: String,
}

impl Default for RawReplication {
    fn default() -> Self {
        RawReplication {
            mode: default_mode(),
            plugin: default_plugin(),
            tables: default_tables(),
            exclude: Vec::new(),
            skip_columns: BTreeMap::new(),
            conflict: default_conflict(),
            priority: Vec::new(),
            conflict_per_table: BTreeMap::new(),
            max_retained_wal: default_max_retained_wal(),
            slot_prefix: default_slot_prefix(),
            conflict_retention: default_conflict_retention(),
            tombstone_retention: default_tombstone_retention(),
            conflict_max_row_bytes: default_conflict_max_row_bytes(),
            sequence_ranges: false,
            allow_lossy_wal2json: false,
            stream_in_progress: true,
            failover_slots: true,
            on_schema_mismatch: default_on_schema_mismatch(),
        }
    }
}

/// `[trigger]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrigger {
    #[serde(default = "default_trigger_table")]
    pub table: String,
    #[serde(default = "default_poll_interval")]
    pub poll_interval: String,
    #[serde(default = "default_batch_size")]
    pub batch_size: i64,
}

impl Default for RawTrigger {
    fn default() -> Self {
        RawTrigger {
            table: default_trigger_table(),
            poll_interval: default_poll_interval(),
            batch_size: default_batch_size(),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            listen: default_listen(),
        }
    }
}

fn default_mode() -> String {
    "stream".into()
}
fn default_plugin() -> String {
    "pgoutput".into()
}
fn default_tables() -> Vec<String> {
    vec!["public.*".into()]
}
fn default_conflict() -> String {
    "last_write_wins".into()
}
fn default_max_retained_wal() -> RawSize {
    RawSize::Text("8GB".into())
}
fn default_true() -> bool {
    true
}
fn default_on_schema_mismatch() -> String {
    "stop".into()
}

fn default_slot_prefix() -> String {
    "walbridge".into()
}
fn default_conflict_retention() -> String {
    "30d".into()
}
fn default_conflict_max_row_bytes() -> RawSize {
    RawSize::Text("64kB".into())
}
fn default_tombstone_retention() -> String {
    "7d".into()
}
fn default_trigger_table() -> String {
    "public.database_changes".into()
}
fn default_poll_interval() -> String {
    "5s".into()
}
fn default_batch_size() -> i64 {
    500
}
fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

/// Where a TOML error is: 1-based line and column, and the key path when it can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Location {
    pub line: usize,
    pub column: usize,
    /// `replication.conflcit`, `nodes[1].nmae`, `nodes[1]`...: the enclosing table header and
    /// the key written on the error's line.
    pub key: Option<String>,
}

/// Locates byte offset `at` of `text`: line, column and the key path around it.
///
/// toml's errors carry a byte span but no key path, so the path is rebuilt from the table
/// headers above the error (`[replication]`, the n-th `[[nodes]]`) and the key on its line.
pub(super) fn locate(text: &str, at: usize) -> Location {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;

    let mut table: Option<String> = None;
    let mut array_counts: BTreeMap<String, usize> = BTreeMap::new();
    for header in before.get(..line_start).unwrap_or("").lines() {
        let header = header.trim();
        if let Some(inner) = header.strip_prefix("[[") {
            if let Some(end) = inner.find("]]") {
                let name = inner[..end].trim().to_string();
                let n = array_counts.entry(name.clone()).or_insert(0);
                table = Some(format!("{name}[{n}]"));
                *n += 1;
            }
        } else if let Some(inner) = header.strip_prefix('[') {
            if let Some(end) = inner.find(']') {
                table = Some(inner[..end].trim().to_string());
            }
        }
    }
    let line_text = text
        .get(line_start..)
        .and_then(|s| s.lines().next())
        .unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('[') && !k.starts_with('#'))
        .map(str::to_string);
    let key = match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (Some(t), None) => Some(t),
        (None, k) => k,
    };
    Location { line, column, key }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_builds_key_paths() {
        let text =
            "[[nodes]]\nname = \"a\"\n[[nodes]]\nnmae = \"b\"\n[replication]\nconflcit = 1\n";
        let at = text.find("nmae").unwrap();
        assert_eq!(
            locate(text, at),
            Location {
                line: 4,
                column: 1,
                key: Some("nodes[1].nmae".into())
            }
        );
        let at = text.find("1\n").unwrap();
        let loc = locate(text, at);
        assert_eq!((loc.line, loc.column), (6, 12));
        assert_eq!(loc.key.as_deref(), Some("replication.conflcit"));
        assert_eq!(locate(text, 0).key, None);
    }
}
