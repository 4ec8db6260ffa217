//! Connection strings in libpq syntax, parsed once and handed to both connection kinds.
//!
//! `tokio_postgres::Config` rejects `sslmode=verify-ca/verify-full` and ignores `sslrootcert`,
//! and the replication client is our own, so walbridge parses libpq key/value and
//! `postgres://` URIs itself and gives the pieces to both. Passwords live in [`Secret`], which
//! never prints.
//!
//! Error messages never contain the password. A connection string that is malformed may not
//! be split where its author meant, so any fragment that might belong to a password (anything
//! after an unquoted `password=` value, or before the last `@` of a URI) is hidden from error
//! messages rather than quoted.
//!
//! Defaults follow libpq: `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGUSER`, `PGDATABASE`,
//! `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`,
//! `PGOPTIONS`, `PGPASSFILE` and `PGTARGETSESSIONATTRS` fill what the string leaves out.
//!
//! A node may be a primary with physical standbys: `host=p,s port=5432,5433
//! target_session_attrs=read-write` (or `postgres://p:5432,s:5433/app?target_session_attrs=...`)
//! tries the hosts in order and keeps the first whose state matches, as libpq does; after a
//! promotion the next reconnect finds the new primary:
//!
//! ```text
//!  host p ── connect ── state matches? ── yes ──▶ use it
//!                              │ no (standby, or read-only)
//!  host s ── connect ── state matches? ── ...
//! ```

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
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

impl fmt::Display for Host {
    /// Host names as given, IPv6 addresses in brackets, socket directories as paths.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) if h.contains(':') => write!(f, "[{h}]"),
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
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

impl SslMode {
    /// The libpq spelling (`verify-full`), for messages and round trips.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = DsnError;

    fn from_str(s: &str) -> Result<Self, DsnError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(DsnError::InvalidValue {
                    key: "sslmode".into(),
                    value: Some(s.to_string()),
                    expected: "one of disable, allow, prefer, require, verify-ca, verify-full",
                })
            }
        })
    }
}

/// `target_session_attrs`: the server state a host must be in for walbridge to use it.
///
/// As libpq: hosts are tried in order and the first that matches is used; `prefer-standby`
/// tries every host for a standby first, then every host again for any server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// Any server.
    #[default]
    Any,
    /// A server that accepts writes by default: not in hot standby and
    /// `default_transaction_read_only` off.
    ReadWrite,
    /// The opposite of `read-write`.
    ReadOnly,
    /// A server that is not in recovery.
    Primary,
    /// A server in recovery (hot standby).
    Standby,
    /// A standby if one of the hosts is, else any server.
    PreferStandby,
}

/// What a connected server said about itself, for [`TargetSessionAttrs::accepts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerState {
    /// In recovery (`in_hot_standby`, `pg_is_in_recovery()`).
    pub in_hot_standby: bool,
    /// `default_transaction_read_only` is on.
    pub default_read_only: bool,
}

impl TargetSessionAttrs {
    /// The value as written in a connection string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
            Self::Primary => "primary",
            Self::Standby => "standby",
            Self::PreferStandby => "prefer-standby",
        }
    }

    /// The requirement of each pass over the hosts, in order: `prefer-standby` makes two
    /// (standby, then any), every other value one.
    pub fn passes(self) -> &'static [TargetSessionAttrs] {
        match self {
            Self::Any => &[Self::Any],
            Self::ReadWrite => &[Self::ReadWrite],
            Self::ReadOnly => &[Self::ReadOnly],
            Self::Primary => &[Self::Primary],
            Self::Standby => &[Self::Standby],
            Self::PreferStandby => &[Self::Standby, Self::Any],
        }
    }

    /// Whether a server in `state` may be used (`Any` needs no state at all).
    pub fn accepts(self, state: ServerState) -> bool {
        let read_only = state.in_hot_standby || state.default_read_only;
        match self {
            Self::Any => true,
            Self::ReadWrite => !read_only,
            Self::ReadOnly => read_only,
            Self::Primary => !state.in_hot_standby,
            Self::Standby | Self::PreferStandby => state.in_hot_standby,
        }
    }

    /// Why a server in `state` was passed over, as the end of a sentence naming the host.
    pub fn refusal(self, state: ServerState) -> String {
        let what = if state.in_hot_standby {
            "is a standby (in recovery)"
        } else if state.default_read_only {
            "is read-only (default_transaction_read_only is on)"
        } else {
            "is a primary that accepts writes"
        };
        format!(
            "the server {what}, not what target_session_attrs={} asks for (walbridge keeps \
             retrying: after a promotion the hosts are tried again)",
            self.as_str()
        )
    }
}

impl FromStr for TargetSessionAttrs {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "any" => Self::Any,
            "read-write" => Self::ReadWrite,
            "read-only" => Self::ReadOnly,
            "primary" => Self::Primary,
            "standby" => Self::Standby,
            "prefer-standby" => Self::PreferStandby,
            _ => return Err(()),
        })
    }
}

/// libpq's `channel_binding`: whether SCRAM binds the session to the server's TLS
/// certificate (`SCRAM-SHA-256-PLUS` with `tls-server-end-point`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind.
    Disable,
    /// Bind when the session is TLS and the server offers it (libpq's default).
    #[default]
    Prefer,
    /// Only accept SCRAM with channel binding: refuse any other authentication (or none).
    Require,
}

impl ChannelBinding {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }
}

impl FromStr for ChannelBinding {
    type Err = DsnError;

    fn from_str(s: &str) -> Result<Self, DsnError> {
        Ok(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            _ => {
                return Err(DsnError::InvalidValue {
                    key: "channel_binding".into(),
                    value: Some(s.to_string()),
                    expected: "one of disable, prefer, require",
                })
            }
        })
    }
}

/// An authentication method a server may ask for, as `require_auth` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// Cleartext password (`password`).
    Password,
    /// MD5 challenge (`md5`).
    Md5,
    /// SCRAM-SHA-256, with or without channel binding (`scram-sha-256`).
    ScramSha256,
    /// GSSAPI (`gss`; walbridge does not implement it, so it fails anyway).
    Gss,
    /// SSPI (`sspi`; likewise).
    Sspi,
    /// No authentication at all: the server let us in without asking (`none`).
    None,
}

impl AuthMethod {
    const ALL: [AuthMethod; 6] = [
        AuthMethod::Password,
        AuthMethod::Md5,
        AuthMethod::ScramSha256,
        AuthMethod::Gss,
        AuthMethod::Sspi,
        AuthMethod::None,
    ];

    /// The `require_auth` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
            AuthMethod::None => "none",
        }
    }

    /// What the server asked for, in words.
    pub fn describe(self) -> &'static str {
        match self {
            AuthMethod::Password => "a cleartext password",
            AuthMethod::Md5 => "an MD5 password",
            AuthMethod::ScramSha256 => "SCRAM-SHA-256 authentication",
            AuthMethod::Gss => "GSSAPI authentication",
            AuthMethod::Sspi => "SSPI authentication",
            AuthMethod::None => "no authentication at all",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// libpq's `require_auth` (PostgreSQL 16 semantics): the authentication methods the client
/// accepts. A comma list of `password`, `md5`, `scram-sha-256`, `gss`, `sspi`, `none`, or the
/// same all prefixed with `!` to accept everything except those.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequireAuth {
    allowed: u8,
    text: String,
}

impl RequireAuth {
    /// Whether the server may use `method`.
    pub fn allows(&self, method: AuthMethod) -> bool {
        self.allowed & method.bit() != 0
    }

    /// The setting as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for RequireAuth {
    type Err = DsnError;

    fn from_str(s: &str) -> Result<Self, DsnError> {
        let bad = |why: String| DsnError::RequireAuth {
            value: s.to_string(),
            why,
        };
        let mut listed = 0u8;
        let mut negated: Option<bool> = None;
        for item in s.split(',') {
            let (neg, name) = match item.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, item),
            };
            let method = AuthMethod::ALL
                .into_iter()
                .find(|m| m.as_str() == name)
                .ok_or_else(|| {
                    bad(format!(
                        "unknown method {name:?}; use password, md5, scram-sha-256, gss, sspi \
                         or none, each optionally prefixed with !"
                    ))
                })?;
            if negated.is_some_and(|n| n != neg) {
                return Err(bad(
                    "negative methods (with !) cannot be mixed with positive ones".into(),
                ));
            }
            negated = Some(neg);
            if listed & method.bit() != 0 {
                return Err(bad(format!("method {name:?} is listed twice")));
            }
            listed |= method.bit();
        }
        let everything = AuthMethod::ALL.iter().fold(0, |acc, m| acc | m.bit());
        let allowed = if negated == Some(true) {
            everything & !listed
        } else {
            listed
        };
        Ok(RequireAuth {
            allowed,
            text: s.to_string(),
        })
    }
}

