//! `broker consent …`: a patient (or a custodian recording a paper consent) grants, limits and
//! revokes research consent, and sees who used their data.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ledger::entry::Body;
use proto::v1;

use super::conn::{self, Conn};
use crate::client;

/// Arguments of `broker consent`.
#[derive(Debug, Args)]
pub struct ConsentArgs {
    /// The consent command.
    #[command(subcommand)]
    pub command: ConsentCommand,
}

/// Consent commands. Entries are signed with --key: the patient's own key, or the custodian's
/// when it records a paper consent.
#[derive(Debug, Subcommand)]
pub enum ConsentCommand {
    /// Grant research use of a subject's records (a `consent_granted` entry).
    Grant {
        /// The subject: the privacy-unit id as it appears in the datasets.
        #[arg(long, env = "CONSENTRY_SUBJECT")]
        subject: String,
        /// A permitted purpose as a GA4GH DUO code: GRU, HMB, POA, NRES or DS:<disease
        /// term> (e.g. DS:MONDO:0005148). Repeat for several.
        #[arg(
            long = "purpose",
            env = "CONSENTRY_PURPOSES",
            value_delimiter = ',',
            required = true
        )]
        purposes: Vec<String>,
        /// A DUO modifier that restricts use (e.g. NCU, NPU, IRB). Repeat for several.
        #[arg(long = "modifier", env = "CONSENTRY_MODIFIERS", value_delimiter = ',')]
        modifiers: Vec<String>,
        /// Cover every dataset of this custodian.
        #[arg(long, env = "CONSENTRY_CUSTODIAN", conflicts_with = "dataset")]
        custodian: Option<String>,
        /// Cover only these datasets (repeat for several).
        #[arg(long, env = "CONSENTRY_DATASETS", value_delimiter = ',')]
        dataset: Vec<String>,
        /// Only these studies may use it (repeat for several).
        #[arg(
            long = "allow-study",
            env = "CONSENTRY_ALLOW_STUDIES",
            value_delimiter = ','
        )]
        allow_studies: Vec<String>,
        /// Never these studies (repeat for several).
        #[arg(
            long = "deny-study",
            env = "CONSENTRY_DENY_STUDIES",
            value_delimiter = ','
        )]
        deny_studies: Vec<String>,
        /// End of validity (RFC 3339, e.g. 2030-01-01T00:00:00Z); open-ended without.
        #[arg(long, env = "CONSENTRY_VALID_UNTIL")]
        valid_until: Option<String>,
        /// The consent's id (a fresh one when absent).
        #[arg(long, env = "CONSENTRY_CONSENT_ID")]
        consent_id: Option<String>,
        /// A consent of the same subject that this one replaces (how consent is limited).
        #[arg(long, env = "CONSENTRY_REPLACES")]
        replaces: Option<String>,
    },
    /// Revoke a consent by its id, or object to a scope (a `consent_revoked` entry).
    Revoke {
        /// The subject.
        #[arg(long, env = "CONSENTRY_SUBJECT")]
        subject: String,
        /// The consent revoked.
        #[arg(
            long,
            env = "CONSENTRY_CONSENT_ID",
            required_unless_present = "custodian"
        )]
        consent_id: Option<String>,
        /// Or: object to every dataset of this custodian.
        #[arg(long, env = "CONSENTRY_CUSTODIAN")]
        custodian: Option<String>,
        /// Why, for the record.
        #[arg(long, env = "CONSENTRY_REASON")]
        reason: Option<String>,
    },
    /// A subject's consents, in effect or ended (JSON).
    List {
        /// The subject.
        #[arg(long, env = "CONSENTRY_SUBJECT")]
        subject: String,
    },
    /// Who used my data: the released queries whose consent snapshot included the subject,
    /// with their receipts (JSON).
    Usage {
        /// The subject.
        #[arg(long, env = "CONSENTRY_SUBJECT")]
        subject: String,
    },
    /// Import a FHIR R4 Consent resource (JSON file) as a signed entry.
    ImportFhir {
        /// The resource.
        #[arg(long, env = "CONSENTRY_FHIR_FILE")]
        file: PathBuf,
    },
    /// Bulk onboarding: every consent of a file, signed with --key and appended through one
    /// call (refused ones are listed by line; the others are appended).
    ///
    /// CSV (`.csv`), one consent per row, with a header naming the columns `subject` and
    /// `purposes` (DUO codes separated by `;`), and optionally `consent_id` (made up
    /// without), `modifiers` (`;`-separated), `datasets` (`;`-separated; without, every dataset
    /// of --custodian), `valid_from` and `valid_until` (RFC 3339). Or NDJSON (`.ndjson`,
    /// `.jsonl`): one FHIR R4 Consent resource per line, converted as `import-fhir` does. Or a
    /// FHIR Bulk Data export folder: its `Consent*.ndjson` files, in name order (the other
    /// resource types are passed over).
    Import {
        /// The file, or the export folder.
        #[arg(long, env = "CONSENTRY_CONSENT_FILE")]
        file: PathBuf,
        /// The custodian whose datasets a CSV consent without `datasets` covers (the caller
        /// without).
        #[arg(long, env = "CONSENTRY_CUSTODIAN")]
        custodian: Option<String>,
    },
    /// A subject's consents as a FHIR R4 Bundle (JSON).
    ExportFhir {
        /// The subject.
        #[arg(long, env = "CONSENTRY_SUBJECT")]
        subject: String,
    },
}

