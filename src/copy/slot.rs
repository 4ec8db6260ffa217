//! The slot NODE→peer, created with an exported snapshot over the replication protocol.
//!
//! `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT` returns the slot's consistent point and the
//! name of a snapshot that sees exactly the transactions committed before it. Copy sessions
//! import it (`SET TRANSACTION SNAPSHOT`), so the copy holds everything before the consistent
//! point and the slot streams everything after it: no gap, no overlap. The snapshot stays
//! importable only while the creating session stays open and idle, so [`ExportedSlot`] keeps
//! that session until the copy is done.

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::CopyError;
use crate::dsn::Dsn;
use crate::lsn::Lsn;
use crate::protocol::{self, ConnectOptions, ReplicationClient, SnapshotAction};

/// A freshly created slot and the open session holding its exported snapshot.
pub struct ExportedSlot {
    /// The slot's name.
    pub name: String,
    /// Where streaming from the slot starts.
    pub consistent_point: Lsn,
    /// The snapshot to import in copy transactions.
    pub snapshot: String,
    /// The source's clock right after the slot was created, as text (UTC): the commit time
    /// the copied rows get on the peer. Every row in the snapshot was committed before it.
    pub taken_at: String,
    session: ReplicationClient,
}

impl ExportedSlot {
    /// Ends the session that held the snapshot (the slot itself stays).
    pub async fn release(self) {
        let _ = self.session.into_inner().close().await;
    }
}

/// Creates the logical slot `name` on the source with an exported snapshot.
///
/// `sql` is an ordinary session on the same node: it reads the clock afterwards, and on
/// cancellation it cancels the slot creation (which may wait a long time for running
/// transactions), so the server drops the half-made slot itself.
pub async fn create(
    node: &str,
    dsn: &Dsn,
    sql: &Client,
    name: &str,
    plugin: &str,
    shutdown: &CancellationToken,
) -> Result<ExportedSlot, CopyError> {
    let repl_err = |what: &str| {
        let replication = crate::pgconn::NodeError::replication(node, what);
        move |source| CopyError::Node(replication(source))
    };
    let conn = protocol::connect(
        dsn,
        ConnectOptions {
            application_name: format!("walbridge-copy-slot-{name}"),
            replication: true,
            // The session sits idle in its snapshot-holding transaction for the whole copy.
            params: vec![
                ("idle_in_transaction_session_timeout".into(), "0".into()),
                ("idle_session_timeout".into(), "0".into()),
                ("statement_timeout".into(), "0".into()),
            ],
        },
    )
    .await
    .map_err(repl_err("opening a replication session"))?;
    let pid = conn.backend_key().map(|(pid, _)| pid);
    let mut session = ReplicationClient::new(conn);
    let created = {
        let create = session.create_logical_slot(name, plugin, false, SnapshotAction::Export);
        tokio::pin!(create);
        tokio::select! {
            biased;
            r = &mut create => r,
            _ = shutdown.cancelled() => {
                if let Some(pid) = pid {
                    let _ = sql.execute("SELECT pg_catalog.pg_cancel_backend($1)", &[&pid]).await;
                }
                // Let the server answer (an error after the cancel, or success if it was done).
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), &mut create).await;
                return Err(CopyError::Interrupted);
            }
        }
    }
    .map_err(repl_err(&format!("creating slot {name}")))?;
    let snapshot = created.snapshot_name.ok_or_else(|| CopyError::Other {
        node: node.to_string(),
        message: format!("slot {name} was created without an exported snapshot"),
    })?;
    let taken_at: String = sql
        .query_one("SELECT pg_catalog.clock_timestamp()::text", &[])
        .await
        .map_err(super::sql_err(node, "reading the clock"))?
        .get(0);
    Ok(ExportedSlot {
        name: created.slot_name,
        consistent_point: created.consistent_point,
        snapshot,
        taken_at,
        session,
    })
}

/// Drops slot `name` on the source if it exists, first ending a session still holding it.
/// Returns whether a slot was dropped.
pub async fn drop_if_exists(sql: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    for _ in 0..50 {
        let Some(row) = sql
            .query_opt(
                "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?
        else {
            return Ok(false);
        };
        let pid: Option<i32> = row.get(0);
        match pid {
            Some(pid) => {
                sql.execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
                    .await?;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            None => {
                match sql
                    .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&name])
                    .await
                {
                    Ok(_) => return Ok(true),
                    // Taken again in between (55006), or gone (42704): look again.
                    Err(e)
                        if e.code()
                            .is_some_and(|c| c.code() == "55006" || c.code() == "42704") =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Ok(false)
}
