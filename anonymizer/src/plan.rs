//! Checking a query's logical plan against the policy, and what it asks for.
//!
//! A query is accepted when its plan is: operators that act on released values (projection,
//! HAVING filter, ORDER BY, LIMIT) above exactly one aggregate, whose input reads tables
//! through filters and inner joins on the privacy unit only (a join's rows are bounded again
//! per unit by the engine, so a patient's contribution stays within the policy). Every column the aggregate's input reads is checked against the
//! policy; every aggregate function is mapped to a statistic we know how to release. Anything
//! else is refused naming the construct and what to do instead. The plan is inspected, never
//! the SQL text.

use std::collections::HashMap;

use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};
use datafusion::scalar::ScalarValue;

use crate::error::{Error, Result};
use crate::policy::{ColumnClass, ColumnPolicy, Domain, Policy};

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
    /// How keys are chosen.
    pub keys: Keys,
    /// Whether the aggregate's input joins tables (its rows are then bounded per unit again).
    pub joined: bool,
}

fn refuse(construct: impl Into<String>, advice: impl Into<String>) -> Error {
    Error::Refused {
        construct: construct.into(),
        advice: advice.into(),
    }
}

const ROWS_ADVICE: &str =
    "use aggregates (COUNT, SUM, AVG, ...), or an extract within a study approved for extracts";

/// Resolves column qualifiers (table names or aliases) to tables.
struct Tables {
    by_alias: HashMap<String, String>,
    /// WHERE predicates below the aggregate.
    filters: Vec<Expr>,
    /// The ON condition of every join.
    joins: Vec<JoinCondition>,
}

/// A join's ON condition, split into its conjuncts.
struct JoinCondition {
    /// `l = r` with `l` a column of one side and `r` of the other.
    across: Vec<(datafusion::common::Column, datafusion::common::Column)>,
    /// The other conjuncts.
    rest: Vec<Expr>,
}

impl Tables {
    fn resolve<'a>(
        &'a self,
        policy: &'a Policy,
        col: &datafusion::common::Column,
    ) -> Result<(&'a str, &'a ColumnPolicy)> {
        let candidates: Vec<&str> = match &col.relation {
            Some(r) => self
                .by_alias
                .get(r.table())
                .map(|t| vec![t.as_str()])
                .unwrap_or_default(),
            None => self.by_alias.values().map(String::as_str).collect(),
        };
        for t in candidates {
            if let Some(cp) = policy.column(t, &col.name) {
                return Ok((t, cp));
            }
        }
        if col.name == crate::dataset::UNIT_COLUMN {
            return Err(refuse(
                "the internal unit column",
                "query the dataset's own columns",
            ));
        }
        Err(Error::InvalidQuery(format!("unknown column {}", col.name)))
    }
}

/// Checks `plan` against `policy`.
pub fn check(plan: &LogicalPlan, policy: &Policy) -> Result<Checked> {
    let aggregate = find_aggregate(plan)?;
    let tables = check_input(&aggregate.input)?;
    for f in &tables.filters {
        for c in f.column_refs() {
            readable(tables.resolve(policy, c)?.1, &c.name, "WHERE")?;
        }
    }
    for on in &tables.joins {
        check_join_condition(on, policy, &tables)?;
    }
    let mut stats = Vec::with_capacity(aggregate.aggr_expr.len());
    for e in &aggregate.aggr_expr {
        stats.push(statistic(e, policy, &tables)?);
    }
    let mut domains = Vec::new();
    let mut all_public = true;
    for g in &aggregate.group_expr {
        check_no_subquery(g)?;
        for c in g.column_refs() {
            let (_, cp) = tables.resolve(policy, c)?;
            readable(cp, &c.name, "GROUP BY")?;
        }
        match strip_alias(g) {
            Expr::Column(c) => match &tables.resolve(policy, c)?.1.domain {
                Some(d) => domains.push(d.clone()),
                None => all_public = false,
            },
            _ => all_public = false,
        }
    }
    let keys = if aggregate.group_expr.is_empty() {
        Keys::None
    } else if all_public {
        Keys::Public(domains)
    } else {
        Keys::Selected
    };
    Ok(Checked {
        plan: plan.clone(),
        aggregate: aggregate.clone(),
        stats,
        keys,
        joined: !tables.joins.is_empty(),
    })
}

