//! Client-side helpers shared by the CLI and the end-to-end tests: sign entries with the
//! author's own key, attach a fresh bearer token to every call, upload a dataset version.

use std::path::Path;
use std::time::Duration;

use ledger::entry::{Body, DatasetRegistered, Entry, SignedEntry, TableManifest};
use ledger::ids::{PrincipalId, Timestamp};
use ledger::note::SignerKey;
use proto::v1;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

/// Chunk size of uploads.
pub const UPLOAD_CHUNK: usize = 1 << 20;

/// Signs `body` as `key`'s principal, now.
pub fn sign(key: &SignerKey, body: Body) -> anyhow::Result<v1::SignedEntry> {
    let entry = Entry {
        author: PrincipalId::new(key.name())?,
        time: Timestamp::now(),
        body,
    };
    Ok(v1::SignedEntry {
        leaf: SignedEntry::sign(key, entry).leaf_bytes(),
    })
}

/// A FHIR R4 Consent resource with its entry (converted by `ledger::fhir` and signed with
/// `key`), ready for `Consent.ImportFhir`.
pub fn fhir_import(key: &SignerKey, resource_json: &str) -> anyhow::Result<v1::FhirImportRequest> {
    let body = ledger::fhir::import(resource_json, &PrincipalId::new(key.name())?)?;
    Ok(v1::FhirImportRequest {
        resource_json: resource_json.to_owned(),
        entry: Some(sign(key, body)?),
    })
}

/// Adds `authorization: Bearer <JWT>` to every call, minting a token per call.
#[derive(Clone)]
pub struct Bearer(std::sync::Arc<SignerKey>);

impl Bearer {
    /// Tokens for `key`'s principal.
    pub fn new(key: SignerKey) -> Bearer {
        Bearer(std::sync::Arc::new(key))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let t = crate::auth::mint(&self.0, Duration::from_secs(300))
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let v: MetadataValue<_> = format!("Bearer {t}")
            .parse()
            .map_err(|_| tonic::Status::internal("token is not ASCII"))?;
        req.metadata_mut().insert("authorization", v);
        Ok(req)
    }
}

/// A channel to a broker at `url` (e.g. `http://127.0.0.1:50051`).
pub async fn connect(url: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(url.to_owned())?.connect().await?)
}

/// Builds the `dataset_registered` body for files on disk: `tables` maps each table name to
/// its files as `(path inside the dataset, file on disk)`.
pub fn dataset_body(
    custodian: &str,
    dataset: &str,
    version: u32,
    basis: ledger::entry::ConsentBasis,
    privacy_unit: &str,
    policy_toml: &str,
    tables: &[(&str, Vec<(String, &Path)>)],
) -> anyhow::Result<DatasetRegistered> {
    use sha2::Digest as _;
    let manifests: Vec<TableManifest> = tables
        .iter()
        .map(|(name, files)| crate::manifest::table_manifest(name, files))
        .collect::<anyhow::Result<_>>()?;
    Ok(DatasetRegistered {
        dataset: ledger::ids::DatasetId::new(dataset)?,
        version,
        custodian: PrincipalId::new(custodian)?,
        consent_basis: basis,
        privacy_unit: privacy_unit.to_owned(),
        policy_digest: ledger::ids::Digest::from_bytes(sha2::Sha256::digest(policy_toml).into()),
        digest: DatasetRegistered::compute_digest(&manifests),
        tables: manifests,
    })
}

/// The upload stream of a dataset version: header, then every file in chunks. `files` maps
/// manifest paths to files on disk.
pub fn upload_messages(
    key: &SignerKey,
    reg: DatasetRegistered,
    policy_toml: &str,
    files: &[(String, &Path)],
) -> anyhow::Result<Vec<v1::DatasetUpload>> {
    use v1::dataset_upload::Part;
    let mut out = vec![v1::DatasetUpload {
        part: Some(Part::Header(v1::DatasetHeader {
            entry: Some(sign(key, Body::DatasetRegistered(reg))?),
            policy_toml: policy_toml.to_owned(),
        })),
    }];
    for (rel, path) in files {
        let bytes = std::fs::read(path)?;
        for c in bytes.chunks(UPLOAD_CHUNK) {
            out.push(v1::DatasetUpload {
                part: Some(Part::Chunk(v1::FileChunk {
                    path: rel.clone(),
                    data: c.to_vec(),
                })),
            });
        }
    }
    Ok(out)
}

/// Collects a query's response stream: the header and the result's record batches.
pub async fn collect_query(
    mut stream: tonic::Streaming<v1::QueryResponse>,
) -> anyhow::Result<(v1::QueryHeader, Vec<arrow::array::RecordBatch>)> {
    use v1::query_response::Part;
    let mut header = None;
    let mut ipc = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.part {
            Some(Part::Header(h)) => header = Some(h),
            Some(Part::ArrowIpc(b)) => ipc.extend_from_slice(&b),
            None => {}
        }
    }
    let header = header.ok_or_else(|| anyhow::anyhow!("the response has no header"))?;
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc), None)?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((header, batches))
}
