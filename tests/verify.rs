//! `walbridge verify` against real clusters: identical tables, single changed rows found by
//! bisection, missing ranges, tables without a key, skipped and generated columns, exit codes.

use std::time::Instant;

use crate::support::*;

fn verify_json(d: &Deployment, args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let out = d.walbridge(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}):\n{stdout}\n{stderr}"));
    (out.status.code().unwrap_or(-1), json, stderr)
}

#[test]
fn verify_finds_one_changed_row_in_a_million_and_names_it() {
    let schema = "CREATE TABLE public.big (id int PRIMARY KEY, name text, v numeric, at timestamptz);
                  INSERT INTO public.big SELECT g, md5(g::text), g / 7.0, '2024-01-01'::timestamptz + g * interval '1 s'
                    FROM generate_series(1, 1000000) g;
                  CREATE TABLE public.small (k text PRIMARY KEY, n int);
                  INSERT INTO public.small SELECT 'k' || g, g FROM generate_series(1, 100) g;";
    let d = Deployment::new(&["east", "west"], schema, "tables = [\"public.*\"]");

    let started = Instant::now();
    let (code, json, stderr) = verify_json(&d, &[]);
    let identical_secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{json:#}\n{stderr}");
    assert_eq!(json["identical"], true);
    let big = &json["tables"][0];
    assert_eq!(big["table"], "public.big");
    assert_eq!(big["nodes"]["east"]["rows"], 1_000_000);
    assert_eq!(big["nodes"]["east"]["hash"], big["nodes"]["west"]["hash"]);

    d.sql(
        "west",
        "UPDATE public.big SET name = 'changed' WHERE id = 654321",
    );
    let started = Instant::now();
    let (code, json, stderr) = verify_json(&d, &[]);
    let bisect_secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 1, "{json:#}\n{stderr}");
    assert_eq!(json["identical"], false);
    let big = &json["tables"][0];
    assert_eq!(big["identical"], false);
    assert_ne!(big["nodes"]["east"]["hash"], big["nodes"]["west"]["hash"]);
    let diffs = big["differences"].as_array().expect("differences");
    assert_eq!(diffs.len(), 1, "{big:#}");
    assert_eq!(diffs[0]["key"], "654321");
    assert_eq!(diffs[0]["from"], "654321");
    assert_eq!(diffs[0]["to"], "654321");
    assert_eq!(diffs[0]["detail"], "row differs");
    assert_eq!(json["tables"][1]["identical"], true, "{json:#}");

    // The text form names the key too.
    let out = d.walbridge(&["verify", "--table", "public.big"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("public.big: DIFFERENT"), "{text}");
    assert!(text.contains("id = 654321: row differs"), "{text}");
    assert!(
        !text.contains("public.small"),
        "--table limits the run: {text}"
    );
    eprintln!(
        "verify, 1M rows on two nodes: {identical_secs:.1}s when identical, {bisect_secs:.1}s to \
         locate one changed row"
    );
}

#[test]
fn verify_names_missing_keys_and_ranges() {
    let schema = "CREATE TABLE public.t (a int, b text, v int, PRIMARY KEY (a, b));
                  INSERT INTO public.t SELECT g / 10, 'b' || (g % 10), g FROM generate_series(0, 19999) g;";
    let d = Deployment::new(&["east", "west"], schema, "tables = [\"public.*\"]");
    // A whole block missing on west, one extra row on east, one row changed on east.
    d.sql("west", "DELETE FROM public.t WHERE a BETWEEN 1000 AND 1099");
    d.sql("east", "INSERT INTO public.t VALUES (5000, 'x', 1)");
    d.sql(
        "east",
        "UPDATE public.t SET v = -1 WHERE a = 1500 AND b = 'b3'",
    );
    let (code, json, _) = verify_json(&d, &[]);
    assert_eq!(code, 1);
    let t = &json["tables"][0];
    assert_eq!(t["key"], serde_json::json!(["a", "b"]));
    assert_eq!(t["nodes"]["east"]["rows"], 20001);
    assert_eq!(t["nodes"]["west"]["rows"], 19000);
    let diffs = t["differences"].as_array().expect("differences");
    // The missing block shows as ranges with no rows on west (or single keys at its edges),
    // in key order; with the extra row on east, 1001 rows are missing on west.
    let mut missing_on_west = 0;
    for d in diffs {
        if d["key"].is_null() {
            assert_eq!(d["rows"]["west"], 0, "{d:#}");
            assert_eq!(
                d["detail"], "every row of the range missing on west",
                "{d:#}"
            );
            missing_on_west += d["rows"]["east"].as_i64().unwrap();
        } else if d["detail"] == "missing on west" {
            missing_on_west += 1;
        }
    }
    assert_eq!(missing_on_west, 1001, "{diffs:#?}");
    assert!(diffs.len() < 20, "adjacent ranges are merged: {diffs:#?}");
    let keys: Vec<&str> = diffs.iter().filter_map(|d| d["key"].as_str()).collect();
    assert!(keys.contains(&"(1500, b3)"), "{keys:?}");
    assert!(keys.contains(&"(5000, x)"), "{keys:?}");
    let changed = diffs.iter().find(|d| d["key"] == "(1500, b3)").unwrap();
    assert_eq!(changed["detail"], "row differs");
    let extra = diffs.iter().find(|d| d["key"] == "(5000, x)").unwrap();
    assert_eq!(extra["detail"], "missing on west");
    assert_eq!(extra["rows"]["west"], 0);
    assert_eq!(extra["rows"]["east"], 1);
}

#[test]
fn verify_without_a_key_compares_counts_and_hashes_only() {
    let schema = "CREATE TABLE public.log (line text, n int);
                  INSERT INTO public.log SELECT 'line ' || g, g FROM generate_series(1, 1000) g;";
    let d = Deployment::new(&["east", "west"], schema, "tables = [\"public.*\"]");
    // Physical order differs, content does not.
    d.sql(
        "west",
        "CREATE TEMP TABLE x AS SELECT * FROM public.log ORDER BY n DESC; TRUNCATE public.log; \
         INSERT INTO public.log SELECT * FROM x",
    );
    let (code, json, _) = verify_json(&d, &[]);
    assert_eq!(code, 0, "{json:#}");
    let notes = json["tables"][0]["notes"].to_string();
    assert!(notes.contains("no primary key"), "{notes}");

    d.sql("west", "UPDATE public.log SET line = 'other' WHERE n = 500");
    let (code, json, _) = verify_json(&d, &[]);
    assert_eq!(code, 1);
    assert_eq!(json["tables"][0]["identical"], false);
    assert_eq!(json["tables"][0]["differences"], serde_json::json!([]));
    assert_eq!(json["tables"][0]["nodes"]["west"]["rows"], 1000);
}

#[test]
fn verify_leaves_out_skipped_and_generated_columns_and_ignores_column_order() {
    let d = Deployment::new(
        &["east", "west"],
        "",
        "tables = [\"public.*\"]\nskip_columns = { \"public.acct\" = [\"local_note\"] }",
    );
    d.sql(
        "east",
        "CREATE TABLE public.acct (id int PRIMARY KEY, balance numeric, local_note text,
                                   doubled numeric GENERATED ALWAYS AS (balance * 2) STORED);
         INSERT INTO public.acct (id, balance, local_note) SELECT g, g, 'east' FROM generate_series(1, 500) g;",
    );
    // Same columns, another physical order, other local notes.
    d.sql(
        "west",
        "CREATE TABLE public.acct (local_note text, balance numeric, id int PRIMARY KEY,
                                   doubled numeric GENERATED ALWAYS AS (balance * 2) STORED);
         INSERT INTO public.acct (id, balance, local_note) SELECT g, g, 'west' FROM generate_series(1, 500) g;",
    );
    let (code, json, _) = verify_json(&d, &[]);
    assert_eq!(code, 0, "{json:#}");

    d.sql("west", "UPDATE public.acct SET balance = 0 WHERE id = 7");
    let (code, json, _) = verify_json(&d, &[]);
    assert_eq!(code, 1);
    assert_eq!(json["tables"][0]["differences"][0]["key"], "7");
}

#[test]
fn verify_table_flag_and_exit_codes() {
    let d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.a (id int PRIMARY KEY); CREATE TABLE public.b (id int PRIMARY KEY);",
        "tables = [\"public.*\"]\nexclude = [\"public.b\"]",
    );
    d.sql("west", "INSERT INTO public.b VALUES (1)");
    // public.b is not replicated: it differs, and nobody cares.
    let out = d.walbridge(&["verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("public.a: identical (0 rows"), "{text}");
    assert!(!text.contains("public.b"), "{text}");

    for table in ["public.b", "public.nope"] {
        let out = d.walbridge(&["verify", "--table", table]);
        assert_eq!(out.status.code(), Some(2), "{table}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("table {table} is not replicated")),
            "{err}"
        );
    }
    let out = d.walbridge(&["verify", "--table", "nodot"]);
    assert_eq!(out.status.code(), Some(2));

    // A table missing on one node is a difference, named.
    d.sql("west", "DROP TABLE public.a");
    let (code, json, _) = verify_json(&d, &[]);
    assert_eq!(code, 1);
    assert!(
        json["tables"][0]["notes"]
            .to_string()
            .contains("table missing on west"),
        "{json:#}"
    );
}
