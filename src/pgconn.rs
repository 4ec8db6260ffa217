//! Ordinary SQL connections (tokio-postgres) built from a [`Dsn`], with libpq's TLS rules.
//!
//! tokio-postgres only knows `sslmode` disable/prefer/require and ignores `sslrootcert`, so
//! the TLS policy comes from [`crate::tls::client_config`] and `allow` / `verify-*` are
//! emulated here:
//!
//! ```text
//!  disable      plain
//!  allow        plain; on a server error, again with TLS (as libpq)
//!  prefer       TLS if the server offers it, else plain
//!  require      TLS (chain verified when a root certificate is present)
//!  verify-ca    TLS, chain verified
//!  verify-full  TLS, chain and host name verified
//! ```
//!
//! Unix-socket hosts never use TLS (as libpq). `channel_binding` is tokio-postgres's own
//! (SCRAM-SHA-256-PLUS with `tls-server-end-point` from tokio-postgres-rustls). tokio-postgres
//! has no `require_auth`, so when it is set the socket is opened here and wrapped in an
//! [`AuthGuard`] that reads the server's authentication requests on their way in and fails
//! the session, before any password is sent, when the server asks for a method the setting
//! rules out:
//!
//! ```text
//!  server ──▶ TCP ──▶ [guard until 'S'] ──▶ TLS ──▶ [guard until AuthenticationOk] ──▶ tokio-postgres
//! ```
//!
//! Every session gets `DateStyle=ISO`,
//! `IntervalStyle=postgres`, `TimeZone=UTC` and `extra_float_digits=3` through the startup
//! `options`, so values read from one node and written to another travel as unambiguous
//! text, and `search_path=pg_catalog,pg_temp`, so no unqualified name in walbridge's SQL can
//! reach an object a user created.

use std::fmt::Write as _;
use std::io;
use std::time::Duration;

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::NoTls;

use crate::dsn::{
    AuthMethod, AuthRefused, ChannelBinding, Dsn, Host, RequireAuth, ServerState, SslMode,
    TargetSessionAttrs,
};
use crate::tls;

pub use crate::protocol::{
    io_is_transient, sqlstate_is_transient, SESSION_OPTIONS, SESSION_PARAMS,
};

/// The `options` startup value: the DSN's own options, then walbridge's (later ones win).
pub fn startup_options(dsn: &Dsn) -> String {
    match dsn.options.as_deref().map(str::trim) {
        Some(own) if !own.is_empty() => format!("{own} {SESSION_OPTIONS}"),
        _ => SESSION_OPTIONS.to_string(),
    }
}

/// A connection to a node could not be opened.
///
/// The message names the node address and says what failed, in one sentence; the raw
/// server error stays available through [`ConnectError::db_error`].
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {address}: {reason}")]
pub struct ConnectError {
    address: String,
    reason: String,
    transient: bool,
    db: Option<Box<tokio_postgres::error::DbError>>,
}

impl ConnectError {
    /// True when retrying later may succeed (server down, restarting, network trouble);
    /// false when it cannot until someone changes something (wrong password, missing
    /// database, certificate verification failure).
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The node as `user@host:port/dbname`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The server's error, when the server refused the connection.
    pub fn db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        self.db.as_deref()
    }

    /// The SQLSTATE the server sent, if any.
    pub fn code(&self) -> Option<&str> {
        self.db.as_ref().map(|d| d.code().code())
    }

    fn tls_setup(dsn: &Dsn, e: tls::TlsError) -> Self {
        ConnectError {
            address: dsn.describe(),
            reason: e.to_string(),
            transient: false,
            db: None,
        }
    }

    fn timeout(address: String, after: Duration) -> Self {
        ConnectError {
            address,
            reason: format!(
                "no answer within connect_timeout ({}s)",
                after.as_secs_f64().round()
            ),
            transient: true,
            db: None,
        }
    }

    fn io(address: String, e: &io::Error) -> Self {
        ConnectError {
            address,
            reason: e.to_string(),
            transient: io_is_transient(e),
            db: None,
        }
    }

    fn from_postgres(address: String, user: &str, e: &tokio_postgres::Error) -> Self {
        let (reason, transient) = classify(user, e);
        ConnectError {
            address,
            reason,
            transient,
            db: e.as_db_error().map(|d| Box::new(d.clone())),
        }
    }
}

