//! Replaying the cached 1M-entry ledger (8 setup entries, 899,993 consents of ~450 B on one
//! opt-in dataset, 99,999 query receipts of ~1 KB; built once from signed appends):
//! - `ledger_1m/open`: `Ledger::open` (scan, replay, rebuild state, check every stored node
//!   hash). Goal: under 3 s. The ledger is dropped (closed) between iterations, untimed.
//! - `ledger_1m/verify`: `ledger::verify` (everything open does, plus canonical re-encoding
//!   and every author signature). Goal: >= 30,000 entries/s.
//! - `consent_filter/...`: `State::consent_filter` for (`ehr`, `t2d`): which subjects of the
//!   dataset permit the study's purpose at a time. `cold` recomputes the filter every call,
//!   `warm` is answered from the filter cache.
//!   - `ledger_1m`: the opened ledger's state (899,993 consents). Cold calls alternate between
//!     two query times a day apart with consent expiries between them, so the cache (keyed by
//!     a validity window) misses every time.
//!   - `state_1m`: an in-memory `State` with exactly 1,000,000 consents applied directly (no
//!     log); cold calls follow the application of one more consent (untimed), which bumps the
//!     dataset's consent generation as a real new consent does.
//! - `per_entry/...`: the per-entry costs of a replay (and of an append: encoding, signing),
//!   to see what dominates.
//!
//! The ledger's files are normally in the page cache after the first iteration, but a
//! proactive reclaimer (DAMON on some VMs) may evict them between iterations.
//! Set `LEDGER_BENCH_BREAKDOWN=1` to also print a one-shot timing breakdown of a replay, with
//! the CPU time of each stage (wall time alone misleads on a machine shared with other work).
#![allow(clippy::unwrap_used)]

mod support;

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ledger::entry::{Entry, SignedEntry, split_leaf};
use ledger::ids::Timestamp;
use ledger::replay::{ReplayOptions, TreeMode, replay};
use ledger::state::ConsentFilter;
use ledger::storage::{self, TreeFile};
use ledger::{Config, Ledger, State, keyfile, merkle};

use support::*;

fn slow_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    secs: u64,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(secs));
    g
}

fn open_and_verify(c: &mut Criterion) {
    let dir = big_ledger();
    if std::env::var_os("LEDGER_BENCH_BREAKDOWN").is_some() {
        breakdown(&dir);
    }
    let mut g = slow_group(c, "ledger_1m", 30);
    g.throughput(Throughput::Elements(BIG_ENTRIES));
    g.bench_function("open", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let (l, report) = Ledger::open(&dir, Config::default()).unwrap();
                total += start.elapsed();
                assert_eq!(report.entries, BIG_ENTRIES);
                assert_eq!(report.nodes_repaired, 0);
                drop(l);
            }
            total
        })
    });
    g.bench_function("verify", |b| {
        b.iter(|| {
            let r = ledger::verify(&dir, &|_, _| {}).unwrap();
            assert_eq!(r.entries, BIG_ENTRIES);
            r
        })
    });
    g.finish();
}

/// CPU seconds used by this process so far (user + system, from `/proc/self/stat`, in
/// 1/100 s ticks), or NaN where that file is missing.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// One-shot timings (wall and CPU) of the stages of a replay of the big ledger.
fn breakdown(dir: &Path) {
    let key = keyfile::read_private_key(&dir.join(ledger::ledger::KEY_FILE))
        .unwrap()
        .verifier();
    let log = std::fs::File::open(dir.join(storage::LOG_FILE)).unwrap();
    let map = storage::map_readonly(&log).unwrap().unwrap();
    let tree = TreeFile::open_readonly(&dir.join(storage::TREE_FILE)).unwrap();
    let t = Instant::now();
    let scan = storage::scan_log(&map).unwrap();
    println!(
        "breakdown: scan_log (framing + CRC32C of {} MB): {:.3} s",
        map.len() >> 20,
        t.elapsed().as_secs_f64()
    );
    for (strict, signatures, what) in [
        (
            false,
            false,
            "replay as open does (decode, hash, apply, check nodes)",
        ),
        (true, false, "replay + canonical re-encoding"),
        (
            true,
            true,
            "replay + canonical re-encoding + signatures (= verify)",
        ),
    ] {
        let opts = ReplayOptions {
            strict,
            signatures,
            ledger_key: &key,
            checkpoints: &[],
            progress: &|_, _| {},
        };
        let (t, cpu) = (Instant::now(), cpu_secs());
        let (state, _) = replay(&map, &scan.records, TreeMode::Check(&tree), &opts).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_secs() - cpu;
        println!(
            "breakdown: {what}: {secs:.3} s wall, {cpu:.1} s CPU ({:.0} entries/s)",
            state.size() as f64 / secs
        );
    }
    drop((map, tree));
    let (t, cpu) = (Instant::now(), cpu_secs());
    let (l, _) = Ledger::open(dir, Config::default()).unwrap();
    println!(
        "breakdown: Ledger::open: {:.3} s wall, {:.1} s CPU",
        t.elapsed().as_secs_f64(),
        cpu_secs() - cpu
    );
    drop(l);
}

