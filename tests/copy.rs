//! `walbridge setup --copy-from` against real clusters: a consistent copy (partitioned,
//! identity, generated and TOASTed columns) that meets the stream exactly, refusal of non-empty
//! targets, and Ctrl-C leaving nothing half made.

use std::process::{Command, Stdio};

use crate::support::*;

/// 200k rows in four tables: plain, partitioned, identity + generated, TOASTed.
const SCHEMA: &str = "
    CREATE TABLE public.items (id int PRIMARY KEY, name text, qty numeric, tags text[]);
    CREATE TABLE public.events (id bigint, day date, payload jsonb, PRIMARY KEY (id, day))
        PARTITION BY RANGE (day);
    CREATE TABLE public.events_2024 PARTITION OF public.events
        FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
    CREATE TABLE public.events_2025 PARTITION OF public.events
        FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
    CREATE TABLE public.ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text,
                               len int GENERATED ALWAYS AS (length(v)) STORED);
    CREATE TABLE public.docs (id int PRIMARY KEY, body text);
    ALTER TABLE public.docs ALTER body SET STORAGE EXTERNAL;
";

const DATA: &str = "
    INSERT INTO public.items SELECT g, 'item ' || g, g * 1.25, ARRAY['a' || g % 7, NULL]
      FROM generate_series(1, 100000) g;
    INSERT INTO public.events SELECT g, DATE '2024-06-01' + (g % 400), jsonb_build_object('n', g)
      FROM generate_series(1, 60000) g;
    INSERT INTO public.ident (v) SELECT repeat('x', g % 50) FROM generate_series(1, 30000) g;
    INSERT INTO public.docs SELECT g, (SELECT string_agg(md5(g::text || i), '') FROM generate_series(1, 100) i)
      FROM generate_series(1, 10000) g;
    ANALYZE;
";

fn deployment(extra_schema: &str) -> Deployment {
    let d = Deployment::new(
        &["east", "west"],
        &format!("{SCHEMA}{extra_schema}"),
        "tables = [\"public.*\"]",
    );
    d.sql("east", DATA);
    d
}

/// `slot walbridge_east_to_west created at 0/1234 ...` from setup's output.
fn consistent_point(setup_out: &str) -> String {
    setup_out
        .lines()
        .find_map(|l| {
            l.split_once("slot walbridge_east_to_west created at ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
        })
        .unwrap_or_else(|| panic!("no consistent point in setup output:\n{setup_out}"))
        .to_string()
}

fn verify_ok(d: &Deployment) {
    let out = d.walbridge(&["verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn copy_fills_the_peer_consistently_with_the_slot() {
    let d = deployment("");
    let out = d.walbridge_ok(&["setup", "--copy-from", "east", "--jobs", "3"]);
    let point = consistent_point(&out);
    assert!(out.contains("copied 200000 rows"), "{out}");
    assert!(out.contains("public.docs 10000 rows"), "{out}");

    // Same content everywhere, partitions included.
    verify_ok(&d);
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM ONLY public.events_2025"),
        d.sql("east", "SELECT count(*) FROM ONLY public.events_2025")
    );
    // The TOASTed values really are stored out of line on the peer, and intact.
    let toast = d.sql(
        "west",
        "SELECT reltoastrelid::regclass FROM pg_class WHERE oid = 'public.docs'::regclass",
    );
    assert_eq!(
        d.sql(
            "west",
            &format!("SELECT count(DISTINCT chunk_id) FROM {toast}")
        ),
        "10000"
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT count(*) FROM public.docs WHERE length(body) = 3200"
        ),
        "10000"
    );
    // Generated columns are recomputed by the peer.
    assert_eq!(
        d.sql(
            "west",
            "SELECT count(*) FROM public.ident WHERE len = length(v)"
        ),
        "30000"
    );

    // The stream starts exactly where the copy ends.
    assert_eq!(
        d.sql(
            "east",
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'walbridge_east_to_west'"
        ),
        point
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT remote_lsn FROM pg_replication_origin_status s JOIN pg_replication_origin o \
             ON o.roident = s.local_id WHERE o.roname = 'walbridge_from_east'"
        ),
        point
    );
    // The other direction was set up as usual, after the copy.
    assert_eq!(
        d.sql(
            "west",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walbridge_west_to_east'"
        ),
        "1"
    );

    // Copied rows look written by east, through the copy origins.
    let writers = d.sql(
        "west",
        "SELECT string_agg(DISTINCT o.roname, ',') FROM public.items i \
           CROSS JOIN LATERAL pg_xact_commit_timestamp_origin(i.xmin) x \
           JOIN pg_replication_origin o ON o.roident = x.roident",
    );
    assert!(
        !writers.is_empty()
            && writers
                .split(',')
                .all(|w| w.starts_with("walbridge_copy_east_")),
        "{writers}"
    );

    // Identity sequences continue after the copied values.
    assert_eq!(
        d.sql(
            "west",
            "INSERT INTO public.ident (v) VALUES ('new') RETURNING id"
        ),
        "30001"
    );

    // Teardown removes the copy origins too.
    d.walbridge_ok(&["teardown"]);
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM pg_replication_origin"),
        "0"
    );
}

