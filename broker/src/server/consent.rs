//! The Consent service: grants, limits and revocations signed by patients (or custodians
//! recording paper consents), FHIR R4 Consent import and export, a subject's consents, and
//! "who used my data".

use std::sync::Arc;

use ledger::entry::Body;
use ledger::ids::{Role, SubjectId, Timestamp};
use proto::v1::{self, consent_server::Consent};
use tonic::{Request, Response, Status, Streaming};

use super::{Broker, appended, caller, signed_by_caller};
use crate::auth::Caller;
use crate::error::Error;

/// The Consent service.
pub struct ConsentService(pub Arc<Broker>);

/// Entries of a bulk import handed to the ledger at once (its committer batches them).
const BULK_BATCH: usize = 4096;
/// Entries one bulk import may carry.
const MAX_BULK: u64 = 1_000_000;
/// Refusals a bulk import lists (the rest are counted).
const MAX_LISTED_REFUSALS: usize = 1000;

/// The subject a caller may read: a patient their own (an empty request means that), a
/// custodian or the operator any.
fn readable_subject(st: &ledger::State, caller: &Caller, asked: &str) -> Result<SubjectId, Error> {
    match caller.role {
        Role::Patient => {
            let own = st
                .principal(&caller.id)
                .and_then(|p| p.subject.clone())
                .ok_or_else(|| Error::precondition("no subject is registered for you"))?;
            if !asked.is_empty() && asked != own.as_str() {
                return Err(Error::forbidden(
                    "a patient may read only their own consents and usage",
                ));
            }
            Ok(own)
        }
        Role::Custodian | Role::Operator => {
            SubjectId::new(asked).map_err(|e| Error::invalid(format!("subject: {e}")))
        }
        _ => Err(Error::forbidden(
            "only the patient, a custodian or the operator reads a subject's consents",
        )),
    }
}

fn leaf_text(l: &ledger::Ledger, index: u64) -> Result<String, Error> {
    let leaf = l.leaf(index).map_err(Error::from)?;
    String::from_utf8(leaf).map_err(|e| Error::internal("a stored entry", e))
}

#[tonic::async_trait]
impl Consent for ConsentService {
    async fn grant(&self, req: Request<v1::SignedEntry>) -> Result<Response<v1::Appended>, Status> {
        let caller = caller(&req)?;
        let signed = signed_by_caller(&caller, Some(req.into_inner()))?;
        if !matches!(signed.entry.body, Body::ConsentGranted(_)) {
            return Err(Error::invalid("Grant takes a consent_granted entry").into());
        }
        let a = self.0.blocking(move |l| l.append(signed)).await?;
        tracing::info!(caller = %caller.id, index = a.index, "consent granted");
        Ok(Response::new(appended(&a)))
    }

    async fn grant_many(
        &self,
        req: Request<Streaming<v1::SignedEntry>>,
    ) -> Result<Response<v1::BulkAppended>, Status> {
        let caller = caller(&req)?;
        let mut stream = req.into_inner();
        let mut out = v1::BulkAppended::default();
        let mut position: u64 = 0;
        let mut batch: Vec<(u64, ledger::entry::SignedEntry)> = Vec::with_capacity(BULK_BATCH);
        let refuse = |out: &mut v1::BulkAppended, position: u64, reason: String| {
            out.refused += 1;
            if out.refusals.len() < MAX_LISTED_REFUSALS {
                out.refusals.push(v1::BulkRefusal { position, reason });
            }
        };
        loop {
            let next = stream.message().await?;
            let done = next.is_none();
            if let Some(e) = next {
                if position >= MAX_BULK {
                    return Err(Error::invalid(format!(
                        "at most {MAX_BULK} entries per call; the {} before were handled \
                         ({} appended)",
                        MAX_BULK, out.appended
                    ))
                    .into());
                }
                match signed_by_caller(&caller, Some(e)) {
                    Ok(s)
                        if matches!(
                            s.entry.body,
                            Body::ConsentGranted(_) | Body::ConsentRevoked(_)
                        ) =>
                    {
                        batch.push((position, s));
                    }
                    Ok(_) => refuse(
                        &mut out,
                        position,
                        "GrantMany takes consent_granted and consent_revoked entries".into(),
                    ),
                    Err(s) => refuse(&mut out, position, s.words()),
                }
                position += 1;
            }
            if batch.len() >= BULK_BATCH || (done && !batch.is_empty()) {
                let taken = std::mem::take(&mut batch);
                let (positions, entries): (Vec<u64>, Vec<_>) = taken.into_iter().unzip();
                let ledger = self.0.ledger.clone();
                let results = tokio::task::spawn_blocking(move || ledger.append_many(entries))
                    .await
                    .map_err(|e| Error::internal("a ledger task failed", e))?;
                for (p, r) in positions.into_iter().zip(results) {
                    match r {
                        Ok(a) => {
                            if out.appended == 0 {
                                out.first_index = a.index;
                            }
                            out.appended += 1;
                            out.last_index = a.index;
                            out.tree_size = a.index + 1;
                        }
                        Err(e) => refuse(&mut out, p, Error::from(e).words()),
                    }
                }
            }
            if done {
                break;
            }
        }
        tracing::info!(caller = %caller.id, appended = out.appended, refused = out.refused,
            "consents imported");
        Ok(Response::new(out))
    }

