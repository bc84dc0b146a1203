//! The `broker` command line. Every flag has an environment variable (`CONSENTRY_…`).

use clap::{Parser, Subcommand};

pub mod dataset;
pub mod ledger;
pub mod serve;

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
    /// Dataset tools for custodians: propose a column policy for a Parquet or Arrow file.
    Dataset(dataset::DatasetArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ledger(args) => ledger::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Token(args) => serve::token(args),
        Command::Dataset(args) => dataset::run(args),
    }
}
