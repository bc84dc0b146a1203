//! Total expressions: a researcher's expression can never fail on data.
//!
//! Whether an expression fails, and how long it takes, must not depend on the rows it sees:
//! a failure on one patient's row would be an oracle that no noise covers. So every
//! expression a query holds (WHERE, join conditions, GROUP BY keys, HAVING, ORDER BY and the
//! projections above the aggregate) is checked against an allow-list and rewritten, once,
//! on the analyzed plan (after DataFusion's type coercion has added its casts):
//!
//! - `CAST` becomes `TRY_CAST` (a value that does not convert is NULL);
//! - integer division and remainder by zero are NULL, and by -1 are computed without the
//!   overflow of `MIN / -1`; float division by zero is NULL;
//! - arithmetic is on integers, floating point and dates only (decimal and timestamp
//!   arithmetic can overflow with an error: cast to DOUBLE first);
//! - scalar functions come from [`ALLOWED`], each cheap and bounded per value, and each is
//!   wrapped in [`Total`]: a row on which the function fails gives NULL (found by halving
//!   the batch, so a failing row costs about the function's own work again, not a pass per
//!   row), and a text result longer than [`MAX_TEXT`] bytes is NULL, so no call can grow
//!   memory without bound;
//! - `LIKE` patterns are literals checked when the query is planned;
//! - subqueries, window functions, regular expressions, placeholders, grouping sets and
//!   anything not listed are refused, naming the construct;
//! - an expression holds at most [`MAX_NODES`] nodes.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, new_null_array};
use arrow::datatypes::{DataType, FieldRef};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result as DfResult};
use datafusion::logical_expr::expr::{Case, ScalarFunction, TryCast};
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, ExprSchemable, Operator, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, lit,
};
use datafusion::scalar::ScalarValue;

use crate::error::{Error, Result};

/// Scalar functions a query may call (DataFusion's names; aliases resolve to these).
pub const ALLOWED: &[&str] = &[
    // conditionals (total as they are)
    "coalesce",
    "nullif",
    "nvl",
    "nvl2",
    "greatest",
    "least",
    // text
    "lower",
    "upper",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "left",
    "right",
    "concat",
    "concat_ws",
    "starts_with",
    "ends_with",
    "strpos",
    "split_part",
    "initcap",
    "reverse",
    // numbers
    "abs",
    "ceil",
    "floor",
    "round",
    "trunc",
    "signum",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log2",
    "log10",
    "power",
    "isnan",
    "iszero",
    // dates and times
    "date_part",
    "date_trunc",
    "date_bin",
    "make_date",
    "to_date",
    "to_timestamp",
    "to_char",
    "current_date",
    "now",
];

/// Functions that are total as DataFusion implements them, and that DataFusion rewrites
/// before running (so they are not wrapped).
const UNWRAPPED: &[&str] = &["coalesce", "nullif", "nvl", "nvl2", "current_date", "now"];

/// Largest text value a function may return; a longer one is NULL.
pub const MAX_TEXT: usize = 1024;

/// Largest number of nodes in one expression.
pub const MAX_NODES: usize = 4096;

fn refuse(construct: impl Into<String>, advice: impl Into<String>) -> Error {
    Error::Refused {
        construct: construct.into(),
        advice: advice.into(),
    }
}

