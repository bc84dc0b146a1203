//! RFC 8785 (JCS) canonical JSON, written straight from `serde::Serialize` into one buffer.
//!
//! The output is byte for byte what `serde_jcs` 0.2 writes (the tests compare the two over
//! generated values): members of every object sorted by the UTF-16 code units of their names
//! (RFC 8785 3.2.3), strings escaped as in RFC 8785 3.2.2.2, and every number written as the
//! ECMAScript form of an IEEE 754 double (RFC 8785 3.2.2.3, via `ryu-js`, as `serde_jcs` does;
//! integers are converted to doubles first). Members are written in the order they come and
//! an object is reordered in place only when they were not already sorted, so no value is
//! buffered twice.

use std::fmt::Display;

use serde::ser::{self, Serialize};

/// Why a value has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

impl ser::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

fn err(msg: &str) -> Error {
    Error(msg.to_string())
}

/// How non-finite floats are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinite {
    /// Refused, as RFC 8785 requires.
    Refuse,
    /// Written as `null`, as `serde_json::to_value` turns them into `Value::Null` (what the
    /// entry encoding has always done with bodies converted to values first).
    Null,
}

/// Canonical JSON of `value`.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    to_vec_with(value, NonFinite::Refuse)
}

/// Canonical JSON of `value`, with a choice of what non-finite floats become.
pub fn to_vec_with<T: Serialize + ?Sized>(
    value: &T,
    non_finite: NonFinite,
) -> Result<Vec<u8>, Error> {
    let mut w = Writer {
        out: Vec::with_capacity(512),
        non_finite,
    };
    value.serialize(&mut w)?;
    Ok(w.out)
}

/// The serializer: appends canonical JSON to `out`.
struct Writer {
    out: Vec<u8>,
    non_finite: NonFinite,
}

// serde_json's markers for `arbitrary_precision` numbers and raw values.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";
const RAW_TOKEN: &str = "$serde_json::private::RawValue";

impl Writer {
    fn f64(&mut self, v: f64) -> Result<(), Error> {
        if v.is_finite() {
            let mut buf = ryu_js::Buffer::new();
            self.out.extend_from_slice(buf.format_finite(v).as_bytes());
            Ok(())
        } else if self.non_finite == NonFinite::Null {
            self.out.extend_from_slice(b"null");
            Ok(())
        } else {
            Err(err("invalid float value"))
        }
    }

    fn string(&mut self, s: &str) {
        write_string(&mut self.out, s);
    }
}

/// Writes `s` as a JSON string (RFC 8785 3.2.2.2: only `"`, `\` and control characters are
/// escaped, with the short forms where JSON has them and lowercase `\u00xx` otherwise).
fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..0x20 => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short == 0 {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// RFC 8785 3.2.3: member names compare as arrays of UTF-16 code units.
fn utf16_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    // Byte order equals UTF-16 order unless a character above U+FFFF meets one in
    // U+E000..=U+FFFF; both start with a byte of at least 0xEE in UTF-8.
    if !a.bytes().chain(b.bytes()).any(|c| c >= 0xee) {
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

macro_rules! as_double {
    ($($f:ident: $t:ty),*) => {$(
        // RFC 8785 numbers are doubles: integers are converted first, exactly as serde_jcs does.
        #[allow(clippy::cast_precision_loss, clippy::cast_lossless)]
        fn $f(self, v: $t) -> Result<(), Error> {
            self.f64(v as f64)
        }
    )*};
}

impl<'a> ser::Serializer for &'a mut Writer {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Seq<'a>;
    type SerializeTuple = Seq<'a>;
    type SerializeTupleStruct = Seq<'a>;
    type SerializeTupleVariant = Seq<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    as_double!(serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_i128: i128, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_u128: u128, serialize_f32: f32);

    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        self.f64(v)
    }

    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.string(v.encode_utf8(&mut [0u8; 4]));
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.string(v);
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        // As serde_json: an array of numbers.
        let mut seq = ser::Serializer::serialize_seq(self, Some(v.len()))?;
        for b in v {
            ser::SerializeSeq::serialize_element(&mut seq, b)?;
        }
        ser::SerializeSeq::end(seq)
    }

    fn serialize_none(self) -> Result<(), Error> {
        self.serialize_unit()
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), Error> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        self.string(variant);
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.out.push(b'{');
        self.string(variant);
        self.out.push(b':');
        value.serialize(&mut *self)?;
        self.out.push(b'}');
        Ok(())
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Seq<'a>, Error> {
        self.out.push(b'[');
        Ok(Seq {
            w: self,
            first: true,
            variant: false,
        })
    }

    fn serialize_tuple(self, len: usize) -> Result<Seq<'a>, Error> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Seq<'a>, Error> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Seq<'a>, Error> {
        self.out.push(b'{');
        self.string(variant);
        self.out.extend_from_slice(b":[");
        Ok(Seq {
            w: self,
            first: true,
            variant: true,
        })
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<Object<'a>, Error> {
        Ok(Object::new(self, Kind::Plain))
    }

    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Object<'a>, Error> {
        let kind = match name {
            NUMBER_TOKEN => Kind::Number,
            RAW_TOKEN => Kind::Raw,
            _ => Kind::Plain,
        };
        Ok(Object::new(self, kind))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Object<'a>, Error> {
        self.out.push(b'{');
        self.string(variant);
        self.out.push(b':');
        Ok(Object::new(self, Kind::Variant))
    }
}

