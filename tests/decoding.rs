//! The read side against real servers: a scripted workload, decoded through `Source` with
//! pgoutput and with wal2json, gives the expected events (one scenario per test, plain SQL
//! then the expected changes), and both plugins give the same events for the same workload.
//!
//! Every test creates one slot per plugin before its workload, runs the workload through
//! psql, ends it with a non-transactional marker message, then decodes each slot up to the
//! marker. Values are compared as the type's text output under walbridge's session settings
//! (`DateStyle=ISO`, `IntervalStyle=postgres`, `TimeZone=UTC`, `extra_float_digits=3`),
//! written out by hand: the expected values are an oracle independent of both decoders.

use serde_json::{json, Map, Value as Json};
use tokio_util::sync::CancellationToken;
use walbridge::config::Plugin;
use walbridge::dsn::Dsn;
use walbridge::event::{Change, Event, OldKind, ReplicaIdentity, Tuple, Value};
use walbridge::lsn::Lsn;
use walbridge::protocol::StreamConfig;
use walbridge::source::{Source, SourceItem, SourceOptions};

use crate::support::*;

const PUBLICATION: &str = "decoding_pub";
/// Prefix of the marker message that ends every workload.
const END: &str = "walbridge-test-end";

/// A database of its own (on the run's shared server) with `schema`, a publication of all
/// tables and one slot per plugin, created before any workload so that the slots see all of
/// it. The replication origin `test_origin` of the SQL becomes one named after the database
/// ([`origin_name`]): origins, like slots, are the server's, not the database's.
fn prepared(schema: &str) -> TestDb {
    let c = TestDb::new();
    c.psql(&own_names(&c, schema)).expect("create the schema");
    // One statement per psql call: a slot cannot be created in a transaction that wrote.
    let mut statements = vec![
        format!("CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES"),
        format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            slot_name(&c, Plugin::PgOutput)
        ),
    ];
    if wal2json_installed() {
        statements.push(format!(
            "SELECT pg_create_logical_replication_slot('{}', 'wal2json')",
            slot_name(&c, Plugin::Wal2Json)
        ));
    }
    for sql in statements {
        c.psql(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    c
}

/// The test's slot for `plugin`.
fn slot_name(c: &TestDb, plugin: Plugin) -> String {
    format!("{}_{plugin}", c.name())
}

/// The test's replication origin (written `test_origin` in the scenarios' SQL).
fn origin_name(c: &TestDb) -> String {
    format!("{}_origin", c.name())
}

fn own_names(c: &TestDb, sql: &str) -> String {
    sql.replace("test_origin", &origin_name(c))
}

/// Runs each transaction of `workload` in its own psql call, then the end marker.
fn run_workload(c: &TestDb, workload: &[&str]) {
    for sql in workload {
        c.psql(&own_names(c, sql))
            .unwrap_or_else(|e| panic!("workload failed: {e}\n{sql}"));
    }
    c.psql(&format!(
        "SELECT pg_logical_emit_message(false, '{END}', '')"
    ))
    .expect("end marker");
}

/// Decodes the plugin's slot up to the end marker.
async fn decode(c: &TestDb, plugin: Plugin) -> Vec<Event> {
    let dsn = Dsn::parse(&c.dsn()).expect("dsn");
    let cancel = CancellationToken::new();
    let opts = SourceOptions {
        plugin,
        slot: slot_name(c, plugin),
        publication: PUBLICATION.into(),
        start: Lsn::ZERO,
        tables: Vec::new(),
        selection: None,
        refuse_lossy: None,
        filter_origins: Vec::new(),
        messages: true,
        application_name: "walbridge-test".into(),
        drop_echo: false,
        stream_in_progress: false,
        spill: Vec::new(),
        stream: StreamConfig {
            cancel: cancel.clone(),
            ..StreamConfig::default()
        },
    };
    let (mut source, driver) = Source::start(&dsn, opts)
        .await
        .unwrap_or_else(|e| panic!("{plugin}: {e}"));
    let driver = tokio::spawn(driver);
    let mut events = Vec::new();
    let read = async {
        loop {
            match source.next().await {
                Ok(Some(SourceItem::Event {
                    event: Event::Message(m),
                    ..
                })) if m.prefix == END => return,
                Ok(Some(SourceItem::Event { event, .. })) => events.push(event),
                Ok(Some(SourceItem::Keepalive { .. })) => {}
                Ok(Some(SourceItem::Echo { .. })) => panic!("{plugin}: echo dropped unasked"),
                Ok(None) => panic!("{plugin}: the stream ended before the end marker"),
                Err(e) => panic!("{plugin}: {e}"),
            }
        }
    };
    if tokio::time::timeout(WAIT, read).await.is_err() {
        panic!("{plugin}: no end marker within {WAIT:?}; decoded so far: {events:#?}");
    }
    cancel.cancel();
    let _ = driver.await;
    check_framing(plugin, &events);
    events
}

/// Transactions are well formed: Begin (its origin folded in: no Origin event reaches a
/// consumer), changes, truncates and transactional messages, then a Commit whose LSN and
/// time match the Begin.
fn check_framing(plugin: Plugin, events: &[Event]) {
    let mut open: Option<&walbridge::event::Begin> = None;
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Begin(b) => {
                assert!(open.is_none(), "{plugin}: nested begin at {i}");
                open = Some(b);
            }
            Event::Origin(_) => {
                panic!("{plugin}: an origin event at {i}, not folded into its begin")
            }
            Event::StreamStart(_)
            | Event::StreamStop
            | Event::Subtransaction(_)
            | Event::StreamCommit(_)
            | Event::StreamAbort { .. } => panic!("{plugin}: a streamed event at {i}"),
            Event::Commit(c) => {
                let b = open.take().expect("commit without begin");
                assert_eq!(c.commit_lsn, b.final_lsn, "{plugin}: commit LSN at {i}");
                assert_eq!(c.commit_time, b.commit_time, "{plugin}: commit time at {i}");
                assert!(c.end_lsn > c.commit_lsn, "{plugin}: end LSN at {i}");
            }
            Event::Message(m) if !m.transactional => {
                assert!(open.is_none(), "{plugin}: non-transactional message inside");
            }
            Event::Change(_) | Event::Truncate(_) | Event::Message(_) => {
                assert!(
                    open.is_some(),
                    "{plugin}: {} outside a transaction",
                    e.kind()
                );
            }
            Event::Relation(_) | Event::Type(_) => {}
        }
    }
    assert!(open.is_none(), "{plugin}: unterminated transaction");
}

