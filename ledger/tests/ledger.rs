//! The ledger through its public API: appends, rules, state queries, proofs, reopen.

mod common;

use common::*;
use ledger::entry::*;
use ledger::ids::*;
use ledger::merkle;
use ledger::note::{self, SignerKey};
use ledger::state::{Basis, ConsentFilter};
use ledger::{Error, Ledger};

#[test]
fn appends_are_proven_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let size = w.ledger.size();
    assert_eq!(
        size, 9,
        "genesis + 5 principals + dataset + study + approval"
    );
    let cp_text = w.ledger.checkpoint().unwrap();
    let cp = note::open_checkpoint(
        w.ledger.verifier_key(),
        &cp_text,
        Some("test.consentry/ledger"),
    )
    .unwrap();
    assert_eq!(cp.size, size);
    for i in 0..size {
        let leaf = w.ledger.leaf(i).unwrap();
        let proof = w.ledger.inclusion_proof(i, None).unwrap();
        merkle::verify_inclusion(&merkle::leaf_hash(&leaf), i, size, &proof, &cp.root).unwrap();
    }
    let a = w
        .ledger
        .append(
            w.custodian
                .sign(consent_body(&w.custodian, "c1", "MRN-1", "ehr", &["GRU"])),
        )
        .unwrap();
    assert_eq!(a.index, size);
    let old_root = cp.root;
    let proof = w.ledger.consistency_proof(size, None).unwrap();
    merkle::verify_consistency(
        size,
        size + 1,
        &proof,
        &old_root,
        &w.ledger.root(size + 1).unwrap(),
    )
    .unwrap();

    let root = w.ledger.root(size + 1).unwrap();
    let key = w.ledger.verifier_key().clone();
    let dirp = dir.path().to_path_buf();
    drop(w);
    let (reopened, report) = Ledger::open(&dirp, config()).unwrap();
    assert_eq!(report.entries, size + 1);
    assert_eq!(report.truncated_bytes, 0);
    assert_eq!(reopened.root(size + 1).unwrap(), root);
    assert_eq!(reopened.verifier_key(), &key);
    let e = reopened.entry(size).unwrap();
    assert_eq!(e.entry.body.kind(), "consent_granted");
    let state = reopened.state();
    assert!(state.may_act("st-mary", Role::Custodian));
    assert!(!state.may_act("st-mary", Role::Irb));
    let report = ledger::verify(&dirp, &|_, _| {}).unwrap();
    assert_eq!(report.entries, size + 1);
}

