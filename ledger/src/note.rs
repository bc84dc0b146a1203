//! Signed notes, note keys and transparency-log checkpoints.
//!
//! Implements the Ed25519 subset of C2SP signed-note
//! (<https://c2sp.org/signed-note>) and the checkpoint body of C2SP
//! tlog-checkpoint (<https://c2sp.org/tlog-checkpoint>), plus the
//! `golang.org/x/mod/sumdb/note` key text encodings. No file I/O here.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use zeroize::{Zeroize as _, Zeroizing};

/// C2SP signed-note algorithm identifier byte for Ed25519.
const ALG_ED25519: u8 = 0x01;
/// Signature line prefix: U+2014 EM DASH followed by a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Upper bound on signature lines accepted in one note (as in the Go reference).
const MAX_SIGNATURES: usize = 100;

/// Errors from parsing keys, signing or verifying notes and checkpoints.
/// Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NoteError {
    /// A key text (signer or verifier) is not well formed.
    #[error("malformed key: {reason}")]
    MalformedKey { reason: &'static str },
    /// A key name is empty or contains '+', whitespace or control characters.
    #[error("invalid key name")]
    InvalidKeyName,
    /// The key's algorithm byte is not 0x01 (Ed25519).
    #[error("unsupported key algorithm (only Ed25519 is supported)")]
    WrongAlgorithm,
    /// The key id in the key text does not match the key.
    #[error("key id does not match key")]
    KeyIdMismatch,
    /// The note text or its signature block violates C2SP signed-note.
    #[error("malformed note: {reason}")]
    MalformedNote { reason: &'static str },
    /// No signature line carries this key's name and key id.
    #[error("note has no signature by key {name}")]
    NoSignatureByKey { name: String },
    /// A signature line with this key's name and key id failed to verify.
    #[error("invalid signature by key {name}")]
    BadSignature { name: String },
    /// The checkpoint body violates C2SP tlog-checkpoint.
    #[error("malformed checkpoint: {reason}")]
    MalformedCheckpoint { reason: &'static str },
    /// The checkpoint origin differs from the expected one.
    #[error("checkpoint origin {found:?} does not match expected {expected:?}")]
    OriginMismatch { expected: String, found: String },
    /// The operating system random number generator failed.
    #[error("OS random number generator failed")]
    Rng,
}

fn malformed_key(reason: &'static str) -> NoteError {
    NoteError::MalformedKey { reason }
}
fn malformed_note(reason: &'static str) -> NoteError {
    NoteError::MalformedNote { reason }
}
fn malformed_cp(reason: &'static str) -> NoteError {
    NoteError::MalformedCheckpoint { reason }
}

/// Checks a C2SP signed-note key name: non-empty, no '+', no (Unicode)
/// whitespace and no control characters.
fn check_name(name: &str) -> Result<(), NoteError> {
    let bad = |c: char| c == '+' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.chars().any(bad) {
        return Err(NoteError::InvalidKeyName);
    }
    Ok(())
}

/// Checks a C2SP signed-note text: non-empty, ends in '\n', and contains no
/// control characters other than '\n' (so no '\r').
fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') {
        return Err(malformed_note(
            "text must be non-empty and end in a newline",
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(malformed_note("control character other than newline"));
    }
    Ok(())
}

/// C2SP signed-note Ed25519 key id: the first 4 bytes of
/// SHA-256(key_name || 0x0A || 0x01 || public_key).
pub fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let digest = Sha256::new()
        .chain_update(name.as_bytes())
        .chain_update([b'\n', ALG_ED25519])
        .chain_update(public)
        .finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

fn hex_id(id: &[u8; 4]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses exactly 8 lowercase hex digits.
fn parse_hex_id(s: &str) -> Result<[u8; 4], NoteError> {
    let ok = s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        return Err(malformed_key("key id must be 8 lowercase hex digits"));
    }
    u32::from_str_radix(s, 16)
        .map(u32::to_be_bytes)
        .map_err(|_| malformed_key("key id must be 8 lowercase hex digits"))
}

/// Decodes `base64(0x01 || 32 bytes)` into the 32 key bytes (zeroized on drop).
fn decode_key_blob(b64: &str) -> Result<Zeroizing<[u8; 32]>, NoteError> {
    let raw = Zeroizing::new(
        B64.decode(b64)
            .map_err(|_| malformed_key("invalid base64"))?,
    );
    match raw.first() {
        None => return Err(malformed_key("empty key data")),
        Some(&ALG_ED25519) => {}
        Some(_) => return Err(NoteError::WrongAlgorithm),
    }
    let mut out = Zeroizing::new([0u8; 32]);
    if raw.len() != 33 {
        return Err(malformed_key("Ed25519 key must be 32 bytes"));
    }
    out.copy_from_slice(&raw[1..]);
    Ok(out)
}

fn encode_key_blob(key: &[u8; 32]) -> String {
    let mut blob = Zeroizing::new([0u8; 33]);
    blob[0] = ALG_ED25519;
    blob[1..].copy_from_slice(key);
    B64.encode(&blob[..])
}

/// An Ed25519 note signing key (C2SP signed-note), with its name and key id.
///
/// The secret is zeroized on drop by `ed25519_dalek::SigningKey`
/// (its default `zeroize` feature). `Debug` never prints the secret.
pub struct SignerKey {
    name: String,
    key_id: [u8; 4],
    key: SigningKey,
}

impl fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignerKey")
            .field("name", &self.name)
            .field("key_id", &hex_id(&self.key_id))
            .field("seed", &"<redacted>")
            .finish()
    }
}

