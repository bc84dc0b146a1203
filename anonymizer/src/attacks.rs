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

// ---------------------------------------------------------------------------------------------
// Per-unit keys and raw columns copied after the aggregate, judged by ground truth: each
// patient removed in turn, every raw column's movement against the calibration its noise gets.

/// A visits table whose columns declared `per_unit` vary within many patients (a wrong
/// declaration), with NULLs, -0.0, 0.0 and NaN (two payloads) in a float key, 1 to 9 visits
/// each (over the bound of 6 for some).
fn hostile_visits(patients: i64) -> RecordBatch {
    let mut x: u64 = 7;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as i64
    };
    let neg_nan = f64::from_bits(0xfff8_0000_0000_0000);
    let (mut pid, mut sex, mut zip, mut w, mut code, mut hba1c) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for p in 0..patients {
        let n = 1 + next() % 9;
        for _ in 0..n {
            pid.push(1000 + p);
            // Constant for most patients, varying for some.
            sex.push(if p % 5 == 0 {
                ["F", "M"][(next() % 2) as usize]
            } else if p % 2 == 0 {
                "F"
            } else {
                "M"
            });
            zip.push(if p % 3 == 0 {
                [None, Some("100"), Some("101"), Some("102"), Some("103")][(next() % 5) as usize]
            } else {
                Some(["100", "101", "102"][(p % 3) as usize])
            });
            w.push(if p % 4 == 0 {
                [
                    Some(-0.0),
                    Some(0.0),
                    Some(f64::NAN),
                    Some(neg_nan),
                    Some(1.0),
                    None,
                ][(next() % 6) as usize]
            } else {
                Some(1.0)
            });
            code.push(["A", "B", "C"][(next() % 3) as usize]);
            hba1c.push(match next() % 10 {
                0 => Some(20.0),
                1 => Some(f64::NAN),
                2 => None,
                _ => Some(4.0 + (next() % 100) as f64 / 10.0),
            });
        }
    }
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("sex", DataType::Utf8, false),
            Field::new("zip3", DataType::Utf8, true),
            Field::new("w", DataType::Float64, true),
            Field::new("code", DataType::Utf8, false),
            Field::new("hba1c", DataType::Float64, true),
        ])),
        vec![
            Arc::new(Int64Array::from(pid)),
            Arc::new(StringArray::from(sex)),
            Arc::new(StringArray::from(zip)),
            Arc::new(Float64Array::from(w)),
            Arc::new(StringArray::from(code)),
            Arc::new(Float64Array::from(hba1c)),
        ],
    )
    .unwrap()
}

/// One lab row per visit-ish: a `lab` column declared per unit (wrongly) and a bounded value.
fn hostile_labs(patients: i64) -> RecordBatch {
    let (mut pid, mut lab, mut value) = (vec![], vec![], vec![]);
    for p in 0..patients {
        for j in 0..(1 + p % 4) {
            pid.push(1000 + p);
            lab.push(if p % 2 == 0 {
                ["x", "y", "z"][(j % 3) as usize]
            } else {
                "x"
            });
            value.push(1.0 + ((p * 7 + j * 3) % 50) as f64);
        }
    }
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("lab", DataType::Utf8, false),
            Field::new("value", DataType::Float64, false),
        ])),
        vec![
            Arc::new(Int64Array::from(pid)),
            Arc::new(StringArray::from(lab)),
            Arc::new(Float64Array::from(value)),
        ],
    )
    .unwrap()
}

const HOSTILE_POLICY: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 6

[tables.visits.columns]
patient_id = { class = "privacy_unit" }
sex = { class = "public", domain = ["F", "M"], per_unit = true }
zip3 = { class = "quasi_identifier", per_unit = true }
w = { class = "sensitive", per_unit = true }
code = { class = "public", domain = ["A", "B", "C"] }
hba1c = { class = "sensitive", bounds = [4.0, 14.0] }

[tables.patients]
max_rows_per_unit = 1

