//! Who wrote a row: the target's replication origins mapped back to configured nodes.
//!
//! `pg_xact_commit_timestamp_origin(xmin)` gives a row version's origin id. walbridge's origins
//! name their node (`<prefix>_from_<node>`, `<prefix>_copy_<node>_<n>` for the initial copy);
//! id 0 and any other origin mean the target itself wrote the row.

use std::collections::HashMap;

use crate::config::{Config, ConflictPolicy};

/// Origin ids on one target, resolved to node ranks.
#[derive(Clone, Debug)]
pub struct Writers {
    by_roident: HashMap<i64, String>,
    ranks: HashMap<String, usize>,
    target: String,
}

impl Writers {
    /// Builds the map from `pg_replication_origin` rows (`roident`, `roname`) of the target.
    pub fn new(config: &Config, target: &str, origins: &[(i64, String)]) -> Self {
        let prefix = &config.replication.slot_prefix;
        let mut by_roident = HashMap::new();
        for (id, name) in origins {
            let node = config.nodes.iter().find(|n| {
                *name == config.origin_name(&n.name)
                    || name
                        .strip_prefix(&format!("{prefix}_copy_{}_", n.name))
                        .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()))
            });
            if let Some(node) = node {
                by_roident.insert(*id, node.name.clone());
            }
        }
        let ranks = config
            .nodes
            .iter()
            .map(|n| (n.name.clone(), config.node_rank(&n.name)))
            .collect();
        Writers {
            by_roident,
            ranks,
            target: target.to_string(),
        }
    }

    /// The node that wrote a version with origin id `roident` (`None`/0/unknown: the target).
    pub fn node(&self, roident: Option<i64>) -> &str {
        roident
            .and_then(|id| self.by_roident.get(&id))
            .map_or(self.target.as_str(), String::as_str)
    }

    /// The rank of the node that wrote a version with origin id `roident`.
    pub fn rank_of(&self, roident: Option<i64>) -> usize {
        self.rank(self.node(roident))
    }

    /// A node's rank (0 = highest priority).
    pub fn rank(&self, node: &str) -> usize {
        self.ranks.get(node).copied().unwrap_or(usize::MAX)
    }

    /// `CASE {ro} WHEN <origin id> THEN <rank> ... ELSE <target's rank> END`: a row
    /// version's writer rank computed in SQL from its origin id (`{ro}` is replaced by the
    /// column holding it).
    pub fn rank_case_sql(&self) -> String {
        let mut ids: Vec<(&i64, &String)> = self.by_roident.iter().collect();
        ids.sort();
        let arms: String = ids
            .iter()
            .map(|(id, node)| format!(" WHEN {id} THEN {}", self.rank(node)))
            .collect();
        format!("(CASE {{ro}}{arms} ELSE {} END)", self.rank(&self.target))
    }

    /// `CASE {ro} WHEN <origin id> THEN '<node>' ... ELSE '<target>' END`: the name of the
    /// node that wrote a row version, computed in SQL from its origin id (as [`Writers::node`]).
    pub fn writer_case_sql(&self) -> String {
        let mut ids: Vec<(&i64, &String)> = self.by_roident.iter().collect();
        ids.sort();
        let arms: String = ids
            .iter()
            .map(|(id, node)| format!(" WHEN {id} THEN {}", crate::catalog::quote_literal(node)))
            .collect();
        format!(
            "(CASE {{ro}}{arms} ELSE {} END)",
            crate::catalog::quote_literal(&self.target)
        )
    }

    /// Origin ids whose row versions a change from `source` may overwrite without a conflict
    /// check, as a PostgreSQL `oid[]` literal: the source's own, and under `node_priority`
    /// those of every node the source outranks (0 when that includes the target).
    pub fn overwritable(&self, policy: ConflictPolicy, source: &str) -> String {
        let source_rank = self.rank(source);
        let mut ids: Vec<i64> = self
            .by_roident
            .iter()
            .filter(|(_, node)| {
                node.as_str() == source
                    || (policy == ConflictPolicy::NodePriority && self.rank(node) > source_rank)
            })
            .map(|(id, _)| *id)
            .collect();
        if policy == ConflictPolicy::NodePriority && self.rank(&self.target) > source_rank {
            ids.push(0);
        }
        ids.sort_unstable();
        format!(
            "{{{}}}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}
