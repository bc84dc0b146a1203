//! Proposing a column policy: detecting identifier columns from their names and values.
//!
//! Each column is judged on its name (split into words: `PatientSSN` and `patient_ssn` both
//! read `patient ssn`) and on a sample of its values (evenly spread over the table, nulls left
//! out), matched against patterns for the identifier types of HIPAA Safe Harbor
//! (45 CFR 164.514(b)(2)(i)): SSNs, medical record numbers, phone and fax numbers, email
//! addresses, person names, street addresses, ZIP codes, full dates, URLs, IP addresses, device
//! and account numbers; and for ages and birth years, which Safe Harbor caps at 90.
//!
//! The result is a proposed policy (TOML, every column with a comment saying why) and the
//! findings behind it. It errs towards flagging: a telling column name flags a column even when
//! few values match. It is a proposal for the custodian to review, not a guarantee: free text
//! can hide identifiers anywhere. Findings carry counts and reasons, never values.

use std::path::Path;
use std::sync::LazyLock;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use regex::Regex;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::{ColumnClass, Domain};

/// What an identifier column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The privacy-unit id (a patient id).
    PatientId,
    /// Social Security numbers.
    Ssn,
    /// Medical record numbers.
    MedicalRecordNumber,
    /// Telephone numbers.
    Phone,
    /// Fax numbers.
    Fax,
    /// Email addresses.
    Email,
    /// Person names.
    PersonName,
    /// Street addresses.
    StreetAddress,
    /// ZIP codes.
    ZipCode,
    /// Full dates (more than a year).
    FullDate,
    /// Birth dates.
    BirthDate,
    /// Birth years.
    BirthYear,
    /// Ages.
    Age,
    /// Web URLs.
    Url,
    /// IP addresses.
    IpAddress,
    /// Device identifiers and serial numbers.
    DeviceId,
    /// Account, card, health plan and member numbers.
    AccountNumber,
}

impl Kind {
    /// A short human name.
    pub fn label(self) -> &'static str {
        match self {
            Kind::PatientId => "patient id",
            Kind::Ssn => "SSN",
            Kind::MedicalRecordNumber => "medical record number",
            Kind::Phone => "phone number",
            Kind::Fax => "fax number",
            Kind::Email => "email address",
            Kind::PersonName => "person name",
            Kind::StreetAddress => "street address",
            Kind::ZipCode => "ZIP code",
            Kind::FullDate => "full date",
            Kind::BirthDate => "birth date",
            Kind::BirthYear => "birth year",
            Kind::Age => "age",
            Kind::Url => "URL",
            Kind::IpAddress => "IP address",
            Kind::DeviceId => "device identifier",
            Kind::AccountNumber => "account number",
        }
    }

    /// The class and generalization proposed for a column of this kind and type.
    fn proposal(self, t: &DataType) -> (ColumnClass, Option<&'static str>) {
        let date = matches!(
            t,
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
        );
        match self {
            Kind::PatientId => (ColumnClass::PrivacyUnit, None),
            Kind::ZipCode if is_text(t) || t.is_integer() => {
                (ColumnClass::QuasiIdentifier, Some("zip3"))
            }
            Kind::FullDate if date || is_text(t) => (ColumnClass::QuasiIdentifier, Some("year")),
            Kind::BirthDate if date || is_text(t) => {
                (ColumnClass::QuasiIdentifier, Some("birth_date"))
            }
            Kind::BirthYear if t.is_integer() => (ColumnClass::QuasiIdentifier, Some("birth_year")),
            Kind::Age if t.is_integer() => (ColumnClass::QuasiIdentifier, Some("age")),
            _ => (ColumnClass::DirectIdentifier, None),
        }
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// What was found in one column.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// The column.
    pub column: String,
    /// Its Arrow type.
    pub data_type: String,
    /// What it holds, if it looks like an identifier.
    pub kind: Option<Kind>,
    /// The proposed class.
    pub class: ColumnClass,
    /// The proposed generalization.
    pub generalize: Option<String>,
    /// Non-null values sampled.
    pub sampled: usize,
    /// Sampled values matching the kind's pattern.
    pub matched: usize,
    /// Why, in words (counts and patterns only, never values).
    pub reasons: Vec<String>,
}

/// A proposed policy for one table and the findings behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Proposal {
    /// The table name.
    pub table: String,
    /// Rows in the table.
    pub rows: usize,
    /// The detected privacy-unit column.
    pub privacy_unit: Option<String>,
    /// One finding per column, in schema order.
    pub findings: Vec<Finding>,
    /// The proposed policy file (TOML with a comment per column).
    pub policy_toml: String,
}

/// Inspection settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Values sampled per column.
    pub sample: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options { sample: 1000 }
    }
}

fn re(p: &str) -> Regex {
    Regex::new(p).expect("the detection patterns are valid")
}

