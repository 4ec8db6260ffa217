//! Production operation: `/metrics` in Prometheus text format with counters that move by
//! exactly the rows changed, `/readyz` following a node outage, the WAL guardrail, and no
//! password in the logs whatever happens.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

// ---- a small HTTP client and Prometheus text parser -------------------------------------

/// `GET path` on `addr`: status code and body; `None` when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).expect("HTTP answers are UTF-8");
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "unexpected chunked answer: {head}"
    );
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Metric family name -> TYPE.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of the one sample of `name` whose labels include `labels`; panics when
    /// several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().map(|s| s.value)
    }

    /// Sum over the samples of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

/// Parses the Prometheus text format (0.0.4) strictly: every line a comment, a sample or
/// empty; label values with escapes; every sample's family declared by `# TYPE` before it.
pub fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let err = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().ok_or_else(|| err("TYPE without a name"))?;
                    let kind = parts.next().ok_or_else(|| err("TYPE without a type"))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err("unknown type"));
                    }
                    if out.types.insert(name.into(), kind.into()).is_some() {
                        return Err(err("TYPE declared twice"));
                    }
                }
                Some("HELP") => {
                    parts.next().ok_or_else(|| err("HELP without a name"))?;
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(err("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(body).map_err(&err)?;
            labels = parsed;
            rest = after;
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next().ok_or_else(|| err("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| err("bad value"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp"))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| out.types.get(*base).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        if !out.types.contains_key(family) {
            return Err(err("sample before its # TYPE"));
        }
        out.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// Parses `name="value",...}` (after the `{`): the labels and the text after the `}`.
fn parse_labels(body: &str) -> Result<(BTreeMap<String, String>, &str), &'static str> {
    let mut labels = BTreeMap::new();
    let mut chars = body.char_indices().peekable();
    loop {
        let start = match chars.peek() {
            Some((p, '}')) => return Ok((labels, &body[p + 1..])),
            Some((p, _)) => *p,
            None => return Err("unterminated labels"),
        };
        let eq = chars
            .by_ref()
            .find(|(_, c)| *c == '=')
            .map(|(p, _)| p)
            .ok_or("label without =")?;
        let name = &body[start..eq];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("bad label name");
        }
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err("label value not quoted");
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    _ => return Err("bad escape"),
                },
                Some((_, '"')) => break,
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value"),
            }
        }
        if labels.insert(name.to_string(), value).is_some() {
            return Err("label repeated");
        }
        match chars.next() {
            Some((_, ',')) => {}
            Some((p, '}')) => return Ok((labels, &body[p + 1..])),
            _ => return Err("expected , or }"),
        }
    }
}

/// Scrapes `/metrics` and parses it, failing the test on a malformed exposition.
pub fn scrape(addr: SocketAddr) -> Exposition {
    let (code, body) = http_get(addr, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "{body}");
    parse_prometheus(&body).unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}"))
}

/// Polls `/readyz` until it answers `code`; returns the last body.
pub fn wait_readyz(addr: SocketAddr, code: u16, run: &mut Runner) -> String {
    let mut last = None;
    let ok = wait_until(WAIT, || {
        last = http_get(addr, "/readyz");
        last.as_ref().is_some_and(|(c, _)| *c == code)
    });
    if !ok {
        run.assert_running();
        panic!("/readyz never answered {code}; last: {last:?}");
    }
    last.map(|(_, b)| b).unwrap_or_default()
}

/// Polls `/metrics` until `pred` holds; returns that exposition.
pub fn wait_metrics(
    addr: SocketAddr,
    what: &str,
    pred: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let mut last = Exposition::default();
    let ok = wait_until(WAIT, || {
        last = scrape(addr);
        pred(&last)
    });
    assert!(
        ok,
        "metrics never showed {what}; last samples: {:#?}",
        last.samples
    );
    last
}

// ---- walbridge's exposition, without a server ----------------------------------------------

