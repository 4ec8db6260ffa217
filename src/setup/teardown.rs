//! `walbridge teardown`: removes what setup created, slots first so no WAL stays pinned, and
//! leaves user data alone (a trigger-mode change table holding rows is kept). A node that cannot be reached is reported and the others are still
//! cleaned.

use std::io::Write;

use tokio_postgres::Client;

use super::{sql_err, SetupError, TOMBSTONE_TRIGGER};
use crate::catalog::quote_ident;
use crate::config::Config;
use crate::pgconn;

/// What `teardown` runs to drop the owners of walbridge's functions (sql/definer_roles.sql):
/// the last part of sql/uninstall.sql, from its comment on them to the end, so the by-hand
/// uninstall and teardown stay one text. Their grants in this database go with `DROP OWNED`;
/// a role still used by walbridge in another database of the cluster stays; only a superuser
/// removes them.
fn drop_definer_roles_sql() -> &'static str {
    const UNINSTALL: &str = include_str!("../../sql/uninstall.sql");
    UNINSTALL
        .find(DEFINER_ROLES_SECTION)
        .map_or("", |at| &UNINSTALL[at..])
}

/// The comment that opens the role-dropping part of sql/uninstall.sql.
const DEFINER_ROLES_SECTION: &str = "-- The NOLOGIN owners of walbridge's functions";

/// Triggers walbridge puts on replicated tables (and the change table), in any mode.
const OWN_TRIGGERS: &[&str] = &[
    TOMBSTONE_TRIGGER,
    crate::trigger::CAPTURE_TRIGGER,
    crate::trigger::TRUNCATE_TRIGGER,
    crate::trigger::NOTIFY_TRIGGER,
];

/// Runs `walbridge teardown` on every reachable node.
pub async fn teardown(config: &Config, out: &mut (dyn Write + Send)) -> Result<(), SetupError> {
    let mut clients = Vec::new();
    let mut unreachable = Vec::new();
    for node in &config.nodes {
        match pgconn::connect(&node.dsn, "walbridge-teardown").await {
            Ok(c) => clients.push((node.name.clone(), c)),
            Err(e) => {
                let _ = writeln!(out, "{}: unreachable, skipped: {e}", node.name);
                unreachable.push(node.name.clone());
            }
        }
    }
    let prefix = &config.replication.slot_prefix;
    // Slots first, on every node, before anything else is dropped.
    for (node, client) in &clients {
        for slot in drop_slots(client, node, prefix).await? {
            let _ = writeln!(out, "{node}: dropped slot {slot}");
        }
    }
    for (node, client) in &clients {
        let origins: Vec<String> = client
            .query(
                "SELECT roname::text FROM pg_catalog.pg_replication_origin
                  WHERE roname LIKE $1 || '\\_from\\_%' OR roname LIKE $1 || '\\_copy\\_%'
                     OR roname = $1 || '_skip'",
                &[prefix],
            )
            .await
            .map_err(sql_err(node, "listing origins"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for origin in origins {
            client
                .execute(
                    "SELECT pg_catalog.pg_replication_origin_drop($1)",
                    &[&origin],
                )
                .await
                .map_err(sql_err(node, format!("dropping origin {origin}")))?;
            let _ = writeln!(out, "{node}: dropped origin {origin}");
        }
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_ident(&config.publication_name())
            ))
            .await
            .map_err(sql_err(node, "dropping the publication"))?;
        // Trigger mode: the change and dead-letter tables go only when walbridge made them
        // and they are empty.
        super::capture::teardown_node(config, client, node, out).await?;
        let triggers = client
            .query(
                "SELECT pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', tgname, tgrelid::regclass)
                   FROM pg_catalog.pg_trigger WHERE tgname = ANY($1) AND tgparentid = 0",
                &[&OWN_TRIGGERS],
            )
            .await
            .map_err(sql_err(node, "listing walbridge triggers"))?;
        for t in &triggers {
            let sql: String = t.get(0);
            client
                .batch_execute(&sql)
                .await
                .map_err(sql_err(node, "dropping a walbridge trigger"))?;
        }
        client
            .batch_execute("DROP SCHEMA IF EXISTS walbridge CASCADE")
            .await
            .map_err(sql_err(node, "dropping the walbridge schema"))?;
        client
            .batch_execute(drop_definer_roles_sql())
            .await
            .map_err(sql_err(
                node,
                "dropping roles walbridge_skip and walbridge_capture",
            ))?;
        let _ = writeln!(
            out,
            "{node}: dropped publication, {} trigger(s) and the walbridge schema",
            triggers.len()
        );
    }
    if unreachable.is_empty() {
        Ok(())
    } else {
        Err(SetupError::Other(format!(
            "could not reach {}; run teardown again when it is back, or run sql/uninstall.sql there",
            unreachable.join(", ")
        )))
    }
}

/// Drops walbridge's slots on one node, stopping a walsender still using one.
async fn drop_slots(client: &Client, node: &str, prefix: &str) -> Result<Vec<String>, SetupError> {
    let rows = client
        .query(
            "SELECT slot_name::text, active_pid FROM pg_catalog.pg_replication_slots
              WHERE slot_name LIKE $1 || '\\_%\\_to\\_%' AND database = pg_catalog.current_database()",
            &[&prefix],
        )
        .await
        .map_err(sql_err(node, "listing slots"))?;
    let mut dropped = Vec::new();
    for row in rows {
        let slot: String = row.get(0);
        let pid: Option<i32> = row.get(1);
        if let Some(pid) = pid {
            client
                .execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(sql_err(node, format!("stopping the walsender of {slot}")))?;
        }
        // The walsender may take a moment to release the slot: `wait` blocks until it does.
        client
            .execute(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name)
                   FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(sql_err(node, format!("dropping slot {slot}")))?;
        dropped.push(slot);
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_drop_is_the_end_of_uninstall_sql() {
        let sql = drop_definer_roles_sql();
        assert!(sql.starts_with(DEFINER_ROLES_SECTION), "{sql}");
        for words in [
            "rolsuper",
            "DROP OWNED BY",
            "DROP ROLE",
            "walbridge_capture",
        ] {
            assert!(sql.contains(words), "{words:?} missing from:\n{sql}");
        }
        assert!(!sql.contains("DROP SCHEMA"), "{sql}");
    }
}
