//! `walbridge status`: per direction mode, plugin, slot, origin, confirmed LSN, lag and state;
//! per node reachability and the WAL its slots retain.
//!
//! It uses the same numbers as the metrics. When a `walbridge run` serves `[metrics] listen`,
//! its `/status` (the board that also feeds `/metrics`) supplies the directions' live state and
//! lag; the databases are asked directly in any case, for reachability as seen from here, the
//! slots and the origins' progress. Without a process, everything comes from the databases
//! with the same queries the monitor runs:
//!
//! ```text
//!   lag_bytes    = pg_current_wal_lsn() on the source - the slot's confirmed_flush_lsn
//!   applied_lsn  = the target's replication origin progress
//!   lag_seconds  = 0 when lag_bytes is 0, otherwise unknown (null): only a running process
//!                  knows commit times
//!   state        = "not_running"
//! ```
//!
//! Exit codes: 0 every node reachable, 1 some node unreachable (2, a usage or configuration
//! error, is decided before this module runs).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

use crate::config::{Config, NodeConfig};
use crate::direction::probe::{self as monitor, Probe};
use crate::direction::state::{format_seconds, human_bytes, DirectionState};
use crate::direction::{DirectionStatus, NodeStatus, SlotStatus};
use crate::lsn::{Lsn, PgTimestamp};
use crate::setup::failover;

/// How long to wait for a running process's `/status`.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest `/status` answer read (a safety bound; real answers are a few kB).
const HTTP_MAX_BYTES: usize = 16 << 20;

/// The running `walbridge run`, as its `/status` describes it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// A process answered at `[metrics] listen` for this configuration.
    #[serde(default)]
    pub running: bool,
    /// Where it was looked for (`null` when `[metrics] listen = ""`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Its pid.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Its version.
    #[serde(default)]
    pub version: Option<String>,
    /// When it started (RFC 3339).
    #[serde(default)]
    pub started_at: Option<String>,
    /// Seconds since it started.
    #[serde(default)]
    pub uptime_seconds: Option<f64>,
    /// What `/readyz` would answer.
    #[serde(default)]
    pub ready: Option<bool>,
    /// Why the process's numbers are not used, when something answered but could not be read
    /// or serves another configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What `walbridge status --json` prints: the contract's `nodes` and `directions`, plus the
/// process and the guardrail warnings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// Per node: reachable, mode, slots.
    pub nodes: Vec<NodeStatus>,
    /// Per direction: mode, plugin, slot, origin, confirmed LSN, lag, state, last error.
    pub directions: Vec<DirectionStatus>,
    /// The `walbridge run` process, if one serves this configuration.
    #[serde(default)]
    pub process: ProcessInfo,
    /// Slots near or over `max_retained_wal`, one sentence each.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl StatusReport {
    /// The exit code of the contract: 0 when every node is reachable, else 1.
    pub fn exit_code(&self) -> u8 {
        if self.nodes.iter().all(|n| n.reachable) {
            0
        } else {
            1
        }
    }
}

/// What one node said, directly.
struct NodeLook {
    probe: Result<Probe, String>,
    /// Origin name -> remote LSN (best effort: reading it needs superuser or a grant).
    origins: HashMap<String, Lsn>,
    /// (source, target) -> the instance holding the direction's claim on this node (the
    /// target); `None` when the locks could not be read.
    owners: Option<HashMap<(String, String), String>>,
    /// (source, target) -> the error a direction into this node stopped on, as `run` recorded
    /// it in `walbridge.stopped` (see [`crate::skip`]).
    stops: HashMap<(String, String), String>,
    /// (source, target) -> `schema.table` -> changes parked in `walbridge.parked` on this node.
    parked: HashMap<(String, String), std::collections::BTreeMap<String, i64>>,
    /// `server_version_num`, when the node answered.
    version: Option<i64>,
}

