//! Noise, from OpenDP only. Each function builds an OpenDP measurement, reads the privacy
//! loss from the measurement's own privacy map (never estimated by hand), checks it against
//! the share of the budget it was given, and invokes it. Randomness comes from OpenSSL
//! (OpenDP's default features).

use std::collections::HashMap;

use opendp::accuracy::{
    accuracy_to_discrete_gaussian_scale, accuracy_to_discrete_laplacian_scale,
    accuracy_to_gaussian_scale, accuracy_to_laplacian_scale, discrete_gaussian_scale_to_accuracy,
    discrete_laplacian_scale_to_accuracy, gaussian_scale_to_accuracy, laplacian_scale_to_accuracy,
};
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{
    make_gaussian, make_laplace, make_laplace_threshold, make_private_quantile,
};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{
    AbsoluteDistance, L0PInfDistance, L1Distance, L01InfDistance, L2Distance, SymmetricDistance,
};

use crate::error::{Error, Result};

/// Confidence level of released accuracy intervals: 95%.
pub const ALPHA: f64 = 0.05;

/// The noise a query's statistics get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// Laplace noise (discrete for integers), pure DP, calibrated to the L1 sensitivity.
    Laplace,
    /// Gaussian noise (discrete for integers), zero-concentrated DP (rho), calibrated to the
    /// L2 sensitivity.
    Gaussian,
}

impl Mechanism {
    /// Its name in requests and receipts.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Laplace => "laplace",
            Mechanism::Gaussian => "gaussian",
        }
    }

    /// Parses a request's name (`laplace` or `gaussian`, any case).
    pub fn parse(s: &str) -> Option<Mechanism> {
        match s.trim().to_ascii_lowercase().as_str() {
            "laplace" => Some(Mechanism::Laplace),
            "gaussian" => Some(Mechanism::Gaussian),
            _ => None,
        }
    }

    /// The noise scale whose 95% half-width is `accuracy` (`discrete`: integer noise).
    pub fn scale_for(self, accuracy: f64, discrete: bool) -> Result<f64> {
        let f = match (self, discrete) {
            (Mechanism::Laplace, false) => accuracy_to_laplacian_scale,
            (Mechanism::Laplace, true) => accuracy_to_discrete_laplacian_scale,
            (Mechanism::Gaussian, false) => accuracy_to_gaussian_scale,
            // Wide discrete Gaussian noise: the continuous scale for a half-width two
            // narrower, which `accuracy_at`'s bound for it then meets.
            (Mechanism::Gaussian, true) if accuracy > 2.0 * EXACT_DISCRETE_GAUSSIAN => {
                return accuracy_to_gaussian_scale(accuracy - 2.0, ALPHA).map_err(opendp);
            }
            (Mechanism::Gaussian, true) => accuracy_to_discrete_gaussian_scale,
        };
        f(accuracy, ALPHA).map_err(opendp)
    }

    /// The half-width of this noise at `scale` at confidence `1 - alpha`.
    pub fn accuracy_at(self, scale: f64, alpha: f64, discrete: bool) -> Result<f64> {
        let f = match (self, discrete) {
            (Mechanism::Laplace, false) => laplacian_scale_to_accuracy,
            (Mechanism::Laplace, true) => discrete_laplacian_scale_to_accuracy,
            (Mechanism::Gaussian, false) => gaussian_scale_to_accuracy,
            // OpenDP's exact discrete Gaussian accuracy walks the support (time proportional
            // to the scale); past a scale of 1,000 the discrete law is the continuous one
            // rounded, so its half-width is at most the continuous one rounded up, plus one.
            (Mechanism::Gaussian, true) if scale > EXACT_DISCRETE_GAUSSIAN => {
                return Ok(gaussian_scale_to_accuracy(scale, alpha)
                    .map_err(opendp)?
                    .ceil()
                    + 1.0);
            }
            (Mechanism::Gaussian, true) => discrete_gaussian_scale_to_accuracy,
        };
        f(scale, alpha).map_err(opendp)
    }

    /// The privacy loss of noise at `scale` on a statistic of this sensitivity (L1 for
    /// Laplace: epsilon; L2 for Gaussian: rho), in closed form: for planning a spend (the
    /// draw itself reads OpenDP's map).
    pub fn loss_at(self, sensitivity: f64, scale: f64) -> f64 {
        match self {
            Mechanism::Laplace => sensitivity / scale,
            Mechanism::Gaussian => (sensitivity / scale).powi(2) / 2.0,
        }
    }
}

