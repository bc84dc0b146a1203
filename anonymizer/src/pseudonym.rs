//! Study pseudonyms: in any output, the privacy-unit id becomes the lowercase hex of
//! HMAC-SHA256(study secret, id).
//!
//! Extracts use [`StudySecret::pseudonymizer_for`]: a key derived from the study secret and
//! the extract itself (its SQL and consent snapshot), so the same id gets the same pseudonym
//! within an extract and unrelated ones in two different extracts: two k-anonymous extracts
//! cannot be joined on the pseudonym into classes smaller than k. Nothing links pseudonyms of
//! two studies, whose secrets differ (RFC 2104: without the key, HMAC outputs are
//! indistinguishable from random). The id is
//! hashed as text: an integer id as its decimal digits, a text id as its UTF-8 bytes.
//!
//! A [`StudySecret`] is wiped from memory when dropped, prints as `StudySecret(<redacted>)`
//! and has no way to be read back out; it never reaches a log or an error message.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder, UInt32Array};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use hmac::{KeyInit as _, Mac as _};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The shortest secret accepted, in bytes (the HMAC-SHA256 output size; RFC 2104 section 3
/// advises keys no shorter than the hash output).
pub const MIN_SECRET_BYTES: usize = 32;

/// A study's pseudonym secret. Zeroized on drop; `Debug` never shows it.
pub struct StudySecret(Zeroizing<Vec<u8>>);

impl StudySecret {
    /// A secret from its bytes (at least [`MIN_SECRET_BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<StudySecret> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(Error::Secret(format!(
                "a study secret needs at least {MIN_SECRET_BYTES} bytes"
            )));
        }
        Ok(StudySecret(Zeroizing::new(bytes.to_vec())))
    }

    /// The pseudonymizer of one extract: keyed with HMAC-SHA256(secret, label || `extract`),
    /// where `extract` identifies it (its normalized SQL and consent snapshot).
    pub fn pseudonymizer_for(&self, extract: &[u8]) -> Pseudonymizer {
        let mut derive =
            HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        derive.update(b"consentry extract pseudonyms\n");
        derive.update(extract);
        let key = Zeroizing::new(derive.finalize().into_bytes().to_vec());
        Pseudonymizer {
            mac: HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length"),
        }
    }

    /// The pseudonymizer keyed with this secret.
    pub fn pseudonymizer(&self) -> Pseudonymizer {
        Pseudonymizer {
            mac: HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length"),
        }
    }
}

impl std::fmt::Debug for StudySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StudySecret(<redacted>)")
    }
}

