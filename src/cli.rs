//! Command-line interface: argument parsing, dispatch and exit codes.
//!
//! ```text
//!   argv ──clap──▶ Cli ──▶ telemetry::init ──▶ tokio runtime ──▶ dispatch ──▶ subcommand
//!                  │ usage error: exit 2                                       │
//!                  ▼                                                           ▼
//!                stderr                                   Result<(), Failure> ──▶ exit code
//! ```
//!
//! Exit codes follow the contract: 0 success, 1 a failure at run time, 2 a usage or
//! configuration error (for every subcommand). A failure prints as one line on stderr,
//! `error: <what>: <cause>: <cause>`.
//!
//! Only this module installs SIGINT/SIGTERM handlers: the first signal cancels the
//! [`CancellationToken`] handed to long-running subcommands, a second one exits at once.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError, Plugin, Purpose, QualifiedName};
use crate::lsn::Lsn;
use crate::telemetry::{self, LogFormat};

/// `walbridge`: PostgreSQL active-active replication.
#[derive(Debug, Parser)]
#[command(
    name = "walbridge",
    version = crate::version::SHORT,
    long_version = crate::version::LONG,
    about,
    propagate_version = true
)]
pub struct Cli {
    /// Flags every subcommand accepts, before or after its name.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "WALBRIDGE_CONFIG",
        default_value = "walbridge.toml"
    )]
    pub config: PathBuf,
    /// Log line format on stderr (RUST_LOG filters, default info).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The subcommands of the contract's command table.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Prepare every node idempotently: publication, slots and origins, or the change table
    /// and triggers.
    Setup(SetupArgs),
    /// Replicate in every direction until SIGINT/SIGTERM.
    Run,
    /// Show per-direction lag and per-node slot state.
    Status(StatusArgs),
    /// Compare every replicated table across all nodes.
    Verify(VerifyArgs),
    /// Remove what setup created (slots first); user data stays.
    Teardown,
    /// Stream one node's decoded changes to stdout as JSON lines.
    Tail(TailArgs),
    /// Start two throwaway local clusters and replicate between them until Ctrl-C.
    Demo,
    /// Validate the configuration and print the resolved plan.
    CheckConfig(CheckConfigArgs),
    /// List the conflict journal of every node, newest last.
    Conflicts(ConflictsArgs),
    /// Explain why a row looks as it does: its versions and the conflicts that decided it.
    Why(WhyArgs),
    /// Show where the nodes' schemas of the replicated tables differ.
    Drift(DriftArgs),
    /// Move a stopped direction past the source transaction it stopped on, keeping its
    /// changes in walbridge.skipped on the target.
    Skip(SkipArgs),
}

/// `walbridge skip`.
#[derive(Debug, Args)]
pub struct SkipArgs {
    /// The direction's source node.
    #[arg(long, value_name = "NODE")]
    pub source: String,
    /// The direction's target node.
    #[arg(long, value_name = "NODE")]
    pub target: String,
    /// End (commit) LSN of the source transaction the direction stopped on, as the error
    /// and `walbridge status` name it (e.g. 0/16B3748).
    #[arg(long, value_name = "LSN")]
    pub lsn: Lsn,
}

/// `walbridge drift`.
#[derive(Debug, Args)]
pub struct DriftArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Compare only this table (schema.table).
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub table: Option<QualifiedName>,
}

/// `walbridge conflicts`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConflictsArgs {
    /// `replay`, or nothing to list the journal.
    #[command(subcommand)]
    pub action: Option<ConflictsAction>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only conflicts resolved within this long before now (e.g. 1h, 30m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub since: Option<std::time::Duration>,
    /// Only conflicts of this table (schema.table).
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub table: Option<QualifiedName>,
}

/// Subcommands of `walbridge conflicts`.
#[derive(Debug, Subcommand)]
pub enum ConflictsAction {
    /// Recompute every recorded conflict under another policy; list those that would end
    /// differently. Read-only.
    Replay(ReplayArgs),
}

/// `walbridge conflicts replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The policy to replay under: last_write_wins, node_priority or error.
    #[arg(long, value_name = "POLICY", value_parser = parse_policy_arg)]
    pub policy: config::ConflictPolicy,
    /// Only conflicts resolved within this long before now (e.g. 1h, 30m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub since: Option<std::time::Duration>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_policy_arg(s: &str) -> Result<config::ConflictPolicy, String> {
    s.parse()
        .map_err(|_| "expected last_write_wins, node_priority or error".to_string())
}

