//! The ledger's rules: who may write which entry, and what must already exist.

use foldhash::HashSet;
use std::sync::Arc;

use super::consent::{Grant, Objection, WHOLE};
use super::{
    Dataset, DatasetVersion, Principal, ReceiptRef, State, Study, StudyStatus, invalid, not_found,
};
use crate::budget::Spend;
use crate::duo::Modifier;
use crate::entry::{
    Body, ConsentGranted, ConsentRevoked, ConsentScope, DatasetRegistered, Entry, Outcome,
    QueryMode, QueryReceipt, SignedEntry, StudyApproved, StudyRegistered,
};
use crate::error::{Error, Result};
use crate::ids::{DatasetId, PrincipalId, Role, StudyId, SubjectId, Timestamp};
use crate::merkle::Hash;
use crate::note::{Checkpoint, VerifierKey};

/// Roles allowed to write each kind, for error messages.
fn need(role: Role, allowed: &[Role], author: &PrincipalId, kind: &'static str) -> Result<()> {
    if allowed.contains(&role) {
        return Ok(());
    }
    let needed = match allowed {
        [Role::Operator] => "operator",
        [Role::Custodian] => "custodian",
        [Role::Irb] => "irb",
        [Role::Witness] => "witness",
        [Role::Patient, Role::Custodian] => "the patient or a custodian",
        [Role::Researcher, Role::Sponsor] => "the principal investigator or the sponsor",
        _ => "another role",
    };
    Err(Error::WrongRole {
        author: author.to_string(),
        role,
        kind,
        needed,
    })
}

fn check_text(what: &str, s: &str, max: usize) -> Result<()> {
    if s.trim().is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} must be 1 to {max} bytes of printable text"
        )));
    }
    Ok(())
}

/// Canonical JSON numbers are IEEE doubles: integers beyond 2^53 would not read back the
/// same, so they are refused when written.
fn check_count(n: u64, what: &str) -> Result<()> {
    if n > (1 << 53) {
        return Err(invalid(format!("{what} must be at most 2^53")));
    }
    Ok(())
}

fn check_budget(x: f64, what: &str, below_one: bool) -> Result<()> {
    if !x.is_finite() || x < 0.0 || (below_one && x >= 1.0) {
        let range = if below_one {
            "in [0, 1)"
        } else {
            "finite and >= 0"
        };
        return Err(invalid(format!("{what} must be {range}")));
    }
    Ok(())
}

impl State {
    /// The key that must have signed `entry` (its author's current key; for the genesis
    /// entry, the key it registers) and the index of the entry that set that key, which
    /// [`State::apply`] re-checks so a key rotated in between is caught. The signature itself
    /// is checked by the caller, outside any lock.
    pub fn signing_key(&self, entry: &Entry) -> Result<(VerifierKey, u64)> {
        let author = &entry.author;
        if self.size == 0 {
            // Genesis: the operator registers itself with the key that signs.
            return match &entry.body {
                Body::PrincipalRegistered(p) if p.id == *author && p.role == Role::Operator => {
                    Ok((VerifierKey::parse(&p.key)?, 0))
                }
                _ => Err(invalid(
                    "the first entry must register the operator, signed by its own key",
                )),
            };
        }
        let p = self
            .principals
            .get(author)
            .ok_or_else(|| Error::UnknownPrincipal(author.to_string()))?;
        if p.revoked_at.is_some() {
            return Err(Error::RevokedPrincipal(author.to_string()));
        }
        Ok((p.key.clone(), p.key_since))
    }

    /// Checks a signature against the author's current key; returns the entry index of that
    /// key (see [`State::signing_key`]).
    pub fn verify_signature(&self, signed: &SignedEntry, canonical: &[u8]) -> Result<u64> {
        let (key, since) = self.signing_key(&signed.entry)?;
        if !key.verify_raw(canonical, &signed.sig) {
            return Err(Error::BadSignature {
                author: signed.entry.author.to_string(),
            });
        }
        Ok(since)
    }

