//! Consent filters ("which subjects of dataset D permit study S at time T"), "who used my
//! data", and a subject's own view of their consents.

use std::sync::Arc;

use super::{Dataset, ReceiptRef, State, Study, not_found};
use crate::duo::{self, Modifier, Purpose};
use crate::entry::{ConsentBasis, ConsentScope};
use crate::error::Result;
use crate::ids::{DatasetId, Digest, PrincipalId, StudyId, SubjectId, Timestamp};

/// One consent grant as kept in memory.
#[derive(Debug, Clone)]
pub(super) struct Grant {
    pub(super) index: u64,
    pub(super) subject: u32,
    pub(super) consent_id: String,
    pub(super) scope: ConsentScope,
    pub(super) purposes: Vec<Purpose>,
    pub(super) modifiers: Vec<Modifier>,
    pub(super) allow: Vec<StudyId>,
    pub(super) deny: Vec<StudyId>,
    pub(super) valid_from: Timestamp,
    pub(super) valid_until: Option<Timestamp>,
    /// Revoked or replaced: by which entry. A revocation is in effect from its place in the
    /// log, whatever time it is dated (a date ahead of the ledger's clock must not delay it).
    pub(super) ended: Option<u64>,
}

/// An objection (scope-wide revocation) by a subject.
#[derive(Debug, Clone)]
pub(super) struct Objection {
    pub(super) index: u64,
    pub(super) subject: u32,
    pub(super) scope: ConsentScope,
}

/// Who may be included in a query on one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentFilter {
    /// Only these subjects (opt-in datasets). Sorted, no duplicates.
    Include(Arc<Vec<SubjectId>>),
    /// Everyone except these subjects (opt-out datasets). Sorted, no duplicates.
    Exclude(Arc<Vec<SubjectId>>),
}

impl ConsentFilter {
    /// The digest a receipt records for this snapshot: SHA-256 over
    /// `"include\n"` or `"exclude\n"` followed by each subject id and `"\n"`, in sorted order.
    pub fn digest(&self) -> Digest {
        use sha2::Digest as _;
        let (tag, ids) = match self {
            ConsentFilter::Include(ids) => ("include\n", ids),
            ConsentFilter::Exclude(ids) => ("exclude\n", ids),
        };
        let mut h = sha2::Sha256::new();
        h.update(tag.as_bytes());
        for id in ids.iter() {
            h.update(id.as_str().as_bytes());
            h.update(b"\n");
        }
        Digest::from_bytes(h.finalize().into())
    }
    /// Whether `subject` may be included.
    pub fn admits(&self, subject: &SubjectId) -> bool {
        match self {
            ConsentFilter::Include(ids) => ids.binary_search(subject).is_ok(),
            ConsentFilter::Exclude(ids) => ids.binary_search(subject).is_err(),
        }
    }
}

#[derive(Clone)]
pub(super) struct CachedFilter {
    generation: u64,
    from: Timestamp,
    until: Timestamp,
    filter: ConsentFilter,
}

/// A consent of one subject, as listed to them.
#[derive(Debug, Clone)]
pub struct ConsentView {
    /// The grant entry's index.
    pub index: u64,
    /// The consent id.
    pub consent_id: String,
    /// Whether it is in effect at the time asked.
    pub in_effect: bool,
    /// The entry that ended it (revocation or replacement), if any.
    pub ended_by: Option<u64>,
}

impl State {
    /// Whether one grant admits `study` at `t` (its scope is checked by the caller), counting
    /// only entries before `as_of`.
    fn grant_admits(g: &Grant, study: &Study, t: Timestamp, as_of: u64) -> bool {
        g.index < as_of
            && g.valid_from <= t
            && g.valid_until.is_none_or(|u| t < u)
            && g.ended.is_none_or(|i| i >= as_of)
            && (g.allow.is_empty() || g.allow.contains(&study.reg.study))
            && !g.deny.contains(&study.reg.study)
            && duo::permits(&g.purposes, &g.modifiers, study.matcher())
    }

    fn objected(
        &self,
        subject: u32,
        dataset: &DatasetId,
        custodian: &PrincipalId,
        as_of: u64,
    ) -> bool {
        self.objections_by_subject.get(&subject).is_some_and(|os| {
            os.iter().any(|&o| {
                let o = &self.objections[o];
                o.index < as_of && o.scope.covers(dataset, custodian)
            })
        })
    }

    /// The consent filter for `study` on `dataset` at time `t`: which subjects may be
    /// included. Fails closed: an unknown study or dataset is an error, never "everyone".
    pub fn consent_filter(
        &self,
        dataset: &str,
        study: &str,
        t: Timestamp,
    ) -> Result<ConsentFilter> {
        let ds = self
            .datasets
            .get(dataset)
            .ok_or_else(|| not_found("dataset", dataset))?;
        let st = self
            .studies
            .get(study)
            .ok_or_else(|| not_found("study", study))?;
        let dataset_id = DatasetId::new(dataset)?;
        let key = (dataset_id.clone(), st.reg.study.clone());
        let generation = self.generation.get(&dataset_id).copied().unwrap_or(0);
        {
            let cache = self
                .filter_cache
                .lock()
                .expect("filter cache lock is never poisoned by a panic-free section");
            if let Some(c) = cache.get(&key)
                && c.generation == generation
                && c.from <= t
                && t < c.until
            {
                return Ok(c.filter.clone());
            }
        }
        let (filter, until) = self.compute_filter(ds, st, &dataset_id, t);
        let mut cache = self
            .filter_cache
            .lock()
            .expect("filter cache lock is never poisoned by a panic-free section");
        cache.insert(
            key,
            CachedFilter {
                generation,
                from: t,
                until,
                filter: filter.clone(),
            },
        );
        Ok(filter)
    }

