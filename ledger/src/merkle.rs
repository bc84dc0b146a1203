//! RFC 9162 (Certificate Transparency v2) Merkle tree for the append-only consent log.
//!
//! Hashing follows RFC 9162 section 2.1.1, inclusion proofs section 2.1.3 and
//! consistency proofs section 2.1.4. Proofs are produced from stored *full nodes*
//! (roots of perfect subtrees) through the [`NodeSource`] trait, so every operation
//! reads and hashes O(log n) nodes and never recomputes from the leaves.

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// Why a proof could not be produced or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is out of range for tree size {size}")]
    IndexOutOfRange {
        /// The requested leaf index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The old tree is larger than the new one.
    #[error("old tree size {size1} is larger than new tree size {size2}")]
    SizeOrder {
        /// The old tree size.
        size1: u64,
        /// The new tree size.
        size2: u64,
    },
    /// A consistency proof from the empty tree (size 0) is meaningless and always rejected.
    #[error("consistency from an empty tree (old size 0) is not meaningful")]
    EmptyOld,
    /// The proof has the wrong number of hashes for the given sizes/index.
    #[error("proof has {got} hashes, expected {expected}")]
    WrongLength {
        /// The number of hashes the sizes/index call for.
        expected: usize,
        /// The number of hashes given.
        got: usize,
    },
    /// A hash, root or proof element is not 32 bytes long.
    #[error("{what} is {got} bytes long, expected 32")]
    BadHashLength {
        /// Which input was wrong ("leaf hash", "root", "proof element", ...).
        what: &'static str,
        /// Its actual length.
        got: usize,
    },
    /// The root recomputed for the old tree differs from the given old root.
    #[error("recomputed old root does not match")]
    OldRootMismatch,
    /// The recomputed root differs from the given (new) root.
    #[error("recomputed root does not match")]
    RootMismatch,
}

/// Hashes in standard base64, as proofs are printed, served and bundled.
pub fn base64_hashes(hs: &[Hash]) -> Vec<String> {
    use base64::Engine as _;
    hs.iter()
        .map(|h| base64::engine::general_purpose::STANDARD.encode(h))
        .collect()
}

/// Leaf hash, RFC 9162 section 2.1.1: `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0x00])
        .chain_update(data)
        .finalize()
        .into()
}

/// Interior node hash, RFC 9162 section 2.1.1: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new()
        .chain_update([0x01])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// Root of the empty tree, RFC 9162 section 2.1.1: `MTH({}) = SHA-256()`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// In-order ("flat tree") position of full node (`level`, `index`), i.e. of the root of
/// the perfect subtree over leaves `[index * 2^level, (index + 1) * 2^level)`.
/// Leaf `i` is at `2i`; a parent sits halfway between its two children. Defined for
/// `level < 63` and positions below 2^64 (trees of fewer than 2^63 leaves).
pub fn position(level: u32, index: u64) -> u64 {
    (index << (level + 1)) + (1u64 << level) - 1
}

/// The full nodes `(level, index)` that become complete when leaf `leaf_index` is
/// appended, bottom-up: the leaf itself at level 0, then one more level for each trailing
/// one bit of `leaf_index`. A writer stores them in this order; each one at level `l > 0`
/// is `node_hash` of the two level `l - 1` nodes `2 * index` and `2 * index + 1`.
pub fn nodes_completed_by(leaf_index: u64) -> impl Iterator<Item = (u32, u64)> {
    (0..=leaf_index.trailing_ones().min(63)).map(move |level| (level, leaf_index >> level))
}

/// Read access to stored full-node hashes.
pub trait NodeSource {
    /// Hash of full node (`level`, `index`). Callers only ask for nodes that are complete
    /// in the tree they work on (`(index + 1) << level <= stored leaves`).
    fn node(&self, level: u32, index: u64) -> Hash;
}

/// An in-memory tree that stores every full node, level by level.
#[derive(Debug, Clone, Default)]
pub struct MemTree {
    levels: Vec<Vec<Hash>>,
}

