//! TLS client configuration from `sslmode` and friends, shared by the replication client and
//! tokio-postgres so both verify certificates exactly as libpq would.

use std::sync::Arc;

use crate::dsn::Dsn;

/// TLS could not be configured (unreadable certificate or key files).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Placeholder until the implementation lands.
    #[error("{0}")]
    Invalid(String),
}

/// The rustls client configuration for this DSN, or `None` when `sslmode=disable`.
pub fn client_config(_dsn: &Dsn) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    todo!("tls client config")
}
