//! Privacy accounting of one (study, dataset) account: what its receipts spent, and whether a
//! further spend fits the IRB's grant of (epsilon, delta).
//!
//! Two accountants run side by side over the same receipts:
//! - **basic composition** (pure and approximate DP): epsilons add, deltas add. It holds
//!   while every receipt is pure or approximate DP (Laplace noise, Laplace partition
//!   selection, the exponential mechanism).
//! - **zero-concentrated DP** (zCDP): every receipt debits its rho (a Gaussian query's own; a
//!   pure query's epsilon counts as `rho = epsilon² / 2`), and the total converts to an
//!   epsilon at the grant's conversion delta by OpenDP's conversion
//!   (`ZeroConcentratedDivergence::convert`).
//!
//! A spend fits if, after it, either accountant stays within the grant. The grant's delta is
//! split in two halves: one for approximate mechanisms (partition selection), one for the
//! zCDP-to-(epsilon, delta) conversion. That split is what makes the "either" sound under an
//! adaptive researcher: an account leaves basic composition for good once it takes a Gaussian
//! receipt or passes the epsilon of the grant (the condition is monotone), so each released
//! transcript follows one of two interactions, one filtered by basic composition (epsilon
//! bounded pointwise outside the approximate mechanisms' bad events) and one by zCDP; the bad
//! events of both weigh at most half the delta, the conversion the other half. The decision
//! depends on receipts' declared spends only, never on data.

use opendp::combinators::ConcentratedMeasure;
use opendp::measures::ZeroConcentratedDivergence;
use serde::Serialize;

/// What one receipt, or an account's receipts together, spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Spend {
    /// Epsilon of the pure and approximate parts (Laplace, partition selection, quantiles).
    pub epsilon: f64,
    /// Delta of the approximate parts (partition selection).
    pub delta: f64,
    /// Rho (zCDP) of everything: Gaussian parts and `epsilon² / 2` per pure part.
    pub rho: f64,
    /// Whether any part is Gaussian (only zCDP accounts for it).
    pub concentrated: bool,
}

impl Spend {
    /// A pure or approximate DP spend (no Gaussian part).
    pub fn pure(epsilon: f64, delta: f64) -> Spend {
        Spend {
            epsilon,
            delta,
            rho: epsilon * epsilon / 2.0,
            concentrated: false,
        }
    }

    /// A spend with Gaussian parts: `rho` covers every part (the pure parts' `epsilon² / 2`
    /// included), `epsilon` and `delta` are those of the pure and approximate parts.
    pub fn concentrated(epsilon: f64, delta: f64, rho: f64) -> Spend {
        Spend {
            epsilon,
            delta,
            rho,
            concentrated: true,
        }
    }

    /// The spend a receipt records: with a rho, a concentrated one; without (every receipt
    /// before zCDP accounting, and every pure one), pure.
    pub fn of_receipt(epsilon: f64, delta: f64, rho: Option<f64>) -> Spend {
        match rho {
            Some(rho) => Spend::concentrated(epsilon, delta, rho),
            None => Spend::pure(epsilon, delta),
        }
    }

    /// This spend and `other` together.
    pub fn plus(&self, other: &Spend) -> Spend {
        Spend {
            epsilon: self.epsilon + other.epsilon,
            delta: self.delta + other.delta,
            rho: self.rho + other.rho,
            concentrated: self.concentrated || other.concentrated,
        }
    }
}

/// The epsilon that `rho`-zCDP amounts to at `delta`, by OpenDP's conversion; `None` if it
/// cannot convert (delta 0, or a value out of range).
pub fn zcdp_epsilon(rho: f64, delta: f64) -> Option<f64> {
    if !(rho.is_finite() && rho >= 0.0 && delta > 0.0 && delta < 1.0) {
        return None;
    }
    if rho == 0.0 {
        return Some(0.0);
    }
    // The conversion is exact arithmetic (milliseconds); a search asks for the same point
    // twice in a row (its rule, then its margin), so the last answer is kept per thread.
    type Memo = Option<((u64, u64), Option<f64>)>;
    thread_local! {
        static LAST: std::cell::Cell<Memo> = const { std::cell::Cell::new(None) };
    }
    let key = (rho.to_bits(), delta.to_bits());
    if let Some((k, e)) = LAST.with(std::cell::Cell::get)
        && k == key
    {
        return e;
    }
    let e = ZeroConcentratedDivergence::convert(rho)
        .ok()
        .and_then(|p| p.epsilon(delta).ok())
        .filter(|e| e.is_finite());
    LAST.with(|c| c.set(Some((key, e))));
    e
}

