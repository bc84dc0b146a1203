//! The patient: grant, limit and revoke their own consent; see who used their data.

use broker::client;
use tonic::Code;

use crate::world::{World, body, key};

fn grant(id: &str, subject: &str, grantor: &str) -> ledger::entry::Body {
    body(
        "consent_granted",
        serde_json::json!({
            "consent_id": id, "subject": subject, "scope": {"datasets": ["visits"]},
            "purposes": ["HMB"], "valid_from": "2020-01-01T00:00:00Z", "grantor": grantor,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patient_grants_sees_usage_and_revokes() {
    let w = World::ready(2.0).await;
    // Patient 1199 has no consent in the world; register them and let them grant.
    w.register("p1199", "patient", Some("1199")).await;
    let me = key("p1199");
    let mut c = w.consent(&me);
    c.grant(client::sign(&me, grant("mine", "1199", "p1199")).unwrap())
        .await
        .unwrap();
    let list = c
        .list(proto::v1::SubjectRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.consents.len(), 1);
    assert!(list.consents[0].active);
    assert!(list.consents[0].grant_json.contains("\"mine\""));

    // A released query now includes them: it appears in their usage.
    let alice = key("alice");
    let (h, _) = w
        .run(
            &alice,
            World::dp("s1", "SELECT COUNT(*) AS n FROM visits", 0.5),
        )
        .await
        .unwrap();
    let usage = c
        .usage(proto::v1::SubjectRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.usages.len(), 1);
    assert_eq!(usage.usages[0].study, "s1");
    assert_eq!(usage.usages[0].receipt_index, h.receipt_index);
    assert_eq!(usage.usages[0].study_title, "Study s1");

    // Revocation takes effect for the next query: a different consent snapshot.
    let rev = body(
        "consent_revoked",
        serde_json::json!({"subject": "1199", "consent_id": "mine", "grantor": "p1199"}),
    );
    c.revoke(client::sign(&me, rev).unwrap()).await.unwrap();
    let (h2, _) = w
        .run(
            &alice,
            World::dp("s1", "SELECT COUNT(*) AS n FROM visits", 0.5),
        )
        .await
        .unwrap();
    assert!(!h2.repeated);
    assert_ne!(h2.consent_digest, h.consent_digest);
    let usage = c
        .usage(proto::v1::SubjectRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        usage.usages.len(),
        1,
        "the later query did not include them"
    );
    let list = c
        .list(proto::v1::SubjectRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!list.consents[0].active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patients_act_only_for_themselves() {
    let w = World::ready(1.0).await;
    let me = key("p1000");
    let mut c = w.consent(&me);
    let before = w.ledger.size();
    // Someone else's subject.
    let e = c
        .grant(client::sign(&me, grant("x", "1001", "p1000")).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // An entry signed by someone else, sent by me.
    let other = key("p1001");
    let e = c
        .grant(client::sign(&other, grant("y", "1001", "p1001")).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // Reading another patient's consents or usage.
    for e in [
        c.list(proto::v1::SubjectRequest {
            subject: "1001".into(),
        })
        .await
        .unwrap_err(),
        c.usage(proto::v1::SubjectRequest {
            subject: "1001".into(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // A researcher cannot read consents at all.
    let e = w
        .consent(&key("alice"))
        .list(proto::v1::SubjectRequest {
            subject: "1000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Garbage instead of a signed entry.
    let e = c
        .grant(proto::v1::SignedEntry {
            leaf: b"{\"entry\":1}".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(w.ledger.size(), before, "no refusal wrote anything");
}

fn fhir_consent(id: &str, subject: &str, status: &str) -> String {
    serde_json::json!({
        "resourceType": "Consent",
        "id": id,
        "status": status,
        "scope": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": format!("Patient/{subject}")},
        "dateTime": "2025-01-01T00:00:00Z",
        "provision": {
            "type": "permit",
            "period": {"start": "2025-01-01", "end": "2098-12-31"},
            "purpose": [{"system": "http://purl.obolibrary.org/obo/duo.owl", "code": "DUO:0000006"}],
            "data": [{"meaning": "instance", "reference": {"identifier": {
                "system": "urn:consentry:dataset", "value": "visits"}}}],
        },
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fhir_consents_import_and_export() {
    let w = World::ready(1.0).await;
    w.register("p1199", "patient", Some("1199")).await;
    let me = key("p1199");
    let mut c = w.consent(&me);
    let resource = fhir_consent("fhir-1199", "1199", "active");
    c.import_fhir(client::fhir_import(&me, &resource).unwrap())
        .await
        .unwrap();
    let list = c
        .list(proto::v1::SubjectRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.consents.len(), 1);
    assert!(list.consents[0].active);
    assert_eq!(list.consents[0].consent_id, "fhir-1199");

    // Exported as FHIR: the same resource, active, with its DUO purpose and period.
    let export = |c: &mut proto::v1::consent_client::ConsentClient<crate::world::Auth>| {
        let mut c = c.clone();
        async move {
            let b = c
                .export_fhir(proto::v1::SubjectRequest::default())
                .await
                .unwrap()
                .into_inner();
            serde_json::from_str::<serde_json::Value>(&b.bundle_json).unwrap()
        }
    };
    let bundle = export(&mut c).await;
    let r = &bundle["entry"][0]["resource"];
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 1);
    assert_eq!(r["id"], "fhir-1199");
    assert_eq!(r["status"], "active");
    assert_eq!(r["patient"]["reference"], "Patient/1199");
    assert_eq!(r["provision"]["purpose"][0]["code"], "DUO:0000006");
    assert_eq!(r["provision"]["period"]["start"], "2025-01-01T00:00:00Z");
    assert_eq!(r["provision"]["period"]["end"], "2099-01-01T00:00:00Z");

    // A signed entry that does not say what the resource says is refused, and nothing is
    // written.
    let before = w.ledger.size();
    let mut forged = client::fhir_import(&me, &fhir_consent("fhir-x", "1199", "active")).unwrap();
    forged.resource_json = fhir_consent("fhir-y", "1199", "active");
    let e = c.import_fhir(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A resource the mapping refuses.
    let e = c
        .import_fhir(proto::v1::FhirImportRequest {
            resource_json: fhir_consent("fhir-z", "1199", "draft"),
            entry: Some(client::sign(&me, grant("z", "1199", "p1199")).unwrap()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("status"), "{e:?}");
    // Someone else's subject.
    let e = c
        .import_fhir(client::fhir_import(&me, &fhir_consent("fhir-o", "1001", "active")).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(w.ledger.size(), before);

    // Status inactive revokes it; the export then says inactive.
    let inactive = fhir_consent("fhir-1199", "1199", "inactive");
    c.import_fhir(client::fhir_import(&me, &inactive).unwrap())
        .await
        .unwrap();
    let bundle = export(&mut c).await;
    assert_eq!(bundle["entry"][0]["resource"]["status"], "inactive");
    let list = c
        .list(proto::v1::SubjectRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!list.consents[0].active);

    // A custodian imports a paper consent for its subject; a researcher exports nothing.
    let hospital = key("hospital");
    w.consent(&hospital)
        .import_fhir(
            client::fhir_import(&hospital, &fhir_consent("paper-1190", "1190", "active")).unwrap(),
        )
        .await
        .unwrap();
    let e = w
        .consent(&key("alice"))
        .export_fhir(proto::v1::SubjectRequest {
            subject: "1190".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_over_the_entry_limit_is_refused_before_it_is_read() {
    // A 54 MB consent was parsed (7.8 s, 600 MB) before the ledger's 16 MiB limit refused it.
    let w = World::ready(1.0).await;
    let huge = proto::v1::SignedEntry {
        leaf: vec![b'x'; 20 << 20],
    };
    let e = w
        .consent(&key("p1000"))
        .max_encoding_message_size(usize::MAX)
        .grant(huge)
        .await
        .unwrap_err();
    // The transport's refusal, not the ledger's (FAILED_PRECONDITION after parsing).
    assert!(
        matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{e:?}"
    );
    assert!(e.message().len() < 1024);
}
