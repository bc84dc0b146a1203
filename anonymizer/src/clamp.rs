//! Clamping summed values to the policy's bounds, as one vectorized scalar function.
//!
//! `__consentry_clamp(x)` maps each value to `clamp(x, lo, hi) - shift` (floats) or
//! `clamp(x, lo, hi)` (integers) with a single pass over the array, keeping nulls null. It
//! replaces `CASE WHEN x < lo THEN lo WHEN x > hi THEN hi ELSE x END`, which evaluates two
//! comparisons and a selection per row; the result is the same. A NaN is NULL (it would make
//! every sum it enters NaN); infinities clamp to the bounds.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{Result as DfResult, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, cast,
};

/// Name of the clamping scalar function.
pub const CLAMP: &str = "__consentry_clamp";

/// `arg` (cast to Float64) clamped to `[lo, hi]`, minus `shift`.
pub fn clamp_f64(arg: &Expr, [lo, hi]: [f64; 2], shift: f64) -> Expr {
    udf(Clamp::Float { lo, hi, shift }).call(vec![cast(arg.clone(), DataType::Float64)])
}

/// `arg` (cast to Int64) clamped to `[lo, hi]` (integer bounds).
pub fn clamp_i64(arg: &Expr, [lo, hi]: [f64; 2]) -> Expr {
    udf(Clamp::Int {
        lo: lo as i64,
        hi: hi as i64,
    })
    .call(vec![cast(arg.clone(), DataType::Int64)])
}

fn udf(c: Clamp) -> ScalarUDF {
    let input = match c {
        Clamp::Float { .. } => DataType::Float64,
        Clamp::Int { .. } => DataType::Int64,
    };
    ScalarUDF::new_from_impl(ClampUdf {
        clamp: c,
        signature: Signature::exact(vec![input], Volatility::Immutable),
    })
}

/// What to clamp to.
#[derive(Debug, Clone, Copy)]
enum Clamp {
    Float { lo: f64, hi: f64, shift: f64 },
    Int { lo: i64, hi: i64 },
}

impl Clamp {
    fn key(&self) -> (u8, u64, u64, u64) {
        match *self {
            Clamp::Float { lo, hi, shift } => (0, lo.to_bits(), hi.to_bits(), shift.to_bits()),
            Clamp::Int { lo, hi } => (1, lo as u64, hi as u64, 0),
        }
    }
}

#[derive(Debug)]
struct ClampUdf {
    clamp: Clamp,
    signature: Signature,
}

impl PartialEq for ClampUdf {
    fn eq(&self, other: &Self) -> bool {
        self.clamp.key() == other.clamp.key()
    }
}
impl Eq for ClampUdf {}
impl Hash for ClampUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.clamp.key().hash(state);
    }
}

impl ScalarUDFImpl for ClampUdf {
    fn name(&self) -> &str {
        CLAMP
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(match self.clamp {
            Clamp::Float { .. } => DataType::Float64,
            Clamp::Int { .. } => DataType::Int64,
        })
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let [arg] = args.args.as_slice() else {
            return exec_err!("{CLAMP} takes one argument");
        };
        let arr = arg.to_array(args.number_rows)?;
        let out: arrow::array::ArrayRef = match self.clamp {
            Clamp::Float { lo, hi, shift } => {
                let a = arr.as_primitive::<Float64Type>();
                // One vectorized pass (a NaN stays NaN through clamp), then NaNs become NULL.
                let out = a.unary::<_, Float64Type>(|v| v.clamp(lo, hi) - shift);
                let values = a.values();
                if values.iter().any(|v| v.is_nan()) {
                    let numbers = arrow::buffer::NullBuffer::new(
                        arrow::buffer::BooleanBuffer::collect_bool(values.len(), |i| {
                            !values[i].is_nan()
                        }),
                    );
                    let nulls = arrow::buffer::NullBuffer::union(out.nulls(), Some(&numbers));
                    Arc::new(arrow::array::Float64Array::new(out.values().clone(), nulls))
                } else {
                    Arc::new(out)
                }
            }
            Clamp::Int { lo, hi } => Arc::new(
                arr.as_primitive::<Int64Type>()
                    .unary::<_, Int64Type>(|v| v.clamp(lo, hi)),
            ),
        };
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array};
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn clamps_keep_nulls_and_shift() {
        let ctx = SessionContext::new();
        let b = arrow::array::RecordBatch::try_from_iter(vec![
            (
                "x",
                Arc::new(Float64Array::from(vec![
                    Some(1.0),
                    None,
                    Some(5.0),
                    Some(20.0),
                    Some(f64::NAN),
                    Some(f64::NEG_INFINITY),
                ])) as arrow::array::ArrayRef,
            ),
            (
                "n",
                Arc::new(Int64Array::from(vec![
                    Some(-3),
                    Some(7),
                    None,
                    Some(300),
                    Some(1),
                    Some(1),
                ])),
            ),
        ])
        .unwrap();
        let df = ctx.read_batch(b).unwrap();
        let out = df
            .select(vec![
                clamp_f64(&datafusion::prelude::col("x"), [4.0, 14.0], 9.0).alias("y"),
                clamp_i64(&datafusion::prelude::col("n"), [0.0, 200.0]).alias("m"),
            ])
            .unwrap()
            .collect()
            .await
            .unwrap();
        let y = out[0].column(0).as_primitive::<Float64Type>();
        assert_eq!(y.value(0), -5.0);
        assert!(y.is_null(1));
        assert_eq!((y.value(2), y.value(3)), (-4.0, 5.0));
        assert!(y.is_null(4), "NaN is NULL");
        assert_eq!(y.value(5), -5.0, "-inf clamps to the lower bound");
        let m = out[0].column(1).as_primitive::<Int64Type>();
        assert_eq!((m.value(0), m.value(1), m.value(3)), (0, 7, 200));
        assert!(m.is_null(2));
    }
}
