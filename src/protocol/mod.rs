//! The PostgreSQL wire protocol client for replication connections.