/// The server asked for an authentication method the connection string rules out
/// (`require_auth`, or `channel_binding=require`). Raised before anything is sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", refusal_text(*.method, .setting))]
pub struct AuthRefused {
    /// What the server asked for.
    pub method: AuthMethod,
    /// The setting that forbids it, as `key=value`.
    pub setting: String,
}

fn refusal_text(method: AuthMethod, setting: &str) -> String {
    let key = setting.split('=').next().unwrap_or(setting);
    match method {
        AuthMethod::None => format!(
            "the server let us in without any authentication (trust), which {setting} does not \
             allow; configure password authentication (scram-sha-256) for this user in \
             pg_hba.conf, or change {key}"
        ),
        _ => format!(
            "the server asked for {}, which {setting} does not allow, so no password was sent; \
             use scram-sha-256 for this user in pg_hba.conf (and password_encryption), or \
             change {key}",
            method.describe()
        ),
    }
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
    /// Give up connecting after this long (default [`DEFAULT_CONNECT_TIMEOUT`]; `None` when
    /// the DSN says `connect_timeout=0`: wait forever, as libpq).
    pub connect_timeout: Option<Duration>,
    /// TCP keepalives and `tcp_user_timeout`: how the kernel notices a dead peer.
    pub tcp: TcpSettings,
    /// Server options (`-c name=value ...`).
    pub options: Option<String>,
    /// `passfile` (defaults to `$PGPASSFILE` or `~/.pgpass` when resolving passwords).
    pub passfile: Option<PathBuf>,
    /// SCRAM channel binding policy.
    pub channel_binding: ChannelBinding,
    /// Accepted authentication methods; `None` accepts any the client implements.
    pub require_auth: Option<RequireAuth>,
    /// `target_session_attrs`: which server state a host must be in to be used.
    pub target_session_attrs: TargetSessionAttrs,
}

/// A connection string could not be understood, or a password could not be read.
///
/// Messages never contain the password; fragments that might be part of it are replaced by
/// a note saying they were hidden.
#[derive(Debug, thiserror::Error)]
pub enum DsnError {
    /// The text is not valid key/value or URI syntax.
    #[error("invalid connection string: {0}")]
    Syntax(String),
    /// A key that neither libpq nor walbridge knows.
    #[error(
        "invalid connection string: unknown option {0}; valid options are host, hostaddr, port, \
         user, password, dbname, sslmode, sslrootcert, sslcert, sslkey, application_name, \
         connect_timeout, options, passfile, channel_binding, require_auth, keepalives, \
         keepalives_idle, keepalives_interval, keepalives_count, tcp_user_timeout, \
         target_session_attrs"
    )]
    UnknownKey(String),
    /// `require_auth` is not a valid method list.
    #[error("invalid connection string: invalid require_auth value {value:?}: {why}")]
    RequireAuth {
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A libpq option walbridge does not implement.
    #[error(
        "invalid connection string: option {0} is a libpq option that walbridge does not \
         support; remove it"
    )]
    UnsupportedKey(String),
    /// A known key with a value it cannot take.
    #[error("invalid connection string: invalid {key} value {shown}: expected {expected}", shown = show_value(.value))]
    InvalidValue {
        /// The option (or environment variable) name.
        key: String,
        /// The offending value, `None` when it is hidden because it may hold the password.
        value: Option<String>,
        /// What the key accepts.
        expected: &'static str,
    },
    /// `port` lists a different number of ports than `host` lists hosts.
    #[error(
        "invalid connection string: could not match {ports} port numbers to {hosts} hosts; give \
         one port for all hosts or one per host"
    )]
    PortCount {
        /// Ports given.
        ports: usize,
        /// Hosts given.
        hosts: usize,
    },
    /// `password_file` could not be read.
    #[error("cannot read password file {}: {source}", path.display())]
    PasswordFile {
        /// The file named by `password_file`.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// `password_file` may be read by other users.
    #[error(
        "password file {} may be read by other users (mode {mode:04o}); allow only its owner: \
         chmod 600 it (for a Kubernetes secret volume, set defaultMode: 0400)",
        path.display()
    )]
    PasswordFileMode {
        /// The file named by `password_file`.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A value could not be expanded (`${ENV}` interpolation).
    #[error("invalid connection string: in the {key} value: {source}")]
    Expand {
        /// The option whose value failed.
        key: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `password_file` exists but holds no password.
    #[error("password file {} is empty; write the password on its first line", .0.display())]
    EmptyPasswordFile(PathBuf),
}

fn show_value(v: &Option<String>) -> String {
    match v {
        Some(v) => format!("{v:?}"),
        None => "(hidden because it may be part of the password; quote the password)".into(),
    }
}

/// Where defaults come from: the process environment in production, a fixed map in tests.
pub(crate) trait Environment {
    /// An environment variable, `None` when unset or empty.
    fn var(&self, key: &str) -> Option<String>;
    /// The user's home directory.
    fn home(&self) -> Option<PathBuf>;
    /// The operating-system user name (libpq's default role name).
    fn os_user(&self) -> Option<String>;
    /// Whether a path exists.
    fn exists(&self, p: &Path) -> bool;
}

/// The real process environment.
struct SystemEnv;

impl Environment for SystemEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }

    fn home(&self) -> Option<PathBuf> {
        self.var("HOME")
            .map(PathBuf::from)
            .or_else(|| passwd_entry().map(|(_, home)| home))
    }

    fn os_user(&self) -> Option<String> {
        passwd_entry()
            .map(|(name, _)| name)
            .or_else(|| self.var("USER"))
            .or_else(|| self.var("LOGNAME"))
    }

    fn exists(&self, p: &Path) -> bool {
        p.exists()
    }
}

/// The effective user's name and home directory from the password database, as libpq does.
fn passwd_entry() -> Option<(String, PathBuf)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;

    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `passwd` is a plain C struct of pointers and integers; all-zero is a valid value
    // that getpwuid_r overwrites.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live, correctly sized storage owned by this frame;
    // getpwuid_r writes only within `buf` (of the length we pass) and `pwd`.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name and pw_dir point to NUL-terminated strings inside `buf`,
    // which outlives these borrows.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    let home = if pwd.pw_dir.is_null() {
        PathBuf::new()
    } else {
        // SAFETY: as above.
        PathBuf::from(std::ffi::OsStr::from_bytes(
            unsafe { CStr::from_ptr(pwd.pw_dir) }.to_bytes(),
        ))
    };
    Some((name, home))
}

/// libpq's compiled-in Unix socket directory on Debian-family systems.
const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// libpq's default port.
const DEFAULT_PORT: u16 = 5432;

/// Options libpq knows that walbridge does not implement (a clearer error than "unknown").
const UNSUPPORTED_LIBPQ_KEYS: &[&str] = &[
    "service",
    "client_encoding",
    "fallback_application_name",
    "replication",
    "gssencmode",
    "requiressl",
    "sslcompression",
    "sslpassword",
    "sslcertmode",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslnegotiation",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "load_balance_hosts",
];

/// Raw option values as written, before defaults; later assignments win, as in libpq.
#[derive(Default)]
struct Raw {
    host: Option<String>,
    hostaddr: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<String>,
    options: Option<String>,
    passfile: Option<String>,
    channel_binding: Option<String>,
    require_auth: Option<String>,
    keepalives: Option<String>,
    keepalives_idle: Option<String>,
    keepalives_interval: Option<String>,
    keepalives_count: Option<String>,
    tcp_user_timeout: Option<String>,
    target_session_attrs: Option<String>,
}

impl Raw {
    /// Every value given, with its key.
    fn values_mut(&mut self) -> [(&'static str, &mut Option<String>); 22] {
        [
            ("host", &mut self.host),
            ("hostaddr", &mut self.hostaddr),
            ("port", &mut self.port),
            ("user", &mut self.user),
            ("password", &mut self.password),
            ("dbname", &mut self.dbname),
            ("sslmode", &mut self.sslmode),
            ("sslrootcert", &mut self.sslrootcert),
            ("sslcert", &mut self.sslcert),
            ("sslkey", &mut self.sslkey),
            ("application_name", &mut self.application_name),
            ("connect_timeout", &mut self.connect_timeout),
            ("options", &mut self.options),
            ("passfile", &mut self.passfile),
            ("channel_binding", &mut self.channel_binding),
            ("require_auth", &mut self.require_auth),
            ("keepalives", &mut self.keepalives),
            ("keepalives_idle", &mut self.keepalives_idle),
            ("keepalives_interval", &mut self.keepalives_interval),
            ("keepalives_count", &mut self.keepalives_count),
            ("tcp_user_timeout", &mut self.tcp_user_timeout),
            ("target_session_attrs", &mut self.target_session_attrs),
        ]
    }

    /// Passes each value (already unquoted / percent-decoded) through `expand`.
    fn expand<E>(&mut self, expand: &dyn Fn(&str) -> Result<String, E>) -> Result<(), DsnError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        for (key, slot) in self.values_mut() {
            if let Some(v) = slot.as_mut() {
                *v = expand(v).map_err(|e| DsnError::Expand {
                    key,
                    source: Box::new(e),
                })?;
            }
        }
        Ok(())
    }
}

