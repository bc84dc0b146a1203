//! `broker demo`: builds a synthetic hospital data set with consents and an approved study in
//! a data directory, then serves it (see [`crate::demo`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Args;

use super::serve::{ServeArgs, open_or_init, shutdown_signal};
use crate::demo::{self, DemoInfo};
use crate::server::{self, Broker, ServeOptions};

/// Arguments of `broker demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where and how to serve (the flags of `broker serve`).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Patients in the synthetic data set (with their encounters, conditions and lab
    /// observations).
    #[arg(long, env = "CONSENTRY_DEMO_PATIENTS", default_value_t = 2000)]
    pub patients: usize,
    /// Seed of the data set, the consents and the study (keys are always fresh).
    #[arg(long, env = "CONSENTRY_DEMO_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Build the demo and write `demo.json`, then exit instead of serving.
    #[arg(long, env = "CONSENTRY_DEMO_NO_SERVE", default_value_t = false)]
    pub no_serve: bool,
}

/// The demo description file in a data directory.
pub fn info_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("demo.json")
}

/// Writes `demo.json` so that a crash leaves either the old file or the new one.
fn write_info(data_dir: &Path, info: &DemoInfo) -> anyhow::Result<()> {
    let path = info_path(data_dir);
    let tmp = data_dir.join("demo.json.tmp");
    let mut text = serde_json::to_string_pretty(info)?;
    text.push('\n');
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(())
}

/// Runs `broker demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = &args.serve.data_dir;
    let existing = match std::fs::read_to_string(info_path(dir)) {
        Ok(text) => Some(
            serde_json::from_str::<DemoInfo>(&text)
                .with_context(|| format!("reading {}", info_path(dir).display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context(format!("reading {}", info_path(dir).display())),
    };
    if existing.is_none() && dir.join("ledger").join("ledger.json").exists() {
        bail!(
            "{} already holds a ledger but no demo.json (not a demo, or an earlier demo was \
             interrupted); choose another --data-dir, or remove this one to rebuild the demo",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ledger = Arc::new(open_or_init(&args.serve)?);
    rt.block_on(async {
        let broker = Broker::with_limits(
            ledger.clone(),
            dir,
            args.serve.limits.engine(),
            args.serve.max_token_lifetime,
        )?;
        args.serve.limits.measure_schedule().await;
        let tls = args.serve.tls_cert.clone().zip(args.serve.tls_key.clone());
        let running = server::serve(
            broker,
            ServeOptions {
                listen: args.serve.listen,
                tls,
                drain: server::DRAIN,
            },
        )
        .await?;
        let url = format!("http://{}", running.addr);
        let info = match existing {
            Some(mut info) => {
                if info.patients != args.patients || info.seed != args.seed {
                    eprintln!(
                        "note: {} already holds a demo of {} patients (seed {}); serving it \
                         (remove the directory to build another)",
                        dir.display(),
                        info.patients,
                        info.seed
                    );
                }
                info.listen = running.addr.to_string();
                info.url = url;
                info.flight_url = format!("grpc://{}", running.addr);
                info
            }
            None => {
                let operator =
                    ledger::keyfile::read_private_key(&dir.join("ledger").join("ledger.key"))?;
                let opts = demo::Options {
                    patients: args.patients,
                    seed: args.seed,
                };
                demo::populate(dir, &url, &operator, &opts).await?
            }
        };
        write_info(dir, &info)?;
        print_welcome(dir, &info);
        if args.no_serve {
            return Ok(running.shutdown().await?);
        }
        eprintln!("serving on {} (Ctrl-C stops)", running.addr);
        Ok::<_, anyhow::Error>(running.until(shutdown_signal()).await?)
    })?;
    drop(rt);
    super::serve::close(ledger)
}

/// How to use the demo: the principals, then commands to try.
fn print_welcome(dir: &Path, info: &DemoInfo) {
    let d = dir.display();
    println!("Consentry demo in {d} (described in {d}/demo.json)");
    println!(
        "  dataset {} v{} ({}), custodian {}, consent basis opt-in",
        info.dataset.id,
        info.dataset.version,
        info.dataset
            .tables
            .iter()
            .map(|(t, n)| format!("{t}: {n} rows"))
            .collect::<Vec<_>>()
            .join(", "),
        info.dataset.custodian
    );
    println!(
        "  consents: {} granted ({} time-limited, {} revoked), {} patients never consented",
        info.consents.granted,
        info.consents.time_limited,
        info.consents.revoked,
        info.consents.never
    );
    println!(
        "  study {} ({}), PI {}, sponsor {}, approved by {} with epsilon {} on {}",
        info.study.id,
        info.study.purpose,
        info.study.pi,
        info.study.sponsor,
        info.study.irb,
        info.study.epsilon,
        info.dataset.id
    );
    println!("  principals and their keys:");
    for p in &info.principals {
        println!("    {:<12} {:<11} {}", p.id, p.role, p.key_file.display());
    }
    println!();
    println!("gRPC: {}   Arrow Flight SQL: {}", info.url, info.flight_url);
    println!("ledger verifier key: {}", info.ledger_verifier_key);
    let key = |id: &str| {
        info.principals
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.key_file.display().to_string())
            .unwrap_or_default()
    };
    let pi = key(&info.study.pi);
    // This very binary, so that the lines work whether or not `broker` is on the PATH.
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "broker".into());
    println!();
    println!("Try next, in another terminal (as the study's PI):");
    println!(
        "  {exe} --url {} --key {pi} query --study {} --dataset {} --epsilon 0.5 \\\n    \
         --sql \"SELECT sex, COUNT(DISTINCT patient_id) AS patients FROM patients GROUP BY sex\"",
        info.url, info.study.id, info.dataset.id
    );
    println!("  (add --dry-run first to see what it would spend and how accurate it would be)");
    println!("From Python with ADBC (pip install adbc-driver-flightsql pyarrow):");
    println!("  import subprocess, adbc_driver_flightsql.dbapi as flight_sql");
    println!(
        "  token = subprocess.check_output([\"{exe}\", \"token\", \"--key\", \"{pi}\"], text=True).strip()"
    );
    println!(
        "  conn = flight_sql.connect(\"{}\", autocommit=True, db_kwargs={{\n      \
         \"adbc.flight.sql.authorization_header\": f\"Bearer {{token}}\",\n      \
         \"adbc.flight.sql.rpc.call_header.x-consentry-study\": \"{}\"}})",
        info.flight_url, info.study.id
    );
    println!(
        "Notebooks for each role are in the repository's notebooks/ (they find this demo in \
         ../consentry-data, or CONSENTRY_DEMO_DIR)."
    );
}
