//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod cli;
mod copy;
mod localpg;
mod protocol;
mod replication;
mod setup;
mod tls;
mod verify;
