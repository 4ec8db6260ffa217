//! Trigger-mode directions under several `walbridge run` instances: each is claimed by one
//! instance (the same advisory lock as a stream direction), so one change table is drained by
//! one process; a survivor takes over after kill -9; nothing is applied twice.

use std::time::{Duration, Instant};

use crate::ha::{owners, spawn_instance};
use crate::support::*;

/// A ledger without a key: a change table row applied twice shows as a duplicate.
const SCHEMA: &str = "CREATE TABLE public.ledger (seq bigint NOT NULL, note text);
                      ALTER TABLE public.ledger REPLICA IDENTITY FULL;";

fn counts(d: &Deployment, node: &str) -> String {
    d.sql(
        node,
        "SELECT count(*) || ' ' || count(DISTINCT seq) FROM ledger",
    )
}

#[test]
fn trigger_mode_directions_are_claimed_by_one_instance_and_taken_over() {
    let d = Deployment::new(
        &["a", "b"],
        SCHEMA,
        "mode = \"trigger\"\ntables = [\"public.ledger\"]\n\n[trigger]\npoll_interval = \"1s\"\n",
    );
    d.walbridge_ok(&["setup"]);
    let mut one = spawn_instance(&d, "one", "one.log", None);
    let all_owned_by = |who: &str| {
        let o = owners(&d);
        o.len() == 2 && o.values().all(|v| v.as_deref() == Some(who))
    };
    assert!(
        wait_until(WAIT, || all_owned_by("one")),
        "{:?}\n{}",
        owners(&d),
        one.log()
    );
    let mut two = spawn_instance(&d, "two", "two.log", None);
    assert!(
        wait_until(WAIT, || two.log().matches("standing by").count() == 2),
        "{}",
        two.log()
    );
    // Both instances run while both nodes write: every row arrives once.
    d.sql(
        "a",
        "INSERT INTO ledger SELECT g, 'a' FROM generate_series(1, 200) g",
    );
    d.sql(
        "b",
        "INSERT INTO ledger SELECT g, 'b' FROM generate_series(201, 400) g",
    );
    for n in ["a", "b"] {
        d.wait_for(n, "SELECT count(*) FROM ledger", "400");
    }
    assert_eq!(two.log().matches("claimed direction").count(), 0);

    one.signal(libc::SIGKILL);
    one.wait_exit(WAIT);
    let killed = Instant::now();
    d.sql("a", "INSERT INTO ledger VALUES (401, 'a')");
    d.sql("b", "INSERT INTO ledger VALUES (402, 'b')");
    assert!(
        wait_until(Duration::from_secs(30), || counts(&d, "a") == "402 402"
            && counts(&d, "b") == "402 402"),
        "no takeover within 30 s: {} / {}; log:\n{}",
        counts(&d, "a"),
        counts(&d, "b"),
        two.log()
    );
    eprintln!(
        "trigger-mode takeover after kill -9: {:?}",
        killed.elapsed()
    );
    assert!(wait_until(WAIT, || all_owned_by("two")), "{:?}", owners(&d));
    // Give a second drain of the same rows every chance to show.
    d.sql(
        "a",
        "INSERT INTO ledger SELECT g, 'a' FROM generate_series(403, 500) g",
    );
    for n in ["a", "b"] {
        d.wait_for(
            n,
            "SELECT count(*) || ' ' || count(DISTINCT seq) FROM ledger",
            "500 500",
        );
    }
    two.assert_running();
}
