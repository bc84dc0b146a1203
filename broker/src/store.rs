//! The dataset store under the data directory, and the query engines loaded from it.
//!
//! Layout: `<data-dir>/datasets/<dataset>/<version>/` holds `policy.toml` and the version's
//! files at their manifest paths. An upload is written to a hidden sibling directory
//! (`.upload-<version>-<nonce>`), checked (sizes, SHA-256, policy, schemas, rows) and fsynced;
//! its entry is appended; only then is it renamed into place, so a registration refused by the
//! ledger (a concurrent one of the same version won) never touches the version's files. A
//! version directory whose entry is not on the ledger is a leftover of a crash and is replaced
//! by the next registration of that version; a version on the ledger whose directory is missing
//! (a crash between the append and the rename) is recovered from its staged upload when it
//! loads.
//!
//! Engines are loaded once per version, after every file's SHA-256 is checked against the
//! ledger again (fail closed: a changed file refuses the query).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Error;
use anonymizer::dataset::TableSource;
use anonymizer::{Dataset, Engine, Policy};
use ledger::entry::DatasetRegistered;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

use crate::manifest;

/// Datasets on disk and their engines.
pub struct Store {
    root: PathBuf,
    kept: crate::kept::Kept,
    engines: tokio::sync::Mutex<HashMap<(String, u32), Arc<Engine>>>,
    limits: anonymizer::Limits,
}

impl Store {
    /// Opens (creating) `<data_dir>/datasets`; engines run their queries within `limits`.
    pub fn open(data_dir: &Path, limits: anonymizer::Limits) -> Result<Store, Error> {
        let root = data_dir.join("datasets");
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::internal("creating the datasets directory", e))?;
        Ok(Store {
            root,
            kept: crate::kept::Kept::open(data_dir)?,
            engines: Default::default(),
            limits,
        })
    }

    fn version_dir(&self, dataset: &str, version: u32) -> PathBuf {
        self.root.join(dataset).join(version.to_string())
    }

    /// A stored version's policy file, checked against its registration's digest. Blocking.
    pub fn policy_text(&self, reg: &DatasetRegistered) -> Result<String, Error> {
        let path = self
            .version_dir(reg.dataset.as_str(), reg.version)
            .join("policy.toml");
        let bytes =
            std::fs::read(&path).map_err(|e| Error::internal("reading a dataset's policy", e))?;
        if ledger::ids::Digest::of(&bytes) != reg.policy_digest {
            return Err(Error::data_loss(format!(
                "the stored policy of {} v{} no longer matches its registration",
                reg.dataset, reg.version
            )));
        }
        String::from_utf8(bytes).map_err(|e| Error::internal("reading a dataset's policy", e))
    }

    /// Released answers kept for free repeats across restarts.
    pub fn kept(&self) -> &crate::kept::Kept {
        &self.kept
    }

    /// The engine of a registered version, loading (and checking) it on first use, with the
    /// releases kept for it that `ledger` confirms.
    pub async fn engine(
        &self,
        reg: &DatasetRegistered,
        ledger: &Arc<ledger::Ledger>,
    ) -> Result<Arc<Engine>, Error> {
        let key = (reg.dataset.to_string(), reg.version);
        let mut engines = self.engines.lock().await;
        if let Some(e) = engines.get(&key) {
            return Ok(e.clone());
        }
        let dir = self.version_dir(&key.0, key.1);
        let reg2 = reg.clone();
        let dir2 = dir.clone();
        tokio::task::spawn_blocking(move || {
            if !dir2.exists() {
                recover_staged(&dir2, &reg2)?;
            }
            check_files(&dir2, &reg2)
        })
        .await
        .map_err(|e| Error::internal("a dataset check failed", e))??;
        let dataset = load(&dir, reg).await?;
        let engine = Arc::new(
            Engine::with_limits(dataset, self.limits)
                .map_err(|e| Error::internal("loading", e))?
                .with_kept(self.kept.of_version(reg, ledger)),
        );
        engines.insert(key, engine.clone());
        Ok(engine)
    }

    /// Receives an upload into a staging directory. Call [`Upload::write`] for each chunk,
    /// then [`Upload::finish`].
    pub async fn begin_upload(
        &self,
        reg: &DatasetRegistered,
        policy_toml: &str,
    ) -> Result<Upload, Error> {
        let digest = ledger::ids::Digest::from_bytes(sha2::Sha256::digest(policy_toml).into());
        if digest != reg.policy_digest {
            return Err(Error::invalid(format!(
                "the policy's SHA-256 is {digest}, but the entry's policy_digest is {}",
                reg.policy_digest
            )));
        }
        Policy::from_toml(policy_toml)
            .and_then(|p| p.check().map(|()| p))
            .map_err(|e| Error::invalid(format!("policy.toml: {e}")))?;
        let mut expected = HashMap::new();
        for t in &reg.tables {
            for f in &t.files {
                manifest::check_path(&f.path).map_err(Error::invalid)?;
                if expected
                    .insert(f.path.clone(), (f.bytes, f.sha256.clone()))
                    .is_some()
                {
                    return Err(Error::invalid(format!("file {} is listed twice", f.path)));
                }
            }
        }
        let parent = self.root.join(reg.dataset.as_str());
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(|e| Error::internal("creating the dataset directory", e))?;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| Error::internal("randomness", e))?;
        let staging = parent.join(format!(
            ".upload-{}-{}",
            reg.version,
            u64::from_le_bytes(nonce)
        ));
        tokio::fs::create_dir(&staging)
            .await
            .map_err(|e| Error::internal("creating the staging directory", e))?;
        tokio::fs::write(staging.join("policy.toml"), policy_toml)
            .await
            .map_err(|e| Error::internal("writing the policy", e))?;
        Ok(Upload {
            staging: Some(staging),
            target: self.version_dir(reg.dataset.as_str(), reg.version),
            expected,
            open: None,
            done: HashSet::new(),
        })
    }

    /// Keeps a loaded engine (after a successful registration).
    pub async fn insert_engine(&self, reg: &DatasetRegistered, engine: Arc<Engine>) {
        self.engines
            .lock()
            .await
            .insert((reg.dataset.to_string(), reg.version), engine);
    }
}

