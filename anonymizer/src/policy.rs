//! Column policies: how every column of a dataset may be used.
//!
//! A policy file (TOML) names the privacy unit, the contribution bounds, and classifies every
//! column of every table:
//!
//! ```toml
//! privacy_unit = "patient_id"
//! max_rows_per_unit = 10          # rows a patient may contribute to a query (the default)
//!
//! [tables.patients]
//! max_rows_per_unit = 1           # this table's own bound
//!
//! [tables.visits]
//! max_groups_per_unit = 3         # groups a patient's rows may fall in (L0)
//! max_rows_per_group = 2          # rows a patient may add to one group (L-infinity)
//!
//! [tables.visits.columns]
//! patient_id  = { class = "privacy_unit" }
//! name        = { class = "direct_identifier" }
//! zip         = { class = "quasi_identifier", generalize = "zip3" }
//! hba1c       = { class = "sensitive", bounds = [4.0, 14.0] }
//! diagnosis   = { class = "public", domain = ["E11", "I10"] }
//! sex         = { class = "public", domain = ["F", "M"], per_unit = true }
//! code        = { class = "public" }
//! value       = { class = "sensitive", bounds_by = "code", key_bounds = { "4548-4" = [4.0, 14.0] } }
//! ```
//!
//! Every bound is enforced on the data, never assumed: a table's rows per unit when it is
//! loaded, a join's rows, groups and rows per group by each query (see the engine). Direct
//! identifiers are never readable. Sums and averages need `bounds` (values are clamped
//! to them), or bounds that depend on another column of the row (`bounds_by`, for
//! entity-attribute-value tables: each row's value is clamped to its code's bounds, a row
//! whose code has none is left out). A `domain` makes a column's GROUP BY keys public: every key is released, empty
//! ones too, and no partition selection is needed. `per_unit` says the column holds one value
//! per patient: keys over such columns alone put a patient in one group (checked at
//! registration, enforced by every query). `generalize` (quasi-identifiers only) says
//! how extracts release the column (see [`crate::safe_harbor::Rule::parse`]). The README has
//! the full file format.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a column may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnClass {
    /// The privacy-unit id (a patient). Usable as a join key and in `COUNT(DISTINCT …)`.
    PrivacyUnit,
    /// Names, SSNs, record numbers, contact details: never readable.
    DirectIdentifier,
    /// Attributes that could single a patient out in combination (generalized in extracts).
    QuasiIdentifier,
    /// A sensitive measurement (lab values, diagnoses).
    Sensitive,
    /// Public attributes.
    Public,
}

/// A public set of values: the GROUP BY keys released for the column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Domain {
    /// Text keys.
    Text(Vec<String>),
    /// Integer keys.
    Int(Vec<i64>),
}

impl Domain {
    /// The keys as text (integers in decimal), in the policy's order.
    pub fn as_text(&self) -> Vec<String> {
        match self {
            Domain::Text(v) => v.clone(),
            Domain::Int(v) => v.iter().map(i64::to_string).collect(),
        }
    }

    /// How many keys it lists.
    pub fn len(&self) -> usize {
        match self {
            Domain::Text(v) => v.len(),
            Domain::Int(v) => v.len(),
        }
    }

    /// Whether it lists none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One column's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnPolicy {
    /// Its class.
    pub class: ColumnClass,
    /// Clamping bounds for aggregates (`[lower, upper]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<[f64; 2]>,
    /// Public key domain for GROUP BY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<Domain>,
    /// How extracts generalize it (see the de-identification module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generalize: Option<String>,
    /// The column of the same table whose value selects this column's bounds
    /// (with `key_bounds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds_by: Option<String>,
    /// Clamping bounds per value of the `bounds_by` column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_bounds: Option<BTreeMap<String, [f64; 2]>>,
    /// For a date or timestamp column: the years its values fall in (`[first, last]`, public),
    /// the key domain of `EXTRACT(YEAR FROM column)`. Rows of other years are in no released
    /// group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub years: Option<[i32; 2]>,
    /// The column holds one value per unit (a patient's sex or birth year, repeated on each of
    /// its rows): a GROUP BY over such columns alone puts each patient in one group, so its
    /// queries are calibrated to one group per patient. Registration checks it on the data;
    /// the engine enforces it on every query like any groups bound (a patient's rows past its
    /// first group are dropped), so a wrong declaration loses rows, never privacy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_unit: bool,
}

