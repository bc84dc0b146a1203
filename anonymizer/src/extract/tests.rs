//! Extract tests: the released form of every column, k-anonymity checked by an independent
//! count over the output, consent, refusals and the minimum cell-size rule.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::NaiveDate;

use super::*;
use crate::consent::ConsentFilter;
use crate::dataset::Dataset;
use crate::engine::Engine;
use crate::policy::Policy;
use crate::pseudonym::StudySecret;

const POLICY: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 10

[tables.visits.columns]
patient_id = { class = "privacy_unit" }
name = { class = "direct_identifier" }
ssn = { class = "direct_identifier" }
zip = { class = "quasi_identifier", generalize = "zip3" }
birth_year = { class = "quasi_identifier", generalize = "birth_year" }
sex = { class = "quasi_identifier", domain = ["F", "M"] }
admit_date = { class = "quasi_identifier" }
diagnosis = { class = "sensitive", domain = ["E11", "I10", "J45"] }
hba1c = { class = "sensitive", bounds = [4.0, 14.0] }
"#;

const ZIPS: [&str; 5] = ["02139", "02140", "03601", "10001", "94110"];
const BIRTH_YEARS: [i64; 5] = [1930, 1936, 1937, 1960, 1985];

struct Raw {
    pid: Vec<i64>,
    zip: Vec<&'static str>,
    birth_year: Vec<i64>,
    sex: Vec<&'static str>,
    admit: Vec<i32>,
}

/// `patients` patients with 1 to 4 visits each; a patient's zip, birth year and sex are fixed.
fn visits(patients: i64, bad_diagnosis: bool) -> (RecordBatch, Raw) {
    let mut x: u64 = 11;
    let mut next = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let mut raw = Raw {
        pid: vec![],
        zip: vec![],
        birth_year: vec![],
        sex: vec![],
        admit: vec![],
    };
    let (mut name, mut ssn, mut diag, mut hba1c) = (vec![], vec![], vec![], vec![]);
    for p in 0..patients {
        let zip = ZIPS[next(5) as usize];
        let by = BIRTH_YEARS[next(5) as usize];
        let sex = ["F", "M"][next(2) as usize];
        for _ in 0..1 + next(4) {
            raw.pid.push(5000 + p);
            raw.zip.push(zip);
            raw.birth_year.push(by);
            raw.sex.push(sex);
            // 2019-01-01 is day 17897; two years of admissions.
            raw.admit.push(17_897 + next(730) as i32);
            name.push(format!("Patient Name {p}"));
            ssn.push(format!("123-45-{:04}", p));
            diag.push(if bad_diagnosis && p == 7 {
                "X99"
            } else {
                ["E11", "I10", "J45"][next(3) as usize]
            });
            hba1c.push(4.0 + next(100) as f64 / 10.0);
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("ssn", DataType::Utf8, false),
        Field::new("zip", DataType::Utf8, false),
        Field::new("birth_year", DataType::Int64, false),
        Field::new("sex", DataType::Utf8, false),
        Field::new("admit_date", DataType::Date32, false),
        Field::new("diagnosis", DataType::Utf8, false),
        Field::new("hba1c", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(raw.pid.clone())),
            Arc::new(StringArray::from(name)),
            Arc::new(StringArray::from(ssn)),
            Arc::new(StringArray::from(raw.zip.clone())),
            Arc::new(Int64Array::from(raw.birth_year.clone())),
            Arc::new(StringArray::from(raw.sex.clone())),
            Arc::new(Date32Array::from(raw.admit.clone())),
            Arc::new(StringArray::from(diag)),
            Arc::new(Float64Array::from(hba1c)),
        ],
    )
    .unwrap();
    (batch, raw)
}

fn engine(patients: i64, bad: bool) -> (Engine, Raw) {
    let (batch, raw) = visits(patients, bad);
    let policy = Policy::from_toml(POLICY).unwrap();
    let ds = Dataset::from_batches(policy, vec![("visits".into(), vec![batch])]).unwrap();
    (Engine::new(ds).unwrap(), raw)
}

fn secret() -> StudySecret {
    StudySecret::from_bytes(&[9; 32]).unwrap()
}

fn reference() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, 22).unwrap()
}

async fn extract(e: &Engine, sql: &str, filter: &ConsentFilter, k: u32) -> Result<Extract> {
    let s = secret();
    e.extract(&ExtractRequest {
        sql,
        filter,
        k,
        secret: &s,
        reference_date: reference(),
    })
    .await
}

