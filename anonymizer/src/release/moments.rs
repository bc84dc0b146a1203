//! Means, variances and standard deviations from a noisy count and noisy centred sums (of
//! values, and of squares for the spread), each value centred on its bounds' midpoint so the
//! sums' sensitivities are half the range's.

use std::sync::Arc;

use arrow::array::Float64Array;

use super::draw::{Column, Draw, Noise};
use super::var_accuracy;
use crate::error::Result;

/// `AVG(col)`, or with `spread`, `VAR`/`STDDEV`.
pub(super) struct Moments {
    /// The column's clamping bounds.
    pub bounds: [f64; 2],
    /// For a variance or standard deviation: which.
    pub spread: Option<Spread>,
}

/// Which measure of spread.
#[derive(Clone, Copy)]
pub(super) struct Spread {
    /// Sample (n - 1) rather than population.
    pub sample: bool,
    /// The standard deviation rather than the variance.
    pub stddev: bool,
}

impl Noise for Moments {
    fn release(&self, d: &mut Draw<'_>) -> Result<Column> {
        let [lo, hi] = self.bounds;
        let (mid, h) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
        let kind = d.mechanism();
        let cnt = d.ints("n", "count")?;
        d.gauge(&cnt.values);
        let sum = d.floats("sum", "centred sum")?;
        // Union bound: each noisy part within its (1 - 0.05/parts) interval gives 95% for the
        // statistic built from them.
        let alpha = if self.spread.is_some() {
            0.05 / 3.0
        } else {
            0.025
        };
        let acc_at = |scale: f64, discrete: bool| kind.accuracy_at(scale, alpha, discrete);
        let (a_cnt, a_sum) = (acc_at(cnt.scale, true)?, acc_at(sum.scale, false)?);
        let sum2 = match self.spread {
            Some(_) => Some(d.floats("sum2", "centred sum of squares")?),
            None => None,
        };
        let m = d.groups();
        let mut out = Vec::with_capacity(m);
        let mut acc = Vec::with_capacity(m);
        for r in 0..m {
            let n = (cnt.values[r] as f64).max(1.0);
            let mean_y = (sum.values[r] / n).clamp(-h, h);
            match (&sum2, self.spread) {
                (Some(s2), Some(Spread { sample, stddev })) => {
                    let mean_y2 = (s2.values[r] / n).clamp(0.0, h * h);
                    let var = (mean_y2 - mean_y * mean_y).max(0.0);
                    let a_sum2 = acc_at(s2.scale, false)?;
                    let a = var_accuracy(n, mean_y, mean_y2, [a_cnt, a_sum, a_sum2], sample)
                        .map_or(h * h, |a| a.min(h * h));
                    let var = if sample && n > 1.0 {
                        var * n / (n - 1.0)
                    } else {
                        var
                    };
                    // |sqrt(x) - sqrt(y)| <= sqrt(|x - y|).
                    if stddev {
                        out.push(var.sqrt());
                        acc.push(a.sqrt().min(h));
                    } else {
                        out.push(var);
                        acc.push(a);
                    }
                }
                _ => {
                    out.push(mid + mean_y);
                    // |S'/N' - S/N| <= (a_sum + |S'/N'|·a_cnt) / (N' - a_cnt) when N' > a_cnt.
                    let a = if n > a_cnt {
                        (a_sum + mean_y.abs() * a_cnt) / (n - a_cnt)
                    } else {
                        2.0 * h
                    };
                    acc.push(a.min(2.0 * h));
                }
            }
        }
        Ok(Column {
            values: Arc::new(Float64Array::from(out)),
            accuracy: Float64Array::from(acc),
        })
    }
}
