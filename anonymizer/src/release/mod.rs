//! Turning raw per-group statistics into released values: choose the keys, add OpenDP noise
//! calibrated to each statistic's sensitivity, and compute each cell's 95% accuracy.
//!
//! Sensitivities ([`sensitivities`]; one patient contributes at most `k` rows, to at most `g`
//! groups, at most `c` rows to any one; all three enforced on the data, see [`Bounds`];
//! values are clamped to `[lo, hi]`, `B = max(|lo|, |hi|)`, `h = (hi - lo) / 2`), in L1 over
//! the vector of groups, with `r = min(k, g·c)` rows (`c` with no GROUP BY): row counts `r`;
//! patient counts 1 per group, so 1 with no GROUP BY, `min(g, keys)` over public keys, `g`
//! over selected ones; sums `r·B`; centred sums `r·h` (AVG, VAR: the centring on the
//! midpoint halves the sensitivity); centred sums of squares `r·h²`. Float sums add a slack
//! for rounding in the engine's summation (`n²·2⁻⁵²·B` for `n` rows, after Casacuberta et
//! al., "Widespread Underestimation of Sensitivity in DP Libraries", CCS 2022). Partition
//! selection thresholds patient counts (each patient adds 1 to at most `g` groups) unless the
//! query releases row counts and no patient counts, when the thresholded row counts are
//! released as they are.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::scalar::ScalarValue;
use serde_json::json;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::mechanisms::{self, Mechanism, Noisy};
use crate::plan::{Checked, Keys, Rescale, Statistic};
use crate::policy::{Bounds, Domain};

mod count;
mod draw;
mod moments;
mod quantile;
mod sum;

use draw::{Draw, Noise, Preview};

/// The noise of a statistic: one `impl Noise` per statistic, each in its own module.
fn noise_of(s: &Statistic) -> Box<dyn Noise> {
    match s {
        Statistic::CountRows | Statistic::CountValues(_) | Statistic::CountUnits => {
            Box::new(count::Count)
        }
        Statistic::Sum { integer, .. } => Box::new(sum::Sum { integer: *integer }),
        Statistic::Avg { bounds, .. } => Box::new(moments::Moments {
            bounds: *bounds,
            spread: None,
        }),
        Statistic::Var {
            bounds,
            sample,
            stddev,
            ..
        } => Box::new(moments::Moments {
            bounds: *bounds,
            spread: Some(moments::Spread {
                sample: *sample,
                stddev: *stddev,
            }),
        }),
        Statistic::Quantile { bounds, q, .. } => Box::new(quantile::Quantile {
            bounds: *bounds,
            q: *q,
        }),
    }
}

/// The noisy aggregate, ready for the operators above it.
pub struct Noised {
    /// Columns `__k*` (keys), `__v*` (one per aggregate), `__acc*` (accuracies).
    pub batch: RecordBatch,
    /// Per aggregate: the name of its accuracy column, if it has one.
    pub accuracy_columns: Vec<Option<String>>,
    /// Epsilon of the pure parts (sum over them, each from its privacy map).
    pub epsilon: f64,
    /// Delta spent.
    pub delta: f64,
    /// With Gaussian noise: the rho of the whole query (Gaussian parts from their maps, each
    /// pure part's `epsilon² / 2`).
    pub rho: Option<f64>,
    /// Mechanism parameters for the receipt.
    pub mechanism: serde_json::Value,
}

fn eng(e: impl std::fmt::Display) -> Error {
    Error::Engine(e.to_string())
}

fn col<'a>(raw: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    raw.column_by_name(name)
        .ok_or_else(|| Error::Engine(format!("missing column {name}")))
}

/// Values of an integer column at the released rows (`None`: an empty public group, 0).
fn ints(a: &ArrayRef, rows: &[Option<usize>]) -> Result<Vec<i64>> {
    let a = arrow::compute::cast(a, &DataType::Int64).map_err(eng)?;
    let a = a.as_primitive::<Int64Type>();
    Ok(rows
        .iter()
        .map(|r| r.filter(|&i| a.is_valid(i)).map_or(0, |i| a.value(i)))
        .collect())
}

fn floats(a: &ArrayRef, rows: &[Option<usize>]) -> Result<Vec<f64>> {
    let a = arrow::compute::cast(a, &DataType::Float64).map_err(eng)?;
    let a = a.as_primitive::<Float64Type>();
    Ok(rows
        .iter()
        .map(|r| r.filter(|&i| a.is_valid(i)).map_or(0.0, |i| a.value(i)))
        .collect())
}