/// Collects the report: the process's view (if any) merged with the databases'.
pub async fn gather(config: &Config) -> StatusReport {
    let (process, looks) = tokio::join!(
        fetch_process(config),
        futures::future::join_all(config.nodes.iter().map(|n| look(config, n)))
    );
    let looks: HashMap<&str, NodeLook> = config
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .zip(looks)
        .collect();
    let (info, live) = match process {
        Ok(Some(live)) => match matches_config(config, &live) {
            Ok(()) => (
                ProcessInfo {
                    running: true,
                    listen: config.metrics.listen.map(|a| a.to_string()),
                    ..live.process.clone()
                },
                Some(live),
            ),
            Err(note) => (
                ProcessInfo {
                    running: false,
                    listen: config.metrics.listen.map(|a| a.to_string()),
                    note: Some(note),
                    ..ProcessInfo::default()
                },
                None,
            ),
        },
        Ok(None) => (
            ProcessInfo {
                running: false,
                listen: config.metrics.listen.map(|a| a.to_string()),
                ..ProcessInfo::default()
            },
            None,
        ),
        Err(note) => (
            ProcessInfo {
                running: false,
                listen: config.metrics.listen.map(|a| a.to_string()),
                note: Some(note),
                ..ProcessInfo::default()
            },
            None,
        ),
    };
    let nodes = merge_nodes(config, &looks, live.as_ref());
    let directions = merge_directions(config, &looks, &nodes, live.as_ref());
    let budget = config.replication.max_retained_wal;
    let mut warnings = Vec::new();
    for n in &nodes {
        for s in &n.slots {
            if s.budget_ratio
                .is_some_and(|r| r >= crate::direction::state::BUDGET_WARN_RATIO)
            {
                warnings.push(crate::direction::state::slot_sentence(&n.name, s, budget));
            }
        }
    }
    // A node with standbys in its DSN on a server whose slots do not survive a promotion.
    for node in &config.nodes {
        let version = looks.get(node.name.as_str()).and_then(|l| l.version);
        if let Some(v) = version.filter(|v| *v < failover::FAILOVER_SLOTS_SINCE) {
            if node.dsn.hosts.len() > 1 {
                warnings.push(format!(
                    "{}: {}",
                    node.name,
                    failover::promotion_loses_slots(&node.name, v / 10000)
                ));
            }
        }
    }
    StatusReport {
        nodes,
        directions,
        process: info,
        warnings,
    }
}

