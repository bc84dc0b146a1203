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
start_date = { class = "quasi_identifier", generalize = "year" }
encounter_class = { class = "public", domain = ["wellness", "ambulatory", "outpatient", "emergency", "inpatient", "urgentcare"] }
reason_code = { class = "sensitive", domain = ["E66.9", "E11.9", "I10", "E78.5", "N18.3", "I25.10", "J45.909", "F32.9", "F41.1", "K21.9", "M54.5", "J06.9"] }
cost = { class = "sensitive", bounds = [0.0, 20000.0] }

[tables.conditions.columns]
patient_id = { class = "privacy_unit" }
onset_date = { class = "quasi_identifier", generalize = "year" }
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

// ---------------------------------------------------------------------------------------------
// Reference lists
// ---------------------------------------------------------------------------------------------

const FEMALE_NAMES: [&str; 50] = [
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Lisa",
    "Nancy",
    "Betty",
    "Margaret",
    "Sandra",
    "Ashley",
    "Kimberly",
    "Emily",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Dorothy",
    "Melissa",
    "Deborah",
    "Stephanie",
    "Rebecca",
    "Sharon",
    "Laura",
    "Cynthia",
    "Kathleen",
    "Amy",
    "Angela",
    "Shirley",
    "Anna",
    "Brenda",
    "Pamela",
    "Emma",
    "Nicole",
    "Helen",
    "Samantha",
    "Katherine",
    "Christine",
    "Debra",
    "Rachel",
    "Carolyn",
    "Janet",
    "Catherine",
    "Maria",
    "Heather",
];

const MALE_NAMES: [&str; 50] = [
    "James",
    "Robert",
    "John",
    "Michael",
    "David",
    "William",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Christopher",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Donald",
    "Steven",
    "Paul",
    "Andrew",
    "Joshua",
    "Kenneth",
    "Kevin",
    "Brian",
    "George",
    "Timothy",
    "Ronald",
    "Edward",
    "Jason",
    "Jeffrey",
    "Ryan",
    "Jacob",
    "Gary",
    "Nicholas",
    "Eric",
    "Jonathan",
    "Stephen",
    "Larry",
    "Justin",
    "Scott",
    "Brandon",
    "Benjamin",
    "Samuel",
    "Gregory",
    "Alexander",
    "Frank",
    "Patrick",
    "Raymond",
    "Jack",
    "Dennis",
    "Jerry",
];

const SURNAMES: [&str; 80] = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Gomez",
    "Phillips",
    "Evans",
    "Turner",
    "Diaz",
    "Parker",
    "Cruz",
    "Edwards",
    "Collins",
    "Reyes",
    "Stewart",
    "Morris",
    "Morales",
    "Murphy",
    "Cook",
    "Rogers",
    "Gutierrez",
    "Ortiz",
    "Morgan",
    "Cooper",
    "Peterson",
    "Bailey",
    "Reed",
    "Kelly",
    "Howard",
    "Ramos",
    "Kim",
    "Cox",
    "Ward",
    "Richardson",
];

const STREETS: [&str; 30] = [
    "Main",
    "Oak",
    "Pine",
    "Maple",
    "Cedar",
    "Elm",
    "Washington",
    "Lake",
    "Hill",
    "Park",
    "Walnut",
    "Chestnut",
    "Spruce",
    "Highland",
    "Pleasant",
    "Summer",
    "Winter",
    "School",
    "Church",
    "Union",
    "Prospect",
    "Central",
    "Forest",
    "River",
    "Water",
    "Mill",
    "Spring",
    "Center",
    "Franklin",
    "Adams",
];

const STREET_SUFFIXES: [&str; 5] = ["St", "Ave", "Rd", "Ln", "Way"];

/// The state of every patient (Synthea's default).
const STATE: &str = "MA";

/// A Massachusetts ZIP code, its town, and a population-like weight.
#[derive(Debug, Clone, Copy)]
struct Place {
    zip: &'static str,
    city: &'static str,
    weight: f64,
}

const fn place(zip: &'static str, city: &'static str, weight: f64) -> Place {
    Place { zip, city, weight }
}

static PLACES: [Place; 22] = [
    place("02108", "Boston", 20.0),
    place("01604", "Worcester", 14.0),
    place("01103", "Springfield", 12.0),
    place("02139", "Cambridge", 10.0),
    place("01852", "Lowell", 10.0),
    place("02301", "Brockton", 8.0),
    place("02169", "Quincy", 8.0),
    place("02720", "Fall River", 8.0),
    place("02740", "New Bedford", 8.0),
    place("01840", "Lawrence", 7.0),
    place("01701", "Framingham", 7.0),
    place("01960", "Peabody", 5.0),
    place("02360", "Plymouth", 5.0),
    place("01002", "Amherst", 4.0),
    place("01201", "Pittsfield", 4.0),
    place("01420", "Fitchburg", 4.0),
    place("01810", "Andover", 4.0),
    place("02476", "Arlington", 4.0),
    place("01001", "Agawam", 3.0),
    place("01060", "Northampton", 3.0),
    place("01301", "Greenfield", 2.0),
    place("02601", "Hyannis", 2.0),
];

