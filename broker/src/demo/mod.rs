//! `broker demo`: a synthetic hospital, its patients' consents and an approved study, built
//! through the broker's own gRPC interface so that everything it makes is on the ledger, signed
//! by the principal who would sign it in real life.
//!
//! [`synth`] writes the tables (Synthea-like shapes); [`populate`] registers the principals
//! (keys in `<data-dir>/keys/<name>.key`, mode 0600), uploads the dataset with its column
//! policy, records the consents (mixed DUO purposes, some time-limited, some revoked, some
//! signed by the patients themselves), registers the study and has the IRB approve it. The same
//! seed gives the same data, consents and study; keys are always fresh.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use ledger::entry::{Body, ConsentBasis};
use ledger::note::SignerKey;
use proto::v1;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::client::{self, Bearer};

pub mod synth;

/// The demo dataset's id.
pub const DATASET: &str = "ehr";
/// The demo study's id.
pub const STUDY: &str = "t2d-outcomes";
/// The study's research purpose: disease-specific research on type 2 diabetes mellitus.
pub const STUDY_PURPOSE: &str = "DS:MONDO:0005148";
/// Patients who are principals themselves (they sign their own consents).
pub const PATIENT_PRINCIPALS: usize = 3;
/// The study's privacy budget on the dataset.
pub const EPSILON: f64 = 10.0;
/// The study's delta (for GROUP BY keys without a public domain).
pub const DELTA: f64 = 1e-6;
/// The k of de-identified extracts.
pub const EXTRACT_K: u32 = 5;

/// What `broker demo` builds.
#[derive(Debug, Clone)]
pub struct Options {
    /// Patients in the synthetic data set.
    pub patients: usize,
    /// Seed of everything random but keys.
    pub seed: u64,
}

/// `<data-dir>/demo.json`: what the demo made, for people, notebooks and scripts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoInfo {
    /// The address the broker listens on (gRPC and Arrow Flight SQL).
    pub listen: String,
    /// `http://<listen>` (gRPC clients).
    pub url: String,
    /// `grpc://<listen>` (ADBC Flight SQL, pyarrow.flight).
    pub flight_url: String,
    /// The ledger's checkpoint origin.
    pub origin: String,
    /// The ledger's verifier key (what a sponsor checks bundles with).
    pub ledger_verifier_key: String,
    /// Options it was built with.
    pub patients: usize,
    /// The seed.
    pub seed: u64,
    /// Every principal it registered (and the operator).
    pub principals: Vec<Principal>,
    /// The dataset.
    pub dataset: Dataset,
    /// The study.
    pub study: Study,
    /// Consent counts.
    pub consents: ConsentCounts,
}

/// A principal and its key file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Principal {
    /// Its id (its key's name).
    pub id: String,
    /// Its role.
    pub role: String,
    /// Its private key file (mode 0600).
    pub key_file: PathBuf,
    /// For a patient: the privacy-unit id that is theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// The registered dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dataset {
    /// Its id.
    pub id: String,
    /// Its version.
    pub version: u32,
    /// The custodian.
    pub custodian: String,
    /// The privacy-unit column.
    pub privacy_unit: String,
    /// Table name to rows.
    pub tables: BTreeMap<String, u64>,
    /// The custodian's copies of the files as registered (table name to Parquet file).
    pub source_files: BTreeMap<String, PathBuf>,
    /// The column policy file.
    pub policy_file: PathBuf,
    /// The version's digest (hex).
    pub digest: String,
}

/// The approved study.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Study {
    /// Its id.
    pub id: String,
    /// Its title.
    pub title: String,
    /// The principal investigator.
    pub pi: String,
    /// The sponsor.
    pub sponsor: String,
    /// The approving IRB.
    pub irb: String,
    /// Research purpose (DUO).
    pub purpose: String,
    /// Budget on the dataset.
    pub epsilon: f64,
    /// Delta on the dataset.
    pub delta: f64,
    /// k of extracts.
    pub extract_k: u32,
}

/// How many consents of each kind the demo recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConsentCounts {
    /// Consents granted.
    pub granted: usize,
    /// Of those, by purpose (DUO).
    pub by_purpose: BTreeMap<String, usize>,
    /// Of those, with the NCU (not for commercial use) modifier.
    pub non_commercial: usize,
    /// Of those, valid only until a date (some already past).
    pub time_limited: usize,
    /// Of those, revoked afterwards.
    pub revoked: usize,
    /// Patients who never consented.
    pub never: usize,
}

