//! Trigger mode in `walbridge setup` and `teardown`: installing the change table and the
//! capture triggers, the cut-over of a node to stream mode, and removal.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Arc;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::{quote_ident, quote_literal, TableInfo};
use crate::config::{Config, Plugin};
use crate::direction::{DirectionContext, StatusBoard};
use crate::metrics::Metrics;
use crate::pgconn::pg_message;
use crate::setup::{NodeSession, SetupError};

use crate::trigger::sql;

/// Marks a change table that walbridge created (teardown may then drop it when empty).
const CREATED_COMMENT: &str = "walbridge change table (created by walbridge setup)";

/// The logical decoding message prefix of the cut-over fence.
const FENCE_PREFIX: &str = "walbridge_cutover";

use crate::setup::sql_err;

/// Creates the bookkeeping tables of `sql/trigger_mode.sql` (every node of a deployment that
/// has a trigger-mode node: every node is a target).
pub async fn install_bookkeeping(n: &NodeSession) -> Result<(), SetupError> {
    n.client
        .batch_execute(sql::TRIGGER_MODE_SQL)
        .await
        .map_err(sql_err(
            &n.name,
            "creating trigger-mode tables (sql/trigger_mode.sql)",
        ))
}

/// Whether walbridge's capture triggers are installed on the node (it is in trigger mode).
pub async fn capture_installed(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgname = $1)",
            &[&sql::CAPTURE_TRIGGER],
        )
        .await?
        .get(0))
}

/// Whether a cut-over of the node to stream mode was started and not finished.
pub async fn cutover_pending(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT pg_catalog.to_regclass('walbridge.settings') IS NOT NULL
                AND EXISTS (SELECT 1 FROM walbridge.settings WHERE name = 'cutover_fence_id')",
            &[],
        )
        .await?
        .get(0))
}

/// Problems that stop trigger mode on a node, and warnings about what it will lack.
pub async fn check_node(
    config: &Config,
    client: &Client,
    node: &str,
) -> Result<(Vec<String>, Vec<String>), tokio_postgres::Error> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let row = client
        .query_one(
            "SELECT r.rolsuper,
                    pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'),
                    pg_catalog.current_setting('track_commit_timestamp') = 'on',
                    (SELECT count(*) FROM pg_catalog.pg_replication_slots
                      WHERE slot_name LIKE $1 || '\\_' || $2 || '\\_to\\_%'
                        AND database = pg_catalog.current_database())
               FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[&config.replication.slot_prefix, &node],
        )
        .await?;
    let (superuser, create, commit_ts, slots): (bool, bool, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !create && !superuser {
        problems.push(
            "the role may not create schemas in this database; GRANT CREATE ON DATABASE to it \
             (trigger mode needs a schema, a change table and triggers)"
                .to_string(),
        );
    }
    if !superuser {
        warnings.push(
            "the role is not a superuser: applied changes run without \
             session_replication_role = replica and without replication origins (other \
             triggers fire, conflicts compare the target's own commit times)"
                .to_string(),
        );
    }
    if !commit_ts {
        warnings.push(
            "track_commit_timestamp is off: conflicts are decided by the time a change was \
             logged and the target row's writer is unknown; set track_commit_timestamp = on and \
             restart PostgreSQL for last-write-wins on commit times"
                .to_string(),
        );
    }
    if slots > 0 {
        problems.push(format!(
            "the node has {slots} walbridge replication slot(s) from stream mode; switching a \
             node from stream to trigger mode is not supported by setup: stop writes, let \
             walbridge run catch up, run walbridge teardown, then setup in trigger mode"
        ));
    }
    Ok((problems, warnings))
}