[tables.patients.columns]
patient_id = { class = "privacy_unit" }
smoker = { class = "public", domain = ["no", "yes"] }
weight = { class = "sensitive", bounds = [40.0, 150.0] }

[tables.labs]
max_rows_per_unit = 3

[tables.labs.columns]
patient_id = { class = "privacy_unit" }
lab = { class = "public", per_unit = true }
value = { class = "sensitive", bounds = [0.0, 60.0] }
"#;

/// The hostile policies: as written; with 3 groups and 2 rows per group (so that one group
/// narrows rows too); and with one row per patient everywhere (k = 1).
fn hostile_policies() -> Vec<(&'static str, Policy)> {
    let edit = |from: &str, to: &str| {
        assert!(HOSTILE_POLICY.contains(from), "{from}");
        Policy::from_toml(&HOSTILE_POLICY.replace(from, to)).unwrap()
    };
    vec![
        ("hostile", Policy::from_toml(HOSTILE_POLICY).unwrap()),
        (
            "hostile 3 groups 2 per group",
            edit(
                "max_rows_per_unit = 6\n",
                "max_rows_per_unit = 6\nmax_groups_per_unit = 3\nmax_rows_per_group = 2\n",
            ),
        ),
        (
            "hostile k = 1",
            Policy::from_toml(
                &HOSTILE_POLICY
                    .replace("max_rows_per_unit = 6\n", "max_rows_per_unit = 1\n")
                    .replace("max_rows_per_unit = 3\n", "max_rows_per_unit = 1\n"),
            )
            .unwrap(),
        ),
    ]
}

fn hostile_engine(policy: Policy, patients: i64) -> Engine {
    let ds = Dataset::from_batches(
        policy,
        vec![
            ("visits".into(), vec![hostile_visits(patients)]),
            (
                "patients".into(),
                vec![crate::tests::patients_table(patients)],
            ),
            ("labs".into(), vec![hostile_labs(patients)]),
        ],
    )
    .unwrap();
    Engine::with_limits(ds, crate::Limits::unscheduled()).unwrap()
}

/// Each group's key, injectively (the row format of the key columns: two NaN payloads, -0.0
/// and 0.0 are told apart), with whether any key is NULL.
fn group_keys(x: &RecordBatch, n_keys: usize) -> Vec<(Vec<u8>, bool)> {
    if n_keys == 0 {
        return (0..x.num_rows()).map(|_| (Vec::new(), false)).collect();
    }
    let cols: Vec<arrow::array::ArrayRef> = x.columns()[..n_keys].to_vec();
    let conv = arrow::row::RowConverter::new(
        cols.iter()
            .map(|c| arrow::row::SortField::new(c.data_type().clone()))
            .collect(),
    )
    .unwrap();
    let rows = conv.convert_columns(&cols).unwrap();
    (0..x.num_rows())
        .map(|r| {
            (
                rows.row(r).as_ref().to_vec(),
                cols.iter().any(|c| c.is_null(r)),
            )
        })
        .collect()
}

/// How far raw column `col` moved between `a` and `b`, group by group (matched by key); with
/// `public`, groups with a NULL key (never released) are left out.
fn diffs_by_key(
    a: &RecordBatch,
    b: &RecordBatch,
    n_keys: usize,
    col: &str,
    public: bool,
) -> Vec<(Vec<u8>, f64)> {
    let map = |x: &RecordBatch| -> std::collections::HashMap<Vec<u8>, f64> {
        let v = arrow::compute::cast(x.column_by_name(col).unwrap(), &DataType::Float64).unwrap();
        let v = v.as_primitive::<Float64Type>();
        let mut out = std::collections::HashMap::new();
        for (r, (k, null)) in group_keys(x, n_keys).into_iter().enumerate() {
            if public && null {
                continue;
            }
            let prev = out.insert(k, if v.is_valid(r) { v.value(r) } else { 0.0 });
            assert!(prev.is_none(), "two raw groups with one key");
        }
        out
    };
    let (ma, mb) = (map(a), map(b));
    let keys: std::collections::BTreeSet<&Vec<u8>> = ma.keys().chain(mb.keys()).collect();
    keys.into_iter()
        .map(|k| {
            let d = (ma.get(k).unwrap_or(&0.0) - mb.get(k).unwrap_or(&0.0)).abs();
            (k.clone(), d)
        })
        .collect()
}

