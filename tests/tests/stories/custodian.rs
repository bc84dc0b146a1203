//! The custodian: registers dataset versions with their files and policy.

use arrow::array::AsArray;
use tonic::Code;

use crate::world::{POLICY, World, key, visits};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_custodian_registers_versions_and_bad_uploads_change_nothing() {
    let w = World::ready(1.0).await;
    let hospital = key("hospital");

    // A second version is accepted and listed; the same version again is not.
    let a = w.register_visits("visits", 2).await.unwrap();
    assert!(a.index > 0);
    let e = w.register_visits("visits", 2).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let list = w
        .registry(&hospital)
        .list_datasets(proto::v1::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<u32> = list.datasets.iter().map(|d| d.version).collect();
    assert_eq!(versions, vec![1, 2]);
    assert_eq!(list.datasets[1].rows, visits().num_rows() as u64);

    let before = w.ledger.size();
    // A policy that leaves a column unclassified.
    let partial = POLICY.replace(
        "sex = { class = \"public\", domain = [\"F\", \"M\"] }\n",
        "",
    );
    let f = w.data_file("v3.parquet", &visits());
    let e = w
        .upload(&hospital, "visits", 3, &partial, &f)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("sex"), "{}", e.message());

    // A domain that misses values the data holds: refused, naming the column and the count of
    // such rows, never a value.
    let narrow = POLICY.replace(r#"domain = ["F", "M"]"#, r#"domain = ["F"]"#);
    let male_rows = {
        let v = visits();
        let sex = v.column_by_name("sex").unwrap().as_string::<i32>().clone();
        sex.iter().filter(|s| *s == Some("M")).count()
    };
    assert!(male_rows > 0);
    let e = w
        .upload(&hospital, "visits", 3, &narrow, &f)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "table visits, column sex: {male_rows} row(s) hold a value outside the column's \
             domain; add the value(s) to the domain in policy.toml, or remove the domain to \
             have keys chosen by partition selection"
        )
    );
    // A domain whose values are not of the column's type (text keys on a float column).
    let mistyped = POLICY.replace(
        r#"hba1c = { class = "sensitive", bounds = [4.0, 14.0] }"#,
        r#"hba1c = { class = "public", domain = ["high", "low"] }"#,
    );
    assert_ne!(mistyped, POLICY);
    let e = w
        .upload(&hospital, "visits", 3, &mistyped, &f)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("column hba1c is Float64, and its domain does not fit it"),
        "{}",
        e.message()
    );

    // A column declared per_unit (one value per patient) that varies within patients:
    // refused, naming the column and the count of such patients (from the data), never a
    // value. sex, one per patient, may be declared so.
    let per_unit = |column: &str| {
        let line = POLICY
            .lines()
            .find(|l| l.starts_with(&format!("{column} = ")))
            .unwrap();
        POLICY.replace(line, &line.replace(" }", ", per_unit = true }"))
    };
    let varying_patients = {
        let v = visits();
        let ids = v
            .column_by_name("patient_id")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .clone();
        let h = v
            .column_by_name("hba1c")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>()
            .clone();
        let mut seen = std::collections::BTreeMap::<i64, std::collections::BTreeSet<u64>>::new();
        for (id, x) in ids.values().iter().zip(h.values()) {
            seen.entry(*id).or_default().insert(x.to_bits());
        }
        seen.values().filter(|s| s.len() > 1).count()
    };
    assert!(varying_patients > 0);
    let e = w
        .upload(&hospital, "visits", 3, &per_unit("hba1c"), &f)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        format!(
            "table visits, column hba1c: {varying_patients} patient(s) hold more than one value \
             in it, but the policy declares it per_unit (one value per patient); remove \
             per_unit from the column in policy.toml"
        )
    );

    // Only custodians register datasets.
    let e = w
        .upload(&key("alice"), "other", 1, POLICY, &f)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Bytes that do not match the signed manifest.
    let msgs = {
        let files = vec![("visits/part-0.parquet".to_owned(), f.as_path())];
        let reg = broker::client::dataset_body(
            "hospital",
            "visits",
            3,
            ledger::entry::ConsentBasis::OptIn,
            "patient_id",
            POLICY,
            &[("visits", files.clone())],
        )
        .unwrap();
        let mut msgs = broker::client::upload_messages(&hospital, reg, POLICY, &files).unwrap();
        if let Some(proto::v1::dataset_upload::Part::Chunk(c)) = &mut msgs[1].part {
            c.data[100] ^= 1;
        }
        msgs
    };
    let e = w
        .registry(&hospital)
        .register_dataset(crate::world::tokio_stream_iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("SHA-256"), "{}", e.message());
    assert_eq!(
        w.ledger.size(),
        before,
        "no refused upload reached the ledger"
    );
    let leftovers: Vec<_> = std::fs::read_dir(w.dir.path().join("datasets/visits"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut leftovers = leftovers;
    leftovers.sort();
    assert_eq!(leftovers, vec!["1", "2"], "no staging directory is left");
    // sex holds one value per patient: declared per_unit, the version is registered.
    w.upload(&hospital, "visits", 3, &per_unit("sex"), &f)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_one_version_keep_the_winners_files() {
    // Registrations of the same new version at once (each with other rows): one wins, the
    // others get ALREADY_EXISTS and leave nothing; the winner's files stay in place and the
    // version is queryable, also after a restart (a loser once removed the winner's files).
    let w = World::ready(10.0).await;
    let hospital = key("hospital");
    let all = visits();
    let files: Vec<_> = (0..6)
        .map(|i| {
            w.data_file(
                &format!("race-{i}.parquet"),
                &all.slice(0, all.num_rows() - i),
            )
        })
        .collect();
    let racers = files.iter().map(|f| {
        let w = &w;
        let hospital = &hospital;
        async move { w.upload(hospital, "visits", 2, POLICY, f).await }
    });
    let results = futures::future::join_all(racers).await;
    let won: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        }
    }
    let rows = all.num_rows() - won[0];
    let dir = w.dir.path().join("datasets/visits");
    let leftovers = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload"))
            .collect::<Vec<_>>()
    };
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    let count = "SELECT COUNT(*) AS n FROM visits";
    let alice = key("alice");
    w.run(&alice, World::dp("s1", count, 0.5)).await.unwrap();
    let w = w.restart().await;
    let (h, _) = w.run(&alice, World::dp("s1", count, 0.5)).await.unwrap();
    let r = w.receipt(h.receipt_index);
    assert_eq!(r.version, Some(2));
    let listed = w
        .registry(&hospital)
        .list_datasets(proto::v1::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.datasets[1].rows, rows as u64);
    // A stop between the append and the move into place: the version's files are still
    // staged. The version loads from them, and they move into place.
    let dir = w.dir.path().join("datasets/visits");
    std::fs::rename(dir.join("2"), dir.join(".upload-2-77")).unwrap();
    let w = w.restart().await;
    w.run(&alice, World::dp("s1", count, 0.5)).await.unwrap();
    assert!(dir.join("2").is_dir());
    assert_eq!(leftovers(&dir), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_upload_neither_belongs_to_others_nor_holds_up_a_shutdown() {
    // An upload stream that sends nothing, held open: by a patient it is refused at once (the
    // role is checked before the first message); by a custodian it no longer blocks a
    // shutdown past the drain time (it once blocked SIGTERM indefinitely).
    let mut w = World::ready(1.0).await;
    let silent = || futures::stream::pending::<proto::v1::DatasetUpload>();
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        w.registry(&key("p1000")).register_dataset(silent()),
    )
    .await
    .expect("refused without waiting for a message")
    .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let mut held = w.registry(&key("hospital"));
    let open = tokio::spawn(async move { held.register_dataset(silent()).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !open.is_finished(),
        "a custodian's upload stays open while it sends"
    );
    let started = std::time::Instant::now();
    w.running.take().unwrap().shutdown().await.unwrap();
    let took = started.elapsed();
    // The test world drains for 10 s.
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    open.abort();
}
