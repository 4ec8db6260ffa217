//! Man pages and shell completions, generated from the clap definition of the command line.
//!
//! The package build writes them with `cargo run --example generate-assets -- DIR`, from the
//! same `clap::Command` that parses the arguments and prints `--help`, so the manual cannot
//! drift from the program:
//!
//! ```text
//!   cli::Cli ──CommandFactory──▶ clap::Command ─┬─clap_mangen───▶ DIR/man/walbridge.1, walbridge-<sub>.1
//!                                               └─clap_complete─▶ DIR/completions/walbridge.bash,
//!                                                                 _walbridge, walbridge.fish
//! ```
//!
//! This module takes the `clap::Command` as an argument and knows nothing of the CLI's types.
//! (The generator is an example rather than a hidden subcommand because clap_complete would
//! offer a hidden subcommand to every shell.)

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Writing the generated files failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}")]
pub struct AssetsError {
    /// The file or directory that could not be written.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// The completion scripts, with the file names their shells look for.
const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "walbridge.bash"),
    (Shell::Zsh, "_walbridge"),
    (Shell::Fish, "walbridge.fish"),
];

/// Writes one man page per command (section 1: `walbridge.1`, `walbridge-setup.1`, ...; hidden
/// subcommands get none) under `dir/man`, and bash, zsh and fish completions under
/// `dir/completions`. Returns the files written.
pub fn generate(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, AssetsError> {
    let mut cmd = cmd.disable_help_subcommand(true);
    // Fills in display names ("walbridge-setup") and propagated global flags.
    cmd.build();
    let man_dir = dir.join("man");
    let completion_dir = dir.join("completions");
    for d in [&man_dir, &completion_dir] {
        std::fs::create_dir_all(d).map_err(|source| AssetsError {
            path: d.clone(),
            source,
        })?;
    }
    let mut pages = vec![cmd.get_name().to_string()];
    pages.extend(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_display_name().unwrap_or(s.get_name()).to_string()),
    );
    let mut written = Vec::new();
    man_pages(&cmd, &pages, &man_dir, &mut written)?;
    let name = cmd.get_name().to_string();
    for (shell, file) in COMPLETIONS {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut text);
        written.push(write(&completion_dir.join(file), &text)?);
    }
    Ok(written)
}

/// The sections clap has no notion of, on the main page (roff).
const MAIN_PAGE_EXTRA: &str = r#".SH "EXIT STATUS"
0 on success; 1 when the command failed at run time (for \fBstatus\fR: a node is unreachable;
for \fBverify\fR: the nodes differ); 2 for a usage or configuration error.
.SH ENVIRONMENT
.TP
\fBWALBRIDGE_CONFIG\fR
the configuration file when \fB\-\-config\fR is not given
.TP
\fBRUST_LOG\fR
log filter (default \fBinfo\fR), e.g. \fBwalbridge=debug\fR
.TP
\fBPGPASSWORD\fR, \fBPGPASSFILE\fR
a node's password when neither its DSN nor its \fBpassword_file\fR gives one
.SH FILES
.TP
\fI/etc/walbridge/walbridge.toml\fR
the configuration the \fBwalbridge\fR service runs; \fBwalbridge@NAME\fR runs
\fI/etc/walbridge/NAME.toml\fR
.TP
\fI/usr/share/walbridge/sql/\fR
the SQL walbridge runs on the nodes, to read or to run by hand (\fBuninstall.sql\fR)
.TP
\fI/usr/share/doc/walbridge/README.md\fR
every configuration key, conflicts, operations, limits
"#;

/// The page of `cmd`, then those of its visible subcommands; each ends with SEE ALSO naming
/// the other `pages`.
fn man_pages(
    cmd: &clap::Command,
    pages: &[String],
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), AssetsError> {
    // The footer names the program and its version on every page ("walbridge 0.1.0 ...").
    let source = format!("{} {}", pages[0], cmd.get_version().unwrap_or_default());
    let man = clap_mangen::Man::new(cmd.clone())
        .manual("walbridge manual")
        .source(source);
    let path = dir.join(man.get_filename());
    let mut text = Vec::new();
    man.render(&mut text).map_err(|source| AssetsError {
        path: path.clone(),
        source,
    })?;
    let this = cmd.get_display_name().unwrap_or(cmd.get_name());
    if this == pages[0] {
        text.extend_from_slice(MAIN_PAGE_EXTRA.as_bytes());
    }
    let others: Vec<String> = pages
        .iter()
        .filter(|p| p.as_str() != this)
        .map(|p| format!("\\fB{}\\fR(1)", p.replace('-', "\\-")))
        .collect();
    if !others.is_empty() {
        text.extend_from_slice(format!(".SH \"SEE ALSO\"\n{}\n", others.join(", ")).as_bytes());
    }
    written.push(write(&path, &text)?);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, pages, dir, written)?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<PathBuf, AssetsError> {
    let fail = |source| AssetsError {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    Ok(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("walbridge")
            .version("1.0")
            .arg(clap::Arg::new("config").long("config").global(true))
            .subcommand(clap::Command::new("setup").about("Prepare every node"))
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_command_and_three_shells() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(sample(), dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "walbridge.1",
                "walbridge-setup.1",
                "walbridge.bash",
                "_walbridge",
                "walbridge.fish"
            ]
        );
        let setup = std::fs::read_to_string(dir.path().join("man/walbridge-setup.1")).unwrap();
        assert!(setup.contains("Prepare every node"), "{setup}");
        assert!(setup.contains("config"), "global flag missing: {setup}");
        assert!(
            setup.contains(".SH \"SEE ALSO\"\n\\fBwalbridge\\fR(1)\n"),
            "{setup}"
        );
        let main = std::fs::read_to_string(dir.path().join("man/walbridge.1")).unwrap();
        assert!(main.contains(".SH \"EXIT STATUS\""), "{main}");
        assert!(main.contains("\\fBwalbridge\\-setup\\fR(1)"), "{main}");
    }
}