fn key_string(cols: &[ArrayRef], row: usize) -> Result<String> {
    let mut s = String::new();
    for c in cols {
        let v = ScalarValue::try_from_array(c, row).map_err(eng)?;
        push_key(&mut s, (!v.is_null()).then(|| v.to_string()).as_deref());
    }
    Ok(s)
}

/// Appends one key to a group's lookup string, self-delimited (its length, then its text; `-`
/// for NULL), so that distinct key tuples never share a string: two public combinations
/// reading one group would release it twice, each with its own noise.
fn push_key(s: &mut String, key: Option<&str>) {
    match key {
        Some(k) => {
            s.push_str(&k.len().to_string());
            s.push(':');
            s.push_str(k);
        }
        None => s.push('-'),
    }
}

/// The released rows: indexes into the raw batch (`None` for a public key with no rows), and
/// for public keys, the key values.
struct Groups {
    rows: Vec<Option<usize>>,
    public: Option<Vec<Vec<String>>>,
}

fn public_groups(raw: &RecordBatch, n_keys: usize, domains: &[Domain]) -> Result<Groups> {
    let key_cols: Vec<ArrayRef> = raw.columns()[..n_keys].to_vec();
    let mut index = HashMap::with_capacity(raw.num_rows());
    // Groups printing alike (NaNs of either sign) are marked: a public key must not read one
    // of them. Domains list finite values written as the engine prints them (see
    // `Policy::check_schema`), so no public key can; if one did, it fails closed.
    let mut alike = std::collections::HashSet::new();
    for r in 0..raw.num_rows() {
        let key = key_string(&key_cols, r)?;
        if index.insert(key.clone(), r).is_some() {
            alike.insert(key);
        }
    }
    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
    for d in domains {
        let vals = d.as_text();
        combos = combos
            .into_iter()
            .flat_map(|c| {
                vals.iter()
                    .map(move |v| [c.clone(), vec![v.clone()]].concat())
            })
            .collect();
    }
    let mut used = std::collections::HashSet::new();
    let mut rows = Vec::with_capacity(combos.len());
    for c in &combos {
        let mut key = String::new();
        for v in c {
            push_key(&mut key, Some(v));
        }
        if alike.contains(&key) {
            return Err(eng("two groups read one public key"));
        }
        let row = index.get(&key).copied();
        // Each group is released at most once (the encoding is injective; fail closed if not).
        if let Some(r) = row
            && !used.insert(r)
        {
            return Err(eng("two public key combinations read one group"));
        }
        rows.push(row);
    }
    Ok(Groups {
        rows,
        public: Some(combos),
    })
}

/// Groups kept by partition selection in the order of their key values (nulls last), never in
/// the aggregate's order: that is the order in which each key first appears among the
/// consented rows, which no noise covers (with a LIMIT and no ORDER BY, the first consented
/// patient's diagnosis).
fn by_key(raw: &RecordBatch, n_keys: usize, kept: Vec<(u64, i64)>) -> Result<Vec<(u64, i64)>> {
    let indices = arrow::array::UInt64Array::from_iter_values(kept.iter().map(|k| k.0));
    let columns = raw.columns()[..n_keys]
        .iter()
        .map(|c| {
            Ok(arrow::compute::SortColumn {
                values: arrow::compute::take(c.as_ref(), &indices, None)?,
                options: Some(arrow::compute::SortOptions {
                    descending: false,
                    nulls_first: false,
                }),
            })
        })
        .collect::<std::result::Result<Vec<_>, arrow::error::ArrowError>>()
        .map_err(eng)?;
    let order = if columns.is_empty() {
        (0..kept.len() as u32).collect()
    } else {
        arrow::compute::lexsort_to_indices(&columns, None)
            .map_err(eng)?
            .values()
            .to_vec()
    };
    Ok(order.into_iter().map(|i| kept[i as usize]).collect())
}