/// Hides input fragments that might be part of a password from error messages.
struct Redactor<'a> {
    input: &'a str,
    unsafe_ranges: Vec<Range<usize>>,
}

impl<'a> Redactor<'a> {
    fn new(input: &'a str) -> Self {
        Redactor {
            input,
            unsafe_ranges: Vec::new(),
        }
    }

    /// Byte range of `frag` inside the input (`frag` must be a slice of it).
    fn range_of(&self, frag: &str) -> Range<usize> {
        let base = self.input.as_ptr() as usize;
        let start = (frag.as_ptr() as usize).saturating_sub(base);
        start..start + frag.len()
    }

    fn hide(&mut self, r: Range<usize>) {
        self.unsafe_ranges.push(r);
    }

    /// `shown` (usually `frag` decoded) if `frag` lies clear of every password region.
    fn show(&self, frag: &str, shown: &str) -> Option<String> {
        let r = self.range_of(frag);
        let overlaps = self.unsafe_ranges.iter().any(|u| {
            // Empty fragments at a region's edge still count as inside.
            r.start < u.end.max(u.start + 1) && u.start < r.end.max(r.start + 1)
        });
        (!overlaps).then(|| shown.to_string())
    }

    fn syntax(&self, what: &str, frag: &str) -> DsnError {
        match self.show(frag, frag) {
            Some(f) => DsnError::Syntax(format!("{what}: {f:?}")),
            None => DsnError::Syntax(format!(
                "{what} (text hidden because it may be part of the password; quote or \
                 percent-encode the password)"
            )),
        }
    }
}

impl Raw {
    /// Stores one option, rejecting unknown keys.
    fn set(
        &mut self,
        key: &str,
        value: String,
        key_frag: &str,
        red: &Redactor<'_>,
    ) -> Result<(), DsnError> {
        let slot = match key {
            "host" => &mut self.host,
            "hostaddr" => &mut self.hostaddr,
            "port" => &mut self.port,
            "user" => &mut self.user,
            "password" => &mut self.password,
            "dbname" => &mut self.dbname,
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "application_name" => &mut self.application_name,
            "connect_timeout" => &mut self.connect_timeout,
            "options" => &mut self.options,
            "passfile" => &mut self.passfile,
            "channel_binding" => &mut self.channel_binding,
            "require_auth" => &mut self.require_auth,
            "keepalives" => &mut self.keepalives,
            "keepalives_idle" => &mut self.keepalives_idle,
            "keepalives_interval" => &mut self.keepalives_interval,
            "keepalives_count" => &mut self.keepalives_count,
            "tcp_user_timeout" => &mut self.tcp_user_timeout,
            "target_session_attrs" => &mut self.target_session_attrs,
            _ => {
                let shown = red
                    .show(key_frag, key)
                    .map(|k| format!("{k:?}"))
                    .unwrap_or_else(|| {
                        "(name hidden because it follows the password and may be part of it; \
                         quote the password)"
                            .into()
                    });
                return Err(if UNSUPPORTED_LIBPQ_KEYS.contains(&key) {
                    DsnError::UnsupportedKey(shown)
                } else {
                    DsnError::UnknownKey(shown)
                });
            }
        };
        *slot = Some(value);
        Ok(())
    }
}

impl Dsn {
    /// Parses libpq key/value (`host=a port=5432 dbname=app`) or URI (`postgres://u@a/app`).
    pub fn parse(s: &str) -> Result<Dsn, DsnError> {
        Self::parse_with(s, &SystemEnv)
    }

    /// [`Dsn::parse`], then each value goes through `expand` (for `${ENV}` interpolation).
    ///
    /// Expansion happens after the string is split into keys and values, so an expanded value
    /// stays one value whatever it contains: spaces, quotes, `&` or `@` in an environment
    /// variable cannot add or change other options.
    pub fn parse_expanding<E>(
        s: &str,
        expand: &dyn Fn(&str) -> Result<String, E>,
    ) -> Result<Dsn, DsnError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::parse_expanding_with(s, expand, &SystemEnv)
    }

    /// [`Dsn::parse`] with defaults taken from `env`.
    pub(crate) fn parse_with(s: &str, env: &dyn Environment) -> Result<Dsn, DsnError> {
        Self::parse_expanding_with(
            s,
            &|v| Ok::<_, std::convert::Infallible>(v.to_string()),
            env,
        )
    }

    fn parse_expanding_with<E>(
        s: &str,
        expand: &dyn Fn(&str) -> Result<String, E>,
        env: &dyn Environment,
    ) -> Result<Dsn, DsnError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let trimmed = s.trim_start();
        let (mut raw, red) =
            if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
                parse_uri(s)?
            } else {
                parse_key_value(s)?
            };
        raw.expand(expand)?;
        build(raw, &red, env)
    }

    /// Fills `password` when the DSN had none: `password_file`, then `PGPASSWORD`, then the
    /// passfile (`passfile`, `$PGPASSFILE`, `~/.pgpass`).
    pub fn resolve_password(&mut self, password_file: Option<&Path>) -> Result<(), DsnError> {
        self.resolve_password_with(password_file, &SystemEnv)
    }

    /// [`Dsn::resolve_password`] with the environment taken from `env`.
    pub(crate) fn resolve_password_with(
        &mut self,
        password_file: Option<&Path>,
        env: &dyn Environment,
    ) -> Result<(), DsnError> {
        if self.password.is_some() {
            return Ok(());
        }
        if let Some(path) = password_file {
            check_password_file_mode(path)?;
            let text = std::fs::read_to_string(path).map_err(|source| DsnError::PasswordFile {
                path: path.to_path_buf(),
                source,
            })?;
            let first = text.lines().next().unwrap_or("");
            if first.is_empty() {
                return Err(DsnError::EmptyPasswordFile(path.to_path_buf()));
            }
            self.password = Some(Secret::new(first));
            return Ok(());
        }
        if let Some(pw) = env.var("PGPASSWORD") {
            self.password = Some(Secret::new(pw));
            return Ok(());
        }
        let passfile = self
            .passfile
            .clone()
            .or_else(|| env.var("PGPASSFILE").map(PathBuf::from))
            .or_else(|| env.home().map(|h| h.join(".pgpass")));
        if let Some(path) = passfile {
            if let Some(pw) = self.password_from_passfile(&path) {
                self.password = Some(pw);
            }
        }
        Ok(())
    }

    /// The first passfile entry matching any of our hosts (in host order), like libpq.
    fn password_from_passfile(&self, path: &Path) -> Option<Secret> {
        use std::os::unix::fs::PermissionsExt;

        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read password file; ignoring it");
                return None;
            }
        };
        if !meta.is_file() {
            tracing::warn!(file = %path.display(), "password file is not a plain file; ignoring it");
            return None;
        }
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                "password file has group or world access; permissions should be u=rw (0600) or \
                 less; ignoring it"
            );
            return None;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read password file; ignoring it");
                return None;
            }
        };
        self.hosts.iter().enumerate().find_map(|(i, host)| {
            let hostname = match host {
                Host::Tcp(h) => h.clone(),
                Host::Unix(p) if p == Path::new(DEFAULT_SOCKET_DIR) => "localhost".to_string(),
                Host::Unix(p) => p.display().to_string(),
            };
            let port = self.port_for(i).to_string();
            passfile_lookup(&text, &hostname, &port, &self.dbname, &self.user)
        })
    }

    /// The port to use with `hosts[i]`.
    pub fn port_for(&self, i: usize) -> u16 {
        match self.ports.as_slice() {
            [] => DEFAULT_PORT,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(DEFAULT_PORT),
        }
    }

    /// Every (host, port) pair to try, in order.
    pub fn addresses(&self) -> Vec<(Host, u16)> {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.clone(), self.port_for(i)))
            .collect()
    }

    /// `user@host:port/dbname` for logs and errors: never the password.
    pub fn describe(&self) -> String {
        let hosts = self
            .addresses()
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        format!("{}@{}/{}", self.user, hosts, self.dbname)
    }

    /// [`Dsn::describe`] for one of the hosts, as named in per-address connection errors.
    pub fn describe_host(&self, i: usize) -> String {
        match self.hosts.get(i) {
            Some(h) => format!("{}@{}:{}/{}", self.user, h, self.port_for(i), self.dbname),
            None => self.describe(),
        }
    }
}

