//! `walbridge skip` against real clusters: a transaction the target refuses (a CHECK that
//! exists only there) stops its direction; skip refuses the wrong LSN, an unknown direction
//! and a direction that is not stopped; with the right LSN it records the changes in
//! `walbridge.skipped`, moves the origin, and the running `walbridge run` resumes after it.

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE public.t (id int PRIMARY KEY, v int);";

fn refused(d: &Deployment, args: &[&str], reason: &str) {
    let out = d.walbridge(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains("refused: "), "{args:?}: {stderr}");
    assert!(
        stderr.contains(reason),
        "{args:?}: expected {reason:?} in {stderr}"
    );
}

/// West's origin for east is at `lsn` (the skipped transaction's end), and the running
/// `walbridge run` applies what east writes next (`public.t` then holds rows 1 and 3).
fn assert_origin_past_and_resumed(d: &Deployment, lsn: &str, run: &mut Runner) {
    assert_eq!(
        d.sql(
            "west",
            "SELECT pg_replication_origin_progress('walbridge_from_east', true)"
        ),
        lsn
    );
    d.sql("east", "INSERT INTO public.t VALUES (3, 3)");
    d.wait_for(
        "west",
        "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM public.t",
        "1:1,3:3",
    );
    run.assert_running();
}

/// Two nodes replicating `public.*`, running, where west refuses `v >= 100` in `public.t`
/// (a CHECK constraint east does not have): a transaction writing such a row stops
/// east -> west.
fn running_with_a_check_on_west() -> (Deployment, Runner) {
    running_with_a_check_on_west_and("")
}

fn running_with_a_check_on_west_and(replication_toml: &str) -> (Deployment, Runner) {
    let d = Deployment::new(
        &["east", "west"],
        SCHEMA,
        &format!("tables = [\"public.*\"]\n{replication_toml}"),
    );
    d.walbridge_ok(&["setup"]);
    d.sql(
        "west",
        "ALTER TABLE public.t ADD CONSTRAINT small CHECK (v < 100)",
    );
    let run = d.spawn_run("run.log");
    (d, run)
}

#[test]
fn skip_moves_a_stopped_direction_past_the_transaction_it_stopped_on() {
    let (d, mut run) = running_with_a_check_on_west();
    d.sql("east", "INSERT INTO public.t VALUES (1, 1)");
    d.wait_for("west", "SELECT count(*) FROM public.t", "1");

    // West refuses the next transaction: east -> west stops and records where.
    d.sql(
        "east",
        "BEGIN; INSERT INTO public.t VALUES (2, 500); UPDATE public.t SET v = 2 WHERE id = 1; COMMIT",
    );
    d.wait_for(
        "west",
        "SELECT count(*) FROM walbridge.stopped WHERE source = 'east' AND target = 'west' AND end_lsn IS NOT NULL",
        "1",
    );
    let lsn = d.sql("west", "SELECT end_lsn FROM walbridge.stopped");
    let error = d.sql("west", "SELECT error FROM walbridge.stopped");
    assert!(error.contains(&format!("end {lsn}")), "{error}");
    run.assert_running();
    // `status` reads the stop from the target (no metrics listener here: the databases' view).
    let status = d.walbridge(&["status", "--json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("status --json prints JSON");
    let dir = status["directions"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| x["source"] == "east" && x["target"] == "west")
        })
        .expect("east -> west in status")
        .clone();
    assert_eq!(dir["state"], "failed", "{dir:#}");
    assert_eq!(dir["last_error"], error.as_str(), "{dir:#}");

    // Refused: another LSN, a direction that does not exist, one that is not stopped.
    let wrong = "0/1";
    refused(
        &d,
        &[
            "skip", "--source", "east", "--target", "west", "--lsn", wrong,
        ],
        &format!("stopped on the transaction ending at {lsn}, not {wrong}"),
    );
    refused(
        &d,
        &[
            "skip", "--source", "east", "--target", "north", "--lsn", &lsn,
        ],
        "there is no direction east -> north",
    );
    refused(
        &d,
        &[
            "skip", "--source", "west", "--target", "east", "--lsn", &lsn,
        ],
        "direction west -> east is not stopped",
    );
    assert_eq!(d.sql("west", "SELECT count(*) FROM walbridge.skipped"), "0");

    // The right LSN: recorded, origin moved, and the running process resumes after it.
    let out = d.walbridge_ok(&[
        "skip", "--source", "east", "--target", "west", "--lsn", &lsn,
    ]);
    assert!(out.contains(&format!("ending at {lsn}")), "{out}");
    assert!(out.contains("2 changes"), "{out}");
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(format('%s|%s|%s|%s|%s|%s', source, target, end_lsn, table_name, op, \"row\"), ';' ORDER BY seq)
               FROM walbridge.skipped"
        ),
        format!(
            "east|west|{lsn}|public.t|insert|{{\"v\": \"500\", \"id\": \"2\"}};\
             east|west|{lsn}|public.t|update|{{\"v\": \"2\", \"id\": \"1\"}}"
        )
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT commit_time IS NOT NULL AND skipped_at IS NOT NULL FROM walbridge.skipped LIMIT 1"
        ),
        "t"
    );
    assert_eq!(d.sql("west", "SELECT count(*) FROM walbridge.stopped"), "0");
    assert_origin_past_and_resumed(&d, &lsn, &mut run);
    // Skipping it again is refused: the direction is no longer stopped.
    refused(
        &d,
        &[
            "skip", "--source", "east", "--target", "west", "--lsn", &lsn,
        ],
        "direction east -> west is not stopped",
    );
}

