//! Typed ledger entries and their canonical bytes.
//!
//! An [`Entry`] is a statement by one principal (its `author`) at a `time`. Its canonical bytes
//! are its RFC 8785 (JCS) canonical JSON. The author signs those bytes with Ed25519; the stored
//! leaf (the Merkle tree's leaf data) is the canonical JSON of the envelope
//! `{"entry":<entry>,"sig":"<base64 signature>"}`, so the signed bytes are a contiguous slice
//! of the leaf and any language can check both with a JCS library and Ed25519.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::duo::{Modifier, Purpose};
use crate::ids::{DatasetId, Digest, PrincipalId, Role, StudyId, SubjectId, Timestamp};
use crate::jcs::{self, NonFinite};

/// The entry format version written in every entry's `v`.
pub const FORMAT_VERSION: u32 = 1;

/// A statement on the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Who makes the statement; the entry carries that principal's signature.
    pub author: PrincipalId,
    /// When the author made it (checked against the ledger's clock on append).
    pub time: Timestamp,
    /// What it says.
    pub body: Body,
}

/// Declares the entry kinds once: each variant of [`Body`], its doc, its name as written in
/// entries and its body type. Everything that lists kinds (the name of a body, the list of
/// names, decoding a body of a named kind, serializing one) is generated from this table, so
/// a new kind is one line here plus its body type and its state rule.
macro_rules! entry_kinds {
    ($($(#[doc = $doc:literal])* $variant:ident($body:ty) = $name:literal,)+) => {
        /// The kinds of entry.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Body {
            $($(#[doc = $doc])* $variant($body),)+
        }

        impl Body {
            /// The kind's name as written in entries.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Body::$variant(_) => $name,)+
                }
            }

            /// All kind names, for help texts and decoding.
            pub const KINDS: &'static [&'static str] = &[$($name),+];

            /// Deserializes a body of the named kind (`None`: no such kind).
            pub(crate) fn deserialize_kind<'de, D: serde::Deserializer<'de>>(
                kind: &str,
                d: D,
            ) -> Option<Result<Body, D::Error>> {
                Some(match kind {
                    $($name => <$body as Deserialize>::deserialize(d).map(Body::$variant),)+
                    _ => return None,
                })
            }
        }

        /// A body serializes as its kind's fields (the kind is written beside it, in `kind`).
        impl Serialize for Body {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(Body::$variant(b) => b.serialize(s),)+
                }
            }
        }
    };
}

entry_kinds! {
    /// A principal and its first key.
    PrincipalRegistered(PrincipalRegistered) = "principal_registered",
    /// A principal's new key (the old one stops being valid).
    KeyRotated(KeyRotated) = "key_rotated",
    /// A principal may no longer act.
    PrincipalRevoked(PrincipalRevoked) = "principal_revoked",
    /// A dataset version, with the digests of its files.
    DatasetRegistered(DatasetRegistered) = "dataset_registered",
    /// A subject's consent.
    ConsentGranted(ConsentGranted) = "consent_granted",
    /// A consent withdrawn, or an objection (opt-out).
    ConsentRevoked(ConsentRevoked) = "consent_revoked",
    /// A study and what it wants to do.
    StudyRegistered(StudyRegistered) = "study_registered",
    /// An IRB's approval with budgets.
    StudyApproved(StudyApproved) = "study_approved",
    /// An IRB stops a study for now.
    StudySuspended(StudyStatus) = "study_suspended",
    /// An IRB ends a study for good.
    StudyClosed(StudyStatus) = "study_closed",
    /// A query's outcome.
    QueryReceipt(QueryReceipt) = "query_receipt",
    /// A witness cosigned a checkpoint.
    CheckpointCosigned(CheckpointCosigned) = "checkpoint_cosigned",
}

/// Body of `principal_registered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalRegistered {
    /// The principal's id, equal to its key's name.
    pub id: PrincipalId,
    /// What it may do.
    pub role: Role,
    /// Its Ed25519 verifier key in signed-note text form.
    pub key: String,
    /// For a patient: the privacy-unit id that is theirs in the datasets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<SubjectId>,
    /// A human-readable name (an institution's, say). Never a patient's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// Body of `key_rotated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotated {
    /// Whose key.
    pub id: PrincipalId,
    /// The new verifier key (same name).
    pub key: String,
}