/// How far raw column `col` moved between `a` and `b` over the groups: (L1, L2).
fn moved_by_key(
    a: &RecordBatch,
    b: &RecordBatch,
    n_keys: usize,
    col: &str,
    public: bool,
) -> (f64, f64) {
    let d = diffs_by_key(a, b, n_keys, col, public);
    (
        d.iter().map(|(_, x)| x).sum(),
        d.iter().map(|(_, x)| x * x).sum::<f64>().sqrt(),
    )
}

/// The largest ratio, over victims, of a raw column's movement to its calibration for `sql`:
/// L1 and L2 of every raw column; the groups any raw column moved in (L0) against the groups
/// a patient may reach (`__u`'s L1: g, or min(g, keys) over public keys), what partition
/// selection and the quantiles' budget split assume; the largest move of `__n` in one group
/// (L-infinity) against the rows per group `c` (`__n`'s L2² / L1).
async fn worst_over_victims(
    e: &Engine,
    sql: &str,
    n_keys: usize,
    public: bool,
    victims: impl Iterator<Item = i64>,
) -> (f64, String) {
    let all = ConsentFilter::everyone();
    let a = e
        .raw_for_tests(sql, &all)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    let cal = e.calibration_for_tests(sql).await.unwrap();
    let get = |c: &str| cal.iter().find(|(n, _)| n == c).unwrap().1;
    let reach = get("__u").l1;
    let rows = get("__n");
    let c = rows.l2 * rows.l2 / rows.l1;
    let mut worst = (0.0, String::new());
    let mut note = |r: f64, what: String| {
        if r > worst.0 {
            worst = (r, what);
        }
    };
    for v in victims {
        let b = e
            .raw_for_tests(sql, &crate::tests::exclude(&[v.to_string()]))
            .await
            .unwrap();
        let mut changed = std::collections::BTreeSet::new();
        for (col, sens) in &cal {
            if a.column_by_name(col).is_none() {
                continue;
            }
            let d = diffs_by_key(&a, &b, n_keys, col, public);
            changed.extend(d.iter().filter(|(_, x)| *x > 0.0).map(|(k, _)| k.clone()));
            let d1: f64 = d.iter().map(|(_, x)| x).sum();
            let d2 = d.iter().map(|(_, x)| x * x).sum::<f64>().sqrt();
            for (what, d, s) in [("L1", d1, sens.l1), ("L2", d2, sens.l2)] {
                note(
                    d / s,
                    format!("victim {v}, {col}: moved {d} in {what} against {s}"),
                );
            }
            if col == "__n" {
                let most = d.iter().map(|(_, x)| *x).fold(0.0, f64::max);
                note(
                    most / c,
                    format!("victim {v}, __n: moved {most} in one group against c = {c}"),
                );
            }
        }
        note(
            changed.len() as f64 / reach,
            format!("victim {v}: {} groups moved against {reach}", changed.len()),
        );
    }
    worst
}