/// The largest discrete Gaussian scale whose accuracy OpenDP computes exactly (see
/// [`Mechanism::accuracy_at`]).
const EXACT_DISCRETE_GAUSSIAN: f64 = 1000.0;

/// Noisy values with what they cost and how accurate they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Noisy<T> {
    /// One value per input value (per group).
    pub values: Vec<T>,
    /// The noise scale used (Laplace: its scale; Gaussian: its standard deviation).
    pub scale: f64,
    /// Half-width of the 95% interval of each value's noise.
    pub accuracy: f64,
    /// Privacy loss from OpenDP's privacy map: epsilon (Laplace) or rho (Gaussian).
    pub loss: f64,
}

fn opendp(e: opendp::error::Error) -> Error {
    Error::Mechanism(e.to_string())
}

/// Finds the smallest scale (starting from `start`) whose privacy map stays within `epsilon`
/// (or rho): the map may round up, so the scale is nudged until it holds.
fn calibrate(start: f64, epsilon: f64, map: impl Fn(f64) -> Result<f64>) -> Result<(f64, f64)> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(Error::Mechanism(
            "epsilon must be positive and finite".into(),
        ));
    }
    let mut scale = start;
    for _ in 0..64 {
        let spent = map(scale)?;
        if spent <= epsilon {
            return Ok((scale, spent));
        }
        scale *= 1.0 + 1e-9_f64.max((spent - epsilon) / epsilon);
    }
    Err(Error::Mechanism(
        "could not calibrate the noise scale".into(),
    ))
}

/// The half-width of (continuous) Laplace noise of `scale` at confidence `1 - alpha`.
pub fn accuracy(scale: f64, alpha: f64) -> Result<f64> {
    laplacian_scale_to_accuracy(scale, alpha).map_err(opendp)
}

/// Laplace noise on integer counts (or integer sums): one patient changes the vector by at
/// most `sensitivity` in L1 norm. Uses OpenDP's discrete Laplace sampler.
pub fn laplace_i64(values: &[i64], sensitivity: i64, epsilon: f64) -> Result<Noisy<i64>> {
    laplace_vector(
        AtomDomain::<i64>::default(),
        values,
        (sensitivity, sensitivity as f64),
        epsilon,
        discrete_laplacian_scale_to_accuracy,
    )
}

/// Laplace noise on float sums: one patient changes the vector by at most `sensitivity` in L1
/// norm (the caller includes the floating-point rounding slack).
pub fn laplace_f64(values: &[f64], sensitivity: f64, epsilon: f64) -> Result<Noisy<f64>> {
    laplace_vector(
        AtomDomain::<f64>::new_non_nan(),
        values,
        (sensitivity, sensitivity),
        epsilon,
        laplacian_scale_to_accuracy,
    )
}

/// OpenDP's `make_laplace` over a vector of `T` with L1 sensitivity `sensitivity` (as `T`
/// and as f64), calibrated to `epsilon`; `accuracy` turns the scale into the 95% half-width.
fn laplace_vector<T>(
    atom: AtomDomain<T>,
    values: &[T],
    (sensitivity, sensitivity_f64): (T, f64),
    epsilon: f64,
    accuracy: fn(f64, f64) -> opendp::error::Fallible<f64>,
) -> Result<Noisy<T>>
where
    T: opendp::traits::CheckAtom + Clone,
    opendp::measurements::DiscreteLaplace:
        opendp::measurements::MakeNoise<VectorDomain<AtomDomain<T>>, L1Distance<T>, MaxDivergence>,
    (VectorDomain<AtomDomain<T>>, L1Distance<T>): opendp::core::MetricSpace,
{
    let domain = VectorDomain::new(atom);
    let build = |scale: f64| {
        make_laplace::<_, _, MaxDivergence>(domain.clone(), L1Distance::<T>::default(), scale, None)
            .map_err(opendp)
    };
    let (scale, spent) = calibrate(sensitivity_f64 / epsilon, epsilon, |s| {
        build(s)?.map(&sensitivity).map_err(opendp)
    })?;
    let out = build(scale)?.invoke(&values.to_vec()).map_err(opendp)?;
    Ok(Noisy {
        values: out,
        scale,
        accuracy: accuracy(scale, ALPHA).map_err(opendp)?,
        loss: spent,
    })
}

