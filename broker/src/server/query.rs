//! The Query service: the hot path of `DESIGN.md`.
//!
//! Authenticate (the interceptor), authorize against the ledger's state, take the consent
//! filter as of now, plan, check and run through the anonymizer, then append the receipt
//! (which debits the budget under the ledger's single writer, so concurrent queries never
//! overspend) and only then send the result. Every refusal after authentication is itself
//! receipted, with its reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use anonymizer::Request as EngineRequest;
use ledger::entry::{Body, DatasetRegistered, Outcome, QueryMode, QueryReceipt};
use ledger::ids::{DatasetId, Digest, PrincipalId, Role, Timestamp};
use proto::v1::{self, query_server::Query};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Broker, caller};
use crate::auth::Caller;
use crate::error::Error;

/// The Query service.
pub struct QueryService(pub Arc<Broker>);

/// Largest chunk of the result's Arrow IPC stream per message.
const CHUNK: usize = 1 << 20;

/// What authorization grants a query.
struct Authorized {
    reg: Arc<DatasetRegistered>,
    filter: ledger::state::ConsentFilter,
    account: ledger::budget::Account,
    extract_k: Option<u32>,
    min_cell_size: Option<u64>,
}

/// A refusal: the error the caller gets (its words are the reason receipted).
struct Denial {
    error: Error,
    /// A query that was charged, then failed: the receipt debits this spend.
    charged: Option<Charged>,
}

/// What a failed query's receipt debits, and the version it ran on.
struct Charged {
    epsilon: f64,
    delta: f64,
    rho: Option<f64>,
    reg: Arc<DatasetRegistered>,
}

fn deny(error: Error) -> Denial {
    Denial {
        error,
        charged: None,
    }
}

/// What a refused query asked to spend, for its receipt's mechanism (`requested`): the IRB
/// sees what a denial was about. Only finite numbers are recorded.
fn requested(q: &v1::QueryRequest, mode: QueryMode) -> BTreeMap<String, serde_json::Value> {
    let mut asked = serde_json::Map::new();
    if mode == QueryMode::Dp {
        for (name, v) in [
            ("epsilon", q.epsilon),
            ("delta", q.delta),
            ("accuracy", q.accuracy),
        ] {
            if v.is_finite() && v > 0.0 {
                asked.insert(name.into(), v.into());
            }
        }
    }
    let mut m = BTreeMap::new();
    if !asked.is_empty() {
        m.insert("requested".to_owned(), serde_json::Value::Object(asked));
    }
    m
}

/// The noise a request asks for: none named, Laplace or Gaussian; else why not.
fn mechanism_of(q: &v1::QueryRequest) -> Result<Option<anonymizer::Mechanism>, String> {
    match q.mechanism.trim() {
        "" => Ok(None),
        m => anonymizer::Mechanism::parse(m)
            .map(Some)
            .ok_or_else(|| format!("unknown mechanism {}: laplace or gaussian", super::shown(m))),
    }
}

