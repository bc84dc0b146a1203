//! FHIR R4 Consent resources: import as ledger entries, export from them.
//!
//! The mapping is deterministic, so a client (the CLI) and the broker convert one resource to
//! the same entry: the client signs the entry, and the broker converts the resource again and
//! appends only if the signed entry says exactly what the resource says.
//!
//! | FHIR R4 Consent | ledger |
//! |---|---|
//! | `scope` `consentscope#research` | required (other scopes are refused) |
//! | `status` `active`, `provision.type` `permit` | `consent_granted` |
//! | `status` `active`, `provision.type` `deny` | `consent_revoked` over the scope (an objection) |
//! | `status` `inactive` | `consent_revoked` of the consent with this `id` |
//! | `id` | `consent_id` and `fhir_id` |
//! | `patient` `Patient/<subject>` | `subject` (the privacy-unit id in the datasets) |
//! | `organization` `Organization/<custodian>` | scope: every dataset of the custodian |
//! | `provision.data[].reference.identifier` (system [`DATASET_SYSTEM`]) | scope: these datasets |
//! | `provision.purpose` DUO codings (system [`DUO_SYSTEM`]) | purposes and modifiers; DS carries its disease term in the extension [`DISEASE_EXTENSION`] |
//! | `provision.actor` `ResearchStudy/<id>` | `studies_allow` |
//! | `provision.provision[]` of type `deny` with `ResearchStudy` actors | `studies_deny` |
//! | `provision.period` (`start`, or else `dateTime`; `end`) | `valid_from`, `valid_until` (a date-only end covers its whole day) |
//!
//! The grantor is always the entry's author, whatever `performer` says: the ledger records who
//! signed. Anything the mapping cannot represent is refused with the element's path.

use chrono::{DateTime, NaiveDate};
use serde_json::{Map, Value, json};

use crate::duo::{Modifier, Purpose};
use crate::entry::{Body, ConsentGranted, ConsentRevoked, ConsentScope};
use crate::error::{Error, Result};
use crate::ids::{DatasetId, PrincipalId, StudyId, SubjectId, Timestamp};

/// The code system of DUO terms in `provision.purpose`.
pub const DUO_SYSTEM: &str = "http://purl.obolibrary.org/obo/duo.owl";
/// The extension on a DS coding that carries the disease term (`valueCode`, a CURIE).
pub const DISEASE_EXTENSION: &str = "urn:consentry:fhir:duo-disease";
/// The identifier system of dataset ids in `provision.data`.
pub const DATASET_SYSTEM: &str = "urn:consentry:dataset";
/// The identifier system of principal ids (the grantor in `performer`).
pub const PRINCIPAL_SYSTEM: &str = "urn:consentry:principal";
const SCOPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/consentscope";
/// Largest resource accepted.
pub const MAX_RESOURCE: usize = 64 << 10;

/// DUO terms: (CURIE, label, purpose or modifier abbreviation).
const TERMS: &[(&str, &str, &str)] = &[
    ("DUO:0000004", "no restriction", "NRES"),
    ("DUO:0000042", "general research use", "GRU"),
    (
        "DUO:0000006",
        "health or medical or biomedical research",
        "HMB",
    ),
    ("DUO:0000007", "disease specific research", "DS"),
    (
        "DUO:0000011",
        "population origins or ancestry research only",
        "POA",
    ),
    ("DUO:0000046", "non-commercial use only", "NCU"),
    ("DUO:0000045", "not for profit organisation use only", "NPU"),
    ("DUO:0000021", "ethics approval required", "IRB"),
    ("DUO:0000015", "no general methods research", "NMDS"),
    (
        "DUO:0000044",
        "population origins or ancestry research prohibited",
        "NPOA",
    ),
    ("DUO:0000027", "project specific restriction", "PS"),
];

fn bad(path: &str, reason: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("FHIR Consent {path}: {reason}"))
}

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| bad(path, "must be an object"))
}

fn text<'a>(o: &'a Map<String, Value>, key: &str, path: &str) -> Result<Option<&'a str>> {
    match o.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(&format!("{path}.{key}"), "must be a string")),
    }
}

fn array<'a>(o: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a [Value]> {
    match o.get(key) {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(bad(&format!("{path}.{key}"), "must be an array")),
    }
}