/// Installs trigger mode on one node: the change table (kept as it is when the old script
/// created it), the dead-letter table, the capture functions and a capture trigger on every
/// replicated table; removes capture triggers from tables no longer replicated. Lines go to
/// `out`.
pub async fn install_node(
    config: &Config,
    n: &NodeSession,
    tables: &[TableInfo],
    out: &mut (dyn Write + Send),
) -> Result<(), SetupError> {
    let table = &config.trigger.table;
    let dead = config.trigger.dead_table();
    let existed = n
        .client
        .query_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[&table.quoted()],
        )
        .await
        .map_err(sql_err(&n.name, "looking up the change table"))?
        .get::<_, bool>(0);
    if existed {
        check_existing(n, config).await?;
    }
    n.client
        .batch_execute(&sql::change_table_sql(
            table,
            &dead,
            &sql::channel(&config.replication.slot_prefix),
        ))
        .await
        .map_err(sql_err(
            &n.name,
            format!("creating the change table {table} (sql/trigger_change_table.sql)"),
        ))?;
    if !existed {
        n.client
            .batch_execute(&format!(
                "COMMENT ON TABLE {} IS {}",
                table.quoted(),
                quote_literal(CREATED_COMMENT)
            ))
            .await
            .map_err(sql_err(&n.name, "commenting the change table"))?;
    }
    let row = n
        .client
        .query_one(
            &format!(
                "SELECT pg_catalog.format_type(a.atttypid, NULL),
                        pg_catalog.has_function_privilege(
                            'pg_catalog.pg_replication_origin_session_is_setup()', 'EXECUTE'),
                        (SELECT count(*) FROM {t})::int8
                   FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = {lit}::regclass AND a.attname = 'descripcion'",
                t = table.quoted(),
                lit = quote_literal(&table.quoted())
            ),
            &[],
        )
        .await
        .map_err(sql_err(
            &n.name,
            "reading the change table's descripcion type",
        ))?;
    let (descripcion_type, origin_check, rows): (String, bool, i64) =
        (row.get(0), row.get(1), row.get(2));
    n.client
        .batch_execute(&sql::capture_sql(table, &descripcion_type, origin_check))
        .await
        .map_err(sql_err(
            &n.name,
            "creating the capture functions (sql/trigger_capture.sql)",
        ))?;
    if crate::pgconn::is_superuser(&n.client)
        .await
        .map_err(sql_err(&n.name, "reading the role's attributes"))?
    {
        n.client
            .batch_execute(&sql::capture_owner_sql(table))
            .await
            .map_err(sql_err(
                &n.name,
                "handing the capture functions to role walbridge_capture",
            ))?;
    }
    let _ = writeln!(
        out,
        "{}: change table {table} {} (descripcion {descripcion_type}{}), dead rows in {dead}",
        n.name,
        if existed { "kept" } else { "created" },
        if rows > 0 {
            format!(", {rows} row(s) waiting")
        } else {
            String::new()
        }
    );

    for t in tables {
        let key = if t.primary_key.is_empty() && t.identity_index.is_empty() {
            Vec::new()
        } else {
            t.identity_columns()
        };
        n.client
            .batch_execute(&sql::capture_triggers_sql(&n.name, t, &key))
            .await
            .map_err(sql_err(
                &n.name,
                format!("creating the capture trigger on {}", t.qualified_name()),
            ))?;
    }
    let _ = writeln!(
        out,
        "{}: capture trigger {} on {} table(s)",
        n.name,
        sql::CAPTURE_TRIGGER,
        tables.len()
    );

    // Tables no longer replicated lose their capture triggers.
    let keep: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let stale = n
        .client
        .query(
            "SELECT pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', tgname, tgrelid::regclass)
               FROM pg_catalog.pg_trigger
              WHERE tgname IN ($1, $2) AND NOT tgisinternal AND tgparentid = 0
                AND NOT (tgrelid = ANY($3::oid[]))",
            &[&sql::CAPTURE_TRIGGER, &sql::TRUNCATE_TRIGGER, &keep],
        )
        .await
        .map_err(sql_err(&n.name, "listing capture triggers"))?;
    for r in &stale {
        let stmt: String = r.get(0);
        n.client
            .batch_execute(&stmt)
            .await
            .map_err(sql_err(&n.name, "dropping a stale capture trigger"))?;
    }

    // The old script's triggers would log every change a second time.
    for warning in old_triggers(&n.client, config, tables)
        .await
        .map_err(sql_err(&n.name, "looking for old change-logging triggers"))?
    {
        let _ = writeln!(out, "{}: warning: {warning}", n.name);
    }
    Ok(())
}

