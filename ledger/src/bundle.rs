//! Offline evidence bundles for trial sponsors, in the spirit of C2SP tlog-proof.
//!
//! A bundle holds, for one study, every entry a sponsor needs to check what the study did —
//! its registration and approvals, the dataset versions its receipts used, all its query
//! receipts, and the principal entries that let each author's signature be checked — each
//! with an inclusion proof against one signed checkpoint, plus optional consistency proofs
//! from older tree sizes. [`verify_bundle`] needs only the ledger's verifier key and the
//! bundle (and optionally an older checkpoint the sponsor kept).
//!
//! A bundle proves that what it contains is in the log; it cannot prove that the log holds no
//! other receipt of the study (a sponsor who needs that asks the broker for the study's
//! receipts at two checkpoints and compares).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::entry::{Body, Outcome, SignedEntry, split_leaf};
use crate::error::{Error, Result};
use crate::ids::{DatasetId, Digest};
use crate::ledger::Ledger;
use crate::merkle;
use crate::note::{self, VerifierKey};

/// The bundle format tag.
pub const FORMAT: &str = "consentry-bundle/v1";

/// One entry with its inclusion proof.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEntry {
    /// Leaf index.
    pub index: u64,
    /// The exact leaf bytes, base64.
    pub leaf_b64: String,
    /// Inclusion proof against the bundle's checkpoint, base64 hashes.
    pub proof: Vec<String>,
}

/// A consistency proof from an older tree size to the bundle's checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConsistency {
    /// The older tree size.
    pub old_size: u64,
    /// The proof, base64 hashes.
    pub proof: Vec<String>,
}

/// A study's evidence bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Always [`FORMAT`].
    pub format: String,
    /// The study.
    pub study: String,
    /// The signed checkpoint every proof leads to.
    pub checkpoint: String,
    /// Entries in index order.
    pub entries: Vec<BundleEntry>,
    /// Consistency proofs from older sizes.
    #[serde(default)]
    pub consistency: Vec<BundleConsistency>,
}

