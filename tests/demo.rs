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
    let mut ports = Vec::new();
    let mut converged = false;
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        seen.push(line.clone());
        // "east: psql -h DIR -p PORT -U postgres postgres"
        if line.contains(": psql ") {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "-p") {
                ports.push(words[i + 1].parse::<u16>().expect("port"));
            }
        }
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
    // The demo clusters do not trust TCP: a login without the password is refused.
    assert_eq!(ports.len(), 2, "demo output:\n{}", seen.join("\n"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    for port in ports {
        let dsn = walbridge::dsn::Dsn::parse(&format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"
        ))
        .unwrap();
        let refused = rt
            .block_on(walbridge::pgconn::connect(&dsn, "walbridge-test"))
            .err()
            .unwrap_or_else(|| panic!("port {port}: TCP login without a password succeeded"));
        assert!(refused.to_string().contains("password"), "{refused}");
    }
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
