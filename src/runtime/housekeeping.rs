//! Keeps walbridge's own bookkeeping small: conflict records older than
//! `replication.conflict_retention` and delete tombstones older than
//! `replication.tombstone_retention` are removed on every node, once at start and then every
//! ten minutes. A tombstone's age is the commit time of the deletion it records.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::pgconn;

/// How often the purge runs.
const INTERVAL: Duration = Duration::from_secs(600);

/// Purges until shutdown.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) {
    // Whole seconds as float8: a parameter of a type tokio-postgres can send, turned into an
    // interval by the server (`make_interval`), so no text is parsed on either side.
    let conflicts = config.replication.conflict_retention.as_secs_f64();
    let tombstones = config.replication.tombstone_retention.as_secs_f64();
    loop {
        for node in &config.nodes {
            let Ok(client) = pgconn::connect(&node.dsn, "walbridge-housekeeping").await else {
                continue;
            };
            let result = client
                .query_one(
                    "WITH c AS (DELETE FROM walbridge.conflicts
                                 WHERE resolved_at < pg_catalog.now()
                                       - pg_catalog.make_interval(secs => $1::float8)
                                 RETURNING 1),
                          t AS (DELETE FROM walbridge.tombstones
                                 WHERE coalesce(pg_catalog.pg_xact_commit_timestamp(xmin), '-infinity')
                                       < pg_catalog.now()
                                         - pg_catalog.make_interval(secs => $2::float8)
                                 RETURNING 1)
                     SELECT (SELECT pg_catalog.count(*) FROM c), (SELECT pg_catalog.count(*) FROM t)",
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
                Err(e) => {
                    warn!(node = %node.name, error = %e, "housekeeping skipped: old conflict records and tombstones were not purged")
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}
