//! Released answers kept across restarts, so an identical repeat stays free and identical.
//!
//! Without them a restart would forget every answer: the repeat would be answered with fresh
//! noise (paid for again, but the budget would no longer stop a patient's data being averaged
//! out as the study intends). After a query's receipt is durable, its release is written to
//! `<data-dir>/releases/<dataset>/<version>/<repeat key>.json` (temporary file, fsync,
//! rename). The engine keeps recent answers in memory and looks up the others here, by repeat
//! key, when an identical repeat comes (after a restart, or once memory dropped them): a kept
//! release is used only if the ledger entry it names is a released receipt of the same dataset
//! version and SQL whose result digest matches the digest recomputed from the kept rows;
//! anything else is skipped and logged (never served). A file carries the SHA-256 of its own fields, checked before anything
//! in it is decoded, and a decoder that panics on damaged bytes is caught: a damaged kept
//! release is reported and ignored, never fatal to its dataset. A crash between the receipt and
//! the file loses only the free repeat: the next identical query is answered and paid for
//! again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anonymizer::{Engine, KeptRepeats, Release};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ledger::entry::{Body, DatasetRegistered, Outcome};
use ledger::ids::Digest;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A kept file that cannot be used, and why (logged; its repeat is charged again).
fn damaged(why: impl std::fmt::Display) -> Error {
    Error::data_loss(why.to_string())
}

/// One kept release.
#[derive(Clone, Serialize, Deserialize)]
struct KeptRelease {
    /// The receipt that released it.
    receipt: u64,
    scope: String,
    sql: String,
    /// Epsilon and delta asked (part of the repeat key).
    epsilon_asked: f64,
    delta_asked: f64,
    /// Spent.
    epsilon: f64,
    delta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rho: Option<f64>,
    consent_digest: String,
    result_digest: String,
    mechanism: serde_json::Value,
    /// The result as an Arrow IPC stream, base64.
    ipc: String,
    /// SHA-256 of this record's JSON without this field (absent in files written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

impl KeptRelease {
    /// SHA-256 of the record's JSON without its `sha256` (as a JSON value: the same bytes
    /// whether written from this struct or from the file's parsed JSON).
    fn checksum(&self) -> Result<String, Error> {
        let bare = serde_json::to_value(KeptRelease {
            sha256: None,
            ..self.clone()
        })
        .map_err(damaged)?;
        Ok(Digest::of(&serde_json::to_vec(&bare).map_err(damaged)?).to_string())
    }
}

/// The kept releases of a data directory.
pub struct Kept {
    root: PathBuf,
}

/// What a query asked, as the repeat key needs it.
pub struct Asked<'a> {
    /// The repeat scope ([`Engine::repeat_scope`]: study, dataset digest, minimum cell size,
    /// mechanism and accuracy asked).
    pub scope: &'a str,
    /// Epsilon asked.
    pub epsilon: f64,
    /// Delta asked.
    pub delta: f64,
}

fn hex(b: &[u8; 32]) -> String {
    Digest::from_bytes(*b).to_string()
}

impl Kept {
    /// Kept releases under `<data_dir>/releases`.
    pub fn open(data_dir: &Path) -> Result<Kept, Error> {
        let root = data_dir.join("releases");
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::internal("creating the kept releases' directory", e))?;
        Ok(Kept { root })
    }

    fn dir(&self, reg: &DatasetRegistered) -> PathBuf {
        self.root
            .join(reg.dataset.as_str())
            .join(reg.version.to_string())
    }

    /// Writes a release whose receipt is durable at `receipt`. Blocking.
    pub fn save(
        &self,
        reg: &DatasetRegistered,
        receipt: u64,
        asked: &Asked<'_>,
        release: &Release,
    ) -> Result<(), Error> {
        let io = |e: std::io::Error| Error::internal("keeping a release", e);
        let key = Engine::repeat_key(
            asked.scope,
            &release.sql,
            asked.epsilon,
            asked.delta,
            &release.consent_digest,
        );
        let mut kept = KeptRelease {
            receipt,
            scope: asked.scope.to_owned(),
            sql: release.sql.clone(),
            epsilon_asked: asked.epsilon,
            delta_asked: asked.delta,
            epsilon: release.epsilon,
            delta: release.delta,
            rho: release.rho,
            consent_digest: hex(&release.consent_digest),
            result_digest: hex(&release.result_digest),
            mechanism: release.mechanism.clone(),
            ipc: B64.encode(
                anonymizer::release::ipc_stream(&release.schema, &release.batches)
                    .map_err(|e| Error::internal("keeping a release", e))?,
            ),
            sha256: None,
        };
        kept.sha256 = Some(kept.checksum()?);
        let dir = self.dir(reg);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{}.json", hex(&key)));
        let tmp = path.with_extension("tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        let json =
            serde_json::to_vec(&kept).map_err(|e| Error::internal("keeping a release", e))?;
        f.write_all(&json).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Checks, without changing anything, every kept release: its checksum, its rows'
    /// digest against the one it records. Returns each damaged file with what is wrong (a
    /// damaged release is skipped when its engine loads: its repeat is charged again).
    pub fn check_all(&self) -> (usize, Vec<(PathBuf, String)>) {
        let mut checked = 0;
        let mut damaged = Vec::new();
        let files = walk_json(&self.root);
        for path in files {
            checked += 1;
            let one = std::panic::catch_unwind(|| read_one(&path).map(drop))
                .unwrap_or_else(|_| Err(damaged_bytes()));
            if let Err(e) = one {
                damaged.push((path, e.to_string()));
            }
        }
        (checked, damaged)
    }

    /// The kept releases of `reg`, as the engine looks up identical repeats that memory no
    /// longer holds.
    pub fn of_version(
        &self,
        reg: &DatasetRegistered,
        ledger: &Arc<ledger::Ledger>,
    ) -> Arc<dyn KeptRepeats> {
        Arc::new(VersionKept {
            dir: self.dir(reg),
            reg: reg.clone(),
            ledger: ledger.clone(),
        })
    }
}

/// One dataset version's kept releases.
struct VersionKept {
    dir: PathBuf,
    reg: DatasetRegistered,
    ledger: Arc<ledger::Ledger>,
}

impl KeptRepeats for VersionKept {
    fn find(&self, key: &[u8; 32]) -> Option<Release> {
        let path = self.dir.join(format!("{}.json", hex(key)));
        if !path.exists() {
            return None;
        }
        // A decoder may panic on damaged bytes: that file is skipped (the repeat is charged
        // again), the dataset stays queryable.
        let one = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            restore_one(&path, &self.reg, &self.ledger)
        }))
        .unwrap_or_else(|_| Err(damaged_bytes()));
        match one {
            Ok((k, release)) if k == *key => Some(release),
            Ok(_) => {
                tracing::warn!(file = %path.display(),
                    "a kept release is filed under another query's key; not used");
                None
            }
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err,
                    "a kept release was not used");
                None
            }
        }
    }
}

