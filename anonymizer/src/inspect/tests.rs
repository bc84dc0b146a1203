//! Detection on a synthetic table with planted identifiers: precision and recall by column.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

use super::*;
use crate::policy::Policy;

/// A deterministic generator (a linear congruential generator: no randomness needed).
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const GIVEN: &[&str] = &[
    "James", "Mary", "Robert", "Linda", "Aiko", "Olusegun", "Priya", "Sven", "Maria", "Wei",
];
const FAMILY: &[&str] = &[
    "Smith",
    "Nguyen",
    "Okafor",
    "Lindqvist",
    "Garcia",
    "Tanaka",
    "Kowalski",
    "Brown",
];

fn card(g: &mut Gen) -> String {
    // 16 digits with a valid Luhn check digit.
    let mut d: Vec<u32> = (0..15).map(|_| g.below(10) as u32).collect();
    d[0] = 4;
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 0 {
                let y = 2 * x;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    d.push((10 - sum % 10) % 10);
    d.iter()
        .map(|x| char::from_digit(*x, 10).unwrap())
        .collect()
}

/// One planted value of `kind`.
fn planted(kind: Kind, g: &mut Gen) -> String {
    match kind {
        Kind::Ssn => format!(
            "{:03}-{:02}-{:04}",
            100 + g.below(800),
            1 + g.below(98),
            g.below(10_000)
        ),
        Kind::MedicalRecordNumber => format!("MRN{:07}", g.below(10_000_000)),
        Kind::Phone | Kind::Fax => {
            format!(
                "({:03}) {:03}-{:04}",
                200 + g.below(700),
                200 + g.below(700),
                g.below(10_000)
            )
        }
        Kind::Email => format!(
            "{}.{}{}@example.org",
            g.pick(GIVEN),
            g.pick(FAMILY),
            g.below(100)
        )
        .to_lowercase(),
        Kind::PersonName => format!("{} {}", g.pick(GIVEN), g.pick(FAMILY)),
        Kind::StreetAddress => format!(
            "{} {} {}",
            1 + g.below(9999),
            g.pick(&["Maple", "Oak", "Harbor View", "Elm", "Main"]),
            g.pick(&["Street", "Ave", "Rd.", "Boulevard", "Lane"])
        ),
        Kind::ZipCode => format!("{:05}", g.below(100_000)),
        Kind::FullDate => format!(
            "{}-{:02}-{:02}",
            1990 + g.below(30),
            1 + g.below(12),
            1 + g.below(28)
        ),
        Kind::Url => format!("https://portal.example.com/patients/{}", g.below(1_000_000)),
        Kind::IpAddress => format!("10.{}.{}.{}", g.below(256), g.below(256), g.below(256)),
        Kind::DeviceId => format!(
            "{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}",
            g.below(256),
            g.below(256),
            g.below(256),
            g.below(256),
            g.below(256),
            g.below(256)
        ),
        Kind::AccountNumber => card(g),
        _ => unreachable!(),
    }
}

/// Decoy columns that hold no identifier, with values that look like data.
fn decoy(i: usize, g: &mut Gen) -> String {
    match i {
        0 => g.pick(&["E11.9", "I10", "J45.909", "Z00.00"]).to_string(),
        1 => format!("{:.1}", 4.0 + g.below(100) as f64 / 10.0),
        2 => g
            .pick(&["Emergency Department", "General Medicine", "Intensive Care"])
            .to_string(),
        3 => g
            .pick(&[
                "Metformin Hydrochloride",
                "Lisinopril",
                "Atorvastatin Calcium",
            ])
            .to_string(),
        4 => format!("LOINC {}-{}", 1000 + g.below(9000), g.below(10)),
        5 => g
            .pick(&["positive", "negative", "indeterminate"])
            .to_string(),
        6 => format!("Ward {}{}", 1 + g.below(9), g.pick(&["A", "B"])),
        // Five-digit order codes look exactly like ZIP codes: a known false positive.
        7 => format!("{:05}", g.below(100_000)),
        _ => unreachable!(),
    }
}

const PLANTED: [Kind; 13] = [
    Kind::Ssn,
    Kind::MedicalRecordNumber,
    Kind::Phone,
    Kind::Fax,
    Kind::Email,
    Kind::PersonName,
    Kind::StreetAddress,
    Kind::ZipCode,
    Kind::FullDate,
    Kind::Url,
    Kind::IpAddress,
    Kind::DeviceId,
    Kind::AccountNumber,
];

const NAMED: [&str; 13] = [
    "ssn",
    "MedicalRecordNumber",
    "home_phone",
    "fax",
    "email_address",
    "patient_name",
    "street_address",
    "zip",
    "admit_date",
    "portal_url",
    "ip_address",
    "device_serial",
    "account_number",
];

const DECOYS: [&str; 8] = [
    "diagnosis",
    "hba1c_text",
    "department",
    "drug",
    "lab_code",
    "result",
    "location",
    "order_code",
];

/// A table of `rows` rows: patient_id; the 13 planted kinds under telling names; the same 13
/// under neutral names (`c00`..`c12`); 8 decoys; a typed date, an age, a float. In each planted
/// column 92% of the values are the identifier and 8% are `unknown` or null.
fn table(rows: usize) -> (RecordBatch, HashMap<String, Option<Kind>>) {
    let mut g = Gen(7);
    let mut fields = vec![Field::new("patient_id", DataType::Int64, false)];
    let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(0..rows as i64))];
    let mut truth = HashMap::new();
    truth.insert("patient_id".to_string(), Some(Kind::PatientId));
    for (names, neutral) in [
        (NAMED.map(String::from), false),
        (std::array::from_fn(|i| format!("c{i:02}")), true),
    ] {
        for (kind, name) in PLANTED.iter().zip(names) {
            let values: StringArray = (0..rows)
                .map(|r| match r % 25 {
                    0 => None,
                    1 => Some("unknown".to_string()),
                    _ => Some(planted(*kind, &mut g)),
                })
                .collect();
            fields.push(Field::new(&name, DataType::Utf8, true));
            cols.push(Arc::new(values));
            // By value alone a fax number is a phone number.
            let expected = if neutral && *kind == Kind::Fax {
                Kind::Phone
            } else {
                *kind
            };
            truth.insert(name, Some(expected));
        }
    }
    for (i, name) in DECOYS.iter().enumerate() {
        let values: StringArray = (0..rows).map(|_| Some(decoy(i, &mut g))).collect();
        fields.push(Field::new(*name, DataType::Utf8, false));
        cols.push(Arc::new(values));
        truth.insert(name.to_string(), None);
    }
    fields.push(Field::new("discharged_on", DataType::Date32, true));
    cols.push(Arc::new(Date32Array::from_iter_values(
        (0..rows).map(|r| 18_000 + r as i32),
    )));
    truth.insert("discharged_on".into(), Some(Kind::FullDate));
    fields.push(Field::new("age", DataType::Int64, false));
    cols.push(Arc::new(Int64Array::from_iter_values(
        (0..rows).map(|r| (r % 100) as i64),
    )));
    truth.insert("age".into(), Some(Kind::Age));
    fields.push(Field::new("systolic_bp", DataType::Float64, false));
    cols.push(Arc::new(Float64Array::from_iter_values(
        (0..rows).map(|r| 100.0 + (r % 60) as f64),
    )));
    truth.insert("systolic_bp".into(), None);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    (batch, truth)
}

