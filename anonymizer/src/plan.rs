//! Checking a query's logical plan against the policy, and what it asks for.
//!
//! A query is accepted when its plan is: operators that act on released values (projection,
//! HAVING filter, ORDER BY, LIMIT) above exactly one aggregate, whose input reads tables
//! through filters and inner joins on the privacy unit only (a join's rows are bounded again
//! per unit by the engine, so a patient's contribution stays within the policy). Every column the aggregate's input reads is checked against the
//! policy; every aggregate function is mapped to a statistic we know how to release. Anything
//! else is refused naming the construct and what to do instead. The plan is inspected, never
//! the SQL text.

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{Aggregate, Expr, ExprSchemable, LogicalPlan};
use datafusion::scalar::ScalarValue;

use crate::error::{Error, Result};
use crate::policy::{Bounds, ColumnClass, ColumnPolicy, Domain, Policy};

/// What one aggregate of the query computes.
#[derive(Debug, Clone, PartialEq)]
pub enum Statistic {
    /// `COUNT(*)`.
    CountRows,
    /// `COUNT(col)`: non-null values.
    CountValues(Expr),
    /// `COUNT(DISTINCT <privacy unit>)`: patients.
    CountUnits,
    /// `SUM(col)`, clamped to the bounds.
    Sum {
        arg: Expr,
        bounds: [f64; 2],
        integer: bool,
    },
    /// `AVG(col)`.
    Avg { arg: Expr, bounds: [f64; 2] },
    /// `VAR`/`STDDEV` (sample or population).
    Var {
        arg: Expr,
        bounds: [f64; 2],
        sample: bool,
        stddev: bool,
    },
    /// `MEDIAN` or a quantile.
    Quantile { arg: Expr, bounds: [f64; 2], q: f64 },
}

/// A statistic over a column whose bounds depend on a key (`bounds_by`) that is also a GROUP BY
/// key: each group holds one key, so its values take that key's bounds. The aggregated values
/// are normalized per row to [-1, 1] (centred on the key's midpoint and divided by its
/// half-range for AVG and VAR; divided by its largest magnitude for SUM), the noise is
/// calibrated to [-1, 1], and each released group's value and interval are scaled back with its
/// key's bounds (post-processing): a group's noise fits its own range, not the widest.
#[derive(Debug, Clone, PartialEq)]
pub struct Rescale {
    /// Which GROUP BY expression holds the key.
    pub key: usize,
    /// Bounds per key value (as text); a group whose key has none releases NULL.
    pub per_key: std::collections::BTreeMap<String, [f64; 2]>,
}

/// How the released group keys are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Keys {
    /// No GROUP BY: one row.
    None,
    /// Every GROUP BY column has a public domain: release the cross product.
    Public(Vec<Domain>),
    /// Keys come from the data: thresholded partition selection (needs delta > 0).
    Selected,
}

/// A checked query.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The whole plan as DataFusion built it.
    pub plan: LogicalPlan,
    /// The one aggregate.
    pub aggregate: Aggregate,
    /// One statistic per aggregate expression, in order.
    pub stats: Vec<Statistic>,
    /// Per statistic: its values' bounds per GROUP BY key, when they depend on that key (see
    /// [`Rescale`]).
    pub rescales: Vec<Option<Rescale>>,
    /// How keys are chosen.
    pub keys: Keys,
    /// Whether the aggregate's input joins tables (its rows are then bounded per unit again).
    pub joined: bool,
    /// The tables the aggregate's input scans, in order (a self-join lists one twice).
    pub tables: Vec<String>,
    /// What one unit may contribute to this query (from the policy of the tables it reads).
    pub bounds: Bounds,
    /// Its function calls and text concatenations (see [`MAX_CALLS`]).
    pub calls: usize,
}

fn refuse(construct: impl Into<String>, advice: impl Into<String>) -> Error {
    Error::Refused {
        construct: construct.into(),
        advice: advice.into(),
    }
}

const ROWS_ADVICE: &str =
    "use aggregates (COUNT, SUM, AVG, ...), or an extract within a study approved for extracts";

/// Where each column of a plan node's output comes from: the table and column a scan read,
/// by position. Columns are resolved through this, never through their qualifiers, so an
/// alias can never make one table's column pass for another's.
type Sources = Vec<(String, String)>;

/// What the walk over the aggregate's input found.
struct Input {
    /// Tables scanned, in order (a self-join lists a table twice).
    tables: Vec<String>,
    /// Number of joins.
    joins: usize,
    /// WHERE conjuncts `column = literal` or `column IN (literals)`: the values each such
    /// column can take in the aggregated rows (as text).
    narrowed: Vec<(Column, Vec<String>)>,
}

