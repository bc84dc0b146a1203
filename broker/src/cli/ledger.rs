//! `broker ledger …`: the ledger from the command line.
//!
//! These commands open the ledger under `<data-dir>/ledger` directly (they take its lock, so
//! they cannot run while a broker serves the same data directory). Machine-readable results go
//! to stdout as JSON or text; messages and progress go to stderr.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ledger::entry::{Entry, SignedEntry};
use ledger::ids::{PrincipalId, Timestamp};
use ledger::note::SignerKey;
use ledger::{Config, Ledger, bundle, keyfile};
use serde_json::json;

/// Arguments of `broker ledger`.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// The data directory; the ledger lives in its `ledger/` subdirectory.
    #[arg(
        long,
        env = "CONSENTRY_DATA_DIR",
        default_value = "consentry-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// The ledger command.
    #[command(subcommand)]
    pub command: LedgerCommand,
}

/// Ledger commands.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Create a ledger: its signing key (`ledger/ledger.key`, mode 0600) and the genesis entry
    /// registering the operator. Prints the ledger's verifier key.
    Init {
        /// The checkpoint origin: a name for this log, e.g. `consentry.example.org/ledger`.
        #[arg(long, env = "CONSENTRY_ORIGIN")]
        origin: String,
        /// The operator's principal id, which is also the ledger key's name.
        #[arg(long, env = "CONSENTRY_OPERATOR", default_value = "operator")]
        operator: String,
    },
    /// Print the ledger's verifier key (what sponsors and witnesses need to check it).
    VerifierKey,
    /// Generate a principal's Ed25519 key: writes the private key to FILE (mode 0600, never
    /// overwritten) and prints the verifier key to register.
    Keygen {
        /// The principal id, which is the key's name.
        #[arg(long, env = "CONSENTRY_KEY_NAME")]
        name: String,
        /// Where to write the private key.
        #[arg(long, env = "CONSENTRY_KEY_OUT")]
        out: PathBuf,
    },
    /// Sign an entry with the author's key and append it; prints its index and leaf hash.
    ///
    /// The entry file holds `{"kind": KIND, "body": {...}}` (see the README for every kind);
    /// `author` defaults to the key's name and `time` to now. Use `-` to read stdin.
    Append {
        /// The entry JSON file, or `-` for stdin.
        #[arg(long, env = "CONSENTRY_ENTRY")]
        entry: PathBuf,
    },
    /// Print the latest signed checkpoint (signing a new one if the log grew).
    Checkpoint,
    /// As a witness: cosign the latest checkpoint with the witness's key and append the
    /// cosignature to the ledger. Prints the cosigned checkpoint.
    Cosign,
    /// Print an entry as JSON: the decoded entry and `leaf_b64`, the exact leaf bytes.
    Entry {
        /// The entry's index.
        #[arg(long, env = "CONSENTRY_INDEX")]
        index: u64,
    },
    /// Print an RFC 9162 inclusion proof of an entry as JSON.
    ProveInclusion {
        /// The entry's index.
        #[arg(long, env = "CONSENTRY_INDEX")]
        index: u64,
        /// The tree size to prove against (default: the current size).
        #[arg(long, env = "CONSENTRY_TREE_SIZE")]
        size: Option<u64>,
    },
    /// Print an RFC 9162 consistency proof between two tree sizes as JSON.
    ProveConsistency {
        /// The older tree size (at least 1).
        #[arg(long, env = "CONSENTRY_OLD_SIZE")]
        old: u64,
        /// The newer tree size (default: the current size).
        #[arg(long, env = "CONSENTRY_NEW_SIZE")]
        new: Option<u64>,
    },
    /// Verify the whole ledger from its files: every record, canonical encoding, author
    /// signature, stored node hash and checkpoint. Exits non-zero naming the first bad entry.
    Verify,
    /// Write a study's evidence bundle (JSON) for offline verification by its sponsor.
    Bundle {
        /// The study.
        #[arg(long, env = "CONSENTRY_STUDY")]
        study: String,
        /// Also prove consistency from this older tree size (repeatable), e.g. the size of a
        /// checkpoint the sponsor kept.
        #[arg(long, env = "CONSENTRY_CONSISTENCY_FROM", value_delimiter = ',')]
        consistency_from: Vec<u64>,
        /// Output file (default: stdout).
        #[arg(long, env = "CONSENTRY_OUT")]
        out: Option<PathBuf>,
    },
    /// Verify a study's evidence bundle offline, with only the ledger's verifier key (the
    /// same as `broker verify`; --file also checks local dataset files).
    VerifyBundle(super::verify::VerifyArgs),
}