/// Computes pseudonyms with one study's secret (the keyed HMAC state, computed once).
#[derive(Clone)]
pub struct Pseudonymizer {
    mac: HmacSha256,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer(<redacted>)")
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Pseudonymizer {
    /// The pseudonym of one id (its text form): 64 lowercase hex digits.
    pub fn pseudonym(&self, id: &[u8]) -> String {
        let mut buf = [0u8; 64];
        self.write_hex(id, &mut buf);
        buf.iter().map(|&b| b as char).collect()
    }

    fn write_hex(&self, id: &[u8], out: &mut [u8; 64]) {
        let mut mac = self.mac.clone();
        mac.update(id);
        let tag = mac.finalize().into_bytes();
        for (i, b) in tag.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    }

    /// Replaces a column of privacy-unit ids (Int32, Int64 or text) with their pseudonyms.
    ///
    /// `units` are the rows' dense unit numbers (see [`crate::dataset::UNIT_COLUMN`]): each
    /// unit's pseudonym is computed once however many rows it has.
    pub fn pseudonymize(&self, ids: &ArrayRef, units: &UInt32Array) -> Result<ArrayRef> {
        if ids.len() != units.len() {
            return Err(Error::Engine("unit numbers do not match the ids".into()));
        }
        let ids = &crate::safe_harbor::plain_text(ids)?;
        // Each unit's pseudonym is computed once: `slot[unit]` indexes `done`.
        let max = units
            .values()
            .iter()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut slot = vec![u32::MAX; max];
        let mut done: Vec<[u8; 64]> = Vec::new();
        let mut out = StringBuilder::with_capacity(ids.len(), ids.len() * 64);
        let mut text = String::new();
        for i in 0..ids.len() {
            if ids.is_null(i) {
                out.append_null();
                continue;
            }
            let unit = units.value(i) as usize;
            if let Some(hex) = done.get(slot[unit] as usize) {
                out.append_value(std::str::from_utf8(hex).expect("hex digits are ASCII"));
                continue;
            }
            text.clear();
            let id: &[u8] = match ids.data_type() {
                DataType::Int64 => {
                    text.push_str(&ids.as_primitive::<Int64Type>().value(i).to_string());
                    text.as_bytes()
                }
                DataType::Int32 => {
                    text.push_str(&ids.as_primitive::<Int32Type>().value(i).to_string());
                    text.as_bytes()
                }
                DataType::Utf8 => ids.as_string::<i32>().value(i).as_bytes(),
                other => {
                    return Err(Error::Dataset(format!(
                        "privacy-unit column of type {other} is not supported"
                    )));
                }
            };
            let mut hex = [0u8; 64];
            self.write_hex(id, &mut hex);
            out.append_value(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
            slot[unit] = u32::try_from(done.len()).expect("fewer units than u32::MAX");
            done.push(hex);
        }
        Ok(Arc::new(out.finish()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use arrow::array::{Int64Array, StringArray};

    use super::*;

    fn secret(byte: u8) -> StudySecret {
        StudySecret::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn hmac_known_answer_rfc_4231_case_2() {
        // RFC 4231 section 4.3 (key "Jefe"), through the same hex path; study secrets need
        // 32 bytes, so the MAC is built directly.
        let p = Pseudonymizer {
            mac: HmacSha256::new_from_slice(b"Jefe").unwrap(),
        };
        assert_eq!(
            p.pseudonym(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn short_secrets_are_refused_and_debug_redacts() {
        assert!(StudySecret::from_bytes(&[7; 31]).is_err());
        let s = secret(0xab);
        let shown = format!("{s:?} {:?}", s.pseudonymizer());
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn pseudonyms_are_stable_within_a_study() {
        let (a, b) = (secret(1), secret(1));
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![5, 6, 5, 7]));
        let units = UInt32Array::from(vec![0, 1, 0, 2]);
        let x = a.pseudonymizer().pseudonymize(&ids, &units).unwrap();
        let y = b.pseudonymizer().pseudonymize(&ids, &units).unwrap();
        let (x, y) = (x.as_string::<i32>(), y.as_string::<i32>());
        assert_eq!(x, y);
        assert_eq!(x.value(0), x.value(2));
        assert_ne!(x.value(0), x.value(1));
        assert_eq!(x.value(0), a.pseudonymizer().pseudonym(b"5"));
        assert_eq!(x.value(0).len(), 64);
        // Text ids hash the same bytes as the integer's decimal form.
        let text: ArrayRef = Arc::new(StringArray::from(vec!["5"]));
        let t = a
            .pseudonymizer()
            .pseudonymize(&text, &UInt32Array::from(vec![0]))
            .unwrap();
        assert_eq!(t.as_string::<i32>().value(0), x.value(0));
    }

    #[test]
    fn pseudonyms_are_unlinkable_across_studies() {
        let (a, b) = (secret(1).pseudonymizer(), secret(2).pseudonymizer());
        let n = 10_000;
        let first: HashSet<String> = (0..n)
            .map(|i| a.pseudonym(i.to_string().as_bytes()))
            .collect();
        let second: HashSet<String> = (0..n)
            .map(|i| b.pseudonym(i.to_string().as_bytes()))
            .collect();
        assert_eq!(first.len(), n);
        assert_eq!(second.len(), n);
        assert_eq!(first.intersection(&second).count(), 0);
    }
}