type Auth = InterceptedService<Channel, Bearer>;

fn auth(channel: &Channel, key: &SignerKey) -> anyhow::Result<Auth> {
    Ok(InterceptedService::new(
        channel.clone(),
        Bearer::new(SignerKey::parse(&key.to_text())?),
    ))
}

fn body(kind: &str, json: serde_json::Value) -> anyhow::Result<Body> {
    Ok(Body::from_json(kind, &json.to_string())?)
}

/// A progress bar on stderr (drawn only on a terminal).
fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>24} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_owned());
    pb
}

/// One patient's consent as the demo records it (valid from 2024-01-01).
#[derive(Debug, Clone)]
pub struct PlannedConsent {
    /// The patient.
    pub subject: String,
    /// The one purpose permitted (DUO).
    pub purpose: &'static str,
    /// With the NCU modifier.
    pub ncu: bool,
    /// End of validity, if limited (some are already past).
    pub valid_until: Option<&'static str>,
    /// Revoked after it was granted.
    pub revoke: bool,
}

impl PlannedConsent {
    /// Whether this consent lets the demo study use the patient's rows at `now` (RFC 3339).
    pub fn permits_study(&self, now: &str) -> bool {
        !self.revoke
            && matches!(self.purpose, "GRU" | "HMB" | STUDY_PURPOSE)
            && self.valid_until.is_none_or(|u| u > now)
    }
}

/// Draws every patient's consent decision (`None`: never consented) from the seed,
/// independently of the data's RNG.
pub fn plan_consents(ids: &[String], seed: u64) -> Vec<Option<PlannedConsent>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x00c0_75e7);
    ids.iter()
        .map(|id| {
            if rng.random_bool(0.12) {
                return None;
            }
            let purpose = match rng.random_range(0..100) {
                0..55 => "GRU",
                55..80 => "HMB",
                80..92 => STUDY_PURPOSE,
                // asthma research only: does not permit the diabetes study
                _ => "DS:MONDO:0004979",
            };
            let valid_until = match rng.random_range(0..100) {
                0..5 => Some("2025-06-30T00:00:00Z"),
                5..12 => Some("2031-12-31T00:00:00Z"),
                _ => None,
            };
            Some(PlannedConsent {
                subject: id.clone(),
                purpose,
                ncu: rng.random_bool(0.15),
                valid_until,
                revoke: rng.random_bool(0.05),
            })
        })
        .collect()
}