/// Checks `e` (evaluated over `schema`) against the allow-list and returns its total form.
pub fn total(e: Expr, schema: &DFSchema) -> Result<Expr> {
    let mut nodes = 0usize;
    e.apply(|_| {
        nodes += 1;
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })?;
    if nodes > MAX_NODES {
        return Err(refuse(
            format!("an expression of {nodes} terms"),
            format!(
                "keep each expression under {MAX_NODES} terms (an IN list counts as one per value)"
            ),
        ));
    }
    let mut failure: Option<Error> = None;
    let out = e
        .transform_up(|e| match rewrite(e, schema) {
            Ok(t) => Ok(t),
            Err(err) => {
                failure.get_or_insert(err);
                Ok(Transformed::no(Expr::Literal(ScalarValue::Null, None)))
            }
        })?
        .data;
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn is_integer(t: &DataType) -> bool {
    t.is_integer()
}

fn arithmetic_operand(t: &DataType) -> bool {
    t.is_integer() || t.is_floating() || matches!(t, DataType::Date32 | DataType::Null)
}

fn rewrite(e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    Ok(match e {
        Expr::Column(_)
        | Expr::Literal(..)
        | Expr::Alias(_)
        | Expr::Not(_)
        | Expr::IsNotNull(_)
        | Expr::IsNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::IsNotUnknown(_)
        | Expr::Negative(_)
        | Expr::Between(_)
        | Expr::Case(_)
        | Expr::InList(_)
        | Expr::AggregateFunction(_) => Transformed::no(e),
        Expr::TryCast(c) => {
            castable(&c.expr, c.field.data_type(), schema)?;
            Transformed::no(Expr::TryCast(c))
        }
        Expr::Cast(c) => {
            castable(&c.expr, c.field.data_type(), schema)?;
            Transformed::yes(Expr::TryCast(TryCast {
                expr: c.expr,
                field: Arc::new(c.field.as_ref().clone().with_nullable(true)),
            }))
        }
        Expr::BinaryExpr(b) => binary(b, schema)?,
        Expr::Like(l) => {
            let Expr::Literal(ScalarValue::Utf8(Some(p)), _) = l.pattern.as_ref() else {
                return Err(refuse(
                    "LIKE with a pattern that is not a literal",
                    "write the pattern as a string literal",
                ));
            };
            if !valid_like(p, l.escape_char, l.case_insensitive) {
                return Err(refuse(
                    "this LIKE pattern",
                    "it is not a valid pattern; check its escapes",
                ));
            }
            Transformed::no(Expr::Like(l))
        }
        Expr::ScalarFunction(f) => function(f)?,
        Expr::SimilarTo(_) => return Err(refuse("SIMILAR TO", "use LIKE")),
        Expr::ScalarSubquery(_)
        | Expr::InSubquery(_)
        | Expr::Exists(_)
        | Expr::SetComparison(_) => {
            return Err(refuse(
                "subqueries",
                "write one aggregate query per question",
            ));
        }
        Expr::WindowFunction(_) => {
            return Err(refuse("window functions", "use GROUP BY aggregates"));
        }
        Expr::GroupingSet(_) => {
            return Err(refuse(
                "GROUPING SETS, ROLLUP and CUBE",
                "run one GROUP BY per grouping",
            ));
        }
        Expr::Placeholder(_) => {
            return Err(refuse(
                "parameters ($1, ?)",
                "write the values into the query",
            ));
        }
        other => {
            let name = other.variant_name().to_string();
            return Err(refuse(
                format!("the expression {name}"),
                "use columns, literals, operators and the documented functions",
            ));
        }
    })
}

/// A cast between types Arrow cannot convert at all fails on every row, only once there is a
/// row: refused when planned instead.
fn castable(e: &Expr, to: &DataType, schema: &DFSchema) -> Result<()> {
    let from = e.get_type(schema)?;
    if arrow::compute::can_cast_types(&from, to) {
        Ok(())
    } else {
        Err(refuse(
            format!("CAST from {from} to {to}"),
            "cast to a type the value converts to",
        ))
    }
}

fn binary(b: BinaryExpr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    use Operator::*;
    let BinaryExpr { left, op, right } = b;
    match op {
        Eq | NotEq | Lt | LtEq | Gt | GtEq | And | Or | IsDistinctFrom | IsNotDistinctFrom
        | StringConcat | BitwiseAnd | BitwiseOr | BitwiseXor => Ok(Transformed::no(
            Expr::BinaryExpr(BinaryExpr::new(left, op, right)),
        )),
        LikeMatch | ILikeMatch | NotLikeMatch | NotILikeMatch => {
            Err(refuse("this LIKE form", "write column LIKE 'pattern'"))
        }
        Plus | Minus | Multiply | Divide | Modulo => {
            let lt = left.get_type(schema)?;
            let rt = right.get_type(schema)?;
            let interval_step = matches!(op, Plus | Minus)
                && ((lt == DataType::Date32 && matches!(rt, DataType::Interval(_)))
                    || (rt == DataType::Date32 && matches!(lt, DataType::Interval(_))));
            if !(interval_step || (arithmetic_operand(&lt) && arithmetic_operand(&rt))) {
                return Err(refuse(
                    format!("arithmetic on {lt} and {rt}"),
                    "arithmetic is on integers, floating point and dates; CAST decimals to DOUBLE",
                ));
            }
            let expr = |l: Box<Expr>, o: Operator, r: Box<Expr>| {
                Expr::BinaryExpr(BinaryExpr::new(l, o, r))
            };
            Ok(match op {
                Divide | Modulo if is_integer(&lt) && is_integer(&rt) => {
                    // x / 0 is NULL; x / -1 is -x (wrapping), never MIN / -1's overflow error.
                    // CASE evaluates each branch only on the rows that reach it.
                    let minus_one = Expr::TryCast(TryCast::new(Box::new(lit(-1i64)), rt.clone()));
                    let at_minus_one = if op == Divide {
                        Expr::Negative(left.clone())
                    } else {
                        Expr::TryCast(TryCast::new(Box::new(lit(0i64)), lt.clone()))
                    };
                    let zero_is_null = datafusion::functions::expr_fn::nullif(
                        *right.clone(),
                        Expr::TryCast(TryCast::new(Box::new(lit(0i64)), rt.clone())),
                    );
                    Transformed::yes(Expr::Case(Case::new(
                        None,
                        vec![(
                            Box::new((*right).clone().eq(minus_one)),
                            Box::new(at_minus_one),
                        )],
                        Some(Box::new(expr(left, op, Box::new(zero_is_null)))),
                    )))
                }
                Divide | Modulo => {
                    let zero_is_null = datafusion::functions::expr_fn::nullif(*right, lit(0.0f64));
                    Transformed::yes(expr(left, op, Box::new(zero_is_null)))
                }
                _ => Transformed::no(expr(left, op, right)),
            })
        }
        other => Err(refuse(
            format!("the operator {other}"),
            "use comparisons, AND/OR/NOT, arithmetic, || and LIKE",
        )),
    }
}

fn valid_like(pattern: &str, escape: Option<char>, case_insensitive: bool) -> bool {
    let probe = arrow::array::StringArray::from(vec!["probe"]);
    let pat = match escape {
        // Arrow's LIKE kernels know only backslash escapes: any other escape is refused.
        Some(c) if c != '\\' => return false,
        _ => pattern,
    };
    let scalar = arrow::array::StringArray::new_scalar(pat);
    let r = if case_insensitive {
        arrow::compute::kernels::comparison::ilike(&probe, &scalar)
    } else {
        arrow::compute::kernels::comparison::like(&probe, &scalar)
    };
    r.is_ok()
}

fn function(f: ScalarFunction) -> Result<Transformed<Expr>> {
    let name = f.func.name().to_ascii_lowercase();
    let inner: &dyn std::any::Any = f.func.inner().as_ref();
    if inner.is::<Total>() {
        return Ok(Transformed::no(Expr::ScalarFunction(f)));
    }
    if name.starts_with("__consentry") {
        return Err(refuse(
            format!("the internal function {name}"),
            "use the documented functions",
        ));
    }
    let allowed = ALLOWED.contains(&name.as_str())
        || f.func
            .aliases()
            .iter()
            .any(|a| ALLOWED.contains(&a.to_ascii_lowercase().as_str()));
    if !allowed {
        return Err(refuse(
            format!("the function {}", name.to_uppercase()),
            "use comparisons, arithmetic, CASE and the functions the README lists",
        ));
    }
    if UNWRAPPED.contains(&name.as_str()) {
        return Ok(Transformed::no(Expr::ScalarFunction(f)));
    }
    let wrapped = ScalarUDF::new_from_impl(Total { inner: f.func });
    Ok(Transformed::yes(Expr::ScalarFunction(
        ScalarFunction::new_udf(Arc::new(wrapped), f.args),
    )))
}

/// A scalar function made total: rows on which it fails are NULL, and so are text values
/// longer than [`MAX_TEXT`]. It keeps the wrapped function's name, so plans and result
/// columns read as written.
#[derive(Debug)]
pub struct Total {
    inner: Arc<ScalarUDF>,
}

impl PartialEq for Total {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
}
impl Eq for Total {}
impl Hash for Total {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
    }
}

