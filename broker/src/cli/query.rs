//! `broker query` (a researcher's DP query or extract), `broker audit` (an IRB's usage log and
//! budget burn-down) and `broker bundle` (a sponsor fetches a study's evidence bundle).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::bail;
use arrow::array::RecordBatch;
use clap::{Args, Subcommand, ValueEnum};
use proto::v1;

use super::conn::{self, Conn};
use crate::client;

/// Arguments of `broker query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The study the query is made within.
    #[arg(long, env = "CONSENTRY_STUDY")]
    pub study: String,
    /// The dataset.
    #[arg(long, env = "CONSENTRY_DATASET")]
    pub dataset: String,
    /// The SQL (DataFusion dialect): aggregates for DP; rows for an extract.
    #[arg(long, env = "CONSENTRY_SQL")]
    pub sql: String,
    /// Privacy spend of a DP query (0.1 unless --accuracy is given). With Gaussian noise it
    /// stands for rho = epsilon^2 / 2, what a pure query of that epsilon costs in zCDP.
    #[arg(long, env = "CONSENTRY_EPSILON", conflicts_with = "accuracy")]
    pub epsilon: Option<f64>,
    /// Instead of an epsilon: the 95% half-width wanted on each noisy count and sum; the broker
    /// spends the least budget that reaches it and says what it spent.
    #[arg(long, env = "CONSENTRY_ACCURACY")]
    pub accuracy: Option<f64>,
    /// The noise: laplace (pure DP) or gaussian (zero-concentrated DP, which composes far
    /// better over many queries). By default Laplace while the study's budget composes by
    /// adding epsilons, Gaussian once it accounts in zCDP.
    #[arg(long, env = "CONSENTRY_MECHANISM", value_enum)]
    pub mechanism: Option<NoiseArg>,
    /// Delta of a DP query (needed for GROUP BY keys without a public domain).
    #[arg(long, env = "CONSENTRY_DELTA", default_value_t = 0.0)]
    pub delta: f64,
    /// A de-identified, k-anonymous extract instead of DP aggregates (where the approval allows).
    #[arg(long, env = "CONSENTRY_EXTRACT", default_value_t = false)]
    pub extract: bool,
    /// Write the result to this file instead of the terminal (`.parquet` or `.csv`; never
    /// overwritten).
    #[arg(long, env = "CONSENTRY_OUT")]
    pub out: Option<PathBuf>,
    /// Print the query's header (receipt, budget, digests) as JSON on stdout (with --out).
    #[arg(long, env = "CONSENTRY_JSON", default_value_t = false)]
    pub json: bool,
    /// Preview instead of running: what the query would spend and each statistic's 95%
    /// half-width (JSON), from the SQL, the policy and the budget alone. Nothing is read,
    /// spent or receipted.
    #[arg(long, default_value_t = false, conflicts_with_all = ["out", "extract"])]
    pub dry_run: bool,
}

/// The noise a researcher may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NoiseArg {
    /// Laplace noise (pure DP).
    Laplace,
    /// Gaussian noise (zero-concentrated DP).
    Gaussian,
}