impl ColumnPolicy {
    /// A column of this class with nothing else declared.
    pub fn of(class: ColumnClass) -> ColumnPolicy {
        ColumnPolicy {
            class,
            bounds: None,
            domain: None,
            generalize: None,
            bounds_by: None,
            key_bounds: None,
            years: None,
            per_unit: false,
        }
    }
}

/// A table's policy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablePolicy {
    /// Rows one unit may contribute from this table (default: the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_unit: Option<u32>,
    /// Groups one unit's rows may fall in (default: the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u32>,
    /// Rows one unit may add to one group (default: the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_group: Option<u32>,
    /// Every column by name.
    pub columns: BTreeMap<String, ColumnPolicy>,
}

/// What one unit (a patient) may contribute to one query, each enforced on the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Rows in all (`k`).
    pub rows: u32,
    /// Groups its rows fall in (`g`, at most `k`).
    pub groups: u32,
    /// Rows in any one group (`c`, at most `k`).
    pub rows_per_group: u32,
}

impl Bounds {
    /// How many rows one unit can add to or remove from the vector of groups, in L1: `c` with
    /// one group, else `min(k, g·c)`.
    pub fn rows_l1(&self, grouped: bool) -> u64 {
        let c = u64::from(self.rows_per_group);
        if grouped {
            (u64::from(self.groups) * c).min(u64::from(self.rows))
        } else {
            c
        }
    }
}

/// A dataset's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The column holding the privacy-unit id in every table.
    pub privacy_unit: String,
    /// Rows one unit may contribute to a query from a table (the default of every table).
    pub max_rows_per_unit: u32,
    /// Groups one unit may contribute to (defaults to `max_rows_per_unit`, which always
    /// holds since each row is in one group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u32>,
    /// Rows one unit may add to one group (defaults to `max_rows_per_unit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_group: Option<u32>,
    /// Tables by name.
    pub tables: BTreeMap<String, TablePolicy>,
}