/// An array being written.
pub struct Seq<'a> {
    w: &'a mut Writer,
    first: bool,
    /// A tuple variant: `{"name":[...]}`.
    variant: bool,
}

impl Seq<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        if !self.first {
            self.w.out.push(b',');
        }
        self.first = false;
        value.serialize(&mut *self.w)
    }

    fn finish(self) -> Result<(), Error> {
        self.w.out.push(b']');
        if self.variant {
            self.w.out.push(b'}');
        }
        Ok(())
    }
}

impl ser::SerializeSeq for Seq<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTuple for Seq<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for Seq<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for Seq<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

enum Kind {
    Plain,
    /// A struct variant: `{"name":{...}}`.
    Variant,
    /// serde_json's `arbitrary_precision` number: one field holding the number's text.
    Number,
    /// serde_json's raw value: one field holding JSON text, canonicalized here.
    Raw,
}

/// A member name: a struct's field names are static, a map's keys are owned.
enum Name {
    Static(&'static str),
    Owned(String),
}

impl Name {
    fn as_str(&self) -> &str {
        match self {
            Name::Static(s) => s,
            Name::Owned(s) => s,
        }
    }
}

/// A member written at `start..end` of the output (name, colon and value).
struct Member {
    name: Name,
    start: usize,
    end: usize,
}

/// An object being written: members go straight to the output in the order they come; `end`
/// reorders them if they were not sorted.
pub struct Object<'a> {
    w: &'a mut Writer,
    kind: Kind,
    /// Where the members start (just after `{`).
    start: usize,
    members: Vec<Member>,
    sorted: bool,
    /// A map key waiting for its value.
    key: Option<String>,
}

impl<'a> Object<'a> {
    fn new(w: &'a mut Writer, kind: Kind) -> Object<'a> {
        if !matches!(kind, Kind::Number | Kind::Raw) {
            w.out.push(b'{');
        }
        let start = w.out.len();
        Object {
            w,
            kind,
            start,
            members: Vec::new(),
            sorted: true,
            key: None,
        }
    }

    fn member<T: Serialize + ?Sized>(&mut self, name: Name, value: &T) -> Result<(), Error> {
        match self.kind {
            Kind::Number => return self.number(value),
            Kind::Raw => return self.raw(value),
            Kind::Plain | Kind::Variant => {}
        }
        if let Some(last) = self.members.last() {
            match utf16_cmp(last.name.as_str(), name.as_str()) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Greater => self.sorted = false,
                std::cmp::Ordering::Equal => return Err(err("duplicate member name")),
            }
            self.w.out.push(b',');
        }
        let start = self.w.out.len();
        write_string(&mut self.w.out, name.as_str());
        self.w.out.push(b':');
        value.serialize(&mut *self.w)?;
        self.members.push(Member {
            name,
            start,
            end: self.w.out.len(),
        });
        Ok(())
    }

