//! The `broker` command line. Every flag has an environment variable (`CONSENTRY_…`).

use clap::{Parser, Subcommand};

pub mod check;
pub mod conn;
pub mod consent;
pub mod dataset;
pub mod demo;
pub mod ledger;
pub mod principal;
pub mod query;
pub mod serve;
pub mod study;
pub mod verify;

/// Consentry: a privacy-preserving research data broker for health data.
#[derive(Debug, Parser)]
#[command(
    name = "broker",
    version,
    about,
    long_about = None,
    after_help = "Client commands (consent, study, dataset register|list, query, audit, bundle) \
take the broker's --url and the caller's --key FILE, as do token, ledger append and ledger \
cosign; both are global: before the command or after it, or as CONSENTRY_URL and CONSENTRY_KEY."
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ledger=debug`.
    #[arg(
        long,
        env = "CONSENTRY_LOG_LEVEL",
        default_value = "warn",
        global = true
    )]
    pub log: String,
    /// The broker and the caller, for the commands that call a broker or sign.
    #[command(flatten)]
    pub conn: conn::Conn,
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
    /// Mint a bearer token (EdDSA JWT; brokers accept 15 minutes unless their operator allows
    /// up to 24 hours) with a principal's key.
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
    /// Principals: the operator registers one with its verifier key, rotates its key or
    /// revokes it, while the broker serves.
    Principal(principal::PrincipalArgs),
    /// Run a DP query (or an extract) within a study and show or save the result.
    Query(query::QueryArgs),
    /// A study's usage log (denied attempts too, with what they asked to spend; repeats
    /// marked) and budget burn-down: for its IRB, sponsor, PI and researchers, and the operator.
    Audit(query::AuditArgs),
    /// Fetch a study's evidence bundle (check it offline with `broker verify`).
    Bundle(query::BundleArgs),
    /// A sponsor's offline check, with only the ledger's verifier key: a study's evidence
    /// bundle (checkpoint signature, inclusion proofs, every author's signature, the dataset
    /// versions its receipts used), and local dataset files against the SHA-256 their
    /// registration recorded.
    Verify(verify::VerifyArgs),
    /// Check everything a data directory stores, changing nothing: the ledger (records,
    /// signatures, node hashes, checkpoints, how far it got), each dataset version's files
    /// against its registration, kept releases, study secrets. Exits non-zero naming each
    /// problem. Run it with the broker stopped or running.
    Check(check::CheckArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ledger(args) => ledger::run(&cli.conn, args),
        Command::Serve(args) => serve::serve(args),
        Command::Token(args) => serve::token(&cli.conn, args),
        Command::Dataset(args) => dataset::run(&cli.conn, args),
        Command::Demo(args) => demo::run(args),
        Command::Consent(args) => consent::run(&cli.conn, args),
        Command::Study(args) => study::run(&cli.conn, args),
        Command::Principal(args) => principal::run(&cli.conn, args),
        Command::Query(args) => query::query(&cli.conn, args),
        Command::Audit(args) => query::audit(&cli.conn, args),
        Command::Bundle(args) => query::bundle(&cli.conn, args),
        Command::Verify(args) => verify::run(args),
        Command::Check(args) => check::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command that calls a broker or signs, with its required arguments.
    const SIGNING: &[&[&str]] = &[
        &["consent", "grant", "--subject", "p1", "--purpose", "GRU"],
        &["consent", "revoke", "--subject", "p1", "--consent-id", "c1"],
        &["consent", "list", "--subject", "p1"],
        &["consent", "usage", "--subject", "p1"],
        &["consent", "import-fhir", "--file", "c.json"],
        &["consent", "export-fhir", "--subject", "p1"],
        &[
            "study",
            "create",
            "--study",
            "s",
            "--title",
            "t",
            "--sponsor",
            "p",
            "--purpose",
            "GRU",
            "--dataset",
            "d",
        ],
        &[
            "study",
            "approve",
            "--study",
            "s",
            "--dataset",
            "d",
            "--epsilon",
            "1",
            "--valid-until",
            "2030-01-01T00:00:00Z",
        ],
        &["study", "suspend", "--study", "s", "--reason", "r"],
        &["study", "close", "--study", "s", "--reason", "r"],
        &["study", "list"],
        &[
            "principal",
            "add",
            "--id",
            "a",
            "--role",
            "researcher",
            "--verifier-key",
            "a+1+x",
        ],
        &[
            "principal",
            "rotate",
            "--id",
            "a",
            "--verifier-key",
            "a+1+x",
        ],
        &["principal", "revoke", "--id", "a"],
        &[
            "dataset",
            "register",
            "--dataset",
            "d",
            "--policy",
            "p.toml",
            "t.parquet",
        ],
        &["dataset", "list"],
        &[
            "query",
            "--study",
            "s",
            "--dataset",
            "d",
            "--sql",
            "SELECT COUNT(*) FROM t",
        ],
        &["audit", "receipts", "--study", "s"],
        &["audit", "budget", "--study", "s"],
        &["audit", "export", "--study", "s", "--out", "a.csv"],
        &["bundle", "--study", "s"],
        &["token"],
        &["ledger", "append", "--entry", "e.json"],
        &["ledger", "cosign"],
    ];

    fn parse(args: &[&str]) -> Cli {
        let line = std::iter::once("broker").chain(args.iter().copied());
        match Cli::try_parse_from(line) {
            Ok(cli) => cli,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn url_and_key_are_taken_before_or_after_every_command() {
        let flags = ["--url", "http://10.0.0.1:7", "--key", "k.key"];
        let want = conn::Conn {
            url: "http://10.0.0.1:7".into(),
            key: Some("k.key".into()),
        };
        for command in SIGNING {
            let before: Vec<&str> = flags.iter().chain(command.iter()).copied().collect();
            let after: Vec<&str> = command.iter().chain(flags.iter()).copied().collect();
            // Between a command group and its command too (`broker study --key K create`).
            let mut between = command.to_vec();
            between.splice(1..1, flags);
            for args in [before, after, between] {
                assert_eq!(parse(&args).conn, want, "{args:?}");
            }
        }
    }

    #[test]
    fn a_command_that_signs_without_a_key_says_which_flag_to_give() {
        let cli = parse(&["study", "list"]);
        assert_eq!(cli.conn.key, None);
        let e = cli.conn.signer().expect_err("no key given");
        assert!(format!("{e:#}").contains("--key FILE"), "{e:#}");
    }

    #[test]
    fn the_verifier_key_is_its_own_flag() {
        let cli = parse(&[
            "verify",
            "--verifier-key",
            "V",
            "--bundle",
            "b.json",
            "--key",
            "k",
        ]);
        match cli.command {
            Command::Verify(v) => assert_eq!(v.verifier_key, "V"),
            other => panic!("{other:?}"),
        }
        assert_eq!(cli.conn.key, Some("k".into()));
    }
}