/// Reads every table of a version directory through the anonymizer (every column checked
/// against the policy, units numbered, contributions bounded).
async fn load(dir: &Path, reg: &DatasetRegistered) -> Result<Dataset, Error> {
    let policy_text = tokio::fs::read_to_string(dir.join("policy.toml"))
        .await
        .map_err(|e| Error::internal("reading the policy", e))?;
    let policy = Policy::from_toml(&policy_text).map_err(|e| Error::invalid(e.to_string()))?;
    let sources: Vec<TableSource> = reg
        .tables
        .iter()
        .map(|t| TableSource {
            name: t.name.clone(),
            files: t.files.iter().map(|f| dir.join(&f.path)).collect(),
        })
        .collect();
    Dataset::load(policy, &sources)
        .await
        .map_err(|e| Error::invalid(format!("dataset {}: {e}", reg.dataset)))
}

/// Checks, without changing anything, the files of a registered version under `data_dir`
/// against its registration: `Ok(true)` in place, `Ok(false)` missing but staged (moved into
/// place when the version loads), an error naming what differs or is lost.
pub fn check_version(data_dir: &Path, reg: &DatasetRegistered) -> Result<bool, Error> {
    let dir = data_dir
        .join("datasets")
        .join(reg.dataset.as_str())
        .join(reg.version.to_string());
    if dir.exists() {
        return check_files(&dir, reg).map(|()| true);
    }
    staged_upload(&dir, reg)
        .map(|_| false)
        .ok_or_else(|| lost(reg))
}

/// Checks every file of a stored version against its registration.
fn check_files(dir: &Path, reg: &DatasetRegistered) -> Result<(), Error> {
    let (policy, _) = manifest::hash_file(&dir.join("policy.toml"))
        .map_err(|e| Error::internal("reading a dataset's policy", e))?;
    if policy != reg.policy_digest {
        return Err(Error::data_loss(format!(
            "the stored policy of {} v{} no longer matches its registration",
            reg.dataset, reg.version
        )));
    }
    for t in &reg.tables {
        for f in &t.files {
            let (sha, bytes) = manifest::hash_file(&dir.join(&f.path))
                .map_err(|e| Error::internal("reading a dataset file", e))?;
            if sha != f.sha256 || bytes != f.bytes {
                return Err(Error::data_loss(format!(
                    "file {} of {} v{} no longer matches its registered digest",
                    f.path, reg.dataset, reg.version
                )));
            }
        }
    }
    Ok(())
}

struct OpenFile {
    path: String,
    file: tokio::fs::File,
    hash: sha2::Sha256,
    bytes: u64,
}

