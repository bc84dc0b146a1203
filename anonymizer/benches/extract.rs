//! A de-identified extract of 1M rows, k = 5 over 4 quasi-identifiers (goal: >= 1M rows/s).
//!
//! The table: 100,000 patients with 10 visits each (1M rows), every patient in one of 40
//! ZIP codes (20 three-digit areas, one of them restricted), born 1920-2005 (birth years up to
//! 1936 become `90+`), F or M, admitted on a day of 2019-2023 (released as the year), plus a
//! diagnosis. The extract selects the patient (released as the study pseudonym), the four
//! quasi-identifiers and the diagnosis, over everyone's rows (`everyone`) and over an opt-in
//! half (`consent_half`). An iteration is one whole extract: plan check, consent filter,
//! DataFusion execution, Safe Harbor generalizations, pseudonyms, k-anonymity and the result
//! digest. Throughput is in input rows/s.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use anonymizer::extract::ExtractRequest;
use anonymizer::pseudonym::StudySecret;
use anonymizer::{ConsentFilter, Dataset, Engine, Policy};
use arrow::array::{Date32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const PATIENTS: i64 = 100_000;
const VISITS: i64 = 10;
const BATCH: usize = 65_536;

const POLICY: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 10

[tables.visits.columns]
patient_id = { class = "privacy_unit" }
zip = { class = "quasi_identifier", generalize = "zip3" }
birth_year = { class = "quasi_identifier", generalize = "birth_year" }
sex = { class = "quasi_identifier" }
admit_date = { class = "quasi_identifier" }
diagnosis = { class = "sensitive" }
"#;

const SQL: &str = "SELECT patient_id, zip, birth_year, sex, admit_date, diagnosis FROM visits";

fn table() -> Vec<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("zip", DataType::Utf8, false),
        Field::new("birth_year", DataType::Int64, false),
        Field::new("sex", DataType::Utf8, false),
        Field::new("admit_date", DataType::Date32, false),
        Field::new("diagnosis", DataType::Utf8, false),
    ]));
    let mut x: u64 = 3;
    let mut next = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let areas: Vec<u64> = (0..19).map(|i| 100 + 37 * i).chain([36]).collect();
    let (mut pid, mut zip, mut by, mut sex, mut admit, mut diag) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut out = Vec::new();
    for p in 0..PATIENTS {
        let z = format!("{:03}{:02}", areas[next(20) as usize], next(2) * 11);
        let b = 1920 + next(86) as i64;
        let s = ["F", "M"][next(2) as usize];
        for _ in 0..VISITS {
            pid.push(p);
            zip.push(z.clone());
            by.push(b);
            sex.push(s);
            // 2019-01-01 is day 17897.
            admit.push(17_897 + next(5 * 365) as i32);
            diag.push(["E11", "I10", "J45", "Z00"][next(4) as usize]);
        }
        if pid.len() >= BATCH || p == PATIENTS - 1 {
            out.push(
                RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(Int64Array::from(std::mem::take(&mut pid))),
                        Arc::new(StringArray::from(std::mem::take(&mut zip))),
                        Arc::new(Int64Array::from(std::mem::take(&mut by))),
                        Arc::new(StringArray::from(std::mem::take(&mut sex))),
                        Arc::new(Date32Array::from(std::mem::take(&mut admit))),
                        Arc::new(StringArray::from(std::mem::take(&mut diag))),
                    ],
                )
                .unwrap(),
            );
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let policy = Policy::from_toml(POLICY).unwrap();
    let ds = Dataset::from_batches(policy, vec![("visits".into(), table())]).unwrap();
    let rows = ds.rows();
    let engine = Engine::with_limits(ds, anonymizer::Limits::unscheduled()).unwrap();
    let secret = StudySecret::from_bytes(&[7; 32]).unwrap();
    let reference = chrono::NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
    let half: Vec<ledger::ids::SubjectId> = (0..PATIENTS)
        .step_by(2)
        .map(|p| ledger::ids::SubjectId::new(p.to_string()).expect("a valid subject id"))
        .collect();
    let filters = [
        ("everyone", ConsentFilter::everyone()),
        ("consent_half", ConsentFilter::include(half)),
    ];
    let mut g = c.benchmark_group("extract_1m_k5_4qi");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(rows));
    for (name, filter) in &filters {
        let req = ExtractRequest {
            sql: SQL,
            filter,
            k: 5,
            secret: &secret,
            reference_date: reference,
        };
        let x = rt.block_on(engine.extract(&req)).unwrap();
        eprintln!(
            "{name}: {rows} input rows, {} released, {} suppressed",
            x.rows, x.suppressed_rows
        );
        g.bench_function(*name, |b| {
            b.iter(|| black_box(rt.block_on(engine.extract(&req)).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
