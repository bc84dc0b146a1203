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

/// How a consent snapshot's subject list reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Only the listed subjects are included (opt-in datasets).
    Include,
    /// Everyone but the listed subjects is included (opt-out datasets).
    Exclude,
}

/// What changed from an earlier snapshot of the same dataset, study and basis: consumers
/// that keep something derived from a snapshot (the anonymizer's bitmap of units) update it
/// instead of rebuilding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The digest of the snapshot these changes apply to.
    pub from: Digest,
    /// Ids that joined the list. Sorted.
    pub added: Vec<SubjectId>,
    /// Ids that left the list. Sorted.
    pub removed: Vec<SubjectId>,
}

/// Who may be included in a query on one dataset: one snapshot of the ledger's consents, made
/// once per change and shared from the ledger to the engine (a clone is a reference count).
/// Its digest, the one a receipt records, is computed once, here, by the one formula
/// ([`ConsentFilter::digest`]).
#[derive(Debug, Clone)]
pub struct ConsentFilter(Arc<Snapshot>);

#[derive(Debug)]
struct Snapshot {
    basis: Basis,
    ids: Vec<SubjectId>,
    digest: Digest,
    changes: Option<Changes>,
}

impl PartialEq for ConsentFilter {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.digest == other.0.digest
    }
}
impl Eq for ConsentFilter {}

impl ConsentFilter {
    /// The snapshot of `ids` (sorted and deduplicated here) read by `basis`.
    pub fn new(basis: Basis, mut ids: Vec<SubjectId>) -> ConsentFilter {
        ids.sort_unstable();
        ids.dedup();
        Self::sorted(basis, ids, None)
    }

    fn sorted(basis: Basis, ids: Vec<SubjectId>, changes: Option<Changes>) -> ConsentFilter {
        let digest = Self::digest_of(basis, &ids);
        ConsentFilter(Arc::new(Snapshot {
            basis,
            ids,
            digest,
            changes,
        }))
    }

    /// Only `ids`.
    pub fn include(ids: Vec<SubjectId>) -> ConsentFilter {
        Self::new(Basis::Include, ids)
    }

    /// Everyone but `ids`.
    pub fn exclude(ids: Vec<SubjectId>) -> ConsentFilter {
        Self::new(Basis::Exclude, ids)
    }

    /// Everyone (an opt-out dataset nobody objected to).
    pub fn everyone() -> ConsentFilter {
        Self::new(Basis::Exclude, Vec::new())
    }

    /// How the list reads.
    pub fn basis(&self) -> Basis {
        self.0.basis
    }

    /// The listed subjects, sorted, without duplicates.
    pub fn ids(&self) -> &[SubjectId] {
        &self.0.ids
    }

    /// What changed from the snapshot this one was updated from, if it was.
    pub fn changes(&self) -> Option<&Changes> {
        self.0.changes.as_ref()
    }

    /// The snapshot's digest: SHA-256 over `"include\n"` or `"exclude\n"` followed by each
    /// subject id and `"\n"`, in sorted order. It keys caches and repeats; a receipt records a
    /// keyed commitment to it (the broker's `consent_commitment`), never the digest itself,
    /// which anyone who guesses ids could test.
    pub fn digest(&self) -> Digest {
        self.0.digest.clone()
    }

    fn digest_of(basis: Basis, ids: &[SubjectId]) -> Digest {
        use sha2::Digest as _;
        let tag = match basis {
            Basis::Include => "include\n",
            Basis::Exclude => "exclude\n",
        };
        let mut h = sha2::Sha256::new();
        h.update(tag.as_bytes());
        for id in ids {
            h.update(id.as_str().as_bytes());
            h.update(b"\n");
        }
        Digest::from_bytes(h.finalize().into())
    }

    /// Whether `subject` may be included.
    pub fn admits(&self, subject: &SubjectId) -> bool {
        let listed = self.0.ids.binary_search(subject).is_ok();
        match self.0.basis {
            Basis::Include => listed,
            Basis::Exclude => !listed,
        }
    }

    /// This snapshot with each of `subjects` in or out of the list as its flag says (the
    /// first flag of an id counts): one pass over the list, and the changes recorded for
    /// consumers.
    pub fn updated(&self, subjects: &[(SubjectId, bool)]) -> ConsentFilter {
        let mut subjects = subjects.to_vec();
        subjects.sort_by(|a, b| a.0.cmp(&b.0));
        subjects.dedup_by(|b, a| a.0 == b.0);
        let old = &self.0.ids;
        let mut ids = Vec::with_capacity(old.len() + subjects.len());
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let mut i = 0;
        for (s, listed) in &subjects {
            let at = i + old[i..].partition_point(|x| x < s);
            ids.extend_from_slice(&old[i..at]);
            let was = old.get(at) == Some(s);
            i = if was { at + 1 } else { at };
            if *listed {
                ids.push(s.clone());
            }
            match (was, *listed) {
                (false, true) => added.push(s.clone()),
                (true, false) => removed.push(s.clone()),
                _ => {}
            }
        }
        ids.extend_from_slice(&old[i..]);
        if added.is_empty() && removed.is_empty() {
            return self.clone();
        }
        Self::sorted(
            self.0.basis,
            ids,
            Some(Changes {
                from: self.0.digest.clone(),
                added,
                removed,
            }),
        )
    }
}