fn value(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::UnchangedToast => json!({"toast": "unchanged"}),
        Value::Text(b) => Json::String(
            std::str::from_utf8(b)
                .unwrap_or_else(|_| panic!("text value is not UTF-8: {b:?}"))
                .to_string(),
        ),
        Value::Binary(b) => panic!("binary value {b:?}: binary mode was not asked for"),
    }
}

fn row(change: &Change, tuple: &Tuple, keys_only: bool) -> Json {
    let cols = &change.relation.columns;
    assert_eq!(tuple.0.len(), cols.len(), "tuple width");
    let mut m = Map::new();
    for (col, v) in cols.iter().zip(&tuple.0) {
        if keys_only && !col.is_key {
            assert_eq!(*v, Value::Null, "non-key column {} in an old key", col.name);
            continue;
        }
        m.insert(col.name.clone(), value(v));
    }
    Json::Object(m)
}

/// The events as compact JSON: transaction frames with their origin, changes with their
/// table and values, truncates, messages. Relation and Type events are left out (each change
/// carries its relation; see `check_relations`).
fn summary(events: &[Event]) -> Vec<Json> {
    let mut out: Vec<Json> = Vec::new();
    for e in events {
        match e {
            Event::Begin(b) => {
                let mut j = json!({"op": "begin"});
                if let Some(o) = &b.origin {
                    j["origin"] = json!(o.name);
                }
                out.push(j);
            }
            Event::Origin(_) => panic!("an origin event, not folded into its begin"),
            Event::StreamStart(_)
            | Event::StreamStop
            | Event::Subtransaction(_)
            | Event::StreamCommit(_)
            | Event::StreamAbort { .. } => panic!("a streamed event (not asked for)"),
            Event::Commit(_) => out.push(json!({"op": "commit"})),
            Event::Relation(_) | Event::Type(_) => {}
            Event::Change(c) => {
                let mut j = json!({
                    "op": c.op.as_str(),
                    "table": c.relation.qualified_name(),
                });
                if let Some(new) = &c.new {
                    j["new"] = row(c, new, false);
                }
                if let Some(old) = &c.old {
                    j["old"] = match old.kind {
                        OldKind::Key => json!({"key": row(c, &old.tuple, true)}),
                        OldKind::Full => json!({"full": row(c, &old.tuple, false)}),
                    };
                }
                out.push(j);
            }
            Event::Truncate(t) => out.push(json!({
                "op": "truncate",
                "tables": t.relations.iter().map(|r| r.qualified_name()).collect::<Vec<_>>(),
                "cascade": t.cascade,
                "restart_identity": t.restart_identity,
            })),
            Event::Message(m) => out.push(json!({
                "op": "message",
                "transactional": m.transactional,
                "prefix": m.prefix,
                "content": match std::str::from_utf8(&m.content) {
                    Ok(s) => json!(s),
                    Err(_) => json!({"bytes": m.content.to_vec()}),
                },
            })),
        }
    }
    out
}

fn begin() -> Json {
    json!({"op": "begin"})
}

fn commit() -> Json {
    json!({"op": "commit"})
}

fn insert(table: &str, new: Json) -> Json {
    json!({"op": "insert", "table": table, "new": new})
}