impl SignerKey {
    /// Generates a new Ed25519 key named `name` from a seed drawn from the OS RNG.
    pub fn generate(name: &str) -> Result<SignerKey, NoteError> {
        check_name(name)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut seed[..]).map_err(|_| NoteError::Rng)?;
        SignerKey::from_seed(name, *seed)
    }

    /// Builds a key from a 32-byte Ed25519 seed (RFC 8032 private key).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<SignerKey, NoteError> {
        let mut seed = seed;
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        check_name(name)?;
        let key_id = key_id(name, key.verifying_key().as_bytes());
        Ok(SignerKey {
            name: name.to_owned(),
            key_id,
            key,
        })
    }

    /// A 32-byte key for `context`, derived from this key's seed (SHA-256 over a domain
    /// prefix, the context and the seed): keys for other uses that only this key's holder can
    /// compute, none revealing the seed.
    pub fn derive(&self, context: &str) -> Zeroizing<[u8; 32]> {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        h.update(b"consentry key derivation\0");
        h.update(context.as_bytes());
        h.update([0u8]);
        h.update(self.key.as_bytes());
        Zeroizing::new(h.finalize().into())
    }

    /// Parses `PRIVATE+KEY+<name>+<keyid hex>+<base64(0x01 || seed)>`,
    /// checking the algorithm byte, lengths and that the key id matches.
    pub fn parse(text: &str) -> Result<SignerKey, NoteError> {
        // The base64 part may itself contain '+', so split at most 5 ways.
        let ["PRIVATE", "KEY", name, id, b64] = *text.splitn(5, '+').collect::<Vec<_>>() else {
            return Err(malformed_key("expected PRIVATE+KEY+<name>+<id>+<key>"));
        };
        check_name(name)?;
        let id = parse_hex_id(id)?;
        let seed = decode_key_blob(b64)?;
        let key = SignerKey::from_seed(name, *seed)?;
        if key.key_id != id {
            return Err(NoteError::KeyIdMismatch);
        }
        Ok(key)
    }

    /// Encodes the private key text (the caller must protect the result).
    pub fn to_text(&self) -> String {
        let seed = Zeroizing::new(self.key.to_bytes());
        let blob = Zeroizing::new(encode_key_blob(&seed));
        let id = hex_id(&self.key_id);
        format!("PRIVATE+KEY+{}+{id}+{}", self.name, blob.as_str())
    }

    /// The matching verifier key.
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey {
            name: self.name.clone(),
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The C2SP signed-note key id (see [`key_id`]).
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    /// The private key as an RFC 8410 PKCS#8 v1 DER document, for libraries that take keys in
    /// that form (JWT signing). The caller must protect the result.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let seed = Zeroizing::new(self.key.to_bytes());
        let mut der = Zeroizing::new(Vec::with_capacity(48));
        der.extend_from_slice(&PREFIX);
        der.extend_from_slice(&seed[..]);
        der
    }

    /// Plain Ed25519 signature over arbitrary bytes (no note framing).
    pub fn sign_raw(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// Signs a C2SP signed-note text, returning `text + "\n" + signature line`.
    pub fn sign_note(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        let mut blob = Vec::with_capacity(68);
        blob.extend_from_slice(&self.key_id);
        blob.extend_from_slice(&self.sign_raw(text.as_bytes()));
        let b64 = B64.encode(blob);
        Ok(format!("{text}\n{SIG_PREFIX}{} {b64}\n", self.name))
    }
}

