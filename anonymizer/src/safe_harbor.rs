//! HIPAA Safe Harbor generalizations (45 CFR 164.514(b)(2)), applied to every released row.
//!
//! Of the 18 identifier types of 164.514(b)(2)(i), names, geographic units below a state,
//! telephone and fax numbers, email addresses, SSNs, medical record, health plan, account,
//! certificate, vehicle and device numbers, URLs, IP addresses, biometric identifiers, full-face
//! photographs and any other unique number (A, B, D-R) are classified `direct_identifier` in the
//! column policy and can never be read by an extract ([`crate::extract`] refuses them anywhere
//! in a plan); the privacy-unit id is replaced by a study pseudonym ([`crate::pseudonym`]). What
//! may be released in generalized form is done here, column at a time with Arrow kernels:
//!
//! - (B) ZIP codes: the first three digits, and `000` for the prefixes whose three-digit area
//!   holds 20,000 people or fewer ([`RESTRICTED_ZIP3`]);
//! - (C) dates: every date or timestamp column is reduced to its year, whatever its class;
//! - (C) ages over 89, and birth years or birth dates that allow them, become `90+`, relative to
//!   a reference date (the day of the release).
//!
//! A column's rule comes from the policy's `generalize` field ([`Rule::parse`]); rules for
//! quasi-identifiers that are not Safe Harbor's (bands, prefixes) live here too so an extract
//! has one place that turns raw values into released ones.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Int64Array, PrimitiveArray, Scalar, StringArray,
    UInt32Array,
};
use arrow::compute::kernels::{cast, cmp, substring, temporal, zip};
use arrow::datatypes::{DataType, Date32Type, Float64Type, Int64Type};
use chrono::{Datelike, NaiveDate};

use crate::error::{Error, Result};
use crate::policy::{ColumnClass, ColumnPolicy};

/// Three-digit ZIP prefixes released as `000`: those whose area had 20,000 people or fewer in
/// the 2000 Census (HHS, "Guidance Regarding Methods for De-identification", section 3.5).
pub const RESTRICTED_ZIP3: [u16; 17] = [
    36, 59, 63, 102, 203, 556, 692, 790, 821, 823, 830, 831, 878, 879, 884, 890, 893,
];

/// Ages of this value and above are released as `90+` (164.514(b)(2)(i)(C)).
pub const AGE_CAP: i64 = 90;

/// The released form of ages and birth years at or over [`AGE_CAP`].
pub const AGE_CAP_LABEL: &str = "90+";

/// How one released column is generalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Released as is (only for columns that are not dates).
    Keep,
    /// A date or timestamp reduced to its year (Int32). Text dates (`YYYY-MM-DD`) too.
    Year,
    /// A birth date reduced to its year as text, or `90+` when the person is 90 or older on
    /// the reference date.
    BirthDate,
    /// A birth year as text, or `90+` when it allows an age of 90 or more on the reference
    /// date (reference year minus birth year at least 90).
    BirthYear,
    /// An age in years as text, `90+` from 90 up.
    Age,
    /// A ZIP code's first three digits, `000` for [`RESTRICTED_ZIP3`].
    Zip3,
    /// A number replaced by the lower end of its band of this width (`band:10`: 42 -> 40).
    Band(u32),
    /// Text cut to its first characters (`prefix:3`: `E11.9` -> `E11`).
    Prefix(u32),
}

fn is_date(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
    )
}

fn is_integer(t: &DataType) -> bool {
    t.is_integer()
}

