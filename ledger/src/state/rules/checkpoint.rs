//! Witness cosignatures of the ledger's checkpoints.

use super::*;
use crate::entry::CheckpointCosigned;
use crate::merkle::Hash;

impl State {
    /// Records a witness's cosignature of a checkpoint of this ledger.
    pub(super) fn cosign(
        &mut self,
        b: &CheckpointCosigned,
        a: &Applying<'_>,
        root_at: &dyn Fn(u64) -> Option<Hash>,
    ) -> Result<()> {
        a.need(&[Role::Witness])?;
        let ledger_key = self
            .ledger_key
            .as_ref()
            .ok_or_else(|| invalid("no ledger key"))?;
        let witness = &self
            .principals
            .get(a.author)
            .expect("author checked above")
            .key;
        let cp = crate::note::open_checkpoint(ledger_key, &b.checkpoint, None)?;
        witness.verify_note(&b.checkpoint)?;
        if root_at(cp.size) != Some(cp.root) {
            return Err(invalid(
                "the cosigned checkpoint does not match this ledger's tree",
            ));
        }
        Ok(())
    }
}