#[test]
fn refusals_are_typed_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let before = w.ledger.size();
    let root = w.ledger.root(before).unwrap();
    let stranger = Actor::new("stranger");

    // Unknown author.
    let e = w
        .ledger
        .append(stranger.sign(consent_body(&stranger, "c", "MRN-1", "ehr", &["GRU"])));
    assert!(matches!(e, Err(Error::UnknownPrincipal(_))), "{e:?}");
    // Bad signature: signed by another key under the custodian's name.
    let impostor = Actor {
        id: w.custodian.id.clone(),
        key: SignerKey::generate("st-mary").unwrap(),
    };
    let e =
        w.ledger
            .append(impostor.sign(consent_body(&w.custodian, "c", "MRN-1", "ehr", &["GRU"])));
    assert!(matches!(e, Err(Error::BadSignature { .. })), "{e:?}");
    // Tampered after signing.
    let mut signed = w
        .custodian
        .sign(consent_body(&w.custodian, "c", "MRN-1", "ehr", &["GRU"]));
    signed.entry.time = signed.entry.time.plus_secs(1);
    assert!(matches!(
        w.ledger.append(signed),
        Err(Error::BadSignature { .. })
    ));
    // Wrong role: a researcher cannot register a dataset.
    let e = w.ledger.append(w.researcher.sign(dataset_body(
        &w.researcher,
        "x",
        1,
        ConsentBasis::OptIn,
    )));
    assert!(matches!(e, Err(Error::WrongRole { .. })), "{e:?}");
    // Wrong object: an IRB approving twice is fine, another IRB is not.
    let other_irb = Actor::new("irb-other");
    w.ledger
        .append_as_operator(other_irb.registration(Role::Irb, None))
        .unwrap();
    let before = before + 1;
    let root = if before > 0 {
        w.ledger.root(before).unwrap()
    } else {
        root
    };
    let e = w
        .ledger
        .append(other_irb.sign(Body::StudySuspended(StudyStatus {
            study: study_id("t2d"),
            reason: "x".into(),
        })));
    assert!(matches!(e, Err(Error::Forbidden(_))), "{e:?}");
    // Unknown dataset.
    let e = w.ledger.append(w.custodian.sign(consent_body(
        &w.custodian,
        "c",
        "MRN-1",
        "nope",
        &["GRU"],
    )));
    assert!(matches!(e, Err(Error::NotFound { .. })), "{e:?}");
    // A registered version exists already; versions increase.
    let e = w.ledger.append(w.custodian.sign(dataset_body(
        &w.custodian,
        "ehr",
        1,
        ConsentBasis::OptIn,
    )));
    assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
    w.ledger
        .append(
            w.custodian
                .sign(dataset_body(&w.custodian, "ehr", 3, ConsentBasis::OptIn)),
        )
        .unwrap();
    let e = w.ledger.append(w.custodian.sign(dataset_body(
        &w.custodian,
        "ehr",
        2,
        ConsentBasis::OptIn,
    )));
    assert!(matches!(e, Err(Error::Invalid(_))), "{e:?}");
    // Clock skew.
    let mut entry = w
        .custodian
        .sign(consent_body(&w.custodian, "c", "MRN-1", "ehr", &["GRU"]))
        .entry;
    entry.time = entry.time.plus_secs(-3600);
    let e = w.ledger.append(SignedEntry::sign(&w.custodian.key, entry));
    assert!(matches!(e, Err(Error::ClockSkew { .. })), "{e:?}");
    // Revoked principal.
    w.ledger
        .append_as_operator(Body::PrincipalRevoked(PrincipalRevoked {
            id: other_irb.id.clone(),
            reason: None,
        }))
        .unwrap();
    let e = w
        .ledger
        .append(other_irb.sign(Body::StudySuspended(StudyStatus {
            study: study_id("t2d"),
            reason: "x".into(),
        })));
    assert!(matches!(e, Err(Error::RevokedPrincipal(_))), "{e:?}");

    assert_eq!(
        w.ledger.size(),
        before + 2,
        "only version 3 and the revocation were written"
    );
    assert_eq!(w.ledger.root(before).unwrap(), root);
    // Out of range reads.
    assert!(matches!(w.ledger.leaf(999), Err(Error::OutOfRange { .. })));
    assert!(matches!(
        w.ledger.inclusion_proof(0, Some(999)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        w.ledger.consistency_proof(5, Some(3)),
        Err(Error::OutOfRange { .. })
    ));
    assert!(w.ledger.consistency_proof(0, None).is_err());
}

#[test]
fn budgets_are_never_overspent() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    for _ in 0..4 {
        w.ledger.append_as_operator(receipt(&w, 0.25)).unwrap();
    }
    let e = w.ledger.append_as_operator(receipt(&w, 0.25));
    assert!(matches!(e, Err(Error::BudgetExhausted { .. })), "{e:?}");
    let eps = epsilon_left(&w);
    assert!(eps.abs() < 1e-9);
    assert_eq!(w.ledger.state().receipts_of_study("t2d").len(), 4);
}

#[test]
fn a_failed_query_is_charged_and_releases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let failed = |epsilon: f64, reason: Option<&str>, result: bool| match receipt(&w, epsilon) {
        Body::QueryReceipt(r) => Body::QueryReceipt(QueryReceipt {
            outcome: Outcome::Failed,
            reason: reason.map(str::to_owned),
            result_digest: if result {
                r.result_digest.clone()
            } else {
                None
            },
            ..r
        }),
        other => panic!("{other:?}"),
    };
    w.ledger
        .append_as_operator(failed(0.4, Some("the query failed while running"), false))
        .unwrap();
    let eps = epsilon_left(&w);
    assert!((eps - 0.6).abs() < 1e-9, "debited: {eps}");
    for bad in [
        failed(0.1, None, false),
        failed(0.1, Some("failed"), true),
        failed(0.7, Some("failed"), false),
    ] {
        let size = w.ledger.size();
        assert!(w.ledger.append_as_operator(bad).is_err());
        assert_eq!(w.ledger.size(), size);
    }
    // A denied receipt still spends nothing.
    assert!(
        w.ledger
            .append_as_operator(Body::QueryReceipt(match denied(receipt(&w, 0.0)) {
                Body::QueryReceipt(r) => QueryReceipt { epsilon: 0.1, ..r },
                _ => unreachable!(),
            }))
            .is_err()
    );
}

