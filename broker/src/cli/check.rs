//! `broker check`: everything a data directory stores, checked without changing a byte.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;

/// Arguments of `broker check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The data directory (as `broker serve` uses it).
    #[arg(long, env = "CONSENTRY_DATA_DIR", default_value = "consentry-data")]
    pub data_dir: PathBuf,
}

/// What one part of the directory holds, or what is wrong with it.
struct Findings {
    problems: Vec<String>,
}

impl Findings {
    fn ok(&self, what: &str, detail: String) {
        println!("ok       {what}: {detail}");
    }
    fn problem(&mut self, what: &str, detail: String) {
        println!("PROBLEM  {what}: {detail}");
        self.problems.push(format!("{what}: {detail}"));
    }
}

/// Runs `broker check`: the ledger (every record, signature, node hash and checkpoint, and
/// how far it got), each registered dataset version's files against their registration, the
/// kept releases' checksums and rows, and each study's pseudonym secret against its tag.
/// Prints a line per part and exits non-zero naming every problem.
pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    anyhow::ensure!(
        dir.join("ledger").is_dir(),
        "no ledger in {} (give the data directory with --data-dir)",
        dir.display()
    );
    let mut f = Findings {
        problems: Vec::new(),
    };
    let bar = super::ledger::progress_bar(0, "checking the ledger");
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let verified = ledger::verify_state(&dir.join("ledger"), &progress);
    bar.finish_and_clear();
    match verified {
        Ok((report, state)) => {
            f.ok(
                "ledger",
                format!(
                    "{} entries, {} checkpoints, root {}",
                    report.entries, report.checkpoints, report.root
                ),
            );
            datasets(dir, &state, &mut f);
            secrets(dir, &state, &mut f)?;
        }
        // Without a ledger that verifies, nothing else can be checked against it.
        Err(e) => f.problem("ledger", format!("{e}")),
    }
    kept(dir, &mut f)?;
    if f.problems.is_empty() {
        println!("everything stored in {} checks", dir.display());
        Ok(())
    } else {
        anyhow::bail!(
            "{} problem(s) in {}:\n  {}",
            f.problems.len(),
            dir.display(),
            f.problems.join("\n  ")
        )
    }
}

fn datasets(dir: &Path, state: &ledger::State, f: &mut Findings) {
    for (id, ds) in state.datasets() {
        for v in &ds.versions {
            let what = format!("dataset {id} v{}", v.reg.version);
            match crate::store::check_version(dir, &v.reg) {
                Ok(true) => {
                    let files: usize = v.reg.tables.iter().map(|t| t.files.len()).sum();
                    f.ok(&what, format!("{files} file(s) match their registration"));
                }
                Ok(false) => f.ok(
                    &what,
                    "staged, not yet in place (moved when the version loads)".into(),
                ),
                Err(e) => f.problem(&what, e.to_string()),
            }
        }
    }
}

fn secrets(dir: &Path, state: &ledger::State, f: &mut Findings) -> anyhow::Result<()> {
    if !dir.join("secrets").is_dir() {
        f.ok("study secrets", "none yet (no extract has run)".into());
        return Ok(());
    }
    let key = ledger::keyfile::read_private_key(&dir.join("ledger").join("ledger.key"))
        .context("reading the ledger's key (it authenticates the study secrets)")?;
    let secrets = crate::secrets::Secrets::open(dir, key.derive(crate::secrets::KEY_CONTEXT))?;
    let (mut held, mut without) = (0, 0);
    for s in state.studies() {
        match secrets.check(s.reg.study.as_str()) {
            Ok(true) => held += 1,
            Ok(false) => without += 1,
            Err(e) => f.problem(&format!("study {} secret", s.reg.study), e.to_string()),
        }
    }
    f.ok(
        "study secrets",
        format!("{held} checked, {without} studies without one (no extract yet)"),
    );
    Ok(())
}

fn kept(dir: &Path, f: &mut Findings) -> anyhow::Result<()> {
    if !dir.join("releases").is_dir() {
        f.ok("kept releases", "none".into());
        return Ok(());
    }
    let kept = crate::kept::Kept::open(dir)?;
    let (checked, damaged) = kept.check_all();
    for (path, why) in &damaged {
        f.problem(
            &format!("kept release {}", path.display()),
            format!("{why} (skipped when its dataset loads: its repeat is charged again)"),
        );
    }
    f.ok(
        "kept releases",
        format!("{checked} checked, {} damaged", damaged.len()),
    );
    Ok(())
}
