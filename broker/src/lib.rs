//! Consentry's broker: the service researchers, custodians, patients, IRBs and sponsors talk
//! to, and the `broker` command line.
//!
//! It wires the [`ledger`] (consent, studies, receipts) to the anonymizer (de-identification
//! and differential privacy) behind authenticated gRPC services. It is the only crate that
//! knows protobuf or the command line.
//!
//! Modules:
//! - [`cli`]: the `broker` command line (clap), one module per command group.

pub mod cli;
