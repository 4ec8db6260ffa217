//! walbridge: PostgreSQL active-active replication.
//!
//! Every node's changes are read from a logical replication slot (pgoutput or wal2json) or,
//! where logical decoding is unavailable, from a trigger-fed change table, decoded into one
//! event model ([`event`]) and applied to every peer under a replication origin, so nothing
//! echoes back and progress commits atomically with the data.
//!
//! ```text
//!   node A ──slot──▶ protocol ──▶ decode ──▶ apply ──origin──▶ node B
//!   node B ──slot──▶ protocol ──▶ decode ──▶ apply ──origin──▶ node A
//! ```
//!
//! The binary (`walbridge`) is a thin shell over [`cli`].

pub mod apply;
pub mod assets;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod conflict;
pub mod copy;
pub mod decode;
pub mod demo;
pub mod direction;
pub mod dsn;
pub mod event;
pub mod forensics;
pub mod http;
pub mod localpg;
pub mod lsn;
pub mod metrics;
pub mod pgconn;
pub mod protocol;
pub mod runtime;
pub mod setup;
pub mod source;
pub mod status;
pub mod tail;
pub mod telemetry;
pub mod tls;
pub mod trigger;
pub mod verify;
pub mod version;
