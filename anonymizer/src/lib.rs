//! Consentry's anonymizer: column policies, de-identification and differential privacy over
//! DataFusion and Arrow.
//!
//! It knows nothing of gRPC or the ledger: the broker hands it a consent filter and a budget,
//! and records what it returns (privacy loss, digests) on the ledger.
//!
//! Modules:
//! - [`policy`]: column policies (TOML): privacy unit, contribution bounds, column classes.
//! - [`dataset`]: loading a dataset version: unit numbering and contribution bounding, once.
//! - [`consent`]: the consent filter as a bitmap semi-join on the privacy unit.
//! - [`plan`]: checking a query's logical plan against the policy.
//! - [`total`]: researcher expressions made total (an allow-list; no failure on data).
//! - [`scan`]: rows first: the guarded scan, the only way a query reaches rows.
//! - [`mechanisms`]: noise from OpenDP, with privacy loss read from OpenDP's privacy maps.
//! - [`release`]: keys, noise and accuracy for each statistic.
//! - [`engine`]: [`Engine::run`], the query path.
//! - [`safe_harbor`]: HIPAA Safe Harbor generalizations over Arrow arrays.
//! - [`pseudonym`]: study secrets and HMAC-SHA256 pseudonyms of the privacy unit.
//! - [`extract`]: [`Engine::extract`], de-identified k-anonymous rows; the small-cell rule.
//! - [`inspect`]: proposing a policy by detecting identifier columns.
//! - [`error`]: the error type.

pub mod clamp;
pub mod consent;
pub mod dataset;
pub mod engine;
pub mod error;
pub mod extract;
pub mod files;
pub mod inspect;
pub mod mechanisms;
pub mod plan;
pub mod policy;
pub mod probe;
pub mod pseudonym;
pub mod quantile;
pub mod release;
pub mod repeats;
pub mod safe_harbor;
pub mod scan;
pub mod schedule;
pub mod total;

mod threads;

#[cfg(test)]
mod attacks;
#[cfg(test)]
mod tests;

pub use consent::ConsentFilter;
pub use dataset::Dataset;
pub use engine::{Engine, Flight, Limits, Release, Request};
pub use error::{Error, Result};
pub use ledger::budget::{Account, Spend};
pub use mechanisms::Mechanism;
pub use policy::Policy;
pub use repeats::KeptRepeats;
