//! The TOML configuration file: parsing, `${ENV}` interpolation and validation.
//!
//! Loading runs in four steps, each with its own error:
//!
//! ```text
//!   read file ──▶ TOML + serde ──▶ validate (all problems at once) ──▶ Config
//!   ConfigError::Read  ::Parse          ::Invalid
//!                      (line, column,    (key path + what is allowed,
//!                       key path)         e.g. `nodes[1].name: "East" must match ...`)
//! ```
//!
//! Inside validation each node's `dsn` is parsed with [`Dsn::parse_expanding`], which splits
//! it into keys and values first and then interpolates each value (`${NAME}` from the
//! environment, `$$` for a literal `$`), so a variable holding spaces, quotes, `&` or `@` stays
//! inside its own value; when it has no password,
//! [`Dsn::resolve_password`] takes it from `password_file` (first line), `PGPASSWORD` or the
//! passfile. A password both in the DSN and in a `password_file` is an error.
//! Passwords only ever live in [`crate::dsn::Secret`], so `Debug` of a [`Config`] never shows
//! them, and errors name variables and files, never their content.
//!
//! Everything downstream receives a `&Config`; nothing reads a global.

mod interpolate;
mod pattern;
mod raw;
mod units;

use std::collections::{BTreeMap, BTreeSet};
use std::env::VarError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::dsn::{Dsn, DsnError};

pub use interpolate::InterpolateError;
pub use pattern::{
    quote_ident, NameError, QualifiedName, TablePattern, TableSelection, WALBRIDGE_SCHEMA,
};
pub use units::{format_duration, format_size, parse_duration, parse_size};

use raw::{RawConfig, RawLog, RawMetrics, RawNode, RawReplication, RawRun, RawSize, RawTrigger};

/// The longest name PostgreSQL keeps (NAMEDATALEN - 1): longer slot or origin names would be
/// truncated or refused, so the configuration must keep every generated name within it.
pub const MAX_NAME_BYTES: usize = 63;

/// The largest accepted `trigger.batch_size`: one batch is one transaction on the peer.
pub const MAX_BATCH_SIZE: usize = 1_000_000;

/// Why a configuration could not be loaded. `Display` is one line, fit for `error: ...`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {}{}", path.display(), read_hint(source))]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("cannot parse {origin} at line {line}, column {column}: {}{message}", key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Parse {
        /// The file name, or "the configuration" for text not read from a file.
        origin: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The key path (`replication.conflcit`), when it can be told.
        key: Option<String>,
        /// What is wrong, as toml/serde says it (lists the allowed keys for an unknown one).
        message: String,
    },
    /// The file parsed but some values are not acceptable; every problem is listed.
    #[error("{origin} is not a valid configuration: {}", join_problems(errors))]
    Invalid {
        /// The file name, or "the configuration".
        origin: String,
        /// Every problem found, in file order.
        errors: Vec<ValidationError>,
    },
}

fn read_hint(source: &std::io::Error) -> &'static str {
    if source.kind() == std::io::ErrorKind::NotFound {
        " (pass --config FILE or set WALBRIDGE_CONFIG)"
    } else {
        ""
    }
}

fn join_problems(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ConfigError {
    /// The individual validation problems (empty for read and parse errors).
    pub fn problems(&self) -> &[ValidationError] {
        match self {
            ConfigError::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
}

/// One validation problem: the key path (`nodes[1].name`) and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Where in the file: `replication.conflict`, `nodes[0].dsn`,
    /// `replication.skip_columns."public.accounts"`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A value that is not one of a fixed set of words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {}", allowed.join(", "))]
pub struct UnknownValue {
    /// What was written.
    pub value: String,
    /// What is allowed.
    pub allowed: &'static [&'static str],
}

/// Declares a keyword enum with `as_str`, `Display`, `FromStr` and the list of its words.
macro_rules! keyword_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $word:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every accepted spelling, in documentation order.
            pub const ALL: &'static [&'static str] = &[$($word),+];

            /// The configuration-file spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownValue { value: s.to_string(), allowed: Self::ALL }),
                }
            }
        }
    };
}

keyword_enum! {
    /// How changes are captured on a node.
    Mode {
        /// Logical decoding from a replication slot.
        Stream = "stream",
        /// A trigger-fed change table, polled and woken by LISTEN/NOTIFY.
        Trigger = "trigger",
        /// Stream where the node allows logical decoding, else trigger.
        Auto = "auto",
    }
}