/// Refuses a `password_file` that users other than its owner may read.
///
/// The rule is libpq's for private keys: no group or other access at all, except that a file
/// owned by root may be group-readable (a secret managed by the system, read through a group).
/// A `.pgpass` with loose permissions is ignored with a warning instead, as libpq does.
fn check_password_file_mode(path: &Path) -> Result<(), DsnError> {
    use std::os::unix::fs::MetadataExt;

    let meta = std::fs::metadata(path).map_err(|source| DsnError::PasswordFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    let loose = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if loose {
        return Err(DsnError::PasswordFileMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Looks `host:port:db:user` up in `.pgpass` text; `*` matches any value, `\` escapes.
fn passfile_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<Secret> {
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.chars();
        let mut cur_is_star = true;
        while let Some(c) = chars.next() {
            if fields.len() == 4 {
                // The password: the rest of the line, backslashes removed before any char.
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            cur.push(n);
                        }
                    }
                    _ => cur.push(c),
                }
                continue;
            }
            match c {
                '\\' => {
                    cur_is_star = false;
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' => {
                    let wildcard = cur_is_star && cur == "*";
                    fields.push((std::mem::take(&mut cur), wildcard));
                    cur_is_star = true;
                }
                _ => cur.push(c),
            }
        }
        if fields.len() < 4 {
            continue;
        }
        let wanted = [host, port, db, user];
        let matches = fields
            .iter()
            .zip(wanted)
            .all(|((field, wildcard), want)| *wildcard || field == want);
        if matches {
            return Some(Secret::new(cur));
        }
    }
    None
}

/// Parses `key=value key='quoted value'` (libpq's conninfo syntax).
fn parse_key_value(s: &str) -> Result<(Raw, Redactor<'_>), DsnError> {
    let mut red = Redactor::new(s);
    let mut raw = Raw::default();
    let bytes = s.as_bytes();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= bytes.len() {
            break;
        }
        let key_start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[key_start..i];
        i = skip_ws(i);
        if i >= bytes.len() || bytes[i] != b'=' {
            return Err(red.syntax("missing \"=\" after an option name", key));
        }
        i = skip_ws(i + 1);
        let value_start = i;
        let mut value = String::new();
        let mut closed_quote = false;
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                let Some(c) = s[i..].chars().next() else {
                    if key == "password" {
                        red.hide(value_start..s.len());
                    }
                    return Err(red.syntax("unterminated quoted value", &s[value_start..]));
                };
                i += c.len_utf8();
                match c {
                    '\\' => {
                        if let Some(n) = s[i..].chars().next() {
                            value.push(n);
                            i += n.len_utf8();
                        }
                    }
                    // `''` inside quotes is a literal quote (SQL style; libpq rejects it, so
                    // accepting it changes no valid string's meaning).
                    '\'' if s[i..].starts_with('\'') => {
                        value.push('\'');
                        i += 1;
                    }
                    '\'' => {
                        closed_quote = true;
                        break;
                    }
                    _ => value.push(c),
                }
            }
        } else {
            while let Some(c) = s[i..].chars().next() {
                if c.is_ascii_whitespace() {
                    break;
                }
                i += c.len_utf8();
                if c == '\\' {
                    if let Some(n) = s[i..].chars().next() {
                        value.push(n);
                        i += n.len_utf8();
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key == "password" {
            // A quoted password ends where the author meant; an unquoted one may have been
            // cut short by a space, so everything after it might be password too.
            let end = if closed_quote { i } else { s.len() };
            red.hide(value_start..end);
        }
        raw.set(key, value, key, &red)?;
    }
    Ok((raw, red))
}

/// Decodes `%XX` escapes; `None` on a malformed escape, `%00`, or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let hex = std::str::from_utf8(hex).ok()?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            if v == 0 {
                return None;
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `postgres[ql]://[user[:password]@][host[:port][,...]][/dbname][?k=v&...]`.
fn parse_uri(s: &str) -> Result<(Raw, Redactor<'_>), DsnError> {
    let mut red = Redactor::new(s);
    let mut raw = Raw::default();
    let start = s.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &s[start..];
    // Anything up to the last `@` might be credentials, even when the URI is malformed.
    if let Some(last_at) = rest.rfind('@') {
        red.hide(start..start + last_at + 1);
    }

    let decode = |red: &Redactor<'_>, what: &str, frag: &str| -> Result<String, DsnError> {
        percent_decode(frag)
            .ok_or_else(|| red.syntax(&format!("invalid percent-encoding in {what}"), frag))
    };

    let auth_end0 = rest.find(['/', '?']).unwrap_or(rest.len());
    let (userinfo, hostpart_start) = match rest[..auth_end0].rfind('@') {
        Some(at) => (Some(&rest[..at]), at + 1),
        None => (None, 0),
    };
    if let Some(ui) = userinfo {
        let (user, password) = match ui.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (ui, None),
        };
        if !user.is_empty() {
            raw.user = Some(decode(&red, "the user name", user)?);
        }
        if let Some(p) = password {
            // Never quote any of it, even when its encoding is broken.
            let decoded = percent_decode(p).ok_or_else(|| {
                DsnError::Syntax("invalid percent-encoding in the password".into())
            })?;
            raw.password = Some(decoded);
        }
    }

    let after_auth = &rest[hostpart_start..];
    let host_end = after_auth.find(['/', '?']).unwrap_or(after_auth.len());
    let hostlist = &after_auth[..host_end];
    if !hostlist.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hostlist.split(',') {
            let (host, port) = if let Some(inner) = spec.strip_prefix('[') {
                let Some(close) = inner.find(']') else {
                    return Err(red.syntax("missing \"]\" in IPv6 host address", spec));
                };
                let host = &inner[..close];
                if host.is_empty() {
                    return Err(red.syntax("empty IPv6 host address", spec));
                }
                let after = &inner[close + 1..];
                let port = match after.strip_prefix(':') {
                    Some(p) => Some(p),
                    None if after.is_empty() => None,
                    None => {
                        return Err(red.syntax(
                            "unexpected text after IPv6 host address (expected \":port\")",
                            after,
                        ))
                    }
                };
                (decode(&red, "a host address", host)?, port)
            } else {
                let (h, p) = match spec.split_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (spec, None),
                };
                (decode(&red, "a host name", h)?, p)
            };
            hosts.push(host);
            ports.push(match port {
                Some(p) => decode(&red, "a port", p)?,
                None => String::new(),
            });
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            raw.host = Some(hosts.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            raw.port = Some(ports.join(","));
        }
    }

    let tail = &after_auth[host_end..];
    let (path, query) = match tail.find('?') {
        Some(q) => (&tail[..q], Some(&tail[q + 1..])),
        None => (tail, None),
    };
    if let Some(db) = path.strip_prefix('/') {
        if !db.is_empty() {
            raw.dbname = Some(decode(&red, "the database name", db)?);
        }
    }
    if let Some(query) = query {
        // Find `password=` first so that fragments after it are hidden.
        let mut offset = 0;
        for pair in query.split('&') {
            let (k, _) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(k).as_deref() == Some("password") {
                let abs = red.range_of(query).start + offset + k.len();
                red.hide(abs..s.len());
                break;
            }
            offset += pair.len() + 1;
        }
        for pair in query.split('&') {
            if pair.is_empty() {
                continue;
            }
            let Some((k, v)) = pair.split_once('=') else {
                return Err(red.syntax(
                    "missing key/value separator \"=\" in URI query parameter",
                    pair,
                ));
            };
            let key = decode(&red, "a query parameter name", k)?;
            let value = if key == "password" {
                percent_decode(v).ok_or_else(|| {
                    DsnError::Syntax("invalid percent-encoding in the password".into())
                })?
            } else {
                decode(&red, "a query parameter value", v)?
            };
            if key == "ssl" {
                // libpq's JDBC-compatible spelling.
                if value == "true" {
                    raw.sslmode = Some("require".into());
                    continue;
                }
                return Err(DsnError::InvalidValue {
                    key: "ssl".into(),
                    value: red.show(v, &value),
                    expected: "true (use sslmode for other settings)",
                });
            }
            raw.set(&key, value, k, &red)?;
        }
    }
    Ok((raw, red))
}

/// Splits a comma list, keeping empty elements (they mean "the default").
fn split_list(s: &str) -> Vec<&str> {
    s.split(',').map(str::trim).collect()
}

/// The host used when none is given: a Unix socket directory if it exists, else localhost.
fn default_host(env: &dyn Environment) -> Host {
    let dir = Path::new(DEFAULT_SOCKET_DIR);
    if env.exists(dir) {
        Host::Unix(dir.to_path_buf())
    } else {
        Host::Tcp("localhost".into())
    }
}

fn parse_host(h: &str, env: &dyn Environment) -> Host {
    if h.is_empty() {
        default_host(env)
    } else if h.starts_with('/') {
        Host::Unix(PathBuf::from(h))
    } else {
        Host::Tcp(h.to_string())
    }
}

/// Applies defaults and validates values.
fn build(raw: Raw, red: &Redactor<'_>, env: &dyn Environment) -> Result<Dsn, DsnError> {
    // Values given in the string take precedence over the environment, as in libpq.
    let pick = |v: Option<String>, var: &str| v.or_else(|| env.var(var));

    let host = pick(raw.host, "PGHOST");
    let hostaddr = pick(raw.hostaddr, "PGHOSTADDR");
    // hostaddr is where we connect; it stands in for host (verify-full then checks the
    // address).
    let hosts: Vec<Host> = match hostaddr.filter(|s| !s.is_empty()).or(host) {
        Some(list) if !list.is_empty() => split_list(&list)
            .into_iter()
            .map(|h| parse_host(h, env))
            .collect(),
        _ => vec![default_host(env)],
    };

    let ports = match pick(raw.port, "PGPORT") {
        Some(list) if !list.is_empty() => {
            let mut ports = Vec::new();
            for p in split_list(&list) {
                if p.is_empty() {
                    ports.push(DEFAULT_PORT);
                    continue;
                }
                match p.parse::<u16>() {
                    Ok(n) if n > 0 => ports.push(n),
                    _ => {
                        return Err(DsnError::InvalidValue {
                            key: "port".into(),
                            value: red.show_owned(p),
                            expected: "a number from 1 to 65535",
                        })
                    }
                }
            }
            ports
        }
        _ => vec![DEFAULT_PORT],
    };
    if ports.len() != 1 && ports.len() != hosts.len() {
        return Err(DsnError::PortCount {
            ports: ports.len(),
            hosts: hosts.len(),
        });
    }

    let user = match pick(raw.user, "PGUSER").filter(|u| !u.is_empty()) {
        Some(u) => u,
        None => env.os_user().unwrap_or_else(|| "postgres".into()),
    };
    let dbname = pick(raw.dbname, "PGDATABASE")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    let sslmode = match pick(raw.sslmode, "PGSSLMODE") {
        Some(m) if !m.is_empty() => match m.parse::<SslMode>() {
            Ok(m) => m,
            Err(_) => {
                return Err(DsnError::InvalidValue {
                    key: "sslmode".into(),
                    value: red.show_owned(&m),
                    expected: "one of disable, allow, prefer, require, verify-ca, verify-full",
                })
            }
        },
        _ => SslMode::Prefer,
    };

    let home_file = |name: &str| {
        env.home()
            .map(|h| h.join(".postgresql").join(name))
            .filter(|p| env.exists(p))
    };
    let path_or_default = |v: Option<String>, var: &str, default: &str| match pick(v, var)
        .filter(|s| !s.is_empty())
    {
        Some(p) => Some(PathBuf::from(p)),
        None => home_file(default),
    };
    let sslrootcert = path_or_default(raw.sslrootcert, "PGSSLROOTCERT", "root.crt");
    let sslcert = path_or_default(raw.sslcert, "PGSSLCERT", "postgresql.crt");
    let sslkey = path_or_default(raw.sslkey, "PGSSLKEY", "postgresql.key");

    let raw_tcp = [
        raw.keepalives,
        raw.keepalives_idle,
        raw.keepalives_interval,
        raw.keepalives_count,
        raw.tcp_user_timeout,
    ];
    let connect_timeout = match pick(raw.connect_timeout, "PGCONNECT_TIMEOUT") {
        Some(t) if !t.trim().is_empty() => match t.trim().parse::<i64>() {
            // libpq: zero or negative waits forever; 1 is raised to 2 seconds.
            Ok(n) if n <= 0 => None,
            Ok(n) => Some(Duration::from_secs(n.max(2).unsigned_abs())),
            Err(_) => {
                return Err(DsnError::InvalidValue {
                    key: "connect_timeout".into(),
                    value: red.show_owned(&t),
                    expected: "a whole number of seconds",
                })
            }
        },
        Some(_) => None,
        None => Some(DEFAULT_CONNECT_TIMEOUT),
    };
    let tcp = tcp_settings(&raw_tcp, red)?;

    let channel_binding = match pick(raw.channel_binding, "PGCHANNELBINDING") {
        Some(v) if !v.is_empty() => v.parse()?,
        _ => ChannelBinding::Prefer,
    };
    let require_auth = match pick(raw.require_auth, "PGREQUIREAUTH") {
        Some(v) if !v.is_empty() => Some(v.parse()?),
        _ => None,
    };
    let target_session_attrs = match pick(raw.target_session_attrs, "PGTARGETSESSIONATTRS") {
        Some(v) if !v.is_empty() => v.parse().map_err(|()| DsnError::InvalidValue {
            key: "target_session_attrs".into(),
            value: red.show_owned(&v),
            expected: "one of any, read-write, read-only, primary, standby, prefer-standby",
        })?,
        _ => TargetSessionAttrs::Any,
    };

    Ok(Dsn {
        hosts,
        ports,
        user,
        password: raw.password.map(Secret::new),
        dbname,
        sslmode,
        sslrootcert,
        sslcert,
        sslkey,
        application_name: pick(raw.application_name, "PGAPPNAME").filter(|s| !s.is_empty()),
        connect_timeout,
        tcp,
        options: pick(raw.options, "PGOPTIONS").filter(|s| !s.is_empty()),
        passfile: raw.passfile.filter(|s| !s.is_empty()).map(PathBuf::from),
        channel_binding,
        require_auth,
        target_session_attrs,
    })
}

/// How long a connection attempt may take when the DSN does not say (libpq waits forever; a
/// replication tool that must reconnect by itself cannot).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// TCP-level failure detection of one connection.
///
/// libpq leaves keepalives to the operating system (first probe after two hours) and
/// `tcp_user_timeout` off; walbridge's defaults notice a dead peer within about half a
/// minute: an idle link after `idle + interval × count` = 10 + 5 × 3 = 25 s, a link with
/// unacknowledged data after `tcp_user_timeout` = 30 s. A link that the network keeps open but
/// that carries nothing (a stuck middlebox, a frozen proxy) is caught by walbridge's own reply
/// timeouts instead (see the README's "Failure detection").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSettings {
    /// Send keepalive probes on an idle link (`keepalives`, 0 or 1).
    pub keepalives: bool,
    /// Idle time before the first probe (`keepalives_idle`, seconds; `None`: system default).
    pub idle: Option<Duration>,
    /// Time between probes (`keepalives_interval`, seconds; `None`: system default).
    pub interval: Option<Duration>,
    /// Unanswered probes before the link is dead (`keepalives_count`; `None`: system default).
    pub count: Option<u32>,
    /// How long sent data may stay unacknowledged (`tcp_user_timeout`, milliseconds; `None`:
    /// system default).
    pub user_timeout: Option<Duration>,
}

