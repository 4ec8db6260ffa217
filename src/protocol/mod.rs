//! The PostgreSQL wire protocol client for replication connections.
//!
//! tokio-postgres cannot open replication sessions, so walbridge speaks the protocol itself
//! on top of `postgres-protocol` (message encoding, SCRAM) and tokio / tokio-rustls:
//!
//! ```text
//!   connect ──▶ RawConnection ──simple_query──▶ rows as text
//!                    │
//!                    └─ ReplicationClient ──identify_system / create_logical_slot / drop_slot
//!                                   │
//!                                   └─ start_logical ──▶ (ReplicationStream, Feedback, driver)
//! ```
//!
//! This layer yields raw XLogData and keepalives and knows nothing of pgoutput or wal2json.
//! It spawns nothing: the replication driver is a future the caller runs.
//!
//! Every error is a [`ProtocolError`] naming the node, classified by
//! [`ProtocolError::is_transient`].

pub mod codec;
mod conn;
mod error;
pub mod pipeline;
mod replication;

pub use codec::SnapshotAction;
pub use conn::{QueryResult, RawConnection};
pub(crate) use error::auth_failure;
pub use error::{
    io_is_transient, sqlstate_is_transient, sqlstate_is_undefined_object, ErrorKind, ProtocolError,
    ServerError,
};
pub use replication::{
    CreatedSlot, DriverFuture, Feedback, ReplicationClient, ReplicationStream, StreamConfig,
    StreamItem, SystemIdentity, XLogData,
};

use crate::dsn::Dsn;

/// Session settings every walbridge connection runs with, as startup `-c` options.
///
/// `search_path=pg_catalog,pg_temp` pins name lookup: walbridge often runs as a superuser,
/// and an unqualified function or operator it calls must never resolve to an object that
/// someone created in `public` or in a schema on the role's default path (the class of
/// CVE-2020-14349). Generated SQL also qualifies the functions it calls; the pin covers the
/// rest (operators, casts to built-in types). These come after the DSN's own `options`, so
/// they win.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=postgres -c TimeZone=UTC \
     -c extra_float_digits=3 -c search_path=pg_catalog,pg_temp";

/// Session settings as `(name, value)` pairs, for clients that send startup parameters
/// (the same as [`SESSION_OPTIONS`]).
pub const SESSION_PARAMS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("search_path", "pg_catalog,pg_temp"),
];

/// How to open a session.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// `application_name`, unless the DSN sets one (walbridge's names say which job and
    /// direction a session serves, e.g. `walbridge-source-east-to-west`).
    pub application_name: String,
    /// Open a logical replication session (`replication=database`).
    pub replication: bool,
    /// Extra startup parameters (`name`, `value`), sent after walbridge's session settings.
    pub params: Vec<(String, String)>,
}

impl ConnectOptions {
    /// A replication session named `application_name`.
    pub fn replication(application_name: impl Into<String>) -> Self {
        ConnectOptions {
            application_name: application_name.into(),
            replication: true,
            params: Vec::new(),
        }
    }
}

/// Opens a session on the first host of `dsn` that accepts it: TCP (or Unix socket) within
/// `connect_timeout`, TLS per `sslmode`, startup with `DateStyle=ISO`,
/// `IntervalStyle=postgres`, `TimeZone=UTC`, `extra_float_digits=3`,
/// `search_path=pg_catalog,pg_temp` and `client_encoding=UTF8`, then trust, password, MD5
/// or SCRAM-SHA-256 authentication.
///
/// The DSN's password must already be resolved ([`Dsn::resolve_password`]).
pub async fn connect(dsn: &Dsn, options: ConnectOptions) -> Result<RawConnection, ProtocolError> {
    conn::connect(dsn, &options).await
}

/// Opens a `replication=database` session and wraps it in a [`ReplicationClient`].
pub async fn connect_replication(
    dsn: &Dsn,
    application_name: &str,
) -> Result<ReplicationClient, ProtocolError> {
    let conn = connect(dsn, ConnectOptions::replication(application_name)).await?;
    Ok(ReplicationClient::new(conn))
}
