//! Arrow Flight SQL on the broker's port, so that researchers' tools (ADBC, pyarrow.flight,
//! JDBC) work unchanged.
//!
//! A statement runs through the Query service's own path ([`QueryService::execute`]):
//! authorization, consent, the engine, the receipt. `GetFlightInfo` runs and receipts it and
//! keeps the released result under a random handle for its caller; `DoGet` sends it once. The
//! query's parameters come from call headers:
//!
//! | header | meaning | default |
//! |---|---|---|
//! | `x-consentry-study` | the study (required) | |
//! | `x-consentry-dataset` | the dataset | the study's only approved dataset |
//! | `x-consentry-mode` | `dp` or `extract` | `dp` |
//! | `x-consentry-epsilon` | epsilon spent by a DP query | [`DEFAULT_EPSILON`] |
//! | `x-consentry-delta` | delta spent by a DP query | 0 |
//! | `x-consentry-mechanism` | `laplace` or `gaussian` noise | chosen by the account |
//! | `x-consentry-accuracy` | a 95% half-width wanted instead of an epsilon | none |
//!
//! The `FlightInfo`'s `app_metadata` carries the query header as JSON (receipt index, budget
//! left, digests). Catalog calls list only the datasets the caller's active studies are approved
//! for: catalog = dataset id, schema `public`, one table per dataset table, without its direct
//! identifier columns. A prepared statement (what JDBC and BI tools send even for a plain
//! query) is its SQL: its handle carries the SQL, nothing is held between calls, and it runs as
//! a plain statement; parameters, statements that change data and transactions are refused.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTables, CommandPreparedStatementQuery, CommandStatementQuery,
    DoPutPreparedStatementResult, ProstMessageExt as _, SqlInfo, SqlSupportedCaseSensitivity,
    TicketStatementQuery,
};
use arrow_flight::{Action, FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use futures::{Stream, TryStreamExt as _};
use ledger::ids::{Role, Timestamp};
use prost::Message as _;
use proto::v1;
use tonic::{Request, Response, Status};

use super::query::QueryService;
use super::{Broker, caller};
use crate::auth::Caller;
use crate::error::Error;

/// Epsilon of a DP statement that does not set `x-consentry-epsilon`.
pub const DEFAULT_EPSILON: f64 = 0.1;
/// How long a released result waits for its `DoGet`.
const RESULT_TTL: Duration = Duration::from_secs(600);
/// Released results waiting for their `DoGet`, at most.
const MAX_PENDING: usize = 1024;
/// Results one caller may have waiting for their `DoGet` (or running), at most: checked
/// before a statement runs, so that no caller can fill the broker's map and have everyone
/// else's statements charged and then refused.
const MAX_PENDING_PER_CALLER: usize = 16;
/// Bytes of released results waiting for their `DoGet`, at most. Past it the oldest results
/// of the caller holding the most are dropped: a dropped result is an identical repeat, free
/// and the same, when its statement runs again.
const MAX_PENDING_BYTES: usize = 512 << 20;
/// The schema name under every dataset's catalog.
pub const DB_SCHEMA: &str = "public";

/// The longest SQL a prepared statement may hold (the engine's limit on a query).
const MAX_PREPARED_SQL: usize = 64 << 10;
/// What a prepared statement's handle starts with.
const PREPARED: &[u8] = b"consentry-prepared-v1\n";

/// A prepared statement's handle: its SQL, tagged. Whoever holds it could send the SQL as
/// a plain statement, so it is no capability and needs no secret.
fn prepared_handle(sql: &str) -> Vec<u8> {
    [PREPARED, sql.as_bytes()].concat()
}

/// The SQL of a prepared statement's handle.
fn prepared_sql(handle: &[u8]) -> Result<String, Error> {
    handle
        .strip_prefix(PREPARED)
        .filter(|sql| sql.len() <= MAX_PREPARED_SQL)
        .and_then(|sql| String::from_utf8(sql.to_vec()).ok())
        .ok_or_else(|| {
            Error::invalid("not a prepared statement of this broker; prepare the statement again")
        })
}

/// A released result waiting for its caller's `DoGet` (`None` while its statement runs).
struct Pending {
    caller: String,
    result: Option<(SchemaRef, Vec<RecordBatch>)>,
    /// Bytes the result holds.
    bytes: usize,
    created: Instant,
}

/// Drops waiting results, the oldest of the caller that holds the most first, until they hold
/// at most `cap` bytes; `keep` (the result just stored, which its caller is about to fetch)
/// and statements still running are not dropped.
fn shed(pending: &mut HashMap<[u8; 16], Pending>, cap: usize, keep: &[u8; 16]) {
    loop {
        let total: usize = pending.values().map(|p| p.bytes).sum();
        if total <= cap {
            return;
        }
        let mut by_caller: HashMap<&str, usize> = HashMap::new();
        for p in pending.values() {
            *by_caller.entry(p.caller.as_str()).or_default() += p.bytes;
        }
        let victim = pending
            .iter()
            .filter(|(h, p)| *h != keep && p.result.is_some())
            .max_by_key(|(_, p)| (by_caller[p.caller.as_str()], std::cmp::Reverse(p.created)))
            .map(|(h, _)| *h);
        match victim {
            Some(h) => {
                pending.remove(&h);
            }
            None => return,
        }
    }
}

/// The Flight SQL service.
pub struct FlightSql {
    broker: Arc<Broker>,
    query: QueryService,
    pending: Mutex<HashMap<[u8; 16], Pending>>,
    info: SqlInfoData,
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>;

impl FlightSql {
    /// The service over `broker`.
    pub fn new(broker: Arc<Broker>) -> Result<FlightSql, Error> {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Consentry");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        // What SQLAlchemy's Flight SQL dialect (and so Superset) and JDBC metadata read first:
        // identifiers quote with `"`, unquoted ones fold to lower case (DataFusion's SQL).
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        info.append(
            SqlInfo::SqlIdentifierCase,
            SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
        );
        info.append(SqlInfo::SqlDdlCatalog, false);
        info.append(SqlInfo::SqlDdlSchema, false);
        info.append(SqlInfo::SqlDdlTable, false);
        Ok(FlightSql {
            query: QueryService(broker.clone()),
            broker,
            pending: Mutex::new(HashMap::new()),
            info: info
                .build()
                .map_err(|e| Error::internal("building the SQL info", e))?,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Pending>> {
        // A panic while holding the lock leaves only expired results behind: carry on.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a statement's SQL through the query path and keeps its result for one `DoGet`.
    async fn statement(
        &self,
        sql: String,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let who = caller(&request)?;
        // A health probe (`SELECT 1`) reads no table: answered as it is, nothing spent or
        // receipted, whatever the headers say.
        let probe = anonymizer::probe::answer(&sql);
        let q = match probe {
            Some(_) => None,
            None => {
                let st = self.broker.ledger.state();
                Some(query_request(&st, &request, sql)?)
            }
        };
        let dry_run = match header(&request, "x-consentry-dry-run")?.as_deref() {
            None | Some("0" | "false" | "no") => false,
            Some("1" | "true" | "yes") => true,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "the header x-consentry-dry-run must be true or false, not {}",
                    super::shown(v)
                ))
                .into());
            }
        };
        // A slot is reserved before the statement runs: a caller over its share is refused
        // before anything is charged.
        let mut handle = [0u8; 16];
        getrandom::fill(&mut handle).map_err(|e| Error::internal("randomness", e))?;
        {
            let mut pending = self.pending();
            pending.retain(|_, p| p.created.elapsed() < RESULT_TTL);
            let mine = pending.values().filter(|p| p.caller == who.id).count();
            if mine >= MAX_PENDING_PER_CALLER || pending.len() >= MAX_PENDING {
                return Err(Error::exhausted(format!(
                    "too many results wait to be fetched (at most {MAX_PENDING_PER_CALLER} per \
                     caller); fetch (DoGet) earlier results first"
                ))
                .into());
            }
            pending.insert(
                handle,
                Pending {
                    caller: who.id.clone(),
                    result: None,
                    bytes: 0,
                    created: Instant::now(),
                },
            );
        }
        let decoded = async {
            let Some(q) = q else {
                let batch = probe.ok_or_else(|| Error::internal("a probe", "no answer"))?;
                return Ok::<_, Error>((
                    serde_json::json!({"probe": true}),
                    batch.schema(),
                    vec![batch],
                ));
            };
            if dry_run {
                // Nothing read, spent or receipted: the table of each statistic's 95%
                // half-width, and the spend in the metadata.
                let p = self.query.dry_run(&who, &q).await?;
                let batch = preview_batch(&p)?;
                return Ok((preview_json(&p), batch.schema(), vec![batch]));
            }
            let (header, ipc) = self.query.execute(&who, &q).await?;
            let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)
                .map_err(|e| Error::internal("decoding the result", e))?;
            let schema = reader.schema();
            let batches = reader
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::internal("decoding the result", e))?;
            let (schema, batches) = without_views(&schema, batches)?;
            Ok((header_json(&header), schema, batches))
        }
        .await;
        let (meta, schema, batches) = match decoded {
            Ok(d) => d,
            Err(s) => {
                self.pending().remove(&handle);
                return Err(s.into());
            }
        };
        {
            let mut pending = self.pending();
            if let Some(p) = pending.get_mut(&handle) {
                p.bytes = batches.iter().map(RecordBatch::get_array_memory_size).sum();
                p.result = Some((schema.clone(), batches));
                p.created = Instant::now();
            }
            shed(&mut pending, MAX_PENDING_BYTES, &handle);
        }
        let ticket = TicketStatementQuery {
            statement_handle: handle.to_vec().into(),
        }
        .as_any()
        .encode_to_vec();
        let info = flight_info(&schema, ticket, request.into_inner())?
            .with_app_metadata(meta.to_string().into_bytes());
        Ok(Response::new(info))
    }

    /// The datasets `caller`'s active studies are approved for, each once, in order.
    async fn visible_datasets(&self, caller: &Caller) -> Result<Vec<String>, Error> {
        let mut ds: Vec<String> = self
            .visible_tables(caller)
            .await?
            .into_iter()
            .map(|(d, _, _)| d)
            .collect();
        ds.dedup();
        Ok(ds)
    }

    /// The datasets (with their tables' readable schemas) that `caller`'s active studies are
    /// approved for.
    async fn visible_tables(
        &self,
        caller: &Caller,
    ) -> Result<Vec<(String, String, Schema)>, Error> {
        if caller.role != Role::Researcher {
            return Ok(Vec::new());
        }
        let now = Timestamp::now();
        let regs = {
            let st = self.broker.ledger.state();
            let mut datasets = std::collections::BTreeSet::new();
            for s in st.studies() {
                if !s.is_member(&caller.id) || !s.active_at(now) {
                    continue;
                }
                if let Some((_, a)) = &s.approval {
                    datasets.extend(a.grants.iter().map(|g| g.dataset.as_str().to_owned()));
                }
            }
            datasets
                .into_iter()
                .filter_map(|d| st.dataset(&d).map(|ds| ds.latest().reg.clone()))
                .collect::<Vec<_>>()
        };
        let mut out = Vec::new();
        for reg in regs {
            let engine = self.broker.store.engine(&reg, &self.broker.ledger).await?;
            let ds = engine.dataset();
            for t in &ds.tables {
                let Some(tp) = ds.policy.tables.get(&t.name) else {
                    continue;
                };
                // Each listed column carries its policy (class, bounds, domain...) and the
                // table its contribution limits, as field and schema metadata: what shapes
                // the answers, readable in any Flight SQL client's catalog.
                let fields: Vec<_> = t
                    .schema
                    .fields()
                    .iter()
                    .filter_map(|f| {
                        let c = tp.columns.get(f.name())?;
                        if c.class == anonymizer::policy::ColumnClass::DirectIdentifier {
                            return None;
                        }
                        let policy = serde_json::to_string(c).ok()?;
                        Some(f.as_ref().clone().with_metadata(
                            [(POLICY_METADATA.to_owned(), policy)].into_iter().collect(),
                        ))
                    })
                    .collect();
                let b = ds.policy.table_bounds(&t.name);
                let limits = serde_json::json!({
                    "max_rows_per_unit": b.rows,
                    "max_groups_per_unit": b.groups,
                    "max_rows_per_group": b.rows_per_group,
                });
                out.push((
                    reg.dataset.as_str().to_owned(),
                    t.name.clone(),
                    Schema::new(fields).with_metadata(
                        [(POLICY_METADATA.to_owned(), limits.to_string())]
                            .into_iter()
                            .collect(),
                    ),
                ));
            }
        }
        Ok(out)
    }
}

