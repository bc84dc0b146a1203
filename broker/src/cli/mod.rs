//! The `broker` command line. Every flag has an environment variable (`CONSENTRY_…`).

use clap::{Parser, Subcommand};

pub mod conn;
pub mod consent;
pub mod dataset;
pub mod demo;
pub mod ledger;
pub mod query;
pub mod serve;
pub mod study;
pub mod verify;

/// Consentry: a privacy-preserving research data broker for health data.
#[derive(Debug, Parser)]
#[command(name = "broker", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ledger=debug`.
    #[arg(
        long,
        env = "CONSENTRY_LOG_LEVEL",
        default_value = "warn",
        global = true
    )]
    pub log: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Command groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The tamper-evident ledger: create it, append signed entries, read proofs and
    /// checkpoints, verify it, and make or check a sponsor's evidence bundle.
    Ledger(ledger::LedgerArgs),
    /// Serve the gRPC services (registry, consent, query, audit, ledger, health, reflection)
    /// over the data directory, creating its ledger on first run.
    Serve(serve::ServeArgs),
    /// Mint a bearer token (EdDSA JWT, at most 15 minutes) with a principal's key.
    Token(serve::TokenArgs),
    /// Dataset tools for custodians: propose a column policy for a Parquet or Arrow file,
    /// register a version (upload), list versions, hash files as a registration records them.
    Dataset(dataset::DatasetArgs),
    /// Build a synthetic hospital (patients with names, SSNs, addresses and birth dates;
    /// encounters; ICD-10 conditions; LOINC lab results), its patients' consents and an approved
    /// study in the data directory, write `demo.json` describing it, then serve it.
    ///
    /// Run again on the same directory, it serves the demo it built before.
    Demo(demo::DemoArgs),
    /// Patients' consent: grant, limit, revoke, list, import or export as FHIR, and see who
    /// used the data.
    Consent(consent::ConsentArgs),
    /// Studies: a PI registers one; an IRB approves it with a budget, suspends or closes it.
    Study(study::StudyArgs),
    /// Run a DP query (or an extract) within a study and show or save the result.
    Query(query::QueryArgs),
    /// The IRB's usage log (denied attempts too) and budget burn-down.
    Audit(query::AuditArgs),
    /// Fetch a study's evidence bundle (check it offline with `broker verify`).
    Bundle(query::BundleArgs),
    /// A sponsor's offline check, with only the ledger's verifier key: a study's evidence
    /// bundle (checkpoint signature, inclusion proofs, every author's signature, the dataset
    /// versions its receipts used), and local dataset files against the SHA-256 their
    /// registration recorded.
    Verify(verify::VerifyArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ledger(args) => ledger::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Token(args) => serve::token(args),
        Command::Dataset(args) => dataset::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Consent(args) => consent::run(args),
        Command::Study(args) => study::run(args),
        Command::Query(args) => query::query(args),
        Command::Audit(args) => query::audit(args),
        Command::Bundle(args) => query::bundle(args),
        Command::Verify(args) => verify::run(args),
    }
}