impl Rule {
    /// Parses a policy's `generalize` value: `keep`, `year`, `birth_date`, `birth_year`, `age`,
    /// `zip3`, `band:N`, `prefix:N`. Absent means `keep` (dates are still reduced to years).
    pub fn parse(text: Option<&str>) -> std::result::Result<Rule, String> {
        let Some(text) = text else {
            return Ok(Rule::Keep);
        };
        let width = |n: &str, what: &str| -> std::result::Result<u32, String> {
            match n.parse::<u32>() {
                Ok(w) if w > 0 => Ok(w),
                _ => Err(format!(
                    "{what} needs a positive whole number, e.g. {what}:10"
                )),
            }
        };
        Ok(match text {
            "keep" => Rule::Keep,
            "year" => Rule::Year,
            "birth_date" => Rule::BirthDate,
            "birth_year" => Rule::BirthYear,
            "age" => Rule::Age,
            "zip3" => Rule::Zip3,
            _ => match text.split_once(':') {
                Some(("band", n)) => Rule::Band(width(n, "band")?),
                Some(("prefix", n)) => Rule::Prefix(width(n, "prefix")?),
                _ => {
                    return Err(format!(
                        "unknown generalization {text:?}; use keep, year, birth_date, birth_year, \
                         age, zip3, band:N or prefix:N"
                    ));
                }
            },
        })
    }

    /// The rule for a column of this policy and type: the policy's, except that a date is
    /// always reduced to its year. Refuses rules that do not fit the type, naming the column.
    pub fn for_column(name: &str, cp: &ColumnPolicy, t: &DataType) -> Result<Rule> {
        let bad = |m: String| Err(Error::Policy(format!("column {name}: {m}")));
        if cp.generalize.is_some() && cp.class != ColumnClass::QuasiIdentifier {
            return bad("only quasi-identifiers have a generalization".into());
        }
        let rule = Rule::parse(cp.generalize.as_deref()).or_else(bad)?;
        let ok = match rule {
            Rule::Keep if is_date(t) => {
                if cp.generalize.is_some() {
                    return bad(
                        "a date is released only as its year (Safe Harbor); use year or birth_date"
                            .into(),
                    );
                }
                return Ok(Rule::Year);
            }
            Rule::Keep => true,
            Rule::Year => is_date(t) || is_text(t) || is_integer(t),
            Rule::BirthDate => is_date(t),
            Rule::BirthYear | Rule::Age => is_integer(t),
            Rule::Zip3 => is_text(t) || is_integer(t),
            Rule::Band(_) => is_integer(t) || t.is_floating(),
            Rule::Prefix(_) => is_text(t),
        };
        if !ok {
            return bad(format!(
                "generalization {} does not apply to a column of type {t}",
                cp.generalize.as_deref().unwrap_or("keep")
            ));
        }
        Ok(rule)
    }