/// Column-name hints, checked in order (email before address, IP before address).
static NAME_HINTS: LazyLock<Vec<(Kind, Regex)>> = LazyLock::new(|| {
    let w = |alts: &str| re(&format!("(?:^|_)(?:{alts})(?:_|$)"));
    vec![
        (
            Kind::PatientId,
            re("^(?:patient|person|subject|participant|pat)_?(?:id|key|no|number)$"),
        ),
        (
            Kind::Ssn,
            w("ssn|social_security(?:_number|_no)?|social_security_num"),
        ),
        (
            Kind::MedicalRecordNumber,
            w("mrn|medical_record(?:_number|_no)?|med_rec(?:_no)?|chart_(?:number|no)"),
        ),
        (Kind::Fax, w("fax(?:_number|_no)?")),
        (Kind::Email, w("e_?mail(?:_address)?")),
        (Kind::IpAddress, w("ip|ip_address|ip_addr|ipv4|ipv6")),
        (
            Kind::Phone,
            w("phone(?:_number|_no)?|telephone|tel|mobile|cell_?phone"),
        ),
        (Kind::Url, w("url|uri|website|web_site|homepage")),
        (
            Kind::PersonName,
            re(
                "^(?:(?:patient|person|first|last|full|given|family|middle|maiden|mother|father|contact|next_of_kin)_)?name$|(?:^|_)(?:surname|forename|given_name|family_name|first_name|last_name)(?:_|$)",
            ),
        ),
        (
            Kind::StreetAddress,
            w("address|addr|street|street_address|address_line\\d*|residence"),
        ),
        (
            Kind::ZipCode,
            w("zip|zipcode|zip_code|zip5|postal_code|postcode"),
        ),
        (
            Kind::BirthDate,
            // OMOP's month_of_birth and day_of_birth too: a date's elements other than the
            // year are identifiers (45 CFR 164.514(b)(2)(i)(C)).
            w(
                "dob|date_of_birth|birth_date|birthdate|birthday|born_on|month_of_birth|day_of_birth|birth_month|birth_day",
            ),
        ),
        (Kind::BirthYear, w("birth_year|year_of_birth|yob")),
        (Kind::Age, re("^(?:patient_)?age(?:_years|_at_[a-z_]+)?$")),
        (
            Kind::DeviceId,
            w("device(?:_id|_serial|_number|_no)?|serial(?:_number|_no)?|imei|udi|mac_address"),
        ),
        (
            Kind::AccountNumber,
            w(
                "account(?:_number|_no)?|acct(?:_no)?|iban|card_number|credit_card|member_id|insurance_id|policy_number|health_plan(?:_id|_number)?|beneficiary(?:_id|_number)?",
            ),
        ),
        (
            Kind::FullDate,
            w("date|datetime|timestamp|dt|admitted|discharged|admit|discharge"),
        ),
    ]
});

/// Value patterns (full match on the trimmed value), by kind.
static VALUE_PATTERNS: LazyLock<Vec<(Kind, &'static str, Regex)>> = LazyLock::new(|| {
    vec![
        (Kind::Ssn, "SSN (123-45-6789)", re(r"^\d{3}-\d{2}-\d{4}$")),
        (
            Kind::Email,
            "email (name@domain.tld)",
            re(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$"),
        ),
        (
            Kind::Phone,
            "North American phone ((617) 555-0100, 617-555-0100, +1 617 555 0100)",
            re(r"^(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}$"),
        ),
        (
            Kind::Url,
            "URL (http(s)://, ftp://, www.)",
            re(r"^(?i:(?:https?|ftp)://[^\s/?#]+\S*|www\.[^\s/?#]+\.[a-z]{2,}\S*)$"),
        ),
        (
            Kind::ZipCode,
            "ZIP code (12345 or 12345-6789)",
            re(r"^\d{5}(?:-\d{4})?$"),
        ),
        (
            Kind::FullDate,
            "full date (2020-03-14, 3/14/2020, 14-Mar-2020)",
            re(
                r"^(?:\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?|\d{1,2}/\d{1,2}/\d{4}|\d{1,2}-[A-Za-z]{3}-\d{4})$",
            ),
        ),
        (
            Kind::MedicalRecordNumber,
            "medical record number (MRN 1234567)",
            re(r"^(?i:mrn|mr)[\s:#-]*\d{5,12}$"),
        ),
        (
            Kind::StreetAddress,
            "street address (number, street name, street type)",
            re(
                r"^(?i:\d{1,6}[a-z]?\s+(?:[a-z0-9.'-]+\s+){0,5}(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|ter|circle|cir|highway|hwy|parkway|pkwy|square|sq)\.?(?:,.*|\s+(?:apt|unit|suite|#)\s*\S+.*)?|p\.?\s?o\.?\s+box\s+\d+.*)$",
            ),
        ),
        (
            Kind::DeviceId,
            "device identifier (MAC address, UDI (01)…)",
            re(r"^(?:(?:[0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}|\(01\)\d{14}\S*)$"),
        ),
        (
            Kind::AccountNumber,
            "account number (IBAN, or a card number passing the Luhn check)",
            re(r"^(?:[A-Z]{2}\d{2}[A-Z0-9]{11,30}|\d{4}(?:[ -]?\d{4}){2}[ -]?\d{1,7})$"),
        ),
        (
            Kind::PersonName,
            "person name (Given Family or Family, Given, with a common given name or surname)",
            re(
                r"^[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?(?:,)?(?: [A-Z]\.?)?(?: [A-Z][a-z]+(?:[-'][A-Z][a-z]+)?){1,2}$",
            ),
        ),
    ]
});

