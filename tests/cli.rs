//! The `walbridge` binary's command line, run for real on temporary configuration files: exit
//! codes, where output goes, and that passwords never show. No database is needed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TWO_NODES: &str = r#"
[[nodes]]
name = "east"
dsn  = "host=10.0.0.1 port=5432 dbname=app user=replicator password=TopSecretInline1"

[[nodes]]
name = "west"
dsn  = "postgres://replicator:TopSecretUri2@10.0.0.2:5432/app?sslmode=require"

[replication]
tables = ["public.*"]
priority = ["east", "west"]
"#;

/// A temporary directory holding configuration files.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Files {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }
}

/// Runs the binary with `args` in `cwd`, with a clean environment for the variables it reads.
fn walbridge(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walbridge"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("WALBRIDGE_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run walbridge")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_no_panic(o: &Output) {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "panic: {err}");
}

/// The single `error: ...` line a failure prints.
fn error_line(o: &Output) -> String {
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "exactly one error line: {err}");
    lines[0].to_string()
}

#[test]
fn check_config_valid_prints_nodes_and_directions() {
    let files = Files::new();
    let path = files.write("walbridge.toml", TWO_NODES);
    let out = walbridge(
        files.dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = stdout(&out);
    for needle in [
        "east",
        "west",
        "walbridge_east_to_west",
        "walbridge_west_to_east",
        "walbridge_from_east",
        "walbridge_from_west",
        "walbridge_pub",
        "public.*",
        "last_write_wins",
        "127.0.0.1:9187",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle}:\n{plan}");
    }
}

