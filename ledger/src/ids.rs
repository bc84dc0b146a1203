//! Validated identifiers and units: principals, datasets, studies, subjects, roles and times.
//!
//! Every identifier is checked once, when it enters the ledger (deserialization goes through
//! the same constructor), so the rest of the crate can rely on it.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct InvalidValue {
    /// What kind of value was refused ("principal id", "timestamp", ...).
    pub what: &'static str,
    /// Why, without echoing the value itself (it may be personal data).
    pub reason: String,
}

fn invalid(what: &'static str, reason: impl Into<String>) -> InvalidValue {
    InvalidValue {
        what,
        reason: reason.into(),
    }
}

/// A name usable as a principal, dataset or study id: 1 to 64 characters from
/// `[A-Za-z0-9._-]`, starting with a letter or digit. Principal ids are also signed-note key
/// names, which must not contain `+` or spaces; this alphabet satisfies that.
fn check_name(what: &'static str, s: &str) -> Result<(), InvalidValue> {
    if s.is_empty() || s.len() > 64 {
        return Err(invalid(what, "must be 1 to 64 characters"));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(what, "must start with a letter or digit"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            what,
            "may contain only letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidValue> {
                let s = s.into();
                $check($what, &s)?;
                Ok(Self(s))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl std::str::FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A principal's id: also the name of its signed-note key.
    PrincipalId, "principal id", check_name
);
name_type!(
    /// A dataset's id (stable across versions).
    DatasetId, "dataset id", check_name
);
name_type!(
    /// A study's id.
    StudyId, "study id", check_name
);

/// A privacy-unit id (a patient) exactly as it appears in the datasets: 1 to 256 bytes of
/// printable text. It is personal data: it never appears in error messages or logs.
fn check_subject(what: &'static str, s: &str) -> Result<(), InvalidValue> {
    if s.is_empty() || s.len() > 256 {
        return Err(invalid(what, "must be 1 to 256 bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(what, "must not contain control characters"));
    }
    Ok(())
}

name_type!(
    /// A privacy-unit id (a patient) as it appears in the datasets.
    SubjectId, "subject id", check_subject
);

/// What a principal may do. Roles are fixed at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the broker and the ledger; writes receipts and registers principals.
    Operator,
    /// A data custodian (hospital): registers datasets, records consents for its subjects.
    Custodian,
    /// An institutional review board: approves, suspends and closes studies.
    Irb,
    /// Queries within the studies that list them.
    Researcher,
    /// A trial sponsor: reads receipts and bundles of its studies.
    Sponsor,
    /// A patient: manages their own consent.
    Patient,
    /// Cosigns checkpoints.
    Witness,
}

impl Role {
    /// The role's name as written in entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Custodian => "custodian",
            Role::Irb => "irb",
            Role::Researcher => "researcher",
            Role::Sponsor => "sponsor",
            Role::Patient => "patient",
            Role::Witness => "witness",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A UTC instant with one-second resolution, written as RFC 3339 `YYYY-MM-DDTHH:MM:SSZ`.
/// Only that exact form is accepted, so every instant has one canonical text.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current time, truncated to the second.
    pub fn now() -> Self {
        Self(Utc::now().timestamp())
    }
    /// From Unix seconds; refuses instants outside years 1970..=9999.
    pub fn from_unix(secs: i64) -> Result<Self, InvalidValue> {
        // 253402300799 = 9999-12-31T23:59:59Z
        if !(0..=253_402_300_799).contains(&secs) {
            return Err(invalid("timestamp", "must be between 1970 and 9999"));
        }
        Ok(Self(secs))
    }
    /// Unix seconds.
    pub fn unix(self) -> i64 {
        self.0
    }
    /// Parses the canonical RFC 3339 form.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        if let Some(t) = Self::parse_canonical(s.as_bytes()) {
            return Ok(t);
        }
        // Anything else (including every refusal) goes through chrono.
        let dt = DateTime::parse_from_rfc3339(s)
            .map_err(|_| invalid("timestamp", "must be RFC 3339, e.g. 2026-01-31T12:00:00Z"))?;
        let t = Self::from_unix(dt.timestamp())?;
        if t.to_string() != s {
            return Err(invalid(
                "timestamp",
                "must be UTC with whole seconds, written YYYY-MM-DDTHH:MM:SSZ",
            ));
        }
        Ok(t)
    }
    /// The fast path of [`Timestamp::parse`]: exactly `YYYY-MM-DDTHH:MM:SSZ` naming a real
    /// instant from 1970 on, or `None` (the caller then decides with chrono).
    fn parse_canonical(s: &[u8]) -> Option<Self> {
        let shape = s.len() == 20
            && s.iter().enumerate().all(|(i, &c)| match i {
                4 | 7 => c == b'-',
                10 => c == b'T',
                13 | 16 => c == b':',
                19 => c == b'Z',
                _ => c.is_ascii_digit(),
            });
        if !shape {
            return None;
        }
        let num = |r: std::ops::Range<usize>| {
            s[r].iter()
                .fold(0i64, |acc, &c| acc * 10 + i64::from(c - b'0'))
        };
        let (year, month, day) = (num(0..4), num(5..7), num(8..10));
        let (hour, min, sec) = (num(11..13), num(14..16), num(17..19));
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        if year < 1970 || !(1..=month_days).contains(&day) || hour > 23 || min > 59 || sec > 59 {
            return None;
        }
        let days = days_from_civil(year, month, day);
        Self::from_unix(days * 86_400 + hour * 3600 + min * 60 + sec).ok()
    }

    /// The canonical text, `YYYY-MM-DDTHH:MM:SSZ`, without allocating.
    fn text(self) -> [u8; 20] {
        let (days, secs) = (self.0.div_euclid(86_400), self.0.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        let mut out = *b"0000-00-00T00:00:00Z";
        let mut put = |at: usize, width: usize, mut v: i64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, secs / 3600);
        put(14, 2, secs / 60 % 60);
        put(17, 2, secs % 60);
        out
    }

    /// This instant plus `secs` seconds (saturating at the valid range).
    pub fn plus_secs(self, secs: i64) -> Self {
        Self(self.0.saturating_add(secs).clamp(0, 253_402_300_799))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant, "chrono-Compatible
/// Low-Level Date Algorithms", days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`] (same source, civil_from_days).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.text();
        f.write_str(std::str::from_utf8(&text).expect("ASCII digits and separators"))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.text();
        s.serialize_str(std::str::from_utf8(&text).expect("ASCII digits and separators"))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A lowercase hex SHA-256 digest (64 characters), as `sha256sum` prints it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Wraps raw digest bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }
    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(sha2::Sha256::digest(data).into())
    }
    /// The raw bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Parses 64 lowercase hex characters.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        let err = || invalid("digest", "must be 64 lowercase hex characters");
        if s.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let nib = |c: u8| match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                _ => Err(err()),
            };
            out[i] = nib(pair[0])? << 4 | nib(pair[1])?;
        }
        Ok(Self(out))
    }
}