/// Text values longer than [`MAX_TEXT`] become NULL.
fn cap_text(a: ArrayRef) -> DfResult<ArrayRef> {
    let long = match a.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let lengths = arrow::compute::kernels::length::length(&a)?;
            let lengths = arrow::compute::cast(&lengths, &DataType::UInt64)?;
            let max = arrow::array::UInt64Array::new_scalar(MAX_TEXT as u64);
            arrow::compute::kernels::cmp::gt(&lengths, &max)?
        }
        _ => return Ok(a),
    };
    if long.true_count() == 0 {
        return Ok(a);
    }
    Ok(arrow::compute::nullif(&a, &long)?)
}

impl ScalarUDFImpl for Total {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        self.inner.schema_name(args)
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        self.inner.return_type(arg_types)
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        let f = self.inner.return_field_from_args(args)?;
        Ok(Arc::new(f.as_ref().clone().with_nullable(true)))
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let n = args.number_rows;
        let out = self.invoke_range(&args, 0, n)?;
        Ok(ColumnarValue::Array(cap_text(out)?))
    }
}

impl Total {
    /// The function over rows `[offset, offset + len)`. When it fails, each half is tried
    /// alone, down to single rows, which are NULL when they fail: the rows that do not fail
    /// keep their values, and a failing row costs about twice the function's own work on the
    /// batch (no per-row overhead beyond the rows that fail).
    fn invoke_range(
        &self,
        args: &ScalarFunctionArgs,
        offset: usize,
        len: usize,
    ) -> DfResult<ArrayRef> {
        let return_type = args.return_field.data_type();
        let part = ScalarFunctionArgs {
            args: args
                .args
                .iter()
                .map(|a| match a {
                    ColumnarValue::Array(x) if offset != 0 || len != x.len() => {
                        ColumnarValue::Array(x.slice(offset, len))
                    }
                    other => other.clone(),
                })
                .collect(),
            arg_fields: args.arg_fields.clone(),
            number_rows: len,
            return_field: args.return_field.clone(),
            config_options: args.config_options.clone(),
        };
        let whole = self
            .inner
            .invoke_with_args(part)
            .and_then(|v| v.into_array(len))
            .ok()
            .filter(|a| a.data_type() == return_type && a.len() == len);
        if let Some(a) = whole {
            return Ok(a);
        }
        if len <= 1 {
            return Ok(new_null_array(return_type, len));
        }
        let half = len / 2;
        let left = self.invoke_range(args, offset, half)?;
        let right = self.invoke_range(args, offset + half, len - half)?;
        Ok(arrow::compute::concat(&[left.as_ref(), right.as_ref()])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// Runs `sql` (over a table `t` of texts and integers, one row failing for each function)
    /// with every expression made total.
    async fn run(sql: &str) -> Result<Vec<arrow::array::RecordBatch>> {
        let ctx = SessionContext::new();
        let b = arrow::array::RecordBatch::try_from_iter(vec![
            (
                "s",
                Arc::new(arrow::array::StringArray::from(vec![
                    "12",
                    "x",
                    "2020-01-01",
                ])) as ArrayRef,
            ),
            (
                "n",
                Arc::new(arrow::array::Int64Array::from(vec![0, -1, i64::MIN])),
            ),
        ])
        .unwrap();
        ctx.register_batch("t", b).unwrap();
        let plan = ctx.state().create_logical_plan(sql).await?;
        let plan = ctx.state().analyzer().execute_and_check(
            plan,
            ctx.state().config_options(),
            |_, _| {},
        )?;
        let plan = crate::plan::make_total(plan)?;
        Ok(ctx.execute_logical_plan(plan).await?.collect().await?)
    }

    #[tokio::test]
    async fn failing_rows_are_null_not_errors() {
        for sql in [
            "SELECT CAST(s AS INT) FROM t",
            "SELECT s::DATE FROM t",
            "SELECT 10 / n FROM t",
            "SELECT 7 % n FROM t",
            "SELECT n % n FROM t",
            "SELECT n / n FROM t",
            "SELECT to_date(s) FROM t",
            "SELECT abs(n) FROM t",
            "SELECT power(n, -1) FROM t",
            "SELECT substr(s, 1, n) FROM t",
            "SELECT 1.0 / CAST(n AS DOUBLE) FROM t",
        ] {
            let out = run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            let rows: usize = out.iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, 3, "{sql}");
        }
    }

    #[tokio::test]
    async fn unlisted_constructs_are_refused_by_name() {
        for (sql, needle) in [
            ("SELECT repeat(s, 100000) FROM t", "REPEAT"),
            ("SELECT regexp_like(s, 'a+') FROM t", "REGEXP_LIKE"),
            ("SELECT s FROM t WHERE s ~ 'a'", "operator"),
            ("SELECT s FROM t WHERE s LIKE s", "LIKE"),
            ("SELECT s FROM t WHERE s SIMILAR TO 'a'", "SIMILAR TO"),
            ("SELECT n << 70 FROM t", "operator"),
            ("SELECT s FROM t WHERE n IN (SELECT n FROM t)", "subqueries"),
        ] {
            match run(sql).await {
                Err(Error::Refused { construct, .. }) => {
                    assert!(construct.contains(needle), "{sql}: {construct}")
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn only_the_failing_rows_are_null() {
        let ctx = SessionContext::new();
        let dates: Vec<String> = (0..1000)
            .map(|i| {
                if i % 97 == 13 {
                    "not a date".to_string()
                } else {
                    format!("2020-01-{:02}", 1 + i % 28)
                }
            })
            .collect();
        let b = arrow::array::RecordBatch::try_from_iter(vec![(
            "s",
            Arc::new(arrow::array::StringArray::from(dates.clone())) as ArrayRef,
        )])
        .unwrap();
        ctx.register_batch("t", b).unwrap();
        let plan = ctx
            .state()
            .create_logical_plan("SELECT to_date(s) AS d FROM t")
            .await
            .unwrap();
        let plan = ctx
            .state()
            .analyzer()
            .execute_and_check(plan, ctx.state().config_options(), |_, _| {})
            .unwrap();
        let plan = crate::plan::make_total(plan).unwrap();
        let out = ctx
            .execute_logical_plan(plan)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let d = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
        let d = d.column(0);
        for (i, s) in dates.iter().enumerate() {
            assert_eq!(d.is_null(i), s == "not a date", "row {i}");
        }
    }

    #[tokio::test]
    async fn long_text_is_null() {
        let out = run("SELECT concat(s, s) AS c FROM t").await.unwrap();
        assert_eq!(out[0].column(0).null_count(), 0);
        let cap = cap_text(Arc::new(arrow::array::StringArray::from(vec![
            "a".repeat(MAX_TEXT + 1),
            "b".into(),
        ])))
        .unwrap();
        assert!(cap.is_null(0) && cap.is_valid(1));
    }
}