fn ledger_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger")
}

fn open(data_dir: &Path) -> anyhow::Result<Ledger> {
    let dir = ledger_dir(data_dir);
    let (ledger, report) = Ledger::open(&dir, Config::default())
        .with_context(|| format!("opening the ledger in {}", dir.display()))?;
    if report.truncated_bytes > 0 {
        eprintln!(
            "note: cut {} bytes of a torn tail left by a crash (no acknowledged entry lost)",
            report.truncated_bytes
        );
    }
    Ok(ledger)
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} entries ({per_sec}, {eta})")
            .expect("the template is valid"),
    );
    bar.set_message(what.to_string());
    bar
}

/// Reads an entry file, filling `author` (the key's name) and `time` (now) when absent.
fn read_entry(path: &Path, key: &SignerKey) -> anyhow::Result<Entry> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&text).context("the entry file is not JSON")?;
    let obj = v
        .as_object_mut()
        .context("the entry must be a JSON object with kind and body")?;
    obj.entry("v")
        .or_insert(json!(ledger::entry::FORMAT_VERSION));
    obj.entry("author").or_insert(json!(key.name()));
    obj.entry("time")
        .or_insert(json!(Timestamp::now().to_string()));
    fill_dataset_digest(obj)?;
    let entry = Entry::from_json(&serde_json::to_vec(&v)?)?;
    if entry.author.as_str() != key.name() {
        bail!(
            "the entry's author {} is not the key's name {}",
            entry.author,
            key.name()
        );
    }
    Ok(entry)
}

/// A `dataset_registered` body without `digest` gets the digest of its table manifests, so
/// custodians need not compute it by hand; a given digest is checked by the ledger.
fn fill_dataset_digest(obj: &mut serde_json::Map<String, serde_json::Value>) -> anyhow::Result<()> {
    if obj.get("kind").and_then(|k| k.as_str()) != Some("dataset_registered") {
        return Ok(());
    }
    let Some(body) = obj.get_mut("body").and_then(|b| b.as_object_mut()) else {
        return Ok(());
    };
    if body.contains_key("digest") {
        return Ok(());
    }
    let tables: Vec<ledger::entry::TableManifest> =
        serde_json::from_value(body.get("tables").cloned().unwrap_or_default())
            .context("dataset_registered: bad tables")?;
    let digest = ledger::entry::DatasetRegistered::compute_digest(&tables);
    body.insert("digest".into(), json!(digest.to_string()));
    Ok(())
}