/// Builds the bundle of `study` against a fresh checkpoint, with consistency proofs from each
/// size in `consistency_from`.
pub fn make_bundle(ledger: &Ledger, study: &str, consistency_from: &[u64]) -> Result<Bundle> {
    let checkpoint = ledger.checkpoint()?;
    let cp = note::open_checkpoint(ledger.verifier_key(), &checkpoint, None)?;
    let mut indexes = BTreeSet::new();
    {
        let state = ledger.state();
        let st = state.study(study).ok_or_else(|| Error::NotFound {
            what: "study",
            id: study.into(),
        })?;
        indexes.extend(
            state
                .study_events(study)
                .iter()
                .copied()
                .filter(|&i| i < cp.size),
        );
        indexes.extend(
            state
                .receipts_of_study(study)
                .iter()
                .copied()
                .filter(|&i| i < cp.size),
        );
        for d in &st.reg.datasets {
            if let Some(ds) = state.dataset(d.as_str()) {
                indexes.extend(ds.versions.iter().map(|v| v.index).filter(|&i| i < cp.size));
            }
        }
    }
    // The principal entries of every author, and of their authors in turn (the operator who
    // registered them), so every signature can be checked offline.
    let mut authors = BTreeSet::new();
    let mut todo: Vec<u64> = indexes.iter().copied().collect();
    while let Some(i) = todo.pop() {
        let author = ledger.entry(i)?.entry.author.to_string();
        if authors.insert(author.clone()) {
            let state = ledger.state();
            for &j in state
                .principal_events(&author)
                .iter()
                .filter(|&&j| j < cp.size)
            {
                if indexes.insert(j) {
                    todo.push(j);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(indexes.len());
    for &i in &indexes {
        out.push(BundleEntry {
            index: i,
            leaf_b64: B64.encode(ledger.leaf(i)?),
            proof: merkle::base64_hashes(&ledger.inclusion_proof(i, Some(cp.size))?),
        });
    }
    let mut consistency = Vec::new();
    for &old in consistency_from {
        if old == 0 || old > cp.size {
            return Err(Error::OutOfRange {
                what: "old tree size",
                value: old,
                size: cp.size,
            });
        }
        consistency.push(BundleConsistency {
            old_size: old,
            proof: merkle::base64_hashes(&ledger.consistency_proof(old, Some(cp.size))?),
        });
    }
    Ok(Bundle {
        format: FORMAT.into(),
        study: study.into(),
        checkpoint,
        entries: out,
        consistency,
    })
}

/// A dataset version a study's released queries used.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DatasetUse {
    /// The dataset.
    pub dataset: DatasetId,
    /// Its version.
    pub version: u32,
    /// The version's digest as registered.
    pub digest: Digest,
    /// Released queries on it.
    pub queries: u64,
    /// Epsilon they spent.
    pub epsilon: f64,
}

/// What a verified bundle shows.
#[derive(Debug, Clone, Serialize)]
pub struct BundleSummary {
    /// The study.
    pub study: String,
    /// The checkpoint's origin.
    pub origin: String,
    /// The checkpoint's tree size.
    pub tree_size: u64,
    /// Entries verified (inclusion and author signature).
    pub entries: usize,
    /// Released receipts.
    pub released: u64,
    /// Denied receipts.
    pub denied: u64,
    /// Failed receipts (charged, nothing released).
    #[serde(default)]
    pub failed: u64,
    /// Dataset versions used by released (and charged failed) queries.
    pub datasets: Vec<DatasetUse>,
    /// The older checkpoint proven consistent, if one was given.
    pub consistent_with_size: Option<u64>,
    /// The dataset registrations in the bundle (verified like every entry), with each file's
    /// SHA-256: what a local copy of a dataset is checked against.
    #[serde(skip)]
    pub registrations: Vec<crate::entry::DatasetRegistered>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Invalid(format!("bundle does not verify: {}", msg.into()))
}

fn decode_hashes(hs: &[String]) -> Result<Vec<Vec<u8>>> {
    hs.iter()
        .map(|h| B64.decode(h).map_err(|_| bad("a proof hash is not base64")))
        .collect()
}

/// Verifies a bundle with the ledger's verifier key alone: the checkpoint signature, every
/// inclusion proof, every author signature (keys taken from the principal entries in the
/// bundle, in log order), that the genesis operator is the ledger key, and that each released
/// receipt names a dataset version registered in the bundle with the same digest. With
/// `old_checkpoint`, also proves the log only grew since then.
pub fn verify_bundle(
    bundle: &Bundle,
    ledger_key: &VerifierKey,
    old_checkpoint: Option<&str>,
) -> Result<BundleSummary> {
    verify_bundle_progress(bundle, ledger_key, old_checkpoint, &mut || {})
}

/// [`verify_bundle`], calling `progress` once per entry whose signature was checked.
pub fn verify_bundle_progress(
    bundle: &Bundle,
    ledger_key: &VerifierKey,
    old_checkpoint: Option<&str>,
    progress: &mut dyn FnMut(),
) -> Result<BundleSummary> {
    if bundle.format != FORMAT {
        return Err(bad(format!("unknown format {:?}", bundle.format)));
    }
    let cp = note::open_checkpoint(ledger_key, &bundle.checkpoint, None)?;
    let mut decoded: Vec<(u64, SignedEntry, Vec<u8>)> = Vec::with_capacity(bundle.entries.len());
    let mut last = None;
    for e in &bundle.entries {
        if last.is_some_and(|l| l >= e.index) {
            return Err(bad("entries are not in increasing index order"));
        }
        last = Some(e.index);
        let leaf = B64
            .decode(&e.leaf_b64)
            .map_err(|_| bad(format!("entry {}: leaf is not base64", e.index)))?;
        let proof = decode_hashes(&e.proof)?;
        merkle::verify_inclusion(
            &merkle::leaf_hash(&leaf),
            e.index,
            cp.size,
            &proof,
            &cp.root,
        )
        .map_err(|err| bad(format!("entry {}: inclusion proof: {err}", e.index)))?;
        let signed = SignedEntry::from_leaf(&leaf, true)
            .map_err(|err| bad(format!("entry {}: {err}", e.index)))?;
        decoded.push((e.index, signed, leaf));
    }

    // Author keys as of each entry, from the principal entries in the bundle.
    let mut keys: HashMap<String, (VerifierKey, bool)> = HashMap::new();
    let mut summary = BundleSummary {
        study: bundle.study.clone(),
        origin: cp.origin.clone(),
        tree_size: cp.size,
        entries: decoded.len(),
        released: 0,
        denied: 0,
        failed: 0,
        datasets: Vec::new(),
        consistent_with_size: None,
        registrations: Vec::new(),
    };
    let mut versions: HashMap<(DatasetId, u32), Digest> = HashMap::new();
    let mut uses: BTreeMap<(DatasetId, u32), DatasetUse> = BTreeMap::new();
    for (index, signed, leaf) in &decoded {
        let author = signed.entry.author.to_string();
        let key = if *index == 0 {
            match &signed.entry.body {
                Body::PrincipalRegistered(p) if p.key == ledger_key.to_text() => ledger_key.clone(),
                _ => return Err(bad("entry 0 does not register the ledger's key")),
            }
        } else {
            match keys.get(&author) {
                Some((k, false)) => k.clone(),
                Some((_, true)) => {
                    return Err(bad(format!("entry {index}: author {author} was revoked")));
                }
                None => {
                    return Err(bad(format!(
                        "entry {index}: no registration of author {author} in the bundle"
                    )));
                }
            }
        };
        let (msg, sig) = split_leaf(leaf)?;
        if !key.verify_raw(msg, &sig) {
            return Err(bad(format!(
                "entry {index}: author signature does not verify"
            )));
        }
        progress();
        match &signed.entry.body {
            Body::PrincipalRegistered(p) => {
                keys.insert(p.id.to_string(), (VerifierKey::parse(&p.key)?, false));
            }
            Body::KeyRotated(k) => {
                keys.insert(k.id.to_string(), (VerifierKey::parse(&k.key)?, false));
            }
            Body::PrincipalRevoked(r) => {
                if let Some(entry) = keys.get_mut(r.id.as_str()) {
                    entry.1 = true;
                }
            }
            Body::DatasetRegistered(d) => {
                versions.insert((d.dataset.clone(), d.version), d.digest.clone());
                summary.registrations.push(d.clone());
            }
            Body::QueryReceipt(r) if r.study == bundle.study => match r.outcome {
                Outcome::Denied => summary.denied += 1,
                Outcome::Released | Outcome::Failed => {
                    if r.outcome == Outcome::Released {
                        summary.released += 1;
                    } else {
                        summary.failed += 1;
                    }
                    let (Some(d), Some(v), Some(dg)) = (&r.dataset, r.version, &r.dataset_digest)
                    else {
                        return Err(bad(format!("receipt {index} names no dataset version")));
                    };
                    if versions.get(&(d.clone(), v)) != Some(dg) {
                        return Err(bad(format!(
                            "receipt {index}: dataset {d} version {v} is not registered in the bundle with that digest"
                        )));
                    }
                    let u = uses.entry((d.clone(), v)).or_insert_with(|| DatasetUse {
                        dataset: d.clone(),
                        version: v,
                        digest: dg.clone(),
                        queries: 0,
                        epsilon: 0.0,
                    });
                    u.queries += 1;
                    u.epsilon += r.epsilon;
                }
            },
            Body::QueryReceipt(_) => {
                return Err(bad(format!("receipt {index} belongs to another study")));
            }
            _ => {}
        }
    }
    summary.datasets = uses.into_values().collect();

    if let Some(old) = old_checkpoint {
        let old = note::open_checkpoint(ledger_key, old, Some(&cp.origin))?;
        if old.size == cp.size {
            if old.root != cp.root {
                return Err(bad(
                    "the older checkpoint has the same size but another root: the log forked",
                ));
            }
        } else {
            let c = bundle.consistency.iter().find(|c| c.old_size == old.size).ok_or_else(|| {
                bad(format!(
                    "no consistency proof from size {}; make the bundle with --consistency-from {}",
                    old.size, old.size
                ))
            })?;
            merkle::verify_consistency(
                old.size,
                cp.size,
                &decode_hashes(&c.proof)?,
                &old.root,
                &cp.root,
            )
            .map_err(|err| bad(format!("consistency with the older checkpoint: {err}")))?;
        }
        summary.consistent_with_size = Some(old.size);
    }
    Ok(summary)
}
