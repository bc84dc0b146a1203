//! The engine: runs a query over a loaded dataset and releases differentially private results.
//!
//! The query path is three stages, each the one place where its invariant holds:
//!
//! 1. **prepare** ([`Engine::prepare`]), data-independent: normalize the SQL (size and depth
//!    limits before DataFusion plans it), plan it against a catalog of schema-only tables,
//!    let DataFusion's analyzer coerce types, check the plan against the policy and make every
//!    expression total ([`crate::plan`], [`crate::total`]), and compute what it costs. Every
//!    refusal happens here and names the construct only: it depends on the SQL, the policy and
//!    the budget, never on a row.
//! 2. **draw** ([`Engine::draw`]), the only stage that reads rows: the aggregate's input runs
//!    over [`crate::scan::GuardedTable`]s (consented, bounded rows, filtered inside the scan,
//!    before any researcher expression), each unit's groups and joined rows are bounded by a
//!    rule on that unit's rows alone, values are clamped (NaN is NULL), and OpenDP's noise is
//!    added ([`crate::release`]). It runs under the operator's memory pool and deadline.
//! 3. **finish** ([`Engine::finish`]): HAVING, ORDER BY, LIMIT and the projections above the
//!    aggregate run in a context that holds nothing but the noisy batch. An empty result is a
//!    result.
//!
//! Once a query has passed stage 1 it is charged: any failure of stages 2 and 3 (a limit, an
//! engine error, a panic) is [`Error::Failed`] with the query's whole spend, and says nothing
//! else. Identical queries in flight share one draw: the second waits for the first and is
//! then an identical repeat, free.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::execution::TaskContext;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::functions_aggregate::expr_fn::{array_agg, count, count_distinct, sum};
use datafusion::functions_window::expr_fn::{dense_rank, row_number};
use datafusion::logical_expr::{
    Expr, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder, Projection, lit,
};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::DFParser;
use futures::FutureExt as _;
use sha2::Digest as _;

use crate::clamp::{clamp_f64, clamp_i64};
use crate::consent::{ConsentFilter, UnitSet};
use crate::dataset::{Dataset, UNIT_COLUMN};
use crate::error::{Error, Result};
use crate::mechanisms::Mechanism;
use crate::plan::{self, Checked, Statistic};
use crate::release::{self, Noised, Spending};
use crate::repeats::{Compact, KeptRepeats, RepeatCache};
use crate::scan::{GuardedTable, catalog_table};
use ledger::budget::{Account, Spend};

/// One query.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// What repeats are recognized within: e.g. study id and dataset version digest.
    pub scope: &'a str,
    /// The SQL (DataFusion dialect).
    pub sql: &'a str,
    /// Epsilon to spend (0 with an accuracy target). With Gaussian noise it stands for rho
    /// `epsilon² / 2`, what a pure query of that epsilon costs in zCDP.
    pub epsilon: f64,
    /// Delta to spend (needed only for keys chosen by partition selection).
    pub delta: f64,
    /// The noise asked for; `None` lets the engine choose: Laplace while the account composes
    /// by adding epsilons, Gaussian once it accounts in zCDP (the smaller error for a rho).
    pub mechanism: Option<Mechanism>,
    /// Instead of an epsilon: the 95% half-width wanted on every noisy count and sum; the
    /// engine spends the least budget that reaches it.
    pub accuracy: Option<f64>,
    /// Who may be included.
    pub filter: &'a ConsentFilter,
    /// The privacy account of (study, dataset): its grant and what was spent.
    pub budget: Account,
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
    /// Epsilon spent, from OpenDP's privacy maps (0 for a repeat); with Gaussian noise, that
    /// of the pure parts only.
    pub epsilon: f64,
    /// Delta spent.
    pub delta: f64,
    /// With Gaussian noise: the rho spent by the whole query.
    pub rho: Option<f64>,
    /// The normalized SQL.
    pub sql: String,
    /// SHA-256 of the consent snapshot ([`ConsentFilter::digest`]).
    pub consent_digest: [u8; 32],
    /// SHA-256 of the released result (its Arrow IPC stream).
    pub result_digest: [u8; 32],
    /// Mechanism parameters for the receipt.
    pub mechanism: serde_json::Value,
    /// Whether this is an identical repeat served from the cache.
    pub repeated: bool,
}

/// What one query may cost, set by the operator. Exceeding a limit while running is a charged
/// failure ([`Error::Failed`]); the broker keeps serving other queries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Memory one query's operators (aggregates, joins, sorts) may hold, in bytes. Nothing
    /// spills to disk: a query that needs more fails.
    pub memory: usize,
    /// How long one query may run.
    pub deadline: Duration,
    /// The most rows a join may produce in the worst case that the policy's bounds and the
    /// tables' sizes allow; a join that could produce more is refused when planned.
    pub join_rows: u64,
    /// Bytes of released answers kept in memory for identical repeats (the least recently
    /// used beyond it are looked up in the [`KeptRepeats`] store, if any).
    pub repeat_memory: usize,
    /// The first step of the release schedule ([`crate::schedule`]): a draw's outcome (an
    /// answer or a failure) leaves at the first step `ladder · 2^k` past the draw's worst case
    /// (computed from public figures before it runs) and its own time. Zero hands it on at
    /// once and computes no worst case (for benchmarks of the engine's own speed).
    pub ladder: Duration,
}

