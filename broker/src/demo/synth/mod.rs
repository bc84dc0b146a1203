//! A deterministic generator of a realistic synthetic EHR data set, in the shapes of
//! [Synthea](https://github.com/synthetichealth/synthea)'s CSV export, for demos.
//!
//! [`generate`] writes four Parquet files:
//!
//! - `patients.parquet`: one row per patient: ids, names, SSNs (`999-XX-XXXX`, never real),
//!   addresses in Massachusetts towns, birth dates, sex, race and ethnicity;
//! - `encounters.parquet`: 2 to 15 visits per patient in the five years before the reference
//!   date, with a class, the condition treated and a cost;
//! - `conditions.parquet`: 0 to 6 ICD-10 diagnoses per patient out of twelve common ones, with
//!   age-dependent prevalences (diabetes, hypertension and kidney disease grow with age and
//!   with each other);
//! - `observations.parquet`: 1 to 3 labs or vitals (LOINC) per encounter, at most 30 per
//!   patient, whose values follow the patient's conditions (diabetics have a higher HbA1c...).
//!
//! Everything is drawn from one ChaCha8 generator seeded with [`Options::seed`] and consumed in
//! a fixed order, and dates are anchored to the fixed reference date 2026-01-01 (never the
//! clock), so the same [`Options`] give byte-identical files. [`POLICY`] is the column policy
//! for these tables. The randomness here is for demo data only; noise comes from OpenDP.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use arrow::array::ArrayBuilder as _;
use arrow::array::{ArrayRef, Date32Builder, Float64Builder, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Number of patients, 1 to [`MAX_PATIENTS`].
    pub patients: usize,
    /// The random seed: the same options give byte-identical files.
    pub seed: u64,
}

/// One written table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its name (`patients`, `encounters`, `conditions`, `observations`).
    pub name: &'static str,
    /// The Parquet file, `<out_dir>/<name>.parquet`.
    pub path: PathBuf,
    /// Rows written.
    pub rows: u64,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// In order: patients, encounters, conditions, observations.
    pub tables: Vec<Table>,
    /// Patient ids in generation order.
    pub patient_ids: Vec<String>,
    /// Per patient (same order): whether the patient has type 2 diabetes (E11.9).
    pub diabetic: Vec<bool>,
}

/// The most patients [`generate`] accepts.
pub const MAX_PATIENTS: usize = 1_000_000;

/// The column policy (TOML) for the generated tables.
///
/// City is a geographic unit smaller than a state (HIPAA Safe Harbor (B)) and no
/// generalization turns a town name into something releasable, so it is a direct identifier;
/// the ZIP code carries the geography as its first three digits.
pub const POLICY: &str = r#"# Column policy for the synthetic demo data set (broker::demo::synth).
privacy_unit = "patient_id"
# Rows one patient may contribute from a table, unless the table says otherwise.
max_rows_per_unit = 30

# One row per patient: counts of patients by sex, race... move by 1 per patient.
[tables.patients]
max_rows_per_unit = 1

[tables.encounters]
max_rows_per_unit = 15

[tables.conditions]
max_rows_per_unit = 6

# At most 30 labs per patient, and one in any one group (a patient's first: a per-patient
# analysis, as epidemiology usually wants; the others are dropped from that group's aggregate,
# for a third of the noise of 3 per group and a little bias).
[tables.observations]
max_rows_per_unit = 30
max_rows_per_group = 1

[tables.patients.columns]
patient_id = { class = "privacy_unit" }
first_name = { class = "direct_identifier" }
last_name = { class = "direct_identifier" }
ssn = { class = "direct_identifier" }
address = { class = "direct_identifier" }
# A town is smaller than a state and no generalization fits it: never read.
city = { class = "direct_identifier" }
state = { class = "public", domain = ["MA"] }
zip = { class = "quasi_identifier", generalize = "zip3" }
birth_date = { class = "quasi_identifier", generalize = "birth_date" }
sex = { class = "public", domain = ["F", "M"] }
race = { class = "public", domain = ["white", "black", "asian", "native", "other"] }
ethnicity = { class = "public", domain = ["hispanic", "nonhispanic"] }