fn authorize(
    st: &ledger::State,
    caller: &Caller,
    q: &v1::QueryRequest,
    sql: &str,
    mode: QueryMode,
    now: Timestamp,
) -> Result<Authorized, Denial> {
    if caller.role != Role::Researcher {
        return Err(deny(Error::forbidden(format!(
            "only researchers query; {} is a {}",
            caller.id, caller.role
        ))));
    }
    if q.study.is_empty() {
        return Err(deny(Error::invalid(
            "no study given: name the study you query within (gRPC: the request's study; \
             Arrow Flight SQL: the call header x-consentry-study)",
        )));
    }
    let study = st.study(&q.study).ok_or_else(|| {
        deny(Error::not_found(format!(
            "unknown study {}",
            super::shown(&q.study)
        )))
    })?;
    if !study.is_member(&caller.id) {
        return Err(deny(Error::forbidden(format!(
            "{} is not a researcher of study {}",
            caller.id, q.study
        ))));
    }
    if !study.active_at(now) {
        return Err(deny(Error::precondition(format!(
            "study {} is not active (it is {:?}, or outside its approval period)",
            q.study, study.status
        ))));
    }
    let (_, approval) = study
        .approval
        .as_ref()
        .ok_or_else(|| deny(Error::precondition("the study has no approval")))?;
    let grant = approval
        .grants
        .iter()
        .find(|g| g.dataset.as_str() == q.dataset)
        .ok_or_else(|| {
            deny(Error::forbidden(format!(
                "study {} is not approved for dataset {}",
                q.study,
                super::shown(&q.dataset)
            )))
        })?;
    match mode {
        QueryMode::Dp if !grant.dp => {
            return Err(deny(Error::forbidden(
                "the approval does not allow DP aggregates on this dataset",
            )));
        }
        QueryMode::Extract if grant.extract_k.is_none() => {
            return Err(deny(Error::forbidden(
                "the approval does not allow extracts on this dataset; ask the IRB for an \
                 extract approval, or run DP aggregates",
            )));
        }
        _ => {}
    }
    // Two different extracts of one study could be differenced row by row (another cohort,
    // or a column nulled for some patients): a study takes one extract of a dataset, repeated
    // as often as it likes. The ledger enforces it on append; this says why up front.
    if mode == QueryMode::Extract
        && let Some(first) = st.extract_of(&q.study, &q.dataset)
        && first != sql
    {
        return Err(deny(Error::precondition(format!(
            "study {} already took an extract of dataset {}, and a study takes one \
                 extract of a dataset (two different ones could be differenced row by row); \
                 repeat it ({first}), or run DP aggregates",
            q.study,
            super::shown(&q.dataset)
        ))));
    }
    let ds = st.dataset(&q.dataset).ok_or_else(|| {
        deny(Error::not_found(format!(
            "unknown dataset {}",
            super::shown(&q.dataset)
        )))
    })?;
    let reg = ds.latest().reg.clone();
    let filter = st
        .consent_filter(&q.dataset, &q.study, now)
        .map_err(|e| deny(Error::precondition(format!("consent filter: {e}"))))?;
    let account = st
        .account(&q.study, &q.dataset)
        .ok_or_else(|| deny(Error::forbidden("no budget for this dataset")))?;
    Ok(Authorized {
        reg,
        filter,
        account,
        extract_k: grant.extract_k,
        min_cell_size: grant.min_cell_size.map(u64::from),
    })
}

/// The refusal for an anonymizer error (its code is chosen in [`crate::error`]): refusals at
/// plan time name the construct (they depend on the SQL and the policy only); a failure while
/// running is charged, in fixed words.
fn anonymizer_denial(e: anonymizer::Error, reg: Option<&Arc<DatasetRegistered>>) -> Denial {
    if let anonymizer::Error::Failed {
        epsilon,
        delta,
        rho,
    } = e
    {
        return Denial {
            error: Error::Failed,
            charged: reg.map(|reg| Charged {
                epsilon,
                delta,
                rho,
                reg: reg.clone(),
            }),
        };
    }
    deny(Error::Anonymizer(e))
}

impl QueryService {
    /// Appends a denial receipt and returns the error the caller gets (with the receipt's
    /// index, so the researcher can point the IRB at it).
    async fn denied(
        &self,
        caller: &Caller,
        q: &v1::QueryRequest,
        sql: String,
        mode: QueryMode,
        d: Denial,
    ) -> Error {
        let study = if q.study.trim().is_empty()
            || q.study.len() > 128
            || q.study.chars().any(char::is_control)
        {
            "-".to_owned()
        } else {
            q.study.clone()
        };
        let Ok(researcher) = PrincipalId::new(&caller.id) else {
            return d.error;
        };
        let mut receipt = QueryReceipt {
            study,
            researcher,
            dataset: DatasetId::new(&q.dataset).ok(),
            version: None,
            dataset_digest: None,
            sql: truncate(sql.clone(), 16 << 10),
            mode,
            mechanism: requested(q, mode),
            epsilon: 0.0,
            delta: 0.0,
            rho: None,
            consent_digest: None,
            result_digest: None,
            outcome: Outcome::Denied,
            reason: Some(truncate(d.error.words(), 4096)),
            rows_suppressed: None,
        };
        if let Some(c) = &d.charged {
            receipt.outcome = Outcome::Failed;
            receipt.dataset = Some(c.reg.dataset.clone());
            receipt.version = Some(c.reg.version);
            receipt.dataset_digest = Some(c.reg.digest.clone());
            receipt.epsilon = c.epsilon;
            receipt.delta = c.delta;
            receipt.rho = c.rho;
        }
        tracing::info!(caller = %caller.id, study = %q.study, code = ?d.error.grpc_code(),
            charged = d.charged.is_some(), "query denied");
        match self
            .0
            .blocking(move |l| l.append_as_operator(Body::QueryReceipt(receipt)))
            .await
        {
            Ok(a) => Error::Receipted {
                error: Box::new(d.error),
                receipt: a.index,
            },
            // A charge that concurrent queries left no budget for: refused as a release
            // would be, in the same words.
            Err(e) if d.charged.is_some() && e.is_budget_exhausted() => {
                Box::pin(self.denied(caller, q, sql, mode, deny(e))).await
            }
            // Fail closed: the caller learns nothing more, the operator sees the log.
            Err(e) => e,
        }
    }
}