fn update(table: &str, new: Json) -> Json {
    json!({"op": "update", "table": table, "new": new})
}

fn update_old(table: &str, new: Json, old: Json) -> Json {
    json!({"op": "update", "table": table, "new": new, "old": old})
}

fn delete(table: &str, old: Json) -> Json {
    json!({"op": "delete", "table": table, "old": old})
}

fn key(values: Json) -> Json {
    json!({"key": values})
}

fn full(values: Json) -> Json {
    json!({"full": values})
}

/// Asserts two event summaries are equal, showing the first difference.
fn assert_events(plugin: Plugin, got: &[Json], expected: &[Json]) {
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(
            g, e,
            "{plugin}: event {i} differs\n got: {g}\nwant: {e}\nall: {got:#?}"
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "{plugin}: event count; got {got:#?}"
    );
}

/// The relation of `schema.table` as the first change of it carries it.
fn relation_of<'a>(events: &'a [Event], table: &str) -> &'a walbridge::event::Relation {
    events
        .iter()
        .find_map(|e| match e {
            Event::Change(c) if c.relation.qualified_name() == table => Some(&*c.relation),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no change of {table}"))
}

/// The column descriptions match the catalog: names in attribute order (generated ones left
/// out), type OIDs, type modifiers, and key flags on `keys`.
fn check_relation(
    c: &TestDb,
    events: &[Event],
    table: &str,
    identity: ReplicaIdentity,
    keys: &[&str],
) {
    let rel = relation_of(events, table);
    assert_eq!(rel.replica_identity, identity, "{table}");
    let (schema, name) = table.split_once('.').expect("schema.table");
    let catalog = c
        .psql(&format!(
            "SELECT string_agg(attname || ':' || atttypid || ':' || atttypmod, ',' ORDER BY attnum) \
             FROM pg_attribute WHERE attrelid = format('%I.%I', '{schema}', '{name}')::regclass \
             AND attnum > 0 AND NOT attisdropped AND attgenerated = ''"
        ))
        .expect("catalog");
    let described: Vec<String> = rel
        .columns
        .iter()
        .map(|col| format!("{}:{}:{}", col.name, col.type_oid, col.type_modifier))
        .collect();
    assert_eq!(described.join(","), catalog, "{table}: columns");
    let flagged: Vec<&str> = rel
        .columns
        .iter()
        .filter(|col| col.is_key)
        .map(|col| col.name.as_str())
        .collect();
    assert_eq!(flagged, keys, "{table}: key flags");
}

// ---------------------------------------------------------------------------------------
// The type matrix.

const TYPES_SCHEMA: &str = r#"
    CREATE TYPE feeling AS ENUM ('sad', 'ok', 'happy');
    CREATE DOMAIN posint AS int CHECK (VALUE > 0);
    CREATE TYPE pair AS (a int, b text);
    CREATE TABLE types (
        id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, num numeric, f8 float8, f8b float8,
        txt text, by bytea, b bool, d date, ts timestamp, tstz timestamptz, iv interval,
        u uuid, j json, jb jsonb, arr int[], arr2 text[], m feeling, dom posint, comp pair,
        ip inet, cid cidr, mac macaddr, bt bit(4), vb varbit, tsv tsvector);
"#;

const TYPES_WORKLOAD: &[&str] = &[r#"
    INSERT INTO types VALUES
     (1, -32768, 2147483647, -9223372036854775808,
      12345678901234567890.12345678901234567890123, '-0', 0.1,
      E'unicode é ✓ 🐘, quotes '' ", backslash \\ and\nnewline\ttab', '\x00ff5c22'::bytea, true,
      '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15.5+02',
      '1 year 2 mons 3 days 04:05:06.789', 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11',
      '{"a": [1, 2.50, "x\"y"],  "b": null}', '{"b": null, "a": [1, 2.50, "x\"y"]}',
      '{1,NULL,3}', '{{a,NULL},{"b c","d\"e"}}', 'happy', 7, '(1,"x y")',
      '192.168.0.1/24', '10.0.0.0/8', '08:00:2B:01:02:03', B'1010', B'10110', 'a fat cat'),
     (2, 0, 0, 0, 'NaN', 'NaN', 1e300, '', '\x'::bytea, false, 'infinity', 'infinity',
      '-infinity', '-1 day -00:00:01', '00000000-0000-0000-0000-000000000000', '[]', '{}',
      '{}', '{}', 'sad', 1, '(,)', '::1', '::/0', '00:00:00:00:00:00', B'0000', B'', ''),
     (3, 1, 1, 1, 'Infinity', 'Infinity', 2.5e-5, 'x', NULL, NULL, '-infinity', '-infinity',
      'infinity', '0', NULL, 'null', 'null', '{{1,2},{3,NULL}}', NULL, NULL, NULL, NULL,
      NULL, NULL, NULL, NULL, NULL, NULL),
     (4, NULL, NULL, NULL, '-Infinity', '-Infinity', -1.5, NULL, NULL, NULL, NULL, NULL,
      NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
      NULL, NULL);
"#];

/// The four rows as PostgreSQL's output functions print them (checked with psql under
/// walbridge's session settings).
fn type_rows() -> Vec<Json> {
    let nulls = |id: &str, num: &str, f8: &str, f8b: &str| {
        let mut m = Map::new();
        for c in [
            "i2", "i4", "i8", "txt", "by", "b", "d", "ts", "tstz", "iv", "u", "j", "jb", "arr",
            "arr2", "m", "dom", "comp", "ip", "cid", "mac", "bt", "vb", "tsv",
        ] {
            m.insert(c.into(), Json::Null);
        }
        m.insert("id".into(), json!(id));
        m.insert("num".into(), json!(num));
        m.insert("f8".into(), json!(f8));
        m.insert("f8b".into(), json!(f8b));
        Json::Object(m)
    };
    let mut row3 = nulls("3", "Infinity", "Infinity", "2.5e-05");
    for (k, v) in [
        ("i2", "1"),
        ("i4", "1"),
        ("i8", "1"),
        ("txt", "x"),
        ("d", "-infinity"),
        ("ts", "-infinity"),
        ("tstz", "infinity"),
        ("iv", "00:00:00"),
        ("j", "null"),
        ("jb", "null"),
        ("arr", "{{1,2},{3,NULL}}"),
    ] {
        row3[k] = json!(v);
    }
    vec![
        json!({
            "id": "1", "i2": "-32768", "i4": "2147483647", "i8": "-9223372036854775808",
            "num": "12345678901234567890.12345678901234567890123", "f8": "-0", "f8b": "0.1",
            "txt": "unicode é ✓ 🐘, quotes ' \", backslash \\ and\nnewline\ttab",
            "by": "\\x00ff5c22", "b": "t", "d": "2024-02-29", "ts": "2024-02-29 13:14:15.123456",
            "tstz": "2024-02-29 11:14:15.5+00", "iv": "1 year 2 mons 3 days 04:05:06.789",
            "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "j": r#"{"a": [1, 2.50, "x\"y"],  "b": null}"#,
            "jb": r#"{"a": [1, 2.50, "x\"y"], "b": null}"#,
            "arr": "{1,NULL,3}", "arr2": r#"{{a,NULL},{"b c","d\"e"}}"#, "m": "happy",
            "dom": "7", "comp": "(1,\"x y\")", "ip": "192.168.0.1/24", "cid": "10.0.0.0/8",
            "mac": "08:00:2b:01:02:03", "bt": "1010", "vb": "10110", "tsv": "'a' 'cat' 'fat'",
        }),
        json!({
            "id": "2", "i2": "0", "i4": "0", "i8": "0", "num": "NaN", "f8": "NaN",
            "f8b": "1e+300", "txt": "", "by": "\\x", "b": "f", "d": "infinity",
            "ts": "infinity", "tstz": "-infinity", "iv": "-1 days -00:00:01",
            "u": "00000000-0000-0000-0000-000000000000", "j": "[]", "jb": "{}", "arr": "{}",
            "arr2": "{}", "m": "sad", "dom": "1", "comp": "(,)", "ip": "::1", "cid": "::/0",
            "mac": "00:00:00:00:00:00", "bt": "0000", "vb": "", "tsv": "",
        }),
        row3,
        nulls("4", "-Infinity", "-Infinity", "-1.5"),
    ]
}

/// NaN and ±Infinity of numeric and float columns: wal2json 2.5 (no
/// `numeric-data-types-as-string`, which arrived in 2.6) prints them as JSON `null`, so they
/// arrive as SQL NULL. A known limitation of that wal2json version, asserted as such.
fn wal2json_25_special_floats_as_null(rows: &mut [Json]) -> usize {
    let mut replaced = 0;
    for r in rows {
        for col in ["num", "f8"] {
            if matches!(r[col].as_str(), Some("NaN" | "Infinity" | "-Infinity")) {
                r[col] = Json::Null;
                replaced += 1;
            }
        }
    }
    replaced
}

async fn type_matrix(plugin: Plugin) {
    let c = prepared(TYPES_SCHEMA);
    run_workload(&c, TYPES_WORKLOAD);
    let events = decode(&c, plugin).await;
    let mut rows = type_rows();
    if plugin == Plugin::Wal2Json {
        assert_eq!(wal2json_25_special_floats_as_null(&mut rows), 6);
    }
    let mut expected = vec![begin()];
    expected.extend(rows.into_iter().map(|r| insert("public.types", r)));
    expected.push(commit());
    assert_events(plugin, &summary(&events), &expected);
    check_relation(
        &c,
        &events,
        "public.types",
        ReplicaIdentity::Default,
        &["id"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_matrix_decodes_to_text_output_pgoutput() {
    type_matrix(Plugin::PgOutput).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_matrix_decodes_to_text_output_wal2json() {
    if !wal2json_available() {
        return;
    }
    type_matrix(Plugin::Wal2Json).await;
}

// ---------------------------------------------------------------------------------------
// TOAST: a 100 kB value that does not compress, left unchanged by an update.

const TOAST_SCHEMA: &str = "
    CREATE TABLE toasty (id int PRIMARY KEY, note text, big text);
    CREATE TABLE toasty_full (id int, note text, big text);
    ALTER TABLE toasty_full REPLICA IDENTITY FULL;
";

/// 3,200 distinct MD5 digests: 102,400 bytes that pglz cannot shrink by the 25 % it needs,
/// so the value is stored uncompressed, out of line.
const BIG: &str =
    "(SELECT string_agg(md5(g::text), '' ORDER BY g) FROM generate_series(1, 3200) g)";

fn toast_workload() -> Vec<String> {
    vec![
        format!("INSERT INTO toasty VALUES (1, 'a', {BIG})"),
        "UPDATE toasty SET note = 'b' WHERE id = 1".into(),
        "UPDATE toasty SET big = 'small', note = 'c' WHERE id = 1".into(),
        format!("INSERT INTO toasty_full VALUES (1, 'a', {BIG})"),
        "UPDATE toasty_full SET note = 'b' WHERE id = 1".into(),
        "DELETE FROM toasty_full".into(),
    ]
}

async fn toast(plugin: Plugin) {
    let c = prepared(TOAST_SCHEMA);
    let workload = toast_workload();
    let sql: Vec<&str> = workload.iter().map(String::as_str).collect();
    c.psql(sql[0]).expect("insert the big value");
    // Stored as is (not compressed) and out of line.
    let stored = c.psql("SELECT pg_column_size(big) FROM toasty").unwrap();
    assert!(stored.parse::<u32>().unwrap() >= 102_400, "stored {stored}");
    let big = c.psql("SELECT big FROM toasty WHERE id = 1").unwrap();
    assert_eq!(big.len(), 102_400);
    run_workload(&c, &sql[1..]);
    let events = decode(&c, plugin).await;

    let unchanged = json!({"toast": "unchanged"});
    let t = "public.toasty";
    let f = "public.toasty_full";
    let expected = vec![
        begin(),
        insert(t, json!({"id": "1", "note": "a", "big": big})),
        commit(),
        begin(),
        update(t, json!({"id": "1", "note": "b", "big": unchanged})),
        commit(),
        begin(),
        update(t, json!({"id": "1", "note": "c", "big": "small"})),
        commit(),
        begin(),
        insert(f, json!({"id": "1", "note": "a", "big": big})),
        commit(),
        begin(),
        // REPLICA IDENTITY FULL: the old row comes whole (the server detoasts it); the new
        // row still leaves the unchanged value out.
        update_old(
            f,
            json!({"id": "1", "note": "b", "big": unchanged}),
            full(json!({"id": "1", "note": "a", "big": big})),
        ),
        commit(),
        begin(),
        delete(f, full(json!({"id": "1", "note": "b", "big": big}))),
        commit(),
    ];
    assert_events(plugin, &summary(&events), &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_update_leaves_the_value_out_pgoutput() {
    toast(Plugin::PgOutput).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_update_leaves_the_value_out_wal2json() {
    if !wal2json_available() {
        return;
    }
    toast(Plugin::Wal2Json).await;
}

// ---------------------------------------------------------------------------------------
// Replica identities and keys.

const IDENTITY_SCHEMA: &str = "
    CREATE TABLE rid_default (id int PRIMARY KEY, v text);
    CREATE TABLE rid_full (id int, v text);
    ALTER TABLE rid_full REPLICA IDENTITY FULL;
    CREATE TABLE rid_index (a int NOT NULL, b int NOT NULL, v text);
    CREATE UNIQUE INDEX rid_index_ab ON rid_index (a, b);
    ALTER TABLE rid_index REPLICA IDENTITY USING INDEX rid_index_ab;
    CREATE TABLE composite (k1 text, k2 int, v text, PRIMARY KEY (k1, k2));
";

const IDENTITY_WORKLOAD: &[&str] = &[
    "INSERT INTO rid_default VALUES (1, 'a'); UPDATE rid_default SET v = 'b' WHERE id = 1; \
     UPDATE rid_default SET id = 2 WHERE id = 1; DELETE FROM rid_default WHERE id = 2;",
    "INSERT INTO rid_full VALUES (1, 'a'), (2, NULL); UPDATE rid_full SET v = 'b' WHERE id = 1; \
     DELETE FROM rid_full WHERE id = 2;",
    "INSERT INTO rid_index VALUES (1, 1, 'a'); UPDATE rid_index SET v = 'b'; \
     UPDATE rid_index SET b = 2; DELETE FROM rid_index;",
    "INSERT INTO composite VALUES ('x', 1, 'a'); UPDATE composite SET k2 = 2; \
     DELETE FROM composite;",
];

fn identity_expected() -> Vec<Json> {
    let d = "public.rid_default";
    let f = "public.rid_full";
    let i = "public.rid_index";
    let c = "public.composite";
    vec![
        begin(),
        insert(d, json!({"id": "1", "v": "a"})),
        // The key did not change: no old key, the new row identifies the row.
        update(d, json!({"id": "1", "v": "b"})),
        update_old(d, json!({"id": "2", "v": "b"}), key(json!({"id": "1"}))),
        delete(d, key(json!({"id": "2"}))),
        commit(),
        begin(),
        insert(f, json!({"id": "1", "v": "a"})),
        insert(f, json!({"id": "2", "v": null})),
        update_old(
            f,
            json!({"id": "1", "v": "b"}),
            full(json!({"id": "1", "v": "a"})),
        ),
        delete(f, full(json!({"id": "2", "v": null}))),
        commit(),
        begin(),
        insert(i, json!({"a": "1", "b": "1", "v": "a"})),
        update(i, json!({"a": "1", "b": "1", "v": "b"})),
        update_old(
            i,
            json!({"a": "1", "b": "2", "v": "b"}),
            key(json!({"a": "1", "b": "1"})),
        ),
        delete(i, key(json!({"a": "1", "b": "2"}))),
        commit(),
        begin(),
        insert(c, json!({"k1": "x", "k2": "1", "v": "a"})),
        update_old(
            c,
            json!({"k1": "x", "k2": "2", "v": "a"}),
            key(json!({"k1": "x", "k2": "1"})),
        ),
        delete(c, key(json!({"k1": "x", "k2": "2"}))),
        commit(),
    ]
}

async fn identities(plugin: Plugin) {
    let c = prepared(IDENTITY_SCHEMA);
    run_workload(&c, IDENTITY_WORKLOAD);
    let events = decode(&c, plugin).await;
    assert_events(plugin, &summary(&events), &identity_expected());
    check_relation(
        &c,
        &events,
        "public.rid_default",
        ReplicaIdentity::Default,
        &["id"],
    );
    // Under FULL every column is part of the identity.
    check_relation(
        &c,
        &events,
        "public.rid_full",
        ReplicaIdentity::Full,
        &["id", "v"],
    );
    check_relation(
        &c,
        &events,
        "public.rid_index",
        ReplicaIdentity::Index,
        &["a", "b"],
    );
    check_relation(
        &c,
        &events,
        "public.composite",
        ReplicaIdentity::Default,
        &["k1", "k2"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identities_and_composite_keys_pgoutput() {
    identities(Plugin::PgOutput).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identities_and_composite_keys_wal2json() {
    if !wal2json_available() {
        return;
    }
    identities(Plugin::Wal2Json).await;
}

// ---------------------------------------------------------------------------------------
// Generated and identity columns, partitions, quoted identifiers, TRUNCATE, messages and
// replication origins.

const MISC_SCHEMA: &str = r#"
    CREATE TABLE gen (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a int,
                      doubled int GENERATED ALWAYS AS (a * 2) STORED);
    CREATE TABLE parted (id int, region text, v text, PRIMARY KEY (id, region))
        PARTITION BY LIST (region);
    CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
    CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');
    CREATE SCHEMA "Mixed Case";
    CREATE TABLE "Mixed Case"."Table With Space" ("select" int PRIMARY KEY, "Mixed Col" text,
                                                  "quo""te" text);
    CREATE TABLE public."order" (id int PRIMARY KEY);
    CREATE TABLE trunc_a (id serial PRIMARY KEY);
    CREATE TABLE trunc_b (id int PRIMARY KEY);
    SELECT pg_replication_origin_create('test_origin');
"#;

const MISC_WORKLOAD: &[&str] = &[
    "INSERT INTO gen (a) VALUES (21); UPDATE gen SET a = 5;",
    "INSERT INTO parted VALUES (1, 'eu', 'x'), (2, 'us', 'y'); \
     UPDATE parted SET v = 'z' WHERE id = 1; UPDATE parted SET region = 'us' WHERE id = 1;",
    r#"INSERT INTO "Mixed Case"."Table With Space" VALUES (1, 'm', 'q');
       UPDATE "Mixed Case"."Table With Space" SET "Mixed Col" = 'n';
       INSERT INTO "order" VALUES (7); DELETE FROM "order";"#,
    "INSERT INTO trunc_a DEFAULT VALUES; INSERT INTO trunc_b VALUES (1);",
    "TRUNCATE trunc_a, trunc_b RESTART IDENTITY CASCADE;",
    "SELECT pg_logical_emit_message(true, 'app', 'hello ✓'); INSERT INTO \"order\" VALUES (8);",
    "SELECT pg_logical_emit_message(false, 'app', 'outside');",
    "BEGIN; SELECT pg_replication_origin_session_setup('test_origin'); \
     SELECT pg_replication_origin_xact_setup('0/ABCDEF', now()); \
     INSERT INTO \"order\" VALUES (9); COMMIT;",
];

fn misc_expected(plugin: Plugin, origin: &str) -> Vec<Json> {
    let o = "public.order";
    let m = "Mixed Case.Table With Space";
    vec![
        begin(),
        // The stored generated column is not published; the identity column is.
        insert("public.gen", json!({"id": "1", "a": "21"})),
        update("public.gen", json!({"id": "1", "a": "5"})),
        commit(),
        begin(),
        // Partitions are published as themselves (publish_via_partition_root is off).
        insert(
            "public.parted_eu",
            json!({"id": "1", "region": "eu", "v": "x"}),
        ),
        insert(
            "public.parted_us",
            json!({"id": "2", "region": "us", "v": "y"}),
        ),
        update(
            "public.parted_eu",
            json!({"id": "1", "region": "eu", "v": "z"}),
        ),
        // Moving a row to another partition is a delete and an insert.
        delete("public.parted_eu", key(json!({"id": "1", "region": "eu"}))),
        insert(
            "public.parted_us",
            json!({"id": "1", "region": "us", "v": "z"}),
        ),
        commit(),
        begin(),
        insert(m, json!({"select": "1", "Mixed Col": "m", "quo\"te": "q"})),
        update(m, json!({"select": "1", "Mixed Col": "n", "quo\"te": "q"})),
        insert(o, json!({"id": "7"})),
        delete(o, key(json!({"id": "7"}))),
        commit(),
        begin(),
        insert("public.trunc_a", json!({"id": "1"})),
        insert("public.trunc_b", json!({"id": "1"})),
        commit(),
        begin(),
        json!({
            "op": "truncate",
            "tables": ["public.trunc_a", "public.trunc_b"],
            // wal2json prints one document per table and has no CASCADE / RESTART
            // IDENTITY flags to give.
            "cascade": plugin == Plugin::PgOutput,
            "restart_identity": plugin == Plugin::PgOutput,
        }),
        commit(),
        begin(),
        json!({"op": "message", "transactional": true, "prefix": "app", "content": "hello ✓"}),
        insert(o, json!({"id": "8"})),
        commit(),
        json!({"op": "message", "transactional": false, "prefix": "app", "content": "outside"}),
        json!({"op": "begin", "origin": origin}),
        insert(o, json!({"id": "9"})),
        commit(),
    ]
}

async fn misc(plugin: Plugin) {
    let c = prepared(MISC_SCHEMA);
    run_workload(&c, MISC_WORKLOAD);
    let events = decode(&c, plugin).await;
    assert_events(
        plugin,
        &summary(&events),
        &misc_expected(plugin, &origin_name(&c)),
    );
    check_relation(&c, &events, "public.gen", ReplicaIdentity::Default, &["id"]);
    check_relation(
        &c,
        &events,
        "Mixed Case.Table With Space",
        ReplicaIdentity::Default,
        &["select"],
    );
    // pgoutput carries the origin's commit LSN as the applying session recorded it;
    // wal2json prints only the origin's id.
    let origin = events
        .iter()
        .find_map(|e| match e {
            Event::Begin(b) => b.origin.as_ref(),
            _ => None,
        })
        .expect("an origin");
    let expected_lsn = match plugin {
        Plugin::PgOutput => "0/ABCDEF".parse().unwrap(),
        Plugin::Wal2Json => Lsn::ZERO,
    };
    assert_eq!(origin.lsn, expected_lsn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_partitions_quoting_truncate_messages_origin_pgoutput() {
    misc(Plugin::PgOutput).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_partitions_quoting_truncate_messages_origin_wal2json() {
    if !wal2json_available() {
        return;
    }
    misc(Plugin::Wal2Json).await;
}

/// A message whose content is not UTF-8: pgoutput carries its bytes exactly; wal2json 2.5
/// copies them unescaped into its JSON text, so the decoder can only replace what is not
/// UTF-8 (U+FFFD). A known wal2json limitation, asserted as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_message_content() {
    let c = prepared("SELECT 1");
    run_workload(
        &c,
        &["SELECT pg_logical_emit_message(false, 'bin', '\\xfe41'::bytea)"],
    );
    let content = |events: &[Event]| match events {
        [Event::Message(m)] => m.content.to_vec(),
        other => panic!("{other:#?}"),
    };
    assert_eq!(content(&decode(&c, Plugin::PgOutput).await), b"\xfe\x41");
    if !wal2json_available() {
        return;
    }
    assert_eq!(
        content(&decode(&c, Plugin::Wal2Json).await),
        "\u{fffd}A".as_bytes()
    );
}

// ---------------------------------------------------------------------------------------
// Parity.

/// Makes a pgoutput event stream comparable with wal2json's for the same workload. Each
/// normalisation is a documented difference between the plugins, checked before it is
/// erased, and counted so the caller can assert how many were needed.
#[derive(Debug, Default, PartialEq)]
struct Normalised {
    /// NaN / ±Infinity float and numeric values that wal2json 2.5 prints as null.
    special_floats: usize,
    /// Origin commit LSNs, which wal2json does not print.
    origin_lsns: usize,
    /// TRUNCATE flags, which wal2json does not print.
    truncate_flags: usize,
    /// Non-UTF-8 message contents, which wal2json cannot carry.
    binary_messages: usize,
}

fn normalise(pg: &mut [Event], w2j: &[Event]) -> Normalised {
    let mut n = Normalised::default();
    assert_eq!(pg.len(), w2j.len(), "event counts differ");
    for (p, w) in pg.iter_mut().zip(w2j) {
        match (p, w) {
            (Event::Change(p), Event::Change(w)) => {
                let pairs = [
                    (p.new.as_mut(), w.new.as_ref()),
                    (
                        p.old.as_mut().map(|o| &mut o.tuple),
                        w.old.as_ref().map(|o| &o.tuple),
                    ),
                ];
                for (pt, wt) in pairs {
                    let (Some(pt), Some(wt)) = (pt, wt) else {
                        continue;
                    };
                    for (i, (pv, wv)) in pt.0.iter_mut().zip(&wt.0).enumerate() {
                        let float_type = matches!(
                            p.relation.columns[i].type_oid,
                            700 | 701 | 1700 // float4, float8, numeric
                        );
                        if float_type
                            && *wv == Value::Null
                            && matches!(pv.as_text(), Some("NaN" | "Infinity" | "-Infinity"))
                        {
                            *pv = Value::Null;
                            n.special_floats += 1;
                        }
                    }
                }
            }
            (Event::Begin(p), Event::Begin(w)) => {
                if let (Some(p), Some(w)) = (p.origin.as_mut(), w.origin.as_ref()) {
                    assert_eq!(w.lsn, Lsn::ZERO);
                    if !p.lsn.is_zero() {
                        p.lsn = Lsn::ZERO;
                        n.origin_lsns += 1;
                    }
                }
            }
            (Event::Truncate(p), Event::Truncate(w)) => {
                assert!(!w.cascade && !w.restart_identity);
                if p.cascade || p.restart_identity {
                    p.cascade = false;
                    p.restart_identity = false;
                    n.truncate_flags += 1;
                }
            }
            (Event::Message(p), Event::Message(w)) if std::str::from_utf8(&p.content).is_err() => {
                assert_eq!(
                    w.content,
                    String::from_utf8_lossy(&p.content).as_bytes(),
                    "wal2json's lossy copy of a binary message"
                );
                p.content = w.content.clone();
                n.binary_messages += 1;
            }
            _ => {}
        }
    }
    n
}

/// Every scenario's workload on one node, through both plugins: the same events, down to
/// xids, LSNs, commit times, relation OIDs, column types and key flags, once the documented
/// differences are normalised. Relation and Type events are left out of the comparison:
/// pgoutput sends a Relation once per table per session (and Type messages for
/// non-built-in types), the wal2json decoder synthesises one per table from the catalog;
/// what matters, the relation each change carries, is compared in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_and_wal2json_yield_the_same_events() {
    if !wal2json_available() {
        return;
    }
    let schema = [TYPES_SCHEMA, TOAST_SCHEMA, IDENTITY_SCHEMA, MISC_SCHEMA].join("\n");
    let c = prepared(&schema);
    let toast = toast_workload();
    let mut workload: Vec<&str> = Vec::new();
    workload.extend(TYPES_WORKLOAD);
    workload.extend(toast.iter().map(String::as_str));
    workload.extend(IDENTITY_WORKLOAD);
    workload.extend(MISC_WORKLOAD);
    workload.push("SELECT pg_logical_emit_message(true, 'bin', '\\xfe41'::bytea)");
    run_workload(&c, &workload);

    let strip = |events: Vec<Event>| -> Vec<Event> {
        events
            .into_iter()
            .filter(|e| !matches!(e, Event::Relation(_) | Event::Type(_)))
            .collect()
    };
    let mut pg = strip(decode(&c, Plugin::PgOutput).await);
    let w2j = strip(decode(&c, Plugin::Wal2Json).await);
    let n = normalise(&mut pg, &w2j);
    assert_eq!(
        n,
        Normalised {
            special_floats: 6,
            origin_lsns: 1,
            truncate_flags: 1,
            binary_messages: 1,
        }
    );
    for (i, (p, w)) in pg.iter().zip(&w2j).enumerate() {
        assert_eq!(p, w, "event {i} differs");
    }
    assert!(pg.len() > 60, "{} events", pg.len());
}