/// Builds the demo through the broker at `url`: tables under `<data_dir>/source`, keys under
/// `<data_dir>/keys`, everything else on the ledger. `operator` is the ledger's operator key.
pub async fn populate(
    data_dir: &Path,
    url: &str,
    operator: &SignerKey,
    opts: &Options,
) -> anyhow::Result<DemoInfo> {
    anyhow::ensure!(
        opts.patients >= PATIENT_PRINCIPALS,
        "--patients must be at least {PATIENT_PRINCIPALS}"
    );
    let channel = client::connect(url).await?;

    // 1. The synthetic tables.
    let source = data_dir.join("source");
    std::fs::create_dir_all(&source)?;
    let pb = bar(opts.patients as u64, "generating patients");
    let generated = synth::generate(
        &synth::Options {
            patients: opts.patients,
            seed: opts.seed,
        },
        &source,
        &mut |done| pb.set_position(done),
    )
    .context("generating the synthetic data set")?;
    pb.finish();
    let policy_file = source.join("policy.toml");
    std::fs::write(&policy_file, synth::POLICY)?;

    // 2. Principals, with fresh keys in <data-dir>/keys.
    let keys_dir = data_dir.join("keys");
    std::fs::create_dir_all(&keys_dir)?;
    let mut principals = vec![Principal {
        id: operator.name().to_owned(),
        role: "operator".into(),
        key_file: data_dir.join("ledger").join("ledger.key"),
        subject: None,
    }];
    let mut wanted: Vec<(String, &str, Option<String>)> = vec![
        ("hospital".into(), "custodian", None),
        ("irb".into(), "irb", None),
        ("alice".into(), "researcher", None),
        ("bob".into(), "researcher", None),
        ("pharma".into(), "sponsor", None),
    ];
    for (i, id) in generated
        .patient_ids
        .iter()
        .take(PATIENT_PRINCIPALS)
        .enumerate()
    {
        wanted.push((format!("patient-{}", i + 1), "patient", Some(id.clone())));
    }
    let mut keys = BTreeMap::new();
    let mut registry = v1::registry_client::RegistryClient::new(auth(&channel, operator)?);
    for (id, role, subject) in wanted {
        let key = SignerKey::generate(&id)?;
        let key_file = keys_dir.join(format!("{id}.key"));
        ledger::keyfile::write_private_key(&key_file, &key)
            .with_context(|| format!("writing {}", key_file.display()))?;
        let mut json = serde_json::json!({
            "id": id, "role": role, "key": key.verifier().to_text(),
        });
        if let Some(s) = &subject {
            json["subject"] = s.as_str().into();
        }
        registry
            .append(client::sign(operator, body("principal_registered", json)?)?)
            .await
            .with_context(|| format!("registering {id}"))?;
        principals.push(Principal {
            id: id.clone(),
            role: role.into(),
            key_file,
            subject,
        });
        keys.insert(id, key);
    }

    // 3. The dataset, uploaded by the custodian.
    let hospital = key_of(&keys, "hospital")?;
    let files: Vec<(String, Vec<(String, &Path)>)> = generated
        .tables
        .iter()
        .map(|t| {
            (
                t.name.to_owned(),
                vec![(format!("{}/part-0.parquet", t.name), t.path.as_path())],
            )
        })
        .collect();
    let table_refs: Vec<(&str, Vec<(String, &Path)>)> =
        files.iter().map(|(n, f)| (n.as_str(), f.clone())).collect();
    let reg = client::dataset_body(
        hospital.name(),
        DATASET,
        1,
        ConsentBasis::OptIn,
        "patient_id",
        synth::POLICY,
        &table_refs,
    )?;
    let digest = reg.digest.to_string();
    let all_files: Vec<(String, &Path)> = files.iter().flat_map(|(_, f)| f.clone()).collect();
    let msgs = client::upload_messages(hospital, reg, synth::POLICY, &all_files)?;
    eprintln!("uploading and registering dataset {DATASET} v1");
    v1::registry_client::RegistryClient::new(auth(&channel, hospital)?)
        .max_encoding_message_size(crate::server::MAX_MESSAGE)
        .register_dataset(tokio_stream::iter(msgs))
        .await
        .context("registering the dataset")?;

    // 4. Consents: patient principals sign their own, the custodian records the rest.
    let plan = plan_consents(&generated.patient_ids, opts.seed);
    let mut counts = ConsentCounts {
        never: plan.iter().filter(|p| p.is_none()).count(),
        ..ConsentCounts::default()
    };
    let signer_of: BTreeMap<&str, &SignerKey> = principals
        .iter()
        .filter_map(|p| {
            let s = p.subject.as_deref()?;
            Some((s, keys.get(&p.id)?))
        })
        .collect();
    let mut entries = Vec::new();
    let mut revocations = Vec::new();
    for (i, c) in plan.iter().enumerate() {
        let Some(c) = c else { continue };
        let signer = signer_of
            .get(c.subject.as_str())
            .copied()
            .unwrap_or(hospital);
        let consent_id = format!("demo-consent-{:06}", i + 1);
        let mut json = serde_json::json!({
            "consent_id": consent_id,
            "subject": c.subject,
            "scope": {"custodian": "hospital"},
            "purposes": [c.purpose],
            "valid_from": "2024-01-01T00:00:00Z",
            "grantor": signer.name(),
        });
        if c.ncu {
            json["modifiers"] = serde_json::json!(["NCU"]);
            counts.non_commercial += 1;
        }
        if let Some(until) = c.valid_until {
            json["valid_until"] = until.into();
            counts.time_limited += 1;
        }
        counts.granted += 1;
        *counts.by_purpose.entry(c.purpose.to_owned()).or_default() += 1;
        entries.push((
            signer,
            client::sign(signer, body("consent_granted", json)?)?,
        ));
        if c.revoke {
            counts.revoked += 1;
            let r = serde_json::json!({
                "subject": c.subject,
                "consent_id": consent_id,
                "grantor": signer.name(),
                "reason": "withdrawn by the patient",
            });
            revocations.push((signer, client::sign(signer, body("consent_revoked", r)?)?));
        }
    }
    send_consents(&channel, "recording consents", entries, false).await?;
    send_consents(&channel, "recording revocations", revocations, true).await?;

    // 5. The study, registered by its PI, approved by the IRB.
    let title = "Type 2 diabetes: glycaemic control and outcomes";
    let alice = key_of(&keys, "alice")?;
    let study = body(
        "study_registered",
        serde_json::json!({
            "study": STUDY, "title": title, "sponsor": "pharma", "pi": "alice",
            "researchers": ["alice"], "purpose": STUDY_PURPOSE, "commercial": false,
            "datasets": [DATASET],
        }),
    )?;
    v1::registry_client::RegistryClient::new(auth(&channel, alice)?)
        .append(client::sign(alice, study)?)
        .await
        .context("registering the study")?;
    let irb = key_of(&keys, "irb")?;
    let approval = body(
        "study_approved",
        serde_json::json!({
            "study": STUDY,
            "grants": [{
                "dataset": DATASET, "epsilon": EPSILON, "delta": DELTA, "dp": true,
                "extract_k": EXTRACT_K,
            }],
            "valid_from": "2024-01-01T00:00:00Z",
            "valid_until": "2030-01-01T00:00:00Z",
        }),
    )?;
    v1::registry_client::RegistryClient::new(auth(&channel, irb)?)
        .append(client::sign(irb, approval)?)
        .await
        .context("approving the study")?;

    let checkpoint = v1::ledger_client::LedgerClient::new(auth(&channel, operator)?)
        .checkpoint(v1::CheckpointRequest {})
        .await?
        .into_inner();
    let addr = url.trim_start_matches("http://").to_owned();
    Ok(DemoInfo {
        flight_url: format!("grpc://{addr}"),
        url: url.to_owned(),
        listen: addr,
        origin: checkpoint
            .checkpoint
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        ledger_verifier_key: checkpoint.verifier_key,
        patients: opts.patients,
        seed: opts.seed,
        principals,
        dataset: Dataset {
            id: DATASET.into(),
            version: 1,
            custodian: "hospital".into(),
            privacy_unit: "patient_id".into(),
            tables: generated
                .tables
                .iter()
                .map(|t| (t.name.to_owned(), t.rows))
                .collect(),
            source_files: generated
                .tables
                .iter()
                .map(|t| (t.name.to_owned(), t.path.clone()))
                .collect(),
            policy_file,
            digest,
        },
        study: Study {
            id: STUDY.into(),
            title: title.into(),
            pi: "alice".into(),
            sponsor: "pharma".into(),
            irb: "irb".into(),
            purpose: STUDY_PURPOSE.into(),
            epsilon: EPSILON,
            delta: DELTA,
            extract_k: EXTRACT_K,
        },
        consents: counts,
    })
}