#[test]
fn a_study_takes_one_extract_of_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let extract = |sql: &str, outcome: Outcome| match receipt(&w, 0.0) {
        Body::QueryReceipt(r) => Body::QueryReceipt(QueryReceipt {
            sql: sql.into(),
            mode: QueryMode::Extract,
            outcome,
            reason: (outcome != Outcome::Released).then(|| "refused".into()),
            result_digest: (outcome == Outcome::Released).then(|| r.result_digest.clone().unwrap()),
            ..r
        }),
        other => panic!("{other:?}"),
    };
    let first = "SELECT age, hba1c FROM visits WHERE age > 40";
    // A denied extract pins nothing.
    w.ledger
        .append_as_operator(extract("SELECT age FROM visits", Outcome::Denied))
        .unwrap();
    assert_eq!(w.ledger.state().extract_of("t2d", "ehr"), None);
    w.ledger
        .append_as_operator(extract(first, Outcome::Released))
        .unwrap();
    assert_eq!(w.ledger.state().extract_of("t2d", "ehr"), Some(first));
    // The same extract again (new consents, a new version) is allowed.
    w.ledger
        .append_as_operator(extract(first, Outcome::Released))
        .unwrap();
    // Another cohort or other columns would let the two be differenced row by row: refused,
    // nothing written.
    for other in [
        "SELECT age, hba1c FROM visits WHERE age > 40 AND site <> 'A'",
        "SELECT age, CASE WHEN site = 'A' THEN NULL ELSE hba1c END FROM visits WHERE age > 40",
    ] {
        let size = w.ledger.size();
        let e = w
            .ledger
            .append_as_operator(extract(other, Outcome::Released));
        assert!(matches!(e, Err(Error::Forbidden(_))), "{e:?}");
        assert_eq!(w.ledger.size(), size);
    }
    // DP queries are not extracts.
    w.ledger.append_as_operator(receipt(&w, 0.1)).unwrap();
    // The rule survives a reopen (it is derived state, replayed).
    drop(w);
    let (reopened, _) = Ledger::open(dir.path(), config()).unwrap();
    assert_eq!(reopened.state().extract_of("t2d", "ehr"), Some(first));
}