/// What walbridge's registry encodes is strict Prometheus text, label values with quotes,
/// backslashes and newlines (a table may be named so) escaped and read back unchanged: the
/// scrapes below parse it with the same strict parser.
#[test]
fn walbridge_exposition_is_strict_prometheus_text() {
    let m = walbridge::metrics::Metrics::new();
    m.register_topology(["east", "west"], [("east", "west"), ("west", "east")]);
    let table = "public.\"we\\ird\nname\"";
    m.changes_applied
        .with_label_values(&["east", "west", table, "insert"])
        .inc_by(3);
    m.apply_duration
        .with_label_values(&["east", "west"])
        .observe(0.25);
    let text = m.encode();
    let e = parse_prometheus(&text).unwrap_or_else(|why| panic!("{why}\n{text}"));
    assert_eq!(e.types.get(CHANGES).map(String::as_str), Some("counter"));
    assert_eq!(e.value(CHANGES, &[("table", table)]), Some(3.0));
    assert_eq!(e.value(TXNS, &dir("west", "east")), Some(0.0));
    assert_eq!(
        e.value(
            "walbridge_apply_duration_seconds_count",
            &dir("east", "west")
        ),
        Some(1.0)
    );
}

// ---- metrics during replication -----------------------------------------------------------

const SCHEMA: &str = "
    CREATE TABLE public.items (id int PRIMARY KEY, v text);
    CREATE TABLE public.notes (k text PRIMARY KEY, body text);
";

const CHANGES: &str = "walbridge_changes_applied_total";
const TXNS: &str = "walbridge_transactions_applied_total";

fn dir<'a>(s: &'a str, t: &'a str) -> [(&'a str, &'a str); 2] {
    [("source", s), ("target", t)]
}

