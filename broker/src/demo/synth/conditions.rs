//! The twelve conditions, their age- and comorbidity-dependent prevalences and onsets.

use super::*;

/// The twelve conditions, in the order they are drawn (risk factors first, so that later
/// prevalences can depend on them; acute ones last, so the cap of six drops them first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cond {
    Obesity,
    Diabetes,
    Hypertension,
    Hyperlipidemia,
    Ckd,
    Coronary,
    Asthma,
    Depression,
    Anxiety,
    Gerd,
    BackPain,
    Uri,
}

impl Cond {
    pub(super) const ALL: [Cond; 12] = [
        Cond::Obesity,
        Cond::Diabetes,
        Cond::Hypertension,
        Cond::Hyperlipidemia,
        Cond::Ckd,
        Cond::Coronary,
        Cond::Asthma,
        Cond::Depression,
        Cond::Anxiety,
        Cond::Gerd,
        Cond::BackPain,
        Cond::Uri,
    ];

    /// Its ICD-10 code.
    pub(super) fn code(self) -> &'static str {
        match self {
            Cond::Obesity => "E66.9",
            Cond::Diabetes => "E11.9",
            Cond::Hypertension => "I10",
            Cond::Hyperlipidemia => "E78.5",
            Cond::Ckd => "N18.3",
            Cond::Coronary => "I25.10",
            Cond::Asthma => "J45.909",
            Cond::Depression => "F32.9",
            Cond::Anxiety => "F41.1",
            Cond::Gerd => "K21.9",
            Cond::BackPain => "M54.5",
            Cond::Uri => "J06.9",
        }
    }

    pub(super) fn description(self) -> &'static str {
        match self {
            Cond::Obesity => "Obesity, unspecified",
            Cond::Diabetes => "Type 2 diabetes mellitus without complications",
            Cond::Hypertension => "Essential (primary) hypertension",
            Cond::Hyperlipidemia => "Hyperlipidemia, unspecified",
            Cond::Ckd => "Chronic kidney disease, stage 3 (moderate)",
            Cond::Coronary => {
                "Atherosclerotic heart disease of native coronary artery without angina pectoris"
            }
            Cond::Asthma => "Unspecified asthma, uncomplicated",
            Cond::Depression => "Major depressive disorder, single episode, unspecified",
            Cond::Anxiety => "Generalized anxiety disorder",
            Cond::Gerd => "Gastro-esophageal reflux disease without esophagitis",
            Cond::BackPain => "Low back pain",
            Cond::Uri => "Acute upper respiratory infection, unspecified",
        }
    }

    /// An acute condition: its onset falls in the encounter window.
    pub(super) fn is_acute(self) -> bool {
        self == Cond::Uri
    }

    /// The usual earliest age of onset (years).
    pub(super) fn onset_age(self) -> f64 {
        match self {
            Cond::Obesity | Cond::Asthma => 2.0,
            Cond::Depression | Cond::Anxiety => 12.0,
            Cond::Gerd => 15.0,
            Cond::BackPain => 18.0,
            Cond::Diabetes | Cond::Hypertension | Cond::Hyperlipidemia => 30.0,
            Cond::Ckd | Cond::Coronary => 45.0,
            Cond::Uri => 0.0,
        }
    }

    /// The probability of having it at `age` (years), given the conditions drawn so far.
    pub(super) fn prevalence(self, age: f64, has: &Has) -> f64 {
        let by_age = |child: f64, young: f64, middle: f64, old: f64| match age {
            a if a < 18.0 => child,
            a if a < 45.0 => young,
            a if a < 65.0 => middle,
            _ => old,
        };
        let p: f64 = match self {
            Cond::Obesity => by_age(0.10, 0.24, 0.28, 0.25),
            Cond::Diabetes => by_age(0.003, 0.03, 0.11, 0.18) * has.factor(Cond::Obesity, 1.8),
            Cond::Hypertension => {
                by_age(0.01, 0.09, 0.25, 0.42) + has.any(&[Cond::Diabetes, Cond::Obesity]) * 0.1
            }
            Cond::Hyperlipidemia => {
                by_age(0.005, 0.06, 0.22, 0.32) + has.any(&[Cond::Diabetes]) * 0.1
            }
            Cond::Ckd => {
                by_age(0.001, 0.005, 0.02, 0.10) * has.factor(Cond::Diabetes, 3.0)
                    + has.any(&[Cond::Hypertension]) * 0.03
            }
            Cond::Coronary => {
                by_age(0.0005, 0.003, 0.03, 0.12)
                    * has.factor(Cond::Diabetes, 1.8)
                    * has.factor(Cond::Hypertension, 1.5)
                    * has.factor(Cond::Hyperlipidemia, 1.3)
            }
            Cond::Asthma => by_age(0.09, 0.08, 0.08, 0.07),
            Cond::Depression => {
                if age < 12.0 {
                    0.01
                } else {
                    by_age(0.06, 0.09, 0.09, 0.08)
                }
            }
            Cond::Anxiety => {
                if age < 12.0 {
                    0.02
                } else {
                    by_age(0.07, 0.08, 0.08, 0.06)
                }
            }
            Cond::Gerd => by_age(0.02, 0.08, 0.12, 0.14) + has.any(&[Cond::Obesity]) * 0.05,
            Cond::BackPain => by_age(0.01, 0.10, 0.12, 0.12),
            Cond::Uri => by_age(0.25, 0.15, 0.14, 0.13),
        };
        p.clamp(0.0, 0.9)
    }
}

/// Which conditions a patient has, by [`Cond`] discriminant.
#[derive(Debug, Default)]
pub(super) struct Has(pub(super) [bool; 12]);

impl Has {
    pub(super) fn of(conditions: &[Diagnosis]) -> Has {
        let mut has = Has::default();
        for d in conditions {
            has.0[d.cond as usize] = true;
        }
        has
    }

    /// 1.0 if any of `conds` is present, else 0.0 (for additive risks).
    pub(super) fn any(&self, conds: &[Cond]) -> f64 {
        if conds.iter().any(|&c| self.0[c as usize]) {
            1.0
        } else {
            0.0
        }
    }

    pub(super) fn has(&self, c: Cond) -> bool {
        self.0[c as usize]
    }

    /// `f` if `c` is present, else 1.0 (for relative risks).
    pub(super) fn factor(&self, c: Cond, f: f64) -> f64 {
        if self.has(c) { f } else { 1.0 }
    }
}