/// Words and class for a tokio-postgres connection failure.
fn classify(user: &str, e: &tokio_postgres::Error) -> (String, bool) {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        if code.starts_with("28") {
            let server = crate::protocol::ServerError {
                severity: db.severity().to_string(),
                code: code.to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
                schema: db.schema().map(str::to_string),
                table: db.table().map(str::to_string),
            };
            return (crate::protocol::auth_failure(user, &server), false);
        }
        let mut reason = match code {
            "3D000" => format!(
                "{} (SQLSTATE {code}); create the database or fix dbname",
                db.message()
            ),
            _ => format!(
                "{} (SQLSTATE {code})",
                crate::telemetry::shown_message(code, db.message())
            ),
        };
        if let Some(detail) = crate::telemetry::shown_detail(code, db.detail()) {
            reason.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            reason.push_str(&format!("; hint: {hint}"));
        }
        return (reason, sqlstate_is_transient(code));
    }
    if let Some(refused) = find_refusal(e) {
        return (refused.to_string(), false);
    }
    if let Some(tls_err) = tls::find_rustls_error(e) {
        return (tls::explain(tls_err), !tls::is_definite(tls_err));
    }
    let top = e.to_string();
    let cause = std::error::Error::source(e).map(|c| c.to_string());
    if top.starts_with("authentication error") {
        let what = cause.unwrap_or_default();
        let reason = if what.contains("channel binding") {
            "channel_binding=require, but the server authenticated without channel binding \
             (it asked for a password, an MD5 password or nothing, or offered no \
             SCRAM-SHA-256-PLUS on TLS); use scram-sha-256 over TLS for this user in \
             pg_hba.conf, or lower channel_binding"
                .to_string()
        } else if what.contains("password missing") {
            format!(
                "the server asks for a password for user {user:?} and none is configured; \
                 put it in the DSN, password_file, PGPASSWORD or ~/.pgpass"
            )
        } else {
            format!("authentication failed for user {user:?}: {what}")
        };
        return (reason, false);
    }
    if top.starts_with("error performing TLS handshake") {
        let what = cause.unwrap_or_default();
        let reason = if what.contains("does not support TLS") {
            "the server does not accept TLS connections, but sslmode requires TLS; enable ssl \
             on the server or lower sslmode"
                .to_string()
        } else {
            format!("TLS handshake failed: {what}")
        };
        // The handshake may also break because the connection did.
        let transient = find_io(e).is_some_and(io_is_transient);
        return (reason, transient);
    }
    if e.is_closed() {
        return ("the server closed the connection".into(), true);
    }
    if let Some(io_err) = find_io(e) {
        return (io_err.to_string(), io_is_transient(io_err));
    }
    let reason = match cause {
        Some(c) => format!("{top}: {c}"),
        None => top,
    };
    let transient = reason.contains("timeout") || reason.contains("timed out");
    (reason, transient)
}

/// A refusal by the [`AuthGuard`], carried through tokio-postgres as an I/O error.
fn find_refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a AuthRefused> {
    find_io(e)?.get_ref()?.downcast_ref::<AuthRefused>()
}

fn find_io<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// Opens an ordinary SQL session on the node, trying its hosts in order.
///
/// `application_name` is used unless the DSN sets its own. The DSN's password must already
/// be resolved ([`Dsn::resolve_password`]). The connection driver is spawned on the current
/// tokio runtime and ends when the client is dropped.
pub async fn connect(
    dsn: &Dsn,
    application_name: &str,
) -> Result<tokio_postgres::Client, ConnectError> {
    connect_with(dsn, application_name, None).await
}

/// As [`connect`], and every `NOTIFY` the session receives (after `LISTEN`) is sent to
/// `notifications`. A full channel drops the notification: a receiver that has a wake-up
/// pending needs no second one.
pub async fn connect_listening(
    dsn: &Dsn,
    application_name: &str,
    notifications: tokio::sync::mpsc::Sender<tokio_postgres::Notification>,
) -> Result<tokio_postgres::Client, ConnectError> {
    connect_with(dsn, application_name, Some(notifications)).await
}