    async fn revoke(
        &self,
        req: Request<v1::SignedEntry>,
    ) -> Result<Response<v1::Appended>, Status> {
        let caller = caller(&req)?;
        let signed = signed_by_caller(&caller, Some(req.into_inner()))?;
        if !matches!(signed.entry.body, Body::ConsentRevoked(_)) {
            return Err(Error::invalid("Revoke takes a consent_revoked entry").into());
        }
        let a = self.0.blocking(move |l| l.append(signed)).await?;
        tracing::info!(caller = %caller.id, index = a.index, "consent revoked");
        Ok(Response::new(appended(&a)))
    }

    async fn list(
        &self,
        req: Request<v1::SubjectRequest>,
    ) -> Result<Response<v1::ConsentList>, Status> {
        let caller = caller(&req)?;
        let views = {
            let st = self.0.ledger.state();
            let subject = readable_subject(&st, &caller, &req.get_ref().subject)?;
            st.consents_of(&subject, Timestamp::now())
        };
        let mut consents = Vec::with_capacity(views.len());
        for v in views {
            consents.push(v1::ConsentView {
                grant_json: leaf_text(&self.0.ledger, v.index)?,
                consent_id: v.consent_id,
                entry_index: v.index,
                active: v.in_effect,
                ended_reason: v
                    .ended_by
                    .map(|i| format!("ended by entry {i}"))
                    .unwrap_or_default(),
            });
        }
        Ok(Response::new(v1::ConsentList { consents }))
    }

    async fn usage(
        &self,
        req: Request<v1::SubjectRequest>,
    ) -> Result<Response<v1::UsageResponse>, Status> {
        let caller = caller(&req)?;
        let refs = {
            let st = self.0.ledger.state();
            let subject = readable_subject(&st, &caller, &req.get_ref().subject)?;
            st.receipts_including(&subject)
                .into_iter()
                .map(|r| {
                    let title = st
                        .study(r.study.as_str())
                        .map(|s| s.reg.title.clone())
                        .unwrap_or_default();
                    (r, title)
                })
                .collect::<Vec<_>>()
        };
        let mut usages = Vec::with_capacity(refs.len());
        for (r, title) in refs {
            usages.push(v1::Usage {
                study: r.study.to_string(),
                study_title: title,
                dataset: r.dataset.to_string(),
                time: r.time.to_string(),
                receipt_index: r.index,
                receipt_json: leaf_text(&self.0.ledger, r.index)?,
            });
        }
        Ok(Response::new(v1::UsageResponse { usages }))
    }

    async fn import_fhir(
        &self,
        req: Request<v1::FhirImportRequest>,
    ) -> Result<Response<v1::Appended>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let signed = signed_by_caller(&caller, r.entry)?;
        let body = ledger::fhir::import(&r.resource_json, &signed.entry.author)
            .map_err(|e| Error::invalid(e.to_string()))?;
        if body != signed.entry.body {
            return Err(Error::invalid(
                "the signed entry does not say what the FHIR resource says; convert it with \
                 the published mapping (the CLI's consent import-fhir does) and sign that",
            )
            .into());
        }
        let a = self.0.blocking(move |l| l.append(signed)).await?;
        tracing::info!(caller = %caller.id, index = a.index, "FHIR consent imported");
        Ok(Response::new(appended(&a)))
    }

    async fn export_fhir(
        &self,
        req: Request<v1::SubjectRequest>,
    ) -> Result<Response<v1::FhirBundle>, Status> {
        let caller = caller(&req)?;
        let views = {
            let st = self.0.ledger.state();
            let subject = readable_subject(&st, &caller, &req.get_ref().subject)?;
            st.consents_of(&subject, Timestamp::now())
        };
        let mut resources = Vec::with_capacity(views.len());
        for v in views {
            let e = self.0.ledger.entry(v.index).map_err(Error::from)?.entry;
            let Body::ConsentGranted(g) = &e.body else {
                return Err(Error::internal("a consent view", "it points at another entry").into());
            };
            resources.push(ledger::fhir::export(g, e.time, v.ended_by.is_none()));
        }
        Ok(Response::new(v1::FhirBundle {
            bundle_json: ledger::fhir::bundle(resources).to_string(),
        }))
    }
}