/// GROUP BY keys over columns declared per unit (wrongly, for many patients), alone, in
/// expressions, with NULLs, -0.0/0.0/NaN, a constant, through joins and self-joins, with
/// COUNT(*) and COUNT(DISTINCT) copied from the group size and patient count: (sql, keys,
/// public keys).
const PER_UNIT_QUERIES: &[(&str, usize, bool)] = &[
    // Selected keys by patients: COUNT(DISTINCT) is a copy of __u.
    (
        "SELECT zip3, COUNT(*), COUNT(DISTINCT patient_id), SUM(hba1c), AVG(hba1c) FROM visits GROUP BY zip3",
        1,
        false,
    ),
    // Selected by rows: COUNT(*) is a copy of __n, thresholded.
    ("SELECT zip3, COUNT(*) FROM visits GROUP BY zip3", 1, false),
    (
        "SELECT zip3, COUNT(*), SUM(hba1c), VAR(hba1c) FROM visits GROUP BY zip3",
        1,
        false,
    ),
    // Public per-unit key, declared wrongly for one patient in five.
    (
        "SELECT sex, COUNT(DISTINCT patient_id), COUNT(*), SUM(hba1c) FROM visits GROUP BY sex",
        1,
        true,
    ),
    // CASE mixing a per-unit column with literals, NULL branch: public.
    (
        "SELECT CASE WHEN sex = 'F' THEN 'f' END, COUNT(DISTINCT patient_id), COUNT(*) FROM visits \
          GROUP BY CASE WHEN sex = 'F' THEN 'f' END",
        1,
        true,
    ),
    (
        "SELECT CASE WHEN zip3 IS NULL THEN 'none' WHEN sex = 'F' THEN 'a' ELSE 'b' END, \
          COUNT(DISTINCT patient_id), SUM(hba1c) FROM visits \
          GROUP BY CASE WHEN zip3 IS NULL THEN 'none' WHEN sex = 'F' THEN 'a' ELSE 'b' END",
        1,
        true,
    ),
    // Two per-unit columns in one expression, NULLs in one.
    (
        "SELECT coalesce(zip3, sex), COUNT(DISTINCT patient_id), COUNT(*) FROM visits GROUP BY coalesce(zip3, sex)",
        1,
        false,
    ),
    (
        "SELECT concat(zip3, sex), COUNT(*) FROM visits GROUP BY concat(zip3, sex)",
        1,
        false,
    ),
    (
        "SELECT sex, zip3, COUNT(DISTINCT patient_id), COUNT(*) FROM visits GROUP BY sex, zip3",
        2,
        false,
    ),
    // A float key: -0.0, 0.0, NaN of two signs, NULL; and expressions folding some together.
    (
        "SELECT w, COUNT(DISTINCT patient_id), COUNT(*), SUM(hba1c) FROM visits GROUP BY w",
        1,
        false,
    ),
    (
        "SELECT abs(w), COUNT(DISTINCT patient_id), COUNT(*) FROM visits GROUP BY abs(w)",
        1,
        false,
    ),
    ("SELECT -w, COUNT(*) FROM visits GROUP BY -w", 1, false),
    (
        "SELECT round(w), COUNT(DISTINCT patient_id) FROM visits GROUP BY round(w)",
        1,
        false,
    ),
    (
        "SELECT CAST(w AS VARCHAR), COUNT(*) FROM visits GROUP BY CAST(w AS VARCHAR)",
        1,
        false,
    ),
    // Keys without columns (vacuously per unit), alone and with a per-unit key.
    (
        "SELECT COUNT(DISTINCT patient_id), COUNT(*) FROM visits GROUP BY current_date",
        1,
        false,
    ),
    (
        "SELECT current_date, zip3, COUNT(DISTINCT patient_id), COUNT(*) FROM visits GROUP BY current_date, zip3",
        2,
        false,
    ),
    // A per-unit key with a key that is not: no narrowing, the policy's bounds.
    (
        "SELECT zip3, code, COUNT(DISTINCT patient_id), COUNT(*) FROM visits GROUP BY zip3, code",
        2,
        false,
    ),
    // Joins: a one-row table's key with a wrongly per-unit key of another table.
    (
        "SELECT p.smoker, v.zip3, COUNT(*), COUNT(DISTINCT v.patient_id), SUM(v.hba1c) \
          FROM patients p JOIN visits v ON p.patient_id = v.patient_id GROUP BY p.smoker, v.zip3",
        2,
        false,
    ),
    (
        "SELECT p.smoker, COUNT(*), COUNT(DISTINCT p.patient_id), SUM(p.weight) \
          FROM patients p JOIN visits v ON p.patient_id = v.patient_id GROUP BY p.smoker",
        1,
        true,
    ),
    (
        "SELECT concat(p.smoker, v.zip3), COUNT(*), SUM(v.hba1c) \
          FROM patients p JOIN visits v ON p.patient_id = v.patient_id GROUP BY concat(p.smoker, v.zip3)",
        1,
        false,
    ),
    // Self-joins: each side's per-unit key, the pair varying across the joined rows.
    (
        "SELECT a.zip3, b.zip3, COUNT(*), COUNT(DISTINCT a.patient_id) \
          FROM visits a JOIN visits b ON a.patient_id = b.patient_id GROUP BY a.zip3, b.zip3",
        2,
        false,
    ),
    (
        "SELECT concat(a.zip3, b.sex), COUNT(*), SUM(b.hba1c) \
          FROM visits a JOIN visits b ON a.patient_id = b.patient_id AND a.zip3 <> b.zip3 \
          GROUP BY concat(a.zip3, b.sex)",
        1,
        false,
    ),
    (
        "SELECT a.w, COUNT(*), COUNT(DISTINCT b.patient_id) \
          FROM visits a JOIN visits b ON CAST(a.patient_id AS INT) = b.patient_id GROUP BY a.w",
        1,
        false,
    ),
    // Another table's per-unit key (wrong for half the patients) with this one's.
    (
        "SELECT l.lab, v.sex, COUNT(*), COUNT(DISTINCT v.patient_id), SUM(l.value) \
          FROM labs l JOIN visits v ON l.patient_id = v.patient_id GROUP BY l.lab, v.sex",
        2,
        false,
    ),
    (
        "SELECT l.lab, COUNT(*), AVG(l.value) FROM labs l GROUP BY l.lab",
        1,
        false,
    ),
    (
        "SELECT l.lab, p.smoker, COUNT(*), COUNT(DISTINCT p.patient_id) \
          FROM labs l JOIN patients p ON l.patient_id = p.patient_id \
          JOIN visits v ON v.patient_id = p.patient_id GROUP BY l.lab, p.smoker",
        2,
        false,
    ),
    // Every statistic copied from __n or __u at once, some twice.
    (
        "SELECT zip3, COUNT(*) AS a, COUNT(1) AS b, COUNT(patient_id) AS c, \
          COUNT(DISTINCT patient_id) AS d, COUNT(DISTINCT patient_id) AS e, SUM(hba1c) AS f \
          FROM visits GROUP BY zip3",
        1,
        false,
    ),
    (
        "SELECT sex, COUNT(*) AS a, COUNT(1) AS b, COUNT(zip3) AS c FROM visits GROUP BY sex",
        1,
        true,
    ),
    // Two public keys over per-unit columns, one a CASE recoding.
    (
        "SELECT sex, CASE WHEN zip3 < '102' THEN 'lo' ELSE 'hi' END, COUNT(DISTINCT patient_id), COUNT(*) \
          FROM visits GROUP BY sex, CASE WHEN zip3 < '102' THEN 'lo' ELSE 'hi' END",
        2,
        true,
    ),
];

