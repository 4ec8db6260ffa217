//! A server shared by the processes of one test run (nextest runs every test in its own
//! process), found again through files in a run directory and stopped when idle.
//!
//! ```text
//!  <tmp>/walbridge-pg-shared-<name>-<major>-<bin>-<uid>-<options>/
//!    users.lock   every process using the server holds a shared lock on it while it does
//!    start.lock   held (exclusive) while a process checks, starts or restarts the server
//!    server/      the cluster: data/, socket, server.log
//!    reaper.pid   the process that stops the server once users.lock has been free for a while
//! ```
//!
//! The reaper (`sh` + util-linux `flock`, in its own process group so that a test's timeout
//! does not take it along) polls once a second for an exclusive lock on `users.lock`; after
//! [`IDLE_SECONDS`] free polls in a row it stops the server and deletes `server/` while still
//! holding that lock, so a process arriving meanwhile waits and then starts a fresh server.
//! A crashed test releases its lock with its process; a server that died, or whose reaper
//! died, is noticed by the next process that acquires it.

use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{
    bin_dir, chown, has_setting, io_err, is_root, postgres_ids, server_major, set_mode,
    ClusterOptions, LocalCluster, LocalPgError,
};

/// How long (seconds) a shared server stays up after its last user left.
pub const IDLE_SECONDS: u32 = 3;

/// The reaper: `$1` run directory, `$2` pg_ctl, `$3` 1 to run it as `postgres`, `$4` idle
/// polls before stopping.
const REAPER: &str = r#"
cd "$1" || exit 0
idle=0
while [ -f server/data/postmaster.pid ]; do
  sleep 1
  if flock -n -E 75 users.lock true; then idle=$((idle + 1)); else idle=0; fi
  [ "$idle" -lt "$4" ] && continue
  flock -n -E 75 users.lock sh -c '
    if [ "$2" = 1 ]; then runuser -u postgres -- "$1" -D server/data -m immediate -w stop
    else "$1" -D server/data -m immediate -w stop; fi
    rm -rf server' reap "$2" "$3" && exit 0
  idle=0
done
"#;

/// A handle on a server shared with the other processes of a test run; see the module
/// documentation. Dropping it releases this process's use; the server stays up for the next
/// user and stops [`IDLE_SECONDS`] after the last one left. Callers keep out of each other's
/// way with their own database (and slot, role, publication names): the server is common.
#[derive(Debug)]
pub struct SharedCluster {
    cluster: LocalCluster,
    /// Holds the shared lock on `users.lock` while this handle lives.
    _lease: fs::File,
}

