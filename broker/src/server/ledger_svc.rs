//! The Ledger service: checkpoints, entries, inclusion and consistency proofs, and sponsors'
//! evidence bundles.

use std::sync::Arc;

use ledger::entry::Body;
use ledger::ids::Role;
use proto::v1::{self, ledger_server::Ledger};
use tonic::{Request, Response, Status};

use super::{Broker, caller};
use crate::auth::Caller;
use crate::error::Error;

/// The Ledger service.
pub struct LedgerService(pub Arc<Broker>);

/// Whether `caller` may read the entry: its author, the operator, or for a study's entries
/// and receipts, those who may see the study. Consents and patients' registrations are their
/// subject's business only.
fn may_read(st: &ledger::State, caller: &Caller, e: &ledger::entry::Entry) -> bool {
    if caller.role == Role::Operator || e.author.as_str() == caller.id {
        return true;
    }
    let study = match &e.body {
        b @ (Body::StudyRegistered(_)
        | Body::StudyApproved(_)
        | Body::StudySuspended(_)
        | Body::StudyClosed(_)
        | Body::QueryReceipt(_)) => b.study(),
        // A patient's registration (it holds the subject id), key rotations and revocation
        // are the operator's and that patient's only.
        Body::PrincipalRegistered(b) if b.role == Role::Patient || b.subject.is_some() => {
            return b.id.as_str() == caller.id;
        }
        Body::KeyRotated(ledger::entry::KeyRotated { id, .. })
        | Body::PrincipalRevoked(ledger::entry::PrincipalRevoked { id, .. })
            if st
                .principal(id.as_str())
                .is_none_or(|p| p.role == Role::Patient) =>
        {
            return id.as_str() == caller.id;
        }
        // Other principals and dataset registrations are public within the broker.
        Body::PrincipalRegistered(_)
        | Body::KeyRotated(_)
        | Body::PrincipalRevoked(_)
        | Body::DatasetRegistered(_)
        | Body::CheckpointCosigned(_) => return true,
        Body::ConsentGranted(_) | Body::ConsentRevoked(_) => None,
    };
    study
        .and_then(|s| st.study(s))
        .is_some_and(|s| super::registry::may_see_study(caller, s))
}

#[tonic::async_trait]
impl Ledger for LedgerService {
    async fn checkpoint(
        &self,
        _req: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::CheckpointResponse>, Status> {
        let cp = self.0.blocking(|l| l.checkpoint()).await?;
        let parsed = ledger::note::open_checkpoint(self.0.ledger.verifier_key(), &cp, None)
            .map_err(|e| Error::internal("opening a checkpoint", e))?;
        Ok(Response::new(v1::CheckpointResponse {
            checkpoint: cp,
            tree_size: parsed.size,
            verifier_key: self.0.ledger.verifier_key().to_text(),
        }))
    }

    async fn get_entry(
        &self,
        req: Request<v1::GetEntryRequest>,
    ) -> Result<Response<v1::GetEntryResponse>, Status> {
        let caller = caller(&req)?;
        let index = req.into_inner().index;
        let leaf = self.0.ledger.leaf(index).map_err(Error::from)?;
        let signed = ledger::entry::SignedEntry::from_leaf(&leaf, false)
            .map_err(|e| Error::internal("decoding a stored entry", e))?;
        if !may_read(&self.0.ledger.state(), &caller, &signed.entry) {
            return Err(Error::forbidden(format!("entry {index} is not yours to read")).into());
        }
        Ok(Response::new(v1::GetEntryResponse { index, leaf }))
    }

    async fn inclusion_proof(
        &self,
        req: Request<v1::InclusionProofRequest>,
    ) -> Result<Response<v1::ProofResponse>, Status> {
        let r = req.into_inner();
        let size = if r.tree_size == 0 {
            self.0.ledger.size()
        } else {
            r.tree_size
        };
        let proof = self
            .0
            .ledger
            .inclusion_proof(r.index, Some(size))
            .map_err(Error::from)?;
        Ok(Response::new(v1::ProofResponse {
            tree_size: size,
            hashes: ledger::merkle::base64_hashes(&proof),
        }))
    }

    async fn consistency_proof(
        &self,
        req: Request<v1::ConsistencyProofRequest>,
    ) -> Result<Response<v1::ProofResponse>, Status> {
        let r = req.into_inner();
        if r.old_size == 0 {
            return Err(Error::invalid(
                "old_size must be at least 1: every tree extends the empty one, and RFC 9162 \
                 defines no proof from it",
            )
            .into());
        }
        let size = if r.new_size == 0 {
            self.0.ledger.size()
        } else {
            r.new_size
        };
        let proof = self
            .0
            .ledger
            .consistency_proof(r.old_size, Some(size))
            .map_err(Error::from)?;
        Ok(Response::new(v1::ProofResponse {
            tree_size: size,
            hashes: ledger::merkle::base64_hashes(&proof),
        }))
    }

    async fn bundle(
        &self,
        req: Request<v1::BundleRequest>,
    ) -> Result<Response<v1::BundleResponse>, Status> {
        let caller = caller(&req)?;
        let study = req.into_inner().study;
        {
            let st = self.0.ledger.state();
            let s = st.study(&study).ok_or_else(|| {
                Error::not_found(format!("unknown study {}", super::shown(&study)))
            })?;
            if !super::registry::may_see_study(&caller, s) {
                return Err(Error::forbidden(format!(
                    "bundles of study {study} go to its sponsor, members and IRB"
                ))
                .into());
            }
        }
        let bundle = self
            .0
            .blocking(move |l| ledger::bundle::make_bundle(l, &study, &[]))
            .await?;
        let bundle_json =
            serde_json::to_string(&bundle).map_err(|e| Error::internal("encoding a bundle", e))?;
        Ok(Response::new(v1::BundleResponse { bundle_json }))
    }
}