#[test]
fn concurrent_receipts_respect_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..32 {
            s.spawn(|| {
                if w.ledger.append_as_operator(receipt(&w, 0.1)).is_ok() {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(ok.into_inner(), 10);
    let spent = w.ledger.state().spent("t2d", "ehr").epsilon;
    assert!(spent <= 1.0 + 1e-9);
}

#[test]
fn consent_filters_follow_grants_revocations_and_duo() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let l = &w.ledger;
    let c = &w.custodian;
    l.append(c.sign(consent_body(c, "c1", "MRN-1", "ehr", &["GRU"])))
        .unwrap();
    l.append(c.sign(consent_body(c, "c2", "MRN-2", "ehr", &["HMB"])))
        .unwrap();
    l.append(c.sign(consent_body(c, "c3", "MRN-3", "ehr", &["DS:MONDO:0005148"])))
        .unwrap();
    // NCU refuses the commercial study.
    let mut ncu = consent_body(c, "c4", "MRN-4", "ehr", &["GRU"]);
    if let Body::ConsentGranted(g) = &mut ncu {
        g.modifiers = vec![ledger::duo::Modifier::Ncu];
    }
    l.append(c.sign(ncu)).unwrap();
    let now = Timestamp::now();
    let ids = |f: ConsentFilter| {
        assert_eq!(f.basis(), Basis::Include, "opt-in dataset");
        f.ids().iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let f = l.state().consent_filter("ehr", "t2d", now).unwrap();
    let digest_before = f.digest();
    assert_eq!(ids(f), vec!["MRN-1", "MRN-2"]);
    // Revocation takes effect for the next query.
    l.append(c.sign(Body::ConsentRevoked(ConsentRevoked {
        subject: SubjectId::new("MRN-2").unwrap(),
        consent_id: Some("c2".into()),
        scope: None,
        grantor: c.id.clone(),
        reason: None,
    })))
    .unwrap();
    let f = l
        .state()
        .consent_filter("ehr", "t2d", Timestamp::now())
        .unwrap();
    assert_ne!(f.digest(), digest_before);
    assert_eq!(ids(f), vec!["MRN-1"]);
    // Unknown study or dataset fails closed.
    assert!(l.state().consent_filter("ehr", "nope", now).is_err());
    assert!(l.state().consent_filter("nope", "t2d", now).is_err());
    // Who used my data: a receipt after MRN-2's revocation does not include them.
    l.append_as_operator(receipt(&w, 0.1)).unwrap();
    let state = l.state();
    assert_eq!(
        state
            .receipts_including(&SubjectId::new("MRN-1").unwrap())
            .len(),
        1
    );
    assert_eq!(
        state
            .receipts_including(&SubjectId::new("MRN-2").unwrap())
            .len(),
        0
    );
    assert_eq!(
        state
            .receipts_including(&SubjectId::new("MRN-4").unwrap())
            .len(),
        0
    );
}

#[test]
fn patients_manage_only_their_own_consent() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let alice = Actor::new("alice");
    w.ledger
        .append_as_operator(alice.registration(Role::Patient, Some("MRN-9")))
        .unwrap();
    w.ledger
        .append(alice.sign(consent_body(&alice, "a1", "MRN-9", "ehr", &["HMB"])))
        .unwrap();
    let e = w
        .ledger
        .append(alice.sign(consent_body(&alice, "a2", "MRN-1", "ehr", &["HMB"])));
    assert!(matches!(e, Err(Error::Forbidden(_))), "{e:?}");
    // Opt-out objection by the patient.
    w.ledger
        .append(w.custodian.sign(dataset_body(
            &w.custodian,
            "registry",
            1,
            ConsentBasis::OptOut,
        )))
        .unwrap();
    w.ledger
        .append(alice.sign(Body::ConsentRevoked(ConsentRevoked {
            subject: SubjectId::new("MRN-9").unwrap(),
            consent_id: None,
            scope: Some(ConsentScope {
                datasets: vec![ds("registry")],
                custodian: None,
            }),
            grantor: alice.id.clone(),
            reason: Some("I object".into()),
        })))
        .unwrap();
    let state = w.ledger.state();
    // The study did not request "registry": the filter still answers for the dataset.
    let f = state
        .consent_filter("registry", "t2d", Timestamp::now())
        .unwrap();
    assert_eq!((f.basis(), f.ids().len()), (Basis::Exclude, 1), "{f:?}");
}

#[test]
fn witnesses_cosign_real_checkpoints_only() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let cp = w.ledger.checkpoint().unwrap();
    let (text, _) = note::signatures(&cp).unwrap();
    let cosig = w.witness.key.sign_note(&text).unwrap();
    let line = cosig.lines().last().unwrap();
    let both = format!("{cp}{line}\n");
    w.ledger
        .append(w.witness.sign(Body::CheckpointCosigned(CheckpointCosigned {
            checkpoint: both.clone(),
        })))
        .unwrap();
    // A checkpoint of another tree is refused.
    let other = note::Checkpoint {
        origin: "test.consentry/ledger".into(),
        size: 3,
        root: [9u8; 32],
        extensions: vec![],
    };
    let forged = note::sign_checkpoint(&SignerKey::generate("operator").unwrap(), &other).unwrap();
    let e = w
        .ledger
        .append(w.witness.sign(Body::CheckpointCosigned(CheckpointCosigned {
            checkpoint: forged,
        })));
    assert!(e.is_err());
    let dirp = dir.path().to_path_buf();
    drop(w);
    ledger::verify(&dirp, &|_, _| {}).unwrap();
    Ledger::open(&dirp, config()).unwrap();
}

#[test]
fn sponsor_bundles_verify_offline_and_catch_tampering() {
    use base64::Engine as _;
    use ledger::bundle::{make_bundle, verify_bundle};
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    w.ledger.append_as_operator(receipt(&w, 0.2)).unwrap();
    let old = w.ledger.checkpoint().unwrap();
    let old_size = note::open_checkpoint(w.ledger.verifier_key(), &old, None)
        .unwrap()
        .size;
    w.ledger.append_as_operator(receipt(&w, 0.3)).unwrap();
    w.ledger
        .append_as_operator(Body::QueryReceipt(QueryReceipt {
            study: "t2d".into(),
            researcher: w.researcher.id.clone(),
            dataset: None,
            version: None,
            dataset_digest: None,
            sql: "SELECT * FROM visits".into(),
            mode: QueryMode::Dp,
            mechanism: Default::default(),
            epsilon: 0.0,
            delta: 0.0,
            rho: None,
            consent_digest: None,
            result_digest: None,
            outcome: Outcome::Denied,
            reason: Some("SELECT * would release rows".into()),
            rows_suppressed: None,
        }))
        .unwrap();
    let key = w.ledger.verifier_key().clone();
    let bundle = make_bundle(&w.ledger, "t2d", &[old_size]).unwrap();
    let summary = verify_bundle(&bundle, &key, Some(&old)).unwrap();
    assert_eq!((summary.released, summary.denied), (2, 1));
    assert_eq!(summary.datasets.len(), 1);
    assert!((summary.datasets[0].epsilon - 0.5).abs() < 1e-12);
    assert_eq!(summary.consistent_with_size, Some(old_size));
    // It round-trips through JSON.
    let json = serde_json::to_string(&bundle).unwrap();
    let back: ledger::bundle::Bundle = serde_json::from_str(&json).unwrap();
    verify_bundle(&back, &key, None).unwrap();

    // Another ledger key: refused.
    let other = SignerKey::generate("operator").unwrap().verifier();
    assert!(verify_bundle(&bundle, &other, None).is_err());
    // A flipped byte in any leaf: refused.
    for k in 0..bundle.entries.len() {
        let mut t = bundle.clone();
        let mut leaf = b64.decode(&t.entries[k].leaf_b64).unwrap();
        let mid = leaf.len() / 2;
        leaf[mid] ^= 1;
        t.entries[k].leaf_b64 = b64.encode(&leaf);
        assert!(verify_bundle(&t, &key, None).is_err(), "entry {k}");
    }
    // A dropped principal entry: the author's signature cannot be checked.
    let mut t = bundle.clone();
    t.entries.retain(|e| {
        !b64.decode(&e.leaf_b64)
            .unwrap()
            .windows(20)
            .any(|w| w == b"principal_registered")
            || e.index == 0
    });
    assert!(verify_bundle(&t, &key, None).is_err());
    // No consistency proof for the old checkpoint: refused with advice.
    let mut t = bundle.clone();
    t.consistency.clear();
    let e = verify_bundle(&t, &key, Some(&old)).unwrap_err();
    assert!(e.to_string().contains("--consistency-from"), "{e}");
    // Unknown study: NotFound.
    assert!(matches!(
        make_bundle(&w.ledger, "nope", &[]),
        Err(Error::NotFound { .. })
    ));
}

#[test]
fn integers_beyond_two_to_the_53_are_refused_and_the_ledger_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let size = w.ledger.size();
    let mut r = match receipt(&w, 0.1) {
        Body::QueryReceipt(r) => r,
        _ => unreachable!(),
    };
    r.rows_suppressed = Some(u64::MAX);
    let e = w
        .ledger
        .append_as_operator(Body::QueryReceipt(r.clone()))
        .unwrap_err();
    assert!(e.to_string().contains("2^53"), "{e}");
    assert_eq!(w.ledger.size(), size);
    r.rows_suppressed = Some(1 << 53);
    w.ledger.append_as_operator(Body::QueryReceipt(r)).unwrap();
    let dirp = dir.path().to_path_buf();
    drop(w);
    Ledger::open(&dirp, config()).unwrap();
}

