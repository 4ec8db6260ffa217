//! `walbridge demo`: the README's first command.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::support::*;

#[test]
fn demo_replicates_both_ways_and_cleans_up_on_ctrl_c() {
    let mut child = Command::new(walbridge_bin())
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start walbridge demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut base_dirs = Vec::new();
    let mut converged = false;
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        seen.push(line.clone());
        if let Some(path) = line.trim().strip_prefix("config: ") {
            base_dirs.push(
                std::path::PathBuf::from(path)
                    .parent()
                    .unwrap()
                    .to_path_buf(),
            );
        }
        // "[   3s] east: 65 accounts west: 65 accounts | ..."
        if let Some(rest) = line.strip_prefix('[') {
            let counts: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| w.parse::<u64>().is_ok())
                .collect();
            if counts.len() >= 2
                && counts[0] == counts[1]
                && counts[0] != "0"
                && line.contains("txns")
            {
                converged = true;
                break;
            }
        }
        if seen.len() > 200 {
            break;
        }
    }
    assert!(converged, "demo output:\n{}", seen.join("\n"));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().expect("demo exits");
    assert_eq!(status.code(), Some(0));
    for dir in base_dirs {
        assert!(!dir.exists(), "demo left {dir:?} behind");
    }
}