[tables.encounters.columns]
encounter_id = { class = "direct_identifier" }
patient_id = { class = "privacy_unit" }
# Encounters fall in 2021-2025 (public): EXTRACT(YEAR FROM start_date) releases every year.
start_date = { class = "quasi_identifier", generalize = "year", years = [2021, 2025] }
encounter_class = { class = "public", domain = ["wellness", "ambulatory", "outpatient", "emergency", "inpatient", "urgentcare"] }
reason_code = { class = "sensitive", domain = ["E66.9", "E11.9", "I10", "E78.5", "N18.3", "I25.10", "J45.909", "F32.9", "F41.1", "K21.9", "M54.5", "J06.9"] }
cost = { class = "sensitive", bounds = [0.0, 20000.0] }

[tables.conditions.columns]
patient_id = { class = "privacy_unit" }
onset_date = { class = "quasi_identifier", generalize = "year", years = [2021, 2025] }
code = { class = "sensitive", domain = ["E66.9", "E11.9", "I10", "E78.5", "N18.3", "I25.10", "J45.909", "F32.9", "F41.1", "K21.9", "M54.5", "J06.9"] }
description = { class = "sensitive" }

[tables.observations.columns]
patient_id = { class = "privacy_unit" }
date = { class = "quasi_identifier", generalize = "year" }
code = { class = "public", domain = ["4548-4", "2345-7", "2089-1", "8480-6", "39156-5", "33914-3"] }
description = { class = "sensitive" }
# Each lab's value is clamped to its own plausible range (by LOINC code).
value = { class = "sensitive", bounds_by = "code", key_bounds = { "4548-4" = [4.0, 14.0], "2345-7" = [40.0, 400.0], "2089-1" = [20.0, 300.0], "8480-6" = [70.0, 220.0], "39156-5" = [12.0, 60.0], "33914-3" = [5.0, 150.0] } }
units = { class = "sensitive" }
"#;

/// The reference date, 2026-01-01, in days since 1970-01-01 (Arrow's Date32). Every date is
/// before it.
const REFERENCE_DAY: i32 = 20_454;

/// 2021-01-01: encounters fall in the five years from here to the reference date.
const WINDOW_START: i32 = 18_628;

const DAYS_PER_YEAR: f64 = 365.25;

/// Rows buffered per table before they are written (bounds memory).
const BATCH_ROWS: usize = 65_536;

const MAX_CONDITIONS: usize = 6;
const MIN_ENCOUNTERS: usize = 2;
const MAX_ENCOUNTERS: usize = 15;
const MAX_OBSERVATIONS: usize = 30;
const MAX_OBSERVATIONS_PER_ENCOUNTER: usize = 3;
const MAX_COST: f64 = 50_000.0;

/// Patients between two calls of `progress`.
const PROGRESS_EVERY: usize = 1_000;

/// Writes `<out_dir>/<table>.parquet` for each table. `progress(done_patients)` is called every
/// ~1000 patients and at the end (for a progress bar).
pub fn generate(
    opts: &Options,
    out_dir: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Generated> {
    ensure!(
        (1..=MAX_PATIENTS).contains(&opts.patients),
        "the number of patients must be between 1 and {MAX_PATIENTS}"
    );
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut sinks = Sinks::create(out_dir)?;
    let mut seen = HashSet::with_capacity(opts.patients);
    let mut patient_ids = Vec::with_capacity(opts.patients);
    let mut diabetic = Vec::with_capacity(opts.patients);
    for i in 0..opts.patients {
        let person = person(&mut rng, &mut seen);
        let conditions = conditions(&mut rng, &person);
        let visits = encounters(&mut rng, &person, &conditions);
        let labs = observations(&mut rng, &person, &conditions, &visits);
        sinks.push(&person, &conditions, &visits, &labs)?;
        diabetic.push(conditions.iter().any(|d| d.cond == Cond::Diabetes));
        patient_ids.push(person.id);
        let done = i + 1;
        if done % PROGRESS_EVERY == 0 || done == opts.patients {
            progress(done as u64);
        }
    }
    Ok(Generated {
        tables: sinks.close()?,
        patient_ids,
        diabetic,
    })
}

// What is generated, one module each; their items are visible here and to each other.
mod conditions;
mod draw;
mod labs;
mod names;
#[cfg(test)]
mod tests;
mod write;

use conditions::*;
use draw::*;
use labs::*;
use names::*;
use write::*;
