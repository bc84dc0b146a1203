//! End-to-end tests of Consentry: a broker on 127.0.0.1:0 with a temporary data directory,
//! driven through its gRPC services by each kind of user. One module per user story.

// Test support code: a failed set-up step should fail the test loudly.
#![allow(clippy::unwrap_used)]

mod world;

mod adversary;
mod custodian;
mod demo;
mod flight;
mod irb;
mod patient;
mod researcher;
mod sponsor;
