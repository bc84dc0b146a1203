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
//! zip         = { class = "quasi_identifier", generalize = "zip3" }
//! hba1c       = { class = "sensitive", bounds = [4.0, 14.0] }
//! diagnosis   = { class = "public", domain = ["E11", "I10"] }
//! ```
//!
//! Direct identifiers are never readable. Sums and averages need `bounds` (values are clamped
//! to them). A `domain` makes a column's GROUP BY keys public: every key is released, empty
//! ones too, and no partition selection is needed. `generalize` (quasi-identifiers only) says
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
        if self.tables.is_empty() {
            return bad("the policy lists no table".into());
        }
        for (t, tp) in &self.tables {
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
        for (c, cp) in &tp.columns {
            let Ok(f) = schema.field_with_name(c) else {
                return Err(Error::Policy(format!(
                    "table {table}: the policy names unknown column {c}"
                )));
            };
            crate::safe_harbor::Rule::for_column(c, cp, f.data_type())
                .map_err(|e| Error::Policy(format!("table {table}: {e}")))?;
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