/// All output rows as text, by column name.
fn rows(x: &Extract) -> Vec<HashMap<String, Option<String>>> {
    let mut out = Vec::new();
    for b in &x.batches {
        let cols: Vec<_> = b
            .columns()
            .iter()
            .map(|c| arrow::compute::cast(c, &DataType::Utf8).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            out.push(
                b.schema()
                    .fields()
                    .iter()
                    .zip(&cols)
                    .map(|(f, c)| {
                        let c = c.as_string::<i32>();
                        (
                            f.name().clone(),
                            (!c.is_null(r)).then(|| c.value(r).to_string()),
                        )
                    })
                    .collect(),
            );
        }
    }
    out
}

const ALL: &str =
    "SELECT patient_id, zip, birth_year, sex, admit_date, diagnosis, hba1c FROM visits";

#[tokio::test]
async fn extracts_are_generalized_pseudonymized_and_k_anonymous() {
    let (e, raw) = engine(400, false);
    let k = 3;
    let x = extract(&e, ALL, &ConsentFilter::everyone(), k)
        .await
        .unwrap();
    let types: Vec<(String, DataType)> = x
        .schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    assert_eq!(
        types,
        [
            ("patient_id".to_string(), DataType::Utf8),
            ("zip".into(), DataType::Utf8),
            ("birth_year".into(), DataType::Utf8),
            ("sex".into(), DataType::Utf8),
            ("admit_date".into(), DataType::Int32),
            ("diagnosis".into(), DataType::Utf8),
            ("hba1c".into(), DataType::Float64),
        ]
    );
    assert_eq!(
        x.quasi_identifiers,
        ["zip", "birth_year", "sex", "admit_date"]
    );
    let out = rows(&x);

    // Independent expectation from the raw rows: Safe Harbor by hand, then patients per class.
    let restricted = ["036"];
    let class_of = |i: usize| {
        let z = &raw.zip[i][..3];
        let z = if restricted.contains(&z) { "000" } else { z };
        let by = if 2026 - raw.birth_year[i] >= 90 {
            "90+".to_string()
        } else {
            raw.birth_year[i].to_string()
        };
        let year = if raw.admit[i] < 17_897 + 365 {
            "2019"
        } else {
            "2020"
        };
        (z.to_string(), by, raw.sex[i].to_string(), year.to_string())
    };
    let mut expected_classes: HashMap<(String, String, String, String), HashSet<i64>> =
        HashMap::new();
    for i in 0..raw.pid.len() {
        expected_classes
            .entry(class_of(i))
            .or_default()
            .insert(raw.pid[i]);
    }
    let expected_rows = (0..raw.pid.len())
        .filter(|&i| expected_classes[&class_of(i)].len() >= k as usize)
        .count() as u64;
    assert_eq!(x.rows, expected_rows);
    assert_eq!(x.rows + x.suppressed_rows, raw.pid.len() as u64);
    assert!(
        x.suppressed_rows > 0 && x.rows > 0,
        "{} {}",
        x.rows,
        x.suppressed_rows
    );
    assert_eq!(out.len() as u64, x.rows);

    // k-anonymity by an independent count over the output: patients (pseudonyms) per class.
    let mut classes: HashMap<Vec<Option<String>>, HashSet<String>> = HashMap::new();
    for r in &out {
        let key = x.quasi_identifiers.iter().map(|q| r[q].clone()).collect();
        classes
            .entry(key)
            .or_default()
            .insert(r["patient_id"].clone().unwrap());
    }
    assert!(classes.values().all(|s| s.len() >= k as usize));

    // Every released value is in its generalized form.
    let pseudonyms =
        secret().pseudonymizer_for(&super::pseudonym_context(&x.sql, &x.consent_digest));
    let ids: HashSet<String> = raw
        .pid
        .iter()
        .map(|p| pseudonyms.pseudonym(p.to_string().as_bytes()))
        .collect();
    for r in &out {
        let pid = r["patient_id"].as_deref().unwrap();
        assert!(ids.contains(pid) && pid.len() == 64);
        let zip = r["zip"].as_deref().unwrap();
        assert!(["021", "000", "100", "941"].contains(&zip), "{zip}");
        assert!(["90+", "1937", "1960", "1985"].contains(&r["birth_year"].as_deref().unwrap()));
        assert!(["2019", "2020"].contains(&r["admit_date"].as_deref().unwrap()));
    }
    assert_eq!(x.k, k);
    assert_eq!(
        x.result_digest,
        crate::release::digest(&x.schema, &x.batches).unwrap()
    );
}

#[tokio::test]
async fn only_consented_patients_are_extracted() {
    let (e, raw) = engine(200, false);
    let included: Vec<String> = (5000..5100).map(|p: i64| p.to_string()).collect();
    let filter = crate::tests::include(&included);
    let x = extract(&e, "SELECT patient_id, sex FROM visits", &filter, 1)
        .await
        .unwrap();
    let pseudonyms =
        secret().pseudonymizer_for(&super::pseudonym_context(&x.sql, &x.consent_digest));
    let allowed: HashSet<String> = included
        .iter()
        .map(|p| pseudonyms.pseudonym(p.as_bytes()))
        .collect();
    let out = rows(&x);
    let rows_of_included = raw.pid.iter().filter(|p| (5000..5100).contains(*p)).count();
    assert_eq!(out.len(), rows_of_included);
    assert!(
        out.iter()
            .all(|r| allowed.contains(r["patient_id"].as_deref().unwrap()))
    );
    assert_eq!(x.consent_digest, *filter.digest().bytes());
    assert_eq!(x.suppressed_rows, 0);
}