/// The 95% half-width of a variance from noisy parts: `n` the noisy count, `m1` and `m2` the
/// noisy mean and mean square of the centred values, `[a_n, a_s, a_q]` the half-widths of the
/// count, sum and sum of squares (each at 1 - 0.05/3). With N' = n:
/// `|m1' - m1| <= d1 = (a_s + |m1'| a_n) / (N' - a_n)`, likewise `d2` for `m2`, so
/// `|V' - V| <= d2 + (2|m1'| + d1) d1`; the sample correction `N / (N - 1)` adds its own
/// error. `None` when the noisy count is too small for a bound (the caller uses the widest).
pub(crate) fn var_accuracy(
    n: f64,
    m1: f64,
    m2: f64,
    [a_n, a_s, a_q]: [f64; 3],
    sample: bool,
) -> Option<f64> {
    if n <= a_n + 1.0 {
        return None;
    }
    let d1 = (a_s + m1.abs() * a_n) / (n - a_n);
    let d2 = (a_q + m2.abs() * a_n) / (n - a_n);
    let a_pop = d2 + (2.0 * m1.abs() + d1) * d1;
    if !sample {
        return Some(a_pop);
    }
    // V_s = f V with f = N / (N - 1): |f' V' - f V| <= f' |V' - V| + |f' - f| (V' + |V' - V|),
    // |f' - f| = |N - N'| / ((N' - 1)(N - 1)) <= a_n / ((N' - 1)(N' - 1 - a_n)).
    let var = (m2 - m1 * m1).max(0.0);
    let f = n / (n - 1.0);
    let df = a_n / ((n - 1.0) * (n - 1.0 - a_n));
    Some(f * a_pop + df * (var + a_pop))
}

/// A released 95% half-width is finite and positive: a non-finite or non-positive value from
/// an accuracy formula (a huge or a vanishing noise scale) is replaced by the conservative
/// end (`f64::MAX` for a huge or undefined width, the smallest positive float for a width
/// that rounds to nothing).
pub fn half_width(a: f64) -> f64 {
    if a.is_nan() || a == f64::INFINITY {
        f64::MAX
    } else if a <= 0.0 {
        f64::MIN_POSITIVE
    } else {
        a
    }
}

/// Whether partition selection thresholds patient counts (column `__u`) rather than row
/// counts (`__n`): always, unless the query releases row counts and no patient counts (the
/// thresholded row counts are then released, saving a draw).
pub fn selects_by_units(stats: &[Statistic]) -> bool {
    stats.contains(&Statistic::CountUnits) || !stats.contains(&Statistic::CountRows)
}

/// How far one patient can move a raw column (the vector of its values over the groups).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensitivity {
    /// In L1 norm: what Laplace noise is calibrated to.
    pub l1: f64,
    /// In L2 norm: what Gaussian noise is calibrated to.
    pub l2: f64,
}

impl Sensitivity {
    /// A column moved by at most `l1` in all and `linf` in any one group: its L2 norm is at
    /// most `sqrt(l1 · linf)` (the sum of squares of values each at most `linf` and summing
    /// to at most `l1`).
    fn of(l1: f64, linf: f64) -> Sensitivity {
        Sensitivity {
            l1,
            l2: (l1 * linf.min(l1)).sqrt(),
        }
    }

    fn times(self, x: f64) -> Sensitivity {
        Sensitivity {
            l1: self.l1 * x,
            l2: self.l2 * x,
        }
    }

    fn plus(self, x: f64) -> Sensitivity {
        Sensitivity {
            l1: self.l1 + x,
            l2: self.l2 + x,
        }
    }

    /// The calibration `mechanism` uses.
    pub fn of_mechanism(self, mechanism: Mechanism) -> f64 {
        match mechanism {
            Mechanism::Laplace => self.l1,
            Mechanism::Gaussian => self.l2,
        }
    }
}

/// The sensitivity the noise of each raw (pre-noise) column is calibrated to: `__n` (rows
/// per group), `__u` (patients per group), and per statistic `__s{i}_n`, `__s{i}_sum`,
/// `__s{i}_sum2`; `rows` is the dataset's size (for the float-summation slack). Quantiles
/// are released by their own mechanism (see [`crate::quantile`]) and are not listed.
pub fn sensitivities(checked: &Checked, rows: u64) -> Vec<(String, Sensitivity)> {
    let b: Bounds = checked.bounds;
    let grouped = !checked.aggregate.group_expr.is_empty();
    let r = Sensitivity::of(b.rows_l1(grouped) as f64, f64::from(b.rows_per_group));
    let units = match &checked.keys {
        Keys::None => 1.0,
        Keys::Public(domains) => {
            let cells = domains.iter().map(|d| d.len() as f64).product::<f64>();
            f64::from(b.groups).min(cells.max(1.0))
        }
        Keys::Selected => f64::from(b.groups),
    };
    let units = Sensitivity::of(units, 1.0);
    let n = rows as f64;
    let slack = |x: f64| n * n * f64::EPSILON * x;
    let mut out = vec![("__n".to_string(), r), ("__u".to_string(), units)];
    for (i, s) in checked.stats.iter().enumerate() {
        let name = |part: &str| format!("__s{i}_{part}");
        match s {
            Statistic::CountRows | Statistic::CountValues(_) => out.push((name("n"), r)),
            Statistic::CountUnits => out.push((name("n"), units)),
            Statistic::Sum {
                bounds, integer, ..
            } => {
                let big = bounds[0].abs().max(bounds[1].abs());
                out.push((
                    name("sum"),
                    if *integer {
                        r.times(big.ceil())
                    } else {
                        r.times(big).plus(slack(big))
                    },
                ));
            }
            Statistic::Avg { bounds, .. } | Statistic::Var { bounds, .. } => {
                let h = (bounds[1] - bounds[0]) / 2.0;
                out.push((name("n"), r));
                out.push((name("sum"), r.times(h).plus(slack(h))));
                if matches!(s, Statistic::Var { .. }) {
                    out.push((name("sum2"), r.times(h * h).plus(slack(h * h))));
                }
            }
            Statistic::Quantile { .. } => {}
        }
    }
    out
}

