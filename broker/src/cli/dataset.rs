//! `broker dataset …`: a custodian's dataset tools.
//!
//! `inspect` reads a dataset's Parquet, CSV or Arrow IPC files and proposes its column policy, detecting
//! identifier columns from their names and values. The proposal goes to stdout (or to `--out`),
//! the findings report to stderr; `--json` prints the findings as JSON instead. Nothing it
//! prints carries a record value: findings are counts and patterns.
//!
//! `register` checks the files against the policy, hashes them, signs the `dataset_registered`
//! entry with the custodian's key and streams the files to the broker, which checks them
//! again before it appends the entry. `list` shows the registered versions; `hash` prints what
//! a registration records of local files.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use proto::v1;

use super::conn::{self, Conn};
use crate::client;

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
        /// The tables' files: Parquet (`.parquet`), CSV (`.csv`, with a header row; columns
        /// typed from their values) or Arrow IPC, each as NAME=FILE or FILE (the table named
        /// after the file, without its extension), or directories: DIR (each table file in it
        /// a table named after it, each subdirectory a table of its files) or NAME=DIR.
        /// Several files of one name are one table; several tables make one policy (they must
        /// agree on the privacy unit).
        #[arg(env = "CONSENTRY_INSPECT_FILE", required = true, num_args = 1..)]
        files: Vec<String>,
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
    /// Register a new version of a dataset (the caller is its custodian): checks every file
    /// against the column policy, hashes it, signs the registration and uploads the files.
    /// Prints the entry's index and the version's digest.
    Register {
        /// The dataset id.
        #[arg(long, env = "CONSENTRY_DATASET")]
        dataset: String,
        /// The version to register; without it, one more than the latest registered.
        #[arg(long = "dataset-version", env = "CONSENTRY_DATASET_VERSION")]
        version: Option<u32>,
        /// The column policy (TOML; `broker dataset inspect` proposes one). It names the
        /// privacy-unit column.
        #[arg(long, env = "CONSENTRY_POLICY")]
        policy: PathBuf,
        /// Whether patients opt in (only those who consented are queried) or opt out.
        #[arg(long, env = "CONSENTRY_CONSENT_BASIS", value_enum, default_value_t = Basis::OptIn)]
        basis: Basis,
        /// The tables' files, Parquet, CSV or Arrow IPC: `NAME=FILE`, or `FILE` for a table
        /// named after the file, or directories as `dataset inspect` reads them. Repeat a NAME
        /// to give a table several files (same schema). A CSV file is converted to Parquet
        /// beside it (`visits.csv` → `visits.parquet`), and that file is registered and stored.
        #[arg(
            required = true,
            env = "CONSENTRY_REGISTER_FILES",
            value_delimiter = ','
        )]
        tables: Vec<String>,
    },
    /// List the registered dataset versions: custodian, digest, rows, tables, entry index.
    List,
    /// Print a dataset version's column policy as registered (TOML): each column's class,
    /// bounds, domain and years, and the contribution limits that shape every answer. For the
    /// custodian, the operator, and the members, sponsors and IRBs of studies on the dataset.
    Describe {
        /// The dataset.
        #[arg(long, env = "CONSENTRY_DATASET")]
        dataset: String,
        /// The version (the latest without).
        #[arg(long = "dataset-version", env = "CONSENTRY_DATASET_VERSION")]
        version: Option<u32>,
    },
    /// Print each file's SHA-256, size and rows (JSON), as a dataset registration records
    /// them: compare a local copy with the `sha256` of its file in the registered entry
    /// (`broker verify --file` does that against a study's bundle).
    Hash {
        /// Parquet or Arrow IPC files.
        #[arg(required = true, env = "CONSENTRY_HASH_FILES", value_delimiter = ',')]
        files: Vec<PathBuf>,
    },
}

/// A dataset's consent basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Basis {
    /// Only patients with a consent in effect are queried.
    OptIn,
    /// Every patient is queried unless they revoked.
    OptOut,
}

/// A progress bar over `total` bytes, on stderr.
pub fn bytes_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_owned());
    pb
}

/// Total size of files, for a progress bar.
pub fn total_bytes(files: &[PathBuf]) -> anyhow::Result<u64> {
    files.iter().try_fold(0u64, |n, f| {
        let m = std::fs::metadata(f).with_context(|| format!("reading {}", f.display()))?;
        Ok(n + m.len())
    })
}

