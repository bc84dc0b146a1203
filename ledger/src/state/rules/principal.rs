//! Principals: registration (the genesis entry registers the operator), key rotation and revocation.

use super::*;
use crate::entry::{KeyRotated, PrincipalRegistered, PrincipalRevoked};
use crate::note::VerifierKey;

impl State {
    /// Registers a principal and its first key.
    pub(super) fn register_principal(
        &mut self,
        b: &PrincipalRegistered,
        a: &Applying<'_>,
    ) -> Result<()> {
        if a.index > 0 {
            a.need(&[Role::Operator])?;
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
        if a.index == 0 {
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
                key_since: a.index,
                subject: b.subject.clone(),
                display_name: b.display_name.clone(),
                revoked_at: None,
            },
        );
        Ok(())
    }

    /// Replaces a principal's key (by itself or the operator).
    pub(super) fn rotate_key(&mut self, b: &KeyRotated, a: &Applying<'_>) -> Result<()> {
        if b.id != *a.author {
            a.need(&[Role::Operator])?;
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
        p.key_since = a.index;
        Ok(())
    }

    /// Revokes a principal (by itself or the operator; never the ledger's own key).
    pub(super) fn revoke_principal(
        &mut self,
        b: &PrincipalRevoked,
        a: &Applying<'_>,
    ) -> Result<()> {
        if b.id != *a.author {
            a.need(&[Role::Operator])?;
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
        p.revoked_at = Some(a.index);
        Ok(())
    }
}
