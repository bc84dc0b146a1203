//! Consentry's protobuf definitions and generated gRPC code.
//!
//! No logic lives here. The services arrive with the broker's gRPC interface; until then the
//! crate is empty.