/// Gaussian noise on integer counts or sums (OpenDP's discrete Gaussian): one patient changes
/// the vector by at most `l2` in L2 norm; `rho` is the zCDP budget.
pub fn gaussian_i64(values: &[i64], l2: f64, rho: f64) -> Result<Noisy<i64>> {
    gaussian_vector(AtomDomain::<i64>::default(), values, l2, rho, true)
}

/// Gaussian noise on float sums: one patient changes the vector by at most `l2` in L2 norm
/// (the caller includes the floating-point rounding slack).
pub fn gaussian_f64(values: &[f64], l2: f64, rho: f64) -> Result<Noisy<f64>> {
    gaussian_vector(AtomDomain::<f64>::new_non_nan(), values, l2, rho, false)
}

/// OpenDP's `make_gaussian` over a vector of `T` with L2 sensitivity `l2`, calibrated to
/// `rho` (its privacy map, never a formula, says what it spends).
fn gaussian_vector<T>(
    atom: AtomDomain<T>,
    values: &[T],
    l2: f64,
    rho: f64,
    discrete: bool,
) -> Result<Noisy<T>>
where
    T: opendp::traits::CheckAtom + Clone,
    opendp::measurements::DiscreteGaussian: opendp::measurements::MakeNoise<
            VectorDomain<AtomDomain<T>>,
            L2Distance<f64>,
            ZeroConcentratedDivergence,
        >,
    (VectorDomain<AtomDomain<T>>, L2Distance<f64>): opendp::core::MetricSpace,
{
    if !(rho.is_finite() && rho > 0.0) {
        return Err(Error::Mechanism("rho must be positive and finite".into()));
    }
    let domain = VectorDomain::new(atom);
    let build = |scale: f64| {
        make_gaussian::<_, _, ZeroConcentratedDivergence>(
            domain.clone(),
            L2Distance::<f64>::default(),
            scale,
            None,
        )
        .map_err(opendp)
    };
    let (scale, spent) = calibrate(l2 / (2.0 * rho).sqrt(), rho, |s| {
        build(s)?.map(&l2).map_err(opendp)
    })?;
    let out = build(scale)?.invoke(&values.to_vec()).map_err(opendp)?;
    Ok(Noisy {
        values: out,
        scale,
        accuracy: Mechanism::Gaussian.accuracy_at(scale, ALPHA, discrete)?,
        loss: spent,
    })
}

/// What thresholded partition selection kept, and how.
pub struct Selection {
    /// The groups kept, with their noisy counts.
    pub kept: HashMap<u64, i64>,
    /// The noise (no values): scale, 95% half-width, epsilon spent.
    pub noise: Noisy<()>,
    /// Delta spent.
    pub delta: f64,
    /// The threshold a noisy count must reach (from the spend and the bounds alone).
    pub threshold: i64,
}