/// Runs `broker query`.
pub fn query(conn: &Conn, args: QueryArgs) -> anyhow::Result<()> {
    if args.json && args.out.is_none() {
        bail!("--json prints the header only; give --out for the result");
    }
    // The output file is made before the query runs (and spends): a name that exists or an
    // unknown extension is refused first. It is removed again if the query gives no result.
    let mut out = args.out.as_deref().map(OutFile::create).transpose()?;
    conn::block_on(async move {
        let (_, auth) = conn.channel().await?;
        let mut q = v1::query_client::QueryClient::new(auth)
            .max_decoding_message_size(crate::server::MAX_MESSAGE);
        let (mode, epsilon, delta) = if args.extract {
            (v1::Mode::Extract, 0.0, 0.0)
        } else {
            let epsilon = match (args.epsilon, args.accuracy) {
                (Some(e), _) => e,
                (None, Some(_)) => 0.0,
                (None, None) => 0.1,
            };
            (v1::Mode::Dp, epsilon, args.delta)
        };
        let mechanism = match args.mechanism {
            None => "",
            Some(NoiseArg::Laplace) => "laplace",
            Some(NoiseArg::Gaussian) => "gaussian",
        };
        let request = v1::QueryRequest {
            study: args.study,
            dataset: args.dataset,
            sql: args.sql,
            mode: mode as i32,
            epsilon,
            delta,
            mechanism: mechanism.into(),
            accuracy: args.accuracy.unwrap_or(0.0),
        };
        if args.dry_run {
            let p = q.preview(request).await.map_err(conn::status)?.into_inner();
            let budget = p.budget.unwrap_or_default();
            let statistics: Vec<serde_json::Value> = p
                .statistics
                .iter()
                .map(|s| serde_json::json!({"statistic": s.statistic, "ci95": s.ci95}))
                .collect();
            return conn::print_json(&serde_json::json!({
                "normalized_sql": p.normalized_sql,
                "would_spend": {"epsilon": p.epsilon, "delta": p.delta, "rho": p.rho},
                "mechanism": p.mechanism,
                "statistics": statistics,
                "epsilon_left": budget.epsilon_left,
                "delta_left": budget.delta_left,
                "rho_left": budget.rho_left,
            }));
        }
        let stream = q.run(request).await.map_err(conn::status)?.into_inner();
        let (h, batches) = client::collect_query(stream).await?;
        let budget = h.budget.unwrap_or_default();
        let header = serde_json::json!({
            "receipt_index": h.receipt_index,
            "epsilon_spent": h.epsilon_spent,
            "delta_spent": h.delta_spent,
            "rho_spent": h.rho_spent,
            "mechanism": h.mechanism,
            "repeated": h.repeated,
            "epsilon_left": budget.epsilon_left,
            "delta_left": budget.delta_left,
            "rho_left": budget.rho_left,
            "epsilon_guaranteed": budget.epsilon_guaranteed,
            "delta_guaranteed": budget.delta_guaranteed,
            "accountant": budget.accountant,
            "rows_suppressed": h.rows_suppressed,
            "note": h.note,
            "normalized_sql": h.normalized_sql,
            "dataset_version": h.dataset_version,
            "dataset_digest": h.dataset_digest,
            "consent_digest": h.consent_digest,
            "result_digest": h.result_digest,
        });
        match out.take() {
            Some(out) => {
                let path = out.path.clone();
                out.write(&batches)?;
                if args.json {
                    conn::print_json(&header)?;
                }
                eprintln!(
                    "{} rows written to {}",
                    batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
                    path.display()
                );
            }
            None => println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?),
        }
        if !h.note.is_empty() {
            eprintln!("note: {}", h.note);
        }
        let spent = if h.repeated {
            "nothing (identical repeat)".to_owned()
        } else if h.mechanism == "gaussian" {
            format!("rho {:.6} (Gaussian noise)", h.rho_spent)
        } else {
            format!("epsilon {} ({} noise)", h.epsilon_spent, h.mechanism)
        };
        eprintln!(
            "receipt {}; spent {spent}; budget left: epsilon {:.6} (or rho {:.6}), delta {}; \
             the study's spend amounts to ({:.6}, {:e})-DP ({} accounting)",
            h.receipt_index,
            budget.epsilon_left,
            budget.rho_left,
            budget.delta_left,
            budget.epsilon_guaranteed,
            budget.delta_guaranteed,
            budget.accountant,
        );
        Ok(())
    })
}

/// A result file made before its query runs; removed when dropped unless written.
struct OutFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    parquet: bool,
    written: bool,
}

impl OutFile {
    /// Creates `path` (never overwriting), which must end in `.parquet` or `.csv`.
    fn create(path: &Path) -> anyhow::Result<OutFile> {
        let parquet = match path.extension().and_then(|e| e.to_str()) {
            Some("parquet") => true,
            Some("csv") => false,
            _ => bail!("--out must end in .parquet or .csv"),
        };
        Ok(OutFile {
            file: Some(super::conn::create_new(path)?),
            path: path.to_owned(),
            parquet,
            written: false,
        })
    }

