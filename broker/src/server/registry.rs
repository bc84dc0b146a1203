//! The Registry service: principals, datasets and their versions, studies and approvals.

use std::sync::Arc;

use ledger::entry::Body;
use ledger::ids::Role;
use ledger::state::StudyStatus;
use proto::v1::{self, registry_server::Registry};
use tonic::{Request, Response, Status, Streaming};

use super::{Broker, appended, caller, signed_by_caller};
use crate::error::Error;

/// The Registry service.
pub struct RegistryService(pub Arc<Broker>);

/// A budget as granted and spent.
pub(crate) fn budget(a: &ledger::budget::Account) -> v1::Budget {
    let g = a.guarantee();
    v1::Budget {
        epsilon_left: a.epsilon_left(),
        delta_left: a.delta_left(),
        epsilon_spent: a.spent.epsilon,
        delta_spent: a.spent.delta,
        epsilon_granted: a.epsilon,
        delta_granted: a.delta,
        rho_spent: a.spent.rho,
        rho_left: a.rho_left(),
        epsilon_guaranteed: g.epsilon,
        delta_guaranteed: g.delta,
        accountant: g.accountant.to_owned(),
    }
}

pub(crate) fn study_message(st: &ledger::State, s: &ledger::state::Study) -> v1::Study {
    let id = s.reg.study.as_str();
    let (irb, grants, from, until) = match &s.approval {
        Some((irb, a)) => (
            irb.to_string(),
            a.grants
                .iter()
                .map(|g| v1::Grant {
                    dataset: g.dataset.to_string(),
                    dp: g.dp,
                    extract_k: g.extract_k.unwrap_or(0),
                    min_cell_size: g.min_cell_size.unwrap_or(0),
                    budget: Some(budget(&ledger::budget::Account {
                        epsilon: g.epsilon,
                        delta: g.delta,
                        spent: st.spent(id, g.dataset.as_str()),
                    })),
                })
                .collect(),
            a.valid_from.to_string(),
            a.valid_until.to_string(),
        ),
        None => Default::default(),
    };
    v1::Study {
        id: id.to_owned(),
        title: s.reg.title.clone(),
        sponsor: s.reg.sponsor.to_string(),
        pi: s.reg.pi.to_string(),
        researchers: s.reg.researchers.iter().map(|r| r.to_string()).collect(),
        purpose: s.reg.purpose.to_string(),
        status: match s.status {
            StudyStatus::Registered => "registered",
            StudyStatus::Approved => "approved",
            StudyStatus::Suspended => "suspended",
            StudyStatus::Closed => "closed",
        }
        .into(),
        irb,
        grants,
        valid_from: from,
        valid_until: until,
    }
}