/// Age bands (years, inclusive) and their shares: skewed adult, a few over 90.
const AGE_BANDS: [(u32, u32, f64); 5] = [
    (0, 17, 0.21),
    (18, 44, 0.36),
    (45, 64, 0.26),
    (65, 89, 0.155),
    (90, 100, 0.015),
];

const RACES: [(&str, f64); 5] = [
    ("white", 0.70),
    ("black", 0.09),
    ("asian", 0.07),
    ("native", 0.01),
    ("other", 0.13),
];

const HISPANIC_SHARE: f64 = 0.12;
const FEMALE_SHARE: f64 = 0.51;

// ---------------------------------------------------------------------------------------------
// Conditions
// ---------------------------------------------------------------------------------------------

/// The twelve conditions, in the order they are drawn (risk factors first, so that later
/// prevalences can depend on them; acute ones last, so the cap of six drops them first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cond {
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
    const ALL: [Cond; 12] = [
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
    fn code(self) -> &'static str {
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

    fn description(self) -> &'static str {
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
    fn is_acute(self) -> bool {
        self == Cond::Uri
    }

    /// The usual earliest age of onset (years).
    fn onset_age(self) -> f64 {
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
    fn prevalence(self, age: f64, has: &Has) -> f64 {
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
struct Has([bool; 12]);

impl Has {
    fn of(conditions: &[Diagnosis]) -> Has {
        let mut has = Has::default();
        for d in conditions {
            has.0[d.cond as usize] = true;
        }
        has
    }

    /// 1.0 if any of `conds` is present, else 0.0 (for additive risks).
    fn any(&self, conds: &[Cond]) -> f64 {
        if conds.iter().any(|&c| self.0[c as usize]) {
            1.0
        } else {
            0.0
        }
    }

    fn has(&self, c: Cond) -> bool {
        self.0[c as usize]
    }

    /// `f` if `c` is present, else 1.0 (for relative risks).
    fn factor(&self, c: Cond, f: f64) -> f64 {
        if self.has(c) { f } else { 1.0 }
    }
}

// ---------------------------------------------------------------------------------------------
// Encounter classes and observations
// ---------------------------------------------------------------------------------------------

/// Encounter classes: name, weight, median cost (USD) and the spread of its logarithm.
const CLASSES: [(&str, f64, f64, f64); 6] = [
    ("wellness", 0.30, 150.0, 0.35),
    ("ambulatory", 0.35, 250.0, 0.45),
    ("outpatient", 0.15, 600.0, 0.55),
    ("emergency", 0.08, 1_500.0, 0.6),
    ("inpatient", 0.04, 12_000.0, 0.6),
    ("urgentcare", 0.08, 350.0, 0.45),
];

/// The wellness class (index into [`CLASSES`]): no reason code.
const WELLNESS: usize = 0;

/// The labs and vitals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lab {
    Hba1c,
    Glucose,
    Ldl,
    Systolic,
    Bmi,
    Egfr,
}

impl Lab {
    const ALL: [Lab; 6] = [
        Lab::Hba1c,
        Lab::Glucose,
        Lab::Ldl,
        Lab::Systolic,
        Lab::Bmi,
        Lab::Egfr,
    ];

    /// Its LOINC code.
    fn code(self) -> &'static str {
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
    fn range(self) -> [f64; 2] {
        match self {
            Lab::Hba1c => [4.0, 14.0],
            Lab::Glucose => [40.0, 400.0],
            Lab::Ldl => [20.0, 300.0],
            Lab::Systolic => [70.0, 220.0],
            Lab::Bmi => [12.0, 60.0],
            Lab::Egfr => [5.0, 150.0],
        }
    }

    fn description(self) -> &'static str {
        match self {
            Lab::Hba1c => "Hemoglobin A1c/Hemoglobin.total in Blood",
            Lab::Glucose => "Glucose [Mass/volume] in Serum or Plasma",
            Lab::Ldl => "Cholesterol in LDL [Mass/volume] in Serum or Plasma",
            Lab::Systolic => "Systolic Blood Pressure",
            Lab::Bmi => "Body mass index (BMI) [Ratio]",
            Lab::Egfr => "Glomerular filtration rate/1.73 sq M.predicted",
        }
    }

    fn units(self) -> &'static str {
        match self {
            Lab::Hba1c => "%",
            Lab::Glucose | Lab::Ldl => "mg/dL",
            Lab::Systolic => "mm[Hg]",
            Lab::Bmi => "kg/m2",
            Lab::Egfr => "mL/min/1.73m2",
        }
    }

    /// How likely it is to be measured at a visit: vitals often, a condition's markers more.
    fn weight(self, has: &Has) -> f64 {
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
    fn distribution(self, age: f64, has: &Has) -> (f64, f64, i32) {
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

// ---------------------------------------------------------------------------------------------
// Drawing one patient's records
// ---------------------------------------------------------------------------------------------

/// A patient's demographics.
struct Person {
    id: String,
    first_name: &'static str,
    last_name: &'static str,
    ssn: String,
    address: String,
    place: &'static Place,
    birth: i32,
    female: bool,
    race: &'static str,
    hispanic: bool,
}

/// A condition and its onset day.
struct Diagnosis {
    cond: Cond,
    onset: i32,
}

/// An encounter.
struct Visit {
    id: String,
    start: i32,
    class: usize,
    reason: Option<Cond>,
    cost: f64,
}

/// An observation.
struct Measurement {
    day: i32,
    lab: Lab,
    value: f64,
}

/// Age in years on `day` of someone born on `birth`.
fn age_on(birth: i32, day: i32) -> f64 {
    f64::from(day - birth) / DAYS_PER_YEAR
}

/// A draw from a normal distribution (`sd` is a positive constant of this module; an invalid
/// one would give the mean).
fn normal(rng: &mut ChaCha8Rng, mean: f64, sd: f64) -> f64 {
    Normal::new(mean, sd).map_or(mean, |n| n.sample(rng))
}

/// `x` rounded to `decimals` places.
fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// The index of a weighted choice (weights non-negative, not all zero).
fn pick(rng: &mut ChaCha8Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, &w) in weights.iter().enumerate() {
        if x < w {
            return i;
        }
        x -= w;
    }
    // Rounding left x at the very top: the last positive weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// A random element of a list.
fn one_of<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// A random (version 4 style) UUID in lowercase 8-4-4-4-12 hex.
fn uuid(bits: u128) -> String {
    let v = (bits & !(0xf << 76)) | (0x4 << 76);
    let v = (v & !(0x3 << 62)) | (0x2 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        v >> 96,
        (v >> 80) & 0xffff,
        (v >> 64) & 0xffff,
        (v >> 48) & 0xffff,
        v & 0xffff_ffff_ffff
    )
}

/// A patient's demographics; `seen` keeps patient ids unique.
fn person(rng: &mut ChaCha8Rng, seen: &mut HashSet<u128>) -> Person {
    let id = loop {
        let bits = rng.random::<u128>();
        if seen.insert(bits) {
            break uuid(bits);
        }
    };
    let female = rng.random::<f64>() < FEMALE_SHARE;
    let first_name = one_of(rng, if female { &FEMALE_NAMES } else { &MALE_NAMES });
    let last_name = one_of(rng, &SURNAMES);
    let ssn = format!(
        "999-{:02}-{:04}",
        rng.random_range(10..100u32),
        rng.random_range(1000..10_000u32)
    );
    let address = format!(
        "{} {} {}",
        rng.random_range(1..10_000u32),
        one_of(rng, &STREETS),
        one_of(rng, &STREET_SUFFIXES)
    );
    let place = &PLACES[pick(rng, &PLACES.map(|p| p.weight))];
    let (lo, hi, _) = AGE_BANDS[pick(rng, &AGE_BANDS.map(|b| b.2))];
    let lo_days = ((f64::from(lo) * DAYS_PER_YEAR) as i32).max(1);
    let hi_days = (f64::from(hi + 1) * DAYS_PER_YEAR) as i32 - 1;
    let birth = REFERENCE_DAY - rng.random_range(lo_days..=hi_days);
    let race = RACES[pick(rng, &RACES.map(|r| r.1))].0;
    let hispanic = rng.random::<f64>() < HISPANIC_SHARE;
    Person {
        id,
        first_name,
        last_name,
        ssn,
        address,
        place,
        birth,
        female,
        race,
        hispanic,
    }
}

/// The patient's conditions (at most six, no code twice), with onsets.
fn conditions(rng: &mut ChaCha8Rng, p: &Person) -> Vec<Diagnosis> {
    let age = age_on(p.birth, REFERENCE_DAY);
    let mut has = Has::default();
    let mut out = Vec::new();
    for cond in Cond::ALL {
        if out.len() == MAX_CONDITIONS {
            break;
        }
        if rng.random::<f64>() < cond.prevalence(age, &has) {
            has.0[cond as usize] = true;
            let onset = onset(rng, cond, p.birth);
            out.push(Diagnosis { cond, onset });
        }
    }
    out
}

/// An onset day on or after birth and before the reference date: in the encounter window for
/// acute conditions, from the usual onset age (or half the current age, if younger) otherwise.
fn onset(rng: &mut ChaCha8Rng, cond: Cond, birth: i32) -> i32 {
    let last = REFERENCE_DAY - 1;
    let lo = if cond.is_acute() {
        birth.max(WINDOW_START)
    } else {
        let usual = (cond.onset_age() * DAYS_PER_YEAR) as i32;
        birth + usual.min((last - birth) / 2)
    };
    rng.random_range(lo..=last)
}

/// The patient's encounters in date order: more for the old and the chronically ill.
fn encounters(rng: &mut ChaCha8Rng, p: &Person, conditions: &[Diagnosis]) -> Vec<Visit> {
    let age = age_on(p.birth, REFERENCE_DAY);
    let chronic = conditions.iter().filter(|d| !d.cond.is_acute()).count();
    let age_extra = match age {
        a if a >= 65.0 => 3,
        a if a >= 45.0 => 1,
        _ => 0,
    };
    let extra = (3 + 2 * chronic + age_extra).min(MAX_ENCOUNTERS - MIN_ENCOUNTERS);
    let n = MIN_ENCOUNTERS + rng.random_range(0..=extra);
    let first = p.birth.max(WINDOW_START);
    let mut days: Vec<i32> = (0..n)
        .map(|_| rng.random_range(first..REFERENCE_DAY))
        .collect();
    days.sort_unstable();
    days.into_iter()
        .map(|start| visit(rng, start, conditions))
        .collect()
}

/// One encounter on `start`: its class, reason (a condition already present) and cost.
fn visit(rng: &mut ChaCha8Rng, start: i32, conditions: &[Diagnosis]) -> Visit {
    let id = uuid(rng.random::<u128>());
    let class = pick(rng, &CLASSES.map(|c| c.1));
    let present: Vec<Cond> = conditions
        .iter()
        .filter(|d| d.onset <= start)
        .map(|d| d.cond)
        .collect();
    let reason = if class == WELLNESS || present.is_empty() {
        None
    } else {
        Some(one_of(rng, &present))
    };
    let (_, _, median, spread) = CLASSES[class];
    let cost = median * normal(rng, 0.0, spread).exp();
    Visit {
        id,
        start,
        class,
        reason,
        cost: round(cost.clamp(0.0, MAX_COST), 2),
    }
}

/// One to three distinct labs or vitals per encounter, at most thirty per patient.
fn observations(
    rng: &mut ChaCha8Rng,
    p: &Person,
    conditions: &[Diagnosis],
    visits: &[Visit],
) -> Vec<Measurement> {
    let has = Has::of(conditions);
    let weights = Lab::ALL.map(|l| l.weight(&has));
    let mut out = Vec::new();
    for v in visits {
        let room = MAX_OBSERVATIONS - out.len();
        let n = rng
            .random_range(1..=MAX_OBSERVATIONS_PER_ENCOUNTER)
            .min(room);
        let mut left = weights;
        for _ in 0..n {
            let i = pick(rng, &left);
            left[i] = 0.0;
            let lab = Lab::ALL[i];
            let (mean, sd, decimals) = lab.distribution(age_on(p.birth, v.start), &has);
            let [lo, hi] = lab.range();
            let value = round(normal(rng, mean, sd).clamp(lo, hi), decimals);
            out.push(Measurement {
                day: v.start,
                lab,
                value,
            });
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// A table's columns being built.
trait Columns: Default {
    fn schema() -> SchemaRef;
    /// Rows buffered.
    fn rows(&self) -> usize;
    /// The buffered columns (in schema order), emptying the builders.
    fn finish(&mut self) -> Vec<ArrayRef>;
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

fn date(name: &str) -> Field {
    Field::new(name, DataType::Date32, false)
}

fn float(name: &str) -> Field {
    Field::new(name, DataType::Float64, false)
}

#[derive(Default)]
struct PatientColumns {
    patient_id: StringBuilder,
    first_name: StringBuilder,
    last_name: StringBuilder,
    ssn: StringBuilder,
    address: StringBuilder,
    city: StringBuilder,
    state: StringBuilder,
    zip: StringBuilder,
    birth_date: Date32Builder,
    sex: StringBuilder,
    race: StringBuilder,
    ethnicity: StringBuilder,
}

impl PatientColumns {
    fn push(&mut self, p: &Person) {
        self.patient_id.append_value(&p.id);
        self.first_name.append_value(p.first_name);
        self.last_name.append_value(p.last_name);
        self.ssn.append_value(&p.ssn);
        self.address.append_value(&p.address);
        self.city.append_value(p.place.city);
        self.state.append_value(STATE);
        self.zip.append_value(p.place.zip);
        self.birth_date.append_value(p.birth);
        self.sex.append_value(if p.female { "F" } else { "M" });
        self.race.append_value(p.race);
        self.ethnicity.append_value(if p.hispanic {
            "hispanic"
        } else {
            "nonhispanic"
        });
    }
}

impl Columns for PatientColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("patient_id"),
            utf8("first_name"),
            utf8("last_name"),
            utf8("ssn"),
            utf8("address"),
            utf8("city"),
            utf8("state"),
            utf8("zip"),
            date("birth_date"),
            utf8("sex"),
            utf8("race"),
            utf8("ethnicity"),
        ]))
    }

    fn rows(&self) -> usize {
        self.patient_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.patient_id.finish()),
            Arc::new(self.first_name.finish()),
            Arc::new(self.last_name.finish()),
            Arc::new(self.ssn.finish()),
            Arc::new(self.address.finish()),
            Arc::new(self.city.finish()),
            Arc::new(self.state.finish()),
            Arc::new(self.zip.finish()),
            Arc::new(self.birth_date.finish()),
            Arc::new(self.sex.finish()),
            Arc::new(self.race.finish()),
            Arc::new(self.ethnicity.finish()),
        ]
    }
}

