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

use super::careful::Failed;
use super::Applier;
use crate::direction::DirectionError;
use crate::lsn::Lsn;

/// A source position that is not an LSN, as the statements that record it on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// SQL (parameters as text, `$n::text::<type>`) and its parameters, run in order inside
    /// the transaction that applies the data, before it commits.
    pub statements: Vec<(&'static str, Vec<Option<String>>)>,
}

/// `apply_finish`'s `expected` and `end_lsn` parameters: the origin's progress check and
/// advance for an LSN; for a recorded position neither (NULL, `0/0`: the stamp only). In
/// stream mode this is the only place the seam costs anything: a bool per group.
pub(super) fn finish_lsns(recorded: bool, expected: Lsn, end: Lsn) -> (Option<String>, String) {
    if recorded {
        (None, Lsn::ZERO.to_string())
    } else {
        (Some(expected.to_string()), end.to_string())
    }
}

impl Applier {
    /// Encodes the statements of the open group's last transaction's recorded position, if it
    /// has one (true then). They are parsed while the group is open, so a failed group
    /// forgets them with its other statements.
    pub(super) fn encode_recorded(&mut self) -> Result<bool, DirectionError> {
        let Some(recorded) = self
            .group
            .as_ref()
            .and_then(|g| g.members.last())
            .and_then(|m| m.recorded.clone())
        else {
            return Ok(false);
        };
        for (sql, params) in &recorded.statements {
            self.execute_text(sql, params)?;
        }
        Ok(true)
    }

    /// Runs the statements of a recorded position in the careful transaction.
    pub(super) async fn exec_recorded(&mut self, recorded: &Recorded) -> Result<(), Failed> {
        for (sql, params) in &recorded.statements {
            let params: Vec<Option<&[u8]>> = params
                .iter()
                .map(|p| p.as_deref().map(str::as_bytes))
                .collect();
            self.exec(sql, &params).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_position_neither_checks_nor_moves_the_origin() {
        let (a, b): (Lsn, Lsn) = ("0/10".parse().unwrap(), "0/20".parse().unwrap());
        assert_eq!(
            finish_lsns(false, a, b),
            (Some("0/10".to_string()), "0/20".to_string())
        );
        assert_eq!(finish_lsns(true, a, b), (None, "0/0".to_string()));
    }
}
