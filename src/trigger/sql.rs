//! SQL text for trigger mode: the setup templates and the apply statements. Pure strings.
//!
//! Every identifier is quoted; every value travels as one JSON parameter (`$1::text::jsonb`)
//! and reaches its column through `pg_catalog.jsonb_populate_record(NULL::"schema"."table", ...)`, which
//! casts each field to the column's own type with the type's input function (arrays and
//! composites included, numbers exact). A field that does not fit its column is an SQL error
//! for that one statement, never a change of the statement's meaning.

use crate::catalog::{json_value, quote_ident, quote_literal, row_json, text_value, TableInfo};
use crate::config::QualifiedName;

/// Makes the NOLOGIN role `walbridge_capture` (sql/definer_roles.sql) own the capture
/// functions, with the one right they need: inserting into the change table (and using its
/// id sequence). Needs a superuser.
pub fn capture_owner_sql(table: &QualifiedName) -> String {
    format!(
        "GRANT INSERT ON {t} TO walbridge_capture; \
         DO $$ \
         DECLARE s text := pg_catalog.pg_get_serial_sequence({lit}, 'id'); \
         BEGIN \
             IF s IS NOT NULL THEN \
                 EXECUTE pg_catalog.format('GRANT USAGE ON SEQUENCE %s TO walbridge_capture', s); \
             END IF; \
         END $$; \
         ALTER FUNCTION walbridge.capture() OWNER TO walbridge_capture; \
         ALTER FUNCTION walbridge.capture_truncate() OWNER TO walbridge_capture;",
        t = table.quoted(),
        lit = quote_literal(&table.quoted()),
    )
}

/// `sql/trigger_mode.sql`: bookkeeping tables and the notify function (every node).
pub const TRIGGER_MODE_SQL: &str = include_str!("../../sql/trigger_mode.sql");
const CHANGE_TABLE_SQL: &str = include_str!("../../sql/trigger_change_table.sql");
const CAPTURE_SQL: &str = include_str!("../../sql/trigger_capture.sql");

/// Name of the row trigger that logs changes (teardown drops triggers by this name).
pub const CAPTURE_TRIGGER: &str = "walbridge_capture";
/// Name of the statement trigger that logs TRUNCATE.
pub const TRUNCATE_TRIGGER: &str = "walbridge_capture_truncate";
/// Name of the statement trigger on the change table that sends NOTIFY.
pub const NOTIFY_TRIGGER: &str = "walbridge_notify";

/// The LISTEN/NOTIFY channel of a deployment: `<slot_prefix>_changes`.
pub fn channel(slot_prefix: &str) -> String {
    format!("{slot_prefix}_changes")
}

/// `sql/trigger_change_table.sql` for `table`, its dead-letter table and channel.
pub fn change_table_sql(table: &QualifiedName, dead: &QualifiedName, channel: &str) -> String {
    let index = truncate_name(&format!("{}_txid_idx", table.name));
    CHANGE_TABLE_SQL
        .replace("{{change_table}}", &table.quoted())
        .replace("{{dead_table}}", &dead.quoted())
        .replace("{{txid_index}}", &quote_ident(&index))
        .replace("{{channel}}", &quote_literal(channel))
}

/// `sql/trigger_capture.sql` for the change table, the SQL type of its `descripcion`
/// (`jsonb`, `json`, `text`...: a type name from `format_type`, without modifier) and whether
/// the function may test the session's replication origin.
pub fn capture_sql(table: &QualifiedName, descripcion_type: &str, origin_check: bool) -> String {
    CAPTURE_SQL
        .replace("{{change_table}}", &table.quoted())
        .replace("{{descripcion_type}}", descripcion_type)
        .replace(
            "{{origin_check}}",
            if origin_check {
                "OR pg_catalog.pg_replication_origin_session_is_setup()"
            } else {
                ""
            },
        )
}

