//! Inclusion and consistency proof generation at 1M and 10M entries (goal: under 50 us each).
//!
//! Two kinds of measurement, named apart:
//! - `proof/synthetic_tree/...`: `merkle::inclusion_proof` / `merkle::consistency_proof` over
//!   a node-hash file (`storage::TreeFile`, memory-mapped) written by `TreeFile::push_leaf`
//!   for 10M synthetic leaf hashes: the exact structure `Ledger::inclusion_proof` reads. The
//!   1M figures use the same file with tree size 1,000,000 (its first 1M leaves are exactly
//!   that tree).
//! - `proof/ledger_1m/...`: `Ledger::inclusion_proof` / `Ledger::consistency_proof` on the
//!   real 1M-entry ledger (the cached one built from signed appends), proving against its
//!   current size.
//!
//! Indexes (and old sizes) vary over 4096 pseudo-random values per benchmark. The nodes they
//! read are in the page cache after the warm-up: this measures the proof code, not disk reads.
#![allow(clippy::unwrap_used)]

mod support;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ledger::merkle::{self, NodeSource};
use ledger::storage::TreeFile;
use ledger::{Config, Ledger};

use support::*;

const VARIANTS: usize = 4096;

fn check_proofs(tree: &TreeFile, n: u64) {
    let root = merkle::root(tree, n);
    for &i in &spread(16, 0, n, 99) {
        let p = merkle::inclusion_proof(tree, i, n).unwrap();
        merkle::verify_inclusion(&synthetic_leaf(i), i, n, &p, &root).unwrap();
        assert_eq!(tree.node(0, i), synthetic_leaf(i));
        let m = i.max(1);
        let p = merkle::consistency_proof(tree, m, n).unwrap();
        merkle::verify_consistency(m, n, &p, &merkle::root(tree, m), &root).unwrap();
    }
}

fn synthetic(c: &mut Criterion) {
    let tree = TreeFile::open_readonly(&big_tree()).unwrap();
    let mut g = c.benchmark_group("proof/synthetic_tree");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    for n in [1_000_000u64, TREE_LEAVES] {
        check_proofs(&tree, n);
        let leaves = spread(VARIANTS, 0, n, n);
        let olds = spread(VARIANTS, 1, n, n + 1);
        println!(
            "tree size {n}: inclusion proof of leaf {} has {} hashes; consistency from {} has {}",
            leaves[0],
            merkle::inclusion_proof(&tree, leaves[0], n).unwrap().len(),
            olds[0],
            merkle::consistency_proof(&tree, olds[0], n).unwrap().len()
        );
        g.bench_with_input(BenchmarkId::new("inclusion", n), &n, |b, &n| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) % VARIANTS;
                merkle::inclusion_proof(&tree, black_box(leaves[k]), n).unwrap()
            })
        });
        g.bench_with_input(BenchmarkId::new("consistency", n), &n, |b, &n| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) % VARIANTS;
                merkle::consistency_proof(&tree, black_box(olds[k]), n).unwrap()
            })
        });
    }
    g.finish();
}

fn real_ledger(c: &mut Criterion) {
    let (ledger, _) = Ledger::open(&big_ledger(), Config::default()).unwrap();
    let n = ledger.size();
    let leaves = spread(VARIANTS, 0, n, 7);
    let olds = spread(VARIANTS, 1, n, 8);
    let root = ledger.root(n).unwrap();
    for k in 0..16 {
        let p = ledger.inclusion_proof(leaves[k], None).unwrap();
        let leaf = ledger.leaf_hash(leaves[k]).unwrap();
        merkle::verify_inclusion(&leaf, leaves[k], n, &p, &root).unwrap();
        let p = ledger.consistency_proof(olds[k], None).unwrap();
        let old_root = ledger.root(olds[k]).unwrap();
        merkle::verify_consistency(olds[k], n, &p, &old_root, &root).unwrap();
    }
    let mut g = c.benchmark_group("proof/ledger_1m");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_with_input(BenchmarkId::new("inclusion", n), &n, |b, _| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % VARIANTS;
            ledger.inclusion_proof(black_box(leaves[k]), None).unwrap()
        })
    });
    g.bench_with_input(BenchmarkId::new("consistency", n), &n, |b, _| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % VARIANTS;
            ledger.consistency_proof(black_box(olds[k]), None).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, synthetic, real_ledger);
criterion_main!(benches);
