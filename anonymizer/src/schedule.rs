//! The release schedule: when the outcome of a draw (the one stage that reads rows) may leave.
//!
//! How long a draw takes depends on the rows: a CASE evaluates its branch only on the rows it
//! selects, a filter runs what lies above it only on the rows it keeps, a join multiplies one
//! patient's rows. An expensive expression reached only by a target's rows made a query
//! seconds slower exactly when the target's rows held what was asked. So a draw's outcome
//! (an answer or a failure) leaves no earlier than the draw's *worst case*, a duration
//! computed before the draw from public figures alone: the registered rows of the tables it
//! reads (and the most rows their join could produce under the policy's bounds), as if every
//! row went through every function call the query makes, at this machine's measured cost per
//! row and per call on the longest text a call may return ([`crate::total::MAX_TEXT`]). A
//! query whose worst case exceeds the deadline is refused when planned. The outcome then
//! leaves at the first step of `ladder · 2^k` past both the worst case and the draw's own
//! time: the draw can only show through its timing when it runs past its own worst case
//! (the machine overloaded), and then only as a step.
//!
//! The costs are measured once per process ([`costs`]) on synthetic rows (no patient's data):
//! a count over 4,096 rows, and the same with eight text calls per row on 1,000-byte text
//! (case changes; and trims by a 16-character set matching every character at its end, the
//! dearest call a query may make: function arguments and results are at most
//! [`crate::total::MAX_TEXT`] bytes, literals [`crate::total::MAX_LITERAL`], trim sets
//! [`crate::total::MAX_TRIM_SET`] characters), each the slowest of three runs, the dearer
//! kind taken.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use tokio::sync::OnceCell;

use crate::consent::ConsentFilter;
use crate::dataset::Dataset;
use crate::engine::{Engine, Limits, Request};
use crate::policy::Policy;

/// What a row and a function call on it cost on this machine, in seconds (measured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// A row through a query's scan, guards and aggregate.
    pub per_row: f64,
    /// A function call on a row (on text as long as a call may return).
    pub per_call: f64,
}

/// How much the worst case is above the measured costs.
const MARGIN: f64 = 2.0;

/// Rows of the measuring table.
const ROWS: usize = 4096;

impl Costs {
    /// The worst case of a draw that reads `rows` rows (the tables' registered rows and the
    /// most rows their join can produce) making `calls` function calls per row.
    pub fn worst(&self, rows: u64, calls: usize) -> Duration {
        let seconds = MARGIN * rows as f64 * (self.per_row + self.per_call * calls as f64);
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
    }
}

static COSTS: OnceCell<Costs> = OnceCell::const_new();

/// This machine's costs, measured on first use (synthetic rows only). A boxed future of a
/// declared type: measuring runs the engine, whose draws ask for the costs (an unscheduled
/// engine never does, but the futures' types would nest without end).
pub fn costs() -> std::pin::Pin<Box<dyn std::future::Future<Output = Costs> + Send>> {
    Box::pin(async { *COSTS.get_or_init(measure).await })
}

async fn measure() -> Costs {
    let fallback = Costs {
        per_row: 1e-6,
        per_call: 1e-5,
    };
    match try_measure().await {
        Some(c) => {
            tracing::info!(
                per_row_ns = c.per_row * 1e9,
                per_call_ns = c.per_call * 1e9,
                "release schedule: costs measured on synthetic rows"
            );
            c
        }
        None => {
            tracing::error!("measuring the release schedule's costs failed; using slow defaults");
            fallback
        }
    }
}

async fn try_measure() -> Option<Costs> {
    let policy = Policy::from_toml(
        "privacy_unit = \"u\"\nmax_rows_per_unit = 1\n\
         [tables.t.columns]\nu = { class = \"privacy_unit\" }\ns = { class = \"sensitive\" }\n",
    )
    .ok()?;
    let text = "x".repeat(1000);
    let schema = Arc::new(Schema::new(vec![
        Field::new("u", DataType::Utf8, false),
        Field::new("s", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..ROWS).map(|i| format!("u{i}")),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..ROWS).map(|_| text.as_str()),
            )),
        ],
    )
    .ok()?;
    let dataset = Dataset::from_batches(policy, vec![("t".into(), vec![batch])]).ok()?;
    let engine = Engine::with_limits(dataset, Limits::unscheduled()).ok()?;
    let everyone = ConsentFilter::everyone();
    let calls = "character_length(upper(lower(upper(lower(upper(lower(upper(s))))))))";
    // The dearest call a query may make: a trim of the longest text a call takes by the
    // largest set it may name, every character matched at the set's end. Four of them, each
    // with its length: eight calls.
    let trims = ["character_length(btrim(s, 'abcdefghijklmnox'))"; 4].join(" + ");
    let time = |sql: String, scope: String| {
        let engine = &engine;
        let everyone = &everyone;
        async move {
            let req = Request {
                scope: &scope,
                sql: &sql,
                epsilon: 1.0,
                delta: 0.0,
                mechanism: None,
                accuracy: None,
                filter: everyone,
                budget: ledger::budget::Account::new(1e9, 0.0),
                min_cell_size: None,
            };
            let began = std::time::Instant::now();
            engine.run(&req).await.ok()?;
            Some(began.elapsed().as_secs_f64())
        }
    };
    let (mut plain, mut called, mut trimmed) = (0f64, 0f64, 0f64);
    for k in 0..3 {
        plain = plain.max(time("SELECT COUNT(*) AS n FROM t".into(), format!("plain {k}")).await?);
        called = called.max(
            time(
                format!("SELECT COUNT(*) AS n FROM t WHERE {calls} > 0"),
                format!("called {k}"),
            )
            .await?,
        );
        trimmed = trimmed.max(
            time(
                format!("SELECT COUNT(*) AS n FROM t WHERE {trims} >= 0"),
                format!("trimmed {k}"),
            )
            .await?,
        );
    }
    Some(Costs {
        per_row: plain / ROWS as f64,
        per_call: (called.max(trimmed) - plain).max(0.0) / (ROWS * 8) as f64,
    })
}

/// When a draw that began `elapsed` ago, whose worst case is `worst`, may hand on its
/// outcome: the first step `ladder · 2^k` (k = 0, 1, ...) past both. `max(worst, elapsed)`
/// itself with a zero ladder (benchmarks only).
pub fn release_at(ladder: Duration, worst: Duration, elapsed: Duration) -> Duration {
    let due = worst.max(elapsed);
    if ladder.is_zero() {
        return elapsed;
    }
    let mut step = ladder;
    while step < due {
        match step.checked_mul(2) {
            Some(next) => step = next,
            None => return due,
        }
    }
    step
}

/// Runs `draw`, handing on its outcome at [`release_at`].
pub(crate) async fn on_schedule<T>(
    ladder: Duration,
    worst: Duration,
    draw: impl std::future::Future<Output = T>,
) -> T {
    let began = tokio::time::Instant::now();
    let out = draw.await;
    let at = release_at(ladder, worst, began.elapsed());
    if let Some(when) = began.checked_add(at) {
        tokio::time::sleep_until(when).await;
    }
    out
}
