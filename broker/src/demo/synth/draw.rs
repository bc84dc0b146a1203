//! Drawing one patient's records: demographics, diagnoses, encounters, observations.

use super::*;

/// A patient's demographics.
pub(super) struct Person {
    pub(super) id: String,
    pub(super) first_name: &'static str,
    pub(super) last_name: &'static str,
    pub(super) ssn: String,
    pub(super) address: String,
    pub(super) place: &'static Place,
    pub(super) birth: i32,
    pub(super) female: bool,
    pub(super) race: &'static str,
    pub(super) hispanic: bool,
}

/// A condition and its onset day.
pub(super) struct Diagnosis {
    pub(super) cond: Cond,
    pub(super) onset: i32,
}

/// An encounter.
pub(super) struct Visit {
    pub(super) id: String,
    pub(super) start: i32,
    pub(super) class: usize,
    pub(super) reason: Option<Cond>,
    pub(super) cost: f64,
}

/// An observation.
pub(super) struct Measurement {
    pub(super) day: i32,
    pub(super) lab: Lab,
    pub(super) value: f64,
}

/// Age in years on `day` of someone born on `birth`.
pub(super) fn age_on(birth: i32, day: i32) -> f64 {
    f64::from(day - birth) / DAYS_PER_YEAR
}

/// A draw from a normal distribution (`sd` is a positive constant of this module; an invalid
/// one would give the mean).
pub(super) fn normal(rng: &mut ChaCha8Rng, mean: f64, sd: f64) -> f64 {
    Normal::new(mean, sd).map_or(mean, |n| n.sample(rng))
}

/// `x` rounded to `decimals` places.
pub(super) fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// The index of a weighted choice (weights non-negative, not all zero).
pub(super) fn pick(rng: &mut ChaCha8Rng, weights: &[f64]) -> usize {
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
pub(super) fn one_of<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// A random (version 4 style) UUID in lowercase 8-4-4-4-12 hex.
pub(super) fn uuid(bits: u128) -> String {
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
pub(super) fn person(rng: &mut ChaCha8Rng, seen: &mut HashSet<u128>) -> Person {
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
pub(super) fn conditions(rng: &mut ChaCha8Rng, p: &Person) -> Vec<Diagnosis> {
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
pub(super) fn onset(rng: &mut ChaCha8Rng, cond: Cond, birth: i32) -> i32 {
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
pub(super) fn encounters(rng: &mut ChaCha8Rng, p: &Person, conditions: &[Diagnosis]) -> Vec<Visit> {
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
pub(super) fn visit(rng: &mut ChaCha8Rng, start: i32, conditions: &[Diagnosis]) -> Visit {
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
pub(super) fn observations(
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
