//! Model check of the conflict rules, no database needed.
//!
//! Random histories: 2–5 nodes write concurrently to a few keys (upsert, update, delete, one
//! statement per transaction, commit times that may tie across nodes). Every change is
//! delivered to every peer in its source's commit order, but directions interleave at random
//! and consecutive transactions of a direction are applied in random groups, as the stream
//! applier's Sync groups and the trigger worker's batches do. Each incoming change is decided
//! by the real [`conflict::decide`]; groups are formed by the real
//! [`conflict::may_share_stamp`] and every row and tombstone a group writes carries the group's
//! stamp (its last commit time and the source's origin), as `pg_xact_commit_timestamp_origin`
//! reports it on a real target (until the group commits, a later change of the group reads
//! such a row as the source's own version with no commit time yet). The actions are executed
//! with the applier's tombstone rules: a delete records the key's deletion (statement
//! trigger), an insert that recreates a key forgets it, a delete of a missing row keeps the
//! later deletion. Under node_priority, a node's own statement on a row or deleted key last
//! written by a node that outranks it is discarded, as the priority guard trigger does.
//!
//! Once everything is delivered, every node must hold the same rows. A failure prints the
//! seed; `WALBRIDGE_SEED=N` replays one history, `WALBRIDGE_SEEDS=N` runs more of them.

use std::collections::VecDeque;
use std::fmt::Write;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use walbridge::config::ConflictPolicy;
use walbridge::conflict::{self, Action, Incoming, LocalState, Version};
use walbridge::event::ChangeOp;
use walbridge::lsn::PgTimestamp;

/// A row: its content (unique per write) and its version as the target reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    value: u32,
    version: Version,
}

/// What a node holds for one key.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    row: Option<Row>,
    tombstone: Option<Version>,
}

/// One replicated change (one source transaction).
#[derive(Clone, Copy, Debug)]
struct Msg {
    op: ChangeOp,
    key: usize,
    value: u32,
    /// The row the writer changed (sent as the old row with REPLICA IDENTITY FULL).
    old: Option<u32>,
    time: i64,
    writer: usize,
}

struct Node {
    keys: Vec<Slot>,
    /// Latest commit time this node has written or received: its next local commit is later.
    seen: i64,
}

struct Model {
    policy: ConflictPolicy,
    nodes: Vec<Node>,
    /// Whether a node is captured by triggers (its changes carry no old row).
    trigger: Vec<bool>,
    /// `queues[s][t]`: changes of s not yet applied on t, in s's commit order.
    queues: Vec<Vec<VecDeque<Msg>>>,
    log: String,
}

fn version(time: i64, writer: usize) -> Version {
    Version {
        commit_time: Some(PgTimestamp(time)),
        writer_rank: writer,
    }
}

impl Model {
    fn new(policy: ConflictPolicy, n: usize, keys: usize, rng: &mut StdRng) -> Self {
        Model {
            policy,
            nodes: (0..n)
                .map(|_| Node {
                    keys: vec![Slot::default(); keys],
                    seen: 0,
                })
                .collect(),
            trigger: (0..n).map(|_| rng.random_bool(0.3)).collect(),
            queues: (0..n)
                .map(|_| (0..n).map(|_| VecDeque::new()).collect())
                .collect(),
            log: String::new(),
        }
    }

    /// A user statement on node `n` at commit time `time`: 40 % upsert, 40 % update, 20 %
    /// delete; it changes nothing (and sends nothing) when an update or delete finds no row.
    ///
    /// Under node_priority the node's priority guard (`walbridge.priority_guard`) discards a
    /// statement whose row (or, for a missing row, whose key's tombstone) was last written by
    /// a node that outranks this one: a local write never makes a version smaller than the one
    /// it replaces.
    fn local(&mut self, n: usize, key: usize, kind: u32, time: i64, value: u32) {
        let policy = self.policy;
        let node = &mut self.nodes[n];
        node.seen = time;
        let slot = &mut node.keys[key];
        let old = slot.row.map(|r| r.value);
        let op = match (kind, old) {
            (0..=3, None) => ChangeOp::Insert,
            (0..=7, Some(_)) => ChangeOp::Update,
            (8..=9, Some(_)) => ChangeOp::Delete,
            _ => return,
        };
        let current = slot.row.map(|r| r.version).or(slot.tombstone);
        if policy == ConflictPolicy::NodePriority && current.is_some_and(|v| v.writer_rank < n) {
            let _ = writeln!(
                self.log,
                "  node {n}'s {op:?} of key {key} discarded by the guard"
            );
            return;
        }
        if op == ChangeOp::Delete {
            slot.row = None;
            slot.tombstone = Some(version(time, n));
        } else {
            slot.row = Some(Row {
                value,
                version: version(time, n),
            });
        }
        let msg = Msg {
            op,
            key,
            value,
            old,
            time,
            writer: n,
        };
        let _ = writeln!(self.log, "  node {n} writes {msg:?}");
        for t in 0..self.nodes.len() {
            if t != n {
                self.queues[n][t].push_back(msg);
            }
        }
    }

