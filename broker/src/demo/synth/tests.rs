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
    let [patients, encounters, conditions, observations] = [0, 1, 2, 3].map(|i| read(&g.tables[i]));
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