/// The process's answer must describe this configuration's directions.
fn matches_config(config: &Config, live: &StatusReport) -> Result<(), String> {
    let mut want: Vec<(String, String)> = config
        .directions()
        .into_iter()
        .map(|d| (d.source, d.target))
        .collect();
    let mut have: Vec<(String, String)> = live
        .directions
        .iter()
        .map(|d| (d.source.clone(), d.target.clone()))
        .collect();
    want.sort();
    have.sort();
    if want == have {
        Ok(())
    } else {
        Err(format!(
            "the process at {} serves other nodes ({}); showing what the databases say",
            config
                .metrics
                .listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
            have.iter()
                .map(|(s, t)| format!("{s} -> {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

async fn look(config: &Config, node: &NodeConfig) -> NodeLook {
    let mut client: Option<Client> = None;
    let probe = monitor::probe_node(
        node,
        config,
        &mut client,
        &format!("walbridge-status-{}", node.name),
    )
    .await;
    let mut origins = HashMap::new();
    if let Some(c) = &client {
        let names: Vec<String> = config
            .nodes
            .iter()
            .filter(|n| n.name != node.name)
            .map(|n| config.origin_name(&n.name))
            .collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&names];
        let query = c.query(
            "SELECT external_id, remote_lsn::text FROM pg_catalog.pg_replication_origin_status \
             WHERE external_id = ANY($1)",
            &params,
        );
        if let Ok(Ok(rows)) = tokio::time::timeout(monitor::PROBE_TIMEOUT, query).await {
            for r in rows {
                let name: Option<String> = r.get(0);
                let lsn: Option<String> = r.get(1);
                if let (Some(name), Some(lsn)) = (name, lsn.and_then(|l| l.parse().ok())) {
                    origins.insert(name, lsn);
                }
            }
        }
    }
    let mut version = None;
    if let Some(c) = &client {
        let query = c.query_one(
            "SELECT pg_catalog.current_setting('server_version_num')::int8",
            &[],
        );
        if let Ok(Ok(row)) = tokio::time::timeout(monitor::PROBE_TIMEOUT, query).await {
            version = Some(row.get(0));
        }
    }
    let mut owners = None;
    if let Some(c) = &client {
        let sql = crate::direction::claim::owners_sql();
        let query = c.query(&sql, &[]);
        if let Ok(Ok(rows)) = tokio::time::timeout(monitor::PROBE_TIMEOUT, query).await {
            let mut map = HashMap::new();
            for r in rows {
                let app: Option<String> = r.get(0);
                if let Some((s, t, i)) = app
                    .as_deref()
                    .and_then(crate::direction::claim::parse_owner)
                {
                    map.insert((s.to_string(), t.to_string()), i.to_string());
                }
            }
            owners = Some(map);
        }
    }
    let mut stops = HashMap::new();
    if let Some(c) = &client {
        let query = c.query("SELECT source, target, error FROM walbridge.stopped", &[]);
        // Before setup (or set up by an older version) the table does not exist: no stops.
        if let Ok(Ok(rows)) = tokio::time::timeout(monitor::PROBE_TIMEOUT, query).await {
            for r in rows {
                stops.insert((r.get(0), r.get(1)), r.get(2));
            }
        }
    }
    let mut parked: HashMap<(String, String), std::collections::BTreeMap<String, i64>> =
        HashMap::new();
    if let Some(c) = &client {
        let query = c.query(
            "SELECT source, target, schema_name || '.' || table_name, count(*) \
             FROM walbridge.parked GROUP BY 1, 2, 3",
            &[],
        );
        // Before setup (or set up by an older version) the table does not exist: none parked.
        if let Ok(Ok(rows)) = tokio::time::timeout(monitor::PROBE_TIMEOUT, query).await {
            for r in rows {
                parked
                    .entry((r.get(0), r.get(1)))
                    .or_default()
                    .insert(r.get(2), r.get(3));
            }
        }
    }
    NodeLook {
        probe,
        origins,
        owners,
        stops,
        parked,
        version,
    }
}

fn merge_nodes(
    config: &Config,
    looks: &HashMap<&str, NodeLook>,
    live: Option<&StatusReport>,
) -> Vec<NodeStatus> {
    let budget = config.replication.max_retained_wal;
    config
        .nodes
        .iter()
        .map(|node| {
            let name = node.name.as_str();
            let live_node = live.and_then(|l| l.nodes.iter().find(|n| n.name == name));
            let mut status = NodeStatus::new(name);
            status.checked_at = Some(PgTimestamp::now());
            match looks.get(name).map(|l| &l.probe) {
                Some(Ok(probe)) => {
                    status.reachable = true;
                    status.mode = monitor::node_mode(config, probe).to_string();
                    status.current_wal_lsn = Some(probe.current_wal_lsn);
                    status.trigger_queue_depth = probe.trigger_queue_depth;
                    status.slots = probe
                        .slots
                        .iter()
                        .map(|s| {
                            // Growth needs samples over time: only a running process has them.
                            let growth = live_node
                                .and_then(|n| n.slots.iter().find(|l| l.name == s.name))
                                .and_then(|l| l.growth_bytes_per_second);
                            SlotStatus {
                                name: s.name.clone(),
                                retained_wal_bytes: s.retained_wal_bytes,
                                active: s.active,
                                peer: monitor::slot_peer(config, name, &s.name),
                                confirmed_flush_lsn: s.confirmed_flush_lsn,
                                wal_status: s.wal_status.clone(),
                                budget_ratio: s
                                    .retained_wal_bytes
                                    .and_then(|b| monitor::budget_ratio(b, budget)),
                                growth_bytes_per_second: growth,
                                seconds_until_budget: s
                                    .retained_wal_bytes
                                    .and_then(|b| monitor::seconds_until_budget(b, budget, growth)),
                            }
                        })
                        .collect();
                }
                Some(Err(error)) => {
                    status.reachable = false;
                    status.error = Some(error.clone());
                    // The last numbers the process saw are better than none.
                    if let Some(l) = live_node {
                        status.mode = l.mode.clone();
                        status.slots = l.slots.clone();
                    }
                }
                None => {}
            }
            status
        })
        .collect()
}

fn merge_directions(
    config: &Config,
    looks: &HashMap<&str, NodeLook>,
    nodes: &[NodeStatus],
    live: Option<&StatusReport>,
) -> Vec<DirectionStatus> {
    config
        .directions()
        .into_iter()
        .map(|d| {
            let (s, t) = (d.source.as_str(), d.target.as_str());
            let slot_name = config.slot_name(s, t);
            let origin_name = config.origin_name(s);
            let source = nodes.iter().find(|n| n.name == s);
            let slot = source.and_then(|n| n.slots.iter().find(|x| x.name == slot_name));
            let applied = looks
                .get(t)
                .and_then(|l| l.origins.get(&origin_name))
                .copied();
            // The owner as the target's locks say (any instance), else as the process says.
            let owner = looks
                .get(t)
                .and_then(|l| l.owners.as_ref())
                .map(|o| o.get(&(s.to_string(), t.to_string())).cloned());
            let parked = looks
                .get(t)
                .and_then(|l| l.parked.get(&(s.to_string(), t.to_string())))
                .cloned()
                .unwrap_or_default();
            let live_dir =
                live.and_then(|l| l.directions.iter().find(|x| x.source == s && x.target == t));
            if let Some(live_dir) = live_dir {
                let mut out = live_dir.clone();
                out.parked = parked;
                out.applied_lsn = applied.or(out.applied_lsn);
                if let Some(owner) = owner {
                    out.owner = owner;
                }
                return out;
            }
            let mut out = DirectionStatus::new(s, t);
            out.state = DirectionState::NotRunning;
            out.mode = source
                .map(|n| n.mode.clone())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| config.replication.mode.as_str().to_string());
            let stream = out.mode == "stream";
            if stream {
                out.plugin = Some(config.replication.plugin.as_str().to_string());
                out.slot = Some(slot_name.clone());
            }
            out.origin = Some(origin_name);
            out.parked = parked;
            out.owner = owner.flatten();
            out.applied_lsn = applied;
            out.confirmed_lsn = slot.and_then(|x| x.confirmed_flush_lsn);
            out.lag_bytes = match (out.confirmed_lsn, source.and_then(|n| n.current_wal_lsn)) {
                (Some(c), Some(h)) => Some(c.bytes_until(h)),
                _ => None,
            };
            out.lag_seconds = (out.lag_bytes == Some(0)).then_some(0.0);
            let stop = looks
                .get(t)
                .and_then(|l| l.stops.get(&(s.to_string(), t.to_string())));
            if stop.is_some() {
                out.state = DirectionState::Failed;
            }
            out.last_error = match source {
                _ if stop.is_some() => stop.cloned(),
                Some(n) if !n.reachable => Some(format!("node {s} is unreachable")),
                Some(_) if stream && slot.is_none() => Some(missing_slot(&slot_name, s)),
                _ => None,
            };
            out
        })
        .collect()
}

/// What a missing slot means and what to run: it may have been lost in a promotion.
pub fn missing_slot(slot: &str, source: &str) -> String {
    format!(
        "slot {slot} does not exist on {source}; if {source} is a promoted standby, the \
         promotion lost it (only failover slots synchronized to the standby survive one, on \
         PostgreSQL 17+): run walbridge setup to create it again, then walbridge verify, and \
         copy from {source} what it names (changes made on {source} before the new slot were \
         not streamed)"
    )
}

/// Asks the process at `[metrics] listen` for its `/status`. `Ok(None)` when nothing listens
/// there (no process); `Err` when something answered that is not a walbridge status.
async fn fetch_process(config: &Config) -> Result<Option<StatusReport>, String> {
    let Some(listen) = config.metrics.listen else {
        return Ok(None);
    };
    let addr = loopback_if_unspecified(listen);
    let (code, body) = match tokio::time::timeout(HTTP_TIMEOUT, http_get(addr, "/status")).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(None),
        Ok(Err(e)) => {
            return Err(format!(
                "cannot read http://{addr}/status: {e}; showing what the databases say"
            ))
        }
        Err(_) => {
            return Err(format!(
                "http://{addr}/status did not answer within {}s; showing what the databases say",
                HTTP_TIMEOUT.as_secs()
            ))
        }
    };
    if code != 200 {
        return Err(format!(
            "http://{addr}/status answered HTTP {code}, not a walbridge status; showing what \
             the databases say"
        ));
    }
    serde_json::from_slice::<StatusReport>(&body)
        .map(Some)
        .map_err(|e| {
            format!(
                "http://{addr}/status is not a walbridge status ({e}); showing what the \
                 databases say"
            )
        })
}

/// `0.0.0.0` / `[::]` listen on every interface; connect through loopback.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// A minimal HTTP/1.1 GET (the one request `status` makes): status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(HTTP_MAX_BYTES as u64)
        .read_to_end(&mut raw)
        .await?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the answer is not an HTTP response",
        )
    })
}