/// An Ed25519 note verifier key (C2SP signed-note), with its name and key id.
/// `Display` gives `<name>+<keyid hex>+<base64(0x01 || public key)>`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VerifierKey {
    name: String,
    key_id: [u8; 4],
    key: VerifyingKey,
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let blob = encode_key_blob(self.key.as_bytes());
        write!(f, "{}+{}+{}", self.name, hex_id(&self.key_id), blob)
    }
}

/// One signature line of a C2SP signed note: `— <name> base64(key_id || sig)`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NoteSignature {
    /// Key name from the signature line.
    pub name: String,
    /// First 4 decoded bytes (big-endian key id).
    pub key_id: [u8; 4],
    /// Remaining decoded bytes (64 for Ed25519; other algorithms may differ).
    pub sig: Vec<u8>,
}

impl VerifierKey {
    /// Parses `<name>+<keyid hex>+<base64(0x01 || public key)>`, checking the
    /// algorithm byte, lengths, point validity and that the key id matches.
    /// Small-order (weak) public keys are rejected.
    pub fn parse(text: &str) -> Result<VerifierKey, NoteError> {
        let [name, id, b64] = *text.splitn(3, '+').collect::<Vec<_>>() else {
            return Err(malformed_key("expected <name>+<id>+<key>"));
        };
        check_name(name)?;
        let id = parse_hex_id(id)?;
        let public = decode_key_blob(b64)?;
        let key = VerifyingKey::from_bytes(&public)
            .map_err(|_| malformed_key("not a valid Ed25519 public key"))?;
        if key.is_weak() {
            return Err(malformed_key("weak Ed25519 public key"));
        }
        if key_id(name, &public) != id {
            return Err(NoteError::KeyIdMismatch);
        }
        Ok(VerifierKey {
            name: name.to_owned(),
            key_id: id,
            key,
        })
    }

