//! Unit tests of loading and validation. DSNs are parsed by the real [`Dsn::parse`].

use std::collections::HashMap;
use std::env::VarError;
use std::path::Path;

use super::*;

const CONTRACT_EXAMPLE: &str = r#"
[[nodes]]
name = "east"                      # [a-z][a-z0-9_]{0,30}; names slots and origins
dsn  = "host=10.0.0.1 port=5432 dbname=app user=replicator sslmode=verify-full sslrootcert=/etc/walbridge/ca.pem"

[[nodes]]
name = "west"
dsn  = "postgres://replicator@10.0.0.2:5432/app?sslmode=verify-full"

[replication]
mode      = "stream"           # stream | trigger | auto
plugin    = "pgoutput"         # pgoutput | wal2json
tables    = ["public.*"]       # schema.table patterns; `*` globs a name part
exclude   = []                 # patterns removed from `tables`
skip_columns = {}              # { "public.accounts" = ["balance"] } never sent to peers
conflict  = "last_write_wins"  # last_write_wins | node_priority | error
priority  = ["east", "west"]   # for node_priority (first wins), and to break exact timestamp ties
conflict_per_table = {}        # { "public.inventory" = "node_priority" } overrides `conflict` per table
max_retained_wal = "8GB"       # per slot
slot_prefix = "walbridge"

[trigger]                      # trigger mode (fallback and drop-in for the polling script)
table = "public.database_changes"
poll_interval = "5s"           # a safety net; LISTEN/NOTIFY wakes the worker at once
batch_size = 500

[metrics]
listen = "127.0.0.1:9187"      # /metrics (Prometheus text format), /healthz, /readyz
"#;

const TWO_NODES: &str = r#"
[[nodes]]
name = "east"
dsn = "host=10.0.0.1 dbname=app user=replicator"
[[nodes]]
name = "west"
dsn = "host=10.0.0.2 dbname=app user=replicator"
"#;

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Result<String, VarError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned().ok_or(VarError::NotPresent)
}

fn parse_with(text: &str, purpose: Purpose, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::parse(text, None, purpose, &env_of(vars))
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    parse_with(text, Purpose::Replication, &[])
}

/// The validation problems of `text`, which must be invalid.
fn problems(text: &str) -> Vec<ValidationError> {
    match parse(text) {
        Err(ConfigError::Invalid { errors, .. }) => errors,
        Err(other) => panic!("expected validation errors, got {other}"),
        Ok(_) => panic!("expected validation errors, got a valid config"),
    }
}

/// Asserts that `text` (two valid nodes plus `extra`) fails with a problem at `key` whose
/// message contains every one of `needles`.
fn assert_problem(extra: &str, key: &str, needles: &[&str]) {
    let errors = problems(&format!("{TWO_NODES}\n{extra}"));
    let found = errors.iter().find(|e| e.key == key).unwrap_or_else(|| {
        panic!("no problem at {key}; got: {errors:?}");
    });
    for n in needles {
        assert!(found.message.contains(n), "{key}: {found} lacks {n:?}");
    }
    let line = parse(&format!("{TWO_NODES}\n{extra}"))
        .unwrap_err()
        .to_string();
    assert!(line.contains(key), "{line}");
    assert!(!line.contains('\n'), "one line: {line}");
}

#[test]
fn contract_example_parses() {
    let c = parse(CONTRACT_EXAMPLE).unwrap();
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.nodes[0].name, "east");
    assert_eq!(c.nodes[1].name, "west");
    assert_eq!(c.nodes[0].dsn.dbname, "app");
    assert_eq!(c.nodes[1].dsn.user, "replicator");
    let r = &c.replication;
    assert_eq!(r.mode, Mode::Stream);
    assert_eq!(r.plugin, Plugin::PgOutput);
    assert_eq!(r.conflict, ConflictPolicy::LastWriteWins);
    assert_eq!(r.priority, ["east", "west"]);
    assert_eq!(r.max_retained_wal, 8 << 30);
    assert_eq!(r.slot_prefix, "walbridge");
    assert!(r.tables.matches("public", "accounts"));
    assert_eq!(
        c.trigger.table,
        QualifiedName::new("public", "database_changes")
    );
    assert_eq!(c.trigger.poll_interval, Duration::from_secs(5));
    assert_eq!(c.trigger.batch_size, 500);
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
}

