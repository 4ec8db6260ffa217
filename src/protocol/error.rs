//! Errors of the wire client, each classified once as transient or definite.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

use crate::tls::{self, TlsError};

/// Whether a server error code means "try again later" rather than "fix something first".
///
/// Transient: connection exceptions (class 08), shutdown/restart (57P01, 57P02, 57P03),
/// idle-session timeouts (57P05), resource shortages (class 53, e.g. too many connections),
/// serialization failures and deadlocks (40001, 40P01), a replication slot still held by
/// a walsender that is going away (55006), a node that refuses writes for now (25006: a
/// read-only transaction, e.g. `default_transaction_read_only` or a standby about to be
/// promoted), a lock not granted within `lock_timeout` (55P03) and a statement cancelled
/// (57014: `statement_timeout`, `pg_cancel_backend`). Everything else is definite.
pub fn sqlstate_is_transient(code: &str) -> bool {
    matches!(
        code,
        "57P01"
            | "57P02"
            | "57P03"
            | "57P05"
            | "40001"
            | "40P01"
            | "55006"
            | "25006"
            | "55P03"
            | "57014"
    ) || code.starts_with("08")
        || code.starts_with("53")
}

/// Whether a server error code says a statement met a table (42P01) or column (42703) that
/// does not exist: on a target, one dropped there since walbridge read its catalog.
pub fn sqlstate_is_undefined_object(code: &str) -> bool {
    matches!(code, "42P01" | "42703")
}

/// Whether an I/O failure is the kind that heals (peer gone, network trouble) rather than a
/// local misconfiguration.
pub fn io_is_transient(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidData
            | io::ErrorKind::Unsupported
    )
}

/// An `ErrorResponse` from the server, with the fields an operator needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC` (non-localized when the server sends it).
    pub severity: String,
    /// Five-character SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
    /// Schema of the object the error is about, when the server names one (field `s`).
    pub schema: Option<String>,
    /// Table the error is about, when the server names one (field `t`): walbridge's own
    /// errors set it (`RAISE … USING TABLE`) so the applier never parses a message.
    pub table: Option<String>,
}

impl ServerError {
    /// Reads the fields of an `ErrorResponse` or `NoticeResponse` body.
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> Result<Self, io::Error> {
        let mut e = ServerError::default();
        let mut localized_severity = None;
        while let Some(f) = fields.next()? {
            let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'V' => e.severity = value,
                b'S' => localized_severity = Some(value),
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                b's' => e.schema = Some(value),
                b't' => e.table = Some(value),
                _ => {}
            }
        }
        if e.severity.is_empty() {
            e.severity = localized_severity.unwrap_or_default();
        }
        Ok(e)
    }

    /// The message and detail with row values kept, for text stored next to the row it is
    /// about (trigger mode's dead-letter table), never for logs or errors (use `Display`).
    pub fn text_with_values(&self) -> String {
        match &self.detail {
            Some(d) => format!("{} (SQLSTATE {}); {d}", self.message, self.code),
            None => format!("{} (SQLSTATE {})", self.message, self.code),
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Row values (a key in a DETAIL, a value in a data exception) stay out by default.
        let message = crate::telemetry::shown_message(&self.code, &self.message);
        write!(f, "{message} (SQLSTATE {})", self.code)?;
        if let Some(d) = crate::telemetry::shown_detail(&self.code, self.detail.as_deref()) {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

/// "authentication failed for user ...", without repeating the server's own words.
pub(crate) fn auth_failure(user: &str, server: &ServerError) -> String {
    let mut text = if server.message.contains("authentication") {
        server.to_string()
    } else {
        format!("authentication failed for user {user:?}: {server}")
    };
    if server.code == "28P01" {
        text.push_str(
            "; check the password configured for this node (DSN, password_file, PGPASSWORD or \
             ~/.pgpass)",
        );
    }
    text
}

fn channel_binding_text(tls: bool) -> String {
    if tls {
        "channel_binding=require, but the server did not offer SCRAM-SHA-256-PLUS on this TLS \
         session (or its certificate's signature algorithm has no channel-binding hash, such as \
         RSA-PSS or Ed25519); use scram-sha-256 in pg_hba.conf or lower channel_binding"
            .into()
    } else {
        "channel_binding=require needs TLS, but this session is not encrypted; set sslmode=require \
         (or verify-full) and enable ssl on the server"
            .into()
    }
}

/// What went wrong, without the node address.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing the socket failed (includes refused connections).
    #[error("{0}")]
    Io(#[source] Arc<io::Error>),
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,
    /// No answer within `connect_timeout` (or another deadline).
    #[error("no answer within {}s ({what})", .after.as_secs())]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// Certificate or key files could not be loaded.
    #[error(transparent)]
    TlsConfig(Arc<TlsError>),
    /// The TLS handshake failed (certificate verification, alerts).
    #[error("{}", tls::explain(.0))]
    Tls(#[source] rustls::Error),
    /// sslmode requires TLS but the server does not offer it.
    #[error(
        "the server does not accept TLS connections, but sslmode requires TLS; enable ssl on the \
         server or lower sslmode"
    )]
    TlsUnsupported,
    /// The server rejected our credentials.
    #[error("{}", auth_failure(user, server))]
    Auth {
        /// The role we tried to log in as.
        user: String,
        /// What the server said.
        server: ServerError,
    },
    /// The server wants a password and none was configured.
    #[error(
        "the server asks for a password for user {0:?} and none is configured; put it in the \
         DSN, password_file, PGPASSWORD or ~/.pgpass"
    )]
    PasswordMissing(String),
    /// An authentication method we do not implement.
    #[error(
        "the server asks for {0} authentication, which walbridge does not support; use \
         scram-sha-256, md5, password or trust in pg_hba.conf for this user"
    )]
    UnsupportedAuth(String),
    /// The server asked for a method `require_auth` / `channel_binding` rules out.
    #[error(transparent)]
    AuthRefused(crate::dsn::AuthRefused),
    /// `channel_binding=require`, but SCRAM could not be bound to the TLS session.
    #[error("{}", channel_binding_text(*.tls))]
    ChannelBindingUnavailable {
        /// Whether the session runs over TLS.
        tls: bool,
    },
    /// The SCRAM exchange failed on our side (bad server proof or malformed messages).
    #[error("SCRAM authentication failed: {0}")]
    Scram(String),
    /// An `ErrorResponse` from the server.
    #[error("{0}")]
    Server(ServerError),
    /// The server sent something the protocol does not allow at this point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server ended the replication stream on its own.
    #[error(
        "the server ended the replication stream (it is probably shutting down or restarting)"
    )]
    StreamEnded,
    /// The server's state is not what `target_session_attrs` asks for (a standby when a
    /// primary is wanted): retried, since a promotion changes it.
    #[error("{0}")]
    SessionAttrs(String),
}

