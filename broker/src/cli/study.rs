//! `broker study …`: a PI registers a study; an IRB approves, suspends or closes it.

use clap::{Args, Subcommand};
use ledger::entry::Body;
use proto::v1;

use super::conn::{self, Conn};
use crate::client;

/// Arguments of `broker study`.
#[derive(Debug, Args)]
pub struct StudyArgs {
    /// The study command.
    #[command(subcommand)]
    pub command: StudyCommand,
}

/// Study commands, signed with --key (the PI's for `create`, the IRB's for the others).
#[derive(Debug, Subcommand)]
pub enum StudyCommand {
    /// Register a study (the caller is its principal investigator).
    Create {
        /// The study's id.
        #[arg(long, env = "CONSENTRY_STUDY")]
        study: String,
        /// Its title.
        #[arg(long, env = "CONSENTRY_TITLE")]
        title: String,
        /// The sponsor principal.
        #[arg(long, env = "CONSENTRY_SPONSOR")]
        sponsor: String,
        /// Research purpose as GA4GH DUO (GRU, HMB, POA, DS:<disease term>).
        #[arg(long, env = "CONSENTRY_PURPOSE")]
        purpose: String,
        /// Researchers besides the PI (repeat for several).
        #[arg(
            long = "researcher",
            env = "CONSENTRY_RESEARCHERS",
            value_delimiter = ','
        )]
        researchers: Vec<String>,
        /// Datasets requested (repeat for several).
        #[arg(
            long = "dataset",
            env = "CONSENTRY_DATASETS",
            value_delimiter = ',',
            required = true
        )]
        datasets: Vec<String>,
        /// A commercial study (refused by consents with NCU or NPU).
        #[arg(long, env = "CONSENTRY_COMMERCIAL", default_value_t = false)]
        commercial: bool,
    },
    /// Approve a study on one dataset with a privacy budget (the caller is the IRB). The
    /// study's grants on its other datasets are kept (carried into the new approval, which also
    /// sets the approval period); with --only they are withdrawn.
    Approve {
        /// The study.
        #[arg(long, env = "CONSENTRY_STUDY")]
        study: String,
        /// The dataset.
        #[arg(long, env = "CONSENTRY_DATASET")]
        dataset: String,
        /// Privacy budget (epsilon) over the approval's life.
        #[arg(long, env = "CONSENTRY_EPSILON")]
        epsilon: f64,
        /// Delta budget (needed for GROUP BY keys without a public domain).
        #[arg(long, env = "CONSENTRY_DELTA", default_value_t = 0.0)]
        delta: f64,
        /// Also allow de-identified, k-anonymous extracts with this k.
        #[arg(long, env = "CONSENTRY_EXTRACT_K")]
        extract_k: Option<u32>,
        /// Suppress released groups smaller than this (noisy) count.
        #[arg(long, env = "CONSENTRY_MIN_CELL_SIZE")]
        min_cell_size: Option<u32>,
        /// Start of the approval (RFC 3339; now without).
        #[arg(long, env = "CONSENTRY_VALID_FROM")]
        valid_from: Option<String>,
        /// End of the approval (RFC 3339).
        #[arg(long, env = "CONSENTRY_VALID_UNTIL")]
        valid_until: String,
        /// Grant this dataset only, withdrawing the study's grants on other datasets.
        #[arg(long, default_value_t = false)]
        only: bool,
    },
    /// Suspend a study: no query runs until it is approved again.
    Suspend {
        /// The study.
        #[arg(long, env = "CONSENTRY_STUDY")]
        study: String,
        /// Why, for the record.
        #[arg(long, env = "CONSENTRY_REASON")]
        reason: String,
    },
    /// Close a study for good.
    Close {
        /// The study.
        #[arg(long, env = "CONSENTRY_STUDY")]
        study: String,
        /// Why, for the record.
        #[arg(long, env = "CONSENTRY_REASON")]
        reason: String,
    },
    /// Every study with its status, approvals and budgets (JSON).
    List,
}