#[test]
fn nothing_is_released_for_a_study_after_its_suspension() {
    // Queries in flight when the IRB suspends the study: their receipts come after the
    // suspension entry. A release is refused from that entry on; a failed (charged) receipt,
    // which only debits a draw already made, is still taken.
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let l = &w.ledger;
    l.append_as_operator(receipt(&w, 0.1)).unwrap();
    l.append(w.irb.sign(Body::StudySuspended(StudyStatus {
        study: study_id("t2d"),
        reason: "adverse event review".into(),
    })))
    .unwrap();
    let size = l.size();
    let spent = l.state().spent("t2d", "ehr");
    let e = l.append_as_operator(receipt(&w, 0.1)).unwrap_err();
    assert!(matches!(e, Error::Forbidden(_)), "{e:?}");
    assert!(e.to_string().contains("not active"), "{e}");
    assert_eq!(l.size(), size, "a refused release writes nothing");
    assert_eq!(l.state().spent("t2d", "ehr"), spent);
    // The draw of the refused release is charged as a failed receipt.
    let failed = match receipt(&w, 0.1) {
        Body::QueryReceipt(r) => Body::QueryReceipt(QueryReceipt {
            outcome: Outcome::Failed,
            result_digest: None,
            consent_digest: None,
            reason: Some("the query failed while running".into()),
            ..r
        }),
        other => panic!("{other:?}"),
    };
    l.append_as_operator(failed).unwrap();
    assert!(l.state().spent("t2d", "ehr").epsilon > spent.epsilon);
    // A closed study likewise; and the rule holds on replay: the ledger reopens as it was.
    let released = l.state().receipts_of_study("t2d").len();
    drop(w);
    let (l, _) = Ledger::open(dir.path(), config()).unwrap();
    assert_eq!(l.state().receipts_of_study("t2d").len(), released);
}

