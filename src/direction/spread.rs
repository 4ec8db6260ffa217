//! Spreading directions over instances: with k live instances and D directions, each owns at
//! most ⌈D/k⌉ within a minute.
//!
//! Instances see each other through the sessions they already hold: every instance keeps an
//! apply session on every target, owner or standby, named `walbridge-apply-<S>-to-<T>@<instance>`
//! (see [`super::claim`]), so the distinct instance names in the nodes' `pg_stat_activity` are
//! the live instances; a dead one disappears with its sessions. No registry of our own.
//!
//! ```text
//!   every 5 s: k = distinct instances seen on the nodes, share = ⌈D/k⌉
//!     owned > share  ─▶ ask one owned direction to release (at a transaction boundary),
//!                       then wait 5 s before asking again
//!     owned ≥ share  ─▶ standbys of this instance do not try to claim
//! ```

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::claim;
use super::state::StatusBoard;
use crate::config::Config;
use crate::pgconn;

/// How often the instances are counted.
const INTERVAL: Duration = Duration::from_secs(5);

/// After asking a direction to go, how long before asking another (the others need a moment
/// to claim it, and the count to settle).
const RELEASE_PAUSE: Duration = Duration::from_secs(5);

/// What the directions of this instance share: the fair share and release requests.
#[derive(Clone, Debug)]
pub struct Fleet {
    share: Arc<AtomicUsize>,
    release: Arc<Mutex<Option<(String, String)>>>,
}

impl Fleet {
    /// A fleet of one until others are seen: the share is every direction.
    pub fn new(directions: usize) -> Self {
        Fleet {
            share: Arc::new(AtomicUsize::new(directions)),
            release: Arc::new(Mutex::new(None)),
        }
    }

    /// The most directions this instance should own.
    pub fn share(&self) -> usize {
        self.share.load(Ordering::Relaxed)
    }

    /// True (once) when S→T should be handed to another instance.
    pub fn take_release(&self, source: &str, target: &str) -> bool {
        let mut r = self.release.lock().unwrap_or_else(|p| p.into_inner());
        if r.as_ref().is_some_and(|(s, t)| s == source && t == target) {
            *r = None;
            true
        } else {
            false
        }
    }

    fn ask_release(&self, source: &str, target: &str) {
        let mut r = self.release.lock().unwrap_or_else(|p| p.into_inner());
        *r = Some((source.to_string(), target.to_string()));
    }
}

/// ⌈directions / instances⌉ (every direction when no instance is known).
pub fn fair_share(directions: usize, instances: usize) -> usize {
    if instances == 0 {
        directions
    } else {
        directions.div_ceil(instances)
    }
}

async fn instances_on(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT application_name FROM pg_catalog.pg_stat_activity \
             WHERE application_name LIKE 'walbridge-apply-%@%'",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(0))
        .filter_map(|a| claim::instance_of(&a).map(str::to_string))
        .collect())
}

/// Counts instances and asks for releases until shutdown.
pub async fn run(
    config: Arc<Config>,
    fleet: Fleet,
    status: StatusBoard,
    shutdown: CancellationToken,
) {
    let total = config.directions().len();
    let me = config.run.instance.clone();
    let mut clients: Vec<Option<Client>> = config.nodes.iter().map(|_| None).collect();
    let mut last_release: Option<tokio::time::Instant> = None;
    let mut last_k = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        let mut seen = BTreeSet::from([me.clone()]);
        for (node, slot) in config.nodes.iter().zip(clients.iter_mut()) {
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = pgconn::connect(&node.dsn, "walbridge-spread").await.ok();
            }
            if let Some(c) = slot.as_ref() {
                match instances_on(c).await {
                    Ok(names) => seen.extend(names),
                    Err(e) => debug!(node = %node.name, error = %e, "counting instances skipped"),
                }
            }
        }
        let k = seen.len();
        let share = fair_share(total, k);
        fleet.share.store(share, Ordering::Relaxed);
        if k != last_k {
            info!(instances = k, share, "instances serving this configuration");
            last_k = k;
        }
        let owned: Vec<(String, String)> = status
            .directions()
            .into_iter()
            .filter(|d| d.owned)
            .map(|d| (d.source, d.target))
            .collect();
        let paused = last_release.is_some_and(|at| at.elapsed() < RELEASE_PAUSE);
        if owned.len() > share && !paused {
            if let Some((s, t)) = owned.last() {
                info!(source = %s, target = %t, owned = owned.len(), share, "over this instance's share; handing a direction over");
                fleet.ask_release(s, t);
                last_release = Some(tokio::time::Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_is_the_ceiling() {
        assert_eq!(fair_share(6, 3), 2);
        assert_eq!(fair_share(6, 4), 2);
        assert_eq!(fair_share(6, 5), 2);
        assert_eq!(fair_share(2, 3), 1);
        assert_eq!(fair_share(6, 0), 6);
    }

    #[test]
    fn a_release_is_taken_once_by_its_direction() {
        let f = Fleet::new(2);
        f.ask_release("a", "b");
        assert!(!f.take_release("b", "a"));
        assert!(f.take_release("a", "b"));
        assert!(!f.take_release("a", "b"));
    }
}
