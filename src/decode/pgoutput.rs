//! pgoutput (the built-in logical replication output plugin) decoder.