/// A table's name and its files as `(path inside the dataset, file on disk)`.
pub type TableFiles = (String, Vec<(String, PathBuf)>);

/// The file names a table's file may have: Parquet, CSV and Arrow IPC.
const TABLE_FILE_EXTENSIONS: [&str; 6] = ["parquet", "csv", "arrow", "arrows", "ipc", "feather"];

fn is_table_file(path: &std::path::Path) -> bool {
    let visible = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.starts_with(['.', '_']));
    visible
        && path.is_file()
        && path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            TABLE_FILE_EXTENSIONS
                .iter()
                .any(|x| x.eq_ignore_ascii_case(e))
        })
}

/// The entries of a directory, sorted by name.
fn sorted_entries(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = std::fs::read_dir(dir)
        .with_context(|| format!("reading the directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the directory {}", dir.display()))?;
    out.sort();
    Ok(out)
}

/// One argument as `(table name, file)` pairs: `NAME=FILE`; `FILE` (named after the file);
/// `NAME=DIR` (every table file in DIR); `DIR` (each table file in it is a table named after
/// it, each subdirectory a table of the files in it). Table files are `.parquet`, `.csv` and
/// Arrow IPC (`.arrow`, `.arrows`, `.ipc`, `.feather`); others, and hidden files or ones
/// starting with `_` (`_SUCCESS`), are passed over.
fn expand_argument(a: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let stem = |f: &std::path::Path| -> anyhow::Result<String> {
        Ok(f.file_stem()
            .and_then(|s| s.to_str())
            .with_context(|| format!("{}: name the table, as NAME=FILE", f.display()))?
            .to_owned())
    };
    let (name, path) = match a.split_once('=') {
        Some((n, f)) => (Some(n.to_owned()), PathBuf::from(f)),
        None => (None, PathBuf::from(a)),
    };
    if !path.is_dir() {
        let name = match name {
            Some(n) => n,
            None => stem(&path)?,
        };
        return Ok(vec![(name, path)]);
    }
    let mut out = Vec::new();
    for entry in sorted_entries(&path)? {
        if is_table_file(&entry) {
            let table = match &name {
                Some(n) => n.clone(),
                None => stem(&entry)?,
            };
            out.push((table, entry));
        } else if name.is_none() && entry.is_dir() {
            let table = entry
                .file_name()
                .and_then(|s| s.to_str())
                .with_context(|| format!("{}: not a table name", entry.display()))?
                .to_owned();
            for f in sorted_entries(&entry)? {
                if is_table_file(&f) {
                    out.push((table.clone(), f));
                }
            }
        }
    }
    anyhow::ensure!(
        !out.is_empty(),
        "{} holds no table file ({})",
        path.display(),
        TABLE_FILE_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
    );
    Ok(out)
}

/// `NAME=FILE`, `FILE`, `NAME=DIR` or `DIR` arguments (see [`expand_argument`]) grouped by
/// table, in order of first mention, each file with its path inside the dataset
/// (`NAME/<file name>`).
pub fn group_tables(args: &[String]) -> anyhow::Result<Vec<TableFiles>> {
    let mut out: Vec<TableFiles> = Vec::new();
    for (name, file) in args
        .iter()
        .map(|a| expand_argument(a))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
    {
        let file_name = file
            .file_name()
            .and_then(|s| s.to_str())
            .with_context(|| format!("{}: not a file name", file.display()))?;
        let rel = format!("{name}/{file_name}");
        crate::manifest::check_path(&rel).map_err(anyhow::Error::msg)?;
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, files)) => {
                if files.iter().any(|(r, _)| *r == rel) {
                    bail!("table {name} has two files named {file_name}");
                }
                files.push((rel, file));
            }
            None => out.push((name, vec![(rel, file)])),
        }
    }
    Ok(out)
}