fn per_entry(c: &mut Criterion) {
    let dir = big_ledger();
    let (l, _) = Ledger::open(&dir, Config::default()).unwrap();
    let first_of = |kind: &str| {
        let kind = format!("\"kind\":\"{kind}\"");
        (SETUP_ENTRIES..SETUP_ENTRIES + 100)
            .map(|i| l.leaf(i).unwrap())
            .find(|leaf| leaf.windows(kind.len()).any(|w| w == kind.as_bytes()))
            .unwrap()
    };
    let consent = first_of("consent_granted");
    let receipt = first_of("query_receipt");
    let custodian = Cast::new().custodian.key;
    let operator = keyfile::read_private_key(&dir.join(ledger::ledger::KEY_FILE)).unwrap();
    drop(l);
    println!(
        "leaf bytes: consent {}, receipt {}",
        consent.len(),
        receipt.len()
    );
    let mut g = c.benchmark_group("per_entry");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    for (kind, leaf, signer) in [
        ("consent", &consent, &custodian),
        ("receipt", &receipt, &operator),
    ] {
        let key = signer.verifier();
        let entry = SignedEntry::from_leaf(leaf, true).unwrap().entry;
        g.bench_function(format!("{kind}/decode"), |b| {
            b.iter(|| SignedEntry::from_leaf(black_box(leaf), false).unwrap())
        });
        g.bench_function(format!("{kind}/decode_strict"), |b| {
            b.iter(|| SignedEntry::from_leaf(black_box(leaf), true).unwrap())
        });
        g.bench_function(format!("{kind}/leaf_hash"), |b| {
            b.iter(|| merkle::leaf_hash(black_box(leaf)))
        });
        g.bench_function(format!("{kind}/verify_signature"), |b| {
            let (msg, sig) = split_leaf(leaf).unwrap();
            b.iter(|| assert!(key.verify_raw(black_box(msg), &sig)))
        });
        // Append-side costs (not part of a replay): canonical encoding and signing.
        g.bench_function(format!("{kind}/canonical_bytes"), |b| {
            b.iter(|| black_box(&entry).canonical_bytes())
        });
        g.bench_function(format!("{kind}/sign"), |b| {
            let (msg, _) = split_leaf(leaf).unwrap();
            b.iter(|| signer.sign_raw(black_box(msg)))
        });
    }
    g.finish();
}

fn admitted(f: &ConsentFilter) -> usize {
    f.ids().len()
}

fn filter_on_ledger(c: &mut Criterion) {
    let (l, _) = Ledger::open(&big_ledger(), Config::default()).unwrap();
    let t1 = Timestamp::now();
    let t2 = t1.plus_secs(86_400);
    let state = l.state();
    let f1 = state.consent_filter(DATASET, STUDY, t1).unwrap();
    let f2 = state.consent_filter(DATASET, STUDY, t2).unwrap();
    assert_ne!(f1, f2, "consents expire between the two query times");
    println!(
        "consent_filter/ledger_1m: {} of {} consents admit {STUDY} at {t1}, {} a day later",
        admitted(&f1),
        BIG_JOBS - BIG_JOBS / 10,
        admitted(&f2)
    );
    let mut g = slow_group(c, "consent_filter/ledger_1m", 10);
    g.bench_function("cold", |b| {
        let mut k = 0u64;
        b.iter(|| {
            k += 1;
            state
                .consent_filter(DATASET, STUDY, if k.is_multiple_of(2) { t1 } else { t2 })
                .unwrap()
        })
    });
    g.sampling_mode(SamplingMode::Auto);
    g.sample_size(100);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    g.bench_function("warm", |b| {
        b.iter(|| state.consent_filter(DATASET, STUDY, black_box(t1)).unwrap())
    });
    g.finish();
}

fn filter_on_state(c: &mut Criterion) {
    const CONSENTS: u64 = 1_000_000;
    let cast = Cast::new();
    let t = Instant::now();
    let mut state = cast.setup_state();
    let key_since = state
        .principal(cast.custodian.id.as_str())
        .unwrap()
        .key_since;
    let apply = |state: &mut State, i: u64| {
        let e: Entry = cast.custodian.entry(consent_body(&cast, i));
        let index = state.size();
        state.apply(e, index, key_since, &|_| None).unwrap();
    };
    for i in 0..CONSENTS {
        apply(&mut state, i);
    }
    let now = Timestamp::now();
    let f = state.consent_filter(DATASET, STUDY, now).unwrap();
    println!(
        "consent_filter/state_1m: state with {CONSENTS} consents built in {:.1} s; {} admit {STUDY}",
        t.elapsed().as_secs_f64(),
        admitted(&f)
    );
    let mut g = slow_group(c, "consent_filter/state_1m", 10);
    let mut next = CONSENTS;
    g.bench_function("cold", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                apply(&mut state, next);
                next += 1;
                let start = Instant::now();
                black_box(state.consent_filter(DATASET, STUDY, now).unwrap());
                total += start.elapsed();
            }
            total
        })
    });
    g.sampling_mode(SamplingMode::Auto);
    g.sample_size(100);
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));
    g.bench_function("warm", |b| {
        b.iter(|| {
            state
                .consent_filter(DATASET, STUDY, black_box(now))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    open_and_verify,
    per_entry,
    filter_on_ledger,
    filter_on_state
);
criterion_main!(benches);
