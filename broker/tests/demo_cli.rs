//! `broker demo`: deterministic with --seed, describes itself in demo.json, serves again what
//! it built, and refuses a data directory that holds another ledger.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn demo(data_dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["demo", "--no-serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("CONSENTRY_DATA_DIR", data_dir)
        .output()
        .unwrap()
}

fn info(data_dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir.join("demo.json")).unwrap()).unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_demo_is_deterministic_with_its_seed_and_describes_itself() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [a.path(), b.path()] {
        let out = demo(d, &["--patients", "150", "--seed", "3"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("study t2d-outcomes"), "{stdout}");
        assert!(stdout.contains("keys/alice.key"), "{stdout}");
        // What to try next, with this binary, the PI's key and the study.
        let exe = env!("CARGO_BIN_EXE_broker");
        let pi_key = d.join("keys/alice.key");
        let url = info(d)["url"].as_str().unwrap().to_owned();
        let try_line = format!("{exe} --url {url} --key {}", pi_key.display());
        assert!(stdout.contains(&try_line), "{stdout}");
        assert!(
            stdout.contains("query --study t2d-outcomes --dataset ehr"),
            "{stdout}"
        );
        assert!(
            stdout.contains("x-consentry-study\": \"t2d-outcomes\""),
            "{stdout}"
        );
    }
    let (ia, ib) = (info(a.path()), info(b.path()));
    // Same seed: same data (so the same registered digest) and the same consents.
    assert_eq!(ia["dataset"]["digest"], ib["dataset"]["digest"]);
    assert_eq!(ia["consents"], ib["consents"]);
    assert_eq!(ia["dataset"]["tables"]["patients"], 150);
    for p in ia["principals"].as_array().unwrap() {
        assert!(Path::new(p["key_file"].as_str().unwrap()).exists(), "{p}");
    }
    // A custodian's copy of a file hashes to what the registration recorded.
    let patients = ia["dataset"]["source_files"]["patients"].as_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["dataset", "hash", patients])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hashed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hashed[0]["rows"], 150);
    let sha = hashed[0]["sha256"].as_str().unwrap().to_owned();
    let entries = std::fs::read(a.path().join("ledger/entries.log")).unwrap();
    let entries = String::from_utf8_lossy(&entries);
    assert!(
        sha.len() == 64 && entries.contains(&sha),
        "the registered digest of patients"
    );

    // Keys are fresh for each demo.
    assert_ne!(ia["ledger_verifier_key"], ib["ledger_verifier_key"]);

    // Another seed gives another data set.
    let c = tempfile::tempdir().unwrap();
    let out = demo(c.path(), &["--patients", "150", "--seed", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(info(c.path())["dataset"]["digest"], ia["dataset"]["digest"]);

    // Run again on the same directory: it serves what it built, and says so.
    let out = demo(a.path(), &["--patients", "99"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("already holds a demo of 150 patients"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(info(a.path())["dataset"]["digest"], ia["dataset"]["digest"]);
}

#[test]
fn the_demo_refuses_a_directory_with_another_ledger() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["ledger", "init", "--origin", "other.example/ledger"])
        .env("CONSENTRY_DATA_DIR", d.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = std::fs::read(d.path().join("ledger/entries.log")).unwrap();
    let out = demo(d.path(), &["--patients", "10"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already holds a ledger but no demo.json"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(d.path().join("ledger/entries.log")).unwrap(),
        before,
        "nothing written"
    );
    assert!(!d.path().join("keys").exists());
}

/// A demo broker serving in the background, stopped when dropped.
struct Served {
    child: std::process::Child,
    info: serde_json::Value,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_demo(data_dir: &Path) -> Served {
    let child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["demo", "--listen", "127.0.0.1:0", "--patients", "120"])
        .args(["--seed", "9"])
        .env("CONSENTRY_DATA_DIR", data_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut served = Served {
        child,
        info: serde_json::Value::Null,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !data_dir.join("demo.json").exists() {
        assert!(
            served.child.try_wait().unwrap().is_none(),
            "broker demo exited early"
        );
        assert!(std::time::Instant::now() < deadline, "no demo.json");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    served.info = info(data_dir);
    served
}

#[test]
fn a_custodian_registers_a_version_and_a_sponsor_verifies_files_offline() {
    let d = tempfile::tempdir().unwrap();
    let served = serve_demo(d.path());
    let info = &served.info.clone();
    let url = info["url"].as_str().unwrap().to_owned();
    let key = |who: &str| d.path().join("keys").join(format!("{who}.key"));
    let client = |who: &str, args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .env("CONSENTRY_URL", &url)
            .env("CONSENTRY_KEY", key(who))
            .output()
            .unwrap()
    };
    let versions = || -> Vec<serde_json::Value> {
        let out = client("hospital", &["dataset", "list"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        all.into_iter().filter(|v| v["dataset"] == "ehr").collect()
    };
    assert_eq!(versions().len(), 1);

    // The custodian's copy of the tables, registered as the next version.
    let copy = tempfile::tempdir().unwrap();
    let mut tables = Vec::new();
    for (name, file) in info["dataset"]["source_files"].as_object().unwrap() {
        let to = copy.path().join(format!("{name}.parquet"));
        std::fs::copy(file.as_str().unwrap(), &to).unwrap();
        tables.push(to.to_str().unwrap().to_owned());
    }
    let policy = info["dataset"]["policy_file"].as_str().unwrap().to_owned();
    let register = |who: &str, policy: &str, files: &[String]| {
        let mut args = vec![
            "dataset",
            "register",
            "--dataset",
            "ehr",
            "--policy",
            policy,
        ];
        args.extend(files.iter().map(String::as_str));
        client(who, &args)
    };

    // Refused, and nothing changes: a policy that does not classify every column, a
    // researcher's key, a missing file.
    let partial = copy.path().join("partial.toml");
    let text_policy = std::fs::read_to_string(&policy).unwrap();
    let cut: String = text_policy
        .lines()
        .filter(|l| !l.starts_with("ssn "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&partial, cut).unwrap();
    let out = register("hospital", partial.to_str().unwrap(), &tables);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("column ssn is not classified"),
        "{}",
        text(&out.stderr)
    );
    let out = register("alice", &policy, &tables);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PermissionDenied"),
        "{}",
        text(&out.stderr)
    );
    let out = register("hospital", &policy, &["nowhere/x.parquet".to_string()]);
    assert!(!out.status.success());
    assert_eq!(versions().len(), 1, "nothing registered");

    let out = register("hospital", &policy, &tables);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reg["version"], 2);
    let listed = versions();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["digest"], reg["digest"]);
    assert_eq!(listed[1]["entry_index"], reg["index"]);
    assert_eq!(listed[1]["rows"], listed[0]["rows"]);

    // The same tables as CSV files in a directory (with files that are no table beside them):
    // each is converted to Parquet beside it, and that file is what is registered and stored.
    let csv_dir = copy.path().join("csv");
    std::fs::create_dir(&csv_dir).unwrap();
    std::fs::write(csv_dir.join("_SUCCESS"), "").unwrap();
    std::fs::write(csv_dir.join("README.txt"), "exported tables").unwrap();
    for t in &tables {
        let file = std::fs::File::open(t).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let stem = Path::new(t).file_stem().unwrap().to_str().unwrap();
        let out = std::fs::File::create(csv_dir.join(format!("{stem}.csv"))).unwrap();
        let mut w = arrow::csv::Writer::new(out);
        for b in reader {
            w.write(&b.unwrap()).unwrap();
        }
    }
    let csv_arg = [csv_dir.to_str().unwrap().to_owned()];
    let out = register("hospital", &policy, &csv_arg);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("converted to"),
        "{}",
        text(&out.stderr)
    );
    let from_csv: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(from_csv["version"], 3);
    assert_eq!(from_csv["rows"], listed[0]["rows"]);
    // Registered again, the directory now holding each CSV file and its Parquet conversion:
    // one file per table, the same bytes, so the same digest.
    let out = register("hospital", &policy, &csv_arg);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["version"], 4);
    assert_eq!(again["digest"], from_csv["digest"]);
    assert_eq!(versions().len(), 4);
    let patients = csv_dir.join("patients.parquet");
    // A Parquet file beside a CSV that is not its conversion is refused, and nothing is
    // registered.
    let original = std::fs::read(&patients).unwrap();
    std::fs::copy(&tables[0], &patients).unwrap();
    let out = register("hospital", &policy, &csv_arg);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is not the conversion of"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(versions().len(), 4);
    std::fs::write(&patients, original).unwrap();

    // A query whose --out exists, or has an unknown extension, is refused before it runs:
    // no receipt, nothing spent, the file untouched. A new .csv gets the result.
    let receipts = || -> usize {
        let out = client("irb", &["audit", "receipts", "--study", "t2d-outcomes"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
            .unwrap()
            .len()
    };
    let before = receipts();
    let taken = copy.path().join("taken.csv");
    std::fs::write(&taken, "keep me").unwrap();
    let query = |out: &Path| {
        client(
            "alice",
            &[
                "query",
                "--study",
                "t2d-outcomes",
                "--dataset",
                "ehr",
                "--sql",
                "SELECT COUNT(*) AS n FROM patients",
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };
    for out in [taken.clone(), copy.path().join("result.xlsx")] {
        let o = query(&out);
        assert!(!o.status.success(), "{}", out.display());
    }
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "keep me");
    assert!(!copy.path().join("result.xlsx").exists());
    assert_eq!(receipts(), before, "no query ran");
    let fresh = copy.path().join("result.csv");
    let o = query(&fresh);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(std::fs::read_to_string(&fresh).unwrap().starts_with("n,"));
    assert_eq!(receipts(), before + 1);

    // The sponsor fetches the study's bundle and checks it, and local files, offline.
    let bundle = copy.path().join("bundle.json");
    let out = client(
        "pharma",
        &[
            "bundle",
            "--study",
            "t2d-outcomes",
            "--out",
            bundle.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop(served);
    let vkey = info["ledger_verifier_key"].as_str().unwrap();
    let verify = |files: &[&str]| {
        let mut args = vec![
            "verify",
            "--verifier-key",
            vkey,
            "--bundle",
            bundle.to_str().unwrap(),
        ];
        for f in files {
            args.extend(["--file", f]);
        }
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = verify(&[&tables[0]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bundle"]["study"], "t2d-outcomes");
    // The same bytes were registered in both versions, under other paths.
    let found: Vec<(u64, String)> = v["files"][0]["registered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["dataset"], "ehr");
            (
                m["version"].as_u64().unwrap(),
                m["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].0, 1);
    assert_eq!(found[1].0, 2);
    assert!(found[1].1.ends_with(".parquet"), "{found:?}");
    // The Parquet file written beside a CSV is the file versions 3 and 4 recorded.
    let out = verify(&[patients.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found: Vec<(u64, String)> = v["files"][0]["registered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["version"].as_u64().unwrap(),
                m["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (3, "patients/patients.parquet".to_owned()),
            (4, "patients/patients.parquet".to_owned())
        ]
    );

    // A changed copy fails, naming the file.
    let changed = copy.path().join("changed.parquet");
    let mut bytes = std::fs::read(&tables[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&changed, bytes).unwrap();
    let out = verify(&[&tables[0], changed.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("match no file") && err.contains("changed.parquet"),
        "{err}"
    );

    // Another ledger's key fails the bundle itself.
    let other = ledger::note::SignerKey::generate("other.example/ledger").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["verify", "--verifier-key", &other.verifier().to_text()])
        .args(["--bundle", bundle.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Every file below `dir` with its bytes.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x04;
    std::fs::write(path, b).unwrap();
}

#[test]
fn check_names_each_damaged_part_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(demo(d, &["--patients", "200"]).status.success());
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["check", "--data-dir"])
            .arg(d)
            .output()
            .unwrap()
    };
    let before = snapshot(d);
    let out = check();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("dataset ehr v1: 4 file(s) match"));
    assert_eq!(snapshot(d), before, "a check changes nothing");
    // A flipped byte in a dataset file, then in the ledger's log: each named, exit non-zero.
    let data = d.join("datasets/ehr/1/observations/part-0.parquet");
    let log = d.join("ledger/entries.log");
    for (path, name) in [(&data, "observations/part-0.parquet"), (&log, "ledger")] {
        let len = std::fs::metadata(path).unwrap().len() as usize;
        flip(path, len / 2);
        let damaged = snapshot(d);
        let out = check();
        assert!(!out.status.success(), "{name}");
        assert!(
            text(&out.stdout).contains("PROBLEM"),
            "{}",
            text(&out.stdout)
        );
        assert!(text(&out.stderr).contains(name), "{}", text(&out.stderr));
        assert_eq!(snapshot(d), damaged, "a check changes nothing");
        flip(path, len / 2);
    }
    assert!(check().status.success());
}

#[test]
fn the_operator_onboards_rotates_and_revokes_a_principal_while_the_broker_serves() {
    let d = tempfile::tempdir().unwrap();
    let served = serve_demo(d.path());
    let url = served.info["url"].as_str().unwrap().to_owned();
    let operator = d.path().join("ledger/ledger.key");
    let run = |key: &Path, args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .env("CONSENTRY_URL", &url)
            .env("CONSENTRY_KEY", key)
            .env("CONSENTRY_DATA_DIR", d.path())
            .output()
            .unwrap()
    };
    // The new researcher makes a key pair and hands over only the verifier key.
    let carol = d.path().join("carol.key");
    let keygen = |out: &Path| -> String {
        let o = run(
            &operator,
            &[
                "ledger",
                "keygen",
                "--name",
                "carol",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout).trim().to_owned()
    };
    let vk = keygen(&carol);
    let studies = |key: &Path| run(key, &["study", "list"]);
    assert!(!studies(&carol).status.success(), "not registered yet");

    // Refused and nothing written: an unknown role; a researcher as the author.
    let add = |key: &Path, role: &str| {
        run(
            key,
            &[
                "principal",
                "add",
                "--id",
                "carol",
                "--role",
                role,
                "--verifier-key",
                &vk,
            ],
        )
    };
    let bad = add(&operator, "wizard");
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("wizard"),
        "{}",
        text(&bad.stderr)
    );
    let alice = d.path().join("keys/alice.key");
    let bad = add(&alice, "researcher");
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("PermissionDenied"),
        "{}",
        text(&bad.stderr)
    );
    assert!(!studies(&carol).status.success());

    // Registered while the broker serves: carol's calls work at once.
    let ok = add(&operator, "researcher");
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let appended: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(appended["index"].as_u64().is_some(), "{appended}");
    assert!(studies(&carol).status.success());
    let again = add(&operator, "researcher");
    assert!(!again.status.success(), "registered twice");

    // A rotated key: the old one stops working, the new one works.
    let carol2 = d.path().join("carol2.key");
    let vk2 = keygen(&carol2);
    let o = run(
        &operator,
        &[
            "principal",
            "rotate",
            "--id",
            "carol",
            "--verifier-key",
            &vk2,
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!studies(&carol).status.success());
    assert!(studies(&carol2).status.success());

    // Revoked: nothing works any more.
    let o = run(
        &operator,
        &[
            "principal",
            "revoke",
            "--id",
            "carol",
            "--reason",
            "left the study",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let refused = studies(&carol2);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("Unauthenticated"),
        "{}",
        text(&refused.stderr)
    );
    drop(served);
}

#[test]
fn a_study_on_two_datasets_keeps_each_approval() {
    let d = tempfile::tempdir().unwrap();
    let served = serve_demo(d.path());
    let info = served.info.clone();
    let url = info["url"].as_str().unwrap().to_owned();
    let client = |who: &str, args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .env("CONSENTRY_URL", &url)
            .env(
                "CONSENTRY_KEY",
                d.path().join("keys").join(format!("{who}.key")),
            )
            .output()
            .unwrap()
    };
    let ok = |o: Output| -> Output {
        assert!(o.status.success(), "{}", text(&o.stderr));
        o
    };
    // A second dataset, "registry", from the same files.
    let mut args: Vec<String> = ["dataset", "register", "--dataset", "registry", "--policy"]
        .map(String::from)
        .to_vec();
    args.push(info["dataset"]["policy_file"].as_str().unwrap().to_owned());
    for (name, file) in info["dataset"]["source_files"].as_object().unwrap() {
        args.push(format!("{name}={}", file.as_str().unwrap()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(client("hospital", &args));
    ok(client(
        "alice",
        &[
            "study",
            "create",
            "--study",
            "two",
            "--title",
            "Two sources",
            "--sponsor",
            "pharma",
            "--purpose",
            "GRU",
            "--dataset",
            "ehr",
            "--dataset",
            "registry",
        ],
    ));
    let approve = |dataset: &str, eps: &str, extra: &[&str]| {
        let mut a = vec![
            "study",
            "approve",
            "--study",
            "two",
            "--dataset",
            dataset,
            "--epsilon",
            eps,
            "--delta",
            "1e-6",
            "--valid-until",
            "2099-01-01T00:00:00Z",
        ];
        a.extend_from_slice(extra);
        client("irb", &a)
    };
    let grants = || -> Vec<serde_json::Value> {
        let out = ok(client("alice", &["study", "list"]));
        let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let s = all.into_iter().find(|s| s["id"] == "two").unwrap();
        let mut g = s["grants"].as_array().unwrap().clone();
        g.sort_by_key(|g| g["dataset"].as_str().unwrap().to_owned());
        g
    };
    let query = |dataset: &str| {
        client(
            "alice",
            &[
                "query",
                "--study",
                "two",
                "--dataset",
                dataset,
                "--epsilon",
                "0.1",
                "--sql",
                "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
            ],
        )
    };

    ok(approve("ehr", "1", &[]));
    let second = ok(approve("registry", "2", &["--min-cell-size", "11"]));
    assert!(
        text(&second.stderr).contains("keeping the study's grant on dataset ehr"),
        "{}",
        text(&second.stderr)
    );
    let g = grants();
    assert_eq!(g.len(), 2, "{g:?}");
    assert_eq!(
        (g[0]["dataset"].as_str(), g[0]["epsilon_granted"].as_f64()),
        (Some("ehr"), Some(1.0))
    );
    assert_eq!(
        (
            g[1]["dataset"].as_str(),
            g[1]["epsilon_granted"].as_f64(),
            g[1]["min_cell_size"].as_u64()
        ),
        (Some("registry"), Some(2.0), Some(11))
    );
    ok(query("ehr"));
    ok(query("registry"));
    // Re-approving one dataset changes its grant only; the other keeps everything, its
    // spend included.
    ok(approve("ehr", "3", &[]));
    let g = grants();
    assert_eq!(g[0]["epsilon_granted"].as_f64(), Some(3.0));
    assert_eq!(g[1]["min_cell_size"].as_u64(), Some(11));
    assert!(
        (g[1]["epsilon_spent"].as_f64().unwrap() - 0.1).abs() < 1e-9,
        "{g:?}"
    );
    // --only withdraws the others.
    ok(approve("registry", "2", &["--only"]));
    let g = grants();
    assert_eq!(g.len(), 1);
    let refused = query("ehr");
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("not approved for dataset \"ehr\""),
        "{}",
        text(&refused.stderr)
    );
    ok(query("registry"));

    // The policy that shapes the answers, as registered: for the study's members...
    let described = ok(client(
        "alice",
        &["dataset", "describe", "--dataset", "registry"],
    ));
    let policy = std::fs::read_to_string(info["dataset"]["policy_file"].as_str().unwrap()).unwrap();
    let printed = text(&described.stdout);
    assert!(
        printed.starts_with("# dataset registry version 1 (policy SHA-256 "),
        "{printed}"
    );
    assert!(printed.ends_with(&policy), "the registered file, unchanged");
    // ...not for a researcher of no study on that dataset, nor for an unknown one.
    let refused = client("bob", &["dataset", "describe", "--dataset", "registry"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("PermissionDenied"),
        "{}",
        text(&refused.stderr)
    );
    let unknown = client("alice", &["dataset", "describe", "--dataset", "nope"]);
    assert!(
        text(&unknown.stderr).contains("NotFound"),
        "{}",
        text(&unknown.stderr)
    );
    drop(served);
}

#[test]
fn a_custodian_imports_thousands_of_consents_in_one_call() {
    let d = tempfile::tempdir().unwrap();
    let served = serve_demo(d.path());
    let url = served.info["url"].as_str().unwrap().to_owned();
    let hospital = d.path().join("keys/hospital.key");
    let import = |file: &Path| -> Output {
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["consent", "import", "--file", file.to_str().unwrap()])
            .env("CONSENTRY_URL", &url)
            .env("CONSENTRY_KEY", &hospital)
            .output()
            .unwrap()
    };
    // 2,000 paper consents; the 500th reuses the 10th's consent id.
    let csv = d.path().join("paper.csv");
    let mut rows = String::from("subject,purposes,consent_id,modifiers,valid_until\n");
    for i in 0..2000 {
        let id = if i == 499 { 9 } else { i };
        let modifiers = if i % 3 == 0 { "NCU" } else { "" };
        rows.push_str(&format!(
            "bulk-{i},GRU;HMB,paper-{id},{modifiers},2030-01-01T00:00:00Z\n"
        ));
    }
    std::fs::write(&csv, rows).unwrap();
    let out = import(&csv);
    assert!(!out.status.success(), "one was refused");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["appended"].as_u64(), r["refused"].as_u64()),
        (Some(1999), Some(1)),
        "{r}"
    );
    assert_eq!(r["refusals"][0]["line"], 501, "{r}");
    assert!(
        text(&out.stderr).contains("1999 of 2000 consents appended"),
        "{}",
        text(&out.stderr)
    );
    let (first, last) = (
        r["first_index"].as_u64().unwrap(),
        r["last_index"].as_u64().unwrap(),
    );
    assert_eq!(
        last - first + 1,
        1999,
        "in order, the refused one leaving no entry"
    );
    // Ground truth: a subject's consent as the ledger now has it.
    let listed = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["consent", "list", "--subject", "bulk-1234"])
        .env("CONSENTRY_URL", &url)
        .env("CONSENTRY_KEY", &hospital)
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let listed = text(&listed.stdout);
    assert!(
        listed.contains("paper-1234") && listed.contains("HMB"),
        "{listed}"
    );

    // A file that cannot be read sends nothing: a missing column, a row without purposes.
    for bad in ["subject,consent_id\nx,y\n", "subject,purposes\nbulk-x,\n"] {
        std::fs::write(&csv, bad).unwrap();
        let out = import(&csv);
        assert!(!out.status.success());
        assert!(out.stdout.is_empty(), "nothing sent");
    }
    // FHIR Consent resources, one per line.
    let fhir = d.path().join("export.ndjson");
    let resource = |id: &str, patient: &str| {
        serde_json::json!({
            "resourceType": "Consent", "id": id, "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "patient": {"reference": format!("Patient/{patient}")},
            "organization": [{"reference": "Organization/hospital"}],
            "dateTime": "2025-03-01T09:30:00Z",
            "provision": {"type": "permit", "purpose": [
                {"system": "http://purl.obolibrary.org/obo/duo.owl", "code": "DUO:0000042"}]}
        })
        .to_string()
    };
    let lines: Vec<String> = (0..50)
        .map(|i| resource(&format!("fhir-{i}"), &format!("f-{i}")))
        .collect();
    std::fs::write(&fhir, lines.join("\n")).unwrap();
    let out = import(&fhir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["appended"], 50, "{r}");

    // A FHIR Bulk Data export folder: its Consent files in name order, the other resource
    // types passed over; a refusal names its file and line (a blank line is counted).
    let export = d.path().join("bulk-export");
    std::fs::create_dir(&export).unwrap();
    let part = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| resource(&format!("bulk-fhir-{i}"), &format!("g-{i}")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    std::fs::write(export.join("Consent.000.ndjson"), part(0, 30)).unwrap();
    // The second file: a blank line, then 19 consents and one that reuses an id.
    let mut second = format!("\n{}", part(30, 49));
    second.push('\n');
    second.push_str(&resource("bulk-fhir-3", "g-99"));
    std::fs::write(export.join("Consent.001.ndjson"), second).unwrap();
    std::fs::write(
        export.join("Patient.000.ndjson"),
        "{\"resourceType\": \"Patient\", \"id\": \"g-1\"}\n",
    )
    .unwrap();
    let out = import(&export);
    assert!(!out.status.success(), "one was refused");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["appended"].as_u64(), r["refused"].as_u64()),
        (Some(49), Some(1)),
        "{r}"
    );
    assert_eq!(r["refusals"][0]["file"], "Consent.001.ndjson", "{r}");
    assert_eq!(r["refusals"][0]["line"], 21, "{r}");
    assert!(
        text(&out.stderr).contains("Patient.000.ndjson: not Consent resources, passed over"),
        "{}",
        text(&out.stderr)
    );
    // A folder without Consent files sends nothing.
    let empty = d.path().join("no-consents");
    std::fs::create_dir(&empty).unwrap();
    let out = import(&empty);
    assert!(!out.status.success() && out.stdout.is_empty());
    drop(served);
}