#[derive(Default)]
struct EncounterColumns {
    encounter_id: StringBuilder,
    patient_id: StringBuilder,
    start_date: Date32Builder,
    encounter_class: StringBuilder,
    reason_code: StringBuilder,
    cost: Float64Builder,
}

impl EncounterColumns {
    fn push(&mut self, patient_id: &str, v: &Visit) {
        self.encounter_id.append_value(&v.id);
        self.patient_id.append_value(patient_id);
        self.start_date.append_value(v.start);
        self.encounter_class.append_value(CLASSES[v.class].0);
        self.reason_code.append_option(v.reason.map(Cond::code));
        self.cost.append_value(v.cost);
    }
}

impl Columns for EncounterColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("encounter_id"),
            utf8("patient_id"),
            date("start_date"),
            utf8("encounter_class"),
            Field::new("reason_code", DataType::Utf8, true),
            float("cost"),
        ]))
    }

    fn rows(&self) -> usize {
        self.encounter_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.encounter_id.finish()),
            Arc::new(self.patient_id.finish()),
            Arc::new(self.start_date.finish()),
            Arc::new(self.encounter_class.finish()),
            Arc::new(self.reason_code.finish()),
            Arc::new(self.cost.finish()),
        ]
    }
}

#[derive(Default)]
struct ConditionColumns {
    patient_id: StringBuilder,
    onset_date: Date32Builder,
    code: StringBuilder,
    description: StringBuilder,
}

