//! The target session an applier writes through.
//!
//! Kept apart from the rest of the applier because it is the only state that must match the
//! server's: `prepared` names exactly the statements this session has parsed (or has been
//! asked to parse in what `enc` holds), so a name is never used before its `Parse` and never
//! reused for other SQL. Statements first parsed inside a group that fails are forgotten
//! (closed and removed) together, see `Applier::forget_statements`.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::protocol::pipeline::{Encoder, Pipeline};

/// The pipelined apply session on the target, its prepared statements, and the catalog client
/// (a second, ordinary connection for lookups outside the apply transaction).
pub(super) struct Session {
    /// The pipelined connection groups are sent on; replies come back in order.
    pub(super) pipe: Pipeline,
    /// Messages encoded and not yet sent.
    pub(super) enc: Encoder,
    /// Catalog lookups (table descriptions, tombstones, parked changes).
    pub(super) catalog: Client,
    /// SQL text → prepared statement name on this session.
    pub(super) prepared: HashMap<String, String>,
    /// The last number used in a statement name (`wb<n>`).
    pub(super) statement_seq: u64,
}

impl Session {
    /// Prepared statement name for `sql`, adding its `Parse` to the buffer the first time;
    /// a new name is recorded in `parsed` (the open group's, when there is one).
    pub(super) fn statement(
        &mut self,
        sql: &str,
        parsed: Option<&mut Vec<String>>,
    ) -> Result<String, crate::protocol::ProtocolError> {
        if let Some(name) = self.prepared.get(sql) {
            return Ok(name.clone());
        }
        self.statement_seq += 1;
        let name = format!("wb{}", self.statement_seq);
        self.enc.parse(&name, sql)?;
        self.prepared.insert(sql.to_string(), name.clone());
        if let Some(parsed) = parsed {
            parsed.push(name.clone());
        }
        Ok(name)
    }
}
