//! The engine: runs a query over a loaded dataset and releases differentially private results.
//!
//! The query path: normalize the SQL; return the cached release of an identical repeat (same
//! scope, SQL, budget and consent snapshot) without spending; refuse what the budget left
//! cannot pay for; plan with DataFusion and check the plan against the policy
//! ([`crate::plan`]); run the aggregate over consented, bounded rows with values clamped to
//! their bounds; add OpenDP noise to the per-group statistics and choose the released keys
//! ([`crate::release`]); run the operators above the aggregate (HAVING, ORDER BY, LIMIT,
//! projections) over the noisy values only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::Column;
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::functions_aggregate::expr_fn::{array_agg, count, count_distinct, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{
    Expr, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder, Projection, ScalarUDF, lit,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::DFParser;
use sha2::Digest as _;

use crate::clamp::{clamp_f64, clamp_i64};
use crate::consent::{ConsentFilter, UnitSet};
use crate::dataset::{Dataset, UNIT_COLUMN};
use crate::error::{Error, Result};
use crate::plan::{self, Checked, Statistic};
use crate::release::{self, Noised};

/// One query.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// What repeats are recognized within: e.g. study id and dataset version digest.
    pub scope: &'a str,
    /// The SQL (DataFusion dialect).
    pub sql: &'a str,
    /// Epsilon to spend.
    pub epsilon: f64,
    /// Delta to spend (needed only for keys chosen by partition selection).
    pub delta: f64,
    /// Who may be included.
    pub filter: &'a ConsentFilter,
    /// Epsilon and delta left in the budget of (study, dataset).
    pub budget_left: (f64, f64),
    /// The study's minimum cell size, if its approval sets one (CMS: 11): a group whose noisy
    /// count is from 1 to this minus 1 is released with its statistics suppressed (null).
    /// Post-processing of noisy values: it costs no privacy. Part of the repeat key.
    pub min_cell_size: Option<u64>,
}

/// A released result and what its receipt records.
#[derive(Debug, Clone)]
pub struct Release {
    /// Output schema: the query's columns, then `<column>_ci95` (95% interval half-width)
    /// for each noisy column released as is.
    pub schema: SchemaRef,
    /// The noisy rows.
    pub batches: Vec<RecordBatch>,
    /// Epsilon spent, from OpenDP's privacy maps (0 for a repeat).
    pub epsilon: f64,
    /// Delta spent.
    pub delta: f64,
    /// The normalized SQL.
    pub sql: String,
    /// SHA-256 of the consent snapshot (see [`consent_digest`]).
    pub consent_digest: [u8; 32],
    /// SHA-256 of the released result (its Arrow IPC stream).
    pub result_digest: [u8; 32],
    /// Mechanism parameters for the receipt.
    pub mechanism: serde_json::Value,
    /// Whether this is an identical repeat served from the cache.
    pub repeated: bool,
}

/// The engine over one loaded dataset version.
pub struct Engine {
    dataset: Arc<Dataset>,
    ctx: SessionContext,
    cache: Mutex<HashMap<[u8; 32], Release>>,
    consents: Mutex<Vec<(ConsentFilter, Arc<Consent>)>>,
}

/// A consent filter prepared for this engine: its snapshot digest and its set of units.
#[derive(Debug)]
pub(crate) struct Consent {
    /// [`consent_digest`] of the filter.
    pub digest: [u8; 32],
    /// The units admitted, or `None` for everyone.
    pub set: Option<Arc<UnitSet>>,
}

/// Prepared consent filters kept per engine. A filter is recognized by the identity of its id
/// list (the broker hands the same list while the ledger's consents are unchanged); the cache
/// holds a clone of that list, so its address cannot be reused by another list meanwhile.
const CONSENTS_KEPT: usize = 8;

fn same_filter(a: &ConsentFilter, b: &ConsentFilter) -> bool {
    match (a, b) {
        (ConsentFilter::Include(x), ConsentFilter::Include(y))
        | (ConsentFilter::Exclude(x), ConsentFilter::Exclude(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

/// Normalizes SQL: parsed and printed back, so whitespace, keyword case and comments do not
/// make two identical queries look different. Unquoted names are case-insensitive in
/// DataFusion, so their case is folded too: function names upper, identifiers and table names
/// lower (quoted ones are kept as written).
pub fn normalize_sql(sql: &str) -> Result<String> {
    use datafusion::sql::parser::Statement as DFStatement;
    use datafusion::sql::sqlparser::ast::{
        Expr as SqlExpr, Ident, ObjectName, ObjectNamePart, visit_expressions_mut,
        visit_relations_mut,
    };
    use std::ops::ControlFlow;

    fn fold(name: &mut ObjectName, upper: bool) {
        for part in &mut name.0 {
            if let ObjectNamePart::Identifier(id) = part {
                fold_ident(id, upper);
            }
        }
    }
    fn fold_ident(id: &mut Ident, upper: bool) {
        if id.quote_style.is_none() {
            id.value = if upper {
                id.value.to_uppercase()
            } else {
                id.value.to_lowercase()
            };
        }
    }

    let mut stmts = DFParser::parse_sql(sql).map_err(|e| Error::InvalidQuery(e.to_string()))?;
    match stmts.len() {
        1 => {}
        0 => return Err(Error::InvalidQuery("empty query".into())),
        _ => {
            return Err(Error::Refused {
                construct: "several statements".into(),
                advice: "send one query at a time".into(),
            });
        }
    }
    let mut stmt = stmts.pop_front().expect("one statement");
    if let DFStatement::Statement(inner) = &mut stmt {
        let _ = visit_expressions_mut(inner.as_mut(), |e| {
            match e {
                SqlExpr::Function(f) => fold(&mut f.name, true),
                SqlExpr::Identifier(id) => fold_ident(id, false),
                SqlExpr::CompoundIdentifier(ids) => {
                    ids.iter_mut().for_each(|id| fold_ident(id, false));
                }
                _ => {}
            }
            ControlFlow::<()>::Continue(())
        });
        let _ = visit_relations_mut(inner.as_mut(), |name| {
            fold(name, false);
            ControlFlow::<()>::Continue(())
        });
    }
    Ok(stmt.to_string())
}

/// The digest of a consent snapshot, the same formula as the ledger's: SHA-256 over
/// `"include\n"` or `"exclude\n"` then each id and `"\n"` in sorted order.
pub fn consent_digest(filter: &ConsentFilter) -> [u8; 32] {
    let (tag, ids) = match filter {
        ConsentFilter::Include(ids) => ("include\n", ids),
        ConsentFilter::Exclude(ids) => ("exclude\n", ids),
    };
    let mut sorted: Vec<&String> = ids.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = sha2::Sha256::new();
    h.update(tag.as_bytes());
    for id in sorted {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    h.finalize().into()
}

/// The unit column of a plan's rows: the first one (the tables of a join are joined on the
/// unit, so all of a row's unit columns hold the same unit).
fn unit_column(plan: &LogicalPlan) -> Result<Expr> {
    let (q, f) = plan
        .schema()
        .iter()
        .find(|(_, f)| f.name() == UNIT_COLUMN)
        .ok_or_else(|| Error::Engine("the unit column is missing".into()))?;
    Ok(Expr::Column(Column::from((q, f))))
}

/// The column numbering each unit's joined rows.
const ROW_NUMBER_COLUMN: &str = "__consentry_row";

/// The aggregate expressions computing each statistic's raw (pre-noise) values.
pub(crate) fn stat_exprs(stats: &[Statistic], unit: &Expr) -> Vec<Expr> {
    let mut out = vec![count(lit(1)).alias("__n")];
    for (i, s) in stats.iter().enumerate() {
        let name = |part: &str| format!("__s{i}_{part}");
        match s {
            Statistic::CountRows => out.push(count(lit(1)).alias(name("n"))),
            Statistic::CountValues(a) => out.push(count(a.clone()).alias(name("n"))),
            Statistic::CountUnits => out.push(count_distinct(unit.clone()).alias(name("n"))),
            Statistic::Sum {
                arg,
                bounds,
                integer,
            } => {
                let x = if *integer {
                    clamp_i64(arg, *bounds)
                } else {
                    clamp_f64(arg, *bounds, 0.0)
                };
                out.push(sum(x).alias(name("sum")))
            }
            Statistic::Avg { arg, bounds } | Statistic::Var { arg, bounds, .. } => {
                let mid = (bounds[0] + bounds[1]) / 2.0;
                let y = clamp_f64(arg, *bounds, mid);
                out.push(count(arg.clone()).alias(name("n")));
                out.push(sum(y.clone()).alias(name("sum")));
                if matches!(s, Statistic::Var { .. }) {
                    out.push(sum(y.clone() * y).alias(name("sum2")));
                }
            }
            Statistic::Quantile { arg, bounds, .. } => {
                out.push(array_agg(clamp_f64(arg, *bounds, 0.0)).alias(name("values")))
            }
        }
    }
    out
}

/// For a projection expression that releases an aggregate output as is (possibly under
/// aliases): the aggregate column's name and the output name.
fn released_column(e: &Expr) -> Option<(String, String)> {
    let out = match e {
        Expr::Alias(a) => a.name.clone(),
        Expr::Column(c) => c.name.clone(),
        _ => return None,
    };
    let mut inner = e;
    while let Expr::Alias(a) = inner {
        inner = &a.expr;
    }
    match inner {
        Expr::Column(c) => Some((c.name.clone(), out)),
        _ => None,
    }
}

/// Replaces the aggregate in `plan` with `released`, and passes the accuracy columns up to the
/// outermost projection, which releases them as `<column>_ci95`.
fn replace_aggregate(
    plan: &LogicalPlan,
    released: &LogicalPlan,
    acc: &[(String, String)],
    top: bool,
) -> Result<LogicalPlan> {
    match plan {
        LogicalPlan::Aggregate(_) => Ok(released.clone()),
        LogicalPlan::Projection(p) => {
            let child = replace_aggregate(&p.input, released, acc, false)?;
            let mut exprs = p.expr.clone();
            for (agg_name, acc_name) in acc {
                if top {
                    for e in &p.expr {
                        let target = released_column(e)
                            .filter(|(c, _)| c == agg_name)
                            .map(|(_, out)| out);
                        if let Some(out) = target {
                            exprs.push(
                                Expr::Column(Column::from_name(acc_name))
                                    .alias(format!("{out}_ci95")),
                            );
                        }
                    }
                } else {
                    exprs.push(Expr::Column(Column::from_name(acc_name)));
                }
            }
            Ok(LogicalPlan::Projection(Projection::try_new(
                exprs,
                Arc::new(child),
            )?))
        }
        other => {
            let inputs = other.inputs();
            let [input] = inputs.as_slice() else {
                return Err(Error::Engine(
                    "unexpected plan shape above the aggregate".into(),
                ));
            };
            let child = replace_aggregate(input, released, acc, top)?;
            Ok(other.with_new_exprs(other.expressions(), vec![child])?)
        }
    }
}

/// The released batch built directly, without planning a second query, when the plan above
/// the aggregate is one projection releasing aggregate columns as they are, possibly renamed
/// (`SELECT k, COUNT(*) AS n ... GROUP BY k`, the common shape). The same columns, names and
/// order as [`Engine::finish_planned`]; `None` for anything else (HAVING, ORDER BY, LIMIT,
/// expressions over aggregates).
fn finish_direct(checked: &Checked, noised: &Noised) -> Result<Option<RecordBatch>> {
    let LogicalPlan::Projection(p) = &checked.plan else {
        return Ok(None);
    };
    if !matches!(p.input.as_ref(), LogicalPlan::Aggregate(_)) {
        return Ok(None);
    }
    let agg_schema = checked.aggregate.schema.as_ref();
    let batch = &noised.batch;
    let mut fields = Vec::new();
    let mut cols = Vec::new();
    let mut released = Vec::new();
    for e in &p.expr {
        let Some((column, out)) = released_column(e) else {
            return Ok(None);
        };
        let Some(i) = agg_schema.fields().iter().position(|f| *f.name() == column) else {
            return Ok(None);
        };
        let f = batch.schema_ref().field(i);
        fields.push(Field::new(&out, f.data_type().clone(), f.is_nullable()));
        cols.push(batch.column(i).clone());
        released.push((column, out));
    }
    let n_keys = checked.aggregate.group_expr.len();
    for (j, name) in noised.accuracy_columns.iter().enumerate() {
        let Some(acc_name) = name else { continue };
        let agg_name = agg_schema.field(n_keys + j).name();
        let Some(acc) = batch.column_by_name(acc_name) else {
            return Err(Error::Engine(format!("missing column {acc_name}")));
        };
        for (column, out) in &released {
            if column == agg_name {
                fields.push(Field::new(format!("{out}_ci95"), DataType::Float64, true));
                cols.push(acc.clone());
            }
        }
    }
    let schema = Arc::new(Schema::new(fields));
    Ok(Some(
        RecordBatch::try_new(schema, cols).map_err(|e| Error::Engine(e.to_string()))?,
    ))
}

impl Engine {
    /// An engine over `dataset`.
    pub fn new(dataset: Dataset) -> Result<Engine> {
        let ctx = SessionContext::new();
        dataset.register(&ctx)?;
        // Warm the noise path once (OpenDP's measurement construction and OpenSSL's random
        // source), so the first query does not pay for it. No data is involved.
        crate::mechanisms::laplace_i64(&[0], 1, 1.0)?;
        crate::mechanisms::laplace_f64(&[0.0], 1.0, 1.0)?;
        Ok(Engine {
            dataset: Arc::new(dataset),
            ctx,
            cache: Mutex::new(HashMap::new()),
            consents: Mutex::new(Vec::new()),
        })
    }

    /// The filter's digest and unit set, computed once per id list (sorting, hashing and
    /// looking up a million ids costs more than a COUNT over a million rows).
    pub(crate) fn consent(&self, filter: &ConsentFilter) -> Arc<Consent> {
        let lock = || {
            self.consents
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some((_, c)) = lock().iter().find(|(f, _)| same_filter(f, filter)) {
            return c.clone();
        }
        let prepared = Arc::new(Consent {
            digest: consent_digest(filter),
            set: UnitSet::from_filter(filter, &self.dataset.units).map(Arc::new),
        });
        let mut kept = lock();
        kept.insert(0, (filter.clone(), prepared.clone()));
        kept.truncate(CONSENTS_KEPT);
        prepared
    }

    /// The loaded dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The session the dataset's tables are registered in (extracts run there too).
    pub(crate) fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// What identifies an identical repeat: the scope, the normalized SQL, the epsilon and
    /// delta asked, and the consent snapshot's digest.
    pub fn repeat_key(
        scope: &str,
        sql: &str,
        epsilon: f64,
        delta: f64,
        consent: &[u8; 32],
    ) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        for part in [scope.as_bytes(), sql.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(epsilon.to_le_bytes());
        h.update(delta.to_le_bytes());
        h.update(consent);
        h.finalize().into()
    }

    /// The scope that repeats are recognized within: the request's, and the minimum cell size
    /// that shapes the answer.
    pub fn repeat_scope(scope: &str, min_cell_size: Option<u64>) -> String {
        match min_cell_size {
            Some(m) => format!("{scope}\nmin_cell_size={m}"),
            None => scope.to_owned(),
        }
    }

    fn cache_key(req: &Request<'_>, sql: &str, consent: &[u8; 32]) -> [u8; 32] {
        let scope = Self::repeat_scope(req.scope, req.min_cell_size);
        Self::repeat_key(&scope, sql, req.epsilon, req.delta, consent)
    }

    /// Puts back a release recorded earlier (the broker's kept releases, after a restart),
    /// under its [`Engine::repeat_key`]. The caller has checked that it was released.
    pub fn restore(&self, key: [u8; 32], release: Release) {
        self.cache
            .lock()
            .expect("the cache lock is never held across a panic")
            .insert(key, release);
    }

    /// Runs a query and releases its noisy result, remembering it for identical repeats.
    pub async fn run(&self, req: &Request<'_>) -> Result<Release> {
        let release = self.run_pending(req).await?;
        self.remember(req, &release);
        Ok(release)
    }

    /// Remembers a release for identical repeats. A caller that records releases elsewhere
    /// (the broker's receipts) calls this only once the release is recorded, so an answer
    /// that was never released is never served as a free repeat.
    pub fn remember(&self, req: &Request<'_>, release: &Release) {
        if release.repeated {
            return;
        }
        let key = Self::cache_key(req, &release.sql, &release.consent_digest);
        self.cache
            .lock()
            .expect("the cache lock is never held across a panic")
            .insert(key, release.clone());
    }

    /// Runs a query and computes its noisy result without remembering it (see
    /// [`Engine::remember`]). An identical repeat of a remembered release returns it again,
    /// spending nothing.
    pub async fn run_pending(&self, req: &Request<'_>) -> Result<Release> {
        let sql = normalize_sql(req.sql)?;
        let prepared = self.consent(req.filter);
        let consent = prepared.digest;
        let key = Self::cache_key(req, &sql, &consent);
        if let Some(r) = self
            .cache
            .lock()
            .expect("the cache lock is never held across a panic")
            .get(&key)
        {
            return Ok(Release {
                epsilon: 0.0,
                delta: 0.0,
                repeated: true,
                ..r.clone()
            });
        }
        if !(req.epsilon.is_finite() && req.epsilon > 0.0 && (0.0..1.0).contains(&req.delta)) {
            return Err(Error::InvalidQuery(
                "epsilon must be positive and delta in [0, 1)".into(),
            ));
        }
        if req.epsilon > req.budget_left.0 + 1e-12 {
            return Err(Error::BudgetExhausted {
                what: "epsilon",
                needed: req.epsilon,
                left: req.budget_left.0,
            });
        }
        let plan = self.ctx.state().create_logical_plan(&sql).await?;
        let checked = plan::check(&plan, &self.dataset.policy)?;
        // Delta is spent only by partition selection.
        let delta = if checked.keys == plan::Keys::Selected {
            req.delta
        } else {
            0.0
        };
        if delta > req.budget_left.1 + 1e-15 {
            return Err(Error::BudgetExhausted {
                what: "delta",
                needed: delta,
                left: req.budget_left.1,
            });
        }
        let raw = self.aggregate(&checked, prepared.set.as_ref()).await?;
        let noised = release::noise(
            &checked,
            &raw,
            &self.dataset,
            req.epsilon,
            delta,
            req.min_cell_size,
        )?;
        let batches = self.finish(&checked, &noised).await?;
        let schema = batches
            .first()
            .map(|b| b.schema())
            .ok_or_else(|| Error::Engine("no output".into()))?;
        let release = Release {
            result_digest: release::digest(&schema, &batches)?,
            schema,
            batches,
            epsilon: noised.epsilon,
            delta: noised.delta,
            sql,
            consent_digest: consent,
            mechanism: noised.mechanism.clone(),
            repeated: false,
        };
        Ok(release)
    }

    /// Runs the aggregate over consented, bounded, clamped rows: one row per group with the
    /// raw statistics.
    async fn aggregate(
        &self,
        checked: &Checked,
        consented: Option<&Arc<UnitSet>>,
    ) -> Result<RecordBatch> {
        let input = checked.aggregate.input.as_ref().clone();
        let unit = unit_column(&input)?;
        let mut builder = LogicalPlanBuilder::from(input);
        if let Some(set) = consented {
            let udf: ScalarUDF = UnitSet::shared_udf(set);
            builder = builder.filter(udf.call(vec![unit.clone()]))?;
        }
        if checked.joined {
            // Each table was bounded at load, but a join multiplies a unit's rows: keep at
            // most max_rows_per_unit joined rows per unit. Which ones is decided by the rows'
            // values alone (ordered by every column; tied rows are identical), so adding or
            // removing a unit changes no other unit's rows.
            let k = u64::from(self.dataset.policy.max_rows_per_unit);
            let order: Vec<_> = builder
                .schema()
                .iter()
                .map(|qf| Expr::Column(Column::from(qf)).sort(true, true))
                .collect();
            let number = row_number()
                .partition_by(vec![unit.clone()])
                .order_by(order)
                .build()?
                .alias(ROW_NUMBER_COLUMN);
            builder = builder
                .window(vec![number])?
                .filter(datafusion::prelude::col(ROW_NUMBER_COLUMN).lt_eq(lit(k)))?;
        }
        let plan = builder
            .aggregate(
                checked.aggregate.group_expr.clone(),
                stat_exprs(&checked.stats, &unit),
            )?
            .build()?;
        let batches = self.ctx.execute_logical_plan(plan).await?.collect().await?;
        let schema = batches.first().map(|b| b.schema());
        match schema {
            Some(s) => Ok(arrow::compute::concat_batches(&s, &batches)
                .map_err(|e| Error::Engine(e.to_string()))?),
            None => Err(Error::Engine("the aggregate returned no batch".into())),
        }
    }

    /// Runs the operators above the aggregate over the noisy values.
    async fn finish(&self, checked: &Checked, noised: &Noised) -> Result<Vec<RecordBatch>> {
        match finish_direct(checked, noised)? {
            Some(batch) => Ok(vec![batch]),
            None => self.finish_planned(checked, noised).await,
        }
    }

    /// [`Engine::finish`] through DataFusion: any operators above the aggregate.
    async fn finish_planned(&self, checked: &Checked, noised: &Noised) -> Result<Vec<RecordBatch>> {
        let batch = &noised.batch;
        let mem = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]])?;
        let scan = LogicalPlanBuilder::scan("__released", provider_as_source(Arc::new(mem)), None)?;
        let agg_schema = checked.aggregate.schema.clone();
        let mut exprs = Vec::new();
        for (i, (q, f)) in agg_schema.iter().enumerate() {
            let src = Expr::Column(Column::new(
                Some("__released"),
                batch.schema().field(i).name(),
            ));
            exprs.push(src.alias_qualified(q.cloned(), f.name()));
        }
        let mut acc = Vec::new();
        let n_keys = checked.aggregate.group_expr.len();
        for (j, name) in noised.accuracy_columns.iter().enumerate() {
            if let Some(acc_name) = name {
                exprs.push(Expr::Column(Column::new(Some("__released"), acc_name)).alias(acc_name));
                acc.push((
                    agg_schema.field(n_keys + j).name().clone(),
                    acc_name.clone(),
                ));
            }
        }
        let released = scan.project(exprs)?.build()?;
        let upper = replace_aggregate(&checked.plan, &released, &acc, true)?;
        Ok(self
            .ctx
            .execute_logical_plan(upper)
            .await?
            .collect()
            .await?)
    }
}

#[cfg(test)]
impl Engine {
    /// A query's released batches built directly (if its shape allows) and through
    /// DataFusion, from the same noisy values.
    pub(crate) async fn both_finishes(
        &self,
        sql: &str,
    ) -> Result<(Option<RecordBatch>, Vec<RecordBatch>)> {
        let plan = self.ctx.state().create_logical_plan(sql).await?;
        let checked = plan::check(&plan, &self.dataset.policy)?;
        let raw = self.aggregate(&checked, None).await?;
        let noised = release::noise(&checked, &raw, &self.dataset, 1.0, 1e-6, None)?;
        Ok((
            finish_direct(&checked, &noised)?,
            self.finish_planned(&checked, &noised).await?,
        ))
    }

    /// The raw (pre-noise) statistics of a query: for tests of bounding and consent.
    pub(crate) async fn raw_for_tests(
        &self,
        sql: &str,
        filter: &ConsentFilter,
    ) -> Result<RecordBatch> {
        let plan = self.ctx.state().create_logical_plan(sql).await?;
        let checked = plan::check(&plan, &self.dataset.policy)?;
        let set = UnitSet::from_filter(filter, &self.dataset.units).map(Arc::new);
        self.aggregate(&checked, set.as_ref()).await
    }
}
