//! Connection strings in libpq syntax, parsed once and handed to both connection kinds.
//!
//! `tokio_postgres::Config` rejects `sslmode=verify-ca/verify-full` and ignores `sslrootcert`,
//! and the replication client is our own, so walbridge parses libpq key/value and
//! `postgres://` URIs itself and gives the pieces to both. Passwords live in [`Secret`], which
//! never prints.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A password that never appears in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a password.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The password itself, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where to connect: a TCP host name / address, or a Unix socket directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// Host name or IP address.
    Tcp(String),
    /// Directory holding `.s.PGSQL.<port>` (a `host` value starting with `/`).
    Unix(PathBuf),
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first, TLS if the server insists.
    Allow,
    /// TLS if the server offers it, else plain (libpq's default).
    #[default]
    Prefer,
    /// TLS always; certificate checked only when a root certificate is available (as libpq).
    Require,
    /// TLS, certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

/// A parsed connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dsn {
    /// Hosts to try in order (libpq allows a comma-separated list); never empty.
    pub hosts: Vec<Host>,
    /// One port per host (a single port given applies to all hosts).
    pub ports: Vec<u16>,
    /// Role to connect as.
    pub user: String,
    /// Password, when known (see [`Dsn::resolve_password`]).
    pub password: Option<Secret>,
    /// Database name (defaults to the user name, as libpq).
    pub dbname: String,
    /// TLS policy.
    pub sslmode: SslMode,
    /// CA bundle to verify the server against.
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate (PEM).
    pub sslcert: Option<PathBuf>,
    /// Client key (PEM).
    pub sslkey: Option<PathBuf>,
    /// `application_name` asked for in the DSN; walbridge sets its own when empty.
    pub application_name: Option<String>,
    /// Give up connecting after this long.
    pub connect_timeout: Option<Duration>,
    /// Server options (`-c name=value ...`).
    pub options: Option<String>,
    /// `passfile` (defaults to `$PGPASSFILE` or `~/.pgpass` when resolving passwords).
    pub passfile: Option<PathBuf>,
}

/// A connection string could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum DsnError {
    /// Placeholder until the parser lands.
    #[error("{0}")]
    Invalid(String),
}

impl Dsn {
    /// Parses libpq key/value (`host=a port=5432 dbname=app`) or URI (`postgres://u@a/app`).
    pub fn parse(_s: &str) -> Result<Dsn, DsnError> {
        todo!("dsn parser")
    }

    /// Fills `password` when the DSN had none: `password_file`, then `PGPASSWORD`, then the
    /// passfile (`passfile`, `$PGPASSFILE`, `~/.pgpass`).
    pub fn resolve_password(&mut self, _password_file: Option<&Path>) -> Result<(), DsnError> {
        todo!("password resolution")
    }

    /// `user@host:port/dbname` for logs and errors: never the password.
    pub fn describe(&self) -> String {
        todo!("describe")
    }
}