type NotifySender = Option<tokio::sync::mpsc::Sender<tokio_postgres::Notification>>;

async fn connect_with(
    dsn: &Dsn,
    application_name: &str,
    notify: NotifySender,
) -> Result<tokio_postgres::Client, ConnectError> {
    let tls_config = tls::client_config(dsn).map_err(|e| ConnectError::tls_setup(dsn, e))?;
    let mut last: Option<ConnectError> = None;
    let mut any_transient = false;
    for &wanted in dsn.target_session_attrs.passes() {
        for (i, (host, port)) in dsn.addresses().into_iter().enumerate() {
            let address = dsn.describe_host(i);
            let mut config = base_config(dsn, application_name);
            match &host {
                Host::Tcp(h) => config.host(h),
                Host::Unix(p) => config.host_path(p),
            };
            config.port(port);
            let tls_config = tls_config.clone();
            let attempt = async {
                let client = match &dsn.require_auth {
                    None => connect_one(dsn, &host, config, tls_config, notify.clone())
                        .await
                        .map_err(|e| ConnectError::from_postgres(address.clone(), &dsn.user, &e))?,
                    Some(policy) => {
                        let guarded = Guarded {
                            dsn,
                            host: &host,
                            port,
                            policy,
                            address: &address,
                        };
                        guarded.connect(config, tls_config, notify.clone()).await?
                    }
                };
                check_state(client, wanted, &address, &dsn.user).await
            };
            let result = match dsn.connect_timeout {
                Some(t) => match tokio::time::timeout(t, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(ConnectError::timeout(address.clone(), t)),
                },
                None => attempt.await,
            };
            match result {
                Ok(client) => return Ok(client),
                Err(e) => {
                    tracing::debug!(node = %address, error = %e, "connection attempt failed");
                    any_transient |= e.transient;
                    last = Some(e);
                }
            }
        }
    }
    // With several hosts, one that is merely down makes the whole node worth retrying.
    let mut err = last.unwrap_or_else(|| ConnectError {
        address: dsn.describe(),
        reason: "the connection string names no host".into(),
        transient: false,
        db: None,
    });
    if dsn.hosts.len() > 1 {
        err.reason = format!("{} (tried {} hosts)", err.reason, dsn.hosts.len());
        err.transient = any_transient;
    }
    Err(err)
}

/// Keeps `client` when the server's state is what `target_session_attrs` asks for (libpq
/// reads the same two facts); otherwise a transient error naming the host, so a node in the
/// middle of a promotion is retried.
async fn check_state(
    client: tokio_postgres::Client,
    wanted: TargetSessionAttrs,
    address: &str,
    user: &str,
) -> Result<tokio_postgres::Client, ConnectError> {
    if wanted == TargetSessionAttrs::Any {
        return Ok(client);
    }
    let row = client
        .query_one(
            "SELECT pg_catalog.pg_is_in_recovery(), \
                    pg_catalog.current_setting('default_transaction_read_only') = 'on'",
            &[],
        )
        .await
        .map_err(|e| ConnectError::from_postgres(address.to_string(), user, &e))?;
    let flag = |i: usize| {
        row.try_get::<_, bool>(i)
            .map_err(|e| ConnectError::from_postgres(address.to_string(), user, &e))
    };
    let state = ServerState {
        in_hot_standby: flag(0)?,
        default_read_only: flag(1)?,
    };
    if wanted.accepts(state) {
        return Ok(client);
    }
    Err(ConnectError {
        address: address.to_string(),
        reason: wanted.refusal(state),
        transient: true,
        db: None,
    })
}