impl MemTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a leaf (already hashed with [`leaf_hash`]) and stores the full nodes it completes.
    pub fn push(&mut self, leaf: Hash) {
        for (level, index) in nodes_completed_by(self.len()) {
            let level = level as usize;
            let hash = match level {
                0 => leaf,
                _ => {
                    let below = &self.levels[level - 1];
                    let i = 2 * index as usize;
                    node_hash(&below[i], &below[i + 1])
                }
            };
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            debug_assert_eq!(self.levels[level].len() as u64, index);
            self.levels[level].push(hash);
        }
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |leaves| leaves.len() as u64)
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl NodeSource for MemTree {
    /// Panics if the node is not complete in this tree.
    fn node(&self, level: u32, index: u64) -> Hash {
        self.levels[level as usize][index as usize]
    }
}

/// `MTH(D[start:end])` (RFC 9162 section 2.1.1) for a range whose `start` is a multiple of
/// the largest power of two `<= end - start`, as every subtree in RFC 9162 proofs is.
/// Such a range splits into full nodes of decreasing size (the set bits of its length);
/// they are folded right to left, so this reads at most 64 nodes and never a leaf twice.
/// An empty range gives [`empty_root`].
pub fn subtree_hash<S: NodeSource + ?Sized>(src: &S, start: u64, end: u64) -> Hash {
    debug_assert!(start <= end, "reversed range");
    if start >= end {
        return empty_root();
    }
    let len = end - start;
    debug_assert!(
        start.trailing_zeros() >= 63 - len.leading_zeros(),
        "unaligned subtree"
    );
    let (mut cursor, mut bits, mut acc) = (end, len, None::<Hash>);
    while bits != 0 {
        let level = bits.trailing_zeros();
        cursor -= 1u64 << level;
        let node = src.node(level, cursor >> level);
        acc = Some(acc.map_or(node, |right| node_hash(&node, &right)));
        bits &= bits - 1;
    }
    acc.unwrap_or_else(empty_root)
}

/// Root of the tree made of the first `n` stored leaves, `MTH(D[n])` (RFC 9162 section
/// 2.1.1); size 0 gives [`empty_root`]. Reads `popcount(n)` nodes.
pub fn root<S: NodeSource + ?Sized>(src: &S, n: u64) -> Hash {
    subtree_hash(src, 0, n)
}

/// Bit length: number of bits needed to write `x`.
fn bit_len(x: u64) -> u32 {
    64 - x.leading_zeros()
}

/// Shape of the audit path of leaf `m` in a tree of size `n > m`: the path has one
/// sibling at each level below `inner` (where `m` and `n - 1` share their subtree), and
/// above it one left sibling per set bit of `m >> inner` (the right border of the tree).
fn path_shape(m: u64, n: u64) -> (u32, u32) {
    let inner = bit_len(m ^ (n - 1));
    (inner, m.checked_shr(inner).unwrap_or(0).count_ones())
}

/// Appends the audit path of full node (`from_level`, `m >> from_level`) in a tree of
/// size `n` (RFC 9162 section 2.1.3.1 PATH, bottom-up). Only the sibling at level
/// `inner - 1` may be non-full, and then it is folded with [`subtree_hash`].
fn push_path<S: NodeSource + ?Sized>(
    src: &S,
    from_level: u32,
    m: u64,
    n: u64,
    out: &mut Vec<Hash>,
) {
    let (inner, _) = path_shape(m, n);
    for level in from_level..inner {
        let sibling = (m >> level) ^ 1;
        let start = sibling << level;
        let full = start.checked_add(1u64 << level).is_some_and(|end| end <= n);
        out.push(match full {
            true => src.node(level, sibling),
            false => subtree_hash(src, start, n),
        });
    }
    let mut border = m.checked_shr(inner).unwrap_or(0);
    while border != 0 {
        let level = inner + border.trailing_zeros();
        out.push(src.node(level, (m >> level) ^ 1));
        border &= border - 1;
    }
}

/// Inclusion proof (audit path) of leaf `index` in the tree of size `n`, RFC 9162 section
/// 2.1.3.1 `PATH(index, D[n])`, ordered from the leaf's sibling up to the root.
pub fn inclusion_proof<S: NodeSource + ?Sized>(
    src: &S,
    index: u64,
    n: u64,
) -> Result<Vec<Hash>, ProofError> {
    if index >= n {
        return Err(ProofError::IndexOutOfRange { index, size: n });
    }
    let (inner, border) = path_shape(index, n);
    let mut out = Vec::with_capacity((inner + border) as usize);
    push_path(src, 0, index, n, &mut out);
    Ok(out)
}

