//! SQL text for trigger mode's setup: the change table, the capture functions and triggers.
//! Pure strings; every identifier quoted. (The changes themselves are applied by
//! [`crate::apply`], as in stream mode.)

use crate::catalog::{quote_ident, quote_literal, TableInfo};
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

#[cfg(test)]
mod tests {
    use super::*;

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
