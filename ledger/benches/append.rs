//! Durable appends (goal: >= 20,000 entries/s with 64 appenders on 2 cores).
//!
//! A real on-disk ledger under `$LEDGER_BENCH_DIR/tmp` (default config: group commit with one
//! `fdatasync` per batch, a checkpoint signed every second). Each appended entry is a
//! realistic signed entry:
//! - `receipt_1k`: a query receipt with ~350 bytes of SQL (a ~1 KB leaf: the digests,
//!   mechanism, signature and envelope take ~650 bytes), appended with
//!   `Ledger::append_as_operator` (the ledger signs, then checks the signature, as the broker
//!   does);
//! - `receipt_sql800`: the same with ~800 bytes of SQL (a ~1.5 KB leaf);
//! - `consent_400b`: a consent signed by the custodian in the appending thread, appended with
//!   `Ledger::append` (which checks the signature).
//!
//! An iteration is one acknowledged (durable) append; throughput is in entries/s. With N
//! threads, the iterations of a sample are split evenly over N threads that start together.
#![allow(clippy::unwrap_used)]

mod support;

use std::hint::black_box;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use ledger::entry::{Body, SignedEntry};
use ledger::{Config, Ledger, keyfile};

use support::*;

/// Runs `iters` calls of `append` spread over `threads` threads; returns the wall time from
/// the moment all threads are ready to the last acknowledgement.
fn spread_appends(threads: u64, iters: u64, append: &(dyn Fn(u64) + Sync)) -> Duration {
    let barrier = Barrier::new(threads as usize + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let share = iters / threads + u64::from(t < iters % threads);
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..share {
                        append(t);
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            h.join().unwrap();
        }
        start.elapsed()
    })
}

fn appends(c: &mut Criterion) {
    let cast = Cast::new();
    let tmp = fresh_dir();
    let ledger = cast.init_ledger(tmp.path(), Config::default());
    let operator = keyfile::read_private_key(&tmp.path().join(ledger::ledger::KEY_FILE)).unwrap();

    // Leaf sizes of what is appended.
    println!("ledger in {}", tmp.path().display());
    for (name, sql_len) in [("receipt_1k", RECEIPT_SQL), ("receipt_sql800", 800)] {
        let r = SignedEntry::sign(
            &operator,
            operator_entry(&ledger, receipt_body(&cast, 1, sql_len)),
        );
        let Body::QueryReceipt(body) = &r.entry.body else {
            unreachable!()
        };
        println!(
            "{name}: leaf {} bytes (sql {} bytes)",
            r.leaf_bytes().len(),
            body.sql.len()
        );
    }
    let consent = cast.custodian.sign(consent_body(&cast, 1));
    println!("consent_400b: leaf {} bytes", consent.leaf_bytes().len());

    let mut g = c.benchmark_group("append_durable");
    g.throughput(Throughput::Elements(1));
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(10));

    let n = AtomicU64::new(0);
    for (name, sql_len, threads) in [
        ("receipt_1k", RECEIPT_SQL, 1u64),
        ("receipt_1k", RECEIPT_SQL, 64),
        ("receipt_sql800", 800, 64),
    ] {
        g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                spread_appends(threads, iters, &|_| {
                    let i = n.fetch_add(1, Ordering::Relaxed);
                    let body = receipt_body(&cast, i, sql_len);
                    black_box(ledger.append_as_operator(body).unwrap());
                })
            })
        });
    }
    let next_subject = AtomicU64::new(0);
    g.bench_with_input(BenchmarkId::new("consent_400b", 64), &64, |b, &threads| {
        b.iter_custom(|iters| {
            spread_appends(threads, iters, &|_| {
                let i = next_subject.fetch_add(1, Ordering::Relaxed);
                let signed = cast.custodian.sign(consent_body(&cast, i));
                black_box(ledger.append(signed).unwrap());
            })
        })
    });
    g.finish();
    println!("ledger size after the appends: {} entries", ledger.size());
    ledger.close().unwrap();
}

fn operator_entry(ledger: &Ledger, body: Body) -> ledger::entry::Entry {
    ledger::entry::Entry {
        author: ledger.operator(),
        time: ledger::ids::Timestamp::now(),
        body,
    }
}

criterion_group!(benches, appends);
criterion_main!(benches);