impl ConditionColumns {
    fn push(&mut self, patient_id: &str, d: &Diagnosis) {
        self.patient_id.append_value(patient_id);
        self.onset_date.append_value(d.onset);
        self.code.append_value(d.cond.code());
        self.description.append_value(d.cond.description());
    }
}

impl Columns for ConditionColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("patient_id"),
            date("onset_date"),
            utf8("code"),
            utf8("description"),
        ]))
    }

    fn rows(&self) -> usize {
        self.patient_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.patient_id.finish()),
            Arc::new(self.onset_date.finish()),
            Arc::new(self.code.finish()),
            Arc::new(self.description.finish()),
        ]
    }
}

#[derive(Default)]
struct ObservationColumns {
    patient_id: StringBuilder,
    date: Date32Builder,
    code: StringBuilder,
    description: StringBuilder,
    value: Float64Builder,
    units: StringBuilder,
}

impl ObservationColumns {
    fn push(&mut self, patient_id: &str, m: &Measurement) {
        self.patient_id.append_value(patient_id);
        self.date.append_value(m.day);
        self.code.append_value(m.lab.code());
        self.description.append_value(m.lab.description());
        self.value.append_value(m.value);
        self.units.append_value(m.lab.units());
    }
}

impl Columns for ObservationColumns {
    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            utf8("patient_id"),
            date("date"),
            utf8("code"),
            utf8("description"),
            float("value"),
            utf8("units"),
        ]))
    }

    fn rows(&self) -> usize {
        self.patient_id.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.patient_id.finish()),
            Arc::new(self.date.finish()),
            Arc::new(self.code.finish()),
            Arc::new(self.description.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.units.finish()),
        ]
    }
}

