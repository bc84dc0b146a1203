//! Consentry's ledger: a verifiable, durable, signed, append-only record of principals,
//! datasets, consents, studies and query receipts.
//!
//! Every entry is a typed statement signed by its author (Ed25519 over its RFC 8785 canonical
//! JSON). Entries are leaves of an RFC 9162 Merkle tree; the ledger signs C2SP checkpoints of
//! the tree and serves inclusion and consistency proofs, so anyone holding the ledger's
//! verifier key can check, offline, that an entry is in the log and that the log only grew.
//! Appends are acknowledged only once durable (group commit: one fsync per batch). Replaying
//! the log rebuilds the derived [`State`] that answers the broker's questions: may this
//! principal act, which subjects does consent admit, how much budget is left.
//!
//! It deliberately knows nothing of gRPC, SQL, the anonymizer or the command line.
//!
//! Modules:
//! - [`ids`]: validated identifiers, timestamps and digests.
//! - [`duo`]: GA4GH Data Use Ontology terms and the matching rule.
//! - [`entry`]: entry kinds, canonical bytes, the signed leaf envelope.
//! - `jcs`: the RFC 8785 canonical JSON writer behind the canonical bytes; `decode`: the
//!   one-pass decoder of stored entries.
//! - [`merkle`]: RFC 9162 hashing, proofs and verifiers.
//! - [`note`]: C2SP signed-note keys, signatures and tlog checkpoints.
//! - [`storage`]: the files on disk and their framing.
//! - [`replay`]: the replay pipeline shared by open and verify.
//! - [`state`]: derived state and its rules ([`State::apply`]).
//! - [`ledger`]: [`Ledger`]: open, append, proofs, checkpoints; [`verify`].
//! - [`bundle`]: offline evidence bundles for sponsors and their verifier.
//! - [`keyfile`]: private key files (mode 0600).

pub mod budget;
pub mod bundle;
mod decode;
pub mod duo;
pub mod entry;
pub mod error;
pub mod fhir;
pub mod ids;
mod jcs;
pub mod keyfile;
pub mod ledger;
pub mod merkle;
pub mod note;
pub mod replay;
pub mod state;
pub mod storage;

pub use error::{Error, Result};
pub use ledger::{Appended, Config, Ledger, OpenReport, VerifyReport, verify, verify_state};
pub use state::State;

#[cfg(test)]
mod test_support {
    /// The known-answer vectors in `ledger/testdata` (see its README for their sources). The
    /// package directory is read when the tests run (cargo sets it), not when they were built,
    /// so a test binary reused from another checkout of the same sources finds its own copy.
    pub(crate) fn testdata() -> std::path::PathBuf {
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        );
        dir.join("testdata")
    }
}
