//! Encounter classes and the labs and vitals (LOINC) observed in them, with the values
//! they take given a patient's conditions.

use super::*;

/// Encounter classes: name, weight, median cost (USD) and the spread of its logarithm.
pub(super) const CLASSES: [(&str, f64, f64, f64); 6] = [
    ("wellness", 0.30, 150.0, 0.35),
    ("ambulatory", 0.35, 250.0, 0.45),
    ("outpatient", 0.15, 600.0, 0.55),
    ("emergency", 0.08, 1_500.0, 0.6),
    ("inpatient", 0.04, 12_000.0, 0.6),
    ("urgentcare", 0.08, 350.0, 0.45),
];

/// The wellness class (index into [`CLASSES`]): no reason code.
pub(super) const WELLNESS: usize = 0;

/// The labs and vitals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lab {
    Hba1c,
    Glucose,
    Ldl,
    Systolic,
    Bmi,
    Egfr,
}

impl Lab {
    pub(super) const ALL: [Lab; 6] = [
        Lab::Hba1c,
        Lab::Glucose,
        Lab::Ldl,
        Lab::Systolic,
        Lab::Bmi,
        Lab::Egfr,
    ];

    /// Its LOINC code.
    pub(super) fn code(self) -> &'static str {
        match self {
            Lab::Hba1c => "4548-4",
            Lab::Glucose => "2345-7",
            Lab::Ldl => "2089-1",
            Lab::Systolic => "8480-6",
            Lab::Bmi => "39156-5",
            Lab::Egfr => "33914-3",
        }
    }

    /// The plausible range its values are drawn in (the policy's bounds for its code).
    pub(super) fn range(self) -> [f64; 2] {
        match self {
            Lab::Hba1c => [4.0, 14.0],
            Lab::Glucose => [40.0, 400.0],
            Lab::Ldl => [20.0, 300.0],
            Lab::Systolic => [70.0, 220.0],
            Lab::Bmi => [12.0, 60.0],
            Lab::Egfr => [5.0, 150.0],
        }
    }

    pub(super) fn description(self) -> &'static str {
        match self {
            Lab::Hba1c => "Hemoglobin A1c/Hemoglobin.total in Blood",
            Lab::Glucose => "Glucose [Mass/volume] in Serum or Plasma",
            Lab::Ldl => "Cholesterol in LDL [Mass/volume] in Serum or Plasma",
            Lab::Systolic => "Systolic Blood Pressure",
            Lab::Bmi => "Body mass index (BMI) [Ratio]",
            Lab::Egfr => "Glomerular filtration rate/1.73 sq M.predicted",
        }
    }

    pub(super) fn units(self) -> &'static str {
        match self {
            Lab::Hba1c => "%",
            Lab::Glucose | Lab::Ldl => "mg/dL",
            Lab::Systolic => "mm[Hg]",
            Lab::Bmi => "kg/m2",
            Lab::Egfr => "mL/min/1.73m2",
        }
    }

    /// How likely it is to be measured at a visit: vitals often, a condition's markers more.
    pub(super) fn weight(self, has: &Has) -> f64 {
        match self {
            Lab::Hba1c => has.factor(Cond::Diabetes, 4.0),
            Lab::Glucose => has.factor(Cond::Diabetes, 2.0),
            Lab::Ldl => has.factor(Cond::Hyperlipidemia, 3.0),
            Lab::Systolic => 3.0 * has.factor(Cond::Hypertension, 1.5),
            Lab::Bmi => 2.0 * has.factor(Cond::Obesity, 1.5),
            Lab::Egfr => has.factor(Cond::Ckd, 4.0),
        }
    }

    /// Mean and standard deviation of the value at `age` (years) for a patient with `has`,
    /// and the decimals it is recorded with.
    pub(super) fn distribution(self, age: f64, has: &Has) -> (f64, f64, i32) {
        let adult_years = (age - 20.0).max(0.0);
        match self {
            Lab::Hba1c if has.has(Cond::Diabetes) => (7.8, 1.3, 1),
            Lab::Hba1c => (5.4, 0.4, 1),
            Lab::Glucose if has.has(Cond::Diabetes) => (160.0, 45.0, 0),
            Lab::Glucose => (95.0, 12.0, 0),
            Lab::Ldl if has.has(Cond::Hyperlipidemia) => (160.0, 35.0, 0),
            Lab::Ldl => (105.0 + 0.3 * adult_years, 28.0, 0),
            Lab::Systolic => {
                let base = if age < 18.0 {
                    95.0 + age
                } else {
                    112.0 + 0.4 * adult_years
                };
                (base + has.any(&[Cond::Hypertension]) * 20.0, 12.0, 0)
            }
            Lab::Bmi if age < 18.0 => (15.0 + 0.5 * age + has.any(&[Cond::Obesity]) * 7.0, 2.5, 1),
            Lab::Bmi if has.has(Cond::Obesity) => (35.0, 4.5, 1),
            Lab::Bmi => (26.0, 3.5, 1),
            Lab::Egfr if has.has(Cond::Ckd) => (45.0, 8.0, 0),
            Lab::Egfr => ((115.0 - 0.8 * adult_years).max(60.0), 12.0, 0),
        }
    }
}
