//! Consentry's anonymizer: column policies, de-identification and differential privacy over
//! DataFusion and Arrow.
//!
//! It knows nothing of gRPC or the ledger: the broker hands it a consent filter and a budget.
//! The engine arrives with its own issue; until then the crate is empty.
