//! Replaying the log: the one pipeline behind [`crate::Ledger::open`] and [`crate::verify`].
//!
//! Records are decoded and hashed in parallel, in chunks, then applied in order to a fresh
//! [`State`] while the Merkle tree is rebuilt incrementally and compared with the stored node
//! hashes and with every stored checkpoint. `verify` additionally re-encodes every entry to
//! check it is canonical and checks every author signature (in parallel, per chunk).

use rayon::prelude::*;

use crate::entry::{SignedEntry, split_leaf};
use crate::error::{Error, Result};
use crate::merkle::{self, Hash};
use crate::note::{Checkpoint, VerifierKey};
use crate::state::State;
use crate::storage::{LOG_FILE, RecordPos, TREE_FILE, TreeFile};

/// Entries decoded per parallel chunk.
const CHUNK: usize = 8192;

/// How a replay treats stored node hashes.
pub enum TreeMode<'a> {
    /// Compare with the stored file; fill nodes missing after a crash (zero or past the end).
    Repair(&'a mut TreeFile),
    /// Compare only (verification never writes).
    Check(&'a TreeFile),
}

impl TreeMode<'_> {
    fn file(&self) -> &TreeFile {
        match self {
            TreeMode::Repair(t) => t,
            TreeMode::Check(t) => t,
        }
    }
}

/// Options of a replay.
pub struct ReplayOptions<'a> {
    /// Re-encode each entry and require the stored bytes to be canonical.
    pub strict: bool,
    /// Verify every author signature.
    pub signatures: bool,
    /// The ledger's verifier key: the genesis entry must register it.
    pub ledger_key: &'a VerifierKey,
    /// Stored checkpoints (already signature-checked), sorted by size.
    pub checkpoints: &'a [Checkpoint],
    /// Called with (entries done, total) after each chunk.
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
}

/// What a replay found besides the state.
#[derive(Debug, Default, Clone)]
pub struct ReplayStats {
    /// Node hashes recomputed because they were missing.
    pub nodes_repaired: u64,
}

/// The right border of a growing tree: full subtrees as (level, hash), largest first.
#[derive(Default)]
struct CompactRange(Vec<(u32, Hash)>);

impl CompactRange {
    /// Adds a leaf; calls `completed(level, index, hash)` for every node it completes.
    fn push(
        &mut self,
        leaf_index: u64,
        leaf: Hash,
        mut completed: impl FnMut(u32, u64, &Hash) -> Result<()>,
    ) -> Result<()> {
        let mut level = 0u32;
        let mut hash = leaf;
        completed(0, leaf_index, &hash)?;
        while let Some(&(l, left)) = self.0.last() {
            if l != level {
                break;
            }
            self.0.pop();
            hash = merkle::node_hash(&left, &hash);
            level += 1;
            completed(level, leaf_index >> level, &hash)?;
        }
        self.0.push((level, hash));
        Ok(())
    }

    fn root(&self) -> Hash {
        let mut it = self.0.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return merkle::empty_root();
        };
        for (_, h) in it {
            acc = merkle::node_hash(h, &acc);
        }
        acc
    }
}

struct Decoded {
    leaf_hash: Hash,
    entry: std::result::Result<SignedEntry, String>,
}

fn decode(leaf: &[u8], strict: bool) -> Decoded {
    Decoded {
        leaf_hash: merkle::leaf_hash(leaf),
        entry: SignedEntry::from_leaf(leaf, strict).map_err(|e| e.to_string()),
    }
}