#[test]
fn a_revocation_is_in_effect_when_acknowledged_whatever_its_date() {
    // A revocation dated 240 s ahead of the ledger's clock (within the skew it accepts) must
    // not leave the consent active until that time.
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let l = &w.ledger;
    let c = &w.custodian;
    l.append(c.sign(consent_body(c, "c1", "MRN-1", "ehr", &["GRU"])))
        .unwrap();
    l.append(c.sign(consent_body(c, "c2", "MRN-2", "ehr", &["GRU"])))
        .unwrap();
    let ahead = |body: Body| {
        SignedEntry::sign(
            &c.key,
            Entry {
                author: c.id.clone(),
                time: Timestamp::now().plus_secs(240),
                body,
            },
        )
    };
    l.append(ahead(Body::ConsentRevoked(ConsentRevoked {
        subject: SubjectId::new("MRN-2").unwrap(),
        consent_id: Some("c2".into()),
        scope: None,
        grantor: c.id.clone(),
        reason: None,
    })))
    .unwrap();
    let included = |l: &Ledger| match l
        .state()
        .consent_filter("ehr", "t2d", Timestamp::now())
        .unwrap()
    {
        f if f.basis() == Basis::Include => {
            f.ids().iter().map(|s| s.to_string()).collect::<Vec<_>>()
        }
        _ => panic!("opt-in dataset"),
    };
    assert_eq!(included(l), ["MRN-1"]);
    let listed = l
        .state()
        .consents_of(&SubjectId::new("MRN-2").unwrap(), Timestamp::now());
    assert!(listed.iter().all(|v| !v.in_effect), "{listed:?}");
    // An objection (scope-wide) dated ahead: MRN-1 is out at once too.
    l.append(ahead(Body::ConsentRevoked(ConsentRevoked {
        subject: SubjectId::new("MRN-1").unwrap(),
        consent_id: None,
        scope: Some(ConsentScope {
            datasets: vec![ds("ehr")],
            custodian: None,
        }),
        grantor: c.id.clone(),
        reason: None,
    })))
    .unwrap();
    assert!(included(l).is_empty());
}