/// Splits an HTTP/1.1 response into status code and body (plain or chunked).
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let code = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((code, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some((code, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// The report as tables for people.
pub fn render_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let p = &report.process;
    if p.running {
        let _ = writeln!(
            out,
            "walbridge run: running (pid {}, up {}, {}), http://{}",
            p.pid.map_or_else(|| "?".into(), |v| v.to_string()),
            p.uptime_seconds.map_or_else(|| "?".into(), format_seconds),
            if p.ready == Some(true) {
                "ready"
            } else {
                "not ready"
            },
            p.listen.as_deref().unwrap_or("?")
        );
    } else {
        let _ = writeln!(
            out,
            "walbridge run: not running{}; numbers from the databases",
            p.listen
                .as_deref()
                .map(|l| format!(" (nothing answers at http://{l}/status)"))
                .unwrap_or_else(
                    || " ([metrics] listen is off, so a process cannot be asked)".into()
                )
        );
    }
    if let Some(note) = &p.note {
        let _ = writeln!(out, "note: {note}");
    }

    out.push('\n');
    let rows = report
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                if n.reachable { "yes" } else { "NO" }.into(),
                dash(&n.mode),
                n.current_wal_lsn
                    .map_or_else(|| "-".into(), |l| l.to_string()),
                n.trigger_queue_depth
                    .map_or_else(|| "-".into(), |d| d.to_string()),
                n.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["NODE", "REACHABLE", "MODE", "WAL LSN", "QUEUE", "ERROR"],
        rows,
    ));

    let slots: Vec<Vec<String>> = report
        .nodes
        .iter()
        .flat_map(|n| {
            n.slots.iter().map(move |s| {
                vec![
                    n.name.clone(),
                    s.name.clone(),
                    s.peer.clone().unwrap_or_else(|| "(none)".into()),
                    if s.active { "yes" } else { "no" }.into(),
                    s.retained_wal_bytes.map_or_else(|| "-".into(), human_bytes),
                    s.budget_ratio
                        .map_or_else(|| "-".into(), |r| format!("{:.0}%", r * 100.0)),
                    s.seconds_until_budget.map_or_else(
                        || "-".into(),
                        |v| {
                            if v <= 0.0 {
                                "now".into()
                            } else {
                                format!("in {}", format_seconds(v))
                            }
                        },
                    ),
                    s.wal_status.clone().unwrap_or_else(|| "-".into()),
                ]
            })
        })
        .collect();
    out.push('\n');
    if slots.is_empty() {
        out.push_str("no walbridge slots found\n");
    } else {
        out.push_str(&table(
            &[
                "NODE", "SLOT", "PEER", "ACTIVE", "RETAINED", "BUDGET", "FULL", "WAL",
            ],
            slots,
        ));
    }

    out.push('\n');
    let rows = report
        .directions
        .iter()
        .map(|d| {
            vec![
                format!("{} -> {}", d.source, d.target),
                d.state.as_str().replace('_', " "),
                match &d.plugin {
                    Some(p) => format!("{}/{p}", dash(&d.mode)),
                    None => dash(&d.mode),
                },
                d.slot.clone().unwrap_or_else(|| "-".into()),
                d.origin.clone().unwrap_or_else(|| "-".into()),
                d.confirmed_lsn
                    .map_or_else(|| "-".into(), |l| l.to_string()),
                d.lag_bytes.map_or_else(|| "-".into(), human_bytes),
                d.lag_seconds
                    .map_or_else(|| "unknown".into(), |s| format!("{s:.1}s")),
                d.owner.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "DIRECTION",
            "STATE",
            "MODE",
            "SLOT",
            "ORIGIN",
            "CONFIRMED",
            "LAG",
            "LAG TIME",
            "OWNER",
        ],
        rows,
    ));
    for d in &report.directions {
        if let Some(e) = &d.last_error {
            let _ = writeln!(out, "{} -> {}: {e}", d.source, d.target);
        }
        for (table, n) in &d.parked {
            let _ = writeln!(
                out,
                "{} -> {}: {table}: {n} changes parked on {} until its schema fits \
                 (walbridge.parked)",
                d.source, d.target, d.target
            );
        }
    }
    if !report.warnings.is_empty() {
        out.push('\n');
        for w in &report.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
    }
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Left-aligned columns separated by two spaces; a trailing empty column is trimmed.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let _ = write!(line, "{c:w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Some((200, b"{}".to_vec())));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((503, b"abcde".to_vec())));
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            None
        );
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB"],
            vec![
                vec!["xxx".into(), "y".into()],
                vec!["z".into(), String::new()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz\n");
    }

    #[test]
    fn unspecified_listen_goes_through_loopback() {
        let a: SocketAddr = "0.0.0.0:9187".parse().unwrap();
        assert_eq!(loopback_if_unspecified(a).to_string(), "127.0.0.1:9187");
        let b: SocketAddr = "[::]:9187".parse().unwrap();
        assert_eq!(loopback_if_unspecified(b).to_string(), "[::1]:9187");
    }
}