/// An upload in progress. Dropped without [`Upload::finish`], it removes its staging
/// directory.
pub struct Upload {
    staging: Option<PathBuf>,
    target: PathBuf,
    expected: HashMap<String, (u64, ledger::ids::Digest)>,
    open: Option<OpenFile>,
    done: HashSet<String>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(s) = self.staging.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

impl Upload {
    fn staging(&self) -> &Path {
        self.staging.as_deref().unwrap_or(Path::new("."))
    }

    async fn close_open(&mut self) -> Result<(), Error> {
        let Some(mut o) = self.open.take() else {
            return Ok(());
        };
        o.file
            .sync_all()
            .await
            .map_err(|e| Error::internal("writing a dataset file", e))?;
        let (bytes, sha) = &self.expected[&o.path];
        let got = ledger::ids::Digest::from_bytes(std::mem::take(&mut o.hash).finalize().into());
        if o.bytes != *bytes || got != *sha {
            return Err(Error::invalid(format!(
                "file {}: received {} bytes with SHA-256 {got}; the entry says {bytes} bytes \
                 with {sha}",
                o.path, o.bytes
            )));
        }
        self.done.insert(o.path);
        Ok(())
    }

    /// Appends a chunk of the file at `path` (files are sent one after the other).
    pub async fn write(&mut self, path: &str, data: &[u8]) -> Result<(), Error> {
        if self.open.as_ref().is_none_or(|o| o.path != path) {
            self.close_open().await?;
            if !self.expected.contains_key(path) {
                return Err(Error::invalid(format!(
                    "file {path:?} is not in the entry's manifest"
                )));
            }
            if self.done.contains(path) {
                return Err(Error::invalid(format!(
                    "file {path} was already sent; send each file's chunks together"
                )));
            }
            let full = self.staging().join(path);
            if let Some(parent) = full.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| Error::internal("creating a dataset directory", e))?;
            }
            let file = tokio::fs::File::create(&full)
                .await
                .map_err(|e| Error::internal("creating a dataset file", e))?;
            self.open = Some(OpenFile {
                path: path.to_owned(),
                file,
                hash: sha2::Sha256::new(),
                bytes: 0,
            });
        }
        let limit = self.expected[path].0;
        let o = self
            .open
            .as_mut()
            .ok_or_else(|| Error::internal("no open file", "write before open"))?;
        o.bytes += data.len() as u64;
        if o.bytes > limit {
            return Err(Error::invalid(format!(
                "file {path} is longer than the {limit} bytes its manifest says"
            )));
        }
        o.hash.update(data);
        o.file
            .write_all(data)
            .await
            .map_err(|e| Error::internal("writing a dataset file", e))
    }

    /// Checks that every file arrived whole and loads the version through the anonymizer to
    /// check it against the policy and the manifest; the files stay staged, synced, until
    /// [`Staged::place`] (after the entry is appended).
    pub async fn finish(mut self, reg: &DatasetRegistered) -> Result<(Dataset, Staged), Error> {
        self.close_open().await?;
        if let Some(missing) = self.expected.keys().find(|p| !self.done.contains(*p)) {
            return Err(Error::invalid(format!(
                "file {missing} of the manifest was not sent"
            )));
        }
        let staging = self.staging().to_owned();
        for t in &reg.tables {
            let first = t
                .files
                .first()
                .ok_or_else(|| Error::invalid(format!("table {} has no files", t.name)))?;
            let path = staging.join(&first.path);
            let (_, schema) = tokio::task::spawn_blocking(move || manifest::file_shape(&path))
                .await
                .map_err(|e| Error::internal("reading a dataset file", e))?
                .map_err(|e| Error::invalid(format!("{e:#}")))?;
            if manifest::columns_of(&schema) != t.columns {
                return Err(Error::invalid(format!(
                    "table {}: the files' schema differs from the entry's columns",
                    t.name
                )));
            }
            let mut rows = 0;
            for f in &t.files {
                let path = staging.join(&f.path);
                let (n, _) = tokio::task::spawn_blocking(move || manifest::file_shape(&path))
                    .await
                    .map_err(|e| Error::internal("reading a dataset file", e))?
                    .map_err(|e| Error::invalid(format!("{e:#}")))?;
                if n != f.rows {
                    return Err(Error::invalid(format!(
                        "file {} has {n} rows; the entry says {}",
                        f.path, f.rows
                    )));
                }
                rows += n;
            }
            if rows != t.rows {
                return Err(Error::invalid(format!(
                    "table {} has {rows} rows; the entry says {}",
                    t.name, t.rows
                )));
            }
        }
        let dataset = load(&staging, reg).await?;
        // Two declarations registration checks on the data (counts only, never values): a
        // domain is the whole set of a column's values (rows outside it would silently drop
        // out of every GROUP BY over it); a `per_unit` column holds one value per patient (a
        // patient with two would lose its rows past its first group in every query over it).
        for t in &dataset.tables {
            let fails =
                |e: anonymizer::Error| Error::invalid(format!("dataset {}: {e}", reg.dataset));
            let outside = t.outside_domains(&dataset.policy).map_err(fails)?;
            if let Some((column, rows)) = outside.iter().find(|(_, rows)| *rows > 0) {
                return Err(Error::invalid(format!(
                    "table {}, column {column}: {rows} row(s) hold a value outside the column's \
                     domain; add the value(s) to the domain in policy.toml, or remove the \
                     domain to have keys chosen by partition selection",
                    t.name
                )));
            }
            let varying = t.varying_per_unit(&dataset.policy).map_err(fails)?;
            if let Some((column, units)) = varying.iter().find(|(_, units)| *units > 0) {
                return Err(Error::invalid(format!(
                    "table {}, column {column}: {units} patient(s) hold more than one value in \
                     it, but the policy declares it per_unit (one value per patient); remove \
                     per_unit from the column in policy.toml",
                    t.name
                )));
            }
        }
        // Durable before it is referenced: files were synced on close; now the directory and
        // its parent (which names it, for a recovery after a crash).
        sync_dir(&staging).await?;
        if let Some(parent) = staging.parent() {
            sync_dir(parent).await?;
        }
        Ok((
            dataset,
            Staged {
                staging: self.staging.take(),
                target: self.target.clone(),
            },
        ))
    }
}