/// Thresholded partition selection on counts keyed by group (OpenDP's
/// `make_laplace_threshold`): noisy counts, keeping only groups whose noisy count clears a
/// threshold chosen so that delta stays within `delta`. One patient touches at most
/// `max_groups` groups, changing them by at most `l1` in all and each by at most `max_rows`.
pub fn laplace_threshold(
    counts: &HashMap<u64, i64>,
    max_groups: u32,
    l1: i64,
    max_rows: i64,
    epsilon: f64,
    delta: f64,
) -> Result<Selection> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(Error::Refused {
            construct: "GROUP BY a column without a public domain".into(),
            advice: "partition selection needs delta > 0; declare the column's domain in the \
                     policy, or ask the IRB for a delta"
                .into(),
        });
    }
    let domain = MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default());
    let metric: L01InfDistance<AbsoluteDistance<i64>> = L0PInfDistance(AbsoluteDistance::default());
    let d_in = (max_groups, l1, max_rows);
    let build = |scale: f64, threshold: i64| {
        make_laplace_threshold::<_, _, opendp::measures::Approximate<MaxDivergence>>(
            domain.clone(),
            metric.clone(),
            scale,
            threshold,
            None,
        )
        .map_err(opendp)
    };
    let (scale, spent) = calibrate(l1 as f64 / epsilon, epsilon, |s| {
        Ok(build(s, i64::MAX / 4)?.map(&d_in).map_err(opendp)?.0)
    })?;
    // The smallest threshold whose delta fits (delta falls as the threshold rises).
    let (mut lo, mut hi) = (max_rows, i64::MAX / 4);
    let delta_at = |t: i64| -> Result<f64> { Ok(build(scale, t)?.map(&d_in).map_err(opendp)?.1) };
    if delta_at(hi)? > delta {
        return Err(Error::Mechanism(
            "no threshold reaches the requested delta".into(),
        ));
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if delta_at(mid)? <= delta {
            hi = mid
        } else {
            lo = mid + 1
        }
    }
    let meas = build(scale, lo)?;
    let (eps_spent, delta_spent) = meas.map(&d_in).map_err(opendp)?;
    let kept = meas.invoke(counts).map_err(opendp)?;
    Ok(Selection {
        kept,
        noise: Noisy {
            values: Vec::new(),
            scale,
            accuracy: discrete_laplacian_scale_to_accuracy(scale, ALPHA).map_err(opendp)?,
            loss: eps_spent.max(spent),
        },
        delta: delta_spent,
        threshold: lo,
    })
}

/// A private quantile (`alpha` = 0.5 for the median) of one group's values, chosen among
/// `candidates` by OpenDP's exponential-mechanism quantile. One patient adds or removes at
/// most `max_rows` values. Returns the value and the epsilon spent.
pub fn quantile(
    values: &Vec<f64>,
    candidates: &[f64],
    alpha: f64,
    max_rows: u32,
    epsilon: f64,
) -> Result<(f64, f64)> {
    let (scale, spent) = quantile_scale(candidates, alpha, max_rows, epsilon)?;
    let value = private_quantile(candidates, alpha, scale)?
        .invoke(values)
        .map_err(opendp)?;
    Ok((value, spent))
}

/// The score noise scale of [`quantile`] for this budget (the scores are, in rows, how far a
/// candidate's rank is from the quantile's), and the epsilon it spends.
pub fn quantile_scale(
    candidates: &[f64],
    alpha: f64,
    max_rows: u32,
    epsilon: f64,
) -> Result<(f64, f64)> {
    // The score's sensitivity is handled inside OpenDP's map; calibrate on it directly.
    calibrate(f64::from(max_rows) / epsilon, epsilon, |s| {
        private_quantile(candidates, alpha, s)?
            .map(&max_rows)
            .map_err(opendp)
    })
}

fn private_quantile(
    candidates: &[f64],
    alpha: f64,
    scale: f64,
) -> Result<
    opendp::core::Measurement<VectorDomain<AtomDomain<f64>>, SymmetricDistance, MaxDivergence, f64>,
