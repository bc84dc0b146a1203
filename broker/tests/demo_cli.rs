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
