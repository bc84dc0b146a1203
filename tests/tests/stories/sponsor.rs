//! The sponsor: fetches a study's evidence bundle and verifies it offline.

use tonic::Code;

use crate::world::{World, key};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sponsor_verifies_which_dataset_versions_the_study_used() {
    let w = World::ready(1.0).await;
    let (h, _) = w
        .run(
            &key("alice"),
            World::dp("s1", "SELECT COUNT(*) AS n FROM visits", 0.5),
        )
        .await
        .unwrap();
    let mut l = w.ledger_client(&key("pharma"));
    let cp = l
        .checkpoint(proto::v1::CheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let vk = ledger::note::VerifierKey::parse(&cp.verifier_key).unwrap();
    assert_eq!(vk, *w.ledger.verifier_key());
    let json = l
        .bundle(proto::v1::BundleRequest { study: "s1".into() })
        .await
        .unwrap()
        .into_inner()
        .bundle_json;
    let bundle: ledger::bundle::Bundle = serde_json::from_str(&json).unwrap();
    let summary = ledger::bundle::verify_bundle(&bundle, &vk, Some(&cp.checkpoint)).unwrap();
    assert_eq!(summary.released, 1);
    assert_eq!(summary.datasets.len(), 1);
    let used = &summary.datasets[0];
    assert_eq!(
        (used.dataset.as_str(), used.version, used.digest.to_string()),
        ("visits", 1, h.dataset_digest.clone())
    );
    assert!((used.epsilon - 0.5).abs() < 1e-12);
    assert!(bundle.entries.iter().any(|e| e.index == h.receipt_index));

    // A tampered bundle fails.
    let mut bad = bundle.clone();
    bad.entries[0].leaf_b64 = bad.entries[1].leaf_b64.clone();
    assert!(ledger::bundle::verify_bundle(&bad, &vk, None).is_err());

    // The receipt's inclusion proof checks against the checkpoint.
    let proof = l
        .inclusion_proof(proto::v1::InclusionProofRequest {
            index: h.receipt_index,
            tree_size: cp.tree_size,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(proof.tree_size, cp.tree_size);
    let leaf = l
        .get_entry(proto::v1::GetEntryRequest {
            index: h.receipt_index,
        })
        .await
        .unwrap()
        .into_inner()
        .leaf;
    assert_eq!(leaf, w.ledger.leaf(h.receipt_index).unwrap());

    // Another sponsor gets neither the bundle nor the receipt.
    let mut rival = w.ledger_client(&key("rival"));
    let e = rival
        .bundle(proto::v1::BundleRequest { study: "s1".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = rival
        .get_entry(proto::v1::GetEntryRequest {
            index: h.receipt_index,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Out of range.
    let e = l
        .get_entry(proto::v1::GetEntryRequest { index: 1 << 40 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
}

/// A consistency proof between two sizes the broker served verifies against the ledger's own
/// roots; sizes it cannot prove are the caller's error, with the right code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_proofs_verify_and_bad_sizes_are_refused() {
    let w = World::ready(1.0).await;
    let mut l = w.ledger_client(&key("pharma"));
    let size = w.ledger.size();
    let old = size / 2;
    let p = l
        .consistency_proof(proto::v1::ConsistencyProofRequest {
            old_size: old,
            new_size: size,
        })
        .await
        .unwrap()
        .into_inner();
    use base64::Engine as _;
    let proof: Vec<Vec<u8>> = p
        .hashes
        .iter()
        .map(|h| base64::engine::general_purpose::STANDARD.decode(h).unwrap())
        .collect();
    let (r1, r2) = (w.ledger.root(old).unwrap(), w.ledger.root(size).unwrap());
    ledger::merkle::verify_consistency(old, size, &proof, &r1, &r2).unwrap();
    for (old_size, new_size, code) in [
        (0, size, Code::InvalidArgument),
        (size + 5, 0, Code::OutOfRange),
        (1, size + 100, Code::OutOfRange),
    ] {
        let e = l
            .consistency_proof(proto::v1::ConsistencyProofRequest { old_size, new_size })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{old_size} {new_size}: {e:?}");
    }
}