    /// Writes the result as Parquet or CSV and keeps the file.
    fn write(mut self, batches: &[RecordBatch]) -> anyhow::Result<()> {
        let f = self.file.take().expect("written once");
        write_batches(f, self.parquet, batches)?;
        self.written = true;
        Ok(())
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        if !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes batches as Parquet or CSV to `f`.
fn write_batches(f: std::fs::File, parquet: bool, batches: &[RecordBatch]) -> anyhow::Result<()> {
    let Some(schema) = batches.first().map(RecordBatch::schema) else {
        bail!("the result has no schema to write");
    };
    if parquet {
        let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None)?;
        for b in batches {
            w.write(b)?;
        }
        w.close()?;
    } else {
        let mut w = arrow::csv::Writer::new(f);
        for b in batches {
            w.write(b)?;
        }
        w.into_inner().sync_all()?;
    }
    Ok(())
}

/// Arguments of `broker audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The audit command.
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// Which receipts.
#[derive(Debug, Args, Clone, Default)]
pub struct Filter {
    /// Only this study.
    #[arg(long, env = "CONSENTRY_STUDY")]
    pub study: Option<String>,
    /// Only this researcher.
    #[arg(long, env = "CONSENTRY_RESEARCHER")]
    pub researcher: Option<String>,
    /// From this time (RFC 3339).
    #[arg(long, env = "CONSENTRY_FROM")]
    pub from: Option<String>,
    /// Until this time (RFC 3339, exclusive).
    #[arg(long, env = "CONSENTRY_UNTIL")]
    pub until: Option<String>,
    /// Only released or only denied queries.
    #[arg(long, env = "CONSENTRY_OUTCOME", value_enum)]
    pub outcome: Option<OutcomeArg>,
    /// Only receipts after this ledger index.
    #[arg(long, env = "CONSENTRY_AFTER_INDEX")]
    pub after_index: Option<u64>,
    /// At most this many receipts (all when not given; `receipts` fetches them a page of at
    /// most 1,000 at a time).
    #[arg(long, env = "CONSENTRY_LIMIT")]
    pub limit: Option<u32>,
}

/// A receipt's outcome.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutcomeArg {
    /// Released.
    Released,
    /// Denied.
    Denied,
    /// Charged, then failed while running.
    Failed,
}

impl Filter {
    fn request(self) -> v1::AuditRequest {
        v1::AuditRequest {
            study: self.study.unwrap_or_default(),
            researcher: self.researcher.unwrap_or_default(),
            from: self.from.unwrap_or_default(),
            until: self.until.unwrap_or_default(),
            outcome: match self.outcome {
                None => String::new(),
                Some(OutcomeArg::Released) => "released".into(),
                Some(OutcomeArg::Denied) => "denied".into(),
                Some(OutcomeArg::Failed) => "failed".into(),
            },
            after_index: self.after_index.unwrap_or(0),
            limit: self.limit.unwrap_or(0),
        }
    }
}

/// Audit commands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The usage log: every query receipt, denied attempts included (JSON).
    Receipts {
        /// Which receipts.
        #[command(flatten)]
        filter: Filter,
    },
    /// A study's cumulative privacy spend after every released query (JSON).
    Budget {
        /// The study.
        #[arg(long, env = "CONSENTRY_STUDY")]
        study: String,
    },
    /// The usage log as a file (Parquet or CSV, by its extension; never overwritten).
    Export {
        /// Which receipts.
        #[command(flatten)]
        filter: Filter,
        /// The file.
        #[arg(long, env = "CONSENTRY_OUT")]
        out: PathBuf,
    },
}