/// A checked, durable upload waiting for its entry; dropped without [`Staged::place`] (the
/// append was refused), it is removed and the version's directory is never touched.
pub struct Staged {
    staging: Option<PathBuf>,
    target: PathBuf,
}

impl Staged {
    /// The entry is on the ledger: moves the files into place. A directory already there is
    /// a leftover of a registration whose entry never reached the ledger (the ledger took this
    /// version's entry, so no other registration of it exists) and is replaced.
    pub async fn place(mut self) -> Result<(), Error> {
        let Some(staging) = self.staging.take() else {
            return Ok(());
        };
        if tokio::fs::metadata(&self.target).await.is_ok() {
            tokio::fs::remove_dir_all(&self.target)
                .await
                .map_err(|e| Error::internal("removing a stale upload", e))?;
        }
        tokio::fs::rename(&staging, &self.target)
            .await
            .map_err(|e| Error::internal("moving the upload into place", e))?;
        if let Some(parent) = self.target.parent() {
            sync_dir(parent).await?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(s) = self.staging.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

/// A registered version whose directory is missing: the broker stopped between its entry's
/// append and the rename. Moves the staged upload whose files match the registration into
/// place; with none, the files are lost (`DATA_LOSS`).
fn recover_staged(dir: &Path, reg: &DatasetRegistered) -> Result<(), Error> {
    let staged = staged_upload(dir, reg).ok_or_else(|| lost(reg))?;
    std::fs::rename(&staged, dir).map_err(|e| Error::internal("recovering a staged upload", e))?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::internal("syncing a directory", e))?;
    }
    tracing::warn!(dataset = %reg.dataset, version = reg.version,
        "recovered a registered version from its staged upload");
    Ok(())
}

/// A staged upload (`.upload-<version>-<nonce>` beside the version directory `dir`) whose
/// files match the registration.
fn staged_upload(dir: &Path, reg: &DatasetRegistered) -> Option<PathBuf> {
    let prefix = format!(".upload-{}-", reg.version);
    std::fs::read_dir(dir.parent()?)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .find(|p| check_files(p, reg).is_ok())
}

fn lost(reg: &DatasetRegistered) -> Error {
    Error::data_loss(format!(
        "the files of {} v{} are missing",
        reg.dataset, reg.version
    ))
}

async fn sync_dir(dir: &Path) -> Result<(), Error> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|f| f.sync_all()))
        .await
        .map_err(|e| Error::internal("syncing a directory", e))?
        .map_err(|e| Error::internal("syncing a directory", e))
}