/// The policy of the column `c` of a node whose output is described by `schema` and
/// `sources`.
fn resolve<'a>(
    policy: &'a Policy,
    schema: &DFSchema,
    sources: &[(String, String)],
    c: &Column,
) -> Result<(&'a str, &'a ColumnPolicy)> {
    let i = schema
        .index_of_column(c)
        .map_err(|_| Error::InvalidQuery(format!("unknown column {}", c.name)))?;
    let (t, col) = sources
        .get(i)
        .ok_or_else(|| Error::Engine("plan schema mismatch".into()))?;
    if col == crate::dataset::UNIT_COLUMN {
        return Err(refuse(
            "the internal unit column",
            "query the dataset's own columns",
        ));
    }
    let (tname, tp) = policy
        .tables
        .get_key_value(t.as_str())
        .ok_or_else(|| Error::InvalidQuery(format!("unknown table {t}")))?;
    tp.columns
        .get(col.as_str())
        .map(|cp| (tname.as_str(), cp))
        .ok_or_else(|| Error::InvalidQuery(format!("unknown column {}", c.name)))
}

/// Most function calls (and text concatenations) one query may make on a row, over all its
/// expressions. What a row costs to evaluate is what the rows that reach an expression make a
/// query cost (a CASE evaluates its branch only on the rows it selects, a filter runs the
/// expressions above it only on the rows it keeps): a bounded number of cheap, bounded calls
/// bounds the worst case the release schedule ([`crate::schedule`]) waits for.
pub const MAX_CALLS: usize = 32;

/// The function calls and text concatenations of `plan`'s expressions.
fn calls(plan: &LogicalPlan) -> Result<usize> {
    use datafusion::common::tree_node::TreeNodeRecursion::Continue;
    let mut n = 0usize;
    plan.apply(|node| {
        node.apply_expressions(|e| {
            e.apply(|x| {
                if matches!(
                    x,
                    Expr::ScalarFunction(_)
                        | Expr::BinaryExpr(datafusion::logical_expr::BinaryExpr {
                            op: datafusion::logical_expr::Operator::StringConcat,
                            ..
                        })
                ) {
                    n += 1;
                }
                Ok(Continue)
            })
        })
    })?;
    Ok(n)
}

/// Makes every expression of `plan` total ([`crate::total`]), keeping output names; returns
/// it with its number of function calls and text concatenations (at most [`MAX_CALLS`]), what
/// the release schedule prices.
pub fn make_total(plan: LogicalPlan) -> Result<(LogicalPlan, usize)> {
    let n = calls(&plan)?;
    if n > MAX_CALLS {
        return Err(Error::Refused {
            construct: format!("{n} function calls"),
            advice: format!(
                "a query makes at most {MAX_CALLS} function calls and text concatenations in \
                 all (what a row costs must not tell one patient's rows from another's)"
            ),
        });
    }
    let mut failure: Option<Error> = None;
    let out = plan
        .transform_up(|node| {
            let schema = match &node {
                LogicalPlan::Join(_) => node.schema().clone(),
                other => match other.inputs().first() {
                    Some(i) => i.schema().clone(),
                    None => return Ok(Transformed::no(node)),
                },
            };
            let keep_names = matches!(node, LogicalPlan::Projection(_) | LogicalPlan::Aggregate(_));
            let preserver = NamePreserver::new_for_projection();
            let rewritten = node.map_expressions(|e| {
                let saved = keep_names.then(|| preserver.save(&e));
                match crate::total::total(e, &schema) {
                    Ok(t) => Ok(Transformed::yes(match saved {
                        Some(s) => s.restore(t),
                        None => t,
                    })),
                    Err(err) => {
                        failure.get_or_insert(err);
                        Ok(Transformed::no(Expr::Literal(ScalarValue::Null, None)))
                    }
                }
            })?;
            if failure.is_some() {
                return Ok(Transformed::new(
                    rewritten.data,
                    false,
                    datafusion::common::tree_node::TreeNodeRecursion::Stop,
                ));
            }
            let data = rewritten.data.recompute_schema()?;
            Ok(Transformed::yes(data))
        })
        .map_err(Error::from)?;
    match failure {
        Some(e) => Err(e),
        None => Ok((out.data, n)),
    }
}