> {
    make_private_quantile(
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        SymmetricDistance,
        MaxDivergence,
        candidates.to_vec(),
        alpha,
        scale,
    )
    .map_err(opendp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_loss_comes_from_the_map_and_stays_within_budget() {
        let n = laplace_i64(&[100, 200, 300], 10, 0.5).unwrap();
        assert!(n.loss <= 0.5 && n.loss > 0.49, "{}", n.loss);
        assert!((n.scale - 20.0).abs() < 0.01);
        assert_eq!(n.values.len(), 3);
        let f = laplace_f64(&[1.5, -2.0], 7.5, 1.0).unwrap();
        assert!(f.loss <= 1.0 && f.loss > 0.99);
        // 95% half-width of Laplace(b) is b ln 20.
        assert!((f.accuracy - f.scale * 20f64.ln()).abs() < 1e-9);
        assert!(laplace_i64(&[1], 1, 0.0).is_err());
        assert!(laplace_f64(&[1.0], 1.0, f64::NAN).is_err());
    }

    #[test]
    fn thresholding_needs_delta_and_drops_small_groups() {
        let counts: HashMap<u64, i64> = [(0, 0), (1, 100_000)].into_iter().collect();
        assert!(matches!(
            laplace_threshold(&counts, 10, 10, 10, 1.0, 0.0),
            Err(Error::Refused { .. })
        ));
        let s = laplace_threshold(&counts, 10, 10, 10, 1.0, 1e-6).unwrap();
        assert!(s.kept.contains_key(&1) && !s.kept.contains_key(&0));
        assert!(s.delta <= 1e-6 && s.delta > 0.0);
        assert!(s.noise.loss <= 1.0 + 1e-12);
        // The threshold depends on the spend and the bounds only: the same for other data.
        let other: HashMap<u64, i64> = [(7, 3)].into_iter().collect();
        let t = laplace_threshold(&other, 10, 10, 10, 1.0, 1e-6).unwrap();
        assert_eq!(t.threshold, s.threshold);
        assert!(s.threshold > 10);
    }

    #[test]
    fn gaussian_noise_is_calibrated_to_rho_by_the_map() {
        // rho = l2^2 / (2 sigma^2): sensitivity 1 at rho 0.5 is sigma 1.
        let n = gaussian_i64(&[100, 200, 300], 1.0, 0.5).unwrap();
        assert!(n.loss <= 0.5 && n.loss > 0.499, "{}", n.loss);
        assert!((n.scale - 1.0).abs() < 1e-3, "{}", n.scale);
        assert_eq!(n.values.len(), 3);
        let f = gaussian_f64(&[1.5, -2.0], 3.0, 0.02).unwrap();
        assert!(f.loss <= 0.02 && f.loss > 0.0199);
        assert!((f.scale - 3.0 / 0.04f64.sqrt()).abs() / f.scale < 1e-3);
        // 95% half-width of N(0, sigma^2) is 1.96 sigma.
        assert!(
            (f.accuracy / f.scale - 1.96).abs() < 0.01,
            "{}",
            f.accuracy / f.scale
        );
        assert!(gaussian_i64(&[1], 1.0, 0.0).is_err());
        // Wide discrete Gaussian noise is bounded in constant time (an exact computation walks
        // the support) and the bound holds: against the exact value where both are quick.
        let exact = discrete_gaussian_scale_to_accuracy(1500.0, ALPHA).unwrap();
        let bound = Mechanism::Gaussian
            .accuracy_at(1500.0, ALPHA, true)
            .unwrap();
        assert!(bound >= exact && bound <= exact + 2.0, "{bound} vs {exact}");
        let huge = Mechanism::Gaussian.accuracy_at(1e12, ALPHA, true).unwrap();
        let s = Mechanism::Gaussian.scale_for(1e12, true).unwrap();
        assert!(huge > 1.9e12 && s > 5e11);
        // Scale and accuracy are each other's inverse.
        for m in [Mechanism::Laplace, Mechanism::Gaussian] {
            for discrete in [false, true] {
                let s = m.scale_for(30.0, discrete).unwrap();
                let a = m.accuracy_at(s, ALPHA, discrete).unwrap();
                assert!((a - 30.0).abs() <= 1.0, "{m:?} {discrete}: {a}");
            }
        }
    }

    #[test]
    fn quantiles_come_from_the_candidates() {
        let values: Vec<f64> = (0..1000).map(|i| (i % 100) as f64).collect();
        let candidates: Vec<f64> = (0..=100).map(f64::from).collect();
        let (m, eps) = quantile(&values, &candidates, 0.5, 1, 1.0).unwrap();
        let (scale, scale_eps) = quantile_scale(&candidates, 0.5, 1, 1.0).unwrap();
        assert!(scale > 0.0 && scale_eps == eps);
        assert!(candidates.contains(&m));
        assert!(eps <= 1.0);
        assert!((30.0..=70.0).contains(&m), "{m}");
    }
}