/// Body of `principal_revoked`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalRevoked {
    /// Who.
    pub id: PrincipalId,
    /// Why, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How a dataset's subjects are included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentBasis {
    /// Only subjects with a consent that permits the study are included.
    OptIn,
    /// Every subject is included unless they objected (or revoked).
    OptOut,
}

/// One file of a dataset version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileManifest {
    /// Path relative to the dataset root.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file's bytes.
    pub sha256: Digest,
    /// Rows in the file.
    pub rows: u64,
}

/// One column of a table schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnManifest {
    /// Column name.
    pub name: String,
    /// Arrow data type, as Arrow displays it (e.g. `Int64`, `Utf8`, `Date32`).
    pub data_type: String,
    /// Whether nulls may occur.
    pub nullable: bool,
}

/// One table of a dataset version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableManifest {
    /// Table name as queried in SQL.
    pub name: String,
    /// Rows in the table.
    pub rows: u64,
    /// Its schema.
    pub columns: Vec<ColumnManifest>,
    /// Its files.
    pub files: Vec<FileManifest>,
}

/// Body of `dataset_registered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRegistered {
    /// The dataset.
    pub dataset: DatasetId,
    /// This version's number; strictly greater than the dataset's previous versions.
    pub version: u32,
    /// The custodian that holds it (must be the author).
    pub custodian: PrincipalId,
    /// Opt-in or opt-out.
    pub consent_basis: ConsentBasis,
    /// The column that holds the privacy-unit id in every table.
    pub privacy_unit: String,
    /// SHA-256 of the column policy file.
    pub policy_digest: Digest,
    /// The tables, their schemas and files.
    pub tables: Vec<TableManifest>,
    /// One digest for the whole version: SHA-256 of the canonical JSON of `tables`.
    pub digest: Digest,
}

impl DatasetRegistered {
    /// The digest of a version's table manifests: SHA-256 over their canonical JSON.
    pub fn compute_digest(tables: &[TableManifest]) -> Digest {
        Digest::of(&canonical_json(&tables).expect("manifests always serialize"))
    }
    /// Total rows over all tables.
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// What a consent covers: named datasets, or every dataset of a custodian.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentScope {
    /// Datasets covered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<DatasetId>,
    /// A custodian all of whose datasets are covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custodian: Option<PrincipalId>,
}

impl ConsentScope {
    /// Whether the scope covers `dataset` held by `custodian`.
    pub fn covers(&self, dataset: &DatasetId, custodian: &PrincipalId) -> bool {
        self.custodian.as_ref() == Some(custodian) || self.datasets.contains(dataset)
    }
}

/// Body of `consent_granted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentGranted {
    /// The consent's id, unique on the ledger (e.g. a UUID or the FHIR Consent id).
    pub consent_id: String,
    /// The privacy-unit id as it appears in the datasets.
    pub subject: SubjectId,
    /// What it covers.
    pub scope: ConsentScope,
    /// Permitted purposes (any of them).
    pub purposes: Vec<Purpose>,
    /// Restrictions (all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modifiers: Vec<Modifier>,
    /// If not empty, only these studies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub studies_allow: Vec<StudyId>,
    /// Never these studies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub studies_deny: Vec<StudyId>,
    /// Start of validity.
    pub valid_from: Timestamp,
    /// End of validity (exclusive); open-ended if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<Timestamp>,
    /// Who granted it: the patient or the custodian recording a paper consent. Equals the
    /// entry's author.
    pub grantor: PrincipalId,
    /// The FHIR R4 Consent resource id this came from or maps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_id: Option<String>,
    /// A consent of the same subject that this one replaces (how consent is limited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// Body of `consent_revoked`: either one consent by id, or an objection over a scope (which
/// also ends every consent of the subject within it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRevoked {
    /// The subject.
    pub subject: SubjectId,
    /// The consent revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_id: Option<String>,
    /// Or: the scope objected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ConsentScope>,
    /// Who revoked: the patient or a custodian. Equals the entry's author.
    pub grantor: PrincipalId,
    /// Why, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Body of `study_registered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyRegistered {
    /// The study's id.
    pub study: StudyId,
    /// Its title.
    pub title: String,
    /// The sponsor principal.
    pub sponsor: PrincipalId,
    /// The principal investigator (a researcher, also a member).
    pub pi: PrincipalId,
    /// Researchers who may query within the study.
    pub researchers: Vec<PrincipalId>,
    /// The research purpose.
    pub purpose: Purpose,
    /// Commercial use or a for-profit organisation.
    pub commercial: bool,
    /// General methods development.
    #[serde(default)]
    pub methods_development: bool,
    /// Datasets requested.
    pub datasets: Vec<DatasetId>,
}