/// The id after `Type/` in a Reference's `reference`.
fn reference<'a>(v: &'a Value, ty: &str, path: &str) -> Result<&'a str> {
    let r = text(obj(v, path)?, "reference", path)?
        .ok_or_else(|| bad(path, format!("needs a reference {ty}/<id>")))?;
    r.strip_prefix(ty)
        .and_then(|r| r.strip_prefix('/'))
        .filter(|id| !id.is_empty())
        .ok_or_else(|| bad(path, format!("must reference a {ty}, as {ty}/<id>")))
}

/// FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
fn fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A FHIR dateTime (full, with a zone) or date. `end` moves a date to the next day's start, so
/// a date-only end covers its whole day (ledger ends are exclusive).
fn time(s: &str, end: bool, path: &str) -> Result<Timestamp> {
    let secs = if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        t.timestamp()
    } else if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let d = if end { d.succ_opt().unwrap_or(d) } else { d };
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp())
            .ok_or_else(|| bad(path, "date out of range"))?
    } else {
        return Err(bad(
            path,
            "must be a date (2026-01-31) or a dateTime with its zone (2026-01-31T12:00:00Z)",
        ));
    };
    Timestamp::from_unix(secs).map_err(|e| bad(path, e))
}

fn duo_terms(provision: &Map<String, Value>) -> Result<(Vec<Purpose>, Vec<Modifier>)> {
    let (mut purposes, mut modifiers) = (Vec::new(), Vec::new());
    for (i, c) in array(provision, "purpose", "provision")?.iter().enumerate() {
        let path = format!("provision.purpose[{i}]");
        let c = obj(c, &path)?;
        if text(c, "system", &path)? != Some(DUO_SYSTEM) {
            return Err(bad(&path, format!("only DUO codes (system {DUO_SYSTEM})")));
        }
        let code = text(c, "code", &path)?.ok_or_else(|| bad(&path, "needs a code"))?;
        let (_, _, abbr) = TERMS.iter().find(|t| t.0 == code).ok_or_else(|| {
            bad(
                &path,
                format!("{code:?} is not a DUO term this ledger knows"),
            )
        })?;
        match *abbr {
            "DS" => {
                let mut term = None;
                for e in array(c, "extension", &path)? {
                    let e = obj(e, &path)?;
                    if text(e, "url", &path)? == Some(DISEASE_EXTENSION) {
                        term = text(e, "valueCode", &path)?;
                    }
                }
                let term = term.ok_or_else(|| {
                    bad(
                        &path,
                        format!("DS needs its disease term in extension {DISEASE_EXTENSION}"),
                    )
                })?;
                purposes.push(Purpose::parse(&format!("DS:{term}")).map_err(|e| bad(&path, e))?);
            }
            "NRES" | "GRU" | "HMB" | "POA" => {
                purposes.push(Purpose::parse(abbr).map_err(|e| bad(&path, e))?);
            }
            m => modifiers
                .push(serde_json::from_value(Value::String(m.into())).map_err(|e| bad(&path, e))?),
        }
    }
    Ok((purposes, modifiers))
}

fn studies(actors: &[Value], path: &str) -> Result<Vec<StudyId>> {
    actors
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let path = format!("{path}.actor[{i}]");
            let r = obj(a, &path)?
                .get("reference")
                .ok_or_else(|| bad(&path, "needs a reference"))?;
            let id = reference(r, "ResearchStudy", &format!("{path}.reference"))?;
            StudyId::new(id).map_err(|e| bad(&path, e))
        })
        .collect()
}

/// A JSON document none of whose objects names a member twice (checked while it is read).
struct Unique;

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Unique, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> std::result::Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Unique, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the member {key:?} is given twice"
                )));
            }
            map.next_value::<Unique>()?;
        }
        Ok(Unique)
    }
}