/// The capture triggers of one replicated table: a row trigger and a TRUNCATE trigger, both
/// told the node's name, the table's `schema.table` and its key columns.
pub fn capture_triggers_sql(node: &str, table: &TableInfo, key: &[String]) -> String {
    let mut args = vec![quote_literal(node), quote_literal(&table.qualified_name())];
    args.extend(key.iter().map(|k| quote_literal(k)));
    let args = args.join(", ");
    format!(
        "CREATE OR REPLACE TRIGGER {row} AFTER INSERT OR UPDATE OR DELETE ON {t} \
         FOR EACH ROW EXECUTE FUNCTION walbridge.capture({args}); \
         ALTER TABLE {t} ENABLE TRIGGER {row}; \
         CREATE OR REPLACE TRIGGER {trunc} AFTER TRUNCATE ON {t} \
         FOR EACH STATEMENT EXECUTE FUNCTION walbridge.capture_truncate({args}); \
         ALTER TABLE {t} ENABLE TRIGGER {trunc};",
        row = quote_ident(CAPTURE_TRIGGER),
        trunc = quote_ident(TRUNCATE_TRIGGER),
        t = table.quoted_name(),
    )
}

/// Shortens an identifier to PostgreSQL's 63 bytes at a character boundary.
fn truncate_name(name: &str) -> String {
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// `pg_catalog.jsonb_populate_record(NULL::"s"."t", $n::text::jsonb) AS alias`.
fn record(table: &TableInfo, param: usize, alias: &str) -> String {
    format!(
        "pg_catalog.jsonb_populate_record(NULL::{}, ${param}::text::jsonb) AS {alias}",
        table.quoted_name()
    )
}

/// `a."c" = b."c" AND ...` over the key columns. Keys of tables without a unique key are
/// compared with IS NOT DISTINCT FROM; types without an equality operator (json, point) by
/// their text.
fn matches(table: &TableInfo, key: &[String], full: bool, a: &str, b: &str) -> String {
    key.iter()
        .map(|k| {
            let c = quote_ident(k);
            let eq = table.column(k).is_none_or(|c| c.has_equality);
            match (eq, full) {
                (true, false) => format!("{a}.{c} = {b}.{c}"),
                (true, true) => format!("{a}.{c} IS NOT DISTINCT FROM {b}.{c}"),
                (false, _) => {
                    let col = table.column(k);
                    format!(
                        "{} IS NOT DISTINCT FROM {}",
                        text_value(&format!("{a}.{c}"), col),
                        text_value(&format!("{b}.{c}"), col)
                    )
                }
            }
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The key columns of record `k`, as `jsonb_build_array` arguments for a tombstone key
/// (the rule of [`json_value`], as `walbridge.record_tombstones` builds them).
fn key_values(table: &TableInfo, key: &[String]) -> String {
    key.iter()
        .map(|k| json_value(&format!("k.{}", quote_ident(k)), table.column(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the target's state for one key, locking the row: the row as JSON, its commit time
/// and origin, and the commit time and origin of a delete tombstone for the key.
/// `$1`: the key as JSON. Columns: row (text, NULL when absent), row time, row origin,
/// tombstone found (NULL when none), tombstone time, tombstone origin.
pub fn lookup_sql(table: &TableInfo, key: &[String], full: bool, commit_ts: bool) -> String {
    let version = |alias: &str| {
        if commit_ts {
            format!(
                "LEFT JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin({alias}.xmin) AS v \
                 ON true"
            )
        } else {
            "LEFT JOIN LATERAL (SELECT NULL::timestamptz AS timestamp, NULL::oid AS roident) \
             AS v ON true"
                .to_string()
        }
    };
    let tombstone = if table.unique_key().is_some() && !full {
        format!(
            "LEFT JOIN LATERAL (SELECT true AS found, v.timestamp AS ts, v.roident AS ro \
               FROM walbridge.tombstones tb {v} \
              WHERE tb.relid = {oid} AND tb.key = pg_catalog.jsonb_build_array({cols})) AS d ON true",
            v = version("tb"),
            oid = table.oid,
            cols = key_values(table, key)
        )
    } else {
        "LEFT JOIN LATERAL (SELECT NULL::bool AS found, NULL::timestamptz AS ts, NULL::oid AS ro) \
         AS d ON true"
            .to_string()
    };
    // The locked row's version is computed in its target list, not joined: when the lock
    // waits for a concurrent writer, PostgreSQL re-reads the row but reuses a joined
    // function's earlier result, pairing the new row with the old commit time.
    let (ts, ro) = if commit_ts {
        (
            "(pg_catalog.pg_xact_commit_timestamp_origin(t.xmin)).timestamp",
            "(pg_catalog.pg_xact_commit_timestamp_origin(t.xmin)).roident",
        )
    } else {
        ("NULL::timestamptz", "NULL::oid")
    };
    format!(
        "SELECT r.row_json, r.ts, r.ro, d.found, d.ts, d.ro \
           FROM {k} \
           LEFT JOIN LATERAL (SELECT ({row})::text AS row_json, {ts} AS ts, {ro} AS ro \
                                FROM {table} AS t \
                               WHERE {m} LIMIT 1 FOR UPDATE OF t) AS r ON true \
           {tombstone}",
        k = record(table, 1, "k"),
        row = row_json("t", table),
        table = table.quoted_name(),
        m = matches(table, key, full, "t", "k"),
    )
}

/// Inserts the given columns. `$1`: the values as JSON.
pub fn insert_sql(table: &TableInfo, columns: &[String]) -> String {
    let overriding = columns
        .iter()
        .any(|c| table.column(c).is_some_and(|c| c.identity_always));
    format!(
        "INSERT INTO {t} ({cols}){o} SELECT {vals} FROM {r}",
        t = table.quoted_name(),
        cols = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", "),
        o = if overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        },
        vals = columns
            .iter()
            .map(|c| format!("r.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", "),
        r = record(table, 1, "r"),
    )
}

/// Updates the row found by the key. `$1`: the values, `$2`: the key, both JSON.
pub fn update_sql(table: &TableInfo, columns: &[String], key: &[String], full: bool) -> String {
    let set = columns
        .iter()
        .map(|c| format!("{q} = r.{q}", q = quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "UPDATE {t} AS t SET {set} FROM {r}, {k} WHERE {w}",
        t = table.quoted_name(),
        r = record(table, 1, "r"),
        k = record(table, 2, "k"),
        w = row_filter(table, key, full),
    )
}

/// Deletes the row found by the key. `$1`: the key as JSON.
pub fn delete_sql(table: &TableInfo, key: &[String], full: bool) -> String {
    format!(
        "DELETE FROM {t} AS t USING {k} WHERE {w}",
        t = table.quoted_name(),
        k = record(table, 1, "k"),
        w = row_filter(table, key, full),
    )
}

/// The WHERE of an update or delete: the key, or with a whole-row identity, exactly one of
/// the matching rows.
fn row_filter(table: &TableInfo, key: &[String], full: bool) -> String {
    if full {
        format!(
            "(t.tableoid, t.ctid) = (SELECT t2.tableoid, t2.ctid FROM {t} AS t2 \
              WHERE {m} LIMIT 1)",
            t = table.quoted_name(),
            m = matches(table, key, true, "t2", "k"),
        )
    } else {
        matches(table, key, false, "t", "k")
    }
}

/// Records a deletion whose row was already gone, so a late insert or update of the key
/// cannot bring it back. `$1`: the key as JSON.
pub fn tombstone_sql(table: &TableInfo, key: &[String]) -> String {
    format!(
        "INSERT INTO walbridge.tombstones (relid, key) \
         SELECT {oid}, pg_catalog.jsonb_build_array({cols}) FROM {k} \
         ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key",
        oid = table.oid,
        cols = key_values(table, key),
        k = record(table, 1, "k"),
    )
}

/// `TRUNCATE` of the table (only the table; partitions of a partitioned one follow).
pub fn truncate_sql(table: &TableInfo) -> String {
    format!("TRUNCATE {}", table.quoted_name())
}

/// One conflict in `walbridge.conflicts`, with every fact replay needs (see sql/schema.sql).
/// Parameters: source, target, table, key (json), kind, resolution, local row (json), remote
/// row (json), local commit time, remote commit time, policy, the local version's writer,
/// whether it is a tombstone, whether the incoming row is complete, whether the decision was
/// ambiguous (bools as text), the source's change-table id, the priority order (json array),
/// the columns the change lacks (json array), the row size bound (text).
pub const CONFLICT_SQL: &str = "INSERT INTO walbridge.conflicts \
     (source, target, table_name, key, kind, resolution, local_commit_ts, remote_commit_ts, \
      policy, local_writer, local_tombstone, complete_row, ambiguous, source_change_id, \
      priority, remote_unsent, local_row, remote_row, local_row_truncated, remote_row_truncated) \
     VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $9::timestamptz, $10::timestamptz, \
      $11, $12, $13::text::bool, $14::text::bool, $15::text::bool, $16::text::int8, \
      ARRAY(SELECT pg_catalog.jsonb_array_elements_text($17::text::jsonb)), \
      ARRAY(SELECT pg_catalog.jsonb_array_elements_text($18::text::jsonb)), \
      walbridge.journal_row($7::text::jsonb, $19::text::int4), \
      walbridge.journal_row($8::text::jsonb, $19::text::int4), \
      COALESCE(pg_catalog.octet_length($7::text::jsonb::text) > $19::text::int4, false), \
      COALESCE(pg_catalog.octet_length($8::text::jsonb::text) > $19::text::int4, false))";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ColumnInfo, TableKind};
    use crate::event::ReplicaIdentity;

    fn table() -> TableInfo {
        let col = |name: &str, eq: bool, always: bool| ColumnInfo {
            name: name.into(),
            attnum: 1,
            type_oid: 25,
            type_sql: "text".into(),
            type_modifier: -1,
            not_null: false,
            generated: false,
            identity_always: always,
            identity_by_default: false,
            has_equality: eq,
        };
        TableInfo {
            oid: 4242,
            schema: "Mixed Case".into(),
            name: "users; DROP TABLE users".into(),
            kind: TableKind::Ordinary,
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col("id", true, true),
                col("a\"b", true, false),
                col("j", false, false),
            ],
            primary_key: vec!["id".into()],
            identity_index: vec![],
        }
    }

    #[test]
    fn names_are_quoted_and_values_are_parameters() {
        let t = table();
        let cols = vec!["id".to_string(), "a\"b".to_string()];
        assert_eq!(
            insert_sql(&t, &cols),
            "INSERT INTO \"Mixed Case\".\"users; DROP TABLE users\" (\"id\", \"a\"\"b\") \
             OVERRIDING SYSTEM VALUE SELECT r.\"id\", r.\"a\"\"b\" FROM pg_catalog.jsonb_populate_record(\
             NULL::\"Mixed Case\".\"users; DROP TABLE users\", $1::text::jsonb) AS r"
        );
        let u = update_sql(&t, &cols[1..], &cols[..1], false);
        assert!(u.contains("SET \"a\"\"b\" = r.\"a\"\"b\""), "{u}");
        assert!(u.ends_with("WHERE t.\"id\" = k.\"id\""), "{u}");
        let d = delete_sql(&t, &["j".to_string()], true);
        assert!(
            d.contains("(t2.\"j\")::text IS NOT DISTINCT FROM (k.\"j\")::text"),
            "{d}"
        );
        assert!(d.contains("(t.tableoid, t.ctid) = (SELECT"), "{d}");
    }

    #[test]
    fn lookup_locks_the_row_and_reads_tombstones() {
        let l = lookup_sql(&table(), &["id".to_string()], false, true);
        assert!(l.contains("FOR UPDATE OF t"), "{l}");
        assert!(
            l.contains("tb.relid = 4242 AND tb.key = pg_catalog.jsonb_build_array(k.\"id\")"),
            "{l}"
        );
        assert!(l.contains("pg_xact_commit_timestamp_origin(t.xmin)"), "{l}");
        let l = lookup_sql(&table(), &["id".to_string()], false, false);
        assert!(!l.contains("pg_xact_commit_timestamp_origin"), "{l}");
    }

    #[test]
    fn templates_are_filled() {
        let t = QualifiedName::new("public", "database_changes");
        let s = change_table_sql(
            &t,
            &QualifiedName::new("public", "database_changes_dead"),
            "wb_changes",
        );
        assert!(!s.contains("{{"), "{s}");
        assert!(s.contains("\"public\".\"database_changes_dead\""));
        assert!(s.contains("walbridge.notify_changes('wb_changes')"));
        let c = capture_sql(&t, "text", true);
        assert!(!c.contains("{{"), "{c}");
        assert!(c.contains("walbridge.row_jsonb(TG_RELID, NEW)") && c.contains("v_new::text"));
        assert!(c.contains("pg_replication_origin_session_is_setup"));
        assert!(!capture_sql(&t, "jsonb", false).contains("pg_replication_origin_session_is_setup"));
        let long = "x".repeat(70);
        let s = change_table_sql(
            &QualifiedName::new("s", &long),
            &QualifiedName::new("s", "d"),
            "c",
        );
        assert!(s.contains(&format!("\"{}\"", &format!("{long}_txid_idx")[..63])));
    }
}
