//! Sums of clamped values: integer noise on integer columns, float noise on the others.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array};

use super::draw::{Column, Draw, Noise, Preview};
use crate::error::Result;

/// `SUM(col)`.
pub(super) struct Sum {
    /// Whether the column (and so the noise) is integer.
    pub integer: bool,
}

impl Noise for Sum {
    fn release(&self, d: &mut Draw<'_>) -> Result<Column> {
        let m = d.groups();
        Ok(if self.integer {
            let n = d.ints("sum", "sum")?;
            Column {
                values: Arc::new(Int64Array::from(n.values)),
                accuracy: Float64Array::from(vec![n.accuracy; m]),
            }
        } else {
            let n = d.floats("sum", "sum")?;
            Column {
                values: Arc::new(Float64Array::from(n.values)),
                accuracy: Float64Array::from(vec![n.accuracy; m]),
            }
        })
    }

    fn preview(&self, p: &Preview<'_>) -> Result<Option<f64>> {
        if self.integer {
            p.ints("sum").map(Some)
        } else {
            p.floats("sum").map(Some)
        }
    }
}