impl Limits {
    /// The default limits without the release schedule: for measuring the engine's own
    /// speed (benchmarks), never for serving researchers.
    pub fn unscheduled() -> Limits {
        Limits {
            ladder: Duration::ZERO,
            ..Limits::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory: 1 << 30,
            deadline: Duration::from_secs(60),
            join_rows: 5_000_000,
            repeat_memory: 64 << 20,
            ladder: Duration::from_millis(25),
        }
    }
}

/// The engine over one loaded dataset version.
pub struct Engine {
    dataset: Arc<Dataset>,
    /// Schema-only tables: queries are planned here, and nothing here holds a row.
    catalog: SessionContext,
    /// An empty context: the operators above the aggregate run here, over the noisy batch.
    upper: SessionContext,
    limits: Limits,
    cache: Mutex<RepeatCache>,
    /// Where released answers are kept beyond memory.
    kept: Option<Arc<dyn KeptRepeats>>,
    consents: Mutex<Vec<([u8; 32], Arc<Consent>)>>,
    flights: Mutex<HashMap<[u8; 32], Weak<tokio::sync::Mutex<()>>>>,
}

/// Held while a query is in flight: an identical query waits for it (single flight). Drop it
/// once the release is remembered (or refused).
pub struct Flight(#[allow(dead_code)] Option<tokio::sync::OwnedMutexGuard<()>>);

/// A query checked against the policy, with what it costs. Nothing in it depends on a row.
#[derive(Debug)]
pub struct Prepared {
    /// The normalized SQL.
    pub sql: String,
    /// The checked plan.
    pub checked: Checked,
    /// Its noise and budget.
    pub spending: Spending,
    /// What it is charged (the budget asked; the draws may spend a little less).
    pub cost: Spend,
    /// The draw's worst case: its outcome leaves no earlier ([`crate::schedule`]).
    pub worst: Duration,
}

/// A dry run's answer ([`Engine::preview`]).
#[derive(Debug, Clone)]
pub struct Preview {
    /// The normalized SQL.
    pub sql: String,
    /// What the query would be charged.
    pub cost: Spend,
    /// The noise on its counts and sums.
    pub mechanism: Mechanism,
    /// Each aggregate of the query, as written, with its 95% half-width (`None` where it
    /// depends on the group: AVG, VAR, STDDEV, quantiles).
    pub statistics: Vec<(String, Option<f64>)>,
}

/// A consent filter prepared for this engine: its snapshot digest and its set of units.
#[derive(Debug)]
pub(crate) struct Consent {
    /// The snapshot's digest ([`ConsentFilter::digest`]).
    pub digest: [u8; 32],
    /// The units admitted, or `None` for everyone.
    pub set: Option<Arc<UnitSet>>,
}

/// Prepared consent filters kept per engine, recognized by their snapshot's digest: a new
/// snapshot whose changes apply to a kept one updates its set instead of building it whole.
const CONSENTS_KEPT: usize = 8;

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

    if sql.len() > MAX_SQL {
        return Err(Error::Refused {
            construct: format!("a query of {} bytes", sql.len()),
            advice: format!("keep queries under {MAX_SQL} bytes"),
        });
    }
    check_tokens(sql)?;
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
    if let DFStatement::Statement(inner) = &stmt {
        check_size(inner)?;
    }
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

/// The refusal of a query whose planning panicked (it depends on the SQL only).
pub(crate) fn unplannable() -> Error {
    Error::Refused {
        construct: "this query".into(),
        advice: "it could not be planned; simplify the expressions it uses".into(),
    }
}

/// The smallest epsilon a query may spend: an answer at a vanishing epsilon is pure noise,
/// and must not make each query (and whatever its running says) free.
pub const MIN_EPSILON: f64 = 1e-3;

/// Largest SQL text accepted.
pub const MAX_SQL: usize = 64 << 10;
/// Most tokens (words, literals, operators) in a query: a parse tree is as deep as its longest
/// chain of operators, and dropping a tree 25,000 deep overflowed a worker's stack.
pub const MAX_TOKENS: usize = 12_000;
/// Deepest nesting of expressions accepted (a chain of 200 ORs is 200 deep: use IN lists).
pub const MAX_DEPTH: usize = 128;
/// Most expression nodes in one query.
pub const MAX_EXPRESSIONS: usize = 4096;

/// Refuses SQL of more than [`MAX_TOKENS`] tokens, counted by the tokenizer (a loop, no
/// recursion) before any tree is built. A token takes at least a byte, so shorter SQL (every
/// ordinary query) is not tokenized twice.
fn check_tokens(sql: &str) -> Result<()> {
    if sql.len() <= MAX_TOKENS {
        return Ok(());
    }
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| Error::InvalidQuery(e.to_string()))?;
    let n = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if n > MAX_TOKENS {
        return Err(Error::Refused {
            construct: format!("a query of {n} tokens"),
            advice: format!(
                "keep queries under {MAX_TOKENS} tokens (long chains of operators: use IN lists)"
            ),
        });
    }
    Ok(())
}

