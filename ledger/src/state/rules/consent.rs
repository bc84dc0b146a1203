//! Consents: grants (the most frequent entry, moved into the state), revocations and objections.

use super::*;

impl State {
    /// Ends a consent, or records an objection (a scope-wide revocation).
    pub(super) fn revoke_consent(&mut self, b: &ConsentRevoked, a: &Applying<'_>) -> Result<()> {
        a.need(&[Role::Patient, Role::Custodian])?;
        self.check_revocation(a.author, a.role, b)?;
        match (&b.consent_id, &b.scope) {
            (Some(id), None) => {
                let gi = self.live_grant_of(id, &b.subject)?;
                self.grants[gi].ended = Some(a.index);
                let scope = self.grants[gi].scope.clone();
                let subject = self.grants[gi].subject;
                self.bump(&scope, subject);
            }
            (None, Some(scope)) => {
                let subject = self.intern(b.subject.clone());
                let oi = self.objections.len();
                self.objections.push(Objection {
                    index: a.index,
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
        Ok(())
    }

    /// Applies a consent (checked, then moved into the state).
    pub(super) fn grant(
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

    pub(super) fn check_consent_author(
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

    pub(super) fn check_grant(&self, b: &ConsentGranted) -> Result<()> {
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
    pub(super) fn live_grant_of(&self, consent_id: &str, subject: &SubjectId) -> Result<usize> {
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

    pub(super) fn check_revocation(
        &self,
        author: &PrincipalId,
        role: Role,
        b: &ConsentRevoked,
    ) -> Result<()> {
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
}