fn base_config(dsn: &Dsn, application_name: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .user(&dsn.user)
        .dbname(&dsn.dbname)
        .application_name(dsn.application_name.as_deref().unwrap_or(application_name))
        .options(startup_options(dsn));
    if let Some(pw) = &dsn.password {
        config.password(pw.expose());
    }
    if let Some(t) = dsn.connect_timeout {
        config.connect_timeout(t);
    }
    config.channel_binding(match dsn.channel_binding {
        ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
        ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
        ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
    });
    let tcp = &dsn.tcp;
    config.keepalives(tcp.keepalives);
    if let Some(t) = tcp.idle {
        config.keepalives_idle(t);
    }
    if let Some(t) = tcp.interval {
        config.keepalives_interval(t);
    }
    if let Some(n) = tcp.count {
        config.keepalives_retries(n);
    }
    if let Some(t) = tcp.user_timeout {
        config.tcp_user_timeout(t);
    }
    config
}

/// One host with `require_auth`: the socket is opened here so that an [`AuthGuard`] sits
/// under tokio-postgres (and another one above TLS); the sslmode emulation is the same as
/// [`connect_one`]'s.
struct Guarded<'a> {
    dsn: &'a Dsn,
    host: &'a Host,
    port: u16,
    policy: &'a RequireAuth,
    address: &'a str,
}

impl Guarded<'_> {
    async fn connect(
        &self,
        mut config: tokio_postgres::Config,
        tls_config: Option<std::sync::Arc<rustls::ClientConfig>>,
        notify: NotifySender,
    ) -> Result<tokio_postgres::Client, ConnectError> {
        let tls_config = match (self.host, tls_config) {
            (Host::Tcp(_), Some(c)) => c,
            _ => {
                config.ssl_mode(PgSslMode::Disable);
                return self.plain(&config, notify).await;
            }
        };
        match self.dsn.sslmode {
            SslMode::Disable => {
                config.ssl_mode(PgSslMode::Disable);
                self.plain(&config, notify).await
            }
            SslMode::Allow => {
                config.ssl_mode(PgSslMode::Disable);
                match self.plain(&config, notify.clone()).await {
                    Err(e) if e.db.is_some() => {
                        config.ssl_mode(PgSslMode::Require);
                        self.with_tls(&config, &tls_config, notify).await
                    }
                    other => other,
                }
            }
            SslMode::Prefer => {
                config.ssl_mode(PgSslMode::Prefer);
                self.with_tls(&config, &tls_config, notify).await
            }
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                config.ssl_mode(PgSslMode::Require);
                self.with_tls(&config, &tls_config, notify).await
            }
        }
    }

    fn pg_err(&self, e: &tokio_postgres::Error) -> ConnectError {
        ConnectError::from_postgres(self.address.to_string(), &self.dsn.user, e)
    }

    /// A TCP socket to the host with no delay and the DSN's keepalive / user-timeout options,
    /// as tokio-postgres sets them on the sockets it opens itself.
    async fn tcp(&self, name: &str) -> Result<tokio::net::TcpStream, ConnectError> {
        let io_err = |e: io::Error| ConnectError::io(self.address.to_string(), &e);
        let socket = tokio::net::TcpStream::connect((name, self.port))
            .await
            .map_err(io_err)?;
        socket.set_nodelay(true).map_err(io_err)?;
        self.dsn.tcp.apply(&socket).map_err(io_err)?;
        Ok(socket)
    }

    async fn plain(
        &self,
        config: &tokio_postgres::Config,
        notify: NotifySender,
    ) -> Result<tokio_postgres::Client, ConnectError> {
        let io_err = |e: io::Error| ConnectError::io(self.address.to_string(), &e);
        match self.host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", self.port));
                let socket = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(io_err)?;
                let guard = AuthGuard::new(socket, self.policy.clone(), false);
                let (client, connection) = config
                    .connect_raw(guard, NoTls)
                    .await
                    .map_err(|e| self.pg_err(&e))?;
                spawn_driver(connection, notify);
                Ok(client)
            }
            Host::Tcp(name) => {
                let socket = self.tcp(name).await?;
                let guard = AuthGuard::new(socket, self.policy.clone(), false);
                let (client, connection) = config
                    .connect_raw(guard, NoTls)
                    .await
                    .map_err(|e| self.pg_err(&e))?;
                spawn_driver(connection, notify);
                Ok(client)
            }
        }
    }

    async fn with_tls(
        &self,
        config: &tokio_postgres::Config,
        tls_config: &std::sync::Arc<rustls::ClientConfig>,
        notify: NotifySender,
    ) -> Result<tokio_postgres::Client, ConnectError> {
        use tokio_postgres::tls::MakeTlsConnect;

        let io_err = |e: io::Error| ConnectError::io(self.address.to_string(), &e);
        let Host::Tcp(name) = self.host else {
            return self.plain(config, notify).await;
        };
        let socket = self.tcp(name).await?;
        // tokio-postgres sends SSLRequest first: the guard under TLS reads only its answer.
        let socket = AuthGuard::new(socket, self.policy.clone(), true);
        let mut make = RustlsConnector(tls_config.clone());
        let connect =
            MakeTlsConnect::<AuthGuard<tokio::net::TcpStream>>::make_tls_connect(&mut make, name)
                .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let tls = GuardedTls {
            inner: connect,
            policy: self.policy.clone(),
        };
        let (client, connection) = config
            .connect_raw(socket, tls)
            .await
            .map_err(|e| self.pg_err(&e))?;
        spawn_driver(connection, notify);
        Ok(client)
    }
}

