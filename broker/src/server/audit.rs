//! The Audit service: the usage log for IRBs (every receipt of the studies they approved,
//! denied attempts included), budget use over time, and exports as Parquet or CSV.
//!
//! Who may review a study: the IRB that approved it, its sponsor, its PI and researchers (their
//! own study's log, denied attempts too), and the operator. Receipts of refused queries that
//! named no known study are the operator's to review.

use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use ledger::budget::{Account, Spend};
use ledger::entry::{Body, Outcome, QueryMode};
use ledger::ids::{Role, Timestamp};
use proto::v1::{self, audit_server::Audit};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Broker, caller};
use crate::auth::Caller;
use crate::error::Error;

/// The Audit service.
pub struct AuditService(pub Arc<Broker>);

/// Whether `caller` may review study `s`'s usage log.
fn may_review(caller: &Caller, s: &ledger::state::Study) -> bool {
    caller.role == Role::Operator
        || s.reg.sponsor.as_str() == caller.id
        || s.is_member(&caller.id)
        || s.approval
            .as_ref()
            .is_some_and(|(irb, _)| irb.as_str() == caller.id)
}

fn parse_time(s: &str, what: &str) -> Result<Option<Timestamp>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    Timestamp::parse(s)
        .map(Some)
        .map_err(|e| Error::invalid(format!("{what}: {e}")))
}

/// Receipts one `Receipts` call returns at most: a page.
pub const PAGE: usize = 1_000;
/// Receipts of the reviewed studies that one `Receipts` call looks at, whether they match the
/// filter or not: with the page, what bounds one call's work and memory whatever the log's
/// length.
const SCAN: usize = 20_000;

/// A page of the usage log.
struct Page {
    receipts: Vec<v1::Receipt>,
    /// The `after_index` of the next page; 0 at the end of the log.
    next_after_index: u64,
}

/// The receipts matching a filter that the caller may review, oldest first: at most `page`
/// of them, out of at most `scan` receipts looked at.
fn receipts(
    b: &Broker,
    caller: &Caller,
    f: &v1::AuditRequest,
    page: usize,
    scan: usize,
) -> Result<Page, Error> {
    let from = parse_time(&f.from, "from")?;
    let until = parse_time(&f.until, "until")?;
    let outcome = match f.outcome.as_str() {
        "" => None,
        "released" => Some(Outcome::Released),
        "denied" => Some(Outcome::Denied),
        "failed" => Some(Outcome::Failed),
        o => {
            return Err(Error::invalid(format!(
                "outcome {}: use released, denied, failed or nothing",
                super::shown(o)
            )));
        }
    };
    let indexes: Vec<u64> = {
        let st = b.ledger.state();
        let mut studies: Vec<String> = Vec::new();
        if f.study.is_empty() {
            studies.extend(
                st.studies()
                    .filter(|s| may_review(caller, s))
                    .map(|s| s.reg.study.to_string()),
            );
            if caller.role == Role::Operator {
                studies.push("-".into());
            }
        } else {
            match st.study(&f.study) {
                Some(s) if may_review(caller, s) => studies.push(f.study.clone()),
                Some(_) => {
                    return Err(Error::forbidden(format!(
                        "only study {}'s IRB, sponsor, PI and researchers, and the operator, \
                         review its usage",
                        f.study
                    )));
                }
                None if caller.role == Role::Operator => studies.push(f.study.clone()),
                None => {
                    return Err(Error::not_found(format!(
                        "unknown study {}",
                        super::shown(&f.study)
                    )));
                }
            }
        }
        let mut ix: Vec<u64> = studies
            .iter()
            .flat_map(|s| st.receipts_of_study(s).iter().copied())
            .collect();
        ix.sort_unstable();
        ix
    };
    let mut out = Vec::new();
    let limit = match f.limit as usize {
        0 => page,
        l => l.min(page),
    };
    // Index 0 is the ledger's genesis entry, never a receipt: after_index 0 is "from the start".
    let mut rest = indexes
        .into_iter()
        .filter(|&i| i > f.after_index)
        .peekable();
    let mut scanned = 0;
    let mut last = f.after_index;
    while let Some(i) = rest.next_if(|_| out.len() < limit && scanned < scan) {
        scanned += 1;
        last = i;
        let e = b.ledger.entry(i).map_err(Error::from)?;
        let Body::QueryReceipt(r) = e.entry.body else {
            continue;
        };
        if (!f.researcher.is_empty() && r.researcher.as_str() != f.researcher)
            || from.is_some_and(|t| e.entry.time < t)
            || until.is_some_and(|t| e.entry.time >= t)
            || outcome.is_some_and(|o| o != r.outcome)
        {
            continue;
        }
        let (epsilon_requested, delta_requested) =
            (requested(&r, "epsilon"), requested(&r, "delta"));
        let repeated = r.mechanism.get("repeat") == Some(&serde_json::Value::Bool(true));
        out.push(v1::Receipt {
            epsilon_requested,
            delta_requested,
            repeated,
            index: i,
            time: e.entry.time.to_string(),
            study: r.study,
            researcher: r.researcher.to_string(),
            dataset: r.dataset.map(|d| d.to_string()).unwrap_or_default(),
            version: r.version.unwrap_or(0),
            mode: match r.mode {
                QueryMode::Dp => "dp",
                QueryMode::Extract => "extract",
            }
            .into(),
            sql: r.sql,
            epsilon: r.epsilon,
            delta: r.delta,
            rho: r.rho,
            outcome: match r.outcome {
                Outcome::Released => "released",
                Outcome::Denied => "denied",
                Outcome::Failed => "failed",
            }
            .into(),
            reason: r.reason.unwrap_or_default(),
            result_digest: r.result_digest.map(|d| d.to_string()).unwrap_or_default(),
            consent_digest: r.consent_digest.map(|d| d.to_string()).unwrap_or_default(),
            rows_suppressed: r.rows_suppressed.unwrap_or(0),
        });
    }
    Ok(Page {
        receipts: out,
        next_after_index: if rest.peek().is_some() { last } else { 0 },
    })
}