    /// Applies the rule to a column. `column` names it in errors (never its values).
    pub fn apply(&self, column: &str, a: &ArrayRef, reference: NaiveDate) -> Result<ArrayRef> {
        let bad = |reason: &str| Error::BadValue {
            column: column.to_string(),
            reason: reason.to_string(),
        };
        let arrow = |e: arrow::error::ArrowError| Error::BadValue {
            column: column.to_string(),
            reason: format!("cannot generalize: {e}"),
        };
        match self {
            Rule::Keep => Ok(a.clone()),
            Rule::Year => {
                if is_integer(a.data_type()) {
                    return Ok(a.clone());
                }
                let d = to_date32(a).map_err(|_| bad("a value is not a date (YYYY-MM-DD)"))?;
                temporal::date_part(&d, temporal::DatePart::Year).map_err(arrow)
            }
            Rule::BirthDate => {
                let d = to_date32(a).map_err(arrow)?;
                let d = d.as_primitive::<Date32Type>();
                let cutoff = reference
                    .checked_sub_months(chrono::Months::new(12 * AGE_CAP as u32))
                    .ok_or_else(|| bad("the reference date is too early"))?;
                if arrow::compute::max(d).is_some_and(|m| m > days(reference)) {
                    return Err(bad("a birth date is after the reference date"));
                }
                let old = cmp::lt_eq(d, &Scalar::new(Date32Array::from(vec![days(cutoff)])))
                    .map_err(arrow)?;
                let year = temporal::date_part(d, temporal::DatePart::Year).map_err(arrow)?;
                let year = cast::cast(&year, &DataType::Utf8).map_err(arrow)?;
                let label = Scalar::new(StringArray::from(vec![AGE_CAP_LABEL]));
                zip::zip(&old, &label, &year).map_err(arrow)
            }
            Rule::BirthYear => {
                let y = to_i64(a).map_err(arrow)?;
                let r = i64::from(reference.year());
                if arrow::compute::max(&y).is_some_and(|m| m > r) {
                    return Err(bad("a birth year is after the reference date"));
                }
                // Index r - y (0..=89) into the years r..=r-89, or 90 for "90+".
                let idx: UInt32Array =
                    arrow::compute::kernels::arity::unary(&y, |v| (r - v).min(AGE_CAP) as u32);
                let labels: StringArray = (0..=AGE_CAP)
                    .map(|o| {
                        Some(if o == AGE_CAP {
                            AGE_CAP_LABEL.to_string()
                        } else {
                            (r - o).to_string()
                        })
                    })
                    .collect();
                arrow::compute::take(&labels, &idx, None).map_err(arrow)
            }
            Rule::Age => {
                let y = to_i64(a).map_err(arrow)?;
                if arrow::compute::min(&y).is_some_and(|m| m < 0) {
                    return Err(bad("an age is negative"));
                }
                let idx: UInt32Array =
                    arrow::compute::kernels::arity::unary(&y, |v| v.min(AGE_CAP) as u32);
                let labels: StringArray = (0..=AGE_CAP)
                    .map(|o| {
                        Some(if o == AGE_CAP {
                            AGE_CAP_LABEL.to_string()
                        } else {
                            o.to_string()
                        })
                    })
                    .collect();
                arrow::compute::take(&labels, &idx, None).map_err(arrow)
            }
            Rule::Zip3 => {
                let idx = zip3_index(a).ok_or_else(|| {
                    bad("a value is not a ZIP code (5 digits, or ZIP+4 as 12345-6789)")
                })?;
                let labels: StringArray = (0..1000u16)
                    .map(|z| Some(format!("{z:03}")))
                    .collect::<StringArray>();
                arrow::compute::take(&labels, &idx, None).map_err(arrow)
            }
            Rule::Band(w) => {
                let w = i64::from(*w);
                if a.data_type().is_floating() {
                    let f = cast::cast(a, &DataType::Float64).map_err(arrow)?;
                    let wf = w as f64;
                    let out: PrimitiveArray<Float64Type> = arrow::compute::kernels::arity::unary(
                        f.as_primitive::<Float64Type>(),
                        |v| (v / wf).floor() * wf,
                    );
                    return Ok(Arc::new(out));
                }
                let y = to_i64(a).map_err(arrow)?;
                let out: Int64Array =
                    arrow::compute::kernels::arity::unary(&y, |v| v.div_euclid(w) * w);
                Ok(Arc::new(out))
            }
            Rule::Prefix(n) => {
                let s = a
                    .as_string_opt::<i32>()
                    .ok_or_else(|| bad("a prefix applies to text"))?;
                Ok(Arc::new(
                    substring::substring_by_char(s, 0, Some(u64::from(*n))).map_err(arrow)?,
                ))
            }
        }
    }
}