/// Where an [`AuthGuard`] is in the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GuardState {
    /// The next byte answers SSLRequest: `S` hands over to TLS (and to the guard above it).
    SslAnswer,
    /// Reading backend messages up to AuthenticationOk.
    Messages,
    /// Authenticated (or TLS took over): bytes pass untouched.
    Done,
}

/// Reads the server's authentication requests on their way to tokio-postgres and fails the
/// read, before tokio-postgres sees the request (so before any password is sent), when
/// `require_auth` rules the method out. After AuthenticationOk it only passes bytes.
struct AuthGuard<S> {
    inner: S,
    policy: RequireAuth,
    state: GuardState,
    /// Tag, length and (for 'R') the request code of the message being read.
    head: [u8; 9],
    have: usize,
    /// Bytes of the current message still to pass without looking.
    skip: usize,
    /// The server has asked for some method (so AuthenticationOk is not "none").
    asked: bool,
}

impl<S> AuthGuard<S> {
    fn new(inner: S, policy: RequireAuth, ssl_request_first: bool) -> Self {
        AuthGuard {
            inner,
            policy,
            state: if ssl_request_first {
                GuardState::SslAnswer
            } else {
                GuardState::Messages
            },
            head: [0; 9],
            have: 0,
            skip: 0,
            asked: false,
        }
    }

    /// Follows the message framing through `bytes`; `Err` when the server asks for a method
    /// the policy refuses.
    fn inspect(&mut self, bytes: &[u8]) -> Result<(), AuthRefused> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                GuardState::Done => return Ok(()),
                GuardState::SslAnswer => {
                    self.state = if bytes[i] == b'S' {
                        GuardState::Done
                    } else {
                        GuardState::Messages
                    };
                    i += 1;
                }
                GuardState::Messages if self.skip > 0 => {
                    let n = self.skip.min(bytes.len() - i);
                    self.skip -= n;
                    i += n;
                }
                GuardState::Messages => {
                    self.head[self.have] = bytes[i];
                    self.have += 1;
                    i += 1;
                    let is_auth = self.head[0] == b'R';
                    let header_done = if is_auth { 9 } else { 5 };
                    if self.have < header_done {
                        continue;
                    }
                    let len = u32::from_be_bytes([
                        self.head[1],
                        self.head[2],
                        self.head[3],
                        self.head[4],
                    ]);
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    self.skip = len.saturating_sub(header_done - 1);
                    self.have = 0;
                    if !is_auth {
                        continue;
                    }
                    let code = u32::from_be_bytes([
                        self.head[5],
                        self.head[6],
                        self.head[7],
                        self.head[8],
                    ]);
                    let method = match code {
                        0 => {
                            self.state = GuardState::Done;
                            if self.asked {
                                continue;
                            }
                            AuthMethod::None
                        }
                        3 => AuthMethod::Password,
                        5 => AuthMethod::Md5,
                        10 => AuthMethod::ScramSha256,
                        7 => AuthMethod::Gss,
                        9 => AuthMethod::Sspi,
                        // SASL and GSS continuations, and methods tokio-postgres refuses.
                        _ => continue,
                    };
                    self.asked = true;
                    if !self.policy.allows(method) {
                        return Err(AuthRefused {
                            method,
                            setting: format!("require_auth={}", self.policy.as_str()),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for AuthGuard<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.state == GuardState::Done || !matches!(polled, std::task::Poll::Ready(Ok(()))) {
            return polled;
        }
        if let Err(refused) = this.inspect(&buf.filled()[before..]) {
            // tokio-postgres never sees the request, so it never answers it.
            buf.set_filled(before);
            return std::task::Poll::Ready(Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                refused,
            )));
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for AuthGuard<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tokio_postgres::tls::TlsStream + Unpin> tokio_postgres::tls::TlsStream for AuthGuard<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.inner.channel_binding()
    }
}

/// rustls for tokio-postgres, with SCRAM channel binding.
///
/// tokio-postgres-rustls 0.13 reads the server certificate as a `TBSCertificate`, which never
/// parses, so it never offers `tls-server-end-point` and `channel_binding=require` could not
/// work; this connector takes the binding data from [`crate::tls::tls_server_end_point`], the
/// same as the replication client.
#[derive(Clone)]
struct RustlsConnector(std::sync::Arc<rustls::ClientConfig>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for RustlsConnector
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = BoundTls<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

/// One TLS handshake to one server name.
struct RustlsConnect {
    config: std::sync::Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = BoundTls<S>;
    type Error = io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<BoundTls<S>, io::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(BoundTls(Box::new(tls)))
        })
    }
}