/// A wire-protocol operation failed on a node.
///
/// The message starts with the node (`user@host:port/db`) and never contains a password.
#[derive(Clone, Debug)]
pub struct ProtocolError {
    address: String,
    kind: Box<ErrorKind>,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.address, self.kind)
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The kind's text is already part of our message; expose only what lies beneath it.
        std::error::Error::source(&*self.kind)
    }
}

impl ProtocolError {
    /// An error of `kind` on the node described by `address`.
    pub fn new(address: impl Into<String>, kind: ErrorKind) -> Self {
        ProtocolError {
            address: address.into(),
            kind: Box::new(kind),
        }
    }

    pub(crate) fn io(address: &str, e: io::Error) -> Self {
        // tokio-rustls reports handshake failures as io::Error wrapping rustls::Error.
        if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Self::new(address, ErrorKind::Tls(t.clone()));
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Self::new(address, ErrorKind::Closed);
        }
        Self::new(address, ErrorKind::Io(Arc::new(e)))
    }

    pub(crate) fn protocol(address: &str, what: impl Into<String>) -> Self {
        Self::new(address, ErrorKind::Protocol(what.into()))
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The node, as `user@host:port/dbname`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The server's error, when the server reported one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match &*self.kind {
            ErrorKind::Server(s) | ErrorKind::Auth { server: s, .. } => Some(s),
            _ => None,
        }
    }

    /// The SQLSTATE, when the server reported an error.
    pub fn code(&self) -> Option<&str> {
        self.server_error().map(|s| s.code.as_str())
    }

    /// True when retrying later may succeed: I/O failures, closed connections, timeouts, a
    /// server starting up or shutting down, a slot still held by a departing walsender.
    /// False for what needs a change first: authentication, TLS verification, a missing or
    /// invalidated slot, SQL errors (classes 42, 55 and the rest), protocol violations.
    pub fn is_transient(&self) -> bool {
        match &*self.kind {
            ErrorKind::Io(e) => io_is_transient(e),
            ErrorKind::Closed
            | ErrorKind::Timeout { .. }
            | ErrorKind::StreamEnded
            | ErrorKind::SessionAttrs(_) => true,
            ErrorKind::Tls(e) => !tls::is_definite(e),
            ErrorKind::Server(s) => sqlstate_is_transient(&s.code),
            ErrorKind::TlsConfig(_)
            | ErrorKind::TlsUnsupported
            | ErrorKind::Auth { .. }
            | ErrorKind::PasswordMissing(_)
            | ErrorKind::UnsupportedAuth(_)
            | ErrorKind::AuthRefused(_)
            | ErrorKind::ChannelBindingUnavailable { .. }
            | ErrorKind::Scram(_)
            | ErrorKind::Protocol(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> ProtocolError {
        ProtocolError::new(
            "u@h:5432/d",
            ErrorKind::Server(ServerError {
                severity: "ERROR".into(),
                code: code.into(),
                message: message.into(),
                ..Default::default()
            }),
        )
    }

    #[test]
    fn classification() {
        assert!(server("57P03", "the database system is starting up").is_transient());
        assert!(server(
            "57P01",
            "terminating connection due to administrator command"
        )
        .is_transient());
        assert!(!server("42704", "replication slot \"x\" does not exist").is_transient());
        assert!(!server("55000", "cannot read from logical replication slot").is_transient());
        assert!(!server("42601", "syntax error").is_transient());
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert!(ProtocolError::io("a", refused).is_transient());
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "eof");
        assert!(matches!(
            ProtocolError::io("a", eof).kind(),
            ErrorKind::Closed
        ));
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = ProtocolError::io("a", tls);
        assert!(!e.is_transient());
        let text = e.to_string();
        assert!(
            text.contains("certificate") && text.contains("verif"),
            "{text}"
        );
    }

    #[test]
    fn message_names_node_and_server_fields() {
        let mut e = server("42704", "replication slot \"x\" does not exist");
        if let ErrorKind::Server(s) = &mut *e.kind {
            s.hint = Some("create it".into());
        }
        assert_eq!(
            e.to_string(),
            "u@h:5432/d: replication slot \"x\" does not exist (SQLSTATE 42704); hint: create it"
        );
        assert_eq!(e.code(), Some("42704"));
    }
}
