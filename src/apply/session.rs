//! The target session an applier writes through.
//!
//! Kept apart from the rest of the applier because it is the only state that must match the
//! server's. [`Session::open`] sets it up once for its whole life (the source's replication
//! origin, `walbridge.skip`, commit durability, the fixed statements); after that,
//! `prepared` names exactly the statements this session has parsed (or has been asked to
//! parse in what `enc` holds), so a name is never used before its `Parse` and never reused
//! for other SQL. Statements first parsed inside a group that fails are forgotten (closed and
//! removed) together, see `Applier::forget_statements`.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::{proto, server, sql, text};
use crate::catalog;
use crate::direction::DirectionError;
use crate::lsn::Lsn;
use crate::protocol::pipeline::{Encoder, Pipeline, Response};

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
    /// Whether the session applies under the source's replication origin (always, but for a
    /// source with recorded positions whose role may not use origins, see
    /// `ApplyLimits::allow_no_origin`): without it no commit calls `apply_finish`.
    pub(super) origin: bool,
}

impl Session {
    /// Prepares the target session: settings, the replication `origin` of the source, and the
    /// statements every transaction uses. Returns the session, the origin's progress (the
    /// LSN to stream from) and every origin on the target (`roident`, `roname`).
    pub(super) async fn open(
        mut pipe: Pipeline,
        catalog: Client,
        origin: &str,
        source: &str,
        target: &str,
        durable_commits: bool,
        allow_no_origin: bool,
    ) -> Result<(Session, Lsn, Vec<(i64, String)>), DirectionError> {
        // A superuser may set session_replication_role, and so may a role granted it
        // (`GRANT SET ON PARAMETER session_replication_role TO ...`, PostgreSQL 15+).
        let may_replica_role = pipe
            .simple("SELECT pg_catalog.has_parameter_privilege('session_replication_role', 'SET')")
            .await
            .map_err(proto)?
            .map_err(|e| server(target, "reading the role's privileges", e))?;
        let may_replica_role = may_replica_role
            .first()
            .and_then(|r| r.first())
            .and_then(text)
            == Some("t");
        let mut settings = String::from(if durable_commits {
            // Every value but `off` flushes the commit locally: keep the server's.
            "SELECT pg_catalog.set_config('synchronous_commit', 'on', false) \
              WHERE pg_catalog.current_setting('synchronous_commit') = 'off'; \
             SET walbridge.skip = 'on'; SET lock_timeout = 0; SET statement_timeout = 0; "
        } else {
            "SET synchronous_commit = off; SET walbridge.skip = 'on'; \
             SET lock_timeout = 0; SET statement_timeout = 0; "
        });
        if may_replica_role {
            // Like PostgreSQL's own apply workers: user triggers and FK checks do not fire
            // for replicated rows (walbridge's own triggers are ENABLE ALWAYS). Without it
            // they fire; a change-logging trigger then logs an echo (see `walbridge.origin`).
            settings.push_str("SET session_replication_role = replica; ");
        }
        // The source, for change-logging triggers that fire anyway (trigger mode's change
        // table defaults `origin_node` to it): what they log is an echo, never sent back.
        settings.push_str(&format!(
            "SELECT pg_catalog.set_config('walbridge.origin', {}, false); ",
            catalog::quote_literal(source)
        ));
        pipe.simple(&settings)
            .await
            .map_err(proto)?
            .map_err(|e| server(target, "preparing the apply session", e))?;
        let setup = format!(
            "SELECT pg_catalog.pg_replication_origin_session_setup({})",
            catalog::quote_literal(origin)
        );
        let origin_set = match pipe.simple(&setup).await.map_err(proto)? {
            Ok(_) => true,
            Err(e) if e.code == "42501" && allow_no_origin => {
                tracing::warn!(
                    node = target,
                    origin,
                    "no permission to use replication origins; applied changes keep the \
                     target's commit time and conflicts compare it (grant EXECUTE on the \
                     pg_replication_origin_* functions to walbridge's role to keep the source's)"
                );
                false
            }
            Err(e) => {
                // The class is the SQLSTATE's (55006 is transient, 42704 definite); the code
                // only picks the words. 55006 object_in_use: "replication origin … is already
                // active for PID …"; 42704 undefined_object: "replication origin … does not
                // exist".
                let msg = match e.code.as_str() {
                    "55006" => format!(
                        "node {target}: origin {origin} is still held by another session \
                         (a previous walbridge process?); retrying: {e}"
                    ),
                    "42704" => format!(
                        "node {target}: replication origin {origin} does not exist; run walbridge setup"
                    ),
                    _ => return Err(server(target, "preparing the apply session", e)),
                };
                return Err(DirectionError::caused_by(msg, &e));
            }
        };
        let progress = if origin_set {
            let rows = pipe
                .simple("SELECT pg_catalog.pg_replication_origin_session_progress(false)")
                .await
                .map_err(proto)?
                .map_err(|e| server(target, "reading the origin's progress", e))?;
            rows.first()
                .and_then(|r| r.first())
                .and_then(text)
                .and_then(|t| t.parse::<Lsn>().ok())
                .unwrap_or(Lsn::ZERO)
        } else {
            Lsn::ZERO
        };
        // pg_replication_origin is closed to roles without the origin rights: then no row
        // version on the target names its writer.
        let origins = match pipe
            .simple("SELECT roident::int8, roname FROM pg_catalog.pg_replication_origin")
            .await
            .map_err(proto)?
        {
            Ok(rows) => rows,
            Err(e) if e.code == "42501" && !origin_set => Vec::new(),
            Err(e) => return Err(server(target, "listing origins", e)),
        };
        let origins = origins
            .iter()
            .filter_map(|r| {
                Some((
                    text(r.first()?)?.parse::<i64>().ok()?,
                    text(r.get(1)?)?.to_string(),
                ))
            })
            .collect::<Vec<_>>();
        // The statements every transaction uses are prepared up front, in a group of their
        // own: a Parse inside a transaction's group is skipped when an earlier statement of
        // that group fails.
        let mut enc = Encoder::default();
        let mut prepared = HashMap::new();
        for (i, sql) in [
            sql::APPLY_FINISH,
            sql::FLUSHED_PROGRESS,
            crate::conflict::SERIALIZE_APPLIERS_SQL,
        ]
        .iter()
        .enumerate()
        {
            let name = format!("wb_fixed{i}");
            enc.parse(&name, sql).map_err(proto)?;
            prepared.insert(sql.to_string(), name);
        }
        enc.sync();
        pipe.send(enc.take()).await.map_err(proto)?;
        loop {
            match pipe.recv().await.map_err(proto)? {
                Response::Error(e) => {
                    return Err(server(
                        target,
                        "preparing walbridge.apply_finish (run walbridge setup to install it)",
                        e,
                    ))
                }
                Response::Ready(_) => break,
                _ => {}
            }
        }
        let session = Session {
            pipe,
            enc: Encoder::default(),
            catalog,
            prepared,
            statement_seq: 0,
            origin: origin_set,
        };
        Ok((session, progress, origins))
    }

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