#[test]
fn column_names_are_split_into_words() {
    for (name, w) in [
        ("PatientSSN", "patient_ssn"),
        ("patient_ssn", "patient_ssn"),
        ("MedicalRecordNumber", "medical_record_number"),
        ("e-mail", "e_mail"),
        ("DOB", "dob"),
        ("zip5", "zip5"),
        ("IPAddress", "ip_address"),
    ] {
        assert_eq!(words(name), w);
    }
}

#[test]
fn planted_identifiers_are_found_with_stated_precision_and_recall() {
    let (batch, truth) = table(5000);
    let p = inspect_batches("visits", std::slice::from_ref(&batch), &Options::default()).unwrap();
    let (mut tp, mut fp, mut fn_, mut wrong_kind) = (0, 0, 0, Vec::new());
    for f in &p.findings {
        let expected = truth[&f.column];
        match (expected, f.kind) {
            (Some(e), Some(k)) => {
                tp += 1;
                if e != k {
                    wrong_kind.push((f.column.clone(), e, k));
                }
            }
            (None, Some(_)) => fp += 1,
            (Some(_), None) => fn_ += 1,
            (None, None) => {}
        }
    }
    // 1 patient id + 26 planted + 1 typed date + 1 age = 29 identifier columns; 9 others.
    assert_eq!(p.findings.len(), 38);
    // Every planted column is found (recall 29/29); the one false positive is the column of
    // five-digit order codes, indistinguishable from ZIP codes by value (precision 29/30).
    assert_eq!((tp, fp, fn_), (29, 1, 0), "{}", p.report());
    assert!(wrong_kind.is_empty(), "{wrong_kind:?}");
    let order = p
        .findings
        .iter()
        .find(|f| f.column == "order_code")
        .unwrap();
    assert_eq!(order.kind, Some(Kind::ZipCode));
    // Reasons give counts and patterns.
    let ssn = p.findings.iter().find(|f| f.column == "c00").unwrap();
    assert_eq!((ssn.sampled, ssn.matched), (960, 920));
    assert_eq!(
        ssn.reasons,
        ["96% of 960 sampled values match the SSN (123-45-6789) pattern"]
    );
}

