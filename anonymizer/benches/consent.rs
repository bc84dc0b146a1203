//! The first query after a consent change, on 500,000 patients of whom half consented.
//!
//! `whole`: the change arrives as a snapshot made whole (sorted, digested) and the engine
//! builds its bitmap from every id, as every change did before snapshots carried their
//! changes. `updated`: the snapshot is the previous one updated for the one subject changed
//! (`ConsentFilter::updated`, as the ledger makes it) and the engine updates the previous
//! bitmap. `unchanged`: the same snapshot again (the cost of the query itself). An
//! iteration is the snapshot plus one `COUNT(*)` query through `Engine::run`.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anonymizer::engine::Request;
use anonymizer::{ConsentFilter, Dataset, Engine, Policy};
use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use criterion::{Criterion, criterion_group, criterion_main};
use ledger::budget::Account;
use ledger::ids::SubjectId;

const PATIENTS: i64 = 500_000;

const POLICY: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 1

[tables.patients.columns]
patient_id = { class = "privacy_unit" }
sex = { class = "public", domain = ["F", "M"] }
"#;

const SQL: &str = "SELECT COUNT(*) AS n FROM patients";

fn engine() -> Engine {
    let schema = Arc::new(Schema::new(vec![
        Field::new("patient_id", DataType::Int64, false),
        Field::new("sex", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..PATIENTS)),
            Arc::new(StringArray::from_iter_values(
                (0..PATIENTS).map(|p| if p % 2 == 0 { "F" } else { "M" }),
            )),
        ],
    )
    .unwrap();
    let policy = Policy::from_toml(POLICY).unwrap();
    let ds = Dataset::from_batches(policy, vec![("patients".into(), vec![batch])]).unwrap();
    Engine::with_limits(ds, anonymizer::Limits::unscheduled()).unwrap()
}

fn sid(p: i64) -> SubjectId {
    SubjectId::new(p.to_string()).unwrap()
}

fn bench(c: &mut Criterion) {
    let engine = engine();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let half: Vec<SubjectId> = (0..PATIENTS).step_by(2).map(sid).collect();
    let mut listed = std::collections::BTreeSet::new();
    listed.extend(half.iter().cloned());
    let mut snapshot = ConsentFilter::include(half);
    let mut n = 0u64;
    let mut run = |filter: &ConsentFilter| {
        n += 1;
        let scope = format!("bench-{n}");
        let req = Request {
            scope: &scope,
            sql: SQL,
            epsilon: 0.01,
            delta: 0.0,
            mechanism: None,
            accuracy: None,
            filter,
            budget: Account::new(1e9, 0.0),
            min_cell_size: None,
        };
        black_box(rt.block_on(engine.run(&req)).unwrap());
    };
    run(&snapshot);
    let mut g = c.benchmark_group("consent_change/500k");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    let mut k = 1i64;
    g.bench_function("whole", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                // One odd patient consents (or withdraws): a new whole list.
                let s = sid(k);
                if !listed.insert(s.clone()) {
                    listed.remove(&s);
                }
                k += 2;
                let whole = ConsentFilter::include(listed.iter().cloned().collect());
                run(&whole);
            }
            start.elapsed()
        })
    });
    g.bench_function("updated", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let s = sid(k);
                let now_listed = !snapshot.admits(&s);
                k += 2;
                snapshot = snapshot.updated(&[(s, now_listed)]);
                run(&snapshot);
            }
            start.elapsed()
        })
    });
    g.bench_function("unchanged", |b| b.iter(|| run(&snapshot)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
