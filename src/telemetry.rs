//! Logging setup: human (coloured on a terminal unless `NO_COLOR` is set) or JSON lines on
//! stderr, filtered by `RUST_LOG`. Each direction's work runs in a `direction{source,target}`
//! span, so every line says which direction it concerns (in JSON: the `span` object).
//!
//! Nothing logged carries a password or a full connection string: nodes appear as
//! `user@host:port/dbname` (`Dsn::describe`), and connection errors are built from that form.
//!
//! stdout belongs to command output (`tail`'s JSON lines, `status --json`, `check-config`'s
//! plan), so logs always go to stderr.
//!
//! Row contents stay out of errors and logs by default, because errors travel further than
//! the data (log shippers, `/status`, `status --json`, tickets):
//!
//! ```text
//!   server error ──▶ shown_message / shown_detail ──▶ direction error ──▶ log, /status, metrics
//!   conflict key, rows ──▶ shown_row ──────────────────▶ error text, log fields
//! ```
//!
//! A server's DETAIL is withheld when its SQLSTATE class can carry row values (a unique key
//! "Key (id)=(42) already exists", a "Failing row contains (...)"), and values quoted in the
//! message of a data exception (`invalid input syntax for type integer: "..."`) become `"…"`.
//! `[log] row_contents = true` (or `WALBRIDGE_LOG_ROW_CONTENTS=1`) shows them, for debugging.
//! The policy is set once at start ([`set_row_contents`]) and read where errors are worded,
//! many of which are `Display` impls with no configuration in reach; the default is the safe
//! one, so a path that never sees the setting cannot leak.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

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
/// the first subscriber stays. True when this call installed it.
pub fn init(format: LogFormat) -> bool {
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
    installed.is_ok()
}

static ROW_CONTENTS: AtomicBool = AtomicBool::new(false);

/// The environment variable that turns [`row_contents`] on (`1`, `true`, `on` or `yes`) like
/// `[log] row_contents = true`.
pub const ROW_CONTENTS_ENV: &str = "WALBRIDGE_LOG_ROW_CONTENTS";

/// Lets row values appear in errors and logs (`true`) or withholds them (the default).
pub fn set_row_contents(show: bool) {
    ROW_CONTENTS.store(show, Ordering::Relaxed);
}

/// Whether row values may appear in errors and logs.
pub fn row_contents() -> bool {
    ROW_CONTENTS.load(Ordering::Relaxed)
}

/// Whether the environment asks for row contents ([`ROW_CONTENTS_ENV`]).
pub fn row_contents_from_env() -> bool {
    std::env::var(ROW_CONTENTS_ENV).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "on" | "yes"
        )
    })
}

/// What replaces a withheld DETAIL.
pub const DETAIL_WITHHELD: &str =
    "detail withheld (it may hold row values; [log] row_contents = true shows it)";

/// What replaces a withheld key or row.
pub const ROW_WITHHELD: &str = "(withheld; [log] row_contents = true shows it)";

/// SQLSTATE classes whose DETAIL (or quoted message parts) can carry row values: data
/// exceptions, integrity violations, triggered data changes, external routines, WITH CHECK
/// OPTION, PL/pgSQL raises and internal errors (which include output plugins').
fn carries_row_values(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some("22" | "23" | "27" | "2F" | "38" | "39" | "44" | "P0" | "XX")
    )
}

/// Data exceptions whose message quotes the offending value (`invalid input syntax for type
/// integer: "..."`, `value "..." is out of range for type integer`).
fn quotes_a_value(code: &str) -> bool {
    matches!(
        code,
        "22P02" // invalid text representation
            | "22003" // numeric value out of range
            | "22007" // invalid datetime format
            | "22008" // datetime field overflow
            | "22018" // invalid character value for cast
            | "22021" // character not in repertoire
            | "22025" // invalid escape sequence
            | "22P03" // invalid binary representation
            | "22P05" // untranslatable character
            | "2200M" // invalid XML document
            | "2200N" // invalid XML content
    )
}

/// A server error's primary message as it may be shown: in a data exception that quotes the
/// offending value, the quoted part becomes `"…"` unless row contents are on.
pub fn shown_message<'a>(code: &str, message: &'a str) -> Cow<'a, str> {
    if row_contents() || !quotes_a_value(code) {
        return Cow::Borrowed(message);
    }
    match (message.find('"'), message.rfind('"')) {
        (Some(first), Some(last)) if last > first => Cow::Owned(format!(
            "{}\"…\"{}",
            &message[..first],
            &message[last + 1..]
        )),
        _ => Cow::Borrowed(message),
    }
}

/// A server error's DETAIL as it may be shown: `None` stays `None`; a detail that may carry
/// row values becomes [`DETAIL_WITHHELD`] unless row contents are on.
pub fn shown_detail<'a>(code: &str, detail: Option<&'a str>) -> Option<&'a str> {
    match detail {
        Some(_) if !row_contents() && carries_row_values(code) => Some(DETAIL_WITHHELD),
        other => other,
    }
}

/// A key or row (walbridge's own rendering, e.g. a conflict's) as it may be shown.
pub fn shown_row(row: &str) -> &str {
    if row_contents() {
        row
    } else {
        ROW_WITHHELD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_values_are_withheld_by_default() {
        // The only test in the library that touches the switch: it stays off elsewhere.
        assert!(!row_contents());
        assert_eq!(
            shown_detail("23505", Some("Key (id)=(42) already exists.")),
            Some(DETAIL_WITHHELD)
        );
        assert_eq!(
            shown_detail("55006", Some("Process 7 holds it.")),
            Some("Process 7 holds it.")
        );
        assert_eq!(shown_detail("23505", None), None);
        assert_eq!(
            shown_message("22P02", "invalid input syntax for type integer: \"x\"y\""),
            "invalid input syntax for type integer: \"…\""
        );
        assert_eq!(
            shown_message(
                "23505",
                "duplicate key value violates unique constraint \"t_pkey\""
            ),
            "duplicate key value violates unique constraint \"t_pkey\""
        );
        assert_eq!(
            shown_message("22023", "option \"x\" is unknown"),
            "option \"x\" is unknown"
        );
        assert_eq!(shown_row("[42]"), ROW_WITHHELD);
    }

    #[test]
    fn init_installs_once_and_a_second_call_keeps_the_first() {
        // The only test that installs a subscriber (nextest also gives it its own process).
        assert!(
            init(LogFormat::Json),
            "the first call did not install the subscriber"
        );
        assert!(tracing::dispatcher::has_been_set());
        assert!(
            !init(LogFormat::Text),
            "a second call replaced the first subscriber"
        );
        tracing::info!("still logging");
    }
}