/// No patient moves any raw column of [`PER_UNIT_QUERIES`] beyond its calibration under the
/// hostile policy `which`; patients chosen to vary in every per-unit column, in some, in none.
async fn per_unit_keys_within_calibration(which: &str) {
    let patients = 20;
    let policy = hostile_policies()
        .into_iter()
        .find(|(n, _)| *n == which)
        .unwrap()
        .1;
    let e = hostile_engine(policy, patients);
    let victims = [0i64, 1, 3, 4, 5, 6, 8, 10, 12, 15];
    let mut failures = Vec::new();
    for (sql, n_keys, public) in PER_UNIT_QUERIES {
        let (r, what) =
            worst_over_victims(&e, sql, *n_keys, *public, victims.iter().map(|v| 1000 + v)).await;
        println!("{which}: {r:.3} {sql} [{what}]");
        if r > 1.0 + 1e-9 {
            failures.push(format!("{which}: {sql}: {what}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_unit_keys_never_move_a_raw_column_beyond_its_calibration() {
    // The data makes the declarations wrong: without them, a patient's removal moves the
    // patient counts over zip3, w, sex and lab by more than the one group they claim.
    let undeclared = Policy::from_toml(&HOSTILE_POLICY.replace(", per_unit = true", "")).unwrap();
    let e = hostile_engine(undeclared, 20);
    for (sql, victim) in [
        (
            "SELECT zip3, COUNT(DISTINCT patient_id) FROM visits GROUP BY zip3",
            "1000",
        ),
        (
            "SELECT w, COUNT(DISTINCT patient_id) FROM visits GROUP BY w",
            "1000",
        ),
        (
            "SELECT sex, COUNT(DISTINCT patient_id) FROM visits GROUP BY sex",
            "1000",
        ),
        (
            "SELECT lab, COUNT(DISTINCT patient_id) FROM labs GROUP BY lab",
            "1002",
        ),
    ] {
        let a = e
            .raw_for_tests(sql, &ConsentFilter::everyone())
            .await
            .unwrap();
        let b = e
            .raw_for_tests(sql, &crate::tests::exclude(&[victim]))
            .await
            .unwrap();
        let (d, _) = moved_by_key(&a, &b, 1, "__s0_n", false);
        assert!(d > 1.0, "{sql}: patient {victim} is in {d} groups");
    }
    per_unit_keys_within_calibration("hostile").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_unit_keys_within_calibration_with_groups_and_rows_per_group_bounded() {
    per_unit_keys_within_calibration("hostile 3 groups 2 per group").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_unit_keys_within_calibration_with_one_row_per_patient() {
    per_unit_keys_within_calibration("hostile k = 1").await;
}

/// Quantiles over per-unit keys: each patient changes the values of at most as many groups as
/// the budget is split over (`__u`'s calibration: min(g, keys)), and at most `c` values in
/// each (the rows per group the quantile mechanism is given), `c` read from `__n`'s
/// calibration (L2² / L1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_unit_quantiles_change_at_most_their_groups() {
    let patients = 20;
    let victims = [0i64, 3, 4, 5, 8, 10, 15];
    for (name, policy) in hostile_policies() {
        let e = hostile_engine(policy, patients);
        for (sql, n_keys) in [
            ("SELECT zip3, MEDIAN(hba1c) FROM visits GROUP BY zip3", 1),
            ("SELECT sex, MEDIAN(hba1c) FROM visits GROUP BY sex", 1),
            (
                "SELECT w, PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY hba1c) FROM visits GROUP BY w",
                1,
            ),
            (
                "SELECT a.zip3, MEDIAN(b.hba1c) FROM visits a JOIN visits b ON a.patient_id = b.patient_id GROUP BY a.zip3",
                1,
            ),
        ] {
            let cal = e.calibration_for_tests(sql).await.unwrap();
            let get = |c: &str| cal.iter().find(|(n, _)| n == c).unwrap().1;
            let reach = get("__u").l1;
            let n = get("__n");
            let c = (n.l2 * n.l2 / n.l1).round();
            let values = |b: &RecordBatch| -> std::collections::HashMap<Vec<u8>, Vec<u64>> {
                let list = b.column_by_name("__s0_values").unwrap().as_list::<i32>();
                group_keys(b, n_keys)
                    .into_iter()
                    .enumerate()
                    .map(|(r, (k, _))| {
                        let mut v: Vec<u64> = if list.is_valid(r) {
                            list.value(r)
                                .as_primitive::<Float64Type>()
                                .iter()
                                .flatten()
                                .map(f64::to_bits)
                                .collect()
                        } else {
                            Vec::new()
                        };
                        v.sort();
                        (k, v)
                    })
                    .collect()
            };
            let all = values(
                &e.raw_for_tests(sql, &ConsentFilter::everyone())
                    .await
                    .unwrap(),
            );
            for v in victims {
                let b = e
                    .raw_for_tests(sql, &crate::tests::exclude(&[(1000 + v).to_string()]))
                    .await
                    .unwrap();
                let without = values(&b);
                let (mut groups, mut most) = (0, 0usize);
                for (k, with) in &all {
                    let wo = without.get(k).cloned().unwrap_or_default();
                    // Removing a patient only removes values: what is left is a sub-multiset.
                    let mut rest = with.clone();
                    for x in &wo {
                        let i = rest
                            .iter()
                            .position(|y| y == x)
                            .unwrap_or_else(|| panic!("{name}: {sql}: victim {v} added a value"));
                        rest.remove(i);
                    }
                    if !rest.is_empty() {
                        groups += 1;
                        most = most.max(rest.len());
                    }
                }
                println!(
                    "{name}: {sql}: victim {v}: {groups} groups (reach {reach}), {most} values (c {c})"
                );
                assert!(
                    groups as f64 <= reach && most as f64 <= c,
                    "{name}: {sql}: victim {v} changed {groups} groups (reach {reach}), \
                     up to {most} values in one (c {c})"
                );
            }
        }
    }
}

/// A public float key's groups are looked up by the key as the engine prints it, and both
/// signs of NaN print "NaN" though DataFusion groups them apart: with "NaN" in a domain, the
/// released cell would be one of the two groups, chosen by the data (one patient with the
/// other sign moved it by 38 of 40). A domain may list finite numbers only, written as the
/// column's type prints them; NaN rows are then in no released group, whatever their sign.
#[tokio::test]
async fn a_public_float_key_is_finite_and_released_from_its_one_group() {
    let n = 40i64;
    let neg_nan = f64::from_bits(0xfff8_0000_0000_0000);
    let policy = |domain: &str| {
        Policy::from_toml(&format!(
            "privacy_unit = \"patient_id\"\nmax_rows_per_unit = 1\n[tables.t.columns]\n\
             patient_id = {{ class = \"privacy_unit\" }}\n\
             w = {{ class = \"public\", domain = {domain} }}\n"
        ))
        .unwrap()
    };
    // Patients 0..20 have w = 1, the others NaN of either sign (the victim's the other one).
    let table = |victim: i64| {
        let ids: Vec<i64> = (0..n).map(|p| 1000 + p).collect();
        let w: Vec<f64> = (0..n)
            .map(|p| match p {
                p if p < 20 => 1.0,
                p if p == victim => neg_nan,
                _ => f64::NAN,
            })
            .collect();
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("patient_id", DataType::Int64, false),
                Field::new("w", DataType::Float64, true),
            ])),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(Float64Array::from(w)),
            ],
        )
        .unwrap()
    };
    for (domain, says) in [
        (r#"["NaN", "1"]"#, "not a finite number"),
        (r#"["1", "-inf"]"#, "not a finite number"),
        (r#"["1.50"]"#, "reads as \"1.5\""),
    ] {
        let err =
            Dataset::from_batches(policy(domain), vec![("t".into(), vec![table(39)])]).unwrap_err();
        assert!(err.to_string().contains(says), "{domain}: {err}");
    }
    for victim in [20, n - 1] {
        let ds = Dataset::from_batches(
            policy(r#"["1", "2"]"#),
            vec![("t".into(), vec![table(victim)])],
        )
        .unwrap();
        let e = Engine::with_limits(ds, crate::Limits::unscheduled()).unwrap();
        let sql = "SELECT w, COUNT(*) AS n FROM t GROUP BY w";
        for filter in [
            ConsentFilter::everyone(),
            crate::tests::exclude(&[(1000 + victim).to_string()]),
        ] {
            let mut r = req(sql, &filter);
            r.epsilon = 1e4;
            r.budget = ledger::budget::Account::new(1e5, 1e-6);
            let out = e.run(&r).await.unwrap();
            let b = &out.batches[0];
            let keys = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            let keys = keys.as_string::<i32>();
            let counts = b
                .column_by_name("n")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            let cells: Vec<(&str, i64)> = (0..b.num_rows())
                .map(|i| (keys.value(i), counts.value(i)))
                .collect();
            // The domain's keys only, at the truth (20 patients hold 1, none 2): the NaN rows
            // are in no released group, with the victim or without.
            assert_eq!(cells, vec![("1.0", 20), ("2.0", 0)], "victim {victim}");
        }
    }
}