/// Last full node of the old tree of size `m > 0`: its level, and its first leaf.
fn last_full_node(m: u64) -> (u32, u64) {
    let level = m.trailing_zeros();
    (level, m - (1u64 << level))
}

/// Number of hashes in a consistency proof from size `m` to size `n`, `0 < m < n`.
fn consistency_len(m: u64, n: u64) -> usize {
    let (level, first) = last_full_node(m);
    let (inner, border) = path_shape(first, n);
    usize::from(first != 0) + (inner - level + border) as usize
}

/// Consistency proof between the trees of sizes `m` and `n`, RFC 9162 section 2.1.4.1
/// `PROOF(m, D[n])`. It is the audit path of the old tree's last full node within the new
/// tree, preceded by that node unless `m` is a power of two (then it is the old root).
/// `m == n` gives an empty proof; `m == 0` and `m > n` are errors.
pub fn consistency_proof<S: NodeSource + ?Sized>(
    src: &S,
    m: u64,
    n: u64,
) -> Result<Vec<Hash>, ProofError> {
    if m > n {
        return Err(ProofError::SizeOrder { size1: m, size2: n });
    }
    if m == 0 {
        return Err(ProofError::EmptyOld);
    }
    if m == n {
        return Ok(Vec::new());
    }
    let (level, first) = last_full_node(m);
    let mut out = Vec::with_capacity(consistency_len(m, n));
    if first != 0 {
        out.push(src.node(level, first >> level));
    }
    push_path(src, level, first, n, &mut out);
    Ok(out)
}

/// Checks that `bytes` is a 32-byte hash.
fn as_hash(what: &'static str, bytes: &[u8]) -> Result<Hash, ProofError> {
    bytes.try_into().map_err(|_| ProofError::BadHashLength {
        what,
        got: bytes.len(),
    })
}

/// Right-shifts `fn_` and `sn` together until `fn_` is odd or zero (RFC 9162 2.1.3.2 / 2.1.4.2).
fn shift_to_odd(fn_: &mut u64, sn: &mut u64) {
    while *fn_ & 1 == 0 && *fn_ != 0 {
        *fn_ >>= 1;
        *sn >>= 1;
    }
}

