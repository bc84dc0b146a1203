//! Client-side helpers shared by the CLI and the end-to-end tests: sign entries with the
//! author's own key, attach a fresh bearer token to every call, upload a dataset version.

use std::path::{Path, PathBuf};
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
    let spec = DatasetSpec {
        custodian,
        dataset,
        version,
        basis,
        privacy_unit,
        policy_toml,
    };
    spec.body(tables, &mut |_| {})
}

/// What a `dataset_registered` body says besides its files.
#[derive(Debug, Clone, Copy)]
pub struct DatasetSpec<'a> {
    /// The custodian registering it (the signer).
    pub custodian: &'a str,
    /// The dataset id.
    pub dataset: &'a str,
    /// The new version.
    pub version: u32,
    /// Opt-in or opt-out.
    pub basis: ledger::entry::ConsentBasis,
    /// The privacy-unit column.
    pub privacy_unit: &'a str,
    /// The column policy (TOML).
    pub policy_toml: &'a str,
}

impl DatasetSpec<'_> {
    /// The body for `tables` (see [`dataset_body`]), calling `progress` with the bytes hashed.
    pub fn body(
        &self,
        tables: &[(&str, Vec<(String, &Path)>)],
        progress: &mut dyn FnMut(u64),
    ) -> anyhow::Result<DatasetRegistered> {
        use sha2::Digest as _;
        let manifests: Vec<TableManifest> = tables
            .iter()
            .map(|(name, files)| crate::manifest::table_manifest(name, files, progress))
            .collect::<anyhow::Result<_>>()?;
        Ok(DatasetRegistered {
            dataset: ledger::ids::DatasetId::new(self.dataset)?,
            version: self.version,
            custodian: PrincipalId::new(self.custodian)?,
            consent_basis: self.basis,
            privacy_unit: self.privacy_unit.to_owned(),
            policy_digest: ledger::ids::Digest::from_bytes(
                sha2::Sha256::digest(self.policy_toml).into(),
            ),
            digest: DatasetRegistered::compute_digest(&manifests),
            tables: manifests,
        })
    }
}

/// The upload stream of a dataset version: header, then every file in chunks. `files` maps
/// manifest paths to files on disk.
pub fn upload_messages(
    key: &SignerKey,
    reg: DatasetRegistered,
    policy_toml: &str,
    files: &[(String, &Path)],
) -> anyhow::Result<Vec<v1::DatasetUpload>> {
    let files: Vec<(String, PathBuf)> = files
        .iter()
        .map(|(rel, p)| (rel.clone(), p.to_path_buf()))
        .collect();
    let upload = Upload::new(key, reg, policy_toml, files)?;
    let read_error = upload.read_error();
    let msgs: Vec<v1::DatasetUpload> = upload.collect();
    read_error.check()?;
    Ok(msgs)
}

/// An upload read lazily, one chunk of [`UPLOAD_CHUNK`] bytes at a time, so a version of any
/// size streams in constant memory. A read error ends the stream early (the broker then
/// refuses the incomplete upload) and is kept for [`Upload::read_error`].
pub struct Upload {
    header: Option<v1::DatasetUpload>,
    files: std::vec::IntoIter<(String, PathBuf)>,
    current: Option<(String, std::fs::File)>,
    error: ReadError,
    progress: Box<dyn FnMut(u64) + Send>,
}

impl Upload {
    /// An upload of `files` (`(manifest path, file on disk)`) under a header signed by `key`.
    pub fn new(
        key: &SignerKey,
        reg: DatasetRegistered,
        policy_toml: &str,
        files: Vec<(String, PathBuf)>,
    ) -> anyhow::Result<Upload> {
        let header = v1::DatasetUpload {
            part: Some(v1::dataset_upload::Part::Header(v1::DatasetHeader {
                entry: Some(sign(key, Body::DatasetRegistered(reg))?),
                policy_toml: policy_toml.to_owned(),
            })),
        };
        Ok(Upload {
            header: Some(header),
            files: files.into_iter(),
            current: None,
            error: Default::default(),
            progress: Box::new(|_| {}),
        })
    }

    /// Calls `progress` with the bytes of each chunk read.
    pub fn with_progress(mut self, progress: impl FnMut(u64) + Send + 'static) -> Upload {
        self.progress = Box::new(progress);
        self
    }

    /// A handle on the read error, to check once the stream was consumed (the upload itself
    /// is moved into the request).
    pub fn read_error(&self) -> ReadError {
        self.error.clone()
    }

    fn fail(&mut self, e: anyhow::Error) -> Option<v1::DatasetUpload> {
        if let Ok(mut slot) = self.error.0.lock() {
            *slot = Some(e);
        }
        self.current = None;
        self.files = Vec::new().into_iter();
        None
    }
}

/// The read error that ended an [`Upload`]'s stream early, if any.
#[derive(Clone, Default)]
pub struct ReadError(std::sync::Arc<std::sync::Mutex<Option<anyhow::Error>>>);

impl ReadError {
    /// Fails with the read error, if there was one.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.0.lock() {
            Ok(mut slot) => slot.take().map_or(Ok(()), Err),
            Err(_) => anyhow::bail!("the upload's reader panicked"),
        }
    }
}

impl Iterator for Upload {
    type Item = v1::DatasetUpload;

    fn next(&mut self) -> Option<v1::DatasetUpload> {
        use std::io::Read as _;
        if let Some(h) = self.header.take() {
            return Some(h);
        }
        loop {
            if self.current.is_none() {
                let (rel, path) = self.files.next()?;
                match std::fs::File::open(&path) {
                    Ok(f) => self.current = Some((rel, f)),
                    Err(e) => {
                        return self.fail(
                            anyhow::Error::new(e).context(format!("opening {}", path.display())),
                        );
                    }
                }
            }
            let (rel, f) = self.current.as_mut()?;
            let mut buf = Vec::with_capacity(UPLOAD_CHUNK);
            match f.take(UPLOAD_CHUNK as u64).read_to_end(&mut buf) {
                Ok(0) => self.current = None,
                Ok(n) => {
                    let path = rel.clone();
                    (self.progress)(n as u64);
                    return Some(v1::DatasetUpload {
                        part: Some(v1::dataset_upload::Part::Chunk(v1::FileChunk {
                            path,
                            data: buf,
                        })),
                    });
                }
                Err(e) => {
                    let msg = format!("reading {rel}");
                    return self.fail(anyhow::Error::new(e).context(msg));
                }
            }
        }
    }
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