    /// Applies the next group of s's changes on t: up to `max` transactions that may share a
    /// stamp, all stamped with the last one's commit time and s's origin.
    fn deliver(&mut self, s: usize, t: usize, max: usize) {
        let n = self.nodes.len();
        let mut group: Vec<Msg> = Vec::new();
        while let Some(next) = self.queues[s][t].front().copied() {
            let joins = group.first().is_none_or(|first| {
                group.len() < max
                    && conflict::may_share_stamp(
                        n,
                        Some(PgTimestamp(first.time)),
                        Some(PgTimestamp(next.time)),
                    )
            });
            if !joins {
                break;
            }
            self.queues[s][t].pop_front();
            group.push(next);
        }
        let Some(last) = group.last() else { return };
        let stamp = version(last.time, s);
        let _ = writeln!(
            self.log,
            "  node {t} applies from {s} {:?} stamped {}",
            group.iter().map(|m| (m.key, m.time)).collect::<Vec<_>>(),
            last.time
        );
        let mut written = Vec::new();
        for msg in group {
            if self.apply(t, msg, stamp, &written) {
                written.push(msg.key);
            }
        }
    }

    /// The careful path for one change: read the row (or the key's tombstone), decide, execute.
    /// A row or tombstone that an earlier change of the same group wrote (`written`) has no
    /// commit time or origin yet: the applier reads it as the source's own version.
    /// Returns whether it wrote the key.
    fn apply(&mut self, t: usize, msg: Msg, stamp: Version, written: &[usize]) -> bool {
        let policy = self.policy;
        let full_old_row = policy == ConflictPolicy::NodePriority && !self.trigger[msg.writer];
        let node = &mut self.nodes[t];
        node.seen = node
            .seen
            .max(msg.time)
            .max(stamp.commit_time.map_or(0, |c| c.0));
        let slot = &mut node.keys[msg.key];
        let row_equals_old = match (msg.op, slot.row, msg.old) {
            (ChangeOp::Update | ChangeOp::Delete, Some(row), Some(old)) if full_old_row => {
                Some(row.value == old)
            }
            _ => None,
        };
        let as_read = |v: Version| {
            if written.contains(&msg.key) {
                Version {
                    commit_time: None,
                    writer_rank: stamp.writer_rank,
                }
            } else {
                v
            }
        };
        let local = LocalState {
            row: slot.row.map(|r| as_read(r.version)),
            row_equals_old,
            tombstone: if slot.row.is_none() {
                slot.tombstone.map(as_read)
            } else {
                None
            },
        };
        let incoming = Incoming {
            op: msg.op,
            version: version(msg.time, msg.writer),
            complete_row: true,
        };
        let decision = conflict::decide(policy, incoming, local);
        match decision.action {
            Action::Insert | Action::InsertFromUpdate | Action::Update => {
                slot.row = Some(Row {
                    value: msg.value,
                    version: stamp,
                });
                slot.tombstone = None;
                true
            }
            Action::Delete | Action::RecordTombstone => {
                slot.row = None;
                slot.tombstone = Some(stamp);
                true
            }
            Action::Skip => false,
            Action::Stop => panic!("policy error is not modelled"),
        }
    }

    fn pending(&self) -> Vec<(usize, usize)> {
        let n = self.nodes.len();
        let mut out = Vec::new();
        for s in 0..n {
            for t in 0..n {
                if !self.queues[s][t].is_empty() {
                    out.push((s, t));
                }
            }
        }
        out
    }
}

/// Runs one random history; `Err` describes the divergence.
fn history(policy: ConflictPolicy, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.random_range(2..=5);
    let keys = rng.random_range(1..=3);
    let writes = rng.random_range(2..=14);
    let mut m = Model::new(policy, n, keys, &mut rng);
    let mut clock = 0i64;
    let mut done = 0;
    let mut value = 0u32;
    loop {
        let pending = m.pending();
        if done == writes && pending.is_empty() {
            break;
        }
        if done < writes && (pending.is_empty() || rng.random_bool(0.45)) {
            let node = rng.random_range(0..n);
            // A commit time that may tie with another node's, never with one this node saw.
            if !(rng.random_bool(0.3) && m.nodes[node].seen < clock) {
                clock += 1;
            }
            let time = clock.max(m.nodes[node].seen + 1);
            clock = time;
            value += 1;
            m.local(
                node,
                rng.random_range(0..keys),
                rng.random_range(0..10),
                time,
                value,
            );
            done += 1;
        } else {
            let (s, t) = pending[rng.random_range(0..pending.len())];
            let max = rng.random_range(1..=4);
            m.deliver(s, t, max);
        }
    }
    assert!(
        m.queues.iter().flatten().all(VecDeque::is_empty),
        "seed {seed}: the model left changes undelivered"
    );
    for key in 0..keys {
        let states: Vec<Option<u32>> = m
            .nodes
            .iter()
            .map(|node| node.keys[key].row.map(|r| r.value))
            .collect();
        if states.iter().any(|s| *s != states[0]) {
            return Err(format!(
                "seed {seed}: {policy:?}, {n} nodes (trigger-captured: {:?}): key {key} ends as \
                 {states:?} (value per node, None = absent)\nhistory:\n{}",
                m.trigger, m.log
            ));
        }
    }
    Ok(())
}

fn check(policy: ConflictPolicy) {
    let seeds: Vec<u64> = match std::env::var("WALBRIDGE_SEED") {
        Ok(s) => vec![s.parse().expect("WALBRIDGE_SEED is a number")],
        Err(_) => {
            let count = std::env::var("WALBRIDGE_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(20_000u64);
            (1..=count).collect()
        }
    };
    let failures: Vec<String> = seeds
        .iter()
        .filter_map(|&seed| history(policy, seed).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} histories diverge; first:\n{}",
        failures.len(),
        seeds.len(),
        failures[0]
    );
}

#[test]
fn conflict_model_last_write_wins_converges_for_random_histories() {
    check(ConflictPolicy::LastWriteWins);
}

#[test]
fn conflict_model_node_priority_converges_for_random_histories() {
    check(ConflictPolicy::NodePriority);
}
