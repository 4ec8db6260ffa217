//! Logging setup: human (coloured on a terminal) or JSON lines on stderr, filtered by `RUST_LOG`.