/// Several queued transactions arrive in one group and one of them fails with a definite
/// error that is no conflict (a value the target's column type refuses): the group is applied
/// again one by one, the transactions before the bad one are applied, and the stop names the
/// bad one, so skip moves past it and nothing else.
#[test]
fn skip_names_the_failing_transaction_of_a_group() {
    let d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);",
        "tables = [\"public.*\"]",
    );
    d.sql(
        "west",
        "ALTER TABLE public.t ALTER COLUMN v TYPE int USING v::int",
    );
    d.walbridge_ok(&["setup"]);
    for (id, v) in [(1, "1"), (2, "abc"), (3, "3")] {
        d.sql(
            "east",
            &format!("INSERT INTO public.t VALUES ({id}, '{v}')"),
        );
    }
    let _run = d.spawn_run("run.log");
    d.wait_for(
        "west",
        "SELECT count(*) FROM walbridge.stopped WHERE end_lsn IS NOT NULL",
        "1",
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM public.t"
        ),
        "1",
        "the transaction before the bad one is applied"
    );
    let lsn = d.sql("west", "SELECT end_lsn FROM walbridge.stopped");
    d.walbridge_ok(&[
        "skip", "--source", "east", "--target", "west", "--lsn", &lsn,
    ]);
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(\"row\"::text, ';') FROM walbridge.skipped"
        ),
        "{\"v\": \"abc\", \"id\": \"2\"}"
    );
    d.wait_for(
        "west",
        "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM public.t",
        "1:1,3:3",
    );
}

/// Fixing the cause and restarting also ends a stop: the recorded stop is cleared once the
/// direction streams again, so `status` and `skip` no longer see it.
#[test]
fn a_stop_fixed_by_hand_is_cleared_when_the_direction_streams_again() {
    let (d, mut run) = running_with_a_check_on_west();
    d.sql("east", "INSERT INTO public.t VALUES (1, 500)");
    d.wait_for("west", "SELECT count(*) FROM walbridge.stopped", "1");
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "{}", run.log());
    d.sql("west", "ALTER TABLE public.t DROP CONSTRAINT small");
    let _run = d.spawn_run("run2.log");
    d.wait_for("west", "SELECT v FROM public.t WHERE id = 1", "500");
    d.wait_for("west", "SELECT count(*) FROM walbridge.stopped", "0");
    assert_eq!(d.sql("west", "SELECT count(*) FROM walbridge.skipped"), "0");
}

/// With wal2json the transaction is peeked from the slot with the options the direction
/// streams with: the same end LSN, its changes recorded, the origin moved, the direction
/// resumed.
#[test]
fn skip_moves_past_the_transaction_with_wal2json() {
    if !wal2json_available() {
        return;
    }
    let (d, mut run) =
        running_with_a_check_on_west_and("plugin = \"wal2json\"\nallow_lossy_wal2json = true");
    d.sql("east", "INSERT INTO public.t VALUES (1, 1)");
    d.wait_for("west", "SELECT count(*) FROM public.t", "1");
    d.sql(
        "east",
        "BEGIN; INSERT INTO public.t VALUES (2, 500); DELETE FROM public.t WHERE id = 1; COMMIT",
    );
    d.wait_for(
        "west",
        "SELECT count(*) FROM walbridge.stopped WHERE end_lsn IS NOT NULL",
        "1",
    );
    let lsn = d.sql("west", "SELECT end_lsn FROM walbridge.stopped");
    let out = d.walbridge_ok(&[
        "skip", "--source", "east", "--target", "west", "--lsn", &lsn,
    ]);
    assert!(out.contains("2 changes"), "{out}");
    assert_eq!(
        d.sql(
            "west",
            "SELECT string_agg(format('%s|%s|%s', table_name, op, \"row\"), ';' ORDER BY seq) \
             FROM walbridge.skipped"
        ),
        "public.t|insert|{\"v\": \"500\", \"id\": \"2\"};public.t|delete|{\"id\": \"1\"}"
    );
    assert_origin_past_and_resumed(&d, &lsn, &mut run);
}

/// Trigger mode sets a bad row aside in its dead-row table instead of stopping: skip says so
/// and what to do instead.
#[test]
fn skip_is_refused_in_trigger_mode_naming_the_dead_row_table() {
    let d = Deployment::new(
        &["east", "west"],
        SCHEMA,
        "tables = [\"public.*\"]\nmode = \"trigger\"",
    );
    d.walbridge_ok(&["setup"]);
    refused(
        &d,
        &[
            "skip", "--source", "east", "--target", "west", "--lsn", "0/1",
        ],
        "east is in trigger mode, where skip does not apply: a row the target refuses moves",
    );
}
