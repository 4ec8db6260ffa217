//! Records the git commit the binary is built from, for `walbridge --version`.
//!
//! `WALBRIDGE_GIT_COMMIT` in the environment wins (a build from a source tarball can pass it);
//! otherwise `git rev-parse` in the source tree; outside a git checkout, or without git, the
//! commit is "unknown" and the build goes on.
//!
//! The script reruns only when HEAD moves (a commit, a checkout), not on every edit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=WALBRIDGE_GIT_COMMIT");
    let commit = match std::env::var("WALBRIDGE_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_string(),
        _ => from_git().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=WALBRIDGE_GIT_COMMIT={commit}");
}

/// The short commit of HEAD, and rerun triggers on the files that change when HEAD moves.
fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // In a worktree HEAD lives in the worktree's git dir, branches in the common one.
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        watch(&git_dir.join("HEAD"));
        let common = git(&["rev-parse", "--git-common-dir"])
            .map(PathBuf::from)
            .unwrap_or(git_dir);
        if let Some(branch) = git(&["rev-parse", "--symbolic-full-name", "HEAD"]) {
            if branch.starts_with("refs/") {
                watch(&common.join(branch));
            }
        }
        watch(&common.join("packed-refs"));
    }
    Some(commit)
}

/// A rerun trigger on `path` when it exists (a missing path would rerun the script, and so
/// rebuild the crate, on every build).
fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// `git ARGS` in the package's directory: its trimmed stdout, or `None` on any failure.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git")
        .args(args)
        .current_dir(&dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    if text.is_empty() {
        return None;
    }
    // Relative git dirs are relative to where git ran.
    if args.first() == Some(&"rev-parse") && args.get(1).is_some_and(|a| a.starts_with("--git")) {
        let path = PathBuf::from(&text);
        if path.is_relative() {
            return Some(PathBuf::from(dir).join(path).display().to_string());
        }
    }
    Some(text)
}