/// Replays `records` of the log `data` into a fresh state.
pub fn replay(
    data: &[u8],
    records: &[RecordPos],
    mut tree: TreeMode<'_>,
    opts: &ReplayOptions<'_>,
) -> Result<(State, ReplayStats)> {
    let mut state = State::default();
    let mut stats = ReplayStats::default();
    let mut range = CompactRange::default();
    let mut next_cp = 0usize;
    let total = records.len() as u64;
    let log_err = |index: u64, reason: String| Error::Corrupt {
        index,
        file: LOG_FILE,
        reason,
    };

    check_checkpoints_at(0, &range, opts.checkpoints, &mut next_cp)?;
    // Entries past the last signed checkpoint: their stored node hashes may be stale from a
    // crash (written through the map for an append that never became durable).
    let certified = opts.checkpoints.last().map_or(0, |c| c.size);
    // Decoding the next chunk (in parallel) overlaps with applying this one (in order).
    let chunks: Vec<&[RecordPos]> = records.chunks(CHUNK).collect();
    let decode_chunk = |c: &[RecordPos]| -> Vec<Decoded> {
        c.par_iter()
            .map(|r| decode(&data[r.payload()], opts.strict))
            .collect()
    };
    let mut pending = chunks.first().map(|c| decode_chunk(c));
    for (chunk_no, chunk) in chunks.iter().enumerate() {
        let chunk: &[RecordPos] = chunk;
        let base = (chunk_no * CHUNK) as u64;
        let decoded = pending.take().unwrap_or_default();
        let next = chunks.get(chunk_no + 1);
        let (applied, next_decoded) = rayon::join(
            || -> Result<()> {
                let mut to_verify: Vec<(u64, VerifierKey, usize)> = Vec::new();
                for (k, d) in decoded.into_iter().enumerate() {
                    let index = base + k as u64;
                    let signed = d.entry.map_err(|e| log_err(index, e))?;
                    range.push(index, d.leaf_hash, |level, i, h| {
                        check_node(&mut tree, level, i, h, index, index < certified, &mut stats)
                    })?;
                    let key_since = if index == 0 {
                        genesis_key(&signed, opts.ledger_key)?;
                        0
                    } else {
                        let p = state
                            .principal(signed.entry.author.as_str())
                            .ok_or_else(|| {
                                log_err(
                                    index,
                                    format!("unknown author {:?}", signed.entry.author.as_str()),
                                )
                            })?;
                        if opts.signatures {
                            to_verify.push((index, p.key.clone(), k));
                        }
                        p.key_since
                    };
                    if index == 0 && opts.signatures {
                        to_verify.push((0, opts.ledger_key.clone(), k));
                    }
                    // Nodes of leaves before `index` were checked above, so roots of earlier sizes
                    // can be read from the stored tree (for witness cosignatures).
                    let file = tree.file();
                    let root_at = |size: u64| (size <= index).then(|| merkle::root(file, size));
                    state
                        .apply(signed.entry, index, key_since, &root_at)
                        .map_err(|e| {
                            log_err(index, format!("entry breaks the ledger's rules: {e}"))
                        })?;
                    check_checkpoints_at(index + 1, &range, opts.checkpoints, &mut next_cp)?;
                }
                if let Some(bad) = to_verify
                    .par_iter()
                    .filter(|(_, key, k)| {
                        let leaf = &data[chunk[*k].payload()];
                        !split_leaf(leaf).is_ok_and(|(msg, sig)| key.verify_raw(msg, &sig))
                    })
                    .map(|(index, _, _)| *index)
                    .min()
                {
                    return Err(Error::Corrupt {
                        index: bad,
                        file: LOG_FILE,
                        reason: "author signature does not verify".into(),
                    });
                }
                Ok(())
            },
            || next.map(|c| decode_chunk(c)),
        );
        applied?;
        pending = next_decoded;
        (opts.progress)(base + chunk.len() as u64, total);
    }
    if let Some(cp) = opts.checkpoints.get(next_cp) {
        return Err(Error::Corrupt {
            index: total,
            file: LOG_FILE,
            reason: format!(
                "a checkpoint signed at tree size {} covers entries missing from the log \
                 (removed or truncated)",
                cp.size
            ),
        });
    }
    Ok((state, stats))
}

fn genesis_key(signed: &SignedEntry, ledger_key: &VerifierKey) -> Result<()> {
    match &signed.entry.body {
        crate::entry::Body::PrincipalRegistered(p) if p.key == ledger_key.to_text() => Ok(()),
        _ => Err(Error::Corrupt {
            index: 0,
            file: LOG_FILE,
            reason: "the first entry does not register this ledger's key".into(),
        }),
    }
}

/// Compares a node hash computed from the log (completed by entry `leaf`) with the stored one.
/// A missing node is filled when repairing; a different one is refused, except, when
/// repairing, for a node completed past the last signed checkpoint (`certified` false): the
/// tree is derived from the log, and a stale node there is what a crash leaves, so it is
/// rewritten from the log (which the checkpoints vouch for up to their size).
fn check_node(
    tree: &mut TreeMode<'_>,
    level: u32,
    index: u64,
    hash: &Hash,
    leaf: u64,
    certified: bool,
    stats: &mut ReplayStats,
) -> Result<()> {
    let pos = merkle::position(level, index);
    let stored = tree.file().get(pos);
    match stored {
        Some(s) if s == *hash => Ok(()),
        Some(s) if s != [0u8; 32] && (certified || !matches!(tree, TreeMode::Repair(_))) => {
            Err(Error::Corrupt {
                index: leaf,
                file: TREE_FILE,
                reason: format!("stored node hash at level {level} differs from the log"),
            })
        }
        _ => {
            if let TreeMode::Repair(t) = tree {
                t.put(pos, hash)?;
                stats.nodes_repaired += 1;
                Ok(())
            } else {
                Err(Error::Corrupt {
                    index: leaf,
                    file: TREE_FILE,
                    reason: format!("node hash at level {level} is missing"),
                })
            }
        }
    }
}

fn check_checkpoints_at(
    size: u64,
    range: &CompactRange,
    checkpoints: &[Checkpoint],
    next: &mut usize,
) -> Result<()> {
    while let Some(cp) = checkpoints.get(*next) {
        if cp.size != size {
            break;
        }
        if range.root() != cp.root {
            return Err(Error::Corrupt {
                index: size.saturating_sub(1),
                file: LOG_FILE,
                reason: format!(
                    "the tree root at size {size} differs from the checkpoint signed at that \
                     size: an entry before it was changed"
                ),
            });
        }
        *next += 1;
    }
    Ok(())
}
