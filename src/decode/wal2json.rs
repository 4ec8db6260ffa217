//! wal2json format-version 2 decoder.