impl Default for TcpSettings {
    fn default() -> Self {
        TcpSettings {
            keepalives: true,
            idle: Some(Duration::from_secs(10)),
            interval: Some(Duration::from_secs(5)),
            count: Some(3),
            user_timeout: Some(Duration::from_secs(30)),
        }
    }
}

impl TcpSettings {
    /// Sets these options on a connected TCP socket.
    pub fn apply(&self, socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
        let sock = socket2::SockRef::from(socket);
        sock.set_keepalive(self.keepalives)?;
        if self.keepalives {
            let mut ka = socket2::TcpKeepalive::new();
            if let Some(t) = self.idle {
                ka = ka.with_time(t);
            }
            if let Some(t) = self.interval {
                ka = ka.with_interval(t);
            }
            if let Some(n) = self.count {
                ka = ka.with_retries(n);
            }
            sock.set_tcp_keepalive(&ka)?;
        }
        sock.set_tcp_user_timeout(self.user_timeout)
    }
}

/// Reads `keepalives`, `keepalives_idle`, `keepalives_interval`, `keepalives_count` and
/// `tcp_user_timeout` (in that order); a value of 0 means the system default, as in libpq.
fn tcp_settings(raw: &[Option<String>; 5], red: &Redactor<'_>) -> Result<TcpSettings, DsnError> {
    const KEYS: [&str; 5] = [
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    ];
    let mut values: [Option<u32>; 5] = [None; 5];
    for (i, v) in raw.iter().enumerate() {
        let Some(v) = v.as_deref().map(str::trim).filter(|v| !v.is_empty()) else {
            continue;
        };
        values[i] = Some(v.parse::<u32>().map_err(|_| DsnError::InvalidValue {
            key: KEYS[i].into(),
            value: red.show_owned(v),
            expected: "a whole number, 0 or more",
        })?);
    }
    let d = TcpSettings::default();
    let secs = |v: Option<u32>, default| match v {
        None => default,
        Some(0) => None,
        Some(n) => Some(Duration::from_secs(u64::from(n))),
    };
    Ok(TcpSettings {
        keepalives: values[0].is_none_or(|n| n != 0),
        idle: secs(values[1], d.idle),
        interval: secs(values[2], d.interval),
        count: match values[3] {
            None => d.count,
            Some(0) => None,
            Some(n) => Some(n),
        },
        user_timeout: match values[4] {
            None => d.user_timeout,
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(u64::from(ms))),
        },
    })
}

