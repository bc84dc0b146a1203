//! The ledger's error type. Variants are named for what the caller can do about them.

use crate::entry::DecodeError;
use crate::ids::{InvalidValue, Role};
use crate::merkle::ProofError;
use crate::note::NoteError;

/// Everything that can go wrong in the ledger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The entry is malformed; nothing was written.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A field has an invalid value; nothing was written.
    #[error(transparent)]
    InvalidValue(#[from] InvalidValue),
    /// The entry is well formed but breaks a rule (a duplicate id, a dataset version that does
    /// not increase, ...); nothing was written.
    #[error("entry refused: {0}")]
    Invalid(String),
    /// The author is not a registered principal.
    #[error("unknown principal {0:?}")]
    UnknownPrincipal(String),
    /// The author's registration was revoked.
    #[error("principal {0:?} is revoked")]
    RevokedPrincipal(String),
    /// The signature does not verify with the author's current key.
    #[error("signature of {author:?} does not verify over the entry's canonical bytes")]
    BadSignature {
        /// The claimed author.
        author: String,
    },
    /// The author's role may not write this kind of entry.
    #[error("principal {author:?} is a {role}; {kind} needs {needed}")]
    WrongRole {
        /// The author.
        author: String,
        /// Its role.
        role: Role,
        /// The entry kind.
        kind: &'static str,
        /// The roles that may write it.
        needed: &'static str,
    },
    /// The author has the right role but may not act on this object (another custodian's
    /// dataset, another IRB's study, another patient's consent).
    #[error("not allowed: {0}")]
    Forbidden(String),
    /// What the entry would create exists already (a dataset version registered before).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Something the entry refers to does not exist.
    #[error("unknown {what} {id:?}")]
    NotFound {
        /// What kind of object.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A receipt would spend more than the study's approval grants.
    #[error(
        "privacy budget of study {study:?} on dataset {dataset:?} exhausted: \
         {epsilon_left} epsilon and {delta_left} delta left"
    )]
    BudgetExhausted {
        /// The study.
        study: String,
        /// The dataset.
        dataset: String,
        /// Epsilon left before this receipt.
        epsilon_left: f64,
        /// Delta left before this receipt.
        delta_left: f64,
    },
    /// The entry's time is too far from the ledger's clock.
    #[error("entry time is {skew_secs} s away from the ledger's clock (at most {max_secs} s)")]
    ClockSkew {
        /// How far off.
        skew_secs: i64,
        /// The tolerance.
        max_secs: i64,
    },
    /// An index or tree size beyond the ledger.
    #[error("{what} {value} out of range (tree size {size})")]
    OutOfRange {
        /// "leaf index", "tree size", ...
        what: &'static str,
        /// The value asked for.
        value: u64,
        /// The current tree size.
        size: u64,
    },
    /// A proof does not verify or cannot be made.
    #[error(transparent)]
    Proof(#[from] ProofError),
    /// A key, note or checkpoint is malformed or does not verify.
    #[error(transparent)]
    Note(#[from] NoteError),
    /// Stored bytes changed: the ledger refuses to open (or `verify` fails).
    #[error("ledger corrupt at entry {index} ({file}): {reason}")]
    Corrupt {
        /// The first bad entry. For `checkpoints.log`, the bad record's position in that
        /// file; for a tree root that differs from a checkpoint, the checkpoint's last entry
        /// (size - 1): the root cannot tell which entry before it changed.
        index: u64,
        /// Which stored file.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Another process has the ledger open.
    #[error("the ledger is in use by another process")]
    Locked,
    /// No ledger in the data directory.
    #[error("no ledger in the data directory; create one with `broker ledger init`")]
    NotInitialized,
    /// A ledger already exists.
    #[error("a ledger already exists in the data directory")]
    AlreadyInitialized,
    /// A write failed earlier; the ledger accepts no more appends until it is reopened.
    #[error("the ledger stopped accepting appends after a storage failure; reopen it")]
    Poisoned,
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The ledger's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