/// A client TLS session that tells tokio-postgres its `tls-server-end-point`.
struct BoundTls<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead for BoundTls<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for BoundTls<S>
{
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio_postgres::tls::TlsStream
    for BoundTls<S>
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| crate::tls::tls_server_end_point(cert))
            .map_or_else(
                tokio_postgres::tls::ChannelBinding::none,
                tokio_postgres::tls::ChannelBinding::tls_server_end_point,
            )
    }
}

/// The TLS connector, with an [`AuthGuard`] over the TLS stream it makes.
struct GuardedTls<T> {
    inner: T,
    policy: RequireAuth,
}

impl<S, T> tokio_postgres::tls::TlsConnect<S> for GuardedTls<T>
where
    T: tokio_postgres::tls::TlsConnect<S>,
    T::Future: Send + 'static,
    T::Stream: Send + 'static,
{
    type Stream = AuthGuard<T::Stream>;
    type Error = T::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Stream, T::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let policy = self.policy;
        let handshake = self.inner.connect(stream);
        Box::pin(async move { Ok(AuthGuard::new(handshake.await?, policy, false)) })
    }
}

/// One host, with the sslmode emulation described in the module docs.
async fn connect_one(
    dsn: &Dsn,
    host: &Host,
    mut config: tokio_postgres::Config,
    tls_config: Option<std::sync::Arc<rustls::ClientConfig>>,
    notify: NotifySender,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls_config = match (host, tls_config) {
        // libpq never uses TLS on Unix sockets, whatever sslmode says.
        (Host::Unix(_), _) | (_, None) => None,
        (Host::Tcp(_), Some(c)) => Some(c),
    };
    let Some(tls_config) = tls_config else {
        config.ssl_mode(PgSslMode::Disable);
        return plain(&config, notify).await;
    };
    match dsn.sslmode {
        SslMode::Disable => {
            config.ssl_mode(PgSslMode::Disable);
            plain(&config, notify).await
        }
        SslMode::Allow => {
            config.ssl_mode(PgSslMode::Disable);
            match plain(&config, notify.clone()).await {
                // The server refused the plain session (for example, hostssl-only pg_hba):
                // try again with TLS, as libpq does.
                Err(e) if e.as_db_error().is_some() => {
                    config.ssl_mode(PgSslMode::Require);
                    with_tls(&config, &tls_config, notify).await
                }
                other => other,
            }
        }
        SslMode::Prefer => {
            config.ssl_mode(PgSslMode::Prefer);
            with_tls(&config, &tls_config, notify).await
        }
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            config.ssl_mode(PgSslMode::Require);
            with_tls(&config, &tls_config, notify).await
        }
    }
}