/// How many noisy vectors a query draws (each gets an equal share of its budget): one per
/// count and sum, two per mean, three per variance, one per quantile, one for partition
/// selection (whose noisy counts are then released for the statistic it thresholds), one for
/// the group sizes the minimum cell size needs when nothing else gives them.
pub fn draws(checked: &Checked, min_cell: Option<u64>) -> usize {
    let selected = checked.keys == Keys::Selected;
    let by_units = selected && selects_by_units(&checked.stats);
    let gauged = selected
        || checked.stats.iter().any(|s| {
            matches!(
                s,
                Statistic::CountRows
                    | Statistic::CountValues(_)
                    | Statistic::CountUnits
                    | Statistic::Avg { .. }
                    | Statistic::Var { .. }
            )
        });
    let extra_gauge = min_cell.is_some_and(|m| m > 1) && !gauged;
    checked
        .stats
        .iter()
        .map(|s| match s {
            s if thresholded(s, selected, by_units) => 0,
            Statistic::Avg { .. } => 2,
            Statistic::Var { .. } => 3,
            _ => 1,
        })
        .sum::<usize>()
        + usize::from(selected)
        + usize::from(extra_gauge)
}

/// Whether `s` is the statistic whose noisy values partition selection already drew: released
/// as they are, no draw of its own.
fn thresholded(s: &Statistic, selected: bool, by_units: bool) -> bool {
    selected
        && matches!(
            (s, by_units),
            (Statistic::CountRows, false) | (Statistic::CountUnits, true)
        )
}

/// The budget one share of a query needs so that every noisy count and sum it releases has a
/// 95% half-width of at most `accuracy` under `mechanism` (epsilon for Laplace, rho for
/// Gaussian), or a refusal for statistics whose accuracy is not one noisy vector's (means,
/// variances, quantiles). Partition selection's share is Laplace's (its draw is Laplace noise).
pub fn share_for_accuracy(
    checked: &Checked,
    rows: u64,
    mechanism: Mechanism,
    accuracy: f64,
) -> Result<f64> {
    if let Some(s) = checked.stats.iter().find(|s| {
        matches!(
            s,
            Statistic::Avg { .. } | Statistic::Var { .. } | Statistic::Quantile { .. }
        )
    }) {
        let what = match s {
            Statistic::Avg { .. } => "AVG",
            Statistic::Var { .. } => "VAR or STDDEV",
            _ => "a quantile",
        };
        return Err(Error::Refused {
            construct: format!("an accuracy target with {what}"),
            advice: "an accuracy target applies to counts and sums; give an epsilon instead".into(),
        });
    }
    let sens = sensitivities(checked, rows);
    let selected = checked.keys == Keys::Selected;
    let by_units = selected && selects_by_units(&checked.stats);
    let mut share: f64 = 0.0;
    let mut need = |column: &str, discrete: bool, m: Mechanism| -> Result<()> {
        let s = sensitivity_of(&sens, column)?;
        let scale = m.scale_for(accuracy, discrete)?;
        let loss = m.loss_at(s.of_mechanism(m), scale);
        // Partition selection's pure share, in the query's currency.
        let loss = match (m, mechanism) {
            (Mechanism::Laplace, Mechanism::Gaussian) => loss * loss / 2.0,
            _ => loss,
        };
        share = share.max(loss);
        Ok(())
    };
    if selected {
        need(
            if by_units { "__u" } else { "__n" },
            true,
            Mechanism::Laplace,
        )?;
    }
    for (i, s) in checked.stats.iter().enumerate() {
        match s {
            s if thresholded(s, selected, by_units) => {}
            Statistic::CountRows | Statistic::CountValues(_) | Statistic::CountUnits => {
                need(&format!("__s{i}_n"), true, mechanism)?
            }
            Statistic::Sum { integer, .. } => need(&format!("__s{i}_sum"), *integer, mechanism)?,
            _ => {}
        }
    }
    Ok(share)
}