/// Text columns as `Utf8` (Parquet readers may give `Utf8View` or `LargeUtf8`), so every rule
/// sees one text type. Other columns are returned as they are.
pub fn plain_text(a: &ArrayRef) -> Result<ArrayRef> {
    match a.data_type() {
        DataType::LargeUtf8 | DataType::Utf8View => {
            cast::cast(a, &DataType::Utf8).map_err(|e| Error::Engine(format!("text column: {e}")))
        }
        _ => Ok(a.clone()),
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn days(d: NaiveDate) -> i32 {
    Date32Type::from_naive_date(d)
}

fn to_date32(a: &ArrayRef) -> std::result::Result<ArrayRef, arrow::error::ArrowError> {
    // `safe: false`: a text value that is not a date is an error, not a silent null.
    let opts = cast::CastOptions {
        safe: false,
        ..Default::default()
    };
    cast::cast_with_options(a, &DataType::Date32, &opts)
}

fn to_i64(a: &ArrayRef) -> std::result::Result<Int64Array, arrow::error::ArrowError> {
    let opts = cast::CastOptions {
        safe: false,
        ..Default::default()
    };
    Ok(cast::cast_with_options(a, &DataType::Int64, &opts)?
        .as_primitive::<Int64Type>()
        .clone())
}

/// Each ZIP's index into `000`..`999` (restricted prefixes mapped to 0), or `None` if a value
/// is not a ZIP code. Nulls stay null.
fn zip3_index(a: &ArrayRef) -> Option<UInt32Array> {
    let mut restricted = [false; 1000];
    for z in RESTRICTED_ZIP3 {
        restricted[usize::from(z)] = true;
    }
    let map = |z: u32| if restricted[z as usize] { 0 } else { z };
    if is_integer(a.data_type()) {
        let y = to_i64(a).ok()?;
        if arrow::compute::min(&y).is_some_and(|m| m < 0)
            || arrow::compute::max(&y).is_some_and(|m| m > 99_999)
        {
            return None;
        }
        return Some(arrow::compute::kernels::arity::unary(&y, |v| {
            map((v / 100) as u32)
        }));
    }
    let s = a.as_string_opt::<i32>()?;
    let mut valid = true;
    let out: UInt32Array = s
        .iter()
        .map(|v| {
            v.map(|v| {
                let b = v.as_bytes();
                let digits = |r: &[u8]| r.iter().all(u8::is_ascii_digit);
                let ok = match b.len() {
                    5 => digits(b),
                    10 => digits(&b[..5]) && b[5] == b'-' && digits(&b[6..]),
                    _ => false,
                };
                if !ok {
                    valid = false;
                    return 0;
                }
                let z = b[..3]
                    .iter()
                    .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
                map(z)
            })
        })
        .collect();
    valid.then_some(out)
}

/// Checks a column's values against its declared domain (public GROUP BY keys): a value outside
/// it is an error naming the column (never the value). Nulls pass.
pub fn check_domain(column: &str, a: &ArrayRef, domain: &crate::policy::Domain) -> Result<()> {
    use crate::policy::Domain;
    let outside = || Error::BadValue {
        column: column.to_string(),
        reason: "a value is outside the declared domain".into(),
    };
    match domain {
        Domain::Text(keys) => {
            let keys: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
            let s = a.as_string_opt::<i32>().ok_or_else(outside)?;
            if s.iter().flatten().any(|v| !keys.contains(v)) {
                return Err(outside());
            }
        }
        Domain::Int(keys) => {
            let keys: std::collections::HashSet<i64> = keys.iter().copied().collect();
            let y = to_i64(a).map_err(|_| outside())?;
            if y.iter().flatten().any(|v| !keys.contains(&v)) {
                return Err(outside());
            }
        }
    }
    Ok(())
}

/// The column with every value outside its declared domain made NULL (a value the custodian
/// did not declare is never released; and whether one exists must not refuse a query).
pub fn within_domain(a: &ArrayRef, domain: &crate::policy::Domain) -> Result<ArrayRef> {
    use crate::policy::Domain;
    let outside: arrow::array::BooleanArray = match domain {
        Domain::Text(keys) => {
            let keys: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
            match a.as_string_opt::<i32>() {
                Some(s) => s
                    .iter()
                    .map(|v| Some(v.is_some_and(|v| !keys.contains(v))))
                    .collect(),
                None => return Ok(arrow::array::new_null_array(a.data_type(), a.len())),
            }
        }
        Domain::Int(keys) => {
            let keys: std::collections::HashSet<i64> = keys.iter().copied().collect();
            match to_i64(a) {
                Ok(y) => y
                    .iter()
                    .map(|v| Some(v.is_some_and(|v| !keys.contains(&v))))
                    .collect(),
                Err(_) => return Ok(arrow::array::new_null_array(a.data_type(), a.len())),
            }
        }
    };
    if outside.true_count() == 0 {
        return Ok(a.clone());
    }
    arrow::compute::nullif(a, &outside).map_err(|e| Error::Engine(e.to_string()))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Date32Array, Float64Array, Int32Array, Int64Array, StringArray};

    use super::*;

    fn reference() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 22).unwrap()
    }

    fn date(s: &str) -> i32 {
        days(NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap())
    }

    /// Applies `rule` to `input` and compares the released values, printed as text.
    fn check(rule: Rule, input: ArrayRef, expected: &[Option<&str>]) {
        let out = rule.apply("c", &input, reference()).unwrap();
        let text = cast::cast(&out, &DataType::Utf8).unwrap();
        let got: Vec<Option<&str>> = text.as_string::<i32>().iter().collect();
        assert_eq!(got, expected, "{rule:?}");
    }

    fn text(v: &[Option<&str>]) -> ArrayRef {
        Arc::new(StringArray::from(v.to_vec()))
    }

    #[test]
    fn zip_codes_keep_three_digits_and_restricted_prefixes_become_000() {
        let mut cases: Vec<(&str, &str)> = vec![
            ("02139", "021"),
            ("10001", "100"),
            ("94110-1234", "941"),
            ("00501", "005"),
            ("03599", "035"),
            ("03700", "037"),
        ];
        let restricted: Vec<String> = RESTRICTED_ZIP3
            .iter()
            .map(|z| format!("{z:03}45"))
            .collect();
        for z in &restricted {
            cases.push((z.as_str(), "000"));
        }
        assert_eq!(cases.len(), 6 + 17);
        let input: Vec<Option<&str>> = cases.iter().map(|(i, _)| Some(*i)).collect();
        let expected: Vec<Option<&str>> = cases.iter().map(|(_, e)| Some(*e)).collect();
        check(Rule::Zip3, text(&input), &expected);
        check(
            Rule::Zip3,
            text(&[None, Some("89301")]),
            &[None, Some("000")],
        );
        // Integer ZIPs lose their leading zeros in storage; they are restored.
        check(
            Rule::Zip3,
            Arc::new(Int64Array::from(vec![2139, 3601, 55612, 99950])),
            &[Some("021"), Some("000"), Some("000"), Some("999")],
        );
    }

    #[test]
    fn malformed_zip_codes_are_refused_naming_the_column() {
        for bad in ["2139", "021390", "0213a", "02139-12", "ABCDE"] {
            let e = Rule::Zip3
                .apply("home_zip", &text(&[Some("02139"), Some(bad)]), reference())
                .unwrap_err()
                .to_string();
            assert!(e.contains("home_zip") && !e.contains(bad), "{e}");
        }
        let e = Rule::Zip3
            .apply(
                "z",
                &(Arc::new(Int64Array::from(vec![100_000])) as ArrayRef),
                reference(),
            )
            .unwrap_err();
        assert!(matches!(e, Error::BadValue { .. }));
    }

    #[test]
    fn dates_are_reduced_to_their_year() {
        let d: ArrayRef = Arc::new(Date32Array::from(vec![
            Some(date("2020-03-04")),
            None,
            Some(date("1999-12-31")),
            Some(date("1900-01-01")),
        ]));
        check(
            Rule::Year,
            d,
            &[Some("2020"), None, Some("1999"), Some("1900")],
        );
        let ts: ArrayRef = Arc::new(arrow::array::TimestampMicrosecondArray::from(vec![
            1_600_000_000_000_000i64,
        ]));
        check(Rule::Year, ts, &[Some("2020")]);
        check(
            Rule::Year,
            text(&[Some("2021-07-01"), None]),
            &[Some("2021"), None],
        );
        assert!(
            Rule::Year
                .apply("d", &text(&[Some("July 2021")]), reference())
                .is_err()
        );
    }

    #[test]
    fn ages_over_89_become_90_plus() {
        check(
            Rule::Age,
            Arc::new(Int32Array::from(vec![
                Some(0),
                Some(45),
                Some(89),
                Some(90),
                Some(91),
                Some(120),
                None,
            ])),
            &[
                Some("0"),
                Some("45"),
                Some("89"),
                Some("90+"),
                Some("90+"),
                Some("90+"),
                None,
            ],
        );
        assert!(
            Rule::Age
                .apply(
                    "age",
                    &(Arc::new(Int32Array::from(vec![-1])) as ArrayRef),
                    reference()
                )
                .is_err()
        );
    }

    #[test]
    fn birth_years_allowing_age_90_become_90_plus() {
        // Reference year 2026: born 1937 may be 89 or 88; born 1936 may already be 90.
        check(
            Rule::BirthYear,
            Arc::new(Int64Array::from(vec![
                Some(2026),
                Some(1980),
                Some(1937),
                Some(1936),
                Some(1900),
                None,
            ])),
            &[
                Some("2026"),
                Some("1980"),
                Some("1937"),
                Some("90+"),
                Some("90+"),
                None,
            ],
        );
        assert!(
            Rule::BirthYear
                .apply(
                    "by",
                    &(Arc::new(Int64Array::from(vec![2027])) as ArrayRef),
                    reference()
                )
                .is_err()
        );
    }

    #[test]
    fn birth_dates_are_years_or_90_plus_on_the_reference_date() {
        // Reference 2026-11-22: born 1936-11-22 turned 90 that day; born a day later is 89.
        check(
            Rule::BirthDate,
            Arc::new(Date32Array::from(vec![
                Some(date("1936-11-23")),
                Some(date("1936-11-22")),
                Some(date("1936-01-01")),
                Some(date("1980-06-15")),
                None,
            ])),
            &[Some("1936"), Some("90+"), Some("90+"), Some("1980"), None],
        );
    }

    #[test]
    fn bands_and_prefixes() {
        check(
            Rule::Band(10),
            Arc::new(Int64Array::from(vec![Some(42), Some(40), Some(-3), None])),
            &[Some("40"), Some("40"), Some("-10"), None],
        );
        check(
            Rule::Band(5),
            Arc::new(Float64Array::from(vec![7.5, 10.0])),
            &[Some("5.0"), Some("10.0")],
        );
        check(
            Rule::Prefix(3),
            text(&[Some("E11.9"), Some("I1"), None]),
            &[Some("E11"), Some("I1"), None],
        );
    }

    #[test]
    fn rules_parse_and_must_fit_the_column() {
        let cp = |class, g: Option<&str>| ColumnPolicy {
            generalize: g.map(str::to_string),
            ..ColumnPolicy::of(class)
        };
        let q = ColumnClass::QuasiIdentifier;
        for (g, t, expected) in [
            (None, DataType::Utf8, Ok(Rule::Keep)),
            (None, DataType::Date32, Ok(Rule::Year)),
            (Some("zip3"), DataType::Utf8, Ok(Rule::Zip3)),
            (Some("band:5"), DataType::Int32, Ok(Rule::Band(5))),
            (Some("keep"), DataType::Date32, Err("only as its year")),
            (Some("age"), DataType::Utf8, Err("does not apply")),
            (
                Some("band:0"),
                DataType::Int32,
                Err("positive whole number"),
            ),
            (
                Some("decade"),
                DataType::Int32,
                Err("unknown generalization"),
            ),
        ] {
            let got = Rule::for_column("c", &cp(q, g), &t).map_err(|e| e.to_string());
            match (got, expected) {
                (Ok(r), Ok(e)) => assert_eq!(r, e),
                (Err(m), Err(e)) => assert!(m.contains(e) && m.contains("column c"), "{m}"),
                (got, e) => panic!("{g:?} {t}: {got:?} vs {e:?}"),
            }
        }
        // Dates are years whatever their class.
        assert_eq!(
            Rule::for_column("d", &cp(ColumnClass::Sensitive, None), &DataType::Date32).unwrap(),
            Rule::Year
        );
        assert!(
            Rule::for_column(
                "s",
                &cp(ColumnClass::Sensitive, Some("zip3")),
                &DataType::Utf8
            )
            .is_err()
        );
    }

    #[test]
    fn values_outside_declared_domains_are_refused() {
        use crate::policy::Domain;
        let d = Domain::Text(vec!["F".into(), "M".into()]);
        check_domain("sex", &text(&[Some("F"), None]), &d).unwrap();
        let e = check_domain("sex", &text(&[Some("X")]), &d).unwrap_err();
        assert!(e.to_string().contains("sex") && !e.to_string().contains("X\""));
        let d = Domain::Int(vec![1, 2]);
        check_domain(
            "site",
            &(Arc::new(Int32Array::from(vec![1, 2])) as ArrayRef),
            &d,
        )
        .unwrap();
        assert!(
            check_domain(
                "site",
                &(Arc::new(Int32Array::from(vec![3])) as ArrayRef),
                &d
            )
            .is_err()
        );
    }
}