/// What an approval grants on one dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetGrant {
    /// The dataset.
    pub dataset: DatasetId,
    /// Total epsilon over the study's life on this dataset.
    pub epsilon: f64,
    /// Total delta.
    pub delta: f64,
    /// Differentially private aggregates allowed.
    pub dp: bool,
    /// De-identified extracts allowed, with this k for k-anonymity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract_k: Option<u32>,
    /// For aggregates outside DP: counts below this are suppressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cell_size: Option<u32>,
}

/// Body of `study_approved`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyApproved {
    /// The study.
    pub study: StudyId,
    /// Per dataset: budget and modes. Replaces any earlier approval's grants.
    pub grants: Vec<DatasetGrant>,
    /// Start of the approval.
    pub valid_from: Timestamp,
    /// End of the approval (exclusive).
    pub valid_until: Timestamp,
}

/// Body of `study_suspended` and `study_closed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyStatus {
    /// The study.
    pub study: StudyId,
    /// Why.
    pub reason: String,
}

/// The query mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryMode {
    /// Differentially private aggregates.
    Dp,
    /// A de-identified, k-anonymous extract.
    Extract,
}

/// Whether a query's result was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Released to the researcher.
    Released,
    /// Refused; the receipt says why.
    Denied,
    /// Charged, then failed while running: nothing released, the spend debited (how a query
    /// fails must not be a free oracle). The reason is fixed words.
    Failed,
}

/// Body of `query_receipt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryReceipt {
    /// The study the query ran in (for a denied query: the study it named).
    pub study: String,
    /// Who asked.
    pub researcher: PrincipalId,
    /// The dataset queried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetId>,
    /// Its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The version's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_digest: Option<Digest>,
    /// The normalized SQL.
    pub sql: String,
    /// DP aggregates or extract.
    pub mode: QueryMode,
    /// Mechanism parameters (noise, scales, bounds, k, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mechanism: BTreeMap<String, serde_json::Value>,
    /// Epsilon spent (0 when denied).
    pub epsilon: f64,
    /// Delta spent.
    pub delta: f64,
    /// Rho (zero-concentrated DP) spent, for a query with Gaussian noise: its whole spend in
    /// zCDP (each pure part's `epsilon² / 2` included). Absent for pure and approximate DP
    /// queries, whose rho is `epsilon² / 2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rho: Option<f64>,
    /// Digest of the consent snapshot (the included or excluded subjects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_digest: Option<Digest>,
    /// Digest of the released result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_digest: Option<Digest>,
    /// Released or denied.
    pub outcome: Outcome,
    /// For a denial: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For an extract: rows suppressed for k-anonymity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_suppressed: Option<u64>,
}

/// Body of `checkpoint_cosigned`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointCosigned {
    /// The checkpoint as a signed note carrying the ledger's signature and the witness's
    /// (the author's) signature line.
    pub checkpoint: String,
}

impl Body {
    /// The study the entry concerns: a study's registration, approval, suspension or
    /// closure, or a query receipt (whose study may be `-` when the request named none).
    /// The one answer to "which study is this entry about".
    pub fn study(&self) -> Option<&str> {
        match self {
            Body::StudyRegistered(b) => Some(b.study.as_str()),
            Body::StudyApproved(b) => Some(b.study.as_str()),
            Body::StudySuspended(b) | Body::StudyClosed(b) => Some(b.study.as_str()),
            Body::QueryReceipt(b) => Some(b.study.as_str()),
            Body::PrincipalRegistered(_)
            | Body::KeyRotated(_)
            | Body::PrincipalRevoked(_)
            | Body::DatasetRegistered(_)
            | Body::ConsentGranted(_)
            | Body::ConsentRevoked(_)
            | Body::CheckpointCosigned(_) => None,
        }
    }

    /// The principal whose registration, key rotation or revocation the entry is.
    pub fn principal(&self) -> Option<&PrincipalId> {
        match self {
            Body::PrincipalRegistered(b) => Some(&b.id),
            Body::KeyRotated(b) => Some(&b.id),
            Body::PrincipalRevoked(b) => Some(&b.id),
            _ => None,
        }
    }

