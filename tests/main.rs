//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod cli;
mod conflicts;
mod copy;
mod decoding;
mod demo;
mod ha;
mod heavy;
mod heavy_convergence;
mod heavy_resilience;
mod localpg;
mod observability;
mod packaging;
mod protocol;
mod replication;
mod setup;
mod status;
mod tail;
mod tls;
mod trigger;
mod verify;
