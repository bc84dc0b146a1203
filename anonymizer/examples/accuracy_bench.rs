//! Accuracy workload beside the DP peers: what a researcher's usual questions cost in error at
//! a given privacy guarantee, through the engine (`Engine::run`: bounds enforced on the data,
//! OpenDP noise), compared with the exact answer over the raw tables (plain DataFusion).
//!
//! ```text
//! accuracy_bench --visits visits_1m.parquet [--ehr <data-dir>/datasets/ehr/1] [--runs 20]
//! ```
//!
//! `--visits` is the peer kit's table (`bench/peers.sh` generates it); `--ehr` a dataset
//! directory of the demo (`broker demo --data-dir D` writes `D/datasets/ehr/1`: `policy.toml`
//! and one folder of Parquet files per table). Prints one JSON line per (dataset, query):
//! the median absolute and relative error over every released cell of `--runs` runs, the
//! median 95% half-width the engine reported, the noise it chose and what it spent.
//! `bench/accuracy.sh` runs it with the peers (`bench/accuracy_peers.py`) and makes the table.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anonymizer::dataset::TableSource;
use anonymizer::{Account, ConsentFilter, Dataset, Engine, Mechanism, Policy, Request, Spend};
use arrow::array::{Array, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;

#[path = "shared/visits_kit.rs"]
mod visits_kit;
use visits_kit::DIAGNOSES;

/// One question of the workload.
struct Question {
    name: &'static str,
    sql: String,
    epsilon: f64,
    mechanism: Option<Mechanism>,
}

fn q(name: &'static str, sql: &str, epsilon: f64) -> Question {
    Question {
        name,
        sql: sql.to_owned(),
        epsilon,
        mechanism: None,
    }
}

/// Cells of a result: key (the text of every non-value column) to value; `value` names the
/// value column.
fn cells(batches: &[RecordBatch], value: &str) -> anyhow::Result<HashMap<String, f64>> {
    let mut out = HashMap::new();
    for b in batches {
        let schema = b.schema();
        let v = b
            .column_by_name(value)
            .ok_or_else(|| anyhow::anyhow!("no column {value}"))?;
        let v = arrow::compute::cast(v, &DataType::Float64)?;
        let v = v
            .as_any()
            .downcast_ref::<Float64Array>()
            .ok_or_else(|| anyhow::anyhow!("{value} is not numeric"))?
            .clone();
        let keys: Vec<StringArray> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| f.name() != value && !f.name().ends_with("_ci95"))
            .map(|(i, _)| {
                let k = arrow::compute::cast(b.column(i), &DataType::Utf8)?;
                Ok(k.as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| anyhow::anyhow!("a key is not text"))?
                    .clone())
            })
            .collect::<anyhow::Result<_>>()?;
        for r in 0..b.num_rows() {
            if v.is_valid(r) {
                let key = keys
                    .iter()
                    .map(|k| k.value(r).to_owned())
                    .collect::<Vec<_>>()
                    .join("|");
                out.insert(key, v.value(r));
            }
        }
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Errors of one run against the truth: every true cell (a missing one counts as 0 released).
fn errors(
    truth: &HashMap<String, f64>,
    got: &HashMap<String, f64>,
    abs: &mut Vec<f64>,
    rel: &mut Vec<f64>,
) {
    for (k, t) in truth {
        let e = (got.get(k).copied().unwrap_or(0.0) - t).abs();
        abs.push(e);
        rel.push(e / t.abs().max(1.0));
    }
}

struct Bench {
    engine: Engine,
    exact: SessionContext,
    dataset: &'static str,
    runs: usize,
}

impl Bench {
    async fn truth(&self, sql: &str) -> anyhow::Result<HashMap<String, f64>> {
        cells(&self.exact.sql(sql).await?.collect().await?, "n")
    }

    /// Runs one question `runs` times, each from a fresh account of (`grant`, 1e-6).
    async fn question(&self, qu: &Question) -> anyhow::Result<()> {
        let truth = self.truth(&qu.sql).await?;
        let (mut abs, mut rel, mut widths) = (Vec::new(), Vec::new(), Vec::new());
        let mut noise = String::new();
        let mut spent = (0.0, 0.0);
        for run in 0..self.runs {
            let scope = format!("{}-{}-{run}", self.dataset, qu.name);
            let everyone = ConsentFilter::everyone();
            let r = self
                .engine
                .run(&Request {
                    scope: &scope,
                    sql: &qu.sql,
                    epsilon: qu.epsilon,
                    // Partition selection may spend half the grant's delta.
                    delta: 5e-7,
                    mechanism: qu.mechanism,
                    accuracy: None,
                    filter: &everyone,
                    budget: Account::new(qu.epsilon.max(1.0), 1e-6),
                    min_cell_size: None,
                })
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    let line = serde_json::json!({"dataset": self.dataset, "query": qu.name,
                        "contender": "consentry", "sql": qu.sql, "refused": e.to_string()});
                    println!("{line}");
                    return Ok(());
                }
            };
            noise = r.mechanism["noise"].as_str().unwrap_or_default().to_owned();
            spent = (r.epsilon, r.rho.unwrap_or(0.0));
            errors(&truth, &cells(&r.batches, "n")?, &mut abs, &mut rel);
            widths.extend(cells(&r.batches, "n_ci95")?.into_values());
        }
        let line = serde_json::json!({
            "dataset": self.dataset, "query": qu.name, "contender": "consentry", "sql": qu.sql,
            "epsilon": qu.epsilon, "delta": 1e-6, "noise": noise,
            "epsilon_spent": spent.0, "rho_spent": spent.1,
            "cells": truth.len(), "runs": self.runs,
            "median_abs_error": median(abs), "median_rel_error": median(rel),
            "median_ci95": median(widths),
        });
        println!("{line}");
        Ok(())
    }

    /// `sqls.len()` cohort counts under one grant of (1, 1e-6), as the ledger admits them: the
    /// account's whole rho split evenly, Gaussian noise (and, for comparison, Laplace at an
    /// even split of epsilon 1).
    async fn cohorts(&self, name: &'static str, sqls: &[String]) -> anyhow::Result<()> {
        let mut truths = Vec::new();
        for sql in sqls {
            truths.push(self.truth(sql).await?);
        }
        let grant = Account::new(1.0, 1e-6);
        let n = sqls.len() as f64;
        for mechanism in [Mechanism::Gaussian, Mechanism::Laplace] {
            let epsilon = match mechanism {
                // rho = epsilon^2 / 2 per query, a 1/n share of the account's rho.
                Mechanism::Gaussian => (2.0 * grant.rho_left() / n).sqrt() * (1.0 - 1e-9),
                Mechanism::Laplace => 1.0 / n,
            };
            let (mut abs, mut rel, mut widths) = (Vec::new(), Vec::new(), Vec::new());
            for run in 0..self.runs {
                let mut account = grant;
                for (i, (sql, truth)) in sqls.iter().zip(&truths).enumerate() {
                    let scope = format!("{}-{name}-{mechanism:?}-{run}-{i}", self.dataset);
                    let everyone = ConsentFilter::everyone();
                    let r = self
                        .engine
                        .run(&Request {
                            scope: &scope,
                            sql,
                            epsilon,
                            delta: 0.0,
                            mechanism: Some(mechanism),
                            accuracy: None,
                            filter: &everyone,
                            budget: account,
                            min_cell_size: None,
                        })
                        .await?;
                    let cost = Spend::of_receipt(r.epsilon, r.delta, r.rho);
                    anyhow::ensure!(account.admits(&cost), "the ledger would refuse query {i}");
                    account.spent = account.spent.plus(&cost);
                    errors(truth, &cells(&r.batches, "n")?, &mut abs, &mut rel);
                    widths.extend(cells(&r.batches, "n_ci95")?.into_values());
                }
                let g = account.guarantee();
                anyhow::ensure!(g.epsilon <= 1.0 + 1e-9 && g.delta <= 1e-6, "{g:?}");
            }
            let line = serde_json::json!({
                "dataset": self.dataset, "query": name, "contender": "consentry",
                "sql": format!("{} cohort counts, e.g. {}", sqls.len(), sqls[0]),
                "epsilon": 1.0, "delta": 1e-6, "noise": mechanism.name(),
                "per_query": if mechanism == Mechanism::Gaussian {
                    serde_json::json!({"rho": epsilon * epsilon / 2.0})
                } else {
                    serde_json::json!({"epsilon": epsilon})
                },
                "cells": sqls.len(), "runs": self.runs,
                "median_abs_error": median(abs), "median_rel_error": median(rel),
                "median_ci95": median(widths),
            });
            println!("{line}");
        }
        Ok(())
    }
}

