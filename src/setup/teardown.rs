//! `walbridge teardown`: removes what setup created, slots first so no WAL stays pinned, and
//! leaves user data alone (a trigger-mode change table holding rows is kept). A node that cannot be reached is reported and the others are still
//! cleaned.

use std::io::Write;

use tokio_postgres::Client;

use super::{sql_err, SetupError, TOMBSTONE_TRIGGER};
use crate::catalog::quote_ident;
use crate::config::Config;
use crate::pgconn;

/// Drops the owners of walbridge's functions (sql/definer_roles.sql): their grants in this
/// database go with `DROP OWNED`; a role still used by walbridge in another database of the
/// cluster stays. Only a superuser made them, so only a superuser removes them.
const DROP_DEFINER_ROLES: &str = "DO $$
DECLARE
    r text;
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN;
    END IF;
    FOR r IN SELECT rolname FROM pg_catalog.pg_roles
              WHERE rolname IN ('walbridge_skip', 'walbridge_capture')
    LOOP
        EXECUTE pg_catalog.format('DROP OWNED BY %I', r);
        BEGIN
            EXECUTE pg_catalog.format('DROP ROLE %I', r);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            NULL;
        END;
    END LOOP;
END
$$";

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
            .batch_execute(DROP_DEFINER_ROLES)
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