/// A call header's value, if present and text.
fn header<T>(req: &Request<T>, name: &str) -> Result<Option<String>, Error> {
    match req.metadata().get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim().to_owned()))
            .map_err(|_| Error::invalid(format!("the header {name} is not text"))),
    }
}

fn number<T>(req: &Request<T>, name: &str, default: f64) -> Result<f64, Error> {
    match header(req, name)? {
        None => Ok(default),
        Some(s) => s.parse::<f64>().map_err(|_| {
            Error::invalid(format!(
                "the header {name} must be a number, not {}",
                super::shown(&s)
            ))
        }),
    }
}

/// The query a statement and its call headers ask for.
fn query_request(
    st: &ledger::State,
    req: &Request<FlightDescriptor>,
    sql: String,
) -> Result<v1::QueryRequest, Error> {
    let study = header(req, "x-consentry-study")?.unwrap_or_default();
    let dataset = match header(req, "x-consentry-dataset")? {
        Some(d) => d,
        None => {
            // The study's only approved dataset; otherwise the caller must say.
            let approved: Vec<String> = st
                .study(&study)
                .and_then(|s| s.approval.as_ref())
                .map(|(_, a)| {
                    a.grants
                        .iter()
                        .map(|g| g.dataset.as_str().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            match approved.as_slice() {
                [one] => one.clone(),
                [] => String::new(),
                many => {
                    return Err(Error::invalid(format!(
                        "study {study} is approved for several datasets ({}); set the call \
                         header x-consentry-dataset",
                        many.join(", ")
                    )));
                }
            }
        }
    };
    let mode = match header(req, "x-consentry-mode")?.as_deref() {
        None | Some("dp") => v1::Mode::Dp,
        Some("extract") => v1::Mode::Extract,
        Some(m) => {
            return Err(Error::invalid(format!(
                "the header x-consentry-mode must be dp or extract, not {}",
                super::shown(m)
            )));
        }
    };
    let accuracy = number(req, "x-consentry-accuracy", 0.0)?;
    let default_epsilon = if mode == v1::Mode::Extract || accuracy != 0.0 {
        0.0
    } else {
        DEFAULT_EPSILON
    };
    Ok(v1::QueryRequest {
        study,
        dataset,
        sql,
        mode: mode as i32,
        epsilon: number(req, "x-consentry-epsilon", default_epsilon)?,
        delta: number(req, "x-consentry-delta", 0.0)?,
        mechanism: header(req, "x-consentry-mechanism")?.unwrap_or_default(),
        accuracy,
    })
}

/// The metadata key of a listed column's policy (JSON: class, bounds, domain...) and of a
/// listed table's contribution limits.
pub const POLICY_METADATA: &str = "consentry.policy";

/// A study's budget as JSON.
fn budget_json(b: Option<&v1::Budget>) -> Option<serde_json::Value> {
    b.map(|b| {
        serde_json::json!({
            "epsilon_granted": b.epsilon_granted, "delta_granted": b.delta_granted,
            "epsilon_spent": b.epsilon_spent, "delta_spent": b.delta_spent,
            "epsilon_left": b.epsilon_left, "delta_left": b.delta_left,
            "rho_spent": b.rho_spent, "rho_left": b.rho_left,
            "epsilon_guaranteed": b.epsilon_guaranteed, "delta_guaranteed": b.delta_guaranteed,
            "accountant": b.accountant,
        })
    })
}

/// A dry run's spend and budget as JSON (the `FlightInfo`'s `app_metadata`).
fn preview_json(p: &v1::QueryPreview) -> serde_json::Value {
    serde_json::json!({
        "dry_run": true,
        "normalized_sql": p.normalized_sql,
        "epsilon": p.epsilon,
        "delta": p.delta,
        "rho": p.rho,
        "mechanism": p.mechanism,
        "budget": budget_json(p.budget.as_ref()),
    })
}

/// A dry run as a table: each statistic as written and its 95% half-width (NULL where it
/// depends on the group).
fn preview_batch(p: &v1::QueryPreview) -> Result<RecordBatch, Error> {
    use arrow::array::{Float64Array, StringArray};
    use arrow::datatypes::{DataType, Field};
    let schema = Arc::new(Schema::new(vec![
        Field::new("statistic", DataType::Utf8, false),
        Field::new("ci95", DataType::Float64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                p.statistics.iter().map(|s| s.statistic.as_str()),
            )),
            Arc::new(Float64Array::from_iter(p.statistics.iter().map(|s| s.ci95))),
        ],
    )
    .map_err(|e| Error::internal("building a dry run's table", e))
}

/// The header of a released query as JSON (the `FlightInfo`'s `app_metadata`).
fn header_json(h: &v1::QueryHeader) -> serde_json::Value {
    let budget = budget_json(h.budget.as_ref());
    serde_json::json!({
        "receipt_index": h.receipt_index,
        "epsilon_spent": h.epsilon_spent,
        "delta_spent": h.delta_spent,
        "rho_spent": h.rho_spent,
        "mechanism": h.mechanism,
        "repeated": h.repeated,
        "normalized_sql": h.normalized_sql,
        "result_digest": h.result_digest,
        "consent_digest": h.consent_digest,
        "dataset_version": h.dataset_version,
        "dataset_digest": h.dataset_digest,
        "rows_suppressed": h.rows_suppressed,
        "note": h.note,
        "budget": budget,
    })
}

/// Casts string and binary views to their plain types: Flight SQL clients (JDBC, older
/// pyarrow and ADBC releases) read those everywhere.
fn without_views(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<(SchemaRef, Vec<RecordBatch>), Error> {
    use arrow::datatypes::{DataType, Field};
    let plain = |t: &DataType| match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        t => t.clone(),
    };
    if !schema
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Utf8View | DataType::BinaryView))
    {
        return Ok((schema.clone(), batches));
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_data_type(plain(f.data_type())))
        .collect();
    let out_schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let cast = |b: RecordBatch| -> Result<RecordBatch, Error> {
        let cols = b
            .columns()
            .iter()
            .zip(out_schema.fields())
            .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::internal("casting the result", e))?;
        RecordBatch::try_new(out_schema.clone(), cols)
            .map_err(|e| Error::internal("casting the result", e))
    };
    let batches = batches.into_iter().map(cast).collect::<Result<_, _>>()?;
    Ok((out_schema, batches))
}