fn parquet(path: &Path) -> anyhow::Result<Vec<RecordBatch>> {
    let f = std::fs::File::open(path)?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?.build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

async fn visits(path: &Path, runs: usize) -> anyhow::Result<()> {
    let batches = parquet(path)?;
    let exact = SessionContext::new();
    exact.register_batch(
        "visits",
        arrow::compute::concat_batches(&batches[0].schema(), &batches)?,
    )?;
    let policy = Policy::from_toml(&visits_kit::policy())?;
    let dataset = Dataset::from_batches(policy, vec![("visits".into(), batches)])?;
    let b = Bench {
        engine: Engine::with_limits(dataset, anonymizer::Limits::unscheduled())?,
        exact,
        dataset: "visits",
        runs,
    };
    let band = "CASE WHEN birth_year >= 1981 THEN '18-44' WHEN birth_year >= 1961 THEN '45-64' \
                ELSE '65+' END";
    for qu in [
        q(
            "patients by diagnosis",
            "SELECT diagnosis, COUNT(DISTINCT patient_id) AS n FROM visits GROUP BY diagnosis",
            1.0,
        ),
        q(
            "cohort count (E11)",
            "SELECT COUNT(DISTINCT patient_id) AS n FROM visits WHERE diagnosis = 'E11'",
            1.0,
        ),
        q(
            "cohort count (E11), epsilon 0.1",
            "SELECT COUNT(DISTINCT patient_id) AS n FROM visits WHERE diagnosis = 'E11'",
            0.1,
        ),
        q(
            "patients by sex and age band",
            &format!(
                "SELECT sex, {band} AS band, COUNT(DISTINCT patient_id) AS n FROM visits \
                 GROUP BY sex, {band}"
            ),
            1.0,
        ),
        q(
            "mean HbA1c by sex",
            "SELECT sex, AVG(hba1c) AS n FROM visits GROUP BY sex",
            1.0,
        ),
    ] {
        b.question(&qu).await?;
    }
    let cohorts: Vec<String> = DIAGNOSES
        .split_whitespace()
        .flat_map(|d| {
            ["F", "M"].map(|s| {
                format!(
                    "SELECT COUNT(DISTINCT patient_id) AS n FROM visits WHERE diagnosis = '{d}' \
                     AND sex = '{s}'"
                )
            })
        })
        .collect();
    b.cohorts("100 cohort counts under (1, 1e-6)", &cohorts)
        .await
}

async fn ehr(dir: &Path, runs: usize) -> anyhow::Result<()> {
    let policy = Policy::from_toml(&std::fs::read_to_string(dir.join("policy.toml"))?)?;
    let exact = SessionContext::new();
    let mut sources = Vec::new();
    for t in ["patients", "encounters", "conditions", "observations"] {
        let files: Vec<PathBuf> = std::fs::read_dir(dir.join(t))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        let mut all = Vec::new();
        for f in &files {
            all.extend(parquet(f)?);
        }
        exact.register_batch(t, arrow::compute::concat_batches(&all[0].schema(), &all)?)?;
        sources.push(TableSource {
            name: t.into(),
            files,
        });
    }
    let b = Bench {
        engine: Engine::with_limits(
            Dataset::load(policy, &sources).await?,
            anonymizer::Limits::unscheduled(),
        )?,
        exact,
        dataset: "ehr",
        runs,
    };
    let band = "CASE WHEN birth_date >= DATE '1981-01-01' THEN '18-44' WHEN birth_date >= \
                DATE '1961-01-01' THEN '45-64' ELSE '65+' END";
    for qu in [
        q(
            "patients by diagnosis",
            "SELECT code, COUNT(DISTINCT patient_id) AS n FROM conditions GROUP BY code",
            1.0,
        ),
        q(
            "cohort count (E11.9), epsilon 0.1",
            "SELECT COUNT(DISTINCT patient_id) AS n FROM conditions WHERE code = 'E11.9'",
            0.1,
        ),
        q(
            "patients by sex and age band",
            &format!(
                "SELECT sex, {band} AS band, COUNT(*) AS n FROM patients GROUP BY sex, {band}"
            ),
            1.0,
        ),
        q(
            "mean HbA1c by sex (bounds by LOINC code)",
            "SELECT p.sex, AVG(o.value) AS n FROM observations o JOIN patients p \
             ON o.patient_id = p.patient_id WHERE o.code = '4548-4' GROUP BY p.sex",
            1.0,
        ),
    ] {
        b.question(&qu).await?;
    }
    let codes = [
        "E66.9", "E11.9", "I10", "E78.5", "N18.3", "I25.10", "J45.909", "F32.9", "F41.1", "K21.9",
        "M54.5", "J06.9",
    ];
    let cohorts: Vec<String> = codes
        .iter()
        .flat_map(|c| {
            ["F", "M"].map(|s| {
                format!(
                    "SELECT COUNT(DISTINCT c.patient_id) AS n FROM conditions c JOIN patients p \
                     ON c.patient_id = p.patient_id WHERE c.code = '{c}' AND p.sex = '{s}'"
                )
            })
        })
        .collect();
    b.cohorts("24 cohort counts under (1, 1e-6)", &cohorts)
        .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if args.iter().any(|a| a == "--help" || a == "-h") || args.len() < 2 {
        println!(
            "usage: accuracy_bench --visits VISITS.parquet [--ehr DATASET_DIR] [--runs 20]\n\
             Median absolute and relative errors of the accuracy workload (one JSON line per \
             query); see bench/README.md."
        );
        return Ok(());
    }
    let runs: usize = arg("--runs").map_or(Ok(20), |r| r.parse())?;
    if let Some(v) = arg("--visits") {
        visits(Path::new(&v), runs).await?;
    }
    if let Some(d) = arg("--ehr") {
        ehr(Path::new(&d), runs).await?;
    }
    Ok(())
}
