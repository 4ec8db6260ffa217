//! pgoutput (the built-in logical replication output plugin) decoder.

/// pgoutput bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum PgOutputError {}
