//! The ledger's rules: who may write which entry, and what must already exist.
//!
//! [`State::apply`] checks the author and dispatches to one rule per kind, each in its module:
//! `principal`, `dataset`, `consent`, `study`, `receipt`, `checkpoint`. The limits and checks
//! every kind shares live here.

use foldhash::HashSet;

use super::consent::{Grant, Objection};
use super::{FirstExtract, Principal, ReceiptRef, State, Study, StudyStatus, invalid, not_found};
use crate::budget::Spend;
use crate::duo::Modifier;
use crate::entry::{
    Body, ConsentGranted, ConsentRevoked, ConsentScope, Entry, Outcome, QueryMode, QueryReceipt,
    SignedEntry, StudyApproved, StudyRegistered,
};
use crate::error::{Error, Result};
use crate::ids::{DatasetId, PrincipalId, Role, StudyId, SubjectId, Timestamp};
use crate::merkle::Hash;
use crate::note::{Checkpoint, VerifierKey};

mod checkpoint;
mod consent;
mod dataset;
mod principal;
mod receipt;
mod study;

/// Who wrote the entry being applied, and where it goes: what every kind's rule reads.
#[derive(Clone, Copy)]
struct Applying<'a> {
    author: &'a PrincipalId,
    role: Role,
    index: u64,
    time: Timestamp,
    kind: &'static str,
}

impl Applying<'_> {
    /// Refuses the entry unless its author has one of the `allowed` roles (the roles named in
    /// the error message).
    fn need(&self, allowed: &[Role]) -> Result<()> {
        if allowed.contains(&self.role) {
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
            author: self.author.to_string(),
            role: self.role,
            kind: self.kind,
            needed,
        })
    }
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
        let p = self.active_principal(author)?;
        Ok((p.key.clone(), p.key_since))
    }

    /// A registered principal that is not revoked.
    fn active_principal(&self, id: &PrincipalId) -> Result<&Principal> {
        let p = self
            .principals
            .get(id)
            .ok_or_else(|| Error::UnknownPrincipal(id.to_string()))?;
        if p.revoked_at.is_some() {
            return Err(Error::RevokedPrincipal(id.to_string()));
        }
        Ok(p)
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
            let p = self.active_principal(author)?;
            if p.key_since != key_since {
                return Err(Error::BadSignature {
                    author: author.to_string(),
                });
            }
            p.role
        };
        // Index the entry under the principal or study it concerns (for bundles): a study's
        // lifecycle (its receipts are indexed by the receipt rule).
        let principal = body.principal().cloned();
        let study = match &body {
            Body::QueryReceipt(_) => None,
            b => b.study().map(StudyId::new).transpose()?,
        };
        // One rule per kind (a module each). A consent, by far the most frequent entry, is
        // moved into the state; the rest is cloned from the entry.
        let a = Applying {
            author,
            role,
            index,
            time,
            kind,
        };
        match body {
            Body::ConsentGranted(b) => {
                a.need(&[Role::Patient, Role::Custodian])?;
                self.grant(b, author, role, index)?;
            }
            Body::ConsentRevoked(ref b) => self.revoke_consent(b, &a)?,
            Body::PrincipalRegistered(ref b) => self.register_principal(b, &a)?,
            Body::KeyRotated(ref b) => self.rotate_key(b, &a)?,
            Body::PrincipalRevoked(ref b) => self.revoke_principal(b, &a)?,
            Body::DatasetRegistered(ref b) => self.register_dataset(b, &a)?,
            Body::StudyRegistered(ref b) => self.register_study(b, &a)?,
            Body::StudyApproved(ref b) => self.approve_study(b, &a)?,
            Body::StudySuspended(ref b) => self.end_study(b, &a, true)?,
            Body::StudyClosed(ref b) => self.end_study(b, &a, false)?,
            Body::QueryReceipt(ref b) => self.receipt(b, &a)?,
            Body::CheckpointCosigned(ref b) => self.cosign(b, &a, root_at)?,
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