/// A raw column's entry in [`sensitivities`].
fn sensitivity_of(list: &[(String, Sensitivity)], column: &str) -> Result<Sensitivity> {
    list.iter()
        .find(|(c, _)| c == column)
        .map(|(_, s)| *s)
        .ok_or_else(|| eng(format!("no sensitivity for {column}")))
}

/// The most rows a query's aggregate can sum: the dataset's rows, or for a join, every unit's
/// bound of joined rows (for the float-summation slack).
pub fn summed_rows(checked: &Checked, dataset: &Dataset) -> u64 {
    dataset
        .rows()
        .max((dataset.units.len() as u64).saturating_mul(u64::from(checked.bounds.rows)))
}

/// The noise a query gets and its budget: epsilon for Laplace, rho for Gaussian.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spending {
    /// Laplace or Gaussian noise on counts and sums.
    pub mechanism: Mechanism,
    /// The budget in the mechanism's measure: epsilon (Laplace) or rho (Gaussian).
    pub budget: f64,
    /// Delta for partition selection.
    pub delta: f64,
}

impl Spending {
    /// The epsilon of a pure part (partition selection, a quantile) given `share` of the
    /// budget: the share itself under Laplace; under Gaussian, the epsilon whose rho
    /// (`epsilon² / 2`) is the share.
    pub(crate) fn pure(&self, share: f64) -> f64 {
        match self.mechanism {
            Mechanism::Laplace => share,
            Mechanism::Gaussian => (2.0 * share).sqrt(),
        }
    }
}

/// Scales the last released statistic's values and intervals back from [-1, 1] with each
/// group's key's bounds (see [`Rescale`]): post-processing of noisy values. A group whose key
/// has no bounds releases NULL.
fn rescale(
    s: &Statistic,
    r: &Rescale,
    groups: &Groups,
    raw: &RecordBatch,
    values: &mut [ArrayRef],
    accuracies: &mut [Option<Float64Array>],
) -> Result<()> {
    let key_column = arrow::compute::cast(raw.column(r.key), &DataType::Utf8).map_err(eng)?;
    let key_column = key_column.as_string::<i32>();
    let (Some(v), Some(Some(a))) = (values.last_mut(), accuracies.last_mut()) else {
        return Err(eng("no statistic to rescale"));
    };
    let noisy = arrow::compute::cast(v, &DataType::Float64).map_err(eng)?;
    let noisy = noisy.as_primitive::<Float64Type>();
    let mut out = Vec::with_capacity(groups.rows.len());
    let mut acc = Vec::with_capacity(groups.rows.len());
    for (j, row) in groups.rows.iter().enumerate() {
        let key = match &groups.public {
            Some(combos) => combos.get(j).map(|c| c[r.key].clone()),
            None => row
                .filter(|&x| key_column.is_valid(x))
                .map(|x| key_column.value(x).to_owned()),
        };
        let Some([lo, hi]) = key.and_then(|k| r.per_key.get(&k).copied()) else {
            out.push(None);
            acc.push(None);
            continue;
        };
        let h = (hi - lo) / 2.0;
        let (shift, factor) = match s {
            Statistic::Sum { .. } => (0.0, lo.abs().max(hi.abs())),
            Statistic::Avg { .. } => ((lo + hi) / 2.0, h),
            Statistic::Var { stddev: true, .. } => (0.0, h),
            _ => (0.0, h * h),
        };
        out.push(noisy.is_valid(j).then(|| shift + factor * noisy.value(j)));
        acc.push(a.is_valid(j).then(|| factor * a.value(j)));
    }
    *v = Arc::new(Float64Array::from(out));
    *a = Float64Array::from(acc);
    Ok(())
}

