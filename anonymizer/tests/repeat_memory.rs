//! The memory that answers kept for identical repeats really take, as the allocator counts it
//! (not as the cache estimates it), stays within `Limits::repeat_memory` however many distinct
//! queries are answered: a long-running broker's memory does not grow with its answers.
//!
//! One test in its own binary, so that the allocator's count is this test's alone.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use anonymizer::{Account, ConsentFilter, Dataset, Engine, Limits, Policy, Request};
use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};

/// Bytes allocated and not yet freed, by every thread of this test.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// A test's own allocator: the one place where counting what is live takes `unsafe`.
#[allow(unsafe_code)]
// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const POLICY: &str = r#"
privacy_unit = "patient_id"
max_rows_per_unit = 5

[tables.visits.columns]
patient_id = { class = "privacy_unit" }
sex = { class = "public", domain = ["F", "M"] }
hba1c = { class = "sensitive", bounds = [4.0, 14.0] }
"#;

fn visits(patients: i64) -> RecordBatch {
    let rows: Vec<i64> = (0..patients * 3).collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Int64, false),
            Field::new("sex", DataType::Utf8, false),
            Field::new("hba1c", DataType::Float64, true),
        ])),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r / 3))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| if r % 2 == 0 { "F" } else { "M" }),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| 4.0 + (r % 100) as f64 / 10.0),
            )),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_kept_for_repeats_take_no_more_memory_than_their_limit() {
    const LIMIT: usize = 128 << 10;
    let policy = Policy::from_toml(POLICY).unwrap();
    let ds = Dataset::from_batches(policy, vec![("visits".into(), vec![visits(200)])]).unwrap();
    let e = Engine::with_limits(
        ds,
        Limits {
            repeat_memory: LIMIT,
            ..Limits::unscheduled()
        },
    )
    .unwrap();
    let all = ConsentFilter::everyone();
    let mut live = Vec::new();
    // Distinct answers, each remembered: what a broker's day of queries leaves behind.
    for i in 0..600 {
        let sql = format!(
            "SELECT sex, COUNT(*) AS n, AVG(hba1c) AS mean FROM visits WHERE hba1c > {} \
             GROUP BY sex",
            f64::from(i) / 1000.0
        );
        let release = e
            .run(&Request {
                scope: "s1",
                sql: &sql,
                epsilon: 0.01,
                delta: 0.0,
                mechanism: None,
                accuracy: None,
                filter: &all,
                budget: Account::new(1e6, 0.0),
                min_cell_size: None,
            })
            .await
            .unwrap();
        assert!(!release.repeated);
        drop(release);
        // After a few answers the engine's own state is made (plans, the consent bitmap,
        // OpenDP's tables): what comes after is the answers kept.
        if i == 19 || i % 200 == 199 {
            live.push(LIVE.load(Ordering::Relaxed));
        }
    }
    let base = live[0];
    let kept: Vec<isize> = live[1..].iter().map(|l| l - base).collect();
    eprintln!("live bytes beyond the first 20 answers' after 200, 400 and 600 answers: {kept:?}");
    // 600 answers of about a kilobyte or more each would take several times the limit.
    let most = kept.iter().copied().max().unwrap();
    assert!(
        most as f64 <= LIMIT as f64 * 1.1,
        "answers kept took {most} bytes of memory, over the limit of {LIMIT}: {kept:?}"
    );
    // And the memory levelled off: the last 200 answers added nothing lasting.
    let (before, last) = (kept[kept.len() - 2], kept[kept.len() - 1]);
    assert!(
        (last - before).unsigned_abs() < LIMIT / 10,
        "live memory still moving over the last 200 answers: {kept:?}"
    );
}