/// One account: the grant and what was spent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Account {
    /// Epsilon granted.
    pub epsilon: f64,
    /// Delta granted.
    pub delta: f64,
    /// Spent so far.
    pub spent: Spend,
}

/// The (epsilon, delta) guarantee an account's spend amounts to, and which accountant gave it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Guarantee {
    /// Epsilon.
    pub epsilon: f64,
    /// Delta.
    pub delta: f64,
    /// `"basic"` (epsilons and deltas added) or `"zcdp"` (rho converted).
    pub accountant: &'static str,
}

impl Account {
    /// An account granted (`epsilon`, `delta`) with nothing spent yet.
    pub fn new(epsilon: f64, delta: f64) -> Account {
        Account {
            epsilon,
            delta,
            spent: Spend::default(),
        }
    }

    /// The delta approximate mechanisms may spend in all: half the grant.
    pub fn approximate_delta(&self) -> f64 {
        self.delta / 2.0
    }

    /// The delta at which the account's rho converts to an epsilon: the other half.
    pub fn conversion_delta(&self) -> f64 {
        self.delta / 2.0
    }

    // No tolerance in the caller's favour: the sums (f64 sums of the receipts' spends) must be
    // within the grant, and a spend must move the sum its accountant reads (`counts`), so that
    // no spend too small to register is free.

    fn basic_holds(&self, s: &Spend) -> bool {
        !s.concentrated && s.epsilon <= self.epsilon && s.delta <= self.approximate_delta()
    }

    fn zcdp_holds(&self, s: &Spend) -> bool {
        s.delta <= self.approximate_delta()
            && zcdp_epsilon(s.rho, self.conversion_delta()).is_some_and(|e| e <= self.epsilon)
    }

    /// Whether the account, after spending `cost` too, still composes by adding epsilons and
    /// deltas within its grant (no Gaussian receipt, epsilons within the grant's).
    pub fn adds_up(&self, cost: &Spend) -> bool {
        counts(self.spent.epsilon, cost.epsilon)
            && counts(self.spent.delta, cost.delta)
            && self.basic_holds(&self.spent.plus(cost))
    }

    /// Whether the account, after spending `cost` too, stays within its grant.
    pub fn admits(&self, cost: &Spend) -> bool {
        let after = self.spent.plus(cost);
        counts(self.spent.delta, cost.delta)
            && ((counts(self.spent.epsilon, cost.epsilon) && self.basic_holds(&after))
                || (counts(self.spent.rho, cost.rho) && self.zcdp_holds(&after)))
    }

    /// The guarantee the spend so far amounts to: the tighter of the accountants that hold
    /// (for an account over its grant, which only a grant changed after the spend can make,
    /// the zCDP one when it converts, else basic composition).
    pub fn guarantee(&self) -> Guarantee {
        let s = &self.spent;
        let basic = (!s.concentrated).then_some(Guarantee {
            epsilon: s.epsilon,
            delta: s.delta,
            accountant: "basic",
        });
        let zcdp = zcdp_epsilon(s.rho, self.conversion_delta()).map(|e| Guarantee {
            epsilon: e,
            delta: s.delta + self.conversion_delta(),
            accountant: "zcdp",
        });
        match (basic, zcdp) {
            (Some(b), Some(z)) if z.epsilon < b.epsilon => z,
            (Some(b), _) => b,
            (None, Some(z)) => z,
            (None, None) => Guarantee {
                epsilon: f64::INFINITY,
                delta: s.delta,
                accountant: "zcdp",
            },
        }
    }