/// One table's Parquet file and its buffered rows.
struct Sink<C> {
    name: &'static str,
    path: PathBuf,
    schema: SchemaRef,
    writer: ArrowWriter<File>,
    columns: C,
    rows: u64,
}

impl<C: Columns> Sink<C> {
    fn create(dir: &Path, name: &'static str) -> Result<Self> {
        let path = dir.join(format!("{name}.parquet"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let schema = C::schema();
        let writer = ArrowWriter::try_new(file, schema.clone(), None)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Sink {
            name,
            path,
            schema,
            writer,
            columns: C::default(),
            rows: 0,
        })
    }

    /// Writes the buffered rows once a batch's worth has built up (any left, if `all`).
    fn flush(&mut self, all: bool) -> Result<()> {
        let n = self.columns.rows();
        if n == 0 || (!all && n < BATCH_ROWS) {
            return Ok(());
        }
        let batch = RecordBatch::try_new(self.schema.clone(), self.columns.finish())
            .with_context(|| format!("building a batch of table {}", self.name))?;
        self.writer
            .write(&batch)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.rows += n as u64;
        Ok(())
    }

    fn close(mut self) -> Result<Table> {
        self.flush(true)?;
        self.writer
            .close()
            .with_context(|| format!("closing {}", self.path.display()))?;
        Ok(Table {
            name: self.name,
            path: self.path,
            rows: self.rows,
        })
    }
}

/// The four tables being written.
struct Sinks {
    patients: Sink<PatientColumns>,
    encounters: Sink<EncounterColumns>,
    conditions: Sink<ConditionColumns>,
    observations: Sink<ObservationColumns>,
}

impl Sinks {
    fn create(dir: &Path) -> Result<Sinks> {
        Ok(Sinks {
            patients: Sink::create(dir, "patients")?,
            encounters: Sink::create(dir, "encounters")?,
            conditions: Sink::create(dir, "conditions")?,
            observations: Sink::create(dir, "observations")?,
        })
    }

    /// Buffers one patient's rows, writing full batches.
    fn push(
        &mut self,
        p: &Person,
        conditions: &[Diagnosis],
        visits: &[Visit],
        labs: &[Measurement],
    ) -> Result<()> {
        self.patients.columns.push(p);
        for v in visits {
            self.encounters.columns.push(&p.id, v);
        }
        for d in conditions {
            self.conditions.columns.push(&p.id, d);
        }
        for m in labs {
            self.observations.columns.push(&p.id, m);
        }
        self.patients.flush(false)?;
        self.encounters.flush(false)?;
        self.conditions.flush(false)?;
        self.observations.flush(false)
    }

