//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod cli;
mod conflicts;
mod copy;
mod demo;
mod heavy_convergence;
mod heavy_resilience;
mod localpg;
mod protocol;
mod replication;
mod setup;
mod tls;
mod verify;
