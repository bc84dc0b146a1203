//! The one-pass decoder behind [`crate::entry::Entry::from_json`].
//!
//! An entry's body can only be typed once its `kind` is known, and in canonical JSON `kind`
//! comes after `body`. The general decoder therefore reads the body as raw JSON and parses it
//! a second time. For a stored leaf the kind can be guessed from the bytes (the last
//! `"kind":"` of canonical JSON is the entry's own), so this decoder types the body as that
//! kind in the same pass and then requires the `kind` it read to be the guess. It either
//! returns exactly what the general decoder would, or `None`, and the caller then runs the
//! general decoder (which also words every refusal).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

use crate::entry::{Body, Entry, FORMAT_VERSION};
use crate::ids::{PrincipalId, Timestamp};

/// Decodes `json` in one pass if its kind can be guessed and everything checks out.
pub(crate) fn entry(json: &[u8]) -> Option<Entry> {
    let kind = guess_kind(json)?;
    let mut de = serde_json::Deserializer::from_slice(json);
    let entry = OneEntry { kind }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(entry)
}

/// The kind named after the last `"kind":"` in `json`, if it is a known kind.
fn guess_kind(json: &[u8]) -> Option<&'static str> {
    const KEY: &[u8] = b"\"kind\":\"";
    let at = json.windows(KEY.len()).rposition(|w| w == KEY)? + KEY.len();
    let rest = &json[at..];
    let end = rest.iter().position(|&b| b == b'"')?;
    let name = &rest[..end];
    Body::KINDS.iter().copied().find(|k| k.as_bytes() == name)
}

/// An entry whose body is typed as `kind` (and whose `kind` field must say so).
struct OneEntry {
    kind: &'static str,
}

impl<'de> DeserializeSeed<'de> for OneEntry {
    type Value = Entry;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Entry, D::Error> {
        d.deserialize_map(self)
    }
}

fn twice<E: de::Error>(field: &'static str) -> E {
    de::Error::duplicate_field(field)
}

impl<'de> Visitor<'de> for OneEntry {
    type Value = Entry;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an entry")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entry, A::Error> {
        let mut v: Option<u32> = None;
        let mut author: Option<PrincipalId> = None;
        let mut time: Option<Timestamp> = None;
        let mut kind: Option<&'de str> = None;
        let mut body: Option<Body> = None;
        while let Some(key) = map.next_key::<&'de str>()? {
            match key {
                "v" if v.is_none() => v = Some(map.next_value()?),
                "author" if author.is_none() => author = Some(map.next_value()?),
                "time" if time.is_none() => time = Some(map.next_value()?),
                "kind" if kind.is_none() => kind = Some(map.next_value()?),
                "body" if body.is_none() => {
                    body = Some(map.next_value_seed(BodyOf { kind: self.kind })?);
                }
                "v" | "author" | "time" | "kind" | "body" => return Err(twice("entry field")),
                other => return Err(de::Error::unknown_field(other, &[])),
            }
        }
        match (v, author, time, kind, body) {
            (Some(FORMAT_VERSION), Some(author), Some(time), Some(kind), Some(body))
                if kind == self.kind =>
            {
                Ok(Entry { author, time, body })
            }
            _ => Err(de::Error::custom("not decodable in one pass")),
        }
    }
}

/// A body typed as `kind`.
struct BodyOf {
    kind: &'static str,
}

impl<'de> DeserializeSeed<'de> for BodyOf {
    type Value = Body;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Body, D::Error> {
        Body::deserialize_kind(self.kind, d)
            .unwrap_or_else(|| Err(de::Error::custom("unknown kind")))
    }
}
