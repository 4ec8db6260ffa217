//! Integration tests against real PostgreSQL clusters.

mod cli;
