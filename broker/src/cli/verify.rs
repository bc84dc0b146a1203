//! `broker verify`: a sponsor's offline check of a study's evidence bundle, and of local
//! dataset files against the SHA-256 their registration recorded, with only the ledger's
//! verifier key. Nothing here talks to the broker.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use ledger::bundle;
use ledger::note::VerifierKey;

use super::conn::print_json;
use super::dataset::{bytes_bar, total_bytes};

/// Arguments of `broker verify` (and `broker ledger verify-bundle`).
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The ledger's verifier key: the key text or a file holding it.
    #[arg(long, env = "CONSENTRY_VERIFIER_KEY")]
    pub verifier_key: String,
    /// The study's bundle file (`broker bundle --study S --out FILE`).
    #[arg(long, env = "CONSENTRY_BUNDLE")]
    pub bundle: PathBuf,
    /// An older signed checkpoint (file) to prove the log only grew since.
    #[arg(long, env = "CONSENTRY_OLD_CHECKPOINT")]
    pub old_checkpoint: Option<PathBuf>,
    /// A local copy of a dataset file (Parquet or Arrow IPC) to check against the SHA-256 a
    /// registration in the bundle recorded; repeat for several. Fails if any matches none.
    #[arg(long = "file", env = "CONSENTRY_VERIFY_FILES", value_delimiter = ',')]
    pub files: Vec<PathBuf>,
}

/// Reads a verifier key given as its text or as a file holding it.
pub fn read_verifier_key(arg: &str) -> anyhow::Result<VerifierKey> {
    if let Ok(k) = VerifierKey::parse(arg.trim()) {
        return Ok(k);
    }
    let text = std::fs::read_to_string(arg).with_context(|| {
        "--verifier-key is neither a verifier key nor a readable file".to_string()
    })?;
    Ok(VerifierKey::parse(text.trim())?)
}

/// A local file and the registered files it is a copy of.
#[derive(Debug, serde::Serialize)]
struct FileCheck {
    file: PathBuf,
    sha256: String,
    bytes: u64,
    registered: Vec<Registered>,
}

/// A file of a registered dataset version.
#[derive(Debug, serde::Serialize)]
struct Registered {
    dataset: String,
    version: u32,
    table: String,
    path: String,
}

/// Runs `broker verify`: prints the bundle's summary and each file's match as JSON.
pub fn run(args: VerifyArgs) -> anyhow::Result<()> {
    let key = read_verifier_key(&args.verifier_key)?;
    let text = std::fs::read_to_string(&args.bundle)
        .with_context(|| format!("reading {}", args.bundle.display()))?;
    let b: bundle::Bundle =
        serde_json::from_str(&text).context("the bundle is not valid bundle JSON")?;
    let old = args
        .old_checkpoint
        .map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let pb = indicatif::ProgressBar::new(b.entries.len() as u64).with_message("verifying");
    let summary = bundle::verify_bundle_progress(&b, &key, old.as_deref(), &mut || pb.inc(1));
    pb.finish_and_clear();
    let summary = summary?;
    if args.files.is_empty() {
        return print_json(&summary);
    }

    let pb = bytes_bar(total_bytes(&args.files)?, "hashing");
    let mut matches = Vec::new();
    let mut unmatched = Vec::new();
    for f in &args.files {
        let (sha, bytes) = crate::manifest::hash_file_progress(f, &mut |n| pb.inc(n))
            .with_context(|| format!("hashing {}", f.display()))?;
        let mut registered = Vec::new();
        for r in &summary.registrations {
            for t in &r.tables {
                for m in t
                    .files
                    .iter()
                    .filter(|m| m.sha256 == sha && m.bytes == bytes)
                {
                    registered.push(Registered {
                        dataset: r.dataset.to_string(),
                        version: r.version,
                        table: t.name.clone(),
                        path: m.path.clone(),
                    });
                }
            }
        }
        if registered.is_empty() {
            unmatched.push(format!("{} (sha256 {sha})", f.display()));
        }
        matches.push(FileCheck {
            file: f.clone(),
            sha256: sha.to_string(),
            bytes,
            registered,
        });
    }
    pb.finish_and_clear();
    print_json(&serde_json::json!({ "bundle": summary, "files": matches }))?;
    anyhow::ensure!(
        unmatched.is_empty(),
        "the bundle verifies, but these files match no file of any dataset version registered \
         in it (a changed or different copy): {}",
        unmatched.join(", ")
    );
    Ok(())
}
