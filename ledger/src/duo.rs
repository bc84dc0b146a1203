//! GA4GH Data Use Ontology (DUO) terms for consents and studies, and the matching rule.
//!
//! A consent permits one or more *purposes* (DUO permission terms) and may add *modifiers*
//! (DUO restriction terms). A study declares one research purpose and whether it is
//! commercial or methods development. [`permits`] decides whether a consent's terms allow the
//! study; it fails closed: a term it cannot enforce is refused when the consent is written.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::InvalidValue;

/// A DUO permission term: what research a consent allows, or what a study does.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    /// DUO:0000004 no restriction.
    Nres,
    /// DUO:0000042 general research use.
    Gru,
    /// DUO:0000006 health or medical or biomedical research.
    Hmb,
    /// DUO:0000007 disease specific research, with the disease term (a CURIE such as
    /// `MONDO:0005148` or `ICD10:E11`).
    Ds(String),
    /// DUO:0000011 population origins or ancestry research only.
    Poa,
}

impl Purpose {
    /// Parses `NRES`, `GRU`, `HMB`, `POA` or `DS:<term>` (e.g. `DS:MONDO:0005148`).
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        let bad = |reason: &str| InvalidValue {
            what: "DUO purpose",
            reason: reason.into(),
        };
        match s {
            "NRES" => Ok(Purpose::Nres),
            "GRU" => Ok(Purpose::Gru),
            "HMB" => Ok(Purpose::Hmb),
            "POA" => Ok(Purpose::Poa),
            "DS" => Err(bad("DS needs a disease term, e.g. DS:MONDO:0005148")),
            _ => match s.strip_prefix("DS:") {
                Some(term) if valid_term(term) => Ok(Purpose::Ds(term.to_string())),
                Some(_) => Err(bad(
                    "the DS disease term must be a CURIE such as MONDO:0005148",
                )),
                None => Err(bad("expected NRES, GRU, HMB, POA or DS:<disease term>")),
            },
        }
    }
}

/// A CURIE-like disease term: `PREFIX:LOCAL`, printable ASCII without spaces, at most 64 bytes.
fn valid_term(term: &str) -> bool {
    let Some((prefix, local)) = term.split_once(':') else {
        return false;
    };
    term.len() <= 64
        && !prefix.is_empty()
        && !local.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Purpose::Nres => f.write_str("NRES"),
            Purpose::Gru => f.write_str("GRU"),
            Purpose::Hmb => f.write_str("HMB"),
            Purpose::Poa => f.write_str("POA"),
            Purpose::Ds(term) => write!(f, "DS:{term}"),
        }
    }
}

impl fmt::Debug for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A DUO restriction term the broker can enforce. Terms it cannot enforce (publication
/// obligations, geography, ...) are refused when a consent is written, so a consent never
/// silently loses a restriction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Modifier {
    /// DUO:0000046 non-commercial use only.
    #[serde(rename = "NCU")]
    Ncu,
    /// DUO:0000045 not-for-profit organisation use only.
    #[serde(rename = "NPU")]
    Npu,
    /// DUO:0000021 ethics approval required. Every query in this system runs under an IRB
    /// approval, so it always holds; it is recorded for export.
    #[serde(rename = "IRB")]
    Irb,
    /// DUO:0000015 no general methods research.
    #[serde(rename = "NMDS")]
    Nmds,
    /// DUO:0000044 population origins or ancestry research prohibited.
    #[serde(rename = "NPOA")]
    Npoa,
    /// DUO:0000027 project specific restriction: only the studies in the allow list.
    #[serde(rename = "PS")]
    Ps,
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(Purpose);

/// What a study does, as far as consent matching is concerned.
#[derive(Debug, Clone, Copy)]
pub struct StudyUse<'a> {
    /// The study's research purpose.
    pub purpose: &'a Purpose,
    /// Commercial use or a for-profit organisation (refused by NCU and NPU).
    pub commercial: bool,
    /// General methods development (refused by NMDS).
    pub methods_development: bool,
}

/// Whether one consented purpose covers the study's purpose.
///
/// GA4GH DUO matching: NRES and GRU allow any research purpose (GRU includes ancestry and
/// methods research); HMB allows HMB and any DS; DS:X allows only DS:X (no disease ontology
/// is consulted, so a narrower term is not inferred: fail closed); POA allows only POA.
pub fn purpose_covers(consented: &Purpose, study: &Purpose) -> bool {
    match (consented, study) {
        (Purpose::Nres | Purpose::Gru, _) => true,
        (Purpose::Hmb, Purpose::Hmb | Purpose::Ds(_)) => true,
        (Purpose::Ds(a), Purpose::Ds(b)) => a == b,
        (Purpose::Poa, Purpose::Poa) => true,
        _ => false,
    }
}