/// A consent change that touches no one subject (a dataset version registered): the next
/// filter of the dataset is computed whole.
pub(super) const WHOLE: u32 = u32::MAX;

/// Up to how many consent changes since a cached filter it is updated rather than computed
/// again (past it one pass over the dataset's grants is as cheap).
const INCREMENTAL_MAX: usize = 4096;

#[derive(Clone)]
pub(super) struct CachedFilter {
    /// How many consent changes of the dataset it has seen ([`State::touched`]).
    seen: usize,
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
        let touched = self
            .touched
            .get(&dataset_id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let cached = self
            .filter_cache
            .lock()
            .expect("filter cache lock is never poisoned by a panic-free section")
            .get(&key)
            .filter(|c| c.from <= t && t < c.until)
            .cloned();
        let (filter, from, until) = match cached {
            Some(c) if c.seen == touched.len() => return Ok(c.filter),
            // A few subjects changed since: only they are looked at again (the others'
            // standing holds until the cached window ends).
            Some(c)
                if !touched[c.seen..].contains(&WHOLE)
                    && touched.len() - c.seen <= INCREMENTAL_MAX =>
            {
                let (filter, until) = self.update_filter(ds, st, &dataset_id, t, &c, touched);
                (filter, t, until)
            }
            _ => {
                let (filter, until) = self.compute_filter(ds, st, &dataset_id, t);
                (filter, t, until)
            }
        };
        self.filter_cache
            .lock()
            .expect("filter cache lock is never poisoned by a panic-free section")
            .insert(
                key,
                CachedFilter {
                    seen: touched.len(),
                    from,
                    until,
                    filter: filter.clone(),
                },
            );
        Ok(filter)
    }

    /// A cached filter brought up to date with the subjects touched since it was made: each
    /// one's standing at `t` recomputed from its own grants and objections. Returns it and
    /// the first instant after `t` at which it may change.
    fn update_filter(
        &self,
        ds: &Dataset,
        st: &Study,
        dataset: &DatasetId,
        t: Timestamp,
        cached: &CachedFilter,
        touched: &[u32],
    ) -> (ConsentFilter, Timestamp) {
        let mut until = cached.until;
        let mut subjects: Vec<u32> = touched[cached.seen..].to_vec();
        subjects.sort_unstable();
        subjects.dedup();
        let standing: Vec<(SubjectId, bool)> = subjects
            .into_iter()
            .map(|sid| {
                // The subject's grants' time boundaries bound the window of an opt-in update
                // (an opt-out list depends on objections only).
                let grants = match ds.consent_basis {
                    ConsentBasis::OptIn => self.grants_by_subject.get(sid as usize),
                    ConsentBasis::OptOut => None,
                };
                for &gi in grants.into_iter().flatten() {
                    let g = &self.grants[gi];
                    if g.scope.covers(dataset, &ds.custodian) {
                        for x in std::iter::once(g.valid_from).chain(g.valid_until) {
                            if x > t && x < until {
                                until = x;
                            }
                        }
                    }
                }
                let admitted = self.admitted(sid, ds, st, dataset, t, u64::MAX);
                // Opt-in lists the admitted, opt-out the objectors (the not admitted).
                let listed = admitted == (ds.consent_basis == ConsentBasis::OptIn);
                (self.subjects[sid as usize].clone(), listed)
            })
            .collect();
        (cached.filter.updated(&standing), until)
    }

    /// Whether subject `sid`'s consents admit `st` on `dataset` at `t`, counting only entries
    /// before `as_of`: not objected, and for an opt-in dataset a grant covering it admits the
    /// study. The one per-subject rule: [`State::subject_admitted`] and filter updates use it.
    fn admitted(
        &self,
        sid: u32,
        ds: &Dataset,
        st: &Study,
        dataset: &DatasetId,
        t: Timestamp,
        as_of: u64,
    ) -> bool {
        if self.objected(sid, dataset, &ds.custodian, as_of) {
            return false;
        }
        match ds.consent_basis {
            ConsentBasis::OptOut => true,
            ConsentBasis::OptIn => self.grants_by_subject.get(sid as usize).is_some_and(|gs| {
                gs.iter().any(|&gi| {
                    self.grant_admits_scoped(&self.grants[gi], st, dataset, &ds.custodian, t, as_of)
                })
            }),
        }
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
        ids.sort_unstable();
        ids.dedup();
        let subjects: Vec<SubjectId> = ids
            .iter()
            .map(|&i| self.subjects[i as usize].clone())
            .collect();
        let basis = match ds.consent_basis {
            ConsentBasis::OptIn => Basis::Include,
            ConsentBasis::OptOut => Basis::Exclude,
        };
        (ConsentFilter::new(basis, subjects), until)
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
        self.admitted(sid, ds, st, &dataset_id, t, as_of)
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
