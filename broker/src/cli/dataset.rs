//! `broker dataset …`: a custodian's dataset tools.
//!
//! `inspect` reads a Parquet or Arrow IPC file and proposes its column policy, detecting
//! identifier columns from their names and values. The proposal goes to stdout (or to `--out`),
//! the findings report to stderr; `--json` prints the findings as JSON instead. Nothing it
//! prints carries a record value: findings are counts and patterns.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

/// Arguments of `broker dataset`.
#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// The dataset command.
    #[command(subcommand)]
    pub command: DatasetCommand,
}

/// Dataset commands.
#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Propose a column policy for a table: detects SSNs, medical record numbers, phone and
    /// fax numbers, email addresses, person names, street addresses, ZIP codes, full dates,
    /// URLs, IP addresses, device and account numbers, ages and birth years, from column names
    /// and a sample of values, and says for each column what it found and why.
    ///
    /// The proposed policy (TOML, one comment per column) goes to stdout, or to --out; the
    /// findings report goes to stderr. Review the proposal before registering the dataset:
    /// registration refuses any column the policy does not classify.
    Inspect {
        /// The table's file: Parquet (`.parquet`) or Arrow IPC (file or stream). The table is
        /// named after the file, without its extension.
        #[arg(env = "CONSENTRY_INSPECT_FILE")]
        file: PathBuf,
        /// Write the proposed policy to this file (never overwritten) instead of stdout.
        #[arg(long, env = "CONSENTRY_INSPECT_OUT")]
        out: Option<PathBuf>,
        /// Values sampled per column (evenly spread over the table, nulls left out).
        #[arg(long, env = "CONSENTRY_INSPECT_SAMPLE", default_value_t = 1000)]
        sample: usize,
        /// Print the findings as JSON on stdout (with the proposed policy under
        /// `policy_toml`) instead of the policy and a text report.
        #[arg(long, env = "CONSENTRY_INSPECT_JSON", default_value_t = false)]
        json: bool,
    },
    /// Print each file's SHA-256, size and rows (JSON), as a dataset registration records
    /// them: compare a local copy with the `sha256` of its file in the registered entry.
    Hash {
        /// Parquet or Arrow IPC files.
        #[arg(required = true, env = "CONSENTRY_HASH_FILES", value_delimiter = ',')]
        files: Vec<PathBuf>,
    },
}

/// Runs a dataset command.
pub fn run(args: DatasetArgs) -> anyhow::Result<()> {
    match args.command {
        DatasetCommand::Hash { files } => {
            let pb = indicatif::ProgressBar::new(files.len() as u64);
            let mut out = Vec::new();
            for f in &files {
                let (digest, bytes) = crate::manifest::hash_file(f)
                    .with_context(|| format!("hashing {}", f.display()))?;
                let (rows, _) = crate::manifest::file_shape(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                out.push(serde_json::json!({
                    "file": f, "sha256": digest.to_string(), "bytes": bytes, "rows": rows,
                }));
                pb.inc(1);
            }
            pb.finish_and_clear();
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        DatasetCommand::Inspect {
            file,
            out,
            sample,
            json,
        } => {
            if sample == 0 {
                bail!("--sample must be at least 1");
            }
            let opts = anonymizer::inspect::Options { sample };
            let proposal = anonymizer::inspect::inspect_file(&file, &opts)?;
            if let Some(path) = &out {
                let mut f = super::conn::create_new(path)?;
                f.write_all(proposal.policy_toml.as_bytes())?;
                f.sync_all()?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&proposal)?);
                return Ok(());
            }
            if out.is_none() {
                print!("{}", proposal.policy_toml);
            }
            eprint!("{}", proposal.report());
            if let Some(path) = &out {
                eprintln!("proposed policy written to {}", path.display());
            }
            Ok(())
        }
    }
}
