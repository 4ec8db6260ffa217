//! Replicated schema changes: a `walbridge.ddl()` statement applied at its point of the stream.
//!
//! On the source, `walbridge.ddl(statement)` (`sql/ddl.sql`) runs the statement and emits a
//! transactional logical message `<slot_prefix>_ddl` carrying it and the caller's
//! `search_path`. The message sits in the source transaction exactly where the statement ran,
//! so here it is applied between the changes before it and the changes after it:
//!
//! ```text
//!   source txn:  INSERT t ... | message ddl("ALTER TABLE t ADD c") | INSERT t (c) ...
//!   target txn:  BEGIN; INSERT t ...; walbridge.ddl_apply(path, stmt); INSERT t (c) ...; COMMIT
//! ```
//!
//! A transaction holding a schema change is applied on the careful path (one round trip per
//! step, an explicit transaction on the apply session), for two reasons: a change after the
//! statement may need a table the statement created or altered, which only the apply
//! session's own uncommitted transaction can see (so table descriptions are read through that
//! session while it is open, see [`Applier::table_info_in_txn`]); and nothing after it may be
//! grouped or pipelined with it before it committed. When the message arrives before any change
//! of its transaction was encoded (the common case, `SELECT walbridge.ddl(...)` on its own or
//! first), the group gathered so far is sent and the transaction goes careful at once;
//! otherwise what was encoded is abandoned and the stream is read again from the target's
//! progress, with that transaction careful from its start.
//!
//! The statement runs under the session's replication origin like every applied change, so the
//! target's own slots leave it out (it never echoes, also with three or more nodes), and the
//! target runs `walbridge.ddl_apply`, never `walbridge.ddl()`, so nothing records it again.
//! After it, every cached target table description is dropped: the next change of any table
//! reads the catalog again. A statement that fails stops the direction with the statement (it
//! is schema, not row data) and the server's error.

use super::careful::Failed;
use super::{text, Applier, Item, Outcome};
use crate::catalog::{self, TableInfo};
use crate::direction::DirectionError;
use crate::event::{LogicalMessage, SchemaChange};

/// The message prefix `walbridge.ddl()` uses with this slot prefix.
pub(super) fn message_prefix(slot_prefix: &str) -> String {
    format!("{slot_prefix}_ddl")
}

impl Applier {
    /// A logical message of the source transaction: a schema change when its prefix is
    /// walbridge's, ignored otherwise.
    pub(super) async fn on_message(
        &mut self,
        message: LogicalMessage,
    ) -> Result<Outcome, DirectionError> {
        if !message.transactional || message.prefix != self.ddl_prefix {
            return Ok(Outcome::Continue);
        }
        let (careful, nothing_encoded, xid) = match &self.open {
            None => {
                return Err(DirectionError::definite(format!(
                    "the stream from {} sent a schema change outside a transaction",
                    self.source
                )))
            }
            Some(open) => (
                open.careful_as_it_arrives,
                open.changes == 0,
                open.begin.xid,
            ),
        };
        let ddl = SchemaChange::parse(&message.content).map_err(|e| {
            DirectionError::definite(format!(
                "{} -> {}: the schema change at {} (message {}) is not what walbridge.ddl() \
                 writes: {e}; are the nodes running the same walbridge version?",
                self.source, self.target, message.lsn, message.prefix
            ))
        })?;
        if careful {
            self.careful_mode_item(Item::Ddl(ddl)).await?;
            return Ok(Outcome::Continue);
        }
        if nothing_encoded && self.ledger.pending_failure.is_none() && self.ledger.redo.is_empty() {
            // Send what gathered before this transaction, then apply it carefully.
            let open = self.open.take();
            let outcome = self.close_group().await;
            self.open = open;
            if outcome? == Outcome::Restream {
                self.careful_xid = Some(xid);
                return Ok(Outcome::Restream);
            }
            if self.ledger.redo.is_empty() {
                if let Some(open) = self.open.as_mut() {
                    open.careful_as_it_arrives = true;
                }
                self.careful_mode_item(Item::Ddl(ddl)).await?;
                return Ok(Outcome::Continue);
            }
        }
        self.restream_for_ddl(xid).await
    }

