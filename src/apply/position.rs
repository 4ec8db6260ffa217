//! The progress seam: a committed source transaction's position is recorded in the same
//! target transaction as its data, whatever kind of position the source has.
//!
//! ```text
//!   stream mode   Commit.end_lsn ─▶ apply_finish(expected, end_lsn, t)
//!                                   (the session's replication origin: progress + stamp)
//!   trigger mode  Recorded ───────▶ its statements (walbridge.trigger_progress and
//!                                   trigger_applied rows), then apply_finish(NULL, 0/0, t)
//!                                   (the stamp only: the origin's LSN stays where the
//!                                   stream left it, which the cut-over relies on)
//! ```
//!
//! A stream transaction carries nothing here (no allocation on the stream's path); a source
//! whose position is not an LSN hands the applier a [`Recorded`] before each commit
//! ([`super::Applier::set_next_position`]). Such positions carry no order the target could
//! check (`apply_finish`'s `expected`), so their source runs the applier with one group in
//! flight (`ApplyLimits::max_in_flight = 1`). What follows the target's commit is the
//! source's own hook: stream mode confirms the LSN to the slot, trigger mode deletes the
//! applied change rows at the source once the applier is idle.
//!
//! A transaction with nothing to apply (every change skipped as walbridge's own) records
//! nothing, as in stream mode it moves no origin: the next transaction's position covers it,
//! and a source whose last transaction it was records that position itself (trigger mode's
//! progress-only commit).

/// A source position that is not an LSN, as the statements that record it on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// SQL (parameters as text, `$n::text::<type>`) and its parameters, run in order inside
    /// the transaction that applies the data, before it commits.
    pub statements: Vec<(&'static str, Vec<Option<String>>)>,
}
