//! Ownership of a direction when several `walbridge run` instances serve one configuration.
//!
//! A direction S→T is owned by the instance whose apply session on T holds a session advisory
//! lock keyed by T's origin for S. The lock is taken by the applying session itself, before it
//! sets up the origin, so the claim lives exactly as long as that connection: a process that
//! dies or is cut off loses it when PostgreSQL ends the session (the TCP connection breaks,
//! or a server timeout such as `idle_session_timeout` ends a session that stopped talking).
//!
//! ```text
//!   instance a ── apply session on T ── pg_try_advisory_lock(WALB, key(origin)) = true  ─▶ owner
//!   instance b ── apply session on T ── pg_try_advisory_lock(WALB, key(origin)) = false ─▶ standby,
//!                                        asks again every 1–2 s on the same session
//! ```
//!
//! A session that holds a claim asks its target for progress every 500 ms while it lives;
//! it sets `idle_session_timeout` to [`IDLE_LIMIT`], so when its process stops (SIGSTOP, a
//! wedged machine whose TCP stack still answers) the server ends the session, and with it
//! the claim, after that long, without anyone having to terminate it.
//!
//! The lock only decides who should work; what keeps two instances from applying the same
//! changes is what PostgreSQL enforces anyway: the slot on S streams to one walsender at a
//! time (a second `START_REPLICATION` fails with 55006), the origin on T can be set up by one
//! session at a time, and the applier refuses progress that goes backwards. An old owner that
//! comes back after its session was ended has lost the lock with the session and finds the
//! claim taken.

use std::time::Duration;

use rand::Rng;
use tracing::info;

use super::{DirectionContext, DirectionError, DirectionState};
use crate::protocol::pipeline::Pipeline;

/// A claim-holding apply session that says nothing for this long (outside a transaction) is
/// ended by its server, which releases the claim for another instance.
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// After handing a direction over, how long this instance waits before it may claim it again.
pub const HANDOVER_PAUSE: Duration = Duration::from_secs(5);

/// The first key of every walbridge claim ("WALB"), so other advisory locks do not collide.
const CLAIM_CLASS: i32 = 0x5741_4c42;

/// The second key: FNV-1a of the origin name (stable across servers and versions, unlike
/// `hashtext`).
fn claim_key(origin: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in origin.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(h.to_ne_bytes())
}

/// The `application_name` of the apply session: the direction, then `@instance`, so the
/// owner can be read from `pg_stat_activity` by anyone.
pub fn apply_application_name(source: &str, target: &str, instance: &str) -> String {
    format!("walbridge-apply-{source}-to-{target}@{instance}")
}

/// The instance named in an apply session's `application_name`.
pub fn instance_of(application_name: &str) -> Option<&str> {
    application_name
        .strip_prefix("walbridge-apply-")
        .and_then(|rest| rest.split_once('@'))
        .map(|(_, instance)| instance)
        .filter(|i| !i.is_empty())
}

/// (source, target, instance) from an apply session's `application_name`.
pub fn parse_owner(application_name: &str) -> Option<(&str, &str, &str)> {
    let rest = application_name.strip_prefix("walbridge-apply-")?;
    let (direction, instance) = rest.split_once('@')?;
    let (source, target) = direction.split_once("-to-")?;
    (!instance.is_empty()).then_some((source, target, instance))
}

/// One query: try the claim, and name the session that holds it when it is not ours.
pub fn claim_sql(origin: &str) -> String {
    let key = claim_key(origin);
    format!(
        "SELECT pg_catalog.pg_try_advisory_lock({CLAIM_CLASS}, {key}), \
         (SELECT a.application_name FROM pg_catalog.pg_locks l \
            JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
          WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
            AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                              WHERE datname = pg_catalog.current_database()) \
            AND l.classid = ({CLAIM_CLASS})::pg_catalog.oid \
            AND l.objid = ({key})::pg_catalog.oid \
            AND l.pid <> pg_catalog.pg_backend_pid() \
          LIMIT 1)"
    )
}

/// Like [`claim_sql`] without trying: `false` and the holder.
fn holder_sql(origin: &str) -> String {
    claim_sql(origin).replacen(
        &format!(
            "pg_catalog.pg_try_advisory_lock({CLAIM_CLASS}, {})",
            claim_key(origin)
        ),
        "false",
        1,
    )
}