    /// Applies the entry at `index`, or refuses it and changes nothing. `key_since` is what
    /// [`State::signing_key`] returned; `root_at` gives the tree root at a size (for
    /// witness cosignatures).
    pub fn apply(
        &mut self,
        entry: Entry,
        index: u64,
        key_since: u64,
        root_at: &dyn Fn(u64) -> Option<Hash>,
    ) -> Result<()> {
        if index != self.size {
            return Err(invalid(format!(
                "entry index {index} applied at size {}",
                self.size
            )));
        }
        let Entry { author, time, body } = entry;
        let kind = body.kind();
        let author = &author;
        let role = if index == 0 {
            Role::Operator
        } else {
            let p = self
                .principals
                .get(author)
                .ok_or_else(|| Error::UnknownPrincipal(author.to_string()))?;
            if p.revoked_at.is_some() {
                return Err(Error::RevokedPrincipal(author.to_string()));
            }
            if p.key_since != key_since {
                return Err(Error::BadSignature {
                    author: author.to_string(),
                });
            }
            p.role
        };
        // Index the entry under the principal or study it concerns (for bundles).
        let principal = match &body {
            Body::PrincipalRegistered(b) => Some(b.id.clone()),
            Body::KeyRotated(b) => Some(b.id.clone()),
            Body::PrincipalRevoked(b) => Some(b.id.clone()),
            _ => None,
        };
        let study = match &body {
            Body::StudyRegistered(b) => Some(b.study.clone()),
            Body::StudyApproved(b) => Some(b.study.clone()),
            Body::StudySuspended(b) | Body::StudyClosed(b) => Some(b.study.clone()),
            _ => None,
        };
        // A consent, by far the most frequent entry, is moved into the state; the rest is
        // cloned from the entry.
        match body {
            Body::ConsentGranted(b) => {
                need(role, &[Role::Patient, Role::Custodian], author, kind)?;
                self.grant(b, author, role, index)?;
            }
            ref body => self.apply_other(body, author, role, index, time, root_at)?,
        }
        if let Some(id) = principal {
            self.principal_events.entry(id).or_default().push(index);
        }
        if let Some(id) = study {
            self.study_events.entry(id).or_default().push(index);
        }
        self.size += 1;
        Ok(())
    }

    /// Applies a consent (checked, then moved into the state).
    fn grant(
        &mut self,
        b: ConsentGranted,
        author: &PrincipalId,
        role: Role,
        index: u64,
    ) -> Result<()> {
        self.check_consent_author(author, role, &b.grantor, &b.subject, &b.scope)?;
        self.check_grant(&b)?;
        let replaced = match &b.replaces {
            Some(old) => Some(self.live_grant_of(old, &b.subject)?),
            None => None,
        };
        let subject = self.intern(b.subject);
        if let Some(gi) = replaced {
            self.grants[gi].ended = Some(index);
            let scope = self.grants[gi].scope.clone();
            let old = self.grants[gi].subject;
            self.bump(&scope, old);
        }
        let gi = self.grants.len();
        self.grant_by_id.insert(b.consent_id.clone(), gi);
        let slot = subject as usize;
        if self.grants_by_subject.len() <= slot {
            self.grants_by_subject.resize_with(slot + 1, Vec::new);
        }
        self.grants_by_subject[slot].push(gi);
        for d in &b.scope.datasets {
            match self.grants_by_dataset.get_mut(d) {
                Some(v) => v.push(gi),
                None => {
                    self.grants_by_dataset.insert(d.clone(), vec![gi]);
                }
            }
        }
        if let Some(c) = &b.scope.custodian {
            self.grants_by_custodian
                .entry(c.clone())
                .or_default()
                .push(gi);
        }
        self.bump(&b.scope, subject);
        self.grants.push(Grant {
            index,
            subject,
            consent_id: b.consent_id,
            scope: b.scope,
            purposes: b.purposes,
            modifiers: b.modifiers,
            allow: b.studies_allow,
            deny: b.studies_deny,
            valid_from: b.valid_from,
            valid_until: b.valid_until,
            ended: None,
        });
        Ok(())
    }