/// Checks `plan` (analyzed by DataFusion) against `policy`; returns it made total.
pub fn check(plan: LogicalPlan, policy: &Policy) -> Result<Checked> {
    let (plan, calls) = make_total(plan)?;
    let aggregate = find_aggregate(&plan)?.clone();
    let mut input = Input {
        tables: Vec::new(),
        joins: 0,
        narrowed: Vec::new(),
    };
    let sources = walk_input(&aggregate.input, policy, &mut input)?;
    let schema = aggregate.input.schema().as_ref();
    let resolve = |c: &Column| resolve(policy, schema, &sources, c);
    let group_columns: Vec<Option<Column>> = aggregate
        .group_expr
        .iter()
        .map(|g| match strip_alias(g) {
            Expr::Column(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    let bounds_of = |c: &Column, cp: &ColumnPolicy, func: &str| {
        value_bounds(c, cp, func, &resolve, &input.narrowed, &group_columns)
    };
    let mut stats = Vec::with_capacity(aggregate.aggr_expr.len());
    let mut rescales = Vec::with_capacity(aggregate.aggr_expr.len());
    for e in &aggregate.aggr_expr {
        let (s, r) = statistic(e, schema, &resolve, &bounds_of)?;
        stats.push(s);
        rescales.push(r);
    }
    let mut domains = Vec::new();
    let mut all_public = true;
    for g in &aggregate.group_expr {
        for c in g.column_refs() {
            let (_, cp) = resolve(c)?;
            readable(cp, &c.name, "GROUP BY")?;
        }
        match strip_alias(g) {
            Expr::Column(c) => match &resolve(c)?.1.domain {
                Some(d) => domains.push(d.clone()),
                None => all_public = false,
            },
            e => match literal_domain(e)
                .or_else(|| date_part_domain(e, |c| resolve(c).ok().and_then(|(_, cp)| cp.years)))
            {
                Some(d) => domains.push(d),
                None => all_public = false,
            },
        }
    }
    let keys = if aggregate.group_expr.is_empty() {
        Keys::None
    } else if all_public {
        Keys::Public(domains)
    } else {
        Keys::Selected
    };
    // Keys read only from columns with one value per unit (of tables with one row per unit,
    // a patient's demographics, or declared `per_unit`) are the same on every row of that
    // unit, joined or not (joins are on the unit): each unit is in one group. The engine
    // enforces it on the data like any groups bound (a wrong declaration loses rows, not
    // privacy); it is declared only where one group makes some calibration smaller, since
    // enforcing it costs a ranking of every row.
    let mut bounds = policy.query_bounds(&input.tables);
    if !aggregate.group_expr.is_empty() {
        let mut one_per_unit = true;
        for g in &aggregate.group_expr {
            for c in g.column_refs() {
                let (table, cp) = resolve(c)?;
                one_per_unit &= cp.per_unit || policy.table_bounds(table).rows == 1;
            }
        }
        let one = Bounds {
            groups: 1,
            ..bounds
        };
        let smaller = keys == Keys::Selected
            || one.rows_l1(true) < bounds.rows_l1(true)
            || stats
                .iter()
                .any(|s| matches!(s, Statistic::CountUnits | Statistic::Quantile { .. }));
        if one_per_unit && smaller {
            bounds = one;
        }
    }
    Ok(Checked {
        joined: input.joins > 0,
        calls,
        bounds,
        tables: input.tables,
        plan,
        aggregate,
        stats,
        rescales,
        keys,
    })
}

/// Walks down from the root through operators that only see released values, to the one
/// aggregate.
fn find_aggregate(plan: &LogicalPlan) -> Result<&Aggregate> {
    match plan {
        LogicalPlan::Aggregate(a) => Ok(a),
        LogicalPlan::Projection(p) => find_aggregate(&p.input),
        LogicalPlan::Filter(f) => find_aggregate(&f.input),
        LogicalPlan::Sort(s) => find_aggregate(&s.input),
        LogicalPlan::Limit(l) => {
            for e in [&l.skip, &l.fetch].into_iter().flatten() {
                if !matches!(e.as_ref(), Expr::Literal(..)) {
                    return Err(refuse("LIMIT or OFFSET by an expression", "write a number"));
                }
            }
            find_aggregate(&l.input)
        }
        LogicalPlan::SubqueryAlias(s) => find_aggregate(&s.input),
        LogicalPlan::TableScan(_) => Err(refuse(
            "a SELECT that returns rows (such as SELECT *)",
            format!("it would release rows; {ROWS_ADVICE}"),
        )),
        LogicalPlan::Distinct(d) if matches!(d.input().as_ref(), LogicalPlan::Union(_)) => {
            Err(refuse("UNION", "run each query separately"))
        }
        LogicalPlan::Distinct(_) => Err(refuse(
            "SELECT DISTINCT",
            format!("it would release rows; {ROWS_ADVICE}"),
        )),
        LogicalPlan::Window(_) => Err(refuse("window functions", "use GROUP BY aggregates")),
        LogicalPlan::Union(_) => Err(refuse("UNION", "run each query separately")),
        LogicalPlan::Join(_) => Err(refuse(
            "a join above the aggregate",
            "join the tables inside the aggregated query",
        )),
        LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Err(refuse(
            "a query that reads no table",
            "aggregate over the dataset's tables",
        )),
        other => Err(refuse(
            format!("the {} operator", other.display()),
            "use a single SELECT with aggregates over one dataset's tables",
        )),
    }
}

/// The aggregate's input: table scans under filters (WHERE) and inner joins on the privacy
/// unit. Checks every expression's columns against the policy; returns the sources of the
/// node's output columns.
fn walk_input(plan: &LogicalPlan, policy: &Policy, input: &mut Input) -> Result<Sources> {
    match plan {
        LogicalPlan::TableScan(s) => {
            let name = s.table_name.table().to_string();
            if !policy.tables.contains_key(&name) {
                // A table function (generate_series, range) plans as a scan of its own.
                return Err(refuse(
                    format!("reading {}", s.table_name),
                    "aggregate over the dataset's tables only",
                ));
            }
            if !s.filters.is_empty() || s.fetch.is_some() {
                return Err(Error::Engine(
                    "a table scan with filters before checking".into(),
                ));
            }
            input.tables.push(name.clone());
            Ok(s.projected_schema
                .fields()
                .iter()
                .map(|f| (name.clone(), f.name().clone()))
                .collect())
        }
        LogicalPlan::SubqueryAlias(s) => walk_input(&s.input, policy, input),
        LogicalPlan::Filter(f) => {
            let sources = walk_input(&f.input, policy, input)?;
            let schema = f.input.schema();
            for c in f.predicate.column_refs() {
                readable(resolve(policy, schema, &sources, c)?.1, &c.name, "WHERE")?;
            }
            for part in datafusion::logical_expr::utils::split_conjunction(&f.predicate) {
                if let Some(n) = narrowing(part) {
                    input.narrowed.push(n);
                }
            }
            Ok(sources)
        }
        LogicalPlan::Join(j) => {
            if j.join_type != datafusion::logical_expr::JoinType::Inner {
                return Err(refuse(
                    format!("{} joins", j.join_type),
                    "use an inner JOIN ... ON a.<privacy unit> = b.<privacy unit>",
                ));
            }
            let mut sources = walk_input(&j.left, policy, input)?;
            sources.extend(walk_input(&j.right, policy, input)?);
            input.joins += 1;
            check_join(j, policy, &sources)?;
            Ok(sources)
        }
        LogicalPlan::Aggregate(_) => {
            Err(refuse("nested aggregates", "aggregate once over the rows"))
        }
        LogicalPlan::Projection(_) => Err(refuse(
            "subqueries in FROM",
            "aggregate directly over the tables",
        )),
        other => Err(refuse(
            format!("the {} operator", other.display()),
            "aggregate directly over the tables",
        )),
    }
}

/// A join's condition must hold `<unit> = <unit>` between its two sides (so every joined row
/// belongs to one patient); its other parts may read readable columns only.
fn check_join(
    j: &datafusion::logical_expr::Join,
    policy: &Policy,
    sources: &[(String, String)],
) -> Result<()> {
    let schema = j.schema.as_ref();
    let n_left = j.left.schema().fields().len();
    let class = |e: &Expr| -> Result<Option<(usize, ColumnClass)>> {
        match exact_column(e, schema) {
            Some(Expr::Column(c)) => {
                let i = schema
                    .index_of_column(c)
                    .map_err(|_| Error::InvalidQuery(format!("unknown column {}", c.name)))?;
                Ok(Some((i, resolve(policy, schema, sources, c)?.1.class)))
            }
            _ => Ok(None),
        }
    };
    let mut conjuncts: Vec<Expr> = j.on.iter().map(|(l, r)| l.clone().eq(r.clone())).collect();
    if let Some(f) = &j.filter {
        conjuncts.extend(
            datafusion::logical_expr::utils::split_conjunction(f)
                .into_iter()
                .cloned(),
        );
    }
    let mut on_unit = false;
    for part in &conjuncts {
        if let Expr::BinaryExpr(b) = part
            && b.op == datafusion::logical_expr::Operator::Eq
            && let (Some((li, ColumnClass::PrivacyUnit)), Some((ri, ColumnClass::PrivacyUnit))) =
                (class(&b.left)?, class(&b.right)?)
            && ((li < n_left) != (ri < n_left))
        {
            on_unit = true;
            continue;
        }
        for c in part.column_refs() {
            readable(
                resolve(policy, schema, sources, c)?.1,
                &c.name,
                "a join condition",
            )?;
        }
    }
    if on_unit {
        Ok(())
    } else if conjuncts.is_empty() {
        Err(refuse(
            "a join without a condition (a cross join)",
            "join a dataset's tables with JOIN ... ON a.<privacy unit> = b.<privacy unit>",
        ))
    } else {
        Err(refuse(
            "a join that is not on the privacy unit",
            "join a dataset's tables with JOIN ... ON a.<privacy unit> = b.<privacy unit>",
        ))
    }
}

/// The column under aliases and exact casts only (between integer types, or between text
/// types: equal results mean equal values). Any other cast could make different patients' ids
/// equal (ids cast to booleans, to floats, text ids to numbers), so a join on it is not a
/// join on the unit.
fn exact_column<'e>(e: &'e Expr, schema: &DFSchema) -> Option<&'e Expr> {
    let exact = |inner: &Expr, to: &arrow::datatypes::DataType| {
        let text = |t: &arrow::datatypes::DataType| {
            matches!(
                t,
                arrow::datatypes::DataType::Utf8
                    | arrow::datatypes::DataType::LargeUtf8
                    | arrow::datatypes::DataType::Utf8View
            )
        };
        inner
            .get_type(schema)
            .is_ok_and(|from| (from.is_integer() && to.is_integer()) || (text(&from) && text(to)))
    };
    match e {
        Expr::Alias(a) => exact_column(&a.expr, schema),
        Expr::Cast(c) if exact(&c.expr, c.field.data_type()) => exact_column(&c.expr, schema),
        Expr::TryCast(c) if exact(&c.expr, c.field.data_type()) => exact_column(&c.expr, schema),
        Expr::Column(_) => Some(e),
        _ => None,
    }
}

/// Whether an expression holds a subquery (refused in aggregates and extracts alike).
pub(crate) fn has_subquery(e: &Expr) -> Result<bool> {
    e.exists(|e| {
        Ok(matches!(
            e,
            Expr::ScalarSubquery(_) | Expr::InSubquery(_) | Expr::Exists(_)
        ))
    })
    .map_err(Error::from)
}

fn check_no_subquery(e: &Expr) -> Result<()> {
    if has_subquery(e)? {
        return Err(refuse(
            "subqueries",
            "write one aggregate query per question",
        ));
    }
    Ok(())
}

/// The values a CASE expression can take when every branch (each THEN, and the ELSE) is a
/// literal: the key's public domain, known from the SQL alone, so an age band or any other
/// recoding needs no partition selection. A row whose CASE gives NULL (no ELSE, or a NULL
/// branch) is in no released group. Text and integer literals; anything else is `None`.
fn literal_domain(e: &Expr) -> Option<Domain> {
    let Expr::Case(case) = e else {
        return None;
    };
    let branches = case
        .when_then_expr
        .iter()
        .map(|(_, then)| then.as_ref())
        .chain(case.else_expr.as_deref());
    let (mut text, mut ints) = (Vec::<String>::new(), Vec::<i64>::new());
    for b in branches {
        let mut b = strip_alias(b);
        while let Expr::Cast(c) = b {
            b = c.expr.as_ref();
        }
        let Expr::Literal(v, _) = b else {
            return None;
        };
        match v {
            v if v.is_null() => {}
            ScalarValue::Utf8(Some(x))
            | ScalarValue::LargeUtf8(Some(x))
            | ScalarValue::Utf8View(Some(x)) => {
                if !text.contains(x) {
                    text.push(x.clone());
                }
            }
            ScalarValue::Int8(Some(_))
            | ScalarValue::Int16(Some(_))
            | ScalarValue::Int32(Some(_))
            | ScalarValue::Int64(Some(_)) => {
                let x: i64 = v.to_string().parse().ok()?;
                if !ints.contains(&x) {
                    ints.push(x);
                }
            }
            _ => return None,
        }
    }
    match (text.is_empty(), ints.is_empty()) {
        (false, true) => Some(Domain::Text(text)),
        (true, false) => Some(Domain::Int(ints)),
        _ => None,
    }
}

/// The values a date part of a column can take, known without the data: a month is 1 to 12,
/// a quarter 1 to 4, a day of the week 0 to 6 (ISO: 1 to 7), a day of the month 1 to 31, of
/// the year 1 to 366, an hour 0 to 23; a year lies in the column's public `years` where its
/// policy declares them. `date_part(part, column)` (and so `EXTRACT(part FROM column)`) only.
fn date_part_domain(e: &Expr, years_of: impl Fn(&Column) -> Option<[i32; 2]>) -> Option<Domain> {
    let Expr::ScalarFunction(f) = e else {
        return None;
    };
    if f.name() != "date_part" || f.args.len() != 2 {
        return None;
    }
    let Expr::Literal(part, _) = strip_alias(&f.args[0]) else {
        return None;
    };
    let part = match part {
        ScalarValue::Utf8(Some(p))
        | ScalarValue::LargeUtf8(Some(p))
        | ScalarValue::Utf8View(Some(p)) => p.to_ascii_lowercase(),
        _ => return None,
    };
    // The column itself, or as `total` guards a date (NULL outside the dates it can take).
    let c = match strip_alias(&f.args[1]) {
        Expr::Column(c) => c,
        Expr::Case(case) => match (&case.expr, case.when_then_expr.as_slice(), &case.else_expr) {
            (None, [(_, then)], None) => match strip_alias(then) {
                Expr::Column(c) => c,
                _ => return None,
            },
            _ => return None,
        },
        _ => return None,
    };
    let (lo, hi) = match part.as_str() {
        "month" => (1, 12),
        "quarter" => (1, 4),
        "dow" => (0, 6),
        "isodow" => (1, 7),
        "day" => (1, 31),
        "doy" => (1, 366),
        "hour" => (0, 23),
        "year" => {
            let [lo, hi] = years_of(c)?;
            (i64::from(lo), i64::from(hi))
        }
        _ => return None,
    };
    Some(Domain::Int((lo..=hi).collect()))
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_alias(&a.expr),
        Expr::Cast(c) => strip_alias(&c.expr),
        Expr::TryCast(c) => strip_alias(&c.expr),
        other => other,
    }
}

