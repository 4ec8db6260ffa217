//! The change-table cursor of one direction S → T: how far T has applied S's change table,
//! recorded on T with the data, and what may then be deleted at S.
//!
//! See the module docs of [`crate::trigger`] for why the position is `(last_id, hold_xid)`
//! plus a small set of ids rather than a single id. The cursor is trigger mode's
//! [`crate::apply::position`]: [`recorded_progress`] gives the rows that record it in the
//! applying transaction, and [`delete_applied`] is what follows T's commit (stream mode
//! confirms an LSN to its slot there).

use std::collections::BTreeMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::config::QualifiedName;

/// The advisory lock class that serialises deletions from one change table (the table's OID
/// is the second key), so the last peer to apply a row sees the others' progress.
const DELETE_LOCK_CLASS: i32 = 0x5742_4447; // "WBDG"

/// Progress of this direction, mirrored in T's `walbridge.trigger_progress` and
/// `walbridge.trigger_applied`.
///
/// Invariant: every row of S's change table with `id <= last_id` that was visible at the last
/// read has been applied (or dead-lettered); a row with `id <= last_id` that was not visible
/// then belongs to a transaction `>= hold` (one still running at that read), and such rows
/// already applied are in `late`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Highest id applied.
    pub last_id: i64,
    /// `pg_snapshot_xmin` of the read that set `last_id`.
    pub hold: u64,
    /// Ids applied whose transaction is `>= hold`, with that transaction.
    pub late: BTreeMap<i64, u64>,
}

impl State {
    /// After applying `handled` (id, txid) read with snapshot xmin `snapshot_hold`: the new
    /// state, and the ids that left `late` (now covered by `last_id`/`hold`).
    pub fn advance(
        &self,
        handled: &[(i64, Option<u64>)],
        snapshot_hold: u64,
        keep_hold: bool,
    ) -> (State, Vec<i64>) {
        // Rows not visible in the snapshot belong to transactions >= its xmin, so the new
        // xmin is the new horizon; a cut batch left visible rows unread and keeps the old one.
        let hold = if keep_hold { self.hold } else { snapshot_hold };
        let last_id = handled
            .iter()
            .map(|(id, _)| *id)
            .fold(self.last_id, i64::max);
        let mut late = BTreeMap::new();
        let mut left = Vec::new();
        for (id, txid) in self
            .late
            .iter()
            .map(|(i, t)| (*i, Some(*t)))
            .chain(handled.iter().copied())
        {
            match txid {
                Some(t) if t >= hold => {
                    late.insert(id, t);
                }
                _ => {
                    if self.late.contains_key(&id) {
                        left.push(id);
                    }
                }
            }
        }
        (
            State {
                last_id,
                hold,
                late,
            },
            left,
        )
    }
}

/// This direction's progress as recorded on the target.
pub(super) async fn load_state(
    client: &Client,
    source: &str,
) -> Result<State, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT last_id, hold_xid::text FROM walbridge.trigger_progress WHERE source = $1",
            &[&source],
        )
        .await?;
    let Some(row) = row else {
        return Ok(State::default());
    };
    let hold: String = row.get(1);
    let late = client
        .query(
            "SELECT id, txid::text FROM walbridge.trigger_applied WHERE source = $1",
            &[&source],
        )
        .await?
        .iter()
        .filter_map(|r| {
            let t: String = r.get(1);
            Some((r.get::<_, i64>(0), t.parse().ok()?))
        })
        .collect();
    Ok(State {
        last_id: row.get(0),
        hold: hold.parse().unwrap_or(0),
        late,
    })
}

/// `state` for `source` as the applier's progress seam records it with the data
/// ([`crate::apply::position`]): the same rows as [`record_progress`], parameters as text.
pub fn recorded_progress(source: &str, state: &State) -> crate::apply::position::Recorded {
    let list = |items: Vec<String>| format!("{{{}}}", items.join(","));
    let hold = state.hold.to_string();
    crate::apply::position::Recorded {
        statements: vec![
            (
                "INSERT INTO walbridge.trigger_progress (source, last_id, hold_xid, updated_at)
                 VALUES ($1::text, $2::text::int8, $3::text::xid8, pg_catalog.now())
                 ON CONFLICT (source) DO UPDATE
                    SET last_id = EXCLUDED.last_id, hold_xid = EXCLUDED.hold_xid,
                        updated_at = pg_catalog.now()",
                vec![
                    Some(source.to_string()),
                    Some(state.last_id.to_string()),
                    Some(hold.clone()),
                ],
            ),
            (
                "DELETE FROM walbridge.trigger_applied
                  WHERE source = $1::text AND txid < $2::text::xid8",
                vec![Some(source.to_string()), Some(hold)],
            ),
            (
                "INSERT INTO walbridge.trigger_applied (source, id, txid)
                 SELECT $1::text, u.id, u.txid::xid8
                   FROM ROWS FROM (pg_catalog.unnest($2::text::int8[]),
                                  pg_catalog.unnest($3::text::text[])) AS u(id, txid)
                 ON CONFLICT (source, id) DO NOTHING",
                vec![
                    Some(source.to_string()),
                    Some(list(state.late.keys().map(i64::to_string).collect())),
                    Some(list(state.late.values().map(u64::to_string).collect())),
                ],
            ),
        ],
    }
}