    /// The verifier key text (same as `Display`).
    pub fn to_text(&self) -> String {
        self.to_string()
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The C2SP signed-note key id (see [`key_id`]).
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    /// The 32-byte Ed25519 public key.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Verifies a plain Ed25519 signature (RFC 8032, `verify_strict`) over `msg`.
    pub fn verify_raw(&self, msg: &[u8], sig: &[u8]) -> bool {
        match Signature::from_slice(sig) {
            Ok(sig) => self.key.verify_strict(msg, &sig).is_ok(),
            Err(_) => false,
        }
    }

    /// Checks one signature line against `text` (the note text including its
    /// final newline): name and key id must match this key and the signature verify.
    pub fn verify_signature_line(&self, text: &str, sig: &NoteSignature) -> bool {
        sig.name == self.name
            && sig.key_id == self.key_id
            && self.verify_raw(text.as_bytes(), &sig.sig)
    }

    /// Verifies a C2SP signed note and returns its text. Every signature line
    /// with this key's name and id must verify, and there must be at least one;
    /// lines from other keys (e.g. witness cosignatures) are ignored.
    pub fn verify_note(&self, signed: &str) -> Result<String, NoteError> {
        let (text, sigs) = signatures(signed)?;
        let mut found = false;
        for sig in sigs
            .iter()
            .filter(|s| s.name == self.name && s.key_id == self.key_id)
        {
            if !self.verify_signature_line(&text, sig) {
                return Err(NoteError::BadSignature {
                    name: self.name.clone(),
                });
            }
            found = true;
        }
        if !found {
            return Err(NoteError::NoSignatureByKey {
                name: self.name.clone(),
            });
        }
        Ok(text)
    }
}

/// Splits a C2SP signed note into its text (up to and including the newline
/// before the last blank line) and its parsed signature lines. Checks framing
/// only; no signature is verified.
pub fn signatures(signed: &str) -> Result<(String, Vec<NoteSignature>), NoteError> {
    check_text(signed)?;
    let split = signed
        .rfind("\n\n")
        .ok_or_else(|| malformed_note("missing blank line before signatures"))?;
    let (text, block) = (&signed[..=split], &signed[split + 2..]);
    let Some(block) = block.strip_suffix('\n') else {
        return Err(malformed_note("empty signature block"));
    };
    let mut sigs = Vec::new();
    for line in block.split('\n') {
        if sigs.len() == MAX_SIGNATURES {
            return Err(malformed_note("too many signatures"));
        }
        let (name, b64) = line
            .strip_prefix(SIG_PREFIX)
            .and_then(|rest| rest.split_once(' '))
            .ok_or_else(|| malformed_note("signature line must be \"— <name> <base64>\""))?;
        check_name(name).map_err(|_| malformed_note("invalid key name in signature line"))?;
        let raw = B64
            .decode(b64)
            .map_err(|_| malformed_note("invalid base64 in signature line"))?;
        if raw.len() < 5 {
            return Err(malformed_note("signature too short"));
        }
        let key_id = [raw[0], raw[1], raw[2], raw[3]];
        sigs.push(NoteSignature {
            name: name.to_owned(),
            key_id,
            sig: raw[4..].to_vec(),
        });
    }
    Ok((text.to_owned(), sigs))
}

/// A C2SP tlog-checkpoint body: origin, tree size, root hash and optional
/// extension lines.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Checkpoint {
    /// Log origin line (non-empty, no surrounding whitespace).
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Merkle tree root hash.
    pub root: [u8; 32],
    /// Extension lines, each non-empty, without their newline.
    pub extensions: Vec<String>,
}

fn check_line(line: &str, reason: &'static str) -> Result<(), NoteError> {
    if line.is_empty() || line.chars().any(char::is_control) {
        return Err(malformed_cp(reason));
    }
    Ok(())
}

impl Checkpoint {
    /// Checks the fields can be encoded as a C2SP tlog-checkpoint body.
    pub fn validate(&self) -> Result<(), NoteError> {
        check_line(&self.origin, "origin must be a non-empty single line")?;
        if self.origin.trim() != self.origin {
            return Err(malformed_cp("origin has surrounding whitespace"));
        }
        for ext in &self.extensions {
            check_line(ext, "extension lines must be non-empty single lines")?;
        }
        Ok(())
    }

    /// Encodes the checkpoint note text (does not validate; see [`Checkpoint::validate`]).
    pub fn to_text(&self) -> String {
        let root = B64.encode(self.root);
        let mut out = format!("{}\n{}\n{root}\n", self.origin, self.size);
        for ext in &self.extensions {
            out.push_str(ext);
            out.push('\n');
        }
        out
    }