/// A column usable in WHERE, GROUP BY and aggregates: not a direct identifier, not the unit.
fn readable(cp: &ColumnPolicy, name: &str, place: &str) -> Result<()> {
    match cp.class {
        ColumnClass::DirectIdentifier => Err(refuse(
            format!("reading column {name}"),
            "it is a direct identifier and can never be read",
        )),
        ColumnClass::PrivacyUnit => Err(refuse(
            format!("the privacy unit {name} in {place}"),
            "use COUNT(DISTINCT) of it to count patients",
        )),
        _ => Ok(()),
    }
}

/// The value a WHERE conjunct gives a column: `column = literal`, `literal = column` or
/// `column IN (literals)`, as text.
fn narrowing(e: &Expr) -> Option<(Column, Vec<String>)> {
    let text = |e: &Expr| match strip_alias(e) {
        Expr::Literal(v, _) if !v.is_null() => match v.try_as_str() {
            Some(Some(s)) => Some(s.to_owned()),
            _ => v.data_type().is_integer().then(|| v.to_string()),
        },
        _ => None,
    };
    let column = |e: &Expr| match strip_alias(e) {
        Expr::Column(c) => Some(c.clone()),
        _ => None,
    };
    match e {
        Expr::BinaryExpr(b) if b.op == datafusion::logical_expr::Operator::Eq => {
            match (
                column(&b.left),
                text(&b.right),
                column(&b.right),
                text(&b.left),
            ) {
                (Some(c), Some(v), _, _) | (_, _, Some(c), Some(v)) => Some((c, vec![v])),
                _ => None,
            }
        }
        Expr::InList(l) if !l.negated => {
            let values: Option<Vec<String>> = l.list.iter().map(text).collect();
            Some((column(&l.expr)?, values?))
        }
        _ => None,
    }
}