/// `walbridge why`.
#[derive(Debug, Args)]
pub struct WhyArgs {
    /// The node whose row is explained.
    #[arg(long, value_name = "NODE")]
    pub node: String,
    /// The table (schema.table).
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub table: QualifiedName,
    /// The row's key as a JSON object of its key columns, e.g. '{"id": 42}'.
    #[arg(long, value_name = "JSON", value_parser = parse_json_arg)]
    pub key: serde_json::Value,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s)
}

fn parse_json_arg(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

/// `walbridge setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// First copy the current rows of every replicated table from this node to the others.
    #[arg(long, value_name = "NODE")]
    pub copy_from: Option<String>,
    /// Tables copied in parallel with --copy-from.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    /// With --copy-from, empty the target tables before copying into them.
    #[arg(long, requires = "copy_from")]
    pub truncate: bool,
}

/// `walbridge status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `walbridge verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Verify only this table (schema.table).
    #[arg(long, value_name = "SCHEMA.TABLE")]
    pub table: Option<QualifiedName>,
}

/// `walbridge tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// The node to read.
    #[arg(long, value_name = "NODE")]
    pub node: String,
    /// Output plugin (default: the configuration's `replication.plugin`).
    #[arg(long, value_name = "PLUGIN")]
    pub plugin: Option<Plugin>,
    /// Start at this LSN (e.g. 0/16B3748) instead of the slot's position.
    #[arg(long, value_name = "LSN")]
    pub from: Option<Lsn>,
    /// Read from this existing slot instead of a temporary one.
    #[arg(long, value_name = "NAME")]
    pub slot: Option<String>,
    /// Publication for pgoutput (default: <slot_prefix>_pub, the one setup creates).
    #[arg(long, value_name = "NAME")]
    pub publication: Option<String>,
}

/// `walbridge check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Also connect to every node and check its prerequisites.
    #[arg(long)]
    pub connect: bool,
}

/// How a subcommand failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Wrong use of the command line (exit 2).
    Usage(anyhow::Error),
    /// The configuration cannot be loaded or is invalid (exit 2).
    Config(anyhow::Error),
    /// Anything else that stopped the command (exit 1).
    Fatal(anyhow::Error),
    /// The command already printed its outcome (differences found, node unreachable...); exit
    /// with this code and print nothing more.
    Exit(u8),
}

impl Failure {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) | Failure::Config(_) => 2,
            Failure::Fatal(_) => 1,
            Failure::Exit(code) => *code,
        }
    }

    /// The error to print, if any.
    pub fn error(&self) -> Option<&anyhow::Error> {
        match self {
            Failure::Usage(e) | Failure::Config(e) | Failure::Fatal(e) => Some(e),
            Failure::Exit(_) => None,
        }
    }

    /// A usage error with this message.
    pub fn usage(message: impl Into<String>) -> Self {
        Failure::Usage(anyhow::Error::msg(message.into()))
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e.into())
    }
}

impl From<anyhow::Error> for Failure {
    /// Fatal (exit 1), unless a configuration error is somewhere in the chain (exit 2).
    fn from(e: anyhow::Error) -> Self {
        if e.chain().any(|cause| cause.is::<ConfigError>()) {
            Failure::Config(e)
        } else {
            Failure::Fatal(e)
        }
    }
}

/// Parses the command line, runs the subcommand and maps the outcome to the contract's exit codes.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with code 0; usage errors to stderr with code 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    install_panic_hook();
    telemetry::init(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("walbridge")
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let failure = Failure::Fatal(anyhow::Error::new(e).context("cannot start the runtime"));
            return finish(Err(failure));
        }
    };
    let outcome = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone());
        dispatch(cli, shutdown).await
    });
    // Tasks that ignore cancellation must not keep the process alive forever.
    runtime.shutdown_timeout(Duration::from_secs(5));
    finish(outcome)
}

/// Prints the failure, if any, as one line and returns the exit code.
fn finish(outcome: Result<(), Failure>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if let Some(error) = failure.error() {
                eprintln!("error: {}", one_line(&format!("{error:#}")));
            }
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Collapses line breaks (e.g. a server's DETAIL) so an error stays one line.
fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replaces the panic report with one line (a panic is a walbridge bug); with `RUST_BACKTRACE`
/// set, the default report with its backtrace is kept.
fn install_panic_hook() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error (a walbridge bug): {}{location}; run with RUST_BACKTRACE=1 \
             for details",
            one_line(&message)
        );
    }));
}

