//! Crash safety. A child process appending at full speed is killed (SIGKILL) many times; after
//! each reopen every acknowledged entry is there and the tree is consistent with every
//! checkpoint issued before the kill. Also torn log tails written by hand, and a node hash
//! file that lags behind the log.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::files::{self, HEADER, LOG, TREE, hex};
use common::*;
use ledger::ids::PrincipalId;
use ledger::note::{self, SignerKey};
use ledger::{Error, Ledger, merkle};

/// Set in the child's environment: the test's root directory (the ledger is in `ledger/`).
const CHILD_ENV: &str = "LEDGER_CRASH_CHILD";
/// Set in the child's environment: the iteration, to keep consent ids unique.
const ITER_ENV: &str = "LEDGER_CRASH_ITER";
const CHILD_TEST: &str = "crash_child_helper";
const ITERATIONS: u64 = 30;

/// Not a test by itself: the body of the child process that
/// `sigkill_during_appends_loses_nothing_acknowledged` starts (by re-running this test binary)
/// and kills. Without `LEDGER_CRASH_CHILD` in the environment it does nothing.
#[test]
fn crash_child_helper() {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let iter: u64 = std::env::var(ITER_ENV).unwrap().parse().unwrap();
    run_child(Path::new(&root), iter);
}

/// One line to the parent: formatted first, written with one `write` and flushed, so a kill
/// leaves at most the last line incomplete (the parent ignores a line without its newline).
fn say(line: String) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
}

fn run_child(root: &Path, iter: u64) {
    let (ledger, _) = Ledger::open(&root.join("ledger"), config()).unwrap();
    let custodian = Actor {
        id: PrincipalId::new("st-mary").unwrap(),
        key: SignerKey::parse(&std::fs::read_to_string(root.join("custodian.key")).unwrap())
            .unwrap(),
    };
    let researcher = PrincipalId::new("dr-lee").unwrap();
    // libtest may have printed "test crash_child_helper ... " without a newline.
    say("\nREADY\n".into());
    // Safety net: the parent kills the child long before this.
    let deadline = Instant::now() + Duration::from_secs(20);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (ledger, custodian, researcher) = (&ledger, &custodian, &researcher);
            s.spawn(move || {
                for n in 0u64.. {
                    assert!(
                        Instant::now() < deadline,
                        "the parent never killed the child"
                    );
                    let appended = match (t + n) % 4 {
                        0 | 1 => {
                            let id = format!("c{iter}-{t}-{n}");
                            let subject = format!("MRN-{iter}-{t}-{n}");
                            let body = consent_body(custodian, &id, &subject, "ehr", &["GRU"]);
                            ledger.append(custodian.sign(body))
                        }
                        // 1e-7 epsilon each: the study's budget of 1 lasts 10 million receipts.
                        2 => ledger.append_as_operator(receipt_on(ledger, researcher, 1e-7)),
                        _ => ledger.append_as_operator(denied(receipt_on(ledger, researcher, 0.0))),
                    }
                    .unwrap();
                    say(format!(
                        "ACK {} {}\n",
                        appended.index,
                        hex(&appended.leaf_hash)
                    ));
                }
            });
        }
        s.spawn(|| {
            loop {
                assert!(
                    Instant::now() < deadline,
                    "the parent never killed the child"
                );
                let cp = ledger.checkpoint().unwrap();
                say(format!("CP {}\n", B64.encode(cp)));
                std::thread::sleep(Duration::from_millis(15));
            }
        });
    });
}

/// splitmix64: a deterministic PRNG for kill delays.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Complete lines (ending in a newline) of `r`, until end of file.
fn complete_lines(r: impl Read) -> Vec<String> {
    let mut r = BufReader::new(r);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while r.read_until(b'\n', &mut buf).unwrap() > 0 {
        if buf.ends_with(b"\n") {
            out.push(String::from_utf8_lossy(&buf).trim_end().to_string());
        }
        buf.clear();
    }
    out
}