#[test]
fn the_proposed_policy_parses_and_classifies_every_column() {
    let (batch, _) = table(500);
    let p = inspect_batches("visits", std::slice::from_ref(&batch), &Options::default()).unwrap();
    assert_eq!(p.privacy_unit.as_deref(), Some("patient_id"));
    let policy = Policy::from_toml(&p.policy_toml).unwrap();
    policy.check_schema("visits", &batch.schema()).unwrap();
    let class = |c: &str| policy.column("visits", c).unwrap().clone();
    assert_eq!(class("ssn").class, ColumnClass::DirectIdentifier);
    assert_eq!(class("zip").generalize.as_deref(), Some("zip3"));
    assert_eq!(class("admit_date").generalize.as_deref(), Some("year"));
    assert_eq!(class("discharged_on").generalize.as_deref(), Some("year"));
    assert_eq!(class("age").generalize.as_deref(), Some("age"));
    assert_eq!(class("diagnosis").class, ColumnClass::Sensitive);
    // Findings never carry values.
    assert!(!p.policy_toml.contains("example.org") && !p.report().contains("example.org"));
}

#[test]
fn a_telling_name_flags_a_column_even_without_matching_values() {
    let f = judge("fax", &DataType::Utf8, &["n/a".to_string()]);
    assert_eq!(f.kind, Some(Kind::Fax));
    assert_eq!(f.class, ColumnClass::DirectIdentifier);
    // "date" alone in a name needs date values.
    let f = judge("update_count", &DataType::Utf8, &["3".to_string()]);
    assert_eq!(f.kind, None);
    let f = judge("visit_date", &DataType::Utf8, &["soon".to_string()]);
    assert_eq!(f.kind, None);
}

#[test]
fn files_are_read_as_parquet_or_arrow_ipc() {
    let (batch, _) = table(200);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pq = dir.join("visits.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&pq).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let ipc = dir.join("labs.arrow");
    let mut w = arrow::ipc::writer::FileWriter::try_new(
        std::fs::File::create(&ipc).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();
    for (path, table) in [(pq, "visits"), (ipc, "labs")] {
        let p = inspect_file(&path, &Options::default()).unwrap();
        assert_eq!(p.table, table);
        assert_eq!(p.rows, 200);
        assert!(p.policy_toml.contains(&format!("[tables.{table}.columns]")));
    }
    let e = inspect_file(&dir.join("missing.parquet"), &Options::default()).unwrap_err();
    assert!(e.to_string().contains("missing.parquet"));
}

#[test]
fn the_proposed_rows_per_patient_come_from_the_data() {
    // 198 patients with 2 rows, 2 with 40: the 99th percentile is 2, the most 40.
    let mut ids = Vec::new();
    for p in 0..200i64 {
        let n = if p < 2 { 40 } else { 2 };
        ids.extend(std::iter::repeat_n(p, n));
    }
    let values: Vec<f64> = (0..ids.len()).map(|i| i as f64).collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("value", DataType::Float64, false),
        ])),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(Float64Array::from(values)),
        ],
    )
    .unwrap();
    let p = inspect_batches("labs", &[batch], &Options::default()).unwrap();
    let policy = Policy::from_toml(&p.policy_toml).unwrap();
    assert_eq!(policy.table_bounds("labs").rows, 2, "{}", p.policy_toml);
    assert!(
        p.policy_toml
            .contains("rows per patient, median 2, 99th percentile 2, most 40"),
        "{}",
        p.policy_toml
    );
}

