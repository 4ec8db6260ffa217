//! Benchmark-sized tests; nextest runs them one at a time (`test(/^heavy::/)`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use crate::support::*;

const ROWS: u64 = 1_000_000;
/// Peak resident memory allowed to the `walbridge tail` process. The transaction's stream is
/// far larger (about 60 MB of pgoutput messages, about 330 MB of JSON lines): the bound holds
/// only because nothing collects the transaction.
const MAX_RSS_KB: i64 = 64 * 1024;

/// What the reader thread saw on tail's stdout.
#[derive(Debug)]
struct Seen {
    lines: u64,
    inserts: u64,
    bytes: u64,
    first: String,
    last_insert: String,
}

/// One transaction of a million rows, streamed by `walbridge tail` into a pipe: every row
/// comes out, and the tail process's peak RSS (from `wait4`) stays under [`MAX_RSS_KB`].
#[test]
fn million_row_transaction_streams_through_tail_in_bounded_memory() {
    let d = Deployment::new(
        &["a"],
        "CREATE TABLE big (id int PRIMARY KEY, payload text);
         CREATE PUBLICATION walbridge_pub FOR ALL TABLES;",
        "",
    );
    let stderr_path = d.dir.path().join("tail.log");
    let child = Command::new(walbridge_bin())
        .args(["tail", "--node", "a", "--config"])
        .arg(&d.config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn walbridge tail");
    let mut child = Reaped {
        child,
        reaped: false,
    };
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let stdout = child.child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Seen {
            lines: 0,
            inserts: 0,
            bytes: 0,
            first: String::new(),
            last_insert: String::new(),
        };
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            seen.lines += 1;
            seen.bytes += line.len() as u64 + 1;
            if line.starts_with(r#"{"op":"insert""#) {
                seen.inserts += 1;
                if seen.inserts == 1 || seen.inserts == ROWS {
                    seen.last_insert = line;
                }
            } else if line.starts_with(r#"{"op":"begin""#) {
                seen.first = line;
            } else if line.starts_with(r#"{"op":"commit""#) {
                break;
            }
        }
        let _ = tx.send(seen);
    });

    let streaming = wait_until(WAIT, || {
        d.node("a")
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE application_name = 'walbridge-tail-a' AND state = 'streaming'",
            )
            .unwrap_or_default()
            == "1"
    });
    assert!(streaming, "tail never streamed:\n{}", stderr());

    let started = Instant::now();
    d.sql(
        "a",
        &format!("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g"),
    );
    let written = started.elapsed();
    // About 30 s on a busy two-core machine with debug builds; leave room.
    let seen = rx
        .recv_timeout(2 * WAIT)
        .unwrap_or_else(|_| panic!("the transaction did not come through:\n{}", stderr()));
    let streamed = started.elapsed();
    assert!(seen.first.contains(r#""op":"begin""#), "{seen:?}");
    assert_eq!(seen.inserts, ROWS, "{seen:?}");
    assert_eq!(seen.lines, ROWS + 2);
    assert!(
        seen.last_insert
            .contains(&format!(r#""new":{{"id":"{ROWS}","payload":"#)),
        "{}",
        seen.last_insert
    );

    // SIGINT, then reap the child ourselves to read its resource usage.
    // SAFETY: kill and wait4 on the pid of our own child, with valid pointers.
    let pid = child.child.id() as i32;
    let (status, rusage) = unsafe {
        libc::kill(pid, libc::SIGINT);
        let mut status = 0;
        let mut rusage: libc::rusage = std::mem::zeroed();
        let reaped = libc::wait4(pid, &mut status, 0, &mut rusage);
        assert_eq!(reaped, pid, "wait4");
        (status, rusage)
    };
    child.reaped = true;
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "exit status {status}:\n{}",
        stderr()
    );
    let peak_kb = rusage.ru_maxrss; // kilobytes on Linux
    eprintln!(
        "1M-row transaction: insert took {written:.1?}, all {} lines ({:.0} MB of JSON) \
         printed after {streamed:.1?}; tail's peak RSS {:.1} MB, CPU {}.{:03} s user + {}.{:03} s system",
        seen.lines,
        seen.bytes as f64 / 1e6,
        peak_kb as f64 / 1024.0,
        rusage.ru_utime.tv_sec,
        rusage.ru_utime.tv_usec / 1000,
        rusage.ru_stime.tv_sec,
        rusage.ru_stime.tv_usec / 1000,
    );
    assert!(
        peak_kb < MAX_RSS_KB,
        "tail's peak RSS was {peak_kb} kB, above {MAX_RSS_KB} kB"
    );
}

/// The tail process, killed and reaped on drop unless the test reaped it (with `wait4`).
struct Reaped {
    child: std::process::Child,
    reaped: bool,
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
