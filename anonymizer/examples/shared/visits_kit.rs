//! The peer kit's visits table as the examples read it: its diagnosis codes and its column
//! policy (included by `peer_bench` and `accuracy_bench`).

/// The kit's diagnosis codes (its public key list).
pub const DIAGNOSES: &str = "E11 I10 E78 J44 I25 N18 E66 F32 J45 K21 M54 I48 E03 G47 F41 M17 I50 \
    N39 K57 M81 G43 L40 D50 R73 E55 J18 I63 C50 C61 C34 F17 K70 B18 M06 G20 G30 F20 H40 H25 N40 \
    I70 I21 E10 J30 K29 L20 M10 R10 R07 Z00";

/// The kit's table as a column policy: public key lists, the kit's bounds, at most 10 visits
/// a patient (so at most 10 diagnoses and 10 rows in any one); sex and birth year are the
/// patient's (`per_unit`: a GROUP BY over them puts a patient in one group).
pub fn policy() -> String {
    let quoted = |v: Vec<String>| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let diagnoses = quoted(DIAGNOSES.split_whitespace().map(str::to_owned).collect());
    let sites = quoted((1..=20).map(|i| format!("H{i:02}")).collect());
    format!(
        r#"
privacy_unit = "patient_id"
max_rows_per_unit = 10

[tables.visits.columns]
patient_id = {{ class = "privacy_unit" }}
birth_year = {{ class = "quasi_identifier", generalize = "birth_year", per_unit = true }}
sex = {{ class = "public", domain = ["F", "M"], per_unit = true }}
zip3 = {{ class = "quasi_identifier" }}
diagnosis = {{ class = "public", domain = [{diagnoses}] }}
hba1c = {{ class = "sensitive", bounds = [4.0, 14.0] }}
systolic_bp = {{ class = "sensitive", bounds = [90.0, 200.0] }}
visit_date = {{ class = "quasi_identifier" }}
site = {{ class = "public", domain = [{sites}] }}
"#
    )
}