/// Whether a consent's purposes and modifiers permit the study. The study allow and deny
/// lists and the validity period are checked by the caller, which knows the study id and time.
pub fn permits(purposes: &[Purpose], modifiers: &[Modifier], study: StudyUse<'_>) -> bool {
    if !purposes.iter().any(|p| purpose_covers(p, study.purpose)) {
        return false;
    }
    modifiers.iter().all(|m| match m {
        Modifier::Ncu | Modifier::Npu => !study.commercial,
        Modifier::Nmds => !study.methods_development,
        Modifier::Npoa => *study.purpose != Purpose::Poa,
        Modifier::Irb | Modifier::Ps => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Purpose {
        Purpose::parse(s).unwrap()
    }

    fn check(consent: &[&str], modifiers: &[Modifier], study: &str, commercial: bool, ok: bool) {
        let purposes: Vec<Purpose> = consent.iter().map(|s| p(s)).collect();
        let sp = p(study);
        let use_ = StudyUse {
            purpose: &sp,
            commercial,
            methods_development: false,
        };
        assert_eq!(
            permits(&purposes, modifiers, use_),
            ok,
            "consent {consent:?} {modifiers:?} vs study {study} commercial={commercial}"
        );
    }

    #[test]
    fn matching_follows_duo() {
        use Modifier::*;
        type Case = (
            &'static [&'static str],
            &'static [Modifier],
            &'static str,
            bool,
            bool,
        );
        let cases: &[Case] = &[
            // HMB purpose is allowed by GRU or HMB consent.
            (&["GRU"], &[], "HMB", false, true),
            (&["HMB"], &[], "HMB", false, true),
            (&["NRES"], &[], "HMB", false, true),
            (&["DS:MONDO:0005148"], &[], "HMB", false, false),
            (&["POA"], &[], "HMB", false, false),
            // DS-X by GRU, HMB, or DS for X.
            (&["GRU"], &[], "DS:MONDO:0005148", false, true),
            (&["HMB"], &[], "DS:MONDO:0005148", false, true),
            (&["DS:MONDO:0005148"], &[], "DS:MONDO:0005148", false, true),
            (&["DS:MONDO:0007254"], &[], "DS:MONDO:0005148", false, false),
            // Ancestry research: GRU or POA, never HMB.
            (&["GRU"], &[], "POA", false, true),
            (&["HMB"], &[], "POA", false, false),
            (&["POA"], &[], "POA", false, true),
            (&["GRU"], &[Npoa], "POA", false, false),
            // General research purpose needs GRU or NRES.
            (&["HMB"], &[], "GRU", false, false),
            (&["GRU"], &[], "GRU", false, true),
            // A commercial study is refused by NCU/NPU.
            (&["GRU"], &[Ncu], "HMB", true, false),
            (&["GRU"], &[Npu], "HMB", true, false),
            (&["GRU"], &[Ncu], "HMB", false, true),
            (&["GRU"], &[Irb], "HMB", true, true),
            // Any of several purposes.
            (&["POA", "DS:ICD10:E11"], &[], "DS:ICD10:E11", false, true),
        ];
        for &(consent, modifiers, study, commercial, ok) in cases {
            check(consent, modifiers, study, commercial, ok);
        }
    }

    #[test]
    fn nmds_refuses_methods_development() {
        let gru = p("GRU");
        let study = StudyUse {
            purpose: &gru,
            commercial: false,
            methods_development: true,
        };
        assert!(!permits(&[p("GRU")], &[Modifier::Nmds], study));
        assert!(permits(&[p("GRU")], &[], study));
    }

    #[test]
    fn parsing() {
        for (input, ok) in [
            ("GRU", true),
            ("DS:MONDO:0005148", true),
            ("DS:ICD10:E11.9", true),
            ("DS", false),
            ("DS:", false),
            ("DS:diabetes", false),
            ("gru", false),
            ("COL", false),
        ] {
            assert_eq!(Purpose::parse(input).is_ok(), ok, "{input}");
        }
        assert_eq!(p("DS:MONDO:0005148").to_string(), "DS:MONDO:0005148");
        let m: Result<Modifier, _> = serde_json::from_str("\"PUB\"");
        assert!(m.is_err(), "unenforceable modifiers are refused");
    }
}
