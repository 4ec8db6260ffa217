//! SQL text for `verify`: content hashes over a key range, bucket hashes for bisection, key
//! quantiles and per-key hashes. Pure string building; every value is a `$n` text parameter
//! cast to the key column's type, every identifier is quoted.
//!
//! A row's hash is computed from its text form, `ROW(c1, c2, ...)::text`, with the columns
//! in one fixed order on every node, so it does not depend on physical column order, dropped
//! columns or storage. Two independent 64-bit hashes (`hashtextextended` with two seeds) are
//! summed over the rows as exact `numeric`; the sum does not depend on row order.

use crate::catalog::quote_ident;

/// Seeds of the two row hashes. Any two distinct values work; they must never change, or
/// nodes running different walbridge versions would disagree.
pub const SEEDS: [i64; 2] = [0x5bd1_e995_1b87_3593, 0x2545_f491_4f6c_dd1d];

/// One column of the key that orders and splits a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyColumn {
    /// Raw column name.
    pub name: String,
    /// `format_type` of the column, for casting text parameters.
    pub type_sql: String,
}

/// What one table's statements need: the relation, the compared columns and the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSql {
    /// `ONLY "s"."t"` for an ordinary table, `"s"."t"` for a partitioned root (its rows are
    /// in the partitions).
    pub from: String,
    /// Compared columns, raw names, in the order hashed.
    pub columns: Vec<String>,
    /// Key columns (primary key or replica identity index), empty when the table has none.
    pub key: Vec<KeyColumn>,
}

/// A half-open key range `[lower, upper)`; `None` is unbounded. Bounds are key values as
/// text, one per key column.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRange {
    /// Inclusive lower bound.
    pub lower: Option<Vec<String>>,
    /// Exclusive upper bound.
    pub upper: Option<Vec<String>>,
}

/// A statement and its text parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// SQL text.
    pub sql: String,
    /// Values of `$1..$n`, all text.
    pub params: Vec<String>,
}

impl TableSql {
    /// `ROW("a", "b")::text COLLATE "C"`: the row's canonical text.
    fn row_text(&self) -> String {
        let cols = self
            .columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        // ROW() of no columns is legal and hashes every row alike: the count still compares.
        format!("ROW({cols})::text COLLATE \"C\"")
    }

