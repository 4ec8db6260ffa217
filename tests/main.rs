//! Integration tests against real PostgreSQL clusters.
