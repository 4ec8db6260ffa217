//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod cli;
mod localpg;
mod setup;
mod trigger;
