//! `replication.on_schema_mismatch`: with `park`, the changes of a table the target's schema
//! does not fit wait in `walbridge.parked` (other tables go on) and are replayed in order once
//! it fits; with the default `stop`, the direction stops naming the table and the column.

use crate::support::*;

const TRIGGER_MODE: &str = "mode = \"trigger\"\n\n[trigger]\npoll_interval = \"1s\"\n";

const SCHEMA: &str = "CREATE TABLE public.items (id int PRIMARY KEY, name text);
     CREATE TABLE public.other (id int PRIMARY KEY, v text);";

/// The gauge `walbridge_parked_changes` for `public.items` east -> west.
fn parked_gauge(port: u16) -> f64 {
    metric_sum(
        &scrape(port),
        "walbridge_parked_changes",
        &[
            ("source", "east"),
            ("target", "west"),
            ("table", "public.items"),
        ],
    )
}

fn wait_gauge(port: u16, expected: f64) {
    let mut last = -1.0;
    let ok = wait_until(WAIT, || {
        last = parked_gauge(port);
        last == expected
    });
    assert!(
        ok,
        "walbridge_parked_changes is {last}, expected {expected}"
    );
}

fn parked_count(d: &Deployment) -> String {
    d.sql("west", "SELECT count(*) FROM walbridge.parked")
}

/// east has a column west lacks (added by plain DDL, which is not replicated), after setup.
fn mismatched(replication_toml: &str) -> Deployment {
    let d = Deployment::new(&["east", "west"], SCHEMA, replication_toml);
    d.walbridge_ok(&["setup"]);
    d.sql("east", "ALTER TABLE public.items ADD COLUMN note text");
    d
}

/// How the target is made to fit.
#[derive(Clone, Copy)]
enum Fix {
    /// Plain DDL on the target (found by the periodic check).
    ByHand,
    /// `walbridge.ddl()` on the source (`IF NOT EXISTS`: a no-op there), applied on the target
    /// through the stream (a hint: checked at once).
    ThroughDdl,
}