/// A join condition: it must hold `<unit> = <unit>` between the two sides (so every joined row
/// belongs to one patient); its other conjuncts may read readable columns only.
fn check_join_condition(on: &JoinCondition, policy: &Policy, tables: &Tables) -> Result<()> {
    let is_unit = |c: &datafusion::common::Column| {
        tables
            .resolve(policy, c)
            .is_ok_and(|(_, cp)| cp.class == ColumnClass::PrivacyUnit)
    };
    let mut on_unit = false;
    for (l, r) in &on.across {
        if is_unit(l) && is_unit(r) {
            on_unit = true;
            continue;
        }
        for c in [l, r] {
            readable(tables.resolve(policy, c)?.1, &c.name, "a join condition")?;
        }
    }
    for part in &on.rest {
        check_no_subquery(part)?;
        for c in part.column_refs() {
            readable(tables.resolve(policy, c)?.1, &c.name, "a join condition")?;
        }
    }
    if on_unit {
        Ok(())
    } else {
        Err(refuse(
            "a join that is not on the privacy unit",
            "join a dataset's tables with JOIN ... ON a.<privacy unit> = b.<privacy unit>",
        ))
    }
}

/// Splits a join's condition into equalities across its two sides and the rest.
fn join_condition(j: &datafusion::logical_expr::Join) -> JoinCondition {
    let mut conjuncts: Vec<Expr> = j.on.iter().map(|(l, r)| l.clone().eq(r.clone())).collect();
    if let Some(f) = &j.filter {
        conjuncts.extend(
            datafusion::logical_expr::utils::split_conjunction(f)
                .into_iter()
                .cloned(),
        );
    }
    let (ls, rs) = (j.left.schema(), j.right.schema());
    let mut out = JoinCondition {
        across: Vec::new(),
        rest: Vec::new(),
    };
    for part in conjuncts {
        if let Expr::BinaryExpr(b) = &part
            && b.op == datafusion::logical_expr::Operator::Eq
            && let (Expr::Column(x), Expr::Column(y)) =
                (strip_alias(&b.left), strip_alias(&b.right))
        {
            if ls.has_column(x) && rs.has_column(y) {
                out.across.push((x.clone(), y.clone()));
                continue;
            }
            if rs.has_column(x) && ls.has_column(y) {
                out.across.push((y.clone(), x.clone()));
                continue;
            }
        }
        out.rest.push(part);
    }
    out
}

/// Walks down from the root through operators that only see released values, to the one
/// aggregate.
fn find_aggregate(plan: &LogicalPlan) -> Result<&Aggregate> {
    match plan {
        LogicalPlan::Aggregate(a) => Ok(a),
        LogicalPlan::Projection(p) => {
            for e in &p.expr {
                check_no_subquery(e)?;
            }
            find_aggregate(&p.input)
        }
        LogicalPlan::Filter(f) => {
            check_no_subquery(&f.predicate)?;
            find_aggregate(&f.input)
        }
        LogicalPlan::Sort(s) => find_aggregate(&s.input),
        LogicalPlan::Limit(l) => find_aggregate(&l.input),
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
        other => Err(refuse(
            format!("the {} operator", other.display()),
            "use a single SELECT with aggregates over one dataset's tables",
        )),
    }
}

/// The aggregate's input: table scans under filters (WHERE). Returns the tables it reads.
fn check_input(plan: &LogicalPlan) -> Result<Tables> {
    let mut tables = Tables {
        by_alias: HashMap::new(),
        filters: Vec::new(),
        joins: Vec::new(),
    };
    walk_input(plan, None, &mut tables)?;
    Ok(tables)
}

