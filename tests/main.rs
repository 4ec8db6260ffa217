//! Integration tests against real PostgreSQL clusters; one binary, one module per area.

mod support;

mod localpg;
mod protocol;
mod tls;