#[test]
fn what_the_state_shows_can_be_read() {
    // Readers take indexes from the state (a study's receipts) and read those entries while
    // appends go on: the state holds a batch before its fsync, and such reads once failed
    // with "leaf index N out of range (tree size N)".
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..150 {
                    w.ledger
                        .append_as_operator(denied(receipt(&w, 0.0)))
                        .unwrap();
                }
            });
        }
        let reader = s.spawn(|| {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ix: Vec<u64> = w.ledger.state().receipts_of_study("t2d").to_vec();
                for i in ix.iter().rev().take(8) {
                    w.ledger
                        .entry(*i)
                        .unwrap_or_else(|e| panic!("entry {i}: {e}"));
                    reads += 1;
                }
            }
            reads
        });
        while w.ledger.state().receipts_of_study("t2d").len() < 600 {
            std::thread::yield_now();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
}

#[test]
fn a_consents_lists_are_bounded() {
    // A consent of 10^6 denied studies was accepted (9.9 MB, for good) and its FHIR export
    // took the broker to 7 GB.
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let c = &w.custodian;
    let with_denied = |id: &str, n: usize| {
        let mut b = consent_body(c, id, "MRN-1", "ehr", &["GRU"]);
        if let Body::ConsentGranted(g) = &mut b {
            g.studies_deny = (0..n).map(|i| study_id(&format!("s{i}"))).collect();
        }
        b
    };
    let size = w.ledger.size();
    let e = w
        .ledger
        .append(c.sign(with_denied("big", 1001)))
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("studies_deny"), "{e}");
    assert_eq!(w.ledger.size(), size);
    w.ledger.append(c.sign(with_denied("fits", 1000))).unwrap();
}

#[test]
fn many_entries_append_in_order_and_a_refused_one_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let (l, c) = (&w.ledger, &w.custodian);
    let size = l.size();
    let mut batch: Vec<_> = (0..5000)
        .map(|i| {
            c.sign(consent_body(
                c,
                &format!("b{i}"),
                &format!("MRN-B{i}"),
                "ehr",
                &["HMB"],
            ))
        })
        .collect();
    // A duplicate consent id in the middle, an entry by an author who may not write it (the
    // researcher) and a revocation of a consent granted earlier in the same batch.
    batch[1000] = c.sign(consent_body(c, "b10", "MRN-X", "ehr", &["HMB"]));
    batch[2000] = w
        .researcher
        .sign(consent_body(c, "r1", "MRN-R", "ehr", &["HMB"]));
    batch[4999] = c.sign(Body::ConsentRevoked(ConsentRevoked {
        subject: SubjectId::new("MRN-B7").unwrap(),
        consent_id: Some("b7".into()),
        scope: None,
        grantor: c.id.clone(),
        reason: None,
    }));
    let results = l.append_many(batch);
    assert_eq!(results.len(), 5000);
    let refused: Vec<usize> = (0..5000).filter(|&i| results[i].is_err()).collect();
    assert_eq!(refused, vec![1000, 2000]);
    // Accepted entries are in the stream's order, contiguous, each at the index it was told.
    let indexes: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|a| a.index)
        .collect();
    assert_eq!(indexes, (size..size + 4998).collect::<Vec<_>>());
    assert_eq!(l.size(), size + 4998);
    // Ground truth from the state: b7 revoked (later in the batch than its grant), b8 in force.
    let f = l
        .state()
        .consent_filter("ehr", "t2d", Timestamp::now())
        .unwrap();
    assert_eq!(f.basis(), Basis::Include, "opt-in");
    let ids: Vec<String> = f.ids().iter().map(|s| s.to_string()).collect();
    assert!(!ids.contains(&"MRN-B7".to_string()) && ids.contains(&"MRN-B8".to_string()));
    assert!(!ids.contains(&"MRN-X".to_string()) && !ids.contains(&"MRN-R".to_string()));
    // Durable: the ledger reopens with them.
    drop(w);
    let (again, _) = Ledger::open(dir.path(), config()).unwrap();
    assert_eq!(again.size(), size + 4998);
}