/// Runs a study command.
pub fn run(conn: &Conn, args: StudyArgs) -> anyhow::Result<()> {
    conn::block_on(async move {
        let (key, auth) = conn.channel().await?;
        let mut r = v1::registry_client::RegistryClient::new(auth);
        let (kind, json) = match args.command {
            StudyCommand::List => {
                let l = r
                    .list_studies(v1::ListStudiesRequest {})
                    .await
                    .map_err(conn::status)?
                    .into_inner();
                let out: Vec<serde_json::Value> = l.studies.iter().map(study_json).collect();
                return conn::print_json(&out);
            }
            StudyCommand::Create {
                study,
                title,
                sponsor,
                purpose,
                researchers,
                datasets,
                commercial,
            } => {
                let mut members = vec![key.name().to_owned()];
                members.extend(researchers.into_iter().filter(|r| r != key.name()));
                (
                    "study_registered",
                    serde_json::json!({
                        "study": study, "title": title, "sponsor": sponsor, "pi": key.name(),
                        "researchers": members, "purpose": purpose, "commercial": commercial,
                        "datasets": datasets,
                    }),
                )
            }
            StudyCommand::Approve {
                study,
                dataset,
                epsilon,
                delta,
                extract_k,
                min_cell_size,
                valid_from,
                valid_until,
                only,
            } => {
                let mut grant = serde_json::json!({
                    "dataset": dataset, "epsilon": epsilon, "delta": delta, "dp": true,
                });
                if let Some(k) = extract_k {
                    grant["extract_k"] = k.into();
                }
                if let Some(m) = min_cell_size {
                    grant["min_cell_size"] = m.into();
                }
                let mut grants = vec![grant];
                if !only {
                    let studies = r
                        .list_studies(v1::ListStudiesRequest {})
                        .await
                        .map_err(conn::status)?
                        .into_inner()
                        .studies;
                    if let Some(s) = studies.iter().find(|s| s.id == study) {
                        let kept = other_grants(s, &dataset);
                        for g in &kept {
                            eprintln!(
                                "keeping the study's grant on dataset {} (--only withdraws it)",
                                g["dataset"].as_str().unwrap_or_default()
                            );
                        }
                        grants.extend(kept);
                    }
                }
                (
                    "study_approved",
                    serde_json::json!({
                        "study": study,
                        "grants": grants,
                        "valid_from": valid_from
                            .unwrap_or_else(|| ledger::ids::Timestamp::now().to_string()),
                        "valid_until": valid_until,
                    }),
                )
            }
            StudyCommand::Suspend { study, reason } => (
                "study_suspended",
                serde_json::json!({"study": study, "reason": reason}),
            ),
            StudyCommand::Close { study, reason } => (
                "study_closed",
                serde_json::json!({"study": study, "reason": reason}),
            ),
        };
        let body = Body::from_json(kind, &json.to_string())?;
        let a = r
            .append(client::sign(&key, body)?)
            .await
            .map_err(conn::status)?
            .into_inner();
        conn::print_json(&conn::appended(&a))
    })
}

/// The grants of study `s` on datasets other than `dataset`, as an approval carries them:
/// the same budgets, modes and minimum cell size.
fn other_grants(s: &v1::Study, dataset: &str) -> Vec<serde_json::Value> {
    s.grants
        .iter()
        .filter(|g| g.dataset != dataset)
        .map(|g| {
            let b = g.budget.clone().unwrap_or_default();
            let mut grant = serde_json::json!({
                "dataset": g.dataset, "epsilon": b.epsilon_granted, "delta": b.delta_granted,
                "dp": g.dp,
            });
            if g.extract_k > 0 {
                grant["extract_k"] = g.extract_k.into();
            }
            if g.min_cell_size > 0 {
                grant["min_cell_size"] = g.min_cell_size.into();
            }
            grant
        })
        .collect()
}

fn study_json(s: &v1::Study) -> serde_json::Value {
    let grants: Vec<serde_json::Value> = s
        .grants
        .iter()
        .map(|g| {
            let b = g.budget.as_ref();
            serde_json::json!({
                "dataset": g.dataset,
                "dp": g.dp,
                "extract_k": (g.extract_k > 0).then_some(g.extract_k),
                "min_cell_size": (g.min_cell_size > 0).then_some(g.min_cell_size),
                "epsilon_granted": b.map(|b| b.epsilon_granted),
                "epsilon_spent": b.map(|b| b.epsilon_spent),
                "epsilon_left": b.map(|b| b.epsilon_left),
                "delta_granted": b.map(|b| b.delta_granted),
                "delta_spent": b.map(|b| b.delta_spent),
                "delta_left": b.map(|b| b.delta_left),
                "rho_spent": b.map(|b| b.rho_spent),
                "rho_left": b.map(|b| b.rho_left),
                "epsilon_guaranteed": b.map(|b| b.epsilon_guaranteed),
                "delta_guaranteed": b.map(|b| b.delta_guaranteed),
                "accountant": b.map(|b| b.accountant.clone()),
            })
        })
        .collect();
    serde_json::json!({
        "id": s.id, "title": s.title, "sponsor": s.sponsor, "pi": s.pi,
        "researchers": s.researchers, "purpose": s.purpose, "status": s.status, "irb": s.irb,
        "valid_from": s.valid_from, "valid_until": s.valid_until, "grants": grants,
    })
}
