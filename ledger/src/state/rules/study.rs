//! Studies: registration by their PI or sponsor, approval, suspension and closure by their IRB.

use super::*;
use crate::entry::StudyStatus as StatusChange;

impl State {
    /// Registers a study.
    pub(super) fn register_study(&mut self, b: &StudyRegistered, a: &Applying<'_>) -> Result<()> {
        a.need(&[Role::Researcher, Role::Sponsor])?;
        self.check_study(a.author, a.role, b)?;
        self.studies.insert(
            b.study.clone(),
            Study {
                reg: b.clone(),
                index: a.index,
                status: StudyStatus::Registered,
                approval: None,
            },
        );
        Ok(())
    }

    /// Approves a study with its grants.
    pub(super) fn approve_study(&mut self, b: &StudyApproved, a: &Applying<'_>) -> Result<()> {
        a.need(&[Role::Irb])?;
        self.check_approval(a.author, b)?;
        let st = self
            .studies
            .get_mut(&b.study)
            .expect("checked by check_approval");
        st.status = StudyStatus::Approved;
        st.approval = Some((a.author.clone(), b.clone()));
        Ok(())
    }

    /// Suspends (`suspend`) or closes a study.
    pub(super) fn end_study(
        &mut self,
        b: &StatusChange,
        a: &Applying<'_>,
        suspend: bool,
    ) -> Result<()> {
        a.need(&[Role::Irb])?;
        check_text("reason", &b.reason, 1000)?;
        let st = self.study_for_irb(a.author, &b.study)?;
        if suspend && st.status != StudyStatus::Approved {
            return Err(invalid(format!("study {} is not approved", b.study)));
        }
        let st = self.studies.get_mut(&b.study).expect("checked above");
        st.status = if suspend {
            StudyStatus::Suspended
        } else {
            StudyStatus::Closed
        };
        Ok(())
    }

    pub(super) fn check_study(
        &self,
        author: &PrincipalId,
        role: Role,
        b: &StudyRegistered,
    ) -> Result<()> {
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
    pub(super) fn study_for_irb(&self, author: &PrincipalId, study: &StudyId) -> Result<&Study> {
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

    pub(super) fn check_approval(&self, author: &PrincipalId, b: &StudyApproved) -> Result<()> {
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
}
