//! A real applier on a test deployment, for tests that drive `walbridge::apply` directly
//! (a chosen interleaving, a hand-built transaction) instead of through the binary.

use std::sync::Arc;

use walbridge::apply::{Applier, ApplyLimits};
use walbridge::config::Config;
use walbridge::lsn::Lsn;
use walbridge::protocol::{self, pipeline::Pipeline, ConnectOptions};

/// Starts the applier of direction `source -> target` as the runtime does: a pipelined
/// (non-replication) apply session on `target`, its driver spawned, and a catalog session.
/// Returns it with the progress it read back from the target's replication origin.
pub async fn start_applier(
    config: Arc<Config>,
    source: &str,
    target: &str,
    limits: ApplyLimits,
) -> (Applier, Lsn) {
    let dsn = config.node(target).expect("target node").dsn.clone();
    let mut options = ConnectOptions::replication(format!("walbridge-test-apply-{target}"));
    options.replication = false;
    let raw = protocol::connect(&dsn, options)
        .await
        .expect("apply session");
    let (pipe, driver) = Pipeline::from_raw(raw);
    tokio::spawn(driver);
    let catalog = walbridge::pgconn::connect(&dsn, "walbridge-test-catalog")
        .await
        .expect("catalog session");
    Applier::start(
        pipe,
        catalog,
        config,
        source,
        target,
        walbridge::metrics::Metrics::new(),
        limits,
    )
    .await
    .expect("applier")
}