/// The `.json` files two levels below `root` (`<dataset>/<version>/<key>.json`).
fn walk_json(root: &Path) -> Vec<PathBuf> {
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let mut out: Vec<PathBuf> = dirs(root)
        .iter()
        .flat_map(|d| dirs(d))
        .flat_map(|v| dirs(&v))
        .filter(|f| f.extension().is_some_and(|x| x == "json"))
        .collect();
    out.sort();
    out
}

/// A kept file read back: the record, its rows (checksum checked before decoding, the rows'
/// digest checked against the one it records) and that digest.
struct Read {
    kept: KeptRelease,
    schema: arrow::datatypes::SchemaRef,
    batches: Vec<arrow::array::RecordBatch>,
    digest: [u8; 32],
}

/// What a decoder that panicked on a kept file's bytes leaves.
fn damaged_bytes() -> Error {
    damaged("its bytes could not be decoded")
}

fn read_one(path: &Path) -> Result<Read, Error> {
    let bytes = std::fs::read(path).map_err(damaged)?;
    let kept: KeptRelease = serde_json::from_slice(&bytes).map_err(damaged)?;
    if let Some(sum) = &kept.sha256
        && *sum != kept.checksum()?
    {
        return Err(damaged("its bytes do not match their SHA-256 (damaged)"));
    }
    let bytes = B64.decode(&kept.ipc).map_err(damaged)?;
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(damaged)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>().map_err(damaged)?;
    let digest = anonymizer::release::digest(&schema, &batches).map_err(damaged)?;
    if Digest::from_bytes(digest) != Digest::parse(&kept.result_digest).map_err(damaged)? {
        return Err(damaged("the kept rows do not match their digest"));
    }
    Ok(Read {
        kept,
        schema,
        batches,
        digest,
    })
}

fn restore_one(
    path: &Path,
    reg: &DatasetRegistered,
    ledger: &ledger::Ledger,
) -> Result<([u8; 32], Release), Error> {
    let Read {
        kept,
        schema,
        batches,
        digest,
    } = read_one(path)?;
    let entry = ledger.entry(kept.receipt).map_err(damaged)?.entry;
    let Body::QueryReceipt(r) = entry.body else {
        return Err(damaged(format!(
            "entry {} is not a query receipt",
            kept.receipt
        )));
    };
    let result_digest = Digest::parse(&kept.result_digest).map_err(damaged)?;
    let consent_digest = Digest::parse(&kept.consent_digest).map_err(damaged)?;
    if !(r.outcome == Outcome::Released
        && r.dataset.as_ref() == Some(&reg.dataset)
        && r.version == Some(reg.version)
        && r.sql == kept.sql
        && r.result_digest.as_ref() == Some(&result_digest)
        && r.consent_digest.as_ref().is_some_and(|c| {
            // Receipts record a commitment to the snapshot (earlier ones its digest).
            *c == crate::secrets::consent_commitment(ledger, consent_digest.bytes())
                || *c == consent_digest
        }))
    {
        return Err(damaged(format!(
            "receipt {} does not record this release",
            kept.receipt
        )));
    }
    let key = Engine::repeat_key(
        &kept.scope,
        &kept.sql,
        kept.epsilon_asked,
        kept.delta_asked,
        consent_digest.bytes(),
    );
    Ok((
        key,
        Release {
            schema,
            batches,
            epsilon: kept.epsilon,
            delta: kept.delta,
            rho: kept.rho,
            sql: kept.sql,
            consent_digest: *consent_digest.bytes(),
            result_digest: digest,
            mechanism: kept.mechanism,
            repeated: false,
        },
    ))
}