/// A result ready for its receipt: the bytes to send and what the receipt records.
struct Released {
    ipc: Vec<u8>,
    sql: String,
    mechanism: BTreeMap<String, serde_json::Value>,
    epsilon: f64,
    delta: f64,
    rho: Option<f64>,
    consent_digest: [u8; 32],
    result_digest: [u8; 32],
    repeated: bool,
    rows_suppressed: Option<u64>,
}

impl QueryService {
    /// Appends the release's receipt (the ledger debits the budget under its single writer and
    /// refuses an overspend), and returns the header and the bytes to send.
    async fn receipted(
        &self,
        caller: &Caller,
        q: &v1::QueryRequest,
        sql: String,
        mode: QueryMode,
        auth: &Authorized,
        r: Released,
    ) -> Result<(v1::QueryHeader, Vec<u8>), Error> {
        let spend = (r.epsilon, r.delta, r.rho);
        let noise = r
            .mechanism
            .get("noise")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        // Receipts and headers commit to the consent snapshot; they never carry its digest.
        let consent = crate::secrets::consent_commitment(&self.0.ledger, &r.consent_digest);
        let receipt = QueryReceipt {
            study: q.study.clone(),
            researcher: PrincipalId::new(&caller.id)
                .map_err(|e| Error::internal("a caller's id", e))?,
            dataset: Some(auth.reg.dataset.clone()),
            version: Some(auth.reg.version),
            dataset_digest: Some(auth.reg.digest.clone()),
            sql: r.sql.clone(),
            mode,
            mechanism: r.mechanism,
            epsilon: r.epsilon,
            delta: r.delta,
            rho: r.rho,
            consent_digest: Some(consent.clone()),
            result_digest: Some(Digest::from_bytes(r.result_digest)),
            outcome: Outcome::Released,
            reason: None,
            rows_suppressed: r.rows_suppressed,
        };
        // The receipt is durable before any byte of the result leaves. The ledger refuses it
        // if concurrent queries spent the budget meanwhile; then nothing is released.
        let appended = match self
            .0
            .blocking(move |l| l.append_as_operator(Body::QueryReceipt(receipt)))
            .await
        {
            Ok(a) => a,
            Err(e) if e.is_budget_exhausted() => {
                return Err(self.denied(caller, q, sql, mode, deny(e)).await);
            }
            // Any other refusal of a drawn answer is still charged: the draw read the rows,
            // so how it ends must not be free (nor say more than that it failed).
            Err(e) => {
                tracing::error!(code = ?e.grpc_code(), "a release's receipt was refused");
                let d = Denial {
                    error: Error::Failed,
                    charged: Some(Charged {
                        epsilon: spend.0,
                        delta: spend.1,
                        rho: spend.2,
                        reg: auth.reg.clone(),
                    }),
                };
                return Err(self.denied(caller, q, sql, mode, d).await);
            }
        };
        let account = ledger::budget::Account {
            spent: self.0.ledger.state().spent(&q.study, &q.dataset),
            ..auth.account
        };
        let header = v1::QueryHeader {
            receipt_index: appended.index,
            budget: Some(super::registry::budget(&account)),
            epsilon_spent: r.epsilon,
            delta_spent: r.delta,
            rho_spent: r.rho.unwrap_or(0.0),
            mechanism: noise,
            repeated: r.repeated,
            normalized_sql: r.sql,
            result_digest: Digest::from_bytes(r.result_digest).to_string(),
            consent_digest: consent.to_string(),
            dataset_version: auth.reg.version,
            dataset_digest: auth.reg.digest.to_string(),
            rows_suppressed: r.rows_suppressed.unwrap_or(0),
            note: String::new(),
        };
        tracing::info!(caller = %caller.id, study = %q.study, receipt = appended.index,
            mode = ?mode, epsilon = r.epsilon, rows_suppressed = r.rows_suppressed,
            "query released");
        Ok((header, r.ipc))
    }