    /// Applies every kind but a consent (see [`State::grant`]).
    fn apply_other(
        &mut self,
        body: &Body,
        author: &PrincipalId,
        role: Role,
        index: u64,
        time: Timestamp,
        root_at: &dyn Fn(u64) -> Option<Hash>,
    ) -> Result<()> {
        let kind = body.kind();
        match body {
            Body::PrincipalRegistered(b) => {
                if index > 0 {
                    need(role, &[Role::Operator], author, kind)?;
                }
                let key = VerifierKey::parse(&b.key)?;
                if key.name() != b.id.as_str() {
                    return Err(invalid("a principal's id must equal its key's name"));
                }
                if self.principals.contains_key(&b.id) {
                    return Err(invalid(format!("principal {} already exists", b.id)));
                }
                match (&b.subject, b.role) {
                    (None, Role::Patient) => return Err(invalid("a patient needs a subject")),
                    (Some(_), r) if r != Role::Patient => {
                        return Err(invalid("only patients have a subject"));
                    }
                    (Some(s), _) if self.patient_subjects.contains(s) => {
                        return Err(invalid("another patient already holds this subject"));
                    }
                    _ => {}
                }
                if let Some(name) = &b.display_name {
                    check_text("display_name", name, 200)?;
                }
                if index == 0 {
                    self.ledger_key = Some(key.clone());
                }
                if let Some(s) = &b.subject {
                    self.patient_subjects.insert(s.clone());
                }
                self.principals.insert(
                    b.id.clone(),
                    Principal {
                        id: b.id.clone(),
                        role: b.role,
                        key,
                        key_since: index,
                        subject: b.subject.clone(),
                        display_name: b.display_name.clone(),
                        revoked_at: None,
                    },
                );
            }
            Body::KeyRotated(b) => {
                if b.id != *author {
                    need(role, &[Role::Operator], author, kind)?;
                }
                let key = VerifierKey::parse(&b.key)?;
                if key.name() != b.id.as_str() {
                    return Err(invalid("the new key must keep the principal's name"));
                }
                let p = self
                    .principals
                    .get_mut(&b.id)
                    .ok_or_else(|| not_found("principal", &b.id))?;
                if p.revoked_at.is_some() {
                    return Err(Error::RevokedPrincipal(b.id.to_string()));
                }
                if p.key == key {
                    return Err(invalid("the new key equals the current key"));
                }
                p.key = key;
                p.key_since = index;
            }
            Body::PrincipalRevoked(b) => {
                if b.id != *author {
                    need(role, &[Role::Operator], author, kind)?;
                }
                if let Some(r) = &b.reason {
                    check_text("reason", r, 1000)?;
                }
                if Some(
                    &self
                        .principals
                        .get(&b.id)
                        .ok_or_else(|| not_found("principal", &b.id))?
                        .key,
                ) == self.ledger_key.as_ref()
                {
                    return Err(invalid("the ledger's own operator key cannot be revoked"));
                }
                let p = self.principals.get_mut(&b.id).expect("checked above");
                if p.revoked_at.is_some() {
                    return Err(Error::RevokedPrincipal(b.id.to_string()));
                }
                p.revoked_at = Some(index);
            }
            Body::DatasetRegistered(b) => {
                need(role, &[Role::Custodian], author, kind)?;
                self.check_dataset(author, b)?;
                let version = DatasetVersion {
                    index,
                    reg: Arc::new(b.clone()),
                };
                match self.datasets.get_mut(&b.dataset) {
                    Some(ds) => {
                        ds.consent_basis = b.consent_basis;
                        ds.versions.push(version);
                    }
                    None => {
                        self.datasets.insert(
                            b.dataset.clone(),
                            Dataset {
                                custodian: b.custodian.clone(),
                                consent_basis: b.consent_basis,
                                versions: vec![version],
                            },
                        );
                    }
                }
                self.bump(
                    &ConsentScope {
                        datasets: vec![b.dataset.clone()],
                        custodian: None,
                    },
                    WHOLE,
                );
            }
            Body::ConsentGranted(_) => unreachable!("applied by State::grant"),
            Body::ConsentRevoked(b) => {
                need(role, &[Role::Patient, Role::Custodian], author, kind)?;
                self.check_revocation(author, role, b)?;
                match (&b.consent_id, &b.scope) {
                    (Some(id), None) => {
                        let gi = self.live_grant_of(id, &b.subject)?;
                        self.grants[gi].ended = Some(index);
                        let scope = self.grants[gi].scope.clone();
                        let subject = self.grants[gi].subject;
                        self.bump(&scope, subject);
                    }
                    (None, Some(scope)) => {
                        let subject = self.intern(b.subject.clone());
                        let oi = self.objections.len();
                        self.objections.push(Objection {
                            index,
                            subject,
                            scope: scope.clone(),
                        });
                        self.objections_by_subject
                            .entry(subject)
                            .or_default()
                            .push(oi);
                        self.bump(scope, subject);
                    }
                    _ => unreachable!("checked by check_revocation"),
                }
            }
            Body::StudyRegistered(b) => {
                need(role, &[Role::Researcher, Role::Sponsor], author, kind)?;
                self.check_study(author, role, b)?;
                self.studies.insert(
                    b.study.clone(),
                    Study {
                        reg: b.clone(),
                        index,
                        status: StudyStatus::Registered,
                        approval: None,
                    },
                );
            }
            Body::StudyApproved(b) => {
                need(role, &[Role::Irb], author, kind)?;
                self.check_approval(author, b)?;
                let st = self
                    .studies
                    .get_mut(&b.study)
                    .expect("checked by check_approval");
                st.status = StudyStatus::Approved;
                st.approval = Some((author.clone(), b.clone()));
            }
            Body::StudySuspended(b) | Body::StudyClosed(b) => {
                need(role, &[Role::Irb], author, kind)?;
                check_text("reason", &b.reason, 1000)?;
                let st = self.study_for_irb(author, &b.study)?;
                let suspend = matches!(body, Body::StudySuspended(_));
                if suspend && st.status != StudyStatus::Approved {
                    return Err(invalid(format!("study {} is not approved", b.study)));
                }
                let st = self.studies.get_mut(&b.study).expect("checked above");
                st.status = if suspend {
                    StudyStatus::Suspended
                } else {
                    StudyStatus::Closed
                };
            }
            Body::QueryReceipt(b) => {
                need(role, &[Role::Operator], author, kind)?;
                let debit = self.check_receipt(b, time)?;
                match self.receipts_by_study.get_mut(&b.study) {
                    Some(v) => v.push(index),
                    None => {
                        self.receipts_by_study.insert(b.study.clone(), vec![index]);
                    }
                }
                if let Some((study, dataset, cost)) = debit {
                    let key = (study, dataset);
                    if b.mode == QueryMode::Extract && b.outcome == Outcome::Released {
                        self.extracts
                            .entry(key.clone())
                            .or_insert_with(|| b.sql.clone());
                    }
                    let spent = self.spent.entry(key.clone()).or_default();
                    *spent = spent.plus(&cost);
                    let (study, dataset) = key;
                    self.released.push(ReceiptRef {
                        index,
                        time,
                        study,
                        dataset,
                    });
                }
            }
            Body::CheckpointCosigned(b) => {
                need(role, &[Role::Witness], author, kind)?;
                let ledger_key = self
                    .ledger_key
                    .as_ref()
                    .ok_or_else(|| invalid("no ledger key"))?;
                let witness = &self
                    .principals
                    .get(author)
                    .expect("author checked above")
                    .key;
                let cp = crate::note::open_checkpoint(ledger_key, &b.checkpoint, None)?;
                witness.verify_note(&b.checkpoint)?;
                if root_at(cp.size) != Some(cp.root) {
                    return Err(invalid(
                        "the cosigned checkpoint does not match this ledger's tree",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Records a consent change of `subject` (or [`WHOLE`]) on every dataset the scope covers:
    /// cached filters of those datasets are updated for it.
    fn bump(&mut self, scope: &ConsentScope, subject: u32) {
        for d in &scope.datasets {
            match self.touched.get_mut(d) {
                Some(v) => v.push(subject),
                None => {
                    self.touched.insert(d.clone(), vec![subject]);
                }
            }
        }
        if let Some(c) = &scope.custodian {
            for (id, ds) in &self.datasets {
                if &ds.custodian == c {
                    self.touched.entry(id.clone()).or_default().push(subject);
                }
            }
        }
    }

    fn check_dataset(&self, author: &PrincipalId, b: &DatasetRegistered) -> Result<()> {
        for t in &b.tables {
            check_count(t.rows, "rows")?;
            for f in &t.files {
                check_count(f.rows, "rows")?;
                check_count(f.bytes, "bytes")?;
            }
        }
        if b.custodian != *author {
            return Err(Error::Forbidden(
                "a custodian registers only its own datasets".into(),
            ));
        }
        if let Some(ds) = self.datasets.get(&b.dataset) {
            if ds.custodian != b.custodian {
                return Err(Error::Forbidden(format!(
                    "dataset {} belongs to another custodian",
                    b.dataset
                )));
            }
            if ds.versions.iter().any(|v| v.reg.version == b.version) {
                return Err(Error::AlreadyExists(format!(
                    "version {} of dataset {} is registered",
                    b.version, b.dataset
                )));
            }
            if b.version <= ds.latest().reg.version {
                return Err(invalid(format!(
                    "version {} of dataset {} must be greater than {}",
                    b.version,
                    b.dataset,
                    ds.latest().reg.version
                )));
            }
        }
        check_text("privacy_unit", &b.privacy_unit, 128)?;
        if b.tables.is_empty() {
            return Err(invalid("a dataset version needs at least one table"));
        }
        let mut names = HashSet::default();
        for t in &b.tables {
            check_text("table name", &t.name, 128)?;
            if !names.insert(t.name.as_str()) {
                return Err(invalid(format!("table {} listed twice", t.name)));
            }
            if !t.columns.iter().any(|c| c.name == b.privacy_unit) {
                return Err(invalid(format!(
                    "table {} has no privacy-unit column {}",
                    t.name, b.privacy_unit
                )));
            }
            if t.files.iter().map(|f| f.rows).sum::<u64>() != t.rows {
                return Err(invalid(format!(
                    "table {}: file row counts do not add up to rows",
                    t.name
                )));
            }
            for f in &t.files {
                check_text("file path", &f.path, 1024)?;
            }
        }
        if DatasetRegistered::compute_digest(&b.tables) != b.digest {
            return Err(invalid("digest does not match the tables' manifests"));
        }
        Ok(())
    }

    fn check_consent_author(
        &self,
        author: &PrincipalId,
        role: Role,
        grantor: &PrincipalId,
        subject: &SubjectId,
        scope: &ConsentScope,
    ) -> Result<()> {
        if grantor != author {
            return Err(invalid("grantor must be the entry's author"));
        }
        if scope.datasets.is_empty() && scope.custodian.is_none() {
            return Err(invalid("a consent scope names datasets or a custodian"));
        }
        for d in &scope.datasets {
            let ds = self
                .datasets
                .get(d)
                .ok_or_else(|| not_found("dataset", d))?;
            if role == Role::Custodian && ds.custodian != *author {
                return Err(Error::Forbidden(format!(
                    "dataset {d} belongs to another custodian"
                )));
            }
        }
        if let Some(c) = &scope.custodian {
            if !self.may_act(c.as_str(), Role::Custodian) {
                return Err(not_found("custodian", c));
            }
            if role == Role::Custodian && c != author {
                return Err(Error::Forbidden(
                    "a custodian records consents only for its own datasets".into(),
                ));
            }
        }
        if role == Role::Patient {
            let p = self.principals.get(author).expect("author exists");
            if p.subject.as_ref() != Some(subject) {
                return Err(Error::Forbidden(
                    "a patient manages only their own consent".into(),
                ));
            }
        }
        Ok(())
    }

    fn check_grant(&self, b: &ConsentGranted) -> Result<()> {
        check_text("consent_id", &b.consent_id, 128)?;
        check_list("purposes", b.purposes.len(), MAX_PURPOSES)?;
        check_list("modifiers", b.modifiers.len(), MAX_PURPOSES)?;
        check_list("studies_allow", b.studies_allow.len(), MAX_STUDIES)?;
        check_list("studies_deny", b.studies_deny.len(), MAX_STUDIES)?;
        check_list("scope.datasets", b.scope.datasets.len(), MAX_STUDIES)?;
        if self.grant_by_id.contains_key(&b.consent_id) {
            return Err(invalid(format!("consent {} already exists", b.consent_id)));
        }
        if b.purposes.is_empty() {
            return Err(invalid("a consent permits at least one purpose"));
        }
        if b.valid_until.is_some_and(|u| u <= b.valid_from) {
            return Err(invalid("valid_until must be after valid_from"));
        }
        if b.modifiers.contains(&Modifier::Ps) && b.studies_allow.is_empty() {
            return Err(invalid("the PS modifier needs a studies_allow list"));
        }
        if let Some(f) = &b.fhir_id {
            check_text("fhir_id", f, 64)?;
        }
        Ok(())
    }

    /// The live (not ended) grant `consent_id` of `subject`.
    fn live_grant_of(&self, consent_id: &str, subject: &SubjectId) -> Result<usize> {
        let gi = *self
            .grant_by_id
            .get(consent_id)
            .ok_or_else(|| not_found("consent", consent_id))?;
        let g = &self.grants[gi];
        if self.subjects[g.subject as usize] != *subject {
            return Err(Error::Forbidden(format!(
                "consent {consent_id} is another subject's"
            )));
        }
        if g.ended.is_some() {
            return Err(invalid(format!(
                "consent {consent_id} was already revoked or replaced"
            )));
        }
        Ok(gi)
    }

    fn check_revocation(&self, author: &PrincipalId, role: Role, b: &ConsentRevoked) -> Result<()> {
        if let Some(s) = &b.scope {
            check_list("scope.datasets", s.datasets.len(), MAX_STUDIES)?;
        }
        if let Some(r) = &b.reason {
            check_text("reason", r, 1000)?;
        }
        match (&b.consent_id, &b.scope) {
            (Some(id), None) => {
                let gi = self.live_grant_of(id, &b.subject)?;
                self.check_consent_author(
                    author,
                    role,
                    &b.grantor,
                    &b.subject,
                    &self.grants[gi].scope.clone(),
                )
            }
            (None, Some(scope)) => {
                self.check_consent_author(author, role, &b.grantor, &b.subject, scope)
            }
            _ => Err(invalid("a revocation names either a consent_id or a scope")),
        }
    }

    fn check_study(&self, author: &PrincipalId, role: Role, b: &StudyRegistered) -> Result<()> {
        if self.studies.contains_key(&b.study) {
            return Err(invalid(format!("study {} already exists", b.study)));
        }
        let allowed = match role {
            Role::Researcher => b.pi == *author,
            Role::Sponsor => b.sponsor == *author,
            _ => false,
        };
        if !allowed {
            return Err(Error::Forbidden(
                "a study is registered by its PI or its sponsor".into(),
            ));
        }
        check_text("title", &b.title, 500)?;
        if !self.may_act(b.sponsor.as_str(), Role::Sponsor) {
            return Err(not_found("sponsor", &b.sponsor));
        }
        if !b.researchers.contains(&b.pi) {
            return Err(invalid(
                "the principal investigator must be among the researchers",
            ));
        }
        for r in &b.researchers {
            if !self.may_act(r.as_str(), Role::Researcher) {
                return Err(not_found("researcher", r));
            }
        }
        if b.datasets.is_empty() {
            return Err(invalid("a study requests at least one dataset"));
        }
        for d in &b.datasets {
            if !self.datasets.contains_key(d) {
                return Err(not_found("dataset", d));
            }
        }
        Ok(())
    }

    /// The study an IRB acts on: it exists, is not closed, and no other IRB approved it.
    fn study_for_irb(&self, author: &PrincipalId, study: &StudyId) -> Result<&Study> {
        let st = self
            .studies
            .get(study)
            .ok_or_else(|| not_found("study", study))?;
        if st.status == StudyStatus::Closed {
            return Err(invalid(format!("study {study} is closed")));
        }
        if let Some((irb, _)) = &st.approval
            && irb != author
        {
            return Err(Error::Forbidden(format!(
                "study {study} was approved by another IRB"
            )));
        }
        Ok(st)
    }

    fn check_approval(&self, author: &PrincipalId, b: &StudyApproved) -> Result<()> {
        let st = self.study_for_irb(author, &b.study)?;
        if b.valid_until <= b.valid_from {
            return Err(invalid("valid_until must be after valid_from"));
        }
        if b.grants.is_empty() {
            return Err(invalid("an approval grants at least one dataset"));
        }
        let mut seen = HashSet::default();
        for g in &b.grants {
            if !st.reg.datasets.contains(&g.dataset) {
                return Err(invalid(format!(
                    "dataset {} was not requested by the study",
                    g.dataset
                )));
            }
            if !seen.insert(&g.dataset) {
                return Err(invalid(format!("dataset {} granted twice", g.dataset)));
            }
            check_budget(g.epsilon, "epsilon", false)?;
            check_budget(g.delta, "delta", true)?;
            if !g.dp && g.extract_k.is_none() {
                return Err(invalid("a grant allows DP aggregates, extracts, or both"));
            }
            if g.extract_k.is_some_and(|k| k < 2) {
                return Err(invalid("extract_k must be at least 2"));
            }
        }
        Ok(())
    }

    /// Checks a receipt; for a released or failed (charged) one returns the debit.
    /// Checks a receipt written at `time`. A release needs the study active then (approved, not
    /// suspended or closed, within its approval period): a suspension is in effect from its
    /// entry on, whatever was in flight. A failed receipt only debits a draw already made, so
    /// it is taken whatever the study's status (refusing it would leave the draw uncharged).
    fn check_receipt(
        &self,
        b: &QueryReceipt,
        time: Timestamp,
    ) -> Result<Option<(StudyId, DatasetId, Spend)>> {
        if !self.principals.contains_key(&b.researcher) {
            return Err(not_found("principal", &b.researcher));
        }
        check_text("study", &b.study, 128)?;
        if let Some(n) = b.rows_suppressed {
            check_count(n, "rows_suppressed")?;
        }
        check_budget(b.epsilon, "epsilon", false)?;
        check_budget(b.delta, "delta", true)?;
        if let Some(rho) = b.rho {
            // Not compared with epsilon: a receipt's pure parts add rho epsilon_i^2 / 2 each,
            // which no function of their summed epsilon bounds from below.
            check_budget(rho, "rho", false)?;
        }
        match b.outcome {
            Outcome::Denied => {
                if b.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                    return Err(invalid("a denied receipt gives its reason"));
                }
                if b.epsilon != 0.0
                    || b.delta != 0.0
                    || b.rho.is_some()
                    || b.result_digest.is_some()
                {
                    return Err(invalid(
                        "a denied query spends nothing and releases nothing",
                    ));
                }
                Ok(None)
            }
            Outcome::Released | Outcome::Failed => {
                if b.outcome == Outcome::Failed
                    && (b.reason.as_deref().is_none_or(|r| r.trim().is_empty())
                        || b.result_digest.is_some())
                {
                    return Err(invalid(
                        "a failed receipt gives its reason and releases nothing",
                    ));
                }
                let st = self
                    .studies
                    .get(b.study.as_str())
                    .ok_or_else(|| not_found("study", &b.study))?;
                if b.outcome == Outcome::Released && !st.active_at(time) {
                    return Err(Error::Forbidden(format!(
                        "study {} is not active at this receipt's time (it is {:?}, or outside \
                         its approval period): nothing is released for it",
                        b.study, st.status
                    )));
                }
                let (Some(dataset), Some(version), Some(digest)) =
                    (&b.dataset, b.version, &b.dataset_digest)
                else {
                    return Err(invalid(
                        "a released receipt names the dataset, version and digest",
                    ));
                };
                if b.outcome == Outcome::Released
                    && (b.consent_digest.is_none() || b.result_digest.is_none())
                {
                    return Err(invalid(
                        "a released receipt carries the consent and result digests",
                    ));
                }
                let ds = self
                    .datasets
                    .get(dataset)
                    .ok_or_else(|| not_found("dataset", dataset))?;
                let v = ds
                    .versions
                    .iter()
                    .find(|v| v.reg.version == version)
                    .ok_or_else(|| not_found("dataset version", format!("{dataset}@{version}")))?;
                if v.reg.digest != *digest {
                    return Err(invalid(
                        "dataset_digest does not match the registered version",
                    ));
                }
                if b.mode == QueryMode::Extract
                    && b.outcome == Outcome::Released
                    && let Some(first) = self.extracts.get(&(st.reg.study.clone(), dataset.clone()))
                    && *first != b.sql
                {
                    return Err(Error::Forbidden(format!(
                        "study {} already took a different extract of dataset {dataset}; a study \
                         takes one extract of a dataset (repeat its SQL)",
                        b.study
                    )));
                }
                let account = self
                    .account(st.reg.study.as_str(), dataset.as_str())
                    .ok_or_else(|| {
                        Error::Forbidden(format!(
                            "study {} has no approval for dataset {dataset}",
                            b.study
                        ))
                    })?;
                let cost = Spend::of_receipt(b.epsilon, b.delta, b.rho);
                if !account.admits(&cost) {
                    return Err(Error::BudgetExhausted {
                        study: b.study.clone(),
                        dataset: dataset.to_string(),
                        epsilon_left: account.epsilon_left(),
                        delta_left: account.delta_left(),
                    });
                }
                Ok(Some((st.reg.study.clone(), dataset.clone(), cost)))
            }
        }
    }
}

/// Most purposes (and modifiers) in one consent.
const MAX_PURPOSES: usize = 32;
/// Most studies allowed or denied, or datasets covered, in one consent: a consent of 10^6
/// denied studies was accepted, and exporting it as FHIR took the broker to 7 GB.
const MAX_STUDIES: usize = 1000;

fn check_list(what: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(invalid(format!("{what} holds {len} items; at most {max}")));
    }
    Ok(())
}

/// Parses a checkpoint body; used by callers that need the size and root of a cosigned note.
pub fn checkpoint_of(note_text: &str) -> Result<Checkpoint> {
    let (text, _) = crate::note::signatures(note_text)?;
    Ok(Checkpoint::parse(&text)?)
}