/// Common US given names and surnames: a name-shaped value counts as a person name when one
/// of its words is here (so "Emergency Department" does not).
const COMMON_NAMES: &[&str] = &[
    "james",
    "mary",
    "robert",
    "patricia",
    "john",
    "jennifer",
    "michael",
    "linda",
    "david",
    "elizabeth",
    "william",
    "barbara",
    "richard",
    "susan",
    "joseph",
    "jessica",
    "thomas",
    "sarah",
    "charles",
    "karen",
    "christopher",
    "lisa",
    "daniel",
    "nancy",
    "matthew",
    "betty",
    "anthony",
    "margaret",
    "mark",
    "sandra",
    "donald",
    "ashley",
    "steven",
    "kimberly",
    "paul",
    "emily",
    "andrew",
    "donna",
    "joshua",
    "michelle",
    "kenneth",
    "carol",
    "kevin",
    "amanda",
    "brian",
    "dorothy",
    "george",
    "melissa",
    "timothy",
    "deborah",
    "maria",
    "jose",
    "juan",
    "luis",
    "carlos",
    "ana",
    "wei",
    "li",
    "mohammed",
    "fatima",
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
    "clark",
    "ramirez",
    "lewis",
    "robinson",
    "walker",
    "young",
    "allen",
    "king",
    "wright",
    "scott",
    "torres",
    "nguyen",
    "hill",
    "flores",
    "green",
    "adams",
    "nelson",
    "baker",
    "hall",
    "rivera",
    "campbell",
    "mitchell",
    "carter",
    "roberts",
    "chen",
    "wang",
    "kim",
    "patel",
    "khan",
    "cohen",
    "murphy",
    "kelly",
    "cooper",
    "reed",
];