/// Verifies an inclusion proof, RFC 9162 section 2.1.3.2: that `leaf_hash` is leaf `index`
/// of the tree of `size` leaves whose root is `root`. Every hash must be 32 bytes and the
/// proof must have exactly the length that `index` and `size` call for.
pub fn verify_inclusion<P: AsRef<[u8]>>(
    leaf_hash: &[u8],
    index: u64,
    size: u64,
    proof: &[P],
    root: &[u8],
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut r = as_hash("leaf hash", leaf_hash)?;
    let root = as_hash("root", root)?;
    let (inner, border) = path_shape(index, size);
    let expected = (inner + border) as usize;
    if proof.len() != expected {
        return Err(ProofError::WrongLength {
            expected,
            got: proof.len(),
        });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    for p in proof {
        let p = as_hash("proof element", p.as_ref())?;
        if sn == 0 {
            return Err(ProofError::WrongLength {
                expected,
                got: proof.len(),
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(&p, &r);
            shift_to_odd(&mut fn_, &mut sn);
        } else {
            r = node_hash(&r, &p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    match (sn, r == root) {
        (0, true) => Ok(()),
        (0, false) => Err(ProofError::RootMismatch),
        _ => Err(ProofError::WrongLength {
            expected,
            got: proof.len(),
        }),
    }
}

/// Verifies a consistency proof, RFC 9162 section 2.1.4.2: that the tree of `size2` leaves
/// with root `root2` extends the tree of `size1` leaves with root `root1`.
/// Conventions (those of transparency-dev/merkle): `size1 == 0` is always rejected; equal
/// sizes need an empty proof and byte-equal roots (of any length); otherwise every hash
/// must be 32 bytes and the proof exactly as long as the sizes call for.
pub fn verify_consistency<P: AsRef<[u8]>>(
    size1: u64,
    size2: u64,
    proof: &[P],
    root1: &[u8],
    root2: &[u8],
) -> Result<(), ProofError> {
    if size1 > size2 {
        return Err(ProofError::SizeOrder { size1, size2 });
    }
    if size1 == 0 {
        return Err(ProofError::EmptyOld);
    }
    if size1 == size2 {
        return match (proof.len(), root1 == root2) {
            (0, true) => Ok(()),
            (0, false) => Err(ProofError::RootMismatch),
            (got, _) => Err(ProofError::WrongLength { expected: 0, got }),
        };
    }
    let (root1, root2) = (as_hash("old root", root1)?, as_hash("new root", root2)?);
    let expected = consistency_len(size1, size2);
    if proof.len() != expected {
        return Err(ProofError::WrongLength {
            expected,
            got: proof.len(),
        });
    }
    let mut path = Vec::with_capacity(proof.len() + 1);
    if size1.is_power_of_two() {
        path.push(root1);
    }
    for p in proof {
        path.push(as_hash("proof element", p.as_ref())?);
    }
    let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let Some((&first, rest)) = path.split_first() else {
        return Err(ProofError::WrongLength {
            expected,
            got: proof.len(),
        });
    };
    let (mut fr, mut sr) = (first, first);
    for c in rest {
        if sn == 0 {
            return Err(ProofError::WrongLength {
                expected,
                got: proof.len(),
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            shift_to_odd(&mut fn_, &mut sn);
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength {
            expected,
            got: proof.len(),
        });
    }
    if fr != root1 {
        return Err(ProofError::OldRootMismatch);
    }
    if sr != root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{Engine, engine::general_purpose::STANDARD as B64};
    use proptest::prelude::*;
    use std::path::{Path, PathBuf};

    /// Naive reference straight from RFC 9162 section 2.1, recursing over the leaf data.
    mod naive {
        use super::super::{Hash, empty_root, leaf_hash, node_hash};

        /// Largest power of two smaller than `n` (`n > 1`).
        fn split(n: usize) -> usize {
            1 << (usize::BITS - 1 - (n - 1).leading_zeros())
        }

        /// MTH(D[n]), section 2.1.1.
        pub fn mth(d: &[Vec<u8>]) -> Hash {
            match d.len() {
                0 => empty_root(),
                1 => leaf_hash(&d[0]),
                n => node_hash(&mth(&d[..split(n)]), &mth(&d[split(n)..])),
            }
        }

        /// PATH(m, D[n]), section 2.1.3.1.
        pub fn path(m: usize, d: &[Vec<u8>]) -> Vec<Hash> {
            let n = d.len();
            if n <= 1 {
                return Vec::new();
            }
            let k = split(n);
            let (mut p, sibling) = match m < k {
                true => (path(m, &d[..k]), mth(&d[k..])),
                false => (path(m - k, &d[k..]), mth(&d[..k])),
            };
            p.push(sibling);
            p
        }

        /// PROOF(m, D[n]) = SUBPROOF(m, D[n], true), section 2.1.4.1.
        pub fn proof(m: usize, d: &[Vec<u8>]) -> Vec<Hash> {
            subproof(m, d, true)
        }

        fn subproof(m: usize, d: &[Vec<u8>], b: bool) -> Vec<Hash> {
            let n = d.len();
            if m == n {
                return if b { Vec::new() } else { vec![mth(d)] };
            }
            let k = split(n);
            let (mut p, sibling) = match m <= k {
                true => (subproof(m, &d[..k], b), mth(&d[k..])),
                false => (subproof(m - k, &d[k..], false), mth(&d[..k])),
            };
            p.push(sibling);
            p
        }
    }

    fn mem_tree(leaves: &[Vec<u8>]) -> MemTree {
        let mut t = MemTree::new();
        leaves.iter().for_each(|l| t.push(leaf_hash(l)));
        t
    }

    /// Which sides the RFC 9162 verification loop (2.1.3.2) hashes proof elements on,
    /// for an unbounded proof; two (index, size) pairs with equal traces accept the same proofs.
    fn inclusion_trace(index: u64, size: u64) -> Vec<bool> {
        let (mut fn_, mut sn, mut trace) = (index, size - 1, Vec::new());
        while sn != 0 {
            let left = fn_ & 1 == 1 || fn_ == sn;
            if left {
                shift_to_odd(&mut fn_, &mut sn);
            }
            trace.push(left);
            fn_ >>= 1;
            sn >>= 1;
        }
        trace
    }

    /// Like [`inclusion_trace`] for the consistency loop (2.1.4.2), plus whether root1 is prepended.
    fn consistency_trace(size1: u64, size2: u64) -> (bool, Vec<bool>) {
        let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
        while fn_ & 1 == 1 {
            fn_ >>= 1;
            sn >>= 1;
        }
        (size1.is_power_of_two(), inclusion_trace(fn_, sn + 1))
    }

    /// `reference.json`: the 8 reference leaves and the root for every size 0..=8.
    fn reference() -> (Vec<Vec<u8>>, Vec<Hash>) {
        #[derive(serde::Deserialize)]
        struct Reference {
            leaf_inputs_hex: Vec<String>,
            root_hashes_hex_by_size: Vec<String>,
        }
        let text = std::fs::read_to_string(vectors_dir().join("reference.json"))
            .expect("reference.json is readable");
        let r: Reference = serde_json::from_str(&text).expect("reference.json parses");
        let hex = |s: &String| -> Vec<u8> {
            let digit = |i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit");
            (0..s.len()).step_by(2).map(digit).collect()
        };
        let roots = r.root_hashes_hex_by_size.iter();
        let roots = roots
            .map(|h| hex(h).try_into().expect("32-byte root"))
            .collect();
        (r.leaf_inputs_hex.iter().map(hex).collect(), roots)
    }

    fn vectors_dir() -> PathBuf {
        crate::test_support::testdata().join("rfc9162")
    }

    fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("vector directory is readable") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                json_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "json") {
                out.push(path);
            }
        }
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct InclusionVector {
        leaf_idx: u64,
        tree_size: u64,
        root: String,
        leaf_hash: String,
        proof: Option<Vec<String>>,
        want_err: bool,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ConsistencyVector {
        size1: u64,
        size2: u64,
        root1: String,
        root2: String,
        proof: Option<Vec<String>>,
        want_err: bool,
    }

    fn b64(s: &str) -> Vec<u8> {
        B64.decode(s).expect("valid base64")
    }

    fn b64_proof(p: &Option<Vec<String>>) -> Vec<Vec<u8>> {
        p.iter().flatten().map(|s| b64(s)).collect()
    }

    #[test]
    fn known_answer_vectors() {
        let (leaves, roots) = reference();
        let mut files = Vec::new();
        for kind in ["inclusion", "consistency"] {
            json_files(&vectors_dir().join(kind), &mut files);
        }
        assert!(files.len() > 100, "only {} vector files found", files.len());
        let (mut accepted, mut rejected, mut compared) = (0, 0, 0);
        for file in &files {
            let text = std::fs::read_to_string(file).expect("vector is readable");
            let name = file.display();
            let is_inclusion = file.components().any(|c| c.as_os_str() == "inclusion");
            let (result, want_err, generated) = if is_inclusion {
                let v: InclusionVector = serde_json::from_str(&text).expect("inclusion vector");
                let (root, proof) = (b64(&v.root), b64_proof(&v.proof));
                let leaf = b64(&v.leaf_hash);
                let result = verify_inclusion(&leaf, v.leaf_idx, v.tree_size, &proof, &root);
                let tree = mem_tree(&leaves);
                let ours = (v.tree_size <= 8 && v.leaf_idx < v.tree_size)
                    .then(|| (v.tree_size, inclusion_proof(&tree, v.leaf_idx, v.tree_size)))
                    .filter(|(n, _)| {
                        root == roots[*n as usize] && leaf == tree.node(0, v.leaf_idx)
                    });
                (result, v.want_err, ours.map(|(_, p)| (p, proof)))
            } else {
                let v: ConsistencyVector = serde_json::from_str(&text).expect("consistency vector");
                let (root1, root2, proof) = (b64(&v.root1), b64(&v.root2), b64_proof(&v.proof));
                let result = verify_consistency(v.size1, v.size2, &proof, &root1, &root2);
                let ours = (v.size1 <= v.size2 && v.size2 <= 8)
                    .then(|| consistency_proof(&mem_tree(&leaves), v.size1, v.size2))
                    .filter(|_| {
                        root1 == roots[v.size1 as usize] && root2 == roots[v.size2 as usize]
                    });
                (result, v.want_err, ours.map(|p| (p, proof)))
            };
            assert_eq!(result.is_err(), want_err, "{name}: got {result:?}");
            if want_err {
                rejected += 1;
            } else {
                accepted += 1;
                if let Some((ours, theirs)) = generated {
                    let ours: Vec<Vec<u8>> =
                        ours.expect("proof").iter().map(|h| h.to_vec()).collect();
                    assert_eq!(ours, theirs, "{name}: generated proof differs");
                    compared += 1;
                }
            }
        }
        eprintln!(
            "{} vector files: {accepted} accepted, {rejected} rejected",
            files.len()
        );
        // inclusion/{0..4} and consistency/{0..4} happy paths are over the reference leaves.
        assert!(
            compared >= 10,
            "only {compared} happy paths compared with generated proofs"
        );
    }

    #[test]
    fn reference_roots_and_hashes() {
        let (leaves, roots) = reference();
        assert_eq!(roots.len(), 9);
        assert_eq!(empty_root(), roots[0]);
        for (n, want) in roots.iter().enumerate() {
            assert_eq!(root(&mem_tree(&leaves[..n]), n as u64), *want, "size {n}");
            assert_eq!(root(&mem_tree(&leaves), n as u64), *want, "prefix {n} of 8");
            assert_eq!(naive::mth(&leaves[..n]), *want, "naive size {n}");
        }
    }

    #[test]
    fn flat_positions_and_completed_nodes() {
        let positions = [
            ((0, 0), 0),
            ((0, 3), 6),
            ((1, 0), 1),
            ((1, 1), 5),
            ((2, 0), 3),
            ((3, 1), 23),
        ];
        for ((level, index), want) in positions {
            assert_eq!(position(level, index), want, "position({level}, {index})");
        }
        let completed: [(u64, &[(u32, u64)]); 5] = [
            (0, &[(0, 0)]),
            (1, &[(0, 1), (1, 0)]),
            (3, &[(0, 3), (1, 1), (2, 0)]),
            (6, &[(0, 6)]),
            (11, &[(0, 11), (1, 5), (2, 2)]),
        ];
        for (leaf, want) in completed {
            assert_eq!(
                nodes_completed_by(leaf).collect::<Vec<_>>(),
                want,
                "leaf {leaf}"
            );
        }
        // Appending leaves 0..n writes each flat position once, and 2n - popcount(n) in all.
        let mut seen = std::collections::HashSet::new();
        for leaf in 0..1000u64 {
            for (level, index) in nodes_completed_by(leaf) {
                assert!(
                    seen.insert(position(level, index)),
                    "leaf {leaf} rewrites a node"
                );
            }
            assert_eq!(
                seen.len() as u64,
                2 * (leaf + 1) - (leaf + 1).count_ones() as u64
            );
        }
    }

    #[test]
    fn small_trees_match_naive_exhaustively() {
        let leaves: Vec<Vec<u8>> = (0..40u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let tree = mem_tree(&leaves);
        for n in 0..=leaves.len() {
            let (d, size) = (&leaves[..n], n as u64);
            let r = root(&tree, size);
            assert_eq!(r, naive::mth(d), "root {n}");
            for i in 0..n {
                let proof = inclusion_proof(&tree, i as u64, size).expect("in range");
                assert_eq!(proof, naive::path(i, d), "PATH({i}, D[{n}])");
                assert_eq!(
                    verify_inclusion(&tree.node(0, i as u64), i as u64, size, &proof, &r),
                    Ok(())
                );
            }
            for m in 1..=n {
                let proof = consistency_proof(&tree, m as u64, size).expect("m <= n");
                assert_eq!(proof, naive::proof(m, d), "PROOF({m}, D[{n}])");
                let r1 = root(&tree, m as u64);
                assert_eq!(verify_consistency(m as u64, size, &proof, &r1, &r), Ok(()));
            }
        }
        let errors = [
            (
                inclusion_proof(&tree, 5, 5),
                ProofError::IndexOutOfRange { index: 5, size: 5 },
            ),
            (consistency_proof(&tree, 0, 5), ProofError::EmptyOld),
            (consistency_proof(&tree, 0, 0), ProofError::EmptyOld),
            (
                consistency_proof(&tree, 6, 5),
                ProofError::SizeOrder { size1: 6, size2: 5 },
            ),
        ];
        for (got, want) in errors {
            assert_eq!(got, Err(want));
        }
    }

    /// A source of synthetic node hashes that counts reads, for cost checks at huge sizes.
    struct Counting(std::cell::Cell<u64>);
    impl NodeSource for Counting {
        fn node(&self, level: u32, index: u64) -> Hash {
            self.0.set(self.0.get() + 1);
            let mut h = [0; 32];
            h[..8].copy_from_slice(&index.to_le_bytes());
            h[8..12].copy_from_slice(&level.to_le_bytes());
            h
        }
    }

    #[test]
    fn proofs_read_logarithmically_many_nodes() {
        let src = Counting(std::cell::Cell::new(0));
        let sizes = [
            10_000_000u64,
            10_000_001,
            (1 << 40) + 12_345,
            u64::MAX >> 1,
            u64::MAX,
        ];
        let reads = |f: &dyn Fn()| {
            src.0.set(0);
            f();
            src.0.get()
        };
        for n in sizes {
            let bound = 2 * u64::from(bit_len(n)) + 1;
            for x in [0, 1, n / 3, n / 2, n - 2, n - 1] {
                let r = reads(&|| drop(inclusion_proof(&src, x, n).expect("in range")));
                assert!(r <= bound, "inclusion {x}/{n}: {r} reads");
                let r = reads(&|| drop(consistency_proof(&src, x.max(1), n).expect("ordered")));
                assert!(r <= bound, "consistency {x}/{n}: {r} reads");
                assert_eq!(
                    reads(&|| {
                        root(&src, n);
                    }),
                    u64::from(n.count_ones())
                );
            }
        }
    }

    /// Flips bit `bit` of one element of `proof` (which must be non-empty).
    fn flip(proof: &[Hash], bit: usize) -> Vec<Hash> {
        let mut p = proof.to_vec();
        let (at, rest) = (bit % p.len(), bit / p.len());
        p[at][rest % 32] ^= 1 << ((rest / 32) % 8);
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn matches_naive_and_rejects_tampering(
            data in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 1..=300),
            picks in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), any::<usize>()), 4),
        ) {
            // Distinct leaves, so that no two subtrees share a hash.
            let leaves: Vec<Vec<u8>> = data.iter().enumerate()
                .map(|(i, d)| [&(i as u32).to_be_bytes()[..], d].concat()).collect();
            let tree = mem_tree(&leaves);
            for (a, b, c, bit) in picks {
                let n = 1 + a % leaves.len() as u64;
                let (i, m) = (b % n, 1 + c % n);
                let d = &leaves[..n as usize];
                let (rn, rm) = (root(&tree, n), root(&tree, m));
                prop_assert_eq!(rn, naive::mth(d));

                let leaf = leaf_hash(&leaves[i as usize]);
                let proof = inclusion_proof(&tree, i, n).expect("in range");
                prop_assert_eq!(&proof, &naive::path(i as usize, d));
                prop_assert_eq!(verify_inclusion(&leaf, i, n, &proof, &rn), Ok(()));
                if !proof.is_empty() {
                    prop_assert!(verify_inclusion(&leaf, i, n, &flip(&proof, bit), &rn).is_err());
                }
                for j in [i ^ 1, i + 1, i.wrapping_sub(1), (i + n / 2) % n, n] {
                    if j != i {
                        prop_assert!(verify_inclusion(&leaf, j, n, &proof, &rn).is_err());
                    }
                }
                for s in [n + 1, n - 1, 2 * n, n / 2, n + 7] {
                    if s != n && s > i {
                        let same = inclusion_trace(i, s) == inclusion_trace(i, n);
                        prop_assert_eq!(verify_inclusion(&leaf, i, s, &proof, &rn).is_ok(), same);
                    }
                }

                let proof = consistency_proof(&tree, m, n).expect("ordered");
                prop_assert_eq!(&proof, &naive::proof(m as usize, d));
                prop_assert_eq!(verify_consistency(m, n, &proof, &rm, &rn), Ok(()));
                if !proof.is_empty() {
                    prop_assert!(verify_consistency(m, n, &flip(&proof, bit), &rm, &rn).is_err());
                }
                if m != n {
                    prop_assert!(verify_consistency(m, n, &proof, &rn, &rm).is_err());
                }
                let wrong = [(m + 1, n), (m - 1, n), (2 * m, n), (m / 2, n), (m, n + 1), (m, n - 1), (m, 2 * n)];
                for (s1, s2) in wrong {
                    if (s1, s2) != (m, n) {
                        let ok = verify_consistency(s1, s2, &proof, &rm, &rn).is_ok();
                        let same = 0 < s1 && s1 < s2 && m < n
                            && consistency_trace(s1, s2) == consistency_trace(m, n);
                        prop_assert_eq!(ok, same, "sizes {}->{} for a {}->{} proof", s1, s2, m, n);
                    }
                }
            }
        }
    }
}