#[test]
fn config_flag_before_or_after_subcommand_and_from_env() {
    let files = Files::new();
    let path = files.write("other.toml", TWO_NODES);
    let p = path.to_str().unwrap();
    for args in [
        vec!["--config", p, "check-config"],
        vec!["check-config", "--config", p],
        vec!["--log-format", "json", "check-config", "--config", p],
        vec!["check-config", "--config", p, "--log-format", "json"],
    ] {
        let out = walbridge(files.dir.path(), &args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).contains("walbridge_east_to_west"));
    }
    let out = walbridge(
        files.dir.path(),
        &["check-config"],
        &[("WALBRIDGE_CONFIG", p)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn default_config_file_is_walbridge_toml() {
    let files = Files::new();
    let out = walbridge(files.dir.path(), &["check-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let line = error_line(&out);
    assert!(line.contains("walbridge.toml"), "{line}");
    files.write("walbridge.toml", TWO_NODES);
    let out = walbridge(files.dir.path(), &["check-config"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn invalid_value_exits_2_naming_the_key() {
    let files = Files::new();
    let path = files.write(
        "walbridge.toml",
        &format!("{TWO_NODES}conflict = \"lww\"\n"),
    );
    for cmd in [
        "check-config",
        "run",
        "setup",
        "status",
        "verify",
        "teardown",
    ] {
        let out = walbridge(
            files.dir.path(),
            &[cmd, "--config", path.to_str().unwrap()],
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert_no_panic(&out);
        let line = error_line(&out);
        assert!(line.contains("replication.conflict"), "{cmd}: {line}");
        assert!(
            line.contains("last_write_wins, node_priority, error"),
            "{line}"
        );
        assert!(
            stdout(&out).is_empty(),
            "nothing on stdout: {}",
            stdout(&out)
        );
    }
}

#[test]
fn unknown_key_exits_2_naming_the_key_and_line() {
    let files = Files::new();
    let path = files.write(
        "walbridge.toml",
        &format!("{TWO_NODES}conflcit = \"error\"\n"),
    );
    let out = walbridge(
        files.dir.path(),
        &["check-config", "--config", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_no_panic(&out);
    let line = error_line(&out);
    assert!(line.contains("replication.conflcit"), "{line}");
    assert!(line.contains("line 13"), "{line}");
}

#[test]
fn one_node_is_a_config_error_except_for_tail() {
    let files = Files::new();
    let path = files.write(
        "one.toml",
        "[[nodes]]\nname = \"solo\"\ndsn = \"host=10.0.0.1 dbname=app user=replicator\"\n",
    );
    let p = path.to_str().unwrap();
    for cmd in ["check-config", "run", "setup"] {
        let out = walbridge(files.dir.path(), &[cmd, "--config", p], &[]);
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        assert_no_panic(&out);
        let line = error_line(&out);
        assert!(line.contains("nodes"), "{line}");
        assert!(line.contains("at least two"), "{line}");
    }
    // tail accepts the one-node file; a node it does not have is a usage error.
    let out = walbridge(
        files.dir.path(),
        &["tail", "--node", "other", "--config", p],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let line = error_line(&out);
    assert!(line.contains("other") && line.contains("solo"), "{line}");
}

#[test]
fn passwords_never_appear_in_output() {
    let files = Files::new();
    std::fs::write(files.dir.path().join("pw"), "TopSecretFile3\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let private = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(files.dir.path().join("pw"), private).unwrap();
    }
    let text = format!(
        "{}\n[[nodes]]\nname = \"north\"\ndsn = \"host=10.0.0.3 dbname=app user=r password=${{NORTH_PW}}\"\n\
         [[nodes]]\nname = \"south\"\ndsn = \"host=10.0.0.4 dbname=app user=r\"\npassword_file = \"pw\"\n",
        TWO_NODES.replace("[replication]\ntables = [\"public.*\"]\npriority = [\"east\", \"west\"]", "")
    );
    let good = files.write("good.toml", &text);
    let bad = files.write(
        "bad.toml",
        &format!("{text}\n[metrics]\nlisten = \"nowhere\"\n"),
    );
    let secrets = [
        "TopSecretInline1",
        "TopSecretUri2",
        "TopSecretFile3",
        "TopSecretEnv4",
    ];
    // Only commands that touch no database: tail with an unknown node stops at a usage error.
    for (path, valid) in [(&good, true), (&bad, false)] {
        for (args, code_if_valid) in [
            (vec!["check-config"], 0),
            (vec!["--log-format", "json", "check-config"], 0),
            (vec!["tail", "--node", "nosuch"], 2),
        ] {
            let mut args = args.clone();
            args.extend(["--config", path.to_str().unwrap()]);
            let out = walbridge(
                files.dir.path(),
                &args,
                &[("NORTH_PW", "TopSecretEnv4"), ("RUST_LOG", "trace")],
            );
            let expected = if valid { code_if_valid } else { 2 };
            assert_eq!(
                out.status.code(),
                Some(expected),
                "{args:?}: {}",
                stderr(&out)
            );
            let all = format!("{}{}", stdout(&out), stderr(&out));
            for s in secrets {
                assert!(!all.contains(s), "{args:?} printed {s}:\n{all}");
            }
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    let files = Files::new();
    for args in [
        vec!["frobnicate"],
        vec![],
        vec!["check-config", "--bogus"],
        vec!["tail"],
        vec!["--log-format", "xml", "check-config"],
    ] {
        let out = walbridge(files.dir.path(), &args, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_no_panic(&out);
    }
    let out = walbridge(files.dir.path(), &["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("check-config"));
}

#[test]
fn password_file_readable_by_others_is_refused_by_check_config() {
    use std::os::unix::fs::PermissionsExt;
    let files = Files::new();
    let pw = files.write("east.pw", "TopSecretFile5\n");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = "[[nodes]]\nname = \"east\"\ndsn = \"host=10.0.0.1 dbname=app user=r\"\n\
                password_file = \"east.pw\"\n\
                [[nodes]]\nname = \"west\"\ndsn = \"host=10.0.0.2 dbname=app user=r password=${WEST_PW}\"\n\
                [replication]\ntables = [\"public.*\"]\n";
    let path = files.write("walbridge.toml", text);
    let args = ["check-config", "--config", path.to_str().unwrap()];
    // A variable whose value looks like more options stays the password.
    let env = [("WEST_PW", "x sslmode=disable host=evil")];
    let out = walbridge(files.dir.path(), &args, &env);
    assert_no_panic(&out);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let line = error_line(&out);
    assert!(line.contains("nodes[0].password_file"), "{line}");
    assert!(line.contains("chmod 600"), "{line}");
    assert!(!stderr(&out).contains("TopSecretFile5"));
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = walbridge(files.dir.path(), &args, &env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown = stdout(&out);
    assert!(shown.contains("10.0.0.2"), "{shown}");
    assert!(!shown.contains("evil"), "{shown}");
}