/// First SIGINT/SIGTERM: cancel `shutdown` so commands stop cleanly. Second: exit at once.
///
/// The signal streams are created once: a stream created after a signal arrived can report
/// that same signal again, which would turn one Ctrl-C into two.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGINT/SIGTERM");
                return;
            }
        };
        loop {
            signals.next().await;
            if shutdown.is_cancelled() {
                eprintln!("error: interrupted again; exiting without waiting for a clean stop");
                std::process::exit(130);
            }
            tracing::info!("stopping; signal again to exit at once");
            shutdown.cancel();
        }
    });
}

#[cfg(unix)]
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn next(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Loads the configuration (two nodes or more) and logs its warnings.
fn load(path: &Path) -> Result<Config, Failure> {
    load_for(path, Purpose::Replication)
}

/// Loads the configuration with the node-count rule of `purpose` and logs its warnings.
fn load_for(path: &Path, purpose: Purpose) -> Result<Config, Failure> {
    let config = Config::load_for(path, purpose)?;
    telemetry::set_row_contents(config.log.row_contents || telemetry::row_contents_from_env());
    if telemetry::row_contents() {
        tracing::warn!(
            "row contents are shown in errors and logs ([log] row_contents or {}); turn it off \
             outside debugging",
            telemetry::ROW_CONTENTS_ENV
        );
    }
    for warning in config.warnings() {
        tracing::warn!(config = %path.display(), "{warning}");
    }
    Ok(config)
}

/// A `--node`-style argument must name a configured node (else a usage error, exit 2).
fn require_node(config: &Config, flag: &str, name: &str) -> Result<(), Failure> {
    if config.node(name).is_some() {
        return Ok(());
    }
    let known: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    Err(Failure::usage(format!(
        "{flag} {name}: no such node in {}; nodes are {}",
        config.path.as_deref().map_or_else(
            || "the configuration".to_string(),
            |p| p.display().to_string()
        ),
        known.join(", ")
    )))
}

/// Runs one subcommand. Each arm loads what the command needs and calls its handler below.
async fn dispatch(cli: Cli, shutdown: CancellationToken) -> Result<(), Failure> {
    let path = cli.global.config.as_path();
    match cli.command {
        Command::Setup(args) => setup(load(path)?, args, shutdown).await,
        Command::Run => run(load(path)?, shutdown).await,
        Command::Status(args) => status(load(path)?, args).await,
        Command::Verify(args) => verify(load(path)?, args, shutdown).await,
        Command::Teardown => teardown(load(path)?).await,
        Command::Tail(args) => tail(load_for(path, Purpose::SingleNode)?, args, shutdown).await,
        Command::Demo => demo(shutdown).await,
        Command::CheckConfig(args) => check_config(load(path)?, args).await,
        Command::Conflicts(args) => conflicts(load(path)?, args).await,
        Command::Why(args) => why(load(path)?, args).await,
        Command::Drift(args) => drift(load(path)?, args).await,
        Command::Skip(args) => skip(load(path)?, args).await,
    }
}

// Handlers not wired yet: each becomes a call into its module.

/// `walbridge setup`.
async fn setup(
    config: Config,
    args: SetupArgs,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    if let Some(node) = &args.copy_from {
        require_node(&config, "--copy-from", node)?;
    }
    let options = crate::setup::SetupOptions {
        copy_from: args.copy_from.clone(),
        jobs: usize::from(args.jobs),
        truncate: args.truncate,
        shutdown,
    };
    let mut out = std::io::stdout();
    crate::setup::setup(&config, &options, &mut out)
        .await
        .map_err(setup_failure)
}

/// Setup and teardown errors: missing prerequisites print one line each.
fn setup_failure(e: crate::setup::SetupError) -> Failure {
    match e {
        crate::setup::SetupError::Prerequisites(problems) => {
            for p in &problems {
                eprintln!("error: {p}");
            }
            eprintln!(
                "error: {} prerequisite(s) missing; nothing was changed",
                problems.len()
            );
            Failure::Exit(1)
        }
        other => Failure::Fatal(other.into()),
    }
}

/// `walbridge run`.
async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Failure> {
    crate::runtime::run(std::sync::Arc::new(config), shutdown)
        .await
        .map_err(|e| Failure::Fatal(e.into()))
}

/// `walbridge status`: 0 when every node is reachable, 1 otherwise.
async fn status(config: Config, args: StatusArgs) -> Result<(), Failure> {
    let report = crate::status::gather(&config).await;
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&report)
            .map_err(|e| Failure::Fatal(anyhow::Error::new(e).context("encoding the status")))?;
        text.push('\n');
        text
    } else {
        crate::status::render_text(&report)
    };
    // A closed pipe (`walbridge status | head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    match report.exit_code() {
        0 => Ok(()),
        code => Err(Failure::Exit(code)),
    }
}

