//! Builders for realistic ledgers, shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod files;

use std::path::Path;

use ledger::duo::Purpose;
use ledger::entry::*;
use ledger::ids::*;
use ledger::note::SignerKey;
use ledger::{Config, Ledger};

/// A principal with its key.
pub struct Actor {
    pub id: PrincipalId,
    pub key: SignerKey,
}

impl Actor {
    pub fn new(id: &str) -> Actor {
        Actor {
            id: PrincipalId::new(id).unwrap(),
            key: SignerKey::generate(id).unwrap(),
        }
    }
    pub fn sign(&self, body: Body) -> SignedEntry {
        SignedEntry::sign(
            &self.key,
            Entry {
                author: self.id.clone(),
                time: Timestamp::now(),
                body,
            },
        )
    }
    pub fn registration(&self, role: Role, subject: Option<&str>) -> Body {
        Body::PrincipalRegistered(PrincipalRegistered {
            id: self.id.clone(),
            role,
            key: self.key.verifier().to_text(),
            subject: subject.map(|s| SubjectId::new(s).unwrap()),
            display_name: None,
        })
    }
}

pub fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).unwrap()
}

pub fn ds(s: &str) -> DatasetId {
    DatasetId::new(s).unwrap()
}

pub fn study_id(s: &str) -> StudyId {
    StudyId::new(s).unwrap()
}

pub fn dataset_body(custodian: &Actor, dataset: &str, version: u32, basis: ConsentBasis) -> Body {
    let tables = vec![TableManifest {
        name: "visits".into(),
        rows: 10,
        columns: vec![
            ColumnManifest {
                name: "patient_id".into(),
                data_type: "Utf8".into(),
                nullable: false,
            },
            ColumnManifest {
                name: "age".into(),
                data_type: "Int64".into(),
                nullable: true,
            },
        ],
        files: vec![FileManifest {
            path: "visits.parquet".into(),
            bytes: 1234,
            sha256: Digest::of(format!("{dataset}{version}").as_bytes()),
            rows: 10,
        }],
    }];
    Body::DatasetRegistered(DatasetRegistered {
        dataset: ds(dataset),
        version,
        custodian: custodian.id.clone(),
        consent_basis: basis,
        privacy_unit: "patient_id".into(),
        policy_digest: Digest::of(b"policy"),
        digest: DatasetRegistered::compute_digest(&tables),
        tables,
    })
}

pub fn consent_body(
    grantor: &Actor,
    id: &str,
    subject: &str,
    dataset: &str,
    purposes: &[&str],
) -> Body {
    Body::ConsentGranted(ConsentGranted {
        consent_id: id.into(),
        subject: SubjectId::new(subject).unwrap(),
        scope: ConsentScope {
            datasets: vec![ds(dataset)],
            custodian: None,
        },
        purposes: purposes
            .iter()
            .map(|p| Purpose::parse(p).unwrap())
            .collect(),
        modifiers: vec![],
        studies_allow: vec![],
        studies_deny: vec![],
        valid_from: ts("2020-01-01T00:00:00Z"),
        valid_until: None,
        grantor: grantor.id.clone(),
        fhir_id: None,
        replaces: None,
    })
}

/// A small world: operator (the ledger), a custodian with an opt-in dataset `ehr`, an IRB, a
/// researcher, a sponsor, and a study `t2d` (HMB) approved with epsilon 1 on `ehr`.
pub struct World {
    pub ledger: Ledger,
    pub custodian: Actor,
    pub irb: Actor,
    pub researcher: Actor,
    pub sponsor: Actor,
    pub witness: Actor,
}

pub fn config() -> Config {
    Config {
        checkpoint_interval: std::time::Duration::from_millis(50),
        ..Config::default()
    }
}

