//! Logging setup: human (coloured on a terminal unless `NO_COLOR` is set) or JSON lines on
//! stderr, filtered by `RUST_LOG`. Each direction's work runs in a `direction{source,target}`
//! span, so every line says which direction it concerns (in JSON: the `span` object).
//!
//! Nothing logged carries a password or a full connection string: nodes appear as
//! `user@host:port/dbname` (`Dsn::describe`), and connection errors are built from that form.
//!
//! stdout belongs to command output (`tail`'s JSON lines, `status --json`, `check-config`'s
//! plan), so logs always go to stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Colour only on a terminal, and never when `NO_COLOR` is set (<https://no-color.org>).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber writing to stderr. `RUST_LOG` filters (default `info`); an
/// invalid `RUST_LOG` falls back to the default and says so. Calling it again does nothing:
/// the first subscriber stays.
pub fn init(format: LogFormat) {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some((spec, e))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(colour()).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    if installed.is_ok() {
        if let Some((spec, error)) = bad_filter {
            tracing::warn!(rust_log = %spec, %error, "ignoring invalid RUST_LOG; logging at info");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_twice_is_harmless() {
        init(LogFormat::Json);
        init(LogFormat::Text);
        tracing::info!("still logging");
    }
}