/// `e` as a wrong use of the command line (exit 2) when `usage`, else as a failure (exit 1).
fn usage_or_fatal(usage: bool, e: impl Into<anyhow::Error>) -> Failure {
    if usage {
        Failure::Usage(e.into())
    } else {
        Failure::Fatal(e.into())
    }
}

fn forensics_failure(e: crate::forensics::ForensicsError) -> Failure {
    usage_or_fatal(e.is_usage(), e)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Failure::Fatal(anyhow::Error::new(e).context("encoding the report")))?;
    text.push('\n');
    print_text(&text);
    Ok(())
}

fn print_text(text: &str) {
    // A closed pipe (`walbridge conflicts | head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
}

/// `walbridge conflicts`: every node's journal, newest last.
async fn conflicts(config: Config, args: ConflictsArgs) -> Result<(), Failure> {
    if let Some(ConflictsAction::Replay(replay)) = args.action {
        let report = crate::forensics::replay(&config, replay.policy, replay.since)
            .await
            .map_err(forensics_failure)?;
        return if replay.json {
            print_json(&report)
        } else {
            print_text(&crate::forensics::render_replay(&report));
            Ok(())
        };
    }
    let filter = crate::forensics::Filter {
        since: args.since,
        table: args.table,
        key: None,
    };
    let entries = crate::forensics::conflicts(&config, &filter)
        .await
        .map_err(forensics_failure)?;
    if args.json {
        print_json(&serde_json::json!({ "conflicts": entries }))
    } else {
        print_text(&crate::forensics::render_conflicts(&entries));
        Ok(())
    }
}

/// `walbridge why`: a row's versions on every node and the conflicts recorded for its key.
async fn why(config: Config, args: WhyArgs) -> Result<(), Failure> {
    require_node(&config, "--node", &args.node)?;
    let report = crate::forensics::why(&config, &args.node, &args.table, &args.key)
        .await
        .map_err(forensics_failure)?;
    if args.json {
        print_json(&report)
    } else {
        print_text(&crate::forensics::render_why(&report));
        Ok(())
    }
}

/// `walbridge verify`: the report on stdout; exit 0 identical, 1 differences, 2 usage.
async fn verify(
    config: Config,
    args: VerifyArgs,
    shutdown: CancellationToken,
) -> Result<(), Failure> {
    let options = crate::verify::VerifyOptions {
        table: args.table,
        ..Default::default()
    };
    let report = match crate::verify::verify(&config, &options, &shutdown).await {
        Ok(report) => report,
        Err(e) => return Err(usage_or_fatal(e.is_usage(), e)),
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render());
    }
    if report.identical {
        Ok(())
    } else {
        Err(Failure::Exit(1))
    }
}

/// `walbridge drift`: the differences on stdout; exit 0 none, 1 drift or a node unreachable,
/// 2 usage.
async fn drift(config: Config, args: DriftArgs) -> Result<(), Failure> {
    let report = crate::drift::drift(&config, args.table.as_ref())
        .await
        .map_err(|e| usage_or_fatal(e.is_usage(), e))?;
    if args.json {
        print_json(&report)?;
    } else {
        print_text(&report.render());
    }
    match report.exit_code() {
        0 => Ok(()),
        code => Err(Failure::Exit(code)),
    }
}

/// `walbridge skip`: exit 0 skipped, 1 refused (saying why) or failed, 2 usage.
async fn skip(config: Config, args: SkipArgs) -> Result<(), Failure> {
    let done = crate::skip::skip(&config, &args.source, &args.target, args.lsn)
        .await
        .map_err(|e| Failure::Fatal(e.into()))?;
    print_text(&format!(
        "skipped the transaction of {} ending at {} (xid {}, {} change{}): recorded in \
         walbridge.skipped on {}; {} -> {} resumes after it\n",
        args.source,
        done.end_lsn,
        done.xid,
        done.changes,
        if done.changes == 1 { "" } else { "s" },
        args.target,
        args.source,
        args.target
    ));
    Ok(())
}