pub fn world(dir: &Path) -> World {
    let ledger = Ledger::init(
        dir,
        "test.consentry/ledger",
        &PrincipalId::new("operator").unwrap(),
        config(),
    )
    .unwrap();
    let w = World {
        ledger,
        custodian: Actor::new("st-mary"),
        irb: Actor::new("irb-boston"),
        researcher: Actor::new("dr-lee"),
        sponsor: Actor::new("acme-pharma"),
        witness: Actor::new("witness-1"),
    };
    for (a, role) in [
        (&w.custodian, Role::Custodian),
        (&w.irb, Role::Irb),
        (&w.researcher, Role::Researcher),
        (&w.sponsor, Role::Sponsor),
        (&w.witness, Role::Witness),
    ] {
        w.ledger
            .append_as_operator(a.registration(role, None))
            .unwrap();
    }
    w.ledger
        .append(
            w.custodian
                .sign(dataset_body(&w.custodian, "ehr", 1, ConsentBasis::OptIn)),
        )
        .unwrap();
    w.ledger
        .append(w.researcher.sign(Body::StudyRegistered(StudyRegistered {
            study: study_id("t2d"),
            title: "Type 2 diabetes outcomes".into(),
            sponsor: w.sponsor.id.clone(),
            pi: w.researcher.id.clone(),
            researchers: vec![w.researcher.id.clone()],
            purpose: Purpose::parse("HMB").unwrap(),
            commercial: true,
            methods_development: false,
            datasets: vec![ds("ehr")],
        })))
        .unwrap();
    w.ledger
        .append(w.irb.sign(Body::StudyApproved(StudyApproved {
            study: study_id("t2d"),
            grants: vec![DatasetGrant {
                dataset: ds("ehr"),
                epsilon: 1.0,
                delta: 1e-6,
                dp: true,
                extract_k: Some(5),
                min_cell_size: None,
            }],
            valid_from: ts("2020-01-01T00:00:00Z"),
            valid_until: ts("2099-01-01T00:00:00Z"),
        })))
        .unwrap();
    w
}

/// The largest epsilon study `t2d` may still spend on `ehr` in one pure query.
pub fn epsilon_left(w: &World) -> f64 {
    w.ledger
        .state()
        .account("t2d", "ehr")
        .expect("t2d is approved on ehr")
        .epsilon_left()
}

/// A released receipt spending `epsilon` on `ehr` version 1.
pub fn receipt(w: &World, epsilon: f64) -> Body {
    receipt_on(&w.ledger, &w.researcher.id, epsilon)
}

/// A released receipt of `researcher`'s query on `ehr` for study `t2d` in any ledger built by
/// [`world`], spending `epsilon`.
pub fn receipt_on(ledger: &Ledger, researcher: &PrincipalId, epsilon: f64) -> Body {
    let state = ledger.state();
    let v = state.dataset("ehr").unwrap().latest().reg.clone();
    Body::QueryReceipt(QueryReceipt {
        study: "t2d".into(),
        researcher: researcher.clone(),
        dataset: Some(ds("ehr")),
        version: Some(v.version),
        dataset_digest: Some(v.digest.clone()),
        sql: "SELECT COUNT(*) FROM visits".into(),
        mode: QueryMode::Dp,
        mechanism: Default::default(),
        epsilon,
        delta: 0.0,
        rho: None,
        consent_digest: Some(Digest::of(b"snapshot")),
        result_digest: Some(Digest::of(b"result")),
        outcome: Outcome::Released,
        reason: None,
        rows_suppressed: None,
    })
}

/// The receipt of a refused query: it spends and releases nothing.
pub fn denied(receipt: Body) -> Body {
    match receipt {
        Body::QueryReceipt(r) => Body::QueryReceipt(QueryReceipt {
            epsilon: 0.0,
            delta: 0.0,
            rho: None,
            result_digest: None,
            outcome: Outcome::Denied,
            reason: Some("cell below the minimum size".into()),
            ..r
        }),
        other => panic!("not a receipt: {other:?}"),
    }
}
