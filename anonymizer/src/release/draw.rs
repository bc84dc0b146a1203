//! What one statistic's noise is given, and what it gives back: the [`Noise`] trait that each
//! statistic implements in its own module (`count`, `sum`, `moments`, `quantile`).

use arrow::array::{ArrayRef, Float64Array, RecordBatch};

use super::{Sensitivity, Spending, Tally, col, floats, ints, noisy_floats, noisy_ints};
use crate::error::Result;
use crate::mechanisms::{Mechanism, Noisy};
use crate::policy::Bounds;

/// A statistic's noise: drawn over the released groups, or previewed before anything is read.
pub(super) trait Noise {
    /// Draws the statistic's noise for every released group: its values and the 95%
    /// half-width of each (before the rescaling of keyed bounds and the minimum cell size).
    fn release(&self, d: &mut Draw<'_>) -> Result<Column>;

    /// The 95% half-width the statistic would be released with, when it is the same for every
    /// group and known before anything is read (built as [`Noise::release`] builds it, drawn on
    /// zeros); `None` where it depends on the group.
    fn preview(&self, _p: &Preview<'_>) -> Result<Option<f64>> {
        Ok(None)
    }
}

/// One statistic's released column.
pub(super) struct Column {
    /// One value per released group.
    pub values: ArrayRef,
    /// The 95% half-width of each value.
    pub accuracy: Float64Array,
}

/// What a statistic's draw reads: the raw aggregate at the released groups, the noise and its
/// share of the budget, the sensitivities; where its spend is tallied.
pub(super) struct Draw<'a> {
    /// Which statistic of the query (its raw columns are `__s{index}_*`).
    pub index: usize,
    pub raw: &'a RecordBatch,
    /// The released groups' rows in `raw` (`None`: an empty public group).
    pub rows: &'a [Option<usize>],
    pub spending: Spending,
    /// Each noisy vector's share of the budget.
    pub share: f64,
    /// The enforced contribution bounds.
    pub bounds: Bounds,
    pub sensitivities: &'a [(String, Sensitivity)],
    pub tally: &'a mut Tally,
    /// Each released group's noisy size, for the minimum cell size (the first count drawn).
    pub gauge: &'a mut Option<Vec<i64>>,
}

impl Draw<'_> {
    /// The noise kind.
    pub fn mechanism(&self) -> Mechanism {
        self.spending.mechanism
    }

    fn column(&self, part: &str) -> String {
        format!("__s{}_{part}", self.index)
    }

    /// Noise on the integer raw column `__s{index}_{part}`, tallied as `what`.
    pub fn ints(&mut self, part: &str, what: &str) -> Result<Noisy<i64>> {
        let name = self.column(part);
        let n = noisy_ints(
            self.mechanism(),
            &ints(col(self.raw, &name)?, self.rows)?,
            super::sensitivity_of(self.sensitivities, &name)?,
            self.share,
        )?;
        self.record(what, n.scale, n.loss);
        Ok(n)
    }

    /// Noise on the float raw column `__s{index}_{part}`, tallied as `what`.
    pub fn floats(&mut self, part: &str, what: &str) -> Result<Noisy<f64>> {
        let name = self.column(part);
        let n = noisy_floats(
            self.mechanism(),
            &floats(col(self.raw, &name)?, self.rows)?,
            super::sensitivity_of(self.sensitivities, &name)?,
            self.share,
        )?;
        self.record(what, n.scale, n.loss);
        Ok(n)
    }

    fn record(&mut self, what: &str, scale: f64, loss: f64) {
        let what = format!("{what} {}", self.index);
        self.tally.record(self.mechanism(), &what, scale, loss);
    }

    /// Offers noisy group sizes to the minimum cell size (kept if none came before).
    pub fn gauge(&mut self, sizes: &[i64]) {
        self.gauge.get_or_insert_with(|| sizes.to_vec());
    }

    /// How many groups are released.
    pub fn groups(&self) -> usize {
        self.rows.len()
    }
}

/// What a preview reads: the statistic's sensitivities and share, no row.
pub(super) struct Preview<'a> {
    pub index: usize,
    pub mechanism: Mechanism,
    pub share: f64,
    pub sensitivities: &'a [(String, Sensitivity)],
}

impl Preview<'_> {
    /// The 95% half-width of integer noise on `__s{index}_{part}`.
    pub fn ints(&self, part: &str) -> Result<f64> {
        let name = format!("__s{}_{part}", self.index);
        let s = super::sensitivity_of(self.sensitivities, &name)?;
        Ok(noisy_ints(self.mechanism, &[0], s, self.share)?.accuracy)
    }

    /// The 95% half-width of float noise on `__s{index}_{part}`.
    pub fn floats(&self, part: &str) -> Result<f64> {
        let name = format!("__s{}_{part}", self.index);
        let s = super::sensitivity_of(self.sensitivities, &name)?;
        Ok(noisy_floats(self.mechanism, &[0.0], s, self.share)?.accuracy)
    }
}