async fn plain(
    config: &tokio_postgres::Config,
    notify: NotifySender,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    spawn_driver(connection, notify);
    Ok(client)
}

async fn with_tls(
    config: &tokio_postgres::Config,
    tls_config: &std::sync::Arc<rustls::ClientConfig>,
    notify: NotifySender,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = RustlsConnector(tls_config.clone());
    let (client, connection) = config.connect(tls).await?;
    spawn_driver(connection, notify);
    Ok(client)
}

/// Runs the connection's I/O until the client is dropped or the connection fails; the
/// failure also surfaces on the client's next call, so here it is only logged. Notifications
/// go to `notify` when given, other asynchronous messages (notices) are dropped.
fn spawn_driver<S, T>(mut connection: tokio_postgres::Connection<S, T>, notify: NotifySender)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    if let Some(tx) = &notify {
                        let _ = tx.try_send(n);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "sql connection ended");
                    break;
                }
                None => break,
            }
        }
    });
}

/// The server's message (and detail/hint) rather than tokio-postgres's generic "db error";
/// row values in them are withheld unless `[log] row_contents` is on
/// ([`crate::telemetry::shown_detail`]).
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    db_message(e, true)
}

/// [`pg_message`] with row values always kept, for text stored next to the row it is about
/// (the trigger mode's dead-letter table), never for logs or errors.
pub fn pg_message_with_values(e: &tokio_postgres::Error) -> String {
    db_message(e, false)
}

fn db_message(e: &tokio_postgres::Error, redact: bool) -> String {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let (message, detail) = if redact {
                (
                    crate::telemetry::shown_message(code, db.message()),
                    crate::telemetry::shown_detail(code, db.detail()),
                )
            } else {
                (db.message().into(), db.detail())
            };
            let mut s = message.into_owned();
            if let Some(d) = detail {
                let _ = write!(s, " ({d})");
            }
            if let Some(h) = db.hint() {
                let _ = write!(s, "; hint: {h}");
            }
            s
        }
        None => e.to_string(),
    }
}

/// Connecting to, a statement on, the catalog of, or a replication command on one named node
/// failed: the per-node error of the
/// one-shot commands (`setup`, `copy`, `verify`, `skip`, `tail`), which wrap it as their own
/// variant. Its class (retry or stop) is decided in [`crate::direction::Classify`].
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node could not be reached.
    #[error("node {node}: {source}")]
    Connect {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// A statement failed on the node.
    #[error("node {node}: {what}: {}", pg_message(source))]
    Sql {
        /// The node.
        node: String,
        /// What was being done.
        what: String,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The node's catalog could not be read.
    #[error("node {node}: {source}")]
    Catalog {
        /// The node.
        node: String,
        /// The cause.
        #[source]
        source: crate::catalog::CatalogError,
    },
    /// A replication-protocol command failed on the node.
    #[error("node {node}: {what}: {source}")]
    Replication {
        /// The node.
        node: String,
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: crate::protocol::ProtocolError,
    },
}

impl NodeError {
    /// Maps a failed statement on `node` while doing `what` (for `map_err`).
    pub fn sql(node: &str, what: &str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let (node, what) = (node.to_string(), what.to_string());
        move |source| NodeError::Sql { node, what, source }
    }

    /// Maps a failed connection to `node` (for `map_err`).
    pub fn connect(node: &str) -> impl FnOnce(ConnectError) -> Self {
        let node = node.to_string();
        move |source| NodeError::Connect { node, source }
    }

    /// Maps a failed catalog read on `node` (for `map_err`).
    pub fn catalog(node: &str) -> impl FnOnce(crate::catalog::CatalogError) -> Self {
        let node = node.to_string();
        move |source| NodeError::Catalog { node, source }
    }

    /// Maps a failed replication command on `node` while doing `what` (for `map_err`).
    pub fn replication(
        node: &str,
        what: &str,
    ) -> impl FnOnce(crate::protocol::ProtocolError) -> Self {
        let (node, what) = (node.to_string(), what.to_string());
        move |source| NodeError::Replication { node, what, source }
    }
}

/// Whether retrying may help after a statement failed: by the SQLSTATE when the server sent
/// one ([`sqlstate_is_transient`]), else (connection closed, I/O failure, timeout) yes.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => sqlstate_is_transient(db.code().code()),
        None => true,
    }
}