/// Whether `caller` may see study `s`: its members, sponsor and IRB, and the operator.
pub(crate) fn may_see_study(caller: &crate::auth::Caller, s: &ledger::state::Study) -> bool {
    let id = caller.id.as_str();
    caller.role == Role::Operator
        || s.is_member(id)
        || s.reg.sponsor.as_str() == id
        || s.approval
            .as_ref()
            .is_some_and(|(irb, _)| irb.as_str() == id)
        || (caller.role == Role::Irb && s.approval.is_none())
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn append(
        &self,
        req: Request<v1::SignedEntry>,
    ) -> Result<Response<v1::Appended>, Status> {
        let caller = caller(&req)?;
        let signed = signed_by_caller(&caller, Some(req.into_inner()))?;
        match &signed.entry.body {
            Body::PrincipalRegistered(_)
            | Body::KeyRotated(_)
            | Body::PrincipalRevoked(_)
            | Body::StudyRegistered(_)
            | Body::StudyApproved(_)
            | Body::StudySuspended(_)
            | Body::StudyClosed(_)
            | Body::CheckpointCosigned(_) => {}
            Body::DatasetRegistered(_) => {
                return Err(Error::invalid(
                    "datasets are registered with RegisterDataset, which carries their files",
                )
                .into());
            }
            Body::ConsentGranted(_) | Body::ConsentRevoked(_) => {
                return Err(Error::invalid("consents go through the Consent service").into());
            }
            Body::QueryReceipt(_) => {
                return Err(Error::forbidden("only the broker writes query receipts").into());
            }
        }
        let kind = signed.entry.body.kind();
        let a = self.0.blocking(move |l| l.append(signed)).await?;
        tracing::info!(caller = %caller.id, kind, index = a.index, "appended");
        Ok(Response::new(appended(&a)))
    }

    async fn register_dataset(
        &self,
        req: Request<Streaming<v1::DatasetUpload>>,
    ) -> Result<Response<v1::Appended>, Status> {
        use v1::dataset_upload::Part;
        let caller = caller(&req)?;
        // The role first: no one else may hold an upload open.
        if !self.0.ledger.state().may_act(&caller.id, Role::Custodian) {
            return Err(Error::forbidden("only a registered custodian registers datasets").into());
        }
        let mut stream = req.into_inner();
        let Some(Part::Header(h)) = next_part(&mut stream).await?.and_then(|m| m.part) else {
            return Err(Error::invalid("the first message of an upload is its header").into());
        };
        let signed = signed_by_caller(&caller, h.entry)?;
        let Body::DatasetRegistered(reg) = &signed.entry.body else {
            return Err(
                Error::invalid("the header's entry must be a dataset_registered entry").into(),
            );
        };
        let reg = reg.clone();
        // Refuse early what the ledger would refuse, before receiving any file.
        {
            let st = self.0.ledger.state();
            if !st.may_act(&caller.id, Role::Custodian) {
                return Err(
                    Error::forbidden("only a registered custodian registers datasets").into(),
                );
            }
            if let Some(ds) = st.dataset(reg.dataset.as_str()) {
                if ds.custodian.as_str() != caller.id {
                    return Err(Error::forbidden(format!(
                        "dataset {} belongs to another custodian",
                        reg.dataset
                    ))
                    .into());
                }
                let last = ds.latest().reg.version;
                if ds.versions.iter().any(|v| v.reg.version == reg.version) {
                    return Err(Error::already_exists(format!(
                        "version {} of dataset {} is registered; register version {} or later",
                        reg.version,
                        reg.dataset,
                        last + 1
                    ))
                    .into());
                }
                if reg.version <= last {
                    return Err(Error::precondition(format!(
                        "dataset {} is at version {last}; register version {} or later",
                        reg.dataset,
                        last + 1
                    ))
                    .into());
                }
            }
            let (key, _) = st.signing_key(&signed.entry).map_err(Error::from)?;
            if !key.verify_raw(&signed.entry.canonical_bytes(), &signed.sig) {
                return Err(Error::invalid(
                    "the entry's signature does not verify with the caller's key",
                )
                .into());
            }
        }
        let mut upload = self.0.store.begin_upload(&reg, &h.policy_toml).await?;
        while let Some(m) = next_part(&mut stream).await? {
            match m.part {
                Some(Part::Chunk(c)) => upload.write(&c.path, &c.data).await?,
                _ => {
                    return Err(Error::invalid(
                        "after the header, an upload carries only file chunks",
                    )
                    .into());
                }
            }
        }
        // Checked and durable in its staging directory; the append decides (the ledger's single
        // writer refuses a version registered meanwhile: the loser leaves nothing, its staging
        // directory is removed when `staged` drops); only then are the files moved into place.
        let (dataset, staged) = upload.finish(&reg).await?;
        let a = self.0.blocking(move |l| l.append(signed)).await?;
        staged.place().await?;
        let engine = anonymizer::Engine::new(dataset)
            .map_err(|e| Error::internal("loading the dataset", e))?;
        self.0.store.insert_engine(&reg, Arc::new(engine)).await;
        tracing::info!(caller = %caller.id, dataset = %reg.dataset, version = reg.version,
            index = a.index, "dataset registered");
        Ok(Response::new(appended(&a)))
    }

    async fn get_principal(
        &self,
        req: Request<v1::GetPrincipalRequest>,
    ) -> Result<Response<v1::Principal>, Status> {
        let id = req.into_inner().id;
        let st = self.0.ledger.state();
        let p = st
            .principal(&id)
            .ok_or_else(|| Error::not_found(format!("unknown principal {}", super::shown(&id))))?;
        Ok(Response::new(v1::Principal {
            id: p.id.to_string(),
            role: p.role.to_string(),
            key: p.key.to_text(),
            revoked: p.revoked_at.is_some(),
            display_name: p.display_name.clone().unwrap_or_default(),
        }))
    }

    async fn list_datasets(
        &self,
        _req: Request<v1::ListDatasetsRequest>,
    ) -> Result<Response<v1::ListDatasetsResponse>, Status> {
        let st = self.0.ledger.state();
        let mut datasets: Vec<v1::DatasetVersion> = st
            .datasets()
            .flat_map(|(_, d)| d.versions.iter())
            .map(|v| v1::DatasetVersion {
                dataset: v.reg.dataset.to_string(),
                version: v.reg.version,
                custodian: v.reg.custodian.to_string(),
                digest: v.reg.digest.to_string(),
                consent_basis: match v.reg.consent_basis {
                    ledger::entry::ConsentBasis::OptIn => "opt_in",
                    ledger::entry::ConsentBasis::OptOut => "opt_out",
                }
                .into(),
                rows: v.reg.rows(),
                tables: v.reg.tables.iter().map(|t| t.name.clone()).collect(),
                entry_index: v.index,
            })
            .collect();
        datasets.sort_by(|a, b| (&a.dataset, a.version).cmp(&(&b.dataset, b.version)));
        Ok(Response::new(v1::ListDatasetsResponse { datasets }))
    }

    async fn describe_dataset(
        &self,
        req: Request<v1::DescribeDatasetRequest>,
    ) -> Result<Response<v1::DatasetPolicy>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let reg = {
            let st = self.0.ledger.state();
            let d = st.dataset(&r.dataset).ok_or_else(|| {
                Error::not_found(format!("unknown dataset {}", super::shown(&r.dataset)))
            })?;
            let v = match r.version {
                0 => d.versions.last(),
                n => d.versions.iter().find(|v| v.reg.version == n),
            }
            .ok_or_else(|| {
                Error::not_found(format!(
                    "dataset {} has no version {}",
                    r.dataset, r.version
                ))
            })?;
            let allowed = caller.role == Role::Operator
                || v.reg.custodian.as_str() == caller.id
                || st.studies().any(|s| {
                    s.reg.datasets.iter().any(|d| d.as_str() == r.dataset)
                        && may_see_study(&caller, s)
                });
            if !allowed {
                return Err(Error::forbidden(format!(
                    "dataset {}'s policy is for its custodian, the operator, and the members, \
                     sponsors and IRBs of studies that requested it",
                    r.dataset
                ))
                .into());
            }
            v.reg.clone()
        };
        let b = self.0.clone();
        let reg2 = reg.clone();
        let policy_toml = tokio::task::spawn_blocking(move || b.store.policy_text(&reg2))
            .await
            .map_err(|e| Error::internal("reading a policy", e))??;
        Ok(Response::new(v1::DatasetPolicy {
            dataset: reg.dataset.to_string(),
            version: reg.version,
            policy_toml,
            policy_digest: reg.policy_digest.to_string(),
        }))
    }

    async fn list_studies(
        &self,
        req: Request<v1::ListStudiesRequest>,
    ) -> Result<Response<v1::ListStudiesResponse>, Status> {
        let caller = caller(&req)?;
        let st = self.0.ledger.state();
        let mut studies: Vec<v1::Study> = st
            .studies()
            .filter(|s| may_see_study(&caller, s))
            .map(|s| study_message(&st, s))
            .collect();
        studies.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(v1::ListStudiesResponse { studies }))
    }
}

/// How long an upload may stay silent between two messages.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The next message of an upload, or `DEADLINE_EXCEEDED` after [`UPLOAD_IDLE`] of silence.
async fn next_part(
    stream: &mut Streaming<v1::DatasetUpload>,
) -> Result<Option<v1::DatasetUpload>, Error> {
    tokio::time::timeout(UPLOAD_IDLE, stream.message())
        .await
        .map_err(|_| {
            Error::TimedOut(format!(
                "the upload sent nothing for {} s; nothing was registered",
                UPLOAD_IDLE.as_secs()
            ))
        })?
        .map_err(Error::Stream)
}