#[tokio::test]
async fn without_quasi_identifiers_the_output_needs_k_patients() {
    let (e, _) = engine(50, false);
    let filter = crate::tests::include(&["5000", "5001"]);
    let x = extract(&e, "SELECT diagnosis FROM visits", &filter, 3)
        .await
        .unwrap();
    assert_eq!(x.rows, 0);
    assert!(x.suppressed_rows > 0);
    assert!(x.quasi_identifiers.is_empty());
    // An empty result still has its schema.
    let x = extract(
        &e,
        "SELECT diagnosis FROM visits WHERE diagnosis = 'none'",
        &ConsentFilter::everyone(),
        3,
    )
    .await
    .unwrap();
    assert_eq!((x.rows, x.suppressed_rows), (0, 0));
    assert_eq!(x.schema.fields().len(), 1);
}

#[tokio::test]
async fn aliases_subqueries_filters_and_order_keep_the_generalization() {
    let (e, _) = engine(300, false);
    let x = extract(
        &e,
        "SELECT s.z AS area, s.diagnosis FROM (SELECT zip AS z, diagnosis, hba1c FROM visits) s \
         WHERE s.diagnosis = 'E11' AND s.hba1c > 5 ORDER BY s.diagnosis",
        &ConsentFilter::everyone(),
        2,
    )
    .await
    .unwrap();
    assert_eq!(x.quasi_identifiers, ["area"]);
    let out = rows(&x);
    assert!(!out.is_empty());
    assert!(out.iter().all(|r| r["area"].as_deref().unwrap().len() == 3));
    assert!(out.iter().all(|r| r["diagnosis"].as_deref() == Some("E11")));
}

#[tokio::test]
async fn refusals_name_the_column_or_construct() {
    let (e, _) = engine(30, false);
    for (sql, needle) in [
        ("SELECT name FROM visits", "reading column name"),
        ("SELECT * FROM visits", "reading column name"),
        (
            "SELECT zip FROM visits WHERE ssn = '1'",
            "column ssn in WHERE",
        ),
        (
            "SELECT zip FROM visits WHERE length(name) > 3",
            "column name in WHERE",
        ),
        ("SELECT zip FROM visits ORDER BY ssn", "column ssn"),
        (
            "SELECT s.z FROM (SELECT name AS z FROM visits) s",
            "reading column name",
        ),
        (
            "SELECT zip FROM visits WHERE patient_id = 5001",
            "privacy unit patient_id in WHERE",
        ),
        (
            "SELECT zip FROM visits WHERE admit_date > '2020-01-01'",
            "column admit_date in WHERE",
        ),
        (
            "SELECT sex FROM visits WHERE zip = '02139'",
            "column zip in WHERE",
        ),
        (
            "SELECT sex FROM visits ORDER BY birth_year",
            "column birth_year in ORDER BY",
        ),
        ("SELECT upper(sex) FROM visits", "expression"),
        ("SELECT count(*) FROM visits", "aggregates"),
        (
            "SELECT v.sex FROM visits v JOIN visits w ON v.patient_id = w.patient_id",
            "joins",
        ),
        (
            "SELECT sex FROM visits WHERE sex IN (SELECT sex FROM visits)",
            "subqueries",
        ),
        (
            "SELECT sex FROM visits UNION ALL SELECT sex FROM visits",
            "UNION",
        ),
        ("SELECT nosuch FROM visits", "nosuch"),
        // The unit column is not in the catalog queries are planned against.
        ("SELECT __consentry_unit FROM visits", "__consentry_unit"),
        ("SELECT sex FROM nosuch", "nosuch"),
        ("SELECT zip FROM visits LIMIT 401", "LIMIT"),
        ("SELECT zip FROM visits LIMIT 5 OFFSET 400", "LIMIT"),
    ] {
        let err = extract(&e, sql, &ConsentFilter::everyone(), 2)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{sql}: {err}");
    }
    let distinct = extract(
        &e,
        "SELECT DISTINCT sex FROM visits",
        &ConsentFilter::everyone(),
        2,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        distinct.contains("DISTINCT") || distinct.contains("aggregates"),
        "{distinct}"
    );
    let k0 = extract(&e, "SELECT sex FROM visits", &ConsentFilter::everyone(), 0).await;
    assert!(k0.unwrap_err().to_string().contains("k must be at least 1"));
}