fn key_of<'a>(keys: &'a BTreeMap<String, SignerKey>, id: &str) -> anyhow::Result<&'a SignerKey> {
    keys.get(id)
        .ok_or_else(|| anyhow::anyhow!("no key for {id}"))
}

/// Sends signed consent entries, many at a time (the ledger commits them in groups).
async fn send_consents(
    channel: &Channel,
    what: &str,
    entries: Vec<(&SignerKey, v1::SignedEntry)>,
    revoke: bool,
) -> anyhow::Result<()> {
    const IN_FLIGHT: usize = 64;
    let pb = bar(entries.len() as u64, what);
    let mut clients: BTreeMap<String, v1::consent_client::ConsentClient<Auth>> = BTreeMap::new();
    let mut set = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    for (key, entry) in entries {
        let mut c = match clients.get(key.name()) {
            Some(c) => c.clone(),
            None => {
                let c = v1::consent_client::ConsentClient::new(auth(channel, key)?);
                clients.insert(key.name().to_owned(), c.clone());
                c
            }
        };
        let permit = sem.clone().acquire_owned().await?;
        set.spawn(async move {
            let r = if revoke {
                c.revoke(entry).await.map(|_| ())
            } else {
                c.grant(entry).await.map(|_| ())
            };
            drop(permit);
            r
        });
        while let Some(done) = set.try_join_next() {
            done??;
            pb.inc(1);
        }
    }
    while let Some(done) = set.join_next().await {
        done??;
        pb.inc(1);
    }
    pb.finish();
    Ok(())
}