#[test]
fn defaults_fill_omitted_sections() {
    let c = parse(TWO_NODES).unwrap();
    let r = &c.replication;
    assert_eq!(r.mode, Mode::Stream);
    assert_eq!(r.plugin, Plugin::PgOutput);
    assert_eq!(r.tables.include().len(), 1);
    assert_eq!(r.tables.include()[0].as_str(), "public.*");
    assert!(r.tables.exclude().is_empty());
    assert_eq!(r.conflict, ConflictPolicy::LastWriteWins);
    assert!(r.priority.is_empty());
    assert_eq!(r.max_retained_wal, 8 << 30);
    assert_eq!(r.slot_prefix, "walbridge");
    assert_eq!(r.conflict_retention, Duration::from_secs(30 * 86400));
    assert_eq!(r.tombstone_retention, Duration::from_secs(7 * 86400));
    assert_eq!(r.conflict_max_row_bytes, 64 << 10);
    assert!(!r.sequence_ranges);
    assert!(r.failover_slots);
    assert_eq!(c.trigger.table.to_string(), "public.database_changes");
    assert_eq!(
        c.trigger.dead_table().to_string(),
        "public.database_changes_dead"
    );
    assert_eq!(c.trigger.poll_interval, Duration::from_secs(5));
    assert_eq!(c.trigger.batch_size, 500);
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9187".parse().unwrap()));
    assert_eq!(c.path, None);
}