impl SharedCluster {
    /// The shared server called `name` for these options (a server of the PostgreSQL picked as
    /// for [`LocalCluster::start`]), started if it is not running. `tcp_password` is not
    /// supported (the password would live in one process only).
    pub fn acquire(name: &str, options: &ClusterOptions) -> Result<Self, LocalPgError> {
        if options.tcp_password {
            return Err(LocalPgError::Tool {
                tool: "shared cluster".into(),
                status: "refused".into(),
                output: "tcp_password is not supported for a shared cluster".into(),
            });
        }
        // The reaper needs util-linux flock; without it the server would never be stopped.
        let flock = Command::new("flock")
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !flock.is_ok_and(|s| s.success()) {
            return Err(LocalPgError::NoClient {
                tool: "flock (util-linux), which stops a shared cluster when idle".into(),
            });
        }
        let bin = bin_dir()?;
        let major = server_major(&bin)?;
        let run_as_postgres = is_root();
        let owner = if run_as_postgres {
            Some(postgres_ids()?)
        } else {
            None
        };
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bin.hash(&mut h);
            options.hash(&mut h);
            h.finish()
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        // "walbridge-pg-" in the path: `.ci/run` clears leftovers of interrupted runs by it.
        let run = std::env::temp_dir().join(format!(
            "walbridge-pg-shared-{name}-{major}-{key:016x}-{uid}"
        ));
        match fs::create_dir(&run) {
            Ok(()) => {
                set_mode(&run, 0o700)?;
                if let Some((uid, gid)) = owner {
                    chown(&run, uid, gid)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("cannot create", &run)(e)),
        }

        let lease = open_lock(&run.join("users.lock"))?;
        lease
            .lock_shared()
            .map_err(io_err("cannot lock", &run.join("users.lock")))?;
        let start = open_lock(&run.join("start.lock"))?;
        start
            .lock()
            .map_err(io_err("cannot lock", &run.join("start.lock")))?;

        let server = run.join("server");
        let cluster = match running_port(&server) {
            Some(port) => {
                if !reaper_alive(&run) {
                    spawn_reaper(&run, &bin, run_as_postgres)?;
                }
                LocalCluster {
                    base: server.clone(),
                    data: server.join("data"),
                    plugin_allowlist: has_setting(&bin, "output_plugin_libraries"),
                    bin,
                    major,
                    port,
                    run_as_postgres,
                    running: true,
                    owned: false,
                    keep: true,
                    password: None,
                    server_env: options.server_env.clone(),
                }
            }
            None => {
                // Dead or never started: whatever is left goes, a fresh server takes its place.
                if server.join("data").is_dir() {
                    let _ = super::run_pg_tool(
                        &bin,
                        "pg_ctl",
                        &[
                            "-D",
                            &server.join("data").to_string_lossy(),
                            "-m",
                            "immediate",
                            "-w",
                            "stop",
                        ],
                        run_as_postgres,
                        &[],
                    );
                }
                let _ = fs::remove_dir_all(&server);
                fs::create_dir(&server).map_err(io_err("cannot create", &server))?;
                set_mode(&server, 0o700)?;
                let mut cluster = LocalCluster::start_in(server, options)?;
                cluster.owned = false;
                spawn_reaper(&run, &cluster.bin, run_as_postgres)?;
                cluster
            }
        };
        drop(start);
        Ok(SharedCluster {
            cluster,
            _lease: lease,
        })
    }
}

impl std::ops::Deref for SharedCluster {
    type Target = LocalCluster;

    fn deref(&self) -> &LocalCluster {
        &self.cluster
    }
}

fn open_lock(path: &Path) -> Result<fs::File, LocalPgError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("cannot open", path))
}

/// The port of the server in `server/` when its postmaster is alive.
fn running_port(server: &Path) -> Option<u16> {
    // postmaster.pid: line 1 the postmaster's pid, line 4 its port.
    let pid_file = fs::read_to_string(server.join("data").join("postmaster.pid")).ok()?;
    let mut lines = pid_file.lines();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    let port: u16 = lines.nth(2)?.trim().parse().ok()?;
    (process_alive(pid)
        && std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            std::time::Duration::from_secs(2),
        )
        .is_ok())
    .then_some(port)
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn reaper_alive(run: &Path) -> bool {
    fs::read_to_string(run.join("reaper.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .is_some_and(process_alive)
}

fn spawn_reaper(run: &Path, bin: &Path, as_postgres: bool) -> Result<(), LocalPgError> {
    let log = run.join("reaper.log");
    let log_file = fs::File::create(&log).map_err(io_err("cannot write", &log))?;
    let child = Command::new("sh")
        .arg("-c")
        .arg(REAPER)
        .arg("walbridge-pg-reaper")
        .arg(run)
        .arg(bin.join("pg_ctl"))
        .arg(if as_postgres { "1" } else { "0" })
        .arg(IDLE_SECONDS.to_string())
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATA")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        // Its own process group: a test runner that kills a timed-out test's group leaves it.
        .process_group(0)
        .spawn()
        .map_err(io_err("cannot start the reaper in", run))?;
    let pid_path: PathBuf = run.join("reaper.pid");
    fs::write(&pid_path, format!("{}\n", child.id())).map_err(io_err("cannot write", &pid_path))
}