    /// Abandons the group being encoded (part of this transaction is in it), settles what was
    /// sent before, and asks for the stream again from the target's progress, with transaction
    /// `xid` applied carefully from its first change.
    async fn restream_for_ddl(&mut self, xid: u32) -> Result<Outcome, DirectionError> {
        if self.ledger.pending_failure.is_some() {
            // A group failed and its redo is not done: start over from the target's progress.
            return Err(DirectionError::transient(format!(
                "{} -> {}: a schema change arrived while a failed group waited to be redone; \
                 restarting from the target's progress",
                self.source, self.target
            )));
        }
        let parsed = self
            .group
            .as_mut()
            .map(|g| std::mem::take(&mut g.parsed))
            .unwrap_or_default();
        self.open = None;
        if self.group.is_some() {
            self.abort_open().await?;
        }
        self.settle_in_flight().await?;
        self.forget_statements(parsed).await?;
        self.ledger.redo.clear();
        self.single_txn_groups_left = 0;
        self.ledger.expected = self.ledger.committed;
        self.careful_xid = Some(xid);
        tracing::debug!(
            source = %self.source, target = %self.target, xid,
            "a schema change inside a transaction: re-reading it to apply it carefully"
        );
        Ok(Outcome::Restream)
    }

    /// Runs a replicated statement inside the open careful transaction.
    pub(super) async fn careful_ddl(&mut self, ddl: &SchemaChange) -> Result<(), Failed> {
        self.in_ddl_txn = true;
        self.tables.states.clear();
        let params = [
            Some(ddl.search_path.as_bytes()),
            Some(ddl.statement.as_bytes()),
        ];
        match self.exec(SchemaChange::APPLY_SQL, &params).await {
            Ok(_) => {
                tracing::info!(
                    source = %self.source, target = %self.target, statement = %ddl.statement,
                    "schema change applied"
                );
                Ok(())
            }
            Err(Failed::Server(e)) if crate::protocol::sqlstate_is_transient(&e.code) => {
                Err(Failed::Server(e))
            }
            Err(Failed::Server(e)) => Err(Failed::Stop(DirectionError::definite(format!(
                "{} -> {}: the schema change replicated from {} failed on {}: {e}; statement \
                 (search_path {}): {}. Make the statement succeed on {} (or make {} match \
                 what the statement expects), then restart walbridge; the transaction is \
                 applied again from that statement",
                self.source,
                self.target,
                self.source,
                self.target,
                ddl.search_path,
                ddl.statement,
                self.target,
                self.target,
            )))),
            Err(f) => Err(f),
        }
    }

    /// The careful transaction that held a schema change ended (committed or rolled back):
    /// table descriptions are read from the catalog connection again, afresh.
    pub(super) fn ddl_txn_ended(&mut self) {
        if std::mem::take(&mut self.in_ddl_txn) {
            self.tables.states.clear();
            self.park.hint();
        }
    }

    /// A table's description as the apply session sees it, inside its open transaction (which
    /// may have created or changed the table); `None` when it does not exist there.
    pub(super) async fn table_info_in_txn(
        &mut self,
        schema: &str,
        name: &str,
    ) -> Result<Option<TableInfo>, DirectionError> {
        let rows = self
            .round_trip(
                catalog::TABLE_INFO_SQL,
                &[Some(schema.as_bytes()), Some(name.as_bytes())],
            )
            .await?
            .map_err(|e| {
                let msg = format!(
                    "node {}: reading the description of {schema}.{name}: {e}",
                    self.target
                );
                DirectionError::caused_by(msg, &e)
            })?;
        let Some(json) = rows.first().and_then(|r| r.first()).and_then(text) else {
            return Ok(None);
        };
        catalog::table_info_from_json(schema, name, json)
            .map(Some)
            .map_err(|e| DirectionError::definite(format!("node {}: {e}", self.target)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_walbridge_ddl_writes() {
        // The text of jsonb_build_object('search_path', ..., 'statement', ...)::text.
        let ddl = SchemaChange::parse(
            br#"{"statement": "ALTER TABLE t ADD COLUMN \"c\" int", "search_path": "\"$user\", public"}"#,
        )
        .expect("valid payload");
        assert_eq!(ddl.statement, r#"ALTER TABLE t ADD COLUMN "c" int"#);
        assert_eq!(ddl.search_path, r#""$user", public"#);
        assert!(SchemaChange::parse(b"ALTER TABLE t").is_err());
        assert_eq!(message_prefix("walbridge"), "walbridge_ddl");
    }
}