/// The bounds of column `c` aggregated by `func`, and the expression to aggregate: the column
/// itself, or for bounds that depend on a key column (`bounds_by`), the value clamped to its
/// row's key's bounds (NULL for a key without bounds) with the bounds' hull over the keys the
/// WHERE lets through. A key the WHERE names without bounds is refused, naming it. When the key
/// is also a GROUP BY column (`group_columns`), a SUM, AVG or VAR aggregates the values
/// normalized to [-1, 1] by their key's bounds, and the per-key bounds come back for the
/// release to scale each group (see [`Rescale`]).
fn value_bounds<'a>(
    c: &Column,
    cp: &ColumnPolicy,
    func: &str,
    resolve: &dyn Fn(&Column) -> Result<(&'a str, &'a ColumnPolicy)>,
    narrowed: &[(Column, Vec<String>)],
    group_columns: &[Option<Column>],
) -> Result<KeyedBounds> {
    if let Some(b) = cp.bounds {
        return Ok((None, b, None));
    }
    let (Some(key), Some(per_key)) = (&cp.bounds_by, &cp.key_bounds) else {
        return Err(refuse(
            format!("{func}({})", c.name),
            "the column has no bounds in the policy; ask the custodian to declare them",
        ));
    };
    // The key of the same row: the key column of the same table scan (same qualifier).
    let key_col = Column::new(c.relation.clone(), key.as_str());
    let (table, _) = resolve(c)?;
    match resolve(&key_col) {
        Ok((t, kp)) if t == table && !matches!(kp.class, ColumnClass::DirectIdentifier) => {}
        _ => {
            return Err(Error::Engine(format!(
                "the bounds key {key} is not in the row"
            )));
        }
    }
    let mut reachable: Option<Vec<String>> = None;
    for (col, values) in narrowed {
        if col.name == key_col.name && col.relation == key_col.relation {
            reachable = Some(match reachable {
                None => values.clone(),
                Some(r) => r.into_iter().filter(|v| values.contains(v)).collect(),
            });
        }
    }
    let reachable: Vec<(String, [f64; 2])> = match reachable {
        None => per_key.iter().map(|(k, b)| (k.clone(), *b)).collect(),
        Some(values) => {
            let mut out = Vec::new();
            for v in values {
                let b = per_key.get(&v).ok_or_else(|| {
                    refuse(
                        format!("{func}({}) where {key} = {v:?}", c.name),
                        format!(
                            "the policy gives no bounds of {} for {key} {v:?}; ask the \
                             custodian to declare them",
                            c.name
                        ),
                    )
                })?;
                out.push((v, *b));
            }
            out
        }
    };
    if reachable.is_empty() {
        return Err(refuse(
            format!("{func}({}) under contradictory conditions on {key}", c.name),
            format!("name the {key} values to aggregate once"),
        ));
    }
    let hull = reachable
        .iter()
        .fold([f64::INFINITY, f64::NEG_INFINITY], |h, (_, b)| {
            [h[0].min(b[0]), h[1].max(b[1])]
        });
    let grouped = group_columns.iter().position(|g| {
        g.as_ref()
            .is_some_and(|g| g.name == key_col.name && g.relation == key_col.relation)
    });
    let normalize = match func {
        "SUM" => Some(false),
        "AVG" | "VAR/STDDEV" => Some(true),
        _ => None,
    }
    .filter(|_| grouped.is_some());
    let key_text = Expr::TryCast(datafusion::logical_expr::TryCast::new(
        Box::new(Expr::Column(key_col)),
        arrow::datatypes::DataType::Utf8,
    ));
    let arms = reachable
        .iter()
        .map(|(v, b)| {
            let value = Expr::Column(c.clone());
            let then = match normalize {
                None => crate::clamp::clamp_f64(&value, *b, 0.0),
                // Centred on the key's midpoint, over its half-range.
                Some(true) => {
                    let h = ((b[1] - b[0]) / 2.0).max(f64::MIN_POSITIVE);
                    crate::clamp::clamp_f64(&value, *b, (b[0] + b[1]) / 2.0)
                        / datafusion::prelude::lit(h)
                }
                // Over its largest magnitude.
                Some(false) => {
                    let big = b[0].abs().max(b[1].abs()).max(f64::MIN_POSITIVE);
                    crate::clamp::clamp_f64(&value, *b, 0.0) / datafusion::prelude::lit(big)
                }
            };
            (
                Box::new(datafusion::prelude::lit(v.clone())),
                Box::new(then),
            )
        })
        .collect();
    let case = Expr::Case(datafusion::logical_expr::Case::new(
        Some(Box::new(key_text)),
        arms,
        None,
    ));
    Ok(match (normalize, grouped) {
        (Some(_), Some(key)) => (
            Some(case),
            [-1.0, 1.0],
            Some(Rescale {
                key,
                per_key: reachable.into_iter().collect(),
            }),
        ),
        _ => (Some(case), hull, None),
    })
}