/// Converts a FHIR R4 Consent resource (JSON text) into the entry body `grantor` signs. See
/// the module documentation for the mapping.
pub fn import(resource: &str, grantor: &PrincipalId) -> Result<Body> {
    if resource.len() > MAX_RESOURCE {
        return Err(bad("", format!("larger than {MAX_RESOURCE} bytes")));
    }
    // A member given twice would be read as its last value by the parse below (a grant once
    // became a revocation): refused first.
    serde_json::from_str::<Unique>(resource).map_err(|e| bad("", format!("not JSON: {e}")))?;
    let v: Value = serde_json::from_str(resource).map_err(|e| bad("", format!("not JSON: {e}")))?;
    let r = obj(&v, "resource")?;
    if text(r, "resourceType", "")? != Some("Consent") {
        return Err(bad("resourceType", "must be \"Consent\""));
    }
    let id = text(r, "id", "")?.ok_or_else(|| bad("id", "is required"))?;
    if !fhir_id(id) {
        return Err(bad("id", "must be 1 to 64 of A-Z, a-z, 0-9, '-', '.'"));
    }
    let research = r
        .get("scope")
        .and_then(|s| s.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("system").and_then(Value::as_str) == Some(SCOPE_SYSTEM)
                    && c.get("code").and_then(Value::as_str) == Some("research")
            })
        });
    if !research {
        return Err(bad(
            "scope",
            format!("must be research ({SCOPE_SYSTEM}#research)"),
        ));
    }
    let patient = r
        .get("patient")
        .ok_or_else(|| bad("patient", "is required"))?;
    let subject =
        SubjectId::new(reference(patient, "Patient", "patient")?).map_err(|e| bad("patient", e))?;
    let status = text(r, "status", "")?.ok_or_else(|| bad("status", "is required"))?;
    if status == "inactive" {
        return Ok(Body::ConsentRevoked(ConsentRevoked {
            subject,
            consent_id: Some(id.to_owned()),
            scope: None,
            grantor: grantor.clone(),
            reason: Some("FHIR Consent status inactive".into()),
        }));
    }
    if status != "active" {
        return Err(bad(
            "status",
            format!("{status:?} cannot be imported; use active (permit or deny) or inactive"),
        ));
    }
    let provision = obj(
        r.get("provision")
            .ok_or_else(|| bad("provision", "is required"))?,
        "provision",
    )?;

    let orgs = array(r, "organization", "")?;
    let custodian = match orgs {
        [] => None,
        [o] => Some(
            PrincipalId::new(reference(o, "Organization", "organization[0]")?)
                .map_err(|e| bad("organization[0]", e))?,
        ),
        _ => return Err(bad("organization", "at most one custodian")),
    };
    let mut datasets = Vec::new();
    for (i, d) in array(provision, "data", "provision")?.iter().enumerate() {
        let path = format!("provision.data[{i}].reference.identifier");
        let ident = d
            .get("reference")
            .and_then(|r| r.get("identifier"))
            .ok_or_else(|| bad(&path, "is required"))?;
        let ident = obj(ident, &path)?;
        if text(ident, "system", &path)? != Some(DATASET_SYSTEM) {
            return Err(bad(&path, format!("system must be {DATASET_SYSTEM}")));
        }
        let value = text(ident, "value", &path)?.ok_or_else(|| bad(&path, "needs a value"))?;
        datasets.push(DatasetId::new(value).map_err(|e| bad(&path, e))?);
    }
    if custodian.is_none() && datasets.is_empty() {
        return Err(bad(
            "organization",
            "name the custodian (Organization/<id>) or the datasets (provision.data)",
        ));
    }
    let scope = ConsentScope {
        datasets,
        custodian,
    };

    match text(provision, "type", "provision")? {
        Some("deny") => {
            return Ok(Body::ConsentRevoked(ConsentRevoked {
                subject,
                consent_id: None,
                scope: Some(scope),
                grantor: grantor.clone(),
                reason: Some("FHIR Consent provision deny".into()),
            }));
        }
        Some("permit") => {}
        _ => return Err(bad("provision.type", "must be permit or deny")),
    }
    let (purposes, modifiers) = duo_terms(provision)?;
    if purposes.is_empty() {
        return Err(bad("provision.purpose", "needs at least one DUO purpose"));
    }
    let studies_allow = studies(array(provision, "actor", "provision")?, "provision")?;
    let mut studies_deny = Vec::new();
    for (i, p) in array(provision, "provision", "provision")?
        .iter()
        .enumerate()
    {
        let path = format!("provision.provision[{i}]");
        let p = obj(p, &path)?;
        if text(p, "type", &path)? != Some("deny") {
            return Err(bad(&path, "nested provisions may only deny studies"));
        }
        studies_deny.extend(studies(array(p, "actor", &path)?, &path)?);
    }
    let period = match provision.get("period") {
        Some(p) => Some(obj(p, "provision.period")?),
        None => None,
    };
    let start = period
        .map(|p| text(p, "start", "provision.period"))
        .transpose()?
        .flatten();
    let valid_from = match (start, text(r, "dateTime", "")?) {
        (Some(s), _) => time(s, false, "provision.period.start")?,
        (None, Some(d)) => time(d, false, "dateTime")?,
        (None, None) => {
            return Err(bad(
                "provision.period.start",
                "is required (or the resource's dateTime)",
            ));
        }
    };
    let valid_until = period
        .map(|p| text(p, "end", "provision.period"))
        .transpose()?
        .flatten()
        .map(|e| time(e, true, "provision.period.end"))
        .transpose()?;
    Ok(Body::ConsentGranted(ConsentGranted {
        consent_id: id.to_owned(),
        subject,
        scope,
        purposes,
        modifiers,
        studies_allow,
        studies_deny,
        valid_from,
        valid_until,
        grantor: grantor.clone(),
        fhir_id: Some(id.to_owned()),
        replaces: None,
    }))
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