    /// A de-identified, k-anonymous extract with the approval's k and the study's pseudonyms.
    /// Spends no privacy budget; its receipt records k, the quasi-identifiers and the rows
    /// suppressed.
    async fn extract(
        &self,
        caller: &Caller,
        q: &v1::QueryRequest,
        sql: &str,
        auth: &Authorized,
        engine: &anonymizer::Engine,
        filter: &anonymizer::ConsentFilter,
    ) -> Result<(v1::QueryHeader, Vec<u8>), Error> {
        let mode = QueryMode::Extract;
        let Some(k) = auth.extract_k else {
            return Err(Error::internal("an extract", "no approved k"));
        };
        if q.epsilon != 0.0 || q.delta != 0.0 {
            let d = deny(Error::invalid(
                "an extract spends no privacy budget; leave epsilon and delta at 0",
            ));
            return Err(self.denied(caller, q, sql.to_owned(), mode, d).await);
        }
        // A repeat of the study's extract reads what the first one read, or nothing: with the
        // consents (or the dataset version) of another day its rows would differ by exactly
        // the patients who granted, revoked or expired since, which the difference of the two
        // would single out. The refusal says only that something changed.
        let first = self
            .0
            .ledger
            .state()
            .first_extract(&q.study, &q.dataset)
            .cloned();
        if let Some(first) = first {
            let snapshot =
                crate::secrets::consent_commitment(&self.0.ledger, filter.digest().bytes());
            if first.version != Some(auth.reg.version)
                || first.consent_digest.as_ref() != Some(&snapshot)
            {
                let d = deny(Error::precondition(format!(
                    "the consents or the dataset version changed since study {} took its \
                     extract of dataset {}: an extract is one snapshot, repeated only while \
                     nothing changes (a repeat with other consents would single out the \
                     patients who changed); use the copy you took, or run DP aggregates",
                    q.study,
                    super::shown(&q.dataset)
                )));
                return Err(self.denied(caller, q, sql.to_owned(), mode, d).await);
            }
        }
        let secrets = self.0.secrets.clone();
        let study = q.study.clone();
        let secret = match tokio::task::spawn_blocking(move || secrets.get(&study)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(Error::internal("the study secret is unavailable", e));
            }
            Err(e) => return Err(Error::internal("a study secret task failed", e)),
        };
        let today = chrono::DateTime::from_timestamp(Timestamp::now().unix(), 0)
            .map(|t| t.date_naive())
            .ok_or_else(|| Error::internal("the clock", "out of range"))?;
        let req = anonymizer::extract::ExtractRequest {
            sql,
            filter,
            k,
            secret: &secret,
            reference_date: today,
        };
        let x = match engine.extract(&req).await {
            Ok(x) => x,
            Err(e) => {
                let d = anonymizer_denial(e, Some(&auth.reg));
                return Err(self.denied(caller, q, sql.to_owned(), mode, d).await);
            }
        };
        let mut mechanism = BTreeMap::new();
        mechanism.insert("k".into(), serde_json::Value::from(x.k));
        mechanism.insert(
            "quasi_identifiers".into(),
            serde_json::Value::from(x.quasi_identifiers.clone()),
        );
        mechanism.insert("rows".into(), serde_json::Value::from(x.rows));
        let released = Released {
            ipc: ipc_bytes(&x.schema, &x.batches)?,
            sql: x.sql.clone(),
            mechanism,
            epsilon: 0.0,
            delta: 0.0,
            rho: None,
            consent_digest: x.consent_digest,
            result_digest: x.result_digest,
            repeated: false,
            rows_suppressed: Some(x.suppressed_rows),
        };
        self.receipted(caller, q, sql.to_owned(), mode, auth, released)
            .await
    }
}

