//! Trigger-mode directions are claimed like stream directions, so that of several instances
//! only one drains a change table into a peer.
//!
//! The claim is the same session advisory lock on the target, keyed by the target's origin
//! for the source ([`claim::claim_sql`]), held by a session of its own named like an apply
//! session (`walbridge-apply-<S>-to-<T>@<instance>`), so `status`, the owner metric and the
//! spreading count it as for a stream direction. The trigger worker runs only while that
//! session lives: the session answers a ping every [`PING`], and when it fails (the target
//! went away, or its server ended the session) the worker is dropped between or inside a step,
//! which is safe (the target's transaction commits with its progress or not at all, and the
//! source's rows are deleted only after).
//!
//! ```text
//!   claim session on T ── pg_try_advisory_lock = t ──▶ run the trigger worker
//!        │ ping every 2 s (idle_session_timeout 10 s ends it if this process stops)
//!        └── ping fails ──▶ drop the worker, release, retry as a standby
//! ```

use std::time::Duration;

use rand::Rng;
use tracing::info;

use super::{claim, DirectionContext, DirectionError, DirectionState};
use crate::pgconn;

/// How often the claim session proves it is alive (well inside [`claim::IDLE_LIMIT`]).
const PING: Duration = Duration::from_secs(2);

/// Runs the trigger-mode direction once this instance holds its claim; `Ok(())` on
/// shutdown.
pub async fn run(ctx: &DirectionContext) -> Result<(), DirectionError> {
    let (s, t) = (ctx.source.as_str(), ctx.target.as_str());
    let node = ctx
        .config
        .node(t)
        .ok_or_else(|| DirectionError::definite(format!("node {t} is not configured")))?;
    let instance = ctx.config.run.instance.as_str();
    let client = pgconn::connect(&node.dsn, &claim::apply_application_name(s, t, instance))
        .await
        .map_err(|e| DirectionError::caused_by(format!("node {t}: {e}"), &e))?;
    let lost = |e: tokio_postgres::Error| {
        DirectionError::transient(format!(
            "node {t}: the claim session of direction {s} -> {t}: {}",
            crate::setup::pg_message(&e)
        ))
    };
    let origin = ctx.config.origin_name(s);
    let try_sql = claim::claim_sql(&origin);
    let mut announced = false;
    loop {
        // At its share already: stand by without trying, as a stream direction does.
        let owned = ctx.status.directions().iter().filter(|d| d.owned).count();
        let (claimed, holder) = if owned >= ctx.fleet.share() {
            (false, None)
        } else {
            let row = client.query_one(&try_sql, &[]).await.map_err(lost)?;
            (row.get::<_, bool>(0), row.get::<_, Option<String>>(1))
        };
        if claimed {
            break;
        }
        let owner = holder
            .as_deref()
            .and_then(claim::instance_of)
            .map(str::to_string);
        if !announced {
            info!(source = %s, target = %t, owner = owner.as_deref().unwrap_or("unknown"), "standing by: another instance owns the direction");
            announced = true;
        }
        ctx.report(|st| {
            st.mode = "trigger".into();
            st.state = DirectionState::Standby;
            st.owner = owner;
            st.owned = false;
            st.last_error = None;
        });
        let wait = Duration::from_millis(rand::rng().random_range(1000..2000));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
    client
        .batch_execute(&format!(
            "SET idle_session_timeout = '{}s'",
            claim::IDLE_LIMIT.as_secs()
        ))
        .await
        .map_err(lost)?;
    info!(source = %s, target = %t, instance, "claimed direction");
    ctx.report(|st| {
        st.owner = Some(instance.to_string());
        st.owned = true;
    });
    let worker = crate::trigger::run_direction(ctx);
    tokio::pin!(worker);
    let mut ping = tokio::time::interval(PING);
    loop {
        tokio::select! {
            biased;
            // The worker ends on shutdown or with its own error.
            r = &mut worker => return r,
            // Keeps the claim (and proves it is still ours): a failed ping drops the worker.
            _ = ping.tick() => {
                client.simple_query("SELECT 1").await.map_err(lost)?;
            }
        }
    }
}