fn study_actor(s: &StudyId) -> Value {
    json!({
        "role": {"coding": [coding(
            "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "IRCP",
            "information recipient",
        )]},
        "reference": {"reference": format!("ResearchStudy/{s}")},
    })
}

/// A grant as a FHIR R4 Consent resource: `active` while it is not revoked or replaced,
/// `inactive` after. `time` is when it was recorded.
pub fn export(g: &ConsentGranted, time: Timestamp, active: bool) -> Value {
    let id = g.fhir_id.clone().filter(|i| fhir_id(i)).unwrap_or_else(|| {
        // Ledger consent ids allow characters FHIR ids do not: keep what fits.
        let mut s: String = g
            .consent_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        s.truncate(64);
        s
    });
    let term = |abbr: &str| {
        TERMS
            .iter()
            .find(|t| t.2 == abbr)
            .map(|t| coding(DUO_SYSTEM, t.0, t.1))
            .unwrap_or(Value::Null)
    };
    let mut purpose: Vec<Value> = g
        .purposes
        .iter()
        .map(|p| match p {
            Purpose::Ds(d) => {
                let mut c = term("DS");
                c["extension"] = json!([{"url": DISEASE_EXTENSION, "valueCode": d}]);
                c
            }
            other => term(&other.to_string()),
        })
        .collect();
    purpose.extend(g.modifiers.iter().map(|m| {
        let abbr = serde_json::to_value(m)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        term(&abbr)
    }));
    let mut provision = json!({
        "type": "permit",
        "period": {"start": g.valid_from.to_string()},
        "purpose": purpose,
    });
    if let Some(end) = g.valid_until {
        provision["period"]["end"] = Value::String(end.to_string());
    }
    if !g.scope.datasets.is_empty() {
        provision["data"] = g
            .scope
            .datasets
            .iter()
            .map(|d| {
                json!({"meaning": "instance", "reference": {"identifier": {
                    "system": DATASET_SYSTEM, "value": d.as_str()}}})
            })
            .collect();
    }
    if !g.studies_allow.is_empty() {
        provision["actor"] = g.studies_allow.iter().map(study_actor).collect();
    }
    if !g.studies_deny.is_empty() {
        provision["provision"] = json!([{
            "type": "deny",
            "actor": g.studies_deny.iter().map(study_actor).collect::<Vec<_>>(),
        }]);
    }
    let mut r = json!({
        "resourceType": "Consent",
        "id": id,
        "status": if active { "active" } else { "inactive" },
        "scope": {"coding": [coding(SCOPE_SYSTEM, "research", "Research")]},
        "category": [{"coding": [coding(
            "http://loinc.org",
            "57016-8",
            "Privacy policy acknowledgement Document",
        )]}],
        "patient": {"reference": format!("Patient/{}", g.subject)},
        "dateTime": time.to_string(),
        "performer": [{"identifier": {"system": PRINCIPAL_SYSTEM, "value": g.grantor.as_str()}}],
        "policyRule": {"coding": [coding(
            "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "OPTIN",
            "opt-in",
        )]},
        "provision": provision,
    });
    if let Some(c) = &g.scope.custodian {
        r["organization"] = json!([{"reference": format!("Organization/{c}")}]);
    }
    r
}

/// Resources as a FHIR `Bundle` of type `collection`.
pub fn bundle(resources: Vec<Value>) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": resources
            .into_iter()
            .map(|r| json!({"resource": r}))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests;