#[tokio::test]
async fn a_value_outside_its_domain_is_released_as_null() {
    // Whether the data holds an undeclared value must not refuse a query (that would be an
    // oracle); the value is never released either.
    let (e, _) = engine(30, true);
    let x = extract(
        &e,
        "SELECT sex, diagnosis FROM visits",
        &ConsentFilter::everyone(),
        1,
    )
    .await
    .unwrap();
    let out = rows(&x);
    assert!(
        out.iter().any(|r| r["diagnosis"].is_none()),
        "the undeclared value is NULL"
    );
    assert!(out.iter().all(|r| r["diagnosis"].as_deref() != Some("X99")));
    assert!(out.iter().any(|r| r["diagnosis"].is_some()));
}

#[test]
fn small_cells_are_suppressed() {
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
            Field::new("mean", DataType::Float64, false),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["a", "b", "c", "d", "e"])),
            Arc::new(Int64Array::from(vec![0, 1, 10, 11, 500])),
            Arc::new(Float64Array::from(vec![0.0, 1.0, 2.0, 3.0, 4.0])),
        ],
    )
    .unwrap();
    for (rule, dependent, expected_n, expected_mean, suppressed) in [
        (
            MinCellSize::CMS,
            vec!["mean"],
            vec![Some(0), None, None, Some(11), Some(500)],
            vec![Some(0.0), None, None, Some(3.0), Some(4.0)],
            2,
        ),
        (
            MinCellSize(2),
            vec![],
            vec![Some(0), None, Some(10), Some(11), Some(500)],
            vec![Some(0.0), Some(1.0), Some(2.0), Some(3.0), Some(4.0)],
            1,
        ),
        (
            MinCellSize(1),
            vec![],
            vec![Some(0), Some(1), Some(10), Some(11), Some(500)],
            vec![Some(0.0), Some(1.0), Some(2.0), Some(3.0), Some(4.0)],
            0,
        ),
    ] {
        let (out, n) = rule.apply(&batch, "n", &dependent).unwrap();
        assert_eq!(n, suppressed);
        let counts = arrow::compute::cast(out.column(1), &DataType::Int64).unwrap();
        assert_eq!(
            counts
                .as_primitive::<arrow::datatypes::Int64Type>()
                .iter()
                .collect::<Vec<_>>(),
            expected_n
        );
        assert_eq!(
            out.column(2)
                .as_primitive::<arrow::datatypes::Float64Type>()
                .iter()
                .collect::<Vec<_>>(),
            expected_mean
        );
        assert_eq!(out.column(0).null_count(), 0);
    }
    assert!(
        MinCellSize::CMS
            .apply(&batch, "count", &[])
            .unwrap_err()
            .to_string()
            .contains("count")
    );
    assert!(
        MinCellSize::CMS
            .apply(&batch, "n", &["nope"])
            .unwrap_err()
            .to_string()
            .contains("nope")
    );
}

#[tokio::test]
async fn text_ids_read_from_parquet_are_filtered_and_pseudonymized() {
    // Parquet readers give text as Utf8View; text privacy-unit ids must work end to end.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("visits.parquet");
    let ids: Vec<String> = (0..60).map(|p| format!("P-{:04}", p / 2)).collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Utf8, false),
            Field::new("sex", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(StringArray::from(ids.clone())),
            Arc::new(StringArray::from(
                (0..60).map(|i| ["F", "M"][i / 2 % 2]).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let policy = Policy::from_toml(
        r#"
privacy_unit = "patient_id"
max_rows_per_unit = 5
[tables.visits.columns]
patient_id = { class = "privacy_unit" }
sex = { class = "quasi_identifier", domain = ["F", "M"] }
"#,
    )
    .unwrap();
    let source = crate::dataset::TableSource {
        name: "visits".into(),
        files: vec![path],
    };
    let ds = Dataset::load(policy, &[source]).await.unwrap();
    assert_eq!(ds.units.len(), 30);
    let e = Engine::new(ds).unwrap();
    let included: Vec<String> = (0..10).map(|p| format!("P-{p:04}")).collect();
    let filter = crate::tests::include(&included);
    let x = extract(&e, "SELECT patient_id, sex FROM visits", &filter, 2)
        .await
        .unwrap();
    let pseudonyms =
        secret().pseudonymizer_for(&super::pseudonym_context(&x.sql, &x.consent_digest));
    let expected: HashSet<String> = included
        .iter()
        .map(|p| pseudonyms.pseudonym(p.as_bytes()))
        .collect();
    let out = rows(&x);
    assert_eq!(out.len(), 20, "two rows for each of 10 consented patients");
    let got: HashSet<String> = out
        .iter()
        .map(|r| r["patient_id"].clone().unwrap())
        .collect();
    assert_eq!(got, expected);
}
