//! Pure decoders from output-plugin bytes to [`crate::event::Event`]s.

pub mod pgoutput;
pub mod wal2json;