/// Each CSV file of `tables`, once its columns pass the policy, converted to Parquet beside it
/// ([`crate::manifest::parquet_beside`]), the Parquet file taking its place (and its path
/// inside the dataset); each conversion is said on stderr.
fn converted(
    tables: Vec<TableFiles>,
    policy: &anonymizer::policy::Policy,
) -> anyhow::Result<Vec<TableFiles>> {
    let mut out = Vec::with_capacity(tables.len());
    for (name, files) in tables {
        let mut kept = Vec::with_capacity(files.len());
        for (rel, f) in files {
            let file = if anonymizer::files::is_csv(&f) {
                let (schema, batches) = anonymizer::files::read_batches(&f)?;
                policy
                    .check_schema(&name, &schema)
                    .with_context(|| format!("{} (table {name})", f.display()))?;
                let parquet = crate::manifest::parquet_beside(&f, schema, &batches)?;
                eprintln!(
                    "{} converted to {} (the file registered and stored)",
                    f.display(),
                    parquet.display()
                );
                let rel = std::path::Path::new(&rel)
                    .with_extension("parquet")
                    .to_string_lossy()
                    .into_owned();
                (rel, parquet)
            } else {
                (rel, f)
            };
            // A directory holding a CSV file and its conversion names that file twice.
            if !kept.contains(&file) {
                kept.push(file);
            }
        }
        out.push((name, kept));
    }
    Ok(out)
}

/// Runs a dataset command.
pub fn run(conn: &Conn, args: DatasetArgs) -> anyhow::Result<()> {
    match args.command {
        DatasetCommand::Register {
            dataset,
            version,
            policy,
            basis,
            tables,
        } => register(conn, &dataset, version, &policy, basis, &tables),
        DatasetCommand::List => conn::block_on(async move {
            let (_, ch) = conn.channel().await?;
            let r = v1::registry_client::RegistryClient::new(ch)
                .list_datasets(v1::ListDatasetsRequest {})
                .await
                .map_err(conn::status)?
                .into_inner();
            let out: Vec<serde_json::Value> = r
                .datasets
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "dataset": d.dataset, "version": d.version, "custodian": d.custodian,
                        "digest": d.digest, "consent_basis": d.consent_basis, "rows": d.rows,
                        "tables": d.tables, "entry_index": d.entry_index,
                    })
                })
                .collect();
            conn::print_json(&out)
        }),
        DatasetCommand::Describe { dataset, version } => conn::block_on(async move {
            let (_, ch) = conn.channel().await?;
            let p = v1::registry_client::RegistryClient::new(ch)
                .describe_dataset(v1::DescribeDatasetRequest {
                    dataset,
                    version: version.unwrap_or(0),
                })
                .await
                .map_err(conn::status)?
                .into_inner();
            println!(
                "# dataset {} version {} (policy SHA-256 {})",
                p.dataset, p.version, p.policy_digest
            );
            print!("{}", p.policy_toml);
            Ok(())
        }),
        DatasetCommand::Hash { files } => {
            let pb = bytes_bar(total_bytes(&files)?, "hashing");
            let mut out = Vec::new();
            for f in &files {
                let (digest, bytes) = crate::manifest::hash_file_progress(f, &mut |n| pb.inc(n))
                    .with_context(|| format!("hashing {}", f.display()))?;
                let (rows, _) = crate::manifest::file_shape(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                out.push(serde_json::json!({
                    "file": f, "sha256": digest.to_string(), "bytes": bytes, "rows": rows,
                }));
            }
            pb.finish_and_clear();
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        DatasetCommand::Inspect {
            files,
            out,
            sample,
            json,
        } => {
            if sample == 0 {
                bail!("--sample must be at least 1");
            }
            let opts = anonymizer::inspect::Options { sample };
            let tables: Vec<(String, Vec<PathBuf>)> = group_tables(&files)?
                .into_iter()
                .map(|(name, fs)| (name, fs.into_iter().map(|(_, f)| f).collect()))
                .collect();
            let proposals = anonymizer::inspect::inspect_tables(&tables, &opts)?;
            let policy_toml = anonymizer::inspect::merged_policy(&proposals)?;
            if let Some(path) = &out {
                let mut f = super::conn::create_new(path)?;
                f.write_all(policy_toml.as_bytes())?;
                f.sync_all()?;
            }
            if json {
                let doc = match proposals.as_slice() {
                    [one] => serde_json::to_value(one)?,
                    many => serde_json::json!({ "tables": many, "policy_toml": policy_toml }),
                };
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(());
            }
            if out.is_none() {
                print!("{policy_toml}");
            }
            for p in &proposals {
                eprint!("{}", p.report());
            }
            if let Some(path) = &out {
                eprintln!("proposed policy written to {}", path.display());
            }
            Ok(())
        }
    }
}