/// What [`value_bounds`] gives: the expression to aggregate (`None`: the column), its bounds,
/// and, for values normalized per GROUP BY key, the bounds per key.
type KeyedBounds = (Option<Expr>, [f64; 2], Option<Rescale>);

/// What a bounded aggregate reads: the expression, its bounds, its bounds per GROUP BY key.
type BoundsOf<'b> = dyn Fn(&Column, &ColumnPolicy, &str) -> Result<KeyedBounds> + 'b;

/// The bounds of an aggregated column, and the expression to aggregate (the argument, or the
/// value clamped by its key's bounds).
fn bounded<'a>(
    arg: &Expr,
    resolve: &dyn Fn(&Column) -> Result<(&'a str, &'a ColumnPolicy)>,
    bounds_of: &BoundsOf<'_>,
    func: &str,
) -> Result<(Expr, [f64; 2], bool, Option<Rescale>)> {
    let Expr::Column(c) = strip_alias(arg) else {
        return Err(refuse(
            format!("{func} of an expression"),
            "aggregate a column; its bounds come from the policy",
        ));
    };
    let (_, cp) = resolve(c)?;
    readable(cp, &c.name, func)?;
    let (by_key, bounds, rescale) = bounds_of(c, cp, func)?;
    let keyed = by_key.is_some();
    Ok((
        by_key.unwrap_or_else(|| arg.clone()),
        bounds,
        keyed,
        rescale,
    ))
}