/// The body of a ledger entry given as its leaf (`{"entry":{…,"body":…},"sig":…}`) or as the
/// entry itself.
fn entry_body(text: &str) -> anyhow::Result<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_str(text)?;
    if let Some(e) = v.get_mut("entry") {
        v = e.take();
    }
    Ok(match v.get_mut("body") {
        Some(b) => b.take(),
        None => v,
    })
}

fn new_consent_id() -> anyhow::Result<String> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(format!(
        "consent-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// Runs a consent command.
pub fn run(conn: &Conn, args: ConsentArgs) -> anyhow::Result<()> {
    conn::block_on(async move {
        let (key, auth) = conn.channel().await?;
        let mut c = v1::consent_client::ConsentClient::new(auth);
        let me = key.name().to_owned();
        match args.command {
            ConsentCommand::Grant {
                subject,
                purposes,
                modifiers,
                custodian,
                dataset,
                allow_studies,
                deny_studies,
                valid_until,
                consent_id,
                replaces,
            } => {
                let scope = match (custodian, dataset.is_empty()) {
                    (Some(c), _) => serde_json::json!({"custodian": c}),
                    (None, false) => serde_json::json!({"datasets": dataset}),
                    (None, true) => {
                        anyhow::bail!("say what the consent covers: --custodian or --dataset")
                    }
                };
                let mut json = serde_json::json!({
                    "consent_id": match consent_id { Some(c) => c, None => new_consent_id()? },
                    "subject": subject,
                    "scope": scope,
                    "purposes": purposes,
                    "valid_from": ledger::ids::Timestamp::now().to_string(),
                    "grantor": me,
                });
                if !modifiers.is_empty() {
                    json["modifiers"] = modifiers.into();
                }
                if !allow_studies.is_empty() {
                    json["studies_allow"] = allow_studies.into();
                }
                if !deny_studies.is_empty() {
                    json["studies_deny"] = deny_studies.into();
                }
                if let Some(u) = valid_until {
                    json["valid_until"] = u.into();
                }
                if let Some(r) = replaces {
                    json["replaces"] = r.into();
                }
                let id = json["consent_id"].clone();
                let body = Body::from_json("consent_granted", &json.to_string())?;
                let a = c
                    .grant(client::sign(&key, body)?)
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                let mut out = conn::appended(&a);
                out["consent_id"] = id;
                conn::print_json(&out)
            }
            ConsentCommand::Revoke {
                subject,
                consent_id,
                custodian,
                reason,
            } => {
                let mut json = serde_json::json!({"subject": subject, "grantor": me});
                if let Some(id) = consent_id {
                    json["consent_id"] = id.into();
                }
                if let Some(c) = custodian {
                    json["scope"] = serde_json::json!({"custodian": c});
                }
                if let Some(r) = reason {
                    json["reason"] = r.into();
                }
                let body = Body::from_json("consent_revoked", &json.to_string())?;
                let a = c
                    .revoke(client::sign(&key, body)?)
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                conn::print_json(&conn::appended(&a))
            }
            ConsentCommand::List { subject } => {
                let l = c
                    .list(v1::SubjectRequest { subject })
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                let out: Vec<serde_json::Value> = l
                    .consents
                    .iter()
                    .map(|v| {
                        Ok(serde_json::json!({
                            "consent_id": v.consent_id,
                            "entry_index": v.entry_index,
                            "active": v.active,
                            "ended_reason": v.ended_reason,
                            "grant": entry_body(&v.grant_json)?,
                        }))
                    })
                    .collect::<anyhow::Result<_>>()?;
                conn::print_json(&out)
            }
            ConsentCommand::Usage { subject } => {
                let u = c
                    .usage(v1::SubjectRequest { subject })
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                let out: Vec<serde_json::Value> = u
                    .usages
                    .iter()
                    .map(|u| {
                        Ok(serde_json::json!({
                            "study": u.study,
                            "study_title": u.study_title,
                            "dataset": u.dataset,
                            "time": u.time,
                            "receipt_index": u.receipt_index,
                            "receipt": entry_body(&u.receipt_json)?,
                        }))
                    })
                    .collect::<anyhow::Result<_>>()?;
                conn::print_json(&out)
            }
            ConsentCommand::ImportFhir { file } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let req = client::fhir_import(&key, &text)?;
                let a = c.import_fhir(req).await.map_err(conn::status)?.into_inner();
                conn::print_json(&conn::appended(&a))
            }
            ConsentCommand::Import { file, custodian } => {
                let custodian = custodian.unwrap_or_else(|| me.clone());
                let (bodies, origins): (Vec<Body>, Vec<Origin>) =
                    bulk_bodies(&file, &me, &custodian)?.into_iter().unzip();
                let total = bodies.len();
                let pb = indicatif::ProgressBar::new(total as u64);
                pb.set_message("signing");
                let mut signed = Vec::with_capacity(total);
                for b in bodies {
                    signed.push(client::sign(&key, b)?);
                    pb.inc(1);
                }
                pb.finish_and_clear();
                let started = std::time::Instant::now();
                let r = c
                    .grant_many(tokio_stream::iter(signed))
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                let took = started.elapsed().as_secs_f64();
                eprintln!(
                    "{} of {total} consents appended in {took:.2} s ({:.0}/s); {} refused",
                    r.appended,
                    r.appended as f64 / took.max(1e-9),
                    r.refused
                );
                // Positions in the stream are the records in order: each names its file and line.
                let refusals: Vec<serde_json::Value> = r
                    .refusals
                    .iter()
                    .map(|x| {
                        let o = usize::try_from(x.position)
                            .ok()
                            .and_then(|p| origins.get(p));
                        match o {
                            Some(o) if file.is_dir() => serde_json::json!({
                                "file": o.file, "line": o.line, "reason": x.reason,
                            }),
                            Some(o) => serde_json::json!({"line": o.line, "reason": x.reason}),
                            None => serde_json::json!({"position": x.position, "reason": x.reason}),
                        }
                    })
                    .collect();
                conn::print_json(&serde_json::json!({
                    "appended": r.appended, "refused": r.refused,
                    "first_index": r.first_index, "last_index": r.last_index,
                    "tree_size": r.tree_size, "refusals": refusals,
                }))?;
                if r.refused > 0 {
                    anyhow::bail!(
                        "{} of {total} consents were refused (listed above)",
                        r.refused
                    );
                }
                Ok(())
            }
            ConsentCommand::ExportFhir { subject } => {
                let b = c
                    .export_fhir(v1::SubjectRequest { subject })
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                println!("{}", b.bundle_json);
                Ok(())
            }
        }
    })
}

/// Where a bulk record came from: its file's name and line.
struct Origin {
    file: String,
    line: usize,
}

/// The consent entries of a bulk file (see `consent import`) or of a FHIR Bulk Data export
/// folder (its `Consent*.ndjson` files, in name order; the other resource types are passed
/// over), authored by `me`, each with its origin. A record that cannot be read is refused
/// naming its file and line (and column), never its values.
fn bulk_bodies(
    file: &std::path::Path,
    me: &str,
    custodian: &str,
) -> anyhow::Result<Vec<(Body, Origin)>> {
    if file.is_dir() {
        let mut consents = Vec::new();
        for entry in std::fs::read_dir(file)
            .with_context(|| format!("reading the directory {}", file.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !name.ends_with(".ndjson") {
                continue;
            }
            if name.starts_with("Consent") {
                consents.push(path);
            } else {
                eprintln!("{name}: not Consent resources, passed over");
            }
        }
        consents.sort();
        anyhow::ensure!(
            !consents.is_empty(),
            "{}: no Consent*.ndjson file (a FHIR Bulk Data export writes one per resource type)",
            file.display()
        );
        let mut out = Vec::new();
        for f in &consents {
            out.extend(ndjson_bodies(f, me)?);
        }
        return Ok(out);
    }
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => csv_bodies(file, me, custodian),
        Some("ndjson" | "jsonl") => ndjson_bodies(file, me),
        _ => anyhow::bail!(
            "{}: give a .csv file, .ndjson / .jsonl of FHIR Consent resources, or a FHIR Bulk \
             Data export folder",
            file.display()
        ),
    }
}

/// One FHIR Consent resource per line, converted as `import-fhir` does.
fn ndjson_bodies(file: &std::path::Path, me: &str) -> anyhow::Result<Vec<(Body, Origin)>> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let author = ledger::ids::PrincipalId::new(me)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let body = ledger::fhir::import(l, &author).with_context(|| {
                format!(
                    "{name} line {}: not a FHIR Consent this broker takes",
                    i + 1
                )
            })?;
            Ok((
                body,
                Origin {
                    file: name.clone(),
                    line: i + 1,
                },
            ))
        })
        .collect()
}