/// What a receipt's query asked to spend: recorded by a denial (`requested` in its
/// mechanism); a release or a charged failure asked what it spent.
fn requested(r: &ledger::entry::QueryReceipt, what: &str) -> f64 {
    match r.mechanism.get("requested").and_then(|m| m.get(what)) {
        Some(v) => v.as_f64().unwrap_or(0.0),
        None if r.outcome == Outcome::Denied => 0.0,
        None if what == "epsilon" => r.epsilon,
        None => r.delta,
    }
}

/// The usage log as one Arrow batch.
pub fn receipts_batch(rs: &[v1::Receipt]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let s = |name: &str| Field::new(name, DataType::Utf8, false);
    let schema = Schema::new(vec![
        Field::new("index", DataType::UInt64, false),
        // A time type, not text: spreadsheets and dataframes sort and filter it as time.
        Field::new(
            "time",
            DataType::Timestamp(arrow::datatypes::TimeUnit::Second, Some("UTC".into())),
            true,
        ),
        s("study"),
        s("researcher"),
        s("dataset"),
        Field::new("version", DataType::UInt32, false),
        s("mode"),
        s("sql"),
        Field::new("epsilon", DataType::Float64, false),
        Field::new("delta", DataType::Float64, false),
        Field::new("rho", DataType::Float64, true),
        s("outcome"),
        s("reason"),
        s("result_digest"),
        s("consent_digest"),
        Field::new("rows_suppressed", DataType::UInt64, false),
        Field::new("epsilon_requested", DataType::Float64, false),
        Field::new("delta_requested", DataType::Float64, false),
        Field::new("repeated", DataType::Boolean, false),
    ]);
    let strs = |f: fn(&v1::Receipt) -> &str| {
        Arc::new(StringArray::from_iter_values(rs.iter().map(f))) as arrow::array::ArrayRef
    };
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(UInt64Array::from_iter_values(rs.iter().map(|r| r.index))),
            Arc::new(
                arrow::array::TimestampSecondArray::from_iter(rs.iter().map(|r| {
                    ledger::ids::Timestamp::parse(&r.time)
                        .ok()
                        .map(|t| t.unix())
                }))
                .with_timezone("UTC"),
            ),
            strs(|r| &r.study),
            strs(|r| &r.researcher),
            strs(|r| &r.dataset),
            Arc::new(UInt32Array::from_iter_values(rs.iter().map(|r| r.version))),
            strs(|r| &r.mode),
            strs(|r| &r.sql),
            Arc::new(Float64Array::from_iter_values(rs.iter().map(|r| r.epsilon))),
            Arc::new(Float64Array::from_iter_values(rs.iter().map(|r| r.delta))),
            Arc::new(Float64Array::from_iter(rs.iter().map(|r| r.rho))),
            strs(|r| &r.outcome),
            strs(|r| &r.reason),
            strs(|r| &r.result_digest),
            strs(|r| &r.consent_digest),
            Arc::new(UInt64Array::from_iter_values(
                rs.iter().map(|r| r.rows_suppressed),
            )),
            Arc::new(Float64Array::from_iter_values(
                rs.iter().map(|r| r.epsilon_requested),
            )),
            Arc::new(Float64Array::from_iter_values(
                rs.iter().map(|r| r.delta_requested),
            )),
            Arc::new(arrow::array::BooleanArray::from(
                rs.iter().map(|r| r.repeated).collect::<Vec<_>>(),
            )),
        ],
    )
}

