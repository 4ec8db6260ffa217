//! Pure decoders from output-plugin bytes to [`crate::event::Event`]s.
//!
//! No I/O and no tokio here: a decoder takes the payload of one XLogData message (and the
//! WAL position it started at) and returns at most one event. Wire input never makes a
//! decoder panic; malformed input is a [`DecodeError`], which the pipeline treats as definite
//! (the stream cannot be trusted past it).

pub mod frame;
pub mod pgoutput;
pub mod wal2json;

/// A message from the output plugin could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// pgoutput bytes were malformed or unexpected.
    #[error(transparent)]
    PgOutput(#[from] pgoutput::PgOutputError),
    /// A wal2json document was malformed or unexpected.
    #[error(transparent)]
    Wal2Json(#[from] wal2json::Wal2JsonError),
}