/// Runs `broker ledger …`.
pub fn run(conn: &super::conn::Conn, args: LedgerArgs) -> anyhow::Result<()> {
    let data_dir = &args.data_dir;
    match args.command {
        LedgerCommand::Init { origin, operator } => {
            let operator = PrincipalId::new(operator)?;
            let dir = ledger_dir(data_dir);
            let ledger = Ledger::init(&dir, &origin, &operator, Config::default())
                .with_context(|| format!("creating the ledger in {}", dir.display()))?;
            eprintln!(
                "created the ledger {origin} in {}; its verifier key:",
                dir.display()
            );
            println!("{}", ledger.verifier_key());
            ledger.close()?;
        }
        LedgerCommand::VerifierKey => {
            println!("{}", open(data_dir)?.verifier_key());
        }
        LedgerCommand::Keygen { name, out } => {
            let name = PrincipalId::new(name)?;
            let key = SignerKey::generate(name.as_str())?;
            keyfile::write_private_key(&out, &key)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", key.verifier());
        }
        LedgerCommand::Append { entry } => {
            let key = conn.signer()?;
            let entry = read_entry(&entry, &key)?;
            let ledger = open(data_dir)?;
            let appended = ledger.append(SignedEntry::sign(&key, entry))?;
            print_json(&json!({
                "index": appended.index,
                "leaf_hash": B64.encode(appended.leaf_hash),
            }))?;
            ledger.close()?;
        }
        LedgerCommand::Checkpoint => {
            print!("{}", open(data_dir)?.checkpoint()?);
        }
        LedgerCommand::Cosign => {
            let key = conn.signer()?;
            let ledger = open(data_dir)?;
            let checkpoint = ledger.checkpoint()?;
            let (text, _) = ledger::note::signatures(&checkpoint)?;
            let cosigned = key.sign_note(&text)?;
            let line = cosigned
                .lines()
                .last()
                .context("a signed note has a signature line")?;
            let both = format!("{checkpoint}{line}\n");
            let entry = Entry {
                author: PrincipalId::new(key.name())?,
                time: Timestamp::now(),
                body: ledger::entry::Body::CheckpointCosigned(ledger::entry::CheckpointCosigned {
                    checkpoint: both.clone(),
                }),
            };
            ledger.append(SignedEntry::sign(&key, entry))?;
            print!("{both}");
            ledger.close()?;
        }
        LedgerCommand::Entry { index } => {
            let ledger = open(data_dir)?;
            let leaf = ledger.leaf(index)?;
            let signed = SignedEntry::from_leaf(&leaf, false)?;
            print_json(&json!({
                "index": index,
                "entry": signed.entry.to_value(),
                "sig": B64.encode(signed.sig),
                "leaf_b64": B64.encode(&leaf),
                "leaf_hash": B64.encode(ledger::merkle::leaf_hash(&leaf)),
            }))?;
        }
        LedgerCommand::ProveInclusion { index, size } => {
            let ledger = open(data_dir)?;
            let size = size.unwrap_or_else(|| ledger.size());
            let proof = ledger.inclusion_proof(index, Some(size))?;
            print_json(&json!({
                "leaf_index": index,
                "tree_size": size,
                "leaf_hash": B64.encode(ledger.leaf_hash(index)?),
                "root": B64.encode(ledger.root(size)?),
                "hashes": ledger::merkle::base64_hashes(&proof),
            }))?;
        }
        LedgerCommand::ProveConsistency { old, new } => {
            let ledger = open(data_dir)?;
            let new = new.unwrap_or_else(|| ledger.size());
            let proof = ledger.consistency_proof(old, Some(new))?;
            print_json(&json!({
                "old_size": old,
                "new_size": new,
                "old_root": B64.encode(ledger.root(old)?),
                "new_root": B64.encode(ledger.root(new)?),
                "hashes": ledger::merkle::base64_hashes(&proof),
            }))?;
        }
        LedgerCommand::Verify => {
            let dir = ledger_dir(data_dir);
            let bar = progress_bar(0, "verifying");
            let progress = |done: u64, total: u64| {
                bar.set_length(total);
                bar.set_position(done);
            };
            let result = ledger::verify(&dir, &progress);
            bar.finish_and_clear();
            let report = result.context("the ledger does not verify")?;
            print_json(&serde_json::to_value(&report)?)?;
        }
        LedgerCommand::Bundle {
            study,
            consistency_from,
            out,
        } => {
            let ledger = open(data_dir)?;
            let b = bundle::make_bundle(&ledger, &study, &consistency_from)?;
            let text = serde_json::to_string_pretty(&b)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "wrote {} entries of study {study} to {}",
                        b.entries.len(),
                        path.display()
                    );
                }
                None => println!("{text}"),
            }
        }
        LedgerCommand::VerifyBundle(args) => super::verify::run(args)?,
    }
    Ok(())
}