impl Digest {
    fn hex(&self) -> [u8; 64] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
        out
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.hex()).expect("hex digits"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(std::str::from_utf8(&self.hex()).expect("hex digits"))
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::SecondsFormat;

    fn check_name_case(input: &str, ok: bool) {
        assert_eq!(PrincipalId::new(input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn names() {
        for (input, ok) in [
            ("st-mary", true),
            ("irb.boston_1", true),
            ("A", true),
            ("", false),
            ("-lead", false),
            ("has space", false),
            ("plus+sign", false),
            ("é", false),
            (&"x".repeat(64), true),
            (&"x".repeat(65), false),
        ] {
            check_name_case(input, ok);
        }
    }

    #[test]
    fn subjects_refuse_control_characters_without_echoing_them() {
        let err = SubjectId::new("MRN\n123").unwrap_err();
        assert!(!err.to_string().contains("MRN"));
        assert!(SubjectId::new("MRN-123 a").is_ok());
        assert!(SubjectId::new("").is_err());
    }

    #[test]
    fn timestamps_are_canonical() {
        for (input, ok) in [
            ("2026-11-21T22:00:00Z", true),
            ("1970-01-01T00:00:00Z", true),
            ("2026-11-21T22:00:00.5Z", false),
            ("2026-11-21T23:00:00+01:00", false),
            ("2026-11-21t22:00:00z", false),
            ("2026-11-21", false),
            ("1969-12-31T23:59:59Z", false),
        ] {
            assert_eq!(Timestamp::parse(input).is_ok(), ok, "{input}");
        }
        let t = Timestamp::parse("2026-11-21T22:00:00Z").unwrap();
        assert_eq!(t.to_string(), "2026-11-21T22:00:00Z");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2026-11-21T22:00:00Z\""
        );
    }

    /// The forms chrono gives and accepts: what `Timestamp` used before its fast paths.
    fn chrono_text(secs: i64) -> String {
        DateTime::<Utc>::from_timestamp(secs, 0)
            .unwrap()
            .to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    fn chrono_parse(s: &str) -> Option<i64> {
        let dt = DateTime::parse_from_rfc3339(s).ok()?;
        let t = Timestamp::from_unix(dt.timestamp()).ok()?;
        (chrono_text(t.unix()) == s).then_some(t.unix())
    }

    proptest::proptest! {
        #[test]
        fn timestamps_agree_with_chrono(secs in 0i64..=253_402_300_799, edit in 0usize..20, c in 0u8..128) {
            let text = chrono_text(secs);
            let t = Timestamp::from_unix(secs).unwrap();
            proptest::prop_assert_eq!(t.to_string(), text.clone());
            proptest::prop_assert_eq!(Timestamp::parse(&text).map(Timestamp::unix).ok(), Some(secs));
            // One character changed: both accept or both refuse, with the same instant.
            let mut bytes = text.into_bytes();
            bytes[edit] = c;
            let edited = String::from_utf8(bytes).unwrap();
            proptest::prop_assert_eq!(
                Timestamp::parse(&edited).map(Timestamp::unix).ok(),
                chrono_parse(&edited),
                "{}", edited
            );
        }
    }

    #[test]
    fn timestamp_edges_agree_with_chrono() {
        for s in [
            "2024-02-29T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "2100-02-29T00:00:00Z",
            "2000-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-12-31T23:59:60Z",
            "2026-12-31T24:00:00Z",
            "2026-00-10T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "1969-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
        ] {
            assert_eq!(
                Timestamp::parse(s).map(Timestamp::unix).ok(),
                chrono_parse(s),
                "{s}"
            );
        }
    }

    #[test]
    fn digests_round_trip_and_refuse_uppercase() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        assert!(Digest::parse(&d.to_string().to_uppercase()).is_err());
        assert!(Digest::parse("abc").is_err());
    }
}
