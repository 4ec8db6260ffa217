//! wal2json format-version 2 decoder.

/// A wal2json document could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum Wal2JsonError {}