fn flight_info(
    schema: &Schema,
    ticket: Vec<u8>,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Error> {
    Ok(FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Error::internal("encoding a schema", e))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(descriptor))
}

/// The `FlightInfo` of a catalog command: the command itself is the ticket.
fn command_info(
    schema: &Schema,
    ticket: Vec<u8>,
    request: Request<FlightDescriptor>,
) -> Result<Response<FlightInfo>, Status> {
    Ok(Response::new(flight_info(
        schema,
        ticket,
        request.into_inner(),
    )?))
}

fn batches_stream(schema: SchemaRef, batches: Vec<RecordBatch>) -> DoGetStream {
    let input = futures::stream::iter(batches.into_iter().map(Ok));
    Box::pin(
        FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(input)
            .map_err(|e| Error::internal("encoding a result", e).into()),
    )
}

fn one_batch(
    schema: SchemaRef,
    batch: Result<RecordBatch, arrow_flight::error::FlightError>,
) -> Result<DoGetStream, Error> {
    let batch = batch.map_err(|e| Error::internal("building a catalog answer", e))?;
    Ok(batches_stream(schema, vec![batch]))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    /// The handshake of clients that log in with a user name and a password (the Flight SQL
    /// JDBC driver and the BI tools over it): Basic credentials whose password is a token from
    /// `broker token` (checked, as on every call, by the authentication in front of this
    /// service) come back as that bearer token, in the `authorization` header and the payload.
    async fn do_handshake(
        &self,
        request: Request<tonic::Streaming<arrow_flight::HandshakeRequest>>,
    ) -> Result<
        Response<
            Pin<Box<dyn Stream<Item = Result<arrow_flight::HandshakeResponse, Status>> + Send>>,
        >,
        Status,
    > {
        caller(&request)?;
        let value = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let (token, _) =
            crate::auth::credentials(value).map_err(|e| Error::unauthenticated(e.to_string()))?;
        let bearer = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::unauthenticated("the token is not header text"))?;
        let reply = arrow_flight::HandshakeResponse {
            protocol_version: 0,
            payload: token.into_bytes().into(),
        };
        let stream: Pin<
            Box<dyn Stream<Item = Result<arrow_flight::HandshakeResponse, Status>> + Send>,
        > = Box::pin(futures::stream::iter([Ok(reply)]));
        let mut response = Response::new(stream);
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        cmd: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.statement(cmd.query, request).await
    }

    /// A prepared statement's handle is its SQL (see [`prepared_handle`]): nothing is held
    /// between the calls, and the statement runs as a plain one, through the same path.
    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        caller(&request)?;
        if query.transaction_id.is_some() {
            return Err(
                Error::invalid("transactions are not supported: the broker only reads").into(),
            );
        }
        if query.query.len() > MAX_PREPARED_SQL {
            return Err(
                Error::invalid(format!("a statement is at most {MAX_PREPARED_SQL} bytes")).into(),
            );
        }
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: prepared_handle(&query.query).into(),
            // The result's columns are known when it runs (noisy columns come with their
            // intervals); no parameters.
            dataset_schema: Default::default(),
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        // Nothing is held for a prepared statement.
        caller(&request)?;
        Ok(())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let sql = prepared_sql(&cmd.prepared_statement_handle)?;
        self.statement(sql, request).await
    }

    async fn do_put_prepared_statement_query(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        caller(&request)?;
        Err(Error::invalid("statements take no parameters: write the values into the SQL").into())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = caller(&request)?;
        let handle: [u8; 16] =
            ticket.statement_handle.as_ref().try_into().map_err(|_| {
                Error::invalid("not a ticket of this broker; run the statement again")
            })?;
        let found = {
            let mut pending = self.pending();
            match pending.get(&handle) {
                Some(p) if p.caller != who.id || p.result.is_none() => None,
                Some(p) if p.created.elapsed() >= RESULT_TTL => {
                    pending.remove(&handle);
                    None
                }
                Some(_) => pending.remove(&handle),
                None => None,
            }
        };
        let p = found.ok_or_else(|| {
            Error::not_found(
                "no result waits under this ticket (fetched already, expired after 10 minutes, \
                 or another principal's); run the statement again: an identical repeat is free",
            )
        })?;
        let (schema, batches) = p
            .result
            .ok_or_else(|| Error::not_found("the result is not ready"))?;
        Ok(Response::new(batches_stream(schema, batches)))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let ticket = query.as_any().encode_to_vec();
        command_info(&query.into_builder().schema(), ticket, request)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = caller(&request)?;
        let mut b = query.into_builder();
        for d in self.visible_datasets(&who).await? {
            b.append(d);
        }
        let schema = b.schema();
        Ok(Response::new(one_batch(schema, b.build())?))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let ticket = query.as_any().encode_to_vec();
        command_info(&query.into_builder().schema(), ticket, request)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = caller(&request)?;
        let mut b = query.into_builder();
        for d in self.visible_datasets(&who).await? {
            b.append(&d, DB_SCHEMA);
        }
        let schema = b.schema();
        Ok(Response::new(one_batch(schema, b.build())?))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let ticket = query.as_any().encode_to_vec();
        command_info(&query.into_builder().schema(), ticket, request)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let who = caller(&request)?;
        let mut b = query.into_builder();
        for (d, t, schema) in self.visible_tables(&who).await? {
            b.append(&d, DB_SCHEMA, &t, "TABLE", &schema)
                .map_err(|e| Error::internal("listing tables", e))?;
        }
        let schema = b.schema();
        Ok(Response::new(one_batch(schema, b.build())?))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        caller(&request)?;
        let ticket = query.as_any().encode_to_vec();
        command_info(&query.into_builder(&self.info).schema(), ticket, request)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        caller(&request)?;
        let b = query.into_builder(&self.info);
        let schema = b.schema();
        Ok(Response::new(one_batch(schema, b.build())?))
    }

    async fn get_flight_info_fallback(
        &self,
        cmd: arrow_flight::sql::Command,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Error::Unsupported(format!(
            "{} is not supported: the broker answers SQL statements (DP aggregates or \
             extracts) and catalog calls only",
            cmd.type_url()
        ))
        .into())
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(Error::Unsupported(format!("{} is not supported", message.type_url)).into())
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        Err(Error::Unsupported(format!(
            "the action {} is not supported",
            super::shown(&request.get_ref().r#type)
        ))
        .into())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// The Flight service as served: Flight SQL's ([`FlightSql`]), with each command and ticket
/// envelope read first. arrow-flight's dispatch answers a message that names a Flight SQL
/// command but does not decode as it with `INTERNAL`; it is the sender's error, so it is
/// `INVALID_ARGUMENT` here, before the dispatch sees it. Every call is otherwise Flight SQL's.
pub struct Envelopes(pub FlightSql);

/// Refuses `bytes` unless they are an `Any` whose value decodes as the Flight SQL message its
/// type names (or names none: the dispatch says so itself).
fn check_envelope(bytes: &[u8], what: &str) -> Result<(), Status> {
    let refuse = || {
        Status::from(Error::invalid(format!(
            "the {what} is not a Flight SQL message this broker reads"
        )))
    };
    let any = Any::decode(bytes).map_err(|_| refuse())?;
    arrow_flight::sql::Command::try_from(any).map_err(|_| refuse())?;
    Ok(())
}

#[tonic::async_trait]
impl FlightService for Envelopes {
    type HandshakeStream = <FlightSql as FlightService>::HandshakeStream;
    type ListFlightsStream = <FlightSql as FlightService>::ListFlightsStream;
    type DoGetStream = <FlightSql as FlightService>::DoGetStream;
    type DoPutStream = <FlightSql as FlightService>::DoPutStream;
    type DoExchangeStream = <FlightSql as FlightService>::DoExchangeStream;
    type DoActionStream = <FlightSql as FlightService>::DoActionStream;
    type ListActionsStream = <FlightSql as FlightService>::ListActionsStream;

    async fn handshake(
        &self,
        request: Request<tonic::Streaming<arrow_flight::HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightService::handshake(&self.0, request).await
    }

    async fn list_flights(
        &self,
        request: Request<arrow_flight::Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        FlightService::list_flights(&self.0, request).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        check_envelope(&request.get_ref().cmd, "command")?;
        FlightService::get_flight_info(&self.0, request).await
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<arrow_flight::PollInfo>, Status> {
        FlightService::poll_flight_info(&self.0, request).await
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<arrow_flight::SchemaResult>, Status> {
        FlightService::get_schema(&self.0, request).await
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        check_envelope(&request.get_ref().ticket, "ticket")?;
        FlightService::do_get(&self.0, request).await
    }

    async fn do_put(
        &self,
        request: Request<tonic::Streaming<arrow_flight::FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        FlightService::do_put(&self.0, request).await
    }

    async fn do_exchange(
        &self,
        request: Request<tonic::Streaming<arrow_flight::FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        FlightService::do_exchange(&self.0, request).await
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        FlightService::do_action(&self.0, request).await
    }

    async fn list_actions(
        &self,
        request: Request<arrow_flight::Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        FlightService::list_actions(&self.0, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(caller: &str, bytes: usize, age_ms: u64) -> Pending {
        let schema = Arc::new(Schema::empty());
        Pending {
            caller: caller.into(),
            result: Some((schema, Vec::new())),
            bytes,
            created: Instant::now() - Duration::from_millis(age_ms),
        }
    }

    #[test]
    fn waiting_results_shed_the_biggest_holders_oldest_first() {
        let mut map = HashMap::new();
        // mallory holds 300 bytes in three results, alice 100 in one; the cap is 250.
        map.insert([1; 16], pending("mallory", 100, 30));
        map.insert([2; 16], pending("mallory", 100, 20));
        map.insert([3; 16], pending("mallory", 100, 10));
        map.insert([4; 16], pending("alice", 100, 40));
        // A statement still running holds a slot, not bytes.
        map.insert(
            [5; 16],
            Pending {
                result: None,
                ..pending("alice", 0, 0)
            },
        );
        shed(&mut map, 250, &[3; 16]);
        let mut left: Vec<u8> = map.keys().map(|k| k[0]).collect();
        left.sort_unstable();
        // mallory's two oldest went; alice's result, mallory's newest and the running slot
        // stay.
        assert_eq!(left, vec![3, 4, 5]);
        // The result just stored stays even alone over the cap.
        let mut one = HashMap::new();
        one.insert([7; 16], pending("bob", 1000, 0));
        shed(&mut one, 10, &[7; 16]);
        assert_eq!(one.len(), 1);
    }
}