fn luhn(digits: &str) -> bool {
    let ds: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&ds.len()) {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `v` is an instance of `kind` by value.
fn matches(kind: Kind, pattern: &Regex, v: &str) -> bool {
    match kind {
        Kind::IpAddress => v.parse::<std::net::IpAddr>().is_ok(),
        Kind::AccountNumber => {
            pattern.is_match(v) && (v.as_bytes()[0].is_ascii_alphabetic() || luhn(v))
        }
        Kind::PersonName => {
            pattern.is_match(v)
                && v.split([' ', ',', '-', '\''])
                    .any(|w| COMMON_NAMES.contains(&w.to_ascii_lowercase().as_str()))
        }
        _ => pattern.is_match(v),
    }
}

/// The column name as lowercase words joined by `_` (`PatientSSN` -> `patient_ssn`).
fn words(name: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = name.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_ascii_alphanumeric() {
            if !out.ends_with('_') && !out.is_empty() {
                out.push('_');
            }
            continue;
        }
        let prev = i.checked_sub(1).map(|j| chars[j]);
        let next = chars.get(i + 1);
        let boundary = c.is_ascii_uppercase()
            && prev.is_some_and(|p| {
                p.is_ascii_lowercase()
                    || p.is_ascii_digit()
                    || (p.is_ascii_uppercase() && next.is_some_and(|n| n.is_ascii_lowercase()))
            });
        if boundary && !out.ends_with('_') {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out.trim_end_matches('_').to_string()
}

/// Up to `n` non-null values of a column, evenly spread, as text.
fn sample(batches: &[RecordBatch], col: usize, n: usize) -> Result<Vec<String>> {
    let total: usize = batches
        .iter()
        .map(|b| b.num_rows() - b.column(col).null_count())
        .sum();
    let step = total.div_ceil(n.max(1)).max(1);
    let mut out = Vec::with_capacity(n.min(total));
    let mut seen = 0usize;
    for b in batches {
        let a = b.column(col);
        if a.len() == a.null_count() {
            continue;
        }
        let text = arrow::compute::cast(a, &DataType::Utf8)
            .map_err(|e| Error::Dataset(format!("column {col}: {e}")))?;
        for v in text.as_string::<i32>().iter().flatten() {
            if seen.is_multiple_of(step) && out.len() < n {
                out.push(v.trim().to_string());
            }
            seen += 1;
        }
    }
    Ok(out)
}

fn percent(m: usize, n: usize) -> usize {
    (m * 100 + n / 2).checked_div(n).unwrap_or(0)
}

/// Judges one column.
fn judge(name: &str, t: &DataType, values: &[String]) -> Finding {
    let w = words(name);
    let hint = NAME_HINTS
        .iter()
        .find(|(_, r)| r.is_match(&w))
        .map(|(k, _)| *k);
    let n = values.len();
    let count = |kind: Kind| -> (usize, &'static str) {
        match VALUE_PATTERNS.iter().find(|(k, _, _)| *k == kind) {
            Some((k, what, r)) => (values.iter().filter(|v| matches(*k, r, v)).count(), *what),
            None if kind == Kind::IpAddress => (
                values
                    .iter()
                    .filter(|v| v.parse::<std::net::IpAddr>().is_ok())
                    .count(),
                "IP address (IPv4 or IPv6)",
            ),
            None => (0, ""),
        }
    };
    let typed_date = matches!(
        t,
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
    );
    let mut reasons = Vec::new();
    let (mut kind, mut matched) = (None, 0);
    // The best value pattern over the sample.
    let mut best: Option<(Kind, usize, &'static str)> = None;
    if is_text(t) {
        let kinds = VALUE_PATTERNS
            .iter()
            .map(|(k, _, _)| *k)
            .chain([Kind::IpAddress]);
        for k in kinds {
            let (m, what) = count(k);
            if m > 0 && best.is_none_or(|(_, bm, _)| m > bm) {
                best = Some((k, m, what));
            }
        }
    }
    let share = |m: usize| m as f64 / n.max(1) as f64;
    if let Some(h) = hint {
        kind = Some(h);
        let name_reason = format!("the column name reads as {}", h.label());
        match h {
            Kind::FullDate | Kind::BirthDate if typed_date => {
                reasons.push(name_reason);
                reasons.push(format!("its type is {t}"));
                matched = n;
            }
            Kind::FullDate if !(is_text(t) && share(count(Kind::FullDate).0) >= 0.5) => {
                // "date" in a name is common and weak: it needs date values.
                kind = None;
            }
            Kind::Age | Kind::BirthYear if !t.is_integer() => {
                reasons.push(format!("{name_reason}, but its type is {t}: review"));
            }
            _ => {
                reasons.push(name_reason);
                let (m, what) = match h {
                    Kind::Fax => count(Kind::Phone),
                    Kind::BirthDate => count(Kind::FullDate),
                    _ => count(h),
                };
                matched = m;
                if !what.is_empty() && n > 0 {
                    reasons.push(format!(
                        "{}% of {n} sampled values match the {what} pattern",
                        percent(m, n)
                    ));
                }
            }
        }
    }
    if kind.is_none() {
        if typed_date {
            kind = Some(Kind::FullDate);
            matched = n;
            reasons.push(format!("its type is {t}: a full date"));
        } else if let Some((k, m, what)) = best {
            let threshold = if k == Kind::PersonName { 0.3 } else { 0.8 };
            if share(m) >= threshold {
                kind = Some(k);
                matched = m;
                reasons.push(format!(
                    "{}% of {n} sampled values match the {what} pattern",
                    percent(m, n)
                ));
            }
        }
    }
    let (class, generalize) = match kind {
        Some(k) => k.proposal(t),
        None => {
            reasons.push(
                "no identifier found: proposed sensitive; make it public with a domain for \
                 GROUP BY keys, and give bounds for sums and averages"
                    .into(),
            );
            (ColumnClass::Sensitive, None)
        }
    };
    if kind.is_some() && n == 0 && !typed_date {
        reasons.push("no non-null values to sample".into());
    }
    Finding {
        column: name.to_string(),
        data_type: t.to_string(),
        kind,
        class,
        generalize: generalize.map(str::to_string),
        sampled: n,
        matched,
        reasons,
    }
}

/// Inspects a table given as batches and proposes its policy.
pub fn inspect_batches(table: &str, batches: &[RecordBatch], opts: &Options) -> Result<Proposal> {
    let schema: SchemaRef = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| Error::Dataset(format!("table {table} has no rows")))?;
    let mut findings = Vec::with_capacity(schema.fields().len());
    for (i, f) in schema.fields().iter().enumerate() {
        let values = sample(batches, i, opts.sample)?;
        findings.push(judge(f.name(), f.data_type(), &values));
    }
    // One privacy unit: the first patient-id column; others become direct identifiers.
    let mut privacy_unit = None;
    for f in &mut findings {
        if f.class == ColumnClass::PrivacyUnit {
            if privacy_unit.is_none() {
                privacy_unit = Some(f.column.clone());
            } else {
                f.class = ColumnClass::DirectIdentifier;
                f.reasons
                    .push("another column is the privacy unit: proposed direct identifier".into());
            }
        }
    }
    // Without a patient-id column, a medical record number is the best privacy unit: it is
    // released only as a study pseudonym.
    if privacy_unit.is_none()
        && let Some(f) = findings
            .iter_mut()
            .find(|f| f.kind == Some(Kind::MedicalRecordNumber))
    {
        f.class = ColumnClass::PrivacyUnit;
        f.reasons
            .push("no patient-id column: proposed as the privacy unit".into());
        privacy_unit = Some(f.column.clone());
    }
    // Columns with no identifier: a domain when they hold few values, bounds when numeric.
    let mut shapes = Vec::with_capacity(findings.len());
    for (i, f) in findings.iter_mut().enumerate() {
        let unclassified = f.kind.is_none() && f.class == ColumnClass::Sensitive;
        // A record's own id (OMOP's measurement_id, visit_occurrence_id...): a unique number
        // per row (45 CFR 164.514(b)(2)(i)(R)). Concept ids are vocabulary codes, not ids.
        let w = words(&f.column);
        if unclassified
            && w.ends_with("_id")
            && !w.ends_with("concept_id")
            && let Some(rows) = all_distinct(batches, i)?
        {
            f.class = ColumnClass::DirectIdentifier;
            f.reasons.push(format!(
                "a row id: its name ends in _id and its {rows} values are all distinct; \
                 proposed direct identifier"
            ));
            shapes.push(Shape::default());
            continue;
        }
        let shape = if unclassified {
            value_shape(batches, i)?
        } else {
            Shape::default()
        };
        if let Some(d) = &shape.domain {
            f.reasons.push(format!(
                "{} distinct values over every row: proposed as its domain (GROUP BY releases \
                 every key; registration refuses rows outside it)",
                d.len()
            ));
        } else if shape.bounds.is_some() {
            f.reasons.push(
                "numeric: proposed bounds are its values' 1st and 99th percentiles rounded \
                 outward to two significant digits (never the exact extremes; values outside \
                 are clamped in sums and means)"
                    .into(),
            );
        }
        shapes.push(shape);
    }
    // An entity-attribute-value table: numeric columns get bounds per code where the codes'
    // ranges differ (HbA1c in [4, 14], glucose in [40, 400]: one bound for both would be
    // ten times too wide for HbA1c).
    if let Some(k) = key_column(&findings, &shapes) {
        let key = findings[k].column.clone();
        for i in 0..findings.len() {
            if shapes[i].bounds.is_none() {
                continue;
            }
            if let Some(per) = bounds_by_key(batches, i, k)? {
                findings[i].reasons.push(format!(
                    "its values' ranges differ by {key} ({} values): proposed bounds per {key}, \
                     each value's 1st and 99th percentiles rounded outward (sums and means over \
                     a value without bounds are refused)",
                    per.len()
                ));
                shapes[i].bounds = None;
                shapes[i].key_bounds = Some((key.clone(), per));
            }
        }
    }
    let rows = batches.iter().map(RecordBatch::num_rows).sum();
    let per_unit = match &privacy_unit {
        Some(u) => rows_per_unit(
            batches,
            schema
                .index_of(u)
                .map_err(|e| Error::Dataset(e.to_string()))?,
        )?,
        None => None,
    };
    // Columns with one value per patient (sex, birth year) in a table with several rows per
    // patient: a GROUP BY over them puts each patient in one group.
    if let (Some(u), Some((_, _, most))) = (&privacy_unit, per_unit)
        && most > 1
    {
        let u = schema
            .index_of(u)
            .map_err(|e| Error::Dataset(e.to_string()))?;
        let units = unit_numbers(batches, u)?;
        for (i, f) in findings.iter_mut().enumerate() {
            if matches!(
                f.class,
                ColumnClass::PrivacyUnit | ColumnClass::DirectIdentifier
            ) {
                continue;
            }
            let parts = batches
                .iter()
                .map(|b| b.column(i))
                .zip(units.iter().map(Vec::as_slice));
            let varying = crate::dataset::units_with_several_values(parts)
                .map_err(|e| Error::Dataset(e.to_string()))?;
            if varying == 0 {
                shapes[i].per_unit = true;
                f.reasons.push(
                    "one value per patient on every row (every row read): proposed per_unit \
                     (a GROUP BY over it puts a patient in one group, so patient counts by it \
                     get the noise of one group; registration refuses it if a patient has two \
                     values)"
                        .into(),
                );
            }
        }
    }
    let policy_toml = to_toml(
        table,
        rows,
        privacy_unit.as_deref(),
        per_unit,
        &findings,
        &shapes,
        opts,
    );
    Ok(Proposal {
        table: table.to_string(),
        rows,
        privacy_unit,
        findings,
        policy_toml,
    })
}

/// Reads every table of a dataset (each from one or more Parquet, CSV or Arrow IPC files) and
/// proposes each table's policy; [`merged_policy`] makes them one policy file.
pub fn inspect_tables(
    tables: &[(String, Vec<std::path::PathBuf>)],
    opts: &Options,
) -> Result<Vec<Proposal>> {
    tables
        .iter()
        .map(|(name, files)| {
            let mut batches = Vec::new();
            for f in files {
                batches.extend(crate::files::read_batches(f)?.1);
            }
            inspect_batches(name, &batches, opts)
        })
        .collect()
}

/// One policy file for several tables' proposals: the first proposal's header, then every
/// table's section. The tables must agree on the privacy unit (one column name in all).
pub fn merged_policy(proposals: &[Proposal]) -> Result<String> {
    let Some(first) = proposals.first() else {
        return Err(Error::Dataset("no table to inspect".into()));
    };
    for p in proposals {
        if p.privacy_unit != first.privacy_unit {
            return Err(Error::Policy(format!(
                "the tables disagree on the privacy unit: table {} has {}, table {} has {}; \
                 give the patient id one column name in every table",
                first.table,
                first.privacy_unit.as_deref().unwrap_or("none"),
                p.table,
                p.privacy_unit.as_deref().unwrap_or("none"),
            )));
        }
    }
    let section = |toml: &str| -> usize { toml.find("\n[tables.").map_or(toml.len(), |i| i + 1) };
    let mut out = first.policy_toml[..section(&first.policy_toml)].to_string();
    for p in proposals {
        out.push_str(&p.policy_toml[section(&p.policy_toml)..]);
        if !out.ends_with("\n\n") {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Reads a Parquet (`.parquet`), CSV (`.csv`) or Arrow IPC file and proposes its policy; the table is named
/// after the file (without extension).
pub fn inspect_file(path: &Path, opts: &Options) -> Result<Proposal> {
    let table = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let (_, batches) = crate::files::read_batches(path)?;
    inspect_batches(&table, &batches, opts)
}

/// How many rows each unit has, over every row: (median, 99th percentile, most), or `None`
/// for a table without rows.
fn rows_per_unit(batches: &[RecordBatch], unit: usize) -> Result<Option<(usize, usize, usize)>> {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for b in batches {
        let text = arrow::compute::cast(b.column(unit), &arrow::datatypes::DataType::Utf8)
            .map_err(|e| Error::Dataset(e.to_string()))?;
        for v in text.as_string::<i32>().iter().flatten() {
            match counts.get_mut(v) {
                Some(n) => *n += 1,
                None => {
                    counts.insert(v.to_owned(), 1);
                }
            }
        }
    }
    let mut n: Vec<usize> = counts.into_values().collect();
    if n.is_empty() {
        return Ok(None);
    }
    n.sort_unstable();
    let at = |q: f64| n[((n.len() - 1) as f64 * q).round() as usize];
    Ok(Some((at(0.5), at(0.99), n[n.len() - 1])))
}

/// Each row's unit as a dense number (per batch, in row order).
fn unit_numbers(batches: &[RecordBatch], unit: usize) -> Result<Vec<Vec<u32>>> {
    let mut numbers: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let text = arrow::compute::cast(b.column(unit), &DataType::Utf8)
            .map_err(|e| Error::Dataset(e.to_string()))?;
        let text = text.as_string::<i32>();
        let mut each = Vec::with_capacity(text.len());
        for v in text.iter() {
            let v = v.unwrap_or_default();
            let next = numbers.len() as u32;
            each.push(match numbers.get(v) {
                Some(n) => *n,
                None => {
                    numbers.insert(v.to_owned(), next);
                    next
                }
            });
        }
        out.push(each);
    }
    Ok(out)
}

/// The number of non-null values of column `i` when they are all distinct (and there are
/// some).
fn all_distinct(batches: &[RecordBatch], i: usize) -> Result<Option<usize>> {
    let mut seen = std::collections::HashSet::new();
    for b in batches {
        let text = arrow::compute::cast(b.column(i), &DataType::Utf8)
            .map_err(|e| Error::Dataset(e.to_string()))?;
        for v in text.as_string::<i32>().iter().flatten() {
            if !seen.insert(v.to_owned()) {
                return Ok(None);
            }
        }
    }
    Ok((!seen.is_empty()).then_some(seen.len()))
}

/// The most distinct values a proposed domain holds.
const MAX_DOMAIN: usize = 24;

/// What a column's values propose beyond its class.
#[derive(Debug, Default)]
struct Shape {
    domain: Option<Domain>,
    bounds: Option<[f64; 2]>,
    /// Bounds per value of a key column (an entity-attribute-value table's code).
    key_bounds: Option<(String, KeyBounds)>,
    /// One value per unit on every row (`per_unit`).
    per_unit: bool,
}

/// Bounds per value of a key column, in the key's order.
type KeyBounds = Vec<(String, [f64; 2])>;

/// Reads every row of column `i`: text and integer columns with at most [`MAX_DOMAIN`]
/// distinct values propose them as the domain; other numeric columns propose bounds.
fn value_shape(batches: &[RecordBatch], i: usize) -> Result<Shape> {
    let Some(t) = batches
        .first()
        .map(|b| b.schema().field(i).data_type().clone())
    else {
        return Ok(Shape::default());
    };
    let err = |e: arrow::error::ArrowError| Error::Dataset(e.to_string());
    if matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) || t.is_integer() {
        let mut seen = std::collections::BTreeSet::new();
        for b in batches {
            let text = arrow::compute::cast(b.column(i), &DataType::Utf8).map_err(err)?;
            for v in text.as_string::<i32>().iter().flatten() {
                if seen.len() > MAX_DOMAIN {
                    break;
                }
                if !seen.contains(v) {
                    seen.insert(v.to_owned());
                }
            }
        }
        if (1..=MAX_DOMAIN).contains(&seen.len()) {
            let domain = if t.is_integer() {
                let mut ints: Vec<i64> = seen.iter().filter_map(|v| v.parse().ok()).collect();
                ints.sort_unstable();
                Domain::Int(ints)
            } else {
                Domain::Text(seen.into_iter().collect())
            };
            return Ok(Shape {
                domain: Some(domain),
                ..Shape::default()
            });
        }
    }
    if !(t.is_integer() || t.is_floating()) {
        return Ok(Shape::default());
    }
    let mut values: Vec<f64> = Vec::new();
    for b in batches {
        let f = arrow::compute::cast(b.column(i), &DataType::Float64).map_err(err)?;
        values.extend(
            f.as_primitive::<arrow::datatypes::Float64Type>()
                .iter()
                .flatten()
                .filter(|v| v.is_finite()),
        );
    }
    if values.is_empty() {
        return Ok(Shape::default());
    }
    Ok(Shape {
        bounds: percentile_bounds(values),
        ..Shape::default()
    })
}

/// The 1st and 99th percentiles of `values`, rounded outward to two significant digits.
fn percentile_bounds(mut values: Vec<f64>) -> Option<[f64; 2]> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    let (lo, hi) = (outward(at(0.01), false), outward(at(0.99), true));
    (lo < hi).then_some([lo, hi])
}

/// A table's code column, if it reads as one and has a proposed text domain of at least two
/// values: `code`, `*_code`, `*_concept_id` (an entity-attribute-value table such as OMOP's
/// `measurement` or labs by LOINC code).
fn key_column(findings: &[Finding], shapes: &[Shape]) -> Option<usize> {
    findings.iter().zip(shapes).position(|(f, sh)| {
        let w = words(&f.column);
        let named = w == "code" || w.ends_with("_code") || w.ends_with("concept_id");
        named && sh.domain.as_ref().is_some_and(|d| d.len() >= 2)
    })
}

/// Bounds of numeric column `i` per value of key column `k` (each value's 1st and 99th
/// percentiles, rounded outward), when the values' ranges differ enough that one bound for
/// all would be at least twice as wide as some value's own.
fn bounds_by_key(batches: &[RecordBatch], i: usize, k: usize) -> Result<Option<KeyBounds>> {
    let err = |e: arrow::error::ArrowError| Error::Dataset(e.to_string());
    let mut by: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for b in batches {
        let keys = arrow::compute::cast(b.column(k), &DataType::Utf8).map_err(err)?;
        let values = arrow::compute::cast(b.column(i), &DataType::Float64).map_err(err)?;
        let values = values.as_primitive::<arrow::datatypes::Float64Type>();
        for (key, v) in keys.as_string::<i32>().iter().zip(values.iter()) {
            if let (Some(key), Some(v)) = (key, v)
                && v.is_finite()
            {
                by.entry(key.to_owned()).or_default().push(v);
            }
        }
    }
    let per: KeyBounds = by
        .into_iter()
        .filter_map(|(key, v)| percentile_bounds(v).map(|b| (key, b)))
        .collect();
    let (Some(lo), Some(hi)) = (
        per.iter().map(|p| p.1[0]).reduce(f64::min),
        per.iter().map(|p| p.1[1]).reduce(f64::max),
    ) else {
        return Ok(None);
    };
    let narrowest = per
        .iter()
        .map(|p| p.1[1] - p.1[0])
        .fold(f64::INFINITY, f64::min);
    Ok((per.len() >= 2 && hi - lo >= 2.0 * narrowest).then_some(per))
}

/// `x` rounded away from the inside of the bounds to two significant digits (up for an upper
/// bound, down for a lower one).
fn outward(x: f64, up: bool) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let magnitude = x.abs().log10().floor() as i32;
    let step = 10f64.powi(magnitude - 1);
    let q = x / step;
    let v = (if up { q.ceil() } else { q.floor() }) * step;
    // Printed without binary noise (0.30000000000000004 is 0.3).
    let digits = (1 - magnitude).max(0) as usize;
    format!("{v:.digits$}").parse().unwrap_or(v)
}

fn toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

fn class_name(c: ColumnClass) -> &'static str {
    match c {
        ColumnClass::PrivacyUnit => "privacy_unit",
        ColumnClass::DirectIdentifier => "direct_identifier",
        ColumnClass::QuasiIdentifier => "quasi_identifier",
        ColumnClass::Sensitive => "sensitive",
        ColumnClass::Public => "public",
    }
}