/// Writes `state` for `source` inside the apply transaction: the statements of
/// [`recorded_progress`], pipelined.
pub(super) async fn record_progress(
    txn: &tokio_postgres::Transaction<'_>,
    source: &str,
    state: &State,
) -> Result<(), tokio_postgres::Error> {
    let recorded = recorded_progress(source, state);
    let results = futures::future::join_all(recorded.statements.iter().map(|(sql, params)| {
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        async move { txn.execute(*sql, &params).await }
    }))
    .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Deletes at S the rows that every peer has applied, among `candidates` (at start,
/// `startup`: among every row up to `state.last_id`). `others` are the peers other than
/// `target`. An error names the step that failed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn delete_applied(
    client: &mut Client,
    table: &QualifiedName,
    table_oid: u32,
    state: &State,
    candidates: &[i64],
    startup: bool,
    target: &str,
    others: &[String],
) -> Result<(), (&'static str, tokio_postgres::Error)> {
    if candidates.is_empty() && !startup {
        return Ok(());
    }
    let table = table.quoted();
    let late: Vec<i64> = state.late.keys().copied().collect();
    let hold = state.hold.to_string();
    let candidates: Vec<i64> = if startup {
        Vec::new()
    } else {
        candidates.to_vec()
    };
    let err = |what: &'static str| move |e: tokio_postgres::Error| (what, e);
    // Applied here: up to last_id and visible then, or one of the late ones.
    let mine = "((c.id <= $2::int8 AND (c.txid < $3::text::xid8 OR c.txid IS NULL)) \
         OR c.id = ANY($4::int8[]))";
    let scope = if startup {
        "c.id <= $2::int8 AND cardinality($1::int8[]) = 0"
    } else {
        "c.id = ANY($1::int8[])"
    };
    if others.is_empty() {
        let sql = format!("DELETE FROM {table} AS c WHERE {scope} AND {mine}");
        client
            .execute(&sql, &[&candidates, &state.last_id, &hold, &late])
            .await
            .map_err(err("deleting applied rows from the change table"))?;
        return Ok(());
    }
    // Several peers: a row goes once every peer has applied it. Deletions from one change
    // table are serialised, so the last peer to apply a row sees the others' progress.
    let sql = format!(
        "DELETE FROM {table} AS c WHERE {scope} AND {mine} \
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest($5::text[]) AS o(name) WHERE NOT EXISTS ( \
               SELECT 1 FROM walbridge.trigger_peer_progress p \
                WHERE p.target = o.name AND c.id <= p.last_id \
                  AND (c.txid < p.hold_xid OR c.txid IS NULL)))"
    );
    let txn = client
        .transaction()
        .await
        .map_err(err("starting a transaction"))?;
    let oid = table_oid as i32;
    txn.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1, $2)",
        &[&DELETE_LOCK_CLASS, &oid],
    )
    .await
    .map_err(err("locking the change table's deletions"))?;
    txn.execute(
        "INSERT INTO walbridge.trigger_peer_progress (target, last_id, hold_xid, updated_at)
         VALUES ($1, $2, $3::text::xid8, now())
         ON CONFLICT (target) DO UPDATE
            SET last_id = EXCLUDED.last_id, hold_xid = EXCLUDED.hold_xid, updated_at = pg_catalog.now()",
        &[&target, &state.last_id, &hold],
    )
    .await
    .map_err(err("publishing progress in walbridge.trigger_peer_progress"))?;
    txn.execute(&sql, &[&candidates, &state.last_id, &hold, &late, &others])
        .await
        .map_err(err("deleting applied rows from the change table"))?;
    txn.commit().await.map_err(err("committing"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_advances_past_visible_rows_and_keeps_late_ones() {
        let s = State::default();
        // Rows 1..3 from transactions 100, 105, 101; snapshot xmin 103 (103 still running).
        let (s, left) = s.advance(
            &[(1, Some(100)), (2, Some(105)), (3, Some(101))],
            103,
            false,
        );
        assert_eq!(s.last_id, 3);
        assert_eq!(s.hold, 103);
        assert_eq!(s.late, BTreeMap::from([(2, 105)]));
        assert!(left.is_empty());
        // Next read: 103 has finished, xmin is 110; row 2's transaction is now below it.
        let (s2, left) = s.advance(&[(5, Some(108))], 110, false);
        assert_eq!(s2.last_id, 5);
        assert!(s2.late.is_empty());
        assert_eq!(left, vec![2]);
        // A cut batch keeps the old horizon.
        let (s3, _) = s.advance(&[(4, Some(104))], 110, true);
        assert_eq!(s3.hold, 103);
        assert_eq!(s3.late, BTreeMap::from([(2, 105), (4, 104)]));
    }

    #[test]
    fn legacy_rows_without_txid_are_never_late() {
        let (s, _) = State::default().advance(&[(1, None), (2, None)], 50, false);
        assert_eq!(s.last_id, 2);
        assert!(s.late.is_empty());
    }
}