keyword_enum! {
    /// The logical decoding output plugin.
    Plugin {
        /// PostgreSQL's built-in plugin (needs the publication `setup` creates).
        PgOutput = "pgoutput",
        /// The wal2json extension, format version 2.
        Wal2Json = "wal2json",
    }
}

keyword_enum! {
    /// What to do when a replicated change meets a conflicting row on the target.
    ConflictPolicy {
        /// The change with the later commit time wins; exact ties go to the higher-ranked node.
        LastWriteWins = "last_write_wins",
        /// The higher-ranked node (see `priority`) wins.
        NodePriority = "node_priority",
        /// Stop the direction and report the conflict.
        Error = "error",
    }
}

keyword_enum! {
    /// What a direction does with a change whose table does not fit the target's schema.
    SchemaMismatch {
        /// Stop the direction with an error naming the table and column.
        Stop = "stop",
        /// Keep that table's changes in `walbridge.parked` until the target's schema fits.
        Park = "park",
    }
}

/// Which checks the node list must pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `run`, `setup`, `check-config` and the other multi-node commands: at least two nodes.
    Replication,
    /// `tail`, which reads a single node: one node is enough.
    SingleNode,
}

impl Purpose {
    fn min_nodes(self) -> usize {
        match self {
            Purpose::Replication => 2,
            Purpose::SingleNode => 1,
        }
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The nodes, in file order (which is also the order of [`Config::directions`]).
    pub nodes: Vec<NodeConfig>,
    /// `[replication]`.
    pub replication: ReplicationConfig,
    /// `[trigger]`.
    pub trigger: TriggerConfig,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[run]`.
    pub run: RunConfig,
    /// The file this was loaded from, if any (relative `password_file`s resolve against its
    /// directory).
    pub path: Option<PathBuf>,
    /// Legal but suspicious settings, for `check-config` to show.
    warnings: Vec<String>,
}

/// One `[[nodes]]` entry.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `[a-z][a-z0-9_]{0,30}`; names slots and origins.
    pub name: String,
    /// The connection string, environment interpolated and password resolved.
    pub dsn: Dsn,
    /// Where the password came from, when it was a `password_file` (resolved path).
    pub password_file: Option<PathBuf>,
}

/// `[replication]`.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// `mode` (default `stream`).
    pub mode: Mode,
    /// `plugin` (default `pgoutput`).
    pub plugin: Plugin,
    /// `tables` (default `["public.*"]`) minus `exclude` (default `[]`).
    pub tables: TableSelection,
    /// `skip_columns`: columns never sent to peers, per table.
    pub skip_columns: BTreeMap<QualifiedName, Vec<String>>,
    /// `conflict` (default `last_write_wins`).
    pub conflict: ConflictPolicy,
    /// `priority`: node names, first wins under `node_priority` and exact timestamp ties.
    pub priority: Vec<String>,
    /// `conflict_per_table`: overrides of `conflict` per table.
    pub conflict_per_table: BTreeMap<QualifiedName, ConflictPolicy>,
    /// `max_retained_wal` in bytes (default `"8GB"`): above it per slot walbridge warns,
    /// `/readyz` reports it and the budget-ratio metric passes 1.
    pub max_retained_wal: u64,
    /// `slot_prefix` (default `walbridge`): prefixes slots, origins and the publication.
    pub slot_prefix: String,
    /// `conflict_retention` (default `"30d"`): how long rows of `walbridge.conflicts` are kept
    /// before walbridge deletes them.
    pub conflict_retention: Duration,
    /// `tombstone_retention` (default `"7d"`): how long the record of a deleted row is kept so
    /// that a late update of it can be recognised as older (`delete_older` / `update_missing`).
    pub tombstone_retention: Duration,
    /// `conflict_max_row_bytes` (default `"64kB"`): the largest row version (its JSON text)
    /// `walbridge.conflicts` keeps in full; a larger one is kept cut, flagged
    /// `local_row_truncated` / `remote_row_truncated`, and `conflicts replay` counts it not
    /// replayable.
    pub conflict_max_row_bytes: u64,
    /// `sequence_ranges` (default `false`): opt in to giving each node its own range of values
    /// for serial and identity columns, so inserts on different nodes never collide on keys.
    pub sequence_ranges: bool,
    /// `allow_lossy_wal2json` (default `false`): accept wal2json older than 2.6 although it
    /// writes NaN and ±Infinity of float and numeric columns as null (they would replicate as
    /// NULL). Off, such a node with such columns is refused by `check-config --connect`,
    /// `setup` and `run`.
    pub allow_lossy_wal2json: bool,
    /// `stream_in_progress` (default `true`): with pgoutput, large transactions are streamed
    /// while still in progress on the source (protocol version 2, `streaming 'on'`) and
    /// applied into an open target transaction as they arrive, committed when the source
    /// commits and rolled back when it aborts. Off: a transaction is sent once it commits.
    pub stream_in_progress: bool,
    /// `failover_slots` (default `true`): on PostgreSQL 17+, `setup` creates the slots with
    /// `failover` enabled, so a physical standby that synchronizes slots
    /// (`sync_replication_slots = on`) keeps them through a promotion. Ignored on 15 and 16.
    pub failover_slots: bool,
    /// `on_schema_mismatch` (default `stop`): what a direction does with a change whose
    /// table is missing on the target or lacks one of its columns.
    pub on_schema_mismatch: SchemaMismatch,
}

/// `[trigger]`: trigger mode, the fallback and drop-in for the old polling script.
#[derive(Clone, Debug)]
pub struct TriggerConfig {
    /// `table` (default `public.database_changes`): the change table; `table` without a schema
    /// means `public.table`.
    pub table: QualifiedName,
    /// `poll_interval` (default `"5s"`): a safety net; LISTEN/NOTIFY wakes the worker at once.
    pub poll_interval: Duration,
    /// `batch_size` (default 500): change rows applied per peer transaction.
    pub batch_size: usize,
}

impl TriggerConfig {
    /// Where rows that cannot be applied go: `<schema>.<table>_dead`.
    pub fn dead_table(&self) -> QualifiedName {
        dead_table_of(&self.table)
    }
}

fn dead_table_of(table: &QualifiedName) -> QualifiedName {
    QualifiedName::new(table.schema.clone(), format!("{}_dead", table.name))
}

/// `[log]`: what logs and errors may contain.
#[derive(Clone, Debug, Default)]
pub struct LogConfig {
    /// `row_contents` (default `false`): let row values (a server's DETAIL such as "Key
    /// (id)=(42) already exists", conflict keys and rows) appear in errors, logs and
    /// `/status`, for debugging. Off, they are withheld (see [`crate::telemetry`]).
    pub row_contents: bool,
}

/// `[metrics]`.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// `listen` (default `127.0.0.1:9187`): address of `/metrics`, `/healthz` and `/readyz`;
    /// `None` when the file says `listen = ""` (no metrics server).
    pub listen: Option<SocketAddr>,
}

/// `[run]`: this process among several that serve the same configuration.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// `instance` (default: host name and process id, `host:pid`; `${ENV}` interpolated): the
    /// name this process goes by in `status`, the logs and the other instances' view.
    pub instance: String,
}

/// The longest instance name (a Kubernetes pod name of a short Deployment fits): it travels
/// in the apply session's `application_name`, which PostgreSQL cuts at 63 bytes.
pub const INSTANCE_MAX_LEN: usize = 40;

/// `host:pid`, the default instance name.
pub fn default_instance() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that many
    // bytes and the result is read only up to the first NUL inside the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".to_string()
    };
    let host: String = host.chars().take(INSTANCE_MAX_LEN - 8).collect();
    format!("{host}:{}", std::process::id())
}

/// One replication direction: changes made on `source` are applied to `target`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Direction {
    /// The node changes are read from (where the slot lives).
    pub source: String,
    /// The node changes are applied to (where the origin lives).
    pub target: String,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.source, self.target)
    }
}

impl Config {
    /// Reads, interpolates, parses and validates `path` for replication (two nodes or more).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_for(path, Purpose::Replication)
    }

    /// Like [`Config::load`], with the node-count rule of `purpose`.
    pub fn load_for(path: &Path, purpose: Purpose) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, Some(path), purpose, &|name| std::env::var(name))
    }

    /// Parses and validates configuration text for replication (two nodes or more); relative
    /// `password_file`s resolve against the current directory.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str_for(text, Purpose::Replication)
    }

    /// Like [`Config::from_toml_str`], with the node-count rule of `purpose`.
    pub fn from_toml_str_for(text: &str, purpose: Purpose) -> Result<Config, ConfigError> {
        Config::parse(text, None, purpose, &|name| std::env::var(name))
    }

    /// The whole pipeline with an explicit environment (tests pass their own).
    fn parse(
        text: &str,
        path: Option<&Path>,
        purpose: Purpose,
        env: &dyn Fn(&str) -> Result<String, VarError>,
    ) -> Result<Config, ConfigError> {
        let origin = path.map_or_else(
            || "the configuration".to_string(),
            |p| p.display().to_string(),
        );
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let loc = raw::locate(text, e.span().map_or(0, |s| s.start));
            ConfigError::Parse {
                origin: origin.clone(),
                line: loc.line,
                column: loc.column,
                key: loc.key,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        let ctx = Context {
            base_dir: path.and_then(Path::parent),
            env,
            purpose,
        };
        let mut problems = Problems::default();
        let config = validate(raw, &ctx, &mut problems);
        match config {
            Some(mut config) if problems.0.is_empty() => {
                config.path = path.map(Path::to_path_buf);
                Ok(config)
            }
            _ => Err(ConfigError::Invalid {
                origin,
                errors: problems.0,
            }),
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every direction of the full mesh, N×(N-1) of them: for each source in file order, each
    /// other node in file order.
    pub fn directions(&self) -> Vec<Direction> {
        let names = || self.nodes.iter().map(|n| n.name.as_str());
        names()
            .flat_map(|s| {
                names().filter(move |t| *t != s).map(move |t| Direction {
                    source: s.to_string(),
                    target: t.to_string(),
                })
            })
            .collect()
    }

    /// The slot on `source` that feeds `target`: `<prefix>_<source>_to_<target>`.
    pub fn slot_name(&self, source: &str, target: &str) -> String {
        slot_name(&self.replication.slot_prefix, source, target)
    }

    /// The replication origin, on every target, of changes from `source`:
    /// `<prefix>_from_<source>`.
    pub fn origin_name(&self, source: &str) -> String {
        origin_name(&self.replication.slot_prefix, source)
    }

    /// The publication `setup` creates on every node (pgoutput): `<prefix>_pub`.
    pub fn publication_name(&self) -> String {
        format!("{}_pub", self.replication.slot_prefix)
    }

    /// The local-only origin `walbridge.skip_session()` sets: `<prefix>_skip`.
    pub fn skip_origin_name(&self) -> String {
        format!("{}_skip", self.replication.slot_prefix)
    }

    /// Whether any table is under `node_priority` (`conflict` or a `conflict_per_table` entry).
    pub fn uses_node_priority(&self) -> bool {
        self.replication.conflict == ConflictPolicy::NodePriority
            || self
                .replication
                .conflict_per_table
                .values()
                .any(|p| *p == ConflictPolicy::NodePriority)
    }

    /// The conflict policy of `schema`.`table`: its `conflict_per_table` entry, else `conflict`.
    pub fn conflict_policy_for(&self, schema: &str, table: &str) -> ConflictPolicy {
        self.replication
            .conflict_per_table
            .iter()
            .find(|(name, _)| name.is(schema, table))
            .map_or(self.replication.conflict, |(_, policy)| *policy)
    }

    /// The columns of `schema`.`table` that are never sent to peers.
    pub fn skip_columns_for(&self, schema: &str, table: &str) -> &[String] {
        self.replication
            .skip_columns
            .iter()
            .find(|(name, _)| name.is(schema, table))
            .map_or(&[], |(_, cols)| cols.as_slice())
    }

    /// A node's rank, lower wins: its position in `priority`, then the nodes not listed there,
    /// ordered by name, after them. A total order over the nodes, used to break ties. An
    /// unknown name ranks after every node.
    pub fn node_rank(&self, name: &str) -> usize {
        let priority = &self.replication.priority;
        if let Some(i) = priority.iter().position(|p| p == name) {
            return i;
        }
        let mut unlisted: Vec<&str> = self
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .filter(|n| !priority.iter().any(|p| p == n))
            .collect();
        unlisted.sort_unstable();
        unlisted
            .iter()
            .position(|n| *n == name)
            .map_or(usize::MAX, |i| priority.len() + i)
    }

    /// Every node, highest priority first: `replication.priority` as configured, then the
    /// unlisted nodes by name (the order of [`Config::node_rank`]). The journal records it as
    /// the policy version.
    pub fn priority_order(&self) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        names.sort_by_key(|n| self.node_rank(n));
        names
    }

    /// Legal but suspicious settings (a `skip_columns` table that is not replicated, ...).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

fn slot_name(prefix: &str, source: &str, target: &str) -> String {
    format!("{prefix}_{source}_to_{target}")
}

fn origin_name(prefix: &str, source: &str) -> String {
    format!("{prefix}_from_{source}")
}

/// What validation needs besides the raw file.
struct Context<'a> {
    base_dir: Option<&'a Path>,
    env: &'a dyn Fn(&str) -> Result<String, VarError>,
    purpose: Purpose,
}

/// The problems found so far.
#[derive(Default)]
struct Problems(Vec<ValidationError>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError {
            key: key.into(),
            message: message.into(),
        });
    }

    /// `Some(value)` on success, else records the error under `key`.
    fn check<T, E: fmt::Display>(&mut self, key: &str, r: Result<T, E>) -> Option<T> {
        r.map_err(|e| self.add(key, e.to_string())).ok()
    }
}

/// `[a-z][a-z0-9_]{0,30}`
fn is_node_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 31
        && matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `[a-z][a-z0-9_]*`
fn is_slot_prefix(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Turns the raw file into a [`Config`], recording every problem. Returns `None` only when a
/// problem left nothing to build; callers must still check `problems`.
fn validate(raw: RawConfig, ctx: &Context<'_>, problems: &mut Problems) -> Option<Config> {
    let RawConfig {
        nodes: raw_nodes,
        replication,
        trigger,
        metrics,
        log,
        run,
    } = raw;

    let names: Vec<String> = raw_nodes.iter().map(|n| n.name.clone()).collect();
    check_node_count(&names, ctx.purpose, problems);
    let mut nodes = Vec::with_capacity(raw_nodes.len());
    for (i, node) in raw_nodes.into_iter().enumerate() {
        if let Some(node) = validate_node(i, node, &names, ctx, problems) {
            nodes.push(node);
        }
    }
    // Problems are reported in file order; the trigger table is needed earlier, to keep it
    // out of the table selection.
    let reserved = trigger_table(&trigger.table)
        .map(|t| vec![dead_table_of(&t), t])
        .unwrap_or_default();
    let replication = validate_replication(replication, &names, reserved, problems);
    let trigger = validate_trigger(trigger, problems);
    let metrics = validate_metrics(metrics, problems);
    let run = validate_run(run, ctx, problems);

    let (trigger, replication, metrics, run) = (trigger?, replication?, metrics?, run?);
    let warnings = collect_warnings(&replication);
    Some(Config {
        nodes,
        replication,
        trigger,
        metrics,
        log: validate_log(log),
        run,
        path: None,
        warnings,
    })
}

fn check_node_count(names: &[String], purpose: Purpose, problems: &mut Problems) {
    match names {
        [] => problems.add(
            "nodes",
            "no [[nodes]] entry: add one [[nodes]] table with name and dsn per database \
             (replication needs at least two)",
        ),
        [only] if purpose.min_nodes() > 1 => problems.add(
            "nodes",
            format!(
                "only one node ({only:?}) is configured; replication needs at least two \
                 [[nodes]] entries (walbridge tail works with one)"
            ),
        ),
        _ => {}
    }
}

fn validate_node(
    i: usize,
    raw: RawNode,
    all_names: &[String],
    ctx: &Context<'_>,
    problems: &mut Problems,
) -> Option<NodeConfig> {
    let RawNode {
        name,
        dsn,
        password_file,
    } = raw;
    let key = format!("nodes[{i}]");
    if !is_node_name(&name) {
        problems.add(
            format!("{key}.name"),
            format!(
                "{name:?} must match [a-z][a-z0-9_]{{0,30}} (a lower-case letter, then up to 30 \
                 lower-case letters, digits or _): it becomes part of slot and origin names"
            ),
        );
    } else if let Some(first) = all_names.iter().position(|n| *n == name) {
        if first < i {
            problems.add(
                format!("{key}.name"),
                format!(
                    "{name:?} is already the name of nodes[{first}]; node names must be unique"
                ),
            );
        }
    }

    let dsn_key = format!("{key}.dsn");
    if dsn.trim().is_empty() {
        problems.add(
            dsn_key,
            format!(
                "node {name:?}: is empty; write a libpq connection string \
                 (\"host=... dbname=... user=...\") or a postgres:// URI"
            ),
        );
        return None;
    }
    // Interpolated value by value, after parsing: a variable's value can never add or change
    // other keys of the connection string, whatever characters it holds.
    // A dsn that is one reference (`dsn = "${DATABASE_URL}"`) deliberately holds a whole
    // connection string: that one is expanded first, then parsed.
    let expand = |value: &str| interpolate::interpolate(value, ctx.env);
    let parsed = if interpolate::is_single_reference(dsn.trim()) {
        expand(dsn.trim())
            .map_err(|e| e.to_string())
            .and_then(|whole| Dsn::parse(&whole).map_err(|e| e.to_string()))
    } else {
        Dsn::parse_expanding(&dsn, &expand).map_err(|e| e.to_string())
    };
    let mut dsn = match parsed {
        Ok(dsn) => dsn,
        Err(e) => {
            problems.add(dsn_key, format!("node {name:?}: {e}"));
            return None;
        }
    };

    let password_file = password_file.map(|p| match ctx.base_dir {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    });
    let file_key = format!("{key}.password_file");
    if password_file.is_some() && dsn.password.is_some() {
        problems.add(
            file_key,
            format!(
                "node {name:?}: the dsn already contains a password; keep only one of dsn \
                 password and password_file"
            ),
        );
        return None;
    }
    if let Err(e) = dsn.resolve_password(password_file.as_deref()) {
        let key = match e {
            DsnError::PasswordFile { .. }
            | DsnError::PasswordFileMode { .. }
            | DsnError::EmptyPasswordFile(_) => file_key,
            _ => dsn_key,
        };
        problems.add(key, format!("node {name:?}: {e}"));
        return None;
    }
    Some(NodeConfig {
        name,
        dsn,
        password_file,
    })
}

fn validate_replication(
    raw: RawReplication,
    node_names: &[String],
    reserved: Vec<QualifiedName>,
    problems: &mut Problems,
) -> Option<ReplicationConfig> {
    let mode = problems.check("replication.mode", raw.mode.parse::<Mode>());
    let on_schema_mismatch = problems.check(
        "replication.on_schema_mismatch",
        raw.on_schema_mismatch.parse::<SchemaMismatch>(),
    );
    let plugin = problems.check("replication.plugin", raw.plugin.parse::<Plugin>());

    if raw.tables.is_empty() {
        problems.add(
            "replication.tables",
            "is empty, so nothing would be replicated; list schema.table patterns such as \
             \"public.*\"",
        );
    }
    let include = parse_patterns("replication.tables", &raw.tables, problems);
    let exclude = parse_patterns("replication.exclude", &raw.exclude, problems);

    let mut skip_columns = BTreeMap::new();
    for (key, value) in flatten_table_map("replication.skip_columns", raw.skip_columns, problems) {
        let table = problems.check(&key.path, QualifiedName::parse(&key.table));
        let columns = column_list(&key.path, value, problems);
        if let (Some(table), Some(columns)) = (table, columns) {
            skip_columns.insert(table, columns);
        }
    }

    let conflict = problems.check(
        "replication.conflict",
        raw.conflict.parse::<ConflictPolicy>(),
    );

    let mut seen = BTreeSet::new();
    for (i, name) in raw.priority.iter().enumerate() {
        let key = format!("replication.priority[{i}]");
        if !node_names.contains(name) {
            problems.add(
                key,
                format!(
                    "{name:?} is not a node name; nodes are {}",
                    node_names.join(", ")
                ),
            );
        } else if !seen.insert(name.as_str()) {
            problems.add(key, format!("{name:?} is listed twice"));
        }
    }

    let mut conflict_per_table = BTreeMap::new();
    for (key, value) in flatten_table_map(
        "replication.conflict_per_table",
        raw.conflict_per_table,
        problems,
    ) {
        let table = problems.check(&key.path, QualifiedName::parse(&key.table));
        let policy = match value {
            toml::Value::String(s) => problems.check(&key.path, s.parse::<ConflictPolicy>()),
            other => {
                problems.add(
                    &key.path,
                    format!(
                        "must be a string, one of {}; found {}",
                        ConflictPolicy::ALL.join(", "),
                        other.type_str()
                    ),
                );
                None
            }
        };
        if let (Some(table), Some(policy)) = (table, policy) {
            conflict_per_table.insert(table, policy);
        }
    }

    let max_retained_wal = match raw.max_retained_wal {
        RawSize::Bytes(n) => u64::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{n} must be a positive size, e.g. \"8GB\"")),
        RawSize::Text(s) => parse_size(&s).and_then(|n| {
            if n == 0 {
                Err(format!("{s:?} must be larger than zero"))
            } else {
                Ok(n)
            }
        }),
    };
    let max_retained_wal = problems.check("replication.max_retained_wal", max_retained_wal);

    let slot_prefix = raw.slot_prefix;
    if !is_slot_prefix(&slot_prefix) {
        problems.add(
            "replication.slot_prefix",
            format!(
                "{slot_prefix:?} must match [a-z][a-z0-9_]* (it names slots, origins and the \
                 publication)"
            ),
        );
    } else {
        check_name_lengths(&slot_prefix, node_names, problems);
    }

    let conflict_retention = problems.check(
        "replication.conflict_retention",
        parse_duration(&raw.conflict_retention),
    );
    let tombstone_retention = problems.check(
        "replication.tombstone_retention",
        parse_duration(&raw.tombstone_retention),
    );
    // A bound the journal's SQL takes as an int4; 1 kB at least, so a cut version still
    // shows every column's beginning.
    let row_bound = |n: u64, shown: String| {
        if (1024..=i32::MAX as u64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{shown} must be between 1kB and 2GB"))
        }
    };
    let conflict_max_row_bytes = problems.check(
        "replication.conflict_max_row_bytes",
        match raw.conflict_max_row_bytes {
            RawSize::Bytes(n) => u64::try_from(n)
                .map_err(|_| format!("{n} must be between 1kB and 2GB"))
                .and_then(|b| row_bound(b, n.to_string())),
            RawSize::Text(s) => parse_size(&s).and_then(|b| row_bound(b, format!("{s:?}"))),
        },
    );

    Some(ReplicationConfig {
        mode: mode?,
        plugin: plugin?,
        tables: TableSelection::new(include, exclude, reserved),
        skip_columns,
        conflict: conflict?,
        priority: raw.priority,
        conflict_per_table,
        max_retained_wal: max_retained_wal?,
        slot_prefix,
        conflict_retention: conflict_retention?,
        tombstone_retention: tombstone_retention?,
        conflict_max_row_bytes: conflict_max_row_bytes?,
        sequence_ranges: raw.sequence_ranges,
        allow_lossy_wal2json: raw.allow_lossy_wal2json,
        stream_in_progress: raw.stream_in_progress,
        failover_slots: raw.failover_slots,
        on_schema_mismatch: on_schema_mismatch?,
    })
}

fn parse_patterns(key: &str, texts: &[String], problems: &mut Problems) -> Vec<TablePattern> {
    texts
        .iter()
        .enumerate()
        .filter_map(|(i, t)| problems.check(&format!("{key}[{i}]"), TablePattern::parse(t)))
        .collect()
}

/// A `schema.table` key of `skip_columns` / `conflict_per_table` and its key path.
struct TableKey {
    table: String,
    path: String,
}

/// The entries of a `{ "schema.table" = value }` map. The unquoted form
/// `{ public.accounts = value }` is a nested table in TOML; it is read the same way.
fn flatten_table_map(
    key: &str,
    map: BTreeMap<String, toml::Value>,
    problems: &mut Problems,
) -> Vec<(TableKey, toml::Value)> {
    let mut out = Vec::new();
    for (k, v) in map {
        match v {
            toml::Value::Table(inner) if !k.contains('.') => {
                for (k2, v2) in inner {
                    let table = format!("{k}.{k2}");
                    let path = format!("{key}.{}", toml_key(&table));
                    if v2.is_table() {
                        problems.add(
                            path,
                            "nests too deep; write the key as \"schema.table\" in quotes",
                        );
                    } else {
                        out.push((TableKey { table, path }, v2));
                    }
                }
            }
            v => {
                let path = format!("{key}.{}", toml_key(&k));
                out.push((TableKey { table: k, path }, v));
            }
        }
    }
    out
}

/// A key as TOML would write it: bare when it can be, quoted otherwise.
fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

fn column_list(key: &str, value: toml::Value, problems: &mut Problems) -> Option<Vec<String>> {
    let explain = "must be a list of column names, e.g. [\"balance\"]";
    let toml::Value::Array(items) = value else {
        problems.add(key, format!("{explain}; found {}", value.type_str()));
        return None;
    };
    let mut columns = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            toml::Value::String(s) if !s.is_empty() => columns.push(s),
            toml::Value::String(_) => {
                problems.add(format!("{key}[{i}]"), "is an empty column name")
            }
            other => problems.add(
                format!("{key}[{i}]"),
                format!("{explain}; found {}", other.type_str()),
            ),
        }
    }
    Some(columns)
}

/// The longest slot and origin names must fit in a PostgreSQL name.
fn check_name_lengths(prefix: &str, node_names: &[String], problems: &mut Problems) {
    let valid: Vec<&str> = node_names
        .iter()
        .map(String::as_str)
        .filter(|n| is_node_name(n))
        .collect();
    let mut longest: Option<String> = None;
    for s in &valid {
        let mut consider = |name: String| {
            if name.len() > longest.as_ref().map_or(0, String::len) {
                longest = Some(name);
            }
        };
        consider(origin_name(prefix, s));
        for t in valid.iter().filter(|t| *t != s) {
            consider(slot_name(prefix, s, t));
        }
    }
    if let Some(name) = longest.filter(|n| n.len() > MAX_NAME_BYTES) {
        problems.add(
            "replication.slot_prefix",
            format!(
                "{prefix:?} makes the name {name:?} {} bytes long, and PostgreSQL names hold at \
                 most {MAX_NAME_BYTES}; shorten slot_prefix or the node names",
                name.len()
            ),
        );
    }
}

/// `trigger.table`: `schema.table`, or `table` in `public`; its `_dead` twin must fit a name.
fn trigger_table(text: &str) -> Result<QualifiedName, String> {
    let table = if text.is_empty() {
        return Err("is empty; name the change table, e.g. \"public.database_changes\"".into());
    } else if text.contains('.') {
        QualifiedName::parse(text).map_err(|e| e.to_string())?
    } else {
        QualifiedName::new("public", text)
    };
    let dead = dead_table_of(&table);
    if dead.name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{text:?} is too long: its dead-letter table {:?} would exceed PostgreSQL's \
             {MAX_NAME_BYTES}-byte names",
            dead.name
        ));
    }
    Ok(table)
}

fn validate_trigger(raw: RawTrigger, problems: &mut Problems) -> Option<TriggerConfig> {
    let table = problems.check("trigger.table", trigger_table(&raw.table));
    let poll_interval = problems.check("trigger.poll_interval", parse_duration(&raw.poll_interval));
    let batch_size = usize::try_from(raw.batch_size)
        .ok()
        .filter(|n| (1..=MAX_BATCH_SIZE).contains(n));
    if batch_size.is_none() {
        problems.add(
            "trigger.batch_size",
            format!("{} must be between 1 and {MAX_BATCH_SIZE}", raw.batch_size),
        );
    }
    Some(TriggerConfig {
        table: table?,
        poll_interval: poll_interval?,
        batch_size: batch_size?,
    })
}

fn validate_log(raw: RawLog) -> LogConfig {
    LogConfig {
        row_contents: raw.row_contents,
    }
}

fn validate_metrics(raw: RawMetrics, problems: &mut Problems) -> Option<MetricsConfig> {
    let text = raw.listen.trim();
    if text.is_empty() {
        return Some(MetricsConfig { listen: None });
    }
    let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
        let port = text.strip_prefix("localhost:")?.parse::<u16>().ok()?;
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    });
    match parsed {
        Some(addr) => Some(MetricsConfig { listen: Some(addr) }),
        None => {
            problems.add(
                "metrics.listen",
                format!(
                    "{:?} is not an address: write IP:PORT such as \"127.0.0.1:9187\" or \
                     \"0.0.0.0:9187\", or \"\" for no metrics server",
                    raw.listen
                ),
            );
            None
        }
    }
}

fn validate_run(raw: RawRun, ctx: &Context<'_>, problems: &mut Problems) -> Option<RunConfig> {
    let Some(text) = raw.instance else {
        return Some(RunConfig {
            instance: default_instance(),
        });
    };
    let instance = match interpolate::interpolate(&text, ctx.env) {
        Ok(t) => t.trim().to_string(),
        Err(interpolate::InterpolateError::Missing(var)) => {
            problems.add(
                "run.instance",
                format!("environment variable {var} is not set; export it or write the name here"),
            );
            return None;
        }
        Err(e) => {
            problems.add("run.instance", e.to_string());
            return None;
        }
    };
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if instance.is_empty() || instance.len() > INSTANCE_MAX_LEN || !instance.chars().all(allowed) {
        problems.add(
            "run.instance",
            format!(
                "{instance:?} is not an instance name: write 1 to {INSTANCE_MAX_LEN} letters, \
                 digits, '-', '_', '.' or ':' (such as \"${{HOSTNAME}}\"), or leave it out for \
                 host:pid"
            ),
        );
        return None;
    }
    Some(RunConfig { instance })
}

fn collect_warnings(r: &ReplicationConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let uses_priority = r.conflict == ConflictPolicy::NodePriority
        || r.conflict_per_table
            .values()
            .any(|p| *p == ConflictPolicy::NodePriority);
    if uses_priority && r.priority.is_empty() {
        warnings.push(
            "replication.priority is empty, so node_priority ranks the nodes by name; list them \
             in order of precedence"
                .to_string(),
        );
    }
    for (what, tables) in [
        ("skip_columns", r.skip_columns.keys().collect::<Vec<_>>()),
        (
            "conflict_per_table",
            r.conflict_per_table.keys().collect::<Vec<_>>(),
        ),
    ] {
        for t in tables {
            if !r.tables.matches(&t.schema, &t.name) {
                warnings.push(format!(
                    "replication.{what} names {t}, which tables/exclude do not replicate"
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests;
