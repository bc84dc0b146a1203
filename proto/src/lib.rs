//! Consentry's protobuf definitions and generated gRPC code (`proto/consentry/v1`).
//!
//! No logic lives here: the broker converts between these messages and the domain types of
//! `ledger` and `anonymizer`.

pub mod codec;

/// Version 1 of the interface.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("consentry.v1");
}

/// The encoded `FileDescriptorSet`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("consentry_descriptor");