fn export_bytes(batch: &RecordBatch, format: &str) -> Result<Vec<u8>, Error> {
    let fail = |e: &dyn std::fmt::Display| Error::internal("an export", e);
    match format {
        "parquet" | "" => {
            let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), batch.schema(), None)
                .map_err(|e| fail(&e))?;
            w.write(batch).map_err(|e| fail(&e))?;
            w.into_inner().map_err(|e| fail(&e))
        }
        "csv" => {
            let mut w = arrow::csv::Writer::new(Vec::new());
            w.write(batch).map_err(|e| fail(&e))?;
            Ok(w.into_inner())
        }
        f => Err(Error::invalid(format!(
            "format {}: use parquet or csv",
            super::shown(f)
        ))),
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    type ExportStream = ReceiverStream<Result<v1::ExportChunk, Status>>;

    async fn receipts(
        &self,
        req: Request<v1::AuditRequest>,
    ) -> Result<Response<v1::AuditResponse>, Status> {
        let caller = caller(&req)?;
        let b = self.0.clone();
        let f = req.into_inner();
        let page = tokio::task::spawn_blocking(move || receipts(&b, &caller, &f, PAGE, SCAN))
            .await
            .map_err(|e| Error::internal("an audit task failed", e))??;
        Ok(Response::new(v1::AuditResponse {
            receipts: page.receipts,
            next_after_index: page.next_after_index,
        }))
    }

    async fn budget_usage(
        &self,
        req: Request<v1::BudgetUsageRequest>,
    ) -> Result<Response<v1::BudgetUsageResponse>, Status> {
        let caller = caller(&req)?;
        let study = req.into_inner().study;
        let granted: std::collections::HashMap<String, (f64, f64)> = {
            let st = self.0.ledger.state();
            let s = st.study(&study).ok_or_else(|| {
                Error::not_found(format!("unknown study {}", super::shown(&study)))
            })?;
            s.approval
                .iter()
                .flat_map(|(_, a)| a.grants.iter())
                .map(|g| (g.dataset.to_string(), (g.epsilon, g.delta)))
                .collect()
        };
        let f = v1::AuditRequest {
            study,
            outcome: "released".into(),
            ..Default::default()
        };
        let b = self.0.clone();
        // The whole curve: as long as the study's log.
        let rs = tokio::task::spawn_blocking(move || {
            receipts(&b, &caller, &f, usize::MAX, usize::MAX).map(|p| p.receipts)
        })
        .await
        .map_err(|e| Error::internal("an audit task failed", e))??;
        let mut cum: std::collections::HashMap<String, Spend> = Default::default();
        let points = rs
            .into_iter()
            .map(|r| {
                let c = cum.entry(r.dataset.clone()).or_default();
                *c = c.plus(&Spend::of_receipt(r.epsilon, r.delta, r.rho));
                let (epsilon, delta) = granted.get(&r.dataset).copied().unwrap_or((0.0, 0.0));
                let g = Account {
                    epsilon,
                    delta,
                    spent: *c,
                }
                .guarantee();
                v1::BudgetPoint {
                    time: r.time,
                    epsilon_granted: epsilon,
                    dataset: r.dataset,
                    receipt_index: r.index,
                    epsilon_cumulative: c.epsilon,
                    delta_cumulative: c.delta,
                    rho_cumulative: c.rho,
                    epsilon_guaranteed: g.epsilon,
                    delta_guaranteed: g.delta,
                }
            })
            .collect();
        Ok(Response::new(v1::BudgetUsageResponse { points }))
    }

    async fn export(
        &self,
        req: Request<v1::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let f = r.filter.unwrap_or_default();
        let b = self.0.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            // The whole file at once (a file of the log asked for; pages are for reading).
            let rs = receipts(&b, &caller, &f, usize::MAX, usize::MAX)?.receipts;
            let batch = receipts_batch(&rs).map_err(|e| Error::internal("an export", e))?;
            export_bytes(&batch, &r.format)
        })
        .await
        .map_err(|e| Error::internal("an audit task failed", e))??;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for c in bytes.chunks(1 << 20) {
                if tx
                    .send(Ok(v1::ExportChunk { data: c.to_vec() }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