    /// Strictly parses a C2SP tlog-checkpoint note text (unsigned body).
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| malformed_cp("missing final newline"))?;
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(malformed_cp("need origin, size and root lines"));
        };
        let size_ok = !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
            && (size == "0" || !size.starts_with('0'));
        if !size_ok {
            return Err(malformed_cp("size must be decimal without leading zeros"));
        }
        let size = size
            .parse()
            .map_err(|_| malformed_cp("size out of range"))?;
        let root = B64
            .decode(root)
            .ok()
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .ok_or_else(|| malformed_cp("root must be 32 bytes of standard base64"))?;
        let cp = Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            extensions: lines.map(str::to_owned).collect(),
        };
        cp.validate()?;
        Ok(cp)
    }
}

/// Signs a checkpoint as a C2SP signed note. Errors if the checkpoint fields
/// are not encodable (see [`Checkpoint::validate`]).
pub fn sign_checkpoint(key: &SignerKey, cp: &Checkpoint) -> Result<String, NoteError> {
    cp.validate()?;
    key.sign_note(&cp.to_text())
}

/// Verifies `key`'s signature on a signed checkpoint, parses it, and checks the
/// origin against `expected_origin` if given.
pub fn open_checkpoint(
    key: &VerifierKey,
    signed: &str,
    expected_origin: Option<&str>,
) -> Result<Checkpoint, NoteError> {
    let cp = Checkpoint::parse(&key.verify_note(signed)?)?;
    if let Some(expected) = expected_origin.filter(|e| *e != cp.origin) {
        return Err(NoteError::OriginMismatch {
            expected: expected.to_owned(),
            found: cp.origin,
        });
    }
    Ok(cp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_per_context_and_per_key_and_hide_the_seed() {
        let seed = [5u8; 32];
        let k = SignerKey::from_seed("operator", seed).unwrap();
        let a = k.derive("consentry/study-secrets/v1");
        assert_eq!(
            *a,
            *SignerKey::from_seed("operator", seed)
                .unwrap()
                .derive("consentry/study-secrets/v1")
        );
        assert_ne!(*a, *k.derive("another use"));
        assert_ne!(
            *a,
            *SignerKey::from_seed("operator", [6u8; 32])
                .unwrap()
                .derive("consentry/study-secrets/v1")
        );
        assert_ne!(*a, seed);
    }
    use proptest::prelude::*;

    #[derive(serde::Deserialize)]
    struct Vector {
        signer_key: String,
        verifier_key: String,
        key_name: String,
        key_id_hex: String,
        text: String,
        signed_note: String,
    }

    fn vector() -> Vector {
        let path = crate::test_support::testdata().join("signed-note/peterneumann.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Short tag per error variant, so rejection tables stay one line per case.
    fn tag<T>(r: Result<T, NoteError>) -> &'static str {
        match r.err() {
            None => "ok",
            Some(NoteError::MalformedKey { .. }) => "key",
            Some(NoteError::InvalidKeyName) => "name",
            Some(NoteError::WrongAlgorithm) => "alg",
            Some(NoteError::KeyIdMismatch) => "id",
            Some(NoteError::MalformedNote { .. }) => "note",
            Some(NoteError::NoSignatureByKey { .. }) => "none",
            Some(NoteError::BadSignature { .. }) => "bad",
            Some(NoteError::MalformedCheckpoint { .. }) => "cp",
            Some(NoteError::OriginMismatch { .. }) => "origin",
            Some(NoteError::Rng) => "rng",
        }
    }

    fn blob(alg: u8, bytes: &[u8]) -> String {
        B64.encode([&[alg][..], bytes].concat())
    }

    #[test]
    fn reference_vector() {
        let v = vector();
        let signer = SignerKey::parse(&v.signer_key).unwrap();
        let verifier = VerifierKey::parse(&v.verifier_key).unwrap();
        assert_eq!(signer.name(), v.key_name);
        assert_eq!(hex_id(&signer.key_id()), v.key_id_hex);
        let id = key_id("PeterNeumann", &verifier.public_bytes());
        assert_eq!(hex_id(&id), "c74f20a3");
        assert_eq!(signer.verifier(), verifier);
        assert_eq!(signer.sign_note(&v.text).unwrap(), v.signed_note);
        assert_eq!(verifier.verify_note(&v.signed_note).unwrap(), v.text);
        assert_eq!(signer.to_text(), v.signer_key);
        assert_eq!(verifier.to_text(), v.verifier_key);
        assert_eq!(verifier.to_string(), v.verifier_key);
        let sig = signer.sign_raw(b"entry");
        assert!(verifier.verify_raw(b"entry", &sig));
        assert!(!verifier.verify_raw(b"entry2", &sig));
        assert!(!verifier.verify_raw(b"entry", &sig[..63]));
        let (k, vk) = (SignerKey::generate("example.com/log").unwrap(), verifier);
        let vk2 = SignerKey::parse(&k.to_text()).unwrap().verifier();
        assert!(vk2 == k.verifier() && vk2 != vk);
        assert_eq!(VerifierKey::parse(&vk2.to_text()).unwrap(), vk2);
        assert_eq!(tag(SignerKey::generate("a b")), "name");
    }

    #[test]
    fn key_rejections() {
        let v = vector();
        let pk = VerifierKey::parse(&v.verifier_key).unwrap().public_bytes();
        let seed = decode_key_blob(v.signer_key.rsplit_once("+c74f20a3+").unwrap().1).unwrap();
        let (pk, seed, id) = (&pk[..], &seed[..], "c74f20a3");
        let vk = |name: &str, id: &str, b: String| format!("{name}+{id}+{b}");
        let sk = |name: &str, id: &str, b: String| format!("PRIVATE+KEY+{name}+{id}+{b}");
        let verifier_cases = [
            (vk("PeterNeumann", id, blob(2, pk)), "alg"),
            (vk("PeterNeumann", "c74f20a4", blob(1, pk)), "id"),
            (vk("Other", id, blob(1, pk)), "id"),
            (vk("PeterNeumann", "C74F20A3", blob(1, pk)), "key"),
            (vk("PeterNeumann", id, "!!!!".into()), "key"),
            (vk("PeterNeumann", id, blob(1, &pk[..31])), "key"),
            (vk("PeterNeumann", id, blob(1, &[pk, &[0]].concat())), "key"),
            (vk("PeterNeumann", id, blob(1, &[0; 32])), "key"), // small-order point
            (vk("Peter Neumann", id, blob(1, pk)), "name"),
            (vk("Peter\u{3000}Neumann", id, blob(1, pk)), "name"),
            (vk("", id, blob(1, pk)), "name"),
            (vk("Peter+Neumann", id, blob(1, pk)), "key"),
            ("PeterNeumann+c74f20a3".into(), "key"),
        ];
        for (text, want) in verifier_cases {
            assert_eq!(tag(VerifierKey::parse(&text)), want, "{text}");
        }
        let signer_cases = [
            (sk("PeterNeumann", id, blob(2, seed)), "alg"),
            (sk("PeterNeumann", "00000000", blob(1, seed)), "id"),
            (sk("Other", id, blob(1, seed)), "id"),
            (sk("PeterNeumann", id, "AYEK%%%%".into()), "key"),
            (sk("PeterNeumann", id, blob(1, &seed[..31])), "key"),
            (sk("Peter Neumann", id, blob(1, seed)), "name"),
            (sk("Peter+Neumann", id, blob(1, seed)), "key"),
            (v.signer_key.replacen("PRIVATE+KEY+", "", 1), "key"),
            (v.verifier_key.clone(), "key"),
        ];
        for (i, (text, want)) in signer_cases.iter().enumerate() {
            assert_eq!(tag(SignerKey::parse(text)), *want, "signer case {i}");
        }
        for name in ["a+b", "a b", "a\tb", "", "a\u{a0}b"] {
            assert_eq!(tag(SignerKey::from_seed(name, [1; 32])), "name", "{name:?}");
        }
    }

    #[test]
    fn note_rejections() {
        let v = vector();
        let verifier = VerifierKey::parse(&v.verifier_key).unwrap();
        let (text, sigs) = signatures(&v.signed_note).unwrap();
        assert_eq!(text, v.text);
        let mut raw = [&sigs[0].key_id[..], &sigs[0].sig].concat();
        raw[10] ^= 1;
        let bad_line = format!("— PeterNeumann {}\n", B64.encode(&raw));
        let impostor = SignerKey::from_seed("PeterNeumann", [7; 32]).unwrap();
        let witness = SignerKey::from_seed("witness.example", [9; 32]).unwrap();
        let witness_only = witness.sign_note(&v.text).unwrap();
        let witness_line = witness_only.rsplit_once("\n\n").unwrap().1;
        let sig_line = v.signed_note.rsplit_once("\n\n").unwrap().1;
        let (t, sn) = (&v.text, &v.signed_note);
        let cases = [
            (sn.replace("problem,", "problem;"), "bad"), // tampered text
            (format!("{t}\n{bad_line}"), "bad"),         // tampered signature
            (format!("{sn}{bad_line}"), "bad"),          // good + bad by same key
            (impostor.sign_note(t).unwrap(), "none"),    // same name, other key
            (witness_only.clone(), "none"),              // only other signers
            (format!("{t}\n"), "note"),                  // missing signature
            (format!("{t}{sig_line}"), "note"),          // missing blank line
            (sn.replace('\n', "\r\n"), "note"),          // CRLF
            (sn.trim_end().to_owned(), "note"),          // no final newline
            (sn.replace('—', "-"), "note"),              // ASCII dash
            (format!("{t}\n— PeterNeumann AAAA\n"), "note"), // too short
            (format!("{t}\n— PeterNeumann ****\n"), "note"), // bad base64
            (sn.replace("— PeterNeumann", "— Peter Neumann"), "note"), // name with space
            (format!("{sn}{witness_line}"), "ok"),       // cosigned
        ];
        for (i, (signed, want)) in cases.iter().enumerate() {
            assert_eq!(tag(verifier.verify_note(signed)), *want, "note case {i}");
        }
        for text in ["", "no newline", "a\r\n", "tab\there\n"] {
            assert_eq!(tag(witness.sign_note(text)), "note", "{text:?}");
        }
        // A witness cosignature line is checkable on its own.
        let cosigned = format!("{sn}{witness_line}");
        assert_eq!(witness.verifier().verify_note(&cosigned).unwrap(), v.text);
        let (text, sigs) = signatures(&cosigned).unwrap();
        assert_eq!(sigs.len(), 2);
        assert!(witness.verifier().verify_signature_line(&text, &sigs[1]));
        assert!(!witness.verifier().verify_signature_line(&text, &sigs[0]));
        assert!(!verifier.verify_signature_line("other\n", &sigs[0]));
    }

    #[test]
    fn debug_hides_secret() {
        let v = vector();
        let signer = SignerKey::parse(&v.signer_key).unwrap();
        let blob = v.signer_key.rsplit_once("+c74f20a3+").unwrap().1;
        let seed = decode_key_blob(blob).unwrap();
        let dbg = format!("{signer:?}");
        assert!(
            dbg.contains("PeterNeumann") && dbg.contains("c74f20a3"),
            "{dbg}"
        );
        assert!(
            !dbg.contains(blob) && !dbg.contains(&B64.encode(&seed[..])),
            "{dbg}"
        );
        assert!(!dbg.contains(&format!("{:?}", &seed[..])), "{dbg}");
    }

    #[test]
    fn checkpoint_round_trip_and_rejections() {
        let origin = "example.com/consent-log";
        let exts = vec!["— not a signature".to_owned(), "ext 2".to_owned()];
        let cp = Checkpoint {
            origin: origin.into(),
            size: 42,
            root: [3; 32],
            extensions: exts,
        };
        let key = SignerKey::from_seed(origin, [5; 32]).unwrap();
        let signed = sign_checkpoint(&key, &cp).unwrap();
        let v = key.verifier();
        assert_eq!(open_checkpoint(&v, &signed, Some(origin)).unwrap(), cp);
        assert_eq!(open_checkpoint(&v, &signed, None).unwrap(), cp);
        assert_eq!(tag(open_checkpoint(&v, &signed, Some("other"))), "origin");
        let other = SignerKey::from_seed("other", [6; 32]).unwrap().verifier();
        assert_eq!(tag(open_checkpoint(&other, &signed, None)), "none");
        let empty = Checkpoint {
            origin: String::new(),
            ..cp.clone()
        };
        assert_eq!(tag(sign_checkpoint(&key, &empty)), "cp");
        let multi = Checkpoint {
            extensions: vec!["a\nb".into()],
            ..cp.clone()
        };
        assert_eq!(tag(sign_checkpoint(&key, &multi)), "cp");

        let (r, r31, r33) = (
            B64.encode([3u8; 32]),
            B64.encode([3u8; 31]),
            B64.encode([3u8; 33]),
        );
        let rejects = [
            format!("o\n042\n{r}\n"),
            format!("o\n00\n{r}\n"),
            format!("o\n-1\n{r}\n"),
            format!("o\n+1\n{r}\n"),
            format!("o\n0x10\n{r}\n"),
            format!("o\n1e3\n{r}\n"),
            format!("o\n\n{r}\n"),
            format!("o\n18446744073709551616\n{r}\n"),
            format!("o\n1\n{r31}\n"),
            format!("o\n1\n{r33}\n"),
            format!("o\n1\n{}\n", r.trim_end_matches('=')),
            format!("o\n1\n{r}"),
            format!("\n1\n{r}\n"),
            format!(" o\n1\n{r}\n"),
            format!("o \n1\n{r}\n"),
            format!("o\r\n1\n{r}\n"),
            format!("o\n1\n{r}\n\n"),
            format!("o\n1\n{r}\next\n\nmore\n"),
            "o\n1\n".to_owned(),
            String::new(),
        ];
        for text in &rejects {
            assert_eq!(tag(Checkpoint::parse(text)), "cp", "{text:?}");
        }
        let zero = Checkpoint::parse(&format!("o\n0\n{r}\n")).unwrap();
        assert_eq!((zero.size, zero.extensions.len()), (0, 0));
        let max = Checkpoint::parse(&format!("o\n18446744073709551615\n{r}\nx\n")).unwrap();
        assert_eq!((max.size, max.extensions), (u64::MAX, vec!["x".to_owned()]));
    }

    proptest! {
        #[test]
        fn checkpoint_round_trip_prop(
            origin in "[!-~]([ -~\u{e9}\u{2014}]{0,30}[!-~])?",
            size in any::<u64>(),
            root in any::<[u8; 32]>(),
            extensions in proptest::collection::vec("[ -~]{1,20}", 0..3),
        ) {
            let cp = Checkpoint { origin, size, root, extensions };
            prop_assert_eq!(Checkpoint::parse(&cp.to_text()).unwrap(), cp.clone());
            let key = SignerKey::from_seed("log", root).unwrap();
            let signed = sign_checkpoint(&key, &cp).unwrap();
            prop_assert_eq!(open_checkpoint(&key.verifier(), &signed, Some(&cp.origin)).unwrap(), cp);
        }
    }
}