/// What a query's draws spent, and their receipt entries.
#[derive(Default)]
pub(crate) struct Tally {
    /// Epsilon of the pure parts (Laplace, partition selection, quantiles).
    eps: f64,
    /// Rho of the pure parts: `epsilon² / 2` each.
    pure_rho: f64,
    /// Rho of the Gaussian parts.
    rho: f64,
    /// Delta of partition selection.
    delta: f64,
    /// The receipt's entry of each noisy part.
    pub(crate) mech: Vec<serde_json::Value>,
}

impl Tally {
    /// A pure part's epsilon.
    pub(crate) fn pure(&mut self, eps: f64) {
        self.eps += eps;
        self.pure_rho += eps * eps / 2.0;
    }

    /// One noisy vector: its loss from the privacy map, in the mechanism's measure.
    fn record(&mut self, m: Mechanism, what: &str, scale: f64, loss: f64) {
        let measure = match m {
            Mechanism::Laplace => {
                self.pure(loss);
                "epsilon"
            }
            Mechanism::Gaussian => {
                self.rho += loss;
                "rho"
            }
        };
        self.mech
            .push(json!({"statistic": what, "mechanism": m.name(), "scale": scale, measure: loss}));
    }
}

/// Noise of `mechanism` on integer values of sensitivity `s`, from a share of the budget.
fn noisy_ints(m: Mechanism, values: &[i64], s: Sensitivity, share: f64) -> Result<Noisy<i64>> {
    match m {
        // Integer mechanisms take integer L1 sensitivities (whole numbers by construction).
        Mechanism::Laplace => mechanisms::laplace_i64(values, s.l1.ceil() as i64, share),
        Mechanism::Gaussian => mechanisms::gaussian_i64(values, s.l2, share),
    }
}

/// Noise of `mechanism` on float values of sensitivity `s`, from a share of the budget.
fn noisy_floats(m: Mechanism, values: &[f64], s: Sensitivity, share: f64) -> Result<Noisy<f64>> {
    match m {
        Mechanism::Laplace => mechanisms::laplace_f64(values, s.l1, share),
        Mechanism::Gaussian => mechanisms::gaussian_f64(values, s.l2, share),
    }
}

/// Each statistic's 95% half-width that a query would be released with, from its plan, the
/// policy and its spend alone, before anything is read: the noise of each count and sum is
/// built exactly as [`noise`] builds it and drawn on zeros, so each figure is the mechanism's
/// own. `None` where the width depends on the group (AVG, VAR, STDDEV and quantiles, whose
/// intervals come from their noisy parts; values rescaled per key).
pub fn preview(
    checked: &Checked,
    dataset: &Dataset,
    spending: Spending,
    min_cell: Option<u64>,
) -> Result<Vec<Option<f64>>> {
    let sens_list = sensitivities(checked, summed_rows(checked, dataset));
    let sens = |column: &str| sensitivity_of(&sens_list, column);
    let selected = checked.keys == Keys::Selected;
    let by_units = selected && selects_by_units(&checked.stats);
    let share = spending.budget / draws(checked, min_cell).max(1) as f64;
    let threshold = if selected {
        let (column, linf) = if by_units {
            ("__u", 1)
        } else {
            ("__n", i64::from(checked.bounds.rows_per_group))
        };
        let selection = mechanisms::laplace_threshold(
            &HashMap::new(),
            checked.bounds.groups,
            sens(column)?.l1.ceil() as i64,
            linf,
            spending.pure(share),
            spending.delta,
        )?;
        Some(selection.noise.accuracy)
    } else {
        None
    };
    let mut out = Vec::with_capacity(checked.stats.len());
    for (i, s) in checked.stats.iter().enumerate() {
        let rescaled = checked.rescales.get(i).is_some_and(Option::is_some);
        let width = if thresholded(s, selected, by_units) {
            threshold
        } else if rescaled {
            // Scaled back per key: the width depends on the group.
            None
        } else {
            noise_of(s).preview(&Preview {
                index: i,
                mechanism: spending.mechanism,
                share,
                sensitivities: &sens_list,
            })?
        };
        out.push(width);
    }
    Ok(out)
}

