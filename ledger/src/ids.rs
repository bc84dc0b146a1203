//! Validated identifiers and units: principals, datasets, studies, subjects, roles and times.
//!
//! Every identifier is checked once, when it enters the ledger (deserialization goes through
//! the same constructor), so the rest of the crate can rely on it.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
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
    /// This instant plus `secs` seconds (saturating at the valid range).
    pub fn plus_secs(self, secs: i64) -> Self {
        Self(self.0.saturating_add(secs).clamp(0, 253_402_300_799))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dt = DateTime::<Utc>::from_timestamp(self.0, 0).expect("range checked at construction");
        f.write_str(&dt.to_rfc3339_opts(SecondsFormat::Secs, true))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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
