//! Writes walbridge's man pages and shell completions, generated from the command-line
//! definition the binary parses with, into a directory (the package build runs it):
//!
//! ```sh
//! cargo run --release --example generate-assets -- target/release/assets
//! ```

use std::process::ExitCode;

use clap::CommandFactory as _;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: generate-assets DIR");
        return ExitCode::from(2);
    };
    match walbridge::assets::generate(walbridge::cli::Cli::command(), dir.as_ref()) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}: {}", e.source);
            ExitCode::FAILURE
        }
    }
}