/// Adds noise to every statistic and builds the released batch.
pub fn noise(
    checked: &Checked,
    raw: &RecordBatch,
    dataset: &Dataset,
    spending: Spending,
    min_cell: Option<u64>,
) -> Result<Noised> {
    let Spending {
        mechanism: noise_kind,
        budget,
        delta,
    } = spending;
    let contribution = checked.bounds;
    let g = contribution.groups;
    let sens_list = sensitivities(checked, summed_rows(checked, dataset));
    let sens = |column: &str| sensitivity_of(&sens_list, column);
    let n_keys = checked.aggregate.group_expr.len();
    let selected = checked.keys == Keys::Selected;
    let by_units = selected && selects_by_units(&checked.stats);
    let is_thresholded = |s: &Statistic| thresholded(s, selected, by_units);
    // Budget: one equal share per noisy vector.
    let share = budget / draws(checked, min_cell).max(1) as f64;
    let mut tally = Tally::default();

    let mut threshold_counts: Option<(Vec<i64>, f64)> = None;
    let mut selection: Option<serde_json::Value> = None;
    // Each released group's noisy size, for the minimum cell size.
    let mut gauge: Option<Vec<i64>> = None;
    let groups = match &checked.keys {
        Keys::None => Groups {
            rows: vec![(raw.num_rows() > 0).then_some(0)],
            public: None,
        },
        Keys::Public(domains) => public_groups(raw, n_keys, domains)?,
        Keys::Selected => {
            let (column, what, linf) = if by_units {
                ("__u", "partition selection (patient counts)", 1)
            } else {
                (
                    "__n",
                    "partition selection (row counts)",
                    i64::from(contribution.rows_per_group),
                )
            };
            let n = col(raw, column)?.as_primitive::<Int64Type>();
            let counts: HashMap<u64, i64> = (0..raw.num_rows())
                .map(|r| (r as u64, n.value(r)))
                .collect();
            let mechanisms::Selection {
                kept,
                noise: info,
                delta: d,
                threshold,
            } = mechanisms::laplace_threshold(
                &counts,
                g,
                sens(column)?.l1.ceil() as i64,
                linf,
                spending.pure(share),
                delta,
            )?;
            tally.pure(info.loss);
            tally.delta += d;
            tally.mech.push(json!({"statistic": what, "mechanism": "laplace_threshold", "scale": info.scale, "epsilon": info.loss, "delta": d, "threshold": threshold}));
            // The threshold comes from the spend and the bounds alone, the number of groups
            // kept is the mechanism's output: the header may say both.
            selection = Some(json!({
                "threshold": threshold,
                "counts": if by_units { "patients" } else { "rows" },
                "groups": kept.len(),
            }));
            let rows = by_key(raw, n_keys, kept.into_iter().collect())?;
            threshold_counts = Some((rows.iter().map(|r| r.1.max(0)).collect(), info.accuracy));
            gauge = threshold_counts.as_ref().map(|t| t.0.clone());
            Groups {
                rows: rows.iter().map(|r| Some(r.0 as usize)).collect(),
                public: None,
            }
        }
    };
    let rows = &groups.rows;

    let mut values: Vec<ArrayRef> = Vec::new();
    let mut accuracies: Vec<Option<Float64Array>> = Vec::new();
    for (i, s) in checked.stats.iter().enumerate() {
        if is_thresholded(s) {
            let (counts, acc) = threshold_counts
                .clone()
                .ok_or_else(|| eng("no thresholded counts"))?;
            values.push(Arc::new(Int64Array::from(counts)));
            accuracies.push(Some(Float64Array::from(vec![acc; rows.len()])));
        } else {
            let column = noise_of(s).release(&mut Draw {
                index: i,
                raw,
                rows,
                spending,
                share,
                bounds: contribution,
                sensitivities: &sens_list,
                tally: &mut tally,
                gauge: &mut gauge,
            })?;
            values.push(column.values);
            accuracies.push(Some(column.accuracy));
        }
        if let Some(r) = checked.rescales.get(i).and_then(Option::as_ref) {
            rescale(s, r, &groups, raw, &mut values, &mut accuracies)?;
        }
    }

    // The study's minimum cell size (post-processing of noisy values, no privacy cost): a
    // group whose noisy size is from 1 to `min - 1` has every statistic suppressed.
    let mut cells_suppressed = 0u64;
    if let Some(min) = min_cell.filter(|&m| m > 1) {
        if gauge.is_none() {
            let n = noisy_ints(
                noise_kind,
                &ints(col(raw, "__n")?, rows)?,
                sens("__n")?,
                share,
            )?;
            tally.record(
                noise_kind,
                "group size (for the minimum cell size)",
                n.scale,
                n.loss,
            );
            gauge = Some(n.values);
        }
        let sizes = gauge.as_ref().ok_or_else(|| eng("no group sizes"))?;
        let small: Vec<bool> = sizes.iter().map(|&x| x >= 1 && (x as u64) < min).collect();
        cells_suppressed = small.iter().filter(|&&b| b).count() as u64;
        if cells_suppressed > 0 {
            let mask = arrow::array::BooleanArray::from(small);
            for v in &mut values {
                *v = arrow::compute::nullif(v, &mask).map_err(eng)?;
            }
            for a in accuracies.iter_mut().flatten() {
                let nulled = arrow::compute::nullif(a, &mask).map_err(eng)?;
                *a = nulled.as_primitive::<Float64Type>().clone();
            }
        }
    }

    let (batch, accuracy_columns) = released_batch(checked, raw, &groups, values, accuracies)?;
    // The query's spend in its budget's measure, from the privacy maps.
    let (spent, rho) = match noise_kind {
        Mechanism::Laplace => (tally.eps, None),
        Mechanism::Gaussian => (tally.rho + tally.pure_rho, Some(tally.rho + tally.pure_rho)),
    };
    if spent > budget * (1.0 + 1e-9) {
        return Err(Error::Mechanism(format!(
            "privacy loss {spent} exceeds the {budget} requested"
        )));
    }
    let mechanism = json!({
        "noise": noise_kind.name(),
        "keys": match checked.keys { Keys::None => "none", Keys::Public(_) => "public", Keys::Selected => "selected" },
        "max_rows_per_unit": contribution.rows,
        "max_groups_per_unit": g,
        "max_rows_per_group": contribution.rows_per_group,
        "statistics": tally.mech,
    });
    let mut mechanism = mechanism;
    if let Some(s) = selection {
        mechanism["partition_selection"] = s;
    }
    if let Some(m) = min_cell {
        mechanism["min_cell_size"] = json!(m);
        mechanism["cells_suppressed"] = json!(cells_suppressed);
    }
    Ok(Noised {
        batch,
        accuracy_columns,
        epsilon: tally.eps,
        delta: tally.delta,
        rho,
        mechanism,
    })
}