/// The `application_name` of every session holding a walbridge claim in the current database
/// (one row each; [`parse_owner`] reads direction and instance back).
pub fn owners_sql() -> String {
    format!(
        "SELECT a.application_name FROM pg_catalog.pg_locks l \
           JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
           AND l.classid = ({CLAIM_CLASS})::pg_catalog.oid \
           AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                             WHERE datname = pg_catalog.current_database()) \
           AND a.application_name LIKE 'walbridge-apply-%'"
    )
}

/// Waits until this instance holds the direction's claim on the apply session `pipe`:
/// `Ok(true)` once it does, `Ok(false)` when shutdown came first.
pub async fn acquire(ctx: &DirectionContext, pipe: &mut Pipeline) -> Result<bool, DirectionError> {
    let (s, t) = (ctx.source.as_str(), ctx.target.as_str());
    let origin = ctx.config.origin_name(s);
    let sql = claim_sql(&origin);
    let holder = holder_sql(&origin);
    let instance = ctx.config.run.instance.as_str();
    let mut announced = false;
    loop {
        // At its share already: stand by without trying (the session stays, so the other
        // instances count this one).
        let owned = ctx.status.directions().iter().filter(|d| d.owned).count();
        let rows = if owned >= ctx.fleet.share() {
            pipe.simple(&holder)
        } else {
            pipe.simple(&sql)
        };
        let rows = rows
            .await
            .map_err(|e| DirectionError::caused_by(e.to_string(), &e))?
            .map_err(|e| {
                DirectionError::transient(format!("node {t}: claiming direction {s} -> {t}: {e}"))
            })?;
        let row = rows.first();
        let cell = |i: usize| {
            row.and_then(|r| r.get(i))
                .and_then(|c| c.as_deref())
                .and_then(|b| std::str::from_utf8(b).ok())
        };
        if cell(0) == Some("t") {
            pipe.simple(&format!(
                "SET idle_session_timeout = '{}s'",
                IDLE_LIMIT.as_secs()
            ))
            .await
            .map_err(|e| DirectionError::caused_by(e.to_string(), &e))?
            .map_err(|e| {
                DirectionError::transient(format!("node {t}: setting idle_session_timeout: {e}"))
            })?;
            info!(source = %s, target = %t, instance, "claimed direction");
            ctx.report(|st| {
                st.owner = Some(instance.to_string());
                st.owned = true;
            });
            return Ok(true);
        }
        let owner = cell(1).and_then(instance_of).map(str::to_string);
        if !announced {
            info!(source = %s, target = %t, owner = owner.as_deref().unwrap_or("unknown"), "standing by: another instance owns the direction");
            announced = true;
        }
        ctx.report(|st| {
            st.state = DirectionState::Standby;
            st.owner = owner;
            st.owned = false;
            st.last_error = None;
        });
        let wait = Duration::from_millis(rand::rng().random_range(1000..2000));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Marks the claim as given up (the session that held it is closed or about to be).
pub fn released(ctx: &DirectionContext, why: &str) {
    let mut was_owned = false;
    ctx.report(|st| {
        was_owned = st.owned;
        st.owned = false;
        st.owner = None;
    });
    if was_owned {
        info!(source = %ctx.source, target = %ctx.target, instance = %ctx.config.run.instance, why, "released direction");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_read_back_from_the_application_name() {
        let name = apply_application_name("east", "west", "pod-7f9c:12");
        assert_eq!(instance_of(&name), Some("pod-7f9c:12"));
        assert_eq!(instance_of("walbridge-apply-east-to-west"), None);
        assert_eq!(instance_of("psql"), None);
        assert_eq!(parse_owner(&name), Some(("east", "west", "pod-7f9c:12")));
    }

    #[test]
    fn claim_keys_differ_per_origin_and_are_stable() {
        assert_ne!(
            claim_key("walbridge_from_east"),
            claim_key("walbridge_from_west")
        );
        // FNV-1a of "a", fixed forever: instances of different versions must agree.
        assert_eq!(
            claim_key("a"),
            i32::from_ne_bytes(0xe40c_292c_u32.to_ne_bytes())
        );
    }
}
