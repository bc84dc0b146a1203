//! Counts: `COUNT(*)`, `COUNT(col)` and `COUNT(DISTINCT <privacy unit>)`, released at least 0.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array};

use super::draw::{Column, Draw, Noise, Preview};
use crate::error::Result;

/// A count of rows, values or patients (its sensitivity says which).
pub(super) struct Count;

impl Noise for Count {
    fn release(&self, d: &mut Draw<'_>) -> Result<Column> {
        let n = d.ints("n", "count")?;
        d.gauge(&n.values);
        Ok(Column {
            values: Arc::new(Int64Array::from_iter_values(
                n.values.iter().map(|v| (*v).max(0)),
            )),
            accuracy: Float64Array::from(vec![n.accuracy; d.groups()]),
        })
    }

    fn preview(&self, p: &Preview<'_>) -> Result<Option<f64>> {
        p.ints("n").map(Some)
    }
}
