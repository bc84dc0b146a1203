//! The engine's runner for the DP peers benchmark kit (`bench/run_consentry`, see
//! `bench/README.md`): loads the kit's visits table from Parquet into memory, runs its four
//! queries (epsilon 1 each, privacy unit `patient_id`, at most 10 rows per patient, public key
//! lists) and prints the kit's JSON lines: `load`, `Q1`..`Q4` (seconds and result), `notes`.
//!
//! `--plain` runs the same SQL on plain DataFusion over the same in-memory table, without
//! privacy: the baseline that the DP overhead is measured against.
//!
//! `--repeat N` runs each query N times and reports the median time (and every time): at 1M
//! rows a query takes milliseconds, and one run's time is mostly the machine's noise.
//!
//! `--compare` (with `--repeat N`) loads both and runs each query N times through the engine
//! and N times on plain DataFusion, alternating, then prints per query the two medians and
//! their ratio: the DP overhead measured side by side in one process, so the machine's other
//! work weighs on both alike.
//!
//! usage: peer_bench [--plain | --compare] [--repeat N] VISITS.parquet
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use anonymizer::{ConsentFilter, Dataset, Engine, Policy, Request};
use arrow::array::{Array, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

const QUERIES: [(&str, &str); 4] = [
    ("Q1", "SELECT COUNT(*) AS n FROM visits"),
    (
        "Q2",
        "SELECT diagnosis, COUNT(*) AS n FROM visits GROUP BY diagnosis",
    ),
    (
        "Q3",
        "SELECT sex, AVG(hba1c) AS avg_hba1c FROM visits GROUP BY sex",
    ),
    (
        "Q4",
        "SELECT site, SUM(systolic_bp) AS sum_sbp FROM visits GROUP BY site",
    ),
];

#[path = "shared/visits_kit.rs"]
mod visits_kit;

/// A field of `/proc/self/status` in bytes (Linux; `None` elsewhere).
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

fn read_parquet(path: &str) -> anyhow::Result<Vec<RecordBatch>> {
    let f = std::fs::File::open(path)?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?
        .with_batch_size(64 * 1024)
        .build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

/// A result as the kit wants it: `{key: value}` when the first column is a text key (the
/// value is the second column), else the first column's first value.
fn result_json(batches: &[RecordBatch]) -> anyhow::Result<serde_json::Value> {
    let mut map = serde_json::Map::new();
    for b in batches {
        let keyed = matches!(
            b.schema().field(0).data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
        );
        let value = arrow::compute::cast(b.column(usize::from(keyed)), &DataType::Float64)?;
        let value = value
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or_else(|| anyhow::anyhow!("the value column is not numeric"))?;
        if !keyed {
            return Ok(value.value(0).into());
        }
        let keys = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let keys = keys
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| anyhow::anyhow!("the key column is not text"))?;
        for i in 0..b.num_rows() {
            if value.is_valid(i) {
                map.insert(keys.value(i).to_owned(), value.value(i).into());
            }
        }
    }
    Ok(map.into())
}

/// The `k`th run of one query: through the engine (DP), else on plain DataFusion.
async fn run_once(
    engine: Option<&Engine>,
    ctx: Option<&SessionContext>,
    everyone: &ConsentFilter,
    sql: &str,
    k: usize,
) -> anyhow::Result<serde_json::Value> {
    match (engine, ctx) {
        (Some(engine), _) => {
            let release = engine
                .run(&Request {
                    scope: "peers",
                    sql,
                    // Each run its own query (not a free identical repeat), at the same
                    // epsilon to within 1e-9.
                    epsilon: 1.0 + k as f64 * 1e-12,
                    delta: 0.0,
                    // The kit's workload is pure DP, as its peers run it.
                    mechanism: Some(anonymizer::Mechanism::Laplace),
                    accuracy: None,
                    filter: everyone,
                    budget: anonymizer::Account::new(f64::MAX, 1.0),
                    min_cell_size: None,
                })
                .await?;
            result_json(&release.batches)
        }
        (None, Some(ctx)) => result_json(&ctx.sql(sql).await?.collect().await?),
        (None, None) => unreachable!("one of the two is set"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `--compare`: each query alternately through the engine and on plain DataFusion.
async fn compare(repeat: usize, path: &str) -> anyhow::Result<()> {
    let batches = read_parquet(path)?;
    let schema = batches
        .first()
        .map(RecordBatch::schema)
        .ok_or_else(|| anyhow::anyhow!("empty table"))?;
    let parts = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut partitions = vec![Vec::new(); parts];
    for (i, b) in batches.iter().enumerate() {
        partitions[i % parts].push(b.clone());
    }
    let ctx = SessionContext::new();
    ctx.register_table("visits", Arc::new(MemTable::try_new(schema, partitions)?))?;
    let policy = Policy::from_toml(&visits_kit::policy())?;
    let dataset = Dataset::from_batches(policy, vec![("visits".to_owned(), batches)])?;
    let engine = Engine::with_limits(dataset, anonymizer::Limits::unscheduled())?;
    let everyone = ConsentFilter::everyone();
    let (mut dp_total, mut plain_total) = (0.0, 0.0);
    for (q, sql) in QUERIES {
        let (mut dp, mut plain) = (Vec::new(), Vec::new());
        for k in 0..repeat {
            let t = Instant::now();
            run_once(Some(&engine), None, &everyone, sql, k).await?;
            dp.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            run_once(None, Some(&ctx), &everyone, sql, k).await?;
            plain.push(t.elapsed().as_secs_f64());
        }
        let (d, p) = (median(dp), median(plain));
        dp_total += d;
        plain_total += p;
        emit(
            serde_json::json!({"phase": q, "dp_s": d, "plain_s": p, "ratio": d / p, "runs": repeat}),
        );
    }
    emit(serde_json::json!({
        "phase": "total", "dp_s": dp_total, "plain_s": plain_total,
        "ratio": dp_total / plain_total, "runs": repeat,
    }));
    Ok(())
}

async fn run(plain: bool, repeat: usize, path: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    let batches = read_parquet(path)?;
    let arrow_bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let (engine, ctx) = if plain {
        let parts = std::thread::available_parallelism().map_or(1, |n| n.get());
        let schema = batches
            .first()
            .map(RecordBatch::schema)
            .ok_or_else(|| anyhow::anyhow!("empty table"))?;
        let mut partitions = vec![Vec::new(); parts];
        for (i, b) in batches.into_iter().enumerate() {
            partitions[i % parts].push(b);
        }
        let ctx = SessionContext::new();
        ctx.register_table("visits", Arc::new(MemTable::try_new(schema, partitions)?))?;
        (None, Some(ctx))
    } else {
        let policy = Policy::from_toml(&visits_kit::policy())?;
        let dataset = Dataset::from_batches(policy, vec![("visits".to_owned(), batches)])?;
        (
            Some(Engine::with_limits(
                dataset,
                anonymizer::Limits::unscheduled(),
            )?),
            None,
        )
    };
    emit(serde_json::json!({"phase": "load", "s": t.elapsed().as_secs_f64()}));

    let everyone = ConsentFilter::everyone();
    for (q, sql) in QUERIES {
        let mut times = Vec::with_capacity(repeat);
        let mut result = serde_json::Value::Null;
        for k in 0..repeat {
            let t = Instant::now();
            result = run_once(engine.as_ref(), ctx.as_ref(), &everyone, sql, k).await?;
            times.push(t.elapsed().as_secs_f64());
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let mut line =
            serde_json::json!({"phase": q, "s": sorted[sorted.len() / 2], "result": result});
        if repeat > 1 {
            line["runs"] = times.into();
        }
        emit(line);
    }
    let notes = if plain {
        "non-private baseline: the same SQL on DataFusion over the same in-memory table"
    } else {
        "public key lists; OpenDP noise (Laplace on bounded counts and centred sums); \
         contribution bounding at load"
    };
    emit(serde_json::json!({
        "phase": "notes",
        "notes": format!("{notes}; {rows} rows, Arrow size {:.0} MiB", arrow_bytes as f64 / 1048576.0),
        "arrow_bytes": arrow_bytes,
        // The process's own peak, and how much of its resident memory is file-backed (the
        // binary's code pages, shared and reclaimable) at the end.
        "peak_rss_bytes": status_bytes("VmHWM:"),
        "rss_file_bytes": status_bytes("RssFile:"),
        "versions": {"consentry": env!("CARGO_PKG_VERSION"), "datafusion": "55"},
    }));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plain = args.iter().any(|a| a == "--plain");
    let repeat = match args.iter().position(|a| a == "--repeat") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow::anyhow!("--repeat takes a number of runs, 1 or more"))?,
        None => 1,
    };
    let Some(path) = args.last().filter(|p| p.ends_with(".parquet")) else {
        anyhow::bail!("usage: peer_bench [--plain | --compare] [--repeat N] VISITS.parquet");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.iter().any(|a| a == "--compare") {
        rt.block_on(compare(repeat, path))
    } else {
        rt.block_on(run(plain, repeat, path))
    }
}