fn park_then_replay(replication_toml: &str, fix: Fix) {
    let mut d = mismatched(replication_toml);
    let port = d.enable_metrics();
    let mut run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO items VALUES (1, 'a', 'n1')");
    d.sql("east", "INSERT INTO other VALUES (1, 'x')");
    d.sql(
        "east",
        "UPDATE items SET name = 'a2', note = 'n1b' WHERE id = 1",
    );
    d.sql("east", "INSERT INTO items VALUES (2, 'b', NULL)");
    d.sql("east", "DELETE FROM items WHERE id = 2");
    // One source transaction over both tables: its `other` row goes on, its `items` row waits.
    d.sql(
        "east",
        "BEGIN; INSERT INTO items VALUES (3, 'c', 'it''s \"3\"'); \
         INSERT INTO other VALUES (3, 'z'); COMMIT",
    );
    d.sql("east", "INSERT INTO other VALUES (2, 'y')");

    d.wait_for("west", "SELECT count(*) FROM other", "3");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "5");
    assert_eq!(d.sql("west", "SELECT count(*) FROM items"), "0");
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(op, ',' ORDER BY seq) FROM walbridge.parked \
             WHERE source = 'east' AND target = 'west' AND schema_name = 'public' \
             AND table_name = 'items'"
        ),
        "insert,update,insert,delete,insert"
    );
    // NULL stays apart from the text 'NULL'.
    assert_eq!(
        d.sql(
            "west",
            "SELECT new_values[3] IS NULL FROM walbridge.parked WHERE op = 'insert' \
             AND new_values[1] = '2'"
        ),
        "t"
    );
    wait_gauge(port, 5.0);
    let out = d.walbridge(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("east -> west: public.items: 5 changes parked on west"),
        "{text}"
    );
    let out = d.walbridge(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let east_west = json["directions"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| x["source"] == "east" && x["target"] == "west")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(east_west["parked"]["public.items"], 5, "{json:#}");

    // The fix on west, and at once more writes on east: they land after the parked ones.
    match fix {
        Fix::ByHand => {
            d.sql("west", "ALTER TABLE public.items ADD COLUMN note text");
        }
        Fix::ThroughDdl => {
            d.sql(
                "east",
                "SELECT walbridge.ddl('ALTER TABLE public.items ADD COLUMN IF NOT EXISTS note text')",
            );
        }
    }
    d.sql("east", "UPDATE items SET note = 'after fix' WHERE id = 1");
    d.sql("east", "INSERT INTO items VALUES (4, 'd', 'n4')");

    let mut last = String::new();
    let same = wait_until(WAIT, || {
        last = d.fingerprint("west", "public.items", "id");
        last == d.fingerprint("east", "public.items", "id")
    });
    assert!(
        same,
        "items differ: west {last}, east {}\n{}",
        d.fingerprint("east", "public.items", "id"),
        run.log()
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(id || ':' || name || ':' || coalesce(note, '-'), ',' ORDER BY id) \
             FROM items"
        ),
        "1:a2:after fix,3:c:it's \"3\",4:d:n4"
    );
    assert_eq!(parked_count(&d), "0");
    wait_gauge(port, 0.0);
    // Rows written by west flow back as usual.
    d.sql("west", "INSERT INTO items VALUES (5, 'w', 'from west')");
    d.wait_for("east", "SELECT note FROM items WHERE id = 5", "from west");
    run.assert_running();
    let log = run.log();
    assert!(!log.contains("direction stopped"), "log:\n{log}");
    assert!(log.contains("parked changes replayed"), "log:\n{log}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

#[test]
fn park_keeps_a_mismatched_table_and_replays_it_in_order() {
    park_then_replay("on_schema_mismatch = \"park\"", Fix::ByHand);
}

#[test]
fn park_replays_once_walbridge_ddl_makes_the_target_fit() {
    park_then_replay("on_schema_mismatch = \"park\"", Fix::ThroughDdl);
}

#[test]
fn park_keeps_a_mismatched_table_and_replays_it_in_order_wal2json() {
    if !wal2json_available() {
        return;
    }
    park_then_replay(
        "plugin = \"wal2json\"\nallow_lossy_wal2json = true\non_schema_mismatch = \"park\"",
        Fix::ByHand,
    );
}

/// Trigger mode: a change row of a column the target lacks is described as the source's
/// table has it, and the applier parks it as in stream mode.
#[test]
fn park_keeps_a_mismatched_table_and_replays_it_in_order_trigger_mode() {
    park_then_replay(
        "mode = \"trigger\"\non_schema_mismatch = \"park\"\n\n[trigger]\npoll_interval = \"1s\"\n",
        Fix::ByHand,
    );
}

#[test]
fn park_survives_kill_without_parking_twice_or_losing() {
    let d = mismatched("on_schema_mismatch = \"park\"");
    let mut run = d.spawn_run("run1.log");
    d.sql(
        "east",
        "DO $$ BEGIN FOR i IN 1..40 LOOP \
           INSERT INTO items VALUES (i, 'n' || i, 'note' || i); \
           INSERT INTO other VALUES (i, 'v' || i); COMMIT; END LOOP; END $$",
    );
    // Killed while (or right after) the first rows are parked.
    d.wait_for("west", "SELECT count(*) >= 10 FROM walbridge.parked", "t");
    run.signal(libc::SIGKILL);
    let _ = run.wait_exit(WAIT);
    d.sql(
        "east",
        "DO $$ BEGIN FOR i IN 41..50 LOOP \
           INSERT INTO items VALUES (i, 'n' || i, 'note' || i); \
           INSERT INTO other VALUES (i, 'v' || i); COMMIT; END LOOP; END $$",
    );
    let mut run = d.spawn_run("run2.log");
    d.wait_for("west", "SELECT count(*) FROM other", "50");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "50");
    assert_eq!(
        d.sql(
            "west",
            "SELECT count(DISTINCT new_values[1]) || ':' || min(new_values[1]::int) || ':' || \
             max(new_values[1]::int) FROM walbridge.parked"
        ),
        "50:1:50"
    );
    d.sql("west", "ALTER TABLE public.items ADD COLUMN note text");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "0");
    let same = wait_until(WAIT, || {
        d.fingerprint("west", "public.items", "id") == d.fingerprint("east", "public.items", "id")
    });
    assert!(same, "items differ\n{}", run.log());
    run.assert_running();
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

#[test]
fn schema_mismatch_stop_is_the_default_and_names_table_and_column() {
    stop_names_table_and_column("");
}

/// Trigger mode too: a change row of a column the source's table has and the target's lacks
/// is a schema mismatch (not a bad row): the direction stops and the row waits.
#[test]
fn schema_mismatch_stop_is_the_default_and_names_table_and_column_trigger_mode() {
    stop_names_table_and_column(TRIGGER_MODE);
}

fn stop_names_table_and_column(replication_toml: &str) {
    let d = mismatched(replication_toml);
    let mut run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO other VALUES (1, 'x')");
    d.wait_for("west", "SELECT count(*) FROM other", "1");
    d.sql("east", "INSERT INTO items VALUES (1, 'a', 'n1')");
    let ok = wait_until(WAIT, || run.log().contains("direction stopped"));
    let log = run.log();
    assert!(ok, "log:\n{log}");
    assert!(
        log.contains(
            "column \\\"note\\\" of table public.items exists on the source but not on the target"
        ) || log.contains(
            "column \"note\" of table public.items exists on the source but not on the target"
        ),
        "log:\n{log}"
    );
    assert_eq!(d.sql("west", "SELECT count(*) FROM items"), "0");
    assert_eq!(d.sql("west", "SELECT count(*) FROM walbridge.parked"), "0");
    run.signal(libc::SIGTERM);
    let _ = run.wait_exit(WAIT);
}