fn walk_input(plan: &LogicalPlan, alias: Option<&str>, tables: &mut Tables) -> Result<()> {
    match plan {
        LogicalPlan::TableScan(s) => {
            let name = s.table_name.table().to_string();
            tables
                .by_alias
                .insert(alias.unwrap_or(&name).to_string(), name.clone());
            tables.by_alias.insert(name.clone(), name);
            Ok(())
        }
        LogicalPlan::SubqueryAlias(s) => walk_input(&s.input, Some(s.alias.table()), tables),
        LogicalPlan::Filter(f) => {
            check_no_subquery(&f.predicate)?;
            tables.filters.push(f.predicate.clone());
            walk_input(&f.input, alias, tables)
        }
        LogicalPlan::Join(j) => {
            if j.join_type != datafusion::logical_expr::JoinType::Inner {
                return Err(refuse(
                    format!("{} joins", j.join_type),
                    "use an inner JOIN ... ON a.<privacy unit> = b.<privacy unit>",
                ));
            }
            let on = join_condition(j);
            if on.across.is_empty() && on.rest.is_empty() {
                return Err(refuse(
                    "a join without a condition (a cross join)",
                    "join a dataset's tables with JOIN ... ON a.<privacy unit> = b.<privacy unit>",
                ));
            }
            tables.joins.push(on);
            walk_input(&j.left, None, tables)?;
            walk_input(&j.right, None, tables)
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

/// The bounds of an aggregated column.
fn bounded(arg: &Expr, policy: &Policy, tables: &Tables, func: &str) -> Result<(Expr, [f64; 2])> {
    let Expr::Column(c) = strip_alias(arg) else {
        return Err(refuse(
            format!("{func} of an expression"),
            "aggregate a column; its bounds come from the policy",
        ));
    };
    let (_, cp) = tables.resolve(policy, c)?;
    readable(cp, &c.name, func)?;
    let bounds = cp.bounds.ok_or_else(|| {
        refuse(
            format!("{func}({})", c.name),
            "the column has no bounds in the policy; ask the custodian to declare them",
        )
    })?;
    Ok((arg.clone(), bounds))
}

fn statistic(e: &Expr, policy: &Policy, tables: &Tables) -> Result<Statistic> {
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
        let (_, cp) = tables.resolve(policy, c)?;
        if cp.class == ColumnClass::DirectIdentifier {
            readable(cp, &c.name, &name)?;
        }
    }
    let arg0 = p.args.first();
    let is_unit = |a: &Expr| matches!(strip_alias(a), Expr::Column(c) if tables.resolve(policy, c).is_ok_and(|(_, cp)| cp.class == ColumnClass::PrivacyUnit));
    let literal = |a: &Expr| matches!(strip_alias(a), Expr::Literal(..));
    let integer_arg = |a: &Expr| -> bool {
        let Expr::Column(c) = strip_alias(a) else {
            return false;
        };
        tables.resolve(policy, c).is_ok_and(|(_, cp)| {
            cp.bounds
                .is_some_and(|[lo, hi]| lo.fract() == 0.0 && hi.fract() == 0.0)
        })
    };
    match name.as_str() {
        "count" => match (p.distinct, arg0) {
            (false, None) => Ok(Statistic::CountRows),
            (false, Some(a)) if literal(a) => Ok(Statistic::CountRows),
            (true, Some(a)) if is_unit(a) => Ok(Statistic::CountUnits),
            (true, _) => Err(refuse(
                "COUNT(DISTINCT) of a column other than the privacy unit",
                "count patients with COUNT(DISTINCT <privacy unit>), or GROUP BY the column",
            )),
            (false, Some(a)) => {
                if is_unit(a) {
                    return Ok(Statistic::CountRows);
                }
                let Expr::Column(c) = strip_alias(a) else {
                    return Err(refuse("COUNT of an expression", "count a column or rows"));
                };
                readable(tables.resolve(policy, c)?.1, &c.name, "COUNT")?;
                Ok(Statistic::CountValues(a.clone()))
            }
        },
        _ if p.distinct => Err(refuse(
            format!("{}(DISTINCT ...)", name.to_uppercase()),
            "aggregate all values",
        )),
        "sum" => {
            let a = arg0.ok_or_else(|| Error::InvalidQuery("SUM needs an argument".into()))?;
            let integer = integer_arg(a);
            let (arg, bounds) = bounded(a, policy, tables, "SUM")?;
            Ok(Statistic::Sum {
                arg,
                bounds,
                integer,
            })
        }
        "avg" | "mean" => {
            let (arg, bounds) = bounded(
                arg0.ok_or_else(|| Error::InvalidQuery("AVG needs an argument".into()))?,
                policy,
                tables,
                "AVG",
            )?;
            Ok(Statistic::Avg { arg, bounds })
        }
        "var" | "var_samp" | "var_sample" | "var_pop" | "var_population" | "stddev"
        | "stddev_samp" | "stddev_pop" => {
            let (arg, bounds) = bounded(
                arg0.ok_or_else(|| Error::InvalidQuery("VAR needs an argument".into()))?,
                policy,
                tables,
                "VAR/STDDEV",
            )?;
            Ok(Statistic::Var {
                arg,
                bounds,
                sample: !name.ends_with("pop") && !name.ends_with("population"),
                stddev: name.starts_with("stddev"),
            })
        }
        "median" => {
            let (arg, bounds) = bounded(
                arg0.ok_or_else(|| Error::InvalidQuery("MEDIAN needs an argument".into()))?,
                policy,
                tables,
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
            let (arg, bounds) = bounded(&col, policy, tables, "PERCENTILE_CONT")?;
            Ok(Statistic::Quantile { arg, bounds, q })
        }
        other => Err(refuse(
            format!("the aggregate {}", other.to_uppercase()),
            "use COUNT, SUM, AVG, VAR, STDDEV, MEDIAN or PERCENTILE_CONT",
        )),
    }
}