/// An existing change table must have the old script's four columns.
async fn check_existing(n: &NodeSession, config: &Config) -> Result<(), SetupError> {
    let table = &config.trigger.table;
    let rows = n
        .client
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table.quoted()],
        )
        .await
        .map_err(sql_err(&n.name, "reading the change table's columns"))?;
    let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&str> = ["id", "metodo", "tabla", "descripcion"]
        .into_iter()
        .filter(|c| !have.iter().any(|h| h == c))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SetupError::Other(format!(
            "node {}: table {table} exists but lacks column(s) {}; it is not a change table of \
             the polling script (id, metodo, tabla, descripcion): set trigger.table to another \
             name or fix the table",
            n.name,
            missing.join(", ")
        )))
    }
}

/// Triggers on replicated tables, not walbridge's, whose function writes to the change table.
async fn old_triggers(
    client: &Client,
    config: &Config,
    tables: &[TableInfo],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = client
        .query(
            "SELECT t.tgname::text, t.tgrelid::regclass::text, p.oid::regprocedure::text
               FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
              WHERE t.tgrelid = ANY($1::oid[]) AND NOT t.tgisinternal
                AND t.tgname NOT IN ($2, $3, 'walbridge_tombstones')
                AND p.prosrc ILIKE '%' || $4 || '%'",
            &[
                &oids,
                &sql::CAPTURE_TRIGGER,
                &sql::TRUNCATE_TRIGGER,
                &config.trigger.table.name,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (trigger, table, function): (String, String, String) =
                (r.get(0), r.get(1), r.get(2));
            format!(
                "trigger {trigger} on {table} (function {function}) seems to write to {}: drop \
                 it once walbridge runs (walbridge_capture replaces it), or each change is \
                 logged twice",
                config.trigger.table
            )
        })
        .collect())
}

