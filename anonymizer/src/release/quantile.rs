//! Medians and quantiles: one private quantile per group over 1,001 candidates spanning the
//! column's bounds (`crate::quantile`), a pure part of the budget shared among the groups a
//! patient may reach.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array};
use arrow::datatypes::Float64Type;
use serde_json::json;

use super::col;
use super::draw::{Column, Draw, Noise};
use crate::error::Result;
use crate::quantile;

/// `MEDIAN(col)` or a quantile `q`.
pub(super) struct Quantile {
    /// The column's bounds (the candidates' range).
    pub bounds: [f64; 2],
    /// Which quantile.
    pub q: f64,
}

impl Noise for Quantile {
    fn release(&self, d: &mut Draw<'_>) -> Result<Column> {
        let i = d.index;
        let (bounds, q) = (self.bounds, self.q);
        let list = col(d.raw, &format!("__s{i}_values"))?.as_list::<i32>();
        let candidates: Vec<f64> = (0..=1000)
            .map(|j| bounds[0] + (bounds[1] - bounds[0]) * f64::from(j) / 1000.0)
            .collect();
        let g = d.bounds.groups;
        let m = d.groups();
        let reach = f64::from(g).min(m.max(1) as f64);
        let per_group = d.spending.pure(d.share) / reach;
        let mut out = Vec::with_capacity(m);
        let mut acc = Vec::with_capacity(m);
        let mut eps_q: f64 = 0.0;
        for r in d.rows {
            let vals: Vec<f64> = match r {
                Some(i) if list.is_valid(*i) => {
                    let v = list.value(*i);
                    v.as_primitive::<Float64Type>().iter().flatten().collect()
                }
                _ => Vec::new(),
            };
            let c = quantile::cell(
                vals,
                &candidates,
                bounds,
                q,
                d.bounds.rows_per_group,
                per_group,
            )?;
            eps_q = eps_q.max(c.epsilon);
            out.push(c.value);
            acc.push(c.half_width);
        }
        let total = eps_q * reach;
        d.tally.pure(total);
        d.tally.mech.push(json!({"statistic": format!(
                "quantile {i} (q = {q}, 1001 candidates; 95% interval from a noisy \
                 count, two bracketing quantiles and noisy counts outside them, budget \
                 split {:?})",
                quantile::SPLIT
            ), "mechanism": "private_quantile", "scale": 0.0, "epsilon": total}));
        Ok(Column {
            values: Arc::new(Float64Array::from(out)),
            accuracy: Float64Array::from(acc),
        })
    }
}
