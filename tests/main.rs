//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod cli;
mod decoding;
mod heavy;
mod localpg;
mod protocol;
mod replication;
mod setup;
mod tail;
mod tls;