/// Whether the session's role is a superuser.
pub async fn is_superuser(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_append_session_settings() {
        let d = Dsn::parse("host=h options='-c search_path=x'").unwrap();
        assert_eq!(
            startup_options(&d),
            format!("-c search_path=x {SESSION_OPTIONS}")
        );
        let d = Dsn::parse("host=h").unwrap();
        assert_eq!(startup_options(&d), SESSION_OPTIONS);
    }

    fn auth_request(code: u32, body: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        let len = u32::try_from(8 + body.len()).unwrap();
        m.extend(len.to_be_bytes());
        m.extend(code.to_be_bytes());
        m.extend(body);
        m
    }

    /// Feeds `stream` to a guard in chunks of `chunk` bytes; the method refused, if any.
    fn guard_verdict(policy: &str, ssl: bool, stream: &[u8], chunk: usize) -> Option<AuthMethod> {
        let mut g = AuthGuard::new((), policy.parse().unwrap(), ssl);
        for piece in stream.chunks(chunk) {
            if let Err(refused) = g.inspect(piece) {
                return Some(refused.method);
            }
        }
        None
    }

    #[test]
    fn auth_guard_refuses_what_require_auth_rules_out() {
        let notice = {
            let mut m = vec![b'N'];
            m.extend(10u32.to_be_bytes());
            m.extend(b"Mhello");
            m
        };
        let md5 = auth_request(5, b"salt");
        let clear = auth_request(3, b"");
        let sasl = auth_request(10, b"SCRAM-SHA-256\0\0");
        let ok = auth_request(0, b"");
        for chunk in [1, 3, 1000] {
            let v = |p: &str, ssl: bool, s: &[u8]| guard_verdict(p, ssl, s, chunk);
            let scram_only = "scram-sha-256";
            assert_eq!(v(scram_only, false, &md5), Some(AuthMethod::Md5));
            assert_eq!(v(scram_only, false, &clear), Some(AuthMethod::Password));
            assert_eq!(v(scram_only, false, &[&sasl[..], &ok].concat()), None);
            // After SSLRequest: 'N' then plain messages are still policed.
            assert_eq!(
                v(scram_only, true, &[&b"N"[..], &notice, &md5].concat()),
                Some(AuthMethod::Md5)
            );
            // 'S': TLS takes over (the guard above TLS polices).
            assert_eq!(v(scram_only, true, &[&b"S"[..], &md5].concat()), None);
            // Trust: AuthenticationOk with nothing asked is "none".
            assert_eq!(v(scram_only, false, &ok), Some(AuthMethod::None));
            assert_eq!(v("none", false, &ok), None);
            assert_eq!(v("!password,!md5", false, &[&ok[..], &md5].concat()), None);
            assert_eq!(v("!password", false, &clear), Some(AuthMethod::Password));
            // After AuthenticationOk, everything passes.
            assert_eq!(v("md5", false, &[&md5[..], &ok, &clear].concat()), None);
        }
    }

    #[test]
    fn sqlstate_classes() {
        for code in ["57P03", "57P01", "08006", "53300", "55006"] {
            assert!(sqlstate_is_transient(code), "{code}");
        }
        for code in ["28P01", "28000", "3D000", "42704", "55000", "XX000"] {
            assert!(!sqlstate_is_transient(code), "{code}");
        }
    }

    #[tokio::test]
    async fn refused_is_transient_and_names_the_node() {
        // Bind then drop a listener to find a port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let d = Dsn::parse(&format!(
            "host=127.0.0.1 port={port} user=u dbname=d sslmode=disable password=hunter2"
        ))
        .unwrap();
        let e = connect(&d, "test").await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        let text = e.to_string();
        assert!(text.contains(&format!("u@127.0.0.1:{port}/d")), "{text}");
        assert!(!text.contains("hunter2"));
    }
}
