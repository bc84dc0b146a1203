//! The custodian: registers dataset versions with their files and policy.

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
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
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
}