fn statistic<'a>(
    e: &Expr,
    schema: &DFSchema,
    resolve: &dyn Fn(&Column) -> Result<(&'a str, &'a ColumnPolicy)>,
    bounds_of: &BoundsOf<'_>,
) -> Result<(Statistic, Option<Rescale>)> {
    let Expr::AggregateFunction(f) = strip_alias(e) else {
        return Err(refuse(
            "this aggregate expression",
            "use COUNT, SUM, AVG, VAR, STDDEV, MEDIAN or a quantile",
        ));
    };
    let p = &f.params;
    let name = f.func.name().to_ascii_lowercase();
    if p.filter.is_some() {
        return Err(refuse(
            "aggregate FILTER clauses",
            "move the condition to WHERE",
        ));
    }
    for a in &p.args {
        check_no_subquery(a)?;
    }
    for c in p.args.iter().flat_map(|a| a.column_refs()) {
        let (_, cp) = resolve(c)?;
        if cp.class == ColumnClass::DirectIdentifier {
            readable(cp, &c.name, &name)?;
        }
    }
    let arg0 = p.args.first();
    let is_unit = |a: &Expr| matches!(strip_alias(a), Expr::Column(c) if resolve(c).is_ok_and(|(_, cp)| cp.class == ColumnClass::PrivacyUnit));
    let literal = |a: &Expr| matches!(strip_alias(a), Expr::Literal(..));
    let null_literal = |a: &Expr| matches!(strip_alias(a), Expr::Literal(v, _) if v.is_null());
    // The integer path only for integer columns with integral bounds: a float column's sum is
    // never truncated.
    let integer_arg = |a: &Expr| -> bool {
        let Expr::Column(c) = strip_alias(a) else {
            return false;
        };
        let integer_type = Expr::Column(c.clone())
            .get_type(schema)
            .is_ok_and(|t| t.is_integer());
        integer_type
            && resolve(c).is_ok_and(|(_, cp)| {
                cp.bounds
                    .is_some_and(|[lo, hi]| lo.fract() == 0.0 && hi.fract() == 0.0)
            })
    };
    let mut rescale = None;
    let stat = match name.as_str() {
        "count" => match (p.distinct, arg0) {
            (false, None) => Ok(Statistic::CountRows),
            // COUNT(NULL) counts no row: the values of a NULL literal, 0 in every group.
            (false, Some(a)) if literal(a) && !null_literal(a) => Ok(Statistic::CountRows),
            (false, Some(a)) if literal(a) => Ok(Statistic::CountValues(a.clone())),
            (true, Some(a)) if is_unit(a) => Ok(Statistic::CountUnits),
            (true, _) => Err(refuse(
                "COUNT(DISTINCT) of a column other than the privacy unit",
                "count patients with COUNT(DISTINCT <privacy unit>), or GROUP BY the column",
            )),
            (false, Some(a)) => {
                if is_unit(a) {
                    return Ok((Statistic::CountRows, None));
                }
                let Expr::Column(c) = strip_alias(a) else {
                    return Err(refuse("COUNT of an expression", "count a column or rows"));
                };
                readable(resolve(c)?.1, &c.name, "COUNT")?;
                Ok(Statistic::CountValues(a.clone()))
            }
        },
        _ if p.distinct => Err(refuse(
            format!("{}(DISTINCT ...)", name.to_uppercase()),
            "aggregate all values",
        )),
        "sum" => {
            let a = arg0.ok_or_else(|| Error::InvalidQuery("SUM needs an argument".into()))?;
            let (arg, bounds, keyed, r) = bounded(a, resolve, bounds_of, "SUM")?;
            rescale = r;
            Ok(Statistic::Sum {
                arg,
                bounds,
                integer: integer_arg(a) && !keyed,
            })
        }
        "avg" | "mean" => {
            let (arg, bounds, _, r) = bounded(
                arg0.ok_or_else(|| Error::InvalidQuery("AVG needs an argument".into()))?,
                resolve,
                bounds_of,
                "AVG",
            )?;
            rescale = r;
            Ok(Statistic::Avg { arg, bounds })
        }
        "var" | "var_samp" | "var_sample" | "var_pop" | "var_population" | "stddev"
        | "stddev_samp" | "stddev_pop" => {
            let (arg, bounds, _, r) = bounded(
                arg0.ok_or_else(|| Error::InvalidQuery("VAR needs an argument".into()))?,
                resolve,
                bounds_of,
                "VAR/STDDEV",
            )?;
            rescale = r;
            Ok(Statistic::Var {
                arg,
                bounds,
                sample: !name.ends_with("pop") && !name.ends_with("population"),
                stddev: name.starts_with("stddev"),
            })
        }
        "median" => {
            let (arg, bounds, _, _) = bounded(
                arg0.ok_or_else(|| Error::InvalidQuery("MEDIAN needs an argument".into()))?,
                resolve,
                bounds_of,
                "MEDIAN",
            )?;
            Ok(Statistic::Quantile {
                arg,
                bounds,
                q: 0.5,
            })
        }
        "percentile_cont" | "approx_percentile_cont" | "quantile_cont" => {
            // DataFusion 55 writes WITHIN GROUP (ORDER BY col) as the ordering, the fraction
            // as the argument.
            let col = p
                .order_by
                .first()
                .map(|s| s.expr.clone())
                .or_else(|| p.args.first().cloned());
            let q = p.args.iter().find_map(|a| match strip_alias(a) {
                Expr::Literal(ScalarValue::Float64(Some(q)), _) => Some(*q),
                _ => None,
            });
            let (Some(col), Some(q)) = (col, q) else {
                return Err(refuse(
                    "this percentile form",
                    "write PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY col)",
                ));
            };
            if !(0.0..=1.0).contains(&q) {
                return Err(Error::InvalidQuery(
                    "a percentile must be between 0 and 1".into(),
                ));
            }
            let (arg, bounds, _, _) = bounded(&col, resolve, bounds_of, "PERCENTILE_CONT")?;
            Ok(Statistic::Quantile { arg, bounds, q })
        }
        other => Err(refuse(
            format!("the aggregate {}", other.to_uppercase()),
            "use COUNT, SUM, AVG, VAR, STDDEV, MEDIAN or PERCENTILE_CONT",
        )),
    };
    stat.map(|s| (s, rescale))
}
