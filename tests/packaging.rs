//! What the Debian package ships besides the binary: `--version`, and the man pages and shell
//! completions generated from the command line (they must say what `--help` says). No database
//! is needed.

use std::collections::BTreeSet;
use std::process::Command;

use clap::CommandFactory as _;

use crate::support::walbridge_bin;

fn run(args: &[&str]) -> String {
    let out = Command::new(walbridge_bin())
        .args(args)
        .env_remove("WALBRIDGE_CONFIG")
        .output()
        .expect("run walbridge");
    assert!(out.status.success(), "walbridge {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn version_prints_release_commit_and_server_versions() {
    let text = run(&["--version"]);
    assert!(
        text.starts_with(&format!("walbridge {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains("PostgreSQL servers 15 to 18"), "{text}");
    let commit = text
        .lines()
        .find_map(|l| l.strip_prefix("commit "))
        .unwrap_or_else(|| panic!("no commit line: {text}"));
    // Built from a git checkout, the commit is one of this repository's (the one checked out
    // when the build script last ran); outside a checkout there is nothing to compare with.
    let in_checkout = Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .is_ok_and(|o| o.status.success());
    if in_checkout {
        let known = Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(known, "commit {commit:?} is not in this repository");
    }
    // -V is one line with the same commit.
    let short = run(&["-V"]);
    assert_eq!(short.lines().count(), 1, "{short}");
    assert!(short.contains(commit), "{short}");
}

/// The subcommands `walbridge --help` lists.
fn subcommands_in_help() -> Vec<String> {
    let help = run(&["--help"]);
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// The long flags `walbridge <sub> --help` lists.
fn flags_in_help(sub: &str) -> BTreeSet<String> {
    run(&[sub, "--help"])
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .collect()
}

#[test]
fn man_pages_and_completions_cover_every_subcommand_and_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    walbridge::assets::generate(walbridge::cli::Cli::command(), dir.path()).expect("generate");
    let subs = subcommands_in_help();
    assert!(subs.len() >= 8, "subcommands in --help: {subs:?}");
    let read = |rel: &str| {
        std::fs::read_to_string(dir.path().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    };
    let root = read("man/walbridge.1");
    let bash = read("completions/walbridge.bash");
    let zsh = read("completions/_walbridge");
    let fish = read("completions/walbridge.fish");
    assert!(zsh.starts_with("#compdef walbridge"), "{zsh}");
    for sub in &subs {
        let page = read(&format!("man/walbridge-{sub}.1"));
        // roff escapes '-' as "\-".
        assert!(
            root.contains(&format!("walbridge\\-{}(1)", sub.replace('-', "\\-"))),
            "walbridge(1) does not list {sub}"
        );
        let flags = flags_in_help(sub);
        assert!(flags.contains("--config"), "{sub} --help: {flags:?}");
        for flag in flags {
            let roff = flag.replace('-', "\\-");
            assert!(page.contains(&roff), "walbridge-{sub}(1) lacks {flag}");
            assert!(bash.contains(&flag), "bash completion lacks {sub} {flag}");
            assert!(zsh.contains(&flag), "zsh completion lacks {sub} {flag}");
            let bare = flag.trim_start_matches('-');
            assert!(
                fish.contains(&format!("-l {bare}")),
                "fish completion lacks {sub} {flag}"
            );
        }
        assert!(fish.contains(&format!("\"{sub}\"")), "fish lacks {sub}");
    }
}