/// Switches node `node` from trigger to stream mode, after setup created its slots: no
/// change lost, none applied twice, while the applications keep writing. See the module docs
/// of [`crate::trigger`] ("Cut-over to stream mode") for the reasoning.
pub async fn cut_over(
    config: &Config,
    nodes: &[NodeSession],
    node: &str,
    out: &mut (dyn Write + Send),
) -> Result<(), SetupError> {
    let n = nodes
        .iter()
        .find(|n| n.name == node)
        .ok_or_else(|| SetupError::Other(format!("node {node} is not configured")))?;
    let c = &n.client;
    let setting = |name: &'static str| async move {
        c.query_opt(
            "SELECT value FROM walbridge.settings WHERE name = $1",
            &[&name],
        )
        .await
        .map(|r| r.map(|r| r.get::<_, String>(0)))
    };

    // 1. The fence: in one transaction, drop the capture triggers and emit a logical
    //    message. Dropping a trigger waits for the writers of its table and makes later
    //    writers wait, so every change committed before the fence has its change row and none
    //    committed after it has one.
    if capture_installed(c)
        .await
        .map_err(sql_err(node, "looking for capture triggers"))?
    {
        let drops = c
            .query(
                "SELECT pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', tgname, tgrelid::regclass)
                   FROM pg_catalog.pg_trigger
                  WHERE tgname IN ($1, $2) AND NOT tgisinternal AND tgparentid = 0",
                &[&sql::CAPTURE_TRIGGER, &sql::TRUNCATE_TRIGGER],
            )
            .await
            .map_err(sql_err(node, "listing capture triggers"))?;
        let mut fence = String::from("BEGIN; SET LOCAL lock_timeout = '5s';");
        for r in &drops {
            let _ = write!(fence, " {};", r.get::<_, String>(0));
        }
        let _ = write!(
            fence,
            " INSERT INTO walbridge.settings (name, value)
                SELECT 'cutover_xid', pg_catalog.pg_current_xact_id()::text
              UNION ALL
                SELECT 'cutover_fence_id', coalesce((SELECT max(id) FROM {t})::text, '0')
              ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value;
             SELECT pg_catalog.pg_logical_emit_message(true, {p}, {n});
             COMMIT;",
            t = config.trigger.table.quoted(),
            p = quote_literal(FENCE_PREFIX),
            n = quote_literal(node),
        );
        if let Err(e) = c.batch_execute(&fence).await {
            let _ = c.batch_execute("ROLLBACK").await;
            return Err(SetupError::Other(format!(
                "node {node}: cannot place the cut-over fence ({}); a long transaction may hold \
                 a lock on a replicated table: run setup again",
                pg_message(&e)
            )));
        }
        let _ = writeln!(
            out,
            "{node}: cut-over to stream mode: capture triggers removed at the fence"
        );
    }
    if !cutover_pending(c)
        .await
        .map_err(sql_err(node, "reading the cut-over state"))?
    {
        return Ok(());
    }

    // 2. Where the fence committed, from the first slot's own decoding; every slot of the
    //    node then starts right after it.
    let slots: Vec<String> = config
        .nodes
        .iter()
        .filter(|p| p.name != node)
        .map(|p| config.slot_name(node, &p.name))
        .collect();
    let fence_lsn = match setting("cutover_lsn")
        .await
        .map_err(sql_err(node, "reading the cut-over state"))?
    {
        Some(l) => l,
        None => {
            let xid = setting("cutover_xid")
                .await
                .map_err(sql_err(node, "reading the cut-over state"))?
                .unwrap_or_default();
            let first = slots
                .first()
                .ok_or_else(|| SetupError::Other(format!("node {node} has no peers")))?;
            let options: Vec<String> = match config.replication.plugin {
                Plugin::PgOutput => vec![
                    "proto_version".into(),
                    "1".into(),
                    "publication_names".into(),
                    config.publication_name(),
                    "messages".into(),
                    "true".into(),
                ],
                Plugin::Wal2Json => vec!["format-version".into(), "2".into()],
            };
            let row = c
                .query_one(
                    "SELECT max(lsn)::text FROM pg_catalog.pg_logical_slot_peek_binary_changes(
                            $1, pg_catalog.pg_current_wal_lsn(), NULL, VARIADIC $2::text[])
                      WHERE xid = ($3::text::xid8)::xid",
                    &[first, &options, &xid],
                )
                .await
                .map_err(sql_err(
                    node,
                    format!("finding the cut-over fence in slot {first}"),
                ))?;
            let lsn: Option<String> = row.get(0);
            let Some(lsn) = lsn else {
                return Err(SetupError::Other(format!(
                    "node {node}: slot {first} does not contain the cut-over fence (transaction \
                     {xid}); it was created after the fence. Run walbridge teardown, then setup \
                     in trigger mode, then setup in stream mode again"
                )));
            };
            c.execute(
                "INSERT INTO walbridge.settings (name, value) VALUES ('cutover_lsn', $1)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&lsn],
            )
            .await
            .map_err(sql_err(node, "recording the cut-over fence"))?;
            lsn
        }
    };
    for slot in &slots {
        c.execute(
            "SELECT pg_catalog.pg_replication_slot_advance(slot_name, $2::text::pg_lsn)
               FROM pg_catalog.pg_replication_slots
              WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
            &[slot, &fence_lsn],
        )
        .await
        .map_err(sql_err(
            node,
            format!("moving slot {slot} past the cut-over fence"),
        ))?;
    }
    let _ = writeln!(
        out,
        "{node}: slots start after the cut-over fence at {fence_lsn}"
    );

    // 3. Drain: every change row up to the fence, to every peer, through the trigger-mode
    //    apply (which knows what each peer already has).
    let fence_id: i64 = setting("cutover_fence_id")
        .await
        .map_err(sql_err(node, "reading the cut-over state"))?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let config = Arc::new(config.clone());
    let metrics = Metrics::new();
    let names: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
    let status = StatusBoard::new(names.iter().copied(), std::iter::empty());
    for peer in config.nodes.iter().filter(|p| p.name != node) {
        let ctx = DirectionContext {
            config: config.clone(),
            source: node.to_string(),
            target: peer.name.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            shutdown: CancellationToken::new(),
            abandoned_apply_pid: Arc::default(),
            fleet: crate::direction::spread::Fleet::new(1),
        };
        let applied = crate::trigger::drain_direction(&ctx, fence_id)
            .await
            .map_err(|e| {
                SetupError::Other(format!(
                    "cut-over of node {node}: draining the change table to {}: {e}; fix it and \
                     run setup again (nothing is lost: the drain resumes)",
                    peer.name
                ))
            })?;
        let _ = writeln!(
            out,
            "{node} -> {}: drained {applied} change row(s) up to id {fence_id}",
            peer.name
        );
    }

    // 4. Done: forget the trigger-mode progress of this source everywhere.
    c.execute(
        &format!(
            "DELETE FROM {} WHERE id <= $1::int8",
            config.trigger.table.quoted()
        ),
        &[&fence_id],
    )
    .await
    .map_err(sql_err(node, "emptying the change table"))?;
    for p in nodes {
        p.client
            .execute(
                "DELETE FROM walbridge.trigger_progress WHERE source = $1",
                &[&node],
            )
            .await
            .map_err(sql_err(&p.name, "removing trigger-mode progress"))?;
        p.client
            .execute(
                "DELETE FROM walbridge.trigger_applied WHERE source = $1",
                &[&node],
            )
            .await
            .map_err(sql_err(&p.name, "removing trigger-mode progress"))?;
    }
    c.batch_execute(
        "DELETE FROM walbridge.trigger_peer_progress;
         DELETE FROM walbridge.settings WHERE name IN ('cutover_xid', 'cutover_fence_id', 'cutover_lsn');",
    )
    .await
    .map_err(sql_err(node, "finishing the cut-over"))?;
    let left: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {}", config.trigger.table.quoted()),
            &[],
        )
        .await
        .map_err(sql_err(node, "counting the change table"))?
        .get(0);
    let _ = writeln!(
        out,
        "{node}: cut-over to stream mode complete{}",
        if left > 0 {
            format!(
                "; {left} row(s) written to {} after the fence (old triggers?) are left there, \
                 and are not applied: their changes travel through the slots",
                config.trigger.table
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Teardown of trigger mode on one node, before the walbridge schema is dropped: the change
/// table and its dead-letter table are dropped only when walbridge created them and they are
/// empty; a table with rows is never dropped.
pub async fn teardown_node(
    config: &Config,
    client: &Client,
    node: &str,
    out: &mut (dyn Write + Send),
) -> Result<(), SetupError> {
    let table = &config.trigger.table;
    let dead = config.trigger.dead_table();
    let info = client
        .query_one(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL,
                    pg_catalog.obj_description(pg_catalog.to_regclass($1), 'pg_class') = $3,
                    pg_catalog.to_regclass($2) IS NOT NULL",
            &[&table.quoted(), &dead.quoted(), &CREATED_COMMENT],
        )
        .await
        .map_err(sql_err(node, "looking up the change table"))?;
    let (exists, ours, dead_exists): (bool, Option<bool>, bool) =
        (info.get(0), info.get(1), info.get(2));
    let count = |t: String| async move {
        client
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    };
    if exists {
        let rows = count(table.quoted())
            .await
            .map_err(sql_err(node, "counting the change table"))?;
        client
            .batch_execute(&format!(
                "DROP TRIGGER IF EXISTS {} ON {}",
                quote_ident(sql::NOTIFY_TRIGGER),
                table.quoted()
            ))
            .await
            .map_err(sql_err(node, "dropping the notify trigger"))?;
        if ours == Some(true) && rows == 0 {
            client
                .batch_execute(&format!("DROP TABLE {}", table.quoted()))
                .await
                .map_err(sql_err(node, "dropping the change table"))?;
            let _ = writeln!(out, "{node}: dropped the empty change table {table}");
        } else if rows > 0 {
            let _ = writeln!(
                out,
                "{node}: kept the change table {table}: it holds {rows} unapplied row(s)"
            );
        } else {
            let _ = writeln!(
                out,
                "{node}: kept the change table {table} (it predates walbridge; walbridge's \
                 columns origin_node, txid, created_at, old_key stay, harmless)"
            );
        }
    }
    if dead_exists {
        let rows = count(dead.quoted())
            .await
            .map_err(sql_err(node, "counting the dead-letter table"))?;
        if rows == 0 {
            client
                .batch_execute(&format!("DROP TABLE {}", dead.quoted()))
                .await
                .map_err(sql_err(node, "dropping the dead-letter table"))?;
        } else {
            let _ = writeln!(
                out,
                "{node}: kept {dead}: it holds {rows} row(s) that could not be applied"
            );
        }
    }
    client
        .batch_execute(
            "DROP FUNCTION IF EXISTS walbridge.capture() CASCADE;
             DROP FUNCTION IF EXISTS walbridge.capture_truncate() CASCADE;",
        )
        .await
        .map_err(sql_err(node, "dropping the capture functions"))
}
