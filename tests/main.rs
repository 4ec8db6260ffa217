//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod cli;
mod localpg;
mod observability;
mod protocol;
mod replication;
mod setup;
mod status;
mod tls;