/// `walbridge teardown`.
async fn teardown(config: Config) -> Result<(), Failure> {
    let mut out = std::io::stdout();
    crate::setup::teardown(&config, &mut out)
        .await
        .map_err(setup_failure)
}

/// `walbridge tail`: JSON lines on stdout until SIGINT/SIGTERM (exit 0).
async fn tail(config: Config, args: TailArgs, shutdown: CancellationToken) -> Result<(), Failure> {
    require_node(&config, "--node", &args.node)?;
    let options = crate::tail::TailOptions {
        node: args.node,
        plugin: args.plugin,
        from: args.from,
        slot: args.slot,
        publication: args.publication,
    };
    let mut out = std::io::stdout();
    crate::tail::tail(&config, &options, &mut out, shutdown)
        .await
        .map_err(|e| usage_or_fatal(e.is_usage(), e))
}

/// `walbridge demo`.
#[allow(clippy::unused_async)] // until wired
async fn demo(shutdown: CancellationToken) -> Result<(), Failure> {
    crate::demo::run(shutdown)
        .await
        .map_err(|e| Failure::Fatal(e.into()))
}

/// `walbridge check-config`: the configuration is valid once loaded; print the plan.
async fn check_config(config: Config, args: CheckConfigArgs) -> Result<(), Failure> {
    print!("{}", render_plan(&config));
    if args.connect {
        let mut out = std::io::stdout();
        let problems = crate::setup::check(&config, &mut out)
            .await
            .map_err(|e| Failure::Fatal(e.into()))?;
        if !problems.is_empty() {
            for p in &problems {
                eprintln!("error: {p}");
            }
            eprintln!("error: {} problem(s) found", problems.len());
            return Err(Failure::Exit(1));
        }
        println!("all nodes reachable and ready");
    }
    Ok(())
}