/// The source's table changes again while changes are parked: each description of it is
/// replayed only once the target fits it, in order.
#[test]
fn park_replays_only_as_far_as_the_target_fits() {
    let mut d = mismatched("on_schema_mismatch = \"park\"");
    let port = d.enable_metrics();
    let mut run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO items VALUES (1, 'a', 'n1')");
    d.sql("east", "ALTER TABLE public.items ADD COLUMN extra int");
    d.sql("east", "INSERT INTO items VALUES (2, 'b', 'n2', 2)");
    d.sql("east", "UPDATE items SET extra = 1 WHERE id = 1");
    d.sql("east", "INSERT INTO other VALUES (1, 'x')");
    d.wait_for("west", "SELECT count(*) FROM other", "1");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "3");
    // Only the first description fits now: its change is replayed, the rest waits.
    d.sql("west", "ALTER TABLE public.items ADD COLUMN note text");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "2");
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(id || ':' || note, ',') FROM items"
        ),
        "1:n1"
    );
    wait_gauge(port, 2.0);
    d.sql("west", "ALTER TABLE public.items ADD COLUMN extra int");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "0");
    let same = wait_until(WAIT, || {
        d.fingerprint("west", "public.items", "id") == d.fingerprint("east", "public.items", "id")
    });
    assert!(same, "items differ\n{}", run.log());
    wait_gauge(port, 0.0);
    run.assert_running();
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

const WITH_NOTE: &str = "CREATE TABLE public.items (id int PRIMARY KEY, name text, note text);
     CREATE TABLE public.other (id int PRIMARY KEY, v text);";

/// Both nodes fit, `run` maps `items` at its first change, then `note` is dropped on west by
/// hand while `run` runs and east writes it again.
fn dropped_by_hand_while_running(replication_toml: &str) -> (Deployment, Runner) {
    let d = Deployment::new(&["east", "west"], WITH_NOTE, replication_toml);
    d.walbridge_ok(&["setup"]);
    let run = d.spawn_run("run.log");
    d.sql("east", "INSERT INTO items VALUES (1, 'a', 'n1')");
    d.wait_for("west", "SELECT note FROM items WHERE id = 1", "n1");
    d.sql("west", "ALTER TABLE public.items DROP COLUMN note");
    d.sql("east", "INSERT INTO items VALUES (2, 'b', 'n2')");
    d.sql("east", "INSERT INTO other VALUES (1, 'x')");
    (d, run)
}

/// A column dropped on the target by hand while the direction runs: the failed statement
/// makes the applier map the table again, and the change is parked (not a stop), in both
/// capture modes; adding the column back replays it.
fn dropped_by_hand_parks(replication_toml: &str) {
    let (d, mut run) = dropped_by_hand_while_running(replication_toml);
    d.wait_for("west", "SELECT count(*) FROM other", "1");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "1");
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM items WHERE id = 2"),
        "0"
    );
    d.sql("west", "ALTER TABLE public.items ADD COLUMN note text");
    d.wait_for("west", "SELECT count(*) FROM walbridge.parked", "0");
    d.wait_for("west", "SELECT note FROM items WHERE id = 2", "n2");
    run.assert_running();
    let log = run.log();
    assert!(!log.contains("direction stopped"), "log:\n{log}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

#[test]
fn a_column_dropped_by_hand_on_the_running_target_is_parked() {
    dropped_by_hand_parks("on_schema_mismatch = \"park\"");
}

#[test]
fn a_column_dropped_by_hand_on_the_running_target_is_parked_trigger_mode() {
    dropped_by_hand_parks(
        "mode = \"trigger\"\non_schema_mismatch = \"park\"\n\n[trigger]\npoll_interval = \"1s\"\n",
    );
}

/// With `stop`, the same drop stops the direction naming the table and the column (not the
/// server's words about a statement), in both capture modes; other directions go on, and
/// nothing is lost: once the column is back, a restarted `run` applies the change.
fn dropped_by_hand_stops_naming_it(replication_toml: &str) {
    let (d, mut run) = dropped_by_hand_while_running(replication_toml);
    let ok = wait_until(WAIT, || run.log().contains("direction stopped"));
    let log = run.log();
    assert!(ok, "log:\n{log}");
    assert!(
        log.contains("of table public.items exists on the source but not on the target"),
        "log:\n{log}"
    );
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM items WHERE id = 2"),
        "0"
    );
    // west -> east still runs.
    d.sql("west", "INSERT INTO other VALUES (2, 'w')");
    d.wait_for("east", "SELECT count(*) FROM other WHERE id = 2", "1");
    run.signal(libc::SIGTERM);
    let _ = run.wait_exit(WAIT);
    d.sql("west", "ALTER TABLE public.items ADD COLUMN note text");
    let mut run = d.spawn_run("run2.log");
    d.wait_for("west", "SELECT note FROM items WHERE id = 2", "n2");
    d.wait_for("west", "SELECT v FROM other WHERE id = 1", "x");
    run.assert_no_direction_stopped();
    if replication_toml.contains("trigger") {
        assert_eq!(
            d.sql("east", "SELECT count(*) FROM database_changes_dead"),
            "0"
        );
    }
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

#[test]
fn a_column_dropped_by_hand_on_the_running_target_stops_naming_it() {
    dropped_by_hand_stops_naming_it("");
}

#[test]
fn a_column_dropped_by_hand_on_the_running_target_stops_naming_it_trigger_mode() {
    dropped_by_hand_stops_naming_it(TRIGGER_MODE);
}
