//! State derived by replaying the log: principals, datasets, consents, studies, budgets and
//! receipts, with the queries the broker asks on its hot path.
//!
//! [`State::apply`] is the single place where the ledger's rules live: who may write what, and
//! what must already exist. It either applies an entry completely or refuses it and changes
//! nothing. The same function runs on append and on replay, so a log that was accepted once
//! replays to the same state.
//!
//! Modules: `consent` (consent filters and a subject's view), `rules` ([`State::apply`]).

use foldhash::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::budget::{Account, Spend};
use crate::duo::StudyUse;
use crate::entry::{ConsentBasis, DatasetRegistered, StudyApproved, StudyRegistered};
use crate::error::Error;
use crate::ids::{DatasetId, PrincipalId, Role, StudyId, SubjectId, Timestamp};
use crate::note::VerifierKey;

mod consent;
mod rules;

pub use consent::{Basis, Changes, ConsentFilter, ConsentView};
use consent::{CachedFilter, Grant, Objection};
pub use rules::checkpoint_of;

/// A registered principal.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Its id (its key's name).
    pub id: PrincipalId,
    /// Its role.
    pub role: Role,
    /// Its current key.
    pub key: VerifierKey,
    /// The entry that set the current key.
    pub key_since: u64,
    /// For patients: their privacy-unit id.
    pub subject: Option<SubjectId>,
    /// Display name.
    pub display_name: Option<String>,
    /// The entry that revoked it, if any.
    pub revoked_at: Option<u64>,
}

/// A registered dataset version.
#[derive(Debug, Clone)]
pub struct DatasetVersion {
    /// The registration entry's index.
    pub index: u64,
    /// The registration.
    pub reg: Arc<DatasetRegistered>,
}

/// A dataset and its versions, oldest first.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Its custodian.
    pub custodian: PrincipalId,
    /// Opt-in or opt-out (from the latest version).
    pub consent_basis: ConsentBasis,
    /// Every version, oldest first.
    pub versions: Vec<DatasetVersion>,
}

impl Dataset {
    /// The latest version.
    pub fn latest(&self) -> &DatasetVersion {
        self.versions
            .last()
            .expect("a dataset exists only with a version")
    }
}

/// Lifecycle of a study.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StudyStatus {
    /// Registered, not yet approved.
    Registered,
    /// Approved by an IRB (check the approval period too).
    Approved,
    /// Suspended by its IRB.
    Suspended,
    /// Closed for good.
    Closed,
}

/// A study with its approval.
#[derive(Debug, Clone)]
pub struct Study {
    /// The registration.
    pub reg: StudyRegistered,
    /// The registration entry's index.
    pub index: u64,
    /// Status.
    pub status: StudyStatus,
    /// The IRB that approved it, and the approval in force.
    pub approval: Option<(PrincipalId, StudyApproved)>,
}

impl Study {
    /// Whether principal `id` is a member of the study: its PI or one of its researchers
    /// (the one answer to "may this researcher query, or read, within this study").
    pub fn is_member(&self, id: &str) -> bool {
        self.reg.pi.as_str() == id || self.reg.researchers.iter().any(|r| r.as_str() == id)
    }

    /// Whether queries may run now: approved and within the approval period.
    pub fn active_at(&self, t: Timestamp) -> bool {
        self.status == StudyStatus::Approved
            && self
                .approval
                .as_ref()
                .is_some_and(|(_, a)| a.valid_from <= t && t < a.valid_until)
    }
    fn matcher(&self) -> StudyUse<'_> {
        StudyUse {
            purpose: &self.reg.purpose,
            commercial: self.reg.commercial,
            methods_development: self.reg.methods_development,
        }
    }
}

/// A released query receipt, kept for "who used my data".
#[derive(Debug, Clone)]
pub struct ReceiptRef {
    /// Entry index.
    pub index: u64,
    /// When it was written.
    pub time: Timestamp,
    /// The study.
    pub study: StudyId,
    /// The dataset.
    pub dataset: DatasetId,
}

/// The derived state. Cheap to query; changed only through [`State::apply`].
#[derive(Default)]
pub struct State {
    size: u64,
    ledger_key: Option<VerifierKey>,
    principals: HashMap<PrincipalId, Principal>,
    patient_subjects: HashSet<SubjectId>,
    datasets: HashMap<DatasetId, Dataset>,
    subjects: Vec<SubjectId>,
    subject_ids: HashMap<SubjectId, u32>,
    grants: Vec<Grant>,
    grant_by_id: HashMap<String, usize>,
    /// Indexed by interned subject number (dense, so a vector rather than a map).
    grants_by_subject: Vec<Vec<usize>>,
    grants_by_dataset: HashMap<DatasetId, Vec<usize>>,
    grants_by_custodian: HashMap<PrincipalId, Vec<usize>>,
    objections: Vec<Objection>,
    objections_by_subject: HashMap<u32, Vec<usize>>,
    /// Per dataset, the subject of every consent change touching it, in log order
    /// ([`consent::WHOLE`] for a change of no one subject): a cached filter that has seen the
    /// first n is updated for the rest.
    touched: HashMap<DatasetId, Vec<u32>>,
    studies: HashMap<StudyId, Study>,
    spent: HashMap<(StudyId, DatasetId), Spend>,
    receipts_by_study: HashMap<String, Vec<u64>>,
    /// Registration, approvals, suspensions and closure of each study (entry indexes).
    study_events: HashMap<StudyId, Vec<u64>>,
    /// Registration, key rotations and revocation of each principal (entry indexes).
    principal_events: HashMap<PrincipalId, Vec<u64>>,
    released: Vec<ReceiptRef>,
    /// Each study's first released extract of a dataset: the study's only extract of it (two
    /// different extracts of one cohort could be differenced row by row).
    extracts: HashMap<(StudyId, DatasetId), FirstExtract>,
    filter_cache: Mutex<HashMap<(DatasetId, StudyId), CachedFilter>>,
}