#[test]
fn columns_with_one_value_per_patient_are_proposed_per_unit() {
    // 300 patients with 1 to 4 visits: sex and birth year are the patient's (the birth year
    // NULL for some patients, on all their rows), the site is the visit's, and for the last
    // patient alone the region changes between visits.
    let (mut ids, mut sex, mut born, mut site, mut region) =
        (vec![], vec![], vec![], vec![], vec![]);
    for p in 0..300i64 {
        for v in 0..=(p % 4) {
            ids.push(p);
            sex.push(["F", "M"][p as usize % 2]);
            born.push((p % 7 != 0).then_some(1940 + p % 60));
            site.push(["H01", "H02", "H03"][((p + v) % 3) as usize]);
            region.push(if p == 299 && v > 0 { "west" } else { "east" });
        }
    }
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("sex", DataType::Utf8, false),
            Field::new("birth_year", DataType::Int64, true),
            Field::new("site", DataType::Utf8, false),
            Field::new("region", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(StringArray::from(sex)),
            Arc::new(Int64Array::from(born)),
            Arc::new(StringArray::from(site)),
            Arc::new(StringArray::from(region)),
        ],
    )
    .unwrap();
    let p = inspect_batches("visits", std::slice::from_ref(&batch), &Options::default()).unwrap();
    let policy = Policy::from_toml(&p.policy_toml).unwrap();
    let per_unit = |c: &str| policy.column("visits", c).unwrap().per_unit;
    assert!(
        per_unit("sex") && per_unit("birth_year"),
        "{}",
        p.policy_toml
    );
    assert!(!per_unit("site") && !per_unit("region") && !per_unit("patient_id"));
    // What it proposed holds on the data.
    let ds =
        crate::Dataset::from_batches(policy, vec![("visits".into(), vec![batch.clone()])]).unwrap();
    let varying = ds.tables[0].varying_per_unit(&ds.policy).unwrap();
    assert_eq!(varying.len(), 2, "{varying:?}");
    assert!(varying.iter().all(|(_, units)| *units == 0));
    // A table with one row per patient proposes none (its keys are one group already).
    let one = batch.slice(0, 1);
    let p = inspect_batches("one", &[one], &Options::default()).unwrap();
    assert!(
        !p.policy_toml.contains("per_unit = true"),
        "{}",
        p.policy_toml
    );
}

#[test]
fn few_values_propose_a_domain_and_numbers_propose_rounded_percentile_bounds() {
    // 1,000 patients: a site among three, a grade among five, and a lab value in [4, 15.9].
    let n = 1000i64;
    let site: Vec<&str> = (0..n)
        .map(|p| ["north", "south", "east"][p as usize % 3])
        .collect();
    let grade: Vec<i64> = (0..n).map(|p| 1 + p % 5).collect();
    let lab: Vec<f64> = (0..n).map(|p| 4.0 + (p % 120) as f64 / 10.0).collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("site", DataType::Utf8, false),
            Field::new("grade", DataType::Int64, false),
            Field::new("lab", DataType::Float64, false),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values(0..n)),
            Arc::new(StringArray::from(site)),
            Arc::new(Int64Array::from(grade)),
            Arc::new(Float64Array::from(lab.clone())),
        ],
    )
    .unwrap();
    let p = inspect_batches("t", std::slice::from_ref(&batch), &Options::default()).unwrap();
    let policy = Policy::from_toml(&p.policy_toml).unwrap();
    let col = |c: &str| policy.column("t", c).unwrap().clone();
    assert_eq!(
        col("site").domain,
        Some(Domain::Text(vec![
            "east".into(),
            "north".into(),
            "south".into()
        ])),
        "{}",
        p.policy_toml
    );
    assert_eq!(col("grade").domain, Some(Domain::Int(vec![1, 2, 3, 4, 5])));
    // The lab's 1st and 99th percentiles (4.0 and 15.8 of 4.0..=15.9), rounded outward to
    // two digits: never the exact extremes.
    let [lo, hi] = col("lab").bounds.unwrap();
    let mut sorted = lab;
    sorted.sort_by(f64::total_cmp);
    let pct = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    assert!(lo <= pct(0.01) && hi >= pct(0.99), "[{lo}, {hi}]");
    assert_eq!([lo, hi], [4.0, 16.0]);
    assert!(col("lab").domain.is_none());
    // The proposal registers: its domains cover every row.
    let ds = crate::Dataset::from_batches(policy, vec![("t".into(), vec![batch])]).unwrap();
    assert!(
        ds.tables[0]
            .outside_domains(&ds.policy)
            .unwrap()
            .iter()
            .all(|(_, rows)| *rows == 0)
    );
}

