//! Column policies: how every column of a dataset may be used.
//!
//! A policy file (TOML) names the privacy unit, the contribution bounds, and classifies every
//! column of every table:
//!
//! ```toml
//! privacy_unit = "patient_id"
//! max_rows_per_unit = 10          # rows a patient may contribute to any query
//!
//! [tables.visits.columns]
//! patient_id  = { class = "privacy_unit" }
//! name        = { class = "direct_identifier" }
//! zip3        = { class = "quasi_identifier" }
//! hba1c       = { class = "sensitive", bounds = [4.0, 14.0] }
//! diagnosis   = { class = "public", domain = ["E11", "I10"] }
//! ```
//!
//! Direct identifiers are never readable. Sums and averages need `bounds` (values are clamped
//! to them). A `domain` makes a column's GROUP BY keys public: every key is released, empty
//! ones too, and no partition selection is needed.

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
}

/// A table's policy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablePolicy {
    /// Every column by name.
    pub columns: BTreeMap<String, ColumnPolicy>,
}

/// A dataset's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The column holding the privacy-unit id in every table.
    pub privacy_unit: String,
    /// Rows one unit may contribute to a query (contribution bound).
    pub max_rows_per_unit: u32,
    /// Groups one unit may contribute to (defaults to `max_rows_per_unit`, which always
    /// holds since each row is in one group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_groups_per_unit: Option<u32>,
    /// Tables by name.
    pub tables: BTreeMap<String, TablePolicy>,
}

impl Policy {
    /// Parses and checks a TOML policy.
    pub fn from_toml(text: &str) -> Result<Policy> {
        let p: Policy = toml::from_str(text).map_err(|e| Error::Policy(e.to_string()))?;
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
        if self.tables.is_empty() {
            return bad("the policy lists no table".into());
        }
        for (t, tp) in &self.tables {
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
                if let Some([lo, hi]) = cp.bounds
                    && !(lo.is_finite() && hi.is_finite() && lo <= hi)
                {
                    return bad(format!(
                        "table {t}, column {c}: bounds must be finite, lower <= upper"
                    ));
                }
                if cp.class == ColumnClass::DirectIdentifier
                    && (cp.bounds.is_some() || cp.domain.is_some())
                {
                    return bad(format!(
                        "table {t}, column {c}: a direct identifier has no bounds or domain"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The effective groups-per-unit bound.
    pub fn max_groups(&self) -> u32 {
        self.max_groups_per_unit
            .unwrap_or(self.max_rows_per_unit)
            .min(self.max_rows_per_unit)
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
        for c in tp.columns.keys() {
            if schema.field_with_name(c).is_err() {
                return Err(Error::Policy(format!(
                    "table {table}: the policy names unknown column {c}"
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
        assert_eq!(p.max_groups(), 10);
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
            ("not toml [".to_string(), ""),
        ] {
            let e = Policy::from_toml(&edit).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