    fn number<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let text = value.serialize(TextOf)?;
        let v: f64 = text.parse().map_err(|_| err("invalid number"))?;
        self.w.f64(v)
    }

    fn raw<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let text = value.serialize(TextOf)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error(e.to_string()))?;
        v.serialize(&mut *self.w)
    }

    fn finish(mut self) -> Result<(), Error> {
        if matches!(self.kind, Kind::Number | Kind::Raw) {
            return Ok(());
        }
        if !self.sorted {
            // Duplicates were only caught between neighbours so far.
            self.members
                .sort_by(|a, b| utf16_cmp(a.name.as_str(), b.name.as_str()));
            if self
                .members
                .windows(2)
                .any(|p| p[0].name.as_str() == p[1].name.as_str())
            {
                return Err(err("duplicate member name"));
            }
            let written = self.w.out.split_off(self.start);
            for (i, m) in self.members.iter().enumerate() {
                if i > 0 {
                    self.w.out.push(b',');
                }
                self.w
                    .out
                    .extend_from_slice(&written[m.start - self.start..m.end - self.start]);
            }
        }
        self.w.out.push(b'}');
        if matches!(self.kind, Kind::Variant) {
            self.w.out.push(b'}');
        }
        Ok(())
    }
}

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        self.key = Some(key.serialize(KeyOf)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self
            .key
            .take()
            .ok_or_else(|| err("map value without a key"))?;
        self.member(Name::Owned(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeStruct for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.member(Name::Static(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.member(Name::Static(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

/// Serializes a map key: strings only (as serde_jcs; numbers as keys are refused).
struct KeyOf;

/// Serializes the text held by serde_json's number and raw-value markers.
struct TextOf;

macro_rules! only_strings {
    ($ser:ty, $what:literal) => {
        impl ser::Serializer for $ser {
            type Ok = String;
            type Error = Error;
            type SerializeSeq = ser::Impossible<String, Error>;
            type SerializeTuple = ser::Impossible<String, Error>;
            type SerializeTupleStruct = ser::Impossible<String, Error>;
            type SerializeTupleVariant = ser::Impossible<String, Error>;
            type SerializeMap = ser::Impossible<String, Error>;
            type SerializeStruct = ser::Impossible<String, Error>;
            type SerializeStructVariant = ser::Impossible<String, Error>;

            fn serialize_str(self, v: &str) -> Result<String, Error> {
                Ok(v.to_string())
            }
            fn serialize_char(self, v: char) -> Result<String, Error> {
                Ok(v.to_string())
            }
            fn serialize_unit_variant(
                self,
                _name: &'static str,
                _index: u32,
                variant: &'static str,
            ) -> Result<String, Error> {
                Ok(variant.to_string())
            }
            fn serialize_newtype_struct<T: Serialize + ?Sized>(
                self,
                _name: &'static str,
                value: &T,
            ) -> Result<String, Error> {
                value.serialize(self)
            }
            fn serialize_bool(self, _v: bool) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_i8(self, _v: i8) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_i16(self, _v: i16) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_i32(self, _v: i32) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_i64(self, _v: i64) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_u8(self, _v: u8) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_u16(self, _v: u16) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_u32(self, _v: u32) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_u64(self, _v: u64) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_f32(self, _v: f32) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_f64(self, _v: f64) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_bytes(self, _v: &[u8]) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_none(self) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_unit(self) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_unit_struct(self, _name: &'static str) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_newtype_variant<T: Serialize + ?Sized>(
                self,
                _name: &'static str,
                _index: u32,
                _variant: &'static str,
                _value: &T,
            ) -> Result<String, Error> {
                Err(err($what))
            }
            fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Error> {
                Err(err($what))
            }
            fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Error> {
                Err(err($what))
            }
            fn serialize_tuple_struct(
                self,
                _name: &'static str,
                _len: usize,
            ) -> Result<Self::SerializeTupleStruct, Error> {
                Err(err($what))
            }
            fn serialize_tuple_variant(
                self,
                _name: &'static str,
                _index: u32,
                _variant: &'static str,
                _len: usize,
            ) -> Result<Self::SerializeTupleVariant, Error> {
                Err(err($what))
            }
            fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Error> {
                Err(err($what))
            }
            fn serialize_struct(
                self,
                _name: &'static str,
                _len: usize,
            ) -> Result<Self::SerializeStruct, Error> {
                Err(err($what))
            }
            fn serialize_struct_variant(
                self,
                _name: &'static str,
                _index: u32,
                _variant: &'static str,
                _len: usize,
            ) -> Result<Self::SerializeStructVariant, Error> {
                Err(err($what))
            }
        }
    };
}

only_strings!(KeyOf, "object member names must be strings");
only_strings!(TextOf, "expected the text of a number or raw value");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn check(v: &Value) {
        let ours = to_vec(v).unwrap();
        let reference = serde_jcs::to_vec(v).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&reference)
        );
    }

    #[test]
    fn table() {
        let cases = [
            json!(null),
            json!(true),
            json!({"b": 1, "a": [1, 2.5, -0.0, 1e21, 1e-7, 123456789012345678u64, -9007199254740993i64]}),
            json!({"\u{e000}": 1, "\u{1f600}": 2, "a": 3, "\u{80}": 4, "": 5}),
            json!({"s": "quote \" backslash \\ slash / tab \t nl \n cr \r ff \u{c} bs \u{8} nul \u{0} us \u{1f} del \u{7f} ls \u{2028} 😀 é"}),
            json!([{"z": {"y": {"x": []}}, "a": {}}]),
            json!({"n": [0.1, 0.2, 0.30000000000000004, 5e-324, 1.7976931348623157e308, 100, 1e20, 123e-20]}),
        ];
        for c in &cases {
            check(c);
        }
        // The RFC 8785 3.2.3 example of sorting.
        let sorting = json!({
            "\u{20ac}": "Euro Sign", "\r": "Carriage Return", "\u{fb33}": "Hebrew Letter Dalet With Dagesh",
            "1": "One", "\u{1f600}": "Emoji Grinning Face", "\u{80}": "Control", "\u{f6}": "Latin Small Letter O With Diaeresis"
        });
        check(&sorting);
        let text = String::from_utf8(to_vec(&sorting).unwrap()).unwrap();
        let order: Vec<&str> = text
            .split(':')
            .skip(1)
            .map(|v| v.split('"').nth(1).unwrap())
            .collect();
        assert_eq!(
            order,
            [
                "Carriage Return",
                "One",
                "Control",
                "Latin Small Letter O With Diaeresis",
                "Euro Sign",
                "Emoji Grinning Face",
                "Hebrew Letter Dalet With Dagesh"
            ]
        );
    }

    #[test]
    fn non_finite_floats() {
        assert!(to_vec(&f64::NAN).is_err());
        assert!(serde_jcs::to_vec(&f64::NAN).is_err());
        assert_eq!(
            to_vec_with(&f64::INFINITY, NonFinite::Null).unwrap(),
            b"null"
        );
        // What `serde_json::to_value` then serde_jcs gave for a non-finite field.
        let v = serde_json::to_value(f64::NAN).unwrap();
        assert_eq!(serde_jcs::to_vec(&v).unwrap(), b"null");
    }

    #[test]
    fn structs_enums_and_raw_values() {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        enum E {
            Unit,
            New(u8),
            Tuple(u8, String),
            Struct { z: bool, a: Option<u8> },
        }
        #[derive(serde::Serialize)]
        struct S {
            zeta: Vec<E>,
            alpha: char,
            bytes: serde_bytes_like::Bytes,
            raw: Box<serde_json::value::RawValue>,
            map: std::collections::BTreeMap<String, f32>,
        }
        mod serde_bytes_like {
            pub struct Bytes(pub Vec<u8>);
            impl serde::Serialize for Bytes {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_bytes(&self.0)
                }
            }
        }
        let s = S {
            zeta: vec![
                E::Unit,
                E::New(7),
                E::Tuple(1, "x".into()),
                E::Struct { z: true, a: None },
            ],
            alpha: 'é',
            bytes: serde_bytes_like::Bytes(vec![0, 255]),
            raw: serde_json::value::RawValue::from_string(r#"{ "b" : 1.0, "a" : [ 1e2 ] }"#.into())
                .unwrap(),
            map: [("k".to_string(), 0.1f32)].into(),
        };
        assert_eq!(to_vec(&s).unwrap(), serde_jcs::to_vec(&s).unwrap());
    }

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z_]{0,8}",
            any::<String>(),
            proptest::collection::vec(
                prop_oneof![
                    Just('\u{0}'),
                    Just('\u{1f}'),
                    Just('"'),
                    Just('\\'),
                    Just('\u{7f}'),
                    Just('\u{e000}'),
                    Just('\u{ffff}'),
                    Just('\u{10000}'),
                    Just('\u{1f600}'),
                    any::<char>(),
                ],
                0..6
            )
            .prop_map(|c| c.into_iter().collect()),
        ]
    }

    fn arb_number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1000i64..1000).prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            (-30i32..30, -1000i64..1000).prop_map(|(e, m)| Value::from(m as f64 * 10f64.powi(e))),
        ]
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            arb_number(),
            arb_string().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((arb_string(), inner), 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn same_bytes_as_serde_jcs(v in arb_value()) {
            prop_assert_eq!(to_vec(&v).unwrap(), serde_jcs::to_vec(&v).unwrap());
        }

        #[test]
        fn utf16_order(a in arb_string(), b in arb_string()) {
            prop_assert_eq!(utf16_cmp(&a, &b), a.encode_utf16().cmp(b.encode_utf16()));
        }
    }
}