/// Checks every acknowledged entry and every checkpoint against the reopened ledger.
fn check_reopened(ledger: &Ledger, acked: &BTreeMap<u64, String>, cps: &[String], new: u64) {
    let size = ledger.size();
    for (&index, hash) in acked {
        assert!(
            index < size,
            "acknowledged entry {index} lost (size {size})"
        );
        assert_eq!(
            hex(&ledger.leaf_hash(index).unwrap()),
            *hash,
            "entry {index}"
        );
    }
    // The log bytes themselves, for the entries acknowledged in this iteration.
    for (&index, hash) in acked.range(new..) {
        let leaf = ledger.leaf(index).unwrap();
        assert_eq!(
            hex(&merkle::leaf_hash(&leaf)),
            *hash,
            "log bytes of {index}"
        );
    }
    let root = ledger.root(size).unwrap();
    for text in cps {
        let cp = note::open_checkpoint(ledger.verifier_key(), text, Some(ledger.origin())).unwrap();
        assert!(
            cp.size <= size,
            "checkpoint at {} beyond size {size}",
            cp.size
        );
        assert_eq!(
            ledger.root(cp.size).unwrap(),
            cp.root,
            "root at {}",
            cp.size
        );
        if cp.size > 0 {
            let proof = ledger.consistency_proof(cp.size, None).unwrap();
            merkle::verify_consistency(cp.size, size, &proof, &cp.root, &root).unwrap();
        }
    }
}

#[test]
fn sigkill_during_appends_loses_nothing_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("ledger");
    let w = world(&dir);
    std::fs::write(root.path().join("custodian.key"), w.custodian.key.to_text()).unwrap();
    drop(w);

    let exe = std::env::current_exe().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut cps: Vec<String> = Vec::new();
    let (mut torn, mut killed_before_ready) = (0, 0);
    for iter in 0..ITERATIONS {
        let mut child = Command::new(&exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, root.path())
            .env(ITER_ENV, iter.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || complete_lines(out));
        let err = std::thread::spawn(move || complete_lines(err).join("\n"));
        let mut rng = iter.wrapping_mul(0x1234_5678_9abc_def1) ^ 0x5eed;
        std::thread::sleep(Duration::from_millis(20 + splitmix(&mut rng) % 281));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let (lines, err) = (out.join().unwrap(), err.join().unwrap());
        assert_eq!(
            status.signal(),
            Some(9),
            "the child ended on its own:\n{err}"
        );

        let new = acked.last_key_value().map_or(0, |(&k, _)| k + 1);
        killed_before_ready += usize::from(!lines.iter().any(|l| l == "READY"));
        for line in &lines {
            if let Some(rest) = line.strip_prefix("ACK ") {
                let (index, hash) = rest.split_once(' ').unwrap();
                let index: u64 = index.parse().unwrap();
                let old = acked.insert(index, hash.to_string());
                assert!(old.is_none(), "index {index} acknowledged twice");
            } else if let Some(b64) = line.strip_prefix("CP ") {
                cps.push(String::from_utf8(B64.decode(b64).unwrap()).unwrap());
            }
        }
        let (ledger, report) = Ledger::open(&dir, config()).unwrap();
        torn += usize::from(report.truncated_bytes > 0);
        check_reopened(&ledger, &acked, &cps, new);
        drop(ledger);
    }
    let report = ledger::verify(&dir, &|_, _| {}).unwrap();
    assert!(report.entries >= acked.len() as u64);
    println!(
        "{ITERATIONS} kills: {} entries acknowledged, {} checkpoints, {} entries in the log, \
         torn tail truncated after {torn} kills, {killed_before_ready} kills before the child \
         was ready",
        acked.len(),
        cps.len(),
        report.entries
    );
    assert!(
        !acked.is_empty() && !cps.is_empty(),
        "the children never got to append"
    );
}

/// A small ledger, closed: its directory and size.
fn closed_ledger(dir: &Path) -> u64 {
    let w = world(dir);
    for i in 0..20 {
        let body = consent_body(&w.custodian, &format!("c{i}"), "MRN-1", "ehr", &["GRU"]);
        w.ledger.append(w.custodian.sign(body)).unwrap();
    }
    w.ledger.size()
}