/// The released batch: the groups' keys, the noisy values cast to the aggregate's types, and
/// each value's 95% half-width; with the name of each aggregate's accuracy column.
fn released_batch(
    checked: &Checked,
    raw: &RecordBatch,
    groups: &Groups,
    values: Vec<ArrayRef>,
    accuracies: Vec<Option<Float64Array>>,
) -> Result<(RecordBatch, Vec<Option<String>>)> {
    let n_keys = checked.aggregate.group_expr.len();
    let rows = &groups.rows;
    let agg_schema = checked.aggregate.schema.as_ref();
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for j in 0..n_keys {
        let target = agg_schema.field(j).data_type();
        let arr: ArrayRef = match &groups.public {
            Some(combos) => {
                let text: ArrayRef = Arc::new(arrow::array::StringArray::from(
                    combos.iter().map(|c| c[j].clone()).collect::<Vec<_>>(),
                ));
                arrow::compute::cast(&text, target).map_err(eng)?
            }
            None => {
                let idx =
                    UInt64Array::from(rows.iter().map(|r| r.map(|i| i as u64)).collect::<Vec<_>>());
                arrow::compute::take(raw.column(j), &idx, None).map_err(eng)?
            }
        };
        fields.push(Field::new(format!("__k{j}"), target.clone(), true));
        cols.push(arr);
    }
    for (j, v) in values.iter().enumerate() {
        let target = agg_schema.field(n_keys + j).data_type();
        fields.push(Field::new(format!("__v{j}"), target.clone(), true));
        cols.push(arrow::compute::cast(v, target).map_err(eng)?);
    }
    let mut accuracy_columns = Vec::new();
    for (j, a) in accuracies.into_iter().enumerate() {
        match a.map(|a| a.unary_opt::<_, Float64Type>(|x| Some(half_width(x)))) {
            Some(a) => {
                let name = format!("__acc{j}");
                fields.push(Field::new(&name, DataType::Float64, true));
                cols.push(Arc::new(a));
                accuracy_columns.push(Some(name));
            }
            None => accuracy_columns.push(None),
        }
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(eng)?;
    Ok((batch, accuracy_columns))
}

/// SHA-256 of a result's Arrow IPC stream: what the receipt records as the released result.
pub fn digest(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<[u8; 32]> {
    use sha2::Digest as _;
    Ok(sha2::Sha256::digest(ipc_stream(schema, batches)?).into())
}

/// A result as the Arrow IPC stream that is sent, kept and digested (one encoding for all).
pub fn ipc_stream(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let mut w = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema).map_err(eng)?;
    for b in batches {
        w.write(b).map_err(eng)?;
    }
    w.into_inner().map_err(eng)
}
