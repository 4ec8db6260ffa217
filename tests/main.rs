//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod architecture;
mod cli;
mod conflict_model;
mod conflicts;
mod copy;
mod data_safety;
mod decoding;
mod demo;
mod drift;
mod failover;
mod faults;
mod forensics;
mod ha;
mod ha_trigger;
mod heavy;
mod heavy_convergence;
mod heavy_histories;
mod heavy_resilience;
mod localpg;
mod observability;
mod packaging;
mod park;
mod protocol;
mod replication;
mod schema;
mod security;
mod setup;
mod skip;
mod status;
mod streaming;
mod tail;
mod tls;
mod trigger;
mod verify;