    fn close(self) -> Result<Vec<Table>> {
        Ok(vec![
            self.patients.close()?,
            self.encounters.close()?,
            self.conditions.close()?,
            self.observations.close()?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Date32Type, Float64Type};
    use chrono::NaiveDate;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    const NAMES: [&str; 4] = ["patients", "encounters", "conditions", "observations"];

    fn run(patients: usize, seed: u64, dir: &Path) -> Generated {
        generate(&Options { patients, seed }, dir, &mut |_| {}).unwrap()
    }

    /// A whole table, read back from its Parquet file.
    fn read(t: &Table) -> RecordBatch {
        let b = ParquetRecordBatchReaderBuilder::try_new(File::open(&t.path).unwrap()).unwrap();
        let schema = b.schema().clone();
        let batches: Vec<RecordBatch> = b.build().unwrap().map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&schema, &batches).unwrap()
    }

    fn text<'a>(b: &'a RecordBatch, c: &str) -> Vec<&'a str> {
        let a = b.column_by_name(c).unwrap().as_string::<i32>();
        assert_eq!(a.null_count(), 0, "{c}");
        a.iter().map(Option::unwrap).collect()
    }

    fn days(b: &RecordBatch, c: &str) -> Vec<i32> {
        let a = b.column_by_name(c).unwrap().as_primitive::<Date32Type>();
        assert_eq!(a.null_count(), 0, "{c}");
        a.values().to_vec()
    }

    fn floats(b: &RecordBatch, c: &str) -> Vec<f64> {
        let a = b.column_by_name(c).unwrap().as_primitive::<Float64Type>();
        assert_eq!(a.null_count(), 0, "{c}");
        a.values().to_vec()
    }