#[test]
fn additions_parse() {
    let c = parse(&format!(
        "{TWO_NODES}
[replication]
conflict_retention = \"90d\"
tombstone_retention = \"12h\"
sequence_ranges = true
max_retained_wal = 1048576
[trigger]
table = \"changes\"
poll_interval = \"250ms\"
batch_size = 20
[metrics]
listen = \"\"
"
    ))
    .unwrap();
    assert_eq!(
        c.replication.conflict_retention,
        Duration::from_secs(90 * 86400)
    );
    assert_eq!(
        c.replication.tombstone_retention,
        Duration::from_secs(12 * 3600)
    );
    assert!(c.replication.sequence_ranges);
    assert_eq!(c.replication.max_retained_wal, 1 << 20);
    assert_eq!(c.trigger.table, QualifiedName::new("public", "changes"));
    assert_eq!(c.trigger.poll_interval, Duration::from_millis(250));
    assert_eq!(c.trigger.batch_size, 20);
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn names_directions_and_ranks() {
    let c = parse(&format!(
        "{TWO_NODES}
[[nodes]]
name = \"north\"
dsn = \"host=10.0.0.3 dbname=app user=replicator\"
[replication]
slot_prefix = \"wb\"
priority = [\"west\"]
"
    ))
    .unwrap();
    let dirs: Vec<String> = c.directions().iter().map(ToString::to_string).collect();
    assert_eq!(
        dirs,
        [
            "east -> west",
            "east -> north",
            "west -> east",
            "west -> north",
            "north -> east",
            "north -> west"
        ]
    );
    assert_eq!(c.slot_name("east", "west"), "wb_east_to_west");
    assert_eq!(c.origin_name("east"), "wb_from_east");
    assert_eq!(c.publication_name(), "wb_pub");
    assert_eq!(c.skip_origin_name(), "wb_skip");
    assert_eq!(c.node_rank("west"), 0);
    assert_eq!(c.node_rank("east"), 1);
    assert_eq!(c.node_rank("north"), 2);
    assert_eq!(c.node_rank("nobody"), usize::MAX);
    assert_eq!(c.priority_order(), ["west", "east", "north"]);
    assert!(c.node("north").is_some());
    assert!(c.node("south").is_none());
}

#[test]
fn per_table_settings() {
    let c = parse(&format!(
        "{TWO_NODES}
[replication]
tables = [\"public.*\", \"Mixed Case.*\"]
skip_columns = {{ \"public.accounts\" = [\"balance\", \"Secret Col\"] }}
conflict_per_table = {{ \"public.inventory\" = \"node_priority\", \"Mixed Case.T.x\" = \"error\" }}
priority = [\"east\", \"west\"]
"
    ))
    .unwrap();
    assert_eq!(
        c.skip_columns_for("public", "accounts"),
        ["balance", "Secret Col"]
    );
    assert!(c.skip_columns_for("public", "other").is_empty());
    assert_eq!(
        c.conflict_policy_for("public", "inventory"),
        ConflictPolicy::NodePriority
    );
    assert_eq!(
        c.conflict_policy_for("Mixed Case", "T.x"),
        ConflictPolicy::Error
    );
    assert_eq!(
        c.conflict_policy_for("public", "other"),
        ConflictPolicy::LastWriteWins
    );
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
}

#[test]
fn unquoted_dotted_keys_read_as_table_names() {
    let c = parse(&format!(
        "{TWO_NODES}
[replication]
skip_columns = {{ public.accounts = [\"balance\"] }}
conflict_per_table = {{ public.inventory = \"error\" }}
"
    ))
    .unwrap();
    assert_eq!(c.skip_columns_for("public", "accounts"), ["balance"]);
    assert_eq!(
        c.conflict_policy_for("public", "inventory"),
        ConflictPolicy::Error
    );
}

#[test]
fn patterns_with_quotes_spaces_and_case() {
    let c = parse(&format!(
        r#"{TWO_NODES}
[replication]
tables = ["Mixed Case.*", "public.Joe's \"Quoted\" Table", "public.Orders"]
exclude = ["Mixed Case.tmp*"]
"#
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let t = &c.replication.tables;
    assert!(t.matches("Mixed Case", "Anything"));
    assert!(!t.matches("Mixed Case", "tmp_1"));
    assert!(!t.matches("mixed case", "Anything"));
    assert!(t.matches("public", r#"Joe's "Quoted" Table"#));
    assert!(t.matches("public", "Orders"));
    assert!(!t.matches("public", "orders"));
}

#[test]
fn own_objects_are_never_selected() {
    let c = parse(&format!(
        "{TWO_NODES}
[replication]
tables = [\"*.*\"]
[trigger]
table = \"app.changes\"
"
    ))
    .unwrap();
    let t = &c.replication.tables;
    assert!(!t.matches("walbridge", "conflicts"));
    assert!(!t.matches("app", "changes"));
    assert!(!t.matches("app", "changes_dead"));
    assert!(t.matches("app", "orders"));
}

#[test]
fn node_name_rules() {
    let errors = problems(
        r#"
[[nodes]]
name = "East"
dsn = "host=a dbname=d user=u"
[[nodes]]
name = "west"
dsn = "host=b dbname=d user=u"
[[nodes]]
name = "west"
dsn = "host=c dbname=d user=u"
[[nodes]]
name = "a234567890123456789012345678901x"
dsn = "host=d dbname=d user=u"
"#,
    );
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert!(keys.contains(&"nodes[0].name"), "{errors:?}");
    assert!(keys.contains(&"nodes[2].name"), "{errors:?}");
    assert!(keys.contains(&"nodes[3].name"), "{errors:?}");
    assert!(errors[0]
        .message
        .contains("\"East\" must match [a-z][a-z0-9_]{0,30}"));
    let dup = errors.iter().find(|e| e.key == "nodes[2].name").unwrap();
    assert!(dup.message.contains("nodes[1]"), "{dup}");
}

#[test]
fn node_counts() {
    let one = "[[nodes]]\nname = \"solo\"\ndsn = \"host=a dbname=d user=u\"\n";
    let errors = problems(one);
    assert_eq!(errors[0].key, "nodes");
    assert!(errors[0].message.contains("at least two"), "{}", errors[0]);
    let c = parse_with(one, Purpose::SingleNode, &[]).unwrap();
    assert!(c.directions().is_empty());
    assert_eq!(problems("")[0].key, "nodes");
    assert!(matches!(
        parse_with("", Purpose::SingleNode, &[]),
        Err(ConfigError::Invalid { .. })
    ));
}

#[test]
fn keyword_values_list_what_is_allowed() {
    assert_problem(
        "[replication]\nconflict = \"lww\"",
        "replication.conflict",
        &["\"lww\" is not one of last_write_wins, node_priority, error"],
    );
    assert_problem(
        "[replication]\nmode = \"logical\"",
        "replication.mode",
        &["stream, trigger, auto"],
    );
    assert_problem(
        "[replication]\nplugin = \"test_decoding\"",
        "replication.plugin",
        &["pgoutput, wal2json"],
    );
    assert_problem(
        "[replication]\nconflict_per_table = { \"public.x\" = \"newest\" }",
        "replication.conflict_per_table.\"public.x\"",
        &["\"newest\" is not one of"],
    );
    assert_problem(
        "[replication]\nconflict_per_table = { \"public.x\" = 3 }",
        "replication.conflict_per_table.\"public.x\"",
        &["must be a string"],
    );
}

#[test]
fn table_pattern_rules() {
    assert_problem(
        "[replication]\ntables = [\"public.*\", \"accounts\"]",
        "replication.tables[1]",
        &["no '.'", "public.accounts"],
    );
    assert_problem(
        "[replication]\nexclude = [\".x\"]",
        "replication.exclude[0]",
        &["empty schema"],
    );
    assert_problem(
        "[replication]\ntables = []",
        "replication.tables",
        &["nothing"],
    );
    assert_problem(
        "[replication]\nskip_columns = { accounts = [\"x\"] }",
        "replication.skip_columns.accounts",
        &["no '.'"],
    );
    assert_problem(
        "[replication]\nskip_columns = { \"public.a\" = \"x\" }",
        "replication.skip_columns.\"public.a\"",
        &["list of column names"],
    );
    assert_problem(
        "[replication]\nskip_columns = { \"public.a\" = [\"\"] }",
        "replication.skip_columns.\"public.a\"[0]",
        &["empty column name"],
    );
}

#[test]
fn priority_rules() {
    assert_problem(
        "[replication]\npriority = [\"east\", \"north\"]",
        "replication.priority[1]",
        &["\"north\" is not a node name", "east, west"],
    );
    assert_problem(
        "[replication]\npriority = [\"east\", \"east\"]",
        "replication.priority[1]",
        &["twice"],
    );
}

#[test]
fn size_and_duration_rules() {
    assert_problem(
        "[replication]\nmax_retained_wal = \"8 gigs\"",
        "replication.max_retained_wal",
        &["\"8 gigs\" is not a size", "GB"],
    );
    assert_problem(
        "[replication]\nmax_retained_wal = 0",
        "replication.max_retained_wal",
        &["positive"],
    );
    assert_problem(
        "[replication]\nconflict_retention = \"forever\"",
        "replication.conflict_retention",
        &["not a duration"],
    );
    assert_problem(
        "[replication]\ntombstone_retention = \"0s\"",
        "replication.tombstone_retention",
        &["longer than zero"],
    );
    assert_problem(
        "[trigger]\npoll_interval = \"5\"",
        "trigger.poll_interval",
        &["not a duration"],
    );
    assert_problem(
        "[trigger]\nbatch_size = 0",
        "trigger.batch_size",
        &["between 1 and"],
    );
}

#[test]
fn slot_prefix_rules() {
    assert_problem(
        "[replication]\nslot_prefix = \"Wal-Bridge\"",
        "replication.slot_prefix",
        &["[a-z][a-z0-9_]*"],
    );
    assert_problem(
        "[replication]\nslot_prefix = \"a_very_long_prefix_for_slots_that_is_much_much_too_long\"",
        "replication.slot_prefix",
        &[
            "63",
            "a_very_long_prefix_for_slots_that_is_much_much_too_long_east_to_west",
        ],
    );
    // 63 bytes exactly is fine: 49 + "_east_to_west" (13) = 62, + 1 letter = 63.
    let prefix = format!("p{}", "x".repeat(49));
    let c = parse(&format!(
        "{TWO_NODES}\n[replication]\nslot_prefix = \"{prefix}\""
    ))
    .unwrap();
    assert_eq!(c.slot_name("east", "west").len(), 63);
}

#[test]
fn trigger_and_metrics_rules() {
    assert_problem(
        "[trigger]\ntable = \"x.\"",
        "trigger.table",
        &["empty table"],
    );
    assert_problem(
        &format!("[trigger]\ntable = \"public.{}\"", "t".repeat(60)),
        "trigger.table",
        &["dead-letter"],
    );
    assert_problem(
        "[metrics]\nlisten = \"everywhere\"",
        "metrics.listen",
        &["\"everywhere\" is not an address", "127.0.0.1:9187"],
    );
    let c = parse(&format!(
        "{TWO_NODES}\n[metrics]\nlisten = \"localhost:9999\""
    ))
    .unwrap();
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9999".parse().unwrap()));
    let c = parse(&format!("{TWO_NODES}\n[metrics]\nlisten = \"[::]:9187\"")).unwrap();
    assert_eq!(c.metrics.listen, Some("[::]:9187".parse().unwrap()));
}

#[test]
fn every_problem_is_reported() {
    let errors = problems(&format!(
        "{TWO_NODES}
[replication]
mode = \"x\"
conflict = \"y\"
tables = [\"nodot\"]
[trigger]
batch_size = -1
[metrics]
listen = \"nope\"
"
    ));
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "replication.mode",
            "replication.tables[0]",
            "replication.conflict",
            "trigger.batch_size",
            "metrics.listen"
        ]
    );
}

#[test]
fn unknown_keys_are_parse_errors_with_path_and_line() {
    let text = format!("{TWO_NODES}\n[replication]\nconflcit = \"error\"\n");
    match parse(&text) {
        Err(ConfigError::Parse {
            line, key, message, ..
        }) => {
            assert_eq!(line, 10);
            assert_eq!(key.as_deref(), Some("replication.conflcit"));
            assert!(message.contains("conflcit"), "{message}");
            assert!(
                message.contains("conflict"),
                "lists allowed keys: {message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let text =
        "[[nodes]]\nname = \"a\"\ndsn = \"host=x\"\n[[nodes]]\nname = \"b\"\ndns = \"host=y\"\n";
    let err = parse(text).unwrap_err().to_string();
    assert!(err.contains("line 6"), "{err}");
    assert!(err.contains("nodes[1].dns"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn type_and_syntax_errors_have_line_and_column() {
    let err = parse(&format!("{TWO_NODES}\n[trigger]\nbatch_size = \"many\"\n")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("line 10"), "{text}");
    assert!(text.contains("trigger.batch_size"), "{text}");
    let err = parse("[[nodes]\nname = 1").unwrap_err();
    assert!(matches!(err, ConfigError::Parse { line: 1, .. }), "{err:?}");
    let err = parse("[[nodes]]\nname = \"a\"\n").unwrap_err().to_string();
    assert!(err.contains("dsn"), "missing field named: {err}");
}

#[test]
fn env_interpolation_in_dsn() {
    let text = r#"
[[nodes]]
name = "east"
dsn = "host=${EAST_HOST} dbname=app user=replicator password=${EAST_PW}"
[[nodes]]
name = "west"
dsn = "host=b dbname=app user=replicator password=$${literal}"
"#;
    let c = parse_with(
        text,
        Purpose::Replication,
        &[("EAST_HOST", "10.1.1.1"), ("EAST_PW", "hunter2")],
    )
    .unwrap();
    let east = c.node("east").unwrap();
    assert_eq!(east.dsn.hosts, [crate::dsn::Host::Tcp("10.1.1.1".into())]);
    assert_eq!(
        east.dsn.password.as_ref().map(|p| p.expose()),
        Some("hunter2")
    );
    let west = c.node("west").unwrap();
    assert_eq!(
        west.dsn.password.as_ref().map(|p| p.expose()),
        Some("${literal}")
    );
    assert!(
        !format!("{c:?}").contains("hunter2"),
        "Debug hides passwords"
    );

    let err = parse_with(text, Purpose::Replication, &[("EAST_HOST", "h")]).unwrap_err();
    let e = &err.problems()[0];
    assert_eq!(e.key, "nodes[0].dsn");
    assert!(e.message.contains("EAST_PW"), "{e}");
    assert!(e.message.contains("\"east\""), "{e}");
}

#[test]
fn password_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("east.pw"), "s3cret-from-file\n").unwrap();
    private(&dir.path().join("east.pw"));
    let text = r#"
[[nodes]]
name = "east"
dsn = "host=a dbname=app user=replicator"
password_file = "east.pw"
[[nodes]]
name = "west"
dsn = "host=b dbname=app user=replicator"
"#;
    let path = dir.path().join("walbridge.toml");
    std::fs::write(&path, text).unwrap();
    let c = Config::load(&path).unwrap();
    let east = c.node("east").unwrap();
    assert_eq!(
        east.dsn.password.as_ref().map(|p| p.expose()),
        Some("s3cret-from-file")
    );
    assert_eq!(
        east.password_file.as_deref(),
        Some(dir.path().join("east.pw").as_path())
    );
    assert_eq!(c.path.as_deref(), Some(path.as_path()));
    assert!(!format!("{c:?}").contains("s3cret"));
}

fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn password_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("east.pw");
    std::fs::write(&pw, "s3cret-from-file\n").unwrap();
    let text = format!(
        "[[nodes]]\nname = \"east\"\ndsn = \"host=a dbname=app user=r\"\npassword_file = \"{}\"\n\
         [[nodes]]\nname = \"west\"\ndsn = \"host=b dbname=app user=r\"\n",
        pw.display()
    );
    for mode in [0o644, 0o604, 0o660] {
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = parse(&text).unwrap_err();
        let p = &err.problems()[0];
        assert_eq!(p.key, "nodes[0].password_file");
        assert!(p.message.contains("chmod 600"), "{p}");
        assert!(p.message.contains("east.pw"), "{p}");
        assert!(!err.to_string().contains("s3cret"));
    }
    for mode in [0o600, 0o400] {
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
        let c = parse(&text).unwrap();
        assert_eq!(
            c.node("east")
                .unwrap()
                .dsn
                .password
                .as_ref()
                .map(|p| p.expose()),
            Some("s3cret-from-file")
        );
    }
}

#[test]
fn env_values_cannot_change_other_dsn_keys() {
    // Each value is interpolated after the connection string is split, so a variable's
    // spaces, quotes, `&` or `@` stay inside its own value.
    let text = r#"
[[nodes]]
name = "east"
dsn = "host=a dbname=app user=replicator password=${EAST_PW}"
[[nodes]]
name = "west"
dsn = "postgres://replicator:${WEST_PW}@b/app?application_name=${APP}"
"#;
    let east_pw = "x' sslmode=disable host=evil dbname='other";
    let west_pw = "p@ss/w:rd?sslmode=disable&host=evil";
    let app = "a&sslmode=disable";
    let c = parse_with(
        text,
        Purpose::Replication,
        &[("EAST_PW", east_pw), ("WEST_PW", west_pw), ("APP", app)],
    )
    .unwrap();
    let east = c.node("east").unwrap();
    assert_eq!(
        east.dsn.password.as_ref().map(|p| p.expose()),
        Some(east_pw)
    );
    assert_eq!(east.dsn.hosts, [crate::dsn::Host::Tcp("a".into())]);
    assert_eq!(east.dsn.dbname, "app");
    assert_eq!(east.dsn.sslmode, crate::dsn::SslMode::Prefer);
    let west = c.node("west").unwrap();
    assert_eq!(
        west.dsn.password.as_ref().map(|p| p.expose()),
        Some(west_pw)
    );
    assert_eq!(west.dsn.hosts, [crate::dsn::Host::Tcp("b".into())]);
    assert_eq!(west.dsn.dbname, "app");
    assert_eq!(west.dsn.application_name.as_deref(), Some(app));
    assert_eq!(west.dsn.sslmode, crate::dsn::SslMode::Prefer);
    // A dsn that is a single reference holds a whole connection string.
    let c = parse_with(
        "[[nodes]]\nname = \"east\"\ndsn = \"${EAST_URL}\"\n\
         [[nodes]]\nname = \"west\"\ndsn = \" ${WEST_DSN} \"\n",
        Purpose::Replication,
        &[
            ("EAST_URL", "postgres://r:pw@a:6000/app"),
            ("WEST_DSN", "host=b port=6001 dbname=app"),
        ],
    )
    .unwrap();
    assert_eq!(c.node("east").unwrap().dsn.ports, [6000]);
    assert_eq!(c.node("west").unwrap().dsn.ports, [6001]);
    // A value with a space in an unquoted key/value option is still one value.
    let c = parse_with(
        "[[nodes]]\nname = \"east\"\ndsn = \"host=${H} dbname=app\"\n\
         [[nodes]]\nname = \"west\"\ndsn = \"host=b\"\n",
        Purpose::Replication,
        &[("H", "a port=1")],
    )
    .unwrap();
    let east = c.node("east").unwrap();
    assert_eq!(east.dsn.hosts, [crate::dsn::Host::Tcp("a port=1".into())]);
    assert_eq!(east.dsn.ports, [5432]);
}

#[test]
fn password_file_problems_name_the_file_not_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pw");
    let text = format!(
        r#"
[[nodes]]
name = "east"
dsn = "host=a dbname=app user=replicator"
password_file = "{}"
[[nodes]]
name = "west"
dsn = "host=b dbname=app user=replicator password=inline"
password_file = "{}"
"#,
        missing.display(),
        dir.path().join("west.pw").display()
    );
    std::fs::write(dir.path().join("west.pw"), "file-secret").unwrap();
    let err = parse(&text).unwrap_err();
    let p = err.problems();
    assert_eq!(p[0].key, "nodes[0].password_file");
    assert!(p[0].message.contains("missing.pw"), "{}", p[0]);
    assert_eq!(p[1].key, "nodes[1].password_file");
    assert!(
        p[1].message.contains("already contains a password"),
        "{}",
        p[1]
    );
    let line = err.to_string();
    assert!(
        !line.contains("file-secret") && !line.contains("inline"),
        "{line}"
    );
}

#[test]
fn missing_file_says_how_to_point_at_one() {
    let err = Config::load(Path::new("/nonexistent/walbridge.toml")).unwrap_err();
    let line = err.to_string();
    assert!(line.contains("/nonexistent/walbridge.toml"), "{line}");
    assert!(line.contains("--config"), "{line}");
}

#[test]
fn warnings_for_suspicious_settings() {
    let c = parse(&format!(
        "{TWO_NODES}
[replication]
conflict = \"node_priority\"
skip_columns = {{ \"other.t\" = [\"c\"] }}
"
    ))
    .unwrap();
    let w = c.warnings();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("priority"));
    assert!(w[1].contains("other.t"));
}

#[test]
fn log_row_contents_is_off_unless_asked_for() {
    let two =
        "[[nodes]]\nname = \"a\"\ndsn = \"host=x\"\n[[nodes]]\nname = \"b\"\ndsn = \"host=y\"\n";
    let c = Config::from_toml_str(two).unwrap();
    assert!(!c.log.row_contents);
    let c = Config::from_toml_str(&format!("{two}[log]\nrow_contents = true\n")).unwrap();
    assert!(c.log.row_contents);
    assert!(Config::from_toml_str(&format!("{two}[log]\nrow_content = true\n")).is_err());
}

#[test]
fn conflict_max_row_bytes_is_a_bounded_size() {
    let c = parse(&format!(
        "{TWO_NODES}\n[replication]\nconflict_max_row_bytes = \"1MB\""
    ))
    .unwrap();
    assert_eq!(c.replication.conflict_max_row_bytes, 1 << 20);
    let c = parse(&format!(
        "{TWO_NODES}\n[replication]\nconflict_max_row_bytes = 4096"
    ))
    .unwrap();
    assert_eq!(c.replication.conflict_max_row_bytes, 4096);
    for bad in ["100", "\"512B\"", "\"3GB\"", "-1"] {
        assert_problem(
            &format!("[replication]\nconflict_max_row_bytes = {bad}"),
            "replication.conflict_max_row_bytes",
            &["between 1kB and 2GB"],
        );
    }
    assert_problem(
        "[replication]\nconflict_max_row_bytes = \"lots\"",
        "replication.conflict_max_row_bytes",
        &["not a size"],
    );
}

#[test]
fn on_schema_mismatch_defaults_to_stop_and_takes_park() {
    let c = parse(TWO_NODES).expect("valid");
    assert_eq!(c.replication.on_schema_mismatch, SchemaMismatch::Stop);
    let c = parse(&format!(
        "{TWO_NODES}\n[replication]\non_schema_mismatch = \"park\""
    ))
    .expect("valid");
    assert_eq!(c.replication.on_schema_mismatch, SchemaMismatch::Park);
    assert_problem(
        "[replication]\non_schema_mismatch = \"queue\"",
        "replication.on_schema_mismatch",
        &["queue", "stop", "park"],
    );
}
