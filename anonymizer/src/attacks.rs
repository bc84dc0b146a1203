//! The hostile researcher against the engine: each test tries one class of attack and judges
//! by ground truth (what the data holds), not by the message expected.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Float64Type, Schema};
use proptest::prelude::*;

use crate::consent::ConsentFilter;
use crate::dataset::Dataset;
use crate::engine::{Engine, Limits, Request};
use crate::error::Error;
use crate::policy::Policy;
use crate::tests::{engine, patients_table, visits};
use ledger::budget::Account;

fn req<'a>(sql: &'a str, filter: &'a ConsentFilter) -> Request<'a> {
    Request {
        scope: "attack",
        sql,
        epsilon: 1.0,
        delta: 1e-6,
        mechanism: None,
        accuracy: None,
        filter,
        budget: Account::new(1e9, 1e-3),
        min_cell_size: None,
    }
}

/// Every value of every column of a batch, as text: what must never appear in a message.
fn values_of(b: &RecordBatch) -> Vec<String> {
    let mut out = Vec::new();
    for c in b.columns() {
        let t = arrow::compute::cast(c, &DataType::Utf8).unwrap();
        for v in t.as_string::<i32>().iter().flatten() {
            if v.len() >= 3 {
                out.push(v.to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn expressions_above_the_aggregate_cannot_read_tables() {
    let e = engine(200);
    let all = ConsentFilter::everyone();
    for sql in [
        "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex \
         ORDER BY (SELECT MAX(name) FROM visits WHERE patient_id = 1003)",
        "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex \
         HAVING (SELECT COUNT(*) FROM visits WHERE name = 'Name 3') > 0",
        "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex \
         ORDER BY EXISTS (SELECT 1 FROM visits WHERE hba1c > 13.9)",
        "SELECT sex, COUNT(*) + (SELECT COUNT(*) FROM patients) AS n FROM visits GROUP BY sex",
        "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex LIMIT (SELECT COUNT(*) FROM visits)",
    ] {
        match e.run(&req(sql, &all)).await {
            Err(Error::Refused { .. }) | Err(Error::InvalidQuery(_)) => {}
            other => panic!("{sql}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn researcher_expressions_see_only_guarded_rows_in_the_physical_plan() {
    let e = engine(50);
    let ids: Vec<String> = (1000..1010).map(|p: i64| p.to_string()).collect();
    let some = crate::tests::include(&ids);
    let sql = "SELECT v.sex, COUNT(*) FROM visits v JOIN patients p \
               ON v.patient_id = p.patient_id WHERE v.hba1c / 2 > 3 AND p.smoker = 'yes' \
               GROUP BY v.sex";
    let plan = e.lower_physical_for_tests(sql, &some).await.unwrap();
    // Every leaf is a guarded scan: no researcher expression runs below one.
    fn leaves(p: &Arc<dyn datafusion::physical_plan::ExecutionPlan>, out: &mut Vec<String>) {
        if p.children().is_empty() {
            out.push(p.name().to_string());
        }
        for c in p.children() {
            leaves(c, out);
        }
    }
    let mut names = Vec::new();
    leaves(&plan, &mut names);
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| n == "GuardedExec"), "{names:?}");
}

#[tokio::test]
async fn failing_expressions_are_not_an_oracle() {
    // Probes that failed on a target row before (division by zero, failing casts, overflow):
    // each must succeed whether or not a row matches, consented or not.
    let e = engine(60);
    let none = crate::tests::include(&["1000"]);
    let all = ConsentFilter::everyone();
    let present: Vec<f64> = {
        let b = visits(60);
        let h = b
            .column_by_name("hba1c")
            .unwrap()
            .as_primitive::<Float64Type>();
        h.iter().flatten().take(5).collect()
    };
    let mut probes = Vec::new();
    for v in present.iter().copied().chain([99.5, 123.25]) {
        let t = (v * 10.0).round() as i64;
        probes.push(format!(
            "SELECT COUNT(*) FROM visits WHERE 1 / (CAST(hba1c * 10 AS BIGINT) - {t}) > 0"
        ));
        probes.push(format!(
            "SELECT COUNT(*) FROM visits WHERE CASE WHEN CAST(hba1c * 10 AS BIGINT) = {t} \
             THEN CAST(concat(zip3, 'x') AS INT) ELSE 1 END = 1"
        ));
        probes.push(format!(
            "SELECT COUNT(*) FROM visits WHERE (CASE WHEN CAST(hba1c * 10 AS BIGINT) = {t} \
             THEN -9223372036854775807 - 1 ELSE 1 END) / -1 > 0"
        ));
        probes.push(format!(
            "SELECT COUNT(*) FROM visits WHERE to_date(CASE WHEN CAST(hba1c * 10 AS BIGINT) = \
             {t} THEN 'not a date' ELSE '2020-01-01' END) IS NOT NULL"
        ));
    }
    let secrets = values_of(&visits(60));
    for sql in &probes {
        for filter in [&none, &all] {
            match e.run(&req(sql, filter)).await {
                Ok(r) => assert!(r.epsilon > 0.0),
                Err(err) => {
                    let m = err.to_string();
                    assert!(
                        !secrets.iter().any(|s| m.contains(s.as_str())),
                        "{sql}: {m}"
                    );
                    panic!("{sql}: refused or failed: {m}");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_failure_after_the_checks_is_charged_and_says_nothing() {
    let policy = Policy::from_toml(crate::tests::POLICY).unwrap();
    let ds = Dataset::from_batches(
        policy,
        vec![
            ("visits".into(), vec![visits(300)]),
            ("patients".into(), vec![patients_table(300)]),
        ],
    )
    .unwrap();
    let tiny = Limits {
        memory: 16 << 10,
        ..Limits::default()
    };
    let e = Engine::with_limits(ds, tiny).unwrap();
    let all = ConsentFilter::everyone();
    let sql = "SELECT a.sex, COUNT(*) FROM visits a JOIN visits b \
               ON a.patient_id = b.patient_id GROUP BY a.sex";
    match e.run(&req(sql, &all)).await {
        Err(Error::Failed {
            epsilon,
            delta,
            rho: None,
        }) => {
            assert_eq!((epsilon, delta), (1.0, 0.0));
        }
        other => panic!("{other:?}"),
    }
    // The deadline too (without the release schedule, which would refuse the query when
    // planned: its worst case exceeds so short a deadline).
    let ds = Dataset::from_batches(
        Policy::from_toml(crate::tests::POLICY).unwrap(),
        vec![("visits".into(), vec![visits(3000)])],
    )
    .unwrap();
    let e = Engine::with_limits(
        ds,
        Limits {
            deadline: std::time::Duration::from_micros(1),
            ..Limits::unscheduled()
        },
    )
    .unwrap();
    let err = e.run(&req(sql, &all)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the query failed while running; its privacy spend was charged"
    );
}

#[tokio::test]
async fn an_empty_result_is_a_result_and_is_charged() {
    let e = engine(100);
    let all = ConsentFilter::everyone();
    let r = e
        .run(&req(
            "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex HAVING COUNT(*) > 1000000000",
            &all,
        ))
        .await
        .unwrap();
    assert_eq!(r.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    assert!(r.epsilon > 0.0);
    assert!(r.schema.field_with_name("n").is_ok());
}

#[tokio::test]
async fn declared_group_bounds_are_enforced_on_the_data() {
    let policy = Policy::from_toml(&crate::tests::POLICY.replace(
        "max_rows_per_unit = 10",
        "max_rows_per_unit = 10\nmax_groups_per_unit = 2",
    ))
    .unwrap();
    let ds = Dataset::from_batches(policy, vec![("visits".into(), vec![visits(80)])]).unwrap();
    let e = Engine::new(ds).unwrap();
    // Each patient alone: its rows fall in at most 2 zip3 groups, however many it has.
    for p in 1000..1080 {
        let only = crate::tests::include(&[p.to_string()]);
        let raw = e
            .raw_for_tests("SELECT zip3, COUNT(*) FROM visits GROUP BY zip3", &only)
            .await
            .unwrap();
        assert!(
            raw.num_rows() <= 2,
            "patient {p}: {} groups",
            raw.num_rows()
        );
    }
}

#[tokio::test]
async fn aliases_cannot_swap_column_classes() {
    // Two tables sharing a column name under different classes.
    let policy = Policy::from_toml(
        r#"
privacy_unit = "patient_id"
max_rows_per_unit = 10
[tables.a.columns]
patient_id = { class = "privacy_unit" }
x = { class = "direct_identifier" }
[tables.b.columns]
patient_id = { class = "privacy_unit" }
x = { class = "public", domain = ["u", "v"] }
"#,
    )
    .unwrap();
    let table = |x: &str| {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("patient_id", DataType::Int64, false),
                Field::new("x", DataType::Utf8, false),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![x, x])),
            ],
        )
        .unwrap()
    };
    let ds = Dataset::from_batches(
        policy,
        vec![
            ("a".into(), vec![table("SECRET-NAME")]),
            ("b".into(), vec![table("u")]),
        ],
    )
    .unwrap();
    let e = Engine::new(ds).unwrap();
    let all = ConsentFilter::everyone();
    for sql in [
        "SELECT b.x, COUNT(*) FROM a AS b JOIN b AS a ON a.patient_id = b.patient_id GROUP BY b.x",
        "SELECT COUNT(*) FROM a AS b JOIN b AS a ON a.patient_id = b.patient_id WHERE b.x = 'u'",
        "SELECT COUNT(*) FROM a AS b WHERE b.x LIKE 'S%'",
        "SELECT y.x, COUNT(*) FROM b AS x JOIN a AS y ON x.patient_id = y.patient_id GROUP BY y.x",
    ] {
        match e.run(&req(sql, &all)).await {
            Err(Error::Refused { construct, .. }) => {
                assert!(construct.contains("column x"), "{sql}: {construct}")
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    // Reading b's public x through its own alias is fine.
    e.run(&req(
        "SELECT a.x, COUNT(*) FROM b AS a JOIN a AS b ON a.patient_id = b.patient_id GROUP BY a.x",
        &all,
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn grouping_sets_rollup_and_cube_are_refused() {
    let e = engine(50);
    let all = ConsentFilter::everyone();
    for sql in [
        "SELECT sex, diagnosis, COUNT(*) FROM visits GROUP BY ROLLUP (sex, diagnosis)",
        "SELECT sex, diagnosis, COUNT(*) FROM visits GROUP BY CUBE (sex, diagnosis)",
        "SELECT sex, diagnosis, COUNT(*) FROM visits GROUP BY GROUPING SETS ((sex), (diagnosis))",
    ] {
        match e.run(&req(sql, &all)).await {
            Err(Error::Refused { construct, .. }) => {
                assert!(construct.contains("GROUPING SETS"), "{sql}: {construct}")
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
}

/// A dataset whose lab values hold NaN and infinities.
fn non_finite() -> Engine {
    let n = 400;
    let ids: Vec<i64> = (0..n).collect();
    let vals: Vec<f64> = (0..n)
        .map(|i| match i % 10 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            _ => 7.0,
        })
        .collect();
    let b = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("hba1c", DataType::Float64, true),
        ])),
        vec![
            Arc::new(Int64Array::from(ids)),
            Arc::new(Float64Array::from(vals)),
        ],
    )
    .unwrap();
    let policy = Policy::from_toml(
        r#"
privacy_unit = "patient_id"
max_rows_per_unit = 1
[tables.labs.columns]
patient_id = { class = "privacy_unit" }
hba1c = { class = "sensitive", bounds = [4.0, 14.0] }
"#,
    )
    .unwrap();
    Engine::new(Dataset::from_batches(policy, vec![("labs".into(), vec![b])]).unwrap()).unwrap()
}

#[tokio::test]
async fn nan_and_infinities_never_reach_an_aggregate() {
    let e = non_finite();
    let all = ConsentFilter::everyone();
    let mut r = req(
        "SELECT AVG(hba1c) AS m, VAR(hba1c) AS v, SUM(hba1c) AS s, MEDIAN(hba1c) AS q FROM labs",
        &all,
    );
    r.epsilon = 1000.0;
    let out = e.run(&r).await.unwrap();
    let b = &out.batches[0];
    for c in b.columns() {
        let c = arrow::compute::cast(c, &DataType::Float64).unwrap();
        let v = c.as_primitive::<Float64Type>().value(0);
        assert!(v.is_finite(), "{b:?}");
    }
    // NaN is dropped, infinities clamp: the mean of 7s, 14s and 4s (one in ten of each).
    let m = b
        .column_by_name("m")
        .unwrap()
        .as_primitive::<Float64Type>()
        .value(0);
    let truth = (7.0 * 280.0 + 14.0 * 40.0 + 4.0 * 40.0) / 360.0;
    assert!((m - truth).abs() < 0.1, "{m} vs {truth}");
}

#[tokio::test]
async fn every_half_width_is_finite_and_positive() {
    let e = engine(100);
    let all = ConsentFilter::everyone();
    for eps in [crate::engine::MIN_EPSILON, 1e6] {
        let mut r = req(
            "SELECT sex, COUNT(*) AS n, SUM(systolic_bp) AS s, AVG(hba1c) AS a, \
             STDDEV(hba1c) AS d, COUNT(DISTINCT patient_id) AS u FROM visits GROUP BY sex",
            &all,
        );
        r.epsilon = eps;
        let out = e.run(&r).await.unwrap();
        for b in &out.batches {
            for (f, c) in b.schema().fields().iter().zip(b.columns()) {
                if f.name().ends_with("_ci95") {
                    for v in c.as_primitive::<Float64Type>().iter().flatten() {
                        assert!(v.is_finite() && v > 0.0, "{eps} {}: {v}", f.name());
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn a_float_sum_with_integral_bounds_is_not_truncated() {
    let e = engine(100);
    let all = ConsentFilter::everyone();
    let raw = e
        .raw_for_tests("SELECT SUM(weight) FROM patients", &all)
        .await
        .unwrap();
    let got =
        arrow::compute::cast(raw.column_by_name("__s0_sum").unwrap(), &DataType::Float64).unwrap();
    let got = got.as_primitive::<Float64Type>().value(0);
    let w = patients_table(100);
    let truth: f64 = w
        .column_by_name("weight")
        .unwrap()
        .as_primitive::<Float64Type>()
        .values()
        .iter()
        .map(|v| v.clamp(40.0, 150.0))
        .sum();
    assert!((got - truth).abs() < 1e-6, "{got} vs {truth}");
    assert!(raw.column_by_name("__s0_sum").unwrap().data_type() == &DataType::Float64);
}

#[tokio::test]
async fn the_minimum_cell_size_applies_to_every_statistic() {
    let e = engine(100);
    let all = ConsentFilter::everyone();
    let mut r = req(
        "SELECT sex, AVG(hba1c) AS a, MEDIAN(hba1c) AS m, SUM(systolic_bp) AS s FROM visits \
         GROUP BY sex",
        &all,
    );
    r.min_cell_size = Some(1_000_000);
    let out = e.run(&r).await.unwrap();
    for b in &out.batches {
        for name in ["a", "m", "s"] {
            let c = b.column_by_name(name).unwrap();
            assert_eq!(c.null_count(), c.len(), "{name} released for a small group");
        }
    }
    // A query without any count draws a size for the rule, and says so.
    let mut r = req(
        "SELECT sex, MEDIAN(hba1c) AS m FROM visits GROUP BY sex",
        &all,
    );
    r.min_cell_size = Some(11);
    let out = e.run(&r).await.unwrap();
    assert!(out.mechanism.to_string().contains("minimum cell size"));
    assert!(out.epsilon <= 1.0 + 1e-9);
}

#[tokio::test]
async fn identical_queries_in_flight_share_one_draw() {
    let e = Arc::new(engine(100));
    let all = ConsentFilter::everyone();
    let sql = "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex";
    let (first, flight) = e.run_pending(&req(sql, &all)).await.unwrap();
    assert!(!first.repeated);
    let e2 = e.clone();
    let second = tokio::spawn(async move {
        let all = ConsentFilter::everyone();
        let (r, _f) = e2
            .run_pending(&req(
                "SELECT sex, COUNT(*) AS n FROM visits GROUP BY sex",
                &all,
            ))
            .await
            .unwrap();
        r
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!second.is_finished(), "the second waits for the first");
    e.remember(&req(sql, &all), &first);
    drop(flight);
    let second = second.await.unwrap();
    assert!(second.repeated && second.epsilon == 0.0);
    assert_eq!(second.result_digest, first.result_digest);
}

#[tokio::test]
async fn oversized_and_deep_queries_are_refused_before_planning() {
    let e = engine(20);
    let all = ConsentFilter::everyone();
    let ors = (0..1200)
        .map(|i| format!("systolic_bp = {i}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let plus = (0..2000).map(|_| "1").collect::<Vec<_>>().join(" + ");
    for sql in [
        format!("SELECT COUNT(*) FROM visits WHERE {ors}"),
        format!("SELECT COUNT(*) FROM visits WHERE systolic_bp > {plus}"),
        format!(
            "SELECT COUNT(*) FROM visits WHERE zip3 = '{}'",
            "x".repeat(70_000)
        ),
        // Under the size limit, but a parse tree 25,000-32,000 deep: dropping it overflowed
        // the stack and aborted the process.
        format!(
            "SELECT COUNT(*) FROM visits WHERE 0{}>0",
            "+1".repeat(25_000)
        ),
        format!(
            "SELECT COUNT(*) FROM visits WHERE 1{}>0",
            "*1".repeat(32_000)
        ),
        format!("SELECT COUNT(*) FROM visits WHERE 1{}", "<1".repeat(32_000)),
    ] {
        match e.run(&req(&sql, &all)).await {
            Err(Error::Refused { .. }) => {}
            other => panic!("{}: {other:?}", &sql[..60]),
        }
    }
    // Functions whose planning panicked inside DataFusion (an unexpected argument type):
    // refused, never a dropped call.
    for sql in [
        "SELECT COUNT(*) FROM visits WHERE length(repeat(zip3, 2)) > 0",
        "SELECT COUNT(*) FROM visits WHERE length(lpad(zip3, 3, 'x')) > 0",
        "SELECT COUNT(*) FROM visits WHERE character_length(repeat(zip3, 2)) > 0",
        // Table functions read no table of the dataset: refused when planned, not charged.
        "SELECT COUNT(*) FROM generate_series(1, 10)",
        "SELECT COUNT(*) FROM range(1, 10)",
    ] {
        match e.run(&req(sql, &all)).await {
            Err(Error::Refused { .. } | Error::InvalidQuery(_)) => {}
            other => panic!("{sql}: {other:?}"),
        }
    }
    // The same question as an IN list is fine.
    let list = (0..1200)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    e.run(&req(
        &format!("SELECT COUNT(*) FROM visits WHERE systolic_bp IN ({list})"),
        &all,
    ))
    .await
    .unwrap();
}

/// Pieces of generated predicates: columns, casts, divisions, functions, subqueries.
fn predicate() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("hba1c".to_string()),
        Just("systolic_bp".to_string()),
        Just("CAST(zip3 AS INT)".to_string()),
        Just("CAST(diagnosis AS DOUBLE)".to_string()),
        Just("length(zip3)".to_string()),
        (-3i64..3).prop_map(|v| v.to_string()),
        Just("(SELECT COUNT(*) FROM patients)".to_string()),
        Just("name".to_string()),
        Just("x.hba1c".to_string()),
    ];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} / {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} % {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a} - {b})")),
            inner.clone().prop_map(|a| format!("CAST({a} AS SMALLINT)")),
            inner.clone().prop_map(|a| format!("power({a}, 40)")),
            inner
                .clone()
                .prop_map(|a| format!("to_date(CAST({a} AS VARCHAR))")),
            inner.clone().prop_map(|a| format!("substr(zip3, 1, {a})")),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// A generated query gets the same refusal, or a result, on two datasets that differ in
    /// one patient: never an error that depends on the data.
    #[test]
    fn generated_queries_behave_alike_on_neighbouring_datasets(
        p in predicate(), victim in 0i64..40, alias in any::<bool>(),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let policy = Policy::from_toml(crate::tests::POLICY).unwrap();
        let all = visits(40);
        let keep: arrow::array::BooleanArray = all
            .column_by_name("patient_id")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .iter()
            .map(|v| Some(v != Some(1000 + victim)))
            .collect();
        let without = arrow::compute::filter_record_batch(&all, &keep).unwrap();
        let a = Engine::new(Dataset::from_batches(policy.clone(), vec![("visits".into(), vec![all])]).unwrap()).unwrap();
        let b = Engine::new(Dataset::from_batches(policy, vec![("visits".into(), vec![without])]).unwrap()).unwrap();
        let from = if alias { "visits x" } else { "visits" };
        let sql = format!("SELECT sex, COUNT(*) AS n FROM {from} WHERE {p} > 0 GROUP BY sex");
        let everyone = ConsentFilter::everyone();
        let ra = rt.block_on(a.run(&req(&sql, &everyone)));
        let rb = rt.block_on(b.run(&req(&sql, &everyone)));
        match (&ra, &rb) {
            (Ok(_), Ok(_)) => {}
            (Err(x), Err(y)) => {
                prop_assert_eq!(x.to_string(), y.to_string());
                prop_assert!(!matches!(x, Error::Failed { .. } | Error::Engine(_)), "{}: {}", sql, x);
            }
            _ => prop_assert!(false, "{}: {:?} vs {:?}", sql, ra.as_ref().err(), rb.as_ref().err()),
        }
    }
}

/// Groups kept by partition selection come out in the order of their keys, not in the order
/// the data holds them (the order in which each key first appears among the consented rows:
/// with `LIMIT 1` and no ORDER BY, the first consented patient's value).
#[tokio::test]
async fn selected_groups_are_released_in_key_order_not_the_datas() {
    let patients = 3000;
    let e = engine(patients);
    let table = visits(patients);
    let (pid, zip) = (
        table
            .column(0)
            .as_primitive::<arrow::datatypes::Int64Type>(),
        table.column(4).as_string::<i32>(),
    );
    let dropped: Vec<String> = (1000..1400).map(|p: i64| p.to_string()).collect();
    let mut first_is_not_smallest = false;
    for (filter, first) in [
        (ConsentFilter::everyone(), 1000),
        (crate::tests::exclude(&dropped), 1400),
    ] {
        // Ground truth: the zip3 of the first consented row.
        let row = (0..table.num_rows())
            .find(|&r| pid.value(r) == first)
            .unwrap();
        let first_zip = zip.value(row).to_string();
        let sql = "SELECT zip3, COUNT(*) AS n FROM visits GROUP BY zip3";
        let released =
            crate::tests::column_str(&e.run(&req(sql, &filter)).await.unwrap().batches, "zip3");
        assert!(released.len() >= 45, "{released:?}");
        let mut sorted = released.clone();
        sorted.sort();
        assert_eq!(released, sorted);
        let limited = format!("{sql} LIMIT 1");
        let one = crate::tests::column_str(
            &e.run(&req(&limited, &filter)).await.unwrap().batches,
            "zip3",
        );
        assert_eq!(one, [sorted[0].clone()]);
        first_is_not_smallest |= sorted[0] != first_zip;
    }
    // The order of the data would have shown: the test has a first patient whose zip3 is not
    // the smallest key.
    assert!(first_is_not_smallest);
}

/// A draw's outcome leaves on the release schedule: no earlier than its worst case (computed
/// before the draw from public figures) and then at a step, so draws that take 3 ms and 20 ms
/// (the rows of one patient more or less) hand on their outcome at the same step.
#[tokio::test]
async fn a_draws_timing_shows_only_its_step() {
    use crate::schedule::{on_schedule, release_at};
    use std::time::Duration;
    let ms = Duration::from_millis;
    let ladder = ms(25);
    for (worst, cost, step) in [
        (0, 0, 25),
        (0, 3, 25),
        (0, 20, 25),
        (0, 30, 50),
        (40, 3, 50),
        (40, 20, 50),
        (40, 49, 50),
        (40, 51, 100),
        (700, 3, 800),
    ] {
        assert_eq!(
            release_at(ladder, ms(worst), ms(cost)),
            ms(step),
            "{worst} {cost}"
        );
    }
    // Without a schedule (benchmarks only), at once; a schedule past any time, at once.
    assert_eq!(release_at(Duration::ZERO, ms(40), ms(7)), ms(7));
    assert_eq!(release_at(Duration::MAX, ms(0), ms(7)), Duration::MAX);
    for cost in [3, 20] {
        let began = std::time::Instant::now();
        on_schedule(ladder, ms(40), tokio::time::sleep(ms(cost))).await;
        assert!(began.elapsed() >= ms(50), "a draw of {cost} ms left early");
    }
}

/// The worst case a draw waits for comes from public figures only: the same whoever
/// consented, with the same query.
#[tokio::test]
async fn the_worst_case_is_the_same_whatever_the_data() {
    let ds = Dataset::from_batches(
        Policy::from_toml(crate::tests::POLICY).unwrap(),
        vec![
            ("visits".into(), vec![visits(300)]),
            ("patients".into(), vec![patients_table(300)]),
        ],
    )
    .unwrap();
    let e = Engine::with_limits(ds, Limits::default()).unwrap();
    let sql = "SELECT v.sex, COUNT(*) AS n FROM visits v JOIN patients p \
               ON v.patient_id = p.patient_id WHERE upper(v.diagnosis) = 'E11' GROUP BY v.sex";
    let nobody = crate::tests::include::<&str>(&[]);
    let some = crate::tests::include(&["1000", "1001"]);
    let mut seen = Vec::new();
    for filter in [ConsentFilter::everyone(), nobody, some] {
        let p = e
            .prepare(&req(sql, &filter), sql.to_string())
            .await
            .unwrap();
        assert!(p.worst > std::time::Duration::ZERO);
        seen.push(p.worst);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    let costs = crate::schedule::costs().await;
    assert!(costs.per_row > 0.0 && costs.per_call >= 0.0, "{costs:?}");
}

/// The timing oracle: an expensive expression evaluated only on a target's rows (a CASE on
/// their birth date, amplified by self-joins) made a query seconds slower exactly when the
/// target's rows held what was asked. A query buys at most [`crate::plan::MAX_CALLS`] cheap
/// calls per row: more is refused when planned, whoever consented.
#[tokio::test]
async fn a_query_cannot_buy_expensive_work_per_row() {
    let e = engine(200);
    let nested = |depth: usize| {
        let mut x = "diagnosis".to_string();
        for k in 0..depth {
            x = format!("{}({x})", ["upper", "lower", "reverse", "initcap"][k % 4]);
        }
        x
    };
    let sql = |depth: usize| {
        format!(
            "SELECT COUNT(*) AS n FROM visits WHERE CASE WHEN zip3 = '103' AND sex = 'F' \
             THEN character_length({}) > 0 ELSE false END",
            nested(depth)
        )
    };
    let nobody = crate::tests::include::<&str>(&[]);
    for filter in [ConsentFilter::everyone(), nobody] {
        // 31 nested calls and the length: 32, answered.
        e.run(&req(&sql(31), &filter)).await.unwrap();
        // One more: refused before a row is read, the same refusal whatever the data.
        match e.run(&req(&sql(32), &filter)).await {
            Err(Error::Refused { construct, .. }) => assert_eq!(construct, "33 function calls"),
            other => panic!("{other:?}"),
        }
    }
    // What a call costs stays within what the schedule measured, whatever the literals: `||`
    // (whose text no cap bounded), a literal over 256 bytes, a trim by a long set (its cost is
    // the text's length times the set's) are refused when planned, whoever consented.
    let long = "a".repeat(300);
    let set = "Z".repeat(40);
    for sql in [
        "SELECT COUNT(*) AS n FROM visits WHERE character_length(diagnosis || 'x') > 0".to_string(),
        format!(
            "SELECT COUNT(*) AS n FROM visits WHERE character_length(concat(diagnosis, '{long}')) > 0"
        ),
        format!(
            "SELECT COUNT(*) AS n FROM visits WHERE character_length(btrim(diagnosis, '{set}')) > 0"
        ),
        "SELECT COUNT(*) AS n FROM visits WHERE character_length(btrim(diagnosis, zip3)) > 0"
            .into(),
    ] {
        for filter in [
            ConsentFilter::everyone(),
            crate::tests::include::<&str>(&[]),
        ] {
            assert!(
                matches!(e.run(&req(&sql, &filter)).await, Err(Error::Refused { .. })),
                "{sql}"
            );
        }
    }
    // A short set, and concat of short literals, are fine.
    for sql in [
        "SELECT COUNT(*) AS n FROM visits WHERE character_length(btrim(diagnosis, 'E ')) > 0",
        "SELECT COUNT(*) AS n FROM visits WHERE character_length(concat(diagnosis, '-x')) > 3",
    ] {
        e.run(&req(sql, &ConsentFilter::everyone())).await.unwrap();
    }
}