    /// Parses a body of the named kind from JSON text.
    pub fn from_json(kind: &str, json: &str) -> Result<Body, DecodeError> {
        let mut d = serde_json::Deserializer::from_str(json);
        let body = Body::deserialize_kind(kind, &mut d)
            .ok_or_else(|| DecodeError::UnknownKind(kind.chars().take(40).collect()))?
            .and_then(|b| d.end().map(|()| b))
            .map_err(|e| DecodeError::Json(e.to_string()))?;
        Ok(body)
    }
}

/// Why bytes are not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON of the expected shape.
    #[error("malformed entry JSON: {0}")]
    Json(String),
    /// An unknown `kind`.
    #[error("unknown entry kind {0:?}")]
    UnknownKind(String),
    /// An unsupported format version.
    #[error("unsupported entry format version {0}")]
    Version(u32),
    /// Not the canonical (RFC 8785) form.
    #[error("entry is not in canonical (RFC 8785) form")]
    NotCanonical,
    /// The leaf envelope is malformed.
    #[error("malformed leaf envelope: {0}")]
    Envelope(&'static str),
}

#[derive(Serialize)]
struct EntryOut<'a> {
    v: u32,
    author: &'a PrincipalId,
    time: Timestamp,
    kind: &'static str,
    body: &'a Body,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryIn<'a> {
    v: u32,
    author: PrincipalId,
    time: Timestamp,
    kind: &'a str,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// RFC 8785 canonical JSON of any serializable value.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, DecodeError> {
    jcs::to_vec(value).map_err(|e| DecodeError::Json(e.to_string()))
}

impl Entry {
    /// The entry's canonical bytes: what its author signs.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let out = EntryOut {
            v: FORMAT_VERSION,
            author: &self.author,
            time: self.time,
            kind: self.body.kind(),
            body: &self.body,
        };
        // Bodies were once converted to `serde_json::Value` first, which writes a non-finite
        // float as `null`; the same bytes are kept (such entries are refused by the rules).
        jcs::to_vec_with(&out, NonFinite::Null).expect("entries always serialize")
    }

    /// Parses an entry from JSON (any formatting). Fields are checked; use
    /// [`Entry::canonical_bytes`] to get the form that is signed.
    pub fn from_json(json: &[u8]) -> Result<Entry, DecodeError> {
        // Stored leaves decode in one pass; anything that does not, here.
        if let Some(entry) = crate::decode::entry(json) {
            return Ok(entry);
        }
        Self::from_json_general(json)
    }

    /// The general decoder: the body is read as raw JSON, then typed by its kind.
    fn from_json_general(json: &[u8]) -> Result<Entry, DecodeError> {
        let raw: EntryIn<'_> =
            serde_json::from_slice(json).map_err(|e| DecodeError::Json(e.to_string()))?;
        if raw.v != FORMAT_VERSION {
            return Err(DecodeError::Version(raw.v));
        }
        let body = Body::from_json(raw.kind, raw.body.get())?;
        Ok(Entry {
            author: raw.author,
            time: raw.time,
            body,
        })
    }

    /// A JSON value for display (the decoded entry).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_slice(&self.canonical_bytes()).expect("canonical bytes are JSON")
    }
}

/// An entry with its author's signature.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedEntry {
    /// The statement.
    pub entry: Entry,
    /// Ed25519 signature over `entry.canonical_bytes()`.
    pub sig: [u8; 64],
}

const LEAF_PREFIX: &[u8] = b"{\"entry\":";
const SIG_PREFIX: &[u8] = b",\"sig\":\"";
/// Base64 of 64 bytes is 88 characters.
const SIG_B64_LEN: usize = 88;
const LEAF_SUFFIX_LEN: usize = SIG_PREFIX.len() + SIG_B64_LEN + 2;

impl SignedEntry {
    /// Signs `entry` with its author's key (whose name must be the author).
    pub fn sign(key: &crate::note::SignerKey, entry: Entry) -> SignedEntry {
        let sig = key.sign_raw(&entry.canonical_bytes());
        SignedEntry { entry, sig }
    }

    /// The leaf bytes: canonical JSON `{"entry":<canonical entry>,"sig":"<base64>"}`.
    pub fn leaf_bytes(&self) -> Vec<u8> {
        leaf_from_parts(&self.entry.canonical_bytes(), &self.sig)
    }