/// Random grants (dataset- or custodian-wide, some valid only later or only for a while, some
/// for another purpose), revocations, objections and new versions, each followed by queries a
/// minute later than the last: a filter updated change by change admits exactly whom each
/// subject's own consents admit, and is the snapshot a reopened ledger (no cache) computes
/// whole.
#[test]
fn a_consent_filter_updated_change_by_change_is_the_one_computed_whole() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(dir.path());
    let (l, c) = (&w.ledger, &w.custodian);
    l.append(c.sign(dataset_body(c, "registry", 1, ConsentBasis::OptOut)))
        .unwrap();
    let mut x: u64 = 7;
    let mut next = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let now = Timestamp::now();
    let subject = |i: u64| SubjectId::new(format!("MRN-{i}")).unwrap();
    let scope = |k: u64| match k {
        0 => ConsentScope {
            datasets: vec![ds("ehr")],
            custodian: None,
        },
        1 => ConsentScope {
            datasets: vec![ds("registry")],
            custodian: None,
        },
        _ => ConsentScope {
            datasets: vec![],
            custodian: Some(c.id.clone()),
        },
    };
    let mut live: Vec<(String, SubjectId)> = Vec::new();
    let mut updated = 0;
    for step in 0..300u64 {
        let op = next(10);
        let body = if op < 6 || live.is_empty() {
            let s = subject(next(40));
            let id = format!("c{step}");
            let mut b = consent_body(
                c,
                &id,
                s.as_str(),
                "ehr",
                &[["GRU", "HMB", "DS:MONDO:0005148", "DS:MONDO:0004975"][next(4) as usize]],
            );
            if let Body::ConsentGranted(g) = &mut b {
                g.scope = scope(if next(4) == 0 { 2 } else { 0 });
                let at = now.plus_secs(60 * step as i64);
                match next(6) {
                    0 => g.valid_from = at.plus_secs(600),
                    1 => g.valid_until = Some(at.plus_secs(300)),
                    _ => {}
                }
            }
            live.push((id, s));
            b
        } else if op < 9 {
            let (id, s) = live.swap_remove(next(live.len() as u64) as usize);
            Body::ConsentRevoked(ConsentRevoked {
                subject: s,
                consent_id: Some(id),
                scope: None,
                grantor: c.id.clone(),
                reason: None,
            })
        } else {
            Body::ConsentRevoked(ConsentRevoked {
                subject: subject(next(40)),
                consent_id: None,
                scope: Some(scope(1 + next(2))),
                grantor: c.id.clone(),
                reason: None,
            })
        };
        // A refused entry (an unknown purpose, say) changes nothing; the check still holds.
        let _ = l.append(c.sign(body));
        if step % 97 == 96 {
            let v = 2 + step / 97;
            l.append(c.sign(dataset_body(c, "ehr", v as u32, ConsentBasis::OptIn)))
                .unwrap();
        }
        let st = l.state();
        let t = now.plus_secs(60 * step as i64 + 30);
        for dataset in ["ehr", "registry"] {
            let f = st.consent_filter(dataset, "t2d", t).unwrap();
            updated += usize::from(f.changes().is_some());
            for i in 0..42 {
                let s = subject(i);
                assert_eq!(
                    f.admits(&s),
                    st.subject_admitted(&s, dataset, "t2d", t, u64::MAX),
                    "step {step}: {dataset} at {t}: {s}"
                );
            }
        }
    }
    // Most filters were updated rather than computed whole.
    assert!(updated > 300, "{updated} of 600");
    let end = now.plus_secs(60 * 300);
    let kept: Vec<_> = ["ehr", "registry"]
        .iter()
        .map(|d| l.state().consent_filter(d, "t2d", end).unwrap())
        .collect();
    drop(w);
    let (reopened, _) = Ledger::open(dir.path(), config()).unwrap();
    for (d, f) in ["ehr", "registry"].iter().zip(kept) {
        let whole = reopened.state().consent_filter(d, "t2d", end).unwrap();
        assert!(whole.changes().is_none());
        assert_eq!(whole.ids(), f.ids(), "{d}");
        assert_eq!(whole.digest(), f.digest(), "{d}");
    }
}