/// Refuses a statement whose expressions nest deeper than [`MAX_DEPTH`] or number more than
/// [`MAX_EXPRESSIONS`], before DataFusion's planner (which recurses on them) sees it.
fn check_size(stmt: &datafusion::sql::sqlparser::ast::Statement) -> Result<()> {
    use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, Visit, Visitor};
    use std::ops::ControlFlow;
    struct Size {
        depth: usize,
        deepest: usize,
        nodes: usize,
    }
    impl Visitor for Size {
        type Break = ();
        fn pre_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<()> {
            self.depth += 1;
            self.nodes += 1;
            self.deepest = self.deepest.max(self.depth);
            if self.depth > MAX_DEPTH || self.nodes > MAX_EXPRESSIONS {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
        fn post_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<()> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
    }
    let mut size = Size {
        depth: 0,
        deepest: 0,
        nodes: 0,
    };
    if stmt.visit(&mut size).is_break() {
        return Err(Error::Refused {
            construct: if size.depth > MAX_DEPTH {
                format!("expressions nested more than {MAX_DEPTH} deep")
            } else {
                format!("more than {MAX_EXPRESSIONS} expressions")
            },
            advice: "use IN lists instead of long chains of OR, and shorter queries".into(),
        });
    }
    Ok(())
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
/// The column ranking each unit's groups.
const GROUP_RANK_COLUMN: &str = "__consentry_group";
/// The column numbering each unit's rows in one group.
const GROUP_ROW_COLUMN: &str = "__consentry_group_row";

/// The aggregate expressions computing each statistic's raw (pre-noise) values; with
/// `units`, the patients per group too (`__u`, for partition selection). A statistic whose
/// raw column is one already computed (`COUNT(*)` is `__n`, `COUNT(DISTINCT patient_id)` is
/// `__u`) is not computed twice: it is listed as a copy (from, to), made after the aggregate.
pub(crate) fn stat_exprs(
    stats: &[Statistic],
    unit: &Expr,
    units: bool,
) -> (Vec<Expr>, Vec<(&'static str, String)>) {
    let mut out = vec![count(lit(1)).alias("__n")];
    let mut copies = Vec::new();
    if units {
        out.push(count_distinct(unit.clone()).alias("__u"));
    }
    for (i, s) in stats.iter().enumerate() {
        let name = |part: &str| format!("__s{i}_{part}");
        match s {
            Statistic::CountRows => copies.push(("__n", name("n"))),
            Statistic::CountValues(a) => out.push(count(a.clone()).alias(name("n"))),
            Statistic::CountUnits if units => copies.push(("__u", name("n"))),
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
                // Counted on the clamped values: a NaN (NULL once clamped) is in neither.
                out.push(count(y.clone()).alias(name("n")));
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
    (out, copies)
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

/// Points every table scan of `plan` at the rows this query may see.
fn guarded(
    plan: LogicalPlan,
    dataset: &Dataset,
    consented: Option<&Arc<UnitSet>>,
) -> Result<LogicalPlan> {
    Ok(plan
        .transform_up(|node| match node {
            LogicalPlan::TableScan(s) => {
                let table = dataset
                    .tables
                    .iter()
                    .find(|t| t.name == s.table_name.table())
                    .ok_or_else(|| {
                        datafusion::error::DataFusionError::Plan(format!(
                            "unknown table {}",
                            s.table_name
                        ))
                    })?;
                let source = provider_as_source(Arc::new(GuardedTable::new(
                    table.clone(),
                    consented.cloned(),
                )));
                let scan = LogicalPlanBuilder::scan(s.table_name.clone(), source, None)?.build()?;
                Ok(Transformed::yes(scan))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })?
        .data)
}

impl Engine {
    /// An engine over `dataset`, with the default [`Limits`].
    pub fn new(dataset: Dataset) -> Result<Engine> {
        Self::with_limits(dataset, Limits::default())
    }

    /// An engine over `dataset` whose queries run within `limits`.
    pub fn with_limits(dataset: Dataset, limits: Limits) -> Result<Engine> {
        let catalog = SessionContext::new();
        for t in &dataset.tables {
            catalog.register_table(t.name.as_str(), catalog_table(t))?;
        }
        // Warm the noise path once (OpenDP's measurement construction and OpenSSL's random
        // source), so the first query does not pay for it. No data is involved.
        crate::mechanisms::laplace_i64(&[0], 1, 1.0)?;
        crate::mechanisms::laplace_f64(&[0.0], 1.0, 1.0)?;
        Ok(Engine {
            dataset: Arc::new(dataset),
            catalog,
            upper: SessionContext::new(),
            limits,
            cache: Mutex::new(RepeatCache::new(limits.repeat_memory)),
            kept: None,
            consents: Mutex::new(Vec::new()),
            flights: Mutex::new(HashMap::new()),
        })
    }

    /// The filter's digest and unit set, made once per snapshot (looking up a million ids
    /// costs more than a COUNT over a million rows), and from the kept set of the snapshot
    /// before it when the ledger says what changed.
    pub(crate) fn consent(&self, filter: &ConsentFilter) -> Arc<Consent> {
        let lock = || {
            self.consents
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let digest = *filter.digest().bytes();
        let parent = {
            let kept = lock();
            if let Some((_, c)) = kept.iter().find(|(d, _)| *d == digest) {
                return c.clone();
            }
            filter.changes().and_then(|ch| {
                kept.iter()
                    .find(|(d, _)| d == ch.from.bytes())
                    .map(|(_, c)| c.clone())
            })
        };
        let units = &self.dataset.units;
        let set = parent
            .and_then(|p| UnitSet::updated(p.set.as_deref(), filter, units))
            .unwrap_or_else(|| UnitSet::from_filter(filter, units));
        let prepared = Arc::new(Consent {
            digest,
            set: set.map(Arc::new),
        });
        let mut kept = lock();
        kept.insert(0, (digest, prepared.clone()));
        kept.truncate(CONSENTS_KEPT);
        prepared
    }

    /// The loaded dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The limits queries run within.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Plans `sql` (normalized) against the schema-only catalog and runs DataFusion's analyzer
    /// (type coercion), so that every cast the query will run is in the plan checked.
    pub(crate) async fn analyzed(&self, sql: &str) -> Result<LogicalPlan> {
        let state = self.catalog.state();
        // Planning reads no row (the catalog holds none): whatever fails here is the query's
        // own doing, and says so in DataFusion's words, minus the lists of valid fields.
        let plan = state
            .create_logical_plan(sql)
            .await
            .map_err(|e| self.unsuggested(Error::planning(e)))?;
        state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})
            .map_err(|e| self.unsuggested(Error::planning(e)))
    }

    /// A planning error without DataFusion's "Did you mean 'table.column'?" when that column is
    /// one the catalog hides from researchers (a direct identifier).
    fn unsuggested(&self, e: Error) -> Error {
        let Error::InvalidQuery(m) = &e else {
            return e;
        };
        let Some((before, rest)) = m.split_once(" Did you mean '") else {
            return e;
        };
        let Some((name, after)) = rest.split_once("'?") else {
            return e;
        };
        let (table, column) = name.rsplit_once('.').unwrap_or(("", name));
        let hidden = self.dataset.tables.iter().any(|t| {
            (table.is_empty() || table == t.name.as_str())
                && self
                    .dataset
                    .policy
                    .column(t.name.as_str(), column)
                    .is_some_and(|c| c.class == crate::policy::ColumnClass::DirectIdentifier)
        });
        if hidden {
            Error::InvalidQuery(format!("{before}{after}"))
        } else {
            e
        }
    }

    /// `plan` with its table scans reading only the rows `consented` admits.
    pub(crate) fn guarded(
        &self,
        plan: LogicalPlan,
        consented: Option<&Arc<UnitSet>>,
    ) -> Result<LogicalPlan> {
        guarded(plan, &self.dataset, consented)
    }

    /// Runs a plan over guarded tables under the memory limit (nothing spills to disk).
    /// The work runs on the query threads ([`crate::threads`]), never on the caller's.
    pub(crate) async fn collect(&self, plan: LogicalPlan) -> Result<Vec<RecordBatch>> {
        let state = self.catalog.state();
        let memory = self.limits.memory;
        crate::threads::run(async move {
            let physical = state.create_physical_plan(&plan).await?;
            let runtime = RuntimeEnvBuilder::new()
                .with_memory_limit(memory, 1.0)
                .with_disk_manager_builder(
                    DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
                )
                .build_arc()?;
            let task = Arc::new(TaskContext::from(&state).with_runtime(runtime));
            Ok(datafusion::physical_plan::collect(physical, task).await?)
        })
        .await
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

    /// The scope that repeats are recognized within: the request's, and what else shapes the
    /// answer (the minimum cell size, the mechanism and the accuracy asked).
    pub fn repeat_scope(req: &Request<'_>) -> String {
        let mut scope = req.scope.to_owned();
        if let Some(m) = req.min_cell_size {
            scope.push_str(&format!("\nmin_cell_size={m}"));
        }
        if let Some(m) = req.mechanism {
            scope.push_str(&format!("\nmechanism={}", m.name()));
        }
        if let Some(a) = req.accuracy {
            scope.push_str(&format!("\naccuracy={a:e}"));
        }
        scope
    }

    fn cache_key(req: &Request<'_>, sql: &str, consent: &[u8; 32]) -> [u8; 32] {
        Self::repeat_key(
            &Self::repeat_scope(req),
            sql,
            req.epsilon,
            req.delta,
            consent,
        )
    }

    /// The engine, with identical repeats of answers no longer in memory looked up in `kept`
    /// (the broker's kept releases: after a restart, or once memory dropped them).
    #[must_use]
    pub fn with_kept(mut self, kept: Arc<dyn KeptRepeats>) -> Engine {
        self.kept = Some(kept);
        self
    }

    fn repeats(&self) -> std::sync::MutexGuard<'_, RepeatCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The release remembered under `key`: in memory, else in the kept store (read on a
    /// blocking thread, and put back in memory).
    async fn remembered(&self, key: [u8; 32]) -> Option<Release> {
        let in_memory = self.repeats().get(&key);
        if let Some(r) = in_memory.and_then(|c| c.release()) {
            return Some(r);
        }
        let kept = self.kept.clone()?;
        let found = tokio::task::spawn_blocking(move || kept.find(&key))
            .await
            .ok()
            .flatten()?;
        self.keep(key, &found);
        Some(found)
    }

    /// Keeps `release` in memory under `key` (encoded before the lock is taken).
    fn keep(&self, key: [u8; 32], release: &Release) {
        if let Some(c) = Compact::of(release) {
            self.repeats().insert(key, c);
        }
    }

    /// Runs a query and releases its noisy result, remembering it for identical repeats.
    pub async fn run(&self, req: &Request<'_>) -> Result<Release> {
        let (release, _flight) = self.run_pending(req).await?;
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
        self.keep(key, release);
    }

    /// Waits for an identical query in flight, then holds the key until the returned
    /// [`Flight`] is dropped.
    async fn fly(&self, key: [u8; 32]) -> Flight {
        let lock = {
            let mut flights = self
                .flights
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            flights.retain(|_, w| w.strong_count() > 0);
            match flights.get(&key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    flights.insert(key, Arc::downgrade(&l));
                    l
                }
            }
        };
        Flight(Some(lock.lock_owned().await))
    }

    /// Runs a query and computes its noisy result without remembering it (see
    /// [`Engine::remember`]); hold the [`Flight`] until then, so that an identical query
    /// waits and is answered as a repeat. An identical repeat of a remembered release
    /// returns it again, spending nothing.
    pub async fn run_pending(&self, req: &Request<'_>) -> Result<(Release, Flight)> {
        let sql = std::panic::catch_unwind(|| normalize_sql(req.sql))
            .unwrap_or_else(|_| Err(unplannable()))?;
        let prepared = self.consent(req.filter);
        let consent = prepared.digest;
        let key = Self::cache_key(req, &sql, &consent);
        let flight = self.fly(key).await;
        if let Some(r) = self.remembered(key).await {
            let repeat = Release {
                epsilon: 0.0,
                delta: 0.0,
                rho: None,
                repeated: true,
                ..r
            };
            return Ok((repeat, flight));
        }
        // Planning reads no row: a panic in it (a DataFusion function on an argument type it
        // does not expect) is a refusal of the query, never a dropped call.
        let p = match std::panic::AssertUnwindSafe(self.prepare(req, sql))
            .catch_unwind()
            .await
        {
            Ok(p) => p?,
            Err(_) => {
                tracing::error!("planning a query panicked");
                return Err(unplannable());
            }
        };
        // From here on the query is charged, whatever happens: a failure says only that.
        let charged = Error::Failed {
            epsilon: p.cost.epsilon,
            delta: p.cost.delta,
            rho: p.cost.concentrated.then_some(p.cost.rho),
        };
        let run = async {
            let noised = self
                .draw(&p, prepared.set.as_ref(), req.min_cell_size)
                .await?;
            let batches = self.finish(&p.checked, &noised).await?;
            let schema = batches
                .first()
                .map(|b| b.schema())
                .ok_or_else(|| Error::Engine("no output".into()))?;
            Ok::<_, Error>(Release {
                result_digest: release::digest(&schema, &batches)?,
                schema,
                batches,
                epsilon: noised.epsilon,
                delta: noised.delta,
                rho: noised.rho,
                sql: p.sql.clone(),
                consent_digest: consent,
                mechanism: noised.mechanism.clone(),
                repeated: false,
            })
        };
        let bounded = tokio::time::timeout(self.limits.deadline, run);
        let drawn = crate::schedule::on_schedule(
            self.limits.ladder,
            p.worst,
            std::panic::AssertUnwindSafe(bounded).catch_unwind(),
        );
        match drawn.await {
            Ok(Ok(Ok(release))) => Ok((release, flight)),
            Ok(Ok(Err(e))) => {
                tracing::warn!(kind = e.kind(), "a query failed while running");
                Err(charged)
            }
            Ok(Err(_)) => {
                tracing::warn!("a query ran past its deadline");
                Err(charged)
            }
            Err(_) => {
                tracing::error!("a query panicked while running");
                Err(charged)
            }
        }
    }

    /// A dry run: what `req` would spend and each released statistic's 95% half-width, from
    /// the SQL, the policy and the request alone. Nothing is read and nothing is spent: the
    /// answer depends on no row (the same checks as a query, budget included, then
    /// [`release::preview`]).
    pub async fn preview(&self, req: &Request<'_>) -> Result<Preview> {
        let sql = std::panic::catch_unwind(|| normalize_sql(req.sql))
            .unwrap_or_else(|_| Err(unplannable()))?;
        let p = match std::panic::AssertUnwindSafe(self.prepare(req, sql))
            .catch_unwind()
            .await
        {
            Ok(p) => p?,
            Err(_) => return Err(unplannable()),
        };
        let widths = release::preview(&p.checked, &self.dataset, p.spending, req.min_cell_size)?;
        let statistics = p
            .checked
            .aggregate
            .aggr_expr
            .iter()
            .map(|e| e.human_display().to_string())
            .zip(widths)
            .collect();
        Ok(Preview {
            sql: p.sql,
            cost: p.cost,
            mechanism: p.spending.mechanism,
            statistics,
        })
    }

    /// Stage 1: checks the request and the query, and what it costs. Depends on the SQL, the
    /// policy, the request and the budget only.
    pub async fn prepare(&self, req: &Request<'_>, sql: String) -> Result<Prepared> {
        let spend_ok = match req.accuracy {
            Some(a) => a.is_finite() && a > 0.0 && req.epsilon == 0.0,
            None => req.epsilon.is_finite() && req.epsilon >= MIN_EPSILON,
        };
        if !(spend_ok && (0.0..1.0).contains(&req.delta)) {
            return Err(Error::InvalidQuery(format!(
                "give either an epsilon (at least {MIN_EPSILON}, finite) or an accuracy (a \
                 positive 95% half-width), and a delta in [0, 1)"
            )));
        }
        if req.mechanism == Some(Mechanism::Gaussian) && req.budget.delta <= 0.0 {
            return Err(Error::Refused {
                construct: "Gaussian noise".into(),
                advice: "the study's grant has no delta, and zero-concentrated DP converts to \
                         (epsilon, delta) only with delta > 0; use Laplace noise, or ask the IRB \
                         for a delta"
                    .into(),
            });
        }
        let plan = self.analyzed(&sql).await?;
        let checked = plan::check(plan, &self.dataset.policy)?;
        let joined_rows = self.check_join_size(&checked)?;
        let rows_read = checked
            .tables
            .iter()
            .map(|t| self.dataset.table_rows(t))
            .fold(joined_rows, u64::saturating_add);
        let worst = self.worst_case(rows_read, checked.calls).await?;
        // Delta is spent only by partition selection.
        let delta = if checked.keys == plan::Keys::Selected {
            if req.delta <= 0.0 {
                return Err(Error::Refused {
                    construct: "GROUP BY a column without a public domain".into(),
                    advice: "partition selection needs delta > 0; declare the column's domain \
                             in the policy, or ask the IRB for a delta"
                        .into(),
                });
            }
            req.delta
        } else {
            0.0
        };
        let rows = release::summed_rows(&checked, &self.dataset);
        let draws = release::draws(&checked, req.min_cell_size).max(1) as f64;
        let spend = |mechanism: Mechanism| -> Result<(Spending, Spend)> {
            // The least spend of any query (a coarse accuracy target buys no cheaper probe).
            let floor = match mechanism {
                Mechanism::Laplace => MIN_EPSILON,
                Mechanism::Gaussian => MIN_EPSILON * MIN_EPSILON / 2.0,
            };
            let budget = match (req.accuracy, mechanism) {
                (Some(a), m) => {
                    (release::share_for_accuracy(&checked, rows, m, a)? * draws).max(floor)
                }
                (None, Mechanism::Laplace) => req.epsilon,
                (None, Mechanism::Gaussian) => req.epsilon * req.epsilon / 2.0,
            };
            let cost = match mechanism {
                Mechanism::Laplace => Spend::pure(budget, delta),
                Mechanism::Gaussian => Spend::concentrated(0.0, delta, budget),
            };
            let spending = Spending {
                mechanism,
                budget,
                delta,
            };
            Ok((spending, cost))
        };
        let (spending, cost) = match req.mechanism {
            Some(m) => spend(m)?,
            None => {
                // Laplace while epsilons add up within the grant (what it costs is then its
                // epsilon, which no conversion beats for a few queries); past that every
                // query costs rho, and Gaussian noise has the smaller error for a rho.
                let laplace = spend(Mechanism::Laplace)?;
                if req.budget.delta <= 0.0 || req.budget.adds_up(&laplace.1) {
                    laplace
                } else {
                    let gaussian = spend(Mechanism::Gaussian)?;
                    if gaussian.1.rho <= laplace.1.rho {
                        gaussian
                    } else {
                        laplace
                    }
                }
            }
        };
        if !(spending.budget.is_finite() && spending.budget > 0.0) {
            return Err(Error::InvalidQuery(
                "the accuracy asked needs no noise, or more than any budget".into(),
            ));
        }
        if !req.budget.admits(&cost) {
            let b = &req.budget;
            return Err(if delta > b.delta_left() + 1e-15 {
                Error::BudgetExhausted {
                    what: "delta",
                    needed: delta,
                    left: b.delta_left(),
                }
            } else if spending.mechanism == Mechanism::Gaussian {
                Error::BudgetExhausted {
                    what: "rho",
                    needed: cost.rho,
                    left: b.rho_left(),
                }
            } else {
                Error::BudgetExhausted {
                    what: "epsilon",
                    needed: cost.epsilon,
                    left: b.epsilon_left(),
                }
            });
        }
        Ok(Prepared {
            sql,
            checked,
            spending,
            cost,
            worst,
        })
    }

    /// The draw's worst case ([`crate::schedule`]) reading `rows` rows with `calls` function
    /// calls each; a query whose worst case exceeds the deadline is refused. Zero without a
    /// release schedule.
    pub(crate) async fn worst_case(&self, rows: u64, calls: usize) -> Result<Duration> {
        if self.limits.ladder.is_zero() {
            return Ok(Duration::ZERO);
        }
        let worst = crate::schedule::costs().await.worst(rows, calls);
        if worst > self.limits.deadline {
            return Err(Error::Refused {
                construct: format!("a query over {rows} rows with {calls} function calls per row"),
                advice: format!(
                    "its answer leaves after its worst case (every row through every call, so \
                     that its timing tells nothing of the data), which would exceed the \
                     broker's deadline of {} s; read fewer or smaller tables, join fewer, or \
                     call fewer functions",
                    self.limits.deadline.as_secs()
                ),
            });
        }
        Ok(worst)
    }

    /// Refuses a join whose output could exceed [`Limits::join_rows`]: each unit has at most
    /// `k_t` rows in table t, so the join of tables t1..tn has at most
    /// `min_i(rows(ti) · prod_(j != i) k_tj)` rows, whatever the consents and the data's values.
    /// Returns that bound (0 without a join).
    fn check_join_size(&self, checked: &Checked) -> Result<u64> {
        if !checked.joined {
            return Ok(0);
        }
        let policy = &self.dataset.policy;
        let n = checked.tables.len();
        let worst = (0..n)
            .map(|i| {
                let others: f64 = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| f64::from(policy.table_bounds(&checked.tables[j]).rows))
                    .product();
                self.dataset.table_rows(&checked.tables[i]) as f64 * others
            })
            .fold(f64::INFINITY, f64::min);
        if worst > self.limits.join_rows as f64 {
            return Err(Error::Refused {
                construct: format!("a join of {n} tables"),
                advice: format!(
                    "its rows could reach {worst:.0} (each patient's rows multiply), over the \
                     broker's limit of {}; join fewer tables",
                    self.limits.join_rows
                ),
            });
        }
        Ok(worst as u64)
    }

    /// Stage 2: the aggregate over consented, bounded, clamped rows, then the noise.
    pub(crate) async fn draw(
        &self,
        p: &Prepared,
        consented: Option<&Arc<UnitSet>>,
        min_cell: Option<u64>,
    ) -> Result<Noised> {
        let raw = self.aggregate(&p.checked, consented).await?;
        release::noise(&p.checked, &raw, &self.dataset, p.spending, min_cell)
    }

    /// Runs the aggregate over consented, bounded, clamped rows: one row per group with the
    /// raw statistics.
    async fn aggregate(
        &self,
        checked: &Checked,
        consented: Option<&Arc<UnitSet>>,
    ) -> Result<RecordBatch> {
        let plan = self.lower_plan(checked, consented)?;
        // No group at all (every row filtered out) is zero rows, not an error.
        let schema = plan.schema().inner().clone();
        let batches = self.collect(plan).await?;
        arrow::compute::concat_batches(&schema, &batches).map_err(|e| Error::Engine(e.to_string()))
    }

    /// The plan of the aggregate: guarded scans, the researcher's filters and joins, each
    /// unit's joined rows and groups bounded, then the raw statistics.
    fn lower_plan(
        &self,
        checked: &Checked,
        consented: Option<&Arc<UnitSet>>,
    ) -> Result<LogicalPlan> {
        let input = self.guarded(checked.aggregate.input.as_ref().clone(), consented)?;
        let unit = unit_column(&input)?;
        let policy = &self.dataset.policy;
        let bounds = checked.bounds;
        let k = u64::from(bounds.rows);
        let mut builder = LogicalPlanBuilder::from(input);
        // Which of a unit's rows are kept is decided by the values of that unit's rows alone
        // (ordered by every column; tied rows are identical), so adding or removing a unit
        // changes no other unit's rows.
        let every_column = |b: &LogicalPlanBuilder| -> Vec<_> {
            b.schema()
                .iter()
                .map(|qf| Expr::Column(Column::from(qf)).sort(true, true))
                .collect()
        };
        if checked.joined && policy.join_rows_per_unit(&checked.tables) > k {
            // Each table was bounded at load, but a join multiplies a unit's rows: keep at
            // most k joined rows per unit.
            let number = row_number()
                .partition_by(vec![unit.clone()])
                .order_by(every_column(&builder))
                .build()?
                .alias(ROW_NUMBER_COLUMN);
            builder = builder
                .window(vec![number])?
                .filter(datafusion::prelude::col(ROW_NUMBER_COLUMN).lt_eq(lit(k)))?;
        }
        let keys: Vec<Expr> = checked
            .aggregate
            .group_expr
            .iter()
            .map(|e| e.clone().unalias())
            .collect();
        let g = u64::from(bounds.groups);
        if let plan::Keys::Public(domains) = &checked.keys
            && g < k
        {
            // When a patient's groups are bounded, only rows whose keys are in the public
            // domains are ranked (the others are dropped from the release anyway), so the g
            // groups kept are released ones.
            for (key, domain) in keys.iter().zip(domains) {
                let (as_type, values): (DataType, Vec<Expr>) = match domain {
                    crate::policy::Domain::Text(v) => {
                        (DataType::Utf8, v.iter().map(|x| lit(x.clone())).collect())
                    }
                    crate::policy::Domain::Int(v) => {
                        (DataType::Int64, v.iter().map(|x| lit(*x)).collect())
                    }
                };
                let key = Expr::TryCast(datafusion::logical_expr::TryCast::new(
                    Box::new(key.clone()),
                    as_type,
                ));
                builder = builder.filter(key.in_list(values, false))?;
            }
        }
        if !keys.is_empty() && g < k {
            // Each unit's rows fall in at most g groups: its g first group keys in the keys'
            // order (nulls last) are kept, its other rows dropped.
            let order: Vec<_> = keys.iter().map(|e| e.clone().sort(true, false)).collect();
            let rank = dense_rank()
                .partition_by(vec![unit.clone()])
                .order_by(order)
                .build()?
                .alias(GROUP_RANK_COLUMN);
            builder = builder
                .window(vec![rank])?
                .filter(datafusion::prelude::col(GROUP_RANK_COLUMN).lt_eq(lit(g)))?;
        }
        let c = u64::from(bounds.rows_per_group);
        if c < k {
            // Each unit adds at most c rows to any one group (with no GROUP BY, to the one
            // group): its first c rows of each group are kept.
            let mut partition = vec![unit.clone()];
            partition.extend(keys.iter().cloned());
            let number = row_number()
                .partition_by(partition)
                .order_by(every_column(&builder))
                .build()?
                .alias(GROUP_ROW_COLUMN);
            builder = builder
                .window(vec![number])?
                .filter(datafusion::prelude::col(GROUP_ROW_COLUMN).lt_eq(lit(c)))?;
        }
        let units =
            checked.keys == plan::Keys::Selected && release::selects_by_units(&checked.stats);
        let (stats, copies) = stat_exprs(&checked.stats, &unit, units);
        builder = builder.aggregate(checked.aggregate.group_expr.clone(), stats)?;
        if !copies.is_empty() {
            let mut columns: Vec<Expr> = builder
                .schema()
                .iter()
                .map(|qf| Expr::Column(Column::from(qf)))
                .collect();
            for (from, to) in copies {
                columns.push(datafusion::prelude::col(from).alias(to));
            }
            builder = builder.project(columns)?;
        }
        Ok(builder.build()?)
    }

    /// Stage 3: the operators above the aggregate, over the noisy values only.
    pub(crate) async fn finish(
        &self,
        checked: &Checked,
        noised: &Noised,
    ) -> Result<Vec<RecordBatch>> {
        match finish_direct(checked, noised)? {
            Some(batch) => Ok(vec![batch]),
            None => self.finish_planned(checked, noised).await,
        }
    }

    /// [`Engine::finish`] through DataFusion: any operators above the aggregate, in a context
    /// holding nothing but the noisy batch. An empty result is a result.
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
        let schema = upper.schema().inner().clone();
        let mut batches = self
            .upper
            .execute_logical_plan(upper)
            .await?
            .collect()
            .await?;
        batches.retain(|b| b.num_rows() > 0);
        if batches.is_empty() {
            batches.push(RecordBatch::new_empty(schema));
        }
        Ok(batches)
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
        let plan = self.analyzed(sql).await?;
        let checked = plan::check(plan, &self.dataset.policy)?;
        let raw = self.aggregate(&checked, None).await?;
        let spending = Spending {
            mechanism: Mechanism::Laplace,
            budget: 1.0,
            delta: 1e-6,
        };
        let noised = release::noise(&checked, &raw, &self.dataset, spending, None)?;
        Ok((
            finish_direct(&checked, &noised)?,
            self.finish_planned(&checked, &noised).await?,
        ))
    }

    /// The in-memory repeats (tests).
    pub(crate) fn cache_for_tests(&self) -> std::sync::MutexGuard<'_, RepeatCache> {
        self.repeats()
    }

    /// The optimized physical plan of a query's aggregate: for tests of where rows are read.
    pub(crate) async fn lower_physical_for_tests(
        &self,
        sql: &str,
        filter: &ConsentFilter,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let checked = self.checked_for_tests(sql).await?;
        let set = UnitSet::from_filter(filter, &self.dataset.units).map(Arc::new);
        let lower = self.lower_plan(&checked, set.as_ref())?;
        Ok(self.catalog.state().create_physical_plan(&lower).await?)
    }

    /// The raw (pre-noise) statistics of a query: for tests of bounding and consent.
    pub(crate) async fn raw_for_tests(
        &self,
        sql: &str,
        filter: &ConsentFilter,
    ) -> Result<RecordBatch> {
        let checked = self.checked_for_tests(sql).await?;
        let set = UnitSet::from_filter(filter, &self.dataset.units).map(Arc::new);
        self.aggregate(&checked, set.as_ref()).await
    }

    /// A query planned and checked as prepare does it (tests).
    async fn checked_for_tests(&self, sql: &str) -> Result<Checked> {
        plan::check(self.analyzed(sql).await?, &self.dataset.policy)
    }

    /// The sensitivity each raw column's noise is calibrated to, for a query (tests).
    pub(crate) async fn calibration_for_tests(
        &self,
        sql: &str,
    ) -> Result<Vec<(String, release::Sensitivity)>> {
        let checked = self.checked_for_tests(sql).await?;
        Ok(release::sensitivities(
            &checked,
            release::summed_rows(&checked, &self.dataset),
        ))
    }
}