#[test]
fn metrics_count_exactly_the_rows_changed() {
    let mut d = Deployment::new(&["east", "west"], SCHEMA, "plugin = \"pgoutput\"");
    let addr = SocketAddr::from(([127, 0, 0, 1], d.enable_metrics()));
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");

    // Counters whose labels are known at start are there at 0 from the first scrape on.
    let ok = wait_until(WAIT, || {
        http_get(addr, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    assert!(ok, "/healthz never answered");
    let first = scrape(addr);
    for (s, t) in [("east", "west"), ("west", "east")] {
        assert_eq!(first.value(TXNS, &dir(s, t)), Some(0.0), "{s}->{t}");
        assert_eq!(
            first.value("walbridge_reconnects_total", &dir(s, t)),
            Some(0.0)
        );
        for kind in ["transient", "definite"] {
            let mut l = dir(s, t).to_vec();
            l.push(("kind", kind));
            assert_eq!(first.value("walbridge_errors_total", &l), Some(0.0));
        }
        assert!(first
            .value("walbridge_replication_lag_seconds", &dir(s, t))
            .is_some());
        assert!(first
            .value("walbridge_replication_lag_bytes", &dir(s, t))
            .is_some());
        assert!(first.value("walbridge_direction_up", &dir(s, t)).is_some());
    }
    // The standard process metrics of the walbridge process itself.
    assert!(first.value("process_cpu_seconds_total", &[]).is_some());
    assert!(first
        .value("process_start_time_seconds", &[])
        .is_some_and(|t| t > 1.0e9));
    assert!(first
        .value("process_open_fds", &[])
        .is_some_and(|n| n > 0.0));
    let rss = first.value("process_resident_memory_bytes", &[]);
    assert!(rss.is_some_and(|b| b > 1.0e6), "resident memory {rss:?}");
    assert_eq!(
        first
            .types
            .get("process_cpu_seconds_total")
            .map(String::as_str),
        Some("counter")
    );
    for n in ["east", "west"] {
        assert_eq!(
            first.value("walbridge_echo_suppressed_total", &[("node", n)]),
            Some(0.0)
        );
        assert!(first.value("walbridge_node_up", &[("node", n)]).is_some());
    }
    for (name, kind) in [
        (CHANGES, "counter"),
        (TXNS, "counter"),
        ("walbridge_conflicts_total", "counter"),
        ("walbridge_replication_lag_seconds", "gauge"),
        ("walbridge_replication_lag_bytes", "gauge"),
        ("walbridge_apply_duration_seconds", "histogram"),
        ("walbridge_slot_retained_wal_bytes", "gauge"),
        ("walbridge_slot_wal_budget_ratio", "gauge"),
        ("walbridge_node_up", "gauge"),
        ("walbridge_trigger_queue_depth", "gauge"),
    ] {
        // Families without series yet are not printed; once printed, their type must match.
        if let Some(t) = first.types.get(name) {
            assert_eq!(t, kind, "{name}");
        }
    }

    wait_readyz(addr, 200, &mut run);
    // Five transactions east -> west: 5 inserts, 6 updates, 2 deletes.
    d.sql(
        "east",
        "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 5) g",
    );
    for (a, b) in [(1, 2), (3, 4), (4, 5)] {
        d.sql(
            "east",
            &format!("UPDATE items SET v = v || '!' WHERE id IN ({a}, {b})"),
        );
    }
    d.sql("east", "DELETE FROM items WHERE id IN (1, 2)");
    // Three transactions west -> east: 3 inserts, 1 delete, 1 truncate.
    d.sql(
        "west",
        "INSERT INTO notes VALUES ('a', '1'), ('b', '2'), ('c', '3')",
    );
    d.sql("west", "DELETE FROM notes WHERE k = 'b'");
    d.wait_for(
        "east",
        "SELECT string_agg(k, ',' ORDER BY k) FROM notes",
        "a,c",
    );
    d.sql("west", "TRUNCATE notes");
    d.wait_for("east", "SELECT count(*) FROM notes", "0");
    d.wait_for(
        "west",
        "SELECT string_agg(id || v, ',' ORDER BY id) FROM items",
        "3v3!,4v4!!,5v5!",
    );
    d.wait_caught_up();

    let expect = |m: &Exposition| {
        let c = |s: &str, t: &str, table: &str, op: &str| {
            m.value(
                CHANGES,
                &[("source", s), ("target", t), ("table", table), ("op", op)],
            )
        };
        c("east", "west", "public.items", "insert") == Some(5.0)
            && c("east", "west", "public.items", "update") == Some(6.0)
            && c("east", "west", "public.items", "delete") == Some(2.0)
            && c("west", "east", "public.notes", "insert") == Some(3.0)
            && c("west", "east", "public.notes", "delete") == Some(1.0)
            && m.sum(CHANGES, &[("source", "west"), ("op", "truncate")]) == 1.0
            && m.value(TXNS, &dir("east", "west")) == Some(5.0)
            && m.value(TXNS, &dir("west", "east")) == Some(3.0)
    };
    let m = wait_metrics(addr, "the exact counts", expect);
    // Nothing else was counted: no other table, op or direction.
    assert_eq!(m.sum(CHANGES, &[("source", "east")]), 13.0);
    assert_eq!(m.sum(CHANGES, &[("source", "west")]), 5.0);
    assert_eq!(
        m.value(
            "walbridge_apply_duration_seconds_count",
            &dir("east", "west")
        ),
        Some(5.0)
    );
    let echoes =
        |m: &Exposition, n: &str| m.value("walbridge_echo_suppressed_total", &[("node", n)]);
    let m = if pg_major() >= 16 {
        // On 16+ pgoutput filters origins in the server (`origin 'none'`): once both nodes'
        // slots are consumed past everything walbridge applied, no echo ever reached it.
        d.wait_caught_up();
        let m = scrape(addr);
        assert_eq!(
            echoes(&m, "west"),
            Some(0.0),
            "echo from west on {}",
            pg_major()
        );
        assert_eq!(
            echoes(&m, "east"),
            Some(0.0),
            "echo from east on {}",
            pg_major()
        );
        m
    } else {
        // pgoutput on PostgreSQL 15 has no origin filter: every applied transaction is
        // decoded again on its target and dropped there as an echo, exactly once each.
        wait_metrics(addr, "one echo per applied transaction", |m| {
            echoes(m, "west") == Some(5.0) && echoes(m, "east") == Some(3.0)
        })
    };
    assert_eq!(m.sum("walbridge_conflicts_total", &[]), 0.0);
    assert_eq!(m.sum("walbridge_errors_total", &[]), 0.0);
    for n in ["east", "west"] {
        assert_eq!(m.value("walbridge_node_up", &[("node", n)]), Some(1.0));
    }
    for (s, t) in [("east", "west"), ("west", "east")] {
        let slot = format!("walbridge_{s}_to_{t}");
        let retained = m
            .value(
                "walbridge_slot_retained_wal_bytes",
                &[("node", s), ("slot", &slot)],
            )
            .unwrap_or_else(|| panic!("no retained WAL for {slot}"));
        let ratio = m
            .value(
                "walbridge_slot_wal_budget_ratio",
                &[("node", s), ("slot", &slot)],
            )
            .expect("budget ratio");
        assert!(
            retained >= 0.0 && (0.0..0.01).contains(&ratio),
            "{retained} {ratio}"
        );
    }
    // Caught up: lag in seconds is 0 in both directions.
    wait_metrics(addr, "zero lag", |m| {
        m.value("walbridge_replication_lag_seconds", &dir("east", "west")) == Some(0.0)
            && m.value("walbridge_replication_lag_seconds", &dir("west", "east")) == Some(0.0)
    });

    // Still exact once everything has settled (no echo, no double count).
    d.wait_caught_up();
    let later = scrape(addr);
    assert!(
        expect(&later),
        "counts moved after the load: {:#?}",
        later.samples
    );
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

#[test]
fn readyz_and_retained_wal_follow_a_node_outage() {
    if !wal2json_available() {
        return;
    }
    let mut d = Deployment::new(
        &["east", "west"],
        "CREATE TABLE public.items (id int PRIMARY KEY, pad text);",
        "plugin = \"wal2json\"\nmax_retained_wal = \"3MB\"",
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], d.enable_metrics()));
    d.walbridge_ok(&["setup"]);
    let mut run = d.spawn_run("run.log");
    let body = wait_readyz(addr, 200, &mut run);
    assert!(body.contains("\"ready\":true"), "{body}");

    let slot = [("node", "east"), ("slot", "walbridge_east_to_west")];
    let before = wait_metrics(addr, "retained WAL of east's slot", |m| {
        m.value("walbridge_slot_retained_wal_bytes", &slot)
            .is_some()
    })
    .value("walbridge_slot_retained_wal_bytes", &slot)
    .unwrap_or(0.0);

    d.node_mut("west").stop(StopMode::Fast).expect("stop west");
    let body = wait_readyz(addr, 503, &mut run);
    let reasons: serde_json::Value = serde_json::from_str(&body).expect("JSON reasons");
    assert_eq!(reasons["ready"], false);
    let text = reasons["reasons"].to_string();
    assert!(text.contains("west"), "{body}");

    // East keeps writing; its slot for west cannot advance, so the WAL it retains grows.
    // About 9 MB of WAL, so growth of 4 MB is certain whatever the baseline included.
    d.sql(
        "east",
        "INSERT INTO items SELECT g, repeat('x', 1000) FROM generate_series(1, 8000) g",
    );
    let grown = wait_metrics(
        addr,
        "east's retained WAL growing while west is down",
        |m| {
            m.value("walbridge_slot_retained_wal_bytes", &slot)
                .is_some_and(|v| v >= before + 4_000_000.0)
                && m.value("walbridge_node_up", &[("node", "west")]) == Some(0.0)
                && m.value("walbridge_direction_up", &dir("east", "west")) == Some(0.0)
                && m.value("walbridge_replication_lag_seconds", &dir("east", "west"))
                    .is_some_and(|s| s > 0.0)
                // Lag grows while the target is down (read from the source's position at
                // its own probe, so it may trail the retained WAL by a scrape or two).
                && m.value("walbridge_replication_lag_bytes", &dir("east", "west"))
                    .is_some_and(|b| b >= 4_000_000.0)
        },
    );
    let peak = grown
        .value("walbridge_slot_retained_wal_bytes", &slot)
        .unwrap_or(0.0);
    let ratio = grown
        .value("walbridge_slot_wal_budget_ratio", &slot)
        .unwrap_or(0.0);
    assert!(
        (ratio - peak / (3.0 * 1024.0 * 1024.0)).abs() < 1e-9,
        "ratio {ratio} for {peak} bytes"
    );
    run.assert_running();

    // The WAL guardrail: over max_retained_wal, /readyz and the log name the slot and the
    // peer that holds it back.
    let (_, body) = http_get(addr, "/readyz").expect("/readyz answers");
    assert!(
        body.contains("slot walbridge_east_to_west on east retains")
            && body.contains("west is not confirming"),
        "{body}"
    );
    let _ = wait_until(WAIT, || run.log().contains("west is not confirming"));
    assert!(
        run.log()
            .contains("slot walbridge_east_to_west on east retains"),
        "no guardrail warning in the log:\n{}",
        run.log()
    );

    d.node_mut("west").restart().expect("start west");
    wait_readyz(addr, 200, &mut run);
    d.wait_for("west", "SELECT count(*) FROM items", "8000");
    d.wait_caught_up();
    // Confirmed: the slot lets go of the WAL and the lag returns to 0.
    wait_metrics(addr, "the retained WAL released and no lag", |m| {
        m.value("walbridge_slot_retained_wal_bytes", &slot)
            .is_some_and(|v| v < peak)
            && m.value("walbridge_replication_lag_seconds", &dir("east", "west")) == Some(0.0)
            && m.value("walbridge_direction_up", &dir("east", "west")) == Some(1.0)
    });
    let m = scrape(addr);
    assert!(
        m.value("walbridge_reconnects_total", &dir("east", "west"))
            .is_some_and(|v| v >= 1.0),
        "the outage counts as a reconnect"
    );
    run.signal(libc::SIGTERM);
    assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
}

// ---- no password in the logs ---------------------------------------------------------------

const EAST_PW: &str = "pw-EAST-3f9c1a";
const WEST_PW: &str = "pw-WEST-77ab2e";
const WRONG_PW: &str = "pw-WRONG-d00d5";

fn password_cluster() -> LocalCluster {
    let hba = "host all postgres 127.0.0.1/32 trust\n\
               local all postgres trust\n\
               host all md5_user 127.0.0.1/32 md5\n\
               host replication md5_user 127.0.0.1/32 md5\n\
               host all scram_user 127.0.0.1/32 scram-sha-256\n\
               host replication scram_user 127.0.0.1/32 scram-sha-256\n";
    let c = LocalCluster::start(&ClusterOptions {
        hba: Some(hba.into()),
        ..ClusterOptions::default()
    })
    .expect("start a cluster with passwords");
    c.psql(
        "postgres",
        &format!(
            "SET password_encryption = 'md5'; \
             CREATE ROLE md5_user LOGIN SUPERUSER PASSWORD '{WEST_PW}'; \
             SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scram_user LOGIN SUPERUSER PASSWORD '{EAST_PW}'; \
             CREATE TABLE public.items (id int PRIMARY KEY, v text);"
        ),
    )
    .expect("roles and schema");
    c
}

/// Writes a configuration: east through SCRAM in a key/value DSN, west through md5 in a URI.
fn password_config(
    dir: &std::path::Path,
    east: &LocalCluster,
    west: &LocalCluster,
) -> std::path::PathBuf {
    let path = dir.join("good.toml");
    std::fs::write(
        &path,
        format!(
            "[[nodes]]\nname = \"east\"\n\
             dsn = \"host=127.0.0.1 port={} dbname=postgres user=scram_user password='{EAST_PW}' sslmode=disable\"\n\n\
             [[nodes]]\nname = \"west\"\n\
             dsn = \"postgres://md5_user:{WEST_PW}@127.0.0.1:{}/postgres?sslmode=disable\"\n\n\
             [replication]\nplugin = \"pgoutput\"\n\n[metrics]\nlisten = \"\"\n",
            east.port(),
            west.port()
        ),
    )
    .expect("write config");
    path
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [EAST_PW, WEST_PW, WRONG_PW, "md5_user:"] {
        assert!(!text.contains(secret), "{what} shows {secret:?}:\n{text}");
    }
}

fn spawn(config: &std::path::Path, format: &str, log: &std::path::Path) -> Runner {
    let file = std::fs::File::create(log).expect("log file");
    let child = Command::new(walbridge_bin())
        .args(["run", "--log-format", format, "--config"])
        .arg(config)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .expect("spawn walbridge run");
    Runner {
        child,
        log: log.to_path_buf(),
    }
}

fn wait_log(run: &mut Runner, what: &str, pred: impl Fn(&str) -> bool) {
    let ok = wait_until(WAIT, || pred(&run.log()));
    assert!(ok, "the log never showed {what}:\n{}", run.log());
}

#[test]
fn passwords_never_reach_the_logs() {
    let east = password_cluster();
    let mut west = password_cluster();
    let dir = tempfile::tempdir().expect("temp dir");
    let good = password_config(dir.path(), &east, &west);
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&good)
            .expect("config")
            .replace(EAST_PW, WRONG_PW)
            .replace(WEST_PW, WRONG_PW),
    )
    .expect("write config");

    for format in ["text", "json"] {
        let out = Command::new(walbridge_bin())
            .args(["setup", "--log-format", format, "--config"])
            .arg(&good)
            .env("RUST_LOG", "debug")
            .output()
            .expect("run setup");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "setup failed:\n{all}");
        assert_no_secret(&format!("setup ({format})"), &all);

        // Wrong passwords: setup and status fail, saying why, without the password.
        for cmd in ["setup", "status"] {
            let out = Command::new(walbridge_bin())
                .args([cmd, "--log-format", format, "--config"])
                .arg(&wrong)
                .env("RUST_LOG", "debug")
                .output()
                .expect("run walbridge");
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                out.status.code(),
                Some(1),
                "{cmd} with wrong passwords:\n{all}"
            );
            assert!(all.contains("password authentication failed"), "{all}");
            assert_no_secret(&format!("{cmd} with wrong passwords ({format})"), &all);
        }
    }

    // A run that replicates, then loses a node and gets it back: both formats.
    for (round, format) in ["text", "json"].into_iter().enumerate() {
        let log = dir.path().join(format!("run-{format}.log"));
        let mut run = spawn(&good, format, &log);
        let id = round + 1;
        east.psql("postgres", &format!("INSERT INTO items VALUES ({id}, 'x')"))
            .expect("insert");
        let ok = wait_until(WAIT, || {
            west.psql(
                "postgres",
                &format!("SELECT count(*) FROM items WHERE id = {id}"),
            )
            .is_ok_and(|v| v == "1")
        });
        assert!(ok, "not replicated:\n{}", run.log());
        west.stop(StopMode::Fast).expect("stop west");
        wait_log(&mut run, "the outage", |l| l.contains("reconnecting"));
        west.restart().expect("start west");
        run.signal(libc::SIGTERM);
        assert_eq!(run.wait_exit(WAIT), Some(0), "log:\n{}", run.log());
        let text = run.log();
        if format == "json" {
            let mut in_direction_span = 0;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                if v["span"]["name"] == "direction" && v["span"]["source"].is_string() {
                    in_direction_span += 1;
                }
            }
            assert!(
                in_direction_span > 0,
                "no line in a direction span:\n{text}"
            );
        } else {
            assert!(
                text.contains("direction{source=east target=west}"),
                "{text}"
            );
            assert!(
                !text.contains('\x1b'),
                "colour codes in a log file:\n{text}"
            );
        }
        assert_no_secret(&format!("run ({format})"), &text);
    }

    // Wrong passwords: every direction fails to connect; the errors say so, without them.
    for format in ["text", "json"] {
        let log = dir.path().join(format!("wrong-{format}.log"));
        let mut run = spawn(&wrong, format, &log);
        wait_log(&mut run, "the authentication failures", |l| {
            l.matches("password authentication failed").count() >= 2
        });
        run.signal(libc::SIGTERM);
        run.wait_exit(WAIT);
        assert_no_secret(&format!("run with wrong passwords ({format})"), &run.log());
    }
}