    /// The largest epsilon one more pure query (no delta) may spend.
    pub fn epsilon_left(&self) -> f64 {
        let basic = if self.spent.concentrated {
            0.0
        } else {
            (self.epsilon - self.spent.epsilon).max(0.0)
        };
        let zcdp_fits = |e: f64| self.zcdp_holds(&self.spent.plus(&Spend::pure(e, 0.0)));
        // zCDP can only beat adding epsilons if it admits what adding still does (its rule
        // is monotone in e): one conversion settles the usual case.
        if basic > 0.0 && !zcdp_fits(basic) {
            return basic;
        }
        let zcdp = largest(self.epsilon.max(0.0), zcdp_fits, |e| {
            self.zcdp_margin(self.spent.plus(&Spend::pure(e, 0.0)).rho)
        });
        basic.max(zcdp)
    }

    /// The largest rho one more Gaussian query (no delta) may spend.
    pub fn rho_left(&self) -> f64 {
        largest(
            self.epsilon.max(0.0),
            |rho| self.admits(&Spend::concentrated(0.0, 0.0, rho)),
            |rho| self.zcdp_margin(self.spent.rho + rho),
        )
    }

    /// How far a total of `rho` converts below the granted epsilon (negative above it): what
    /// [`largest`] steers by (the rule it returns by is the exact one).
    fn zcdp_margin(&self, rho: f64) -> Option<f64> {
        zcdp_epsilon(rho, self.conversion_delta()).map(|e| self.epsilon - e)
    }

    /// The delta approximate mechanisms may still spend.
    pub fn delta_left(&self) -> f64 {
        (self.approximate_delta() - self.spent.delta).max(0.0)
    }
}

/// Whether adding `part` to `sum` moves it: a positive part too small to change the f64 sum
/// would be spent without being counted.
fn counts(sum: f64, part: f64) -> bool {
    part == 0.0 || sum + part > sum
}

