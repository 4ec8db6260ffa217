//! Keeps walbridge's own bookkeeping small: conflict records older than
//! `replication.conflict_retention` and delete tombstones older than
//! `replication.tombstone_retention` are removed on every node, once at start and then every
//! ten minutes. A tombstone's age is the commit time of the deletion it records.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::Config;
use crate::pgconn;

/// How often the purge runs.
const INTERVAL: Duration = Duration::from_secs(600);

/// Purges until shutdown.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) {
    let conflicts = format!(
        "{} seconds",
        config.replication.conflict_retention.as_secs()
    );
    let tombstones = format!(
        "{} seconds",
        config.replication.tombstone_retention.as_secs()
    );
    loop {
        for node in &config.nodes {
            let Ok(client) = pgconn::connect(&node.dsn, "walbridge-housekeeping").await else {
                continue;
            };
            let result = client
                .query_one(
                    "WITH c AS (DELETE FROM walbridge.conflicts
                                 WHERE resolved_at < pg_catalog.now() - $1::interval RETURNING 1),
                          t AS (DELETE FROM walbridge.tombstones
                                 WHERE coalesce(pg_catalog.pg_xact_commit_timestamp(xmin), '-infinity')
                                       < pg_catalog.now() - $2::interval RETURNING 1)
                     SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM t)",
                    &[&conflicts, &tombstones],
                )
                .await;
            match result {
                Ok(row) => {
                    let (c, t): (i64, i64) = (row.get(0), row.get(1));
                    if c + t > 0 {
                        info!(node = %node.name, conflicts = c, tombstones = t, "purged old bookkeeping rows");
                    }
                }
                Err(e) => debug!(node = %node.name, error = %e, "housekeeping skipped"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}
