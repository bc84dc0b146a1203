//! Demo mode: a synthetic hospital built through the broker's own interface is queryable at
//! once, and its consents on the ledger are exactly the ones it planned.

use std::os::unix::fs::PermissionsExt as _;

use broker::demo;
use ledger::ids::Timestamp;

use crate::world::World;

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_builds_a_queryable_hospital_with_its_consents_and_study() {
    let w = World::empty().await;
    let opts = demo::Options {
        patients: 300,
        seed: 11,
    };
    let info = demo::populate(w.dir.path(), &w.url, &w.operator, &opts)
        .await
        .unwrap();

    // Keys: one per principal, 0600, and the ledger knows each with its role.
    for p in &info.principals {
        let mode = std::fs::metadata(&p.key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", p.key_file.display());
        let key = ledger::keyfile::read_private_key(&p.key_file).unwrap();
        assert_eq!(key.name(), p.id);
        let st = w.ledger.state();
        let principal = st.principal(&p.id).unwrap();
        assert_eq!(principal.role.to_string(), p.role);
    }
    let roles: Vec<&str> = info.principals.iter().map(|p| p.role.as_str()).collect();
    for r in [
        "operator",
        "custodian",
        "irb",
        "researcher",
        "sponsor",
        "patient",
    ] {
        assert!(roles.contains(&r), "{r} in {roles:?}");
    }

    // The dataset: four tables, registered with the digest the custodian's files have.
    assert_eq!(
        info.dataset.tables.keys().collect::<Vec<_>>(),
        ["conditions", "encounters", "observations", "patients"]
    );
    assert_eq!(info.dataset.tables["patients"], 300);
    let reg = w
        .ledger
        .state()
        .dataset("ehr")
        .unwrap()
        .latest()
        .reg
        .clone();
    assert_eq!(reg.digest.to_string(), info.dataset.digest);

    // Consents on the ledger are exactly the planned ones that permit the study today.
    let ids: Vec<String> = {
        let f = std::fs::File::open(&info.dataset.source_files["patients"]).unwrap();
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(f, 1024).unwrap();
        let mut ids = Vec::new();
        for b in r {
            let b = b.unwrap();
            let a = arrow::array::cast::AsArray::as_string::<i32>(
                b.column_by_name("patient_id").unwrap(),
            );
            ids.extend(a.iter().map(|v| v.unwrap().to_owned()));
        }
        ids
    };
    let plan = demo::plan_consents(&ids, opts.seed);
    let now = Timestamp::now();
    let mut expected: Vec<String> = plan
        .iter()
        .flatten()
        .filter(|c| c.permits_study(&now.to_string()))
        .map(|c| c.subject.clone())
        .collect();
    expected.sort();
    let filter = w
        .ledger
        .state()
        .consent_filter("ehr", demo::STUDY, now)
        .unwrap();
    assert_eq!(
        filter.basis(),
        ledger::state::Basis::Include,
        "an opt-in dataset gives an include list"
    );
    let included: Vec<String> = filter.ids().iter().map(|s| s.as_str().to_owned()).collect();
    assert_eq!(included, expected);
    assert!(info.consents.revoked > 0 && info.consents.time_limited > 0);
    assert!(included.len() < info.consents.granted && !included.is_empty());

    // Alice can query at once; bob, not a member of the study, cannot.
    let alice = ledger::keyfile::read_private_key(&w.dir.path().join("keys/alice.key")).unwrap();
    let req = proto::v1::QueryRequest {
        study: demo::STUDY.into(),
        dataset: "ehr".into(),
        sql: "SELECT code, AVG(value) AS mean FROM observations GROUP BY code".into(),
        mode: proto::v1::Mode::Dp as i32,
        epsilon: 1.0,
        delta: 0.0,
        mechanism: String::new(),
        accuracy: 0.0,
    };
    let (header, batches) = w.run(&alice, req.clone()).await.unwrap();
    assert_eq!(header.epsilon_spent, 1.0);
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 6, "every LOINC code of the public domain");

    // Tables of the dataset join on the privacy unit: HbA1c by sex.
    let join = proto::v1::QueryRequest {
        sql: "SELECT p.sex, AVG(o.value) AS hba1c FROM observations o \
              JOIN patients p ON o.patient_id = p.patient_id \
              WHERE o.code = '4548-4' GROUP BY p.sex ORDER BY p.sex"
            .into(),
        ..req.clone()
    };
    let (header, batches) = w.run(&alice, join).await.unwrap();
    assert_eq!(header.epsilon_spent, 1.0);
    let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let names: Vec<&str> = b
        .schema_ref()
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names, ["sex", "hba1c", "hba1c_ci95"]);
    assert_eq!(b.num_rows(), 2, "both sexes of the public domain");

    // Answers a study can use: the bounds fit the data (one row per patient in patients,
    // labs bounded by their own ranges, at most 3 labs of a patient in one group).
    let at = |sql: &str, epsilon: f64| proto::v1::QueryRequest {
        sql: sql.into(),
        epsilon,
        delta: 0.0,
        ..req.clone()
    };
    let widths = |batches: &[arrow::array::RecordBatch], column: &str| -> Vec<f64> {
        use arrow::array::AsArray;
        batches
            .iter()
            .flat_map(|b| {
                let c = arrow::compute::cast(
                    b.column_by_name(column).unwrap(),
                    &arrow::datatypes::DataType::Float64,
                )
                .unwrap();
                c.as_primitive::<arrow::datatypes::Float64Type>()
                    .values()
                    .to_vec()
            })
            .collect()
    };
    for (sql, eps, column, widest) in [
        // A cohort count: patients with type 2 diabetes, sensitivity 1.
        (
            "SELECT COUNT(DISTINCT patient_id) AS n FROM conditions WHERE code = 'E11.9'",
            0.1,
            "n_ci95",
            35.0,
        ),
        (
            "SELECT sex, COUNT(DISTINCT patient_id) AS n FROM patients GROUP BY sex",
            0.1,
            "n_ci95",
            35.0,
        ),
        (
            "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
            0.1,
            "n_ci95",
            35.0,
        ),
    ] {
        let (_, batches) = w.run(&alice, at(sql, eps)).await.unwrap();
        let got = widths(&batches, column);
        assert!(
            !got.is_empty() && got.iter().all(|w| *w <= widest),
            "{sql}: {got:?}"
        );
    }
    // Mean HbA1c by sex: HbA1c's own bounds [4, 14] (half-range 5, not 200), sex from the
    // one-row patients table (one group per patient), one lab per patient and group: the
    // centred sum's sensitivity is 1 x 5 = 5, at epsilon 0.25 (half of 0.5) a scale of 20.
    let (h, _) = w
        .run(
            &alice,
            at(
                "SELECT p.sex, AVG(o.value) AS hba1c FROM observations o \
                 JOIN patients p ON o.patient_id = p.patient_id \
                 WHERE o.code = '4548-4' GROUP BY p.sex",
                0.5,
            ),
        )
        .await
        .unwrap();
    let m = &w.receipt(h.receipt_index).mechanism;
    assert_eq!(m["max_groups_per_unit"], 1);
    assert_eq!(m["max_rows_per_group"], 1);
    let scale = |what: &str| {
        m["statistics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["statistic"] == what)
            .unwrap()["scale"]
            .as_f64()
            .unwrap()
    };
    assert!((scale("centred sum 0") / 20.0 - 1.0).abs() < 0.01, "{m:?}");
    assert!((scale("count 0") / 4.0 - 1.0).abs() < 0.01, "{m:?}");
    // A join on anything but the patient is refused, and receipted.
    let cross = proto::v1::QueryRequest {
        sql: "SELECT COUNT(*) FROM observations o JOIN patients p ON o.code = p.sex".into(),
        ..req.clone()
    };
    let e = w.run(&alice, cross).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("not on the privacy unit"),
        "{}",
        e.message()
    );

    let bob = ledger::keyfile::read_private_key(&w.dir.path().join("keys/bob.key")).unwrap();
    let e = w.run(&bob, req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}
