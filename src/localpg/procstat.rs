//! CPU time and memory of processes, read from `/proc` (Linux): what the benchmarks divide by
//! the rows replicated (CPU per row of walbridge, a walsender, an applying backend) and what
//! the memory tests bound (peak RSS). The one `/proc` reader of the crate's tools.
//!
//! A PostgreSQL server's CPU is the sum of its backends': [`ServerCpu`] reads each live child
//! of the postmaster, plus the postmaster's own time and what its exited children used (the
//! postmaster waits for every backend it forked, so their time lands in its `cutime`).

use std::collections::HashMap;
use std::path::Path;

/// The fields of `/proc/<pid>/stat` the tools need.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stat {
    /// The parent's pid.
    pub ppid: u32,
    /// User + system CPU of the process (all its threads), seconds.
    pub cpu: f64,
    /// User + system CPU of its children that exited and were waited for, seconds.
    pub children_cpu: f64,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `/proc/<pid>/stat`, or `None` when the process is gone or the file cannot be read.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(
        &std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
        ticks_per_second(),
    )
}

fn parse_stat(text: &str, ticks: f64) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may hold spaces and ')': count from the
    // last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        cpu: (num(11)? + num(12)?) / ticks,
        children_cpu: (num(13)? + num(14)?) / ticks,
    })
}

/// CPU time (user + system, all threads) a process has used so far, in seconds; `None` when
/// the process is gone or the file cannot be read.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    stat(pid).map(|s| s.cpu)
}

/// Every live process whose parent is `parent`, with its stat.
pub fn children(parent: u32) -> HashMap<u32, Stat> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?)))
        .filter(|(_, s)| s.ppid == parent)
        .collect()
}

/// The postmaster's pid of the cluster in `data_dir` (first line of `postmaster.pid`).
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// CPU of a server at one instant: each live backend's own, and the postmaster's own plus what
/// its exited children used.
#[derive(Clone, Debug, Default)]
pub struct ServerCpu {
    /// Live children of the postmaster: pid → CPU seconds.
    pub backends: HashMap<u32, f64>,
    /// The postmaster itself plus its exited children, seconds.
    pub postmaster_and_exited: f64,
}

impl ServerCpu {
    /// Reads the server whose data directory is `data_dir`; empty when it is not running.
    pub fn read(data_dir: &Path) -> ServerCpu {
        let Some(pm) = postmaster_pid(data_dir) else {
            return ServerCpu::default();
        };
        let own = stat(pm).map_or(0.0, |s| s.cpu + s.children_cpu);
        ServerCpu {
            backends: children(pm).into_iter().map(|(p, s)| (p, s.cpu)).collect(),
            postmaster_and_exited: own,
        }
    }

    /// CPU used between `self` (earlier) and `later`, per live backend of `later`, plus the
    /// postmaster's and exited backends' share (from `later`'s point of view, a backend alive
    /// at `self` and gone at `later` is counted there, from the start of its life).
    pub fn delta(&self, later: &ServerCpu) -> (HashMap<u32, f64>, f64) {
        let per: HashMap<u32, f64> = later
            .backends
            .iter()
            .map(|(pid, cpu)| (*pid, cpu - self.backends.get(pid).copied().unwrap_or(0.0)))
            .collect();
        // A backend that exited in between: its CPU before `self` is in both our backend
        // list and `later`'s exited total, so take it out once.
        let gone: f64 = self
            .backends
            .iter()
            .filter(|(pid, _)| !later.backends.contains_key(pid))
            .map(|(_, cpu)| cpu)
            .sum();
        let rest = later.postmaster_and_exited - self.postmaster_and_exited - gone;
        (per, rest.max(0.0))
    }
}

/// Peak resident memory of a process (`VmHWM` of `/proc/<pid>/status`), in kB; 0 when it is
/// gone.
pub fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_counts_fields_from_the_last_parenthesis() {
        // A command name with a space and a ')' in it; 100 ticks per second.
        let line = "4242 (post gres: a) b) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    150 50 30 20 20 0 1 0 1234 0 0";
        let s = parse_stat(line, 100.0).expect("parses");
        assert_eq!(s.ppid, 17);
        assert!((s.cpu - 2.0).abs() < 1e-9, "{}", s.cpu);
        assert!((s.children_cpu - 0.5).abs() < 1e-9, "{}", s.children_cpu);
        assert!(parse_stat("4242 (truncated) S 17", 100.0).is_none());
    }

    #[test]
    fn own_process_is_read() {
        let me = std::process::id();
        assert!(process_cpu_seconds(me).is_some());
        assert!(peak_rss_kb(me) > 0);
        assert!(children(me).values().all(|s| s.ppid == me));
    }
}