/// The resolved plan `check-config` prints: everything walbridge will create and use, never a
/// password.
pub fn render_plan(config: &Config) -> String {
    let r = &config.replication;
    let mut out = String::new();
    let origin = config.path.as_deref().map_or_else(
        || "the configuration".to_string(),
        |p| p.display().to_string(),
    );
    let _ = writeln!(out, "{origin}: valid");

    let width = config.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
    let _ = writeln!(out, "nodes ({}):", config.nodes.len());
    for node in &config.nodes {
        let _ = writeln!(out, "  {:width$}  {}", node.name, node.dsn.describe());
    }
    let _ = writeln!(out, "mode: {}", r.mode);
    let _ = writeln!(out, "plugin: {}", r.plugin);
    let _ = writeln!(out, "tables: {}", quoted_list(r.tables.include().iter()));
    let _ = writeln!(out, "exclude: {}", quoted_list(r.tables.exclude().iter()));
    if !r.skip_columns.is_empty() {
        let _ = writeln!(out, "skip columns:");
        for (table, columns) in &r.skip_columns {
            let _ = writeln!(
                out,
                "  {:?}: {}",
                table.to_string(),
                quoted_list(columns.iter())
            );
        }
    }
    let _ = writeln!(out, "conflict: {}", r.conflict);
    if !r.conflict_per_table.is_empty() {
        let _ = writeln!(out, "conflict per table:");
        for (table, policy) in &r.conflict_per_table {
            let _ = writeln!(out, "  {:?}: {policy}", table.to_string());
        }
    }
    let mut ranked: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    ranked.sort_by_key(|n| config.node_rank(n));
    let _ = writeln!(out, "priority (first wins): {}", ranked.join(", "));
    let _ = writeln!(
        out,
        "publication: {} (on every node)",
        config.publication_name()
    );
    let directions = config.directions();
    let _ = writeln!(out, "directions ({}):", directions.len());
    for d in &directions {
        let _ = writeln!(
            out,
            "  {:width$} -> {:width$}  slot {} on {}, origin {} on {}",
            d.source,
            d.target,
            config.slot_name(&d.source, &d.target),
            d.source,
            config.origin_name(&d.source),
            d.target,
        );
    }
    let _ = writeln!(
        out,
        "max retained WAL: {} per slot",
        config::format_size(r.max_retained_wal)
    );
    let _ = writeln!(
        out,
        "retention: conflicts {}, tombstones {}",
        config::format_duration(r.conflict_retention),
        config::format_duration(r.tombstone_retention)
    );
    let _ = writeln!(
        out,
        "sequence ranges: {}",
        if r.sequence_ranges { "on" } else { "off" }
    );
    let t = &config.trigger;
    let _ = writeln!(
        out,
        "trigger: table {}, dead rows in {}, poll every {}, batch {}",
        t.table,
        t.dead_table(),
        config::format_duration(t.poll_interval),
        t.batch_size
    );
    match config.metrics.listen {
        Some(addr) => {
            let _ = writeln!(out, "metrics: http://{addr}/metrics");
        }
        None => {
            let _ = writeln!(out, "metrics: off");
        }
    }
    for warning in config.warnings() {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}

fn quoted_list<T: ToString>(items: impl Iterator<Item = T>) -> String {
    let items: Vec<String> = items.map(|i| format!("{:?}", i.to_string())).collect();
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("walbridge").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_before_or_after_the_subcommand() {
        let before = parse(&["--config", "a.toml", "--log-format", "json", "run"]).unwrap();
        let after = parse(&["run", "--config", "a.toml", "--log-format", "json"]).unwrap();
        for cli in [before, after] {
            assert_eq!(cli.global.config, PathBuf::from("a.toml"));
            assert_eq!(cli.global.log_format, LogFormat::Json);
            assert!(matches!(cli.command, Command::Run));
        }
    }

    #[test]
    fn subcommand_arguments() {
        let cli = parse(&["setup", "--copy-from", "east", "--truncate"]).unwrap();
        let Command::Setup(s) = cli.command else {
            panic!()
        };
        assert_eq!(s.copy_from.as_deref(), Some("east"));
        assert_eq!(s.jobs, 2);
        assert!(s.truncate);
        assert!(
            parse(&["setup", "--truncate"]).is_err(),
            "--truncate needs --copy-from"
        );
        assert!(parse(&["setup", "--jobs", "0"]).is_err());

        let cli = parse(&[
            "tail",
            "--node",
            "a",
            "--plugin",
            "wal2json",
            "--from",
            "0/16B3748",
        ])
        .unwrap();
        let Command::Tail(t) = cli.command else {
            panic!()
        };
        assert_eq!(t.plugin, Some(Plugin::Wal2Json));
        assert_eq!(t.from, Some(Lsn(0x16B3748)));
        assert!(parse(&["tail", "--node", "a", "--plugin", "decoderbufs"]).is_err());
        assert!(parse(&["tail"]).is_err(), "--node is required");

        let cli = parse(&["verify", "--json", "--table", "Mixed Case.T"]).unwrap();
        let Command::Verify(v) = cli.command else {
            panic!()
        };
        assert!(v.json);
        assert_eq!(v.table, Some(QualifiedName::new("Mixed Case", "T")));
        assert!(parse(&["verify", "--table", "nodot"]).is_err());

        assert!(matches!(
            parse(&["check-config", "--connect"]).unwrap().command,
            Command::CheckConfig(CheckConfigArgs { connect: true })
        ));
        assert!(matches!(
            parse(&["status", "--json"]).unwrap().command,
            Command::Status(StatusArgs { json: true })
        ));
        for cmd in ["teardown", "demo"] {
            assert!(parse(&[cmd]).is_ok());
        }
    }

    #[test]
    fn usage_errors_exit_2() {
        assert_eq!(parse(&["frobnicate"]).unwrap_err().exit_code(), 2);
        assert_eq!(parse(&["run", "--bogus"]).unwrap_err().exit_code(), 2);
        assert_eq!(parse(&[]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn failures_map_to_exit_codes() {
        let config_error = ConfigError::Invalid {
            origin: "x".into(),
            errors: vec![],
        };
        assert_eq!(Failure::from(config_error).exit_code(), 2);
        let wrapped = anyhow::Error::new(ConfigError::Invalid {
            origin: "x".into(),
            errors: vec![],
        })
        .context("loading");
        assert_eq!(Failure::from(wrapped).exit_code(), 2);
        assert_eq!(Failure::from(anyhow::anyhow!("boom")).exit_code(), 1);
        assert_eq!(Failure::usage("bad").exit_code(), 2);
        assert_eq!(Failure::Exit(1).exit_code(), 1);
        assert!(Failure::Exit(1).error().is_none());
    }

    #[test]
    fn errors_print_on_one_line() {
        assert_eq!(one_line("a\n  DETAIL: b\r\n"), "a DETAIL: b");
    }
}