impl Redactor<'_> {
    /// Shows a decoded value unless any password region of the input is non-empty and the
    /// value could have come from it. Used where the value is no longer a slice of the input.
    fn show_owned(&self, value: &str) -> Option<String> {
        let in_hidden = self.unsafe_ranges.iter().any(|r| {
            self.input
                .get(r.clone())
                .is_some_and(|region| !value.is_empty() && region.contains(value))
        });
        (!in_hidden).then(|| value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A fixed environment: no variables unless given, home `/home/me`, OS user `me`.
    #[derive(Default)]
    struct FakeEnv {
        vars: HashMap<String, String>,
        existing: Vec<PathBuf>,
        home: Option<PathBuf>,
    }

    impl FakeEnv {
        fn new() -> Self {
            FakeEnv {
                home: Some(PathBuf::from("/home/me")),
                ..Default::default()
            }
        }
        fn var(mut self, k: &str, v: &str) -> Self {
            self.vars.insert(k.into(), v.into());
            self
        }
        fn file(mut self, p: &str) -> Self {
            self.existing.push(PathBuf::from(p));
            self
        }
    }

    impl Environment for FakeEnv {
        fn var(&self, key: &str) -> Option<String> {
            self.vars.get(key).cloned().filter(|v| !v.is_empty())
        }
        fn home(&self) -> Option<PathBuf> {
            self.home.clone()
        }
        fn os_user(&self) -> Option<String> {
            Some("me".into())
        }
        fn exists(&self, p: &Path) -> bool {
            self.existing.iter().any(|e| e == p)
        }
    }

    fn parse(s: &str) -> Dsn {
        Dsn::parse_with(s, &FakeEnv::new()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn parse_err(s: &str) -> String {
        match Dsn::parse_with(s, &FakeEnv::new()) {
            Ok(d) => panic!("{s} parsed: {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn tcp(h: &str) -> Host {
        Host::Tcp(h.into())
    }

    #[test]
    fn key_value_basic() {
        let d = parse("host=db1 port=5433 user=rep dbname=app sslmode=verify-full application_name=x connect_timeout=10 options='-c a=b'");
        assert_eq!(d.hosts, vec![tcp("db1")]);
        assert_eq!(d.ports, vec![5433]);
        assert_eq!(d.user, "rep");
        assert_eq!(d.dbname, "app");
        assert_eq!(d.sslmode, SslMode::VerifyFull);
        assert_eq!(d.application_name.as_deref(), Some("x"));
        assert_eq!(d.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(d.options.as_deref(), Some("-c a=b"));
        assert_eq!(d.password, None);
    }

    #[test]
    fn key_value_quoting_and_escapes() {
        let d = parse(r"host = a  dbname='my db' password='it''s' user=a\ b");
        assert_eq!(d.dbname, "my db");
        assert_eq!(d.password.as_ref().map(Secret::expose), Some("it's"));
        assert_eq!(d.user, "a b");
        let d = parse(r"password='a\'b\\c' dbname=''");
        assert_eq!(d.password.as_ref().map(Secret::expose), Some(r"a'b\c"));
        // Empty dbname falls back to the user.
        assert_eq!(d.dbname, "me");
        let d = parse("dbname=späß\tuser=ü");
        assert_eq!(d.dbname, "späß");
        assert_eq!(d.user, "ü");
        // Later keys win.
        assert_eq!(parse("port=1 port=2").ports, vec![2]);
    }

    #[test]
    fn key_value_syntax_errors() {
        assert!(parse_err("host").contains("missing \"=\""));
        assert!(parse_err("host=a dbname='x").contains("unterminated"));
        assert!(parse_err("bogus=1").contains("unknown option \"bogus\""));
        assert!(parse_err("load_balance_hosts=random").contains("does not support"));
        assert!(parse_err("target_session_attrs=master").contains("prefer-standby"));
        assert!(parse_err("sslmode=maybe").contains("sslmode"));
        assert!(parse_err("port=70000").contains("1 to 65535"));
        assert!(parse_err("port=abc").contains("\"abc\""));
        assert!(parse_err("connect_timeout=soon").contains("connect_timeout"));
        assert!(
            parse_err("host=a,b,c port=1,2").contains("could not match 2 port numbers to 3 hosts")
        );
    }

    #[test]
    fn target_session_attrs_from_key_value_uri_and_environment() {
        let d = parse("host=p,s port=5432,5433 target_session_attrs=read-write");
        assert_eq!(d.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert_eq!(d.port_for(1), 5433);
        let d = parse("postgresql://p:5432,s:5433/db?target_session_attrs=primary");
        assert_eq!(d.target_session_attrs, TargetSessionAttrs::Primary);
        assert_eq!(
            d.addresses(),
            vec![(Host::Tcp("p".into()), 5432), (Host::Tcp("s".into()), 5433)]
        );
        assert_eq!(parse("").target_session_attrs, TargetSessionAttrs::Any);
        let env = FakeEnv::new().var("PGTARGETSESSIONATTRS", "prefer-standby");
        let d = Dsn::parse_with("host=a,b", &env).unwrap();
        assert_eq!(d.target_session_attrs, TargetSessionAttrs::PreferStandby);
    }

    #[test]
    fn target_session_attrs_accept_as_libpq() {
        use TargetSessionAttrs::*;
        let primary = ServerState {
            in_hot_standby: false,
            default_read_only: false,
        };
        let read_only_primary = ServerState {
            in_hot_standby: false,
            default_read_only: true,
        };
        let standby = ServerState {
            in_hot_standby: true,
            default_read_only: false,
        };
        let table = [
            (Any, [true, true, true]),
            (ReadWrite, [true, false, false]),
            (ReadOnly, [false, true, true]),
            (Primary, [true, true, false]),
            (Standby, [false, false, true]),
        ];
        for (attrs, want) in table {
            let got = [primary, read_only_primary, standby].map(|s| attrs.accepts(s));
            assert_eq!(got, want, "{}", attrs.as_str());
        }
        assert_eq!(PreferStandby.passes(), &[Standby, Any]);
        assert_eq!(ReadWrite.passes(), &[ReadWrite]);
        assert!(ReadWrite.refusal(standby).contains("is a standby"));
    }

    #[test]
    fn empty_string_uses_defaults() {
        let d = parse("");
        assert_eq!(d.hosts, vec![tcp("localhost")]);
        assert_eq!(d.ports, vec![5432]);
        assert_eq!(d.user, "me");
        assert_eq!(d.dbname, "me");
        assert_eq!(d.sslmode, SslMode::Prefer);
        assert_eq!(d.sslrootcert, None);
        assert_eq!(d.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(d.tcp, TcpSettings::default());
        assert_eq!(parse("connect_timeout=0").connect_timeout, None);
    }

    #[test]
    fn tcp_keepalive_keys() {
        let d = parse(
            "keepalives_idle=30 keepalives_interval=2 keepalives_count=9 tcp_user_timeout=1500",
        );
        assert_eq!(
            d.tcp,
            TcpSettings {
                keepalives: true,
                idle: Some(Duration::from_secs(30)),
                interval: Some(Duration::from_secs(2)),
                count: Some(9),
                user_timeout: Some(Duration::from_millis(1500)),
            }
        );
        // 0 leaves a value to the system, as libpq; keepalives=0 turns probes off.
        let d = parse("keepalives=0 keepalives_idle=0 tcp_user_timeout=0");
        assert!(!d.tcp.keepalives);
        assert_eq!(d.tcp.idle, None);
        assert_eq!(d.tcp.user_timeout, None);
        let d = parse("postgres://u@h/db?keepalives_count=0&tcp_user_timeout=250");
        assert_eq!(d.tcp.count, None);
        assert_eq!(d.tcp.user_timeout, Some(Duration::from_millis(250)));
        assert!(parse_err("keepalives_idle=soon").contains("keepalives_idle"));
        assert!(parse_err("tcp_user_timeout=-1").contains("tcp_user_timeout"));
    }

    #[test]
    fn defaults_from_environment() {
        let env = FakeEnv::new()
            .var("PGHOST", "envhost")
            .var("PGPORT", "6000")
            .var("PGUSER", "envuser")
            .var("PGSSLMODE", "require")
            .var("PGAPPNAME", "app")
            .var("PGCONNECT_TIMEOUT", "1");
        let d = Dsn::parse_with("", &env).unwrap();
        assert_eq!(d.hosts, vec![tcp("envhost")]);
        assert_eq!(d.ports, vec![6000]);
        assert_eq!(d.user, "envuser");
        assert_eq!(d.dbname, "envuser");
        assert_eq!(d.sslmode, SslMode::Require);
        assert_eq!(d.application_name.as_deref(), Some("app"));
        // libpq raises 1 second to 2.
        assert_eq!(d.connect_timeout, Some(Duration::from_secs(2)));
        // The string wins over the environment.
        let d = Dsn::parse_with("host=h dbname=d", &env.var("PGDATABASE", "envdb")).unwrap();
        assert_eq!(d.hosts, vec![tcp("h")]);
        assert_eq!(d.dbname, "d");
        let env = FakeEnv::new().var("PGPORT", "nope");
        assert!(Dsn::parse_with("", &env)
            .unwrap_err()
            .to_string()
            .contains("\"nope\""));
    }

    #[test]
    fn default_socket_dir_when_it_exists() {
        let env = FakeEnv::new().file(DEFAULT_SOCKET_DIR);
        let d = Dsn::parse_with("", &env).unwrap();
        assert_eq!(d.hosts, vec![Host::Unix(DEFAULT_SOCKET_DIR.into())]);
        // An empty element of a host list is the default too.
        let d = Dsn::parse_with("host=a,", &env).unwrap();
        assert_eq!(
            d.hosts,
            vec![tcp("a"), Host::Unix(DEFAULT_SOCKET_DIR.into())]
        );
    }

    #[test]
    fn default_client_files_only_when_present() {
        let env = FakeEnv::new()
            .file("/home/me/.postgresql/root.crt")
            .file("/home/me/.postgresql/postgresql.crt")
            .file("/home/me/.postgresql/postgresql.key");
        let d = Dsn::parse_with("sslmode=require", &env).unwrap();
        assert_eq!(d.sslrootcert, Some("/home/me/.postgresql/root.crt".into()));
        assert_eq!(
            d.sslcert,
            Some("/home/me/.postgresql/postgresql.crt".into())
        );
        assert_eq!(d.sslkey, Some("/home/me/.postgresql/postgresql.key".into()));
        let d = Dsn::parse_with("sslrootcert=/etc/ca.pem", &env).unwrap();
        assert_eq!(d.sslrootcert, Some("/etc/ca.pem".into()));
        let d = parse("sslmode=require");
        assert_eq!((d.sslrootcert, d.sslcert, d.sslkey), (None, None, None));
    }

    #[test]
    fn multiple_hosts_and_ports() {
        let d = parse("host=h1,h2,/tmp port=5432,5433,");
        assert_eq!(
            d.hosts,
            vec![tcp("h1"), tcp("h2"), Host::Unix("/tmp".into())]
        );
        assert_eq!(d.ports, vec![5432, 5433, 5432]);
        let d = parse("host=h1,h2 port=6000");
        assert_eq!(d.port_for(1), 6000);
        assert_eq!(d.describe(), "me@h1:6000,h2:6000/me");
        assert_eq!(d.describe_host(1), "me@h2:6000/me");
    }

    #[test]
    fn hostaddr_stands_in_for_host() {
        assert_eq!(parse("hostaddr=10.0.0.1").hosts, vec![tcp("10.0.0.1")]);
        assert_eq!(
            parse("host=name hostaddr=10.0.0.1").hosts,
            vec![tcp("10.0.0.1")]
        );
    }

    #[test]
    fn uri_full() {
        let d = parse("postgresql://rep:p%40ss@db.example:6432/my%20db?sslmode=verify-ca&application_name=tail&connect_timeout=5");
        assert_eq!(d.user, "rep");
        assert_eq!(d.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert_eq!(d.hosts, vec![tcp("db.example")]);
        assert_eq!(d.ports, vec![6432]);
        assert_eq!(d.dbname, "my db");
        assert_eq!(d.sslmode, SslMode::VerifyCa);
        assert_eq!(d.application_name.as_deref(), Some("tail"));
        assert_eq!(d.connect_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn uri_variants() {
        let d = parse("postgres://");
        assert_eq!(d.hosts, vec![tcp("localhost")]);
        let d = parse("postgres://u@h");
        assert_eq!((d.user.as_str(), d.dbname.as_str()), ("u", "u"));
        let d = parse("postgres://h1:5432,h2:5433,[::1]:7,[fe80::1]/db");
        assert_eq!(
            d.hosts,
            vec![tcp("h1"), tcp("h2"), tcp("::1"), tcp("fe80::1")]
        );
        assert_eq!(d.ports, vec![5432, 5433, 7, 5432]);
        assert_eq!(d.describe(), "me@h1:5432,h2:5433,[::1]:7,[fe80::1]:5432/db");
        let d = parse("postgresql://%2Fvar%2Flib%2Fpostgresql/db");
        assert_eq!(d.hosts, vec![Host::Unix("/var/lib/postgresql".into())]);
        let d = parse("postgresql:///db?host=/tmp&port=5555");
        assert_eq!(d.hosts, vec![Host::Unix("/tmp".into())]);
        assert_eq!(d.ports, vec![5555]);
        let d = parse("postgres://h/db?ssl=true");
        assert_eq!(d.sslmode, SslMode::Require);
        let d = parse("postgres://:7000/db");
        assert_eq!(
            (d.hosts.clone(), d.ports.clone()),
            (vec![tcp("localhost")], vec![7000])
        );
        let d = parse("postgres://u:@h/db");
        assert_eq!(d.password.as_ref().map(Secret::expose), Some(""));
        let d = parse("postgres://h/db?options=-c%20search_path%3Dx");
        assert_eq!(d.options.as_deref(), Some("-c search_path=x"));
    }

    #[test]
    fn uri_errors() {
        assert!(parse_err("postgres://h/db?bogus=1").contains("unknown option \"bogus\""));
        assert!(parse_err("postgres://h/db?sslmode").contains("separator"));
        assert!(parse_err("postgres://[::1/db").contains("\"]\""));
        assert!(parse_err("postgres://h:x/db").contains("\"x\""));
        assert!(parse_err("postgres://h/d%zzb").contains("percent"));
        assert!(parse_err("postgres://h/d%00b").contains("percent"));
    }

    #[test]
    fn errors_never_contain_the_password() {
        let secret = "s3cr3tPW";
        let cases = [
            // URIs.
            "postgres://u:s3cr3tPW@h:bad/db",
            "postgres://u:s3cr3tPW@h/db?bogus=1",
            "postgres://u:s3cr3tPW@[::1/db",
            "postgres://u:s3cr3tPW%zz@h/db",
            "postgres://u:s3cr/3tPW@h/db",
            "postgres://u:s3c?r3tPW@h/db",
            "postgres://u:s3cr3tPW/@h/db",
            "postgres://u:s3cr3tPW@h/db?sslmode=s3cr3tPW",
            "postgres://h/db?password=s3cr3tPW&bogus",
            "postgres://h/db?password=s3cr3tPW&s3cr3tPW=1",
            "postgres://h/db?password=s3c&r3tPW",
            "postgres://h/db?password=s3cr3tPW%",
            "postgres://u:s3cr3tPW@h/db?port=s3cr3tPW",
            // Key/value.
            "password=s3cr3tPW port=bad",
            "password='s3cr3tPW",
            "password=s3cr3tPW bogus=1",
            "password=s3c r3tPW",
            "password=s3c r3tPW=x",
            "password=s3c port=r3tPW",
            "password=s3cr3tPW sslmode=s3cr3tPW",
            "password=s3cr3tPW connect_timeout=s3cr3tPW",
            "host=a,b port=1,2,3 password=s3cr3tPW",
        ];
        for case in cases {
            let err = match Dsn::parse_with(case, &FakeEnv::new()) {
                Ok(_) => continue,
                Err(e) => format!("{e} / {e:?}"),
            };
            for frag in ["s3cr3tPW", "s3c", "r3tPW", "3tPW", "s3cr"] {
                assert!(
                    !err.contains(frag),
                    "{case}: error {err:?} reveals {frag:?}"
                );
            }
        }
        // The Debug form of a parsed DSN hides it as well.
        let d = parse("postgres://u:s3cr3tPW@h/db");
        assert!(!format!("{d:?}").contains(secret));
        assert!(!d.describe().contains(secret));
    }

    #[test]
    fn hidden_fragments_are_still_explained() {
        let e = parse_err("password=x y=1");
        assert!(e.contains("hidden"), "{e}");
        // Keys before the password are shown.
        let e = parse_err("bogus=1 password=x");
        assert!(e.contains("\"bogus\""), "{e}");
        // A quoted password leaves later fragments visible.
        let e = parse_err("password='x' port=abc");
        assert!(e.contains("\"abc\""), "{e}");
    }

    #[test]
    fn passfile_matching() {
        let text = "# comment\n\
                    other:5432:*:*:nope\n\
                    db\\:1:*:app:rep:first\\:pw\\\\\n\
                    *:5432:*:rep:fallback\n\
                    localhost:*:*:*:local\r\n";
        let get = |h, p, d, u| passfile_lookup(text, h, p, d, u).map(|s| s.expose().to_string());
        assert_eq!(
            get("db:1", "6000", "app", "rep").as_deref(),
            Some("first:pw\\")
        );
        assert_eq!(get("x", "5432", "app", "rep").as_deref(), Some("fallback"));
        assert_eq!(get("localhost", "1", "a", "b").as_deref(), Some("local"));
        assert_eq!(get("x", "1", "a", "b"), None);
        // A literal "*" escaped is not a wildcard.
        assert_eq!(passfile_lookup("\\*:*:*:*:pw", "h", "1", "d", "u"), None);
        // Too few fields: skipped.
        assert_eq!(passfile_lookup("h:1:d", "h", "1", "d", "u"), None);
    }

    fn write_file(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn password_resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        let pwfile = write_file(dir.path(), "pw", "fromfile\nignored\n", 0o600);
        let pgpass = write_file(dir.path(), "pgpass", "*:*:*:*:frompgpass\n", 0o600);
        let env = FakeEnv::new().var("PGPASSWORD", "fromenv");
        let resolve = |dsn: &str, file: Option<&Path>, env: &FakeEnv| {
            let mut d = Dsn::parse_with(dsn, env).unwrap();
            d.resolve_password_with(file, env).unwrap();
            d.password.map(|s| s.expose().to_string())
        };
        let with_passfile = format!("passfile={}", pgpass.display());
        assert_eq!(
            resolve("password=dsn", Some(&pwfile), &env).as_deref(),
            Some("dsn")
        );
        assert_eq!(
            resolve(&with_passfile, Some(&pwfile), &env).as_deref(),
            Some("fromfile")
        );
        assert_eq!(
            resolve(&with_passfile, None, &env).as_deref(),
            Some("fromenv")
        );
        assert_eq!(
            resolve(&with_passfile, None, &FakeEnv::new()).as_deref(),
            Some("frompgpass")
        );
        let env = FakeEnv::new().var("PGPASSFILE", &pgpass.display().to_string());
        assert_eq!(resolve("", None, &env).as_deref(), Some("frompgpass"));
        // ~/.pgpass.
        let mut env = FakeEnv::new();
        env.home = Some(dir.path().to_path_buf());
        write_file(dir.path(), ".pgpass", "*:*:*:*:fromhome\n", 0o600);
        assert_eq!(resolve("", None, &env).as_deref(), Some("fromhome"));
        // Nothing anywhere.
        assert_eq!(
            resolve("passfile=/nonexistent/x", None, &FakeEnv::new()),
            None
        );
    }

    #[test]
    fn passfile_ignored_when_group_readable() {
        let dir = tempfile::tempdir().unwrap();
        let pgpass = write_file(dir.path(), "pgpass", "*:*:*:*:pw\n", 0o640);
        let mut d = parse(&format!("passfile={}", pgpass.display()));
        d.resolve_password_with(None, &FakeEnv::new()).unwrap();
        assert_eq!(d.password, None);
    }

    #[test]
    fn passfile_uses_localhost_for_the_default_socket_dir() {
        let dir = tempfile::tempdir().unwrap();
        let pgpass = write_file(dir.path(), "pgpass", "localhost:5432:me:me:sock\n", 0o600);
        let env = FakeEnv::new().file(DEFAULT_SOCKET_DIR);
        let mut d = Dsn::parse_with(&format!("passfile={}", pgpass.display()), &env).unwrap();
        d.resolve_password_with(None, &env).unwrap();
        assert_eq!(d.password.as_ref().map(Secret::expose), Some("sock"));
    }

    #[test]
    fn password_file_with_group_or_other_access_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Group-readable is allowed only for files owned by root (libpq's rule for keys).
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let group_read: &[u32] = if root { &[] } else { &[0o640] };
        for &mode in [0o644, 0o604, 0o620, 0o660, 0o601].iter().chain(group_read) {
            let f = write_file(dir.path(), "pw", "secret\n", mode);
            let e = parse("")
                .resolve_password_with(Some(&f), &FakeEnv::new())
                .unwrap_err();
            assert!(
                matches!(e, DsnError::PasswordFileMode { .. }),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
            assert!(!e.to_string().contains("secret\n"), "{e}");
        }
        let ok: &[u32] = if root {
            &[0o400, 0o600, 0o640]
        } else {
            &[0o400, 0o600]
        };
        for &mode in ok {
            let f = write_file(dir.path(), "pw", "secret\n", mode);
            let mut d = parse("");
            d.resolve_password_with(Some(&f), &FakeEnv::new()).unwrap();
            assert_eq!(d.password.as_ref().map(Secret::expose), Some("secret"));
        }
        let f = write_file(dir.path(), "pw", "secret\n", 0o400);
        let mut d = parse("");
        d.resolve_password_with(Some(&f), &FakeEnv::new()).unwrap();
        assert_eq!(d.password.as_ref().map(Secret::expose), Some("secret"));
    }

    #[test]
    fn expansion_happens_inside_one_value() {
        #[derive(Debug, thiserror::Error)]
        #[error("no such variable")]
        struct Missing;
        let vars = |v: &str| -> Result<String, Missing> {
            Ok(match v {
                "${PW}" => "a' host=evil port=1 '".into(),
                "${HOST}" => "h1,h2".into(),
                "${BAD}" => return Err(Missing),
                other => other.to_string(),
            })
        };
        let env = FakeEnv::new();
        let d = Dsn::parse_expanding_with("host=${HOST} password=${PW}", &vars, &env).unwrap();
        assert_eq!(d.hosts, vec![tcp("h1"), tcp("h2")]);
        assert_eq!(d.ports, vec![5432]);
        assert_eq!(
            d.password.as_ref().map(Secret::expose),
            Some("a' host=evil port=1 '")
        );
        let d = Dsn::parse_expanding_with("postgres://u:${PW}@h/db", &vars, &env).unwrap();
        assert_eq!((d.hosts.clone(), d.dbname.as_str()), (vec![tcp("h")], "db"));
        assert_eq!(
            d.password.as_ref().map(Secret::expose),
            Some("a' host=evil port=1 '")
        );
        let e = Dsn::parse_expanding_with("host=h password=${BAD}", &vars, &env).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid connection string: in the password value: no such variable"
        );
    }

    #[test]
    fn ipv6_uri_hosts_are_percent_decoded() {
        let d = parse("postgres://[fe80::1%25eth0]:5433/db");
        assert_eq!(d.hosts, vec![tcp("fe80::1%eth0")]);
    }

    #[test]
    fn password_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let mut d = parse("");
        let e = d
            .resolve_password_with(Some(&missing), &FakeEnv::new())
            .unwrap_err();
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        let empty = write_file(dir.path(), "empty", "\n", 0o600);
        let e = d
            .resolve_password_with(Some(&empty), &FakeEnv::new())
            .unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn channel_binding_and_require_auth() {
        let d = parse("");
        assert_eq!(d.channel_binding, ChannelBinding::Prefer);
        assert_eq!(d.require_auth, None);
        let d = parse("channel_binding=require require_auth=scram-sha-256");
        assert_eq!(d.channel_binding, ChannelBinding::Require);
        let ra = d.require_auth.unwrap();
        assert!(ra.allows(AuthMethod::ScramSha256));
        for m in [AuthMethod::Password, AuthMethod::Md5, AuthMethod::None] {
            assert!(!ra.allows(m), "{m:?}");
        }
        let ra = parse("postgres://h/db?require_auth=!password,!md5")
            .require_auth
            .unwrap();
        assert!(ra.allows(AuthMethod::ScramSha256) && ra.allows(AuthMethod::None));
        assert!(!ra.allows(AuthMethod::Password) && !ra.allows(AuthMethod::Md5));
        let ra = parse("require_auth=md5,none").require_auth.unwrap();
        assert!(ra.allows(AuthMethod::None) && !ra.allows(AuthMethod::ScramSha256));
        let env = FakeEnv::new()
            .var("PGCHANNELBINDING", "disable")
            .var("PGREQUIREAUTH", "password");
        let d = Dsn::parse_with("", &env).unwrap();
        assert_eq!(d.channel_binding, ChannelBinding::Disable);
        assert!(d.require_auth.unwrap().allows(AuthMethod::Password));
        assert!(parse_err("channel_binding=maybe").contains("disable, prefer, require"));
        assert!(parse_err("require_auth=kerberos").contains("unknown method"));
        assert!(parse_err("require_auth=md5,!password").contains("mixed"));
        assert!(parse_err("require_auth=md5,md5").contains("twice"));
    }

    #[test]
    fn sslmode_round_trips() {
        for m in [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(m.as_str().parse::<SslMode>().unwrap(), m);
        }
    }

    #[test]
    fn secret_never_prints() {
        assert_eq!(format!("{:?}", Secret::new("x")), "Secret(***)");
    }
}