fn register(
    conn: &Conn,
    dataset: &str,
    version: Option<u32>,
    policy_path: &std::path::Path,
    basis: Basis,
    table_args: &[String],
) -> anyhow::Result<()> {
    let policy_toml = std::fs::read_to_string(policy_path)
        .with_context(|| format!("reading the policy {}", policy_path.display()))?;
    let policy = anonymizer::policy::Policy::from_toml(&policy_toml)
        .with_context(|| format!("the policy {}", policy_path.display()))?;
    let tables = converted(group_tables(table_args)?, &policy)?;
    // Refuse locally, before hashing or uploading, what the broker would refuse.
    for (name, files) in &tables {
        for (_, f) in files {
            let (_, schema) = crate::manifest::file_shape(f)
                .with_context(|| format!("reading {}", f.display()))?;
            policy
                .check_schema(name, &schema)
                .with_context(|| format!("{} (table {name})", f.display()))?;
        }
    }
    let files: Vec<PathBuf> = tables
        .iter()
        .flat_map(|(_, fs)| fs.iter().map(|(_, f)| f.clone()))
        .collect();
    let total = total_bytes(&files)?;
    let key = conn.signer()?;
    let basis = match basis {
        Basis::OptIn => ledger::entry::ConsentBasis::OptIn,
        Basis::OptOut => ledger::entry::ConsentBasis::OptOut,
    };
    conn::block_on(async move {
        let (_, ch) = conn.channel().await?;
        let mut registry = v1::registry_client::RegistryClient::new(ch)
            .max_encoding_message_size(crate::server::MAX_MESSAGE);
        let version = match version {
            Some(v) => v,
            None => {
                let listed = registry
                    .list_datasets(v1::ListDatasetsRequest {})
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                let latest = listed
                    .datasets
                    .iter()
                    .filter(|d| d.dataset == dataset)
                    .map(|d| d.version)
                    .max();
                latest.map_or(Ok(1), |v| {
                    v.checked_add(1).context("the dataset has no next version")
                })?
            }
        };
        let spec = client::DatasetSpec {
            custodian: key.name(),
            dataset,
            version,
            basis,
            privacy_unit: &policy.privacy_unit,
            policy_toml: &policy_toml,
        };
        let refs: Vec<(&str, Vec<(String, &std::path::Path)>)> = tables
            .iter()
            .map(|(n, fs)| {
                let fs = fs.iter().map(|(r, f)| (r.clone(), f.as_path())).collect();
                (n.as_str(), fs)
            })
            .collect();
        let pb = bytes_bar(total, "hashing");
        let reg = spec.body(&refs, &mut |n| pb.inc(n))?;
        pb.finish_and_clear();
        let digest = reg.digest.to_string();
        let rows = reg.rows();
        let pb = bytes_bar(total, "uploading");
        let bar = pb.clone();
        let upload = client::Upload::new(
            &key,
            reg,
            &policy_toml,
            tables.into_iter().flat_map(|(_, fs)| fs).collect(),
        )?
        .with_progress(move |n| bar.inc(n));
        let read_error = upload.read_error();
        let result = registry.register_dataset(tokio_stream::iter(upload)).await;
        pb.finish_and_clear();
        read_error.check()?;
        let appended = result.map_err(conn::status)?.into_inner();
        conn::print_json(&serde_json::json!({
            "dataset": dataset,
            "version": version,
            "digest": digest,
            "rows": rows,
            "index": appended.index,
            "leaf_hash": appended.leaf_hash,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_arguments_group_by_name() {
        let args: Vec<String> = ["a/visits.parquet", "p=x/one.parquet", "p=y/two.parquet"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let g = group_tables(&args).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].0, "visits");
        assert_eq!(g[0].1[0].0, "visits/visits.parquet");
        assert_eq!(g[1].0, "p");
        let rels: Vec<&str> = g[1].1.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(rels, ["p/one.parquet", "p/two.parquet"]);
    }

    #[test]
    fn bad_table_arguments_are_refused() {
        let dup = vec!["p=x/one.parquet".to_string(), "p=y/one.parquet".to_string()];
        assert!(
            group_tables(&dup)
                .unwrap_err()
                .to_string()
                .contains("two files")
        );
        assert!(group_tables(&["../x=a.parquet".to_string()]).is_err());
        assert!(group_tables(&["t=".to_string()]).is_err());
    }
}