impl Policy {
    /// Parses and checks a TOML policy. Syntax errors and wrong fields name the line and
    /// column; inconsistencies name the table and column.
    pub fn from_toml(text: &str) -> Result<Policy> {
        let p: Policy = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            });
            Error::Policy(format!(
                "{}{}",
                at.unwrap_or_default(),
                e.message().trim_end()
            ))
        })?;
        p.check()?;
        Ok(p)
    }

    /// The policy as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("policies serialize")
    }

    /// Internal consistency: bounds ordered and finite, the privacy unit classified as such
    /// in every table, contribution bounds positive.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Policy(m));
        if self.max_rows_per_unit == 0 {
            return bad("max_rows_per_unit must be at least 1".into());
        }
        if self.max_groups_per_unit == Some(0) {
            return bad("max_groups_per_unit must be at least 1".into());
        }
        if self.max_rows_per_group == Some(0) {
            return bad("max_rows_per_group must be at least 1".into());
        }
        if self.tables.is_empty() {
            return bad("the policy lists no table".into());
        }
        let more_groups = |g: Option<u32>, rows: u32| g.is_some_and(|g| g > rows);
        if more_groups(self.max_groups_per_unit, self.max_rows_per_unit) {
            return bad(
                "max_groups_per_unit exceeds max_rows_per_unit (a unit's rows fill at most that \
                 many groups)"
                    .into(),
            );
        }
        for (t, tp) in &self.tables {
            for (name, v) in [
                ("max_rows_per_unit", tp.max_rows_per_unit),
                ("max_groups_per_unit", tp.max_groups_per_unit),
                ("max_rows_per_group", tp.max_rows_per_group),
            ] {
                if v == Some(0) {
                    return bad(format!("table {t}: {name} must be at least 1"));
                }
            }
            let rows = tp.max_rows_per_unit.unwrap_or(self.max_rows_per_unit);
            if more_groups(tp.max_groups_per_unit, rows) {
                return bad(format!(
                    "table {t}: max_groups_per_unit exceeds its max_rows_per_unit ({rows})"
                ));
            }
            for (c, cp) in &tp.columns {
                if cp.generalize.is_some() && cp.class != ColumnClass::QuasiIdentifier {
                    return bad(format!(
                        "table {t}, column {c}: only quasi-identifiers have a generalization"
                    ));
                }
                if let Err(m) = crate::safe_harbor::Rule::parse(cp.generalize.as_deref()) {
                    return bad(format!("table {t}, column {c}: {m}"));
                }
            }
            match tp.columns.get(&self.privacy_unit) {
                Some(c) if c.class == ColumnClass::PrivacyUnit => {}
                _ => {
                    return bad(format!(
                        "table {t}: column {} must be classified privacy_unit",
                        self.privacy_unit
                    ));
                }
            }
            for (c, cp) in &tp.columns {
                if cp.class == ColumnClass::PrivacyUnit && *c != self.privacy_unit {
                    return bad(format!(
                        "table {t}: only {} is the privacy unit",
                        self.privacy_unit
                    ));
                }
                if let Some([lo, hi]) = cp.years
                    && !(lo <= hi && i64::from(hi) - i64::from(lo) < 1000)
                {
                    return bad(format!(
                        "table {t}, column {c}: years must be [first, last] with first <= last, \
                         fewer than 1,000"
                    ));
                }
                if cp.years.is_some()
                    && matches!(
                        cp.class,
                        ColumnClass::DirectIdentifier | ColumnClass::PrivacyUnit
                    )
                {
                    return bad(format!(
                        "table {t}, column {c}: only a readable date column has years"
                    ));
                }
                if cp.per_unit
                    && matches!(
                        cp.class,
                        ColumnClass::DirectIdentifier | ColumnClass::PrivacyUnit
                    )
                {
                    return bad(format!(
                        "table {t}, column {c}: only a readable column is per_unit (the unit \
                         itself is one group per unit already)"
                    ));
                }
                if let Some([lo, hi]) = cp.bounds
                    && !(lo.is_finite() && hi.is_finite() && lo <= hi)
                {
                    return bad(format!(
                        "table {t}, column {c}: bounds must be finite, lower <= upper"
                    ));
                }
                if cp.class == ColumnClass::DirectIdentifier
                    && (cp.bounds.is_some() || cp.domain.is_some() || cp.bounds_by.is_some())
                {
                    return bad(format!(
                        "table {t}, column {c}: a direct identifier has no bounds or domain"
                    ));
                }
                if let Some(d) = &cp.domain {
                    if d.is_empty() {
                        return bad(format!(
                            "table {t}, column {c}: the domain lists no value (leave it out for \
                             a column without a public domain)"
                        ));
                    }
                    let values = d.as_text();
                    let distinct: std::collections::BTreeSet<&String> = values.iter().collect();
                    if distinct.len() != values.len() {
                        return bad(format!(
                            "table {t}, column {c}: the domain lists a value twice"
                        ));
                    }
                    if values.iter().any(|v| v.chars().any(char::is_control)) {
                        return bad(format!(
                            "table {t}, column {c}: a domain value holds a control character"
                        ));
                    }
                }
                match (&cp.bounds_by, &cp.key_bounds) {
                    (None, None) => {}
                    (Some(key), Some(per_key)) => {
                        if cp.bounds.is_some() {
                            return bad(format!(
                                "table {t}, column {c}: give bounds or bounds_by, not both"
                            ));
                        }
                        match tp.columns.get(key) {
                            Some(k)
                                if !matches!(
                                    k.class,
                                    ColumnClass::DirectIdentifier | ColumnClass::PrivacyUnit
                                ) && key != c => {}
                            Some(_) => {
                                return bad(format!(
                                    "table {t}, column {c}: bounds_by {key} must be a readable \
                                     column other than {c} (not an identifier or the unit)"
                                ));
                            }
                            None => {
                                return bad(format!(
                                    "table {t}, column {c}: bounds_by names unknown column {key}"
                                ));
                            }
                        }
                        if per_key.is_empty() {
                            return bad(format!(
                                "table {t}, column {c}: key_bounds lists no {key}"
                            ));
                        }
                        for (v, [lo, hi]) in per_key {
                            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                                return bad(format!(
                                    "table {t}, column {c}, {key} {v:?}: bounds must be finite, \
                                     lower <= upper"
                                ));
                            }
                        }
                    }
                    _ => {
                        return bad(format!(
                            "table {t}, column {c}: bounds_by and key_bounds go together"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The bounds of one table: its own, else the policy's; `g` and `c` at most `k`.
    pub fn table_bounds(&self, table: &str) -> Bounds {
        let tp = self.tables.get(table);
        let rows = tp
            .and_then(|t| t.max_rows_per_unit)
            .unwrap_or(self.max_rows_per_unit);
        let groups = tp
            .and_then(|t| t.max_groups_per_unit)
            .or(self.max_groups_per_unit)
            .unwrap_or(rows)
            .min(rows);
        let rows_per_group = tp
            .and_then(|t| t.max_rows_per_group)
            .or(self.max_rows_per_group)
            .unwrap_or(rows)
            .min(rows);
        Bounds {
            rows,
            groups,
            rows_per_group,
        }
    }

    /// The bounds of a query reading `tables` (joined on the unit when more than one): one
    /// table's own; for a join, its rows per unit at most the largest table bound (and never
    /// more than the product of the tables' bounds, which the join cannot exceed), its groups
    /// and rows per group the largest of the tables', within that.
    pub fn query_bounds(&self, tables: &[String]) -> Bounds {
        let each: Vec<Bounds> = tables.iter().map(|t| self.table_bounds(t)).collect();
        match each.as_slice() {
            [] => self.table_bounds(""),
            [one] => *one,
            many => {
                let rows = many
                    .iter()
                    .map(|b| b.rows)
                    .max()
                    .unwrap_or(1)
                    .min(self.join_rows_per_unit(tables).min(u64::from(u32::MAX)) as u32);
                Bounds {
                    rows,
                    groups: many.iter().map(|b| b.groups).max().unwrap_or(1).min(rows),
                    rows_per_group: many
                        .iter()
                        .map(|b| b.rows_per_group)
                        .max()
                        .unwrap_or(1)
                        .min(rows),
                }
            }
        }
    }

    /// The most rows one unit can have in the join of `tables` before it is bounded again:
    /// the product of the tables' bounds (saturating).
    pub fn join_rows_per_unit(&self, tables: &[String]) -> u64 {
        tables.iter().fold(1u64, |p, t| {
            p.saturating_mul(u64::from(self.table_bounds(t).rows))
        })
    }

    /// The policy of `table.column`, if classified.
    pub fn column(&self, table: &str, column: &str) -> Option<&ColumnPolicy> {
        self.tables.get(table)?.columns.get(column)
    }

    /// Checks that every column of a table's schema is classified, naming the first that is
    /// not (registration refuses such a dataset).
    pub fn check_schema(&self, table: &str, schema: &arrow::datatypes::Schema) -> Result<()> {
        let tp = self
            .tables
            .get(table)
            .ok_or_else(|| Error::Policy(format!("table {table} has no policy")))?;
        for f in schema.fields() {
            if !tp.columns.contains_key(f.name()) {
                return Err(Error::Policy(format!(
                    "table {table}: column {} is not classified",
                    f.name()
                )));
            }
        }
        for (c, cp) in &tp.columns {
            let Ok(f) = schema.field_with_name(c) else {
                return Err(Error::Policy(format!(
                    "table {table}: the policy names unknown column {c}"
                )));
            };
            crate::safe_harbor::Rule::for_column(c, cp, f.data_type())
                .map_err(|e| Error::Policy(format!("table {table}: {e}")))?;
            if let Some(domain) = &cp.domain {
                // Released keys are the domain's values cast to the column's type: each must
                // be one (the domain is the policy's, public, so it may be quoted).
                let keys: arrow::array::ArrayRef =
                    std::sync::Arc::new(arrow::array::StringArray::from(domain.as_text()));
                let strict = arrow::compute::CastOptions {
                    safe: false,
                    ..Default::default()
                };
                let cast = arrow::compute::cast_with_options(&keys, f.data_type(), &strict)
                    .map_err(|e| {
                        Error::Policy(format!(
                            "table {table}: column {c} is {}, and its domain does not fit it ({e})",
                            f.data_type()
                        ))
                    })?;
                // A released key is found by its value as the engine prints it: a domain value
                // must be written so (`1.5`, not `1.50`), and a number must be finite (NaNs of
                // either sign print alike but group apart).
                for (i, text) in domain.as_text().iter().enumerate() {
                    let v = datafusion::scalar::ScalarValue::try_from_array(&cast, i)
                        .map_err(|e| Error::Policy(format!("table {table}, column {c}: {e}")))?;
                    let finite = match &v {
                        datafusion::scalar::ScalarValue::Float64(Some(x)) => x.is_finite(),
                        datafusion::scalar::ScalarValue::Float32(Some(x)) => x.is_finite(),
                        datafusion::scalar::ScalarValue::Float16(Some(x)) => x.is_finite(),
                        _ => true,
                    };
                    if !finite {
                        return Err(Error::Policy(format!(
                            "table {table}, column {c}: the domain lists {text:?}, which is not a \
                             finite number; list finite values only"
                        )));
                    }
                    let printed = v.to_string();
                    if printed != *text {
                        return Err(Error::Policy(format!(
                            "table {table}, column {c}: the domain lists {text:?}, which the \
                             column's type reads as {printed:?}; write it so"
                        )));
                    }
                }
            }
            if cp.years.is_some()
                && !matches!(
                    f.data_type(),
                    arrow::datatypes::DataType::Date32
                        | arrow::datatypes::DataType::Date64
                        | arrow::datatypes::DataType::Timestamp(_, _)
                )
            {
                return Err(Error::Policy(format!(
                    "table {table}: column {c} has years but is {}, not a date or timestamp",
                    f.data_type()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 10

[tables.visits.columns]
patient_id = { class = "privacy_unit" }
name = { class = "direct_identifier" }
hba1c = { class = "sensitive", bounds = [4.0, 14.0] }
diagnosis = { class = "public", domain = ["E11", "I10"] }
site_no = { class = "public", domain = [1, 2, 3] }
"#;

    #[test]
    fn a_good_policy_parses_and_round_trips() {
        let p = Policy::from_toml(GOOD).unwrap();
        assert_eq!(
            p.table_bounds("visits"),
            Bounds {
                rows: 10,
                groups: 10,
                rows_per_group: 10
            }
        );
        assert_eq!(
            p.column("visits", "hba1c").unwrap().bounds,
            Some([4.0, 14.0])
        );
        assert_eq!(
            p.column("visits", "site_no").unwrap().domain,
            Some(Domain::Int(vec![1, 2, 3]))
        );
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
    }

    #[test]
    fn the_readme_policy_is_a_valid_policy() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n# The column that identifies a patient")
            .expect("the README shows a policy");
        let body = &readme[start + "```toml\n".len()..];
        let p = Policy::from_toml(&body[..body.find("```").unwrap()]).unwrap();
        assert_eq!(p.table_bounds("patients").rows, 1);
        assert_eq!(p.table_bounds("visits").rows_per_group, 3);
        assert!(p.column("labs", "value").unwrap().key_bounds.is_some());
    }

    #[test]
    fn tables_have_their_own_bounds_and_joins_take_the_largest() {
        let p = Policy::from_toml(&format!(
            "{GOOD}\n[tables.patients]\nmax_rows_per_unit = 1\n\
             [tables.patients.columns]\npatient_id = {{ class = \"privacy_unit\" }}\n\
             [tables.labs]\nmax_rows_per_unit = 40\nmax_groups_per_unit = 4\nmax_rows_per_group = 3\n\
             [tables.labs.columns]\npatient_id = {{ class = \"privacy_unit\" }}\n"
        ))
        .unwrap();
        let b = |rows, groups, rows_per_group| Bounds {
            rows,
            groups,
            rows_per_group,
        };
        assert_eq!(p.table_bounds("patients"), b(1, 1, 1));
        assert_eq!(p.table_bounds("visits"), b(10, 10, 10));
        assert_eq!(p.table_bounds("labs"), b(40, 4, 3));
        let q = |t: &[&str]| p.query_bounds(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // A patient's one row joined to their visits: at most 10 joined rows.
        assert_eq!(q(&["patients", "visits"]), b(10, 10, 10));
        assert_eq!(q(&["patients", "patients"]), b(1, 1, 1));
        assert_eq!(q(&["visits", "labs"]), b(40, 10, 10));
        assert_eq!(p.join_rows_per_unit(&["visits".into(), "labs".into()]), 400);
        assert_eq!(b(40, 4, 3).rows_l1(true), 12);
        assert_eq!(b(10, 4, 3).rows_l1(true), 10);
        assert_eq!(b(10, 4, 3).rows_l1(false), 3);
        assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p);
    }

    #[test]
    fn bad_policies_name_the_problem() {
        for (edit, needle) in [
            (
                GOOD.replace("max_rows_per_unit = 10", "max_rows_per_unit = 0"),
                "at least 1",
            ),
            (GOOD.replace("[4.0, 14.0]", "[14.0, 4.0]"), "lower <= upper"),
            (
                GOOD.replace("patient_id = { class = \"privacy_unit\" }", ""),
                "privacy_unit",
            ),
            (
                GOOD.replace("\"sensitive\"", "\"secret\""),
                "unknown variant",
            ),
            (
                GOOD.replace(
                    "class = \"direct_identifier\"",
                    "class = \"direct_identifier\", bounds = [0, 1]",
                ),
                "direct identifier",
            ),
            (
                GOOD.replace(
                    "class = \"direct_identifier\"",
                    "class = \"quasi_identifier\", generalize = \"decade\"",
                ),
                "table visits, column name: unknown generalization",
            ),
            (
                GOOD.replace(
                    "\"public\", domain = [\"E11\", \"I10\"]",
                    "\"public\", generalize = \"zip3\"",
                ),
                "column diagnosis: only quasi-identifiers",
            ),
            ("not toml [".to_string(), "line 1, column"),
            (
                GOOD.replace("[\"E11\", \"I10\"]", "[\"E11\", \"I10\", \"E11\"]"),
                "column diagnosis: the domain lists a value twice",
            ),
            (
                GOOD.replace("[1, 2, 3]", "[1, 2, 1]"),
                "column site_no: the domain lists a value twice",
            ),
            (
                GOOD.replace("[\"E11\", \"I10\"]", "[]"),
                "column diagnosis: the domain lists no value",
            ),
            (
                GOOD.replace("max_rows_per_unit = 10", "max_rows_per_unit = 10\nmax_groups_per_unit = 11"),
                "max_groups_per_unit exceeds max_rows_per_unit",
            ),
            (
                GOOD.replace("[tables.visits.columns]", "[tables.visits]\nmax_rows_per_unit = 2\nmax_groups_per_unit = 3\n[tables.visits.columns]"),
                "table visits: max_groups_per_unit exceeds its max_rows_per_unit (2)",
            ),
            (
                GOOD.replace("[tables.visits.columns]", "[tables.visits]\nmax_rows_per_group = 0\n[tables.visits.columns]"),
                "table visits: max_rows_per_group must be at least 1",
            ),
            (
                GOOD.replace("bounds = [4.0, 14.0]", "bounds_by = \"diagnosis\""),
                "bounds_by and key_bounds go together",
            ),
            (
                GOOD.replace("bounds = [4.0, 14.0]", "bounds_by = \"code\", key_bounds = { E11 = [4.0, 14.0] }"),
                "bounds_by names unknown column code",
            ),
            (
                GOOD.replace("bounds = [4.0, 14.0]", "bounds_by = \"name\", key_bounds = { E11 = [4.0, 14.0] }"),
                "must be a readable column",
            ),
            (
                GOOD.replace("bounds = [4.0, 14.0]", "bounds = [4.0, 14.0], bounds_by = \"diagnosis\", key_bounds = { E11 = [4.0, 14.0] }"),
                "not both",
            ),
            (
                GOOD.replace("bounds = [4.0, 14.0]", "bounds_by = \"diagnosis\", key_bounds = { E11 = [14.0, 4.0] }"),
                "diagnosis \"E11\": bounds must be finite",
            ),
        ] {
            let e = Policy::from_toml(&edit).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn malformed_files_name_the_line_and_column() {
        for (edit, needle) in [
            (
                GOOD.replace("\"sensitive\"", "\"secret\""),
                "line 8, column 19: unknown variant `secret`",
            ),
            (
                GOOD.replace("max_rows_per_unit = 10", "max_rows_per_unit = \"ten\""),
                "line 3, column 21",
            ),
            (
                GOOD.replace("bounds = [4.0, 14.0]", "bounds = [4.0, 14.0"),
                "line 8",
            ),
            (
                GOOD.replace("name = {", "name = { colour = 1,"),
                "line 7, column 10: unknown field `colour`",
            ),
        ] {
            let e = Policy::from_toml(&edit).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn every_column_must_be_classified_and_generalizations_fit_types() {
        use arrow::datatypes::{DataType, Field, Schema};
        let p = Policy::from_toml(GOOD).unwrap();
        let field = |n: &str, t: DataType| Field::new(n, t, true);
        let cols = vec![
            field("patient_id", DataType::Int64),
            field("name", DataType::Utf8),
            field("hba1c", DataType::Float64),
            field("diagnosis", DataType::Utf8),
            field("site_no", DataType::Int64),
        ];
        p.check_schema("visits", &Schema::new(cols.clone()))
            .unwrap();
        let mut more = cols.clone();
        more.push(field("ssn", DataType::Utf8));
        let e = p.check_schema("visits", &Schema::new(more)).unwrap_err();
        assert!(
            e.to_string().contains("column ssn is not classified"),
            "{e}"
        );
        let zip = Policy::from_toml(&GOOD.replace(
            "name = { class = \"direct_identifier\" }",
            "name = { class = \"quasi_identifier\", generalize = \"age\" }",
        ))
        .unwrap();
        let e = zip.check_schema("visits", &Schema::new(cols)).unwrap_err();
        assert!(
            e.to_string().contains("column name: generalization age"),
            "{e}"
        );
    }
}
