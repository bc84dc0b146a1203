//! Consentry's broker: the service researchers, custodians, patients, IRBs and sponsors talk
//! to, and the `broker` command line.
//!
//! It wires the [`ledger`] (consent, studies, receipts) to the anonymizer (de-identification
//! and differential privacy) behind authenticated gRPC services. It is the only crate that
//! knows protobuf or the command line.
//!
//! Modules:
//! - [`cli`]: the `broker` command line (clap), one module per command group.
//! - [`auth`]: bearer JWTs (EdDSA) minted with a principal's key and checked on the ledger.
//! - [`server`]: the gRPC services and `serve`.
//! - [`error`]: the broker's error type, and the one place gRPC status codes are chosen.
//! - [`store`]: datasets on disk and their query engines.
//! - [`secrets`]: study pseudonym secrets (0600 files, never sent or logged).
//! - [`kept`]: released answers kept across restarts for free repeats.
//! - [`manifest`]: dataset manifests (file digests, rows, schemas).
//! - [`client`]: signing, tokens and uploads on the client side (CLI, tests).

pub mod auth;
pub mod cli;
pub mod client;
pub mod demo;
pub mod error;
pub mod kept;
pub mod manifest;
pub mod secrets;
pub mod server;
pub mod store;