/// Runs `broker audit`.
pub fn audit(conn: &Conn, args: AuditArgs) -> anyhow::Result<()> {
    conn::block_on(async move {
        let (_, auth) = conn.channel().await?;
        let mut a = v1::audit_client::AuditClient::new(auth)
            .max_decoding_message_size(crate::server::MAX_MESSAGE);
        match args.command {
            AuditCommand::Receipts { filter } => {
                // Page by page (the broker answers at most a page a call), up to `--limit`.
                let mut req = filter.request();
                let wanted = match req.limit {
                    0 => usize::MAX,
                    l => l as usize,
                };
                let mut receipts = Vec::new();
                loop {
                    req.limit = u32::try_from(wanted - receipts.len()).unwrap_or(0);
                    let page = a
                        .receipts(req.clone())
                        .await
                        .map_err(conn::status)?
                        .into_inner();
                    receipts.extend(page.receipts);
                    if page.next_after_index == 0 || receipts.len() >= wanted {
                        break;
                    }
                    req.after_index = page.next_after_index;
                }
                let out: Vec<serde_json::Value> = receipts
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "index": r.index, "time": r.time, "study": r.study,
                            "researcher": r.researcher, "dataset": r.dataset,
                            "version": r.version, "mode": r.mode, "sql": r.sql,
                            "epsilon": r.epsilon, "delta": r.delta, "rho": r.rho,
                            "outcome": r.outcome,
                            "reason": r.reason, "result_digest": r.result_digest,
                            "consent_digest": r.consent_digest,
                            "rows_suppressed": r.rows_suppressed,
                        })
                    })
                    .collect();
                conn::print_json(&out)
            }
            AuditCommand::Budget { study } => {
                let r = a
                    .budget_usage(v1::BudgetUsageRequest { study })
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                let out: Vec<serde_json::Value> = r
                    .points
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "time": p.time, "dataset": p.dataset,
                            "receipt_index": p.receipt_index,
                            "epsilon_cumulative": p.epsilon_cumulative,
                            "delta_cumulative": p.delta_cumulative,
                            "rho_cumulative": p.rho_cumulative,
                            "epsilon_guaranteed": p.epsilon_guaranteed,
                            "delta_guaranteed": p.delta_guaranteed,
                            "epsilon_granted": p.epsilon_granted,
                        })
                    })
                    .collect();
                conn::print_json(&out)
            }
            AuditCommand::Export { filter, out } => {
                let format = match out.extension().and_then(|e| e.to_str()) {
                    Some("parquet") => "parquet",
                    Some("csv") => "csv",
                    _ => bail!("--out must end in .parquet or .csv"),
                };
                let mut f = super::conn::create_new(&out)?;
                let mut stream = a
                    .export(v1::ExportRequest {
                        filter: Some(filter.request()),
                        format: format.into(),
                    })
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                while let Some(chunk) = stream.message().await.map_err(conn::status)? {
                    f.write_all(&chunk.data)?;
                }
                f.sync_all()?;
                eprintln!("usage log written to {}", out.display());
                Ok(())
            }
        }
    })
}

/// Arguments of `broker bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// The study.
    #[arg(long, env = "CONSENTRY_STUDY")]
    pub study: String,
    /// Write the bundle here (never overwritten) instead of stdout.
    #[arg(long, env = "CONSENTRY_OUT")]
    pub out: Option<PathBuf>,
}

/// Runs `broker bundle`: fetches a study's evidence bundle (check it offline with
/// `broker verify`).
pub fn bundle(conn: &Conn, args: BundleArgs) -> anyhow::Result<()> {
    conn::block_on(async move {
        let (_, auth) = conn.channel().await?;
        let b = v1::ledger_client::LedgerClient::new(auth)
            .max_decoding_message_size(crate::server::MAX_MESSAGE)
            .bundle(v1::BundleRequest { study: args.study })
            .await
            .map_err(conn::status)?
            .into_inner();
        match args.out {
            Some(path) => {
                let mut f = super::conn::create_new(&path)?;
                f.write_all(b.bundle_json.as_bytes())?;
                f.sync_all()?;
                eprintln!("bundle written to {}", path.display());
            }
            None => println!("{}", b.bundle_json),
        }
        Ok(())
    })
}