/// What the receipt of a study's first extract of a dataset recorded.
#[derive(Debug, Clone)]
pub struct FirstExtract {
    /// Its normalized SQL.
    pub sql: String,
    /// The dataset version it read.
    pub version: Option<u32>,
    /// What it recorded of the consent snapshot.
    pub consent_digest: Option<crate::ids::Digest>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

fn not_found(what: &'static str, id: impl ToString) -> Error {
    Error::NotFound {
        what,
        id: id.to_string(),
    }
}

impl State {
    /// Number of entries applied.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The ledger's own verifier key (the genesis operator's first key).
    pub fn ledger_key(&self) -> Option<&VerifierKey> {
        self.ledger_key.as_ref()
    }

    /// A principal by id.
    pub fn principal(&self, id: &str) -> Option<&Principal> {
        self.principals.get(id)
    }

    /// Every principal.
    pub fn principals(&self) -> impl Iterator<Item = &Principal> {
        self.principals.values()
    }

    /// May this principal act in this role now: registered, not revoked, with that role.
    pub fn may_act(&self, id: &str, role: Role) -> bool {
        self.principals
            .get(id)
            .is_some_and(|p| p.revoked_at.is_none() && p.role == role)
    }

    /// A dataset by id.
    pub fn dataset(&self, id: &str) -> Option<&Dataset> {
        self.datasets.get(id)
    }

    /// Every dataset.
    pub fn datasets(&self) -> impl Iterator<Item = (&DatasetId, &Dataset)> {
        self.datasets.iter()
    }

    /// A study by id.
    pub fn study(&self, id: &str) -> Option<&Study> {
        self.studies.get(id)
    }

    /// Every study.
    pub fn studies(&self) -> impl Iterator<Item = &Study> {
        self.studies.values()
    }

    /// What the charged receipts (released and failed) of `study` on `dataset` spent.
    pub fn spent(&self, study: &str, dataset: &str) -> Spend {
        let key = (StudyId::new(study), DatasetId::new(dataset));
        match key {
            (Ok(s), Ok(d)) => self.spent.get(&(s, d)).copied().unwrap_or_default(),
            _ => Spend::default(),
        }
    }

    /// The privacy account of (`study`, `dataset`): the approval's grant and what was spent
    /// (see [`crate::budget`] for what fits), or `None` if the study has no approval covering
    /// the dataset.
    pub fn account(&self, study: &str, dataset: &str) -> Option<Account> {
        let (_, approval) = self.studies.get(study)?.approval.as_ref()?;
        let grant = approval
            .grants
            .iter()
            .find(|g| g.dataset.as_str() == dataset)?;
        Some(Account {
            epsilon: grant.epsilon,
            delta: grant.delta,
            spent: self.spent(study, dataset),
        })
    }

    /// The SQL of the extract that `study` took of `dataset`, if it took one: any later
    /// extract of the dataset in the study must be that SQL again.
    pub fn extract_of(&self, study: &str, dataset: &str) -> Option<&str> {
        self.first_extract(study, dataset).map(|x| x.sql.as_str())
    }

    /// The receipt of the extract that `study` took of `dataset`, if it took one.
    pub fn first_extract(&self, study: &str, dataset: &str) -> Option<&FirstExtract> {
        let key = (StudyId::new(study).ok()?, DatasetId::new(dataset).ok()?);
        self.extracts.get(&key)
    }

    /// Entry indexes of every receipt (released or denied) naming `study`.
    pub fn receipts_of_study(&self, study: &str) -> &[u64] {
        self.receipts_by_study
            .get(study)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Entry indexes of a study's registration, approvals, suspensions and closure.
    pub fn study_events(&self, study: &str) -> &[u64] {
        self.study_events
            .get(study)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Entry indexes of a principal's registration, key rotations and revocation.
    pub fn principal_events(&self, id: &str) -> &[u64] {
        self.principal_events
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn subject_id(&self, s: &SubjectId) -> Option<u32> {
        self.subject_ids.get(s).copied()
    }

    fn intern(&mut self, s: SubjectId) -> u32 {
        if let Some(&i) = self.subject_ids.get(&s) {
            return i;
        }
        let i = u32::try_from(self.subjects.len()).expect("fewer than 4 billion subjects");
        self.subjects.push(s.clone());
        self.subject_ids.insert(s, i);
        i
    }
}