/// What partition selection did, in words: its threshold (from the spend and the bounds
/// alone) and whether any group reached it (the mechanism's output). Post-processing: it says
/// nothing the released answer does not, and the same words whatever the reason no group
/// reached it (no rows at all, or only small groups).
fn selection_note(mechanism: &serde_json::Value) -> String {
    let Some(s) = mechanism.get("partition_selection") else {
        return String::new();
    };
    let (Some(threshold), Some(groups)) = (s["threshold"].as_i64(), s["groups"].as_u64()) else {
        return String::new();
    };
    let what = match s["counts"].as_str() {
        Some("patients") => "patient count",
        _ => "row count",
    };
    if groups == 0 {
        format!(
            "no group reached partition selection's threshold: a group is released only when \
             its noisy {what} reaches {threshold}; declare the GROUP BY columns' domains in the \
             policy to have every key released"
        )
    } else {
        format!(
            "keys chosen by partition selection: a group is released only when its noisy \
             {what} reaches {threshold}; smaller groups are left out"
        )
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn ipc_bytes(
    schema: &arrow::datatypes::SchemaRef,
    batches: &[arrow::array::RecordBatch],
) -> Result<Vec<u8>, Error> {
    anonymizer::release::ipc_stream(schema, batches)
        .map_err(|e| Error::internal("encoding the result", e))
}

impl QueryService {
    /// A dry run ([`anonymizer::Engine::preview`]): the query's authorization and checks, its
    /// cost and accuracy; nothing read, spent or receipted. A refusal is the one the query
    /// would get (its code and words), without a receipt.
    pub(crate) async fn dry_run(
        &self,
        caller: &Caller,
        q: &v1::QueryRequest,
    ) -> Result<v1::QueryPreview, Error> {
        if !matches!(
            v1::Mode::try_from(q.mode),
            Ok(v1::Mode::Dp | v1::Mode::Unspecified)
        ) {
            return Err(Error::invalid(
                "a dry run previews DP queries; an extract's rows have no noise to preview",
            ));
        }
        let refused = |d: Denial| d.error;
        let sql = anonymizer::engine::normalize_sql(&q.sql)
            .map_err(|e| refused(anonymizer_denial(e, None)))?;
        let auth = {
            let st = self.0.ledger.state();
            authorize(&st, caller, q, &sql, QueryMode::Dp, Timestamp::now())
        }
        .map_err(refused)?;
        let engine = self.0.store.engine(&auth.reg, &self.0.ledger).await?;
        let mechanism = mechanism_of(q).map_err(Error::invalid)?;
        let everyone = anonymizer::ConsentFilter::everyone();
        let scope = format!("{}\n{}", q.study, auth.reg.digest);
        let ereq = EngineRequest {
            scope: &scope,
            sql: &sql,
            epsilon: q.epsilon,
            delta: q.delta,
            mechanism,
            accuracy: (q.accuracy != 0.0).then_some(q.accuracy),
            // A preview reads no row: the consent snapshot plays no part.
            filter: &everyone,
            budget: auth.account,
            min_cell_size: auth.min_cell_size,
        };
        let p = engine
            .preview(&ereq)
            .await
            .map_err(|e| refused(anonymizer_denial(e, Some(&auth.reg))))?;
        Ok(v1::QueryPreview {
            normalized_sql: p.sql,
            epsilon: p.cost.epsilon,
            delta: p.cost.delta,
            rho: p.cost.rho,
            mechanism: p.mechanism.name().into(),
            statistics: p
                .statistics
                .into_iter()
                .map(|(statistic, ci95)| v1::StatisticPreview { statistic, ci95 })
                .collect(),
            budget: Some(super::registry::budget(&auth.account)),
        })
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    type RunStream = ReceiverStream<Result<v1::QueryResponse, Status>>;

    async fn preview(
        &self,
        req: Request<v1::QueryRequest>,
    ) -> Result<Response<v1::QueryPreview>, Status> {
        let caller = caller(&req)?;
        Ok(Response::new(self.dry_run(&caller, req.get_ref()).await?))
    }

    async fn run(
        &self,
        req: Request<v1::QueryRequest>,
    ) -> Result<Response<Self::RunStream>, Status> {
        let caller = caller(&req)?;
        let q = req.into_inner();
        let (header, ipc) = self.execute(&caller, &q).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use v1::query_response::Part;
            let mut msgs = vec![Part::Header(header)];
            msgs.extend(ipc.chunks(CHUNK).map(|c| Part::ArrowIpc(c.to_vec())));
            for part in msgs {
                if tx
                    .send(Ok(v1::QueryResponse { part: Some(part) }))
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

impl QueryService {
    /// Runs a query for an authenticated caller: authorization, the engine, the receipt. Returns
    /// the header and the result as an Arrow IPC stream; every refusal is receipted first. The
    /// gRPC `Run` and Arrow Flight SQL statements both come here.
    pub(crate) async fn execute(
        &self,
        caller: &Caller,
        q: &v1::QueryRequest,
    ) -> Result<(v1::QueryHeader, Vec<u8>), Error> {
        let (caller, q) = (caller.clone(), q.clone());
        let mode = match v1::Mode::try_from(q.mode) {
            Ok(v1::Mode::Dp) | Ok(v1::Mode::Unspecified) => QueryMode::Dp,
            Ok(v1::Mode::Extract) => QueryMode::Extract,
            Err(_) => return Err(Error::invalid("unknown query mode")),
        };
        let sql = match anonymizer::engine::normalize_sql(&q.sql) {
            Ok(s) => s,
            Err(e) => {
                let d = anonymizer_denial(e, None);
                return Err(self.denied(&caller, &q, q.sql.clone(), mode, d).await);
            }
        };
        let now = Timestamp::now();
        let auth = {
            let st = self.0.ledger.state();
            authorize(&st, &caller, &q, &sql, mode, now)
        };
        let auth = match auth {
            Ok(a) => a,
            Err(d) => return Err(self.denied(&caller, &q, sql, mode, d).await),
        };
        let engine = self.0.store.engine(&auth.reg, &self.0.ledger).await?;
        let filter = auth.filter.clone();
        let released = if mode == QueryMode::Extract {
            self.extract(&caller, &q, &sql, &auth, &engine, &filter)
                .await?
        } else {
            let scope = format!("{}\n{}", q.study, auth.reg.digest);
            let mechanism = match mechanism_of(&q) {
                Ok(m) => m,
                Err(reason) => {
                    let d = deny(Error::invalid(reason));
                    return Err(self.denied(&caller, &q, sql, mode, d).await);
                }
            };
            let ereq = EngineRequest {
                scope: &scope,
                sql: &sql,
                epsilon: q.epsilon,
                delta: q.delta,
                mechanism,
                accuracy: (q.accuracy != 0.0).then_some(q.accuracy),
                filter: &filter,
                budget: auth.account,
                min_cell_size: auth.min_cell_size,
            };
            // `_flight` is held until the release is remembered: an identical query in flight
            // waits, then is answered as a free repeat of this one.
            let (release, _flight) = match engine.run_pending(&ereq).await {
                Ok(r) => r,
                Err(e) => {
                    let d = anonymizer_denial(e, Some(&auth.reg));
                    return Err(self.denied(&caller, &q, sql, mode, d).await);
                }
            };
            let mut mechanism = BTreeMap::new();
            if let serde_json::Value::Object(m) = &release.mechanism {
                for (k, v) in m {
                    mechanism.insert(k.clone(), v.clone());
                }
            }
            if release.repeated {
                mechanism.insert("repeat".into(), serde_json::Value::Bool(true));
            }
            let released = Released {
                ipc: ipc_bytes(&release.schema, &release.batches)?,
                sql: release.sql.clone(),
                mechanism,
                epsilon: release.epsilon,
                delta: release.delta,
                rho: release.rho,
                consent_digest: release.consent_digest,
                result_digest: release.result_digest,
                repeated: release.repeated,
                rows_suppressed: None,
            };
            let cells_suppressed = release.mechanism["cells_suppressed"].as_u64();
            let mut out = self
                .receipted(&caller, &q, sql.clone(), mode, &auth, released)
                .await?;
            // Groups suppressed by the study's minimum cell size (also in the receipt's
            // mechanism).
            out.0.rows_suppressed = cells_suppressed.unwrap_or(0);
            out.0.note = selection_note(&release.mechanism);
            // Only now that its receipt is durable may the answer be repeated for free, here
            // and after a restart.
            engine.remember(&ereq, &release);
            if !release.repeated {
                let repeat_scope = anonymizer::Engine::repeat_scope(&ereq);
                let asked = crate::kept::Asked {
                    scope: &repeat_scope,
                    epsilon: q.epsilon,
                    delta: q.delta,
                };
                let kept = tokio::task::block_in_place(|| {
                    self.0
                        .store
                        .kept()
                        .save(&auth.reg, out.0.receipt_index, &asked, &release)
                });
                if let Err(e) = kept {
                    tracing::warn!(error = %e, receipt = out.0.receipt_index,
                        "a release was not kept; its repeat after a restart will be paid again");
                }
            }
            out
        };
        Ok(released)
    }
}
