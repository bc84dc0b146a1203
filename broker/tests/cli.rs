//! The `broker` command line, end to end: the README's ledger walkthrough and bad input.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn broker(data_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(args)
        .env("CONSENTRY_DATA_DIR", data_dir)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_ledger_walkthrough_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/ledger-walkthrough.sh");
    let out = Command::new("bash")
        .arg(script)
        .current_dir(dir.path())
        .env("BROKER", env!("CARGO_BIN_EXE_broker"))
        .env("CONSENTRY_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("walkthrough complete"));
    // The sponsor's bundle check found both receipts and the older checkpoint consistent.
    assert!(
        stdout.contains("\"released\": 1") && stdout.contains("\"denied\": 1"),
        "{stdout}"
    );
    assert!(stdout.contains("\"consistent_with_size\": 14"), "{stdout}");
    // The tampered copy was refused, naming the entry.
    assert!(
        stderr.contains("ledger corrupt at entry 1 (entries.log)"),
        "{stderr}"
    );
    // Private keys were written 0600.
    let key = dir.path().join("data/walkthrough/alice.key");
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(
        broker(d, &["ledger", "init", "--origin", "t.example/log"])
            .status
            .success()
    );
    let init_again = broker(d, &["ledger", "init", "--origin", "t.example/log"]);
    assert!(!init_again.status.success());
    assert!(text(&init_again.stderr).contains("already exists"));
    let key = d.join("ledger/ledger.key");
    let key = key.to_str().unwrap();
    let size_before = std::fs::metadata(d.join("ledger/entries.log"))
        .unwrap()
        .len();

    for (content, needle) in [
        ("not json", "not JSON"),
        (r#"{"kind": "nope", "body": {}}"#, "unknown entry kind"),
        (
            r#"{"kind": "principal_registered", "body": {"id": "x"}}"#,
            "missing field",
        ),
        (
            r#"{"kind": "study_closed", "body": {"study": "s", "reason": "r"}}"#,
            "needs irb",
        ),
        (
            r#"{"kind": "principal_revoked", "body": {"id": "ghost"}, "author": "mallory"}"#,
            "not the key's name",
        ),
    ] {
        let f = d.join("e.json");
        std::fs::write(&f, content).unwrap();
        let out = broker(
            d,
            &[
                "ledger",
                "append",
                "--key",
                key,
                "--entry",
                f.to_str().unwrap(),
            ],
        );
        assert!(!out.status.success(), "{content}");
        assert!(
            text(&out.stderr).contains(needle),
            "{content}: {}",
            text(&out.stderr)
        );
    }
    let out = broker(d, &["ledger", "entry", "--index", "99"]);
    assert!(
        text(&out.stderr).contains("out of range"),
        "{}",
        text(&out.stderr)
    );
    let out = broker(d, &["ledger", "prove-consistency", "--old", "5"]);
    assert!(!out.status.success());
    // A key readable by others is refused.
    let loose = d.join("loose.key");
    let made = broker(
        d,
        &[
            "ledger",
            "keygen",
            "--name",
            "bob",
            "--out",
            loose.to_str().unwrap(),
        ],
    );
    assert!(made.status.success());
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = d.join("e.json");
    std::fs::write(
        &f,
        r#"{"kind": "principal_revoked", "body": {"id": "bob"}}"#,
    )
    .unwrap();
    let args = [
        "ledger",
        "append",
        "--key",
        loose.to_str().unwrap(),
        "--entry",
        f.to_str().unwrap(),
    ];
    let out = broker(d, &args);
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out.stderr)
    );
    // Nothing was appended.
    assert_eq!(
        std::fs::metadata(d.join("ledger/entries.log"))
            .unwrap()
            .len(),
        size_before
    );
    let out = broker(d, &["ledger", "bundle", "--study", "none"]);
    assert!(
        text(&out.stderr).contains("unknown study"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bundles_checked_with_another_ledgers_key_fail() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    assert!(
        broker(a.path(), &["ledger", "init", "--origin", "a.example/log"])
            .status
            .success()
    );
    assert!(
        broker(b.path(), &["ledger", "init", "--origin", "b.example/log"])
            .status
            .success()
    );
    // A study is needed for a bundle: register the minimum through the library.
    let dir = a.path().join("ledger");
    {
        use ledger::entry::*;
        use ledger::ids::*;
        let (l, _) = ledger::Ledger::open(&dir, ledger::Config::default()).unwrap();
        let actors: Vec<_> = ["st-mary", "dr-lee", "acme"]
            .iter()
            .map(|n| ledger::note::SignerKey::generate(n).unwrap())
            .collect();
        for (k, role) in actors
            .iter()
            .zip([Role::Custodian, Role::Researcher, Role::Sponsor])
        {
            l.append_as_operator(Body::PrincipalRegistered(PrincipalRegistered {
                id: PrincipalId::new(k.name()).unwrap(),
                role,
                key: k.verifier().to_text(),
                subject: None,
                display_name: None,
            }))
            .unwrap();
        }
        let tables = vec![TableManifest {
            name: "t".into(),
            rows: 0,
            columns: vec![ColumnManifest {
                name: "pid".into(),
                data_type: "Utf8".into(),
                nullable: false,
            }],
            files: vec![],
        }];
        let sign = |k: &ledger::note::SignerKey, body| {
            SignedEntry::sign(
                k,
                Entry {
                    author: PrincipalId::new(k.name()).unwrap(),
                    time: Timestamp::now(),
                    body,
                },
            )
        };
        l.append(sign(
            &actors[0],
            Body::DatasetRegistered(DatasetRegistered {
                dataset: DatasetId::new("d").unwrap(),
                version: 1,
                custodian: PrincipalId::new("st-mary").unwrap(),
                consent_basis: ConsentBasis::OptOut,
                privacy_unit: "pid".into(),
                policy_digest: Digest::of(b"p"),
                digest: DatasetRegistered::compute_digest(&tables),
                tables,
            }),
        ))
        .unwrap();
        l.append(sign(
            &actors[1],
            Body::StudyRegistered(StudyRegistered {
                study: StudyId::new("s").unwrap(),
                title: "A study".into(),
                sponsor: PrincipalId::new("acme").unwrap(),
                pi: PrincipalId::new("dr-lee").unwrap(),
                researchers: vec![PrincipalId::new("dr-lee").unwrap()],
                purpose: ledger::duo::Purpose::parse("HMB").unwrap(),
                commercial: false,
                methods_development: false,
                datasets: vec![DatasetId::new("d").unwrap()],
            }),
        ))
        .unwrap();
    }
    let bundle = a.path().join("bundle.json");
    let out = broker(
        a.path(),
        &[
            "ledger",
            "bundle",
            "--study",
            "s",
            "--out",
            bundle.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let good = text(&broker(a.path(), &["ledger", "verifier-key"]).stdout);
    let wrong = text(&broker(b.path(), &["ledger", "verifier-key"]).stdout);
    let check = |key: &str| {
        broker(
            a.path(),
            &[
                "ledger",
                "verify-bundle",
                "--verifier-key",
                key.trim(),
                "--bundle",
                bundle.to_str().unwrap(),
            ],
        )
    };
    let ok = check(&good);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let out = check(&wrong);
    assert!(!out.status.success());
    assert!(!text(&out.stderr).is_empty());
}