    fn count_by<'a>(ids: &[&'a str]) -> HashMap<&'a str, usize> {
        let mut n = HashMap::new();
        for id in ids {
            *n.entry(*id).or_default() += 1;
        }
        n
    }

    #[test]
    fn the_reference_dates_are_the_documented_ones() {
        let day = |y, m, d| Date32Type::from_naive_date(NaiveDate::from_ymd_opt(y, m, d).unwrap());
        assert_eq!(REFERENCE_DAY, day(2026, 1, 1));
        assert_eq!(WINDOW_START, day(2021, 1, 1));
    }

    #[test]
    fn the_same_options_give_byte_identical_files_and_another_seed_different_ones() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let mut calls = Vec::new();
        let opts = Options {
            patients: 2_500,
            seed: 7,
        };
        let ga = generate(&opts, a.path(), &mut |n| calls.push(n)).unwrap();
        assert_eq!(calls, [1_000, 2_000, 2_500]);
        let gb = run(2_500, 7, b.path());
        let gc = run(2_500, 8, c.path());
        assert_eq!(ga.tables.iter().map(|t| t.name).collect::<Vec<_>>(), NAMES);
        assert_eq!(ga.patient_ids, gb.patient_ids);
        assert_eq!(ga.diabetic, gb.diabetic);
        assert_ne!(ga.patient_ids, gc.patient_ids);
        for ((ta, tb), tc) in ga.tables.iter().zip(&gb.tables).zip(&gc.tables) {
            assert_eq!(ta.path, a.path().join(format!("{}.parquet", ta.name)));
            assert_eq!(ta.rows, tb.rows);
            let bytes = std::fs::read(&ta.path).unwrap();
            assert_eq!(bytes, std::fs::read(&tb.path).unwrap(), "{}", ta.name);
            assert_ne!(bytes, std::fs::read(&tc.path).unwrap(), "{}", ta.name);
        }
    }

    #[test]
    fn patients_out_of_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for patients in [0, MAX_PATIENTS + 1] {
            let e = generate(&Options { patients, seed: 1 }, dir.path(), &mut |_| {});
            assert!(e.unwrap_err().to_string().contains("between 1 and"));
        }
    }

    #[test]
    fn tables_have_plausible_shapes_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let g = run(500, 42, dir.path());
        let [patients, encounters, conditions, observations] =
            [0, 1, 2, 3].map(|i| read(&g.tables[i]));
        for (t, b) in g
            .tables
            .iter()
            .zip([&patients, &encounters, &conditions, &observations])
        {
            assert_eq!(t.rows, b.num_rows() as u64, "{}", t.name);
        }
        assert_eq!(patients.num_rows(), 500);
        assert!((1_500..=5_000).contains(&encounters.num_rows()));
        assert!((200..=1_500).contains(&conditions.num_rows()));
        assert!((3_000..=12_000).contains(&observations.num_rows()));

        // Patients: unique well-formed ids, in generation order; plausible demographics.
        let ids = text(&patients, "patient_id");
        assert_eq!(ids, g.patient_ids);
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        for id in &ids {
            let groups: Vec<usize> = id.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12]);
            assert!(
                id.chars()
                    .all(|c| c == '-' || matches!(c, '0'..='9' | 'a'..='f'))
            );
        }
        for ssn in text(&patients, "ssn") {
            let b = ssn.as_bytes();
            assert!(
                ssn.starts_with("999-") && b.len() == 11 && b[6] == b'-',
                "ssn shape"
            );
        }
        let zip_city: HashMap<&str, &str> = PLACES.iter().map(|p| (p.zip, p.city)).collect();
        for (zip, city) in text(&patients, "zip")
            .into_iter()
            .zip(text(&patients, "city"))
        {
            assert_eq!(zip.len(), 5);
            assert_eq!(zip_city.get(zip), Some(&city));
        }
        assert!(
            text(&patients, "zip").contains(&"01001"),
            "a leading zero ZIP"
        );
        assert!(text(&patients, "state").iter().all(|s| *s == "MA"));
        for a in text(&patients, "address") {
            let suffix = a.rsplit(' ').next().unwrap();
            assert!(STREET_SUFFIXES.contains(&suffix), "address suffix");
            assert!(
                a.split(' ').next().unwrap().parse::<u32>().is_ok(),
                "house number"
            );
        }
        let births = days(&patients, "birth_date");
        let oldest = REFERENCE_DAY - (101.0 * DAYS_PER_YEAR) as i32;
        assert!(births.iter().all(|&b| b > oldest && b < REFERENCE_DAY));
        let ages: Vec<f64> = births.iter().map(|&b| age_on(b, REFERENCE_DAY)).collect();
        let adults = ages.iter().filter(|&&a| a >= 18.0).count();
        assert!((330..=450).contains(&adults), "skewed adult");
        assert!(ages.iter().any(|&a| a >= 90.0), "a few over 90");
        let birth: HashMap<&str, i32> = ids.iter().copied().zip(births.iter().copied()).collect();

        // Conditions: known patients, no code twice, at most six, onset in life.
        let c_ids = text(&conditions, "patient_id");
        let codes = text(&conditions, "code");
        let onsets = days(&conditions, "onset_date");
        let mut per_patient: HashMap<&str, Vec<(&str, i32)>> = HashMap::new();
        for ((id, code), onset) in c_ids.iter().zip(&codes).zip(&onsets) {
            assert!((birth[id]..REFERENCE_DAY).contains(onset), "onset in life");
            per_patient.entry(id).or_default().push((code, *onset));
        }
        for list in per_patient.values() {
            assert!(list.len() <= MAX_CONDITIONS);
            let distinct: HashSet<&str> = list.iter().map(|(c, _)| *c).collect();
            assert_eq!(distinct.len(), list.len(), "a code twice for one patient");
        }
        let descriptions = text(&conditions, "description");
        for (code, description) in codes.iter().zip(descriptions) {
            let cond = Cond::ALL.iter().find(|c| c.code() == *code).unwrap();
            assert_eq!(cond.description(), description);
        }

        // Encounters: 2 to 15 per patient, in the window and in life, reasons among the
        // patient's conditions (none for wellness), costs clamped.
        let e_ids = text(&encounters, "patient_id");
        let per = count_by(&e_ids);
        assert_eq!(per.len(), 500, "every patient has encounters");
        assert!(
            per.values()
                .all(|n| (MIN_ENCOUNTERS..=MAX_ENCOUNTERS).contains(n))
        );
        let starts = days(&encounters, "start_date");
        let classes = text(&encounters, "encounter_class");
        let reasons = encounters
            .column_by_name("reason_code")
            .unwrap()
            .as_string::<i32>();
        assert!(reasons.null_count() > 0 && reasons.null_count() < reasons.len());
        let mut encounter_days: HashMap<&str, HashSet<i32>> = HashMap::new();
        for (i, id) in e_ids.iter().enumerate() {
            let start = starts[i];
            assert!(start >= WINDOW_START.max(birth[id]) && start < REFERENCE_DAY);
            assert!(CLASSES.iter().any(|c| c.0 == classes[i]));
            if let Some(reason) = reasons.iter().nth(i).unwrap() {
                assert_ne!(classes[i], "wellness");
                let conds = &per_patient[id];
                assert!(
                    conds
                        .iter()
                        .any(|(c, onset)| *c == reason && *onset <= start)
                );
            } else if classes[i] != "wellness" {
                assert!(
                    per_patient
                        .get(id)
                        .is_none_or(|l| l.iter().all(|(_, o)| *o > start))
                );
            }
            encounter_days.entry(id).or_default().insert(start);
        }
        let costs = floats(&encounters, "cost");
        assert!(costs.iter().all(|c| (0.0..=MAX_COST).contains(c)));
        let ids_set: HashSet<&str> = ids.iter().copied().collect();
        let e_unique: HashSet<&str> = text(&encounters, "encounter_id").into_iter().collect();
        assert_eq!(e_unique.len(), encounters.num_rows());

        // Observations: on the patient's encounter dates, at most 30 per patient, values
        // clamped, units and descriptions matching the code.
        let o_ids = text(&observations, "patient_id");
        assert!(count_by(&o_ids).values().all(|&n| n <= MAX_OBSERVATIONS));
        let o_days = days(&observations, "date");
        let values = floats(&observations, "value");
        let o_codes = text(&observations, "code");
        let units = text(&observations, "units");
        for (i, id) in o_ids.iter().enumerate() {
            assert!(
                encounter_days[id].contains(&o_days[i]),
                "on an encounter date"
            );
            let lab = Lab::ALL.iter().find(|l| l.code() == o_codes[i]).unwrap();
            let [lo, hi] = lab.range();
            assert!((lo..=hi).contains(&values[i]));
            assert_eq!(lab.units(), units[i]);
        }
        for id in c_ids.iter().chain(&e_ids).chain(&o_ids) {
            assert!(ids_set.contains(id), "an unknown patient id");
        }
    }

    #[test]
    fn the_data_show_what_dp_queries_should_find() {
        let dir = tempfile::tempdir().unwrap();
        let g = run(3_000, 3, dir.path());
        let diabetic: HashMap<&str, bool> = g
            .patient_ids
            .iter()
            .map(String::as_str)
            .zip(g.diabetic.iter().copied())
            .collect();
        let [patients, _, conditions, observations] = [0, 1, 2, 3].map(|i| read(&g.tables[i]));

        // `diabetic` is the E11.9 diagnosis, about one adult in ten.
        let with_e11: HashSet<&str> = text(&conditions, "patient_id")
            .into_iter()
            .zip(text(&conditions, "code"))
            .filter(|(_, c)| *c == "E11.9")
            .map(|(id, _)| id)
            .collect();
        assert!(diabetic.iter().all(|(id, &d)| d == with_e11.contains(id)));
        let age: HashMap<&str, f64> = text(&patients, "patient_id")
            .into_iter()
            .zip(days(&patients, "birth_date"))
            .map(|(id, b)| (id, age_on(b, REFERENCE_DAY)))
            .collect();
        let adults = age.values().filter(|&&a| a >= 18.0).count() as f64;
        let share = with_e11.iter().filter(|id| age[*id] >= 18.0).count() as f64 / adults;
        assert!(
            (0.06..=0.15).contains(&share),
            "diabetes among adults: {share}"
        );

        // HbA1c: diabetics well above the others.
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (mut d, mut n) = (Vec::new(), Vec::new());
        for ((id, code), v) in text(&observations, "patient_id")
            .into_iter()
            .zip(text(&observations, "code"))
            .zip(floats(&observations, "value"))
        {
            if code == "4548-4" {
                if diabetic[id] { &mut d } else { &mut n }.push(v);
            }
        }
        assert!(d.len() > 30 && n.len() > 30);
        assert!(mean(&d) - mean(&n) > 1.5, "{} vs {}", mean(&d), mean(&n));

        // Hypertension: more common over 45.
        let hypertensive: HashSet<&str> = text(&conditions, "patient_id")
            .into_iter()
            .zip(text(&conditions, "code"))
            .filter(|(_, c)| *c == "I10")
            .map(|(id, _)| id)
            .collect();
        let prevalence = |over: bool| {
            let group: Vec<&&str> = age
                .keys()
                .filter(|id| (age[**id] >= 45.0) == over)
                .collect();
            group
                .iter()
                .filter(|id| hypertensive.contains(**id))
                .count() as f64
                / group.len() as f64
        };
        let (old, young) = (prevalence(true), prevalence(false));
        assert!(old > young + 0.15, "{old} vs {young}");
        assert!((0.2..=0.5).contains(&old), "{old}");
    }

    #[test]
    fn the_policy_classifies_every_column_and_fits_the_data() {
        let policy = anonymizer::Policy::from_toml(POLICY).unwrap();
        assert_eq!(
            policy.table_bounds("observations").rows as usize,
            MAX_OBSERVATIONS
        );
        assert_eq!(
            policy.table_bounds("encounters").rows as usize,
            MAX_ENCOUNTERS
        );
        assert_eq!(
            policy.table_bounds("conditions").rows as usize,
            MAX_CONDITIONS
        );
        assert_eq!(
            policy
                .tables
                .keys()
                .map(String::as_str)
                .collect::<HashSet<_>>(),
            HashSet::from(NAMES)
        );
        let dir = tempfile::tempdir().unwrap();
        let g = run(1_000, 5, dir.path());
        let reference = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        for t in &g.tables {
            let batch = read(t);
            policy.check_schema(t.name, &batch.schema()).unwrap();
            for f in batch.schema().fields() {
                let cp = policy.column(t.name, f.name()).unwrap();
                let a = batch.column_by_name(f.name()).unwrap();
                if let Some(d) = &cp.domain {
                    anonymizer::safe_harbor::check_domain(f.name(), a, d).unwrap();
                }
                let rule =
                    anonymizer::safe_harbor::Rule::for_column(f.name(), cp, f.data_type()).unwrap();
                rule.apply(f.name(), a, reference).unwrap();
            }
        }
        // Every lab has its range as its code's bounds, and every value lies in them.
        let per_code = policy
            .column("observations", "value")
            .unwrap()
            .key_bounds
            .clone()
            .unwrap();
        for lab in Lab::ALL {
            assert_eq!(per_code[lab.code()], lab.range(), "{}", lab.code());
        }
        let obs = read(&g.tables[3]);
        for (code, v) in text(&obs, "code").into_iter().zip(floats(&obs, "value")) {
            let [lo, hi] = per_code[code];
            assert!((lo..=hi).contains(&v), "{code}: {v}");
        }
        for t in ["patients", "encounters", "conditions", "observations"] {
            let rows = policy.table_bounds(t).rows as usize;
            let most = count_by(&text(
                &read(&g.tables[NAMES.iter().position(|n| *n == t).unwrap()]),
                "patient_id",
            ))
            .into_values()
            .max()
            .unwrap();
            assert!(
                most <= rows,
                "{t}: a patient has {most} rows, the bound is {rows}"
            );
        }
    }

    #[test]
    fn large_tables_are_written_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let g = run(8_000, 11, dir.path());
        let obs = &g.tables[3];
        assert!(obs.rows > BATCH_ROWS as u64, "{} rows", obs.rows);
        for t in &g.tables {
            let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(&t.path).unwrap())
                .unwrap()
                .metadata()
                .file_metadata()
                .num_rows();
            assert_eq!(meta as u64, t.rows, "{}", t.name);
        }
        assert_eq!(g.patient_ids.len(), 8_000);
        assert_eq!(g.diabetic.len(), 8_000);
    }
}