    /// Decodes leaf bytes. With `strict`, also checks that the entry is in canonical form
    /// (a full re-encoding; replay on open skips it because stored bytes are hash-checked).
    pub fn from_leaf(leaf: &[u8], strict: bool) -> Result<SignedEntry, DecodeError> {
        let (entry_bytes, sig) = split_leaf(leaf)?;
        let entry = Entry::from_json(entry_bytes)?;
        if strict && entry.canonical_bytes() != entry_bytes {
            return Err(DecodeError::NotCanonical);
        }
        Ok(SignedEntry { entry, sig })
    }
}

/// Builds leaf bytes from an entry's canonical bytes and its signature.
pub fn leaf_from_parts(entry_canonical: &[u8], sig: &[u8; 64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEAF_PREFIX.len() + entry_canonical.len() + LEAF_SUFFIX_LEN);
    out.extend_from_slice(LEAF_PREFIX);
    out.extend_from_slice(entry_canonical);
    out.extend_from_slice(SIG_PREFIX);
    out.extend_from_slice(B64.encode(sig).as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// Splits leaf bytes into the entry's canonical bytes (what was signed) and the signature.
pub fn split_leaf(leaf: &[u8]) -> Result<(&[u8], [u8; 64]), DecodeError> {
    if leaf.len() < LEAF_PREFIX.len() + 2 + LEAF_SUFFIX_LEN || !leaf.starts_with(LEAF_PREFIX) {
        return Err(DecodeError::Envelope(
            "expected {\"entry\":...,\"sig\":...}",
        ));
    }
    let suffix = &leaf[leaf.len() - LEAF_SUFFIX_LEN..];
    if !suffix.starts_with(SIG_PREFIX) || !suffix.ends_with(b"\"}") {
        return Err(DecodeError::Envelope("expected the signature last"));
    }
    let sig_b64 = &suffix[SIG_PREFIX.len()..SIG_PREFIX.len() + SIG_B64_LEN];
    // 88 base64 characters hold at most 66 bytes, so the buffer is never too small.
    let mut buf = [0u8; 66];
    let n = B64
        .decode_slice(sig_b64, &mut buf)
        .map_err(|_| DecodeError::Envelope("bad signature base64"))?;
    let sig: [u8; 64] = buf[..n]
        .try_into()
        .map_err(|_| DecodeError::Envelope("signature must be 64 bytes"))?;
    Ok((&leaf[LEAF_PREFIX.len()..leaf.len() - LEAF_SUFFIX_LEN], sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            author: PrincipalId::new("st-mary").unwrap(),
            time: Timestamp::parse("2026-11-21T22:00:00Z").unwrap(),
            body: Body::StudyApproved(StudyApproved {
                study: StudyId::new("t2d-outcomes").unwrap(),
                grants: vec![DatasetGrant {
                    dataset: DatasetId::new("ehr").unwrap(),
                    epsilon: 1.0,
                    delta: 1e-7,
                    dp: true,
                    extract_k: Some(5),
                    min_cell_size: None,
                }],
                valid_from: Timestamp::parse("2026-01-01T00:00:00Z").unwrap(),
                valid_until: Timestamp::parse("2027-01-01T00:00:00Z").unwrap(),
            }),
        }
    }

    #[test]
    fn canonical_bytes_follow_rfc8785() {
        let bytes = sample().canonical_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        // Keys sorted, no whitespace, ES6 number forms (1 not 1.0, 1e-7).
        assert_eq!(
            text,
            concat!(
                r#"{"author":"st-mary","body":{"grants":[{"dataset":"ehr","delta":1e-7,"dp":true,"#,
                r#""epsilon":1,"extract_k":5}],"study":"t2d-outcomes","#,
                r#""valid_from":"2026-01-01T00:00:00Z","valid_until":"2027-01-01T00:00:00Z"},"#,
                r#""kind":"study_approved","time":"2026-11-21T22:00:00Z","v":1}"#
            )
        );
    }

    /// The encoding before the direct writer: the body converted to a `serde_json::Value`,
    /// then the whole entry through serde_jcs.
    fn reference_bytes(e: &Entry) -> Vec<u8> {
        #[derive(Serialize)]
        struct Out<'a> {
            v: u32,
            author: &'a PrincipalId,
            time: Timestamp,
            kind: &'static str,
            body: serde_json::Value,
        }
        serde_jcs::to_vec(&Out {
            v: FORMAT_VERSION,
            author: &e.author,
            time: e.time,
            kind: e.body.kind(),
            body: serde_json::to_value(&e.body).unwrap(),
        })
        .unwrap()
    }

    fn receipt(sql: String, epsilon: f64, mechanism: BTreeMap<String, serde_json::Value>) -> Entry {
        Entry {
            author: PrincipalId::new("operator").unwrap(),
            time: Timestamp::parse("2026-11-21T22:00:00Z").unwrap(),
            body: Body::QueryReceipt(QueryReceipt {
                study: "t2d \u{e9} \"quoted\"".into(),
                researcher: PrincipalId::new("dr-lee").unwrap(),
                dataset: Some(DatasetId::new("ehr").unwrap()),
                version: Some(u32::MAX),
                dataset_digest: Some(Digest::of(b"x")),
                sql,
                mode: QueryMode::Dp,
                mechanism,
                epsilon,
                delta: 1e-300,
                rho: None,
                consent_digest: None,
                result_digest: Some(Digest::of(b"y")),
                outcome: Outcome::Released,
                reason: None,
                rows_suppressed: Some(u64::MAX),
            }),
        }
    }

    #[test]
    fn canonical_bytes_match_the_reference_encoder() {
        let mechanism: BTreeMap<String, serde_json::Value> = [
            ("noise".to_string(), serde_json::json!("laplace")),
            (
                "\u{e9}t\u{e9}".to_string(),
                serde_json::json!({"z": [1.5, -0.0, 1e21], "a": null}),
            ),
            (
                "\u{1f600}".to_string(),
                serde_json::json!(9007199254740993u64),
            ),
            (
                "\u{fb33}".to_string(),
                serde_json::json!("tab\tnul\u{0}\u{2028}"),
            ),
        ]
        .into();
        let registered = Entry {
            author: PrincipalId::new("operator").unwrap(),
            time: Timestamp::parse("2026-01-01T00:00:00Z").unwrap(),
            body: Body::PrincipalRevoked(PrincipalRevoked {
                id: PrincipalId::new("dr-lee").unwrap(),
                reason: Some("left \"the\" lab\r\n\u{1b}[31m \u{7f} 😀".into()),
            }),
        };
        let cases = [
            sample(),
            registered,
            receipt("SELECT 1".into(), 0.001, BTreeMap::new()),
            receipt("SELECT \"é\" -- \\ \u{0}".into(), 1.0 / 3.0, mechanism),
            // Non-finite floats were written as null (the rules refuse such entries).
            receipt("x".into(), f64::NAN, BTreeMap::new()),
            receipt("x".into(), f64::NEG_INFINITY, BTreeMap::new()),
        ];
        for e in &cases {
            assert_eq!(
                String::from_utf8(e.canonical_bytes()).unwrap(),
                String::from_utf8(reference_bytes(e)).unwrap()
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn receipts_encode_as_the_reference_encoder(
            sql in proptest::prelude::any::<String>(),
            epsilon in proptest::prelude::any::<f64>(),
            keys in proptest::collection::vec(proptest::prelude::any::<String>(), 0..4),
            numbers in proptest::collection::vec(proptest::prelude::any::<f64>(), 0..4),
        ) {
            let mechanism = keys
                .into_iter()
                .zip(numbers)
                .map(|(k, n)| (k, serde_json::json!(n)))
                .collect();
            let mut e = receipt(sql, epsilon, mechanism);
            proptest::prop_assert_eq!(e.canonical_bytes(), reference_bytes(&e));
            if let Body::QueryReceipt(r) = &mut e.body {
                r.rows_suppressed = Some(12);
            }
            let bytes = e.canonical_bytes();
            check_decoders_agree(&bytes);
            if epsilon.is_finite() {
                // Decodable, and in one pass.
                let general = Entry::from_json_general(&bytes).unwrap();
                proptest::prop_assert_eq!(crate::decode::entry(&bytes), Some(general));
            }
        }
    }

    /// The one-pass decoder agrees with the general one: same entry, or it declines.
    fn check_decoders_agree(json: &[u8]) {
        let general = Entry::from_json_general(json);
        if let Some(fast) = crate::decode::entry(json) {
            assert_eq!(
                Ok(&fast),
                general.as_ref(),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        assert_eq!(Entry::from_json(json), general);
    }

    #[test]
    fn one_pass_decoding_agrees_with_the_general_decoder() {
        let canonical = String::from_utf8(sample().canonical_bytes()).unwrap();
        let mechanism: BTreeMap<String, serde_json::Value> = [
            ("kind".to_string(), serde_json::json!("study_approved")),
            (
                "nested".to_string(),
                serde_json::json!({"kind": "consent_granted"}),
            ),
        ]
        .into();
        let mut receipt = receipt("SELECT '\"kind\":\"key_rotated\"'".into(), 0.5, mechanism);
        if let Body::QueryReceipt(r) = &mut receipt.body {
            // u64::MAX does not survive the trip through a double.
            r.rows_suppressed = Some(12);
        }
        let receipt = String::from_utf8(receipt.canonical_bytes()).unwrap();
        // Stored (canonical) entries take the one-pass path, nested "kind" keys or not.
        assert!(crate::decode::entry(canonical.as_bytes()).is_some());
        assert!(crate::decode::entry(receipt.as_bytes()).is_some());
        let cases = [
            canonical.clone(),
            receipt.clone(),
            serde_json::to_string_pretty(&sample().to_value()).unwrap(),
            canonical.replace("\"v\":1", "\"v\":2"),
            canonical.replace("\"v\":1", "\"v\":1,\"v\":1"),
            canonical.replace("\"v\":1", "\"v\":1,\"extra\":0"),
            canonical.replace("\"author\"", "\"\\u0061uthor\""),
            canonical.replace("\"kind\":\"study_approved\"", "\"kind\":\"study_closed\""),
            canonical.replace(
                "\"kind\":\"study_approved\"",
                "\"kind\":\"study_\\u0061pproved\"",
            ),
            canonical.replace("\"kind\":\"study_approved\",", ""),
            receipt.replace("\"kind\":\"query_receipt\"", "\"kind\":\"study_approved\""),
            format!("{canonical} "),
            format!("{canonical}x"),
            format!("[{canonical}]"),
        ];
        for c in cases {
            check_decoders_agree(c.as_bytes());
        }
        // An entry in the array form that serde's derive also reads.
        let array = format!(
            "[1,\"st-mary\",\"2026-11-21T22:00:00Z\",\"study_closed\",{}]",
            r#"{"study":"t2d","reason":"done"}"#
        );
        check_decoders_agree(array.as_bytes());
    }

    #[test]
    fn entries_round_trip_through_any_formatting() {
        let e = sample();
        let pretty = serde_json::to_string_pretty(&e.to_value()).unwrap();
        let back = Entry::from_json(pretty.as_bytes()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.canonical_bytes(), e.canonical_bytes());
    }

    #[test]
    fn leaves_round_trip_and_expose_signed_bytes() {
        let se = SignedEntry {
            entry: sample(),
            sig: [7u8; 64],
        };
        let leaf = se.leaf_bytes();
        let (signed, sig) = split_leaf(&leaf).unwrap();
        assert_eq!(signed, se.entry.canonical_bytes().as_slice());
        assert_eq!(sig, [7u8; 64]);
        assert_eq!(SignedEntry::from_leaf(&leaf, true).unwrap(), se);
        // The leaf is itself canonical JSON of the envelope.
        let v: serde_json::Value = serde_json::from_slice(&leaf).unwrap();
        assert_eq!(canonical_json(&v).unwrap(), leaf);
    }

    #[test]
    fn bad_input_is_refused() {
        let ok = String::from_utf8(sample().canonical_bytes()).unwrap();
        let cases = [
            ok.replace("\"v\":1", "\"v\":2"),
            ok.replace("study_approved", "study_adored"),
            ok.replace("\"dp\":true", "\"dp\":true,\"extra\":1"),
            ok.replace("2026-11-21T22:00:00Z", "yesterday"),
            ok.replace("st-mary", "st mary"),
            ok[..ok.len() - 1].to_string(),
        ];
        for bad in cases {
            assert!(Entry::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
        // Non-canonical stored leaves are refused in strict mode.
        let se = SignedEntry {
            entry: sample(),
            sig: [1u8; 64],
        };
        let leaf = String::from_utf8(se.leaf_bytes())
            .unwrap()
            .replace(":1,", ":1.0,");
        assert_eq!(
            SignedEntry::from_leaf(leaf.as_bytes(), true).unwrap_err(),
            DecodeError::NotCanonical
        );
        assert!(SignedEntry::from_leaf(b"{}", false).is_err());
    }
}