fn csv_bodies(
    file: &std::path::Path,
    me: &str,
    custodian: &str,
) -> anyhow::Result<Vec<(Body, Origin)>> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(file)
        .with_context(|| format!("reading {}", file.display()))?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| headers.iter().position(|h| h == name);
    let (Some(subject), Some(purposes)) = (column("subject"), column("purposes")) else {
        anyhow::bail!(
            "{}: the header must name the columns subject and purposes",
            file.display()
        );
    };
    let known = [
        "subject",
        "purposes",
        "consent_id",
        "modifiers",
        "datasets",
        "valid_from",
        "valid_until",
    ];
    if let Some(h) = headers.iter().find(|h| !known.contains(h)) {
        anyhow::bail!(
            "{}: unknown column {h:?} (columns: {})",
            file.display(),
            known.join(", ")
        );
    }
    let list = |s: &str| -> Vec<String> {
        s.split(';')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let now = ledger::ids::Timestamp::now().to_string();
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.with_context(|| format!("line {line}: not a CSV record"))?;
        let get = |name: &str| column(name).and_then(|c| record.get(c)).unwrap_or("");
        if record.get(subject).unwrap_or("").is_empty() {
            anyhow::bail!("line {line}: the subject is empty");
        }
        let p = list(record.get(purposes).unwrap_or(""));
        if p.is_empty() {
            anyhow::bail!("line {line}: no purpose");
        }
        let datasets = list(get("datasets"));
        let scope = if datasets.is_empty() {
            serde_json::json!({"custodian": custodian})
        } else {
            serde_json::json!({"datasets": datasets})
        };
        let mut json = serde_json::json!({
            "consent_id": match get("consent_id") { "" => new_consent_id()?, c => c.to_owned() },
            "subject": get("subject"),
            "scope": scope,
            "purposes": p,
            "valid_from": match get("valid_from") { "" => now.clone(), v => v.to_owned() },
            "grantor": me,
        });
        let modifiers = list(get("modifiers"));
        if !modifiers.is_empty() {
            json["modifiers"] = modifiers.into();
        }
        if !get("valid_until").is_empty() {
            json["valid_until"] = get("valid_until").into();
        }
        out.push((
            Body::from_json("consent_granted", &json.to_string()).with_context(|| {
                format!("line {line}: not a consent (check its purposes, dates and ids)")
            })?,
            Origin {
                file: name.clone(),
                line,
            },
        ));
    }
    Ok(out)
}