#[test]
fn torn_log_tails_are_truncated_and_appends_resume() {
    let src = tempfile::tempdir().unwrap();
    let size = closed_ledger(src.path());
    let log = std::fs::read(src.path().join(LOG)).unwrap();
    let records = files::records(&log);
    assert_eq!(records.len() as u64, size);
    // The record the next append would write, from a real payload (entry 1's).
    let next = files::frame(size, &log[records[1].start + HEADER..records[1].end]);
    let tails: [(&str, Vec<u8>); 4] = [
        ("a record cut in its payload", next[..HEADER + 40].to_vec()),
        ("a record cut in its header", next[..11].to_vec()),
        ("a run of zeros", vec![0; 4096]),
        (
            "a cut record then zeros",
            [&next[..HEADER + 40], &[0; 30]].concat(),
        ),
    ];
    for (what, tail) in tails {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        files::copy_dir(src.path(), dir);
        std::fs::write(dir.join(LOG), [&log[..], &tail].concat()).unwrap();

        // Verification reports the tail and changes nothing; opening truncates it.
        let before = files::snapshot(dir);
        match ledger::verify(dir, &|_, _| {}) {
            Err(Error::Corrupt { index, file, .. }) => assert_eq!((index, file), (size, LOG)),
            other => panic!("{what}: verify gave {other:?}"),
        }
        files::assert_unchanged(dir, &before, "verify");
        let (l, report) = Ledger::open(dir, config()).unwrap();
        assert_eq!(report.truncated_bytes, tail.len() as u64, "{what}");
        assert_eq!((report.entries, l.size()), (size, size), "{what}");
        assert_eq!(std::fs::read(dir.join(LOG)).unwrap(), log, "{what}");

        let newcomer = Actor::new("dr-new");
        let a = l.append_as_operator(newcomer.registration(ledger::ids::Role::Researcher, None));
        assert_eq!(a.unwrap().index, size, "{what}");
        let leaf = l.leaf(size).unwrap();
        drop(l);
        let (l, report) = Ledger::open(dir, config()).unwrap();
        assert_eq!((report.truncated_bytes, l.size()), (0, size + 1), "{what}");
        assert_eq!(l.leaf(size).unwrap(), leaf, "{what}");
        drop(l);
        ledger::verify(dir, &|_, _| {}).unwrap();
    }
}

#[test]
fn a_lagging_node_hash_file_is_repaired() {
    let src = tempfile::tempdir().unwrap();
    let size = closed_ledger(src.path());
    let (l, _) = Ledger::open(src.path(), config()).unwrap();
    let root = l.root(size).unwrap();
    let leaves: Vec<_> = (0..size).map(|i| l.leaf_hash(i).unwrap()).collect();
    drop(l);
    let tree = std::fs::read(src.path().join(TREE)).unwrap();
    // Leaf `k`'s node is at in-order position 2k; every node of earlier leaves is before it.
    let k = size / 2;
    let at = 32 * merkle::position(0, k) as usize;
    // (case, new contents or deleted, the first entry whose node is missing)
    let cases: [(&str, Option<Vec<u8>>, u64); 3] = [
        ("truncated at leaf k", Some(tree[..at].to_vec()), k),
        (
            "zeroed from leaf k",
            Some([&tree[..at], &vec![0; tree.len() - at]].concat()),
            k,
        ),
        ("deleted", None, 0),
    ];
    for (what, bytes, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        files::copy_dir(src.path(), dir);
        match bytes {
            Some(b) => std::fs::write(dir.join(TREE), b).unwrap(),
            None => std::fs::remove_file(dir.join(TREE)).unwrap(),
        }
        // Verification names the first entry whose node is missing; it repairs nothing.
        let before = files::snapshot(dir);
        match ledger::verify(dir, &|_, _| {}) {
            Err(Error::Corrupt { index, file, .. }) => assert_eq!((index, file), (want, TREE)),
            other => panic!("{what}: verify gave {other:?}"),
        }
        files::assert_unchanged(dir, &before, "verify");

        let (l, report) = Ledger::open(dir, config()).unwrap();
        assert!(report.nodes_repaired > 0, "{what}");
        assert_eq!(l.root(size).unwrap(), root, "{what}");
        for (i, h) in leaves.iter().enumerate() {
            assert_eq!(l.leaf_hash(i as u64).unwrap(), *h, "{what}: leaf {i}");
        }
        drop(l);
        ledger::verify(dir, &|_, _| {}).unwrap();
        let (_, report) = Ledger::open(dir, config()).unwrap();
        assert_eq!(report.nodes_repaired, 0, "{what}: repaired for good");
    }
}