/// The largest `x` in `[0, hi]` with `fits(x)`, for a `fits` that holds below some point and
/// fails above it (0 if even 0 fails). `margin(x)`, continuous and decreasing, is positive
/// where `fits` holds and negative past it: the search steers by it (regula falsi, Illinois
/// variant: a handful of OpenDP conversions where bisection took sixty, which made each query's
/// budget header cost about a fifth of a second), and bisects where it says nothing. The
/// answer is always a point where `fits` holds, within 1e-10 of the crossing (relative).
fn largest(hi: f64, fits: impl Fn(f64) -> bool, margin: impl Fn(f64) -> Option<f64>) -> f64 {
    if !fits(0.0) {
        return 0.0;
    }
    if fits(hi) {
        return hi;
    }
    let (mut lo, mut hi) = (0.0_f64, hi);
    let (mut m_lo, mut m_hi) = (margin(lo), margin(hi));
    // Which end was kept last (Illinois: halve the kept end's weight when it repeats).
    let mut kept = 0i8;
    for _ in 0..200 {
        if hi - lo <= 1e-10 * hi.max(f64::MIN_POSITIVE) {
            break;
        }
        let mid = match (m_lo, m_hi) {
            (Some(a), Some(b)) if a > 0.0 && b < 0.0 => {
                let x = lo + (hi - lo) * a / (a - b);
                // Stay strictly inside, away from the ends.
                let pad = (hi - lo) * 1e-3;
                x.clamp(lo + pad, hi - pad)
            }
            _ => (lo + hi) / 2.0,
        };
        if fits(mid) {
            lo = mid;
            m_lo = margin(mid);
            if kept == 1 {
                m_hi = m_hi.map(|b| b / 2.0);
            }
            kept = 1;
        } else {
            hi = mid;
            m_hi = margin(mid);
            if kept == -1 {
                m_lo = m_lo.map(|a| a / 2.0);
            }
            kept = -1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(epsilon: f64, delta: f64) -> Account {
        Account::new(epsilon, delta)
    }

    fn spend(a: &mut Account, s: Spend) -> bool {
        let ok = a.admits(&s);
        if ok {
            a.spent = a.spent.plus(&s);
        }
        ok
    }

    #[test]
    fn pure_queries_compose_by_addition_until_zcdp_is_tighter() {
        let mut a = account(1.0, 1e-6);
        assert!(spend(&mut a, Spend::pure(0.5, 0.0)));
        assert!(spend(&mut a, Spend::pure(0.5, 0.0)));
        // Basic composition is exactly spent; one large query more converts far above 1.
        assert!(!a.admits(&Spend::pure(0.1, 0.0)));
        assert_eq!(a.guarantee().accountant, "basic");
        // Many small pure queries: zCDP admits far more than their sum of epsilons.
        let mut b = account(1.0, 1e-6);
        let mut n = 0;
        while spend(&mut b, Spend::pure(0.01, 0.0)) {
            n += 1;
            assert!(n < 10_000);
        }
        assert!(n > 150, "{n} queries of epsilon 0.01 under (1, 1e-6)");
        let g = b.guarantee();
        assert_eq!(g.accountant, "zcdp");
        assert!(g.epsilon <= 1.0 + 1e-9 && g.delta <= 1e-6, "{g:?}");
    }

    #[test]
    fn no_spend_is_free_once_the_grant_is_spent() {
        // Spent exactly to the grant, then dust: each is refused, the spend never moves past
        // the grant (an absolute tolerance let 5 of 5 queries at 1e-12 through).
        let mut a = account(0.5, 1e-6);
        assert!(spend(&mut a, Spend::pure(0.5, 0.0)));
        for dust in [1e-12, 1e-15, 1e-17, 1e-300, f64::MIN_POSITIVE] {
            assert!(!spend(&mut a, Spend::pure(dust, 0.0)), "{dust}");
            assert!(
                !spend(&mut a, Spend::concentrated(0.0, 0.0, dust)),
                "{dust}"
            );
        }
        assert_eq!(a.spent.epsilon, 0.5);
        // Below the grant, a spend too small to move the sum is refused too: it would be
        // taken and never counted, however many times.
        let mut b = account(1.0, 1e-6);
        assert!(spend(&mut b, Spend::pure(0.75, 0.0)));
        let before = b.spent;
        assert!(!spend(&mut b, Spend::pure(1e-17, 0.0)));
        assert!(spend(&mut b, Spend::pure(1e-9, 0.0)));
        assert!(b.spent.epsilon > before.epsilon);
        // Deltas too: the approximate half of 1e-6 is 5e-7.
        let mut c = account(1.0, 1e-6);
        assert!(spend(&mut c, Spend::pure(0.1, 5e-7)));
        assert!(!spend(&mut c, Spend::pure(0.1, 1e-20)));
        assert!(!spend(&mut c, Spend::pure(0.1, 1e-30)));
    }

    #[test]
    fn decimal_shares_of_a_grant_add_up_to_it() {
        // What researchers do: ten queries of 0.1 under a grant of 1 (the f64 sum is
        // 0.9999999999999999), four of 0.25, and so on; the next one is refused.
        for (share, n) in [(0.1, 10), (0.25, 4), (0.2, 5), (0.5, 2)] {
            let mut a = account(1.0, 1e-6);
            for i in 0..n {
                assert!(spend(&mut a, Spend::pure(share, 0.0)), "{share} x {i}");
            }
            assert!(a.spent.epsilon <= 1.0);
            assert!(!spend(&mut a, Spend::pure(share, 0.0)), "{share} x {n} + 1");
        }
    }

    #[test]
    fn a_gaussian_query_leaves_basic_composition_for_good() {
        let mut a = account(1.0, 1e-6);
        let rho = a.rho_left();
        // The whole grant in rho, converted at half the delta by OpenDP's (tight) conversion:
        // about 0.023, more than the 0.017 of the closed-form rho + 2 sqrt(rho ln(1/delta)).
        assert!((0.02..0.025).contains(&rho), "{rho}");
        assert!(spend(&mut a, Spend::concentrated(0.0, 0.0, rho / 2.0)));
        // A pure query of epsilon 0.5 fits basic composition of an empty account, but not this
        // one: its rho (0.125) is far more than what is left.
        assert!(!a.admits(&Spend::pure(0.5, 0.0)));
        assert!(a.epsilon_left() < 0.2, "{}", a.epsilon_left());
        assert!(spend(
            &mut a,
            Spend::concentrated(0.0, 0.0, rho / 2.0 * 0.999)
        ));
        assert!(!a.admits(&Spend::concentrated(0.0, 0.0, rho / 100.0)));
        // A grant without delta cannot convert: no Gaussian query.
        let pure = account(1.0, 0.0);
        assert!(!pure.admits(&Spend::concentrated(0.0, 0.0, 1e-9)));
        assert!(pure.admits(&Spend::pure(1.0, 0.0)));
        assert!(!pure.admits(&Spend::pure(0.1, 1e-9)));
    }

    #[test]
    fn approximate_mechanisms_spend_half_the_delta() {
        let a = account(1.0, 1e-6);
        assert!(a.admits(&Spend::pure(0.1, 5e-7)));
        assert!(!a.admits(&Spend::pure(0.1, 6e-7)));
        assert_eq!(a.delta_left(), 5e-7);
    }

    /// 100 Gaussian queries (sensitivity 1, scale 50) composed by OpenDP itself and converted
    /// by OpenDP at the conversion delta give the epsilon the account reports, and the account
    /// admits exactly as many as fit the grant.
    #[test]
    fn the_account_agrees_with_opendps_composition() {
        use opendp::combinators::{make_composition, make_zCDP_to_approxDP};
        use opendp::domains::AtomDomain;
        use opendp::measurements::make_gaussian;
        use opendp::metrics::AbsoluteDistance;
        let one = || {
            make_gaussian::<_, _, ZeroConcentratedDivergence>(
                AtomDomain::<f64>::new_non_nan(),
                AbsoluteDistance::<f64>::default(),
                50.0,
                None,
            )
            .unwrap()
        };
        let rho_one = one().map(&1.0).unwrap();
        assert!((rho_one - 1.0 / 5000.0).abs() < 1e-12, "{rho_one}");
        let composed = make_composition((0..100).map(|_| one()).collect()).unwrap();
        let rho_all = composed.map(&1.0).unwrap();
        let eps_all = make_zCDP_to_approxDP(composed)
            .unwrap()
            .map(&1.0)
            .unwrap()
            .epsilon(5e-7)
            .unwrap();
        let mut a = account(1.0, 1e-6);
        for _ in 0..100 {
            assert!(spend(&mut a, Spend::concentrated(0.0, 0.0, rho_one)));
        }
        assert!((a.spent.rho - rho_all).abs() < 1e-12);
        let g = a.guarantee();
        assert_eq!(g.accountant, "zcdp");
        assert!((g.epsilon - eps_all).abs() < 1e-9, "{g:?} vs {eps_all}");
        assert_eq!(g.delta, 5e-7);
        // The grant holds what its rho converts to, and no query more.
        let fit = (a.rho_left() / rho_one).floor() as usize;
        for _ in 0..fit {
            assert!(spend(&mut a, Spend::concentrated(0.0, 0.0, rho_one)));
        }
        assert!(!spend(&mut a, Spend::concentrated(0.0, 0.0, rho_one)));
        assert!(a.guarantee().epsilon <= 1.0 + 1e-12);
        // Basic composition of the same 100 queries, had they been Laplace at the same rho
        // (epsilon sqrt(2 rho) each), would have been 2: zCDP is what makes them affordable.
        assert!(100.0 * (2.0 * rho_one).sqrt() > 1.9);
    }

    #[test]
    fn the_conversion_is_opendps() {
        // Against the closed-form bound rho + 2 sqrt(rho ln(1/delta)), which OpenDP's
        // conversion improves on, and monotone in rho.
        for rho in [1e-4, 1e-3, 0.0175, 0.5] {
            let e = zcdp_epsilon(rho, 1e-6).unwrap();
            let bound = rho + 2.0 * (rho * (1e6f64).ln()).sqrt();
            assert!(e <= bound && e > 0.7 * bound, "{rho}: {e} vs {bound}");
            assert!(zcdp_epsilon(rho * 1.01, 1e-6).unwrap() > e);
        }
        assert_eq!(zcdp_epsilon(0.0, 1e-6), Some(0.0));
        assert_eq!(zcdp_epsilon(0.1, 0.0), None);
        assert_eq!(zcdp_epsilon(f64::NAN, 1e-6), None);
    }

    /// The steered search finds what sixty bisections found, always at a point that fits,
    /// with a fraction of the conversions.
    #[test]
    fn the_steered_search_agrees_with_bisection_and_converts_far_less() {
        fn bisect(hi: f64, fits: impl Fn(f64) -> bool) -> f64 {
            if !fits(0.0) {
                return 0.0;
            }
            if fits(hi) {
                return hi;
            }
            let (mut lo, mut hi) = (0.0, hi);
            for _ in 0..60 {
                let mid = (lo + hi) / 2.0;
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            lo
        }
        for (grant, delta, spent_rho) in [
            (1.0, 1e-6, 0.0),
            (1.0, 1e-6, 0.001),
            (10.0, 1e-6, 0.5),
            (0.5, 1e-9, 0.0001),
            (3.0, 1e-5, 0.2),
        ] {
            let a = Account {
                epsilon: grant,
                delta,
                spent: Spend::concentrated(0.0, 0.0, spent_rho),
            };
            let calls = std::cell::Cell::new(0u32);
            let fits = |rho: f64| {
                calls.set(calls.get() + 1);
                a.admits(&Spend::concentrated(0.0, 0.0, rho))
            };
            let steered = largest(grant, fits, |rho| {
                calls.set(calls.get() + 1);
                a.zcdp_margin(a.spent.rho + rho)
            });
            // A rule and a margin at the same point share one conversion.
            let steered_calls = calls.replace(0) / 2;
            let reference = bisect(grant, fits);
            let bisect_calls = calls.get();
            assert!(
                (steered - reference).abs() <= 1e-9 * reference.max(1e-12),
                "{grant} {delta} {spent_rho}: {steered} vs {reference}"
            );
            assert!(a.admits(&Spend::concentrated(0.0, 0.0, steered)));
            assert_eq!(steered, a.rho_left());
            assert!(
                steered_calls * 3 < bisect_calls,
                "{steered_calls} conversions vs {bisect_calls}"
            );
        }
    }

    /// `epsilon_left`'s shortcut (one conversion when adding epsilons leaves more) gives what
    /// the full search gives, on accounts where either accountant wins.
    #[test]
    fn epsilon_left_takes_the_better_accountant_with_or_without_the_shortcut() {
        // Adding wins (the shortcut), zCDP wins (many small queries: the search), nothing spent.
        for (grant, n, each) in [
            (10.0, 5, 0.5),
            (1.0, 400, 0.002),
            (1.0, 9000, 0.0001),
            (1.0, 10_000, 0.0001),
            (2.0, 0, 0.0),
        ] {
            let mut a = account(grant, 1e-6);
            for _ in 0..n {
                a.spent = a.spent.plus(&Spend::pure(each, 0.0));
            }
            let basic = (a.epsilon - a.spent.epsilon).max(0.0);
            let full = largest(
                a.epsilon,
                |e| a.zcdp_holds(&a.spent.plus(&Spend::pure(e, 0.0))),
                |e| a.zcdp_margin(a.spent.plus(&Spend::pure(e, 0.0)).rho),
            )
            .max(basic);
            let left = a.epsilon_left();
            assert!(
                (left - full).abs() <= 1e-9 * full.max(1e-12),
                "{grant} {n}: {left} vs {full}"
            );
            assert!(a.admits(&Spend::pure(left, 0.0)), "{grant} {n}");
            if n >= 9000 {
                assert!(
                    left > basic,
                    "zCDP gives more than adding: {left} vs {basic}"
                );
            }
        }
    }
}