    /// Computes a filter and the first instant after `t` at which it may change.
    fn compute_filter(
        &self,
        ds: &Dataset,
        st: &Study,
        dataset: &DatasetId,
        t: Timestamp,
    ) -> (ConsentFilter, Timestamp) {
        let as_of = u64::MAX;
        let mut until = Timestamp::from_unix(253_402_300_799).expect("max timestamp is valid");
        let mut note = |x: Timestamp| {
            if x > t && x < until {
                until = x;
            }
        };
        let mut ids: Vec<u32> = Vec::new();
        match ds.consent_basis {
            ConsentBasis::OptIn => {
                let by_ds = self
                    .grants_by_dataset
                    .get(dataset)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                let by_cust = self
                    .grants_by_custodian
                    .get(&ds.custodian)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                for &gi in by_ds.iter().chain(by_cust) {
                    let g = &self.grants[gi];
                    note(g.valid_from);
                    if let Some(u) = g.valid_until {
                        note(u);
                    }
                    if self.grant_admits_scoped(g, st, dataset, &ds.custodian, t, as_of)
                        && !self.objected(g.subject, dataset, &ds.custodian, as_of)
                    {
                        ids.push(g.subject);
                    }
                }
            }
            ConsentBasis::OptOut => {
                for o in &self.objections {
                    if o.scope.covers(dataset, &ds.custodian) {
                        ids.push(o.subject);
                    }
                }
            }
        }
        let mut subjects: Vec<SubjectId> = ids
            .iter()
            .map(|&i| self.subjects[i as usize].clone())
            .collect();
        subjects.sort_unstable();
        subjects.dedup();
        let subjects = Arc::new(subjects);
        let filter = match ds.consent_basis {
            ConsentBasis::OptIn => ConsentFilter::Include(subjects),
            ConsentBasis::OptOut => ConsentFilter::Exclude(subjects),
        };
        (filter, until)
    }

    fn grant_admits_scoped(
        &self,
        g: &Grant,
        st: &Study,
        dataset: &DatasetId,
        custodian: &PrincipalId,
        t: Timestamp,
        as_of: u64,
    ) -> bool {
        g.scope.covers(dataset, custodian) && Self::grant_admits(g, st, t, as_of)
    }
}

impl State {
    /// Whether `subject`'s consent admitted `study` on `dataset` at `t`, counting only entries
    /// before `as_of` (for a receipt: its own index). For opt-out datasets this means "had not
    /// objected".
    pub fn subject_admitted(
        &self,
        subject: &SubjectId,
        dataset: &str,
        study: &str,
        t: Timestamp,
        as_of: u64,
    ) -> bool {
        let (Some(ds), Some(st)) = (self.datasets.get(dataset), self.studies.get(study)) else {
            return false;
        };
        let Ok(dataset_id) = DatasetId::new(dataset) else {
            return false;
        };
        let Some(sid) = self.subject_id(subject) else {
            return ds.consent_basis == ConsentBasis::OptOut;
        };
        if self.objected(sid, &dataset_id, &ds.custodian, as_of) {
            return false;
        }
        match ds.consent_basis {
            ConsentBasis::OptOut => true,
            ConsentBasis::OptIn => self.grants_by_subject.get(sid as usize).is_some_and(|gs| {
                gs.iter().any(|&gi| {
                    self.grant_admits_scoped(
                        &self.grants[gi],
                        st,
                        &dataset_id,
                        &ds.custodian,
                        t,
                        as_of,
                    )
                })
            }),
        }
    }

    /// Released receipts whose consent snapshot included `subject` ("who used my data").
    pub fn receipts_including(&self, subject: &SubjectId) -> Vec<ReceiptRef> {
        self.released
            .iter()
            .filter(|r| {
                self.subject_admitted(
                    subject,
                    r.dataset.as_str(),
                    r.study.as_str(),
                    r.time,
                    r.index,
                )
            })
            .cloned()
            .collect()
    }

    /// A subject's consents (grants), with whether each is in effect at `t`.
    pub fn consents_of(&self, subject: &SubjectId, t: Timestamp) -> Vec<ConsentView> {
        let Some(sid) = self.subject_id(subject) else {
            return Vec::new();
        };
        let gs = self
            .grants_by_subject
            .get(sid as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        gs.iter()
            .map(|&gi| {
                let g = &self.grants[gi];
                let in_effect =
                    g.valid_from <= t && g.valid_until.is_none_or(|u| t < u) && g.ended.is_none();
                ConsentView {
                    index: g.index,
                    consent_id: g.consent_id.clone(),
                    in_effect,
                    ended_by: g.ended,
                }
            })
            .collect()
    }
}
