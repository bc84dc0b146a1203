//! FHIR Consent mapping: round trips, a hand-written resource, revocations, refusals.

use super::*;

fn p(s: &str) -> PrincipalId {
    PrincipalId::new(s).unwrap()
}

fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).unwrap()
}

fn full_grant() -> ConsentGranted {
    ConsentGranted {
        consent_id: "c-1000.a".into(),
        subject: SubjectId::new("MRN 1000").unwrap(),
        scope: ConsentScope {
            datasets: vec![DatasetId::new("visits").unwrap()],
            custodian: Some(p("hospital")),
        },
        purposes: vec![
            Purpose::Gru,
            Purpose::Ds("MONDO:0005148".into()),
            Purpose::Hmb,
        ],
        modifiers: vec![Modifier::Ncu, Modifier::Ps, Modifier::Irb],
        studies_allow: vec![StudyId::new("t2d").unwrap(), StudyId::new("t2d-b").unwrap()],
        studies_deny: vec![StudyId::new("pharma-x").unwrap()],
        valid_from: ts("2024-01-01T00:00:00Z"),
        valid_until: Some(ts("2027-06-30T12:00:00Z")),
        grantor: p("p1000"),
        fhir_id: Some("c-1000.a".into()),
        replaces: None,
    }
}

#[test]
fn export_then_import_gives_back_the_grant() {
    let g = full_grant();
    let fhir = export(&g, ts("2024-01-02T03:04:05Z"), true);
    assert_eq!(fhir["status"], "active");
    assert_eq!(fhir["patient"]["reference"], "Patient/MRN 1000");
    let back = import(&fhir.to_string(), &p("p1000")).unwrap();
    assert_eq!(back, Body::ConsentGranted(g.clone()));

    // A minimal grant: custodian scope only, open-ended.
    let mut small = g.clone();
    small.scope.datasets.clear();
    small.modifiers.clear();
    small.studies_allow.clear();
    small.studies_deny.clear();
    small.valid_until = None;
    small.purposes = vec![Purpose::Nres];
    let fhir = export(&small, ts("2024-01-02T03:04:05Z"), true);
    assert!(fhir["provision"].get("actor").is_none());
    assert_eq!(
        import(&fhir.to_string(), &p("p1000")).unwrap(),
        Body::ConsentGranted(small)
    );

    // An ended grant exports as inactive, which imports as its revocation.
    let fhir = export(&g, ts("2024-01-02T03:04:05Z"), false);
    match import(&fhir.to_string(), &p("p1000")).unwrap() {
        Body::ConsentRevoked(r) => {
            assert_eq!(r.consent_id.as_deref(), Some("c-1000.a"));
            assert_eq!(r.subject, g.subject);
            assert_eq!(r.grantor, p("p1000"));
            assert!(r.scope.is_none());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_consent_written_by_a_fhir_server_imports() {
    let resource = r#"{
      "resourceType": "Consent",
      "id": "consent-research-42",
      "status": "active",
      "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                            "code": "research"}]},
      "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
      "patient": {"reference": "Patient/1042", "display": "ignored"},
      "dateTime": "2025-03-01T09:30:00+01:00",
      "performer": [{"reference": "Patient/1042"}],
      "organization": [{"reference": "Organization/hospital"}],
      "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                 "code": "OPTIN"}]},
      "provision": {
        "type": "permit",
        "period": {"end": "2026-12-31"},
        "purpose": [
          {"system": "http://purl.obolibrary.org/obo/duo.owl", "code": "DUO:0000006"},
          {"system": "http://purl.obolibrary.org/obo/duo.owl", "code": "DUO:0000046"}
        ],
        "provision": [{"type": "deny", "actor": [
          {"role": {"text": "recipient"}, "reference": {"reference": "ResearchStudy/marketing-1"}}
        ]}]
      }
    }"#;
    let Body::ConsentGranted(g) = import(resource, &p("hospital")).unwrap() else {
        panic!("a grant")
    };
    assert_eq!(g.consent_id, "consent-research-42");
    assert_eq!(g.fhir_id.as_deref(), Some("consent-research-42"));
    assert_eq!(g.subject.as_str(), "1042");
    assert_eq!(g.scope.custodian, Some(p("hospital")));
    assert_eq!(g.purposes, vec![Purpose::Hmb]);
    assert_eq!(g.modifiers, vec![Modifier::Ncu]);
    assert_eq!(g.studies_deny, vec![StudyId::new("marketing-1").unwrap()]);
    // No period start: the resource's dateTime, in UTC.
    assert_eq!(g.valid_from, ts("2025-03-01T08:30:00Z"));
    // A date-only end covers its whole day.
    assert_eq!(g.valid_until, Some(ts("2027-01-01T00:00:00Z")));
    // The grantor is who signs, never what the resource claims.
    assert_eq!(g.grantor, p("hospital"));
}

#[test]
fn a_deny_provision_is_an_objection_over_its_scope() {
    let mut fhir = export(&full_grant(), ts("2024-01-02T03:04:05Z"), true);
    fhir["provision"]["type"] = "deny".into();
    let Body::ConsentRevoked(r) = import(&fhir.to_string(), &p("p1000")).unwrap() else {
        panic!("a revocation")
    };
    assert_eq!(r.consent_id, None);
    let scope = r.scope.unwrap();
    assert_eq!(scope.custodian, Some(p("hospital")));
    assert_eq!(scope.datasets, vec![DatasetId::new("visits").unwrap()]);
}

#[test]
fn what_cannot_be_represented_is_refused_with_its_path() {
    let good = export(&full_grant(), ts("2024-01-02T03:04:05Z"), true);
    type Edit = fn(&mut Value);
    let cases: Vec<(Edit, &str)> = vec![
        (|v| v["resourceType"] = "Patient".into(), "resourceType"),
        (|v| v["id"] = "no spaces".into(), "id"),
        (
            |v| v["scope"]["coding"][0]["code"] = "patient-privacy".into(),
            "scope",
        ),
        (
            |v| v["patient"] = json!({"reference": "Group/1"}),
            "patient",
        ),
        (
            |v| {
                v.as_object_mut().unwrap().remove("patient");
            },
            "patient",
        ),
        (|v| v["status"] = "draft".into(), "status"),
        (
            |v| v["provision"]["purpose"][0]["code"] = "DUO:9999999".into(),
            "provision.purpose[0]",
        ),
        (
            |v| v["provision"]["purpose"][0]["system"] = "http://snomed.info/sct".into(),
            "provision.purpose[0]",
        ),
        (
            |v| {
                v["provision"]["purpose"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("extension");
            },
            "provision.purpose[1]",
        ),
        (
            |v| v["provision"]["purpose"] = json!([]),
            "provision.purpose",
        ),
        (
            |v| v["provision"]["provision"][0]["type"] = "permit".into(),
            "provision.provision[0]",
        ),
        (
            |v| v["provision"]["actor"][0]["reference"]["reference"] = "Practitioner/x".into(),
            "provision.actor[0]",
        ),
        (
            |v| v["provision"]["period"]["start"] = "yesterday".into(),
            "provision.period.start",
        ),
        (
            |v| v["provision"]["period"]["end"] = "2026-13-01".into(),
            "provision.period.end",
        ),
        (
            |v| {
                v["provision"]["period"]
                    .as_object_mut()
                    .unwrap()
                    .remove("start");
                v.as_object_mut().unwrap().remove("dateTime");
            },
            "provision.period.start",
        ),
        (
            |v| {
                v["organization"] =
                    json!([{"reference": "Organization/a"}, {"reference": "Organization/b"}])
            },
            "organization",
        ),
        (
            |v| {
                v.as_object_mut().unwrap().remove("organization");
                v["provision"].as_object_mut().unwrap().remove("data");
            },
            "organization",
        ),
        (
            |v| v["provision"]["data"][0]["reference"]["identifier"]["system"] = "urn:x".into(),
            "provision.data[0]",
        ),
        (
            |v| v["provision"]["type"] = "maybe".into(),
            "provision.type",
        ),
    ];
    for (edit, path) in cases {
        let mut v = good.clone();
        edit(&mut v);
        let e = import(&v.to_string(), &p("p1000")).unwrap_err().to_string();
        assert!(
            e.contains(&format!("FHIR Consent {path}")),
            "expected {path}: {e}"
        );
        assert!(!e.contains("MRN 1000"), "the subject never shows: {e}");
    }
    let e = import("[1, 2", &p("p1000")).unwrap_err().to_string();
    assert!(e.contains("not JSON"), "{e}");
    let huge = format!("{{\"pad\": \"{}\"}}", "x".repeat(MAX_RESOURCE));
    let e = import(&huge, &p("p1000")).unwrap_err().to_string();
    assert!(e.contains("larger than"), "{e}");
}

#[test]
fn a_bundle_holds_each_resource() {
    let g = full_grant();
    let b = bundle(vec![export(&g, ts("2024-01-02T03:04:05Z"), true)]);
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["entry"][0]["resource"]["id"], "c-1000.a");
}

#[test]
fn a_member_given_twice_is_refused_at_any_depth() {
    // Read as its last value, a second "type" once turned a grant into a revocation.
    let fhir = export(&full_grant(), ts("2024-01-02T03:04:05Z"), true).to_string();
    assert!(import(&fhir, &p("p1000")).is_ok());
    for twice in [
        fhir.replacen("\"provision\":{", "\"provision\":{\"type\":\"deny\",", 1),
        fhir.replacen("{", "{\"resourceType\":\"Consent\",", 1),
        fhir.replacen("\"status\"", "\"status\":\"active\",\"status\"", 1),
    ] {
        assert_ne!(twice, fhir, "the edit applies");
        let e = import(&twice, &p("p1000")).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