#[test]
fn bounds_round_outward_to_two_significant_digits() {
    for (x, up, want) in [
        (15.84, true, 16.0),
        (15.84, false, 15.0),
        (0.3041, true, 0.31),
        (-0.3041, false, -0.31),
        (1234.0, true, 1300.0),
        (0.0, true, 0.0),
    ] {
        assert_eq!(super::outward(x, up), want, "{x} {up}");
    }
}

#[test]
fn omop_names_are_read_row_ids_and_birth_months_are_identifiers() {
    // An OMOP-shaped measurement table: 500 persons with two measurements each.
    let n = 1000i64;
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("measurement_id", DataType::Int64, false),
            Field::new("person_id", DataType::Int64, false),
            Field::new("measurement_concept_id", DataType::Int64, false),
            Field::new("month_of_birth", DataType::Int64, false),
            Field::new("day_of_birth", DataType::Int64, false),
            Field::new("value_as_number", DataType::Float64, false),
            Field::new("visit_occurrence_id", DataType::Int64, false),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values(50_000..50_000 + n)),
            Arc::new(Int64Array::from_iter_values((0..n).map(|i| i / 2))),
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|i| [3004410, 3027018][i as usize % 2]),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|i| 1 + (i / 2) % 12),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..n).map(|i| 1 + (i / 2) % 28),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..n).map(|i| 4.0 + (i % 100) as f64 / 10.0),
            )),
            // Not unique (a visit holds both of a person's measurements): not a row id.
            Arc::new(Int64Array::from_iter_values((0..n).map(|i| i / 2))),
        ],
    )
    .unwrap();
    let p = inspect_batches("measurement", &[batch], &Options::default()).unwrap();
    let class = |c: &str| p.findings.iter().find(|f| f.column == c).unwrap().class;
    assert_eq!(p.privacy_unit.as_deref(), Some("person_id"));
    assert_eq!(class("measurement_id"), ColumnClass::DirectIdentifier);
    assert_eq!(class("month_of_birth"), ColumnClass::DirectIdentifier);
    assert_eq!(class("day_of_birth"), ColumnClass::DirectIdentifier);
    assert_eq!(class("measurement_concept_id"), ColumnClass::Sensitive);
    assert_eq!(class("visit_occurrence_id"), ColumnClass::Sensitive);
    let policy = Policy::from_toml(&p.policy_toml).unwrap();
    assert_eq!(
        policy
            .column("measurement", "measurement_concept_id")
            .unwrap()
            .domain,
        Some(Domain::Int(vec![3004410, 3027018])),
        "{}",
        p.policy_toml
    );
    let report = p.report();
    assert!(report.contains("a row id"), "{report}");
    // Reasons never quote values.
    assert!(
        !report.contains("50000") && !report.contains("3004410"),
        "{report}"
    );
}

#[test]
fn a_code_column_proposes_bounds_per_code() {
    // Labs by LOINC code: HbA1c in [4, 14], glucose in [40, 400]; one bound for both would be
    // ten times too wide for HbA1c.
    let n = 1200usize;
    let code: Vec<&str> = (0..n).map(|i| ["4548-4", "2345-7"][i % 2]).collect();
    let value: Vec<f64> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                4.0 + (i % 100) as f64 / 10.0
            } else {
                40.0 + (i % 360) as f64
            }
        })
        .collect();
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("code", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| i / 3))),
            Arc::new(StringArray::from(code)),
            Arc::new(Float64Array::from(value)),
        ],
    )
    .unwrap();
    let p = inspect_batches("labs", std::slice::from_ref(&batch), &Options::default()).unwrap();
    let policy = Policy::from_toml(&p.policy_toml).unwrap();
    let value = policy.column("labs", "value").unwrap();
    assert_eq!(
        value.bounds_by.as_deref(),
        Some("code"),
        "{}",
        p.policy_toml
    );
    let per = value.key_bounds.as_ref().unwrap();
    let hba1c = per["4548-4"];
    let glucose = per["2345-7"];
    assert!(hba1c[0] >= 4.0 && hba1c[1] <= 14.0, "{hba1c:?}");
    assert!(glucose[0] >= 40.0 && glucose[1] <= 400.0, "{glucose:?}");
    assert!(value.bounds.is_none());
    // The proposal registers.
    crate::Dataset::from_batches(policy, vec![("labs".into(), vec![batch])]).unwrap();
}
