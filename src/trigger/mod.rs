//! Trigger mode: replication through a trigger-fed change table, for nodes where logical
//! decoding is not possible (`wal_level = replica`, no REPLICATION right), and as a drop-in
//! replacement for the old polling script and its `database_changes` table.
//!
//! # The change table
//!
//! The old script's table, used as it is (`id`, `metodo`, `tabla`, `descripcion` as text,
//! json or jsonb), plus walbridge's columns, all with defaults so rows written by old
//! triggers or by hand stay valid:
//!
//! ```text
//!   id bigserial PK | metodo | tabla | descripcion | origin_node | txid xid8 | created_at | old_key
//!                                                     node that    writing      logged at   key before
//!                                                     made it      transaction              an update
//! ```
//!
//! `walbridge_capture` (AFTER INSERT/UPDATE/DELETE FOR EACH ROW, `sql/trigger_capture.sql`)
//! logs the new row, or the key for a delete, and the old key when an update changed it.
//! `walbridge_capture_truncate` logs TRUNCATE. A statement-level trigger on the change table
//! sends `NOTIFY <prefix>_changes`: one per statement, merged by PostgreSQL into one per
//! transaction, never one per row; rows written by old triggers wake the workers too.
//!
//! # Echo
//!
//! The capture functions log nothing for a session with `walbridge.skip = on` (walbridge's
//! apply sessions set it; so does `walbridge.skip_session()`) or with a replication origin
//! set up (walbridge's stream-mode apply). The apply session also runs with
//! `session_replication_role = replica` (when the role may), so the old script's triggers,
//! ordinary `ENABLE` triggers, do not fire for applied changes either. Where they still fire
//! (no superuser), their rows get `origin_node` from the session's `walbridge.origin`
//! setting through the column default, and a row whose `origin_node` is another node is an
//! echo: it is deleted without being applied (counted in `walbridge_echo_suppressed_total`).
//!
//! # One direction S → T
//!
//! [`run_direction`] LISTENs on S and wakes on a notification or every `poll_interval`. It
//! reads up to `batch_size` rows in `id` order, turns them into source transactions (one per
//! run of rows of one `txid`, [`events`]) and hands them to the same applier as stream mode
//! ([`crate::apply::Applier`]): applied on T under the origin `<prefix>_from_S` with each
//! transaction's commit time on S, `walbridge.skip = on`, each target transaction recording
//! the change-table cursor it reached ([`crate::apply::position`]). Only once T has committed
//! are the rows deleted at S. A crash before T's commit repeats the rows from S (nothing was
//! applied); after it, the restart finds the progress on T and only deletes at S (nothing is
//! applied twice). The failpoint `WALBRIDGE_FAILPOINT=trigger_after_commit` aborts the process
//! at exactly that point.
//!
//! # Why progress is not just "the last applied id"
//!
//! Ids come from a sequence when a row is logged, but transactions commit in another order:
//! row 10 of a long transaction can become visible after row 11 of a short one was applied.
//! "Everything up to 11 is applied" would then lose row 10. So progress on T
//! (`walbridge.trigger_progress`) is a pair `(last_id, hold_xid)`, read in one snapshot:
//!
//! ```text
//!   every row with id <= last_id visible at that snapshot is applied;
//!   a row with id <= last_id not visible then belongs to a transaction >= hold_xid
//!   (hold_xid = the snapshot's xmin: every older transaction had ended)
//! ```
//!
//! Each read takes the new rows (`id > last_id`) and the late ones (`id <= last_id`, `txid >=
//! hold_xid`), minus those late rows already applied, which T lists in
//! `walbridge.trigger_applied` until `hold_xid` passes them (a handful, except while a
//! transaction stays open on S for long). Same-row changes are never reordered: a later
//! change of a row waits for the earlier one's commit before it is logged, so it has the
//! larger id.
//!
//! # N nodes
//!
//! Every direction from S reads the same change table; a row is deleted once every peer has
//! applied it. Each direction publishes its `(last_id, hold_xid)` in S's
//! `walbridge.trigger_peer_progress` (a hint: the authority is on the peer) and, under an
//! advisory lock per change table, deletes the rows it just applied that every other peer
//! has applied too; so the last peer to apply a row deletes it. With two nodes this is a
//! plain `DELETE ... WHERE id = ANY(batch)`. A peer that is down keeps S's rows (the
//! `walbridge_trigger_queue_depth` gauge shows it).
//!
//! # Bad rows
//!
//! A row that cannot be applied (unknown `metodo`; `tabla` not a replicated table of the
//! target, checked against the configuration and the catalog; `descripcion` that is neither
//! JSON nor a Python dict literal; unknown column; a value its column cannot take; a type or
//! constraint error) is copied to `<table>_dead` with the error and the target's name, and
//! counts as handled; the rows after it go on. Rows checked in Rust never reach SQL. A row the
//! target refuses in SQL is named by the applier, which applies that one transaction change
//! by change ([`crate::direction::FailedChange`]); the worker then reads the batch again from
//! T's progress with that row dead, so a bad row costs one extra round and a good one is
//! never lost. Errors that are about the target rather than the row (permissions,
//! read-only, disk) stop the direction instead of filling the dead-letter table.
//!
//! # Conflicts
//!
//! Decided by the applier exactly as in stream mode: the incoming version is S's commit time
//! (`pg_xact_commit_timestamp(txid)`, else the latest `created_at` of the transaction's rows)
//! and S's rank; the target's row version comes from its commit time and origin; tombstones
//! from `walbridge.tombstones`; the journal records the change row's id
//! (`source_change_id`). One difference remains: a legacy update that carries only some
//! columns cannot recreate a missing row. A role that may not use replication origins
//! applies without one (rows keep T's commit time; a warning says so).
//!
//! # Cut-over to stream mode
//!
//! `setup` with `mode = "stream"` on a node in trigger mode (`setup::capture::cut_over`), after it
//! created the node's slots (so their consistent point is before everything below):
//!
//! ```text
//!   slots created ─── fence F ─────────────────── drain ──── done
//!   (C)               one transaction: DROP the    apply every change row with id <= the
//!                     capture triggers, record     fence id, to every peer; then the
//!                     max(id), emit a logical      stream starts after F
//!                     message
//! ```
//!
//! Dropping a trigger waits for the transactions writing its table and blocks new writers
//! until F commits, so a transaction committed before F has its change rows and one
//! committed after F has none. The slots are then advanced to the end of F's commit record,
//! found by decoding the slot itself (`pg_logical_slot_peek_binary_changes`, F's xid), so
//! the stream skips exactly the transactions that committed before F. The change rows
//! (exactly those transactions) are drained by the trigger-mode apply before `setup` returns,
//! so nothing is lost or applied twice, and the applications write throughout (blocked only
//! for the moment F takes its locks). Each step is recorded in `walbridge.settings`: a failed
//! cut-over resumes when `setup` runs again.

mod change;
mod cursor;
mod ddl;
pub mod events;
pub mod legacy;
pub mod mode;
pub mod sql;
mod worker;

pub use change::{Op, RawRow, RowError};
pub use cursor::{recorded_progress, State};
pub use mode::{choose, node_mode, node_modes, CaptureMode, NodeMode};
pub use sql::{channel, CAPTURE_TRIGGER, NOTIFY_TRIGGER, TRUNCATE_TRIGGER};
pub use worker::{drain_direction, run_direction, FAILPOINT_AFTER_COMMIT};