#[test]
fn copy_while_writes_continue_then_run_streams_the_rest() {
    let d = deployment("");
    // A writer on east that inserts, updates and deletes across all tables while the copy runs.
    let writer_sql = "DO $$
        BEGIN
          FOR i IN 1..1500 LOOP
            INSERT INTO public.items VALUES (200000 + i, 'late ' || i, i, NULL);
            UPDATE public.items SET name = name || '+' WHERE id = 1 + (i * 37) % 100000;
            DELETE FROM public.docs WHERE id = i;
            INSERT INTO public.events VALUES (100000 + i, DATE '2025-02-01', '{}');
            INSERT INTO public.ident (v) VALUES ('w' || i);
            COMMIT;
            PERFORM pg_sleep(0.002);
          END LOOP;
        END $$";
    let c = d.node("east");
    let mut writer = Command::new(c.client_tool("psql").expect("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
        .arg(c.port().to_string())
        .args(["-U", "postgres", "-d", "postgres", "-c", writer_sql])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the writer");
    assert!(wait_until(WAIT, || d.sql(
        "east",
        "SELECT count(*) FROM public.items WHERE id > 200000"
    ) != "0"));

    let out = d.walbridge_ok(&["setup", "--copy-from", "east"]);
    // The writer must still have been writing when the copy was over.
    let during = d.sql(
        "east",
        "SELECT count(*) FROM public.items WHERE id > 200000",
    );
    let status = writer.wait().expect("writer");
    assert!(status.success(), "writer failed: {status}");
    assert!(
        during.parse::<i64>().unwrap() < 1500,
        "the writes were over before the copy finished ({during}); make the writer longer\n{out}"
    );

    let mut run = d.spawn_run("run.log");
    d.wait_caught_up();
    run.assert_running();
    verify_ok(&d);
    // Nothing was applied twice or out of turn: no conflict at all.
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM walbridge.conflicts"),
        "0",
        "{}",
        run.log()
    );
    assert_eq!(
        d.sql(
            "west",
            "SELECT count(*) FROM public.items WHERE id > 200000"
        ),
        "1500"
    );
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

#[test]
fn copy_refuses_a_non_empty_target_without_truncate() {
    let d = deployment("");
    d.sql(
        "west",
        "INSERT INTO public.items VALUES (1, 'local', 0, NULL)",
    );
    let out = d.walbridge(&["setup", "--copy-from", "east"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node west: table(s) public.items already hold rows"),
        "{err}"
    );
    assert!(err.contains("--truncate"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    // Nothing was done anywhere.
    for node in ["east", "west"] {
        assert_eq!(
            d.sql(
                node,
                "SELECT (SELECT count(*) FROM pg_replication_slots) + \
                        (SELECT count(*) FROM pg_namespace WHERE nspname = 'walbridge')"
            ),
            "0",
            "{node}"
        );
    }
    assert_eq!(d.sql("west", "SELECT name FROM public.items"), "local");

    // With --truncate the peer's rows are replaced.
    let out = d.walbridge_ok(&["setup", "--copy-from", "east", "--truncate"]);
    assert!(
        out.contains("west: emptied 4 table(s) (--truncate)"),
        "{out}"
    );
    verify_ok(&d);
    assert_eq!(
        d.sql("west", "SELECT name FROM public.items WHERE id = 1"),
        "item 1"
    );
}

#[test]
fn interrupt_during_copy_leaves_no_slot_and_no_rows() {
    let d = deployment("CREATE TABLE public.big (id int PRIMARY KEY, pad text);");
    d.sql(
        "east",
        "INSERT INTO public.big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 1500000) g",
    );
    let mut setup = Runner::spawn_command(
        &["setup", "--copy-from", "east", "--jobs", "1"],
        &d.config,
        d.dir.path().join("setup.log"),
        &[],
    );
    // Wait until rows are flowing into the peer, then Ctrl-C.
    let copying = wait_until(WAIT, || {
        d.sql(
            "west",
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%FROM STDIN%' \
             AND application_name LIKE 'walbridge-copy%'",
        ) != "0"
    });
    assert!(copying, "the copy never started:\n{}", setup.log());
    setup.signal(libc::SIGINT);
    let code = setup.wait_exit(WAIT);
    let log = setup.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("interrupted"), "{log}");
    assert!(
        log.contains("dropped slot walbridge_east_to_west on east"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    assert_eq!(
        d.sql("east", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert_eq!(
        d.sql("west", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    // Nothing stays half copied: every target table is empty again.
    assert_eq!(
        d.sql(
            "west",
            "SELECT (SELECT count(*) FROM public.big) + (SELECT count(*) FROM public.items) + \
                    (SELECT count(*) FROM public.events) + (SELECT count(*) FROM public.docs) + \
                    (SELECT count(*) FROM public.ident)"
        ),
        "0"
    );
    // And the copy can simply be run again.
    d.walbridge_ok(&["setup", "--copy-from", "east", "--jobs", "2"]);
    verify_ok(&d);
}

#[test]
fn interrupt_while_the_slot_waits_for_a_running_transaction() {
    let d = Deployment::new(&["east", "west"], SCHEMA, "tables = [\"public.*\"]");
    // A transaction with an xid (and no lock on a replicated table, which setup's triggers
    // would wait for) keeps the slot from reaching its consistent point.
    let c = d.node("east");
    let mut blocker = Command::new(c.client_tool("psql").expect("psql"))
        .args(["-X", "-q", "-h", "127.0.0.1", "-p"])
        .arg(c.port().to_string())
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            "BEGIN; SELECT txid_current(); SELECT pg_sleep(120); COMMIT",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the open transaction");
    assert!(wait_until(WAIT, || d.sql(
        "east",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND granted"
    ) != "0"));

    let mut setup = Runner::spawn_command(
        &["setup", "--copy-from", "east"],
        &d.config,
        d.dir.path().join("setup.log"),
        &[],
    );
    let waiting = wait_until(WAIT, || {
        d.sql(
            "east",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walbridge-copy-slot%' \
             AND query LIKE 'CREATE_REPLICATION_SLOT%' AND state = 'active'",
        ) != "0"
    });
    assert!(waiting, "slot creation never started:\n{}", setup.log());
    setup.signal(libc::SIGINT);
    let code = setup.wait_exit(WAIT);
    let _ = blocker.kill();
    let _ = blocker.wait();
    assert_eq!(code, Some(1), "{}", setup.log());
    assert!(setup.log().contains("interrupted"), "{}", setup.log());
    assert!(wait_until(WAIT, || d
        .sql("east", "SELECT count(*) FROM pg_replication_slots")
        == "0"));
    assert_eq!(d.sql("west", "SELECT count(*) FROM public.items"), "0");
}

#[test]
fn copy_to_two_peers_then_replicate_among_three() {
    if !wal2json_available() {
        return;
    }
    let d = Deployment::new(
        &["east", "west", "north"],
        "CREATE TABLE public.t (id int PRIMARY KEY, v text);",
        "tables = [\"public.*\"]\nplugin = \"wal2json\"",
    );
    d.sql(
        "east",
        "INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 20000) g",
    );
    let out = d.walbridge_ok(&["setup", "--copy-from", "east", "--jobs", "2"]);
    assert!(out.contains("copied 40000 rows"), "{out}");
    verify_ok(&d);

    let mut run = d.spawn_run("run.log");
    d.sql("west", "UPDATE public.t SET v = 'from west' WHERE id = 1");
    d.sql("north", "DELETE FROM public.t WHERE id = 2");
    d.sql("east", "INSERT INTO public.t VALUES (20001, 'late')");
    for node in ["east", "west", "north"] {
        d.wait_for(
            node,
            "SELECT count(*) || ':' || max(id) || ':' || (SELECT v FROM public.t WHERE id = 1) FROM public.t",
            "20000:20001:from west",
        );
    }
    d.wait_caught_up();
    verify_ok(&d);
    for node in ["east", "west", "north"] {
        assert_eq!(
            d.sql(node, "SELECT count(*) FROM walbridge.conflicts"),
            "0",
            "{node}"
        );
    }
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}
