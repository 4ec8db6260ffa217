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
//! Unix-socket hosts never use TLS (as libpq). Every session gets `DateStyle=ISO`,
//! `IntervalStyle=postgres`, `TimeZone=UTC` and `extra_float_digits=3` through the startup
//! `options`, so values read from one node and written to another travel as unambiguous
//! text.

use std::io;
use std::time::Duration;

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::dsn::{Dsn, Host, SslMode};
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
    if let Some(tls_err) = tls::find_rustls_error(e) {
        return (tls::explain(tls_err), !tls::is_definite(tls_err));
    }
    let top = e.to_string();
    let cause = std::error::Error::source(e).map(|c| c.to_string());
    if top.starts_with("authentication error") {
        let what = cause.unwrap_or_default();
        let reason = if what.contains("password missing") {
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
    for (i, (host, port)) in dsn.addresses().into_iter().enumerate() {
        let address = dsn.describe_host(i);
        let mut config = base_config(dsn, application_name);
        match &host {
            Host::Tcp(h) => config.host(h),
            Host::Unix(p) => config.host_path(p),
        };
        config.port(port);
        let attempt = connect_one(dsn, &host, config, tls_config.clone(), notify.clone());
        let result = match dsn.connect_timeout {
            Some(t) => match tokio::time::timeout(t, attempt).await {
                Ok(r) => r.map_err(|e| ConnectError::from_postgres(address.clone(), &dsn.user, &e)),
                Err(_) => Err(ConnectError::timeout(address.clone(), t)),
            },
            None => attempt
                .await
                .map_err(|e| ConnectError::from_postgres(address.clone(), &dsn.user, &e)),
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
    config
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
    let tls = MakeRustlsConnect::new(rustls::ClientConfig::clone(tls_config));
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