    /// The key columns, quoted, each wrapped in `prefix` / `suffix`, comma-separated
    /// (`s."k1"::text, s."k2"::text`).
    fn key_list(&self, prefix: &str, suffix: &str) -> String {
        self.key
            .iter()
            .map(|k| format!("{prefix}{}{suffix}", quote_ident(&k.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `("k1", "k2")`.
    fn key_tuple(&self) -> String {
        format!("({})", self.key_list("", ""))
    }

    /// `($n::text::type1, $n+1::text::type2)`, pushing `values` as parameters.
    fn bound_tuple(&self, values: &[String], params: &mut Vec<String>) -> String {
        let parts = self
            .key
            .iter()
            .zip(values)
            .map(|(k, v)| {
                params.push(v.clone());
                format!("${}::text::{}", params.len(), k.type_sql)
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("({parts})")
    }

    /// The `WHERE` condition selecting `range`.
    fn range_condition(&self, range: &KeyRange, params: &mut Vec<String>) -> String {
        let mut parts = Vec::new();
        if let Some(lower) = &range.lower {
            parts.push(format!(
                "{} >= {}",
                self.key_tuple(),
                self.bound_tuple(lower, params)
            ));
        }
        if let Some(upper) = &range.upper {
            parts.push(format!(
                "{} < {}",
                self.key_tuple(),
                self.bound_tuple(upper, params)
            ));
        }
        if parts.is_empty() {
            "TRUE".to_string()
        } else {
            parts.join(" AND ")
        }
    }

    /// The two hash sums over a set of row texts `r`, as exact decimal text.
    fn sums() -> String {
        format!(
            "coalesce(sum(pg_catalog.hashtextextended(s.\"walbridge row\", {a})), 0)::text, \
             coalesce(sum(pg_catalog.hashtextextended(s.\"walbridge row\", {b})), 0)::text",
            a = SEEDS[0],
            b = SEEDS[1]
        )
    }

    /// One row: `count`, `sum1`, `sum2` over the rows in `range`.
    pub fn summary(&self, range: &KeyRange) -> Statement {
        let mut params = Vec::new();
        let cond = if self.key.is_empty() {
            "TRUE".to_string()
        } else {
            self.range_condition(range, &mut params)
        };
        Statement {
            sql: format!(
                "SELECT count(*), {sums} FROM (SELECT {row} AS \"walbridge row\" FROM {from} \
                 WHERE {cond}) s",
                sums = Self::sums(),
                row = self.row_text(),
                from = self.from,
            ),
            params,
        }
    }

    /// Rows `(bucket, count, sum1, sum2)` for the rows of `range` split at `boundaries`
    /// (ascending): bucket `i` holds keys in `[boundaries[i-1], boundaries[i])`, bucket 0 those
    /// below the first boundary, bucket `boundaries.len()` those from the last one on. Empty
    /// buckets are absent. (`OFFSET 0` keeps the subquery whole, so the planner hashes the few
    /// buckets instead of sorting every row text by bucket: twice as fast on 1M rows.)
    pub fn buckets(&self, range: &KeyRange, boundaries: &[Vec<String>]) -> Statement {
        let mut params = Vec::new();
        let mut case = String::from("CASE");
        for (i, b) in boundaries.iter().enumerate() {
            let bound = self.bound_tuple(b, &mut params);
            case.push_str(&format!(" WHEN {} < {bound} THEN {i}", self.key_tuple()));
        }
        case.push_str(&format!(" ELSE {} END", boundaries.len()));
        let cond = self.range_condition(range, &mut params);
        Statement {
            sql: format!(
                "SELECT s.\"walbridge bucket\", count(*), {sums} FROM (SELECT {case} AS \
                 \"walbridge bucket\", {row} AS \"walbridge row\" FROM {from} WHERE {cond} \
                 OFFSET 0) s GROUP BY 1 ORDER BY 1",
                sums = Self::sums(),
                row = self.row_text(),
                from = self.from,
            ),
            params,
        }
    }

    /// The keys (as text, one column per key column) at every `step`-th row of `range` in
    /// key order: boundaries splitting the range into pieces of `step` rows.
    pub fn quantiles(&self, range: &KeyRange, step: i64) -> Statement {
        let mut params = Vec::new();
        let cond = self.range_condition(range, &mut params);
        params.push(step.to_string());
        let step_param = params.len();
        let key_cols = self.key_list("", "");
        let key_text = self.key_list("s.", "::text");
        Statement {
            sql: format!(
                "SELECT {key_text} FROM (SELECT {key_cols}, row_number() OVER (ORDER BY \
                 {key_cols}) AS \"walbridge rn\" FROM {from} WHERE {cond}) s \
                 WHERE s.\"walbridge rn\" % ${step_param}::text::int8 = 0 \
                 ORDER BY s.\"walbridge rn\"",
                from = self.from,
            ),
            params,
        }
    }

    /// Every row of `range`: its key columns as text, then its two hashes as text.
    pub fn row_hashes(&self, range: &KeyRange) -> Statement {
        let mut params = Vec::new();
        let cond = self.range_condition(range, &mut params);
        let key_cols = self.key_list("", "");
        let key_text = self.key_list("s.", "::text");
        let key_order = self.key_list("s.", "");
        Statement {
            sql: format!(
                "SELECT {key_text}, \
                 pg_catalog.hashtextextended(s.\"walbridge row\", {a})::text, \
                 pg_catalog.hashtextextended(s.\"walbridge row\", {b})::text \
                 FROM (SELECT {key_cols}, {row} AS \"walbridge row\" FROM {from} WHERE {cond}) s \
                 ORDER BY {key_order}",
                a = SEEDS[0],
                b = SEEDS[1],
                row = self.row_text(),
                from = self.from,
            ),
            params,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(key: &[(&str, &str)]) -> TableSql {
        TableSql {
            from: "ONLY \"public\".\"t\"".into(),
            columns: vec!["id".into(), "Name".into()],
            key: key
                .iter()
                .map(|(n, t)| KeyColumn {
                    name: n.to_string(),
                    type_sql: t.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn summary_of_everything_needs_no_parameters() {
        let s = table(&[("id", "integer")]).summary(&KeyRange::default());
        assert!(s.params.is_empty());
        assert!(
            s.sql.contains("ROW(\"id\", \"Name\")::text COLLATE \"C\""),
            "{}",
            s.sql
        );
        assert!(
            s.sql.contains("FROM ONLY \"public\".\"t\" WHERE TRUE"),
            "{}",
            s.sql
        );
    }

    #[test]
    fn ranges_are_half_open_row_comparisons_with_cast_parameters() {
        let t = table(&[("a", "integer"), ("b b", "character varying(5)")]);
        let s = t.summary(&KeyRange {
            lower: Some(vec!["1".into(), "x".into()]),
            upper: Some(vec!["2".into(), "y".into()]),
        });
        assert!(
            s.sql.contains(
                "(\"a\", \"b b\") >= ($1::text::integer, $2::text::character varying(5)) AND \
                 (\"a\", \"b b\") < ($3::text::integer, $4::text::character varying(5))"
            ),
            "{}",
            s.sql
        );
        assert_eq!(s.params, ["1", "x", "2", "y"]);
    }

    #[test]
    fn buckets_number_parameters_after_the_boundaries() {
        let t = table(&[("id", "bigint")]);
        let s = t.buckets(
            &KeyRange {
                lower: Some(vec!["0".into()]),
                upper: None,
            },
            &[vec!["10".into()], vec!["20".into()]],
        );
        assert!(
            s.sql.contains(
                "CASE WHEN (\"id\") < ($1::text::bigint) THEN 0 WHEN (\"id\") < \
                 ($2::text::bigint) THEN 1 ELSE 2 END"
            ),
            "{}",
            s.sql
        );
        assert!(
            s.sql.contains("(\"id\") >= ($3::text::bigint)"),
            "{}",
            s.sql
        );
        assert_eq!(s.params, ["10", "20", "0"]);
    }

    #[test]
    fn quantiles_take_every_step_th_key() {
        let s = table(&[("id", "integer")]).quantiles(
            &KeyRange {
                lower: None,
                upper: Some(vec!["5".into()]),
            },
            1000,
        );
        assert!(s.sql.contains("% $2::text::int8 = 0"), "{}", s.sql);
        assert_eq!(s.params, ["5", "1000"]);
    }

    #[test]
    fn hostile_names_stay_quoted() {
        let t = TableSql {
            from: "ONLY \"s\".\"t\"".into(),
            columns: vec!["x\"); DROP TABLE t; --".into()],
            key: vec![KeyColumn {
                name: "k\"".into(),
                type_sql: "text".into(),
            }],
        };
        let s = t.row_hashes(&KeyRange::default());
        assert!(s.sql.contains("\"x\"\"); DROP TABLE t; --\""), "{}", s.sql);
        assert!(s.sql.contains("s.\"k\"\"\"::text"), "{}", s.sql);
    }
}