fn to_toml(
    table: &str,
    rows: usize,
    unit: Option<&str>,
    per_unit: Option<(usize, usize, usize)>,
    findings: &[Finding],
    shapes: &[Shape],
    opts: &Options,
) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Column policy proposed by `broker dataset inspect` for table {table} ({rows} rows, up \
         to {} values sampled per column).\n# Review every line before registering the dataset.",
        opts.sample
    );
    match unit {
        Some(u) => {
            let _ = writeln!(s, "privacy_unit = {}", toml::Value::String(u.to_string()));
        }
        None => {
            let _ = writeln!(
                s,
                "# No patient-id column was found: name the column that identifies a patient.\n\
                 privacy_unit = \"\""
            );
        }
    }
    let _ = writeln!(
        s,
        "# Rows one patient may contribute to a differentially private query (the default of \
         every table).\nmax_rows_per_unit = 10\n"
    );
    let _ = writeln!(s, "[tables.{}]", toml_key(table));
    match per_unit {
        Some((median, p99, most)) => {
            let _ = writeln!(
                s,
                "# Proposed from the data (every row was read): rows per patient, median {median}, \
                 99th percentile {p99}, most {most}.\n# A tighter bound drops a patient's rows \
                 past it (bias); a looser one adds noise to every answer.\n\
                 max_rows_per_unit = {}\n",
                p99.max(1)
            );
        }
        None => {
            let _ = writeln!(
                s,
                "# No rows per patient could be counted: review the bound.\n"
            );
        }
    }
    let _ = writeln!(s, "[tables.{}.columns]", toml_key(table));
    for (f, shape) in findings.iter().zip(shapes) {
        let what = f.kind.map_or("no identifier", |k| k.label());
        let _ = writeln!(s, "# {what}: {}", f.reasons.join("; "));
        let mut value = format!("class = \"{}\"", class_name(f.class));
        if let Some(g) = &f.generalize {
            let _ = write!(value, ", generalize = \"{g}\"");
        }
        match &shape.domain {
            Some(Domain::Text(v)) => {
                let keys: Vec<String> = v
                    .iter()
                    .map(|k| toml::Value::String(k.clone()).to_string())
                    .collect();
                let _ = write!(value, ", domain = [{}]", keys.join(", "));
            }
            Some(Domain::Int(v)) => {
                let keys: Vec<String> = v.iter().map(i64::to_string).collect();
                let _ = write!(value, ", domain = [{}]", keys.join(", "));
            }
            None => {}
        }
        if let Some([lo, hi]) = shape.bounds {
            let _ = write!(value, ", bounds = [{lo:?}, {hi:?}]");
        }
        if shape.per_unit {
            value.push_str(", per_unit = true");
        }
        if let Some((key, per)) = &shape.key_bounds {
            let each: Vec<String> = per
                .iter()
                .map(|(k, [lo, hi])| {
                    format!("{} = [{lo:?}, {hi:?}]", toml::Value::String(k.clone()))
                })
                .collect();
            let _ = write!(
                value,
                ", bounds_by = {}, key_bounds = {{ {} }}",
                toml::Value::String(key.clone()),
                each.join(", ")
            );
        }
        let _ = writeln!(s, "{} = {{ {value} }}", toml_key(&f.column));
    }
    s
}

impl Proposal {
    /// The findings as a text report, one line per column.
    pub fn report(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "table {}: {} rows, {} columns; privacy unit: {}",
            self.table,
            self.rows,
            self.findings.len(),
            self.privacy_unit.as_deref().unwrap_or("NOT FOUND")
        );
        let width = self
            .findings
            .iter()
            .map(|f| f.column.len())
            .max()
            .unwrap_or(0);
        for f in &self.findings {
            let mut class = class_name(f.class).to_string();
            if let Some(g) = &f.generalize {
                let _ = write!(class, " ({g})");
            }
            let _ = writeln!(
                s,
                "  {:width$}  {:<32}  {:<22}  {}",
                f.column,
                class,
                f.kind.map_or("-", |k| k.label()),
                f.reasons.join("; "),
            );
        }
        s
    }
}

#[cfg(test)]
mod tests;
